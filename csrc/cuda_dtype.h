// The storage dtypes the CUDA kernels take, shared by every family's launcher API (<family>_launch.h), its .cu
// (cuda_common.cuh: dispatch_dtype) and its torch glue (cuda_glue.h: kernel_dtype). Plain C++: no torch, no CUDA.
#pragma once

namespace peftcore {

enum class CudaDType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace peftcore
