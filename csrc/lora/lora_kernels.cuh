// lora CUDA-core kernels (the gathered forms: any pair order, any ranks; lora_launch.h has the contracts).
// Plain CUDA (no torch headers), included by lora.cu only. Math in fp32, one rounding per stored element.
//
// shrink_gathered   one CTA of 4 warps per (pair, slice of rows): a warp takes row m of A_i and reduces
//                   x[t] . A_i[m] over `in` with 16-byte loads (V elements per lane), then shuffles the sum.
//                   A decode batch (one token per request) reads each used adapter's A_i once per pair: the
//                   adapters' bytes plus x, memory-bound (Punica's BGMV shrink).
// expand_gathered   one thread per (token, output column o) sums its token's slots: for B_i, row o of B_i is
//                   r_i contiguous elements (16-byte loads when aligned); for A_i^T (the gradient of x) column o
//                   of A_i, coalesced over the threads. No atomics: the thread owns y[t, o].
// expand_t_gathered one CTA of 256 threads per pair: each thread sums g[t, o] B_i[o, m0 .. m0+16) over its
//                   columns o, then a shuffle + shared-memory reduction gives the 16 values of the chunk.
// segment_outer     one CTA per (adapter, chunk of 16 rank rows) x 128 columns: walks the adapter's pairs in the
//                   sorted order (deterministic sums; the gradients of A and B), no atomics.
// pair_dot          one warp per pair (the gradient of the token weights).
#pragma once
#include "cuda_common.cuh"
#include "lora/lora_dropout.h"
#include "lora/lora_launch.h"

namespace peftcore::lora::cuda::kernels {

using namespace ::peftcore::cuda_common;

struct Adapter {
  int64_t i, off, r;
};

// Pair p's adapter and its packed columns; false when the pair has none or the adapter's values are invalid.
__device__ __forceinline__ bool adapter_of(const Pairs& pr, int64_t p, Adapter& a) {
  const int64_t i = pr.ta[p];
  if (i < 0 || i >= pr.N) return false;
  const int64_t o0 = pr.offsets[i], o1 = pr.offsets[i + 1];
  if (o0 < 0 || o1 > pr.R || o1 <= o0) return false;
  a = Adapter{i, o0, o1 - o0};
  return true;
}

__device__ __forceinline__ float token_weight(const Pairs& pr, int64_t p) {
  switch (pr.tw_dtype) {
    case DType::kFloat16: return to_f32(static_cast<const __half*>(pr.tw)[p]);
    case DType::kBFloat16: return to_f32(static_cast<const __nv_bfloat16*>(pr.tw)[p]);
    default: return static_cast<const float*>(pr.tw)[p];
  }
}

// ws(p) of lora_launch.h.
__device__ __forceinline__ float weight_of(const Pairs& pr, int64_t p, int64_t i) {
  float w = pr.scales != nullptr ? pr.scales[i] : 1.f;
  if (pr.tw != nullptr) w *= token_weight(pr, p);
  return w;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) v += __shfl_xor_sync(0xffffffffu, v, s);
  return v;
}

constexpr int kShrinkWarps = 4;

template <typename T, typename HT, int V>
__global__ void __launch_bounds__(32 * kShrinkWarps) shrink_gathered_kernel(const T* __restrict__ x, int64_t ldx,
                                                                            const T* __restrict__ a, int64_t in,
                                                                            const Pairs pr, HT* __restrict__ h,
                                                                            bool weighted) {
  const int64_t p = blockIdx.x;
  Adapter ad;
  if (!adapter_of(pr, p, ad)) return;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const T* xt = x + (p / pr.k) * ldx;
  const float f = weighted ? weight_of(pr, p, ad.i) : 1.f;
  for (int64_t m = static_cast<int64_t>(blockIdx.y) * kShrinkWarps + warp; m < ad.r;
       m += static_cast<int64_t>(gridDim.y) * kShrinkWarps) {
    const T* am = a + (ad.off + m) * in;
    float s = 0.f;
    for (int64_t c = static_cast<int64_t>(lane) * V; c < in; c += 32 * V) {
      const Vec<T, V> xv = load_vec<T, V>(xt + c);
      const Vec<T, V> av = load_vec<T, V>(am + c);
#pragma unroll
      for (int q = 0; q < V; ++q) s += to_f32(xv.v[q]) * to_f32(av.v[q]);
    }
    s = warp_sum(s);
    if (lane == 0) h[p * pr.R + ad.off + m] = from_f32<HT>(f * s);
  }
}

