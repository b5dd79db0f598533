"""token_elim ops: every op through the shared checks (peftcore.testing) with plain-torch float64 references,
plus selection, saved-activation and bad-input tests."""
import math

import pytest
import torch
import torch.nn.functional as F

import peftcore  # noqa: F401
from peftcore.ops import token_elim as te
from peftcore.testing import (OpCase, Sample, check_double_backward_refused, check_errors_isolated,
                              check_fake_refuses, devices, op_test_suite)

ops = torch.ops.peftcore
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
DEVICES = devices()
# The CPU kernels split rows over threads in tasks of at::internal::GRAIN_SIZE elements; the large samples reach
# that split only with more than one thread (set here so a one-core runner exercises it too).
if torch.get_num_threads() < 2:
    torch.set_num_threads(2)


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
    """(x shape, K). Branch points crossed (float32): kept rows (b, j) split over threads (B * K * F > GRAIN_SIZE =
    32768: 1200 rows of 48), F > 256 (one CUDA block covers 256 features of a row), B * K > 65535 rows (the CUDA
    grid's y dimension, continued in z), K = L, K = 0, trailing dims flattened."""
    if dtype == torch.float64:
        return [((2, 7, 3), 4), ((1, 5, 2, 3), 5), ((2, 6, 4), 0)]
    big = [((2, 700, 48), 600), ((2, 9, 300), 5), ((2, 40000, 1), 33000)] if dtype == torch.float32 else []
    return [((2, 37, 24), 11), ((3, 20, 4, 16), 7), ((1, 9, 33), 9), ((2, 8, 5), 0), *big]


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
    # float32 also: the elementwise loops split over threads (T * I and T * C > GRAIN_SIZE = 32768), C > 256
    big = [((300,), 32, 160, 120), ((40,), 16, 320, 300)] if dtype == torch.float32 else []
    return [((2, 19), 24, 40, 13), ((37,), 16, 48, 48), ((3, 4), 12, 20, 1), *big]


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
        # grads of the kept pre-activations: (given, None), (None, given), (given, given), ...
        ggk = _randn(gk.shape, dtype, 96 + j, device=device) if j % 3 != 1 else None
        guk = _randn(uk.shape, dtype, 97 + j, device=device) if j % 3 != 0 else None
        yield Sample((gy, gk, uk, idx, wg, wu, wd, ggk, guk),
                     name=f"{s.name}/ggk={ggk is not None}/guk={guk is not None}")


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


# ---------------------------------------------------------------------------------------------------------------
# Bad input: every op (the backward op included) called directly with hostile arguments, in one child process (a
# crash fails the named case). (name, code, message regex, shape_only): the fake kernels must refuse the
# shape_only ones too, with the same message (dtype names differ between C++ and Python: matched with \S+).

_PRELUDE = """
x = torch.randn(2, 8, 4); keep = torch.tensor([[0, 1], [2, 3]])
wg, wu, wd = torch.randn(6, 4), torch.randn(6, 4), torch.randn(4, 6)
ci = torch.tensor([1, 3, 4])
gy, gk, uk = torch.randn(2, 8, 4), torch.randn(2, 8, 3), torch.randn(2, 8, 3)
q, k = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8)

def gather(x=x, keep_index=keep):
    return ops.token_gather(x, keep_index)

def scatter(residual=x, src=None, keep_index=keep):
    src = torch.randn(2, 2, 4) if src is None else src
    return ops.token_scatter_add(residual, src, keep_index)

def mlp(x=x, w_gate=wg, w_up=wu, w_down=wd, keep_channels=3, channel_index=ci):
    return ops.token_mlp_partial_save(x, w_gate, w_up, w_down, keep_channels, channel_index)

def mlpb(grad_y=gy, gate_kept=gk, up_kept=uk, channel_index=ci, w_gate=wg, w_up=wu, w_down=wd, ggk=None, guk=None):
    return ops.token_mlp_partial_save_backward(grad_y, gate_kept, up_kept, channel_index, w_gate, w_up, w_down, ggk, guk)

def scores(q=q, k=k, block_size=4, causal=True, scale=None):
    return ops.token_block_scores(q, k, block_size, causal, scale)

def topk(scores=torch.randn(2, 4), keep_blocks=2, block_size=4, seq_len=16):
    from peftcore.ops.token_elim import token_topk_blocks
    return token_topk_blocks(scores, keep_blocks, block_size, seq_len)
"""

