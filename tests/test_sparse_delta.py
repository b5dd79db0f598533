"""sparse_delta ops: every op through the shared checks (peftcore.testing), plus bad-input and memory tests."""
import pytest
import torch

import peftcore  # noqa: F401
from peftcore.ops import sparse_delta as sd
from peftcore.testing import (OpCase, Sample, check_double_backward_refused, check_errors_isolated, devices,
                              op_test_suite)

ops = torch.ops.peftcore
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
DEVICES = devices()


# ---------------------------------------------------------------------------------------------------------------
# Inputs and plain-torch references (the dense S is built here, in the test only).


def make_delta(out, inn, density, index_dtype=torch.int64, values_dtype=torch.float32, device="cpu", seed=0,
               empty_rows=()):
    g = torch.Generator().manual_seed(seed)
    nnz = max(0, int(round(out * inn * density)))
    idx = torch.randperm(out * inn, generator=g)[:nnz]
    if empty_rows:
        rows = idx // inn
        keep = torch.ones_like(idx, dtype=torch.bool)
        for r in empty_rows:
            keep &= rows != r
        idx = idx[keep]
    idx = idx.sort().values
    vals = torch.randn(idx.numel(), generator=g, dtype=torch.float64) * 0.5
    return idx.to(index_dtype).to(device), vals.to(values_dtype).to(device)


def dense_delta(indices, values, out, inn, dtype=None):
    dtype = dtype or values.dtype
    s = torch.zeros(out * inn, dtype=dtype, device=values.device)
    s[indices.long()] = values.to(dtype)
    return s.view(out, inn)


def ref_linear(x, weight, bias, indices, values, scale=1.0, *csr):
    w = weight + scale * dense_delta(indices, values, *weight.shape, dtype=weight.dtype)
    return torch.nn.functional.linear(x, w, bias)


def ref_linear_scatter(x, weight, bias, indices, values, scale=1.0):
    """What SpIEL and SHiRA do today: clone W, scatter the delta in, F.linear. Autograd then builds the dense
    [out, in] weight gradient and gathers the delta's entries from it. The bench's baseline (a)."""
    w = weight.reshape(-1).index_add(0, indices.long(), (scale * values).to(weight.dtype)).view_as(weight)
    return torch.nn.functional.linear(x, w, bias)


def ref_spmm(x, indices, values, out_features, scale=1.0, row_ptr=None):
    return scale * x @ dense_delta(indices, values, out_features, x.shape[-1], dtype=x.dtype).t()


def ref_spmm_t(g, indices, values, in_features, scale=1.0, *csc):
    return scale * g @ dense_delta(indices, values, g.shape[-1], in_features, dtype=g.dtype)


def _structural_spmm(x, indices, values, rows, cols, scale, transpose):
    # Only the products the delta defines (y[t, r] += v_k x[t, c_k] for r_k = r), as torch.sparse computes them:
    # a NaN in x reaches the outputs of the entries that read it, not every output through 0 * NaN.
    idx = indices.long()
    r, c = idx // cols, idx % cols
    src, dst, n = (r, c, cols) if transpose else (c, r, rows)
    x2 = x.reshape(-1, x.shape[-1])
    out = x2.new_zeros(x2.shape[0], n).index_add_(1, dst, x2[:, src] * values.to(x.dtype))
    return (scale * out).reshape(*x.shape[:-1], n)


def nonfinite_spmm(x, indices, values, out_features, scale=1.0, row_ptr=None):
    return _structural_spmm(x, indices, values, out_features, x.shape[-1], scale, False)


def nonfinite_spmm_t(g, indices, values, in_features, scale=1.0, *csc):
    return _structural_spmm(g, indices, values, g.shape[-1], in_features, scale, True)


def _sddmm_out_dtype(g, out_dtype):
    return out_dtype or (torch.float64 if g.dtype == torch.float64 else torch.float32)


def ref_sddmm(g, x, indices, scale=1.0, out_dtype=None, row_ptr=None):
    full = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    return (scale * full.reshape(-1)[indices.long()]).to(_sddmm_out_dtype(g, out_dtype))


def ref_linear_backward(g, x, weight, indices, values, scale, mask, *csr):
    w = weight + scale * dense_delta(indices, values, *weight.shape, dtype=weight.dtype)
    g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
    gx = (g2 @ w).view(x.shape) if mask[0] else x.new_empty(0)
    gv = (scale * (g2.t() @ x2).reshape(-1)[indices.long()]).to(values.dtype) if mask[1] else values.new_empty(0)
    gb = g2.sum(0) if mask[2] else weight.new_empty(0)
    return gx, gv, gb


def ref_merge(weight, indices, values, scale=1.0):
    return weight + scale * dense_delta(indices, values, *weight.shape, dtype=weight.dtype)


def ref_topk(g, x, k, exclude=None):
    scores = (g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])).abs().reshape(-1)
    if exclude is not None:
        scores = scores.clone()
        scores[exclude.long()] = -1
    top = torch.topk(scores, k).indices.sort().values
    return top, scores[top].to(torch.float32)


# Shapes: batch dims x (out, in, density, index dtype, empty rows). The CPU kernels (sparse_delta_cpu.cpp) branch on:
# - token tiles of kTile = 16 (full tiles take the AVX2 transpose-load, and for fp32 the AVX2 add-back; the last,
#   partial tile and float64 take the generic loops, which walk features in blocks of 64): T = 6, 12, 16, 17, 37,
#   38, 70 tokens, in = 130 / 70 > 64 with a partial tile;
# - 8-wide vector blocks of features (in % 8 != 0 takes the scalar remainder): in = 20, 70, 130;
# - tiles spread over threads (at::parallel_for; the module fixture below makes sure there are >= 2), one SDDMM
#   partial per thread summed at the end, and several tiles per thread (70 tokens: 5 tiles);
# - the final SDDMM sum split over threads in chunks of 4096 nonzeros: nnz ~ 4900 in the 96x130 delta;
# - rows with 0, 1, 2, odd and even nonzeros (the forward's two accumulator sets) and explicitly empty rows;
# - merge_ split over threads by blocks of 64 rows: out = 96;
# - values in float32 or in the activations' dtype; int32 and int64 indices.
# float64 samples stay small for gradcheck but still cross a tile and a thread split (float64 runs the generic
# loops, whose 64-feature blocks the partial fp32 tile of the 70x96x130 sample crosses).
# The first and the last config also run with the delta's CSR view passed (sparse_delta_csr, the optional
# row_ptr / csc_* arguments), so opcheck, gradcheck and compile cover the ops' full signatures.
_WITH_CSR = (0, 4)
def _configs(dtype):
    if dtype == torch.float64:
        return [((2, 3), 6, 10, 0.3, torch.int64, ()), ((5,), 7, 9, 0.25, torch.int32, (0, 3)),
                ((17,), 4, 9, 0.3, torch.int64, (2,))]
    return [((2, 19), 24, 40, 0.1, torch.int64, (2, 5)), ((37,), 33, 20, 0.05, torch.int32, ()),
            ((16,), 16, 64, 0.02, torch.int64, ()), ((3, 4), 8, 12, 0.0, torch.int32, ()),
            ((70,), 96, 130, 0.4, torch.int64, (1, 50))]


@pytest.fixture(autouse=True, scope="module")
def _two_threads():
    """The thread splits above need >= 2 intra-op threads, also on a 1-core runner."""
    n = torch.get_num_threads()
    torch.set_num_threads(max(2, n))
    yield
    torch.set_num_threads(n)


