"""The shared test helper bites: each check fails on a deliberately wrong op (a planted bug)."""
import pytest
import torch

from peftcore.testing import OpCase, Sample, assert_close_to_reference, check_nonfinite, check_repeatable


def _samples(device, dtype, requires_grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, generator=g, dtype=dtype).to(device).requires_grad_(requires_grad)
    w = torch.randn(6, 8, generator=g, dtype=dtype).to(device).requires_grad_(requires_grad)
    yield Sample((x, w), {}, "5x8x6")


def _ref(x, w):
    return x @ w.t()


def _case(op, **kw):
    return OpCase("planted", op, _samples, _ref, (torch.float32,), grad_args=(0, 1), **kw)


def test_nonfinite_accepts_the_reference_itself():
    check_nonfinite(_case(_ref), "cpu")


@pytest.mark.parametrize("bug", ["drops_nan", "skips_zero_weight", "inf_to_max"])
def test_nonfinite_catches(bug):
    def op(x, w):
        y = x @ w.t()
        if bug == "drops_nan":  # a NaN-unaware max / blend on the vector path
            return torch.nan_to_num(y, nan=0.0)
        if bug == "skips_zero_weight":  # a kernel that skips a zero (or small) product
            return torch.where(x.isnan().any(-1, keepdim=True), torch.zeros_like(y), y)
        return torch.nan_to_num(y, nan=float("nan"), posinf=3e38, neginf=-3e38)

    with pytest.raises(AssertionError, match="planted"):
        check_nonfinite(_case(op), "cpu")


def test_repeatable_catches_a_racy_op():
    calls = []

    def op(x, w):
        calls.append(1)
        return x @ w.t() + (len(calls) % 2) * 1e-7  # a result that depends on the call (thread timing)

    with pytest.raises(AssertionError, match="differs between two identical calls"):
        check_repeatable(_case(op), "cpu")


def test_per_element_bound_catches_a_zero_output_in_bf16():
    ref = torch.randn(64, dtype=torch.float64)
    assert_close_to_reference(ref.to(torch.bfloat16), ref, ref.to(torch.bfloat16), torch.bfloat16, "rounded")
    with pytest.raises(AssertionError, match="exceed their bound"):
        assert_close_to_reference(torch.zeros(64, dtype=torch.bfloat16), ref, ref.to(torch.bfloat16),
                                  torch.bfloat16, "zeros")