_BAD = [
    # token_gather
    ("gather_oob", "gather(keep_index=torch.tensor([[0, 8], [1, 2]]))", r"token_gather: keep_index must lie in \[0, 8\), got keep_index\[0, 1\] = 8", False),
    ("gather_negative", "gather(keep_index=torch.tensor([[0, 1], [-1, 2]]))", r"token_gather: keep_index must lie in \[0, 8\), got keep_index\[1, 0\] = -1", False),
    ("gather_huge", "gather(keep_index=torch.tensor([[0, 10**15], [1, 2]]))", r"token_gather: keep_index must lie in \[0, 8\)", False),
    ("gather_unsorted", "gather(keep_index=torch.tensor([[3, 1], [1, 2]]))",
     r"token_gather: keep_index rows must be sorted ascending and unique, but keep_index\[0, 1\] = 1 follows 3", False),
    ("gather_dup", "gather(keep_index=torch.tensor([[1, 2], [5, 5]]))", r"token_gather: keep_index rows must be sorted ascending and unique", False),
    ("gather_int32", "gather(keep_index=keep.int())", r"token_gather: keep_index must be int64, got \S+", True),
    ("gather_keep_1d", "gather(keep_index=torch.tensor([0, 1]))", r"token_gather: keep_index must be 2-D, got shape \[2\]", True),
    ("gather_batch", "gather(keep_index=torch.tensor([[0, 1]]))", r"token_gather: keep_index must have batch size 2", True),
    ("gather_k_gt_l", "gather(keep_index=torch.arange(9).expand(2, 9))", r"token_gather: keep_index keeps 9 tokens of a sequence of 8", True),
    ("gather_x_1d", "gather(x=torch.randn(8))", r"token_gather: x must be \[B, L, \.\.\.\] \(at least 2-D\)", True),
    ("gather_x_int", "gather(x=x.long())", r"token_gather: x must be float32", True),
    ("gather_device", "gather(keep_index=keep.to('meta'))", r"token_gather: keep_index is on meta but .* is on cpu", True),
    # token_scatter_add
    ("scatter_oob", "scatter(keep_index=torch.tensor([[0, 1], [2, 8]]))", r"token_scatter_add: keep_index must lie in \[0, 8\), got keep_index\[1, 1\] = 8", False),
    ("scatter_negative", "scatter(keep_index=torch.tensor([[-300, 1], [2, 3]]))", r"token_scatter_add: keep_index must lie in \[0, 8\)", False),
    ("scatter_dup", "scatter(keep_index=torch.tensor([[1, 1], [2, 3]]))", r"token_scatter_add: keep_index rows must be sorted ascending and unique", False),
    ("scatter_src_k", "scatter(src=torch.randn(2, 3, 4))", r"token_scatter_add: src must have shape \[2, 2, 4\]", True),
    ("scatter_src_feat", "scatter(src=torch.randn(2, 2, 5))", r"token_scatter_add: src must have shape \[2, 2, 4\]", True),
    ("scatter_src_batch", "scatter(src=torch.randn(1, 2, 4))", r"token_scatter_add: src must have shape \[2, 2, 4\]", True),
    ("scatter_src_dtype", "scatter(src=torch.randn(2, 2, 4).double())", r"token_scatter_add: src has dtype \S+ but residual has", True),
    ("scatter_src_device", "scatter(src=torch.randn(2, 2, 4, device='meta'))", r"token_scatter_add: src is on meta", True),
    ("scatter_residual_int", "scatter(residual=x.long())", r"token_scatter_add: residual must be float32", True),
    ("scatter_batch", "scatter(keep_index=torch.tensor([[0, 1]]))", r"token_scatter_add: keep_index must have batch size 2", True),
    ("scatter_int32", "scatter(keep_index=keep.int())", r"token_scatter_add: keep_index must be int64", True),
    # token_block_scores
    ("scores_q_3d", "scores(q=q[0])", r"token_block_scores: q must be 4-D", True),
    ("scores_k_3d", "scores(k=k[0])", r"token_block_scores: k must be 4-D", True),
    ("scores_dtype", "scores(k=k.double())", r"token_block_scores: k has dtype \S+ but q has", True),
    ("scores_batch", "scores(k=torch.randn(2, 2, 16, 8))", r"token_block_scores: k must be \[1, Hkv, Lk, 8\]", True),
    ("scores_head_dim", "scores(k=torch.randn(1, 2, 16, 4))", r"token_block_scores: k must be \[1, Hkv, Lk, 8\]", True),
    ("scores_heads", "scores(k=torch.randn(1, 3, 16, 8))", r"token_block_scores: the query heads must be a multiple of the key heads .* Hq = 4 and Hkv = 3", True),
    ("scores_block_0", "scores(block_size=0)", r"token_block_scores: block_size must be > 0, got 0", True),
    ("scores_block_neg", "scores(block_size=-4)", r"token_block_scores: block_size must be > 0, got -4", True),
    ("scores_scale_nan", "scores(scale=float('nan'))", r"token_block_scores: scale must be finite, got nan", True),
    ("scores_q_int", "scores(q=q.long())", r"token_block_scores: q must be float32", True),
    ("scores_device", "scores(k=k.to('meta'))", r"token_block_scores: k is on meta", True),
    # token_topk_blocks (a Python helper)
    ("topk_scores_1d", "topk(scores=torch.randn(4))", r"token_topk_blocks: scores must be a floating \[B, Kb\] tensor", False),
    ("topk_block_0", "topk(block_size=0)", r"token_topk_blocks: block_size must be > 0, got 0", False),
    ("topk_seq_0", "topk(seq_len=0)", r"token_topk_blocks: seq_len must be > 0, got 0", False),
    ("topk_keep_0", "topk(keep_blocks=0)", r"token_topk_blocks: keep_blocks must be in \[1, 4\], got 0", False),
    ("topk_keep_many", "topk(keep_blocks=5)", r"token_topk_blocks: keep_blocks must be in \[1, 4\], got 5", False),
    ("topk_blocks_mismatch", "topk(seq_len=20)", r"token_topk_blocks: scores has 4 blocks, seq_len 20 / block_size 4 needs 5", False),
    # token_mlp_partial_save
    ("mlp_ci_oob", "mlp(channel_index=torch.tensor([1, 3, 6]))", r"token_mlp_partial_save: channel_index must lie in \[0, 6\), got channel_index\[0, 2\] = 6", False),
    ("mlp_ci_negative", "mlp(channel_index=torch.tensor([-1, 3, 4]))", r"token_mlp_partial_save: channel_index must lie in \[0, 6\)", False),
    ("mlp_ci_unsorted", "mlp(channel_index=torch.tensor([3, 1, 4]))", r"token_mlp_partial_save: channel_index rows must be sorted ascending and unique", False),
    ("mlp_ci_dup", "mlp(channel_index=torch.tensor([1, 1, 4]))", r"token_mlp_partial_save: channel_index rows must be sorted ascending and unique", False),
    ("mlp_keep_many", "mlp(keep_channels=7, channel_index=None)", r"token_mlp_partial_save: keep_channels must be in \[0, 6\], got 7", True),
    ("mlp_keep_neg", "mlp(keep_channels=-1, channel_index=None)", r"token_mlp_partial_save: keep_channels must be in \[0, 6\], got -1", True),
    ("mlp_ci_count", "mlp(keep_channels=2)", r"token_mlp_partial_save: channel_index has 3 entries but keep_channels = 2", True),
    ("mlp_ci_int32", "mlp(channel_index=ci.int())", r"token_mlp_partial_save: channel_index must be int64", True),
    ("mlp_ci_2d", "mlp(channel_index=ci[None])", r"token_mlp_partial_save: channel_index must be 1-D", True),
    ("mlp_ci_device", "mlp(channel_index=ci.to('meta'))", r"token_mlp_partial_save: channel_index is on meta", True),
    ("mlp_w_down", "mlp(w_down=torch.randn(4, 5))", r"token_mlp_partial_save: w_down must be \[4, 6\]", True),
    ("mlp_w_gate", "mlp(w_gate=torch.randn(6, 5))", r"token_mlp_partial_save: w_gate must be \[I, 4\] for x's last dim 4", True),
    ("mlp_w_up", "mlp(w_up=torch.randn(5, 4))", r"token_mlp_partial_save: w_up must have w_gate's shape \[6, 4\]", True),
    ("mlp_w_1d", "mlp(w_up=torch.randn(24))", r"token_mlp_partial_save: w_up must be 2-D", True),
    ("mlp_w_dtype", "mlp(w_down=wd.half())", r"token_mlp_partial_save: w_down has dtype \S+ but x has", True),
    ("mlp_x_int", "mlp(x=x.long())", r"token_mlp_partial_save: x must be float32", True),
    ("mlp_x_scalar", "mlp(x=torch.tensor(1.0))", r"token_mlp_partial_save: x must have at least 1 dim", True),
    # token_mlp_partial_save_backward, called directly (the checks are shared with the CUDA op)
    ("mlpb_ci_oob", "mlpb(channel_index=torch.tensor([1, 3, 6]))", r"token_mlp_partial_save_backward: channel_index must lie in \[0, 6\)", False),
    ("mlpb_ci_huge", "mlpb(channel_index=torch.tensor([1, 3, 2**40]))", r"token_mlp_partial_save_backward: channel_index must lie in \[0, 6\)", False),
    ("mlpb_ci_negative", "mlpb(channel_index=torch.tensor([-5, 3, 4]))", r"token_mlp_partial_save_backward: channel_index must lie in \[0, 6\)", False),
    ("mlpb_ci_dup", "mlpb(channel_index=torch.tensor([3, 3, 4]))", r"token_mlp_partial_save_backward: channel_index rows must be sorted", False),
    ("mlpb_ci_too_many", "mlpb(channel_index=torch.arange(7), gate_kept=torch.randn(2, 8, 7), up_kept=torch.randn(2, 8, 7))",
     r"token_mlp_partial_save_backward: keep_channels must be in \[0, 6\], got 7", True),
    ("mlpb_ci_int32", "mlpb(channel_index=ci.int())", r"token_mlp_partial_save_backward: channel_index must be int64", True),
    ("mlpb_ci_2d", "mlpb(channel_index=ci[None])", r"token_mlp_partial_save_backward: channel_index must be 1-D", True),
    ("mlpb_gk_dtype", "mlpb(gate_kept=gk.double())", r"token_mlp_partial_save_backward: gate_kept has dtype \S+ but grad_y has", True),
    ("mlpb_uk_dtype", "mlpb(up_kept=uk.half())", r"token_mlp_partial_save_backward: up_kept has dtype \S+ but grad_y has", True),
    ("mlpb_ggk_dtype", "mlpb(ggk=gk.bfloat16())", r"token_mlp_partial_save_backward: grad_gate_kept has dtype \S+ but grad_y has", True),
    ("mlpb_guk_dtype", "mlpb(guk=uk.double())", r"token_mlp_partial_save_backward: grad_up_kept has dtype \S+ but grad_y has", True),
    ("mlpb_gk_shape", "mlpb(gate_kept=torch.randn(2, 8, 4))", r"token_mlp_partial_save_backward: gate_kept must have shape \[2, 8, 3\]", True),
    ("mlpb_uk_tokens", "mlpb(up_kept=torch.randn(16, 3))", r"token_mlp_partial_save_backward: up_kept must have shape \[2, 8, 3\]", True),
    ("mlpb_ggk_shape", "mlpb(ggk=torch.randn(2, 8, 2))", r"token_mlp_partial_save_backward: grad_gate_kept must have shape \[2, 8, 3\]", True),
    ("mlpb_guk_shape", "mlpb(guk=torch.randn(2, 7, 3))", r"token_mlp_partial_save_backward: grad_up_kept must have shape \[2, 8, 3\]", True),
    ("mlpb_gk_device", "mlpb(gate_kept=gk.to('meta'))", r"token_mlp_partial_save_backward: gate_kept is on meta", True),
    ("mlpb_guk_device", "mlpb(guk=uk.to('meta'))", r"token_mlp_partial_save_backward: grad_up_kept is on meta", True),
    ("mlpb_grad_last", "mlpb(grad_y=torch.randn(2, 8, 5))", r"token_mlp_partial_save_backward: w_gate must be \[I, 5\] for grad_y's last dim 5", True),
    ("mlpb_grad_int", "mlpb(grad_y=gy.long())", r"token_mlp_partial_save_backward: grad_y must be float32", True),
    ("mlpb_w_dtype", "mlpb(w_gate=wg.double())", r"token_mlp_partial_save_backward: w_gate has dtype \S+ but grad_y has", True),
    ("mlpb_w_down", "mlpb(w_down=torch.randn(6, 4))", r"token_mlp_partial_save_backward: w_down must be \[4, 6\]", True),
]


