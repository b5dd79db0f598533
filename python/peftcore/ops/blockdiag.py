"""blockdiag: block-diagonal and Monarch matmuls (the structured weights of Monarch / butterfly adapters).

* :func:`blockdiag_matmul` — ``blocks [nb, bo, bi]``, ``x [..., nb*bi]`` -> ``y [..., nb*bo]`` with
  ``y[..., j*bo:(j+1)*bo] = x[..., j*bi:(j+1)*bi] @ blocks[j]^T``.
* :func:`monarch_matmul` — the function of HazyResearch fly's ``blockdiag_butterfly_multiply(x, w1_bfly,
  w2_bfly)``, same argument shapes and output layout: ``w1 [k, q, p]``, ``w2 [l, s, r]``, ``k*p = in``,
  ``l*r = k*q``, ``out = l*s``. Stage 1 is ``blockdiag_matmul(x, w1)`` (``h [..., k*q]``); stage 2 applies block
  ``j`` of ``w2`` to the features ``h[..., j::l]`` (``r`` of them) and writes its ``s`` outputs to
  ``y[..., j::l]``.

One fused forward: the intermediate ``h`` never reaches memory. On CPU it lives in a thread-local buffer per tile
of tokens (the stride permutation folded into the buffer's indexing); on CUDA in shared memory per token tile.

Training: ``torch.ops.peftcore.monarch_matmul``'s own autograd saves only ``x`` (and the weights) and its backward
(:func:`monarch_matmul_backward`) recomputes ``h`` — the least memory, one GEMM more. The wrapper
:func:`monarch_matmul` by default (``save_intermediate=None``) takes ``monarch_matmul_with_h`` instead when a
gradient will be needed: the forward also writes ``h [..., l*r]`` in stage 2's layout (fly's intermediate
``out1 [..., l, r]``, which its two-bmm form keeps too) and the backward reads it, so a training step costs the
two-bmm form's GEMMs and no more. On CPU, blocks of up to 128x128 run tiled kernels (a register-blocked AVX2 micro-kernel,
per-thread weight-gradient accumulators); larger blocks use BLAS per tile in the forward and batched GEMMs over
all tokens in the backward (the tiled weight gradients measured slower there). On CUDA the forward is the fused
shared-memory kernel and the backward is cuBLAS batched GEMMs on permuted views.

Dtypes: float32, float16, bfloat16 with fp32 accumulation, and float64 on CPU; ``x`` and the weights share a
dtype and a device. Gradients flow to ``x`` and every weight.
"""
from __future__ import annotations

import torch

from ._common import check_float, dtype_name, refuse_double_backward, register_autograd, with_last

_lib = torch.ops.peftcore

__all__ = ["blockdiag_matmul", "blockdiag_matmul_backward", "monarch_matmul", "monarch_matmul_backward",
           "monarch_matmul_with_h"]


# ---------------------------------------------------------------------------------------------------------------
# Documented wrappers (the ops themselves are torch.ops.peftcore.<name>).


def blockdiag_matmul(x, blocks):
    """``y[..., j*bo:(j+1)*bo] = x[..., j*bi:(j+1)*bi] @ blocks[j]^T`` for ``blocks [nb, bo, bi]``,
    ``x [..., nb*bi]``; returns ``[..., nb*bo]`` (differentiable in ``x`` and ``blocks``)."""
    return _lib.blockdiag_matmul(x, blocks)


def blockdiag_matmul_backward(grad_out, x, blocks, output_mask=(True, True)):
    """``(grad_x, grad_blocks)`` of :func:`blockdiag_matmul`; outputs not in ``output_mask`` come back empty."""
    return _lib.blockdiag_matmul_backward(grad_out, x, blocks, list(output_mask))


def monarch_matmul(x, w1, w2, save_intermediate=None):
    """Monarch product ``x [..., k*p] -> [..., l*s]`` for ``w1 [k, q, p]``, ``w2 [l, s, r]`` with ``l*r == k*q``;
    exactly fly's ``blockdiag_butterfly_multiply(x, w1, w2)``, fused (differentiable in ``x``, ``w1``, ``w2``).

    ``save_intermediate``: ``True`` keeps ``h [..., l*r]`` for the backward (fastest training step), ``False``
    recomputes it there (least memory), ``None`` (default) keeps it when grad mode is on and an input requires
    grad, and otherwise runs the fused forward that never writes ``h``."""
    if save_intermediate is None:
        save_intermediate = torch.is_grad_enabled() and (x.requires_grad or w1.requires_grad or w2.requires_grad)
    if save_intermediate:
        return _lib.monarch_matmul_with_h(x, w1, w2)[0]
    return _lib.monarch_matmul(x, w1, w2)


