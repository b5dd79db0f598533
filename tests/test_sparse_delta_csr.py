"""sparse_delta: the cached CSR view (sparse_delta_csr and the ops' optional row_ptr / csc_* arguments), the CUDA
tile planner (host code, reachable through sparse_delta_tile_plan) and the CUDA kernels against the CPU kernels
at the planner's switches. The shared op checks of the new signatures run in test_sparse_delta.py (its samples
pass the CSR view for two configurations)."""
import pytest
import torch

import peftcore  # noqa: F401
from peftcore.ops import sparse_delta as sd
from peftcore.testing import check_errors_isolated

from test_sparse_delta import _randn, make_delta

ops = torch.ops.peftcore
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")

# cudaDevAttrMaxSharedMemoryPerBlockOptin and SM counts of the archs the README's wheel recipes name.
OPTIN = {"sm_80": (166912, 108), "sm_86/89": (101376, 84), "sm_90": (232448, 132), "48 KB": (49152, 16)}
FIELDS = ("tt", "rows", "cols", "splits", "smem", "grid_x", "grid_y", "traffic")


def plan(kernel, tokens, inn, out, nnz, dtype=torch.bfloat16, arch="sm_90", deterministic=False):
    optin, sms = OPTIN[arch]
    return dict(zip(FIELDS, sd.sparse_delta_tile_plan(kernel, tokens, inn, out, nnz, dtype, optin, sms, deterministic)))


# ---------------------------------------------------------------------------------------------------------------
# The CSR view.


def ref_csr(indices, out, inn):
    """Plain torch: row pointers by counting, the CSC view by a stable sort on the column."""
    idx = indices.long()
    r, c = idx // max(inn, 1), idx % max(inn, 1)
    rp = torch.zeros(out + 1, dtype=torch.long)
    rp[1:] = torch.bincount(r, minlength=out).cumsum(0) if idx.numel() else 0
    order = sorted(range(idx.numel()), key=lambda k: (int(c[k]), int(r[k])))
    perm = torch.tensor(order, dtype=torch.long)
    cidx = (c * out + r)[perm] if idx.numel() else torch.zeros(0, dtype=torch.long)
    cp = torch.zeros(inn + 1, dtype=torch.long)
    cp[1:] = torch.bincount(c, minlength=inn).cumsum(0) if idx.numel() else 0
    return rp, cp, cidx, perm


@pytest.mark.parametrize("out,inn,dens,empty", [(8, 10, 0.3, (2,)), (33, 70, 0.05, (0, 32)), (5, 4, 0.0, ()),
                                                (1, 1, 1.0, ()), (16, 1, 0.5, ()), (1, 300, 0.1, ())])
@pytest.mark.parametrize("idt", [torch.int32, torch.int64])
def test_csr_matches_reference(out, inn, dens, empty, idt):
    idx, _ = make_delta(out, inn, dens, idt, empty_rows=empty)
    got = sd.sparse_delta_csr(idx, out, inn)
    for name, a, b in zip(("row_ptr", "csc_ptr", "csc_idx", "csc_perm"), got, ref_csr(idx, out, inn)):
        assert a.dtype == torch.int64, name
        assert torch.equal(a, b), name
    torch.library.opcheck(ops.sparse_delta_csr.default, (idx, out, inn))


def test_csr_zero_sizes():
    for out, inn in ((0, 5), (5, 0), (0, 0)):
        rp, cp, ci, cm = sd.sparse_delta_csr(torch.zeros(0, dtype=torch.long), out, inn)
        assert rp.shape == (out + 1,) and cp.shape == (inn + 1,) and ci.numel() == cm.numel() == 0
        assert not rp.any() and not cp.any()


def test_csr_under_compile():
    idx, vals = make_delta(12, 20, 0.2)
    x = _randn((5, 20), torch.float32, "cpu", 1)

    def f(x, idx, vals):
        rp, cp, ci, cm = ops.sparse_delta_csr(idx, 12, 20)
        return ops.sparse_delta_spmm(x, idx, vals, 12, 1.0, rp)

    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x, idx, vals), f(x, idx, vals))


