"""What the structured adapters (Monarch, OFT, BOFT, MiSS) share: apply to the targeted ``nn.Linear`` modules in
one call, their part of a saved adapter (and the single-method safetensors file, :func:`save_file` /
:func:`load_file`), and the one-call conversion of a HF PEFT model (OFT, BOFT or MiSS adapters) to peftcore layers.
Merge / unmerge / unload and the directory format are the one API's (:mod:`peftcore.tuners.api`).

Each adapter is a :class:`~peftcore.tuners._layer.FrozenLinearAdapter` subclass registered here with its config
class; the layer gives ``create(base, config)``, ``from_peft(peft_layer, adapter)``, its trainable parameters
(``adapter_parameters()``), and the in-place weight update (``add_to_weight(+1 / -1)``: merge / unmerge).
"""
from __future__ import annotations

import json
import os
from typing import Iterator, Optional, Union

from torch import nn

from ._layer import FrozenLinearAdapter
from ._model import find_linear_targets, layers_of
from ._model import replace_module as _replace

CONFIG_ATTR = "peftcore_adapter_config"  # the last config applied
CONFIGS_ATTR = "peftcore_adapter_configs"  # {peft_type: config}: one per structured method on the model
FORMAT = "peftcore.adapter/2"
FORMAT_V1 = "peftcore.adapter/1"  # no per-layer fields; still read

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
    return layers_of(model, _registered_layers())


def _configs_with(model: nn.Module, config) -> dict:
    return {**getattr(model, CONFIGS_ATTR, {}), config.peft_type: config}


def config_of(model: nn.Module, peft_type: str):
    """The config of the ``peft_type`` layers of ``model`` (``None`` if none was recorded)."""
    cfg = getattr(model, CONFIGS_ATTR, {}).get(peft_type)
    if cfg is None:
        cfg = getattr(model, CONFIG_ATTR, None)
        cfg = cfg if getattr(cfg, "peft_type", None) == peft_type else None
    return cfg


def apply_structured(model: nn.Module, config) -> nn.Module:
    """Wrap every targeted ``nn.Linear`` of ``model`` (``config.target_modules`` / ``exclude_modules``, PEFT's
    matching rules) in the config's adapter layer, in place; freeze every other parameter so only the adapters
    train; return ``model``. Works on any ``nn.Module`` (HF transformers models included). Called by
    ``peftcore.apply_adapter`` for Monarch / OFT / BOFT / MiSS configs."""
    layer_cls = _layer_class(config)
    owner = f"apply_adapter({type(config).__name__})"
    targets = find_linear_targets(model, config, owner)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, lin in targets:
        try:
            layer = layer_cls.create(lin, config)
        except ValueError as e:
            raise ValueError(f"{owner}: {name!r} [{lin.out_features}, {lin.in_features}]: {e}") from None
        _replace(model, name, layer)
    setattr(model, CONFIGS_ATTR, _configs_with(model, config))
    setattr(model, CONFIG_ATTR, config)
    return model


# Per-layer fields that may differ between the layers of one model (PEFT's OFT with ``r`` gives each layer its own
# block size, for one): written per layer by save_adapter and used by load_adapter to rebuild each layer.
LAYER_FIELDS = {
    "MONARCH": ("nblocks", "rank", "scale", "dtype"),
    "OFT": ("block_size", "use_cayley_neumann", "num_cayley_neumann_terms", "block_share"),
    "BOFT": ("block_size", "n_butterfly_factor"),
    "MISS": ("r", "mini_r"),
}


def _layer_fields(layer: FrozenLinearAdapter) -> dict:
    cfg = layer.to_config()
    return {k: getattr(cfg, k) for k in LAYER_FIELDS.get(cfg.peft_type, ())}


