"""miss ops: both ops through the shared checks (peftcore.testing) against plain-torch references (PEFT's pad +
reshape + sum for the fold, repeat for the unfold), plus adjointness, PEFT interop, saved-activation and bad-input
tests."""
import pytest
import torch
import torch.nn.functional as F

import peftcore  # noqa: F401
from peftcore.ops import miss as ms
from peftcore.testing import OpCase, Sample, check_errors_isolated, op_test_suite

ops = torch.ops.peftcore
ALL_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------------------------
# Plain-torch references (PEFT MiSS's own formulation).


def ref_fold(x, r):
    n = x.shape[-1]
    pad = (r - n % r) % r
    return F.pad(x, (0, pad)).reshape(*x.shape[:-1], (n + pad) // r, r).sum(-2)


def ref_unfold(grad, n):
    r = grad.shape[-1]
    reps = -(-n // r)
    return grad.repeat(*([1] * (grad.dim() - 1)), reps)[..., :n]


# ---------------------------------------------------------------------------------------------------------------
# Samples.


def _randn(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)


# (leading dims, n, r, transposed: x built as a non-contiguous transpose). The CPU kernel folds in spans of
# L = r * ceil(64 / r); the CUDA kernels take the narrow path for r <= 256, the wide one above.
_CONFIGS = [
    ((4,), 10, 3, False),        # n % r != 0
    ((2, 3), 12, 4, False),      # n % r == 0, two leading dims
    ((), 7, 1, False),           # r == 1 (a row sum), no leading dims
    ((5,), 9, 9, False),         # r == n
    ((3,), 301, 7, False),       # several spans of L = 70 and a ragged tail
    ((2, 2), 200, 64, True),     # r = 64 (span = r), non-contiguous x
    ((0,), 5, 2, False),         # no rows
    ((3,), 600, 260, False),     # r > 256: CUDA wide path, n % r != 0
    ((2,), 5, 5, True),          # r == n, non-contiguous
]
_CONFIGS_F64 = [c for c in _CONFIGS if c[1] <= 301]  # gradcheck cost grows with n


# float32 only (float64 gradcheck runs the small shapes): rows split across threads in ranges of
# max(1, 32768 // n) rows (n = 301: 108, so 300 rows take three ranges on two threads), many spans per row, and
# r >= 64 (span = r) with rows split too; unfold: head copies then whole-span copies, rows split the same way.
_CONFIGS_LARGE = [
    ((300,), 301, 7, False),
    ((2,), 5000, 33, False),
    ((400,), 200, 100, False),
    ((130,), 520, 256, True),
]


def _configs(dtype):
    if dtype == torch.float64:
        return _CONFIGS_F64
    return _CONFIGS + _CONFIGS_LARGE if dtype == torch.float32 else _CONFIGS


def _make(lead, last, dtype, device, seed, transposed):
    if transposed and lead:  # [..., last, lead[-1]] transposed: last dim has stride lead[-1]
        return _randn((*lead[:-1], last, lead[-1]), dtype, device, seed).transpose(-1, -2)
    return _randn((*lead, last), dtype, device, seed)


def fold_samples(device, dtype, requires_grad):
    for i, (lead, n, r, tr) in enumerate(_configs(dtype)):
        x = _make(lead, n, dtype, device, 10 + i, tr)
        yield Sample((x, r), name=f"{lead}x{n}/r={r}/{'strided' if tr else 'contig'}")


def unfold_samples(device, dtype, requires_grad):
    for i, (lead, n, r, tr) in enumerate(_configs(dtype)):
        g = _make(lead, r, dtype, device, 50 + i, tr)
        yield Sample((g, n), name=f"{lead}x{r}/n={n}/{'strided' if tr else 'contig'}")


CASES = [
    OpCase("miss_fold", ops.miss_fold, fold_samples, ref_fold, ALL_DTYPES, grad_args=(0,)),
    OpCase("miss_unfold", ops.miss_unfold, unfold_samples, ref_unfold, ALL_DTYPES, grad_args=(0,)),
]

test_opcheck, test_reference, test_gradcheck, test_compile = op_test_suite(CASES)


# ---------------------------------------------------------------------------------------------------------------
# Semantics beyond the reference.


def test_samples_cover_strided_inputs():
    """The non-contiguous samples really are non-contiguous (else the glue's copy path goes untested)."""
    strided = [s for s in fold_samples("cpu", torch.float32, False) if "strided" in s.name]
    assert strided and all(not s.args[0].is_contiguous() for s in strided)


@pytest.mark.parametrize("n,r", [(10, 3), (64, 64), (130, 8), (1000, 33)])
def test_unfold_is_the_adjoint_of_fold(n, r):
    """<fold(x), g> == <x, unfold(g)> in float64, and the fold equals an explicit class sum."""
    x = _randn((4, n), torch.float64, "cpu", 1)
    g = _randn((4, r), torch.float64, "cpu", 2)
    lhs = (ms.miss_fold(x, r) * g).sum()
    rhs = (x * ms.miss_unfold(g, n)).sum()
    torch.testing.assert_close(lhs, rhs)
    cls = torch.arange(n) % r
    explicit = torch.zeros(4, r, dtype=torch.float64).index_add_(1, cls, x)
    torch.testing.assert_close(ms.miss_fold(x, r), explicit)
    torch.testing.assert_close(ms.miss_unfold(g, n), g[:, cls])


def test_fold_accumulates_in_fp32():
    """bfloat16 input, many chunks: a bf16 running sum would lose the small terms; fp32 accumulation keeps them
    and rounds once."""
    n, r = 4096, 4
    x = torch.full((1, n), 1.0, dtype=torch.bfloat16)
    x[0, ::r] = 1.0 / 64  # class 0: 1024 small terms, exact sum 16
    y = ms.miss_fold(x, r)
    assert y.dtype == torch.bfloat16
    assert y[0, 0].item() == 16.0 and y[0, 1].item() == 1024.0


def test_fold_saves_no_activation():
    """The fold's backward needs only n: autograd saves nothing (no x, no padded copy)."""
    x = _randn((8, 100), torch.float64, "cpu", 3).requires_grad_()
    miss = _randn((7, 5), torch.float64, "cpu", 4).requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = ms.miss_fold(x, 7)
    assert saved == []
    # ... and the matmul with miss then keeps the [8, 7] fold, never the [8, 105] padded x
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = y @ miss
    assert max(t.numel() for t in saved) <= 8 * 7
    gx, gm = torch.autograd.grad(out.square().sum(), (x, miss))
    x2, m2 = x.detach().clone().requires_grad_(), miss.detach().clone().requires_grad_()
    rx, rm = torch.autograd.grad((ref_fold(x2, 7) @ m2).square().sum(), (x2, m2))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gm, rm)


def test_double_backward():
    """Each op's backward is the other op, so higher-order gradients work (gradgradcheck in float64)."""
    x = _randn((3, 11), torch.float64, "cpu", 5).requires_grad_()
    g = _randn((3, 4), torch.float64, "cpu", 6).requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: ops.miss_fold(t, 4), (x,))
    assert torch.autograd.gradgradcheck(lambda t: ops.miss_unfold(t, 11), (g,))


