"""sparse_delta bench: training step (forward + backward, x needing its gradient), forward and backward alone of
peftcore.sparse_delta_linear at densities 0.1%, 1%, 5%, side by side with its references. Methods (the rows' names):
  sparse_delta     — peftcore.sparse_delta_linear: x Wᵀ plus a sparse delta (sorted flat indices + values), no dense
                     [out, in] temporary;
  sparse_delta_csr — the same with the delta's CSR view built once (sparse_delta_csr), as SparseDeltaLinear runs;
  (a) ref_scatter  — what SpIEL / SHiRA do: clone + scatter + F.linear, dense weight gradient + gather;
  (b) dense        — a frozen dense linear, the speed of light;
  (c) lora_r16     — LoRA r=16 in plain torch;
plus the standalone ops (spmm, spmm_t, sddmm, merge, merge_, topk_grad, validate) against plain-torch equivalents.
Baselines are imported from tests/test_sparse_delta.py (one reference, not two). Headline (HEADLINE, bench/run.py's
default): the training step at 1% density, sparse_delta against ref_scatter (dense and lora_r16 beside them).

Run through bench/run.py (table, CSV, PNG) or alone: python bench/bench_sparse_delta.py [--device cuda] [--quick].
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import backward_only, compare, forward_only, op_rows, peak_memory, train_step

import peftcore  # noqa: F401
from peftcore.ops import sparse_delta as sd
from test_sparse_delta import make_delta, ref_linear_scatter, ref_merge, ref_sddmm, ref_topk

DENSITIES = (0.001, 0.01, 0.05)
# The headline comparison (bench/run.py's summary): peftcore's method against its anchor, at one density and mode.
HEADLINE = [dict(family="sparse_delta", op="sparse_delta_linear", mode="train_step", density=0.01,
                 method="sparse_delta", anchor="ref_scatter", setting="{} of W's entries trainable")]
OURS = {"sparse_delta", "sparse_delta_csr"}  # the rows' peftcore methods (the rest are references)


def sizes(device: str, quick: bool):
    """(out, in, tokens, dtype). CPU sizes keep the CPU suite within ~3 minutes on 2 cores."""
    if device == "cuda":
        if quick:
            return [(4096, 4096, 2048, torch.bfloat16)]
        return [(4096, 4096, 2048, torch.bfloat16), (11008, 4096, 4096, torch.bfloat16)]
    if quick:
        return [(512, 512, 256, torch.float32)]
    return [(2048, 2048, 1024, torch.float32)]


def _step_fns(x, w, idx, vals, g):
    """{method: (forward fn, training-step fn, backward-only fn)}; none leaves a .grad behind."""
    v = vals.detach().clone().requires_grad_(True)

    csr = sd.sparse_delta_csr(idx, *w.shape)  # built once per delta, as SparseDeltaLinear does
    sparse = lambda: sd.sparse_delta_linear(x, w, None, idx, v, 2.0)  # noqa: E731
    cached = lambda: sd.sparse_delta_linear(x, w, None, idx, v, 2.0, csr=csr)  # noqa: E731
    scatter = lambda: ref_linear_scatter(x, w, None, idx, v, 2.0)  # noqa: E731
    return {
        "sparse_delta": (forward_only(sparse), train_step(sparse, (x, v), g), backward_only(sparse, (x, v), g)),
        "sparse_delta_csr": (forward_only(cached), train_step(cached, (x, v), g), backward_only(cached, (x, v), g)),
        "ref_scatter": (forward_only(scatter), train_step(scatter, (x, v), g), backward_only(scatter, (x, v), g)),
    }


def _fixed_fns(x, w, g, lora):
    a, b = lora
    dense = lambda: F.linear(x, w)  # noqa: E731
    lora_f = lambda: F.linear(x, w) + F.linear(F.linear(x, a), b) * 2.0  # noqa: E731

    return {"dense": (forward_only(dense), train_step(dense, (x,), g), backward_only(dense, (x,), g)),
            "lora_r16": (forward_only(lora_f), train_step(lora_f, (x, a, b), g), backward_only(lora_f, (x, a, b), g))}


def run(device: str = "cpu", quick: bool = False, rounds: int = 15, headline: bool = False) -> list:
    """Rows of every case; with headline=True only the headline's (training step at 1%; no CSR variant, no ops)."""
    rows = []
    densities = (HEADLINE[0]["density"],) if headline else DENSITIES
    modes = (("train_step", 1),) if headline else (("forward", 0), ("backward", 2), ("train_step", 1))
    for out, inn, tokens, dtype in sizes(device, quick):
        gen = torch.Generator().manual_seed(0)
        w = (torch.randn(out, inn, generator=gen) * inn ** -0.5).to(dtype).to(device)
        x = torch.randn(tokens, inn, generator=gen).to(dtype).to(device).requires_grad_(True)
        g = torch.randn(tokens, out, generator=gen).to(dtype).to(device)
        lora = ((torch.randn(16, inn, generator=gen) * 0.01).to(dtype).to(device).requires_grad_(True),
                torch.zeros(out, 16, dtype=dtype, device=device).requires_grad_(True))
        case = f"{out}x{inn} T={tokens} {str(dtype).replace('torch.', '')}"
        fixed = _fixed_fns(x, w, g, lora)
        per_density = {}
        for dens in densities:
            idx, vals = make_delta(out, inn, dens, torch.int64, torch.float32, device, seed=1)
            per_density[dens] = (_step_fns(x, w, idx, vals, g), idx, vals)
        # Every method of this size is timed in the same interleaved rounds.
        fns = {}
        for mode, pos in modes:
            for name, pair in fixed.items():
                fns[(name, None, mode)] = pair[pos]
            for dens, (pairs, _, _) in per_density.items():
                for name, pair in pairs.items():
                    if not (headline and name == "sparse_delta_csr"):
                        fns[(name, dens, mode)] = pair[pos]
        times = compare(fns, device, rounds=rounds)
        for (name, dens, mode), t in times.items():
            base = times[("dense", None, mode)]
            rows.append(dict(family="sparse_delta", op="sparse_delta_linear", case=case, method=name,
                             density=dens if dens is not None else "", mode=mode, ms=t * 1e3, ratio=t / base,
                             ratio_to="dense", peak_mb=peak_memory(fns[(name, dens, mode)], device) / 2 ** 20,
                             device=device))
        if not headline:
            rows += _op_rows(device, case, x.detach(), w, g, *per_density[0.01][1:], rounds)
    return rows