constexpr int kExpandThreads = 128;

// sum_m h[m] * mat[m * sm] over m < r (16-byte loads of mat when sm == 1 and the address allows).
template <typename T, typename HT, int V>
__device__ __forceinline__ float dot_strided(const HT* __restrict__ h, const T* __restrict__ mat, int64_t sm,
                                             int64_t r, bool vec_ok) {
  float s = 0.f;
  int64_t m = 0;
  if (V > 1 && sm == 1 && vec_ok && (reinterpret_cast<uintptr_t>(mat) % 16) == 0) {
    for (; m + V <= r; m += V) {
      const Vec<T, V> mv = load_vec<T, V>(mat + m);
#pragma unroll
      for (int q = 0; q < V; ++q) s += to_f32(h[m + q]) * to_f32(mv.v[q]);
    }
  }
  for (; m < r; ++m) s += to_f32(h[m]) * to_f32(mat[m * sm]);
  return s;
}

template <typename T, typename HT, typename YT>
__global__ void __launch_bounds__(kExpandThreads) expand_gathered_kernel(const HT* __restrict__ h,
                                                                         const T* __restrict__ mat, int64_t so,
                                                                         int64_t sm, int64_t cols, const Pairs pr,
                                                                         YT* __restrict__ y, int64_t ldy,
                                                                         bool accumulate, bool weighted,
                                                                         bool vec_ok) {
  const int64_t t = blockIdx.x;
  const int64_t o = static_cast<int64_t>(blockIdx.y) * kExpandThreads + threadIdx.x;
  if (o >= cols) return;
  float acc = 0.f;
  for (int64_t j = 0; j < pr.k; ++j) {
    const int64_t p = t * pr.k + j;
    Adapter ad;
    if (!adapter_of(pr, p, ad)) continue;
    const float s = dot_strided<T, HT, kVec16<T>>(h + p * pr.R + ad.off, mat + o * so + ad.off * sm, sm, ad.r,
                                                  vec_ok);
    acc += (weighted ? weight_of(pr, p, ad.i) : 1.f) * s;
  }
  YT* yp = y + t * ldy + o;
  *yp = accumulate ? from_f32<YT>(to_f32(*yp) + acc) : from_f32<YT>(acc);
}

constexpr int kExpandTThreads = 256, kChunkM = 16;

template <typename T>
__global__ void __launch_bounds__(kExpandTThreads) expand_t_gathered_kernel(const T* __restrict__ g, int64_t ldg,
                                                                            const T* __restrict__ b, int64_t out,
                                                                            const Pairs pr, float* __restrict__ u,
                                                                            bool weighted) {
  __shared__ float red[kExpandTThreads / 32][kChunkM];
  const int64_t p = blockIdx.x;
  Adapter ad;
  if (!adapter_of(pr, p, ad)) return;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const T* gt = g + (p / pr.k) * ldg;
  const float f = weighted ? weight_of(pr, p, ad.i) : 1.f;
  for (int64_t m0 = 0; m0 < ad.r; m0 += kChunkM) {
    const int nm = static_cast<int>(ad.r - m0 < kChunkM ? ad.r - m0 : kChunkM);
    float acc[kChunkM];
#pragma unroll
    for (int q = 0; q < kChunkM; ++q) acc[q] = 0.f;
    for (int64_t o = threadIdx.x; o < out; o += kExpandTThreads) {
      const float gv = to_f32(gt[o]);
      const T* bp = b + o * pr.R + ad.off + m0;
#pragma unroll
      for (int q = 0; q < kChunkM; ++q)
        if (q < nm) acc[q] += gv * to_f32(bp[q]);
    }
#pragma unroll
    for (int q = 0; q < kChunkM; ++q) {
      const float v = warp_sum(acc[q]);
      if (lane == 0) red[warp][q] = v;
    }
    __syncthreads();
    if (threadIdx.x < static_cast<unsigned>(nm)) {
      float s = 0.f;
#pragma unroll
      for (int w = 0; w < kExpandTThreads / 32; ++w) s += red[w][threadIdx.x];
      u[p * pr.R + ad.off + m0 + threadIdx.x] = f * s;
    }
    __syncthreads();
  }
}

