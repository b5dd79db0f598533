"""The bench cases under pytest-benchmark, for people who expect that interface:

    pytest bench/ --benchmark-only                       # the headline comparisons, quick sizes, CPU
    pytest bench/ --benchmark-only --bench-full          # every comparison of every family, quick sizes
    pytest bench/ --benchmark-only --bench-device cuda   # on a GPU (synchronised after every call)
    pytest bench/ --benchmark-only -k sparse_delta       # one family

Each family's ``run()`` (bench/bench_<family>.py, quick sizes) executes once at collection inside
``common.collecting()``: its ``compare()`` calls hand over the callables they would time instead of timing them.
Every callable becomes one benchmark; the benchmarks of one comparison share a pytest-benchmark group. The figures
on record (bench/results/, the README) come from bench/run.py, whose interleaved rounds (common.compare) are the
source of the ratios; pytest-benchmark times each callable on its own, one after the other.
"""
from __future__ import annotations

import dataclasses
import importlib

import pytest

from run import FAMILIES

MODES = ("forward", "backward", "train_step")


@dataclasses.dataclass
class Case:
    id: str
    group: str
    fn: object = None
    error: str = ""


def _label(part) -> str:
    if isinstance(part, float):
        return f"{part * 100:.3g}%"
    return str(part)


def _split(key):
    """(comparison, method) of a compare() key: a name, or a tuple of names, densities and a mode. The tuple's last
    non-mode string is the method; earlier strings (orthogonal's kind, an op's name) and the mode name the
    comparison; numbers (densities) stay with the method."""
    if not isinstance(key, tuple):
        return "", str(key)
    mode = [p for p in key if p in MODES]
    strings = [p for p in key if isinstance(p, str) and p not in MODES]
    method = strings[-1] if strings else ""
    extra = [_label(p) for p in key if p is not None and not isinstance(p, str)]
    return " ".join(strings[:-1] + mode), " ".join([method, *extra]).strip()


def _collect(device: str, full: bool) -> list:
    import torch

    from common import collecting

    if device == "cuda" and not torch.cuda.is_available():
        return [Case(id="cuda-unavailable", group="", error="skip: --bench-device cuda but no CUDA device")]
    cases = []
    for fam in FAMILIES:
        try:
            mod = importlib.import_module(f"bench_{fam}")
            with collecting() as calls:
                mod.run(device, True, rounds=1, headline=not full)
        except Exception as e:  # noqa: BLE001 - reported by the family's one failing case
            cases.append(Case(id=f"{fam}-collect", group=fam, error=f"{type(e).__name__}: {e}"))
            continue
        for i, fns in enumerate(calls):
            for key, fn in fns.items():
                comparison, method = _split(key)
                group = " ".join(p for p in (fam, f"#{i + 1}" if len(calls) > 1 else "", comparison) if p)
                cases.append(Case(id=f"{group}:{method}".replace(" ", "-"), group=group, fn=fn))
    return cases


def pytest_generate_tests(metafunc):
    if "bench_case" in metafunc.fixturenames:
        cases = _collect(metafunc.config.getoption("--bench-device"), metafunc.config.getoption("--bench-full"))
        metafunc.parametrize("bench_case", cases, ids=[c.id for c in cases])


def test_bench(bench_case, benchmark, request):
    if bench_case.error.startswith("skip: "):
        pytest.skip(bench_case.error[6:])
    if bench_case.error:
        pytest.fail(f"collecting the bench case failed: {bench_case.error}")
    benchmark.group = bench_case.group
    fn = bench_case.fn
    if request.config.getoption("--bench-device") == "cuda":
        import torch

        inner = fn

        def fn():
            inner()
            torch.cuda.synchronize()
    benchmark(fn)
