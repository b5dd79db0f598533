// partial CUDA kernel templates (no torch headers; instantiated in partial.cu).
//
// Both kernels are memory bound. A block is tx x ty threads (partial_plan.h): threadIdx.y picks a token row,
// threadIdx.x walks the row's accesses, so with small k one block still covers many tokens (k = 1: 256 tokens) and
// a warp's accesses of the [tokens, k] buffer are consecutive. Each thread moves V consecutive columns j of that
// buffer as one 16-byte access (V = 16 / sizeof(T) when the launcher found it aligned, else V = 1); the other side
// (x[t, index[j]] / y[t, index[j]]) is scalar, coalesced exactly when the index runs in ranges (the common case:
// co-permutation makes it one range). Rows stride over blockIdx.x / threadIdx.y, accesses over blockIdx.y /
// threadIdx.x: no division anywhere. index[j] is loaded per element (it stays in L1/L2: k * 8 bytes).
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

using peftcore::cuda_common::col_begin;
using peftcore::cuda_common::col_step;
using peftcore::cuda_common::from_f32;
using peftcore::cuda_common::load_vec;
using peftcore::cuda_common::row_begin;
using peftcore::cuda_common::row_step;
using peftcore::cuda_common::store_vec;
using peftcore::cuda_common::to_f32;
using peftcore::cuda_common::Vec;

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    gather_kernel(const T* __restrict__ x, int64_t ldx, int64_t features, const int64_t* __restrict__ idx, int64_t k,
                  T* __restrict__ out, int64_t tokens) {
  const int64_t units = k / V;  // k % V == 0 (launcher); V a power of two: a shift
  for (int64_t t = row_begin(); t < tokens; t += row_step()) {
    const T* xr = x + t * ldx;
    T* o = out + t * k;
    for (int64_t j = col_begin(); j < units; j += col_step()) {
      Vec<T, V> v;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const int64_t c = idx[j * V + i];
        v.v[i] = (c >= 0 && c < features) ? xr[c] : from_f32<T>(0.f);
      }
      store_vec<T, V>(o + j * V, v);
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    scatter_add_kernel(const T* __restrict__ src, const int64_t* __restrict__ idx, int64_t k, T* __restrict__ y,
                       int64_t ldy, int64_t features, int64_t tokens) {
  const int64_t units = k / V;
  for (int64_t t = row_begin(); t < tokens; t += row_step()) {
    const T* s = src + t * k;
    T* yr = y + t * ldy;
    for (int64_t j = col_begin(); j < units; j += col_step()) {
      const Vec<T, V> v = load_vec<T, V>(s + j * V);
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const int64_t c = idx[j * V + i];
        if (c >= 0 && c < features) yr[c] = from_f32<T>(to_f32(yr[c]) + to_f32(v.v[i]));
      }
    }
  }
}

}  // namespace peftcore::partial::cuda::kernels
