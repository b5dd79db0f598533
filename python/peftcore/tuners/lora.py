"""HF PEFT LoRA models on peftcore's lora ops, in one call: :func:`from_peft_lora`.

Every PEFT LoRA ``Linear`` layer of the model keeps its module, its parameters and its place in the PEFT model; only
its forward changes (the module's class becomes :class:`PeftcoreLoraLinear`, a subclass of PEFT's). So an optimizer
over the PEFT parameters keeps working, PEFT's save / load / merge stay PEFT's business, and PEFT's mixed-adapter
batch argument ``model(x, adapter_names=[...])`` works as before: PEFT's own hooks hand the names to the layers.

The forward, per layer: the layer's adapters are packed in ``lora_A``'s order (``a_packed [R, in]``, ``b_packed
[out, R]``, ``offsets``, ``scales = PEFT's scaling``), and one :func:`~peftcore.ops.lora.lora_multi_linear` call
computes the base linear and every token's adapters: with ``adapter_names``, token ``t`` of sample ``b`` uses the
sample's adapter (``"__base__"``: none); otherwise every active adapter applies to every token (``k`` = the number of
active adapters, one slot each). With gradients enabled the packing is ``torch.cat`` of PEFT's parameters (the
gradients flow back to them); without, the packed copy is cached and rebuilt only when a parameter changed (its
version counter). When the base layer's dtype differs from the adapters' (PEFT casts the input to the adapter
dtype), the base runs as the base layer and the adapters through ``lora_shrink`` / ``lora_expand``.

Refused at conversion (error naming the layer and the option): DoRA and other LoRA variants, ``lora_bias``,
``fan_in_fan_out``, merged adapters, base layers that are not ``nn.Linear``. In training mode a ``lora_dropout``
above 0 raises at the forward (the op has no dropout on the adapter input yet); eval mode ignores dropout, as PEFT.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import lora as lo

__all__ = ["MultiLoraLinear", "PeftcoreLoraLinear", "adapter_batch", "apply_multi_lora", "from_peft_lora"]


def _peft_linear():
    from peft.tuners.lora.layer import Linear

    return Linear


class _Pack:
    """The layer's adapters packed, cached by the identity and version of every parameter."""

    def __init__(self):
        self.key = None
        self.value = None


def _pack(layer, names, grad: bool):
    As = [layer.lora_A[n].weight for n in names]
    Bs = [layer.lora_B[n].weight for n in names]
    scales = [float(layer.scaling[n]) for n in names]
    if grad:
        return lo.pack_adapters(As, Bs, scales)
    key = (tuple(names), tuple((id(p), p._version) for p in As + Bs), tuple(scales))
    cache = layer.__dict__.setdefault("_peftcore_pack", _Pack())
    if cache.key != key:
        with torch.no_grad():
            cache.value = lo.pack_adapters([a.detach() for a in As], [b.detach() for b in Bs], scales)
        cache.key = key
    return cache.value


def _token_adapter(x, names, adapter_names, active, device):
    """token_adapter for x [..., in]: per sample (adapter_names, x's first dim the batch) or all active adapters."""
    lead = x.shape[:-1]
    T = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if adapter_names is not None:
        if len(lead) == 0 or lead[0] != len(adapter_names):
            raise ValueError(f"PeftcoreLoraLinear: adapter_names has {len(adapter_names)} entries but the input's batch "
                             f"dim is {lead[0] if lead else None}")
        ids = torch.tensor([names.index(a) if a in names else -1 for a in adapter_names], dtype=torch.int64)
        return _expand_to_tokens(ids, x, T).to(device)
    slots = [names.index(a) for a in active if a in names]
    return torch.tensor(slots, dtype=torch.int64).expand(T, len(slots)).contiguous().to(device)


class PeftcoreLoraLinear(nn.Module):
    """Marker base; the converted layers are instances of a subclass of PEFT's ``lora.Linear`` built at conversion
    (``type(layer)`` then derives from both), whose forward is :func:`_forward`."""


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    self._check_forward_args(x, *args, **kwargs)
    adapter_names = kwargs.pop("adapter_names", None)
    base = self.base_layer
    names = list(self.lora_A.keys())
    if self.disable_adapters or self.merged or not names:
        if self.disable_adapters and self.merged:
            self.unmerge()
        return base(x, *args, **kwargs)
    if self.training:
        for n in names:
            p = getattr(self.lora_dropout[n], "p", 0.0)
            if p > 0:
                raise NotImplementedError(f"PeftcoreLoraLinear: adapter {n!r} has lora_dropout={p} in training mode; "
                                          "peftcore's lora_multi_linear has no dropout on the adapter input yet "
                                          "(set lora_dropout=0 or train with PEFT's own forward)")
    active = [a for a in self.active_adapters if a in names]
    if adapter_names is None and not active:
        return base(x, *args, **kwargs)
    grad = torch.is_grad_enabled() and any(self.lora_A[n].weight.requires_grad or self.lora_B[n].weight.requires_grad
                                           for n in names)
    a, b, off, sc = _pack(self, names, grad)
    ta = _token_adapter(x, names, adapter_names, active, x.device)
    shape = x.shape
    if a.dtype == base.weight.dtype == x.dtype and not args and not kwargs:
        y = lo.lora_multi_linear(x.reshape(-1, shape[-1]), base.weight, base.bias, a, b, off, sc, ta)
        return y.reshape(*shape[:-1], y.shape[-1])
    result = base(x, *args, **kwargs)
    xa = x.reshape(-1, shape[-1]).to(a.dtype)
    h = lo.lora_shrink(xa, a, off, ta)
    delta = lo.lora_expand(h, b, off, sc, ta, None, b.shape[0])
    return result + delta.reshape(*shape[:-1], -1).to(result.dtype)


