"""Model-level API shared by the structured adapters (Monarch, OFT, BOFT, MiSS): apply to the targeted
``nn.Linear`` modules in one call, merge / unmerge / unload, safetensors save / load, and the one-call conversion
of a HF PEFT model (OFT, BOFT or MiSS adapters) to peftcore layers.

Each adapter is a :class:`~peftcore.tuners._layer.FrozenLinearAdapter` subclass registered here with its config
class; the layer gives ``create(base, config)``, ``from_peft(peft_layer, adapter)``, its trainable parameters
(``adapter_parameters()``), and the in-place weight update (``add_to_weight(+1 / -1)``: merge / unmerge).
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Optional, Union

import torch
from torch import nn

from ._layer import FrozenLinearAdapter

CONFIG_ATTR = "peftcore_adapter_config"
FORMAT = "peftcore.adapter/1"

_REGISTRY: dict[str, tuple[type, type]] = {}  # peft_type -> (config class, layer class)


def register_adapter(config_cls: type, layer_cls: type) -> None:
    _REGISTRY[config_cls.PEFT_TYPE] = (config_cls, layer_cls)
    layer_cls.config_class = config_cls


def _layer_class(config) -> type:
    ptype = getattr(config, "peft_type", None)
    if ptype not in _REGISTRY:
        raise TypeError(f"apply_adapter: unknown config {type(config).__name__} (registered: {sorted(_REGISTRY)})")
    return _REGISTRY[ptype][1]


def _registered_layers() -> tuple:
    return tuple(layer for _, layer in _REGISTRY.values())


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, FrozenLinearAdapter]]:
    """``(name, layer)`` for every Monarch / OFT / BOFT / MiSS layer of ``model``, in module order."""
    classes = _registered_layers()
    for name, m in model.named_modules():
        if isinstance(m, classes):
            yield name, m


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def apply_adapter(model: nn.Module, config) -> nn.Module:
    """Wrap every targeted ``nn.Linear`` of ``model`` (``config.target_modules`` / ``exclude_modules``, PEFT's
    matching rules) in the config's adapter layer, in place; freeze every other parameter so only the adapters
    train; return ``model``. Works on any ``nn.Module`` (HF transformers models included)."""
    layer_cls = _layer_class(config)
    owner = f"apply_adapter({type(config).__name__})"
    targets, inside = [], []
    for name, m in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, FrozenLinearAdapter):
            inside.append(name)
            if config.matches(name):
                raise ValueError(f"{owner}: {name!r} already has an adapter ({type(m).__name__})")
            continue
        if not config.matches(name):
            continue
        if isinstance(m, nn.Linear):
            targets.append((name, m))
        elif type(m).__name__ == "Conv1D":
            raise TypeError(f"{owner}: {name!r} is a transformers Conv1D; only nn.Linear is supported")
    if not targets:
        raise ValueError(f"{owner}: no nn.Linear matches target_modules={config.target_modules!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, lin in targets:
        try:
            layer = layer_cls.create(lin, config)
        except ValueError as e:
            raise ValueError(f"{owner}: {name!r} [{lin.out_features}, {lin.in_features}]: {e}") from None
        _replace(model, name, layer)
    setattr(model, CONFIG_ATTR, config)
    return model


def merge_adapter(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge every adapter into its base weight in place (the forward is then the plain linear's)."""
    for _, layer in adapter_layers(model):
        if not layer.merged:
            layer.merge(safe_merge=safe_merge)
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    for _, layer in adapter_layers(model):
        if layer.merged:
            layer.unmerge()
    return model


