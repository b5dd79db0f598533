"""peftcore.tuners.from_peft against HF PEFT itself: every option either converts to the same function (logits and
every PEFT parameter's gradient, in eval and in training, dropout included under one seed, float32 and float64)
or is refused before anything changes; and the float64 merge / unmerge of every structured adapter."""
import copy
import warnings

import pytest
import torch
from torch import nn

import peftcore.tuners as T
from test_orthogonal import _FakeFBD

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: E402


def tiny_llama(seed=0, dtype=torch.float32, bias=False):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attention_bias=bias, mlp_bias=bias)
    return transformers.LlamaForCausalLM(cfg).to(dtype).eval()


IDS = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def fake_fbd(monkeypatch):
    """PEFT's BOFT needs its CUDA block-diag extension for n_butterfly_factor > 1 (else it forces 1)."""
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", _FakeFBD())


def _perturb(model, std=0.1, seed=7):
    with torch.no_grad():  # away from the identity / zero initialisation
        gen = torch.Generator().manual_seed(seed)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return model


def peft_model(config, dtype=torch.float32, adapters=(), bias=False):
    """A PEFT model on a tiny Llama; ``adapters``: extra ``(name, config)`` added after ``default``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_llama(dtype=dtype, bias=bias), config)
        for name, cfg in adapters:
            pm.add_adapter(name, cfg)
            pm.set_adapter(name)  # makes its parameters trainable so _perturb moves them
        pm.set_adapter("default")
    _perturb(pm)
    for name, _ in adapters:  # every adapter moved, whatever is active
        pm.set_adapter(name)
        _perturb(pm, seed=len(name))
    pm.set_adapter("default")
    return pm


def run(model, params, seed=0):
    """Logits and the gradients of ``params`` for one loss, under a fixed RNG seed (dropout)."""
    torch.manual_seed(seed)
    logits = model(input_ids=IDS).logits
    logits.square().mean().backward()
    grads = [None if p.grad is None else p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return logits.detach(), grads


def assert_same(a, b, tol):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, **tol)
    assert len(ga) == len(gb) and any(g is not None and g.abs().sum() > 0 for g in ga)
    for x, y in zip(ga, gb):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, **tol)


F32 = dict(atol=1e-5, rtol=1e-4)
F64 = dict(atol=1e-12, rtol=1e-12)


def check_converts(pm, train=False, tol=F32, seed=0, **kw):
    """PEFT's logits and gradients, then from_peft's on the same Parameters under the same seed: equal."""
    pm.train(train)
    params = [p for p in pm.parameters() if p.requires_grad]
    expected = run(pm, params, seed)
    model = T.from_peft(pm, **kw)
    assert_same(run(model, params, seed), expected, tol)
    return model, params, expected


SUPPORTED = {  # PEFT options from_peft converts exactly
    "oft": lambda: peft.OFTConfig(oft_block_size=8, r=0, target_modules=["q_proj", "v_proj", "up_proj"]),
    "oft_r_form": lambda: peft.OFTConfig(r=8, oft_block_size=0, target_modules=["q_proj", "down_proj"]),
    "oft_adjusted": lambda: peft.OFTConfig(oft_block_size=12, r=0, target_modules=["o_proj", "down_proj"]),
    "oft_exact_shared": lambda: peft.OFTConfig(oft_block_size=16, r=0, target_modules=["k_proj", "down_proj"],
                                               use_cayley_neumann=False, block_share=True),
    "oft_terms_2": lambda: peft.OFTConfig(oft_block_size=8, r=0, target_modules=["q_proj"], num_cayley_neumann_terms=2),
    "oft_terms_3": lambda: peft.OFTConfig(oft_block_size=8, r=0, target_modules=["q_proj"], num_cayley_neumann_terms=3),
    "oft_terms_4": lambda: peft.OFTConfig(oft_block_size=8, r=0, target_modules=["q_proj"], num_cayley_neumann_terms=4),
    "oft_terms_8": lambda: peft.OFTConfig(oft_block_size=8, r=0, target_modules=["v_proj"], num_cayley_neumann_terms=8),
    "oft_init_false": lambda: peft.OFTConfig(oft_block_size=4, r=0, target_modules=["gate_proj"], init_weights=False),
    "oft_layers_to_transform": lambda: peft.OFTConfig(oft_block_size=8, r=0, target_modules=["q_proj", "up_proj"],
                                                      layers_to_transform=[1], layers_pattern="layers"),
    "oft_module_dropout": lambda: peft.OFTConfig(oft_block_size=8, r=0, target_modules=["q_proj"],
                                                 module_dropout=0.5),
    "boft": lambda: peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2,
                                    target_modules=["q_proj", "down_proj"], init_weights=False),
    "boft_block_num": lambda: peft.BOFTConfig(boft_block_size=0, boft_block_num=8, boft_n_butterfly_factor=3,
                                              target_modules=["v_proj", "up_proj"]),
    "boft_dropout": lambda: peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, boft_dropout=0.3,
                                            target_modules=["q_proj", "down_proj"]),
    "miss": lambda: peft.MissConfig(r=16, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False),
    "miss_tail_dropout": lambda: peft.MissConfig(r=48, target_modules=["down_proj", "q_proj"], miss_dropout=0.4),
    "miss_mini_dropout": lambda: peft.MissConfig(r=8, mini_r=32, init_weights="mini", miss_dropout=0.2,
                                                 target_modules=["up_proj", "q_proj"]),
}


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("kind", sorted(SUPPORTED))
def test_converts_exactly(kind, train):
    pm = peft_model(SUPPORTED[kind]())
    peft_layers = {n: m for n, m in pm.base_model.model.named_modules() if isinstance(m, BaseTunerLayer)}
    model, params, expected = check_converts(pm, train)
    layers = dict(T.adapter_layers(model))
    assert sorted(layers) == sorted(peft_layers)
    # Each converted module keeps its mode (requirement: eval stays eval, so no dropout fires at inference).
    for name, layer in layers.items():
        assert layer.training is train and all(m.training is train for m in layer.modules())
    if train and kind in ("boft_dropout", "miss_tail_dropout", "miss_mini_dropout"):
        assert not torch.equal(run(model, params, seed=1)[0], expected[0])  # the dropout does fire in training
    if train:  # switching to eval afterwards gives PEFT's eval function
        model.eval()
        assert_same(run(model, params), eval_reference(kind), F32)


_EVAL_REFS = {}


def eval_reference(kind):
    if kind not in _EVAL_REFS:
        pm = peft_model(SUPPORTED[kind]()).eval()
        _EVAL_REFS[kind] = run(pm, [p for p in pm.parameters() if p.requires_grad])
    return _EVAL_REFS[kind]


def test_modes_kept_per_module():
    """A PEFT model in training with one layer switched to eval: that layer (and its dropout) stays in eval."""
    pm = peft_model(peft.MissConfig(r=16, target_modules=["q_proj", "v_proj"], miss_dropout=0.5))
    pm.train()
    one = pm.base_model.model.model.layers[0].self_attn.q_proj
    one.eval()
    params = [p for p in pm.parameters() if p.requires_grad]
    expected = run(pm, params)
    model = T.from_peft(pm)
    ours = model.model.layers[0].self_attn.q_proj
    assert isinstance(ours, T.MissLinear) and not ours.training and not ours.dropout.training
    assert model.model.layers[1].self_attn.q_proj.dropout.training
    assert model.model.layers[0].self_attn.v_proj.training
    assert_same(run(model, params), expected, F32)


# ---------------------------------------------------------------------------------------------------------------
# Dropout semantics beyond the same-seed comparison above.


def test_boft_block_dropout_semantics():
    torch.manual_seed(0)
    m, nb, b, p = 3, 10, 4, 0.35
    drop = T.boft.layer.BOFTBlockDropout(p)
    R = torch.randn(m, nb, b, b, requires_grad=True)
    eye = torch.eye(b)
    seen = torch.zeros(m, nb)
    for _ in range(300):
        out = drop(R)
        dropped = torch.tensor([[torch.equal(out[i, j], eye) for j in range(nb)] for i in range(m)])
        kept = torch.tensor([[torch.equal(out[i, j], R[i, j]) for j in range(nb)] for i in range(m)])
        assert (dropped | kept).all() and dropped.sum() == int(p * nb)  # int(p * nb) blocks of one factor
        assert dropped.any(1).sum() == 1
        seen += dropped
        (g,) = torch.autograd.grad(out.sum(), R)
        assert (g[dropped] == 0).all() and (g[~dropped] == 1).all()  # dropped blocks get no gradient
    rate = seen / 300  # each block: P(its factor) * int(p nb) / nb
    assert (rate - int(p * nb) / nb / m).abs().max() < 0.08
    drop.eval()
    assert drop(R) is R


def test_boft_dropout_vs_peft_same_rng_draws():
    """The same random draws as PEFT's MultiplicativeDropoutLayer, block for block."""
    from peft.tuners.boft.layer import MultiplicativeDropoutLayer

    R = torch.randn(2, 8, 4, 4)
    theirs, ours = MultiplicativeDropoutLayer(0.5), T.boft.layer.BOFTBlockDropout(0.5)
    for seed in range(5):
        torch.manual_seed(seed)
        a = theirs(R)
        torch.manual_seed(seed)
        assert torch.equal(ours(R), a)


