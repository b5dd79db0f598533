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


def refuse_double_backward(backward_op: str, forward_op: str) -> None:
    """Give ``peftcore::<backward_op>`` an autograd formula that refuses to be differentiated.

    Without one, ``create_graph=True`` through ``forward_op`` would fall through PyTorch's warn-only autograd
    fallback and give silently wrong second derivatives. First derivatives with ``create_graph=True`` still work;
    differentiating them again raises a RuntimeError naming both ops.
    """

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(
            f"peftcore::{forward_op}: double backward is not supported (its backward op peftcore::{backward_op} "
            f"has no derivative); differentiate through {forward_op} only once, or use a plain-torch reference "
            f"for higher-order gradients")

    torch.library.register_autograd(f"peftcore::{backward_op}", backward, setup_context=setup_context)


def non_differentiable(op: str, why: str) -> None:
    """Mark every output of ``peftcore::<op>`` non-differentiable: no ``requires_grad=True`` outputs, even when the
    inputs require grad (the op's result is an index / score / mask, documented as such)."""

    def setup_context(ctx, inputs, output):
        outs = output if isinstance(output, tuple) else (output,)
        ctx.mark_non_differentiable(*[o for o in outs if isinstance(o, torch.Tensor)])

    def backward(ctx, *grads):
        raise RuntimeError(f"peftcore::{op} is not differentiable ({why})")

    torch.library.register_autograd(f"peftcore::{op}", backward, setup_context=setup_context)
