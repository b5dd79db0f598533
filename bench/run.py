"""The benchmark suite: the families' benches, a table on screen, rows appended to a CSV (every row records the
machine), the headline summary (summary_<device>.md / .csv) and a PNG chart.

    python bench/run.py                       # the headline comparisons, one per family (~3 min on 2 cores)
    python bench/run.py --full                # every case of every family (~10 min on 2 cores)
    python bench/run.py --only sparse_delta   # one family's whole bench (add --headline for its headline alone)
    python bench/run.py [--device cpu|cuda] [--quick] [--rounds N] [--out DIR]
    python bench/run.py --summarize bench/results/bench_cpu.csv   # summary + PNG of a recorded CSV, no measuring

Output: by default a new folder bench/out/<UTC time>/ per run, with bench/out/latest pointing at the newest;
bench/out/ is not tracked, so a run never modifies the repository. ``--out DIR`` writes into DIR instead (the
CSV there is appended to): the recorded figures in bench/results/ are a run written there on purpose
(``--out bench/results``).

Ratios are time / baseline time measured side by side in the same run; peak memory is what one call allocates
above what it held before (see bench/common.py). The summary's ratio is peftcore's time / its anchor's.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# token_elim last: its timed rounds run under timing_malloc (bench/common.py), which leaves freed heap resident and
# hides the CPU peak memory of whatever runs after it in the process.
FAMILIES = ["sparse_delta", "partial", "s2ft", "orthogonal", "blockdiag", "sparse_attn", "lora", "token_elim"]
FIELDS = ["timestamp", "family", "op", "case", "method", "density", "mode", "ms", "ratio", "ratio_to", "peak_mb",
          "saved_mb", "device", "env", "machine", "torch", "threads", "commit", "suite"]


def _reexec_with_pinned_malloc():
    # glibc's dynamic mmap threshold would keep freed large buffers resident and blur CPU peak memory.
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "131072"
        os.execv(sys.executable, [sys.executable, *sys.argv])


def print_table(rows):
    from summary import fmt_density

    cols = [("op", "op"), ("case", "case"), ("method", "method"), ("density", "density"), ("mode", "mode"),
            ("ms", "ms"), ("ratio", "x base"), ("ratio_to", "base"), ("peak_mb", "peak MB")]
    if any(r.get("saved_mb") not in ("", None) for r in rows):
        cols.append(("saved_mb", "saved for bwd MB"))

    def cell(r, k):
        v = r.get(k, "")
        if k == "density":
            return fmt_density(v)
        return f"{v:.{3 if k == 'ratio' else 2}f}" if isinstance(v, float) else str(v)

    table = [[cell(r, k) for k, _ in cols] for r in rows]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, (_, h) in enumerate(cols)]
    line = "  ".join(h.ljust(w) for (_, h), w in zip(cols, widths))
    print(line)
    print("-" * len(line))
    for t in table:
        print("  ".join(v.ljust(w) for v, w in zip(t, widths)))


def write_csv(rows, path: Path, env: dict, stamp: str, suite: str):
    """Appends rows to path. A file from before a column was added is rewritten once under the full header (its
    old rows get the new columns empty)."""
    fields = FIELDS
    if path.exists():
        with path.open() as f:
            reader = csv.DictReader(f)
            old = list(reader)
            fields = list(reader.fieldnames or [])
        missing = [k for k in FIELDS if k not in fields]
        if missing:
            fields += missing
            tmp = path.with_suffix(".tmp")
            with tmp.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields)
                w.writeheader()
                w.writerows(old)
            tmp.replace(path)
    new = not path.exists()
    env_s = ";".join(f"{k}={v}" for k, v in env.items())
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**{k: r.get(k, "") for k in fields}, "timestamp": stamp, "env": env_s,
                        "machine": env["machine"], "torch": env["torch"], "threads": env["threads"],
                        "commit": env["commit"], "suite": suite})


def run_folder(out) -> Path:
    """--out DIR as given, else a new bench/out/<UTC time>/ with bench/out/latest pointing at it."""
    if out is not None:
        p = Path(out)
        p.mkdir(parents=True, exist_ok=True)
        return p
    base = HERE / "out"
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    p = base / stamp
    n = 1
    while p.exists():  # two runs in one second
        n += 1
        p = base / f"{stamp}-{n}"
    p.mkdir(parents=True)
    latest = base / "latest"
    try:
        tmp = base / f".latest-{os.getpid()}"
        tmp.symlink_to(p.name, target_is_directory=True)
        tmp.replace(latest)
    except OSError:  # no symlinks here: a file naming the folder
        (base / "LATEST").write_text(p.name + "\n")
    return p


def headline_specs(families) -> list:
    """Every family's HEADLINE comparisons, with its peftcore methods and the method legend of its docstring."""
    from summary import DEFAULT_FLOOR, parse_methods

    specs = []
    for fam in families:
        mod = importlib.import_module(f"bench_{fam}")
        specs += [dict(s, ours=set(mod.OURS), floor=set(getattr(mod, "FLOOR", DEFAULT_FLOOR)),
                       methods=parse_methods(mod.__doc__)) for s in mod.HEADLINE]
    return specs


