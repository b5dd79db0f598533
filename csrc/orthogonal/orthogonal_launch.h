// orthogonal CUDA launchers: plain C++ (no torch headers), implemented in orthogonal.cu.
// Layouts: nb row-major b x b blocks, contiguous ([nb, b, b]); one CUDA block per matrix, fp32 math in smem.
#pragma once
#include "cuda_dtype.h"
#include <cstdint>
#include <cuda_runtime_api.h>

namespace peftcore::orthogonal::cuda {

using DType = ::peftcore::CudaDType;

// Largest block size the shared-memory kernels take (6 fp32 tiles of 64 x 64 = 96 KiB, opted in per kernel).
constexpr int64_t kMaxBlock = 64;

// out = (I - S)(I + S)^{-1}, S = (A - A^T)/2 (Gauss-Jordan with partial pivoting).
void cayley(DType dtype, const void* params, void* out, int64_t nb, int64_t b, cudaStream_t stream);
// out = skew(-1/2 (I + R)^T G (I + R)^T).
void cayley_backward(DType dtype, const void* grad, const void* R, void* out, int64_t nb, int64_t b,
                     cudaStream_t stream);
// out = sum_k coef[k] S^k (Horner), coef [ncoef] on the host (copied into kernel arguments, ncoef <= 65).
void neumann(DType dtype, const void* params, void* out, int64_t nb, int64_t b, const float* coef, int ncoef,
             cudaStream_t stream);
// out = skew(sum_k coef[k] H_k), H_1 = G, H_{k+1} = H_k S^T + (S^T)^k G.
void neumann_backward(DType dtype, const void* grad, const void* params, void* out, int64_t nb, int64_t b,
                      const float* coef, int ncoef, cudaStream_t stream);

}  // namespace peftcore::orthogonal::cuda
