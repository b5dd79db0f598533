// sparse_attn tensor-core backward (CuTe, sm_80 mma.sync; runs on sm_80 / 86 / 89 / 90). No torch headers;
// instantiated per (dtype, head dim, configuration) in sparse_attn_tc_bwd_{f16,bf16}_d{64,128}.cu. The tiles, the
// swizzled shared-memory layout, the cp.async loads, the ldmatrix / mma.sync GEMM helpers and the accumulator-to-A
// fragment reuse are the forward's (sparse_attn_tc_kernels.cuh).
//
// Math (FlashAttention-2's backward, fp32 accumulation, the storage dtype only in shared memory and mma operands):
// with s = scale q.k over the visible keys, lse from the forward and Delta_i = dO_i . O_i - dlse_i (delta kernel,
// sparse_attn_tc.cu),
//   P = exp(s - lse) (0 where masked; rows that saw nothing have lse = -inf and get P = 0, hence zero gradients),
//   dP = dO V^T,  dS = P (dP - Delta)  (0 where P is 0: a masked entry never contributes, whatever dP holds),
//   dV = P^T dO,  dK = scale dS^T Q,  dQ = scale dS K.
// P is recomputed in base 2: exp2(s log2(e) - lse log2(e)). A NaN in q (or in a key a row sees) gives that row a NaN
// lse, so NaN P and dS wherever it sees: NaN dq for the row, NaN dk / dv for the keys it sees (as the CUDA-core
// kernel).
//
// Two kernels, both deterministic (no atomics):
//   dQ     one CTA of kWarps warps per (query tile of kBM rows, query head, batch) walks the forward's list of kept
//          key tiles (tc_build_tiles). Q and dO [kBM, D] load once; K and V [kBN, D] are double-buffered with
//          cp.async. Warps split the query rows (16 each) as in the forward: S = Q K^T and dP = dO V^T on mma (K and
//          V as K-major B operands through ldmatrix), P and dS in fp32 registers, dS rounded to the storage dtype
//          straight into A fragments, dQ += dS K with K^T read by ldmatrix.trans of the same K tile. dQ is written
//          once at the end (rows with no kept tile get 0). It recomputes S and dP (the dK / dV kernel does too):
//          the price of needing neither atomics nor a [Lq, D] fp32 accumulator.
//   dK dV  one CTA per (key tile of kBN rows, kv head, batch, split) walks, for the query heads of its GQA group
//          (split s of S takes heads s, s + S, ...), the transposed list of kept query tiles of its key tile
//          (tc_build_tiles_t). K and V load once; Q, dO, lse and Delta of each query tile are double-buffered. The
//          GEMMs run with the keys as M (16 per warp), so that every product of the backward has its operand
//          from registers or from ldmatrix of a tile as stored, and nothing goes through shared memory:
//            S^T = K Q^T, dP^T = V dO^T   (A = K / V, B = Q / dO rows, both K-major in D);
//            P^T, dS^T in registers       (lse / Delta indexed by the column, from shared memory);
//            dV += P^T dO, dK += dS^T Q   (A = P^T / dS^T from the accumulators, B = dO^T / Q^T by ldmatrix.trans).
//          The query tile is processed in pieces of kSub rows (16 at D = 128: the dK and dV accumulators take 2 D
//          registers per thread, a 64-wide S^T tile would not fit beside them). Query-tile stages are stored as
//          kBM / kSub independent swizzled [kSub, D] sub-tiles.
//          With S = 1 the CTA writes dK (scaled) and dV in the storage dtype; with S > 1 it writes fp32 partial
//          sums [S, B, Hkv, Lk, D] that a reduction pass (sparse_attn_tc.cu) adds in split order. Every key row
//          is written, zeros when no query tile keeps it.
// Masking per element as the forward: keys past Lk / queries past Lq, causal (key > query + off), and the block
// mask on partial tiles; tiles that need none of it skip the checks.
#pragma once
#include "sparse_attn/sparse_attn_tc_bwd_launch.h"
#include "sparse_attn/sparse_attn_tc_kernels.cuh"

#if PEFTCORE_HAS_CUTLASS

