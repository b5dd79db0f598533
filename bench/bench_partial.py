"""partial bench: training step (forward + backward, x needing its gradient), forward and backward alone of
peftcore.partial_linear (dim 1, a contiguous range of columns, as S2FT's co-permutation gives) at selection ratios
1%, 5%, 10%, side by side with its references. Methods (the rows' names):
  partial         — peftcore.partial_linear: the frozen linear plus a trainable block of W's columns, only that
                    slice of x saved for the backward;
  (a) masked_full — the naive way: W itself trainable, its dense [out, in] gradient masked afterwards;
  (b) s2ft_torch  — S2FT's formulation in plain torch: F.linear(x, W) + F.linear(x[:, a:b], delta);
  (c) lora_r16    — LoRA r=16 in plain torch;
  (d) dense       — a frozen dense linear, the speed of light; every ratio in the rows is against it;
with, per method, the activation memory its autograd graph keeps for the backward ("saved_mb": unique storages
handed to saved_tensors_hooks, the trainable parameters and W excluded; a saved view counts its whole storage,
since that is what stays alive). Plus the standalone ops (partial_gather, partial_scatter_add, partial_validate)
against plain-torch equivalents. Baselines are imported from tests/test_partial.py (one reference, not two).
Headline (HEADLINE, bench/run.py's default): the training step at 5% of columns, partial against s2ft_torch
(masked_full and dense beside them).

Run through bench/run.py (table, CSV, PNG) or alone: python bench/bench_partial.py [--device cuda] [--quick].
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import backward_only, compare, forward_only, op_rows, peak_memory, train_step

import peftcore  # noqa: F401
from peftcore.ops import partial as pt
from test_partial import make_index, ref_gather, ref_masked_full, ref_s2ft, ref_scatter_add

RATIOS = (0.01, 0.05, 0.10)
# The headline comparison (bench/run.py's summary): peftcore's method against its anchor, at one ratio and mode.
HEADLINE = [dict(family="partial", op="partial_linear", mode="train_step", density=0.05, method="partial",
                 anchor="s2ft_torch", setting="{} of W's columns trainable")]
OURS = {"partial"}  # the rows' peftcore methods (the rest are references)


def sizes(device: str, quick: bool):
    """(out, in, tokens, dtype). CPU sizes keep the CPU suite within a few minutes on 2 cores."""
    if device == "cuda":
        if quick:
            return [(4096, 4096, 2048, torch.bfloat16)]
        return [(4096, 4096, 2048, torch.bfloat16), (11008, 4096, 4096, torch.bfloat16)]
    if quick:
        return [(512, 512, 256, torch.float32)]
    return [(2048, 2048, 1024, torch.float32)]


def saved_bytes(fn, exclude) -> int:
    """Bytes of the unique storages autograd saves while fn() builds its graph, `exclude`'s storages left out."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _ratio_fns(x, w, g, ratio):
    """{method: (forward fn, step fn, forward-with-graph fn, params, backward fn)} at one selection ratio."""
    out, inn = w.shape
    k = max(1, int(round(inn * ratio)))
    a = (inn - k) // 3  # a range inside W, as co-permutation gives
    idx, _ = make_index(inn, k, "range", a, device=x.device)
    delta = torch.zeros(out, k, dtype=torch.float32, device=x.device).requires_grad_(True)
    wt = w.detach().clone().requires_grad_(True)
    col_mask = torch.zeros(1, inn, dtype=w.dtype, device=w.device)
    col_mask[:, a:a + k] = 1

    partial = lambda: pt.partial_linear(x, w, None, delta, idx, 1, a)  # noqa: E731
    s2ft = lambda: ref_s2ft(x, w, None, delta, a)  # noqa: E731
    masked = lambda: ref_masked_full(x, wt, None, col_mask)  # noqa: E731
    mask_grad = lambda gr: gr[1].mul_(col_mask)  # noqa: E731
    return {
        "partial": (forward_only(partial), train_step(partial, (x, delta), g), partial, (w, delta),
                    backward_only(partial, (x, delta), g)),
        "s2ft_torch": (forward_only(s2ft), train_step(s2ft, (x, delta), g), s2ft, (w, delta),
                       backward_only(s2ft, (x, delta), g)),
        "masked_full": (forward_only(masked), train_step(masked, (x, wt), g, mask_grad), masked, (wt,),
                        backward_only(masked, (x, wt), g, mask_grad)),
    }


