"""Per-kernel resource usage of the built CUDA extension (peftcore._C), from `cuobjdump --dump-resource-usage`.

    python bench/cuda_resources.py                       # writes bench/results/cuda_resources.csv
    python bench/cuda_resources.py --out /tmp/r.csv      # anywhere else
    python bench/cuda_resources.py --so path/to/_C.so --cuobjdump path/to/cuobjdump

One row per kernel and arch (the machine code the build holds: sm_80, sm_90, ...): family (the kernel's namespace
peftcore::<family>), kernel (demangled, shortened: namespaces and the parameter list dropped, dtypes abbreviated),
REG (registers per thread), STACK (per-thread stack frame bytes), SHARED (static shared memory bytes per block as
cuobjdump reports it; dynamic shared memory is sized at launch and shows nowhere here), smem_static (SHARED less
the 1 KB per block that the system reserves, which cuobjdump includes for sm_90 code: the kernel's own static
shared memory, what counts against the opt-in limit), LOCAL (local memory bytes per thread),
CONSTANT0 (kernel parameter bank bytes) and the mangled name.

cuobjdump gives no spill-store / spill-load counts: a register spill, like any array the compiler could not keep
in registers, shows up as a non-zero STACK (and LOCAL). tests/test_cuda_resources.py requires both to be 0.

cuobjdump comes from the `nvidia-cuda-cuobjdump` wheel (scripts/setup.sh installs it into .venv): it is looked
for in $CUOBJDUMP, next to this Python (its venv's bin/ and site-packages/nvidia/*/bin), on PATH, then in
$CUDA_HOME/bin. Names are demangled with cu++filt or c++filt when either is found (else left mangled).
"""
from __future__ import annotations

import argparse
import csv
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "cuda_resources.csv"
FIELDS = ["family", "kernel", "arch", "reg", "stack", "shared", "smem_static", "local", "constant0", "mangled"]
INT_FIELDS = ("reg", "stack", "shared", "smem_static", "local", "constant0")
SM90_RESERVED = 1024  # shared memory per block the system reserves; cuobjdump counts it in SHARED of sm_90 code


def find_tool(name: str, env: str | None = None) -> str | None:
    if env and os.environ.get(env):
        return os.environ[env]
    cands = [Path(sys.executable).parent / name]
    for sp in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        cands += [Path(p) for p in sorted(glob.glob(os.path.join(sp, "nvidia", "*", "bin", name)))]
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(name)
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    c = Path(home) / "bin" / name
    return str(c) if c.is_file() else None


def find_extension() -> str:
    """The path of peftcore._C as Python would import it (without importing torch)."""
    import importlib.util

    spec = importlib.util.find_spec("peftcore")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("cuda_resources: peftcore is not installed (bash scripts/setup.sh)")
    for d in spec.submodule_search_locations:
        hits = sorted(glob.glob(os.path.join(d, "_C*.so")))
        if hits:
            return hits[0]
    # scikit-build-core's editable "redirect" install keeps the .so in site-packages, mapped by a finder.
    mapping = {}
    for p in glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "_peftcore_editable.py")):
        mapping = dict(re.findall(r"'(peftcore\._C)':\s*'([^']+)'", Path(p).read_text()))
    if "peftcore._C" in mapping:
        return mapping["peftcore._C"]
    for sp in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        hits = sorted(glob.glob(os.path.join(sp, "peftcore", "_C*.so")))
        if hits:
            return hits[0]
    raise SystemExit("cuda_resources: cannot find peftcore/_C*.so; pass --so")


_FUNC = re.compile(r"^\s*Function\s+(\S+?):?\s*$")
_ARCH = re.compile(r"^\s*arch\s*=\s*(sm_\w+)")
_KV = re.compile(r"([A-Z]+(?:\[\d+\])?):(\d+)")


def parse_resource_usage(text: str) -> list:
    """Rows (arch, mangled, {REG, STACK, SHARED, LOCAL, CONSTANT[0], ...}) of `cuobjdump --dump-resource-usage`."""
    rows, arch, func = [], None, None
    for line in text.splitlines():
        m = _ARCH.match(line)
        if m:
            arch, func = m.group(1), None
            continue
        m = _FUNC.match(line)
        if m:
            func = m.group(1)
            continue
        if func and "REG:" in line:
            vals = {k: int(v) for k, v in _KV.findall(line)}
            rows.append((arch or "?", func, vals))
            func = None
    return rows


