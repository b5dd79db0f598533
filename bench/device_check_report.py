"""Per-op PASS / FAIL table of a CUDA test run, for bench/device_check.sh.

    python bench/device_check_report.py --junit OUT/junit-cuda.xml [--progress OUT/tests-progress.tsv]
        [--collected OUT/tests-collected.txt] --csv OUT/ops.csv
    python bench/device_check_report.py --synthetic OUT/tests-collected.txt --junit OUT/junit-synthetic.xml

Results come from pytest's junit xml; when that is missing or unreadable (pytest killed at the step's limit) from
the progress file that bench/device_check_plugin.py writes as tests finish. Tests in the collected list without a
result count as not run.

Each test maps to an op by name: the longest CUDA op name (the `m.impl("...")` registrations in
csrc/<family>/<family>_cuda.cpp) found in the test's function name or parameters, e.g.
`test_reference[cuda-block_sparse_attn]` -> block_sparse_attn; a test naming no op counts for its family, taken
from the test file's name (tests/test_sparse_attn.py -> sparse_attn), as `<family> (other tests)`. Every CUDA op
gets a row, with status NO TESTS when no test names it.

Status per row: FAIL (a test failed or errored), INCOMPLETE (none failed, some not run), PASS (none failed, all
ran, at least one passed), SKIP (all skipped), NO TESTS. Exit status 0 when the table was written (whatever it
says); 2 when there were no results at all.

--synthetic writes a junit xml from a collected list (every test passed, except the first, failed with a planted
message, and the last, skipped): the dry run of device_check.sh checks this post-processing with it.
"""
from __future__ import annotations

import argparse
import csv
import re
import sys
import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLANTED = "planted failure (dry run of device_check.sh)"
DEADLINE = "deadline reached"
FIELDS = ["family", "op", "status", "passed", "failed", "skipped", "not_run", "first_failure"]


def cuda_ops(root: Path = ROOT) -> "OrderedDict[str, str]":
    """op -> family, for every op with a CUDA kernel (registered in csrc/<family>/*_cuda.cpp)."""
    ops = OrderedDict()
    for path in sorted((root / "csrc").glob("*/*_cuda.cpp")):
        for name in re.findall(r'm\.impl\(\s*"([A-Za-z0-9_]+)"', path.read_text()):
            ops.setdefault(name, path.parent.name)
    return ops


def families(root: Path = ROOT) -> list:
    return sorted(p.name for p in (root / "csrc").iterdir() if p.is_dir())


def split_id(nodeid: str):
    """'tests/test_x.py::Cls::test_y[p]' -> ('test_x', 'test_y[p]')."""
    parts = nodeid.split("::")
    module = Path(parts[0]).name
    if module.endswith(".py"):
        module = module[:-3]
    return module, parts[-1]


def family_of(module: str, fams: list) -> str:
    stem = module[5:] if module.startswith("test_") else module
    best = ""
    for f in fams:
        if (stem == f or stem.startswith(f + "_")) and len(f) > len(best):
            best = f
    return best or stem


def op_of(name: str, ops: dict) -> str:
    best = ""
    for op in ops:
        if len(op) > len(best) and re.search(r"(?<![A-Za-z0-9])" + re.escape(op) + r"(?![A-Za-z0-9])", name):
            best = op
    return best


def one_line(text, limit=200) -> str:
    return " ".join(str(text or "").split())[:limit]


def read_junit(path: Path) -> "OrderedDict[tuple, tuple]":
    """(module, name) -> (outcome, message); outcome passed / failed / skipped / not_run."""
    res = OrderedDict()
    root = ET.parse(path).getroot()
    for tc in root.iter("testcase"):
        cls, name = tc.get("classname", ""), tc.get("name", "")
        module = next((p for p in cls.split(".") if p.startswith("test_")), cls.split(".")[-1])
        outcome, msg = "passed", ""
        for child in tc:
            if child.tag in ("failure", "error"):
                outcome, msg = "failed", child.get("message") or (child.text or "")
                break
            if child.tag == "skipped":
                msg = child.get("message") or ""
                outcome = "not_run" if DEADLINE in msg else "skipped"
        res[(module, name)] = (outcome, one_line(msg))
    return res


def read_progress(path: Path) -> "OrderedDict[tuple, tuple]":
    res = OrderedDict()
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        outcome, nodeid, msg = parts[0], parts[1], parts[2] if len(parts) > 2 else ""
        outcome = {"error": "failed"}.get(outcome, outcome)
        if outcome == "skipped" and DEADLINE in msg:
            outcome = "not_run"
        key = split_id(nodeid)
        if res.get(key, ("passed",))[0] != "failed":  # a teardown error after a pass counts as a failure
            res[key] = (outcome, one_line(msg))
    return res


