"""partial ops: every op through the shared checks (peftcore.testing), plus saved-activation, fast-path, bad-input
tests. The references build W_eff densely, here in the test only."""
import pytest
import torch
import torch.nn.functional as F

import peftcore  # noqa: F401
from peftcore.ops import partial as pt
from peftcore.testing import OpCase, Sample, devices, op_test_suite

ops = torch.ops.peftcore
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
DEVICES = devices()


# ---------------------------------------------------------------------------------------------------------------
# Inputs and plain-torch references.


def make_index(size, k, kind, start=0, seed=0, device="cpu"):
    """(index, range_start): kind "range" = [start, start+k) passed as an index (CPU detects it), "range_start" =
    the same range passed explicitly, "scatter" = k sorted random positions."""
    if kind == "scatter":
        g = torch.Generator().manual_seed(seed)
        idx = torch.randperm(size, generator=g)[:k].sort().values
        return idx.to(device), -1
    idx = torch.arange(start, start + k, device=device)
    return idx, (start if kind == "range_start" else -1)


def selected(index, range_start):
    k = index.shape[0]
    return torch.arange(range_start, range_start + k, device=index.device) if range_start >= 0 else index


def ref_weight(weight, delta, index, dim, range_start=-1):
    return weight.index_add(dim, selected(index, range_start), delta.to(weight.dtype))


def ref_linear(x, weight, bias, delta, index, dim, range_start=-1):
    return F.linear(x, ref_weight(weight, delta, index, dim, range_start), bias)


def ref_linear_backward(g, saved, weight, delta, index, dim, mask, range_start=-1):
    w = ref_weight(weight, delta, index, dim, range_start)
    idx = selected(index, range_start)
    g2 = g.reshape(-1, g.shape[-1])
    s2 = saved.reshape(g2.shape[0], saved.shape[-1])
    gx = (g2 @ w).view(*saved.shape[:-1], w.shape[1]) if mask[0] else saved.new_empty(0)
    if mask[1]:
        gd = (g2.t() @ s2) if dim == 1 else (g2[:, idx].t() @ s2)
        gd = gd.to(delta.dtype)
    else:
        gd = delta.new_empty(0)
    gb = g2.sum(0) if mask[2] else g.new_empty(0)
    return gx, gd, gb


def ref_s2ft(x, weight, bias, delta, a):
    """S2FT's own formulation (dim 1, columns [a, a+k) after co-permutation), in plain torch: the frozen dense
    product plus the trainable slice, y = F.linear(x, W) + F.linear(x[..., a:a+k], delta). The bench's
    baseline (b)."""
    k = delta.shape[1]
    return F.linear(x, weight, bias) + F.linear(x[..., a:a + k], delta.to(x.dtype))


def ref_masked_full(x, weight, bias, mask):
    """The naive way (bench baseline (a)): W itself trainable, its dense gradient masked to the selected columns
    afterwards by a hook (the [out, in] gradient and all of x are kept)."""
    return F.linear(x, weight, bias)


def ref_gather(x, index):
    return x[..., index]


def ref_scatter_add(src, index, size):
    return src.new_zeros((*src.shape[:-1], size)).index_add(-1, index, src)


