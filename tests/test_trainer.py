"""HF ``transformers.Trainer`` on a tiny Llama with a peftcore adapter (sparse delta with drop-and-grow, S2FT,
BOFT): it trains, writes checkpoints (the Trainer's own, plus the adapter directory of ``PeftcoreCallback``), and a
run stopped after 3 steps and resumed from its checkpoint logs the same losses and ends with the same adapter,
optimizer and LR-scheduler state as an uninterrupted 6-step run."""
import os

import pytest
import torch

import peftcore as pc

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from peftcore.integrations.transformers import PeftcoreCallback  # noqa: E402

STEPS, SAVE = 6, 3


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


CONFIGS = {
    "SPARSE_DELTA": lambda: pc.SparseDeltaConfig(target_modules=["q_proj", "v_proj", "down_proj"], density=0.05,
                                                 seed=1),
    "S2FT": lambda: pc.S2FTConfig(target_modules=["o_proj", "down_proj", "q_proj"], head_ratio=0.5,
                                  channel_ratio=0.1),
    "BOFT": lambda: pc.BOFTConfig(target_modules=["q_proj", "v_proj"], block_size=8, n_butterfly_factor=2),
}
# sparse delta also moves its support (drop-and-grow) on steps 2, 4, 6: one of them after the resume
DROP_AND_GROW = {"SPARSE_DELTA": {"drop_fraction": 0.25, "every_n_steps": 2}}


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(5)
        self.ids = torch.randint(0, 97, (STEPS * 2, 16), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class StopAt(transformers.TrainerCallback):
    """Ends training after ``step`` steps (after that step's checkpoint): an interrupted run."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def trainer(method, out, *extra_callbacks):
    model = pc.apply_adapter(tiny_llama(), CONFIGS[method]())
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2, learning_rate=1e-2,
        lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.01, logging_steps=1, save_strategy="steps",
        save_steps=SAVE, report_to=[], use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
        disable_tqdm=True)
    cb = PeftcoreCallback(drop_and_grow=DROP_AND_GROW.get(method))
    return transformers.Trainer(model=model, args=args, train_dataset=Data(), callbacks=[cb, *extra_callbacks])


def losses(tr):
    return {h["step"]: h["loss"] for h in tr.state.log_history if "loss" in h}


def adapter(model):
    return {k: v.clone() for k, v in pc.adapter_state(model).items()}


@pytest.mark.parametrize("method", list(CONFIGS))
def test_trainer_resume_matches_uninterrupted_run(method, tmp_path):
    torch.set_num_threads(1)
    full = trainer(method, tmp_path / "full")
    start = adapter(full.model)
    full.train()
    want = losses(full)
    assert sorted(want) == list(range(1, STEPS + 1))
    end = adapter(full.model)
    trained = [k for k in start if k.endswith((".values", ".delta", ".boft_R"))]
    assert trained and all(not torch.equal(end[k], start[k]) for k in trained)
    if method == "SPARSE_DELTA":  # the support moved
        assert any(not torch.equal(end[k], start[k]) for k in start if k.endswith("indices"))

    # the checkpoint: the Trainer's files, and the adapter directory, which loads into a plain model
    ckpt = tmp_path / "full" / f"checkpoint-{SAVE}"
    for f in ("model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json", "adapter"):
        assert (ckpt / f).exists(), f
    final = tmp_path / "full" / f"checkpoint-{STEPS}" / "adapter"
    loaded = pc.load_adapter(tiny_llama(), final)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(9))
    full.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, full.model(input_ids=ids).logits,
                                   atol=1e-5, rtol=1e-5)

    # interrupted after step SAVE, then a fresh model and Trainer resume from the checkpoint
    first = trainer(method, tmp_path / "cut", StopAt(SAVE))
    first.train()
    assert sorted(losses(first)) == list(range(1, SAVE + 1))
    resumed = trainer(method, tmp_path / "cut")
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / f"checkpoint-{SAVE}"))
    got = {**losses(first), **losses(resumed)}
    assert sorted(got) == sorted(want)
    for step, loss in want.items():
        assert abs(got[step] - loss) <= 1e-6, (step, got[step], loss)
    final_state = adapter(resumed.model)
    assert final_state.keys() == end.keys()
    for k, v in end.items():
        assert torch.equal(final_state[k], v), k
    # optimizer and LR-scheduler state at the end: the same as the uninterrupted run's
    assert resumed.lr_scheduler.state_dict()["last_epoch"] == full.lr_scheduler.state_dict()["last_epoch"] == STEPS
    assert resumed.lr_scheduler.get_last_lr() == full.lr_scheduler.get_last_lr()
    so, sr = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert so.keys() == sr.keys() and so
    for i in so:
        for name, t in so[i].items():
            assert torch.equal(torch.as_tensor(sr[i][name]), torch.as_tensor(t)), (i, name)
