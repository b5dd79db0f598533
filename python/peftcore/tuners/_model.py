"""Model-level code the linear-layer methods share (sparse delta, S2FT, Monarch / OFT / BOFT / MiSS, LoRA): module
swaps, finding the targeted ``nn.Linear`` modules, merge / unmerge / unload loops, the single-method file's
``(tensors, metadata)`` and its checked reading. Each method's ``model.py`` keeps only what is its own (selection,
co-permutation, per-module metadata)."""
from __future__ import annotations

import json
import os
from typing import Iterable, Iterator, Optional, Union

from torch import nn

from . import _loading as L


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` of ``model``."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def layers_of(model: nn.Module, types) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every module of ``model`` that is one of ``types``, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, types):
            yield name, m


def adapter_types() -> tuple:
    """Every layer class that wraps an ``nn.Linear`` (one adapter per linear)."""
    from ._layer import FrozenLinearAdapter
    from .lora import MultiLoraLinear, PeftcoreLoraLinear

    return (FrozenLinearAdapter, MultiLoraLinear, PeftcoreLoraLinear)


def find_linear_targets(model: nn.Module, config, owner: str) -> list[tuple[str, nn.Linear]]:
    """``(name, linear)`` of every ``nn.Linear`` that ``config`` targets (``config.matches``: PEFT's rules), not
    inside an adapter layer. Raises if a targeted module already is an adapter layer, is a transformers ``Conv1D``,
    or if nothing matches."""
    adapters = adapter_types()
    targets, inside = [], []
    for name, m in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in inside):
            continue
        if isinstance(m, adapters):
            inside.append(name)
            if config.matches(name):
                raise ValueError(f"{owner}: {name!r} already has an adapter ({type(m).__name__}); one adapter per "
                                 "nn.Linear")
            continue
        if not config.matches(name):
            continue
        if isinstance(m, nn.Linear):
            targets.append((name, m))
        elif type(m).__name__ == "Conv1D":  # transformers' GPT-2 style [in, out] weight
            raise TypeError(f"{owner}: {name!r} is a transformers Conv1D; only nn.Linear is supported (GPT-2 style "
                            "models: convert Conv1D to nn.Linear first)")
    if not targets:
        raise ValueError(f"{owner}: no nn.Linear matches target_modules={config.target_modules!r}")
    return targets


def merge_layers(layers: Iterable[tuple[str, nn.Module]], safe_merge: bool = False) -> None:
    for _, layer in layers:
        if not layer.merged:
            layer.merge(safe_merge=safe_merge)


def unmerge_layers(layers: Iterable[tuple[str, nn.Module]]) -> None:
    for _, layer in layers:
        if layer.merged:
            layer.unmerge()


def unload_layers(model: nn.Module, layers: Iterable[tuple[str, nn.Module]], merge: bool,
                  attrs: Iterable[str] = ()) -> None:
    """Replace each layer by its ``base_layer``: with the delta merged (``merge=True``) or the original weight
    (``merge=False``, a merged layer is unmerged first); then drop the model attributes ``attrs``."""
    for name, layer in list(layers):
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
        replace_module(model, name, layer.base_layer)
    for attr in attrs:
        if hasattr(model, attr):
            delattr(model, attr)


def module_file(fmt: str, tensors: dict, shapes: dict, per_module: dict, config=None, owner: str = "save") -> tuple:
    """A single-method file's ``(tensors, metadata)``: metadata ``format``, ``shapes`` and each ``per_module``
    entry (json), and ``config`` (json) when given."""
    if not tensors:
        raise ValueError(f"{owner}: the model has no layer of this method")
    meta = {"format": fmt, "shapes": json.dumps(shapes), **{k: json.dumps(v) for k, v in per_module.items()}}
    if config is not None:
        meta["config"] = config.to_json()
    return tensors, meta


def write_file(tensors: dict, meta: dict, path: Union[str, os.PathLike]) -> None:
    from safetensors.torch import save_file

    save_file(tensors, os.fspath(path), metadata=meta)


def read_module_file(owner: str, path, formats: tuple, names: tuple, config_cls: type,
                     per_module: Optional[str], strict: bool):
    """Read (or take, if ``path`` is a :class:`~peftcore.tuners._loading.LoadFile`) a single-method file whose
    tensors are ``"<module>.<name>"`` for ``names``, and check its metadata: ``shapes``, the ``per_module`` object
    (same modules as ``shapes``), the optional ``config``; every module has every name; extra tensors are an error
    unless ``strict=False``. Returns ``(file, {module: {name: tensor}}, shapes, per-module values, config)``."""
    f = path if isinstance(path, L.LoadFile) else L.read_file(owner, path, formats)
    shapes = f.shapes()
    values = f.json(per_module, dict) if per_module else None
    config = f.config(config_cls)
    if per_module and set(values) != set(shapes):
        raise f.error(f"metadata {per_module!r} and 'shapes' name other modules: "
                      f"{sorted(set(values) ^ set(shapes))[:4]}")
    keys = L.Keys(f.tensors, shapes, names)
    keys.extra(f.error, strict)
    for name in shapes:
        missing = set(names) - set(keys.by_module.get(name, {}))
        if missing:
            raise f.error(f"module {name!r}: tensor(s) {sorted(f'{name}.{k}' for k in missing)} missing")
    return f, keys.by_module, shapes, values, config
