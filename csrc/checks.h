// Shared argument checks. Every message starts with the op name and shows the offending value.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace peftcore {

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline void check_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
              " must be float32, float16, bfloat16 or float64, got ", t.scalar_type());
}

inline void check_index(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
              " must be int32 or int64, got ", t.scalar_type());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                              const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device());
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                             const char* ref_name) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but ",
              ref_name, " has ", ref.scalar_type());
}

}  // namespace peftcore
