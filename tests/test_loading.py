"""Loading is all or nothing and strict, for every single-file loader (tuners._adapters.load_file,
load_sparse_delta, load_s2ft, load_seer_gates; the directory of peftcore.load_adapter: tests/test_api.py): every bad file is refused with an error naming the file, key or module and the offending value,
and the model is then bitwise as before (module types and objects, parameter and buffer values, requires_grad
flags, training modes, attached configs). Also: layers of different sizes in one model round-trip (Monarch / OFT /
BOFT / MiSS), and files of the previous adapter format still load."""
import json
import math
import os

import pytest
import torch
from torch import nn

import peftcore.tuners as T
from peftcore.tuners import _adapters, _loading
from peftcore.tuners.s2ft import S2FTConfig, load_s2ft, s2ft_layers, save_s2ft
from peftcore.tuners.seer_attn import SeerAttnConfig, load_seer_gates, save_seer_gates
from peftcore.tuners.sparse_delta import SparseDeltaConfig, load_sparse_delta, save_sparse_delta, sparse_delta_layers

transformers = pytest.importorskip("transformers")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

LoadError = _loading.LoadError
CONFIG_ATTRS = ("peftcore_adapter_config", "peftcore_adapter_configs", "peftcore_sparse_delta_config",
                "peftcore_s2ft_config", "peftcore_seer_config")


def tiny_llama(seed=0, hidden=64, inter=128):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@torch.no_grad()
def perturb(params, seed=3, std=0.1):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.add_(torch.randn(p.shape, generator=gen).to(p) * std)


# ------------------------------------------------------------------------------------------------ snapshots


def snapshot(model):
    return dict(
        modules=[(n, type(m), id(m), m.training) for n, m in model.named_modules()],
        params=[(n, id(p), p.requires_grad, p.dtype, p.detach().clone(), None if p.grad is None else p.grad.clone())
                for n, p in model.named_parameters()],
        buffers=[(n, id(b), b.detach().clone()) for n, b in model.named_buffers()],
        attrs={a: id(getattr(model, a, None)) for a in CONFIG_ATTRS},
        extra={n: (getattr(m, "scale", None), getattr(m, "merged", None)) for n, m in model.named_modules()},
    )


def assert_unchanged(model, snap):
    now = snapshot(model)
    assert now["modules"] == snap["modules"]
    assert now["attrs"] == snap["attrs"]
    assert now["extra"] == snap["extra"]
    for (n, i, rg, dt, v, g), (n2, i2, rg2, dt2, v2, g2) in zip(snap["params"], now["params"], strict=True):
        assert (n, i, rg, dt) == (n2, i2, rg2, dt2), n
        assert v.shape == v2.shape and torch.equal(v, v2), n
        assert (g is None) == (g2 is None) and (g is None or torch.equal(g, g2)), n
    for (n, i, v), (n2, i2, v2) in zip(snap["buffers"], now["buffers"], strict=True):
        assert (n, i, v.dtype) == (n2, i2, v2.dtype) and v.shape == v2.shape and torch.equal(v, v2), n


def refused(load, model, path, exc, match, **kw):
    """``load(model, path)`` raises ``exc`` matching ``match`` and leaves the model bitwise as it was."""
    snap = snapshot(model)
    with pytest.raises(exc, match=match):
        load(model, path, **kw)
    assert_unchanged(model, snap)


# ------------------------------------------------------------------------------------------------ files of each kind


