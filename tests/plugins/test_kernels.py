"""The Triton kernels of the fused ops (``plugins/<op>/kernels.py``).

- Launch grids (pure functions) cover every query exactly once.
- Every kernel runs under Triton's CPU interpreter on fresh random inputs (odd sizes, padded
  head dims, every dtype, a sweep of attributes) and matches a float64 reference: the op's own
  ``reference`` and, independently, the small ones below (fp32 <= 1e-4, fp16/bf16 <= 1e-2,
  max abs error over max abs reference).
- Every kernel compiles ahead of time for sm_80/86/89/90 in fp16, fp32 and bf16 (PTX + cubin).

Triton decides once, when it is first imported, whether ``@triton.jit`` builds interpreted or
compiled kernels, and the two cannot share a process; under pytest-xdist any other module may
have imported triton first. So the interpreter sweeps and the AOT builds each run this file as
a script in a subprocess with the environment they need (``python test_kernels.py interpret
<op>`` / ``aot <arch>``), one JSON line per case, and the tests assert on those lines.
Reproduce a failure with the seed in its message: ``ATTNC_KERNEL_SEED=<seed>``.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

OPS = ("neighborhood", "linear", "flow", "agent")
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Where the kernels run: "cpu" under the interpreter (CI), "cuda" for the same sweep compiled on
# a GPU (``python test_kernels.py gpu <op>``, run by benchmarks/gpu_session.sh).
DEVICE = torch.device(os.environ.get("ATTNC_KERNEL_DEVICE", "cpu"))


# ----------------------------------------------------------------------------- float64 references
# Independent of the plugins' own ``reference`` functions (each is checked against those below).

def na_reference(q, k, v, kernel_size, dilation, is_causal, scale, rpb, stride=None):
    """Neighborhood attention by explicit per-query window enumeration (strided: the window of the
    query's stride-block leader, causal keys never past the query)."""
    grid = q.shape[2:-1]
    ndim = len(grid)
    scale = scale or q.shape[-1] ** -0.5
    windows = []  # per axis: for each index, list of (key index, relative offset)
    for length, ks, d, c, st in zip(grid, kernel_size, dilation, is_causal, stride or [1] * ndim):
        axis = []
        for i in range(length):
            g, p = i % d, i // d
            n = (length - 1 - g) // d + 1
            leader = min(p - p % st + (st - 1 if c else st // 2), n - 1)
            start = leader - ks + 1 if c else min(max(leader - ks // 2, 0), n - ks)
            axis.append([(g + d * kp, kp - p + ks - 1) for kp in range(start, start + ks) if 0 <= kp and
                         (not c or kp <= p)])
        windows.append(axis)
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    for index in np.ndindex(*grid):
        keys = [[]]
        for axis in range(ndim):
            keys = [prev + [pair] for prev in keys for pair in windows[axis][index[axis]]]
        key_idx = [tuple(p[0] for p in key) for key in keys]
        rel = [tuple(p[1] for p in key) for key in keys]
        kk = torch.stack([k[(slice(None), slice(None)) + ki] for ki in key_idx], 2)   # [B, H, W, D]
        vv = torch.stack([v[(slice(None), slice(None)) + ki] for ki in key_idx], 2)
        qi = q[(slice(None), slice(None)) + index]
        scores = torch.einsum("bhd,bhwd->bhw", qi, kk) * scale
        if rpb is not None:
            scores = scores + torch.stack([rpb[(slice(None),) + r] for r in rel], -1)
        out[(slice(None), slice(None)) + index] = torch.einsum("bhw,bhwd->bhd", scores.softmax(-1), vv)
    return out


def linear_reference(q, k, v, decay, feature_map, causal, normalize, eps, scale, state=None, return_state=False):
    """The quadratic form: masked scores ``λ^{t-s}[s <= t]`` times V; an initial state enters
    every query as ``λ^{t+1} q_t S0`` (and ``z0`` in the normaliser); the state after the last
    token is ``λ^N S0 + Σ_s λ^{N-1-s} k_sᵀ v_s``."""
    phi = {"elu1": lambda x: torch.nn.functional.elu(x) + 1, "relu": torch.relu, "identity": lambda x: x}
    q, k = phi[feature_map](q) * scale, phi[feature_map](k)
    scores = q @ k.transpose(-2, -1)
    if causal:
        n = q.shape[2]
        gap = (torch.arange(n)[:, None] - torch.arange(n)[None, :]).double()
        lam = torch.ones(q.shape[1], dtype=torch.float64) if decay is None else decay.double()
        mask = torch.where(gap >= 0, lam[:, None, None] ** gap.clamp(min=0), 0.0)   # [H, N, N]
        scores = scores * mask
        to_query = lam[:, None] ** torch.arange(1, n + 1)                              # [H, N] λ^{t+1}
        to_end = lam[:, None] ** torch.arange(n - 1, -1, -1)                           # [H, N] λ^{N-1-s}
    out = scores @ v
    den = scores.sum(-1, keepdim=True)
    if state is not None:
        past = (q @ state) * to_query[:, :, None]                                      # [B, H, N, Dv (+1)]
        out = out + past[..., :v.shape[-1]]
        den = den + past[..., v.shape[-1]:] if normalize else den
    out = out / (den + eps) if normalize else out
    if not return_state:
        return out
    start = torch.zeros(*q.shape[:2], q.shape[-1], v.shape[-1] + normalize, dtype=torch.float64)
    start = start if state is None else state
    values = torch.cat([v, torch.ones_like(v[..., :1])], -1) if normalize else v   # z = Σ k_s · 1
    return out, lam[:, None, None] ** n * start + (k * to_end[..., None]).transpose(-2, -1) @ values


def linear_recurrent_reference(q, k, v, decay, feature_map, normalize, eps, scale, state=None):
    """Causal linear attention token by token, the op's recurrence:
    ``S_t = λ S_{t-1} + k_tᵀ v_t``, ``O_t = q_t S_t [/ (q_t·z_t + eps)]``. Returns ``(O, S_N | z_N)``."""
    phi = {"elu1": lambda x: torch.nn.functional.elu(x) + 1, "relu": torch.relu, "identity": lambda x: x}
    q, k = phi[feature_map](q) * scale, phi[feature_map](k)
    dv = v.shape[-1]
    s = torch.zeros(*q.shape[:2], q.shape[-1], dv + normalize, dtype=torch.float64) if state is None else state.clone()
    lam = torch.ones(q.shape[1], dtype=torch.float64) if decay is None else decay.double()
    out = torch.empty(*q.shape[:-1], dv, dtype=torch.float64)
    for t in range(q.shape[2]):
        s[..., :dv] = lam[:, None, None] * s[..., :dv] + k[:, :, t, :, None] * v[:, :, t, None, :]
        if normalize:
            s[..., dv] = lam[:, None] * s[..., dv] + k[:, :, t]
        read = torch.einsum("bhd,bhde->bhe", q[:, :, t], s)
        out[:, :, t] = read[..., :dv] / (read[..., dv:] + eps) if normalize else read
    return out, s


def flow_reference(q, k, v, eps, causal=0):
    if causal:
        return flow_causal_reference(q, k, v, eps)
    q, k = torch.sigmoid(q), torch.sigmoid(k)
    n_q, n_k = q.shape[2], k.shape[2]
    incoming = 1 / torch.einsum("bhld,bhd->bhl", q + eps, k.sum(2) + eps)
    outgoing = 1 / torch.einsum("bhsd,bhd->bhs", k + eps, q.sum(2) + eps)
    sink = torch.einsum("bhld,bhd->bhl", q + eps, torch.einsum("bhsd,bhs->bhd", k, outgoing) + eps)
    source = torch.einsum("bhsd,bhd->bhs", k + eps, torch.einsum("bhld,bhl->bhd", q, incoming) + eps)
    competition = torch.softmax(source.clamp(-1, 1), -1) * n_k
    weights = torch.einsum("bhld,bhsd->bhls", q * incoming[..., None], k)
    return (weights @ (v * competition[..., None])) * torch.sigmoid(sink * n_q / n_k)[..., None]


def flow_causal_reference(q, k, v, eps):
    """thuml's ``Flow_Attention_Causal`` written as an explicit loop over positions t."""
    q, k = torch.sigmoid(q), torch.sigmoid(k)
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    length = q.shape[2]
    incoming = torch.empty(q.shape[:-1], dtype=torch.float64)
    outgoing = torch.empty(q.shape[:-1], dtype=torch.float64)
    for t in range(length):
        n = t + 1
        incoming[:, :, t] = n / ((q[:, :, t] + eps) * (k[:, :, :n].sum(2) + eps)).sum(-1)
        outgoing[:, :, t] = n / ((k[:, :, t] + eps) * (q[:, :, :n].sum(2) + eps)).sum(-1)
    source = torch.empty_like(incoming)
    for t in range(length):
        n = t + 1
        sink = ((q[:, :, t] + eps) * ((k[:, :, :n] * outgoing[:, :, :n, None]).sum(2) + eps)).sum(-1) / n
        source[:, :, t] = (((k[:, :, t] + eps) * ((q[:, :, :n] * incoming[:, :, :n, None]).sum(2) + eps)).sum(-1)
                           / n).clamp(-1, 1).exp()
        competition = source[:, :, :n] / source[:, :, :n].cumsum(-1) * torch.arange(1, n + 1)
        weights = torch.einsum("bhd,bhsd->bhs", q[:, :, t] * (incoming[:, :, t] / n)[..., None], k[:, :, :n])
        out[:, :, t] = torch.einsum("bhs,bhsd->bhd", weights, v[:, :, :n] * competition[..., None])
        out[:, :, t] *= torch.sigmoid(sink)[..., None]
    return out


def agent_reference(q, k, v, a, b1, b2, scale):
    s = scale or q.shape[-1] ** -0.5
    a = a.expand(q.shape[0], -1, -1, -1)
    stage1 = s * a @ k.transpose(-2, -1) + (0 if b1 is None else b1)
    stage2 = s * q @ a.transpose(-2, -1) + (0 if b2 is None else b2)
    return stage2.softmax(-1) @ (stage1.softmax(-1) @ v)


# ----------------------------------------------------------------------------- sweep cases

# Sizes are odd on purpose (not multiples of the 16/32/64 blocks), head dims not powers of two.
NA_CASES = [
    dict(grid=(37,), ks=(7,), dil=(2,), causal=(0,), rpb=True, d=128, dtype="fp32"),
    dict(grid=(29,), ks=(4,), dil=(1,), causal=(0,), rpb=False, d=24, dtype="fp32", scale=0.3),
    dict(grid=(29,), ks=(5,), dil=(1,), causal=(1,), rpb=False, d=40, dtype="fp16"),
    dict(grid=(70,), ks=(9,), dil=(3,), causal=(0,), rpb=True, d=64, dtype="bf16"),
    dict(grid=(9, 11), ks=(3, 5), dil=(2, 1), causal=(0, 1), rpb=True, d=32, dtype="fp32"),
    dict(grid=(7, 18), ks=(3, 3), dil=(1, 1), causal=(0, 0), rpb="shared", d=20, dtype="fp16"),
    dict(grid=(10, 9), ks=(5, 3), dil=(1, 2), causal=(1, 0), rpb=False, d=48, dtype="bf16"),
    dict(grid=(6, 21), ks=(3, 19), dil=(1, 1), causal=(0, 0), rpb=True, d=16, dtype="fp16"),  # 64-wide key blocks
    dict(grid=(9, 11), ks=(3, 5), dil=(2, 1), causal=(0, 1), rpb=True, d=32, dtype="fp16", entry="tensorrt"),
    dict(grid=(29,), ks=(5,), dil=(2,), causal=(1,), rpb="shared", d=40, dtype="bf16", entry="tensorrt"),
    # 3-D grids: odd sizes, odd windows, dilation and causal axes mixed, per-head and shared RPB. Batch 1 (2 heads):
    # every grid runs as a 3-D view, so the batch offsets are the same code the 1-D and 2-D cases run at batch 2,
    # and the interpreter pays per program.
    dict(grid=(3, 5, 7), ks=(3, 3, 5), dil=(1, 1, 1), causal=(0, 0, 0), rpb=True, d=24, dtype="fp32", batch=1),
    dict(grid=(5, 6, 11), ks=(3, 3, 3), dil=(1, 2, 3), causal=(1, 0, 1), rpb=False, d=40, dtype="fp16", batch=1),
    dict(grid=(4, 7, 9), ks=(3, 3, 3), dil=(1, 2, 1), causal=(0, 1, 0), rpb="shared", d=20, dtype="bf16", batch=1),
    dict(grid=(3, 5, 7), ks=(3, 3, 5), dil=(1, 1, 1), causal=(0, 0, 1), rpb=True, d=16, dtype="fp16",
         entry="tensorrt", batch=1),
    # Stride (NATTEN's strided NA): even, odd and == kernel, causal and not, with dilation; the
    # 64-query 1-D tile spans several stride blocks, one of them cut by the sub-grid's end.
    dict(grid=(37,), ks=(7,), dil=(2,), causal=(0,), stride=(4,), rpb=False, d=24, dtype="fp32"),
    dict(grid=(29,), ks=(5,), dil=(1,), causal=(1,), stride=(3,), rpb=False, d=40, dtype="bf16"),
    dict(grid=(9, 11), ks=(3, 5), dil=(2, 1), causal=(1, 0), stride=(3, 2), rpb=False, d=32, dtype="fp16"),
    dict(grid=(4, 7, 9), ks=(3, 3, 3), dil=(1, 2, 1), causal=(0, 1, 0), stride=(2, 3, 3), rpb=False, d=20,
         dtype="fp32", entry="tensorrt", batch=1),
    dict(grid=(7, 13), ks=(5, 3), dil=(1, 2), causal=(0, 1), stride=(5, 2), rpb=False, d=16, dtype="bf16",
         entry="tensorrt"),
    # local-attention's default causal blocks: even kernel w * (lb + 1), stride w (several 64-query
    # tiles, lengths that are no multiple of the block).
    dict(grid=(150,), ks=(8,), dil=(1,), causal=(1,), stride=(4,), rpb=False, d=32, dtype="fp16", entry="tensorrt"),
    dict(grid=(70,), ks=(12,), dil=(1,), causal=(1,), stride=(6,), rpb=False, d=24, dtype="fp32"),
]
LINEAR_CASES = [
    dict(n=37, d=32, dv=48, feature_map="elu1", causal=0, normalize=1, decay=False, dtype="fp32"),
    dict(n=33, d=20, dv=80, feature_map="relu", causal=0, normalize=0, decay=False, dtype="fp16"),
    dict(n=45, d=16, dv=16, feature_map="identity", causal=0, normalize=0, decay=False, dtype="bf16"),
    dict(n=100, d=32, dv=32, feature_map="relu", causal=1, normalize=1, decay=True, dtype="fp32"),
    dict(n=70, d=40, dv=24, feature_map="identity", causal=1, normalize=0, decay=True, dtype="fp16"),
    dict(n=70, d=24, dv=72, feature_map="elu1", causal=1, normalize=1, decay=False, dtype="bf16"),
    dict(n=9, d=16, dv=16, feature_map="elu1", causal=1, normalize=0, decay=True, dtype="fp32", scale=0.25),
    # The TensorRT entry points: causal (with and without decay) and the fused one-launch non-causal form.
    dict(n=70, d=24, dv=72, feature_map="relu", causal=1, normalize=1, decay=True, dtype="fp32", scale=0.5,
         entry="tensorrt"),
    dict(n=37, d=40, dv=24, feature_map="elu1", causal=1, normalize=0, decay=False, dtype="fp16", entry="tensorrt"),
    dict(n=45, d=20, dv=80, feature_map="elu1", causal=0, normalize=1, decay=False, dtype="fp16", entry="tensorrt"),
    dict(n=33, d=16, dv=24, feature_map="identity", causal=0, normalize=0, decay=True, dtype="fp32",
         entry="tensorrt"),
    # The recurrent state (causal only): ``state`` in ("random": a 13-token prefix's, "zeros": must
    # give the stateless kernel's bits), ``state_out`` returned, ``split``: the sequence run in
    # segments, each from the previous one's state (prefill then decode; 1-token segments are decode
    # steps). Value dims 72/80 > the 64-column blocks: several programs per head share z.
    dict(n=37, d=20, dv=80, feature_map="elu1", causal=1, normalize=1, decay=True, dtype="fp32", state="random",
         state_out=True),
    dict(n=5, d=24, dv=72, feature_map="relu", causal=1, normalize=0, decay=False, dtype="fp16", state="random",
         state_out=True, scale=0.5),
    dict(n=1, d=16, dv=40, feature_map="elu1", causal=1, normalize=1, decay=True, dtype="bf16", state="random",
         state_out=True),
    dict(n=37, d=40, dv=24, feature_map="elu1", causal=1, normalize=1, decay=False, dtype="bf16", state="random"),
    dict(n=70, d=24, dv=72, feature_map="elu1", causal=1, normalize=1, decay=True, dtype="fp32", state="zeros",
         state_out=True),
    dict(n=37, d=20, dv=24, feature_map="relu", causal=1, normalize=0, decay=True, dtype="fp16", state="zeros"),
    dict(n=37, d=20, dv=80, feature_map="elu1", causal=1, normalize=1, decay=True, dtype="fp32", state="random",
         split=[20, 36]),
    dict(n=5, d=24, dv=40, feature_map="relu", causal=1, normalize=0, decay=True, dtype="bf16", split=[1, 2, 3, 4]),
    dict(n=70, d=32, dv=72, feature_map="elu1", causal=1, normalize=1, decay=False, dtype="fp16", state="random",
         split=[64, 69]),
    # ... through the TensorRT entry point: every combination of decay, state and state_out.
    dict(n=37, d=20, dv=72, feature_map="elu1", causal=1, normalize=1, decay=True, dtype="fp32", state="random",
         state_out=True, entry="tensorrt"),
    dict(n=5, d=24, dv=72, feature_map="relu", causal=1, normalize=0, decay=True, dtype="fp16", state="random",
         entry="tensorrt"),
    dict(n=37, d=16, dv=40, feature_map="elu1", causal=1, normalize=1, decay=True, dtype="bf16", state_out=True,
         entry="tensorrt"),
    dict(n=1, d=40, dv=24, feature_map="elu1", causal=1, normalize=1, decay=False, dtype="fp16", state="random",
         state_out=True, entry="tensorrt"),
    dict(n=37, d=16, dv=16, feature_map="identity", causal=1, normalize=0, decay=False, dtype="fp32",
         state="random", entry="tensorrt", scale=0.25),
    dict(n=70, d=24, dv=72, feature_map="elu1", causal=1, normalize=1, decay=False, dtype="bf16", state_out=True,
         entry="tensorrt"),
]
FLOW_CASES = [
    dict(l=37, s=50, d=32, dv=48, dtype="fp32"),
    dict(l=70, s=33, d=40, dv=24, dtype="fp16"),
    dict(l=21, s=90, d=16, dv=80, dtype="bf16"),
    dict(l=5, s=1, d=16, dv=16, dtype="fp32", eps=1e-3),
    # Token ranges per head (partial sums added after each pass): more than the tokens' blocks
    # (capped), several with a partial last one, on queries and keys of different lengths.
    dict(l=150, s=70, d=24, dv=40, dtype="fp32", token_splits=3),
    dict(l=45, s=200, d=40, dv=24, dtype="fp16", token_splits=7),
    dict(l=130, s=131, d=16, dv=72, dtype="bf16", token_splits=2, batch=1),
    # Causal: the kernel walks 16-token chunks; every length spans several, the last one partial.
    dict(l=53, s=53, d=20, dv=72, dtype="fp32", causal=1),
    dict(l=45, s=45, d=40, dv=24, dtype="fp16", causal=1),
    dict(l=37, s=37, d=16, dv=16, dtype="bf16", causal=1),
    # The TensorRT entry points: causal and the fused one-launch non-causal form.
    dict(l=41, s=41, d=20, dv=72, dtype="fp32", causal=1, entry="tensorrt"),
    dict(l=37, s=37, d=40, dv=24, dtype="fp16", causal=1, eps=1e-3, entry="tensorrt"),
    dict(l=45, s=45, d=48, dv=40, dtype="fp32", causal=1, entry="tensorrt"),  # three 16-wide head-dim slices
    dict(l=70, s=33, d=40, dv=24, dtype="fp16", entry="tensorrt"),
    dict(l=37, s=90, d=32, dv=80, dtype="fp32", entry="tensorrt"),
]
AGENT_CASES = [
    dict(n=37, m=50, agents=9, d=32, dv=48, b1=True, b2=True, dtype="fp32"),
    dict(n=70, m=33, agents=49, d=40, dv=24, b1=False, b2=True, dtype="fp16", splits=2, key_splits=0),
    dict(n=70, m=90, agents=7, d=16, dv=80, b1=True, b2=False, dtype="bf16", splits=1),
    dict(n=5, m=3, agents=2, d=16, dv=16, b1=False, b2=False, dtype="fp32", scale=0.5),
    # The two-phase path (stage 1 split over key ranges, merged by the query-stage programs): more
    # splits than key tiles (empty ranges), one split, partial last ranges, broadcast biases, the
    # default choice (query splits > 1 over several key tiles), every dtype.
    dict(n=70, m=90, agents=7, d=16, dv=80, b1=True, b2=False, dtype="fp32", splits=2, key_splits=5),
    dict(n=37, m=200, agents=49, d=40, dv=24, b1=True, b2=True, dtype="fp16", splits=3, key_splits=3),
    dict(n=45, m=61, agents=9, d=24, dv=40, b1="column", b2=True, dtype="bf16", splits=1, key_splits=1),
    dict(n=130, m=150, agents=13, d=32, dv=48, b1=False, b2=True, dtype="bf16", batch=1),
    # more agents than the register kernel holds: agent_forward streams them (the TensorRT
    # entry point's kernel), with a zero table standing in for the absent bias
    dict(n=20, m=17, agents=257, d=16, dv=8, b1=True, b2=False, dtype="fp16"),
    dict(n=9, m=11, agents=260, d=16, dv=8, b1="column", b2=True, dtype="fp32"),  # agent_bias [n, 1]
    # The TensorRT entry point streams agents 16 at a time: counts that leave a partial last tile
    # (9 = one partial tile, 37 and 49 = several), every dtype, head dims of one and several
    # 32-wide slices (partial ones too), and the fp32 32-query tiles (head dim > 64).
    dict(n=70, m=41, agents=37, d=32, dv=24, b1=True, b2=True, dtype="fp16", entry="tensorrt"),
    dict(n=37, m=50, agents=9, d=16, dv=40, b1=False, b2=False, dtype="bf16", entry="tensorrt"),
    dict(n=71, m=45, agents=49, d=72, dv=40, b1=True, b2=True, dtype="fp32", entry="tensorrt", scale=0.3),
    dict(n=5, m=3, agents=37, d=40, dv=16, b1=False, b2=False, dtype="fp32", entry="tensorrt"),
]
CASES = {"neighborhood": NA_CASES, "linear": LINEAR_CASES, "flow": FLOW_CASES, "agent": AGENT_CASES}


def random_case(op: str, rng: np.random.Generator) -> dict:
    """One more case per run with attributes drawn from the seed (small sizes: the interpreter)."""
    dtype = str(rng.choice(list(DTYPES)))
    if op == "neighborhood":
        ndim = int(rng.integers(1, 4))
        ks = tuple(int(rng.choice([1, 3, 5, 7] if ndim < 3 else [1, 3])) for _ in range(ndim))
        dil = tuple(int(rng.integers(1, 3)) for _ in range(ndim))
        # The interpreter pays per program and per key row, so keep the leading axes short.
        grid = tuple(int(k * d + rng.integers(0, 12 if axis == ndim - 1 else 3))
                     for axis, (k, d) in enumerate(zip(ks, dil)))
        causal = tuple(int(rng.integers(0, 2)) for _ in range(ndim))
        stride = tuple(int(rng.integers(1, k + 1)) if rng.integers(0, 2) else 1 for k in ks)
        return dict(grid=grid, ks=ks, dil=dil, causal=causal, stride=stride,
                    rpb=bool(rng.integers(0, 2)) and max(stride) == 1, d=int(rng.integers(8, 65)), dtype=dtype)
    if op == "linear":
        causal = int(rng.integers(0, 2))
        state = dict(state=str(rng.choice(["none", "random", "zeros"])), state_out=bool(rng.integers(0, 2)))
        feature_map = str(rng.choice(["elu1", "relu", "identity"]))
        # No normaliser on identity features (as in the fixed cases): their q . sum(k) takes either sign and comes
        # near 0 on random inputs, where fp32 loses any tolerance (seed 227478010: 2.2e-4 against references that
        # agree to 7e-13); the normaliser is for positive feature maps.
        normalize = int(rng.integers(0, 2)) if feature_map != "identity" else 0
        return dict(n=int(rng.integers(1, 140)), d=int(rng.integers(8, 65)), dv=int(rng.integers(8, 97)),
                    feature_map=feature_map, causal=causal, normalize=normalize, decay=bool(rng.integers(0, 2)),
                    dtype=dtype, **(state if causal else {}))
    if op == "flow":
        length, causal = int(rng.integers(1, 100)), int(rng.integers(0, 2))
        return dict(l=length, s=length if causal else int(rng.integers(1, 100)), d=int(rng.integers(8, 65)),
                    dv=int(rng.integers(8, 97)), dtype=dtype, causal=causal, token_splits=int(rng.integers(1, 4)))
    return dict(n=int(rng.integers(1, 100)), m=int(rng.integers(1, 100)), agents=int(rng.integers(1, 65)),
                d=int(rng.integers(8, 65)), dv=int(rng.integers(8, 97)), b1=bool(rng.integers(0, 2)),
                b2=bool(rng.integers(0, 2)), dtype=dtype, splits=int(rng.integers(1, 3)),
                key_splits=int(rng.integers(0, 4)))   # 0: one launch; 1-3: the two-phase path


def _run_trt_entry(trt_launch, attrs: dict, inputs: list, *outputs: torch.Tensor):
    """``kernels_common.launch_trt_entry``: an op's TensorRT entry point launched as TensorRT would."""
    from attnc.plugins.kernels_common import launch_trt_entry

    return launch_trt_entry(trt_launch, attrs, inputs, *outputs)


def _linear_state_case(case, q, k, v, decay, attrs, gen):
    """Run a causal linear case with a recurrent state (keys ``state``, ``state_out``, ``split``,
    ``entry``): the kernel's ``O`` (and final state) and the two float64 oracles'."""
    from attnc.plugins.linear.kernels import linear_forward, trt_launch

    dtype, (batch, heads, _, d), dv, normalize = DTYPES[case["dtype"]], q.shape, v.shape[-1], attrs["normalize"]
    state = None
    if case.get("state") == "zeros":
        state = torch.zeros(batch, heads, d, dv + normalize, dtype=torch.float64)
    elif case.get("state") == "random":   # a realistic state: a 13-token prefix's (z > 0 for elu1/relu)
        prefix = [torch.randn(batch, heads, 13, n, generator=gen, dtype=torch.float64) for n in (d, d, dv)]
        state = linear_recurrent_reference(*prefix, decay, attrs["feature_map"], normalize, attrs["eps"],
                                           attrs["scale"])[1].float().double()
    low = [t.to(DEVICE, dtype) for t in (q, k, v)] + [None if decay is None else decay.to(DEVICE, torch.float32)]
    low_state = None if state is None else state.to(DEVICE, torch.float32)
    want_state = bool(case.get("state_out") or case.get("split"))
    if case.get("entry") == "tensorrt":
        outputs = [torch.empty(*q.shape[:3], dv, dtype=dtype, device=DEVICE)]
        outputs += [torch.empty(batch, heads, d, dv + normalize, device=DEVICE)] if want_state else []
        out = _run_trt_entry(trt_launch, attrs, low + [low_state], *outputs)
    elif case.get("split"):   # segments [0, m1), [m1, m2), ..., each from the previous one's state
        bounds, outs, chained = [0, *case["split"], q.shape[2]], [], low_state
        for start, stop in itertools.pairwise(bounds):
            segment = [t[:, :, start:stop] for t in low[:3]]
            o, chained = linear_forward(*segment, low[3], state=chained, return_state=True, **attrs)
            outs.append(o)
        out = (torch.cat(outs, 2), chained)
    else:
        if case.get("state") == "random":   # a strided view: the launcher copies it
            low_state = low_state.transpose(2, 3).contiguous().transpose(2, 3)
        out = linear_forward(*low, state=low_state, return_state=want_state, **attrs)
        if case.get("state") == "zeros":
            stateless = linear_forward(*low, **attrs)
            if not torch.equal(out[0] if want_state else out, stateless):
                raise AssertionError("a zero initial state changed the output bits")
    refs = [linear_recurrent_reference(q, k, v, decay, attrs["feature_map"], normalize, attrs["eps"], attrs["scale"],
                                       state),
            linear_reference(q, k, v, decay, **attrs, state=state, return_state=True)]
    out = tuple(t.cpu() for t in out) if want_state else out.cpu()
    return out, refs if want_state else [ref[0] for ref in refs]


def _run_case(op: str, case: dict, gen: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run one case: the kernel's output and the float64 references it must match."""
    dtype = DTYPES[case["dtype"]]
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    batch, heads = case.get("batch", 2), 2
    if op == "neighborhood":
        from attnc.plugins.neighborhood.kernels import neighborhood_forward
        q, k, v = (rand(batch, heads, *case["grid"], case["d"]) for _ in range(3))
        rpb = None
        if case["rpb"]:
            rpb = rand(1 if case["rpb"] == "shared" else heads, *(2 * x - 1 for x in case["ks"]))
        q, k, v, rpb = (None if t is None else t.to(dtype).double() for t in (q, k, v, rpb))
        args = (case["ks"], case["dil"], case["causal"], case.get("scale", 0.0))
        stride = list(case.get("stride", [1] * len(case["ks"])))
        low = [None if t is None else t.to(DEVICE, dtype) for t in (q, k, v, rpb)]
        if case.get("entry") == "tensorrt":  # the AOT entry point TensorRT launches
            from attnc.plugins.neighborhood.kernels import trt_launch
            attrs = dict(kernel_size=list(args[0]), dilation=list(args[1]), is_causal=list(args[2]), scale=args[3],
                         stride=stride)
            out = _run_trt_entry(trt_launch, attrs, [t for t in low if t is not None], torch.empty_like(low[2]))
        else:
            out = neighborhood_forward(*low[:3], *args, rpb=low[3], stride=stride)
        refs = [na_reference(q, k, v, *args, rpb, stride)]
        try:
            from attnc.plugins.neighborhood import reference
            refs.append(reference(q, k, v, *args, rpb=rpb, stride=stride))
        except ImportError:
            pass
        return out.cpu(), refs
    if op == "linear":
        from attnc.plugins.linear.kernels import linear_forward
        q, k = (rand(batch, heads, case["n"], case["d"]).to(dtype).double() for _ in range(2))
        v = rand(batch, heads, case["n"], case["dv"]).to(dtype).double()
        decay = (0.7 + 0.3 * torch.rand(heads, generator=gen, dtype=torch.float64)) if case["decay"] else None
        attrs = dict(feature_map=case["feature_map"], causal=case["causal"], normalize=case["normalize"],
                     eps=1e-6, scale=case.get("scale", 1.0))
        if case.get("state", "none") != "none" or case.get("state_out") or case.get("split"):
            return _linear_state_case(case, q, k, v, decay, attrs, gen)
        if case.get("entry") == "tensorrt":  # the AOT entry point TensorRT launches
            from attnc.plugins.linear.kernels import trt_launch
            inputs = [t.to(DEVICE, dtype) for t in (q, k, v)]
            inputs += [] if decay is None else [decay.to(DEVICE, torch.float32)]
            out = _run_trt_entry(trt_launch, attrs, inputs,
                                 torch.empty(*q.shape[:3], v.shape[-1], dtype=dtype, device=DEVICE))
        else:
            out = linear_forward(*(t.to(DEVICE, dtype) for t in (q, k, v)), None if decay is None else decay.to(DEVICE),
                                 **attrs)
        refs = [linear_reference(q, k, v, decay, **attrs)]
        try:
            from attnc.plugins.linear import reference
            refs.append(reference(q, k, v, decay, **attrs))
        except ImportError:
            pass
        return out.cpu(), refs
    if op == "flow":
        from attnc.plugins.flow.kernels import flow_forward
        q = rand(batch, heads, case["l"], case["d"]).to(dtype).double()
        k = rand(batch, heads, case["s"], case["d"]).to(dtype).double()
        v = rand(batch, heads, case["s"], case["dv"]).to(dtype).double()
        eps, causal = case.get("eps", 1e-6), case.get("causal", 0)
        if case.get("entry") == "tensorrt":  # the AOT entry point TensorRT launches
            from attnc.plugins.flow.kernels import trt_launch
            out = _run_trt_entry(trt_launch, {"causal": causal, "eps": eps}, [t.to(DEVICE, dtype) for t in (q, k, v)],
                                 torch.empty(*q.shape[:3], v.shape[-1], dtype=dtype, device=DEVICE))
        else:
            out = flow_forward(*(t.to(DEVICE, dtype) for t in (q, k, v)), causal=causal, eps=eps,
                               token_splits=case.get("token_splits"))
        refs = [flow_reference(q, k, v, eps, causal)]
        try:
            from attnc.plugins.flow import reference
            refs.append(reference(q, k, v, causal=causal, eps=eps))
        except ImportError:
            pass
        return out.cpu(), refs
    if op == "agent":
        from attnc.plugins.agent.kernels import agent_forward
        q = rand(batch, heads, case["n"], case["d"]).to(dtype).double()
        k = rand(batch, heads, case["m"], case["d"]).to(dtype).double()
        v = rand(batch, heads, case["m"], case["dv"]).to(dtype).double()
        a = rand(1, heads, case["agents"], case["d"]).to(dtype).double()          # learned agents
        b1_shape = (case["agents"], 1) if case["b1"] == "column" else (heads, case["agents"], case["m"])
        b1 = rand(*b1_shape).to(dtype).double() if case["b1"] else None  # broadcast over B (and M)
        b2 = rand(batch, heads, case["n"], case["agents"]).to(dtype).double() if case["b2"] else None
        scale = case.get("scale", 0.0)
        low = [None if t is None else t.to(DEVICE, dtype) for t in (q, k, v, a, b1, b2)]
        if case.get("entry") == "tensorrt":  # the AOT entry point TensorRT launches
            from attnc.plugins.agent.kernels import trt_launch
            out = _run_trt_entry(trt_launch, {"scale": scale}, [t for t in low if t is not None],
                                 torch.empty(*q.shape[:3], v.shape[-1], dtype=dtype, device=DEVICE))
        else:
            out = agent_forward(*low, scale=scale, splits=case.get("splits"), key_splits=case.get("key_splits"))
        refs = [agent_reference(q, k, v, a, b1, b2, scale)]
        try:
            from attnc.plugins.agent import reference
            refs.append(reference(q, k, v, a, b1, b2, scale=scale))
        except ImportError:
            pass
        return out.cpu(), refs
    raise KeyError(op)


def _relative_error(out, ref) -> float:
    """Max abs error over max abs reference; of several outputs (tuples), the worst."""
    if isinstance(out, tuple):
        return max(_relative_error(o, r) for o, r in zip(out, ref, strict=True))
    return float((out.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


# ----------------------------------------------------------------------------- subprocess entry points

def _sweep_main(op: str) -> None:
    """Child process: run every case of ``op`` on ``DEVICE`` (the CPU under TRITON_INTERPRET=1, or
    a GPU in ``gpu`` mode), one JSON line each."""
    import warnings

    warnings.simplefilter("ignore")  # masked padding rows divide 0/0 in the interpreter's numpy
    seed = int(os.environ.get("ATTNC_KERNEL_SEED") or time.time_ns() % 2 ** 31)
    for index, case in enumerate(CASES[op] + [random_case(op, np.random.default_rng(seed))]):
        gen = torch.Generator().manual_seed(seed + index)
        start = time.perf_counter()
        record = {"op": op, "case": case, "seed": seed, "tol": TOLERANCE[DTYPES[case["dtype"]]]}
        try:
            out, refs = _run_case(op, case, gen)
            record["errors"] = [_relative_error(out, ref) for ref in refs]
            record["reference_agreement"] = _relative_error(refs[-1], refs[0])
        except Exception as exc:  # reported by the parent test
            record["exception"] = f"{type(exc).__name__}: {exc}"
            cause = exc.__cause__ or exc.__context__   # a CompilationError's own message ends at the call
            while cause is not None and (cause.__cause__ or cause.__context__) is not None:
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                record["exception"] += f" <- {type(cause).__name__}: {str(cause)[-600:]}"
        record["seconds"] = round(time.perf_counter() - start, 2)
        print(json.dumps(record), flush=True)


# TensorRT kernels compiled by the AOT test, through the provider TensorRT's plugin code calls:
# (op_type, attrs, input shapes for head dim d[, number of outputs]); shapes are positional, None
# for an absent optional input. Every shape class each provider has a separate kernel or launch
# configuration for; ATTNC_KERNEL_HEAD_DIMS (default "128", the largest blocks, hence the most
# shared memory and registers) picks the head dims, e.g. "32,64,96,128".
TRT_CASES = [
    ("NeighborhoodAttention", dict(kernel_size=[7, 7], dilation=[1, 1], is_causal=[0, 0]),
     lambda d: [[None, 4, 56, 56, d]] * 3 + [[4, 13, 13]]),
    ("NeighborhoodAttention", dict(kernel_size=[7], dilation=[2], is_causal=[1]), lambda d: [[None, 4, None, d]] * 3),
    ("NeighborhoodAttention", dict(kernel_size=[3, 3, 5], dilation=[1, 2, 1], is_causal=[0, 0, 1]),
     lambda d: [[None, 4, 8, 16, 16, d]] * 3 + [[1, 5, 5, 9]]),
    ("NeighborhoodAttention", dict(kernel_size=[3, 5, 7], dilation=[1, 1, 2], is_causal=[0, 1, 0], stride=[2, 3, 4]),
     lambda d: [[None, 4, 8, 16, 16, d]] * 3),
    ("AgentAttention", {"scale": 0.0},
     lambda d: [[None, 6, 197, d]] * 3 + [[None, 6, 49, d], [1, 6, 49, 197], [1, 6, 197, 49]]),
    # AgentSD-like: 256 agents, dynamic token count (the kernel streams agents; the count only sets its loop).
    ("AgentAttention", {"scale": 0.0}, lambda d: [[None, 8, None, d]] * 3 + [[None, 8, 256, d]]),
    ("KernelLinearAttention", dict(feature_map="elu1", causal=1, normalize=1, eps=1e-6, scale=1.0),
     lambda d: [[None, 8, None, d]] * 3 + [[8]]),
    # The recurrent state: everything present (decay, state in and out; also at half the head dim,
    # the <= 64 tiles, where it spilled first), and state in only.
    ("KernelLinearAttention", dict(feature_map="elu1", causal=1, normalize=1, eps=1e-6, scale=1.0),
     lambda d: [[None, 8, None, d]] * 3 + [[8], [None, 8, d, d + 1]], 2),
    ("KernelLinearAttention", dict(feature_map="elu1", causal=1, normalize=1, eps=1e-6, scale=1.0),
     lambda d: [[None, 8, None, d // 2]] * 3 + [[8], [None, 8, d // 2, d // 2 + 1]], 2),
    ("KernelLinearAttention", dict(feature_map="relu", causal=1, normalize=0, eps=1e-6, scale=0.125),
     lambda d: [[None, 8, None, d]] * 3 + [None, [None, 8, d, d]]),
    ("KernelLinearAttention", dict(feature_map="relu", causal=0, normalize=1, eps=1e-6, scale=0.125),
     lambda d: [[None, 8, None, d]] * 3),
    ("FlowAttention", dict(causal=1, eps=1e-6), lambda d: [[None, 8, None, d]] * 3),
    # Value dim 32 <= the causal kernel's head-dim slice: the warp layout its last tl.dot must keep.
    ("FlowAttention", dict(causal=1, eps=1e-6), lambda d: [[None, 8, None, d]] * 2 + [[None, 8, None, 32]]),
    ("FlowAttention", dict(causal=0, eps=1e-6), lambda d: [[None, 8, None, d]] * 3),
]


def aot_dtypes(arch: int) -> tuple[str, ...]:
    """Dtypes compiled for ``arch`` in CI. sm_86 and sm_89 build the same code as sm_80 with the
    same shared memory and registers to within a few (measured for every kernel and dtype,
    docs/STATUS.md), so they compile fp16 only, a compile-break check that keeps CI's 2 cores
    at ~2 minutes per arch less; ``ATTNC_KERNEL_ALL_DTYPES=1`` compiles every dtype everywhere."""
    if arch in (80, 90) or os.environ.get("ATTNC_KERNEL_ALL_DTYPES") == "1":
        return ("fp16", "fp32", "bf16")
    return ("fp16",)


def _aot_main(arch: int) -> None:
    """Child process (no TRITON_INTERPRET): compile every kernel spec for ``arch``, all dtypes, and
    every TensorRT kernel; one record per build with its resources (shared memory, registers,
    stack bytes, against ``shared_limit``)."""
    from attnc.plugins import kernels_common
    from attnc.plugins.agent import kernels as agent
    from attnc.plugins.flow import kernels as flow
    from attnc.plugins.linear import kernels as linear
    from attnc.plugins.neighborhood import kernels as neighborhood
    from attnc.compiler.backends.tensorrt_plugins import ptx_param_count

    providers = {"NeighborhoodAttention": neighborhood, "AgentAttention": agent, "KernelLinearAttention": linear,
                 "FlowAttention": flow}
    chosen = os.environ.get("ATTNC_KERNEL_HEAD_DIMS")
    head_dims = [int(d) for d in (chosen or "128").split(",")]
    for dtype in aot_dtypes(arch):
        if not kernels_common.arch_supports(arch, dtype):
            continue
        # The PyTorch path's launch configurations change at head dims 32/64/128; by default it is
        # also built at 64 (the benchmarks' head dim, the largest tiles of the narrow branch), in
        # fp16/fp32 only: bf16 takes fp16's configurations and registers (~15 s per dtype and arch).
        torch_head_dims = head_dims if chosen else [64, 128] if dtype != "bf16" else [128]
        # The PyTorch path's kernels: its launcher opts in to more than 48 KB, up to the arch's limit.
        for module, head_dim in itertools.product((neighborhood, linear, flow, agent), torch_head_dims):
            for spec in module.aot_specs(dtype, head_dim):
                start = time.perf_counter()
                record = {"arch": arch, "dtype": dtype, "kernel": spec.name, "head_dim": head_dim, "shared_limit":
                          kernels_common.SHARED_MEMORY_OPT_IN[arch], "config": _config(spec)}
                try:
                    compiled = kernels_common.compile_spec(spec, arch)
                    record["ptx"] = len(compiled.asm.get("ptx", ""))
                    record["cubin"] = len(compiled.asm.get("cubin", b""))
                    record["ptx_target"] = next((line.split()[1] for line in compiled.asm["ptx"].splitlines()
                                                 if line.startswith(".target")), None)
                    record.update(kernels_common.resource_usage(compiled))
                except Exception as exc:
                    record["exception"] = f"{type(exc).__name__}: {exc}"[-3000:]
                record["seconds"] = round(time.perf_counter() - start, 2)
                print(json.dumps(record), flush=True)
        # The TensorRT entry points, through the provider TensorRT's plugin code calls; no opt-in there.
        numpy_dtype = {"fp16": "float16", "fp32": "float32", "bf16": "bfloat16"}[dtype]
        for (op_type, attrs, shapes_for, *outputs), head_dim in itertools.product(TRT_CASES, head_dims):
            module, shapes = providers[op_type], shapes_for(head_dim)
            extra = {"n_outputs": outputs[0]} if outputs else {}   # only providers with several outputs take it
            start = time.perf_counter()
            record = {"arch": arch, "dtype": dtype, "kernel": f"kernel_for({op_type})", "head_dim": shapes[0][-1],
                      "shared_limit": kernels_common.SHARED_MEMORY_NO_OPT_IN}
            try:
                # KernelLinearAttention's decay and state are float32 in every model (the op's contract).
                dtypes = [None if shape is None else "float32" if i >= 3 and op_type == "KernelLinearAttention"
                          else numpy_dtype for i, shape in enumerate(shapes)]
                spec, _, _ = module.trt_launch(attrs, dtypes, shapes, **extra)
                params = [name for name in spec.kernel.arg_names if name not in spec.constexprs]
                record["config"] = {**attrs, **_config(spec), "params": ",".join(params), **extra}
                record.update(kernels_common.resource_usage(kernels_common.compile_spec(spec, arch)))
                aot = module.kernel_for(op_type, attrs, dtypes, shapes, arch, **extra)  # the same build: cached
                # TensorRT passes the present inputs + int32 scalars + outputs; Triton's 2 scratch pointers stay unused.
                present = [shape for shape in shapes if shape is not None]
                expected = len(present) + len(aot.scalars(present)) + extra.get("n_outputs", 1)
                record["params"] = ptx_param_count(aot.ptx, aot.name) - 2 == expected
                record["ptx"], record["cubin"] = len(aot.ptx), None  # TensorRT takes PTX only
                record["ptx_target"] = next(line.split()[1] for line in aot.ptx.splitlines()
                                            if line.startswith(".target"))
            except Exception as exc:
                record["exception"] = f"{type(exc).__name__}: {exc}"[-3000:]
            record["seconds"] = round(time.perf_counter() - start, 2)
            print(json.dumps(record), flush=True)


def _config(spec) -> dict:
    """The launch configuration of a build, for failure messages (no pointers/dims)."""
    keep = ("BLOCK_N", "BLOCK_M", "BLOCK_A", "BLOCK_K", "BLOCK_D", "BLOCK_DV", "CHUNK", "BX", "BY", "BZ",
            "KX", "KY", "KZ", "SX", "SY", "SZ", "HAS_RPB", "D_SLICE", "PRECISION")
    return {**{k: v for k, v in spec.constexprs.items() if k in keep}, "num_warps": spec.num_warps,
            "num_stages": spec.num_stages}


def _child(args: list[str], interpret: bool, timeout: float = 900) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not records:
        pytest.fail(f"kernel subprocess {args} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return records


# ----------------------------------------------------------------------------- tests: launch grids

@pytest.mark.parametrize("grid, dilation, block", [
    ((1, 1, 37), (1, 1, 2), (1, 1, 64)), ((1, 9, 11), (1, 2, 1), (1, 4, 16)), ((1, 10, 9), (1, 3, 2), (1, 4, 16)),
    ((1, 1, 200), (1, 1, 7), (1, 1, 64)), ((1, 33, 5), (1, 5, 5), (1, 4, 16)), ((3, 5, 7), (1, 1, 1), (2, 4, 8)),
    ((7, 10, 9), (3, 2, 2), (2, 4, 8)), ((5, 6, 11), (2, 3, 1), (1, 4, 8)),
])
def test_neighborhood_grid_covers_every_query_once(grid, dilation, block):
    from attnc.plugins.kernels_common import neighborhood_grid

    launch = neighborhood_grid(2, 3, grid, dilation, block)
    assert launch[0] == 6
    tiles = [math.ceil(math.ceil(length / d) / b) for length, d, b in zip(grid, dilation, block)]
    covered = []
    for pid_xy in range(launch[1]):
        for pid_z in range(launch[2]):  # the kernel's decode of a program id
            pids = (pid_xy // (dilation[1] * tiles[1]), pid_xy % (dilation[1] * tiles[1]), pid_z)
            axes = []
            for pid, length, d, b, t in zip(pids, grid, dilation, block, tiles):
                g, p0 = pid // t, (pid % t) * b
                n = (length - 1 - g) // d + 1
                axes.append([g + d * p for p in range(p0, p0 + b) if p < n])
            covered += [(x, y, z) for x in axes[0] for y in axes[1] for z in axes[2]]
    assert sorted(covered) == sorted(np.ndindex(*grid))


def test_other_grids():
    from attnc.plugins.kernels_common import agent_grid, per_head_grid, range_splits, rows_grid

    assert rows_grid(2, 3, 100, 64, 80, 64) == (6, 2, 2)
    assert per_head_grid(2, 3, 48, 64) == (6, 1)
    assert agent_grid(64, 6, 197, 64) == (384, 1)        # enough heads: fully fused, no recompute
    assert agent_grid(1, 3, 197, 64) == (3, 4)           # batch 1: split up to the 4 query tiles
    assert agent_grid(1, 3, 30, 64) == (3, 1)
    assert range_splits(16, 3136, 32) == 17        # PVT stage 1: 16 heads x 17 key ranges >= 264 programs
    assert range_splits(2, 40, 32) == 2            # never a range shorter than one key tile
    assert range_splits(384, 197, 32) == 1
    from attnc.plugins.flow.kernels import flow_token_splits
    assert flow_token_splits(64, 4096, 64) == 5            # Flowformer B8 H8: 64 heads x 5 ranges >= 264
    assert flow_token_splits(64 * 2, 4096, 32) == 3        # the key/value pass: x2 value tiles
    assert flow_token_splits(64, 4096, 64, token_splits=1) == 1
    assert flow_token_splits(64, 100, 64, token_splits=9) == 2   # capped at one block per range


def test_agent_plan_picks_two_phases_where_one_launch_recomputes_stage1():
    """The default is the two-phase path exactly where one launch would split a head's queries
    (each split recomputing stage 1) over more than one key tile and a configuration exists."""
    import torch
    from attnc.plugins.agent.kernels import agent_config, agent_phase_config, agent_plan

    fp16, fp32 = torch.float16, torch.float32
    config, grid, key_splits = agent_plan(16, 1, 3136, 3136, 49, fp16, 64, 64)     # Agent-PVT stage 1
    assert key_splits == 17 and grid == (16, 17) and config == agent_phase_config(49, fp16, 64, 64)
    assert agent_plan(64, 6, 197, 197, 49, fp16, 64, 64)[1:] == ((384, 1), 0)      # Agent-DeiT-S: no split
    assert agent_plan(16, 1, 3136, 20, 49, fp16, 64, 64)[2] == 0                   # one key tile: nothing to split
    assert agent_plan(16, 1, 3136, 3136, 49, fp32, 128, 128)[2] == 0               # fp32 past D64: one launch
    config, grid, key_splits = agent_plan(16, 1, 3136, 3136, 49, fp32, 64, 64)
    assert key_splits == 17 and grid == (16, 17) and config["num_warps"] == 16   # fp32 <= D64: 16 warps
    # Explicit choices win; the one-launch path keeps agent_config's tiles.
    config, grid, key_splits = agent_plan(16, 1, 3136, 3136, 49, fp16, 64, 64, splits=3, key_splits=0)
    assert (config, grid, key_splits) == (agent_config(49, fp16, 64, 64), (16, 3), 0)
    assert agent_plan(64, 6, 197, 197, 49, fp16, 64, 64, key_splits=2)[2] == 2


def test_neighborhood_kernel_refuses_rpb_with_a_stride():
    from attnc.compiler.errors import AttncError
    from attnc.plugins.neighborhood.kernels import trt_launch

    shapes = [[1, 2, 9, 11, 16]] * 3
    with pytest.raises(AttncError, match="positional bias with stride"):
        trt_launch(dict(kernel_size=[3, 5], stride=[1, 2]), ["float16"] * 4, shapes + [[2, 5, 9]])
    with pytest.raises(AttncError, match="1 <= stride <= kernel_size"):
        trt_launch(dict(kernel_size=[3, 5], stride=[4, 1]), ["float16"] * 3, shapes)
    spec, _, _ = trt_launch(dict(kernel_size=[3, 5], stride=[3, 2]), ["float16"] * 3, shapes)
    assert (spec.constexprs["SX"], spec.constexprs["SY"], spec.constexprs["SZ"]) == (1, 3, 2)


def test_linear_forward_refuses_a_state_it_cannot_use():
    from attnc.plugins.linear.kernels import linear_forward

    q, v = torch.zeros(2, 3, 5, 16), torch.zeros(2, 3, 5, 24)
    with pytest.raises(ValueError, match="need causal=1"):
        linear_forward(q, q, v, state=torch.zeros(2, 3, 16, 25))
    with pytest.raises(ValueError, match="need causal=1"):
        linear_forward(q, q, v, return_state=True)
    with pytest.raises(ValueError, match=r"float32 \[2, 3, 16, 24\].*state_out of the previous call"):
        linear_forward(q, q, v, causal=1, normalize=0, state=torch.zeros(2, 3, 16, 25))
    with pytest.raises(ValueError, match="float32"):
        linear_forward(q, q, v, causal=1, state=torch.zeros(2, 3, 16, 25, dtype=torch.float16))


def test_linear_trt_launch_specialises_to_the_present_tensors():
    """Absent decay/state/state_out are None constexprs (no kernel parameters); old 3- and
    4-input call sites still work; a state without ``causal`` or of the wrong dtype is refused."""
    from attnc.compiler.errors import AttncError
    from attnc.plugins.linear.kernels import trt_launch

    qkv, state = [[None, 8, None, 64]] * 3, [None, 8, 64, 65]
    causal = dict(causal=1, normalize=1)
    cases = {(3, 1): (qkv, ["float16"] * 3), (4, 1): (qkv + [[8]], ["float16"] * 3 + ["float32"]),
             (5, 2): (qkv + [None, state], ["float16"] * 3 + [None, "float32"])}
    for (n_shapes, n_outputs), (shapes, dtypes) in cases.items():
        spec, _, _ = trt_launch(causal, dtypes, shapes, **({"n_outputs": 2} if n_outputs == 2 else {}))
        params = [name for name in spec.kernel.arg_names if name not in spec.constexprs]
        want = {3: ["Q", "K", "V"], 4: ["Q", "K", "V", "DECAY"], 5: ["Q", "K", "V", "STATE"]}[n_shapes]
        assert params == want + ["heads", "seq_len", "O"] + ["STATE_OUT"] * (n_outputs == 2), params
    spec, _, _ = trt_launch({}, ["float32"] * 4, qkv + [[8]])   # non-causal: decay passed, ignored
    assert [name for name in spec.kernel.arg_names if name not in spec.constexprs][3] == "DECAY"
    with pytest.raises(AttncError, match="need causal=1"):
        trt_launch({}, ["float16"] * 3, qkv, n_outputs=2)
    with pytest.raises(AttncError, match="need causal=1"):
        trt_launch({}, ["float16"] * 3 + [None, "float32"], qkv + [None, state])
    with pytest.raises(AttncError, match="state must be float32"):
        trt_launch(causal, ["float16"] * 5, qkv + [None, state])
    with pytest.raises(AttncError, match="state must be float32"):
        trt_launch(dict(causal=1, normalize=0), ["float16"] * 3 + [None, "float32"], qkv + [None, state])


def test_trt_entry_scalars_stay_runtime_values():
    """TensorRT passes an entry kernel's int32 scalars at run time (its AOT build specialises none);
    a JIT launch of the entry (launch_trt_entry: the GPU kernel sweep, the streamed agent path)
    must not specialise them either, or a scalar equal to 1 (a one-token decode step, a 1-D grid's
    unused axes) compiles as a constant: on the H200 (2026-12-04) five entry cases failed so."""
    pytest.importorskip("triton")
    from attnc.plugins.agent import kernels as agent
    from attnc.plugins.flow import kernels as flow
    from attnc.plugins.linear import kernels as linear
    from attnc.plugins.neighborhood import kernels as neighborhood

    providers = {"NeighborhoodAttention": neighborhood, "AgentAttention": agent, "KernelLinearAttention": linear,
                 "FlowAttention": flow}
    for op_type, attrs, shapes_for, *outputs in TRT_CASES:
        shapes = shapes_for(64)
        dtypes = [None if shape is None else "float32" if i >= 3 and op_type == "KernelLinearAttention"
                  else "float16" for i, shape in enumerate(shapes)]
        extra = {"n_outputs": outputs[0]} if outputs else {}
        spec, _, _ = providers[op_type].trt_launch(attrs, dtypes, shapes, **extra)
        scalars = [p for p in spec.kernel.params
                   if p.name not in spec.constexprs and not spec.signature[p.name].startswith("*")]
        assert scalars, f"{spec.name}: no scalar parameters found"
        specialised = [p.name for p in scalars if not p.do_not_specialize]
        assert not specialised, f"{spec.name} ({op_type}) specialises {specialised} in a JIT launch"


# ----------------------------------------------------------------------------- tests: interpreter

@pytest.mark.slow
@pytest.mark.parametrize("op", OPS)
def test_kernel_matches_float64_reference_interpreted(op):
    pytest.importorskip("triton")
    records = _child(["interpret", op], interpret=True)
    assert len(records) == len(CASES[op]) + 1
    failures = []
    for r in records:
        if "exception" in r:
            failures.append(f"{r['case']}: {r['exception']}")
        elif max(r["errors"]) > r["tol"] or r["reference_agreement"] > 1e-10:
            failures.append(f"{r['case']}: errors {r['errors']} > {r['tol']} "
                            f"(references agree to {r['reference_agreement']:.1e})")
    assert not failures, f"seed {records[0]['seed']}:\n" + "\n".join(failures)


# ----------------------------------------------------------------------------- tests: AOT

@functools.cache
@pytest.mark.slow
@pytest.mark.parametrize("arch", (80, 86, 89, 90))
def test_kernels_compile_ahead_of_time(arch):
    """Every kernel compiles for ``arch`` in every dtype, in TensorRT's calling convention where it
    is a TensorRT entry point, and fits its resource budget (:func:`_check_resources`). One test
    per arch, so the ~2 minutes of compiles per arch happen once per CI run."""
    pytest.importorskip("triton")
    records = _child(["aot", str(arch)], interpret=False)
    failures = [f"{r['dtype']} {r['kernel']} {r.get('config')}: {r['exception']}" for r in records if "exception" in r]
    assert not failures, "\n".join(failures)
    assert {r["dtype"] for r in records} == set(aot_dtypes(arch))
    assert {r["kernel"] for r in records} >= {f"kernel_for({case[0]})" for case in TRT_CASES}
    for r in records:
        assert r["ptx"] > 0 and r["ptx_target"].startswith(f"sm_{arch}"), r
        assert r["cubin"] is None or r["cubin"] > 0, r  # triton ships its own ptxas: a cubin is expected
        assert r.get("params", True), f"{r['kernel']}: not TensorRT's (inputs, scalars, outputs) calling convention"
    _check_resources(records, arch)


def _known_gap(r: dict) -> str | None:
    """Builds known to miss the resource budget (issue #4), as ``"spills"`` (register spills
    allowed) or ``"shared"`` (spills and more than 48 KB allowed); None: must fit. TensorRT entry
    points are named ``kernel_for(<op>)``, the PyTorch path's kernels by their own names."""
    if r["kernel"] in ("kernel_for(NeighborhoodAttention)", "neighborhood_attention_fwd") and r["dtype"] == "fp32":
        # ptxas's own register budget, not pressure: for these CUDA-core tl.dot kernels it picks
        # 64-128 registers and spills 8-88 B, at head dims 32-128 alike (sm_80 and sm_90); with a
        # PTX `.maxnreg 255` (triton's maxnreg option) the same kernels take 181-220 registers and
        # spill nothing, at a quarter to half the blocks per SM. Which is faster needs a GPU.
        # 4 warps at every head dim still left 8-64 B; 32-key blocks spilled more (48-856 B).
        # The PyTorch path's kernel (run-time strides, the same tiles) spills 8-80 B the same way.
        return "spills"
    return None


def _check_resources(records: list[dict], arch: int) -> None:
    """Every kernel spills no registers (stack frame of the cubin); every TensorRT kernel fits the
    48 KB of shared memory a launch gets without opting in, the PyTorch path's kernels the arch's
    opt-in limit. Known gaps (:func:`_known_gap`) are excused, nothing else."""
    failures = []
    for r in records:
        where = f"sm_{arch} {r['dtype']} {r['kernel']} head_dim={r.get('head_dim', 64)} {r['config']}"
        gap = _known_gap(r)
        if r["shared"] > r["shared_limit"] and gap != "shared":
            failures.append(f"{where}: {r['shared']} B of shared memory > {r['shared_limit']} B")
        if r["stack"] and gap is None:
            failures.append(f"{where}: {r['stack']} B of register spills ({r['registers']} registers)")
    assert not failures, "\n".join(failures)


if __name__ == "__main__":
    mode, arg = sys.argv[1], sys.argv[2]
    if mode == "interpret":
        _sweep_main(arg)
    elif mode == "gpu":  # the interpreter's cases, compiled for and run on the GPU
        if os.environ.get("TRITON_INTERPRET") == "1" or DEVICE.type != "cuda":
            raise SystemExit("gpu mode: set ATTNC_KERNEL_DEVICE=cuda and leave TRITON_INTERPRET unset")
        for op in (OPS if arg == "all" else [arg]):
            _sweep_main(op)
    elif mode == "aot":
        _aot_main(int(arg))
    else:
        raise SystemExit(f"usage: {sys.argv[0]} interpret <op> | gpu <op>|all | aot <arch>")
