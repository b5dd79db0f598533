"""lora ops: every op through the shared checks (peftcore.testing) against a plain-torch reference, the path
switches of the CPU kernels (contiguous runs vs gathered rows, several slots, repeated adapters, rank 0), HF PEFT's
mixed-adapter batch, and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import peftcore  # noqa: F401
from peftcore.ops import lora as lo
from peftcore.testing import (OpCase, Sample, assert_close_to_reference, check_double_backward_refused,
                              check_errors_isolated, op_test_suite)

ops = torch.ops.peftcore
ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------------------------------------------------------
# Plain-torch references (vectorised: a column mask selects each slot's adapter columns of x A_packedᵀ).


def _slot_columns(offsets, token_adapter, R):
    """[P, R] 0/1: column c belongs to the adapter of pair p (slot of a token), 0 for slots without one."""
    ta = token_adapter.reshape(-1)
    c = torch.arange(R, device=ta.device)
    lo_, hi = offsets[ta.clamp(min=0)], offsets[ta.clamp(min=0) + 1]
    return ((c >= lo_[:, None]) & (c < hi[:, None]) & (ta[:, None] >= 0))


def _pair_scale(scales, token_adapter, token_weight, dtype):
    ta = token_adapter.reshape(-1)
    s = scales.to(dtype)[ta.clamp(min=0)]
    if token_weight is not None:
        s = s * token_weight.reshape(-1).to(dtype)
    return s


def ref_shrink(x, a_packed, offsets, token_adapter):
    """Per adapter, only its pairs and its rows of a_packed (as the op: no 0 * NaN through other adapters)."""
    R = a_packed.shape[0]
    k = token_adapter.shape[1] if token_adapter.dim() == 2 else 1
    x2 = x.reshape(-1, x.shape[-1]).repeat_interleave(k, 0)  # one row per pair
    ta = token_adapter.reshape(-1)
    off = offsets.tolist()
    h = x2.new_zeros((x2.shape[0], R))
    for i in range(len(off) - 1):
        sel = ta == i
        h[sel, off[i]:off[i + 1]] = x2[sel] @ a_packed[off[i]:off[i + 1]].t()
    return h.reshape(*token_adapter.shape, R)


def ref_expand(h, b_packed, offsets, scales, token_adapter, token_weight=None, out_features=None):
    R, out = b_packed.shape[1], b_packed.shape[0]
    T = token_adapter.shape[0]
    k = token_adapter.shape[1] if token_adapter.dim() == 2 else 1
    h2 = h.reshape(-1, R)
    s = _pair_scale(scales, token_adapter, token_weight, h.dtype)
    ta = token_adapter.reshape(-1)
    off = offsets.tolist()
    y = h.new_zeros((h2.shape[0], out))
    for i in range(len(off) - 1):
        sel = ta == i
        y[sel] = (h2[sel, off[i]:off[i + 1]] * s[sel, None]) @ b_packed[:, off[i]:off[i + 1]].t()
    return y.reshape(T, k, out).sum(1)


def ref_multi_linear(x, weight, bias, a_packed, b_packed, offsets, scales, token_adapter, token_weight=None):
    y = F.linear(x, weight, bias)
    h = ref_shrink(x, a_packed, offsets, token_adapter)
    return y + ref_expand(h, b_packed, offsets, scales, token_adapter, token_weight).reshape(y.shape)


def ref_multi_linear_backward(grad_out, x, weight, a_packed, b_packed, offsets, scales, token_adapter, token_weight,
                              output_mask):
    xs, a, b = (t.detach().clone().requires_grad_(True) for t in (x, a_packed, b_packed))
    tw = token_weight.detach().clone().requires_grad_(True) if token_weight is not None else None
    y = ref_multi_linear(xs, weight, None, a, b, offsets, scales, token_adapter, tw)
    wrt = [xs, a, b] + ([tw] if tw is not None else [])
    gs = list(torch.autograd.grad(y, wrt, grad_out)) + ([None] if tw is None else [])
    return tuple(g if m else t.new_empty((0,)) for g, m, t in zip(gs, output_mask, [x, a_packed, b_packed,
                                                                                    token_weight if tw is not None else x]))


def ref_shrink_backward(grad_h, x, a_packed, offsets, token_adapter, output_mask):
    xs, a = (t.detach().clone().requires_grad_(True) for t in (x, a_packed))
    gx, ga = torch.autograd.grad(ref_shrink(xs, a, offsets, token_adapter), [xs, a], grad_h)
    return (gx if output_mask[0] else x.new_empty((0,)), ga if output_mask[1] else a_packed.new_empty((0,)))


def ref_expand_backward(grad_out, h, b_packed, offsets, scales, token_adapter, token_weight, output_mask):
    hs, b = (t.detach().clone().requires_grad_(True) for t in (h, b_packed))
    tw = token_weight.detach().clone().requires_grad_(True) if token_weight is not None else None
    y = ref_expand(hs, b, offsets, scales, token_adapter, tw)
    wrt = [hs, b] + ([tw] if tw is not None else [])
    gs = list(torch.autograd.grad(y, wrt, grad_out)) + ([None] if tw is None else [])
    # the op's grad_h is zero outside each slot's adapter columns (the reference's mask gives the same)
    return tuple(g if m else t.new_empty((0,)) for g, m, t in zip(gs, output_mask, [h, b_packed,
                                                                                    token_weight if tw is not None else h]))


# ---------------------------------------------------------------------------------------------------------------
# Samples. Each config: (leading dims of x, in, out, ranks, token_adapter builder, k, weighted).


def _randn(shape, dtype, device, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def _adapters(T, k, N, kind, seed):
    """token_adapter [T] (k = 0) or [T, k]: "scattered" random ids with -1s, "runs" sorted segments (the
    contiguous-run path), "repeat" the same adapter in both slots of some tokens."""
    g = torch.Generator().manual_seed(seed)
    kk = max(k, 1)
    if kind == "runs":
        ta = (torch.arange(T) * N // max(T, 1)).repeat_interleave(kk).reshape(T, kk)
    else:
        ta = torch.randint(-1, N, (T, kk), generator=g)
        if kind == "repeat" and T > 1:
            ta[::2, :] = ta[::2, :1]
    return ta.reshape(T) if k == 0 else ta


CONFIGS = [
    # lead, in, out, ranks, kind, k (0: 1-D token_adapter), weighted
    ((2, 5), 12, 7, (2, 0, 3), "scattered", 0, False),
    ((9,), 10, 6, (4, 2), "runs", 0, False),
    ((6,), 8, 9, (3, 1, 2, 2), "repeat", 2, True),
    ((3, 3), 16, 5, (5,), "scattered", 2, True),
    ((0,), 6, 4, (2, 2), "scattered", 0, False),  # no tokens
]


def _pack(ranks, in_f, out_f, dtype, device, seed):
    As = [_randn((r, in_f), dtype, device, seed + i, in_f ** -0.5) for i, r in enumerate(ranks)]
    Bs = [_randn((out_f, r), dtype, device, seed + 50 + i, 0.5) for i, r in enumerate(ranks)]
    scales = [2.0 / max(r, 1) for r in ranks]
    return lo.pack_adapters(As, Bs, scales)


def _config_args(cfg, dtype, device, i, weighted=None):
    lead, in_f, out_f, ranks, kind, k, w = cfg
    w = w if weighted is None else weighted
    T = math.prod(lead)
    x = _randn((*lead, in_f), dtype, device, 10 + i)
    a, b, off, sc = _pack(ranks, in_f, out_f, dtype, device, 20 + 7 * i)
    ta = _adapters(T, k, len(ranks), kind, 30 + i).to(device)
    tw_dtype = torch.float32 if (dtype in (torch.float16, torch.bfloat16) and i % 2) else dtype
    tw = _randn(tuple(ta.shape), tw_dtype, device, 40 + i) if w else None
    return x, a, b, off, sc, ta, tw, out_f


def multi_samples(device, dtype, requires_grad, gated=False):
    for i, cfg in enumerate(CONFIGS):
        if gated and cfg[5] == 0:
            continue
        x, a, b, off, sc, ta, tw, out_f = _config_args(cfg, dtype, device, i, weighted=True if gated else None)
        w = _randn((out_f, x.shape[-1]), dtype, device, 60 + i, x.shape[-1] ** -0.5)
        bias = _randn((out_f,), dtype, device, 70 + i) if i % 2 == 0 else None
        yield Sample((x, w, bias, a, b, off, sc, ta, tw), name=f"cfg{i}")


def multi_backward_samples(device, dtype, requires_grad):
    for i, s in enumerate(multi_samples(device, dtype, False)):
        x, w, bias, a, b, off, sc, ta, tw = s.args
        g = _randn((*x.shape[:-1], w.shape[0]), dtype, device, 80 + i)
        masks = [[True, True, True, tw is not None], [False, True, False, False], [True, False, True, False]]
        yield Sample((g, x, w, a, b, off, sc, ta, tw, masks[i % 3]), name=s.name)


def shrink_samples(device, dtype, requires_grad):
    for i, cfg in enumerate(CONFIGS):
        x, a, b, off, sc, ta, tw, out_f = _config_args(cfg, dtype, device, i)
        yield Sample((x, a, off, ta), name=f"cfg{i}")


def shrink_backward_samples(device, dtype, requires_grad):
    for i, s in enumerate(shrink_samples(device, dtype, False)):
        x, a, off, ta = s.args
        gh = _randn((*ta.shape, a.shape[0]), dtype, device, 90 + i)
        yield Sample((gh, x, a, off, ta, [[True, True], [True, False], [False, True]][i % 3]), name=s.name)


def expand_samples(device, dtype, requires_grad, gated=False):
    for i, cfg in enumerate(CONFIGS):
        if gated and cfg[5] == 0:
            continue
        x, a, b, off, sc, ta, tw, out_f = _config_args(cfg, dtype, device, i, weighted=True if gated else None)
        h = ref_shrink(x.double(), a.double(), off, ta).to(dtype)
        yield Sample((h, b, off, sc, ta, tw, out_f), name=f"cfg{i}")


def expand_backward_samples(device, dtype, requires_grad):
    for i, s in enumerate(expand_samples(device, dtype, False)):
        h, b, off, sc, ta, tw, out_f = s.args
        g = _randn((ta.shape[0], out_f), dtype, device, 95 + i)
        yield Sample((g, h, b, off, sc, ta, tw, [[True, True, tw is not None], [True, False, False],
                                                 [False, True, False]][i % 3]), name=s.name)


CASES = [
    OpCase("lora_multi_linear", ops.lora_multi_linear, multi_samples, ref_multi_linear, ALL_DTYPES, grad_args=(0, 3, 4)),
    OpCase("lora_multi_linear(gated)", ops.lora_multi_linear,
           lambda d, t, r: multi_samples(d, t, r, gated=True), ref_multi_linear, ALL_DTYPES, grad_args=(0, 3, 4, 8)),
    OpCase("lora_multi_linear_backward", ops.lora_multi_linear_backward, multi_backward_samples,
           ref_multi_linear_backward, ALL_DTYPES),
    OpCase("lora_shrink", ops.lora_shrink, shrink_samples, ref_shrink, ALL_DTYPES, grad_args=(0, 1)),
    OpCase("lora_shrink_backward", ops.lora_shrink_backward, shrink_backward_samples, ref_shrink_backward, ALL_DTYPES),
    OpCase("lora_expand", ops.lora_expand, expand_samples, ref_expand, ALL_DTYPES, grad_args=(0, 1)),
    OpCase("lora_expand(gated)", ops.lora_expand, lambda d, t, r: expand_samples(d, t, r, gated=True), ref_expand,
           ALL_DTYPES, grad_args=(0, 1, 5)),
    OpCase("lora_expand_backward", ops.lora_expand_backward, expand_backward_samples, ref_expand_backward,
           ALL_DTYPES),
]
test_opcheck, test_reference, test_gradcheck, test_compile = op_test_suite(CASES)


# ---------------------------------------------------------------------------------------------------------------
# Path switches and semantics.


def test_runs_and_gathered_rows_agree():
    """The same pairs as contiguous runs (views) and scattered (gather / index_add): equal results, and both equal to
    one LoRA per adapter applied token by token."""
    T, in_f, out_f = 24, 16, 12
    a, b, off, sc = _pack((4, 8, 2), in_f, out_f, torch.float64, "cpu", 3)
    x = _randn((T, in_f), torch.float64, "cpu", 4)
    w = _randn((out_f, in_f), torch.float64, "cpu", 5)
    runs = torch.arange(T) * 3 // T
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(0))
    y_runs = ops.lora_multi_linear(x, w, None, a, b, off, sc, runs)
    y_perm = ops.lora_multi_linear(x[perm], w, None, a, b, off, sc, runs[perm])
    torch.testing.assert_close(y_perm, y_runs[perm])
    for t in range(T):
        i = int(runs[t])
        o0, o1 = int(off[i]), int(off[i + 1])
        want = x[t] @ w.t() + float(sc[i]) * (x[t] @ a[o0:o1].t()) @ b[:, o0:o1].t()
        torch.testing.assert_close(y_runs[t], want)


def test_slots_add_and_minus_one_is_no_adapter():
    x = _randn((5, 8), torch.float64, "cpu", 1)
    w = _randn((6, 8), torch.float64, "cpu", 2)
    a, b, off, sc = _pack((2, 3), 8, 6, torch.float64, "cpu", 3)
    base = F.linear(x, w)
    none = ops.lora_multi_linear(x, w, None, a, b, off, sc, torch.full((5, 2), -1))
    torch.testing.assert_close(none, base)
    one = ops.lora_multi_linear(x, w, None, a, b, off, sc, torch.tensor([[1, -1]] * 5))
    two = ops.lora_multi_linear(x, w, None, a, b, off, sc, torch.tensor([[1, 1]] * 5))
    torch.testing.assert_close(two - base, 2 * (one - base))
    half = ops.lora_multi_linear(x, w, None, a, b, off, sc, torch.tensor([[1, 1]] * 5),
                                 torch.full((5, 2), 0.25, dtype=torch.float64))
    torch.testing.assert_close(half - base, 0.5 * (one - base))


def test_shrink_then_expand_is_multi_linear():
    x = _randn((7, 10), torch.float32, "cpu", 1)
    w = _randn((9, 10), torch.float32, "cpu", 2)
    a, b, off, sc = _pack((3, 0, 5), 10, 9, torch.float32, "cpu", 3)
    ta = torch.tensor([[0, 2], [2, -1], [1, 0], [-1, -1], [2, 2], [0, 0], [1, 1]])
    tw = _randn((7, 2), torch.float32, "cpu", 4)
    h = ops.lora_shrink(x, a, off, ta)
    assert h.shape == (7, 2, 8)
    y = F.linear(x, w) + ops.lora_expand(h, b, off, sc, ta, tw, 9)
    torch.testing.assert_close(y, ops.lora_multi_linear(x, w, None, a, b, off, sc, ta, tw))
    # h is zero outside each slot's adapter columns
    cols = _slot_columns(off, ta, 8).reshape(7, 2, 8)
    assert torch.all(h[~cols] == 0)


def test_matches_peft_mixed_adapter_batch():
    """HF PEFT's own mixed-adapter batch (model(x, adapter_names=[...])) on a LoRA layer with three adapters of
    different ranks and alphas (one rsLoRA) equals lora_multi_linear on the packed adapters."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(16, 12))
    configs = {"a": dict(r=4, lora_alpha=8), "b": dict(r=2, lora_alpha=3), "c": dict(r=6, lora_alpha=6, use_rslora=True)}
    model = None
    for name, kw in configs.items():
        cfg = peft.LoraConfig(target_modules=["0"], init_lora_weights=False, **kw)
        if model is None:
            model = peft.get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    model.eval()
    layer = model.base_model.model[0]
    names = list(configs)
    As = [layer.lora_A[n].weight.detach() for n in names]
    Bs = [layer.lora_B[n].weight.detach() for n in names]
    a, b, off, sc = lo.pack_adapters(As, Bs, [layer.scaling[n] for n in names])
    x = torch.randn(8, 16)
    req = ["a", "c", "__base__", "b", "a", "b", "c", "__base__"]
    with torch.no_grad():
        want = model(x, adapter_names=req)
        ta = torch.tensor([names.index(r) if r in names else -1 for r in req])
        got = ops.lora_multi_linear(x, layer.base_layer.weight, layer.base_layer.bias, a, b, off, sc, ta)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_training_gradients_reach_only_the_used_adapters():
    x = _randn((4, 8), torch.float32, "cpu", 1)
    w = _randn((6, 8), torch.float32, "cpu", 2)
    a, b, off, sc = _pack((2, 3, 1), 8, 6, torch.float32, "cpu", 3)
    a.requires_grad_(True)
    b.requires_grad_(True)
    ops.lora_multi_linear(x, w, None, a, b, off, sc, torch.tensor([0, 2, 0, -1])).sum().backward()
    assert a.grad[2:5].abs().sum() == 0 and b.grad[:, 2:5].abs().sum() == 0  # adapter 1 unused
    assert a.grad[:2].abs().sum() > 0 and b.grad[:, 5:].abs().sum() > 0


