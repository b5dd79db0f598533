"""lora: many LoRA adapters over one frozen linear in one batch (S-LoRA / Punica serving, MeteoRA's gated mixture).

Adapters live packed, ranks free per adapter (no padding): ``a_packed [R, in]`` and ``b_packed [out, R]`` hold
every adapter's ``A_i [r_i, in]`` rows / ``B_i [out, r_i]`` columns back to back, ``offsets [N+1]`` int64 says
where (adapter ``i`` owns ``offsets[i]:offsets[i+1]``; ``offsets[0] = 0``, never decreasing, ``offsets[N] = R``),
``scales [N]`` float32 (``alpha / r``, or rsLoRA's ``alpha / sqrt(r)``). Build them with :func:`pack_adapters`.

Tokens: ``x [..., in]`` holds ``T`` tokens; ``token_adapter`` ``[T]`` or ``[T, k]`` int64 names each slot's
adapter (``-1``: none; an adapter may fill several slots of a token, the contributions add); ``token_weight``
(the same shape, ``x``'s dtype or float32 for half types, ``None`` = all ones) weighs each slot — MeteoRA's gate.

* :func:`lora_multi_linear` — ``y[t] = x[t] Wᵀ + bias + Σ_j token_weight[t, j] · scales[i] · (x[t] A_iᵀ) B_iᵀ``
  with ``i = token_adapter[t, j]``. Differentiable in ``x``, ``a_packed``, ``b_packed`` and ``token_weight``
  (``W`` and ``bias`` frozen). The backward recomputes ``x A_iᵀ`` (saves nothing but the inputs).
* :func:`lora_shrink` / :func:`lora_expand` — the two halves, for servers that own the base GEMM (Punica's
  shrink / expand). ``h = lora_shrink(x, a_packed, offsets, token_adapter)`` has ``token_adapter``'s shape plus
  ``[R]``: ``h[t, j, offsets[i] + m] = x[t] · A_i[m]`` in the columns of the slot's adapter, zero in every other
  column (so ``h`` costs ``T · k · R`` elements; the expand reads only the adapter's columns).
  ``lora_expand(h, b_packed, offsets, scales, token_adapter, token_weight, out_features) -> delta_y [T, out]``.

CPU kernels: the (token, slot) pairs are grouped by adapter (one counting sort), then each adapter's work runs as
GEMMs on its group — decode batches (scattered adapters, one token each: Punica's BGMV) and prefill batches
(segments of one adapter: SGMV, read as views with no gather) take the same code, and every adapter's ``A_i`` /
``B_i`` is read once per call, never copied per token. Math in float32 for half types (float64 for float64).
Values are checked on every CPU call (offsets, adapter ids in ``[-1, N)``).

CUDA kernels (not yet verified on a GPU: compiled for sm_80 / sm_90, no spills): no host sync anywhere, so every op
can be captured in a CUDA graph. Two paths, chosen from shapes alone (``PEFTCORE_LORA_CUDA_PATH=auto|gathered|
grouped`` forces one):

* gathered (decode, any pair order; Punica's BGMV): the shrink runs one CTA per (token, slot) pair, a warp per rank
  row reducing ``x[t] · A_i[m]`` with 16-byte loads; the expand one thread per (token, output column) summing the
  token's slots over ``B_i``'s row (16-byte loads when aligned). Every pair reads its adapter's bytes once.
* grouped (prefill; SGMV): the pairs are sorted by adapter on the device (a stable sort and a searchsorted), cut in
  tiles of 64 pairs of one adapter, and both halves run on tensor cores (CuTe, ``mma.sync`` m16n8k16, fp32
  accumulation): ``X_tile · A_iᵀ`` and ``H_tile · B_iᵀ``, so an adapter's ``A_i`` / ``B_i`` is read once per 64
  pairs. float16 / bfloat16 only; taken when ``T · k >= 16 N``. With ``k > 1`` the expand stays gathered.

The backward is shared by both paths: gathered kernels for the gradients of ``x`` and of ``token_weight``, and
per-adapter reductions over the sorted pairs for those of ``a_packed`` / ``b_packed`` (deterministic, no atomics).
``lora_linear`` runs cuBLAS GEMMs in row chunks with the dropout mask regenerated on the device (the same hash as
the CPU, so the same seed drops the same elements). Values are never read on the host on CUDA: a slot whose id is
outside ``[-1, N)`` or whose adapter's offsets are out of range adds nothing; :func:`lora_validate` checks them.

Dtypes: float32, float16, bfloat16 and float64 (CPU only).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ._common import check_float, dtype_name, refuse_double_backward, register_autograd, same_device, with_last

_lib = torch.ops.peftcore

__all__ = ["lora_linear", "lora_multi_linear", "lora_multi_linear_backward", "lora_shrink", "lora_shrink_backward",
           "lora_expand", "lora_expand_backward", "lora_validate", "pack_adapters"]


# ---------------------------------------------------------------------------------------------------------------
# Documented wrappers (the ops themselves are torch.ops.peftcore.<name>).


def lora_multi_linear(x, weight, bias, a_packed, b_packed, offsets, scales, token_adapter, token_weight=None):
    """``x Wᵀ + bias`` plus, per token, the weighted LoRA deltas of the adapters its slots name (see the module)."""
    return _lib.lora_multi_linear(x, weight, bias, a_packed, b_packed, offsets, scales, token_adapter, token_weight)


def lora_multi_linear_backward(grad_out, x, weight, a_packed, b_packed, offsets, scales, token_adapter,
                               token_weight=None, output_mask=(True, True, True, False)):
    """``(grad_x, grad_a_packed, grad_b_packed, grad_token_weight)`` of :func:`lora_multi_linear`; outputs not in
    ``output_mask`` come back empty (``grad_token_weight`` needs a ``token_weight``)."""
    return _lib.lora_multi_linear_backward(grad_out, x, weight, a_packed, b_packed, offsets, scales, token_adapter,
                                           token_weight, list(output_mask))


def lora_shrink(x, a_packed, offsets, token_adapter):
    """``h [*token_adapter.shape, R]``: ``x[t] A_iᵀ`` in the columns of each slot's adapter, zero elsewhere."""
    return _lib.lora_shrink(x, a_packed, offsets, token_adapter)


