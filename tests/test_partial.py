"""partial ops: every op through the shared checks (peftcore.testing), plus saved-activation, fast-path, bad-input
tests. The references build W_eff densely, here in the test only."""
import pytest
import torch
import torch.nn.functional as F

import peftcore  # noqa: F401
from peftcore.ops import partial as pt
from peftcore.testing import (OpCase, Sample, check_double_backward_refused, check_errors_isolated,
                              check_fake_refuses, devices, op_test_suite)

ops = torch.ops.peftcore
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
DEVICES = devices()
# The CPU kernels split token rows over threads in tasks of at::internal::GRAIN_SIZE elements; the large samples
# below reach that split only with more than one thread (set here so a one-core runner exercises it too).
if torch.get_num_threads() < 2:
    torch.set_num_threads(2)


# ---------------------------------------------------------------------------------------------------------------
# Inputs and plain-torch references.


def make_index(size, k, kind, start=0, seed=0, device="cpu"):
    """(index, range_start): kind "range" = [start, start+k) passed as an index (CPU detects it), "range_start" =
    the same range passed explicitly, "scatter" = k sorted random positions, "near_range" = [start, start+k-1)
    and start+k (spans k+1: one step short of a range, must take the general path)."""
    if kind == "near_range":
        idx = torch.cat([torch.arange(start, start + k - 1), torch.tensor([start + k])])
        return idx.to(device), -1
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
    """(batch, out, in, dim, k, index kind, range start). Sizes are not multiples of 8; ranges at both edges.

    Branch points of partial_cpu.cpp the non-float64 samples cross (gradcheck's float64 samples are small):
    range path vs general path (detected ranges, explicit range_start, a near-range index one step short) for
    dim 0 and dim 1, forward and every backward mask; an empty index; ranges at offset 0 and at the end; the
    gather / scatter-add row loops split over threads (T * k > GRAIN_SIZE = 32768: the 640-token samples); k > 256
    (one CUDA block of the gather / scatter-add kernels covers 256 columns)."""
    if dtype == torch.float64:
        return [((2, 3), 6, 10, 1, 3, "scatter", 0), ((5,), 7, 9, 0, 2, "range", 4), ((4,), 6, 10, 1, 4, "range_start", 6),
                ((3,), 7, 9, 0, 3, "scatter", 0), ((3,), 7, 9, 0, 3, "range_start", 0),
                ((3,), 6, 9, 1, 4, "near_range", 2), ((2,), 8, 5, 0, 4, "near_range", 1)]
    return [((2, 19), 24, 40, 1, 5, "scatter", 0), ((37,), 33, 20, 0, 7, "range", 11), ((16,), 16, 67, 1, 13, "range", 0),
            ((3, 4), 18, 12, 0, 5, "range_start", 13), ((5,), 20, 13, 1, 3, "range_start", 10),
            ((6,), 21, 30, 0, 9, "scatter", 0), ((3,), 8, 12, 1, 0, "scatter", 0), ((4,), 10, 6, 1, 6, "range", 0),
            ((5,), 22, 17, 1, 6, "near_range", 4), ((7,), 19, 14, 0, 5, "near_range", 9),
            *([((640,), 80, 96, 0, 60, "scatter", 0), ((2, 320), 72, 150, 1, 64, "near_range", 40),
               ((640,), 90, 70, 0, 60, "range", 25), ((4,), 12, 320, 1, 300, "near_range", 10)]
              if dtype == torch.float32 else [])]


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
    for i, s in enumerate(linear_samples(device, dtype, False)):
        x, w, b, d, idx, dim, rs = s.args
        saved = x[..., selected(idx, rs)].contiguous() if dim == 1 else x
        g = _randn((*x.shape[:-1], w.shape[0]), dtype, device, 99)
        # every sample asks for everything, and alternately for grad_delta alone / grad_x + grad_bias only
        other = [False, True, False] if i % 2 else [True, False, True]
        for mask in ([True, True, True], other):
            yield Sample((g, saved, w, d, idx, dim, mask, rs), name=f"{s.name}/{mask}")


def gather_samples(device, dtype, requires_grad):
    for i, (batch, out, inn, dim, k, kind, start) in enumerate(_configs(dtype)):
        kind = {"range_start": "range"}.get(kind, kind)
        idx, rs = make_index(inn, k, kind, start if dim == 1 else 0, seed=i, device=device)
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