def test_frozen_weight_refused():
    x = _randn((3, 4), torch.float32, "cpu", 1)
    w = _randn((5, 4), torch.float32, "cpu", 2).requires_grad_(True)
    a, b, off, sc = _pack((2,), 4, 5, torch.float32, "cpu", 3)
    with pytest.raises(RuntimeError, match=r"lora_multi_linear: weight must not require grad"):
        ops.lora_multi_linear(x, w, None, a, b, off, sc, torch.zeros(3, dtype=torch.long))


def test_double_backward_refused():
    x = _randn((3, 4), torch.float64, "cpu", 1)
    w = _randn((5, 4), torch.float64, "cpu", 2)
    a, b, off, sc = _pack((2,), 4, 5, torch.float64, "cpu", 3)
    ta = torch.tensor([0, -1, 0])
    check_double_backward_refused(lambda x, a, b: ops.lora_multi_linear(x, w, None, a, b, off, sc, ta), (x, a, b),
                                  (0, 1, 2), "lora_multi_linear")


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the op and the value, on the kernels (in a child process) and the fake kernels.

_PRELUDE = """
x = torch.randn(4, 8); w = torch.randn(6, 8)
a = torch.randn(5, 8); b = torch.randn(6, 5)
off = torch.tensor([0, 2, 5]); sc = torch.tensor([1.0, 0.5]); ta = torch.tensor([0, 1, -1, 0])
h = torch.zeros(4, 5)
"""