namespace peftcore::sparse_attn::cuda::tc_kernels {

using namespace cute;

template <int kDType, int kD_, int kBM_, int kBN_, int kWarps_, int kSub_>
struct BwdTraits : Traits<kDType, kD_, kBM_, kBN_, kWarps_> {
  using Base = Traits<kDType, kD_, kBM_, kBN_, kWarps_>;
  using Element = typename Base::Element;
  static constexpr int kD = kD_, kBM = kBM_, kBN = kBN_, kWarps = kWarps_, kSub = kSub_;
  static_assert(kBM == kBN, "one [64, D] layout (and its transposed view) for Q, dO, K and V tiles");
  static_assert(kBM % kSub == 0 && kSub % 16 == 0 && kSub % (Base::kThreads / 8) == 0, "query sub-tiles");
  using SmemSub = decltype(tile_to_shape(typename Base::SmemAtom{}, Shape<Int<kSub>, Int<kD>>{}));
  // One 64-column chunk of a [kSub, D] sub-tile seen transposed, [64, kSub]: the atoms tile the rows first, so
  // chunk c is the contiguous [kSub, 64] block at element c kSub 64 (a multiple of the 512-element swizzle atom).
  using SmemSub64 = decltype(tile_to_shape(typename Base::SmemAtom{}, Shape<Int<kSub>, _64>{}));
  using SmemSubT64 = decltype(composition(SmemSub64{}, make_layout(Shape<_64, Int<kSub>>{}, GenRowMajor{})));
  static constexpr int kTile = kBM * kD;  // elements of one [64, D] tile
  static constexpr int kDqSmem = 6 * kTile * static_cast<int>(sizeof(Element));
  static constexpr int kDkdvSmem = 6 * kTile * static_cast<int>(sizeof(Element)) + 4 * kBM * 4;
  static_assert(kDqSmem == ::peftcore::sparse_attn::tc::bwd_smem_bytes(
                               ::peftcore::sparse_attn::tc::kBwdDq, kD,
                               ::peftcore::sparse_attn::tc::Config{kBM, kBN, kWarps}) &&
                    kDkdvSmem == ::peftcore::sparse_attn::tc::bwd_smem_bytes(
                                     ::peftcore::sparse_attn::tc::kBwdDkdv, kD,
                                     ::peftcore::sparse_attn::tc::Config{kBM, kBN, kWarps}),
                "the host planner's shared memory sizes must be the kernels'");
};

// The row's lse in base 2 for recomputing P: +inf for rows that saw nothing (lse = -inf), so P = 0 there.
__device__ __forceinline__ float lse_log2(float lse) {
  constexpr float kInf = __builtin_huge_valf(), kLog2e = 1.4426950408889634f;
  return lse == -kInf ? kInf : lse * kLog2e;
}

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads) bwd_dq_kernel(const Params p) {
  using Element = typename Tr::Element;
  constexpr int kD = Tr::kD, kBM = Tr::kBM, kBN = Tr::kBN;
  constexpr float kInf = __builtin_huge_valf();
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* sq_ptr = reinterpret_cast<Element*>(smem_raw);
  Element* sg_ptr = sq_ptr + Tr::kSmemQ;  // dO
  Element* sk_ptr = sg_ptr + Tr::kSmemQ;
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

  const int64_t qrow0 = (b * p.Hq + h) * p.Lq + r0;  // row index of the tile's first query in [B, Hq, Lq]
  const Element* qg = static_cast<const Element*>(p.q) + qrow0 * kD;
  const Element* gg = static_cast<const Element*>(p.grad_out) + qrow0 * kD;
  const Element* kg = static_cast<const Element*>(p.k) + (b * p.Hkv + hk) * p.Lk * kD;
  const Element* vg = static_cast<const Element*>(p.v) + (b * p.Hkv + hk) * p.Lk * kD;
  using GLayout = Layout<Shape<Int<kBM>, Int<kD>>, Stride<Int<kD>, _1>>;

  Tensor sQ = make_tensor(make_smem_ptr(sq_ptr), typename Tr::SmemQ{});
  Tensor sG = make_tensor(make_smem_ptr(sg_ptr), typename Tr::SmemQ{});
  const auto sK = [&](int stage) {
    return make_tensor(make_smem_ptr(sk_ptr + stage * Tr::kSmemKV), typename Tr::SmemKV{});
  };
  const auto sV = [&](int stage) {
    return make_tensor(make_smem_ptr(sv_ptr + stage * Tr::kSmemKV), typename Tr::SmemKV{});
  };
  const auto sKt = [&](int stage) {  // K^T [D, kBN]: the B operand of dS K
    return make_tensor(make_smem_ptr(sk_ptr + stage * Tr::kSmemKV), typename Tr::SmemVt{});
  };

  typename Tr::GmemCopy gmem_copy;
  const Tensor idT = make_identity_tensor(Shape<Int<kBM>, Int<kD>>{});
  const auto load_kv = [&](int64_t n, int stage) {
    const int valid = static_cast<int>(p.Lk - n * kBN < kBN ? p.Lk - n * kBN : kBN);
    Tensor gK = make_tensor(make_gmem_ptr(kg + n * kBN * kD), GLayout{});
    Tensor gV = make_tensor(make_gmem_ptr(vg + n * kBN * kD), GLayout{});
    Tensor sk = sK(stage);
    Tensor sv = sV(stage);
    load_rows(gmem_copy, gK, sk, idT, valid);
    load_rows(gmem_copy, gV, sv, idT, valid);
  };

  typename Tr::TiledMma mma;
  auto thr_mma = mma.get_slice(tid);
  Tensor acc_dq = partition_fragment_C(mma, Shape<Int<kBM>, Int<kD>>{});   // (4, MMA_M, D / 8) fp32
  Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});   // (4, MMA_M, kBN / 8) fp32
  Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kBM>, Int<kBN>>{});
  Tensor rQ = make_tensor<Element>(partition_shape_A(mma, Shape<Int<kBM>, Int<kD>>{}));
  Tensor rG = make_tensor<Element>(partition_shape_A(mma, Shape<Int<kBM>, Int<kD>>{}));
  Tensor rK = make_tensor<Element>(partition_shape_B(mma, Shape<Int<kBN>, Int<kD>>{}));
  Tensor rV = make_tensor<Element>(partition_shape_B(mma, Shape<Int<kBN>, Int<kD>>{}));
  Tensor rKt = make_tensor<Element>(partition_shape_B(mma, Shape<Int<kD>, Int<kBN>>{}));
  Tensor rdS = make_tensor<Element>(partition_shape_A(mma, Shape<Int<kBM>, Int<kBN>>{}));  // (8, MMA_M, kBN / 16)
  constexpr int kMmaM = decltype(size<1>(acc_s))::value;
  constexpr int kMmaN = decltype(size<2>(acc_s))::value;
  constexpr int kMmaD = decltype(size<2>(acc_dq))::value;
  constexpr int kRows = 2 * kMmaM;  // rows per thread
  static_assert(decltype(size<0>(acc_s))::value == 4 && decltype(size<0>(rdS))::value == 8 &&
                    decltype(size<2>(rdS))::value * 2 == kMmaN, "m16n8k16 fragments");

  const auto ldsm_a = make_tiled_copy_A(typename Tr::LdsmA{}, mma);
  const auto ldsm_b = make_tiled_copy_B(typename Tr::LdsmB{}, mma);
  const auto ldsm_bt = make_tiled_copy_B(typename Tr::LdsmBt{}, mma);
  auto ldsm_a_thr = ldsm_a.get_slice(tid);
  auto ldsm_b_thr = ldsm_b.get_slice(tid);
  auto ldsm_bt_thr = ldsm_bt.get_slice(tid);
  Tensor tQs = ldsm_a_thr.partition_S(sQ);
  Tensor tQr = ldsm_a_thr.retile_D(rQ);
  Tensor tGs = ldsm_a_thr.partition_S(sG);
  Tensor tGr = ldsm_a_thr.retile_D(rG);
  Tensor tKr = ldsm_b_thr.retile_D(rK);
  Tensor tVr = ldsm_b_thr.retile_D(rV);
  Tensor tKtr = ldsm_bt_thr.retile_D(rKt);

  const Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kBN>>{}));
  const Tensor tOcO = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBM>, Int<kD>>{}));

  float lse2[kRows], dlt[kRows];
  int64_t mask_row[kRows];  // block-mask offset I * Kb of the row, -1 past Lq
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int row = get<0>(tScS(2 * (r % 2), r / 2, 0));
    const bool in = row < q_rows;
    lse2[r] = in ? lse_log2(p.lse[qrow0 + row]) : kInf;
    dlt[r] = in ? p.delta[qrow0 + row] : 0.f;
    mask_row[r] = in ? ((r0 + row) / p.bs) * p.Kb : -1;
  }
  clear(acc_dq);
  const float scale_log2 = p.scale * kLog2e;
  const int bs32 = p.bs < 0x7fffffff ? static_cast<int>(p.bs) : 0x7fffffff;

  if (count > 0) {
    Tensor gQ = make_tensor(make_gmem_ptr(qg), GLayout{});
    Tensor gG = make_tensor(make_gmem_ptr(gg), GLayout{});
    load_rows(gmem_copy, gQ, sQ, idT, q_rows);
    load_rows(gmem_copy, gG, sG, idT, q_rows);
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
    clear(acc_dp);
    {
      Tensor sk = sK(stage);
      Tensor sv = sV(stage);
      Tensor tKs = ldsm_b_thr.partition_S(sk);
      Tensor tVs = ldsm_b_thr.partition_S(sv);
      gemm_ss(mma, acc_s, rQ, tQr, tQs, ldsm_a, rK, tKr, tKs, ldsm_b);
      gemm_ss(mma, acc_dp, rG, tGr, tGs, ldsm_a, rV, tVr, tVs, ldsm_b);
    }

    // P and dS per element; dS rounded into the A fragments (value j of k16 slice kk is C value j % 4 of the n8
    // block 2 kk + j / 4).
    const bool check = c0 + kBN > p.Lk || (p.causal && c0 + kBN - 1 > r0 + p.off) || partial;
    CUTE_UNROLL
    for (int mi = 0; mi < kMmaM; ++mi)
      CUTE_UNROLL
      for (int ni = 0; ni < kMmaN; ++ni)
        CUTE_UNROLL
        for (int v = 0; v < 4; ++v) {
          const int r = 2 * mi + v / 2;
          bool vis = true;
          if (check) {
            const int64_t row = r0 + get<0>(tScS(v, mi, ni));
            const int64_t col = c0 + get<1>(tScS(v, mi, ni));
            vis = col < p.Lk && (!p.causal || col <= row + p.off);
            if (vis && partial) vis = mask_row[r] >= 0 && mask[mask_row[r] + static_cast<int>(col) / bs32];
          }
          const float pv = vis ? exp2f(acc_s(v, mi, ni) * scale_log2 - lse2[r]) : 0.f;
          const float ds = pv == 0.f ? 0.f : pv * (acc_dp(v, mi, ni) - dlt[r]);
          rdS(v + 4 * (ni % 2), mi, ni / 2) = static_cast<Element>(ds);
        }

    {
      Tensor skt = sKt(stage);
      Tensor tKts = ldsm_bt_thr.partition_S(skt);
      gemm_rs(mma, acc_dq, rdS, rKt, tKtr, tKts, ldsm_bt);
    }
    __syncthreads();  // every warp is done with this stage before the next iteration refills it
  }

  Element* dqg = static_cast<Element*>(p.dq) + qrow0 * kD;
  CUTE_UNROLL
  for (int mi = 0; mi < kMmaM; ++mi)
    CUTE_UNROLL
    for (int nd = 0; nd < kMmaD; ++nd)
      CUTE_UNROLL
      for (int v = 0; v < 4; ++v) {
        const int row = get<0>(tOcO(v, mi, nd)), col = get<1>(tOcO(v, mi, nd));
        if (row < q_rows) dqg[row * kD + col] = static_cast<Element>(acc_dq(v, mi, nd) * p.scale);
      }
}

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads) bwd_dkdv_kernel(const Params p) {
  using Element = typename Tr::Element;
  constexpr int kD = Tr::kD, kBM = Tr::kBM, kBN = Tr::kBN, kSub = Tr::kSub;
  constexpr int kSubs = kBM / kSub;
  constexpr int kSubElems = kSub * kD;
  constexpr float kInf = __builtin_huge_valf();
  constexpr float kLog2e = 1.4426950408889634f;

  extern __shared__ __align__(128) unsigned char smem_raw[];
  Element* sk_ptr = reinterpret_cast<Element*>(smem_raw);
  Element* sv_ptr = sk_ptr + Tr::kTile;
  Element* sq_ptr = sv_ptr + Tr::kTile;      // 2 stages of kSubs [kSub, D] sub-tiles
  Element* sg_ptr = sq_ptr + 2 * Tr::kTile;  // dO, the same
  float* sl_ptr = reinterpret_cast<float*>(sg_ptr + 2 * Tr::kTile);  // lse in base 2, [2][kBM]
  float* sd_ptr = sl_ptr + 2 * kBM;                                   // Delta, [2][kBM]

  const int tid = threadIdx.x;
  const int64_t n_tile = blockIdx.x;
  const int64_t S = p.tc_bwd_splits;
  const int64_t split = blockIdx.y % S, hk = blockIdx.y / S, b = blockIdx.z;
  const int64_t G = p.Hq / p.Hkv;
  const int64_t c0 = n_tile * kBN;
  const int k_rows = static_cast<int>(p.Lk - c0 < kBN ? p.Lk - c0 : kBN);
  const int64_t mb = p.mask_b > 1 ? b : 0;
  const auto list_row = [&](int64_t g) {
    const int64_t mh = p.mask_h > 1 ? hk * G + g : 0;
    return (mb * p.mask_h + mh) * p.tc_Nt + n_tile;
  };
  const auto count_of = [&](int64_t g) { return p.tc_t_count[list_row(g)]; };
  const auto entry_of = [&](int64_t g, int i) { return p.tc_t_entries[list_row(g) * p.tc_Mt + i]; };

  const int64_t krow0 = (b * p.Hkv + hk) * p.Lk + c0;
  const Element* kg = static_cast<const Element*>(p.k) + krow0 * kD;
  const Element* vg = static_cast<const Element*>(p.v) + krow0 * kD;
  using GLayoutT = Layout<Shape<Int<kBN>, Int<kD>>, Stride<Int<kD>, _1>>;
  using GLayoutSub = Layout<Shape<Int<kSub>, Int<kD>>, Stride<Int<kD>, _1>>;

  Tensor sK = make_tensor(make_smem_ptr(sk_ptr), typename Tr::SmemKV{});
  Tensor sV = make_tensor(make_smem_ptr(sv_ptr), typename Tr::SmemKV{});
  const auto sQ = [&](int stage, int sub) {
    return make_tensor(make_smem_ptr(sq_ptr + stage * Tr::kTile + sub * kSubElems), typename Tr::SmemSub{});
  };
  const auto sG = [&](int stage, int sub) {
    return make_tensor(make_smem_ptr(sg_ptr + stage * Tr::kTile + sub * kSubElems), typename Tr::SmemSub{});
  };
  // Column chunk c (64 of D) of a sub-tile, transposed: the B operands of dK += dS^T Q and dV += P^T dO.
  const auto sQt = [&](int stage, int sub, int c) {
    return make_tensor(make_smem_ptr(sq_ptr + stage * Tr::kTile + sub * kSubElems + c * kSub * 64),
                       typename Tr::SmemSubT64{});
  };
  const auto sGt = [&](int stage, int sub, int c) {
    return make_tensor(make_smem_ptr(sg_ptr + stage * Tr::kTile + sub * kSubElems + c * kSub * 64),
                       typename Tr::SmemSubT64{});
  };

  typename Tr::GmemCopy gmem_copy;
  const Tensor idT = make_identity_tensor(Shape<Int<kBN>, Int<kD>>{});
  const Tensor idSub = make_identity_tensor(Shape<Int<kSub>, Int<kD>>{});
  // Q, dO rows of query tile m of head group index g, with their lse (base 2) and Delta, into `stage`.
  const auto load_q = [&](int64_t g, int64_t m, int stage) {
    const int64_t r0 = m * kBM;
    const int64_t qrow0 = (b * p.Hq + hk * G + g) * p.Lq + r0;
    const int valid = static_cast<int>(p.Lq - r0 < kBM ? p.Lq - r0 : kBM);
    const Element* qg = static_cast<const Element*>(p.q) + qrow0 * kD;
    const Element* gg = static_cast<const Element*>(p.grad_out) + qrow0 * kD;
#pragma unroll 1  // the sub-tiles one after another (addresses in few registers)
    for (int sub = 0; sub < kSubs; ++sub) {
      Tensor gQ = make_tensor(make_gmem_ptr(qg + sub * kSubElems), GLayoutSub{});
      Tensor gG = make_tensor(make_gmem_ptr(gg + sub * kSubElems), GLayoutSub{});
      Tensor sq = sQ(stage, sub);
      Tensor sg = sG(stage, sub);
      load_rows(gmem_copy, gQ, sq, idSub, valid - sub * kSub);
      load_rows(gmem_copy, gG, sg, idSub, valid - sub * kSub);
    }
    for (int r = tid; r < kBM; r += Tr::kThreads) {
      sl_ptr[stage * kBM + r] = r < valid ? lse_log2(p.lse[qrow0 + r]) : kInf;
      sd_ptr[stage * kBM + r] = r < valid ? p.delta[qrow0 + r] : 0.f;
    }
  };

  typename Tr::TiledMma mma;
  auto thr_mma = mma.get_slice(tid);
  // dK and dV per 64-column chunk of D (kDC chunks): the B fragments of their GEMMs then cover 64 columns per k16
  // slice (16 registers, 32 with the slice loaded ahead) instead of D.
  constexpr int kDC = kD / 64;
  using AccChunk = decltype(partition_fragment_C(mma, Shape<Int<kBN>, _64>{}));  // (4, MMA_M, 8) fp32
  AccChunk acc_dk[kDC], acc_dv[kDC];
  Tensor acc_s = partition_fragment_C(mma, Shape<Int<kBN>, Int<kSub>>{});  // S^T, then P^T (4, MMA_M, kSub / 8)
  Tensor acc_dp = partition_fragment_C(mma, Shape<Int<kBN>, Int<kSub>>{});
  Tensor rK = make_tensor<Element>(partition_shape_A(mma, Shape<Int<kBN>, Int<kD>>{}));
  Tensor rV = make_tensor<Element>(partition_shape_A(mma, Shape<Int<kBN>, Int<kD>>{}));
  Tensor rQ = make_tensor<Element>(partition_shape_B(mma, Shape<Int<kSub>, Int<kD>>{}));
  Tensor rG = make_tensor<Element>(partition_shape_B(mma, Shape<Int<kSub>, Int<kD>>{}));
  Tensor rQt = make_tensor<Element>(partition_shape_B(mma, Shape<_64, Int<kSub>>{}));
  Tensor rGt = make_tensor<Element>(partition_shape_B(mma, Shape<_64, Int<kSub>>{}));
  Tensor rP = make_tensor<Element>(partition_shape_A(mma, Shape<Int<kBN>, Int<kSub>>{}));  // (8, MMA_M, kSub / 16)
  Tensor rdS = make_tensor<Element>(partition_shape_A(mma, Shape<Int<kBN>, Int<kSub>>{}));
  constexpr int kMmaM = decltype(size<1>(acc_s))::value;
  constexpr int kMmaN = decltype(size<2>(acc_s))::value;
  constexpr int kMmaD = decltype(size<2>(AccChunk{}))::value;  // n8 blocks per chunk
  constexpr int kRows = 2 * kMmaM;  // key rows per thread
  static_assert(decltype(size<0>(acc_s))::value == 4 && decltype(size<0>(rP))::value == 8 &&
                    decltype(size<2>(rP))::value * 2 == kMmaN, "m16n8k16 fragments");

  const auto ldsm_a = make_tiled_copy_A(typename Tr::LdsmA{}, mma);
  const auto ldsm_b = make_tiled_copy_B(typename Tr::LdsmB{}, mma);
  const auto ldsm_bt = make_tiled_copy_B(typename Tr::LdsmBt{}, mma);
  auto ldsm_a_thr = ldsm_a.get_slice(tid);
  auto ldsm_b_thr = ldsm_b.get_slice(tid);
  auto ldsm_bt_thr = ldsm_bt.get_slice(tid);
  Tensor tKs = ldsm_a_thr.partition_S(sK);
  Tensor tKr = ldsm_a_thr.retile_D(rK);
  Tensor tVs = ldsm_a_thr.partition_S(sV);
  Tensor tVr = ldsm_a_thr.retile_D(rV);
  Tensor tQr = ldsm_b_thr.retile_D(rQ);
  Tensor tGr = ldsm_b_thr.retile_D(rG);
  Tensor tQtr = ldsm_bt_thr.retile_D(rQt);
  Tensor tGtr = ldsm_bt_thr.retile_D(rGt);

  // (key, query) inside the tile / sub-tile of every accumulator element; a thread's key row r of acc(v, mi, .)
  // is slot 2 mi + v / 2.
  const Tensor tScS = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBN>, Int<kSub>>{}));
  const Tensor tOcO = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBN>, _64>{}));

  int key_blk[kRows];  // block index J of the row's key, -1 past Lk
  const int bs32 = p.bs < 0x7fffffff ? static_cast<int>(p.bs) : 0x7fffffff;
  CUTE_UNROLL
  for (int r = 0; r < kRows; ++r) {
    const int key = get<0>(tScS(2 * (r % 2), r / 2, 0));
    key_blk[r] = key < k_rows ? static_cast<int>((c0 + key) / bs32) : -1;
  }
  CUTE_UNROLL
  for (int c = 0; c < kDC; ++c) {
    clear(acc_dk[c]);
    clear(acc_dv[c]);
  }
  const float scale_log2 = p.scale * kLog2e;

  // The (head, list position) pairs of this CTA in order: heads split, split + S, ... of the group, each over its
  // transposed list. A pipeline across heads: the next pair's tile loads while this one computes.
  int64_t g = split;
  int i = 0;
  while (g < G && count_of(g) == 0) g += S;
  if (g < G) {
    Tensor gK = make_tensor(make_gmem_ptr(kg), GLayoutT{});
    Tensor gV = make_tensor(make_gmem_ptr(vg), GLayoutT{});
    load_rows(gmem_copy, gK, sK, idT, k_rows);
    load_rows(gmem_copy, gV, sV, idT, k_rows);
    load_q(g, entry_of(g, 0) >> 1, 0);
    cp_async_fence();
  }
  for (int stage = 0; g < G; stage ^= 1) {
    const int32_t entry = entry_of(g, i);
    const int64_t r0 = static_cast<int64_t>(entry >> 1) * kBM;
    const bool partial = (entry & 1) != 0;
    const bool* mask = p.mask + (mb * p.mask_h + (p.mask_h > 1 ? hk * G + g : 0)) * p.Qb * p.Kb;
    int64_t next_g = g;
    int next_i = i + 1;
    while (next_g < G && next_i >= count_of(next_g)) {
      next_g += S;
      next_i = 0;
    }
    if (next_g < G) {
      load_q(next_g, entry_of(next_g, next_i) >> 1, stage ^ 1);
      cp_async_fence();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    const bool check_tile = r0 + kBM > p.Lq || (p.causal && c0 + kBN - 1 > r0 + p.off) || partial;
#pragma unroll 1  // one sub-tile's fragments live at a time
    for (int sub = 0; sub < kSubs; ++sub) {
      const int64_t q0 = r0 + sub * kSub;  // first query of the sub-tile
      if (q0 >= p.Lq) break;  // past the last query
      if (p.causal && c0 > q0 + kSub - 1 + p.off) continue;  // every key after every query: P = 0
      const float* lse_s = sl_ptr + stage * kBM + sub * kSub;
      const float* dlt_s = sd_ptr + stage * kBM + sub * kSub;
      const bool check = check_tile && (q0 + kSub > p.Lq || (p.causal && c0 + kBN - 1 > q0 + p.off) || partial);

      // S^T = K Q^T, then P^T in place (fp32) and rounded into the A fragments.
      clear(acc_s);
      {
        Tensor sq = sQ(stage, sub);
        Tensor tQs = ldsm_b_thr.partition_S(sq);
        gemm_ss(mma, acc_s, rK, tKr, tKs, ldsm_a, rQ, tQr, tQs, ldsm_b);
      }
      CUTE_UNROLL
      for (int mi = 0; mi < kMmaM; ++mi)
        CUTE_UNROLL
        for (int ni = 0; ni < kMmaN; ++ni)
          CUTE_UNROLL
          for (int v = 0; v < 4; ++v) {
            const int r = 2 * mi + v / 2;
            const int qc = get<1>(tScS(v, mi, ni));
            bool vis = true;
            if (check) {
              const int64_t key = c0 + get<0>(tScS(v, mi, ni));
              const int64_t query = q0 + qc;
              vis = key_blk[r] >= 0 && query < p.Lq && (!p.causal || key <= query + p.off);
              if (vis && partial) vis = mask[static_cast<int64_t>(static_cast<int>(query) / bs32) * p.Kb + key_blk[r]];
            }
            const float pv = vis ? exp2f(acc_s(v, mi, ni) * scale_log2 - lse_s[qc]) : 0.f;
            acc_s(v, mi, ni) = pv;
            rP(v + 4 * (ni % 2), mi, ni / 2) = static_cast<Element>(pv);
          }

      // dV += P^T dO
      CUTE_UNROLL
      for (int c = 0; c < kDC; ++c) {
        Tensor sgt = sGt(stage, sub, c);
        Tensor tGts = ldsm_bt_thr.partition_S(sgt);
        gemm_rs(mma, acc_dv[c], rP, rGt, tGtr, tGts, ldsm_bt);
      }

      // dP^T = V dO^T, dS^T = P^T (dP^T - Delta)
      clear(acc_dp);
      {
        Tensor sg = sG(stage, sub);
        Tensor tGs = ldsm_b_thr.partition_S(sg);
        gemm_ss(mma, acc_dp, rV, tVr, tVs, ldsm_a, rG, tGr, tGs, ldsm_b);
      }
      CUTE_UNROLL
      for (int mi = 0; mi < kMmaM; ++mi)
        CUTE_UNROLL
        for (int ni = 0; ni < kMmaN; ++ni)
          CUTE_UNROLL
          for (int v = 0; v < 4; ++v) {
            const float pv = acc_s(v, mi, ni);
            const float ds = pv == 0.f ? 0.f : pv * (acc_dp(v, mi, ni) - dlt_s[get<1>(tScS(v, mi, ni))]);
            rdS(v + 4 * (ni % 2), mi, ni / 2) = static_cast<Element>(ds);
          }

      // dK += dS^T Q (scaled at the end)
      CUTE_UNROLL
      for (int c = 0; c < kDC; ++c) {
        Tensor sqt = sQt(stage, sub, c);
        Tensor tQts = ldsm_bt_thr.partition_S(sqt);
        gemm_rs(mma, acc_dk[c], rdS, rQt, tQtr, tQts, ldsm_bt);
      }
    }
    __syncthreads();  // every warp is done with this stage before the next pair refills it
    g = next_g;
    i = next_i;
  }

  // Every key row of the tile: dK = scale dS^T Q, dV; zeros when nothing kept it.
  const bool whole = S == 1;
  Element* dkg = static_cast<Element*>(p.dk) + krow0 * kD;
  Element* dvg = static_cast<Element*>(p.dv) + krow0 * kD;
  const int64_t part = split * p.B * p.Hkv * p.Lk * kD + krow0 * kD;
  CUTE_UNROLL
  for (int c = 0; c < kDC; ++c)
    CUTE_UNROLL
    for (int mi = 0; mi < kMmaM; ++mi)
      CUTE_UNROLL
      for (int nd = 0; nd < kMmaD; ++nd)
        CUTE_UNROLL
        for (int v = 0; v < 4; ++v) {
          const int row = get<0>(tOcO(v, mi, nd)), col = c * 64 + get<1>(tOcO(v, mi, nd));
          if (row >= k_rows) continue;
          const float dk = acc_dk[c](v, mi, nd) * p.scale, dv = acc_dv[c](v, mi, nd);
          if (whole) {
            dkg[row * kD + col] = static_cast<Element>(dk);
            dvg[row * kD + col] = static_cast<Element>(dv);
          } else {
            p.dk_part[part + row * kD + col] = dk;
            p.dv_part[part + row * kD + col] = dv;
          }
        }
}

