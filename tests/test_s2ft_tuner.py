"""The S2FT tuner (peftcore.tuners.s2ft) against plain-torch dense references on tiny HF decoders."""
import copy
import json

import pytest
import torch
from torch import nn

from peftcore import (adapter_state, apply_adapter, load_adapter, merge_adapter, save_adapter, unload_adapter,
                      unmerge_adapter)
from peftcore.tuners.s2ft import S2FTConfig, S2FTLinear, find_blocks, permute_block, s2ft_layers, s2ft_state

transformers = pytest.importorskip("transformers")

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = ATTN + ["gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------------ references


def dense_delta(shape, dim, index, delta):
    """The full-size float64 update a (dim, index, delta) triple stands for."""
    d = torch.zeros(shape, dtype=torch.float64)
    return d.index_add_(dim, index.long().cpu(), delta.detach().double().cpu())


def reference_partial_linear(x, weight, bias, delta, index, dim, range_start=None):
    w = weight.double() + dense_delta(weight.shape, dim, index, delta).to(weight.device)
    y = x.double() @ w.t()
    return y if bias is None else y + bias.double()


def tiny_llama(seed=0, kv=2, layers=2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_qwen2(seed=0):
    """GQA with n_rep=3 and q/k/v biases."""
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    m = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF inits biases at zero; make them matter
        for n, p in m.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    return m


def tiny_mistral(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.MistralConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=32,
    )
    return transformers.MistralForCausalLM(cfg).eval()


MODELS = {"llama": tiny_llama, "llama_mha": lambda: tiny_llama(kv=4), "qwen2": tiny_qwen2, "mistral": tiny_mistral}


def batch(seed, b=2, t=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (b, t), generator=g)


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize_deltas(model, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in s2ft_layers(model):
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=g) * std)


def reference_merged(base, state):
    """The plain model with every delta (original coordinates) added to its weight, in float64 then cast."""
    ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, (dim, d) in state.items():
            w = ref.get_submodule(name).weight
            w.copy_(w.double() + dense_delta(w.shape, dim, d["index"], d["delta"]))
    return ref


def state_with_dims(model):
    return {n: (model.get_submodule(n).dim, d) for n, d in s2ft_state(model).items()}


def train(model, steps, lr=1e-2, seed0=100):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for s in range(steps):
        loss = lm_loss(model, batch(seed0 + s % 2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


# ------------------------------------------------------------------------------------------------ the layer


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim,contiguous", [(0, True), (0, False), (1, True), (1, False)])
def test_layer_forward_backward_matches_dense(dim, contiguous, wdtype):
    torch.manual_seed(0)
    lin = nn.Linear(24, 20, bias=True).to(wdtype)
    n = lin.weight.shape[dim]
    idx = torch.arange(3, 9) if contiguous else torch.tensor([1, 4, 5, 11, 17])
    layer = S2FTLinear(lin, idx, dim, 3 if contiguous else None)
    assert not lin.weight.requires_grad and layer.delta.requires_grad
    assert layer.delta.shape == ((idx.numel(), 24) if dim == 0 else (20, idx.numel())) and n > idx.max()
    assert torch.count_nonzero(layer.delta) == 0 and layer.delta.dtype == torch.float32
    x = torch.randn(3, 5, 24, dtype=wdtype)
    torch.testing.assert_close(layer(x), lin(x), **TOL[wdtype])  # the op splits the GEMM: rounding differs
    with torch.no_grad():
        layer.delta.normal_()
    y = layer(x)
    torch.testing.assert_close(y.double(), reference_partial_linear(x, lin.weight, lin.bias, layer.delta, idx, dim), **TOL[wdtype])
    go = torch.randn_like(y)
    y.backward(go)
    gw = go.reshape(-1, 20).double().t() @ x.reshape(-1, 24).double()  # dL/dW_eff
    torch.testing.assert_close(layer.delta.grad.double(), gw.index_select(dim, idx), **TOL[wdtype])
    assert lin.weight.grad is None


def test_layer_merge_unmerge_roundtrip():
    torch.manual_seed(1)
    for dim, idx, a in ((1, torch.arange(4, 10), 4), (0, torch.tensor([0, 2, 7]), None)):
        lin = nn.Linear(16, 12)
        w0 = lin.weight.detach().clone()
        layer = S2FTLinear(lin, idx, dim, a)
        with torch.no_grad():
            layer.delta.normal_()
        x = torch.randn(4, 16)
        y = layer(x)
        layer.merge(safe_merge=True)
        torch.testing.assert_close(lin.weight.double(), w0.double() + dense_delta(w0.shape, dim, idx, layer.delta))
        torch.testing.assert_close(layer(x), y, **TOL[torch.float32])
        torch.testing.assert_close(layer(x), lin(x))
        layer.unmerge()
        torch.testing.assert_close(lin.weight, w0, atol=1e-6, rtol=0)
        torch.testing.assert_close(layer(x), y)


def test_layer_rejects_bad_index():
    lin = nn.Linear(4, 6)
    with pytest.raises(ValueError, match="sorted unique"):
        S2FTLinear(lin, torch.tensor([3, 1]), 0)
    with pytest.raises(ValueError, match="sorted unique"):
        S2FTLinear(lin, torch.tensor([0, 4]), 1)  # 4 columns only
    with pytest.raises(ValueError, match="range_start"):
        S2FTLinear(lin, torch.tensor([1, 3]), 0, range_start=1)
    with pytest.raises(ValueError, match="int64"):
        S2FTLinear(lin, torch.tensor([1, 3], dtype=torch.int32), 0)
    with pytest.raises(ValueError, match="dim"):
        S2FTLinear(lin, torch.tensor([1]), 2)


# ------------------------------------------------------------------------------------------------ config


def test_config():
    c = S2FTConfig(target_modules=["o_proj", "model.layers.1.mlp.down_proj"], exclude_modules=["layers.0.self_attn.o_proj"])
    assert c.matches("model.layers.1.self_attn.o_proj") and not c.matches("model.layers.0.self_attn.o_proj")
    assert c.matches("model.layers.1.mlp.down_proj") and not c.matches("model.layers.0.mlp.down_proj")
    r = S2FTConfig(target_modules=r".*layers\.1\..*_proj", delta_dtype=torch.bfloat16, selection="weight")
    assert S2FTConfig.from_json(r.to_json()) == r and r.torch_delta_dtype == torch.bfloat16
    assert S2FTConfig().target_modules == ["o_proj", "down_proj"]
    # groups: ratio of kv heads; num_heads rounds up to whole KV groups
    assert S2FTConfig(head_ratio=0.05).groups_for(32, 8) == 1 and S2FTConfig(head_ratio=0.25).groups_for(32, 8) == 2
    assert S2FTConfig(num_heads=5).groups_for(32, 8) == 2 and S2FTConfig(num_heads=5).groups_for(8, 8) == 5
    assert S2FTConfig(channel_ratio=0.05).channels_for(1000) == 50 and S2FTConfig(num_channels=3).channels_for(10) == 3
    for bad in (dict(selection="nope"), dict(head_ratio=0), dict(channel_ratio=1.5), dict(num_heads=0), dict(delta_dtype="int8")):
        with pytest.raises(ValueError):
            S2FTConfig(**bad)


def test_apply_errors():
    m = tiny_llama()
    with pytest.raises(ValueError, match="no projection"):
        apply_adapter(m, S2FTConfig(target_modules=["nothing_here"]))
    with pytest.raises(ValueError, match="calib_fn"):
        apply_adapter(m, S2FTConfig(selection="gradient"))
    with pytest.raises(ValueError, match="decoder block"):
        apply_adapter(nn.Sequential(nn.Linear(4, 4)), S2FTConfig())
    apply_adapter(m, S2FTConfig())
    with pytest.raises(ValueError, match="already"):
        apply_adapter(m, S2FTConfig())


# ------------------------------------------------------------------------------------------------ co-permutation


@pytest.mark.parametrize("arch", list(MODELS))
def test_copermutation_leaves_logits_unchanged(arch):
    base = MODELS[arch]()
    model = copy.deepcopy(base)
    blocks = find_blocks(model)
    assert len(blocks) == 2
    ids = batch(0)
    g = torch.Generator().manual_seed(1)
    perms = []
    for info in blocks:
        assert info.num_heads == model.config.num_attention_heads and info.num_kv_heads == model.config.num_key_value_heads
        gp, cp = torch.randperm(info.num_kv_heads, generator=g), torch.randperm(info.intermediate, generator=g)
        permute_block(info, gp, cp)
        perms.append((gp, cp))
    # the weights did move ...
    q0, q1 = base.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight
    assert not torch.equal(q0, q1) and torch.equal(q0.sort(0).values, q1.sort(0).values)
    # ... and the function did not
    torch.testing.assert_close(logits(model, ids), logits(base, ids), **TOL[torch.float32])
    for info, (gp, cp) in zip(blocks, perms):
        permute_block(info, torch.argsort(gp), torch.argsort(cp))
    for (n, p), p0 in zip(model.named_parameters(), base.parameters()):
        assert torch.equal(p, p0), n


def test_gqa_permutation_that_splits_a_kv_group_changes_logits():
    # the reason heads move in whole KV groups: moving one query head away from its kv head changes the model
    base = tiny_qwen2()
    model = copy.deepcopy(base)
    attn = model.model.layers[0].self_attn
    hd = attn.head_dim
    rows = torch.arange(6 * hd).view(6, hd)[torch.tensor([0, 1, 3, 2, 4, 5])].reshape(-1)  # swap heads 2 <-> 3
    with torch.no_grad():
        attn.q_proj.weight.copy_(attn.q_proj.weight[rows])
        attn.q_proj.bias.copy_(attn.q_proj.bias[rows])
        attn.o_proj.weight.copy_(attn.o_proj.weight[:, rows])
    ids = batch(0)
    assert not torch.allclose(logits(model, ids), logits(base, ids), atol=1e-4)


# ------------------------------------------------------------------------------------------------ apply on HF models


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_apply_params_init_equality_and_training(arch):
    base = MODELS[arch]()
    model = copy.deepcopy(base)
    cfg = S2FTConfig(head_ratio=0.5, channel_ratio=0.05, seed=3)
    assert apply_adapter(model, cfg) is model
    layers = dict(s2ft_layers(model))
    assert sorted(layers) == sorted(f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.o_proj", "mlp.down_proj"))
    c = model.config
    hd, n_rep = c.hidden_size // c.num_attention_heads, c.num_attention_heads // c.num_key_value_heads
    groups = round(0.5 * c.num_key_value_heads)
    chans = round(0.05 * c.intermediate_size)
    expected = 2 * c.hidden_size * (groups * n_rep * hd + chans)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(".delta") for n in trainable)
    assert sum(p.numel() for p in trainable.values()) == expected
    for name, layer in layers.items():
        assert layer.dim == 1 and layer.range_start == 0  # contiguous, no gather
        k = groups * n_rep * hd if name.endswith("o_proj") else chans
        assert layer.k == k and torch.equal(layer.index, torch.arange(k))
    ids = batch(0)
    torch.testing.assert_close(logits(model, ids), logits(base, ids), **TOL[torch.float32])
    losses = train(model, 8)
    assert losses[-1] < losses[0] - 0.05, losses
    # only the deltas moved: unloading without merging gives the base model back, bit for bit
    plain = unload_adapter(copy.deepcopy(model), merge=False)
    for (n, p), p0 in zip(plain.named_parameters(), base.parameters()):
        assert torch.equal(p, p0), n


def test_gqa_selection_takes_whole_kv_groups():
    base = tiny_qwen2()  # 6 query heads, 2 kv heads, n_rep = 3, head_dim 8
    model = apply_adapter(copy.deepcopy(base), S2FTConfig(target_modules=ATTN, num_heads=2, seed=5))
    for i in range(2):
        attn = model.model.layers[i].self_attn
        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        assert q.k == o.k == 3 * 8 and k.k == v.k == 8  # 2 heads -> one whole group of 3 query heads
        assert (q.dim, k.dim, v.dim, o.dim) == (0, 0, 0, 1)
        g = int(k.orig_index[0]) // 8  # the selected kv head, in original numbering
        assert torch.equal(k.orig_index, torch.arange(g * 8, (g + 1) * 8)) and torch.equal(v.orig_index, k.orig_index)
        assert torch.equal(q.orig_index, torch.arange(g * 24, (g + 1) * 24)) and torch.equal(o.orig_index, q.orig_index)
        # the permuted slice is that group's weights
        battn = base.model.layers[i].self_attn
        torch.testing.assert_close(q.weight[:24], battn.q_proj.weight[g * 24:(g + 1) * 24], atol=0, rtol=0)
        torch.testing.assert_close(k.bias[:8], battn.k_proj.bias[g * 8:(g + 1) * 8], atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_all_projections_rows_and_columns_train_and_unload(arch):
    base = MODELS[arch]()
    model = apply_adapter(copy.deepcopy(base), S2FTConfig(target_modules=ALL_LINEAR, head_ratio=0.5, channel_ratio=0.1))
    dims = {n.rsplit(".", 1)[1]: l.dim for n, l in s2ft_layers(model)}
    assert dims == {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 0, "up_proj": 0, "down_proj": 1}
    losses = train(model, 6)
    assert losses[-1] < losses[0]
    ids = batch(3)
    y = logits(model, ids)
    state = state_with_dims(model)
    plain = unload_adapter(model)
    assert not list(s2ft_layers(plain)) and not hasattr(plain, "peftcore_s2ft_perms")
    torch.testing.assert_close(logits(plain, ids), y, atol=1e-4, rtol=1e-4)
    # back in the original order: the weights are the base weights plus the deltas at their original positions
    ref = reference_merged(base, state)
    for (n, p), p0 in zip(plain.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, p0, atol=1e-6, rtol=1e-6, msg=n)


def test_permute_false_gathers_and_matches():
    base = tiny_llama()
    cfg = S2FTConfig(head_ratio=0.5, channel_ratio=0.1, seed=2)
    a = apply_adapter(copy.deepcopy(base), cfg)
    b = apply_adapter(copy.deepcopy(base), cfg, permute=False)
    randomize_deltas(a, seed=4)
    randomize_deltas(b, seed=4)
    for (na, la), (nb, lb) in zip(s2ft_layers(a), s2ft_layers(b)):
        assert na == nb and lb.range_start is None and torch.equal(lb.index, la.orig_index)
        assert torch.equal(lb.weight, base.get_submodule(nb).weight)  # not moved
    ids = batch(1)
    torch.testing.assert_close(logits(a, ids), logits(b, ids), **TOL[torch.float32])


# ------------------------------------------------------------------------------------------------ merge / unload


def test_merge_unmerge_unload_roundtrips():
    base = tiny_qwen2()
    model = apply_adapter(copy.deepcopy(base), S2FTConfig(target_modules=["o_proj", "down_proj", "q_proj", "up_proj"], head_ratio=0.5))
    randomize_deltas(model, seed=1)
    w_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = batch(2)
    y = logits(model, ids)
    merge_adapter(model)
    assert all(l.merged for _, l in s2ft_layers(model))
    torch.testing.assert_close(logits(model, ids), y, **TOL[torch.float32])
    unmerge_adapter(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, w_before[n], atol=1e-6, rtol=0, msg=n)
    torch.testing.assert_close(logits(model, ids), y, **TOL[torch.float32])
    state = state_with_dims(model)
    merge_adapter(model)  # unload of a merged model keeps the merged weights
    plain = unload_adapter(model)
    assert all(type(plain.get_submodule(n)) is nn.Linear for n in state)
    torch.testing.assert_close(logits(plain, ids), y, atol=1e-4, rtol=1e-4)
    ref = reference_merged(base, state)
    for (n, p), p0 in zip(plain.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, p0, atol=1e-6, rtol=1e-6, msg=n)


# ------------------------------------------------------------------------------------------------ save / load


def test_save_load_roundtrip_in_original_order(tmp_path):
    base = tiny_qwen2()
    cfg = S2FTConfig(target_modules=["o_proj", "down_proj", "v_proj"], head_ratio=0.5, channel_ratio=0.1, seed=9)
    model = apply_adapter(copy.deepcopy(base), cfg)
    train(model, 4)
    ids = batch(5)
    y = logits(model, ids)
    path = tmp_path / "s2ft"
    save_adapter(model, path)
    meta = json.loads((path / "adapter_config.json").read_text())["methods"][0]["metadata"]
    assert S2FTConfig.from_dict(meta["config"]) == cfg
    saved = adapter_state(model)
    state = {n: {k: saved[f"s2ft.{n}.{k}"] for k in ("index", "delta")} for n, _ in s2ft_layers(model)}
    assert len(saved) == 2 * len(state)
    for name, layer in s2ft_layers(model):
        assert torch.equal(state[name]["index"], layer.orig_index)  # original coordinates, sorted
        assert not torch.equal(state[name]["index"], layer.index) or int(layer.orig_index[0]) == 0
        torch.testing.assert_close(state[name]["delta"], layer.delta.detach(), atol=0, rtol=0)
    # into the fresh, un-permuted model: same function as the trained permuted one
    fresh = load_adapter(copy.deepcopy(base), path)
    for name, layer in s2ft_layers(fresh):
        assert torch.equal(layer.index, state[name]["index"]) and torch.equal(layer.weight, base.get_submodule(name).weight)
    torch.testing.assert_close(logits(fresh, ids), y, **TOL[torch.float32])
    # into a model co-permuted with the same selection: the delta lands in the existing Parameter
    again = apply_adapter(copy.deepcopy(base), cfg)
    params = {n: l.delta for n, l in s2ft_layers(again)}
    load_adapter(again, path)
    assert all(l.delta is params[n] for n, l in s2ft_layers(again))
    torch.testing.assert_close(logits(again, ids), y, **TOL[torch.float32])
    # a different selection is refused
    other = apply_adapter(copy.deepcopy(base), S2FTConfig(target_modules=["o_proj", "down_proj", "v_proj"], head_ratio=0.5, channel_ratio=0.1, seed=10))
    with pytest.raises(ValueError, match="other rows"):
        load_adapter(other, path)
    # merging the file into the plain weights gives the same model as unloading the trained one
    torch.testing.assert_close(logits(unload_adapter(fresh), ids), y, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ selection


def _unit_norms(base, name, dim, n_units):
    w = base.get_submodule(name).weight.detach().double()
    return w.pow(2).sum(1 - dim).view(n_units, -1).sum(1)


def _selected_units(layer, size):
    return torch.unique(layer.orig_index // size)


def test_random_selection_is_seeded():
    cfg = S2FTConfig(head_ratio=0.5, channel_ratio=0.2, seed=7)
    a = s2ft_state(apply_adapter(tiny_llama(layers=4), cfg))
    b = s2ft_state(apply_adapter(tiny_llama(layers=4), cfg))
    c = s2ft_state(apply_adapter(tiny_llama(layers=4), S2FTConfig(head_ratio=0.5, channel_ratio=0.2, seed=8)))
    assert all(torch.equal(a[n]["index"], b[n]["index"]) for n in a)
    assert any(not torch.equal(a[n]["index"], c[n]["index"]) for n in a)
    downs = [a[f"model.layers.{i}.mlp.down_proj"]["index"] for i in range(4)]
    assert any(not torch.equal(downs[0], d) for d in downs[1:])  # each block draws its own


def test_weight_selection_picks_largest_norm_units():
    base = tiny_llama(kv=4)  # MHA: one head per group
    model = apply_adapter(copy.deepcopy(base), S2FTConfig(num_heads=2, num_channels=7, selection="weight"))
    for name, layer in s2ft_layers(model):
        n_units, size = (4, 8) if name.endswith("o_proj") else (64, 1)
        norms = _unit_norms(base, name, 1, n_units)
        sel = _selected_units(layer, size)
        assert sel.numel() == (2 if size == 8 else 7)
        chosen = torch.zeros(n_units, dtype=torch.bool)
        chosen[sel] = True
        assert norms[chosen].min() >= norms[~chosen].max(), name


def test_gradient_selection_picks_largest_grad_units():
    base = tiny_llama()
    batches = [batch(10), batch(11)]

    def calib_fn(m):
        for ids in batches:
            lm_loss(m, ids).backward()

    cfg = S2FTConfig(target_modules=["o_proj", "k_proj", "down_proj"], num_heads=2, num_channels=9, selection="gradient")
    model = apply_adapter(copy.deepcopy(base), cfg, calib_fn=calib_fn)
    ref = copy.deepcopy(base)
    for p in ref.parameters():
        p.requires_grad_(False)
    for n, _ in s2ft_layers(model):
        ref.get_submodule(n).weight.requires_grad_(True)
    calib_fn(ref)
    for i in range(2):
        pre = f"model.layers.{i}"
        # KV groups: o_proj columns (2 query heads x 8) + k_proj rows (8) per group; score = summed squared norms
        go = ref.get_submodule(f"{pre}.self_attn.o_proj").weight.grad.double().pow(2).sum(0).view(2, 16).sum(1)
        gk = ref.get_submodule(f"{pre}.self_attn.k_proj").weight.grad.double().pow(2).sum(1).view(2, 8).sum(1)
        sel = _selected_units(model.get_submodule(f"{pre}.self_attn.o_proj"), 16)
        assert sel.numel() == 1 and int(sel) == int(torch.argmax(go + gk))
        gd = ref.get_submodule(f"{pre}.mlp.down_proj").weight.grad.double().pow(2).sum(0)
        sel = _selected_units(model.get_submodule(f"{pre}.mlp.down_proj"), 1)
        chosen = torch.zeros(64, dtype=torch.bool)
        chosen[sel] = True
        assert sel.numel() == 9 and gd[chosen].min() >= gd[~chosen].max() * (1 - 1e-6)
    assert all(p.grad is None for p in model.parameters())
    ids = batch(0)
    torch.testing.assert_close(logits(model, ids), logits(base, ids), **TOL[torch.float32])


# ------------------------------------------------------------------------------------------------ grad accumulation


def test_grad_accumulation_matches_one_batch():
    base = tiny_llama()
    cfg = S2FTConfig(target_modules=["o_proj", "down_proj", "q_proj"], head_ratio=0.5, channel_ratio=0.1)
    a = apply_adapter(copy.deepcopy(base), cfg)
    b = apply_adapter(copy.deepcopy(base), cfg)
    randomize_deltas(a, seed=3)
    randomize_deltas(b, seed=3)
    x1, x2 = batch(20), batch(21)  # same size, so the mean over both = mean of the two means
    for ids in (x1, x2):
        (lm_loss(a, ids) / 2).backward()
    lm_loss(b, torch.cat([x1, x2])).backward()
    for (n, la), (_, lb) in zip(s2ft_layers(a), s2ft_layers(b)):
        assert la.delta.grad is not None and la.delta.grad.abs().sum() > 0
        torch.testing.assert_close(la.delta.grad, lb.delta.grad, atol=1e-6, rtol=1e-5, msg=n)