def _randn(shape, dtype, device, seed, requires_grad=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    return t.requires_grad_(requires_grad)


def _values_dtypes(dtype):
    # values may be float32 or the weight's dtype
    return (dtype,) if dtype in (torch.float32, torch.float64) else (torch.float32, dtype)


def linear_samples(device, dtype, requires_grad):
    for i, (batch, out, inn, dens, idt, empty) in enumerate(_configs(dtype)):
        for vdt in _values_dtypes(dtype):
            idx, vals = make_delta(out, inn, dens, idt, vdt, device, seed=i, empty_rows=empty)
            x = _randn((*batch, inn), dtype, device, 10 + i)
            w = _randn((out, inn), dtype, device, 20 + i, scale=inn ** -0.5)
            b = _randn((out,), dtype, device, 30 + i) if (requires_grad or i % 2 == 0) else None
            yield Sample((x, w, b, idx, vals, 0.75), name=f"{batch}x{out}x{inn}@{dens}/{idt}/{vdt}/bias={b is not None}")
            if i in _WITH_CSR:
                yield Sample((x, w, b, idx, vals, 0.75, *sd.sparse_delta_csr(idx, out, inn)),
                             name=f"{batch}x{out}x{inn}@{dens}/{idt}/{vdt}/csr")


def spmm_samples(device, dtype, requires_grad):
    for i, (batch, out, inn, dens, idt, empty) in enumerate(_configs(dtype)):
        for vdt in _values_dtypes(dtype):
            idx, vals = make_delta(out, inn, dens, idt, vdt, device, seed=i, empty_rows=empty)
            x = _randn((*batch, inn), dtype, device, 10 + i)
            yield Sample((x, idx, vals, out, -1.5), name=f"{batch}x{out}x{inn}")
            if i in _WITH_CSR:
                rp = sd.sparse_delta_csr(idx, out, inn)[0]
                yield Sample((x, idx, vals, out, -1.5, rp), name=f"{batch}x{out}x{inn}/row_ptr")


def spmm_t_samples(device, dtype, requires_grad):
    for i, (batch, out, inn, dens, idt, empty) in enumerate(_configs(dtype)):
        for vdt in _values_dtypes(dtype):
            idx, vals = make_delta(out, inn, dens, idt, vdt, device, seed=i, empty_rows=empty)
            g = _randn((*batch, out), dtype, device, 10 + i)
            yield Sample((g, idx, vals, inn, 0.5), name=f"{batch}x{out}x{inn}")
            if i in _WITH_CSR:
                csc = sd.sparse_delta_csr(idx, out, inn)[1:]
                yield Sample((g, idx, vals, inn, 0.5, *csc), name=f"{batch}x{out}x{inn}/csc")


def sddmm_samples(device, dtype, requires_grad):
    for i, (batch, out, inn, dens, idt, empty) in enumerate(_configs(dtype)):
        idx, _ = make_delta(out, inn, dens, idt, torch.float32, device, seed=i, empty_rows=empty)
        g = _randn((*batch, out), dtype, device, 10 + i)
        x = _randn((*batch, inn), dtype, device, 20 + i)
        yield Sample((g, x, idx, 2.0), name=f"{batch}x{out}x{inn}")
        if i == 0:
            yield Sample((g, x, idx, 1.0, dtype), name="out_dtype")
        if i in _WITH_CSR:
            yield Sample((g, x, idx, 2.0, None, sd.sparse_delta_csr(idx, out, inn)[0]), name=f"{batch}x{out}x{inn}/row_ptr")


def linear_backward_samples(device, dtype, requires_grad):
    for s in linear_samples(device, dtype, False):
        x, w, b, idx, vals, scale, *csr = s.args
        g = _randn((*x.shape[:-1], w.shape[0]), dtype, device, 99)
        masks = ([True, True, True], [False, True, False], [True, False, True])
        for mask in masks if x.shape[-1] < 100 else masks[:1]:  # the large sample: all outputs (opcheck time)
            yield Sample((g, x, w, idx, vals, scale, mask, *csr), name=f"{s.name}/{mask}")


def merge_samples(device, dtype, requires_grad):
    for i, (batch, out, inn, dens, idt, empty) in enumerate(_configs(dtype)):
        for vdt in _values_dtypes(dtype):
            idx, vals = make_delta(out, inn, dens, idt, vdt, device, seed=i, empty_rows=empty)
            yield Sample((_randn((out, inn), dtype, device, 5 + i), idx, vals, -0.5), name=f"{out}x{inn}")


def topk_samples(device, dtype, requires_grad):
    for i, (batch, out, inn, dens, idt, empty) in enumerate(_configs(dtype)[:3]):
        g = _randn((*batch, out), dtype, device, 10 + i)
        x = _randn((*batch, inn), dtype, device, 20 + i)
        excl, _ = make_delta(out, inn, 0.2, idt, torch.float32, device, seed=7 + i)
        yield Sample((g, x, max(1, out * inn // 10), excl), name=f"{out}x{inn}/excl")
        yield Sample((g, x, 3, None), name=f"{out}x{inn}/k=3")


CASES = [
    OpCase("sparse_delta_linear", ops.sparse_delta_linear, linear_samples, ref_linear, ALL_DTYPES, grad_args=(0, 2, 4)),
    OpCase("sparse_delta_linear_backward", ops.sparse_delta_linear_backward, linear_backward_samples,
           ref_linear_backward, ALL_DTYPES),
    OpCase("sparse_delta_spmm", ops.sparse_delta_spmm, spmm_samples, ref_spmm, ALL_DTYPES, grad_args=(0, 2),
           nonfinite_reference=nonfinite_spmm),
    OpCase("sparse_delta_spmm_t", ops.sparse_delta_spmm_t, spmm_t_samples, ref_spmm_t, ALL_DTYPES, grad_args=(0, 2),
           nonfinite_reference=nonfinite_spmm_t),
    OpCase("sparse_delta_sddmm", ops.sparse_delta_sddmm, sddmm_samples, ref_sddmm, ALL_DTYPES, grad_args=(0, 1)),
    OpCase("sparse_delta_merge_", ops.sparse_delta_merge_, merge_samples, ref_merge, ALL_DTYPES, mutates=0),
    OpCase("sparse_delta_merge", ops.sparse_delta_merge, merge_samples, ref_merge, ALL_DTYPES, grad_args=(0, 2)),
    OpCase("sparse_delta_topk_grad", ops.sparse_delta_topk_grad, topk_samples, ref_topk, ALL_DTYPES),
]


test_opcheck, test_reference, test_gradcheck, test_compile = op_test_suite(CASES)


def test_compile_inductor_training_step():
    """The main op through the default (inductor) backend, forward and backward, fullgraph."""
    import torch._dynamo

    torch._dynamo.reset()
    idx, vals = make_delta(32, 48, 0.05)
    w = _randn((32, 48), torch.float32, "cpu", 1)
    x = _randn((4, 48), torch.float32, "cpu", 2, requires_grad=True)
    v = vals.clone().requires_grad_(True)

    def step(x, v):
        return (sd.sparse_delta_linear(x, w, None, idx, v, 0.5).relu() ** 2).sum()

    out = torch.compile(step, fullgraph=True)(x, v)
    gx, gv = torch.autograd.grad(out, (x, v))
    x2, v2 = x.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    ref = step(x2, v2)
    rgx, rgv = torch.autograd.grad(ref, (x2, v2))
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gv, rgv)


# ---------------------------------------------------------------------------------------------------------------
# Semantics beyond the reference.


@pytest.mark.parametrize("device", DEVICES)
def test_weight_requires_grad_gets_dense_grad(device):
    idx, vals = make_delta(12, 20, 0.1, device=device)
    w = _randn((12, 20), torch.float32, device, 3, requires_grad=True)
    x = _randn((7, 20), torch.float32, device, 4)
    sd.sparse_delta_linear(x, w, None, idx, vals, 2.0).pow(2).sum().backward()
    w2 = w.detach().clone().requires_grad_()
    ref_linear(x, w2, None, idx, vals, 2.0).pow(2).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad)


@pytest.mark.parametrize("device", DEVICES)
def test_merge_unmerge_roundtrip(device):
    idx, vals = make_delta(16, 24, 0.1, device=device)
    w = _randn((16, 24), torch.float32, device, 1)
    w0 = w.clone()
    sd.sparse_delta_merge_(w, idx, vals, 0.5)
    torch.testing.assert_close(w, ref_merge(w0, idx, vals, 0.5))
    sd.sparse_delta_merge_(w, idx, vals, -0.5)
    torch.testing.assert_close(w, w0)


def test_scatter_baseline_is_the_same_function():
    """The bench's baseline (a) computes what sparse_delta_linear computes, values' gradient included."""
    idx, vals = make_delta(16, 24, 0.1)
    w, x = _randn((16, 24), torch.float64, "cpu", 1), _randn((5, 24), torch.float64, "cpu", 2)
    v1, v2 = vals.double().requires_grad_(), vals.double().requires_grad_()
    y1, y2 = ref_linear_scatter(x, w, None, idx, v1, 0.5), sd.sparse_delta_linear(x, w, None, idx, v2, 0.5)
    torch.testing.assert_close(y1, y2)
    g1, g2 = torch.autograd.grad(y1.sum(), v1), torch.autograd.grad(y2.sum(), v2)
    torch.testing.assert_close(g1, g2)


def test_merged_forward_equals_delta_forward():
    idx, vals = make_delta(16, 24, 0.1)
    w = _randn((16, 24), torch.float32, "cpu", 1)
    x = _randn((5, 24), torch.float32, "cpu", 2)
    y = sd.sparse_delta_linear(x, w, None, idx, vals, 0.5)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, sd.sparse_delta_merge(w, idx, vals, 0.5)))


