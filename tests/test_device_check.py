"""bench/device_check.sh, the one-run GPU check, rehearsed without a GPU (--dry) on every test run, and its per-op
table (bench/device_check_report.py) on hand-made junit xml / progress files."""
from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_spec = importlib.util.spec_from_file_location("device_check_report", ROOT / "bench" / "device_check_report.py")
rep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rep)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    if shutil.which("timeout") is None:
        pytest.skip("coreutils timeout is not installed")
    out = tmp_path_factory.mktemp("device_check")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEFTCORE_CHECK_")}
    env["PYTHON"] = sys.executable
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    res = subprocess.run(["bash", str(ROOT / "bench" / "device_check.sh"), "--dry", "--archive",
                          str(out / "dc.tar.gz"), str(out / "dc")], capture_output=True, text=True, timeout=300,
                         env=env)
    return res, out / "dc"


def test_dry_run_passes_and_writes_its_summary(dry_run):
    res, out = dry_run
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert "result: PASS" in summary and summary.strip() in res.stdout
    steps = {r["step"]: r["result"] for r in _rows(out / "steps.csv")}
    for step in ("env", "cutlass", "build", "import", "tests", "memcheck", "racecheck", "sanitize_plain", "bench",
                 "bench-cmd", "sanitize-coverage", "report"):
        assert step in steps, (step, steps)
    assert all(r.startswith(("PASS", "DRY ok")) for r in steps.values()), steps
    assert (out.parent / "dc.tar.gz").is_file()
    # the real run's command lines were checked, not run
    assert "compute-sanitizer --tool memcheck" in (out / "memcheck.log").read_text()
    assert "--device cuda" in (out / "bench-cmd.log").read_text()


def test_dry_run_collects_every_gpu_test_and_maps_each_op(dry_run):
    res, out = dry_run
    ids = (out / "tests-collected.txt").read_text().split()
    assert len(ids) > 50 and all("cuda" in i for i in ids), ids[:5]
    rows = {r["op"]: r for r in _rows(out / "ops.csv")}
    cuda_ops = rep.cuda_ops(ROOT)
    assert len(cuda_ops) > 20
    for op in cuda_ops:  # every CUDA op has a row and at least one CUDA test naming it
        assert op in rows, op
        assert int(rows[op]["passed"]) + int(rows[op]["failed"]) + int(rows[op]["skipped"]) > 0, rows[op]
    assert sum(int(r["passed"]) + int(r["failed"]) + int(r["skipped"]) for r in rows.values()) == len(ids)
    failed = [r for r in rows.values() if r["status"] == "FAIL"]  # the synthetic junit's planted failure only
    assert len(failed) == 1 and rep.PLANTED in failed[0]["first_failure"], failed


def _junit(tmp_path, cases):
    suite = ET.Element("testsuite")
    for cls, name, kind, msg in cases:
        tc = ET.SubElement(suite, "testcase", classname=cls, name=name)
        if kind:
            ET.SubElement(tc, kind, message=msg)
    root = ET.Element("testsuites")
    root.append(suite)
    path = tmp_path / "j.xml"
    ET.ElementTree(root).write(path)
    return path


def test_report_from_junit(tmp_path):
    j = _junit(tmp_path, [
        ("tests.test_sparse_attn", "test_reference[cuda-block_sparse_attn]", None, ""),
        ("tests.test_sparse_attn", "test_reference[cuda-block_sparse_attn_backward]", "failure", "AssertionError: x\ny"),
        ("tests.test_sparse_attn", "test_cuda_limits_and_graph_capture[cuda]", "error", "CUDA error"),
        ("tests.test_partial", "test_opcheck[cuda-partial_linear]", "skipped", "device_check: deadline reached, not run"),
        ("tests.test_partial", "test_reference[cuda-partial_linear]", None, ""),
        ("tests.test_miss", "test_reference[cuda-miss_fold]", "skipped", "no CUDA device"),
    ])
    collected = tmp_path / "ids.txt"
    collected.write_text("tests/test_token_elim.py::test_reference[cuda-token_gather]\n"
                         "tests/test_partial.py::test_reference[cuda-partial_linear]\n")
    csv_path = tmp_path / "ops.csv"
    assert rep.main(["--junit", str(j), "--collected", str(collected), "--csv", str(csv_path)]) == 0
    rows = {r["op"]: r for r in _rows(csv_path)}
    assert rows["block_sparse_attn"]["status"] == "PASS"
    bw = rows["block_sparse_attn_backward"]
    assert (bw["status"], bw["failed"]) == ("FAIL", "1")
    assert bw["first_failure"] == "test_sparse_attn::test_reference[cuda-block_sparse_attn_backward]: AssertionError: x y"
    assert rows["sparse_attn (other tests)"]["status"] == "FAIL"
    assert (rows["partial_linear"]["status"], rows["partial_linear"]["not_run"]) == ("INCOMPLETE", "1")
    assert rows["miss_fold"]["status"] == "SKIP"
    assert (rows["token_gather"]["status"], rows["token_gather"]["not_run"]) == ("INCOMPLETE", "1")
    assert rows["token_scatter_add"]["status"] == "NO TESTS"
    assert rows["sparse_delta_linear"]["family"] == "sparse_delta"


def test_report_falls_back_to_progress_when_junit_is_missing(tmp_path):
    prog = tmp_path / "p.tsv"
    prog.write_text("passed\ttests/test_miss.py::test_reference[cuda-miss_fold]\t\n"
                    "failed\ttests/test_miss.py::test_reference[cuda-miss_unfold]\tRuntimeError: boom\n"
                    "passed\ttests/test_miss.py::test_reference[cuda-miss_unfold]\t\n")  # teardown after a failure
    collected = tmp_path / "ids.txt"
    collected.write_text("tests/test_miss.py::test_reference[cuda-miss_fold]\n"
                         "tests/test_miss.py::test_reference[cuda-miss_unfold]\n"
                         "tests/test_miss.py::test_opcheck[cuda-miss_fold]\n")
    csv_path = tmp_path / "ops.csv"
    assert rep.main(["--junit", str(tmp_path / "missing.xml"), "--progress", str(prog), "--collected",
                     str(collected), "--csv", str(csv_path)]) == 0
    rows = {r["op"]: r for r in _rows(csv_path)}
    assert (rows["miss_fold"]["status"], rows["miss_fold"]["passed"], rows["miss_fold"]["not_run"]) == \
        ("INCOMPLETE", "1", "1")
    assert rows["miss_unfold"]["status"] == "FAIL" and "boom" in rows["miss_unfold"]["first_failure"]
    assert rep.main(["--junit", str(tmp_path / "missing.xml"), "--csv", str(csv_path)]) == 2


def test_op_names_longest_match():
    ops = rep.cuda_ops(ROOT)
    assert rep.op_of("test_reference[cuda-sparse_delta_merge_]", ops) == "sparse_delta_merge_"
    assert rep.op_of("test_reference[cuda-sparse_delta_merge]", ops) == "sparse_delta_merge"
    assert rep.op_of("test_opcheck[cuda-monarch_matmul_with_h]", ops) == "monarch_matmul_with_h"
    assert rep.op_of("test_cuda_matches_cpu_at_tile_shapes[1-dtype0]", ops) == ""
    assert rep.family_of("test_sparse_delta_tuner", rep.families(ROOT)) == "sparse_delta"