def monarch_matmul_with_h(x, w1, w2):
    """``(y, h)``: :func:`monarch_matmul`'s output and its intermediate ``h [..., l*r]`` in stage 2's layout
    (``h[..., j*r + m]`` = stage-1 feature ``m*l + j``, in ``x``'s dtype: fly's ``out1 [..., l, r]`` flattened);
    differentiable in ``y`` only (``h`` is saved for the backward)."""
    return _lib.monarch_matmul_with_h(x, w1, w2)


def monarch_matmul_backward(grad_out, x, w1, w2, output_mask=(True, True, True), h=None):
    """``(grad_x, grad_w1, grad_w2)`` of :func:`monarch_matmul`; the intermediate is ``h`` when given (from
    :func:`monarch_matmul_with_h`), else recomputed from ``x``; outputs not in ``output_mask`` come back empty."""
    return _lib.monarch_matmul_backward(grad_out, x, w1, w2, list(output_mask), h)


# ---------------------------------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes only) for torch.compile / meta tensors.


def _check_act(op, name, x):
    check_float(op, name, x)
    torch._check(x.dim() >= 1, lambda: f"{op}: {name} must have at least 1 dim, got a scalar")


def _check_weight(op, name, w, x, x_name):
    torch._check(w.dim() == 3, lambda: f"{op}: {name} must be 3-D, got shape {list(w.shape)}")
    torch._check(w.dtype == x.dtype,
                 lambda: f"{op}: {name} has dtype {dtype_name(w.dtype)} but {x_name} has {dtype_name(x.dtype)}")
    torch._check(w.device == x.device, lambda: f"{op}: {name} is on {w.device} but {x_name} is on {x.device}")
    torch._check(w.shape[0] > 0 and w.shape[1] > 0 and w.shape[2] > 0,
                 lambda: f"{op}: {name} must have non-empty dims, got shape {list(w.shape)}")


def _check_blockdiag(op, x, blocks, x_name="x", out_side=False):
    """The kernels' check_blockdiag_args."""
    _check_act(op, x_name, x)
    _check_weight(op, "blocks", blocks, x, x_name)
    nb, bo, bi = blocks.shape
    want = nb * (bo if out_side else bi)
    torch._check(x.shape[-1] == want, lambda: f"{op}: {x_name} must have last dim {want}, got shape {list(x.shape)}")


def _check_monarch(op, x, w1, w2, x_name="x", out_side=False):
    """The kernels' check_monarch_args."""
    _check_act(op, x_name, x)
    _check_weight(op, "w1", w1, x, x_name)
    _check_weight(op, "w2", w2, x, x_name)
    k, q, p = w1.shape
    l, s, r = w2.shape
    torch._check(l * r == k * q, lambda: f"{op}: w2 [l, s, r] must have l*r == k*q; got w1 {list(w1.shape)} and w2 "
                                         f"{list(w2.shape)}")
    want = l * s if out_side else k * p
    torch._check(x.shape[-1] == want, lambda: f"{op}: {x_name} must have last dim {want}, got shape {list(x.shape)}")


def _check_grad_pair(op, grad_out, x):
    """The kernels' check_grad_pair: same dtype, device and leading (token) dims."""
    torch._check(grad_out.dtype == x.dtype,
                 lambda: f"{op}: grad_out has dtype {dtype_name(grad_out.dtype)} but x has {dtype_name(x.dtype)}")
    torch._check(grad_out.device == x.device, lambda: f"{op}: grad_out is on {grad_out.device} but x is on {x.device}")
    torch._check(grad_out.dim() == x.dim() and grad_out.shape[:-1] == x.shape[:-1],
                 lambda: f"{op}: grad_out and x must have the same leading (token) dims, got {list(grad_out.shape)} "
                         f"and {list(x.shape)}")


def _check_saved_h(op, h, x, w1):
    mid = w1.shape[0] * w1.shape[1]
    torch._check(h.dtype == x.dtype, lambda: f"{op}: h has dtype {dtype_name(h.dtype)} but x has {dtype_name(x.dtype)}")
    torch._check(h.device == x.device, lambda: f"{op}: h is on {h.device} but x is on {x.device}")
    torch._check(h.dim() == x.dim() and h.shape[-1] == mid and h.shape[:-1] == x.shape[:-1],
                 lambda: f"{op}: h must have x's leading dims and last dim l*r = k*q = {mid} (x {list(x.shape)}), "
                         f"got shape {list(h.shape)}")


