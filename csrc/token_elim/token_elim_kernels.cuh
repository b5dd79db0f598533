// token_elim CUDA kernel templates (no torch headers; instantiated in token_elim.cu).
//
// All memory bound. Row kernels (gather / scatter-add of kept tokens): blockIdx.y (+ z slices) = kept row r of
// [B * K], blockIdx.x = chunk of kThreads features, one thread per element: each row is F contiguous elements on
// both sides, so loads and stores are coalesced. keep[r] is read once per thread (L1 broadcast). Kept rows of a
// batch are unique, so the scatter-add needs no atomics.
// Elementwise MLP kernels: grid-stride loops, fp32 math, one rounding per output.
//   silu_mul            a = g * sigmoid(g) * u
//   silu_mul_backward   dg = da * u * s * (1 + g (1 - s)) (+ ggk), du = da * g * s (+ guk), s = sigmoid(g)
//   gather_cols         out[t, c] = src[t, idx[c]]  (thread per output element; idx[c] cached in L1)
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_common.cuh"

#include <cstdint>

namespace peftcore::token_elim::cuda::kernels {

constexpr int kThreads = 256;

using peftcore::cuda_common::from_f32;
using peftcore::cuda_common::to_f32;

__device__ __forceinline__ int64_t row_of_block() { return static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y; }

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gather_rows_kernel(const T* __restrict__ x, const int64_t* __restrict__ keep, T* __restrict__ out, int64_t B,
                       int64_t L, int64_t K, int64_t F) {
  const int64_t r = row_of_block();
  const int64_t f = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (r >= B * K || f >= F) return;
  const int64_t b = r / K, l = keep[r];
  out[r * F + f] = (l >= 0 && l < L) ? x[(b * L + l) * F + f] : from_f32<T>(0.f);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    scatter_add_rows_kernel(const T* __restrict__ src, const int64_t* __restrict__ keep, T* __restrict__ out,
                            int64_t B, int64_t L, int64_t K, int64_t F) {
  const int64_t r = row_of_block();
  const int64_t f = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (r >= B * K || f >= F) return;
  const int64_t b = r / K, l = keep[r];
  if (l < 0 || l >= L) return;
  T* d = out + (b * L + l) * F + f;
  *d = from_f32<T>(to_f32(*d) + to_f32(src[r * F + f]));
}

__device__ __forceinline__ float sigmoidf_(float z) { return 1.f / (1.f + __expf(-z)); }

template <typename T>
__global__ void __launch_bounds__(kThreads)
    silu_mul_kernel(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ a, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const float z = to_f32(g[i]);
    a[i] = from_f32<T>(z * sigmoidf_(z) * to_f32(u[i]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    silu_mul_backward_kernel(const T* __restrict__ da, const T* __restrict__ g, const T* __restrict__ u,
                             const T* __restrict__ ggk, const T* __restrict__ guk, T* __restrict__ dg,
                             T* __restrict__ du, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const float z = to_f32(g[i]), s = sigmoidf_(z), a = to_f32(da[i]);
    float vg = a * to_f32(u[i]) * s * (1.f + z * (1.f - s));
    float vu = a * z * s;
    if (ggk) vg += to_f32(ggk[i]);
    if (guk) vu += to_f32(guk[i]);
    dg[i] = from_f32<T>(vg);
    du[i] = from_f32<T>(vu);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    gather_cols_kernel(const T* __restrict__ src, const int64_t* __restrict__ idx, T* __restrict__ out, int64_t T_,
                       int64_t I, int64_t C) {
  const int64_t t = row_of_block();
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= T_ || c >= C) return;
  const int64_t j = idx[c];
  out[t * C + c] = (j >= 0 && j < I) ? src[t * I + j] : from_f32<T>(0.f);
}

}  // namespace peftcore::token_elim::cuda::kernels
