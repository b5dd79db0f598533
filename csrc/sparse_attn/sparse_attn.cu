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

namespace {

// cudaDeviceGetAttribute(attr) of `device`, queried once per device and cached; `what` names it in errors.
int cached_attribute(int device, cudaDeviceAttr attr, const char* what) {
  static std::mutex mu;
  static std::vector<std::vector<int>> cache;  // [attribute slot][device]; -1 = not queried yet
  static std::vector<cudaDeviceAttr> slots;
  std::lock_guard<std::mutex> lock(mu);
  if (device < 0) throw std::runtime_error("peftcore sparse_attn CUDA: bad device index " + std::to_string(device));
  size_t slot = 0;
  while (slot < slots.size() && slots[slot] != attr) ++slot;
  if (slot == slots.size()) {
    slots.push_back(attr);
    cache.emplace_back();
  }
  auto& values = cache[slot];
  if (values.size() <= static_cast<size_t>(device)) values.resize(device + 1, -1);
  if (values[device] < 0) {
    int v = 0;
    const cudaError_t e = cudaDeviceGetAttribute(&v, attr, device);
    if (e != cudaSuccess)
      throw std::runtime_error(std::string("peftcore sparse_attn CUDA: cannot read the ") + what + " of device " +
                               std::to_string(device) + ": " + cudaGetErrorString(e));
    values[device] = v;
  }
  return values[device];
}

}  // namespace

int64_t smem_optin(int device) {
  return cached_attribute(device, cudaDevAttrMaxSharedMemoryPerBlockOptin, "opt-in shared memory");
}

int compute_major(int device) {
  return cached_attribute(device, cudaDevAttrComputeCapabilityMajor, "compute capability");
}

int sm_count(int device) { return cached_attribute(device, cudaDevAttrMultiProcessorCount, "SM count"); }

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
