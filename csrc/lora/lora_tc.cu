// lora tensor-core kernels (CuTe, sm_80 mma.sync m16n8k16 with fp32 accumulation; runs on sm_80 / 86 / 89 / 90):
// the grouped (SGMV) forms of the shrink and the expand over pairs sorted by adapter (lora_cuda.cpp sorts them on
// the device). fp16 / bf16 only; fp32 takes the CUDA-core kernels of lora.cu.
//
// Work. A tile is up to 64 pairs of one adapter (the sorted run perm[starts[i]:starts[i+1]] cut in 64s). The
// grid is an upper bound on the tile count (sum_i ceil(n_i / 64) <= ceil(P / 64) + N, known from shapes only);
// each CTA finds its (adapter, tile) by walking the adapters' run lengths (N reads, cached) and returns when
// past the last tile, so nothing is read back on the host (lora_tc_plan.h, checked on the CPU through the
// lora_tc_tiles op).
//   shrink  C[64 pairs, 64 rank rows] = X_tile [64, in] . A_i[m0 .. m0+64, :]^T, K = in in steps of 64; X rows
//           gathered through perm (a pair's token row), A_i rows contiguous. Ranks above 64 take several passes.
//           Epilogue: h[p, off_i + m] = ws(p) * C (fp32) when weighted, else C.
//   expand  C[64 pairs, 64 output columns] = H_tile [64, r_i] . B_i[o0 .. o0+64, :]^T, K = r_i in steps of 64;
//           H rows are the pairs' packed columns (fp32 or storage dtype, times ws(p) when weighted) rounded to the
//           storage dtype, B_i rows are b_packed[o, off_i : off_i + r_i]. Epilogue: y[t, o] (+)= C. Only called
//           with one slot per token (k = 1), so no two tiles write one row.
// Both are "A . B^T with both operands K-contiguous": one CTA of 4 warps (16 rows each) on a 64 x 64 fp32
// accumulator, operands staged in shared memory as 64 x 64 tiles of the storage dtype, cut in 8 x 64 atoms
// swizzled (Swizzle<3,3,3>) so the 16-byte stores and the ldmatrix reads of 8 rows hit distinct bank groups.
// Loads are plain 16-byte global loads when the row start is 16-byte aligned and the 8 elements are inside K,
// else guarded scalar loads; everything outside the valid rows / K is zero, so it adds nothing. No cp.async
// pipeline: a CTA uses 16 KiB of static shared memory, so several CTAs share an SM and hide each other's loads.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_common.cuh"
#include "lora/lora_kernels.cuh"
#include "lora/lora_launch.h"
#include "lora/lora_tc_plan.h"

#if PEFTCORE_HAS_CUTLASS
#include <cute/tensor.hpp>  // first: the atom headers below rely on it
#include <cute/atom/copy_atom.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cutlass/numeric_types.h>
#endif

