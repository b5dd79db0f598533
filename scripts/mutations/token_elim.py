"""Deliberate bugs in the token_elim CPU kernels and the MLP code shared with CUDA (scripts/mutate.py)."""
_CPU = "csrc/token_elim/token_elim_cpu.cpp"
_TESTS = "tests/test_token_elim.py"

MUTATIONS = [
    # Thread split of the kept-row loops (only B * K * F > GRAIN_SIZE splits): a lost chunk offset.
    dict(name="gather_chunk_offset", file=_CPU, tests=_TESTS,
         find="std::memcpy(out + r * d.F, x + (b * d.L + keep[r]) * d.F, d.F * sizeof(scalar_t));",
         replace="std::memcpy(out + (r - rb) * d.F, x + (b * d.L + keep[r]) * d.F, d.F * sizeof(scalar_t));"),
    dict(name="scatter_chunk_offset", file=_CPU, tests=_TESTS,
         find="const scalar_t* __restrict__ s = src + r * d.F;",
         replace="const scalar_t* __restrict__ s = src + (r - rb) * d.F;"),
    # Gather: the batch of a kept row computed from L instead of K.
    dict(name="gather_batch", file=_CPU, tests=_TESTS,
         find="const int64_t b = r / d.K;\n      std::memcpy",
         replace="const int64_t b = r / d.L;\n      std::memcpy"),
    # Scatter-add overwrites the residual instead of adding to it.
    dict(name="scatter_overwrites", file=_CPU, tests=_TESTS,
         find="o[f] = static_cast<scalar_t>(static_cast<acc_t>(o[f]) + static_cast<acc_t>(s[f]));",
         replace="o[f] = s[f];"),
    # MLP: the kept channels' column gather with the wrong row stride (only C != I shows it).
    dict(name="gather_cols_stride", file=_CPU, tests=_TESTS,
         find="op[t * C + c] = src[t * I + ip[c]];",
         replace="op[t * C + c] = src[t * C + ip[c]];"),
    # MLP backward: silu'(z) wrong; grad_up_kept dropped; w_gate used for the up branch.
    dict(name="silu_derivative", file=_CPU, tests=_TESTS,
         find="(acc_t(1) + z * (acc_t(1) - s))",
         replace="(acc_t(1) + z * s)"),
    dict(name="grad_up_kept_dropped", file=_CPU, tests=_TESTS,
         find="if (gup) v += static_cast<acc_t>(gup[i]);",
         replace=";"),
    dict(name="up_branch_uses_w_gate", file=_CPU, tests=_TESTS,
         find="dx.addmm_(du, w_up.index_select(0, ci));",
         replace="dx.addmm_(du, w_gate.index_select(0, ci));"),
    # Channel selection picks the smallest.
    dict(name="select_smallest", file=_CPU, tests=_TESTS,
         find="/*largest=*/true", replace="/*largest=*/false"),
    # Validation: repeated kept rows accepted.
    dict(name="duplicates_accepted", file=_CPU, tests=_TESTS,
         find="TORCH_CHECK(j == 0 || r[j] > r[j - 1]",
         replace="TORCH_CHECK(j == 0 || r[j] >= r[j - 1]"),
    # Block scores: max instead of sum over heads and query blocks.
    dict(name="block_scores_max", file=_CPU, tests=_TESTS,
         find="return pooled.sum(at::IntArrayRef{1, 2});",
         replace="return pooled.amax(at::IntArrayRef{1, 2});"),
]
