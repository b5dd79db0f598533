"""Token-eliminating HF Llama decoder layers: keep ratio 1.0 reproduces the model exactly, elimination composes
with HF PEFT LoRA, and the eliminating layers save much less for backward."""
import pytest
import torch

from peftcore import SparseDeltaConfig, apply_adapter, unload_adapter
from peftcore.tuners.token_elim import TokenElimConfig, decoder_layers

transformers = pytest.importorskip("transformers")


def eliminating(model):
    """The indices of the decoder layers whose forward eliminates tokens."""
    return [i for i, l in enumerate(decoder_layers(model)) if "_token_elim_config" in vars(l)]


def tiny_llama(attn="sdpa", layers=4, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                   attn_implementation=attn)
    return transformers.LlamaForCausalLM(cfg).train()


def _loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.fixture
def gather_calls(monkeypatch):
    """Counts the token_gather calls of the eliminating forward (proves it ran)."""
    from peftcore.tuners.token_elim import layer as te_layer

    calls = [0]
    orig = te_layer.token_gather

    def counting(*a):
        calls[0] += 1
        return orig(*a)

    monkeypatch.setattr(te_layer, "token_gather", counting)
    return calls


@pytest.mark.parametrize("attn,dtype", [("sdpa", torch.float32), ("eager", torch.float32), ("sdpa", torch.float64)])
def test_keep_ratio_one_reproduces_outputs_and_gradients(attn, dtype, gather_calls):
    """Outputs are bitwise equal. Gradients agree to the rounding of their summation order: the eliminating path
    sums a hidden state's gradient contributions in another order (RMSNorm's two uses of its input first, then
    the residual), a last-bit difference in float32 and ~1e-16 in float64."""
    model = tiny_llama(attn).to(dtype)
    ids = torch.randint(0, 97, (2, 100))
    ref_logits, ref_grads = _loss_and_grads(model, ids)
    apply_adapter(model, TokenElimConfig(keep_ratio=1.0, mlp_keep_ratio=1.0, block_size=16, dense_first=0,
                                         dense_last=0))
    assert eliminating(model) == [0, 1, 2, 3]
    logits, grads = _loss_and_grads(model, ids)
    assert gather_calls[0] == 4 * 3  # hidden states, cos, sin per layer: the eliminating path ran
    torch.testing.assert_close(logits, ref_logits, atol=0, rtol=0)
    assert grads.keys() == ref_grads.keys()
    tol = dict(atol=1e-7, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-15, rtol=1e-12)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], **tol, msg=lambda m: f"{n}: {m}")
    unload_adapter(model)
    assert all("forward" not in vars(l) for l in decoder_layers(model))


def test_elimination_changes_only_eliminating_layers_and_trains_lora(gather_calls):
    peft = pytest.importorskip("peft")
    model = tiny_llama()
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    apply_adapter(model, TokenElimConfig(keep_ratio=0.5, block_size=16, dense_first=1, dense_last=1))
    assert eliminating(model) == [1, 2]
    ids = torch.randint(0, 97, (2, 130))  # 9 blocks, the last partial
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss) and gather_calls[0] == 2 * 3
    out.loss.backward()
    lora = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all(g is not None and torch.isfinite(g).all() for g in lora.values())
    assert all(g.abs().sum() > 0 for n, g in lora.items() if "layers.2." in n)
    # eval mode runs the dense layers: same logits as without elimination
    model.eval()
    with torch.no_grad():
        a = model(input_ids=ids).logits
        unload_adapter(model)
        b = model(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_dropped_tokens_ride_the_residual():
    """In an eliminating layer, the attention block leaves the dropped tokens' hidden states unchanged."""
    model = tiny_llama(layers=1)
    layer = decoder_layers(model)[0]
    apply_adapter(model, TokenElimConfig(keep_ratio=0.5, mlp_keep_ratio=1.0, block_size=16, dense_first=0,
                                            dense_last=0))
    captured = {}
    layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: captured.setdefault("h", i[0]))
    ids = torch.randint(0, 97, (1, 64))
    h0 = model.model.embed_tokens(ids)
    model(input_ids=ids)
    h = captured["h"]
    same = (h == h0).all(-1)[0]
    assert int(same.sum()) == 32 and bool(same.view(4, 16).all(-1).sum() == 2)  # two whole blocks dropped
    assert not bool(same[:16].any()) and not bool(same[-16:].any())  # first and last blocks kept


def _saved_activation_bytes(model, ids, layer_ids):
    params = {p.data_ptr() for p in model.parameters()}
    layers = decoder_layers(model)
    total = {"n": 0}
    state = {"on": False}

    def pack(t):
        if state["on"] and t.data_ptr() not in params:
            total["n"] += t.numel() * t.element_size()
        return t

    def pre(m, a, kw=None):
        state["on"] = True

    def post(m, a, o):
        state["on"] = False

    hooks = [layers[i].register_forward_pre_hook(pre) for i in layer_ids]
    hooks += [layers[i].register_forward_hook(post) for i in layer_ids]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    for h in hooks:
        h.remove()
    loss.backward()
    return total["n"]


def test_half_keep_ratio_saves_at_least_1_6x_less_in_eliminating_layers():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(0, 97, (1, 512))
    cfg = TokenElimConfig(keep_ratio=0.5, block_size=64, dense_first=1, dense_last=1)
    chosen = [1, 2]
    dense = _saved_activation_bytes(model, ids, chosen)
    apply_adapter(model, cfg)
    assert eliminating(model) == chosen
    elim = _saved_activation_bytes(model, ids, chosen)
    assert dense / elim >= 1.6, (dense, elim)


def test_composes_with_peftcore_sparse_delta(gather_calls):
    """peftcore's own PEFT modules on q_proj / v_proj (and the MLP, which then runs unchanged) train through the
    eliminating layers; at keep ratio 1.0 the logits equal the same adapted model's without elimination."""
    model = apply_adapter(tiny_llama(), SparseDeltaConfig(target_modules=["q_proj", "v_proj", "up_proj"],
                                                          density=0.05))
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    ids = torch.randint(0, 97, (1, 96))
    ref = model(input_ids=ids).logits.detach()
    apply_adapter(model, TokenElimConfig(keep_ratio=1.0, block_size=16, dense_first=1, dense_last=0))
    torch.testing.assert_close(model(input_ids=ids).logits.detach(), ref, atol=0, rtol=0)
    apply_adapter(model, TokenElimConfig(keep_ratio=0.5, block_size=16, dense_first=1, dense_last=0))  # replaces
    calls = gather_calls[0]
    loss = model(input_ids=ids, labels=ids).loss
    assert gather_calls[0] > calls and torch.isfinite(loss)
    loss.backward()
    trained = [p.grad for p in model.parameters() if p.requires_grad]
    assert trained and all(g is not None and torch.isfinite(g).all() for g in trained)
