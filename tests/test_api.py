"""The one adapter API (peftcore.apply_adapter / save_adapter / load_adapter / merge_adapter / unmerge_adapter /
unload_adapter / adapter_state) for every method, on a tiny random Llama: apply -> forward -> save -> load into a
fresh plain model -> identical outputs; merge / unmerge / unload round trips; strict, all-or-nothing loading;
several methods on one model."""
from __future__ import annotations

import json
import os

import pytest
import torch

import peftcore as pc
from peftcore.tuners import LoadError, api

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


CONFIGS = {  # one per method; each changes the logits once its parameters are perturbed
    "SPARSE_DELTA": lambda: pc.SparseDeltaConfig(target_modules=["q_proj", "v_proj", "down_proj"], density=0.05,
                                                 seed=1),
    "S2FT": lambda: pc.S2FTConfig(target_modules=["o_proj", "down_proj", "v_proj"], head_ratio=0.5,
                                  channel_ratio=0.1),
    "MONARCH": lambda: pc.MonarchConfig(target_modules=["q_proj", "o_proj"], nblocks=4, rank=2),
    "OFT": lambda: pc.OFTConfig(target_modules=["q_proj", "down_proj"], block_size=8),
    "BOFT": lambda: pc.BOFTConfig(target_modules=["q_proj"], block_size=8, n_butterfly_factor=2),
    "MISS": lambda: pc.MissConfig(target_modules=["q_proj", "up_proj"], r=16),
    "SEER_ATTN": lambda: pc.SeerAttnConfig(block_size=4, method="top_k", top_k=2, gate_hidden_dim=8,
                                           gate_init="normal", mode="sparse"),
    "TOKEN_ELIM": lambda: pc.TokenElimConfig(keep_ratio=0.5, block_size=4, dense_first=0, dense_last=0,
                                             eliminate_in_eval=True),
    "LORA": lambda: pc.LoraConfig(target_modules=["q_proj", "v_proj"], adapter_names=["a", "b"], r=[2, 4],
                                  lora_alpha=[4.0, 2.0], default_adapter="a", rank_pattern={"v_proj": [3, 1]}),
}
MERGEABLE = [k for k in CONFIGS if k not in ("SEER_ATTN", "TOKEN_ELIM")]
EXTRA = {"MISS_UP": lambda: pc.MissConfig(target_modules=["up_proj"], r=16)}
BASE = logits(tiny_llama())


@torch.no_grad()
def perturb(model, seed=3, std=0.1):
    gen = torch.Generator().manual_seed(seed)
    for p in [p for m in api.METHODS for p in m.trainable(model)]:
        p.add_(torch.randn(p.shape, generator=gen).to(p) * std)


def adapted(*kinds, **extras):
    model = tiny_llama()
    for k in kinds:
        pc.apply_adapter(model, {**CONFIGS, **EXTRA}[k](), **extras)
    perturb(model)
    return model


