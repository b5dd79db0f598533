"""The benchmark suite: every family's bench, a table on screen, rows appended to a CSV (with the environment),
and a PNG chart.

    python bench/run.py [--device cpu|cuda] [--out bench/out] [--quick] [--only sparse_delta]

The default output folder, bench/out/, is not tracked: a run never modifies the repository. The recorded figures
in bench/results/ are a run written there on purpose (``--out bench/results``).

Ratios are time / baseline time measured side by side in the same run; peak memory is what one call allocates
above what it held before (see bench/common.py).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
FAMILIES = ["sparse_delta", "partial", "s2ft", "orthogonal", "blockdiag", "sparse_attn", "token_elim", "lora"]
FAMILY_ORDER = {"sparse_delta_linear": 0, "partial_linear": 1, "s2ft_model": 2, "boft_layer": 3, "oft_layer": 4}


def _reexec_with_pinned_malloc():
    # glibc's dynamic mmap threshold would keep freed large buffers resident and blur CPU peak memory.
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def _fmt(v, nd=2):
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def print_table(rows):
    cols = [("op", "op"), ("case", "case"), ("method", "method"), ("density", "density"), ("mode", "mode"),
            ("ms", "ms"), ("ratio", "x base"), ("ratio_to", "base"), ("peak_mb", "peak MB")]
    if any("saved_mb" in r for r in rows):
        cols.append(("saved_mb", "saved for bwd MB"))
    table = [[_fmt(r.get(k, ""), 3 if k == "ratio" else 2) for k, _ in cols] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, (_, h) in enumerate(cols)]
    line = "  ".join(h.ljust(w) for (_, h), w in zip(cols, widths))
    print(line)
    print("-" * len(line))
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))


def write_csv(rows, path: Path, env: dict):
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    fields = ["timestamp", "family", "op", "case", "method", "density", "mode", "ms", "ratio", "ratio_to", "peak_mb",
              "saved_mb", "device", "env"]
    new = not path.exists()
    if not new:  # append under the file's own header (columns added later are left out of old files)
        with path.open() as f:
            fields = next(csv.reader(f))
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        env_s = ";".join(f"{k}={v}" for k, v in env.items())
        for r in rows:
            w.writerow({**{k: r.get(k, "") for k in fields}, "timestamp": stamp, "env": env_s})


def write_png(rows, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # One chart row per (op, case) that has training-step rows: time ratio and peak memory, side by side.
    steps = [r for r in rows if r["mode"] == "train_step"]
    groups = sorted({(r["op"], r["case"]) for r in steps}, key=lambda g: (FAMILY_ORDER.get(g[0], 99), g))
    if not groups:
        return
    fig, axes = plt.subplots(len(groups), 2, figsize=(13, 4 * len(groups)), squeeze=False)
    base_colors = {"dense": "#888888", "full_ft": "#888888", "lora_r16": "#4c72b0", "peft_lora_r16": "#4c72b0"}
    ours = {"sparse_delta", "partial", "s2ft"}
    for ci, (op, case) in enumerate(groups):
        sub = [r for r in steps if r["op"] == op and r["case"] == case]
        labels, times, mems, colors = [], [], [], []
        for r in sorted(sub, key=lambda r: (r["density"] != "", str(r["density"]), r["method"] in ours, r["method"])):
            d = f"\n{float(r['density']) * 100:g}%" if r["density"] != "" else ""
            labels.append(r["method"] + d)
            times.append(r["ratio"])
            mems.append(r["peak_mb"])
            colors.append(base_colors.get(r["method"], "#55a868" if r["method"] in ours else "#dd8452"))
        case = f"{op}, {case}"
        ax = axes[ci][0]
        ax.bar(range(len(labels)), times, color=colors)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30)
        ax.set_ylabel(f"train step time / {sub[0]['ratio_to']}")
        ax.set_title(f"{case}: time (lower is better)", fontsize=9)
        for i, v in enumerate(times):
            ax.text(i, v, f"{v:.2f}", ha="center", va="bottom", fontsize=7)
        ax = axes[ci][1]
        ax.bar(range(len(labels)), mems, color=colors)
        ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30)
        ax.set_ylabel("peak MB above inputs")
        ax.set_title(f"{case}: peak memory of one step", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=str(HERE / "out"))
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--only", nargs="*", default=FAMILIES)
    ap.add_argument("--rounds", type=int, default=11)
    args = ap.parse_args()
    _reexec_with_pinned_malloc()
    sys.path.insert(0, str(HERE))
    import torch

    from common import environment

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/run.py: --device cuda but no CUDA device is available")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    print("environment:", env)
    rows = []
    suffix = f"{args.device}{'_quick' if args.quick else ''}"
    csv_path, png_path = out / f"bench_{suffix}.csv", out / f"bench_{suffix}.png"
    for fam in args.only:
        mod = importlib.import_module(f"bench_{fam}")
        fam_rows = mod.run(args.device, args.quick, rounds=args.rounds)
        write_csv(fam_rows, csv_path, env)  # family by family: a run stopped early keeps what it measured
        rows += fam_rows
    print_table(rows)
    write_png(rows, png_path, f"peftcore bench ({args.device}: {env['gpu'] or env['cpu']}, {env['threads']} threads)")
    print(f"\nwrote {csv_path} and {png_path}")


if __name__ == "__main__":
    main()
