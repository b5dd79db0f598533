"""Every CUDA op once (sparse_delta, miss, partial, blockdiag, orthogonal, sparse_attn, token_elim, lora), on small
shapes, for compute-sanitizer runs on a GPU machine (memcheck over everything; racecheck over the attention kernels:
PEFTCORE_SANITIZE_ONLY=sparse_attn; PEFTCORE_SANITIZE_ONLY=sparse_delta, =structured or =lora for the others alone).

Covers float32 / float16 / bfloat16 activations, int32 / int64 indices, float32 and activation-dtype values,
forward and backward ops, and shapes that reach each launch path: a few tokens (row/column chunk splits,
token-split atomics in the SDDMM), many tokens (full 16-token tiles), an `in` too wide for a shared-memory tile
(global-memory fallback), an empty delta and zero tokens. Each result is compared with a dense fp32 reference
(loose tolerances: the point here is memory safety, the tests own accuracy). Exit status 0 when all pass.
The miss ops (fold / unfold: both fold launch paths, ragged tails, no rows) run after them, then the partial,
blockdiag (Monarch incl. the saved-intermediate path) and orthogonal ops, each against its own CPU kernel. The
memory-bound families (miss, partial, token_elim) run each 16-byte vector kernel and, on the same shapes at a
1-element offset, its scalar path.

    python bench/sanitize_cases.py            # plain run
    compute-sanitizer --tool memcheck python bench/sanitize_cases.py
    PEFTCORE_SANITIZE_ONLY=sparse_attn compute-sanitizer --tool racecheck python bench/sanitize_cases.py
"""
import importlib
import os
import sys

import torch

try:
    import peftcore  # noqa: F401  (registers the ops once the package's __init__ loads _C)
except ImportError:
    pass
if not hasattr(torch.ops.peftcore, "sparse_delta_spmm"):
    importlib.import_module("peftcore._C")

ops = torch.ops.peftcore
dev = os.environ.get("PEFTCORE_SANITIZE_DEVICE", "cuda")  # "cpu" checks this script itself
TOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}
failures = []


def rand_delta(out, inf, nnz, idx_dtype, val_dtype, gen):
    nnz = min(nnz, out * inf)
    flat = torch.randperm(out * inf, generator=gen)[:nnz].sort().values
    vals = torch.randn(nnz, generator=gen)
    return flat.to(dev, idx_dtype), vals.to(dev, val_dtype)


def dense(idx, vals, out, inf):
    s = torch.zeros(out * inf, device=dev, dtype=torch.float32)
    s[idx.long()] = vals.float()
    return s.view(out, inf)


def close(name, got, ref, dtype):
    got = got.float()
    ref = ref.float()
    if got.shape != ref.shape:
        failures.append(f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}")
        return
    if got.numel() == 0:
        return
    err = (got - ref).norm() / ref.norm().clamp_min(1e-6)
    if not torch.isfinite(err) or err.item() > TOL[dtype]:
        failures.append(f"{name}: rel err {err.item():.3e} > {TOL[dtype]:.0e}")


