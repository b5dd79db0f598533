#!/usr/bin/env python3
"""Mutation check: apply deliberate bugs to the kernels one at a time and report which the tests miss.

Each family lists its bugs in ``scripts/mutations/<family>.py``::

    MUTATIONS = [dict(name="...", file="csrc/<family>/<family>_cpu.cpp", find="exact text, once",
                      replace="the buggy text", tests="tests/test_<family>.py")]

For every mutation: the file is patched (``find`` must occur exactly once), peftcore is rebuilt (scripts/setup.sh,
incremental), ``pytest -x -q <tests>`` runs, and the file is restored whatever happens; a final rebuild leaves the
build matching the tree. A mutation the tests do not fail on is MISSED. Exit status 1 if any is missed.

    python scripts/mutate.py FAMILY [FAMILY ...] [--only NAME] [--list]

Run it from a checkout where ``bash scripts/test.sh`` works; it modifies tracked files only while it runs.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUT_DIR = ROOT / "scripts" / "mutations"


def load(family: str) -> list:
    path = MUT_DIR / f"{family}.py"
    if not path.exists():
        sys.exit(f"mutate: no mutation list {path}")
    spec = importlib.util.spec_from_file_location(f"mutations_{family}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = []
    for m in mod.MUTATIONS:
        missing = {"name", "file", "find", "replace", "tests"} - set(m)
        if missing:
            sys.exit(f"mutate: {family} mutation {m.get('name', '?')} lacks {sorted(missing)}")
        out.append(dict(m, family=family))
    return out


def build(env) -> None:
    r = subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("build failed:\n" + (r.stdout + r.stderr)[-4000:])


def run_one(m: dict, env, timeout: float) -> tuple:
    path = ROOT / m["file"]
    original = path.read_text()
    count = original.count(m["find"])
    if count != 1:
        return "BAD", f"'find' occurs {count} times in {m['file']}"
    t0 = time.time()
    try:
        path.write_text(original.replace(m["find"], m["replace"]))
        try:
            build(env)
        except RuntimeError as e:
            return "BAD", f"mutant does not build: {str(e)[-300:]}"
        tests = m["tests"].split() if isinstance(m["tests"], str) else list(m["tests"])
        try:
            r = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "pytest", "-x", "-q",
                                "-p", "no:cacheprovider", *tests], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "caught", f"tests timed out after {timeout:.0f} s ({time.time() - t0:.0f} s)"
        if r.returncode == 0:
            return "MISSED", f"{m['tests']} pass ({time.time() - t0:.0f} s)"
        failed = [ln for ln in r.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))]
        return "caught", (failed[0][:140] if failed else f"exit {r.returncode}") + f" ({time.time() - t0:.0f} s)"
    finally:
        path.write_text(original)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("families", nargs="+")
    ap.add_argument("--only", action="append", default=[], help="run only the mutation(s) with this name")
    ap.add_argument("--list", action="store_true", help="list the mutations and exit")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds for one mutant's tests")
    args = ap.parse_args()
    muts = [m for f in args.families for m in load(f)]
    if args.only:
        muts = [m for m in muts if m["name"] in args.only]
    if args.list:
        for m in muts:
            print(f"{m['family']:12s} {m['name']:40s} {m['file']}  ->  {m['tests']}")
        return 0
    env = dict(os.environ, PEFTCORE_CUDA=os.environ.get("PEFTCORE_CUDA", "OFF"))
    results = []
    try:
        for m in muts:
            status, detail = run_one(m, env, args.timeout)
            results.append((m, status, detail))
            print(f"{status:7s} {m['family']}/{m['name']}: {detail}", flush=True)
    finally:
        build(env)  # the build matches the restored tree again
    missed = [m for m, s, _ in results if s != "caught"]
    print(f"\n{len(results) - len(missed)} of {len(results)} mutations caught"
          + (f"; not caught or bad: {', '.join(m['family'] + '/' + m['name'] for m in missed)}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
