"""Every method whose parameters train, under torch.distributed on CPU (gloo, 2 processes): DDP (with gradient
accumulation through ``no_sync``), FSDP2 (``fully_shard``) and DDP under ``torch.compile`` train the same adapter as
one process on the concatenated batch (the gradients of the first step and the adapter after the last step); the
adapter saved from rank 0 with ``peftcore.save_adapter`` loads into a fresh plain model as the same model (same
adapter tensors, same logits). Sparse delta's drop-and-grow (``SparseDeltaScheduler``) under DDP picks the same
support on every rank, the one a single process picks on the global batch.

The workers are this file run as a script with torchrun-style env vars (RANK, WORLD_SIZE, MASTER_ADDR/PORT on
127.0.0.1 and a free port); one launch runs every engine and method; every wait is bounded (subprocess timeout,
process-group timeout). See docs/distributed.md.
"""
import os
import socket
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch

WORLD = 2
STEPS = 3
LR = 1e-2
TIMEOUT_S = 300 + 200 * (os.environ.get("PEFTCORE_SLOW_TESTS") == "1")
NAMES = ("a", "b")  # LoRA: two named adapters, chosen per sample through adapter_batch


def tiny_llama(seed=0):
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def _configs():
    import peftcore as pc

    return {
        "SPARSE_DELTA": lambda: pc.SparseDeltaConfig(target_modules=["q_proj", "v_proj", "down_proj"],
                                                     density=0.05, seed=1),
        "S2FT": lambda: pc.S2FTConfig(target_modules=["o_proj", "down_proj", "q_proj"], head_ratio=0.5,
                                      channel_ratio=0.1),
        "MONARCH": lambda: pc.MonarchConfig(target_modules=["q_proj", "o_proj"], nblocks=4, rank=2),
        "OFT": lambda: pc.OFTConfig(target_modules=["q_proj", "down_proj"], block_size=8),
        "BOFT": lambda: pc.BOFTConfig(target_modules=["q_proj"], block_size=8, n_butterfly_factor=2),
        "MISS": lambda: pc.MissConfig(target_modules=["q_proj", "up_proj"], r=16),
        "LORA": lambda: pc.LoraConfig(target_modules=["q_proj", "v_proj"], adapter_names=list(NAMES), r=[2, 4],
                                      lora_alpha=[4.0, 2.0]),
        # the gates train on their distillation loss (the LM's own attention is the target)
        "SEER_ATTN": lambda: pc.SeerAttnConfig(block_size=4, method="top_k", top_k=2, gate_hidden_dim=8,
                                               gate_init="normal", mode="distill"),
    }


METHODS = ("SPARSE_DELTA", "S2FT", "MONARCH", "OFT", "BOFT", "MISS", "LORA", "SEER_ATTN")
# torch.compile on top of DDP (DDPOptimizer splits the graph at the gradient buckets), on LoRA with per-sample
# adapters. aot_eager: dynamo and AOTAutograd trace peftcore's ops through their fake kernels and autograd, then run
# them eagerly; inductor would add a C++ compile per graph. One method only: each compile costs ~40-60 s here.
COMPILED = ("LORA",)
# FSDP2 under torch.compile works too (LoRA: matches one process, saves and loads), but its compile costs ~80 s on
# 2 cores; it runs when PEFTCORE_SLOW_TESTS=1.
SLOW = os.environ.get("PEFTCORE_SLOW_TESTS") == "1"


def make_model(method):
    import peftcore as pc

    model = pc.apply_adapter(tiny_llama(), _configs()[method]())
    return model.train()


def global_batches():
    """STEPS global batches of 4 sequences; rank r takes rows [2r, 2r+2)."""
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, 97, (4, 12), generator=g) for _ in range(STEPS)]


EVAL_IDS = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(7))


