"""Model-level API: swap a HF Llama-style model's self-attention for gate + block-sparse attention.

Llama, Mistral, Qwen2 (and Qwen3's q/k norms) share the attention structure: ``q_proj / k_proj / v_proj /
o_proj``, rotary embeddings handed in as ``position_embeddings=(cos, sin)`` (transformers 5.x). Each chosen
decoder layer's ``self_attn`` is wrapped by :class:`SeerAttention`, which computes q / k / v with the original
projections, applies RoPE, runs the layer's :class:`AttnGate` on the pre-RoPE q / k, and calls
``peftcore.ops.sparse_attn.block_sparse_attn`` (GQA: k / v with their ``Hkv`` heads, never repeated).
"""
from __future__ import annotations

import os
from typing import Iterator, Optional, Union

import torch
from torch import nn

from ...ops.sparse_attn import block_sparse_attn
from .config import MODES, SeerAttnConfig
from .gate import AttnGate, block_visibility, seer_distill_loss, seer_distill_target

CONFIG_ATTR = "peftcore_seer_config"
FORMAT = "peftcore.seer_attn/1"
ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def _rope(x, cos, sin):
    """HF's rotate-half RoPE, ``cos / sin [B, L, D]`` broadcast over heads."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _is_plain_causal(mask: torch.Tensor, L: int) -> bool:
    """Whether a HF 4-D attention mask (bool: True = attend; float: 0 = attend) is exactly causal, no padding."""
    if mask.dim() != 4 or mask.shape[-2:] != (L, L):
        return False
    allowed = mask if mask.dtype == torch.bool else mask == 0
    return bool((allowed == torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()).all())


class SeerAttention(nn.Module):
    """A Llama-style ``self_attn`` (kept as ``base_attn``, frozen) plus its :class:`AttnGate`.

    Modes (``self.mode``):
      * ``"distill"``: dense causal attention (``block_sparse_attn`` with every block), the LM is unchanged; the
        gate's distillation loss against the attention's block pool is kept in ``last_loss`` (with grad);
      * ``"sparse"``: attention over the gate's block mask;
      * ``"dense"``: dense causal ``block_sparse_attn``, no gate (a baseline).
    ``last_block_mask`` / ``last_kept`` / ``last_visible`` record the gate's mask of the last forward (in distill
    mode the mask it *would* use). Attributes not found here are read from ``base_attn``.

    Not covered (falls back to ``base_attn``, dense): decoding with a non-empty KV cache; raises on padding masks.
    """

    def __init__(self, base_attn: nn.Module, gate: AttnGate, config: SeerAttnConfig):
        super().__init__()
        self.base_attn = base_attn
        self.gate = gate
        self.mode = config.mode
        self.block_size = config.block_size
        self.loss_skip_fraction = config.loss_skip_fraction
        self.last_loss: Optional[torch.Tensor] = None
        self.last_block_mask: Optional[torch.Tensor] = None
        self.last_kept: Optional[torch.Tensor] = None
        self.last_visible: Optional[torch.Tensor] = None

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_attn":
                raise
            return getattr(self.base_attn, name)

    def _qkv(self, hidden_states):
        a = self.base_attn
        shape = (*hidden_states.shape[:-1], -1, a.head_dim)
        q, k, v = (getattr(a, p)(hidden_states).view(shape) for p in ("q_proj", "k_proj", "v_proj"))
        if getattr(a, "q_norm", None) is not None:  # Qwen3-style per-head norms, before RoPE
            q, k = a.q_norm(q), a.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        a = self.base_attn
        L = hidden_states.shape[1]
        layer_idx = getattr(a, "layer_idx", 0)
        if cache is not None and cache.get_seq_length(layer_idx) > 0:  # decoding: not the gate's job (yet)
            return a(hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask,
                     cache=cache, **kwargs)
        if attention_mask is not None and not _is_plain_causal(attention_mask, L):
            raise ValueError("SeerAttention: only causal masks without padding are supported; pass unpadded batches")
        q0, k0, v = self._qkv(hidden_states)
        cos, sin = position_embeddings
        q, k = _rope(q0, cos, sin), _rope(k0, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, layer_idx, kwargs=kwargs)
        bs = self.block_size
        mask = None
        if self.mode != "dense":
            logits = self.gate.logits(q0.detach(), k0.detach(), kwargs.get("position_ids"))
            scores = torch.softmax(logits, dim=-1)
            with torch.no_grad():
                bmask = self.gate.to_block_mask(scores.detach())
                vis = block_visibility(bmask.shape[-2], bmask.shape[-1], self.gate.causal, bmask.device)
                self.last_block_mask = bmask
                self.last_kept = bmask.sum()
                self.last_visible = vis.sum() * bmask.shape[0] * bmask.shape[1]
            if self.mode == "distill":
                target = seer_distill_target(q, k, bs, self.gate.causal, a.scaling)
                self.last_loss = seer_distill_loss(logits, target, self.gate.causal, self.loss_skip_fraction)
            else:
                mask = bmask
        out = block_sparse_attn(q, k, v, mask, bs, True, a.scaling)
        out = out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1).contiguous()
        return a.o_proj(out), None


# ------------------------------------------------------------------------------------------------ apply / remove


def _decoder_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every module with a Llama-style ``self_attn`` (or an already wrapped one), in order."""
    out = []
    for name, m in model.named_modules():
        attn = m.__dict__.get("_modules", {}).get("self_attn")
        if attn is None:
            continue
        base = attn.base_attn if isinstance(attn, SeerAttention) else attn
        if all(hasattr(base, p) for p in ATTN_PROJ) and hasattr(base, "head_dim"):
            out.append((name, m))
    return out


