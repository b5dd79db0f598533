// token_elim: the partial-save MLP's forward / backward, shared by the CPU and CUDA backends (ATen GEMMs around
// the backend's elementwise kernels, MlpKernels). Defined in token_elim_cpu.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "token_elim/token_elim.h"

namespace peftcore::token_elim {

struct MlpKernels {
  // a = silu(g) * u for contiguous [T, I] g, u (accumulate-type math, one rounding).
  at::Tensor (*silu_mul)(const at::Tensor& g, const at::Tensor& u);
  // [T, C] = t2d[:, idx] for contiguous t2d [T, I].
  at::Tensor (*gather_cols)(const at::Tensor& t2d, const at::Tensor& idx);
  // (dg, du) = (da * u * silu'(g) + ggk, da * silu(g) + guk) for contiguous [T, C] operands.
  std::tuple<at::Tensor, at::Tensor> (*silu_mul_backward)(const at::Tensor& da, const at::Tensor& gk,
                                                          const at::Tensor& uk, const std::optional<at::Tensor>& ggk,
                                                          const std::optional<at::Tensor>& guk);
};

// (y, gate_kept, up_kept, channel_index) for validated arguments.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_forward(
    const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
    const MlpDims& d, const std::optional<at::Tensor>& channel_index, const MlpKernels& kern);
// grad_x for validated arguments.
at::Tensor mlp_backward(const at::Tensor& grad_y, const at::Tensor& gate_kept, const at::Tensor& up_kept,
                        const at::Tensor& channel_index, const at::Tensor& w_gate, const at::Tensor& w_up,
                        const at::Tensor& w_down, const std::optional<at::Tensor>& grad_gate_kept,
                        const std::optional<at::Tensor>& grad_up_kept, const MlpKernels& kern);

}  // namespace peftcore::token_elim
