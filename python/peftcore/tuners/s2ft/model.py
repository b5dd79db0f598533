"""Model-level API: apply (select, co-permute, wrap) / merge / unload / save / load S2FT."""
from __future__ import annotations

import os
from typing import Callable, Iterator, Optional, Union

import torch
from torch import nn

from .._model import (layers_of, merge_layers, module_file, read_module_file, replace_module, unload_layers,
                      unmerge_layers, write_file)
from .config import ATTN_PROJ, MLP_PROJ, PROJ_DIM, S2FTConfig
from .layer import S2FTLinear
from .permute import BlockInfo, expand, find_blocks, inverse, permute_block, selected_first, unit_size

CONFIG_ATTR = "peftcore_s2ft_config"
PERM_ATTR = "peftcore_s2ft_perms"  # {block name: {"groups": perm or None, "channels": perm or None}}
FORMAT = "peftcore.s2ft/1"


def s2ft_layers(model: nn.Module) -> Iterator[tuple[str, S2FTLinear]]:
    """``(name, layer)`` for every ``S2FTLinear`` in ``model``, in module order."""
    return layers_of(model, S2FTLinear)


def _plan(model: nn.Module, config: S2FTConfig) -> list[tuple[BlockInfo, list[str]]]:
    """``(block, projections that train)`` for every block that trains something."""
    blocks = find_blocks(model)
    if not blocks:
        raise ValueError("apply_s2ft: no Llama-style decoder block (self_attn.{q,k,v,o}_proj + mlp.{gate,up,down}_proj)")
    plan = []
    for i, info in enumerate(blocks):
        if config.layers_to_transform is not None and i not in config.layers_to_transform:
            continue
        projs = [p for p in ATTN_PROJ + MLP_PROJ if config.matches(info.proj_name(p))]
        for p in projs:
            if isinstance(info.proj(p), S2FTLinear):
                raise ValueError(f"apply_s2ft: {info.proj_name(p)!r} already has an S2FT delta")
            if not isinstance(info.proj(p), nn.Linear):
                raise TypeError(f"apply_s2ft: {info.proj_name(p)!r} is a {type(info.proj(p)).__name__}, not nn.Linear")
        if projs:
            plan.append((info, projs))
    if not plan:
        raise ValueError(f"apply_s2ft: no projection matches target_modules={config.target_modules!r}")
    return plan


@torch.no_grad()
def _unit_scores(info: BlockInfo, projs: list[str], use_grad: bool) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Per KV group and per channel: sum over the trained projections of the squared L2 norm of the slice that
    would train (of the weight, or of its gradient). ``None`` where nothing of that kind trains."""
    scores = {}
    for kind, names, n in (("attn", ATTN_PROJ, info.num_kv_heads), ("mlp", MLP_PROJ, info.intermediate)):
        total = None
        for p in projs:
            if p not in names:
                continue
            w = info.proj(p).weight
            t = w.grad if use_grad else w
            if t is None:
                raise RuntimeError(f"apply_s2ft: calib_fn gave no gradient for {info.proj_name(p)!r}")
            dim = PROJ_DIM[p]
            sq = t.detach().float().pow(2).sum(1 - dim)  # per row (dim 0) / per column (dim 1)
            s = sq.view(n, unit_size(info, p)).sum(1).cpu()
            total = s if total is None else total + s
        scores[kind] = total
    return scores["attn"], scores["mlp"]


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores, k, sorted=False).indices.sort().values


def apply_s2ft(
    model: nn.Module, config: S2FTConfig, calib_fn: Optional[Callable[[nn.Module], None]] = None, permute: bool = True
) -> nn.Module:
    """Alias of ``peftcore.apply_adapter(model, config, calib_fn=calib_fn, permute=permute)`` (same checks,
    including the rules for several methods on one model); what it does is :func:`_apply_s2ft`'s."""
    from ..api import apply_adapter

    return apply_adapter(model, config, calib_fn=calib_fn, permute=permute)