def test_miss_dropout_on_padded_input():
    """In training the dropout acts on the input zero-padded to a multiple of r (PEFT's mask shape); in eval
    it is off."""
    lin = nn.Linear(40, 8)
    layer = T.MissLinear.create(lin, T.MissConfig(target_modules=["x"], r=16, dropout=0.5))  # 40 % 16: padded
    with torch.no_grad():
        layer.miss_block.normal_()
    x = torch.randn(300, 40)
    padded = torch.nn.functional.pad(x, (0, 8))
    layer.eval()
    torch.testing.assert_close(layer(x), lin(x) + padded.view(300, 3, 16).sum(1) @ layer.miss_block)
    layer.train()
    torch.manual_seed(0)
    mask = nn.Dropout(0.5)(torch.ones(300, 48))
    torch.manual_seed(0)
    got = layer(x)
    assert 0.4 < (mask == 0).float().mean() < 0.6
    torch.testing.assert_close(got, lin(x) + (padded * mask).view(300, 3, 16).sum(1) @ layer.miss_block)


# ---------------------------------------------------------------------------------------------------------------
# Several adapters.


OFT_A = lambda: peft.OFTConfig(oft_block_size=8, r=0, target_modules=["q_proj", "v_proj"])  # noqa: E731
OFT_B = lambda: peft.OFTConfig(oft_block_size=4, r=0, target_modules=["q_proj", "up_proj"])  # noqa: E731


