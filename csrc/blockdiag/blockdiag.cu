// blockdiag CUDA launchers (blockdiag_launch.h): tile size, shared-memory opt-in and dtype dispatch. No torch
// headers here; the kernel is described in blockdiag_kernels.cuh.
#include "blockdiag/blockdiag_kernels.cuh"
#include "blockdiag/blockdiag_launch.h"

#include <algorithm>
#include <stdexcept>
#include <string>

namespace peftcore::blockdiag::cuda {
namespace {

namespace K = kernels;

void check_cuda(cudaError_t e, const char* what) { cuda_common::check_cuda(e, "blockdiag", what); }

template <typename T>
bool launch(const void* x, const void* w1, const void* w2, void* y, const K::MonarchParams& base, cudaStream_t stream) {
  int dev = 0, optin = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "smem attribute");
  const int64_t per_token = (base.in + base.mid) * static_cast<int64_t>(sizeof(float));
  // Up to 16 tokens per CTA, within 48 KB where possible (no opt-in needed, more CTAs per SM).
  int64_t tile = std::min<int64_t>(16, (48 * 1024) / per_token);
  if (tile < 1) tile = std::min<int64_t>(16, optin / per_token);
  if (tile < 1) return false;
  K::MonarchParams P = base;
  P.tile = static_cast<int>(tile);
  const size_t smem = static_cast<size_t>(tile * per_token);
  if (smem > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(K::monarch_forward_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)),
               "shared memory opt-in");
  const int64_t ctas = (P.tokens + tile - 1) / tile;
  if (ctas > 0x7fffffff) throw std::runtime_error("peftcore monarch_matmul CUDA: too many tokens");
  K::monarch_forward_kernel<T><<<static_cast<unsigned>(ctas), K::kThreads, smem, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(w1), static_cast<const T*>(w2), static_cast<T*>(y), P);
  check_cuda(cudaGetLastError(), "monarch_forward launch");
  return true;
}

}  // namespace

bool monarch_forward(DType dtype, const void* x, const void* w1, const void* w2, void* y, int64_t tokens, int64_t k,
                     int64_t q, int64_t p, int64_t l, int64_t s, int64_t r, cudaStream_t stream) {
  if (tokens <= 0) return true;
  const K::MonarchParams P{tokens, k, q, p, l, s, r, k * p, k * q, l * s, 0};
  switch (dtype) {
    case DType::kFloat32: return launch<float>(x, w1, w2, y, P, stream);
    case DType::kFloat16: return launch<__half>(x, w1, w2, y, P, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(x, w1, w2, y, P, stream);
  }
  throw std::runtime_error("peftcore monarch_matmul CUDA: unsupported dtype");
}

}  // namespace peftcore::blockdiag::cuda
