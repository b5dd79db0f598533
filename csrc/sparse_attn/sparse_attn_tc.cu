// sparse_attn tensor-core forward and backward: the kept-tile list builders, the backward's delta and split
// reduction (plain CUDA) and the dispatch to the per-instantiation launchers (sparse_attn_tc_launch.h,
// sparse_attn_tc_bwd_launch.h). No CuTe and no torch headers here.
//
// List builder: one warp per list row (mask batch, mask head, query tile m). Lane l decides key tile n0 + l with
// tile_state() (sparse_attn_tc_plan.h, the same function the CPU op sparse_attn_tc_tiles runs), a ballot and a
// popcount give each kept tile its slot, so the list is ascending in n; the slots after the count get -1. Reads
// the bool mask once per overlapped (tile, block) pair; no host sync (the count stays on the device), so the whole
// forward can be captured in a CUDA graph. The transposed lists of the backward's dK / dV kernel (one row per
// (mask batch, mask head, key tile n), the kept query tiles m ascending) are the same builder with the roles of m
// and n exchanged (the CPU op sparse_attn_tc_tiles_t runs tile_state() likewise).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_common.cuh"
#include "sparse_attn/sparse_attn_launch.h"
#include "sparse_attn/sparse_attn_tc_bwd_launch.h"
#include "sparse_attn/sparse_attn_tc_launch.h"
#include "sparse_attn/sparse_attn_tc_plan.h"

namespace peftcore::sparse_attn::cuda {

namespace {

constexpr int kListWarps = 4;  // list rows per 128-thread block

// kTransposed = false: rows (head, query tile m), lanes over key tiles n; true: rows (head, key tile n), lanes over
// query tiles m.
template <bool kTransposed>
__global__ void __launch_bounds__(32 * kListWarps) build_tiles_kernel(const Params p, const tc::TileGeom g) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kListWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t per_head = kTransposed ? g.Nt : g.Mt, len = kTransposed ? g.Mt : g.Nt;
  const int64_t rows = p.mask_b * p.mask_h * per_head;
  if (row >= rows) return;  // uniform per warp
  const int64_t head = row / per_head, fixed = row % per_head;
  const bool* mask = p.mask + head * g.Qb * g.Kb;
  int32_t* out = (kTransposed ? p.tc_t_entries : p.tc_entries) + row * len;
  int32_t count = 0;
  for (int64_t i0 = 0; i0 < len; i0 += 32) {
    const int64_t i = i0 + lane;
    const int st = i >= len ? tc::kSkip : kTransposed ? tc::tile_state(mask, g, i, fixed) : tc::tile_state(mask, g, fixed, i);
    const unsigned kept = __ballot_sync(0xffffffffu, st != tc::kSkip);
    if (st != tc::kSkip) out[count + __popc(kept & ((1u << lane) - 1u))] = tc::encode_entry(i, st);
    count += __popc(kept);
  }
  for (int64_t i = count + lane; i < len; i += 32) out[i] = -1;
  if (lane == 0) (kTransposed ? p.tc_t_count : p.tc_count)[row] = count;
}

// One warp per row of [B, Hq, Lq]: Delta = dO . O - dlse (fp32); lane l reads elements 2 l, 2 l + 1 of each 64.
template <typename T>
__global__ void __launch_bounds__(256) delta_kernel(const Params p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= p.B * p.Hq * p.Lq) return;
  const T* g = static_cast<const T*>(p.grad_out) + row * p.D;
  const T* o = static_cast<const T*>(p.out) + row * p.D;
  float acc = 0.f;
  for (int64_t d = 2 * lane; d < p.D; d += 64) {
    acc = fmaf(cuda_common::to_f32(g[d]), cuda_common::to_f32(o[d]), acc);
    acc = fmaf(cuda_common::to_f32(g[d + 1]), cuda_common::to_f32(o[d + 1]), acc);
  }
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) p.delta[row] = acc - (p.grad_lse != nullptr ? p.grad_lse[row] : 0.f);
}

// dk / dv = the sum of the splits' fp32 partials, in split order (deterministic).
template <typename T>
__global__ void __launch_bounds__(256) split_reduce_kernel(const Params p, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (i >= n) return;
  float dk = 0.f, dv = 0.f;
  for (int64_t s = 0; s < p.tc_bwd_splits; ++s) {
    dk += p.dk_part[s * n + i];
    dv += p.dv_part[s * n + i];
  }
  static_cast<T*>(p.dk)[i] = cuda_common::from_f32<T>(dk);
  static_cast<T*>(p.dv)[i] = cuda_common::from_f32<T>(dv);
}

