// orthogonal CUDA launchers (orthogonal_launch.h): grid shape, shared-memory opt-in and dtype dispatch. No torch
// headers here; the kernels are described in orthogonal_kernels.cuh.
#include "orthogonal/orthogonal_kernels.cuh"
#include "orthogonal/orthogonal_launch.h"

#include <stdexcept>
#include <string>
#include <type_traits>

namespace peftcore::orthogonal::cuda {
namespace {

namespace K = kernels;

void check_cuda(cudaError_t e, const char* what) { cuda_common::check_cuda(e, "orthogonal", what); }

using cuda_common::dispatch_dtype;

#define PO_TYPE(tag) std::remove_pointer_t<decltype(tag)>

// Dynamic shared memory for `tiles` fp32 b x b tiles (+ b floats), opting in above 48 KiB.
template <typename Kern>
size_t smem_for(Kern kern, int64_t b, int tiles) {
  if (b > kMaxBlock) throw std::runtime_error("peftcore orthogonal CUDA: block size above 64");
  const size_t bytes = (static_cast<size_t>(tiles) * b * b + b) * sizeof(float);
  if (bytes > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)),
               "shared memory opt-in");
  return bytes;
}

K::Coef make_coef(const float* coef, int n) {
  if (n < 1 || n > K::kMaxCoef) throw std::runtime_error("peftcore orthogonal CUDA: bad Neumann coefficient count");
  K::Coef c{};
  for (int i = 0; i < n; ++i) c.c[i] = coef[i];
  c.n = n;
  return c;
}

}  // namespace

void cayley(DType dtype, const void* params, void* out, int64_t nb, int64_t b, cudaStream_t stream) {
  if (nb <= 0 || b <= 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = PO_TYPE(tag);
    const size_t sm = smem_for(K::cayley_kernel<T>, b, 2);
    K::cayley_kernel<T><<<static_cast<unsigned>(nb), K::kThreads, sm, stream>>>(
        static_cast<const T*>(params), static_cast<T*>(out), static_cast<int>(b));
  });
  check_cuda(cudaGetLastError(), "cayley launch");
}

void cayley_backward(DType dtype, const void* grad, const void* R, void* out, int64_t nb, int64_t b,
                     cudaStream_t stream) {
  if (nb <= 0 || b <= 0) return;
  dispatch_dtype(dtype, [&](auto tag) {
    using T = PO_TYPE(tag);
    const size_t sm = smem_for(K::cayley_backward_kernel<T>, b, 4);
    K::cayley_backward_kernel<T><<<static_cast<unsigned>(nb), K::kThreads, sm, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(R), static_cast<T*>(out), static_cast<int>(b));
  });
  check_cuda(cudaGetLastError(), "cayley_backward launch");
}

void neumann(DType dtype, const void* params, void* out, int64_t nb, int64_t b, const float* coef, int ncoef,
             cudaStream_t stream) {
  if (nb <= 0 || b <= 0) return;
  const K::Coef c = make_coef(coef, ncoef);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = PO_TYPE(tag);
    const size_t sm = smem_for(K::neumann_kernel<T>, b, 3);
    K::neumann_kernel<T><<<static_cast<unsigned>(nb), K::kThreads, sm, stream>>>(
        static_cast<const T*>(params), static_cast<T*>(out), static_cast<int>(b), c);
  });
  check_cuda(cudaGetLastError(), "neumann launch");
}

void neumann_backward(DType dtype, const void* grad, const void* params, void* out, int64_t nb, int64_t b,
                      const float* coef, int ncoef, cudaStream_t stream) {
  if (nb <= 0 || b <= 0) return;
  const K::Coef c = make_coef(coef, ncoef);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = PO_TYPE(tag);
    const size_t sm = smem_for(K::neumann_backward_kernel<T>, b, 6);
    K::neumann_backward_kernel<T><<<static_cast<unsigned>(nb), K::kThreads, sm, stream>>>(
        static_cast<const T*>(grad), static_cast<const T*>(params), static_cast<T*>(out), static_cast<int>(b), c);
  });
  check_cuda(cudaGetLastError(), "neumann_backward launch");
}

}  // namespace peftcore::orthogonal::cuda
