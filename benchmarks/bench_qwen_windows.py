"""Qwen2.5-VL's windowed vision layers: a batch of windows against one attention under a block mask.

    python benchmarks/bench_qwen_windows.py [--image 448] [--reps 40] [--threads 1] [--out benchmarks/results]
                                            [--smoke]

attnc's Qwen2.5-VL image encoder (``models/hf_qwen_vl.py``) runs the tower's windowed layers as a batch of windows
where the windows are of one size, and keeps a block mask over the whole image for ragged ones. This measures what
the batch saves: a random Qwen2.5-VL (a 4-layer tower of width 64, its last layer over the whole image, 112-pixel
windows; a 2-layer text model of width 256) exported at a square whose windows are whole (448 px: 1024 patches in 16
windows of 64), once as attnc exports it and once with the encoder forced to the block mask. Both are compiled by
attnc, their logits compared with transformers' forward on the processor's own patches, and both timed side by side
on ONNX Runtime CPU (runs interleaved, median of ``--reps``). Raw numbers go to ``<out>/qwen-windows-<date>.json``.
``--smoke`` runs at 224 px (4 windows; seconds, the numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_shrink import side_by_side  # noqa: E402

from attnc.compiler.export import export_onnx  # noqa: E402
from attnc.compiler.pipeline import CompileOptions, compile_model  # noqa: E402


def random_qwen25(folder: Path) -> Path:
    """A seeded random Qwen2.5-VL saved in ``folder``: 256 words, the image token 252."""
    import transformers

    from attnc.testing import save_seeded

    text = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=4, vocab_size=256, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "mrope_section": [4, 6, 6]})
    vision = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=256, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[3])
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=252,
                                           video_token_id=253, vision_start_token_id=254, vision_end_token_id=255,
                                           architectures=["Qwen2_5_VLForConditionalGeneration"])
    return save_seeded(config, "Qwen2_5_VLForConditionalGeneration", folder)


def masked(module):
    """``module`` with its encoder's windowed layers under the block mask it keeps for ragged windows (in place)."""
    encoder = module.encoder
    size = encoder.num_patches // encoder.windows   # the windows lie one after the other, all of this size
    window = torch.arange(encoder.num_patches) // size
    encoder.same_window = window[:, None] == window[None, :]
    encoder.windows = None
    return module


def transformers_logits(module, pixels: torch.Tensor, ids: torch.Tensor) -> np.ndarray:
    """transformers' forward on the processor's patches of ``pixels`` with the image in front of ``ids``."""
    import transformers

    hf, p = module.model, module.num_visual_tokens
    processor = transformers.Qwen2VLImageProcessorPil(do_resize=False, do_rescale=False, do_normalize=False)
    cut = processor([image.numpy() for image in pixels], return_tensors="pt", input_data_format="channels_first")
    prompt = torch.cat([torch.full((len(ids), p), hf.config.image_token_id), ids], 1)
    types = torch.zeros_like(prompt, dtype=torch.int32)
    types[:, :p] = 1
    with torch.no_grad():
        return hf(input_ids=prompt, pixel_values=cut["pixel_values"], image_grid_thw=cut["image_grid_thw"],
                  mm_token_type_ids=types).logits[:, p:].numpy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", type=int, default=448, help="pixels a side, a multiple of 112")
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    image = 224 if args.smoke else args.image
    torch.set_num_threads(args.threads)
    from attnc.models.hf_checkpoint import load_checkpoint, with_image_size

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = random_qwen25(tmp / "qwen25")
        models, rows = {}, []
        for form in ("windows", "mask"):
            module, spec = with_image_size(*load_checkpoint(str(folder)), (image, image))
            if form == "mask":
                masked(module)
            export_onnx(module, spec.example_inputs(seq=16), tmp / f"{form}.onnx", input_names=spec.input_names,
                        dynamic_axes=spec.dynamic_axes)
            compile_model(tmp / f"{form}.onnx", tmp / form, CompileOptions())
            models[form] = onnx.load(str(tmp / form / "model.fused.onnx"))
            pixels, ids = spec.example_inputs(batch=2, seq=16, seed=3)
            from attnc.compiler.backends.onnxruntime import load

            got = next(iter(load(models[form]).infer({"pixel_values": pixels.numpy(),
                                                      "input_ids": ids.numpy()}).values()))
            error = float(np.abs(got - transformers_logits(module, pixels, ids)).max())
            rows.append({"form": form, "max_abs_error_vs_transformers": error,
                         "nodes": len(models[form].graph.node)})
        latency = {}
        for batch in (1, 4):
            pixels, ids = spec.example_inputs(batch=batch, seq=16, seed=4)
            latency[str(batch)] = side_by_side(models, {"pixel_values": pixels.numpy(), "input_ids": ids.numpy()},
                                               args.reps, args.threads)
    import onnxruntime

    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "smoke": args.smoke, "image": image,
               "patches": (image // 14) ** 2, "windows": (image // 112) ** 2, "visual_tokens": (image // 28) ** 2,
               "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                           "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(),
                           "onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
               "threads": args.threads, "reps": args.reps, "rows": rows, "latency_ms": latency}
    print(f"Qwen2.5-VL at {image}x{image}: {results['patches']} patches in {results['windows']} windows, "
          f"{results['visual_tokens']} visual + 16 text tokens; ORT CPU, {args.threads} thread(s), median of "
          f"{args.reps} interleaved runs")
    print(f"  {'form':<9}{'max abs vs transformers':>25}" + "".join(f"{'b' + b + ' ms':>10}{'ratio':>7}"
                                                               for b in latency))
    for row in rows:
        line = f"  {row['form']:<9}{row['max_abs_error_vs_transformers']:>25.2e}"
        for lat in latency.values():
            line += f"{lat[row['form']]:>10.2f}{lat[row['form']] / lat['mask']:>7.2f}"
        print(line)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"qwen-windows-{'smoke-' if args.smoke else ''}{time.strftime('%Y-%m-%d')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nraw numbers: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
