"""OFT (orthogonal fine-tuning) on peftcore's orthogonal ops: Cayley / Cayley-Neumann blocks, the rotation applied
block by block to the activations. Apply / merge / save / load through :mod:`peftcore.tuners`."""
from .. import _adapters
from .config import OFTConfig
from .layer import OFTLinear

_adapters.register_adapter(OFTConfig, OFTLinear)

__all__ = ["OFTConfig", "OFTLinear"]
