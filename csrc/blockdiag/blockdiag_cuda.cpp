// blockdiag CUDA glue: argument checks (blockdiag.h), the Monarch forward as the fused CUDA-core kernel of
// blockdiag.cu or two tensor-core batched GEMMs as blockdiag_plan.h decides, and the other ops as cuBLAS batched
// GEMMs through ATen on permuted views (the bmm_* forms of blockdiag_cpu.cpp: blockdiag_matmul forward / backward,
// monarch_matmul_with_h, the Monarch backward). No host sync anywhere: every op here can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "checks.h"
#include "cuda_glue.h"
#include "blockdiag/blockdiag.h"
#include "blockdiag/blockdiag_launch.h"
#include "blockdiag/blockdiag_plan.h"

namespace peftcore::blockdiag {
namespace {

namespace cu = peftcore::blockdiag::cuda;

cu::DType kernel_dtype(at::ScalarType t) { return peftcore::kernel_dtype("blockdiag", t); }

at::Tensor empty_like_none(const at::Tensor& like) { return at::empty({0}, like.options()); }

// PEFTCORE_MONARCH_KERNEL: "auto" (or unset) follows blockdiag_plan.h; "fused" takes the fused kernel whenever a
// token's tile fits the shared memory (the batched GEMMs otherwise); "bmm" always takes the batched GEMMs. The
// tests and the GPU bench use it to compare both forms on one device.
int monarch_mode(const char* op) {
  const char* env = std::getenv("PEFTCORE_MONARCH_KERNEL");
  const std::string mode = env != nullptr && *env != '\0' ? env : "auto";
  if (mode == "auto") return 0;
  if (mode == "fused") return 1;
  if (mode == "bmm") return 2;
  TORCH_CHECK(false, op, ": PEFTCORE_MONARCH_KERNEL must be auto, fused or bmm, got \"", mode, "\"");
}

at::Tensor blockdiag_matmul_cuda(const at::Tensor& x, const at::Tensor& blocks) {
  constexpr const char* op = "blockdiag_matmul";
  check_cuda_activation(op, "x", x);
  check_blockdiag_args(op, "x", x, blocks, false);
  const c10::cuda::CUDAGuard guard(x.device());
  return bmm_blockdiag_forward(flatten_tokens(x), blocks).view(with_last_dim(x, blocks.size(0) * blocks.size(1)));
}

std::tuple<at::Tensor, at::Tensor> blockdiag_matmul_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                                                  const at::Tensor& blocks, std::array<bool, 2> mask) {
  constexpr const char* op = "blockdiag_matmul_backward";
  check_cuda_activation(op, "grad_out", grad_out);
  check_blockdiag_args(op, "x", x, blocks, false);
  check_blockdiag_args(op, "grad_out", grad_out, blocks, true);
  check_grad_pair(op, grad_out, x);
  const c10::cuda::CUDAGuard guard(x.device());
  auto [gx, gw] = bmm_blockdiag_backward(flatten_tokens(grad_out), flatten_tokens(x), blocks, mask);
  return {mask[0] ? gx.view(x.sizes()) : empty_like_none(x), mask[1] ? gw : empty_like_none(blocks)};
}

at::Tensor monarch_matmul_cuda(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  constexpr const char* op = "monarch_matmul";
  check_cuda_activation(op, "x", x);
  check_monarch_args(op, "x", x, w1, w2, false);
  const c10::cuda::CUDAGuard guard(x.device());
  auto x2d = flatten_tokens(x);
  auto w1c = w1.contiguous(), w2c = w2.contiguous();
  const int64_t T = x2d.size(0), l = w2.size(0), s = w2.size(1), r = w2.size(2);
  const auto plan = peftcore::blockdiag::plan::monarch_forward(T, w1.size(0), w1.size(1), w1.size(2), l, s, r,
                                                             cu::smem_optin(x.device().index()), monarch_mode(op));
  if (plan.path != peftcore::blockdiag::plan::Path::kFused)
    return bmm_monarch_forward(x2d, w1c, w2c).view(with_last_dim(x, l * s));
  auto y = at::empty({T, l * s}, x.options());
  cu::monarch_forward(kernel_dtype(x.scalar_type()), x2d.const_data_ptr(), w1c.const_data_ptr(), w2c.const_data_ptr(),
                      y.mutable_data_ptr(), T, w1.size(0), w1.size(1), w1.size(2), l, s, r, plan.tile, plan.smem,
                      current_stream());
  return y.view(with_last_dim(x, l * s));
}

// The training forward: the intermediate must reach memory anyway, so it is the two batched GEMMs.
std::tuple<at::Tensor, at::Tensor> monarch_matmul_with_h_cuda(const at::Tensor& x, const at::Tensor& w1,
                                                              const at::Tensor& w2) {
  constexpr const char* op = "monarch_matmul_with_h";
  check_cuda_activation(op, "x", x);
  check_monarch_args(op, "x", x, w1, w2, false);
  const c10::cuda::CUDAGuard guard(x.device());
  auto h = bmm_monarch_intermediate(flatten_tokens(x), w1, w2.size(0), w2.size(2));
  auto y = bmm_monarch_stage2(h, w2);
  return {y.view(with_last_dim(x, w2.size(0) * w2.size(1))), h.view(with_last_dim(x, w1.size(0) * w1.size(1)))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> monarch_matmul_backward_cuda(const at::Tensor& grad_out,
                                                                            const at::Tensor& x, const at::Tensor& w1,
                                                                            const at::Tensor& w2,
                                                                            std::array<bool, 3> mask,
                                                                            const std::optional<at::Tensor>& h) {
  constexpr const char* op = "monarch_matmul_backward";
  check_cuda_activation(op, "grad_out", grad_out);
  check_monarch_args(op, "x", x, w1, w2, false);
  check_monarch_args(op, "grad_out", grad_out, w1, w2, true);
  check_grad_pair(op, grad_out, x);
  if (h.has_value()) check_saved_h(op, *h, x, w1);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor h2d = (h.has_value() && mask[2]) ? flatten_tokens(*h) : at::Tensor();
  auto [gx, g1, g2] = bmm_monarch_backward(flatten_tokens(grad_out), flatten_tokens(x), w1, w2, mask, h2d);
  return {mask[0] ? gx.view(x.sizes()) : empty_like_none(x), mask[1] ? g1 : empty_like_none(w1),
          mask[2] ? g2 : empty_like_none(w2)};
}

}  // namespace

TORCH_LIBRARY_IMPL(peftcore, CUDA, m) {
  m.impl("blockdiag_matmul", &blockdiag_matmul_cuda);
  m.impl("blockdiag_matmul_backward", &blockdiag_matmul_backward_cuda);
  m.impl("monarch_matmul", &monarch_matmul_cuda);
  m.impl("monarch_matmul_with_h", &monarch_matmul_with_h_cuda);
  m.impl("monarch_matmul_backward", &monarch_matmul_backward_cuda);
}

}  // namespace peftcore::blockdiag