# Every op, backward ops included, called directly with hostile arguments, in one child process (a crash or a hang
# fails the named case). (name, code, message regex, shape_only): shape_only cases need no index values, so the
# fake kernels must refuse them too, with the same message (dtype names differ: C++ "Float", Python
# "torch.float32", so patterns match them with \S+).
_PRELUDE = """
x = torch.randn(3, 10); w = torch.randn(8, 10); d1 = torch.zeros(8, 3); d0 = torch.zeros(3, 10)
idx = torch.tensor([1, 4, 6])

def lin(x=x, weight=w, bias=None, delta=d1, index=idx, dim=1, range_start=-1):
    return ops.partial_linear(x, weight, bias, delta, index, dim, range_start)

def bwd(grad_out=None, saved=None, weight=w, delta=d1, index=idx, dim=1, mask=(True, True, True), range_start=-1):
    grad_out = torch.randn(3, 8) if grad_out is None else grad_out
    saved = torch.randn(3, 3 if dim == 1 else 10) if saved is None else saved
    return ops.partial_linear_backward(grad_out, saved, weight, delta, index, dim, list(mask), range_start)
"""

_BAD = [
    # partial_linear: index values (CPU checks them; CUDA skips entries out of range, see the module doc)
    ("lin_dup", "lin(index=torch.tensor([0, 5, 5]))",
     r"partial_linear: index must be sorted ascending and unique, but index\[2\] = 5 follows index\[1\] = 5", False),
    ("lin_unsorted", "lin(index=torch.tensor([3, 1, 7]))",
     r"partial_linear: index must be sorted ascending and unique, but index\[1\] = 1", False),
    ("lin_oob", "lin(index=torch.tensor([0, 4, 10]))", r"partial_linear: index must lie in \[0, 10\), got index\[2\] = 10", False),
    ("lin_negative", "lin(index=torch.tensor([-1, 2, 3]))", r"partial_linear: index must lie in \[0, 10\), got index\[0\] = -1", False),
    ("lin_huge", "lin(index=torch.tensor([0, 1, 10**12]))", r"partial_linear: index must lie in \[0, 10\), got index\[2\] = 1000000000000", False),
    ("lin_dim0_oob", "lin(delta=d0, dim=0, index=torch.tensor([2, 5, 8]))", r"partial_linear: index must lie in \[0, 8\), got index\[2\] = 8", False),
    ("lin_empty_weight", "lin(x=torch.randn(3, 0), weight=torch.randn(8, 0), delta=torch.zeros(8, 1), index=torch.tensor([0]))",
     r"partial_linear: index must lie in \[0, 0\)", False),
    ("lin_range_mismatch", "lin(range_start=1)", r"partial_linear: range_start = 1 declares index == \[1, 4\), but index\[1\] = 4", False),
    ("lin_range_shifted", "lin(index=torch.arange(2, 5), range_start=3)",
     r"partial_linear: range_start = 3 declares index == \[3, 6\), but index\[0\] = 2", False),
    ("lin_range_bad_index", "lin(index=torch.tensor([3, 3, 4]), range_start=3)", r"partial_linear: index must be sorted", False),
    # partial_linear: shapes / dtypes / devices
    ("lin_index_int32", "lin(index=idx.int())", r"partial_linear: index must be int64, got \S+", True),
    ("lin_index_float", "lin(index=idx.float())", r"partial_linear: index must be int64", True),
    ("lin_index_2d", "lin(index=idx[None])", r"partial_linear: index must be 1-D, got shape \[1, 3\]", True),
    ("lin_delta_k", "lin(delta=torch.zeros(8, 4))", r"partial_linear: delta must have shape \[8, 3\] for dim=1, k=3", True),
    ("lin_delta_dim0", "lin(delta=d1, dim=0)", r"partial_linear: delta must have shape \[3, 10\] for dim=0, k=3", True),
    ("lin_delta_1d", "lin(delta=torch.zeros(24))", r"partial_linear: delta must have shape \[8, 3\]", True),
    ("lin_delta_int", "lin(delta=d1.long())", r"partial_linear: delta must be float32", True),
    ("lin_delta_f64", "lin(delta=d1.double())", r"partial_linear: delta must be float32 or the weight's dtype", True),
    ("lin_delta_bf16_f32w", "lin(delta=d1.bfloat16())", r"partial_linear: delta must be float32 or the weight's dtype", True),
    ("lin_dim2", "lin(dim=2)", r"partial_linear: dim must be 0 \(rows\) or 1 \(columns\), got 2", True),
    ("lin_dim_neg", "lin(dim=-1)", r"partial_linear: dim must be 0 \(rows\) or 1 \(columns\), got -1", True),
    ("lin_range_over", "lin(range_start=8)",
     r"partial_linear: range \[range_start, range_start \+ k\) = \[8, 11\) exceeds weight.size\(1\) = 10", True),
    ("lin_range_over_dim0", "lin(delta=d0, dim=0, range_start=6)", r"partial_linear: range .* = \[6, 9\) exceeds weight.size\(0\) = 8", True),
    ("lin_range_neg", "lin(range_start=-2)", r"partial_linear: range_start must be -1 \(use index\) or >= 0, got -2", True),
    ("lin_x_last", "lin(x=torch.randn(3, 11))", r"partial_linear: x must have last dim 10", True),
    ("lin_x_scalar", "lin(x=torch.tensor(1.0))", r"partial_linear: x must have at least 1 dim", True),
    ("lin_x_int", "lin(x=x.long())", r"partial_linear: x must be float32, float16, bfloat16 or float64", True),
    ("lin_weight_dtype", "lin(weight=w.half())", r"partial_linear: weight has dtype \S+ but x has \S+", True),
    ("lin_weight_1d", "lin(weight=torch.randn(10))", r"partial_linear: weight must be 2-D", True),
    ("lin_weight_3d", "lin(weight=torch.randn(2, 8, 10))", r"partial_linear: weight must be 2-D", True),
    ("lin_bias_shape", "lin(bias=torch.randn(7))", r"partial_linear: bias must have shape \[8\]", True),
    ("lin_bias_dtype", "lin(bias=torch.randn(8).double())", r"partial_linear: bias has dtype \S+ but x has", True),
    ("lin_index_device", "lin(index=idx.to('meta'))", r"partial_linear: index is on meta but the input is on cpu", True),
    ("lin_delta_device", "lin(delta=d1.to('meta'))", r"partial_linear: delta is on meta but the input is on cpu", True),
    # partial_linear_backward, called directly
    ("bwd_dup", "bwd(index=torch.tensor([2, 2, 3]))", r"partial_linear_backward: index must be sorted ascending and unique", False),
    ("bwd_unsorted", "bwd(index=torch.tensor([5, 2, 3]))", r"partial_linear_backward: index must be sorted ascending and unique", False),
    ("bwd_oob", "bwd(index=torch.tensor([1, 2, 10]))", r"partial_linear_backward: index must lie in \[0, 10\), got index\[2\] = 10", False),
    ("bwd_negative", "bwd(index=torch.tensor([-7, 2, 3]))", r"partial_linear_backward: index must lie in \[0, 10\), got index\[0\] = -7", False),
    ("bwd_huge", "bwd(index=torch.tensor([1, 2, 10**9]))", r"partial_linear_backward: index must lie in \[0, 10\)", False),
    ("bwd_dim0_oob", "bwd(delta=d0, dim=0, index=torch.tensor([0, 1, 300]))", r"partial_linear_backward: index must lie in \[0, 8\)", False),
    ("bwd_dim0_negative", "bwd(delta=d0, dim=0, index=torch.tensor([-300, 1, 2]), mask=(True, False, False))",
     r"partial_linear_backward: index must lie in \[0, 8\)", False),
    ("bwd_range_mismatch", "bwd(index=torch.tensor([0, 1, 3]), range_start=0)",
     r"partial_linear_backward: range_start = 0 declares index == \[0, 3\), but index\[2\] = 3", False),
    ("bwd_range_over", "bwd(range_start=9)", r"partial_linear_backward: range .* exceeds weight.size\(1\) = 10", True),
    ("bwd_range_neg", "bwd(range_start=-5)", r"partial_linear_backward: range_start must be -1", True),
    ("bwd_saved_last", "bwd(saved=torch.randn(3, 10))", r"partial_linear_backward: saved must have last dim 3", True),
    ("bwd_saved_last_dim0", "bwd(delta=d0, dim=0, saved=torch.randn(3, 3))", r"partial_linear_backward: saved must have last dim 10", True),
    ("bwd_saved_tokens", "bwd(saved=torch.randn(2, 3))", r"partial_linear_backward: grad_out and saved must have the same leading \(token\) dims", True),
    ("bwd_saved_batch", "bwd(grad_out=torch.randn(2, 3, 8), saved=torch.randn(3, 2, 3))",
     r"partial_linear_backward: grad_out and saved must have the same leading \(token\) dims", True),
    ("bwd_saved_dtype", "bwd(saved=torch.randn(3, 3).double())", r"partial_linear_backward: saved has dtype \S+ but grad_out has", True),
    ("bwd_saved_device", "bwd(saved=torch.randn(3, 3, device='meta'))", r"partial_linear_backward: saved is on meta", True),
    ("bwd_grad_last", "bwd(grad_out=torch.randn(3, 7))", r"partial_linear_backward: grad_out must have last dim 8", True),
    ("bwd_grad_int", "bwd(grad_out=torch.ones(3, 8, dtype=torch.long))", r"partial_linear_backward: grad_out must be float32", True),
    ("bwd_weight_dtype", "bwd(weight=w.bfloat16())", r"partial_linear_backward: weight has dtype \S+ but grad_out has", True),
    ("bwd_delta_shape", "bwd(delta=torch.zeros(3, 8))", r"partial_linear_backward: delta must have shape \[8, 3\]", True),
    ("bwd_delta_dim0", "bwd(dim=0, saved=torch.randn(3, 10))", r"partial_linear_backward: delta must have shape \[3, 10\] for dim=0", True),
    ("bwd_dim", "bwd(dim=3)", r"partial_linear_backward: dim must be 0 \(rows\) or 1 \(columns\), got 3", True),
    ("bwd_index_int32", "bwd(index=idx.int())", r"partial_linear_backward: index must be int64", True),
    ("bwd_index_2d", "bwd(index=idx.view(1, 3))", r"partial_linear_backward: index must be 1-D", True),
    # partial_gather / partial_scatter_add
    ("gather_unsorted", "ops.partial_gather(x, torch.tensor([2, 1]))", r"partial_gather: index must be sorted ascending and unique", False),
    ("gather_dup", "ops.partial_gather(x, torch.tensor([2, 2]))", r"partial_gather: index must be sorted ascending and unique", False),
    ("gather_oob", "ops.partial_gather(x, torch.tensor([1, 10]))", r"partial_gather: index must lie in \[0, 10\), got index\[1\] = 10", False),
    ("gather_negative", "ops.partial_gather(x, torch.tensor([-1, 3]))", r"partial_gather: index must lie in \[0, 10\), got index\[0\] = -1", False),
    ("gather_huge", "ops.partial_gather(x, torch.tensor([0, 2**62]))", r"partial_gather: index must lie in \[0, 10\)", False),
    ("gather_index_int32", "ops.partial_gather(x, idx.int())", r"partial_gather: index must be int64", True),
    ("gather_index_2d", "ops.partial_gather(x, idx[None])", r"partial_gather: index must be 1-D", True),
    ("gather_x_scalar", "ops.partial_gather(torch.tensor(1.0), torch.tensor([0]))", r"partial_gather: x must have at least 1 dim", True),
    ("gather_x_int", "ops.partial_gather(x.long(), idx)", r"partial_gather: x must be float32", True),
    ("gather_device", "ops.partial_gather(x, idx.to('meta'))", r"partial_gather: index is on meta but the input is on cpu", True),
    ("scatter_size_small", "ops.partial_scatter_add(torch.randn(2, 2), torch.tensor([0, 7]), 5)",
     r"partial_scatter_add: index must lie in \[0, 5\), got index\[1\] = 7", False),
    ("scatter_size_equal", "ops.partial_scatter_add(torch.randn(2, 2), torch.tensor([0, 5]), 5)",
     r"partial_scatter_add: index must lie in \[0, 5\), got index\[1\] = 5", False),
    ("scatter_size_zero", "ops.partial_scatter_add(torch.randn(2, 1), torch.tensor([0]), 0)", r"partial_scatter_add: index must lie in \[0, 0\)", False),
    ("scatter_negative", "ops.partial_scatter_add(torch.randn(2, 2), torch.tensor([-3, 1]), 5)", r"partial_scatter_add: index must lie in \[0, 5\)", False),
    ("scatter_dup", "ops.partial_scatter_add(torch.randn(2, 2), torch.tensor([3, 3]), 5)",
     r"partial_scatter_add: index must be sorted ascending and unique", False),
    ("scatter_size_neg", "ops.partial_scatter_add(torch.randn(2, 2), torch.tensor([0, 1]), -1)", r"partial_scatter_add: size must be >= 0, got -1", True),
    ("scatter_src_last", "ops.partial_scatter_add(torch.randn(2, 3), torch.tensor([0, 1]), 5)",
     r"partial_scatter_add: src must have last dim 2, got shape \[2, 3\]", True),
    ("scatter_src_scalar", "ops.partial_scatter_add(torch.tensor(1.0), torch.tensor([0]), 5)", r"partial_scatter_add: src must have at least 1 dim", True),
    ("scatter_index_int32", "ops.partial_scatter_add(torch.randn(2, 2), torch.tensor([0, 1], dtype=torch.int32), 5)",
     r"partial_scatter_add: index must be int64", True),
    ("scatter_src_int", "ops.partial_scatter_add(torch.ones(2, 2, dtype=torch.long), torch.tensor([0, 1]), 5)",
     r"partial_scatter_add: src must be float32", True),
    # partial_validate
    ("validate_dup", "ops.partial_validate(torch.tensor([0, 3, 3]), 10)",
     r"partial_validate: index must be sorted ascending and unique, but index\[2\] = 3 follows index\[1\] = 3", False),
    ("validate_oob", "ops.partial_validate(torch.tensor([0, 10]), 10)", r"partial_validate: index must lie in \[0, 10\), got values in \[0, 10\]", False),
    ("validate_negative", "ops.partial_validate(torch.tensor([-1, 2]), 10)", r"partial_validate: index must lie in \[0, 10\)", False),
    ("validate_range", "ops.partial_validate(torch.tensor([2, 3, 5]), 10, 2)",
     r"partial_validate: range_start = 2 declares index == \[2, 5\), but index\[2\] = 5", False),
    ("validate_range_over", "ops.partial_validate(torch.tensor([8, 9, 10]), 10, 8)", r"partial_validate: range .* = \[8, 11\) exceeds size 10", False),
    ("validate_range_neg", "ops.partial_validate(torch.tensor([0]), 10, -3)", r"partial_validate: range_start must be -1", False),
    ("validate_int32", "ops.partial_validate(torch.tensor([0], dtype=torch.int32), 10)", r"partial_validate: index must be int64", True),
    ("validate_2d", "ops.partial_validate(torch.tensor([[0]]), 10)", r"partial_validate: index must be 1-D", True),
    ("validate_size_neg", "ops.partial_validate(torch.tensor([0]), -1)", r"partial_validate: size must be >= 0, got -1", True),
]


