"""Deliberate bugs in the sparse_delta CPU kernels (scripts/mutate.py); tests/test_sparse_delta.py must catch each.
Most sit on paths only some shapes reach: full vs partial token tiles, in % 8 != 0, in > 64, several tiles per
thread, >= 2 threads, nnz > 4096, > 32 rows per merge block, several 2^20-score top-k tiles, ties and NaN scores."""

_CPU = "csrc/sparse_delta/sparse_delta_cpu.cpp"
_T = "tests/test_sparse_delta.py"

MUTATIONS = [
    # AVX2 transpose-load of a full fp32/half/bf16 tile: the scalar remainder (in % 8 != 0) loses its last feature
    dict(name="avx2_load_remainder", file=_CPU,
         find="  for (int64_t f = fv; f < features; ++f)\n    for (int64_t j = 0; j < kTile; ++j) buf[f * kTile + j] = static_cast<float>(src[(t0 + j) * ld + f]);",
         replace="  for (int64_t f = fv; f + 1 < features; ++f)\n    for (int64_t j = 0; j < kTile; ++j) buf[f * kTile + j] = static_cast<float>(src[(t0 + j) * ld + f]);",
         tests=_T),
    # AVX2 add-back of a full fp32 tile forgets the tile's token offset (only the 2nd+ full tile is wrong)
    dict(name="avx2_add_tile_offset", file=_CPU,
         find="float* d = dst + (t0 + jb + i) * ld + f0;", replace="float* d = dst + (jb + i) * ld + f0;", tests=_T),
    # generic tile load (partial tiles, float64): every 64-feature block after the first is skipped (in > 64)
    dict(name="generic_load_feature_block", file=_CPU,
         find="const int64_t f1 = std::min(features, f0 + kBlock);", replace="const int64_t f1 = std::min(features, kBlock);",
         tests=_T),
    # forward: a row's odd last nonzero is dropped
    dict(name="fwd_odd_tail", file=_CPU, find="    if (k < ke) {", replace="    if (k + 1 < ke) {", tests=_T),
    # forward: the second accumulator set reads the first nonzero's column
    dict(name="fwd_second_accumulator", file=_CPU,
         find="acc[1][u] += v1 * vload<V>(p1 + u * L);", replace="acc[1][u] += v1 * vload<V>(p0 + u * L);", tests=_T),
    # grad_x: the per-tile buffer is cleared only for a thread's first tile (wrong from a thread's 2nd tile on)
    dict(name="bwd_tile_buffer_not_reset", file=_CPU,
         find="if (want_gx) std::fill(gxb.begin(), gxb.end(), acc_t(0));",
         replace="if (want_gx && tile == tb) std::fill(gxb.begin(), gxb.end(), acc_t(0));", tests=_T),
    # SDDMM: only thread 0's partial sums are kept (>= 2 threads with tiles)
    dict(name="sddmm_thread_partials", file=_CPU,
         find="for (int t = 0; t < nthreads; ++t) sum += parts[", replace="for (int t = 0; t < 1; ++t) sum += parts[",
         tests=_T),
    # SDDMM: the final sum, split over threads in chunks of 4096 nonzeros, loses the chunk offset (nnz > 4096)
    dict(name="sddmm_final_chunk_offset", file=_CPU, find="dst[k] = sc * sum;", replace="dst[k - kb] = sc * sum;",
         tests=_T),
    # merge_: a thread's block of rows stops after 32 rows (blocks are larger only when out > 64 with 2 threads)
    dict(name="merge_row_block", file=_CPU,
         find="      for (int64_t r = rb; r < re; ++r)\n        for (int64_t k = s.rp[r]; k < s.rp[r + 1]; ++k) {",
         replace="      for (int64_t r = rb; r < std::min(re, rb + 32); ++r)\n        for (int64_t k = s.rp[r]; k < s.rp[r + 1]; ++k) {",
         tests=_T),
    # top-k ranking: equal scores rank by descending instead of ascending flat index
    dict(name="topk_tie_break", file=_CPU,
         find="return a.key > b.key || (a.key == b.key && a.flat < b.flat);",
         replace="return a.key > b.key || (a.key == b.key && a.flat > b.flat);", tests=_T),
    # top-k ranking: NaN scores rank last instead of first
    dict(name="topk_nan_ranks_last", file=_CPU,
         find="if (std::isnan(v)) return std::numeric_limits<uint64_t>::max();", replace="if (std::isnan(v)) return 0;",
         tests=_T),
    # top-k: the flat index of a score loses its tile's row offset (only with several 2^20-score tiles)
    dict(name="topk_tile_base", file=_CPU,
         find="const int64_t base = r0 * in, n = nr * in;", replace="const int64_t base = r0, n = nr * in;", tests=_T),
]
