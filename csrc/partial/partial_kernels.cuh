// partial CUDA kernel templates (no torch headers; instantiated in partial.cu).
//
// Both kernels are memory bound: one thread per (token, selected column) element, kThreads per block, the
// block's elements consecutive in the [tokens, k] buffer so loads / stores of that buffer are coalesced; the
// other side (x[t, index[j]] / y[t, index[j]]) is coalesced exactly when the index runs in ranges, which is the
// common case (co-permutation makes it one range). A 2-D grid, blockIdx.y = token, blockIdx.x = chunk of k,
// avoids 64-bit division. index[j] is loaded once per element (it stays in L1/L2: k * 8 bytes).
//   gather_kernel       out[t, j] = x[t, idx[j]]           (0 when idx[j] is outside [0, features))
//   scatter_add_kernel  y[t, idx[j]] += src[t, j]          (fp32 math; skipped when idx[j] is outside)
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_common.cuh"

#include <cstdint>

namespace peftcore::partial::cuda::kernels {

constexpr int kThreads = 256;

using peftcore::cuda_common::from_f32;
using peftcore::cuda_common::to_f32;

// Grid: x = chunks of k (kThreads each), y/z = token (y covers up to 65535 tokens per z slice).
__device__ __forceinline__ int64_t token_of_block() {
  return static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const T* __restrict__ x, int64_t ldx, int64_t features, const int64_t* __restrict__ idx, int64_t k,
                  T* __restrict__ out, int64_t tokens) {
  const int64_t t = token_of_block();
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= tokens || j >= k) return;
  const int64_t c = idx[j];
  out[t * k + j] = (c >= 0 && c < features) ? x[t * ldx + c] : from_f32<T>(0.f);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    scatter_add_kernel(const T* __restrict__ src, const int64_t* __restrict__ idx, int64_t k, T* __restrict__ y,
                       int64_t ldy, int64_t features, int64_t tokens) {
  const int64_t t = token_of_block();
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= tokens || j >= k) return;
  const int64_t c = idx[j];
  if (c < 0 || c >= features) return;
  T* d = y + t * ldy + c;
  *d = from_f32<T>(to_f32(*d) + to_f32(src[t * k + j]));
}

}  // namespace peftcore::partial::cuda::kernels
