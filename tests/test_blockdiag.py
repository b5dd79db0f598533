"""blockdiag ops: every op through the shared checks (peftcore.testing), Monarch against fly's two-bmm form,
bad-input messages, and the fused backward's saved tensors. The references are plain torch, here only."""
import pytest
import torch

import peftcore  # noqa: F401
from peftcore.ops import blockdiag as bd
from peftcore.testing import OpCase, Sample, op_test_suite

ops = torch.ops.peftcore
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


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
    return [((2, 37), 3, 5, 7), ((70,), 4, 20, 17), ((5,), 1, 9, 9), ((67,), 2, 33, 40)]


def _monarch_configs(dtype):
    """(batch, k, q, p, l, s, r) with l*r == k*q."""
    if dtype == torch.float64:
        return [((3, 2), 2, 3, 4, 3, 5, 2), ((5,), 3, 2, 3, 2, 2, 3)]
    return [((2, 37), 4, 6, 5, 3, 7, 8), ((70,), 8, 16, 16, 8, 16, 16), ((9,), 3, 10, 7, 5, 4, 6),
            ((66,), 2, 20, 19, 10, 17, 4)]


def blockdiag_samples(device, dtype, requires_grad):
    for i, (batch, nb, bo, bi) in enumerate(_bd_configs(dtype)):
        x = _randn((*batch, nb * bi), dtype, device, 10 + i)
        w = _randn((nb, bo, bi), dtype, device, 20 + i, scale=bi ** -0.5)
        yield Sample((x, w), name=f"{batch}/nb={nb}/bo={bo}/bi={bi}")


def blockdiag_backward_samples(device, dtype, requires_grad):
    for s in blockdiag_samples(device, dtype, False):
        x, w = s.args
        g = _randn((*x.shape[:-1], w.shape[0] * w.shape[1]), dtype, device, 99)
        for mask in ([True, True], [True, False]) if sum(x.shape[:-1]) % 2 else ([True, True], [False, True]):
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
        for mask in ([True, True, True], [False, True, False] if x.shape[0] % 2 else [True, False, True]):
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

    with pytest.raises(RuntimeError, match="monarch_matmul: w1 is on meta but the input is on cpu"):
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
