"""Shared bench machinery: side-by-side timing (interleaved rounds, median), peak memory, rows for the CSV.

Timing: CPU uses torch.utils.benchmark.Timer (handles threads and warm-up); GPU uses CUDA events. Methods of one
comparison are measured in interleaved rounds within one run and each one's median over rounds is kept, so the
ratios see the same machine state (these machines are noisy).

Peak memory: GPU, torch.cuda.max_memory_allocated above the memory held before the step; CPU, the process's
resident high-water mark (VmHWM, reset through /proc/self/clear_refs) above its resident size before the step,
with glibc's mmap threshold pinned (bench/run.py sets MALLOC_MMAP_THRESHOLD_) so freed buffers leave at once.
"""
from __future__ import annotations

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


def peak_memory(fn, device: str) -> float:
    """Bytes allocated at the peak of one call of fn, above what was held before it."""
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


def _time_once(fn, device: str, min_run_time: float) -> float:
    if device == "cuda":
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        n = 5
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        per = start.elapsed_time(end) / 1e3 / n
        reps = max(1, int(min_run_time / max(per, 1e-6)))
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    from torch.utils.benchmark import Timer

    t = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=min_run_time).median


def compare(fns: dict, device: str, rounds: int = 3, min_run_time: float = 0.3) -> dict:
    """{name: median seconds} for callables measured in interleaved rounds."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            times[k].append(_time_once(f, device, min_run_time))
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
    return env