def loss_fn(method, inner, model, ids, rows):
    """The method's training loss on ``ids`` (global batch rows ``rows``); ``inner`` is the unwrapped model."""
    if method == "LORA":
        from peftcore.tuners.lora import adapter_batch

        with adapter_batch(inner, [NAMES[r % 2] for r in rows]):
            return model(input_ids=ids, labels=ids).loss
    if method == "SEER_ATTN":
        from peftcore.tuners.seer_attn import seer_loss

        model(input_ids=ids)
        return seer_loss(inner)
    return model(input_ids=ids, labels=ids).loss


def eval_logits(method, inner, model):
    """Logits on EVAL_IDS with the adapter active (LoRA: sample i uses adapter i; the gates: sparse mode)."""
    was = inner.training
    inner.eval()
    try:
        with torch.no_grad():
            if method == "LORA":
                from peftcore.tuners.lora import adapter_batch

                with adapter_batch(inner, list(NAMES)):
                    return model(input_ids=EVAL_IDS).logits.detach().clone()
            if method == "SEER_ATTN":
                from peftcore.tuners.seer_attn import set_seer_mode

                set_seer_mode(inner, "sparse")
                try:
                    return model(input_ids=EVAL_IDS).logits.detach().clone()
                finally:
                    set_seer_mode(inner, "distill")
            return model(input_ids=EVAL_IDS).logits.detach().clone()
    finally:
        inner.train(was)


def _full(t):
    t = t.detach()
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()  # FSDP2's DTensors gathered


def _name(n):
    return n.removeprefix("_orig_mod.").removeprefix("module.")  # torch.compile's, then DDP's wrapper


def trainable(model):
    """{name: full tensor} of every trainable parameter."""
    return {_name(n): _full(p) for n, p in model.named_parameters() if p.requires_grad}


def grads(model):
    return {_name(n): _full(p.grad) for n, p in model.named_parameters() if p.requires_grad}


def train(method, model, inner, rank=None, accumulate=False, scheduler_fn=None):
    """STEPS optimizer steps; rank None: one process on the whole batch. Returns (first step's grads, adapter)."""
    params = [p for p in model.parameters() if p.requires_grad]
    # Drop-and-grow drops the smallest |values|: after AdamW's first steps they are all about lr, near-ties that
    # the last bit of an all-reduce flips; SGD's values are the gradients themselves, well apart.
    opt = torch.optim.SGD(params, lr=0.5, momentum=0.9) if scheduler_fn else torch.optim.AdamW(params, lr=LR)
    sched = scheduler_fn(inner, opt) if scheduler_fn else None
    first = None
    for ids in global_batches():
        rows = list(range(4)) if rank is None else [2 * rank, 2 * rank + 1]
        opt.zero_grad()
        if accumulate:  # two micro-batches of one sequence: the first local, the second all-reduces
            with model.no_sync():
                (loss_fn(method, inner, model, ids[rows[:1]], rows[:1]) / 2).backward()
            (loss_fn(method, inner, model, ids[rows[1:]], rows[1:]) / 2).backward()
        else:
            loss_fn(method, inner, model, ids[rows], rows).backward()
        if first is None:
            first = grads(model)
        opt.step()
        if sched is not None:
            sched.step()
    return first, trainable(model)


def scheduler_fn(model, opt):
    from peftcore.tuners.sparse_delta import SparseDeltaScheduler

    return SparseDeltaScheduler(model, opt, drop_fraction=0.25, every_n_steps=1)


def sparse_indices(model):
    from peftcore.tuners.sparse_delta.model import sparse_delta_layers

    return {_name(n): m.indices.clone() for n, m in sparse_delta_layers(model)}


def reference(method, with_scheduler=False):
    model = make_model(method)
    first, adapter = train(method, model, model, scheduler_fn=scheduler_fn if with_scheduler else None)
    return {"grads": first, "adapter": adapter, "logits": eval_logits(method, model, model),
            "indices": sparse_indices(model) if method == "SPARSE_DELTA" else None}


# ---------------------------------------------------------------------------------------------------- worker


