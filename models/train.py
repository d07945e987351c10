"""Small generated tasks and seconds-long training loops, so shrink passes are measured on real accuracy.

- :func:`digits_data` / :func:`train_digits_vit`: scikit-learn's 8×8 handwritten digits
  (1797 images, 10 classes) and a ViT (``attention="mhsa"``) that reaches > 90 % test
  accuracy in a few seconds on two CPU cores.
- :func:`vqa_data` / :func:`train_vqa_vlm`: a generated visual-question-answering task for
  :class:`~attnc.models.vlm.TinyVLM`. Each image holds four objects, one per quadrant,
  each a square or a cross in one of four colours, on a noisy background. A question is
  ``[BOS, kind, quadrant]`` (``kind``: colour or shape); the answer is one token (a colour
  or a shape). Answering needs the text token to read the right visual tokens.

Everything is seeded; the same arguments give the same data and (on one thread) the same
weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from attnc.models.blocks import VisionTransformer
from attnc.models.vlm import TinyVLM

# --- VQA vocabulary ----------------------------------------------------------------
BOS, ASK_COLOUR, ASK_SHAPE = 1, 2, 3
QUADRANT_TOKENS = (4, 5, 6, 7)                 # top-left, top-right, bottom-left, bottom-right
COLOUR_TOKENS = (10, 11, 12, 13)               # red, green, blue, yellow
SHAPE_TOKENS = (20, 21)                        # square, cross
COLOURS = np.array([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.15, 0.25, 1.0], [1.0, 1.0, 0.1]], dtype=np.float32)
VQA_VOCAB = 32


@dataclass
class Split:
    """Inputs and integer labels of one split."""

    inputs: tuple[torch.Tensor, ...]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, size: int):
        """Consecutive ``(inputs, labels)`` batches."""
        for i in range(0, len(self), size):
            yield tuple(x[i:i + size] for x in self.inputs), self.labels[i:i + size]


def digits_data(test_fraction: float = 0.25, seed: int = 0) -> tuple[Split, Split]:
    """scikit-learn digits as ``[N, 1, 8, 8]`` float images in ``[0, 1]`` (train, test)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images[:, None] / 16.0, dtype=torch.float32)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Split((images[train],), labels[train]), Split((images[test],), labels[test])


def digits_vit(dim: int = 32, depth: int = 4, num_heads: int = 4, seed: int = 0) -> VisionTransformer:
    """The digits classifier: 8×8 single-channel images, 2×2 patches (16 tokens + CLS)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VisionTransformer(img_size=8, patch_size=2, in_chans=1, num_classes=10, dim=dim, depth=depth,
                                 num_heads=num_heads, mlp_ratio=2.0, attention="mhsa")


def fit(model: nn.Module, train: Split, epochs: int, lr: float = 3e-3, batch: int = 64, seed: int = 0,
        loss_fn=None) -> nn.Module:
    """AdamW + cosine schedule, cross-entropy on ``model(*inputs)``; returns the model in eval mode."""
    loss_fn = loss_fn or (lambda model, inputs, labels: nn.functional.cross_entropy(model(*inputs), labels))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * ((len(train) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(train), generator=gen)
        for i in range(0, len(train), batch):
            idx = order[i:i + batch]
            loss = loss_fn(model, tuple(x[idx] for x in train.inputs), train.labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, split: Split, batch: int = 256, **kwargs) -> float:
    """Top-1 accuracy of ``model(*inputs, **kwargs)`` on ``split``."""
    correct = 0
    for inputs, labels in split.batches(batch):
        correct += int((model(*inputs, **kwargs).argmax(-1) == labels).sum())
    return correct / len(split)


def train_digits_vit(epochs: int = 12, seed: int = 0, lr: float = 4e-3,
                     **kwargs) -> tuple[VisionTransformer, Split, Split]:
    """Train :func:`digits_vit` (``kwargs``: its size) on the digits train split; returns ``(model, train, test)``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        train, test = digits_data(seed=seed)
        model = fit(digits_vit(seed=seed, **kwargs), train, epochs, lr=lr, seed=seed)
    return model, train, test


