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

from ._common import same_device, with_last, register_autograd

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


def _check_blockdiag(op, x, blocks):
    same_device(op, x, blocks=blocks)
    torch._check(blocks.dim() == 3, lambda: f"{op}: blocks must be 3-D, got shape {tuple(blocks.shape)}")
    torch._check(blocks.dtype == x.dtype, lambda: f"{op}: blocks has dtype {blocks.dtype} but x has {x.dtype}")
    torch._check(x.shape[-1] == blocks.shape[0] * blocks.shape[2],
                 lambda: f"{op}: x must have last dim nb*bi = {blocks.shape[0] * blocks.shape[2]}, got {tuple(x.shape)}")


def _check_monarch(op, x, w1, w2):
    same_device(op, x, w1=w1, w2=w2)
    torch._check(w1.dim() == 3 and w2.dim() == 3, lambda: f"{op}: w1 and w2 must be 3-D")
    torch._check(w1.dtype == x.dtype and w2.dtype == x.dtype, lambda: f"{op}: w1, w2 and x must share a dtype")
    torch._check(w2.shape[0] * w2.shape[2] == w1.shape[0] * w1.shape[1], lambda: f"{op}: w2 must have l*r == k*q")
    torch._check(x.shape[-1] == w1.shape[0] * w1.shape[2],
                 lambda: f"{op}: x must have last dim k*p = {w1.shape[0] * w1.shape[2]}, got {tuple(x.shape)}")


@torch.library.register_fake("peftcore::blockdiag_matmul")
def _(x, blocks):
    _check_blockdiag("blockdiag_matmul", x, blocks)
    return x.new_empty(with_last(x, blocks.shape[0] * blocks.shape[1]))


@torch.library.register_fake("peftcore::blockdiag_matmul_backward")
def _(grad_out, x, blocks, output_mask):
    _check_blockdiag("blockdiag_matmul_backward", x, blocks)
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
    _check_monarch("monarch_matmul_backward", x, w1, w2)
    if h is not None:
        torch._check(h.shape[-1] == w1.shape[0] * w1.shape[1],
                     lambda: f"monarch_matmul_backward: h must have last dim l*r, got {tuple(h.shape)}")
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
