from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

from .._config import TunerConfigMixin


@dataclass
class BOFTConfig(TunerConfigMixin):
    """BOFT, as HF PEFT's ``BOFTConfig`` (``boft_block_size`` form): the input of each targeted linear goes through
    ``n_butterfly_factor`` butterfly factors ``P_i blockdiag(cayley(R_i)) P_i^T`` and the output channels are
    rescaled by a trainable ``s``.

    Args:
        target_modules / exclude_modules: PEFT's rules.
        block_size: rotation block size (PEFT's ``boft_block_size``); must divide in_features.
        n_butterfly_factor: number of butterfly factors (PEFT's ``boft_n_butterfly_factor``); the block count
            ``in/block_size`` must be divisible by ``2^(n_butterfly_factor - 1)``.
        dropout: PEFT's ``boft_dropout``: in training, ``int(dropout * blocks)`` blocks of one random butterfly
            factor are replaced by the identity each forward.
    """

    PEFT_TYPE: ClassVar[str] = "BOFT"
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    block_size: int = 8
    n_butterfly_factor: int = 1
    dropout: float = 0.0
    peft_type: str = field(default="BOFT", init=False)

    def __post_init__(self):
        if self.block_size < 2 or self.block_size % 2:
            raise ValueError(f"BOFTConfig: block_size must be even and >= 2, got {self.block_size}")
        if self.n_butterfly_factor < 1:
            raise ValueError(f"BOFTConfig: n_butterfly_factor must be >= 1, got {self.n_butterfly_factor}")
        if not 0.0 <= self.dropout <= 1.0:
            raise ValueError(f"BOFTConfig: dropout must be in [0, 1], got {self.dropout}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
