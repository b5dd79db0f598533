"""A BOFT linear layer whose forward equals HF PEFT's ``peft.tuners.boft.layer.Linear`` (unmerged, no dropout).

PEFT computes ``M = M_{m-1} ... M_0``, ``M_i = P_i B_i P_i^T`` (``B_i = block_diag(cayley(boft_R[i]))``),
``y = base(x @ M)``, then rescales the output channels by ``boft_s`` around the bias:
``y = (x @ M) W^T * s + bias``. Here ``x @ M`` is :func:`~peftcore.ops.orthogonal.boft_apply` on the Cayley
blocks from :func:`~peftcore.ops.orthogonal.orthogonal_cayley` (fp32, like PEFT), so no ``d x d`` buffer exists.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.orthogonal import boft_apply, boft_permutations, orthogonal_cayley


class BOFTLinear(nn.Module):
    """``base`` (frozen ``nn.Linear``) with trainable ``boft_R [m, nb, b, b]`` and ``boft_s [out, 1]``."""

    def __init__(self, base: nn.Linear, boft_R: nn.Parameter, boft_s: nn.Parameter, perm: torch.Tensor):
        super().__init__()
        self.base = base
        self.boft_R = boft_R
        self.boft_s = boft_s
        self.register_buffer("perm", perm.to(device=boft_R.device, dtype=torch.long), persistent=False)

    @classmethod
    def from_peft(cls, layer, adapter: str = "default") -> "BOFTLinear":
        """Share the parameters of a PEFT BOFT ``Linear`` (``layer.boft_R[adapter]``, ``layer.boft_s[adapter]``) and
        take its butterfly permutations from ``layer.boft_P`` (each a permutation matrix: read as indices)."""
        R = layer.boft_R[adapter]
        perm = layer.boft_P.argmax(dim=-1)  # boft_P[i][j, perm[i, j]] = 1
        return cls(layer.get_base_layer(), R, layer.boft_s[adapter], perm)

    @classmethod
    def create(cls, base: nn.Linear, block_size: int, n_butterfly_factor: int = 1) -> "BOFTLinear":
        """A fresh adapter (identity rotations, unit scale) with PEFT's permutations for ``block_size``."""
        d = base.in_features
        nb = d // block_size
        R = nn.Parameter(torch.zeros(n_butterfly_factor, nb, block_size, block_size, device=base.weight.device))
        s = nn.Parameter(torch.ones(base.out_features, 1, device=base.weight.device))
        return cls(base, R, s, boft_permutations(d, nb, block_size, n_butterfly_factor))

    def rotations(self) -> torch.Tensor:
        m, nb, b, _ = self.boft_R.shape
        return orthogonal_cayley(self.boft_R.float().reshape(m * nb, b, b)).view(m, nb, b, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xr = boft_apply(x, self.rotations(), self.perm)
        y = F.linear(xr, self.base.weight)
        y = y * self.boft_s.squeeze(-1).to(y.dtype)
        if self.base.bias is not None:
            y = y + self.base.bias
        return y.to(x.dtype)
