// sparse_attn CUDA kernel templates (no torch headers; instantiated per dtype in sparse_attn_{f32,f16,bf16}.cu
// through sparse_attn_instantiate.cuh).
//
// A first, correctness-first version: shared-memory tiles in fp32 and FMA math (no tensor cores yet).
//
// Tiling. A CTA of kThreads = 128 threads owns one tile of BM query rows (forward, dQ, pool) or BN key rows (dK /
// dV) of one (batch, head). Tiles never straddle a mask block: a query block of bs rows is cut into ceil(bs / BM)
// tiles, a key block into ceil(bs / BN) sub-tiles, so every tile reads one block-mask entry. Masked key blocks
// are skipped whole (the mask row is read from global memory, no host sync); causal (key j visible to query i
// iff j <= i + off: off = 0 top-left, Lk - Lq bottom-right) also skips every key sub-tile starting after the
// tile's last row + off.
// BM = BN = TILE: 64 (D <= 128) or 32 (D = 256) where the device's opt-in shared memory allows, smaller tiles
// otherwise (chosen at run time, sparse_attn_tiles.h). Tiles live in shared memory as fp32 with a row stride of
// D + 1 (BN + 1 for the probability tile) so that the column walks below are free of bank conflicts.
//
// NaN: fmaxf returns the other operand when one is NaN, so the row maxima use nan_max (NaN wins); a row is empty
// only when its sum is exactly 0, so a NaN in q or in a visible key's k gives a NaN row (as SDPA), and the pool
// writes a positive NaN for a block a NaN row sees.
//
// Thread layout. Thread t = 16 ty + tx (ty < 8, tx < 16). In a [BM, BN] score tile it owns rows ty + 8a and
// columns tx + 16b (a < BM / 8, b < BN / 16); the 16 threads of one ty (a half warp) share rows, so row max / sum
// are 16-lane shuffles. In a [rows, D] accumulator it owns rows ty + 8a and columns tx + 16c (c < D / 16).
//
// Math (fp32 throughout, storage dtype only at the loads and the final stores):
//   forward  S = (scale Q) K^T, online softmax per row (running max m, per-thread partial sums l rescaled with
//            the accumulator), P to shared memory, O += P V; out = O / l, lse = m + log l (l = 0: out 0, -inf).
//   delta    Delta_i = dO_i . O_i - dlse_i.
//   dQ       per kept key sub-tile: P = exp(S - lse), dP = dO V^T, dS = P (dP - Delta), dQ += dS K; dQ *= scale.
//   dK, dV   per key sub-tile (K, V resident), over the query heads of the GQA group and the query blocks whose
//            mask entry keeps it (the transposed mask, read in place): dV += P^T dO, dK += dS^T (scale Q).
//            A CTA owns its dK / dV rows: no atomics.
//   pool     pass 1 lse per row (online max / sum over every visible key), pass 2 per key sub-tile
//            max(S - lse) -> exp -> atomicMax into pool[I, J] (non-negative floats order like their bits;
//            a query block of several tiles has several writers).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_common.cuh"
#include "sparse_attn/sparse_attn_launch.h"
#include "sparse_attn/sparse_attn_tiles.h"

