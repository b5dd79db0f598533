"""TokenElimConfig: which decoder layers eliminate tokens, and how many tokens / MLP channels they keep."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .._config import TunerConfigMixin


@dataclass
class TokenElimConfig(TunerConfigMixin):
    """LeMo / Jenga token elimination for HF Llama-style decoder layers.

    * ``keep_ratio`` — fraction of the ``block_size``-token blocks of a sequence that go through attention
      (rounded to whole blocks, at least one); 1.0 keeps every token (the layer is then the original one).
    * ``block_size`` — tokens per scored block (LeMo: 64).
    * ``dense_first`` / ``dense_last`` — this many first / last decoder layers stay dense (as in the paper).
    * ``always_keep_first`` / ``always_keep_last`` — force the first block (attention sink) and the last block
      (the most recent tokens; a partial last block is always forced in or left out, so K is static).
    * ``mlp_keep_ratio`` — fraction of intermediate MLP channels saved for backward (``token_mlp_partial_save``;
      the gradient flows through those channels only). ``None``: same as ``keep_ratio``; 1.0: the original MLP.
      Applies to plain, frozen, bias-free ``gate/up/down_proj`` with SiLU; other MLPs (e.g. LoRA on the MLP)
      run unchanged.
    * ``eliminate_in_eval`` — also eliminate tokens in eval mode (default: training only; eval runs dense).
    """

    keep_ratio: float = 0.5
    block_size: int = 64
    dense_first: int = 2
    dense_last: int = 1
    always_keep_first: bool = True
    always_keep_last: bool = True
    mlp_keep_ratio: Optional[float] = None
    eliminate_in_eval: bool = False
    peft_type: str = field(default="TOKEN_ELIM", init=False)

    def __post_init__(self):
        if not 0.0 < self.keep_ratio <= 1.0:
            raise ValueError(f"TokenElimConfig: keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.mlp_keep_ratio is not None and not 0.0 < self.mlp_keep_ratio <= 1.0:
            raise ValueError(f"TokenElimConfig: mlp_keep_ratio must be in (0, 1], got {self.mlp_keep_ratio}")
        if self.block_size <= 0:
            raise ValueError(f"TokenElimConfig: block_size must be > 0, got {self.block_size}")
        if self.dense_first < 0 or self.dense_last < 0:
            raise ValueError(f"TokenElimConfig: dense_first / dense_last must be >= 0, got "
                             f"{self.dense_first} / {self.dense_last}")

    @property
    def mlp_ratio(self) -> float:
        return self.keep_ratio if self.mlp_keep_ratio is None else self.mlp_keep_ratio
