"""sparse_attn: block-sparse flash attention and the attention-map block pool (SeerAttention's gate target).

Shapes: ``q [B, Hq, Lq, D]``, ``k`` and ``v [B, Hkv, Lk, D]`` with ``Hq`` a multiple of ``Hkv`` (grouped-query /
multi-query attention: query head ``h`` uses key/value head ``h // (Hq // Hkv)``; k and v are never repeated).
Both sequence axes are cut into blocks of ``block_size`` tokens (the last block may be partial):
``Qb = ceil(Lq / block_size)``, ``Kb = ceil(Lk / block_size)``.

* ``block_mask`` — bool ``[B or 1, Hq or 1, Qb, Kb]`` (broadcast over batch / heads): query block ``I`` attends to
  key block ``J`` iff ``block_mask[..., I, J]``. Masked blocks are skipped entirely (no work, no memory).
* ``causal`` — additionally hides key ``j`` from query ``i`` when ``j > i + off``. ``causal_align="top_left"``
  (the default): ``off = 0``, exactly as ``F.scaled_dot_product_attention(is_causal=True)`` (also for
  ``Lq != Lk``). ``causal_align="bottom_right"``: ``off = Lk - Lq``, as FlashAttention >= 2.1 and
  Block-Sparse-Attention (the last query sees the last key: a KV-cache decode / chunked prefill with ``Lq < Lk``;
  with ``Lq > Lk`` the first ``Lq - Lk`` queries see nothing). The alignment only matters when ``causal``.
* ``scale`` — defaults to ``1 / sqrt(D)``; must be finite.

The result equals dense attention with the token-level mask the block mask (and causal) implies. A query row that
sees no key gets ``out = 0`` and ``lse = -inf`` (never NaN), and zero gradients.

NaN / inf (as ``F.scaled_dot_product_attention``): a NaN or inf in a query row, or in ``k`` of a key that row
sees, gives that row NaN ``out`` and ``lse``; a NaN / inf in ``v`` of a seen key reaches the row's output. Keys a row
does not see (masked blocks, causally hidden) do not touch it through ``q`` / ``k``; through ``v`` a hidden key
inside a computed tile may (``0 * NaN``, as in SDPA's own kernels). A row whose visible scores are all ``-inf``
counts as seeing nothing (``0`` / ``-inf``, as SDPA's safe softmax). :func:`attn_block_pool` gives NaN for every
block a NaN row sees.

Validation: every op checks dtypes, devices, shapes, ``block_size > 0``, the GQA ratio, ``scale`` (finite) and
``causal_align`` on CPU and CUDA alike (and its fake kernel checks the same); the backward op also checks
``grad_out`` / ``out`` (q's dtype and shape) and ``lse`` / ``grad_lse`` (the statistics dtype, ``[B, Hq, Lq]``).
Nothing is indexed by tensor values (the block mask is bool), so no check needs a host sync.

Autograd: ``block_sparse_attn`` is differentiable once (q, k, v; through ``out`` and ``lse``); double backward
is refused with an error naming the op. ``attn_block_pool``'s output never requires grad. ``lse [B, Hq, Lq]`` is the
log-sum-exp of the scaled scores over the visible keys, in float32 (float64 for float64 inputs); it is a
differentiable output too.

Dtypes: float16, bfloat16 and float32 on CPU and CUDA (CUDA: D in {64, 128, 256}), float64 on CPU (for
gradcheck); softmax statistics and accumulation in float32 (float64 for float64).

The backward (:func:`torch.ops.peftcore.block_sparse_attn_backward`) is flash style: P is recomputed tile by
tile from q, k and lse; autograd saves q, k, v, out, lse and the block mask, nothing of size ``[Lq, Lk]``.
dk / dv of a GQA group are summed over its query heads.

FlexAttention's CSR form. ``torch.nn.attention.flex_attention.BlockMask`` keeps, per (batch, head, query block),
``kv_num_blocks [B, H, Qb]`` int32 and ``kv_indices [B, H, Qb, Kb]`` int32 (the kept key blocks first, ascending).
:func:`dense_to_csr` and :func:`csr_to_dense` convert both ways, and :func:`block_sparse_attn` accepts a dense
mask, a ``(kv_num_blocks, kv_indices)`` pair or a ``BlockMask`` (its partial and full blocks together: only the
block structure is used, its ``mask_mod`` is not applied inside blocks — pass ``causal=True`` for causal masks,
with ``causal_align="bottom_right"`` when the ``mask_mod`` is ``q_idx + KV_LEN - Q_LEN >= kv_idx``).

:func:`attn_block_pool` returns ``[B, Hq, Qb, Kb]`` float32: entry ``[I, J]`` is the max, over the query rows of
block ``I`` and the keys of block ``J``, of the (causal if asked) softmax attention map over all visible keys —
SeerAttention's ground truth for its gate. Not differentiable (a training target).

CPU kernels are tiled and parallel (BLAS GEMMs on [bs, D] tiles, online softmax); CUDA kernels are
flash-attention-2 style (not yet verified on a GPU). On CUDA the forward and the backward of float16 / bfloat16 at
head dim 64 / 128 run on tensor cores (CuTe, mma.sync; 64 x 64 tiles over lists of kept tiles built on the device,
whatever the block size: per query tile for the forward and dq, per key tile for dk / dv, whose grid also splits a
GQA group's query heads when it is small); float32 and head dim 256 run on CUDA cores.
``PEFTCORE_SPARSE_ATTN_KERNEL=simt`` forces the CUDA-core kernels, ``=tc`` the tensor-core ones (or an error saying
why they cannot run). ``torch.ops.peftcore.sparse_attn_tc_plan(D, smem_bytes)``,
``sparse_attn_tc_bwd_plan(D, smem_bytes, B, Hkv, G, Lk, sm_count)``, ``sparse_attn_tc_tiles(...)`` and
``sparse_attn_tc_tiles_t(...)`` expose their configurations and kept-tile lists (CPU and CUDA).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._common import check_float, dtype_name, non_differentiable, refuse_double_backward, register_autograd

_lib = torch.ops.peftcore

__all__ = [
    "block_sparse_attn",
    "attn_block_pool",
    "dense_to_csr",
    "csr_to_dense",
    "block_mask_from_flex",
]


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# CSR conversion (FlexAttention's BlockMask layout).


def dense_to_csr(block_mask: torch.Tensor):
    """Dense bool ``[B, H, Qb, Kb]`` -> ``(kv_num_blocks [B, H, Qb] int32, kv_indices [B, H, Qb, Kb] int32)``.

    As FlexAttention orders them: per row the kept key blocks first, ascending, then the others (ignored).
    """
    torch._check(block_mask.dtype == torch.bool, lambda: f"dense_to_csr: block_mask must be bool, got {block_mask.dtype}")
    torch._check(block_mask.dim() == 4, lambda: f"dense_to_csr: block_mask must be 4-D, got {tuple(block_mask.shape)}")
    num = block_mask.sum(-1, dtype=torch.int32)
    idx = torch.argsort(block_mask.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num, idx.contiguous()


def csr_to_dense(kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor, num_kv_blocks: Optional[int] = None):
    """``(kv_num_blocks [B, H, Qb], kv_indices [B, H, Qb, n])`` -> dense bool ``[B, H, Qb, num_kv_blocks]``
    (``num_kv_blocks`` defaults to ``kv_indices.shape[-1]``). Entries of ``kv_indices`` past ``kv_num_blocks`` are
    ignored."""
    torch._check(kv_indices.dim() == 4 and kv_num_blocks.shape == kv_indices.shape[:3],
                 lambda: f"csr_to_dense: kv_num_blocks {tuple(kv_num_blocks.shape)} must be kv_indices "
                         f"{tuple(kv_indices.shape)} without its last dim")
    kb = kv_indices.shape[-1] if num_kv_blocks is None else int(num_kv_blocks)
    pos = torch.arange(kv_indices.shape[-1], device=kv_indices.device)
    valid = pos < kv_num_blocks.unsqueeze(-1)
    target = torch.where(valid, kv_indices.long(), kb)  # invalid slots go to a spill column
    dense = torch.zeros((*kv_indices.shape[:3], kb + 1), dtype=torch.bool, device=kv_indices.device)
    dense.scatter_(-1, target, True)
    return dense[..., :kb].contiguous()


def block_mask_from_flex(bm, block_size: Optional[int] = None) -> torch.Tensor:
    """Dense bool block mask of a FlexAttention ``BlockMask``: its partial and full blocks together (the
    ``mask_mod`` inside partial blocks is not represented). ``block_size`` must match the BlockMask's (square)."""
    q_bs, kv_bs = bm.BLOCK_SIZE
    torch._check(q_bs == kv_bs, lambda: f"block_sparse_attn: BlockMask must have square blocks, got {bm.BLOCK_SIZE}")
    torch._check(block_size is None or block_size == q_bs,
                 lambda: f"block_sparse_attn: block_size {block_size} differs from the BlockMask's {q_bs}")
    kb = bm.kv_indices.shape[-1]
    dense = csr_to_dense(bm.kv_num_blocks, bm.kv_indices, kb)
    if bm.full_kv_num_blocks is not None:
        dense = dense | csr_to_dense(bm.full_kv_num_blocks, bm.full_kv_indices, kb)
    return dense


