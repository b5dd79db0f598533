"""orthogonal ops: every op through the shared checks (peftcore.testing), orthogonality, bad inputs, and interop
with HF PEFT's BOFT / OFT layers (adapters away from identity). References use torch.linalg.solve, explicit series
and dense permutation / block-diagonal matrices, built here in the test only."""
import warnings

import pytest
import torch
from torch import nn

import peftcore  # noqa: F401
from peftcore.ops import orthogonal as orth
from peftcore.testing import (OpCase, Sample, check_double_backward_refused, check_errors_isolated, devices,
                              op_test_suite)

ops = torch.ops.peftcore
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
DEVICES = devices()


# ---------------------------------------------------------------------------------------------------------------
# Plain-torch references.


def skew(a):
    return 0.5 * (a - a.transpose(-2, -1))


def ref_cayley(params):
    S = skew(params.double())
    I = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device).expand_as(S)
    return torch.linalg.solve(I + S, I - S, left=False).to(params.dtype)


def ref_neumann(params, terms=5):
    S = skew(params.double())
    I = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device).expand_as(S)
    if terms <= 1:
        R = I + 0 * S  # constant, but still a function of params (zero gradient)
    elif terms == 2:
        R = I + 2 * S
    else:
        top = max(3, terms - 1)
        R, P = I.clone(), I.clone()
        for k in range(1, top + 1):
            P = P @ S
            R = R + (1.0 if k == top else 2.0) * P
    return R.to(params.dtype)


def nonfinite_neumann(params, terms=5):
    # PEFT's series with one term is I: params are not read, so a NaN in them does not reach R (ref_neumann's
    # "+ 0 * S" only keeps the gradient defined)
    if terms <= 1:
        return torch.eye(params.shape[-1], dtype=params.dtype, device=params.device).expand_as(params).clone()
    return ref_neumann(params, terms)


def _vjp(fn, args, grad_arg, grad):
    a = [x.detach().double().requires_grad_(i == grad_arg) if isinstance(x, torch.Tensor) and x.is_floating_point()
         else x for i, x in enumerate(args)]
    out = fn(*a)
    (g,) = torch.autograd.grad(out, a[grad_arg], grad.double())
    return g


def ref_cayley_backward(grad, R):
    # Needs the params; R determines S = (I - R)(I + R)^{-1} (the Cayley map is an involution).
    Rd = R.double()
    I = torch.eye(R.shape[-1], dtype=Rd.dtype, device=R.device).expand_as(Rd)
    S = torch.linalg.solve(I + Rd, I - Rd, left=False)
    return _vjp(ref_cayley, [S], 0, grad).to(grad.dtype)


def ref_neumann_backward(grad, params, terms):
    return _vjp(ref_neumann, [params, terms], 0, grad).to(grad.dtype)


def dense_boft_matrix(rotations, perm):
    """M = M_{m-1} ... M_0, M_i = P_i blockdiag(R_i) P_i^T with P_i[j, perm[i, j]] = 1 (PEFT's perm2mat and its
    ``butterfly_oft_mat = batch[i] @ butterfly_oft_mat`` loop)."""
    m, d = perm.shape
    M = torch.eye(d, dtype=rotations.dtype, device=rotations.device)
    for i in range(m):
        P = torch.zeros(d, d, dtype=rotations.dtype, device=rotations.device)
        P[torch.arange(d), perm[i]] = 1
        B = torch.block_diag(*rotations[i].unbind(0))
        M = (P @ B @ P.T) @ M
    return M


def ref_boft_apply(x, rotations, perm):
    # (+ 0 * sum: with no factors the map is the identity and the rotations' gradient is empty, not absent)
    return x @ dense_boft_matrix(rotations.to(x.dtype), perm) + 0 * rotations.sum().to(x.dtype)


def nonfinite_boft_apply(x, rotations, perm):
    """The butterfly chain factor by factor (x @ M_{m-1} ... M_0, each M_i = P_i blockdiag(R_i) P_i^T applied as
    a scatter, per-block products and a gather): only the products the map defines, so a NaN spreads within the
    blocks it passes through, not through the zeros of the dense matrix."""
    m, nb, b, _ = rotations.shape
    y = x
    for i in reversed(range(m)):
        u = torch.empty_like(y)
        u[..., perm[i]] = y
        w = torch.einsum("...nr,nrc->...nc", u.unflatten(-1, (nb, b)), rotations[i].to(x.dtype)).flatten(-2)
        y = w[..., perm[i]]
    return y


def ref_boft_apply_backward(grad_out, x, rotations, perm, mask):
    M = dense_boft_matrix(rotations.to(x.dtype), perm)
    gx = grad_out @ M.T if mask[0] else x.new_empty(0)
    gr = _vjp(lambda r: ref_boft_apply(x, r, perm), [rotations], 0, grad_out).to(rotations.dtype) if mask[1] \
        else rotations.new_empty(0)
    return gx, gr


