"""MiSS (matrix shard sharing, HF PEFT's MiSS / Bone successor): one trainable block shared by every chunk of the
input, trained through peftcore's ``miss_fold``. Apply / merge / save / load through :mod:`peftcore.tuners`."""
from .. import _adapters
from .config import MissConfig
from .layer import MissLinear

_adapters.register_adapter(MissConfig, MissLinear)

__all__ = ["MissConfig", "MissLinear"]
