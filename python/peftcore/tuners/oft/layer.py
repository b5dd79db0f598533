"""An OFT linear layer whose forward equals HF PEFT's ``peft.tuners.oft.layer.Linear`` (unmerged; no COFT
projection: ``from_peft`` refuses ``coft=True``). PEFT's ``module_dropout`` builds a dropout module that its
``Linear.forward`` never calls, so it has no effect there, nor here.

PEFT stores per block the strict upper triangle ``U`` (``weight [r, b(b-1)/2]``, ``torch.triu_indices(b, b, 1)``
order) and uses ``Q = U - U^T``; the rotation is ``solve(I + Q, I - Q, left=False)`` or, by default, its
Neumann series (:func:`~peftcore.ops.orthogonal.orthogonal_cayley_neumann`). The input, cast to the adapter's
dtype, is rotated per block, ``x_blocks @ R``, then cast back and fed to the base layer. Here ``A = U - U^T`` is
already skew, so ``(A - A^T)/2 = Q`` and the ops reproduce PEFT's formulas exactly.

Merge: ``y = (x R) W^T + b`` so ``W <- W R^T`` (per block of columns), computed with the same op on the rows of
``W``; unmerge applies ``R^{-T}`` (exact for the non-orthogonal Neumann approximation too). Both run in the
promoted dtype of ``W`` and the parameters (float32 for half types), so float64 round-trips to ~1e-15.
"""
from __future__ import annotations

import torch
from torch import nn

from ...ops.orthogonal import boft_apply, orthogonal_cayley, orthogonal_cayley_neumann
from .._layer import FrozenLinearAdapter, compute_dtype, keep_modes
from .config import OFTConfig


class OFTLinear(FrozenLinearAdapter):
    """``base`` (frozen) on its input rotated by OFT blocks built from ``oft_params [r or 1, b(b-1)/2]``."""

    def __init__(self, base_layer: nn.Linear, oft_params: torch.Tensor, block_size: int,
                 use_cayley_neumann: bool = True, num_cayley_neumann_terms: int = 5, block_share: bool = False):
        super().__init__(base_layer)
        n = base_layer.in_features
        if n % block_size:
            raise ValueError(f"OFTLinear: block_size={block_size} must divide in_features={n}")
        want = (1 if block_share else n // block_size, block_size * (block_size - 1) // 2)
        if tuple(oft_params.shape) != want:
            raise ValueError(f"OFTLinear: oft_params must have shape {want}, got {tuple(oft_params.shape)}")
        self.oft_params = oft_params if isinstance(oft_params, nn.Parameter) else nn.Parameter(oft_params)
        self.block_size = block_size
        self.use_cayley_neumann = use_cayley_neumann
        self.terms = num_cayley_neumann_terms
        self.block_share = block_share
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        dev = oft_params.device
        self.register_buffer("rows", rows.to(dev), persistent=False)
        self.register_buffer("cols", cols.to(dev), persistent=False)
        self.register_buffer("perm", torch.arange(n, device=dev)[None], persistent=False)

    @classmethod
    def create(cls, base: nn.Linear, config: OFTConfig) -> "OFTLinear":
        """A fresh adapter at the identity (``U = 0``); parameters in the base weight's dtype, float32 for half
        types (PEFT's dtypes)."""
        b, n = config.block_size, base.in_features
        if n % b:
            raise ValueError(f"block_size={b} must divide in_features={n}")
        params = torch.zeros(1 if config.block_share else n // b, b * (b - 1) // 2, device=base.weight.device,
                             dtype=compute_dtype(base.weight))
        layer = cls(base, params, b, config.use_cayley_neumann, config.num_cayley_neumann_terms,
                    config.block_share)
        return layer.train(base.training)  # the mode of the module it replaces

    @classmethod
    def from_peft(cls, layer, adapter: str = "default") -> "OFTLinear":
        """Share the parameters of a PEFT OFT ``Linear`` (``layer.oft_R[adapter]``, an ``OFTRotationModule``), in
        its train / eval mode. Refuses what it would not reproduce: ``coft=True`` (PEFT projects the parameters in
        place every step) and ``num_cayley_neumann_terms`` outside [0, 64]."""
        mod = layer.oft_R[adapter]
        if mod.coft:
            raise NotImplementedError(f"OFTLinear.from_peft: coft=True (eps={mod.eps}) is not supported: PEFT's COFT "
                                      "projects the parameters in place at every forward")
        terms = mod.num_cayley_neumann_terms
        if mod.use_cayley_neumann and not 0 <= terms <= 64:
            raise NotImplementedError(f"OFTLinear.from_peft: num_cayley_neumann_terms={terms} is not supported "
                                      "(0..64)")
        ours = cls(layer.get_base_layer(), mod.weight, mod.block_size, mod.use_cayley_neumann, terms, mod.block_share)
        keep_modes(ours, layer)
        return ours

    def to_config(self) -> OFTConfig:
        return OFTConfig(block_size=self.block_size, use_cayley_neumann=self.use_cayley_neumann,
                         num_cayley_neumann_terms=self.terms, block_share=self.block_share)

    def rotations(self, dtype: torch.dtype = None) -> torch.Tensor:
        """``[in/b, b, b]`` rotation blocks, in ``dtype`` (default: the parameters' dtype, as PEFT's forward)."""
        p = self.oft_params if dtype is None else self.oft_params.to(dtype)
        r, b = p.shape[0], self.block_size
        U = p.new_zeros(r, b, b)
        U[:, self.rows, self.cols] = p
        A = U - U.transpose(-2, -1)
        R = orthogonal_cayley_neumann(A, self.terms) if self.use_cayley_neumann else orthogonal_cayley(A)
        if self.block_share:
            R = R.expand(self.in_features // b, b, b)
        return R

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xr = boft_apply(x.to(self.oft_params.dtype), self.rotations()[None], self.perm)
        return self.base_layer(xr.to(dtype)).to(dtype)

    def _transformed_weight(self, sign: float) -> torch.Tensor:
        w = self.base_layer.weight
        dtype = compute_dtype(w, self.oft_params)
        R = self.rotations(dtype)
        blocks = R.transpose(-1, -2) if sign > 0 else torch.linalg.inv(R).transpose(-1, -2)
        return boft_apply(w.to(dtype), blocks.contiguous()[None], self.perm).to(w.dtype)

    @torch.no_grad()
    def add_to_weight(self, sign: float) -> None:
        self.base_layer.weight.copy_(self._transformed_weight(sign))

    @torch.no_grad()
    def merged_weight_is_finite(self) -> bool:
        return bool(torch.isfinite(self._transformed_weight(1.0)).all())
