from __future__ import annotations


import torch
from torch import nn

from peftcore.ops import sparse_delta as sd

from .._layer import FrozenLinearAdapter


class SparseDeltaLinear(FrozenLinearAdapter):
    """An ``nn.Linear`` with a trainable sparse delta: ``y = x @ (W + scale * S)^T + b``.

    ``base_layer`` is kept (frozen) and never copied; ``S`` is held as ``indices`` (buffer, sorted unique flat
    positions ``r * in_features + c``, int64 or int32) and ``values`` (``nn.Parameter`` [nnz], zeros at init).
    The forward calls ``peftcore.ops.sparse_delta.sparse_delta_linear``, so ``W + scale * S`` is never materialised.
    ``merge()`` adds the delta into ``base_layer.weight`` in place (the forward then is the plain base linear);
    ``unmerge()`` subtracts it again (exact in float32; rounds once more for half-precision weights).

    The delta's CSR view (``sparse_delta_csr``: row pointers and the CSC view for grad_x) is built once per change
    of ``indices`` and kept in non-persistent buffers, so a training step does not rebuild it (a sort on CUDA).
    In eager mode every forward checks that ``indices`` is unchanged (same storage and version counter) and rebuilds
    the view otherwise (an in-place change through ``.data`` is not seen by the version counter: ``set_delta``,
    ``drop_and_grow``, ``load_sparse_delta`` and ``load_state_dict`` rebuild the view themselves). Under ``torch.compile`` the
    check is skipped: call :meth:`refresh_csr` after changing ``indices`` in place by other means.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        indices: torch.Tensor,
        scale: float = 1.0,
        values_dtype: torch.dtype = torch.float32,
        validate: bool = True,
    ):
        super().__init__(base_layer)
        w = base_layer.weight
        indices = indices.to(device=w.device)
        if indices.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"SparseDeltaLinear: indices must be int32 or int64, got {indices.dtype}")
        if validate:
            sd.sparse_delta_validate(indices, self.out_features, self.in_features)
        self.register_buffer("indices", indices.contiguous())
        self.values = nn.Parameter(torch.zeros(indices.numel(), dtype=values_dtype, device=w.device))
        self.scale = float(scale)
        self._csr_key = None
        self.refresh_csr()
        self.register_load_state_dict_post_hook(lambda module, keys: module.refresh_csr())

    _CSR_NAMES = ("_csr_row_ptr", "_csr_csc_ptr", "_csr_csc_idx", "_csr_csc_perm")

    @torch.no_grad()
    def refresh_csr(self) -> None:
        """Rebuild the cached CSR view of ``indices`` (see the class doc)."""
        csr = sd.sparse_delta_csr(self.indices, self.out_features, self.in_features)
        for name, t in zip(self._CSR_NAMES, csr):
            self.register_buffer(name, t, persistent=False)
        self._csr_key = self._indices_key()

    def _indices_key(self):
        i = self.indices
        return (i.data_ptr(), i._version, i.device, i.dtype, i.numel())

    def csr(self):
        """The cached ``(row_ptr, csc_ptr, csc_idx, csc_perm)`` of ``indices`` (rebuilt first when stale, eager)."""
        if not torch.compiler.is_compiling() and self._csr_key != self._indices_key():
            self.refresh_csr()
        return tuple(getattr(self, n) for n in self._CSR_NAMES)

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        return sd.sparse_delta_linear(
            x, self.base_layer.weight, self.base_layer.bias, self.indices, self.values, self.scale, csr=self.csr()
        )

    def add_to_weight(self, sign: float) -> None:
        sd.sparse_delta_merge_(self.base_layer.weight, self.indices, self.values.detach(), sign * self.scale)

    def merged_weight_is_finite(self) -> bool:
        w = self.base_layer.weight
        return bool(torch.isfinite(sd.sparse_delta_merge(w, self.indices, self.values.detach(), self.scale)).all())

    def delta_state(self) -> dict[str, torch.Tensor]:
        """``{"indices", "values"}`` of this layer's delta (detached; values as trained, not scaled)."""
        return {"indices": self.indices.detach(), "values": self.values.detach()}

    @torch.no_grad()
    def set_delta(self, indices: torch.Tensor, values: torch.Tensor, validate: bool = True) -> None:
        """Replace the delta, keeping the ``values`` Parameter object (optimizers keep referring to it).

        Optimizer state of ``values`` is *not* touched here; ``drop_and_grow`` keeps it aligned.
        """
        if self.merged:
            raise RuntimeError("SparseDeltaLinear.set_delta: unmerge() first")
        if indices.numel() != values.numel():
            raise ValueError(
                f"SparseDeltaLinear.set_delta: indices and values differ in length, {indices.numel()} vs {values.numel()}"
            )
        dev = self.base_layer.weight.device
        indices = indices.to(device=dev, dtype=self.indices.dtype).contiguous()
        if validate:
            sd.sparse_delta_validate(indices, self.out_features, self.in_features)
        values = values.to(device=dev, dtype=self.values.dtype)
        if indices.numel() == self.indices.numel():
            self.indices.copy_(indices)
            self.values.copy_(values)
        else:
            self.indices = indices
            self.values.data = values.clone()
            self.values.grad = None
        self.refresh_csr()

    def extra_repr(self) -> str:
        numel = self.out_features * self.in_features
        return (
            f"nnz={self.nnz} ({self.nnz / numel:.4%}), scale={self.scale}, values_dtype={self.values.dtype}, "
            f"merged={self.merged}"
        )
