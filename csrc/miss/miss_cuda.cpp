// miss CUDA glue: argument checks (miss.h, shared with the CPU), contiguous [rows, last] views and the plain-CUDA
// launchers of miss.cu. No host sync: both ops are CUDA-graph capturable.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "cuda_glue.h"
#include "miss/miss.h"
#include "miss/miss_launch.h"

namespace peftcore::miss {
namespace {

namespace cu = peftcore::miss::cuda;

cu::DType kernel_dtype(at::ScalarType t) { return peftcore::kernel_dtype("miss", t); }

at::Tensor miss_fold_cuda(const at::Tensor& x, int64_t r) {
  constexpr const char* op = "miss_fold";
  check_fold_args(op, x, r);
  check_cuda_activation(op, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(-1);
  auto x2d = flatten_rows(x);
  const int64_t rows = x2d.size(0);
  auto y = at::empty({rows, r}, x.options());
  cu::fold(kernel_dtype(x.scalar_type()), x2d.const_data_ptr(), rows, n, r, y.mutable_data_ptr(), current_stream());
  return y.view(with_last_dim(x, r));
}

at::Tensor miss_unfold_cuda(const at::Tensor& grad, int64_t n) {
  constexpr const char* op = "miss_unfold";
  check_unfold_args(op, grad, n);
  check_cuda_activation(op, "grad", grad);
  const c10::cuda::CUDAGuard guard(grad.device());
  const int64_t r = grad.size(-1);
  auto g2d = flatten_rows(grad);
  const int64_t rows = g2d.size(0);
  auto out = at::empty({rows, n}, grad.options());
  cu::unfold(kernel_dtype(grad.scalar_type()), g2d.const_data_ptr(), rows, r, n, out.mutable_data_ptr(),
             current_stream());
  return out.view(with_last_dim(grad, n));
}

}  // namespace

TORCH_LIBRARY_IMPL(peftcore, CUDA, m) {
  m.impl("miss_fold", &miss_fold_cuda);
  m.impl("miss_unfold", &miss_unfold_cuda);
}

}  // namespace peftcore::miss
