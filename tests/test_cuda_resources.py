"""Resource checks of the compiled CUDA kernels, without a GPU (bench/cuda_resources.py reads them off the built
extension with cuobjdump):

- no kernel, for any arch compiled, has a stack frame or local memory (register spills and arrays the compiler
  could not keep in registers both show up there; cuobjdump reports no separate spill counts), except the
  exact entries of KNOWN_STACK below (kernels not fixed yet);
- no kernel asks for more shared memory than the opt-in limit per block of an arch the README's wheel recipes
  name (sm_80 163 KB; sm_86 / sm_89 99 KB, running the sm_80 code; sm_90 227 KB): its static shared memory plus
  the dynamic shared memory of every configuration its launcher can pick there. How each family sizes dynamic
  shared memory (its launcher in csrc/<family>/<family>.cu):
    * sparse_attn: the tile planner (sparse_attn_tiles.h, reachable as torch.ops.peftcore.sparse_attn_tile_plan)
      picks per kernel the largest compiled tile whose dynamic shared memory fits the device's opt-in limit;
      every supported head dim must get a plan for every kernel at every named arch;
    * sparse_delta spmm / sddmm (spmm_t runs spmm on the transposed view) and blockdiag monarch_forward: token
      tile / column chunk chosen at run time from cudaDevAttrMaxSharedMemoryPerBlockOptin (sparse_delta_tile_plan,
      monarch_forward_plan: host code with CPU tests of their own), within that limit, so their static shared
      memory must be 0;
    * orthogonal cayley / neumann (+ backward): a fixed number of fp32 b x b tiles, b <= kMaxBlock (64), read from
      orthogonal.cu / orthogonal_launch.h;
    * every other kernel (miss, partial, token_elim, the rest of sparse_delta and sparse_attn's delta kernel):
      launched with no dynamic shared memory (a kernel using `extern __shared__` outside the lists above fails
      test_every_dynamic_smem_kernel_has_a_rule).
  cuobjdump's SHARED of sm_90 code includes the 1 KB per block that the system reserves (the same kernels read
  1024 bytes more than their sm_80 code); the opt-in limit excludes it, so it is subtracted (column smem_static).

The checks run on the live build (skipped with the reason when it has no CUDA kernels) and on the recorded table
bench/results/cuda_resources.csv (always). Regenerate the record after changing a kernel:
`python bench/cuda_resources.py`.
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import peftcore

ROOT = Path(__file__).resolve().parent.parent
RECORD = ROOT / "bench" / "results" / "cuda_resources.csv"

_spec = importlib.util.spec_from_file_location("cuda_resources", ROOT / "bench" / "cuda_resources.py")
cr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cr)

# Opt-in dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin), by compute capability.
OPTIN = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

RUNTIME_FIT = {("sparse_delta", "spmm_kernel"), ("sparse_delta", "sddmm_kernel"),
               ("blockdiag", "monarch_forward_kernel")}
ATTN_KIND = {"forward_kernel": 0, "backward_dq_kernel": 1, "backward_dkdv_kernel": 2, "block_pool_kernel": 3}
# Stack frames a build may carry while a kernel is being fixed: (family, kernel with its dtype as *, arch) -> exact
# bytes, so the check stays a gate for every other kernel and for any growth (an entry that matches nothing only
# warns). Empty: no kernel has a stack frame or local memory.
KNOWN_STACK: dict = {}
ATTN_HEAD_DIMS = (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def named_archs() -> list:
    """The archs of the README's wheel recipes (PEFTCORE_CUDA_ARCHS="..."), e.g. [80, 86, 89, 90]."""
    text = (ROOT / "README.md").read_text()
    archs = set()
    for spec in re.findall(r'PEFTCORE_CUDA_ARCHS="([0-9;a-z]+)"', text):
        archs |= {int(re.sub(r"[a-z]", "", a)) for a in spec.split(";") if a}
    return sorted(archs)