def test_bad_input_errors_isolated():
    check_errors_isolated([c[:3] for c in _BAD], prelude=_PRELUDE)


@pytest.mark.parametrize("name,code,pattern", [c[:3] for c in _BAD if c[3]], ids=[c[0] for c in _BAD if c[3]])
def test_fake_kernels_refuse_the_same_shapes(name, code, pattern):
    check_fake_refuses(code, pattern, _PRELUDE, dict(torch=torch, ops=ops))


def test_fake_kernels_accept_good_input():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        x, w = mode.from_tensor(torch.randn(3, 10)), mode.from_tensor(torch.randn(8, 10))
        d1, idx = mode.from_tensor(torch.zeros(8, 3)), mode.from_tensor(torch.tensor([1, 4, 6]))
        assert ops.partial_linear(x, w, None, d1, idx, 1, -1).shape == (3, 8)
        gx, gd, gb = ops.partial_linear_backward(mode.from_tensor(torch.randn(3, 8)), mode.from_tensor(torch.randn(3, 3)),
                                                 w, d1, idx, 1, [True, True, False], -1)
        assert gx.shape == (3, 10) and gd.shape == (8, 3) and gb.shape == (0,)
        assert ops.partial_gather(x, idx).shape == (3, 3)
        assert ops.partial_scatter_add(ops.partial_gather(x, idx), idx, 10).shape == (3, 10)


