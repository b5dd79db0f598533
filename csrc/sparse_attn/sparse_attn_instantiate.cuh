// sparse_attn launchers per storage dtype T: grids, shared-memory sizes and the head-dim dispatch. Included by one
// short .cu per dtype (sparse_attn_{f32,f16,bf16}.cu, which instantiate them; small compile units that build in
// parallel); sparse_attn.cu picks the dtype.
#pragma once
#include "sparse_attn/sparse_attn_kernels.cuh"
#include "sparse_attn/sparse_attn_launch.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace peftcore::sparse_attn::cuda {

template <typename T>
void forward_t(const Params& p, cudaStream_t stream);
template <typename T>
void backward_t(const Params& p, bool want_dq, bool want_dkdv, cudaStream_t stream);
template <typename T>
void block_pool_t(const Params& p, cudaStream_t stream);

namespace detail {

namespace K = kernels;

inline void check_cuda(cudaError_t e, const char* what) { cuda_common::check_cuda(e, "sparse_attn", what); }

// f(D, TILE) for the compiled (head dim, tile rows) pairs: sparse_attn_tiles.h's tile_candidate list.
template <typename F>
void with_tile(int64_t D, int tile, F&& f) {
  const auto bad = [&] {
    throw std::runtime_error("peftcore sparse_attn CUDA: no kernel for head dim " + std::to_string(D) + " with " +
                             std::to_string(tile) + "-row tiles");
  };
  switch (D) {
    case 64:
      if (tile == 64) f(std::integral_constant<int, 64>{}, std::integral_constant<int, 64>{});
      else if (tile == 32) f(std::integral_constant<int, 64>{}, std::integral_constant<int, 32>{});
      else bad();
      break;
    case 128:
      if (tile == 64) f(std::integral_constant<int, 128>{}, std::integral_constant<int, 64>{});
      else if (tile == 32) f(std::integral_constant<int, 128>{}, std::integral_constant<int, 32>{});
      else if (tile == 16) f(std::integral_constant<int, 128>{}, std::integral_constant<int, 16>{});
      else bad();
      break;
    case 256:
      if (tile == 32) f(std::integral_constant<int, 256>{}, std::integral_constant<int, 32>{});
      else if (tile == 16) f(std::integral_constant<int, 256>{}, std::integral_constant<int, 16>{});
      else bad();
      break;
    default: bad();
  }
}

// x: (mask block, tile within it), y: head, z: batch; L is the tiled axis' length.
inline dim3 grid_for(int64_t blocks, int64_t bs, int64_t L, int tile, int64_t heads, int64_t batch, const char* what) {
  const int64_t x = blocks * K::tiles_per_block(bs, L, tile);
  if (x > 0x7fffffff || heads > 65535 || batch > 65535)
    throw std::runtime_error(std::string("peftcore sparse_attn CUDA: ") + what + ": grid too large");
  return dim3(static_cast<unsigned>(x), static_cast<unsigned>(heads), static_cast<unsigned>(batch));
}

// Raises the kernel's dynamic shared memory limit to what this tile needs (above 48 KB needs the opt-in; the tile
// was planned to fit the device's opt-in maximum), then launches.
template <typename Kern>
void launch(Kern kern, dim3 grid, int smem, const Params& p, cudaStream_t stream, const char* what) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return;
  check_cuda(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem), what);
  kern<<<grid, K::kThreads, smem, stream>>>(p);
  check_cuda(cudaGetLastError(), what);
}

// The kernels divide lengths, block indices and head counts in 32-bit arithmetic (kernels::udiv): refuse lengths
// of 2^31 - 256 or more, and clamp a mask block size larger than both lengths to the longer one (one block per axis
// either way, so the same semantics) so that it fits as well.
inline Params checked(const Params& in) {
  constexpr int64_t kMax = (int64_t{1} << 31) - 257;  // room for a 256-row tile step past the end in 32 bits
  if (in.Lq > kMax || in.Lk > kMax || in.Hq > kMax || in.Hkv < 1)
    throw std::runtime_error("peftcore sparse_attn CUDA: sequence lengths must be below 2^31 - 256, got Lq = " +
                             std::to_string(in.Lq) + ", Lk = " + std::to_string(in.Lk));
  Params p = in;
  const int64_t longest = std::max<int64_t>({p.Lq, p.Lk, 1});
  if (p.bs > longest) p.bs = longest;
  return p;
}

}  // namespace detail

template <typename T>
void forward_t(const Params& p_in, cudaStream_t stream) {
  using namespace detail;
  const Params p = checked(p_in);
  with_tile(p.D, p.tile[tiles::kForward], [&](auto d, auto t) {
    constexpr int D = decltype(d)::value, TILE = decltype(t)::value;
    using C = K::Cfg<D, TILE>;
    launch(K::forward_kernel<T, D, TILE>, grid_for(p.Qb, p.bs, p.Lq, C::BM, p.Hq, p.B, "forward"), C::kFwdSmem, p,
           stream, "forward launch");
  });
}

template <typename T>
void backward_t(const Params& p_in, bool want_dq, bool want_dkdv, cudaStream_t stream) {
  using namespace detail;
  const Params p = checked(p_in);
  const int64_t rows = p.B * p.Hq * p.Lq;
  if (rows > 0) {
    const int64_t blocks = (rows + 7) / 8;
    if (blocks > 0x7fffffff) throw std::runtime_error("peftcore sparse_attn CUDA: delta: grid too large");
    K::delta_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p);
    check_cuda(cudaGetLastError(), "delta launch");
  }
  if (want_dq)
    with_tile(p.D, p.tile[tiles::kDq], [&](auto d, auto t) {
      constexpr int D = decltype(d)::value, TILE = decltype(t)::value;
      using C = K::Cfg<D, TILE>;
      launch(K::backward_dq_kernel<T, D, TILE>, grid_for(p.Qb, p.bs, p.Lq, C::BM, p.Hq, p.B, "dq"), C::kBwdSmem, p,
             stream, "dq launch");
    });
  if (want_dkdv)
    with_tile(p.D, p.tile[tiles::kDkdv], [&](auto d, auto t) {
      constexpr int D = decltype(d)::value, TILE = decltype(t)::value;
      using C = K::Cfg<D, TILE>;
      launch(K::backward_dkdv_kernel<T, D, TILE>, grid_for(p.Kb, p.bs, p.Lk, C::BN, p.Hkv, p.B, "dkdv"), C::kBwdSmem,
             p, stream, "dkdv launch");
    });
}

template <typename T>
void block_pool_t(const Params& p_in, cudaStream_t stream) {
  using namespace detail;
  const Params p = checked(p_in);
  with_tile(p.D, p.tile[tiles::kPool], [&](auto d, auto t) {
    constexpr int D = decltype(d)::value, TILE = decltype(t)::value;
    using C = K::Cfg<D, TILE>;
    launch(K::block_pool_kernel<T, D, TILE>, grid_for(p.Qb, p.bs, p.Lq, C::BM, p.Hq, p.B, "block_pool"),
           C::kPoolSmem, p, stream, "block_pool launch");
  });
}

}  // namespace peftcore::sparse_attn::cuda

#define PEFTCORE_SPARSE_ATTN_INSTANTIATE(T)                                                          \
  namespace peftcore::sparse_attn::cuda {                                                            \
  template void forward_t<T>(const Params&, cudaStream_t);                                           \
  template void backward_t<T>(const Params&, bool, bool, cudaStream_t);                              \
  template void block_pool_t<T>(const Params&, cudaStream_t);                                        \
  }
