// miss CUDA kernel templates (no torch headers; instantiated in miss.cu). All three are memory bound.
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
// unfold_kernel. out[t, f] = grad[t, f % r]: a thread per output column f (f % r computed once), striding over
// rows by gridDim.y; writes coalesced, the grad row stays in L1/L2.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_common.cuh"

#include <cstdint>

namespace peftcore::miss::cuda::kernels {

constexpr int kThreads = 256;

using peftcore::cuda_common::from_f32;
using peftcore::cuda_common::to_f32;

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

template <typename T>
__global__ void __launch_bounds__(kThreads)
    unfold_kernel(const T* __restrict__ grad, int64_t rows, int64_t r, int64_t n, T* __restrict__ out) {
  const int64_t f = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (f >= n) return;
  const int64_t c = f % r;
  for (int64_t t = blockIdx.y; t < rows; t += gridDim.y) out[t * n + f] = grad[t * r + c];
}

}  // namespace peftcore::miss::cuda::kernels
