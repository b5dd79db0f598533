// sparse_attn tensor-core forward (CuTe, sm_80 mma.sync; runs on sm_80 / 86 / 89 / 90). No torch headers;
// instantiated per (dtype, head dim, configuration) in sparse_attn_tc_{f16,bf16}_d{64,128}.cu.
//
// Work. One CTA of kWarps warps per (query tile of kBM rows, query head, batch) walks the list of kept key tiles
// of its (mask batch, mask head, query tile) row (sparse_attn_tc_plan.h; built on the device by
// sparse_attn_tc.cu), never the masked ones. Query tiles go in reverse order of blockIdx.x so the long causal
// rows start first.
//
// Shared memory (storage dtype, 2 bytes): Q [kBM, D] once, K and V [kBN, D] in two stages each. Rows are cut in
// 64-element (128-byte) chunks swizzled over 8 rows (Swizzle<3,3,3>: the 16-byte column chunk XOR the row mod 8),
// so the 16-byte cp.async stores and the ldmatrix reads of 8 rows x 16 bytes touch 8 distinct bank groups.
// Loads are cp.async.cg (16 bytes, 8 threads per 128-byte row chunk); rows past Lq / Lk are zero-filled so they
// add nothing (a zero V row times p = 0), and never read from global memory.
//
// Pipeline per kept key tile i: issue the cp.async of tile i + 1 into the other stage, wait for tile i, then
//   S = Q K^T         ldmatrix.x4 of Q (A, row-major) and K (B, K-major), mma.sync m16n8k16 into fp32;
//   softmax           per row, online in fp32 (below); P stays in registers and is rounded to the storage dtype;
//   O += P V          P as the A operand straight from the accumulator registers (the m16n8 C fragments of two
//                     neighbouring 8-key column blocks are exactly one m16n8k16 A fragment), V^T as the B
//                     operand through ldmatrix.trans of the same V tile;
// and a barrier before the stage is refilled.
//
// Warps split the query rows (16 per warp and m16 atom); a thread holds two rows per m16 atom (lane / 4 and
// lane / 4 + 8) and, per 8-key block, two neighbouring keys; the four threads of a quad share rows, so row max /
// sum are two xor-shuffles.
//
// Softmax (the CUDA-core kernel's, in base 2): s = (q . k) scale log2(e); masked entries (past Lk, causal j > i +
// off, and on partial tiles the block mask read per element) are -inf. Running max m per row with nan_max (NaN
// wins, never a bare fmaxf), alpha = 2^(m_old - m_use), m_use = 0 while the row has seen nothing (m = -inf), p =
// 2^(s - m_use); per-thread partial sums l. At the end l is summed over the quad; l = 0 (nothing visible, or all
// scores -inf) gives out = 0 and lse = -inf; else out = O / l and lse = (m + log2 l) ln 2, the natural-log
// log-sum-exp of the scaled scores that the backward recomputes P from. A NaN or inf in q or in a visible k makes
// the row's m or l NaN, hence out and lse NaN (as SDPA); v reaches out only through p V (0 x NaN included, for
// keys inside a kept tile).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "sparse_attn/sparse_attn_launch.h"
#include "sparse_attn/sparse_attn_tc_launch.h"
#include "sparse_attn/sparse_attn_tc_plan.h"

#if PEFTCORE_HAS_CUTLASS
#include <cute/tensor.hpp>  // first: the atom headers below rely on it
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cutlass/numeric_types.h>

#include <stdexcept>
#include <string>

namespace peftcore::sparse_attn::cuda::tc_kernels {

using namespace cute;

template <int kDType>
struct ElementOf;
template <>
struct ElementOf<static_cast<int>(CudaDType::kFloat16)> {
  using type = cute::half_t;
  using Mma = SM80_16x8x16_F32F16F16F32_TN;
};
template <>
struct ElementOf<static_cast<int>(CudaDType::kBFloat16)> {
  using type = cute::bfloat16_t;
  using Mma = SM80_16x8x16_F32BF16BF16F32_TN;
};

template <int kDType, int kD_, int kBM_, int kBN_, int kWarps_>
struct Traits {
  using Element = typename ElementOf<kDType>::type;
  static constexpr int kD = kD_, kBM = kBM_, kBN = kBN_, kWarps = kWarps_;
  static constexpr int kThreads = 32 * kWarps;
  static_assert(kD % 64 == 0 && kBN % 16 == 0 && kBM == 16 * kWarps, "one m16 row block per warp");
  static_assert(kBM % (kThreads / 8) == 0 && kBN % (kThreads / 8) == 0, "whole gmem copy passes");