def test_validate():
    pt.partial_validate(torch.tensor([0, 3, 9]), 10)
    pt.partial_validate(torch.tensor([], dtype=torch.long), 10)
    pt.partial_validate(torch.arange(4, 10), 10, range_start=4)
    pt.partial_validate(torch.tensor([], dtype=torch.long), 10, range_start=10)
    torch.library.opcheck(ops.partial_validate.default, (torch.tensor([1, 2]), 10))
    torch.library.opcheck(ops.partial_validate.default, (torch.tensor([1, 2]), 10, 1))


# ---------------------------------------------------------------------------------------------------------------
# Double backward: the gather / scatter-add pair is exact to any order; partial_linear's backward op refuses.


@pytest.mark.parametrize("kind", ["range", "scatter", "near_range"])
def test_gather_scatter_double_backward(kind):
    idx, _ = make_index(11, 5, kind, 3, seed=1)
    x = _randn((2, 3, 11), torch.float64, "cpu", 1, requires_grad=True)
    src = _randn((2, 3, 5), torch.float64, "cpu", 2, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: pt.partial_gather(t, idx) ** 2, (x,))
    assert torch.autograd.gradgradcheck(lambda t: pt.partial_scatter_add(t, idx, 11) ** 2, (src,))
    # the composition (what partial_linear's autograd does for dim 1) too
    assert torch.autograd.gradgradcheck(lambda t: pt.partial_scatter_add(pt.partial_gather(t, idx).sin(), idx, 11), (x,))


