"""The structured adapters of issue 4 (Monarch, OFT, BOFT, MiSS) at model level: apply in one call, training
touches only the adapters, merge / unmerge / unload, safetensors save / load, and HF PEFT interop in one call
(peftcore.tuners.from_peft) against peft itself with adapters away from their identity initialisation."""
import copy
import warnings

import pytest
import torch
from torch import nn

import peftcore.tuners as T
from test_blockdiag import ref_monarch_two_bmm
from test_orthogonal import _FakeFBD

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def tiny_llama(seed=0, hidden=64, inter=128):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _ids(seed=1, batch=2, length=11):
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@torch.no_grad()
def _perturb(model, std=0.2, seed=3):
    """Move every adapter away from its identity / zero initialisation."""
    gen = torch.Generator().manual_seed(seed)
    for _, layer in T.adapter_layers(model):
        for p in layer.adapter_parameters().values():
            p.add_(torch.randn(p.shape, generator=gen).to(p) * std)


CONFIGS = {
    "monarch": lambda: T.MonarchConfig(target_modules=["q_proj", "v_proj", "down_proj"], nblocks=4, rank=8),
    "monarch_full": lambda: T.MonarchConfig(target_modules=["o_proj", "up_proj"], nblocks=2, scale=0.5),
    "oft": lambda: T.OFTConfig(target_modules=["q_proj", "gate_proj"], block_size=8),
    "oft_exact_shared": lambda: T.OFTConfig(target_modules=["k_proj"], block_size=16, use_cayley_neumann=False,
                                            block_share=True),
    "boft": lambda: T.BOFTConfig(target_modules=["q_proj", "up_proj"], block_size=4, n_butterfly_factor=3),
    "miss": lambda: T.MissConfig(target_modules=["q_proj", "down_proj"], r=16),
    "miss_tail": lambda: T.MissConfig(target_modules=["down_proj"], r=48),  # 128 % 48 != 0: PEFT's padding
    "miss_mini": lambda: T.MissConfig(target_modules=["v_proj", "up_proj"], r=8, mini_r=16),
}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_apply_train_merge_save_load(kind, tmp_path):
    model = tiny_llama()
    ids = _ids()
    before = _logits(model, ids)
    cfg = CONFIGS[kind]()
    T.apply_adapter(model, cfg)
    layers = dict(T.adapter_layers(model))
    assert layers and all(cfg.matches(n) for n in layers)
    # Identity at initialisation: the model is unchanged.
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=1e-5)
    # Only adapter parameters train.
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{ln}.{pn}" for ln, l in layers.items() for pn in l.adapter_parameters()}
    assert trainable == expected
    _perturb(model)
    model.train(False)
    model(input_ids=ids).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad)
    model.zero_grad(set_to_none=True)
    adapted = _logits(model, ids)
    assert (adapted - before).abs().max() > 1e-3
    # Save, load into a fresh copy of the base model: the same function.
    T.save_adapter(model, tmp_path / "a")
    fresh = tiny_llama()
    T.load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(_logits(fresh, ids), adapted, atol=1e-5, rtol=1e-5)
    assert type(getattr(fresh, T._adapters.CONFIG_ATTR)) is type(cfg)
    # Merge: the plain linears give the adapted function; unmerge restores the base weights.
    w0 = {n: l.base_layer.weight.detach().clone() for n, l in layers.items()}
    T.merge_adapter(model, safe_merge=True)
    torch.testing.assert_close(_logits(model, ids), adapted, atol=2e-4, rtol=2e-4)
    T.unmerge_adapter(model)
    for n, l in layers.items():
        torch.testing.assert_close(l.base_layer.weight, w0[n], atol=2e-5, rtol=2e-5)
    # Unload: plain nn.Linear modules, merged.
    plain = T.unload_adapter(model)
    assert not any(True for _ in T.adapter_layers(plain))
    assert all(type(plain.get_submodule(n)) is nn.Linear for n in layers)
    torch.testing.assert_close(_logits(plain, ids), adapted, atol=2e-4, rtol=2e-4)


def test_monarch_layer_is_base_plus_fly_product():
    lin = nn.Linear(48, 32)
    layer = T.MonarchLinear.create(lin, T.MonarchConfig(target_modules=["x"], nblocks=4, rank=6, scale=0.7))
    with torch.no_grad():
        layer.w2.normal_()
    x = torch.randn(5, 3, 48)
    ref = lin(x) + 0.7 * ref_monarch_two_bmm(x, layer.w1, layer.w2)
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
    # The dense delta is the fly product of the identity.
    torch.testing.assert_close(layer.delta_weight(), 0.7 * ref_monarch_two_bmm(torch.eye(48), layer.w1, layer.w2).T)


