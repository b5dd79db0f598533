"""sparse_delta ops: every op through the shared checks (peftcore.testing), plus bad-input and memory tests."""
import pytest
import torch

import peftcore  # noqa: F401
from peftcore.ops import sparse_delta as sd
from peftcore.testing import OpCase, Sample, devices, op_test_suite

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


def ref_linear(x, weight, bias, indices, values, scale=1.0):
    w = weight + scale * dense_delta(indices, values, *weight.shape, dtype=weight.dtype)
    return torch.nn.functional.linear(x, w, bias)


def ref_linear_scatter(x, weight, bias, indices, values, scale=1.0):
    """What SpIEL and SHiRA do today: clone W, scatter the delta in, F.linear. Autograd then builds the dense
    [out, in] weight gradient and gathers the delta's entries from it. The bench's baseline (a)."""
    w = weight.reshape(-1).index_add(0, indices.long(), (scale * values).to(weight.dtype)).view_as(weight)
    return torch.nn.functional.linear(x, w, bias)


def ref_spmm(x, indices, values, out_features, scale=1.0):
    return scale * x @ dense_delta(indices, values, out_features, x.shape[-1], dtype=x.dtype).t()


def ref_spmm_t(g, indices, values, in_features, scale=1.0):
    return scale * g @ dense_delta(indices, values, g.shape[-1], in_features, dtype=g.dtype)


def _sddmm_out_dtype(g, out_dtype):
    return out_dtype or (torch.float64 if g.dtype == torch.float64 else torch.float32)


def ref_sddmm(g, x, indices, scale=1.0, out_dtype=None):
    full = g.reshape(-1, g.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    return (scale * full.reshape(-1)[indices.long()]).to(_sddmm_out_dtype(g, out_dtype))


def ref_linear_backward(g, x, weight, indices, values, scale, mask):
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


# Shapes: batch dims x (out, in, density). Token counts straddle the 16-token CPU tile and `in` the 8-wide
# vector blocks; one delta has empty rows; one is empty. float64 samples stay small for gradcheck.
def _configs(dtype):
    if dtype == torch.float64:
        return [((2, 3), 6, 10, 0.3, torch.int64, ()), ((5,), 7, 9, 0.25, torch.int32, (0, 3))]
    return [((2, 19), 24, 40, 0.1, torch.int64, (2, 5)), ((37,), 33, 20, 0.05, torch.int32, ()),
            ((16,), 16, 64, 0.02, torch.int64, ()), ((3, 4), 8, 12, 0.0, torch.int32, ())]


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


def spmm_samples(device, dtype, requires_grad):
    for i, (batch, out, inn, dens, idt, empty) in enumerate(_configs(dtype)):
        for vdt in _values_dtypes(dtype):
            idx, vals = make_delta(out, inn, dens, idt, vdt, device, seed=i, empty_rows=empty)
            yield Sample((_randn((*batch, inn), dtype, device, 10 + i), idx, vals, out, -1.5), name=f"{batch}x{out}x{inn}")


def spmm_t_samples(device, dtype, requires_grad):
    for i, (batch, out, inn, dens, idt, empty) in enumerate(_configs(dtype)):
        for vdt in _values_dtypes(dtype):
            idx, vals = make_delta(out, inn, dens, idt, vdt, device, seed=i, empty_rows=empty)
            yield Sample((_randn((*batch, out), dtype, device, 10 + i), idx, vals, inn, 0.5), name=f"{batch}x{out}x{inn}")


def sddmm_samples(device, dtype, requires_grad):
    for i, (batch, out, inn, dens, idt, empty) in enumerate(_configs(dtype)):
        idx, _ = make_delta(out, inn, dens, idt, torch.float32, device, seed=i, empty_rows=empty)
        g = _randn((*batch, out), dtype, device, 10 + i)
        x = _randn((*batch, inn), dtype, device, 20 + i)
        yield Sample((g, x, idx, 2.0), name=f"{batch}x{out}x{inn}")
        if i == 0:
            yield Sample((g, x, idx, 1.0, dtype), name="out_dtype")


def linear_backward_samples(device, dtype, requires_grad):
    for s in linear_samples(device, dtype, False):
        x, w, b, idx, vals, scale = s.args
        g = _randn((*x.shape[:-1], w.shape[0]), dtype, device, 99)
        for mask in ([True, True, True], [False, True, False], [True, False, True]):
            yield Sample((g, x, w, idx, vals, scale, mask), name=f"{s.name}/{mask}")


def merge_samples(device, dtype, requires_grad):
    for i, (batch, out, inn, dens, idt, empty) in enumerate(_configs(dtype)[:3]):
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
    OpCase("sparse_delta_spmm", ops.sparse_delta_spmm, spmm_samples, ref_spmm, ALL_DTYPES, grad_args=(0, 2)),
    OpCase("sparse_delta_spmm_t", ops.sparse_delta_spmm_t, spmm_t_samples, ref_spmm_t, ALL_DTYPES, grad_args=(0, 2)),
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
def test_cuda_graph_capture_training_step():
    """Forward + backward of every CUDA hot-path op inside one CUDA graph: no host sync anywhere."""
    dev = "cuda"
    idx, vals = make_delta(256, 384, 0.02, device=dev)
    w = _randn((256, 384), torch.bfloat16, dev, 1)
    x = _randn((64, 384), torch.bfloat16, dev, 2, requires_grad=True)
    v = vals.clone().requires_grad_(True)
    g = _randn((64, 256), torch.bfloat16, dev, 3)

    def step():
        y = sd.sparse_delta_linear(x, w, None, idx, v, 0.5)
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
