"""sparse_attn ops: every op through the shared checks (peftcore.testing) against an independent plain-torch
reference (dense attention with the explicit token mask the block mask and causal imply, in float64 by the
helper), plus empty rows, SDPA and FlexAttention agreement, CSR conversion, bad inputs and saved memory."""
import math

import pytest
import torch
import torch.nn.functional as F

import peftcore  # noqa: F401
from peftcore.ops import sparse_attn as sa
from peftcore.testing import OpCase, Sample, devices, op_test_suite

ops = torch.ops.peftcore
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# Plain-torch references.


def token_mask(block_mask, B, Hq, Lq, Lk, block_size, causal):
    """[B, Hq, Lq, Lk] bool: the token-level mask a block mask (and causal, top-left aligned) implies."""
    m = block_mask.expand(B, Hq, -1, -1)
    m = m.repeat_interleave(block_size, 2)[:, :, :Lq].repeat_interleave(block_size, 3)[..., :Lk]
    if causal:
        m = m & torch.ones(Lq, Lk, dtype=torch.bool, device=m.device).tril()
    return m


def _stat(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def ref_attn(q, k, v, block_mask, block_size, causal=False, scale=None):
    """(out, lse) of dense masked attention; rows with no visible key give out 0, lse -inf (and zero grads)."""
    B, Hq, Lq, D = q.shape
    g = Hq // k.shape[1]
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    m = token_mask(block_mask, B, Hq, Lq, k.shape[2], block_size, causal)
    empty = ~m.any(-1, keepdim=True)
    s = (q @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~m, float("-inf")).masked_fill(empty, 0.0)  # empty rows: finite, then zeroed below
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - lse).masked_fill(~m, 0.0)
    out = p @ vv
    lse = lse.masked_fill(empty, float("-inf")).squeeze(-1)
    return out, lse.to(_stat(q.dtype))


def ref_attn_backward(grad_out, grad_lse, q, k, v, out, lse, block_mask, block_size, causal, scale, output_mask):
    with torch.enable_grad():
        qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
        o, l = ref_attn(qq, kk, vv, block_mask, block_size, causal, scale)
        outs, seeds = [o], [grad_out]
        if grad_lse is not None:
            outs.append(l)
            seeds.append(grad_lse.to(l.dtype))
        grads = torch.autograd.grad(outs, (qq, kk, vv), seeds)
    return tuple(gr if want else t.new_empty(0) for gr, t, want in zip(grads, (q, k, v), output_mask))


