"""S2FT, structured sparse fine-tuning ("select sparsely, compute densely"): a few attention heads (whole KV
groups under grouped-query attention) and FFN channels per decoder block train. Each block is co-permuted so the
selection is one contiguous slice, trained through ``peftcore.ops.partial.partial_linear`` without gathers.

Covers random / weight-norm / gradient-norm selection, merge/unmerge/unload (back to the original order) and
safetensors save/load in original coordinates (loads into the plain model).
"""
from .config import S2FTConfig
from .layer import S2FTLinear
from .model import (
    apply_s2ft,
    load_s2ft,
    merge_s2ft,
    read_s2ft,
    s2ft_layers,
    s2ft_state,
    save_s2ft,
    unload_s2ft,
    unmerge_s2ft,
)
from .permute import BlockInfo, find_blocks, permute_block

__all__ = [
    "BlockInfo",
    "S2FTConfig",
    "S2FTLinear",
    "apply_s2ft",
    "find_blocks",
    "load_s2ft",
    "merge_s2ft",
    "permute_block",
    "read_s2ft",
    "s2ft_layers",
    "s2ft_state",
    "save_s2ft",
    "unload_s2ft",
    "unmerge_s2ft",
]
