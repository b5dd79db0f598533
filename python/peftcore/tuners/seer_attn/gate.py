"""SeerAttention's AttnGate, its block-mask selection and its distillation loss.

Shapes: pre-RoPE ``q [B, Hq, L, D]``, ``k [B, Hkv, L, D]`` (``Hq`` a multiple of ``Hkv``: query head ``h`` reads
kv head ``h // (Hq/Hkv)``); blocks of ``block_size`` tokens, the last one partial: ``nb = ceil(L / bs)``.

The gate (SeerAttention, Gao et al. 2024):

1. pool each block of q over its tokens (``q_pooling``, default avg) and of k (``k_pooling``, default max, min
   and avg, concatenated along channels): ``[B, H, nb, P*D]`` (a partial last block pools its real tokens only);
2. per-head linear projections to ``Dg`` channels: q per query head (``[Hq, Pq*D, Dg]``), k per kv head
   (``[Hkv, Pk*D, Dg]``, shared by the query heads of its GQA group, never repeated);
3. RoPE on the pooled blocks at the position of each block's first token (``Dg``-dim rotary, base ``theta``);
4. ``logits[b, h, I, J] = <q_I, k_J> / sqrt(Dg)``, ``-inf`` where key block ``J`` is invisible from query block
   ``I`` (``J > I`` when causal); ``scores = softmax(logits)`` over key blocks.

Block mask (:func:`block_mask_from_scores`): threshold (``score >= t``), top-k or keep-ratio per query block,
restricted to visible blocks; the diagonal block (causal) or the row's best block (not causal), and block 0 with
``keep_first_block``, are always kept, so no query block is left without keys.

Distillation (:func:`seer_distill_target`, :func:`seer_distill_loss`): the target is
``T = attn_block_pool(q_rope, k_rope, bs, causal, scale)`` (block max-pool of the frozen attention's softmax map,
computed from the real post-RoPE q / k, no grad), normalised per query block over the key blocks:
``T[I, :] /= sum_J T[I, J]`` (invisible blocks are 0). The loss is ``KL(T || softmax(logits))`` per (batch,
head, query block), ``sum_J T log(T / P)`` with ``0 log 0 = 0``, averaged over batch, heads and the query blocks
``I >= floor(skip_fraction * Qb)``. SeerAttention uses ``nn.KLDivLoss()`` (mean over all ``Qb*Kb`` entries, so
its loss is ours divided by ``Kb``) and skips the first quarter of the query blocks.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...ops.sparse_attn import attn_block_pool
from .config import POOLINGS, check_selection

__all__ = [
    "AttnGate",
    "block_mask_from_scores",
    "block_visibility",
    "pool_blocks",
    "seer_distill_loss",
    "seer_distill_target",
]


def pool_blocks(x: torch.Tensor, block_size: int, kinds: Sequence[str]) -> torch.Tensor:
    """``x [B, H, L, D]`` -> ``[B, H, ceil(L/bs), len(kinds)*D]``: per block of tokens the avg / max / min over its
    (real) tokens, concatenated along the channels in the order of ``kinds``."""
    B, H, L, D = x.shape
    nb = -(-L // block_size)
    pad = nb * block_size - L
    out = []
    for kind in kinds:
        if kind == "avg":
            s = F.pad(x, (0, 0, 0, pad)).view(B, H, nb, block_size, D).sum(3)
            count = torch.full((nb,), float(block_size), dtype=x.dtype, device=x.device)
            count[-1] = block_size - pad
            out.append(s / count[:, None])
        elif kind in ("max", "min"):
            fill = float("-inf") if kind == "max" else float("inf")
            xp = F.pad(x, (0, 0, 0, pad), value=fill).view(B, H, nb, block_size, D)
            out.append(xp.amax(3) if kind == "max" else xp.amin(3))
        else:
            raise ValueError(f"pool_blocks: unknown pooling {kind!r}, expected one of {POOLINGS}")
    return torch.cat(out, dim=-1)


def block_visibility(qb: int, kb: int, causal: bool, device=None) -> torch.Tensor:
    """``[Qb, Kb]`` bool: whether query block ``I`` can see any key of block ``J`` (``J <= I`` when causal, top-left
    aligned as ``block_sparse_attn``; everything otherwise)."""
    vis = torch.ones(qb, kb, dtype=torch.bool, device=device)
    return vis.tril_() if causal else vis


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _block_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE of ``x [B, H, nb, Dg]`` at ``positions [B or 1, nb]`` (HF Llama's convention)."""
    freqs = positions.to(inv_freq.dtype)[..., None] * inv_freq  # [B, nb, Dg/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, nb, Dg]
    return x * emb.cos().to(x.dtype) + _rotate_half(x) * emb.sin().to(x.dtype)