def unload_adapter(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every adapter layer by its base ``nn.Linear`` (merged first unless ``merge=False``); returns the
    plain model."""
    for name, layer in list(adapter_layers(model)):
        if merge and not layer.merged:
            layer.merge()
        _replace(model, name, layer.base_layer)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<module>.<param>": tensor}`` of every adapter's trainable parameters (detached)."""
    state = {}
    for name, layer in adapter_layers(model):
        for pname, p in layer.adapter_parameters().items():
            state[f"{name}.{pname}"] = p.detach()
    return state


def save_adapter(model: nn.Module, path: Union[str, os.PathLike], config=None) -> None:
    """Write the adapters' parameters to a safetensors file; metadata ``format``, ``peft_type``, ``config`` (json)
    and ``shapes`` (json ``{module: [out, in]}``)."""
    from safetensors.torch import save_file

    config = config or getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError("save_adapter: no config on the model (apply_adapter / from_peft set one); pass config=")
    layers = dict(adapter_layers(model))
    if not layers:
        raise ValueError("save_adapter: the model has no peftcore adapter layer")
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("save_adapter: some layers are merged; unmerge first (the file holds unmerged adapters)")
    tensors = {k: v.cpu().contiguous() for k, v in adapter_state(model).items()}
    shapes = {n: [m.out_features, m.in_features] for n, m in layers.items()}
    meta = {"format": FORMAT, "peft_type": config.peft_type, "config": config.to_json(), "shapes": json.dumps(shapes)}
    save_file(tensors, os.fspath(path), metadata=meta)


def load_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load a file from :func:`save_adapter`: a plain model gets the adapters applied (from the saved config)
    first; a model that already has them gets the parameters copied in. Shapes are checked. Returns ``model``."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        meta = dict(f.metadata() or {})
        if meta.get("format") != FORMAT:
            raise ValueError(f"load_adapter: {os.fspath(path)!r} is not a peftcore adapter file "
                             f"(format {meta.get('format')!r})")
        state = {k: f.get_tensor(k) for k in f.keys()}
    if meta["peft_type"] not in _REGISTRY:
        raise ValueError(f"load_adapter: unknown peft_type {meta['peft_type']!r}")
    config = _REGISTRY[meta["peft_type"]][0].from_json(meta["config"])
    if not any(True for _ in adapter_layers(model)):
        apply_adapter(model, config)
    layers = dict(adapter_layers(model))
    shapes = json.loads(meta["shapes"])
    missing = sorted(set(shapes) - set(layers))
    if missing:
        raise ValueError(f"load_adapter: the model has no adapter layer at {missing[:3]}")
    with torch.no_grad():
        for name, shape in shapes.items():
            layer = layers[name]
            if [layer.out_features, layer.in_features] != list(shape):
                raise ValueError(f"load_adapter: {name!r} is [{layer.out_features}, {layer.in_features}], "
                                 f"the file's adapter is for {shape}")
            if layer.merged:
                raise RuntimeError(f"load_adapter: {name!r} is merged; unmerge first")
            for pname, p in layer.adapter_parameters().items():
                t = state.get(f"{name}.{pname}")
                if t is None or t.shape != p.shape:
                    raise ValueError(f"load_adapter: {name}.{pname} has shape {tuple(p.shape)}, the file "
                                     f"{None if t is None else tuple(t.shape)}")
                p.copy_(t)
    setattr(model, CONFIG_ATTR, config)
    return model


_PEFT_CONFIG_REFUSED = {  # PEFT config option -> the values from_peft converts (any other value is refused)
    "bias": ("none",),
    "modules_to_save": (None, [], ()),
    "trainable_token_indices": (None,),
}


def _peft_refusals(peft_model: nn.Module, root: nn.Module, adapter_names) -> None:
    """Raise for the PEFT settings that change behaviour beyond the adapter layers (options that train base
    parameters or wrap other modules): their effect would be lost in the converted model or in its saved adapter."""
    configs = getattr(peft_model, "peft_config", None) or {}
    for name in adapter_names:
        cfg = configs.get(name)
        for opt, ok in _PEFT_CONFIG_REFUSED.items():
            val = getattr(cfg, opt, None)
            if cfg is not None and val not in ok:
                raise NotImplementedError(f"from_peft: adapter {name!r} has {opt}={val!r}; only {opt}={ok[0]!r} is "
                                          "converted (peftcore adapters train and save only their own parameters)")
    from peft.utils.other import AuxiliaryTrainingWrapper

    for mname, m in root.named_modules():
        if isinstance(m, AuxiliaryTrainingWrapper):
            raise NotImplementedError(f"from_peft: {mname!r} is a PEFT {type(m).__name__} (modules_to_save / "
                                      "trainable_token_indices), which is not converted")


def from_peft(peft_model: nn.Module, adapter: Optional[str] = None) -> nn.Module:
    """Run a HF PEFT model with OFT, BOFT or MiSS adapters on peftcore's ops, in one call.

    Every PEFT OFT / BOFT / MiSS ``Linear`` layer is replaced, in place inside the PEFT model's base model, by
    the peftcore layer that shares its parameters (so an optimizer over the PEFT parameters keeps working) and has
    its train / eval mode; the plain model (``peft_model.base_model.model``, or ``peft_model`` if it has no PEFT
    wrapper) is returned with the equivalent peftcore config attached, ready for :func:`save_adapter` /
    :func:`merge_adapter` / training.

    A peftcore layer holds one adapter. ``adapter=None`` converts the model's only adapter; a model holding several
    is refused (the error names them) unless ``adapter`` names the one to keep: it must be PEFT's active adapter
    (``peft_model.set_adapter(name)`` first), and the others are dropped (layers holding only inactive adapters
    become their plain base layer, which is what PEFT runs there). Everything the conversion would not reproduce
    exactly is refused before anything changes: several active adapters, merged or disabled adapters, COFT,
    MiSS ``bat``, ``bias`` other than ``"none"``, ``modules_to_save``, PEFT layers other than OFT / BOFT / MiSS
    ``Linear`` (see the README's table)."""
    from peft.tuners.boft.layer import Linear as PeftBOFT
    from peft.tuners.miss.layer import MissLinear as PeftMiss
    from peft.tuners.oft.layer import Linear as PeftOFT
    from peft.tuners.tuners_utils import BaseTunerLayer

    root = peft_model.base_model.model if hasattr(peft_model, "base_model") and hasattr(
        peft_model.base_model, "model") else peft_model
    kinds = {PeftOFT: "OFT", PeftBOFT: "BOFT", PeftMiss: "MISS"}
    layers, others = [], []  # (name, peft layer, kind, adapters it holds); PEFT layers of other kinds
    for name, m in root.named_modules():
        if not isinstance(m, BaseTunerLayer):
            continue
        kind = kinds.get(type(m))
        if kind is None:
            others.append(f"{name!r} ({type(m).__module__}.{type(m).__name__})")
            continue
        held = [a for n in m.adapter_layer_names for a in getattr(m, n).keys()]
        layers.append((name, m, kind, held))
    if not layers:
        raise ValueError("from_peft: no PEFT OFT / BOFT / MiSS Linear layer found (other layer types, e.g. Conv2d, "
                         f"or other methods are not converted; found {others[:3]})")
    if others:
        raise NotImplementedError(f"from_peft: PEFT layers other than OFT / BOFT / MiSS Linear are not converted: "
                                  f"{others[:3]}{' ...' if len(others) > 3 else ''}")
    names = sorted({a for *_, held in layers for a in held})
    if adapter is None:
        if len(names) > 1:
            raise ValueError(f"from_peft: the model holds adapters {names}; a peftcore layer holds one: pass "
                             f"adapter=<name> to convert the active one and drop the others, or delete_adapter first")
        adapter = names[0]
    elif adapter not in names:
        raise ValueError(f"from_peft: no adapter {adapter!r} in the model (it holds {names})")
    kinds_used = {kind for _, _, kind, held in layers if adapter in held}
    if len(kinds_used) > 1:
        raise ValueError(f"from_peft: mixed adapter types ({' and '.join(sorted(kinds_used))}) are not supported")
    _peft_refusals(peft_model, root, [adapter])

    # Check and build everything first: a refusal leaves the PEFT model as it was.
    plan = []
    for name, m, kind, held in layers:
        active = [a for a in m.active_adapters if a in held]
        if m.merged:
            raise NotImplementedError(f"from_peft: {name!r} has merged adapters {m.merged_adapters}; unmerge first")
        if m.disable_adapters:
            raise NotImplementedError(f"from_peft: {name!r} has its adapters disabled (disable_adapter())")
        if len(active) > 1:
            raise NotImplementedError(f"from_peft: {name!r} runs several active adapters {active} (PEFT composes "
                                      "them); a peftcore layer holds one: set_adapter one of them first")
        if not getattr(m, "cast_input_dtype_enabled", True):
            raise NotImplementedError(f"from_peft: {name!r} has input dtype casting disabled")
        if adapter in held:
            if active != [adapter]:
                raise ValueError(f"from_peft: adapter {adapter!r} is not active on {name!r} (active adapters: "
                                 f"{m.active_adapters}): call peft_model.set_adapter({adapter!r}) first")
            base = m.get_base_layer()
            if type(base) is not nn.Linear:
                raise NotImplementedError(f"from_peft: {name!r} wraps a {type(base).__name__}; only torch.nn.Linear "
                                          "is converted")
            frozen_not = [f"{name}.{n}" for n, p in base.named_parameters() if p.requires_grad]
            if frozen_not:
                raise NotImplementedError(f"from_peft: {frozen_not} are trainable (e.g. PEFT's bias option); "
                                          "peftcore adapters keep the base layer frozen")
            try:
                ours = _REGISTRY[kind][1].from_peft(m, adapter)
            except (ValueError, NotImplementedError) as e:
                raise type(e)(f"from_peft: {name!r}: {e}") from None
            plan.append((name, ours))
        elif active:
            raise ValueError(f"from_peft: {name!r} runs adapter {active[0]!r}, which adapter={adapter!r} would drop")
        else:
            plan.append((name, m.get_base_layer()))  # only inactive adapters: PEFT runs the base layer here
    for name, new in plan:
        _replace(root, name, new)
    found = [name for name, new in plan if isinstance(new, FrozenLinearAdapter)]
    config = root.get_submodule(found[0]).to_config()
    config.target_modules = found
    setattr(root, CONFIG_ATTR, config)
    return root
