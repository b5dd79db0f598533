// sparse_delta CUDA launchers: plain C++ (no torch headers), implemented in sparse_delta.cu.
// Layouts: activations row-major [tokens, features], contiguous; W row-major [out, in], contiguous.
// CSR view of S: row_ptr [out+1] int64; indices [nnz] int32|int64 flat r*in+c (column c = idx - r*in; an entry
// whose c falls outside [0, in) is skipped); values [nnz] float32 (the glue converts other dtypes).
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
  const int64_t* row_ptr;   // [out+1]
  const float* values;      // [nnz]
  int64_t nnz;
  int64_t out_features;
  int64_t in_features;
  float scale;
  bool deterministic;       // no float atomics (torch.use_deterministic_algorithms): sddmm runs one token split
};

// y[t, r] += scale * sum_{k in row r} values[k] * x[t, c_k]; x [tokens, in], y [tokens, out] (fp32 accumulation).
void spmm_accumulate(const DeltaParams& p, const void* x, void* y, int64_t tokens, cudaStream_t stream);
// gx[t, c] += scale * sum_{k : c_k == c} values[k] * g[t, r_k]; g [tokens, out], gx [tokens, in]. Uses shared-memory
// float atomics (summation order may vary); the glue's deterministic path runs spmm_accumulate on S^T instead.
void spmm_t_accumulate(const DeltaParams& p, const void* g, void* gx, int64_t tokens, cudaStream_t stream);
// out[k] = scale * sum_t g[t, r_k] * x[t, c_k] (fp32 accumulation, fp32 out; entries never visited stay as given,
// so the caller zero-fills out). Tokens split over blocks with float atomics unless p.deterministic.
void sddmm(const DeltaParams& p, const void* g, const void* x, float* out, int64_t tokens, cudaStream_t stream);
// w[r, c_k] += scale * values[k] for every k (w [out, in], dtype p.dtype).
void merge(const DeltaParams& p, void* w, cudaStream_t stream);
// out[i] = |tile[i]| unless flat0 + i is in exclude (sorted int64 [n_exclude]), where out[i] = -1.
void mask_abs_excluded(const float* tile, int64_t n, int64_t flat0, const int64_t* exclude, int64_t n_exclude,
                       float* out, cudaStream_t stream);

}  // namespace peftcore::sparse_delta::cuda
