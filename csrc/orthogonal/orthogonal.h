// orthogonal: torch-facing pieces shared by the CPU kernels and the CUDA glue.
//
// Orthogonal blocks from free parameters A [nb, b, b] (S = (A - A^T)/2, the skew part):
//   cayley          R = (I - S)(I + S)^{-1}                      (PEFT BOFT cayley_batch / OFT exact branch)
//   cayley_neumann  R = I + 2S + ... + 2S^{n-2} + S^{n-1}         (PEFT OFT's truncated series, n = terms)
// and the butterfly chain (BOFT) applied to activations: for factor i = m-1 down to 0 (PEFT multiplies
// M = M_{m-1} ... M_1 M_0 and feeds x @ M), with perm_i PEFT's butterfly permutation (boft_P[i] =
// perm2mat(perm_i)) and inv_i its inverse,
//   y = x[..., inv_i]      (x @ P_i)
//   z = blockdiag(R_i) y   (per block r: z[r, :] = y[r, :] @ R_i[r])
//   x = z[..., perm_i]     (z @ P_i^T)
// i.e. x @ (P_{m-1} B_{m-1} P_{m-1}^T) ... (P_0 B_0 P_0^T), exactly what PEFT's BOFT layer feeds its base layer, with no d x d
// matrix: two index gathers and one batched [nb, T, b] x [nb, b, b] GEMM per factor.
#pragma once
#include <ATen/core/Tensor.h>

#include <array>
#include <tuple>
#include <vector>

namespace peftcore::orthogonal {

// Argument checks shared by every backend.
void check_params(const char* op, const char* name, const at::Tensor& p);
// The one check of orthogonal_boft_apply and its backward (grad_out undefined for the forward): dtypes, devices
// and shapes of every argument; with check_values also that every row of perm is a permutation of [0, d) (the
// CPU ops; on CUDA reading perm would be a host sync, so there its values are not validated and the chain clamps
// them into range instead: wrong numbers for an invalid perm, never an access outside a buffer).
void check_boft_args(const char* op, const at::Tensor& x, const at::Tensor& rotations, const at::Tensor& perm,
                     const at::Tensor& grad_out, bool check_values);

// The BOFT chain through ATen ops (gathers + bmm), device independent; no host sync. m = 0 factors is the identity
// map (grad_x = grad_out). perm's entries are clamped into [0, d) first (see check_boft_args).
at::Tensor boft_forward(const at::Tensor& x, const at::Tensor& rotations, const at::Tensor& perm);
std::tuple<at::Tensor, at::Tensor> boft_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                 const at::Tensor& rotations, const at::Tensor& perm,
                                                 std::array<bool, 2> mask);

// PEFT's Neumann coefficients: c[k] for k = 0..top (top = size - 1).
std::vector<double> neumann_coefficients(int64_t terms);

}  // namespace peftcore::orthogonal
