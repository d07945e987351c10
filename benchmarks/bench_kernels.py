"""Kernel benchmark: attnc's Triton kernels against the best available peers, on one GPU.

For each fused op at realistic sizes it times attnc's kernel and every peer that imports:

- NeighborhoodAttention: NATTEN (``natten.na1d``/``na2d``, heads-last layout), torch
  ``flex_attention`` with a neighborhood ``BlockMask`` (+ ``score_mod`` for RPB), and SDPA
  with a dense boolean/additive mask;
- KernelLinearAttention: flash-linear-attention's chunk kernels (``chunk_linear_attn``,
  ``chunk_simple_gla`` with ``g_gamma = log λ`` for per-head decay; timings only: fla applies
  no feature map and normalises its own way), Lightning Attention-2's kernel
  (``lightning_attn.ops.triton.lightning_attn2``, slope ``-log λ``) for lightning attention,
  and the op's torch reference eager and ``torch.compile``-d; with a recurrent state (a decode
  step, and a prefill that carries one), fla's ``fused_recurrent_simple_gla`` /
  ``fused_recurrent_linear_attn`` with ``initial_state`` and ``output_final_state``;
- FlowAttention, AgentAttention: the op's torch reference, eager and ``torch.compile``-d; flow
  attention also against attnc's own one-range-per-head form (its default splits each head's tokens);
  agent attention also against its two stages as two SDPA calls (the lowered route) and the
  fused kernel a TensorRT engine launches, and attnc's two PyTorch-path forms (one launch, two
  phases; its default picks one per shape). ``--agent-routes FILE`` records the two-SDPA and
  TensorRT-kernel timings per shape class for ``attnc compile``'s per-node choice
  (``attnc.plugins.agent.routes``).

It prints one table of ratios ``peer time / attnc time`` (> 1: attnc is faster) plus attnc's
max relative error against the float64 reference (the only check of the GPU-only paths: tf32
and bf16 tensor-core products), and saves raw timings with the device name and date to
``benchmarks/results/kernels-<device>-<date>.json``.

    python benchmarks/bench_kernels.py                       # every op, fp16
    python benchmarks/bench_kernels.py --ops neighborhood --dtype bf16
    python benchmarks/bench_kernels.py --smoke               # CPU: tiny shapes, interpreter, no timing claims

Needs an NVIDIA GPU (exits with a message otherwise), except ``--smoke``, which runs every
case at toy sizes on CPU under Triton's interpreter to prove the script and its peers' calls
work before GPU time is spent on it.
"""

from __future__ import annotations

import sys

if "--smoke" in sys.argv:  # must precede the first triton import (see plugins/kernels_common.py)
    import os
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- cases
# Each case builds (attnc_fn, {peer name: fn}, reference_fn) on the device; every fn takes no
# arguments and returns the output tensor (peer layouts are converted outside the timed call).

def _rand(*shape, dtype, device):
    return torch.randn(*shape, dtype=dtype, device=device)


