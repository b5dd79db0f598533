"""sparse_attn bench: peftcore.block_sparse_attn (causal, a random block mask at 50 / 75 / 90% sparsity of the
causal blocks, the diagonal always kept) side by side with its references, modes forward (no grad) and train_step
(forward + backward into q, k, v), with peak memory per call. Methods (the rows' names):
  block_sparse_attn      — peftcore.block_sparse_attn: only the kept key blocks of each query block are visited;
  (a) sdpa               — dense causal F.scaled_dot_product_attention; the baseline of every ratio in the rows;
  (b) flex_attention     — torch.nn.attention.flex_attention with the same block mask (as a BlockMask built by
                           dense_to_csr, causal mask_mod), torch.compile'd; forward only where its backward does not
                           run;
  (c) block_sparse_attn_simt — CUDA only: the CUDA-core forward (PEFTCORE_SPARSE_ATTN_KERNEL=simt) on the same mask,
                           beside the tensor-core forward that float16 / bfloat16 take by default.
Plus attn_block_pool against the plain-torch reference of the tests (dense softmax map, then max-pool).
Headline (HEADLINE, bench/run.py's default): the training step at 90% sparsity at the largest CPU length
(L=4096; CUDA L=8192), block_sparse_attn against sdpa; no flex, no ops.

Run through bench/run.py (table, CSV, PNG) or alone: python bench/bench_sparse_attn.py [--device cuda] [--quick].
"""
from __future__ import annotations

import argparse
import functools
import os

import torch
import torch.nn.functional as F

from common import compare, forward_only, op_rows, peak_memory, train_step

import peftcore  # noqa: F401
from peftcore.ops import sparse_attn as sa
from test_sparse_attn import ref_block_pool

SPARSITIES = {"cpu": (0.5, 0.75, 0.9), "cuda": (0.0, 0.5, 0.9)}  # block sparsity of the causal blocks
# The headline comparison (bench/run.py's summary): peftcore's op against its anchor (density = blocks kept).
HEADLINE = [dict(family="sparse_attn", op="block_sparse_attn", mode="train_step", density=0.1,
                 method="block_sparse_attn", anchor="sdpa", setting="{} of the causal blocks kept")]
OURS = {"block_sparse_attn", "block_sparse_attn_simt"}  # the rows' peftcore methods (the rest are references)


def sizes(device: str, quick: bool, headline: bool = False):
    """(B, Hq, Hkv, L, D, block_size, dtype). CUDA: the GPU headline, bf16, 32 query heads over 8 KV heads (GQA),
    D = 128, causal, L = 8k and 32k, blocks of 64 and 128 rows, against SDPA's flash kernel and FlexAttention.
    Headline: the first CUDA size, the longest CPU one."""
    if headline:
        every = sizes(device, quick)
        return every[:1] if device == "cuda" else every[-1:]
    if device == "cuda":
        if quick:
            return [(1, 32, 8, 4096, 128, 128, torch.bfloat16)]
        return [(1, 32, 8, L, 128, bs, torch.bfloat16) for L in (8192, 32768) for bs in (128, 64)]
    if quick:
        return [(1, 2, 2, 512, 64, 64, torch.float32), (1, 2, 2, 1024, 64, 64, torch.float32)]
    return [(1, 4, 4, L, 64, 64, torch.float32) for L in (1024, 2048, 4096)]


def causal_block_mask(H, nb, sparsity, seed=0):
    """[1, H, nb, nb] bool: the diagonal plus random strictly-lower blocks, `1 - sparsity` of the causal blocks."""
    g = torch.Generator().manual_seed(seed)
    causal_blocks = nb * (nb + 1) // 2
    want = max(nb, int(round((1 - sparsity) * causal_blocks)))
    m = torch.eye(nb, dtype=torch.bool).repeat(H, 1, 1)
    lower = torch.ones(nb, nb, dtype=torch.bool).tril(-1).nonzero()
    for h in range(H):
        pick = lower[torch.randperm(len(lower), generator=g)[:want - nb]]
        m[h, pick[:, 0], pick[:, 1]] = True
    return m.unsqueeze(0)


def _flex(q, k, v, mask, bs):
    """(forward callable on detached inputs, callable building a graph) of compiled flex_attention on the same
    blocks (causal mask_mod), or None when it cannot run here."""
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
    except ImportError:
        return None
    num, idx = sa.dense_to_csr(mask.expand(q.shape[0], -1, -1, -1).contiguous())
    causal = lambda b, h, qi, ki: qi >= ki  # noqa: E731
    try:
        bm = BlockMask.from_kv_blocks(num, idx, BLOCK_SIZE=bs, mask_mod=causal, seq_lengths=(q.shape[2], k.shape[2]))
        gqa = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}
        fn = functools.partial(torch.compile(flex_attention, dynamic=False), **gqa)
        fn(q.detach(), k.detach(), v.detach(), block_mask=bm)
    except Exception as e:  # noqa: BLE001 - any failure means "not available here"
        print(f"bench_sparse_attn: flex_attention unavailable on {q.device}: {type(e).__name__}: {str(e)[:120]}")
        return None
    qd, kd, vd = q.detach(), k.detach(), v.detach()  # CPU flex refuses inputs that require grad, even under no_grad
    return (lambda: fn(qd, kd, vd, block_mask=bm)), (lambda: fn(q, k, v, block_mask=bm))


