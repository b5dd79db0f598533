"""lora bench: many LoRA adapters over one frozen 4096 x 4096 linear in one batch (serving forward and training
step), float32 on CPU (bfloat16 on CUDA), side by side in one run, every ratio against the frozen linear (the floor):
  (a) lora_multi_linear   — peftcore, packed adapters of any ranks;
  (b) one_lora            — one LoRA for every token in plain torch (what a single-adapter batch costs);
  (c) peft_mixed_batch    — HF PEFT's mixed-adapter batch, model(x, adapter_names=[...]) (loops over adapters);
  (d) gather_einsum       — vLLM's CPU form: each token's A and B gathered (ranks padded to the largest), einsum;
  (e) per_adapter_loop    — plain torch: a boolean mask per adapter, two matmuls on its rows, index_add;
  (f) padded_ranks        — lora_multi_linear on the same adapters zero-padded to the largest rank (mixed case);
  (g) frozen_linear       — x Wᵀ + b alone.
Cases: decode (32 requests x 1 token, 32 adapters r=16; 64 x 1, 64 adapters r=8; 32 x 1 over ranks 8..64), prefill
(8 requests x 128 tokens, 8 adapters r=16), MeteoRA (k=2 adapters per token with gate weights), and a training step
with 8 adapters in one batch (gradients into x and the adapters) against one LoRA's training step. Plus the pieces:
lora_shrink / lora_expand alone against the gather-einsum halves (decode), and lora_linear (one adapter, PEFT's
dropout, training step and forward) and the seeded lora_linear_dropout against plain torch LoRA with F.dropout. Peak memory per
call too. Baselines from tests/test_lora.py where they exist (one reference, not two). Headline (HEADLINE,
bench/run.py's default): the decode case with 32 adapters, lora_multi_linear against peft_mixed_batch.

Run through bench/run.py (table, CSV, PNG) or alone: python bench/bench_lora.py [--quick].
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import compare, forward_only, op_rows, peak_memory, train_step

import peftcore  # noqa: F401
from peftcore.ops import lora as lo

# The headline comparison (bench/run.py's summary): peftcore's op against its anchor, in the case HEADLINE_CASE.
HEADLINE = [dict(family="lora", op="lora_multi_linear", mode="forward", density="", method="lora_multi_linear",
                 anchor="peft_mixed_batch", setting="")]
HEADLINE_CASE = "decode 32 x r16"
OURS = {"lora_multi_linear", "padded_ranks", "lora_linear"}  # the rows' peftcore methods (the rest are references)


def sizes(device: str, quick: bool):
    """(case, d, requests, tokens per request, adapters, ranks, k)."""
    d = 1024 if quick else 4096
    cases = [("decode 32 x r16", d, 32, 1, 32, [16] * 32, 1),
             ("decode 64 x r8", d, 64, 1, 64, [8] * 64, 1),
             ("decode 32 mixed r8-64", d, 32, 1, 32, [8, 16, 32, 64] * 8, 1),
             ("prefill 8 x 128 r16", d, 8, 128, 8, [16] * 8, 1),
             ("meteora k=2 r16", d, 8, 16, 8, [16] * 8, 2)]
    return cases[:2] + cases[3:4] if quick else cases


def _dtype(device: str):
    return torch.float32 if device == "cpu" else torch.bfloat16


def _adapters(d, ranks, gen, device="cpu"):
    dt = _dtype(device)
    As = [(torch.randn(r, d, generator=gen) * d ** -0.5).to(device, dt) for r in ranks]
    Bs = [(torch.randn(d, r, generator=gen) * r ** -0.5).to(device, dt) for r in ranks]
    return As, Bs, [2.0] * len(ranks)


def _peft_model(base, As, Bs, scales):
    import peft

    model = None
    for i, (a, b) in enumerate(zip(As, Bs)):
        cfg = peft.LoraConfig(target_modules=["0"], r=a.shape[0], lora_alpha=a.shape[0] * 2.0)
        name = f"ad{i}"
        if model is None:
            model = peft.get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
        layer = model.base_model.model[0]
        with torch.no_grad():
            layer.lora_A[name].weight.copy_(a)
            layer.lora_B[name].weight.copy_(b)
    return model.eval()


def run(device: str = "cpu", quick: bool = False, rounds: int = 15, headline: bool = False) -> list:
    rows = []
    dt = _dtype(device)
    tol = dict(atol=1e-3, rtol=1e-3) if dt == torch.float32 else dict(atol=1e-1, rtol=5e-2)
    cases = [c for c in sizes(device, quick) if c[0] == HEADLINE_CASE or not headline]
    for case, d, nreq, per, N, ranks, k in cases:
        gen = torch.Generator().manual_seed(0)
        T = nreq * per
        lin = torch.nn.Linear(d, d).to(device, dt)
        W, bias = lin.weight.detach(), lin.bias.detach()
        x = torch.randn(T, d, generator=gen).to(device, dt)
        As, Bs, scales = _adapters(d, ranks, gen, device)
        a, b, off, sc = lo.pack_adapters(As, Bs, scales)
        req = (torch.arange(nreq).repeat_interleave(per) % N).to(device)  # request r: adapter r % N, contiguous
        if k == 2:
            ta = torch.stack([req, (req + 1) % N], 1)
            tw = torch.softmax(torch.randn(T, 2, generator=gen), 1).to(device, dt)
        else:
            ta, tw = req, None
        ours = lambda: lo.lora_multi_linear(x, W, bias, a, b, off, sc, ta, tw)  # noqa: E731
        frozen = lambda: F.linear(x, W, bias)  # noqa: E731
        A0, B0 = As[0], Bs[0]
        one = lambda: F.linear(x, W, bias) + 2.0 * ((x @ A0.t()) @ B0.t())  # noqa: E731

        def loop():
            y = F.linear(x, W, bias)
            for j in range(ta.shape[1] if ta.dim() == 2 else 1):
                col = ta[:, j] if ta.dim() == 2 else ta
                w = tw[:, j:j + 1] if tw is not None else 1.0
                for i in range(N):
                    idx = (col == i).nonzero().squeeze(1)
                    if idx.numel():
                        y.index_add_(0, idx, (w[idx] if tw is not None else 1.0) * scales[i] *
                                     ((x[idx] @ As[i].t()) @ Bs[i].t()))
            return y

        fns = {"lora_multi_linear": forward_only(ours), "frozen_linear": forward_only(frozen),
               "one_lora": forward_only(one), "per_adapter_loop": forward_only(loop)}
        rmax = max(ranks)
        Apad = torch.stack([F.pad(A, (0, 0, 0, rmax - A.shape[0])) for A in As])  # [N, rmax, d]
        Bpad = torch.stack([F.pad(B, (0, rmax - B.shape[1])) for B in Bs])       # [N, d, rmax]
        if k == 1:
            def gather_einsum():
                h = torch.einsum("td,trd->tr", x, Apad[ta])
                return F.linear(x, W, bias) + 2.0 * torch.einsum("tr,tor->to", h, Bpad[ta])
            fns["gather_einsum"] = forward_only(gather_einsum)
            try:
                model = _peft_model(torch.nn.Sequential(torch.nn.Linear(d, d)).to(device, dt), As, Bs, scales)
                model.base_model.model[0].base_layer.weight.data.copy_(W)
                model.base_model.model[0].base_layer.bias.data.copy_(bias)
                names = [f"ad{int(i)}" for i in ta]
                fns["peft_mixed_batch"] = forward_only(lambda: model(x, adapter_names=names))
            except ImportError:
                print("bench_lora: peft not installed; PEFT's mixed batch skipped")
        if len(set(ranks)) > 1:
            ap, bp, offp, scp = lo.pack_adapters(list(Apad), list(Bpad), scales)
            fns["padded_ranks"] = forward_only(lambda: lo.lora_multi_linear(x, W, bias, ap, bp, offp, scp, ta, tw))
        with torch.no_grad():
            torch.testing.assert_close(ours(), loop(), **tol)
        # prefill-sized calls take ~0.5 s each on 2 cores: fewer rounds keep the family within ~2 minutes
        times = compare(fns, device, rounds=rounds if T <= 256 else min(rounds, 5))
        base = times["frozen_linear"]
        for name, t in times.items():
            rows.append(dict(family="lora", op="lora_multi_linear", case=f"{case} d={d} T={T}", method=name, density="",
                             mode="forward", ms=t * 1e3, ratio=t / base, ratio_to="frozen_linear",
                             peak_mb=peak_memory(fns[name], device) / 2 ** 20, device=device))
        if case.startswith("prefill"):
            rows += _train_rows(case, d, x, W, bias, As, Bs, scales, a, b, off, sc, ta, device, rounds)
        if case.startswith("decode 32 x") and not headline:
            rows += _piece_rows(f"{case} d={d} T={T}", x, Apad, Bpad, a, b, off, sc, ta, device, rounds)
    if not headline:
        rows += _single_rows(device, quick, rounds)
    return rows


def _piece_rows(case, x, Apad, Bpad, a, b, off, sc, ta, device, rounds):
    """lora_shrink / lora_expand alone (a server that owns the base GEMM) against vLLM's gather-einsum halves."""
    h = lo.lora_shrink(x, a, off, ta)
    hg = torch.einsum("td,trd->tr", x, Apad[ta])
    pairs = {"lora_shrink": (lambda: lo.lora_shrink(x, a, off, ta),
                             lambda: torch.einsum("td,trd->tr", x, Apad[ta]), "gather_einsum"),
             "lora_expand": (lambda: lo.lora_expand(h, b, off, sc, ta),
                             lambda: 2.0 * torch.einsum("tr,tor->to", hg, Bpad[ta]), "gather_einsum")}
    return op_rows("lora", case, pairs, device, rounds)


