"""One adapter API for every method: ``apply_adapter`` / ``save_adapter`` / ``load_adapter`` / ``merge_adapter`` /
``unmerge_adapter`` / ``unload_adapter`` / ``adapter_state`` (all exported at ``peftcore.`` top level).

The method is chosen by the config's class: :class:`SparseDeltaConfig`, :class:`S2FTConfig`, :class:`MonarchConfig`,
:class:`OFTConfig`, :class:`BOFTConfig`, :class:`MissConfig`, :class:`SeerAttnConfig`, :class:`TokenElimConfig`,
:class:`LoraConfig`. Method-specific extras are keyword arguments of :func:`apply_adapter` (``calib_fn`` for the
gradient selections of sparse delta and S2FT, ``permute`` for S2FT); helpers that act during training stay objects
of their own (``SparseDeltaScheduler``, ``adapter_batch``, ``set_seer_mode``).

On disk, :func:`save_adapter` writes a directory (PEFT's layout): ``adapter_model.safetensors`` holds every method's
tensors, each key prefixed by the method (``"sparse_delta.<module>.values"``, ``"lora.<module>.a_packed"``, ...),
and ``adapter_config.json`` the methods in load order, each with its config and the per-module facts its loader
needs (shapes, scales, block sizes, ...), plus the tensors file's SHA-256. :func:`load_adapter` works on a plain
model: it re-applies each method from the directory, all or nothing (any error leaves the model bitwise as it was)
and strictly (a missing or unexpected tensor, a shape mismatch, an unknown module or field is an error naming it).

Several methods on one model (see ``docs/api.md``):
  * one adapter per ``nn.Linear``: the linear methods (sparse delta, S2FT, Monarch, OFT, BOFT, MiSS, LoRA) compose
    on *different* modules; a module that already has an adapter is refused;
  * SeerAttention gates wrap ``self_attn``; linear adapters inside it (e.g. LoRA on ``q_proj`` / ``v_proj``)
    compose in either order (after the gates their names run through ``self_attn.base_attn``);
  * token elimination replaces decoder layers' forward only and composes with every linear method, not with
    SeerAttention gates (both change the same attention);
  * S2FT's co-permutation (``permute=True``, the default) reorders whole decoder blocks: it composes only with
    token elimination; with ``permute=False`` (or after ``load_adapter``, which never permutes) S2FT composes like
    any linear method;
  * every ``apply_adapter`` freezes what is not an adapter; the adapters already on the model keep training.

Merging: the linear methods merge into their weights; SeerAttention gates and token elimination cannot: for them
``merge_adapter`` / ``unmerge_adapter`` are a no-op that keeps the model's function (they stay in place and
active), and ``unload_adapter`` removes them (the attention then is the original dense one). LoRA layers with a
MeteoRA gate or without a default adapter cannot merge: ``merge_adapter`` raises naming them.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Union

import torch
from torch import nn

from . import _adapters, _loading as L
from ._model import merge_layers, unload_layers, unmerge_layers
from . import lora as _lora
from .boft import BOFTConfig
from .miss import MissConfig
from .monarch import MonarchConfig
from .oft import OFTConfig
from .s2ft import S2FTConfig
from .s2ft import model as _s2ft
from .seer_attn import SeerAttnConfig
from .seer_attn import model as _seer
from .sparse_delta import SparseDeltaConfig
from .sparse_delta import model as _sd
from .token_elim import TokenElimConfig
from .token_elim import model as _te

__all__ = ["adapter_methods", "adapter_state", "apply_adapter", "load_adapter", "merge_adapter", "save_adapter",
           "unload_adapter", "unmerge_adapter"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
DIR_FORMAT = "peftcore.adapter_dir/1"


class _Method:
    """What the API needs of one method. Subclasses fill in the hooks."""

    peft_type: str = ""
    config_cls: type = object
    mergeable = True
    formats: tuple = ()  # the single-method file formats its loader reads
    extras: tuple = ()  # keyword arguments apply_adapter passes on

    @property
    def prefix(self) -> str:
        return self.peft_type.lower()

    def layers(self, model) -> list:
        raise NotImplementedError

    def present(self, model) -> bool:
        return bool(self.layers(model))

    def apply(self, model, config, **kw):
        raise NotImplementedError

    def file(self, model) -> tuple[dict, dict]:
        raise NotImplementedError

    def stage_load(self, model, f, strict):
        raise NotImplementedError

    def trainable(self, model) -> list:
        return [p for _, m in self.layers(model) for p in m.adapter_parameters().values()]

    def merged(self, model) -> list:
        return [n for n, m in self.layers(model) if getattr(m, "merged", False)]

    def merge(self, model, safe_merge: bool) -> None:
        merge_layers(self.layers(model), safe_merge)

    def unmerge(self, model) -> None:
        unmerge_layers(self.layers(model))

    def unload(self, model, merge: bool) -> None:
        raise NotImplementedError


class _SparseDelta(_Method):
    peft_type, config_cls, formats, extras = "SPARSE_DELTA", SparseDeltaConfig, (_sd.FORMAT,), ("calib_fn",)

    def layers(self, model):
        return list(_sd.sparse_delta_layers(model))

    def apply(self, model, config, calib_fn=None):
        _sd._apply_sparse_delta(model, config, calib_fn=calib_fn)

    def file(self, model):
        return _sd.sparse_delta_file(model)

    def stage_load(self, model, f, strict):
        return _sd.stage_load(model, f, None, strict)

    def trainable(self, model):
        return [m.values for _, m in self.layers(model)]

    def unload(self, model, merge):
        _sd.unload_sparse_delta(model, merge=merge)


class _S2FT(_Method):
    peft_type, config_cls, formats, extras = "S2FT", S2FTConfig, (_s2ft.FORMAT,), ("calib_fn", "permute")

    def layers(self, model):
        return list(_s2ft.s2ft_layers(model))

    def apply(self, model, config, calib_fn=None, permute=True):
        _s2ft._apply_s2ft(model, config, calib_fn=calib_fn, permute=permute)

    def file(self, model):
        return _s2ft.s2ft_file(model)

    def stage_load(self, model, f, strict):
        return _s2ft.stage_load(model, f, strict)

    def trainable(self, model):
        return [m.delta for _, m in self.layers(model)]

    def unload(self, model, merge):
        _s2ft.unload_s2ft(model, merge=merge)


class _Structured(_Method):
    """Monarch / OFT / BOFT / MiSS (``tuners._adapters``), one method per layer type."""
    formats = (_adapters.FORMAT, _adapters.FORMAT_V1)

    def __init__(self, config_cls):
        self.config_cls, self.peft_type = config_cls, config_cls.PEFT_TYPE

    def layers(self, model):
        return [(n, m) for n, m in _adapters.adapter_layers(model) if m.config_class is self.config_cls]

    def apply(self, model, config):
        _adapters.apply_structured(model, config)

    def file(self, model):
        return _adapters.structured_file(model, peft_type=self.peft_type)

    def stage_load(self, model, f, strict):
        return _adapters.stage_load(model, f, strict)

    def unload(self, model, merge):
        unload_layers(model, self.layers(model), merge)
        configs = {k: v for k, v in getattr(model, _adapters.CONFIGS_ATTR, {}).items() if k != self.peft_type}
        if configs:
            setattr(model, _adapters.CONFIGS_ATTR, configs)
            setattr(model, _adapters.CONFIG_ATTR, list(configs.values())[-1])
        else:
            for attr in (_adapters.CONFIG_ATTR, _adapters.CONFIGS_ATTR):
                if hasattr(model, attr):
                    delattr(model, attr)


class _Seer(_Method):
    peft_type, config_cls, formats, mergeable = "SEER_ATTN", SeerAttnConfig, (_seer.FORMAT,), False

    def layers(self, model):
        return list(_seer.seer_layers(model))

    def apply(self, model, config):
        _seer._apply_seer_attention(model, config)

    def file(self, model):
        return _seer.seer_gates_file(model)

    def stage_load(self, model, f, strict):
        return _seer.stage_load(model, f, strict)

    def trainable(self, model):
        return list(_seer.seer_gate_parameters(model))

    def merged(self, model):
        return []

    def merge(self, model, safe_merge):  # gates cannot fold into weights: documented no-op
        pass

    def unmerge(self, model):
        pass

    def unload(self, model, merge):
        _seer.remove_seer_attention(model)


_MISSING = object()
TOKEN_ELIM_FORMAT = "peftcore.token_elim/1"


class _TokenElim(_Method):
    peft_type, config_cls, formats, mergeable = "TOKEN_ELIM", TokenElimConfig, (TOKEN_ELIM_FORMAT,), False

    def layers(self, model):
        try:
            layers = _te.decoder_layers(model)
        except ValueError:
            return []
        return [(str(i), m) for i, m in enumerate(layers) if "_token_elim_orig_forward" in m.__dict__]

    def apply(self, model, config):
        _te._apply_token_elim(model, config)

    def file(self, model):
        layers = self.layers(model)
        if not layers:
            raise ValueError("save_adapter: the model has no token-eliminating layer")
        return {}, {"format": TOKEN_ELIM_FORMAT, "config": layers[0][1]._token_elim_config.to_json()}

    def stage_load(self, model, f, strict):
        config = f.config(TokenElimConfig, required=True)
        L.Keys(f.tensors, ()).extra(f.error, strict)
        try:
            layers = _te.decoder_layers(model)
        except ValueError as e:
            raise f.error(f"cannot apply the file's config: {e}") from None
        commit = L.Commit()

        def do():
            attrs = ("forward", "_token_elim_orig_forward", "_token_elim_config")
            prev = [(m, [m.__dict__.get(a, _MISSING) for a in attrs]) for m in layers]
            _te._apply_token_elim(model, config)

            def undo():
                for m, vals in prev:
                    for a, v in zip(attrs, vals):
                        if v is _MISSING:
                            m.__dict__.pop(a, None)
                        else:
                            m.__dict__[a] = v
            return undo
        commit.step(do)
        return commit

    def trainable(self, model):
        return []

    def merged(self, model):
        return []

    def merge(self, model, safe_merge):  # a forward, not a weight: documented no-op
        pass

    def unmerge(self, model):
        pass

    def unload(self, model, merge):
        _te.remove_token_elim(model)


class _Lora(_Method):
    peft_type, config_cls, formats = "LORA", _lora.LoraConfig, (_lora.FORMAT,)

    def layers(self, model):
        return list(_lora.lora_layers(model))

    def apply(self, model, config):
        _lora._apply_lora(model, config)

    def file(self, model):
        return _lora.lora_file(model)

    def stage_load(self, model, f, strict):
        return _lora.stage_load(model, f, strict)

    def merge(self, model, safe_merge):
        layers = self.layers(model)
        for name, m in layers:  # every layer checked before any merges
            try:
                m._merge_check("merge")
            except ValueError as e:
                raise ValueError(f"merge_adapter: LORA layer {name!r}: {e}") from None
        merge_layers(layers, safe_merge)

    def unload(self, model, merge):
        _lora.unload_lora(model, merge=merge)


# Load order: the wrappers that rename module paths (SeerAttention's ``self_attn.base_attn``) first, so the linear
# adapters inside them find their modules; unload runs in the reverse order.
METHODS: list[_Method] = [_Seer(), _TokenElim(), _S2FT(), _SparseDelta(), *(_Structured(c) for c in (
    MonarchConfig, OFTConfig, BOFTConfig, MissConfig)), _Lora()]
_BY_TYPE = {m.peft_type: m for m in METHODS}
_BY_PREFIX = {m.prefix: m for m in METHODS}
_LINEAR = ("S2FT", "SPARSE_DELTA", "MONARCH", "OFT", "BOFT", "MISS", "LORA")


def _method_of(config, owner: str) -> _Method:
    for m in METHODS:
        if type(config) is m.config_cls:
            return m
    known = ", ".join(m.config_cls.__name__ for m in METHODS)
    raise TypeError(f"{owner}: {type(config).__name__} is not a peftcore adapter config (one of {known})")


def adapter_methods(model: nn.Module) -> list[str]:
    """The ``peft_type`` of every method on ``model``, in load order (e.g. ``["SEER_ATTN", "LORA"]``)."""
    return [m.peft_type for m in METHODS if m.present(model)]


def _present(model) -> list[_Method]:
    return [m for m in METHODS if m.present(model)]


def _check_composition(model: nn.Module, method: _Method, config, kwargs: dict) -> None:
    owner = f"apply_adapter({type(config).__name__})"
    present = [m.peft_type for m in _present(model) if m is not method]
    if method.peft_type == "S2FT" and kwargs.get("permute", True):
        others = [p for p in present if p != "TOKEN_ELIM"]
        if others:
            raise ValueError(f"{owner}: S2FT's co-permutation reorders whole decoder blocks, which the model's "
                             f"{others} adapters would not follow; apply S2FT first-and-alone (with token "
                             "elimination only) or with permute=False")
    if getattr(model, _s2ft.PERM_ATTR, None) and method.peft_type not in ("S2FT", "TOKEN_ELIM"):
        raise ValueError(f"{owner}: the model's decoder blocks are co-permuted by S2FT (permute=True), so a "
                         f"{method.peft_type} adapter would train in permuted coordinates that save_adapter does not "
                         "undo; apply S2FT with permute=False to combine it with other methods")
    pair = {"SEER_ATTN", "TOKEN_ELIM"}
    if method.peft_type in pair and (pair - {method.peft_type}) & set(present):
        raise ValueError(f"{owner}: SeerAttention gates and token elimination both change the attention of the "
                         "decoder layers; they do not compose")
    if method.peft_type in _LINEAR:
        for other in _present(model):
            if other is method or other.peft_type not in _LINEAR:
                continue
            for name, layer in other.layers(model):
                if config.matches(name):
                    raise ValueError(f"{owner}: {name!r} already has a {other.peft_type} adapter "
                                     f"({type(layer).__name__}); one adapter per nn.Linear")


def apply_adapter(model: nn.Module, config, **kwargs) -> nn.Module:
    """Apply the method of ``config`` to ``model`` in place and return ``model``; every parameter that is not an
    adapter's is frozen (adapters already on the model keep their ``requires_grad``).

    ``config`` is one of :class:`SparseDeltaConfig`, :class:`S2FTConfig`, :class:`MonarchConfig`,
    :class:`OFTConfig`, :class:`BOFTConfig`, :class:`MissConfig`, :class:`SeerAttnConfig`,
    :class:`TokenElimConfig` (this one freezes nothing: it changes the decoder layers' forward), :class:`LoraConfig`.
    Keyword extras: ``calib_fn=fn(model)`` (sparse delta and S2FT with ``selection="gradient"``: runs forward +
    backward on calibration batches), ``permute=False`` (S2FT: no co-permutation). Another method already on the
    model stays; the composition rules are in this module's docstring and ``docs/api.md``."""
    method = _method_of(config, "apply_adapter")
    unknown = sorted(set(kwargs) - set(method.extras))
    if unknown:
        raise TypeError(f"apply_adapter({type(config).__name__}): unknown keyword argument(s) {unknown}; this method "
                        f"takes {list(method.extras) or 'none'}")
    _check_composition(model, method, config, kwargs)
    keep = [p for m in _present(model) if m is not method for p in m.trainable(model) if p.requires_grad]
    method.apply(model, config, **kwargs)
    for p in keep:
        p.requires_grad_(True)
    return model


def _need(model, owner) -> list[_Method]:
    present = _present(model)
    if not present:
        raise ValueError(f"{owner}: the model has no peftcore adapter")
    return present


def merge_adapter(model: nn.Module, safe_merge: bool = False) -> nn.Module:
    """Merge every linear method's adapters into their base weights in place (the forward then is the plain
    linear's); SeerAttention gates and token elimination stay as they are (a no-op for them: they cannot fold into
    weights, and the model's function is kept). ``safe_merge`` checks each merged weight is finite first. All or
    nothing: if one layer fails, the layers merged by this call are unmerged again."""
    done = []
    try:
        for m in _need(model, "merge_adapter"):
            before = set(m.merged(model))
            try:
                m.merge(model, safe_merge)
            finally:
                done.append((m, set(m.merged(model)) - before))
    except BaseException:
        for m, names in reversed(done):
            for name, layer in m.layers(model):
                if name in names:
                    layer.unmerge()
        raise
    return model


def unmerge_adapter(model: nn.Module) -> nn.Module:
    """Undo :func:`merge_adapter` (exact in float32; half-precision weights round once more)."""
    for m in _need(model, "unmerge_adapter"):
        m.unmerge(model)
    return model


def unload_adapter(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove every method: linear adapters give back their ``nn.Linear`` (with the delta merged when ``merge``,
    else the original weights; S2FT also undoes its co-permutation), SeerAttention's ``self_attn`` wrappers and
    token elimination's forwards are removed. Returns the plain model."""
    present = _need(model, "unload_adapter")
    if merge:
        for m in present:
            if m.peft_type == "LORA":
                for name, layer in m.layers(model):
                    try:
                        layer._merge_check("merge")
                    except ValueError as e:
                        raise ValueError(f"unload_adapter: LORA layer {name!r}: {e} (or unload with merge=False)") \
                            from None
    for m in reversed(present):
        m.unload(model, merge)
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor :func:`save_adapter` would write, by its key in ``adapter_model.safetensors``
    (``"<method>.<module>.<name>"``, e.g. ``"sparse_delta.model.layers.0.self_attn.q_proj.values"``), as CPU
    copies."""
    state = {}
    for m in _need(model, "adapter_state"):
        tensors, _ = m.file(model)
        state.update({f"{m.prefix}.{k}": v for k, v in tensors.items()})
    return state


# ---------------------------------------------------------------------------------------------------- save / load


def _json_meta(meta: dict) -> dict:
    """Safetensors metadata (str -> JSON text) as JSON values; ``format`` / ``peft_type`` stay strings."""
    return {k: v if k in ("format", "peft_type") else json.loads(v) for k, v in meta.items()}


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_adapter(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write every method on ``model`` to the directory ``path``: ``adapter_model.safetensors`` (the tensors,
    keys prefixed by the method) and ``adapter_config.json`` (format, the methods in load order with their configs
    and per-module metadata, the tensors file's SHA-256).

    Atomic: a new directory is written under a temporary name and renamed into place. Into an existing directory
    (e.g. a training checkpoint) the two files are each written to a temporary file and renamed over the old ones,
    tensors first; the config's SHA-256 makes :func:`load_adapter` refuse a pair left mismatched by a crash between
    the two renames. Other files in the directory are kept. Merged adapters are refused (unmerge first)."""
    from safetensors.torch import save_file

    present = _need(model, "save_adapter")
    for m in present:
        merged = m.merged(model)
        if merged:
            raise RuntimeError(f"save_adapter: {m.peft_type} layers {merged[:3]} are merged; unmerge first (the "
                               "directory holds unmerged adapters)")
    tensors, methods = {}, []
    for m in present:
        t, meta = m.file(model)
        tensors.update({f"{m.prefix}.{k}": v for k, v in t.items()})
        methods.append({"peft_type": m.peft_type, "prefix": m.prefix, "metadata": _json_meta(meta)})
    p = os.path.abspath(os.fspath(path))
    if os.path.exists(p) and not os.path.isdir(p):
        raise FileExistsError(f"save_adapter: {p!r} is a file; save_adapter writes a directory")
    parent = os.path.dirname(p)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(p)}.", suffix=".tmp", dir=parent)
    try:
        wpath = os.path.join(tmp, WEIGHTS_NAME)
        save_file(tensors, wpath, metadata={"format": "pt"})
        from .. import __version__

        cfg = {"format": DIR_FORMAT, "peftcore_version": __version__, "methods": methods,
               "safetensors_sha256": _sha256(wpath)}
        with open(os.path.join(tmp, CONFIG_NAME), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
            f.write("\n")
        for name in (WEIGHTS_NAME, CONFIG_NAME):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
        if not os.path.exists(p):
            os.rename(tmp, p)
            tmp = None
        else:
            for name in (WEIGHTS_NAME, CONFIG_NAME):
                os.replace(os.path.join(tmp, name), os.path.join(p, name))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _read_dir(path: str):
    owner = "load_adapter"
    cpath = os.path.join(path, CONFIG_NAME)

    def err(msg):
        return L.LoadError(f"{owner}: {path!r}: {msg}")
    if not os.path.isfile(cpath):
        raise FileNotFoundError(f"{owner}: {path!r} has no {CONFIG_NAME} (not a directory from save_adapter)")
    try:
        with open(cpath) as f:
            cfg = json.load(f)
    except ValueError as e:
        raise err(f"{CONFIG_NAME} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("format") != DIR_FORMAT:
        fmt = cfg.get("format") if isinstance(cfg, dict) else None
        raise err(f"{CONFIG_NAME} has format {fmt!r}; this loader reads {DIR_FORMAT!r}")
    methods = cfg.get("methods")
    if not isinstance(methods, list) or not methods:
        raise err(f"{CONFIG_NAME}: 'methods' must be a non-empty list, got {L._show(methods)}")
    f = L.read_file(owner, os.path.join(path, WEIGHTS_NAME), ("pt",))
    sha = cfg.get("safetensors_sha256")
    if sha != _sha256(f.path):
        raise err(f"{WEIGHTS_NAME} does not match {CONFIG_NAME} (SHA-256 differs: files of two saves, or a save "
                  "interrupted between its two renames)")
    entries, seen = [], set()
    for e in methods:
        if not (isinstance(e, dict) and set(e) == {"peft_type", "prefix", "metadata"}
                and isinstance(e["metadata"], dict)):
            raise err(f"{CONFIG_NAME}: each method must be an object with peft_type, prefix, metadata; got "
                      f"{L._show(e)}")
        m = _BY_TYPE.get(e["peft_type"])
        if m is None:
            raise err(f"{CONFIG_NAME}: unknown peft_type {e['peft_type']!r} (known: {sorted(_BY_TYPE)})")
        if e["prefix"] != m.prefix or m.peft_type in seen:
            raise err(f"{CONFIG_NAME}: method {m.peft_type} has prefix {e['prefix']!r} (expected {m.prefix!r}) "
                      "or appears twice")
        seen.add(m.peft_type)
        fmt = e["metadata"].get("format")
        if fmt not in m.formats:
            raise err(f"{CONFIG_NAME}: {m.peft_type} metadata has format {fmt!r}; expected one of {m.formats}")
        entries.append((m, e["metadata"]))
    return f, entries


def load_adapter(model: nn.Module, path: Union[str, os.PathLike], strict: bool = True) -> nn.Module:
    """Load what :func:`save_adapter` wrote into ``model`` (a plain model, or one that already has the same
    adapters: their values are replaced in place) and return it.

    Each method in the directory is re-applied from its saved config and per-module metadata (plain
    ``nn.Linear`` modules get new adapter layers, attention gates and token elimination are installed), in load
    order. All or nothing: everything is checked against the model before it changes, and if a later method fails
    the earlier ones are undone, so the model is as it was. Strict: a tensor the model needs and the file lacks, a
    tensor the model has no place for (``strict=False`` ignores these), a shape or dtype kind that does not fit,
    an unknown module or metadata field is a :class:`~peftcore.tuners.LoadError` naming it. Afterwards, as after
    :func:`apply_adapter`, every adapter parameter trains and every other parameter is frozen (token elimination
    alone freezes nothing).

    ``path`` may also be one single-method safetensors file written by the per-method savers
    (``save_sparse_delta``, ``save_s2ft``, ``save_seer_gates``, ``tuners._adapters.save_file``)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"load_adapter: path must be a str or os.PathLike, got {type(path).__name__}")
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"load_adapter: {p!r} does not exist")
    if os.path.isdir(p):
        f, entries = _read_dir(p)
        parts = {m.prefix: {} for m, _ in entries}
        unexpected = []
        for k, t in f.tensors.items():
            prefix, _, rest = k.partition(".")
            (parts[prefix].__setitem__(rest, t) if prefix in parts else unexpected.append(k))
        if unexpected and strict:
            raise L.LoadError(f"load_adapter: {p!r}: unexpected tensor(s) of no method in {CONFIG_NAME}: "
                              f"{sorted(unexpected)[:6]} (pass strict=False to ignore)")
        files = [(m, L.LoadFile(f"load_adapter[{m.peft_type}]", p, parts[m.prefix], meta, meta["format"]))
                 for m, meta in sorted(entries, key=lambda e: METHODS.index(e[0]))]
    else:
        formats = [fmt for m in METHODS for fmt in m.formats]
        f = L.read_file("load_adapter", p, dict.fromkeys(formats))
        if f.format in (_adapters.FORMAT, _adapters.FORMAT_V1):
            ptype = f.meta.get("peft_type")
            m = _BY_TYPE.get(ptype) if ptype in _adapters._REGISTRY else None
            if m is None:
                raise f.error(f"unknown peft_type {ptype!r} (known: {sorted(_adapters._REGISTRY)})")
        else:
            m = next(m for m in METHODS if f.format in m.formats)
        files = [(m, f)]
    keep = {id(p_) for m in METHODS for p_ in m.trainable(model) if p_.requires_grad}
    done = []
    try:
        for m, lf in files:
            commit = m.stage_load(model, lf, strict)
            commit.run()
            done.append(commit)
    except BaseException:
        for c in reversed(done):
            c.undo()
        raise
    loaded = {m.peft_type for m, _ in files}
    train = {id(p_) for m in METHODS for p_ in m.trainable(model) if m.peft_type in loaded or id(p_) in keep}
    freeze = bool(loaded - {"TOKEN_ELIM"})  # as apply_adapter: token elimination alone freezes nothing
    for p_ in model.parameters():
        if id(p_) in train:
            p_.requires_grad_(True)
        elif freeze:
            p_.requires_grad_(False)
    return model