def _fixed_fns(x, w, g, lora):
    a, b = lora
    dense = lambda: F.linear(x, w)  # noqa: E731
    lora_f = lambda: F.linear(x, w) + F.linear(F.linear(x, a), b) * 2.0  # noqa: E731
    return {"dense": (forward_only(dense), train_step(dense, (x,), g), dense, (w,), backward_only(dense, (x,), g)),
            "lora_r16": (forward_only(lora_f), train_step(lora_f, (x, a, b), g), lora_f, (w, a, b),
                         backward_only(lora_f, (x, a, b), g))}


def run(device: str = "cpu", quick: bool = False, rounds: int = 15, headline: bool = False) -> list:
    """Rows of every case; with headline=True only the headline's (training step at 5%; no LoRA, no ops)."""
    rows = []
    ratios = (HEADLINE[0]["density"],) if headline else RATIOS
    modes = (("train_step", 1),) if headline else (("forward", 0), ("backward", 4), ("train_step", 1))
    for out, inn, tokens, dtype in sizes(device, quick):
        gen = torch.Generator().manual_seed(0)
        w = (torch.randn(out, inn, generator=gen) * inn ** -0.5).to(dtype).to(device)
        x = torch.randn(tokens, inn, generator=gen).to(dtype).to(device).requires_grad_(True)
        g = torch.randn(tokens, out, generator=gen).to(dtype).to(device)
        lora = ((torch.randn(16, inn, generator=gen) * 0.01).to(dtype).to(device).requires_grad_(True),
                torch.zeros(out, 16, dtype=dtype, device=device).requires_grad_(True))
        case = f"{out}x{inn} T={tokens} {str(dtype).replace('torch.', '')}"
        methods = {(name, None): v for name, v in _fixed_fns(x, w, g, lora).items()
                   if not (headline and name == "lora_r16")}
        for ratio in ratios:
            methods.update({(name, ratio): v for name, v in _ratio_fns(x, w, g, ratio).items()})
        # Every method of this size is timed in the same interleaved rounds.
        fns = {(name, r, mode): v[pos] for (name, r), v in methods.items() for mode, pos in modes}
        times = compare(fns, device, rounds=rounds)
        for (name, r, mode), t in times.items():
            graph_fn, params = methods[(name, r)][2:4]
            saved = saved_bytes(graph_fn, params) if mode == "train_step" else 0
            rows.append(dict(family="partial", op="partial_linear", case=case, method=name,
                             density=r if r is not None else "", mode=mode, ms=t * 1e3,
                             ratio=t / times[("dense", None, mode)], ratio_to="dense",
                             peak_mb=peak_memory(fns[(name, r, mode)], device) / 2 ** 20,
                             saved_mb=saved / 2 ** 20, device=device))
        if not headline:
            rows += _op_rows(device, case, x.detach(), rounds)
    return rows


def _op_rows(device, case, x, rounds):
    """Standalone ops at a 5% scattered selection, each beside the plain-torch way of getting the same result."""
    inn = x.shape[-1]
    k = max(1, int(round(inn * 0.05)))
    idx, _ = make_index(inn, k, "scatter", seed=3, device=x.device)
    src = x[:, :k].contiguous()
    pairs = {
        "partial_gather": (lambda: pt.partial_gather(x, idx), lambda: x.index_select(-1, idx), "index_select"),
        "partial_scatter_add": (lambda: pt.partial_scatter_add(src, idx, inn), lambda: ref_scatter_add(src, idx, inn),
                                "zeros_index_add"),
        "partial_validate": (lambda: pt.partial_validate(idx, inn),
                             lambda: bool((idx[1:] > idx[:-1]).all()) and int(idx.min()) >= 0 and int(idx.max()) < inn,
                             "torch_checks"),
    }
    assert torch.equal(pt.partial_gather(x, idx), ref_gather(x, idx))
    return op_rows("partial", case, pairs, device, rounds, density=0.05)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--headline", action="store_true", help="the headline comparison alone")
    args = ap.parse_args()
    for r in run(args.device, args.quick, args.rounds, headline=args.headline):
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