def test_csr_args_give_the_same_results():
    """Every op with the CSR view passed equals the op without it, bit for bit (CPU: the same kernels)."""
    out, inn = 24, 40
    idx, vals = make_delta(out, inn, 0.1, empty_rows=(3,))
    csr = sd.sparse_delta_csr(idx, out, inn)
    x, g, w = _randn((7, inn), torch.float32, "cpu", 1), _randn((7, out), torch.float32, "cpu", 2), \
        _randn((out, inn), torch.float32, "cpu", 3)
    pairs = [
        (ops.sparse_delta_linear(x, w, None, idx, vals, 0.5), ops.sparse_delta_linear(x, w, None, idx, vals, 0.5, *csr)),
        (ops.sparse_delta_spmm(x, idx, vals, out, 0.5), ops.sparse_delta_spmm(x, idx, vals, out, 0.5, csr[0])),
        (ops.sparse_delta_spmm_t(g, idx, vals, inn, 0.5), ops.sparse_delta_spmm_t(g, idx, vals, inn, 0.5, *csr[1:])),
        (ops.sparse_delta_sddmm(g, x, idx, 0.5), ops.sparse_delta_sddmm(g, x, idx, 0.5, None, csr[0])),
        *zip(ops.sparse_delta_linear_backward(g, x, w, idx, vals, 0.5, [True, True, True]),
             ops.sparse_delta_linear_backward(g, x, w, idx, vals, 0.5, [True, True, True], *csr)),
    ]
    for a, b in pairs:
        assert torch.equal(a, b)
    # the documented wrappers forward the view
    assert torch.equal(sd.sparse_delta_linear(x, w, None, idx, vals, 0.5, csr=csr), pairs[0][0])
    assert torch.equal(sd.sparse_delta_spmm_t(g, idx, vals, inn, 0.5, csr=csr), pairs[2][0])


def test_autograd_passes_the_view_on():
    """Gradients through the ops with the CSR view passed equal those without (the backward ops receive it)."""
    out, inn = 16, 24
    idx, vals = make_delta(out, inn, 0.15)
    csr = sd.sparse_delta_csr(idx, out, inn)
    w = _randn((out, inn), torch.float64, "cpu", 1)
    for fn in (lambda x, v, c: sd.sparse_delta_linear(x, w, None, idx, v, 0.5, csr=c),
               lambda x, v, c: ops.sparse_delta_spmm(x, idx, v, out, 0.5, c[0] if c else None),
               lambda x, v, c: ops.sparse_delta_sddmm(_randn((5, out), torch.float64, "cpu", 4), x, idx, 0.5, None,
                                                      c[0] if c else None).sum() * v):
        grads = []
        for c in (None, csr):
            x = _randn((5, inn), torch.float64, "cpu", 2, requires_grad=True)
            v = vals.double().requires_grad_()
            y = fn(x, v, c)
            grads.append(torch.autograd.grad(y.pow(2).sum(), (x, v)))
        for a, b in zip(*grads):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# Wrong or hostile CSR arguments: clear errors naming the op, in a child process (a crash fails the named case).
# CPU checks the view's values against the indices as well; CUDA checks dtype / shape / device only (documented).

_PRELUDE = """
from peftcore.ops import sparse_delta as sd
idx = torch.tensor([1, 5, 12, 33, 70]); vals = torch.randn(5)
x = torch.randn(3, 10); w = torch.randn(8, 10); g = torch.randn(3, 8)
rp, cp, ci, cm = sd.sparse_delta_csr(idx, 8, 10)
orp, ocp, oci, ocm = sd.sparse_delta_csr(torch.tensor([0, 6, 22, 33, 79]), 8, 10)  # another delta's view
M = [True, True, True]
"""


