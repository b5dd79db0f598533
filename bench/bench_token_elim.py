"""token_elim bench: a small HF Llama (built from a config, HF PEFT LoRA r=8 on q_proj / v_proj, the base frozen)
fine-tuned on one long sequence, one training step (forward + backward + no optimizer) with and without token
elimination: step time, peak memory of the whole step, and the bytes the token-eliminating layers save for backward
(saved_tensors_hooks, parameters excluded). Methods (the rows' names):
  token_elim_<keep> — peftcore token elimination (peftcore.apply_adapter with TokenElimConfig) at keep ratio 0.25 / 0.5 / 0.75: block 64,
                      first and last layer dense, MLP keep ratio = keep ratio;
  dense             — the same model and adapter without token elimination; every ratio in the rows is against it.
Plus the ops alone (up to 2048 tokens) against their plain-torch references (the tests'):
token_gather / token_scatter_add vs torch.gather / scatter_add, token_block_scores vs the dense softmax map
max-pooled, token_mlp_partial_save vs the plain LlamaMLP forward. Headline (HEADLINE, bench/run.py's default):
keep 0.5 against dense; no other ratio, no ops.

Run through bench/run.py (table, CSV, PNG) or alone: python bench/bench_token_elim.py [--quick].
"""
from __future__ import annotations

import argparse

import torch

from common import compare, op_rows, peak_memory, timing_malloc

from peftcore.ops import token_elim as te
import peftcore
from peftcore import TokenElimConfig
from peftcore.tuners.token_elim import decoder_layers
from test_token_elim import make_keep, ref_block_scores, ref_gather, ref_scatter_add

RATIOS = (0.25, 0.5, 0.75)
# The headline comparison (bench/run.py's summary): peftcore's method against its anchor (density = keep ratio).
HEADLINE = [dict(family="token_elim", op="token_elim_model", mode="train_step", density=0.5, method="token_elim_0.5",
                 anchor="dense", setting="{} of the tokens kept")]
OURS = {f"token_elim_{r}" for r in RATIOS}  # the rows' peftcore methods (the rest are references)
FLOOR = set()  # "dense" here is the whole model without token elimination, a reference rather than a floor
MODEL = dict(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=8192)


def sizes(device: str, quick: bool):
    """(B, L) of the model step."""
    if device == "cuda":
        return [(1, 8192)]
    return [(1, 1024)] if quick else [(1, 4096)]


def build_model(device):
    import peft
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**MODEL, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(cfg).to(device).train()
    return peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))


def saved_bytes(model, ids, layer_ids):
    """Bytes the given decoder layers save for backward in one forward (parameters excluded)."""
    params = {p.data_ptr() for p in model.parameters()}
    layers = decoder_layers(model)
    state, total = {"on": False}, [0]

    def pack(t):
        if state["on"] and t.data_ptr() not in params:
            total[0] += t.numel() * t.element_size()
        return t

    hooks = [layers[i].register_forward_pre_hook(lambda m, a: state.update(on=True)) for i in layer_ids]
    hooks += [layers[i].register_forward_hook(lambda m, a, o: state.update(on=False)) for i in layer_ids]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    for h in hooks:
        h.remove()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total[0]


def run(device: str = "cpu", quick: bool = False, rounds: int = 11, headline: bool = False) -> list:
    """Rows of every case; with headline=True only the headline's (keep 0.5 against dense, no ops)."""
    rows = []
    ratios = (HEADLINE[0]["density"],) if headline else RATIOS
    for B, L in sizes(device, quick):
        # ops alone, beside the tests' plain-torch references, at up to 2048 tokens (the dense reference of
        # token_block_scores builds the [L, L] map: at 4096 it alone took ~15 s of the family's budget)
        H, I = MODEL["hidden_size"], MODEL["intermediate_size"]
        L_model, L = L, min(L, 2048)
        x = torch.randn(B, L, H, device=device)
        keep = make_keep(B, L, L // 2, 0, device)
        src = torch.randn(B, L // 2, H, device=device)
        q = torch.randn(B, 4, L, 64, device=device)
        k = torch.randn(B, 2, L, 64, device=device)
        wg, wu, wd = (torch.randn(I, H, device=device) * H ** -0.5, torch.randn(I, H, device=device) * H ** -0.5,
                      torch.randn(H, I, device=device) * I ** -0.5)
        mlp = lambda: (torch.nn.functional.silu(x @ wg.t()) * (x @ wu.t())) @ wd.t()  # noqa: E731
        pairs = {
            "token_gather": (lambda: te.token_gather(x, keep), lambda: ref_gather(x, keep), "torch.gather"),
            "token_scatter_add": (lambda: te.token_scatter_add(x, src, keep), lambda: ref_scatter_add(x, src, keep),
                                  "torch.scatter_add"),
            "token_block_scores": (lambda: te.token_block_scores(q, k, 64, True),
                                   lambda: ref_block_scores(q, k, 64, True), "dense_softmax_maxpool_sum"),
            "token_mlp_partial_save": (lambda: te.token_mlp_partial_save(x, wg, wu, wd, I // 2), mlp,
                                       "plain_llama_mlp"),
        }
        # first, under the pinned malloc of bench/run.py (timing_malloc below leaves freed heap resident)
        if not headline:
            rows += op_rows("token_elim", f"B{B} L{L} H{H} I{I} K=L/2 fp32", pairs, device, rounds)
        L = L_model
        model = build_model(device)
        n = MODEL["num_hidden_layers"]
        elim_layers = list(range(1, n - 1))
        ids = torch.randint(0, MODEL["vocab_size"], (B, L), generator=torch.Generator().manual_seed(0)).to(device)
        case = (f"Llama h{MODEL['hidden_size']} i{MODEL['intermediate_size']} x{n} layers, H4/KV2, LoRA r8 q,v; "
                f"B{B} L{L} fp32")

        configs = {"dense": None, **{f"token_elim_{r}": TokenElimConfig(keep_ratio=r, block_size=64, dense_first=1,
                                                                         dense_last=1) for r in ratios}}

        def step_with(cfg, count_saved=None):
            def step():
                if peftcore.adapter_methods(model):
                    peftcore.unload_adapter(model)
                if cfg is not None:
                    peftcore.apply_adapter(model, cfg)
                if count_saved is not None:
                    count_saved[0] = saved_bytes(model, ids, elim_layers)
                else:
                    model(input_ids=ids, labels=ids).loss.backward()
                    model.zero_grad(set_to_none=True)
            return step

        peaks, saved = {}, {}
        for name, cfg in configs.items():  # one step each: peak memory, and the bytes saved (hooks hold nothing)
            box = [0]
            peaks[name] = peak_memory(step_with(cfg, box), device)
            saved[name] = box[0]
        # interleaved rounds (bench/common.compare): every config sees the same machine state
        with timing_malloc():
            times = compare({name: step_with(cfg) for name, cfg in configs.items()}, device,
                            rounds=max(3, rounds // 3), target=0.0)
        if peftcore.adapter_methods(model):
            peftcore.unload_adapter(model)
        for name in configs:
            rows.append(dict(family="token_elim", op="token_elim_model", case=case, method=name,
                             density=configs[name].keep_ratio if configs[name] else "", mode="train_step",
                             ms=times[name] * 1e3, ratio=times[name] / times["dense"], ratio_to="dense",
                             peak_mb=peaks[name] / 2 ** 20, saved_mb=saved[name] / 2 ** 20, device=device))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--headline", action="store_true", help="the headline comparison alone")
    args = ap.parse_args()
    for r in run(args.device, args.quick, args.rounds, headline=args.headline):
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})


if __name__ == "__main__":
    main()
