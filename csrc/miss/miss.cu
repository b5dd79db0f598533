// miss CUDA launchers (miss_launch.h): the plan (miss_plan.h: kernel, vector width, block and grid) and dtype
// dispatch. No torch headers here; the kernels are described in miss_kernels.cuh.
#include "miss/miss_kernels.cuh"
#include "miss/miss_launch.h"
#include "miss/miss_plan.h"

#include <cstdint>
#include <stdexcept>
#include <type_traits>

namespace peftcore::miss::cuda {
namespace {

namespace K = kernels;

void check_cuda(cudaError_t e, const char* what) { cuda_common::check_cuda(e, "miss", what); }

using cuda_common::address;
using cuda_common::dispatch_dtype;
using cuda_common::launch_shape;

#define PC_TYPE(tag) std::remove_pointer_t<decltype(tag)>

template <typename T, int kW>
void launch_narrow(const T* x, int64_t rows, int64_t n, int r, T* y, const plan::Launch& p, cudaStream_t stream) {
  K::fold_narrow_kernel<T, kW><<<static_cast<unsigned>(p.rows.grid_x), K::kThreads, 0, stream>>>(x, rows, n, r, y);
}

}  // namespace

void fold(DType dtype, const void* x, int64_t rows, int64_t n, int64_t r, void* y, cudaStream_t stream) {
  if (rows <= 0 || n <= 0 || r <= 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = PC_TYPE(tag);
    constexpr int V = cuda_common::kVec16<T>;
    const T* xp = static_cast<const T*>(x);
    T* yp = static_cast<T*>(y);
    const plan::Launch p = plan::fold(rows, n, r, sizeof(T), address(x), address(y));
    const auto s = launch_shape(p.rows);
    switch (p.kind) {
      case plan::kFoldVecGroup:
        K::fold_vec_group_kernel<T, V><<<s.grid, s.block, 0, stream>>>(xp, rows, n, static_cast<int>(r / V),
                                                                       p.copies, yp);
        break;
      case plan::kFoldVecCols: K::fold_vec_cols_kernel<T, V><<<s.grid, s.block, 0, stream>>>(xp, rows, n, r, yp); break;
      case plan::kFoldNarrow: {
        const int ri = static_cast<int>(r);
        switch (p.width) {
          case 32: launch_narrow<T, 32>(xp, rows, n, ri, yp, p, stream); break;
          case 64: launch_narrow<T, 64>(xp, rows, n, ri, yp, p, stream); break;
          case 128: launch_narrow<T, 128>(xp, rows, n, ri, yp, p, stream); break;
          default: launch_narrow<T, K::kThreads>(xp, rows, n, ri, yp, p, stream); break;
        }
        break;
      }
      default:
        if (p.rows.grid_x > 0x7fffffff) throw std::runtime_error("peftcore miss_fold CUDA: r too large");
        K::fold_wide_kernel<T><<<s.grid, K::kThreads, 0, stream>>>(xp, rows, n, r, yp);
        break;
    }
  });
  check_cuda(cudaGetLastError(), "fold launch");
}

void unfold(DType dtype, const void* grad, int64_t rows, int64_t r, int64_t n, void* out, cudaStream_t stream) {
  if (rows <= 0 || n <= 0 || r <= 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = PC_TYPE(tag);
    constexpr int V = cuda_common::kVec16<T>;
    const T* gp = static_cast<const T*>(grad);
    T* op = static_cast<T*>(out);
    const plan::Launch p = plan::unfold(rows, r, n, sizeof(T), address(grad), address(out));
    const auto s = launch_shape(p.rows);
    if (p.vec == V)
      K::unfold_kernel<T, V><<<s.grid, s.block, 0, stream>>>(gp, rows, r, n, op);
    else
      K::unfold_kernel<T, 1><<<s.grid, s.block, 0, stream>>>(gp, rows, r, n, op);
  });
  check_cuda(cudaGetLastError(), "unfold launch");
}

}  // namespace peftcore::miss::cuda