constexpr int kSegmentThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kSegmentThreads) segment_outer_kernel(const float* __restrict__ u,
                                                                        const T* __restrict__ v, int64_t ldv,
                                                                        int64_t cols,
                                                                        const int64_t* __restrict__ perm,
                                                                        const int64_t* __restrict__ starts,
                                                                        const Pairs pr, T* __restrict__ dst,
                                                                        int64_t sdm, int64_t sdc) {
  // This CTA's (adapter, chunk of kChunkM rank rows): the chunks of the valid adapters, in adapter order.
  int64_t b = blockIdx.x, i = 0, off = 0, r = 0, m0 = -1;
  for (; i < pr.N; ++i) {
    const int64_t o0 = pr.offsets[i], o1 = pr.offsets[i + 1];
    if (o0 < 0 || o1 > pr.R || o1 <= o0) continue;
    const int64_t chunks = (o1 - o0 + kChunkM - 1) / kChunkM;
    if (b < chunks) {
      off = o0;
      r = o1 - o0;
      m0 = b * kChunkM;
      break;
    }
    b -= chunks;
  }
  if (m0 < 0) return;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kSegmentThreads + threadIdx.x;
  if (c >= cols) return;
  const int nm = static_cast<int>(r - m0 < kChunkM ? r - m0 : kChunkM);
  float acc[kChunkM];
#pragma unroll
  for (int q = 0; q < kChunkM; ++q) acc[q] = 0.f;
  const int64_t q1 = starts[i + 1];
  for (int64_t q0 = starts[i]; q0 < q1; ++q0) {
    const int64_t p = perm[q0];
    const float vc = to_f32(v[(p / pr.k) * ldv + c]);
    const float* up = u + p * pr.R + off + m0;
#pragma unroll
    for (int q = 0; q < kChunkM; ++q)
      if (q < nm) acc[q] += up[q] * vc;
  }
#pragma unroll
  for (int q = 0; q < kChunkM; ++q)
    if (q < nm) dst[(off + m0 + q) * sdm + c * sdc] = from_f32<T>(acc[q]);
}

template <typename OT>
__global__ void __launch_bounds__(128) pair_dot_kernel(const float* __restrict__ u, const float* __restrict__ w,
                                                       const Pairs pr, OT* __restrict__ out) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  if (p >= pr.T * pr.k) return;
  Adapter ad;
  float s = 0.f;
  const bool valid = adapter_of(pr, p, ad);
  if (valid)
    for (int64_t m = lane; m < ad.r; m += 32) s += u[p * pr.R + ad.off + m] * w[p * pr.R + ad.off + m];
  s = warp_sum(s);
  if (lane == 0) out[p] = from_f32<OT>(valid ? pr.scales[ad.i] * s : 0.f);
}

template <typename T>
__global__ void dropout_kernel(const T* __restrict__ src, float* dst, int64_t n, int64_t e0,
                               const int64_t* __restrict__ seed, uint32_t threshold, float inv_keep) {
  const uint64_t s = static_cast<uint64_t>(*seed);
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[e] = keep_element(s, static_cast<uint64_t>(e0 + e), threshold) ? to_f32(src[e]) * inv_keep : 0.f;
}

}  // namespace peftcore::lora::cuda::kernels
