// sparse_delta CUDA launchers (sparse_delta_launch.h): the tile plan (sparse_delta_plan.h) from the device's opt-in
// shared memory and SM count, then the launch. No torch headers here; the kernels are described in
// sparse_delta_kernels.cuh.
#include "sparse_delta/sparse_delta_launch.h"
#include "cuda_common.cuh"
#include "sparse_delta/sparse_delta_kernels.cuh"
#include "sparse_delta/sparse_delta_plan.h"

#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace peftcore::sparse_delta::cuda {
namespace {

namespace K = kernels;
namespace SD = ::peftcore::sparse_delta::plan;

void check_cuda(cudaError_t e, const char* what) { cuda_common::check_cuda(e, "sparse_delta", what); }

struct DevInfo {
  int sms = 0;
  int64_t smem_optin = 0;  // largest dynamic shared memory one block may opt into
};

constexpr int kMaxDevices = 64;

const DevInfo& device_info() {
  static DevInfo infos[kMaxDevices];
  static std::once_flag flags[kMaxDevices];
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev < 0 || dev >= kMaxDevices) throw std::runtime_error("peftcore sparse_delta CUDA: device index out of range");
  std::call_once(flags[dev], [dev] {
    int sms = 0, optin = 0;
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
               "cudaDeviceGetAttribute");
    DevInfo d;
    d.sms = std::max(sms, 1);
    d.smem_optin = optin;
    infos[dev] = d;
  });
  return infos[dev];
}

using cuda_common::dispatch_dtype;

template <typename F>
void dispatch_tt(int tt, F&& f) {
  switch (tt) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    default: throw std::runtime_error("peftcore sparse_delta CUDA: bad token tile");
  }
}

// Generic-lambda helpers: the pointer tag carries the type.
#define PD_TYPE(tag) std::remove_pointer_t<decltype(tag)>

K::Csr make_csr(const DeltaParams& p) {
  return K::Csr{p.indices, p.index64, p.row_ptr, p.values, p.nnz, p.out_features, p.in_features, p.scale};
}

template <typename Kernel>
void set_smem(Kernel kernel, int64_t bytes) {
  if (bytes > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
               "cudaFuncSetAttribute");
}

SD::Plan make_plan(int kernel, const DeltaParams& p, int64_t tokens, int64_t elem, const DevInfo& dev) {
  const auto pl = SD::plan(kernel, tokens, p.out_features, p.in_features, p.nnz, elem, dev.smem_optin, dev.sms,
                           p.deterministic);
  if (pl.tt == 0)
    throw std::runtime_error(std::string("peftcore sparse_delta CUDA: no tile plan fits (tokens ") +
                             std::to_string(tokens) + ", rows " + std::to_string(p.out_features) + ", cols " +
                             std::to_string(p.in_features) + ", shared memory " + std::to_string(dev.smem_optin) + ")");
  return pl;
}

}  // namespace

// ------------------------------------------------------------------------------------------------------------
void spmm_accumulate(const DeltaParams& p, const void* x, void* y, int64_t tokens, cudaStream_t stream) {
  if (tokens <= 0 || p.nnz <= 0 || p.out_features <= 0 || p.in_features <= 0) return;
  const DevInfo& dev = device_info();
  dispatch_dtype(p.dtype, [&](auto ttag) {
    using T = PD_TYPE(ttag);
    const auto pl = make_plan(SD::kSpmm, p, tokens, sizeof(T), dev);
    const dim3 grid(static_cast<unsigned>(pl.grid_x), static_cast<unsigned>(pl.grid_y));
    const auto s = make_csr(p);
    dispatch_tt(pl.tt, [&](auto tt_c) {
      auto kernel = K::spmm_kernel<T, decltype(tt_c)::value>;
      set_smem(kernel, pl.smem);
      kernel<<<grid, K::kThreads, pl.smem, stream>>>(s, static_cast<const T*>(x), static_cast<T*>(y), tokens,
                                                     int(pl.rows), int(pl.cols));
    });
    check_cuda(cudaGetLastError(), "spmm_kernel launch");
  });
}