def test_bad_configs_and_shapes():
    with pytest.raises(ValueError, match="MonarchConfig: nblocks must be >= 1"):
        T.MonarchConfig(target_modules=["q_proj"], nblocks=0)
    with pytest.raises(ValueError, match="BOFTConfig: block_size must be even"):
        T.BOFTConfig(target_modules=["q_proj"], block_size=3)
    with pytest.raises(ValueError, match="MissConfig: r must be >= 1"):
        T.MissConfig(target_modules=["q_proj"], r=0)
    with pytest.raises(ValueError, match=r"apply_adapter\(MonarchConfig\): 'model.layers.0.self_attn.q_proj' "
                                         r"\[64, 64\]: nblocks=5 must divide"):
        T.apply_adapter(tiny_llama(), T.MonarchConfig(target_modules=["q_proj"], nblocks=5))
    with pytest.raises(ValueError, match="no nn.Linear matches"):
        T.apply_adapter(tiny_llama(), T.OFTConfig(target_modules=["nope"]))
    with pytest.raises(ValueError, match=r"r=100 must be <= in_features=64"):
        T.apply_adapter(tiny_llama(), T.MissConfig(target_modules=["q_proj"], r=100))
    m = T.apply_adapter(tiny_llama(), T.OFTConfig(target_modules=["q_proj"], block_size=8))
    with pytest.raises(ValueError, match="already has an adapter"):
        T.apply_adapter(m, T.OFTConfig(target_modules=["q_proj"], block_size=8))


# ---------------------------------------------------------------------------------------------------------------
# HF PEFT interop: a PEFT model runs on peftcore's ops in one call, same outputs and gradients.


@pytest.fixture
def fake_fbd(monkeypatch):
    import peft.tuners.boft.layer as boft_layer

    monkeypatch.setattr(boft_layer, "_FBD_CUDA", _FakeFBD())


PEFT_CONFIGS = {
    "oft": lambda: peft.OFTConfig(oft_block_size=8, r=0, target_modules=["q_proj", "v_proj", "up_proj"],
                                  init_weights=False),
    "oft_exact": lambda: peft.OFTConfig(oft_block_size=16, r=0, target_modules=["o_proj"], init_weights=False,
                                        use_cayley_neumann=False),
    "boft": lambda: peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2,
                                    target_modules=["q_proj", "down_proj"], init_weights=False),
    "miss": lambda: peft.MissConfig(r=16, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False),
    "miss_tail": lambda: peft.MissConfig(r=48, target_modules=["down_proj"], init_weights=False),
    "miss_mini": lambda: peft.MissConfig(r=8, mini_r=32, init_weights="mini", target_modules=["up_proj", "q_proj"]),
}


def _peft_model(kind):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(tiny_llama(), PEFT_CONFIGS[kind]())
    with torch.no_grad():  # away from the identity (PEFT's own non-default init is random too; make it larger)
        gen = torch.Generator().manual_seed(7)
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


@pytest.mark.parametrize("kind", sorted(PEFT_CONFIGS))
def test_from_peft_matches_peft(fake_fbd, kind, tmp_path):
    ids = _ids()
    pm = _peft_model(kind)
    expected = _logits(pm, ids)
    pm(input_ids=ids).logits.square().mean().backward()
    params = [p for p in pm.parameters() if p.requires_grad]
    grads = {id(p): p.grad.clone() for p in params}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    pm.zero_grad(set_to_none=True)
    merged_ref = copy.deepcopy(pm).merge_and_unload()  # PEFT's own merge, for the comparison below

    model = T.from_peft(pm)  # one call
    layers = dict(T.adapter_layers(model))
    assert len(layers) == len(grads) // (2 if kind == "boft" else 1)
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=1e-5)
    model(input_ids=ids).logits.square().mean().backward()
    for p in params:  # the same Parameter objects: an optimizer built on the PEFT model keeps working
        torch.testing.assert_close(p.grad, grads[id(p)], atol=1e-5, rtol=1e-4)
    # Our merge equals PEFT's merge_and_unload.
    T.merge_adapter(model)
    for name in layers:
        torch.testing.assert_close(model.get_submodule(name).base_layer.weight,
                                   merged_ref.get_submodule(name).weight, atol=1e-5, rtol=1e-5)
    T.unmerge_adapter(model)
    # And the converted model saves / loads as a peftcore adapter.
    T.save_adapter(model, tmp_path / "p")
    fresh = T.load_adapter(tiny_llama(), tmp_path / "p")
    torch.testing.assert_close(_logits(fresh, ids), expected, atol=1e-5, rtol=1e-5)


def test_from_peft_refuses_miss_bat_and_other_methods():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bat = peft.get_peft_model(tiny_llama(), peft.MissConfig(r=16, init_weights="bat", target_modules=["q_proj"]))
        lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(NotImplementedError, match="init_weights='bat'"):
        T.from_peft(bat)
    with pytest.raises(ValueError, match="no PEFT OFT / BOFT / MiSS Linear layer"):
        T.from_peft(lora)


def test_boft_train_step_builds_no_dxd_matrix():
    """The BOFT layer's forward + backward never materialises a [d, d] tensor (PEFT's layer builds the full
    rotation every step): every aten op's output is recorded and none is d x d (base weight [out, in], out != d)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Shapes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(t, torch.Tensor):
                    self.shapes.add(tuple(t.shape))
            return out

    d, out = 64, 48
    layer = T.BOFTLinear.create(nn.Linear(d, out), T.BOFTConfig(target_modules=["x"], block_size=4,
                                                                n_butterfly_factor=3))
    with torch.no_grad():
        layer.boft_R.normal_(0, 0.2)
    x = torch.randn(10, d, requires_grad=True)
    with Shapes() as rec:
        layer(x).square().sum().backward()
    assert layer.boft_R.grad is not None and layer.boft_R.grad.abs().sum() > 0
    assert (d, d) not in rec.shapes and (1, d, d) not in rec.shapes, sorted(rec.shapes)
