from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

from .._config import TunerConfigMixin


@dataclass
class OFTConfig(TunerConfigMixin):
    """OFT, as HF PEFT's ``OFTConfig`` (``r=0`` form: blocks of ``block_size``): the input of each targeted linear
    is rotated block by block by orthogonal ``R = cayley(U - U^T)`` (``U`` the strict upper triangle, trainable).

    Args:
        target_modules / exclude_modules: PEFT's rules.
        block_size: rotation block size; must divide in_features.
        use_cayley_neumann / num_cayley_neumann_terms: PEFT's Neumann-series approximation (default on, 5 terms)
            or the exact Cayley transform.
        block_share: one rotation shared by every block.
    """

    PEFT_TYPE: ClassVar[str] = "OFT"
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    block_size: int = 32
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    block_share: bool = False
    peft_type: str = field(default="OFT", init=False)

    def __post_init__(self):
        if self.block_size < 2:
            raise ValueError(f"OFTConfig: block_size must be >= 2, got {self.block_size}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