def _neighborhood_mask_mod(grid, ks, ds, cs, ss):
    """A flex_attention mask_mod for the op's semantics on flattened 1-D/2-D/3-D grids."""
    def axis_ok(qi, ki, length, k, d, causal, s):
        gq, pq = qi % d, qi // d
        pk = ki // d
        n = (length - 1 - gq) // d + 1
        leader = torch.minimum((pq // s) * s + (s - 1 if causal else s // 2), n - 1)  # stride block's leader
        start = leader - k + 1 if causal else torch.minimum(torch.clamp(leader - k // 2, min=0), n - k)
        return (ki % d == gq) & (pk >= start) & (pk <= pq if causal else pk < start + k)

    def mask_mod(b, h, q_idx, kv_idx):
        ok = None
        rest_q, rest_k = q_idx, kv_idx
        for axis in reversed(range(len(grid))):
            length = grid[axis]
            term = axis_ok(rest_q % length, rest_k % length, length, ks[axis], ds[axis], cs[axis], ss[axis])
            ok = term if ok is None else ok & term
            rest_q, rest_k = rest_q // length, rest_k // length
        return ok
    return mask_mod


def case_neighborhood(cfg, dtype, device):
    from attnc.plugins.neighborhood import dense_mask_and_rel, reference
    from attnc.plugins.neighborhood.kernels import neighborhood_forward

    b, h, grid, d = cfg["batch"], cfg["heads"], cfg["grid"], cfg["dim"]
    ks, ds = cfg["kernel_size"], cfg.get("dilation", (1,) * len(grid))
    cs = cfg.get("is_causal", (0,) * len(grid))
    ss = cfg.get("stride", (1,) * len(grid))
    q, k, v = (_rand(b, h, *grid, d, dtype=dtype, device=device) for _ in range(3))
    rpb = _rand(h, *(2 * x - 1 for x in ks), dtype=dtype, device=device) if cfg.get("rpb") else None
    ours = lambda: neighborhood_forward(q, k, v, ks, ds, cs, 0.0, rpb, stride=ss)  # noqa: E731
    ref = lambda: reference(q.double(), k.double(), v.double(), ks, ds, cs, 0.0,  # noqa: E731
                            None if rpb is None else rpb.double(), stride=ss)
    peers: dict[str, Callable] = {}
    n_tokens = math.prod(grid)
    flat = lambda t: t.reshape(b, h, n_tokens, t.shape[-1])  # noqa: E731
    allowed, rel = dense_mask_and_rel(grid, ks, ds, cs, ss)
    allowed_t = torch.from_numpy(allowed).to(device)
    if rpb is None:
        sdpa_mask = allowed_t
    else:
        import numpy as np
        flat_rel = torch.from_numpy(np.ravel_multi_index(tuple(np.moveaxis(rel, -1, 0)), rpb.shape[1:])).to(device)
        bias = rpb.reshape(h, -1)[:, flat_rel]                                     # [H, N, N]
        sdpa_mask = bias.masked_fill(~allowed_t, float("-inf")).unsqueeze(0)
    qf, kf, vf = flat(q), flat(k), flat(v)
    peers["sdpa+mask"] = lambda: torch.nn.functional.scaled_dot_product_attention(qf, kf, vf, attn_mask=sdpa_mask)
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        block_mask = create_block_mask(_neighborhood_mask_mod(grid, ks, ds, cs, ss), None, None, n_tokens, n_tokens,
                                       device=device.type)
        score_mod = None
        if rpb is not None:
            bias_table = bias

            def score_mod(score, b_, h_, q_idx, kv_idx):
                return score + bias_table[h_, q_idx, kv_idx]
        flex = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
        peers["flex_attention"] = lambda: flex(qf, kf, vf, score_mod=score_mod, block_mask=block_mask)
    except Exception as exc:  # older torch, or a mask_mod this torch cannot trace
        print(f"  flex_attention unavailable: {exc}")
    try:
        import natten
        heads_last = [t.movedim(1, -2).contiguous() for t in (q, k, v)]       # [B, *grid, H, D]
        fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[len(grid)]
        kwargs = dict(kernel_size=ks if len(ks) > 1 else ks[0], dilation=ds if len(ds) > 1 else ds[0],
                      is_causal=tuple(bool(c) for c in cs) if len(cs) > 1 else bool(cs[0]),
                      stride=ss if len(ss) > 1 else ss[0])
        if rpb is None:  # NATTEN >= 0.20 has no RPB
            peers["natten"] = lambda: fn(*heads_last, **kwargs)
    except ImportError:
        pass
    return ours, peers, ref


def case_linear(cfg, dtype, device):
    from attnc.plugins.linear import reference
    from attnc.plugins.linear.kernels import linear_forward

    b, h, n, d = cfg["batch"], cfg["heads"], cfg["seq"], cfg["dim"]
    q, k, v = (_rand(b, h, n, d, dtype=dtype, device=device) for _ in range(3))
    decay = (0.9 + 0.1 * torch.rand(h, device=device)) if cfg.get("decay") else None
    attrs = dict(feature_map=cfg.get("feature_map", "elu1"), causal=cfg["causal"], normalize=cfg.get("normalize", 1))
    # A decode step (``state``): the running state in, the new state out, both float32.
    state = (0.1 * torch.randn(b, h, d, d + attrs["normalize"], device=device)) if cfg.get("state") else None
    with_state = dict(state=state, return_state=True) if state is not None else {}
    ours = lambda: linear_forward(q, k, v, decay, **attrs, **with_state)  # noqa: E731
    ref = lambda: reference(q.double(), k.double(), v.double(),  # noqa: E731
                            None if decay is None else decay.double(), **attrs,
                            **({} if state is None else dict(state=state.double(), return_state=True)))
    peers: dict[str, Callable] = {}
    if not cfg["causal"] or n <= 2048:  # the eager causal reference is a Python loop over t (~0.3 s at 2048)
        peers["torch eager"] = lambda: reference(q, k, v, decay, **attrs, **with_state)
    if not cfg["causal"]:
        compiled = torch.compile(reference, dynamic=False)
        peers["torch.compile"] = lambda: compiled(q, k, v, decay, **attrs)
    if cfg["causal"]:
        try:
            from fla.ops.linear_attn import chunk_linear_attn, fused_recurrent_linear_attn
            from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla
            qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))     # [B, T, H, D]
            if state is not None and not attrs["normalize"]:   # fla's decode kernels: state [B, H, K, V]
                s0 = state.contiguous()
                if decay is None:
                    peers["fla fused_recurrent_linear_attn"] = lambda: fused_recurrent_linear_attn(
                        qt, kt, vt, scale=1.0, initial_state=s0, output_final_state=True)
                else:
                    g_gamma = decay.float().log()
                    peers["fla fused_recurrent_simple_gla"] = lambda: fused_recurrent_simple_gla(
                        qt, kt, vt, g_gamma=g_gamma, scale=1.0, initial_state=s0, output_final_state=True)
            elif state is None and decay is None:
                peers["fla chunk_linear_attn"] = lambda: chunk_linear_attn(
                    qt, kt, vt, scale=1.0, normalize=bool(attrs["normalize"]))[0]
            elif state is None:
                g_gamma = decay.float().log()
                peers["fla chunk_simple_gla"] = lambda: chunk_simple_gla(qt, kt, vt, g_gamma=g_gamma, scale=1.0)[0]
        except ImportError:
            pass
    if state is None and decay is not None and attrs["feature_map"] == "identity" and not attrs["normalize"]:
        try:  # Lightning Attention-2's own Triton kernel: the same op, decay exp(-s) per head
            from lightning_attn.ops.triton import lightning_attn2
            slope = (-decay.float().log()).contiguous()
            peers["lightning_attn2"] = lambda: lightning_attn2(q, k, v, slope)
        except ImportError:
            pass
    return ours, peers, ref


def case_flow(cfg, dtype, device):
    from attnc.plugins.flow import reference
    from attnc.plugins.flow.kernels import flow_forward

    b, h, n, d, causal = cfg["batch"], cfg["heads"], cfg["seq"], cfg["dim"], cfg.get("causal", 0)
    q, k, v = (_rand(b, h, n, d, dtype=dtype, device=device) for _ in range(3))
    compiled = torch.compile(reference, dynamic=False)
    peers = {"torch eager": lambda: reference(q, k, v, causal), "torch.compile": lambda: compiled(q, k, v, causal)}
    if not causal:   # attnc's own two forms side by side: one program per head, and token ranges
        peers["attnc one range"] = lambda: flow_forward(q, k, v, causal, token_splits=1)
    return (lambda: flow_forward(q, k, v, causal), peers,
            lambda: reference(q.double(), k.double(), v.double(), causal))


def case_agent(cfg, dtype, device):
    from attnc.plugins.agent import reference
    from attnc.plugins.agent.kernels import agent_forward, agent_phase_config
    from attnc.plugins.kernels_common import range_splits

    b, h, n, agents, d = cfg["batch"], cfg["heads"], cfg["seq"], cfg["agents"], cfg["dim"]
    q, k, v = (_rand(b, h, n, d, dtype=dtype, device=device) for _ in range(3))
    a = _rand(b, h, agents, d, dtype=dtype, device=device)
    b1 = _rand(1, h, agents, n, dtype=dtype, device=device) if cfg.get("bias") else None
    b2 = _rand(1, h, n, agents, dtype=dtype, device=device) if cfg.get("bias") else None
    compiled = torch.compile(reference, dynamic=False)
    peers = {"torch eager": lambda: reference(q, k, v, a, b1, b2),
             "torch.compile": lambda: compiled(q, k, v, a, b1, b2)}
    # Each stage is exactly SDPA with an additive mask: the "lower to Attention" alternative.
    peers[LOWERED_AGENT] = lambda: torch.nn.functional.scaled_dot_product_attention(
        q, a, torch.nn.functional.scaled_dot_product_attention(a, k, v, attn_mask=b1), attn_mask=b2)
    peers[FUSED_AGENT_TRT] = _agent_trt_kernel(q, k, v, a, b1, b2)
    # attnc's own two paths side by side (its default picks one per shape): one launch, and two
    # phases with stage 1 split over keys where the GPU has room for it.
    phase_config = agent_phase_config(agents, dtype, d, d)
    if phase_config is not None:
        key_splits = range_splits(b * h, n, phase_config["BLOCK_N"])
        peers["attnc one launch"] = lambda: agent_forward(q, k, v, a, b1, b2, key_splits=0)
        peers["attnc two-phase"] = lambda: agent_forward(q, k, v, a, b1, b2, key_splits=key_splits)
    return (lambda: agent_forward(q, k, v, a, b1, b2),
            peers, lambda: reference(*(None if t is None else t.double() for t in (q, k, v, a, b1, b2))))


LOWERED_AGENT = "2x sdpa"
FUSED_AGENT_TRT = "attnc TensorRT kernel"


def _agent_trt_kernel(q, k, v, a, b1, b2) -> Callable:
    """The fused kernel a TensorRT engine launches (one program per head and query tile,
    stage 1 recomputed per tile), launched as the plugin does, with the plugin's config."""
    from attnc.plugins.agent.kernels import trt_launch

    inputs = [t for t in (q, k, v, a, b1, b2) if t is not None]
    shapes = [list(t.shape) for t in inputs]
    spec, grid, scalars = trt_launch({"scale": 0.0}, [str(q.dtype).removeprefix("torch.")] * len(inputs), shapes)
    out = torch.empty(*q.shape[:3], v.shape[-1], dtype=q.dtype, device=q.device)
    launch_grid, ints = grid([list(out.shape)]), scalars(shapes)

    def run():
        spec.kernel[launch_grid](*inputs, *ints, out, **spec.constexprs, num_warps=spec.num_warps,
                                 num_stages=spec.num_stages)
        return out
    return run


def record_agent_route(path: Path, row: dict, dtype: torch.dtype, device_name: str, date: str) -> bool:
    """Add one agent case's fused-TensorRT-kernel and lowered timings to the route table that
    ``attnc compile`` reads (``attnc.plugins.agent.routes``); False when either is missing."""
    from attnc.plugins.agent import routes

    fused, lowered = (row.get("peers_ms", {}).get(name) for name in (FUSED_AGENT_TRT, LOWERED_AGENT))
    if not fused or not lowered:
        return False
    cfg = row["config"]
    shape = routes.ShapeClass(str(dtype).removeprefix("torch."), cfg["seq"], cfg["seq"], cfg["agents"], cfg["dim"],
                              cfg["dim"], bool(cfg.get("bias")))
    routes.record(path, shape, fused, lowered, device_name, date)
    return True


CASES = {"neighborhood": case_neighborhood, "linear": case_linear, "flow": case_flow, "agent": case_agent}

CONFIGS = {
    "neighborhood": [
        dict(name="NAT-T stage1 56x56 k7 rpb", batch=16, heads=2, grid=(56, 56), dim=32, kernel_size=(7, 7), rpb=True),
        dict(name="DiNAT 28x28 k7 d2", batch=16, heads=8, grid=(28, 28), dim=32, kernel_size=(7, 7), dilation=(2, 2)),
        dict(name="2-D 64x64 k13 D64", batch=4, heads=4, grid=(64, 64), dim=64, kernel_size=(13, 13)),
        dict(name="1-D 4096 k31 causal D64", batch=4, heads=8, grid=(4096,), dim=64, kernel_size=(31,), is_causal=(1,)),
        dict(name="3-D video 8x28x28 k3x7x7 D64", batch=2, heads=4, grid=(8, 28, 28), dim=64, kernel_size=(3, 7, 7)),
        dict(name="3-D video strided s1x4x4 causal-t", batch=2, heads=4, grid=(8, 28, 28), dim=64,
             kernel_size=(3, 7, 7), stride=(1, 4, 4), is_causal=(1, 0, 0)),
    ],
    "linear": [
        dict(name="non-causal N4096 D64 elu1", batch=4, heads=8, seq=4096, dim=64, causal=0),
        dict(name="causal N2048 D64", batch=4, heads=8, seq=2048, dim=64, causal=1),
        dict(name="lightning N4096 D128 decay", batch=2, heads=16, seq=4096, dim=128, causal=1, decay=True,
             feature_map="identity", normalize=0),
        # decode: one token per sequence against the recurrent state (bandwidth: the state's read + write)
        dict(name="lightning decode B64 D128", batch=64, heads=16, seq=1, dim=128, causal=1, decay=True,
             feature_map="identity", normalize=0, state=True),
        dict(name="lightning N1000 +state", batch=4, heads=16, seq=1000, dim=128, causal=1, decay=True,
             feature_map="identity", normalize=0, state=True),
    ],
    "flow": [
        dict(name="Flowformer N4096 D64", batch=8, heads=8, seq=4096, dim=64),
        dict(name="ViT N197 D64", batch=64, heads=6, seq=197, dim=64),
        dict(name="causal LM N2048 D64", batch=8, heads=8, seq=2048, dim=64, causal=1),
    ],
    "agent": [
        dict(name="one query tile N64 n16", batch=256, heads=4, seq=64, agents=16, dim=64),
        dict(name="Agent-DeiT-S N197 n49", batch=64, heads=6, seq=197, agents=49, dim=64, bias=True),
        dict(name="Agent-PVT-T stage1 N3136 n49", batch=16, heads=1, seq=3136, agents=49, dim=64, bias=True),
        dict(name="AgentSD-like N4096 n256", batch=2, heads=8, seq=4096, agents=256, dim=64),
    ],
}


def _smoke_config(op: str, cfg: dict) -> dict:
    """The same case at toy sizes (CPU interpreter)."""
    small = dict(cfg, batch=1, heads=2, dim=16)
    if op == "neighborhood":
        ndim = len(cfg["grid"])
        small["kernel_size"] = tuple(min(k, 5) for k in cfg["kernel_size"])
        if "stride" in cfg:
            small["stride"] = tuple(min(s, k) for s, k in zip(cfg["stride"], small["kernel_size"]))
        dilation = cfg.get("dilation", (1,) * ndim)
        small["grid"] = tuple(min(g, k * d + (3 if axis < ndim - 1 else 9))
                              for axis, (g, k, d) in enumerate(zip(cfg["grid"], small["kernel_size"], dilation)))
    else:
        small["seq"] = min(cfg["seq"], 40)
    if op == "agent":
        small["agents"] = 8
    return small


# ----------------------------------------------------------------------------- work model
# Achieved throughput = the algorithm's work / attnc's time, against the device's measured
# ceilings (``measure_ceilings``). FLOPs count a multiply-add as 2 and only the matrix products
# (exp, normalisers and feature maps are O(N·D) and left out); bytes are the minimum traffic:
# every input read once and the output written once.

def neighborhood_keys_per_axis(length: int, kernel: int, dilation: int, causal: int, stride: int = 1) -> int:
    """Number of (query, key) pairs along one axis: the window is clamped inside each dilation
    group (of ``n`` tokens), so a non-causal query sees ``min(kernel, n)`` keys and a causal one
    ``p + 1 - max(0, P - kernel + 1)`` (``p``: its position in the group, ``P``: its stride
    block's last position, ``p`` itself at stride 1)."""
    total = 0
    for i in range(length):
        p, group = i // dilation, i % dilation
        n = (length - 1 - group) // dilation + 1
        leader = min(p - p % stride + stride - 1, n - 1)
        total += p + 1 - max(0, leader - kernel + 1) if causal else min(kernel, n)
    return total


def work(op: str, cfg: dict, dtype: torch.dtype) -> tuple[int, int]:
    """(FLOPs, bytes) of one call of ``op`` at ``cfg``; see the comment above for what counts."""
    size = torch.empty((), dtype=dtype).element_size()
    b, h, d = cfg["batch"], cfg["heads"], cfg["dim"]
    if op == "neighborhood":
        grid = cfg["grid"]
        ndim = len(grid)
        pairs = math.prod(neighborhood_keys_per_axis(n, k, dl, c, s) for n, k, dl, c, s in zip(
            grid, cfg["kernel_size"], cfg.get("dilation", (1,) * ndim), cfg.get("is_causal", (0,) * ndim),
            cfg.get("stride", (1,) * ndim)))
        tokens = math.prod(grid)
        rpb = h * math.prod(2 * k - 1 for k in cfg["kernel_size"]) if cfg.get("rpb") else 0
        return b * h * pairs * 4 * d, (4 * b * h * tokens * d + rpb) * size
    n = cfg["seq"]
    io = 4 * b * h * n * d * size
    if op == "linear" and cfg.get("state"):  # plus the float32 state, read and written
        io += 2 * b * h * d * (d + cfg.get("normalize", 1)) * 4
    if op == "linear":
        if not cfg["causal"]:   # state φ(K)ᵀV, then φ(Q)·state
            return b * h * 4 * n * d * d, io
        chunk = min(64, n)      # intra-chunk QKᵀ and PV, inter-chunk Q·S and the state update
        chunks = math.ceil(n / chunk)
        return b * h * chunks * (4 * chunk * chunk * d + 4 * chunk * d * d), io
    if op == "flow":            # KᵀV and Q(KᵀV); causal: the same products, chunked
        if not cfg.get("causal"):
            return b * h * 4 * n * d * d, io
        chunk = 32
        chunks = math.ceil(n / chunk)
        return b * h * chunks * (4 * chunk * chunk * d + 4 * chunk * d * d), io
    if op == "agent":           # agents attend to keys, then queries attend to agents
        agents = cfg["agents"]
        bias = 2 * h * agents * n * size if cfg.get("bias") else 0
        return b * h * 8 * n * agents * d, io + b * h * agents * d * size + bias
    raise ValueError(f"unknown op {op!r}")


def measure_ceilings(dtype: torch.dtype) -> dict:
    """The device's measured ceilings: a large dense matmul (TFLOP/s) and a device-to-device copy
    (GB/s, bytes read + written), each the median of ``do_bench``."""
    import triton.testing

    n = 8192

    def matmul_time() -> float:   # the operands are freed when it returns
        a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
        return triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200)

    def copy_time() -> float:
        src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        return triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=100)

    matmul_ms, copy_ms = matmul_time(), copy_time()
    torch.cuda.empty_cache()
    return {"matmul_tflops": 2 * n ** 3 / matmul_ms / 1e9, "copy_gbps": 2 * (1 << 30) / copy_ms / 1e6,
            "matmul": f"{n}x{n}x{n} {dtype}", "copy": "1 GiB device-to-device"}


