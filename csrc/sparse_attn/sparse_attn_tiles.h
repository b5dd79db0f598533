// sparse_attn CUDA tile planning: plain C++ (no torch, no CUDA headers), shared by the CUDA launchers, the CUDA
// glue and the sparse_attn_tile_plan op (which lets the CPU tests check the plan without a GPU).
//
// The CUDA kernels hold fp32 tiles of TILE rows in dynamic shared memory (row strides D + 1 and TILE + 1, see
// sparse_attn_kernels.cuh). The largest tile is 64 rows for D <= 128 and 32 for D = 256 (registers); at D = 128 /
// 256 that asks 103-146 KB, above the 99 KB opt-in limit of sm_86 / sm_89. So each kernel takes, at run time, the
// largest compiled tile whose shared memory fits the device's opt-in limit per block, down to 16 rows; 0 when
// none fits (the glue then refuses the call with the sizes).
#pragma once
#include <cstdint>

namespace peftcore::sparse_attn::tiles {

enum Kernel : int { kForward = 0, kDq = 1, kDkdv = 2, kPool = 3, kKernels = 4 };

// Dynamic shared memory bytes of a kernel at head dim D with TILE x TILE score tiles.
constexpr int64_t smem_bytes(int kernel, int64_t D, int64_t tile) {
  const int64_t ld = D + 1, lp = tile + 1;
  switch (kernel) {
    case kForward: return (3 * tile * ld + tile * lp) * 4;                 // Q, K, V, P
    case kDq:
    case kDkdv: return (4 * tile * ld + tile * lp + 2 * tile) * 4;          // Q, dO, K, V, P / dS, lse, Delta
    default: return 2 * tile * ld * 4;                                     // Q, K
  }
}

// The tiles compiled for head dim D, largest first (0 ends the list). Keep in step with with_tile() in
// sparse_attn_instantiate.cuh.
constexpr int kMaxTiles = 3;
constexpr int tile_candidate(int64_t D, int i) {
  constexpr int t64[kMaxTiles] = {64, 32, 0};     // D = 64: 32 rows fit 48 KB
  constexpr int t128[kMaxTiles] = {64, 32, 16};   // D = 128: 64 for sm_80 / sm_90, 32 for 99 KB, 16 for 48 KB
  constexpr int t256[kMaxTiles] = {32, 16, 0};    // D = 256: 32 for sm_80 / sm_90, 16 for 99 KB
  if (i < 0 || i >= kMaxTiles) return 0;
  return D == 64 ? t64[i] : D == 128 ? t128[i] : D == 256 ? t256[i] : 0;
}

// The smallest compiled tile of D (0 when D has no kernel).
constexpr int smallest_tile(int64_t D) {
  int t = 0;
  for (int i = 0; i < kMaxTiles; ++i)
    if (tile_candidate(D, i) != 0) t = tile_candidate(D, i);
  return t;
}

// The largest compiled tile of `kernel` at head dim D whose shared memory fits `smem_limit` bytes; 0 if none.
constexpr int plan(int kernel, int64_t D, int64_t smem_limit) {
  for (int i = 0; i < kMaxTiles; ++i) {
    const int t = tile_candidate(D, i);
    if (t != 0 && smem_bytes(kernel, D, t) <= smem_limit) return t;
  }
  return 0;
}

}  // namespace peftcore::sparse_attn::tiles
