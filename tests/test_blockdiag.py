"""blockdiag ops: every op through the shared checks (peftcore.testing), Monarch against fly's two-bmm form,
bad-input messages, and the fused backward's saved tensors. The references are plain torch, here only."""
import pytest
import torch

import peftcore  # noqa: F401
from peftcore.ops import blockdiag as bd
from peftcore.testing import OpCase, Sample, check_double_backward_refused, check_errors_isolated, devices, op_test_suite

ops = torch.ops.peftcore
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
DEVICES = devices()


# ---------------------------------------------------------------------------------------------------------------
# Plain-torch references.


def ref_blockdiag(x, blocks):
    """y[..., j*bo:(j+1)*bo] = x[..., j*bi:(j+1)*bi] @ blocks[j]^T, one bmm between permutes."""
    nb, bo, bi = blocks.shape
    batch = x.shape[:-1]
    xb = x.reshape(-1, nb, bi).transpose(0, 1)  # [nb, B, bi]
    return torch.bmm(xb, blocks.transpose(-1, -2)).transpose(0, 1).reshape(*batch, nb * bo)


def ref_blockdiag_backward(g, x, blocks, mask):
    nb, bo, bi = blocks.shape
    gb = g.reshape(-1, nb, bo).transpose(0, 1)  # [nb, B, bo]
    xb = x.reshape(-1, nb, bi).transpose(0, 1)
    gx = torch.bmm(gb, blocks).transpose(0, 1).reshape(x.shape) if mask[0] else x.new_empty(0)
    gw = torch.bmm(gb.transpose(1, 2), xb) if mask[1] else blocks.new_empty(0)
    return gx, gw


def ref_monarch_two_bmm(x, w1, w2):
    """HazyResearch fly's blockdiag_butterfly_multiply (reference form), re-expressed in plain torch."""
    batch = x.shape[:-1]
    k, q, p = w1.shape
    l, s, r = w2.shape
    B = x.reshape(-1, x.shape[-1]).shape[0]
    x = x.reshape(B, k, p).transpose(0, 1)
    out1 = torch.bmm(x, w1.transpose(-1, -2))  # [k, B, q]
    out1 = out1.transpose(0, 1).reshape(B, r, l).transpose(-1, -2).contiguous().transpose(0, 1)  # [l, B, r]
    out2 = torch.bmm(out1, w2.transpose(-1, -2))  # [l, B, s]
    return out2.permute(1, 2, 0).reshape(*batch, s * l)


