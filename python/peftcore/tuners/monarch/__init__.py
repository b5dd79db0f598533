"""Monarch adapter: the weight update is a Monarch matrix (two block-diagonal factors with a stride permutation
between them, fly's ``blockdiag_butterfly_multiply``) beside the frozen linear, trained through peftcore's fused
``monarch_matmul``. Apply / merge / save / load through :mod:`peftcore.tuners` (``apply_adapter`` etc.)."""
from .. import _adapters
from .config import MonarchConfig
from .layer import MonarchLinear

_adapters.register_adapter(MonarchConfig, MonarchLinear)

__all__ = ["MonarchConfig", "MonarchLinear"]
