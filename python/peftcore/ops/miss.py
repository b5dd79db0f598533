"""miss: the input fold of HF PEFT's MiSS adapter (default and "mini" forms).

PEFT's MiSS layer adds, for ``x [..., n]`` (``n = in_features``) and a trainable ``miss [r, out]``
(the "mini" form: ``miss [r, mini_r]`` repeated ``out / mini_r`` times along its columns)::

    x_pad = F.pad(x, (0, (r - n % r) % r))                   # zero-pad to a multiple of r
    result += x_pad.reshape(..., n_pad // r, r).sum(-2) @ miss

The first factor is a *fold*: feature ``f`` goes to class ``f % r``,

    miss_fold(x, r)[..., c] = sum over f < n with f % r == c of x[..., f]          ([..., n] -> [..., r])

(a tail chunk shorter than ``r`` simply contributes nothing to the classes it lacks, which is PEFT's zero
padding). Its adjoint, the gradient with respect to ``x``, is the *unfold* (tiling)

    miss_unfold(g, n)[..., f] = g[..., f % r]                                       ([..., r] -> [..., n])

so ``miss_fold``'s backward is ``miss_unfold`` and ``miss_unfold``'s is ``miss_fold``. peftcore gives both their
own kernels: no padded copy of ``x`` is made in the forward and no ``[..., n_pad // r, r]`` expanded gradient in
the backward. ``1 <= r <= n`` (PEFT requires ``r <= in_features``). The fold accumulates in fp32 (fp64 for
float64) and returns ``x``'s dtype.

The MiSS delta is then ``miss_fold(x, r) @ miss`` (an ordinary GEMM; ``miss`` gets its gradient from autograd).
Dtypes: float32, float16, bfloat16, float64 on CPU; float32, float16, bfloat16 on CUDA. Any leading dims;
non-contiguous inputs are accepted (copied to contiguous first). The CUDA kernels move 16 bytes per access when
the rows are 16-byte aligned (``n`` and ``r`` multiples of 16 / element size), scalar kernels otherwise;
``torch.ops.peftcore.miss_vec_plan(rows, n, r, elem_size, x_address, out_address, unfold)`` returns the launch
the CUDA launcher picks (host planning, checked on CPU by the tests).
"""
from __future__ import annotations

import torch

from ._common import with_last, register_autograd

_lib = torch.ops.peftcore

__all__ = ["miss_fold", "miss_unfold"]


# ---------------------------------------------------------------------------------------------------------------
# Documented wrappers (the ops themselves are torch.ops.peftcore.<name>).


def miss_fold(x, r: int):
    """Fold ``x [..., n]`` into ``[..., r]``: ``y[..., c] = sum(x[..., f] for f < n if f % r == c)``.

    Equals PEFT MiSS's ``F.pad(x, (0, (r - n % r) % r)).reshape(..., -1, r).sum(-2)`` without the padded copy.
    ``1 <= r <= n``; fp32 accumulation, output in ``x``'s dtype. Differentiable (backward: :func:`miss_unfold`).
    """
    return _lib.miss_fold(x, int(r))


def miss_unfold(grad, n: int):
    """Tile ``grad [..., r]`` to ``[..., n]``: ``out[..., f] = grad[..., f % r]`` (the adjoint of
    :func:`miss_fold`, i.e. its gradient with respect to ``x``). ``1 <= r <= n``. Differentiable (backward:
    :func:`miss_fold`)."""
    return _lib.miss_unfold(grad, int(n))


# ---------------------------------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes only) for torch.compile / meta tensors. Same checks as the kernels.


def _check_float(op, name, t):
    torch._check(t.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64),
                 lambda: f"{op}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    torch._check(t.dim() >= 1, lambda: f"{op}: {name} must have at least 1 dim, got a scalar")


@torch.library.register_fake("peftcore::miss_fold")
def _(x, r):
    _check_float("miss_fold", "x", x)
    torch._check(r >= 1, lambda: f"miss_fold: r must be >= 1, got {r}")
    torch._check(r <= x.shape[-1], lambda: f"miss_fold: r must be <= x's last dim (in_features), got r = {r} "
                                           f"for x of shape {list(x.shape)}")
    return x.new_empty(with_last(x, r))


@torch.library.register_fake("peftcore::miss_unfold")
def _(grad, n):
    _check_float("miss_unfold", "grad", grad)
    torch._check(n >= 1, lambda: f"miss_unfold: n must be >= 1, got {n}")
    r = grad.shape[-1]
    torch._check(r >= 1, lambda: f"miss_unfold: grad's last dim r must be >= 1, got grad of shape {list(grad.shape)}")
    torch._check(r <= n, lambda: f"miss_unfold: grad's last dim r must be <= n, got r = {r} and n = {n}")
    return grad.new_empty(with_last(grad, n))


# ---------------------------------------------------------------------------------------------------------------
# Autograd: each op's backward is the other op (nothing saved but a size), so it traces under torch.compile too.


def _fold_setup(ctx, inputs, output):
    x, r = inputs
    ctx.n = x.shape[-1]


def _fold_backward(ctx, grad):
    return _lib.miss_unfold(grad, ctx.n), None


register_autograd("peftcore::miss_fold", _fold_backward, setup_context=_fold_setup)


def _unfold_setup(ctx, inputs, output):
    grad, n = inputs
    ctx.r = grad.shape[-1]


def _unfold_backward(ctx, grad):
    return _lib.miss_fold(grad, ctx.r), None


register_autograd("peftcore::miss_unfold", _unfold_backward, setup_context=_unfold_setup)