def seer_layers(model: nn.Module) -> Iterator[tuple[str, SeerAttention]]:
    """``(name, wrapper)`` for every :class:`SeerAttention` in ``model``, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, SeerAttention):
            yield name, m


def _rope_theta(attn: nn.Module) -> float:
    cfg = getattr(attn, "config", None)
    params = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(getattr(cfg, "rope_theta", 10000.0) or 10000.0)


def _build_wrappers(model: nn.Module, config: SeerAttnConfig, owner: str) -> list[tuple[str, nn.Module, SeerAttention]]:
    """``(layer name, decoder layer, new wrapper)`` for every chosen layer; the model is not changed."""
    if not config.causal:
        raise ValueError(f"{owner}: decoder LMs need causal=True")
    layers = _decoder_layers(model)
    if not layers:
        raise ValueError(f"{owner}: no Llama-style decoder layer (self_attn.{{q,k,v,o}}_proj, head_dim)")
    chosen = [(i, n, m) for i, (n, m) in enumerate(layers) if config.uses_layer(i)]
    if not chosen:
        raise ValueError(f"{owner}: no layer left (dense_layers={config.dense_layers}, "
                         f"layers_to_transform={config.layers_to_transform}, {len(layers)} layers)")
    for i, name, layer in chosen:
        attn = layer.self_attn
        if isinstance(attn, SeerAttention):
            raise ValueError(f"{owner}: {name}.self_attn already has a gate")
        if getattr(attn, "sliding_window", None):
            raise ValueError(f"{owner}: {name}.self_attn uses a sliding window (not supported)")
    out = []
    for i, name, layer in chosen:
        attn = layer.self_attn
        nh = attn.q_proj.out_features // attn.head_dim
        nkv = attn.k_proj.out_features // attn.head_dim
        gate = AttnGate.from_config(config, nh, nkv, attn.head_dim, _rope_theta(attn), device=attn.q_proj.weight.device)
        out.append((name, layer, SeerAttention(attn, gate, config)))
    return out


def apply_seer_attention(model: nn.Module, config: SeerAttnConfig) -> nn.Module:
    """Alias of ``peftcore.apply_adapter(model, config)`` (same checks, including the rules for several methods on
    one model); what it does is :func:`_apply_seer_attention`'s."""
    from ..api import apply_adapter

    return apply_adapter(model, config)


def _apply_seer_attention(model: nn.Module, config: SeerAttnConfig) -> nn.Module:
    """Wrap the ``self_attn`` of every chosen decoder layer (``config.uses_layer(i)``) in :class:`SeerAttention`
    with a fresh :class:`AttnGate` (on the attention's device), freeze every other parameter, leave the gates
    trainable; return ``model``. Raises for sliding-window layers, non-causal configs and already-wrapped layers."""
    wrappers = _build_wrappers(model, config, "apply_seer_attention")
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer, wrapper in wrappers:
        layer.self_attn = wrapper
    setattr(model, CONFIG_ATTR, config)
    return model


def remove_seer_attention(model: nn.Module) -> nn.Module:
    """Put every original ``self_attn`` back (the same module objects) and drop the gates. Parameters'
    ``requires_grad`` flags are left as they are (all frozen by :func:`apply_seer_attention`)."""
    for name, wrapper in list(seer_layers(model)):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, wrapper.base_attn)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model


def set_seer_mode(model: nn.Module, mode: str) -> nn.Module:
    """Switch every wrapper to ``"distill"``, ``"sparse"`` or ``"dense"``."""
    if mode not in MODES:
        raise ValueError(f"set_seer_mode: mode must be one of {MODES}, got {mode!r}")
    for _, w in seer_layers(model):
        w.mode = mode
        w.last_loss = w.last_block_mask = w.last_kept = w.last_visible = None
    return model


# ------------------------------------------------------------------------------------------------ training helpers


def seer_gate_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Every gate parameter (what trains)."""
    for _, w in seer_layers(model):
        yield from w.gate.parameters()


def seer_loss(model: nn.Module) -> torch.Tensor:
    """Sum over the layers of the last forward's distillation loss (distill mode). Raises if none was recorded."""
    losses = [w.last_loss for _, w in seer_layers(model) if w.last_loss is not None]
    if not losses:
        raise RuntimeError("seer_loss: no distillation loss recorded; run a forward in mode='distill' first")
    return torch.stack(losses).sum()