def _peft_layers(model):
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def test_several_adapters_refused_by_name():
    pm = peft_model(OFT_A(), adapters=[("other", OFT_B())])
    with torch.no_grad():
        before = pm(input_ids=IDS).logits
    with pytest.raises(ValueError, match=r"holds adapters \['default', 'other'\].*adapter=<name>"):
        T.from_peft(pm)
    with pytest.raises(ValueError, match=r"adapter 'other' is not active on .*set_adapter\('other'\)"):
        T.from_peft(pm, adapter="other")
    with pytest.raises(ValueError, match=r"no adapter 'nope'"):
        T.from_peft(pm, adapter="nope")
    pm.base_model.set_adapter(["default", "other"])
    with pytest.raises(NotImplementedError, match=r"several active adapters \['default', 'other'\]"):
        T.from_peft(pm, adapter="default")
    pm.base_model.set_adapter("default")
    # Nothing changed by the refusals.
    assert len(_peft_layers(pm)) == 6 and not any(True for _ in T.adapter_layers(pm))
    with torch.no_grad():
        torch.testing.assert_close(pm(input_ids=IDS).logits, before, atol=0, rtol=0)


@pytest.mark.parametrize("which", ["default", "other"])
def test_several_adapters_keep_the_active_one(which):
    """adapter=<name> after PEFT's set_adapter(name): the function PEFT computes with that adapter active (the
    other's layers run their base layer, as PEFT does), training included."""
    pm = peft_model(OFT_A(), adapters=[("other", OFT_B())])
    pm.set_adapter(which)
    model, *_ = check_converts(pm, train=True, adapter=which)
    layers = dict(T.adapter_layers(model))
    want = {"default": ("q_proj", "v_proj"), "other": ("q_proj", "up_proj")}[which]
    assert sorted({n.rsplit(".", 1)[1] for n in layers}) == sorted(want)
    assert not _peft_layers(model)
    assert getattr(model, T._adapters.CONFIG_ATTR).block_size == (8 if which == "default" else 4)


