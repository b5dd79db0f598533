// token_elim CUDA kernel templates (no torch headers; instantiated in token_elim.cu).
//
// All memory bound. A block is tx x ty threads (token_elim_plan.h): threadIdx.y picks a row, threadIdx.x walks its
// accesses, each of V consecutive elements (V = 16 / sizeof(T), one 16-byte load / store, when the launcher found
// the buffers aligned; else V = 1). Rows stride over blockIdx.x / threadIdx.y, accesses over blockIdx.y /
// threadIdx.x (cuda_common.cuh), so the only division is one per row (the batch of a kept row), none per element.
// Row kernels (gather / scatter-add of kept tokens): row r of [B * K] is F contiguous elements on both sides, so
// both sides are vectorised and coalesced; keep[r] is read once per row. Kept rows of a batch are unique, so the
// scatter-add needs no atomics.
// Elementwise MLP kernels: one row of n elements, fp32 math, one rounding per output.
//   silu_mul            a = g * sigmoid(g) * u
//   silu_mul_backward   dg = da * u * s * (1 + g (1 - s)) (+ ggk), du = da * g * s (+ guk), s = sigmoid(g)
//   gather_cols         out[t, c] = src[t, idx[c]]  (out side vectorised; idx[c] cached in L1)
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_common.cuh"

#include <cstdint>

namespace peftcore::token_elim::cuda::kernels {

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
    gather_rows_kernel(const T* __restrict__ x, const int64_t* __restrict__ keep, T* __restrict__ out, int64_t B,
                       int64_t L, int64_t K, int64_t F) {
  const int64_t units = F / V;  // F % V == 0 (launcher)
  for (int64_t r = row_begin(); r < B * K; r += row_step()) {
    const int64_t b = r / K, l = keep[r];
    const bool ok = l >= 0 && l < L;
    const T* xr = x + (b * L + (ok ? l : 0)) * F;
    T* o = out + r * F;
    for (int64_t j = col_begin(); j < units; j += col_step()) {
      Vec<T, V> v;
      if (ok) {
        v = load_vec<T, V>(xr + j * V);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) v.v[i] = from_f32<T>(0.f);
      }
      store_vec<T, V>(o + j * V, v);
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    scatter_add_rows_kernel(const T* __restrict__ src, const int64_t* __restrict__ keep, T* __restrict__ out,
                            int64_t B, int64_t L, int64_t K, int64_t F) {
  const int64_t units = F / V;
  for (int64_t r = row_begin(); r < B * K; r += row_step()) {
    const int64_t b = r / K, l = keep[r];
    if (l < 0 || l >= L) continue;
    const T* s = src + r * F;
    T* o = out + (b * L + l) * F;
    for (int64_t j = col_begin(); j < units; j += col_step()) {
      const Vec<T, V> a = load_vec<T, V>(s + j * V);
      Vec<T, V> d = load_vec<T, V>(o + j * V);
#pragma unroll
      for (int i = 0; i < V; ++i) d.v[i] = from_f32<T>(to_f32(d.v[i]) + to_f32(a.v[i]));
      store_vec<T, V>(o + j * V, d);
    }
  }
}

__device__ __forceinline__ float sigmoidf_(float z) { return 1.f / (1.f + __expf(-z)); }

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    silu_mul_kernel(const T* __restrict__ g, const T* __restrict__ u, T* __restrict__ a, int64_t n) {
  const int64_t units = n / V;  // n % V == 0 (launcher)
  for (int64_t j = col_begin(); j < units; j += col_step()) {
    const Vec<T, V> gv = load_vec<T, V>(g + j * V), uv = load_vec<T, V>(u + j * V);
    Vec<T, V> av;
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float z = to_f32(gv.v[i]);
      av.v[i] = from_f32<T>(z * sigmoidf_(z) * to_f32(uv.v[i]));
    }
    store_vec<T, V>(a + j * V, av);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    silu_mul_backward_kernel(const T* __restrict__ da, const T* __restrict__ g, const T* __restrict__ u,
                             const T* __restrict__ ggk, const T* __restrict__ guk, T* __restrict__ dg,
                             T* __restrict__ du, int64_t n) {
  const int64_t units = n / V;
  for (int64_t j = col_begin(); j < units; j += col_step()) {
    const Vec<T, V> av = load_vec<T, V>(da + j * V), gv = load_vec<T, V>(g + j * V), uv = load_vec<T, V>(u + j * V);
    Vec<T, V> gg, gu, og, ou;
    if (ggk) gg = load_vec<T, V>(ggk + j * V);
    if (guk) gu = load_vec<T, V>(guk + j * V);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float z = to_f32(gv.v[i]), s = sigmoidf_(z), a = to_f32(av.v[i]);
      float vg = a * to_f32(uv.v[i]) * s * (1.f + z * (1.f - s));
      float vu = a * z * s;
      if (ggk) vg += to_f32(gg.v[i]);
      if (guk) vu += to_f32(gu.v[i]);
      og.v[i] = from_f32<T>(vg);
      ou.v[i] = from_f32<T>(vu);
    }
    store_vec<T, V>(dg + j * V, og);
    store_vec<T, V>(du + j * V, ou);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    gather_cols_kernel(const T* __restrict__ src, const int64_t* __restrict__ idx, T* __restrict__ out, int64_t T_,
                       int64_t I, int64_t C) {
  const int64_t units = C / V;  // C % V == 0 (launcher)
  for (int64_t t = row_begin(); t < T_; t += row_step()) {
    const T* sr = src + t * I;
    T* o = out + t * C;
    for (int64_t j = col_begin(); j < units; j += col_step()) {
      Vec<T, V> v;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const int64_t c = idx[j * V + i];
        v.v[i] = (c >= 0 && c < I) ? sr[c] : from_f32<T>(0.f);
      }
      store_vec<T, V>(o + j * V, v);
    }
  }
}

}  // namespace peftcore::token_elim::cuda::kernels
