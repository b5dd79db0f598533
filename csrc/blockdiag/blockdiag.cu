// blockdiag CUDA launchers (blockdiag_launch.h): shared-memory opt-in and dtype dispatch for the plan of
// blockdiag_plan.h. No torch headers here; the kernel is described in blockdiag_kernels.cuh.
#include "blockdiag/blockdiag_kernels.cuh"
#include "blockdiag/blockdiag_launch.h"

#include <stdexcept>
#include <string>

namespace peftcore::blockdiag::cuda {
namespace {

namespace K = kernels;

void check_cuda(cudaError_t e, const char* what) { cuda_common::check_cuda(e, "blockdiag", what); }

template <typename T>
void launch(const void* x, const void* w1, const void* w2, void* y, const K::MonarchParams& P, int64_t smem,
            cudaStream_t stream) {
  if (P.tile < 1 || smem < P.tile * (P.in + P.mid) * static_cast<int64_t>(sizeof(float)))
    throw std::runtime_error("peftcore monarch_matmul CUDA: invalid fused-kernel plan");
  if (smem > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(K::monarch_forward_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)),
               "shared memory opt-in");
  const int64_t ctas = (P.tokens + P.tile - 1) / P.tile;
  if (ctas > 0x7fffffff) throw std::runtime_error("peftcore monarch_matmul CUDA: too many tokens");
  K::monarch_forward_kernel<T><<<static_cast<unsigned>(ctas), K::kThreads, static_cast<size_t>(smem), stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(w1), static_cast<const T*>(w2), static_cast<T*>(y), P);
  check_cuda(cudaGetLastError(), "monarch_forward launch");
}

}  // namespace

int64_t smem_optin(int device) {
  int optin = 0;
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), "smem attribute");
  return optin;
}

void monarch_forward(DType dtype, const void* x, const void* w1, const void* w2, void* y, int64_t tokens, int64_t k,
                     int64_t q, int64_t p, int64_t l, int64_t s, int64_t r, int tile, int64_t smem,
                     cudaStream_t stream) {
  if (tokens <= 0) return;
  const K::MonarchParams P{tokens, k, q, p, l, s, r, k * p, k * q, l * s, tile};
  switch (dtype) {
    case DType::kFloat32: return launch<float>(x, w1, w2, y, P, smem, stream);
    case DType::kFloat16: return launch<__half>(x, w1, w2, y, P, smem, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(x, w1, w2, y, P, smem, stream);
  }
  throw std::runtime_error("peftcore monarch_matmul CUDA: unsupported dtype");
}

}  // namespace peftcore::blockdiag::cuda