# ---------------------------------------------------------------------------------------------------------------
# float64: conversion, merge and unmerge exact to ~1e-12.


@pytest.mark.parametrize("kind", ["oft", "oft_exact_shared", "oft_terms_8", "boft", "boft_block_num", "miss",
                                  "miss_tail_dropout", "miss_mini_dropout"])
def test_float64_matches_peft(kind):
    pm = peft_model(SUPPORTED[kind](), dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in pm.parameters())
    merged_ref = copy.deepcopy(pm).merge_and_unload()
    model, params, _ = check_converts(pm, train=False, tol=F64)
    layers = dict(T.adapter_layers(model))
    w0 = {n: l.base_layer.weight.detach().clone() for n, l in layers.items()}
    T.merge_adapter(model)
    for n in layers:  # our merge equals PEFT's
        torch.testing.assert_close(model.get_submodule(n).base_layer.weight, merged_ref.get_submodule(n).weight,
                                   **F64)
    T.unmerge_adapter(model)
    for n, l in layers.items():
        torch.testing.assert_close(l.base_layer.weight, w0[n], **F64)


F64_CONFIGS = {
    "monarch": lambda: T.MonarchConfig(target_modules=["q_proj", "down_proj"], nblocks=4, rank=8),
    "oft": lambda: T.OFTConfig(target_modules=["q_proj", "gate_proj"], block_size=8),
    "oft_exact": lambda: T.OFTConfig(target_modules=["k_proj"], block_size=16, use_cayley_neumann=False),
    "boft": lambda: T.BOFTConfig(target_modules=["q_proj", "up_proj"], block_size=4, n_butterfly_factor=3),
    "miss": lambda: T.MissConfig(target_modules=["down_proj"], r=48),
}


@pytest.mark.parametrize("kind", sorted(F64_CONFIGS))
def test_float64_merge_unmerge_round_trip(kind):
    model = tiny_llama(dtype=torch.float64)
    T.apply_adapter(model, F64_CONFIGS[kind]())
    layers = dict(T.adapter_layers(model))
    with torch.no_grad():
        for layer in layers.values():
            for p in layer.adapter_parameters().values():
                assert p.dtype == torch.float64, (kind, p.dtype)
                p.add_(torch.randn_like(p) * 0.2)
        adapted = model(input_ids=IDS).logits
        w0 = {n: l.base_layer.weight.clone() for n, l in layers.items()}
        T.merge_adapter(model)
        assert any(not torch.equal(l.base_layer.weight, w0[n]) for n, l in layers.items())
        torch.testing.assert_close(model(input_ids=IDS).logits, adapted, **F64)
        T.unmerge_adapter(model)
        for n, l in layers.items():
            torch.testing.assert_close(l.base_layer.weight, w0[n], **F64)


# ---------------------------------------------------------------------------------------------------------------
# Refused options: a clear error naming the option, and the PEFT model left as it was.


class _MyLinear(nn.Linear):
    """An nn.Linear subclass: PEFT wraps it (isinstance), but its forward may differ, so it is not converted."""


class _SubclassModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = _MyLinear(32, 16)

    def forward(self, x):
        return self.proj(x)


