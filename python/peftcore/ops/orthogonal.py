"""orthogonal: OFT / BOFT — orthogonal blocks from free parameters and the butterfly (BOFT) chain.

Orthogonal blocks. ``params [nb, b, b]`` are free; ``S = (A - A^T) / 2`` is their skew part (BOFT's
``cayley_batch`` does exactly this; OFT stores the strict upper triangle ``U`` as a vector and uses
``S = U - U^T``, which is a skew ``A`` passed as is — see :mod:`peftcore.tuners.oft`).

* :func:`orthogonal_cayley` — ``R = (I - S)(I + S)^{-1}``, PEFT's ``torch.linalg.solve(I + S, I - S, left=False)``
  (BOFT, and OFT with ``use_cayley_neumann=False``);
* :func:`orthogonal_cayley_neumann` — PEFT OFT's truncated series (default ``num_cayley_neumann_terms=5``):
  ``terms <= 1``: ``I``; ``2``: ``I + 2S``; else ``I + 2S + 2S^2 + ... + 2S^(n-2) + S^(n-1)`` with the top power
  ``max(3, terms - 1)`` (so 3 and 4 terms agree, as in PEFT). Note it approximates ``(I + S)(I - S)^{-1}``, the
  *transpose* of the exact branch: PEFT's two OFT branches differ in sign and peftcore matches each.

Both run per block in fp32 (fp64 for double) with one CPU thread range per group of blocks; their backward
passes are ops of their own (Cayley's needs only ``R``: ``I + R = 2 (I + S)^{-1}``).

Butterfly chain. :func:`boft_apply` computes ``x @ (P_{m-1} B_{m-1} P_{m-1}^T) ... (P_1 B_1 P_1^T)(P_0 B_0 P_0^T)``
(PEFT's order: its loop builds ``M = M_i @ M``, so the last factor acts on ``x`` first)
for ``rotations [m, nb, b, b]`` (``B_i = block_diag(rotations[i])``) and ``perm [m, d]`` (``P_i`` has ones at
``(j, perm[i, j])``, PEFT's ``perm2mat``), i.e. what PEFT's BOFT layer feeds its base layer, as index gathers and
one batched small-block GEMM per factor — never a ``d x d`` matrix. Its backward recomputes the chain from ``x``
(autograd saves only ``x``).
"""
from __future__ import annotations

import torch

from ._common import check_float, dtype_name, refuse_double_backward, register_autograd

_lib = torch.ops.peftcore

__all__ = [
    "orthogonal_cayley",
    "orthogonal_cayley_neumann",
    "boft_apply",
    "orthogonal_boft_apply",
    "boft_permutations",
]


# ---------------------------------------------------------------------------------------------------------------
# Documented wrappers (the ops themselves are torch.ops.peftcore.<name>).


def orthogonal_cayley(params):
    """``R = (I - S)(I + S)^{-1}`` per block, ``S = (A - A^T)/2`` for ``params A [nb, b, b]`` (differentiable)."""
    return _lib.orthogonal_cayley(params)


def orthogonal_cayley_neumann(params, terms: int = 5):
    """PEFT OFT's truncated Neumann Cayley: ``I + 2S + ... + 2S^(terms-2) + S^(terms-1)`` (differentiable)."""
    return _lib.orthogonal_cayley_neumann(params, int(terms))


def orthogonal_boft_apply(x, rotations, perm):
    """The BOFT chain ``x @ M_{m-1} ... M_0``, ``M_i = P_i blockdiag(rotations[i]) P_i^T``, for ``x [..., d]``, ``rotations
    [m, nb, b, b]`` (float32 or ``x``'s dtype; cast to ``x``'s dtype as PEFT does), ``perm [m, d]`` int64 rows of
    PEFT's butterfly permutations (:func:`boft_permutations`). Gradients flow to ``x`` and ``rotations``.
    With ``m = 1`` and ``perm = arange(d)`` it is OFT's block-diagonal rotation ``x_blocks @ R``."""
    return _lib.orthogonal_boft_apply(x, rotations, perm)


