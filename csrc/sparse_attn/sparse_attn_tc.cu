// sparse_attn tensor-core forward: the kept-tile list builder (plain CUDA) and the dispatch to the per-instantiation
// launchers (sparse_attn_tc_launch.h). No CuTe and no torch headers here.
//
// List builder: one warp per list row (mask batch, mask head, query tile m). Lane l decides key tile n0 + l with
// tile_state() (sparse_attn_tc_plan.h, the same function the CPU op sparse_attn_tc_tiles runs), a ballot and a
// popcount give each kept tile its slot, so the list is ascending in n; the slots after the count get -1. Reads
// the bool mask once per overlapped (tile, block) pair; no host sync (the count stays on the device), so the whole
// forward can be captured in a CUDA graph.
#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_common.cuh"
#include "sparse_attn/sparse_attn_launch.h"
#include "sparse_attn/sparse_attn_tc_launch.h"
#include "sparse_attn/sparse_attn_tc_plan.h"

namespace peftcore::sparse_attn::cuda {

namespace {

constexpr int kListWarps = 4;  // list rows per 128-thread block

__global__ void __launch_bounds__(32 * kListWarps) build_tiles_kernel(const Params p, const tc::TileGeom g) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kListWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t rows = p.mask_b * p.mask_h * g.Mt;
  if (row >= rows) return;  // uniform per warp
  const int64_t head = row / g.Mt, m = row % g.Mt;
  const bool* mask = p.mask + head * g.Qb * g.Kb;
  int32_t* out = p.tc_entries + row * g.Nt;
  int32_t count = 0;
  for (int64_t n0 = 0; n0 < g.Nt; n0 += 32) {
    const int64_t n = n0 + lane;
    const int st = n < g.Nt ? tc::tile_state(mask, g, m, n) : tc::kSkip;
    const unsigned kept = __ballot_sync(0xffffffffu, st != tc::kSkip);
    if (st != tc::kSkip) out[count + __popc(kept & ((1u << lane) - 1u))] = tc::encode_entry(n, st);
    count += __popc(kept);
  }
  for (int64_t i = count + lane; i < g.Nt; i += 32) out[i] = -1;
  if (lane == 0) p.tc_count[row] = count;
}

}  // namespace

bool tc_compiled(DType dtype, int64_t D, int tile_m, int tile_n, int warps) {
#if PEFTCORE_HAS_CUTLASS
  return (dtype == DType::kFloat16 || dtype == DType::kBFloat16) && (D == 64 || D == 128) && tile_m == 64 &&
         tile_n == 64 && warps == 4;
#else
  (void)dtype, (void)D, (void)tile_m, (void)tile_n, (void)warps;
  return false;
#endif
}

void tc_build_tiles(const Params& p, cudaStream_t stream) {
  const tc::TileGeom g = tc::make_geom(p.Lq, p.Lk, p.bs, p.causal, p.off, p.tc_tile_m, p.tc_tile_n);
  if (g.Mt != p.tc_Mt || g.Nt != p.tc_Nt)
    throw std::runtime_error("peftcore sparse_attn CUDA: tile lists: Mt / Nt differ from the tile sizes");
  const int64_t rows = p.mask_b * p.mask_h * g.Mt;
  if (rows == 0 || g.Nt == 0) {
    if (rows > 0)  // no key tile at all: empty lists
      cuda_common::check_cuda(cudaMemsetAsync(p.tc_count, 0, rows * sizeof(int32_t), stream), "sparse_attn",
                              "tile lists memset");
    return;
  }
  const int64_t blocks = (rows + kListWarps - 1) / kListWarps;
  if (blocks > 0x7fffffff) throw std::runtime_error("peftcore sparse_attn CUDA: tile lists: grid too large");
  build_tiles_kernel<<<static_cast<unsigned>(blocks), 32 * kListWarps, 0, stream>>>(p, g);
  cuda_common::check_cuda(cudaGetLastError(), "sparse_attn", "tile lists launch");
}

void tc_forward(DType dtype, const Params& p, cudaStream_t stream) {
  if (!tc_compiled(dtype, p.D, p.tc_tile_m, p.tc_tile_n, p.tc_warps))
    throw std::runtime_error("peftcore sparse_attn CUDA: no tensor-core forward for head dim " + std::to_string(p.D) +
                             " with " + std::to_string(p.tc_tile_m) + " x " + std::to_string(p.tc_tile_n) +
                             " tiles in this build");
#if PEFTCORE_HAS_CUTLASS
  constexpr int f16 = static_cast<int>(DType::kFloat16), bf16 = static_cast<int>(DType::kBFloat16);
  const bool half = dtype == DType::kFloat16;
  if (p.D == 64) {
    if (half) tc_kernels::forward_launch<f16, 64, 64, 64, 4>(p, stream);
    else tc_kernels::forward_launch<bf16, 64, 64, 64, 4>(p, stream);
  } else {
    if (half) tc_kernels::forward_launch<f16, 128, 64, 64, 4>(p, stream);
    else tc_kernels::forward_launch<bf16, 128, 64, 64, 4>(p, stream);
  }
#endif
}

}  // namespace peftcore::sparse_attn::cuda
