// lora: many LoRA adapters over one frozen linear in one batch (S-LoRA / Punica serving, MeteoRA's gated mixture),
// torch-facing pieces shared by the kernels of every backend.
//
// Packed adapters. N adapters of ranks r_0..r_{N-1} (any, no padding) live back to back:
//   a_packed [R, in]   rows offsets[i]:offsets[i+1] are adapter i's A_i [r_i, in]
//   b_packed [out, R]  the same columns are its B_i [out, r_i]
//   offsets  [N+1] int64, offsets[0] = 0, non-decreasing, offsets[N] = R (a rank-0 adapter adds nothing)
//   scales   [N] float32 (alpha / r, or rsLoRA's alpha / sqrt(r): the caller's choice)
// Tokens. x [..., in] holds T tokens (its leading dims flattened). token_adapter [T] or [T, k] int64 names the
// adapter of each of the token's k slots (-1: none); token_weight [T, k] (or [T] with a 1-D token_adapter),
// None meaning all ones, weighs each slot (MeteoRA's gate). An adapter may fill several slots of one token: the
// contributions add.
//   y[t] = x[t] W^T + bias + sum_j token_weight[t, j] * scales[i] * (x[t] A_i^T) B_i^T,   i = token_adapter[t, j]
// Pairs. Slot j of token t is pair p = t*k + j; the kernels group pairs by adapter.
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <functional>
#include <tuple>

#include <cstdint>
#include <optional>
#include <vector>

namespace peftcore::lora {

struct Dims {
  int64_t T = 0;    // tokens
  int64_t k = 1;    // slots per token
  int64_t in = 0;   // input features
  int64_t out = 0;  // output features (0 when the op has no b_packed)
  int64_t N = 0;    // adapters
  int64_t R = 0;    // packed rank
};

// Shapes, dtypes and devices of the packed adapters (a_packed and b_packed may be undefined for ops that take
// only one of them); fills d.N, d.R and d.in / d.out from them. No values read.
void check_packed(const char* op, Dims& d, const at::Tensor& ref, const char* ref_name, const at::Tensor* a_packed,
                  const at::Tensor* b_packed, const at::Tensor& offsets, const at::Tensor* scales);
// token_adapter [T] or [T, k] int64 and token_weight (None, or the same shape, in ref's dtype or float32 for half
// types); fills d.k. No values read.
void check_tokens(const char* op, Dims& d, const at::Tensor& ref, const char* ref_name, const at::Tensor& token_adapter,
                  const std::optional<at::Tensor>& token_weight);
// The values: offsets start at 0, never decrease, end at R; adapter ids in [-1, N). Reads the tensors on the host
// (the CPU kernels call it on every call; on CUDA it is lora_validate's job, which syncs).
void validate_values(const char* op, const Dims& d, const at::Tensor& offsets, const at::Tensor& token_adapter);


// Shape / dtype / device checks shared by the CPU and CUDA kernels (no values read, no device required).
// x as [T, features] (contiguous); t's shape with its last dim replaced.
at::Tensor flat_tokens(const char* op, const char* name, const at::Tensor& t, int64_t features);
std::vector<int64_t> with_last(const at::Tensor& t, int64_t last);
// h's shape for lora_shrink / lora_expand: token_adapter's shape + [R].
std::vector<int64_t> h_shape(const at::Tensor& token_adapter, int64_t R);
// lora_multi_linear and its backward: weight [out, in] and the packed adapters against `ref` (x or grad_out).
Dims linear_dims(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& x,
                 const at::Tensor& weight, const at::Tensor& a_packed, const at::Tensor& b_packed,
                 const at::Tensor& offsets, const at::Tensor& scales, at::Tensor& x2d);
// lora_multi_linear_backward: x and grad_out (g2d: grad_out as [T, out]) against the base layer and the adapters.
Dims multi_backward_dims(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& a_packed, const at::Tensor& b_packed, const at::Tensor& offsets,
                         const at::Tensor& scales, const at::Tensor& token_adapter,
                         const std::optional<at::Tensor>& token_weight, std::array<bool, 4> mask, at::Tensor& x2d,
                         at::Tensor& g2d);
void check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t out);
// lora_shrink (x, a_packed, token_adapter) and lora_expand (h [*token_adapter.shape, R], b_packed, scales,
// token weights) and their backwards.
Dims shrink_shapes(const char* op, const at::Tensor& x, const at::Tensor& a_packed, const at::Tensor& offsets,
                   const at::Tensor& token_adapter, at::Tensor& x2d);
Dims expand_shapes(const char* op, const at::Tensor& h, const at::Tensor& b_packed, const at::Tensor& offsets,
                   const at::Tensor& scales, const at::Tensor& token_adapter,
                   const std::optional<at::Tensor>& token_weight, int64_t out_features);
// lora_linear: weight [out, in], A [r, in], B [out, r] against x.
void check_single_shapes(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& A, const at::Tensor& B);

// lora_linear's dropout (lora_dropout.h), with the chunked forward / backward shared by the backends.
// dropout_p in [0, 1); when > 0, seed is one int64 element on x's device or the CPU.
void check_dropout(const char* op, double p, const at::Tensor& seed, const at::Tensor& x);
uint32_t dropout_threshold(double p);  // p * 2^24: keep iff the hash's top 24 bits >= it
struct DropoutRows {
  // Rows r0 .. r0+n of x2d in `acc`, dropped (a new contiguous tensor).
  std::function<at::Tensor(const at::Tensor& x2d, int64_t r0, int64_t n, at::ScalarType acc)> dropped;
  // rows [n, in] (contiguous, acc) *= keep / (1 - p) for input rows r0 .. r0+n, in place.
  std::function<void(const at::Tensor& rows, int64_t r0)> mask_;
};
at::Tensor linear_dropout_forward(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
                                  double scale, const DropoutRows& drop, int64_t chunk);
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_dropout_backward(
    const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, double scale, const DropoutRows& drop, std::array<bool, 3> mask, int64_t chunk);

}  // namespace peftcore::lora