namespace peftcore::lora::cuda {

#if PEFTCORE_HAS_CUTLASS
namespace tc {

using namespace cute;
using kernels::Adapter;
using kernels::weight_of;

constexpr int kTile = static_cast<int>(tc_plan::kTile), kThreads = 128;

template <int kDType>
struct ElementOf;
template <>
struct ElementOf<static_cast<int>(DType::kFloat16)> {
  using type = cute::half_t;
  using Mma = SM80_16x8x16_F32F16F16F32_TN;
};
template <>
struct ElementOf<static_cast<int>(DType::kBFloat16)> {
  using type = cute::bfloat16_t;
  using Mma = SM80_16x8x16_F32BF16BF16F32_TN;
};

template <int kDType>
struct Traits {
  using Element = typename ElementOf<kDType>::type;
  using TiledMma = TiledMMA<MMA_Atom<typename ElementOf<kDType>::Mma>, Layout<Shape<_4, _1, _1>>, Tile<_64, _16, _16>>;
  using SmemAtom = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  using SmemTile = decltype(tile_to_shape(SmemAtom{}, Shape<_64, _64>{}));
  using Ldsm = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
};

using tc_plan::TileRef;

__device__ __forceinline__ bool find_tile(const Pairs& pr, const int64_t* __restrict__ starts, int64_t b,
                                          TileRef& t) {
  return tc_plan::find_tile(pr.offsets, starts, pr.N, pr.R, b, t);
}

// Row `row` of a staged tile: 8 elements per thread pass (64 rows x 8 chunks over 128 threads: 4 passes). `src`
// points at the row's element k0 (or is null for a zero row); `valid` elements of K remain from k0; `vec` says
// 16-byte loads are allowed for this row (aligned start); f multiplies (expand's weights).
template <typename Element, typename S>
__device__ __forceinline__ float element_at(const S* src, int e) {
  if constexpr (sizeof(S) == 4) return static_cast<float>(src[e]);
  else return static_cast<float>(reinterpret_cast<const Element*>(src)[e]);
}

template <typename Element, typename S>
__device__ __forceinline__ void stage_chunk(Element* smem, int offset, const S* src, int64_t valid, bool vec,
                                            float f) {
  uint4 v;
  if (src != nullptr && vec && valid >= 8 && sizeof(S) == sizeof(Element) && f == 1.f) {
    v = *reinterpret_cast<const uint4*>(src);
  } else {
    // Two elements per 32-bit word, built in registers (no local array).
    uint32_t w[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const float lo = src != nullptr && 2 * q < valid ? element_at<Element, S>(src, 2 * q) * f : 0.f;
      const float hi = src != nullptr && 2 * q + 1 < valid ? element_at<Element, S>(src, 2 * q + 1) * f : 0.f;
      w[q] = static_cast<uint32_t>(static_cast<Element>(lo).raw()) |
             (static_cast<uint32_t>(static_cast<Element>(hi).raw()) << 16);
    }
    v = make_uint4(w[0], w[1], w[2], w[3]);
  }
  *reinterpret_cast<uint4*>(smem + offset) = v;
}

// acc += sA . sB^T over the 64-wide K of the staged tiles (ldmatrix one 16-slice ahead, then mma.sync).
template <class Tr, class Acc, class SA, class SB>
__device__ __forceinline__ void tile_gemm(Acc& acc, const SA& sA, const SB& sB) {
  using Element = typename Tr::Element;
  typename Tr::TiledMma mma;
  const int tid = threadIdx.x;
  auto thr_mma = mma.get_slice(tid);
  Tensor rA = thr_mma.partition_fragment_A(sA);
  Tensor rB = thr_mma.partition_fragment_B(sB);
  const auto ldsm_a = make_tiled_copy_A(typename Tr::Ldsm{}, mma);
  const auto ldsm_b = make_tiled_copy_B(typename Tr::Ldsm{}, mma);
  auto a_thr = ldsm_a.get_slice(tid);
  auto b_thr = ldsm_b.get_slice(tid);
  Tensor tAs = a_thr.partition_S(sA);
  Tensor tAr = a_thr.retile_D(rA);
  Tensor tBs = b_thr.partition_S(sB);
  Tensor tBr = b_thr.retile_D(rB);
  constexpr int kSlices = decltype(size<2>(rA))::value;
  copy(ldsm_a, tAs(_, _, 0), tAr(_, _, 0));
  copy(ldsm_b, tBs(_, _, 0), tBr(_, _, 0));
  CUTE_UNROLL
  for (int k = 0; k < kSlices; ++k) {
    if (k + 1 < kSlices) {
      copy(ldsm_a, tAs(_, _, k + 1), tAr(_, _, k + 1));
      copy(ldsm_b, tBs(_, _, k + 1), tBr(_, _, k + 1));
    }
    gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
  (void)sizeof(Element);
}

template <int kDType>
__global__ void __launch_bounds__(kThreads, 1) shrink_grouped_kernel(const void* __restrict__ x_, int64_t ldx,
                                                                  const void* __restrict__ a_, int64_t in,
                                                                  const int64_t* __restrict__ perm,
                                                                  const int64_t* __restrict__ starts, const Pairs pr,
                                                                  float* __restrict__ h, bool weighted, bool vec_x,
                                                                  bool vec_a) {
  using Tr = Traits<kDType>;
  using Element = typename Tr::Element;
  __shared__ alignas(128) Element sx_raw[kTile * kTile];
  __shared__ alignas(128) Element sa_raw[kTile * kTile];
  TileRef t;
  if (!find_tile(pr, starts, blockIdx.x, t)) return;
  const Element* x = static_cast<const Element*>(x_);
  const Element* a = static_cast<const Element*>(a_);
  const int tid = threadIdx.x;
  const typename Tr::SmemTile layout{};
  Tensor sX = make_tensor(make_smem_ptr(sx_raw), layout);
  Tensor sA = make_tensor(make_smem_ptr(sa_raw), layout);
  typename Tr::TiledMma mma;
  auto thr_mma = mma.get_slice(tid);
  const Tensor idC = thr_mma.partition_C(make_identity_tensor(Shape<_64, _64>{}));
  Tensor acc = partition_fragment_C(mma, Shape<_64, _64>{});

  for (int64_t m0 = 0; m0 < t.r; m0 += kTile) {
    clear(acc);
    for (int64_t k0 = 0; k0 < in; k0 += kTile) {
      const int64_t kv = in - k0;
#pragma unroll
      for (int pass = 0; pass < kTile * 8 / kThreads; ++pass) {
        const int c = pass * kThreads + tid, row = c / 8, col = (c % 8) * 8;
        const int offset = layout(row, col);
        const Element* xs = row < t.n ? x + (perm[t.q0 + row] / pr.k) * ldx + k0 + col : nullptr;
        stage_chunk<Element, Element>(sx_raw, offset, xs, kv - col, vec_x, 1.f);
        const Element* as = m0 + row < t.r ? a + (t.off + m0 + row) * in + k0 + col : nullptr;
        stage_chunk<Element, Element>(sa_raw, offset, as, kv - col, vec_a, 1.f);
      }
      __syncthreads();
      tile_gemm<Tr>(acc, sX, sA);
      __syncthreads();
    }
    CUTE_UNROLL
    for (int e = 0; e < size(acc); ++e) {
      const int row = get<0>(idC(e)), col = get<1>(idC(e));
      if (row < t.n && m0 + col < t.r) {
        const int64_t p = perm[t.q0 + row];
        h[p * pr.R + t.off + m0 + col] = (weighted ? weight_of(pr, p, t.i) : 1.f) * acc(e);
      }
    }
  }
}

template <int kDType, typename HT>
__global__ void __launch_bounds__(kThreads, 1) expand_grouped_kernel(const HT* __restrict__ h, const void* __restrict__ b_,
                                                                  int64_t out, const int64_t* __restrict__ perm,
                                                                  const int64_t* __restrict__ starts, const Pairs pr,
                                                                  void* __restrict__ y_, int64_t ldy, bool accumulate,
                                                                  bool weighted, bool vec_b) {
  using Tr = Traits<kDType>;
  using Element = typename Tr::Element;
  __shared__ alignas(128) Element sh_raw[kTile * kTile];
  __shared__ alignas(128) Element sb_raw[kTile * kTile];
  TileRef t;
  if (!find_tile(pr, starts, blockIdx.x, t)) return;
  const Element* b = static_cast<const Element*>(b_);
  Element* y = static_cast<Element*>(y_);
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kTile;
  const int tid = threadIdx.x;
  const typename Tr::SmemTile layout{};
  Tensor sH = make_tensor(make_smem_ptr(sh_raw), layout);
  Tensor sB = make_tensor(make_smem_ptr(sb_raw), layout);
  typename Tr::TiledMma mma;
  auto thr_mma = mma.get_slice(tid);
  const Tensor idC = thr_mma.partition_C(make_identity_tensor(Shape<_64, _64>{}));
  Tensor acc = partition_fragment_C(mma, Shape<_64, _64>{});
  clear(acc);
  // A row of B_i starts 16-byte aligned iff R and off_i are multiples of 8 (and b_packed is aligned: vec_b).
  const bool vec_row = vec_b && t.off % 8 == 0;

  for (int64_t k0 = 0; k0 < t.r; k0 += kTile) {
    const int64_t kv = t.r - k0;
#pragma unroll
    for (int pass = 0; pass < kTile * 8 / kThreads; ++pass) {
      const int c = pass * kThreads + tid, row = c / 8, col = (c % 8) * 8;
      const int offset = layout(row, col);
      const HT* hs = nullptr;
      float f = 1.f;
      if (row < t.n) {
        const int64_t p = perm[t.q0 + row];
        hs = h + p * pr.R + t.off + k0 + col;
        if (weighted) f = weight_of(pr, p, t.i);
      }
      stage_chunk<Element, HT>(sh_raw, offset, hs, kv - col, false, f);
      const Element* bs = o0 + row < out ? b + (o0 + row) * pr.R + t.off + k0 + col : nullptr;
      stage_chunk<Element, Element>(sb_raw, offset, bs, kv - col, vec_row, 1.f);
    }
    __syncthreads();
    tile_gemm<Tr>(acc, sH, sB);
    __syncthreads();
  }
  CUTE_UNROLL
  for (int e = 0; e < size(acc); ++e) {
    const int row = get<0>(idC(e)), col = get<1>(idC(e));
    if (row < t.n && o0 + col < out) {
      Element* yp = y + (perm[t.q0 + row] / pr.k) * ldy + o0 + col;
      *yp = static_cast<Element>(accumulate ? static_cast<float>(*yp) + acc(e) : acc(e));
    }
  }
}

unsigned tiles_bound(const Pairs& pr) {
  const int64_t n = tc_plan::tiles_bound(pr.T * pr.k, pr.N);
  if (n > 0x7fffffffll) throw std::runtime_error("peftcore lora CUDA: too many tensor-core tiles");
  return static_cast<unsigned>(n);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace tc
#endif

bool tc_supported(DType dtype) {
#if PEFTCORE_HAS_CUTLASS
  return dtype == DType::kFloat16 || dtype == DType::kBFloat16;
#else
  (void)dtype;
  return false;
#endif
}

void shrink_grouped(DType dtype, const void* x, int64_t ldx, const void* a, int64_t in, const int64_t* perm,
                    const int64_t* starts, const Pairs& pr, float* h, bool weighted, cudaStream_t stream) {
  if (!tc_supported(dtype)) throw std::runtime_error("peftcore lora CUDA: no tensor-core shrink for this dtype");
#if PEFTCORE_HAS_CUTLASS
  if (pr.T * pr.k == 0 || pr.R == 0 || pr.N == 0) return;
  const bool vec_x = ldx % 8 == 0 && tc::aligned16(x), vec_a = in % 8 == 0 && tc::aligned16(a);
  const unsigned grid = tc::tiles_bound(pr);
  if (dtype == DType::kFloat16)
    tc::shrink_grouped_kernel<static_cast<int>(DType::kFloat16)><<<grid, tc::kThreads, 0, stream>>>(
        x, ldx, a, in, perm, starts, pr, h, weighted, vec_x, vec_a);
  else
    tc::shrink_grouped_kernel<static_cast<int>(DType::kBFloat16)><<<grid, tc::kThreads, 0, stream>>>(
        x, ldx, a, in, perm, starts, pr, h, weighted, vec_x, vec_a);
  cuda_common::check_cuda(cudaGetLastError(), "lora", "shrink_grouped launch");
#else
  (void)x, (void)ldx, (void)a, (void)in, (void)perm, (void)starts, (void)pr, (void)h, (void)weighted, (void)stream;
#endif
}

void expand_grouped(DType dtype, const void* h, bool h_fp32, const void* b, int64_t out, const int64_t* perm,
                    const int64_t* starts, const Pairs& pr, void* y, int64_t ldy, bool accumulate, bool weighted,
                    cudaStream_t stream) {
  if (!tc_supported(dtype)) throw std::runtime_error("peftcore lora CUDA: no tensor-core expand for this dtype");
  if (pr.k != 1) throw std::runtime_error("peftcore lora CUDA: the grouped expand needs one slot per token");
#if PEFTCORE_HAS_CUTLASS
  if (pr.T == 0 || pr.R == 0 || pr.N == 0 || out == 0) return;
  const int64_t col_tiles = (out + tc::kTile - 1) / tc::kTile;
  if (col_tiles > 65535) throw std::runtime_error("peftcore lora CUDA: too many output columns");
  const dim3 grid(tc::tiles_bound(pr), static_cast<unsigned>(col_tiles));
  const bool vec_b = pr.R % 8 == 0 && tc::aligned16(b);
  const auto launch = [&](auto kd, auto htag) {
    using HT = std::remove_pointer_t<decltype(htag)>;
    tc::expand_grouped_kernel<decltype(kd)::value, HT><<<grid, tc::kThreads, 0, stream>>>(
        static_cast<const HT*>(h), b, out, perm, starts, pr, y, ldy, accumulate, weighted, vec_b);
  };
  using F16 = std::integral_constant<int, static_cast<int>(DType::kFloat16)>;
  using BF16 = std::integral_constant<int, static_cast<int>(DType::kBFloat16)>;
  if (dtype == DType::kFloat16) {
    if (h_fp32) launch(F16{}, static_cast<float*>(nullptr));
    else launch(F16{}, static_cast<cute::half_t*>(nullptr));
  } else {
    if (h_fp32) launch(BF16{}, static_cast<float*>(nullptr));
    else launch(BF16{}, static_cast<cute::bfloat16_t*>(nullptr));
  }
  cuda_common::check_cuda(cudaGetLastError(), "lora", "expand_grouped launch");
#else
  (void)h, (void)h_fp32, (void)b, (void)out, (void)perm, (void)starts, (void)pr, (void)y, (void)ldy, (void)accumulate,
      (void)weighted, (void)stream;
#endif
}

}  // namespace peftcore::lora::cuda