def _randn(shape, dtype, device, seed, requires_grad=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
    return t.requires_grad_(requires_grad)


def _configs(dtype):
    """(batch, out, in, dim, k, index kind, range start). Sizes are not multiples of 8; ranges at both edges."""
    if dtype == torch.float64:
        return [((2, 3), 6, 10, 1, 3, "scatter", 0), ((5,), 7, 9, 0, 2, "range", 4), ((4,), 6, 10, 1, 4, "range_start", 6),
                ((3,), 7, 9, 0, 3, "scatter", 0), ((3,), 7, 9, 0, 3, "range_start", 0)]
    return [((2, 19), 24, 40, 1, 5, "scatter", 0), ((37,), 33, 20, 0, 7, "range", 11), ((16,), 16, 67, 1, 13, "range", 0),
            ((3, 4), 18, 12, 0, 5, "range_start", 13), ((5,), 20, 13, 1, 3, "range_start", 10),
            ((6,), 21, 30, 0, 9, "scatter", 0), ((3,), 8, 12, 1, 0, "scatter", 0), ((4,), 10, 6, 1, 6, "range", 0)]


def _delta_dtypes(dtype):
    # delta may be float32 or the weight's dtype
    return (dtype,) if dtype in (torch.float32, torch.float64) else (torch.float32, dtype)


def linear_samples(device, dtype, requires_grad):
    for i, (batch, out, inn, dim, k, kind, start) in enumerate(_configs(dtype)):
        idx, rs = make_index((out, inn)[dim], k, kind, start, seed=i, device=device)
        for ddt in _delta_dtypes(dtype):
            x = _randn((*batch, inn), dtype, device, 10 + i)
            w = _randn((out, inn), dtype, device, 20 + i, scale=inn ** -0.5)
            d = _randn((k, inn) if dim == 0 else (out, k), ddt, device, 40 + i, scale=0.5)
            b = _randn((out,), dtype, device, 30 + i) if (requires_grad or i % 2 == 0) else None
            yield Sample((x, w, b, d, idx, dim, rs),
                         name=f"{batch}x{out}x{inn}/dim{dim}/k={k}/{kind}/{ddt}/bias={b is not None}")


def linear_backward_samples(device, dtype, requires_grad):
    for s in linear_samples(device, dtype, False):
        x, w, b, d, idx, dim, rs = s.args
        saved = x[..., selected(idx, rs)].contiguous() if dim == 1 else x
        g = _randn((*x.shape[:-1], w.shape[0]), dtype, device, 99)
        for mask in ([True, True, True], [False, True, False], [True, False, True]):
            yield Sample((g, saved, w, d, idx, dim, mask, rs), name=f"{s.name}/{mask}")


def gather_samples(device, dtype, requires_grad):
    for i, (batch, out, inn, dim, k, kind, start) in enumerate(_configs(dtype)):
        idx, rs = make_index(inn, k, "scatter" if kind == "scatter" else "range", start if dim == 1 else 0, seed=i,
                             device=device)
        yield Sample((_randn((*batch, inn), dtype, device, 10 + i), idx), name=f"{batch}x{inn}/k={k}/{kind}")


def scatter_samples(device, dtype, requires_grad):
    for s in gather_samples(device, dtype, requires_grad):
        x, idx = s.args
        yield Sample((_randn((*x.shape[:-1], idx.shape[0]), dtype, device, 50), idx, x.shape[-1]), name=s.name)


CASES = [
    OpCase("partial_linear", ops.partial_linear, linear_samples, ref_linear, ALL_DTYPES, grad_args=(0, 2, 3)),
    OpCase("partial_linear_backward", ops.partial_linear_backward, linear_backward_samples, ref_linear_backward,
           ALL_DTYPES),
    OpCase("partial_gather", ops.partial_gather, gather_samples, ref_gather, ALL_DTYPES, grad_args=(0,)),
    OpCase("partial_scatter_add", ops.partial_scatter_add, scatter_samples, ref_scatter_add, ALL_DTYPES,
           grad_args=(0,)),
]


test_opcheck, test_reference, test_gradcheck, test_compile = op_test_suite(CASES)


@pytest.mark.parametrize("dim,range_start", [(1, None), (1, 3), (0, None), (0, 2)])
def test_compile_inductor_training_step(dim, range_start):
    """The main op through the default (inductor) backend, forward and backward, fullgraph."""
    import torch._dynamo

    torch._dynamo.reset()
    out, inn, k = 32, 48, 6
    idx = torch.tensor([1, 5, 6, 20, 27, 31]) if range_start is None else torch.arange(range_start, range_start + k)
    w = _randn((out, inn), torch.float32, "cpu", 1)
    x = _randn((4, inn), torch.float32, "cpu", 2, requires_grad=True)
    d = _randn((k, inn) if dim == 0 else (out, k), torch.float32, "cpu", 3, requires_grad=True)

    def step(x, d):
        return (pt.partial_linear(x, w, None, d, idx, dim, range_start).relu() ** 2).sum()

    y = torch.compile(step, fullgraph=True)(x, d)
    gx, gd = torch.autograd.grad(y, (x, d))
    x2, d2 = x.detach().clone().requires_grad_(), d.detach().clone().requires_grad_()
    ref = step(x2, d2)
    rgx, rgd = torch.autograd.grad(ref, (x2, d2))
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gd, rgd)


# ---------------------------------------------------------------------------------------------------------------
# Semantics beyond the reference.