def run_case(tokens, out, inf, nnz, dtype, idx_dtype, val_is_f32, scale=0.7, seed=0, with_csr=False):
    gen = torch.Generator().manual_seed(seed)
    tag = (f"T={tokens} out={out} in={inf} nnz={nnz} {str(dtype)[6:]} {str(idx_dtype)[6:]} "
           f"vals={'f32' if val_is_f32 else 'act'}{' csr' if with_csr else ''}")
    vdt = torch.float32 if val_is_f32 else dtype
    idx, vals = rand_delta(out, inf, nnz, idx_dtype, vdt, gen)
    S = dense(idx, vals, out, inf)
    shape = (2, tokens // 2, inf) if tokens and tokens % 2 == 0 else (tokens, inf)  # even counts go 3-D
    x = torch.randn(*shape, generator=gen).to(dev, dtype)
    W = (torch.randn(out, inf, generator=gen) / inf**0.5).to(dev, dtype)
    b = torch.randn(out, generator=gen).to(dev, dtype)
    g = torch.randn(*x.shape[:-1], out, generator=gen).to(dev, dtype)
    xf, gf, Wf = x.float().reshape(-1, inf), g.float().reshape(-1, out), W.float()
    # with_csr: the delta's CSR view passed to the ops (sparse_delta_csr), else built per call
    csr = list(ops.sparse_delta_csr(idx, out, inf)) if with_csr else [None] * 4

    y = ops.sparse_delta_linear(x, W, b, idx, vals, scale, *csr)
    close(f"linear {tag}", y.reshape(-1, out), xf @ (Wf + scale * S).t() + b.float(), dtype)
    y = ops.sparse_delta_linear(x, W, None, idx, vals, scale)
    close(f"linear(no bias) {tag}", y.reshape(-1, out), xf @ (Wf + scale * S).t(), dtype)

    gx, gv, gb = ops.sparse_delta_linear_backward(g, x, W, idx, vals, scale, [True, True, True], *csr)
    close(f"linear_backward.gx {tag}", gx.reshape(-1, inf), gf @ (Wf + scale * S), dtype)
    ref_gv = scale * (gf.t() @ xf).reshape(-1)[idx.long()]
    close(f"linear_backward.gv {tag}", gv, ref_gv, dtype)
    if gv.dtype != vals.dtype:
        failures.append(f"linear_backward.gv dtype {gv.dtype} != {vals.dtype} ({tag})")
    close(f"linear_backward.gb {tag}", gb, gf.sum(0), dtype)
    e = ops.sparse_delta_linear_backward(g, x, W, idx, vals, scale, [False, True, False])
    if e[0].numel() != 0 or e[2].numel() != 0:
        failures.append(f"linear_backward: unrequested outputs not empty ({tag})")

    close(f"spmm {tag}", ops.sparse_delta_spmm(x, idx, vals, out, scale, csr[0]).reshape(-1, out), scale * xf @ S.t(),
          dtype)
    close(f"spmm_t {tag}", ops.sparse_delta_spmm_t(g, idx, vals, inf, scale, *csr[1:]).reshape(-1, inf), scale * gf @ S,
          dtype)
    sd = ops.sparse_delta_sddmm(g, x, idx, scale, None, csr[0])
    if sd.dtype != torch.float32:
        failures.append(f"sddmm default dtype {sd.dtype} ({tag})")
    close(f"sddmm {tag}", sd, ref_gv, dtype)
    close(f"sddmm(out_dtype) {tag}", ops.sparse_delta_sddmm(g, x, idx, scale, dtype), ref_gv, dtype)

    close(f"merge {tag}", ops.sparse_delta_merge(W, idx, vals, scale), Wf + scale * S, dtype)
    w2 = W.clone()
    ops.sparse_delta_merge_(w2, idx, vals, scale)
    close(f"merge_ {tag}", w2, Wf + scale * S, dtype)

    k = min(7, out * inf - idx.numel())
    G = (gf.t() @ xf).abs().reshape(-1)
    for excl in (None, idx):
        ti, ts = ops.sparse_delta_topk_grad(g, x, k, excl)
        if ti.numel() != k or (k > 1 and not bool((ti[1:] > ti[:-1]).all())):
            failures.append(f"topk_grad: {ti.numel()} indices (want {k}), ascending required ({tag})")
            continue
        if excl is not None and bool(torch.isin(ti, idx.long()).any()):
            failures.append(f"topk_grad: returned an excluded index ({tag})")
        close(f"topk_grad.scores {tag}", ts, G[ti], dtype)
        Gm = G.clone()
        if excl is not None:
            Gm[idx.long()] = -1
        if k and tokens:  # the k-th largest score must match (indices may differ on ties)
            close(f"topk_grad.kth {tag}", ts.min().reshape(1), Gm.topk(k).values.min().reshape(1), dtype)


def ref_attn32(q, k, v, tok_mask, scale):
    """fp32 dense attention with an explicit token mask; rows without keys give 0 / -inf."""
    g = q.shape[1] // k.shape[1]
    qf, kf, vf = q.float(), k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    s = (qf @ kf.transpose(-1, -2) * scale).masked_fill(~tok_mask, float("-inf"))
    empty = ~tok_mask.any(-1, keepdim=True)
    s = s.masked_fill(empty, 0.0)
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - lse).masked_fill(~tok_mask, 0.0)
    return p @ vf, lse.masked_fill(empty, float("-inf")).squeeze(-1), p