def lora_shrink_backward(grad_h, x, a_packed, offsets, token_adapter, output_mask=(True, True)):
    """``(grad_x, grad_a_packed)`` of :func:`lora_shrink` (only the adapters' columns of ``grad_h`` are read)."""
    return _lib.lora_shrink_backward(grad_h, x, a_packed, offsets, token_adapter, list(output_mask))


def lora_expand(h, b_packed, offsets, scales, token_adapter, token_weight=None, out_features: Optional[int] = None):
    """``delta_y [T, out]``: ``Σ_j token_weight[t, j] · scales[i] · h[t, j, cols of i] B_iᵀ``."""
    if out_features is None:
        out_features = b_packed.shape[0]
    return _lib.lora_expand(h, b_packed, offsets, scales, token_adapter, token_weight, out_features)


def lora_expand_backward(grad_out, h, b_packed, offsets, scales, token_adapter, token_weight=None,
                         output_mask=(True, True, False)):
    """``(grad_h, grad_b_packed, grad_token_weight)`` of :func:`lora_expand` (``grad_h`` zero outside each slot's
    adapter columns)."""
    return _lib.lora_expand_backward(grad_out, h, b_packed, offsets, scales, token_adapter, token_weight,
                                     list(output_mask))


def lora_linear(x, weight, bias, A, B, scale: float, dropout_p: float = 0.0, training: bool = False):
    """One LoRA adapter on a frozen linear, fused: ``x Wᵀ + bias + scale · (drop(x) Aᵀ) Bᵀ``. ``drop`` is PEFT's
    dropout on the adapter input (keep with probability ``1 - p``, scaled by ``1 / (1 - p)``) when ``training``;
    ``training=False`` ignores ``dropout_p`` exactly. The mask is a hash of a seed drawn from torch's default
    generator and the element index, so the backward regenerates it: no dropped copy of ``x`` is kept.
    Differentiable in ``x``, ``A``, ``B``."""
    return _lib.lora_linear(x, weight, bias, A, B, float(scale), float(dropout_p), bool(training))


def lora_validate(offsets, token_adapter, R: int) -> None:
    """Raise unless ``offsets`` starts at 0, never decreases and ends at ``R``, and every ``token_adapter`` id is in
    ``[-1, N)``. The CUDA ops never read these values on the host (no sync, CUDA-graph capturable): a slot whose
    adapter id or offsets are invalid adds nothing there. This is their check; it syncs on CUDA: call it when the
    adapters are packed and when a batch's ids come from an untrusted source, not in every step."""
    _lib.lora_validate(offsets, token_adapter, int(R))


