"""A MiSS linear layer whose forward equals HF PEFT's ``peft.tuners.miss.layer.MissLinear`` (default and "mini"
forms, unmerged): ``y = base(x) + fold_r(dropout(x)) @ miss`` with :func:`peftcore.ops.miss.miss_fold` (no padded
copy of ``x``; its backward broadcasts the ``[.., r]`` gradient back without an expanded buffer). While the dropout
is active (training, ``dropout > 0``) the input is zero-padded to a multiple of ``r`` first, as PEFT does, so the
dropout draws the same mask as PEFT's under one seed.

Merge: ``W[o, f] += miss[f % r, o]`` — :func:`peftcore.ops.miss.miss_unfold` of ``miss^T``; unmerge subtracts it
(in the promoted dtype of ``W`` and the block, float32 for half types).
PEFT's "bat" form (``dW`` built from ``W`` itself each step) is not supported: ``from_peft`` refuses it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.miss import miss_fold, miss_unfold
from .._layer import FrozenLinearAdapter, compute_dtype, keep_modes
from .config import MissConfig


class MissLinear(FrozenLinearAdapter):
    """``base`` (frozen) plus the shared-block update ``miss_block [r, out or mini_r]`` (trainable)."""

    def __init__(self, base_layer: nn.Linear, miss_block: torch.Tensor, dropout: float = 0.0):
        super().__init__(base_layer)
        r, cols = miss_block.shape
        if r > base_layer.in_features:
            raise ValueError(f"MissLinear: r={r} must be <= in_features={base_layer.in_features}")
        if base_layer.out_features % cols:
            raise ValueError(f"MissLinear: miss_block's {cols} columns must divide out_features="
                             f"{base_layer.out_features}")
        self.miss_block = miss_block if isinstance(miss_block, nn.Parameter) else nn.Parameter(miss_block)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def create(cls, base: nn.Linear, config: MissConfig) -> "MissLinear":
        """A fresh adapter at zero (PEFT's default init), in the base weight's dtype, float32 for half types
        (PEFT's dtypes)."""
        if config.r > base.in_features:
            raise ValueError(f"r={config.r} must be <= in_features={base.in_features}")
        cols = config.mini_r or base.out_features
        if base.out_features % cols:
            raise ValueError(f"mini_r={cols} must divide out_features={base.out_features}")
        block = torch.zeros(config.r, cols, device=base.weight.device, dtype=compute_dtype(base.weight))
        layer = cls(base, block, config.dropout)
        return layer.train(base.training)  # the mode of the module it replaces

    @classmethod
    def from_peft(cls, layer, adapter: str = "default") -> "MissLinear":
        """Share the parameter of a PEFT ``MissLinear`` (``layer.miss_block[adapter]``), its ``miss_dropout`` and
        its train / eval mode."""
        if layer.miss_fn == "bat":
            raise NotImplementedError("MissLinear.from_peft: MiSS init_weights='bat' (dW built from W) is not "
                                      "supported; the default and 'mini' forms are")
        block = layer.miss_block[adapter]
        want = layer.miss_mini_r[adapter] if layer.miss_fn == "mini" else layer.out_features
        if block.dim() != 2 or block.shape[1] != want:
            raise NotImplementedError(f"MissLinear.from_peft: adapter {adapter!r} has a block of shape "
                                      f"{tuple(block.shape)} in a layer of MiSS form init_weights={layer.miss_fn!r} "
                                      f"(PEFT itself cannot run it)")
        drop = layer.miss_dropout[adapter]
        if not isinstance(drop, (nn.Dropout, nn.Identity)):
            raise NotImplementedError(f"MissLinear.from_peft: miss_dropout module {type(drop).__name__} is not "
                                      "supported")
        ours = cls(layer.get_base_layer(), block, drop.p if isinstance(drop, nn.Dropout) else 0.0)
        keep_modes(ours, layer, [(ours.dropout, drop)])
        return ours

    @property
    def r(self) -> int:
        return self.miss_block.shape[0]

    def to_config(self) -> MissConfig:
        cols = self.miss_block.shape[1]
        return MissConfig(r=self.r, mini_r=None if cols == self.out_features else cols,
                          dropout=self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0)

    def full_block(self) -> torch.Tensor:
        """``[r, out]``: the block, repeated along the outputs in the mini form."""
        m = self.miss_block
        return m if m.shape[1] == self.out_features else m.repeat(1, self.out_features // m.shape[1])

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        y = self.base_layer(x)
        m = self.full_block()
        if isinstance(self.dropout, nn.Dropout) and self.dropout.training:  # PEFT's order: pad, cast, dropout
            pad = -x.shape[-1] % self.r
            u = miss_fold(self.dropout((F.pad(x, (0, pad)) if pad else x).to(m.dtype)), self.r) @ m
        else:
            u = miss_fold(x.to(m.dtype), self.r) @ m
        return (y + u).to(dtype)

    def delta_weight(self) -> torch.Tensor:
        return miss_unfold(self.full_block().T.contiguous(), self.in_features)  # [out, in]

    @torch.no_grad()
    def add_to_weight(self, sign: float) -> None:
        w = self.base_layer.weight
        dtype = compute_dtype(w, self.miss_block)
        w.copy_((w.to(dtype) + sign * self.delta_weight().to(dtype)).to(w.dtype))

    @torch.no_grad()
    def merged_weight_is_finite(self) -> bool:
        w = self.base_layer.weight
        dtype = compute_dtype(w, self.miss_block)
        return bool(torch.isfinite(w.to(dtype) + self.delta_weight().to(dtype)).all())
