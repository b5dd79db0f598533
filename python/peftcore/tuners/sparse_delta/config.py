from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .._config import TunerConfigMixin, dtype_name

SELECTIONS = ("random", "magnitude", "gradient")


def _dtype_name(dtype: Union[str, torch.dtype]) -> str:
    return dtype_name("SparseDeltaConfig", dtype)


@dataclass
class SparseDeltaConfig(TunerConfigMixin):
    """Configuration of a sparse delta on the chosen linear layers: ``W_eff = W + scale * S``.

    Args:
        target_modules: which ``nn.Linear`` modules get a delta, matched on the module's name as in HF PEFT:
            a list of names or name suffixes (``"q_proj"`` matches ``"model.layers.0.self_attn.q_proj"``), or a
            regex string that must ``fullmatch`` the whole name.
        exclude_modules: same forms as ``target_modules``; matching modules are skipped.
        density: fraction of each weight's entries that are trainable (``nnz = max(1, round(density * out * in))``).
        selection: how the entries are chosen: ``"random"`` (uniform without replacement), ``"magnitude"``
            (SaRA: the smallest ``|w|``), ``"gradient"`` (LT-SFT / SpIEL-AG: the largest ``|grad_W|`` on calibration
            batches; needs ``calib_fn``).
        scale: multiplier of the delta in the forward.
        values_dtype: dtype of the trainable values (float32 by default, or the weight's dtype).
        index_dtype: ``"int64"`` (default) or ``"int32"`` for the ``indices`` buffer.
        seed: seed of the random selection (each layer draws from one generator, in module order).
        max_calib_tokens: gradient selection keeps at most this many tokens of (input, grad_output) per layer.
    """

    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    density: float = 0.01
    selection: str = "random"
    scale: float = 1.0
    values_dtype: Union[str, torch.dtype] = "float32"
    index_dtype: Union[str, torch.dtype] = "int64"
    seed: int = 0
    max_calib_tokens: int = 16384
    peft_type: str = field(default="SPARSE_DELTA", init=False)

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f"SparseDeltaConfig: selection must be one of {SELECTIONS}, got {self.selection!r}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"SparseDeltaConfig: density must be in (0, 1], got {self.density}")
        self.values_dtype = _dtype_name(self.values_dtype)
        self.index_dtype = _dtype_name(self.index_dtype)
        if self.index_dtype not in ("int32", "int64"):
            raise ValueError(f"SparseDeltaConfig: index_dtype must be int32 or int64, got {self.index_dtype}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)

    @property
    def torch_values_dtype(self) -> torch.dtype:
        return getattr(torch, self.values_dtype)

    @property
    def torch_index_dtype(self) -> torch.dtype:
        return getattr(torch, self.index_dtype)

    def nnz_for(self, out_features: int, in_features: int) -> int:
        numel = out_features * in_features
        return min(numel, max(1, round(self.density * numel)))