@pytest.mark.parametrize("dim,kind", [(0, "scatter"), (0, "range_start"), (1, "scatter"), (1, "range")])
def test_linear_double_backward_refused(dim, kind):
    out, inn, k = 9, 12, 4
    idx, rs = make_index((out, inn)[dim], k, kind, 2, seed=3)
    x = _randn((5, inn), torch.float64, "cpu", 1)
    w = _randn((out, inn), torch.float64, "cpu", 2)
    b = _randn((out,), torch.float64, "cpu", 3)
    d = _randn((k, inn) if dim == 0 else (out, k), torch.float64, "cpu", 4)
    check_double_backward_refused(lambda x, b, d: ops.partial_linear(x, w, b, d, idx, dim, rs), (x, b, d), (0, 2),
                                  "partial_linear")
    # first derivatives with create_graph=True still work
    xr, dr = x.clone().requires_grad_(), d.clone().requires_grad_()
    gx, gd = torch.autograd.grad(ops.partial_linear(xr, w, b, dr, idx, dim, rs).sum(), (xr, dr), create_graph=True)
    rgx, rgd = torch.autograd.grad(ref_linear(x.requires_grad_(), w, b, d.requires_grad_(), idx, dim, rs).sum(),
                                   (x, d))
    torch.testing.assert_close(gx, rgx)
    torch.testing.assert_close(gd, rgd)