def test_bad_input_errors_isolated():
    check_errors_isolated([c[:3] for c in _BAD], prelude=_PRELUDE)


@pytest.mark.parametrize("name,code,pattern", [c[:3] for c in _BAD if c[3]], ids=[c[0] for c in _BAD if c[3]])
def test_fake_kernels_refuse_the_same_shapes(name, code, pattern):
    check_fake_refuses(code, pattern, _PRELUDE, dict(torch=torch, ops=ops))


def test_fake_kernels_accept_good_input():
    from torch._subclasses.fake_tensor import FakeTensorMode

    env = dict(torch=torch, ops=ops)
    with FakeTensorMode():
        exec(_PRELUDE, env)
        out = eval("(gather(), scatter(), mlp(), mlpb(ggk=gk, guk=uk), scores())", env)
    assert [tuple(o.shape) for o in (out[0], out[1], out[3], out[4])] == [(2, 2, 4), (2, 8, 4), (2, 8, 4), (1, 4)]
    assert [tuple(o.shape) for o in out[2]] == [(2, 8, 4), (2, 8, 3), (2, 8, 3), (3,)]


# ---------------------------------------------------------------------------------------------------------------
# Differentiability: gather / scatter-add exact to any order; the MLP's backward op refuses; selections carry none.


def test_gather_scatter_double_backward():
    x = _randn((2, 9, 3), torch.float64, 1).requires_grad_()
    r = _randn((2, 9, 3), torch.float64, 2).requires_grad_()
    src = _randn((2, 4, 3), torch.float64, 3).requires_grad_()
    keep = make_keep(2, 9, 4, 0)
    assert torch.autograd.gradgradcheck(lambda t: ops.token_gather(t, keep) ** 2, (x,))
    assert torch.autograd.gradgradcheck(lambda a, b: ops.token_scatter_add(a, b, keep) ** 2, (r, src))
    assert torch.autograd.gradgradcheck(lambda t: ops.token_scatter_add(t, ops.token_gather(t, keep).sin(), keep), (x,))


