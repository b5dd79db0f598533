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

#include <cstdint>
#include <optional>

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

}  // namespace peftcore::lora
