"""A Monarch update beside a frozen linear, on :func:`peftcore.ops.blockdiag.monarch_matmul` (fused; the training
step keeps fly's intermediate and no more)."""
from __future__ import annotations

import torch
from torch import nn

from ...ops.blockdiag import monarch_matmul
from .._layer import FrozenLinearAdapter, compute_dtype
from .config import MonarchConfig


class MonarchLinear(FrozenLinearAdapter):
    """``base(x) + scale * monarch_matmul(dropout(x), w1, w2)`` with trainable ``w1 [k, q, in/k]``,
    ``w2 [k, out/k, q]`` (``k = nblocks``, ``q = rank``)."""

    def __init__(self, base_layer: nn.Linear, w1: torch.Tensor, w2: torch.Tensor, scale: float = 1.0,
                 dropout: float = 0.0):
        super().__init__(base_layer)
        k, q, p = w1.shape
        l, s, r = w2.shape
        if k * p != base_layer.in_features or l * s != base_layer.out_features or l * r != k * q:
            raise ValueError(f"MonarchLinear: w1 {tuple(w1.shape)} / w2 {tuple(w2.shape)} do not fit "
                             f"[{base_layer.out_features}, {base_layer.in_features}]")
        self.w1 = nn.Parameter(w1)
        self.w2 = nn.Parameter(w2)
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def create(cls, base: nn.Linear, config: MonarchConfig) -> "MonarchLinear":
        k = config.nblocks
        n_in, n_out = base.in_features, base.out_features
        if n_in % k or n_out % k:
            raise ValueError(f"nblocks={k} must divide in_features={n_in} and out_features={n_out}")
        q = config.rank or n_in // k
        dtype = getattr(torch, config.dtype) if config.dtype else base.weight.dtype
        gen = torch.Generator().manual_seed(config.seed)
        w1 = torch.randn(k, q, n_in // k, generator=gen) * (n_in // k) ** -0.5
        w2 = torch.zeros(k, n_out // k, q)
        dev = base.weight.device
        layer = cls(base, w1.to(dev, dtype), w2.to(dev, dtype), config.scale, config.dropout)
        return layer.train(base.training)  # the mode of the module it replaces

    @property
    def nblocks(self) -> int:
        return self.w1.shape[0]

    def to_config(self) -> MonarchConfig:
        return MonarchConfig(nblocks=self.nblocks, rank=self.w1.shape[1], scale=self.scale,
                             dtype=str(self.w1.dtype).removeprefix("torch."))

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        u = monarch_matmul(self.dropout(x).to(self.w1.dtype), self.w1, self.w2)
        return y + (self.scale * u).to(y.dtype)

    def delta_weight(self, dtype: torch.dtype = None) -> torch.Tensor:
        """``scale * M`` as a dense ``[out, in]`` matrix (the Monarch product of the identity) in ``dtype``
        (default: the factors' dtype, float32 for half types)."""
        dtype = dtype or compute_dtype(self.w1)
        eye = torch.eye(self.in_features, device=self.w1.device, dtype=dtype)
        return self.scale * monarch_matmul(eye, self.w1.to(dtype), self.w2.to(dtype)).T

    def _merge_dtype(self) -> torch.dtype:
        return compute_dtype(self.base_layer.weight, self.w1, self.w2)

    @torch.no_grad()
    def add_to_weight(self, sign: float) -> None:
        w = self.base_layer.weight
        dtype = self._merge_dtype()
        w.copy_((w.to(dtype) + sign * self.delta_weight(dtype)).to(w.dtype))

    @torch.no_grad()
    def merged_weight_is_finite(self) -> bool:
        dtype = self._merge_dtype()
        return bool(torch.isfinite(self.base_layer.weight.to(dtype) + self.delta_weight(dtype)).all())
