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
};

// True when a kernel exists for head dim D.
bool supported_head_dim(int64_t D);

// The device's opt-in shared memory per block in bytes (cudaDevAttrMaxSharedMemoryPerBlockOptin), queried once
// per device and cached.
int64_t smem_optin(int device);

// out, lse.
void forward(DType dtype, const Params& p, cudaStream_t stream);
// delta (from grad_out, out, grad_lse), then dq when want_dq and dk, dv when want_dkdv.
void backward(DType dtype, const Params& p, bool want_dq, bool want_dkdv, cudaStream_t stream);
// pool (must hold zeros).
void block_pool(DType dtype, const Params& p, cudaStream_t stream);

}  // namespace peftcore::sparse_attn::cuda
