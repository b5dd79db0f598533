// token_elim CUDA launchers: plain C++ (no torch headers), implemented in token_elim.cu.
// Token layouts: x / out [B, L, F] row-major, keep [B, K] int64 (rows unique; entries outside [0, L) are skipped:
// a gathered row reads 0, a scattered one is dropped). MLP operands [T, I] / [T, C] row-major.
#pragma once
#include "cuda_dtype.h"
#include <cstdint>
#include <cuda_runtime_api.h>

namespace peftcore::token_elim::cuda {

using DType = ::peftcore::CudaDType;

// out[b, j, :] = x[b, keep[b, j], :]; out [B, K, F] contiguous.
void gather_rows(DType dtype, const void* x, const int64_t* keep, void* out, int64_t B, int64_t L, int64_t K,
                 int64_t F, cudaStream_t stream);
// out[b, keep[b, j], :] += src[b, j, :] (fp32 math, one rounding), in place.
void scatter_add_rows(DType dtype, const void* src, const int64_t* keep, void* out, int64_t B, int64_t L,
                      int64_t K, int64_t F, cudaStream_t stream);
// a = silu(g) * u over n elements.
void silu_mul(DType dtype, const void* g, const void* u, void* a, int64_t n, cudaStream_t stream);
// out[t, c] = src[t, idx[c]]; src [T, I], out [T, C].
void gather_cols(DType dtype, const void* src, const int64_t* idx, void* out, int64_t T, int64_t I, int64_t C,
                 cudaStream_t stream);
// dg = da * u * silu'(g) (+ ggk), du = da * silu(g) (+ guk) over n elements; ggk / guk may be null.
void silu_mul_backward(DType dtype, const void* da, const void* g, const void* u, const void* ggk, const void* guk,
                       void* dg, void* du, int64_t n, cudaStream_t stream);

}  // namespace peftcore::token_elim::cuda
