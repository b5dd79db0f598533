// partial CUDA glue: argument checks and the linear ops shared with the CPU (partial.h: cuBLAS GEMMs through
// ATen on views), and the plain-CUDA gather / scatter-add launchers of partial.cu. No host sync anywhere: the
// index is never read on the host, the range path is taken only when range_start >= 0 is passed, so every op
// here can be captured in a CUDA graph. Shapes, dtypes and devices are checked as on the CPU; index values are
// not (partial_validate does that, registered for all backends by the CPU file): an entry outside
// [0, features) is skipped by the kernels (gather reads 0, scatter-add drops it), never read or written, and a
// range_start that disagrees with index is trusted (its bounds are checked against the weight's shape).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "checks.h"
#include "cuda_glue.h"
#include "partial/partial.h"
#include "partial/partial_launch.h"

namespace peftcore::partial {
namespace {

namespace cu = peftcore::partial::cuda;

cu::DType kernel_dtype(at::ScalarType t) { return peftcore::kernel_dtype("partial", t); }


at::Tensor gather_cuda_kernel(const at::Tensor& x2d, const at::Tensor& index) {
  auto idx = index.contiguous();
  const int64_t T = x2d.size(0), F = x2d.size(1), k = idx.numel();
  auto out = at::empty({T, k}, x2d.options());
  cu::gather(kernel_dtype(x2d.scalar_type()), x2d.const_data_ptr(), x2d.stride(0), F, idx.const_data_ptr<int64_t>(),
             k, out.mutable_data_ptr(), T, current_stream());
  return out;
}

void scatter_add_into_cuda_kernel(const at::Tensor& y2d, const at::Tensor& src, const at::Tensor& index) {
  auto idx = index.contiguous();
  auto s = src.contiguous();
  const int64_t T = y2d.size(0), F = y2d.size(1), k = idx.numel();
  TORCH_CHECK(y2d.stride(1) == 1, "partial_scatter_add: output must be row-major, got strides ", y2d.strides());
  cu::scatter_add(kernel_dtype(y2d.scalar_type()), s.const_data_ptr(), idx.const_data_ptr<int64_t>(), k,
                  y2d.mutable_data_ptr(), y2d.stride(0), F, T, current_stream());
}

const Kernels kCudaKernels{&gather_cuda_kernel, &scatter_add_into_cuda_kernel};

// ------------------------------------------------------------------------------------------------------------
at::Tensor partial_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const at::Tensor& delta, const at::Tensor& index, int64_t dim, int64_t range_start) {
  constexpr const char* op = "partial_linear";
  check_cuda_activation(op, "x", x);
  check_linear_args(op, "x", x, weight, delta, index, dim, range_start);
  const c10::cuda::CUDAGuard guard(x.device());
  return linear_forward(x, weight, bias, delta, index, dim, range_start, kCudaKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& saved, const at::Tensor& weight, const at::Tensor& delta,
    const at::Tensor& index, int64_t dim, std::array<bool, 3> mask, int64_t range_start) {
  constexpr const char* op = "partial_linear_backward";
  check_cuda_activation(op, "grad_out", grad_out);
  check_linear_args(op, "grad_out", grad_out, weight, delta, index, dim, range_start);
  const c10::cuda::CUDAGuard guard(grad_out.device());
  return linear_backward(grad_out, saved, weight, delta, index, dim, mask, range_start, kCudaKernels);
}

at::Tensor partial_gather_cuda(const at::Tensor& x, const at::Tensor& index) {
  constexpr const char* op = "partial_gather";
  check_cuda_activation(op, "x", x);
  check_index(op, index, x);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dim, got a scalar");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t F = x.size(-1);
  auto x2d = flatten_tokens(op, "x", x, F);
  return gather_cuda_kernel(x2d, index).view(with_last_dim(x, index.numel()));
}

at::Tensor partial_scatter_add_cuda(const at::Tensor& src, const at::Tensor& index, int64_t size) {
  constexpr const char* op = "partial_scatter_add";
  check_cuda_activation(op, "src", src);
  check_index(op, index, src);
  TORCH_CHECK(size >= 0, op, ": size must be >= 0, got ", size);
  const c10::cuda::CUDAGuard guard(src.device());
  auto s2d = flatten_tokens(op, "src", src, index.numel());
  auto y2d = at::zeros({s2d.size(0), size}, src.options());
  scatter_add_into_cuda_kernel(y2d, s2d, index);
  return y2d.view(with_last_dim(src, size));
}

}  // namespace

TORCH_LIBRARY_IMPL(peftcore, CUDA, m) {
  m.impl("partial_linear", &partial_linear_cuda);
  m.impl("partial_linear_backward", &partial_linear_backward_cuda);
  m.impl("partial_gather", &partial_gather_cuda);
  m.impl("partial_scatter_add", &partial_scatter_add_cuda);
}

}  // namespace peftcore::partial
