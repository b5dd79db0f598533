// Named dispatch macros (vLLM style). The lambda body sees `scalar_t` / `index_t`.
#pragma once
#include <ATen/Dispatch.h>

// float32, float16, bfloat16, float64 (float64 is for gradcheck on CPU).
#define PEFTCORE_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

// int32 or int64 sparse indices.
#define PEFTCORE_DISPATCH_INDEX(TYPE, NAME, ...)                                   \
  [&] {                                                                            \
    if ((TYPE) == at::kInt) {                                                      \
      using index_t = int32_t;                                                     \
      return __VA_ARGS__();                                                        \
    } else {                                                                       \
      TORCH_CHECK((TYPE) == at::kLong, NAME, ": indices must be int32 or int64, got ", (TYPE)); \
      using index_t = int64_t;                                                     \
      return __VA_ARGS__();                                                        \
    }                                                                              \
  }()