def _saved_bytes(fn, exclude):
    """Bytes autograd saves while fn() builds its graph, tensors sharing storage with `exclude` left out."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(saved), out


@pytest.mark.parametrize("range_start", [None, 40])
def test_dim1_saves_only_selected_columns(range_start):
    """For dim 1 the graph keeps x[..., index] ([T, k]) and nothing else activation-sized: memory ∝ k / in."""
    T, out, inn, k = 64, 48, 80, 8
    idx = torch.tensor([3, 9, 10, 11, 30, 41, 60, 79]) if range_start is None else torch.arange(40, 48)
    w = _randn((out, inn), torch.float32, "cpu", 1)
    d = _randn((out, k), torch.float32, "cpu", 2, requires_grad=True)
    b = _randn((out,), torch.float32, "cpu", 3, requires_grad=True)
    x = _randn((T, inn), torch.float32, "cpu", 4, requires_grad=True)
    nbytes, y = _saved_bytes(lambda: pt.partial_linear(x, w, b, d, idx, 1, range_start), (w, d, b, idx))
    assert nbytes == T * k * 4, f"saved {nbytes} bytes besides W/delta/index, expected x[:, index] = {T * k * 4}"
    # ... and the naive full linear with W trainable keeps all of x
    wt = w.clone().requires_grad_()
    nfull, _ = _saved_bytes(lambda: F.linear(x, wt, b), (wt, b))
    assert nfull >= T * inn * 4
    # the backward from what was saved is right
    gx, gd = torch.autograd.grad(y.sum(), (x, d))
    x2, d2 = x.detach().clone().requires_grad_(), d.detach().clone().requires_grad_()
    rgx, rgd = torch.autograd.grad(ref_linear(x2, w, b, d2, idx, 1).sum(), (x2, d2))
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gd, rgd)


@pytest.mark.parametrize("dim", [0, 1])
def test_range_fast_path_equals_general_path(dim):
    """The range path (auto-detected, and explicit range_start) equals the
    general gather/scatter path on the same problem with W's rows/columns permuted so the selection is scattered."""
    out, inn, T, a, k = 23, 37, 11, 9, 7
    size = (out, inn)[dim]
    w = _randn((out, inn), torch.float64, "cpu", 1)
    x = _randn((T, inn), torch.float64, "cpu", 2)
    d = _randn((k, inn) if dim == 0 else (out, k), torch.float64, "cpu", 3)
    b = _randn((out,), torch.float64, "cpu", 4)
    # permutation moving [a, a+k) to scattered positions `new`, keeping the order of both groups
    g = torch.Generator().manual_seed(5)
    new = torch.randperm(size, generator=g)[:k].sort().values
    assert new[-1] - new[0] != k - 1
    rest_new = torch.tensor([i for i in range(size) if i not in set(new.tolist())])
    old_rest = torch.tensor([i for i in range(size) if not a <= i < a + k])
    perm = torch.empty(size, dtype=torch.long)  # permuted[j] = original[perm[j]]
    perm[new], perm[rest_new] = torch.arange(a, a + k), old_rest

    def run(x, d, w, idx, rs, dim, permute):
        x, d = x.detach().clone().requires_grad_(), d.detach().clone().requires_grad_()
        bb = b
        if permute and dim == 1:
            y = pt.partial_linear(x[:, perm], w[:, perm], bb, d, idx, 1, rs)
        elif permute:
            y = pt.partial_linear(x, w[perm], bb[perm], d, idx, 0, rs)
            y = y[:, torch.argsort(perm)]
        else:
            y = pt.partial_linear(x, w, bb, d, idx, dim, rs)
        gx, gd = torch.autograd.grad((y * y).sum(), (x, d))
        return y, gx, gd

    fast = run(x, d, w, torch.arange(a, a + k), None, dim, False)
    explicit = run(x, d, w, torch.arange(a, a + k), a, dim, False)
    general = run(x, d, w, new, None, dim, True)
    for f, e, gn in zip(fast, explicit, general):
        torch.testing.assert_close(f, gn)
        torch.testing.assert_close(e, gn)
    torch.testing.assert_close(fast[0], ref_linear(x, w, b, d, torch.arange(a, a + k), dim))


def test_s2ft_reference_is_the_same_function():
    """The bench's baseline (b) computes what partial_linear(dim=1, range) computes, gradients included."""
    w, x = _randn((16, 24), torch.float64, "cpu", 1), _randn((5, 24), torch.float64, "cpu", 2)
    d1, d2 = (_randn((16, 4), torch.float64, "cpu", 3, requires_grad=True) for _ in range(2))
    y1, y2 = ref_s2ft(x, w, None, d1, 7), pt.partial_linear(x, w, None, d2, torch.arange(7, 11), 1, 7)
    torch.testing.assert_close(y1, y2)
    torch.testing.assert_close(torch.autograd.grad(y1.sum(), d1), torch.autograd.grad(y2.sum(), d2))


