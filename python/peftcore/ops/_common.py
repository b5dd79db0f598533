"""Helpers the families share: fake-kernel checks and the one way every op gets its autograd formula."""
import torch


def with_last(t, last):
    """``t``'s shape with its last dim replaced."""
    return (*t.shape[:-1], last)


def same_device(op, ref, **tensors):
    """Fail (in fake / meta tracing too) when a tensor argument is not on ``ref``'s device."""
    for name, t in tensors.items():
        if t is not None:
            torch._check(t.device == ref.device, lambda: f"{op}: {name} is on {t.device} but the input is on {ref.device}")


# c10's dtype names, as the C++ kernels' messages print them (the fake kernels give the same messages)
_C10_NAMES = {torch.float32: "Float", torch.float16: "Half", torch.bfloat16: "BFloat16", torch.float64: "Double",
              torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
              torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble"}
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def dtype_name(dtype) -> str:
    """``dtype`` as c10 prints it (``Float``, ``BFloat16``, ``Long``...)."""
    return _C10_NAMES.get(dtype, str(dtype))


def check_float(op, name, t):
    """``t`` is float32, float16, bfloat16 or float64 (the families' one message for it)."""
    torch._check(t.dtype in FLOATS,
                 lambda: f"{op}: {name} must be float32, float16, bfloat16 or float64, got {dtype_name(t.dtype)}")


# Kernels peftcore registers from Python (kept alive for the life of the process).
_impl_lib = torch.library.Library("peftcore", "IMPL")
_FRONT = torch._C.DispatchKeySet(torch._C.DispatchKey.FuncTorchDynamicLayerFrontMode)


def register_autograd(opname: str, backward, setup_context) -> None:
    """``torch.library.register_autograd`` plus support for the ``torch.func`` transforms.

    Plain autograd and torch.compile use the ``register_autograd`` formula as usual. Under ``torch.func`` (grad,
    vjp, jacrev, vmap, and their compositions) PyTorch needs an ``autograd.Function`` with a ``setup_context`` and
    a vmap rule, which ``register_autograd`` does not provide: a kernel at functorch's front key routes the op
    through one built from the same ``setup_context`` / ``backward``, with a vmap rule that runs the op once per
    batch entry (correct for every op; not a batched kernel). Forward-mode AD (jvp, jacfwd) is not supported and
    raises an error naming the op.
    """
    ns, name = opname.split("::")
    op = getattr(getattr(torch.ops, ns), name).default
    torch.library.register_autograd(opname, backward, setup_context=setup_context)

    def forward(*args):
        # Reached only once every transform has been peeled off: run the op's own kernel.
        with torch._C._ExcludeDispatchKeyGuard(_FRONT), torch._C._AutoDispatchBelowAutograd():
            return op(*args)

    def vmap(info, in_dims, *args):
        # non-tensor arguments (ints, lists such as an output_mask) are never batched; their in_dims may be a list
        outs = [op(*[a.select(d, i) if isinstance(a, torch.Tensor) and isinstance(d, int) else a
                     for a, d in zip(args, in_dims)])
                for i in range(info.batch_size)]
        if isinstance(outs[0], tuple):
            return tuple(torch.stack(o) for o in zip(*outs)), tuple(0 for _ in outs[0])
        return torch.stack(outs), 0

    def jvp(ctx, *tangents):
        raise RuntimeError(f"{opname}: forward-mode AD (torch.func.jvp / jacfwd) is not supported; use reverse "
                           f"mode (torch.func.vjp / grad / jacrev)")

    fn = type(f"peftcore_{name}", (torch.autograd.Function,), dict(
        forward=staticmethod(forward), vmap=staticmethod(vmap), jvp=staticmethod(jvp),
        setup_context=staticmethod(lambda ctx, inputs, output: setup_context(ctx=ctx, inputs=inputs, output=output)),
        backward=staticmethod(lambda ctx, *grads: backward(ctx, *grads))))

    schema_args = op._schema.arguments

    def front_kernel(*args, **kwargs):
        # autograd.Function.apply takes positional arguments only: complete them from the schema's defaults.
        full = list(args)
        for a in schema_args[len(args):]:
            full.append(kwargs[a.name] if a.name in kwargs else a.default_value)
        return fn.apply(*full)

    _impl_lib.impl(name, front_kernel, "FuncTorchDynamicLayerFrontMode")


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

    register_autograd(f"peftcore::{backward_op}", backward, setup_context=setup_context)


def non_differentiable(op: str, why: str) -> None:
    """Mark every output of ``peftcore::<op>`` non-differentiable: no ``requires_grad=True`` outputs, even when the
    inputs require grad (the op's result is an index / score / mask, documented as such)."""

    def setup_context(ctx, inputs, output):
        outs = output if isinstance(output, tuple) else (output,)
        ctx.mark_non_differentiable(*[o for o in outs if isinstance(o, torch.Tensor)])

    def backward(ctx, *grads):
        raise RuntimeError(f"peftcore::{op} is not differentiable ({why})")

    register_autograd(f"peftcore::{op}", backward, setup_context=setup_context)
