// blockdiag CUDA launchers: plain C++ (no torch headers), implemented in blockdiag.cu.
// Layouts: x [tokens, k*p], y [tokens, l*s] row-major contiguous; w1 [k, q, p], w2 [l, s, r] contiguous.
#pragma once
#include "cuda_dtype.h"
#include <cstdint>
#include <cuda_runtime_api.h>

namespace peftcore::blockdiag::cuda {

using DType = ::peftcore::CudaDType;

// The opt-in shared memory per block of `device` (cudaDevAttrMaxSharedMemoryPerBlockOptin), bytes.
int64_t smem_optin(int device);

// Fused Monarch forward (see blockdiag_kernels.cuh) with `tile` tokens per CTA and `smem` bytes of dynamic shared
// memory, both from plan::monarch_forward (blockdiag_plan.h), which also says when this kernel is the one to run.
void monarch_forward(DType dtype, const void* x, const void* w1, const void* w2, void* y, int64_t tokens, int64_t k,
                     int64_t q, int64_t p, int64_t l, int64_t s, int64_t r, int tile, int64_t smem,
                     cudaStream_t stream);

}  // namespace peftcore::blockdiag::cuda