BAD = [
    ("offsets decrease", "ops.lora_multi_linear(x, w, None, a, b, torch.tensor([0, 3, 2]), sc, ta)",
     r"lora_multi_linear: offsets must not decrease, got offsets\[1\] = 3 > offsets\[2\] = 2"),
    ("offsets end", "ops.lora_multi_linear(x, w, None, a, b, torch.tensor([0, 2, 4]), sc, ta)",
     r"lora_multi_linear: offsets must end at R = 5 \(the packed rank\), got offsets\[2\] = 4"),
    ("offsets start", "ops.lora_shrink(x, a, torch.tensor([1, 2, 5]), ta)",
     r"lora_shrink: offsets must start at 0, got offsets\[0\] = 1"),
    ("id too large", "ops.lora_multi_linear(x, w, None, a, b, off, sc, torch.tensor([0, 2, 0, 0]))",
     r"lora_multi_linear: token_adapter values must be in \[-1, N\) with N = 2 adapters \(-1: no adapter\), got 2"),
    ("id below -1", "ops.lora_expand(h, b, off, sc, torch.tensor([0, -2, 0, 0]), None, 6)",
     r"lora_expand: token_adapter values must be in \[-1, N\) with N = 2 adapters \(-1: no adapter\), got -2"),
    ("offsets dtype", "ops.lora_shrink(x, a, off.int(), ta)", r"lora_shrink: offsets must be int64, got Int"),
    ("scales shape", "ops.lora_multi_linear(x, w, None, a, b, off, torch.ones(3), ta)",
     r"lora_multi_linear: scales must have shape \[2\]"),
    ("scales dtype", "ops.lora_expand(h, b, off, sc.double(), ta, None, 6)", r"lora_expand: scales must be float32, got Double"),
    ("a dtype", "ops.lora_multi_linear(x, w, None, a.double(), b, off, sc, ta)",
     r"lora_multi_linear: a_packed has dtype Double but x has Float"),
    ("a cols", "ops.lora_shrink(x, torch.randn(5, 7), off, ta)", r"lora_shrink: x must have last dim 7"),
    ("b rows", "ops.lora_multi_linear(x, w, None, a, torch.randn(7, 5), off, sc, ta)",
     r"lora_multi_linear: b_packed must have 6 rows \(weight's out_features\)"),
    ("b cols", "ops.lora_multi_linear(x, w, None, a, torch.randn(6, 4), off, sc, ta)",
     r"lora_multi_linear: b_packed must have R = 5 columns"),
    ("ta rows", "ops.lora_multi_linear(x, w, None, a, b, off, sc, torch.tensor([0, 1]))",
     r"lora_multi_linear: token_adapter must have T = 4 rows"),
    ("ta dtype", "ops.lora_shrink(x, a, off, ta.int())", r"lora_shrink: token_adapter must be int64, got Int"),
    ("tw shape", "ops.lora_multi_linear(x, w, None, a, b, off, sc, ta, torch.ones(4, 2))",
     r"lora_multi_linear: token_weight must have token_adapter's shape \[4\]"),
    ("tw dtype", "ops.lora_multi_linear(x, w, None, a, b, off, sc, ta, torch.ones(4, dtype=torch.float64))",
     r"lora_multi_linear: token_weight must have dtype Float, got Double"),
    ("h shape", "ops.lora_expand(torch.zeros(4, 4), b, off, sc, ta, None, 6)",
     r"lora_expand: h must have shape \[4, 5\]"),
    ("out_features", "ops.lora_expand(h, b, off, sc, ta, None, 7)",
     r"lora_expand: out_features must equal b_packed.size\(0\) = 6, got 7"),
    ("bias shape", "ops.lora_multi_linear(x, w, torch.zeros(5), a, b, off, sc, ta)",
     r"lora_multi_linear: bias must have shape \[6\]"),
    ("grad_tw without tw", "ops.lora_multi_linear_backward(torch.zeros(4, 6), x, w, a, b, off, sc, ta, None, [True, True, True, True])",
     r"lora_multi_linear_backward: output_mask asks for grad_token_weight but token_weight is None"),
    ("grad_h shape", "ops.lora_shrink_backward(torch.zeros(4, 4), x, a, off, ta, [True, True])",
     r"lora_shrink_backward: grad_h must have shape \[4, 5\]"),
    ("x int", "ops.lora_shrink(x.long(), a, off, ta)", r"lora_shrink: x must be float32, float16, bfloat16 or float64, got Long"),
    ("single A shape", "ops.lora_linear_dropout(x, w, None, torch.randn(2, 7), torch.randn(6, 2), 1.0, 0.0, "
     "torch.empty(0, dtype=torch.long))", r"lora_linear: A must be \[r, 8\], got shape \[2, 7\]"),
    ("single B shape", "ops.lora_linear_dropout(x, w, None, torch.randn(2, 8), torch.randn(6, 3), 1.0, 0.0, "
     "torch.empty(0, dtype=torch.long))", r"lora_linear: B must be \[6, 2\] \(out, r\), got shape \[6, 3\]"),
    ("single seed", "ops.lora_linear_dropout(x, w, None, torch.randn(2, 8), torch.randn(6, 2), 1.0, 0.5, "
     "torch.empty(0, dtype=torch.long))", r"lora_linear: seed must be one int64 element when dropout_p > 0, got Long"),
    ("single p", "ops.lora_linear_dropout(x, w, None, torch.randn(2, 8), torch.randn(6, 2), 1.0, -0.5, "
     "torch.tensor([1]))", r"lora_linear: dropout_p must be in \[0, 1\), got -0.5"),
    ("single A dtype", "ops.lora_linear_dropout(x, w, None, torch.randn(2, 8).double(), torch.randn(6, 2), 1.0, 0.0, "
     "torch.empty(0, dtype=torch.long))", r"lora_linear: A has dtype Double but x has Float"),
]


