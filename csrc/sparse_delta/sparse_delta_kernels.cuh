// sparse_delta CUDA kernel templates (no torch headers; instantiated in sparse_delta.cu).
//
// Notation. Activations are row-major [T, features]; S is [out, in] in CSR form: row_ptr [out+1] (int64), flat
// indices idx[k] = r*in + c (int32|int64, sorted, unique), values val[k] (fp32). A nonzero whose column
// c = idx[k] - r*in falls outside [0, in) is skipped, so malformed indices never index out of bounds.
// All arithmetic is fp32 (DType T is float, __half or __nv_bfloat16; loads convert, stores round once).
//
// Every kernel runs 256 threads (8 warps) and works on a *token tile* of TT tokens (TT in {1,4,8,16}, a
// template parameter, so per-token accumulators live in registers). A warp walks one row r of S at a time, its
// 32 lanes striding over the row's nonzeros [row_ptr[r], row_ptr[r+1]).
//
//  spmm_kernel     y[t, r] += scale * sum_k val[k] * x[t, c_k]                       (forward, x S^T)
//    block = (token tile, chunk of rows). The tile of x is staged once in shared memory *transposed*,
//    xs[c][0..TT) in T, so the gather of one nonzero is one contiguous TT-vector (<= 2 x 16-byte loads); the
//    tile is reused by every row of the chunk. Each lane accumulates TT partial sums for its nonzeros; the warp
//    reduces them with a butterfly reduce-scatter (TT + log2(32/TT) shuffles, not TT*5), the row's TT results
//    go to ys[t][row] (fp32, smem) and every kRowChunk rows the block writes y coalesced along r
//    (read-modify-write: y already holds x W^T). If even a 1-token tile of x does not fit in shared memory,
//    the kStaged=false instance reads x straight from global memory (TT = 1).
//  spmm_t_kernel   gx[t, c] += scale * sum_{k: c_k = c} val[k] * g[t, r_k]               (grad_x, g S)
//    block = (token tile, chunk of columns [c0, c0+cw)). An fp32 accumulator acc[c - c0][0..TT) (row stride
//    TT|1 to avoid bank conflicts on the flush) lives in shared memory; g[t, r] for kRowChunk rows is staged
//    in shared memory (coalesced along r). Every block walks all nonzeros, keeps those in its column chunk and
//    adds val*g[t, r] with shared-memory atomics (fp32; the summation order inside a block can vary between
//    runs, so results are deterministic only up to fp32 rounding; under torch.use_deterministic_algorithms the
//    glue runs spmm_kernel on S^T instead). Finally gx[t, c0..c0+cw) += scale*acc,
//    coalesced. Column chunks exist both to fit shared memory (large in) and to give few-token inputs more
//    blocks. No global scratch.
//  sddmm_kernel    out[k] += scale * sum_t g[t, r_k] * x[t, c_k]                         (values' gradient)
//    block = (chunk of rows, split of the token tiles). For each token tile: x staged transposed as in spmm
//    (xs[c][TT]), g staged as gs[t][r - r0] fp32 for the block's rows; one lane owns one nonzero and takes the
//    TT-long dot product gs[:][r] . xs[c][:], so g[t, r] is loaded once per (tile, row) and reused across the row's
//    nonzeros. Partial sums go straight to out (fp32): a plain read-modify-write when one block owns all tokens
//    of the row chunk (deterministic; always so in deterministic mode), atomicAdd when tokens are split across
//    blocks for parallelism.
//  merge_kernel    w[r, c_k] += scale * val[k]; one thread per nonzero (r from idx / in; entries outside
//    [0, out*in) are skipped).
//  abs_kernel / exclude_kernel   out = |tile|, then out[e - flat0] = -1 for every excluded flat position e
//    that falls in the tile (two launches, no search).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace peftcore::sparse_delta::cuda::kernels {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kRowChunk = 256;  // rows of S per flush (spmm) / per g stage (spmm_t)

// The index width is a run-time flag rather than a template parameter: the branch is uniform across the grid
// (free next to the load it guards) and it halves the number of kernel instances to compile.
struct Csr {
  const void* idx;  // int32 or int64 [nnz]
  bool idx64;
  const int64_t* row_ptr;
  const float* val;
  int64_t out;
  int64_t in;
  float scale;
  __device__ __forceinline__ int64_t index(int64_t k) const {
    return idx64 ? static_cast<const int64_t*>(idx)[k] : int64_t(static_cast<const int32_t*>(idx)[k]);
  }
};

// ---- scalar conversions ----
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__device__ __forceinline__ T zero_v() { return from_f<T>(0.f); }

