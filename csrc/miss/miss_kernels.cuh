// miss CUDA kernel templates (no torch headers; instantiated in miss.cu). All memory bound; which one runs, with
// which block and vector width, is miss_plan.h's rule.
//
// fold_narrow_kernel (r <= kThreads). A block of kThreads threads is G = kThreads / kW groups of kW lanes
// (kW a power of two in [32, kThreads], kW >= r, picked from n so short rows do not idle a whole block); each
// group folds one row at a time (blocks stride over row groups). Lane p < L = r * (kW / r) of a group reads
// x[t, p], x[t, p + L], x[t, p + 2L], ...: each step the group reads L consecutive elements (coalesced), and
// since L % r == 0 a lane's class c = p % r never changes, so it accumulates in one fp32 register. The group's
// kW partials then go to shared memory and lane c < r adds its kW / r of them (lanes c, c + r, ...). The ragged
// tail (n % L) is just the last, partial step: PEFT's zero padding.
//
// fold_wide_kernel (r > kThreads). Thread c of c-tile blockIdx.x reads x[t, c], x[t, c + r], ...: one chunk of r
// per step, consecutive threads on consecutive addresses; blockIdx.y strides over rows.
//
// fold_vec_group_kernel (16-byte vectors, rv = r / V <= 32). A row is a group of blockDim.x (<= 32) lanes inside
// one warp, blockDim.y rows per block. Lane p < rv * copies reads the row's vectors p, p + rv * copies, ... into V
// fp32 accumulators (its class of vectors p % rv never changes); a shuffle tree over lanes p, p + rv, ... adds
// the copies, and lanes 0 .. rv - 1 store one vector of y each. No shared memory.
//
// fold_vec_cols_kernel (16-byte vectors, rv > 32). Thread c (threadIdx.x / blockIdx.y) of row threadIdx.y reads
// vectors c, c + rv, ... of the row: consecutive threads on consecutive vectors.
//
// unfold_kernel. out[t, f] = grad[t, f % r] in accesses of V elements (V = 16 / sizeof(T) or 1, n and r multiples
// of V): a thread per access column j of out (its grad column j % (r / V) computed once per column, not per
// element), striding over rows; threadIdx.x along the row, threadIdx.y over rows, so short rows fill a block.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_common.cuh"

#include <cstdint>

namespace peftcore::miss::cuda::kernels {

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

template <typename T, int kW>
__global__ void __launch_bounds__(kThreads)
    fold_narrow_kernel(const T* __restrict__ x, int64_t rows, int64_t n, int r, T* __restrict__ y) {
  constexpr int G = kThreads / kW;
  __shared__ float part[kThreads];
  const int lane = threadIdx.x % kW, group = threadIdx.x / kW;
  const int L = r * (kW / r);
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * G; base < rows; base += static_cast<int64_t>(gridDim.x) * G) {
    const int64_t t = base + group;
    float acc = 0.f;
    if (t < rows && lane < L) {
      const T* xr = x + t * n;
#pragma unroll 4
      for (int64_t f = lane; f < n; f += L) acc += to_f32(xr[f]);
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    if (t < rows && lane < r) {
      const float* p = part + group * kW;
      float s = 0.f;
      for (int j = lane; j < L; j += r) s += p[j];
      y[t * r + lane] = from_f32<T>(s);
    }
    __syncthreads();  // part is rewritten by the next row group
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    fold_wide_kernel(const T* __restrict__ x, int64_t rows, int64_t n, int64_t r, T* __restrict__ y) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c >= r) return;
  for (int64_t t = blockIdx.y; t < rows; t += gridDim.y) {
    const T* xr = x + t * n;
    float acc = 0.f;
#pragma unroll 4
    for (int64_t f = c; f < n; f += r) acc += to_f32(xr[f]);
    y[t * r + c] = from_f32<T>(acc);
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    fold_vec_group_kernel(const T* __restrict__ x, int64_t rows, int64_t n, int rv, int copies, T* __restrict__ y) {
  const int lane = threadIdx.x, width = blockDim.x;
  const int active = rv * copies;
  const int64_t nv = n / V, r = static_cast<int64_t>(rv) * V;
  // block-uniform loop: every lane of every warp reaches the shuffles
  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.y; base < rows;
       base += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t t = base + threadIdx.y;
    float acc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) acc[i] = 0.f;
    if (t < rows && lane < active) {
      const T* xr = x + t * n;
#pragma unroll 4
      for (int64_t f = lane; f < nv; f += active) {
        const Vec<T, V> v = load_vec<T, V>(xr + f * V);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] += to_f32(v.v[i]);
      }
    }
    for (int off = copies / 2; off > 0; off /= 2) {
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] += __shfl_down_sync(0xffffffffu, acc[i], off * rv, width);
    }
    if (t < rows && lane < rv) {
      Vec<T, V> o;
#pragma unroll
      for (int i = 0; i < V; ++i) o.v[i] = from_f32<T>(acc[i]);
      store_vec<T, V>(y + t * r + static_cast<int64_t>(lane) * V, o);
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    fold_vec_cols_kernel(const T* __restrict__ x, int64_t rows, int64_t n, int64_t r, T* __restrict__ y) {
  const int64_t nv = n / V, rv = r / V;
  for (int64_t t = row_begin(); t < rows; t += row_step()) {
    const T* xr = x + t * n;
    for (int64_t c = col_begin(); c < rv; c += col_step()) {
      float acc[V];
#pragma unroll
      for (int i = 0; i < V; ++i) acc[i] = 0.f;
#pragma unroll 4
      for (int64_t f = c; f < nv; f += rv) {
        const Vec<T, V> v = load_vec<T, V>(xr + f * V);
#pragma unroll
        for (int i = 0; i < V; ++i) acc[i] += to_f32(v.v[i]);
      }
      Vec<T, V> o;
#pragma unroll
      for (int i = 0; i < V; ++i) o.v[i] = from_f32<T>(acc[i]);
      store_vec<T, V>(y + t * r + c * V, o);
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    unfold_kernel(const T* __restrict__ grad, int64_t rows, int64_t r, int64_t n, T* __restrict__ out) {
  const int64_t nv = n / V, rv = r / V;
  for (int64_t j = col_begin(); j < nv; j += col_step()) {
    const int64_t c = j % rv;  // once per column
    for (int64_t t = row_begin(); t < rows; t += row_step())
      store_vec<T, V>(out + t * n + j * V, load_vec<T, V>(grad + t * r + c * V));
  }
}

}  // namespace peftcore::miss::cuda::kernels
