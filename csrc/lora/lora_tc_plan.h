// The tile schedule of lora's grouped (tensor-core) kernels, shared by the device (lora_tc.cu) and the host
// (the lora_tc_tiles op, which lets the CPU tests check it). Plain C++, no torch, no CUDA headers.
//
// Pairs sorted by adapter: adapter i's pairs sit at sorted positions starts[i] .. starts[i+1]. Its tiles are those
// positions cut in runs of kTile (the last one partial). Tiles are numbered adapter by adapter, skipping adapters
// with no pair or invalid offsets (offsets[i] < 0, offsets[i+1] > R or offsets[i+1] <= offsets[i]). The grid launches
// tiles_bound(P, N) = ceil(P / kTile) + N CTAs (an upper bound from shapes alone: sum_i ceil(n_i / kTile) <=
// sum_i (n_i / kTile + 1)); CTA b asks find_tile for tile b and returns when there is none.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define PEFTCORE_LORA_PLAN_HD __host__ __device__ __forceinline__
#else
#define PEFTCORE_LORA_PLAN_HD inline
#endif

namespace peftcore::lora::tc_plan {

constexpr int64_t kTile = 64;

struct TileRef {
  int64_t i, off, r, q0, n;  // adapter, its packed columns off .. off + r, sorted positions q0 .. q0 + n
};

PEFTCORE_LORA_PLAN_HD int64_t tiles_bound(int64_t pairs, int64_t adapters) {
  return (pairs + kTile - 1) / kTile + adapters;
}

PEFTCORE_LORA_PLAN_HD bool find_tile(const int64_t* offsets, const int64_t* starts, int64_t N, int64_t R, int64_t b,
                                     TileRef& t) {
  for (int64_t i = 0; i < N; ++i) {
    const int64_t o0 = offsets[i], o1 = offsets[i + 1];
    if (o0 < 0 || o1 > R || o1 <= o0) continue;
    const int64_t s0 = starts[i], n = starts[i + 1] - s0;
    if (n <= 0) continue;
    const int64_t tiles = (n + kTile - 1) / kTile;
    if (b < tiles) {
      t = TileRef{i, o0, o1 - o0, s0 + b * kTile, n - b * kTile < kTile ? n - b * kTile : kTile};
      return true;
    }
    b -= tiles;
  }
  return false;
}

}  // namespace peftcore::lora::tc_plan

#undef PEFTCORE_LORA_PLAN_HD