// ---- TT-wide vectors of T in shared memory (p aligned to TT*sizeof(T) bytes, or 16 when larger) ----
template <int BYTES>
struct Chunk;  // the widest single load that holds BYTES (or 16)
template <> struct Chunk<2> { using type = unsigned short; };
template <> struct Chunk<4> { using type = unsigned int; };
template <> struct Chunk<8> { using type = uint2; };
template <> struct Chunk<16> { using type = uint4; };

template <typename T, int TT>
struct Vec {
  static constexpr int kBytes = TT * int(sizeof(T));
  static constexpr int kChunk = kBytes < 16 ? kBytes : 16;
  static constexpr int kN = kBytes / kChunk;
  using C = typename Chunk<kChunk>::type;
  union {
    C c[kN];
    T v[TT];
  };
  __device__ __forceinline__ void load(const T* p) {
#pragma unroll
    for (int i = 0; i < kN; ++i) c[i] = reinterpret_cast<const C*>(p)[i];
  }
  __device__ __forceinline__ void store(T* p) const {
#pragma unroll
    for (int i = 0; i < kN; ++i) reinterpret_cast<C*>(p)[i] = c[i];
  }
};

// Butterfly reduce-scatter of a[0..TT) over the warp: afterwards lane L holds in a[0] the warp-wide sum of
// a[tok(L)], tok(L) = the top log2(TT) bits of L's 5-bit lane id read MSB-first; lanes whose low 5-log2(TT)
// bits are zero hold distinct tokens. Costs TT-1 + 5-log2(TT) shuffles.
template <int TT>
__device__ __forceinline__ void warp_reduce_scatter(float (&a)[TT], int lane) {
  int off = 16;
#pragma unroll
  for (int n = TT; n > 1; n /= 2) {
    const int h = n / 2;
    const bool upper = (lane & off) != 0;
#pragma unroll
    for (int i = 0; i < h; ++i) {
      const float send = upper ? a[i] : a[i + h];
      const float keep = upper ? a[i + h] : a[i];
      a[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
    }
    off >>= 1;
  }
  for (; off > 0; off >>= 1) a[0] += __shfl_xor_sync(0xffffffffu, a[0], off);
}

template <int TT>
__device__ __forceinline__ int scatter_token(int lane) {
  int tok = 0, bit = 16;
#pragma unroll
  for (int n = TT; n > 1; n /= 2) {
    tok = tok * 2 + ((lane & bit) ? 1 : 0);
    bit >>= 1;
  }
  return tok;
}
template <int TT>
__device__ __forceinline__ bool scatter_owner(int lane) {
  constexpr int lowbits = 32 / TT;  // lanes per token group
  return (lane & (lowbits - 1)) == 0;
}

// Stage x[t0 .. t0+TT, 0..in) transposed into xs[c*TT + t] (zero for tokens past nt). One thread per column:
// TT coalesced global loads (along c across the block), one vector store.
template <typename T, int TT>
__device__ __forceinline__ void stage_transposed(const T* __restrict__ x, int64_t ld, int64_t t0, int nt,
                                                 int64_t cols, T* xs) {
  for (int64_t c = threadIdx.x; c < cols; c += kThreads) {
    Vec<T, TT> v;
#pragma unroll
    for (int t = 0; t < TT; ++t) v.v[t] = t < nt ? x[(t0 + t) * ld + c] : zero_v<T>();
    v.store(xs + c * TT);
  }
}

// ------------------------------------------------------------------------------------------------------------
// spmm: y[t, r] += scale * sum_k val[k] * x[t, c_k]. grid = (token tiles, row chunks of rows_per_block).
// smem: xs [in][TT] T (kStaged only), then ys [TT][kRowChunk] fp32.
template <typename T, int TT, bool kStaged>
__global__ void __launch_bounds__(kThreads, 2) spmm_kernel(Csr s, const T* __restrict__ x, T* __restrict__ y,
                                                        int64_t tokens, int64_t rows_per_block) {
  static_assert(kStaged || TT == 1, "the global-memory path runs one token per tile");
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t t0 = int64_t(blockIdx.x) * TT;
  const int nt = int(tokens - t0 < TT ? tokens - t0 : TT);
  const int64_t r_begin = int64_t(blockIdx.y) * rows_per_block;
  const int64_t r_end = r_begin + rows_per_block < s.out ? r_begin + rows_per_block : s.out;
  const int64_t in = s.in;
  T* xs = reinterpret_cast<T*>(smem);
  const size_t xs_bytes = kStaged ? ((size_t(in) * TT * sizeof(T) + 15) / 16) * 16 : 0;
  float* ys = reinterpret_cast<float*>(smem + xs_bytes);
  if constexpr (kStaged) {
    stage_transposed<T, TT>(x, in, t0, nt, in, xs);
    __syncthreads();
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t rc0 = r_begin; rc0 < r_end; rc0 += kRowChunk) {
    const int nr = int(r_end - rc0 < kRowChunk ? r_end - rc0 : kRowChunk);
    for (int rr = warp; rr < nr; rr += kWarps) {
      const int64_t r = rc0 + rr;
      const int64_t kb = s.row_ptr[r], ke = s.row_ptr[r + 1];
      const int64_t base = r * in;
      float acc[TT];
#pragma unroll
      for (int t = 0; t < TT; ++t) acc[t] = 0.f;
      for (int64_t k = kb + lane; k < ke; k += 32) {
        const int64_t c = s.index(k) - base;
        if (c < 0 || c >= in) continue;
        const float v = s.val[k];
        if constexpr (kStaged) {
          Vec<T, TT> xv;
          xv.load(xs + c * TT);
#pragma unroll
          for (int t = 0; t < TT; ++t) acc[t] = fmaf(v, to_f(xv.v[t]), acc[t]);
        } else {
          acc[0] = fmaf(v, to_f(x[t0 * in + c]), acc[0]);
        }
      }
      warp_reduce_scatter<TT>(acc, lane);
      if (scatter_owner<TT>(lane)) ys[scatter_token<TT>(lane) * kRowChunk + rr] = acc[0];
    }
    __syncthreads();
    for (int i = threadIdx.x; i < nt * kRowChunk; i += kThreads) {
      const int t = i / kRowChunk, rr = i % kRowChunk;
      if (rr < nr) {
        T& dst = y[(t0 + t) * s.out + rc0 + rr];
        dst = from_f<T>(fmaf(s.scale, ys[t * kRowChunk + rr], to_f(dst)));
      }
    }
    __syncthreads();
  }
}

// ------------------------------------------------------------------------------------------------------------
// spmm_t: gx[t, c] += scale * sum_{k: c_k = c} val[k] * g[t, r_k]. grid = (token tiles, column chunks of cw).
// smem: acc [cw][TT|1] fp32, then gs [TT][kRowChunk] fp32 (a warp reads one row's TT values as broadcasts).
template <typename T, int TT>
__global__ void __launch_bounds__(kThreads, 2) spmm_t_kernel(Csr s, const T* __restrict__ g, T* __restrict__ gx,
                                                          int64_t tokens, int64_t cw) {
  constexpr int TP = TT | 1;
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t t0 = int64_t(blockIdx.x) * TT;
  const int nt = int(tokens - t0 < TT ? tokens - t0 : TT);
  const int64_t in = s.in, out = s.out;
  const int64_t c0 = int64_t(blockIdx.y) * cw;
  const int64_t ncol = in - c0 < cw ? in - c0 : cw;
  float* acc = reinterpret_cast<float*>(smem);
  float* gs = acc + ((cw * TP + 3) / 4) * 4;
  for (int64_t i = threadIdx.x; i < ncol * TP; i += kThreads) acc[i] = 0.f;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t rc0 = 0; rc0 < out; rc0 += kRowChunk) {
    const int nr = int(out - rc0 < kRowChunk ? out - rc0 : kRowChunk);
    __syncthreads();  // acc zeroed / previous chunk's gs consumed
    for (int i = threadIdx.x; i < TT * kRowChunk; i += kThreads) {
      const int t = i / kRowChunk, rr = i % kRowChunk;
      gs[t * kRowChunk + rr] = (t < nt && rr < nr) ? to_f(g[(t0 + t) * out + rc0 + rr]) : 0.f;
    }
    __syncthreads();
    for (int rr = warp; rr < nr; rr += kWarps) {
      const int64_t r = rc0 + rr;
      const int64_t kb = s.row_ptr[r], ke = s.row_ptr[r + 1];
      const int64_t lo = r * in + c0;  // entries of this row inside the column chunk: lo <= idx < lo + ncol
      float gr[TT];
#pragma unroll
      for (int t = 0; t < TT; ++t) gr[t] = gs[t * kRowChunk + rr];
      for (int64_t k = kb + lane; k < ke; k += 32) {
        const int64_t cc = s.index(k) - lo;
        if (cc < 0 || cc >= ncol) continue;
        const float v = s.val[k];
        float* a = acc + cc * TP;
#pragma unroll
        for (int t = 0; t < TT; ++t) atomicAdd(a + t, v * gr[t]);
      }
    }
  }
  __syncthreads();
  for (int t = 0; t < nt; ++t) {
    T* row = gx + (t0 + t) * in + c0;
    for (int64_t cc = threadIdx.x; cc < ncol; cc += kThreads)
      row[cc] = from_f<T>(fmaf(s.scale, acc[cc * TP + t], to_f(row[cc])));
  }
}