def devices_running(code_arch: str, archs: list) -> list:
    """Named archs whose GPUs run this machine code: same major, minor >= the code's (sm_90a: sm_90 only)."""
    m = re.fullmatch(r"sm_(\d+)(\d)(a?)", code_arch)
    assert m, code_arch
    major, minor, specific = int(m.group(1)), int(m.group(2)), m.group(3)
    return [a for a in archs if a // 10 == major and (a % 10 == minor if specific else a % 10 >= minor)]


own_static = cr.own_static


def base_name(kernel: str) -> str:
    return kernel.split("<", 1)[0].strip()


def orthogonal_fixed_dynamic() -> dict:
    """kernel -> dynamic bytes at the largest block: (tiles * b * b + b) * 4, b = kMaxBlock."""
    src = (ROOT / "csrc" / "orthogonal" / "orthogonal.cu").read_text()
    hdr = "\n".join(p.read_text() for p in (ROOT / "csrc" / "orthogonal").glob("*.h*"))
    kmax = int(re.search(r"kMaxBlock\s*=\s*(\d+)", hdr).group(1))
    assert "(static_cast<size_t>(tiles) * b * b + b) * sizeof(float)" in src, "orthogonal smem_for() changed"
    tiles = dict(re.findall(r"smem_for\(K::(\w+)<T>,\s*b,\s*(\d+)\)", src))
    assert tiles, "no smem_for() calls found in orthogonal.cu"
    return {k: (int(t) * kmax * kmax + kmax) * 4 for k, t in tiles.items()}


def attn_plans(limit: int) -> dict:
    """head dim -> (tiles[4], smem[4]) of the planner at this opt-in limit, for every head dim it supports."""
    plans = {}
    for D in ATTN_HEAD_DIMS:
        try:
            p = list(torch.ops.peftcore.sparse_attn_tile_plan(D, limit))
        except RuntimeError as e:
            assert "sparse_attn_tile_plan: head dim" in str(e), str(e)  # refusals name the op and the value
            continue
        plans[D] = (p[:4], p[4:8])
    assert plans, "sparse_attn_tile_plan supports no head dim"
    return plans


def attn_tile_of(kernel: str):
    """(kind, D, tile) of a sparse_attn kernel named like forward_kernel<float, 128, 64>, else None."""
    kind = ATTN_KIND.get(base_name(kernel))
    ints = [int(x) for x in re.findall(r"(?<![\w.])(\d+)(?![\w.])", kernel.split("<", 1)[-1])]
    if kind is None or len(ints) < 2:
        return None
    return kind, ints[-2], ints[-1]


def stack_key(row) -> tuple:
    return row["family"], re.sub(r"<\s*(float|f16|bf16|double)\b", "<*", row["kernel"]), row["arch"]


def known_stack(row) -> bool:
    return int(row["local"]) == 0 and KNOWN_STACK.get(stack_key(row)) == int(row["stack"])


def tcb_match(kernel: str):
    """(kind "dq" | "dkdv", D, tile_m, tile_n, warps) of a tensor-core backward kernel's name, else None."""
    m = re.search(r"bwd_(dq|dkdv)_kernel<BwdTraits<\s*\d+,\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+),\s*\d+\s*>", kernel)
    return (m.group(1), *(int(v) for v in m.groups()[1:])) if m else None


def violations(rows: list, archs: list) -> list:
    """Every broken rule, as readable lines (empty when the build is fine)."""
    bad = []
    fixed = orthogonal_fixed_dynamic()
    for r in rows:
        where = f"{r['family']}::{r['kernel']} ({r['arch']})"
        if (int(r["stack"]) or int(r["local"])) and not known_stack(r):
            bad.append(f"{where}: stack frame {r['stack']} B, local memory {r['local']} B (spill or local array)")
        static = own_static(r)
        for dev in devices_running(r["arch"], archs):
            lim = OPTIN[dev]
            name = base_name(r["kernel"])
            tc = re.search(r"forward_kernel<Traits<\s*\d+,\s*(\d+),\s*(\d+),\s*(\d+),\s*(\d+)\s*>", r["kernel"])
            if r["family"] == "sparse_attn" and tc:
                # the tensor-core forward: dispatched at this limit only with the config sparse_attn_tc_plan picks
                # there (else the CUDA-core kernel runs, checked above through sparse_attn_tile_plan)
                D, bm, bn, warps = (int(v) for v in tc.groups())
                plan = list(torch.ops.peftcore.sparse_attn_tc_plan(D, lim))
                if plan[:3] == [bm, bn, warps] and static + plan[3] > lim:
                    bad.append(f"{where} on sm_{dev}: {static} B static + {plan[3]} B planned > {lim} B")
            elif r["family"] == "sparse_attn" and tcb_match(r["kernel"]):
                # the tensor-core backward: dispatched at this limit only with the config sparse_attn_tc_bwd_plan
                # picks there (else the CUDA-core backward runs)
                kind, D, bm, bn, warps = tcb_match(r["kernel"])
                plan = list(torch.ops.peftcore.sparse_attn_tc_bwd_plan(D, lim, 1, 1, 1, 1, 1))
                need = plan[3] if kind == "dq" else plan[4]
                if plan[:3] == [bm, bn, warps] and static + need > lim:
                    bad.append(f"{where} on sm_{dev}: {static} B static + {need} B planned > {lim} B")
            elif r["family"] == "sparse_attn":
                plans = attn_plans(lim)
                parsed = attn_tile_of(r["kernel"])
                if parsed is not None:
                    kind, D, tile = parsed
                    for d, (tiles, smem) in plans.items():
                        if d == D and tiles[kind] == tile and static + smem[kind] > lim:
                            bad.append(f"{where} on sm_{dev}: {static} B static + {smem[kind]} B planned > {lim} B")
                elif static + max(max(s) for _, s in plans.values()) > lim:
                    bad.append(f"{where} on sm_{dev}: {static} B static + the largest planned tile's dynamic "
                               f"shared memory > {lim} B")
                for D, (tiles, _) in plans.items():
                    if 0 in tiles:
                        bad.append(f"sparse_attn_tile_plan({D}, {lim}) plans no tile for kernel "
                                   f"{tiles.index(0)} on sm_{dev}: D={D} would not run there")
            elif (r["family"], name) in RUNTIME_FIT:
                if static:
                    bad.append(f"{where} on sm_{dev}: {static} B static shared memory, but the launcher sizes the "
                               f"dynamic part up to the whole opt-in limit ({lim} B)")
            elif r["family"] == "orthogonal" and name in fixed:
                if static + fixed[name] > lim:
                    bad.append(f"{where} on sm_{dev}: {static} B static + {fixed[name]} B dynamic > {lim} B")
            elif static > lim:
                bad.append(f"{where} on sm_{dev}: {static} B static shared memory > {lim} B")
    return sorted(set(bad))


def dynamic_smem_kernels() -> set:
    """(family, kernel) of every __global__ function in csrc/<family>/*.cuh whose body declares extern __shared__."""
    found = set()
    for path in (ROOT / "csrc").glob("*/*.cuh"):
        chunks = re.split(r"__global__", path.read_text())[1:]
        for chunk in chunks:
            m = re.search(r"(\w+)\s*\(", re.sub(r"__launch_bounds__\s*\([^)]*\)", "", chunk))
            if m and "extern __shared__" in chunk:
                found.add((path.parent.name, m.group(1)))
    return found


# ---------------------------------------------------------------------------------------------------------------
# Live build


@pytest.fixture(scope="module")
def live_rows(tmp_path_factory):
    if not peftcore.build_info()["with_cuda"]:
        pytest.skip("peftcore was built without CUDA kernels (PEFTCORE_CUDA=OFF, or no CUDA torch / nvcc): "
                    "no kernel resources to check; the recorded table is checked instead")
    tool = cr.find_tool("cuobjdump", "CUOBJDUMP")
    if not tool:
        pytest.skip("no cuobjdump: pip install nvidia-cuda-cuobjdump (scripts/setup.sh installs it)")
    out = tmp_path_factory.mktemp("res") / "cuda_resources.csv"
    before = RECORD.read_bytes() if RECORD.exists() else None
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "cuda_resources.py"), "--out", str(out)],
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (RECORD.read_bytes() if RECORD.exists() else None) == before, "the script touched the recorded table"
    rows = cr.read_csv(out)
    assert rows, "no kernels in a CUDA build"
    return rows


