// orthogonal CUDA kernel templates (no torch headers; instantiated in orthogonal.cu).
//
// One CUDA block per b x b matrix (b <= 64), kThreads threads striding over the b*b elements of fp32 tiles in
// dynamic shared memory; every tile step ends in __syncthreads. The small-matrix work is O(b^3) per block, so
// the grid (nb blocks) gives the parallelism; global memory is touched once on load and once on store.
//   cayley_kernel            Gauss-Jordan on (I + S) X = (I - S): pivot row found by thread 0, row swap,
//                            normalisation and elimination in parallel (the column of factors copied first)
//   cayley_backward_kernel   P = I + R; gS = -1/2 P^T (G P^T); out = (gS - gS^T)/2
//   neumann_kernel           Horner R = c_top I; R = R S + c_k I
//   neumann_backward_kernel  H_1 = G; H_{k+1} = H_k S^T + (S^T)^k G; gS = sum c_k H_k; out = (gS - gS^T)/2
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda_common.cuh"

#include <cstdint>

namespace peftcore::orthogonal::cuda::kernels {

constexpr int kThreads = 256;
constexpr int kMaxCoef = 66;

struct Coef {
  float c[kMaxCoef];
  int n;
};

using peftcore::cuda_common::from_f32;
using peftcore::cuda_common::to_f32;

// C = op(A) op(B) for b x b tiles in smem (C distinct from A and B); ends synchronised.
// With B transposed, a warp's lanes (consecutive j, mostly one row i) would read B[j * b + k] at a stride of b
// words: one bank for b a multiple of 32, a 32-way conflict. There each thread starts its k loop at j (mod b):
// lane j reads A[i][(k + j) % b] and B[j][(k + j) % b], distinct banks for every b (b = 16 / 32 / 64 checked by
// hand: bank = (k + j) % 32 up to the row offsets). The sum's order then depends on j, still fixed per element.
__device__ __forceinline__ void tile_mm(const float* A, const float* B, float* C, int b, bool ta, bool tb) {
  for (int e = threadIdx.x; e < b * b; e += blockDim.x) {
    const int i = e / b, j = e % b;
    float s = 0.f;
    if (tb && !ta) {
      const float* a = A + i * b;
      const float* bt = B + j * b;
      int k = j;
      for (int n = 0; n < b; ++n) {
        s += a[k] * bt[k];
        if (++k == b) k = 0;
      }
    } else {
      for (int k = 0; k < b; ++k) s += (ta ? A[k * b + i] : A[i * b + k]) * (tb ? B[j * b + k] : B[k * b + j]);
    }
    C[e] = s;
  }
  __syncthreads();
}

template <typename T>
__device__ __forceinline__ void load_skew(const T* a, float* S, int b) {
  for (int e = threadIdx.x; e < b * b; e += blockDim.x) {
    const int i = e / b, j = e % b;
    S[e] = 0.5f * (to_f32(a[i * b + j]) - to_f32(a[j * b + i]));
  }
  __syncthreads();
}

template <typename T>
__device__ __forceinline__ void store_skew(const float* gS, T* out, int b) {
  for (int e = threadIdx.x; e < b * b; e += blockDim.x) {
    const int i = e / b, j = e % b;
    out[e] = from_f32<T>(0.5f * (gS[i * b + j] - gS[j * b + i]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) cayley_kernel(const T* __restrict__ params, T* __restrict__ out, int b) {
  extern __shared__ float sm[];
  float *M = sm, *X = sm + b * b, *f = sm + 2 * b * b;
  __shared__ int piv;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * b * b;
  load_skew(params + base, X, b);
  for (int e = threadIdx.x; e < b * b; e += blockDim.x) {
    const float d = (e / b == e % b) ? 1.f : 0.f;
    M[e] = d + X[e];
    X[e] = d - X[e];
  }
  __syncthreads();
  for (int k = 0; k < b; ++k) {
    if (threadIdx.x == 0) {
      int p = k;
      for (int i = k + 1; i < b; ++i)
        if (fabsf(M[i * b + k]) > fabsf(M[p * b + k])) p = i;
      piv = p;
    }
    __syncthreads();
    const int p = piv;
    if (p != k)
      for (int j = threadIdx.x; j < b; j += blockDim.x) {
        float t = M[k * b + j]; M[k * b + j] = M[p * b + j]; M[p * b + j] = t;
        t = X[k * b + j]; X[k * b + j] = X[p * b + j]; X[p * b + j] = t;
      }
    __syncthreads();
    const float inv = 1.f / M[k * b + k];
    __syncthreads();
    for (int j = threadIdx.x; j < b; j += blockDim.x) {
      M[k * b + j] *= inv;
      X[k * b + j] *= inv;
    }
    for (int i = threadIdx.x; i < b; i += blockDim.x) f[i] = (i == k) ? 0.f : M[i * b + k];
    __syncthreads();
    for (int e = threadIdx.x; e < b * b; e += blockDim.x) {
      const int i = e / b, j = e % b;
      if (i == k) continue;
      M[e] -= f[i] * M[k * b + j];
      X[e] -= f[i] * X[k * b + j];
    }
    __syncthreads();
  }
  for (int e = threadIdx.x; e < b * b; e += blockDim.x) out[base + e] = from_f32<T>(X[e]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    cayley_backward_kernel(const T* __restrict__ grad, const T* __restrict__ R, T* __restrict__ out, int b) {
  extern __shared__ float sm[];
  float *P = sm, *G = sm + b * b, *T1 = sm + 2 * b * b, *gS = sm + 3 * b * b;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * b * b;
  for (int e = threadIdx.x; e < b * b; e += blockDim.x) {
    P[e] = to_f32(R[base + e]) + ((e / b == e % b) ? 1.f : 0.f);
    G[e] = to_f32(grad[base + e]);
  }
  __syncthreads();
  tile_mm(G, P, T1, b, false, true);
  tile_mm(P, T1, gS, b, true, false);
  for (int e = threadIdx.x; e < b * b; e += blockDim.x) {
    const int i = e / b, j = e % b;
    out[base + e] = from_f32<T>(-0.25f * (gS[i * b + j] - gS[j * b + i]));
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    neumann_kernel(const T* __restrict__ params, T* __restrict__ out, int b, Coef coef) {
  extern __shared__ float sm[];
  float *S = sm, *Rm = sm + b * b, *Tm = sm + 2 * b * b;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * b * b;
  load_skew(params + base, S, b);
  const int top = coef.n - 1;
  for (int e = threadIdx.x; e < b * b; e += blockDim.x) Rm[e] = (e / b == e % b) ? coef.c[top] : 0.f;
  __syncthreads();
  for (int k = top - 1; k >= 0; --k) {
    tile_mm(Rm, S, Tm, b, false, false);
    for (int e = threadIdx.x; e < b * b; e += blockDim.x) Rm[e] = Tm[e] + ((e / b == e % b) ? coef.c[k] : 0.f);
    __syncthreads();
  }
  for (int e = threadIdx.x; e < b * b; e += blockDim.x) out[base + e] = from_f32<T>(Rm[e]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) neumann_backward_kernel(const T* __restrict__ grad,
                                                                    const T* __restrict__ params,
                                                                    T* __restrict__ out, int b, Coef coef) {
  extern __shared__ float sm[];
  float *S = sm, *G = sm + b * b, *H = sm + 2 * b * b, *Pk = sm + 3 * b * b, *Tm = sm + 4 * b * b,
        *gS = sm + 5 * b * b;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * b * b;
  load_skew(params + base, S, b);
  for (int e = threadIdx.x; e < b * b; e += blockDim.x) {
    G[e] = to_f32(grad[base + e]);
    H[e] = G[e];
    gS[e] = 0.f;
    Pk[e] = (e / b == e % b) ? 1.f : 0.f;
  }
  __syncthreads();
  const int top = coef.n - 1;
  for (int k = 1; k <= top; ++k) {
    for (int e = threadIdx.x; e < b * b; e += blockDim.x) gS[e] += coef.c[k] * H[e];
    __syncthreads();
    if (k == top) break;
    tile_mm(Pk, S, Tm, b, false, true);  // (S^T)^k
    for (int e = threadIdx.x; e < b * b; e += blockDim.x) Pk[e] = Tm[e];
    __syncthreads();
    tile_mm(H, S, Tm, b, false, true);   // H S^T
    for (int e = threadIdx.x; e < b * b; e += blockDim.x) H[e] = Tm[e];
    __syncthreads();
    tile_mm(Pk, G, Tm, b, false, false);  // (S^T)^k G
    for (int e = threadIdx.x; e < b * b; e += blockDim.x) H[e] += Tm[e];
    __syncthreads();
  }
  store_skew(gS, out + base, b);
}

}  // namespace peftcore::orthogonal::cuda::kernels
