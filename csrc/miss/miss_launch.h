// miss CUDA launchers: plain C++ (no torch headers), implemented in miss.cu.
// Layouts: x / out row-major [rows, n] contiguous, y / grad row-major [rows, r] contiguous; 1 <= r <= n (checked
// by the glue). No host sync: both are CUDA-graph capturable.
#pragma once
#include "cuda_dtype.h"
#include <cstdint>
#include <cuda_runtime_api.h>

namespace peftcore::miss::cuda {

using DType = ::peftcore::CudaDType;

// y[t, c] = sum_{f < n, f % r == c} x[t, f] (fp32 accumulation, one rounding).
void fold(DType dtype, const void* x, int64_t rows, int64_t n, int64_t r, void* y, cudaStream_t stream);
// out[t, f] = grad[t, f % r].
void unfold(DType dtype, const void* grad, int64_t rows, int64_t r, int64_t n, void* out, cudaStream_t stream);

}  // namespace peftcore::miss::cuda
