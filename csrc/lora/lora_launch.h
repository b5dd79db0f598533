// lora CUDA launchers: plain C++ (no torch headers), implemented in lora.cu (CUDA cores) and lora_tc.cu (tensor
// cores). The layouts are lora.h's; every pointer is a device pointer and every matrix is row-major.
//
// Pairs. Slot j of token t is pair p = t * k + j with adapter i = ta[p]. A kernel skips, without reading anything
// of the adapter, every pair whose adapter is not valid: i < 0 or i >= N, or offsets[i] < 0, offsets[i+1] > R or
// offsets[i+1] <= offsets[i] (values are checked by lora_validate, which syncs; the kernels never do, and never
// read out of bounds on bad values).
// Weights. ws(p) = scales[i] (when scales is given) * token_weight[p] (when given, in tw_dtype).
// Buffers named "packed" below are [P, R] with row stride R: pair p's adapter i owns columns offsets[i] ..
// offsets[i+1] of row p; a kernel reads and writes only those columns.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda_dtype.h"

namespace peftcore::lora::cuda {

using DType = ::peftcore::CudaDType;

struct Pairs {
  const int64_t* ta = nullptr;       // [P] adapter per pair
  int64_t T = 0, k = 1;              // P = T * k
  const int64_t* offsets = nullptr;  // [N + 1]
  int64_t N = 0, R = 0;
  const float* scales = nullptr;     // [N] or null (ws ignores it)
  const void* tw = nullptr;          // [P] token weights or null (ws ignores them)
  DType tw_dtype = DType::kFloat32;
};

// h[p, off_i + m] = f * sum_c x[t, c] A[off_i + m, c], m < r_i (f = ws(p) when weighted, else 1).
// x [T, in] (row stride ldx) and A [R, in] in dtype; h packed, fp32 when h_fp32 else dtype.
void shrink_gathered(DType dtype, const void* x, int64_t ldx, const void* a, int64_t in, const Pairs& pr, void* h,
                     bool h_fp32, bool weighted, cudaStream_t stream);

// y[t, o] (+)= sum_j f * sum_m h[p, off_i + m] * M[o, m] for the pairs p = t k + j (f = ws(p) when weighted),
// with M[o, m] = mat[o * so + (off_i + m) * sm] in dtype: B_i (so = R, sm = 1; o < out) or A_i^T (so = 1,
// sm = in; o < in). h packed in fp32 when h_fp32 else dtype. y [T, cols] (row stride ldy): fp32 when y_fp32, else
// dtype; accumulate adds to y's value (one rounding), else y is written.
void expand_gathered(DType dtype, const void* h, bool h_fp32, const void* mat, int64_t so, int64_t sm, int64_t cols,
                     const Pairs& pr, void* y, int64_t ldy, bool y_fp32, bool accumulate, bool weighted,
                     cudaStream_t stream);

// u[p, off_i + m] = f * sum_o g[t, o] * B[o, off_i + m] (fp32 packed; f = ws(p) when weighted, else 1).
// g [T, out] (row stride ldg) and B [out, R] in dtype.
void expand_t_gathered(DType dtype, const void* g, int64_t ldg, const void* b, int64_t out, const Pairs& pr,
                       float* u, bool weighted, cudaStream_t stream);

// Per adapter i, over its pairs in `perm[starts[i]:starts[i+1]]` (pairs sorted by adapter, stable):
//   dst[(off_i + m) * sdm + c * sdc] = sum_q u[p_q, off_i + m] * v[t_q, c]     (c < cols, m < r_i)
// u packed fp32 (pre-weighted by the caller), v [T, cols] (row stride ldv) in dtype, dst in dtype. Every element
// of dst that belongs to an adapter is written (zero when the adapter has no pair); the sum runs in pair order
// (deterministic).
void segment_outer(DType dtype, const float* u, const void* v, int64_t ldv, int64_t cols, const int64_t* perm,
                   const int64_t* starts, const Pairs& pr, void* dst, int64_t sdm, int64_t sdc, cudaStream_t stream);

// out[p] = scales[i] * sum_m u[p, off_i + m] * w[p, off_i + m] (u, w packed fp32); out [P] in out_dtype, 0 for
// pairs without a valid adapter.
void pair_dot(const float* u, const float* w, const Pairs& pr, void* out, DType out_dtype, cudaStream_t stream);


// Dropout of lora_linear (lora_dropout.h): dst[e] = keep(seed, e0 + e) ? src[e] / (1 - p) : 0 over n contiguous
// elements, src in src_dtype, dst fp32 (src may alias dst when both are fp32). The seed is read on the device.
void dropout(DType src_dtype, const void* src, float* dst, int64_t n, int64_t e0, const int64_t* seed,
             uint32_t threshold, float inv_keep, cudaStream_t stream);

// Tensor cores (lora_tc.cu; fp16 / bf16 when built with CuTe: tc_supported): the grouped forms of shrink_gathered
// (h fp32) and expand_gathered (y in dtype) over pairs sorted by adapter (perm, starts as segment_outer), in tiles
// of 64 pairs of one adapter.
bool tc_supported(DType dtype);
void shrink_grouped(DType dtype, const void* x, int64_t ldx, const void* a, int64_t in, const int64_t* perm,
                    const int64_t* starts, const Pairs& pr, float* h, bool weighted, cudaStream_t stream);
void expand_grouped(DType dtype, const void* h, bool h_fp32, const void* b, int64_t out, const int64_t* perm,
                    const int64_t* starts, const Pairs& pr, void* y, int64_t ldy, bool accumulate, bool weighted,
                    cudaStream_t stream);  // k == 1 only; h packed (fp32 or dtype), times ws(p) when weighted

}  // namespace peftcore::lora::cuda
