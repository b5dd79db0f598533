"""Model-level API: apply / drop-and-grow / merge / unload / save / load / compose sparse deltas."""
from __future__ import annotations

import math
import os
import warnings
from typing import Callable, Iterator, Optional, Union

import torch
from torch import nn

from .._model import (find_linear_targets, layers_of, merge_layers, module_file, read_module_file, replace_module,
                      unload_layers, unmerge_layers, write_file)
from .config import SparseDeltaConfig
from .layer import SparseDeltaLinear
from .selection import ActivationCapture, gradient_indices, magnitude_indices, random_indices

CONFIG_ATTR = "peftcore_sparse_delta_config"
FORMAT = "peftcore.sparse_delta/1"

DeltaState = dict[str, torch.Tensor]  # {"indices", "values"}
GradsFn = Callable[[str], tuple[torch.Tensor, torch.Tensor]]  # module name -> (grad_out [T, out], x [T, in])


def sparse_delta_layers(model: nn.Module) -> Iterator[tuple[str, SparseDeltaLinear]]:
    """``(name, layer)`` for every ``SparseDeltaLinear`` in ``model``, in module order."""
    return layers_of(model, SparseDeltaLinear)


def apply_sparse_delta(
    model: nn.Module, config: SparseDeltaConfig, calib_fn: Optional[Callable[[nn.Module], None]] = None
) -> nn.Module:
    """Alias of ``peftcore.apply_adapter(model, config, calib_fn=calib_fn)`` (same checks, including the rules for
    several methods on one model); what it does is :func:`_apply_sparse_delta`'s."""
    from ..api import apply_adapter

    return apply_adapter(model, config, calib_fn=calib_fn)


def _apply_sparse_delta(
    model: nn.Module, config: SparseDeltaConfig, calib_fn: Optional[Callable[[nn.Module], None]] = None
) -> nn.Module:
    """Replace the targeted ``nn.Linear`` modules of ``model`` by ``SparseDeltaLinear`` in place; freeze every
    other parameter (only the deltas' ``values`` train); return ``model``.

    ``config.selection``:
      * ``"random"``: uniform without replacement (one generator seeded by ``config.seed``, modules in order).
      * ``"magnitude"``: the smallest ``|w|`` of each weight (SaRA), one weight at a time.
      * ``"gradient"``: ``calib_fn(model)`` must run forward + backward on calibration data (any number of
        batches; no optimizer step). The layers are first wrapped with zero-valued placeholder deltas, so the
        model's function is unchanged and no dense weight gradient is ever formed; hooks record each layer's
        input and output gradient, *concatenated over all batches* (so the score is the exact accumulated
        ``|sum_b g_b^T x_b|``, up to ``config.max_calib_tokens`` tokens per layer), and
        ``sparse_delta_topk_grad`` picks the top ``nnz`` positions tile by tile (LT-SFT / SpIEL-AG).
    """
    if config.selection == "gradient" and calib_fn is None:
        raise ValueError("apply_sparse_delta: selection='gradient' needs calib_fn(model) running forward+backward")
    targets = find_linear_targets(model, config, "apply_adapter(SparseDeltaConfig)")
    gen = torch.Generator().manual_seed(config.seed)
    new_layers: dict[str, SparseDeltaLinear] = {}
    for name, lin in targets:
        k = config.nnz_for(lin.out_features, lin.in_features)
        if config.selection == "random":
            idx = random_indices(lin.out_features, lin.in_features, k, gen)
        elif config.selection == "magnitude":
            idx = magnitude_indices(lin.weight, k)
        else:
            idx = torch.arange(k)  # placeholder until calibration; values are zero so the forward is unchanged
        layer = SparseDeltaLinear(lin, idx.to(config.torch_index_dtype), config.scale, config.torch_values_dtype)
        replace_module(model, name, layer)
        new_layers[name] = layer
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in sparse_delta_layers(model):
        layer.values.requires_grad_(True)

    if config.selection == "gradient":
        with ActivationCapture(new_layers, max_tokens=config.max_calib_tokens) as cap:
            calib_fn(model)
        for name, layer in new_layers.items():
            if not cap.has(name):
                warnings.warn(f"apply_sparse_delta: calib_fn gave no gradient for {name!r}; keeping random indices")
                k = layer.nnz
                idx = random_indices(layer.out_features, layer.in_features, k, gen)
            else:
                idx = gradient_indices(*cap.get(name), layer.nnz)
            layer.set_delta(idx, torch.zeros_like(layer.values))
            layer.values.grad = None
        del cap
    setattr(model, CONFIG_ATTR, config)
    return model


