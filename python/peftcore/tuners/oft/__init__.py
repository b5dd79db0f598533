"""OFT (orthogonal fine-tuning) on peftcore's orthogonal ops: Cayley / Neumann blocks from OFT's packed skew
parameters and the block-diagonal rotation of the activations (a one-factor :func:`boft_apply`)."""
from .layer import OFTLinear

__all__ = ["OFTLinear"]
