"""Shared bench machinery: side-by-side timing (interleaved rounds, median), peak memory, rows for the CSV.

Timing: the methods of one comparison are timed call by call in interleaved rounds within one run (GPU:
synchronised around each sample) and each one's median over rounds is kept, so the ratios see the same machine
state (these machines are noisy).

Peak memory: GPU, torch.cuda.max_memory_allocated above the memory held before the step; CPU, the process's
resident high-water mark (VmHWM, reset through /proc/self/clear_refs) above its resident size before the step,
with glibc's mmap threshold pinned (bench/run.py sets MALLOC_MMAP_THRESHOLD_) so freed buffers leave at once.

Collecting (``collecting()``): a family's ``run()`` executed inside it times nothing; every ``compare()`` call hands
its callables to the collector instead (bench/test_bench.py runs them under pytest-benchmark, one group per call).
"""
from __future__ import annotations

import contextlib
import gc
import os
import re
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the plain-torch references live with the tests: one reference, not two


def _proc_mem():
    try:
        s = Path("/proc/self/status").read_text()
        return (int(re.search(r"VmHWM:\s+(\d+)", s).group(1)) * 1024,
                int(re.search(r"VmRSS:\s+(\d+)", s).group(1)) * 1024)
    except (OSError, AttributeError):
        return None


_collector = None  # a list while collecting(): compare() appends its callables there and times nothing


@contextlib.contextmanager
def collecting():
    """Within: ``compare()`` records ``{key: callable}`` per call (and answers 1.0 for every key), ``peak_memory()``
    answers 0 without calling; yields the list of recorded dicts, one per ``compare()`` call, in order."""
    global _collector
    saved, _collector = _collector, []
    try:
        yield _collector
    finally:
        _collector = saved


def peak_memory(fn, device: str) -> float:
    """Bytes allocated at the peak of one call of fn, above what was held before it."""
    if _collector is not None:
        return 0.0
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    m = _proc_mem()
    if m is None:
        return float("nan")
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return float("nan")
    before = _proc_mem()[1]
    fn()
    return float(max(0, _proc_mem()[0] - before))


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _calls_per_sample(fn, device: str, target: float) -> int:
    """How many back-to-back calls make one sample of at least `target` seconds (fast ops need several)."""
    import time

    fn()
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    dt = max(time.perf_counter() - t, 1e-7)
    return max(1, int(target / dt))


def compare(fns: dict, device: str, rounds: int = 15, target: float = 0.01) -> dict:
    """{name: median seconds per call} for callables timed side by side.

    Every round times each callable once (one sample = enough back-to-back calls to last `target` seconds,
    CUDA-synchronised on GPU), so slow drifts of the machine hit every method alike; the median over rounds is
    kept. Interleaving call by call matters on these shared machines: timing one method for a second, then the
    next, gave ratios off by 10-15% against the interleaved ones.
    """
    import time

    if _collector is not None:
        _collector.append(dict(fns))
        return {k: 1.0 for k in fns}
    reps = {k: _calls_per_sample(f, device, target) for k, f in fns.items()}
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            _sync(device)
            t = time.perf_counter()
            for _ in range(reps[k]):
                f()
            _sync(device)
            times[k].append((time.perf_counter() - t) / reps[k])
    return {k: statistics.median(v) for k, v in times.items()}


def environment() -> dict:
    import platform

    import peftcore

    info = peftcore.build_info()
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cuda_archs": info["cuda_archs"],
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "",
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                env["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env["nproc"] = os.cpu_count()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else env["nproc"]
    env["machine"] = env["gpu"] or f"{env['cpu']}, {cores} cores"
    env["commit"] = _commit()
    return env


def _commit() -> str:
    """The tree's git commit (with "+dirty" when tracked files differ from it), "" outside a git checkout."""
    import subprocess

    try:
        sha = subprocess.run(["git", "rev-parse", "--short=10", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not sha:
            return ""
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


@contextlib.contextmanager
def timing_malloc():
    """Whole-model training steps allocate hundreds of buffers above bench/run.py's pinned mmap threshold (128 KiB,
    set for exact CPU peak memory): each is a fresh mmap, page-faulted in and unmapped on free, which made a step
    5-15x slower here and its time meaningless (token_elim: 0.45 s -> 2.5-7.6 s at L=1024). Timed rounds of whole
    models run inside this: glibc's threshold raised to 32 MiB (mallopt at run time), restored on exit. Freed heap
    stays resident afterwards and hides later allocations from peak_memory: measure peaks before, not after."""
    import ctypes

    pinned = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        libc = None
    if libc is None or pinned is None:
        yield
        return
    libc.mallopt(-3, 32 * 2 ** 20)  # M_MMAP_THRESHOLD
    try:
        yield
    finally:
        libc.mallopt(-3, int(pinned))


def forward_only(f):
    """A callable running f() under no_grad (the inference forward)."""
    def run():
        with torch.no_grad():
            f()
    return run


def train_step(f, wrt, g, after=None):
    """A callable running f() and its backward into the tensors `wrt` with output gradient g (no .grad left)."""
    def run():
        grads = torch.autograd.grad(f(), wrt, g)
        if after is not None:
            after(grads)
    return run


def backward_only(f, wrt, g, after=None):
    """A callable running only the backward: the graph of f() is built on the first call and kept
    (retain_graph), so each call times the gradient computation alone."""
    state = {}

    def run():
        if "y" not in state:
            state["y"] = f()
        grads = torch.autograd.grad(state["y"], wrt, g, retain_graph=True)
        if after is not None:
            after(grads)
    return run


def op_rows(family: str, case: str, pairs: dict, device: str, rounds: int, density="") -> list:
    """Rows for standalone ops, each timed (no grad) beside the plain-torch way of getting the same result.

    ``pairs``: ``{op_name: (peftcore fn, baseline fn, baseline name)}``; ratios are time / the baseline's.
    """
    fns = {}
    for op, (mine, base, _) in pairs.items():
        fns[(op, "peftcore")] = mine
        fns[(op, "baseline")] = base
    rows = []
    with torch.no_grad():
        times = compare(fns, device, rounds=max(3, rounds // 2))
        for op, (mine, base, base_name) in pairs.items():
            for who, fn in (("peftcore", mine), ("baseline", base)):
                t = times[(op, who)]
                rows.append(dict(family=family, op=op, case=case, method=op if who == "peftcore" else base_name,
                                 density=density, mode="op", ms=t * 1e3, ratio=t / times[(op, "baseline")],
                                 ratio_to=base_name, peak_mb=peak_memory(fn, device) / 2 ** 20, device=device))
    return rows
