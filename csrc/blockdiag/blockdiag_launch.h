// blockdiag CUDA launchers: plain C++ (no torch headers), implemented in blockdiag.cu.
// Layouts: x [tokens, k*p], y [tokens, l*s] row-major contiguous; w1 [k, q, p], w2 [l, s, r] contiguous.
#pragma once
#include "cuda_dtype.h"
#include <cstdint>
#include <cuda_runtime_api.h>

namespace peftcore::blockdiag::cuda {

using DType = ::peftcore::CudaDType;

// Fused Monarch forward (see blockdiag_kernels.cuh). Returns false, launching nothing, when one token's input
// and intermediate ((k*p + k*q) floats) do not fit in the device's shared memory; the caller then falls back.
bool monarch_forward(DType dtype, const void* x, const void* w1, const void* w2, void* y, int64_t tokens, int64_t k,
                     int64_t q, int64_t p, int64_t l, int64_t s, int64_t r, cudaStream_t stream);

}  // namespace peftcore::blockdiag::cuda
