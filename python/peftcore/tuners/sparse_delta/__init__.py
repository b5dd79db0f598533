"""Sparse fine-tuning: a trainable sparse delta S on frozen linear weights, W_eff = W + scale * S.

Covers SaRA-style (smallest-magnitude), LT-SFT / SpIEL-AG-style (gradient) and random selection of the entries,
SpIEL-style periodic drop-and-grow, merge/unmerge/unload, safetensors save/load and composition of deltas.
"""
from .config import SparseDeltaConfig
from .layer import SparseDeltaLinear
from .model import (
    SparseDeltaScheduler,
    apply_sparse_delta,
    compose_deltas,
    drop_and_grow,
    load_sparse_delta,
    merge_sparse_delta,
    save_sparse_delta,
    sparse_delta_layers,
    sparse_delta_state,
    unload_sparse_delta,
    unmerge_sparse_delta,
)
from .selection import ActivationCapture, gradient_indices, magnitude_indices, random_indices

__all__ = [
    "ActivationCapture",
    "SparseDeltaConfig",
    "SparseDeltaLinear",
    "SparseDeltaScheduler",
    "apply_sparse_delta",
    "compose_deltas",
    "drop_and_grow",
    "gradient_indices",
    "load_sparse_delta",
    "magnitude_indices",
    "merge_sparse_delta",
    "random_indices",
    "save_sparse_delta",
    "sparse_delta_layers",
    "sparse_delta_state",
    "unload_sparse_delta",
    "unmerge_sparse_delta",
]
