// Shared argument checks. Every message starts with the op name and shows the offending value.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

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

// rows * cols of a matrix given by two sizes (e.g. out_features * in_features): both must be >= 0 and the product
// must fit in int64, so every flat index r * cols + c below it is representable.
inline int64_t checked_numel(const char* op, const char* rows_name, int64_t rows, const char* cols_name,
                             int64_t cols) {
  TORCH_CHECK(rows >= 0 && cols >= 0, op, ": ", rows_name, " and ", cols_name, " must be >= 0, got ", rows, " and ",
              cols);
  int64_t n = 0;
  TORCH_CHECK(!c10::mul_overflows(rows, cols, &n), op, ": ", rows_name, " * ", cols_name, " = ", rows, " * ", cols,
              " overflows int64");
  return n;
}

}  // namespace peftcore