def test_live_build_archs_and_families(live_rows):
    archs = {r["arch"] for r in live_rows}
    built = [a for a in re.split(r"[,; ]+", str(peftcore.build_info()["cuda_archs"])) if a]
    want = {"sm_" + re.sub(r"-(real|virtual)$", "", a) for a in built}
    assert want <= archs, f"archs the build reports {sorted(want)}, machine code found for {sorted(archs)}"
    fams = {r["family"] for r in live_rows}
    src_fams = {p.parent.name for p in (ROOT / "csrc").glob("*/*.cu")}
    assert src_fams <= fams, f"families with .cu files but no kernel in the build: {src_fams - fams}"


def test_live_build_no_spill_no_local_memory(live_rows):
    bad = [f"{r['family']}::{r['kernel']} ({r['arch']}): stack {r['stack']} B, local {r['local']} B"
           for r in live_rows if (int(r["stack"]) or int(r["local"])) and not known_stack(r)]
    assert not bad, "\n".join(bad)
    stale = set(KNOWN_STACK) - {stack_key(r) for r in live_rows if known_stack(r)}
    if stale:
        warnings.warn(f"KNOWN_STACK entries that match no kernel of this build (remove them): {sorted(stale)}")


def test_live_build_shared_memory_fits_every_named_arch(live_rows):
    bad = violations(live_rows, named_archs())
    assert not bad, "\n".join(bad)


