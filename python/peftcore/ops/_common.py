"""Helpers the families' fake kernels share."""
import torch


def with_last(t, last):
    """``t``'s shape with its last dim replaced."""
    return (*t.shape[:-1], last)


def same_device(op, ref, **tensors):
    """Fail (in fake / meta tracing too) when a tensor argument is not on ``ref``'s device."""
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device == ref.device, lambda: f"{op}: {name} is on {t.device} but the input is on {ref.device}")
