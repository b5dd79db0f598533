"""The sparse-delta tuner (peftcore.tuners.sparse_delta) against plain-torch dense references."""
import copy
import json

import pytest
import torch
from torch import nn

from peftcore import apply_adapter, load_adapter, merge_adapter, save_adapter, unload_adapter, unmerge_adapter
from peftcore.tuners.sparse_delta import (
    ActivationCapture,
    SparseDeltaConfig,
    SparseDeltaLinear,
    SparseDeltaScheduler,
    compose_deltas,
    drop_and_grow,
    load_sparse_delta,
    sparse_delta_layers,
    sparse_delta_state,
)

transformers = pytest.importorskip("transformers")

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = ATTN + ["gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------------ references


def dense_delta(shape, indices, values):
    d = torch.zeros(shape[0] * shape[1], dtype=torch.float64)
    d[indices.long()] = values.detach().double()
    return d.view(shape)


def reference_linear(x, weight, bias, indices, values, scale):
    w = weight.double() + scale * dense_delta(weight.shape, indices, values)
    y = x.double() @ w.t()
    return y if bias is None else y + bias.double()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def batch(seed, b=2, t=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (b, t), generator=g)


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def randomize_values(model, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in sparse_delta_layers(model):
            layer.values.copy_(torch.randn(layer.nnz, generator=g) * std)


# ------------------------------------------------------------------------------------------------ the layer


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_layer_forward_backward_matches_dense(wdtype, index_dtype):
    torch.manual_seed(0)
    lin = nn.Linear(24, 20, bias=True).to(wdtype)
    idx = torch.randperm(24 * 20)[:50].sort().values.to(index_dtype)
    layer = SparseDeltaLinear(lin, idx, scale=0.7, values_dtype=torch.float32)
    assert not lin.weight.requires_grad and layer.values.requires_grad
    assert torch.count_nonzero(layer.values) == 0
    with torch.no_grad():
        layer.values.normal_()
    x = torch.randn(3, 5, 24, dtype=wdtype)
    y = layer(x)
    ref = reference_linear(x, lin.weight, lin.bias, idx, layer.values, 0.7)
    torch.testing.assert_close(y.double(), ref, **TOL[wdtype])
    # values' gradient = scale * dL/dW_eff at the delta's positions
    go = torch.randn_like(y)
    y.backward(go)
    gw = go.reshape(-1, 20).double().t() @ x.reshape(-1, 24).double()
    torch.testing.assert_close(layer.values.grad.double(), 0.7 * gw.flatten()[idx.long()], **TOL[wdtype])
    assert lin.weight.grad is None


def test_layer_merge_unmerge_roundtrip():
    torch.manual_seed(1)
    lin = nn.Linear(16, 12)
    w0 = lin.weight.detach().clone()
    idx = torch.randperm(16 * 12)[:30].sort().values
    layer = SparseDeltaLinear(lin, idx, scale=2.0)
    with torch.no_grad():
        layer.values.normal_()
    x = torch.randn(4, 16)
    y = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(lin.weight.double(), w0.double() + 2.0 * dense_delta(w0.shape, idx, layer.values))
    torch.testing.assert_close(layer(x), y, **TOL[torch.float32])
    torch.testing.assert_close(layer(x), lin(x))  # merged forward is the plain base linear
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(lin.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), y)
    assert set(layer.delta_state()) == {"indices", "values"}


def test_layer_rejects_bad_indices():
    lin = nn.Linear(4, 4)
    with pytest.raises(Exception):
        SparseDeltaLinear(lin, torch.tensor([3, 1]))  # not sorted
    with pytest.raises(Exception):
        SparseDeltaLinear(lin, torch.tensor([0, 16]))  # out of range
    with pytest.raises(TypeError):
        SparseDeltaLinear(lin, torch.tensor([0.0, 1.0]))


# ------------------------------------------------------------------------------------------------ config


def test_config_matching_and_serialisation():
    c = SparseDeltaConfig(target_modules=["q_proj", "model.layers.1.mlp.down_proj"], exclude_modules=["layers.0.self_attn.q_proj"])
    assert c.matches("model.layers.1.self_attn.q_proj")
    assert not c.matches("model.layers.0.self_attn.q_proj")  # excluded
    assert c.matches("model.layers.1.mlp.down_proj") and not c.matches("model.layers.0.mlp.down_proj")
    assert not c.matches("model.layers.1.self_attn.xq_proj")  # suffix must be a whole name component
    r = SparseDeltaConfig(target_modules=r".*layers\.1\..*_proj", values_dtype=torch.bfloat16)
    assert r.matches("model.layers.1.mlp.up_proj") and not r.matches("model.layers.0.mlp.up_proj")
    assert SparseDeltaConfig.from_json(r.to_json()) == r and r.torch_values_dtype == torch.bfloat16
    assert c.nnz_for(100, 100) == 100 and c.nnz_for(3, 3) == 1
    with pytest.raises(ValueError):
        SparseDeltaConfig(selection="nope")
    with pytest.raises(ValueError):
        SparseDeltaConfig(density=0)


def test_apply_errors():
    m = tiny_llama()
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply_adapter(m, SparseDeltaConfig(target_modules=["nothing_here"]))
    with pytest.raises(ValueError, match="calib_fn"):
        apply_adapter(m, SparseDeltaConfig(target_modules=["q_proj"], selection="gradient"))
    from transformers.pytorch_utils import Conv1D

    with pytest.raises(TypeError, match="Conv1D"):
        apply_adapter(nn.Sequential(Conv1D(4, 4)), SparseDeltaConfig(target_modules=["0"]))
    apply_adapter(m, SparseDeltaConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already"):
        apply_adapter(m, SparseDeltaConfig(target_modules=["q_proj"]))


# ------------------------------------------------------------------------------------------------ apply on a HF model


def test_apply_llama_params_init_equality_and_training():
    base = tiny_llama()
    model = copy.deepcopy(base)
    cfg = SparseDeltaConfig(target_modules=ALL_LINEAR, density=0.05, selection="random", seed=3)
    assert apply_adapter(model, cfg) is model
    layers = dict(sparse_delta_layers(model))
    assert len(layers) == 2 * len(ALL_LINEAR)
    expected = sum(round(0.05 * l.out_features * l.in_features) for l in layers.values())
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable.values()) == expected
    assert all(n.endswith(".values") for n in trainable)
    assert not model.model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad
    ids = batch(0)
    torch.testing.assert_close(logits(model, ids), logits(base, ids), **TOL[torch.float32])

    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = lm_loss(model, ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    # only the deltas moved
    sd_model = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items()}
    for k, v in base.state_dict().items():
        torch.testing.assert_close(sd_model[k], v, atol=0, rtol=0)


def test_random_selection_properties():
    cfg = SparseDeltaConfig(target_modules=ATTN, density=0.1, seed=7)
    a = sparse_delta_state(apply_adapter(tiny_llama(), cfg))
    b = sparse_delta_state(apply_adapter(tiny_llama(), cfg))
    c = sparse_delta_state(apply_adapter(tiny_llama(), SparseDeltaConfig(target_modules=ATTN, density=0.1, seed=8)))
    for name, d in a.items():
        idx = d["indices"]
        assert idx.dtype == torch.int64 and (idx[1:] > idx[:-1]).all()
        assert torch.equal(idx, b[name]["indices"])  # deterministic per seed
    assert any(not torch.equal(a[n]["indices"], c[n]["indices"]) for n in a)
    q0, q1 = a["model.layers.0.self_attn.q_proj"]["indices"], a["model.layers.1.self_attn.q_proj"]["indices"]
    assert not torch.equal(q0, q1)  # each layer draws its own positions
    # uniform: over many draws every row is hit about equally (chi-square-ish loose bound)
    from peftcore.tuners.sparse_delta import random_indices

    idx = random_indices(8, 50, 200, torch.Generator().manual_seed(0))
    rows = torch.bincount(idx // 50, minlength=8).float()
    assert rows.min() > 10 and rows.max() < 40


def test_magnitude_selection_picks_smallest_abs_weight():
    base = tiny_llama()
    model = apply_adapter(copy.deepcopy(base), SparseDeltaConfig(target_modules=ALL_LINEAR, density=0.03, selection="magnitude"))
    for name, layer in sparse_delta_layers(model):
        w = base.get_submodule(name).weight.detach().abs().flatten()
        idx = layer.indices.long()
        assert (idx[1:] > idx[:-1]).all() and idx.numel() == round(0.03 * w.numel())
        chosen = torch.zeros_like(w, dtype=torch.bool)
        chosen[idx] = True
        assert w[chosen].max() <= w[~chosen].min(), name


def test_gradient_selection_matches_dense_weight_gradient():
    base = tiny_llama()
    batches = [batch(10), batch(11)]

    def calib_fn(m):
        for ids in batches:
            lm_loss(m, ids).backward()

    model = apply_adapter(
        copy.deepcopy(base), SparseDeltaConfig(target_modules=ALL_LINEAR, density=0.04, selection="gradient"), calib_fn=calib_fn
    )
    # dense reference: the accumulated weight gradient of the plain model on the same batches
    ref = copy.deepcopy(base)
    for p in ref.parameters():
        p.requires_grad_(False)
    names = [n for n, _ in sparse_delta_layers(model)]
    for n in names:
        ref.get_submodule(n).weight.requires_grad_(True)
    calib_fn(ref)
    for name in names:
        layer = model.get_submodule(name)
        assert layer.values.grad is None and torch.count_nonzero(layer.values) == 0
        g = ref.get_submodule(name).weight.grad.abs().flatten()
        idx = layer.indices.long()
        assert (idx[1:] > idx[:-1]).all() and idx.numel() == round(0.04 * g.numel())
        chosen = torch.zeros_like(g, dtype=torch.bool)
        chosen[idx] = True
        assert g[chosen].min() >= g[~chosen].max() * (1 - 1e-4), name
    # the function is unchanged at init
    ids = batch(0)
    torch.testing.assert_close(logits(model, ids), logits(base, ids), **TOL[torch.float32])


# ------------------------------------------------------------------------------------------------ drop and grow


def _train(model, opt, steps, seed0=100):
    model.train()
    for s in range(steps):
        loss = lm_loss(model, batch(seed0 + s))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def test_drop_and_grow_realigns_values_and_adam_state():
    base = tiny_llama()
    model = apply_adapter(copy.deepcopy(base), SparseDeltaConfig(target_modules=ALL_LINEAR, density=0.05, seed=1))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    _train(model, opt, 3)
    layers = dict(sparse_delta_layers(model))
    ids = batch(555)
    # dense reference gradient of W_eff on the batch the capture sees
    ref = unload_adapter(copy.deepcopy(model), merge=True)
    for p in ref.parameters():
        p.requires_grad_(False)
    for n in layers:
        ref.get_submodule(n).weight.requires_grad_(True)
    ref.train()
    lm_loss(ref, ids).backward()

    with ActivationCapture(layers) as cap:
        opt.zero_grad()
        lm_loss(model, ids).backward()
    before = {
        n: dict(idx=l.indices.clone(), v=l.values.detach().clone(),
                m=opt.state[l.values]["exp_avg"].clone(), s=opt.state[l.values]["exp_avg_sq"].clone(),
                gr=l.values.grad.clone(), obj=l.values, storage=l.values.data_ptr())
        for n, l in layers.items()
    }
    frac = 0.3
    stats = drop_and_grow(model, opt, frac, cap)
    assert set(stats) == set(layers) and sum(stats.values()) > 0
    group_params = [p for g in opt.param_groups for p in g["params"]]
    for n, l in layers.items():
        b = before[n]
        nnz = b["idx"].numel()
        n_drop = round(frac * nnz)
        idx = l.indices.long()
        assert idx.numel() == nnz and (idx[1:] > idx[:-1]).all()
        assert l.values is b["obj"] and l.values.data_ptr() == b["storage"]
        assert any(p is l.values for p in group_params)
        st = opt.state[l.values]
        old_pos = {int(i): k for k, i in enumerate(b["idx"])}
        # a re-grown just-dropped position counts as new: zero value and state
        dropped_sorted = torch.argsort(b["v"].abs(), stable=True)[:n_drop]
        dropped = b["idx"][dropped_sorted]
        kept_set = b["idx"][~torch.isin(b["idx"], dropped)]
        is_new = ~torch.isin(idx, kept_set)
        assert int(is_new.sum()) == n_drop
        assert torch.count_nonzero(l.values.detach()[is_new]) == 0
        assert torch.count_nonzero(st["exp_avg"][is_new]) == 0 and torch.count_nonzero(st["exp_avg_sq"][is_new]) == 0
        keep_idx = idx[~is_new]
        assert torch.equal(keep_idx, kept_set)
        # kept values and Adam moments bit-exact at their positions
        pos = torch.tensor([old_pos[int(i)] for i in keep_idx])
        assert torch.equal(l.values.detach()[~is_new], b["v"][pos])
        assert torch.equal(st["exp_avg"][~is_new], b["m"][pos])
        assert torch.equal(st["exp_avg_sq"][~is_new], b["s"][pos])
        assert torch.equal(l.values.grad[~is_new], b["gr"][pos]) and torch.count_nonzero(l.values.grad[is_new]) == 0
        # dropped = smallest |values|; grown = largest |dense grad| outside the kept set
        assert b["v"].abs()[pos].min() >= b["v"].abs()[dropped_sorted].max()
        g = ref.get_submodule(n).weight.grad.abs().flatten()
        cand = torch.ones_like(g, dtype=torch.bool)
        cand[kept_set] = False
        new_idx = idx[is_new]
        cand_rest = cand.clone()
        cand_rest[new_idx] = False
        assert g[new_idx].min() >= g[cand_rest].max() * (1 - 1e-4) - 1e-9, n
    # training goes on with the realigned state
    _train(model, opt, 2, seed0=200)


def test_scheduler_periodic_updates_and_hooks():
    model = apply_adapter(tiny_llama(), SparseDeltaConfig(target_modules=ATTN, density=0.05, seed=2))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = SparseDeltaScheduler(model, opt, drop_fraction=0.2, every_n_steps=2, end_step=6, anneal="cosine")
    layers = dict(sparse_delta_layers(model))
    idx0 = {n: l.indices.clone() for n, l in layers.items()}
    model.train()
    for step in range(1, 9):
        armed = all(len(l._forward_hooks) == 1 for l in layers.values())
        assert armed == sched.is_due(step), step  # hooks live only during due steps
        loss = lm_loss(model, batch(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        out = sched.step()
        assert (out is not None) == (step in (2, 4, 6))
    assert [h[0] for h in sched.history] == [2, 4, 6]
    fracs = [h[1] for h in sched.history]
    assert fracs[0] > fracs[1] > fracs[2] == pytest.approx(0.0)
    assert any(not torch.equal(idx0[n], l.indices) for n, l in layers.items())
    for n, l in layers.items():
        assert l.indices.numel() == idx0[n].numel() and (l.indices[1:] > l.indices[:-1]).all()
    assert torch.isfinite(loss)
    sched.close()
    assert all(len(l._forward_hooks) == 0 for l in layers.values())


# ------------------------------------------------------------------------------------------------ merge / unload


def test_merge_unmerge_unload_model():
    base = tiny_llama()
    model = apply_adapter(copy.deepcopy(base), SparseDeltaConfig(target_modules=ALL_LINEAR, density=0.1))
    randomize_values(model)
    ids = batch(3)
    y = logits(model, ids)
    assert (y - logits(base, ids)).abs().max() > 1e-3  # the delta does something
    merge_adapter(model)
    assert all(l.merged for _, l in sparse_delta_layers(model))
    torch.testing.assert_close(logits(model, ids), y, atol=1e-4, rtol=1e-4)
    unmerge_adapter(model)
    torch.testing.assert_close(logits(model, ids), y)
    for n, l in sparse_delta_layers(model):
        torch.testing.assert_close(l.weight, base.get_submodule(n).weight, atol=1e-6, rtol=0)
    # unload with merge: plain nn.Linear with W + scale*S
    merged = unload_adapter(copy.deepcopy(model), merge=True)
    assert not list(sparse_delta_layers(merged))
    assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(logits(merged, ids), y, atol=1e-4, rtol=1e-4)
    for n, l in sparse_delta_layers(model):
        ref = base.get_submodule(n).weight.double() + dense_delta(l.weight.shape, l.indices, l.values)
        torch.testing.assert_close(merged.get_submodule(n).weight.double(), ref, atol=1e-6, rtol=0)
    # unload without merge: the original model back
    plain = unload_adapter(model, merge=False)
    torch.testing.assert_close(logits(plain, ids), logits(base, ids))


# ------------------------------------------------------------------------------------------------ save / load / compose


def test_save_load_roundtrip(tmp_path):
    from safetensors import safe_open

    base = tiny_llama()
    cfg = SparseDeltaConfig(target_modules=ATTN, density=0.08, scale=0.5, seed=4)
    model = apply_adapter(copy.deepcopy(base), cfg)
    randomize_values(model, seed=1)
    ids = batch(4)
    y = logits(model, ids)
    path = tmp_path / "delta"
    save_adapter(model, path)
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    meta = json.loads((path / "adapter_config.json").read_text())["methods"][0]["metadata"]
    assert keys == {f"sparse_delta.{n}.{k}" for n, _ in sparse_delta_layers(model) for k in ("indices", "values")}
    assert SparseDeltaConfig.from_dict(meta["config"]) == cfg
    assert meta["shapes"]["model.layers.0.self_attn.k_proj"] == [16, 32]
    # into a plain model: wrapped on load
    fresh = load_adapter(copy.deepcopy(base), path)
    torch.testing.assert_close(logits(fresh, ids), y)
    for (n, a), (_, b) in zip(sparse_delta_layers(model), sparse_delta_layers(fresh)):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values) and b.scale == 0.5
    # into a model that already has (other) deltas: same Parameter objects, new contents
    other = apply_adapter(copy.deepcopy(base), SparseDeltaConfig(target_modules=ATTN, density=0.08, scale=0.5, seed=99))
    objs = [l.values for _, l in sparse_delta_layers(other)]
    load_adapter(other, path)
    assert all(a is l.values for a, (_, l) in zip(objs, sparse_delta_layers(other)))
    torch.testing.assert_close(logits(other, ids), y)
    # wrong shapes are refused
    wrong = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    with pytest.raises(ValueError, match="delta is for"):
        load_adapter(wrong, path)


def test_compose_deltas_sums_overlaps():
    a = {"indices": torch.tensor([1, 5, 9]), "values": torch.tensor([1.0, 2.0, 3.0])}
    b = {"indices": torch.tensor([0, 5, 10], dtype=torch.int32), "values": torch.tensor([0.5, -1.0, 4.0])}
    c = compose_deltas(a, b)
    assert torch.equal(c["indices"], torch.tensor([0, 1, 5, 9, 10]))
    torch.testing.assert_close(c["values"], torch.tensor([0.5, 1.0, 1.0, 3.0, 4.0]))
    cw = compose_deltas(a, b, weights=[2.0, 1.0])
    torch.testing.assert_close(dense_delta((1, 11), cw["indices"], cw["values"]),
                               2 * dense_delta((1, 11), a["indices"], a["values"]) + dense_delta((1, 11), b["indices"], b["values"]))

    # model level: two adapters (different supports) composed == sum of their dense deltas
    base = tiny_llama()
    m1 = apply_adapter(copy.deepcopy(base), SparseDeltaConfig(target_modules=ATTN, density=0.1, seed=1))
    m2 = apply_adapter(copy.deepcopy(base), SparseDeltaConfig(target_modules=["q_proj", "gate_proj"], density=0.1, seed=2))
    randomize_values(m1, seed=5)
    randomize_values(m2, seed=6)
    comp = compose_deltas(sparse_delta_state(m1), sparse_delta_state(m2))
    assert set(comp) == set(sparse_delta_state(m1)) | set(sparse_delta_state(m2))
    for name, d in comp.items():
        shape = base.get_submodule(name).weight.shape
        want = sum(dense_delta(shape, s[name]["indices"], s[name]["values"])
                   for s in (sparse_delta_state(m1), sparse_delta_state(m2)) if name in s)
        torch.testing.assert_close(dense_delta(shape, d["indices"], d["values"]), want)
    both = load_sparse_delta(copy.deepcopy(base), comp)
    merged_ref = copy.deepcopy(base)
    with torch.no_grad():
        for name, d in comp.items():
            w = merged_ref.get_submodule(name).weight
            w.copy_(w.double() + dense_delta(w.shape, d["indices"], d["values"]))
    ids = batch(7)
    torch.testing.assert_close(logits(both, ids), logits(merged_ref, ids), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ PEFT interop


def test_apply_on_a_peft_lora_model():
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False))
    ids = batch(8)
    y = logits(lora, ids)
    apply_adapter(lora, SparseDeltaConfig(target_modules=["q_proj", "o_proj"], density=0.1))
    names = [n for n, _ in sparse_delta_layers(lora)]
    assert len(names) == 4 and all(n.endswith(("q_proj", "o_proj")) for n in names)
    assert isinstance(lora.base_model.model.model.layers[0].self_attn.v_proj, peft.tuners.lora.LoraLayer)
    torch.testing.assert_close(logits(lora, ids), y, **TOL[torch.float32])
    randomize_values(lora)
    # PEFT's merge_and_unload merges and unloads our layers along with its own (W + S + BA, plain nn.Linear)
    yd = logits(lora, ids)
    plain = lora.merge_and_unload(safe_merge=True)
    assert not list(sparse_delta_layers(plain))
    assert all(type(m) is nn.Linear for n, m in plain.named_modules() if n.endswith(("q_proj", "v_proj", "o_proj")))
    torch.testing.assert_close(logits(plain, ids), yd, atol=1e-4, rtol=1e-4)