  // Warps along M; the N tile of 16 lets ldmatrix.x4 fill two n8 B fragments at once.
  using TiledMma = TiledMMA<MMA_Atom<typename ElementOf<kDType>::Mma>, Layout<Shape<Int<kWarps>, _1, _1>>,
                            Tile<Int<16 * kWarps>, _16, _16>>;

  using SmemAtom = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  using SmemQ = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBM>, Int<kD>>{}));
  using SmemKV = decltype(tile_to_shape(SmemAtom{}, Shape<Int<kBN>, Int<kD>>{}));
  // The V tile seen as V^T [D, kBN]: element (d, j) is V[j, d] (the B operand of P V, K-mode = keys).
  using SmemVt = decltype(composition(SmemKV{}, make_layout(Shape<Int<kD>, Int<kBN>>{}, GenRowMajor{})));

  using LdsmA = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using LdsmB = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using LdsmBt = Copy_Atom<SM75_U16x8_LDSM_T, Element>;
  // 16-byte cp.async.cg; thread t copies 8 elements of row t / 8 at column 8 (t % 8) of each 64-column chunk.
  using GmemCopy = decltype(make_tiled_copy(Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<uint128_t>, Element>{},
                                            Layout<Shape<Int<kThreads / 8>, _8>, Stride<_8, _1>>{},
                                            Layout<Shape<_1, _8>>{}));

  static constexpr int kSmemQ = kBM * kD;   // elements
  static constexpr int kSmemKV = kBN * kD;  // elements per stage
  static constexpr int kSmemBytes = (kSmemQ + 4 * kSmemKV) * static_cast<int>(sizeof(Element));
  static_assert(kSmemBytes == ::peftcore::sparse_attn::tc::smem_bytes(kD, ::peftcore::sparse_attn::tc::Config{
                                                                              kBM, kBN, kWarps}),
                "the host planner's shared memory size must be the kernel's");
};

__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }

// Rows [0, valid) of the [ROWS, D] global tile `g` into shared `s` with the CTA's cp.async copy; rows past `valid`
// are zero-filled (plain shared stores) and not read.
template <class Copy, class GT, class ST, class CT>
__device__ __forceinline__ void load_rows(const Copy& copy_op, const GT& g, ST& s, const CT& ident, int valid) {
  auto thr = copy_op.get_slice(threadIdx.x);
  Tensor tg = thr.partition_S(g);
  Tensor ts = thr.partition_D(s);
  Tensor tc = thr.partition_S(ident);
  CUTE_UNROLL
  for (int i = 0; i < size<1>(tg); ++i) {
    if (get<0>(tc(0, i, 0)) < valid) {
      CUTE_UNROLL
      for (int j = 0; j < size<2>(tg); ++j) copy(copy_op, tg(_, i, j), ts(_, i, j));
    } else {
      clear(ts(_, i, _));
    }
  }
}

