"""partial: structured partial backprop (S2FT) — a trainable delta on a subset of W's rows or columns.

A frozen weight ``W [out, in]`` gets a trainable ``delta`` on the rows (``dim=0``, output channels) or columns
(``dim=1``, input channels) picked by ``index``:

* ``index`` — 1-D int64, sorted ascending, unique, in ``[0, W.shape[dim])``; ``k = index.numel()``;
* ``delta`` — ``[k, in]`` (dim 0) or ``[out, k]`` (dim 1), float32 or ``W``'s dtype.

``W_eff`` is ``W`` with ``delta`` added to the selected rows / columns and ``y = x @ W_eff^T + bias``.
``W_eff`` is never built: no op makes an ``[out, in]`` temporary (only ``[out, k]`` / ``[k, in]`` ones), except
the dense weight gradient of :func:`partial_linear` when — and only when — ``W.requires_grad`` is set.

Activation memory: for ``dim=1`` the autograd graph saves only ``x[..., index]`` (``[..., k]``, via
:func:`partial_gather`), i.e. ``k / in`` of what a linear layer saves — the point of S2FT. For ``dim=0`` the
delta's gradient ``g[..., index]^T x`` needs all of ``x``, which is saved.

Contiguous ranges (``range_start``). When ``index`` is the range ``[a, a+k)`` (what S2FT's co-permutation of
the weights produces) the selected block is a strided view of ``x``, ``W`` and the outputs: no gather, no
scatter. On CPU the delta's product is one small GEMM accumulated into the view of the dense result (measured
faster here than splitting the dense GEMM around the block, which makes BLAS re-pack the shared operand per
block); on CUDA the dense GEMM is split around the block, whose slice of ``W`` is replaced by ``W_sel + delta``
(no extra GEMM; a choice still to be measured on a GPU). The CPU ops detect ranges themselves; on CUDA that
would need a host sync, so pass ``range_start=a`` explicitly (then ``index`` only gives ``k`` and is not read;
:func:`partial_range_start` computes ``a`` once, e.g. when the adapter is created). ``range_start=None`` / ``-1``
means "use index".

Validation: on CPU every op checks the index (sorted, unique, in range) on the way. On CUDA the hot path never
syncs with the host (the ops are CUDA-graph capturable), so the structural checks live in
:func:`partial_validate`; call it once when an adapter is created or loaded. Malformed indices on CUDA give wrong
numbers but never an out-of-bounds access.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import same_device, with_last, register_autograd

_lib = torch.ops.peftcore

__all__ = [
    "partial_linear",
    "partial_gather",
    "partial_scatter_add",
    "partial_validate",
    "partial_range_start",
]


# ---------------------------------------------------------------------------------------------------------------
# Documented wrappers (the ops themselves are torch.ops.peftcore.<name>).


def partial_linear(x, weight, bias, delta, index, dim: int, range_start: Optional[int] = None):
    """``y = x @ W_eff^T + bias`` for ``x [..., in]``, ``W_eff`` = ``weight`` with ``delta`` added at ``index``
    along ``dim`` (0: rows, ``delta [k, in]``; 1: columns, ``delta [out, k]``), never materialising ``W_eff``.

    ``range_start``: ``None`` (or -1) uses ``index`` (on CPU a contiguous index is detected and takes the fast
    range path); an int ``a >= 0`` declares ``index == [a, a+k)`` — the fast path on CUDA too, with no host sync.

    Gradients flow to ``x``, ``delta`` and ``bias``. For ``dim=1`` autograd saves only ``x[..., index]``.
    ``weight`` is meant to be frozen; if it does require grad, its dense gradient ``grad^T @ x`` is computed (one
    GEMM and an ``[out, in]`` buffer, as for any ``nn.Linear``) and ``x`` itself is saved too.
    """
    return _lib.partial_linear(x, weight, bias, delta, index, dim, -1 if range_start is None else int(range_start))


def partial_gather(x, index):
    """``x[..., index]`` along the last dim (differentiable; its backward is :func:`partial_scatter_add`)."""
    return _lib.partial_gather(x, index)


def partial_scatter_add(src, index, size: int):
    """Zeros ``[..., size]`` with ``src [..., k]`` added at columns ``index`` (differentiable; backward: gather)."""
    return _lib.partial_scatter_add(src, index, size)


def partial_validate(index, size: int) -> None:
    """Raise if ``index`` is not 1-D int64, sorted ascending, unique and in ``[0, size)``.

    Syncs with the host on CUDA: call it when an adapter is created or loaded, not in a training step.
    """
    _lib.partial_validate(index, size)


def partial_range_start(index) -> int:
    """``a`` if ``index`` is the contiguous range ``[a, a+k)`` (0 for an empty index), else -1.

    Reads ``index`` on the host (a sync on CUDA): compute it once and pass it as ``range_start``.
    """
    k = index.numel()
    if k == 0:
        return 0
    first, last = (int(v) for v in index[[0, -1]].tolist())
    return first if last - first == k - 1 else -1


# ---------------------------------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes only) for torch.compile / meta tensors.


@torch.library.register_fake("peftcore::partial_linear")
def _(x, weight, bias, delta, index, dim, range_start=-1):
    same_device("partial_linear", x, weight=weight, bias=bias, delta=delta, index=index)
    torch._check(dim in (0, 1), lambda: f"partial_linear: dim must be 0 (rows) or 1 (columns), got {dim}")
    torch._check(x.shape[-1] == weight.shape[1], lambda: "partial_linear: x's last dim must equal in_features")
    return x.new_empty(with_last(x, weight.shape[0]))


@torch.library.register_fake("peftcore::partial_linear_backward")
def _(grad_out, saved, weight, delta, index, dim, output_mask, range_start=-1):
    gx = saved.new_empty(with_last(saved, weight.shape[1])) if output_mask[0] else saved.new_empty((0,))
    gd = delta.new_empty(delta.shape) if output_mask[1] else delta.new_empty((0,))
    gb = grad_out.new_empty((weight.shape[0],)) if output_mask[2] else grad_out.new_empty((0,))
    return gx, gd, gb


@torch.library.register_fake("peftcore::partial_gather")
def _(x, index):
    same_device("partial_gather", x, index=index)
    return x.new_empty(with_last(x, index.shape[0]))


@torch.library.register_fake("peftcore::partial_scatter_add")
def _(src, index, size):
    same_device("partial_scatter_add", src, index=index)
    return src.new_empty(with_last(src, size))


@torch.library.register_fake("peftcore::partial_validate")
def _(index, size):
    return None


# ---------------------------------------------------------------------------------------------------------------
# Autograd. Every backward calls peftcore ops, so it traces under torch.compile too.


def _linear_setup(ctx, inputs, output):
    x, weight, bias, delta, index, dim, range_start = inputs
    ctx.dim, ctx.range_start = dim, range_start
    ctx.x_shape = x.shape
    if dim == 1:
        # Only x[..., index] ([..., k]) is kept: a copy, so x itself can be freed.
        if range_start >= 0:
            saved = x.narrow(-1, range_start, index.shape[0]).clone(memory_format=torch.contiguous_format)
        else:
            saved = _lib.partial_gather(x, index)
    else:
        saved = x
    # W requires grad (documented, not the S2FT set-up): the dense grad^T x needs all of x.
    x_for_w = x if (weight.requires_grad and dim == 1) else None
    ctx.save_for_backward(saved, weight, delta, index, x_for_w)


def _linear_backward(ctx, grad):
    saved, weight, delta, index, x_for_w = ctx.saved_tensors
    need_x, need_w, need_b, need_d = ctx.needs_input_grad[:4]
    gx, gd, gb = _lib.partial_linear_backward(grad, saved, weight, delta, index, ctx.dim, [need_x, need_d, need_b],
                                              ctx.range_start)
    gw = None
    if need_w:  # documented: a frozen W never gets here
        x = x_for_w if ctx.dim == 1 else saved
        gw = grad.reshape(-1, grad.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))
    return (gx if need_x else None, gw, gb if need_b else None, gd if need_d else None, None, None, None)


register_autograd("peftcore::partial_linear", _linear_backward, setup_context=_linear_setup)


def _gather_setup(ctx, inputs, output):
    x, index = inputs
    ctx.save_for_backward(index)
    ctx.size = x.shape[-1]


def _gather_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return _lib.partial_scatter_add(grad, index, ctx.size), None


register_autograd("peftcore::partial_gather", _gather_backward, setup_context=_gather_setup)


def _scatter_setup(ctx, inputs, output):
    src, index, size = inputs
    ctx.save_for_backward(index)


def _scatter_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return _lib.partial_gather(grad, index), None, None


register_autograd("peftcore::partial_scatter_add", _scatter_backward, setup_context=_scatter_setup)