def ref_monarch_with_h(x, w1, w2):
    """(y, h): the two-bmm form's output and its intermediate out1 [B, l, r] (stage-1 output after the stride
    permutation) flattened to [..., l*r] (h is saved for the backward, not differentiable)."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    batch = x.shape[:-1]
    out1 = torch.bmm(x.reshape(-1, k, p).transpose(0, 1), w1.transpose(-1, -2)).transpose(0, 1)  # [B, k, q]
    h = out1.reshape(-1, r, l).transpose(-1, -2).reshape(*batch, l * r)
    return ref_monarch_two_bmm(x, w1, w2), h.detach()


def ref_monarch_backward(g, x, w1, w2, mask, h=None):
    with torch.enable_grad():
        xs, a, b = (t.detach().requires_grad_(True) for t in (x, w1, w2))
        gx, g1, g2 = torch.autograd.grad(ref_monarch_two_bmm(xs, a, b), (xs, a, b), g)
    return (gx if mask[0] else x.new_empty(0), g1 if mask[1] else w1.new_empty(0),
            g2 if mask[2] else w2.new_empty(0))


# ---------------------------------------------------------------------------------------------------------------
# Samples. Sizes: bo != bi, feature counts not multiples of 8, tiles with token tails, r != s, q != p.


def _randn(shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def _bd_configs(dtype):
    if dtype == torch.float64:
        return [((3, 2), 3, 5, 4), ((7,), 2, 3, 6), ((5,), 1, 4, 4)]
    small = [((2, 37), 3, 5, 7), ((70,), 4, 20, 17), ((5,), 1, 9, 9), ((67,), 2, 33, 40)]
    return small + BD_LARGE if dtype == torch.float32 else small


# float32 shapes crossing the CPU kernels' switches (float64 gradcheck runs the scalar kernels only). Token tiles are
# tile_tokens(widest features) rows: 64 up to 1024 features, fewer beyond; tiles go to 2 threads in contiguous ranges,
# so >= 3 tiles put two tiles on one thread (its weight-gradient accumulator is reused).
BD_LARGE = [
    ((200,), 4, 20, 17),   # 4 tiles on 2 threads; 4 x 16 register tiles with 4-wide column tails
    ((70,), 2, 130, 128),  # blocks >= 128 x 128: BLAS per tile forward (and the 6-row tail tile on the micro-kernel),
                           # the batched-GEMM backward (bmm_blockdiag_backward)
    ((150,), 1, 16, 512),  # tiled backward whose weight-gradient GEMM (K = tile tokens) takes BLAS, accumulating
    ((60,), 16, 20, 130),  # 2080 input features: 28-token tiles
]


def _monarch_configs(dtype):
    """(batch, k, q, p, l, s, r) with l*r == k*q."""
    if dtype == torch.float64:
        return [((3, 2), 2, 3, 4, 3, 5, 2), ((5,), 3, 2, 3, 2, 2, 3)]
    small = [((2, 37), 4, 6, 5, 3, 7, 8), ((70,), 8, 16, 16, 8, 16, 16), ((9,), 3, 10, 7, 5, 4, 6),
             ((66,), 2, 20, 19, 10, 17, 4)]
    return small + MONARCH_LARGE if dtype == torch.float32 else small


MONARCH_LARGE = [
    ((200,), 4, 20, 16, 8, 24, 10),      # fused forward / tiled backward over 4 tiles on 2 threads, q % l != 0
    ((70,), 2, 128, 128, 16, 16, 16),    # fused, stage 1 on BLAS per tile; tiled backward with BLAS GEMMs
    ((40,), 2, 128, 128, 2, 128, 128),   # both blocks >= 128 x 128: batched-GEMM backward and with_h, fused BLAS forward
    ((33,), 2, 150, 128, 4, 220, 75),    # batched-GEMM paths with l not dividing q (the general permuting copies)
    ((21,), 9, 128, 128, 9, 128, 128),   # 1152 features: 56-token tiles, so the forward is the batched-GEMM form
]


def blockdiag_samples(device, dtype, requires_grad):
    for i, (batch, nb, bo, bi) in enumerate(_bd_configs(dtype)):
        x = _randn((*batch, nb * bi), dtype, device, 10 + i)
        w = _randn((nb, bo, bi), dtype, device, 20 + i, scale=bi ** -0.5)
        yield Sample((x, w), name=f"{batch}/nb={nb}/bo={bo}/bi={bi}")


def blockdiag_backward_samples(device, dtype, requires_grad):
    for s in blockdiag_samples(device, dtype, False):
        x, w = s.args
        g = _randn((*x.shape[:-1], w.shape[0] * w.shape[1]), dtype, device, 99)
        masks = ([True, True], [True, False]) if sum(x.shape[:-1]) % 2 else ([True, True], [False, True])
        for mask in masks if x.shape[-1] * w.shape[1] < 4096 else masks[:1]:
            yield Sample((g, x, w, mask), name=f"{s.name}/{mask}")


def monarch_samples(device, dtype, requires_grad):
    for i, (batch, k, q, p, l, s, r) in enumerate(_monarch_configs(dtype)):
        x = _randn((*batch, k * p), dtype, device, 10 + i)
        w1 = _randn((k, q, p), dtype, device, 20 + i, scale=p ** -0.5)
        w2 = _randn((l, s, r), dtype, device, 30 + i, scale=r ** -0.5)
        yield Sample((x, w1, w2), name=f"{batch}/w1={k}x{q}x{p}/w2={l}x{s}x{r}")


def monarch_backward_samples(device, dtype, requires_grad):
    for sm in monarch_samples(device, dtype, False):
        x, w1, w2 = sm.args
        g = _randn((*x.shape[:-1], w2.shape[0] * w2.shape[1]), dtype, device, 99)
        masks = ([True, True, True], [False, True, False] if x.shape[0] % 2 else [True, False, True])
        for mask in masks if x.shape[-1] < 128 else masks[:1]:
            yield Sample((g, x, w1, w2, mask), name=f"{sm.name}/{mask}")
        # With the saved intermediate (from monarch_matmul_with_h), exact for float64 x.
        h = ref_monarch_with_h(x.double(), w1.double(), w2.double())[1].to(dtype)
        yield Sample((g, x, w1, w2, [True, True, True], h), name=f"{sm.name}/saved-h")


CASES = [
    OpCase("blockdiag_matmul", ops.blockdiag_matmul, blockdiag_samples, ref_blockdiag, ALL_DTYPES, grad_args=(0, 1)),
    OpCase("blockdiag_matmul_backward", ops.blockdiag_matmul_backward, blockdiag_backward_samples,
           ref_blockdiag_backward, ALL_DTYPES),
    OpCase("monarch_matmul", ops.monarch_matmul, monarch_samples, ref_monarch_two_bmm, ALL_DTYPES,
           grad_args=(0, 1, 2)),
    OpCase("monarch_matmul_with_h", ops.monarch_matmul_with_h, monarch_samples, ref_monarch_with_h, ALL_DTYPES,
           grad_args=(0, 1, 2)),
    OpCase("monarch_matmul_backward", ops.monarch_matmul_backward, monarch_backward_samples, ref_monarch_backward,
           ALL_DTYPES),
]

test_opcheck, test_reference, test_gradcheck, test_compile = op_test_suite(CASES)


# ---------------------------------------------------------------------------------------------------------------
# Semantics beyond the shared checks.


@pytest.mark.parametrize("k,q,p,l,s,r,T", [(4, 64, 64, 4, 64, 64, 300), (16, 64, 64, 16, 64, 64, 130),
                                           (32, 32, 32, 32, 32, 32, 257), (4, 160, 130, 5, 90, 128, 70),
                                           (2, 128, 128, 2, 128, 128, 40), (2, 384, 384, 2, 384, 384, 20),
                                           (2, 150, 128, 4, 220, 75, 33), (9, 128, 128, 9, 128, 128, 21)])
def test_monarch_equals_two_bmm_float32(k, q, p, l, s, r, T):
    """Larger shapes than the suite (micro-kernel and BLAS-on-tile forward, token tails, at 128x128 blocks the
    batched-GEMM backward, and the batched-GEMM forward when wide features leave small token tiles): the fused op
    equals fly's two-bmm form, forward and every gradient."""
    x = _randn((T, k * p), torch.float32, "cpu", 1)
    w1 = _randn((k, q, p), torch.float32, "cpu", 2, scale=p ** -0.5)
    w2 = _randn((l, s, r), torch.float32, "cpu", 3, scale=r ** -0.5)
    g = _randn((T, l * s), torch.float32, "cpu", 4)
    got = bd.monarch_matmul(x, w1, w2)
    ref = ref_monarch_two_bmm(x.double(), w1.double(), w2.double())
    torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)
    gg = bd.monarch_matmul_backward(g, x, w1, w2)
    rg = ref_monarch_backward(g.double(), x.double(), w1.double(), w2.double(), [True] * 3)
    for a, b in zip(gg, rg):
        torch.testing.assert_close(a.double(), b, atol=2e-3, rtol=1e-4)