unsigned blocks_for(int64_t n, int64_t per_block, const char* what) {
  const int64_t blocks = (n + per_block - 1) / per_block;
  if (blocks > 0x7fffffff) throw std::runtime_error(std::string("peftcore sparse_attn CUDA: ") + what + ": grid too large");
  return static_cast<unsigned>(blocks);
}

template <bool kTransposed>
void build_lists(const Params& p, cudaStream_t stream) {
  const tc::TileGeom g = tc::make_geom(p.Lq, p.Lk, p.bs, p.causal, p.off, p.tc_tile_m, p.tc_tile_n);
  if (g.Mt != p.tc_Mt || g.Nt != p.tc_Nt)
    throw std::runtime_error("peftcore sparse_attn CUDA: tile lists: Mt / Nt differ from the tile sizes");
  const int64_t rows = p.mask_b * p.mask_h * (kTransposed ? g.Nt : g.Mt);
  const int64_t len = kTransposed ? g.Mt : g.Nt;
  if (rows == 0 || len == 0) {
    if (rows > 0)  // nothing on the other axis: empty lists
      cuda_common::check_cuda(cudaMemsetAsync(kTransposed ? p.tc_t_count : p.tc_count, 0, rows * sizeof(int32_t),
                                              stream),
                              "sparse_attn", "tile lists memset");
    return;
  }
  build_tiles_kernel<kTransposed><<<blocks_for(rows, kListWarps, "tile lists"), 32 * kListWarps, 0, stream>>>(p, g);
  cuda_common::check_cuda(cudaGetLastError(), "sparse_attn", "tile lists launch");
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

void tc_build_tiles(const Params& p, cudaStream_t stream) { build_lists<false>(p, stream); }

void tc_build_tiles_t(const Params& p, cudaStream_t stream) { build_lists<true>(p, stream); }

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

void tc_backward(DType dtype, const Params& p, bool want_dq, bool want_dkdv, cudaStream_t stream) {
  if (!tc_compiled(dtype, p.D, p.tc_tile_m, p.tc_tile_n, p.tc_warps))
    throw std::runtime_error("peftcore sparse_attn CUDA: no tensor-core backward for head dim " + std::to_string(p.D) +
                             " with " + std::to_string(p.tc_tile_m) + " x " + std::to_string(p.tc_tile_n) +
                             " tiles in this build");
#if PEFTCORE_HAS_CUTLASS
  constexpr int f16 = static_cast<int>(DType::kFloat16), bf16 = static_cast<int>(DType::kBFloat16);
  const bool half = dtype == DType::kFloat16;
  const int64_t rows = p.B * p.Hq * p.Lq;
  if (rows > 0) {
    if (half) delta_kernel<__half><<<blocks_for(rows, 8, "delta"), 256, 0, stream>>>(p);
    else delta_kernel<__nv_bfloat16><<<blocks_for(rows, 8, "delta"), 256, 0, stream>>>(p);
    cuda_common::check_cuda(cudaGetLastError(), "sparse_attn", "delta launch");
  }
  if (want_dq) {
    if (p.D == 64) {
      if (half) tc_kernels::backward_dq_launch<f16, 64, 64, 64, 4>(p, stream);
      else tc_kernels::backward_dq_launch<bf16, 64, 64, 64, 4>(p, stream);
    } else {
      if (half) tc_kernels::backward_dq_launch<f16, 128, 64, 64, 4>(p, stream);
      else tc_kernels::backward_dq_launch<bf16, 128, 64, 64, 4>(p, stream);
    }
  }
  if (want_dkdv) {
    if (p.D == 64) {
      if (half) tc_kernels::backward_dkdv_launch<f16, 64, 64, 64, 4>(p, stream);
      else tc_kernels::backward_dkdv_launch<bf16, 64, 64, 64, 4>(p, stream);
    } else {
      if (half) tc_kernels::backward_dkdv_launch<f16, 128, 64, 64, 4>(p, stream);
      else tc_kernels::backward_dkdv_launch<bf16, 128, 64, 64, 4>(p, stream);
    }
    if (p.tc_bwd_splits > 1) {
      const int64_t n = p.B * p.Hkv * p.Lk * p.D;
      if (half) split_reduce_kernel<__half><<<blocks_for(n, 256, "split reduce"), 256, 0, stream>>>(p, n);
      else split_reduce_kernel<__nv_bfloat16><<<blocks_for(n, 256, "split reduce"), 256, 0, stream>>>(p, n);
      cuda_common::check_cuda(cudaGetLastError(), "sparse_attn", "split reduce launch");
    }
  }
#else
  (void)want_dq, (void)want_dkdv, (void)stream;
#endif
}

}  // namespace peftcore::sparse_attn::cuda