namespace peftcore::sparse_attn::cuda::kernels {

using peftcore::cuda_common::from_f32;
using peftcore::cuda_common::to_f32;

constexpr int kThreads = 128;
constexpr int kTX = 16;  // threads along columns
constexpr int kTY = 8;   // threads along rows

template <int D, int TILE>
struct Cfg {
  static constexpr int BM = TILE;
  static constexpr int BN = TILE;
  static constexpr int RM = BM / kTY;  // score-tile rows per thread
  static constexpr int RN = BN / kTX;  // score-tile columns per thread
  static constexpr int RK = BN / kTY;  // key rows per thread in dK / dV
  static constexpr int DC = D / kTX;   // accumulator columns per thread
  static constexpr int LD = D + 1;     // shared row stride of [rows, D] tiles
  static constexpr int LP = BN + 1;    // shared row stride of the [BM, BN] probability tile
  static constexpr int kFwdSmem = (BM * LD + 2 * BN * LD + BM * LP) * 4;
  static constexpr int kBwdSmem = (2 * BM * LD + 2 * BN * LD + BM * LP + 2 * BM) * 4;
  static constexpr int kPoolSmem = (BM * LD + BN * LD) * 4;
  static_assert(D % kTX == 0 && BM % kTY == 0 && BN % kTX == 0, "tile shape");
  static_assert(kFwdSmem == tiles::smem_bytes(tiles::kForward, D, TILE) &&
                    kBwdSmem == tiles::smem_bytes(tiles::kDq, D, TILE) &&
                    kPoolSmem == tiles::smem_bytes(tiles::kPool, D, TILE),
                "the host planner's shared memory sizes must be the kernels'");
};

#define kInf (__int_as_float(0x7f800000))

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// a / b and a % b for 0 <= a, b < 2^32 in 32-bit unsigned arithmetic. A 64-bit division by a run-time value is a
// call to a subroutine whose register saves gave these kernels a stack frame; every quotient here is of lengths,
// block counts or head counts, which the launchers keep below 2^31 - 256 (checked() in sparse_attn_instantiate.cuh).
__device__ __forceinline__ int64_t udiv(int64_t a, int64_t b) {
  return static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b));
}
__device__ __forceinline__ int64_t umod(int64_t a, int64_t b) {
  return static_cast<int64_t>(static_cast<uint32_t>(a) % static_cast<uint32_t>(b));
}

// Tiles of `tile` rows per mask block of bs rows along an axis of length L (bs may exceed L). The launcher's grid
// uses the same count. 32-bit arithmetic: rows < 2^31 - 256 (the launchers' checked()).
__host__ __device__ __forceinline__ int64_t tiles_per_block(int64_t bs, int64_t L, int tile) {
  const int64_t rows = bs < L ? bs : L;
  return rows > 0 ? static_cast<int64_t>((static_cast<uint32_t>(rows) + static_cast<uint32_t>(tile) - 1u) /
                                         static_cast<uint32_t>(tile))
                  : 1;
}

