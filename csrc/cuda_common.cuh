// What every family's CUDA kernels share: fp32 conversions of the storage dtypes and launch-error reporting.
// Plain CUDA (no torch headers), included by <family>_kernels.cuh / <family>.cu only.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda_dtype.h"

namespace peftcore::cuda_common {

// f(static_cast<T*>(nullptr)) with T the storage type of d (a tag: the lambda takes `auto tag`).
template <typename F>
void dispatch_dtype(CudaDType d, F&& f) {
  switch (d) {
    case CudaDType::kFloat32: f(static_cast<float*>(nullptr)); break;
    case CudaDType::kFloat16: f(static_cast<__half*>(nullptr)); break;
    case CudaDType::kBFloat16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: throw std::runtime_error("peftcore CUDA: unsupported dtype");
  }
}

// Loads convert to fp32, stores round once (round-to-nearest-even).
template <typename T>
__device__ __forceinline__ float to_f32(T v) { return static_cast<float>(v); }
template <>
__device__ __forceinline__ float to_f32<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T>
__device__ __forceinline__ T from_f32(float v) { return static_cast<T>(v); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Throws (the torch glue turns it into a Python RuntimeError) when a CUDA call or launch failed; clears a sticky
// launch error first so it is not reported twice.
inline void check_cuda(cudaError_t e, const char* family, const char* what) {
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("peftcore ") + family + " CUDA: " + what + ": " + cudaGetErrorString(e));
  }
}

}  // namespace peftcore::cuda_common