def test_bad_inputs_isolated():
    check_errors_isolated(BAD, prelude=_PRELUDE)


@pytest.mark.parametrize("name,code,pattern", [c for c in BAD if "values" not in c[2] and "offsets must" not in c[2]
                                               or "offsets must be int64" in c[2]], ids=lambda v: str(v)[:30])
def test_fake_kernels_check_like_the_kernels(name, code, pattern):
    """The shape / dtype refusals (not the value checks, which need data) come with the same message from the
    fake kernels under FakeTensorMode."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    env = {"torch": torch, "ops": ops}
    exec(_PRELUDE, env)
    with FakeTensorMode() as mode:
        fenv = {k: (mode.from_tensor(v) if isinstance(v, torch.Tensor) else v) for k, v in env.items()}
        with pytest.raises(Exception, match=pattern):
            exec(code, fenv)


# ---------------------------------------------------------------------------------------------------------------
# lora_linear: one adapter, fused, PEFT's dropout on the adapter input with a regenerated mask.


def _dropout_mask(x_shape, p, seed):
    """keep / (1 - p) for the op's mask at these shapes and seed, read through the op itself (W = 0, A = B = I, scale 1:
    y = drop(ones))."""
    n = x_shape[-1]
    ones = torch.ones(x_shape, dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    return ops.lora_linear_dropout(ones, torch.zeros(n, n, dtype=torch.float64), None, eye, eye, 1.0, p, seed)


def ref_lora_linear_dropout(x, weight, bias, A, B, scale, dropout_p, seed):
    xd = x * _dropout_mask(x.shape, dropout_p, seed).to(x.dtype) if dropout_p > 0 else x
    return F.linear(x, weight, bias) + scale * ((xd @ A.t()) @ B.t())


def ref_lora_linear_dropout_backward(grad_out, x, weight, A, B, scale, dropout_p, seed, output_mask):
    xs, a, b = (t.detach().clone().requires_grad_(True) for t in (x, A, B))
    gs = torch.autograd.grad(ref_lora_linear_dropout(xs, weight, None, a, b, scale, dropout_p, seed), [xs, a, b], grad_out)
    return tuple(g if m else t.new_empty((0,)) for g, m, t in zip(gs, output_mask, [x, A, B]))


def single_samples(device, dtype, requires_grad, p=0.0):
    for i, (lead, in_f, out_f, r) in enumerate([((2, 5), 12, 7, 3), ((300,), 10, 6, 4), ((0,), 6, 4, 2), ((3,), 8, 9, 0)]):
        x = _randn((*lead, in_f), dtype, device, 10 + i)
        w = _randn((out_f, in_f), dtype, device, 20 + i, in_f ** -0.5)
        A = _randn((r, in_f), dtype, device, 30 + i, in_f ** -0.5)
        B = _randn((out_f, r), dtype, device, 40 + i)
        bias = _randn((out_f,), dtype, device, 50 + i) if i % 2 == 0 else None
        seed = torch.tensor([1234 + i], device=device) if p > 0 else torch.empty(0, dtype=torch.int64, device=device)
        yield Sample((x, w, bias, A, B, 1.5, p, seed), name=f"cfg{i}")


def single_backward_samples(device, dtype, requires_grad, p=0.0):
    for i, s in enumerate(single_samples(device, dtype, False, p)):
        x, w, bias, A, B, scale, p_, seed = s.args
        g = _randn((*x.shape[:-1], w.shape[0]), dtype, device, 60 + i)
        yield Sample((g, x, w, A, B, scale, p_, seed, [[True, True, True], [False, True, False], [True, False, True]][i % 3]),
                     name=s.name)


SINGLE_CASES = [
    OpCase("lora_linear_dropout(p=0)", ops.lora_linear_dropout, single_samples, ref_lora_linear_dropout, ALL_DTYPES,
           grad_args=(0, 3, 4)),
    OpCase("lora_linear_dropout(p=0.3)", ops.lora_linear_dropout, lambda d, t, r: single_samples(d, t, r, 0.3),
           ref_lora_linear_dropout, ALL_DTYPES, grad_args=(0, 3, 4)),
    OpCase("lora_linear_dropout_backward", ops.lora_linear_dropout_backward, single_backward_samples,
           ref_lora_linear_dropout_backward, ALL_DTYPES),
    OpCase("lora_linear_dropout_backward(p=0.3)", ops.lora_linear_dropout_backward,
           lambda d, t, r: single_backward_samples(d, t, r, 0.3), ref_lora_linear_dropout_backward, ALL_DTYPES),
]
(test_single_opcheck, test_single_reference, test_single_gradcheck,
 test_single_compile) = op_test_suite(SINGLE_CASES)


def test_dropout_mask_statistics_and_determinism():
    p = 0.25
    m = _dropout_mask((200, 300), p, torch.tensor([7]))
    kept = m != 0
    assert abs(1 - kept.double().mean().item() - p) < 0.01
    torch.testing.assert_close(m[kept], torch.full_like(m[kept], 1 / (1 - p)))
    assert torch.equal(m, _dropout_mask((200, 300), p, torch.tensor([7])))
    assert not torch.equal(m, _dropout_mask((200, 300), p, torch.tensor([8])))
    # independent columns: no two rows alike, no column all kept or all dropped
    assert kept.any(0).all() and (~kept).any(0).all()


def test_lora_linear_training_flag_and_seed():
    x = _randn((6, 8), torch.float32, "cpu", 1)
    w = _randn((5, 8), torch.float32, "cpu", 2)
    A, B = _randn((3, 8), torch.float32, "cpu", 3), _randn((5, 3), torch.float32, "cpu", 4)
    plain = F.linear(x, w) + 2.0 * ((x @ A.t()) @ B.t())
    assert torch.equal(lo.lora_linear(x, w, None, A, B, 2.0, 0.5, training=False),
                       lo.lora_linear(x, w, None, A, B, 2.0, 0.0, training=True))
    torch.testing.assert_close(lo.lora_linear(x, w, None, A, B, 2.0, 0.5, training=False), plain)
    torch.manual_seed(3)
    y1 = lo.lora_linear(x, w, None, A, B, 2.0, 0.5, training=True)
    torch.manual_seed(3)
    y2 = lo.lora_linear(x, w, None, A, B, 2.0, 0.5, training=True)
    assert torch.equal(y1, y2) and not torch.allclose(y1, plain)
    with pytest.raises(RuntimeError, match=r"lora_linear: dropout_p must be in \[0, 1\), got 1(\.0)?$"):
        lo.lora_linear(x, w, None, A, B, 2.0, 1.0, training=True)


def test_lora_linear_keeps_no_dropped_copy():
    """The autograd graph saves x, W, A, B and the seed: nothing of x's size besides x itself."""
    x = _randn((64, 32), torch.float32, "cpu", 1).requires_grad_(True)
    w = _randn((16, 32), torch.float32, "cpu", 2)
    A = _randn((4, 32), torch.float32, "cpu", 3).requires_grad_(True)
    B = _randn((16, 4), torch.float32, "cpu", 4).requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = lo.lora_linear(x, w, None, A, B, 2.0, 0.3, training=True)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert all(t.data_ptr() == x.data_ptr() for t in big), [tuple(t.shape) for t in big]
    y.sum().backward()
    assert x.grad is not None and A.grad is not None


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_cpu_token_and_group_paths_agree(dtype, monkeypatch):
    """lora_multi_linear's CPU forward has two paths (token loop for small groups, GEMMs per adapter group otherwise,
    PEFTCORE_LORA_CPU_PATH forces one): both against the reference on every sample, and the auto choice per sample."""
    for gated in (False, True):
        for s in multi_samples("cpu", dtype, False, gated=gated):
            ref_hi = ref_multi_linear(*[a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                        for a in s.args])
            ref_lo = ref_multi_linear(*s.args)
            outs = {}
            for path in ("tokens", "groups"):
                monkeypatch.setenv("PEFTCORE_LORA_CPU_PATH", path)
                outs[path] = ops.lora_multi_linear(*s.args)
                assert_close_to_reference(outs[path], ref_hi, ref_lo if dtype != torch.float64 else None, dtype,
                                          f"{path} {s.name} {dtype}", None)
            monkeypatch.setenv("PEFTCORE_LORA_CPU_PATH", "auto")
            auto = ops.lora_multi_linear(*s.args)
            assert torch.equal(auto, outs["tokens"]) or torch.equal(auto, outs["groups"])
    monkeypatch.setenv("PEFTCORE_LORA_CPU_PATH", "fast")
    with pytest.raises(RuntimeError, match=r'lora_multi_linear: PEFTCORE_LORA_CPU_PATH must be auto, tokens or groups, got "fast"'):
        ops.lora_multi_linear(*next(iter(multi_samples("cpu", torch.float32, False))).args)


