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

import json
import re
import warnings
from dataclasses import dataclass, field
from typing import ClassVar, Iterator, Optional, Union

import torch
from torch import nn

from ..ops import lora as lo
from ._config import TunerConfigMixin
from ._layer import compute_dtype
from ._model import find_linear_targets, layers_of, replace_module, unload_layers

__all__ = ["LoraConfig", "MultiLoraLinear", "PeftcoreLoraLinear", "adapter_batch", "apply_lora", "apply_multi_lora",
           "from_peft_lora", "lora_layers"]

CONFIG_ATTR = "peftcore_lora_config"
FORMAT = "peftcore.lora/1"
BASE = "__base__"  # as a default_adapter / in adapter_batch: no adapter (PEFT's name for the base model in a batch)


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
        self.merged = False
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

    # -- the base layer's surface (as FrozenLinearAdapter's), so code reading in_features / weight keeps working
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
    def bias(self):
        return self.base_layer.bias

    def get_base_layer(self) -> nn.Linear:
        return self.base_layer

    @property
    def ranks(self) -> list[int]:
        off = self.offsets.tolist()
        return [b - a for a, b in zip(off, off[1:])]

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable parameters by name: ``a_packed``, ``b_packed`` and, with a gate, ``gate.weight``."""
        return {n: p for n, p in self.named_parameters() if not n.startswith("base_layer.")}

    def _merge_check(self, what: str) -> int:
        if self.gate_top_k:
            raise ValueError(f"MultiLoraLinear.{what}: the MeteoRA gate picks adapters per token; a gated layer "
                             "cannot be merged into one weight")
        if self.default is None:
            raise ValueError(f"MultiLoraLinear.{what}: no default adapter (adapters {self.names} are chosen per "
                             "request through adapter_batch); nothing to merge: set default_adapter")
        return int(self.default)

    def delta_weight(self, i, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """``scale_i · B_i A_i`` as a dense ``[out, in]`` matrix (in ``dtype``, default float32 for half types)."""
        a, b = self.adapter(i)
        i = self.names.index(i) if isinstance(i, str) else int(i)
        dtype = dtype or compute_dtype(a)
        return float(self.scales[i]) * (b.detach().to(dtype) @ a.detach().to(dtype))

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        """Add the default adapter's delta into ``base_layer.weight`` in place; the forward then is the plain base
        linear (and :class:`adapter_batch` refuses the layer until :meth:`unmerge`). Refused for a gated layer or
        one without a default adapter."""
        i = self._merge_check("merge")
        if self.merged:
            warnings.warn("MultiLoraLinear.merge: already merged; nothing done")
            return
        w = self.base_layer.weight
        dtype = compute_dtype(w, self.a_packed)
        merged = w.to(dtype) + self.delta_weight(i, dtype)
        if safe_merge and not bool(torch.isfinite(merged).all()):
            raise ValueError("MultiLoraLinear.merge: the merged weight has NaN/inf; not merged")
        w.copy_(merged.to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the default adapter's delta again (exact up to rounding)."""
        if not self.merged:
            warnings.warn("MultiLoraLinear.unmerge: not merged; nothing done")
            return
        i = self._merge_check("unmerge")
        w = self.base_layer.weight
        dtype = compute_dtype(w, self.a_packed)
        w.copy_((w.to(dtype) - self.delta_weight(i, dtype)).to(w.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if self.merged:
            if self._batch is not None:
                raise RuntimeError("MultiLoraLinear: merged; unmerge before choosing adapters with adapter_batch")
            return self.base_layer(x)
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


@dataclass
class LoraConfig(TunerConfigMixin):
    r"""LoRA on the targeted ``nn.Linear`` modules, one or several named adapters per layer
    (:class:`MultiLoraLinear`: packed, ranks free per adapter, all in one ``lora_multi_linear`` call).

    Args:
        target_modules / exclude_modules: which ``nn.Linear`` modules, PEFT's rules (names, ``.suffix``, regex).
        adapter_names: the adapters every layer holds (default one, ``["default"]``).
        r: the rank, or one rank per adapter.
        lora_alpha: the alpha, or one per adapter; each adapter's scale is ``alpha / r`` (``alpha / sqrt(r)`` with
            ``use_rslora``).
        rank_pattern / alpha_pattern: per-module overrides of ``r`` / ``lora_alpha`` as in PEFT: a key matches the
            module names it ``fullmatch``es as ``(.*\.)?key`` (a name, a suffix or a regex); the first key that
            matches wins.
        use_rslora: rsLoRA's scale.
        default_adapter: the adapter every token uses outside :class:`adapter_batch` (and the one ``merge``
            folds into the weight). ``None``: the only adapter when there is one, else none; ``"__base__"``: none
            (the base layer alone outside ``adapter_batch``, for serving where each request names its adapter).
        gate_top_k: > 0 adds a trainable MeteoRA gate per layer (``in -> len(adapter_names)`` logits) that picks
            each token's top-k adapters outside ``adapter_batch`` (such a layer cannot merge).
    """

    PEFT_TYPE: ClassVar[str] = "LORA"
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    adapter_names: list[str] = field(default_factory=lambda: ["default"])
    r: Union[int, list[int]] = 8
    lora_alpha: Union[float, list[float]] = 8.0
    rank_pattern: dict[str, Union[int, list[int]]] = field(default_factory=dict)
    alpha_pattern: dict[str, Union[float, list[float]]] = field(default_factory=dict)
    use_rslora: bool = False
    default_adapter: Optional[str] = None
    gate_top_k: int = 0
    peft_type: str = field(default="LORA", init=False)

    def __post_init__(self):
        self.adapter_names = [str(n) for n in self.adapter_names]
        n = len(self.adapter_names)
        if not n or len(set(self.adapter_names)) != n or BASE in self.adapter_names:
            raise ValueError(f"LoraConfig: adapter_names must be unique names (not {BASE!r}), got {self.adapter_names}")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        self.rank_pattern, self.alpha_pattern = dict(self.rank_pattern), dict(self.alpha_pattern)
        for what, v in [("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            self._per_adapter(what, v, int)
        for what, v in [("lora_alpha", self.lora_alpha),
                        *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())]:
            self._per_adapter(what, v, float)
        if self.default_adapter is not None and self.default_adapter not in (*self.adapter_names, BASE):
            raise ValueError(f"LoraConfig: default_adapter {self.default_adapter!r} is not one of "
                             f"{self.adapter_names} (or {BASE!r})")
        if not 0 <= self.gate_top_k <= n:
            raise ValueError(f"LoraConfig: gate_top_k must be in [0, {n}], got {self.gate_top_k}")

    def _per_adapter(self, what: str, v, kind) -> list:
        vals = list(v) if isinstance(v, (list, tuple)) else [v] * len(self.adapter_names)
        if len(vals) != len(self.adapter_names):
            raise ValueError(f"LoraConfig: {what} has {len(vals)} entries for {len(self.adapter_names)} adapters")
        if kind is int and any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in vals):
            raise ValueError(f"LoraConfig: {what} must be ranks >= 0, got {v!r}")
        return [kind(x) for x in vals]

    def _pattern(self, pattern: dict, name: str):
        for key, v in pattern.items():
            if re.fullmatch(rf"(.*\.)?{key}", name):
                return v
        return None

    def ranks_for(self, name: str) -> list[int]:
        """The ranks of the module called ``name``, one per adapter."""
        v = self._pattern(self.rank_pattern, name)
        return self._per_adapter("r", self.r if v is None else v, int)

    def alphas_for(self, name: str) -> list[float]:
        v = self._pattern(self.alpha_pattern, name)
        return self._per_adapter("lora_alpha", self.lora_alpha if v is None else v, float)

    def default_index(self) -> Optional[int]:
        if self.default_adapter == BASE:
            return None
        if self.default_adapter is None:
            return 0 if len(self.adapter_names) == 1 else None
        return self.adapter_names.index(self.default_adapter)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, MultiLoraLinear]]:
    """``(name, layer)`` for every :class:`MultiLoraLinear` of ``model``, in module order."""
    return layers_of(model, MultiLoraLinear)


def apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Alias of ``peftcore.apply_adapter(model, config)``; what it does is :func:`_apply_lora`'s."""
    from .api import apply_adapter

    return apply_adapter(model, config)


def _apply_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Replace every targeted ``nn.Linear`` of ``model`` by a :class:`MultiLoraLinear` holding the config's adapters
    (ranks / alphas per module from ``rank_pattern`` / ``alpha_pattern``), in place; freeze every other parameter
    (only the adapters, and the gates, train); return ``model``."""
    targets = find_linear_targets(model, config, "apply_adapter(LoraConfig)")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, lin in targets:
        layer = MultiLoraLinear(lin, config.ranks_for(name), config.alphas_for(name), config.adapter_names,
                                config.use_rslora, config.default_index(), config.gate_top_k)
        layer.train(lin.training)
        replace_module(model, name, layer)
    setattr(model, CONFIG_ATTR, config)
    return model


def apply_multi_lora(model: nn.Module, target_modules, ranks, alphas=None, names=None, use_rslora=False,
                     gate_top_k: int = 0):
    """Alias of ``apply_adapter(model, LoraConfig(...))``: every ``nn.Linear`` whose name ends with one of
    ``target_modules`` gets a :class:`MultiLoraLinear` with these adapters, none used outside ``adapter_batch``
    (``gate_top_k > 0`` adds a MeteoRA gate to each); returns the model."""
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    names = list(names) if names is not None else [str(i) for i in range(len(ranks))]
    cfg = LoraConfig(target_modules=targets, adapter_names=names, r=[int(r) for r in ranks],
                     lora_alpha=[float(a) for a in (alphas if alphas is not None else ranks)], use_rslora=use_rslora,
                     default_adapter=BASE, gate_top_k=gate_top_k)
    if not any(isinstance(m, nn.Linear) and cfg.matches(n) for n, m in model.named_modules()):
        raise ValueError(f"apply_multi_lora: no nn.Linear named {targets} in the model")
    return apply_lora(model, cfg)


def unload_lora(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every :class:`MultiLoraLinear` by its base ``nn.Linear``: with the default adapter merged
    (``merge=True``; layers that cannot merge, gated or without a default adapter, are an error) or dropped."""
    layers = list(lora_layers(model))
    if merge:
        for _, layer in layers:
            layer._merge_check("merge")
    unload_layers(model, layers, merge, (CONFIG_ATTR,))
    return model


