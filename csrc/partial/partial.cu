// partial CUDA launchers (partial_launch.h): the plan (partial_plan.h: vector width, block and grid) and dtype
// dispatch. No torch headers here; the kernels are described in partial_kernels.cuh.
#include "partial/partial_kernels.cuh"
#include "partial/partial_launch.h"
#include "partial/partial_plan.h"

#include <cstdint>
#include <type_traits>

namespace peftcore::partial::cuda {
namespace {

namespace K = kernels;

void check_cuda(cudaError_t e, const char* what) { cuda_common::check_cuda(e, "partial", what); }

using cuda_common::dispatch_dtype;

#define PC_TYPE(tag) std::remove_pointer_t<decltype(tag)>

using cuda_common::address;
using cuda_common::launch_shape;

}  // namespace

void gather(DType dtype, const void* x, int64_t ldx, int64_t features, const int64_t* index, int64_t k, void* out,
            int64_t tokens, cudaStream_t stream) {
  if (tokens <= 0 || k <= 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = PC_TYPE(tag);
    constexpr int V = cuda_common::kVec16<T>;
    const plan::Launch p = plan::rows(tokens, k, sizeof(T), address(out));
    const auto s = launch_shape(p.rows);
    const T* xp = static_cast<const T*>(x);
    T* op = static_cast<T*>(out);
    if (p.vec == V)
      K::gather_kernel<T, V><<<s.grid, s.block, 0, stream>>>(xp, ldx, features, index, k, op, tokens);
    else
      K::gather_kernel<T, 1><<<s.grid, s.block, 0, stream>>>(xp, ldx, features, index, k, op, tokens);
  });
  check_cuda(cudaGetLastError(), "gather launch");
}

void scatter_add(DType dtype, const void* src, const int64_t* index, int64_t k, void* y, int64_t ldy,
                 int64_t features, int64_t tokens, cudaStream_t stream) {
  if (tokens <= 0 || k <= 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = PC_TYPE(tag);
    constexpr int V = cuda_common::kVec16<T>;
    const plan::Launch p = plan::rows(tokens, k, sizeof(T), address(src));
    const auto s = launch_shape(p.rows);
    const T* sp = static_cast<const T*>(src);
    T* yp = static_cast<T*>(y);
    if (p.vec == V)
      K::scatter_add_kernel<T, V><<<s.grid, s.block, 0, stream>>>(sp, index, k, yp, ldy, features, tokens);
    else
      K::scatter_add_kernel<T, 1><<<s.grid, s.block, 0, stream>>>(sp, index, k, yp, ldy, features, tokens);
  });
  check_cuda(cudaGetLastError(), "scatter_add launch");
}

}  // namespace peftcore::partial::cuda
