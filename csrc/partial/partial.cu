// partial CUDA launchers (partial_launch.h): grid shape and dtype dispatch. No torch headers here; the kernels
// are described in partial_kernels.cuh.
#include "partial/partial_kernels.cuh"
#include "partial/partial_launch.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace peftcore::partial::cuda {
namespace {

namespace K = kernels;

void check_cuda(cudaError_t e, const char* what) { cuda_common::check_cuda(e, "partial", what); }

using cuda_common::dispatch_dtype;

#define PC_TYPE(tag) std::remove_pointer_t<decltype(tag)>

// x: chunks of k; y, z: tokens split into slices of at most 65535.
dim3 grid_for(int64_t tokens, int64_t k, const char* what) {
  const int64_t chunks = (k + K::kThreads - 1) / K::kThreads;
  const int64_t ys = std::min<int64_t>(tokens, 65535);
  const int64_t zs = (tokens + ys - 1) / ys;
  if (chunks > 0x7fffffff || zs > 65535) throw std::runtime_error(std::string("peftcore ") + what + " CUDA: too large");
  return dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(ys), static_cast<unsigned>(zs));
}

}  // namespace

void gather(DType dtype, const void* x, int64_t ldx, int64_t features, const int64_t* index, int64_t k, void* out,
            int64_t tokens, cudaStream_t stream) {
  if (tokens <= 0 || k <= 0) return;
  const dim3 grid = grid_for(tokens, k, "partial_gather");
  dispatch_dtype(dtype, [&](auto tag) {
    using T = PC_TYPE(tag);
    K::gather_kernel<T><<<grid, K::kThreads, 0, stream>>>(static_cast<const T*>(x), ldx, features, index, k,
                                                          static_cast<T*>(out), tokens);
  });
  check_cuda(cudaGetLastError(), "gather launch");
}

void scatter_add(DType dtype, const void* src, const int64_t* index, int64_t k, void* y, int64_t ldy,
                 int64_t features, int64_t tokens, cudaStream_t stream) {
  if (tokens <= 0 || k <= 0) return;
  const dim3 grid = grid_for(tokens, k, "partial_scatter_add");
  dispatch_dtype(dtype, [&](auto tag) {
    using T = PC_TYPE(tag);
    K::scatter_add_kernel<T><<<grid, K::kThreads, 0, stream>>>(static_cast<const T*>(src), index, k,
                                                               static_cast<T*>(y), ldy, features, tokens);
  });
  check_cuda(cudaGetLastError(), "scatter_add launch");
}

}  // namespace peftcore::partial::cuda