def test_mlp_double_backward_refused():
    x, wg, wu, wd, C, idx = next(mlp_samples("cpu", torch.float64, False)).args
    check_double_backward_refused(lambda x: ops.token_mlp_partial_save(x, wg, wu, wd, C, idx), (x,), (0,),
                                  "token_mlp_partial_save")


def test_selection_outputs_do_not_require_grad():
    q = torch.randn(2, 4, 40, 8, requires_grad=True)
    k = torch.randn(2, 2, 40, 8, requires_grad=True)
    s = te.token_block_scores(q, k, 16, True)
    assert not s.requires_grad and s.grad_fn is None
    s2 = ops.token_block_scores(q.double(), k.double(), 16, False, 0.5)
    assert not s2.requires_grad
    keep = te.token_topk_blocks(s.detach().requires_grad_(), 2, 16, 40)
    assert keep.dtype == torch.int64 and not keep.requires_grad
    # the scores equal the reference on values that required grad
    torch.testing.assert_close(s, ref_block_scores(q.detach(), k.detach(), 16, True), atol=1e-5, rtol=1e-5)


def test_topk_blocks_nan_scores_rank_first():
    """A NaN score ranks above every finite one (torch.topk's order); the finite order is kept."""
    scores = torch.tensor([[0.0, float("nan"), 3.0, 1.0, 2.0]])
    keep = te.token_topk_blocks(scores, 3, 2, 10, always_keep_first=False, always_keep_last=False)
    assert keep.tolist() == [[2, 3, 4, 5, 8, 9]]




