"""PEFT methods built on peftcore ops, one folder per method (HF PEFT's ``tuners/<method>/{config,layer,model}.py``).

The one API for every method is :mod:`peftcore.tuners.api` (``apply_adapter(model, config)``, ``save_adapter`` /
``load_adapter`` of a directory, ``merge_adapter``, ``unmerge_adapter``, ``unload_adapter``, ``adapter_state``),
also at ``peftcore.`` top level. The per-method names (``apply_sparse_delta``, ``save_s2ft``, ...) are kept as
documented aliases: ``apply_*`` / ``merge_*`` / ``unmerge_*`` / ``unload_*`` do what the generic call does for that
method; ``save_*`` / ``load_*`` read and write the older single-method safetensors file (``load_adapter`` reads
those files too)."""
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
from .s2ft import (  # noqa: F401
    S2FTConfig,
    S2FTLinear,
    apply_s2ft,
    load_s2ft,
    merge_s2ft,
    save_s2ft,
    s2ft_state,
    unload_s2ft,
    unmerge_s2ft,
)
from .monarch import MonarchConfig, MonarchLinear  # noqa: F401,E402
from .oft import OFTConfig, OFTLinear  # noqa: F401,E402
from .boft import BOFTConfig, BOFTLinear  # noqa: F401,E402
from .miss import MissConfig, MissLinear  # noqa: F401,E402
from .seer_attn import (  # noqa: F401,E402
    AttnGate,
    SeerAttnConfig,
    apply_seer_attention,
    load_seer_gates,
    remove_seer_attention,
    save_seer_gates,
    seer_gate_parameters,
    seer_loss,
    seer_sparsity,
    set_seer_mode,
)
from ._adapters import adapter_layers, from_peft  # noqa: F401,E402
from .token_elim import TokenElimConfig, apply_token_elim, remove_token_elim  # noqa: F401,E402
from .lora import LoraConfig, MultiLoraLinear, adapter_batch, apply_multi_lora  # noqa: F401,E402
from .api import (  # noqa: F401,E402  (the one API for every method)
    adapter_methods,
    adapter_state,
    apply_adapter,
    load_adapter,
    merge_adapter,
    save_adapter,
    unload_adapter,
    unmerge_adapter,
)
from ._loading import LoadError  # noqa: F401,E402  (every loader's refusal: a ValueError)