def pack_adapters(As: Sequence[torch.Tensor], Bs: Sequence[torch.Tensor], scales: Sequence[float]):
    """``(a_packed, b_packed, offsets, scales)`` from per-adapter ``A_i [r_i, in]``, ``B_i [out, r_i]`` and scales
    (copies; ranks may differ and may be 0)."""
    if not (len(As) == len(Bs) == len(scales)):
        raise ValueError(f"pack_adapters: got {len(As)} A, {len(Bs)} B and {len(scales)} scales")
    if not As:
        raise ValueError("pack_adapters: no adapters")
    ranks = [a.shape[0] for a in As]
    for i, (a, b) in enumerate(zip(As, Bs)):
        if b.shape[1] != a.shape[0]:
            raise ValueError(f"pack_adapters: adapter {i}: A is {list(a.shape)} but B is {list(b.shape)}")
    offsets = torch.tensor([0] + ranks, dtype=torch.int64, device=As[0].device).cumsum(0)
    return (torch.cat(list(As), 0), torch.cat(list(Bs), 1), offsets,
            torch.tensor([float(s) for s in scales], dtype=torch.float32, device=As[0].device))


# ---------------------------------------------------------------------------------------------------------------
# Fake kernels (shapes and dtypes only) for torch.compile / meta tensors; the checks and messages of lora_cpu.cpp.


@torch.library.register_fake("peftcore::lora_validate")
def _(offsets, token_adapter, R):
    op = "lora_validate"
    torch._check(offsets.dtype == torch.int64 and offsets.dim() == 1 and offsets.shape[0] >= 1,
                 lambda: f"{op}: offsets must be 1-D int64 with N+1 >= 1 entries, got {dtype_name(offsets.dtype)} of "
                         f"shape {list(offsets.shape)}")
    torch._check(token_adapter.dtype == torch.int64,
                 lambda: f"{op}: token_adapter must be int64, got {dtype_name(token_adapter.dtype)}")
    torch._check(R >= 0, lambda: f"{op}: R must be >= 0, got {R}")
    return None


def _check_packed(op, ref, ref_name, a_packed, b_packed, offsets, scales, in_features=None):
    torch._check(offsets.dtype == torch.int64, lambda: f"{op}: offsets must be int64, got {dtype_name(offsets.dtype)}")
    torch._check(offsets.dim() == 1 and offsets.shape[0] >= 1,
                 lambda: f"{op}: offsets must be 1-D with N+1 >= 1 entries, got shape {list(offsets.shape)}")
    same_device(op, ref, offsets=offsets, a_packed=a_packed, b_packed=b_packed, scales=scales)
    n = offsets.shape[0] - 1
    r = None
    if a_packed is not None:
        torch._check(a_packed.dtype == ref.dtype, lambda: f"{op}: a_packed has dtype {dtype_name(a_packed.dtype)} but "
                                                          f"{ref_name} has {dtype_name(ref.dtype)}")
        torch._check(a_packed.dim() == 2, lambda: f"{op}: a_packed must be 2-D [R, in], got shape {list(a_packed.shape)}")
        r = a_packed.shape[0]
        if in_features is not None:
            torch._check(a_packed.shape[1] == in_features,
                         lambda: f"{op}: a_packed must have {in_features} columns (in_features), got shape "
                                 f"{list(a_packed.shape)}")
    if b_packed is not None:
        torch._check(b_packed.dtype == ref.dtype, lambda: f"{op}: b_packed has dtype {dtype_name(b_packed.dtype)} but "
                                                          f"{ref_name} has {dtype_name(ref.dtype)}")
        torch._check(b_packed.dim() == 2, lambda: f"{op}: b_packed must be 2-D [out, R], got shape {list(b_packed.shape)}")
        if r is not None:
            torch._check(b_packed.shape[1] == r, lambda: f"{op}: b_packed must have R = {r} columns (a_packed's rows), "
                                                         f"got shape {list(b_packed.shape)}")
        r = b_packed.shape[1]
    if scales is not None:
        torch._check(scales.dtype == torch.float32, lambda: f"{op}: scales must be float32, got {dtype_name(scales.dtype)}")
        torch._check(scales.dim() == 1 and scales.shape[0] == n,
                     lambda: f"{op}: scales must have shape [{n}] (one per adapter, N = offsets.numel() - 1), got "
                             f"{list(scales.shape)}")
    return n, r