# ---------------------------------------------------------------------------------------------- drop and grow


@torch.no_grad()
def _drop_and_grow_layer(
    layer: SparseDeltaLinear, optimizer: Optional[torch.optim.Optimizer], n: int, g: torch.Tensor, x: torch.Tensor
) -> int:
    nnz, v, dev = layer.nnz, layer.values, layer.values.device
    n = min(n, nnz)
    if n <= 0:
        return 0
    order = torch.argsort(v.detach().abs().float(), stable=True)
    keep = torch.ones(nnz, dtype=torch.bool, device=dev)
    keep[order[:n]] = False
    kept_pos = keep.nonzero().squeeze(1)  # ascending, so kept indices stay sorted
    old_idx = layer.indices.long()
    kept_idx = old_idx[kept_pos]
    grown = gradient_indices(g, x, n, exclude=kept_idx).to(dev)
    new_idx, perm = torch.cat([kept_idx, grown]).sort()
    src = torch.cat([kept_pos, torch.full((n,), -1, dtype=kept_pos.dtype, device=dev)])[perm]
    is_new = src < 0
    src = src.clamp(min=0)

    def realign(t: torch.Tensor) -> None:  # in place: same storage, so every reference stays valid
        out = t[src.to(t.device)]
        out[is_new.to(t.device)] = 0
        t.copy_(out)

    realign(v.data)
    if v.grad is not None:
        realign(v.grad)
    if optimizer is not None:
        # Adam/AdamW exp_avg, exp_avg_sq (max_exp_avg_sq), SGD momentum_buffer...: every per-entry state tensor.
        for t in optimizer.state.get(v, {}).values():
            if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() == nnz:
                realign(t)
    added = int((~torch.isin(grown, old_idx)).sum())  # before the copy: old_idx may alias layer.indices
    layer.indices.copy_(new_idx.to(layer.indices.dtype))
    layer.refresh_csr()
    return added


