"""PEFT methods built on peftcore ops, one folder per method (HF PEFT's ``tuners/<method>/{config,layer,model}.py``)."""
from .sparse_delta import (  # noqa: F401
    SparseDeltaConfig,
    SparseDeltaLinear,
    SparseDeltaScheduler,
    apply_sparse_delta,
    compose_deltas,
    drop_and_grow,
    load_sparse_delta,
    merge_sparse_delta,
    save_sparse_delta,
    sparse_delta_state,
    unload_sparse_delta,
    unmerge_sparse_delta,
)