def _fsdp_modules(model):
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def shard_fsdp2(model):
    """fully_shard each decoder layer, then the root. SeerAttention gates are sharded on their own, with
    ``logits`` (what the wrapper calls) registered as a forward method: their distillation loss does not flow
    through the decoder layer's output, so the layer's backward hooks would never reduce the gates' gradients."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from peftcore.tuners.seer_attn.model import seer_layers

    for _, wrapper in seer_layers(model):
        fully_shard(wrapper.gate)
        register_fsdp_forward_method(wrapper.gate, "logits")
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def save_from_rank0(model, path):
    """Rank 0 writes the adapter with peftcore.save_adapter. Under FSDP2 every rank first gathers the parameters
    (``unshard()`` on each ``fully_shard`` module: a collective), so the adapter's tensors are whole on rank 0."""
    import torch.distributed as dist

    import peftcore as pc

    fsdp = _fsdp_modules(model)
    for m in fsdp:
        m.unshard()
    try:
        if dist.get_rank() == 0:
            pc.save_adapter(model, path)
    finally:
        for m in fsdp:
            m.reshard()
    dist.barrier()


def _run(engine, method, rank, out_dir):
    import torch.distributed as dist

    model = make_model(method)
    inner = model
    kw = {}
    if engine in ("ddp", "ddp_compile", "ddp_scheduler"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(model)
        if engine == "ddp":
            kw["accumulate"] = True
        elif engine == "ddp_compile":
            torch._dynamo.reset()
            model = torch.compile(model, backend="aot_eager")
        else:
            kw["scheduler_fn"] = scheduler_fn
    else:
        from torch.distributed.tensor import DTensor

        shard_fsdp2(model)
        assert all(isinstance(p, DTensor) for p in model.parameters())  # sharded, adapters included
        if engine == "fsdp2_compile":
            torch._dynamo.reset()
            model = torch.compile(model, backend="aot_eager")
    first, adapter = train(method, model, inner, rank=rank, **kw)
    logits = eval_logits(method, inner, inner)
    path = Path(out_dir) / f"{engine}-{method}"
    save_from_rank0(inner, path)
    res = {"grads": first, "adapter": adapter, "logits": logits, "path": str(path)}
    if engine == "fsdp2" and method == "SPARSE_DELTA":  # drop-and-grow refuses sharded values
        from peftcore.tuners.sparse_delta.model import drop_and_grow

        try:
            drop_and_grow(inner, None, 0.25, lambda name: None)
            res["drop_and_grow"] = "no error"
        except NotImplementedError as e:
            res["drop_and_grow"] = str(e)
    if engine == "ddp_scheduler":  # every rank's support, to check they agree
        idx = sparse_indices(inner)
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, idx)
        res["indices"] = gathered
    return res


RUNS = [("ddp", m) for m in METHODS] + [("fsdp2", m) for m in METHODS] + \
       [("ddp_compile", m) for m in COMPILED] + [("ddp_scheduler", "SPARSE_DELTA")] + \
       ([("fsdp2_compile", m) for m in COMPILED] if SLOW else [])


