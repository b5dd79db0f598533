from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

from .._config import TunerConfigMixin, dtype_name


@dataclass
class MonarchConfig(TunerConfigMixin):
    """A Monarch-matrix update beside each targeted frozen linear: ``y = W x + b + scale * M x`` with
    ``M = P2 blockdiag(w2) P blockdiag(w1)`` (fly's ``blockdiag_butterfly_multiply``), ``w1 [nblocks, rank, in/nblocks]``,
    ``w2 [nblocks, out/nblocks, rank]``.

    Args:
        target_modules / exclude_modules: which ``nn.Linear`` modules, PEFT's rules (names, ``.suffix``, regex).
        nblocks: blocks per factor; must divide in_features and out_features.
        rank: width of each block's intermediate (``None``: ``in_features / nblocks``, a full-rank Monarch). The
            trainable count per layer is ``nblocks * rank * (in + out) / nblocks = rank * (in + out)``.
        scale: multiplier of the update.
        dropout: dropout on the adapter's input (training only).
        dtype: dtype of the factors (``None``: the base weight's); the input is cast to it for the update.
        seed: the seed of ``w1``'s init (``w2`` starts at zero, so the model is unchanged at first, as LoRA's B).
    """

    PEFT_TYPE: ClassVar[str] = "MONARCH"
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    nblocks: int = 4
    rank: Optional[int] = None
    scale: float = 1.0
    dropout: float = 0.0
    dtype: Optional[str] = None
    seed: int = 0
    peft_type: str = field(default="MONARCH", init=False)

    def __post_init__(self):
        if self.nblocks < 1:
            raise ValueError(f"MonarchConfig: nblocks must be >= 1, got {self.nblocks}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"MonarchConfig: rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MonarchConfig: dropout must be in [0, 1), got {self.dropout}")
        if self.dtype is not None:
            self.dtype = dtype_name("MonarchConfig", self.dtype, floating=True)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
