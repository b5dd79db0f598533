// sparse_delta CUDA launchers (sparse_delta_launch.h): tile-size choice, shared-memory budget and grid shape.
// No torch headers here; the kernels and their tiling are described in sparse_delta_kernels.cuh.
#include "sparse_delta/sparse_delta_launch.h"
#include "cuda_common.cuh"
#include "sparse_delta/sparse_delta_kernels.cuh"

#include <algorithm>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace peftcore::sparse_delta::cuda {
namespace {

namespace K = kernels;

void check_cuda(cudaError_t e, const char* what) { cuda_common::check_cuda(e, "sparse_delta", what); }

struct DevInfo {
  int sms = 0;
  int64_t smem_optin = 0;  // largest dynamic shared memory one block may opt into
  int64_t smem_pref = 0;   // a budget that still lets two blocks share an SM
};

constexpr int kMaxDevices = 64;

const DevInfo& device_info() {
  static DevInfo infos[kMaxDevices];
  static std::once_flag flags[kMaxDevices];
  int dev = 0;
  check_cuda(cudaGetDevice(&dev), "cudaGetDevice");
  if (dev < 0 || dev >= kMaxDevices) throw std::runtime_error("peftcore sparse_delta CUDA: device index out of range");
  std::call_once(flags[dev], [dev] {
    int sms = 0, optin = 0, per_sm = 0;
    check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev), "cudaDeviceGetAttribute");
    check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
               "cudaDeviceGetAttribute");
    check_cuda(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev),
               "cudaDeviceGetAttribute");
    DevInfo d;
    d.sms = std::max(sms, 1);
    d.smem_optin = optin;
    d.smem_pref = std::min<int64_t>(optin, std::max<int64_t>(48 * 1024, per_sm / 2 - 2048));
    infos[dev] = d;
  });
  return infos[dev];
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }
// Token tiles are 1, 4, 8 or 16 tokens (each is a kernel instance; 2 was dropped to keep the build short).
int pow2_tokens(int64_t tokens) {  // smallest tile >= tokens (16 when more)
  return tokens <= 1 ? 1 : tokens <= 4 ? 4 : tokens <= 8 ? 8 : 16;
}
int smaller_tt(int tt) { return tt == 4 ? 1 : tt / 2; }

using cuda_common::dispatch_dtype;

template <typename F>
void dispatch_tt(int tt, F&& f) {
  switch (tt) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    default: throw std::runtime_error("peftcore sparse_delta CUDA: bad token tile");
  }
}

// Generic-lambda helpers: the pointer tag carries the type.
#define PD_TYPE(tag) std::remove_pointer_t<decltype(tag)>

K::Csr make_csr(const DeltaParams& p) {
  return K::Csr{p.indices, p.index64, p.row_ptr, p.values, p.out_features, p.in_features, p.scale};
}

template <typename Kernel>
void set_smem(Kernel kernel, int64_t bytes) {
  if (bytes > 48 * 1024)
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)),
               "cudaFuncSetAttribute");
}

// Largest token tile (<= pow2_tokens(tokens)) whose shared memory fits `budget`, or 0.
template <typename Bytes>
int pick_tt(int64_t tokens, int64_t budget, Bytes bytes_for) {
  for (int tt = pow2_tokens(tokens); tt >= 1; tt = smaller_tt(tt))
    if (bytes_for(tt) <= budget) return tt;
  return 0;
}

}  // namespace

