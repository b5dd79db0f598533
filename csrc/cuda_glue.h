// What every family's CUDA glue (<family>_cuda.cpp) shares. Host C++ only: never include from a .cu file.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"
#include "cuda_dtype.h"

namespace peftcore {

// An activation / weight handed to a CUDA kernel: floating, on CUDA, and not float64 (CPU-only dtype).
inline void check_cuda_activation(const char* op, const char* name, const at::Tensor& t) {
  check_float(op, name, t);
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor here, got ", t.device());
  TORCH_CHECK(t.scalar_type() != at::kDouble, op, ": ", name,
              " must be float32, float16 or bfloat16 on CUDA (float64 runs on CPU only), got ", t.scalar_type());
}

// The kernels' dtype tag for a checked activation dtype; `family` names the refusal (float64 is refused earlier).
inline CudaDType kernel_dtype(const char* family, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return CudaDType::kFloat32;
    case at::kHalf: return CudaDType::kFloat16;
    case at::kBFloat16: return CudaDType::kBFloat16;
    default: TORCH_CHECK(false, family, ": no CUDA kernel for dtype ", t);
  }
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace peftcore
