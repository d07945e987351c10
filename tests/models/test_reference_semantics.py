"""Every attention module in attnc.models against an independent float64 numpy reference.

The references below are written from the papers' / DESIGN.md's formulas with plain
loops, sharing no code with the modules: projections are recomputed from the weights,
neighborhood windows from the NATTEN rule, causal sums as explicit prefix loops. The
modules run in float64 (``.double()``) so a mismatch is a semantic bug, not rounding.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from attnc.models import (AgentAttention, FlowAttention, LightningAttention, LinearAttention,
                          MultiHeadSelfAttention, NeighborhoodAttention1D, NeighborhoodAttention2D)
from attnc.models.neighborhood import NeighborhoodAttention3D

TOL = {"rtol": 1e-9, "atol": 1e-10}


# --- shared numpy pieces ---------------------------------------------------------------
def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def qkv_heads(module, x: np.ndarray):
    """Recompute q, k, v ``[B, heads, N, D]`` from the module's projection weights."""
    proj = module.in_proj
    dim = x.shape[-1]
    if proj.fused_qkv:
        w, b = np64(proj.qkv.weight), proj.qkv.bias
        b = np64(b) if b is not None else np.zeros(3 * dim)
        parts = [(w[i * dim:(i + 1) * dim], b[i * dim:(i + 1) * dim]) for i in range(3)]
    else:
        parts = [(np64(lin.weight), np64(lin.bias) if lin.bias is not None else np.zeros(dim))
                 for lin in (proj.q_proj, proj.k_proj, proj.v_proj)]
    heads = proj.num_heads
    out = []
    for w, b in parts:
        y = x @ w.T + b
        out.append(y.reshape(x.shape[0], x.shape[1], heads, dim // heads).transpose(0, 2, 1, 3))
    return out


def out_proj(module, o: np.ndarray) -> np.ndarray:
    """``[B, heads, N, D]`` -> output projection ``[B, N, C]``."""
    b, h, n, d = o.shape
    merged = o.transpose(0, 2, 1, 3).reshape(b, n, h * d)
    return merged @ np64(module.proj.weight).T + np64(module.proj.bias)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def run64(module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return module.double()(x.double()).numpy()


def randomize(module, std: float = 0.5) -> None:
    """Give bias tables visible magnitudes (their init is std 0.02)."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name == "rpb" or name.endswith("_bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


# --- multi-head self-attention ------------------------------------------------------------
def mhsa_reference(module, x):
    q, k, v = qkv_heads(module, x)
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(q.shape[-1])
    if module.causal:
        n = x.shape[1]
        scores = np.where(np.tril(np.ones((n, n), bool)), scores, -np.inf)
    return out_proj(module, softmax(scores) @ v)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scale_after", [False, True])
@pytest.mark.parametrize("fused_qkv", [False, True])
@pytest.mark.parametrize("n", [1, 13])
def test_mhsa(causal, scale_after, fused_qkv, n):
    torch.manual_seed(0)
    m = MultiHeadSelfAttention(24, 3, causal=causal, scale_after=scale_after, fused_qkv=fused_qkv)
    x = torch.randn(2, n, 24, dtype=torch.float64)
    np.testing.assert_allclose(run64(m, x), mhsa_reference(m, np64(x)), **TOL)


# --- neighborhood attention -------------------------------------------------------------
def natten_window(i: int, length: int, k: int, d: int, causal: bool, s: int = 1) -> list[int]:
    """Key indices query ``i`` sees on one axis (NATTEN >= 0.20, DESIGN.md): with stride ``s``
    the window of its block's leader, causal keys never after the query itself."""
    subgrid = list(range(i % d, length, d))
    p = subgrid.index(i)
    first = (p // s) * s
    if causal:
        leader = min(first + s - 1, len(subgrid) - 1)
        return [subgrid[j] for j in range(len(subgrid)) if leader - k < j <= p]
    leader = min(first + s // 2, len(subgrid) - 1)
    left, right = k // 2, k // 2 + k % 2 - 1
    centre = min(max(leader, left), len(subgrid) - 1 - right)
    window = subgrid[centre - left: centre + right + 1]
    assert len(window) == k
    return window


def na_reference(module, x: np.ndarray) -> np.ndarray:
    """Loop over every query of the grid; ``x [B, *grid, C]``."""
    grid, dim = x.shape[1:-1], x.shape[-1]
    tokens = x.reshape(x.shape[0], -1, dim)
    q, k, v = qkv_heads(module, tokens)
    q = q / math.sqrt(q.shape[-1])
    rpb = np64(module.rpb) if module.rpb is not None else None
    out = np.zeros_like(q)
    for query in itertools.product(*(range(n) for n in grid)):
        windows = [natten_window(i, n, ks, d, c, st) for i, n, ks, d, c, st
                   in zip(query, grid, module.kernel_size, module.dilation, module.is_causal, module.stride)]
        keys = list(itertools.product(*windows))
        qi = np.ravel_multi_index(query, grid)
        kj = [np.ravel_multi_index(key, grid) for key in keys]
        scores = np.einsum("bhd,bhkd->bhk", q[:, :, qi], k[:, :, kj])
        if rpb is not None:
            offsets = [tuple((j - i) // d + ks - 1 for i, j, d, ks in zip(query, key, module.dilation,
                                                                         module.kernel_size)) for key in keys]
            scores = scores + np.stack([rpb[(slice(None),) + o] for o in offsets], axis=-1)
        out[:, :, qi] = np.einsum("bhk,bhkd->bhd", softmax(scores), v[:, :, kj])
    return out_proj(module, out).reshape(x.shape)


NA1D_CASES = [  # length, kernel, dilation, causal
    (13, 3, 1, False), (13, 5, 2, False), (10, 5, 2, False), (9, 9, 1, False),
    (17, 7, 2, True), (23, 3, 4, True), (11, 5, 1, True),
]
NA2D_CASES = [  # grid, kernel, dilation, causal
    ((7, 9), (3, 5), (2, 1), (False, False)), ((8, 7), 3, 2, (True, False)), ((5, 5), 5, 1, False),
    ((6, 9), (3, 3), (1, 3), (False, True)), ((7, 6), 3, (1, 2), True),
]
NA3D_CASES = [  # grid (frames, rows, cols), kernel, dilation, causal
    ((4, 6, 5), 3, (1, 2, 1), (True, False, False)), ((3, 5, 7), (3, 5, 3), 1, False),
    ((5, 4, 6), (1, 3, 3), (1, 1, 2), (False, True, True)), ((6, 3, 4), (5, 3, 1), (1, 1, 3), (True, False, False)),
]


@pytest.mark.parametrize("impl", ["masked", "gather"])
@pytest.mark.parametrize("rpb", [False, True])
@pytest.mark.parametrize("length,kernel,dilation,causal", NA1D_CASES)
def test_neighborhood_1d(impl, rpb, length, kernel, dilation, causal):
    torch.manual_seed(length * kernel + dilation)
    m = NeighborhoodAttention1D(16, 2, kernel_size=kernel, dilation=dilation, is_causal=causal, rpb=rpb,
                                impl=impl, fused_qkv=bool(length % 2))
    randomize(m)
    x = torch.randn(2, length, 16, dtype=torch.float64)
    np.testing.assert_allclose(run64(m, x), na_reference(m, np64(x)), **TOL)


@pytest.mark.parametrize("impl", ["masked", "gather"])
@pytest.mark.parametrize("rpb", [False, True])
@pytest.mark.parametrize("grid,kernel,dilation,causal", NA2D_CASES + NA3D_CASES)
def test_neighborhood_2d_3d(impl, rpb, grid, kernel, dilation, causal):
    torch.manual_seed(sum(grid))
    cls = {2: NeighborhoodAttention2D, 3: NeighborhoodAttention3D}[len(grid)]
    m = cls(16, 2, kernel_size=kernel, dilation=dilation, is_causal=causal, rpb=rpb, impl=impl,
            fused_qkv=len(grid) == 2 or bool(grid[0] % 2))
    randomize(m)
    x = torch.randn(2, *grid, 16, dtype=torch.float64)
    np.testing.assert_allclose(run64(m, x), na_reference(m, np64(x)), **TOL)


NA_STRIDED_CASES = [  # grid, kernel, dilation, causal, stride: even/odd strides, stride == kernel, odd grids
    ((13,), 5, 1, False, 2), ((17,), 5, 2, False, 3), ((11,), 3, 1, False, 3), ((14,), 5, 1, True, 2),
    ((19,), 5, 2, True, 5), ((13,), 7, 1, True, 4),
    ((7, 9), (3, 5), (2, 1), (False, False), (3, 4)), ((9, 7), 3, (1, 2), (True, False), (2, 3)),
    ((5, 11), (5, 3), 1, (False, True), (5, 2)),
    ((5, 7, 6), 3, (1, 2, 1), (True, False, False), (2, 1, 3)), ((4, 5, 7), (1, 3, 5), 1, False, (1, 3, 2)),
]


@pytest.mark.parametrize("impl", ["masked", "gather"])
@pytest.mark.parametrize("grid,kernel,dilation,causal,stride", NA_STRIDED_CASES)
def test_neighborhood_strided(impl, grid, kernel, dilation, causal, stride):
    torch.manual_seed(sum(grid) + len(grid))
    cls = {1: NeighborhoodAttention1D, 2: NeighborhoodAttention2D, 3: NeighborhoodAttention3D}[len(grid)]
    m = cls(16, 2, kernel_size=kernel, dilation=dilation, is_causal=causal, stride=stride, impl=impl)
    x = torch.randn(2, *grid, 16, dtype=torch.float64)
    np.testing.assert_allclose(run64(m, x), na_reference(m, np64(x)), **TOL)


def test_natten_window_strided_by_hand():
    """The reference's strided windows on a few hand-checked queries (length 10, k = 5)."""
    assert natten_window(0, 10, 5, 1, False, 2) == [0, 1, 2, 3, 4]     # leader 1
    assert natten_window(6, 10, 5, 1, False, 2) == [5, 6, 7, 8, 9]     # leader 7 -> shifted
    assert natten_window(3, 10, 5, 1, False, 4) == [0, 1, 2, 3, 4]     # leader 2
    assert natten_window(9, 10, 5, 1, False, 4) == [5, 6, 7, 8, 9]     # block 8, leader min(10, 9)
    assert natten_window(4, 10, 5, 1, True, 3) == [1, 2, 3, 4]         # leader 5: keys 1..5, not 5
    assert natten_window(9, 10, 5, 1, True, 4) == [5, 6, 7, 8, 9]      # leader min(11, 9)
    assert natten_window(5, 10, 3, 2, True, 2) == [3, 5]               # sub-grid 1,3,5,7,9; p 2, leader 3


@pytest.mark.parametrize("seed", range(4))
def test_neighborhood_impls_agree_fp32(seed):
    """masked and gather on random 2-D configs agree to float32 rounding."""
    rng = np.random.default_rng(seed)
    kernel = tuple(int(k) for k in rng.choice([1, 3, 5], size=2))
    dilation = tuple(int(d) for d in rng.integers(1, 3, size=2))
    grid = tuple(int(k * d + rng.integers(0, 5)) for k, d in zip(kernel, dilation))
    causal = tuple(bool(c) for c in rng.integers(0, 2, size=2))
    torch.manual_seed(seed)
    options = dict(kernel_size=kernel, dilation=dilation, is_causal=causal, rpb=True)
    masked = NeighborhoodAttention2D(32, 4, impl="masked", **options)
    randomize(masked)
    gather = NeighborhoodAttention2D(32, 4, impl="gather", **options)
    gather.load_state_dict(masked.state_dict())
    x = torch.randn(3, *grid, 32)
    with torch.no_grad():
        np.testing.assert_allclose(masked(x).numpy(), gather(x).numpy(), rtol=1e-5, atol=1e-6)


def test_neighborhood_rejects_bad_arguments():
    with pytest.raises(ValueError, match="smaller than kernel_size"):
        NeighborhoodAttention1D(16, 2, kernel_size=5, dilation=2)(torch.randn(1, 9, 16))
    with pytest.raises(ValueError, match="odd"):
        NeighborhoodAttention2D(16, 2, kernel_size=(3, 4))
    with pytest.raises(ValueError, match="smaller than kernel_size"):
        NeighborhoodAttention3D(16, 2, kernel_size=3, dilation=(1, 2, 1))(torch.randn(1, 4, 5, 6, 16))
    with pytest.raises(ValueError, match="3 value"):
        NeighborhoodAttention3D(16, 2, kernel_size=(3, 3))
    with pytest.raises(ValueError, match="stride must satisfy"):
        NeighborhoodAttention2D(16, 2, kernel_size=3, stride=(1, 4))
    with pytest.raises(ValueError, match="stride must satisfy"):
        NeighborhoodAttention1D(16, 2, kernel_size=3, stride=0)
    with pytest.raises(ValueError, match="relative positional bias with stride"):
        NeighborhoodAttention2D(16, 2, kernel_size=3, stride=2, rpb=True)


# --- flow attention -------------------------------------------------------------------------
def flow_reference(module, x):
    q, k, v = qkv_heads(module, x)
    eps = module.eps
    out = np.zeros_like(v)
    for b, h in itertools.product(range(q.shape[0]), range(q.shape[1])):
        fq, fk, vv = sigmoid(q[b, h]), sigmoid(k[b, h]), v[b, h]
        n = len(fq)
        if not module.causal:
            incoming = 1 / ((fq + eps) @ (fk.sum(0) + eps))
            outgoing = 1 / ((fk + eps) @ (fq.sum(0) + eps))
            sink = (fq + eps) @ ((fk * outgoing[:, None]).sum(0) + eps)
            source = np.clip((fk + eps) @ ((fq * incoming[:, None]).sum(0) + eps), -1, 1)
            allocation = sigmoid(sink)  # the L/S factor is 1 in self-attention
            competition = softmax(source) * n
            out[b, h] = ((fq * incoming[:, None]) @ (fk.T @ (vv * competition[:, None]))) * allocation[:, None]
            continue
        count = np.arange(1, n + 1)
        incoming = np.array([count[t] / ((fq[t] + eps) @ (fk[:t + 1].sum(0) + eps)) for t in range(n)])
        outgoing = np.array([count[t] / ((fk[t] + eps) @ (fq[:t + 1].sum(0) + eps)) for t in range(n)])
        sink = np.array([(fq[t] + eps) @ ((fk[:t + 1] * outgoing[:t + 1, None]).sum(0) + eps) / count[t]
                         for t in range(n)])
        source = np.array([(fk[t] + eps) @ ((fq[:t + 1] * incoming[:t + 1, None]).sum(0) + eps) / count[t]
                           for t in range(n)])
        source = np.clip(source, -1, 1)
        allocation = sigmoid(sink)
        competition = np.array([np.exp(source[t]) / np.exp(source[:t + 1]).sum() * count[t] for t in range(n)])
        for t in range(n):
            weights = (fq[t] * incoming[t] / count[t]) @ fk[:t + 1].T
            out[b, h, t] = weights @ (vv[:t + 1] * competition[:t + 1, None]) * allocation[t]
    return out_proj(module, out)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("fused_qkv", [False, True])
@pytest.mark.parametrize("n", [1, 11, 37])
def test_flow(causal, fused_qkv, n):
    torch.manual_seed(n)
    m = FlowAttention(32, 4, causal=causal, fused_qkv=fused_qkv)
    x = torch.randn(2, n, 32, dtype=torch.float64)
    np.testing.assert_allclose(run64(m, x), flow_reference(m, np64(x)), **TOL)


# --- linear and lightning attention ------------------------------------------------------
FEATURE_MAPS_NP = {
    "elu1": lambda z: np.where(z > 0, z + 1, np.exp(z)),
    "relu": lambda z: np.maximum(z, 0),
    "identity": lambda z: z,
}


def linear_reference(module, x):
    q, k, v = qkv_heads(module, x)
    phi = FEATURE_MAPS_NP[module.feature_map]
    q, k = phi(q), phi(k)
    n = x.shape[1]
    out = np.zeros_like(v)
    for t in range(n):
        keys = range(t + 1) if module.causal else range(n)
        num = sum(np.einsum("bhd,bhd->bh", q[:, :, t], k[:, :, s])[..., None] * v[:, :, s] for s in keys)
        if module.normalize:
            den = sum(np.einsum("bhd,bhd->bh", q[:, :, t], k[:, :, s]) for s in keys)
            num = num / (den[..., None] + module.eps)
        out[:, :, t] = num
    return out_proj(module, out)


def lightning_reference(module, x):
    q, k, v = qkv_heads(module, x)
    phi = FEATURE_MAPS_NP[module.feature_map]
    q, k = phi(q), phi(k)
    decay = np.exp(-np64(module.slope))  # λ_h
    out = np.zeros_like(v)
    for t in range(x.shape[1]):
        for s in range(t + 1):
            weight = decay[None, :] ** (t - s) * np.einsum("bhd,bhd->bh", q[:, :, t], k[:, :, s])
            out[:, :, t] += weight[..., None] * v[:, :, s]
    return out_proj(module, out)


LINEAR_CASES = [  # feature_map, normalize, causal, causal_form
    ("elu1", True, False, "cumsum"), ("relu", True, False, "cumsum"), ("identity", False, False, "cumsum"),
    ("elu1", False, False, "cumsum"),
    ("elu1", True, True, "cumsum"), ("elu1", True, True, "masked"), ("relu", True, True, "masked"),
    ("relu", False, True, "cumsum"), ("identity", False, True, "masked"), ("identity", False, True, "cumsum"),
]


@pytest.mark.parametrize("feature_map,normalize,causal,causal_form", LINEAR_CASES)
@pytest.mark.parametrize("n", [1, 19])
def test_linear(feature_map, normalize, causal, causal_form, n):
    torch.manual_seed(n)
    m = LinearAttention(32, 4, feature_map=feature_map, normalize=normalize, causal=causal,
                        causal_form=causal_form, fused_qkv=n % 2 == 0)
    x = torch.randn(2, n, 32, dtype=torch.float64)
    np.testing.assert_allclose(run64(m, x), linear_reference(m, np64(x)), **TOL)


@pytest.mark.parametrize("heads", [2, 3, 4])
@pytest.mark.parametrize("feature_map", ["identity", "elu1"])
@pytest.mark.parametrize("n", [1, 23])
def test_lightning(heads, feature_map, n):
    torch.manual_seed(heads)
    m = LightningAttention(12 * heads, heads, feature_map=feature_map)
    x = torch.randn(2, n, 12 * heads, dtype=torch.float64)
    np.testing.assert_allclose(run64(m, x), lightning_reference(m, np64(x)), **TOL)


def test_lightning_slopes_are_alibi():
    m = LightningAttention(32, 8)
    np.testing.assert_allclose(np64(m.slope), [2.0 ** (-(i + 1)) for i in range(8)])


# --- agent attention --------------------------------------------------------------------------
def bilinear(table: np.ndarray, size: int) -> np.ndarray:
    """``[..., T, T] -> [..., size, size]``, half-pixel bilinear (align_corners=False)."""
    def weights(n_in):
        w = np.zeros((size, n_in))
        for o in range(size):
            src = max((o + 0.5) * n_in / size - 0.5, 0.0)
            lo = min(int(src), n_in - 1)
            hi = min(lo + 1, n_in - 1)
            frac = src - lo
            w[o, lo] += 1 - frac
            w[o, hi] += frac
        return w
    w = weights(table.shape[-1])
    return np.einsum("yi,...ij,xj->...yx", w, table, w)


def agent_reference(module, x):
    q, k, v = qkv_heads(module, x)
    bsz, heads, n, d = q.shape
    g, first, agents = module.grid_size, int(module.has_cls), module.agent_num
    side = math.isqrt(agents)
    cell = g // side
    q_grid = q[:, :, first:].reshape(bsz, heads, g, g, d)
    a = np.zeros((bsz, heads, side, side, d))
    for i, j in itertools.product(range(side), range(side)):
        a[:, :, i, j] = q_grid[:, :, i * cell:(i + 1) * cell, j * cell:(j + 1) * cell].mean(axis=(2, 3))
    a = a.reshape(bsz, heads, agents, d)
    scale = 1 / math.sqrt(d)
    b1 = np.zeros((heads, agents, n))
    b2 = np.zeros((heads, n, agents))
    if module.use_bias:
        p = {name: np64(t) for name, t in module.named_parameters() if name.endswith("_bias")}
        an, na = bilinear(p["an_bias"], g), bilinear(p["na_bias"], g)
        for y, xx in itertools.product(range(g), range(g)):
            tok = first + y * g + xx
            b1[:, :, tok] = an[:, :, y, xx] + p["ah_bias"][:, :, y, 0] + p["aw_bias"][:, :, 0, xx]
            b2[:, tok, :] = na[:, :, y, xx] + p["ha_bias"][:, y, 0, :] + p["wa_bias"][:, 0, xx, :]
        if first:
            b1[:, :, 0] = p["ac_bias"][:, :, 0]
            b2[:, 0, :] = p["ca_bias"][:, 0, :]
    agent_v = softmax(a @ k.transpose(0, 1, 3, 2) * scale + b1) @ v
    out = softmax(q @ a.transpose(0, 1, 3, 2) * scale + b2) @ agent_v
    merged = out.transpose(0, 2, 1, 3).reshape(bsz, n, heads * d)
    if module.dwc is not None:
        w, bias = np64(module.dwc.weight), np64(module.dwc.bias)
        v_img = v[:, :, first:].transpose(0, 1, 3, 2).reshape(bsz, heads * d, g, g)
        padded = np.pad(v_img, ((0, 0), (0, 0), (1, 1), (1, 1)))
        conv = np.zeros_like(v_img) + bias[None, :, None, None]
        for dy, dx in itertools.product(range(3), range(3)):
            conv += w[None, :, 0, dy, dx, None, None] * padded[:, :, dy:dy + g, dx:dx + g]
        merged[:, first:] += conv.reshape(bsz, heads * d, g * g).transpose(0, 2, 1)
    return merged @ np64(module.proj.weight).T + np64(module.proj.bias)


AGENT_CASES = [  # grid, agent_num, has_cls, use_bias, use_dwc, table
    (9, 9, True, True, True, 7), (9, 9, False, True, True, 7), (7, 49, True, True, False, 5),
    (6, 4, False, False, True, 7), (14, 49, True, True, True, 7), (5, 1, True, False, False, 7),
    (6, 9, False, True, False, 4),
]


@pytest.mark.parametrize("grid,agent_num,has_cls,use_bias,use_dwc,table", AGENT_CASES)
@pytest.mark.parametrize("fused_qkv", [False, True])
def test_agent(grid, agent_num, has_cls, use_bias, use_dwc, table, fused_qkv):
    torch.manual_seed(grid + agent_num)
    m = AgentAttention(24, 3, grid_size=grid, agent_num=agent_num, has_cls=has_cls, use_bias=use_bias,
                       use_dwc=use_dwc, bias_table_size=table, fused_qkv=fused_qkv)
    randomize(m)
    x = torch.randn(2, int(has_cls) + grid * grid, 24, dtype=torch.float64)
    np.testing.assert_allclose(run64(m, x), agent_reference(m, np64(x)), **TOL)


def test_agent_bilinear_matches_torch():
    """The numpy interpolation above is the one F.interpolate computes (guards the reference)."""
    table = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    for size in (7, 9, 14, 5):
        expected = torch.nn.functional.interpolate(table, size=(size, size), mode="bilinear").numpy()
        np.testing.assert_allclose(bilinear(table.numpy(), size), expected, **TOL)


def test_agent_rejects_bad_agent_num():
    with pytest.raises(ValueError, match="square"):
        AgentAttention(24, 3, grid_size=9, agent_num=8)
    with pytest.raises(ValueError, match="divide"):
        AgentAttention(24, 3, grid_size=9, agent_num=4)