def run_attn_case(B, Hq, Hkv, Lq, Lk, D, bs, causal, dtype, mask_shape, seed=0, align="top_left", smem=None,
                  kernel="auto"):
    """block_sparse_attn (+ backward) and attn_block_pool once, against an fp32 dense reference; `smem` forces the
    tile plan of a device with that much opt-in shared memory (PEFTCORE_SPARSE_ATTN_SMEM_LIMIT); `kernel` the
    forward kernel (PEFTCORE_SPARSE_ATTN_KERNEL: auto, tc = tensor cores, simt = CUDA cores)."""
    if smem:
        os.environ["PEFTCORE_SPARSE_ATTN_SMEM_LIMIT"] = str(smem)
    else:
        os.environ.pop("PEFTCORE_SPARSE_ATTN_SMEM_LIMIT", None)
    os.environ["PEFTCORE_SPARSE_ATTN_KERNEL"] = kernel
    gen = torch.Generator().manual_seed(seed)
    tag = (f"attn B{B} H{Hq}/{Hkv} L{Lq}x{Lk} D{D} bs{bs} causal={causal} {align} {str(dtype)[6:]} mask{mask_shape}"
           f" smem={smem or 'device'} kernel={kernel}")
    off = Lk - Lq if align == "bottom_right" else 0
    q = torch.randn(B, Hq, Lq, D, generator=gen).to(dev, dtype)
    k = torch.randn(B, Hkv, Lk, D, generator=gen).to(dev, dtype)
    v = torch.randn(B, Hkv, Lk, D, generator=gen).to(dev, dtype)
    go = torch.randn(B, Hq, Lq, D, generator=gen).to(dev, dtype)
    qb, kb = -(-Lq // bs), -(-Lk // bs)
    m = torch.rand(*mask_shape, qb, kb, generator=gen) < 0.6
    m[..., 0, :] = False  # a query block that sees nothing
    m = m.to(dev)
    tok = m.expand(B, Hq, -1, -1).repeat_interleave(bs, 2)[:, :, :Lq].repeat_interleave(bs, 3)[..., :Lk]
    if causal:
        tok = tok & torch.ones(Lq, Lk, dtype=torch.bool, device=dev).tril(off)
    scale = D ** -0.5
    out, lse = ops.block_sparse_attn(q, k, v, m, bs, causal, None, align)
    ro, rl, _ = ref_attn32(q, k, v, tok, scale)
    close(f"{tag} out", out, ro, dtype)
    fin = torch.isfinite(rl)
    if not torch.equal(torch.isfinite(lse), fin):
        failures.append(f"{tag}: lse -inf pattern differs")
    else:
        close(f"{tag} lse", lse[fin], rl[fin], dtype)
    glse = torch.randn(lse.shape, generator=gen).to(dev)
    dq, dk, dv = ops.block_sparse_attn_backward(go, glse, q, k, v, out, lse, m, bs, causal, None, [True, True, True],
                                                align)
    qr, kr, vr = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    o2, l2, _ = ref_attn32(qr, kr, vr, tok, scale)
    rq, rk, rv = torch.autograd.grad([o2, l2.masked_fill(~fin, 0.0)], [qr, kr, vr], [go.float(), glse])
    for name, a, r in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        close(f"{tag} {name}", a, r, dtype)
    full = torch.ones(Lq, Lk, dtype=torch.bool, device=dev)
    if causal:
        full = full.tril(off)
    _, _, p = ref_attn32(q, k, v, full.expand(B, Hq, -1, -1), scale)
    p = torch.nn.functional.pad(p, (0, kb * bs - Lk, 0, qb * bs - Lq))
    rp = p.view(B, Hq, qb, bs, kb, bs).amax(dim=(3, 5))
    close(f"{tag} pool", ops.attn_block_pool(q, k, bs, causal, None, align), rp, dtype)


attn_cases = [
    # B, Hq, Hkv, Lq, Lk, D, bs, causal, mask shape, causal alignment
    (1, 4, 2, 100, 100, 64, 32, True, (1, 4), "top_left"),       # GQA, bs < tile, partial last block
    (2, 2, 1, 70, 150, 128, 64, False, (2, 1), "top_left"),      # MQA, Lq != Lk
    (1, 2, 2, 130, 45, 64, 80, True, (1, 1), "top_left"),        # bs > tile: several tiles per block, Lq > Lk
    (1, 2, 1, 65, 65, 256, 16, True, (1, 2), "top_left"),        # D = 256 (32-row tiles)
    (1, 4, 2, 37, 150, 128, 24, True, (1, 1), "bottom_right"),   # decode-like chunk, offset 113
    (1, 2, 2, 130, 45, 64, 40, True, (1, 2), "bottom_right"),    # Lq > Lk: the first 85 queries see nothing
]
if os.environ.get("PEFTCORE_SANITIZE_ONLY", "") in ("", "sparse_attn"):
    for B, Hq, Hkv, Lq, Lk, D, bs, causal, ms, align in attn_cases:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            run_attn_case(B, Hq, Hkv, Lq, Lk, D, bs, causal, dtype, ms, align=align)
        # the smaller tiles planned for 99 KB (sm_86 / sm_89) and 48 KB of opt-in shared memory
        for smem in (101376, 49152):
            if not (D == 256 and smem == 49152):
                run_attn_case(B, Hq, Hkv, Lq, Lk, D, bs, causal, torch.bfloat16, ms, align=align, smem=smem)
        if D in (64, 128):  # half types take the tensor-core forward by default: the CUDA-core one too
            run_attn_case(B, Hq, Hkv, Lq, Lk, D, bs, causal, torch.float16, ms, align=align, kernel="simt")
    # The tensor-core forward and backward, forced (an error if they cannot run): 64 x 64 tiles against blocks of
    # 16 / 128 / odd sizes, lengths off the tile grid, GQA, both alignments, a 99 KB plan, an MQA call at batch 1
    # whose dk / dv grid splits the group's query heads (fp32 partials and their reduction); then the device tile
    # lists (the forward's and the backward's transposed ones) against the CPU ones.
    tc_cases = [
        (1, 4, 2, 150, 130, 64, 16, True, (1, 4), "top_left"),
        (1, 2, 1, 70, 200, 128, 128, True, (1, 1), "bottom_right"),
        (2, 2, 2, 129, 65, 128, 24, False, (2, 2), "top_left"),
        (1, 8, 1, 90, 200, 64, 32, True, (1, 8), "bottom_right"),
    ]
    for B, Hq, Hkv, Lq, Lk, D, bs, causal, ms, align in tc_cases:
        for dtype in (torch.float16, torch.bfloat16):
            run_attn_case(B, Hq, Hkv, Lq, Lk, D, bs, causal, dtype, ms, align=align, kernel="tc")
        run_attn_case(B, Hq, Hkv, Lq, Lk, D, bs, causal, torch.bfloat16, ms, align=align, smem=101376, kernel="tc")
        gen = torch.Generator().manual_seed(1)
        tm = torch.rand(*ms, -(-Lq // bs), -(-Lk // bs), generator=gen) < 0.5
        for tiles in ((64, 64), (128, 32)):
            for lists in (ops.sparse_attn_tc_tiles, ops.sparse_attn_tc_tiles_t):
                want = lists(tm, Lq, Lk, bs, causal, align, *tiles)
                got = lists(tm.to(dev), Lq, Lk, bs, causal, align, *tiles)
                if not all(torch.equal(g.cpu(), w) for g, w in zip(got, want)):
                    failures.append(f"{lists.__name__} L{Lq}x{Lk} bs{bs} causal={causal} {align} tiles {tiles}: "
                                    "device lists differ")
    os.environ.pop("PEFTCORE_SPARSE_ATTN_SMEM_LIMIT", None)
    os.environ.pop("PEFTCORE_SPARSE_ATTN_KERNEL", None)

cases = [
    # tokens, out, in, nnz
    (1, 48, 80, 400),      # decode-like: TT=1 tiles, 32-row blocks
    (5, 40, 600, 2000),    # few tokens: small tiles, SDDMM token splits
    (38, 48, 80, 700),     # 3-D x [2, 19, in]: full tiles + ragged tail
    (70, 40, 1100, 900),   # 32-token tiles with a ragged tail, several column chunks (fp32: CW < 1100)
    (3, 16, 24, 0),        # empty delta
    (0, 16, 24, 30),       # zero tokens
]
if os.environ.get("PEFTCORE_SANITIZE_ONLY", "") in ("", "sparse_delta"):
    for tokens, out, inf, nnz in cases:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for idx_dtype in (torch.int32, torch.int64):
                run_case(tokens, out, inf, nnz, dtype, idx_dtype, val_is_f32=(idx_dtype == torch.int64),
                         with_csr=(dtype == torch.bfloat16))
    # `in` much wider than a column chunk: many chunks, the per-row cursors carried across them (S and Sᵀ walks).
    run_case(33, 4, 60000, 300, torch.float32, torch.int64, True)
    run_case(9, 24, 11008, 2600, torch.bfloat16, torch.int32, False, with_csr=True)

_STRUCTURED = os.environ.get("PEFTCORE_SANITIZE_ONLY", "") in ("", "structured")


# miss: fold / unfold; narrow fold path (r <= 256, group widths 32..256), wide path (r > 256), ragged tails
# (n % r != 0), r == n, no leading dims, no rows, a non-contiguous x.
def at_offset(t, offset):
    """t's values in a buffer starting `offset` elements in (offset 1: misaligned, the scalar CUDA paths)."""
    if not offset:
        return t
    return torch.cat([t.new_zeros(offset), t.reshape(-1)])[offset:].view(t.shape)


def run_miss_case(lead, n, r, dtype, transposed=False, seed=0, offset=0):
    gen = torch.Generator().manual_seed(seed)
    tag = f"lead={lead} n={n} r={r} {str(dtype)[6:]}{' strided' if transposed else ''}{' offset' if offset else ''}"
    x = at_offset(torch.randn(*lead, n, generator=gen).to(dev, dtype), offset)
    if transposed:
        x = x.reshape(-1, n).t().contiguous().t().reshape(*lead, n)
    g = at_offset(torch.randn(*lead, r, generator=gen).to(dev, dtype), offset)
    cls = torch.arange(n, device=dev) % r
    xf = x.float().reshape(-1, n)
    ref = torch.zeros(xf.shape[0], r, device=dev).index_add_(1, cls, xf)
    close(f"miss_fold {tag}", ops.miss_fold(x, r).reshape(-1, r), ref, dtype)
    close(f"miss_unfold {tag}", ops.miss_unfold(g, n).reshape(-1, n), g.float().reshape(-1, r)[:, cls], dtype)


for lead, n, r in [] if not _STRUCTURED else [((3,), 10, 3), ((), 1, 1), ((2, 5), 100, 64), ((1,), 4096, 64), ((9,), 40, 33), ((7,), 600, 260),
                   ((2,), 300, 300), ((0,), 8, 2)]:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        run_miss_case(lead, n, r, dtype)
if _STRUCTURED:
    run_miss_case((5,), 77, 6, torch.float32, transposed=True)
    # 16-byte vector kernels (miss_vec_plan): group fold (r / V <= 32, incl. one vector per row), column fold
    # (r / V > 32), vector unfold; the same shapes at a 1-element offset take the scalar kernels
    for lead, n, r in [((3,), 64, 8), ((70,), 16, 8), ((2,), 1024, 64), ((2,), 2048, 512), ((4,), 24, 24)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for offset in (0, 1):
                run_miss_case(lead, n, r, dtype, offset=offset)



# partial / blockdiag / orthogonal: each CUDA op against the same op's CPU kernel (verified by the tests) on small
# shapes: token tails, Monarch shapes that do and do not fit the fused kernel's shared memory, masks, saved h.
def vs_cpu(name, fn, args, dtype):
    got = fn(*[a.to(dev) if isinstance(a, torch.Tensor) else a for a in args])
    ref = fn(*[a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
    got = got if isinstance(got, (tuple, list)) else (got,)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    for i, (a, b) in enumerate(zip(got, ref)):
        close(f"{name}[{i}] {str(dtype)[6:]}", a.cpu(), b, dtype)


def rnd(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


for dtype in (torch.float32, torch.float16, torch.bfloat16) if _STRUCTURED else ():
    for T, out, inf, k, dim in [(5, 24, 40, 7, 1), (33, 64, 48, 16, 0), (0, 8, 8, 2, 1)]:
        x, w = rnd(T, inf, dtype=dtype, seed=1), rnd(out, inf, dtype=dtype, seed=2, scale=0.2)
        idx = torch.arange(3, 3 + k)
        delta = rnd(*((k, inf) if dim == 0 else (out, k)), dtype=dtype, seed=3, scale=0.1)
        g = rnd(T, out, dtype=dtype, seed=4)
        saved = x if dim == 0 else x[:, idx].contiguous()
        vs_cpu(f"partial_linear T={T} dim={dim}", ops.partial_linear, (x, w, None, delta, idx, dim, 3), dtype)
        vs_cpu(f"partial_linear_backward T={T} dim={dim}", ops.partial_linear_backward,
               (g, saved, w, delta, idx, dim, [True, True, False], 3), dtype)
        vs_cpu(f"partial_gather T={T}", ops.partial_gather, (x, idx), dtype)
        vs_cpu(f"partial_scatter_add T={T}", ops.partial_scatter_add, (saved if dim == 1 else x[:, :k].contiguous(),
                                                                        idx, inf), dtype)
    # general path (a scattered index: the gather / scatter-add kernels), k > 256 (two blocks of columns), both dims
    for T, out, inf, k, dim in [(9, 40, 320, 300, 1), (6, 300, 24, 270, 0)]:
        x, w = rnd(T, inf, dtype=dtype, seed=1), rnd(out, inf, dtype=dtype, seed=2, scale=0.2)
        idx = torch.randperm((out, inf)[dim], generator=torch.Generator().manual_seed(5))[:k].sort().values
        delta = rnd(*((k, inf) if dim == 0 else (out, k)), dtype=dtype, seed=3, scale=0.1)
        saved = x if dim == 0 else x[:, idx].contiguous()
        vs_cpu(f"partial_linear(general) T={T} k={k} dim={dim}", ops.partial_linear, (x, w, None, delta, idx, dim), dtype)
        vs_cpu(f"partial_linear_backward(general) T={T} k={k} dim={dim}", ops.partial_linear_backward,
               (rnd(T, out, dtype=dtype, seed=4), saved, w, delta, idx, dim, [True, True, True]), dtype)
    # malformed indices (the CUDA ops do not check values): entries out of range must be skipped, never touched
    if dev == "cuda":
        x = rnd(5, 40, dtype=dtype, seed=1).to(dev)
        bad = torch.tensor([-7, 3, 40, 10**12], device=dev)
        g = ops.partial_gather(x, bad)
        ops.partial_scatter_add(g, bad, 40)
        w, d1, d0 = rnd(24, 40, dtype=dtype).to(dev), rnd(24, 4, dtype=dtype).to(dev), rnd(4, 40, dtype=dtype).to(dev)
        ops.partial_linear(x, w, None, d1, bad, 1)
        ops.partial_linear_backward(rnd(5, 24, dtype=dtype).to(dev), g, w, d1, bad, 1, [True, True, True])
        ops.partial_linear_backward(rnd(5, 24, dtype=dtype).to(dev), x, w, d0, bad, 0, [True, True, True])
        torch.cuda.synchronize()
        if g[:, [0, 2, 3]].abs().sum().item() != 0:
            failures.append(f"partial_gather {str(dtype)[6:]}: out-of-range index entries must read 0")
    # gather / scatter-add on both sides of the 16-byte switch (partial_vec_plan): k a multiple of the vector
    # width (aligned src: vector; src at a 1-element offset: scalar), k = 1 with many tokens, k not a multiple
    for T, inf, k in [(9, 40, 16), (300, 12, 1), (6, 40, 13), (3, 2100, 2048)]:
        idx = torch.randperm(inf, generator=torch.Generator().manual_seed(6))[:k].sort().values
        x = rnd(T, inf, dtype=dtype, seed=1)
        vs_cpu(f"partial_gather(vec) T={T} k={k}", ops.partial_gather, (x, idx), dtype)
        for offset in (0, 1):
            src = at_offset(rnd(T, k, dtype=dtype, seed=2).to(dev), offset)
            close(f"partial_scatter_add(vec) T={T} k={k} offset={offset} {str(dtype)[6:]}",
                  ops.partial_scatter_add(src, idx.to(dev), inf).cpu(),
                  ops.partial_scatter_add(src.cpu().float(), idx, inf), dtype)
    for T, (k, q, p), (l, s, r) in [(7, (4, 6, 5), (3, 7, 8)), (130, (8, 16, 16), (8, 16, 16)),
                                    (3, (2, 160, 128), (4, 150, 80)), (0, (2, 4, 4), (2, 4, 4)),
                                    (65, (4, 256, 256), (4, 256, 256))]:
        x = rnd(T, k * p, dtype=dtype, seed=5)
        w1, w2 = rnd(k, q, p, dtype=dtype, seed=6, scale=p ** -0.5), rnd(l, s, r, dtype=dtype, seed=7, scale=r ** -0.5)
        g = rnd(T, l * s, dtype=dtype, seed=8)
        tag = f"T={T} w1={k}x{q}x{p} w2={l}x{s}x{r}"
        for mode in ("fused", "bmm"):  # both CUDA forward forms (blockdiag_plan.h picks one)
            os.environ["PEFTCORE_MONARCH_KERNEL"] = mode
            vs_cpu(f"monarch_matmul[{mode}] {tag}", ops.monarch_matmul, (x, w1, w2), dtype)
        del os.environ["PEFTCORE_MONARCH_KERNEL"]
        vs_cpu(f"monarch_matmul_with_h {tag}", ops.monarch_matmul_with_h, (x, w1, w2), dtype)
        h = ops.monarch_matmul_with_h(x.float(), w1.float(), w2.float())[1].to(dtype)
        vs_cpu(f"monarch_matmul_backward {tag}", ops.monarch_matmul_backward, (g, x, w1, w2, [True] * 3), dtype)
        vs_cpu(f"monarch_matmul_backward(h) {tag}", ops.monarch_matmul_backward, (g, x, w1, w2, [True] * 3, h), dtype)
        vs_cpu(f"blockdiag_matmul {tag}", ops.blockdiag_matmul, (x, w1), dtype)
        vs_cpu(f"blockdiag_matmul_backward {tag}", ops.blockdiag_matmul_backward,
               (rnd(T, k * q, dtype=dtype, seed=9), x, w1, [True, True]), dtype)
    for nb, b, m, T in [(4, 4, 2, 9), (16, 8, 3, 40), (2, 32, 1, 0)]:
        from peftcore.ops.orthogonal import boft_permutations

        d = nb * b
        params = rnd(nb * m, b, b, seed=10, scale=0.3)
        vs_cpu(f"orthogonal_cayley nb={nb * m} b={b}", ops.orthogonal_cayley, (params,), torch.float32)
        vs_cpu(f"orthogonal_cayley_neumann nb={nb * m} b={b}", ops.orthogonal_cayley_neumann, (params, 5), torch.float32)
        R = ops.orthogonal_cayley(params)
        vs_cpu(f"orthogonal_cayley_backward b={b}", ops.orthogonal_cayley_backward, (rnd(*R.shape, seed=11), R),
               torch.float32)
        vs_cpu(f"orthogonal_cayley_neumann_backward b={b}", ops.orthogonal_cayley_neumann_backward,
               (rnd(*R.shape, seed=11), params, 5), torch.float32)
        rot = R.view(m, nb, b, b)
        perm = boft_permutations(d, nb, b, m)
        x = rnd(T, d, dtype=dtype, seed=12)
        vs_cpu(f"orthogonal_boft_apply T={T} d={d} m={m}", ops.orthogonal_boft_apply, (x, rot, perm), dtype)
        vs_cpu(f"orthogonal_boft_apply_backward T={T} d={d} m={m}", ops.orthogonal_boft_apply_backward,
               (rnd(T, d, dtype=dtype, seed=13), x, rot, perm, [True, True]), dtype)

# token_elim: kept-token gather / scatter-add (token tails, 4-D rows, K = 0), the partial-save MLP with a given
# channel set (forward, backward with and without the kept pre-activations' own grads), the block scores.
for dtype in (torch.float32, torch.float16, torch.bfloat16) if _STRUCTURED else ():
    for B, L, F, K in [(2, 37, 24, 11), (1, 300, 260, 128), (2, 8, 5, 0), (2, 40000, 1, 33000)]:
        x = rnd(B, L, F, dtype=dtype, seed=20)
        keep = torch.stack([torch.randperm(L, generator=torch.Generator().manual_seed(b))[:K].sort().values
                            for b in range(B)])
        vs_cpu(f"token_gather B={B} L={L} K={K}", ops.token_gather, (x, keep), dtype)
        vs_cpu(f"token_scatter_add B={B} L={L} K={K}", ops.token_scatter_add,
               (x, rnd(B, K, F, dtype=dtype, seed=21), keep), dtype)
    # 16-byte row accesses (token_elim_vec_plan): F a multiple of the vector width, aligned and at a 1-element
    # offset (scalar), and F = 8 with many rows
    for B, L, F, K in [(2, 37, 16, 11), (1, 3000, 8, 2900), (2, 9, 4096, 3)]:
        keep = torch.stack([torch.randperm(L, generator=torch.Generator().manual_seed(b))[:K].sort().values
                            for b in range(B)])
        for offset in (0, 1):
            x = at_offset(rnd(B, L, F, dtype=dtype, seed=20).to(dev), offset)
            src = at_offset(rnd(B, K, F, dtype=dtype, seed=21).to(dev), offset)
            tag = f"B={B} L={L} F={F} K={K} offset={offset} {str(dtype)[6:]}"
            close(f"token_gather(vec) {tag}", ops.token_gather(x, keep.to(dev)).cpu(),
                  ops.token_gather(x.cpu().float(), keep), dtype)
            close(f"token_scatter_add(vec) {tag}", ops.token_scatter_add(x, src, keep.to(dev)).cpu(),
                  ops.token_scatter_add(x.cpu().float(), src.cpu().float(), keep), dtype)
    for T, H, I, C in [(19, 24, 40, 13), (130, 64, 300, 150), (0, 8, 16, 4), (24, 16, 64, 32)]:
        x = rnd(T, H, dtype=dtype, seed=22)
        wg, wu = rnd(I, H, dtype=dtype, seed=23, scale=H ** -0.5), rnd(I, H, dtype=dtype, seed=24, scale=H ** -0.5)
        wd = rnd(H, I, dtype=dtype, seed=25, scale=I ** -0.5)
        ci = torch.randperm(I, generator=torch.Generator().manual_seed(26))[:C].sort().values
        vs_cpu(f"token_mlp_partial_save T={T} I={I} C={C}", lambda *a: ops.token_mlp_partial_save(*a)[:3],
               (x, wg, wu, wd, C, ci), dtype)
        gk, uk = (rnd(T, C, dtype=dtype, seed=27), rnd(T, C, dtype=dtype, seed=28))
        gy = rnd(T, H, dtype=dtype, seed=29)
        vs_cpu(f"token_mlp_partial_save_backward T={T} C={C}", ops.token_mlp_partial_save_backward,
               (gy, gk, uk, ci, wg, wu, wd), dtype)
        vs_cpu(f"token_mlp_partial_save_backward(+grads) T={T} C={C}", ops.token_mlp_partial_save_backward,
               (gy, gk, uk, ci, wg, wu, wd, rnd(T, C, dtype=dtype, seed=30), rnd(T, C, dtype=dtype, seed=31)), dtype)
    # malformed keep_index / channel_index (not checked on CUDA): skipped or clamped, never outside a buffer
    if dev == "cuda":
        x = rnd(2, 8, 4, dtype=dtype).to(dev)
        bad_keep = torch.tensor([[-1, 3], [8, 10**12]], device=dev)
        ops.token_scatter_add(x, ops.token_gather(x, bad_keep), bad_keep)
        wg, wu, wd = rnd(6, 4, dtype=dtype).to(dev), rnd(6, 4, dtype=dtype).to(dev), rnd(4, 6, dtype=dtype).to(dev)
        bad_ci = torch.tensor([-5, 2, 6], device=dev)
        _, gk, uk, _ = ops.token_mlp_partial_save(x, wg, wu, wd, 3, bad_ci)
        ops.token_mlp_partial_save_backward(x, gk, uk, bad_ci, wg, wu, wd, gk, uk)
        torch.cuda.synchronize()
    q, k = rnd(2, 4, 200, 64, dtype=dtype, seed=32), rnd(2, 2, 200, 64, dtype=dtype, seed=33)
    vs_cpu("token_block_scores", ops.token_block_scores, (q, k, 64, True, None), dtype)

# lora: every op on both CUDA paths (gathered; grouped tensor-core tiles for fp16 / bf16), tiles of 64 pairs with a
# partial last one, rank 70 (two rank passes), in / out / R off the vector widths, k = 2, and malformed ids and
# offsets (not checked on CUDA: skipped, never outside a buffer).
_LORA = os.environ.get("PEFTCORE_SANITIZE_ONLY", "") in ("", "lora")
for dtype in (torch.float32, torch.float16, torch.bfloat16) if _LORA else ():
    for path in ("gathered", "grouped") if dtype != torch.float32 else ("gathered",):
        os.environ["PEFTCORE_LORA_CUDA_PATH"] = path
        for T, k, inf, out, ranks in [(70, 0, 40, 24, (3, 70, 5)), (9, 2, 64, 72, (8, 16)), (0, 0, 8, 8, (2,))]:
            x, w = rnd(T, inf, dtype=dtype, seed=40), rnd(out, inf, dtype=dtype, seed=41, scale=0.2)
            a = rnd(sum(ranks), inf, dtype=dtype, seed=42, scale=0.2)
            b = rnd(out, sum(ranks), dtype=dtype, seed=43, scale=0.2)
            off = torch.tensor([0, *ranks]).cumsum(0)
            sc = torch.linspace(0.5, 1.5, len(ranks))
            gen = torch.Generator().manual_seed(44)
            ta = (torch.arange(T) * len(ranks) // max(T, 1)) if k == 0 else torch.randint(-1, len(ranks), (T, k),
                                                                                             generator=gen)
            tw = None if k == 0 else rnd(T, k, dtype=dtype, seed=45)
            g = rnd(T, out, dtype=dtype, seed=46)
            h = ops.lora_shrink(x.float(), a.float(), off, ta).to(dtype)
            gh = rnd(*h.shape, dtype=dtype, seed=47)
            name = f"lora[{path}] T={T} k={k}"
            vs_cpu(f"lora_multi_linear {name}", ops.lora_multi_linear, (x, w, None, a, b, off, sc, ta, tw), dtype)
            vs_cpu(f"lora_multi_linear_backward {name}", ops.lora_multi_linear_backward,
                   (g, x, w, a, b, off, sc, ta, tw, [True, True, True, tw is not None]), dtype)
            vs_cpu(f"lora_shrink {name}", ops.lora_shrink, (x, a, off, ta), dtype)
            vs_cpu(f"lora_shrink_backward {name}", ops.lora_shrink_backward, (gh, x, a, off, ta, [True, True]), dtype)
            vs_cpu(f"lora_expand {name}", ops.lora_expand, (h, b, off, sc, ta, tw, out), dtype)
            vs_cpu(f"lora_expand_backward {name}", ops.lora_expand_backward,
                   (g, h, b, off, sc, ta, tw, [True, True, tw is not None]), dtype)
        if dev == "cuda":
            x, w = rnd(80, 16, dtype=dtype).to(dev), rnd(8, 16, dtype=dtype).to(dev)
            a, b = rnd(6, 16, dtype=dtype).to(dev), rnd(8, 6, dtype=dtype).to(dev)
            bad_ta = torch.tensor([5, -3, 0, 1, 10**12] * 16, device=dev)
            bad_off = torch.tensor([0, 2, 600], device=dev)
            sc = torch.ones(2, device=dev)
            ops.lora_multi_linear(x, w, None, a, b, bad_off, sc, bad_ta)
            ops.lora_multi_linear_backward(x[:, :8].contiguous(), x, w, a, b, bad_off, sc, bad_ta, None,
                                           [True, True, True, False])
            torch.cuda.synchronize()
    os.environ.pop("PEFTCORE_LORA_CUDA_PATH", None)
    for T, inf, out, r in [(7, 24, 20, 4), (0, 8, 8, 2)]:
        x, w = rnd(T, inf, dtype=dtype, seed=50), rnd(out, inf, dtype=dtype, seed=51, scale=0.2)
        A, B = rnd(r, inf, dtype=dtype, seed=52), rnd(out, r, dtype=dtype, seed=53)
        seed = torch.tensor([99])
        vs_cpu(f"lora_linear_dropout T={T}", ops.lora_linear_dropout, (x, w, None, A, B, 1.5, 0.3, seed), dtype)
        vs_cpu(f"lora_linear_dropout_backward T={T}", ops.lora_linear_dropout_backward,
               (rnd(T, out, dtype=dtype, seed=54), x, w, A, B, 1.5, 0.3, seed, [True, True, True]), dtype)

if dev == "cuda":
    torch.cuda.synchronize()

if failures:
    print(f"sanitize_cases: {len(failures)} FAILED")
    for f in failures:
        print("  " + f)
    sys.exit(1)
print("sanitize_cases: all ok")
