"""An OFT linear layer whose forward equals HF PEFT's ``peft.tuners.oft.layer.Linear`` (unmerged, no dropout,
no COFT projection).

PEFT stores per block the strict upper triangle ``U`` (``weight [r, b(b-1)/2]``, ``torch.triu_indices(b, b, 1)``
order) and uses ``Q = U - U^T``; the rotation is ``solve(I + Q, I - Q, left=False)`` or, by default, its
Neumann series (:func:`~peftcore.ops.orthogonal.orthogonal_cayley_neumann`). The input, cast to the adapter's
dtype, is rotated per block, ``x_blocks @ R``, then cast back and fed to the base layer. Here ``A = U - U^T`` is
already skew, so ``(A - A^T)/2 = Q`` and the ops reproduce PEFT's formulas exactly.
"""
from __future__ import annotations

import torch
from torch import nn

from ...ops.orthogonal import boft_apply, orthogonal_cayley, orthogonal_cayley_neumann


class OFTLinear(nn.Module):
    """``base`` (frozen) rotated on its input by OFT blocks built from ``weight [r or 1, b(b-1)/2]``."""

    def __init__(self, base: nn.Linear, weight: nn.Parameter, block_size: int, use_cayley_neumann: bool = True,
                 num_cayley_neumann_terms: int = 5, block_share: bool = False):
        super().__init__()
        self.base = base
        self.weight = weight
        self.block_size = block_size
        self.use_cayley_neumann = use_cayley_neumann
        self.terms = num_cayley_neumann_terms
        self.block_share = block_share
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        self.register_buffer("rows", rows.to(weight.device), persistent=False)
        self.register_buffer("cols", cols.to(weight.device), persistent=False)
        self.register_buffer("perm", torch.arange(base.in_features, device=weight.device)[None], persistent=False)

    @classmethod
    def from_peft(cls, layer, adapter: str = "default") -> "OFTLinear":
        """Share the parameters of a PEFT OFT ``Linear`` (``layer.oft_R[adapter]``, an ``OFTRotationModule``)."""
        mod = layer.oft_R[adapter]
        if mod.coft:
            raise NotImplementedError("OFTLinear.from_peft: COFT (coft=True) projection is not supported")
        return cls(layer.get_base_layer(), mod.weight, mod.block_size, mod.use_cayley_neumann,
                   mod.num_cayley_neumann_terms, mod.block_share)

    def rotations(self) -> torch.Tensor:
        r, b = self.weight.shape[0], self.block_size
        U = self.weight.new_zeros(r, b, b)
        U[:, self.rows, self.cols] = self.weight
        A = U - U.transpose(-2, -1)
        R = orthogonal_cayley_neumann(A, self.terms) if self.use_cayley_neumann else orthogonal_cayley(A)
        if self.block_share:
            R = R.expand(self.base.in_features // b, b, b)
        return R

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xr = boft_apply(x.to(self.weight.dtype), self.rotations()[None], self.perm)
        return self.base(xr.to(dtype)).to(dtype)