def _check_tokens(op, ref, ref_name, T, token_adapter, token_weight):
    torch._check(token_adapter.dtype == torch.int64,
                 lambda: f"{op}: token_adapter must be int64, got {dtype_name(token_adapter.dtype)}")
    torch._check(token_adapter.dim() in (1, 2),
                 lambda: f"{op}: token_adapter must be [T] or [T, k], got shape {list(token_adapter.shape)}")
    torch._check(token_adapter.shape[0] == T, lambda: f"{op}: token_adapter must have T = {T} rows (one per token), "
                                                      f"got shape {list(token_adapter.shape)}")
    same_device(op, ref, token_adapter=token_adapter, token_weight=token_weight)
    if token_weight is not None:
        half = ref.dtype in (torch.float16, torch.bfloat16)
        torch._check(token_weight.dtype == ref.dtype or (half and token_weight.dtype == torch.float32),
                     lambda: f"{op}: token_weight must have dtype {dtype_name(ref.dtype)}"
                             f"{' or float32' if half else ''}, got {dtype_name(token_weight.dtype)}")
        torch._check(token_weight.shape == token_adapter.shape,
                     lambda: f"{op}: token_weight must have token_adapter's shape {list(token_adapter.shape)}, got "
                             f"{list(token_weight.shape)}")


def _tokens(op, name, t, features):
    torch._check(t.dim() >= 1, lambda: f"{op}: {name} must have at least 1 dim, got a scalar")
    torch._check(t.shape[-1] == features, lambda: f"{op}: {name} must have last dim {features}, got shape {list(t.shape)}")
    return math.prod(t.shape[:-1])


def _check_linear(op, x, x_name, weight, a_packed, b_packed, offsets, scales, token_adapter, token_weight):
    check_float(op, x_name, x)
    torch._check(weight.dim() == 2, lambda: f"{op}: weight must be 2-D [out, in], got shape {list(weight.shape)}")
    torch._check(weight.dtype == x.dtype, lambda: f"{op}: weight has dtype {dtype_name(weight.dtype)} but {x_name} "
                                                  f"has {dtype_name(x.dtype)}")
    same_device(op, x, weight=weight)


@torch.library.register_fake("peftcore::lora_multi_linear")
def _(x, weight, bias, a_packed, b_packed, offsets, scales, token_adapter, token_weight=None):
    op = "lora_multi_linear"
    _check_linear(op, x, "x", weight, a_packed, b_packed, offsets, scales, token_adapter, token_weight)
    T = _tokens(op, "x", x, weight.shape[1])
    _check_packed(op, x, "x", a_packed, b_packed, offsets, scales, weight.shape[1])
    torch._check(b_packed.shape[0] == weight.shape[0],
                 lambda: f"{op}: b_packed must have {weight.shape[0]} rows (weight's out_features), got shape "
                         f"{list(b_packed.shape)}")
    if bias is not None:
        torch._check(bias.dtype == x.dtype, lambda: f"{op}: bias has dtype {dtype_name(bias.dtype)} but x has "
                                                    f"{dtype_name(x.dtype)}")
        same_device(op, x, bias=bias)
        torch._check(bias.dim() == 1 and bias.shape[0] == weight.shape[0],
                     lambda: f"{op}: bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")
    _check_tokens(op, x, "x", T, token_adapter, token_weight)
    return x.new_empty(with_last(x, weight.shape[0]))


@torch.library.register_fake("peftcore::lora_multi_linear_backward")
def _(grad_out, x, weight, a_packed, b_packed, offsets, scales, token_adapter, token_weight, output_mask):
    op = "lora_multi_linear_backward"
    _check_linear(op, grad_out, "grad_out", weight, a_packed, b_packed, offsets, scales, token_adapter, token_weight)
    torch._check(x.dtype == grad_out.dtype, lambda: f"{op}: x has dtype {dtype_name(x.dtype)} but grad_out has "
                                                    f"{dtype_name(grad_out.dtype)}")
    same_device(op, grad_out, x=x)
    T = _tokens(op, "x", x, weight.shape[1])
    _tokens(op, "grad_out", grad_out, weight.shape[0])
    _check_packed(op, grad_out, "grad_out", a_packed, b_packed, offsets, scales, weight.shape[1])
    _check_tokens(op, x, "x", T, token_adapter, token_weight)
    torch._check(not output_mask[3] or token_weight is not None,
                 lambda: f"{op}: output_mask asks for grad_token_weight but token_weight is None")
    empty = lambda t: t.new_empty((0,))  # noqa: E731
    return (x.new_empty(x.shape) if output_mask[0] else empty(x),
            a_packed.new_empty(a_packed.shape) if output_mask[1] else empty(a_packed),
            b_packed.new_empty(b_packed.shape) if output_mask[2] else empty(b_packed),
            token_weight.new_empty(token_weight.shape) if output_mask[3]
            else empty(token_weight if token_weight is not None else x))