# ---------------------------------------------------------------------------------------------------------------
# lora_validate: the value checks the CUDA ops leave out (host sync), registered for every backend.


def test_validate_accepts_and_refuses():
    off = torch.tensor([0, 2, 2, 5])
    lo.lora_validate(off, torch.tensor([[0, 2], [-1, 1]]), 5)
    with pytest.raises(RuntimeError, match=r"lora_validate: token_adapter values must be in \[-1, N\) with N = 3.*got 3"):
        lo.lora_validate(off, torch.tensor([0, 3]), 5)
    with pytest.raises(RuntimeError, match=r"lora_validate: token_adapter values .* got -2"):
        lo.lora_validate(off, torch.tensor([-2]), 5)
    with pytest.raises(RuntimeError, match=r"lora_validate: offsets must end at R = 6"):
        lo.lora_validate(off, torch.tensor([0]), 6)
    with pytest.raises(RuntimeError, match=r"lora_validate: offsets must not decrease"):
        lo.lora_validate(torch.tensor([0, 3, 2, 5]), torch.tensor([0]), 5)
    with pytest.raises(RuntimeError, match=r"lora_validate: offsets must start at 0"):
        lo.lora_validate(torch.tensor([1, 3]), torch.tensor([0]), 3)
    with pytest.raises(RuntimeError, match=r"lora_validate: offsets must be 1-D int64"):
        lo.lora_validate(torch.tensor([0.0, 3.0]), torch.tensor([0]), 3)
    with pytest.raises(RuntimeError, match=r"lora_validate: token_adapter must be int64"):
        lo.lora_validate(off, torch.tensor([0], dtype=torch.int32), 5)


