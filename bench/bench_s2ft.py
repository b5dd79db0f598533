"""s2ft bench: one training step (forward + backward + AdamW step) of a whole small Llama causal LM built from a
config (no download), side by side:
  (a) full_ft        — every parameter trains;
  (b) peft_lora_r16  — HF PEFT LoRA r=16 on all seven projections of every block;
  (c) s2ft           — peftcore S2FT, ~5% of heads (whole KV groups) and FFN channels per block, o_proj and
                       down_proj columns on co-permuted contiguous ranges (peftcore.ops.partial.partial_linear).
Rows report the median step time, its ratio to full_ft and the step's peak memory above what the model and the
optimizer state hold before it (the AdamW state is not counted; the step's gradients and activations are).
Headline (HEADLINE, bench/run.py's default): s2ft against full_ft, this bench's one comparison.

Run through bench/run.py (table, CSV, PNG) or alone: python bench/bench_s2ft.py [--device cuda] [--quick].
"""
from __future__ import annotations

import argparse
import copy

import torch

from common import compare, peak_memory

import peftcore
from peftcore import S2FTConfig

RATIO = 0.05
# The headline comparison (bench/run.py's summary): peftcore's method against its anchor.
HEADLINE = [dict(family="s2ft", op="s2ft_model", mode="train_step", density=RATIO, method="s2ft", anchor="full_ft",
                 setting="{} of heads and FFN channels trainable")]
OURS = {"s2ft"}  # the rows' peftcore methods (the rest are references)
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sizes(device: str, quick: bool):
    """(LlamaConfig kwargs, batch, seq, dtype). CPU: seconds per step on 2 cores, so few and small."""
    if device == "cuda":
        cfg = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5504, num_hidden_layers=4 if quick else 8,
                   num_attention_heads=16, num_key_value_heads=8)
        return cfg, 4, 1024, torch.bfloat16
    cfg = dict(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=2 if quick else 4,
               num_attention_heads=16, num_key_value_heads=16)
    return cfg, 2 if quick else 4, 64 if quick else 256, torch.float32


def _model(cfg: dict, dtype, device):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(max_position_embeddings=4096, **cfg)
    config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(config).to(dtype=dtype, device=device).train()


def _step(model, ids):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def run():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # so the peak counts this step's gradients, not the last one's

    return run


def methods(base, device):
    import peft

    full = copy.deepcopy(base)
    lora = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=16, lora_alpha=32, target_modules=PROJ))
    s2ft = peftcore.apply_adapter(copy.deepcopy(base), S2FTConfig(head_ratio=RATIO, channel_ratio=RATIO))
    return {"full_ft": full, "peft_lora_r16": lora, "s2ft": s2ft}


def run(device: str = "cpu", quick: bool = False, rounds: int = 15, headline: bool = False) -> list:
    """Rows of the one comparison (headline=True runs the same: it is the headline)."""
    cfg, b, t, dtype = sizes(device, quick)
    base = _model(cfg, dtype, device)
    ids = torch.randint(0, cfg["vocab_size"], (b, t), generator=torch.Generator().manual_seed(0)).to(device)
    models = methods(base, device)
    del base
    fns = {name: _step(m, ids) for name, m in models.items()}
    peaks = {}
    for name, fn in fns.items():
        fn()  # the first step creates the AdamW state, which the peak does not count
        peaks[name] = peak_memory(fn, device)
    # A CPU step takes ~1-2 s (2 cores): a quarter of the rounds keeps this bench within a minute. Not under
    # timing_malloc (bench/common.py): the heap it leaves resident hid the CPU peaks of the families run after this
    # one (0 MB), even with malloc_trim.
    times = compare(fns, device, rounds=rounds if device == "cuda" else max(3, rounds // 4), target=0.0)
    case = (f"llama h={cfg['hidden_size']} L={cfg['num_hidden_layers']} B={b} T={t} "
            f"{str(dtype).replace('torch.', '')}")
    rows = []
    for name, tm in times.items():
        rows.append(dict(family="s2ft", op="s2ft_model", case=case, method=name,
                         density=RATIO if name == "s2ft" else "", mode="train_step", ms=tm * 1e3,
                         ratio=tm / times["full_ft"], ratio_to="full_ft",
                         peak_mb=peaks[name] / 2 ** 20, device=device))
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    for r in run(args.device, args.quick):
        print(r)
