"""sparse_delta: sparse weight deltas (SpIEL, LT-SFT, SaRA, DSEE, SHiRA) without a dense weight copy.

A delta ``S`` on a weight ``W [out, in]`` is ``(indices, values)``:

* ``indices`` — 1-D int32 or int64 flat positions ``r * in + c``, sorted ascending and unique;
* ``values`` — ``[nnz]`` float32, or ``W``'s dtype.

The effective weight is ``W + scale * S``. Every op walks ``S`` through a CSR view (``row_ptr``; grad_x walks
``S^T`` through ``S``'s CSC view ``csc_ptr, csc_idx, csc_perm``), so no op ever builds an ``[out, in]`` temporary
except ``sparse_delta_merge`` (whose output is one) and the dense weight gradient of ``sparse_delta_linear`` when —
and only when — ``W.requires_grad`` is set.

CSR view: :func:`sparse_delta_csr` builds ``(row_ptr, csc_ptr, csc_idx, csc_perm)`` from ``indices`` (ATen ops,
no host sync). Build it once per delta — whenever its indices change — and pass it to the ops as the optional
arguments of the same names (``SparseDeltaLinear`` does); an op not given it builds what it needs per call (CUDA:
``row_ptr`` one launch, the CSC view a sort). On CPU a given view is checked against ``indices`` (an error naming
the op when it does not match) and the CPU kernels then use their own; on CUDA only its dtype, shape and device are
checked (no host sync): its values are trusted to be ``sparse_delta_csr`` of the indices passed with it, and a view
that is not gives wrong numbers, never an out-of-bounds access.

Validation: every op (backward op included) checks dtypes, ranks, shapes, devices and sizes, on every backend and
in its fake kernel, with messages that start with the op name. On CPU every op also checks the index values
(sorted, unique, in range) as it builds the CSR view, before writing anything. On CUDA the hot path never syncs with
the host (the ops are CUDA-graph capturable), so the value checks live in :func:`sparse_delta_validate`; call it
once when a delta is created or loaded. Malformed indices on CUDA give wrong numbers but never an out-of-bounds
access (the kernels skip entries outside their row / buffer).

Autograd: ``sparse_delta_linear``'s backward op refuses double backward (an error naming the op); spmm, spmm_t,
sddmm and merge have double backward. ``sparse_delta_merge_`` behaves as an ATen in-place op (version counter,
leaf / inference-tensor checks). ``sparse_delta_topk_grad``'s outputs are non-differentiable.

Determinism: CPU results are bitwise repeatable; so are CUDA's spmm and spmm_t (a fixed summation order per
output). On CUDA sddmm uses float atomics unless ``torch.use_deterministic_algorithms(True)``, under which it takes
an atomic-free path.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._common import FLOATS as _FLOATS, check_float as _check_float, dtype_name as _dt  # the families' shared checks
from ._common import non_differentiable, refuse_double_backward, register_autograd, same_device, with_last

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
    "sparse_delta_csr",
    "sparse_delta_tile_plan",
]


# ---------------------------------------------------------------------------------------------------------------
# Documented wrappers (the ops themselves are torch.ops.peftcore.<name>).


def sparse_delta_linear(x, weight, bias, indices, values, scale: float = 1.0, csr=None):
    """``y = x @ (weight + scale * S)^T + bias`` for ``x [..., in]``, never materialising ``weight + scale*S``.

    Gradients flow to ``x``, ``values`` and ``bias``. ``weight`` is meant to be frozen; if it does require grad,
    its dense gradient ``grad_out^T @ x`` is computed (one GEMM and an ``[out, in]`` buffer, as for any
    ``nn.Linear``). ``csr``: ``sparse_delta_csr(indices, out, in)`` (optional, see the module doc).
    """
    return _lib.sparse_delta_linear(x, weight, bias, indices, values, scale, *_csr4(csr))


def sparse_delta_spmm(x, indices, values, out_features: int, scale: float = 1.0, row_ptr=None):
    """``scale * x @ S^T`` for ``x [..., in]`` and ``S [out_features, in]``: the sparse half of the forward.

    ``row_ptr``: the first tensor of ``sparse_delta_csr(indices, out_features, in)`` (optional)."""
    return _lib.sparse_delta_spmm(x, indices, values, out_features, scale, row_ptr)


def sparse_delta_spmm_t(grad, indices, values, in_features: int, scale: float = 1.0, csr=None):
    """``scale * grad @ S`` for ``grad [..., out]`` and ``S [out, in_features]``: the sparse half of grad_x.

    On CUDA it is the forward kernel on ``S^T`` (S's CSC view from ``csr = sparse_delta_csr(...)`` when given, else
    built per call): no atomics, a fixed summation order.
    """
    _, cp, ci, cm = _csr4(csr)
    return _lib.sparse_delta_spmm_t(grad, indices, values, in_features, scale, cp, ci, cm)


def sparse_delta_sddmm(grad, x, indices, scale: float = 1.0, out_dtype: Optional[torch.dtype] = None, row_ptr=None):
    """SDDMM ``out[k] = scale * sum_t grad[t, r_k] * x[t, c_k]`` accumulated in fp32 (fp64 for float64 inputs).

    This is the gradient of ``values``. Returned in ``out_dtype`` (default float32, float64 for float64 inputs).
    On CUDA tokens are split over blocks with float atomics, except under ``torch.use_deterministic_algorithms``.
    """
    return _lib.sparse_delta_sddmm(grad, x, indices, scale, out_dtype, row_ptr)


def sparse_delta_csr(indices, out_features: int, in_features: int):
    """``(row_ptr, csc_ptr, csc_idx, csc_perm)``, all int64 on ``indices``' device: the CSR view of ``S`` and the
    CSR view of ``S^T`` (``csc_idx`` flat ``c * out + r`` ascending, ``csc_perm[j]`` the position in ``indices`` of
    its ``j``-th entry). No host sync. Build it when a delta's indices change and pass it to the ops."""
    return tuple(_lib.sparse_delta_csr(indices, out_features, in_features))