// ------------------------------------------------------------------------------------------------------------
// sddmm: out[k] += scale * sum_t g[t, r_k] * x[t, c_k]. grid = (row chunks of rows_per_block, token splits of
// tiles_per_split tiles). smem: xs [in][TT] T (kStaged only), then gs [TT][rows_per_block] fp32.
template <typename T, int TT, bool kStaged>
__global__ void __launch_bounds__(kThreads, 2) sddmm_kernel(Csr s, const T* __restrict__ g,
                                                         const T* __restrict__ x, float* __restrict__ out,
                                                         int64_t tokens, int64_t rows_per_block,
                                                         int64_t tiles_per_split, bool atomic) {
  static_assert(kStaged || TT == 1, "the global-memory path runs one token per tile");
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t in = s.in, nout = s.out;
  const int64_t r0 = int64_t(blockIdx.x) * rows_per_block;
  const int nr = int(nout - r0 < rows_per_block ? nout - r0 : rows_per_block);
  const int64_t ntiles = (tokens + TT - 1) / TT;
  const int64_t tile_b = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t tile_e = tile_b + tiles_per_split < ntiles ? tile_b + tiles_per_split : ntiles;
  T* xs = reinterpret_cast<T*>(smem);
  const size_t xs_bytes = kStaged ? ((size_t(in) * TT * sizeof(T) + 15) / 16) * 16 : 0;
  float* gs = reinterpret_cast<float*>(smem + xs_bytes);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t tile = tile_b; tile < tile_e; ++tile) {
    const int64_t t0 = tile * TT;
    const int nt = int(tokens - t0 < TT ? tokens - t0 : TT);
    if (tile != tile_b) __syncthreads();  // previous tile's smem consumed
    if constexpr (kStaged) stage_transposed<T, TT>(x, in, t0, nt, in, xs);
    for (int64_t i = threadIdx.x; i < int64_t(TT) * nr; i += kThreads) {
      const int t = int(i / nr);
      const int rr = int(i - int64_t(t) * nr);
      gs[t * nr + rr] = t < nt ? to_f(g[(t0 + t) * nout + r0 + rr]) : 0.f;
    }
    __syncthreads();
    for (int rr = warp; rr < nr; rr += kWarps) {
      const int64_t r = r0 + rr;
      const int64_t kb = s.row_ptr[r], ke = s.row_ptr[r + 1];
      const int64_t base = r * in;
      float gr[TT];
#pragma unroll
      for (int t = 0; t < TT; ++t) gr[t] = gs[t * nr + rr];
      for (int64_t k = kb + lane; k < ke; k += 32) {
        const int64_t c = s.index(k) - base;
        if (c < 0 || c >= in) continue;
        float d = 0.f;
        if constexpr (kStaged) {
          Vec<T, TT> xv;
          xv.load(xs + c * TT);
#pragma unroll
          for (int t = 0; t < TT; ++t) d = fmaf(gr[t], to_f(xv.v[t]), d);
        } else {
          d = gr[0] * to_f(x[t0 * in + c]);
        }
        if (atomic) atomicAdd(out + k, s.scale * d);
        else out[k] += s.scale * d;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads, 2) merge_kernel(Csr s, int64_t nnz, T* __restrict__ w) {
  const int64_t k = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (k >= nnz) return;
  const int64_t f = s.index(k);
  if (f < 0 || f >= s.out * s.in) return;
  T& dst = w[f];
  dst = from_f<T>(fmaf(s.scale, s.val[k], to_f(dst)));
}

__global__ void __launch_bounds__(kThreads, 2) abs_kernel(const float* __restrict__ tile, int64_t n,
                                                       float* __restrict__ out) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i < n) out[i] = fabsf(tile[i]);
}

__global__ void __launch_bounds__(kThreads, 2) exclude_kernel(const int64_t* __restrict__ exclude, int64_t n_exclude,
                                                           int64_t flat0, int64_t n, float* __restrict__ out) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= n_exclude) return;
  const int64_t i = exclude[j] - flat0;
  if (i >= 0 && i < n) out[i] = -1.f;
}

}  // namespace peftcore::sparse_delta::cuda::kernels