def _single_rows(device, quick, rounds):
    """lora_linear (one adapter, fused, PEFT's dropout p=0.1 in training) against plain torch LoRA with F.dropout:
    training step (gradients into x, A, B) and eval forward; lora_linear_dropout (the seeded op) alone."""
    d, T, r = (1024, 256, 16) if quick else (4096, 1024, 16)
    gen = torch.Generator().manual_seed(2)
    dt = _dtype(device)
    on = lambda t: t.to(device, dt)  # noqa: E731
    x = on(torch.randn(T, d, generator=gen)).requires_grad_(True)
    W, bias = on(torch.randn(d, d, generator=gen) * d ** -0.5), on(torch.zeros(d))
    A = on(torch.randn(r, d, generator=gen) * d ** -0.5).requires_grad_(True)
    B = on(torch.randn(d, r, generator=gen) * 0.1).requires_grad_(True)
    g = on(torch.randn(T, d, generator=gen))
    ours = lambda: lo.lora_linear(x, W, bias, A, B, 2.0, 0.1, training=True)  # noqa: E731
    torch_lora = lambda: F.linear(x, W, bias) + 2.0 * (F.dropout(x, 0.1, True) @ A.t()) @ B.t()  # noqa: E731
    fns = {("lora_linear", "train_step"): train_step(ours, (x, A, B), g),
           ("torch_lora_dropout", "train_step"): train_step(torch_lora, (x, A, B), g),
           ("lora_linear", "forward"): forward_only(lambda: lo.lora_linear(x, W, bias, A, B, 2.0, 0.1)),
           ("torch_lora_dropout", "forward"): forward_only(lambda: F.linear(x, W, bias) + 2.0 * (x @ A.t()) @ B.t())}
    times = compare(fns, device, rounds=min(rounds, 5))
    case = f"one adapter r={r} d={d} T={T} dropout 0.1"
    rows = [dict(family="lora", op="lora_linear", case=case, method=name, density="", mode=mode, ms=t * 1e3,
                 ratio=t / times[("torch_lora_dropout", mode)], ratio_to="torch_lora_dropout",
                 peak_mb=peak_memory(fns[(name, mode)], device) / 2 ** 20, device=device)
            for (name, mode), t in times.items()]
    seed = torch.tensor([7], device=device)
    xd, Ad, Bd = x.detach(), A.detach(), B.detach()
    pairs = {"lora_linear_dropout": (lambda: torch.ops.peftcore.lora_linear_dropout(xd, W, bias, Ad, Bd, 2.0, 0.1, seed),
                                     lambda: F.linear(xd, W, bias) + 2.0 * (F.dropout(xd, 0.1, True) @ Ad.t()) @ Bd.t(),
                                     "torch_lora_dropout")}
    return rows + op_rows("lora", case, pairs, device, rounds)


