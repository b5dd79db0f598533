"""blockdiag bench: peftcore.monarch_matmul forward / backward / training step side by side with its references.
Methods (the rows' names):
  monarch_matmul    — peftcore.monarch_matmul, fused, the intermediate kept per token tile (the default training
                      path keeps fly's intermediate for the backward);
  monarch_recompute — the same with save_intermediate=False: the intermediate recomputed in the backward (less
                      memory, one GEMM more);
  (a) two_bmm       — HazyResearch fly's two-bmm form (ref_monarch_two_bmm, imported from tests/test_blockdiag.py);
  (b) dense         — a dense linear of the same in / out shape; every ratio in the rows is against the two-bmm
                      form, the dense row shows what the structure saves;
plus blockdiag_matmul against one bmm between permutes (ref_blockdiag). Peak memory per call (bench/common.py).
Headline (HEADLINE, bench/run.py's default): the training step with blocks of 64 (d=1024, 16 blocks on CPU),
monarch_matmul against two_bmm (dense beside them).

Run through bench/run.py (table, CSV, PNG) or alone: python bench/bench_blockdiag.py [--device cuda] [--quick].
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F

from common import backward_only, compare, forward_only, peak_memory, train_step

import peftcore  # noqa: F401
from peftcore.ops import blockdiag as bd
from test_blockdiag import ref_blockdiag, ref_monarch_two_bmm

# The headline comparison (bench/run.py's summary): peftcore's method against its anchor.
HEADLINE = [dict(family="blockdiag", op="monarch_matmul", mode="train_step", density="", method="monarch_matmul",
                 anchor="two_bmm", setting="")]
OURS = {"monarch_matmul", "monarch_recompute", "blockdiag_matmul", "monarch_fused_kernel", "monarch_bmm_kernel"}


def sizes(device: str, quick: bool, headline: bool = False):
    """(d, block counts, tokens, dtype). CPU: three sizes x two block counts (blocks of 64..1024) keep the family
    around a minute (the two-bmm backward alone takes seconds at 32+ blocks). Headline: one size, 16 blocks."""
    if headline:
        d, tokens = {("cuda", False): (2048, 8192), ("cuda", True): (2048, 4096), ("cpu", False): (1024, 1024),
                     ("cpu", True): (512, 256)}[(device, quick)]
        return [(d, (16,), tokens, torch.bfloat16 if device == "cuda" else torch.float32)]
    if device == "cuda":
        if quick:
            return [(2048, (4, 32), 4096, torch.bfloat16)]
        return [(1024, (4, 32), 8192, torch.bfloat16), (2048, (4, 16, 64), 8192, torch.bfloat16),
                (4096, (4, 16, 64), 8192, torch.bfloat16)]
    if quick:
        return [(512, (4, 16), 256, torch.float32)]
    return [(1024, (4, 16), 1024, torch.float32), (2048, (4, 32), 512, torch.float32),
            (4096, (4, 16), 256, torch.float32)]


def _monarch_weights(d, nb, dtype, device, gen):
    """Square Monarch factors for d features and nb blocks: w1 [nb, d/nb, d/nb], w2 [nb, d/nb, d/nb]."""
    b = d // nb
    w1 = (torch.randn(nb, b, b, generator=gen) * b ** -0.5).to(dtype).to(device).requires_grad_(True)
    w2 = (torch.randn(nb, b, b, generator=gen) * b ** -0.5).to(dtype).to(device).requires_grad_(True)
    return w1, w2


def run(device: str = "cpu", quick: bool = False, rounds: int = 15, headline: bool = False) -> list:
    """Rows of every case; with headline=True only the headline's (one size, the training step of monarch_matmul,
    two_bmm and dense; no recompute variant, no blockdiag_matmul)."""
    # CPU: the two-bmm backward takes ~2 s per call at 32 blocks (strided bmm gradients), so 3 rounds keep the
    # family within ~45 s; the medians are noisier than the other families'.
    if device == "cpu":
        rounds = min(rounds, 3)
    rows = []
    modes = ("train_step",) if headline else ("forward", "backward", "train_step")
    for d, nbs, tokens, dtype in sizes(device, quick, headline):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, d, generator=gen).to(dtype).to(device).requires_grad_(True)
        g = torch.randn(tokens, d, generator=gen).to(dtype).to(device)
        w = (torch.randn(d, d, generator=gen) * d ** -0.5).to(dtype).to(device).requires_grad_(True)
        for nb in nbs:
            w1, w2 = _monarch_weights(d, nb, dtype, device, gen)
            case = f"d={d} nb={nb} T={tokens} {str(dtype).replace('torch.', '')}"
            ours = lambda: bd.monarch_matmul(x, w1, w2)  # noqa: E731
            two = lambda: ref_monarch_two_bmm(x, w1, w2)  # noqa: E731
            dense = lambda: F.linear(x, w)  # noqa: E731
            with torch.no_grad():
                torch.testing.assert_close(ours(), two(), atol=1e-2, rtol=1e-2)
            lean = lambda: bd.monarch_matmul(x, w1, w2, save_intermediate=False)  # noqa: E731
            methods = {"monarch_matmul": (ours, (x, w1, w2)), "monarch_recompute": (lean, (x, w1, w2)),
                       "two_bmm": (two, (x, w1, w2)), "dense": (dense, (x, w))}
            if headline:
                del methods["monarch_recompute"]
            fns = {}
            for name, (f, wrt) in methods.items():
                if "forward" in modes:
                    fns[(name, "forward")] = forward_only(f)
                if "backward" in modes:
                    fns[(name, "backward")] = backward_only(f, wrt, g)
                fns[(name, "train_step")] = train_step(f, wrt, g)
            if device == "cuda" and not headline:  # both CUDA forward forms side by side (blockdiag_plan.h picks one)
                for mode in ("fused", "bmm"):
                    fns[(f"monarch_{mode}_kernel", "forward")] = forward_only(_with_kernel(mode, ours))
            times = compare(fns, device, rounds=rounds)
            for (name, mode), t in times.items():
                rows.append(dict(family="blockdiag", op="monarch_matmul", case=case, method=name, density="",
                                 mode=mode, ms=t * 1e3, ratio=t / times[("two_bmm", mode)], ratio_to="two_bmm",
                                 peak_mb=peak_memory(fns[(name, mode)], device) / 2 ** 20, device=device))
            if not headline:
                rows += _blockdiag_rows(device, case, x.detach(), w1.detach(), g, rounds)
    return rows


def _with_kernel(mode, f):
    """f with PEFTCORE_MONARCH_KERNEL=mode (the CUDA Monarch forward's form: fused kernel or batched GEMMs)."""
    def call():
        os.environ["PEFTCORE_MONARCH_KERNEL"] = mode
        try:
            return f()
        finally:
            del os.environ["PEFTCORE_MONARCH_KERNEL"]
    return call


def _blockdiag_rows(device, case, x, blocks, g, rounds):
    """blockdiag_matmul vs one bmm between permutes, forward and training step."""
    x = x.clone().requires_grad_(True)
    blocks = blocks.clone().requires_grad_(True)
    ours = lambda: bd.blockdiag_matmul(x, blocks)  # noqa: E731
    base = lambda: ref_blockdiag(x, blocks)  # noqa: E731
    fns = {}
    for name, f in (("blockdiag_matmul", ours), ("bmm_permute", base)):
        fns[(name, "forward")] = forward_only(f)
        fns[(name, "train_step")] = train_step(f, (x, blocks), g)
    times = compare(fns, device, rounds=max(3, rounds // 2))
    return [dict(family="blockdiag", op="blockdiag_matmul", case=case, method=name, density="", mode=mode,
                 ms=t * 1e3, ratio=t / times[("bmm_permute", mode)], ratio_to="bmm_permute",
                 peak_mb=peak_memory(fns[(name, mode)], device) / 2 ** 20, device=device)
            for (name, mode), t in times.items()]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--headline", action="store_true", help="the headline comparison alone")
    args = ap.parse_args()
    for r in run(args.device, args.quick, args.rounds, headline=args.headline):
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