def _csr_hostile_cases():
    c = []
    # op key -> (op name, call with {rp} and {csc} placeholders)
    calls = {
        "linear": ("sparse_delta_linear", "ops.sparse_delta_linear(x, w, None, idx, vals, 1.0, {rp}, {csc})"),
        "linear_backward": ("sparse_delta_linear_backward",
                            "ops.sparse_delta_linear_backward(g, x, w, idx, vals, 1.0, M, {rp}, {csc})"),
        "spmm": ("sparse_delta_spmm", "ops.sparse_delta_spmm(x, idx, vals, 8, 1.0, {rp})"),
        "spmm_t": ("sparse_delta_spmm_t", "ops.sparse_delta_spmm_t(g, idx, vals, 10, 1.0, {csc})"),
        "sddmm": ("sparse_delta_sddmm", "ops.sparse_delta_sddmm(g, x, idx, 1.0, None, {rp})"),
    }
    good_csc = "cp, ci, cm"
    bad_rp = [
        ("rp_int32", "rp.int()", r"row_ptr must be int64, got Int"),
        ("rp_short", "rp[:-1]", r"row_ptr must have shape \[9\], got \[8\]"),
        ("rp_2d", "rp.view(1, 9)", r"row_ptr must have shape \[9\], got \[1, 9\]"),
        ("rp_float", "rp.double()", r"row_ptr must be int64, got Double"),
        ("rp_meta", "rp.to('meta')", r"row_ptr is on meta but the input is on cpu"),
        ("rp_other_delta", "orp", r"row_ptr does not match indices \(build the CSR view with sparse_delta_csr"),
        ("rp_huge", "torch.full((9,), 2**40)", r"row_ptr does not match indices"),
        ("rp_negative", "torch.full((9,), -5)", r"row_ptr does not match indices"),
    ]
    bad_csc = [
        ("csc_partial", "cp, None, None", r"csc_ptr, csc_idx and csc_perm go together \(all or none\), got 1 of 3"),
        ("csc_two", "cp, ci, None", r"csc_ptr, csc_idx and csc_perm go together \(all or none\), got 2 of 3"),
        ("csc_ptr_short", "cp[:-1], ci, cm", r"csc_ptr must have shape \[11\], got \[10\]"),
        ("csc_idx_long", "cp, torch.cat([ci, ci]), cm", r"csc_idx must have shape \[5\], got \[10\]"),
        ("csc_perm_int32", "cp, ci, cm.int()", r"csc_perm must be int64, got Int"),
        ("csc_perm_meta", "cp, ci, cm.to('meta')", r"csc_perm is on meta but the input is on cpu"),
        ("csc_perm_shuffled", "cp, ci, cm.flip(0)", r"csc_perm does not match indices"),
        ("csc_perm_out_of_range", "cp, ci, cm + 100", r"csc_perm does not match indices"),
        ("csc_idx_other_delta", "cp, oci, cm", r"csc_idx does not match indices"),
        ("csc_ptr_other_delta", "ocp, ci, cm", r"csc_ptr does not match indices"),
    ]
    for key, (op, call) in calls.items():
        if "{rp}" in call:
            for name, arg, rx in bad_rp:
                c.append((f"{key}/{name}", call.format(rp=arg, csc="None, None, None"), f"{op}: {rx}"))
        if "{csc}" in call:
            for name, arg, rx in bad_csc:
                c.append((f"{key}/{name}", call.format(rp="rp", csc=arg), f"{op}: {rx}"))
    # indices problems are reported as before, also with a (matching) view passed
    bad = "bi = torch.tensor([5, 1]); bv = torch.zeros(2); brp, bcp, bci, bcm = sd.sparse_delta_csr(bi, 8, 10); "
    c += [
        ("linear/unsorted_indices_with_view", bad + "ops.sparse_delta_linear(x, w, None, bi, bv, 1.0, brp, bcp, bci, bcm)",
         r"sparse_delta_linear: indices must be sorted ascending"),
        ("spmm/unsorted_indices_with_view", bad + "ops.sparse_delta_spmm(x, bi, bv, 8, 1.0, brp)",
         r"sparse_delta_spmm: indices must be sorted ascending"),
        ("spmm_t/unsorted_indices_with_view", bad + "ops.sparse_delta_spmm_t(g, bi, bv, 10, 1.0, bcp, bci, bcm)",
         r"sparse_delta_spmm_t: indices must be sorted ascending"),
        ("sddmm/unsorted_indices_with_view", bad + "ops.sparse_delta_sddmm(g, x, bi, 1.0, None, brp)",
         r"sparse_delta_sddmm: indices must be sorted ascending"),
    ]
    c += [
        ("csr/float_indices", "ops.sparse_delta_csr(torch.tensor([1.0]), 8, 10)",
         r"sparse_delta_csr: indices must be int32 or int64, got Float"),
        ("csr/2d_indices", "ops.sparse_delta_csr(torch.tensor([[1]]), 8, 10)", r"sparse_delta_csr: indices must be 1-D"),
        ("csr/negative_size", "ops.sparse_delta_csr(idx, -1, 10)",
         r"sparse_delta_csr: out_features and in_features must be >= 0, got -1 and 10"),
        ("csr/overflow", "ops.sparse_delta_csr(idx, 2**40, 2**40)", r"sparse_delta_csr: out_features \* in_features"),
        ("wrapper/csr_len", "sd.sparse_delta_linear(x, w, None, idx, vals, 1.0, csr=(rp, cp))",
         r"sparse_delta: csr must be the 4 tensors of sparse_delta_csr, got 2"),
    ]
    return c