def test_blockdiag_is_monarch_stage_one():
    """blockdiag_matmul(x, w1) equals the two-bmm form's first stage (its [B, k*q] intermediate)."""
    k, q, p, T = 3, 5, 4, 7
    x = _randn((T, k * p), torch.float64, "cpu", 1)
    w1 = _randn((k, q, p), torch.float64, "cpu", 2)
    h = torch.bmm(x.reshape(T, k, p).transpose(0, 1), w1.transpose(-1, -2)).transpose(0, 1).reshape(T, k * q)
    torch.testing.assert_close(bd.blockdiag_matmul(x, w1), h)


def test_monarch_saves_only_inputs():
    """The op's own autograd (and the wrapper with save_intermediate=False) keeps x and the weights, never the
    [T, k*q] intermediate; the wrapper's default training path keeps h too (one GEMM less in the backward)."""
    x = _randn((16, 24), torch.float32, "cpu", 1).requires_grad_(True)
    w1 = _randn((4, 6, 6), torch.float32, "cpu", 2).requires_grad_(True)
    w2 = _randn((3, 5, 8), torch.float32, "cpu", 3).requires_grad_(True)
    for fn, extra in ((lambda: ops.monarch_matmul(x, w1, w2), []),
                      (lambda: bd.monarch_matmul(x, w1, w2, save_intermediate=False), []),
                      (lambda: bd.monarch_matmul(x, w1, w2), [torch.Size([16, 24])])):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            fn()
        assert sorted(t.shape for t in saved) == sorted([x.shape, w1.shape, w2.shape] + extra)


def test_monarch_wrapper_paths_agree():
    """Default (saved h), recompute and no-grad forward give the same values and gradients."""
    x = _randn((33, 24), torch.float32, "cpu", 1).requires_grad_(True)
    w1 = _randn((4, 6, 6), torch.float32, "cpu", 2).requires_grad_(True)
    w2 = _randn((3, 5, 8), torch.float32, "cpu", 3).requires_grad_(True)
    g = _randn((33, 15), torch.float32, "cpu", 4)
    outs = []
    for save in (True, False):
        y = bd.monarch_matmul(x, w1, w2, save_intermediate=save)
        outs.append((y, *torch.autograd.grad(y, (x, w1, w2), g)))
    with torch.no_grad():
        y0 = bd.monarch_matmul(x, w1, w2)
    torch.testing.assert_close(y0, outs[0][0])
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("k,q,p,l,s,r,T", [(4, 64, 64, 4, 64, 64, 70), (2, 160, 160, 2, 160, 160, 37),
                                           (2, 400, 400, 2, 400, 400, 9), (2, 150, 128, 4, 220, 75, 33),
                                           (4, 128, 128, 16, 96, 32, 20)])
