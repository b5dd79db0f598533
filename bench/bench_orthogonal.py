"""orthogonal bench: a BOFT / OFT / MiSS layer's training step (forward + backward into x and the adapter
parameters) and inference forward at d = 1024, 1024 tokens. Methods (the rows' names):
  (a) peftcore — peftcore's layer on its ops (BOFTLinear / OFTLinear / MissLinear from peftcore.tuners); BOFT:
      Cayley blocks + the butterfly chain on the activations, no d x d matrix;
  (b) peft     — HF PEFT's own layer of the same config; BOFT builds the d x d rotation (on a machine without its
      fbd_cuda extension the test's plain-torch stand-in keeps n_butterfly_factor > 1, as PEFT would on a GPU);
  (c) dense    — the frozen linear alone; every ratio in the rows is against it (speedup_vs_peft in the row too);
with peak memory per call. The interop layers and the fbd stand-in come from tests/test_orthogonal.py.
Headline (HEADLINE, bench/run.py's default): the training step of BOFT (family orthogonal) and of MiSS (family
miss), peftcore against peft (dense beside them); no OFT, no standalone ops.

Run through bench/run.py or alone: python bench/bench_orthogonal.py [--device cuda] [--quick].
"""
from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F

from common import compare, forward_only, op_rows, peak_memory, train_step

import peftcore  # noqa: F401
from peftcore.ops import orthogonal as orth
from test_orthogonal import _FakeFBD, _Tiny, ref_boft_apply, ref_cayley, ref_neumann


def sizes(device: str, quick: bool):
    """(d, tokens, dtype)."""
    if device == "cuda":
        return [(1024, 1024, torch.bfloat16)] if quick else [(1024, 1024, torch.bfloat16), (4096, 2048, torch.bfloat16)]
    return [(256, 256, torch.float32)] if quick else [(1024, 1024, torch.float32)]


CONFIGS = [  # (method, kwargs)
    ("boft", dict(boft_block_size=32, boft_n_butterfly_factor=2)),
    ("oft", dict(oft_block_size=32, r=0)),
    ("miss", dict(r=64)),  # MiSS (issue 4's fourth adapter; family "miss" in the rows)
]
# The headline comparisons (bench/run.py's summary): peftcore's layer against HF PEFT's, one per family.
HEADLINE = [dict(family="orthogonal", op="boft_layer", mode="train_step", density="", method="peftcore",
                 anchor="peft", setting=""),
            dict(family="miss", op="miss_layer", mode="train_step", density="", method="peftcore", anchor="peft",
                 setting="")]
OURS = {"peftcore"}  # the rows' peftcore methods (the rest are references)


def _peft_layer(kind, kw, d, device, dtype):
    import peft
    import peft.tuners.boft.layer as boft_layer

    from peftcore.tuners import BOFTLinear, MissLinear, OFTLinear

    if boft_layer._FBD_CUDA is None:
        boft_layer._FBD_CUDA = _FakeFBD()  # never compile the extension here; keep the butterfly factor
    cfg = {"boft": peft.BOFTConfig, "oft": peft.OFTConfig, "miss": peft.MissConfig}[kind](
        target_modules=["lin"], init_weights=False, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(_Tiny(d, d), cfg).to(device)
    model.base_model.model.lin.base_layer.to(dtype)
    layer = model.base_model.model.lin
    ours = {"boft": BOFTLinear, "oft": OFTLinear, "miss": MissLinear}[kind].from_peft(layer)
    params = {"boft": lambda: [layer.boft_R["default"], layer.boft_s["default"]],
              "oft": lambda: [layer.oft_R["default"].weight], "miss": lambda: [layer.miss_block["default"]]}[kind]()
    return layer, ours, params


def run(device: str = "cpu", quick: bool = False, rounds: int = 3, headline: bool = False) -> list:
    """Rows of every case; with headline=True only the headlines' (the first size, BOFT and MiSS training steps)."""
    rows = []
    configs = [(k, kw) for k, kw in CONFIGS if k in ("boft", "miss")] if headline else CONFIGS
    modes = ("train_step",) if headline else ("train_step", "forward")
    for d, tokens, dtype in sizes(device, quick)[:1] if headline else sizes(device, quick):
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, d, generator=gen).to(dtype).to(device).requires_grad_(True)
        g = torch.randn(tokens, d, generator=gen).to(dtype).to(device)
        case = f"d={d} T={tokens} {str(dtype).replace('torch.', '')}"
        fns, meta = {}, {}
        for kind, kw in configs:
            layer, ours, params = _peft_layer(kind, kw, d, device, dtype)
            w = layer.get_base_layer().weight
            dense = lambda w=w: F.linear(x, w)  # noqa: E731
            with torch.no_grad():
                torch.testing.assert_close(ours(x).float(), layer(x).float(), atol=1e-3, rtol=1e-3)
            for method, f, wrt in (("peftcore", lambda o=ours: o(x), [x, *params]),
                                   ("peft", lambda m=layer: m(x), [x, *params]), ("dense", dense, [x])):
                fns[(kind, method, "train_step")] = train_step(f, wrt, g)
                if "forward" in modes:
                    fns[(kind, method, "forward")] = forward_only(f)
            cfg = ",".join(f"{k}={v}" for k, v in kw.items())
            meta[kind] = cfg
        # PEFT's BOFT layer takes seconds a step on CPU: at most 3 interleaved rounds keep the family < 45 s.
        times = compare(fns, device, rounds=min(rounds, 3) if device == "cpu" else rounds)
        for (kind, method, mode), t in times.items():
            rows.append(dict(family="miss" if kind == "miss" else "orthogonal", op=f"{kind}_layer", case=f"{case} {meta[kind]}", method=method,
                             density="", mode=mode, ms=t * 1e3, ratio=t / times[(kind, "dense", mode)],
                             ratio_to="dense", speedup_vs_peft=times[(kind, "peft", mode)] / t,
                             peak_mb=peak_memory(fns[(kind, method, mode)], device) / 2 ** 20, saved_mb="",
                             device=device))
        if not headline:
            rows += _op_rows(device, case, x.detach(), rounds)
    return rows


def _op_rows(device, case, x, rounds):
    """The standalone ops (blocks of 32, two butterfly factors) beside plain torch: batched linalg.solve, the
    explicit series, and the dense d x d BOFT matrix (what PEFT builds)."""
    d, b = x.shape[-1], 32
    nb = d // b
    gen = torch.Generator().manual_seed(1)
    params = (torch.randn(nb, b, b, generator=gen) * 0.1).to(device)
    rot = orth.orthogonal_cayley(torch.randn(2 * nb, b, b, generator=gen).to(device) * 0.1).view(2, nb, b, b)
    rot = rot.to(x.dtype)
    perm = orth.boft_permutations(d, nb, b, 2).to(device)
    pairs = {
        "orthogonal_cayley": (lambda: orth.orthogonal_cayley(params), lambda: ref_cayley(params), "linalg_solve"),
        "orthogonal_cayley_neumann": (lambda: orth.orthogonal_cayley_neumann(params, 5),
                                      lambda: ref_neumann(params, 5), "torch_series"),
        "orthogonal_boft_apply": (lambda: orth.orthogonal_boft_apply(x, rot, perm),
                                  lambda: ref_boft_apply(x, rot, perm), "dense_dxd_matrix"),
    }
    return op_rows("orthogonal", case, pairs, device, rounds)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--headline", action="store_true", help="the headline comparisons alone")
    args = ap.parse_args()
    for r in run(args.device, args.quick, args.rounds, headline=args.headline):
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})