// ------------------------------------------------------------------------------------------------------------
void spmm_accumulate(const DeltaParams& p, const void* x, void* y, int64_t tokens, cudaStream_t stream) {
  if (tokens <= 0 || p.nnz <= 0 || p.out_features <= 0 || p.in_features <= 0) return;
  const DevInfo& dev = device_info();
  dispatch_dtype(p.dtype, [&](auto ttag) {
    using T = PD_TYPE(ttag);
    const int64_t in = p.in_features, out = p.out_features;
    auto bytes_for = [&](int tt) { return align16(in * tt * int64_t(sizeof(T))) + int64_t(tt) * K::kRowChunk * 4; };
    int tt = pick_tt(tokens, dev.smem_pref, bytes_for);
    if (tt == 0) tt = pick_tt(tokens, dev.smem_optin, bytes_for);
    const bool staged = tt != 0;
    if (!staged) tt = 1;
    const int64_t smem = staged ? bytes_for(tt) : int64_t(K::kRowChunk) * 4;
    // Row chunks: enough blocks for ~2 waves, each block still owning >= 32 rows.
    const int64_t tiles = cdiv(tokens, tt);
    int64_t chunks = std::clamp<int64_t>(cdiv(2 * dev.sms, tiles), 1, cdiv(out, 32));
    int64_t rows_per_block = std::max(cdiv(out, chunks), cdiv(out, 65535));
    chunks = cdiv(out, rows_per_block);
    if (tiles > 0x7fffffff) throw std::runtime_error("peftcore sparse_delta_spmm CUDA: too many tokens");
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(chunks));
    const auto s = make_csr(p);
    if (!staged) {
      auto kernel = K::spmm_kernel<T, 1, false>;
      set_smem(kernel, smem);
      kernel<<<grid, K::kThreads, smem, stream>>>(s, static_cast<const T*>(x), static_cast<T*>(y), tokens,
                                                  rows_per_block);
    } else {
      dispatch_tt(tt, [&](auto tt_c) {
        auto kernel = K::spmm_kernel<T, decltype(tt_c)::value, true>;
        set_smem(kernel, smem);
        kernel<<<grid, K::kThreads, smem, stream>>>(s, static_cast<const T*>(x), static_cast<T*>(y), tokens,
                                                    rows_per_block);
      });
    }
    check_cuda(cudaGetLastError(), "spmm_kernel launch");
  });
}

// ------------------------------------------------------------------------------------------------------------
void spmm_t_accumulate(const DeltaParams& p, const void* g, void* gx, int64_t tokens, cudaStream_t stream) {
  if (tokens <= 0 || p.nnz <= 0 || p.out_features <= 0 || p.in_features <= 0) return;
  const DevInfo& dev = device_info();
  dispatch_dtype(p.dtype, [&](auto ttag) {
    using T = PD_TYPE(ttag);
    const int64_t in = p.in_features;
    // Shared memory: acc [cw][TT|1] fp32 + gs [TT][kRowChunk] fp32. Column chunks of at least 256 (or in).
    auto gs_bytes = [](int tt) { return int64_t(tt) * K::kRowChunk * 4; };
    auto cw_fit = [&](int tt, int64_t budget) { return (budget - gs_bytes(tt) - 16) / (int64_t(tt | 1) * 4); };
    const int64_t min_cw = std::min<int64_t>(in, 256);
    int tt = pow2_tokens(tokens);
    int64_t budget = dev.smem_pref;
    while (tt > 1 && cw_fit(tt, budget) < min_cw) tt = smaller_tt(tt);
    if (cw_fit(tt, budget) < min_cw) budget = dev.smem_optin;
    const int64_t fit = std::max<int64_t>(cw_fit(tt, budget) / 4 * 4, 4);
    const int64_t tiles = cdiv(tokens, tt);
    const int64_t chunks_fit = cdiv(in, fit);
    const int64_t chunks_par = std::min(cdiv(2 * dev.sms, tiles), cdiv(in, 256));
    int64_t chunks = std::max<int64_t>({chunks_fit, chunks_par, 1});
    int64_t cw = cdiv(cdiv(in, chunks), 4) * 4;
    chunks = cdiv(in, cw);
    if (tiles > 0x7fffffff || chunks > 65535)
      throw std::runtime_error("peftcore sparse_delta_spmm_t CUDA: problem too large for the grid");
    const int64_t smem = cw * (tt | 1) * 4 + gs_bytes(tt);
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(chunks));
    const auto s = make_csr(p);
    dispatch_tt(tt, [&](auto tt_c) {
      auto kernel = K::spmm_t_kernel<T, decltype(tt_c)::value>;
      set_smem(kernel, smem);
      kernel<<<grid, K::kThreads, smem, stream>>>(s, static_cast<const T*>(g), static_cast<T*>(gx), tokens, cw);
    });
    check_cuda(cudaGetLastError(), "spmm_t_kernel launch");
  });
}