def _check_shrink(op, x, a_packed, offsets, token_adapter):
    """The checks shared by lora_shrink and its backward; returns R."""
    check_float(op, "x", x)
    torch._check(a_packed.dim() == 2, lambda: f"{op}: a_packed must be 2-D [R, in], got shape {list(a_packed.shape)}")
    T = _tokens(op, "x", x, a_packed.shape[1])
    _, R = _check_packed(op, x, "x", a_packed, None, offsets, None, a_packed.shape[1])
    _check_tokens(op, x, "x", T, token_adapter, None)
    return R


@torch.library.register_fake("peftcore::lora_shrink")
def _(x, a_packed, offsets, token_adapter):
    R = _check_shrink("lora_shrink", x, a_packed, offsets, token_adapter)
    return x.new_empty((*token_adapter.shape, R))


@torch.library.register_fake("peftcore::lora_shrink_backward")
def _(grad_h, x, a_packed, offsets, token_adapter, output_mask):
    op = "lora_shrink_backward"
    R = _check_shrink(op, x, a_packed, offsets, token_adapter)
    torch._check(grad_h.dtype == x.dtype, lambda: f"{op}: grad_h has dtype {dtype_name(grad_h.dtype)} but x has "
                                                  f"{dtype_name(x.dtype)}")
    same_device(op, x, grad_h=grad_h)
    want = [*token_adapter.shape, R]
    torch._check(list(grad_h.shape) == want, lambda: f"{op}: grad_h must have shape {want}, got {list(grad_h.shape)}")
    return (x.new_empty(x.shape) if output_mask[0] else x.new_empty((0,)),
            a_packed.new_empty(a_packed.shape) if output_mask[1] else a_packed.new_empty((0,)))


def _check_expand(op, h, b_packed, offsets, scales, token_adapter, token_weight, out_features):
    check_float(op, "h", h)
    torch._check(token_adapter.dim() >= 1,
                 lambda: f"{op}: token_adapter must be [T] or [T, k], got shape {list(token_adapter.shape)}")
    _, R = _check_packed(op, h, "h", None, b_packed, offsets, scales)
    torch._check(out_features == b_packed.shape[0],
                 lambda: f"{op}: out_features must equal b_packed.size(0) = {b_packed.shape[0]}, got {out_features}")
    _check_tokens(op, h, "h", token_adapter.shape[0], token_adapter, token_weight)
    want = [*token_adapter.shape, R]
    torch._check(list(h.shape) == want,
                 lambda: f"{op}: h must have shape {want} (token_adapter's shape + [R]), got {list(h.shape)}")


@torch.library.register_fake("peftcore::lora_expand")
def _(h, b_packed, offsets, scales, token_adapter, token_weight, out_features):
    op = "lora_expand"
    _check_expand(op, h, b_packed, offsets, scales, token_adapter, token_weight, out_features)
    return h.new_empty((token_adapter.shape[0], out_features))