def build_table(results: dict, collected: list, ops: dict, fams: list) -> list:
    rows = OrderedDict()
    for op, fam in ops.items():  # every CUDA op gets a row, in registration order
        rows[(fam, op)] = {"family": fam, "op": op, "passed": 0, "failed": 0, "skipped": 0, "not_run": 0,
                           "first_failure": ""}
    keys = list(results)
    for nodeid in collected:
        key = split_id(nodeid)
        if key not in results:
            keys.append(key)
    for key in keys:
        module, name = key
        outcome, msg = results.get(key, ("not_run", ""))
        op = op_of(name, ops)
        fam = ops[op] if op else family_of(module, fams)
        rk = (fam, op or f"{fam} (other tests)")
        row = rows.setdefault(rk, {"family": fam, "op": rk[1], "passed": 0, "failed": 0, "skipped": 0,
                                   "not_run": 0, "first_failure": ""})
        row[outcome] += 1
        if outcome == "failed" and not row["first_failure"]:
            row["first_failure"] = one_line(f"{module}::{name}: {msg}", 300)
    for row in rows.values():
        if row["failed"]:
            row["status"] = "FAIL"
        elif row["not_run"]:
            row["status"] = "INCOMPLETE"
        elif row["passed"]:
            row["status"] = "PASS"
        elif row["skipped"]:
            row["status"] = "SKIP"
        else:
            row["status"] = "NO TESTS"
    order = {f: i for i, f in enumerate(dict.fromkeys(ops.values()))}
    return sorted(rows.values(), key=lambda r: (order.get(r["family"], len(order)), r["family"],
                                                r["op"].endswith("(other tests)")))


def print_table(rows: list, source: str) -> None:
    cols = ["family", "op", "status", "passed", "failed", "skipped", "not_run"]
    w = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print(f"per-op CUDA test results (from {source})")
    print("  ".join(c.ljust(w[c]) for c in cols) + "  first failure")
    for r in rows:
        print("  ".join(str(r[c]).ljust(w[c]) for c in cols) + "  " + r["first_failure"][:120])
    n = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "FAIL", "INCOMPLETE", "SKIP", "NO TESTS")}
    print("ops: " + ", ".join(f"{v} {k}" for k, v in n.items() if v))


def write_synthetic(collected: list, out: Path) -> None:
    suite = ET.Element("testsuite", name="pytest (synthetic)", tests=str(len(collected)))
    for i, nodeid in enumerate(collected):
        path, _, rest = nodeid.partition("::")
        cls = path[:-3].replace("/", ".") if path.endswith(".py") else path
        if "::" in rest:
            c, _, rest = rest.rpartition("::")
            cls += "." + c.replace("::", ".")
        tc = ET.SubElement(suite, "testcase", classname=cls, name=rest, time="0.0")
        if i == 0:
            ET.SubElement(tc, "failure", message=f"AssertionError: {PLANTED}").text = PLANTED
        elif i == len(collected) - 1 and i > 0:
            ET.SubElement(tc, "skipped", type="pytest.skip", message="synthetic skip")
    root = ET.Element("testsuites")
    root.append(suite)
    ET.ElementTree(root).write(out, encoding="utf-8", xml_declaration=True)


def read_collected(path) -> list:
    if not path or not Path(path).is_file():
        return []
    return [l.strip() for l in Path(path).read_text().splitlines() if "::" in l]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--junit")
    ap.add_argument("--progress")
    ap.add_argument("--collected")
    ap.add_argument("--csv")
    ap.add_argument("--synthetic", metavar="COLLECTED", help="write a synthetic junit xml (to --junit) and stop")
    ap.add_argument("--root", default=str(ROOT), help="source tree whose csrc/ names the CUDA ops")
    a = ap.parse_args(argv)
    root = Path(a.root)
    if a.synthetic:
        ids = read_collected(a.synthetic)
        if not ids or not a.junit:
            print(f"device_check_report: no collected test ids in {a.synthetic}", file=sys.stderr)
            return 2
        write_synthetic(ids, Path(a.junit))
        print(f"wrote {a.junit}: {len(ids)} synthetic results (1 planted failure, 1 skip)")
        return 0
    results, source = None, None
    if a.junit and Path(a.junit).is_file():
        try:
            results, source = read_junit(Path(a.junit)), Path(a.junit).name
        except ET.ParseError as e:
            print(f"device_check_report: {a.junit} unreadable ({e}); using the progress file", file=sys.stderr)
    if results is None and a.progress and Path(a.progress).is_file():
        results, source = read_progress(Path(a.progress)), Path(a.progress).name + " (junit xml missing)"
    collected = read_collected(a.collected)
    if not results and not collected:
        print("device_check_report: no test results and no collected list", file=sys.stderr)
        return 2
    ops = cuda_ops(root)
    rows = build_table(results or {}, collected, ops, families(root))
    print_table(rows, source or "collected list only: nothing ran")
    if a.csv:
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows({k: r[k] for k in FIELDS} for r in rows)
        print(f"wrote {a.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
