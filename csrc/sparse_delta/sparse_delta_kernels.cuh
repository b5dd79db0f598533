// sparse_delta CUDA kernel templates (no torch headers; instantiated in sparse_delta.cu).
//
// Notation. Activations are row-major [T, features]. The kernels walk a CSR matrix M [rows, cols]: row_ptr
// [rows+1] (int64), flat indices idx[k] = r*cols + c (int32|int64, sorted, unique), values val[k] (fp32). M is S
// [out, in] for spmm / sddmm, and S^T [in, out] for grad_x (its CSR is S's CSC: flat c*out + r, built once per
// delta by sparse_delta_csr and passed in, or built per call by the glue; values permuted by gather_kernel).
// Robustness: row_ptr entries are clamped to [0, nnz] and a nonzero whose column c = idx[k] - r*cols falls outside
// [0, cols) is skipped, so malformed indices or a malformed cached CSR give wrong numbers, never an out-of-bounds
// access. All arithmetic is fp32 (T is float, __half or __nv_bfloat16; loads convert, stores round once).
//
// Tiling (the sizes come from the host planner, sparse_delta_plan.h, which also gives the L2-traffic estimate).
// Every kernel runs 256 threads (8 warps) on a tile of TT tokens (TT in {1,4,8,16,32}, a template parameter), a
// block of R rows of M and, one after the other, column chunks of CW columns: the tile of x restricted to a
// chunk is staged in shared memory *transposed*, xs[c][0..TT) in T, so TT no longer shrinks with the input width.
// A warp owns rows rr = warp, warp+8, ... of its block; per row it keeps a cursor (shared memory, int64) into the
// row's nonzeros. Columns ascend within a row, so the nonzeros of a chunk are the next run from the cursor: the
// warp loads 32 of them (one per lane, coalesced), a ballot finds how many of those lie before the chunk's end,
// those are used and the cursor advances; a row costs one extra 32-wide load per chunk, and every nonzero is read
// once per token tile, whatever the number of chunks.
//
//  spmm_kernel     y[t, r] += scale * sum_k val[k] * x[t, c_k]       (forward x S^T; grad_x = g S as spmm on S^T)
//    grid = (token tiles, row blocks). Lane layout: lane = g*TT + t, token t, group g of G = 32/TT: group g takes
//    nonzeros g, g+G, ... of each 32-batch (column and value broadcast by shuffles), so each lane does one FMA per
//    nonzero on xs[c][t] (consecutive lanes read consecutive elements). After a row's chunk the G partial sums of
//    each token are summed with log2(G) xor-shuffles and added to acc[rr][t] (fp32, row stride TT|1, owned by the
//    warp: no atomics). After the last chunk the block writes y coalesced along r (read-modify-write: y already
//    holds x W^T or the dense grad_x). Deterministic: a fixed order per output.
//  sddmm_kernel    out[k] += scale * sum_t g[t, r_k] * x[t, c_k]     (values' gradient)
//    grid = (row blocks, token splits). Per token tile: g[t, r] for the block's rows is staged in acc[rr][t] (fp32),
//    cursors reset; per chunk xs staged as above; one lane owns one nonzero of the 32-batch and takes the TT-long
//    dot product of the row's g (in registers, loaded once per row and chunk) with xs[c][:]. Partial sums go to
//    out (fp32): a plain read-modify-write when one block owns all token tiles of its rows (always so in
//    deterministic mode), atomicAdd when tokens are split across blocks.
//  merge_kernel    w[r, c_k] += scale * val[k]; 4 nonzeros per thread, read with 16-byte loads when the host found
//    indices and values 16-byte aligned (else 4 scalar loads); the flat index is the address, no division. Entries
//    outside [0, out*in) are skipped.
//  gather_kernel   vt[j] = float(val[perm[j]]) (0 for perm[j] outside [0, nnz)): S's values in S^T's order.
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