// acc += A B^T with both operands in shared memory: per 16-wide K slice, ldmatrix into the register fragments
// (one slice ahead), then the warp's mma.sync atoms.
template <class Mma, class Acc, class RA, class RAv, class SA, class CpA, class RB, class RBv, class SB, class CpB>
__device__ __forceinline__ void gemm_ss(const Mma& mma, Acc& acc, RA& rA, RAv& rAv, const SA& sA, const CpA& cpA,
                                        RB& rB, RBv& rBv, const SB& sB, const CpB& cpB) {
  constexpr int kSlices = decltype(size<2>(rA))::value;
  copy(cpA, sA(_, _, 0), rAv(_, _, 0));
  copy(cpB, sB(_, _, 0), rBv(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < kSlices; ++k) {
    if (k + 1 < kSlices) {
      copy(cpA, sA(_, _, k + 1), rAv(_, _, k + 1));
      copy(cpB, sB(_, _, k + 1), rBv(_, _, k + 1));
    }
    gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// acc += A B^T with A already in registers, B from shared memory as above.
template <class Mma, class Acc, class RA, class RB, class RBv, class SB, class CpB>
__device__ __forceinline__ void gemm_rs(const Mma& mma, Acc& acc, const RA& rA, RB& rB, RBv& rBv, const SB& sB,
                                        const CpB& cpB) {
  constexpr int kSlices = decltype(size<2>(rA))::value;
  copy(cpB, sB(_, _, 0), rBv(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < kSlices; ++k) {
    if (k + 1 < kSlices) copy(cpB, sB(_, _, k + 1), rBv(_, _, k + 1));
    gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads) forward_kernel(const Params p) {
  using Element = typename Tr::Element;
  constexpr int kD = Tr::kD, kBM = Tr::kBM, kBN = Tr::kBN;
  constexpr float kInf = __builtin_huge_valf();
  constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* sq_ptr = reinterpret_cast<Element*>(smem_raw);
  Element* sk_ptr = sq_ptr + Tr::kSmemQ;
  Element* sv_ptr = sk_ptr + 2 * Tr::kSmemKV;

  const int tid = threadIdx.x;
  const int64_t m_tile = p.tc_Mt - 1 - static_cast<int64_t>(blockIdx.x);
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const int64_t hk = h / (p.Hq / p.Hkv);
  const int64_t r0 = m_tile * kBM;
  const int q_rows = static_cast<int>(p.Lq - r0 < kBM ? p.Lq - r0 : kBM);

  const int64_t mb = p.mask_b > 1 ? b : 0, mh = p.mask_h > 1 ? h : 0;
  const int64_t list_row = (mb * p.mask_h + mh) * p.tc_Mt + m_tile;
  const int count = p.tc_count[list_row];
  const int32_t* entries = p.tc_entries + list_row * p.tc_Nt;
  const bool* mask = p.mask + (mb * p.mask_h + mh) * p.Qb * p.Kb;

  const Element* qg = static_cast<const Element*>(p.q) + ((b * p.Hq + h) * p.Lq + r0) * kD;
  const Element* kg = static_cast<const Element*>(p.k) + (b * p.Hkv + hk) * p.Lk * kD;
  const Element* vg = static_cast<const Element*>(p.v) + (b * p.Hkv + hk) * p.Lk * kD;
  using GLayoutQ = Layout<Shape<Int<kBM>, Int<kD>>, Stride<Int<kD>, _1>>;
  using GLayoutKV = Layout<Shape<Int<kBN>, Int<kD>>, Stride<Int<kD>, _1>>;

  Tensor sQ = make_tensor(make_smem_ptr(sq_ptr), typename Tr::SmemQ{});
  const auto sK = [&](int stage) {
    return make_tensor(make_smem_ptr(sk_ptr + stage * Tr::kSmemKV), typename Tr::SmemKV{});
  };
  const auto sV = [&](int stage) {
    return make_tensor(make_smem_ptr(sv_ptr + stage * Tr::kSmemKV), typename Tr::SmemKV{});
  };
  const auto sVt = [&](int stage) {
    return make_tensor(make_smem_ptr(sv_ptr + stage * Tr::kSmemKV), typename Tr::SmemVt{});
  };

  typename Tr::GmemCopy gmem_copy;
  const Tensor idQ = make_identity_tensor(Shape<Int<kBM>, Int<kD>>{});
  const Tensor idKV = make_identity_tensor(Shape<Int<kBN>, Int<kD>>{});
  // K and V rows of key tile n into `stage`.
  const auto load_kv = [&](int64_t n, int stage) {
    const int valid = static_cast<int>(p.Lk - n * kBN < kBN ? p.Lk - n * kBN : kBN);
    Tensor gK = make_tensor(make_gmem_ptr(kg + n * kBN * kD), GLayoutKV{});
    Tensor gV = make_tensor(make_gmem_ptr(vg + n * kBN * kD), GLayoutKV{});
    Tensor sk = sK(stage);
    Tensor sv = sV(stage);
    load_rows(gmem_copy, gK, sk, idKV, valid);
    load_rows(gmem_copy, gV, sv, idKV, valid);
  };

  typename Tr::TiledMma mma;
  auto thr_mma = mma.get_slice(tid);
  Tensor acc_o = partition_fragment_C(mma, Shape<Int<kBM>, Int<kD>>{});   // (4, MMA_M, D / 8) fp32
  Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});  // (4, MMA_M, kBN / 8) fp32
  Tensor rQ = make_tensor<Element>(partition_shape_A(mma, Shape<Int<kBM>, Int<kD>>{}));
  Tensor rK = make_tensor<Element>(partition_shape_B(mma, Shape<Int<kBN>, Int<kD>>{}));
  Tensor rVt = make_tensor<Element>(partition_shape_B(mma, Shape<Int<kD>, Int<kBN>>{}));
  Tensor rP = make_tensor<Element>(partition_shape_A(mma, Shape<Int<kBM>, Int<kBN>>{}));  // (8, MMA_M, kBN / 16)
  constexpr int kMmaM = decltype(size<1>(acc_s))::value;
  constexpr int kMmaN = decltype(size<2>(acc_s))::value;
  constexpr int kMmaD = decltype(size<2>(acc_o))::value;
  constexpr int kRows = 2 * kMmaM;  // rows per thread
  static_assert(decltype(size<0>(acc_s))::value == 4 && decltype(size<0>(rP))::value == 8 &&
                    decltype(size<2>(rP))::value * 2 == kMmaN, "m16n8k16 fragments");

  const auto ldsm_q = make_tiled_copy_A(typename Tr::LdsmA{}, mma);
  const auto ldsm_k = make_tiled_copy_B(typename Tr::LdsmB{}, mma);
  const auto ldsm_v = make_tiled_copy_B(typename Tr::LdsmBt{}, mma);
  auto ldsm_q_thr = ldsm_q.get_slice(tid);
  auto ldsm_k_thr = ldsm_k.get_slice(tid);
  auto ldsm_v_thr = ldsm_v.get_slice(tid);
  Tensor tQs = ldsm_q_thr.partition_S(sQ);
  Tensor tQr = ldsm_q_thr.retile_D(rQ);
  Tensor tKr = ldsm_k_thr.retile_D(rK);
  Tensor tVr = ldsm_v_thr.retile_D(rVt);

  // (row, key) inside the tile of every accumulator element; a thread's row r of acc(v, mi, .) is slot 2 mi + v / 2.
  const Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
  const Tensor tOcO = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kD>>{}));

  float m_run[kRows], l_run[kRows];
  int64_t mask_row[kRows];  // block-mask offset I * Kb of the row, -1 past Lq
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    m_run[r] = -kInf;
    l_run[r] = 0.f;
    const int64_t row = r0 + get<0>(tScS(2 * (r % 2), r / 2, 0));
    mask_row[r] = row < p.Lq ? (row / p.bs) * p.Kb : -1;
  }
  clear(acc_o);
  const float scale_log2 = p.scale * kLog2e;
  const int bs32 = p.bs < 0x7fffffff ? static_cast<int>(p.bs) : 0x7fffffff;

  if (count > 0) {
    Tensor gQ = make_tensor(make_gmem_ptr(qg), GLayoutQ{});
    load_rows(gmem_copy, gQ, sQ, idQ, q_rows);
    load_kv(entries[0] >> 1, 0);
    cp_async_fence();
  }
  for (int it = 0; it < count; ++it) {
    const int stage = it & 1;
    const int32_t entry = entries[it];
    const int64_t c0 = static_cast<int64_t>(entry >> 1) * kBN;
    const bool partial = (entry & 1) != 0;
    if (it + 1 < count) {
      load_kv(entries[it + 1] >> 1, stage ^ 1);
      cp_async_fence();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    clear(acc_s);
    {
      Tensor sk = sK(stage);
      Tensor tKs = ldsm_k_thr.partition_S(sk);
      gemm_ss(mma, acc_s, rQ, tQr, tQs, ldsm_q, rK, tKr, tKs, ldsm_k);
    }

    // Scale to base 2 and mask: the Lk bound on the last key tile, causal on tiles the diagonal crosses, the block
    // mask per element on partial tiles.
    const bool check_bounds = c0 + kBN > p.Lk;
    const bool check_causal = p.causal && c0 + kBN - 1 > r0 + p.off;
    if (check_bounds || check_causal || partial) {
      CUTE_UNROLL
      for (int mi = 0; mi < kMmaM; ++mi)
        CUTE_UNROLL
        for (int ni = 0; ni < kMmaN; ++ni)
          CUTE_UNROLL
          for (int v = 0; v < 4; ++v) {
            const int r = 2 * mi + v / 2;
            const int64_t row = r0 + get<0>(tScS(v, mi, ni));
            const int64_t col = c0 + get<1>(tScS(v, mi, ni));
            bool vis = col < p.Lk && (!p.causal || col <= row + p.off);
            if (vis && partial) vis = mask_row[r] >= 0 && mask[mask_row[r] + static_cast<int>(col) / bs32];
            acc_s(v, mi, ni) = vis ? acc_s(v, mi, ni) * scale_log2 : -kInf;
          }
    } else {
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) acc_s(i) *= scale_log2;
    }

    // Online softmax per row.
    float mx[kRows];
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) mx[r] = -kInf;
    CUTE_UNROLL
    for (int mi = 0; mi < kMmaM; ++mi)
      CUTE_UNROLL
      for (int ni = 0; ni < kMmaN; ++ni)
        CUTE_UNROLL
        for (int v = 0; v < 4; ++v) mx[2 * mi + v / 2] = nan_max(mx[2 * mi + v / 2], acc_s(v, mi, ni));
    float m_use[kRows], alpha[kRows];
    CUTE_UNROLL
    for (int r = 0; r < kRows; ++r) {
      mx[r] = nan_max(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = nan_max(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = nan_max(m_run[r], mx[r]);
      m_use[r] = m_new == -kInf ? 0.f : m_new;  // a row with nothing visible yet keeps p = 0
      alpha[r] = exp2f(m_run[r] - m_use[r]);
      m_run[r] = m_new;
      l_run[r] *= alpha[r];
    }
    CUTE_UNROLL
    for (int mi = 0; mi < kMmaM; ++mi)
      CUTE_UNROLL
      for (int nd = 0; nd < kMmaD; ++nd)
        CUTE_UNROLL
        for (int v = 0; v < 4; ++v) acc_o(v, mi, nd) *= alpha[2 * mi + v / 2];
    CUTE_UNROLL
    for (int mi = 0; mi < kMmaM; ++mi)
      CUTE_UNROLL
      for (int ni = 0; ni < kMmaN; ++ni)
        CUTE_UNROLL
        for (int v = 0; v < 4; ++v) {
          const int r = 2 * mi + v / 2;
          const float pv = exp2f(acc_s(v, mi, ni) - m_use[r]);
          l_run[r] += pv;
          // A fragment value j of k16 slice kk is C value j % 4 of the n8 block 2 kk + j / 4.
          rP(v + 4 * (ni % 2), mi, ni / 2) = static_cast<Element>(pv);
        }

    {
      Tensor svt = sVt(stage);
      Tensor tVs = ldsm_v_thr.partition_S(svt);
      gemm_rs(mma, acc_o, rP, rVt, tVr, tVs, ldsm_v);
    }
    __syncthreads();  // every warp is done with this stage before the next iteration refills it
  }

  // out = O / l, lse = (m + log2 l) ln 2; rows that saw nothing: 0 / -inf.
  Element* og = static_cast<Element*>(p.out) + ((b * p.Hq + h) * p.Lq + r0) * kD;
  float* lg = p.lse + (b * p.Hq + h) * p.Lq + r0;
  float inv[kRows];
  bool empty[kRows];
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    float l = l_run[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    empty[r] = l == 0.f;  // a NaN sum is not empty
    inv[r] = 1.f / l;
    const int row = get<0>(tScS(2 * (r % 2), r / 2, 0));
    if (get<1>(tScS(0, 0, 0)) == 0 && row < q_rows) lg[row] = empty[r] ? -kInf : (m_run[r] + log2f(l)) * kLn2;
  }
  CUTE_UNROLL
  for (int mi = 0; mi < kMmaM; ++mi)
    CUTE_UNROLL
    for (int nd = 0; nd < kMmaD; ++nd)
      CUTE_UNROLL
      for (int v = 0; v < 4; ++v) {
        const int r = 2 * mi + v / 2;
        const int row = get<0>(tOcO(v, mi, nd)), col = get<1>(tOcO(v, mi, nd));
        if (row < q_rows) og[row * kD + col] = static_cast<Element>(empty[r] ? 0.f : acc_o(v, mi, nd) * inv[r]);
      }
}

template <int kDType, int kD, int kBM, int kBN, int kWarps>
void forward_launch(const Params& p, cudaStream_t stream) {
  using Tr = Traits<kDType, kD, kBM, kBN, kWarps>;
  if (p.tc_Mt <= 0 || p.Hq <= 0 || p.B <= 0) return;
  if (p.tc_Mt > 0x7fffffff || p.Hq > 65535 || p.B > 65535)
    throw std::runtime_error("peftcore sparse_attn CUDA: tensor-core forward: grid too large");
  const auto kern = forward_kernel<Tr>;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
  if (e == cudaSuccess) {
    kern<<<dim3(static_cast<unsigned>(p.tc_Mt), static_cast<unsigned>(p.Hq), static_cast<unsigned>(p.B)),
           Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
    e = cudaGetLastError();
  }
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("peftcore sparse_attn CUDA: tensor-core forward launch: ") +
                             cudaGetErrorString(e));
  }
}

}  // namespace peftcore::sparse_attn::cuda::tc_kernels

#define PEFTCORE_SPARSE_ATTN_TC_INSTANTIATE(DTYPE, D, BM, BN, WARPS)                               \
  namespace peftcore::sparse_attn::cuda::tc_kernels {                                            \
  template void forward_launch<static_cast<int>(::peftcore::CudaDType::DTYPE), D, BM, BN, WARPS>( \
      const Params&, cudaStream_t);                                                              \
  }
#else
// Without the CuTe headers the tensor-core forward is not built (tc_compiled() says so).
#define PEFTCORE_SPARSE_ATTN_TC_INSTANTIATE(DTYPE, D, BM, BN, WARPS)
#endif