// ------------------------------------------------------------------------------------------------------------
void sddmm(const DeltaParams& p, const void* g, const void* x, float* out, int64_t tokens, cudaStream_t stream) {
  if (tokens <= 0 || p.nnz <= 0 || p.out_features <= 0 || p.in_features <= 0) return;
  const DevInfo& dev = device_info();
  dispatch_dtype(p.dtype, [&](auto ttag) {
    using T = PD_TYPE(ttag);
    const int64_t in = p.in_features, nout = p.out_features;
    // Shared memory: xs [in][TT] T + gs [TT][R] fp32. More rows per block = fewer re-stagings of x.
    int64_t R = std::min<int64_t>(nout, 512);
    auto bytes_for = [&](int tt) { return align16(in * tt * int64_t(sizeof(T))) + int64_t(tt) * R * 4; };
    int tt = pick_tt(tokens, dev.smem_pref, bytes_for);
    if (tt == 0) tt = pick_tt(tokens, dev.smem_optin, bytes_for);
    if (tt == 0) {
      R = std::min<int64_t>(nout, 32);
      tt = pick_tt(tokens, dev.smem_optin, bytes_for);
    }
    const bool staged = tt != 0;
    if (!staged) {
      tt = 1;
      R = std::min<int64_t>(nout, 512);
    }
    const int64_t smem = staged ? bytes_for(tt) : R * 4;
    const int64_t row_chunks = cdiv(nout, R);
    const int64_t tiles = cdiv(tokens, tt);
    // Token splits (float atomics on out) give small-row-count problems more blocks; deterministic mode keeps one
    // block per row chunk, whose per-nonzero sums then run in a fixed order.
    int64_t splits = p.deterministic
                         ? 1
                         : std::clamp<int64_t>(cdiv(2 * dev.sms, row_chunks), 1, std::min<int64_t>(tiles, 65535));
    const int64_t tiles_per_split = cdiv(tiles, splits);
    splits = cdiv(tiles, tiles_per_split);
    if (row_chunks > 0x7fffffff) throw std::runtime_error("peftcore sparse_delta_sddmm CUDA: too many rows");
    const bool atomic = splits > 1;
    const dim3 grid(static_cast<unsigned>(row_chunks), static_cast<unsigned>(splits));
    const auto s = make_csr(p);
    if (!staged) {
      auto kernel = K::sddmm_kernel<T, 1, false>;
      set_smem(kernel, smem);
      kernel<<<grid, K::kThreads, smem, stream>>>(s, static_cast<const T*>(g), static_cast<const T*>(x), out,
                                                  tokens, R, tiles_per_split, atomic);
    } else {
      dispatch_tt(tt, [&](auto tt_c) {
        auto kernel = K::sddmm_kernel<T, decltype(tt_c)::value, true>;
        set_smem(kernel, smem);
        kernel<<<grid, K::kThreads, smem, stream>>>(s, static_cast<const T*>(g), static_cast<const T*>(x), out,
                                                    tokens, R, tiles_per_split, atomic);
      });
    }
    check_cuda(cudaGetLastError(), "sddmm_kernel launch");
  });
}

// ------------------------------------------------------------------------------------------------------------
void merge(const DeltaParams& p, void* w, cudaStream_t stream) {
  if (p.nnz <= 0 || p.out_features <= 0 || p.in_features <= 0) return;
  const int64_t blocks = cdiv(p.nnz, K::kThreads);
  if (blocks > 0x7fffffff) throw std::runtime_error("peftcore sparse_delta_merge CUDA: too many nonzeros");
  dispatch_dtype(p.dtype, [&](auto ttag) {
    using T = PD_TYPE(ttag);
    K::merge_kernel<T><<<unsigned(blocks), K::kThreads, 0, stream>>>(make_csr(p), p.nnz, static_cast<T*>(w));
    check_cuda(cudaGetLastError(), "merge_kernel launch");
  });
}

// ------------------------------------------------------------------------------------------------------------
void mask_abs_excluded(const float* tile, int64_t n, int64_t flat0, const int64_t* exclude, int64_t n_exclude,
                       float* out, cudaStream_t stream) {
  if (n <= 0) return;
  const int64_t blocks = cdiv(n, K::kThreads);
  if (blocks > 0x7fffffff) throw std::runtime_error("peftcore sparse_delta_topk_grad CUDA: tile too large");
  K::abs_kernel<<<unsigned(blocks), K::kThreads, 0, stream>>>(tile, n, out);
  check_cuda(cudaGetLastError(), "abs_kernel launch");
  if (n_exclude > 0 && exclude != nullptr) {
    const int64_t eblocks = cdiv(n_exclude, K::kThreads);
    if (eblocks > 0x7fffffff) throw std::runtime_error("peftcore sparse_delta_topk_grad CUDA: exclude too large");
    K::exclude_kernel<<<unsigned(eblocks), K::kThreads, 0, stream>>>(exclude, n_exclude, flat0, n, out);
    check_cuda(cudaGetLastError(), "exclude_kernel launch");
  }
}

}  // namespace peftcore::sparse_delta::cuda
