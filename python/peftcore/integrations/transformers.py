"""HF ``transformers.Trainer`` with peftcore adapters.

A model with peftcore adapters is still the ``PreTrainedModel`` it was, so the Trainer's own checkpoints
(``model.safetensors`` from ``model.state_dict()``, ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``,
``trainer_state.json``) hold everything: the adapters' parameters and buffers (sparse delta's ``indices``, S2FT's
``index``, ...) are entries of the state dict, and loading it rebuilds what derives from them (sparse delta's CSR
view). Resuming needs the model built the same way as the run that wrote the checkpoint (the same base weights and
the same ``apply_adapter`` calls), then ``trainer.train(resume_from_checkpoint=...)``.

:class:`PeftcoreCallback` adds what the Trainer does not know about:
  * ``save_adapter=True``: each checkpoint also gets ``<checkpoint>/adapter/`` written by
    :func:`peftcore.save_adapter` (the PEFT-style directory that :func:`peftcore.load_adapter` loads into a plain
    model), from the main process;
  * ``drop_and_grow={...}``: a :class:`~peftcore.tuners.sparse_delta.SparseDeltaScheduler` with these keyword
    arguments (``drop_fraction``, ``every_n_steps``, ...) built at the start of training over the Trainer's model
    and optimizer, stepped after every optimizer step, its step count taken from the Trainer's ``global_step``
    (so a resumed run drops and grows on the same steps as an uninterrupted one).
"""
from __future__ import annotations

import os
from typing import Optional

from transformers import TrainerCallback

__all__ = ["PeftcoreCallback"]

ADAPTER_DIR = "adapter"


class PeftcoreCallback(TrainerCallback):
    def __init__(self, save_adapter: bool = True, drop_and_grow: Optional[dict] = None):
        self.save_adapter = save_adapter
        self.drop_and_grow = dict(drop_and_grow) if drop_and_grow is not None else None
        self.scheduler = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.drop_and_grow is None:
            return
        from ..tuners.sparse_delta import SparseDeltaScheduler

        if self.scheduler is not None:
            self.scheduler.close()
        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
        self.scheduler = SparseDeltaScheduler(model, opt, **self.drop_and_grow)
        self.scheduler.load_state_dict({"step_count": state.global_step})

    def on_step_end(self, args, state, control, **kwargs):
        if self.scheduler is not None:
            self.scheduler.step()

    def on_train_end(self, args, state, control, **kwargs):
        if self.scheduler is not None:
            self.scheduler.close()
            self.scheduler = None

    def on_save(self, args, state, control, model=None, **kwargs):
        if not self.save_adapter or not state.is_world_process_zero:
            return
        from ..tuners.api import save_adapter

        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        save_adapter(model, os.path.join(ckpt, ADAPTER_DIR))