def test_validate_opcheck_and_compile():
    off, ta = torch.tensor([0, 2, 5]), torch.tensor([0, 1, -1])
    torch.library.opcheck(ops.lora_validate, (off, ta, 5))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(off, ta, x):
        ops.lora_validate(off, ta, 5)
        return x + 1

    torch.testing.assert_close(f(off, ta, torch.zeros(2)), torch.ones(2))


# ---------------------------------------------------------------------------------------------------------------
# CUDA: both paths (gathered CUDA-core kernels; grouped tensor-core tiles for fp16 / bf16) against the CPU kernels,
# across every tile and vector switch of lora_kernels.cuh / lora_tc.cu, bad values skipped without a sync, CUDA
# graph capture, and the dropout mask equal to the CPU's.

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TOL = {torch.float32: dict(atol=2e-4, rtol=2e-4), torch.float16: dict(atol=3e-2, rtol=3e-2),
        torch.bfloat16: dict(atol=2e-1, rtol=5e-2)}

# (T, k, in, out, ranks, kind): crosses 64-pair tiles (several per adapter, a partial last one), ranks above 64 (two
# rank passes of the grouped shrink, two K steps of its expand), in / out not multiples of 8 or 64 (scalar loads,
# partial column tiles), R not a multiple of 8 (unaligned B rows), offsets not multiples of 8, k = 2, 1-D ids.
CUDA_SHAPES = [
    (300, 0, 136, 200, (16, 8, 24), "runs"),
    (300, 0, 136, 200, (16, 8, 24), "scattered"),
    (150, 0, 77, 67, (3, 70, 5), "runs"),
    (129, 2, 64, 130, (8, 16, 64, 1), "repeat"),
    (40, 0, 4096, 4096, (16,) * 8, "scattered"),
    (7, 0, 24, 40, (2, 0, 9), "scattered"),
]


