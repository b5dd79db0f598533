"""sparse_attn ops: every op through the shared checks (peftcore.testing) against an independent plain-torch
reference (dense attention with the explicit token mask the block mask and causal imply, in float64 by the
helper), fp32 samples at shapes that cross every tile / vector / thread / ordering branch of the CPU kernels,
both causal alignments, NaN / inf propagation against SDPA on the AVX2 and the scalar row paths, bad input in a
child process (real and fake kernels), autograd contracts, the CUDA tile planner, plus empty rows, SDPA and
FlexAttention agreement, CSR conversion and saved memory."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import peftcore  # noqa: F401
from peftcore.ops import sparse_attn as sa
from peftcore.testing import (OpCase, Sample, assert_close_to_reference, check_double_backward_refused,
                              check_errors_isolated, check_reference, devices, op_test_suite)

ops = torch.ops.peftcore
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
ALIGNS = ("top_left", "bottom_right")


# ---------------------------------------------------------------------------------------------------------------
# Plain-torch references.


def token_mask(block_mask, B, Hq, Lq, Lk, block_size, causal, causal_align="top_left"):
    """[B, Hq, Lq, Lk] bool: the token-level mask a block mask (and causal, aligned as asked) implies."""
    m = block_mask.expand(B, Hq, -1, -1)
    m = m.repeat_interleave(block_size, 2)[:, :, :Lq].repeat_interleave(block_size, 3)[..., :Lk]
    if causal:
        off = Lk - Lq if causal_align == "bottom_right" else 0
        m = m & torch.ones(Lq, Lk, dtype=torch.bool, device=m.device).tril(off)
    return m


def _stat(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked_softmax(s, m):
    """(p, lse, empty) of scores s over the visible keys m, flash style (lse = max + log sum exp(s - max)):
    NaN in a visible score gives a NaN row, a row with +inf gives NaN, a row that sees nothing (or only -inf
    scores) gives p = 0 and lse = -inf (SDPA's safe softmax)."""
    s = s.masked_fill(~m, float("-inf"))
    mx = s.amax(-1, keepdim=True)
    empty = mx == float("-inf")
    e = torch.exp(s - mx.masked_fill(empty, 0.0)).masked_fill(~m, 0.0)
    tot = e.sum(-1, keepdim=True).masked_fill(empty, 1.0)  # no log(0) / 0 in the graph: finite zero grads
    p = e / tot
    lse = (mx + torch.log(tot)).masked_fill(empty, float("-inf"))
    return p, lse.squeeze(-1), empty


def ref_attn(q, k, v, block_mask, block_size, causal=False, scale=None, causal_align="top_left",
             visible_only=False):
    """(out, lse) of dense masked attention; rows with no visible key give out 0, lse -inf (and zero grads).
    visible_only: v reaches a row only through keys it sees (no 0 x NaN from hidden keys; NaN tests)."""
    B, Hq, Lq, D = q.shape
    g = Hq // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    m = token_mask(block_mask, B, Hq, Lq, k.shape[2], block_size, causal, causal_align)
    p, lse, empty = _masked_softmax((q @ kk.transpose(-1, -2)) * scale, m)
    if visible_only:
        out = torch.where(m[..., None], p[..., None] * vv[:, :, None], 0.0).sum(-2)
    else:
        out = p @ vv
    return out.masked_fill(empty, 0.0), lse.to(_stat(q.dtype))


def ref_attn_backward(grad_out, grad_lse, q, k, v, out, lse, block_mask, block_size, causal, scale, output_mask,
                      causal_align="top_left"):
    with torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        o, l = ref_attn(qq, kk, vv, block_mask, block_size, causal, scale, causal_align)
        outs, seeds = [o], [grad_out]
        if grad_lse is not None:
            outs.append(l)
            seeds.append(grad_lse.to(l.dtype))
        grads = torch.autograd.grad(outs, (qq, kk, vv), seeds)
    return tuple(gr if want else t.new_empty(0) for gr, t, want in zip(grads, (q, k, v), output_mask))


def ref_block_pool(q, k, block_size, causal=False, scale=None, causal_align="top_left"):
    """Block max-pool of the full softmax map over the visible keys (zero padding: probabilities are >= 0; a NaN
    row is NaN where it sees a key)."""
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    kk = k.repeat_interleave(Hq // k.shape[1], 1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = (q @ kk.transpose(-1, -2)) * scale
    vis = None
    if causal:
        vis = torch.ones(Lq, Lk, dtype=torch.bool, device=s.device).tril(Lk - Lq if causal_align == "bottom_right"
                                                                         else 0)
        s = s.masked_fill(~vis, float("-inf"))
    empty = s.amax(-1, keepdim=True) == float("-inf")  # sees nothing (NaN rows are not empty)
    p = torch.softmax(s, -1)
    if vis is not None:
        p = p.masked_fill(~vis, 0.0)  # a NaN row is NaN only where it sees a key
    p = p.masked_fill(empty, 0.0)
    qb, kb = -(-Lq // block_size), -(-Lk // block_size)
    p = F.pad(p, (0, kb * block_size - Lk, 0, qb * block_size - Lq))
    return p.view(B, Hq, qb, block_size, kb, block_size).amax(dim=(3, 5)).to(_stat(q.dtype))


# ---------------------------------------------------------------------------------------------------------------
# Samples. Lengths are not block multiples, Lq != Lk, GQA and MQA, causal both ways aligned and not, broadcast
# masks, empty rows.


def _randn(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def _mask(shape, seed, p=0.5, empty_row=None):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) < p
    if empty_row is not None:
        m[..., empty_row, :] = False  # query block with no visible key
    return m


def _configs(dtype):
    """(B, Hq, Hkv, Lq, Lk, D, bs, causal, mask shape (Bm, Hm), empty query block, scale, causal_align)."""
    if dtype == torch.float64:  # gradcheck sizes
        return [(1, 2, 1, 7, 9, 4, 4, True, (1, 2), None, None, "top_left"),
                (2, 2, 2, 6, 5, 3, 4, False, (2, 1), 1, 0.7, "top_left"),
                (1, 2, 1, 9, 6, 4, 2, True, (1, 1), 2, None, "top_left"),
                (1, 2, 1, 5, 11, 3, 3, True, (1, 1), None, None, "bottom_right"),
                (1, 2, 2, 9, 4, 3, 2, True, (1, 2), None, 0.9, "bottom_right")]
    return [(2, 4, 2, 70, 70, 32, 16, True, (2, 4), None, None, "top_left"),
            (1, 4, 1, 45, 100, 16, 32, False, (1, 1), 1, 0.3, "top_left"),
            (2, 2, 2, 100, 37, 16, 16, True, (2, 1), None, None, "top_left"),
            (1, 2, 1, 33, 64, 32, 16, True, (1, 2), 0, None, "top_left"),
            (1, 4, 2, 30, 75, 16, 16, True, (1, 4), None, None, "bottom_right"),
            (1, 2, 1, 75, 30, 16, 16, True, (1, 1), None, None, "bottom_right")]


# fp32 shapes at every branch of the CPU kernels (sparse_attn_cpu.cpp), checked against the float64 reference
# (gradcheck's float64 path runs only the scalar row kernels):
# * row width n = min(bs, Lk - j0) against the AVX2 width 8: n < 8 (scalar only), n = 8k, n = 8k + tail, rows of
#   many vectors; bs > L (one partial block: tile extents min(bs, L)); partial last blocks on both axes;
# * exp underflow (scores more than 87 below the row max) with large scales; the online-softmax rescale over
#   several kept key blocks; rows that see nothing yet in a tile (bottom-right with Lq > Lk);
# * zigzag task order with Qb / Kb odd and even (>= 3); one task in all (B x H x Qb = 1 < threads) and many;
# * causal: the fully-visible-tile early return, the first hidden column, key_blocks_end, the dK / dV query-block
#   start and skip (Lq = 4 bs + 1: a last query block whose last row is exactly a key block's first key), both
#   alignments with positive and negative offsets;
# * GQA / MQA, every mask broadcast, empty query blocks, D from 8 to 128 (BLAS tile sizes).
TILE_CONFIGS = [
    (1, 1, 1, 150, 150, 64, 64, True, (1, 1), None, None, "top_left"),
    (2, 4, 2, 65, 100, 128, 16, True, (2, 4), None, None, "top_left"),
    (1, 2, 2, 40, 130, 24, 40, True, (1, 1), None, None, "bottom_right"),
    (1, 2, 1, 130, 50, 16, 32, True, (1, 2), None, None, "bottom_right"),
    (1, 3, 3, 90, 90, 8, 5, False, (1, 3), 2, 5.0, "top_left"),
    (2, 2, 1, 300, 300, 32, 100, False, (1, 1), None, 1.0, "top_left"),
    (1, 2, 2, 20, 37, 16, 1000, True, (1, 1), None, None, "top_left"),
    (1, 1, 1, 67, 67, 256, 24, True, (1, 1), None, 0.2, "bottom_right"),
]
# Scores spread over more than 87 (exp underflow in the AVX2 rows, n >= 8). Forward and pool only: at |s| ~ 50-100
# fp32 rounding of the scores (~|s| ulps) dominates the gradients' error, which then exceeds the per-element
# bound for reasons unrelated to the kernels (the exp / row paths under test are forward-side).
UNDERFLOW_CONFIGS = [
    (2, 2, 1, 300, 300, 32, 100, False, (1, 1), None, 4.0, "top_left"),
    (1, 2, 2, 70, 130, 16, 40, True, (1, 2), None, 6.0, "bottom_right"),
]


def _cuda_d(D):
    """The CUDA kernels take D in {64, 128, 256}."""
    return D if D in (64, 128, 256) else (64 if D <= 16 else 128)


def _attn_samples(configs, device, dtype, seed0=0):
    for i, (B, Hq, Hkv, Lq, Lk, D, bs, causal, (mb, mh), empty, scale, align) in enumerate(configs):
        if device == "cuda":
            D = _cuda_d(D)
        i += seed0
        q = _randn((B, Hq, Lq, D), dtype, 10 + i).to(device)
        k = _randn((B, Hkv, Lk, D), dtype, 20 + i).to(device)
        v = _randn((B, Hkv, Lk, D), dtype, 30 + i).to(device)
        m = _mask((mb, mh, -(-Lq // bs), -(-Lk // bs)), 40 + i, empty_row=empty).to(device)
        yield Sample((q, k, v, m, bs, causal, scale, align),
                     name=f"B{B} H{Hq}/{Hkv} L{Lq}x{Lk} D{D} bs{bs} causal={causal} {align} mask{(mb, mh)} "
                          f"empty={empty} scale={scale}")


def _backward_samples(fwd_samples, device, dtype):
    for j, s in enumerate(fwd_samples):
        q, k, v, m, bs, causal, scale, align = s.args
        out, lse = ops.block_sparse_attn(q, k, v, m, bs, causal, scale, align)
        go = _randn(q.shape, dtype, 50 + j).to(device)
        glse = _randn(lse.shape, lse.dtype, 60 + j).to(device) if j % 2 == 0 else None
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            yield Sample((go, glse, q, k, v, out, lse, m, bs, causal, scale, mask, align),
                         name=f"{s.name}/glse={glse is not None}/{mask}")
            if dtype == torch.float64:
                break


def attn_samples(device, dtype, requires_grad):
    return _attn_samples(_configs(dtype), device, dtype)


def attn_backward_samples(device, dtype, requires_grad):
    return _backward_samples(attn_samples(device, dtype, False), device, dtype)


def pool_samples(device, dtype, requires_grad):
    for s in attn_samples(device, dtype, False):
        q, k, v, m, bs, causal, scale, align = s.args
        yield Sample((q, k, bs, causal, scale, align), name=s.name)


def tile_samples(device, dtype, requires_grad):
    return _attn_samples(TILE_CONFIGS, device, dtype, seed0=100)


def underflow_samples(device, dtype, requires_grad):
    return _attn_samples(UNDERFLOW_CONFIGS, device, dtype, seed0=200)


def underflow_pool_samples(device, dtype, requires_grad):
    for s in underflow_samples(device, dtype, False):
        q, k, v, m, bs, causal, scale, align = s.args
        yield Sample((q, k, bs, causal, scale, align), name=s.name)


def tile_backward_samples(device, dtype, requires_grad):
    # one output mask per shape is enough here: the dq / dkdv split is covered by the base samples
    for s in _backward_samples(tile_samples(device, dtype, False), device, dtype):
        if s.args[11] == [True, True, True]:
            yield s


def tile_pool_samples(device, dtype, requires_grad):
    for s in tile_samples(device, dtype, False):
        q, k, v, m, bs, causal, scale, align = s.args
        yield Sample((q, k, bs, causal, scale, align), name=s.name)


CASES = [
    # NaN / inf: SDPA's rule for what a row sees, skipped blocks never read (the reference multiplies them by 0);
    # tested by the NaN tests below.
    OpCase("block_sparse_attn", ops.block_sparse_attn, attn_samples, ref_attn, ALL_DTYPES, grad_args=(0, 1, 2),
           nonfinite="off"),
    OpCase("block_sparse_attn_backward", ops.block_sparse_attn_backward, attn_backward_samples, ref_attn_backward,
           ALL_DTYPES),
    OpCase("attn_block_pool", ops.attn_block_pool, pool_samples, ref_block_pool, ALL_DTYPES),
]

test_opcheck, test_reference, test_gradcheck, test_compile = op_test_suite(CASES)

# The flash backward (P recomputed per tile from lse, Delta = dO . O from the rounded forward output) sums up to
# 300 keys x 2 heads per gradient row in another order than autograd's softmax backward: at these lengths its
# fp32 error reaches ~2e-5 of the gradient's rms on the scalar / ATen path (measured; 4x the default floor),
# still 1000x below what a wrong tile or branch gives.
_TILE_GRAD_TOL = {torch.float32: dict(atol=4e-5, rtol=2e-5)}
# The forward's NaN / inf rule is tested by the NaN tests below, not by planting (as for CASES: the dense reference
# multiplies skipped blocks by 0).
TILE_CASES = [
    OpCase("block_sparse_attn_tiles", ops.block_sparse_attn, tile_samples, ref_attn, (torch.float32,),
           grad_args=(0, 1, 2), tol=_TILE_GRAD_TOL, nonfinite="off"),
    OpCase("block_sparse_attn_backward_tiles", ops.block_sparse_attn_backward, tile_backward_samples,
           ref_attn_backward, (torch.float32,), tol=_TILE_GRAD_TOL),
    OpCase("attn_block_pool_tiles", ops.attn_block_pool, tile_pool_samples, ref_block_pool, (torch.float32,)),
    OpCase("block_sparse_attn_underflow", ops.block_sparse_attn, underflow_samples, ref_attn, (torch.float32,),
           nonfinite="off"),
    OpCase("attn_block_pool_underflow", ops.attn_block_pool, underflow_pool_samples, ref_block_pool,
           (torch.float32,)),
]


@pytest.mark.parametrize("case", TILE_CASES, ids=str)
def test_tile_crossing_shapes_fp32(case):
    """fp32 forward, gradients and backward op against the float64 reference at every CPU kernel branch."""
    check_reference(case, "cpu")


# ---------------------------------------------------------------------------------------------------------------
# Semantics beyond the reference.


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_rows_without_keys_give_zero_and_neg_inf(dtype):
    """An all-false block-mask row: out exactly 0, lse -inf, no NaN anywhere, zero gradient for those queries."""
    B, H, L, D, bs = 1, 2, 40, 8, 16
    q, k, v = (_randn((B, H, L, D), dtype, s).requires_grad_(True) for s in (1, 2, 3))
    m = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    m[..., 1, :] = False
    out, lse = ops.block_sparse_attn(q, k, v, m, bs, False, None)
    assert torch.equal(out[:, :, 16:32], torch.zeros_like(out[:, :, 16:32]))
    assert torch.isneginf(lse[:, :, 16:32]).all() and torch.isfinite(lse[:, :, :16]).all()
    assert torch.isfinite(out).all()
    (out.float().square().sum() + lse[:, :, :16].sum()).backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, 16:32], torch.zeros_like(q.grad[:, :, 16:32]))
    # No key at all (Lk = 0): every row empty.
    out0, lse0 = ops.block_sparse_attn(q.detach(), k.detach()[:, :, :0], v.detach()[:, :, :0],
                                       torch.ones(1, 1, 3, 0, dtype=torch.bool), bs, True, None)
    assert torch.equal(out0, torch.zeros_like(out0)) and torch.isneginf(lse0).all()


@pytest.mark.parametrize("Lq,Lk", [(50, 50), (37, 80), (80, 37)])
@pytest.mark.parametrize("causal", [False, True])
def test_full_mask_matches_sdpa(Lq, Lk, causal):
    """Every block kept: F.scaled_dot_product_attention (is_causal top-left aligned for Lq != Lk), GQA included."""
    q = _randn((2, 4, Lq, 16), torch.float32, 1)
    k = _randn((2, 2, Lk, 16), torch.float32, 2)
    v = _randn((2, 2, Lk, 16), torch.float32, 3)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=causal)
    for bs in (16, 1000):  # a block size beyond both lengths: one block per axis
        out = sa.block_sparse_attn(q, k, v, None, bs, causal)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_csr_round_trip_and_wrapper_forms():
    m = _mask((2, 3, 5, 7), 0)
    m[0, 0, 2] = False
    m[1, 2, 4] = True
    num, idx = sa.dense_to_csr(m)
    assert num.dtype == torch.int32 and idx.dtype == torch.int32 and idx.shape == m.shape
    assert torch.equal(sa.csr_to_dense(num, idx), m)
    # the kept blocks come first, ascending
    for b, h, i in [(0, 1, 3), (1, 2, 4)]:
        n = int(num[b, h, i])
        assert torch.equal(idx[b, h, i, :n].long(), m[b, h, i].nonzero().flatten())
    q, k, v = _randn((2, 3, 70, 8), torch.float32, 1), _randn((2, 3, 100, 8), torch.float32, 2), \
        _randn((2, 3, 100, 8), torch.float32, 3)
    dense = sa.block_sparse_attn(q, k, v, m, 16, True)
    csr = sa.block_sparse_attn(q, k, v, (num, idx), 16, True)
    assert torch.equal(dense, csr)


def test_flex_block_mask_conversion_and_agreement():
    """create_block_mask's CSR (partial + full blocks) converts to the dense block mask; with a block-aligned
    mask_mod the op equals flex_attention on the same BlockMask."""
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    B, H, L, D, bs = 1, 2, 256, 16, 128  # FlexAttention's default block size
    band = lambda b, h, qi, ki: ((qi // bs) - (ki // bs)).abs() == 0  # noqa: E731
    try:
        bm = fa.create_block_mask(band, B, H, L, L, device="cpu", BLOCK_SIZE=bs)
    except Exception as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"create_block_mask unavailable on CPU: {e}")
    want = torch.eye(L // bs, dtype=torch.bool).expand(B, H, -1, -1)
    assert torch.equal(sa.block_mask_from_flex(bm), want)
    bs2 = 32
    band2 = lambda b, h, qi, ki: ((qi // bs2) - (ki // bs2)).abs() <= 1  # noqa: E731
    bm2 = fa.create_block_mask(band2, B, H, 200, 170, device="cpu", BLOCK_SIZE=bs2)
    tok = torch.stack([torch.stack([band2(0, 0, torch.arange(200)[:, None], torch.arange(170)[None, :])])])
    want2 = F.pad(tok, (0, 192 - 170, 0, 224 - 200)).view(1, 1, 7, bs2, 6, bs2).any(5).any(3).expand(B, H, -1, -1)
    assert torch.equal(sa.block_mask_from_flex(bm2), want2)
    num, idx = sa.dense_to_csr(want2.contiguous())
    assert torch.equal(sa.csr_to_dense(bm2.kv_num_blocks, bm2.kv_indices, 6) |
                       sa.csr_to_dense(bm2.full_kv_num_blocks, bm2.full_kv_indices, 6), sa.csr_to_dense(num, idx))
    q, k, v = (_randn((B, H, L, D), torch.float32, s) for s in (1, 2, 3))
    out = sa.block_sparse_attn(q, k, v, bm)
    try:
        ref = fa.flex_attention(q, k, v, block_mask=bm)
    except Exception as e:  # pragma: no cover
        pytest.skip(f"flex_attention does not run on CPU here: {e}")
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_backward_saves_no_score_sized_tensor():
    B, H, L, D, bs = 1, 2, 128, 8, 16
    q, k, v = (_randn((B, H, L, D), torch.float32, s).requires_grad_(True) for s in (1, 2, 3))
    m = _mask((1, 1, L // bs, L // bs), 5)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out, lse = ops.block_sparse_attn(q, k, v, m, bs, True, None)
    assert saved, "nothing saved: the hook did not see the graph"
    assert max(math.prod(s) for s in saved) <= B * H * L * D < L * L, saved
    assert sorted(saved) == sorted([tuple(q.shape)] * 4 + [tuple(lse.shape), tuple(m.shape)])


def _err(fn, match):
    with pytest.raises(RuntimeError, match=match):
        fn()


def test_block_pool_is_max_of_softmax_and_skips_nothing():
    """Rows of the pooled map: every query block's maxima are <= 1, the diagonal block under causal is positive,
    blocks above it are 0 (independent of the reference's padding trick)."""
    q, k = _randn((1, 2, 64, 16), torch.float32, 1, 3.0), _randn((1, 2, 64, 16), torch.float32, 2)
    pool = ops.attn_block_pool(q, k, 16, True, None)
    assert pool.dtype == torch.float32 and pool.shape == (1, 2, 4, 4)
    assert torch.equal(pool.triu(1), torch.zeros_like(pool))
    assert (pool.diagonal(dim1=2, dim2=3) > 0).all() and (pool <= 1 + 1e-6).all()
    assert torch.allclose(pool[..., 0, 0], torch.ones(1, 2))  # query 0 sees only key 0


@pytest.mark.parametrize("device", [d for d in devices() if not isinstance(d, str)])
def test_cuda_limits_and_graph_capture(device):
    """CUDA: head dims outside {64, 128, 256} and float64 are refused with the op's name; the forward and backward
    are free of host syncs (captured in a CUDA graph and replayed)."""
    q = torch.randn(1, 2, 40, 32, device=device)
    m = torch.ones(1, 1, 3, 3, dtype=torch.bool, device=device)
    _err(lambda: ops.block_sparse_attn(q, q, q, m, 16, False, None),
         r"block_sparse_attn: head dim must be 64, 128 or 256 on CUDA, got 32")
    _err(lambda: ops.attn_block_pool(q.double(), q.double(), 16, False, None), r"attn_block_pool: q must be float32")
    q, k, v = (torch.randn(1, 2, 40, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    out, lse = ops.block_sparse_attn(q, k, v, m, 16, True, None)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.block_sparse_attn(q, k, v, m, 16, True, None)  # warm-up (smem attributes) outside the capture
        with torch.cuda.graph(graph, stream=s):
            o2, l2 = ops.block_sparse_attn(q, k, v, m, 16, True, None)
            g = ops.block_sparse_attn_backward(o2, None, q, k, v, o2, l2, m, 16, True, None, [True, True, True])
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(o2, out)
    assert all(torch.isfinite(t).all() for t in g)


def test_compile_inductor_training_step():
    """The wrapper through the default (inductor) backend, forward and backward, fullgraph, GQA + causal."""
    import torch._dynamo

    torch._dynamo.reset()
    q = _randn((1, 4, 70, 16), torch.float32, 1).requires_grad_(True)
    k, v = (_randn((1, 2, 70, 16), torch.float32, s).requires_grad_(True) for s in (2, 3))
    m = _mask((1, 4, 5, 5), 4)

    def step(q, k, v):
        return (sa.block_sparse_attn(q, k, v, m, 16, True) ** 2).sum()

    y = torch.compile(step, fullgraph=True)(q, k, v)
    got = torch.autograd.grad(y, (q, k, v))
    ref = step(q, k, v)
    want = torch.autograd.grad(ref, (q, k, v))
    torch.testing.assert_close(y, ref)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Bad input: every op, the backward op called directly with hostile arguments, in a child process (a crash is a
# failing case), on the real kernels (cpu) and on the fake kernels (meta) with the same messages.

_BAD_PRELUDE = """
def O(x):  # the same tensor's shape and dtype on the other device
    return torch.empty_like(x, device=other)
def T(*shape, dt=torch.float32, on=None):
    return torch.randn(*shape).to(dt).to(on or dev)
q, k, v = T(1, 4, 20, 8), T(1, 2, 20, 8), T(1, 2, 20, 8)
m = torch.ones(1, 1, 2, 2, dtype=torch.bool, device=dev)
out, lse, go = T(1, 4, 20, 8), torch.zeros(1, 4, 20, device=dev), T(1, 4, 20, 8)
A, Bw, P = ops.block_sparse_attn, ops.block_sparse_attn_backward, ops.attn_block_pool
def bw(**kw):
    a = dict(grad_out=go, grad_lse=None, q=q, k=k, v=v, out=out, lse=lse, block_mask=m, block_size=16, causal=False,
             scale=None, output_mask=[True, True, True])
    a.update(kw)
    return Bw(**a)
"""

_ATTN = "block_sparse_attn"
_BWD = "block_sparse_attn_backward"
_POOL = "attn_block_pool"


def _bad_cases(other):
    """(name, code, pattern); O(x) is x on another device (the prelude's `other`)."""
    f, b, p = f"{_ATTN}: ", f"{_BWD}: ", f"{_POOL}: "
    cases = [
        # forward: dtypes, ranks, shapes, devices, GQA, block_size, mask, scale, alignment
        ("fwd q int", "A(q.int(), k.int(), v.int(), m, 16)", f + r"q must be float32, float16, bfloat16 or float64, got Int"),
        ("fwd q 3-D", "A(q[0], k, v, m, 16)", f + r"q must be 4-D, got shape \[4, 20, 8\]"),
        ("fwd k 5-D", "A(q, k[None], v, m, 16)", f + r"k must be 4-D, got shape \[1, 1, 2, 20, 8\]"),
        ("fwd k int", "A(q, k.int(), v, m, 16)", f + r"k must be float32.*got Int"),
        ("fwd k half", "A(q, k.half(), v, m, 16)", f + r"k has dtype Half but q has Float"),
        ("fwd k double", "A(q, k.double(), v, m, 16)", f + r"k has dtype Double but q has Float"),
        ("fwd k device", f"A(q, O(k), v, m, 16)", f + r"k is on .* but q is on"),
        ("fwd k batch", "A(q, T(2, 2, 20, 8), T(2, 2, 20, 8), m, 16)", f + r"k must have batch size 1"),
        ("fwd k head dim", "A(q, k[..., :4], v[..., :4], m, 16)", f + r"k must have head dim 8 .*got k of shape \[1, 2, 20, 4\]"),
        ("fwd gqa 4/3", "A(q, T(1, 3, 20, 8), T(1, 3, 20, 8), m, 16)", f + r"the query heads must be a multiple of the key/value heads \(Hq % Hkv == 0\), got Hq = 4 and Hkv = 3"),
        ("fwd gqa 4/0", "A(q, T(1, 0, 20, 8), T(1, 0, 20, 8), m, 16)", f + r"the query heads must be a multiple of the key/value heads.*got Hq = 4 and Hkv = 0"),
        ("fwd gqa 4/8", "A(q, T(1, 8, 20, 8), T(1, 8, 20, 8), m, 16)", f + r"the query heads must be a multiple of the key/value heads.*got Hq = 4 and Hkv = 8"),
        ("fwd head dim 0", "A(T(1, 4, 20, 0), T(1, 2, 20, 0), T(1, 2, 20, 0), m, 16)", f + r"head dim must be >= 1"),
        ("fwd block_size 0", "A(q, k, v, m, 0)", f + r"block_size must be > 0, got 0"),
        ("fwd block_size -5", "A(q, k, v, m, -5)", f + r"block_size must be > 0, got -5"),
        ("fwd v int", "A(q, k, v.int(), m, 16)", f + r"v must be float32.*got Int"),
        ("fwd v half", "A(q, k, v.half(), m, 16)", f + r"v has dtype Half but q has Float"),
        ("fwd v device", f"A(q, k, O(v), m, 16)", f + r"v is on .* but q is on"),
        ("fwd v shape", "A(q, k, v[:, :, :10], m, 16)", f + r"v must have k's shape \[1, 2, 20, 8\], got \[1, 2, 10, 8\]"),
        ("fwd v heads", "A(q, k, T(1, 1, 20, 8), m, 16)", f + r"v must have k's shape"),
        ("fwd mask int", "A(q, k, v, m.int(), 16)", f + r"block_mask must be bool, got Int"),
        ("fwd mask float", "A(q, k, v, m.float(), 16)", f + r"block_mask must be bool, got Float"),
        ("fwd mask device", f"A(q, k, v, O(m), 16)", f + r"block_mask is on .* but q is on"),
        ("fwd mask 3-D", "A(q, k, v, m[0], 16)", f + r"block_mask must have shape \[1 or 1, 4 or 1, 2, 2\].*got \[1, 2, 2\]"),
        ("fwd mask Kb", "A(q, k, v, torch.ones(1, 1, 2, 3, dtype=torch.bool, device=dev), 16)", f + r"block_mask must have shape .*got \[1, 1, 2, 3\]"),
        ("fwd mask Qb", "A(q, k, v, torch.ones(1, 1, 1, 2, dtype=torch.bool, device=dev), 16)", f + r"block_mask must have shape .*got \[1, 1, 1, 2\]"),
        ("fwd mask heads", "A(q, k, v, torch.ones(1, 2, 2, 2, dtype=torch.bool, device=dev), 16)", f + r"block_mask must have shape .*got \[1, 2, 2, 2\]"),
        ("fwd mask batch", "A(q, k, v, torch.ones(3, 1, 2, 2, dtype=torch.bool, device=dev), 16)", f + r"block_mask must have shape .*got \[3, 1, 2, 2\]"),
        ("fwd mask for bs 8", "A(q, k, v, m, 8)", f + r"block_mask must have shape \[1 or 1, 4 or 1, 3, 3\]"),
        ("fwd scale nan", "A(q, k, v, m, 16, False, float('nan'))", f + r"scale must be finite, got nan"),
        ("fwd scale inf", "A(q, k, v, m, 16, True, float('inf'))", f + r"scale must be finite, got inf"),
        ("fwd align typo", "A(q, k, v, m, 16, True, None, 'bottom-right')", f + r'causal_align must be "top_left" or "bottom_right", got "bottom-right"'),
        ("fwd align empty", "A(q, k, v, m, 16, False, None, '')", f + r"causal_align must be"),
        # backward op called directly
        ("bwd grad_out shape", "bw(grad_out=go[:, :, :5])", b + r"grad_out must have q's shape \[1, 4, 20, 8\], got \[1, 4, 5, 8\]"),
        ("bwd grad_out dtype", "bw(grad_out=go.double())", b + r"grad_out has dtype Double but q has Float"),
        ("bwd grad_out device", f"bw(grad_out=O(go))", b + r"grad_out is on .* but q is on"),
        ("bwd grad_out 3-D", "bw(grad_out=go[0])", b + r"grad_out must have q's shape"),
        ("bwd out shape", "bw(out=out[..., :4])", b + r"out must have q's shape \[1, 4, 20, 8\], got \[1, 4, 20, 4\]"),
        ("bwd out dtype", "bw(out=out.half())", b + r"out has dtype Half but q has Float"),
        ("bwd out device", f"bw(out=O(out))", b + r"out is on .* but q is on"),
        ("bwd lse dtype", "bw(lse=lse.double())", b + r"lse must be Float for q of dtype Float, got Double"),
        ("bwd lse half", "bw(lse=lse.half())", b + r"lse must be Float for q of dtype Float, got Half"),
        ("bwd lse short", "bw(lse=lse[:, :, :19])", b + r"lse must have shape \[1, 4, 20\], got \[1, 4, 19\]"),
        ("bwd lse 4-D", "bw(lse=lse[..., None])", b + r"lse must have shape \[1, 4, 20\], got \[1, 4, 20, 1\]"),
        ("bwd lse device", f"bw(lse=O(lse))", b + r"lse is on .* but q is on"),
        ("bwd grad_lse dtype", "bw(grad_lse=lse.double())", b + r"grad_lse must be Float .*got Double"),
        ("bwd grad_lse shape", "bw(grad_lse=lse[:, :2])", b + r"grad_lse must have shape \[1, 4, 20\], got \[1, 2, 20\]"),
        ("bwd grad_lse device", f"bw(grad_lse=O(lse))", b + r"grad_lse is on .* but q is on"),
        ("bwd mask shape", "bw(block_mask=torch.ones(1, 1, 3, 2, dtype=torch.bool, device=dev))", b + r"block_mask must have shape .*got \[1, 1, 3, 2\]"),
        ("bwd mask int", "bw(block_mask=m.long())", b + r"block_mask must be bool, got Long"),
        ("bwd mask for bs 4", "bw(block_size=4)", b + r"block_mask must have shape \[1 or 1, 4 or 1, 5, 5\]"),
        ("bwd block_size 0", "bw(block_size=0)", b + r"block_size must be > 0, got 0"),
        ("bwd block_size -1", "bw(block_size=-1)", b + r"block_size must be > 0, got -1"),
        ("bwd gqa", "bw(k=T(1, 3, 20, 8), v=T(1, 3, 20, 8))", b + r"the query heads must be a multiple of the key/value heads.*got Hq = 4 and Hkv = 3"),
        ("bwd v shape", "bw(v=v[:, :, :7])", b + r"v must have k's shape"),
        ("bwd k len vs mask", "bw(k=T(1, 2, 40, 8), v=T(1, 2, 40, 8))", b + r"block_mask must have shape .*3\]"),
        ("bwd q int", "bw(q=q.int())", b + r"q must be float32.*got Int"),
        ("bwd k dtype", "bw(k=k.half())", b + r"k has dtype Half but q has Float"),
        ("bwd q 3-D", "bw(q=q[0])", b + r"q must be 4-D"),
        ("bwd scale nan", "bw(scale=float('nan'))", b + r"scale must be finite, got nan"),
        ("bwd scale -inf", "bw(scale=float('-inf'))", b + r"scale must be finite, got -inf"),
        ("bwd align", "bw(causal=True, causal_align='bottom')", b + r'causal_align must be "top_left" or "bottom_right", got "bottom"'),
        # attn_block_pool
        ("pool block_size 0", "P(q, k, 0)", p + r"block_size must be > 0, got 0"),
        ("pool block_size -1", "P(q, k, -1, False, None)", p + r"block_size must be > 0, got -1"),
        ("pool q int", "P(q.int(), k.int(), 16)", p + r"q must be float32.*got Int"),
        ("pool k half", "P(q, k.half(), 16)", p + r"k has dtype Half but q has Float"),
        ("pool k device", f"P(q, O(k), 16)", p + r"k is on .* but q is on"),
        ("pool q 3-D", "P(q[0], k, 16)", p + r"q must be 4-D"),
        ("pool gqa", "P(q, T(1, 3, 20, 8), 16)", p + r"the query heads must be a multiple of the key/value heads.*got Hq = 4 and Hkv = 3"),
        ("pool head dim", "P(q, k[..., :3], 16)", p + r"k must have head dim 8"),
        ("pool batch", "P(q, T(3, 2, 20, 8), 16)", p + r"k must have batch size 1"),
        ("pool scale nan", "P(q, k, 16, True, float('nan'))", p + r"scale must be finite, got nan"),
        ("pool align", "P(q, k, 16, True, None, 'TOP_LEFT')", p + r'causal_align must be .*got "TOP_LEFT"'),
    ]
    return cases


def test_bad_inputs_real_kernels_isolated():
    check_errors_isolated(_bad_cases("meta"), prelude="dev, other = 'cpu', 'meta'\n" + _BAD_PRELUDE)


def test_bad_inputs_fake_kernels_isolated():
    """The fake kernels (meta tensors) refuse the same input with the same message."""
    check_errors_isolated(_bad_cases("cpu"), prelude="dev, other = 'meta', 'cpu'\n" + _BAD_PRELUDE)


def test_bad_inputs_under_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = torch.randn(1, 4, 20, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    m = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    with FakeTensorMode() as mode:
        fq, fk, fv, fm = (mode.from_tensor(t) for t in (q, k, v, m))
        out, lse = ops.block_sparse_attn(fq, fk, fv, fm, 16, True, None, "bottom_right")
        assert out.shape == q.shape and lse.dtype == torch.float32
        _err(lambda: ops.block_sparse_attn(fq, fk, fv, fm, 8, False, None), r"block_sparse_attn: block_mask must")
        _err(lambda: ops.block_sparse_attn_backward(out, lse.double(), fq, fk, fv, out, lse, fm, 16, False, None,
                                                    [True] * 3), r"block_sparse_attn_backward: grad_lse must be Float")
        _err(lambda: ops.attn_block_pool(fq, fk, 16, True, None, "x"), r"attn_block_pool: causal_align must")


def test_extreme_but_valid_inputs_do_not_crash():
    """Huge block_size, empty axes, zero heads: valid, must run (child process: a crash fails the case)."""
    ok = "OK-no-error"
    prelude = "dev, other = 'cpu', 'meta'\n" + _BAD_PRELUDE + f"""
def done(*ts):
    for t in ts:
        assert not (isinstance(t, torch.Tensor) and t.is_floating_point() and torch.isnan(t).any())
    raise RuntimeError({ok!r})
"""
    big = 2 ** 62
    cases = [
        ("huge block_size fwd", f"o, l = A(q, k, v, torch.ones(1, 1, 1, 1, dtype=torch.bool), {big}, True); done(o, l)"),
        ("huge block_size bwd", f"o, l = A(q, k, v, torch.ones(1, 1, 1, 1, dtype=torch.bool), {big}, True); "
                                f"done(*Bw(go, l, q, k, v, o, l, torch.ones(1, 1, 1, 1, dtype=torch.bool), {big}, True, None, [True] * 3))"),
        ("huge block_size pool", f"done(P(q, k, {big}, True, None, 'bottom_right'))"),
        ("Lq 0", "e = T(1, 4, 0, 8); o, l = A(e, k, v, torch.ones(1, 1, 0, 2, dtype=torch.bool), 16, True); "
                 "done(o, l, *Bw(e, None, e, k, v, o, l, torch.ones(1, 1, 0, 2, dtype=torch.bool), 16, True, None, [True] * 3))"),
        ("Lk 0 bottom_right", "e = T(1, 2, 0, 8); o, l = A(q, e, e, torch.ones(1, 1, 2, 0, dtype=torch.bool), 16, True, None, "
                              "'bottom_right'); assert (o == 0).all() and torch.isneginf(l).all(); "
                              "done(o, *Bw(go, None, q, e, e, o, l, torch.ones(1, 1, 2, 0, dtype=torch.bool), 16, True, None, [True] * 3, 'bottom_right'))"),
        ("B 0", "e = T(0, 4, 20, 8); f = T(0, 2, 20, 8); o, l = A(e, f, f, m, 16); done(o, l, P(e, f, 16))"),
        ("Hq 0", "e = T(1, 0, 20, 8); o, l = A(e, k, v, m, 16); done(o, l, P(e, k, 16), *Bw(e, None, e, k, v, o, l, m, 16, False, None, [True] * 3))"),
        ("bs 1", "o, l = A(q, k, v, torch.ones(1, 1, 20, 20, dtype=torch.bool), 1, True, None, 'bottom_right'); done(o, l)"),
        ("Lq >> Lk bottom_right", "qq = T(1, 4, 50, 8); o, l = A(qq, k, v, torch.ones(1, 1, 4, 2, dtype=torch.bool), 16, True, None, "
                                  "'bottom_right'); assert (o[:, :, :30] == 0).all() and torch.isneginf(l[:, :, :30]).all(); done(o)"),
    ]
    check_errors_isolated([(n, c, ok) for n, c in cases], prelude=prelude)


def test_tile_plan_op_errors():
    _err(lambda: ops.sparse_attn_tile_plan(48, 100000), r"sparse_attn_tile_plan: head dim must be 64, 128 or 256, got 48")
    _err(lambda: ops.sparse_attn_tile_plan(64, -1), r"sparse_attn_tile_plan: smem_limit must be >= 0, got -1")


# ---------------------------------------------------------------------------------------------------------------
# Autograd contracts.


def test_double_backward_is_refused():
    args = next(iter(attn_samples("cpu", torch.float64, False))).args
    check_double_backward_refused(ops.block_sparse_attn, args, (0, 1, 2), "block_sparse_attn")
    # also through the wrapper, bottom-right, float32
    q, k, v = (_randn((1, 2, 9, 4), torch.float32, s) for s in (1, 2, 3))
    check_double_backward_refused(lambda q, k, v: sa.block_sparse_attn(q, k, v, None, 4, True,
                                                                       causal_align="bottom_right"),
                                  (q, k, v), (0, 1, 2), "block_sparse_attn")


def test_first_backward_with_create_graph_still_works():
    q, k, v = (_randn((1, 2, 9, 4), torch.float64, s).requires_grad_(True) for s in (1, 2, 3))
    out = sa.block_sparse_attn(q, k, v, None, 4, True)
    g = torch.autograd.grad(out.sum(), (q, k, v), create_graph=True)
    ref = torch.autograd.grad(ref_attn(q, k, v, torch.ones(1, 1, 3, 3, dtype=torch.bool), 4, True)[0].sum(), (q, k, v))
    for a, b in zip(g, ref):
        torch.testing.assert_close(a.detach(), b)


def test_block_pool_output_does_not_require_grad():
    q, k = (_randn((1, 2, 20, 8), torch.float32, s).requires_grad_(True) for s in (1, 2))
    pool = ops.attn_block_pool(q, k, 8, True, None)
    assert not pool.requires_grad and pool.grad_fn is None
    assert not sa.attn_block_pool(q, k, 8, True, causal_align="bottom_right").requires_grad
    out, lse = ops.block_sparse_attn(q, k, k, torch.ones(1, 1, 3, 3, dtype=torch.bool), 8, True, None)
    assert out.requires_grad and lse.requires_grad
    with torch.no_grad():
        assert not ops.attn_block_pool(q, k, 8, False, None).requires_grad


# ---------------------------------------------------------------------------------------------------------------
# NaN / inf propagate as in F.scaled_dot_product_attention (per dtype, narrow rows n < 8 and wide rows n > 8 with a
# tail, in this process: the AVX2 row kernels where the CPU has them; test_scalar_and_aten_paths reruns these with
# the scalar row kernels and ATen GEMMs).


def _sdpa(q, k, v, causal=False, mask=None):
    """SDPA's math backend: the reference semantics (torch 2.14's CPU flash backend returns 0 for a NaN query row,
    the very bug this family had)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = q.shape[1] // k.shape[1]
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                              attn_mask=mask, is_causal=causal)


def _same_nan(a, b, what):
    assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{what}: NaN pattern {torch.isnan(a).sum()} vs " \
                                                        f"{torch.isnan(b).sum()}"


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("L,bs", [(7, 7), (21, 7), (90, 45), (130, 64)], ids=["narrow", "narrow3", "wide", "wide2"])
def test_nan_inf_propagate_like_sdpa(dtype, L, bs):
    """NaN in one key (k or v), NaN / +inf / -inf in one query row, against SDPA (dense, every block kept) and the
    float64 reference, out and lse."""
    B, Hq, Hkv, D = 1, 4, 2, 16
    full = torch.ones(1, 1, -(-L // bs), -(-L // bs), dtype=torch.bool)
    base = [_randn((B, h, L, D), dtype, s) for h, s in ((Hq, 1), (Hkv, 2), (Hkv, 3))]
    j, i = L // 2, L // 3
    cases = {
        "nan key k": (1, (0, 1, j, 3), float("nan")),
        "inf key k": (1, (0, 0, j, 0), float("inf")),
        "nan key v": (2, (0, 1, j, 5), float("nan")),
        "inf key v": (2, (0, 0, j, 2), float("inf")),
        "nan query": (0, (0, 2, i, 7), float("nan")),
        "inf query": (0, (0, 3, i, 0), float("inf")),
        "-inf query": (0, (0, 0, i, 1), float("-inf")),
    }
    for name, (which, idx, val) in cases.items():
        t = [x.clone() for x in base]
        t[which][idx] = val
        q, k, v = t
        out, lse = ops.block_sparse_attn(q, k, v, full, bs, False, None)
        want = _sdpa(q, k, v)
        _same_nan(out, want, f"{name} {dtype} vs SDPA")
        assert not torch.isfinite(out).all(), f"{name}: nothing propagated"
        assert torch.equal(torch.isinf(out), torch.isinf(want)), f"{name}: inf pattern differs from SDPA"
        ro, rl = ref_attn(*(x.double() for x in (q, k, v)), full, bs, visible_only=True)
        rlo = ref_attn(q, k, v, full, bs)[0] if dtype != torch.float64 else None
        assert_close_to_reference(out, ro, rlo, dtype, f"{name} {dtype} out")
        if which != 2:  # v does not enter lse
            assert torch.equal(torch.isnan(lse), torch.isnan(out).any(-1)), f"{name}: lse NaN exactly on NaN rows"
        fin = torch.isfinite(want)
        tol = {torch.float64: 1e-10, torch.float32: 2e-5}.get(dtype, 3e-2)
        torch.testing.assert_close(out[fin].double(), want[fin].double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("align", ALIGNS)
def test_nan_reaches_only_rows_that_see_it(dtype, align):
    """Causal + block mask: a NaN key makes NaN exactly the rows that see it (causally and through the block
    mask); rows of a fully masked query block stay 0 / -inf; a NaN query row stays in its row. Also the pool."""
    B, Hq, Hkv, Lq, Lk, D, bs = 1, 2, 1, 45, 60, 8, 10
    q, k, v = _randn((B, Hq, Lq, D), dtype, 1), _randn((B, Hkv, Lk, D), dtype, 2), _randn((B, Hkv, Lk, D), dtype, 3)
    m = _mask((1, Hq, 5, 6), 4, p=0.7)
    m[..., 1] = True  # key block 1 (the NaN key) kept ...
    m[..., 0, 1] = False  # ... except by query block 0
    m[..., 3, :] = False  # query block 3 sees nothing
    k[0, 0, 17, 2] = float("nan")  # key 17, block 1
    q[0, 1, 41, 0] = float("nan")
    q[0, 1, 30, 0] = float("nan")  # a row of the empty query block: stays 0 / -inf; in the pool (no block mask)
    # bottom-right it does not see key block 5 at all, though its query block does: pool[3, 5] stays finite
    out, lse = ops.block_sparse_attn(q, k, v, m, bs, True, None, align)
    ro, rl = ref_attn(q.double(), k.double(), v.double(), m, bs, True, None, align, visible_only=True)
    rlo = ref_attn(q, k, v, m, bs, True, None, align)[0] if dtype != torch.float64 else None
    assert_close_to_reference(out, ro, rlo, dtype, f"{align} {dtype} out")
    assert_close_to_reference(lse, rl, None, torch.float64 if dtype == torch.float64 else torch.float32, "lse",
                              dict(atol=1e-5, rtol=1e-5) if dtype != torch.float64 else None)
    tm = token_mask(m, B, Hq, Lq, Lk, bs, True, align)
    sees = tm[..., 17]
    assert torch.equal(torch.isnan(out[..., 0])[0, 0], sees[0, 0]), "head 0: NaN exactly where key 17 is seen"
    assert (out[:, :, 30:40] == 0).all() and torch.isneginf(lse[:, :, 30:40]).all(), "empty query block"
    # pool without the NaN key (which every row of query blocks 1.. sees): the NaN query rows alone
    k[0, 0, 17, 2] = 0.0
    pool = ops.attn_block_pool(q, k, bs, True, None, align)
    rp = ref_block_pool(q.double(), k.double(), bs, True, None, align)
    assert_close_to_reference(pool, rp, ref_block_pool(q, k, bs, True, None, align) if dtype != torch.float64 else None,
                              dtype if dtype == torch.float64 else torch.float32, f"{align} {dtype} pool",
                              dict(atol=1e-2, rtol=1e-2) if dtype in (torch.float16, torch.bfloat16) else None)
    assert torch.isnan(pool).any() and not torch.isnan(pool).all()


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_block_pool_nan_like_softmax(dtype):
    """attn_block_pool with a NaN key: NaN in every block of every row that sees the key, narrow and wide rows."""
    for L, bs in ((7, 7), (90, 40)):
        q, k = _randn((1, 2, L, 16), dtype, 1), _randn((1, 1, L, 16), dtype, 2)
        k[0, 0, L // 2, 1] = float("nan")
        pool = ops.attn_block_pool(q, k, bs, False, None)
        assert torch.isnan(pool).all(), f"L={L}: every row sees the NaN key"
        pool = ops.attn_block_pool(q, k, bs, True, None)
        rp = ref_block_pool(q.double(), k.double(), bs, True)
        _same_nan(pool, rp, f"L={L} causal pool")


def test_all_neg_inf_scores_row_is_empty_like_sdpa():
    """A query row whose scores are all -inf sees nothing: 0 / -inf, as SDPA's safe softmax gives 0."""
    for L, bs in ((7, 7), (90, 30)):
        q, k, v = _randn((1, 1, L, 4), torch.float32, 1), _randn((1, 1, L, 4), torch.float32, 2).abs(), \
            _randn((1, 1, L, 4), torch.float32, 3)
        q[0, 0, 3] = float("-inf")
        out, lse = ops.block_sparse_attn(q, k, v, torch.ones(1, 1, -(-L // bs), -(-L // bs), dtype=torch.bool), bs,
                                         False, None)
        want = _sdpa(q, k, v)
        assert (out[0, 0, 3] == 0).all() and torch.isneginf(lse[0, 0, 3])
        torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)


def test_scalar_and_aten_paths():
    """The NaN and tile-crossing tests again with the scalar row kernels (PEFTCORE_CPU_SIMD=scalar) and ATen tile
    GEMMs (PEFTCORE_CPU_BLAS=aten), in a child process (both are chosen once per process)."""
    if os.environ.get("PEFTCORE_CPU_SIMD") == "scalar":
        pytest.skip("already the scalar path")
    env = dict(os.environ, PEFTCORE_CPU_SIMD="scalar", PEFTCORE_CPU_BLAS="aten")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__, "-k",
                        "nan or neg_inf or tile_crossing"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and "failed" not in r.stdout


# ---------------------------------------------------------------------------------------------------------------
# Causal alignment.


@pytest.mark.parametrize("Lq,Lk", [(1, 37), (5, 70), (40, 40), (64, 100), (33, 33)])
@pytest.mark.parametrize("bs", [8, 16, 1000])
def test_bottom_right_matches_sdpa_explicit_mask(Lq, Lk, bs):
    """causal_align="bottom_right" equals SDPA with the explicit mask j <= i + Lk - Lq (FlashAttention >= 2.1);
    out, lse and gradients; and the pool against the reference."""
    q = _randn((2, 4, Lq, 16), torch.float32, 1).requires_grad_(True)
    k = _randn((2, 2, Lk, 16), torch.float32, 2).requires_grad_(True)
    v = _randn((2, 2, Lk, 16), torch.float32, 3).requires_grad_(True)
    tril = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
    want = _sdpa(q, k, v, mask=tril)
    out = sa.block_sparse_attn(q, k, v, None, bs, True, causal_align="bottom_right")
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    ref = torch.autograd.grad(want, (q, k, v), g)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=5e-5)
    try:
        from torch.nn.attention.bias import causal_lower_right
    except ImportError:  # pragma: no cover
        causal_lower_right = None
    if causal_lower_right is not None:
        want2 = _sdpa(q.detach(), k.detach(), v.detach(), mask=causal_lower_right(Lq, Lk))
        torch.testing.assert_close(out.detach(), want2, atol=2e-5, rtol=2e-5)
    pool = sa.attn_block_pool(q, k, min(bs, 64), True, causal_align="bottom_right")
    torch.testing.assert_close(pool, ref_block_pool(q.detach().double(), k.detach().double(), min(bs, 64), True,
                                                    None, "bottom_right").float(), atol=1e-5, rtol=1e-5)
    if Lq != Lk:  # the default stays top-left
        top = sa.block_sparse_attn(q, k, v, None, bs, True)
        torch.testing.assert_close(top, _sdpa(q, k, v, causal=True), atol=2e-5, rtol=2e-5)
        assert not torch.allclose(top, out)


@pytest.mark.parametrize("align", ALIGNS)
def test_bottom_right_with_lq_above_lk(align):
    """Lq > Lk: bottom-right hides every key from the first Lq - Lk queries (0 / -inf); top-left does not."""
    q, k, v = _randn((1, 2, 50, 8), torch.float32, 1), _randn((1, 2, 20, 8), torch.float32, 2), \
        _randn((1, 2, 20, 8), torch.float32, 3)
    out, lse = sa.block_sparse_attn(q, k, v, None, 16, True, return_lse=True, causal_align=align)
    ro, rl = ref_attn(q.double(), k.double(), v.double(), torch.ones(1, 1, 4, 2, dtype=torch.bool), 16, True, None,
                      align)
    torch.testing.assert_close(out.double(), ro, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), rl, atol=1e-5, rtol=1e-5)
    assert torch.isneginf(lse[:, :, :30]).all() == (align == "bottom_right")


def test_kv_cache_decode_bottom_right():
    """A KV-cache decode: prefill 50 tokens, then decode 1 token and a chunk of 4 against the cache, bottom-right;
    each equals the matching rows of full causal attention over the whole sequence (and block-sparse masks keep
    working: the chunk keeps every block). Top-left would let the new token see only key 0."""
    L, D, bs = 55, 16, 16
    q, k, v = (_randn((1, 4, L, D), torch.float32, s) for s in (1, 2, 3))
    k, v = k[:, :2], v[:, :2]
    full = sa.block_sparse_attn(q, k, v, None, bs, True)
    for start, stop in ((50, 51), (51, 55), (0, 55)):
        kv = slice(0, stop)
        step = sa.block_sparse_attn(q[:, :, start:stop], k[:, :, kv], v[:, :, kv], None, bs, True,
                                    causal_align="bottom_right")
        torch.testing.assert_close(step, full[:, :, start:stop], atol=2e-5, rtol=2e-5)
    one = sa.block_sparse_attn(q[:, :, 50:51], k[:, :, :51], v[:, :, :51], None, bs, True)
    assert not torch.allclose(one, full[:, :, 50:51])
    # with a block mask that drops key block 1 for the decode step
    m = torch.ones(1, 1, 1, 4, dtype=torch.bool)
    m[..., 1] = False
    step = ops.block_sparse_attn(q[:, :, 50:51], k[:, :, :51], v[:, :, :51], m, bs, True, None, "bottom_right")[0]
    ro, _ = ref_attn(q[:, :, 50:51].double(), k[:, :, :51].double(), v[:, :, :51].double(), m, bs, True, None,
                     "bottom_right")
    torch.testing.assert_close(step.double(), ro, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# CUDA tile planner (host code, reachable on CPU through the sparse_attn_tile_plan op).

_SMEM = {"sm_90": 232448, "sm_80": 166912, "sm_86/89": 101376, "48 KB": 49152}


def _smem(kernel, D, t):
    ld, lp = D + 1, t + 1
    return 4 * ((3 * t * ld + t * lp) if kernel == 0 else (4 * t * ld + t * lp + 2 * t) if kernel in (1, 2)
                else 2 * t * ld)


@pytest.mark.parametrize("D", [64, 128, 256])
@pytest.mark.parametrize("device", list(_SMEM))
def test_tile_plan_fits_the_device(D, device):
    """Each kernel takes the largest compiled tile that fits the opt-in limit, never more than the limit."""
    lim = _SMEM[device]
    plan = ops.sparse_attn_tile_plan(D, lim)
    tiles, smem = plan[:4], plan[4:]
    cands = {64: (64, 32), 128: (64, 32, 16), 256: (32, 16)}[D]
    for kern in range(4):
        t = tiles[kern]
        fitting = [c for c in cands if _smem(kern, D, c) <= lim]
        assert t == (fitting[0] if fitting else 0), (device, D, kern, t)
        assert smem[kern] == (_smem(kern, D, t) if t else 0) and smem[kern] <= lim


def test_tile_plan_known_devices():
    """The cases the issue names: D = 128 / 256 exceed 99 KB with the big tiles, so sm_86 / sm_89 take smaller
    ones; 48 KB cannot run D = 256 attention at all (then the op raises, see the CUDA test)."""
    assert ops.sparse_attn_tile_plan(128, _SMEM["sm_90"])[:4] == [64, 64, 64, 64]
    assert ops.sparse_attn_tile_plan(256, _SMEM["sm_80"])[:4] == [32, 32, 32, 32]
    assert ops.sparse_attn_tile_plan(128, _SMEM["sm_86/89"])[:4] == [32, 32, 32, 64]
    assert ops.sparse_attn_tile_plan(256, _SMEM["sm_86/89"])[:4] == [16, 16, 16, 32]
    assert ops.sparse_attn_tile_plan(64, _SMEM["sm_86/89"])[:4] == [64, 64, 64, 64]
    assert ops.sparse_attn_tile_plan(64, _SMEM["48 KB"])[:4] == [32, 32, 32, 64]
    assert ops.sparse_attn_tile_plan(128, _SMEM["48 KB"])[:4] == [16, 16, 16, 32]
    assert ops.sparse_attn_tile_plan(256, _SMEM["48 KB"])[:4] == [0, 0, 0, 16]
    assert ops.sparse_attn_tile_plan(64, 0) == [0] * 8


# ---------------------------------------------------------------------------------------------------------------
# CUDA against the CPU kernels at the tile-crossing shapes, outputs and gradients, for each smem tile plan.


def _cpu_vs_cuda(s, device, dtype):
    q, k, v, m, bs, causal, scale, align = s.args
    cpu = [t.cpu().float().requires_grad_(True) for t in (q, k, v)]
    gpu = [t.detach().to(device, dtype).requires_grad_(True) for t in cpu]
    out_c, lse_c = ops.block_sparse_attn(*cpu, m.cpu(), bs, causal, scale, align)
    out_g, lse_g = ops.block_sparse_attn(*gpu, m.to(device), bs, causal, scale, align)
    go = torch.randn_like(out_c)
    gl = torch.randn_like(lse_c).masked_fill(torch.isneginf(lse_c), 0.0)
    gc = torch.autograd.grad((out_c, lse_c.masked_fill(torch.isneginf(lse_c), 0.0)), cpu, (go, gl))
    gg = torch.autograd.grad((out_g, lse_g.masked_fill(torch.isneginf(lse_g), 0.0)), gpu, (go.to(device, dtype),
                                                                                          gl.to(device)))
    tol = dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out_g.float().cpu(), out_c, **tol, msg=lambda e: f"{s.name} out: {e}")
    torch.testing.assert_close(lse_g.cpu(), lse_c, **tol, msg=lambda e: f"{s.name} lse: {e}")
    for name, a, b in zip("qkv", gg, gc):
        torch.testing.assert_close(a.float().cpu(), b, **tol, msg=lambda e: f"{s.name} d{name}: {e}")
    pool_c = ops.attn_block_pool(cpu[0].detach(), cpu[1].detach(), bs, causal, scale, align)
    pool_g = ops.attn_block_pool(gpu[0].detach(), gpu[1].detach(), bs, causal, scale, align)
    torch.testing.assert_close(pool_g.cpu(), pool_c, **tol, msg=lambda e: f"{s.name} pool: {e}")


@pytest.mark.parametrize("device", [d for d in devices() if not isinstance(d, str)])
@pytest.mark.parametrize("smem", [None, _SMEM["sm_86/89"], _SMEM["48 KB"]], ids=["device", "99KB", "48KB"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_at_tile_crossing_shapes(device, smem, dtype, monkeypatch):
    """Every tile plan (the device's own, and the 99 KB / 48 KB ones forced by PEFTCORE_SPARSE_ATTN_SMEM_LIMIT)
    against the CPU kernels: out, lse, dq / dk / dv and the pool; NaN propagation too; D = 256 under 48 KB is
    refused with the sizes."""
    if smem is not None:
        monkeypatch.setenv("PEFTCORE_SPARSE_ATTN_SMEM_LIMIT", str(smem))
    for s in _attn_samples(TILE_CONFIGS + _configs(torch.float32), "cpu", torch.float32, seed0=100):
        D = _cuda_d(s.args[0].shape[-1])
        if smem == _SMEM["48 KB"] and D == 256:
            q = torch.randn(1, 1, 8, 256, device=device, dtype=dtype)
            _err(lambda: ops.block_sparse_attn(q, q, q, torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device), 8,
                                               False, None), r"block_sparse_attn: head dim 256 needs \d+ bytes of shared")
            continue
        args = list(s.args)
        for i in range(3):
            t = args[i]
            args[i] = torch.cat([t, t], -1)[..., :D] if t.shape[-1] < D else t[..., :D]
        _cpu_vs_cuda(Sample(tuple(args), name=s.name), device, dtype)
    # NaN on the GPU: same rule as the CPU
    q, k, v = (torch.randn(1, 2, 100, 64, device=device, dtype=dtype) for _ in range(3))
    k[0, 0, 70, 3] = float("nan")
    full = torch.ones(1, 1, 2, 2, dtype=torch.bool, device=device)
    for causal in (False, True):
        out, lse = ops.block_sparse_attn(q, k, v, full, 64, causal, None)
        oc, lc = ops.block_sparse_attn(q.cpu().float(), k.cpu().float(), v.cpu().float(), full.cpu(), 64, causal, None)
        _same_nan(out.cpu(), oc, f"cuda NaN causal={causal}")
        _same_nan(lse.cpu(), lc, f"cuda lse NaN causal={causal}")
        pool = ops.attn_block_pool(q, k, 64, causal, None)
        _same_nan(pool.cpu(), ops.attn_block_pool(q.cpu().float(), k.cpu().float(), 64, causal, None),
                  f"cuda pool NaN causal={causal}")


# ---------------------------------------------------------------------------------------------------------------
# Tensor-core forward (float16 / bfloat16, D = 64 / 128 on CUDA): its host plan and kept-tile lists on CPU through
# sparse_attn_tc_plan / sparse_attn_tc_tiles, then (CUDA only) the device list builder against the CPU one and the
# kernel against the CUDA-core kernel (PEFTCORE_SPARSE_ATTN_KERNEL=simt) and the CPU kernels.

_TC_ARCHS = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448}


def test_tc_plan_known_devices():
    """64 x 64 tiles with 4 warps for D = 64 / 128 on every arch the wheel targets (2 D (64 + 4 x 64) bytes: 40 / 80
    KB); nothing for other head dims or below the configuration's shared memory (the CUDA-core kernel runs)."""
    for arch, lim in _TC_ARCHS.items():
        for D in (64, 128):
            assert ops.sparse_attn_tc_plan(D, lim) == [64, 64, 4, 2 * D * (64 + 4 * 64)], (arch, D)
        for D in (16, 32, 96, 256):
            assert ops.sparse_attn_tc_plan(D, lim) == [0, 0, 0, 0], (arch, D)
    assert ops.sparse_attn_tc_plan(64, 49152) == [64, 64, 4, 40960]
    assert ops.sparse_attn_tc_plan(64, 40959) == [0, 0, 0, 0]
    assert ops.sparse_attn_tc_plan(128, 81920) == [64, 64, 4, 81920]
    assert ops.sparse_attn_tc_plan(128, 49152) == [0, 0, 0, 0]
    _err(lambda: ops.sparse_attn_tc_plan(64, -1), r"sparse_attn_tc_plan: smem_limit must be >= 0, got -1")


def ref_tc_tiles(block_mask, Lq, Lk, bs, causal, align, tm, tn):
    """Plain-torch kept-tile lists from the token-level mask: key tile n is kept for query tile m when some query
    of the tile sees some key of it (block mask and causal), partial when some causally visible pair of the tile is
    masked by the block mask; entries 2 n + partial ascending, -1 after the count."""
    Bm, Hm = block_mask.shape[:2]
    blk = block_mask.repeat_interleave(bs, 2)[:, :, :Lq].repeat_interleave(bs, 3)[..., :Lk]
    cv = torch.ones(Lq, Lk, dtype=torch.bool)
    if causal:
        cv = cv.tril(Lk - Lq if align == "bottom_right" else 0)
    mt, nt = -(-Lq // tm), -(-Lk // tn)

    def per_tile(t):
        t = F.pad(t, (0, nt * tn - Lk, 0, mt * tm - Lq))
        return t.view(Bm, Hm, mt, tm, nt, tn).any(dim=5).any(dim=3)

    kept, partial = per_tile(blk & cv), per_tile(~blk & cv)
    count = kept.sum(-1, dtype=torch.int32)
    order = torch.argsort((~kept).to(torch.int8), dim=-1, stable=True)
    entries = (2 * order + partial.gather(-1, order).long()).to(torch.int32)
    entries[torch.arange(nt).expand_as(entries) >= count.unsqueeze(-1)] = -1
    return count, entries


# (Lq, Lk, block sizes, tiles (tile_m, tile_n)): lengths not multiples of the tiles or blocks, Lq != Lk both ways,
# blocks smaller than, equal to and larger than the tiles (16 / 32 / 64 / 128 and odd sizes), one tile in all.
_TC_TILE_SHAPES = [
    (200, 200, (16, 32, 64, 128), ((64, 64), (128, 128), (64, 128))),
    (130, 257, (16, 24, 64, 80), ((64, 64), (128, 64))),
    (257, 70, (32, 128, 200), ((64, 64), (16, 32))),
    (40, 50, (16, 1000), ((64, 64),)),
    (1, 300, (64,), ((64, 64),)),
]


def _tc_tile_cases():
    for Lq, Lk, sizes, tiles in _TC_TILE_SHAPES:
        for bs in sizes:
            for tm, tn in tiles:
                for causal, align in ((False, "top_left"), (True, "top_left"), (True, "bottom_right")):
                    yield Lq, Lk, bs, tm, tn, causal, align


def _tc_mask(Lq, Lk, bs, seed, shape=(2, 3)):
    m = _mask((*shape, -(-Lq // bs), -(-Lk // bs)), seed, p=0.4)
    m[0, 0, 0] = False  # a query block with nothing
    m[-1, -1] = True  # a head with every block
    return m


@pytest.mark.parametrize("Lq,Lk,bs,tm,tn,causal,align", list(_tc_tile_cases()))
def test_tc_tiles_match_reference(Lq, Lk, bs, tm, tn, causal, align):
    """The CPU lists (sparse_attn_tc_plan.h's tile_state, which the CUDA builder runs too) against the token-level
    reference: counts, entries (tile order and partial flags) and the -1 fill."""
    m = _tc_mask(Lq, Lk, bs, Lq + Lk + bs + tm)
    count, entries = ops.sparse_attn_tc_tiles(m, Lq, Lk, bs, causal, align, tm, tn)
    rc, re = ref_tc_tiles(m, Lq, Lk, bs, causal, align, tm, tn)
    assert count.dtype == torch.int32 and entries.dtype == torch.int32
    assert torch.equal(count, rc), (count, rc)
    assert torch.equal(entries, re)


def test_tc_tiles_structure():
    """What the lists are for: with block_size = tile the kept tiles are the kept blocks (no partial tile without
    causal); 16-blocks fold into 64-tiles (a tile is kept if any of its 4 x 4 blocks is); a 128-block spans 2 x 2
    tiles; causal skips every tile after the diagonal; a masked-out row gives an empty list."""
    L = 256
    m = _mask((1, 1, 4, 4), 7, p=0.5)
    count, entries = ops.sparse_attn_tc_tiles(m, L, L, 64, False, "top_left", 64, 64)
    assert torch.equal(count[0, 0], m[0, 0].sum(-1, dtype=torch.int32))
    assert (entries[entries >= 0] % 2 == 0).all()
    m16 = torch.zeros(1, 1, 16, 16, dtype=torch.bool)
    m16[0, 0, 5, 9] = True  # query rows 80..95 (tile 1), keys 144..159 (tile 2)
    count, entries = ops.sparse_attn_tc_tiles(m16, L, L, 16, False, "top_left", 64, 64)
    assert count[0, 0].tolist() == [0, 1, 0, 0] and entries[0, 0, 1].tolist() == [2 * 2 + 1, -1, -1, -1]
    m128 = torch.tensor([[True, False], [True, True]]).view(1, 1, 2, 2)
    count, entries = ops.sparse_attn_tc_tiles(m128, L, L, 128, True, "top_left", 64, 64)
    assert count[0, 0].tolist() == [1, 2, 3, 4]
    assert entries[0, 0, 3].tolist() == [0, 2, 4, 6]  # full tiles: no partial flag (causal is checked apart)
    empty = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    count, entries = ops.sparse_attn_tc_tiles(empty, L, L, 64, True, "bottom_right", 64, 64)
    assert (count == 0).all() and (entries == -1).all()


def test_tc_tiles_errors_and_opcheck():
    m = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    _err(lambda: ops.sparse_attn_tc_tiles(m, 256, 256, 64, False, "left", 64, 64),
         r'sparse_attn_tc_tiles: causal_align must be "top_left" or "bottom_right", got "left"')
    _err(lambda: ops.sparse_attn_tc_tiles(m, 256, 300, 64, False, "top_left", 64, 64),
         r"sparse_attn_tc_tiles: block_mask must have shape \[Bm, Hm, 4, 5\]")
    _err(lambda: ops.sparse_attn_tc_tiles(m.int(), 256, 256, 64, False, "top_left", 64, 64),
         r"sparse_attn_tc_tiles: block_mask must be bool")
    _err(lambda: ops.sparse_attn_tc_tiles(m, 256, 256, 0, False, "top_left", 64, 64),
         r"sparse_attn_tc_tiles: block_size must be > 0, got 0")
    _err(lambda: ops.sparse_attn_tc_tiles(m, 256, 256, 64, False, "top_left", 0, 64),
         r"sparse_attn_tc_tiles: tile_m and tile_n must be in \[1, 1024\], got 0 and 64")
    for args in ((m, 256, 256, 64, True, "top_left", 64, 64), (_tc_mask(70, 130, 16, 1), 70, 130, 16, True,
                                                                "bottom_right", 64, 64),
                 (torch.ones(1, 2, 1, 0, dtype=torch.bool), 5, 0, 16, False, "top_left", 64, 64)):
        torch.library.opcheck(ops.sparse_attn_tc_tiles, args)


_CUDA = [d for d in devices() if not isinstance(d, str)]


@pytest.mark.parametrize("device", _CUDA)
def test_sparse_attn_tc_tiles_cuda_matches_cpu(device):  # the op name maps it in device_check's table
    """The device list builder (one warp per row, ballot compaction) against the CPU lists, every case above, plus
    more key tiles than a warp's 32 lanes."""
    for Lq, Lk, bs, tm, tn, causal, align in list(_tc_tile_cases()) + [(100, 5000, 16, 64, 64, True, "bottom_right"),
                                                                      (3000, 3000, 24, 64, 64, False, "top_left")]:
        m = _tc_mask(Lq, Lk, bs, Lq + Lk + bs + tm)
        cc, ec = ops.sparse_attn_tc_tiles(m, Lq, Lk, bs, causal, align, tm, tn)
        cg, eg = ops.sparse_attn_tc_tiles(m.to(device), Lq, Lk, bs, causal, align, tm, tn)
        name = f"Lq={Lq} Lk={Lk} bs={bs} tile={tm}x{tn} causal={causal} {align}"
        assert torch.equal(cg.cpu(), cc), name
        assert torch.equal(eg.cpu(), ec), name


# (B, Hq, Hkv, Lq, Lk, D, bs, causal, align, mask (Bm, Hm), empty query block): Lq / Lk not multiples of the 64-row
# tiles, blocks of 16 / 32 / 64 / 128 and odd sizes (24, 80, 200: tiles straddle blocks both ways), GQA and MQA,
# both causal alignments with Lq < Lk and Lq > Lk, fully masked query blocks, broadcast masks, one tile in all.
_TC_FWD_CONFIGS = [
    (1, 4, 2, 200, 200, 64, 16, True, "top_left", (1, 4), 1),
    (2, 4, 1, 130, 257, 128, 32, True, "bottom_right", (2, 1), None),
    (1, 2, 2, 257, 70, 64, 64, True, "bottom_right", (1, 2), 0),
    (1, 2, 1, 100, 300, 128, 128, False, "top_left", (1, 1), 0),
    (2, 2, 2, 190, 190, 64, 24, True, "top_left", (1, 1), None),
    (1, 6, 2, 150, 333, 128, 80, True, "top_left", (1, 6), 1),
    (1, 2, 1, 65, 129, 64, 200, False, "top_left", (1, 1), None),
    (1, 2, 2, 40, 50, 128, 16, True, "bottom_right", (1, 1), None),
]


def _tc_run(kernel, monkeypatch, fn):
    monkeypatch.setenv("PEFTCORE_SPARSE_ATTN_KERNEL", kernel)
    try:
        return fn()
    finally:
        monkeypatch.delenv("PEFTCORE_SPARSE_ATTN_KERNEL")


def _tc_sample(cfg, seed, device, dtype):
    B, Hq, Hkv, Lq, Lk, D, bs, causal, align, (mb, mh), empty = cfg
    q = _randn((B, Hq, Lq, D), dtype, 10 + seed).to(device)
    k = _randn((B, Hkv, Lk, D), dtype, 20 + seed).to(device)
    v = _randn((B, Hkv, Lk, D), dtype, 30 + seed).to(device)
    m = _mask((mb, mh, -(-Lq // bs), -(-Lk // bs)), 40 + seed, p=0.5, empty_row=empty).to(device)
    return q, k, v, m


@pytest.mark.parametrize("device", _CUDA)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tc_forward_matches_cuda_core_and_cpu(device, dtype, monkeypatch):
    """The tensor-core forward (forced: PEFTCORE_SPARSE_ATTN_KERNEL=tc) against the CUDA-core kernel (=simt) on the
    same inputs and the CPU kernels in float32 of the same values: out (P rounded to the storage dtype before P V:
    within the half-precision tolerance), lse (fp32 statistics of the same scores: tight), the -inf / zero pattern of
    rows that see nothing (exact), and the gradients of the backward run from the tensor-core out / lse."""
    for i, cfg in enumerate(_TC_FWD_CONFIGS):
        B, Hq, Hkv, Lq, Lk, D, bs, causal, align, _, empty = cfg
        q, k, v, m = _tc_sample(cfg, i, device, dtype)
        name = f"{dtype} B{B} H{Hq}/{Hkv} L{Lq}x{Lk} D{D} bs{bs} causal={causal} {align}"
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        out_t, lse_t = _tc_run("tc", monkeypatch, lambda: ops.block_sparse_attn(qg, kg, vg, m, bs, causal, None, align))
        out_s, lse_s = _tc_run("simt", monkeypatch, lambda: ops.block_sparse_attn(q, k, v, m, bs, causal, None, align))
        cpu = [t.cpu().float().requires_grad_(True) for t in (q, k, v)]
        out_c, lse_c = ops.block_sparse_attn(*cpu, m.cpu(), bs, causal, None, align)
        tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=4e-3, rtol=4e-3)
        for what, want in (("simt", out_s.float().cpu()), ("cpu", out_c.detach())):
            torch.testing.assert_close(out_t.detach().float().cpu(), want, **tol,
                                       msg=lambda e: f"{name} out vs {what}: {e}")
        for what, want in (("simt", lse_s.cpu()), ("cpu", lse_c.detach())):
            lt = lse_t.detach().cpu()
            assert torch.equal(torch.isneginf(lt), torch.isneginf(want)), f"{name}: -inf rows vs {what}"
            torch.testing.assert_close(lt, want, atol=1e-3, rtol=1e-3, msg=lambda e: f"{name} lse vs {what}: {e}")
        rows_empty = torch.isneginf(lse_c.detach())
        if empty is not None:
            assert rows_empty.any(), f"{name}: the sample must have a row that sees nothing"
        assert (out_t.detach().cpu()[rows_empty] == 0).all(), f"{name}: rows that see nothing give 0"
        go = _randn(out_c.shape, torch.float32, 70 + i)
        gl = _randn(lse_c.shape, torch.float32, 80 + i).masked_fill(rows_empty, 0.0)
        grads_c = torch.autograd.grad((out_c, lse_c.masked_fill(rows_empty, 0.0)), cpu, (go, gl))
        grads_t = torch.autograd.grad((out_t, lse_t.masked_fill(torch.isneginf(lse_t), 0.0)), (qg, kg, vg),
                                      (go.to(device, dtype), gl.to(device)))
        gtol = dict(atol=3e-2, rtol=3e-2)
        for g_name, a, b in zip("qkv", grads_t, grads_c):
            torch.testing.assert_close(a.float().cpu(), b, **gtol, msg=lambda e: f"{name} d{g_name}: {e}")


@pytest.mark.parametrize("device", _CUDA)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("align", ALIGNS)
def test_tc_forward_nan_and_inf_like_cuda_core(device, dtype, align, monkeypatch):
    """NaN / inf on the tensor cores: a NaN key (k) makes NaN exactly the rows that see it, NaN / +inf query rows
    give NaN rows, a -inf query row against positive keys sees nothing (0 / -inf): the same NaN / -inf pattern as
    the CUDA-core kernel and the CPU kernel, with blocks of 16 (partial tiles) and a causal diagonal."""
    B, Hq, Hkv, Lq, Lk, D, bs = 1, 2, 1, 150, 170, 64, 16
    q, k, v = (_randn(s, dtype, i) for i, s in enumerate(((B, Hq, Lq, D), (B, Hkv, Lk, D), (B, Hkv, Lk, D))))
    k = k.abs()
    m = _mask((1, Hq, -(-Lq // bs), -(-Lk // bs)), 5, p=0.6)
    m[..., 5] = True  # the block of the NaN key kept ...
    m[..., 2, 5] = False  # ... except by query block 2 (a partial tile)
    m[..., :2, 0] = True  # rows 10 and 20 see keys 0..15
    k[0, 0, 85, 3] = float("nan")  # key 85 (block 5, key tile 1); rows 0..63 never see it causally (off <= 20)
    q[0, 0, 10, 1] = float("nan")
    q[0, 1, 70, 0] = float("inf")
    q[0, 1, 20] = float("-inf")  # all its scores -inf (k > 0): sees nothing
    args = (m.to(device), bs, True, None, align)
    qd, kd, vd = (t.to(device) for t in (q, k, v))
    out_t, lse_t = _tc_run("tc", monkeypatch, lambda: ops.block_sparse_attn(qd, kd, vd, *args))
    out_s, lse_s = _tc_run("simt", monkeypatch, lambda: ops.block_sparse_attn(qd, kd, vd, *args))
    out_c, lse_c = ops.block_sparse_attn(q.float(), k.float(), v.float(), m, bs, True, None, align)
    for what, o, l in (("simt", out_s.cpu(), lse_s.cpu()), ("cpu", out_c, lse_c)):
        _same_nan(out_t.cpu(), o, f"{dtype} {align} out vs {what}")
        _same_nan(lse_t.cpu(), l, f"{dtype} {align} lse vs {what}")
        assert torch.equal(torch.isneginf(lse_t.cpu()), torch.isneginf(l)), f"{dtype} {align}: -inf rows vs {what}"
    assert torch.isnan(out_t).any() and not torch.isnan(out_t).all()
    sees = token_mask(m, B, Hq, Lq, Lk, bs, True, align)[0, 0, :, 85]
    assert torch.equal(torch.isnan(out_t[0, 0, :, 0]).cpu(), sees | (torch.arange(Lq) == 10)), "NaN key: its rows"
    assert torch.isneginf(lse_t[0, 1, 20]).item() and (out_t[0, 1, 20] == 0).all().item()
    fin = torch.isfinite(out_c)
    torch.testing.assert_close(out_t.cpu().float()[fin], out_c[fin], atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("device", _CUDA)
def test_tc_forward_dispatch(device, monkeypatch):
    """Which kernel runs: auto takes the tensor cores for float16 / bfloat16 at D = 64 / 128 (same result as =tc,
    bitwise), float32 / D = 256 / a too small shared-memory limit take the CUDA-core kernel, =tc refuses those with
    the reason, an unknown value is refused; the tensor-core forward is captured in a CUDA graph (no host sync)."""
    m = torch.ones(1, 1, 2, 2, dtype=torch.bool, device=device)
    q, k, v = (torch.randn(1, 2, 100, 64, device=device, dtype=torch.bfloat16) for _ in range(3))
    k, v = k[:, :1, :70].contiguous(), v[:, :1, :70].contiguous()
    auto = _tc_run("auto", monkeypatch, lambda: ops.block_sparse_attn(q, k, v, m, 64, True, None))
    forced = _tc_run("tc", monkeypatch, lambda: ops.block_sparse_attn(q, k, v, m, 64, True, None))
    assert torch.equal(auto[0], forced[0]) and torch.equal(auto[1], forced[1])
    simt = _tc_run("simt", monkeypatch, lambda: ops.block_sparse_attn(q, k, v, m, 64, True, None))
    assert not torch.equal(auto[0], simt[0])  # a different kernel ran (P rounded to bf16 before P V)
    qf, kf, vf = q.float(), k.float(), v.float()
    _tc_run("auto", monkeypatch, lambda: ops.block_sparse_attn(qf, kf, vf, m, 64, True, None))
    _err(lambda: _tc_run("tc", monkeypatch, lambda: ops.block_sparse_attn(qf, kf, vf, m, 64, True, None)),
         r"block_sparse_attn: PEFTCORE_SPARSE_ATTN_KERNEL=tc but the tensor-core forward cannot run: dtype Float")
    q2, k2, v2 = (torch.randn(1, 1, 40, 256, device=device, dtype=torch.float16) for _ in range(3))
    m2 = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
    _err(lambda: _tc_run("tc", monkeypatch, lambda: ops.block_sparse_attn(q2, k2, v2, m2, 64, False, None)),
         r"cannot run: head dim 256")
    _err(lambda: _tc_run("fast", monkeypatch, lambda: ops.block_sparse_attn(q, k, v, m, 64, True, None)),
         r'block_sparse_attn: PEFTCORE_SPARSE_ATTN_KERNEL must be auto, simt or tc, got "fast"')
    q3, k3, v3 = (torch.randn(1, 1, 100, 128, device=device, dtype=torch.float16) for _ in range(3))
    m3 = torch.ones(1, 1, 2, 2, dtype=torch.bool, device=device)
    monkeypatch.setenv("PEFTCORE_SPARSE_ATTN_SMEM_LIMIT", "49152")  # 48 KB: D = 128 needs 80 KB
    small = _tc_run("auto", monkeypatch, lambda: ops.block_sparse_attn(q3, k3, v3, m3, 64, False, None))
    _err(lambda: _tc_run("tc", monkeypatch, lambda: ops.block_sparse_attn(q3, k3, v3, m3, 64, False, None)),
         r"cannot run: no configuration of head dim 128 fits 49152 bytes")
    ref = _tc_run("simt", monkeypatch, lambda: ops.block_sparse_attn(q3, k3, v3, m3, 64, False, None))
    monkeypatch.delenv("PEFTCORE_SPARSE_ATTN_SMEM_LIMIT")
    assert torch.equal(small[0], ref[0]) and torch.equal(small[1], ref[1])  # the 48 KB call took the CUDA cores
    # CUDA graph: the list builder and the kernel replay without a host sync
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _tc_run("tc", monkeypatch, lambda: ops.block_sparse_attn(q, k, v, m, 64, True, None))
        monkeypatch.setenv("PEFTCORE_SPARSE_ATTN_KERNEL", "tc")
        with torch.cuda.graph(graph, stream=s):
            o2, l2 = ops.block_sparse_attn(q, k, v, m, 64, True, None)
        monkeypatch.delenv("PEFTCORE_SPARSE_ATTN_KERNEL")
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(o2, forced[0]) and torch.equal(l2, forced[1])


# ---------------------------------------------------------------------------------------------------------------
# Tensor-core backward (float16 / bfloat16, D = 64 / 128 on CUDA): its host plan and transposed kept-tile lists on
# CPU through sparse_attn_tc_bwd_plan / sparse_attn_tc_tiles_t, then (CUDA only) the device builder against the CPU
# one and the dq / dk / dv kernels against the CUDA-core backward (PEFTCORE_SPARSE_ATTN_KERNEL=simt) and the CPU
# kernels.


def test_tc_bwd_plan_known_devices():
    """64 x 64 tiles with 4 warps for D = 64 / 128 on every arch the wheel targets: dq 2 D (2 x 64 + 4 x 64) bytes,
    dk / dv the same plus 1 KB of lse / Delta (48 / 49 KB at D = 64, 96 / 97 KB at D = 128: under sm_86 / sm_89's 99
    KB); nothing for other head dims or when one of the two kernels does not fit."""
    for arch, lim in _TC_ARCHS.items():
        for D in (64, 128):
            assert ops.sparse_attn_tc_bwd_plan(D, lim, 4, 8, 4, 4096, 108) == [64, 64, 4, 768 * D, 768 * D + 1024,
                                                                               1], (arch, D)
        for D in (16, 32, 96, 256):
            assert ops.sparse_attn_tc_bwd_plan(D, lim, 1, 1, 1, 64, 108) == [0] * 6, (arch, D)
    assert ops.sparse_attn_tc_bwd_plan(128, 99328, 1, 1, 1, 64, 1)[:3] == [64, 64, 4]
    assert ops.sparse_attn_tc_bwd_plan(128, 99327, 1, 1, 1, 64, 1) == [0] * 6  # dk / dv needs 99328
    assert ops.sparse_attn_tc_bwd_plan(64, 50176, 1, 1, 1, 64, 1)[:3] == [64, 64, 4]
    assert ops.sparse_attn_tc_bwd_plan(64, 49152, 1, 1, 1, 64, 1) == [0] * 6  # dq fits 48 KB, dk / dv does not
    for args in ((64, -1, 1, 1, 1, 1, 1), (64, 1, -1, 1, 1, 1, 1), (64, 1, 1, 1, 0, 1, 1), (64, 1, 1, 1, 1, 1, 0)):
        with pytest.raises(RuntimeError, match="sparse_attn_tc_bwd_plan: "):
            ops.sparse_attn_tc_bwd_plan(*args)


@pytest.mark.parametrize("B,Hkv,G,Lk,sms,want", [
    (1, 1, 8, 1024, 132, 8),      # MQA, 16 key tiles: 16 CTAs of 264 wanted -> the 8 heads split 8 ways
    (1, 1, 32, 1024, 132, 17),    # ceil(264 / 16) = 17 splits of 32 heads
    (1, 8, 4, 1024, 132, 3),      # GQA: 128 CTAs -> ceil(264 / 128) = 3 splits of 4 heads
    (1, 8, 4, 32768, 132, 1),     # 4096 CTAs: no split
    (1, 32, 1, 1024, 132, 1),     # MHA never splits
    (2, 2, 8, 200, 108, 8),       # 16 CTAs, 216 wanted, capped at G = 8
    (1, 1, 4, 0, 132, 1),         # no key tile
])
def test_tc_bwd_splits(B, Hkv, G, Lk, sms, want):
    """The dk / dv grid's split over a GQA group's query heads: 1 while B Hkv Nt CTAs reach two per SM, else enough
    splits for that, at most G."""
    assert ops.sparse_attn_tc_bwd_plan(128, 232448, B, Hkv, G, Lk, sms)[5] == want


def _list_states(count, entries, n):
    """[..., rows, n] int8 from kept-tile lists: 0 skipped, 1 kept, 2 kept and partial; also checks the lists'
    form (ascending, -1 after the count)."""
    idx = torch.arange(entries.shape[-1])
    valid = idx < count.unsqueeze(-1)
    assert (entries[~valid] == -1).all()
    e = entries.long().clamp_min(0)
    tiles = e // 2
    assert (tiles.diff(dim=-1)[valid[..., 1:]] > 0).all(), "lists must ascend"
    out = torch.zeros(*entries.shape[:-1], n + 1, dtype=torch.int8)  # column n takes the unused slots
    out.scatter_(-1, torch.where(valid, tiles, n), (1 + e % 2).to(torch.int8))
    out = out[..., :n]
    return out


@pytest.mark.parametrize("Lq,Lk,bs,tm,tn,causal,align", list(_tc_tile_cases()))
def test_tc_tiles_t_are_the_transposed_lists(Lq, Lk, bs, tm, tn, causal, align):
    """The backward's lists per key tile (sparse_attn_tc_tiles_t) hold exactly the (query tile, partial) pairs of
    the forward lists that name that key tile, ascending, -1 after the count."""
    m = _tc_mask(Lq, Lk, bs, Lq + Lk + bs + tm)
    count, entries = ops.sparse_attn_tc_tiles(m, Lq, Lk, bs, causal, align, tm, tn)
    count_t, entries_t = ops.sparse_attn_tc_tiles_t(m, Lq, Lk, bs, causal, align, tm, tn)
    mt, nt = -(-Lq // tm), -(-Lk // tn)
    assert count_t.shape == (*m.shape[:2], nt) and entries_t.shape == (*m.shape[:2], nt, mt)
    assert count_t.dtype == torch.int32 and entries_t.dtype == torch.int32
    fwd = _list_states(count, entries, nt)
    bwd = _list_states(count_t, entries_t, mt)
    assert torch.equal(bwd.transpose(-1, -2), fwd)
    assert count_t.sum() == count.sum()


def test_tc_tiles_t_structure_and_opcheck():
    """Causal: key tile n is kept by query tiles n .. Mt-1 (top-left, square) and by none past the diagonal; an
    empty mask gives empty lists; errors name the op; opcheck on the real and fake kernels."""
    L = 256
    full = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    count, entries = ops.sparse_attn_tc_tiles_t(full, L, L, 64, True, "top_left", 64, 64)
    assert count[0, 0].tolist() == [4, 3, 2, 1]
    assert entries[0, 0, 1].tolist() == [2, 4, 6, -1]
    empty = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    count, entries = ops.sparse_attn_tc_tiles_t(empty, L, L, 64, False, "top_left", 64, 64)
    assert (count == 0).all() and (entries == -1).all()
    _err(lambda: ops.sparse_attn_tc_tiles_t(full, 256, 300, 64, False, "top_left", 64, 64),
         r"sparse_attn_tc_tiles_t: block_mask must have shape \[Bm, Hm, 4, 5\]")
    _err(lambda: ops.sparse_attn_tc_tiles_t(full, 256, 256, 64, False, "left", 64, 64),
         r'sparse_attn_tc_tiles_t: causal_align must be "top_left" or "bottom_right", got "left"')
    for args in ((full, 256, 256, 64, True, "top_left", 64, 64), (_tc_mask(70, 130, 16, 1), 70, 130, 16, True,
                                                                   "bottom_right", 64, 64),
                 (torch.ones(1, 2, 1, 0, dtype=torch.bool), 5, 0, 16, False, "top_left", 64, 64)):
        torch.library.opcheck(ops.sparse_attn_tc_tiles_t, args)


@pytest.mark.parametrize("device", _CUDA)
def test_sparse_attn_tc_tiles_t_cuda_matches_cpu(device):  # the op name maps it in device_check's table
    """The device builder of the transposed lists against the CPU ones, every case above, plus more query tiles
    than a warp's 32 lanes."""
    for Lq, Lk, bs, tm, tn, causal, align in list(_tc_tile_cases()) + [(5000, 100, 16, 64, 64, True, "bottom_right"),
                                                                      (3000, 3000, 24, 64, 64, False, "top_left")]:
        m = _tc_mask(Lq, Lk, bs, Lq + Lk + bs + tm)
        cc, ec = ops.sparse_attn_tc_tiles_t(m, Lq, Lk, bs, causal, align, tm, tn)
        cg, eg = ops.sparse_attn_tc_tiles_t(m.to(device), Lq, Lk, bs, causal, align, tm, tn)
        name = f"Lq={Lq} Lk={Lk} bs={bs} tile={tm}x{tn} causal={causal} {align}"
        assert torch.equal(cg.cpu(), cc), name
        assert torch.equal(eg.cpu(), ec), name


# The forward's configurations plus: MQA at batch 1 with more query heads than key tiles (the dk / dv grid splits
# the group: fp32 partials and the reduction), an empty mask, a mask per batch and head with blocks of 64 / 128.
_TC_BWD_CONFIGS = _TC_FWD_CONFIGS + [
    (1, 8, 1, 90, 200, 64, 32, True, "bottom_right", (1, 8), 0),
    (1, 16, 2, 300, 130, 128, 64, True, "top_left", (1, 1), None),
    (2, 2, 1, 129, 191, 128, 128, False, "top_left", (2, 2), None),
]


def _tc_bwd_case(cfg, i, device, dtype, monkeypatch, kernel, empty_mask=False):
    """(q, k, v, mask, out, lse, grad_out, grad_lse) of one configuration, out / lse from the CUDA-core forward (the
    same inputs for both backwards), and the backward with `kernel`."""
    B, Hq, Hkv, Lq, Lk, D, bs, causal, align, _, _ = cfg
    q, k, v, m = _tc_sample(cfg, i, device, dtype)
    if empty_mask:
        m = torch.zeros_like(m)
    out, lse = _tc_run("simt", monkeypatch, lambda: ops.block_sparse_attn(q, k, v, m, bs, causal, None, align))
    go = _randn(out.shape, dtype, 90 + i).to(device)
    gl = _randn(lse.shape, torch.float32, 95 + i).to(device).masked_fill(torch.isneginf(lse), 0.0)
    grads = _tc_run(kernel, monkeypatch, lambda: ops.block_sparse_attn_backward(
        go, gl, q, k, v, out, lse, m, bs, causal, None, [True, True, True], align))
    return (q, k, v, m, out, lse, go, gl), grads


@pytest.mark.parametrize("device", _CUDA)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_tc_backward_matches_cuda_core_and_cpu(device, dtype, monkeypatch):
    """The tensor-core backward (forced: =tc) against the CUDA-core backward (=simt) on the same out / lse and the
    CPU backward in float32 of the same values: dq, dk, dv within the half-precision tolerance (P and dS rounded to
    the storage dtype before their GEMMs), exact zeros for the rows of queries that see nothing and of keys no
    query sees, bitwise-repeatable (no atomics, the GQA split reduced in order), and all zeros for an empty mask."""
    tol = dict(atol=3e-2, rtol=3e-2) if dtype == torch.bfloat16 else dict(atol=1e-2, rtol=1e-2)
    for i, cfg in enumerate(_TC_BWD_CONFIGS):
        B, Hq, Hkv, Lq, Lk, D, bs, causal, align, _, empty = cfg
        name = f"{dtype} B{B} H{Hq}/{Hkv} L{Lq}x{Lk} D{D} bs{bs} causal={causal} {align}"
        args, tcg = _tc_bwd_case(cfg, i, device, dtype, monkeypatch, "tc")
        _, simt = _tc_bwd_case(cfg, i, device, dtype, monkeypatch, "simt")
        _, again = _tc_bwd_case(cfg, i, device, dtype, monkeypatch, "tc")
        q, k, v, m, out, lse, go, gl = args
        cpu = ops.block_sparse_attn_backward(go.cpu().float(), gl.cpu(), q.cpu().float(), k.cpu().float(),
                                             v.cpu().float(), out.cpu().float(), lse.cpu(), m.cpu(), bs, causal, None,
                                             [True, True, True], align)
        for g_name, a, s, c, r in zip("qkv", tcg, simt, cpu, again):
            assert a.dtype == dtype and a.shape == s.shape, name
            assert torch.equal(a, r), f"{name} d{g_name}: not repeatable"
            for what, want in (("simt", s.float().cpu()), ("cpu", c)):
                torch.testing.assert_close(a.float().cpu(), want, **tol, msg=lambda e: f"{name} d{g_name} vs {what}: {e}")
        tok = token_mask(m.cpu(), B, Hq, Lq, Lk, bs, causal, align)
        assert (tcg[0].cpu()[~tok.any(-1)] == 0).all(), f"{name}: dq of rows that see nothing"
        seen = tok.view(B, Hkv, Hq // Hkv, Lq, Lk).any(2).any(2)
        assert (tcg[1].cpu()[~seen] == 0).all() and (tcg[2].cpu()[~seen] == 0).all(), f"{name}: unseen keys"
        if empty is not None:
            assert (~tok.any(-1)).any(), f"{name}: the sample must have a row that sees nothing"
        _, zero = _tc_bwd_case(cfg, i, device, dtype, monkeypatch, "tc", empty_mask=True)
        assert all((g == 0).all() for g in zero), f"{name}: empty mask"


@pytest.mark.parametrize("device", _CUDA)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("align", ALIGNS)
def test_tc_backward_nan_like_cuda_core(device, dtype, align, monkeypatch):
    """NaN in the backward: a NaN key (k) and a NaN query row make NaN the same dq / dk / dv entries on the tensor
    cores as on the CUDA cores (blocks of 16: partial tiles; causal)."""
    B, Hq, Hkv, Lq, Lk, D, bs = 1, 2, 1, 150, 170, 64, 16
    q, k, v = (_randn(s, dtype, i).to(device) for i, s in enumerate(((B, Hq, Lq, D), (B, Hkv, Lk, D),
                                                                      (B, Hkv, Lk, D))))
    m = _mask((1, Hq, -(-Lq // bs), -(-Lk // bs)), 5, p=0.6).to(device)
    k[0, 0, 85, 3] = float("nan")
    q[0, 1, 40, 1] = float("nan")
    out, lse = _tc_run("simt", monkeypatch, lambda: ops.block_sparse_attn(q, k, v, m, bs, True, None, align))
    go = _randn(out.shape, dtype, 7).to(device)
    run = lambda kern: _tc_run(kern, monkeypatch, lambda: ops.block_sparse_attn_backward(
        go, None, q, k, v, out, lse, m, bs, True, None, [True, True, True], align))
    for g_name, a, s in zip("qkv", run("tc"), run("simt")):
        _same_nan(a.cpu(), s.cpu(), f"{dtype} {align} d{g_name}")
        assert torch.isnan(a).any(), f"{dtype} {align} d{g_name}: the NaN must reach it"


@pytest.mark.parametrize("device", _CUDA)
def test_tc_backward_dispatch(device, monkeypatch):
    """auto takes the tensor-core backward for half types at D = 64 / 128 (bitwise =tc), =tc refuses float32 with the
    reason, a 48 KB shared-memory limit falls back to the CUDA cores, only dq or only dk / dv can be asked, and the
    tensor-core backward is captured in a CUDA graph (no host sync)."""
    m = torch.ones(1, 1, 2, 2, dtype=torch.bool, device=device)
    q = torch.randn(1, 4, 100, 64, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 1, 70, 64, device=device, dtype=torch.bfloat16) for _ in range(2))
    out, lse = ops.block_sparse_attn(q, k, v, m, 64, True, None)
    go = torch.randn_like(out)
    bwd = lambda kern, qq=q, kk=k, vv=v, o=out, g=go, mask=(True, True, True): _tc_run(
        kern, monkeypatch, lambda: ops.block_sparse_attn_backward(g, None, qq, kk, vv, o, lse, m, 64, True, None,
                                                                  list(mask)))
    auto, forced = bwd("auto"), bwd("tc")
    assert all(torch.equal(a, b) for a, b in zip(auto, forced))
    only_q, only_kv = bwd("tc", mask=(True, False, False)), bwd("tc", mask=(False, True, True))
    assert torch.equal(only_q[0], forced[0]) and only_q[1].numel() == 0
    assert torch.equal(only_kv[1], forced[1]) and torch.equal(only_kv[2], forced[2]) and only_kv[0].numel() == 0
    qf, kf, vf, of, gf = q.float(), k.float(), v.float(), out.float(), go.float()
    _err(lambda: bwd("tc", qf, kf, vf, of, gf),
         r"block_sparse_attn_backward: PEFTCORE_SPARSE_ATTN_KERNEL=tc but the tensor-core backward cannot run: dtype")
    monkeypatch.setenv("PEFTCORE_SPARSE_ATTN_SMEM_LIMIT", "49152")
    small = bwd("auto")
    monkeypatch.delenv("PEFTCORE_SPARSE_ATTN_SMEM_LIMIT")
    simt = bwd("simt")
    assert all(torch.equal(a, b) for a, b in zip(small, simt))  # the 48 KB call took the CUDA cores
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        bwd("tc")
        monkeypatch.setenv("PEFTCORE_SPARSE_ATTN_KERNEL", "tc")
        with torch.cuda.graph(graph, stream=s):
            captured = ops.block_sparse_attn_backward(go, None, q, k, v, out, lse, m, 64, True, None,
                                                      [True, True, True])
        monkeypatch.delenv("PEFTCORE_SPARSE_ATTN_KERNEL")
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(captured, forced))