// The index width is a run-time flag rather than a template parameter: the branch is uniform across the grid
// (free next to the load it guards) and it halves the number of kernel instances to compile.
struct Csr {
  const void* idx;  // int32 or int64 [nnz], flat r*cols + c
  bool idx64;
  const int64_t* row_ptr;  // [rows+1]
  const float* val;        // [nnz] (may be null for sddmm)
  int64_t nnz;
  int64_t rows;
  int64_t cols;
  float scale;
  __device__ __forceinline__ int64_t index(int64_t k) const {
    return idx64 ? static_cast<const int64_t*>(idx)[k] : int64_t(static_cast<const int32_t*>(idx)[k]);
  }
  __device__ __forceinline__ int64_t ptr(int64_t r) const {  // row_ptr[r] clamped to [0, nnz]
    const int64_t v = row_ptr[r];
    return v < 0 ? 0 : (v > nnz ? nnz : v);
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

// Shared-memory carve-up common to spmm and sddmm: xs [cw][TT] T | acc [R][TT|1] fp32 | cur [R] int64.
template <typename T, int TT>
struct Smem {
  T* xs;
  float* acc;
  int64_t* cur;
  __device__ __forceinline__ Smem(unsigned char* base, int rows, int cw) {
    xs = reinterpret_cast<T*>(base);
    const size_t xs_bytes = (size_t(cw) * TT * sizeof(T) + 15) / 16 * 16;
    acc = reinterpret_cast<float*>(base + xs_bytes);
    const size_t acc_bytes = size_t(rows) * (TT | 1) * 4;
    cur = reinterpret_cast<int64_t*>(base + xs_bytes + (acc_bytes + 15) / 16 * 16);
  }
};

// Stage x[t0 .. t0+nt, c0 .. c0+ncol) transposed into xs[c*TT + t] (zero for tokens past nt). One thread per
// column: TT global loads (coalesced along c across the block), stored in 16-byte pieces (a piece's loads, then
// its store, so a 32-token tile does not hold 32 values in registers at once).
template <typename T, int TT>
__device__ __forceinline__ void stage_chunk(const T* __restrict__ x, int64_t ld, int64_t t0, int nt, int64_t c0,
                                            int ncol, T* xs) {
  constexpr int kPiece = int(16 / sizeof(T)) < TT ? int(16 / sizeof(T)) : TT;  // tokens per store
  for (int c = threadIdx.x; c < ncol; c += kThreads) {
    const T* src = x + t0 * ld + c0 + c;
#pragma unroll
    for (int p = 0; p < TT; p += kPiece) {
      Vec<T, kPiece> v;
#pragma unroll
      for (int t = 0; t < kPiece; ++t) v.v[t] = p + t < nt ? src[int64_t(p + t) * ld] : zero_v<T>();
      v.store(xs + c * TT + p);
    }
  }
}

// One 32-wide batch of row r's nonzeros from cursor k: lane j looks at k + j. Returns (through n) how many
// leading lanes lie before the chunk end c_hi (a prefix when columns ascend); the caller uses those and advances
// the cursor by n, and stops the row's walk for this chunk when n < 32. *c_out is the lane's column relative to
// c0, or -1 when the lane is not used (past n, past the row, or a column below c0: malformed input).
__device__ __forceinline__ int batch(const Csr& s, int64_t k, int64_t ke, int64_t base, int64_t c0, int64_t c_hi,
                                     int lane, int* c_out) {
  const int64_t kj = k + lane;
  bool in_chunk = false;
  int cl = -1;
  if (kj < ke) {
    const int64_t c = s.index(kj) - base;
    in_chunk = c < c_hi;
    if (in_chunk && c >= c0) cl = int(c - c0);
  }
  const unsigned ball = __ballot_sync(0xffffffffu, in_chunk);
  const int n = ball == 0xffffffffu ? 32 : __ffs(~ball) - 1;
  *c_out = lane < n ? cl : -1;
  return n;
}

// ------------------------------------------------------------------------------------------------------------
// spmm: y[t, r] += scale * sum_k val[k] * x[t, c_k] on M = s [rows, cols]; x [tokens, cols], y [tokens, rows].
// grid = (token tiles, row blocks of R).
template <typename T, int TT>
__global__ void __launch_bounds__(kThreads, 2) spmm_kernel(Csr s, const T* __restrict__ x, T* __restrict__ y,
                                                        int64_t tokens, int R, int cw) {
  constexpr int TP = TT | 1;
  constexpr int G = 32 / TT;  // nonzero groups per warp
  extern __shared__ __align__(16) unsigned char smem[];
  const Smem<T, TT> sm(smem, R, cw);
  const int64_t t0 = int64_t(blockIdx.x) * TT;
  const int nt = int(tokens - t0 < TT ? tokens - t0 : TT);
  const int64_t r0 = int64_t(blockIdx.y) * R;
  const int nr = int(s.rows - r0 < R ? s.rows - r0 : R);
  const int64_t cols = s.cols;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int t = lane % TT, g = lane / TT;
  for (int i = threadIdx.x; i < nr * TP; i += kThreads) sm.acc[i] = 0.f;
  for (int rr = threadIdx.x; rr < nr; rr += kThreads) sm.cur[rr] = s.ptr(r0 + rr);
  for (int64_t c0 = 0; c0 < cols; c0 += cw) {
    const int ncol = int(cols - c0 < cw ? cols - c0 : cw);
    __syncthreads();  // init visible / previous chunk's xs consumed
    stage_chunk<T, TT>(x, cols, t0, nt, c0, ncol, sm.xs);
    __syncthreads();
    for (int rr = warp; rr < nr; rr += kWarps) {
      const int64_t r = r0 + rr;
      const int64_t ke = s.ptr(r + 1), base = r * cols, c_hi = c0 + ncol;
      int64_t k = sm.cur[rr];
      float a = 0.f;
      for (;;) {
        int cl;
        const int n = batch(s, k, ke, base, c0, c_hi, lane, &cl);
        const float vl = cl >= 0 ? s.val[k + lane] : 0.f;
        for (int i0 = 0; i0 < n; i0 += G) {  // uniform trip count: every lane takes part in the shuffles
          const int i = i0 + g;
          const int src = i < 32 ? i : 31;
          const int c = __shfl_sync(0xffffffffu, cl, src);
          const float v = __shfl_sync(0xffffffffu, vl, src);
          if (i < n && c >= 0) a = fmaf(v, to_f(sm.xs[c * TT + t]), a);
        }
        k += n;
        if (n < 32) break;
      }
#pragma unroll
      for (int off = 16; off >= TT; off /= 2) a += __shfl_xor_sync(0xffffffffu, a, off);
      if (lane < TT) sm.acc[rr * TP + lane] += a;
      __syncwarp();
      if (lane == 0) sm.cur[rr] = k;
    }
  }
  __syncthreads();
  for (int tt = 0; tt < nt; ++tt) {
    T* row = y + (t0 + tt) * s.rows + r0;
    for (int rr = threadIdx.x; rr < nr; rr += kThreads)
      row[rr] = from_f<T>(fmaf(s.scale, sm.acc[rr * TP + tt], to_f(row[rr])));
  }
}

// ------------------------------------------------------------------------------------------------------------
// sddmm: out[k] += scale * sum_t g[t, r_k] * x[t, c_k]; g [tokens, rows], x [tokens, cols].
// grid = (row blocks of R, token splits of tiles_per_split tiles).
template <typename T, int TT>
__global__ void __launch_bounds__(kThreads, 2) sddmm_kernel(Csr s, const T* __restrict__ g,
                                                         const T* __restrict__ x, float* __restrict__ out,
                                                         int64_t tokens, int R, int cw, int64_t tiles_per_split,
                                                         bool atomic) {
  constexpr int TP = TT | 1;
  extern __shared__ __align__(16) unsigned char smem[];
  const Smem<T, TT> sm(smem, R, cw);
  const int64_t rows = s.rows, cols = s.cols;
  const int64_t r0 = int64_t(blockIdx.x) * R;
  const int nr = int(rows - r0 < R ? rows - r0 : R);
  const int64_t ntiles = (tokens + TT - 1) / TT;
  const int64_t tile_b = int64_t(blockIdx.y) * tiles_per_split;
  const int64_t tile_e = tile_b + tiles_per_split < ntiles ? tile_b + tiles_per_split : ntiles;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t tile = tile_b; tile < tile_e; ++tile) {
    const int64_t t0 = tile * TT;
    const int nt = int(tokens - t0 < TT ? tokens - t0 : TT);
    __syncthreads();  // previous tile's acc / cur consumed
#pragma unroll 1
    for (int t = 0; t < TT; ++t)
      for (int rr = threadIdx.x; rr < nr; rr += kThreads)
        sm.acc[rr * TP + t] = t < nt ? to_f(g[(t0 + t) * rows + r0 + rr]) : 0.f;
    for (int rr = threadIdx.x; rr < nr; rr += kThreads) sm.cur[rr] = s.ptr(r0 + rr);
    for (int64_t c0 = 0; c0 < cols; c0 += cw) {
      const int ncol = int(cols - c0 < cw ? cols - c0 : cw);
      if (c0 != 0) __syncthreads();  // previous chunk's xs consumed
      stage_chunk<T, TT>(x, cols, t0, nt, c0, ncol, sm.xs);
      __syncthreads();
      for (int rr = warp; rr < nr; rr += kWarps) {
        const int64_t r = r0 + rr;
        const int64_t ke = s.ptr(r + 1), base = r * cols, c_hi = c0 + ncol;
        float gr[TT];
#pragma unroll
        for (int t = 0; t < TT; ++t) gr[t] = sm.acc[rr * TP + t];
        int64_t k = sm.cur[rr];
        for (;;) {
          int cl;
          const int n = batch(s, k, ke, base, c0, c_hi, lane, &cl);
          if (cl >= 0) {
            Vec<T, TT> xv;
            xv.load(sm.xs + cl * TT);
            float d = 0.f;
#pragma unroll
            for (int t = 0; t < TT; ++t) d = fmaf(gr[t], to_f(xv.v[t]), d);
            if (atomic) atomicAdd(out + k + lane, s.scale * d);
            else out[k + lane] += s.scale * d;
          }
          k += n;
          if (n < 32) break;
        }
        __syncwarp();
        if (lane == 0) sm.cur[rr] = k;
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// merge: w[f_k] += scale * val[k], 4 consecutive nonzeros per thread (kVec: 16-byte loads of indices / values).
template <typename T, typename I, bool kVec>
__global__ void __launch_bounds__(kThreads) merge_kernel(const I* __restrict__ idx, const float* __restrict__ val,
                                                         int64_t nnz, int64_t numel, float scale, T* __restrict__ w) {
  const int64_t k0 = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * 4;
  if (k0 >= nnz) return;
  I f[4];
  float v[4];
  if (kVec && k0 + 4 <= nnz) {
    if constexpr (sizeof(I) == 4) {
      const int4 q = *reinterpret_cast<const int4*>(idx + k0);
      f[0] = q.x, f[1] = q.y, f[2] = q.z, f[3] = q.w;
    } else {
      const longlong2 a = reinterpret_cast<const longlong2*>(idx + k0)[0];
      const longlong2 b = reinterpret_cast<const longlong2*>(idx + k0)[1];
      f[0] = a.x, f[1] = a.y, f[2] = b.x, f[3] = b.y;
    }
    const float4 q = *reinterpret_cast<const float4*>(val + k0);
    v[0] = q.x, v[1] = q.y, v[2] = q.z, v[3] = q.w;
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      f[j] = k0 + j < nnz ? idx[k0 + j] : I(-1);
      v[j] = k0 + j < nnz ? val[k0 + j] : 0.f;
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t fj = int64_t(f[j]);
    if (fj < 0 || fj >= numel) continue;
    T& dst = w[fj];
    dst = from_f<T>(fmaf(scale, v[j], to_f(dst)));
  }
}

// gather: vt[j] = float(val[perm[j]]), 0 where perm[j] is outside [0, nnz).
template <typename V>
__global__ void __launch_bounds__(kThreads) gather_kernel(const int64_t* __restrict__ perm, const V* __restrict__ val,
                                                          int64_t nnz, float* __restrict__ vt) {
  const int64_t j = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= nnz) return;
  const int64_t k = perm[j];
  vt[j] = (k >= 0 && k < nnz) ? to_f(val[k]) : 0.f;
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
