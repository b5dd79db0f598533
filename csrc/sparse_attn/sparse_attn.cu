// sparse_attn CUDA launchers (sparse_attn_launch.h): the dtype dispatch. No torch headers, no kernels here: the
// kernels are described in sparse_attn_kernels.cuh and instantiated per dtype in sparse_attn_{f32,f16,bf16}.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <stdexcept>
#include <type_traits>

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