@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_malformed_indices_skipped(dtype):
    """CUDA reads no index on the host: keep_index rows outside [0, L) are gathered as 0 and never scattered;
    channel_index entries outside [0, I) are gathered as 0 and add nothing to grad_x."""
    x = _randn((2, 8, 4), dtype, 1, device="cuda")
    bad = torch.tensor([[-1, 3], [8, 10**12]], device="cuda")
    g = ops.token_gather(x, bad)
    out = ops.token_scatter_add(x, g, bad)
    torch.cuda.synchronize()
    want = torch.zeros(2, 2, 4, dtype=dtype)
    want[0, 1] = x[0, 3].cpu()
    assert torch.equal(g.cpu(), want)
    ref = x.cpu().clone()
    ref[0, 3] += x[0, 3].cpu()
    torch.testing.assert_close(out.cpu(), ref)
    wg, wu = _randn((6, 4), dtype, 2, device="cuda"), _randn((6, 4), dtype, 3, device="cuda")
    wd = _randn((4, 6), dtype, 4, device="cuda")
    ci_bad, ci_good = torch.tensor([-5, 2, 6], device="cuda"), torch.tensor([2])
    y, gk, uk, _ = ops.token_mlp_partial_save(x, wg, wu, wd, 3, ci_bad)
    assert torch.equal(gk[..., [0, 2]].cpu(), torch.zeros(2, 8, 2, dtype=dtype))
    gx = ops.token_mlp_partial_save_backward(x, gk, uk, ci_bad, wg, wu, wd)
    _, gk1, uk1, _ = ops.token_mlp_partial_save(x.cpu(), wg.cpu(), wu.cpu(), wd.cpu(), 1, ci_good)
    ref = ops.token_mlp_partial_save_backward(x.cpu(), gk1, uk1, ci_good, wg.cpu(), wu.cpu(), wd.cpu())
    torch.testing.assert_close(gx.cpu(), ref, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------------------------------------------------------
# CUDA launch plan (token_elim_plan.h, reachable on CPU as token_elim_vec_plan): 16-byte accesses when every
# vectorised buffer is 16-byte aligned and the row width is a multiple of 16 / elem_size, and a tx x ty block
# (tx threads along a row: the power of two covering its accesses, at most 256; ty = 256 / tx rows).


def ref_vec_plan(rows, width, elem_size, addresses):
    v = 16 // elem_size
    vec = v if all(a % 16 == 0 for a in addresses) and width % v == 0 else 1
    units = width // vec
    tx = 1
    while tx < 256 and tx < units:
        tx *= 2
    ty = 256 // tx
    return [vec, tx, ty, max(1, min(-(-rows // ty), 1 << 20)), max(1, min(-(-units // tx), 65535))]


@pytest.mark.parametrize("elem_size", [4, 2])
@pytest.mark.parametrize("width", [1, 5, 8, 12, 16, 24, 260, 4096, 11008])
@pytest.mark.parametrize("rows", [1, 7, 33000, 3_000_000])
def test_vec_plan_rule(rows, width, elem_size):
    for addresses in ([0], [0, 512], [0, 4], [16, 32, 2 * elem_size], [8, 0], [0, 0, 0, 0, 0, 0, 0], []):
        got = list(ops.token_elim_vec_plan(rows, width, elem_size, addresses))
        assert got == ref_vec_plan(rows, width, elem_size, addresses), (rows, width, elem_size, addresses)
        vec, tx, ty, gx, gy = got
        assert tx * ty == 256 and tx < 2 * max(1, width // vec)
        assert (vec > 1) == (all(a % 16 == 0 for a in addresses) and width % (16 // elem_size) == 0)
    assert list(ops.token_elim_vec_plan(33000, 1, 4, [0, 0])) == [1, 1, 256, 129, 1]      # F = 1: 256 rows a block
    assert list(ops.token_elim_vec_plan(4096, 4096, 2, [0, 0])) == [8, 256, 1, 4096, 2]   # bf16 hidden 4096
    assert list(ops.token_elim_vec_plan(4096, 4096, 2, [0, 2])) == [1, 256, 1, 4096, 16]  # one misaligned buffer


def test_vec_plan_errors():
    with pytest.raises(RuntimeError, match=r"token_elim_vec_plan: rows and width must be >= 0, got 3 and -2"):
        ops.token_elim_vec_plan(3, -2, 4, [0])
    with pytest.raises(RuntimeError, match=r"token_elim_vec_plan: at most 7 addresses"):
        ops.token_elim_vec_plan(3, 2, 4, [0] * 8)
    with pytest.raises(RuntimeError, match=r"token_elim_vec_plan: addresses must be >= 0, got -16"):
        ops.token_elim_vec_plan(3, 2, 4, [-16])


def _offset_view(shape, dtype, offset, seed):
    """A contiguous CUDA tensor of `shape` starting `offset` elements into its storage (misaligned for 1)."""
    n = math.prod(shape)
    return _randn((n + offset,), dtype, seed, device="cuda")[offset:].view(shape)


def _vec(rows, width, *tensors):
    return ops.token_elim_vec_plan(rows, width, tensors[0].element_size(), [t.data_ptr() for t in tensors])[0] > 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("op", ["token_gather", "token_scatter_add"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,K", [((2, 37, 16), 11), ((3, 20, 4, 8), 7), ((2, 9, 15), 5), ((2, 3000, 1), 2500),
                                     ((1, 600, 8), 600), ((2, 9, 4104), 4), ((2, 40, 12), 33)])
def test_cuda_vector_and_scalar_paths(op, dtype, shape, K):
    """CUDA token_gather / token_scatter_add equal the CPU kernels (a copy; one fp32 add, one rounding) on both
    sides of the vector switch (aligned x / src, and the same values at a 1-element offset), rows not a multiple
    of the vector width, F = 1 with many rows, 4-D rows, and a non-contiguous x."""
    B, L = shape[:2]
    F = math.prod(shape[2:])
    keep = make_keep(B, L, K, 5)
    vw = 16 // torch.empty(0, dtype=dtype).element_size()
    paths = set()
    for offset in (0, 1):
        x = _offset_view(shape, dtype, offset, 1)
        vec = _vec(B * K, F, x, x)
        assert vec == (offset == 0 and F % vw == 0)
        paths.add(vec)
        if op == "token_gather":
            assert torch.equal(ops.token_gather(x, keep.cuda()).cpu(), ops.token_gather(x.cpu(), keep))
        else:
            src = _offset_view((B, K, *shape[2:]), dtype, offset, 2)
            out = ops.token_scatter_add(x, src, keep.cuda())
            torch.testing.assert_close(out.cpu(), ops.token_scatter_add(x.cpu(), src.cpu(), keep), atol=0, rtol=0)
    assert paths == ({True, False} if F % vw == 0 else {False})
    xt = _randn((B, *shape[2:], L), dtype, 3, device="cuda").movedim(-1, 1)  # non-contiguous x / residual
    assert not xt.is_contiguous()
    if op == "token_gather":
        assert torch.equal(ops.token_gather(xt, keep.cuda()).cpu(), ops.token_gather(xt.cpu(), keep))
    else:
        src = _randn((B, K, *shape[2:]), dtype, 4, device="cuda")
        torch.testing.assert_close(ops.token_scatter_add(xt, src, keep.cuda()).cpu(),
                                   ops.token_scatter_add(xt.cpu(), src.cpu(), keep), atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("op", ["token_mlp_partial_save", "token_mlp_partial_save_backward"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,H,I,C", [(19, 24, 48, 16), (40, 32, 40, 13), (300, 16, 8, 1), (7, 8, 264, 256)])
def test_cuda_mlp_vector_and_scalar_paths(op, dtype, T, H, I, C):
    """The partial-save MLP's elementwise kernels (silu_mul over [T, I], gather_cols to C channels,
    silu_mul_backward over [T, C]) on CUDA against the CPU ops, with C and I multiples of the vector width and not,
    and the kept pre-activations of the backward given aligned and at a 1-element offset (scalar path)."""
    x = _randn((T, H), dtype, 1)
    wg, wu = _randn((I, H), dtype, 2, H ** -0.5), _randn((I, H), dtype, 3, H ** -0.5)
    wd = _randn((H, I), dtype, 4, I ** -0.5)
    ci = torch.randperm(I, generator=torch.Generator().manual_seed(5))[:C].sort().values
    tol = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=2e-2, rtol=2e-2),
           torch.bfloat16: dict(atol=5e-2, rtol=5e-2)}[dtype]
    if op == "token_mlp_partial_save":
        got = ops.token_mlp_partial_save(x.cuda(), wg.cuda(), wu.cuda(), wd.cuda(), C, ci.cuda())
        want = ops.token_mlp_partial_save(x, wg, wu, wd, C, ci)
        for a, b in zip(got[:3], want[:3]):
            torch.testing.assert_close(a.cpu(), b, **tol)
        return
    gy = _randn((T, H), dtype, 6)
    vw = 16 // x.element_size()
    for offset in (0, 1):
        gk, uk, ggk, guk = (_offset_view((T, C), dtype, offset, 7 + i) for i in range(4))
        assert _vec(1, T * C, gk, uk, ggk, guk) == (offset == 0 and (T * C) % vw == 0)
        for extra in ((), (ggk, guk)):
            got = ops.token_mlp_partial_save_backward(gy.cuda(), gk, uk, ci.cuda(), wg.cuda(), wu.cuda(), wd.cuda(),
                                                      *extra)
            want = ops.token_mlp_partial_save_backward(gy, gk.cpu(), uk.cpu(), ci, wg, wu, wd,
                                                       *(e.cpu() for e in extra))
            torch.testing.assert_close(got.cpu(), want, **tol)