def _train_rows(case, d, x, W, bias, As, Bs, scales, a, b, off, sc, ta, device, rounds):
    """Training step with every adapter in one batch (grads into x and the packed adapters) vs one LoRA's step on
    the same tokens (grads into x, A, B), and the frozen linear's backward into x."""
    xg = x.clone().requires_grad_(True)
    ag, bg = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    A0, B0 = As[0].clone().requires_grad_(True), Bs[0].clone().requires_grad_(True)
    g = torch.randn(x.shape[0], W.shape[0], generator=torch.Generator().manual_seed(1)).to(x.device, x.dtype)
    ours = lambda: lo.lora_multi_linear(xg, W, bias, ag, bg, off, sc, ta)  # noqa: E731
    one = lambda: F.linear(xg, W, bias) + 2.0 * ((xg @ A0.t()) @ B0.t())  # noqa: E731
    frozen = lambda: F.linear(xg, W, bias)  # noqa: E731
    fns = {"lora_multi_linear": train_step(ours, (xg, ag, bg), g), "one_lora": train_step(one, (xg, A0, B0), g),
           "frozen_linear": train_step(frozen, (xg,), g)}
    times = compare(fns, device, rounds=min(rounds, 5))
    return [dict(family="lora", op="lora_multi_linear", case=f"{case} d={d} T={x.shape[0]} train", method=name,
                 density="", mode="train_step", ms=t * 1e3, ratio=t / times["one_lora"], ratio_to="one_lora",
                 peak_mb=peak_memory(fns[name], device) / 2 ** 20, device=device) for name, t in times.items()]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    for r in run(args.device, args.quick, args.rounds):
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
