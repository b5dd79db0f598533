// partial: torch-facing pieces shared by the CPU kernels and the CUDA glue.
//
// A partial delta on W [out, in] is (index [k] int64, sorted ascending, unique; delta [k, in] for dim 0 (rows,
// output channels) or [out, k] for dim 1 (columns, input channels), float32 or W's dtype). The effective weight
// W_eff is W with delta added to the selected rows / columns; it is never materialised.
//
// Two execution paths share one implementation (linear_forward / linear_backward, ATen GEMMs on views plus two
// device kernels, Kernels below):
//  * range path, index = [a, a+k) (what co-permutation produces): every selected block is a strided view, so
//    no gather / scatter; the delta enters as its own skinny GEMM accumulated into a view of the dense result
//    (never as W_sel + delta rounded to W's dtype: with bf16 / fp16 weights a delta below half an ulp of W would
//    vanish).
//  * general path: the dense GEMM with W, plus one k-wide GEMM through the gather / scatter-add kernels.
// On CPU the range is detected from the (validated) index, and an explicit range_start is checked against it;
// on CUDA it is given explicitly (range_start >= 0) and the index is not read, since that would sync with the
// host.
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace peftcore::partial {

// The device kernels the shared linear code calls. Index entries outside [0, features) are skipped (CUDA does
// not validate in the hot path; CPU validates before calling).
struct Kernels {
  // [T, k] = x2d[:, index] for x2d [T, features] contiguous.
  at::Tensor (*gather)(const at::Tensor& x2d, const at::Tensor& index);
  // y2d[:, index] += src for y2d [T, features] contiguous, src [T, k] contiguous, in place.
  void (*scatter_add_into)(const at::Tensor& y2d, const at::Tensor& src, const at::Tensor& index);
};

// index: int64, 1-D, on ref's device (no value checks).
void check_index(const char* op, const at::Tensor& index, const at::Tensor& ref);
// Host-side structural check (sorted ascending, unique, in [0, size); equal to [range_start, range_start + k)
// when range_start >= 0). Syncs on CUDA.
void validate_index(const char* op, const at::Tensor& index, int64_t size, int64_t range_start = -1);
// Argument checks of partial_linear(_backward) shared by every backend; `x` is the activation (or grad_out),
// named x_name in messages. Shapes, dtypes and devices only (no index values).
void check_linear_args(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& delta, const at::Tensor& index, int64_t dim, int64_t range_start);
// 2-D contiguous view [T, features] of an activation [..., features].
at::Tensor flatten_tokens(const char* op, const char* name, const at::Tensor& t, int64_t features);
// Shape of an activation with its last dim replaced.
std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t last);

// range_start: >= 0 runs the range path on [range_start, range_start + k); -1 the general path (already resolved
// by the caller: CPU detects ranges, CUDA trusts the argument).
at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& delta, const at::Tensor& index, int64_t dim, int64_t range_start,
                          const Kernels& kern);
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(const at::Tensor& grad_out, const at::Tensor& saved,
                                                               const at::Tensor& weight, const at::Tensor& delta,
                                                               const at::Tensor& index, int64_t dim,
                                                               std::array<bool, 3> mask, int64_t range_start,
                                                               const Kernels& kern);

}  // namespace peftcore::partial
