"""compiler/layout.py: where a prompt's images lie among its tokens, and reading them off a processor's prompt.

Reference: the sequence built token by token (each text token, then each image's tokens where its offset says),
apart from the ranges the layout computes; random layouts of 1-4 images, drawn afresh each run.
"""

from __future__ import annotations

import numpy as np
import pytest

from attnc.compiler.errors import AttncError
from attnc.compiler.layout import VisualLayout, format_offsets, parse_offsets, split_prompt
from attnc.testing import naming_the_draw


def _walk(offsets, per_image, text):
    """The sequence as ``[("text", j) | ("image", i)]``: text token ``j`` after every image whose offset is ``j`` or
    less, the images after the last text token whose offsets reach the end."""
    tokens, placed = [], 0
    for j in range(text + 1):
        while placed < len(offsets) and offsets[placed] == j:
            tokens += [("image", placed)] * per_image
            placed += 1
        if j < text:
            tokens.append(("text", j))
    return tokens


@pytest.mark.parametrize("draw", range(6))
def test_ranges_against_the_walked_sequence(draw):
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    with naming_the_draw(f"seed {seed}"):
        images, per_image = int(rng.integers(1, 5)), int(rng.integers(1, 6))
        offsets = tuple(sorted(int(k) for k in rng.integers(0, 7, images)))
        text = offsets[-1] + int(rng.integers(0, 5))
        layout = VisualLayout.of(images * per_image, offsets)
        tokens = _walk(offsets, per_image, text)
        n = len(tokens)
        kinds = np.array([kind == "image" for kind, _ in tokens])
        assert layout.images == images and layout.per_image == per_image and layout.tokens == kinds.sum()
        np.testing.assert_array_equal(layout.is_visual(n), kinds)
        np.testing.assert_array_equal(layout.text_index(n), np.flatnonzero(~kinds))
        for i, (start, stop) in enumerate(layout.ranges()):
            assert [k for k in range(n) if tokens[k] == ("image", i)] == list(range(start, stop))
        # the text in front of the last image's end, and the sequence's index there
        last = max(k for k in range(n) if tokens[k][0] == "image") + 1
        assert layout.end == last and layout.text_before_end == sum(not kinds[k] for k in range(last))
        pieces = layout.text_ranges()
        assert pieces[-1][1] is None and all(b is not None and a < b for a, b in pieces[:-1])
        np.testing.assert_array_equal(np.concatenate([np.arange(a, n if b is None else b) for a, b in pieces]),
                                      np.flatnonzero(~kinds))


def test_parse_and_refusals():
    assert parse_offsets(3) == (3,) and parse_offsets("5, 9") == (5, 9) and parse_offsets([0, 0, 4]) == (0, 0, 4)
    assert format_offsets((5, 9)) == "5,9" and str(VisualLayout.of(32, "5,9")) == "5,9"
    assert VisualLayout.of(16, 3).ranges() == [(3, 19)] and VisualLayout.of(16).text_ranges() == [(16, None)]
    for value, words in (("9,5", "must not decrease"), (-1, "0 or more"), ("a,b", "integers separated by commas"),
                         ((), "must be integers"), ((True,), "must be integers"), ((1.5,), "must be integers")):
        with pytest.raises(AttncError, match=words):
            parse_offsets(value)
    with pytest.raises(AttncError, match="do not split evenly among 2 images") as err:
        VisualLayout.of(15, (1, 3))
    assert "same size" in err.value.fix
    for tokens in (0, -4, 2.0):
        with pytest.raises(AttncError, match="must be positive"):
            VisualLayout.of(tokens, 0)


@pytest.mark.parametrize("draw", range(6))
def test_split_prompt_against_the_walked_sequence(draw):
    """A processor's prompt built token by token (a random layout of 1-4 images and random text ids, a batch of 1-3
    rows) splits back into its text ids and offsets."""
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    with naming_the_draw(f"seed {seed}"):
        images, per_image, batch = int(rng.integers(1, 5)), int(rng.integers(1, 6)), int(rng.integers(1, 4))
        offsets = tuple(sorted(int(k) for k in rng.integers(0, 7, images)))
        text = rng.integers(0, 50, (batch, offsets[-1] + int(rng.integers(0, 5))))
        tokens = _walk(offsets, per_image, text.shape[1])
        prompt = np.array([[99 if kind == "image" else row[j] for kind, j in tokens] for row in text])
        ids, found = split_prompt(prompt, 99, per_image)
        assert found == offsets
        np.testing.assert_array_equal(ids, text)


def test_split_prompt_refusals():
    prompt = np.array([[5, 9, 9, 9, 9, 6], [5, 9, 9, 9, 9, 7]])
    assert split_prompt(prompt, 9, 2)[1] == (1, 1) and split_prompt(prompt, 9, 4)[1] == (1,)
    for ids, per_image, words in ((prompt, 3, "no whole number of images of 3"),
                                  (prompt[0], 2, r"no \[batch, tokens\]"),
                                  (np.array([[5, 9, 9, 6], [9, 9, 5, 6]]), 2, "at different tokens"),
                                  (prompt, 0, "positive count"), (np.array([[5, 6]]), 2, "no placeholder")):
        with pytest.raises(AttncError, match=words):
            split_prompt(ids, 9, per_image)


@pytest.mark.parametrize("draw", range(4))
def test_image_rows_as_runs(draw):
    """Mistral 3's rows (``hf_pixtral.row_offsets``): images of ``rows`` rows after drawn ``K``s, walked token by token
    (each row's placeholders, then a break token) give the rows' offsets; ``image_starts`` reads the ``K``s back from
    them, and from the ``K``s themselves gives None (they are no rows' offsets) unless an image has one row."""
    from attnc.models.hf_pixtral import image_starts, row_offsets

    rng = np.random.default_rng()
    rows, columns, images = int(rng.integers(1, 5)), int(rng.integers(1, 4)), int(rng.integers(1, 4))
    gaps = rng.integers(0, 4, images)
    with naming_the_draw(f"{images} images of {rows} x {columns} after gaps {gaps.tolist()}"):
        sequence = []   # True at a visual token
        for gap in gaps:
            sequence += [False] * int(gap)
            for _ in range(rows):
                sequence += [True] * columns + [False]   # the row, then its break (or end) token
        starts, offsets, text = [], [], 0
        for i, visual in enumerate(sequence):
            if visual and (i == 0 or not sequence[i - 1]):
                offsets.append(text)
            text += not visual
        starts = tuple(offsets[::rows])
        assert row_offsets(starts, rows) == tuple(offsets)
        assert image_starts(tuple(offsets), rows) == starts
        # the images' K lie at least `rows` apart (the breaks between), so they never read as one image's rows
        assert image_starts(starts, rows) == (None if rows > 1 else starts)


def test_tiled_image_size():
    """A size of whole ``patch × merge`` blocks passes as it is; any other is refused with the nearest that tiles."""
    from attnc.compiler.layout import tiled_image_size

    assert tiled_image_size("Qwen-VL", (56, 84), 14, 2) == (56, 84)
    for size, nearest in (((50, 84), "56x84"), ((0, 28), "28x28"), ((28, 13), "28x28")):
        with pytest.raises(AttncError, match="does not tile into 28x28 blocks") as caught:
            tiled_image_size("Qwen-VL", size, 14, 2)
        assert f"e.g. {nearest}" in caught.value.fix