// ------------------------------------------------------------------------------------------------------------
void sddmm(const DeltaParams& p, const void* g, const void* x, float* out, int64_t tokens, cudaStream_t stream) {
  if (tokens <= 0 || p.nnz <= 0 || p.out_features <= 0 || p.in_features <= 0) return;
  const DevInfo& dev = device_info();
  dispatch_dtype(p.dtype, [&](auto ttag) {
    using T = PD_TYPE(ttag);
    const auto pl = make_plan(SD::kSddmm, p, tokens, sizeof(T), dev);
    const int64_t tiles = SD::cdiv(tokens, pl.tt);
    const int64_t tiles_per_split = SD::cdiv(tiles, pl.splits);
    const dim3 grid(static_cast<unsigned>(pl.grid_x), static_cast<unsigned>(pl.grid_y));
    const auto s = make_csr(p);
    dispatch_tt(pl.tt, [&](auto tt_c) {
      auto kernel = K::sddmm_kernel<T, decltype(tt_c)::value>;
      set_smem(kernel, pl.smem);
      kernel<<<grid, K::kThreads, pl.smem, stream>>>(s, static_cast<const T*>(g), static_cast<const T*>(x), out,
                                                     tokens, int(pl.rows), int(pl.cols), tiles_per_split,
                                                     pl.splits > 1);
    });
    check_cuda(cudaGetLastError(), "sddmm_kernel launch");
  });
}

// ------------------------------------------------------------------------------------------------------------
void merge(const DeltaParams& p, void* w, cudaStream_t stream) {
  if (p.nnz <= 0 || p.out_features <= 0 || p.in_features <= 0) return;
  const int64_t blocks = SD::cdiv(SD::cdiv(p.nnz, 4), K::kThreads);
  if (blocks > 0x7fffffff) throw std::runtime_error("peftcore sparse_delta_merge CUDA: too many nonzeros");
  const int64_t numel = p.out_features * p.in_features;
  const bool vec = reinterpret_cast<uintptr_t>(p.indices) % 16 == 0 && reinterpret_cast<uintptr_t>(p.values) % 16 == 0;
  dispatch_dtype(p.dtype, [&](auto ttag) {
    using T = PD_TYPE(ttag);
    auto run = [&](auto itag) {
      using I = PD_TYPE(itag);
      const auto* idx = static_cast<const I*>(p.indices);
      auto kernel = vec ? K::merge_kernel<T, I, true> : K::merge_kernel<T, I, false>;
      kernel<<<unsigned(blocks), K::kThreads, 0, stream>>>(idx, p.values, p.nnz, numel, p.scale, static_cast<T*>(w));
    };
    if (p.index64) run(static_cast<int64_t*>(nullptr));
    else run(static_cast<int32_t*>(nullptr));
    check_cuda(cudaGetLastError(), "merge_kernel launch");
  });
}

// ------------------------------------------------------------------------------------------------------------
void gather_values(const int64_t* perm, const void* values, DType vdtype, int64_t nnz, float* vt, cudaStream_t stream) {
  if (nnz <= 0) return;
  const int64_t blocks = SD::cdiv(nnz, K::kThreads);
  if (blocks > 0x7fffffff) throw std::runtime_error("peftcore sparse_delta CUDA: too many nonzeros");
  dispatch_dtype(vdtype, [&](auto vtag) {
    using V = PD_TYPE(vtag);
    K::gather_kernel<V><<<unsigned(blocks), K::kThreads, 0, stream>>>(perm, static_cast<const V*>(values), nnz, vt);
    check_cuda(cudaGetLastError(), "gather_kernel launch");
  });
}

// ------------------------------------------------------------------------------------------------------------
void mask_abs_excluded(const float* tile, int64_t n, int64_t flat0, const int64_t* exclude, int64_t n_exclude,
                       float* out, cudaStream_t stream) {
  if (n <= 0) return;
  const int64_t blocks = SD::cdiv(n, K::kThreads);
  if (blocks > 0x7fffffff) throw std::runtime_error("peftcore sparse_delta_topk_grad CUDA: tile too large");
  K::abs_kernel<<<unsigned(blocks), K::kThreads, 0, stream>>>(tile, n, out);
  check_cuda(cudaGetLastError(), "abs_kernel launch");
  if (n_exclude > 0 && exclude != nullptr) {
    const int64_t eblocks = SD::cdiv(n_exclude, K::kThreads);
    if (eblocks > 0x7fffffff) throw std::runtime_error("peftcore sparse_delta_topk_grad CUDA: exclude too large");
    K::exclude_kernel<<<unsigned(eblocks), K::kThreads, 0, stream>>>(exclude, n_exclude, flat0, n, out);
    check_cuda(cudaGetLastError(), "exclude_kernel launch");
  }
}

}  // namespace peftcore::sparse_delta::cuda
