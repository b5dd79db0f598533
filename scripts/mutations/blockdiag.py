"""Deliberate bugs in the blockdiag CPU kernels (and the tile GEMM of cpu_tiles.h they run on), each on a path that
only some shapes reach: the large-block batched-GEMM backward, token tiles past the first, per-thread weight-gradient
accumulators reused across tiles, the BLAS branch of the tile GEMM, its column tails, the Monarch permuting copies."""
_CPU = "csrc/blockdiag/blockdiag_cpu.cpp"
_TILES = "csrc/cpu_tiles.h"
_TESTS = "tests/test_blockdiag.py"

MUTATIONS = [
    dict(name="bmm-blockdiag-backward-sign", file=_CPU, tests=_TESTS,  # blocks >= 128 x 128: grad_blocks negated
         find="if (mask[1]) gw = at::bmm(gb.transpose(1, 2),", replace="if (mask[1]) gw = -at::bmm(gb.transpose(1, 2),"),
    dict(name="blockdiag-forward-tile-offset", file=_CPU, tests=_TESTS,  # every tile written over the first
         find="store_tile(yb.data(), out, t0, tb, yp);", replace="store_tile(yb.data(), out, 0, tb, yp);"),
    dict(name="blockdiag-grad-blocks-not-accumulated", file=_CPU, tests=_TESTS,  # 2nd tile of a thread overwrites
         find="gemm(bo, bi, tb, gt.data(), tb, xb.data() + j * bi, in, gwp + j * bo * bi, bi, true);",
         replace="gemm(bo, bi, tb, gt.data(), tb, xb.data() + j * bi, in, gwp + j * bo * bi, bi, false);"),
    dict(name="monarch-bmm-stage2-layout", file=_CPU, tests=_TESTS,  # batched-GEMM h layout (l divides q) reversed
         find="o1.view({k, T, q / l, l}).permute({1, 3, 0, 2})", replace="o1.view({k, T, q / l, l}).flip(3).permute({1, 3, 0, 2})"),
    dict(name="monarch-bmm-grad-layout", file=_CPU, tests=_TESTS,  # batched-GEMM backward's inverse permutation
         find="gz.view({l, T, k, q / l}).permute({2, 1, 3, 0})", replace="gz.view({l, T, k, q / l}).flip(0).permute({2, 1, 3, 0})"),
    dict(name="monarch-bmm-backward-w1-sign", file=_CPU, tests=_TESTS,
         find="if (mask[1]) g1 = at::bmm(gk.transpose(1, 2)", replace="if (mask[1]) g1 = -at::bmm(gk.transpose(1, 2)"),
    dict(name="monarch-with-h-tile-offset", file=_CPU, tests=_TESTS,  # saved h of every tile written over the first
         find="if (hout != nullptr) store_tile(hp.data(), d.mid, t0, tb, hout);",
         replace="if (hout != nullptr) store_tile(hp.data(), d.mid, 0, tb, hout);"),
    dict(name="monarch-fused-forward-tile-offset", file=_CPU, tests=_TESTS,
         find="store_tile(yb.data(), d.out, t0, tb, yp);", replace="store_tile(yb.data(), d.out, 0, tb, yp);"),
    dict(name="monarch-grad-w2-not-accumulated", file=_CPU, tests=_TESTS,
         find="gw2p + j * d.s * d.r, d.r, true);", replace="gw2p + j * d.s * d.r, d.r, false);"),
    dict(name="tile-gemm-blas-accumulate-dropped", file=_TILES, tests=_TESTS,  # BLAS branch (K*N >= 128*128, M >= 16)
         find="if (accumulate) c.addmm_(a, b);", replace="if (accumulate) at::mm_out(c, a, b);"),
    dict(name="tile-gemm-column-tail-accumulate-dropped", file=_TILES, tests=_TESTS,  # AVX2 path, N % 16 != 0
         find="gemm_tail_f32(M4, N - N16, K, A, lda, B + N16, ldb, C + N16, ldc, accumulate);",
         replace="gemm_tail_f32(M4, N - N16, K, A, lda, B + N16, ldb, C + N16, ldc, false);"),
    dict(name="thread-accumulators-first-only", file=_TILES, tests=_TESTS,  # other threads' weight gradients lost
         find="for (int64_t t = 0; t < nt; ++t)", replace="for (int64_t t = 0; t < 1; ++t)"),
]