boft_apply = orthogonal_boft_apply


def _block_butterfly_perm(n, b, r, n_butterfly_factor):
    # PEFT BOFTLayer.block_butterfly_perm, re-derived: within each group of n // b features, the r-wide chunks are
    # reordered even chunks first, then odd ones.
    if n_butterfly_factor == 0:
        return torch.arange(n)
    if b * r * 2 > n:
        raise ValueError("Invalid number of blocks!")
    group = n // b
    chunks = group // r
    order = list(range(0, chunks, 2)) + list(range(1, chunks, 2))
    within = torch.cat([torch.arange(c * r, c * r + r) for c in order])
    return torch.cat([g + within for g in range(0, n, group)])


def boft_permutations(in_features: int, block_num: int, block_size: int, n_butterfly_factor: int):
    """``[m, in_features]`` int64: PEFT's butterfly permutations (``boft_P[i] = perm2mat(perm[i])``) for
    ``m = n_butterfly_factor`` factors (the user-facing value, PEFT subtracts one internally)."""
    f = n_butterfly_factor - 1
    return torch.stack([_block_butterfly_perm(in_features, block_num // (2 ** i), block_size // 2, f)
                        for i in range(f + 1)])


# ---------------------------------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes only) for torch.compile / meta tensors.


def _check_device(op, name, t, ref, ref_name):
    torch._check(t.device == ref.device, lambda: f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_square(op, p, name="params"):
    check_float(op, name, p)
    torch._check(p.dim() == 3 and p.shape[1] == p.shape[2],
                 lambda: f"{op}: {name} must be [num_blocks, b, b] (square blocks), got shape {list(p.shape)}")


def _check_pair(op, grad, other, other_name):
    """The backward ops' (grad, R / params) pair: both square blocks of one shape, dtype and device."""
    _check_square(op, grad, "grad")
    _check_square(op, other, other_name)
    _check_device(op, other_name, other, grad, "grad")
    torch._check(other.dtype == grad.dtype, lambda: f"{op}: {other_name} has dtype {dtype_name(other.dtype)} but "
                                                    f"grad has {dtype_name(grad.dtype)}")
    torch._check(other.shape == grad.shape, lambda: f"{op}: {other_name} must have grad's shape {list(grad.shape)}, "
                                                    f"got {list(other.shape)}")


def _check_terms(op, terms):
    torch._check(0 <= terms <= 64, lambda: f"{op}: terms must be in [0, 64], got {terms}")


def _check_boft(op, x, rotations, perm, grad_out=None):
    """The shapes / dtypes / devices part of the kernels' check_boft_args (perm's values are checked by the CPU
    kernels only)."""
    check_float(op, "x", x)
    torch._check(x.dim() >= 1, lambda: f"{op}: x must have at least 1 dim, got a scalar")
    check_float(op, "rotations", rotations)
    _check_device(op, "rotations", rotations, x, "x")
    torch._check(rotations.dim() == 4 and rotations.shape[2] == rotations.shape[3],
                 lambda: f"{op}: rotations must be [m, num_blocks, b, b] (square blocks), got shape "
                         f"{list(rotations.shape)}")
    torch._check(rotations.dtype in (torch.float32, x.dtype),
                 lambda: f"{op}: rotations must be float32 or the input's dtype ({dtype_name(x.dtype)}), got "
                         f"{dtype_name(rotations.dtype)}")
    m, nb, b = rotations.shape[:3]
    d = x.shape[-1]
    torch._check(nb * b == d, lambda: f"{op}: rotations' num_blocks * b ({nb} * {b} = {nb * b}) must equal the "
                                      f"input's last dim {d}")
    torch._check(perm.dtype == torch.int64, lambda: f"{op}: perm must be int64, got {dtype_name(perm.dtype)}")
    _check_device(op, "perm", perm, x, "x")
    torch._check(perm.dim() == 2 and perm.shape[0] == m and perm.shape[1] == d,
                 lambda: f"{op}: perm must be [m, d] = [{m}, {d}], got shape {list(perm.shape)}")
    if grad_out is not None:
        check_float(op, "grad_out", grad_out)
        _check_device(op, "grad_out", grad_out, x, "x")
        torch._check(grad_out.dtype == x.dtype,
                     lambda: f"{op}: grad_out has dtype {dtype_name(grad_out.dtype)} but x has {dtype_name(x.dtype)}")
        torch._check(grad_out.shape == x.shape,
                     lambda: f"{op}: grad_out must have x's shape {list(x.shape)}, got {list(grad_out.shape)}")


@torch.library.register_fake("peftcore::orthogonal_cayley")
def _(params):
    _check_square("orthogonal_cayley", params)
    return torch.empty_like(params, memory_format=torch.contiguous_format)


@torch.library.register_fake("peftcore::orthogonal_cayley_backward")
def _(grad, R):
    _check_pair("orthogonal_cayley_backward", grad, R, "R")
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


@torch.library.register_fake("peftcore::orthogonal_cayley_neumann")
def _(params, terms=5):
    _check_square("orthogonal_cayley_neumann", params)
    _check_terms("orthogonal_cayley_neumann", terms)
    return torch.empty_like(params, memory_format=torch.contiguous_format)


@torch.library.register_fake("peftcore::orthogonal_cayley_neumann_backward")
def _(grad, params, terms):
    _check_pair("orthogonal_cayley_neumann_backward", grad, params, "params")
    _check_terms("orthogonal_cayley_neumann_backward", terms)
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


@torch.library.register_fake("peftcore::orthogonal_boft_apply")
def _(x, rotations, perm):
    _check_boft("orthogonal_boft_apply", x, rotations, perm)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("peftcore::orthogonal_boft_apply_backward")
def _(grad_out, x, rotations, perm, output_mask):
    _check_boft("orthogonal_boft_apply_backward", x, rotations, perm, grad_out)
    gx = torch.empty_like(x, memory_format=torch.contiguous_format) if output_mask[0] else x.new_empty((0,))
    gr = (torch.empty_like(rotations, memory_format=torch.contiguous_format) if output_mask[1]
          else rotations.new_empty((0,)))
    return gx, gr


# ---------------------------------------------------------------------------------------------------------------
# Autograd. Every backward calls peftcore ops, so it traces under torch.compile too.


def _cayley_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _cayley_backward(ctx, grad):
    (R,) = ctx.saved_tensors
    return _lib.orthogonal_cayley_backward(grad.contiguous(), R)


register_autograd("peftcore::orthogonal_cayley", _cayley_backward, setup_context=_cayley_setup)


def _neumann_setup(ctx, inputs, output):
    params, terms = inputs
    ctx.terms = terms
    ctx.save_for_backward(params)


def _neumann_backward(ctx, grad):
    (params,) = ctx.saved_tensors
    return _lib.orthogonal_cayley_neumann_backward(grad.contiguous(), params, ctx.terms), None


register_autograd("peftcore::orthogonal_cayley_neumann", _neumann_backward, setup_context=_neumann_setup)


def _boft_setup(ctx, inputs, output):
    x, rotations, perm = inputs
    ctx.save_for_backward(x, rotations, perm)


def _boft_backward(ctx, grad):
    x, rotations, perm = ctx.saved_tensors
    need_x, need_r = ctx.needs_input_grad[:2]
    gx, gr = _lib.orthogonal_boft_apply_backward(grad.contiguous(), x, rotations, perm, [need_x, need_r])
    return (gx if need_x else None, gr if need_r else None, None)


register_autograd("peftcore::orthogonal_boft_apply", _boft_backward, setup_context=_boft_setup)

# The backward ops have no derivative of their own: differentiating them (create_graph=True, then a second backward)
# raises an error naming the op instead of PyTorch's warn-only fallback.
refuse_double_backward("orthogonal_cayley_backward", "orthogonal_cayley")
refuse_double_backward("orthogonal_cayley_neumann_backward", "orthogonal_cayley_neumann")
refuse_double_backward("orthogonal_boft_apply_backward", "orthogonal_boft_apply")
