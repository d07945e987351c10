"""The registry's contract (names, seeded factories, example inputs), the realistic
configs' sizes, and the composite models' structural promises (VLM visual-token exit)."""

from __future__ import annotations

import pytest
import torch

from attnc.compiler.errors import AttncError
from attnc.models import CausalLM, TinyVLM, VisionTransformer, make_attention, registry
from attnc.models.registry import SPECS, get_spec

REQUIRED = [
    "mhsa-small", "agent-small", "agent-nobias-small", "flow-small", "flow-causal-small", "na1d-small",
    "na2d-small", "na2d-gather-small", "na2d-rpb-small", "na1d-causal-small", "linear-elu-small",
    "linear-relu-causal-small", "lightning-small", "vlm-small",
    *(f"vit-{family}-small" for family in ("mhsa", "agent", "flow", "linear", "neighborhood")),
    *(f"vit-{family}-realistic" for family in ("mhsa", "agent", "flow", "linear", "neighborhood")),
    "na2d-realistic", "lm-mhsa-realistic", "lm-lightning-realistic",
]


def test_required_specs_exist_with_module_level_factories():
    assert not set(REQUIRED) - set(SPECS)
    for name, spec in SPECS.items():
        assert spec.name == name
        assert getattr(registry, name.replace("-", "_")) is spec.factory
        assert spec.realistic == name.endswith("-realistic")


def test_unknown_spec_lists_the_valid_names():
    with pytest.raises(AttncError) as info:
        get_spec("mhsa-tiny")
    assert "mhsa-tiny" in info.value.problem
    assert "mhsa-small" in info.value.fix and "vlm-small" in info.value.fix


@pytest.mark.parametrize("name", ["na2d-rpb-small", "vit-agent-small", "lm-lightning-small"])
def test_factories_are_seeded_and_leave_the_global_rng_alone(name):
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    first, second = SPECS[name].factory(), SPECS[name].factory()
    assert torch.rand(1) == before
    assert not first.training
    for (key, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), key


def test_example_inputs_follow_sizes_and_seed():
    spec = get_spec("vlm-small")
    image, ids = spec.example_inputs(batch=3, seed=5, text_len=9)
    assert image.shape == (3, 3, 32, 32) and image.dtype == torch.float32
    assert ids.shape == (3, 9) and ids.dtype == torch.int64 and 0 <= ids.min() and ids.max() < 97
    again = spec.example_inputs(batch=3, seed=5, text_len=9)
    assert torch.equal(image, again[0]) and torch.equal(ids, again[1])
    assert not torch.equal(image, spec.example_inputs(batch=3, seed=6, text_len=9)[0])
    assert spec.dynamic_axes == {"image": {0: "batch"}, "text_ids": {0: "batch", 1: "text_len"},
                                 "output": {0: "batch"}}
    assert spec.input_names == ["image", "text_ids"]
    with pytest.raises(AttncError, match="no size"):
        spec.example_inputs(seq=4)


@pytest.mark.parametrize("name,params_m,sizes", [
    ("vit-mhsa-realistic", 5.72, {}),          # DeiT-Tiny: 5.7 M parameters
    ("vit-agent-realistic", 6.02, {}),
    ("vit-neighborhood-realistic", 5.72, {}),
    ("na2d-realistic", 0.017, {}),
    ("lm-lightning-realistic", 49.6, {"seq": 64}),
    ("vlm-realistic", 61.2, {"text_len": 8}),
])
def test_realistic_configs(name, params_m, sizes):
    spec = get_spec(name)
    model = spec.factory()
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, rel=0.01)
    with torch.no_grad():
        out = model(*spec.example_inputs(**sizes))
    assert torch.isfinite(out).all()


def test_realistic_lm_covers_2k_to_8k_tokens():
    spec = get_spec("lm-mhsa-realistic")
    assert 2048 <= spec.sizes["seq"] <= 8192 and "seq" in spec.dynamic
    assert spec.factory().pos_embed.shape[0] == 8192


def test_vlm_exit_layer_runs_late_layers_on_text_only():
    torch.manual_seed(0)
    vlm = TinyVLM(img_size=16, patch_size=8, vision_dim=16, vision_depth=1, vision_heads=2, dim=16, depth=3,
                  num_heads=2, vocab_size=11, max_text_len=8).eval()
    image, ids = torch.randn(2, 3, 16, 16), torch.randint(0, 11, (2, 5))
    with torch.no_grad():
        full = vlm(image, ids)
        assert torch.equal(vlm(image, ids, exit_layer=3), full)
        for exit_layer in range(4):
            x = torch.cat([vlm.projector(vlm.vision.forward_features(image)), vlm.embed(ids)], dim=1)
            x = x + vlm.pos_embed[: x.shape[1]]
            for i, layer in enumerate(vlm.layers):
                if i == exit_layer:
                    x = x[:, vlm.num_visual_tokens:]
                x = layer(x)
            if exit_layer == len(vlm.layers):
                x = x[:, vlm.num_visual_tokens:]
            expected = vlm.head(vlm.norm(x[:, -1]))
            torch.testing.assert_close(vlm(image, ids, exit_layer=exit_layer), expected, rtol=0, atol=0)
        # Exiting before the first layer: the text never sees the image.
        torch.testing.assert_close(vlm(image, ids, exit_layer=0), vlm(torch.randn_like(image), ids, exit_layer=0))
    with pytest.raises(ValueError, match="exit_layer"):
        vlm(image, ids, exit_layer=4)


def test_model_options_that_cannot_work_are_rejected():
    with pytest.raises(ValueError, match="CLS"):
        VisionTransformer(img_size=32, patch_size=4, dim=16, depth=1, num_heads=2, attention="neighborhood")
    with pytest.raises(ValueError, match="unknown"):
        CausalLM(attention="agent")
    with pytest.raises(ValueError, match="causal only"):
        make_attention("lightning", 16, 2)