@torch.library.register_fake("peftcore::blockdiag_matmul")
def _(x, blocks):
    _check_blockdiag("blockdiag_matmul", x, blocks)
    return x.new_empty(with_last(x, blocks.shape[0] * blocks.shape[1]))


@torch.library.register_fake("peftcore::blockdiag_matmul_backward")
def _(grad_out, x, blocks, output_mask):
    op = "blockdiag_matmul_backward"
    _check_blockdiag(op, x, blocks)
    _check_blockdiag(op, grad_out, blocks, "grad_out", out_side=True)
    _check_grad_pair(op, grad_out, x)
    gx = x.new_empty(x.shape) if output_mask[0] else x.new_empty((0,))
    gb = blocks.new_empty(blocks.shape) if output_mask[1] else blocks.new_empty((0,))
    return gx, gb


@torch.library.register_fake("peftcore::monarch_matmul")
def _(x, w1, w2):
    _check_monarch("monarch_matmul", x, w1, w2)
    return x.new_empty(with_last(x, w2.shape[0] * w2.shape[1]))


@torch.library.register_fake("peftcore::monarch_matmul_with_h")
def _(x, w1, w2):
    _check_monarch("monarch_matmul_with_h", x, w1, w2)
    return x.new_empty(with_last(x, w2.shape[0] * w2.shape[1])), x.new_empty(with_last(x, w1.shape[0] * w1.shape[1]))


@torch.library.register_fake("peftcore::monarch_matmul_backward")
def _(grad_out, x, w1, w2, output_mask, h=None):
    op = "monarch_matmul_backward"
    _check_monarch(op, x, w1, w2)
    _check_monarch(op, grad_out, w1, w2, "grad_out", out_side=True)
    _check_grad_pair(op, grad_out, x)
    if h is not None:
        _check_saved_h(op, h, x, w1)
    gx = x.new_empty(x.shape) if output_mask[0] else x.new_empty((0,))
    g1 = w1.new_empty(w1.shape) if output_mask[1] else w1.new_empty((0,))
    g2 = w2.new_empty(w2.shape) if output_mask[2] else w2.new_empty((0,))
    return gx, g1, g2


# ---------------------------------------------------------------------------------------------------------------
# Autograd. Every backward calls peftcore ops, so it traces under torch.compile too. Only x and the weights are
# saved: the Monarch intermediate is recomputed in the backward.


def _blockdiag_setup(ctx, inputs, output):
    x, blocks = inputs
    ctx.save_for_backward(x, blocks)


def _blockdiag_backward(ctx, grad):
    x, blocks = ctx.saved_tensors
    need_x, need_b = ctx.needs_input_grad[:2]
    gx, gb = _lib.blockdiag_matmul_backward(grad.contiguous(), x, blocks, [need_x, need_b])
    return (gx if need_x else None, gb if need_b else None)


register_autograd("peftcore::blockdiag_matmul", _blockdiag_backward, setup_context=_blockdiag_setup)


def _monarch_setup(ctx, inputs, output):
    x, w1, w2 = inputs
    ctx.save_for_backward(x, w1, w2)


def _monarch_backward(ctx, grad):
    x, w1, w2 = ctx.saved_tensors
    need = list(ctx.needs_input_grad[:3])
    gx, g1, g2 = _lib.monarch_matmul_backward(grad.contiguous(), x, w1, w2, need)
    return (gx if need[0] else None, g1 if need[1] else None, g2 if need[2] else None)


register_autograd("peftcore::monarch_matmul", _monarch_backward, setup_context=_monarch_setup)


def _monarch_h_setup(ctx, inputs, output):
    x, w1, w2 = inputs
    ctx.save_for_backward(x, w1, w2, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)  # no zero-filled [T, l*r] gradient for h


def _monarch_h_backward(ctx, grad, grad_h):
    x, w1, w2, h = ctx.saved_tensors
    if grad is None:
        return None, None, None
    need = list(ctx.needs_input_grad[:3])
    gx, g1, g2 = _lib.monarch_matmul_backward(grad.contiguous(), x, w1, w2, need, h)
    return (gx if need[0] else None, g1 if need[1] else None, g2 if need[2] else None)


register_autograd("peftcore::monarch_matmul_with_h", _monarch_h_backward, setup_context=_monarch_h_setup)

# The backward ops have no derivative of their own: differentiating them (create_graph=True, then a second backward)
# raises an error naming the op instead of PyTorch's warn-only fallback.
refuse_double_backward("blockdiag_matmul_backward", "blockdiag_matmul")
refuse_double_backward("monarch_matmul_backward", "monarch_matmul")
