from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from peftcore.ops.partial import partial_linear


class S2FTLinear(nn.Module):
    """An ``nn.Linear`` whose selected rows (``dim=0``) or columns (``dim=1``) train:
    ``W_eff = W`` except ``W_eff[index, :] = W[index, :] + delta`` (dim 0, ``delta`` [k, in]) or
    ``W_eff[:, index] = W[:, index] + delta`` (dim 1, ``delta`` [out, k]).

    ``base_layer`` is kept frozen and never copied; ``delta`` is an ``nn.Parameter`` (zeros at init) and ``index``
    a buffer (int64, sorted unique) in the coordinates of the weight as it is now (co-permuted by ``apply_s2ft``).
    ``range_start=a`` says ``index`` is the contiguous range ``[a, a+k)``: the op then slices instead of gathering.
    ``orig_index`` (buffer) is ``index`` in the model's original (un-permuted) order, what save/load use.
    The forward calls ``peftcore.ops.partial.partial_linear``. ``merge()`` adds the delta into ``base_layer.weight``
    in place (the forward then is the plain base linear); ``unmerge()`` subtracts it again.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        index: torch.Tensor,
        dim: int,
        range_start: Optional[int] = None,
        orig_index: Optional[torch.Tensor] = None,
        delta_dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"S2FTLinear: base_layer must be nn.Linear, got {type(base_layer).__name__}")
        if dim not in (0, 1):
            raise ValueError(f"S2FTLinear: dim must be 0 (rows) or 1 (columns), got {dim}")
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        w = base_layer.weight
        index = torch.as_tensor(index).to(device=w.device)
        if index.dtype != torch.int64 or index.dim() != 1 or index.numel() == 0:
            raise ValueError(f"S2FTLinear: index must be a non-empty 1-D int64 tensor, got {index.dtype} {tuple(index.shape)}")
        n = w.shape[dim]
        idx_cpu = index.cpu()
        if int(idx_cpu.min()) < 0 or int(idx_cpu.max()) >= n or not bool((idx_cpu[1:] > idx_cpu[:-1]).all()):
            raise ValueError(f"S2FTLinear: index must be sorted unique in [0, {n}) along dim {dim}")
        k = index.numel()
        if range_start is not None:
            range_start = int(range_start)
            if not torch.equal(idx_cpu, torch.arange(range_start, range_start + k)):
                raise ValueError(f"S2FTLinear: range_start={range_start} but index is not [{range_start}, {range_start + k})")
        orig_index = index if orig_index is None else torch.as_tensor(orig_index).to(device=w.device, dtype=torch.int64)
        if orig_index.shape != index.shape:
            raise ValueError(f"S2FTLinear: orig_index has shape {tuple(orig_index.shape)}, index {tuple(index.shape)}")
        self.register_buffer("index", index.contiguous())
        self.register_buffer("orig_index", orig_index.contiguous())
        self.dim = dim
        self.range_start = range_start
        shape = (k, w.shape[1]) if dim == 0 else (w.shape[0], k)
        self.delta = nn.Parameter(torch.zeros(shape, dtype=delta_dtype, device=w.device))
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base_layer.bias

    @property
    def k(self) -> int:
        return self.index.numel()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        return partial_linear(
            x, self.base_layer.weight, self.base_layer.bias, self.delta, self.index, self.dim, self.range_start
        )

    def get_base_layer(self) -> nn.Linear:
        return self.base_layer

    @torch.no_grad()
    def _add_delta(self, sign: float) -> None:
        w = self.base_layer.weight
        d = self.delta.detach().to(w.dtype)
        if self.range_start is not None:
            w.narrow(self.dim, self.range_start, self.k).add_(d, alpha=sign)
        else:
            w.index_add_(self.dim, self.index, d, alpha=sign)

    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        """``W[selection] += delta`` in place. ``safe_merge`` first checks the merged slice is finite. The keyword
        arguments match PEFT's tuner layers."""
        if self.merged:
            warnings.warn("S2FTLinear.merge: already merged; nothing done")
            return
        if safe_merge:
            w = self.base_layer.weight
            cur = w.detach().index_select(self.dim, self.index)
            if not torch.isfinite(cur + self.delta.detach().to(w.dtype)).all():
                raise ValueError("S2FTLinear.merge: the merged weight has NaN/inf; not merged")
        self._add_delta(1.0)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("S2FTLinear.unmerge: not merged; nothing done")
            return
        self._add_delta(-1.0)
        self.merged = False

    def extra_repr(self) -> str:
        n = self.base_layer.weight.shape[self.dim]
        where = f"range=[{self.range_start}, {self.range_start + self.k})" if self.range_start is not None else "gather"
        return f"dim={self.dim}, k={self.k}/{n}, {where}, delta_dtype={self.delta.dtype}, merged={self.merged}"
