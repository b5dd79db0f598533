from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .._config import TunerConfigMixin, dtype_name

POOLINGS = ("avg", "max", "min")
METHODS = ("threshold", "top_k", "keep_ratio")
MODES = ("distill", "sparse", "dense")
INITS = ("identity", "normal")


@dataclass
class SeerAttnConfig(TunerConfigMixin):
    """Configuration of a SeerAttention gate per decoder layer (learned block-sparse attention).

    Args:
        block_size: tokens per block, for the gate's pooling and for ``block_sparse_attn`` (default 64).
        gate_hidden_dim: width of the gate's per-head projections (``None``: the model's head_dim). Must be even
            (block-level RoPE).
        q_pooling: how each query block is pooled over its tokens before projection; several are concatenated
            along the channels. SeerAttention's default: ``["avg"]``.
        k_pooling: same for key blocks. SeerAttention's default: ``["max", "min", "avg"]``.
        method: how the gate's scores become a block mask: ``"threshold"`` (keep ``score >= threshold``),
            ``"top_k"`` (the ``top_k`` best visible blocks per query block) or ``"keep_ratio"``
            (``ceil(keep_ratio * visible blocks)`` per query block). Forced blocks (the diagonal when causal,
            the first block with ``keep_first_block``) count toward ``top_k`` / ``keep_ratio`` and are added to
            a threshold's choice.
        threshold / top_k / keep_ratio: the parameter of ``method``.
        keep_first_block: also always keep key block 0 (an attention "sink").
        causal: block-level causal masking of the gate and causal attention (must be True for decoder LMs).
        layers_to_transform: decoder-layer indices that get a gate (``None``: all) ...
        dense_layers: ... except the first ``dense_layers`` ones, which stay dense (original attention).
        mode: ``"distill"`` (attention stays dense; the gate's distillation loss is recorded), ``"sparse"``
            (attention uses the gate's block mask) or ``"dense"`` (no gate at all; dense causal
            ``block_sparse_attn``). ``set_seer_mode`` switches later.
        gate_init: ``"identity"`` (the projections start as the identity on the avg-pooled channels, so the
            untrained gate scores avg(q)·avg(k) with block RoPE; other weights zero) or ``"normal"``
            (N(0, 1/fan_in), as SeerAttention's random init but fan-in scaled).
        gate_rope_theta: RoPE base of the gate's block-level rotary embedding (``None``: the model's).
        loss_skip_fraction: the first ``floor(fraction * Qb)`` query blocks are left out of the distillation
            loss (SeerAttention leaves out the first quarter, 0.25, "for training stability"). Default 0.
        gate_dtype: dtype of the gate's weights and arithmetic (float32).
    """

    block_size: int = 64
    gate_hidden_dim: Optional[int] = None
    q_pooling: list[str] = field(default_factory=lambda: ["avg"])
    k_pooling: list[str] = field(default_factory=lambda: ["max", "min", "avg"])
    method: str = "threshold"
    threshold: Optional[float] = 5e-3
    top_k: Optional[int] = None
    keep_ratio: Optional[float] = None
    keep_first_block: bool = False
    causal: bool = True
    layers_to_transform: Optional[list[int]] = None
    dense_layers: int = 0
    mode: str = "distill"
    gate_init: str = "identity"
    gate_rope_theta: Optional[float] = None
    loss_skip_fraction: float = 0.0
    gate_dtype: Union[str, torch.dtype] = "float32"
    peft_type: str = field(default="SEER_ATTN", init=False)

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"SeerAttnConfig: block_size must be >= 1, got {self.block_size}")
        if self.gate_hidden_dim is not None and (self.gate_hidden_dim < 2 or self.gate_hidden_dim % 2):
            raise ValueError(f"SeerAttnConfig: gate_hidden_dim must be even and >= 2, got {self.gate_hidden_dim}")
        self.q_pooling, self.k_pooling = list(self.q_pooling), list(self.k_pooling)
        for name in ("q_pooling", "k_pooling"):
            v = getattr(self, name)
            if not v or any(p not in POOLINGS for p in v) or len(set(v)) != len(v):
                raise ValueError(f"SeerAttnConfig: {name} must be distinct names from {POOLINGS}, got {v!r}")
        check_selection("SeerAttnConfig", self.method, self.threshold, self.top_k, self.keep_ratio)
        if self.mode not in MODES:
            raise ValueError(f"SeerAttnConfig: mode must be one of {MODES}, got {self.mode!r}")
        if self.gate_init not in INITS:
            raise ValueError(f"SeerAttnConfig: gate_init must be one of {INITS}, got {self.gate_init!r}")
        if not 0.0 <= self.loss_skip_fraction < 1.0:
            raise ValueError(f"SeerAttnConfig: loss_skip_fraction must be in [0, 1), got {self.loss_skip_fraction}")
        if self.dense_layers < 0:
            raise ValueError(f"SeerAttnConfig: dense_layers must be >= 0, got {self.dense_layers}")
        if self.layers_to_transform is not None:
            self.layers_to_transform = sorted(int(i) for i in self.layers_to_transform)
        self.gate_dtype = dtype_name("SeerAttnConfig", self.gate_dtype, floating=True)

    @property
    def torch_gate_dtype(self) -> torch.dtype:
        return getattr(torch, self.gate_dtype)

    def uses_layer(self, i: int) -> bool:
        """Whether decoder layer ``i`` gets a gate."""
        if i < self.dense_layers:
            return False
        return self.layers_to_transform is None or i in self.layers_to_transform


def check_selection(owner: str, method: str, threshold, top_k, keep_ratio) -> None:
    if method not in METHODS:
        raise ValueError(f"{owner}: method must be one of {METHODS}, got {method!r}")
    if method == "threshold" and (threshold is None or threshold < 0):
        raise ValueError(f"{owner}: method='threshold' needs threshold >= 0, got {threshold}")
    if method == "top_k" and (top_k is None or top_k < 1):
        raise ValueError(f"{owner}: method='top_k' needs top_k >= 1, got {top_k}")
    if method == "keep_ratio" and (keep_ratio is None or not 0.0 < keep_ratio <= 1.0):
        raise ValueError(f"{owner}: method='keep_ratio' needs keep_ratio in (0, 1], got {keep_ratio}")