def test_topk_excludes_and_is_sorted():
    g, x = _randn((9, 8), torch.float32, "cpu", 1), _randn((9, 6), torch.float32, "cpu", 2)
    excl = torch.arange(0, 48, 2)
    idx, scores = sd.sparse_delta_topk_grad(g, x, 24, excl)  # exactly the odd positions are left
    assert torch.equal(idx, torch.arange(1, 48, 2))
    assert scores.dtype == torch.float32 and (scores >= 0).all()
    with pytest.raises(RuntimeError, match=r"sparse_delta_topk_grad: k must be in \[0, 24\]"):
        sd.sparse_delta_topk_grad(g, x, 25, excl)


def test_topk_multi_tile_matches_dense():
    """A weight larger than one score tile (2^20 entries) exercises the running candidate pool."""
    g, x = _randn((6, 1100), torch.float32, "cpu", 1), _randn((6, 1000), torch.float32, "cpu", 2)
    excl, _ = make_delta(1100, 1000, 0.01, seed=3)
    idx, scores = sd.sparse_delta_topk_grad(g, x, 5000, excl)
    ridx, rscores = ref_topk(g.double(), x.double(), 5000, excl)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(scores, rscores)


def test_no_dense_temporary_in_forward_backward():
    """Peak memory of a training step holds nothing [out, in]-sized (W itself excepted)."""
    out, inn, t = 1024, 1024, 64
    idx, vals = make_delta(out, inn, 0.01)
    w = torch.randn(out, inn)
    x = torch.randn(t, inn, requires_grad=True)
    v = vals.clone().requires_grad_(True)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        sd.sparse_delta_linear(x, w, None, idx, v, 1.0).sum().backward()
    biggest = max(abs(e.cpu_memory_usage) for e in prof.key_averages())
    dense_bytes = out * inn * 4
    assert biggest < dense_bytes // 4, f"an allocation of {biggest} bytes, W is {dense_bytes}"


# ---------------------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the op and the offending value.


def _lin_args(**kw):
    idx, vals = make_delta(8, 10, 0.2)
    a = dict(x=torch.randn(3, 10), weight=torch.randn(8, 10), bias=None, indices=idx, values=vals, scale=1.0)
    a.update(kw)
    return a


@pytest.mark.parametrize("kw,match", [
    (dict(indices=torch.tensor([0, 5, 5])), r"sparse_delta_linear: indices must be sorted ascending and unique.*indices\[2\] = 5"),
    (dict(indices=torch.tensor([3, 1, 7])), r"sparse_delta_linear: indices must be sorted ascending and unique.*indices\[1\] = 1"),
    (dict(indices=torch.tensor([0, 80, 81])), r"sparse_delta_linear: indices must lie in \[0, 8\*10 = 80\), got indices\[1\] = 80"),
    (dict(indices=torch.tensor([-1, 2, 3])), r"sparse_delta_linear: indices must lie in .*got indices\[0\] = -1"),
    (dict(indices=torch.tensor([0.0, 1.0, 2.0])), r"sparse_delta_linear: indices must be int32 or int64, got Float"),
    (dict(indices=torch.tensor([[0, 1, 2]])), r"sparse_delta_linear: indices must be 1-D"),
    (dict(values=torch.zeros(16, dtype=torch.int64)), r"sparse_delta_linear: values must be float32"),
    (dict(values=torch.zeros(2)), r"sparse_delta_linear: values has 2 entries but indices has 16"),
    (dict(values=torch.zeros(16, dtype=torch.float64)), r"sparse_delta_linear: values must be float32 or the input's dtype"),
    (dict(x=torch.randn(3, 11)), r"sparse_delta_linear: x must have last dim 10"),
    (dict(weight=torch.randn(8, 10).half()), r"sparse_delta_linear: weight has dtype Half but x has Float"),
    (dict(bias=torch.randn(7)), r"sparse_delta_linear: bias must have shape \[8\]"),
    (dict(x=torch.randint(0, 3, (3, 10))), r"sparse_delta_linear: x must be float32"),
])
def test_bad_input_errors(kw, match):
    a = _lin_args(**kw)
    if "indices" in kw and "values" not in kw:
        a["values"] = torch.zeros(a["indices"].shape[-1])
    with pytest.raises(RuntimeError, match=match):
        sd.sparse_delta_linear(**a)


def test_validate():
    sd.sparse_delta_validate(torch.tensor([0, 3, 79]), 8, 10)
    sd.sparse_delta_validate(torch.tensor([], dtype=torch.int32), 8, 10)
    with pytest.raises(RuntimeError, match=r"sparse_delta_validate: indices must be sorted ascending and unique, but indices\[1\] = 3 is repeated"):
        sd.sparse_delta_validate(torch.tensor([0, 3, 3]), 8, 10)
    with pytest.raises(RuntimeError, match=r"sparse_delta_validate: indices must be sorted.*indices\[0\] = 5 > indices\[1\] = 4"):
        sd.sparse_delta_validate(torch.tensor([5, 4]), 8, 10)
    with pytest.raises(RuntimeError, match=r"sparse_delta_validate: indices must lie in \[0, 8\*10 = 80\), got values in \[0, 80\]"):
        sd.sparse_delta_validate(torch.tensor([0, 80]), 8, 10)
    with pytest.raises(RuntimeError, match=r"sparse_delta_validate: indices must be int32 or int64"):
        sd.sparse_delta_validate(torch.tensor([0.0]), 8, 10)
    torch.library.opcheck(ops.sparse_delta_validate.default, (torch.tensor([1, 2]), 8, 10))


def test_device_mismatch_error():
    idx, vals = make_delta(8, 10, 0.2)
    with pytest.raises(RuntimeError, match=r"sparse_delta_linear: indices is on meta but the input is on cpu"):
        sd.sparse_delta_linear(torch.randn(3, 10), torch.randn(8, 10), None, idx.to("meta"), vals)