def demangle(names: list) -> dict:
    tool = find_tool("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    try:
        out = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True, check=True,
                             timeout=60).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {n: n for n in names}
    return {n: (d.strip() or n) for n, d in zip(names, out)} if len(out) == len(names) else {n: n for n in names}


_ABBREV = [("__nv_bfloat16", "bf16"), ("__half", "f16"), ("(anonymous namespace)::", ""), ("unsigned int", "u32"),
           ("unsigned long", "u64"), ("long", "i64")]


def _strip_params(name: str) -> str:
    """Drop the trailing parameter list '(...)' (balanced), keep template arguments."""
    if not name.endswith(")"):
        return name
    depth = 0
    for i in range(len(name) - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0:
            return name[:i]
    return name


def shorten(demangled: str) -> tuple:
    """('sparse_delta', 'spmm_kernel<bf16, 16, true>') from a demangled kernel name."""
    name = _strip_params(demangled.strip())
    name = re.sub(r"^void\s+", "", name)
    m = re.match(r"peftcore::(\w+)::", name)
    family = m.group(1) if m else ""
    for a, b in _ABBREV:
        name = name.replace(a, b)
    # drop namespace qualifiers (a::b::kernel<...> -> kernel<...>), inside template arguments too
    name = re.sub(r"\b(?:[A-Za-z_]\w*::)+", "", name)
    return family, name


def collect(so: str, cuobjdump: str) -> list:
    res = subprocess.run([cuobjdump, "--dump-resource-usage", so], capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        raise SystemExit(f"cuda_resources: {cuobjdump} failed ({res.returncode}): {res.stderr.strip()[:500]}")
    return rows_from_text(res.stdout)


def rows_from_text(text: str) -> list:
    parsed = parse_resource_usage(text)
    names = demangle(sorted({f for _, f, _ in parsed}))
    rows = []
    for arch, mangled, v in parsed:
        family, kernel = shorten(names[mangled])
        rows.append({"family": family, "kernel": kernel, "arch": arch, "reg": v.get("REG", 0),
                     "stack": v.get("STACK", 0), "shared": v.get("SHARED", 0), "local": v.get("LOCAL", 0),
                     "constant0": v.get("CONSTANT[0]", 0), "mangled": mangled})
        rows[-1]["smem_static"] = own_static(rows[-1])
    rows.sort(key=lambda r: (r["family"], r["kernel"], r["arch"]))
    return rows


def own_static(row) -> int:
    """The kernel's own static shared memory: SHARED, less the reserved 1 KB that sm_9x code includes (the same
    kernel's sm_80 code reads 1024 bytes less; the opt-in limit per block excludes the reserve)."""
    s = int(row["shared"])
    return s - SM90_RESERVED if str(row["arch"]).startswith("sm_9") and s >= SM90_RESERVED else s


def write_csv(rows: list, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def read_csv(path: Path) -> list:
    with open(path, newline="") as f:
        return [{k: (int(v) if k in INT_FIELDS else v) for k, v in r.items()}
                for r in csv.DictReader(f)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--so", help="the extension to read (default: peftcore._C as installed)")
    ap.add_argument("--cuobjdump", help="the cuobjdump binary (default: found as described above)")
    ap.add_argument("--from-text", help="parse this saved cuobjdump output instead of running it")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    a = ap.parse_args(argv)
    if a.from_text:
        rows = rows_from_text(Path(a.from_text).read_text())
    else:
        tool = a.cuobjdump or find_tool("cuobjdump", "CUOBJDUMP")
        if not tool:
            raise SystemExit("cuda_resources: no cuobjdump (pip install nvidia-cuda-cuobjdump, or set CUOBJDUMP)")
        rows = collect(a.so or find_extension(), tool)
    if not rows:
        print("cuda_resources: no CUDA kernels in the extension (a CPU-only build?)", file=sys.stderr)
        return 3
    write_csv(rows, Path(a.out))
    worst = max(rows, key=lambda r: r["reg"])
    print(f"wrote {a.out}: {len(rows)} kernel x arch rows, archs {sorted({r['arch'] for r in rows})}; "
          f"most registers {worst['reg']} ({worst['kernel']}, {worst['arch']}); "
          f"largest static smem {max(r['smem_static'] for r in rows)} B; "
          f"non-zero stack/local: {sum(1 for r in rows if r['stack'] or r['local'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
