// token_elim CUDA launchers (token_elim_launch.h): grid shapes and dtype dispatch. No torch headers here; the
// kernels are described in token_elim_kernels.cuh.
#include "token_elim/token_elim_kernels.cuh"
#include "token_elim/token_elim_launch.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace peftcore::token_elim::cuda {
namespace {

namespace K_ = kernels;

void check_cuda(cudaError_t e, const char* what) { cuda_common::check_cuda(e, "token_elim", what); }

using cuda_common::dispatch_dtype;

#define TE_TYPE(tag) std::remove_pointer_t<decltype(tag)>

// x: chunks of `width`; y, z: rows split into slices of at most 65535.
dim3 row_grid(int64_t rows, int64_t width, const char* what) {
  const int64_t chunks = (width + K_::kThreads - 1) / K_::kThreads;
  const int64_t ys = std::min<int64_t>(rows, 65535);
  const int64_t zs = (rows + ys - 1) / ys;
  if (chunks > 0x7fffffff || zs > 65535) throw std::runtime_error(std::string("peftcore ") + what + " CUDA: too large");
  return dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(ys), static_cast<unsigned>(zs));
}

unsigned flat_grid(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + K_::kThreads - 1) / K_::kThreads, 65535 * 8));
}

}  // namespace

void gather_rows(DType dtype, const void* x, const int64_t* keep, void* out, int64_t B, int64_t L, int64_t K,
                 int64_t F, cudaStream_t stream) {
  if (B * K <= 0 || F <= 0) return;
  const dim3 grid = row_grid(B * K, F, "token_gather");
  dispatch_dtype(dtype, [&](auto tag) {
    using T = TE_TYPE(tag);
    K_::gather_rows_kernel<T><<<grid, K_::kThreads, 0, stream>>>(static_cast<const T*>(x), keep,
                                                                 static_cast<T*>(out), B, L, K, F);
  });
  check_cuda(cudaGetLastError(), "gather_rows launch");
}

void scatter_add_rows(DType dtype, const void* src, const int64_t* keep, void* out, int64_t B, int64_t L,
                      int64_t K, int64_t F, cudaStream_t stream) {
  if (B * K <= 0 || F <= 0) return;
  const dim3 grid = row_grid(B * K, F, "token_scatter_add");
  dispatch_dtype(dtype, [&](auto tag) {
    using T = TE_TYPE(tag);
    K_::scatter_add_rows_kernel<T><<<grid, K_::kThreads, 0, stream>>>(static_cast<const T*>(src), keep,
                                                                      static_cast<T*>(out), B, L, K, F);
  });
  check_cuda(cudaGetLastError(), "scatter_add_rows launch");
}

void silu_mul(DType dtype, const void* g, const void* u, void* a, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = TE_TYPE(tag);
    K_::silu_mul_kernel<T><<<flat_grid(n), K_::kThreads, 0, stream>>>(static_cast<const T*>(g),
                                                                      static_cast<const T*>(u), static_cast<T*>(a), n);
  });
  check_cuda(cudaGetLastError(), "silu_mul launch");
}

void gather_cols(DType dtype, const void* src, const int64_t* idx, void* out, int64_t T, int64_t I, int64_t C,
                 cudaStream_t stream) {
  if (T <= 0 || C <= 0) return;
  const dim3 grid = row_grid(T, C, "token_mlp_partial_save");
  dispatch_dtype(dtype, [&](auto tag) {
    using V = TE_TYPE(tag);
    K_::gather_cols_kernel<V><<<grid, K_::kThreads, 0, stream>>>(static_cast<const V*>(src), idx,
                                                                 static_cast<V*>(out), T, I, C);
  });
  check_cuda(cudaGetLastError(), "gather_cols launch");
}

void silu_mul_backward(DType dtype, const void* da, const void* g, const void* u, const void* ggk, const void* guk,
                       void* dg, void* du, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = TE_TYPE(tag);
    K_::silu_mul_backward_kernel<T><<<flat_grid(n), K_::kThreads, 0, stream>>>(
        static_cast<const T*>(da), static_cast<const T*>(g), static_cast<const T*>(u), static_cast<const T*>(ggk),
        static_cast<const T*>(guk), static_cast<T*>(dg), static_cast<T*>(du), n);
  });
  check_cuda(cudaGetLastError(), "silu_mul_backward launch");
}

}  // namespace peftcore::token_elim::cuda