def test_other_ops_name_themselves():
    with pytest.raises(RuntimeError, match=r"sparse_delta_spmm: indices must be sorted"):
        sd.sparse_delta_spmm(torch.randn(2, 4), torch.tensor([2, 1]), torch.zeros(2), 3)
    with pytest.raises(RuntimeError, match=r"sparse_delta_spmm_t: indices must lie in"):
        sd.sparse_delta_spmm_t(torch.randn(2, 3), torch.tensor([1, 12]), torch.zeros(2), 4)
    with pytest.raises(RuntimeError, match=r"sparse_delta_sddmm: grad has 2 tokens but x has 3"):
        sd.sparse_delta_sddmm(torch.randn(2, 3), torch.randn(3, 4), torch.tensor([1]))
    with pytest.raises(RuntimeError, match=r"sparse_delta_merge_: weight must be contiguous"):
        sd.sparse_delta_merge_(torch.randn(4, 3).t(), torch.tensor([1]), torch.zeros(1))
    with pytest.raises(RuntimeError, match=r"sparse_delta_topk_grad: exclude must be sorted"):
        sd.sparse_delta_topk_grad(torch.randn(2, 3), torch.randn(2, 4), 2, torch.tensor([3, 1]))


def test_empty_tokens():
    idx, vals = make_delta(8, 10, 0.2)
    x = torch.randn(0, 10, requires_grad=True)
    y = sd.sparse_delta_linear(x, torch.randn(8, 10), None, idx, vals.requires_grad_())
    assert y.shape == (0, 8)
    y.sum().backward()
    assert torch.count_nonzero(vals.grad) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("cached", [False, True])
def test_cuda_graph_capture_training_step(cached):
    """Forward + backward of every CUDA hot-path op inside one CUDA graph: no host sync anywhere, with the CSR view
    built per call (a device sort for grad_x) or passed in (sparse_delta_csr, captured too)."""
    dev = "cuda"
    idx, vals = make_delta(256, 384, 0.02, device=dev)
    w = _randn((256, 384), torch.bfloat16, dev, 1)
    x = _randn((64, 384), torch.bfloat16, dev, 2, requires_grad=True)
    v = vals.clone().requires_grad_(True)
    g = _randn((64, 256), torch.bfloat16, dev, 3)

    def step():
        csr = sd.sparse_delta_csr(idx, 256, 384) if cached else None
        y = sd.sparse_delta_linear(x, w, None, idx, v, 0.5, csr=csr)
        gx, gv = torch.autograd.grad(y, (x, v), g)
        top = sd.sparse_delta_topk_grad(g, x.detach(), 10, idx)
        return y.detach(), gx, gv, top[0]

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        eager = step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(captured, eager):  # the SDDMM may sum in another order (atomics): fp32-rounding slack
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Hostile arguments to every op, backward ops included, in one child process (a crash fails the named case).
# out = 8, in = 10 (80 positions); CPU validates the index values too (on CUDA: sparse_delta_validate).

_HOSTILE_PRELUDE = """
idx = torch.tensor([1, 5, 12, 33, 70]); vals = torch.randn(5)
x = torch.randn(3, 10); w = torch.randn(8, 10); g = torch.randn(3, 8)
def I(*v, dtype=torch.int64):
    return torch.tensor(v, dtype=dtype)
M = [True, True, True]
"""

_RANGE = r"indices must lie in \[0, 8\*10 = 80\)"
_SORTED = r"indices must be sorted ascending and unique"