def drop_and_grow(
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    fraction: float,
    grads_fn: Union[GradsFn, ActivationCapture],
) -> dict[str, int]:
    """SpIEL-style update of every ``SparseDeltaLinear``'s support, nnz constant.

    Per layer: drop the ``round(fraction * nnz)`` entries of smallest ``|values|``; grow as many new positions,
    the largest ``|grad_out^T x|`` not among the kept ones (``sparse_delta_topk_grad(..., exclude=kept)``; a just
    dropped position may come back, reset to zero); merge kept + grown indices sorted. ``values`` (same
    ``Parameter`` and storage), its ``.grad`` and every per-entry optimizer state tensor (Adam's ``exp_avg``,
    ``exp_avg_sq``) are permuted the same way, kept entries bit-exact, new entries zero; the optimizer's
    ``param_groups`` keep the same parameter object.

    ``grads_fn(name) -> (grad_out [T, out], x [T, in])`` of the last backward, or an ``ActivationCapture``
    that recorded it. Layers without captured data are left alone. Returns ``{name: positions newly added}``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"drop_and_grow: fraction must be in [0, 1], got {fraction}")
    stats = {}
    for name, layer in sparse_delta_layers(model):
        if layer.merged:
            raise RuntimeError(f"drop_and_grow: {name!r} is merged; unmerge first")
        if hasattr(layer.values, "device_mesh"):
            raise NotImplementedError(
                f"drop_and_grow: {name!r}'s values are a DTensor (sharded, e.g. by FSDP2's fully_shard); "
                "drop-and-grow permutes the whole values tensor and its optimizer state on every rank: train with "
                "DDP, or with a fixed support (no drop-and-grow) under FSDP2")
        if isinstance(grads_fn, ActivationCapture):
            if not grads_fn.has(name):
                continue
            g, x = grads_fn.get(name)
        else:
            g, x = grads_fn(name)
        stats[name] = _drop_and_grow_layer(layer, optimizer, round(fraction * layer.nnz), g, x)
    return stats


class SparseDeltaScheduler:
    """Periodic drop-and-grow during training (SpIEL). Call ``step()`` right after ``optimizer.step()``.

    Every ``every_n_steps`` steps (from ``start_step``, up to ``end_step`` if given) it runs
    :func:`drop_and_grow` with the inputs / output gradients of that step's forward+backward (all micro-batches
    of the step, concatenated), which hooks record only during the steps that are due. The drop fraction is
    ``drop_fraction``, cosine-annealed to 0 at ``end_step`` when ``anneal="cosine"`` (as in RigL).
    Extra memory on due steps only: each layer's output gradient ``[tokens, out]`` (the inputs are the tensors
    autograd saves anyway), released after the update.

    Distributed data parallel (DDP): when ``torch.distributed`` is initialised with more than one process in
    ``process_group`` (default: the whole world), the captured inputs and output gradients of every rank are
    all-gathered (rank order) before scoring, so every rank grows the same positions: the ones a single process
    finds on the global batch (the activation gradients of a rank's local loss differ from the global ones by a
    constant factor only, which leaves the top-k unchanged). Every rank must call ``step()``. The gathered tokens
    cost ``world * tokens * (in + out)`` elements per layer on due steps (bound them with ``max_tokens``, per rank).
    Sharded values (FSDP2) are refused; see ``docs/distributed.md``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer],
        drop_fraction: float = 0.1,
        every_n_steps: int = 100,
        start_step: int = 0,
        end_step: Optional[int] = None,
        anneal: str = "constant",
        max_tokens: Optional[int] = None,
        process_group=None,
    ):
        if every_n_steps < 1:
            raise ValueError(f"SparseDeltaScheduler: every_n_steps must be >= 1, got {every_n_steps}")
        if anneal not in ("constant", "cosine"):
            raise ValueError(f"SparseDeltaScheduler: anneal must be 'constant' or 'cosine', got {anneal!r}")
        if anneal == "cosine" and end_step is None:
            raise ValueError("SparseDeltaScheduler: anneal='cosine' needs end_step")
        self.model, self.optimizer = model, optimizer
        self.drop_fraction, self.every_n_steps = drop_fraction, every_n_steps
        self.start_step, self.end_step, self.anneal = start_step, end_step, anneal
        self.process_group = process_group
        layers = dict(sparse_delta_layers(model))
        if not layers:
            raise ValueError("SparseDeltaScheduler: the model has no SparseDeltaLinear")
        self.capture = ActivationCapture(layers, max_tokens)
        self.step_count = 0
        self.history: list[tuple[int, float, dict[str, int]]] = []
        self._arm()

    def is_due(self, step: int) -> bool:
        return (
            step > self.start_step
            and (step - self.start_step) % self.every_n_steps == 0
            and (self.end_step is None or step <= self.end_step)
        )

    def fraction_at(self, step: int) -> float:
        if self.anneal == "cosine":
            return self.drop_fraction * 0.5 * (1 + math.cos(math.pi * min(step, self.end_step) / self.end_step))
        return self.drop_fraction

    def _arm(self) -> None:
        self.capture.remove()
        self.capture.clear()
        if self.is_due(self.step_count + 1):
            self.capture.__enter__()

    def step(self) -> Optional[dict[str, int]]:
        self.step_count += 1
        stats = None
        if self.is_due(self.step_count):
            frac = self.fraction_at(self.step_count)
            stats = drop_and_grow(self.model, self.optimizer, frac, self._gathered())
            self.history.append((self.step_count, frac, stats))
        self._arm()
        return stats

    def _world(self) -> int:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def _gathered(self) -> ActivationCapture:
        """The capture, with every rank's tokens (rank order) when running distributed."""
        world = self._world()
        if world == 1:
            return self.capture
        import torch.distributed as dist

        out = ActivationCapture(self.capture.modules)
        for name, layer in self.capture.modules.items():
            if self.capture.has(name):
                g, x = self.capture.get(name)
            else:  # this rank saw no batch for the layer: it still takes part in the gather
                w = layer.base_layer.weight
                g = w.new_zeros(0, layer.out_features)
                x = w.new_zeros(0, layer.in_features)
            n = torch.tensor([g.shape[0]], device=g.device)
            sizes = [torch.zeros_like(n) for _ in range(world)]
            dist.all_gather(sizes, n, group=self.process_group)
            sizes = [int(s) for s in sizes]
            parts = []
            for t in (g, x):
                padded = t.new_zeros(max(sizes), t.shape[1])
                padded[: t.shape[0]] = t
                bufs = [torch.empty_like(padded) for _ in range(world)]
                dist.all_gather(bufs, padded.contiguous(), group=self.process_group)
                parts.append(torch.cat([b[:s] for b, s in zip(bufs, sizes)]))
            if parts[0].shape[0]:
                out._slots[name].append([parts[1], parts[0]])
        return out

    def close(self) -> None:
        self.capture.remove()
        self.capture.clear()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._arm()