# ---------------------------------------------------------------------------------------------------------------
# The recorded table and the rules themselves (no build needed)


def test_recorded_table_passes_the_same_checks():
    rows = cr.read_csv(RECORD)
    assert {"sm_80", "sm_90"} <= {r["arch"] for r in rows}, "record both archs CI compiles (80;90)"
    assert not violations(rows, named_archs())


def test_named_archs_have_limits():
    archs = named_archs()
    assert {80, 86, 89, 90} <= set(archs), archs
    assert set(archs) <= set(OPTIN), f"give the opt-in shared memory limit of {set(archs) - set(OPTIN)}"


def test_every_dynamic_smem_kernel_has_a_rule():
    fixed = {("orthogonal", k) for k in orthogonal_fixed_dynamic()}
    dyn = {(f, k) for f, k in dynamic_smem_kernels() if f != "sparse_attn"}
    assert dyn, "found no kernel with dynamic shared memory: the source scan is broken"
    missing = dyn - RUNTIME_FIT - fixed
    assert not missing, f"kernels with dynamic shared memory and no rule in this test: {sorted(missing)}"


@pytest.mark.parametrize("arch", [80, 86, 89, 90])
def test_sparse_attn_planner_fits_every_named_arch(arch):
    lim = OPTIN[arch]
    for D, (tiles, smem) in attn_plans(lim).items():
        assert 0 not in tiles, f"no tile for D={D} at {lim} B"
        assert all(0 < s <= lim for s in smem), (D, smem)
    with pytest.raises(RuntimeError, match=r"sparse_attn_tile_plan: head dim must be"):
        torch.ops.peftcore.sparse_attn_tile_plan(48, lim)


