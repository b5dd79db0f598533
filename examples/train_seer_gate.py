#!/usr/bin/env python
"""Train SeerAttention gates on a small causal LM on CPU, then measure sparsity, loss gap and speed.

1. Build a Llama from a config (no downloads; hidden 256, 4 layers, 8 query heads / 2 KV heads, byte-sized vocab)
   and give it a short plain pre-training (``--pretrain-steps``, all weights, at the same length) on structured
   synthetic text, so its attention has structure to learn (a random-weight LM attends almost uniformly).
   The data: a fixed lexicon of 64 random "words" of 12 tokens (shared by every sequence), concatenated in random
   order; tokens recur across words, so predicting the next token needs the last few tokens (local attention).
2. ``peftcore.apply_adapter`` with a ``SeerAttnConfig`` (block 64, distill mode): the LM is frozen and unchanged,
   only the gates train on the distillation loss (KL to the attention's normalised block max-pool) for ``--steps``
   steps at ``--seq`` tokens.
3. Evaluate on held-out sequences, for several mask rules, with the untrained (identity-init) and the trained
   gates: the fraction of causal blocks dropped, the LM loss with gate + block-sparse attention against dense
   attention (the loss gap), and the forward time of the whole model, sparse against dense (the same kernel with
   every block, and HF's own SDPA attention).

Prints a table and writes ``bench/results/seer_gate_table.md``.

    python examples/train_seer_gate.py                 # defaults: about 2-3 minutes on 2 cores
    python examples/train_seer_gate.py --steps 20 --seq 512
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import time

import torch
from torch.utils.benchmark import Timer

from peftcore import apply_adapter
from peftcore.tuners.seer_attn import (
    SeerAttnConfig,
    seer_gate_parameters,
    seer_layers,
    seer_loss,
    seer_sparsity,
    set_seer_mode,
)

VOCAB = 256
RULES = [  # (label, gate attributes)
    ("threshold 0.02", dict(method="threshold", threshold=0.02)),
    ("threshold 0.05", dict(method="threshold", threshold=0.05)),
    ("keep_ratio 0.5", dict(method="keep_ratio", keep_ratio=0.5)),
    ("keep_ratio 0.25", dict(method="keep_ratio", keep_ratio=0.25)),
    ("top_k 4", dict(method="top_k", top_k=4)),
]


def make_lexicon(gen: torch.Generator, words: int = 64, word_len: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (words, word_len), generator=gen)


def batch(gen: torch.Generator, lexicon: torch.Tensor, B: int, L: int) -> torch.Tensor:
    """``[B, L]`` token ids: words of ``lexicon`` drawn uniformly and concatenated."""
    words, word_len = lexicon.shape
    n = -(-L // word_len)
    order = torch.randint(0, words, (B, n), generator=gen)
    return lexicon[order].reshape(B, -1)[:, :L].contiguous()


def lm_loss(model, x) -> float:
    with torch.no_grad():
        logits = model(x).logits[:, :-1].float()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1)).item()


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="gate training steps")
    ap.add_argument("--seq", type=int, default=1024, help="sequence length of gate training and evaluation")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--pretrain-steps", type=int, default=60, help="plain LM steps before the gates (0: random LM)")
    ap.add_argument("--pretrain-seq", type=int, default=None, help="default: --seq")
    ap.add_argument("--pretrain-batch", type=int, default=2)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--eval-seqs", type=int, default=2)
    ap.add_argument("--time", type=float, default=2.0, help="min_run_time of each forward timing (s)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "bench", "results",
                                                  "seer_gate_table.md"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.pretrain_seq = args.pretrain_seq or args.seq
    import transformers

    t_start = time.time()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    lexicon = make_lexicon(gen)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=max(args.seq, args.pretrain_seq), tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(cfg)

    # 1. a short plain pre-training so attention has structure
    t0 = time.time()
    if args.pretrain_steps:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 10))  # short warm-up
        model.train()
        for step in range(args.pretrain_steps):
            x = batch(gen, lexicon, args.pretrain_batch, args.pretrain_seq)
            loss = model(x, labels=x).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % 25 == 0 or step == args.pretrain_steps - 1:
                print(f"pretrain {step:4d}  lm loss {loss.item():.3f}", flush=True)
    model.eval()
    t_pre = time.time() - t0
    dense_model = copy.deepcopy(model)  # HF's own attention (SDPA), the reference

    evals = [batch(torch.Generator().manual_seed(10_000 + i), lexicon, 1, args.seq) for i in range(args.eval_seqs)]
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
    for step in range(args.steps):
        x = batch(gen, lexicon, args.batch, args.seq)
        model(x)
        loss = seer_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
        if step % 10 == 0 or step == args.steps - 1:
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
           f"Llama hidden 256, 4 layers, 8 heads / 2 KV heads (head_dim 32), block {args.block}, seq {args.seq}")
    lines = [
        "# SeerAttention gates on a small Llama (CPU)",
        "",
        f"{env}. LM pre-trained {args.pretrain_steps} steps (batch {args.pretrain_batch} x seq {args.pretrain_seq}, {t_pre:.0f} s); gates trained "
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


if __name__ == "__main__":
    main()