def structured_file(model: nn.Module, config=None, peft_type: Optional[str] = None) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of the Monarch / OFT / BOFT / MiSS layers: what :func:`save_file` writes (and
    ``peftcore.save_adapter`` puts in the directory): tensors ``"<module>.<param>"``; metadata ``format``
    (``peftcore.adapter/2``), ``peft_type``, ``config`` (json), ``shapes`` (json ``{module: [out, in]}``) and
    ``layers`` (json ``{module: {field: value}}``: each layer's own block size / rank / ... , so layers of
    different sizes in one model load back exactly). ``peft_type``: only the layers of that type (with their
    config), when the model holds several types."""
    if peft_type is not None:
        config = config or config_of(model, peft_type)
    config = config or getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError("save_adapter: no config on the model (apply_adapter / from_peft set one); pass config=")
    layers = {n: m for n, m in adapter_layers(model) if peft_type is None or m.config_class.PEFT_TYPE == peft_type}
    if not layers:
        raise ValueError("save_adapter: the model has no peftcore adapter layer")
    if any(layer.merged for layer in layers.values()):
        raise RuntimeError("save_adapter: some layers are merged; unmerge first (the file holds unmerged adapters)")
    other = sorted({type(m).__name__ for m in layers.values() if m.config_class.PEFT_TYPE != config.peft_type})
    if other:
        raise ValueError(f"save_adapter: the config is {config.peft_type} but the model also has {other} layers")
    tensors = {f"{n}.{p}": t.detach().cpu().contiguous() for n, m in layers.items()
               for p, t in m.adapter_parameters().items()}
    shapes = {n: [m.out_features, m.in_features] for n, m in layers.items()}
    per_layer = {n: _layer_fields(m) for n, m in layers.items()}
    meta = {"format": FORMAT, "peft_type": config.peft_type, "config": config.to_json(), "shapes": json.dumps(shapes),
            "layers": json.dumps(per_layer, sort_keys=True)}
    return tensors, meta


def save_file(model: nn.Module, path: Union[str, os.PathLike], config=None) -> None:
    """Write the Monarch / OFT / BOFT / MiSS layers to one safetensors file (the single-method format,
    :func:`structured_file`). The library-wide format is ``peftcore.save_adapter(model, directory)``;
    ``peftcore.load_adapter`` reads both."""
    from safetensors.torch import save_file as _save

    tensors, meta = structured_file(model, config)
    _save(tensors, os.fspath(path), metadata=meta)


def load_file(model: nn.Module, path: Union[str, os.PathLike], strict: bool = True) -> nn.Module:
    """Load a file from :func:`save_file` into ``model``, all or nothing (:mod:`peftcore.tuners._loading`).

    Each module named in the file that is a plain ``nn.Linear`` gets a new adapter layer built from the file's
    config and that layer's own saved fields (block size, rank, ...); then every parameter that is not an adapter
    parameter is frozen, as :func:`apply_structured` does. A module that already is an adapter layer of the file's
    type and fields gets the values. Floating values take the dtype of the parameter they fill (a new layer's is
    the file's); anything else (integer tensors, other shapes, unknown modules or metadata, extra tensors unless
    ``strict=False``) is an error, raised before the model changes. Reads ``peftcore.adapter/2`` files and the
    older ``peftcore.adapter/1`` (no per-layer fields: every layer is built from the file's config). Returns
    ``model``."""
    stage_load(model, path, strict).run()
    return model


def stage_load(model: nn.Module, path, strict: bool = True):
    """Everything :func:`load_file` checks, and the :class:`~peftcore.tuners._loading.Commit` that applies it (not
    run). ``path`` may also be a :class:`~peftcore.tuners._loading.LoadFile`."""
    from . import _loading as L

    f = path if isinstance(path, L.LoadFile) else L.read_file("load_adapter", path, (FORMAT, FORMAT_V1))
    err = f.error
    ptype = f.meta.get("peft_type")
    if ptype is None:
        raise err(f"metadata 'peft_type' is missing (the file has {sorted(f.meta)})")
    if ptype not in _REGISTRY:
        raise err(f"unknown peft_type {ptype!r} (known: {sorted(_REGISTRY)})")
    config_cls, layer_cls = _REGISTRY[ptype]
    config = f.config(config_cls, required=True)
    shapes = f.shapes()
    per_layer = f.json("layers", dict) if f.format == FORMAT else {n: {} for n in shapes}
    if set(per_layer) != set(shapes):
        raise err(f"metadata 'layers' and 'shapes' name other modules: {sorted(set(per_layer) ^ set(shapes))[:4]}")
    allowed = LAYER_FIELDS.get(ptype, ())
    keys = L.Keys(f.tensors, shapes)
    modules = L.module_table(model)
    adapter_types = _registered_layers()
    commit, new_layers = L.Commit(), []
    with L.staging(model):
        for name, shape in shapes.items():
            fields_ = per_layer[name]
            if not isinstance(fields_, dict) or set(fields_) - set(allowed):
                raise err(f"metadata 'layers': {name!r} must be an object with fields from {list(allowed)}, "
                          f"got {fields_!r}")
            mod = L.linear_at(err, modules, name, (nn.Linear, *adapter_types), "an nn.Linear or adapter layer")
            if [mod.out_features, mod.in_features] != list(shape):
                raise err(f"module {name!r} is [{mod.out_features}, {mod.in_features}], the file's adapter is for "
                          f"{shape} (a file from another model?)")
            layer_cfg = L.parse_config(config_cls, {**config.to_dict(), **fields_},
                                       lambda m, n=name: err(f"metadata 'layers': {n!r}: {m}"))
            if isinstance(mod, FrozenLinearAdapter):
                if type(mod) is not layer_cls:
                    raise err(f"module {name!r} is a {type(mod).__name__}; the file holds {ptype} adapters")
                if mod.merged:
                    raise err(f"module {name!r} is merged; unmerge it first")
                have = {k: v for k, v in _layer_fields(mod).items() if k != "dtype"}  # values are cast
                want = {k: getattr(layer_cfg, k) for k in have}
                if have != want:
                    raise err(f"module {name!r} has {have}, the file's layer {want}")
                layer, new = mod, False
            else:
                try:
                    layer = layer_cls.create(mod, layer_cfg)
                except ValueError as e:
                    raise err(f"module {name!r} [{mod.out_features}, {mod.in_features}]: {e}") from None
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
            dtypes = sorted({str(got[pname].dtype) for pname in params})
            if new and len(dtypes) > 1:  # a new layer takes the file's dtype: it must be one
                raise err(f"module {name!r}: tensors {sorted(f'{name}.{p}' for p in params)} have dtypes {dtypes}; "
                          "a new layer needs one floating dtype")
            for pname, p in params.items():
                t = got[pname]
                if new:  # a new layer's parameters take the file's floating dtype
                    p.data = L.to_param(t, p, t.dtype)
                else:
                    commit.set_data(p, L.to_param(t, p))
            if new:
                commit.replace(model, name, layer)
                new_layers.append(layer)
        keys.extra(err, strict)
    if new_layers:
        keep = {id(p) for _, l in adapter_layers(model) for p in l.adapter_parameters().values()}
        keep |= {id(p) for l in new_layers for p in l.adapter_parameters().values()}
        commit.requires_grad([p for p in model.parameters() if id(p) not in keep], False)
        commit.requires_grad([p for l in new_layers for p in l.adapter_parameters().values()], True)
    commit.set_attr(model, CONFIG_ATTR, config)
    commit.set_attr(model, CONFIGS_ATTR, _configs_with(model, config))
    return commit


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
    ``Linear`` (see the table in docs/blockdiag.md)."""
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
    setattr(root, CONFIGS_ATTR, {config.peft_type: config})
    return root
