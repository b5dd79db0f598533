"""`pytest bench/ --benchmark-only` (docs/bench.md) works: every headline comparison of every family is collected
and runs as pytest-benchmark benchmarks, one group per comparison (no group mixes two comparisons; each headline
comparison's peftcore method and anchor share one), without failures. Timing settings are cut to the
minimum (one round each): this checks the interface, the figures come from bench/run.py."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_pytest_benchmark_interface(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        from run import FAMILIES, headline_specs
        specs = headline_specs(FAMILIES)
    finally:
        sys.path.pop(0)
    report = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "-q", "-p", "no:cacheprovider",
         "--benchmark-min-rounds=1", "--benchmark-max-time=0", "--benchmark-warmup=off",
         "--benchmark-disable-gc", f"--benchmark-json={report}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    benches = json.loads(report.read_text())["benchmarks"]
    groups = {b["group"] for b in benches}
    for fam in FAMILIES:  # each family's headline comparison is a group of at least two benchmarks
        mine = [g for g in groups if g.split()[0] == fam]
        assert mine, (fam, sorted(groups))
        assert all(sum(b["group"] == g for b in benches) >= 2 for g in mine), (fam, mine)
    assert all(b["stats"]["rounds"] >= 1 and b["stats"]["min"] > 0 for b in benches)
    # one group per comparison: a group never holds one method twice (two comparisons merged), and each headline
    # comparison's peftcore method and its anchor meet in one group
    members = {}
    for b in benches:
        method = b["param"].split(":", 1)[1].split("-")[0]
        members.setdefault(b["group"], []).append(method)
    for g, ms in members.items():
        assert len(ms) == len(set(ms)), (g, ms)
    for spec in specs:
        assert any(spec["family"] in g.split() and spec["method"] in ms and spec["anchor"] in ms
                   for g, ms in members.items()), (spec, members)
