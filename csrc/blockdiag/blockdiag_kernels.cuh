// blockdiag CUDA kernel templates (no torch headers; instantiated in blockdiag.cu).
//
// monarch_forward_kernel: one CTA per tile of TT tokens. The tile's input x [TT, k*p] and the Monarch
// intermediate h [TT, k*q] live in shared memory as fp32; h never reaches global memory.
//   stage 1  h[b, i*q + a]  = sum_c x[b, i*p + c] * w1[i, a, c]    one thread per (b, n) of the tile
//   stage 2  y[b, t*l + j]  = sum_m h[b, m*l + j] * w2[j, t, m]    one thread per (b, o); writes are coalesced
// The weights are read through the read-only cache (every CTA reads all of them; they are small). CUDA-core
// FMAs with fp32 accumulation; a tensor-core (mma) version is future work.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_common.cuh"

#include <cstdint>

namespace peftcore::blockdiag::cuda::kernels {

constexpr int kThreads = 256;

using peftcore::cuda_common::from_f32;
using peftcore::cuda_common::to_f32;

struct MonarchParams {
  int64_t tokens, k, q, p, l, s, r, in, mid, out;
  int tile;  // tokens per CTA
};

template <typename T>
__global__ void __launch_bounds__(kThreads)
    monarch_forward_kernel(const T* __restrict__ x, const T* __restrict__ w1, const T* __restrict__ w2,
                           T* __restrict__ y, MonarchParams P) {
  extern __shared__ float smem[];
  float* xs = smem;                  // [tile, in]
  float* hs = smem + P.tile * P.in;  // [tile, mid]
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * P.tile;
  const int64_t nt = min(static_cast<int64_t>(P.tile), P.tokens - t0);
  for (int64_t e = threadIdx.x; e < nt * P.in; e += blockDim.x) xs[e] = to_f32(x[t0 * P.in + e]);
  __syncthreads();
  for (int64_t e = threadIdx.x; e < nt * P.mid; e += blockDim.x) {
    const int64_t b = e / P.mid, n = e % P.mid, i = n / P.q;
    const float* xr = xs + b * P.in + i * P.p;
    const T* wr = w1 + n * P.p;  // w1[i, a, :] with n = i*q + a
    float acc = 0.f;
    for (int64_t c = 0; c < P.p; ++c) acc = fmaf(xr[c], to_f32(wr[c]), acc);
    hs[e] = acc;
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < nt * P.out; e += blockDim.x) {
    const int64_t b = e / P.out, o = e % P.out, t = o / P.l, j = o % P.l;
    const float* hr = hs + b * P.mid + j;
    const T* wr = w2 + (j * P.s + t) * P.r;
    float acc = 0.f;
    for (int64_t m = 0; m < P.r; ++m) acc = fmaf(hr[m * P.l], to_f32(wr[m]), acc);
    y[t0 * P.out + e] = from_f32<T>(acc);
  }
}

}  // namespace peftcore::blockdiag::cuda::kernels
