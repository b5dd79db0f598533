"""pytest-benchmark over the bench cases (bench/test_bench.py): ``pytest bench/ --benchmark-only``.

Options: ``--bench-device cuda`` (default cpu), ``--bench-full`` (every comparison of every family at the quick
sizes, not the headline comparisons alone). The README's test command (``pytest tests``) does not collect bench/.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench modules import each other by name


def pytest_addoption(parser):
    group = parser.getgroup("peftcore bench")
    group.addoption("--bench-device", default="cpu", choices=["cpu", "cuda"],
                    help="device of the bench cases (default cpu)")
    group.addoption("--bench-full", action="store_true",
                    help="every comparison of every family (quick sizes), not only the headline comparisons")
