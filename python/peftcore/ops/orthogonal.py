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

from ._common import same_device, register_autograd

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


def _check_square(op, p, name="params"):
    torch._check(p.dim() == 3 and p.shape[1] == p.shape[2],
                 lambda: f"{op}: {name} must be [num_blocks, b, b] (square blocks), got shape {tuple(p.shape)}")


@torch.library.register_fake("peftcore::orthogonal_cayley")
def _(params):
    _check_square("orthogonal_cayley", params)
    return torch.empty_like(params, memory_format=torch.contiguous_format)


@torch.library.register_fake("peftcore::orthogonal_cayley_backward")
def _(grad, R):
    _check_square("orthogonal_cayley_backward", grad, "grad")
    same_device("orthogonal_cayley_backward", grad, R=R)
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


@torch.library.register_fake("peftcore::orthogonal_cayley_neumann")
def _(params, terms=5):
    _check_square("orthogonal_cayley_neumann", params)
    return torch.empty_like(params, memory_format=torch.contiguous_format)


@torch.library.register_fake("peftcore::orthogonal_cayley_neumann_backward")
def _(grad, params, terms):
    _check_square("orthogonal_cayley_neumann_backward", grad, "grad")
    same_device("orthogonal_cayley_neumann_backward", grad, params=params)
    return torch.empty_like(grad, memory_format=torch.contiguous_format)


@torch.library.register_fake("peftcore::orthogonal_boft_apply")
def _(x, rotations, perm):
    same_device("orthogonal_boft_apply", x, rotations=rotations, perm=perm)
    torch._check(rotations.dim() == 4, lambda: "orthogonal_boft_apply: rotations must be [m, num_blocks, b, b]")
    torch._check(rotations.shape[1] * rotations.shape[2] == x.shape[-1],
                 lambda: "orthogonal_boft_apply: rotations' num_blocks * b must equal the input's last dim")
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("peftcore::orthogonal_boft_apply_backward")
def _(grad_out, x, rotations, perm, output_mask):
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