@pytest.mark.parametrize("dim", [0, 1])
def test_weight_requires_grad_gets_dense_grad(dim):
    idx = torch.tensor([1, 4, 5])
    w = _randn((12, 20), torch.float32, "cpu", 3, requires_grad=True)
    x = _randn((7, 20), torch.float32, "cpu", 4)
    d = _randn((3, 20) if dim == 0 else (12, 3), torch.float32, "cpu", 5)
    pt.partial_linear(x, w, None, d, idx, dim).pow(2).sum().backward()
    w2 = w.detach().clone().requires_grad_()
    ref_linear(x, w2, None, d, idx, dim).pow(2).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad)


def test_range_start_helper():
    assert pt.partial_range_start(torch.arange(5, 9)) == 5
    assert pt.partial_range_start(torch.tensor([1, 2, 4])) == -1
    assert pt.partial_range_start(torch.tensor([], dtype=torch.long)) == 0


def test_empty_tokens_and_empty_index():
    x = torch.randn(0, 10, requires_grad=True)
    d = torch.randn(8, 2, requires_grad=True)
    y = pt.partial_linear(x, torch.randn(8, 10), None, d, torch.tensor([2, 7]), 1)
    assert y.shape == (0, 8)
    y.sum().backward()
    assert torch.count_nonzero(d.grad) == 0
    x = torch.randn(3, 10)
    w = torch.randn(8, 10)
    y = pt.partial_linear(x, w, None, torch.zeros(8, 0), torch.zeros(0, dtype=torch.long), 1)
    torch.testing.assert_close(y, x @ w.t())


def test_no_dense_temporary_in_forward_backward():
    """A training step allocates nothing [out, in]-sized (W itself excepted), on both paths and both dims."""
    out, inn, t, k = 1024, 1024, 64, 16
    w = torch.randn(out, inn)
    from torch.profiler import ProfilerActivity, profile

    for dim in (0, 1):
        for idx in (torch.arange(300, 300 + k), torch.randperm(out)[:k].sort().values):
            x = torch.randn(t, inn, requires_grad=True)
            d = torch.zeros((k, inn) if dim == 0 else (out, k), requires_grad=True)
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                pt.partial_linear(x, w, None, d, idx, dim).sum().backward()
            biggest = max(abs(e.cpu_memory_usage) for e in prof.key_averages())
            assert biggest < out * inn * 4 // 4, f"dim {dim}: an allocation of {biggest} bytes, W is {out * inn * 4}"


# ---------------------------------------------------------------------------------------------------------------
# Bad input: clear errors naming the op and the offending value.


def _lin_args(**kw):
    a = dict(x=torch.randn(3, 10), weight=torch.randn(8, 10), bias=None, delta=torch.zeros(8, 3),
             index=torch.tensor([1, 4, 6]), dim=1, range_start=None)
    a.update(kw)
    return a


@pytest.mark.parametrize("kw,match", [
    (dict(index=torch.tensor([0, 5, 5])), r"partial_linear: index must be sorted ascending and unique, but index\[2\] = 5 follows index\[1\] = 5"),
    (dict(index=torch.tensor([3, 1, 7])), r"partial_linear: index must be sorted ascending and unique, but index\[1\] = 1"),
    (dict(index=torch.tensor([0, 4, 10])), r"partial_linear: index must lie in \[0, 10\), got index\[2\] = 10"),
    (dict(index=torch.tensor([-1, 2, 3])), r"partial_linear: index must lie in \[0, 10\), got index\[0\] = -1"),
    (dict(index=torch.tensor([0, 1, 2], dtype=torch.int32)), r"partial_linear: index must be int64, got Int"),
    (dict(index=torch.tensor([[0, 1, 2]])), r"partial_linear: index must be 1-D"),
    (dict(delta=torch.zeros(8, 4)), r"partial_linear: delta must have shape \[8, 3\] for dim=1, k=3"),
    (dict(delta=torch.zeros(8, 3), dim=0), r"partial_linear: delta must have shape \[3, 10\] for dim=0"),
    (dict(delta=torch.zeros(8, 3, dtype=torch.int64)), r"partial_linear: delta must be float32"),
    (dict(delta=torch.zeros(8, 3, dtype=torch.float64)), r"partial_linear: delta must be float32 or the weight's dtype"),
    (dict(dim=2), r"partial_linear: dim must be 0 \(rows\) or 1 \(columns\), got 2"),
    (dict(range_start=8), r"partial_linear: range \[range_start, range_start \+ k\) = \[8, 11\) exceeds weight.size\(1\) = 10"),
    (dict(range_start=-2), r"partial_linear: range_start must be -1 \(use index\) or >= 0, got -2"),
    (dict(x=torch.randn(3, 11)), r"partial_linear: x must have last dim 10"),
    (dict(weight=torch.randn(8, 10).half()), r"partial_linear: weight has dtype Half but x has Float"),
    (dict(bias=torch.randn(7)), r"partial_linear: bias must have shape \[8\]"),
    (dict(x=torch.randint(0, 3, (3, 10))), r"partial_linear: x must be float32"),
    (dict(index=torch.tensor([1, 4, 6], device="meta")), r"partial_linear: index is on meta but the input is on cpu"),
])
def test_bad_input_errors(kw, match):
    with pytest.raises(RuntimeError, match=match):
        pt.partial_linear(**_lin_args(**kw))


