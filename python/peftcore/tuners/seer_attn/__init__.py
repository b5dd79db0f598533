"""SeerAttention (Gao et al., 2024): a small learned gate per attention layer predicts which key blocks each query
block needs; attention then runs block-sparse (``peftcore.ops.sparse_attn.block_sparse_attn``). The gate is trained
by self-distillation against the frozen attention's block max-pool (``attn_block_pool``), the LM unchanged.

Covers the gate (pooling, per-head projections with GQA-shared key heads, block RoPE), threshold / top-k /
keep-ratio masks, the distillation loss, a module swap for HF Llama-style models (Llama, Mistral, Qwen2, GQA),
distill / sparse / dense modes, removal, and safetensors save / load of the gates.
"""
from .config import SeerAttnConfig
from .gate import (
    AttnGate,
    block_mask_from_scores,
    block_visibility,
    pool_blocks,
    seer_distill_loss,
    seer_distill_target,
)
from .model import (
    SeerAttention,
    apply_seer_attention,
    load_seer_gates,
    remove_seer_attention,
    save_seer_gates,
    seer_gate_parameters,
    seer_gate_state,
    seer_layers,
    seer_loss,
    seer_sparsity,
    set_seer_mode,
)

__all__ = [
    "AttnGate",
    "SeerAttention",
    "SeerAttnConfig",
    "apply_seer_attention",
    "block_mask_from_scores",
    "block_visibility",
    "load_seer_gates",
    "pool_blocks",
    "remove_seer_attention",
    "save_seer_gates",
    "seer_distill_loss",
    "seer_distill_target",
    "seer_gate_parameters",
    "seer_gate_state",
    "seer_layers",
    "seer_loss",
    "seer_sparsity",
    "set_seer_mode",
]