def _hostile_cases():
    c = []
    # (op prefix, call with indices/values placeholders) for the ops that take a delta on [8, 10]
    delta_ops = {
        "linear": ("sparse_delta_linear", "ops.sparse_delta_linear(x, w, None, {i}, {v}, 1.0)"),
        "linear_backward": ("sparse_delta_linear_backward", "ops.sparse_delta_linear_backward(g, x, w, {i}, {v}, 1.0, M)"),
        "linear_backward_bias_only": ("sparse_delta_linear_backward",
                                      "ops.sparse_delta_linear_backward(g, x, w, {i}, {v}, 1.0, [False, False, True])"),
        "spmm": ("sparse_delta_spmm", "ops.sparse_delta_spmm(x, {i}, {v}, 8)"),
        "spmm_t": ("sparse_delta_spmm_t", "ops.sparse_delta_spmm_t(g, {i}, {v}, 10)"),
        "sddmm": ("sparse_delta_sddmm", "ops.sparse_delta_sddmm(g, x, {i})"),
        "merge_": ("sparse_delta_merge_", "ops.sparse_delta_merge_(w, {i}, {v})"),
        "merge": ("sparse_delta_merge", "ops.sparse_delta_merge(w, {i}, {v})"),
    }
    bad_indices = [
        ("unsorted", "I(5, 1)", _SORTED + r".*indices\[1\] = 1"),
        ("duplicate", "I(3, 3)", _SORTED + r".*indices\[1\] = 3"),
        ("past_end", "I(2, 80)", _RANGE + r", got indices\[1\] = 80"),
        ("far_past_end", "I(10**12)", _RANGE),
        ("int32_past_end", "I(0, 2**31 - 1, dtype=torch.int32)", _RANGE),
        ("negative", "I(-1, 4)", _RANGE + r", got indices\[0\] = -1"),
        ("very_negative", "I(-300, -7)", _RANGE),
        ("float", "torch.tensor([1.0, 2.0])", r"indices must be int32 or int64, got Float"),
        ("bool", "torch.tensor([True, False])", r"indices must be int32 or int64, got Bool"),
        ("2d", "I(1, 2).view(1, 2)", r"indices must be 1-D, got shape \[1, 2\]"),
    ]
    for key, (op, call) in delta_ops.items():
        for name, ind, rx in bad_indices:
            vals = "torch.zeros(1)" if name == "far_past_end" else "torch.zeros(2)"
            if key == "sddmm" and name == "2d":
                rx = r"indices must be 1-D"
            c.append((f"{key}/{name}", call.format(i=ind, v=vals), f"{op}: {rx}"))
        if key != "sddmm":
            c += [(f"{key}/values_short", call.format(i="idx", v="torch.zeros(4)"),
                   f"{op}: values has 4 entries but indices has 5"),
                  (f"{key}/values_int", call.format(i="idx", v="torch.zeros(5, dtype=torch.int64)"),
                   f"{op}: values must be float32, float16, bfloat16 or float64, got Long"),
                  (f"{key}/values_2d", call.format(i="idx", v="torch.zeros(5, 1)"), f"{op}: values must be 1-D"),
                  (f"{key}/values_f64", call.format(i="idx", v="torch.zeros(5, dtype=torch.float64)"),
                   f"{op}: values must be float32 or the input's dtype \\(Float\\), got Double")]
    L, LB = "sparse_delta_linear", "sparse_delta_linear_backward"
    c += [
        ("linear/x_last_dim", "ops.sparse_delta_linear(torch.randn(3, 11), w, None, idx, vals)", f"{L}: x must have last dim 10"),
        ("linear/x_scalar", "ops.sparse_delta_linear(torch.tensor(1.0), w, None, idx, vals)", f"{L}: x must have at least 1 dim"),
        ("linear/x_int", "ops.sparse_delta_linear(torch.ones(3, 10, dtype=torch.int64), w.long(), None, idx, vals)",
         f"{L}: x must be float32"),
        ("linear/weight_1d", "ops.sparse_delta_linear(x, torch.randn(10), None, idx, vals)", f"{L}: weight must be 2-D"),
        ("linear/weight_dtype", "ops.sparse_delta_linear(x, w.half(), None, idx, vals)", f"{L}: weight has dtype Half but x has Float"),
        ("linear/bias_shape", "ops.sparse_delta_linear(x, w, torch.zeros(7), idx, vals)", f"{L}: bias must have shape \\[8\\]"),
        ("linear/bias_2d", "ops.sparse_delta_linear(x, w, torch.zeros(1, 8), idx, vals)", f"{L}: bias must have shape \\[8\\]"),
        ("linear/bias_dtype", "ops.sparse_delta_linear(x, w, torch.zeros(8).double(), idx, vals)", f"{L}: bias has dtype Double"),
        ("linear/meta_indices", "ops.sparse_delta_linear(x, w, None, idx.to('meta'), vals)", f"{L}: indices is on meta"),
        ("lb/grad_last_dim", "ops.sparse_delta_linear_backward(torch.randn(3, 7), x, w, idx, vals, 1.0, M)",
         f"{LB}: grad_out must have last dim 8, got shape \\[3, 7\\]"),
        ("lb/grad_scalar", "ops.sparse_delta_linear_backward(torch.tensor(1.0), x, w, idx, vals, 1.0, M)",
         f"{LB}: grad_out must have last dim 8"),
        ("lb/grad_tokens", "ops.sparse_delta_linear_backward(torch.randn(4, 8), x, w, idx, vals, 1.0, M)",
         f"{LB}: grad_out has 4 tokens but x has 3"),
        ("lb/grad_batch_shape", "ops.sparse_delta_linear_backward(torch.randn(2, 2, 8), x, w, idx, vals, 1.0, M)",
         f"{LB}: grad_out has 4 tokens but x has 3"),
        ("lb/grad_dtype", "ops.sparse_delta_linear_backward(g.double(), x, w, idx, vals, 1.0, M)",
         f"{LB}: x has dtype Float but grad_out has Double"),
        ("lb/grad_int", "ops.sparse_delta_linear_backward(g.long(), x, w, idx, vals, 1.0, M)", f"{LB}: grad_out must be float32"),
        ("lb/x_last_dim", "ops.sparse_delta_linear_backward(g, torch.randn(3, 11), w, idx, vals, 1.0, M)",
         f"{LB}: x must have last dim 10"),
        ("lb/x_int", "ops.sparse_delta_linear_backward(g, x.long(), w, idx, vals, 1.0, M)", f"{LB}: weight has dtype Float but x has Long"),
        ("lb/weight_dtype", "ops.sparse_delta_linear_backward(g, x, w.double(), idx, vals, 1.0, M)", f"{LB}: weight has dtype Double"),
        ("lb/weight_1d", "ops.sparse_delta_linear_backward(g, x, torch.randn(80), idx, vals, 1.0, M)", f"{LB}: weight must be 2-D"),
        ("lb/meta_values", "ops.sparse_delta_linear_backward(g, x, w, idx, vals.to('meta'), 1.0, M)", f"{LB}: values is on meta"),
        ("spmm/out_negative", "ops.sparse_delta_spmm(x, idx[:0], vals[:0], -1)",
         r"sparse_delta_spmm: out_features and in_features must be >= 0, got -1 and 10"),
        ("spmm/out_overflow", "ops.sparse_delta_spmm(x, idx[:0], vals[:0], 2**62)", r"sparse_delta_spmm: out_features \* in_features .* overflows"),
        ("spmm/out_too_small", "ops.sparse_delta_spmm(x, idx, vals, 3)", r"sparse_delta_spmm: indices must lie in \[0, 3\*10 = 30\)"),
        ("spmm/x_scalar", "ops.sparse_delta_spmm(torch.tensor(1.0), idx, vals, 8)", r"sparse_delta_spmm: x must have at least 1 dim"),
        ("spmm/x_int", "ops.sparse_delta_spmm(x.long(), idx, vals, 8)", r"sparse_delta_spmm: x must be float32"),
        ("spmm_t/in_negative", "ops.sparse_delta_spmm_t(g, idx[:0], vals[:0], -5)",
         r"sparse_delta_spmm_t: out_features and in_features must be >= 0, got 8 and -5"),
        ("spmm_t/in_overflow", "ops.sparse_delta_spmm_t(g, idx[:0], vals[:0], 2**61)", r"sparse_delta_spmm_t: .* overflows"),
        ("spmm_t/in_too_small", "ops.sparse_delta_spmm_t(g, idx, vals, 2)", r"sparse_delta_spmm_t: indices must lie in \[0, 8\*2 = 16\)"),
        ("spmm_t/in_zero", "ops.sparse_delta_spmm_t(g, idx, vals, 0)", r"sparse_delta_spmm_t: indices must lie in \[0, 8\*0 = 0\)"),
        ("sddmm/tokens", "ops.sparse_delta_sddmm(g, torch.randn(4, 10), idx)", r"sparse_delta_sddmm: grad has 3 tokens but x has 4"),
        ("sddmm/dtype", "ops.sparse_delta_sddmm(g, x.double(), idx)", r"sparse_delta_sddmm: x has dtype Double but grad has Float"),
        ("sddmm/out_dtype_int", "ops.sparse_delta_sddmm(g, x, idx, 1.0, torch.int64)", r"sparse_delta_sddmm: out_dtype must be float32"),
        ("sddmm/scalar", "ops.sparse_delta_sddmm(torch.tensor(1.0), x, idx)", r"sparse_delta_sddmm: grad must have at least 1 dim"),
        ("merge_/noncontiguous", "ops.sparse_delta_merge_(torch.randn(10, 8).t(), idx, vals)", r"sparse_delta_merge_: weight must be contiguous"),
        ("merge_/weight_1d", "ops.sparse_delta_merge_(torch.randn(80), idx, vals)", r"sparse_delta_merge_: weight must be 2-D"),
        ("merge_/weight_int", "ops.sparse_delta_merge_(w.long(), idx, vals)", r"sparse_delta_merge_: weight must be float32"),
        ("merge/weight_1d", "ops.sparse_delta_merge(torch.randn(80), idx, vals)", r"sparse_delta_merge: weight must be 2-D"),
    ]
    T = "sparse_delta_topk_grad"
    c += [
        ("topk/k_negative", "ops.sparse_delta_topk_grad(g, x, -1)", f"{T}: k must be in \\[0, 80\\] .*got -1"),
        ("topk/k_too_big", "ops.sparse_delta_topk_grad(g, x, 81)", f"{T}: k must be in \\[0, 80\\] .*got 81"),
        ("topk/k_huge", "ops.sparse_delta_topk_grad(g, x, 2**62)", f"{T}: k must be in"),
        ("topk/k_past_exclude", "ops.sparse_delta_topk_grad(g, x, 76, idx)", f"{T}: k must be in \\[0, 75\\] .*5 excluded"),
        ("topk/exclude_unsorted", "ops.sparse_delta_topk_grad(g, x, 2, I(3, 1))", f"{T}: exclude must be sorted ascending and unique"),
        ("topk/exclude_duplicate", "ops.sparse_delta_topk_grad(g, x, 2, I(3, 3))", f"{T}: exclude must be sorted ascending and unique"),
        ("topk/exclude_past_end", "ops.sparse_delta_topk_grad(g, x, 2, I(3, 80))", f"{T}: exclude\\[1\\] = 80 is outside \\[0, 8\\*10 = 80\\)"),
        ("topk/exclude_negative", "ops.sparse_delta_topk_grad(g, x, 2, I(-7))", f"{T}: exclude\\[0\\] = -7 is outside"),
        ("topk/exclude_float", "ops.sparse_delta_topk_grad(g, x, 2, torch.tensor([1.0]))", f"{T}: exclude must be int32 or int64, got Float"),
        ("topk/exclude_empty_float", "ops.sparse_delta_topk_grad(g, x, 2, torch.tensor([]))", f"{T}: exclude must be int32 or int64"),
        ("topk/exclude_2d", "ops.sparse_delta_topk_grad(g, x, 2, I(1, 2).view(2, 1))", f"{T}: exclude must be 1-D"),
        ("topk/tokens", "ops.sparse_delta_topk_grad(g, torch.randn(5, 10), 2)", f"{T}: grad has 3 tokens but x has 5"),
        ("topk/dtype", "ops.sparse_delta_topk_grad(g, x.half(), 2)", f"{T}: x has dtype Half but grad has Float"),
        ("topk/int", "ops.sparse_delta_topk_grad(g.long(), x.long(), 2)", f"{T}: grad must be float32"),
        ("topk/overflow", "ops.sparse_delta_topk_grad(torch.zeros(0, 2**33), torch.zeros(0, 2**33), 1)", f"{T}: .* overflows"),
    ]
    V = "sparse_delta_validate"
    c += [
        ("validate/out_negative", "ops.sparse_delta_validate(idx, -1, 10)", f"{V}: out_features and in_features must be >= 0"),
        ("validate/overflow", "ops.sparse_delta_validate(idx, 2**40, 2**40)", f"{V}: out_features \\* in_features .* overflows"),
        ("validate/past_end", "ops.sparse_delta_validate(idx, 8, 8)", f"{V}: indices must lie in \\[0, 8\\*8 = 64\\), got values in \\[1, 70\\]"),
        ("validate/negative", "ops.sparse_delta_validate(I(-2, 3), 8, 10)", f"{V}: indices must lie in"),
        ("validate/unsorted", "ops.sparse_delta_validate(I(4, 2), 8, 10)", f"{V}: indices must be sorted"),
        ("validate/float", "ops.sparse_delta_validate(torch.tensor([1.0]), 8, 10)", f"{V}: indices must be int32 or int64"),
        ("validate/2d", "ops.sparse_delta_validate(I(1, 2).view(1, 2), 8, 10)", f"{V}: indices must be 1-D"),
    ]
    return c