@torch.library.register_fake("peftcore::lora_expand_backward")
def _(grad_out, h, b_packed, offsets, scales, token_adapter, token_weight, output_mask):
    op = "lora_expand_backward"
    torch._check(b_packed.dim() == 2, lambda: f"{op}: b_packed must be 2-D [out, R], got shape {list(b_packed.shape)}")
    _check_expand(op, h, b_packed, offsets, scales, token_adapter, token_weight, b_packed.shape[0])
    torch._check(grad_out.dtype == h.dtype, lambda: f"{op}: grad_out has dtype {dtype_name(grad_out.dtype)} but h "
                                                    f"has {dtype_name(h.dtype)}")
    same_device(op, h, grad_out=grad_out)
    T, out = token_adapter.shape[0], b_packed.shape[0]
    torch._check(grad_out.dim() == 2 and grad_out.shape[0] == T and grad_out.shape[1] == out,
                 lambda: f"{op}: grad_out must have shape [{T}, {out}], got {list(grad_out.shape)}")
    torch._check(not output_mask[2] or token_weight is not None,
                 lambda: f"{op}: output_mask asks for grad_token_weight but token_weight is None")
    empty = lambda t: t.new_empty((0,))  # noqa: E731
    return (h.new_empty(h.shape) if output_mask[0] else empty(h),
            b_packed.new_empty(b_packed.shape) if output_mask[1] else empty(b_packed),
            token_weight.new_empty(token_weight.shape) if output_mask[2]
            else empty(token_weight if token_weight is not None else h))


def _check_single(op, x, weight, A, B):
    check_float(op, "x", x)
    torch._check(weight.dim() == 2, lambda: f"{op}: weight must be 2-D [out, in], got shape {list(weight.shape)}")
    torch._check(weight.dtype == x.dtype, lambda: f"{op}: weight has dtype {dtype_name(weight.dtype)} but x has "
                                                  f"{dtype_name(x.dtype)}")
    torch._check(A.dim() == 2 and A.shape[1] == weight.shape[1],
                 lambda: f"{op}: A must be [r, {weight.shape[1]}], got shape {list(A.shape)}")
    torch._check(B.dim() == 2 and B.shape[0] == weight.shape[0] and B.shape[1] == A.shape[0],
                 lambda: f"{op}: B must be [{weight.shape[0]}, {A.shape[0]}] (out, r), got shape {list(B.shape)}")
    for name, t in (("A", A), ("B", B)):
        torch._check(t.dtype == x.dtype, lambda: f"{op}: {name} has dtype {dtype_name(t.dtype)} but x has "
                                                 f"{dtype_name(x.dtype)}")
    same_device(op, x, weight=weight, A=A, B=B)


def _check_dropout(op, p, seed):
    torch._check(0.0 <= p < 1.0, lambda: f"{op}: dropout_p must be in [0, 1), got {p}")
    if p > 0:
        torch._check(seed.dtype == torch.int64 and seed.numel() == 1,
                     lambda: f"{op}: seed must be one int64 element when dropout_p > 0, got {dtype_name(seed.dtype)} "
                             f"of shape {list(seed.shape)}")


@torch.library.register_fake("peftcore::lora_linear_dropout")
def _(x, weight, bias, A, B, scale, dropout_p, seed):
    op = "lora_linear"
    _check_single(op, x, weight, A, B)
    if bias is not None:
        torch._check(bias.dtype == x.dtype, lambda: f"{op}: bias has dtype {dtype_name(bias.dtype)} but x has "
                                                    f"{dtype_name(x.dtype)}")
        torch._check(bias.dim() == 1 and bias.shape[0] == weight.shape[0],
                     lambda: f"{op}: bias must have shape [{weight.shape[0]}], got {list(bias.shape)}")
    _check_dropout(op, dropout_p, seed)
    _tokens(op, "x", x, weight.shape[1])
    return x.new_empty(with_last(x, weight.shape[0]))


@torch.library.register_fake("peftcore::lora_linear_dropout_backward")
def _(grad_out, x, weight, A, B, scale, dropout_p, seed, output_mask):
    op = "lora_linear_backward"
    _check_single(op, x, weight, A, B)
    torch._check(grad_out.dtype == x.dtype, lambda: f"{op}: grad_out has dtype {dtype_name(grad_out.dtype)} but x "
                                                    f"has {dtype_name(x.dtype)}")
    _check_dropout(op, dropout_p, seed)
    T = _tokens(op, "x", x, weight.shape[1])
    torch._check(_tokens(op, "grad_out", grad_out, weight.shape[0]) == T,
                 lambda: f"{op}: grad_out must have x's {T} tokens, got shape {list(grad_out.shape)}")
    empty = lambda t: t.new_empty((0,))  # noqa: E731
    return (x.new_empty(x.shape) if output_mask[0] else empty(x), A.new_empty(A.shape) if output_mask[1] else empty(A),
            B.new_empty(B.shape) if output_mask[2] else empty(B))


