"""The shared op checks every peftcore op goes through (used by tests/, importable by users who extend peftcore).

An :class:`OpCase` describes one op: how to build sample inputs for a device and dtype, a plain-torch reference,
which dtypes it claims and which arguments are differentiable. :func:`check_op` then runs, per device:

* ``torch.library.opcheck`` on every sample (schema, fake kernel, autograd registration, AOT dispatch);
* comparison with the reference computed in float64 from the same inputs, element by element: at each
  position the op may be off by at most ``2 x`` the error that the same reference makes there in the op's own
  dtype (FlashAttention's rule, applied per element), plus a per-dtype floor from :data:`TOLERANCES`
  (``rtol`` of that element's magnitude and ``atol`` of the tensor's root-mean-square), forward and backward;
* ``torch.autograd.gradcheck`` in float64 (CPU) for differentiable ops;
* ``torch.compile(fullgraph=True)`` forward and backward matching eager, with a recompilation guard.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

# Floors added to the per-element 2x-reference-error rule, per dtype: ``atol`` is relative to the reference
# tensor's root-mean-square (so sums of many terms are judged at their own scale), ``rtol`` to each element's
# own magnitude (two ulps of the dtype: the op and the low-precision reference may round one result differently).
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=1e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=8e-3),
}


@dataclasses.dataclass
class Sample:
    args: tuple
    kwargs: dict = dataclasses.field(default_factory=dict)
    name: str = ""


@dataclasses.dataclass
class OpCase:
    """One op under test.

    ``samples(device, dtype, requires_grad)`` yields :class:`Sample`s; ``reference(*args, **kwargs)`` is plain torch
    and is called on inputs upcast to float64 (and, for the error baseline, on the inputs as they are);
    ``grad_args`` are the positions of differentiable tensor arguments; ``mutates`` is the position of an argument
    the op writes in place (then the reference returns the new value of that argument).
    """

    name: str
    op: Any  # torch.ops.peftcore.<name> (OpOverloadPacket) or .default
    samples: Callable[[str, torch.dtype, bool], Iterable[Sample]]
    reference: Callable[..., Any]
    dtypes: Sequence[torch.dtype] = (torch.float32, torch.float16, torch.bfloat16)
    grad_args: Sequence[int] = ()
    mutates: Optional[int] = None
    compile: bool = True
    cuda: bool = True  # has a CUDA kernel
    # Per-dtype overrides of TOLERANCES for this op ({dtype: dict(atol=..., rtol=...)}); the case says why.
    tol: Optional[dict] = None
    # check_nonfinite plants NaN / inf in the differentiable inputs and compares with the reference:
    #   "exact"        NaN exactly where the reference has NaN, non-finite exactly where it is non-finite;
    #   "nan_superset" (matrix functions: Cayley, Neumann) every NaN of the reference is NaN in the op, which may
    #                  spread it further inside the block (the pattern of a solve / matrix power on NaN input is an
    #                  algorithm's choice); inf is not compared (the inverse of a matrix with an inf entry is a limit);
    #   "off"          the op's rule is its own and is tested in its family's file (say where).
    nonfinite: str = "exact"
    # For ops with structural zeros (a sparse delta's absent entries, the off-diagonal blocks of a butterfly
    # factor): a reference that multiplies only what the op's math multiplies, as torch.sparse does, so a NaN
    # is not spread by 0 * NaN through an entry that does not exist. Used instead of ``reference`` for NaN / inf.
    nonfinite_reference: Optional[Callable[..., Any]] = None

    def __repr__(self):
        return self.name


def _overload(op):
    return op.default if hasattr(op, "default") else op


def _flat(out) -> list:
    if out is None:
        return []
    if isinstance(out, torch.Tensor):
        return [out]
    return [o for o in out if isinstance(o, torch.Tensor)]


def _upcast(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().to(torch.float64)
    if isinstance(x, (list, tuple)):
        return type(x)(_upcast(v) for v in x)
    return x


def _detach(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, (list, tuple)):
        return type(x)(_detach(v) for v in x)
    return x


def _abs_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in float64, elementwise; equal infinities (e.g. an lse of -inf for a row that sees nothing) are no
    error, a NaN or a mismatched infinity an infinite / NaN error (which fails every bound)."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    d = (a - b).abs()
    return torch.where(a == b, torch.zeros_like(d), d)


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return _abs_err(a, b).max().item() if a.numel() else 0.0


def _rms(t: torch.Tensor) -> float:
    """Root-mean-square over the finite entries (the scale of the absolute floor)."""
    f = t[torch.isfinite(t)].to(torch.float64) if t.numel() else t
    return f.pow(2).mean().sqrt().item() if f.numel() else 0.0


def assert_close_to_reference(out: torch.Tensor, ref_hi: torch.Tensor, ref_lo: Optional[torch.Tensor], dtype,
                              what: str = "", tol: Optional[dict] = None) -> None:
    """Per element: ``|out - ref_hi| <= 2 |ref_lo - ref_hi| + rtol |ref_hi| + atol * max(1, rms(ref_hi))``.

    ``ref_lo`` is the same reference run in the op's dtype (None for float64 inputs). NaN in ``ref_hi`` must be NaN
    in ``out`` at the same place (and nowhere else); infinities must match exactly. ``tol`` overrides the
    :data:`TOLERANCES` entry (a case that needs it says why).
    """
    assert out.shape == ref_hi.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref_hi.shape)}"
    if out.numel() == 0:
        return
    tol = tol or TOLERANCES[dtype]
    hi = ref_hi.to(torch.float64).to(out.device)
    o = out.detach().to(torch.float64)
    nan_hi, nan_o = torch.isnan(hi), torch.isnan(o)
    if not torch.equal(nan_hi, nan_o):
        n_lost, n_new = int((nan_hi & ~nan_o).sum()), int((nan_o & ~nan_hi).sum())
        raise AssertionError(f"{what}: NaN pattern differs from the reference ({n_lost} NaN not propagated, "
                             f"{n_new} NaN where the reference is finite)")
    base = _abs_err(ref_lo.to(torch.float64).to(out.device), hi) if ref_lo is not None else torch.zeros_like(hi)
    base = torch.where(torch.isnan(base) | nan_hi, torch.zeros_like(base), base)
    err = torch.where(nan_hi, torch.zeros_like(hi), _abs_err(o, hi))
    finite_hi = torch.where(torch.isfinite(hi), hi.abs(), torch.zeros_like(hi))
    bound = 2.0 * base + tol["rtol"] * finite_hi + tol["atol"] * max(1.0, _rms(hi))
    bad = ~(err <= bound)
    if bool(bad.any()):
        excess = torch.where(bad, err / bound.clamp_min(1e-300), torch.zeros_like(err))
        i = int(excess.reshape(-1).argmax())
        idx = tuple(int(v) for v in torch.unravel_index(torch.tensor(i), tuple(hi.shape)))
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {hi.numel()} elements exceed their bound; worst at {idx}: got "
            f"{o.reshape(-1)[i].item():.6g}, reference {hi.reshape(-1)[i].item():.6g}, error "
            f"{err.reshape(-1)[i].item():.3e} > bound {bound.reshape(-1)[i].item():.3e} (2 x reference error "
            f"{base.reshape(-1)[i].item():.3e} in {dtype}; max error {err.max().item():.3e})")


def _tol(case: OpCase, dtype) -> Optional[dict]:
    return (case.tol or {}).get(dtype)


def _run(case: OpCase, args, kwargs):
    args = _detach(args)
    out = case.op(*args, **kwargs)
    if case.mutates is not None:
        return [args[case.mutates]]
    return _flat(out)


def _ref(case: OpCase, args, kwargs):
    args = _detach(args)
    return _flat(case.reference(*args, **kwargs))


def dtypes_for(case: OpCase, device: str) -> list:
    """The dtypes a case claims on a device: float64 is a CPU-only dtype (for gradcheck)."""
    return [d for d in case.dtypes if device == "cpu" or d != torch.float64]


def check_opcheck(case: OpCase, device: str) -> None:
    """``torch.library.opcheck`` on every sample; on CPU also the torch.func transforms."""
    for dtype in dtypes_for(case, device):
        for s in case.samples(device, dtype, bool(case.grad_args)):
            torch.library.opcheck(_overload(case.op), s.args, s.kwargs)
    if device == "cpu":
        check_func_transforms(case)


def check_func_transforms(case: OpCase, device: str = "cpu") -> None:
    """``torch.func.vmap`` over two samples equals two calls; ``torch.func.vjp`` equals ``torch.autograd.grad``."""
    dtype = dtypes_for(case, device)[0]
    s = next(iter(case.samples(device, dtype, False)))
    if case.mutates is None:
        s2 = _perturb(s)
        in_dims = tuple(0 if isinstance(a, torch.Tensor) and a.is_floating_point() else None for a in s.args)
        batched = tuple(torch.stack([a, b]) if d == 0 else a for a, b, d in zip(s.args, s2.args, in_dims))
        got = _flat(torch.func.vmap(lambda *a: case.op(*a, **s.kwargs), in_dims=in_dims)(*batched))
        want = [torch.stack(pair) for pair in zip(_flat(case.op(*s.args, **s.kwargs)),
                                                    _flat(case.op(*s2.args, **s2.kwargs)))]
        assert len(got) == len(want), f"{case.name}: vmap returned {len(got)} outputs, expected {len(want)}"
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, equal_nan=True, msg=lambda m: f"{case.name} under vmap: {m}")
    if not case.grad_args:
        return
    args = list(_detach(s.args))

    def fn(*diff):
        a = list(args)
        for i, d in zip(case.grad_args, diff):
            a[i] = d
        return tuple(o for o in _flat(case.op(*a, **s.kwargs)) if o.is_floating_point())

    primals = tuple(args[i] for i in case.grad_args)
    outs, vjp_fn = torch.func.vjp(fn, *primals)
    gen = torch.Generator(device="cpu").manual_seed(4321)
    seeds = tuple(torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for o in outs)
    got = vjp_fn(seeds)
    ref_args = [p.clone().requires_grad_(True) for p in primals]
    ref_outs = fn(*ref_args)
    pairs = [(o, g) for o, g in zip(ref_outs, seeds) if o.requires_grad]
    want = torch.autograd.grad([o for o, _ in pairs], ref_args, [g for _, g in pairs], allow_unused=True)
    for i, g, w in zip(case.grad_args, got, want):
        if w is None:
            continue
        torch.testing.assert_close(g, w, equal_nan=True, msg=lambda m: f"{case.name} torch.func.vjp, arg {i}: {m}")


def check_reference(case: OpCase, device: str) -> None:
    """Forward (and backward for differentiable ops) against the float64 reference."""
    for dtype in dtypes_for(case, device):
        for s in case.samples(device, dtype, False):
            outs = _run(case, s.args, s.kwargs)
            ref_hi = _ref(case, _upcast(s.args), s.kwargs)
            ref_lo = _ref(case, s.args, s.kwargs) if dtype != torch.float64 else None
            assert len(outs) == len(ref_hi), f"{case.name}: {len(outs)} outputs, reference has {len(ref_hi)}"
            for i, (o, rh) in enumerate(zip(outs, ref_hi)):
                rl = ref_lo[i] if ref_lo is not None else None
                if not o.is_floating_point():
                    assert torch.equal(o.cpu(), rh.cpu()), f"{case.name}[{s.name}] output {i} differs"
                    continue
                assert o.dtype == rl.dtype if rl is not None else True, \
                    f"{case.name}[{s.name}] output {i} dtype {o.dtype} != reference {rl.dtype}"
                assert_close_to_reference(o, rh, rl, dtype, f"{case.name}[{s.name}, {dtype}] output {i}",
                                          _tol(case, dtype))
        if not case.grad_args:
            continue
        for s in case.samples(device, dtype, True):
            _check_grads(case, s, dtype)
    check_nonfinite(case, device)
    check_repeatable(case, device)


def check_repeatable(case: OpCase, device: str) -> None:
    """Two calls on the same float32 inputs give bitwise equal outputs (and gradients, for the first samples):
    no kernel's result may depend on thread timing. On CUDA only under deterministic mode (float atomics are
    allowed otherwise, as in ATen)."""
    if torch.float32 not in case.dtypes:
        return
    det = torch.are_deterministic_algorithms_enabled()
    if device != "cpu" and not det:
        torch.use_deterministic_algorithms(True)
    try:
        for n, s in enumerate(case.samples(device, torch.float32, False)):
            a, b = _run(case, s.args, s.kwargs), _run(case, s.args, s.kwargs)
            for j, (x, y) in enumerate(zip(a, b)):
                assert torch.equal(x, y) or (x.is_floating_point() and torch.equal(x.isnan(), y.isnan())
                                             and torch.equal(x.nan_to_num(), y.nan_to_num())), \
                    f"{case.name}[{s.name}] output {j} differs between two identical calls"
            if case.grad_args and n < 2 and case.mutates is None:
                ga = [i for i in case.grad_args if isinstance(s.args[i], torch.Tensor)]
                g1, seeds = _grads(case.op, s.args, s.kwargs, ga)
                g2, _ = _grads(case.op, s.args, s.kwargs, ga, seeds)
                for i, x, y in zip(ga, g1, g2):
                    assert (x is None and y is None) or torch.equal(x, y), \
                        f"{case.name}[{s.name}] grad of arg {i} differs between two identical calls"
    finally:
        torch.use_deterministic_algorithms(det)


def _plant(t: torch.Tensor, value: float, where: float) -> torch.Tensor:
    t = t.detach().clone()
    if t.numel():
        k = int(where * (t.numel() - 1))
        t[tuple(int(i) for i in torch.unravel_index(torch.tensor(k), tuple(t.shape)))] = value  # any strides
    return t


def check_nonfinite(case: OpCase, device: str) -> None:
    """NaN and inf in an input surface as PyTorch's reference makes them surface, on the float32 (vector) paths.

    For each sample and each differentiable input, a NaN is planted at its first, a middle and its last element
    (one at a time): the op's output must be NaN exactly where the float64 reference's is. Then a +inf: the op
    must be non-finite exactly where the reference is (inf vs NaN may differ where the kernel factors a sum
    differently from the reference, e.g. ``x·W + x·delta`` against ``x·(W + delta)``). Nothing non-finite may be
    dropped or appear from nowhere.
    """
    if case.nonfinite == "off" or torch.float32 not in case.dtypes:
        return
    assert case.nonfinite in ("exact", "nan_superset"), f"{case.name}: nonfinite={case.nonfinite!r}"
    reference = case.nonfinite_reference or case.reference
    for s in case.samples(device, torch.float32, False):
        for i in case.grad_args:
            if not (isinstance(s.args[i], torch.Tensor) and s.args[i].is_floating_point() and s.args[i].numel()):
                continue
            for value in (float("nan"), float("inf")) if case.nonfinite == "exact" else (float("nan"),):
                for where in (0.0, 0.5, 1.0):
                    args = list(_detach(s.args))
                    args[i] = _plant(args[i], value, where)
                    outs = _run(case, args, s.kwargs)
                    refs = _flat(reference(*_detach(_upcast(args)), **s.kwargs))
                    for j, (o, r) in enumerate(zip(outs, refs)):
                        if not o.is_floating_point():
                            continue
                        o, r = o.detach().cpu().to(torch.float64), r.detach().cpu()
                        what = f"{case.name}[{s.name}] output {j} with {value} at {where:.1f} of arg {i}"
                        if value != value:
                            lost = int((r.isnan() & ~o.isnan()).sum())
                            new = int((o.isnan() & ~r.isnan()).sum())
                            if case.nonfinite == "nan_superset":
                                new = 0
                            assert lost == 0 and new == 0, \
                                f"{what}: {lost} NaN not propagated, {new} NaN where the reference has none"
                        else:
                            lost = int((~r.isfinite() & o.isfinite()).sum())
                            new = int((~o.isfinite() & r.isfinite()).sum())
                            assert lost == 0 and new == 0, \
                                f"{what}: {lost} non-finite values dropped, {new} where the reference is finite"


def _grads(fn, args, kwargs, grad_args, seed_grads=None):
    args = list(_detach(args))
    for i in grad_args:
        args[i].requires_grad_(True)
    outs = _flat(fn(*args, **kwargs))
    outs = [o for o in outs if o.is_floating_point() and o.requires_grad]
    if seed_grads is None:
        gen = torch.Generator(device="cpu").manual_seed(1234)
        seed_grads = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device) for o in outs]
    gs = torch.autograd.grad(outs, [args[i] for i in grad_args], [g.to(o.dtype) for g, o in zip(seed_grads, outs)],
                             allow_unused=True)
    return gs, seed_grads


def _check_grads(case: OpCase, s: Sample, dtype) -> None:
    got, seeds = _grads(case.op, s.args, s.kwargs, case.grad_args)
    ref_hi, _ = _grads(case.reference, _upcast(s.args), s.kwargs, case.grad_args, seeds)
    ref_lo, _ = _grads(case.reference, s.args, s.kwargs, case.grad_args, seeds)
    for i, g, rh, rl in zip(case.grad_args, got, ref_hi, ref_lo):
        assert (g is None) == (rh is None), f"{case.name}[{s.name}]: grad of arg {i} presence differs"
        if g is None:
            continue
        assert g.dtype == s.args[i].dtype, f"{case.name}: grad of arg {i} has dtype {g.dtype}, input {s.args[i].dtype}"
        assert_close_to_reference(g, rh, rl if dtype != torch.float64 else None, dtype,
                                  f"{case.name}[{s.name}, {dtype}] grad of arg {i}", _tol(case, dtype))


def check_gradcheck(case: OpCase) -> None:
    """gradcheck in float64 on CPU (every differentiable argument at once)."""
    if not case.grad_args:
        return
    for s in case.samples("cpu", torch.float64, True):
        args = list(_detach(s.args))
        for i in case.grad_args:
            args[i].requires_grad_(True)

        def fn(*diff):
            a = list(args)
            for i, d in zip(case.grad_args, diff):
                a[i] = d
            # Non-finite outputs (an lse of -inf for a row that sees nothing) are constants to gradcheck: their
            # finite differences are NaN. check_reference still compares them with the reference.
            return tuple(torch.where(torch.isfinite(o), o, 0.0) if o.is_floating_point() else o
                         for o in _flat(case.op(*a, **s.kwargs)))

        assert torch.autograd.gradcheck(fn, tuple(args[i] for i in case.grad_args), eps=1e-6, atol=1e-5,
                                        rtol=1e-4), f"{case.name}[{s.name}] gradcheck failed"


def check_compile(case: OpCase, device: str, backend: str = "aot_eager") -> None:
    """torch.compile(fullgraph=True) forward and backward equal eager; a second call with new values of the same
    shapes must not recompile."""
    if not case.compile:
        return
    import torch._dynamo

    dtype = dtypes_for(case, device)[0]
    samples = list(case.samples(device, dtype, bool(case.grad_args)))
    s = samples[0]

    def fn(*args):
        out = case.op(*args, **s.kwargs)
        if case.mutates is not None:
            return args[case.mutates]
        return out

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    for attempt, sample in enumerate([s, _perturb(s)]):
        eager_args, comp_args = list(_detach(sample.args)), list(_detach(sample.args))
        for i in case.grad_args:
            eager_args[i].requires_grad_(True)
            comp_args[i].requires_grad_(True)
        ctx = torch._dynamo.config.patch(error_on_recompile=True) if attempt else _null()
        with ctx:
            out_c = _flat(compiled(*comp_args))
        out_e = _flat(fn(*eager_args))
        for a, b in zip(out_c, out_e):
            torch.testing.assert_close(a, b, msg=lambda m: f"{case.name} compiled forward: {m}")
        if case.grad_args:
            diff = [o for o in out_e if o.is_floating_point() and o.requires_grad]
            seeds = [torch.randn_like(o) for o in diff]
            ge = torch.autograd.grad(diff, [eager_args[i] for i in case.grad_args], seeds, allow_unused=True)
            diff_c = [o for o in out_c if o.is_floating_point() and o.requires_grad]
            gc = torch.autograd.grad(diff_c, [comp_args[i] for i in case.grad_args], seeds, allow_unused=True)
            for a, b in zip(gc, ge):
                if a is None or b is None:
                    assert a is None and b is None, f"{case.name}: compiled/eager grad presence differs"
                    continue
                torch.testing.assert_close(a, b, msg=lambda m: f"{case.name} compiled backward: {m}")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _perturb(s: Sample) -> Sample:
    """Same shapes and dtypes, new floating values (integer tensors such as indices are kept)."""
    def p(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            return torch.randn_like(x)
        return x
    return Sample(tuple(p(a) for a in s.args), dict(s.kwargs), s.name + "+perturbed")


def check_op(case: OpCase, device: str) -> None:
    """Everything above for one device (gradcheck only on CPU)."""
    check_opcheck(case, device)
    check_reference(case, device)
    if device == "cpu":
        check_gradcheck(case)
    check_compile(case, device)


def devices() -> list:
    """``cpu`` always, ``cuda`` as a pytest param that skips with a reason when no GPU or no CUDA build."""
    import pytest

    import peftcore

    reason = None
    if not torch.cuda.is_available():
        reason = "no CUDA device on this machine"
    elif not peftcore.build_info()["with_cuda"]:
        reason = "peftcore was built without CUDA kernels"
    return ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(reason is not None, reason=reason or ""))]


def op_test_suite(cases: Sequence[OpCase]):
    """The four parametrised pytest tests every family runs over its cases:

        test_opcheck, test_reference, test_gradcheck, test_compile = op_test_suite(CASES)
    """
    import pytest

    devs = devices()

    @pytest.mark.parametrize("case", cases, ids=str)
    @pytest.mark.parametrize("device", devs)
    def test_opcheck(case, device):
        check_opcheck(case, device)

    @pytest.mark.parametrize("case", cases, ids=str)
    @pytest.mark.parametrize("device", devs)
    def test_reference(case, device):
        check_reference(case, device)

    @pytest.mark.parametrize("case", [c for c in cases if c.grad_args], ids=str)
    def test_gradcheck(case):
        check_gradcheck(case)

    @pytest.mark.parametrize("case", cases, ids=str)
    @pytest.mark.parametrize("device", devs)
    def test_compile(case, device):
        check_compile(case, device)

    return test_opcheck, test_reference, test_gradcheck, test_compile


# ---------------------------------------------------------------------------------------------------------------
# Bad input that could crash the process: run it in a child process, so a crash is a failing test, not a dead run.

_ISOLATED_PRELUDE = """
import re, sys, traceback
import torch
import peftcore
ops = torch.ops.peftcore
"""


def check_errors_isolated(cases: Sequence[tuple], prelude: str = "", timeout: float = 600.0) -> None:
    """Run bad-input cases in one child Python process and require each to raise a clear error.

    ``cases`` are ``(name, code, pattern)``: ``code`` (statements, may use ``torch``, ``peftcore`` and ``ops`` =
    ``torch.ops.peftcore``, plus whatever ``prelude`` defines) must raise an exception whose message matches the
    regular expression ``pattern`` (e.g. the op's name and the offending value). A case that raises nothing, raises
    a non-matching error, or kills the process (segfault, abort, hang) fails, and the failure names the case.
    """
    import json
    import os
    import subprocess
    import sys
    import textwrap

    body = [_ISOLATED_PRELUDE, textwrap.dedent(prelude), "results = {}"]
    for name, code, pattern in cases:
        body.append(textwrap.dedent(f"""
            print({name!r}, file=sys.stderr, flush=True)
            try:
            {textwrap.indent(textwrap.dedent(code), '    ')}
                results[{name!r}] = ("no error", "")
            except Exception as e:  # noqa: BLE001
                msg = str(e)
                results[{name!r}] = ("ok" if re.search({pattern!r}, msg, re.S) else "wrong message",
                                     type(e).__name__ + ": " + msg[:400])
            """))
    body.append("print('@@RESULTS@@' + __import__('json').dumps(results))")
    proc = subprocess.run([sys.executable, "-c", "\n".join(body)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONFAULTHANDLER="1"))
    marker = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@RESULTS@@")]
    if proc.returncode != 0 or not marker:
        started = [ln for ln in proc.stderr.splitlines() if ln in {c[0] for c in cases}]
        last = started[-1] if started else "(before the first case)"
        raise AssertionError(f"bad-input cases: the child process died (exit code {proc.returncode}) in case "
                             f"{last!r}\n{proc.stderr[-3000:]}")
    results = json.loads(marker[-1][len("@@RESULTS@@"):])
    failed = {k: v for k, v in results.items() if v[0] != "ok"}
    if failed:
        lines = [f"  {k}: {v[0]} ({v[1]})" for k, v in failed.items()]
        raise AssertionError(f"{len(failed)} of {len(cases)} bad-input cases did not raise a matching error:\n"
                             + "\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# Double backward: every op either has a tested second derivative or refuses create_graph=True with a clear error.


def check_fake_refuses(code: str, pattern: str, prelude: str, env: dict) -> None:
    """The fake kernels (torch.compile, meta) refuse what the real ones refuse, with the same message: ``prelude``
    then ``code`` run under FakeTensorMode (every tensor they make is fake) in a copy of ``env``, and ``code`` must
    raise a RuntimeError matching ``pattern``. Pair it with :func:`check_errors_isolated` over the same table."""
    import pytest
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    env = dict(env)
    with FakeTensorMode():
        exec(prelude, env)
        made = [v for v in env.values() if isinstance(v, torch.Tensor)]
        assert made and all(isinstance(v, FakeTensor) for v in made), "the prelude's tensors must be fake"
        with pytest.raises(RuntimeError, match=pattern):
            exec(code, env)


def check_double_backward_refused(fn: Callable, args: Sequence, grad_args: Sequence[int], op_name: str) -> None:
    """``fn(*args)`` (outputs -> a scalar by a random projection), ``torch.autograd.grad(create_graph=True)``, then
    a second backward: it must raise a RuntimeError naming ``op_name`` (never return wrong numbers silently)."""
    import pytest

    args = list(_detach(args))
    for i in grad_args:
        args[i].requires_grad_(True)
    outs = [o for o in _flat(fn(*args)) if o.is_floating_point() and o.requires_grad]
    loss = sum((o.to(torch.float64) * torch.randn(o.shape, dtype=torch.float64, device=o.device)).sum()
               for o in outs)
    gs = torch.autograd.grad(loss, [args[i] for i in grad_args], create_graph=True, allow_unused=True)
    second = sum(g.to(torch.float64).pow(2).sum() for g in gs if g is not None and g.requires_grad)
    if not isinstance(second, torch.Tensor):
        return  # no gradient depends on the inputs: nothing to differentiate twice
    with pytest.raises(RuntimeError, match=f"{op_name}.*double backward|double backward.*{op_name}"):
        torch.autograd.grad(second, [args[i] for i in grad_args], allow_unused=True)
