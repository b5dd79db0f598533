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
scatter. On both backends the delta's product is its own small GEMM accumulated into the view of the dense
result (fp32 accumulation for half types, one rounding). It is never folded into the weight first: ``W_sel +
delta`` rounded to a bf16 / fp16 ``W`` loses every delta below half an ulp of ``W`` (all of an early-training
delta of 1e-4 on weights near 8). The CPU ops detect ranges themselves; on CUDA that would need a host sync, so
pass ``range_start=a`` explicitly (:func:`partial_range_start` computes ``a`` once, e.g. when the adapter is
created). ``range_start=None`` / ``-1`` means "use index".

Validation. Every op checks the shapes, dtypes and devices of all its arguments (backward ops included), on every
backend and in the fake kernels. On CPU the ops also check the index values: sorted ascending, unique, in
``[0, W.shape[dim])`` (``[0, size)`` / ``[0, x.shape[-1])`` for gather / scatter-add), and equal to ``[a, a+k)``
when ``range_start=a`` is given. On CUDA the hot path never syncs with the host (the ops are CUDA-graph
capturable), so index *values* are not checked there: call :func:`partial_validate` (``index``, ``size``,
``range_start``) once when an adapter is created or loaded. A malformed index on CUDA gives wrong numbers but
never an access outside a buffer: entries outside ``[0, size)`` are skipped (gathered as 0, never scattered),
repeated entries race in the scatter-add, and an explicit ``range_start`` is trusted (its bounds are checked).

Double backward. :func:`partial_gather` and :func:`partial_scatter_add` are each other's adjoint and linear, so
their derivatives of any order are exact (tested with ``gradgradcheck``). ``partial_linear``'s backward op
``partial_linear_backward`` refuses to be differentiated again (``create_graph=True`` works for first
derivatives; a second backward through it raises an error naming the op).

CUDA kernels. The gather / scatter-add kernels move the ``[tokens, k]`` side 16 bytes per access when it is
16-byte aligned and ``k`` is a multiple of 16 / element size (else one element), with blocks of tokens x columns
sized to ``k``; ``torch.ops.peftcore.partial_vec_plan(tokens, k, elem_size, address)`` returns the launch the
CUDA launcher picks (host planning, checked on CPU by the tests).
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import refuse_double_backward, register_autograd, same_device, with_last

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


def partial_validate(index, size: int, range_start: Optional[int] = None) -> None:
    """Raise if ``index`` is not 1-D int64, sorted ascending, unique and in ``[0, size)`` (or, with
    ``range_start=a``, not exactly ``[a, a+k)``).

    The CUDA ops do not check index values (that would sync with the host): this is their check. It syncs on
    CUDA: call it when an adapter is created or loaded, not in a training step.
    """
    _lib.partial_validate(index, size, -1 if range_start is None else int(range_start))


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


_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_index(op, index, ref):
    torch._check(index.dtype == torch.int64, lambda: f"{op}: index must be int64, got {index.dtype}")
    torch._check(index.dim() == 1, lambda: f"{op}: index must be 1-D, got shape {list(index.shape)}")
    same_device(op, ref, index=index)