def test_hostile_arguments_isolated():
    check_errors_isolated(_hostile_cases(), prelude=_HOSTILE_PRELUDE)


def test_hostile_arguments_leave_inputs_untouched():
    """A rejected merge_ writes nothing (validation comes first), and the zero-size edge cases are valid."""
    w = torch.randn(8, 10)
    w0 = w.clone()
    with pytest.raises(RuntimeError, match="sparse_delta_merge_: indices must be sorted"):
        sd.sparse_delta_merge_(w, torch.tensor([1, 5, 3]), torch.ones(3))
    assert torch.equal(w, w0) and w._version == 0
    assert sd.sparse_delta_spmm(torch.randn(3, 10), torch.tensor([], dtype=torch.int64), torch.zeros(0), 0).shape == (3, 0)
    assert sd.sparse_delta_spmm_t(torch.randn(3, 8), torch.tensor([], dtype=torch.int32), torch.zeros(0), 0).shape == (3, 0)
    idx, sc = sd.sparse_delta_topk_grad(torch.randn(0, 8), torch.randn(0, 10), 4)
    assert idx.tolist() == [0, 1, 2, 3] and sc.tolist() == [0.0] * 4  # all scores 0: ties by index


# Shape / dtype errors: the fake kernels (torch.compile, meta) give the same message as the real kernels.
_SHAPE_CASES = [
    ("linear", lambda: ops.sparse_delta_linear(_z(3, 11), _z(8, 10), None, _i(5), _z(5)), r"sparse_delta_linear: x must have last dim 10"),
    ("linear", lambda: ops.sparse_delta_linear(_z(3, 10), _z(8, 10), _z(7), _i(5), _z(5)), r"sparse_delta_linear: bias must have shape \[8\]"),
    ("linear", lambda: ops.sparse_delta_linear(_z(3, 10), _z(8, 10), None, _i(5), _z(4)), r"sparse_delta_linear: values has 4 entries but indices has 5"),
    ("linear", lambda: ops.sparse_delta_linear(_z(3, 10), _z(8, 10), None, _z(5), _z(5)), r"sparse_delta_linear: indices must be int32 or int64, got Float"),
    ("linear", lambda: ops.sparse_delta_linear(_z(3, 10), _z(8, 10, dtype=torch.half), None, _i(5), _z(5)), r"sparse_delta_linear: weight has dtype Half but x has Float"),
    ("linear", lambda: ops.sparse_delta_linear(_z(3, 10), _z(8, 10), None, _i(5), _z(5, dtype=torch.double)), r"sparse_delta_linear: values must be float32 or the input's dtype \(Float\), got Double"),
    ("linear_backward", lambda: ops.sparse_delta_linear_backward(_z(3, 7), _z(3, 10), _z(8, 10), _i(5), _z(5), 1.0, [True] * 3), r"sparse_delta_linear_backward: grad_out must have last dim 8"),
    ("linear_backward", lambda: ops.sparse_delta_linear_backward(_z(4, 8), _z(3, 10), _z(8, 10), _i(5), _z(5), 1.0, [True] * 3), r"sparse_delta_linear_backward: grad_out has 4 tokens but x has 3"),
    ("linear_backward", lambda: ops.sparse_delta_linear_backward(_z(3, 8), _z(3, 11), _z(8, 10), _i(5), _z(5), 1.0, [True] * 3), r"sparse_delta_linear_backward: x must have last dim 10"),
    ("linear_backward", lambda: ops.sparse_delta_linear_backward(_z(3, 8), _z(3, 10), _z(8, 10), _i(5), _z(4), 1.0, [True] * 3), r"sparse_delta_linear_backward: values has 4 entries"),
    ("spmm", lambda: ops.sparse_delta_spmm(_z(3, 10), _i(0), _z(0), -1), r"sparse_delta_spmm: out_features and in_features must be >= 0, got -1 and 10"),
    ("spmm", lambda: ops.sparse_delta_spmm(_z(3, 10, dtype=torch.int64), _i(0), _z(0), 8), r"sparse_delta_spmm: x must be float32"),
    ("spmm_t", lambda: ops.sparse_delta_spmm_t(_z(3, 8), _i(0), _z(0), -1), r"sparse_delta_spmm_t: out_features and in_features must be >= 0, got 8 and -1"),
    ("spmm_t", lambda: ops.sparse_delta_spmm_t(_z(3, 8), _i(2).view(1, 2), _z(2), 10), r"sparse_delta_spmm_t: indices must be 1-D"),
    ("sddmm", lambda: ops.sparse_delta_sddmm(_z(3, 8), _z(4, 10), _i(2)), r"sparse_delta_sddmm: grad has 3 tokens but x has 4"),
    ("sddmm", lambda: ops.sparse_delta_sddmm(_z(3, 8), _z(3, 10, dtype=torch.double), _i(2)), r"sparse_delta_sddmm: x has dtype Double but grad has Float"),
    ("sddmm", lambda: ops.sparse_delta_sddmm(_z(3, 8), _z(3, 10), _i(2), 1.0, torch.int32), r"sparse_delta_sddmm: out_dtype must be float32"),
    ("merge_", lambda: ops.sparse_delta_merge_(_z(10, 8).t(), _i(2), _z(2)), r"sparse_delta_merge_: weight must be contiguous"),
    ("merge_", lambda: ops.sparse_delta_merge_(_z(80), _i(2), _z(2)), r"sparse_delta_merge_: weight must be 2-D"),
    ("merge", lambda: ops.sparse_delta_merge(_z(8, 10), _i(2), _z(3)), r"sparse_delta_merge: values has 3 entries but indices has 2"),
    ("topk_grad", lambda: ops.sparse_delta_topk_grad(_z(3, 8), _z(3, 10), 81), r"sparse_delta_topk_grad: k must be in \[0, 80\]"),
    ("topk_grad", lambda: ops.sparse_delta_topk_grad(_z(3, 8), _z(3, 10), 2, _z(2)), r"sparse_delta_topk_grad: exclude must be int32 or int64"),
    ("topk_grad", lambda: ops.sparse_delta_topk_grad(_z(3, 8), _z(2, 10), 2), r"sparse_delta_topk_grad: grad has 3 tokens but x has 2"),
    ("validate", lambda: ops.sparse_delta_validate(_z(2), 8, 10), r"sparse_delta_validate: indices must be int32 or int64, got Float"),
]


def _z(*shape, dtype=torch.float32):
    return torch.zeros(shape, dtype=dtype)