# ---------------------------------------------------------------------------------------------------------------
# Samples.


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def params_samples(device, dtype, requires_grad):
    for nb, b, scale in [(3, 4, 0.3), (2, 8, 0.2), (5, 2, 0.5)]:
        p = (torch.randn(nb, b, b, generator=_gen(nb * b)) * scale).to(device=device, dtype=dtype)
        yield Sample((p,), name=f"nb{nb}b{b}")
    if dtype == torch.float32:  # the kernels' branch points (float64 gradcheck runs only the small shapes above)
        for nb, b, scale in LARGE_PARAMS:
            p = (torch.randn(nb, b, b, generator=_gen(nb + b)) * scale / b ** 0.5).to(device=device, dtype=dtype)
            yield Sample((p,), name=f"nb{nb}b{b}")


# Per-block kernels: blocks go to threads in ranges of max(1, 4096 // b^3) (b = 4: 64 blocks, so 200 blocks split
# across threads); the b x b products use the 4 x 16 register tile (b = 20: full tiles and 4-wide tails) and BLAS
# from b = 128 on (K * N >= 128 * 128).
LARGE_PARAMS = [(200, 4, 0.5), (3, 20, 0.5), (2, 128, 0.5)]


def neumann_samples(device, dtype, requires_grad):
    for terms in (5, 3, 6, 2, 1, 0):
        p = (torch.randn(3, 4, 4, generator=_gen(terms)) * 0.1).to(device=device, dtype=dtype)
        yield Sample((p, terms), name=f"terms{terms}")
    if dtype == torch.float32:  # thread split, register-tile tails, BLAS products; a long series
        for (nb, b, _), terms in zip(LARGE_PARAMS, (5, 12, 5)):
            p = (torch.randn(nb, b, b, generator=_gen(nb * b)) * 0.3 / b ** 0.5).to(device=device, dtype=dtype)
            yield Sample((p, terms), name=f"nb{nb}b{b}terms{terms}")


def cayley_backward_samples(device, dtype, requires_grad):
    for s in params_samples(device, dtype, False):
        R = ops.orthogonal_cayley(s.args[0])
        g = torch.randn(R.shape, generator=_gen(7)).to(device=device, dtype=dtype)
        yield Sample((g, R), name=s.name)


def neumann_backward_samples(device, dtype, requires_grad):
    for s in neumann_samples(device, dtype, False):
        g = torch.randn(s.args[0].shape, generator=_gen(8)).to(device=device, dtype=dtype)
        yield Sample((g, s.args[0], s.args[1]), name=s.name)


BOFT_CONFIGS = [  # (d, block_size, n_butterfly_factor, tokens shape)
    (16, 4, 1, (5,)),
    (16, 2, 3, (2, 3)),
    (32, 4, 2, (7,)),
]


def boft_samples(device, dtype, requires_grad, rot_dtype=None):
    for d, b, m, tshape in BOFT_CONFIGS:
        nb = d // b
        g = _gen(d + b + m)
        perm = orth.boft_permutations(d, nb, b, m).to(device)
        rot = ops.orthogonal_cayley(torch.randn(m * nb, b, b, generator=g, dtype=torch.float64) * 0.5)
        rot = rot.view(m, nb, b, b).to(device=device, dtype=rot_dtype or dtype)
        x = torch.randn(*tshape, d, generator=g).to(device=device, dtype=dtype)
        yield Sample((x, rot, perm), name=f"d{d}b{b}m{m}")
    if dtype != torch.float32 and dtype != torch.float64:  # float32 rotations with low-precision activations
        x = torch.randn(4, 16, generator=_gen(3)).to(device=device, dtype=dtype)
        rot = ops.orthogonal_cayley(torch.randn(8, 4, 4, generator=_gen(4))).view(2, 4, 4, 4).to(device)
        yield Sample((x, rot, orth.boft_permutations(16, 4, 4, 2).to(device)), name="fp32rot")
    if dtype == torch.float32:
        for d, b, m, T in BOFT_LARGE:
            nb = d // b
            g = _gen(d * b + m)
            perm = torch.stack([torch.randperm(d, generator=g) for _ in range(m)]).to(device)
            rot = (torch.randn(m, nb, b, b, generator=g) / b ** 0.5).to(device=device, dtype=dtype)
            x = torch.randn(T, d, generator=g).to(device=device, dtype=dtype)
            yield Sample((x, rot, perm), name=f"d{d}b{b}m{m}T{T}")
    # No factors: the empty product, the identity map.
    x = torch.randn(3, 8, generator=_gen(5)).to(device=device, dtype=dtype)
    yield Sample((x, torch.zeros(0, 2, 4, 4, dtype=dtype, device=device),
                  torch.zeros(0, 8, dtype=torch.long, device=device)), name="m0")


