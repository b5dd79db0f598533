from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

from .._config import TunerConfigMixin


@dataclass
class MissConfig(TunerConfigMixin):
    """MiSS, as HF PEFT's ``MissConfig`` (default and ``init_weights="mini"`` forms): the update ``dW`` of each
    targeted linear is one trainable block ``miss [r, out]`` shared by every ``r``-wide chunk of the input,
    ``dW[o, f] = miss[f % r, o]``, so ``x dW^T = fold_r(x) @ miss`` with ``fold_r`` the sum of ``x``'s chunks.

    Args:
        target_modules / exclude_modules: PEFT's rules.
        r: chunk width (PEFT's ``r``); at most in_features (a last partial chunk counts as zero-padded, as PEFT pads).
        mini_r: ``None``, or PEFT's ``mini`` form: ``miss [r, mini_r]`` repeated ``out / mini_r`` times along the
            outputs (``mini_r`` must divide out_features).
        dropout: dropout on the adapter's input (training only).
    """

    PEFT_TYPE: ClassVar[str] = "MISS"
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    r: int = 64
    mini_r: Optional[int] = None
    dropout: float = 0.0
    peft_type: str = field(default="MISS", init=False)

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"MissConfig: r must be >= 1, got {self.r}")
        if self.mini_r is not None and self.mini_r < 1:
            raise ValueError(f"MissConfig: mini_r must be >= 1, got {self.mini_r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MissConfig: dropout must be in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
