// miss CUDA launchers (miss_launch.h): path choice, grid shape and dtype dispatch. No torch headers here; the
// kernels are described in miss_kernels.cuh.
#include "miss/miss_kernels.cuh"
#include "miss/miss_launch.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace peftcore::miss::cuda {
namespace {

namespace K = kernels;

void check_cuda(cudaError_t e, const char* what) { cuda_common::check_cuda(e, "miss", what); }

using cuda_common::dispatch_dtype;

#define PC_TYPE(tag) std::remove_pointer_t<decltype(tag)>

constexpr int64_t kMaxGridX = 1 << 24;  // blocks stride beyond this (grid-stride loops)
constexpr int64_t kMaxGridY = 65535;

// Group width for the narrow fold: n rounded up to a power of two, clamped to [32, kThreads] (>= r as r <= n).
int narrow_width(int64_t n) {
  int w = 32;
  while (w < K::kThreads && w < n) w *= 2;
  return w;
}

template <typename T, int kW>
void launch_narrow(const T* x, int64_t rows, int64_t n, int r, T* y, cudaStream_t stream) {
  constexpr int G = K::kThreads / kW;
  const int64_t blocks = std::min<int64_t>((rows + G - 1) / G, kMaxGridX);
  K::fold_narrow_kernel<T, kW><<<static_cast<unsigned>(blocks), K::kThreads, 0, stream>>>(x, rows, n, r, y);
}

}  // namespace

void fold(DType dtype, const void* x, int64_t rows, int64_t n, int64_t r, void* y, cudaStream_t stream) {
  if (rows <= 0 || n <= 0 || r <= 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = PC_TYPE(tag);
    const T* xp = static_cast<const T*>(x);
    T* yp = static_cast<T*>(y);
    if (r <= K::kThreads) {
      const int ri = static_cast<int>(r);
      switch (narrow_width(n)) {
        case 32: launch_narrow<T, 32>(xp, rows, n, ri, yp, stream); break;
        case 64: launch_narrow<T, 64>(xp, rows, n, ri, yp, stream); break;
        case 128: launch_narrow<T, 128>(xp, rows, n, ri, yp, stream); break;
        default: launch_narrow<T, K::kThreads>(xp, rows, n, ri, yp, stream); break;
      }
    } else {
      const int64_t tiles = (r + K::kThreads - 1) / K::kThreads;
      if (tiles > 0x7fffffff) throw std::runtime_error("peftcore miss_fold CUDA: r too large");
      const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(std::min(rows, kMaxGridY)));
      K::fold_wide_kernel<T><<<grid, K::kThreads, 0, stream>>>(xp, rows, n, r, yp);
    }
  });
  check_cuda(cudaGetLastError(), "fold launch");
}

void unfold(DType dtype, const void* grad, int64_t rows, int64_t r, int64_t n, void* out, cudaStream_t stream) {
  if (rows <= 0 || n <= 0 || r <= 0) return;
  const int64_t tiles = (n + K::kThreads - 1) / K::kThreads;
  if (tiles > 0x7fffffff) throw std::runtime_error("peftcore miss_unfold CUDA: n too large");
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(std::min(rows, kMaxGridY)));
  dispatch_dtype(dtype, [&](auto tag) {
    using T = PC_TYPE(tag);
    K::unfold_kernel<T><<<grid, K::kThreads, 0, stream>>>(static_cast<const T*>(grad), rows, r, n,
                                                          static_cast<T*>(out));
  });
  check_cuda(cudaGetLastError(), "unfold launch");
}

}  // namespace peftcore::miss::cuda