def _with_kernel(kernel, fn):
    """fn run with PEFTCORE_SPARSE_ATTN_KERNEL=kernel (the forward kernel is chosen per call)."""
    def run():
        old = os.environ.get("PEFTCORE_SPARSE_ATTN_KERNEL")
        os.environ["PEFTCORE_SPARSE_ATTN_KERNEL"] = kernel
        try:
            return fn()
        finally:
            if old is None:
                os.environ.pop("PEFTCORE_SPARSE_ATTN_KERNEL", None)
            else:
                os.environ["PEFTCORE_SPARSE_ATTN_KERNEL"] = old
    return run


def _can_backward(f, wrt, g):
    try:
        torch.autograd.grad(f(), wrt, g)
        return True
    except Exception as e:  # noqa: BLE001
        print(f"bench_sparse_attn: flex_attention backward unavailable: {type(e).__name__}: {str(e)[:120]}")
        return False


def run(device: str = "cpu", quick: bool = False, rounds: int = 15, headline: bool = False) -> list:
    """Rows of every case; with headline=True only the headline's (one size, 90% sparsity, training step, no flex,
    no ops)."""
    rows = []
    sparsities = (round(1 - HEADLINE[0]["density"], 3),) if headline else SPARSITIES[device]
    for B, H, Hkv, L, D, bs, dtype in sizes(device, quick, headline):
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(B, H, L, D, generator=gen).to(device, dtype).requires_grad_(True)
        k, v = (torch.randn(B, Hkv, L, D, generator=gen).to(device, dtype).requires_grad_(True) for _ in range(2))
        g = torch.randn(B, H, L, D, generator=gen).to(device, dtype)
        wrt = (q, k, v)
        nb = -(-L // bs)
        heads = f"H{H}" if Hkv == H else f"H{H}/{Hkv}kv"
        case = f"B{B} {heads} L{L} D{D} bs{bs} causal {str(dtype).replace('torch.', '')}"
        gqa = {"enable_gqa": True} if Hkv != H else {}
        sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)  # noqa: E731
        fns = {("sdpa", None, "forward"): forward_only(sdpa), ("sdpa", None, "train_step"): train_step(sdpa, wrt, g)}
        if headline:
            del fns[("sdpa", None, "forward")]
        flex_fns = {}
        for sp in sparsities:
            mask = causal_block_mask(H, nb, sp).to(device)
            ours = (lambda m: lambda: sa.block_sparse_attn(q, k, v, m, bs, True))(mask)
            if not headline:
                fns[("block_sparse_attn", sp, "forward")] = forward_only(ours)
            fns[("block_sparse_attn", sp, "train_step")] = train_step(ours, wrt, g)
            if headline:
                continue
            if device == "cuda":
                fns[("block_sparse_attn_simt", sp, "forward")] = forward_only(_with_kernel("simt", ours))
            flex = _flex(q, k, v, mask, bs)
            if flex is not None:
                flex_fwd, flex_graph = flex
                flex_fns[("flex_attention", sp, "forward")] = forward_only(flex_fwd)
                if _can_backward(flex_graph, wrt, g):
                    flex_fns[("flex_attention", sp, "train_step")] = train_step(flex_graph, wrt, g)
        # flex's compiled CPU kernels run on another OpenMP runtime whose spinning threads slow whatever runs next:
        # interleaved with the others they skewed every ratio (sdpa 20x slower at L=512), so they get rounds of
        # their own, after the rest.
        times = compare(fns, device, rounds=rounds)
        if flex_fns:
            times.update(compare(flex_fns, device, rounds=max(3, rounds // 2)))
        fns.update(flex_fns)
        for (name, sp, mode), t in times.items():
            # printed as measured: a run stopped by a time limit still leaves its figures in the log
            print(f"bench_sparse_attn: {case} {name} sparsity={sp} {mode}: {t * 1e3:.3f} ms, "
                  f"{t / times[('sdpa', None, mode)]:.3f}x sdpa", flush=True)
            rows.append(dict(family="sparse_attn", op="block_sparse_attn", case=case, method=name,
                             density=round(1 - sp, 3) if sp is not None else "", mode=mode, ms=t * 1e3,
                             ratio=t / times[("sdpa", None, mode)], ratio_to="sdpa_causal",
                             peak_mb=peak_memory(fns[(name, sp, mode)], device) / 2 ** 20, device=device))
        if headline:
            continue
        qd, kd = q.detach(), k.detach()
        pairs = {"attn_block_pool": (lambda: sa.attn_block_pool(qd, kd, bs, True),
                                     lambda: ref_block_pool(qd, kd, bs, True), "dense_softmax_maxpool")}
        rows += op_rows("sparse_attn", case, pairs, device, rounds)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--headline", action="store_true", help="the headline comparison alone")
    args = ap.parse_args()
    for r in run(args.device, args.quick, args.rounds, headline=args.headline):
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})


if __name__ == "__main__":
    main()