def _cuda_args(shape, dtype, seed):
    T, k, in_f, out_f, ranks, kind = shape
    x = _randn((T, in_f), dtype, "cpu", seed)
    w = _randn((out_f, in_f), dtype, "cpu", seed + 1, in_f ** -0.5)
    bias = _randn((out_f,), dtype, "cpu", seed + 2)
    a, b, off, sc = _pack(ranks, in_f, out_f, dtype, "cpu", seed + 3)
    ta = _adapters(T, k, len(ranks), kind, seed + 4)
    tw = _randn(tuple(ta.shape), dtype, "cpu", seed + 5) if k else None
    return x, w, bias, a, b, off, sc, ta, tw


def _to(dev, *ts):
    return tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in ts)


@cuda_only
@pytest.mark.parametrize("path", ["gathered", "grouped", "auto"])
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: f"T{s[0]}k{s[1]}in{s[2]}out{s[3]}{s[5]}")
def test_cuda_paths_match_cpu(shape, dtype, path, monkeypatch):
    if path == "grouped" and dtype == torch.float32:
        pytest.skip("the grouped path is fp16 / bf16 (tensor cores)")
    monkeypatch.setenv("PEFTCORE_LORA_CUDA_PATH", path)
    args = _cuda_args(shape, dtype, 7)
    x, w, bias, a, b, off, sc, ta, tw = args
    want = ops.lora_multi_linear(*args)
    got = ops.lora_multi_linear(*_to("cuda", *args))
    torch.testing.assert_close(got.cpu(), want, **_TOL[dtype])
    h_want = ops.lora_shrink(x, a, off, ta)
    h_got = ops.lora_shrink(*_to("cuda", x, a, off, ta))
    torch.testing.assert_close(h_got.cpu(), h_want, **_TOL[dtype])
    d_want = ops.lora_expand(h_want, b, off, sc, ta, tw, b.shape[0])
    d_got = ops.lora_expand(*_to("cuda", h_want, b, off, sc, ta, tw), b.shape[0])
    torch.testing.assert_close(d_got.cpu(), d_want, **_TOL[dtype])
    g = _randn((x.shape[0], w.shape[0]), dtype, "cpu", 99)
    mask = [True, True, True, tw is not None]
    gw = ops.lora_multi_linear_backward(g, x, w, a, b, off, sc, ta, tw, mask)
    gg = ops.lora_multi_linear_backward(*_to("cuda", g, x, w, a, b, off, sc, ta, tw), mask)
    for name, u, v in zip(("x", "a", "b", "tw"), gg, gw):
        torch.testing.assert_close(u.cpu(), v, **_TOL[dtype], msg=lambda m: f"grad {name}: {m}")
    sw = ops.lora_shrink_backward(h_want, x, a, off, ta, [True, True])
    sg = ops.lora_shrink_backward(*_to("cuda", h_want, x, a, off, ta), [True, True])
    ew = ops.lora_expand_backward(g, h_want, b, off, sc, ta, tw, [True, True, tw is not None])
    eg = ops.lora_expand_backward(*_to("cuda", g, h_want, b, off, sc, ta, tw), [True, True, tw is not None])
    for u, v in list(zip(sg, sw)) + list(zip(eg, ew)):
        torch.testing.assert_close(u.cpu(), v, **_TOL[dtype])


