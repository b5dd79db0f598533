// lora CUDA-core launchers (lora_launch.h): shapes to grids, dtype dispatch. The kernels are described in
// lora_kernels.cuh; the tensor-core grouped forms are in lora_tc.cu.
#include <algorithm>

#include "cuda_common.cuh"
#include "lora/lora_kernels.cuh"
#include "lora/lora_launch.h"

namespace peftcore::lora::cuda {

using cuda_common::address;
using cuda_common::check_cuda;
using cuda_common::dispatch_dtype;

namespace {

constexpr int64_t kMaxGridY = 65535;

unsigned grid_u(int64_t n, const char* what) {
  if (n > 0x7fffffffll) throw std::runtime_error(std::string("peftcore lora CUDA: too many ") + what);
  return static_cast<unsigned>(n);
}

unsigned grid_y(int64_t n, const char* what) {
  if (n > kMaxGridY) throw std::runtime_error(std::string("peftcore lora CUDA: too many ") + what);
  return static_cast<unsigned>(std::max<int64_t>(n, 1));
}

bool aligned16(const void* p) { return address(p) % 16 == 0; }

}  // namespace

void shrink_gathered(DType dtype, const void* x, int64_t ldx, const void* a, int64_t in, const Pairs& pr, void* h,
                     bool h_fp32, bool weighted, cudaStream_t stream) {
  const int64_t P = pr.T * pr.k;
  if (P == 0 || pr.R == 0) return;
  // Slices of rows per pair: enough CTAs for rank 64 with one row per warp; an adapter of smaller rank leaves the
  // later slices idle (they return at once).
  const int64_t slices = std::min<int64_t>((pr.R + kernels::kShrinkWarps - 1) / kernels::kShrinkWarps, 16);
  const dim3 grid(grid_u(P, "pairs"), static_cast<unsigned>(slices));
  dispatch_dtype(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    constexpr int V = cuda_common::kVec16<T>;
    const bool vec = in % V == 0 && ldx % V == 0 && aligned16(x) && aligned16(a);
    const auto launch = [&](auto htag) {
      using HT = std::remove_pointer_t<decltype(htag)>;
      if (vec)
        kernels::shrink_gathered_kernel<T, HT, V><<<grid, 32 * kernels::kShrinkWarps, 0, stream>>>(
            static_cast<const T*>(x), ldx, static_cast<const T*>(a), in, pr, static_cast<HT*>(h), weighted);
      else
        kernels::shrink_gathered_kernel<T, HT, 1><<<grid, 32 * kernels::kShrinkWarps, 0, stream>>>(
            static_cast<const T*>(x), ldx, static_cast<const T*>(a), in, pr, static_cast<HT*>(h), weighted);
    };
    if (h_fp32) launch(static_cast<float*>(nullptr));
    else launch(static_cast<T*>(nullptr));
  });
  check_cuda(cudaGetLastError(), "lora", "shrink_gathered launch");
}

void expand_gathered(DType dtype, const void* h, bool h_fp32, const void* mat, int64_t so, int64_t sm, int64_t cols,
                     const Pairs& pr, void* y, int64_t ldy, bool y_fp32, bool accumulate, bool weighted,
                     cudaStream_t stream) {
  if (pr.T == 0 || cols == 0) return;
  const dim3 grid(grid_u(pr.T, "tokens"),
                  grid_y((cols + kernels::kExpandThreads - 1) / kernels::kExpandThreads, "output columns"));
  dispatch_dtype(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    // 16-byte loads of a row of B_i need the row's start aligned: R a multiple of the vector width (the adapter's
    // offset is checked per adapter on the device).
    const bool vec_ok = sm == 1 && so % cuda_common::kVec16<T> == 0 && aligned16(mat);
    const auto launch = [&](auto htag, auto ytag) {
      using HT = std::remove_pointer_t<decltype(htag)>;
      using YT = std::remove_pointer_t<decltype(ytag)>;
      kernels::expand_gathered_kernel<T, HT, YT><<<grid, kernels::kExpandThreads, 0, stream>>>(
          static_cast<const HT*>(h), static_cast<const T*>(mat), so, sm, cols, pr, static_cast<YT*>(y), ldy,
          accumulate, weighted, vec_ok);
    };
    const auto with_y = [&](auto htag) {
      if (y_fp32) launch(htag, static_cast<float*>(nullptr));
      else launch(htag, static_cast<T*>(nullptr));
    };
    if (h_fp32) with_y(static_cast<float*>(nullptr));
    else with_y(static_cast<T*>(nullptr));
  });
  check_cuda(cudaGetLastError(), "lora", "expand_gathered launch");
}

void expand_t_gathered(DType dtype, const void* g, int64_t ldg, const void* b, int64_t out, const Pairs& pr,
                       float* u, bool weighted, cudaStream_t stream) {
  const int64_t P = pr.T * pr.k;
  if (P == 0 || pr.R == 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    kernels::expand_t_gathered_kernel<T><<<grid_u(P, "pairs"), kernels::kExpandTThreads, 0, stream>>>(
        static_cast<const T*>(g), ldg, static_cast<const T*>(b), out, pr, u, weighted);
  });
  check_cuda(cudaGetLastError(), "lora", "expand_t_gathered launch");
}

void segment_outer(DType dtype, const float* u, const void* v, int64_t ldv, int64_t cols, const int64_t* perm,
                   const int64_t* starts, const Pairs& pr, void* dst, int64_t sdm, int64_t sdc,
                   cudaStream_t stream) {
  if (pr.N == 0 || pr.R == 0 || cols == 0) return;
  // Chunks of the valid adapters: sum_i ceil(r_i / 16) <= ceil(R / 16) + N (CTAs past the last chunk return).
  const int64_t chunks = (pr.R + kernels::kChunkM - 1) / kernels::kChunkM + pr.N;
  const dim3 grid(grid_u(chunks, "adapter chunks"),
                  grid_y((cols + kernels::kSegmentThreads - 1) / kernels::kSegmentThreads, "columns"));
  dispatch_dtype(dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    kernels::segment_outer_kernel<T><<<grid, kernels::kSegmentThreads, 0, stream>>>(
        u, static_cast<const T*>(v), ldv, cols, perm, starts, pr, static_cast<T*>(dst), sdm, sdc);
  });
  check_cuda(cudaGetLastError(), "lora", "segment_outer launch");
}

void pair_dot(const float* u, const float* w, const Pairs& pr, void* out, DType out_dtype, cudaStream_t stream) {
  const int64_t P = pr.T * pr.k;
  if (P == 0) return;
  dispatch_dtype(out_dtype, [&](auto tag) {
    using OT = std::remove_pointer_t<decltype(tag)>;
    kernels::pair_dot_kernel<OT><<<grid_u((P + 3) / 4, "pairs"), 128, 0, stream>>>(u, w, pr, static_cast<OT*>(out));
  });
  check_cuda(cudaGetLastError(), "lora", "pair_dot launch");
}

void dropout(DType src_dtype, const void* src, float* dst, int64_t n, int64_t e0, const int64_t* seed,
             uint32_t threshold, float inv_keep, cudaStream_t stream) {
  if (n == 0) return;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 65536);
  dispatch_dtype(src_dtype, [&](auto tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    kernels::dropout_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(static_cast<const T*>(src), dst, n,
                                                                                 e0, seed, threshold, inv_keep);
  });
  check_cuda(cudaGetLastError(), "lora", "dropout launch");
}

}  // namespace peftcore::lora::cuda
