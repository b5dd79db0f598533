// partial CUDA launchers: plain C++ (no torch headers), implemented in partial.cu.
// Layouts: activations row-major [tokens, features] with row stride ld; index [k] int64 (entries outside
// [0, features) are skipped: a gathered element reads 0, a scattered one is dropped).
#pragma once
#include "cuda_dtype.h"
#include <cstdint>
#include <cuda_runtime_api.h>

namespace peftcore::partial::cuda {

using DType = ::peftcore::CudaDType;

// out[t, j] = x[t * ldx + index[j]]; out [tokens, k] contiguous.
void gather(DType dtype, const void* x, int64_t ldx, int64_t features, const int64_t* index, int64_t k, void* out,
            int64_t tokens, cudaStream_t stream);
// y[t * ldy + index[j]] += src[t, j] (fp32 math, one rounding); src [tokens, k] contiguous. index entries must be
// unique (they are after partial_validate), else concurrent updates of one element race.
void scatter_add(DType dtype, const void* src, const int64_t* index, int64_t k, void* y, int64_t ldy,
                 int64_t features, int64_t tokens, cudaStream_t stream);

}  // namespace peftcore::partial::cuda