def test_compile_dynamic_shapes():
    """Under torch.compile(dynamic=True) a new token count and a new n with the same r reuse one graph."""
    import torch._dynamo

    torch._dynamo.reset()
    miss = _randn((6, 5), torch.float32, "cpu", 7).requires_grad_()

    def step(x):
        return (ms.miss_fold(x, 6) @ miss).relu().sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    for shape in ((4, 20), (7, 20), (3, 31)):
        x = _randn(shape, torch.float32, "cpu", shape[0]).requires_grad_()
        got = compiled(x)
        gx, gm = torch.autograd.grad(got, (x, miss))
        x2 = x.detach().clone().requires_grad_()
        ref = (ref_fold(x2, 6) @ miss).relu().sum()
        rx, rm = torch.autograd.grad(ref, (x2, miss))
        torch.testing.assert_close(got, ref)
        torch.testing.assert_close(gx, rx)
        torch.testing.assert_close(gm, rm)


@pytest.mark.parametrize("mini", [False, True])
@pytest.mark.parametrize("n,r", [(24, 6), (26, 8)])
def test_matches_peft_miss_linear(n, r, mini):
    """HF PEFT's MissLinear (default and "mini" forms, padded and unpadded n) computes
    F.linear(x, W, b) + miss_fold(x, r) @ miss, gradients included."""
    peft = pytest.importorskip("peft")
    from peft.tuners.miss.layer import MissLinear

    torch.manual_seed(0)
    out_f, mini_r = 12, 4
    base = torch.nn.Linear(n, out_f)
    cfg = peft.MissConfig(r=r, mini_r=mini_r, init_weights="mini" if mini else True, target_modules=["x"])
    layer = MissLinear(base, "default", cfg, r=r)
    block = layer.miss_block["default"]
    with torch.no_grad():
        block.copy_(torch.randn_like(block))
    x = torch.randn(2, 3, n, requires_grad=True)
    want = layer(x)
    gx_want, gb_want = torch.autograd.grad(want.square().sum(), (x, block))

    x2 = x.detach().clone().requires_grad_()
    m = block.repeat(1, out_f // mini_r) if mini else block
    got = F.linear(x2, base.weight, base.bias) + ms.miss_fold(x2, r) @ m
    gx_got, gb_got = torch.autograd.grad(got.square().sum(), (x2, block))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(gx_got, gx_want)
    torch.testing.assert_close(gb_got, gb_want)


@pytest.mark.parametrize("fn,match", [
    (lambda: ms.miss_fold(torch.ones(2, 5, dtype=torch.long), 2),
     r"miss_fold: x must be float32, float16, bfloat16 or float64, got Long"),
    (lambda: ms.miss_fold(torch.tensor(1.0), 1), r"miss_fold: x must have at least 1 dim"),
    (lambda: ms.miss_fold(torch.randn(2, 5), 0), r"miss_fold: r must be >= 1, got 0"),
    (lambda: ms.miss_fold(torch.randn(2, 5), -3), r"miss_fold: r must be >= 1, got -3"),
    (lambda: ms.miss_fold(torch.randn(2, 5), 7),
     r"miss_fold: r must be <= x's last dim \(in_features, as PEFT MiSS requires\), got r = 7 for x of shape \[2, 5\]"),
    (lambda: ms.miss_fold(torch.randn(3, 0), 1), r"miss_fold: r must be <= x's last dim .* got r = 1 for x of shape \[3, 0\]"),
    (lambda: ms.miss_unfold(torch.ones(2, 3, dtype=torch.int32), 6),
     r"miss_unfold: grad must be float32, float16, bfloat16 or float64, got Int"),
    (lambda: ms.miss_unfold(torch.tensor(1.0), 3), r"miss_unfold: grad must have at least 1 dim"),
    (lambda: ms.miss_unfold(torch.randn(2, 3), 0), r"miss_unfold: n must be >= 1, got 0"),
    (lambda: ms.miss_unfold(torch.randn(2, 0), 4), r"miss_unfold: grad's last dim r must be >= 1, got grad of shape \[2, 0\]"),
    (lambda: ms.miss_unfold(torch.randn(2, 6), 4), r"miss_unfold: grad's last dim r must be <= n .*got r = 6 and n = 4"),
])
def test_bad_input_errors(fn, match):
    with pytest.raises(RuntimeError, match=match):
        fn()


@pytest.mark.parametrize("fn,match", [
    (lambda: ops.miss_fold(torch.empty(2, 5, device="meta"), 7), r"miss_fold: r must be <= x's last dim"),
    (lambda: ops.miss_fold(torch.empty(2, 5, device="meta"), 0), r"miss_fold: r must be >= 1, got 0"),
    (lambda: ops.miss_unfold(torch.empty(2, 6, device="meta"), 4), r"miss_unfold: grad's last dim r must be <= n"),
    (lambda: ops.miss_unfold(torch.empty(2, 3, device="meta"), 0), r"miss_unfold: n must be >= 1, got 0"),
])
def test_fake_kernels_check_like_the_kernels(fn, match):
    with pytest.raises(RuntimeError, match=match):
        fn()


_BAD_CASES = [
    ("fold-int", "ops.miss_fold(torch.ones(2, 5, dtype=torch.long), 2)", r"miss_fold: x must be float32.*Long"),
    ("fold-bool", "ops.miss_fold(torch.ones(2, 5, dtype=torch.bool), 2)", r"miss_fold: x must be float32.*Bool"),
    ("fold-scalar", "ops.miss_fold(torch.tensor(1.0), 1)", r"miss_fold: x must have at least 1 dim"),
    ("fold-r-zero", "ops.miss_fold(torch.randn(2, 5), 0)", r"miss_fold: r must be >= 1, got 0"),
    ("fold-r-negative", "ops.miss_fold(torch.randn(2, 5), -(2 ** 62))", r"miss_fold: r must be >= 1, got -4611686018427387904"),
    ("fold-r-huge", "ops.miss_fold(torch.randn(2, 5), 2 ** 62)", r"miss_fold: r must be <= x's last dim .*got r = 4611686018427387904"),
    ("fold-empty-features", "ops.miss_fold(torch.randn(3, 0), 1)", r"miss_fold: r must be <= x's last dim .*\[3, 0\]"),
    ("unfold-int", "ops.miss_unfold(torch.ones(2, 3, dtype=torch.int32), 6)", r"miss_unfold: grad must be float32.*Int"),
    ("unfold-scalar", "ops.miss_unfold(torch.tensor(1.0), 3)", r"miss_unfold: grad must have at least 1 dim"),
    ("unfold-n-zero", "ops.miss_unfold(torch.randn(2, 3), 0)", r"miss_unfold: n must be >= 1, got 0"),
    ("unfold-n-negative", "ops.miss_unfold(torch.randn(2, 3), -7)", r"miss_unfold: n must be >= 1, got -7"),
    ("unfold-r-zero", "ops.miss_unfold(torch.randn(2, 0), 4)", r"miss_unfold: grad's last dim r must be >= 1"),
    ("unfold-r-above-n", "ops.miss_unfold(torch.randn(2, 6), 4)", r"miss_unfold: grad's last dim r must be <= n .*got r = 6 and n = 4"),
    ("unfold-n-overflow", "ops.miss_unfold(torch.randn(2, 3), 2 ** 62)", r"overflow"),
    ("unfold-n-too-big", "ops.miss_unfold(torch.randn(2, 3), 2 ** 40)", r"allocate"),
    ("unfold-meta-mixed", "ops.miss_unfold(torch.randn(2, 3, device='meta'), 2)", r"miss_unfold: grad's last dim r must be <= n"),
]


def test_bad_inputs_isolated():
    """Hostile arguments in a child process: each raises an error naming the op and the value (or, for an output
    too large to allocate, ATen's allocation error), never a crash."""
    check_errors_isolated(_BAD_CASES)


# ---------------------------------------------------------------------------------------------------------------
# CUDA launch plan (miss_plan.h, reachable on CPU as miss_vec_plan) and the vector kernels' index maps, simulated
# here so that the rule and the mapping are checked without a GPU.

FOLD_NARROW, FOLD_WIDE, FOLD_VEC_GROUP, FOLD_VEC_COLS, UNFOLD = range(5)


def _pow2_at_least(x, lo, hi):
    p = lo
    while p < hi and p < x:
        p *= 2
    return p


def _row_launch(rows, units):
    tx = _pow2_at_least(units, 1, 256)
    ty = 256 // tx
    return [tx, ty, max(1, min(-(-rows // ty), 1 << 20)), max(1, min(-(-units // tx), 65535))]


def ref_vec_plan(rows, n, r, elem_size, xa, oa, unfold=False):
    """[kind, vec, width, copies, tx, ty, grid_x, grid_y] (miss_plan.h's rule, restated)."""
    v = 16 // elem_size
    vec = v if xa % 16 == 0 and oa % 16 == 0 and n % v == 0 and r % v == 0 else 1
    if unfold:
        return [UNFOLD, vec, 0, 0, *_row_launch(rows, n // vec)]
    if vec > 1:
        rv, nv = r // vec, n // vec
        if rv <= 32:
            tx = _pow2_at_least(nv, 1, 32)
            copies = 1
            while rv * copies * 2 <= tx:
                copies *= 2
            return [FOLD_VEC_GROUP, vec, 0, copies, tx, 256 // tx, max(1, min(-(-rows // (256 // tx)), 1 << 20)), 1]
        return [FOLD_VEC_COLS, vec, 0, 0, *_row_launch(rows, rv)]
    if r <= 256:
        w = _pow2_at_least(n, 32, 256)
        return [FOLD_NARROW, 1, w, 0, 256, 1, max(1, min(-(-rows // (256 // w)), 1 << 24)), 1]
    return [FOLD_WIDE, 1, 0, 0, 256, 1, -(-r // 256), max(1, min(rows, 65535))]


_PLAN_SHAPES = [(n, r) for n in (1, 3, 8, 16, 40, 64, 100, 256, 600, 4096, 4100, 11008)
                for r in (1, 2, 3, 4, 6, 8, 16, 24, 33, 64, 128, 256, 260, 512, 1024) if r <= n]


@pytest.mark.parametrize("elem_size", [4, 2])
@pytest.mark.parametrize("rows", [1, 9, 70000])
def test_vec_plan_rule(rows, elem_size):
    for n, r in _PLAN_SHAPES:
        for xa, oa in ((0, 0), (512, 1024), (elem_size, 0), (0, 2 * elem_size), (8, 8)):
            for unfold in (False, True):
                got = list(ops.miss_vec_plan(rows, n, r, elem_size, xa, oa, unfold))
                assert got == ref_vec_plan(rows, n, r, elem_size, xa, oa, unfold), (rows, n, r, elem_size, xa, oa)
                kind, vec, width, copies, tx, ty, gx, gy = got
                assert tx * ty == 256 or kind in (FOLD_NARROW, FOLD_WIDE)
                if kind == FOLD_VEC_GROUP:  # a row's lanes stay inside one warp, and hold every class
                    assert tx <= 32 and r // vec <= r // vec * copies <= tx
    # the common shapes, spelled out: PEFT MiSS r = 64 on hidden 4096
    assert list(ops.miss_vec_plan(8192, 4096, 64, 2, 0, 0)) == [FOLD_VEC_GROUP, 8, 0, 4, 32, 8, 1024, 1]
    assert list(ops.miss_vec_plan(8192, 4096, 64, 4, 0, 0)) == [FOLD_VEC_GROUP, 4, 0, 2, 32, 8, 1024, 1]
    assert list(ops.miss_vec_plan(8192, 4096, 512, 2, 0, 0)) == [FOLD_VEC_COLS, 8, 0, 0, 64, 4, 2048, 1]
    assert list(ops.miss_vec_plan(8192, 4096, 64, 2, 2, 0)) == [FOLD_NARROW, 1, 256, 0, 256, 1, 8192, 1]
    assert list(ops.miss_vec_plan(8192, 4096, 64, 2, 0, 0, True)) == [UNFOLD, 8, 0, 0, 256, 1, 8192, 2]
    assert list(ops.miss_vec_plan(100, 12, 4, 4, 0, 0, True)) == [UNFOLD, 4, 0, 0, 4, 64, 2, 1]  # short rows


def test_vec_plan_errors():
    with pytest.raises(RuntimeError, match=r"miss_vec_plan: need 1 <= r <= n, got r = 5 and n = 4"):
        ops.miss_vec_plan(1, 4, 5, 4, 0, 0)
    with pytest.raises(RuntimeError, match=r"miss_vec_plan: rows must be >= 0, got -1"):
        ops.miss_vec_plan(-1, 4, 2, 4, 0, 0)
    with pytest.raises(RuntimeError, match=r"miss_vec_plan: elem_size must be > 0 and addresses >= 0"):
        ops.miss_vec_plan(1, 4, 2, 4, -16, 0)


def _simulate_fold(x, r, plan):
    """The vector fold kernels' index maps (miss_kernels.cuh) run in Python on x [rows, n]: which vectors each lane
    reads, and how the group kernel's shuffle tree combines lanes."""
    kind, vec, _, copies, tx, ty, gx, gy = plan
    rows, n = x.shape
    nv, rv = n // vec, r // vec
    xv = x.reshape(rows, nv, vec)
    y = torch.full((rows, r), float("nan"), dtype=x.dtype)
    for t in range(rows):
        if kind == FOLD_VEC_GROUP:
            active = rv * copies
            acc = [xv[t, p::active].sum(0) if p < active else torch.zeros(vec, dtype=x.dtype) for p in range(tx)]
            off = copies // 2
            while off > 0:  # __shfl_down_sync(width = tx): lanes past the row keep their own value
                acc = [acc[p] + (acc[p + off * rv] if p + off * rv < tx else acc[p]) for p in range(tx)]
                off //= 2
            for p in range(rv):
                y[t, p * vec:(p + 1) * vec] = acc[p]
        else:
            for c in range(rv):
                y[t, c * vec:(c + 1) * vec] = xv[t, c::rv].sum(0)
    return y


@pytest.mark.parametrize("elem_size", [4, 2])
def test_vector_fold_index_maps(elem_size):
    """Every vector fold plan, simulated lane by lane, gives the fold (each vector read once, into its class)."""
    seen = set()
    for n, r in _PLAN_SHAPES:
        if n > 1100:
            continue
        plan = list(ops.miss_vec_plan(3, n, r, elem_size, 0, 0))
        if plan[0] not in (FOLD_VEC_GROUP, FOLD_VEC_COLS):
            continue
        seen.add(plan[0])
        x = _randn((3, n), torch.float64, "cpu", n + r)
        torch.testing.assert_close(_simulate_fold(x, r, plan), ref_fold(x, r))
    assert seen == {FOLD_VEC_GROUP, FOLD_VEC_COLS}


def _offset_view(shape, dtype, offset, seed):
    """A contiguous CUDA tensor of `shape` starting `offset` elements into its storage (misaligned for 1)."""
    n = 1
    for s in shape:
        n *= s
    return _randn((n + offset,), dtype, "cuda", seed)[offset:].view(shape)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("op", ["miss_fold", "miss_unfold"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,n,r", [(9, 4096, 64), (300, 64, 8), (5, 16, 16), (3, 40, 8), (7, 2048, 512),
                                      (4, 600, 260), (2000, 8, 1), (6, 100, 12), (5, 24, 24), (33, 1032, 8)])
def test_cuda_vector_and_scalar_paths(op, dtype, rows, n, r):
    """CUDA miss_fold / miss_unfold against the CPU kernels on both sides of the vector switch (aligned, and the
    same values at a 1-element offset), every fold kernel (vector group / columns, scalar narrow / wide), n or r
    not a multiple of the vector width, r = 1, many short rows, and non-contiguous / batched inputs."""
    tol = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=1e-2, rtol=1e-2),
           torch.bfloat16: dict(atol=5e-2, rtol=2e-2)}[dtype]
    es = torch.empty(0, dtype=dtype).element_size()
    vectorisable = n % (16 // es) == 0 and r % (16 // es) == 0
    kinds = set()
    for offset in (0, 1):
        if op == "miss_fold":
            x = _offset_view((rows, n), dtype, offset, 1)
            plan = list(ops.miss_vec_plan(rows, n, r, es, x.data_ptr(), 0))
            torch.testing.assert_close(ops.miss_fold(x, r).cpu(), ops.miss_fold(x.cpu(), r), **tol)
        else:
            g = _offset_view((rows, r), dtype, offset, 2)
            plan = list(ops.miss_vec_plan(rows, n, r, es, g.data_ptr(), 0, True))
            assert torch.equal(ops.miss_unfold(g, n).cpu(), ops.miss_unfold(g.cpu(), n))
        kinds.add((plan[0], plan[1] > 1))
        assert (plan[1] > 1) == (offset == 0 and vectorisable)
    if op == "miss_fold" and vectorisable:
        assert {k for k, _ in kinds} & {FOLD_VEC_GROUP, FOLD_VEC_COLS} and {k for k, _ in kinds} & {FOLD_NARROW, FOLD_WIDE}
    if op == "miss_unfold":
        assert kinds == ({(UNFOLD, True), (UNFOLD, False)} if vectorisable else {(UNFOLD, False)})
    if op == "miss_fold":
        xt = _randn((n, rows), dtype, "cuda", 3).t()
        torch.testing.assert_close(ops.miss_fold(xt, r).cpu(), ops.miss_fold(xt.cpu(), r), **tol)
    else:
        g3 = _randn((2, rows, r), dtype, "cuda", 4)
        assert torch.equal(ops.miss_unfold(g3, n).cpu(), ops.miss_unfold(g3.cpu(), n))
