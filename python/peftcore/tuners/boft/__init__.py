"""BOFT (butterfly orthogonal fine-tuning) on peftcore's orthogonal ops: the rotation is applied to the activations
as a butterfly chain (:func:`peftcore.ops.orthogonal.boft_apply`), never as a ``d x d`` matrix. Apply / merge /
save / load through :mod:`peftcore.tuners`."""
from .. import _adapters
from .config import BOFTConfig
from .layer import BOFTLinear

_adapters.register_adapter(BOFTConfig, BOFTLinear)

__all__ = ["BOFTConfig", "BOFTLinear"]
