"""BOFT (butterfly orthogonal fine-tuning) on peftcore's orthogonal ops: the rotation is applied to the activations
as a butterfly chain (:func:`peftcore.ops.orthogonal.boft_apply`), never as a ``d x d`` matrix."""
from .layer import BOFTLinear

__all__ = ["BOFTLinear"]