// max that propagates NaN (fmaxf(x, NaN) = x).
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ float group16_max(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float group16_sum(float v) {
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// sm[r * (D + 1) + d] = mul * g[(row0 + r) * D + d] for r < rows, 0 for rows <= r < ROWS.
template <typename T, int ROWS, int D>
__device__ __forceinline__ void load_tile(float* __restrict__ sm, const T* __restrict__ g, int64_t row0, int rows,
                                          float mul) {
  for (int idx = threadIdx.x; idx < ROWS * D; idx += kThreads) {
    const int r = idx / D, d = idx % D;
    sm[r * (D + 1) + d] = r < rows ? mul * to_f32(g[(row0 + r) * D + d]) : 0.f;
  }
}

// Causal bounds with the alignment offset (key j visible to query i iff j <= i + off).
// Key blocks a query tile whose last row is last_row can reach.
__device__ __forceinline__ int64_t key_blocks_end(const Params& p, int64_t last_row) {
  if (!p.causal) return p.Kb;
  const int64_t last = last_row + p.off;
  return last < 0 ? 0 : min64(p.Kb, udiv(last, p.bs) + 1);
}
// The first query block that can see key block J.
__device__ __forceinline__ int64_t query_blocks_begin(const Params& p, int64_t J) {
  if (!p.causal) return 0;
  const int64_t r = J * p.bs - p.off;
  return r <= 0 ? 0 : min64(p.Qb, udiv(r, p.bs));
}

// The block-mask row of (b, h, I).
__device__ __forceinline__ const bool* mask_row(const Params& p, int64_t b, int64_t h, int64_t I) {
  const int64_t mb = p.mask_b > 1 ? b : 0, mh = p.mask_h > 1 ? h : 0;
  return p.mask + ((mb * p.mask_h + mh) * p.Qb + I) * p.Kb;
}

// s[a][b] = sum_d A[ty + 8a][d] * Bt[tx + 16b][d] over two shared [*, D] tiles.
template <int D, int TILE>
__device__ __forceinline__ void tile_abt(const float* __restrict__ A, const float* __restrict__ Bt,
                                         float (&s)[Cfg<D, TILE>::RM][Cfg<D, TILE>::RN]) {
  using C = Cfg<D, TILE>;
  const int tx = threadIdx.x % kTX, ty = threadIdx.x / kTX;
#pragma unroll
  for (int a = 0; a < C::RM; ++a)
#pragma unroll
    for (int b = 0; b < C::RN; ++b) s[a][b] = 0.f;
#pragma unroll 4
  for (int d = 0; d < D; ++d) {
    float av[C::RM], bv[C::RN];
#pragma unroll
    for (int a = 0; a < C::RM; ++a) av[a] = A[(ty + kTY * a) * C::LD + d];
#pragma unroll
    for (int b = 0; b < C::RN; ++b) bv[b] = Bt[(tx + kTX * b) * C::LD + d];
#pragma unroll
    for (int a = 0; a < C::RM; ++a)
#pragma unroll
      for (int b = 0; b < C::RN; ++b) s[a][b] = fmaf(av[a], bv[b], s[a][b]);
  }
}

// Whether score (row, col) of the tile is visible: inside the tile's rows / columns and causal (col <= row + off).
__device__ __forceinline__ bool visible(const Params& p, int r, int rows, int c, int cols, int64_t row, int64_t col) {
  return r < rows && c < cols && (!p.causal || col <= row + p.off);
}

// ------------------------------------------------------------------------------------------------------------
// Forward.

template <typename T, int D, int TILE>
// minBlocks = 1: without it ptxas for sm_90 capped the D = 128, 64-row instantiation at 168 registers and spilled
// 24 bytes (a stack frame); one CTA per SM is what its ~100 KB of shared memory allows there anyway.
__global__ void __launch_bounds__(kThreads, 1) forward_kernel(const Params p) {
  using C = Cfg<D, TILE>;
  extern __shared__ float smem[];
  float* Qs = smem;
  float* Ks = Qs + C::BM * C::LD;
  float* Vs = Ks + C::BN * C::LD;
  float* Ps = Vs + C::BN * C::LD;
  const int tx = threadIdx.x % kTX, ty = threadIdx.x / kTX;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t subs = tiles_per_block(p.bs, p.Lq, C::BM);
  const int64_t I = udiv(blockIdx.x, subs);
  const int64_t r0 = I * p.bs + umod(blockIdx.x, subs) * C::BM;
  const int64_t rend = min64(I * p.bs + p.bs, p.Lq);
  if (r0 >= rend) return;  // uniform over the CTA
  const int rows = static_cast<int>(min64(C::BM, rend - r0));
  const int64_t last_row = r0 + rows - 1;
  const int64_t hk = udiv(h, udiv(p.Hq, p.Hkv));
  const T* qg = static_cast<const T*>(p.q) + (b * p.Hq + h) * p.Lq * D;
  const T* kg = static_cast<const T*>(p.k) + (b * p.Hkv + hk) * p.Lk * D;
  const T* vg = static_cast<const T*>(p.v) + (b * p.Hkv + hk) * p.Lk * D;
  const bool* keep = mask_row(p, b, h, I);
  load_tile<T, C::BM, D>(Qs, qg, r0, rows, p.scale);

  float o[C::RM][C::DC], m[C::RM], l[C::RM];
#pragma unroll
  for (int a = 0; a < C::RM; ++a) {
    m[a] = -kInf;
    l[a] = 0.f;
#pragma unroll
    for (int c = 0; c < C::DC; ++c) o[a][c] = 0.f;
  }
  const int64_t jend = key_blocks_end(p, last_row);
  for (int J = 0; J < jend; ++J) {  // 32-bit: lengths < 2^31 - 256 (checked()), so c0 + BN never overflows
    if (!keep[J]) continue;
    const int64_t kend = min64(J * p.bs + p.bs, p.Lk);
    for (int c0 = static_cast<int>(J * p.bs); c0 < kend; c0 += C::BN) {
      if (p.causal && c0 > last_row + p.off) break;
      const int cols = static_cast<int>(min64(C::BN, kend - c0));
      __syncthreads();  // the previous sub-tile's reads of Ks / Vs / Ps are done
      load_tile<T, C::BN, D>(Ks, kg, c0, cols, 1.f);
      load_tile<T, C::BN, D>(Vs, vg, c0, cols, 1.f);
      __syncthreads();
      float s[C::RM][C::RN];
      tile_abt<D, TILE>(Qs, Ks, s);
#pragma unroll
      for (int a = 0; a < C::RM; ++a) {
        const int r = ty + kTY * a;
        float mx = -kInf;
#pragma unroll
        for (int bb = 0; bb < C::RN; ++bb) {
          const int c = tx + kTX * bb;
          if (!visible(p, r, rows, c, cols, r0 + r, c0 + c)) s[a][bb] = -kInf;
          mx = nan_max(mx, s[a][bb]);
        }
        mx = group16_max(mx);
        const float mnew = nan_max(m[a], mx);
        const float muse = mnew == -kInf ? 0.f : mnew;  // a row with nothing visible yet keeps p = 0
        const float alpha = __expf(m[a] - muse);
        m[a] = mnew;
        l[a] *= alpha;
#pragma unroll
        for (int c = 0; c < C::DC; ++c) o[a][c] *= alpha;
#pragma unroll
        for (int bb = 0; bb < C::RN; ++bb) {
          const float pv = __expf(s[a][bb] - muse);
          l[a] += pv;
          Ps[r * C::LP + tx + kTX * bb] = pv;
        }
      }
      __syncthreads();
#pragma unroll 4
      for (int j = 0; j < C::BN; ++j) {
        float vv[C::DC];
#pragma unroll
        for (int c = 0; c < C::DC; ++c) vv[c] = Vs[j * C::LD + tx + kTX * c];
#pragma unroll
        for (int a = 0; a < C::RM; ++a) {
          const float pj = Ps[(ty + kTY * a) * C::LP + j];
#pragma unroll
          for (int c = 0; c < C::DC; ++c) o[a][c] = fmaf(pj, vv[c], o[a][c]);
        }
      }
    }
  }
  T* og = static_cast<T*>(p.out) + (b * p.Hq + h) * p.Lq * D;
  float* lg = p.lse + (b * p.Hq + h) * p.Lq;
#pragma unroll
  for (int a = 0; a < C::RM; ++a) {
    const float lt = group16_sum(l[a]);
    const int r = ty + kTY * a;
    if (r >= rows) continue;
    const bool empty = lt == 0.f;  // nothing visible; a NaN sum is not empty
    const float inv = 1.f / lt;
#pragma unroll
    for (int c = 0; c < C::DC; ++c) og[(r0 + r) * D + tx + kTX * c] = from_f32<T>(empty ? 0.f : o[a][c] * inv);
    if (tx == 0) lg[r0 + r] = empty ? -kInf : m[a] + __logf(lt);
  }
}

// ------------------------------------------------------------------------------------------------------------
// Backward.

// One warp per row: delta = dO . O - dlse.
template <typename T>
__global__ void __launch_bounds__(256) delta_kernel(const Params p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t rows = p.B * p.Hq * p.Lq;
  if (row >= rows) return;
  const T* g = static_cast<const T*>(p.grad_out) + row * p.D;
  const T* o = static_cast<const T*>(p.out) + row * p.D;
  float acc = 0.f;
  for (int64_t d = lane; d < p.D; d += 32) acc = fmaf(to_f32(g[d]), to_f32(o[d]), acc);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) p.delta[row] = acc - (p.grad_lse != nullptr ? p.grad_lse[row] : 0.f);
}

// lse of a row for recomputing P: +inf for rows that see nothing (lse = -inf) and rows outside the tile, so
// exp(s - lse) = 0 there.
__device__ __forceinline__ float lse_for_p(const float* lse, int64_t row, bool inside) {
  if (!inside) return kInf;
  const float v = lse[row];
  return v == -kInf ? kInf : v;
}

template <typename T, int D, int TILE>
__global__ void __launch_bounds__(kThreads) backward_dq_kernel(const Params p) {
  using C = Cfg<D, TILE>;
  extern __shared__ float smem[];
  float* Qs = smem;
  float* Gs = Qs + C::BM * C::LD;  // dO
  float* Ks = Gs + C::BM * C::LD;
  float* Vs = Ks + C::BN * C::LD;
  float* Ps = Vs + C::BN * C::LD;  // dS
  const int tx = threadIdx.x % kTX, ty = threadIdx.x / kTX;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t subs = tiles_per_block(p.bs, p.Lq, C::BM);
  const int64_t I = udiv(blockIdx.x, subs);
  const int64_t r0 = I * p.bs + umod(blockIdx.x, subs) * C::BM;
  const int64_t rend = min64(I * p.bs + p.bs, p.Lq);
  if (r0 >= rend) return;
  const int rows = static_cast<int>(min64(C::BM, rend - r0));
  const int64_t last_row = r0 + rows - 1;
  const int64_t hk = udiv(h, udiv(p.Hq, p.Hkv));
  const int64_t qoff = (b * p.Hq + h) * p.Lq;
  const T* kg = static_cast<const T*>(p.k) + (b * p.Hkv + hk) * p.Lk * D;
  const T* vg = static_cast<const T*>(p.v) + (b * p.Hkv + hk) * p.Lk * D;
  const bool* keep = mask_row(p, b, h, I);
  load_tile<T, C::BM, D>(Qs, static_cast<const T*>(p.q) + qoff * D, r0, rows, p.scale);
  load_tile<T, C::BM, D>(Gs, static_cast<const T*>(p.grad_out) + qoff * D, r0, rows, 1.f);
  float lse_r[C::RM], del_r[C::RM], acc[C::RM][C::DC];
#pragma unroll
  for (int a = 0; a < C::RM; ++a) {
    const int r = ty + kTY * a;
    lse_r[a] = lse_for_p(p.lse + qoff, r0 + r, r < rows);
    del_r[a] = r < rows ? p.delta[qoff + r0 + r] : 0.f;
#pragma unroll
    for (int c = 0; c < C::DC; ++c) acc[a][c] = 0.f;
  }
  const int64_t jend = key_blocks_end(p, last_row);
  for (int64_t J = 0; J < jend; ++J) {
    if (!keep[J]) continue;
    const int64_t kend = min64(J * p.bs + p.bs, p.Lk);
    for (int64_t c0 = J * p.bs; c0 < kend; c0 += C::BN) {
      if (p.causal && c0 > last_row + p.off) break;
      const int cols = static_cast<int>(min64(C::BN, kend - c0));
      __syncthreads();
      load_tile<T, C::BN, D>(Ks, kg, c0, cols, 1.f);
      load_tile<T, C::BN, D>(Vs, vg, c0, cols, 1.f);
      __syncthreads();
      float s[C::RM][C::RN], dp[C::RM][C::RN];
      tile_abt<D, TILE>(Qs, Ks, s);
      tile_abt<D, TILE>(Gs, Vs, dp);
#pragma unroll
      for (int a = 0; a < C::RM; ++a) {
        const int r = ty + kTY * a;
#pragma unroll
        for (int bb = 0; bb < C::RN; ++bb) {
          const int c = tx + kTX * bb;
          const float pv = visible(p, r, rows, c, cols, r0 + r, c0 + c) ? __expf(s[a][bb] - lse_r[a]) : 0.f;
          Ps[r * C::LP + c] = pv * (dp[a][bb] - del_r[a]);
        }
      }
      __syncthreads();
#pragma unroll 4
      for (int j = 0; j < C::BN; ++j) {
        float kv[C::DC];
#pragma unroll
        for (int c = 0; c < C::DC; ++c) kv[c] = Ks[j * C::LD + tx + kTX * c];
#pragma unroll
        for (int a = 0; a < C::RM; ++a) {
          const float dsj = Ps[(ty + kTY * a) * C::LP + j];
#pragma unroll
          for (int c = 0; c < C::DC; ++c) acc[a][c] = fmaf(dsj, kv[c], acc[a][c]);
        }
      }
    }
  }
  T* dq = static_cast<T*>(p.dq) + qoff * D;
#pragma unroll
  for (int a = 0; a < C::RM; ++a) {
    const int r = ty + kTY * a;
    if (r >= rows) continue;
#pragma unroll
    for (int c = 0; c < C::DC; ++c) dq[(r0 + r) * D + tx + kTX * c] = from_f32<T>(acc[a][c] * p.scale);
  }
}

template <typename T, int D, int TILE>
__global__ void __launch_bounds__(kThreads) backward_dkdv_kernel(const Params p) {
  using C = Cfg<D, TILE>;
  extern __shared__ float smem[];
  float* Qs = smem;                 // scale * Q
  float* Gs = Qs + C::BM * C::LD;   // dO
  float* Ks = Gs + C::BM * C::LD;
  float* Vs = Ks + C::BN * C::LD;
  float* Ps = Vs + C::BN * C::LD;   // P, then dS
  float* Ls = Ps + C::BM * C::LP;   // lse per query row (+inf: P = 0)
  float* Ds = Ls + C::BM;           // Delta per query row
  const int tx = threadIdx.x % kTX, ty = threadIdx.x / kTX;
  const int64_t b = blockIdx.z, hk = blockIdx.y;
  const int64_t subs = tiles_per_block(p.bs, p.Lk, C::BN);
  const int64_t J = udiv(blockIdx.x, subs);
  const int64_t c0 = J * p.bs + umod(blockIdx.x, subs) * C::BN;
  const int64_t kend = min64(J * p.bs + p.bs, p.Lk);
  if (c0 >= kend) return;
  const int cols = static_cast<int>(min64(C::BN, kend - c0));
  const int64_t koff = (b * p.Hkv + hk) * p.Lk;
  load_tile<T, C::BN, D>(Ks, static_cast<const T*>(p.k) + koff * D, c0, cols, 1.f);
  load_tile<T, C::BN, D>(Vs, static_cast<const T*>(p.v) + koff * D, c0, cols, 1.f);
  float dk[C::RK][C::DC], dv[C::RK][C::DC];
#pragma unroll
  for (int a = 0; a < C::RK; ++a)
#pragma unroll
    for (int c = 0; c < C::DC; ++c) dk[a][c] = dv[a][c] = 0.f;
  const int64_t G = udiv(p.Hq, p.Hkv);
  const int64_t qsubs = tiles_per_block(p.bs, p.Lq, C::BM);
  // Causal: query blocks before query_blocks_begin end before c0 - off.
  const int64_t ibeg = query_blocks_begin(p, J);
  for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
    const int64_t qoff = (b * p.Hq + h) * p.Lq;
    for (int64_t I = ibeg; I < p.Qb; ++I) {
      if (!mask_row(p, b, h, I)[J]) continue;
      const int64_t rend = min64(I * p.bs + p.bs, p.Lq);
      for (int64_t qs = 0; qs < qsubs; ++qs) {
        const int64_t r0 = I * p.bs + qs * C::BM;
        if (r0 >= rend) break;
        const int rows = static_cast<int>(min64(C::BM, rend - r0));
        if (p.causal && r0 + rows - 1 + p.off < c0) continue;
        __syncthreads();  // the previous query tile's reads are done
        load_tile<T, C::BM, D>(Qs, static_cast<const T*>(p.q) + qoff * D, r0, rows, p.scale);
        load_tile<T, C::BM, D>(Gs, static_cast<const T*>(p.grad_out) + qoff * D, r0, rows, 1.f);
        for (int r = threadIdx.x; r < C::BM; r += kThreads) {
          Ls[r] = lse_for_p(p.lse + qoff, r0 + r, r < rows);
          Ds[r] = r < rows ? p.delta[qoff + r0 + r] : 0.f;
        }
        __syncthreads();
        float s[C::RM][C::RN], dp[C::RM][C::RN];
        tile_abt<D, TILE>(Qs, Ks, s);
        tile_abt<D, TILE>(Gs, Vs, dp);
#pragma unroll
        for (int a = 0; a < C::RM; ++a) {
          const int r = ty + kTY * a;
#pragma unroll
          for (int bb = 0; bb < C::RN; ++bb) {
            const int c = tx + kTX * bb;
            s[a][bb] = visible(p, r, rows, c, cols, r0 + r, c0 + c) ? __expf(s[a][bb] - Ls[r]) : 0.f;
            Ps[r * C::LP + c] = s[a][bb];
            dp[a][bb] = s[a][bb] * (dp[a][bb] - Ds[r]);  // dS
          }
        }
        __syncthreads();
        // dV[key] += sum_i P[i, key] dO[i]
#pragma unroll 4
        for (int i = 0; i < C::BM; ++i) {
          float gv[C::DC];
#pragma unroll
          for (int c = 0; c < C::DC; ++c) gv[c] = Gs[i * C::LD + tx + kTX * c];
#pragma unroll
          for (int a = 0; a < C::RK; ++a) {
            const float pik = Ps[i * C::LP + ty + kTY * a];
#pragma unroll
            for (int c = 0; c < C::DC; ++c) dv[a][c] = fmaf(pik, gv[c], dv[a][c]);
          }
        }
        __syncthreads();
#pragma unroll
        for (int a = 0; a < C::RM; ++a)
#pragma unroll
          for (int bb = 0; bb < C::RN; ++bb) Ps[(ty + kTY * a) * C::LP + tx + kTX * bb] = dp[a][bb];
        __syncthreads();
        // dK[key] += sum_i dS[i, key] (scale Q)[i]
#pragma unroll 4
        for (int i = 0; i < C::BM; ++i) {
          float qv[C::DC];
#pragma unroll
          for (int c = 0; c < C::DC; ++c) qv[c] = Qs[i * C::LD + tx + kTX * c];
#pragma unroll
          for (int a = 0; a < C::RK; ++a) {
            const float dsik = Ps[i * C::LP + ty + kTY * a];
#pragma unroll
            for (int c = 0; c < C::DC; ++c) dk[a][c] = fmaf(dsik, qv[c], dk[a][c]);
          }
        }
      }
    }
  }
  T* dkg = static_cast<T*>(p.dk) + koff * D;
  T* dvg = static_cast<T*>(p.dv) + koff * D;
#pragma unroll
  for (int a = 0; a < C::RK; ++a) {
    const int r = ty + kTY * a;
    if (r >= cols) continue;
#pragma unroll
    for (int c = 0; c < C::DC; ++c) {
      dkg[(c0 + r) * D + tx + kTX * c] = from_f32<T>(dk[a][c]);
      dvg[(c0 + r) * D + tx + kTX * c] = from_f32<T>(dv[a][c]);
    }
  }
}