def test_hostile_csr_arguments():
    check_errors_isolated(_csr_hostile_cases(), prelude=_PRELUDE)


@pytest.mark.parametrize("call,match", [
    ("ops.sparse_delta_spmm(x, idx, vals, 8, 1.0, rp[:-1])", r"sparse_delta_spmm: row_ptr must have shape \[9\]"),
    ("ops.sparse_delta_spmm_t(g, idx, vals, 10, 1.0, cp, None, None)", r"sparse_delta_spmm_t: csc_ptr, csc_idx and"),
    ("ops.sparse_delta_linear(x, w, None, idx, vals, 1.0, rp.int())", r"sparse_delta_linear: row_ptr must be int64"),
])
def test_fake_kernels_check_the_view(call, match):
    """The fake kernels (meta tensors, torch.compile) refuse what the real kernels refuse, with the same message."""
    idx = torch.tensor([1, 5, 12, 33, 70])
    env = dict(ops=ops, x=torch.empty(3, 10, device="meta"), w=torch.empty(8, 10, device="meta"),
               g=torch.empty(3, 8, device="meta"), vals=torch.empty(5, device="meta"), idx=idx.to("meta"))
    env.update(zip(("rp", "cp", "ci", "cm"), (t.to("meta") for t in sd.sparse_delta_csr(idx, 8, 10))))
    with pytest.raises(RuntimeError, match=match):
        eval(call, env)


# ---------------------------------------------------------------------------------------------------------------
# SparseDeltaLinear keeps the view and rebuilds it when indices change.


def _layer(idx_dtype=torch.int64):
    from peftcore.tuners.sparse_delta import SparseDeltaLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(20, 12)
    idx, _ = make_delta(12, 20, 0.2, idx_dtype)
    layer = SparseDeltaLinear(base, idx, scale=0.5)
    with torch.no_grad():
        layer.values.normal_()
    return layer


def _assert_view_fresh(layer):
    want = sd.sparse_delta_csr(layer.indices, layer.out_features, layer.in_features)
    for a, b in zip(layer.csr(), want):
        assert torch.equal(a, b)


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_layer_caches_and_refreshes_the_view(idx_dtype):
    layer = _layer(idx_dtype)
    _assert_view_fresh(layer)
    rp = layer._csr_row_ptr
    x = torch.randn(3, 20)
    layer(x)
    assert layer._csr_row_ptr is rp  # reused, not rebuilt
    assert not any(k.startswith("_csr") for k in layer.state_dict())  # derived data: not saved
    new, _ = make_delta(12, 20, 0.2, idx_dtype, seed=5)
    with torch.no_grad():
        layer.indices.copy_(new)  # in place: the version counter moves
    y = layer(x)
    _assert_view_fresh(layer)
    ref = torch.nn.functional.linear(x, sd.sparse_delta_merge(layer.base_layer.weight, layer.indices,
                                                              layer.values.detach(), 0.5), layer.base_layer.bias)
    torch.testing.assert_close(y, ref)
    other, _ = make_delta(12, 20, 0.1, idx_dtype, seed=6)
    layer.set_delta(other, torch.randn(other.numel()))
    _assert_view_fresh(layer)
    sd_state = {k: v.clone() for k, v in layer.state_dict().items()}
    sd_state["indices"] = make_delta(12, 20, 0.1, idx_dtype, seed=7)[0]
    layer.load_state_dict(sd_state)
    _assert_view_fresh(layer)