def seer_sparsity(model: nn.Module) -> float:
    """Fraction of the visible (causal) blocks, over batch, heads and gated layers, that the gates' masks of the
    last forward drop (in distill mode: the masks they would use)."""
    kept = visible = 0
    for _, w in seer_layers(model):
        if w.last_kept is not None:
            kept += int(w.last_kept)
            visible += int(w.last_visible)
    if visible == 0:
        raise RuntimeError("seer_sparsity: no gate mask recorded; run a forward in mode 'distill' or 'sparse'")
    return 1.0 - kept / visible


# ------------------------------------------------------------------------------------------------ save / load


def seer_gate_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{"<layer>.self_attn.gate.<param>": tensor}``, detached."""
    return {f"{n}.gate.{p}": t.detach() for n, w in seer_layers(model) for p, t in w.gate.named_parameters()}


def seer_gates_file(model: nn.Module, config: Optional[SeerAttnConfig] = None) -> tuple[dict, dict]:
    """``(tensors, metadata)`` of the gates: what :func:`save_seer_gates` writes (and ``save_adapter`` puts in the
    directory): tensors ``"<layer>.self_attn.gate.<param>"`` (CPU); metadata ``format``, ``config`` (json)."""
    config = config or getattr(model, CONFIG_ATTR, None)
    tensors = {k: v.cpu().contiguous() for k, v in seer_gate_state(model).items()}
    if not tensors:
        raise ValueError("save_seer_gates: the model has no SeerAttention layer")
    meta = {"format": FORMAT}
    if config is not None:
        meta["config"] = config.to_json()
    return tensors, meta


def save_seer_gates(model: nn.Module, path: Union[str, os.PathLike], config: Optional[SeerAttnConfig] = None) -> None:
    """Write the gate weights to one safetensors file (the single-method format, :func:`seer_gates_file`). The
    library-wide format is ``peftcore.save_adapter(model, directory)``; ``peftcore.load_adapter`` reads both."""
    from safetensors.torch import save_file

    tensors, meta = seer_gates_file(model, config)
    save_file(tensors, os.fspath(path), metadata=meta)


def load_seer_gates(model: nn.Module, path: Union[str, os.PathLike], strict: bool = True) -> nn.Module:
    """Load gate weights saved by :func:`save_seer_gates`, all or nothing (:mod:`peftcore.tuners._loading`). A
    model without gates first gets the wrappers of :func:`apply_seer_attention` with the file's config (every other
    parameter frozen), in the same single step. Every gate parameter must be in the file with its exact shape and
    a floating dtype (cast to the gate's dtype); tensors the model has no gate for are an error unless
    ``strict=False``. Nothing changes in the model unless everything fits."""
    stage_load(model, path, strict).run()
    return model


def stage_load(model: nn.Module, path, strict: bool = True):
    """Everything :func:`load_seer_gates` checks, and the :class:`~peftcore.tuners._loading.Commit` that applies
    it (not run). ``path`` may also be a :class:`~peftcore.tuners._loading.LoadFile`."""
    from .. import _loading as L

    f = path if isinstance(path, L.LoadFile) else L.read_file("load_seer_gates", path, (FORMAT,))
    err = f.error
    config = f.config(SeerAttnConfig)
    commit = L.Commit()
    with L.staging(model):
        if any(True for _ in seer_layers(model)):
            wrappers = []
            params = {f"{n}.gate.{p}": t for n, w in seer_layers(model) for p, t in w.gate.named_parameters()}
        else:
            if config is None:
                raise err("the model has no gates and the file no 'config' metadata to build them from")
            try:
                wrappers = _build_wrappers(model, config, "apply_seer_attention")
            except ValueError as e:
                raise err(f"cannot apply the file's config: {e}") from None
            params = {f"{n}.self_attn.gate.{p}": t for n, _, w in wrappers for p, t in w.gate.named_parameters()}
        missing = sorted(set(params) - set(f.tensors))
        if missing:
            raise err(f"the model's gate parameter(s) {missing[:4]}{' ...' if len(missing) > 4 else ''} are not in "
                      f"the file (a file from another model?)")
        extra = sorted(set(f.tensors) - set(params))
        if extra and strict:
            raise err(f"extra tensor(s) the model has no gate for: {extra[:4]}{' ...' if len(extra) > 4 else ''} "
                      f"({len(extra)}; pass strict=False to ignore)")
        for k, p in params.items():
            t = f.tensors[k]
            L.check_float(err, k, t, tuple(p.shape))
            if wrappers:
                p.data = L.to_param(t, p)
            else:
                commit.set_data(p, L.to_param(t, p))
        if wrappers:
            commit.requires_grad(model.parameters(), False)
            for _, layer, wrapper in wrappers:
                wrapper.train(layer.self_attn.training)
                commit.set_attr(layer, "self_attn", wrapper)
            commit.set_attr(model, CONFIG_ATTR, config)
    return commit
