#!/usr/bin/env python
"""A real (small) run: fine-tune a byte-level Llama three ways, side by side, on CPU.

* peftcore sparse deltas (``peftcore.apply_adapter`` with a ``SparseDeltaConfig``, 1% of every linear weight by
  default, gradient selection, SpIEL drop-and-grow every ``--regrow-every`` steps);
* full fine-tuning (every parameter);
* PEFT's LoRA (r=16 on the same linear layers, from the ``peft`` package).

The model is built from a config (no downloads) with random weights — the same initial weights, the same
batches in the same order and the same seed for all three. The corpus is the Python standard library's own
``.py`` files, tokenised as bytes (vocab 256). Writes ``<out>/finetune_loss.png`` (loss curves) and
``<out>/finetune_table.md`` (median time per step, allocator peak memory, trainable parameters, losses).

    python examples/finetune_sparse_delta.py                # defaults: ~5-10 min on 2 cores
    python examples/finetune_sparse_delta.py --steps 50     # a quick look

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
import sysconfig
import time

import torch

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------------ data


class ByteTokenizer:
    """Bytes are tokens: vocab 256, no special tokens."""

    vocab_size = 256

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def load_corpus(max_bytes: int) -> torch.Tensor:
    """The stdlib's .py files (sorted, concatenated) as byte tokens, up to ``max_bytes``."""
    tok, parts, n = ByteTokenizer(), [], 0
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        parts.append(tok.encode(text))
        n += parts[-1].numel()
        if n >= max_bytes:
            break
    if not parts:
        raise RuntimeError("no stdlib .py files found for the corpus")
    return torch.cat(parts)[:max_bytes]


def make_batches(data: torch.Tensor, n: int, batch: int, seq: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, data.numel() - seq, (n, batch), generator=g)
    return [torch.stack([data[s : s + seq] for s in row.tolist()]) for row in starts]


# ------------------------------------------------------------------------------------------------ the three setups


def build_model(args):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=256, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 16 * 16,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=args.seq, tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    return transformers.LlamaForCausalLM(cfg)


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
    ax0.set(xlabel="step", ylabel="train loss (nats/byte)", title="loss per step (EMA 0.9; raw faint)")
    ax1.set(xlabel="training time (s, excl. profiled steps)", ylabel="train loss (EMA)", title="loss vs time")
    for ax in (ax0, ax1):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"byte-level Llama (hidden {args.hidden}, {args.layers} layers) on stdlib .py, batch {args.batch}x{args.seq}, "
        f"{torch.get_num_threads()} CPU threads"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_table(results, path, args) -> str:
    lines = [
        f"Byte-level Llama from a config (hidden {args.hidden}, {args.layers} layers, vocab 256), random init, "
        f"{args.steps} steps of batch {args.batch}x{args.seq} bytes of the Python stdlib, AdamW, "
        f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}.",
        "",
        "| method | trainable params | time/step (median) | peak memory | final train loss (last 20) | held-out loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['label']} | {r['trainable']:,} ({100 * r['trainable'] / r['total']:.2f}%) | {r['step_ms']:.0f} ms "
            f"| {r['peak'] / 2**20:.1f} MiB | {r['final']:.3f} | {r['held_out']:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    with open(path, "w") as f:
        f.write(text)
    return text


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    p.add_argument("--selection", default="gradient", choices=["random", "magnitude", "gradient"])
    p.add_argument("--regrow-every", type=int, default=50, help="drop-and-grow period in steps (0: off)")
    p.add_argument("--regrow-fraction", type=float, default=0.1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr-sparse", type=float, default=3e-2)
    p.add_argument("--lr-full", type=float, default=1e-3)
    p.add_argument("--lr-lora", type=float, default=3e-3)
    p.add_argument("--corpus-bytes", type=int, default=8 << 20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile-steps", type=int, default=2, help="first steps run under the memory profiler")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--methods", default="sparse,full,lora")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    data = load_corpus(args.corpus_bytes)
    split = int(0.95 * data.numel())
    train_data, held_data = data[:split], data[split:]
    batches = make_batches(train_data, args.steps, args.batch, args.seq, args.seed)
    calib = make_batches(train_data, 2, args.batch, args.seq, args.seed + 1)
    held_out = make_batches(held_data, 8, args.batch, args.seq, args.seed + 2)
    base = build_model(args)
    print(f"corpus {data.numel() / 2**20:.1f} MiB of stdlib bytes; model {sum(p.numel() for p in base.parameters()):,} params")

    setups = {
        "sparse": (setup_sparse, f"peftcore sparse delta ({args.density:.0%}, {args.selection}"
                   + (f", drop-and-grow/{args.regrow_every})" if args.regrow_every > 0 else ")")),
        "full": (setup_full, "full fine-tuning"),
        "lora": (setup_lora, "PEFT LoRA r=16"),
    }
    results = []
    for key in args.methods.split(","):
        setup, label = setups[key]
        t0 = time.perf_counter()
        r = run(key, setup, base, args, batches, calib, held_out)
        r["label"] = label
        print(f"[{key}] done in {time.perf_counter() - t0:.0f} s: final {r['final']:.3f}, held-out {r['held_out']:.3f}"
              + (f", {r['regrown']} positions regrown ({r['regrow_ms']:.0f} ms per drop-and-grow)" if "regrown" in r else "")
              + f", wall {r['wall']:.0f} s over {len(r['times'])} timed steps")
        results.append(r)

    write_plot(results, os.path.join(args.out, "finetune_loss.png"), args)
    print(write_table(results, os.path.join(args.out, "finetune_table.md"), args))
    print(f"wrote {args.out}/finetune_loss.png and {args.out}/finetune_table.md")


if __name__ == "__main__":
    main()