def lora_file(model: nn.Module, config: Optional[LoraConfig] = None) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of every :class:`MultiLoraLinear` (what ``save_adapter`` puts in the directory):
    tensors ``"<module>.a_packed"``, ``"<module>.b_packed"`` (and ``"<module>.gate.weight"``); metadata ``format``,
    ``config`` (json), ``shapes`` and ``layers`` (json ``{module: {names, ranks, scales, default, gate_top_k}}``)."""
    config = config or getattr(model, CONFIG_ATTR, None)
    tensors, shapes, layers = {}, {}, {}
    for name, m in lora_layers(model):
        for p, t in m.adapter_parameters().items():
            tensors[f"{name}.{p}"] = t.detach().cpu().contiguous()
        shapes[name] = [m.out_features, m.in_features]
        layers[name] = {"names": list(m.names), "ranks": m.ranks, "scales": m.scales.tolist(),
                        "default": m.default, "gate_top_k": m.gate_top_k}
    if not shapes:
        raise ValueError("save_adapter: the model has no MultiLoraLinear")
    meta = {"format": FORMAT, "shapes": json.dumps(shapes), "layers": json.dumps(layers, sort_keys=True)}
    if config is not None:
        meta["config"] = config.to_json()
    return tensors, meta


def _check_layer_fields(err, name: str, d) -> dict:
    from . import _loading as L

    def bad(m):
        return err(f"metadata 'layers': {name!r}: {m}")
    if not isinstance(d, dict) or set(d) != {"names", "ranks", "scales", "default", "gate_top_k"}:
        raise bad(f"must be an object with names, ranks, scales, default, gate_top_k; got {d!r}")
    names, ranks, scales = d["names"], d["ranks"], d["scales"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)
            and len(set(names)) == len(names)):
        raise bad(f"names must be unique strings, got {names!r}")
    if not (isinstance(ranks, list) and len(ranks) == len(names) and all(L._is_int(r) and r >= 0 for r in ranks)):
        raise bad(f"ranks must be {len(names)} ints >= 0, got {ranks!r}")
    if not (isinstance(scales, list) and len(scales) == len(names)):
        raise bad(f"scales must be {len(names)} numbers, got {scales!r}")
    for s in scales:
        L.check_finite_number(bad, "scales", s)
    dflt, gk = d["default"], d["gate_top_k"]
    if dflt is not None and not (L._is_int(dflt) and 0 <= dflt < len(names)):
        raise bad(f"default must be null or an adapter index, got {dflt!r}")
    if not (L._is_int(gk) and 0 <= gk <= len(names)):
        raise bad(f"gate_top_k must be in [0, {len(names)}], got {gk!r}")
    return d


def stage_load(model: nn.Module, f, strict: bool = True):
    """Check a LoRA part (a :class:`~peftcore.tuners._loading.LoadFile`) against ``model`` and return the
    :class:`~peftcore.tuners._loading.Commit` that loads it (not run). Plain ``nn.Linear`` modules get a new
    :class:`MultiLoraLinear` with the saved adapters; existing ones (same names, ranks and gate) get the values."""
    from . import _loading as L

    err = f.error
    config = f.config(LoraConfig)
    shapes = f.shapes()
    layers = f.json("layers", dict)
    if set(layers) != set(shapes):
        raise err(f"metadata 'layers' and 'shapes' name other modules: {sorted(set(layers) ^ set(shapes))[:4]}")
    keys = L.Keys({}, ())  # grouped by the longest module prefix: a gate's key is "<module>.gate.weight"
    by_length = sorted(shapes, key=len, reverse=True)
    for key, t in f.tensors.items():
        owner = next((n for n in by_length if key.startswith(n + ".")), None)
        if owner is None:
            keys.unused.append(key)
        else:
            keys.by_module.setdefault(owner, {})[key[len(owner) + 1:]] = t
    modules = L.module_table(model)
    commit = L.Commit()
    with L.staging(model):
        for name, shape in shapes.items():
            d = _check_layer_fields(err, name, layers[name])
            mod = L.linear_at(err, modules, name, (nn.Linear, MultiLoraLinear), "an nn.Linear or MultiLoraLinear")
            if [mod.out_features, mod.in_features] != list(shape):
                raise err(f"module {name!r} is [{mod.out_features}, {mod.in_features}], the file's adapter is for "
                          f"{shape} (a file from another model?)")
            if isinstance(mod, MultiLoraLinear):
                have = (mod.names, mod.ranks, mod.gate_top_k)
                if have != (d["names"], d["ranks"], d["gate_top_k"]):
                    raise err(f"module {name!r} holds adapters {mod.names} of ranks {mod.ranks} (gate_top_k "
                              f"{mod.gate_top_k}); the file's {d['names']} of ranks {d['ranks']} "
                              f"(gate_top_k {d['gate_top_k']})")
                if mod.merged:
                    raise err(f"module {name!r} is merged; unmerge it first")
                layer, new = mod, False
            else:
                layer = MultiLoraLinear(mod, d["ranks"], None, d["names"], False, d["default"], d["gate_top_k"])
                layer.train(mod.training)
                new = True
            got = keys.by_module.get(name, {})
            params = layer.adapter_parameters()
            missing = sorted(set(params) - set(got))
            if missing:
                raise err(f"module {name!r}: tensor(s) {[f'{name}.{p}' for p in missing]} missing")
            for pname in sorted(set(got) - set(params)):
                keys.unused.append(f"{name}.{pname}")
            for pname, p in params.items():
                L.check_float(err, f"{name}.{pname}", got[pname], tuple(p.shape))
            scales = torch.tensor(d["scales"], dtype=torch.float32, device=layer.scales.device)
            for pname, p in params.items():
                if new:
                    p.data = L.to_param(got[pname], p)
                else:
                    commit.set_data(p, L.to_param(got[pname], p))
            if new:
                layer.scales.copy_(scales)
                commit.replace(model, name, layer)
                commit.requires_grad(mod.parameters(), False)
            else:
                commit.set_data(layer.scales, scales)
                commit.set_attr(layer, "default", d["default"])
        keys.extra(err, strict)
    if config is not None:
        commit.set_attr(model, CONFIG_ATTR, config)
    return commit


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
        merged = [m for m in self.layers if m.merged]
        if merged:
            raise RuntimeError("adapter_batch: the model's MultiLoraLinear layers are merged; unmerge first")
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