def report(rows, specs, out: Path, suffix: str, header_line: str, title: str):
    """Summary (screen, summary_<suffix>.md / .csv) and the PNG; returns the paths written."""
    from summary import headline_lines, write_png, write_summary

    lines = headline_lines(rows, specs)
    md, scsv, png = out / f"summary_{suffix}.md", out / f"summary_{suffix}.csv", out / f"bench_{suffix}.png"
    print()
    print(write_summary(lines, rows, md, scsv, header_line, specs))
    return [md, scsv] + ([png] if write_png(rows, lines, png, title) else [])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--out", default=None, help="folder of this run's files (default: a new bench/out/<UTC time>/)")
    ap.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    ap.add_argument("--only", nargs="*", default=None, metavar="FAMILY",
                    help=f"these families' whole benches (of {', '.join(FAMILIES)}; miss is in orthogonal)")
    ap.add_argument("--full", action="store_true", help="every case (default without --only: headlines only)")
    ap.add_argument("--headline", action="store_true", help="headline comparisons only, also with --only")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--summarize", metavar="CSV", help="no measuring: summary and PNG of the latest rows of CSV "
                                                       "(per family), written beside it (or into --out)")
    args = ap.parse_args()
    if args.full and args.headline:
        ap.error("--full and --headline exclude each other")
    families = FAMILIES if args.only is None else args.only
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown famil{'ies' if len(unknown) > 1 else 'y'} {', '.join(unknown)} "
                 f"(known: {', '.join(FAMILIES)}; miss is measured by orthogonal)")
    full = args.full or (args.only is not None and not args.headline)
    suite = ("full" if full else "headline") + (" quick" if args.quick else "")
    _reexec_with_pinned_malloc()
    sys.path.insert(0, str(HERE))

    if args.summarize:
        from summary import read_rows

        src = Path(args.summarize)
        rows = read_rows(src)
        out = Path(args.out) if args.out else src.parent
        out.mkdir(parents=True, exist_ok=True)
        device = rows[0]["device"] if rows else args.device
        suffix = src.stem.removeprefix("bench_")
        env = {k: rows[0].get(k, "") for k in ("machine", "torch", "threads", "commit")} if rows else {}
        if rows and not env["machine"]:  # a CSV from before the machine columns: its env column holds the same
            kv = dict(p.split("=", 1) for p in rows[0]["env"].split(";") if "=" in p)
            env = dict(machine=kv.get("gpu") or f"{kv.get('cpu', '?')}, {kv.get('nproc', '?')} cores",
                       torch=kv.get("torch", "?"), threads=kv.get("threads", "?"), commit="")
        stamps = sorted({r["timestamp"] for r in rows})
        when = stamps[-1] if len(stamps) == 1 else f"{stamps[0]} .. {stamps[-1]} (each family's latest run)"
        header = (f"{device}: {env.get('machine', '?')}, {env.get('threads', '?')} threads; torch "
                  f"{env.get('torch', '?')}; {when}; from {src}")
        title = f"peftcore bench, recorded run — {device}: {env.get('machine', '?')}, torch {env.get('torch', '?')}"
        paths = report(rows, headline_specs(FAMILIES), out, suffix, header, title)
        print("\nwrote " + ", ".join(str(p) for p in paths))
        return

    import torch

    from common import environment

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/run.py: --device cuda but no CUDA device is available")
    t0 = time.perf_counter()
    out = run_folder(args.out)
    env = environment()
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    print("environment:", env)
    print(f"suite: {suite} ({', '.join(families)}); output: {out}", flush=True)
    rows = []
    suffix = f"{args.device}{'_quick' if args.quick else ''}"
    csv_path = out / f"bench_{suffix}.csv"
    for fam in families:
        t = time.perf_counter()
        mod = importlib.import_module(f"bench_{fam}")
        fam_rows = mod.run(args.device, args.quick, rounds=args.rounds, headline=not full)
        write_csv(fam_rows, csv_path, env, stamp, suite)  # family by family: a run stopped early keeps what it measured
        rows += fam_rows
        print(f"bench: {fam} done in {time.perf_counter() - t:.0f} s", flush=True)
    print()
    print_table(rows)
    header = (f"{args.device}: {env['machine']}, {env['threads']} threads; torch {env['torch']}; commit "
              f"{env['commit'] or 'unknown'}; {stamp}; {suite} suite, {args.rounds} rounds")
    title = (f"peftcore bench, {suite} suite — {args.device}: {env['machine']}, {env['threads']} threads, "
             f"torch {env['torch']}")
    paths = report(rows, headline_specs(families), out, suffix, header, title)
    print(f"\nwrote {csv_path}, " + ", ".join(str(p) for p in paths))
    print(f"bench: {time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