# ---------------------------------------------------------------------------------------------------------------
# The tile planner (sparse_delta_plan.h).


@pytest.mark.parametrize("arch", list(OPTIN))
@pytest.mark.parametrize("kernel", ["spmm", "spmm_t", "sddmm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_plan_invariants(arch, kernel, dtype):
    optin, sms = OPTIN[arch]
    esize = torch.tensor([], dtype=dtype).element_size()
    budget = min(optin, max(48 * 1024, optin // 2 - 1536))
    for tokens in (1, 3, 4, 5, 17, 33, 100, 8192):
        for out, inn in ((1, 1), (7, 300), (4096, 4096), (4096, 11008), (11008, 4096), (300, 60000), (65, 1100)):
            for nnz in (1, max(1, out * inn // 100)):
                p = plan(kernel, tokens, inn, out, nnz, dtype, arch)
                rows, cols = (inn, out) if kernel == "spmm_t" else (out, inn)
                assert p["tt"] in (1, 4, 8, 16, 32), p
                assert p["tt"] <= min(t for t in (1, 4, 8, 16, 32) if t >= min(tokens, 32)), p  # no idle tile
                assert p["smem"] <= budget <= optin, p
                want = (-(-p["cols"] * p["tt"] * esize // 16) * 16 + -(-p["rows"] * (p["tt"] | 1) * 4 // 16) * 16
                        + p["rows"] * 8)
                assert p["smem"] == want, p
                assert p["cols"] == cols or (p["cols"] % 32 == 0 and p["cols"] >= 256), p
                assert p["rows"] % 8 == 0 and p["rows"] <= min(1024, -(-rows // 8) * 8), p
                tiles = -(-tokens // p["tt"])
                if kernel == "sddmm":
                    assert p["grid_x"] == -(-rows // p["rows"]) and 1 <= p["grid_y"] <= min(tiles, 65535), p
                else:
                    assert p["grid_x"] == tiles and p["grid_y"] == -(-rows // p["rows"]) <= 65535, p
                assert p["traffic"] > 0


def test_plan_wide_inputs_keep_large_token_tiles():
    """The reason for the planner: at in = 11008 (Llama's down_proj) the old kernels fell to 1-token tiles, re-reading
    the delta once per token (~30 GB at T = 8192, 1%); now the token tile stays >= 16 on every named arch (32 on
    sm_90, where two blocks of 112 KB fit an SM)."""
    out, inn, T = 4096, 11008, 8192
    nnz = out * inn // 100
    for arch in ("sm_80", "sm_86/89", "sm_90"):
        for kernel in ("spmm", "spmm_t", "sddmm"):
            p = plan(kernel, T, inn, out, nnz, torch.bfloat16, arch)
            assert p["tt"] >= 16, (arch, kernel, p)
            delta_bytes = nnz * 8
            assert p["traffic"] < 0.15 * T * delta_bytes, (arch, kernel, p)  # vs one delta read per token
    p = plan("spmm", T, inn, out, nnz, torch.bfloat16, "sm_90")
    assert (p["tt"], p["rows"], p["cols"]) == (32, 512, 640), p
    assert p["traffic"] < 3e9, p  # documented estimate: ~2.5 GB


def test_plan_small_token_counts_and_parallelism():
    # decode: one token, the rows are spread over >= 2 blocks per SM when there are enough rows
    p = plan("spmm", 1, 4096, 4096, 160000)
    assert p["tt"] == 1 and p["rows"] == 32 and p["grid_y"] == 128, p
    for T in (5, 16, 33):  # few tokens: small tiles and rows rather than a grid that leaves SMs idle
        p = plan("spmm", T, 4096, 4096, 160000)
        assert p["grid_x"] * p["grid_y"] >= 2 * 132 and p["tt"] <= 8, (T, p)
    p = plan("spmm", 4096, 4096, 4096, 160000)
    assert (p["tt"], p["rows"]) == (32, 512), p
    for kernel in ("spmm", "spmm_t", "sddmm"):
        assert plan(kernel, 8192, 11008, 4096, 450887)["tt"] == 32, kernel
    # sddmm splits tokens over blocks (atomics) unless deterministic
    p = plan("sddmm", 8192, 4096, 256, 10000)
    assert p["splits"] > 1 and p["grid_x"] * p["grid_y"] >= 2 * 132, p
    p = plan("sddmm", 8192, 4096, 256, 10000, deterministic=True)
    assert p["splits"] == 1 and p["grid_y"] == 1, p
    # spmm_t plans S^T: rows = in
    a, b = plan("spmm_t", 100, 300, 7000, 5000), plan("spmm", 100, 7000, 300, 5000)
    assert a == b


def test_plan_empty_problems():
    for args in ((0, 10, 10, 5), (3, 0, 10, 5), (3, 10, 0, 5), (3, 10, 10, 0)):
        assert plan("spmm", *args)["tt"] == 0
        assert plan("sddmm", *args)["tt"] == 0
    assert sd.sparse_delta_tile_plan("spmm", 8, 64, 64, 10, torch.float32, 0, 1)[0] == 0  # nothing fits


def test_plan_op_errors():
    with pytest.raises(RuntimeError, match=r'sparse_delta_tile_plan: kernel must be "spmm", "spmm_t" or "sddmm", got "x"'):
        sd.sparse_delta_tile_plan("x", 1, 1, 1, 1, torch.float32, 1000, 1)
    with pytest.raises(RuntimeError, match=r"sparse_delta_tile_plan: dtype must be float32, float16 or bfloat16"):
        sd.sparse_delta_tile_plan("spmm", 1, 1, 1, 1, torch.float64, 1000, 1)
    with pytest.raises(RuntimeError, match=r"sparse_delta_tile_plan: tokens, nnz, smem_optin and sms must be >= 0"):
        sd.sparse_delta_tile_plan("spmm", -1, 1, 1, 1, torch.float32, 1000, 1)
    with pytest.raises(RuntimeError, match=r"sparse_delta_tile_plan: out_features and in_features must be >= 0"):
        sd.sparse_delta_tile_plan("spmm", 1, -1, 1, 1, torch.float32, 1000, 1)


# ---------------------------------------------------------------------------------------------------------------
# CUDA kernels against the CPU kernels across the planner's switches: token tiles 1 / 4 / 8 / 16 / 32 with ragged
# last tiles, several column chunks (wide inputs: in = 11008, 60000), empty rows, nnz = 0, int32 / int64 indices,
# fp32 / fp16 / bf16, the CSR view passed or built per call, the deterministic mode.

_TOL = {torch.float32: dict(atol=3e-5, rtol=3e-5), torch.float16: dict(atol=2e-2, rtol=1.6e-2),
        torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


def _cuda_vs_cpu(tokens, out, inn, dens, dtype, idt, deterministic, monkeypatch, empty_rows=()):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    idx, vals = make_delta(out, inn, dens, idt, seed=tokens, empty_rows=empty_rows)
    x = _randn((tokens, inn), dtype, "cpu", 1)
    w = _randn((out, inn), dtype, "cpu", 2, scale=inn ** -0.5)
    g = _randn((tokens, out), dtype, "cpu", 3)

    def run(dev, with_csr):
        d = lambda t: t.to(dev)  # noqa: E731
        csr = [d(t) for t in sd.sparse_delta_csr(idx, out, inn)] if with_csr else [None] * 4
        return (ops.sparse_delta_linear(d(x), d(w), None, d(idx), d(vals), 0.5, *csr),
                *ops.sparse_delta_linear_backward(d(g), d(x), d(w), d(idx), d(vals), 0.5, [True, True, True], *csr),
                ops.sparse_delta_spmm(d(x), d(idx), d(vals), out, 0.5, csr[0]),
                ops.sparse_delta_spmm_t(d(g), d(idx), d(vals), inn, 0.5, *csr[1:]),
                ops.sparse_delta_sddmm(d(g), d(x), d(idx), 0.5, None, csr[0]),
                ops.sparse_delta_merge(d(w), d(idx), d(vals), 0.5))

    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        cpu = run("cpu", False)
        for with_csr in (False, True):
            a, b = run("cuda", with_csr), run("cuda", with_csr)
            for i, (ga, gb, c) in enumerate(zip(a, b, cpu)):
                torch.testing.assert_close(ga.cpu(), c, **_TOL[dtype], msg=lambda m: f"output {i}: {m}")
                if deterministic or i not in (2, 6):  # spmm / spmm_t / merge have no atomics at all
                    assert torch.equal(ga, gb), f"output {i} not repeatable"
    finally:
        torch.use_deterministic_algorithms(prev)


@cuda_only
@pytest.mark.parametrize("tokens", [1, 3, 7, 13, 31, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu_wide_input(tokens, dtype, monkeypatch):
    _cuda_vs_cpu(tokens, 40, 11008, 0.01, dtype, torch.int32 if tokens % 2 else torch.int64, False, monkeypatch,
                 empty_rows=(0, 17))


@cuda_only
@pytest.mark.parametrize("shape", [(33, 1100, 300), (70, 300, 1100), (5, 4, 60000), (40, 2, 3)])
@pytest.mark.parametrize("idt", [torch.int32, torch.int64])
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_matches_cpu_chunks_and_modes(shape, idt, deterministic, monkeypatch):
    tokens, out, inn = shape
    _cuda_vs_cpu(tokens, out, inn, 0.03, torch.bfloat16, idt, deterministic, monkeypatch, empty_rows=(1,))


@cuda_only
def test_cuda_empty_delta_and_zero_tokens(monkeypatch):
    _cuda_vs_cpu(9, 16, 24, 0.0, torch.float32, torch.int64, False, monkeypatch)
    _cuda_vs_cpu(0, 16, 24, 0.1, torch.float32, torch.int32, False, monkeypatch)


@cuda_only
def test_cuda_hostile_view_is_memory_safe():
    """A view that does not belong to the indices is not checked on CUDA (no host sync): wrong numbers allowed, no
    out-of-bounds access (the kernels clamp row pointers and skip out-of-range permutation entries)."""
    idx, vals = make_delta(64, 96, 0.1, device="cuda")
    rp, cp, ci, cm = sd.sparse_delta_csr(idx, 64, 96)
    x, g = torch.randn(9, 96, device="cuda"), torch.randn(9, 64, device="cuda")
    n = idx.numel()
    bad = [(torch.full_like(rp, 2**40), cp, ci, cm + 2**40), (torch.full_like(rp, -7), cp.flip(0), ci.flip(0), -cm),
           (rp.flip(0), torch.full_like(cp, n * 3), torch.full_like(ci, -1), torch.randint_like(cm, -n, 2 * n))]
    for b in bad:
        ops.sparse_delta_spmm(x, idx, vals, 64, 1.0, b[0])
        ops.sparse_delta_spmm_t(g, idx, vals, 96, 1.0, *b[1:])
        ops.sparse_delta_sddmm(g, x, idx, 1.0, None, b[0])
        ops.sparse_delta_linear_backward(g, x, torch.randn(64, 96, device="cuda"), idx, vals, 1.0,
                                         [True, True, True], *b)
    torch.cuda.synchronize()
