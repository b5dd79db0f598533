// What every family's CUDA glue (<family>_cuda.cpp) shares. Host C++ only: never include from a .cu file.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>

#include "checks.h"

namespace peftcore {

// An activation / weight handed to a CUDA kernel: floating, on CUDA, and not float64 (CPU-only dtype).
inline void check_cuda_activation(const char* op, const char* name, const at::Tensor& t) {
  check_float(op, name, t);
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor here, got ", t.device());
  TORCH_CHECK(t.scalar_type() != at::kDouble, op, ": ", name,
              " must be float32, float16 or bfloat16 on CUDA (float64 runs on CPU only), got ", t.scalar_type());
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace peftcore
