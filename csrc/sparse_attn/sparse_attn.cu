// sparse_attn CUDA launchers (sparse_attn_launch.h): the dtype dispatch. No torch headers, no kernels here: the
// kernels are described in sparse_attn_kernels.cuh and instantiated per dtype in sparse_attn_{f32,f16,bf16}.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_common.cuh"
#include "sparse_attn/sparse_attn_launch.h"

namespace peftcore::sparse_attn::cuda {

template <typename T>
void forward_t(const Params& p, cudaStream_t stream);
template <typename T>
void backward_t(const Params& p, bool want_dq, bool want_dkdv, cudaStream_t stream);
template <typename T>
void block_pool_t(const Params& p, cudaStream_t stream);

namespace {

using cuda_common::dispatch_dtype;

}  // namespace

#define SA_TYPE(tag) std::remove_pointer_t<decltype(tag)>

bool supported_head_dim(int64_t D) { return D == 64 || D == 128 || D == 256; }

int64_t smem_optin(int device) {
  static std::mutex mu;
  static std::vector<int64_t> cache;  // per device; -1 = not queried yet
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0) throw std::runtime_error("peftcore sparse_attn CUDA: bad device index " + std::to_string(device));
  if (cache.size() <= static_cast<size_t>(device)) cache.resize(device + 1, -1);
  if (cache[device] < 0) {
    int v = 0;
    const cudaError_t e = cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    if (e != cudaSuccess)
      throw std::runtime_error(std::string("peftcore sparse_attn CUDA: cannot read the opt-in shared memory of device ") +
                               std::to_string(device) + ": " + cudaGetErrorString(e));
    cache[device] = v;
  }
  return cache[device];
}

int compute_major(int device) {
  static std::mutex mu;
  static std::vector<int> cache;  // per device; -1 = not queried yet
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0) throw std::runtime_error("peftcore sparse_attn CUDA: bad device index " + std::to_string(device));
  if (cache.size() <= static_cast<size_t>(device)) cache.resize(device + 1, -1);
  if (cache[device] < 0) {
    int v = 0;
    const cudaError_t e = cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMajor, device);
    if (e != cudaSuccess)
      throw std::runtime_error(std::string("peftcore sparse_attn CUDA: cannot read the compute capability of device ") +
                               std::to_string(device) + ": " + cudaGetErrorString(e));
    cache[device] = v;
  }
  return cache[device];
}

void forward(DType dtype, const Params& p, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) { forward_t<SA_TYPE(tag)>(p, stream); });
}

void backward(DType dtype, const Params& p, bool want_dq, bool want_dkdv, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) { backward_t<SA_TYPE(tag)>(p, want_dq, want_dkdv, stream); });
}

void block_pool(DType dtype, const Params& p, cudaStream_t stream) {
  dispatch_dtype(dtype, [&](auto tag) { block_pool_t<SA_TYPE(tag)>(p, stream); });
}

}  // namespace peftcore::sparse_attn::cuda