_CLASSES: dict = {}


def _converted_class(cls):
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Peftcore{cls.__name__}", (cls, PeftcoreLoraLinear), {"forward": _forward})
    return _CLASSES[cls]


def from_peft_lora(peft_model: nn.Module, check: bool = True) -> nn.Module:
    """Run every LoRA ``Linear`` layer of a HF PEFT model on :func:`~peftcore.ops.lora.lora_multi_linear`, in place;
    returns ``peft_model``. All checks run before any layer changes (see the module docstring for what is refused)."""
    Linear = _peft_linear()
    layers = [(n, m) for n, m in peft_model.named_modules() if isinstance(m, Linear)
              and not isinstance(m, PeftcoreLoraLinear)]
    if not layers:
        raise ValueError("from_peft_lora: no PEFT LoRA Linear layer found")
    if check:
        for name, m in layers:
            if type(m) is not Linear:
                raise NotImplementedError(f"from_peft_lora: {name!r} is a {type(m).__name__}, not PEFT's lora.Linear")
            if not isinstance(m.get_base_layer(), nn.Linear):
                raise NotImplementedError(f"from_peft_lora: {name!r}: base layer {type(m.get_base_layer()).__name__} "
                                          "is not nn.Linear")
            if m.merged:
                raise NotImplementedError(f"from_peft_lora: {name!r} has merged adapters {m.merged_adapters}; "
                                          "unmerge first")
            if getattr(m, "fan_in_fan_out", False):
                raise NotImplementedError(f"from_peft_lora: {name!r} has fan_in_fan_out=True")
            if getattr(m, "lora_variant", None):
                raise NotImplementedError(f"from_peft_lora: {name!r} uses LoRA variants "
                                          f"{sorted(m.lora_variant)} (DoRA, aLoRA...): not converted")
            if any(getattr(m, "lora_bias", {}).get(a, False) for a in m.lora_A.keys()):
                raise NotImplementedError(f"from_peft_lora: {name!r} has lora_bias=True")
    for _, m in layers:
        m.__class__ = _converted_class(type(m))
    return peft_model


# ---------------------------------------------------------------------------------------------------------------
# peftcore's own multi-adapter layer (no PEFT needed).


