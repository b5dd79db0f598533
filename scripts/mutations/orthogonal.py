"""Deliberate bugs in the orthogonal CPU kernels: the fused BOFT chain's token-tile offsets (> 64 tokens), its
per-thread rotation-gradient accumulation, its index compositions, and the per-block Cayley / Neumann kernels
(block ranges split across threads, signs, series terms)."""
_CPU = "csrc/orthogonal/orthogonal_cpu.cpp"
_TESTS = "tests/test_orthogonal.py"

MUTATIONS = [
    dict(name="boft-backward-tile-offset", file=_CPU, tests=_TESTS,  # grad_out of tile 0 read for every tile
         find="G[t * d + j] = static_cast<acc_t>(gp[(t0 + t) * d + inv0[j]]);",
         replace="G[t * d + j] = static_cast<acc_t>(gp[t * d + inv0[j]]);"),
    dict(name="boft-forward-tile-offset", file=_CPU, tests=_TESTS,
         find="B[t * d + j] = static_cast<acc_t>(xp[(t0 + t) * d + inv[j]]);",
         replace="B[t * d + j] = static_cast<acc_t>(xp[t * d + inv[j]]);"),
    dict(name="boft-backward-recompute-tile-offset", file=_CPU, tests=_TESTS,  # rotation gradient of tiles > 0
         find="y0[t * d + j] = static_cast<acc_t>(xp[(t0 + t) * d + inv[j]]);",
         replace="y0[t * d + j] = static_cast<acc_t>(xp[t * d + inv[j]]);"),
    dict(name="boft-grad-rotations-not-accumulated", file=_CPU, tests=_TESTS,  # 2nd tile of a thread overwrites
         find="gr + (i * nb + r) * bb, b, true);", replace="gr + (i * nb + r) * bb, b, false);"),
    dict(name="boft-forward-last-permutation-skipped", file=_CPU, tests=_TESTS,
         find="yp[(t0 + t) * d + j] = static_cast<scalar_t>(A[t * d + p0[j]]);",
         replace="yp[(t0 + t) * d + j] = static_cast<scalar_t>(A[t * d + j]);"),
    dict(name="boft-backward-wrong-composition", file=_CPU, tests=_TESTS,
         find="gather_tile(tb, d, A.data(), ix.row(ix.bwd_comp, i), G.data());",
         replace="gather_tile(tb, d, A.data(), ix.row(ix.fwd_comp, i), G.data());"),
    dict(name="cayley-backward-sign", file=_CPU, tests=_TESTS,
         find="gS[i] *= acc_t(-0.5);", replace="gS[i] *= acc_t(0.5);"),
    dict(name="neumann-constant-term-dropped", file=_CPU, tests=_TESTS,
         find="for (int64_t k = top - 1; k >= 0; --k) {", replace="for (int64_t k = top - 1; k > 0; --k) {"),
    dict(name="neumann-backward-power-untransposed", file=_CPU, tests=_TESTS,
         find="matmul(Pk, S, T, b, false, true);", replace="matmul(Pk, S, T, b, false, false);"),
    dict(name="block-range-offset-lost", file=_CPU, tests=_TESTS,  # the 2nd thread's block range written over the 1st
         find="for (int64_t n = lo; n < hi; ++n) fn(n, buf.data());",
         replace="for (int64_t n = lo; n < hi; ++n) fn(n - lo, buf.data());"),
]