def _refusal_cases():
    def merged():
        pm = peft_model(SUPPORTED["oft"]())
        pm.base_model.model.model.layers[1].self_attn.v_proj.merge()
        return pm

    def disabled():
        pm = peft_model(SUPPORTED["miss"]())
        for m in _peft_layers(pm):
            m.enable_adapters(False)
        return pm

    def linear_subclass():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return peft.get_peft_model(_SubclassModel(), peft.OFTConfig(oft_block_size=8, r=0,
                                                                        target_modules=["proj"]))

    def lora_mixed():
        pm = peft_model(SUPPORTED["oft"]())
        from peft.tuners.lora.layer import Linear as LoraLinear
        q = pm.base_model.model.model.layers[0].mlp.down_proj
        pm.base_model.model.model.layers[0].mlp.down_proj = LoraLinear(q, "default", peft.LoraConfig(r=2), r=2)
        return pm

    def no_input_cast():
        pm = peft_model(SUPPORTED["boft"]())
        pm.base_model.model.model.layers[1].mlp.down_proj.cast_input_dtype_enabled = False
        return pm

    return {
        "no_input_cast": (no_input_cast, NotImplementedError, "down_proj' has input dtype casting disabled"),
        "neumann_terms_negative": (lambda: peft_model(peft.OFTConfig(oft_block_size=8, r=0, target_modules=["q_proj"],
                                                                     num_cayley_neumann_terms=-1)),
                                   NotImplementedError, "num_cayley_neumann_terms=-1"),
        "coft": (lambda: peft_model(peft.OFTConfig(oft_block_size=8, r=0, target_modules=["q_proj"], coft=True,
                                                   eps=1e-3)), NotImplementedError, r"coft=True \(eps=0.001\)"),
        "neumann_terms": (lambda: peft_model(peft.OFTConfig(oft_block_size=8, r=0, target_modules=["q_proj"],
                                                            num_cayley_neumann_terms=80)),
                          NotImplementedError, "num_cayley_neumann_terms=80"),
        "oft_bias_all": (lambda: peft_model(peft.OFTConfig(oft_block_size=8, r=0, target_modules=["q_proj"],
                                                           bias="all"), bias=True),
                         NotImplementedError, "bias='all'"),
        "boft_bias_only": (lambda: peft_model(peft.BOFTConfig(boft_block_size=4, target_modules=["q_proj"],
                                                              bias="boft_only"), bias=True),
                           NotImplementedError, "bias='boft_only'"),
        "miss_bias_all": (lambda: peft_model(peft.MissConfig(r=8, target_modules=["q_proj"], bias="all"),
                                             bias=True), NotImplementedError, "bias='all'"),
        "modules_to_save": (lambda: peft_model(peft.MissConfig(r=8, target_modules=["q_proj"],
                                                               modules_to_save=["lm_head"])),
                            NotImplementedError, r"modules_to_save=\['lm_head'\]"),
        "miss_bat": (lambda: peft_model(peft.MissConfig(r=16, init_weights="bat", target_modules=["q_proj"])),
                     NotImplementedError, "init_weights='bat'"),
        "merged": (merged, NotImplementedError, r"layers.1.self_attn.v_proj' has merged adapters \['default'\]"),
        "disabled": (disabled, NotImplementedError, "adapters disabled"),
        "linear_subclass": (linear_subclass, NotImplementedError, r"'proj' wraps a _MyLinear; only torch.nn.Linear"),
        "other_peft_layer": (lora_mixed, NotImplementedError, r"other than OFT / BOFT / MiSS.*lora"),
    }


REFUSALS = _refusal_cases()


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_and_untouched(case):
    make, exc, msg = REFUSALS[case]
    pm = make()
    modules = dict(pm.named_modules())
    state = {k: v.clone() for k, v in pm.state_dict().items()}
    flags = {n: (m.training) for n, m in modules.items()}
    with pytest.raises(exc, match=msg):
        T.from_peft(pm)
    assert dict(pm.named_modules()) == modules  # the same module objects everywhere
    assert {n: m.training for n, m in pm.named_modules()} == flags
    after = pm.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())