template <class Kern>
void launch_bwd(Kern kern, dim3 grid, int threads, int smem, const Params& p, cudaStream_t stream, const char* what) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  cudaError_t e = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (e == cudaSuccess) {
    kern<<<grid, threads, smem, stream>>>(p);
    e = cudaGetLastError();
  }
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("peftcore sparse_attn CUDA: tensor-core backward ") + what +
                             " launch: " + cudaGetErrorString(e));
  }
}

template <int kDType, int kD, int kBM, int kBN, int kWarps>
void backward_dq_launch(const Params& p, cudaStream_t stream) {
  using Tr = BwdTraits<kDType, kD, kBM, kBN, kWarps, bwd_sub_rows(kD, kBM)>;
  if (p.tc_Mt > 0x7fffffff || p.Hq > 65535 || p.B > 65535)
    throw std::runtime_error("peftcore sparse_attn CUDA: tensor-core backward dq: grid too large");
  launch_bwd(bwd_dq_kernel<Tr>,
             dim3(static_cast<unsigned>(p.tc_Mt), static_cast<unsigned>(p.Hq), static_cast<unsigned>(p.B)),
             Tr::kThreads, Tr::kDqSmem, p, stream, "dq");
}

template <int kDType, int kD, int kBM, int kBN, int kWarps>
void backward_dkdv_launch(const Params& p, cudaStream_t stream) {
  using Tr = BwdTraits<kDType, kD, kBM, kBN, kWarps, bwd_sub_rows(kD, kBM)>;
  const int64_t y = p.Hkv * p.tc_bwd_splits;
  if (p.tc_Nt > 0x7fffffff || y > 65535 || p.B > 65535 || p.tc_bwd_splits < 1)
    throw std::runtime_error("peftcore sparse_attn CUDA: tensor-core backward dk / dv: grid too large");
  launch_bwd(bwd_dkdv_kernel<Tr>,
             dim3(static_cast<unsigned>(p.tc_Nt), static_cast<unsigned>(y), static_cast<unsigned>(p.B)),
             Tr::kThreads, Tr::kDkdvSmem, p, stream, "dk / dv");
}

}  // namespace peftcore::sparse_attn::cuda::tc_kernels

#define PEFTCORE_SPARSE_ATTN_TC_BWD_INSTANTIATE(DTYPE, D, BM, BN, WARPS)                                  \
  namespace peftcore::sparse_attn::cuda::tc_kernels {                                                   \
  template void backward_dq_launch<static_cast<int>(::peftcore::CudaDType::DTYPE), D, BM, BN, WARPS>(    \
      const Params&, cudaStream_t);                                                                     \
  template void backward_dkdv_launch<static_cast<int>(::peftcore::CudaDType::DTYPE), D, BM, BN, WARPS>(  \
      const Params&, cudaStream_t);                                                                     \
  }
#else
#define PEFTCORE_SPARSE_ATTN_TC_BWD_INSTANTIATE(DTYPE, D, BM, BN, WARPS)
#endif
