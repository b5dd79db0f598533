#!/usr/bin/env python
"""MeteoRA-style mixture of LoRA adapters on a real pretrained model, on CPU: every token picks its top-2 adapters
by a trained gate.

SmolLM2-135M-Instruct (float32) gets 4 LoRA adapters on every attention query / value projection
(``peftcore.apply_adapter`` with a ``LoraConfig``, ``gate_top_k=2``): random, frozen stand-ins for four task
fine-tunings ("tasks" 0..3), and one gate per layer (``in -> 4`` logits; top-2 adapters per token, weighted by the
softmax of their logits, through ``lora_multi_linear``'s ``token_weight``). Each task's prompts start with the
task's instruction; the teacher for a task is the model with that task's adapter on every token. Only the gates
train (Adam), to match the teacher's next-token distribution (KL) without being told the task. Printed: the KL and
how often each layer's gate puts the task's adapter first, before and after training.

    python examples/meteora_gate.py                 # ~2-4 min on 2 cores
    python examples/meteora_gate.py --steps 10      # shorter
"""
from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

from lora_serving import load_smollm2

TASKS = ["Translate into French:", "Answer with a number:", "Write it as a poem:", "Summarise in one word:"]
SENTENCES = ["The cat sleeps on the warm chair.", "We walked to the market this morning.",
             "Rain fell over the quiet town.", "She reads a book every night.", "The train leaves at noon.",
             "Birds sing in the tall trees.", "He painted the door blue.", "The soup is too hot to eat."]


def batch(tok, rng, size):
    tasks = [rng.randrange(len(TASKS)) for _ in range(size)]
    texts = [f"{TASKS[t]} {rng.choice(SENTENCES)}" for t in tasks]
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc, torch.tensor(tasks)


def gate_hits(model, enc, tasks):
    """Per gated layer, the fraction of real tokens whose top-1 adapter is the sequence's task."""
    from peftcore.tuners.lora import MultiLoraLinear

    hits, hooks = [], []

    def hook(mod, inp, out):
        x = inp[0]
        pick = mod.gate(x.reshape(-1, x.shape[-1])).argmax(-1).reshape(x.shape[:-1])
        mask = enc["attention_mask"].bool()
        hits.append(((pick == tasks[:, None]) & mask).sum().item() / mask.sum().item())

    for m in model.modules():
        if isinstance(m, MultiLoraLinear):
            hooks.append(m.register_forward_hook(hook))
    with torch.no_grad():
        model(**enc)
    for h in hooks:
        h.remove()
    return hits


def kl_to_teacher(model, enc, tasks):
    from peftcore.tuners.lora import adapter_batch

    with torch.no_grad(), adapter_batch(model, tasks):
        teacher = F.log_softmax(model(**enc).logits, -1)
    student = F.log_softmax(model(**enc).logits, -1)
    mask = enc["attention_mask"].bool()
    kl = F.kl_div(student, teacher, log_target=True, reduction="none").sum(-1)
    return kl[mask].mean()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)
    from peftcore import LoraConfig, apply_adapter
    from peftcore.tuners.lora import MultiLoraLinear

    torch.manual_seed(0)
    rng = random.Random(0)
    model, tok = load_smollm2()
    for p in model.parameters():
        p.requires_grad_(False)
    apply_adapter(model, LoraConfig(target_modules=["q_proj", "v_proj"], adapter_names=[f"task{i}" for i in range(4)],
                                    r=8, lora_alpha=16, gate_top_k=2))
    gates = []
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, MultiLoraLinear):
            with torch.no_grad():
                m.b_packed.copy_(torch.randn(m.b_packed.shape, generator=gen) * 0.05)
            m.a_packed.requires_grad_(False)
            m.b_packed.requires_grad_(False)
            gates += list(m.gate.parameters())
    opt = torch.optim.Adam(gates, lr=args.lr)
    eval_enc, eval_tasks = batch(tok, random.Random(123), 16)
    kl0 = kl_to_teacher(model, eval_enc, eval_tasks).item()
    hits0 = gate_hits(model, eval_enc, eval_tasks)
    t = time.perf_counter()
    for step in range(args.steps):
        enc, tasks = batch(tok, rng, args.batch)
        loss = kl_to_teacher(model, enc, tasks)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  KL to the task's adapter {loss.item():.4f}")
    secs = time.perf_counter() - t
    kl1 = kl_to_teacher(model, eval_enc, eval_tasks).item()
    hits1 = gate_hits(model, eval_enc, eval_tasks)
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    print(f"held-out KL: {kl0:.4f} -> {kl1:.4f}; the task's adapter first: {mean(hits0):.0%} -> {mean(hits1):.0%} of "
          f"tokens (mean over {len(hits1)} gates; chance 25%); {args.steps} steps in {secs:.1f} s")
    return kl0, kl1, mean(hits0), mean(hits1)


if __name__ == "__main__":
    main()
