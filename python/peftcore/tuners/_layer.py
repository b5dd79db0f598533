"""What every adapter layer around a frozen ``nn.Linear`` shares: the base layer's surface, PEFT's layer surface
(``base_layer``, ``get_base_layer()``, ``merge(safe_merge, adapter_names)``, so PEFT's ``merge_and_unload`` works
on them), and merge / unmerge bookkeeping. Subclasses give the adapted forward and the in-place weight update."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype an adapter's weight arithmetic (rotations, merge, unmerge) runs in: the promoted dtype of
    ``tensors``, float32 for half types (so float64 stays float64 and merge / unmerge round-trip there)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.float32 if dtype in _HALF else dtype


def keep_modes(ours: nn.Module, theirs: nn.Module, pairs=()) -> None:
    """Give a converted layer the train / eval mode of the layer it replaces (``ours.training = theirs.training``),
    and each ``(our_submodule, their_submodule)`` pair (e.g. the dropouts) the mode of its counterpart. Set
    flag by flag, never through ``.train()``, so the shared base layer keeps its own mode."""
    ours.training = theirs.training
    for a, b in pairs:
        a.training = b.training


class FrozenLinearAdapter(nn.Module):
    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"{type(self).__name__}: base_layer must be nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
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

    def get_base_layer(self) -> nn.Linear:
        return self.base_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) if self.merged else self.adapted_forward(x)

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The adapter's own parameters by name (those registered on this module, not the base layer's)."""
        return dict(self.named_parameters(recurse=False))

    # -- subclasses
    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add_to_weight(self, sign: float) -> None:
        """``W += sign * delta`` in place (no grad)."""
        raise NotImplementedError

    def merged_weight_is_finite(self) -> bool:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        """Add the delta into ``base_layer.weight`` in place; the forward then is the plain base linear.
        ``safe_merge`` first checks the merged weight is finite. The keyword arguments match PEFT's tuner layers."""
        name = type(self).__name__
        if self.merged:
            warnings.warn(f"{name}.merge: already merged; nothing done")
            return
        if safe_merge and not self.merged_weight_is_finite():
            raise ValueError(f"{name}.merge: the merged weight has NaN/inf; not merged")
        self.add_to_weight(1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the delta again (exact in float32; rounds once more for half-precision weights)."""
        if not self.merged:
            warnings.warn(f"{type(self).__name__}.unmerge: not merged; nothing done")
            return
        self.add_to_weight(-1.0)
        self.merged = False
