"""Co-permutation of Llama-style decoder blocks (Llama / Mistral / Qwen2, grouped-query attention included).

A block computes ``o_proj(attn(q_proj x, k_proj x, v_proj x))`` and ``down_proj(act(gate_proj x) * up_proj x)``.
Reordering the heads of the attention (q rows, k/v rows, o columns) or the intermediate channels of the FFN
(gate/up rows, down columns) consistently leaves the block's function unchanged: attention, rotary embeddings
and q/k norms act within a head, the activation and the product act per channel.

Grouped-query attention: query head ``h`` reads kv head ``h // n_rep`` (HF ``repeat_kv``). So heads are moved
in whole *KV groups* (a kv head and its ``n_rep`` query heads): group ``g`` owns query heads
``[g*n_rep, (g+1)*n_rep)``, i.e. q rows / o columns ``[g*n_rep*hd, (g+1)*n_rep*hd)``, and k/v rows
``[g*hd, (g+1)*hd)``. Permuting groups keeps every query head with its kv head; with ``n_rep == 1`` a group is one
head, so plain multi-head attention gets head granularity.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .config import ATTN_PROJ, MLP_PROJ


@dataclass
class BlockInfo:
    name: str
    block: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def n_rep(self) -> int:
        return self.num_heads // self.num_kv_heads

    def proj(self, p: str) -> nn.Module:
        return getattr(self.block.self_attn if p in ATTN_PROJ else self.block.mlp, p)

    def proj_name(self, p: str) -> str:
        return f"{self.name}.{'self_attn' if p in ATTN_PROJ else 'mlp'}.{p}"


def _linear(m: nn.Module) -> nn.Linear:
    return m.get_base_layer() if hasattr(m, "get_base_layer") else m


def find_blocks(model: nn.Module) -> list[BlockInfo]:
    """Every Llama-style decoder block of ``model`` (``.self_attn.{q,k,v,o}_proj`` and
    ``.mlp.{gate,up,down}_proj``), in module order (= layer index in HF models)."""
    out = []
    for name, m in model.named_modules():
        attn, mlp = getattr(m, "self_attn", None), getattr(m, "mlp", None)
        if attn is None or mlp is None:
            continue
        if not all(hasattr(attn, p) for p in ATTN_PROJ) or not all(hasattr(mlp, p) for p in MLP_PROJ):
            continue
        q, k, o = _linear(attn.q_proj), _linear(attn.k_proj), _linear(attn.o_proj)
        hd = getattr(attn, "head_dim", None)
        if hd is None:
            cfg = getattr(attn, "config", None)
            if cfg is None:
                raise ValueError(f"find_blocks: {name}.self_attn has neither head_dim nor config")
            hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if q.out_features % hd or k.out_features % hd or o.in_features != q.out_features:
            raise ValueError(
                f"find_blocks: {name}: q_proj out {q.out_features}, k_proj out {k.out_features}, o_proj in "
                f"{o.in_features} do not fit head_dim {hd}"
            )
        nh, nkv = q.out_features // hd, k.out_features // hd
        if nh % nkv:
            raise ValueError(f"find_blocks: {name}: {nh} query heads are not a multiple of {nkv} kv heads")
        inter = _linear(mlp.gate_proj).out_features
        out.append(BlockInfo(name, m, nh, nkv, hd, inter))
    return out


def expand(units: torch.Tensor, size: int) -> torch.Tensor:
    """Unit indices -> the indices of their ``size`` consecutive elements (``[u*size, (u+1)*size)`` each)."""
    return (units.long()[:, None] * size + torch.arange(size, device=units.device)).reshape(-1)


def selected_first(selected: torch.Tensor, n: int) -> torch.Tensor:
    """A permutation of ``range(n)``: ``selected`` (sorted) first, then the rest in order."""
    selected = selected.long().sort().values
    rest = torch.ones(n, dtype=torch.bool)
    rest[selected] = False
    return torch.cat([selected, rest.nonzero().squeeze(1)])


def inverse(perm: torch.Tensor) -> torch.Tensor:
    return torch.argsort(perm)


@torch.no_grad()
def _take(lin: nn.Linear, dim: int, perm: torch.Tensor) -> None:
    """``W <- W.index_select(dim, perm)`` (and the bias, for rows) in place: same Parameter, same storage."""
    w = lin.weight
    w.copy_(w.index_select(dim, perm.to(w.device)))
    if dim == 0 and lin.bias is not None:
        lin.bias.copy_(lin.bias.index_select(0, perm.to(lin.bias.device)))


def permute_block(info: BlockInfo, group_perm: Optional[torch.Tensor], channel_perm: Optional[torch.Tensor]) -> None:
    """Reorder a block in place: new KV group ``i`` is old group ``group_perm[i]``, new channel ``j`` is old
    channel ``channel_perm[j]``. The block computes the same function. Works on wrapped projections
    (``get_base_layer``) too; a merged delta moves with its weight."""
    if group_perm is not None:
        q_rows = expand(group_perm, info.n_rep * info.head_dim)
        kv_rows = expand(group_perm, info.head_dim)
        _take(_linear(info.proj("q_proj")), 0, q_rows)
        _take(_linear(info.proj("k_proj")), 0, kv_rows)
        _take(_linear(info.proj("v_proj")), 0, kv_rows)
        _take(_linear(info.proj("o_proj")), 1, q_rows)
    if channel_perm is not None:
        _take(_linear(info.proj("gate_proj")), 0, channel_perm)
        _take(_linear(info.proj("up_proj")), 0, channel_perm)
        _take(_linear(info.proj("down_proj")), 1, channel_perm)


def unit_size(info: BlockInfo, proj: str) -> int:
    """How many rows/columns of ``proj`` one selection unit (KV group or channel) spans."""
    if proj in ("q_proj", "o_proj"):
        return info.n_rep * info.head_dim
    if proj in ("k_proj", "v_proj"):
        return info.head_dim
    return 1
