// miss: torch-facing pieces shared by the CPU kernels and the CUDA glue.
//
// HF PEFT's MiSS adapter adds sum(x_pad.reshape(..., n_pad / r, r), dim=-2) @ miss to a linear layer's output
// (x zero-padded at the end to a multiple of r; miss [r, out], or [r, mini_r] repeated along out in the "mini"
// form). The fold is its own pair of ops so that neither the padded copy of x nor an expanded gradient exists:
//   miss_fold    x [..., n] -> y [..., r],     y[..., c] = sum_{f < n, f % r == c} x[..., f]
//   miss_unfold  g [..., r] -> out [..., n],   out[..., f] = g[..., f % r]     (miss_fold's adjoint)
// 1 <= r <= n in both (PEFT requires r <= in_features).
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

namespace peftcore::miss {

// Argument checks shared by every backend (dtype, rank, 1 <= r <= n); messages name the op.
void check_fold_args(const char* op, const at::Tensor& x, int64_t r);
void check_unfold_args(const char* op, const at::Tensor& grad, int64_t n);
// 2-D contiguous view [rows, last] of t [..., last] (rows may be 0).
at::Tensor flatten_rows(const at::Tensor& t);
// Shape of t with its last dim replaced.
std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t last);

}  // namespace peftcore::miss