def test_monarch_with_h_large_blocks(k, q, p, l, s, r, T):
    """The saved-h forward on the micro-kernel, BLAS-on-tile and batched-GEMM paths: h and y equal the two-bmm
    form's, and the backward reading h equals the recomputing one."""
    x = _randn((T, k * p), torch.float32, "cpu", 1)
    w1 = _randn((k, q, p), torch.float32, "cpu", 2, scale=p ** -0.5)
    w2 = _randn((l, s, r), torch.float32, "cpu", 3, scale=r ** -0.5)
    g = _randn((T, l * s), torch.float32, "cpu", 4)
    y, h = bd.monarch_matmul_with_h(x, w1, w2)
    ry, rh = ref_monarch_with_h(x.double(), w1.double(), w2.double())
    torch.testing.assert_close(y.double(), ry, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h.double(), rh, atol=1e-4, rtol=1e-4)
    for a, b in zip(bd.monarch_matmul_backward(g, x, w1, w2, h=h), bd.monarch_matmul_backward(g, x, w1, w2)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_compile_inductor_training_step():
    import torch._dynamo

    torch._dynamo.reset()
    x = _randn((6, 24), torch.float32, "cpu", 1).requires_grad_(True)
    w1 = _randn((4, 6, 6), torch.float32, "cpu", 2).requires_grad_(True)
    w2 = _randn((3, 5, 8), torch.float32, "cpu", 3).requires_grad_(True)

    def step(x, w1, w2):
        return (bd.monarch_matmul(x, w1, w2).relu() ** 2).sum()

    y = torch.compile(step, fullgraph=True)(x, w1, w2)
    got = torch.autograd.grad(y, (x, w1, w2))
    ref = torch.autograd.grad(step(x, w1, w2), (x, w1, w2))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: the message names the op and the offending value.

_x = torch.randn(4, 12)
_w1 = torch.randn(3, 4, 4)  # k=3, q=4, p=4: in = 12, k*q = 12
_w2 = torch.randn(2, 5, 6)  # l*r = 12, out = 10


@pytest.mark.parametrize("fn,match", [
    (lambda: ops.blockdiag_matmul(_x, torch.randn(3, 4)), r"blockdiag_matmul: blocks must be 3-D, got shape \[3, 4\]"),
    (lambda: ops.blockdiag_matmul(_x, torch.randn(5, 2, 2)), r"blockdiag_matmul: x must have last dim 10"),
    (lambda: ops.blockdiag_matmul(_x, _w1.double()), r"blockdiag_matmul: blocks has dtype Double but x has Float"),
    (lambda: ops.blockdiag_matmul(_x.int(), _w1), r"blockdiag_matmul: x must be float32.*got Int"),
    (lambda: ops.monarch_matmul(_x, _w1, torch.randn(2, 5, 5)), r"monarch_matmul: w2 \[l, s, r\] must have l\*r == k\*q.*\[2, 5, 5\]"),
    (lambda: ops.monarch_matmul(torch.randn(4, 13), _w1, _w2), r"monarch_matmul: x must have last dim 12.*got shape \[4, 13\]"),
    (lambda: ops.monarch_matmul(_x, _w1.half(), _w2), r"monarch_matmul: w1 has dtype Half but x has Float"),
    (lambda: ops.monarch_matmul(_x, _w1, torch.randn(2, 0, 6)), r"monarch_matmul: w2 must have non-empty dims"),
    (lambda: ops.monarch_matmul_backward(torch.randn(4, 11), _x, _w1, _w2, [True] * 3),
     r"monarch_matmul_backward: grad_out must have last dim 10"),
    (lambda: ops.monarch_matmul_backward(torch.randn(5, 10), _x, _w1, _w2, [True] * 3),
     r"monarch_matmul_backward: grad_out and x must have the same leading"),
    (lambda: ops.monarch_matmul_backward(torch.randn(4, 10), _x, _w1, _w2, [True] * 3, torch.randn(4, 11)),
     r"monarch_matmul_backward: h must have x's leading dims and last dim l\*r = k\*q = 12.*got shape \[4, 11\]"),
    (lambda: ops.monarch_matmul_backward(torch.randn(4, 10), _x, _w1, _w2, [True] * 3, torch.randn(4, 12).double()),
     r"monarch_matmul_backward: h has dtype Double but x has Float"),
    (lambda: ops.monarch_matmul_with_h(_x, _w1, torch.randn(2, 5, 5)),
     r"monarch_matmul_with_h: w2 \[l, s, r\] must have l\*r == k\*q"),
    (lambda: ops.blockdiag_matmul_backward(torch.randn(4, 12).double(), _x, _w1, [True, True]),
     r"blockdiag_matmul_backward: blocks has dtype Float but grad_out has Double"),
])
def test_bad_inputs(fn, match):
    with pytest.raises(RuntimeError, match=match):
        fn()


def test_device_mismatch_in_fake():
    """A weight on another device is refused while tracing too (meta stands in for a second device)."""
    from peftcore.ops.blockdiag import _check_monarch

    with pytest.raises(RuntimeError, match="monarch_matmul: w1 is on meta but x is on cpu"):
        _check_monarch("monarch_matmul", _x, _w1.to("meta"), _w2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_monarch_batched_gemm_path_dtypes(dtype):
    """The batched-GEMM path (128x128 blocks and up) and its permuting copies in 2- and 8-byte dtypes: forward,
    saved h and every gradient against the float64 two-bmm form."""
    k, q, p, l, s, r, T = 2, 160, 128, 4, 150, 80, 19
    x = _randn((T, k * p), dtype, "cpu", 1)
    w1 = _randn((k, q, p), dtype, "cpu", 2, scale=p ** -0.5)
    w2 = _randn((l, s, r), dtype, "cpu", 3, scale=r ** -0.5)
    g = _randn((T, l * s), dtype, "cpu", 4)
    y, h = bd.monarch_matmul_with_h(x, w1, w2)
    ry, rh = ref_monarch_with_h(x.double(), w1.double(), w2.double())
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(y.double(), ry, **tol)
    torch.testing.assert_close(h.double(), rh, **tol)
    rg = ref_monarch_backward(g.double(), x.double(), w1.double(), w2.double(), [True] * 3)
    for hh in (h, None):
        for a, b in zip(bd.monarch_matmul_backward(g, x, w1, w2, h=hh), rg):
            torch.testing.assert_close(a.double(), b, **tol)


# ---------------------------------------------------------------------------------------------------------------
# Hostile arguments to every op, backward ops called directly included, in a child process (a crash fails the case).

_BAD_PRELUDE = """
x = torch.randn(4, 12)
w1 = torch.randn(3, 4, 4)   # k=3, q=4, p=4: in = 12, k*q = 12
w2 = torch.randn(2, 5, 6)   # l=2, s=5, r=6: l*r = 12, out = 10
g = torch.randn(4, 10)
gb = torch.randn(4, 12)     # blockdiag_matmul(x, w1) has 12 outputs
h = torch.randn(4, 12)
T3 = [True, True, True]
def empty_ok():
    y = ops.blockdiag_matmul(torch.randn(0, 12), w1)
    gx, gw = ops.blockdiag_matmul_backward(torch.randn(0, 12), torch.randn(0, 12), w1, [True, True])
    assert y.shape == (0, 12) and gx.shape == (0, 12) and torch.equal(gw, torch.zeros_like(w1))
    y, hh = ops.monarch_matmul_with_h(torch.randn(2, 0, 12), w1, w2)
    assert y.shape == (2, 0, 10) and hh.shape == (2, 0, 12)
    assert ops.monarch_matmul(torch.randn(0, 12), w1, w2).shape == (0, 10)
    for hh in (None, torch.randn(0, 12)):
        gx, g1, g2 = ops.monarch_matmul_backward(torch.randn(0, 10), torch.randn(0, 12), w1, w2, T3, hh)
        assert gx.shape == (0, 12) and torch.equal(g1, torch.zeros_like(w1)) and torch.equal(g2, torch.zeros_like(w2))
    big1, big2 = torch.randn(2, 128, 128), torch.randn(2, 128, 128)
    gx, g1, g2 = ops.monarch_matmul_backward(torch.randn(0, 256), torch.randn(0, 256), big1, big2, T3)
    assert gx.shape == (0, 256) and not g1.any() and not g2.any()
    gx, gw = ops.blockdiag_matmul_backward(torch.randn(0, 256), torch.randn(0, 256), big1, [True, True])
    assert gx.shape == (0, 256) and not gw.any()
    raise RuntimeError("empty ok")
"""

_BAD_CASES = [
    # blockdiag_matmul
    ("bd-x-int", "ops.blockdiag_matmul(x.int(), w1)", r"blockdiag_matmul: x must be float32.*got Int"),
    ("bd-x-scalar", "ops.blockdiag_matmul(torch.tensor(1.0), w1)", r"blockdiag_matmul: x must have at least 1 dim"),
    ("bd-blocks-2d", "ops.blockdiag_matmul(x, torch.randn(3, 4))", r"blockdiag_matmul: blocks must be 3-D, got shape \[3, 4\]"),
    ("bd-blocks-4d", "ops.blockdiag_matmul(x, torch.randn(1, 3, 4, 4))", r"blockdiag_matmul: blocks must be 3-D"),
    ("bd-blocks-dtype", "ops.blockdiag_matmul(x, w1.double())", r"blockdiag_matmul: blocks has dtype Double but x has Float"),
    ("bd-blocks-meta", "ops.blockdiag_matmul(x, w1.to('meta'))", r"blockdiag_matmul: blocks is on meta but x is on cpu"),
    ("bd-blocks-zero-nb", "ops.blockdiag_matmul(torch.randn(4, 0), torch.randn(0, 4, 4))", r"blockdiag_matmul: blocks must have non-empty dims, got shape \[0, 4, 4\]"),
    ("bd-blocks-zero-bo", "ops.blockdiag_matmul(x, torch.randn(3, 0, 4))", r"blockdiag_matmul: blocks must have non-empty dims"),
    ("bd-blocks-count", "ops.blockdiag_matmul(x, torch.randn(5, 2, 2))", r"blockdiag_matmul: x must have last dim 10 .*got shape \[4, 12\]"),
    ("bd-blocks-not-dividing", "ops.blockdiag_matmul(torch.randn(4, 13), w1)", r"blockdiag_matmul: x must have last dim 12"),
    # blockdiag_matmul_backward, called directly
    ("bdb-grad-width", "ops.blockdiag_matmul_backward(torch.randn(4, 11), x, w1, [True, True])", r"blockdiag_matmul_backward: grad_out must have last dim 12"),
    ("bdb-grad-tokens", "ops.blockdiag_matmul_backward(torch.randn(5, 12), x, w1, [True, True])", r"blockdiag_matmul_backward: grad_out and x must have the same leading"),
    ("bdb-grad-rank", "ops.blockdiag_matmul_backward(torch.randn(2, 2, 12), x, w1, [True, True])", r"blockdiag_matmul_backward: grad_out and x must have the same leading"),
    ("bdb-grad-dtype", "ops.blockdiag_matmul_backward(gb.double(), x, w1, [True, True])", r"blockdiag_matmul_backward: blocks has dtype Float but grad_out has Double"),
    ("bdb-grad-int", "ops.blockdiag_matmul_backward(gb.int(), x, w1, [True, True])", r"blockdiag_matmul_backward: grad_out must be float32.*Int"),
    ("bdb-grad-meta", "ops.blockdiag_matmul_backward(gb.to('meta'), x, w1, [True, True])", r"blockdiag_matmul_backward: .*(is on meta|on meta).*"),
    ("bdb-x-width", "ops.blockdiag_matmul_backward(gb, torch.randn(4, 9), w1, [True, True])", r"blockdiag_matmul_backward: x must have last dim 12"),
    ("bdb-x-int", "ops.blockdiag_matmul_backward(gb, x.long(), w1, [True, False])", r"blockdiag_matmul_backward: x must be float32.*Long"),
    ("bdb-blocks-2d", "ops.blockdiag_matmul_backward(gb, x, torch.randn(12, 12), [True, True])", r"blockdiag_matmul_backward: blocks must be 3-D"),
    ("bdb-blocks-meta", "ops.blockdiag_matmul_backward(gb, x, w1.to('meta'), [False, True])", r"blockdiag_matmul_backward: blocks is on meta but x is on cpu"),
    ("bdb-large-grad-tokens", "ops.blockdiag_matmul_backward(torch.randn(3, 256), torch.randn(4, 256), torch.randn(2, 128, 128), [True, True])",
     r"blockdiag_matmul_backward: grad_out and x must have the same leading"),
    ("bdb-mask-length", "ops.blockdiag_matmul_backward(gb, x, w1, [True])", r"List with 1 elements.*size 2"),
    # monarch_matmul / _with_h
    ("mm-x-int", "ops.monarch_matmul(x.int(), w1, w2)", r"monarch_matmul: x must be float32.*Int"),
    ("mm-w1-2d", "ops.monarch_matmul(x, torch.randn(12, 12), w2)", r"monarch_matmul: w1 must be 3-D"),
    ("mm-w2-dtype", "ops.monarch_matmul(x, w1, w2.half())", r"monarch_matmul: w2 has dtype Half but x has Float"),
    ("mm-w2-meta", "ops.monarch_matmul(x, w1, w2.to('meta'))", r"monarch_matmul: w2 is on meta but x is on cpu"),
    ("mm-lr-kq", "ops.monarch_matmul(x, w1, torch.randn(2, 5, 5))", r"monarch_matmul: w2 \[l, s, r\] must have l\*r == k\*q.*\[2, 5, 5\]"),
    ("mm-x-width", "ops.monarch_matmul(torch.randn(4, 13), w1, w2)", r"monarch_matmul: x must have last dim 12.*got shape \[4, 13\]"),
    ("mm-w2-empty", "ops.monarch_matmul(x, w1, torch.randn(2, 0, 6))", r"monarch_matmul: w2 must have non-empty dims"),
    ("mmh-lr-kq", "ops.monarch_matmul_with_h(x, w1, torch.randn(3, 5, 6))", r"monarch_matmul_with_h: w2 \[l, s, r\] must have l\*r == k\*q"),
    ("mmh-w1-meta", "ops.monarch_matmul_with_h(x, w1.to('meta'), w2)", r"monarch_matmul_with_h: w1 is on meta but x is on cpu"),
    # monarch_matmul_backward, called directly (h of every wrong kind)
    ("mmb-grad-width", "ops.monarch_matmul_backward(torch.randn(4, 11), x, w1, w2, T3)", r"monarch_matmul_backward: grad_out must have last dim 10"),
    ("mmb-grad-tokens", "ops.monarch_matmul_backward(torch.randn(5, 10), x, w1, w2, T3)", r"monarch_matmul_backward: grad_out and x must have the same leading"),
    ("mmb-grad-dtype", "ops.monarch_matmul_backward(g.double(), x, w1, w2, T3)", r"monarch_matmul_backward: w1 has dtype Float but grad_out has Double"),
    ("mmb-x-width", "ops.monarch_matmul_backward(g, torch.randn(4, 8), w1, w2, T3)", r"monarch_matmul_backward: x must have last dim 12"),
    ("mmb-w2-bad", "ops.monarch_matmul_backward(g, x, w1, torch.randn(2, 5, 5), T3)", r"monarch_matmul_backward: w2 \[l, s, r\] must have l\*r == k\*q"),
    ("mmb-h-width", "ops.monarch_matmul_backward(g, x, w1, w2, T3, torch.randn(4, 11))", r"monarch_matmul_backward: h must have x's leading dims and last dim l\*r = k\*q = 12.*got shape \[4, 11\]"),
    ("mmb-h-tokens", "ops.monarch_matmul_backward(g, x, w1, w2, T3, torch.randn(3, 12))", r"monarch_matmul_backward: h must have x's leading dims.*got shape \[3, 12\]"),
    ("mmb-h-rank", "ops.monarch_matmul_backward(g, x, w1, w2, T3, torch.randn(48))", r"monarch_matmul_backward: h must have x's leading dims.*got shape \[48\]"),
    ("mmb-h-split-tokens", "ops.monarch_matmul_backward(g, x, w1, w2, T3, torch.randn(2, 2, 12))", r"monarch_matmul_backward: h must have x's leading dims"),
    ("mmb-h-dtype", "ops.monarch_matmul_backward(g, x, w1, w2, T3, h.double())", r"monarch_matmul_backward: h has dtype Double but x has Float"),
    ("mmb-h-meta", "ops.monarch_matmul_backward(g, x, w1, w2, T3, h.to('meta'))", r"monarch_matmul_backward: h is on meta but x is on cpu"),
    ("mmb-h-unused-still-checked", "ops.monarch_matmul_backward(g, x, w1, w2, [True, True, False], torch.randn(4, 3))", r"monarch_matmul_backward: h must have"),
    ("mmb-large-h-width", "ops.monarch_matmul_backward(torch.randn(4, 256), torch.randn(4, 256), torch.randn(2, 128, 128), torch.randn(2, 128, 128), T3, torch.randn(4, 255))",
     r"monarch_matmul_backward: h must have x's leading dims and last dim l\*r = k\*q = 256"),
    ("mmb-mask-length", "ops.monarch_matmul_backward(g, x, w1, w2, [True, True])", r"List with 2 elements.*size 3"),
    # zero tokens through every path (checked in the child, then a marker error)
    ("empty-tokens", "empty_ok()", r"^empty ok$"),
]


def test_bad_inputs_isolated():
    check_errors_isolated(_BAD_CASES, prelude=_BAD_PRELUDE)


def _fake_cases():
    g = torch.randn(4, 10)
    return [
        (lambda: ops.blockdiag_matmul(_x, torch.randn(3, 0, 4)), r"blockdiag_matmul: blocks must have non-empty dims"),
        (lambda: ops.blockdiag_matmul(_x.int(), _w1), r"blockdiag_matmul: x must be float32.*Int"),
        (lambda: ops.blockdiag_matmul_backward(torch.randn(4, 11), _x, _w1, [True, True]), r"blockdiag_matmul_backward: grad_out must have last dim 12"),
        (lambda: ops.blockdiag_matmul_backward(torch.randn(5, 12), _x, _w1, [True, True]), r"blockdiag_matmul_backward: grad_out and x must have the same leading"),
        (lambda: ops.monarch_matmul(_x, _w1, torch.randn(2, 5, 5)), r"monarch_matmul: w2 \[l, s, r\] must have l\*r == k\*q"),
        (lambda: ops.monarch_matmul_with_h(torch.randn(4, 13), _w1, _w2), r"monarch_matmul_with_h: x must have last dim 12"),
        (lambda: ops.monarch_matmul_backward(torch.randn(4, 11), _x, _w1, _w2, [True] * 3), r"monarch_matmul_backward: grad_out must have last dim 10"),
        (lambda: ops.monarch_matmul_backward(torch.randn(5, 10), _x, _w1, _w2, [True] * 3), r"monarch_matmul_backward: grad_out and x must have the same leading"),
        (lambda: ops.monarch_matmul_backward(g, _x, _w1, _w2, [True] * 3, torch.randn(3, 12)), r"monarch_matmul_backward: h must have x's leading dims"),
        (lambda: ops.monarch_matmul_backward(g, _x, _w1, _w2, [True] * 3, torch.randn(4, 12).double()), r"monarch_matmul_backward: h has dtype Double but x has Float"),
    ]


@pytest.mark.parametrize("i", range(len(_fake_cases())))
def test_fake_kernels_check_like_the_kernels(i):
    """Under FakeTensorMode the fake kernels refuse what the kernels refuse, with the same message."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fn, match = _fake_cases()[i]
    with pytest.raises(RuntimeError, match=match):
        fn()
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(RuntimeError, match=match):
            fn()


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_refused(device):
    """blockdiag_matmul_backward and monarch_matmul_backward have no derivative: a second backward raises an error
    naming the op (every path: the op's own autograd, the saved-h one, and the large-block batched-GEMM kernels)."""
    for batch, nb, bo, bi in [((3,), 2, 3, 4), ((5,), 2, 128, 128)]:
        x, w = _randn((*batch, nb * bi), torch.float32, device, 1), _randn((nb, bo, bi), torch.float32, device, 2)
        for ga in ((0, 1), (0,), (1,)):
            check_double_backward_refused(ops.blockdiag_matmul, (x, w), ga, "blockdiag_matmul")
    x, w1, w2 = _randn((4, 12), torch.float32, device, 1), _randn((3, 4, 4), torch.float32, device, 2), \
        _randn((2, 5, 6), torch.float32, device, 3)
    for fn in (ops.monarch_matmul, lambda *a: ops.monarch_matmul_with_h(*a)[0],
               lambda *a: bd.monarch_matmul(*a, save_intermediate=True)):
        for ga in ((0, 1, 2), (0,), (2,)):
            check_double_backward_refused(fn, (x, w1, w2), ga, "monarch_matmul")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu_at_large_shapes():
    """CUDA against the CPU kernels at the branch-crossing float32 shapes, outputs and every gradient."""
    for i, (batch, nb, bo, bi) in enumerate(BD_LARGE):
        x, w = _randn((*batch, nb * bi), torch.float32, "cpu", i), _randn((nb, bo, bi), torch.float32, "cpu", 9, bi ** -0.5)
        g = _randn((*batch, nb * bo), torch.float32, "cpu", 3)
        want = [ops.blockdiag_matmul(x, w), *ops.blockdiag_matmul_backward(g, x, w, [True, True])]
        got = [ops.blockdiag_matmul(x.cuda(), w.cuda()), *ops.blockdiag_matmul_backward(g.cuda(), x.cuda(), w.cuda(), [True, True])]
        for a, b in zip(got, want):
            torch.testing.assert_close(a.cpu(), b, atol=1e-3, rtol=1e-3)
    for i, (batch, k, q, p, l, s, r) in enumerate(MONARCH_LARGE):
        x = _randn((*batch, k * p), torch.float32, "cpu", i)
        w1, w2 = _randn((k, q, p), torch.float32, "cpu", 5, p ** -0.5), _randn((l, s, r), torch.float32, "cpu", 6, r ** -0.5)
        g = _randn((*batch, l * s), torch.float32, "cpu", 7)
        want = [ops.monarch_matmul(x, w1, w2), *ops.monarch_matmul_with_h(x, w1, w2),
                *ops.monarch_matmul_backward(g, x, w1, w2, [True] * 3)]
        xc, w1c, w2c, gc = x.cuda(), w1.cuda(), w2.cuda(), g.cuda()
        got = [ops.monarch_matmul(xc, w1c, w2c), *ops.monarch_matmul_with_h(xc, w1c, w2c),
               *ops.monarch_matmul_backward(gc, xc, w1c, w2c, [True] * 3)]
        for a, b in zip(got, want):
            torch.testing.assert_close(a.cpu(), b, atol=1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# The CUDA Monarch forward's plan (blockdiag_plan.h, host code reachable on CPU as monarch_forward_plan): the fused
# CUDA-core kernel only for blocks of at most 32 rows and columns, the two tensor-core batched GEMMs otherwise.

_SMEM = {"sm_90": 232448, "sm_80": 166912, "sm_86/89": 101376, "48 KB": 49152}


def _fused_tile(k, q, p, lim):
    per_token = 4 * (k * p + k * q)
    tile = min(16, min(49152, lim) // per_token)
    if tile < 1:
        tile = min(16, lim // per_token)
    return (1, tile, tile * per_token) if tile >= 1 else (0, 0, 0)


@pytest.mark.parametrize("device", list(_SMEM))
@pytest.mark.parametrize("shape", [
    (4, 8, 8, 4, 8, 8), (16, 32, 32, 16, 32, 32), (3, 4, 5, 2, 7, 6), (1, 32, 32, 1, 32, 32),  # fused (blocks <= 32)
    (128, 32, 32, 128, 32, 32), (2048, 2, 2, 2048, 2, 2),  # d = 4096 with small blocks: fused if a tile fits
    (4, 1024, 1024, 4, 1024, 1024), (16, 256, 256, 16, 256, 256), (64, 64, 64, 64, 64, 64),  # d = 4096 the bench's
    (4, 33, 32, 4, 32, 33), (2, 32, 33, 2, 32, 32), (2, 16, 16, 1, 40, 32),  # one dimension just over the rule
])
def test_monarch_plan_rule(shape, device):
    """auto: fused exactly when every block dimension is <= 32 and a token's tile fits the shared memory; fused:
    whenever it fits; bmm: never. The fused tile: up to 16 tokens within 48 KB when possible, else the opt-in limit."""
    k, q, p, l, s, r = shape
    lim = _SMEM[device]
    fits = _fused_tile(k, q, p, lim)
    small = max(p, q, r, s) <= 32
    for T in (0, 1, 7, 8192):
        assert ops.monarch_forward_plan(T, k, q, p, l, s, r, lim) == list(fits if small else (0, 0, 0)), (shape, T)
        assert ops.monarch_forward_plan(T, k, q, p, l, s, r, lim, "fused") == list(fits)
        assert ops.monarch_forward_plan(T, k, q, p, l, s, r, lim, "bmm") == [0, 0, 0]
    plan = ops.monarch_forward_plan(1, k, q, p, l, s, r, lim, "fused")
    assert plan[2] <= lim and (plan[1] == 0 or 1 <= plan[1] <= 16)


def test_monarch_plan_known_shapes():
    """d = 4096 in 4 / 16 / 64 blocks (the GPU bench's shapes) takes the batched GEMMs; 128 blocks of 32 fuse with a
    tile of one token (4096 + 4096 fp32 = 32 KB a token, so two do not fit 48 KB and the plan stays within 48 KB
    where one token fits)."""
    for nb in (4, 16, 64):
        b = 4096 // nb
        assert ops.monarch_forward_plan(8192, nb, b, b, nb, b, b, _SMEM["sm_90"])[0] == 0
    assert ops.monarch_forward_plan(8192, 128, 32, 32, 128, 32, 32, _SMEM["48 KB"]) == [1, 1, 32768]
    assert ops.monarch_forward_plan(8192, 128, 32, 32, 128, 32, 32, _SMEM["sm_90"]) == [1, 1, 32768]
    assert ops.monarch_forward_plan(5, 4, 8, 8, 4, 8, 8, 0) == [0, 0, 0]  # no shared memory: the GEMMs


def test_monarch_plan_errors():
    _bad = [
        (lambda: ops.monarch_forward_plan(-1, 2, 4, 4, 2, 4, 4, 1000), r"monarch_forward_plan: tokens must be >= 0, got -1"),
        (lambda: ops.monarch_forward_plan(1, 0, 4, 4, 2, 4, 4, 1000), r"monarch_forward_plan: k must be >= 1, got 0"),
        (lambda: ops.monarch_forward_plan(1, 2, 4, 4, 2, 4, 3, 1000), r"monarch_forward_plan: l\*r must equal k\*q, got l\*r = 6 and k\*q = 8"),
        (lambda: ops.monarch_forward_plan(1, 2, 4, 4, 2, 4, 4, -5), r"monarch_forward_plan: smem_limit must be >= 0, got -5"),
        (lambda: ops.monarch_forward_plan(1, 2, 4, 4, 2, 4, 4, 1000, "tc"), r'monarch_forward_plan: mode must be auto, fused or bmm, got "tc"'),
    ]
    for fn, msg in _bad:
        with pytest.raises(RuntimeError, match=msg):
            fn()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_monarch_fused_and_bmm_agree(dtype, monkeypatch):
    """Both CUDA forms of the Monarch forward (PEFTCORE_MONARCH_KERNEL=fused / bmm) against the CPU kernel in float64,
    on shapes the rule sends either way, token counts around the fused tile (1, 15, 16, 17, 130) and a shape whose
    tile does not fit 48 KB (opt-in path)."""
    shapes = [(4, 8, 8, 4, 8, 8), (3, 4, 5, 2, 7, 6), (16, 32, 32, 16, 32, 32), (4, 64, 64, 4, 64, 64),
              (128, 32, 32, 128, 32, 32)]
    tol = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for i, (k, q, p, l, s, r) in enumerate(shapes):
        w1 = _randn((k, q, p), dtype, "cpu", 5, p ** -0.5)
        w2 = _randn((l, s, r), dtype, "cpu", 6, r ** -0.5)
        for T in (1, 15, 16, 17, 130):
            x = _randn((T, k * p), dtype, "cpu", i + T)
            want = ops.monarch_matmul(x.double(), w1.double(), w2.double())
            for mode in ("fused", "bmm", "auto"):
                monkeypatch.setenv("PEFTCORE_MONARCH_KERNEL", mode)
                got = ops.monarch_matmul(x.cuda(), w1.cuda(), w2.cuda()).cpu().double()
                torch.testing.assert_close(got, want, atol=tol * 4, rtol=tol, msg=lambda m: f"{mode} {k, q, p, l, s, r} T={T}: {m}")
    monkeypatch.setenv("PEFTCORE_MONARCH_KERNEL", "tc")
    with pytest.raises(RuntimeError, match=r'monarch_matmul: PEFTCORE_MONARCH_KERNEL must be auto, fused or bmm, got "tc"'):
        ops.monarch_matmul(torch.zeros(2, 8, device="cuda"), torch.zeros(1, 8, 8, device="cuda"), torch.zeros(1, 8, 8, device="cuda"))
