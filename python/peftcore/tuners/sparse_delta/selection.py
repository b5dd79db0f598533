"""Choosing which entries of a weight get a trainable delta, and capturing what the gradient choice needs."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from peftcore.ops import sparse_delta as sd


def random_indices(
    out_features: int, in_features: int, k: int, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """``k`` flat positions drawn uniformly without replacement, sorted ascending (int64, on CPU)."""
    numel = out_features * in_features
    if not 0 < k <= numel:
        raise ValueError(f"random_indices: k must be in [1, {numel}], got {k}")
    return torch.randperm(numel, generator=generator)[:k].sort().values


@torch.no_grad()
def magnitude_indices(weight: torch.Tensor, k: int) -> torch.Tensor:
    """SaRA's choice: the ``k`` flat positions of smallest ``|w|``, sorted ascending (int64, on weight's device).

    One temporary ``|w|`` (weight's dtype and size) lives for the duration of the call; nothing else is kept.
    """
    numel = weight.numel()
    if not 0 < k <= numel:
        raise ValueError(f"magnitude_indices: k must be in [1, {numel}], got {k}")
    idx = torch.topk(weight.detach().abs().flatten(), k, largest=False, sorted=False).indices
    return idx.sort().values


@torch.no_grad()
def gradient_indices(
    grad_out: torch.Tensor, x: torch.Tensor, k: int, exclude: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """LT-SFT / SpIEL-AG's choice: the ``k`` positions of largest ``|grad_out^T @ x|`` (= ``|dL/dW|``) not in
    ``exclude``, sorted ascending (int64). Computed tile by tile by ``sparse_delta_topk_grad``, never dense."""
    idx, _ = sd.sparse_delta_topk_grad(grad_out, x, k, exclude)
    return idx


class ActivationCapture:
    """Context manager: records each module's input ``x`` and output gradient ``grad_out`` as [tokens, features].

    A forward hook saves the input and hangs a tensor hook on the output that saves its gradient, so the pairs
    come from the same forward; forwards without autograd (``no_grad``, or whose output needs no grad) are
    skipped, as are forwards whose backward never runs. Batches are *concatenated* along tokens:
    ``sum_b g_b^T x_b == cat(g)^T cat(x)``, so the op on the concatenation scores the gradient accumulated
    over all captured batches exactly. At most ``max_tokens`` tokens per module are kept (later batches are
    dropped with a warning) to bound memory at ``max_tokens * (in + out)`` elements per module.
    """

    def __init__(self, modules: dict[str, nn.Module], max_tokens: Optional[int] = None):
        self.modules = dict(modules)
        self.max_tokens = max_tokens
        self._slots: dict[str, list[list]] = {n: [] for n in self.modules}
        self._tokens: dict[str, int] = {n: 0 for n in self.modules}
        self._handles = []
        self._warned = False

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            x = inputs[0].detach()
            x = x.reshape(-1, x.shape[-1])
            if self.max_tokens is not None and self._tokens[name] + x.shape[0] > self.max_tokens:
                if not self._warned:
                    warnings.warn(f"ActivationCapture: max_tokens={self.max_tokens} reached; later batches ignored")
                    self._warned = True
                return
            self._tokens[name] += x.shape[0]
            slot = [x, None]
            self._slots[name].append(slot)

            def grad_hook(g):
                slot[1] = g.detach().reshape(-1, g.shape[-1])

            output.register_hook(grad_hook)

        return hook

    def __enter__(self) -> "ActivationCapture":
        for name, m in self.modules.items():
            self._handles.append(m.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def clear(self) -> None:
        for n in self._slots:
            self._slots[n].clear()
            self._tokens[n] = 0

    def has(self, name: str) -> bool:
        return any(s[1] is not None for s in self._slots.get(name, ()))

    def get(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(grad_out [T, out], x [T, in])`` over the captured forward/backward pairs of module ``name``."""
        pairs = [s for s in self._slots.get(name, ()) if s[1] is not None]
        if not pairs:
            raise RuntimeError(f"ActivationCapture: no forward+backward captured for {name!r}")
        g = torch.cat([s[1] for s in pairs]) if len(pairs) > 1 else pairs[0][1]
        x = torch.cat([s[0] for s in pairs]) if len(pairs) > 1 else pairs[0][0]
        if g.dtype != x.dtype:  # e.g. under autocast; score in float32
            g, x = g.float(), x.float()
        return g, x