def read(path):
    with safe_open(os.fspath(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def rewrite(src, dst, tensors=None, meta=None):
    """A copy of ``src`` with ``tensors(dict)`` / ``meta(dict)`` edits applied in place."""
    t, m = read(src)
    if tensors:
        tensors(t)
    if meta:
        meta(m)
    save_file(t, os.fspath(dst), metadata=m)
    return dst


def _adapter_model():
    m = tiny_llama()
    T.apply_adapter(m, T.OFTConfig(target_modules=["q_proj", "down_proj"], block_size=8))
    perturb([p for _, l in T.adapter_layers(m) for p in l.adapter_parameters().values()])
    return m


def _sparse_model():
    m = T.apply_adapter(tiny_llama(), SparseDeltaConfig(target_modules=["q_proj", "v_proj", "down_proj"],
                                                           density=0.05, scale=0.5, seed=2))
    perturb([l.values for _, l in sparse_delta_layers(m)], std=0.5)
    return m


def _s2ft_model():
    m = T.apply_adapter(tiny_llama(), S2FTConfig(target_modules=["o_proj", "down_proj", "v_proj"], head_ratio=0.5,
                                            channel_ratio=0.1, seed=9))
    perturb([l.delta for _, l in s2ft_layers(m)], std=0.3)
    return m


def _seer_model():
    m = tiny_llama()
    T.apply_adapter(m, SeerAttnConfig(block_size=4, method="top_k", top_k=2, gate_hidden_dim=8,
                                           gate_init="normal"))
    return m


KINDS = {  # kind: (trained model factory, save, load, a float tensor's suffix, the last module's tensor suffix)
    "adapter": (_adapter_model, _adapters.save_file, _adapters.load_file, "oft_params"),
    "sparse_delta": (_sparse_model, save_sparse_delta, load_sparse_delta, "values"),
    "s2ft": (_s2ft_model, save_s2ft, load_s2ft, "delta"),
    "seer": (_seer_model, save_seer_gates, load_seer_gates, "q_weight"),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """kind -> (path, logits of the trained model); each file written once."""
    d = tmp_path_factory.mktemp("saved")
    out = {}
    for kind, (make, save, _, _) in KINDS.items():
        m = make()
        if kind == "seer":  # seer's gates do not change logits in distill mode: compare sparse outputs
            T.set_seer_mode(m, "sparse")
        save(m, d / f"{kind}.safetensors")
        out[kind] = (d / f"{kind}.safetensors", logits(m))
    return out


def _load(kind):
    return KINDS[kind][2]


def _fresh(kind):
    return tiny_llama()


def _primed(kind):
    """A model that already has this kind's layers (other values): loading copies into them."""
    m = KINDS[kind][0]()
    perturb([p for p in m.parameters() if p.requires_grad], seed=11)
    return m


def _float_key(path, suffix):
    t, _ = read(path)
    return sorted(k for k in t if k.endswith("." + suffix))[-1]


# ------------------------------------------------------------------------------------------------ every loader


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", ["fresh", "primed"])
def test_roundtrip(saved, kind, target):
    path, want = saved[kind]
    model = _fresh(kind) if target == "fresh" else _primed(kind)
    _load(kind)(model, path)
    if kind == "seer":
        T.set_seer_mode(model, "sparse")
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_paths(saved, kind, tmp_path):
    load, model = _load(kind), _fresh(kind)
    refused(load, model, tmp_path / "nope.safetensors", FileNotFoundError, "nope.safetensors' does not exist")
    refused(load, model, tmp_path, IsADirectoryError, "is a directory")
    data = saved[kind][0].read_bytes()
    for i, blob in enumerate((data[: len(data) // 2], data[:-3], b"\x08" + b"\0" * 7 + b"{}garbage", b"")):
        p = tmp_path / f"bad{i}.safetensors"
        p.write_bytes(blob)
        refused(load, model, p, LoadError, r"bad%d.safetensors' is not a readable safetensors file" % i)


@pytest.mark.parametrize("kind", KINDS)
def test_format_and_config(saved, kind, tmp_path):
    load, model, src = _load(kind), _fresh(kind), saved[kind][0]

    def meta(**kv):
        def edit(m):
            for k, v in kv.items():
                if v is None:
                    m.pop(k, None)
                else:
                    m[k] = v
        return edit

    p = tmp_path / "f.safetensors"
    refused(load, model, rewrite(src, p, meta=meta(format=None)), LoadError, "has format None; this loader reads")
    refused(load, model, rewrite(src, p, meta=meta(format="peftcore.other/9")), LoadError, "'peftcore.other/9'")
    other = "sparse_delta" if kind != "sparse_delta" else "s2ft"
    refused(load, model, saved[other][0], LoadError, "has format 'peftcore.")
    refused(load, model, rewrite(src, p, meta=meta(config="[1, 2]")), LoadError,
            r"metadata .config. must be a JSON object, got list: \[1, 2\]")
    refused(load, model, rewrite(src, p, meta=meta(config="{nope")), LoadError, "metadata 'config' is not valid JSON")
    cfg = json.loads(read(src)[1]["config"])
    refused(load, model, rewrite(src, p, meta=meta(config=json.dumps({**cfg, "bogus": 1}))), LoadError,
            r"config: unknown field\(s\) \['bogus'\]")
    field = {"adapter": "block_size", "sparse_delta": "density", "s2ft": "seed", "seer": "block_size"}[kind]
    refused(load, model, rewrite(src, p, meta=meta(config=json.dumps({**cfg, field: "8"}))), LoadError,
            f"config: field '{field}' must be .*, got '8'")
    refused(load, model, rewrite(src, p, meta=meta(config=json.dumps({**cfg, "peft_type": "LORA"}))), LoadError,
            "peft_type is 'LORA'")


REQUIRED_META = {"adapter": ["peft_type", "config", "shapes", "layers"], "sparse_delta": ["shapes", "scales"],
                 "s2ft": ["shapes", "dims"], "seer": ["config"]}


@pytest.mark.parametrize("kind", KINDS)
def test_missing_metadata(saved, kind, tmp_path):
    for key in REQUIRED_META[kind]:
        p = rewrite(saved[kind][0], tmp_path / f"{key}.safetensors", meta=lambda m: m.pop(key))
        what = "the file no 'config' metadata" if kind == "seer" else f"metadata '{key}' is missing"
        refused(_load(kind), _fresh(kind), p, LoadError, what)


@pytest.mark.parametrize("kind", KINDS)
def test_extra_tensor_strict(saved, kind, tmp_path):
    src, want = saved[kind]
    for extra in ("stray", "model.layers.0.self_attn.q_proj.lora_A", "model.layers.1.mlp.junk.values"):
        p = rewrite(src, tmp_path / "x.safetensors", tensors=lambda t: t.update({extra: torch.zeros(3)}))
        refused(_load(kind), _fresh(kind), p, LoadError, f"extra tensor.*'{extra}'.*strict=False")
    model = _fresh(kind)
    _load(kind)(model, p, strict=False)
    if kind == "seer":
        T.set_seer_mode(model, "sparse")
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", ["fresh", "primed"])
def test_other_sized_model_is_refused(saved, kind, target):
    model = tiny_llama(hidden=32, inter=64)
    if target == "primed":  # the same kind of layers already applied to the smaller model
        if kind == "adapter":
            T.apply_adapter(model, T.OFTConfig(target_modules=["q_proj", "down_proj"], block_size=8))
        elif kind == "sparse_delta":
            T.apply_adapter(model, SparseDeltaConfig(target_modules=["q_proj", "v_proj", "down_proj"]))
        elif kind == "s2ft":
            T.apply_adapter(model, S2FTConfig(target_modules=["o_proj", "down_proj", "v_proj"], head_ratio=0.5))
        else:
            T.apply_adapter(model, SeerAttnConfig(block_size=4, gate_hidden_dim=4))
    match = {"adapter": r"is \[32, 32\], the file's adapter is for \[64, 64\]",
             "sparse_delta": r"is \[32, \d+\], the delta is for \[64, \d+\]",
             "s2ft": r"is \[.*\], the delta is for \[.*\]",
             "seer": "(has shape .* the model needs|cannot apply the file's config)"}[kind]
    refused(_load(kind), model, saved[kind][0], LoadError, match)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", ["fresh", "primed"])
def test_bad_last_entry_changes_nothing(saved, kind, target, tmp_path):
    """The last tensor of the file is wrong: every earlier module would load, none may."""
    src = saved[kind][0]
    key = _float_key(src, KINDS[kind][3])
    model = _fresh(kind) if target == "fresh" else _primed(kind)
    p = rewrite(src, tmp_path / "a.safetensors", tensors=lambda t: t.update({key: t[key][..., :-1].clone()}))
    refused(_load(kind), model, p, LoadError, f"tensor '{key}' has shape .*, the model needs")
    p = rewrite(src, tmp_path / "b.safetensors", tensors=lambda t: t.update({key: t[key].round().to(torch.int32)}))
    refused(_load(kind), model, p, LoadError, f"tensor '{key}' must be floating point, got torch.int32")
    p = rewrite(src, tmp_path / "c.safetensors", tensors=lambda t: t.pop(key))
    refused(_load(kind), model, p, LoadError, "missing|not in the file")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", ["fresh", "primed"])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_failure_inside_the_commit_rolls_back(saved, kind, target, where, monkeypatch):
    """A step of the commit raises (as a device error or out-of-memory would): every step already done is
    undone, so the model is bitwise as before."""
    model = _fresh(kind) if target == "fresh" else _primed(kind)
    run, seen = _loading.Commit.run, []

    def failing_run(self):
        def boom():
            raise RuntimeError("injected failure")
        n = len(self._steps)
        seen.append(n)
        self._steps.insert({"first": 0, "middle": n // 2, "last": n}[where], boom)
        return run(self)

    monkeypatch.setattr(_loading.Commit, "run", failing_run)
    refused(_load(kind), model, saved[kind][0], RuntimeError, "injected failure")
    assert seen and seen[0] >= 2


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_module(saved, kind, tmp_path):
    src = saved[kind][0]
    t, m = read(src)
    old = "model.layers.1."
    new = "model.layers.9."
    t = {k.replace(old, new): v for k, v in t.items()}
    m = {k: v.replace(old, new) if k != "config" else v for k, v in m.items()}
    p = tmp_path / "u.safetensors"
    save_file(t, os.fspath(p), metadata=m)
    match = "not in the file" if kind == "seer" else r"module 'model\.layers\.9\.[a-z_.]+' is not in the model"
    refused(_load(kind), _fresh(kind), p, LoadError, match)


@pytest.mark.parametrize("kind", KINDS)
def test_float64_file_loads_as_the_layer_dtype(saved, kind, tmp_path):
    src, want = saved[kind]
    p = rewrite(src, tmp_path / "d.safetensors",
                tensors=lambda t: t.update({k: v.double() for k, v in t.items() if v.is_floating_point()}))
    for target in ("fresh", "primed"):
        model = _fresh(kind) if target == "fresh" else _primed(kind)
        _load(kind)(model, p)
        floats = {p_.dtype for p_ in model.parameters() if p_.requires_grad}
        if kind == "adapter" and target == "fresh":
            assert floats == {torch.float64}  # a new OFT layer takes the file's dtype (its forward casts)
        else:
            assert floats == {torch.float32}  # cast to what the layer / op supports, at load time
        if kind == "seer":
            T.set_seer_mode(model, "sparse")
        torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=1e-5)  # the first forward works


# ------------------------------------------------------------------------------------------------ sparse_delta


def test_sparse_delta_indices_and_values(saved, tmp_path):
    src = saved["sparse_delta"][0]
    t, _ = read(src)
    key = sorted(k for k in t if k.endswith(".indices"))[-1]
    vkey = key.replace(".indices", ".values")
    n = math.prod(json.loads(read(src)[1]["shapes"])[key.removesuffix(".indices")])
    idx = t[key]
    cases = {
        "float": (idx.float(), f"'{key}' must hold int32 or int64 indices, got torch.float32"),
        "2d": (idx[None], f"'{key}' must be 1-D"),
        "unsorted": (idx.flip(0), f"'{key}' must be sorted ascending without repeats; entries 0, 1"),
        "repeat": (torch.cat([idx[:1], idx[:-1]]), "without repeats"),
        "high": (torch.cat([idx[:-1], torch.tensor([n])]), f"holds index {n}, outside \\[0, {n}\\)"),
        "negative": (torch.cat([torch.tensor([-1]), idx[1:]]), "holds index -1"),
        "empty": (idx[:0], "is empty"),
    }
    for name, (bad, match) in cases.items():
        p = rewrite(src, tmp_path / f"{name}.safetensors", tensors=lambda t: t.update({key: bad}))
        if name == "empty":
            p = rewrite(p, p, tensors=lambda t: t.update({vkey: t[vkey][:0]}))
        for target in ("fresh", "primed"):
            model = _fresh("sparse_delta") if target == "fresh" else _primed("sparse_delta")
            refused(load_sparse_delta, model, p, LoadError, match)
    p = rewrite(src, tmp_path / "v.safetensors", tensors=lambda t: t.update({vkey: t[vkey][:-1].clone()}))
    refused(load_sparse_delta, _fresh("sparse_delta"), p, LoadError, f"'{vkey}' has shape .*, the model needs .*one value per index")
    p = rewrite(src, tmp_path / "s.safetensors", meta=lambda m: m.update(scales=m["scales"].replace("0.5", '"x"', 1)))
    refused(load_sparse_delta, _fresh("sparse_delta"), p, LoadError, "metadata 'scales': .* must be a finite number")


def test_sparse_delta_without_shapes_into_other_model(saved, tmp_path):
    """Without shape metadata a [64, 64] delta's indices would fit a [32, 128] weight: refused, not reshaped."""
    p = rewrite(saved["sparse_delta"][0], tmp_path / "n.safetensors", meta=lambda m: m.pop("shapes"))
    refused(load_sparse_delta, tiny_llama(hidden=32, inter=128), p, LoadError, "metadata 'shapes' is missing")
    # An in-memory state has no shapes: its indices are still range-checked against the model.
    state = {"model.layers.0.self_attn.q_proj": {"indices": torch.tensor([5, 32 * 32]), "values": torch.ones(2)}}
    refused(load_sparse_delta, tiny_llama(hidden=32), state, LoadError, r"state: .* holds index 1024")
    state = {"model.layers.0.self_attn.q_proj": {"indices": torch.tensor([5]), "values": torch.ones(1, dtype=torch.int64)}}
    refused(load_sparse_delta, tiny_llama(hidden=32), state, LoadError, "must be floating point, got torch.int64")


class _Zero(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(0, 8)


def test_in_features_zero(tmp_path):
    p = tmp_path / "z.safetensors"
    save_file({"lin.indices": torch.tensor([0]), "lin.values": torch.ones(1)}, os.fspath(p),
              metadata={"format": "peftcore.sparse_delta/1", "shapes": '{"lin": [8, 0]}', "scales": '{"lin": 1.0}'})
    refused(load_sparse_delta, _Zero(), p, LoadError, "module 'lin' has in_features=0")
    save_file({"lin.oft_params": torch.zeros(0, 28)}, os.fspath(p), metadata={
        "format": "peftcore.adapter/2", "peft_type": "OFT", "config": T.OFTConfig(block_size=8).to_json(),
        "shapes": '{"lin": [8, 0]}', "layers": '{"lin": {}}'})
    refused(_adapters.load_file, _Zero(), p, LoadError, "module 'lin' has in_features=0")


# ------------------------------------------------------------------------------------------------ s2ft


def test_s2ft_index_delta_and_dims(saved, tmp_path):
    src = saved["s2ft"][0]
    t, m = read(src)
    dims = json.loads(m["dims"])
    col = next(n for n, d in dims.items() if d == 1)  # an [out, k] delta
    ikey, dkey = f"{col}.index", f"{col}.delta"
    out, k = t[dkey].shape
    assert k > 1
    cases = {
        "empty": ({ikey: t[ikey][:0], dkey: t[dkey][:, :0]}, f"'{ikey}' is empty"),
        "float": ({ikey: t[ikey].double()}, f"'{ikey}' must hold int32 or int64 indices, got torch.float64"),
        "broadcast": ({dkey: t[dkey][:, :1].clone()}, rf"'{dkey}' has shape \({out}, 1\), the model needs "
                                                      rf"\({out}, {k}\)"),
        "int_delta": ({dkey: t[dkey].to(torch.int64)}, "must be floating point"),
        "unsorted": ({ikey: t[ikey].flip(0), dkey: t[dkey].flip(1)}, "sorted ascending"),
    }
    for name, (upd, match) in cases.items():
        p = rewrite(src, tmp_path / f"{name}.safetensors", tensors=lambda t: t.update(upd))
        for target in ("fresh", "primed"):
            model = _fresh("s2ft") if target == "fresh" else _primed("s2ft")
            refused(load_s2ft, model, p, LoadError, match)
    for bad in (2, "0", None, 0.0):
        p = rewrite(src, tmp_path / "d.safetensors",
                    meta=lambda m: m.update(dims=json.dumps({**dims, col: bad})))
        refused(load_s2ft, _fresh("s2ft"), p, LoadError, rf"metadata 'dims': '{col}' must be 0 \(rows\) or 1")
    # a co-permuted model with another selection
    other = T.apply_adapter(tiny_llama(), S2FTConfig(target_modules=["o_proj", "down_proj", "v_proj"], head_ratio=0.5,
                                                channel_ratio=0.1, seed=10))
    refused(load_s2ft, other, src, LoadError, "selects other rows/columns than the file")


# ------------------------------------------------------------------------------------------------ adapters


def _mixed(kind):
    """A model whose adapter layers have different sizes (as PEFT's OFT with r=2 gives in=64 and in=128)."""
    model = tiny_llama()
    per = {
        "monarch": {"q_proj": T.MonarchConfig(nblocks=4, rank=8), "down_proj": T.MonarchConfig(nblocks=2, rank=4,
                                                                                                scale=0.5)},
        "oft": {"q_proj": T.OFTConfig(block_size=32), "down_proj": T.OFTConfig(block_size=64),
                "v_proj": T.OFTConfig(block_size=8, use_cayley_neumann=False, block_share=True)},
        "boft": {"q_proj": T.BOFTConfig(block_size=4, n_butterfly_factor=3),
                 "down_proj": T.BOFTConfig(block_size=8, n_butterfly_factor=2)},
        "miss": {"q_proj": T.MissConfig(r=16), "down_proj": T.MissConfig(r=48),
                 "up_proj": T.MissConfig(r=8, mini_r=16)},
    }[kind]
    first = None
    for name, lin in list(model.named_modules()):
        leaf = name.rpartition(".")[2]
        if isinstance(lin, nn.Linear) and leaf in per:
            cfg = per[leaf]
            layer = _adapters._layer_class(cfg).create(lin, cfg)
            _adapters._replace(model, name, layer)
            first = first or cfg
    first.target_modules = list(per)
    setattr(model, _adapters.CONFIG_ATTR, first)  # one config for the model, as from_peft attaches
    perturb([p for _, l in T.adapter_layers(model) for p in l.adapter_parameters().values()])
    return model


@pytest.mark.parametrize("kind", ["monarch", "oft", "boft", "miss"])
def test_mixed_layer_sizes_round_trip(kind, tmp_path):
    model = _mixed(kind)
    want = logits(model)
    _adapters.save_file(model, tmp_path / "m.safetensors")
    fresh = _adapters.load_file(tiny_llama(), tmp_path / "m.safetensors")
    a, b = dict(T.adapter_layers(model)), dict(T.adapter_layers(fresh))
    assert a.keys() == b.keys()
    for n in a:
        assert _adapters._layer_fields(a[n]) == _adapters._layer_fields(b[n])
        for pn, p in a[n].adapter_parameters().items():
            assert torch.equal(p, b[n].adapter_parameters()[pn]), (n, pn)
    assert torch.equal(logits(fresh), want)
    # into the model itself (copy path): the per-layer fields match, values come back
    perturb([p for _, l in T.adapter_layers(model) for p in l.adapter_parameters().values()], seed=5)
    _adapters.load_file(model, tmp_path / "m.safetensors")
    assert torch.equal(logits(model), want)
    # a layer whose saved fields differ from the model's layer is refused
    t, m = read(tmp_path / "m.safetensors")
    if kind == "oft":
        refused(_adapters.load_file, _mixed("oft"), rewrite(tmp_path / "m.safetensors", tmp_path / "o.safetensors",
                meta=lambda m: m.update(layers=m["layers"].replace('"use_cayley_neumann": false',
                                                                   '"use_cayley_neumann": true'))),
                LoadError, "v_proj' has .*'use_cayley_neumann': False.*, the file's layer")
        refused(_adapters.load_file, tiny_llama(), rewrite(tmp_path / "m.safetensors", tmp_path / "o.safetensors",
                meta=lambda m: m.update(layers=m["layers"].replace('"block_size": 64', '"block_size": 7'))),
                LoadError, "down_proj' \\[64, 128\\]: block_size=7 must divide in_features=128")
        refused(_adapters.load_file, tiny_llama(), rewrite(tmp_path / "m.safetensors", tmp_path / "o.safetensors",
                meta=lambda m: m.update(layers=m["layers"].replace('"block_size": 64', '"rank": 64'))),
                LoadError, "metadata 'layers': .* must be an object with fields from")


def test_oft_from_peft_with_r_round_trips(tmp_path):
    """PEFT's OFT with r=2 on in=64 and in=128 (block sizes 32 and 64) saves and loads back."""
    peft = pytest.importorskip("peft")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(tiny_llama(), peft.OFTConfig(r=2, oft_block_size=0, target_modules=["q_proj", "down_proj"],
                                                             init_weights=False))
    want = logits(pm)
    model = T.from_peft(pm)
    assert {l.block_size for _, l in T.adapter_layers(model)} == {32, 64}
    _adapters.save_file(model, tmp_path / "p.safetensors")
    fresh = _adapters.load_file(tiny_llama(), tmp_path / "p.safetensors")
    torch.testing.assert_close(logits(fresh), want, atol=1e-5, rtol=1e-5)


def test_adapter_v1_file_still_loads(saved, tmp_path):
    src, want = saved["adapter"]
    p = rewrite(src, tmp_path / "v1.safetensors",
                meta=lambda m: (m.pop("layers"), m.update(format="peftcore.adapter/1")))
    model = _adapters.load_file(tiny_llama(), p)
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=1e-5)
    # a v1 file of mixed-size layers cannot describe them: a clear error, nothing changed
    m = _mixed("oft")
    _adapters.save_file(m, tmp_path / "mixed.safetensors")
    p = rewrite(tmp_path / "mixed.safetensors", tmp_path / "v1m.safetensors",
                meta=lambda m: (m.pop("layers"), m.update(format="peftcore.adapter/1")))
    refused(_adapters.load_file, tiny_llama(), p, LoadError, "tensor '.*oft_params' has shape .*, the model needs")


def test_adapter_layer_type_and_merge(saved):
    src = saved["adapter"][0]
    monarch = T.apply_adapter(tiny_llama(), T.MonarchConfig(target_modules=["q_proj", "down_proj"], nblocks=4))
    refused(_adapters.load_file, monarch, src, LoadError, "is a MonarchLinear; the file holds OFT adapters")
    merged = _primed("adapter")
    T.merge_adapter(merged)
    refused(_adapters.load_file, merged, src, LoadError, "is merged; unmerge it first")
    emb = tiny_llama()
    t, m = read(src)
    name = json.loads(m["layers"]).popitem()[0]
    p = rewrite(src, src.parent / "emb.safetensors", meta=lambda m: m.update(
        shapes=m["shapes"].replace(name, "model.embed_tokens"), layers=m["layers"].replace(name, "model.embed_tokens")),
        tensors=lambda t: t.update({k.replace(name, "model.embed_tokens"): t.pop(k) for k in list(t) if name in k}))
    refused(_adapters.load_file, emb, p, LoadError, "module 'model.embed_tokens' is a Embedding, not an nn.Linear")


def test_loaded_layers_keep_the_model_mode_and_freeze_the_rest(saved):
    model = tiny_llama()  # eval
    _adapters.load_file(model, saved["adapter"][0])
    assert not any(m.training for m in model.modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(".oft_params") for n in trainable)


# ------------------------------------------------------------------------------------------------ more adversarial files


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_config_number(saved, kind, tmp_path):
    """JSON's NaN / Infinity extensions parse in Python: a config number must still be finite (and an int an int)."""
    src = saved[kind][0]
    field, value = {"adapter": ("block_size", float("nan")), "sparse_delta": ("density", float("nan")),
                    "s2ft": ("head_ratio", float("inf")), "seer": ("loss_skip_fraction", float("nan"))}[kind]
    cfg = json.loads(read(src)[1]["config"])
    p = rewrite(src, tmp_path / "n.safetensors", meta=lambda m: m.update(config=json.dumps({**cfg, field: value})))
    for target in ("fresh", "primed"):
        model = _fresh(kind) if target == "fresh" else _primed(kind)
        refused(_load(kind), model, p, LoadError, f"config: field '{field}' must be .*, got (nan|inf)")


@pytest.mark.parametrize("kind", ["adapter", "sparse_delta", "s2ft"])
def test_bad_shapes_metadata(saved, kind, tmp_path):
    src = saved[kind][0]
    shapes = json.loads(read(src)[1]["shapes"])
    name = sorted(shapes)[-1]
    out, inn = shapes[name]
    for bad in ([out, -inn], [out, True], [float(out), inn], [out, inn, 1], "64x64", None, [out]):
        p = rewrite(src, tmp_path / "s.safetensors", meta=lambda m: m.update(shapes=json.dumps({**shapes, name: bad})))
        refused(_load(kind), _fresh(kind), p, LoadError,
                rf"metadata 'shapes': '{name}' must be \[out_features, in_features\]")
    for bad in ("[]", "{}", '"x"', "NaN"):
        p = rewrite(src, tmp_path / "e.safetensors", meta=lambda m: m.update(shapes=bad))
        refused(_load(kind), _fresh(kind), p, LoadError,
                "metadata 'shapes' (names no module|must be a JSON object)")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", ["fresh", "primed"])
def test_right_numel_wrong_shape(saved, kind, target, tmp_path):
    """A tensor with the slot's number of elements but another shape is refused, not reshaped."""
    src = saved[kind][0]
    key = _float_key(src, KINDS[kind][3])
    p = rewrite(src, tmp_path / "r.safetensors",
                tensors=lambda t: t.update({key: t[key].reshape(-1) if t[key].dim() > 1 else t[key][None]}))
    model = _fresh(kind) if target == "fresh" else _primed(kind)
    refused(_load(kind), model, p, LoadError, f"tensor '{key}' has shape .*, the model needs")


@pytest.mark.parametrize("kind", KINDS)
def test_training_modes_kept(saved, kind, tmp_path):
    """A model in train mode with one decoder layer in eval: a refused load changes no mode or flag; a load gives
    each new layer the mode of the module it wraps and leaves every other module's mode alone."""
    model = tiny_llama().train()
    model.model.layers[0].eval()
    model.model.layers[1].self_attn.q_proj.eval()  # a child in another mode than its parent
    model.model.layers[1].mlp.down_proj.eval()
    model.lm_head.weight.requires_grad_(False)
    src = saved[kind][0]
    key = _float_key(src, KINDS[kind][3])
    bad = rewrite(src, tmp_path / "b.safetensors", tensors=lambda t: t.update({key: t[key].to(torch.int16)}))
    refused(_load(kind), model, bad, LoadError, "must be floating point")
    modes = {n: m.training for n, m in model.named_modules()}
    _load(kind)(model, src)
    for n, m in model.named_modules():
        orig = n.replace(".base_layer", "").replace(".base_attn", "")  # a wrapped module: its own mode, as before
        while orig not in modes:  # a new child (dropout, gate): the mode of the module its layer replaced
            orig = orig.rpartition(".")[0]
        assert m.training == modes[orig], n


@pytest.mark.parametrize("kind", KINDS)
def test_loading_into_existing_layers_keeps_the_objects(saved, kind):
    """Loading into existing layers copies in place: the same Parameter objects and storage (so optimizers and any
    parameter sharing, e.g. with a converted PEFT model, keep working), and the file's values."""
    model = _primed(kind)
    params = {n: (p, p.data_ptr()) for n, p in model.named_parameters()}
    _load(kind)(model, saved[kind][0])
    for n, p in model.named_parameters():
        assert params[n][0] is p and params[n][1] == p.data_ptr(), n
    if kind == "seer":
        T.set_seer_mode(model, "sparse")
    torch.testing.assert_close(logits(model), saved[kind][1], atol=1e-5, rtol=1e-5)


def test_sparse_delta_other_nnz_replaces_the_values(saved):
    """An existing layer with another nnz gets the file's (the same Parameter object, new storage, no stale grad)."""
    model = T.apply_adapter(tiny_llama(), SparseDeltaConfig(target_modules=["q_proj", "v_proj", "down_proj"],
                                                               density=0.2, seed=4, index_dtype="int32"))
    layers = dict(sparse_delta_layers(model))
    for layer in layers.values():
        layer.values.grad = torch.ones_like(layer.values)
    values = {n: l.values for n, l in layers.items()}
    load_sparse_delta(model, saved["sparse_delta"][0])
    t, _ = read(saved["sparse_delta"][0])
    for n, l in sparse_delta_layers(model):
        assert l.values is values[n] and l.values.grad is None
        assert l.indices.dtype == torch.int32 and torch.equal(l.indices.long(), t[f"{n}.indices"])
        assert torch.equal(l.values.detach(), t[f"{n}.values"])
    torch.testing.assert_close(logits(model), saved["sparse_delta"][1], atol=1e-5, rtol=1e-5)


def test_module_inside_an_adapter_layer(saved, tmp_path):
    """A name that reaches into an existing adapter layer (its base_layer) is refused, not wrapped twice."""
    src = saved["sparse_delta"][0]
    t, m = read(src)
    name = sorted(json.loads(m["shapes"]))[0]
    inner = name + ".base_layer"
    p = rewrite(src, tmp_path / "i.safetensors",
                tensors=lambda t: t.update({k.replace(name, inner): t.pop(k) for k in list(t) if k.startswith(name + ".")}),
                meta=lambda m: m.update(shapes=m["shapes"].replace(f'"{name}"', f'"{inner}"'),
                                        scales=m["scales"].replace(f'"{name}"', f'"{inner}"')))
    refused(load_sparse_delta, _primed("sparse_delta"), p, LoadError,
            f"module '{inner}' is inside the SparseDeltaLinear '{name}'")


def test_empty_and_odd_paths(tmp_path):
    p = tmp_path / "empty.safetensors"
    save_file({}, os.fspath(p), metadata={"format": "peftcore.s2ft/1", "shapes": "{}", "dims": "{}"})
    refused(load_s2ft, tiny_llama(), p, LoadError, "metadata 'shapes' names no module")
    with pytest.raises(TypeError, match="load_s2ft: path must be a str or os.PathLike, got int"):
        load_s2ft(tiny_llama(), 3)
    lin = nn.Module()
    lin.lin = nn.Linear(0, 8)
    save_file({"lin.index": torch.tensor([0]), "lin.delta": torch.zeros(8, 1)}, os.fspath(p),
              metadata={"format": "peftcore.s2ft/1", "shapes": '{"lin": [8, 0]}', "dims": '{"lin": 1}'})
    refused(load_s2ft, lin, p, LoadError, "module 'lin' has in_features=0")


def test_new_boft_layer_needs_one_dtype(tmp_path):
    model = T.apply_adapter(tiny_llama(), T.BOFTConfig(target_modules=["q_proj"], block_size=8, n_butterfly_factor=2))
    perturb([p for _, l in T.adapter_layers(model) for p in l.adapter_parameters().values()])
    _adapters.save_file(model, tmp_path / "b.safetensors")
    key = sorted(k for k in read(tmp_path / "b.safetensors")[0] if k.endswith(".boft_s"))[0]
    p = rewrite(tmp_path / "b.safetensors", tmp_path / "m.safetensors",
                tensors=lambda t: t.update({key: t[key].double()}))
    refused(_adapters.load_file, tiny_llama(), p, LoadError, r"have dtypes \['torch.float32', 'torch.float64'\]; a new "
            "layer needs one floating dtype")
    want = logits(model)
    perturb([p_ for _, l in T.adapter_layers(model) for p_ in l.adapter_parameters().values()], seed=8)
    _adapters.load_file(model, p)  # existing layers: each value takes its parameter's dtype
    assert {p_.dtype for _, l in T.adapter_layers(model) for p_ in l.adapter_parameters().values()} == {torch.float32}
    torch.testing.assert_close(logits(model), want, atol=1e-5, rtol=1e-5)


def test_save_adapter_refuses_a_config_of_another_type(tmp_path):
    model = T.apply_adapter(tiny_llama(), T.OFTConfig(target_modules=["q_proj"], block_size=8))
    with pytest.raises(ValueError, match=r"save_adapter: the config is MONARCH but the model also has \['OFTLinear'\]"):
        _adapters.save_file(model, tmp_path / "x.safetensors", config=T.MonarchConfig(target_modules=["q_proj"]))
    assert not (tmp_path / "x.safetensors").exists()
