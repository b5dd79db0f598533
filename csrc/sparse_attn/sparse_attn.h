// sparse_attn: torch-facing pieces shared by the CPU kernels and the CUDA glue.
//
// Block-sparse attention over q [B, Hq, Lq, D], k / v [B, Hkv, Lk, D] (Hq a multiple of Hkv: query head h reads
// key/value head h / (Hq / Hkv), GQA / MQA without repeating k and v). The key axis and the query axis are cut
// into blocks of block_size tokens (the last one partial): Qb = ceil(Lq / bs), Kb = ceil(Lk / bs). block_mask
// bool [Bm, Hm, Qb, Kb] with Bm in {1, B}, Hm in {1, Hq} (broadcast) says which (query block, key block) pairs
// are computed; causal additionally hides key j from query i when j > i + off, where off = 0 for causal_align
// "top_left" (the default, as F.scaled_dot_product_attention(is_causal=True)) and off = Lk - Lq for "bottom_right"
// (FlashAttention >= 2.1: the last query sees the last key, a KV-cache decode). A query row that sees no key gets
// out = 0 and lse = -inf.
//
// NaN / inf: a NaN or inf in q, or in k of a key a row sees, makes that row's out and lse NaN (as SDPA); a row
// whose visible scores are all -inf counts as seeing nothing (0 / -inf, as SDPA's safe softmax).
//
// lse (log-sum-exp of the scaled scores over the visible keys) is the softmax statistic in the accumulate type:
// float32 for float16 / bfloat16 / float32 inputs, float64 for float64 (CPU only).
#pragma once
#include <ATen/core/Tensor.h>

#include <c10/util/string_view.h>

#include <optional>

#include "sparse_attn/sparse_attn_tc_plan.h"

namespace peftcore::sparse_attn {

// Sizes of one call, after validation.
struct Dims {
  int64_t B, Hq, Hkv, Lq, Lk, D, bs, Qb, Kb;
  int64_t mask_b, mask_h;  // block_mask's batch / head extents (1 = broadcast); 0 when there is no mask
  double scale;
  bool causal;
  int64_t off;  // causal: query i sees key j iff j <= i + off (0 top-left, Lk - Lq bottom-right)
};

// ceil(a / b) for a >= 0, b > 0, without overflow for huge b.
inline int64_t ceil_div(int64_t a, int64_t b) { return a == 0 ? 0 : (a - 1) / b + 1; }

// q, k, v (+ block_mask when given) against each other: dtypes, devices, ranks, GQA divisibility, block_size,
// scale (finite), causal_align ("top_left" or "bottom_right").
Dims check_attn_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor* block_mask, int64_t block_size, bool causal, std::optional<double> scale,
                     c10::string_view causal_align);
// q, k only (attn_block_pool).
Dims check_pool_args(const char* op, const at::Tensor& q, const at::Tensor& k, int64_t block_size, bool causal,
                     std::optional<double> scale, c10::string_view causal_align);
// grad_out, out, lse (and grad_lse when defined) against the forward's dims.
void check_backward_args(const char* op, const Dims& d, const at::Tensor& q, const at::Tensor& grad_out,
                         const std::optional<at::Tensor>& grad_lse, const at::Tensor& out, const at::Tensor& lse);
// sparse_attn_tc_tiles: block_mask bool [Bm, Hm, ceil(q_len / bs), ceil(k_len / bs)], lengths >= 0,
// block_size > 0, tile sizes in [1, 1024], causal_align; returns the tile geometry.
tc::TileGeom check_tc_tiles_args(const char* op, const at::Tensor& block_mask, int64_t q_len, int64_t k_len,
                                 int64_t block_size, bool causal, c10::string_view causal_align, int64_t tile_m,
                                 int64_t tile_n);
// The lse / statistics dtype for an input dtype (float64 for float64, else float32).
at::ScalarType stat_dtype(at::ScalarType t);

}  // namespace peftcore::sparse_attn
