"""token_elim: LeMo / Jenga token elimination — only informative tokens go through a layer's attention block.

Ops (``torch.ops.peftcore.*``; CPU and CUDA kernels, fake kernels, autograd):

* :func:`token_gather` ``(x [B, L, *], keep_index [B, K]) -> [B, K, *]`` — the kept tokens' rows.
* :func:`token_scatter_add` ``(residual [B, L, *], src [B, K, *], keep_index) -> residual`` with ``src`` added at
  the kept rows (out of place): the attention result goes back into the residual stream, dropped tokens ride the
  residual unchanged. The two are each other's adjoint: ``token_gather``'s backward is ``token_scatter_add`` into
  zeros, ``token_scatter_add``'s is ``(grad, token_gather(grad))``.
* :func:`token_block_scores` ``(q [B, H, L, D], k, block_size, causal, scale) -> [B, Kb]`` float32 — the
  attention each key block receives: ``attn_block_pool``'s block max-pooled softmax map (sparse_attn family,
  flash style, no ``[L, L]`` buffer) summed over heads and query blocks ("column sums of the pooled map").
  Not differentiable (a selection signal).
* :func:`token_mlp_partial_save` — a frozen LlamaMLP ``down(silu(gate(x)) * up(x))`` whose forward is exact and
  whose backward keeps only ``c`` intermediate channels: autograd saves the gate / up pre-activations of those
  channels (``2 c`` values per token instead of the ``3 I`` a plain MLP with frozen weights saves) and the
  gradient to ``x`` flows through them only — LeMo's approximation, ``dL/dx`` restricted to the kept channels.
  The channels are ``channel_index`` when given, else the ``c`` largest by ``sum_t |silu(g) u|`` over the call's
  tokens.

keep_index: int64 ``[B, K]``, each row sorted ascending and unique, in ``[0, L)``. **K is static**: it is
``keep_index.shape[1]``, fixed by the keep ratio and the sequence length (:func:`token_topk_blocks` always returns
``keep_blocks`` whole blocks), so every output size follows from input shapes; the fake kernels have no
data-dependent sizes, torch.compile needs no unbacked symbols, CUDA needs no host sync. Sorted rows mean plain
causal attention over the kept sequence is causal over the original positions.

Validation. Every op (the backward op included) checks the shapes, dtypes and devices of all its arguments on
every backend and in the fake kernels. On CPU the ops also check the index values: ``keep_index`` rows sorted
ascending, unique, in ``[0, L)``; ``channel_index`` sorted, unique, in ``[0, I)``. On CUDA index values are not
read on the host (that would sync): a ``keep_index`` entry outside ``[0, L)`` is skipped (its row gathered as 0,
never scattered), a ``channel_index`` entry outside ``[0, I)`` is gathered as 0 and clamped for the backward's
weight gathers; unsorted or repeated entries give wrong numbers (repeated rows race in the scatter-add) but
never an access outside a buffer. Check indices built outside :func:`token_topk_blocks` on the CPU (or with
``token_gather`` on a CPU copy) before handing them to CUDA.

Differentiability. ``token_gather`` and ``token_scatter_add`` are linear and each other's adjoint: derivatives
of any order are exact (tested with ``gradgradcheck``). ``token_mlp_partial_save``'s backward op
``token_mlp_partial_save_backward`` refuses to be differentiated again (an error naming the op, instead of
silently wrong second derivatives). ``token_block_scores`` and ``token_topk_blocks`` are selection signals: their
outputs never require grad.

Selection (:func:`token_topk_blocks`) is a Python helper: ``torch.topk`` over block scores, the first / last
block forced in, then the kept blocks' token indices in order. A NaN score ranks above every finite one
(``torch.topk``'s order).

CUDA kernels. The row gather / scatter-add and the MLP's elementwise and channel-gather kernels move 16 bytes per
access when their buffers are 16-byte aligned and the row width is a multiple of 16 / element size (else one
element), with blocks of rows x features sized to the width;
``torch.ops.peftcore.token_elim_vec_plan(rows, width, elem_size, addresses)`` returns the launch the CUDA
launcher picks (host planning, checked on CPU by the tests).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._common import non_differentiable, refuse_double_backward, register_autograd, same_device

_lib = torch.ops.peftcore

__all__ = [
    "token_gather",
    "token_scatter_add",
    "token_block_scores",
    "token_topk_blocks",
    "token_mlp_partial_save",
]


# ---------------------------------------------------------------------------------------------------------------
# Documented wrappers.


def token_gather(x, keep_index):
    """``x[b, keep_index[b]]`` for ``x [B, L, *]``, ``keep_index [B, K]`` -> ``[B, K, *]`` (differentiable)."""
    return _lib.token_gather(x, keep_index)


def token_scatter_add(residual, src, keep_index):
    """``residual`` with ``src [B, K, *]`` added at the rows ``keep_index`` (out of place, differentiable)."""
    return _lib.token_scatter_add(residual, src, keep_index)


def token_block_scores(q, k, block_size: int = 64, causal: bool = True, scale: Optional[float] = None):
    """``[B, ceil(L / block_size)]`` float32: the attention each key block receives (see the module doc)."""
    return _lib.token_block_scores(q, k, block_size, causal, scale)


def token_topk_blocks(scores, keep_blocks: int, block_size: int, seq_len: int, always_keep_first: bool = True,
                      always_keep_last: bool = True):
    """Sorted ``keep_index [B, K]`` (int64) of the ``keep_blocks`` best-scoring blocks' tokens.

    ``scores [B, Kb]`` from :func:`token_block_scores`. The first / last block are kept when asked (LeMo keeps
    the attention sink and the most recent tokens). A partial last block (``seq_len % block_size != 0``) is
    either forced in (``always_keep_last``) or never picked, so ``K`` is static:
    ``K = sum of the kept blocks' lengths``, known from the arguments alone. ``keep_blocks`` must lie in
    ``[1, Kb]``. The result is an int64 index (no gradient).
    """
    op = "token_topk_blocks"
    torch._check(scores.dim() == 2 and scores.is_floating_point(),
                 lambda: f"{op}: scores must be a floating [B, Kb] tensor, got {scores.dtype} of shape "
                         f"{list(scores.shape)}")
    torch._check(block_size > 0, lambda: f"{op}: block_size must be > 0, got {block_size}")
    torch._check(seq_len > 0, lambda: f"{op}: seq_len must be > 0, got {seq_len}")
    nb = scores.shape[-1]
    torch._check(1 <= int(keep_blocks) <= nb, lambda: f"{op}: keep_blocks must be in [1, {nb}], got {keep_blocks}")
    torch._check(nb == -(-seq_len // block_size),
                 lambda: f"token_topk_blocks: scores has {nb} blocks, seq_len {seq_len} / block_size {block_size} needs "
                         f"{-(-seq_len // block_size)}")
    keep_blocks = int(keep_blocks)
    s = scores.to(torch.float32).clone()
    tail = seq_len - (nb - 1) * block_size
    if always_keep_first:
        s[:, 0] = float("inf")
    if tail != block_size or always_keep_last:
        # the partial last block: forced in (keep_last) or out, so every kept set has the same token count
        s[:, -1] = float("inf") if always_keep_last else float("-inf")
        if not always_keep_last:
            keep_blocks = min(keep_blocks, nb - 1)
    blocks = torch.topk(s, keep_blocks, dim=-1, sorted=False).indices.sort(dim=-1).values  # [B, kb]
    tok = blocks.unsqueeze(-1) * block_size + torch.arange(block_size, device=scores.device)  # [B, kb, bs]
    tok = tok.flatten(1)
    if tail != block_size and always_keep_last:
        tok = tok[:, : tok.shape[1] - (block_size - tail)]  # the last kept block is the partial one (sorted)
    return tok.contiguous()


def token_mlp_partial_save(x, w_gate, w_up, w_down, keep_channels: int, channel_index=None):
    """``down(silu(x w_gate^T) * (x w_up^T))`` with only ``keep_channels`` intermediate channels saved for
    backward (frozen weights; see the module doc). Returns ``y``."""
    return _lib.token_mlp_partial_save(x, w_gate, w_up, w_down, int(keep_channels), channel_index)[0]


# ---------------------------------------------------------------------------------------------------------------
# Fake kernels.


_FLOAT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_float(op, name, t):
    torch._check(t.dtype in _FLOAT, lambda: f"{op}: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def _check_tokens(op, x, keep_index, src=None):
    """check_token_args (token_elim_cpu.cpp), same messages."""
    xname = "x" if src is None else "residual"
    _check_float(op, xname, x)
    torch._check(x.dim() >= 2, lambda: f"{op}: {xname} must be [B, L, ...] (at least 2-D), got shape {list(x.shape)}")
    torch._check(keep_index.dtype == torch.int64, lambda: f"{op}: keep_index must be int64, got {keep_index.dtype}")
    torch._check(keep_index.dim() == 2, lambda: f"{op}: keep_index must be 2-D, got shape {list(keep_index.shape)}")
    same_device(op, x, keep_index=keep_index)
    torch._check(keep_index.shape[0] == x.shape[0],
                 lambda: f"{op}: keep_index must have batch size {x.shape[0]} ({xname} is {list(x.shape)}), got "
                         f"shape {list(keep_index.shape)}")
    torch._check(keep_index.shape[1] <= x.shape[1],
                 lambda: f"{op}: keep_index keeps {keep_index.shape[1]} tokens of a sequence of {x.shape[1]}")
    if src is not None:
        torch._check(src.dtype == x.dtype, lambda: f"{op}: src has dtype {src.dtype} but residual has {x.dtype}")
        same_device(op, x, src=src)
        want = (x.shape[0], keep_index.shape[1], *x.shape[2:])
        torch._check(tuple(src.shape) == want,
                     lambda: f"{op}: src must have shape {list(want)} (residual {list(x.shape)} with K = "
                             f"{keep_index.shape[1]} tokens), got {list(src.shape)}")


def _check_mlp(op, x, w_gate, w_up, w_down, keep_channels, channel_index, x_name="x"):
    """check_mlp_args (token_elim_cpu.cpp), same messages."""
    _check_float(op, x_name, x)
    torch._check(x.dim() >= 1, lambda: f"{op}: {x_name} must have at least 1 dim, got a scalar")
    for name, w in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        torch._check(w.dim() == 2, lambda: f"{op}: {name} must be 2-D, got shape {list(w.shape)}")
        torch._check(w.dtype == x.dtype, lambda: f"{op}: {name} has dtype {w.dtype} but {x_name} has {x.dtype}")
    same_device(op, x, w_gate=w_gate, w_up=w_up, w_down=w_down)
    H, I = x.shape[-1], w_gate.shape[0]
    torch._check(w_gate.shape[1] == H,
                 lambda: f"{op}: w_gate must be [I, {H}] for {x_name}'s last dim {H}, got {list(w_gate.shape)}")
    torch._check(w_up.shape == w_gate.shape,
                 lambda: f"{op}: w_up must have w_gate's shape {list(w_gate.shape)}, got {list(w_up.shape)}")
    torch._check(tuple(w_down.shape) == (H, I), lambda: f"{op}: w_down must be [{H}, {I}], got {list(w_down.shape)}")
    if channel_index is not None:
        torch._check(channel_index.dtype == torch.int64,
                     lambda: f"{op}: channel_index must be int64, got {channel_index.dtype}")
        torch._check(channel_index.dim() == 1,
                     lambda: f"{op}: channel_index must be 1-D, got shape {list(channel_index.shape)}")
        same_device(op, x, channel_index=channel_index)
        torch._check(channel_index.numel() == keep_channels,
                     lambda: f"{op}: channel_index has {channel_index.numel()} entries but keep_channels = "
                             f"{keep_channels}")
    torch._check(0 <= keep_channels <= I, lambda: f"{op}: keep_channels must be in [0, {I}], got {keep_channels}")


@torch.library.register_fake("peftcore::token_gather")
def _(x, keep_index):
    _check_tokens("token_gather", x, keep_index)
    return x.new_empty((x.shape[0], keep_index.shape[1], *x.shape[2:]))


@torch.library.register_fake("peftcore::token_scatter_add")
def _(residual, src, keep_index):
    _check_tokens("token_scatter_add", residual, keep_index, src)
    return torch.empty_like(residual, memory_format=torch.contiguous_format)


@torch.library.register_fake("peftcore::token_block_scores")
def _(q, k, block_size, causal=True, scale=None):
    op = "token_block_scores"
    _check_float(op, "q", q)
    torch._check(q.dim() == 4, lambda: f"{op}: q must be 4-D, got shape {list(q.shape)}")
    torch._check(k.dim() == 4, lambda: f"{op}: k must be 4-D, got shape {list(k.shape)}")
    torch._check(k.dtype == q.dtype, lambda: f"{op}: k has dtype {k.dtype} but q has {q.dtype}")
    same_device(op, q, k=k)
    torch._check(k.shape[0] == q.shape[0] and k.shape[3] == q.shape[3],
                 lambda: f"{op}: k must be [{q.shape[0]}, Hkv, Lk, {q.shape[3]}] for q of shape {list(q.shape)}, "
                         f"got {list(k.shape)}")
    torch._check(q.shape[3] >= 1, lambda: f"{op}: head dim must be >= 1, got q of shape {list(q.shape)}")
    torch._check(k.shape[1] >= 1 and q.shape[1] % k.shape[1] == 0,
                 lambda: f"{op}: the query heads must be a multiple of the key heads (Hq % Hkv == 0), got Hq = "
                         f"{q.shape[1]} and Hkv = {k.shape[1]}")
    torch._check(block_size > 0, lambda: f"{op}: block_size must be > 0, got {block_size}")
    torch._check(scale is None or math.isfinite(scale), lambda: f"{op}: scale must be finite, got {scale}")
    kb = (k.shape[2] + block_size - 1) // block_size
    return q.new_empty((q.shape[0], kb), dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)


@torch.library.register_fake("peftcore::token_mlp_partial_save")
def _(x, w_gate, w_up, w_down, keep_channels, channel_index=None):
    _check_mlp("token_mlp_partial_save", x, w_gate, w_up, w_down, keep_channels, channel_index)
    y = x.new_empty((*x.shape[:-1], w_down.shape[0]))
    kept = x.new_empty((*x.shape[:-1], keep_channels))
    return y, kept, torch.empty_like(kept), x.new_empty((keep_channels,), dtype=torch.long)


@torch.library.register_fake("peftcore::token_mlp_partial_save_backward")
def _(grad_y, gate_kept, up_kept, channel_index, w_gate, w_up, w_down, grad_gate_kept=None, grad_up_kept=None):
    op = "token_mlp_partial_save_backward"
    C = channel_index.numel()
    _check_mlp(op, grad_y, w_gate, w_up, w_down, C, channel_index, "grad_y")
    want = (*grad_y.shape[:-1], C)
    for name, t in (("gate_kept", gate_kept), ("up_kept", up_kept), ("grad_gate_kept", grad_gate_kept),
                    ("grad_up_kept", grad_up_kept)):
        if t is None:
            continue
        torch._check(t.dtype == grad_y.dtype, lambda: f"{op}: {name} has dtype {t.dtype} but grad_y has {grad_y.dtype}")
        same_device(op, grad_y, **{name: t})
        torch._check(tuple(t.shape) == want,
                     lambda: f"{op}: {name} must have shape {list(want)} (grad_y {list(grad_y.shape)} with C = {C} "
                             f"kept channels), got {list(t.shape)}")
    return grad_y.new_empty((*grad_y.shape[:-1], w_gate.shape[1]))


# ---------------------------------------------------------------------------------------------------------------
# Autograd (each backward is a peftcore op, so it traces under torch.compile).


def _gather_setup(ctx, inputs, output):
    x, keep_index = inputs
    ctx.save_for_backward(keep_index)
    ctx.x_shape = x.shape


def _gather_backward(ctx, grad):
    (keep_index,) = ctx.saved_tensors
    zeros = grad.new_zeros(ctx.x_shape)
    return _lib.token_scatter_add(zeros, grad, keep_index), None


register_autograd("peftcore::token_gather", _gather_backward, setup_context=_gather_setup)


def _scatter_setup(ctx, inputs, output):
    residual, src, keep_index = inputs
    ctx.save_for_backward(keep_index)


def _scatter_backward(ctx, grad):
    (keep_index,) = ctx.saved_tensors
    need_r, need_s = ctx.needs_input_grad[:2]
    return (grad if need_r else None, _lib.token_gather(grad, keep_index) if need_s else None, None)


register_autograd("peftcore::token_scatter_add", _scatter_backward, setup_context=_scatter_setup)


def _mlp_setup(ctx, inputs, output):
    x, w_gate, w_up, w_down, keep_channels, channel_index = inputs
    _, gate_kept, up_kept, idx = output
    ctx.save_for_backward(gate_kept, up_kept, idx, w_gate, w_up, w_down)


def _mlp_backward(ctx, grad_y, grad_gate_kept, grad_up_kept, _grad_idx):
    gate_kept, up_kept, idx, w_gate, w_up, w_down = ctx.saved_tensors
    if any(ctx.needs_input_grad[1:4]):
        raise RuntimeError("token_mlp_partial_save: the MLP weights must be frozen (no weight gradients: "
                           "only the kept channels' pre-activations are saved, not x)")
    gx = None
    if ctx.needs_input_grad[0]:
        if grad_y is None:
            grad_y = gate_kept.new_zeros((*gate_kept.shape[:-1], w_down.shape[0]))
        gx = _lib.token_mlp_partial_save_backward(grad_y, gate_kept, up_kept, idx, w_gate, w_up, w_down,
                                                  grad_gate_kept, grad_up_kept)
    return gx, None, None, None, None, None


register_autograd("peftcore::token_mlp_partial_save", _mlp_backward, setup_context=_mlp_setup)
refuse_double_backward("token_mlp_partial_save_backward", "token_mlp_partial_save")
non_differentiable("token_block_scores", "a selection signal: attention mass per key block")
