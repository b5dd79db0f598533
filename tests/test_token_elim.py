"""token_elim ops: every op through the shared checks (peftcore.testing) with plain-torch float64 references,
plus selection, saved-activation and bad-input tests."""
import math

import pytest
import torch
import torch.nn.functional as F

import peftcore  # noqa: F401
from peftcore.ops import token_elim as te
from peftcore.testing import OpCase, Sample, op_test_suite

ops = torch.ops.peftcore
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# Plain-torch references.


def ref_gather(x, keep_index):
    idx = keep_index.view(*keep_index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, idx)


def ref_scatter_add(residual, src, keep_index):
    idx = keep_index.view(*keep_index.shape, *([1] * (src.dim() - 2))).expand(-1, -1, *src.shape[2:])
    return residual.scatter_add(1, idx, src)


def ref_block_pool(q, k, block_size, causal, scale):
    B, H, L, D = q.shape
    Lk = k.shape[2]
    kk = k.repeat_interleave(H // k.shape[1], 1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = (q @ kk.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~torch.ones(L, Lk, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    p = torch.softmax(s, -1)
    qb, kb = -(-L // block_size), -(-Lk // block_size)
    p = F.pad(p, (0, kb * block_size - Lk, 0, qb * block_size - L))
    return p.view(B, H, qb, block_size, kb, block_size).amax(dim=(3, 5))


def ref_block_scores(q, k, block_size, causal=True, scale=None):
    stat = torch.float64 if q.dtype == torch.float64 else torch.float32
    return ref_block_pool(q, k, block_size, causal, scale).to(stat).sum(dim=(1, 2))


def _mlp_parts(x, w_gate, w_up, w_down, channel_index):
    g = x @ w_gate.t()
    u = x @ w_up.t()
    a = F.silu(g) * u
    return g, u, a


def ref_mlp_partial_save(x, w_gate, w_up, w_down, keep_channels, channel_index):
    """Exact forward; the gradient to x flows through the kept channels only (the other channels' activations are
    constants to autograd)."""
    g, u, a = _mlp_parts(x, w_gate, w_up, w_down, channel_index)
    mask = torch.zeros(a.shape[-1], dtype=torch.bool, device=a.device)
    mask[channel_index] = True
    a_mixed = torch.where(mask, a, a.detach())
    return a_mixed @ w_down.t(), g[..., channel_index], u[..., channel_index], channel_index


def ref_mlp_partial_save_backward(grad_y, gate_kept, up_kept, channel_index, w_gate, w_up, w_down,
                                  grad_gate_kept=None, grad_up_kept=None):
    da = grad_y @ w_down[:, channel_index]
    s = torch.sigmoid(gate_kept)
    dg = da * up_kept * s * (1 + gate_kept * (1 - s))
    du = da * gate_kept * s
    if grad_gate_kept is not None:
        dg = dg + grad_gate_kept
    if grad_up_kept is not None:
        du = du + grad_up_kept
    return dg @ w_gate[channel_index] + du @ w_up[channel_index]


# ---------------------------------------------------------------------------------------------------------------
# Samples.


def _randn(shape, dtype, seed, scale=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def make_keep(B, L, K, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(L, generator=g)[:K].sort().values for _ in range(B)]).to(device)


def _token_configs(dtype):
    """(x shape, K)."""
    if dtype == torch.float64:
        return [((2, 7, 3), 4), ((1, 5, 2, 3), 5), ((2, 6, 4), 0)]
    return [((2, 37, 24), 11), ((3, 20, 4, 16), 7), ((1, 9, 33), 9), ((2, 8, 5), 0)]


def gather_samples(device, dtype, requires_grad):
    for i, (shape, K) in enumerate(_token_configs(dtype)):
        x = _randn(shape, dtype, 10 + i, device=device)
        yield Sample((x, make_keep(shape[0], shape[1], K, i, device)), name=f"{shape}/K={K}")


def scatter_samples(device, dtype, requires_grad):
    for i, (shape, K) in enumerate(_token_configs(dtype)):
        r = _randn(shape, dtype, 10 + i, device=device)
        src = _randn((shape[0], K, *shape[2:]), dtype, 20 + i, device=device)
        yield Sample((r, src, make_keep(shape[0], shape[1], K, i, device)), name=f"{shape}/K={K}")


def scores_samples(device, dtype, requires_grad):
    cfgs = ([(1, 2, 1, 9, 4, 4, True, None), (2, 2, 2, 6, 3, 2, False, 0.7)] if dtype == torch.float64 else
            [(2, 4, 2, 70, 32, 16, True, None), (1, 4, 1, 100, 16, 32, False, 0.3), (2, 2, 2, 64, 16, 64, True, None)])
    for i, (B, H, Hkv, L, D, bs, causal, scale) in enumerate(cfgs):
        if device == "cuda":
            D = 64
        q = _randn((B, H, L, D), dtype, 30 + i, device=device)
        k = _randn((B, Hkv, L, D), dtype, 40 + i, device=device)
        yield Sample((q, k, bs, causal, scale), name=f"B{B} H{H}/{Hkv} L{L} D{D} bs{bs} causal={causal}")


def _mlp_configs(dtype):
    """(token shape, H, I, C). gradcheck differentiates the exact forward, which the restricted gradient equals
    only when every channel is kept: the float64 samples keep all (C = I); the other dtypes check C < I (and C = 1)
    against the float64 reference of the restricted gradient."""
    if dtype == torch.float64:
        return [((2, 3), 4, 6, 6), ((5,), 3, 5, 5)]
    return [((2, 19), 24, 40, 13), ((37,), 16, 48, 48), ((3, 4), 12, 20, 1)]


def mlp_samples(device, dtype, requires_grad):
    for i, (tok, H, I, C) in enumerate(_mlp_configs(dtype)):
        x = _randn((*tok, H), dtype, 50 + i, device=device)
        wg = _randn((I, H), dtype, 60 + i, H ** -0.5, device)
        wu = _randn((I, H), dtype, 70 + i, H ** -0.5, device)
        wd = _randn((H, I), dtype, 80 + i, I ** -0.5, device)
        idx = make_keep(1, I, C, 90 + i, device)[0]
        yield Sample((x, wg, wu, wd, C, idx), name=f"{tok}x{H} I={I} C={C}")


def mlp_backward_samples(device, dtype, requires_grad):
    for j, s in enumerate(mlp_samples(device, dtype, False)):
        x, wg, wu, wd, C, idx = s.args
        _, gk, uk, _ = ops.token_mlp_partial_save(x, wg, wu, wd, C, idx)
        gy = _randn((*x.shape[:-1], wd.shape[0]), dtype, 95 + j, device=device)
        ggk = _randn(gk.shape, dtype, 96 + j, device=device) if j % 2 == 0 else None
        yield Sample((gy, gk, uk, idx, wg, wu, wd, ggk, None), name=f"{s.name}/ggk={ggk is not None}")


CASES = [
    OpCase("token_gather", ops.token_gather, gather_samples, ref_gather, ALL_DTYPES, grad_args=(0,)),
    OpCase("token_scatter_add", ops.token_scatter_add, scatter_samples, ref_scatter_add, ALL_DTYPES,
           grad_args=(0, 1)),
    OpCase("token_block_scores", ops.token_block_scores, scores_samples, ref_block_scores, ALL_DTYPES),
    OpCase("token_mlp_partial_save", ops.token_mlp_partial_save, mlp_samples, ref_mlp_partial_save, ALL_DTYPES,
           grad_args=(0,)),
    OpCase("token_mlp_partial_save_backward", ops.token_mlp_partial_save_backward, mlp_backward_samples,
           ref_mlp_partial_save_backward, ALL_DTYPES),
]

test_opcheck, test_reference, test_gradcheck, test_compile = op_test_suite(CASES)


# ---------------------------------------------------------------------------------------------------------------
# Semantics beyond the references.


def test_mlp_selects_top_channels_by_activation_mass():
    x, wg, wu, wd, _, _ = next(mlp_samples("cpu", torch.float64, False)).args
    C = 3
    y, gk, uk, idx = ops.token_mlp_partial_save(x, wg, wu, wd, C, None)
    _, _, a = _mlp_parts(x, wg, wu, wd, None)
    want = a.abs().sum(dim=tuple(range(a.dim() - 1))).topk(C).indices.sort().values
    assert torch.equal(idx, want)
    torch.testing.assert_close(y, a @ wd.t())
    torch.testing.assert_close(gk, (x @ wg.t())[..., idx])


def test_mlp_full_channels_is_the_exact_gradient():
    x, wg, wu, wd, _, _ = next(mlp_samples("cpu", torch.float64, False)).args
    I = wg.shape[0]
    x1 = x.clone().requires_grad_(True)
    y = te.token_mlp_partial_save(x1, wg, wu, wd, I)
    x2 = x.clone().requires_grad_(True)
    y2 = (F.silu(x2 @ wg.t()) * (x2 @ wu.t())) @ wd.t()
    g = torch.randn_like(y)
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(torch.autograd.grad(y, x1, g)[0], torch.autograd.grad(y2, x2, g)[0])


def _saved_bytes(fn):
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(total)


def test_mlp_saves_only_the_kept_channels():
    T, H, I, C = 64, 32, 96, 24
    x = torch.randn(T, H, requires_grad=True)
    wg, wu, wd = torch.randn(I, H), torch.randn(I, H), torch.randn(H, I)
    weights = 3 * I * H * 4
    part = _saved_bytes(lambda: te.token_mlp_partial_save(x, wg, wu, wd, C)) - weights
    dense = _saved_bytes(lambda: (F.silu(x @ wg.t()) * (x @ wu.t())) @ wd.t())
    assert part == 2 * T * C * 4 + C * 8
    assert dense >= 3 * T * I * 4 and part * 4 < dense


def test_mlp_weights_must_be_frozen():
    x = torch.randn(4, 8, requires_grad=True)
    wg = torch.randn(16, 8, requires_grad=True)
    y = te.token_mlp_partial_save(x, wg, torch.randn(16, 8), torch.randn(8, 16), 4)
    with pytest.raises(RuntimeError, match="token_mlp_partial_save: the MLP weights must be frozen"):
        y.sum().backward()


def test_gather_scatter_roundtrip_and_residual_passthrough():
    x = torch.randn(2, 10, 6)
    keep = make_keep(2, 10, 4, 0)
    src = ops.token_gather(x, keep)
    out = ops.token_scatter_add(x, src, keep)
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask.scatter_(1, keep, True)
    torch.testing.assert_close(out[mask], 2 * x[mask])
    assert torch.equal(out[~mask], x[~mask])  # dropped tokens ride the residual unchanged


def test_block_scores_equal_pooled_column_sums_and_topk():
    q, k = torch.randn(2, 4, 256, 16), torch.randn(2, 2, 256, 16)
    s = te.token_block_scores(q, k, 64, True)
    assert s.shape == (2, 4) and s.dtype == torch.float32
    torch.testing.assert_close(s, ref_block_scores(q, k, 64, True), atol=1e-5, rtol=1e-5)
    keep = te.token_topk_blocks(s, 2, 64, 256, always_keep_first=True, always_keep_last=True)
    want = torch.cat([torch.arange(64), torch.arange(192, 256)]).expand(2, -1)
    assert torch.equal(keep, want)


@pytest.mark.parametrize("keep_last", [True, False])
def test_topk_blocks_static_count_with_partial_tail(keep_last):
    L, bs = 150, 64  # blocks of 64, 64, 22
    scores = torch.tensor([[0.0, 5.0, 9.0], [9.0, 1.0, 0.0]])
    keep = te.token_topk_blocks(scores, 2, bs, L, always_keep_first=False, always_keep_last=keep_last)
    if keep_last:  # the partial block is forced in: one whole block + 22 tokens for every row
        assert keep.shape == (2, 64 + 22)
        assert torch.equal(keep[0], torch.cat([torch.arange(64, 128), torch.arange(128, 150)]))
        assert torch.equal(keep[1], torch.cat([torch.arange(0, 64), torch.arange(128, 150)]))
    else:  # never picked: two whole blocks
        assert keep.shape == (2, 128)
        assert torch.equal(keep[0], torch.arange(0, 128))
    assert bool((keep[:, 1:] > keep[:, :-1]).all()) and int(keep.max()) < L


def test_compile_dynamic_free_training_path():
    """gather -> linear -> scatter-add under inductor, fullgraph, forward and backward (K static)."""
    torch._dynamo.reset()
    w = torch.randn(16, 16)

    def step(h, keep):
        return ops.token_scatter_add(h, ops.token_gather(h, keep) @ w, keep).square().sum()

    h = torch.randn(2, 32, 16, requires_grad=True)
    keep = make_keep(2, 32, 12, 3)
    g_e = torch.autograd.grad(step(h, keep), h)[0]
    g_c = torch.autograd.grad(torch.compile(step, fullgraph=True)(h, keep), h)[0]
    torch.testing.assert_close(g_c, g_e, atol=1e-4, rtol=1e-4)


def _err(fn, match):
    with pytest.raises(RuntimeError, match=match):
        fn()


def test_bad_input_errors():
    x = torch.randn(2, 8, 4)
    _err(lambda: ops.token_gather(x, torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)),
         r"token_gather: keep_index must be int64, got Int")
    _err(lambda: ops.token_gather(x, torch.tensor([[0, 1]])), r"token_gather: keep_index must have batch size 2")
    _err(lambda: ops.token_gather(x, torch.tensor([[0, 8], [1, 2]])),
         r"token_gather: keep_index must lie in \[0, 8\), got keep_index\[0, 1\] = 8")
    _err(lambda: ops.token_gather(x, torch.tensor([[3, 1], [1, 2]])),
         r"token_gather: keep_index rows must be sorted ascending and unique, but keep_index\[0, 1\] = 1 follows 3")
    _err(lambda: ops.token_gather(x.int(), torch.tensor([[0, 1], [1, 2]])), r"token_gather: x must be float32")
    keep = torch.tensor([[0, 1], [1, 2]])
    _err(lambda: ops.token_scatter_add(x, torch.randn(2, 3, 4), keep), r"token_scatter_add: src must have shape \[2, 2, 4\]")
    _err(lambda: ops.token_scatter_add(x, torch.randn(2, 2, 4).double(), keep), r"token_scatter_add: src has dtype Double")
    _err(lambda: ops.token_block_scores(torch.randn(1, 2, 8, 4), torch.randn(1, 2, 8, 4), 0, True, None),
         r"token_block_scores: block_size must be > 0, got 0")
    wg, wu, wd = torch.randn(6, 4), torch.randn(6, 4), torch.randn(4, 6)
    _err(lambda: ops.token_mlp_partial_save(x, wg, wu, wd, 7, None), r"token_mlp_partial_save: keep_channels must be in \[0, 6\], got 7")
    _err(lambda: ops.token_mlp_partial_save(x, wg, wu, torch.randn(4, 5), 2, None), r"token_mlp_partial_save: w_down must be \[4, 6\]")
    _err(lambda: ops.token_mlp_partial_save(x, wg, wu, wd, 2, torch.tensor([3, 1])),
         r"token_mlp_partial_save: channel_index rows must be sorted ascending and unique")
    _err(lambda: ops.token_mlp_partial_save(x, wg, wu, wd, 3, torch.tensor([0, 1])),
         r"token_mlp_partial_save: channel_index has 2 entries but keep_channels = 3")