def achieved(flops: int, nbytes: int, ms: float, ceilings: dict | None) -> dict:
    """TFLOP/s and GB/s at ``ms``, and their fractions of the ceilings when measured."""
    row = {"tflops": flops / ms / 1e9, "gbps": nbytes / ms / 1e6}
    if ceilings:
        row["tflops_of_peak"] = row["tflops"] / ceilings["matmul_tflops"]
        row["gbps_of_peak"] = row["gbps"] / ceilings["copy_gbps"]
    return row


# ----------------------------------------------------------------------------- timing

def _time(fn: Callable, smoke: bool) -> float:
    """Milliseconds per call (triton's do_bench on GPU; one timed call in smoke mode)."""
    if smoke:
        fn()
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=25, rep=200))


def _rel_err(out, ref) -> float:
    """Max abs error relative to the reference's largest magnitude; the worst output of a tuple."""
    if isinstance(out, (tuple, list)):
        return max(_rel_err(o, r) for o, r in zip(out, ref))
    return float((out.double() - ref).abs().max() / ref.abs().max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--dtype", default="fp16", choices=list(DTYPES))
    parser.add_argument("--smoke", action="store_true", help="toy sizes on CPU under the interpreter")
    parser.add_argument("--no-save", action="store_true", help="do not write results")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder for the raw results (default {RESULTS}; with --smoke, only when given)")
    parser.add_argument("--peers", nargs="*", default=None, metavar="NAME",
                        help="time only these peers (attnc's kernel is always timed); e.g. the agent route pair: "
                             f"--ops agent --peers '{FUSED_AGENT_TRT}' '{LOWERED_AGENT}'")
    parser.add_argument("--agent-routes", type=Path, default=None, metavar="JSON",
                        help="add each agent case's fused-TensorRT-kernel vs two-SDPA timings to this route "
                             "table (copy it to plugins/agent/routes.json for attnc compile to use)")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print("bench_kernels: no CUDA GPU visible (torch.cuda.is_available() is False); the kernel "
              "benchmark needs an NVIDIA GPU. Use --smoke to check the script on CPU.")
        return 2
    device = torch.device("cpu" if args.smoke else "cuda")
    device_name = "cpu (smoke)" if args.smoke else torch.cuda.get_device_name()
    dtype = DTYPES[args.dtype]
    ceilings = None if args.smoke else measure_ceilings(dtype)
    if ceilings:
        print(f"ceilings: {ceilings['matmul_tflops']:.0f} TFLOP/s ({ceilings['matmul']}), "
              f"{ceilings['copy_gbps']:.0f} GB/s ({ceilings['copy']})", flush=True)
    save = _saver(args, device_name, ceilings)
    rows = []
    for op in args.ops:
        for cfg in CONFIGS[op]:
            cfg = _smoke_config(op, cfg) if args.smoke else cfg
            torch.manual_seed(0)
            print(f"{op}: {cfg['name']} ...", flush=True)
            try:
                ours, peers, ref = CASES[op](cfg, dtype, device)
                row = {"op": op, "config": cfg, "attnc_ms": _time(ours, args.smoke), "peers_ms": {},
                       "attnc_rel_err": None}
                flops, nbytes = work(op, cfg, dtype)
                row.update(flops=flops, bytes=nbytes, achieved=achieved(flops, nbytes, row["attnc_ms"], ceilings))
                try:
                    row["attnc_rel_err"] = _rel_err(ours(), ref())
                except (RuntimeError, MemoryError) as exc:  # float64 reference too big for the device
                    row["reference_error"] = str(exc)[:200]
                for name, fn in peers.items():
                    if args.peers is not None and name not in args.peers:
                        continue
                    try:
                        row["peers_ms"][name] = _time(fn, args.smoke)
                    except Exception as exc:
                        row["peers_ms"][name] = None
                        row.setdefault("peer_errors", {})[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            except Exception as exc:
                row = {"op": op, "config": cfg, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            rows.append(row)
            save(rows)
            if op == "agent" and args.agent_routes and "error" not in row:
                date = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
                record_agent_route(args.agent_routes, row, dtype, device_name, date)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    _print_table(rows, device_name, args.dtype)
    return 0 if all("error" not in r for r in rows) else 1


def _saver(args, device_name: str, ceilings: dict | None) -> Callable[[list[dict]], None]:
    """``save(rows)``: rewrite the raw-results file after every case, so a run stopped by a
    time limit (a lent GPU's minutes) keeps what it measured. No-op unless results are saved."""
    if args.no_save or (args.out is None and args.smoke):
        return lambda rows: None
    out = args.out or RESULTS
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name).strip("-").lower()
    path = out / f"kernels-{slug}-{args.dtype}-{now:%Y%m%d-%H%M%S}.json"
    meta = {"device": device_name, "date": now.isoformat(), "dtype": args.dtype, "smoke": args.smoke,
            "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.version.cuda, "ceilings": ceilings}
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    print(f"raw results: {path}", flush=True)

    def save(rows: list[dict]) -> None:
        partial = path.with_name(f".{path.name}.tmp")
        partial.write_text(json.dumps({"machine": meta, "results": rows}, indent=1, default=str))
        partial.replace(path)
    return save


def _print_table(rows: list[dict], device_name: str, dtype: str) -> None:
    print(f"\n{device_name}, {dtype}: peer time / attnc time (> 1: attnc faster)")
    header = f"{'op':<13}{'config':<30}{'attnc ms':>10}{'rel err':>10}{'TFLOP/s':>14}{'GB/s':>12}  peers"
    print(header)
    print("-" * len(header))
    for r in rows:
        name = r["config"]["name"]
        if "error" in r:
            print(f"{r['op']:<13}{name:<30}  ERROR {r['error']}")
            continue
        err = "-" if r["attnc_rel_err"] is None else f"{r['attnc_rel_err']:.1e}"
        ours = r["attnc_ms"]
        peers = ", ".join(f"{p} " + ("n/a" if t is None else f"{t / ours:.2f}x") for p, t in r["peers_ms"].items())
        ach = r["achieved"]
        tflops = f"{ach['tflops']:.1f}" + (f" ({ach['tflops_of_peak']:.0%})" if "tflops_of_peak" in ach else "")
        gbps = f"{ach['gbps']:.0f}" + (f" ({ach['gbps_of_peak']:.0%})" if "gbps_of_peak" in ach else "")
        print(f"{r['op']:<13}{name:<30}{r['attnc_ms']:>10.3f}{err:>10}{tflops:>14}{gbps:>12}  {peers}")


if __name__ == "__main__":
    sys.exit(main())