def worker(out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    result = {}
    for engine, method in RUNS:
        t0 = time.perf_counter()
        try:
            result[engine, method] = _run(engine, method, rank, out_dir)
        except Exception as e:  # recorded for the test to report precisely; the other runs still go
            result[engine, method] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        dist.barrier()
        print(f"rank {rank}: {engine} {method} {time.perf_counter() - t0:.1f}s", flush=True)
    if rank == 0:
        torch.save(result, Path(out_dir) / "result.pt")
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- the tests


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_result(tmp_path_factory):
    pytest.importorskip("transformers")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("dist")
    port = _free_port()
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = [p.communicate()[0] for p in procs]
        pytest.fail(f"distributed workers did not finish in {TIMEOUT_S}s\n" + "\n".join(l[-3000:] for l in logs))
    codes = [p.returncode for p in procs]
    assert codes == [0] * WORLD, f"worker exit codes {codes}\n" + "\n".join(l[-3000:] for l in logs)
    return torch.load(out / "result.pt", weights_only=False)


_REFS = {}


def ref(method, with_scheduler=False):
    if (method, with_scheduler) not in _REFS:
        torch.set_num_threads(1)
        _REFS[method, with_scheduler] = reference(method, with_scheduler)
    return _REFS[method, with_scheduler]


def close(got, want, what):
    assert sorted(got) == sorted(want), what
    for n, t in want.items():
        torch.testing.assert_close(got[n], t, atol=1e-5, rtol=1e-4, msg=lambda m: f"{what} {n}: {m}")


def _got(result, engine, method):
    got = result[engine, method]
    assert isinstance(got, dict), got  # else: the worker's error message and traceback
    return got


def _check_training(result, engine, method, with_scheduler=False):
    got, want = _got(result, engine, method), ref(method, with_scheduler)
    init = trainable(make_model(method))
    assert want["adapter"].keys() == init.keys() and want["adapter"]
    for n, t in want["adapter"].items():  # the test means something: every adapter tensor trained
        assert not torch.equal(t, init[n]), f"{method}: {n} did not train"
    close(got["grads"], want["grads"], f"{engine}/{method} first step's gradient")
    close(got["adapter"], want["adapter"], f"{engine}/{method} adapter after {STEPS} steps")
    torch.testing.assert_close(got["logits"], want["logits"], atol=1e-4, rtol=1e-4)


def _check_saved(result, engine, method):
    import peftcore as pc

    got = _got(result, engine, method)
    trained = make_model(method)  # the single-process model, for adapter_state's keys and values
    for n, p in trained.named_parameters():
        if p.requires_grad:
            with torch.no_grad():
                p.copy_(got["adapter"][n])
    fresh = pc.load_adapter(tiny_llama(), got["path"])
    assert pc.adapter_methods(fresh) == [method]
    close(pc.adapter_state(fresh), pc.adapter_state(trained), f"{engine}/{method} saved adapter")
    torch.testing.assert_close(eval_logits(method, fresh, fresh), got["logits"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", METHODS)
def test_ddp_with_grad_accumulation_matches_single_process(distributed_result, method):
    _check_training(distributed_result, "ddp", method)


@pytest.mark.parametrize("method", METHODS)
def test_fsdp2_matches_single_process(distributed_result, method):
    _check_training(distributed_result, "fsdp2", method)


@pytest.mark.parametrize("method", COMPILED)
def test_ddp_compiled_matches_single_process(distributed_result, method):
    _check_training(distributed_result, "ddp_compile", method)


@pytest.mark.skipif(not SLOW, reason="FSDP2 + torch.compile: ~80 s of compile on 2 cores; PEFTCORE_SLOW_TESTS=1 runs it")
@pytest.mark.parametrize("method", COMPILED)
def test_fsdp2_compiled_matches_single_process(distributed_result, method):
    _check_training(distributed_result, "fsdp2_compile", method)
    _check_saved(distributed_result, "fsdp2_compile", method)


@pytest.mark.parametrize("engine", ["ddp", "fsdp2"])
@pytest.mark.parametrize("method", METHODS)
def test_save_from_rank0_loads_into_a_plain_model(distributed_result, engine, method):
    _check_saved(distributed_result, engine, method)


def test_sparse_delta_drop_and_grow_under_ddp(distributed_result):
    """SparseDeltaScheduler under DDP: the support moves, is the same on every rank, and is the one a single
    process finds on the global batch (the captured activations are all-gathered before scoring)."""
    _check_training(distributed_result, "ddp_scheduler", "SPARSE_DELTA", with_scheduler=True)
    got, want = distributed_result["ddp_scheduler", "SPARSE_DELTA"], ref("SPARSE_DELTA", True)
    start = sparse_indices(make_model("SPARSE_DELTA"))
    assert any(not torch.equal(want["indices"][n], start[n]) for n in start)  # drop-and-grow moved the support
    for rank_idx in got["indices"]:
        for n, t in want["indices"].items():
            assert torch.equal(rank_idx[n], t), n


def test_drop_and_grow_refuses_fsdp2_sharded_values(distributed_result):
    msg = _got(distributed_result, "fsdp2", "SPARSE_DELTA")["drop_and_grow"]
    assert "values are a DTensor" in msg and "DDP" in msg, msg


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    worker(sys.argv[2])