# The fused CPU chain's branch points: token tiles of tile_tokens((m + 2) * d) rows (64 here) with several tiles per
# thread (T = 300: 5 tiles on 2 threads) and a ragged last tile; blocks with full 4 x 16 register tiles (b = 16);
# BLAS block products and BLAS rotation-gradient GEMMs (b = 256: K * N = 64 * 256 >= 128 * 128). Random
# permutations (any permutation is valid; the butterfly ones would leave some index mix-ups unseen).
BOFT_LARGE = [(64, 4, 3, 300), (64, 16, 2, 150), (256, 256, 1, 200)]


def boft_backward_samples(device, dtype, requires_grad):
    for s in boft_samples(device, dtype, False):
        x, rot, perm = s.args
        g = torch.randn(x.shape, generator=_gen(9)).to(device=device, dtype=dtype)
        masks = ([True, True], [True, False], [False, True]) if x.shape[0] < 100 else ([True, True],)
        for mask in masks:
            yield Sample((g, x, rot, perm, mask), name=f"{s.name}-{mask}")


CASES = [
    OpCase("orthogonal_cayley", ops.orthogonal_cayley, params_samples, ref_cayley, ALL_DTYPES, grad_args=(0,),
           nonfinite="nan_superset"),
    OpCase("orthogonal_cayley_backward", ops.orthogonal_cayley_backward, cayley_backward_samples,
           ref_cayley_backward, ALL_DTYPES),
    OpCase("orthogonal_cayley_neumann", ops.orthogonal_cayley_neumann, neumann_samples, ref_neumann, ALL_DTYPES,
           grad_args=(0,), nonfinite="nan_superset", nonfinite_reference=nonfinite_neumann),
    OpCase("orthogonal_cayley_neumann_backward", ops.orthogonal_cayley_neumann_backward, neumann_backward_samples,
           ref_neumann_backward, ALL_DTYPES),
    OpCase("orthogonal_boft_apply", ops.orthogonal_boft_apply, boft_samples, ref_boft_apply, ALL_DTYPES,
           grad_args=(0, 1), nonfinite_reference=nonfinite_boft_apply),
    OpCase("orthogonal_boft_apply_backward", ops.orthogonal_boft_apply_backward, boft_backward_samples,
           ref_boft_apply_backward, ALL_DTYPES),
]


test_opcheck, test_reference, test_gradcheck, test_compile = op_test_suite(CASES)


# ---------------------------------------------------------------------------------------------------------------
# Properties.


