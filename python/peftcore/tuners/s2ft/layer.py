from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from peftcore.ops.partial import partial_linear

from .._layer import FrozenLinearAdapter


class S2FTLinear(FrozenLinearAdapter):
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
        super().__init__(base_layer)
        if dim not in (0, 1):
            raise ValueError(f"S2FTLinear: dim must be 0 (rows) or 1 (columns), got {dim}")
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

    @property
    def k(self) -> int:
        return self.index.numel()

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return partial_linear(
            x, self.base_layer.weight, self.base_layer.bias, self.delta, self.index, self.dim, self.range_start
        )

    def add_to_weight(self, sign: float) -> None:
        w = self.base_layer.weight
        d = self.delta.detach().to(w.dtype)
        if self.range_start is not None:
            w.narrow(self.dim, self.range_start, self.k).add_(d, alpha=sign)
        else:
            w.index_add_(self.dim, self.index, d, alpha=sign)

    def merged_weight_is_finite(self) -> bool:
        w = self.base_layer.weight
        cur = w.detach().index_select(self.dim, self.index)
        return bool(torch.isfinite(cur + self.delta.detach().to(w.dtype)).all())

    def extra_repr(self) -> str:
        n = self.base_layer.weight.shape[self.dim]
        where = f"range=[{self.range_start}, {self.range_start + self.k})" if self.range_start is not None else "gather"
        return f"dim={self.dim}, k={self.k}/{n}, {where}, delta_dtype={self.delta.dtype}, merged={self.merged}"