def _apply_s2ft(
    model: nn.Module, config: S2FTConfig, calib_fn: Optional[Callable[[nn.Module], None]] = None, permute: bool = True
) -> nn.Module:
    """S2FT in place: per targeted decoder block, select KV groups (heads) and FFN channels, co-permute the
    block so they come first (the function is unchanged), wrap the targeted projections in ``S2FTLinear`` on
    the contiguous range ``[0, k)``, freeze every other parameter; return ``model``.

    ``config.selection``:
      * ``"random"``: uniform without replacement, one generator seeded by ``config.seed`` (blocks in order,
        heads then channels).
      * ``"weight"``: the units whose trainable slices have the largest L2 norm (summed over the targeted
        projections of the block).
      * ``"gradient"``: ``calib_fn(model)`` runs forward + backward on calibration data (no optimizer step)
        before anything is wrapped; the targeted projections' weights get dense ``.grad`` for this (freed
        after); the units whose slices have the largest accumulated gradient norm win.

    ``permute=False`` skips the co-permutation: the layers then gather the selected rows/columns (no
    ``range_start``); use it where the weights must stay in place (e.g. tied or shared with another model).
    The permutations are kept on the model (``peftcore_s2ft_perms``) so unload and save go back to the
    original order.
    """
    if config.selection == "gradient" and calib_fn is None:
        raise ValueError("apply_s2ft: selection='gradient' needs calib_fn(model) running forward+backward")
    plan = _plan(model, config)
    if config.selection == "gradient":
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for info, projs in plan:
            for p in projs:
                info.proj(p).weight.requires_grad_(True)
        calib_fn(model)
    gen = torch.Generator().manual_seed(config.seed)
    perms = {}
    for info, projs in plan:
        has_attn = any(p in ATTN_PROJ for p in projs)
        has_mlp = any(p in MLP_PROJ for p in projs)
        g = config.groups_for(info.num_heads, info.num_kv_heads) if has_attn else 0
        c = config.channels_for(info.intermediate) if has_mlp else 0
        if config.selection == "random":
            groups = torch.randperm(info.num_kv_heads, generator=gen)[:g].sort().values if has_attn else None
            chans = torch.randperm(info.intermediate, generator=gen)[:c].sort().values if has_mlp else None
        else:
            ga, gm = _unit_scores(info, projs, use_grad=config.selection == "gradient")
            groups = _top(ga, g) if has_attn else None
            chans = _top(gm, c) if has_mlp else None
        selected = {"attn": groups, "mlp": chans}
        if permute:
            gp = selected_first(groups, info.num_kv_heads) if has_attn else None
            cp = selected_first(chans, info.intermediate) if has_mlp else None
            permute_block(info, gp, cp)
            perms[info.name] = {"groups": gp, "channels": cp}
        for p in projs:
            units = selected["attn" if p in ATTN_PROJ else "mlp"]
            size = unit_size(info, p)
            orig = expand(units, size)
            k = orig.numel()
            lin = info.proj(p)
            dev = lin.weight.device
            if permute:
                layer = S2FTLinear(lin, torch.arange(k, device=dev), PROJ_DIM[p], 0, orig, config.torch_delta_dtype)
            else:
                layer = S2FTLinear(lin, orig.to(dev), PROJ_DIM[p], None, orig, config.torch_delta_dtype)
            replace_module(model, info.proj_name(p), layer)
    if config.selection == "gradient":
        for info, projs in plan:
            for p in projs:
                info.proj(p).weight.grad = None
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in s2ft_layers(model):
        layer.delta.requires_grad_(True)
    setattr(model, CONFIG_ATTR, config)
    setattr(model, PERM_ATTR, {**getattr(model, PERM_ATTR, {}), **perms})
    return model


# ------------------------------------------------------------------------------------------ merge and unload