def test_oft_one_neumann_term_is_identity():
    """num_cayley_neumann_terms=1: PEFT's rotation is I (no gradient reaches the parameters); so is ours."""
    pm = peft_model(peft.OFTConfig(oft_block_size=8, r=0, target_modules=["q_proj"], num_cayley_neumann_terms=1))
    with torch.no_grad():
        expected = pm(input_ids=IDS).logits
        torch.testing.assert_close(expected, tiny_llama()(input_ids=IDS).logits, **F32)
        torch.testing.assert_close(T.from_peft(pm)(input_ids=IDS).logits, expected, **F32)


def test_loaded_for_inference_stays_eval_and_frozen(tmp_path):
    """PeftModel.from_pretrained (eval, inference mode): the converted model runs in eval (no dropout at
    inference: two seeds, one output) and its adapter parameters stay frozen."""
    pm = peft_model(SUPPORTED["miss_tail_dropout"]())
    pm.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    assert not loaded.training
    with torch.no_grad():
        expected = loaded(input_ids=IDS).logits
        model = T.from_peft(loaded)
        layers = dict(T.adapter_layers(model))
        assert layers and not any(m.training for layer in layers.values() for m in layer.modules())
        assert not any(p.requires_grad for p in model.parameters())
        for seed in (0, 1):
            torch.manual_seed(seed)
            torch.testing.assert_close(model(input_ids=IDS).logits, expected, **F32)


def test_unfrozen_base_layer_refused():
    """A base weight made trainable by hand would be frozen by the conversion: refused, naming it."""
    pm = peft_model(SUPPORTED["miss"]())
    pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad_(True)
    with pytest.raises(NotImplementedError, match=r"layers.0.self_attn.q_proj.weight'\] are trainable"):
        T.from_peft(pm)
    assert pm.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.requires_grad


def test_boft_config_dropout_applies_and_saves(tmp_path):
    """BOFTConfig(dropout=) on apply_adapter: fires in training only, and travels with the saved config."""
    model = tiny_llama()
    T.apply_adapter(model, T.BOFTConfig(target_modules=["q_proj"], block_size=4, n_butterfly_factor=2, dropout=0.5))
    _perturb(model, std=0.3)
    with torch.no_grad():
        model.eval()
        ev = model(input_ids=IDS).logits
        model.train()
        torch.manual_seed(0)
        tr0 = model(input_ids=IDS).logits
        torch.manual_seed(1)
        tr1 = model(input_ids=IDS).logits
    assert not torch.equal(tr0, tr1) and not torch.equal(tr0, ev)
    T.save_adapter(model, tmp_path / "b")
    fresh = T.load_adapter(tiny_llama(), tmp_path / "b")
    assert getattr(fresh, T._adapters.CONFIG_ATTR).dropout == 0.5
    assert all(l.dropout.p == 0.5 for _, l in T.adapter_layers(fresh))
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(input_ids=IDS).logits, ev, **F32)


@pytest.mark.parametrize("cfg", [T.MissConfig(target_modules=["q_proj"], r=16, dropout=0.5),
                                 T.MonarchConfig(target_modules=["q_proj"], nblocks=4, dropout=0.5),
                                 T.BOFTConfig(target_modules=["q_proj"], block_size=4, dropout=0.5),
                                 T.OFTConfig(target_modules=["q_proj"], block_size=8)], ids=lambda c: c.peft_type)
def test_apply_adapter_keeps_the_model_mode(cfg):
    """apply_adapter (and so load_adapter) on a model in eval: the new layers are in eval too (no dropout at
    inference); in training they train."""
    for train in (False, True):
        model = tiny_llama().train(train)
        T.apply_adapter(model, copy.deepcopy(cfg))
        layers = [l for _, l in T.adapter_layers(model)]
        assert layers and all(m.training is train for l in layers for m in l.modules())