def sparse_delta_tile_plan(kernel: str, tokens: int, in_features: int, out_features: int, nnz: int,
                           dtype: torch.dtype, smem_optin: int, sms: int, deterministic: bool = False):
    """The CUDA launchers' tile plan for ``kernel`` (``"spmm"``, ``"spmm_t"``, ``"sddmm"``) as
    ``[tt, rows, cols, splits, smem, grid_x, grid_y, traffic]`` (host code, callable without a GPU); the rule is
    documented in ``csrc/sparse_delta/sparse_delta_plan.h``."""
    return list(_lib.sparse_delta_tile_plan(kernel, tokens, in_features, out_features, nnz, dtype, smem_optin, sms,
                                            deterministic))


def _csr4(csr):
    if csr is None:
        return (None, None, None, None)
    csr = tuple(csr)
    if len(csr) != 4:
        raise ValueError(f"sparse_delta: csr must be the 4 tensors of sparse_delta_csr, got {len(csr)}")
    return csr


def sparse_delta_merge_(weight, indices, values, scale: float = 1.0) -> None:
    """In place ``weight += scale * S`` (unmerge with ``-scale``). ``weight`` must be contiguous.

    Behaves as an ATen in-place op: bumps ``weight``'s version counter (a backward that saved ``weight`` then
    raises), and with grad mode on refuses a leaf that requires grad or any input that requires grad (the op has
    no derivative; use :func:`sparse_delta_merge`); refuses an inference tensor outside inference mode. Call it
    under ``torch.no_grad()``. On CPU the indices are validated before anything is written.
    """
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

    Ranking: larger score first; NaN scores rank above ``+inf``, which ranks above every finite score (as in
    ``torch.topk``); NaN never disturbs the order among finite scores. On CPU ties (and NaNs among themselves) go
    to the lower flat index, and float64 inputs are ranked in float64; on CUDA ties may resolve differently and
    ``exclude``'s values are not checked (no host sync). Outputs are non-differentiable.
    """
    return _lib.sparse_delta_topk_grad(grad, x, k, exclude)


def sparse_delta_validate(indices, out_features: int, in_features: int) -> None:
    """Raise if ``indices`` are not 1-D int32/int64, sorted ascending, unique and in ``[0, out*in)``.

    Syncs with the host on CUDA: call it when a delta is created or loaded, not in a training step.
    """
    _lib.sparse_delta_validate(indices, out_features, in_features)


# ---------------------------------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes only) for torch.compile / meta tensors. They check what the real kernels check
# before touching any value (dtypes, ranks, shapes, devices), with the same messages.

def _shape(t) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def _tokens(t):
    n = 1
    for s in t.shape[:-1]:
        n = n * s
    return n


def _check_activation(op, name, t, features=None):
    _check_float(op, name, t)
    torch._check(t.dim() >= 1, lambda: f"{op}: {name} must have at least 1 dim, got a scalar")
    if features is not None:
        torch._check(t.shape[-1] == features, lambda: f"{op}: {name} must have last dim {features}, got shape {_shape(t)}")


def _check_indices(op, indices, ref, name="indices"):
    torch._check(indices.dtype in (torch.int32, torch.int64),
                 lambda: f"{op}: {name} must be int32 or int64, got {_dt(indices.dtype)}")
    torch._check(indices.dim() == 1, lambda: f"{op}: {name} must be 1-D, got shape {_shape(indices)}")
    same_device(op, ref, **{name: indices})


def _check_delta(op, indices, values, ref):
    _check_indices(op, indices, ref)
    _check_float(op, "values", values)
    torch._check(values.dim() == 1, lambda: f"{op}: values must be 1-D, got shape {_shape(values)}")
    torch._check(values.shape[0] == indices.shape[0],
                 lambda: f"{op}: values has {values.shape[0]} entries but indices has {indices.shape[0]}")
    torch._check(values.dtype in (torch.float32, ref.dtype),
                 lambda: f"{op}: values must be float32 or the input's dtype ({_dt(ref.dtype)}), got {_dt(values.dtype)}")
    same_device(op, ref, values=values)


def _check_weight(op, weight, bias, x):
    torch._check(weight.dim() == 2, lambda: f"{op}: weight must be 2-D, got shape {_shape(weight)}")
    torch._check(weight.dtype == x.dtype, lambda: f"{op}: weight has dtype {_dt(weight.dtype)} but x has {_dt(x.dtype)}")
    same_device(op, x, weight=weight)
    if bias is not None:
        torch._check(bias.dtype == x.dtype, lambda: f"{op}: bias has dtype {_dt(bias.dtype)} but x has {_dt(x.dtype)}")
        same_device(op, x, bias=bias)
        torch._check(bias.dim() == 1 and bias.shape[0] == weight.shape[0],
                     lambda: f"{op}: bias must have shape [{weight.shape[0]}], got {_shape(bias)}")


def _check_csr_tensor(op, name, t, length, indices):
    torch._check(t.dtype == torch.int64, lambda: f"{op}: {name} must be int64, got {_dt(t.dtype)}")
    torch._check(t.dim() == 1 and t.shape[0] == length,
                 lambda: f"{op}: {name} must have shape [{length}], got {_shape(t)}")
    same_device(op, indices, **{name: t})


def _check_row_ptr(op, row_ptr, indices, out_features):
    if row_ptr is not None:
        _check_csr_tensor(op, "row_ptr", row_ptr, out_features + 1, indices)


def _check_csc(op, csc_ptr, csc_idx, csc_perm, indices, in_features):
    n = sum(t is not None for t in (csc_ptr, csc_idx, csc_perm))
    torch._check(n in (0, 3), lambda: f"{op}: csc_ptr, csc_idx and csc_perm go together (all or none), got {n} of 3")
    if n == 3:
        _check_csr_tensor(op, "csc_ptr", csc_ptr, in_features + 1, indices)
        _check_csr_tensor(op, "csc_idx", csc_idx, indices.shape[0], indices)
        _check_csr_tensor(op, "csc_perm", csc_perm, indices.shape[0], indices)


def _check_sizes(op, out_features, in_features):
    torch._check(out_features >= 0 and in_features >= 0, lambda: f"{op}: out_features and in_features must be >= 0, "
                                                                 f"got {out_features} and {in_features}")


def _check_token_pair(op, a_name, a, b_name, b):
    torch._check(b.dtype == a.dtype, lambda: f"{op}: {b_name} has dtype {_dt(b.dtype)} but {a_name} has {_dt(a.dtype)}")
    same_device(op, a, **{b_name: b})
    torch._check(a.dim() >= 1 and b.dim() >= 1, lambda: f"{op}: {a_name} and {b_name} must have at least 1 dim")
    torch._check(_tokens(a) == _tokens(b), lambda: f"{op}: {a_name} has {_tokens(a)} tokens but {b_name} has "
                                                   f"{_tokens(b)} (shapes {_shape(a)} and {_shape(b)})")


@torch.library.register_fake("peftcore::sparse_delta_linear")
def _(x, weight, bias, indices, values, scale=1.0, row_ptr=None, csc_ptr=None, csc_idx=None, csc_perm=None):
    op = "sparse_delta_linear"
    _check_float(op, "x", x)
    _check_weight(op, weight, bias, x)
    _check_delta(op, indices, values, x)
    _check_row_ptr(op, row_ptr, indices, weight.shape[0])
    _check_csc(op, csc_ptr, csc_idx, csc_perm, indices, weight.shape[1])
    _check_activation(op, "x", x, weight.shape[1])
    return x.new_empty(with_last(x, weight.shape[0]))


@torch.library.register_fake("peftcore::sparse_delta_linear_backward")
def _(grad_out, x, weight, indices, values, scale, output_mask, row_ptr=None, csc_ptr=None, csc_idx=None,
      csc_perm=None):
    op = "sparse_delta_linear_backward"
    _check_float(op, "grad_out", grad_out)
    _check_weight(op, weight, None, x)
    _check_delta(op, indices, values, x)
    torch._check(grad_out.dim() >= 1 and grad_out.shape[-1] == weight.shape[0],
                 lambda: f"{op}: grad_out must have last dim {weight.shape[0]}, got shape {_shape(grad_out)}")
    _check_token_pair(op, "grad_out", grad_out, "x", x)
    torch._check(x.shape[-1] == weight.shape[1], lambda: f"{op}: x must have last dim {weight.shape[1]}, got shape {_shape(x)}")
    _check_row_ptr(op, row_ptr, indices, weight.shape[0])
    _check_csc(op, csc_ptr, csc_idx, csc_perm, indices, weight.shape[1])
    gx = x.new_empty(x.shape) if output_mask[0] else x.new_empty((0,))
    gv = values.new_empty(values.shape) if output_mask[1] else values.new_empty((0,))
    gb = weight.new_empty((weight.shape[0],)) if output_mask[2] else weight.new_empty((0,))
    return gx, gv, gb


@torch.library.register_fake("peftcore::sparse_delta_spmm")
def _(x, indices, values, out_features, scale=1.0, row_ptr=None):
    op = "sparse_delta_spmm"
    _check_activation(op, "x", x)
    _check_delta(op, indices, values, x)
    _check_sizes(op, out_features, x.shape[-1])
    _check_row_ptr(op, row_ptr, indices, out_features)
    return x.new_empty(with_last(x, out_features))


@torch.library.register_fake("peftcore::sparse_delta_spmm_t")
def _(grad, indices, values, in_features, scale=1.0, csc_ptr=None, csc_idx=None, csc_perm=None):
    op = "sparse_delta_spmm_t"
    _check_activation(op, "grad", grad)
    _check_delta(op, indices, values, grad)
    _check_sizes(op, grad.shape[-1], in_features)
    _check_csc(op, csc_ptr, csc_idx, csc_perm, indices, in_features)
    return grad.new_empty(with_last(grad, in_features))


def _sddmm_dtype(grad, out_dtype):
    if out_dtype is not None:
        return out_dtype
    return torch.float64 if grad.dtype == torch.float64 else torch.float32


@torch.library.register_fake("peftcore::sparse_delta_sddmm")
def _(grad, x, indices, scale=1.0, out_dtype=None, row_ptr=None):
    op = "sparse_delta_sddmm"
    _check_float(op, "grad", grad)
    _check_float(op, "x", x)
    _check_indices(op, indices, grad)
    torch._check(out_dtype is None or out_dtype in _FLOATS,
                 lambda: f"{op}: out_dtype must be float32, float16, bfloat16 or float64, got {_dt(out_dtype)}")
    _check_token_pair(op, "grad", grad, "x", x)
    _check_row_ptr(op, row_ptr, indices, grad.shape[-1])
    return grad.new_empty((indices.shape[0],), dtype=_sddmm_dtype(grad, out_dtype))


def _check_merge(op, weight, indices, values, contiguous=False):
    _check_float(op, "weight", weight)
    torch._check(weight.dim() == 2, lambda: f"{op}: weight must be 2-D, got shape {_shape(weight)}")
    if contiguous:
        torch._check(weight.is_contiguous(), lambda: f"{op}: weight must be contiguous, got strides {list(weight.stride())}")
    _check_delta(op, indices, values, weight)


@torch.library.register_fake("peftcore::sparse_delta_merge_")
def _(weight, indices, values, scale=1.0):
    _check_merge("sparse_delta_merge_", weight, indices, values, contiguous=True)
    return None


@torch.library.register_fake("peftcore::sparse_delta_merge")
def _(weight, indices, values, scale=1.0):
    _check_merge("sparse_delta_merge", weight, indices, values)
    return torch.empty_like(weight, memory_format=torch.contiguous_format)


@torch.library.register_fake("peftcore::sparse_delta_topk_grad")
def _(grad, x, k, exclude=None):
    op = "sparse_delta_topk_grad"
    _check_float(op, "grad", grad)
    _check_float(op, "x", x)
    _check_token_pair(op, "grad", grad, "x", x)
    n_excl = 0
    if exclude is not None:
        _check_indices(op, exclude, grad, "exclude")
        n_excl = exclude.shape[0]
    avail = grad.shape[-1] * x.shape[-1] - n_excl
    torch._check(k >= 0 and k <= avail, lambda: f"{op}: k must be in [0, {avail}] ({grad.shape[-1]}*{x.shape[-1]} "
                                               f"positions, {n_excl} excluded), got {k}")
    return grad.new_empty((k,), dtype=torch.int64), grad.new_empty((k,), dtype=torch.float32)


@torch.library.register_fake("peftcore::sparse_delta_validate")
def _(indices, out_features, in_features):
    op = "sparse_delta_validate"
    torch._check(indices.dtype in (torch.int32, torch.int64),
                 lambda: f"{op}: indices must be int32 or int64, got {_dt(indices.dtype)}")
    torch._check(indices.dim() == 1, lambda: f"{op}: indices must be 1-D, got shape {_shape(indices)}")
    _check_sizes(op, out_features, in_features)
    return None


@torch.library.register_fake("peftcore::sparse_delta_csr")
def _(indices, out_features, in_features):
    op = "sparse_delta_csr"
    torch._check(indices.dtype in (torch.int32, torch.int64),
                 lambda: f"{op}: indices must be int32 or int64, got {_dt(indices.dtype)}")
    torch._check(indices.dim() == 1, lambda: f"{op}: indices must be 1-D, got shape {_shape(indices)}")
    _check_sizes(op, out_features, in_features)
    n = indices.shape[0]
    new = lambda *shape: indices.new_empty(shape, dtype=torch.int64)  # noqa: E731
    return new(out_features + 1), new(in_features + 1), new(n), new(n)


# ---------------------------------------------------------------------------------------------------------------
# Autograd. Every backward calls peftcore ops, so it traces under torch.compile too.


def _linear_setup(ctx, inputs, output):
    x, weight, bias, indices, values, scale = inputs[:6]
    csr = tuple(inputs[6:10]) + (None,) * (10 - len(inputs))
    ctx.has_csr = tuple(t is not None for t in csr)
    ctx.save_for_backward(x, weight, indices, values, *(t for t in csr if t is not None))
    ctx.scale = scale


def _unpack_csr(ctx, saved):
    it = iter(saved)
    return [next(it) if has else None for has in ctx.has_csr]


def _linear_backward(ctx, grad):
    x, weight, indices, values, *rest = ctx.saved_tensors
    csr = _unpack_csr(ctx, rest)
    need_x, need_w, need_b, _, need_v = ctx.needs_input_grad[:5]
    gx, gv, gb = _lib.sparse_delta_linear_backward(grad, x, weight, indices, values, ctx.scale,
                                                   [need_x, need_v, need_b], *csr)
    gw = None
    if need_w:  # documented: a frozen W never gets here
        gw = grad.reshape(-1, grad.shape[-1]).t().mm(x.reshape(-1, x.shape[-1]))
    return (gx if need_x else None, gw, gb if need_b else None, None, gv if need_v else None, None,
            None, None, None, None)


register_autograd("peftcore::sparse_delta_linear", _linear_backward, setup_context=_linear_setup)


def _spmm_setup(ctx, inputs, output):
    x, indices, values, out_features, scale = inputs[:5]
    row_ptr = inputs[5] if len(inputs) > 5 else None
    ctx.has_csr = (row_ptr is not None,)
    ctx.save_for_backward(x, indices, values, *((row_ptr,) if row_ptr is not None else ()))
    ctx.scale = scale


def _spmm_backward(ctx, grad):
    x, indices, values, *rest = ctx.saved_tensors
    (row_ptr,) = _unpack_csr(ctx, rest)
    gx = gv = None
    if ctx.needs_input_grad[0]:
        gx = _lib.sparse_delta_spmm_t(grad, indices, values, x.shape[-1], ctx.scale)
    if ctx.needs_input_grad[2]:
        gv = _lib.sparse_delta_sddmm(grad, x, indices, ctx.scale, values.dtype, row_ptr)
    return gx, None, gv, None, None, None


register_autograd("peftcore::sparse_delta_spmm", _spmm_backward, setup_context=_spmm_setup)


def _spmm_t_setup(ctx, inputs, output):
    grad, indices, values, in_features, scale = inputs[:5]
    ctx.save_for_backward(grad, indices, values)
    ctx.scale = scale


def _spmm_t_backward(ctx, gy):
    g, indices, values = ctx.saved_tensors
    gg = gv = None
    if ctx.needs_input_grad[0]:
        gg = _lib.sparse_delta_spmm(gy, indices, values, g.shape[-1], ctx.scale)
    if ctx.needs_input_grad[2]:
        gv = _lib.sparse_delta_sddmm(g, gy, indices, ctx.scale, values.dtype)
    return gg, None, gv, None, None, None, None, None


register_autograd("peftcore::sparse_delta_spmm_t", _spmm_t_backward, setup_context=_spmm_t_setup)


def _sddmm_setup(ctx, inputs, output):
    grad, x, indices, scale, out_dtype = inputs[:5]
    row_ptr = inputs[5] if len(inputs) > 5 else None
    ctx.has_csr = (row_ptr is not None,)
    ctx.save_for_backward(grad, x, indices, *((row_ptr,) if row_ptr is not None else ()))
    ctx.scale = scale


def _sddmm_backward(ctx, w):
    g, x, indices, *rest = ctx.saved_tensors
    (row_ptr,) = _unpack_csr(ctx, rest)
    # values must be float32 or the activations' dtype
    w = w if w.dtype in (torch.float32, x.dtype) else w.to(torch.float32)
    gg = gx = None
    if ctx.needs_input_grad[0]:
        gg = _lib.sparse_delta_spmm(x, indices, w, g.shape[-1], ctx.scale, row_ptr)
    if ctx.needs_input_grad[1]:
        gx = _lib.sparse_delta_spmm_t(g, indices, w, x.shape[-1], ctx.scale)
    return gg, gx, None, None, None, None


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
        # the forward validated the indices on CPU; on CUDA (unvalidated) an out-of-range entry gets 0, never a read
        # outside grad (take would raise a device-side assert)
        flat, idx = grad.reshape(-1), indices.long()
        ok = (idx >= 0) & (idx < flat.numel())
        picked = flat.take(idx.clamp(0, flat.numel() - 1)) if flat.numel() else flat.new_zeros(idx.shape)
        gv = torch.where(ok, picked, 0) * ctx.scale
        gv = gv.to(ctx.values_dtype)
    return (grad if ctx.needs_input_grad[0] else None), None, gv, None


register_autograd("peftcore::sparse_delta_merge", _merge_backward, setup_context=_merge_setup)


# The fused backward of sparse_delta_linear has no derivative of its own: create_graph=True through
# sparse_delta_linear gives first derivatives, and differentiating those again raises naming the op. (spmm, spmm_t,
# sddmm and merge have double backward: their backwards are each other / plain torch.)
refuse_double_backward("sparse_delta_linear_backward", "sparse_delta_linear")
non_differentiable("sparse_delta_topk_grad", "its outputs are positions and scores for choosing a delta's support")
non_differentiable("sparse_delta_csr", "its outputs are integer index structures")
