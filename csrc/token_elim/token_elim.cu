// token_elim CUDA launchers (token_elim_launch.h): the plan (token_elim_plan.h: vector width, block and grid) and
// dtype dispatch. No torch headers here; the kernels are described in token_elim_kernels.cuh.
#include "token_elim/token_elim_kernels.cuh"
#include "token_elim/token_elim_launch.h"
#include "token_elim/token_elim_plan.h"

#include <cstdint>
#include <type_traits>

namespace peftcore::token_elim::cuda {
namespace {

namespace K_ = kernels;

void check_cuda(cudaError_t e, const char* what) { cuda_common::check_cuda(e, "token_elim", what); }

using cuda_common::address;
using cuda_common::dispatch_dtype;
using cuda_common::launch_shape;

#define TE_TYPE(tag) std::remove_pointer_t<decltype(tag)>

// kernel(tag<V>) launched with V = 16 / sizeof(T) when the plan vectorises, else V = 1.
template <typename T, typename F>
void with_vec(const plan::Launch& p, F&& launch) {
  constexpr int V = cuda_common::kVec16<T>;
  if (p.vec == V)
    launch(std::integral_constant<int, V>{});
  else
    launch(std::integral_constant<int, 1>{});
}

}  // namespace

void gather_rows(DType dtype, const void* x, const int64_t* keep, void* out, int64_t B, int64_t L, int64_t K,
                 int64_t F, cudaStream_t stream) {
  if (B * K <= 0 || F <= 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = TE_TYPE(tag);
    const auto p = plan::rows(B * K, F, sizeof(T), {address(x), address(out)});
    const auto s = launch_shape(p.rows);
    with_vec<T>(p, [&](auto v) {
      K_::gather_rows_kernel<T, v()><<<s.grid, s.block, 0, stream>>>(static_cast<const T*>(x), keep,
                                                                     static_cast<T*>(out), B, L, K, F);
    });
  });
  check_cuda(cudaGetLastError(), "gather_rows launch");
}

void scatter_add_rows(DType dtype, const void* src, const int64_t* keep, void* out, int64_t B, int64_t L,
                      int64_t K, int64_t F, cudaStream_t stream) {
  if (B * K <= 0 || F <= 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = TE_TYPE(tag);
    const auto p = plan::rows(B * K, F, sizeof(T), {address(src), address(out)});
    const auto s = launch_shape(p.rows);
    with_vec<T>(p, [&](auto v) {
      K_::scatter_add_rows_kernel<T, v()><<<s.grid, s.block, 0, stream>>>(static_cast<const T*>(src), keep,
                                                                          static_cast<T*>(out), B, L, K, F);
    });
  });
  check_cuda(cudaGetLastError(), "scatter_add_rows launch");
}

void silu_mul(DType dtype, const void* g, const void* u, void* a, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = TE_TYPE(tag);
    const auto p = plan::rows(1, n, sizeof(T), {address(g), address(u), address(a)});
    const auto s = launch_shape(p.rows);
    with_vec<T>(p, [&](auto v) {
      K_::silu_mul_kernel<T, v()><<<s.grid, s.block, 0, stream>>>(static_cast<const T*>(g), static_cast<const T*>(u),
                                                                  static_cast<T*>(a), n);
    });
  });
  check_cuda(cudaGetLastError(), "silu_mul launch");
}

void gather_cols(DType dtype, const void* src, const int64_t* idx, void* out, int64_t T, int64_t I, int64_t C,
                 cudaStream_t stream) {
  if (T <= 0 || C <= 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using V_ = TE_TYPE(tag);
    const auto p = plan::rows(T, C, sizeof(V_), {address(out)});
    const auto s = launch_shape(p.rows);
    with_vec<V_>(p, [&](auto v) {
      K_::gather_cols_kernel<V_, v()><<<s.grid, s.block, 0, stream>>>(static_cast<const V_*>(src), idx,
                                                                      static_cast<V_*>(out), T, I, C);
    });
  });
  check_cuda(cudaGetLastError(), "gather_cols launch");
}

void silu_mul_backward(DType dtype, const void* da, const void* g, const void* u, const void* ggk, const void* guk,
                       void* dg, void* du, int64_t n, cudaStream_t stream) {
  if (n <= 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = TE_TYPE(tag);
    // an absent ggk / guk (null) is aligned: it is never read
    const auto p = plan::rows(1, n, sizeof(T), {address(da), address(g), address(u), address(ggk), address(guk),
                                               address(dg), address(du)});
    const auto s = launch_shape(p.rows);
    with_vec<T>(p, [&](auto v) {
      K_::silu_mul_backward_kernel<T, v()><<<s.grid, s.block, 0, stream>>>(
          static_cast<const T*>(da), static_cast<const T*>(g), static_cast<const T*>(u), static_cast<const T*>(ggk),
          static_cast<const T*>(guk), static_cast<T*>(dg), static_cast<T*>(du), n);
    });
  });
  check_cuda(cudaGetLastError(), "silu_mul_backward launch");
}

}  // namespace peftcore::token_elim::cuda
