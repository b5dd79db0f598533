// What every family's CUDA kernels share: fp32 conversions of the storage dtypes, 16-byte vector accesses and the
// row mapping of vec_plan.h, and launch-error reporting.
// Plain CUDA (no torch headers), included by <family>_kernels.cuh / <family>.cu only.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda_dtype.h"
#include "vec_plan.h"

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

// V consecutive elements as one access: a 16-byte load / store when V * sizeof(T) == 16 (the address must be
// 16-byte aligned: the launchers check it, vec_plan.h), a plain scalar one when V == 1.
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};
template <typename T, int V>
__device__ __forceinline__ Vec<T, V> load_vec(const T* p) { return *reinterpret_cast<const Vec<T, V>*>(p); }
template <typename T, int V>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, V>& v) { *reinterpret_cast<Vec<T, V>*>(p) = v; }
// Elements of T in 16 bytes.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// The row mapping of vec_plan.h (blocks of tx x ty threads): rows over blockIdx.x / threadIdx.y, accesses along a
// row over blockIdx.y / threadIdx.x, both grid-strided: for (t = row_begin(); t < rows; t += row_step()).
__device__ __forceinline__ int64_t row_begin() { return static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; }
__device__ __forceinline__ int64_t row_step() { return static_cast<int64_t>(gridDim.x) * blockDim.y; }
__device__ __forceinline__ int64_t col_begin() { return static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; }
__device__ __forceinline__ int64_t col_step() { return static_cast<int64_t>(gridDim.y) * blockDim.x; }

// Grid and block of a row mapping (vec_plan.h), and an address for its alignment rule.
struct LaunchShape {
  dim3 grid, block;
};
inline LaunchShape launch_shape(const vec_plan::RowLaunch& l) {
  return {dim3(static_cast<unsigned>(l.grid_x), static_cast<unsigned>(l.grid_y)),
          dim3(static_cast<unsigned>(l.tx), static_cast<unsigned>(l.ty))};
}
inline uint64_t address(const void* p) { return reinterpret_cast<uintptr_t>(p); }

// Throws (the torch glue turns it into a Python RuntimeError) when a CUDA call or launch failed; clears a sticky
// launch error first so it is not reported twice.
inline void check_cuda(cudaError_t e, const char* family, const char* what) {
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    throw std::runtime_error(std::string("peftcore ") + family + " CUDA: " + what + ": " + cudaGetErrorString(e));
  }
}

}  // namespace peftcore::cuda_common