def _op_rows(device, case, x, w, g, idx, vals, rounds):
    """Standalone ops at 1% density, each beside the plain-torch way of getting the same result."""
    out, inn = w.shape
    wt = w.detach().clone()
    pairs = {
        "sparse_delta_spmm": (lambda: sd.sparse_delta_spmm(x, idx, vals, out, 2.0), lambda: x @ wt.t(),
                              "dense_mm"),
        "sparse_delta_spmm_t": (lambda: sd.sparse_delta_spmm_t(g, idx, vals, inn, 2.0), lambda: g @ wt,
                                "dense_mm"),
        "sparse_delta_sddmm": (lambda: sd.sparse_delta_sddmm(g, x, idx, 2.0), lambda: ref_sddmm(g, x, idx, 2.0),
                               "dense_gTx_gather"),
        "sparse_delta_merge_": (lambda: sd.sparse_delta_merge_(wt, idx, vals, 0.0),
                                lambda: wt.view(-1).index_add_(0, idx, vals.to(wt.dtype), alpha=0.0),
                                "index_add_"),
        "sparse_delta_merge": (lambda: sd.sparse_delta_merge(w, idx, vals, 2.0), lambda: ref_merge(w, idx, vals, 2.0),
                               "dense_scatter_add"),
        "sparse_delta_topk_grad": (lambda: sd.sparse_delta_topk_grad(g, x, idx.numel() // 10, idx),
                                   lambda: ref_topk(g, x, idx.numel() // 10, idx), "dense_gTx_topk"),
        "sparse_delta_validate": (lambda: sd.sparse_delta_validate(idx, out, inn),
                                  lambda: bool((idx[1:] > idx[:-1]).all()) and int(idx.min()) >= 0
                                  and int(idx.max()) < out * inn, "torch_checks"),
    }
    return op_rows("sparse_delta", case, pairs, device, rounds, density=0.01)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--headline", action="store_true", help="the headline comparison alone")
    args = ap.parse_args()
    for r in run(args.device, args.quick, headline=args.headline):
        print(r)
