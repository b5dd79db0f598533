"""apply_token_elim / remove_token_elim: install the token-eliminating forward on HF Llama-style decoder layers."""
from __future__ import annotations

import types

import torch.nn as nn

from .config import TokenElimConfig
from .layer import token_elim_forward


def decoder_layers(model: nn.Module) -> list:
    """The decoder layers of an HF causal LM (``model.model.layers``), through PEFT wrappers too."""
    for m in model.modules():
        layers = getattr(m, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) and all(
                hasattr(l, "self_attn") and hasattr(l, "mlp") and hasattr(l, "input_layernorm") for l in layers):
            return list(layers)
    raise ValueError("apply_token_elim: no ModuleList of Llama-style decoder layers (self_attn, mlp, "
                     "input_layernorm) found in the model")


def apply_token_elim(model: nn.Module, config: TokenElimConfig) -> list:
    """Alias of ``peftcore.apply_adapter(model, config)`` (same checks, including the rules for several methods on
    one model) that returns the indices of the eliminating layers; what it does is :func:`_apply_token_elim`'s."""
    from ..api import apply_adapter

    apply_adapter(model, config)
    return [i for i, layer in enumerate(decoder_layers(model)) if getattr(layer, "_token_elim_config", None) is config]


def _apply_token_elim(model: nn.Module, config: TokenElimConfig) -> list:
    """Make the decoder layers other than the first ``dense_first`` / last ``dense_last`` token-eliminating, in
    place (their ``forward`` is replaced; modules, parameters and state dict are untouched, so it composes with
    LoRA applied before or after). Returns the indices of the eliminating layers."""
    layers = decoder_layers(model)
    n = len(layers)
    chosen = [i for i in range(n) if config.dense_first <= i < n - config.dense_last]
    for i in chosen:
        layer = layers[i]
        if not hasattr(layer, "_token_elim_orig_forward"):
            layer._token_elim_orig_forward = layer.forward
        layer._token_elim_config = config
        layer.forward = types.MethodType(token_elim_forward, layer)
    return chosen


def remove_token_elim(model: nn.Module) -> None:
    """Restore the original forward of every layer ``apply_token_elim`` changed."""
    for layer in decoder_layers(model):
        if hasattr(layer, "_token_elim_orig_forward"):
            del layer.forward  # the instance attribute; the class's forward is back
            del layer._token_elim_orig_forward
            del layer._token_elim_config