def _i(n):
    return torch.arange(n, dtype=torch.int64)


@pytest.mark.parametrize("mode", ["real", "fake", "meta"])
@pytest.mark.parametrize("i", range(len(_SHAPE_CASES)), ids=lambda i: f"{_SHAPE_CASES[i][0]}-{i}")
def test_shape_errors_real_and_fake(i, mode):
    _, call, rx = _SHAPE_CASES[i]
    if mode == "real":
        with pytest.raises(RuntimeError, match=rx):
            call()
    elif mode == "fake":
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(), pytest.raises(RuntimeError, match=rx):
            call()
    else:
        with torch.device("meta"), pytest.raises(RuntimeError, match=rx):
            call()


# ---------------------------------------------------------------------------------------------------------------
# In place: sparse_delta_merge_ behaves as an ATen in-place op.


def test_merge_inplace_bumps_version_counter():
    idx, vals = make_delta(8, 10, 0.2)
    w = torch.randn(8, 10)
    v0 = w._version
    sd.sparse_delta_merge_(w, idx, vals, 0.5)
    assert w._version == v0 + 1
    view = w[2:4]  # a view shares the counter
    sd.sparse_delta_merge(view.contiguous(), idx[:1] * 0, vals[:1])  # out of place: no bump
    assert w._version == v0 + 1


def test_merge_after_forward_breaks_backward_like_nn_linear():
    """y = layer(x); merge; y.sum().backward() must raise as for nn.Linear (the saved W changed under it)."""
    from peftcore.tuners.sparse_delta import SparseDeltaLinear

    torch.manual_seed(0)
    base = torch.nn.Linear(10, 8)
    ref = torch.nn.Linear(10, 8)
    x = torch.randn(3, 10, requires_grad=True)
    y = ref(x)
    with torch.no_grad():
        ref.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    layer = SparseDeltaLinear(base, make_delta(8, 10, 0.2)[0])
    with torch.no_grad():
        layer.values.normal_()
    y = layer(x)
    layer.merge()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    layer.unmerge()


def test_merge_inplace_refuses_leaf_and_grad_inputs_in_grad_mode():
    idx, vals = make_delta(8, 10, 0.2)
    p = torch.nn.Parameter(torch.randn(8, 10))
    with pytest.raises(RuntimeError, match="sparse_delta_merge_: a leaf Variable that requires grad is being used in an in-place operation"):
        sd.sparse_delta_merge_(p, idx, vals)
    v = vals.clone().requires_grad_()
    w = torch.randn(8, 10)
    with pytest.raises(RuntimeError, match="sparse_delta_merge_: values requires grad, but this in-place op has no derivative"):
        sd.sparse_delta_merge_(w, idx, v)
    p0 = p.detach().clone()
    with torch.no_grad():  # what merge()/unmerge() do: allowed, exact round trip in fp32 here
        sd.sparse_delta_merge_(p, idx, v, 0.5)
        torch.testing.assert_close(p, ref_merge(p0, idx, vals, 0.5))
        sd.sparse_delta_merge_(p, idx, v, -0.5)
    torch.testing.assert_close(p.detach(), p0)
    assert p.requires_grad and p.grad_fn is None


def test_merge_inplace_inference_tensors():
    idx, vals = make_delta(8, 10, 0.2)
    with torch.inference_mode():
        t = torch.randn(8, 10)
    t0 = t.clone()
    with pytest.raises(RuntimeError, match="sparse_delta_merge_: Inplace update to inference tensor outside InferenceMode"):
        sd.sparse_delta_merge_(t, idx, vals)
    assert torch.equal(t, t0)  # refused before writing
    with torch.inference_mode():
        sd.sparse_delta_merge_(t, idx, vals)
        w = torch.randn(8, 10)
        sd.sparse_delta_merge_(w, idx, vals)
    torch.testing.assert_close(t, ref_merge(t0, idx, vals))


def test_merge_inplace_compiles_on_parameters_under_no_grad():
    idx, vals = make_delta(16, 24, 0.1)
    p = torch.nn.Parameter(torch.randn(16, 24))
    p0 = p.detach().clone()

    def f(w, v):
        sd.sparse_delta_merge_(w, idx, v, 0.5)
        return w

    from torch import _dynamo

    _dynamo.reset()
    with torch.no_grad():
        torch.compile(f, backend="aot_eager", fullgraph=True)(p, vals)
    torch.testing.assert_close(p.detach(), ref_merge(p0, idx, vals, 0.5))
    assert p._version > 0


# ---------------------------------------------------------------------------------------------------------------
# Double backward: linear refuses; spmm / spmm_t / sddmm / merge have it (their backwards are each other).


def test_linear_double_backward_refused():
    idx, vals = make_delta(6, 10, 0.3, values_dtype=torch.float64)
    x, w, b = _randn((4, 10), torch.float64, "cpu", 1), _randn((6, 10), torch.float64, "cpu", 2), _randn((6,), torch.float64, "cpu", 3)
    check_double_backward_refused(ops.sparse_delta_linear, (x, w, b, idx, vals, 0.5), (0, 4), "sparse_delta_linear")
    check_double_backward_refused(ops.sparse_delta_linear, (x, w, b, idx, vals, 0.5), (4,), "sparse_delta_linear")
    # first derivatives with create_graph=True still come out right
    xr, vr = x.clone().requires_grad_(), vals.clone().requires_grad_()
    gx, gv = torch.autograd.grad(ops.sparse_delta_linear(xr, w, b, idx, vr, 0.5).pow(2).sum(), (xr, vr), create_graph=True)
    xr2, vr2 = x.clone().requires_grad_(), vals.clone().requires_grad_()
    rgx, rgv = torch.autograd.grad(ref_linear(xr2, w, b, idx, vr2, 0.5).pow(2).sum(), (xr2, vr2))
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gv, rgv)