@cuda_only
@pytest.mark.parametrize("path", ["gathered", "grouped"])
def test_cuda_unaligned_views(path, monkeypatch):
    """x / a_packed / b_packed starting one element past a 16-byte boundary take the scalar loads."""
    monkeypatch.setenv("PEFTCORE_LORA_CUDA_PATH", path)
    x, w, bias, a, b, off, sc, ta, tw = _cuda_args((200, 0, 64, 72, (8, 16), "runs"), torch.float16, 3)
    want = ops.lora_multi_linear(x, w, bias, a, b, off, sc, ta)

    def shifted(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
        v = buf[1:].view(t.shape)
        v.copy_(t)
        return v

    got = ops.lora_multi_linear(shifted(x), w.cuda(), bias.cuda(), shifted(a), shifted(b), off.cuda(), sc.cuda(),
                                ta.cuda())
    torch.testing.assert_close(got.cpu(), want, **_TOL[torch.float16])


@cuda_only
@pytest.mark.parametrize("path", ["gathered", "grouped"])
def test_cuda_bad_values_skipped_without_sync(path, monkeypatch):
    """Ids outside [-1, N) and adapters whose offsets are out of range add nothing on CUDA (no host read, no
    out-of-bounds access); lora_validate reports them."""
    monkeypatch.setenv("PEFTCORE_LORA_CUDA_PATH", path)
    x, w, bias, a, b, off, sc, ta, tw = _to("cuda", *_cuda_args((130, 0, 32, 24, (4, 8), "scattered"),
                                                                  torch.float16, 5))
    bad = ta.clone()
    bad[::3] = 7
    bad[1::5] = -9
    y = ops.lora_multi_linear(x, w, bias, a, b, off, sc, bad)
    ok = bad.where((bad >= -1) & (bad < 2), torch.full_like(bad, -1))
    torch.testing.assert_close(y, ops.lora_multi_linear(x, w, bias, a, b, off, sc, ok))
    bad_off = torch.tensor([0, 4, 99], device="cuda")  # adapter 1 reaches past R = 12
    y = ops.lora_multi_linear(x, w, bias, a, b, bad_off, sc, ta)
    only0 = ta.where(ta == 0, torch.full_like(ta, -1))
    torch.testing.assert_close(y, ops.lora_multi_linear(x, w, bias, a, b, off, sc, only0))
    torch.cuda.synchronize()
    with pytest.raises(RuntimeError, match=r"lora_validate: token_adapter values"):
        lo.lora_validate(off, bad, a.shape[0])


@cuda_only
@pytest.mark.parametrize("path", ["gathered", "grouped"])
def test_cuda_graph_capture_training_step(path, monkeypatch):
    """Forward + backward inside one CUDA graph: no host sync anywhere (the pair sort included)."""
    monkeypatch.setenv("PEFTCORE_LORA_CUDA_PATH", path)
    x, w, bias, a, b, off, sc, ta, tw = _to("cuda", *_cuda_args((256, 0, 64, 48, (8, 16), "runs"), torch.bfloat16, 9))
    a.requires_grad_(True)
    b.requires_grad_(True)

    def step():
        a.grad = b.grad = None
        y = ops.lora_multi_linear(x, w, bias, a, b, off, sc, ta)
        y.float().square().sum().backward()
        return y

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step()
    graph.replay()
    torch.cuda.synchronize()
    want = ops.lora_multi_linear(*_to("cpu", x, w, bias, a.detach(), b.detach(), off, sc, ta))
    torch.testing.assert_close(y.cpu(), want, **_TOL[torch.bfloat16])


@cuda_only
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_cuda_dropout_mask_equals_cpu(dtype):
    """The same seed drops the same elements on both backends (one hash, lora_dropout.h)."""
    x, w, _, A, B = (_randn(s, dtype, "cpu", i) for i, s in enumerate([(70, 33), (20, 33), (20,), (4, 33), (20, 4)]))
    seed = torch.tensor([4242])
    want = ops.lora_linear_dropout(x, w, None, A, B, 2.0, 0.3, seed)
    got = ops.lora_linear_dropout(*_to("cuda", x, w, None, A, B), 2.0, 0.3, seed.cuda())
    torch.testing.assert_close(got.cpu(), want, **_TOL[dtype])
    g = _randn((70, 20), dtype, "cpu", 9)
    gw = ops.lora_linear_dropout_backward(g, x, w, A, B, 2.0, 0.3, seed, [True, True, True])
    gg = ops.lora_linear_dropout_backward(*_to("cuda", g, x, w, A, B), 2.0, 0.3, seed.cuda(), [True, True, True])
    for u, v in zip(gg, gw):
        torch.testing.assert_close(u.cpu(), v, **_TOL[dtype])


def test_cuda_path_env_refused_on_cpu_build_or_bad_value(monkeypatch):
    """A bad PEFTCORE_LORA_CUDA_PATH is an error naming the op (checked where CUDA runs; on CPU the variable is not
    read)."""
    monkeypatch.setenv("PEFTCORE_LORA_CUDA_PATH", "fastest")
    x, w, bias, a, b, off, sc, ta, tw = _cuda_args((4, 0, 8, 6, (2,), "runs"), torch.float32, 1)
    ops.lora_multi_linear(x, w, bias, a, b, off, sc, ta)  # CPU: unaffected
    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match=r"lora_multi_linear: PEFTCORE_LORA_CUDA_PATH must be auto"):
            ops.lora_multi_linear(*_to("cuda", x, w, bias, a, b, off, sc, ta))


# ---------------------------------------------------------------------------------------------------------------
# The grouped CUDA kernels' tile schedule (lora_tc_plan.h), checked on the host through lora_tc_tiles: pairs sorted
# by adapter as lora_cuda.cpp sorts them (stable sort + searchsorted), tiles of 64.


@pytest.mark.parametrize("seed", range(6))
def test_tc_tile_schedule_covers_each_sorted_pair_once(seed):
    g = torch.Generator().manual_seed(seed)
    N = int(torch.randint(1, 12, (1,), generator=g))
    ranks = torch.randint(0, 80, (N,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), ranks.cumsum(0)])
    R = int(offsets[-1])
    if seed % 3 == 2 and N > 1:  # an adapter whose offsets reach past R (invalid: no tile)
        offsets[N] = R + 5
    P = int(torch.randint(0, 700, (1,), generator=g))
    ta = torch.randint(-2, N + 2, (P,), generator=g)  # ids outside [0, N) too: outside every run
    values, _ = torch.sort(ta, stable=True)
    starts = torch.searchsorted(values, torch.arange(N + 1))
    tiles, bound = ops.lora_tc_tiles(offsets, starts, R, P)
    assert tiles.shape[0] <= bound == (P + 63) // 64 + N
    seen = []
    for i, off, r, q0, n in tiles.tolist():
        assert 1 <= n <= 64 and off == offsets[i] and r == offsets[i + 1] - offsets[i] and r > 0
        assert off >= 0 and off + r <= R
        seen += [(i, q) for q in range(q0, q0 + n)]
    want = [(i, q) for i in range(N) for q in range(int(starts[i]), int(starts[i + 1]))
            if 0 <= offsets[i] < offsets[i + 1] <= R]
    assert seen == want  # adapter by adapter, each sorted position once, in order


def test_tc_tile_schedule_partial_and_empty():
    offsets = torch.tensor([0, 16, 16, 40])  # adapter 1 has rank 0
    starts = torch.tensor([0, 130, 140, 140])  # adapter 0: 130 pairs (3 tiles), 1: 10 (rank 0: none), 2: none
    tiles, bound = ops.lora_tc_tiles(offsets, starts, 40, 140)
    assert tiles.tolist() == [[0, 0, 16, 0, 64], [0, 0, 16, 64, 64], [0, 0, 16, 128, 2]] and bound == 3 + 3
    with pytest.raises(RuntimeError, match=r"lora_tc_tiles: starts must be int64 of offsets' shape"):
        ops.lora_tc_tiles(offsets, starts[:3], 40, 140)