def trainable_names(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def close(a, b):
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ every method


@pytest.mark.parametrize("kind", CONFIGS)
def test_apply_save_load_identical(kind, tmp_path):
    model = adapted(kind)
    assert pc.adapter_methods(model) == [kind]
    ref = logits(model)
    assert (ref - BASE).abs().max() > 1e-3  # the adapter does something
    pc.save_adapter(model, tmp_path / "ad")
    assert sorted(os.listdir(tmp_path / "ad")) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert [m["peft_type"] for m in cfg["methods"]] == [kind]
    fresh = pc.load_adapter(tiny_llama(), tmp_path / "ad")
    assert pc.adapter_methods(fresh) == [kind]
    close(logits(fresh), ref)
    if kind != "S2FT":  # S2FT loads unpermuted (gathered), so the sums run in another order: close, not equal
        assert torch.equal(logits(fresh), ref)
    assert trainable_names(fresh) == trainable_names(model)
    state = pc.adapter_state(fresh)
    assert state.keys() == pc.adapter_state(model).keys()
    assert all(k.startswith(api._BY_TYPE[kind].prefix + ".") for k in state)
    # loading into the model that has the adapters replaces the values in place
    other = adapted(kind)
    perturb(other, seed=9)
    layers = [id(m) for m in other.modules()]
    pc.load_adapter(other, tmp_path / "ad")
    assert [id(m) for m in other.modules()] == layers
    close(logits(other), ref)


@pytest.mark.parametrize("kind", CONFIGS)
def test_merge_unmerge_unload(kind):
    model = adapted(kind)
    ref = logits(model)
    pc.merge_adapter(model)
    close(logits(model), ref)  # merged, or a documented no-op for gates / token elimination
    pc.unmerge_adapter(model)
    close(logits(model), ref)
    if kind in MERGEABLE:
        assert api._BY_TYPE[kind].merged(model) == []
    plain = pc.unload_adapter(model)
    assert pc.adapter_methods(plain) == []
    assert type(plain.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    if kind in MERGEABLE:
        close(logits(plain), ref)  # the deltas are in the weights
    else:
        close(logits(plain), BASE)  # gates / elimination removed: the original model
    with pytest.raises(ValueError, match="merge_adapter: the model has no peftcore adapter"):
        pc.merge_adapter(plain)


@pytest.mark.parametrize("kind", MERGEABLE)
def test_unload_without_merge_gives_the_original(kind):
    model = adapted(kind)
    pc.merge_adapter(model)
    close(logits(pc.unload_adapter(model, merge=False)), BASE)


def test_merged_model_is_not_saved(tmp_path):
    model = pc.merge_adapter(adapted("SPARSE_DELTA"))
    with pytest.raises(RuntimeError, match="save_adapter: SPARSE_DELTA layers .* are merged; unmerge first"):
        pc.save_adapter(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ the config


def test_top_level_names_and_aliases():
    from peftcore.tuners import apply_s2ft, apply_sparse_delta

    for name in ("apply_adapter", "save_adapter", "load_adapter", "merge_adapter", "unmerge_adapter",
                 "unload_adapter", "adapter_state", "LoraConfig", "TokenElimConfig", "SeerAttnConfig"):
        assert name in dir(pc) and getattr(pc, name) is getattr(pc.tuners, name)
    a = apply_sparse_delta(tiny_llama(), CONFIGS["SPARSE_DELTA"]())
    b = pc.apply_adapter(tiny_llama(), CONFIGS["SPARSE_DELTA"]())
    assert pc.adapter_state(a).keys() == pc.adapter_state(b).keys()
    assert all(torch.equal(pc.adapter_state(a)[k], pc.adapter_state(b)[k]) for k in pc.adapter_state(a))
    m = adapted("SPARSE_DELTA")
    with pytest.raises(ValueError, match="S2FT's co-permutation"):  # the aliases run the same checks
        apply_s2ft(m, CONFIGS["S2FT"]())


def test_unknown_config_and_extras():
    with pytest.raises(TypeError, match="dict is not a peftcore adapter config"):
        pc.apply_adapter(tiny_llama(), {"r": 8})
    with pytest.raises(TypeError, match=r"unknown keyword argument\(s\) \['calib_fn'\]; this method takes none"):
        pc.apply_adapter(tiny_llama(), CONFIGS["OFT"](), calib_fn=lambda m: None)


def test_gradient_selection_takes_calib_fn():
    def calib(m):
        m(input_ids=IDS, labels=IDS).loss.backward()

    model = pc.apply_adapter(tiny_llama(), pc.SparseDeltaConfig(target_modules=["q_proj"], density=0.05,
                                                                selection="gradient"), calib_fn=calib)
    assert pc.adapter_methods(model) == ["SPARSE_DELTA"]
    with pytest.raises(ValueError, match="needs calib_fn"):
        pc.apply_adapter(tiny_llama(), pc.S2FTConfig(selection="gradient"))


def test_lora_config():
    cfg = CONFIGS["LORA"]()
    assert cfg.ranks_for("model.layers.0.self_attn.q_proj") == [2, 4]
    assert cfg.ranks_for("model.layers.0.self_attn.v_proj") == [3, 1]
    assert cfg.default_index() == 0
    assert pc.LoraConfig(adapter_names=["x", "y"]).default_index() is None
    assert pc.LoraConfig().default_index() == 0
    assert pc.LoraConfig(default_adapter="__base__").default_index() is None
    with pytest.raises(ValueError, match="r has 3 entries for 2 adapters"):
        pc.LoraConfig(adapter_names=["x", "y"], r=[1, 2, 3])
    with pytest.raises(ValueError, match="default_adapter 'z' is not one of"):
        pc.LoraConfig(adapter_names=["x"], default_adapter="z")
    model = pc.apply_adapter(tiny_llama(), pc.LoraConfig(target_modules=["q_proj"], r=4, lora_alpha=8,
                                                         use_rslora=True))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.ranks == [4] and float(layer.scales[0]) == pytest.approx(8 / 2)


def test_lora_that_cannot_merge():
    gated = pc.apply_adapter(tiny_llama(), pc.LoraConfig(target_modules=["q_proj"], adapter_names=["x", "y"],
                                                         gate_top_k=1))
    with pytest.raises(ValueError, match="merge_adapter: LORA layer 'model.layers.0.self_attn.q_proj': .*gate"):
        pc.merge_adapter(gated)
    routed = pc.apply_adapter(tiny_llama(), pc.LoraConfig(target_modules=["q_proj"], adapter_names=["x", "y"]))
    with pytest.raises(ValueError, match="unload_adapter: LORA layer .* no default adapter"):
        pc.unload_adapter(routed)
    pc.unload_adapter(routed, merge=False)


def test_lora_gate_and_batch_round_trip(tmp_path):
    model = pc.apply_adapter(tiny_llama(), pc.LoraConfig(target_modules=["q_proj", "v_proj"],
                                                         adapter_names=["x", "y"], r=[2, 3], gate_top_k=1))
    perturb(model)
    ref = logits(model)
    pc.save_adapter(model, tmp_path / "g")
    fresh = pc.load_adapter(tiny_llama(), tmp_path / "g")
    assert torch.equal(logits(fresh), ref)
    with pc.tuners.adapter_batch(fresh, ["y", None]), pc.tuners.adapter_batch(model, ["y", None]):
        assert torch.equal(logits(fresh), logits(model))


# ------------------------------------------------------------------------------------------------ strict loading


def snapshot(model):
    return ([(n, type(m), id(m)) for n, m in model.named_modules()],
            [(n, id(p), p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()],
            [n for n, m in model.named_modules() if "forward" in m.__dict__])


def assert_same(model, snap):
    now = snapshot(model)
    assert now[0] == snap[0] and now[2] == snap[2]
    for (n, i, rg, v), (n2, i2, rg2, v2) in zip(snap[1], now[1], strict=True):
        assert (n, i, rg) == (n2, i2, rg2) and torch.equal(v, v2), n


def edit_dir(src, dst, tensors=None, config=None):
    """A copy of the directory ``src`` with its tensors / config changed, its SHA-256 kept consistent."""
    os.makedirs(dst)
    t = load_file(os.path.join(src, api.WEIGHTS_NAME))
    cfg = json.loads(open(os.path.join(src, api.CONFIG_NAME)).read())
    if tensors:
        tensors(t)
    if config:
        config(cfg)
    save_file(t, os.path.join(dst, api.WEIGHTS_NAME), metadata={"format": "pt"})
    cfg["safetensors_sha256"] = api._sha256(os.path.join(dst, api.WEIGHTS_NAME))
    with open(os.path.join(dst, api.CONFIG_NAME), "w") as f:
        json.dump(cfg, f)
    return dst


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """A directory with three methods (gates, sparse delta, LoRA) and the logits of its model."""
    d = tmp_path_factory.mktemp("c") / "ad"
    model = adapted("SEER_ATTN")
    pc.apply_adapter(model, pc.SparseDeltaConfig(target_modules=["v_proj", "down_proj"], density=0.05))
    pc.apply_adapter(model, pc.LoraConfig(target_modules=["q_proj"], r=4))
    perturb(model, seed=5)
    pc.save_adapter(model, d)
    return str(d), logits(model)


def refused(path, match, exc=LoadError, model=None, **kw):
    model = model or tiny_llama()
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        pc.load_adapter(model, path, **kw)
    assert_same(model, snap)


def test_composed_round_trip(composed):
    path, ref = composed
    fresh = pc.load_adapter(tiny_llama(), path)
    assert pc.adapter_methods(fresh) == ["SEER_ATTN", "SPARSE_DELTA", "LORA"]
    assert torch.equal(logits(fresh), ref)
    names = trainable_names(fresh)
    assert names and all(n.split(".")[-1] in ("q_weight", "k_weight", "values", "a_packed", "b_packed")
                         for n in names)


def test_missing_key(composed, tmp_path):
    path, _ = composed

    def drop(t):
        del t[next(k for k in sorted(t) if k.startswith("lora.") and k.endswith(".b_packed"))]
    refused(edit_dir(path, tmp_path / "d", drop), r"load_adapter\[LORA\].*tensor\(s\) \['.*b_packed'\] missing")


def test_unexpected_keys(composed, tmp_path):
    path, ref = composed
    p = edit_dir(path, tmp_path / "d", lambda t: t.update({"lora.model.layers.0.self_attn.q_proj.extra":
                                                           torch.zeros(2)}))
    refused(p, r"extra tensor\(s\) the model has no place for: \['model.layers.0.self_attn.q_proj.extra'\]")
    assert torch.equal(logits(pc.load_adapter(tiny_llama(), p, strict=False)), ref)
    q = edit_dir(path, tmp_path / "e", lambda t: t.update({"nomethod.x": torch.zeros(2)}))
    refused(q, r"unexpected tensor\(s\) of no method in adapter_config.json: \['nomethod.x'\]")


def test_shape_mismatch_in_a_later_method_undoes_the_earlier(composed, tmp_path):
    path, _ = composed

    def grow(t):
        k = next(k for k in sorted(t) if k.startswith("lora.") and k.endswith(".a_packed"))
        t[k] = torch.zeros(t[k].shape[0] + 1, t[k].shape[1])
    # the gates and the sparse deltas load first; LoRA's refusal undoes them: the model is as it was
    refused(edit_dir(path, tmp_path / "d", grow), r"tensor '.*a_packed' has shape \(5, 64\), the model needs \(4, 64\)")


def test_mismatched_pair_and_bad_config(composed, tmp_path):
    path, _ = composed
    d = edit_dir(path, tmp_path / "d")
    save_file({"x": torch.zeros(1)}, os.path.join(d, api.WEIGHTS_NAME), metadata={"format": "pt"})
    refused(d, "does not match adapter_config.json")
    refused(edit_dir(path, tmp_path / "e", config=lambda c: c["methods"][0].update(peft_type="NOPE")),
            "unknown peft_type 'NOPE'")
    refused(edit_dir(path, tmp_path / "f", config=lambda c: c.update(format="other/1")), "has format 'other/1'")
    refused(str(tmp_path / "missing"), "does not exist", FileNotFoundError)
    os.makedirs(tmp_path / "empty")
    refused(str(tmp_path / "empty"), "has no adapter_config.json", FileNotFoundError)


def test_load_into_another_model_is_refused(composed):
    path, _ = composed
    model = tiny_llama()
    model.model.layers[1].mlp.down_proj = torch.nn.Linear(128, 32, bias=False)
    refused(path, r"module 'model.layers.1.mlp.down_proj' is \[32, 128\], the delta is for \[64, 128\]", model=model)


def test_single_method_file_still_loads(tmp_path):
    from peftcore.tuners import save_sparse_delta

    model = adapted("SPARSE_DELTA")
    save_sparse_delta(model, tmp_path / "d.safetensors")
    assert torch.equal(logits(pc.load_adapter(tiny_llama(), tmp_path / "d.safetensors")), logits(model))


def test_save_is_atomic_and_keeps_other_files(tmp_path, monkeypatch):
    model = adapted("OFT")
    d = tmp_path / "ckpt"
    os.makedirs(d)
    (d / "optimizer.pt").write_text("keep")
    pc.save_adapter(model, d)
    assert sorted(os.listdir(d)) == ["adapter_config.json", "adapter_model.safetensors", "optimizer.pt"]
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary left
    before = {n: (d / n).read_bytes() for n in os.listdir(d)}

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(api, "_sha256", boom)
    with pytest.raises(OSError, match="disk full"):
        pc.save_adapter(adapted("MISS"), d)
    assert {n: (d / n).read_bytes() for n in os.listdir(d)} == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    monkeypatch.undo()
    (tmp_path / "f").write_text("")
    with pytest.raises(FileExistsError, match="is a file; save_adapter writes a directory"):
        pc.save_adapter(model, tmp_path / "f")


# ------------------------------------------------------------------------------------------------ composition


@pytest.mark.parametrize("kinds", [("TOKEN_ELIM", "SPARSE_DELTA"), ("SPARSE_DELTA", "TOKEN_ELIM"),
                                   ("SEER_ATTN", "LORA"), ("LORA", "SEER_ATTN"), ("TOKEN_ELIM", "LORA", "MISS_UP")])
def test_composition_round_trips(kinds, tmp_path):
    model = adapted(*kinds)
    ref = logits(model)
    single = [logits(adapted(k)) for k in kinds]
    assert all((ref - s).abs().max() > 1e-4 for s in single)  # each method contributes
    names = trainable_names(model)
    pc.save_adapter(model, tmp_path / "ad")
    fresh = pc.load_adapter(tiny_llama(), tmp_path / "ad")
    assert sorted(pc.adapter_methods(fresh)) == sorted(k.replace("MISS_UP", "MISS") for k in kinds)
    assert torch.equal(logits(fresh), ref)
    assert trainable_names(fresh) == names
    pc.merge_adapter(fresh)
    close(logits(fresh), ref)
    pc.unmerge_adapter(fresh)
    close(logits(fresh), ref)
    pc.unload_adapter(fresh, merge=False)
    assert pc.adapter_methods(fresh) == []
    close(logits(fresh), BASE)


def test_apply_keeps_earlier_adapters_training():
    model = adapted("SEER_ATTN")
    pc.apply_adapter(model, pc.LoraConfig(target_modules=["q_proj"]))
    names = trainable_names(model)
    assert any(n.endswith("gate.q_weight") for n in names) and any(n.endswith("a_packed") for n in names)
    assert not any(n.endswith("embed_tokens.weight") for n in names)


def test_composition_refusals():
    m = adapted("SPARSE_DELTA")
    with pytest.raises(ValueError, match=r"'model.layers.0.self_attn.q_proj' already has a SPARSE_DELTA adapter "
                                         r"\(SparseDeltaLinear\); one adapter per nn.Linear"):
        pc.apply_adapter(m, pc.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="S2FT's co-permutation reorders whole decoder blocks"):
        pc.apply_adapter(m, CONFIGS["S2FT"]())
    pc.apply_adapter(m, pc.S2FTConfig(target_modules=["o_proj"]), permute=False)  # composes without permutation
    s = adapted("S2FT")
    with pytest.raises(ValueError, match="co-permuted by S2FT"):
        pc.apply_adapter(s, pc.LoraConfig(target_modules=["q_proj"]))
    pc.apply_adapter(s, CONFIGS["TOKEN_ELIM"]())
    with pytest.raises(ValueError, match="SeerAttention gates and token elimination .* do not compose"):
        pc.apply_adapter(adapted("SEER_ATTN"), CONFIGS["TOKEN_ELIM"]())


def test_merge_is_all_or_nothing():
    model = adapted("SPARSE_DELTA")
    pc.apply_adapter(model, pc.LoraConfig(target_modules=["o_proj"], adapter_names=["x", "y"], gate_top_k=1))
    ref = logits(model)
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="merge_adapter: LORA layer .*gate"):
        pc.merge_adapter(model)  # the sparse deltas merge first, then LoRA refuses: they are unmerged again
    assert not any(layer.merged for _, layer in api._BY_TYPE["SPARSE_DELTA"].layers(model))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(weights, model.parameters()))
    close(logits(model), ref)


def test_load_keeps_other_methods_training(tmp_path):
    pc.save_adapter(adapted("LORA"), tmp_path / "lora")
    model = pc.apply_adapter(tiny_llama(), pc.SparseDeltaConfig(target_modules=["down_proj"], density=0.05))
    pc.load_adapter(model, tmp_path / "lora")
    assert pc.adapter_methods(model) == ["SPARSE_DELTA", "LORA"]
    names = trainable_names(model)
    assert any(n.endswith("down_proj.values") for n in names) and any(n.endswith("a_packed") for n in names)
    assert all(n.endswith(("values", "a_packed", "b_packed")) for n in names)
