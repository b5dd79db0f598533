"""A BOFT linear layer whose forward equals HF PEFT's ``peft.tuners.boft.layer.Linear`` (unmerged), its
multiplicative block dropout (``boft_dropout``) included.

PEFT computes ``M = M_{m-1} ... M_0``, ``M_i = P_i B_i P_i^T`` (``B_i = block_diag(cayley(boft_R[i]))``),
``y = base(x @ M)``, then rescales the output channels by ``boft_s`` around the bias:
``y = (x @ M) W^T * s + bias``. Here ``x @ M`` is :func:`~peftcore.ops.orthogonal.boft_apply` on the Cayley
blocks from :func:`~peftcore.ops.orthogonal.orthogonal_cayley` (in the parameters' dtype, float32 for half types),
so no ``d x d`` buffer exists.

Merge: ``W <- diag(s) W M^T``; the rows of ``W`` go through the chain of transposed factors in reverse order
(``M^T = M_0^T ... M_{m-1}^T``, each ``P_i B_i^T P_i^T``), again without a ``d x d`` matrix. Unmerge applies
``(M^{-1})^T`` (factors ``P_i B_i^{-T} P_i^T``) and divides by ``s``. Both run in the promoted dtype of ``W`` and
the parameters (float32 for half types), so float64 round-trips to ~1e-15.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.orthogonal import boft_apply, boft_permutations, orthogonal_cayley
from .._layer import FrozenLinearAdapter, compute_dtype, keep_modes
from .config import BOFTConfig


class BOFTBlockDropout(nn.Module):
    """PEFT's BOFT ``MultiplicativeDropoutLayer`` on the rotation blocks ``[m, nb, b, b]``, in training only: one
    butterfly factor, drawn uniformly, gets ``int(p * nb)`` of its blocks, drawn without replacement, replaced by
    the identity (``(1 - mask) R + mask I``, so those blocks get no gradient). The random draws are PEFT's own
    (``torch.randint`` then ``torch.randperm``, default CPU generator), so under one seed both drop the same
    blocks."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 < p <= 1.0:
            raise ValueError(f"BOFTBlockDropout: p must be in (0, 1], got {p}")
        self.p = p

    def forward(self, R: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return R
        m, nb, b, _ = R.shape
        factor = int(torch.randint(0, m, (1,)).item())
        k = int(self.p * nb)
        mask = torch.cat([torch.ones(k, device=R.device), torch.zeros(nb - k, device=R.device)])
        full = torch.zeros(m, nb, 1, 1, device=R.device)
        full[factor] = mask[torch.randperm(nb)].view(nb, 1, 1)
        return (1 - full) * R + full * torch.eye(b, device=R.device)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class BOFTLinear(FrozenLinearAdapter):
    """``base`` (frozen ``nn.Linear``) with trainable ``boft_R [m, nb, b, b]`` and ``boft_s [out, 1]``;
    ``dropout`` is PEFT's ``boft_dropout`` (:class:`BOFTBlockDropout`)."""

    def __init__(self, base_layer: nn.Linear, boft_R: torch.Tensor, boft_s: torch.Tensor, perm: torch.Tensor,
                 dropout: float = 0.0):
        super().__init__(base_layer)
        m, nb, b, b2 = boft_R.shape
        if b != b2 or nb * b != base_layer.in_features or tuple(perm.shape) != (m, base_layer.in_features):
            raise ValueError(f"BOFTLinear: boft_R {tuple(boft_R.shape)} / perm {tuple(perm.shape)} do not fit "
                             f"in_features={base_layer.in_features}")
        if tuple(boft_s.shape) != (base_layer.out_features, 1):
            raise ValueError(f"BOFTLinear: boft_s must be [{base_layer.out_features}, 1], got {tuple(boft_s.shape)}")
        self.boft_R = boft_R if isinstance(boft_R, nn.Parameter) else nn.Parameter(boft_R)
        self.boft_s = boft_s if isinstance(boft_s, nn.Parameter) else nn.Parameter(boft_s)
        self.register_buffer("perm", perm.to(device=boft_R.device, dtype=torch.long), persistent=False)
        self.dropout = BOFTBlockDropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def from_peft(cls, layer, adapter: str = "default") -> "BOFTLinear":
        """Share the parameters of a PEFT BOFT ``Linear`` (``layer.boft_R[adapter]``, ``layer.boft_s[adapter]``) and
        take its butterfly permutations from ``layer.boft_P`` (each a permutation matrix: read as indices), its
        ``boft_dropout`` and its train / eval mode."""
        R = layer.boft_R[adapter]
        perm = layer.boft_P.argmax(dim=-1)  # boft_P[i][j, perm[i, j]] = 1
        drop = layer.boft_dropout[adapter]
        p = float(getattr(drop, "p", 0.0))
        ours = cls(layer.get_base_layer(), R, layer.boft_s[adapter], perm, p)
        keep_modes(ours, layer, [(ours.dropout, drop)])
        return ours

    @classmethod
    def create(cls, base: nn.Linear, config: BOFTConfig = None, *, block_size: int = None,
               n_butterfly_factor: int = 1) -> "BOFTLinear":
        """A fresh adapter (identity rotations, unit scale) with PEFT's permutations; parameters in the base
        weight's dtype, float32 for half types (PEFT's dtypes)."""
        dropout = 0.0
        if config is not None:
            block_size, n_butterfly_factor, dropout = config.block_size, config.n_butterfly_factor, config.dropout
        d = base.in_features
        if d % block_size:
            raise ValueError(f"block_size={block_size} must divide in_features={d}")
        nb = d // block_size
        if nb % (2 ** (n_butterfly_factor - 1)):
            raise ValueError(f"the block count {nb} must be divisible by 2^(n_butterfly_factor - 1) = "
                             f"{2 ** (n_butterfly_factor - 1)}")
        dev, dtype = base.weight.device, compute_dtype(base.weight)
        R = torch.zeros(n_butterfly_factor, nb, block_size, block_size, device=dev, dtype=dtype)
        s = torch.ones(base.out_features, 1, device=dev, dtype=dtype)
        layer = cls(base, R, s, boft_permutations(d, nb, block_size, n_butterfly_factor), dropout)
        return layer.train(base.training)  # the mode of the module it replaces

    def to_config(self) -> BOFTConfig:
        return BOFTConfig(block_size=self.boft_R.shape[-1], n_butterfly_factor=self.boft_R.shape[0],
                          dropout=getattr(self.dropout, "p", 0.0))

    def rotations(self, dtype: torch.dtype = None) -> torch.Tensor:
        """``[m, nb, b, b]`` Cayley blocks in ``dtype`` (default: the parameters', float32 for half types)."""
        m, nb, b, _ = self.boft_R.shape
        R = self.boft_R.to(dtype or compute_dtype(self.boft_R))
        return orthogonal_cayley(R.reshape(m * nb, b, b)).view(m, nb, b, b)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        xr = boft_apply(x, self.dropout(self.rotations()), self.perm)
        y = F.linear(xr, base.weight)
        y = y * self.boft_s.squeeze(-1)  # promoted, as PEFT's (result - bias) * scale
        if base.bias is not None:
            y = y + base.bias
        return y.to(x.dtype)

    def _transformed_weight(self, sign: float) -> torch.Tensor:
        dtype = compute_dtype(self.base_layer.weight, self.boft_R, self.boft_s)
        R = self.rotations(dtype)
        w = self.base_layer.weight.to(dtype)
        s = self.boft_s.to(dtype)  # [out, 1]
        if sign > 0:  # diag(s) W M^T: factors B_i^T, applied M_0^T first
            return boft_apply(w, R.flip(0).transpose(-1, -2).contiguous(), self.perm.flip(0).contiguous()) * s
        # W = diag(1/s) W_m (M^{-1})^T: factors B_i^{-T}, M_{m-1}^{-T} first (boft_apply's own order)
        return boft_apply(w / s, torch.linalg.inv(R).transpose(-1, -2).contiguous(), self.perm)

    @torch.no_grad()
    def add_to_weight(self, sign: float) -> None:
        w = self.base_layer.weight
        w.copy_(self._transformed_weight(sign).to(w.dtype))

    @torch.no_grad()
    def merged_weight_is_finite(self) -> bool:
        return bool(torch.isfinite(self._transformed_weight(1.0)).all())
