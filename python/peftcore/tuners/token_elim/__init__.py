"""Token elimination (LeMo, published as Jenga): in most decoder layers only the informative 64-token blocks go
through attention; the MLP saves only its top intermediate channels for backward. See ``layer.py``."""
from .config import TokenElimConfig
from .layer import keep_count, mlp_partial_eligible, select_tokens, token_elim_forward
from .model import apply_token_elim, decoder_layers, remove_token_elim

__all__ = [
    "TokenElimConfig",
    "apply_token_elim",
    "decoder_layers",
    "keep_count",
    "mlp_partial_eligible",
    "remove_token_elim",
    "select_tokens",
    "token_elim_forward",
]