SYNTH = """
Fatbin elf code:
================
arch = sm_80
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN8peftcore4miss4cuda7kernels13unfold_kernelIfEEvPKT_lllPS4_:
  REG:16 STACK:0 SHARED:0 LOCAL:0 CONSTANT[2]:8 CONSTANT[0]:392 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN8peftcore9blockdiag4cuda7kernels22monarch_forward_kernelIfEEvPKT_S6_S6_PS4_NS2_13MonarchParamsE:
  REG:32 STACK:0 SHARED:0 LOCAL:0 CONSTANT[2]:8 CONSTANT[0]:472 TEXTURE:0 SURFACE:0 SAMPLER:0

Fatbin elf code:
================
arch = sm_90
code version = [1,8]

Resource usage:
 Common:
  GLOBAL:0
 Function _ZN8peftcore4miss4cuda7kernels13unfold_kernelIfEEvPKT_lllPS4_:
  REG:255 STACK:8 SHARED:0 LOCAL:4 CONSTANT[2]:8 CONSTANT[0]:568 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _ZN8peftcore9blockdiag4cuda7kernels22monarch_forward_kernelIfEEvPKT_S6_S6_PS4_NS2_13MonarchParamsE:
  REG:32 STACK:0 SHARED:1040 LOCAL:0 CONSTANT[2]:8 CONSTANT[0]:648 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_checks_bite_on_planted_rows():
    """A spill-like row (stack / local memory) and static shared memory in a kernel that sizes its dynamic part
    to the whole limit are both reported; the same kernels clean on sm_80 are not."""
    rows = cr.rows_from_text(SYNTH)
    assert [(r["family"], r["kernel"], r["arch"]) for r in rows] == [
        ("blockdiag", "monarch_forward_kernel<float>", "sm_80"), ("blockdiag", "monarch_forward_kernel<float>", "sm_90"),
        ("miss", "unfold_kernel<float>", "sm_80"), ("miss", "unfold_kernel<float>", "sm_90")]
    assert own_static(rows[1]) == 16 and own_static(rows[0]) == 0
    bad = violations(rows, [80, 86, 89, 90])
    assert len(bad) == 2, bad
    assert "unfold_kernel<float> (sm_90): stack frame 8 B, local memory 4 B" in bad[1]
    assert "monarch_forward_kernel<float> (sm_90) on sm_90: 16 B static" in bad[0]
    assert not violations([r for r in rows if r["arch"] == "sm_80"], [80, 86, 89, 90])


def test_static_only_kernel_over_the_limit_is_reported():
    row = {"family": "miss", "kernel": "fold_narrow_kernel<float, 32>", "arch": "sm_80", "reg": 40, "stack": 0,
           "shared": 120000, "local": 0}
    bad = violations([row], [80, 86, 89, 90])
    assert bad == ["miss::fold_narrow_kernel<float, 32> (sm_80) on sm_86: 120000 B static shared memory > 101376 B",
                   "miss::fold_narrow_kernel<float, 32> (sm_80) on sm_89: 120000 B static shared memory > 101376 B"]


def test_sparse_attn_rule_checks_the_dispatched_tile_per_arch():
    """forward_kernel<*, 128, 64> runs where the planner picks 64-row tiles for D=128 (sm_80, sm_90: 115,712 B of
    dynamic shared memory), not on the 99 KB of sm_86 / sm_89 (32-row tiles there): 60,000 B of static shared
    memory break sm_80 only; an unparsed sparse_attn kernel is held to the largest plan."""
    row = {"family": "sparse_attn", "kernel": "forward_kernel<float, 128, 64>", "arch": "sm_80", "reg": 200,
           "stack": 0, "shared": 60000, "local": 0}
    assert violations([row], [80, 86, 89, 90]) == [
        "sparse_attn::forward_kernel<float, 128, 64> (sm_80) on sm_80: 60000 B static + 115712 B planned > 166912 B"]
    assert not violations([{**row, "shared": 50000}], [80, 86, 89, 90])
    other = {**row, "kernel": "new_attn_kernel<float>", "shared": 1000}
    assert not violations([other], [80, 86, 89, 90])
    assert violations([{**other, "shared": 60000}], [80, 86, 89, 90])


def test_tensor_core_forward_rule_follows_its_planner():
    """forward_kernel<Traits<S, D, BM, BN, W>> (the tensor-core forward) is held to sparse_attn_tc_plan's config at
    each arch: D=128's 81,920 B tile runs on sm_86 / sm_89 (99 KB), so 20,000 B more static shared memory breaks
    those two; where the planner picks no tensor-core config the CUDA-core kernel runs instead."""
    row = {"family": "sparse_attn", "kernel": "forward_kernel<Traits<1, 128, 64, 64, 4> >", "arch": "sm_80",
           "reg": 168, "stack": 0, "shared": 0, "local": 0}
    assert not violations([row], [80, 86, 89, 90])
    bad = violations([{**row, "shared": 20000}], [80, 86, 89, 90])
    assert bad == [f"sparse_attn::{row['kernel']} (sm_80) on sm_{d}: 20000 B static + 81920 B planned > 101376 B"
                   for d in (86, 89)], bad
