// token_elim: torch-facing pieces shared by the CPU kernels and the CUDA glue (LeMo / Jenga token elimination).
//
// Token gather / scatter. x [B, L, *] (trailing dims flattened to F features), keep_index [B, K] int64, each row
// sorted ascending and unique, entries in [0, L). K is static: it is keep_index.shape[1], so every output size is
// known from the input shapes (no data-dependent shapes, no host sync on CUDA).
//   token_gather(x, keep)                  out[b, j, :] = x[b, keep[b, j], :]                     [B, K, *]
//   token_scatter_add(residual, src, keep) out = residual; out[b, keep[b, j], :] += src[b, j, :]  [B, L, *]
//
// Partial-save MLP (LlamaMLP with frozen weights): y = (silu(x Wg^T) * (x Wu^T)) Wd^T, full forward; only the
// gate / up pre-activations of c intermediate channels (channel_index [c], sorted unique) are kept for backward,
// whose gradient flows through those channels only.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace peftcore::token_elim {

// Sizes of a gather / scatter call after validation (F: product of the trailing dims).
struct TokenDims {
  int64_t B, L, K, F;
};

// Shapes, dtypes, devices of x (or residual) and keep_index; src too when given (scatter).
TokenDims check_token_args(const char* op, const at::Tensor& x, const at::Tensor& keep_index,
                           const at::Tensor* src);
// Host-side structural check of keep_index (rows sorted ascending, unique, in [0, L)). Reads it on the host.
void check_keep_values_cpu(const char* op, const at::Tensor& keep_index, int64_t L,
                           const char* name = "keep_index");

// Sizes of a partial-save MLP call: T tokens, H hidden, I intermediate, C kept channels.
struct MlpDims {
  int64_t T, H, I, C;
};
// Shapes, dtypes, devices of the partial-save MLP's forward (x_name: the activation, "x" or "grad_y").
MlpDims check_mlp_args(const char* op, const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                       const at::Tensor& w_down, int64_t keep_channels,
                       const std::optional<at::Tensor>& channel_index, const char* x_name = "x");
// Everything token_mlp_partial_save_backward checks without reading values, for every backend: the forward's
// checks on (grad_y, weights, channel_index), and gate_kept / up_kept / grad_gate_kept / grad_up_kept (when
// given) [..., C] with grad_y's leading dims, dtype and device (the elementwise kernels read them all as one
// dtype, element for element).
MlpDims check_mlp_backward_args(const char* op, const at::Tensor& grad_y, const at::Tensor& gate_kept,
                                const at::Tensor& up_kept, const at::Tensor& channel_index, const at::Tensor& w_gate,
                                const at::Tensor& w_up, const at::Tensor& w_down,
                                const std::optional<at::Tensor>& grad_gate_kept,
                                const std::optional<at::Tensor>& grad_up_kept);
// Shapes, dtypes, devices of token_block_scores (q, k [B, H, L, D], GQA heads) and its block_size / scale.
void check_block_scores_args(const char* op, const at::Tensor& q, const at::Tensor& k, int64_t block_size,
                             std::optional<double> scale);
// The channels to keep: channel_index when given, else the keep_channels largest by sum over tokens of
// |silu(g) * u| (fp32 / fp64), sorted ascending. Device agnostic (ATen topk / sort).
at::Tensor select_channels(const at::Tensor& act2d, int64_t keep_channels,
                           const std::optional<at::Tensor>& channel_index);

}  // namespace peftcore::token_elim
