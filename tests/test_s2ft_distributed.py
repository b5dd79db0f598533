"""S2FT under torch.distributed on CPU (gloo, 2 processes): DDP (with gradient accumulation through no_sync) and
FSDP2 (``fully_shard``) train the same deltas as one process on the concatenated batch.

The workers are this file run as a script with torchrun-style env vars (RANK, WORLD_SIZE, MASTER_ADDR/PORT on
127.0.0.1 and a free port); every wait is bounded (subprocess timeout, process-group timeout).
"""
import os
import socket
import subprocess
import sys
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

WORLD = 2
STEPS = 3
LR = 1e-2
TIMEOUT_S = 75


def global_batches():
    """STEPS global batches of 4 sequences; rank r takes rows [2r, 2r+2)."""
    g = torch.Generator().manual_seed(123)
    return [torch.randint(0, 64, (4, 12), generator=g) for _ in range(STEPS)]


def make_model():
    from test_s2ft_tuner import tiny_llama

    from peftcore.tuners.s2ft import S2FTConfig, apply_s2ft

    model = apply_s2ft(tiny_llama(seed=0), S2FTConfig(target_modules=["o_proj", "down_proj", "q_proj"], head_ratio=0.5, channel_ratio=0.1))
    model.train()
    return model


def deltas(model):
    """{delta name: full tensor} (FSDP2's DTensors gathered)."""
    out = {}
    for n, p in model.named_parameters():
        if n.endswith(".delta"):
            t = p.detach()
            if hasattr(t, "full_tensor"):
                t = t.full_tensor()
            out[n.removeprefix("module.")] = t.clone()
    return out


def reference():
    model = make_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    for ids in global_batches():
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    return deltas(model)


# ---------------------------------------------------------------------------------------------------- worker


def _train_ddp(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    for ids in global_batches():
        mine = ids[2 * rank:2 * rank + 2]
        opt.zero_grad()
        with model.no_sync():  # gradient accumulation: first micro-batch local, second one all-reduces
            (model(input_ids=mine[:1], labels=mine[:1]).loss / 2).backward()
        (model(input_ids=mine[1:], labels=mine[1:]).loss / 2).backward()
        opt.step()
    return deltas(model.module)


def _train_fsdp2(rank):
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    from torch.distributed.tensor import DTensor

    assert all(isinstance(p, DTensor) for p in model.parameters())  # sharded, deltas included
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    for ids in global_batches():
        mine = ids[2 * rank:2 * rank + 2]
        opt.zero_grad()
        model(input_ids=mine, labels=mine).loss.backward()
        opt.step()
    return deltas(model)


def worker(out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=timedelta(seconds=30))
    result = {}
    for name, fn in (("ddp", _train_ddp), ("fsdp2", _train_fsdp2)):
        try:
            result[name] = fn(rank)
        except Exception as e:  # recorded for the test to report precisely; the other mode still runs
            result[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        dist.barrier()
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
    out = tmp_path_factory.mktemp("s2ft_dist")
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
        pytest.fail(f"distributed workers did not finish in {TIMEOUT_S}s")
    codes = [p.returncode for p in procs]
    assert codes == [0] * WORLD, f"worker exit codes {codes}\n" + "\n".join(l[-3000:] for l in logs)
    return torch.load(out / "result.pt"), reference()


def _check(got, want):
    assert isinstance(got, dict), got  # else: the worker's error message and traceback
    assert sorted(got) == sorted(want)
    moved = 0
    for n, t in want.items():
        torch.testing.assert_close(got[n], t, atol=1e-5, rtol=1e-4, msg=n)
        moved += int(t.abs().sum() > 0)
    assert moved == len(want)  # every delta trained


def test_ddp_with_grad_accumulation_matches_single_process(distributed_result):
    result, want = distributed_result
    _check(result["ddp"], want)


def test_fsdp2_matches_single_process(distributed_result):
    result, want = distributed_result
    _check(result["fsdp2"], want)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker(sys.argv[2])