// ------------------------------------------------------------------------------------------------------------
// Attention-map block pool.

template <typename T, int D, int TILE>
__global__ void __launch_bounds__(kThreads) block_pool_kernel(const Params p) {
  using C = Cfg<D, TILE>;
  extern __shared__ float smem[];
  float* Qs = smem;
  float* Ks = Qs + C::BM * C::LD;
  const int tx = threadIdx.x % kTX, ty = threadIdx.x / kTX;
  const int64_t b = blockIdx.z, h = blockIdx.y;
  const int64_t subs = tiles_per_block(p.bs, p.Lq, C::BM);
  const int64_t I = udiv(blockIdx.x, subs);
  const int64_t r0 = I * p.bs + umod(blockIdx.x, subs) * C::BM;
  const int64_t rend = min64(I * p.bs + p.bs, p.Lq);
  if (r0 >= rend) return;
  const int rows = static_cast<int>(min64(C::BM, rend - r0));
  const int64_t last_row = r0 + rows - 1;
  const int64_t hk = udiv(h, udiv(p.Hq, p.Hkv));
  const T* kg = static_cast<const T*>(p.k) + (b * p.Hkv + hk) * p.Lk * D;
  load_tile<T, C::BM, D>(Qs, static_cast<const T*>(p.q) + (b * p.Hq + h) * p.Lq * D, r0, rows, p.scale);
  const int64_t jend = key_blocks_end(p, last_row);
  float m[C::RM], l[C::RM];
#pragma unroll
  for (int a = 0; a < C::RM; ++a) {
    m[a] = -kInf;
    l[a] = 0.f;
  }
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t J = 0; J < jend; ++J) {
      const int64_t kend = min64(J * p.bs + p.bs, p.Lk);
      float best = -kInf;
      for (int64_t c0 = J * p.bs; c0 < kend; c0 += C::BN) {
        if (p.causal && c0 > last_row + p.off) break;
        const int cols = static_cast<int>(min64(C::BN, kend - c0));
        __syncthreads();
        load_tile<T, C::BN, D>(Ks, kg, c0, cols, 1.f);
        __syncthreads();
        float s[C::RM][C::RN];
        tile_abt<D, TILE>(Qs, Ks, s);
#pragma unroll
        for (int a = 0; a < C::RM; ++a) {
          const int r = ty + kTY * a;
          float mx = -kInf;
#pragma unroll
          for (int bb = 0; bb < C::RN; ++bb) {
            const int c = tx + kTX * bb;
            if (!visible(p, r, rows, c, cols, r0 + r, c0 + c)) s[a][bb] = -kInf;
            mx = nan_max(mx, s[a][bb]);
          }
          if (pass == 0) {
            mx = group16_max(mx);
            const float mnew = nan_max(m[a], mx);
            const float muse = mnew == -kInf ? 0.f : mnew;
            l[a] *= __expf(m[a] - muse);
            m[a] = mnew;
#pragma unroll
            for (int bb = 0; bb < C::RN; ++bb) l[a] += __expf(s[a][bb] - muse);
          } else if (mx != -kInf) {  // this thread's columns of the row see something
            best = nan_max(best, mx - m[a]);  // m[a] holds lse (+inf for rows without keys) in pass 1
          }
        }
      }
      if (pass == 1) {
        best = warp_max(best);
        if ((threadIdx.x % 32) == 0 && best != -kInf) {
          float* dst = p.pool + ((b * p.Hq + h) * p.Qb + I) * p.Kb + J;
          // Non-negative floats order like their bits, and the positive quiet NaN 0x7fffffff above them all.
          const float val = best != best ? __int_as_float(0x7fffffff) : __expf(best);
          atomicMax(reinterpret_cast<int*>(dst), __float_as_int(val));
        }
      }
    }
    if (pass == 0) {
#pragma unroll
      for (int a = 0; a < C::RM; ++a) {
        const float lt = group16_sum(l[a]);
        m[a] = lt == 0.f ? kInf : m[a] + __logf(lt);
      }
    }
  }
}

}  // namespace peftcore::sparse_attn::cuda::kernels