# ---------------------------------------------------------------------------------------------------------------
# Autograd. Every backward calls peftcore ops, so it traces under torch.compile too. The integer / float32
# bookkeeping inputs (offsets, scales, token_adapter) and the frozen weight and bias get no gradient.


def _frozen(op, **tensors):
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise RuntimeError(f"peftcore::{op}: {name} must not require grad (it is frozen: the op has no gradient "
                               f"for it); detach it")


def _multi_setup(ctx, inputs, output):
    x, weight, bias, a_packed, b_packed, offsets, scales, token_adapter, token_weight = inputs
    _frozen("lora_multi_linear", weight=weight, bias=bias, scales=scales)
    ctx.has_tw = token_weight is not None
    ctx.save_for_backward(x, weight, a_packed, b_packed, offsets, scales, token_adapter, token_weight)


def _multi_backward(ctx, grad):
    x, weight, a_packed, b_packed, offsets, scales, token_adapter, token_weight = ctx.saved_tensors
    n = ctx.needs_input_grad
    mask = [n[0], n[3], n[4], len(n) > 8 and bool(n[8]) and ctx.has_tw]
    gx, ga, gb, gw = _lib.lora_multi_linear_backward(grad, x, weight, a_packed, b_packed, offsets, scales,
                                                     token_adapter, token_weight if ctx.has_tw else None, mask)
    out = (gx if mask[0] else None, None, None, ga if mask[1] else None, gb if mask[2] else None, None, None, None,
           gw if mask[3] else None)
    return out[:len(n)]


register_autograd("peftcore::lora_multi_linear", _multi_backward, setup_context=_multi_setup)
refuse_double_backward("lora_multi_linear_backward", "lora_multi_linear")


def _shrink_setup(ctx, inputs, output):
    x, a_packed, offsets, token_adapter = inputs
    ctx.save_for_backward(x, a_packed, offsets, token_adapter)


def _shrink_backward(ctx, grad):
    x, a_packed, offsets, token_adapter = ctx.saved_tensors
    n = ctx.needs_input_grad
    gx, ga = _lib.lora_shrink_backward(grad.contiguous(), x, a_packed, offsets, token_adapter, [n[0], n[1]])
    return gx if n[0] else None, ga if n[1] else None, None, None


register_autograd("peftcore::lora_shrink", _shrink_backward, setup_context=_shrink_setup)
refuse_double_backward("lora_shrink_backward", "lora_shrink")


def _expand_setup(ctx, inputs, output):
    h, b_packed, offsets, scales, token_adapter, token_weight, out_features = inputs
    _frozen("lora_expand", scales=scales)
    ctx.has_tw = token_weight is not None
    ctx.save_for_backward(h, b_packed, offsets, scales, token_adapter, token_weight)


def _expand_backward(ctx, grad):
    h, b_packed, offsets, scales, token_adapter, token_weight = ctx.saved_tensors
    n = ctx.needs_input_grad
    mask = [n[0], n[1], len(n) > 5 and bool(n[5]) and ctx.has_tw]
    gh, gb, gw = _lib.lora_expand_backward(grad.contiguous(), h, b_packed, offsets, scales, token_adapter,
                                           token_weight if ctx.has_tw else None, mask)
    out = (gh if mask[0] else None, gb if mask[1] else None, None, None, None, gw if mask[2] else None, None)
    return out[:len(n)]


register_autograd("peftcore::lora_expand", _expand_backward, setup_context=_expand_setup)
refuse_double_backward("lora_expand_backward", "lora_expand")


def _single_setup(ctx, inputs, output):
    x, weight, bias, A, B, scale, dropout_p, seed = inputs
    _frozen("lora_linear", weight=weight, bias=bias)
    ctx.scale, ctx.p = scale, dropout_p
    ctx.save_for_backward(x, weight, A, B, seed)


def _single_backward(ctx, grad):
    x, weight, A, B, seed = ctx.saved_tensors
    n = ctx.needs_input_grad
    mask = [n[0], n[3], n[4]]
    gx, gA, gB = _lib.lora_linear_dropout_backward(grad.contiguous(), x, weight, A, B, ctx.scale, ctx.p, seed, mask)
    return (gx if mask[0] else None, None, None, gA if mask[1] else None, gB if mask[2] else None, None, None, None)


register_autograd("peftcore::lora_linear_dropout", _single_backward, setup_context=_single_setup)
refuse_double_backward("lora_linear_dropout_backward", "lora_linear")
