"""The token-eliminating forward of an HF Llama-style decoder layer (installed per layer by ``apply_token_elim``).

Per training step, in each eliminating layer:

1. score (no grad): ``q``, ``k`` of all tokens from the layer's own ``input_layernorm`` / ``q_proj`` / ``k_proj``
   with RoPE, then ``token_block_scores`` (attention received per 64-token key block, summed over heads and query
   blocks, flash style) and ``token_topk_blocks`` -> sorted ``keep_index [B, K]``. LeMo predicts these scores
   with small trained predictors; here the exact scores are computed without autograd (no activation memory,
   the q/k projections' flops once more on all tokens).
2. ``token_gather`` the kept tokens, ``input_layernorm``, the layer's own ``self_attn`` on them with RoPE at
   their original positions (``cos`` / ``sin`` gathered), causal over the kept sequence (sorted ``keep_index``:
   a kept token sees the kept tokens at earlier original positions), ``o_proj``.
3. ``token_scatter_add`` the result into the residual stream: dropped tokens ride the residual unchanged.
4. the MLP on every token, through ``token_mlp_partial_save`` when eligible (see ``TokenElimConfig``).

The layer's modules are called as they are, so LoRA (HF PEFT or peftcore) on ``q_proj`` / ``v_proj`` / ... works
unchanged. With a filled KV cache (generation) or outside training (unless ``eliminate_in_eval``) the original
forward runs; an empty cache (HF makes one in training forwards too) is left unfilled by the eliminating layers.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...ops.token_elim import token_block_scores, token_gather, token_mlp_partial_save, token_scatter_add, token_topk_blocks
from .config import TokenElimConfig


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rope(x, cos, sin):
    # x [B, H, L, D]; cos / sin [B|1, L, D] (HF Llama's rotate-half convention)
    return x * cos.unsqueeze(1) + _rotate_half(x) * sin.unsqueeze(1)


def keep_count(seq_len: int, cfg: TokenElimConfig) -> int:
    """Number of blocks kept for a sequence of ``seq_len`` tokens (static: it depends on shapes only)."""
    nb = -(-seq_len // cfg.block_size)
    return max(1, min(nb, int(round(cfg.keep_ratio * nb))))


@torch.no_grad()
def select_tokens(layer, hidden_states, position_embeddings, cfg: TokenElimConfig):
    """``keep_index [B, K]`` for one decoder layer's input (no autograd)."""
    attn = layer.self_attn
    B, L, _ = hidden_states.shape
    x = layer.input_layernorm(hidden_states)
    hd = attn.head_dim
    q = attn.q_proj(x).view(B, L, -1, hd).transpose(1, 2)
    k = attn.k_proj(x).view(B, L, -1, hd).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    scores = token_block_scores(q.contiguous(), k.contiguous(), cfg.block_size, True, float(attn.scaling))
    return token_topk_blocks(scores, keep_count(L, cfg), cfg.block_size, L, cfg.always_keep_first,
                             cfg.always_keep_last)


def _gather_mask(mask, keep):
    """[B|1, h, L, L] additive / bool mask -> the kept rows and columns [B, h, K, K]."""
    B, K = keep.shape
    m = mask.expand(B, mask.shape[1], mask.shape[2], mask.shape[3])
    m = torch.gather(m, 2, keep[:, None, :, None].expand(B, m.shape[1], K, m.shape[3]))
    return torch.gather(m, 3, keep[:, None, None, :].expand(B, m.shape[1], K, K))


def mlp_partial_eligible(mlp) -> bool:
    parts = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if any(type(p) is not nn.Linear for p in parts):
        return False
    if any(p.bias is not None or p.weight.requires_grad for p in parts):
        return False
    act = getattr(mlp, "act_fn", None)
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation" or act is F.silu


def run_mlp(mlp, x, ratio: float):
    if ratio >= 1.0 or not mlp_partial_eligible(mlp):
        return mlp(x)
    I = mlp.gate_proj.weight.shape[0]
    c = max(1, int(round(ratio * I)))
    return token_mlp_partial_save(x, mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight, c)


def token_elim_forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False,
                       position_embeddings=None, **kwargs):
    """Drop-in ``forward`` of a Llama-style decoder layer (bound to the layer by ``apply_token_elim``)."""
    cfg: TokenElimConfig = self._token_elim_config
    if "past_key_values" in kwargs and cache is None:
        cache = kwargs.pop("past_key_values")
    # HF creates a cache even in training forwards (config.use_cache): an empty one does not stop elimination (the
    # eliminating layers then leave their cache slot unfilled); a filled one (generation) does.
    empty_cache = cache is None or not hasattr(cache, "get_seq_length") or \
        cache.get_seq_length(getattr(self.self_attn, "layer_idx", 0) or 0) == 0  # this layer's slot
    active = (self.training or cfg.eliminate_in_eval) and empty_cache and position_embeddings is not None \
        and (attention_mask is None or isinstance(attention_mask, torch.Tensor))
    if not active:
        return self._token_elim_orig_forward(hidden_states, attention_mask=attention_mask, position_ids=position_ids,
                                             cache=cache, use_cache=use_cache,
                                             position_embeddings=position_embeddings, **kwargs)
    B, L, _ = hidden_states.shape
    if keep_count(L, cfg) * cfg.block_size >= L:  # every block kept (keep_ratio 1.0): no scoring
        keep = torch.arange(L, device=hidden_states.device).expand(B, L).contiguous()
    else:
        keep = select_tokens(self, hidden_states, position_embeddings, cfg)
    residual = hidden_states
    h = self.input_layernorm(token_gather(hidden_states, keep))
    cos, sin = position_embeddings
    cos_k = token_gather(cos.expand(B, *cos.shape[1:]), keep)
    sin_k = token_gather(sin.expand(B, *sin.shape[1:]), keep)
    mask_k = _gather_mask(attention_mask, keep) if attention_mask is not None else None
    h, _ = self.self_attn(hidden_states=h, attention_mask=mask_k, position_embeddings=(cos_k, sin_k), **kwargs)
    h = token_scatter_add(residual, h, keep)
    residual = h
    h = self.post_attention_layernorm(h)
    h = run_mlp(self.mlp, h, cfg.mlp_ratio)
    return residual + h
