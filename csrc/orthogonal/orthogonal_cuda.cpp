// orthogonal CUDA glue: argument checks, the small-matrix launchers of orthogonal.cu (one CUDA block per b x b
// matrix, b <= 64), and the BOFT chain shared with the CPU (orthogonal.h: index gathers + cuBLAS batched GEMMs
// through ATen). No host sync anywhere (perm's values are not validated here, only clamped into range so that no
// access leaves a buffer; the CPU op validates them), so every op can be
// captured in a CUDA graph.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <tuple>
#include <vector>

#include "checks.h"
#include "cuda_glue.h"
#include "orthogonal/orthogonal.h"
#include "orthogonal/orthogonal_launch.h"

namespace peftcore::orthogonal {
namespace {

namespace cu = peftcore::orthogonal::cuda;

cu::DType kernel_dtype(at::ScalarType t) { return peftcore::kernel_dtype("orthogonal", t); }

void check_block(const char* op, const at::Tensor& p) {
  TORCH_CHECK(p.size(1) <= cu::kMaxBlock, op, ": block size must be <= ", cu::kMaxBlock, " on CUDA, got ",
              p.size(1));
}

std::vector<float> coef_f32(int64_t terms) {
  const auto c = neumann_coefficients(terms);
  return std::vector<float>(c.begin(), c.end());
}

void check_terms(const char* op, int64_t terms) {
  TORCH_CHECK(terms >= 0 && terms <= 64, op, ": terms must be in [0, 64], got ", terms);
}

at::Tensor cayley_cuda(const at::Tensor& params) {
  constexpr const char* op = "orthogonal_cayley";
  check_cuda_activation(op, "params", params);
  check_params(op, "params", params);
  check_block(op, params);
  const c10::cuda::CUDAGuard guard(params.device());
  auto p = params.contiguous();
  auto out = at::empty_like(p);
  cu::cayley(kernel_dtype(p.scalar_type()), p.const_data_ptr(), out.mutable_data_ptr(), p.size(0), p.size(1),
             current_stream());
  return out;
}

at::Tensor cayley_backward_cuda(const at::Tensor& grad, const at::Tensor& R) {
  constexpr const char* op = "orthogonal_cayley_backward";
  check_cuda_activation(op, "grad", grad);
  check_params(op, "grad", grad);
  check_same_dtype(op, "R", R, grad, "grad");
  check_same_device(op, "R", R, grad, "grad");
  TORCH_CHECK(R.sizes() == grad.sizes(), op, ": R must have grad's shape ", grad.sizes(), ", got ", R.sizes());
  check_block(op, grad);
  const c10::cuda::CUDAGuard guard(grad.device());
  auto g = grad.contiguous(), r = R.contiguous();
  auto out = at::empty_like(g);
  cu::cayley_backward(kernel_dtype(g.scalar_type()), g.const_data_ptr(), r.const_data_ptr(), out.mutable_data_ptr(),
                      g.size(0), g.size(1), current_stream());
  return out;
}

at::Tensor neumann_cuda(const at::Tensor& params, int64_t terms) {
  constexpr const char* op = "orthogonal_cayley_neumann";
  check_cuda_activation(op, "params", params);
  check_params(op, "params", params);
  check_terms(op, terms);
  check_block(op, params);
  const c10::cuda::CUDAGuard guard(params.device());
  auto p = params.contiguous();
  auto out = at::empty_like(p);
  const auto c = coef_f32(terms);
  cu::neumann(kernel_dtype(p.scalar_type()), p.const_data_ptr(), out.mutable_data_ptr(), p.size(0), p.size(1),
              c.data(), static_cast<int>(c.size()), current_stream());
  return out;
}

at::Tensor neumann_backward_cuda(const at::Tensor& grad, const at::Tensor& params, int64_t terms) {
  constexpr const char* op = "orthogonal_cayley_neumann_backward";
  check_cuda_activation(op, "grad", grad);
  check_params(op, "grad", grad);
  check_same_dtype(op, "params", params, grad, "grad");
  check_same_device(op, "params", params, grad, "grad");
  TORCH_CHECK(params.sizes() == grad.sizes(), op, ": params must have grad's shape ", grad.sizes(), ", got ",
              params.sizes());
  check_terms(op, terms);
  check_block(op, grad);
  const c10::cuda::CUDAGuard guard(grad.device());
  auto g = grad.contiguous(), p = params.contiguous();
  auto out = at::empty_like(g);
  const auto c = coef_f32(terms);
  cu::neumann_backward(kernel_dtype(g.scalar_type()), g.const_data_ptr(), p.const_data_ptr(), out.mutable_data_ptr(),
                       g.size(0), g.size(1), c.data(), static_cast<int>(c.size()), current_stream());
  return out;
}

at::Tensor boft_apply_cuda(const at::Tensor& x, const at::Tensor& rotations, const at::Tensor& perm) {
  constexpr const char* op = "orthogonal_boft_apply";
  check_cuda_activation(op, "x", x);
  check_boft_args(op, x, rotations, perm, at::Tensor(), /*check_values=*/false);  // values: a host sync
  const c10::cuda::CUDAGuard guard(x.device());
  return boft_forward(x, rotations, perm);
}

std::tuple<at::Tensor, at::Tensor> boft_apply_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                            const at::Tensor& rotations, const at::Tensor& perm,
                                                            std::array<bool, 2> mask) {
  constexpr const char* op = "orthogonal_boft_apply_backward";
  check_cuda_activation(op, "x", x);
  check_boft_args(op, x, rotations, perm, grad_out, /*check_values=*/false);  // values: a host sync
  const c10::cuda::CUDAGuard guard(x.device());
  return boft_backward(grad_out, x, rotations, perm, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(peftcore, CUDA, m) {
  m.impl("orthogonal_cayley", &cayley_cuda);
  m.impl("orthogonal_cayley_backward", &cayley_backward_cuda);
  m.impl("orthogonal_cayley_neumann", &neumann_cuda);
  m.impl("orthogonal_cayley_neumann_backward", &neumann_backward_cuda);
  m.impl("orthogonal_boft_apply", &boft_apply_cuda);
  m.impl("orthogonal_boft_apply_backward", &boft_apply_backward_cuda);
}

}  // namespace peftcore::orthogonal
