"""The one loading mechanism every peftcore loader uses (``load_adapter``, ``load_sparse_delta``, ``load_s2ft``,
``load_seer_gates``): all or nothing, and strict.

1. :func:`read_file` reads the whole safetensors file (every tensor and the metadata) and checks its format tag.
   A missing file, a directory, a truncated or corrupt file, or a file of another kind is a clear error.
2. The loader validates everything against the model with the helpers below (:meth:`LoadFile.json`,
   :meth:`LoadFile.config`, :func:`linear_at`, :func:`check_float`, :func:`check_index`, :meth:`Keys.extra`)
   and builds the new modules / values off to the side, inside :func:`staging` (which undoes any side effect
   a module constructor has on the model, e.g. freezing the wrapped linear).
3. A :class:`Commit` then applies the recorded steps (module swaps, parameter data, buffers, attributes,
   ``requires_grad`` flags) in one go; if a step raises, every step already done is undone in reverse order, so
   the model is bitwise as it was (same module objects, parameter values and flags, training modes).

Errors are :class:`LoadError` (a ``ValueError``) naming the loader, the file, the key or module and the
offending value; a missing path is ``FileNotFoundError``, a directory ``IsADirectoryError``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import typing
from dataclasses import fields
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

_MISSING = object()


class LoadError(ValueError):
    """A file (or state) that cannot be loaded into this model. Nothing in the model was changed."""


def _show(v: Any, limit: int = 80) -> str:
    s = repr(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


class LoadFile:
    """The whole content of one safetensors file: ``tensors`` (on the CPU), ``meta`` (str -> str), ``format``; or
    one method's part of an adapter directory (``meta`` then holds the JSON values themselves)."""

    def __init__(self, owner: str, path: str, tensors: dict[str, torch.Tensor], meta: dict[str, str], fmt: str):
        self.owner, self.path, self.tensors, self.meta, self.format = owner, path, tensors, meta, fmt

    def error(self, msg: str) -> LoadError:
        return LoadError(f"{self.owner}: {self.path!r}: {msg}")

    def json(self, key: str, kind: type = dict, required: bool = True, default: Any = None) -> Any:
        """Metadata ``key`` parsed as JSON and checked to be a ``kind`` (``dict`` or ``list``)."""
        if key not in self.meta:
            if required:
                raise self.error(f"metadata {key!r} is missing (the file has {sorted(self.meta)})")
            return default
        value = self.meta[key]
        if isinstance(value, str):  # safetensors metadata holds JSON text; an adapter_config.json the value itself
            try:
                value = json.loads(value)
            except ValueError as e:
                raise self.error(f"metadata {key!r} is not valid JSON ({e}): {_show(value)}") from None
        if not isinstance(value, kind):
            raise self.error(f"metadata {key!r} must be a JSON {'object' if kind is dict else kind.__name__}, "
                             f"got {type(value).__name__}: {_show(value)}")
        return value

    def config(self, cls: type, required: bool = False, overrides: Optional[dict] = None):
        """The ``config`` metadata as a ``cls`` instance (a JSON object whose fields exist in ``cls`` and have its
        field types; absent fields take their defaults), or ``None`` if absent and not ``required``."""
        d = self.json("config", dict, required=required)
        if d is None:
            return None
        return parse_config(cls, {**d, **(overrides or {})}, lambda m: self.error(f"config: {m}"))

    def shapes(self, key: str = "shapes") -> dict[str, list[int]]:
        """``{module: [out, in]}`` metadata, each a pair of non-negative ints."""
        shapes = self.json(key, dict)
        if not shapes:
            raise self.error(f"metadata {key!r} names no module (an empty file)")
        for name, s in shapes.items():
            if not (isinstance(s, list) and len(s) == 2 and all(_is_int(v) and v >= 0 for v in s)):
                raise self.error(f"metadata {key!r}: {name!r} must be [out_features, in_features], got {_show(s)}")
        return shapes


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def read_file(owner: str, path: Union[str, os.PathLike], formats: Iterable[str]) -> LoadFile:
    """Read every tensor and the metadata of the safetensors file at ``path``; its ``format`` metadata must be one
    of ``formats``."""
    from safetensors import safe_open

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{owner}: path must be a str or os.PathLike, got {type(path).__name__}")
    p = os.fspath(path)
    if not os.path.exists(p):
        raise FileNotFoundError(f"{owner}: {p!r} does not exist")
    if os.path.isdir(p):
        raise IsADirectoryError(f"{owner}: {p!r} is a directory, not a safetensors file")
    formats = tuple(formats)
    try:
        with safe_open(p, framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except OSError as e:
        raise OSError(f"{owner}: cannot read {p!r}: {e}") from e
    except Exception as e:  # safetensors' SafetensorError (header / size / dtype), truncated data
        raise LoadError(f"{owner}: {p!r} is not a readable safetensors file (truncated or corrupt?): "
                        f"{type(e).__name__}: {e}") from None
    fmt = meta.get("format")
    if fmt not in formats:
        raise LoadError(f"{owner}: {p!r} has format {fmt!r}; this loader reads {', '.join(map(repr, formats))}")
    return LoadFile(owner, p, tensors, meta, fmt)


# ------------------------------------------------------------------------------------------------------ configs


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a config field's type annotation (Optional / Union / list[...] / scalars)."""
    origin = typing.get_origin(hint)
    if origin is Union:
        return any(_conforms(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_conforms(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(_conforms(k, key) and _conforms(v, item) for k, v in value.items())
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _is_int(value)
    if hint is float:  # JSON's NaN / Infinity extensions are refused too
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if hint is Any:
        return True
    return False  # torch.dtype and anything else JSON cannot hold


def parse_config(cls: type, d: Any, error: Callable[[str], Exception]):
    """``cls(**d)`` for a dataclass config, after checking ``d`` is a dict of known fields of the right JSON types
    (and, if present, the right ``peft_type``). Absent fields take their defaults."""
    if not isinstance(d, dict):
        raise error(f"must be a JSON object, got {type(d).__name__}: {_show(d)}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise error(f"unknown field(s) {unknown} for {cls.__name__}")
    ptype = getattr(cls, "PEFT_TYPE", None) or known.get("peft_type") and known["peft_type"].default
    if "peft_type" in d and d["peft_type"] != ptype:
        raise error(f"peft_type is {d['peft_type']!r}, expected {ptype!r}")
    for k, v in d.items():
        if k != "peft_type" and not _conforms(v, hints[k]):
            raise error(f"field {k!r} must be {_hint_name(hints[k])}, got {_show(v)}")
    try:
        return cls.from_dict(d)
    except (TypeError, ValueError) as e:
        raise error(str(e)) from None


def _hint_name(hint) -> str:
    return str(hint).replace("typing.", "").replace("NoneType", "None")


# ------------------------------------------------------------------------------------------------------ checks


def check_finite_number(error: Callable[[str], Exception], what: str, v: Any) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        raise error(f"{what} must be a finite number, got {_show(v)}")
    return float(v)


class Keys:
    """The tensors of a file grouped by module: ``"<module>.<name>"`` -> ``{module: {name: tensor}}`` for the
    ``modules`` the file's metadata names (and the tensor ``names`` a loader reads, if given); other keys are
    *extra* (an error unless ``strict=False``)."""

    def __init__(self, tensors: dict[str, torch.Tensor], modules: Iterable[str], names: Optional[Iterable[str]] = None):
        modules, names = set(modules), None if names is None else set(names)
        self.by_module: dict[str, dict[str, torch.Tensor]] = {}
        self.unused: list[str] = []
        for key, t in tensors.items():
            module, _, name = key.rpartition(".")
            if module in modules and (names is None or name in names):
                self.by_module.setdefault(module, {})[name] = t
            else:
                self.unused.append(key)

    def extra(self, error: Callable[[str], Exception], strict: bool) -> None:
        if self.unused and strict:
            raise error(f"extra tensor(s) the model has no place for: {sorted(self.unused)[:6]}"
                        f"{' ...' if len(self.unused) > 6 else ''} ({len(self.unused)}; pass strict=False to ignore)")


def module_table(model: nn.Module) -> dict[str, nn.Module]:
    return dict(model.named_modules())


def linear_at(error: Callable[[str], Exception], modules: dict[str, nn.Module], name: str, types: tuple,
              what: str) -> nn.Module:
    """The module ``name`` of the model, which must be one of ``types`` with non-empty ``in/out_features``."""
    mod = modules.get(name) if name else None
    if mod is None:
        raise error(f"module {name!r} is not in the model")
    if not isinstance(mod, types):
        raise error(f"module {name!r} is a {type(mod).__name__}, not {what}")
    from ._layer import FrozenLinearAdapter

    parts = name.split(".")
    for i in range(1, len(parts)):
        outer = modules.get(".".join(parts[:i]))
        if isinstance(outer, FrozenLinearAdapter):
            raise error(f"module {name!r} is inside the {type(outer).__name__} {'.'.join(parts[:i])!r}; "
                        "name the layer itself")
    if hasattr(mod, "in_features") and (mod.in_features <= 0 or mod.out_features <= 0):
        raise error(f"module {name!r} has in_features={mod.in_features}, out_features={mod.out_features}; "
                    "an adapter needs both >= 1")
    return mod


def check_float(error: Callable[[str], Exception], key: str, t: torch.Tensor, shape: Optional[tuple] = None) -> None:
    """``t`` must be a floating tensor (of exactly ``shape`` if given)."""
    if not t.is_floating_point():
        raise error(f"tensor {key!r} must be floating point, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise error(f"tensor {key!r} has shape {tuple(t.shape)}, the model needs {tuple(shape)}")


def check_index(error: Callable[[str], Exception], key: str, t: torch.Tensor, upper: int,
                nonempty: bool = True) -> None:
    """``t`` must be a 1-D int32/int64 tensor of strictly increasing values in ``[0, upper)``."""
    if t.dtype not in (torch.int32, torch.int64):
        raise error(f"tensor {key!r} must hold int32 or int64 indices, got {t.dtype}")
    if t.dim() != 1:
        raise error(f"tensor {key!r} must be 1-D, got shape {tuple(t.shape)}")
    if nonempty and t.numel() == 0:
        raise error(f"tensor {key!r} is empty; at least one index is needed")
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= upper:
            bad = lo if lo < 0 else hi
            raise error(f"tensor {key!r} holds index {bad}, outside [0, {upper})")
        steps = t[1:] > t[:-1]
        if not bool(steps.all()):
            i = int((~steps).nonzero()[0])
            raise error(f"tensor {key!r} must be sorted ascending without repeats; entries {i}, {i + 1} are "
                        f"{int(t[i])}, {int(t[i + 1])}")


def to_param(t: torch.Tensor, like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A fresh contiguous copy of ``t`` on ``like``'s device, in ``dtype`` (default ``like``'s dtype)."""
    return t.to(device=like.device, dtype=dtype or like.dtype, copy=True).contiguous()


# ------------------------------------------------------------------------------------------------ staging / commit


@contextlib.contextmanager
def staging(model: nn.Module):
    """Build new modules inside this block: on exit, every parameter of ``model`` gets its ``requires_grad`` flag
    back and every module its training mode (module constructors such as ``FrozenLinearAdapter`` freeze the layer
    they wrap; the commit sets the flags for real)."""
    params = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for p, flag in params:
            if p.requires_grad != flag:
                p.requires_grad_(flag)
        for m, mode in modes:
            m.training = mode


class Commit:
    """Steps that change the model, recorded during validation and applied by :meth:`run`, which undoes every step
    already done, in reverse order, if one raises."""

    def __init__(self):
        self._steps: list[Callable[[], Callable[[], None]]] = []
        self._after: list[Callable[[], None]] = []
        self._undo: list[Callable[[], None]] = []

    def step(self, do: Callable[[], Callable[[], None]]) -> None:
        """``do()`` changes the model and returns the function that undoes exactly that change."""
        self._steps.append(do)

    def replace(self, model: nn.Module, name: str, new: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")

        def do():
            parent = model.get_submodule(parent_name) if parent_name else model
            old = getattr(parent, child)
            setattr(parent, child, new)
            return lambda: setattr(parent, child, old)

        self.step(do)

    def set_data(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """Give ``param`` (a Parameter or buffer; the object stays) the contents of ``value``: copied in place when
        shape, dtype and device agree (storage shared with views or other modules stays shared; undo copies the old
        values back), else ``param.data = value`` (undo puts the old storage back)."""

        def do():
            if (param.shape, param.dtype, param.device) == (value.shape, value.dtype, value.device):
                old = param.detach().clone()
                param.data.copy_(value)
                return lambda: param.data.copy_(old)
            old = param.data
            param.data = value
            return lambda: setattr(param, "data", old)

        self.step(do)

    def set_attr(self, obj: Any, name: str, value: Any) -> None:
        """``setattr`` (modules: also buffers); undo restores the old value or deletes an attribute that was new."""

        def do():
            old = getattr(obj, name, _MISSING)
            setattr(obj, name, value)
            return lambda: delattr(obj, name) if old is _MISSING else setattr(obj, name, old)

        self.step(do)

    def requires_grad(self, params: Iterable[torch.Tensor], flag: bool) -> None:
        params = list(params)

        def do():
            changed = [p for p in params if p.requires_grad != flag]
            for p in changed:
                p.requires_grad_(flag)

            def undo():
                for p in changed:
                    p.requires_grad_(not flag)
            return undo

        self.step(do)

    def after(self, fn: Callable[[], None]) -> None:
        """``fn()`` runs after every step succeeded (e.g. rebuilding caches)."""
        self._after.append(fn)

    def run(self) -> None:
        undo = self._undo = []
        try:
            with torch.no_grad():
                for do in self._steps:
                    undo.append(do())
        except BaseException:
            self.undo()
            raise
        for fn in self._after:
            fn()

    def undo(self) -> None:
        """Undo every step done by :meth:`run` (in reverse order); what ``load_adapter`` calls when a later method of
        the same directory fails."""
        with torch.no_grad():
            for u in reversed(self._undo):
                u()
        self._undo = []
