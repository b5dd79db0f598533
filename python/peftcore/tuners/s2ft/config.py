from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .._config import TunerConfigMixin, dtype_name

SELECTIONS = ("random", "weight", "gradient")
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")
# Which weight axis each projection trains along: o_proj / down_proj train the *input* columns of the selected
# heads / channels (dim=1), the others the *output* rows (dim=0).
PROJ_DIM = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 0, "up_proj": 0, "down_proj": 1}


def _dtype_name(dtype: Union[str, torch.dtype]) -> str:
    return dtype_name("S2FTConfig", dtype, floating=True)


@dataclass
class S2FTConfig(TunerConfigMixin):
    """Configuration of S2FT (structured sparse fine-tuning, "select sparsely, compute densely").

    Per decoder block, a few attention heads and FFN channels are selected; the block's weights are co-permuted
    so the selection is one contiguous range (at the start), and only that slice of the targeted projections
    trains: ``o_proj`` / ``down_proj`` columns (dim=1), ``q/k/v_proj`` / ``gate/up_proj`` rows (dim=0).

    Args:
        target_modules: which projections train, matched on the module's full name as in HF PEFT: a list of
            names or name suffixes (``"o_proj"`` matches ``"model.layers.0.self_attn.o_proj"``) or a regex that
            must ``fullmatch`` the whole name. Only the projections of Llama-style blocks count (``q/k/v/o_proj``,
            ``gate/up/down_proj``). Default: ``["o_proj", "down_proj"]`` (the S2FT paper's choice).
        exclude_modules: same forms; matching projections do not train.
        layers_to_transform: decoder-block indices to use (``None``: all).
        head_ratio: fraction of each block's attention heads to select. With grouped-query attention whole KV
            groups (a kv head and its ``n_rep`` query heads) are selected: ``max(1, round(head_ratio * num_kv))``.
        num_heads: absolute number of query heads instead of ``head_ratio``; rounded up to whole KV groups.
        channel_ratio: fraction of each block's FFN intermediate channels (``max(1, round(ratio * I))``).
        num_channels: absolute number of channels instead of ``channel_ratio``.
        selection: ``"random"`` (seeded, uniform), ``"weight"`` (largest L2 norm of the slices that would train),
            ``"gradient"`` (largest L2 norm of their loss gradient over ``calib_fn``'s batches).
        seed: seed of the random selection (one generator, blocks in order).
        delta_dtype: dtype of the trainable deltas (float32 by default).
    """

    target_modules: Optional[Union[list[str], str]] = field(default_factory=lambda: ["o_proj", "down_proj"])
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[list[int]] = None
    head_ratio: float = 0.05
    num_heads: Optional[int] = None
    channel_ratio: float = 0.05
    num_channels: Optional[int] = None
    selection: str = "random"
    seed: int = 0
    delta_dtype: Union[str, torch.dtype] = "float32"
    peft_type: str = field(default="S2FT", init=False)

    def __post_init__(self):
        if self.selection not in SELECTIONS:
            raise ValueError(f"S2FTConfig: selection must be one of {SELECTIONS}, got {self.selection!r}")
        for name in ("head_ratio", "channel_ratio"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValueError(f"S2FTConfig: {name} must be in (0, 1], got {v}")
        for name in ("num_heads", "num_channels"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"S2FTConfig: {name} must be >= 1, got {v}")
        self.delta_dtype = _dtype_name(self.delta_dtype)
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if self.layers_to_transform is not None:
            self.layers_to_transform = sorted(int(i) for i in self.layers_to_transform)

    @property
    def torch_delta_dtype(self) -> torch.dtype:
        return getattr(torch, self.delta_dtype)

    def groups_for(self, num_heads: int, num_kv_heads: int) -> int:
        """How many KV groups (of ``num_heads // num_kv_heads`` query heads each) a block selects."""
        n_rep = num_heads // num_kv_heads
        if self.num_heads is not None:
            g = -(-self.num_heads // n_rep)
        else:
            g = round(self.head_ratio * num_kv_heads)
        return min(num_kv_heads, max(1, g))

    def channels_for(self, intermediate: int) -> int:
        c = self.num_channels if self.num_channels is not None else round(self.channel_ratio * intermediate)
        return min(intermediate, max(1, c))
