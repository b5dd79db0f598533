// blockdiag: torch-facing pieces shared by the CPU kernels and the CUDA glue.
//
// Block-diagonal matmul: blocks [nb, bo, bi], x [..., nb*bi] -> y [..., nb*bo], y_j = x_j @ blocks[j]^T per
// chunk j. Monarch matmul (fly's blockdiag_butterfly_multiply): w1 [k, q, p], w2 [l, s, r], k*p = in,
// l*r = k*q, out = l*s. Per token, with n = i*q + a the stage-1 feature and o = t*l + j the output feature:
//   h[n]        = sum_c w1[i, a, c] * x[i*p + c]                  (block-diagonal, k blocks)
//   y[t*l + j]  = sum_m w2[j, t, m] * h[m*l + j]                  (block-diagonal on the l-strided permutation)
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <tuple>
#include <vector>

namespace peftcore::blockdiag {

// blocks 3-D, same dtype and device as x (named x_name), x's last dim = nb*bi (or nb*bo when `out_side`).
void check_blockdiag_args(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor& blocks,
                          bool out_side);
// w1, w2 3-D, same dtype / device as x, l*r == k*q, x's last dim = k*p (or l*s when `out_side`).
void check_monarch_args(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor& w1,
                        const at::Tensor& w2, bool out_side);
// grad_out and x have the same token count, dtype and device.
void check_grad_pair(const char* op, const at::Tensor& grad_out, const at::Tensor& x);
// 2-D contiguous view [T, features] of an activation [..., features].
at::Tensor flatten_tokens(const at::Tensor& t);
std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t last);

// Batched-GEMM forms (ATen bmm on permuted views of [T, features] contiguous activations; the intermediate is
// materialised), shared by the CUDA glue and the CPU backward for large blocks. Unasked outputs are undefined.
at::Tensor bmm_blockdiag_forward(const at::Tensor& x2d, const at::Tensor& blocks);
std::tuple<at::Tensor, at::Tensor> bmm_blockdiag_backward(const at::Tensor& g2d, const at::Tensor& x2d,
                                                          const at::Tensor& blocks, std::array<bool, 2> mask);
at::Tensor bmm_monarch_forward(const at::Tensor& x2d, const at::Tensor& w1, const at::Tensor& w2);
// The intermediate as monarch_matmul_with_h returns it, in the stage-2 layout hs[b, j*r + m] = h[b, m*l + j]
// (fly's out1 [T, l, r] flattened; h [T, k*q] is stage 1's output), from x2d [T, k*p] by one batched GEMM and
// one permuting copy; and stage 2 alone from it.
at::Tensor bmm_monarch_intermediate(const at::Tensor& x2d, const at::Tensor& w1, int64_t l, int64_t r);
at::Tensor bmm_monarch_stage2(const at::Tensor& hs, const at::Tensor& w2);
// h2d: the saved intermediate [T, l*r] in the stage-2 layout, or undefined to recompute it from x2d (only grad_w2
// needs it).
std::tuple<at::Tensor, at::Tensor, at::Tensor> bmm_monarch_backward(const at::Tensor& g2d, const at::Tensor& x2d,
                                                                    const at::Tensor& w1, const at::Tensor& w2,
                                                                    std::array<bool, 3> mask,
                                                                    const at::Tensor& h2d = at::Tensor());
// The optional saved intermediate of monarch_matmul_backward: [..., l*r] with x's leading dims, dtype, device.
void check_saved_h(const char* op, const at::Tensor& h, const at::Tensor& x, const at::Tensor& w1);

}  // namespace peftcore::blockdiag
