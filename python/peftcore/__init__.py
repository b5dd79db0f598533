"""peftcore: fast kernels for parameter-efficient fine-tuning.

Every kernel is a ``torch.ops.peftcore.*`` custom op (CPU and, where built, CUDA) with a fake kernel and autograd,
so it works under ``torch.compile`` and CUDA graphs. ``peftcore.ops.<family>`` holds the documented wrappers;
``peftcore.tuners`` builds PEFT modules from them, with one adapter API for every method:
``peftcore.apply_adapter(model, config)``, ``save_adapter`` / ``load_adapter`` (a directory), ``merge_adapter``,
``unmerge_adapter``, ``unload_adapter``, ``adapter_state`` (see ``docs/api.md``).
"""
import torch  # noqa: F401  (loads libtorch before the extension)


def _check_torch_version():
    """The extension links against one torch's C++ libraries: refuse any other torch with a message saying so
    (loading it anyway fails with a missing library or an undefined symbol, or worse)."""
    try:
        from ._build_torch import TORCH_VERSION as built
    except ImportError:  # a build made before the version was recorded: nothing to compare
        return
    found = str(torch.__version__)
    if built != found:
        raise ImportError(
            f"peftcore: the extension was built against torch {built}, found torch {found}; it works only with the "
            f"torch it was built against: rebuild it in this environment (bash scripts/setup.sh, or pip install "
            f"--no-build-isolation . from the source tree) or install torch=={built.split('+')[0]}")


_check_torch_version()

from . import _C  # noqa: E402  (registers torch.ops.peftcore.*)
from . import ops  # noqa: F401  (fake kernels and autograd)
from .ops.blockdiag import blockdiag_matmul, monarch_matmul, monarch_matmul_with_h  # noqa: F401
from .ops.miss import miss_fold, miss_unfold  # noqa: F401
from .ops.orthogonal import (  # noqa: F401
    boft_apply,
    boft_permutations,
    orthogonal_boft_apply,
    orthogonal_cayley,
    orthogonal_cayley_neumann,
)
from .ops.partial import (  # noqa: F401
    partial_gather,
    partial_linear,
    partial_range_start,
    partial_scatter_add,
    partial_validate,
)
from .ops.sparse_attn import (  # noqa: F401
    attn_block_pool,
    block_mask_from_flex,
    block_sparse_attn,
    csr_to_dense,
    dense_to_csr,
)
from .ops.sparse_delta import (  # noqa: F401
    sparse_delta_linear,
    sparse_delta_merge,
    sparse_delta_merge_,
    sparse_delta_sddmm,
    sparse_delta_spmm,
    sparse_delta_spmm_t,
    sparse_delta_topk_grad,
    sparse_delta_validate,
)
from .ops.token_elim import (  # noqa: F401
    token_block_scores,
    token_gather,
    token_mlp_partial_save,
    token_scatter_add,
    token_topk_blocks,
)

__version__ = "0.1.0"


def build_info() -> dict:
    """What this build contains: torch version built against, CUDA on/off and archs, CUTLASS headers."""
    return {
        "version": __version__,
        "torch_built": _C.torch_version(),
        "torch_runtime": torch.__version__,
        "with_cuda": _C.with_cuda(),
        "cuda_archs": _C.cuda_archs(),
        "has_cutlass": _C.has_cutlass(),
    }


# The one adapter API (peftcore.tuners.api) and every config class, imported lazily so `import peftcore` stays light.
_TUNER_NAMES = (
    "apply_adapter", "save_adapter", "load_adapter", "merge_adapter", "unmerge_adapter", "unload_adapter",
    "adapter_state", "adapter_methods", "LoadError",
    "SparseDeltaConfig", "S2FTConfig", "MonarchConfig", "OFTConfig", "BOFTConfig", "MissConfig", "SeerAttnConfig",
    "TokenElimConfig", "LoraConfig",
    "SparseDeltaLinear", "apply_sparse_delta",  # older top-level names
)


def __getattr__(name):
    if name in _TUNER_NAMES:
        from . import tuners

        return getattr(tuners, name)
    raise AttributeError(f"module 'peftcore' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_TUNER_NAMES))
