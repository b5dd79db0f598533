"""sparse_delta: sparse weight deltas (SpIEL, LT-SFT, SaRA, DSEE, SHiRA) without a dense weight copy.

A delta ``S`` on a weight ``W [out, in]`` is ``(indices, values)``:

* ``indices`` — 1-D int32 or int64 flat positions ``r * in + c``, sorted ascending and unique;
* ``values`` — ``[nnz]`` float32, or ``W``'s dtype.

The effective weight is ``W + scale * S``. Every op walks ``S`` through a CSR view built per call (O(nnz + out)),
so no op ever builds an ``[out, in]`` temporary except ``sparse_delta_merge`` (whose output is one) and the dense
weight gradient of ``sparse_delta_linear`` when — and only when — ``W.requires_grad`` is set.

Validation: on CPU every op checks the indices (sorted, unique, in range) as it builds the CSR view. On CUDA the
hot path never syncs with the host (the ops are CUDA-graph capturable), so the structural checks live in
:func:`sparse_delta_validate`; call it once when a delta is created or loaded. Malformed indices on CUDA give
wrong numbers but never an out-of-bounds access.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import same_device, with_last, register_autograd

_lib = torch.ops.peftcore

__all__ = [
    "sparse_delta_linear",
    "sparse_delta_spmm",
    "sparse_delta_spmm_t",
    "sparse_delta_sddmm",
    "sparse_delta_merge",
    "sparse_delta_merge_",
    "sparse_delta_topk_grad",
    "sparse_delta_validate",
]


# ---------------------------------------------------------------------------------------------------------------
# Documented wrappers (the ops themselves are torch.ops.peftcore.<name>).


def sparse_delta_linear(x, weight, bias, indices, values, scale: float = 1.0):
    """``y = x @ (weight + scale * S)^T + bias`` for ``x [..., in]``, never materialising ``weight + scale*S``.

    Gradients flow to ``x``, ``values`` and ``bias``. ``weight`` is meant to be frozen; if it does require grad,
    its dense gradient ``grad_out^T @ x`` is computed (one GEMM and an ``[out, in]`` buffer, as for any
    ``nn.Linear``).
    """
    return _lib.sparse_delta_linear(x, weight, bias, indices, values, scale)


def sparse_delta_spmm(x, indices, values, out_features: int, scale: float = 1.0):
    """``scale * x @ S^T`` for ``x [..., in]`` and ``S [out_features, in]``: the sparse half of the forward."""
    return _lib.sparse_delta_spmm(x, indices, values, out_features, scale)


def sparse_delta_spmm_t(grad, indices, values, in_features: int, scale: float = 1.0):
    """``scale * grad @ S`` for ``grad [..., out]`` and ``S [out, in_features]``: the sparse half of grad_x."""
    return _lib.sparse_delta_spmm_t(grad, indices, values, in_features, scale)


def sparse_delta_sddmm(grad, x, indices, scale: float = 1.0, out_dtype: Optional[torch.dtype] = None):
    """SDDMM ``out[k] = scale * sum_t grad[t, r_k] * x[t, c_k]`` accumulated in fp32 (fp64 for float64 inputs).

    This is the gradient of ``values``. Returned in ``out_dtype`` (default float32, float64 for float64 inputs).
    """
    return _lib.sparse_delta_sddmm(grad, x, indices, scale, out_dtype)


def sparse_delta_merge_(weight, indices, values, scale: float = 1.0) -> None:
    """In place ``weight += scale * S`` (unmerge with ``-scale``). ``weight`` must be contiguous."""
    _lib.sparse_delta_merge_(weight, indices, values, scale)


def sparse_delta_merge(weight, indices, values, scale: float = 1.0):
    """Out of place ``weight + scale * S`` (differentiable in ``weight`` and ``values``)."""
    return _lib.sparse_delta_merge(weight, indices, values, scale)


def sparse_delta_topk_grad(grad, x, k: int, exclude=None):
    """The ``k`` flat positions with the largest ``|grad^T @ x|`` that are not in ``exclude``.

    ``grad [..., out]`` is the output gradient, ``x [..., in]`` the input of a linear layer; ``exclude`` holds
    sorted unique flat indices (e.g. the delta's current ones). Computed one block of rows at a time, so no
    ``[out, in]`` buffer is built. Returns ``(indices int64 [k] ascending, scores float32 [k])`` with
    ``scores = |grad^T x|`` at those positions: the growth step of SpIEL-AG / LT-SFT.
    """
    return _lib.sparse_delta_topk_grad(grad, x, k, exclude)


def sparse_delta_validate(indices, out_features: int, in_features: int) -> None:
    """Raise if ``indices`` are not 1-D int32/int64, sorted ascending, unique and in ``[0, out*in)``.

    Syncs with the host on CUDA: call it when a delta is created or loaded, not in a training step.
    """
    _lib.sparse_delta_validate(indices, out_features, in_features)


# ---------------------------------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes only) for torch.compile / meta tensors.


@torch.library.register_fake("peftcore::sparse_delta_linear")
def _(x, weight, bias, indices, values, scale=1.0):
    same_device("sparse_delta_linear", x, weight=weight, bias=bias, indices=indices, values=values)
    torch._check(x.shape[-1] == weight.shape[1], lambda: "sparse_delta_linear: x's last dim must equal in_features")
    return x.new_empty(with_last(x, weight.shape[0]))


@torch.library.register_fake("peftcore::sparse_delta_linear_backward")
def _(grad_out, x, weight, indices, values, scale, output_mask):
    gx = x.new_empty(x.shape) if output_mask[0] else x.new_empty((0,))
    gv = values.new_empty(values.shape) if output_mask[1] else values.new_empty((0,))
    gb = weight.new_empty((weight.shape[0],)) if output_mask[2] else weight.new_empty((0,))
    return gx, gv, gb


@torch.library.register_fake("peftcore::sparse_delta_spmm")
def _(x, indices, values, out_features, scale=1.0):
    same_device("sparse_delta_spmm", x, indices=indices, values=values)
    return x.new_empty(with_last(x, out_features))


@torch.library.register_fake("peftcore::sparse_delta_spmm_t")
def _(grad, indices, values, in_features, scale=1.0):
    same_device("sparse_delta_spmm_t", grad, indices=indices, values=values)
    return grad.new_empty(with_last(grad, in_features))


def _sddmm_dtype(grad, out_dtype):
    if out_dtype is not None:
        return out_dtype
    return torch.float64 if grad.dtype == torch.float64 else torch.float32


@torch.library.register_fake("peftcore::sparse_delta_sddmm")
def _(grad, x, indices, scale=1.0, out_dtype=None):
    same_device("sparse_delta_sddmm", grad, x=x, indices=indices)
    return grad.new_empty((indices.shape[0],), dtype=_sddmm_dtype(grad, out_dtype))


@torch.library.register_fake("peftcore::sparse_delta_merge_")
def _(weight, indices, values, scale=1.0):
    return None


@torch.library.register_fake("peftcore::sparse_delta_merge")
def _(weight, indices, values, scale=1.0):
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("peftcore::sparse_delta_topk_grad")
def _(grad, x, k, exclude=None):
    return grad.new_empty((k,), dtype=torch.int64), grad.new_empty((k,), dtype=torch.float32)


@torch.library.register_fake("peftcore::sparse_delta_validate")
def _(indices, out_features, in_features):
    return None


# ---------------------------------------------------------------------------------------------------------------
# Autograd. Every backward calls peftcore ops, so it traces under torch.compile too.


def _linear_setup(ctx, inputs, output):
    x, weight, bias, indices, values, scale = inputs
    ctx.save_for_backward(x, weight, indices, values)
    ctx.scale = scale


def _linear_backward(ctx, grad):
    x, weight, indices, values = ctx.saved_tensors
    need_x, need_w, need_b, _, need_v = ctx.needs_input_grad[:5]
    gx, gv, gb = _lib.sparse_delta_linear_backward(grad, x, weight, indices, values, ctx.scale, [need_x, need_v, need_b])
    gw = None
    if need_w:  # documented: a frozen W never gets here
        gw = grad.reshape(-1, grad.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))
    return (gx if need_x else None, gw, gb if need_b else None, None, gv if need_v else None, None)


register_autograd("peftcore::sparse_delta_linear", _linear_backward, setup_context=_linear_setup)


def _spmm_setup(ctx, inputs, output):
    x, indices, values, out_features, scale = inputs
    ctx.save_for_backward(x, indices, values)
    ctx.scale = scale


def _spmm_backward(ctx, grad):
    x, indices, values = ctx.saved_tensors
    gx = gv = None
    if ctx.needs_input_grad[0]:
        gx = _lib.sparse_delta_spmm_t(grad, indices, values, x.shape[-1], ctx.scale)
    if ctx.needs_input_grad[2]:
        gv = _lib.sparse_delta_sddmm(grad, x, indices, ctx.scale, values.dtype)
    return gx, None, gv, None, None


register_autograd("peftcore::sparse_delta_spmm", _spmm_backward, setup_context=_spmm_setup)


def _spmm_t_setup(ctx, inputs, output):
    grad, indices, values, in_features, scale = inputs
    ctx.save_for_backward(grad, indices, values)
    ctx.scale = scale


def _spmm_t_backward(ctx, gy):
    g, indices, values = ctx.saved_tensors
    gg = gv = None
    if ctx.needs_input_grad[0]:
        gg = _lib.sparse_delta_spmm(gy, indices, values, g.shape[-1], ctx.scale)
    if ctx.needs_input_grad[2]:
        gv = _lib.sparse_delta_sddmm(g, gy, indices, ctx.scale, values.dtype)
    return gg, None, gv, None, None


register_autograd("peftcore::sparse_delta_spmm_t", _spmm_t_backward, setup_context=_spmm_t_setup)


def _sddmm_setup(ctx, inputs, output):
    grad, x, indices, scale, out_dtype = inputs
    ctx.save_for_backward(grad, x, indices)
    ctx.scale = scale


def _sddmm_backward(ctx, w):
    g, x, indices = ctx.saved_tensors
    # values must be float32 or the activations' dtype
    w = w if w.dtype in (torch.float32, x.dtype) else w.to(torch.float32)
    gg = gx = None
    if ctx.needs_input_grad[0]:
        gg = _lib.sparse_delta_spmm(x, indices, w, g.shape[-1], ctx.scale)
    if ctx.needs_input_grad[1]:
        gx = _lib.sparse_delta_spmm_t(g, indices, w, x.shape[-1], ctx.scale)
    return gg, gx, None, None, None


register_autograd("peftcore::sparse_delta_sddmm", _sddmm_backward, setup_context=_sddmm_setup)


def _merge_setup(ctx, inputs, output):
    weight, indices, values, scale = inputs
    ctx.save_for_backward(indices)
    ctx.scale = scale
    ctx.values_dtype = values.dtype


def _merge_backward(ctx, grad):
    (indices,) = ctx.saved_tensors
    gv = None
    if ctx.needs_input_grad[2]:
        gv = (grad.reshape(-1).take(indices.long()) * ctx.scale).to(ctx.values_dtype)
    return (grad if ctx.needs_input_grad[0] else None), None, gv, None


register_autograd("peftcore::sparse_delta_merge", _merge_backward, setup_context=_merge_setup)