def _check_linear_args(op, x_name, x, weight, delta, index, dim, range_start):
    """The shape / dtype / device checks of check_linear_args (partial_cpu.cpp), same messages."""
    torch._check(x.dtype in _FLOAT, lambda: f"{op}: {x_name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    torch._check(weight.dim() == 2, lambda: f"{op}: weight must be 2-D, got shape {tuple(weight.shape)}")
    torch._check(weight.dtype == x.dtype, lambda: f"{op}: weight has dtype {weight.dtype} but {x_name} has {x.dtype}")
    same_device(op, x, weight=weight, delta=delta)
    torch._check(dim in (0, 1), lambda: f"{op}: dim must be 0 (rows) or 1 (columns), got {dim}")
    _check_index(op, index, x)
    torch._check(delta.dtype in (torch.float32, weight.dtype),
                 lambda: f"{op}: delta must be float32 or the weight's dtype ({weight.dtype}), got {delta.dtype}")
    k = index.shape[0]
    want = (k, weight.shape[1]) if dim == 0 else (weight.shape[0], k)
    torch._check(tuple(delta.shape) == want,
                 lambda: f"{op}: delta must have shape {list(want)} for dim={dim}, k={k} and weight "
                         f"{list(weight.shape)}, got {list(delta.shape)}")
    size = weight.shape[dim]
    torch._check(range_start >= -1, lambda: f"{op}: range_start must be -1 (use index) or >= 0, got {range_start}")
    torch._check(range_start < 0 or range_start + k <= size,
                 lambda: f"{op}: range [range_start, range_start + k) = [{range_start}, {range_start + k}) exceeds "
                         f"weight.size({dim}) = {size}")


def _check_last(op, name, t, features):
    torch._check(t.dim() >= 1, lambda: f"{op}: {name} must have at least 1 dim, got a scalar")
    torch._check(t.shape[-1] == features,
                 lambda: f"{op}: {name} must have last dim {features}, got shape {list(t.shape)}")


@torch.library.register_fake("peftcore::partial_linear")
def _(x, weight, bias, delta, index, dim, range_start=-1):
    op = "partial_linear"
    _check_linear_args(op, "x", x, weight, delta, index, dim, range_start)
    _check_last(op, "x", x, weight.shape[1])
    if bias is not None:
        torch._check(bias.dtype == x.dtype, lambda: f"{op}: bias has dtype {bias.dtype} but x has {x.dtype}")
        same_device(op, x, bias=bias)
        torch._check(bias.dim() == 1 and bias.shape[0] == weight.shape[0],
                     lambda: f"{op}: bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")
    return x.new_empty(with_last(x, weight.shape[0]))


@torch.library.register_fake("peftcore::partial_linear_backward")
def _(grad_out, saved, weight, delta, index, dim, output_mask, range_start=-1):
    op = "partial_linear_backward"
    _check_linear_args(op, "grad_out", grad_out, weight, delta, index, dim, range_start)
    torch._check(saved.dtype == grad_out.dtype,
                 lambda: f"{op}: saved has dtype {saved.dtype} but grad_out has {grad_out.dtype}")
    same_device(op, grad_out, saved=saved)
    _check_last(op, "grad_out", grad_out, weight.shape[0])
    _check_last(op, "saved", saved, index.shape[0] if dim == 1 else weight.shape[1])
    torch._check(tuple(saved.shape[:-1]) == tuple(grad_out.shape[:-1]),
                 lambda: f"{op}: grad_out and saved must have the same leading (token) dims, got "
                         f"{list(grad_out.shape)} and {list(saved.shape)}")
    gx = saved.new_empty(with_last(saved, weight.shape[1])) if output_mask[0] else saved.new_empty((0,))
    gd = delta.new_empty(delta.shape) if output_mask[1] else delta.new_empty((0,))
    gb = grad_out.new_empty((weight.shape[0],)) if output_mask[2] else grad_out.new_empty((0,))
    return gx, gd, gb


@torch.library.register_fake("peftcore::partial_gather")
def _(x, index):
    op = "partial_gather"
    torch._check(x.dtype in _FLOAT, lambda: f"{op}: x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    _check_index(op, index, x)
    torch._check(x.dim() >= 1, lambda: f"{op}: x must have at least 1 dim, got a scalar")
    return x.new_empty(with_last(x, index.shape[0]))


@torch.library.register_fake("peftcore::partial_scatter_add")
def _(src, index, size):
    op = "partial_scatter_add"
    torch._check(src.dtype in _FLOAT,
                 lambda: f"{op}: src must be float32, float16, bfloat16 or float64, got {src.dtype}")
    _check_index(op, index, src)
    torch._check(size >= 0, lambda: f"{op}: size must be >= 0, got {size}")
    _check_last(op, "src", src, index.shape[0])
    return src.new_empty(with_last(src, size))


@torch.library.register_fake("peftcore::partial_validate")
def _(index, size, range_start=-1):
    op = "partial_validate"
    torch._check(index.dtype == torch.int64, lambda: f"{op}: index must be int64, got {index.dtype}")
    torch._check(index.dim() == 1, lambda: f"{op}: index must be 1-D, got shape {list(index.shape)}")
    torch._check(size >= 0, lambda: f"{op}: size must be >= 0, got {size}")
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
refuse_double_backward("partial_linear_backward", "partial_linear")


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