def ref_block_pool(q, k, block_size, causal=False, scale=None):
    """Block max-pool of the full softmax map (zero padding: probabilities are >= 0)."""
    B, Hq, Lq, D = q.shape
    Lk = k.shape[2]
    kk = k.repeat_interleave(Hq // k.shape[1], 1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = (q @ kk.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~torch.ones(Lq, Lk, dtype=torch.bool).tril(), float("-inf"))
    p = torch.softmax(s, -1)
    qb, kb = -(-Lq // block_size), -(-Lk // block_size)
    p = F.pad(p, (0, kb * block_size - Lk, 0, qb * block_size - Lq))
    return p.view(B, Hq, qb, block_size, kb, block_size).amax(dim=(3, 5)).to(_stat(q.dtype))


# ---------------------------------------------------------------------------------------------------------------
# Samples. Lengths are not block multiples, Lq != Lk, GQA and MQA, causal and not, broadcast masks, empty rows.


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
    """(B, Hq, Hkv, Lq, Lk, D, bs, causal, mask shape (Bm, Hm), empty query block, scale)."""
    if dtype == torch.float64:  # gradcheck sizes
        return [(1, 2, 1, 7, 9, 4, 4, True, (1, 2), None, None),
                (2, 2, 2, 6, 5, 3, 4, False, (2, 1), 1, 0.7),
                (1, 2, 1, 9, 6, 4, 2, True, (1, 1), 2, None)]
    return [(2, 4, 2, 70, 70, 32, 16, True, (2, 4), None, None),
            (1, 4, 1, 45, 100, 16, 32, False, (1, 1), 1, 0.3),
            (2, 2, 2, 100, 37, 16, 16, True, (2, 1), None, None),
            (1, 2, 1, 33, 64, 32, 16, True, (1, 2), 0, None)]


def attn_samples(device, dtype, requires_grad):
    for i, (B, Hq, Hkv, Lq, Lk, D, bs, causal, (mb, mh), empty, scale) in enumerate(_configs(dtype)):
        if device == "cuda":  # the CUDA kernels take D in {64, 128, 256}
            D = 64 if D <= 16 else 128
        q = _randn((B, Hq, Lq, D), dtype, 10 + i).to(device)
        k = _randn((B, Hkv, Lk, D), dtype, 20 + i).to(device)
        v = _randn((B, Hkv, Lk, D), dtype, 30 + i).to(device)
        m = _mask((mb, mh, -(-Lq // bs), -(-Lk // bs)), 40 + i, empty_row=empty).to(device)
        yield Sample((q, k, v, m, bs, causal, scale),
                     name=f"B{B} H{Hq}/{Hkv} L{Lq}x{Lk} D{D} bs{bs} causal={causal} mask{(mb, mh)} empty={empty}")


def attn_backward_samples(device, dtype, requires_grad):
    for j, s in enumerate(attn_samples(device, dtype, False)):
        q, k, v, m, bs, causal, scale = s.args
        out, lse = ops.block_sparse_attn(q, k, v, m, bs, causal, scale)
        go = _randn(q.shape, dtype, 50 + j).to(device)
        glse = _randn(lse.shape, lse.dtype, 60 + j).to(device) if j % 2 == 0 else None
        for mask in ([True, True, True], [True, False, False], [False, True, True]):
            yield Sample((go, glse, q, k, v, out, lse, m, bs, causal, scale, mask),
                         name=f"{s.name}/glse={glse is not None}/{mask}")
            if dtype == torch.float64:
                break


def pool_samples(device, dtype, requires_grad):
    for s in attn_samples(device, dtype, False):
        q, k, v, m, bs, causal, scale = s.args
        yield Sample((q, k, bs, causal, scale), name=s.name)


CASES = [
    OpCase("block_sparse_attn", ops.block_sparse_attn, attn_samples, ref_attn, ALL_DTYPES, grad_args=(0, 1, 2)),
    OpCase("block_sparse_attn_backward", ops.block_sparse_attn_backward, attn_backward_samples, ref_attn_backward,
           ALL_DTYPES),
    OpCase("attn_block_pool", ops.attn_block_pool, pool_samples, ref_block_pool, ALL_DTYPES),
]

test_opcheck, test_reference, test_gradcheck, test_compile = op_test_suite(CASES)


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


def test_bad_inputs():
    q, k, v = torch.randn(1, 4, 20, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    m = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    A = ops.block_sparse_attn
    _err(lambda: A(q, torch.randn(1, 3, 20, 8), torch.randn(1, 3, 20, 8), m, 16, False, None),
         r"block_sparse_attn: .*Hq % Hkv == 0.*Hq = 4 and Hkv = 3")
    _err(lambda: A(q, k, v, m.int(), 16, False, None), r"block_sparse_attn: block_mask must be bool, got Int")
    _err(lambda: A(q, k, v, torch.ones(1, 1, 2, 3, dtype=torch.bool), 16, False, None),
         r"block_sparse_attn: block_mask must have shape \[1 or 1, 4 or 1, 2, 2\].*got \[1, 1, 2, 3\]")
    _err(lambda: A(q, k, v, torch.ones(1, 2, 2, 2, dtype=torch.bool), 16, False, None),
         r"block_sparse_attn: block_mask must have shape")
    _err(lambda: A(q, k, v, m, 0, False, None), r"block_sparse_attn: block_size must be > 0, got 0")
    _err(lambda: A(q, k.half(), v, m, 16, False, None), r"block_sparse_attn: k has dtype Half but q has Float")
    _err(lambda: A(q, k, v.half(), m, 16, False, None), r"block_sparse_attn: v has dtype Half but q has Float")
    _err(lambda: A(q[0], k, v, m, 16, False, None), r"block_sparse_attn: q must be 4-D, got shape \[4, 20, 8\]")
    _err(lambda: A(q, k[..., :4], v[..., :4], m, 16, False, None), r"block_sparse_attn: k must have head dim 8")
    _err(lambda: A(q, k, v[:, :, :10], m, 16, False, None), r"block_sparse_attn: v must have k's shape")
    _err(lambda: A(q.int(), k.int(), v.int(), m, 16, False, None), r"block_sparse_attn: q must be float32")
    _err(lambda: A(q, torch.randn(2, 2, 20, 8), torch.randn(2, 2, 20, 8), m, 16, False, None),
         r"block_sparse_attn: k must have batch size 1")
    out, lse = A(q, k, v, m, 16, False, None)
    B = ops.block_sparse_attn_backward
    _err(lambda: B(out, None, q, k, v, out, lse.double(), m, 16, False, None, [True] * 3),
         r"block_sparse_attn_backward: lse must be Float for q of dtype Float, got Double")
    _err(lambda: B(out[:, :, :5], None, q, k, v, out, lse, m, 16, False, None, [True] * 3),
         r"block_sparse_attn_backward: grad_out must have q's shape")
    _err(lambda: ops.attn_block_pool(q, k, -1, False, None), r"attn_block_pool: block_size must be > 0, got -1")
    _err(lambda: ops.attn_block_pool(q, k.half(), 16, False, None), r"attn_block_pool: k has dtype Half")


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