def block_mask_from_scores(
    scores: torch.Tensor,
    method: str = "threshold",
    threshold: Optional[float] = None,
    top_k: Optional[int] = None,
    keep_ratio: Optional[float] = None,
    causal: bool = True,
    keep_first_block: bool = False,
) -> torch.Tensor:
    """Gate scores ``[..., Qb, Kb]`` -> bool block mask of the same shape (see the module doc).

    * ``"threshold"``: visible blocks with ``score >= threshold`` (so ``threshold=0`` keeps every visible block),
      plus the forced blocks.
    * ``"top_k"``: per query block the ``min(top_k, visible)`` visible blocks with the highest scores, the forced
      blocks ranked first (they count toward ``top_k``; all of them are kept even if ``top_k`` is smaller).
    * ``"keep_ratio"``: as top-k with ``k = ceil(keep_ratio * visible blocks of the row)``.

    Forced blocks: the diagonal when causal, else the row's highest-scoring block; block 0 with
    ``keep_first_block``. Invisible blocks (``J > I`` when causal) are never kept.
    """
    check_selection("block_mask_from_scores", method, threshold, top_k, keep_ratio)
    qb, kb = scores.shape[-2:]
    vis = block_visibility(qb, kb, causal, scores.device)
    if causal:
        forced = torch.eye(qb, kb, dtype=torch.bool, device=scores.device).expand(scores.shape)
    else:
        forced = F.one_hot(scores.argmax(-1), kb).bool()
    if keep_first_block:
        first = torch.zeros(kb, dtype=torch.bool, device=scores.device)
        first[0] = True
        forced = forced | first
    forced = forced & vis
    if method == "threshold":
        return ((scores >= threshold) & vis) | forced
    nvis = vis.sum(-1)  # [Qb]
    if method == "top_k":
        k_row = nvis.clamp(max=int(top_k))
    else:
        k_row = torch.ceil(nvis.to(torch.float64) * keep_ratio).long().clamp(1)
        k_row = torch.minimum(k_row, nvis)
    ranked = scores.float().masked_fill(forced, float("inf")).masked_fill(~vis, float("-inf"))
    order = torch.argsort(ranked, dim=-1, descending=True, stable=True)
    rank = torch.argsort(order, dim=-1)
    return ((rank < k_row[:, None]) & vis) | forced


def seer_distill_target(q: torch.Tensor, k: torch.Tensor, block_size: int, causal: bool = True,
                        scale: Optional[float] = None) -> torch.Tensor:
    """The gate's training target ``[B, Hq, Qb, Kb]`` float32 from the real post-RoPE ``q`` / ``k``: the block
    max-pool of the attention map (``attn_block_pool``) normalised to sum 1 per query block. No gradient."""
    with torch.no_grad():
        t = attn_block_pool(q.detach(), k.detach(), block_size, causal, scale).float()
        return t / t.sum(-1, keepdim=True).clamp_min(torch.finfo(t.dtype).tiny)


def seer_distill_loss(logits: torch.Tensor, target: torch.Tensor, causal: bool = True,
                      skip_fraction: float = 0.0) -> torch.Tensor:
    """``mean over (b, h, I >= floor(skip_fraction*Qb)) of sum_J T log(T / softmax(logits))`` (0 log 0 = 0);
    invisible blocks (``J > I`` when causal) are left out of the softmax and of the sum."""
    qb, kb = logits.shape[-2:]
    vis = block_visibility(qb, kb, causal, logits.device)
    logp = torch.log_softmax(logits.float().masked_fill(~vis, float("-inf")), dim=-1)
    t = target.float()
    pos = (t > 0) & vis
    # where() keeps both branches finite: masked-out log terms are replaced before the product.
    kl = torch.where(pos, t * (torch.log(torch.where(pos, t, 1.0)) - logp.masked_fill(~pos, 0.0)), 0.0).sum(-1)
    start = int(math.floor(skip_fraction * qb))
    return kl[..., start:, ].mean()


