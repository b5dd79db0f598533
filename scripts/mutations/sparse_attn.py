"""Deliberate bugs in the sparse_attn CPU kernels (python scripts/mutate.py sparse_attn), each on a path only
some shapes reach: AVX2 row tails and the vector exp, NaN handling on the vector and scalar paths, the zigzag task
order with an odd block count, causal tile / block bounds with both alignments, the dK / dV query-block range,
the online-softmax rescale and the pool's per-row skip."""

_F = "csrc/sparse_attn/sparse_attn_cpu.cpp"
_T = "tests/test_sparse_attn.py"

MUTATIONS = [
    dict(name="avx2_tail_sum_drops_last", file=_F,
         find="  float sum = hsum8(acc);\n  for (; j < n; ++j) {\n    s[j] = exp_softmax(s[j] - c);\n    sum += s[j];",
         replace="  float sum = hsum8(acc);\n  for (; j < n; ++j) {\n    s[j] = exp_softmax(s[j] - c);\n"
                 "    sum += j + 1 < n ? s[j] : 0.f;",
         tests=_T),
    dict(name="avx2_exp_coefficient", file=_F,
         find="p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));",
         replace="p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.66e-1f));", tests=_T),
    dict(name="avx2_exp_drops_nan", file=_F,
         find="return _mm256_blendv_ps(r8, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));",
         replace="return r8;", tests=_T),
    dict(name="scalar_exp_drops_nan", file=_F,
         find="return x < -87.f ? 0.f : (x == x ? p * two_n : x);",
         replace="return x < -87.f ? 0.f : p * two_n;", tests=_T),
    dict(name="zigzag_odd_count_repeats_a_block", file=_F,
         find="return (t & 1) ? n - 1 - t / 2 : t / 2; }",
         replace="return (t & 1) ? n - 1 - t / 2 : t / 2 + (t > 0 && t == n - 1); }", tests=_T),
    dict(name="causal_tile_shows_next_key", file=_F,
         find="std::clamp<int64_t>(top + i - j0 + 1, 0, n);",
         replace="std::clamp<int64_t>(top + i - j0 + 2, 0, n);", tests=_T),
    dict(name="causal_key_blocks_end_drops_diagonal", file=_F,
         find="return last < 0 ? 0 : std::min(d.Kb, last / d.bs + 1);",
         replace="return last < 0 ? 0 : std::min(d.Kb, last / d.bs + (last % d.bs != 0));", tests=_T),
    dict(name="dkdv_skips_block_ending_on_key", file=_F,
         find="if (d.causal && i0 + m - 1 + d.off < j0) continue;",
         replace="if (d.causal && i0 + m - 1 + d.off <= j0) continue;", tests=_T),
    dict(name="dkdv_query_begin_rounds_up", file=_F,
         find="return r <= 0 ? 0 : std::min(d.Qb, r / d.bs);",
         replace="return r <= 0 ? 0 : std::min(d.Qb, (r + d.bs - 1) / d.bs);", tests=_T),
    dict(name="rescale_misses_last_column", file=_F,
         find="for (int64_t c = 0; c < D; ++c) a[c] *= alpha;",
         replace="for (int64_t c = 0; c + 1 < D; ++c) a[c] *= alpha;", tests=_T),
    dict(name="pool_hidden_row_not_skipped", file=_F,
         find="if (rm == kNegInf<T>) continue;  // the row sees nothing in this block",
         replace="if (false) continue;  // the row sees nothing in this block", tests=_T),
]