def test_other_ops_name_themselves():
    with pytest.raises(RuntimeError, match=r"partial_gather: index must be sorted"):
        pt.partial_gather(torch.randn(2, 4), torch.tensor([2, 1]))
    with pytest.raises(RuntimeError, match=r"partial_gather: index must lie in \[0, 4\), got index\[1\] = 4"):
        pt.partial_gather(torch.randn(2, 4), torch.tensor([1, 4]))
    with pytest.raises(RuntimeError, match=r"partial_scatter_add: src must have last dim 2, got shape \[2, 3\]"):
        pt.partial_scatter_add(torch.randn(2, 3), torch.tensor([0, 1]), 5)
    with pytest.raises(RuntimeError, match=r"partial_scatter_add: index must lie in \[0, 5\), got index\[1\] = 7"):
        pt.partial_scatter_add(torch.randn(2, 2), torch.tensor([0, 7]), 5)
    with pytest.raises(RuntimeError, match=r"partial_scatter_add: index must be sorted ascending and unique"):
        pt.partial_scatter_add(torch.randn(2, 2), torch.tensor([3, 3]), 5)
    with pytest.raises(RuntimeError, match=r"partial_linear_backward: grad_out and saved must have the same leading \(token\) dims"):
        ops.partial_linear_backward(torch.randn(2, 8), torch.randn(3, 3), torch.randn(8, 10), torch.zeros(8, 3),
                                    torch.tensor([1, 2, 3]), 1, [True, True, True])
    with pytest.raises(RuntimeError, match=r"partial_linear_backward: saved must have last dim 3"):
        ops.partial_linear_backward(torch.randn(2, 8), torch.randn(2, 10), torch.randn(8, 10), torch.zeros(8, 3),
                                    torch.tensor([1, 2, 3]), 1, [True, True, True])


def test_validate():
    pt.partial_validate(torch.tensor([0, 3, 9]), 10)
    pt.partial_validate(torch.tensor([], dtype=torch.long), 10)
    with pytest.raises(RuntimeError, match=r"partial_validate: index must be sorted ascending and unique, but index\[2\] = 3 follows index\[1\] = 3"):
        pt.partial_validate(torch.tensor([0, 3, 3]), 10)
    with pytest.raises(RuntimeError, match=r"partial_validate: index must lie in \[0, 10\), got values in \[0, 10\]"):
        pt.partial_validate(torch.tensor([0, 10]), 10)
    with pytest.raises(RuntimeError, match=r"partial_validate: index must be int64, got Int"):
        pt.partial_validate(torch.tensor([0], dtype=torch.int32), 10)
    torch.library.opcheck(ops.partial_validate.default, (torch.tensor([1, 2]), 10))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("dim", [0, 1])
def test_cuda_graph_capture_training_step(dim):
    """Forward + backward of both paths inside one CUDA graph: no host sync anywhere."""
    dev = "cuda"
    out, inn, k = 256, 384, 19
    w = _randn((out, inn), torch.bfloat16, dev, 1)
    x = _randn((64, inn), torch.bfloat16, dev, 2, requires_grad=True)
    d = _randn((k, inn) if dim == 0 else (out, k), torch.float32, dev, 3, requires_grad=True)
    g = _randn((64, out), torch.bfloat16, dev, 4)
    scattered = make_index((out, inn)[dim], k, "scatter", device=dev)[0]
    rng = torch.arange(100, 100 + k, device=dev)

    def step():
        res = []
        for idx, rs in ((scattered, None), (rng, 100)):
            y = pt.partial_linear(x, w, None, d, idx, dim, rs)
            res += [y.detach(), *torch.autograd.grad(y, (x, d), g)]
        return res

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
    for a, b in zip(captured, eager):
        torch.testing.assert_close(a, b)