# ---------------------------------------------------------------------------------------------------------------
# Documented wrappers (the ops themselves are torch.ops.peftcore.<name>).


def block_sparse_attn(q, k, v, block_mask=None, block_size: Optional[int] = None, causal: bool = False,
                      scale: Optional[float] = None, *, return_lse: bool = False, causal_align: str = "top_left"):
    """Block-sparse attention ``softmax(scale q k^T + mask) v``; see the module doc for shapes and semantics.

    ``block_mask``: a dense bool ``[B|1, Hq|1, Qb, Kb]`` tensor, a ``(kv_num_blocks, kv_indices)`` CSR pair, a
    FlexAttention ``BlockMask`` (then ``block_size`` defaults to its block size), or ``None`` (every block: dense
    attention, causal if asked). ``block_size`` defaults to 64 for the other forms. ``causal_align``:
    ``"top_left"`` (default, SDPA's ``is_causal``) or ``"bottom_right"`` (query ``i`` sees keys ``j <= i + Lk -
    Lq``: FlashAttention >= 2.1; use it for a KV-cache decode). Returns ``out`` (q's dtype) or, with
    ``return_lse``, ``(out, lse)``.
    """
    if block_mask is not None and hasattr(block_mask, "kv_num_blocks") and hasattr(block_mask, "BLOCK_SIZE"):
        block_size = block_size or block_mask.BLOCK_SIZE[0]
        block_mask = block_mask_from_flex(block_mask, block_size)
    block_size = 64 if block_size is None else int(block_size)
    qb, kb = -(-q.shape[2] // block_size), -(-k.shape[2] // block_size)
    if block_mask is None:
        block_mask = torch.ones((1, 1, qb, kb), dtype=torch.bool, device=q.device)
    elif isinstance(block_mask, (tuple, list)):
        block_mask = csr_to_dense(block_mask[0], block_mask[1], kb)
    out, lse = _lib.block_sparse_attn(q, k, v, block_mask, block_size, causal, scale, causal_align)
    return (out, lse) if return_lse else out


def attn_block_pool(q, k, block_size: int, causal: bool = False, scale: Optional[float] = None,
                    causal_align: str = "top_left"):
    """``[B, Hq, ceil(Lq/bs), ceil(Lk/bs)]`` float32: per (query block, key block) the max of the (causal if asked,
    aligned as ``causal_align``) softmax attention probabilities over the whole row of visible keys
    (SeerAttention's gate ground truth). Computed flash style (two passes per query tile, no ``[Lq, Lk]``
    buffer); not differentiable: the output never requires grad."""
    return _lib.attn_block_pool(q, k, block_size, causal, scale, causal_align)


# ---------------------------------------------------------------------------------------------------------------
# Fake kernels: the same shape / dtype / device checks (and messages) as the C++ ones (sparse_attn_cpu.cpp).


def _check_same(op, name, t, ref, ref_name="q"):
    torch._check(t.dtype == ref.dtype, lambda: f"{op}: {name} has dtype {dtype_name(t.dtype)} but {ref_name} has "
                                               f"{dtype_name(ref.dtype)}")
    torch._check(t.device == ref.device, lambda: f"{op}: {name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_qk(op, q, k, block_size, scale, causal_align):
    check_float(op, "q", q)
    torch._check(q.dim() == 4, lambda: f"{op}: q must be 4-D, got shape {list(q.shape)}")
    torch._check(k.dim() == 4, lambda: f"{op}: k must be 4-D, got shape {list(k.shape)}")
    check_float(op, "k", k)
    _check_same(op, "k", k, q)
    torch._check(k.shape[0] == q.shape[0], lambda: f"{op}: k must have batch size {q.shape[0]} (q is "
                                                   f"{list(q.shape)}), got k of shape {list(k.shape)}")
    torch._check(k.shape[3] == q.shape[3], lambda: f"{op}: k must have head dim {q.shape[3]} (q is "
                                                   f"{list(q.shape)}), got k of shape {list(k.shape)}")
    torch._check(q.shape[3] >= 1, lambda: f"{op}: head dim must be >= 1, got q of shape {list(q.shape)}")
    torch._check(k.shape[1] >= 1 and q.shape[1] % max(k.shape[1], 1) == 0,
                 lambda: f"{op}: the query heads must be a multiple of the key/value heads (Hq % Hkv == 0), got "
                         f"Hq = {q.shape[1]} and Hkv = {k.shape[1]}")
    torch._check(block_size > 0, lambda: f"{op}: block_size must be > 0, got {block_size}")
    torch._check(causal_align in ("top_left", "bottom_right"),
                 lambda: f'{op}: causal_align must be "top_left" or "bottom_right", got "{causal_align}"')
    torch._check(scale is None or math.isfinite(scale), lambda: f"{op}: scale must be finite, got {scale}")


def _check_attn(op, q, k, v, block_mask, block_size, scale, causal_align):
    _check_qk(op, q, k, block_size, scale, causal_align)
    check_float(op, "v", v)
    _check_same(op, "v", v, q)
    torch._check(v.shape == k.shape, lambda: f"{op}: v must have k's shape {list(k.shape)}, got {list(v.shape)}")
    torch._check(block_mask.dtype == torch.bool, lambda: f"{op}: block_mask must be bool, got "
                                                         f"{dtype_name(block_mask.dtype)}")
    torch._check(block_mask.device == q.device,
                 lambda: f"{op}: block_mask is on {block_mask.device} but q is on {q.device}")
    B, Hq, Lq = q.shape[:3]
    qb, kb = (Lq + block_size - 1) // block_size, (k.shape[2] + block_size - 1) // block_size
    m = block_mask
    torch._check(m.dim() == 4 and (m.shape[0] == 1 or m.shape[0] == B) and (m.shape[1] == 1 or m.shape[1] == Hq)
                 and m.shape[2] == qb and m.shape[3] == kb,
                 lambda: f"{op}: block_mask must have shape [{B} or 1, {Hq} or 1, {qb}, {kb}] (ceil(Lq / "
                         f"block_size), ceil(Lk / block_size) for Lq = {Lq}, Lk = {k.shape[2]}, block_size = "
                         f"{block_size}), got {list(m.shape)}")


@torch.library.register_fake("peftcore::block_sparse_attn")
def _(q, k, v, block_mask, block_size, causal=False, scale=None, causal_align="top_left"):
    _check_attn("block_sparse_attn", q, k, v, block_mask, block_size, scale, causal_align)
    out = q.new_empty(q.shape)
    lse = q.new_empty(q.shape[:3], dtype=_stat_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("peftcore::block_sparse_attn_backward")
def _(grad_out, grad_lse, q, k, v, out, lse, block_mask, block_size, causal, scale, output_mask,
      causal_align="top_left"):
    op = "block_sparse_attn_backward"
    _check_attn(op, q, k, v, block_mask, block_size, scale, causal_align)
    for name, t in (("grad_out", grad_out), ("out", out)):
        _check_same(op, name, t, q)
        torch._check(t.shape == q.shape, lambda: f"{op}: {name} must have q's shape {list(q.shape)}, got "
                                                 f"{list(t.shape)}")
    st = _stat_dtype(q.dtype)
    for name, t in (("lse", lse), ("grad_lse", grad_lse)):
        if t is None:
            continue
        torch._check(t.dtype == st, lambda: f"{op}: {name} must be {dtype_name(st)} for q of dtype "
                                            f"{dtype_name(q.dtype)}, got {dtype_name(t.dtype)}")
        torch._check(t.device == q.device, lambda: f"{op}: {name} is on {t.device} but q is on {q.device}")
        torch._check(t.shape == q.shape[:3], lambda: f"{op}: {name} must have shape {list(q.shape[:3])}, got "
                                                     f"{list(t.shape)}")
    dq = q.new_empty(q.shape) if output_mask[0] else q.new_empty((0,))
    dk = k.new_empty(k.shape) if output_mask[1] else k.new_empty((0,))
    dv = v.new_empty(v.shape) if output_mask[2] else v.new_empty((0,))
    return dq, dk, dv


@torch.library.register_fake("peftcore::attn_block_pool")
def _(q, k, block_size, causal=False, scale=None, causal_align="top_left"):
    _check_qk("attn_block_pool", q, k, block_size, scale, causal_align)
    qb = (q.shape[2] + block_size - 1) // block_size
    kb = (k.shape[2] + block_size - 1) // block_size
    return q.new_empty((q.shape[0], q.shape[1], qb, kb), dtype=_stat_dtype(q.dtype))


def _fake_tc_tiles(op, transposed, block_mask, q_len, k_len, block_size, causal, causal_align, tile_m, tile_n):
    torch._check(causal_align in ("top_left", "bottom_right"),
                 lambda: f'{op}: causal_align must be "top_left" or "bottom_right", got "{causal_align}"')
    torch._check(block_mask.dtype == torch.bool, lambda: f"{op}: block_mask must be bool, got "
                                                         f"{dtype_name(block_mask.dtype)}")
    torch._check(q_len >= 0 and k_len >= 0, lambda: f"{op}: q_len and k_len must be >= 0, got {q_len} and {k_len}")
    torch._check(block_size > 0, lambda: f"{op}: block_size must be > 0, got {block_size}")
    torch._check(1 <= tile_m <= 1024 and 1 <= tile_n <= 1024,
                 lambda: f"{op}: tile_m and tile_n must be in [1, 1024], got {tile_m} and {tile_n}")
    qb, kb = -(-q_len // block_size), -(-k_len // block_size)
    torch._check(block_mask.dim() == 4 and block_mask.shape[2] == qb and block_mask.shape[3] == kb,
                 lambda: f"{op}: block_mask must have shape [Bm, Hm, {qb}, {kb}], got {list(block_mask.shape)}")
    mt, nt = -(-q_len // tile_m), -(-k_len // tile_n)
    if transposed:
        mt, nt = nt, mt
    bm, hm = block_mask.shape[:2]
    return (block_mask.new_empty((bm, hm, mt), dtype=torch.int32),
            block_mask.new_empty((bm, hm, mt, nt), dtype=torch.int32))


@torch.library.register_fake("peftcore::sparse_attn_tc_tiles")
def _(block_mask, q_len, k_len, block_size, causal, causal_align, tile_m, tile_n):
    return _fake_tc_tiles("sparse_attn_tc_tiles", False, block_mask, q_len, k_len, block_size, causal, causal_align,
                          tile_m, tile_n)


@torch.library.register_fake("peftcore::sparse_attn_tc_tiles_t")
def _(block_mask, q_len, k_len, block_size, causal, causal_align, tile_m, tile_n):
    return _fake_tc_tiles("sparse_attn_tc_tiles_t", True, block_mask, q_len, k_len, block_size, causal,
                          causal_align, tile_m, tile_n)


# ---------------------------------------------------------------------------------------------------------------
# Autograd: saves q, k, v, out, lse and the block mask; the backward is another op, so it traces too. The backward
# op itself refuses to be differentiated (no double backward); attn_block_pool is a training target.


def _attn_setup(ctx, inputs, output):
    q, k, v, block_mask, block_size, causal, scale, causal_align = inputs
    out, lse = output
    ctx.block_size, ctx.causal, ctx.scale, ctx.causal_align = block_size, causal, scale, causal_align
    ctx.save_for_backward(q, k, v, out, lse, block_mask)


def _attn_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, block_mask = ctx.saved_tensors
    need = ctx.needs_input_grad[:3]
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _lib.block_sparse_attn_backward(grad_out, grad_lse, q, k, v, out, lse, block_mask, ctx.block_size,
                                                 ctx.causal, ctx.scale, list(need), ctx.causal_align)
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None, None, None, None, None, None)


register_autograd("peftcore::block_sparse_attn", _attn_backward, setup_context=_attn_setup)
refuse_double_backward("block_sparse_attn_backward", "block_sparse_attn")
non_differentiable("attn_block_pool", "a block max-pool of the softmax map, used as a training target")
