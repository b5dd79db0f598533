"""pytest plugin used by bench/device_check.sh (`-p device_check_plugin` with bench/ on PYTHONPATH).

- Writes every collected test id to $PEFTCORE_CHECK_COLLECTED (one per line), so the per-op table can count the
  tests that never ran.
- Appends each test's outcome to $PEFTCORE_CHECK_PROGRESS as it happens (``outcome<TAB>nodeid<TAB>message``,
  flushed per line): when the step is killed at its time limit, before pytest writes its junit xml, the table
  is built from this file instead.
- Skips every test that starts after the epoch time $PEFTCORE_CHECK_DEADLINE ("deadline reached"), so the run
  ends on its own, junit xml included, inside the step's limit.

Works with and without pytest-xdist (collection and reports are seen on the controller; the deadline in each
worker).
"""
from __future__ import annotations

import os
import time

import pytest

_DEADLINE_REASON = "device_check: deadline reached, not run"


def _append(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def _write_ids(ids) -> None:
    path = os.environ.get("PEFTCORE_CHECK_COLLECTED")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(i + "\n" for i in ids)


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text[:limit]


def pytest_collection_finish(session):
    if session.items:  # plain run, or an xdist worker (the controller collects nothing)
        if not os.environ.get("PYTEST_XDIST_WORKER"):
            _write_ids(item.nodeid for item in session.items)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_node_collection_finished(node, ids):
    # Every worker collects the same ids; the first to finish writes them.
    path = os.environ.get("PEFTCORE_CHECK_COLLECTED")
    if path and not os.path.exists(path):
        _write_ids(ids)


def pytest_runtest_setup(item):
    deadline = os.environ.get("PEFTCORE_CHECK_DEADLINE")
    if deadline and time.time() > float(deadline):
        pytest.skip(_DEADLINE_REASON)


def pytest_runtest_logreport(report):
    path = os.environ.get("PEFTCORE_CHECK_PROGRESS")
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if report.when == "call" or (report.when == "setup" and not report.passed) or \
            (report.when == "teardown" and report.failed):
        if report.passed:
            outcome, msg = "passed", ""
        elif report.skipped:
            outcome = "skipped"
            lr = report.longrepr
            msg = lr[2] if isinstance(lr, tuple) and len(lr) == 3 else str(lr)
        else:
            outcome = "failed" if report.when == "call" else "error"
            crash = getattr(report.longrepr, "reprcrash", None)
            msg = crash.message if crash is not None else str(report.longrepr)
        _append(path, f"{outcome}\t{report.nodeid}\t{_one_line(msg)}")