# ------------------------------------------------------------------------------------------ merge and unload


def merge_sparse_delta(model: nn.Module) -> nn.Module:
    """``merge_adapter`` for the sparse deltas only: every delta added into its base weight in place (the forward
    becomes the plain linear)."""
    merge_layers(sparse_delta_layers(model))
    return model


def unmerge_sparse_delta(model: nn.Module) -> nn.Module:
    """``unmerge_adapter`` for the sparse deltas only."""
    unmerge_layers(sparse_delta_layers(model))
    return model


def unload_sparse_delta(model: nn.Module, merge: bool = True) -> nn.Module:
    """``unload_adapter`` for the sparse deltas only: each ``SparseDeltaLinear`` replaced by its base ``nn.Linear``,
    with the delta merged (``merge=True``) or dropped (``merge=False``, the original weights). Returns ``model``."""
    unload_layers(model, sparse_delta_layers(model), merge, (CONFIG_ATTR,))
    return model


# --------------------------------------------------------------------------------------- save / load / compose


def sparse_delta_state(model: nn.Module) -> dict[str, DeltaState]:
    """``{module name: {"indices", "values"}}`` of every delta in ``model``."""
    return {name: layer.delta_state() for name, layer in sparse_delta_layers(model)}


def sparse_delta_file(model: nn.Module, config: Optional[SparseDeltaConfig] = None) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of every delta: what :func:`save_sparse_delta` writes (and ``save_adapter`` puts in
    the directory): tensors ``"<module>.indices"`` / ``"<module>.values"`` (CPU); metadata ``format``, ``config``
    (json), ``shapes`` (json ``{module: [out, in]}``) and ``scales``."""
    tensors, shapes, scales = {}, {}, {}
    for name, layer in sparse_delta_layers(model):
        tensors[f"{name}.indices"] = layer.indices.detach().cpu().contiguous()
        tensors[f"{name}.values"] = layer.values.detach().cpu().contiguous()
        shapes[name] = [layer.out_features, layer.in_features]
        scales[name] = layer.scale
    return module_file(FORMAT, tensors, shapes, {"scales": scales}, config or getattr(model, CONFIG_ATTR, None),
                       "save_sparse_delta")


def save_sparse_delta(model: nn.Module, path: Union[str, os.PathLike], config: Optional[SparseDeltaConfig] = None):
    """Write every delta to one safetensors file (the single-method format, :func:`sparse_delta_file`). The
    library-wide format is ``peftcore.save_adapter(model, directory)``; ``peftcore.load_adapter`` reads both."""
    write_file(*sparse_delta_file(model, config), path)


def _read(owner: str, path, strict: bool):
    from .. import _loading as L

    f, state, shapes, scales, config = read_module_file(owner, path, (FORMAT,), ("indices", "values"),
                                                        SparseDeltaConfig, "scales", strict)
    for name, v in scales.items():
        L.check_finite_number(f.error, f"metadata 'scales': {name!r}", v)
    return f, state, shapes, scales, config


def read_sparse_delta(path: Union[str, os.PathLike], strict: bool = True) -> tuple[dict[str, DeltaState], dict[str, str]]:
    """``({module: {"indices", "values"}}, metadata)`` from a file written by :func:`save_sparse_delta` (format,
    metadata and the tensor set checked; extra tensors are an error unless ``strict=False``)."""
    f, state, _, _, _ = _read("read_sparse_delta", path, strict)
    return state, f.meta


def load_sparse_delta(
    model: nn.Module, source: Union[str, os.PathLike, dict[str, DeltaState]], scale: Optional[float] = None,
    strict: bool = True,
) -> nn.Module:
    """Load deltas (a file from :func:`save_sparse_delta`, or a ``{module: {"indices", "values"}}`` state such as
    :func:`compose_deltas` returns) into ``model``, all or nothing (:mod:`peftcore.tuners._loading`).

    Modules that already are ``SparseDeltaLinear`` get the new delta (same ``values`` Parameter); plain
    ``nn.Linear`` modules are wrapped (base frozen, values trainable; nothing else is touched). The scale is
    ``scale`` if given, else the file's per-module scale (else, for a state dict, the layer's / 1.0).

    Everything is checked before the model changes: the file's format and metadata (``shapes``, ``scales``,
    ``config``), that every module exists, is an ``nn.Linear`` / ``SparseDeltaLinear`` of the file's
    ``[out, in]``, indices 1-D int32/int64, non-empty, sorted, unique and in ``[0, out*in)``, values 1-D floating
    of the same length; extra tensors are an error unless ``strict=False``. A state dict has no shapes: only the
    index range is checked against the model. Values keep their dtype in a new layer where the op accepts it
    (float32 or the weight's dtype), else they are cast to float32 (e.g. float64 values for a float32 model); an
    existing layer's values keep the layer's dtype. Returns ``model``."""
    stage_load(model, source, scale, strict).run()
    return model


def stage_load(model: nn.Module, source, scale: Optional[float] = None, strict: bool = True):
    """Everything :func:`load_sparse_delta` checks, and the :class:`~peftcore.tuners._loading.Commit` that
    applies it (not run). ``source`` may also be a :class:`~peftcore.tuners._loading.LoadFile`."""
    from .. import _loading as L

    owner = "load_sparse_delta"
    if isinstance(source, dict):
        def err(m):
            return L.LoadError(f"{owner}: state: {m}")
        state, shapes, scales, config = {}, None, {}, None
        for name, d in source.items():
            if not isinstance(d, dict) or not {"indices", "values"} <= set(d):
                raise err(f"{name!r} must be a dict with 'indices' and 'values', got {type(d).__name__} "
                          f"{sorted(d) if isinstance(d, dict) else ''}")
            extra = sorted(set(d) - {"indices", "values"})
            if extra and strict:
                raise err(f"{name!r} has extra entries {extra} (pass strict=False to ignore)")
            for k in ("indices", "values"):
                if not isinstance(d[k], torch.Tensor):
                    raise err(f"{name}.{k} must be a tensor, got {type(d[k]).__name__}")
            state[name] = d
    else:
        f, state, shapes, scales, config = _read(owner, source, strict)
        err = f.error
    if scale is not None:
        scale = L.check_finite_number(err, "scale", scale)
    modules = L.module_table(model)
    commit = L.Commit()
    with L.staging(model):
        for name, d in state.items():
            mod = L.linear_at(err, modules, name, (SparseDeltaLinear, nn.Linear), "an nn.Linear or SparseDeltaLinear")
            out_f, in_f = mod.out_features, mod.in_features
            if shapes is not None and list(shapes[name]) != [out_f, in_f]:
                raise err(f"module {name!r} is [{out_f}, {in_f}], the delta is for {shapes[name]} "
                          "(a file from another model?)")
            idx, vals = d["indices"], d["values"]
            L.check_index(err, f"{name}.indices", idx, out_f * in_f)
            L.check_float(err, f"{name}.values", vals)
            if vals.dim() != 1 or vals.numel() != idx.numel():
                raise err(f"tensor {name + '.values'!r} has shape {tuple(vals.shape)}, the model needs "
                          f"({idx.numel()},) (one value per index)")
            s = scale if scale is not None else scales.get(name)
            if isinstance(mod, SparseDeltaLinear):
                if mod.merged:
                    raise err(f"module {name!r} is merged; unmerge it first")
                if mod.indices.dtype == torch.int32 and out_f * in_f > 2**31 - 1:
                    raise err(f"module {name!r} keeps int32 indices but has {out_f * in_f} entries")
                if idx.numel() != mod.nnz:
                    commit.set_attr(mod.values, "grad", None)
                commit.set_data(mod.values, L.to_param(vals, mod.values))
                commit.set_data(mod.indices, L.to_param(idx, mod.indices))
                if s is not None:
                    commit.set_attr(mod, "scale", float(s))
            else:
                w = mod.weight
                vdtype = vals.dtype if vals.dtype in (torch.float32, w.dtype) else torch.float32
                layer = SparseDeltaLinear(mod, idx, 1.0 if s is None else s, vdtype, validate=False)
                layer.values.data = L.to_param(vals, layer.values)
                layer.train(mod.training)
                commit.replace(model, name, layer)
                commit.requires_grad(mod.parameters(), False)
    if config is not None and not hasattr(model, CONFIG_ATTR):
        commit.set_attr(model, CONFIG_ATTR, config)

    def refresh():  # indices may have been copied in place through .data
        for _, layer in sparse_delta_layers(model):
            layer.refresh_csr()
    commit.after(refresh)
    return commit


def _compose_one(deltas: list[DeltaState], weights: list[float]) -> DeltaState:
    idx = torch.cat([d["indices"].long().cpu() for d in deltas])
    vals = torch.cat([w * d["values"].detach().float().cpu() for d, w in zip(deltas, weights)])
    uniq, inv = torch.unique(idx, sorted=True, return_inverse=True)
    return {"indices": uniq, "values": torch.zeros(uniq.numel()).index_add_(0, inv, vals)}


def compose_deltas(*deltas, weights: Optional[list[float]] = None):
    """Sum sparse deltas: indices are the (sorted) union, values summed where positions overlap (float32).

    Each argument is one weight's delta ``{"indices", "values"}`` — the result is one such dict — or a whole
    model's ``{module: {"indices", "values"}}`` (from :func:`sparse_delta_state` / :func:`read_sparse_delta`) or
    a path to a saved file — the result then is per module, modules of any input included. ``weights`` scales
    each input's values (e.g. the layers' scales if they differ: then load the result with ``scale=1``).
    """
    if not deltas:
        raise ValueError("compose_deltas: nothing to compose")
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    if len(weights) != len(deltas):
        raise ValueError(f"compose_deltas: {len(deltas)} deltas but {len(weights)} weights")
    loaded = [read_sparse_delta(d)[0] if isinstance(d, (str, os.PathLike)) else d for d in deltas]
    if all(set(d) == {"indices", "values"} and isinstance(d["values"], torch.Tensor) for d in loaded):
        return _compose_one(loaded, weights)
    out = {}
    for name in dict.fromkeys(n for d in loaded for n in d):
        parts = [(d[name], w) for d, w in zip(loaded, weights) if name in d]
        out[name] = _compose_one([p for p, _ in parts], [w for _, w in parts])
    return out