# --- visual question answering ------------------------------------------------------

def vqa_data(n: int, img_size: int = 32, seed: int = 0, noise: float = 0.1) -> Split:
    """``n`` generated (image ``[3, S, S]``, question ``[3]`` int64) pairs with answer tokens.

    The image has four objects (one per quadrant): a filled square or a cross in one of
    four colours, with a random offset inside its quadrant, on Gaussian noise.
    """
    rng = np.random.default_rng(seed)
    half = img_size // 2
    side = half // 2 + 2
    images = rng.normal(0.0, noise, size=(n, 3, img_size, img_size)).astype(np.float32)
    colours = rng.integers(0, len(COLOUR_TOKENS), size=(n, 4))
    shapes = rng.integers(0, len(SHAPE_TOKENS), size=(n, 4))
    for i in range(n):
        for quad in range(4):
            y0 = (quad // 2) * half + rng.integers(0, half - side + 1)
            x0 = (quad % 2) * half + rng.integers(0, half - side + 1)
            mask = np.zeros((side, side), dtype=bool)
            if shapes[i, quad] == 0:
                mask[:] = True
            else:
                mask[side // 2 - 1:side // 2 + 1, :] = True
                mask[:, side // 2 - 1:side // 2 + 1] = True
            patch = images[i, :, y0:y0 + side, x0:x0 + side]
            patch[:, mask] = COLOURS[colours[i, quad]][:, None]
    quad = rng.integers(0, 4, size=n)
    ask_colour = rng.random(n) < 0.5
    questions = np.stack([np.full(n, BOS), np.where(ask_colour, ASK_COLOUR, ASK_SHAPE),
                          np.array(QUADRANT_TOKENS)[quad]], axis=1).astype(np.int64)
    rows = np.arange(n)
    answers = np.where(ask_colour, np.array(COLOUR_TOKENS)[colours[rows, quad]],
                       np.array(SHAPE_TOKENS)[shapes[rows, quad]]).astype(np.int64)
    return Split((torch.from_numpy(images), torch.from_numpy(questions)), torch.from_numpy(answers))


def vqa_vlm(seed: int = 0, **overrides) -> TinyVLM:
    """The VQA model: 32 px images in 8 px patches (16 visual tokens), a 4-layer decoder."""
    config = dict(img_size=32, patch_size=8, vision_dim=32, vision_depth=1, vision_heads=2, dim=32, depth=4,
                  num_heads=4, vocab_size=VQA_VOCAB, max_text_len=8, mlp_ratio=2.0)
    config.update(overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyVLM(**config)


def train_vqa_vlm(n_train: int = 3000, n_test: int = 1000, epochs: int = 8, seed: int = 0,
                  exit_aware: bool = False, **overrides) -> tuple[TinyVLM, Split, Split]:
    """Train :func:`vqa_vlm` (``overrides``: its configuration) on :func:`vqa_data`; returns ``(model, train, test)``.

    ``exit_aware``: each batch also adds the loss with the visual tokens dropped after a
    random decoder layer ≥ 1 (the model learns to move what it needs from the image into
    the text tokens early, which is what visual-token exit relies on).
    """
    img_size = overrides.get("img_size", 32)
    train = vqa_data(n_train, img_size=img_size, seed=seed)
    test = vqa_data(n_test, img_size=img_size, seed=seed + 1)

    def loss_fn(model, inputs, labels):
        loss = nn.functional.cross_entropy(model(*inputs), labels)
        if exit_aware:
            k = int(torch.randint(1, len(model.layers), ()))
            loss = loss + nn.functional.cross_entropy(model(*inputs, exit_layer=k), labels)
        return loss

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = fit(vqa_vlm(seed=seed, **overrides), train, epochs, lr=2e-3, seed=seed, loss_fn=loss_fn)
    return model, train, test
