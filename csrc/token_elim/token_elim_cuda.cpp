// token_elim CUDA glue: argument checks (the CPU ops' shape / dtype / device checks, shared), the partial-save
// MLP (token_elim_shared.h: cuBLAS GEMMs through ATen around the elementwise kernels of token_elim.cu) and the
// token gather / scatter-add launchers. No host sync: keep_index / channel_index are never read on the host (the
// CPU ops validate them; here a row outside [0, L) is skipped by the kernels: gathered as 0, never scattered;
// a channel outside [0, I) is gathered as 0 and clamped for the backward's weight gathers; unsorted or repeated
// entries give wrong numbers, never an access outside a buffer). K and C come from shapes, so every op can be
// captured in a CUDA graph.
// token_block_scores is registered for every backend by the CPU file (it calls attn_block_pool's CUDA kernel).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "checks.h"
#include "cuda_glue.h"
#include "token_elim/token_elim.h"
#include "token_elim/token_elim_launch.h"
#include "token_elim/token_elim_shared.h"

namespace peftcore::token_elim {
namespace {

namespace cu = peftcore::token_elim::cuda;

cu::DType kernel_dtype(at::ScalarType t) { return peftcore::kernel_dtype("token_elim", t); }

at::Tensor silu_mul_cuda(const at::Tensor& g, const at::Tensor& u) {
  auto a = at::empty_like(g);
  cu::silu_mul(kernel_dtype(g.scalar_type()), g.const_data_ptr(), u.const_data_ptr(), a.mutable_data_ptr(),
               g.numel(), current_stream());
  return a;
}

at::Tensor gather_cols_cuda(const at::Tensor& t2d, const at::Tensor& idx) {
  auto ic = idx.contiguous();
  const int64_t T = t2d.size(0), I = t2d.size(1), C = ic.numel();
  auto out = at::empty({T, C}, t2d.options());
  cu::gather_cols(kernel_dtype(t2d.scalar_type()), t2d.const_data_ptr(), ic.const_data_ptr<int64_t>(),
                  out.mutable_data_ptr(), T, I, C, current_stream());
  return out;
}

std::tuple<at::Tensor, at::Tensor> silu_mul_backward_cuda(const at::Tensor& da, const at::Tensor& gk,
                                                          const at::Tensor& uk, const std::optional<at::Tensor>& ggk,
                                                          const std::optional<at::Tensor>& guk) {
  auto dg = at::empty_like(gk), du = at::empty_like(uk);
  cu::silu_mul_backward(kernel_dtype(gk.scalar_type()), da.const_data_ptr(), gk.const_data_ptr(),
                        uk.const_data_ptr(), ggk ? ggk->const_data_ptr() : nullptr,
                        guk ? guk->const_data_ptr() : nullptr, dg.mutable_data_ptr(), du.mutable_data_ptr(),
                        gk.numel(), current_stream());
  return {dg, du};
}

const MlpKernels kCudaMlp{&silu_mul_cuda, &gather_cols_cuda, &silu_mul_backward_cuda};

at::Tensor token_gather_cuda(const at::Tensor& x, const at::Tensor& keep_index) {
  constexpr const char* op = "token_gather";
  check_cuda_activation(op, "x", x);
  const auto d = check_token_args(op, x, keep_index, nullptr);
  const c10::cuda::CUDAGuard guard(x.device());
  auto shape = x.sizes().vec();
  shape[1] = d.K;
  auto out = at::empty(shape, x.options());
  auto xc = x.contiguous();
  auto kc = keep_index.contiguous();
  cu::gather_rows(kernel_dtype(x.scalar_type()), xc.const_data_ptr(), kc.const_data_ptr<int64_t>(),
                  out.mutable_data_ptr(), d.B, d.L, d.K, d.F, current_stream());
  return out;
}

at::Tensor token_scatter_add_cuda(const at::Tensor& residual, const at::Tensor& src, const at::Tensor& keep_index) {
  constexpr const char* op = "token_scatter_add";
  check_cuda_activation(op, "residual", residual);
  const auto d = check_token_args(op, residual, keep_index, &src);
  const c10::cuda::CUDAGuard guard(residual.device());
  auto out = residual.clone(at::MemoryFormat::Contiguous);
  auto sc = src.contiguous();
  auto kc = keep_index.contiguous();
  cu::scatter_add_rows(kernel_dtype(out.scalar_type()), sc.const_data_ptr(), kc.const_data_ptr<int64_t>(),
                       out.mutable_data_ptr(), d.B, d.L, d.K, d.F, current_stream());
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_mlp_partial_save_cuda(
    const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
    int64_t keep_channels, const std::optional<at::Tensor>& channel_index) {
  constexpr const char* op = "token_mlp_partial_save";
  check_cuda_activation(op, "x", x);
  const auto d = check_mlp_args(op, x, w_gate, w_up, w_down, keep_channels, channel_index);
  const c10::cuda::CUDAGuard guard(x.device());
  return mlp_forward(x, w_gate, w_up, w_down, d, channel_index, kCudaMlp);
}

at::Tensor token_mlp_partial_save_backward_cuda(const at::Tensor& grad_y, const at::Tensor& gate_kept,
                                                const at::Tensor& up_kept, const at::Tensor& channel_index,
                                                const at::Tensor& w_gate, const at::Tensor& w_up,
                                                const at::Tensor& w_down,
                                                const std::optional<at::Tensor>& grad_gate_kept,
                                                const std::optional<at::Tensor>& grad_up_kept) {
  constexpr const char* op = "token_mlp_partial_save_backward";
  check_cuda_activation(op, "grad_y", grad_y);
  check_mlp_backward_args(op, grad_y, gate_kept, up_kept, channel_index, w_gate, w_up, w_down, grad_gate_kept,
                          grad_up_kept);
  const c10::cuda::CUDAGuard guard(grad_y.device());
  return mlp_backward(grad_y, gate_kept, up_kept, channel_index, w_gate, w_up, w_down, grad_gate_kept, grad_up_kept,
                      kCudaMlp);
}

}  // namespace

TORCH_LIBRARY_IMPL(peftcore, CUDA, m) {
  m.impl("token_gather", &token_gather_cuda);
  m.impl("token_scatter_add", &token_scatter_add_cuda);
  m.impl("token_mlp_partial_save", &token_mlp_partial_save_cuda);
  m.impl("token_mlp_partial_save_backward", &token_mlp_partial_save_backward_cuda);
}

}  // namespace peftcore::token_elim