# ---------------------------------------------------------------------------------------------------------------
# The range path keeps a delta that is small next to W (bf16 / fp16 weights near 8: half an ulp is 1/32 / 1/256).


def _cancelling(rows, cols, dtype, device, seed):
    """Integer rows whose entries cancel in pairs (v, -v): a row times any matrix with constant rows / columns is
    exactly 0 in every dtype, so only the delta's product is left in the output."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randint(1, 3, (rows, cols // 2), generator=g).to(torch.float64)
    v = v * (torch.randint(0, 2, v.shape, generator=g) * 2 - 1)
    return torch.stack([v, -v], dim=-1).reshape(rows, cols).to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("delta_dtype", ["float32", "weight"])
@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("explicit", [True, False])
def test_range_path_keeps_small_delta_on_large_weights(device, dtype, delta_dtype, dim, explicit):
    """y and grad_x on the range path carry x delta^T / g delta although delta (1e-4) is far below half an ulp of
    W (8.0): compared with the float64 reference element by element, at 3% of the output's scale. Folding the delta
    into the weight block (W_sel + delta in W's dtype) leaves 0 there."""
    T, out, inn, a, k = 24, 48, 64, 20, 16
    w = torch.full((out, inn), 8.0, dtype=dtype, device=device)
    ddt = torch.float32 if delta_dtype == "float32" else dtype
    d = _randn((k, inn) if dim == 0 else (out, k), ddt, device, 5, scale=1e-4)
    x = _cancelling(T, inn, dtype, device, 1).requires_grad_()
    g = _cancelling(T, out, dtype, device, 2)
    idx = torch.arange(a, a + k, device=device)
    y = pt.partial_linear(x, w, None, d, idx, dim, a if explicit else None)
    (gx,) = torch.autograd.grad(y, x, g)
    x64 = x.detach().double().requires_grad_()
    y64 = ref_linear(x64, w.double(), None, d.double(), idx, dim)
    (gx64,) = torch.autograd.grad(y64, x64, g.double())
    for name, got, ref in (("y", y, y64), ("grad_x", gx, gx64)):
        ref = ref.detach()
        scale = ref.pow(2).mean().sqrt().item()
        assert scale > 1e-4, f"{name}: the test's reference carries no delta"
        err = (got.double() - ref).abs()
        bound = 0.03 * scale + 0.01 * ref.abs()
        assert bool((err <= bound).all()), (f"{name} ({device}, {dtype}, dim {dim}): {int((err > bound).sum())} of "
                                            f"{err.numel()} elements lost the delta; max error {err.max().item():.3e}, "
                                            f"output scale {scale:.3e}")


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_malformed_index_skipped(dtype):
    """CUDA reads no index on the host: entries outside [0, size) are skipped (gathered as 0, never scattered),
    exactly what the CPU ops compute with those entries' columns left out; partial_validate reports them."""
    x = _randn((5, 40), dtype, "cuda", 1)
    bad = torch.tensor([-7, 3, 40, 10**12, 17], device="cuda")
    good = torch.tensor([3, 17])
    g = pt.partial_gather(x, bad)
    torch.cuda.synchronize()
    want = torch.zeros(5, 5, dtype=dtype)
    want[:, [1, 4]] = pt.partial_gather(x.cpu(), good)
    assert torch.equal(g.cpu(), want)
    s = pt.partial_scatter_add(g, bad, 40)
    torch.testing.assert_close(s.cpu(), pt.partial_scatter_add(want[:, [1, 4]], good, 40))
    w = _randn((24, 40), dtype, "cuda", 2)
    d = _randn((24, 5), torch.float32, "cuda", 3)
    y = pt.partial_linear(x, w, None, d, bad, 1)
    torch.testing.assert_close(y.cpu(), pt.partial_linear(x.cpu(), w.cpu(), None, d[:, [1, 4]].cpu(), good, 1))
    with pytest.raises(RuntimeError, match=r"partial_validate: index must lie in \[0, 40\)"):
        pt.partial_validate(bad, 40)


# ---------------------------------------------------------------------------------------------------------------
# CUDA launch plan of the gather / scatter-add kernels (partial_plan.h, reachable on CPU as partial_vec_plan):
# 16-byte accesses of the [tokens, k] buffer when it is 16-byte aligned and k % (16 / elem_size) == 0, and a
# tx x ty block (tx threads along a row: the power of two covering its accesses, at most 256; ty = 256 / tx rows).


def ref_vec_plan(tokens, k, elem_size, address):
    vec = 16 // elem_size if address % 16 == 0 and k % (16 // elem_size) == 0 else 1
    units = k // vec
    tx = 1
    while tx < 256 and tx < units:
        tx *= 2
    ty = 256 // tx
    return [vec, tx, ty, max(1, min(-(-tokens // ty), 1 << 20)), max(1, min(-(-units // tx), 65535))]


@pytest.mark.parametrize("elem_size", [4, 2])
@pytest.mark.parametrize("k", [1, 3, 4, 7, 8, 16, 24, 100, 256, 1000, 4096, 8192, 3 * 65536 * 8])
@pytest.mark.parametrize("tokens", [1, 5, 300, 100_000])
def test_vec_plan_rule(tokens, k, elem_size):
    for address in (0, 512, 16 * 1001, elem_size, 8, 512 + 2 * elem_size):
        got = list(ops.partial_vec_plan(tokens, k, elem_size, address))
        assert got == ref_vec_plan(tokens, k, elem_size, address), (tokens, k, elem_size, address)
        vec, tx, ty, gx, gy = got
        assert tx * ty == 256
        assert (vec > 1) == (address % 16 == 0 and k % (16 // elem_size) == 0)
        # a block covers its rows: never more threads along a row than the row has accesses (rounded to a power
        # of two), so small k packs many tokens per block
        assert tx < 2 * max(1, k // vec)
        if -(-k // vec) <= 65535 * tx:
            assert tx * gy >= k // vec  # every access has a thread without striding
    # the common shapes, spelled out
    assert list(ops.partial_vec_plan(4096, 8, 2, 0)) == [8, 1, 256, 16, 1]        # bf16 k = 8: one access a token
    assert list(ops.partial_vec_plan(4096, 16, 4, 0)) == [4, 4, 64, 64, 1]        # fp32 k = 16: 64 tokens a block
    assert list(ops.partial_vec_plan(4096, 16, 4, 4)) == [1, 16, 16, 256, 1]      # misaligned: scalar
    assert list(ops.partial_vec_plan(2, 4096, 2, 0)) == [8, 256, 1, 2, 2]         # wide rows: column chunks


def test_vec_plan_errors():
    with pytest.raises(RuntimeError, match=r"partial_vec_plan: tokens and k must be >= 0, got -1 and 4"):
        ops.partial_vec_plan(-1, 4, 2, 0)
    with pytest.raises(RuntimeError, match=r"partial_vec_plan: elem_size must be > 0 and address >= 0, got 0 and 0"):
        ops.partial_vec_plan(1, 4, 0, 0)


def _cuda_vec(t2d):
    """Whether the CUDA kernels vectorise a [tokens, k] buffer like t2d (the plan op on its real address)."""
    return ops.partial_vec_plan(t2d.shape[0], t2d.shape[1], t2d.element_size(), t2d.data_ptr())[0] > 1


def _offset_view(shape, dtype, offset, seed):
    """A contiguous tensor of `shape` starting `offset` elements into its storage (misaligned for offset 1)."""
    n = 1
    for s in shape:
        n *= s
    return _randn((n + offset,), dtype, "cuda", seed)[offset:].view(shape)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("op", ["partial_gather", "partial_scatter_add"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens,features,k", [(7, 40, 16), (300, 64, 8), (5, 40, 15), (1000, 12, 1),
                                               (3000, 24, 4), (9, 4100, 4096), (4, 33, 24)])
def test_cuda_vector_and_scalar_paths(op, dtype, tokens, features, k):
    """CUDA gather / scatter-add equal the CPU kernels (both are exact copies / one fp32 add into zeros) on both
    sides of the vector switch: an aligned [tokens, k] buffer (vectorised when k % (16 / elem_size) == 0) and the
    same values at a 1-element offset (scalar), k not a multiple of the vector width, k = 1, many tokens with
    tiny k, a scattered index, and non-contiguous / batched inputs."""
    idx = torch.randperm(features, generator=torch.Generator().manual_seed(tokens))[:k].sort().values
    vw = 16 // torch.empty(0, dtype=dtype).element_size()
    paths = set()
    for offset in (0, 1):
        if op == "partial_gather":
            x = _offset_view((tokens, features), dtype, offset, 1)
            g = pt.partial_gather(x, idx.cuda())
            paths.add(_cuda_vec(g))  # out is fresh (aligned): vectorised iff k % V == 0
            assert torch.equal(g.cpu(), pt.partial_gather(x.cpu(), idx))
        else:
            src = _offset_view((tokens, k), dtype, offset, 2)
            vec = _cuda_vec(src)
            assert vec == (offset == 0 and k % vw == 0)
            paths.add(vec)
            s = pt.partial_scatter_add(src, idx.cuda(), features)
            assert torch.equal(s.cpu(), pt.partial_scatter_add(src.cpu(), idx, features))
    assert paths == ({True} if op == "partial_gather" else {True, False}) if k % vw == 0 else paths == {False}
    if op == "partial_gather":  # non-contiguous x (a transposed buffer)
        xt = _randn((features, tokens), dtype, "cuda", 3).t()
        assert torch.equal(pt.partial_gather(xt, idx.cuda()).cpu(), pt.partial_gather(xt.cpu(), idx))
    else:  # src with leading dims, and a non-contiguous one
        s3 = _randn((2, tokens, k), dtype, "cuda", 4)
        assert torch.equal(pt.partial_scatter_add(s3, idx.cuda(), features).cpu(),
                           pt.partial_scatter_add(s3.cpu(), idx, features))
        st = _randn((k, tokens), dtype, "cuda", 5).t()
        assert torch.equal(pt.partial_scatter_add(st, idx.cuda(), features).cpu(),
                           pt.partial_scatter_add(st.cpu(), idx, features))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [0, 1])
def test_cuda_partial_linear_general_path_vector_and_scalar(dtype, dim):
    """partial_linear(_backward) on the general path (scattered index: the gather / scatter-add kernels), k a
    multiple of the vector width and not, against the CPU ops on the same inputs."""
    for k in (16, 13):
        out, inf, T = 48, 40, 37
        idx = torch.randperm((out, inf)[dim], generator=torch.Generator().manual_seed(k))[:k].sort().values
        x, w = _randn((T, inf), dtype, "cpu", 1), _randn((out, inf), dtype, "cpu", 2)
        delta = _randn((k, inf) if dim == 0 else (out, k), torch.float32, "cpu", 3)
        g = _randn((T, out), dtype, "cpu", 4)
        saved = x if dim == 0 else x[:, idx].contiguous()
        tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
        got = pt.partial_linear(x.cuda(), w.cuda(), None, delta.cuda(), idx.cuda(), dim)
        torch.testing.assert_close(got.cpu(), pt.partial_linear(x, w, None, delta, idx, dim), **tol)
        got = ops.partial_linear_backward(g.cuda(), saved.cuda(), w.cuda(), delta.cuda(), idx.cuda(), dim,
                                          [True, True, False])
        want = ops.partial_linear_backward(g, saved, w, delta, idx, dim, [True, True, False])
        for a, b in zip(got[:2], want[:2]):
            torch.testing.assert_close(a.cpu(), b, **tol)