class AttnGate(nn.Module):
    """SeerAttention's gate for one attention layer (see the module doc).

    ``forward(q, k, position_ids=None)`` takes the layer's *pre-RoPE* ``q [B, Hq, L, D]`` and ``k [B, Hkv, L, D]``
    and returns ``scores [B, Hq, Qb, Kb]`` (softmax over key blocks, 0 where invisible); :meth:`logits` returns
    the pre-softmax values (``-inf`` where invisible); :meth:`to_block_mask` turns scores into a bool block mask
    with the gate's selection rule. ``position_ids [B or 1, L]`` are the tokens' positions (default ``arange``);
    block ``I`` sits at the position of its first token.
    """

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int = 64,
        hidden_dim: Optional[int] = None,
        q_pooling: Sequence[str] = ("avg",),
        k_pooling: Sequence[str] = ("max", "min", "avg"),
        rope_theta: float = 10000.0,
        causal: bool = True,
        method: str = "threshold",
        threshold: Optional[float] = 5e-3,
        top_k: Optional[int] = None,
        keep_ratio: Optional[float] = None,
        keep_first_block: bool = False,
        init: str = "identity",
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"AttnGate: num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}")
        hidden_dim = head_dim if hidden_dim is None else int(hidden_dim)
        if hidden_dim % 2:
            raise ValueError(f"AttnGate: hidden_dim must be even (RoPE), got {hidden_dim}")
        check_selection("AttnGate", method, threshold, top_k, keep_ratio)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.block_size, self.hidden_dim, self.causal = int(block_size), hidden_dim, causal
        self.q_pooling, self.k_pooling = list(q_pooling), list(k_pooling)
        self.method, self.threshold, self.top_k, self.keep_ratio = method, threshold, top_k, keep_ratio
        self.keep_first_block = keep_first_block
        self.rope_theta = float(rope_theta)
        self.scale = hidden_dim ** -0.5
        kw = dict(dtype=dtype, device=device)
        self.q_weight = nn.Parameter(torch.empty(num_heads, len(self.q_pooling) * head_dim, hidden_dim, **kw))
        self.k_weight = nn.Parameter(torch.empty(num_kv_heads, len(self.k_pooling) * head_dim, hidden_dim, **kw))
        exponent = torch.arange(0, hidden_dim, 2, dtype=torch.float64, device=device) / hidden_dim
        self.register_buffer("inv_freq", (1.0 / self.rope_theta ** exponent).to(dtype), persistent=False)
        self.reset_parameters(init)

    @classmethod
    def from_config(cls, config, num_heads: int, num_kv_heads: int, head_dim: int, rope_theta: float = 10000.0,
                    device=None) -> "AttnGate":
        return cls(num_heads, num_kv_heads, head_dim, config.block_size, config.gate_hidden_dim, config.q_pooling,
                   config.k_pooling, config.gate_rope_theta or rope_theta, config.causal, config.method,
                   config.threshold, config.top_k, config.keep_ratio, config.keep_first_block, config.gate_init,
                   config.torch_gate_dtype, device)

    @torch.no_grad()
    def reset_parameters(self, init: str = "identity") -> None:
        """``"identity"``: ``I`` on the first ``min(D, Dg)`` channels of the avg-pooled slot (the first slot if
        there is no avg), zero elsewhere; ``"normal"``: N(0, 1/fan_in)."""
        for w, kinds in ((self.q_weight, self.q_pooling), (self.k_weight, self.k_pooling)):
            if init == "normal":
                w.normal_(0.0, w.shape[1] ** -0.5)
            elif init == "identity":
                w.zero_()
                slot = kinds.index("avg") if "avg" in kinds else 0
                m = min(self.head_dim, self.hidden_dim)
                w[:, slot * self.head_dim: slot * self.head_dim + m, :m] = torch.eye(m, dtype=w.dtype, device=w.device)
            else:
                raise ValueError(f"AttnGate: init must be 'identity' or 'normal', got {init!r}")

    def _positions(self, position_ids, L, device):
        if position_ids is None:
            return (torch.arange(0, L, self.block_size, device=device))[None]
        return position_ids[..., :: self.block_size]

    def logits(self, q: torch.Tensor, k: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``[B, Hq, Qb, Kb]`` gate logits in the gate's dtype, ``-inf`` where the key block is invisible."""
        B, Hq, Lq, D = q.shape
        Hkv, Lk = k.shape[1], k.shape[2]
        if Hq != self.num_heads or Hkv != self.num_kv_heads or D != self.head_dim or k.shape[3] != D:
            raise ValueError(f"AttnGate: expected q [B, {self.num_heads}, L, {self.head_dim}] and k "
                             f"[B, {self.num_kv_heads}, L, {self.head_dim}], got {tuple(q.shape)}, {tuple(k.shape)}")
        w = self.q_weight
        qp = pool_blocks(q.to(w.dtype), self.block_size, self.q_pooling) @ self.q_weight[None]  # [B, Hq, Qb, Dg]
        kp = pool_blocks(k.to(w.dtype), self.block_size, self.k_pooling) @ self.k_weight[None]  # [B, Hkv, Kb, Dg]
        if position_ids is not None and Lq != Lk:
            raise ValueError("AttnGate: position_ids are only supported for self-attention (Lq == Lk)")
        qp = _block_rope(qp, self._positions(position_ids, Lq, q.device), self.inv_freq)
        kp = _block_rope(kp, self._positions(position_ids, Lk, k.device), self.inv_freq)
        qb, kb = qp.shape[2], kp.shape[2]
        n_rep = Hq // Hkv
        s = qp.reshape(B, Hkv, n_rep * qb, -1) @ kp.transpose(-1, -2)  # GQA: k heads shared, never repeated
        s = s.view(B, Hq, qb, kb) * self.scale
        return s.masked_fill(~block_visibility(qb, kb, self.causal, s.device), float("-inf"))

    def forward(self, q: torch.Tensor, k: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.softmax(self.logits(q, k, position_ids), dim=-1)

    def to_block_mask(self, scores: torch.Tensor) -> torch.Tensor:
        """Bool ``[B, Hq, Qb, Kb]`` block mask from ``scores`` by this gate's rule (:func:`block_mask_from_scores`)."""
        return block_mask_from_scores(scores, self.method, self.threshold, self.top_k, self.keep_ratio, self.causal,
                                      self.keep_first_block)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"hidden={self.hidden_dim}, block={self.block_size}, q_pool={self.q_pooling}, "
                f"k_pool={self.k_pooling}, method={self.method}")