def merge_s2ft(model: nn.Module) -> nn.Module:
    """``merge_adapter`` for S2FT only: every delta added into its (permuted) base weight in place; the layers stay,
    ``unmerge_s2ft`` undoes it."""
    merge_layers(s2ft_layers(model))
    return model


def unmerge_s2ft(model: nn.Module) -> nn.Module:
    """``unmerge_adapter`` for S2FT only."""
    unmerge_layers(s2ft_layers(model))
    return model


def unload_s2ft(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace each ``S2FTLinear`` by its base ``nn.Linear``, with the delta merged (``merge=True``) or dropped
    (``merge=False``), and undo the co-permutation: the model is back in its original order (same parameter
    names and shapes as before ``apply_s2ft``). Returns ``model``."""
    unload_layers(model, s2ft_layers(model), merge)
    perms = getattr(model, PERM_ATTR, {})
    if perms:
        blocks = {b.name: b for b in find_blocks(model)}
        for bname, p in perms.items():
            gp, cp = p["groups"], p["channels"]
            permute_block(blocks[bname], None if gp is None else inverse(gp), None if cp is None else inverse(cp))
    for attr in (CONFIG_ATTR, PERM_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


# ------------------------------------------------------------------------------------------------ save / load


def s2ft_state(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {"index", "delta"}}`` in *original* coordinates (``index`` sorted ascending; ``delta``
    rows (dim 0) / columns (dim 1) in the same order), detached, on the layers' device."""
    out = {}
    for name, layer in s2ft_layers(model):
        order = torch.argsort(layer.orig_index)
        out[name] = {
            "index": layer.orig_index[order].detach(),
            "delta": layer.delta.detach().index_select(layer.dim, order),
        }
    return out


def s2ft_file(model: nn.Module, config: Optional[S2FTConfig] = None) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of every delta, in the model's original order: what :func:`save_s2ft` writes (and
    ``save_adapter`` puts in the directory): tensors ``"<module>.index"`` (int64) and ``"<module>.delta"`` (CPU);
    metadata ``format``, ``config`` (json), ``shapes`` (json ``{module: [out, in]}``) and ``dims`` (json
    ``{module: 0 | 1}``). Unpermuted, so it loads into the plain model or merges into its weights directly."""
    tensors, shapes, dims = {}, {}, {}
    for name, d in s2ft_state(model).items():
        layer = model.get_submodule(name)
        tensors[f"{name}.index"] = d["index"].cpu().contiguous()
        tensors[f"{name}.delta"] = d["delta"].cpu().contiguous()
        shapes[name] = [layer.out_features, layer.in_features]
        dims[name] = layer.dim
    return module_file(FORMAT, tensors, shapes, {"dims": dims}, config or getattr(model, CONFIG_ATTR, None),
                       "save_s2ft")


def save_s2ft(model: nn.Module, path: Union[str, os.PathLike], config: Optional[S2FTConfig] = None) -> None:
    """Write every delta to one safetensors file (the single-method format, :func:`s2ft_file`). The library-wide
    format is ``peftcore.save_adapter(model, directory)``; ``peftcore.load_adapter`` reads both."""
    write_file(*s2ft_file(model, config), path)


def _read(owner: str, path, strict: bool):
    from .. import _loading as L

    f, state, shapes, dims, config = read_module_file(owner, path, (FORMAT,), ("index", "delta"), S2FTConfig,
                                                      "dims", strict)
    for name, d in dims.items():
        if not (L._is_int(d) and d in (0, 1)):
            raise f.error(f"metadata 'dims': {name!r} must be 0 (rows) or 1 (columns), got {d!r}")
    return f, state, shapes, dims, config


def read_s2ft(path: Union[str, os.PathLike], strict: bool = True) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """``({module: {"index", "delta"}}, metadata)`` from a file written by :func:`save_s2ft` (format, metadata and
    the tensor set checked; extra tensors are an error unless ``strict=False``)."""
    f, state, _, _, _ = _read("read_s2ft", path, strict)
    return state, f.meta


def load_s2ft(model: nn.Module, path: Union[str, os.PathLike], strict: bool = True) -> nn.Module:
    """Load a file from :func:`save_s2ft` into ``model``, all or nothing (:mod:`peftcore.tuners._loading`).

    Plain ``nn.Linear`` modules (the un-permuted model) are wrapped in ``S2FTLinear`` on the saved original
    rows/columns (``range_start`` set where they are contiguous, else gathered); the base is frozen, the delta
    trainable, nothing else is touched. ``S2FTLinear`` modules (a model that ``apply_s2ft`` already co-permuted
    with the same selection) get the delta copied into their ``delta`` Parameter.

    Everything is checked before the model changes: format, metadata (``shapes``, ``dims``, ``config``), that every
    module exists and is an ``nn.Linear`` / ``S2FTLinear`` of the file's ``[out, in]``, the index (1-D integer,
    non-empty, sorted, unique, in range along ``dim``), the delta (floating, exactly ``[k, in]`` / ``[out, k]``);
    extra tensors are an error unless ``strict=False``. A new layer's delta keeps the file's dtype where the op
    accepts it (float32 or the weight's dtype), else it is cast to float32; an existing layer's keeps the layer's
    dtype. Returns ``model``."""
    stage_load(model, path, strict).run()
    return model


def stage_load(model: nn.Module, path, strict: bool = True):
    """Everything :func:`load_s2ft` checks, and the :class:`~peftcore.tuners._loading.Commit` that applies it (not
    run). ``path`` may also be a :class:`~peftcore.tuners._loading.LoadFile`."""
    from .. import _loading as L

    f, state, shapes, dims, config = _read("load_s2ft", path, strict)
    err = f.error
    modules = L.module_table(model)
    commit = L.Commit()
    with L.staging(model):
        for name, d in state.items():
            mod = L.linear_at(err, modules, name, (S2FTLinear, nn.Linear), "an nn.Linear or S2FTLinear")
            out_f, in_f = mod.out_features, mod.in_features
            if list(shapes[name]) != [out_f, in_f]:
                raise err(f"module {name!r} is [{out_f}, {in_f}], the delta is for {shapes[name]} "
                          "(a file from another model?)")
            dim, idx, delta = dims[name], d["index"], d["delta"]
            L.check_index(err, f"{name}.index", idx, (out_f, in_f)[dim])
            k = idx.numel()
            L.check_float(err, f"{name}.delta", delta, (k, in_f) if dim == 0 else (out_f, k))
            idx = idx.to(torch.int64)
            if isinstance(mod, S2FTLinear):
                order = torch.argsort(mod.orig_index.cpu())
                if mod.dim != dim or not torch.equal(mod.orig_index.cpu()[order], idx):
                    raise err(f"module {name!r} selects other rows/columns than the file (dim {mod.dim}, "
                              f"{mod.k} of them; the file: dim {dim}, {k})")
                if mod.merged:
                    raise err(f"module {name!r} is merged; unmerge it first")
                # the file is in sorted original order; the layer's delta in orig_index order
                new = torch.empty_like(mod.delta).index_copy_(dim, order.to(mod.delta.device), L.to_param(delta, mod.delta))
                commit.set_data(mod.delta, new)
            else:
                w = mod.weight
                ddtype = delta.dtype if delta.dtype in (torch.float32, w.dtype) else torch.float32
                a = int(idx[0])
                contiguous = torch.equal(idx, torch.arange(a, a + k))
                layer = S2FTLinear(mod, idx, dim, a if contiguous else None, None, ddtype)
                layer.delta.data = L.to_param(delta, layer.delta)
                layer.train(mod.training)
                commit.replace(model, name, layer)
                commit.requires_grad(mod.parameters(), False)
    if config is not None and not hasattr(model, CONFIG_ATTR):
        commit.set_attr(model, CONFIG_ATTR, config)
    return commit