@pytest.mark.parametrize("device", DEVICES)
def test_cayley_is_orthogonal(device):
    p = torch.randn(16, 8, 8, generator=_gen(1)).to(device) * 3  # far from identity
    R = ops.orthogonal_cayley(p)
    I = torch.eye(8, device=device).expand_as(R)
    torch.testing.assert_close(R @ R.transpose(-2, -1), I, atol=1e-5, rtol=0)
    # Neumann is near-orthogonal for small S and converges to the transposed Cayley map.
    q = p * 0.01
    N = ops.orthogonal_cayley_neumann(q, 12)
    torch.testing.assert_close(N, ops.orthogonal_cayley(q).transpose(-2, -1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_boft_apply_preserves_norm_and_matches_dense(device):
    d, b, m = 64, 4, 4
    perm = orth.boft_permutations(d, d // b, b, m).to(device)
    rot = ops.orthogonal_cayley(torch.randn(m * d // b, b, b, generator=_gen(2))).view(m, d // b, b, b).to(device)
    x = torch.randn(10, d, generator=_gen(3)).to(device)
    y = ops.orthogonal_boft_apply(x, rot, perm)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(y, ref_boft_apply(x.double(), rot.double(), perm).float(), atol=1e-5, rtol=1e-5)


def test_factorwise_boft_reference_matches_dense():
    # the NaN / inf reference is the same map as the PEFT-style dense one
    for s in boft_samples("cpu", torch.float64, False):
        x, rot, perm = s.args[:3]
        torch.testing.assert_close(nonfinite_boft_apply(x, rot, perm), ref_boft_apply(x, rot, perm))


def test_permutations_match_peft():
    from peft.tuners.boft.layer import BOFTLayer

    for n, nb, b, m in [(16, 4, 4, 2), (32, 8, 4, 3), (64, 16, 4, 1), (24, 6, 4, 2)]:
        ours = orth.boft_permutations(n, nb, b, m)
        for i in range(m):
            theirs = BOFTLayer.block_butterfly_perm(None, n, nb // (2 ** i), b // 2, m - 1)
            assert torch.equal(ours[i], theirs), (n, nb, b, m, i)


def test_only_x_saved():
    # The BOFT chain's autograd keeps x (and the small rotations / perm), never a d x d matrix.
    d, b, m = 32, 4, 2
    perm = orth.boft_permutations(d, d // b, b, m)
    rot = ops.orthogonal_cayley(torch.randn(m * d // b, b, b)).view(m, d // b, b, b).requires_grad_()
    x = torch.randn(6, d, requires_grad=True)
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ops.orthogonal_boft_apply(x, rot, perm)
    assert max(sizes) <= max(x.numel(), rot.numel()) and d * d not in sizes


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs: messages name the op and the value.


_BAD_PRELUDE = """
from peftcore.ops import orthogonal as orth
x = torch.randn(5, 16)
perm = orth.boft_permutations(16, 4, 4, 2)
rot = torch.randn(2, 4, 4, 4)
p3 = torch.randn(3, 4, 4)
def bad_perm(i, j, v):
    q = perm.clone()
    q[i, j] = v
    return q
dup = perm.clone()
dup[0, 0] = dup[0, 1]
def fwd(xx=x, rr=rot, pp=perm):
    return ops.orthogonal_boft_apply(xx, rr, pp)
def bwd(gg=x, xx=x, rr=rot, pp=perm, mask=(True, True)):
    return ops.orthogonal_boft_apply_backward(gg, xx, rr, pp, list(mask))
def zero_factors():  # the identity map, forward and backward; then a marker error
    z, zp = torch.randn(0, 4, 4, 4), torch.zeros(0, 16, dtype=torch.long)
    y = fwd(rr=z, pp=zp)
    gx, gr = bwd(gg=2 * x, rr=z, pp=zp)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr() and torch.equal(gx, 2 * x) and gr.shape == z.shape
    gx2, _ = bwd(gg=2 * x, rr=z, pp=zp, mask=(True, False))
    _, gr2 = bwd(gg=2 * x, rr=z, pp=zp, mask=(False, True))
    assert torch.equal(gx2, 2 * x) and gr2.shape == z.shape
    raise RuntimeError("identity ok")
def empty_dims():
    assert fwd(xx=torch.randn(0, 16)).shape == (0, 16)
    gx, gr = bwd(gg=torch.randn(0, 16), xx=torch.randn(0, 16))
    assert gx.shape == (0, 16) and torch.equal(gr, torch.zeros_like(rot))
    e, er, ep = torch.randn(3, 0), torch.randn(2, 0, 4, 4), torch.zeros(2, 0, dtype=torch.long)
    assert fwd(xx=e, rr=er, pp=ep).shape == (3, 0)
    assert [tuple(t.shape) for t in bwd(gg=e, xx=e, rr=er, pp=ep)] == [(3, 0), (2, 0, 4, 4)]
    assert ops.orthogonal_cayley(torch.randn(0, 3, 3)).shape == (0, 3, 3)
    assert ops.orthogonal_cayley_neumann_backward(torch.randn(2, 0, 0), torch.randn(2, 0, 0), 5).shape == (2, 0, 0)
    raise RuntimeError("empty ok")
"""

_PERM_MSG = r"every row of perm must be a permutation of \[0, 16\), got "
_BAD_CASES = []
for _name, _call in [("fwd", "fwd(pp={p})"), ("bwd", "bwd(pp={p})"), ("bwd-x-only", "bwd(pp={p}, mask=(True, False))"),
                     ("bwd-rot-only", "bwd(pp={p}, mask=(False, True))")]:
    _op = "orthogonal_boft_apply" + ("" if _name == "fwd" else "_backward")
    for _v, _shown in [(10 ** 9, "1000000000"), (-300, "-300"), (-7, "-7"), (16, "16")]:
        _BAD_CASES.append((f"{_name}-perm={_v}", _call.format(p=f"bad_perm(1, 3, {_v})"),
                           rf"{_op}: {_PERM_MSG}perm\[1, 3\] = {_shown}"))
    _BAD_CASES.append((f"{_name}-perm-duplicate", _call.format(p="dup"),
                       rf"{_op}: {_PERM_MSG}1 twice in row 0 \(perm\[0, 0\] and perm\[0, 1\]\)"))
_BAD_CASES += [
    # shapes / dtypes / devices of every argument, forward and backward
    ("fwd-x-int", "fwd(xx=x.long())", r"orthogonal_boft_apply: x must be float32.*got Long"),
    ("fwd-x-scalar", "fwd(xx=torch.tensor(1.0))", r"orthogonal_boft_apply: x must have at least 1 dim"),
    ("fwd-rot-3d", "fwd(rr=p3)", r"orthogonal_boft_apply: rotations must be \[m, num_blocks, b, b\].*\[3, 4, 4\]"),
    ("fwd-rot-not-square", "fwd(rr=torch.randn(2, 4, 4, 3))", r"orthogonal_boft_apply: rotations must be \[m, num_b"),
    ("fwd-rot-width", "fwd(rr=torch.randn(2, 4, 5, 5))", r"orthogonal_boft_apply: rotations' num_blocks \* b \(4 \* 5 = 20\)"),
    ("fwd-rot-int", "fwd(rr=rot.int())", r"orthogonal_boft_apply: rotations must be float32.*got Int"),
    ("fwd-rot-double-x-half", "fwd(xx=x.half(), rr=rot.double())",
     r"orthogonal_boft_apply: rotations must be float32 or the input's dtype \(Half\), got Double"),
    ("fwd-rot-meta", "fwd(rr=rot.to('meta'))", r"orthogonal_boft_apply: rotations is on meta but x is on cpu"),
    ("fwd-perm-int32", "fwd(pp=perm.int())", r"orthogonal_boft_apply: perm must be int64, got Int"),
    ("fwd-perm-float", "fwd(pp=perm.float())", r"orthogonal_boft_apply: perm must be int64, got Float"),
    ("fwd-perm-rows", "fwd(pp=perm[:1])", r"orthogonal_boft_apply: perm must be \[m, d\] = \[2, 16\], got shape \[1, 16\]"),
    ("fwd-perm-cols", "fwd(pp=perm[:, :15])", r"orthogonal_boft_apply: perm must be \[m, d\] = \[2, 16\], got shape \[2, 15\]"),
    ("fwd-perm-1d", "fwd(pp=perm[0])", r"orthogonal_boft_apply: perm must be \[m, d\] = \[2, 16\], got shape \[16\]"),
    ("fwd-perm-empty-rows", "fwd(pp=perm[:0])", r"orthogonal_boft_apply: perm must be \[m, d\] = \[2, 16\], got shape \[0, 16\]"),
    ("fwd-perm-meta", "fwd(pp=perm.to('meta'))", r"orthogonal_boft_apply: perm is on meta but x is on cpu"),
    ("fwd-zero-factors-but-perm", "fwd(rr=rot[:0])", r"orthogonal_boft_apply: perm must be \[m, d\] = \[0, 16\], got shape \[2, 16\]"),
    ("bwd-grad-shape", "bwd(gg=torch.randn(4, 16))", r"orthogonal_boft_apply_backward: grad_out must have x's shape \[5, 16\], got \[4, 16\]"),
    ("bwd-grad-dtype", "bwd(gg=x.double())", r"orthogonal_boft_apply_backward: grad_out has dtype Double but x has Float"),
    ("bwd-grad-int", "bwd(gg=x.int())", r"orthogonal_boft_apply_backward: grad_out must be float32.*got Int"),
    ("bwd-grad-meta", "bwd(gg=x.to('meta'))", r"orthogonal_boft_apply_backward: grad_out is on meta but x is on cpu"),
    ("bwd-x-int", "bwd(xx=x.int())", r"orthogonal_boft_apply_backward: x must be float32.*got Int"),
    ("bwd-x-width", "bwd(xx=torch.randn(5, 12), gg=torch.randn(5, 12))", r"orthogonal_boft_apply_backward: rotations' num_blocks \* b \(4 \* 4 = 16\) must equal the input's last dim 12"),
    ("bwd-rot-3d", "bwd(rr=p3)", r"orthogonal_boft_apply_backward: rotations must be \[m, num_blocks, b, b\]"),
    ("bwd-rot-meta", "bwd(rr=rot.to('meta'))", r"orthogonal_boft_apply_backward: rotations is on meta but x is on cpu"),
    ("bwd-perm-int32", "bwd(pp=perm.int())", r"orthogonal_boft_apply_backward: perm must be int64, got Int"),
    ("bwd-perm-shape", "bwd(pp=perm[:, :8])", r"orthogonal_boft_apply_backward: perm must be \[m, d\] = \[2, 16\]"),
    ("bwd-perm-meta", "bwd(pp=perm.to('meta'))", r"orthogonal_boft_apply_backward: perm is on meta but x is on cpu"),
    ("bwd-mask-length", "bwd(mask=(True,))", r"List with 1 elements.*size 2"),
    # zero factors: the identity map, forward and backward (checked in the child, then a marker error)
    ("zero-factors-identity", "zero_factors()", r"^identity ok$"),
    ("zero-tokens-and-features", "empty_dims()", r"^empty ok$"),
    # Cayley / Neumann and their backward ops
    ("cayley-2d", "ops.orthogonal_cayley(torch.randn(4, 4))", r"orthogonal_cayley: params must be \[num_blocks, b, b\].*\[4, 4\]"),
    ("cayley-not-square", "ops.orthogonal_cayley(torch.randn(3, 4, 5))", r"orthogonal_cayley: params must be \[num_blocks, b, b\].*\[3, 4, 5\]"),
    ("cayley-int", "ops.orthogonal_cayley(torch.ones(2, 3, 3, dtype=torch.long))", r"orthogonal_cayley: params must be float32.*Long"),
    ("cayley-bwd-grad-2d", "ops.orthogonal_cayley_backward(torch.randn(4, 4), p3)", r"orthogonal_cayley_backward: grad must be \[num_blocks, b, b\]"),
    ("cayley-bwd-R-shape", "ops.orthogonal_cayley_backward(p3, torch.randn(2, 4, 4))", r"orthogonal_cayley_backward: R must have grad's shape \[3, 4, 4\], got \[2, 4, 4\]"),
    ("cayley-bwd-R-bigger", "ops.orthogonal_cayley_backward(p3, torch.randn(3, 5, 5))", r"orthogonal_cayley_backward: R must have grad's shape"),
    ("cayley-bwd-R-not-square", "ops.orthogonal_cayley_backward(p3, torch.randn(3, 4, 2))", r"orthogonal_cayley_backward: R must be \[num_blocks, b, b\]"),
    ("cayley-bwd-R-dtype", "ops.orthogonal_cayley_backward(p3, p3.double())", r"orthogonal_cayley_backward: R has dtype Double but grad has Float"),
    ("cayley-bwd-R-int", "ops.orthogonal_cayley_backward(p3, p3.int())", r"orthogonal_cayley_backward: R must be float32.*Int"),
    ("cayley-bwd-R-meta", "ops.orthogonal_cayley_backward(p3, p3.to('meta'))", r"orthogonal_cayley_backward: R is on meta but grad is on cpu"),
    ("neumann-terms-negative", "ops.orthogonal_cayley_neumann(p3, -1)", r"orthogonal_cayley_neumann: terms must be in \[0, 64\], got -1"),
    ("neumann-terms-65", "ops.orthogonal_cayley_neumann(p3, 65)", r"orthogonal_cayley_neumann: terms must be in \[0, 64\], got 65"),
    ("neumann-terms-huge", "ops.orthogonal_cayley_neumann(p3, 2 ** 40)", r"orthogonal_cayley_neumann: terms must be in \[0, 64\], got 1099511627776"),
    ("neumann-int", "ops.orthogonal_cayley_neumann(p3.int(), 5)", r"orthogonal_cayley_neumann: params must be float32.*Int"),
    ("neumann-bwd-terms-negative", "ops.orthogonal_cayley_neumann_backward(p3, p3, -300)", r"orthogonal_cayley_neumann_backward: terms must be in \[0, 64\], got -300"),
    ("neumann-bwd-terms-huge", "ops.orthogonal_cayley_neumann_backward(p3, p3, 10 ** 9)", r"orthogonal_cayley_neumann_backward: terms must be in \[0, 64\], got 1000000000"),
    ("neumann-bwd-params-shape", "ops.orthogonal_cayley_neumann_backward(p3, torch.randn(3, 2, 2), 5)", r"orthogonal_cayley_neumann_backward: params must have grad's shape \[3, 4, 4\], got \[3, 2, 2\]"),
    ("neumann-bwd-params-dtype", "ops.orthogonal_cayley_neumann_backward(p3, p3.half(), 5)", r"orthogonal_cayley_neumann_backward: params has dtype Half but grad has Float"),
    ("neumann-bwd-params-meta", "ops.orthogonal_cayley_neumann_backward(p3, p3.to('meta'), 5)", r"orthogonal_cayley_neumann_backward: params is on meta but grad is on cpu"),
    ("neumann-bwd-grad-1d", "ops.orthogonal_cayley_neumann_backward(torch.randn(4), p3, 5)", r"orthogonal_cayley_neumann_backward: grad must be \[num_blocks, b, b\]"),
]


def test_bad_inputs_isolated():
    """Hostile arguments to every op, backward ops called directly included, in a child process: each raises an
    error naming the op and the offending value (before this check, perm = 10**9 in the backward segfaulted)."""
    check_errors_isolated(_BAD_CASES, prelude=_BAD_PRELUDE)


def _fake_cases():
    x, rot, perm = torch.randn(5, 16), torch.randn(2, 4, 4, 4), orth.boft_permutations(16, 4, 4, 2)
    p3 = torch.randn(3, 4, 4)
    return [
        (lambda: ops.orthogonal_boft_apply(x, torch.randn(2, 4, 5, 5), perm), r"orthogonal_boft_apply: rotations' num_blocks \* b \(4 \* 5 = 20\)"),
        (lambda: ops.orthogonal_boft_apply(x, rot, perm.int()), r"orthogonal_boft_apply: perm must be int64, got Int"),
        (lambda: ops.orthogonal_boft_apply(x, rot, perm[:1]), r"orthogonal_boft_apply: perm must be \[m, d\] = \[2, 16\], got shape \[1, 16\]"),
        (lambda: ops.orthogonal_boft_apply(x, rot[:0], perm), r"orthogonal_boft_apply: perm must be \[m, d\] = \[0, 16\]"),
        (lambda: ops.orthogonal_boft_apply(x.half(), rot.double(), perm), r"orthogonal_boft_apply: rotations must be float32 or the input's dtype"),
        (lambda: ops.orthogonal_boft_apply(x.long(), rot, perm), r"orthogonal_boft_apply: x must be float32.*got Long"),
        (lambda: ops.orthogonal_boft_apply_backward(torch.randn(4, 16), x, rot, perm, [True, True]), r"orthogonal_boft_apply_backward: grad_out must have x's shape"),
        (lambda: ops.orthogonal_boft_apply_backward(x.double(), x, rot, perm, [True, True]), r"orthogonal_boft_apply_backward: grad_out has dtype Double but x has Float"),
        (lambda: ops.orthogonal_boft_apply_backward(x, x, rot, perm[:, :8], [True, True]), r"orthogonal_boft_apply_backward: perm must be \[m, d\]"),
        (lambda: ops.orthogonal_cayley(torch.randn(3, 4, 5)), r"orthogonal_cayley: params must be \[num_blocks, b, b\]"),
        (lambda: ops.orthogonal_cayley(p3.int()), r"orthogonal_cayley: params must be float32.*Int"),
        (lambda: ops.orthogonal_cayley_backward(p3, torch.randn(2, 4, 4)), r"orthogonal_cayley_backward: R must have grad's shape"),
        (lambda: ops.orthogonal_cayley_backward(p3, p3.double()), r"orthogonal_cayley_backward: R has dtype Double but grad has Float"),
        (lambda: ops.orthogonal_cayley_neumann(p3, -1), r"orthogonal_cayley_neumann: terms must be in \[0, 64\], got -1"),
        (lambda: ops.orthogonal_cayley_neumann_backward(p3, p3, 65), r"orthogonal_cayley_neumann_backward: terms must be in \[0, 64\], got 65"),
        (lambda: ops.orthogonal_cayley_neumann_backward(p3, torch.randn(3, 2, 2), 5), r"orthogonal_cayley_neumann_backward: params must have grad's shape"),
    ]


@pytest.mark.parametrize("i", range(len(_fake_cases())))
def test_fake_kernels_check_like_the_kernels(i):
    """Under FakeTensorMode the fake kernels refuse what the kernels refuse, with the same message."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fn, match = _fake_cases()[i]
    with pytest.raises(RuntimeError, match=match):
        fn()  # the real kernel
    with FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(RuntimeError, match=match):
            fn()


def test_fake_zero_factors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(5, 16)
        y = ops.orthogonal_boft_apply(x, torch.randn(0, 4, 4, 4), torch.zeros(0, 16, dtype=torch.long))
        gx, gr = ops.orthogonal_boft_apply_backward(x, x, torch.randn(0, 4, 4, 4), torch.zeros(0, 16, dtype=torch.long),
                                                    [True, True])
    assert y.shape == gx.shape == (5, 16) and gr.shape == (0, 4, 4, 4)


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_refused(device):
    """The backward ops have no derivative: a second backward raises an error naming the op (not the silently wrong
    numbers of PyTorch's warn-only fallback)."""
    p = torch.randn(3, 4, 4, generator=_gen(1), dtype=torch.float32).to(device) * 0.3
    check_double_backward_refused(ops.orthogonal_cayley, (p,), (0,), "orthogonal_cayley")
    check_double_backward_refused(lambda q: ops.orthogonal_cayley_neumann(q, 5), (p,), (0,),
                                  "orthogonal_cayley_neumann")
    s = next(iter(boft_samples(device, torch.float32, False)))
    check_double_backward_refused(ops.orthogonal_boft_apply, s.args, (0, 1), "orthogonal_boft_apply")
    check_double_backward_refused(ops.orthogonal_boft_apply, s.args, (1,), "orthogonal_boft_apply")


def test_non_contiguous_inputs():
    """Strided views give the contiguous result (every op copies what it needs)."""
    x = torch.randn(16, 6, generator=_gen(2)).t()  # [6, 16], column-major
    rot = torch.randn(4, 4, 2, 4, generator=_gen(3)).permute(2, 0, 1, 3)  # [2, 4, 4, 4] strided
    perm = orth.boft_permutations(16, 4, 4, 2).t().contiguous().t()
    args = (x, rot, perm)
    torch.testing.assert_close(ops.orthogonal_boft_apply(*args),
                               ops.orthogonal_boft_apply(*[a.contiguous() for a in args]), rtol=0, atol=0)
    g = torch.randn(16, 6, generator=_gen(4)).t()
    for a, b in zip(ops.orthogonal_boft_apply_backward(g, *args, [True, True]),
                    ops.orthogonal_boft_apply_backward(g.contiguous(), *[a.contiguous() for a in args], [True, True])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    p = torch.randn(4, 4, 3, generator=_gen(5)).permute(2, 0, 1) * 0.3
    for fn in (ops.orthogonal_cayley, lambda q: ops.orthogonal_cayley_neumann(q, 5),
               lambda q: ops.orthogonal_cayley_backward(q.transpose(1, 2), q),
               lambda q: ops.orthogonal_cayley_neumann_backward(q.transpose(1, 2), q, 6)):
        torch.testing.assert_close(fn(p), fn(p.contiguous()), rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_boft_matches_cpu_and_stays_in_bounds():
    """CUDA against the CPU kernels at the tile-crossing shapes (outputs and both gradients), the identity for zero
    factors, and perm values CUDA does not validate (a host sync): any values give some result, never a fault."""
    for s in boft_samples("cpu", torch.float32, False):
        x, rot, perm = s.args
        g = torch.randn(x.shape, generator=_gen(6))
        want = [ops.orthogonal_boft_apply(x, rot, perm), *ops.orthogonal_boft_apply_backward(g, x, rot, perm, [True, True])]
        xc, rc, pc, gc = (t.cuda() for t in (x, rot, perm, g))
        got = [ops.orthogonal_boft_apply(xc, rc, pc), *ops.orthogonal_boft_apply_backward(gc, xc, rc, pc, [True, True])]
        for a, b in zip(got, want):
            torch.testing.assert_close(a.cpu(), b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{s.name}: {m}")
    x, rot, perm = (t.cuda() for t in (torch.randn(5, 16), torch.randn(2, 4, 4, 4), orth.boft_permutations(16, 4, 4, 2)))
    for v in (10 ** 9, -300, -7, 3):
        bad = perm.clone()
        bad[1, 3] = v
        ops.orthogonal_boft_apply(x, rot, bad)
        ops.orthogonal_boft_apply_backward(x, x, rot, bad, [True, True])
    torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------------
# Interop with HF PEFT: the op-based layers reproduce PEFT's own forward with randomised adapters.


class _FakeFBD:
    """Plain-torch stand-in for PEFT's fbd_cuda extension (batched block_diag), so PEFT keeps n_butterfly_factor
    > 1 on a machine without a GPU (otherwise it silently forces 1) and never tries to compile the extension."""

    @staticmethod
    def forward(inp):
        return [torch.stack([torch.block_diag(*blocks.unbind(0)) for blocks in inp])]

    @staticmethod
    def backward(grad, inp):
        H = inp.shape[-1]
        return [torch.stack([grad[:, i * H:(i + 1) * H, i * H:(i + 1) * H] for i in range(inp.shape[1])], 1)]


class _Tiny(nn.Module):
    def __init__(self, d_in=32, d_out=24):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.lin(x)


@pytest.fixture
def fake_fbd(monkeypatch):
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", _FakeFBD())


@pytest.mark.parametrize("block_size,factor,bias", [(4, 1, True), (4, 3, True), (2, 2, False), (8, 2, True)])
def test_boft_matches_peft(fake_fbd, block_size, factor, bias):
    import peft
    from peftcore.tuners.boft import BOFTLinear

    torch.manual_seed(0)
    base = _Tiny()
    if not bias:
        base.lin.bias = None
    cfg = peft.BOFTConfig(boft_block_size=block_size, boft_n_butterfly_factor=factor, target_modules=["lin"],
                          boft_dropout=0.0, init_weights=False)  # random boft_R (std 0.1) and boft_s
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(base, cfg)
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.boft_R["default"].normal_(0, 0.3)  # further from identity
    assert layer.boft_R["default"].shape[0] == factor
    ours = BOFTLinear.from_peft(layer)
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        expected = model(x)
        got = ours(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Gradients of the op path against a dense float64 version of PEFT's math.
    ours(x).square().sum().backward()
    R = layer.boft_R["default"].detach().double().requires_grad_()
    m, nb, b, _ = R.shape
    rot = ref_cayley(R.view(m * nb, b, b)).view(m, nb, b, b)
    M = dense_boft_matrix(rot, ours.perm)
    lin = layer.get_base_layer()
    y = (x.double() @ M) @ lin.weight.double().T * layer.boft_s["default"].double().squeeze(-1)
    if lin.bias is not None:
        y = y + lin.bias.double()
    y.square().sum().backward()
    torch.testing.assert_close(layer.boft_R["default"].grad.double(), R.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_boft_matches_peft_low_precision(fake_fbd, dtype):
    import peft
    from peftcore.tuners.boft import BOFTLinear

    torch.manual_seed(1)
    cfg = peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=["lin"], init_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_Tiny(), cfg)
    model.base_model.model.lin.base_layer.to(dtype)
    layer = model.base_model.model.lin
    x = torch.randn(4, 32, dtype=dtype)
    with torch.no_grad():
        expected = model(x)
        got = BOFTLinear.from_peft(layer)(x)
    assert got.dtype == expected.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("neumann,terms,block_share", [(True, 5, False), (True, 3, False), (False, 5, False),
                                                       (True, 6, True)])
def test_oft_matches_peft(neumann, terms, block_share):
    import peft
    from peftcore.tuners.oft import OFTLinear

    torch.manual_seed(2)
    cfg = peft.OFTConfig(oft_block_size=8, r=0, target_modules=["lin"], use_cayley_neumann=neumann,
                         num_cayley_neumann_terms=terms, block_share=block_share, init_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_Tiny(), cfg)
    layer = model.base_model.model.lin
    with torch.no_grad():
        layer.oft_R["default"].weight.normal_(0, 0.1)
    ours = OFTLinear.from_peft(layer)
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        expected = model(x)
        got = ours(x)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # Gradient w.r.t. OFT's packed parameters against PEFT's own autograd.
    model(x).square().sum().backward()
    g_peft = layer.oft_R["default"].weight.grad.clone()
    layer.oft_R["default"].weight.grad = None
    ours(x).square().sum().backward()
    torch.testing.assert_close(layer.oft_R["default"].weight.grad, g_peft, atol=1e-4, rtol=1e-4)
