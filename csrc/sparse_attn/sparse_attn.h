// sparse_attn: torch-facing pieces shared by the CPU kernels and the CUDA glue.
//
// Block-sparse attention over q [B, Hq, Lq, D], k / v [B, Hkv, Lk, D] (Hq a multiple of Hkv: query head h reads
// key/value head h / (Hq / Hkv), GQA / MQA without repeating k and v). The key axis and the query axis are cut
// into blocks of block_size tokens (the last one partial): Qb = ceil(Lq / bs), Kb = ceil(Lk / bs). block_mask
// bool [Bm, Hm, Qb, Kb] with Bm in {1, B}, Hm in {1, Hq} (broadcast) says which (query block, key block) pairs
// are computed; causal (top-left aligned, as F.scaled_dot_product_attention(is_causal=True)) additionally hides
// key j from query i when j > i. A query row that sees no key gets out = 0 and lse = -inf.
//
// lse (log-sum-exp of the scaled scores over the visible keys) is the softmax statistic in the accumulate type:
// float32 for float16 / bfloat16 / float32 inputs, float64 for float64 (CPU only).
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>

namespace peftcore::sparse_attn {

// Sizes of one call, after validation.
struct Dims {
  int64_t B, Hq, Hkv, Lq, Lk, D, bs, Qb, Kb;
  int64_t mask_b, mask_h;  // block_mask's batch / head extents (1 = broadcast); 0 when there is no mask
  double scale;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// q, k, v (+ block_mask when given) against each other: dtypes, devices, ranks, GQA divisibility, block_size.
Dims check_attn_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor* block_mask, int64_t block_size, std::optional<double> scale);
// q, k only (attn_block_pool).
Dims check_pool_args(const char* op, const at::Tensor& q, const at::Tensor& k, int64_t block_size,
                     std::optional<double> scale);
// grad_out, out, lse (and grad_lse when defined) against the forward's dims.
void check_backward_args(const char* op, const Dims& d, const at::Tensor& q, const at::Tensor& grad_out,
                         const std::optional<at::Tensor>& grad_lse, const at::Tensor& out, const at::Tensor& lse);
// The lse / statistics dtype for an input dtype (float64 for float64, else float32).
at::ScalarType stat_dtype(at::ScalarType t);

}  // namespace peftcore::sparse_attn
