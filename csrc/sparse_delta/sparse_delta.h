// sparse_delta: torch-facing pieces shared by the CPU kernels and the CUDA glue.
//
// A delta S on W [out, in] is (indices [nnz] int32|int64 holding flat positions r*in + c, sorted ascending and
// unique; values [nnz] float32 or W's dtype). Every kernel walks S row by row through a CSR view: row_ptr [out+1]
// int64 (row_ptr[r] = first k with indices[k] >= r*in); grad_x walks S^T through S's CSC view: csc_ptr [in+1],
// csc_idx [nnz] (flat c*out + r, ascending) and csc_perm [nnz] (csc_idx[j] is the transpose of indices[csc_perm[j]]),
// all int64. sparse_delta_csr builds the four once per delta (build_csr); the ops take them as optional arguments
// and build what they need per call when they are not given. Entries outside their row's range are never
// touched, so malformed indices (or a malformed CSR) on CUDA, where the hot path does not validate values, give
// wrong numbers, never an out-of-bounds access; sparse_delta_validate catches malformed indices.
#pragma once
#include <ATen/core/Tensor.h>

#include <optional>
#include <utility>
#include <vector>

namespace peftcore::sparse_delta {

// Argument checks shared by every backend; `ref` is the activation/weight the delta is applied to.
void check_delta(const char* op, const at::Tensor& indices, const at::Tensor& values, const at::Tensor& ref);
void check_indices(const char* op, const at::Tensor& indices, const at::Tensor& ref, const char* name = "indices");
// Host-side structural check (sorted, unique, in range). Syncs on CUDA.
void validate_indices(const char* op, const at::Tensor& indices, int64_t out_features, int64_t in_features);
// row_ptr [out+1] int64 on indices' device (at::searchsorted: no host sync).
at::Tensor row_ptr(const at::Tensor& indices, int64_t out_features, int64_t in_features);
// [row_ptr, csc_ptr, csc_idx, csc_perm] of indices (ATen ops only: no host sync on CUDA). Entries outside
// [0, out*in) (unvalidated CUDA input) lie in no row of the CSC view.
std::vector<at::Tensor> build_csr(const at::Tensor& indices, int64_t out_features, int64_t in_features);
// Metadata checks of the optional CSR arguments (dtype int64, 1-D, length, device; the CSC triple all or none),
// on every backend. Values are not read here.
void check_row_ptr(const char* op, const std::optional<at::Tensor>& row_ptr, const at::Tensor& indices, int64_t out);
void check_csc(const char* op, const std::optional<at::Tensor>& csc_ptr, const std::optional<at::Tensor>& csc_idx,
               const std::optional<at::Tensor>& csc_perm, const at::Tensor& indices, int64_t in);
// CPU only: the given tensors must equal build_csr(indices, out, in) (the CPU kernels then use their own CSR).
void match_csr(const char* op, const at::Tensor& indices, int64_t out, int64_t in,
               const std::optional<at::Tensor>& row_ptr, const std::optional<at::Tensor>& csc_ptr,
               const std::optional<at::Tensor>& csc_idx, const std::optional<at::Tensor>& csc_perm);
inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }
// Output dtype of the values' gradient.
at::ScalarType values_grad_dtype(const at::Tensor& values);
// 2-D contiguous view [T, features] of an activation [..., features].
at::Tensor flatten_tokens(const char* op, const char* name, const at::Tensor& t, int64_t features);
// t.size(-1), with an op-named error for a 0-dim t.
int64_t last_dim(const char* op, const char* name, const at::Tensor& t);
// Shape of an activation with its last dim replaced.
std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t last);
// Two activations that share their tokens (e.g. grad [..., out] and x [..., in]): same dtype and device, same
// token count; returned as 2-D contiguous [T, features] views.
std::pair<at::Tensor, at::Tensor> token_pair(const char* op, const char* a_name, const at::Tensor& a,
                                             const char* b_name, const at::Tensor& b);
// weight [out, in] and bias [out] (when given) against x: 2-D, same dtype and device.
void check_weight(const char* op, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& x);
// The dense half of the forward, x2d @ weight^T (+ bias), through ATen (BLAS / cuBLAS); row-major [T, out].
at::Tensor dense_forward(const at::Tensor& x2d, const at::Tensor& weight, const std::optional<at::Tensor>& bias);

}  // namespace peftcore::sparse_delta
