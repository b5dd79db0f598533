"""torch.func over peftcore ops: every family's OpCases already run vmap and vjp through peftcore.testing (in
test_opcheck on CPU); here the compositions users write, and the errors for what is not supported."""
import pytest
import torch
from torch.func import grad, jacrev, jvp, vmap

import peftcore  # noqa: F401

ops = torch.ops.peftcore


def _delta(out_f, in_f, nnz, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(out_f * in_f, generator=g)[:nnz].sort().values
    return idx, torch.randn(nnz, generator=g, dtype=dtype)


def test_per_sample_grads_vmap_of_grad():
    """vmap(grad(loss)) over a batch gives each sample's gradient of the delta values (DP-SGD style)."""
    w = torch.randn(6, 5, dtype=torch.float64)
    idx, vals = _delta(6, 5, 7)
    xs = torch.randn(4, 3, 5, dtype=torch.float64)

    def loss(v, x):
        return ops.sparse_delta_linear(x, w, None, idx, v, 0.5).pow(2).sum()

    got = vmap(grad(loss), in_dims=(None, 0))(vals, xs)
    for i in range(xs.shape[0]):
        v = vals.clone().requires_grad_(True)
        loss(v, xs[i]).backward()
        torch.testing.assert_close(got[i], v.grad)


def test_jacrev_matches_autograd():
    p = torch.randn(2, 4, 4, dtype=torch.float64)
    J = jacrev(ops.orthogonal_cayley)(p)
    eye = torch.eye(p.numel(), dtype=p.dtype).reshape(-1, *p.shape)
    rows = []
    for e in eye:
        q = p.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(ops.orthogonal_cayley(q), q, e)
        rows.append(g)
    # J[o..., i...] = d out[o] / d p[i]; the rows above are d(sum e * out) / dp for unit e over outputs
    torch.testing.assert_close(J.reshape(p.numel(), p.numel()), torch.stack(rows).reshape(p.numel(), p.numel()))


def test_grad_of_grad_composes_where_supported():
    """spmm's backward is spmm_t / sddmm (peftcore ops with formulas of their own): grad of grad works."""
    idx, vals = _delta(6, 5, 7)
    x = torch.randn(3, 5, dtype=torch.float64)

    def f(x):
        return ops.sparse_delta_spmm(x, idx, vals, 6, 1.0).pow(3).sum()

    gg = jacrev(grad(f))(x)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(f(xr), xr, create_graph=True)
    rows = [torch.autograd.grad(g.reshape(-1)[i], xr, retain_graph=True)[0] for i in range(x.numel())]
    torch.testing.assert_close(gg.reshape(x.numel(), -1), torch.stack(rows).reshape(x.numel(), -1))


def test_forward_mode_refused_with_op_name():
    p = torch.randn(2, 4, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="peftcore::orthogonal_cayley: forward-mode AD"):
        jvp(ops.orthogonal_cayley, (p,), (torch.ones_like(p),))


def test_vmap_of_inplace_op_refused_with_op_name():
    w = torch.randn(2, 4, 4)
    idx, vals = _delta(4, 4, 3, torch.float32)
    with pytest.raises(RuntimeError, match="peftcore::sparse_delta_merge_"):
        vmap(lambda w: ops.sparse_delta_merge_(w, idx, vals, 1.0))(w)
