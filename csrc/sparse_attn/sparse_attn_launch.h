// sparse_attn CUDA launchers: plain C++ (no torch headers), implemented in sparse_attn.cu (dtype dispatch) and
// sparse_attn_instantiate.cuh (grids, per-dtype instantiations).
// All tensors contiguous: q / out / grad_out / dq [B, Hq, Lq, D], k / v / dk / dv [B, Hkv, Lk, D] in the storage
// dtype; block_mask bool [mask_b, mask_h, Qb, Kb]; lse / delta / grad_lse float32 [B, Hq, Lq]; pool float32
// [B, Hq, Qb, Kb]. D must be 64, 128 or 256.
#pragma once
#include "cuda_dtype.h"
#include <cstdint>
#include <cuda_runtime_api.h>

namespace peftcore::sparse_attn::cuda {

using DType = ::peftcore::CudaDType;

// Every kernel argument in one struct (FlashAttention style); pointers a call does not use stay null.
struct Params {
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const bool* mask = nullptr;
  void* out = nullptr;
  float* lse = nullptr;
  const void* grad_out = nullptr;
  const float* grad_lse = nullptr;  // may be null (no lse gradient)
  float* delta = nullptr;           // [B, Hq, Lq] workspace of the backward
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  float* pool = nullptr;  // zero-initialised by the caller
  int64_t B = 0, Hq = 0, Hkv = 0, Lq = 0, Lk = 0, D = 0, bs = 0, Qb = 0, Kb = 0, mask_b = 1, mask_h = 1;
  float scale = 1.f;
  bool causal = false;
  int64_t off = 0;  // causal: key j visible to query i iff j <= i + off (0 top-left, Lk - Lq bottom-right)
  // Tile rows per kernel (sparse_attn_tiles.h: forward, dq, dk/dv, pool), planned by the caller from the device's
  // opt-in shared memory; each must be one of tile_candidate(D, .).
  int tile[4] = {0, 0, 0, 0};
  // Tensor-core forward (sparse_attn_tc_plan.h): tc_tile_m x tc_tile_n tiles, Mt = ceil(Lq / tc_tile_m) query
  // tiles, Nt = ceil(Lk / tc_tile_n) key tiles; the kept-tile lists tc_count [mask_b * mask_h * Mt] and
  // tc_entries [mask_b * mask_h * Mt, Nt] int32 (device workspace filled by tc_build_tiles).
  int tc_tile_m = 0, tc_tile_n = 0, tc_warps = 0;
  int64_t tc_Mt = 0, tc_Nt = 0;
  int32_t* tc_count = nullptr;
  int32_t* tc_entries = nullptr;
  // Tensor-core backward: the transposed lists (per (mask batch, mask head, key tile) row, the kept query tiles):
  // tc_t_count [mask_b * mask_h * Nt] and tc_t_entries [mask_b * mask_h * Nt, Mt] int32 (tc_build_tiles_t); the
  // dK / dV kernel's split over the query heads of a GQA group (tc_bwd_splits, sparse_attn_tc_plan.h bwd_splits)
  // and, when it is > 1, its fp32 partial sums dk_part / dv_part [splits, B, Hkv, Lk, D] (device workspace).
  int32_t* tc_t_count = nullptr;
  int32_t* tc_t_entries = nullptr;
  int64_t tc_bwd_splits = 1;
  float* dk_part = nullptr;
  float* dv_part = nullptr;
};

// True when a kernel exists for head dim D.
bool supported_head_dim(int64_t D);

// The device's opt-in shared memory per block in bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin), queried once
// per device and cached.
int64_t smem_optin(int device);
// The device's compute capability major version (cudaDevAttrComputeCapabilityMajor), cached per device.
int compute_major(int device);

// out, lse.
void forward(DType dtype, const Params& p, cudaStream_t stream);
// delta (from grad_out, out, grad_lse), then dq when want_dq and dk, dv when want_dkdv.
void backward(DType dtype, const Params& p, bool want_dq, bool want_dkdv, cudaStream_t stream);
// pool (must hold zeros).
void block_pool(DType dtype, const Params& p, cudaStream_t stream);

// Tensor-core forward (sparse_attn_tc.cu). Whether this build has it (CuTe headers found at build time) for
// float16 / bfloat16 at head dim D with the configuration in p.tc_*.
bool tc_compiled(DType dtype, int64_t D, int tile_m, int tile_n, int warps);
// The kept-tile lists p.tc_count / p.tc_entries from p.mask (one warp per list row, no host sync).
void tc_build_tiles(const Params& p, cudaStream_t stream);
// out, lse from q, k, v and the lists (built first by tc_build_tiles on the same stream).
void tc_forward(DType dtype, const Params& p, cudaStream_t stream);
// The device's number of SMs (cudaDevAttrMultiProcessorCount), cached per device.
int sm_count(int device);
// The transposed lists p.tc_t_count / p.tc_t_entries from p.mask (one warp per (mask head, key tile) row).
void tc_build_tiles_t(const Params& p, cudaStream_t stream);
// Tensor-core backward (sparse_attn_tc_bwd_kernels.cuh), float16 / bfloat16, the configuration in p.tc_*: delta,
// then dq over the forward lists (when want_dq) and dk, dv over the transposed lists (when want_dkdv; through
// p.dk_part / p.dv_part and a reduction when p.tc_bwd_splits > 1). Every row of dq / dk / dv is written. The lists
// come first (tc_build_tiles, tc_build_tiles_t) on the same stream.
void tc_backward(DType dtype, const Params& p, bool want_dq, bool want_dkdv, cudaStream_t stream);

}  // namespace peftcore::sparse_attn::cuda
