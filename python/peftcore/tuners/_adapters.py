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


def from_peft(peft_model: nn.Module, adapter: str = "default") -> nn.Module:
    """Run a HF PEFT model with OFT, BOFT or MiSS adapters on peftcore's ops, in one call.

    Every PEFT OFT / BOFT / MiSS ``Linear`` layer is replaced, in place inside the PEFT model's base model, by
    the peftcore layer that shares its parameters (so an optimizer over the PEFT parameters keeps working); the
    plain model (``peft_model.base_model.model``, or ``peft_model`` if it has no PEFT wrapper) is returned with the
    equivalent peftcore config attached, ready for :func:`save_adapter` / :func:`merge_adapter` / training."""
    from peft.tuners.boft.layer import Linear as PeftBOFT
    from peft.tuners.miss.layer import MissLinear as PeftMiss
    from peft.tuners.oft.layer import Linear as PeftOFT

    root = peft_model.base_model.model if hasattr(peft_model, "base_model") and hasattr(
        peft_model.base_model, "model") else peft_model
    kinds = {PeftOFT: "OFT", PeftBOFT: "BOFT", PeftMiss: "MISS"}
    found, config = [], None
    for name, m in list(root.named_modules()):
        kind = next((k for cls, k in kinds.items() if type(m) is cls), None)
        if kind is None:
            continue
        layer_cls = _REGISTRY[kind][1]
        ours = layer_cls.from_peft(m, adapter)
        _replace(root, name, ours)
        found.append(name)
        if config is None:
            config = ours.to_config()
        elif config.peft_type != kind:
            raise ValueError(f"from_peft: mixed adapter types ({config.peft_type} and {kind}) are not supported")
    if not found:
        raise ValueError("from_peft: no PEFT OFT / BOFT / MiSS Linear layer found (other layer types, e.g. Conv2d, "
                         "or other methods are not converted)")
    config.target_modules = found
    setattr(root, CONFIG_ATTR, config)
    return root