class MultiLoraLinear(nn.Module):
    """N LoRA adapters of any ranks over one frozen ``nn.Linear``, packed (``a_packed [R, in]``, ``b_packed
    [out, R]``, trainable; ``offsets``, ``scales`` buffers): ``y = base(x) + Σ_slots w · s_i · (x A_iᵀ) B_iᵀ`` through
    one :func:`~peftcore.ops.lora.lora_multi_linear` call.

    Which adapter each token uses comes from :func:`adapter_batch` (per sample, per token, or several slots with
    gate weights); outside it, ``default`` (an adapter index, or ``None`` for the base layer alone). A fresh adapter
    is PEFT's initialisation: ``A`` Kaiming-uniform, ``B`` zero (the layer starts as the base layer);
    ``scales = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``).
    """

    def __init__(self, base: nn.Linear, ranks, alphas=None, names=None, use_rslora: bool = False,
                 default: Optional[int] = None, gate_top_k: int = 0):
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"MultiLoraLinear: base must be nn.Linear, got {type(base).__name__}")
        ranks = [int(r) for r in ranks]
        if not ranks or min(ranks) < 0:
            raise ValueError(f"MultiLoraLinear: ranks must be a non-empty list of ranks >= 0, got {ranks}")
        alphas = [float(a) for a in (alphas if alphas is not None else ranks)]
        names = list(names) if names is not None else [str(i) for i in range(len(ranks))]
        if not (len(alphas) == len(names) == len(ranks)) or len(set(names)) != len(names):
            raise ValueError(f"MultiLoraLinear: {len(ranks)} ranks, {len(alphas)} alphas and names {names} must match "
                             "and names be unique")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.names = names
        dev, dt = base.weight.device, base.weight.dtype
        As, Bs = [], []
        for r in ranks:
            a = torch.empty(r, base.in_features, device=dev, dtype=dt)
            nn.init.kaiming_uniform_(a, a=5 ** 0.5)
            As.append(a)
            Bs.append(torch.zeros(base.out_features, r, device=dev, dtype=dt))
        scales = [(al / r ** 0.5 if use_rslora else al / r) if r else 0.0 for al, r in zip(alphas, ranks)]
        a, b, off, sc = lo.pack_adapters(As, Bs, scales)
        self.a_packed = nn.Parameter(a)
        self.b_packed = nn.Parameter(b)
        self.register_buffer("offsets", off)
        self.register_buffer("scales", sc)
        self.default = default
        self._batch = None  # (token_adapter, token_weight) set by adapter_batch
        # MeteoRA: a trainable gate (in -> N logits) picks each token's top-k adapters, weighted by the softmax of
        # their logits; gradients reach the gate through token_weight. Used when gate_top_k > 0 and no adapter_batch.
        self.gate_top_k = int(gate_top_k)
        if self.gate_top_k:
            if not 1 <= self.gate_top_k <= len(ranks):
                raise ValueError(f"MultiLoraLinear: gate_top_k must be in [1, {len(ranks)}], got {gate_top_k}")
            self.gate = nn.Linear(base.in_features, len(ranks), bias=False, device=dev, dtype=dt)

    def adapter(self, i):
        """``(A_i, B_i)`` views of adapter ``i`` (index or name) in the packed parameters."""
        i = self.names.index(i) if isinstance(i, str) else int(i)
        o0, o1 = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.a_packed[o0:o1], self.b_packed[:, o0:o1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if self._batch is not None:
            ta, tw = self._batch
            ta = _expand_to_tokens(ta, x, T)
            tw = _expand_to_tokens(tw, x, T) if tw is not None else None
        elif self.gate_top_k:
            logits = self.gate(x.reshape(-1, x.shape[-1]))
            top, ta = logits.topk(self.gate_top_k, dim=-1)
            tw = torch.softmax(top, dim=-1)
        elif self.default is not None:
            ta, tw = torch.full((T,), int(self.default), dtype=torch.int64, device=x.device), None
        else:
            return self.base_layer(x)
        shape = x.shape
        y = lo.lora_multi_linear(x.reshape(-1, shape[-1]), self.base_layer.weight, self.base_layer.bias,
                                 self.a_packed, self.b_packed, self.offsets, self.scales, ta, tw)
        return y.reshape(*shape[:-1], y.shape[-1])


def _expand_to_tokens(t, x, T):
    """Per-sample [B] / [B, k] assignments (x's first dim the batch) repeated over each sample's tokens; per-token
    [T] / [T, k] ones as they are."""
    if t.shape[0] == T:
        return t
    B = x.shape[0] if x.dim() > 1 else 1
    if t.shape[0] != B or T % max(B, 1):
        raise ValueError(f"MultiLoraLinear: the adapter assignment has {t.shape[0]} rows; expected the batch size {B} "
                         f"or the token count {T}")
    return t.repeat_interleave(T // B, 0)


def apply_multi_lora(model: nn.Module, target_modules, ranks, alphas=None, names=None, use_rslora=False,
                     gate_top_k: int = 0):
    """Replace every ``nn.Linear`` whose name ends with one of ``target_modules`` by a :class:`MultiLoraLinear` with
    these adapters (in place; ``gate_top_k > 0`` adds a MeteoRA gate to each); returns the model."""
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and any(n == t or n.endswith("." + t) for t in targets)]
    if not found:
        raise ValueError(f"apply_multi_lora: no nn.Linear named {targets} in the model")
    for name, m in found:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], MultiLoraLinear(m, ranks, alphas, names, use_rslora,
                                                                 gate_top_k=gate_top_k))
    return model


class adapter_batch:
    """Context manager: within it, every :class:`MultiLoraLinear` of ``model`` uses these adapters.

    ``adapters``: per sample (a list of names / indices, ``None`` or ``-1`` for the base layer; or an int64 tensor
    ``[B]`` / ``[B, k]``), or per token (``[T]`` / ``[T, k]``); ``weights`` the matching gate weights (MeteoRA)."""

    def __init__(self, model: nn.Module, adapters, weights=None):
        self.layers = [m for m in model.modules() if isinstance(m, MultiLoraLinear)]
        if not self.layers:
            raise ValueError("adapter_batch: the model has no MultiLoraLinear layer")
        self.adapters, self.weights = adapters, weights

    def __enter__(self):
        for m in self.layers:
            ta = self.adapters
            if not isinstance(ta, torch.Tensor):
                ta = torch.tensor([-1 if a is None else (m.names.index(a) if isinstance(a, str) else int(a))
                                   for a in ta], dtype=torch.int64)
            m._batch = (ta.to(m.a_packed.device), self.weights)
        return self

    def __exit__(self, *exc):
        for m in self.layers:
            m._batch = None
        return False
