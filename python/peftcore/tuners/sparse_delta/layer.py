from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from peftcore.ops import sparse_delta as sd


class SparseDeltaLinear(nn.Module):
    """An ``nn.Linear`` with a trainable sparse delta: ``y = x @ (W + scale * S)^T + b``.

    ``base_layer`` is kept (frozen) and never copied; ``S`` is held as ``indices`` (buffer, sorted unique flat
    positions ``r * in_features + c``, int64 or int32) and ``values`` (``nn.Parameter`` [nnz], zeros at init).
    The forward calls ``peftcore.ops.sparse_delta.sparse_delta_linear``, so ``W + scale * S`` is never materialised.
    ``merge()`` adds the delta into ``base_layer.weight`` in place (the forward then is the plain base linear);
    ``unmerge()`` subtracts it again (exact in float32; rounds once more for half-precision weights).
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        indices: torch.Tensor,
        scale: float = 1.0,
        values_dtype: torch.dtype = torch.float32,
        validate: bool = True,
    ):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"SparseDeltaLinear: base_layer must be nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        w = base_layer.weight
        indices = indices.to(device=w.device)
        if indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"SparseDeltaLinear: indices must be int32 or int64, got {indices.dtype}")
        if validate:
            sd.sparse_delta_validate(indices, self.out_features, self.in_features)
        self.register_buffer("indices", indices.contiguous())
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=values_dtype, device=w.device))
        self.scale = float(scale)
        self.merged = False

    # -- the base layer's surface, so code that reads module.weight / in_features keeps working
    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return sd.sparse_delta_linear(
            x, self.base_layer.weight, self.base_layer.bias, self.indices, self.values, self.scale
        )

    def get_base_layer(self) -> nn.Linear:
        return self.base_layer

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        """``W += scale * S`` in place. ``safe_merge`` first checks the merged weight is finite. The keyword
        arguments match PEFT's tuner layers, so PEFT's ``merge_and_unload`` also merges and unloads these."""
        if self.merged:
            warnings.warn("SparseDeltaLinear.merge: already merged; nothing done")
            return
        w = self.base_layer.weight
        if safe_merge:
            merged = sd.sparse_delta_merge(w, self.indices, self.values.detach(), self.scale)
            if not torch.isfinite(merged).all():
                raise ValueError("SparseDeltaLinear.merge: the merged weight has NaN/inf; not merged")
            w.copy_(merged)
        else:
            sd.sparse_delta_merge_(w, self.indices, self.values.detach(), self.scale)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("SparseDeltaLinear.unmerge: not merged; nothing done")
            return
        sd.sparse_delta_merge_(self.base_layer.weight, self.indices, self.values.detach(), -self.scale)
        self.merged = False

    def delta_state(self) -> dict[str, torch.Tensor]:
        """``{"indices", "values"}`` of this layer's delta (detached; values as trained, not scaled)."""
        return {"indices": self.indices.detach(), "values": self.values.detach()}

    @torch.no_grad()
    def set_delta(self, indices: torch.Tensor, values: torch.Tensor, validate: bool = True) -> None:
        """Replace the delta, keeping the ``values`` Parameter object (optimizers keep referring to it).

        Optimizer state of ``values`` is *not* touched here; ``drop_and_grow`` keeps it aligned.
        """
        if self.merged:
            raise RuntimeError("SparseDeltaLinear.set_delta: unmerge() first")
        if indices.numel() != values.numel():
            raise ValueError(
                f"SparseDeltaLinear.set_delta: indices and values differ in length, {indices.numel()} vs {values.numel()}"
            )
        dev = self.base_layer.weight.device
        indices = indices.to(device=dev, dtype=self.indices.dtype).contiguous()
        if validate:
            sd.sparse_delta_validate(indices, self.out_features, self.in_features)
        values = values.to(device=dev, dtype=self.values.dtype)
        if indices.numel() == self.indices.numel():
            self.indices.copy_(indices)
            self.values.copy_(values)
        else:
            self.indices = indices
            self.values.data = values.clone()
            self.values.grad = None

    def extra_repr(self) -> str:
        numel = self.out_features * self.in_features
        return (
            f"nnz={self.nnz} ({self.nnz / numel:.4%}), scale={self.scale}, values_dtype={self.values.dtype}, "
            f"merged={self.merged}"
        )