@pytest.mark.parametrize("which", ["spmm", "spmm_t", "sddmm", "merge"])
def test_gradgradcheck(which):
    idx, vals = make_delta(6, 9, 0.3, index_dtype=torch.int32, values_dtype=torch.float64, seed=4, empty_rows=(2,))
    x = _randn((2, 3, 9), torch.float64, "cpu", 5, requires_grad=True)
    g = _randn((2, 3, 6), torch.float64, "cpu", 6, requires_grad=True)
    v = vals.clone().requires_grad_()
    w = _randn((6, 9), torch.float64, "cpu", 7, requires_grad=True)
    fn, args = {
        "spmm": (lambda a, b: ops.sparse_delta_spmm(a, idx, b, 6, -0.7), (x, v)),
        "spmm_t": (lambda a, b: ops.sparse_delta_spmm_t(a, idx, b, 9, 1.3), (g, v)),
        "sddmm": (lambda a, b: ops.sparse_delta_sddmm(a, b, idx, 0.6), (g, x)),
        "merge": (lambda a, b: ops.sparse_delta_merge(a, idx, b, 0.4), (w, v)),
    }[which]
    assert torch.autograd.gradgradcheck(fn, args, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_topk_outputs_not_differentiable():
    g = _randn((5, 6), torch.float32, "cpu", 1, requires_grad=True)
    x = _randn((5, 7), torch.float32, "cpu", 2, requires_grad=True)
    idx, scores = sd.sparse_delta_topk_grad(g, x, 4)
    assert not idx.requires_grad and not scores.requires_grad and scores.grad_fn is None


# ---------------------------------------------------------------------------------------------------------------
# topk_grad ranking rule: |grad^T x| descending; NaN above +inf above every finite score; ties (and NaNs among
# themselves) by ascending flat index; excluded positions never returned. Against a float64 reference that sorts
# the dense scores (torch.sort descending and stable: NaN first, ties in index order).


def ref_topk_ranked(g, x, k, exclude=None):
    s = (g.double().reshape(-1, g.shape[-1]).t() @ x.double().reshape(-1, x.shape[-1])).abs().reshape(-1)
    key = s.clone()
    if exclude is not None:
        key[exclude.long()] = -1.0
    order = torch.sort(key, descending=True, stable=True).indices[:k]
    # the chosen scores are exactly torch.topk's (as a multiset); topk does not specify which tied index it takes
    top = torch.topk(key, k).values
    assert torch.equal(key[order].sort().values.nan_to_num(1e300), top.sort().values.nan_to_num(1e300))
    idx = order.sort().values
    return idx, s[idx].float()


def _int_inputs(tokens, out, inn, seed, lo=-3, hi=4, dtype=torch.float32):
    """Small integers: every score is exact in fp32 (and in the float64 reference), so ties are exact."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randint(lo, hi, (tokens, out), generator=gen).to(dtype)
    x = torch.randint(lo, hi, (tokens, inn), generator=gen).to(dtype)
    return g, x


def _check_topk(g, x, k, exclude=None):
    idx, scores = sd.sparse_delta_topk_grad(g, x, k, exclude)
    ridx, rscores = ref_topk_ranked(g, x, k, exclude)
    assert torch.equal(idx, ridx), f"indices differ at {(idx != ridx).nonzero()[:5].flatten().tolist()}"
    torch.testing.assert_close(scores, rscores, equal_nan=True)
    return idx, scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k", [1, 7, 40, 200])
def test_topk_ties_by_index(dtype, k):
    g, x = _int_inputs(5, 17, 23, seed=k, dtype=dtype)  # 391 positions, scores in 0..45: many exact ties
    excl, _ = make_delta(17, 23, 0.15, seed=3)
    _check_topk(g, x, k)
    _check_topk(g, x, k, excl)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_topk_nan_and_inf_rule(dtype):
    g, x = _int_inputs(6, 12, 15, seed=1, dtype=dtype)
    g[2, 4] = float("nan")  # row 4 of the scores: NaN wherever ... (every column: NaN * anything is NaN)
    x[1, 9] = float("inf")  # column 9: +inf, or NaN where grad[1, r] == 0 (0 * inf), or NaN in row 4
    x[3, 2] = -float("inf")
    for k in (3, 15, 20, 40, 120):
        idx, scores = _check_topk(g, x, k)
        finite = torch.isfinite(scores)
        n_special = int((~finite).sum())
        # NaN never disturbs the order among finite scores: the finite part is the top of the finite scores
        _, fin_ref = ref_topk_ranked(g, x, 12 * 15)
        if n_special < k:
            assert scores[finite].sort(descending=True).values[0] <= fin_ref[torch.isfinite(fin_ref)].max()
    # an excluded NaN is never returned
    nan_pos = torch.arange(4 * 15, 5 * 15)
    idx, scores = _check_topk(g, x, 10, nan_pos)
    assert not set(idx.tolist()) & set(nan_pos.tolist())


def test_topk_one_nan_keeps_finite_order():
    """The reported case: one NaN in grad must not reshuffle the ranking of the finite entries."""
    g, x = _randn((9, 20), torch.float32, "cpu", 1), _randn((9, 30), torch.float32, "cpu", 2)
    clean_idx, _ = sd.sparse_delta_topk_grad(g, x, 50)
    g2 = g.clone()
    g2[4, 7] = float("nan")  # row 7 of the scores becomes NaN: its 30 entries rank first
    idx, scores = sd.sparse_delta_topk_grad(g2, x, 80)
    assert torch.isnan(scores).sum() == 30
    finite_idx = idx[torch.isfinite(scores)]
    clean_wo_row7 = sd.sparse_delta_topk_grad(g, x, 50, torch.arange(7 * 30, 8 * 30))[0]
    assert torch.equal(finite_idx, clean_wo_row7)
    assert not set(clean_idx.tolist()) - set(clean_wo_row7.tolist()) - set(range(210, 240))


def test_topk_float64_ranks_in_float64():
    g = torch.tensor([[1.0, 1.0 + 1e-12]], dtype=torch.float64)
    x = torch.tensor([[1.0]], dtype=torch.float64)
    idx, _ = sd.sparse_delta_topk_grad(g, x, 1)
    assert idx.tolist() == [1]  # fp32 scores would tie and pick index 0


def test_topk_multi_tile_ties_and_nan():
    """Several 2^20-score tiles and many pool prunes, with exact ties and a NaN row, against the reference."""
    g, x = _int_inputs(4, 1100, 1000, seed=5, lo=-2, hi=3)
    g[1, 700] = float("nan")
    excl, _ = make_delta(1100, 1000, 0.01, seed=3)
    _check_topk(g, x, 3000, excl)


# ---------------------------------------------------------------------------------------------------------------
# Determinism: the CPU kernels sum in a fixed order (per-thread partials summed in thread order), so repeated calls
# are bitwise equal with several threads, and torch.use_deterministic_algorithms(True) accepts them.


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_deterministic(dtype):
    idx, vals = make_delta(96, 130, 0.4, seed=2)
    x = _randn((70, 130), dtype, "cpu", 1)
    g = _randn((70, 96), dtype, "cpu", 2)
    w = _randn((96, 130), dtype, "cpu", 3)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [(ops.sparse_delta_spmm_t(g, idx, vals, 130, 0.5), ops.sparse_delta_sddmm(g, x, idx, 0.5),
                 *ops.sparse_delta_linear_backward(g, x, w, idx, vals, 0.5, [True, True, True]),
                 ops.sparse_delta_spmm(x, idx, vals, 96)) for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(prev)
    for run in runs[1:]:
        for a, b in zip(runs[0], run):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# CUDA against the CPU kernels at token counts that pick token tiles of 1 / 4 / 8 / 16 / 32 (ragged last tiles),
# several row blocks and column chunks (in = 1100), SDDMM token splits; and the deterministic mode (no float
# atomics): bitwise repeatable and equal to the atomics path up to rounding. test_sparse_delta_csr.py adds wider
# inputs, fp16, nnz = 0 and the CSR view passed.


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("tokens", [1, 3, 7, 40, 77])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu_at_tile_shapes(tokens, dtype, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the dense x W^T / g W
    out, inn = 300, 1100
    idx, vals = make_delta(out, inn, 0.02, seed=tokens, empty_rows=(0, 257))
    x = _randn((tokens, inn), dtype, "cpu", 1)
    w = _randn((out, inn), dtype, "cpu", 2, scale=inn ** -0.5)
    g = _randn((tokens, out), dtype, "cpu", 3)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1.6e-2)

    def run(dev):
        d = lambda t: t.to(dev)  # noqa: E731
        return (ops.sparse_delta_linear(d(x), d(w), None, d(idx), d(vals), 0.5),
                *ops.sparse_delta_linear_backward(d(g), d(x), d(w), d(idx), d(vals), 0.5, [True, True, True]),
                ops.sparse_delta_spmm_t(d(g), d(idx), d(vals), inn, 0.5),
                ops.sparse_delta_sddmm(d(g), d(x), d(idx), 0.5),
                ops.sparse_delta_merge(d(w), d(idx), d(vals), 0.5))

    for a, b in zip(run("cuda"), run("cpu")):
        torch.testing.assert_close(a.cpu(), b, **tol)
    gi, xi = _int_inputs(tokens, out, inn, seed=tokens)
    ci, cs = sd.sparse_delta_topk_grad(gi.cuda(), xi.cuda(), 50, idx.cuda())
    ri, rs = sd.sparse_delta_topk_grad(gi, xi, 50, idx)
    torch.testing.assert_close(cs.cpu().sort().values, rs.sort().values)  # ties may pick other indices on CUDA
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det = [run("cuda") for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, b, c in zip(det[0], det[1], run("cpu")):
        assert torch.equal(a, b)
        torch.testing.assert_close(a.cpu(), c, **tol)
