// sparse_delta CUDA launchers: plain C++ (no torch headers), implemented in sparse_delta.cu.
// Layouts: activations row-major [tokens, features], contiguous; W row-major [out, in], contiguous.
// A CSR matrix M [rows, cols] (S, or S^T given by S's CSC view): row_ptr [rows+1] int64; indices [nnz] int32|int64
// flat r*cols+c (an entry whose c falls outside [0, cols) is skipped; row_ptr entries are clamped to [0, nnz]);
// values [nnz] float32 (the glue converts other dtypes).
#pragma once
#include "cuda_dtype.h"
#include <cstdint>
#include <cuda_runtime_api.h>

namespace peftcore::sparse_delta::cuda {

using DType = ::peftcore::CudaDType;

struct DeltaParams {
  DType dtype;              // dtype of activations / grads / weight
  bool index64;             // indices are int64 (else int32)
  const void* indices;      // [nnz]
  const int64_t* row_ptr;   // [rows+1]
  const float* values;      // [nnz]
  int64_t nnz;
  int64_t out_features;     // rows of M
  int64_t in_features;      // cols of M
  float scale;
  bool deterministic;       // no float atomics (torch.use_deterministic_algorithms): sddmm runs one token split
};

// y[t, r] += scale * sum_{k in row r} values[k] * x[t, c_k]; x [tokens, cols], y [tokens, rows] (fp32
// accumulation, fixed summation order). grad_x = g S is this on S^T (the glue passes S's CSC view).
void spmm_accumulate(const DeltaParams& p, const void* x, void* y, int64_t tokens, cudaStream_t stream);
// out[k] = scale * sum_t g[t, r_k] * x[t, c_k] (fp32 accumulation, fp32 out; entries never visited stay as given,
// so the caller zero-fills out). Tokens split over blocks with float atomics unless p.deterministic.
void sddmm(const DeltaParams& p, const void* g, const void* x, float* out, int64_t tokens, cudaStream_t stream);
// w[f_k] += scale * values[k] for every k with 0 <= f_k < out*in (w [out, in], dtype p.dtype).
void merge(const DeltaParams& p, void* w, cudaStream_t stream);
// vt[j] = float(values[perm[j]]) (0 where perm[j] is outside [0, nnz)); values of dtype `vdtype`.
void gather_values(const int64_t* perm, const void* values, DType vdtype, int64_t nnz, float* vt, cudaStream_t stream);
// out[i] = |tile[i]| unless flat0 + i is in exclude (sorted int64 [n_exclude]), where out[i] = -1.
void mask_abs_excluded(const float* tile, int64_t n, int64_t flat0, const int64_t* exclude, int64_t n_exclude,
                       float* out, cudaStream_t stream);

}  // namespace peftcore::sparse_delta::cuda
