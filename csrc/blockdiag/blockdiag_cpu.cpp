// blockdiag CPU kernels: block-diagonal matmul and the fused two-stage Monarch matmul, forward and backward, and
// the argument checks both backends share (blockdiag.h).
//
// Layout and tiling. Activations are flattened to [T, features] row-major and split into tiles of TB tokens
// (at::parallel_for over tiles). Per tile, everything lives in thread-local buffers in the accumulate type
// (fp32 for half types, fp64 for double): the input tile, the Monarch intermediate h [TB, k*q] (kept in the
// permuted layout hp[b, j*r + m] = h[b, m*l + j], so that every stage-2 block reads a contiguous [TB, r] panel
// with row stride l*r) and the output tile. The permutation is folded into the copy that scatters each stage-1
// block's [TB, q] result into hp; the output's t*l + j interleave into the copy that writes each stage-2 block.
// The small GEMMs are one register-blocked micro-kernel (4 rows x 16 columns of accumulators); for float an
// AVX2+FMA version is picked at run time (the extension is built without -march), else a portable loop.
// Large blocks (>= 128x128) take BLAS: per tile in the forward, the batched-GEMM form in the backward (and in
// the Monarch forward too from 384x384 on).
// Weight gradients reduce over tokens: each thread accumulates into its own [k*q*p] / [l*s*r] buffer (K = TB per
// tile), summed once at the end, so no atomics.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <utility>
#include <optional>
#include <vector>

#include "checks.h"
#include "cpu_tiles.h"
#include "dispatch.h"
#include "blockdiag/blockdiag.h"
#include "blockdiag/blockdiag_plan.h"

namespace peftcore::blockdiag {

// ------------------------------------------------------------------------------------------------------------
// Shared helpers (also used by the CUDA glue).

at::Tensor flatten_tokens(const at::Tensor& t) {
  int64_t tokens = 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) tokens *= t.size(i);
  return t.reshape({tokens, t.size(-1)}).contiguous();
}

std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t last) {
  auto s = t.sizes().vec();
  s.back() = last;
  return s;
}

namespace {
void check_weight(const char* op, const char* name, const at::Tensor& w, const at::Tensor& x, const char* x_name) {
  check_dim(op, name, w, 3);
  check_same_dtype(op, name, w, x, x_name);
  check_same_device(op, name, w, x, x_name);
  TORCH_CHECK(w.size(0) > 0 && w.size(1) > 0 && w.size(2) > 0, op, ": ", name, " must have non-empty dims, got shape ",
              w.sizes());
}
}  // namespace

void check_blockdiag_args(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor& blocks,
                          bool out_side) {
  check_float(op, x_name, x);
  TORCH_CHECK(x.dim() >= 1, op, ": ", x_name, " must have at least 1 dim, got a scalar");
  check_weight(op, "blocks", blocks, x, x_name);
  const int64_t nb = blocks.size(0), bo = blocks.size(1), bi = blocks.size(2);
  const int64_t want = out_side ? nb * bo : nb * bi;
  TORCH_CHECK(x.size(-1) == want, op, ": ", x_name, " must have last dim ", want, " (nb*", out_side ? "bo" : "bi",
              " for blocks [nb, bo, bi] = ", blocks.sizes(), "), got shape ", x.sizes());
}

void check_monarch_args(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor& w1,
                        const at::Tensor& w2, bool out_side) {
  check_float(op, x_name, x);
  TORCH_CHECK(x.dim() >= 1, op, ": ", x_name, " must have at least 1 dim, got a scalar");
  check_weight(op, "w1", w1, x, x_name);
  check_weight(op, "w2", w2, x, x_name);
  const int64_t k = w1.size(0), q = w1.size(1), p = w1.size(2);
  const int64_t l = w2.size(0), s = w2.size(1), r = w2.size(2);
  TORCH_CHECK(l * r == k * q, op, ": w2 [l, s, r] must have l*r == k*q; got w1 [k, q, p] = ", w1.sizes(),
              " (k*q = ", k * q, ") and w2 = ", w2.sizes(), " (l*r = ", l * r, ")");
  const int64_t want = out_side ? l * s : k * p;
  TORCH_CHECK(x.size(-1) == want, op, ": ", x_name, " must have last dim ", want,
              out_side ? " (l*s for w2 [l, s, r] = " : " (k*p for w1 [k, q, p] = ", out_side ? w2.sizes() : w1.sizes(),
              "), got shape ", x.sizes());
}

void check_saved_h(const char* op, const at::Tensor& h, const at::Tensor& x, const at::Tensor& w1) {
  check_same_dtype(op, "h", h, x, "x");
  check_same_device(op, "h", h, x, "x");
  const int64_t mid = w1.size(0) * w1.size(1);
  TORCH_CHECK(h.dim() == x.dim() && h.size(-1) == mid &&
                  h.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
              op, ": h must have x's leading dims and last dim l*r = k*q = ", mid, " (x ", x.sizes(), "), got shape ",
              h.sizes());
}

void check_grad_pair(const char* op, const at::Tensor& grad_out, const at::Tensor& x) {
  check_same_dtype(op, "grad_out", grad_out, x, "x");
  check_same_device(op, "grad_out", grad_out, x, "x");
  TORCH_CHECK(grad_out.dim() == x.dim() && grad_out.sizes().slice(0, x.dim() - 1) == x.sizes().slice(0, x.dim() - 1),
              op, ": grad_out and x must have the same leading (token) dims, got ", grad_out.sizes(), " and ",
              x.sizes());
}

// Batched-GEMM forms (backend independent; see blockdiag.h).
at::Tensor bmm_blockdiag_forward(const at::Tensor& x2d, const at::Tensor& blocks) {
  const int64_t T = x2d.size(0), nb = blocks.size(0), bo = blocks.size(1), bi = blocks.size(2);
  auto out = at::bmm(x2d.view({T, nb, bi}).transpose(0, 1), blocks.transpose(1, 2));  // [nb, T, bo]
  return out.transpose(0, 1).reshape({T, nb * bo});
}

std::tuple<at::Tensor, at::Tensor> bmm_blockdiag_backward(const at::Tensor& g2d, const at::Tensor& x2d,
                                                          const at::Tensor& blocks, std::array<bool, 2> mask) {
  const int64_t T = x2d.size(0), nb = blocks.size(0), bo = blocks.size(1), bi = blocks.size(2);
  auto gb = g2d.view({T, nb, bo}).transpose(0, 1);  // [nb, T, bo]
  at::Tensor gx, gw;
  if (mask[0]) gx = at::bmm(gb, blocks).transpose(0, 1).reshape({T, nb * bi});
  if (mask[1]) gw = at::bmm(gb.transpose(1, 2), x2d.view({T, nb, bi}).transpose(0, 1));
  return {gx, gw};
}

namespace {
// ------------------------------------------------------------------------------------------------------------
// The permuting copies of the batched-GEMM forms. ATen's copy_ of these 3-/4-D permutations ran at ~1 GB/s here
// (a quarter of a large-block Monarch training step); on CPU they take a tiled copy instead: 2-D tiles spanning
// the dim where the destination is contiguous and the one where the source is, so each side moves whole cache
// lines, parallel over the other two dims. Elsewhere (CUDA) copy_.
template <typename E>
void tiled_copy4(E* d, const E* s, const int64_t* n, const int64_t* ds, const int64_t* ss) {
  constexpr int64_t kTile = 16;
  const int64_t outer = n[0] * n[1];
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, n[2] * n[3]));
  at::parallel_for(0, outer, grain, [&](int64_t o0, int64_t o1) {
    for (int64_t o = o0; o < o1; ++o) {
      const int64_t a = o / n[1], b = o % n[1];
      E* dp = d + a * ds[0] + b * ds[1];
      const E* sp = s + a * ss[0] + b * ss[1];
      for (int64_t r0 = 0; r0 < n[2]; r0 += kTile) {
        const int64_t r1 = std::min(n[2], r0 + kTile);
        for (int64_t c0 = 0; c0 < n[3]; c0 += kTile) {
          const int64_t c1 = std::min(n[3], c0 + kTile);
          for (int64_t r = r0; r < r1; ++r)
            for (int64_t c = c0; c < c1; ++c) dp[r * ds[2] + c * ds[3]] = sp[r * ss[2] + c * ss[3]];
        }
      }
    }
  });
}

// dst = src for two 4-D views of one shape and dtype (dst not overlapping src).
void permute_copy(const at::Tensor& dst, const at::Tensor& src) {
  TORCH_INTERNAL_ASSERT(dst.dim() == 4 && dst.sizes() == src.sizes() && dst.scalar_type() == src.scalar_type());
  if (!dst.is_cpu() || dst.element_size() > 8 || (dst.element_size() & (dst.element_size() - 1)) != 0) {
    dst.copy_(src);
    return;
  }
  auto innermost = [](const at::Tensor& t, int64_t skip) {  // the dim of smallest stride among non-trivial dims
    int64_t best = -1;
    for (int64_t i = 0; i < 4; ++i)
      if (i != skip && t.size(i) > 1 && (best < 0 || t.stride(i) < t.stride(best))) best = i;
    return best < 0 ? (skip == 3 ? 2 : 3) : best;
  };
  const int64_t c = innermost(dst, -1);  // tile columns: dst contiguous
  int64_t r = innermost(src, -1);        // tile rows: src contiguous (or the next dst dim for a plain copy)
  if (r == c) r = innermost(dst, c);
  std::vector<int64_t> order;
  for (int64_t i = 0; i < 4; ++i)
    if (i != r && i != c) order.push_back(i);
  order.push_back(r);
  order.push_back(c);
  const auto d = dst.permute(order), sr = src.permute(order);
  const int64_t n[4] = {d.size(0), d.size(1), d.size(2), d.size(3)};
  const int64_t ds[4] = {d.stride(0), d.stride(1), d.stride(2), d.stride(3)};
  const int64_t ss[4] = {sr.stride(0), sr.stride(1), sr.stride(2), sr.stride(3)};
  switch (dst.element_size()) {
    case 2: tiled_copy4(static_cast<uint16_t*>(d.data_ptr()), static_cast<const uint16_t*>(sr.const_data_ptr()), n, ds, ss); break;
    case 4: tiled_copy4(static_cast<uint32_t*>(d.data_ptr()), static_cast<const uint32_t*>(sr.const_data_ptr()), n, ds, ss); break;
    case 8: tiled_copy4(static_cast<uint64_t*>(d.data_ptr()), static_cast<const uint64_t*>(sr.const_data_ptr()), n, ds, ss); break;
    default: dst.copy_(src);
  }
}

// h [T, k*q] (stage 1's output) -> hs [T, l*r], hs[b, j*r + m] = h[b, m*l + j].
at::Tensor to_stage2_layout(const at::Tensor& h, int64_t l, int64_t r) {
  return h.view({h.size(0), r, l}).transpose(1, 2).reshape({h.size(0), l * r});
}
// Stage 1 as one batched GEMM: o1 [k, T, q] = x_i @ w1[i]^T per block.
at::Tensor stage1_bmm(const at::Tensor& x2d, const at::Tensor& w1) {
  const int64_t T = x2d.size(0), k = w1.size(0), p = w1.size(2);
  return at::bmm(x2d.view({T, k, p}).transpose(0, 1), w1.transpose(1, 2));
}

// o1 [k, T, q] -> hs [T, l*r] in the stage-2 layout. Feature n = i*q + a sits at hs[b, (n % l)*r + n / l]; when
// l divides q, a = a1*l + j gives hs[b, j*r + i*(q/l) + a1] = o1[i, b, a1*l + j]: one strided copy.
at::Tensor stage1_to_stage2_layout(const at::Tensor& o1, int64_t l, int64_t r) {
  const int64_t k = o1.size(0), T = o1.size(1), q = o1.size(2);
  if (q % l != 0) return to_stage2_layout(o1.transpose(0, 1).reshape({T, k * q}), l, r);
  auto hs = at::empty({T, l * r}, o1.options());
  permute_copy(hs.view({T, l, k, q / l}), o1.view({k, T, q / l, l}).permute({1, 3, 0, 2}));
  return hs;
}

// The inverse map for gradients: gz [l, T, r] (gz[j, b, m] = grad of feature m*l + j) -> [k, T, q] (stage 1's
// GEMM layout), one strided copy when l divides q.
at::Tensor stage2_grad_to_stage1(const at::Tensor& gz, int64_t k, int64_t q) {
  const int64_t l = gz.size(0), T = gz.size(1);
  if (q % l != 0) return gz.permute({1, 2, 0}).reshape({T, k, q}).transpose(0, 1);
  auto o = at::empty({k, T, q}, gz.options());
  permute_copy(o.view({k, T, q / l, l}), gz.view({l, T, k, q / l}).permute({2, 1, 3, 0}));
  return o;
}

// hs [T, l*r] (stage-2 layout) -> the stage-2 operand z [l, T, r], z[j, b, m] = hs[b, j*r + m] (unit inner stride).
at::Tensor stage2_operand(const at::Tensor& hs, int64_t l, int64_t r) {
  return hs.view({hs.size(0), l, r}).transpose(0, 1);
}
}  // namespace

at::Tensor bmm_monarch_stage2(const at::Tensor& hs, const at::Tensor& w2) {
  const int64_t T = hs.size(0), l = w2.size(0), s = w2.size(1), r = w2.size(2);
  auto out2 = at::bmm(stage2_operand(hs, l, r), w2.transpose(1, 2));  // [l, T, s]
  auto y = at::empty({T, s * l}, hs.options());
  permute_copy(y.view({1, T, s, l}), out2.permute({1, 2, 0}).unsqueeze(0));  // y[b, t*l + j] = out2[j, b, t]
  return y;
}

at::Tensor bmm_monarch_intermediate(const at::Tensor& x2d, const at::Tensor& w1, int64_t l, int64_t r) {
  return stage1_to_stage2_layout(stage1_bmm(x2d, w1), l, r);
}

at::Tensor bmm_monarch_forward(const at::Tensor& x2d, const at::Tensor& w1, const at::Tensor& w2) {
  return bmm_monarch_stage2(bmm_monarch_intermediate(x2d, w1, w2.size(0), w2.size(2)), w2);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bmm_monarch_backward(const at::Tensor& g2d, const at::Tensor& x2d,
                                                                    const at::Tensor& w1, const at::Tensor& w2,
                                                                    std::array<bool, 3> mask, const at::Tensor& h2d) {
  const int64_t T = x2d.size(0), k = w1.size(0), q = w1.size(1), l = w2.size(0), s = w2.size(1), r = w2.size(2);
  // gj[j, b, t] = g[b, t*l + j], made contiguous once for both GEMMs that read it.
  auto gj = at::empty({l, T, s}, g2d.options());
  permute_copy(gj.unsqueeze(0), g2d.view({T, s, l}).permute({2, 0, 1}).unsqueeze(0));
  at::Tensor gx, g1, g2;
  if (mask[2]) {
    auto hs = h2d.defined() ? h2d : bmm_monarch_intermediate(x2d, w1, l, r);
    g2 = at::bmm(gj.transpose(1, 2), stage2_operand(hs, l, r));
  }
  if (mask[0] || mask[1]) {
    auto gk = stage2_grad_to_stage1(at::bmm(gj, w2), k, q);  // [k, T, q]: the gradient of stage 1's output
    const int64_t p = w1.size(2);
    if (mask[0]) {
      gx = at::empty({T, k * p}, x2d.options());
      permute_copy(gx.view({1, T, k, p}), at::bmm(gk, w1).transpose(0, 1).unsqueeze(0));
    }
    if (mask[1]) g1 = at::bmm(gk.transpose(1, 2), x2d.view({T, k, p}).transpose(0, 1));
  }
  return {gx, g1, g2};
}

namespace {

// ------------------------------------------------------------------------------------------------------------
// The tile GEMM and buffers: csrc/cpu_tiles.h.
using namespace peftcore::cpu;

// Blocks of 384x384 and up: the forward too is the batched-GEMM form (the fused forward's per-tile BLAS calls
// measured 1.28x the two-bmm forward at 512x512 blocks, d=2048; 0.73x at 256x256, d=1024).
constexpr int64_t kBmmForwardMinWeights = 384 * 384;
// kLargeBlocksBackward: with blocks this large the backward is batched GEMMs over all tokens (bmm_* above): the
// tiled backward's weight-gradient GEMMs have K = tile tokens and re-read per-thread [k*q*p] accumulators every
// tile (measured 1.3-1.8x slower than the two-bmm backward at 256..512-wide blocks).

// ------------------------------------------------------------------------------------------------------------
// Block-diagonal matmul.

template <typename scalar_t>
at::Tensor blockdiag_forward_impl(const at::Tensor& x2d, const at::Tensor& blocks) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = x2d.size(0), nb = blocks.size(0), bo = blocks.size(1), bi = blocks.size(2);
  const int64_t in = nb * bi, out = nb * bo;
  auto y = at::empty({T, out}, x2d.options());
  if (T == 0) return y;
  at::Tensor bt = as_acc<acc_t>(blocks.transpose(1, 2));  // [nb, bi, bo]: B operand of x_j @ blocks[j]^T
  const acc_t* btp = bt.const_data_ptr<acc_t>();
  const scalar_t* xp = x2d.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const int64_t TB = tile_tokens(std::max(in, out), sizeof(acc_t));
  const int64_t tiles = (T + TB - 1) / TB;
  at::parallel_for(0, tiles, 1, [&](int64_t tb0, int64_t tb1) {
    std::vector<acc_t> xb(TB * in), yb(TB * out);
    for (int64_t tile = tb0; tile < tb1; ++tile) {
      const int64_t t0 = tile * TB, tb = std::min(TB, T - t0);
      load_tile(xp, in, t0, tb, xb.data());
      for (int64_t j = 0; j < nb; ++j)
        gemm(tb, bo, bi, xb.data() + j * bi, in, btp + j * bi * bo, bo, yb.data() + j * bo, out, false);
      store_tile(yb.data(), out, t0, tb, yp);
    }
  });
  return y;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> blockdiag_backward_impl(const at::Tensor& g2d, const at::Tensor& x2d,
                                                           const at::Tensor& blocks, std::array<bool, 2> mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = x2d.size(0), nb = blocks.size(0), bo = blocks.size(1), bi = blocks.size(2);
  const int64_t in = nb * bi, out = nb * bo;
  at::Tensor gx = mask[0] ? at::empty({T, in}, x2d.options()) : at::Tensor();
  at::Tensor bw = as_acc<acc_t>(blocks);  // [nb, bo, bi]: B operand of g_j @ blocks[j]
  const acc_t* bwp = bw.const_data_ptr<acc_t>();
  const scalar_t* xp = x2d.const_data_ptr<scalar_t>();
  const scalar_t* gp = g2d.const_data_ptr<scalar_t>();
  ThreadAccum<acc_t> gw(mask[1] ? nb * bo * bi : 0);
  const int64_t TB = tile_tokens(std::max(in, out), sizeof(acc_t));
  const int64_t tiles = (T + TB - 1) / TB;
  if (T > 0) {
    at::parallel_for(0, tiles, 1, [&](int64_t tb0, int64_t tb1) {
      std::vector<acc_t> xb(mask[1] ? TB * in : 0), gb(TB * out), gxb(mask[0] ? TB * in : 0),
          gt(mask[1] ? bo * TB : 0);
      acc_t* gwp = mask[1] ? gw.mine() : nullptr;
      for (int64_t tile = tb0; tile < tb1; ++tile) {
        const int64_t t0 = tile * TB, tb = std::min(TB, T - t0);
        load_tile(gp, out, t0, tb, gb.data());
        if (mask[1]) load_tile(xp, in, t0, tb, xb.data());
        for (int64_t j = 0; j < nb; ++j) {
          if (mask[0])
            gemm(tb, bi, bo, gb.data() + j * bo, out, bwp + j * bo * bi, bi, gxb.data() + j * bi, in, false);
          if (mask[1]) {
            // grad_blocks[j] [bo, bi] += g_j^T [bo, tb] @ x_j [tb, bi]
            for (int64_t b = 0; b < tb; ++b)
              for (int64_t o = 0; o < bo; ++o) gt[o * tb + b] = gb[b * out + j * bo + o];
            gemm(bo, bi, tb, gt.data(), tb, xb.data() + j * bi, in, gwp + j * bo * bi, bi, true);
          }
        }
        if (mask[0]) store_tile(gxb.data(), in, t0, tb, gx.mutable_data_ptr<scalar_t>());
      }
    });
  }
  at::Tensor gw_t = mask[1] ? gw.reduce(blocks.sizes(), blocks.scalar_type()) : at::Tensor();
  return {gx, gw_t};
}

// ------------------------------------------------------------------------------------------------------------
// Monarch matmul, fused: stage 1 into the tile's hp buffer, stage 2 out of it (see the file comment).

struct MonarchDims {
  int64_t k, q, p, l, s, r, in, mid, out;
  MonarchDims(const at::Tensor& w1, const at::Tensor& w2)
      : k(w1.size(0)), q(w1.size(1)), p(w1.size(2)), l(w2.size(0)), s(w2.size(1)), r(w2.size(2)),
        in(k * p), mid(k * q), out(l * s) {}
  // position in hp of stage-1 feature n = i*q + a: h[n] with n = m*l + j sits at hp[j*r + m].
  int64_t hp_pos(int64_t n) const { return (n % l) * r + n / l; }
};

// hp [tb, mid] (permuted h) of a tile from its input xb [tb, in]; h1 is a [tb, q] scratch.
template <typename acc_t>
void monarch_stage1(const MonarchDims& d, int64_t tb, const acc_t* xb, const acc_t* w1t, acc_t* h1, acc_t* hp,
                    const int64_t* pos) {
  for (int64_t i = 0; i < d.k; ++i) {
    gemm(tb, d.q, d.p, xb + i * d.p, d.in, w1t + i * d.p * d.q, d.q, h1, d.q, false);
    const int64_t* ps = pos + i * d.q;
    for (int64_t b = 0; b < tb; ++b)
      for (int64_t a = 0; a < d.q; ++a) hp[b * d.mid + ps[a]] = h1[b * d.q + a];
  }
}

std::vector<int64_t> hp_positions(const MonarchDims& d) {
  std::vector<int64_t> pos(d.mid);
  for (int64_t n = 0; n < d.mid; ++n) pos[n] = d.hp_pos(n);
  return pos;
}

// With `h` defined ([T, k*q], x's dtype) the tile's intermediate is also written there (monarch_matmul_with_h).
template <typename scalar_t>
at::Tensor monarch_forward_impl(const at::Tensor& x2d, const at::Tensor& w1, const at::Tensor& w2,
                                const at::Tensor& h = at::Tensor()) {
  using acc_t = at::opmath_type<scalar_t>;
  const MonarchDims d(w1, w2);
  const int64_t T = x2d.size(0);
  auto y = at::empty({T, d.out}, x2d.options());
  if (T == 0) return y;
  scalar_t* hout = h.defined() ? h.mutable_data_ptr<scalar_t>() : nullptr;
  at::Tensor w1t = as_acc<acc_t>(w1.transpose(1, 2));  // [k, p, q]
  at::Tensor w2t = as_acc<acc_t>(w2.transpose(1, 2));  // [l, r, s]
  const acc_t* w1p = w1t.const_data_ptr<acc_t>();
  const acc_t* w2p = w2t.const_data_ptr<acc_t>();
  const auto pos = hp_positions(d);
  const scalar_t* xp = x2d.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const int64_t TB = tile_tokens(std::max({d.in, d.mid, d.out}), sizeof(acc_t));
  const int64_t tiles = (T + TB - 1) / TB;
  at::parallel_for(0, tiles, 1, [&](int64_t tb0, int64_t tb1) {
    std::vector<acc_t> xb(TB * d.in), h1(TB * d.q), hp(TB * d.mid), o2(TB * d.s), yb(TB * d.out);
    for (int64_t tile = tb0; tile < tb1; ++tile) {
      const int64_t t0 = tile * TB, tb = std::min(TB, T - t0);
      load_tile(xp, d.in, t0, tb, xb.data());
      monarch_stage1(d, tb, xb.data(), w1p, h1.data(), hp.data(), pos.data());
      if (hout != nullptr) store_tile(hp.data(), d.mid, t0, tb, hout);  // hp is the stage-2 layout
      for (int64_t j = 0; j < d.l; ++j) {
        gemm(tb, d.s, d.r, hp.data() + j * d.r, d.mid, w2p + j * d.r * d.s, d.s, o2.data(), d.s, false);
        for (int64_t b = 0; b < tb; ++b)
          for (int64_t t = 0; t < d.s; ++t) yb[b * d.out + t * d.l + j] = o2[b * d.s + t];
      }
      store_tile(yb.data(), d.out, t0, tb, yp);
    }
  });
  return y;
}

// grad_h (permuted, ghp) = per j: g_j [tb, s] @ w2[j] [s, r]; grad_x = per i: gh_i [tb, q] @ w1[i] [q, p];
// grad_w2[j] += g_j^T @ hp_j; grad_w1[i] += gh_i^T @ x_i. hp is recomputed from x (stage 1) when grad_w2 is asked.
// With `h2d` defined (the saved intermediate [T, k*q]) hp is loaded from it instead of recomputed.
template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> monarch_backward_impl(const at::Tensor& g2d, const at::Tensor& x2d,
                                                                     const at::Tensor& w1, const at::Tensor& w2,
                                                                     std::array<bool, 3> mask,
                                                                     const at::Tensor& h2d) {
  using acc_t = at::opmath_type<scalar_t>;
  const MonarchDims d(w1, w2);
  const int64_t T = x2d.size(0);
  const bool need_gh = mask[0] || mask[1];
  at::Tensor gx = mask[0] ? at::empty({T, d.in}, x2d.options()) : at::Tensor();
  at::Tensor w1a = as_acc<acc_t>(w1);                                              // [k, q, p]
  at::Tensor w2a = as_acc<acc_t>(w2);                                              // [l, s, r]
  const bool recompute = mask[2] && !h2d.defined();
  const scalar_t* hsaved = (mask[2] && h2d.defined()) ? h2d.const_data_ptr<scalar_t>() : nullptr;
  at::Tensor w1t = recompute ? as_acc<acc_t>(w1.transpose(1, 2)) : at::Tensor();  // [k, p, q] for the recompute
  const auto pos = hp_positions(d);
  const acc_t* w1ap = w1a.const_data_ptr<acc_t>();
  const acc_t* w2ap = w2a.const_data_ptr<acc_t>();
  const acc_t* w1tp = recompute ? w1t.const_data_ptr<acc_t>() : nullptr;
  ThreadAccum<acc_t> gw1(mask[1] ? d.k * d.q * d.p : 0), gw2(mask[2] ? d.l * d.s * d.r : 0);
  const scalar_t* xp = x2d.const_data_ptr<scalar_t>();
  const scalar_t* gp = g2d.const_data_ptr<scalar_t>();
  const int64_t TB = tile_tokens(std::max({d.in, d.mid, d.out}), sizeof(acc_t));
  const int64_t tiles = (T + TB - 1) / TB;
  if (T > 0 && (need_gh || mask[2])) {
    at::parallel_for(0, tiles, 1, [&](int64_t tb0, int64_t tb1) {
      const bool need_x = mask[1] || recompute;
      std::vector<acc_t> xb(need_x ? TB * d.in : 0), gb(TB * d.out), gj(TB * d.s), gjt(mask[2] ? d.s * TB : 0),
          h1(recompute ? TB * d.q : 0), hp(mask[2] ? TB * d.mid : 0), ghp(need_gh ? TB * d.mid : 0),
          ghi(need_gh ? TB * d.q : 0), ghit(mask[1] ? d.q * TB : 0), gxb(mask[0] ? TB * d.in : 0);
      acc_t* gw1p = mask[1] ? gw1.mine() : nullptr;
      acc_t* gw2p = mask[2] ? gw2.mine() : nullptr;
      for (int64_t tile = tb0; tile < tb1; ++tile) {
        const int64_t t0 = tile * TB, tb = std::min(TB, T - t0);
        load_tile(gp, d.out, t0, tb, gb.data());
        if (need_x) load_tile(xp, d.in, t0, tb, xb.data());
        if (recompute) {
          monarch_stage1(d, tb, xb.data(), w1tp, h1.data(), hp.data(), pos.data());
        } else if (hsaved != nullptr) {
          load_tile(hsaved, d.mid, t0, tb, hp.data());  // the saved h is hp's (stage-2) layout
        }
        for (int64_t j = 0; j < d.l; ++j) {
          for (int64_t b = 0; b < tb; ++b)
            for (int64_t t = 0; t < d.s; ++t) gj[b * d.s + t] = gb[b * d.out + t * d.l + j];
          if (need_gh)
            gemm(tb, d.r, d.s, gj.data(), d.s, w2ap + j * d.s * d.r, d.r,
                 ghp.data() + j * d.r, d.mid, false);
          if (mask[2]) {
            for (int64_t b = 0; b < tb; ++b)
              for (int64_t t = 0; t < d.s; ++t) gjt[t * tb + b] = gj[b * d.s + t];
            gemm(d.s, d.r, tb, gjt.data(), tb, hp.data() + j * d.r, d.mid, gw2p + j * d.s * d.r, d.r, true);
          }
        }
        if (need_gh) {
          for (int64_t i = 0; i < d.k; ++i) {
            const int64_t* ps = pos.data() + i * d.q;
            for (int64_t b = 0; b < tb; ++b)
              for (int64_t a = 0; a < d.q; ++a) ghi[b * d.q + a] = ghp[b * d.mid + ps[a]];
            if (mask[0])
              gemm(tb, d.p, d.q, ghi.data(), d.q, w1ap + i * d.q * d.p, d.p,
                   gxb.data() + i * d.p, d.in, false);
            if (mask[1]) {
              for (int64_t b = 0; b < tb; ++b)
                for (int64_t a = 0; a < d.q; ++a) ghit[a * tb + b] = ghi[b * d.q + a];
              gemm(d.q, d.p, tb, ghit.data(), tb, xb.data() + i * d.p, d.in, gw1p + i * d.q * d.p, d.p, true);
            }
          }
        }
        if (mask[0]) store_tile(gxb.data(), d.in, t0, tb, gx.mutable_data_ptr<scalar_t>());
      }
    });
  }
  at::Tensor g1 = mask[1] ? gw1.reduce(w1.sizes(), w1.scalar_type()) : at::Tensor();
  at::Tensor g2 = mask[2] ? gw2.reduce(w2.sizes(), w2.scalar_type()) : at::Tensor();
  return {gx, g1, g2};
}

// ------------------------------------------------------------------------------------------------------------
// Ops (CPU).

void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor here, got ", t.device());
}

at::Tensor empty_like_none(const at::Tensor& like) { return at::empty({0}, like.options()); }

at::Tensor blockdiag_matmul_cpu(const at::Tensor& x, const at::Tensor& blocks) {
  constexpr const char* op = "blockdiag_matmul";
  check_cpu(op, "x", x);
  check_blockdiag_args(op, "x", x, blocks, false);
  auto x2d = flatten_tokens(x);
  at::Tensor y;
  PEFTCORE_DISPATCH_FLOATING(x.scalar_type(), op, [&] { y = blockdiag_forward_impl<scalar_t>(x2d, blocks); });
  return y.view(with_last_dim(x, blocks.size(0) * blocks.size(1)));
}

std::tuple<at::Tensor, at::Tensor> blockdiag_matmul_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                                 const at::Tensor& blocks, std::array<bool, 2> mask) {
  constexpr const char* op = "blockdiag_matmul_backward";
  check_cpu(op, "grad_out", grad_out);
  check_blockdiag_args(op, "x", x, blocks, false);
  check_blockdiag_args(op, "grad_out", grad_out, blocks, true);
  check_grad_pair(op, grad_out, x);
  auto g2d = flatten_tokens(grad_out), x2d = flatten_tokens(x);
  at::Tensor gx, gw;
  if (blocks.size(1) * blocks.size(2) >= kBlasMinWeights) {
    std::tie(gx, gw) = bmm_blockdiag_backward(g2d, x2d, blocks, mask);  // see kLargeBlocksBackward
  } else {
    PEFTCORE_DISPATCH_FLOATING(x.scalar_type(), op,
                               [&] { std::tie(gx, gw) = blockdiag_backward_impl<scalar_t>(g2d, x2d, blocks, mask); });
  }
  return {mask[0] ? gx.view(x.sizes()) : empty_like_none(x), mask[1] ? gw : empty_like_none(blocks)};
}

at::Tensor monarch_matmul_cpu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2) {
  constexpr const char* op = "monarch_matmul";
  check_cpu(op, "x", x);
  check_monarch_args(op, "x", x, w1, w2, false);
  auto x2d = flatten_tokens(x);
  at::Tensor y;
  // The batched-GEMM form from 384x384 blocks on, and from BLAS-sized blocks on when wide features leave the fused
  // kernel token tiles under 64 rows (its per-tile BLAS calls then run at M <= 32: measured 1.32x the two-bmm
  // forward at d=4096, 256x256 blocks).
  const int64_t min_weights = std::min(w1.size(1) * w1.size(2), w2.size(1) * w2.size(2));
  const int64_t widest = std::max({w1.size(0) * w1.size(2), w1.size(0) * w1.size(1), w2.size(0) * w2.size(1)});
  const bool small_tiles = tile_tokens(widest, x.element_size() < 8 ? 4 : 8) < 64;
  if (min_weights >= kBmmForwardMinWeights || (min_weights >= kBlasMinWeights && small_tiles)) {
    y = bmm_monarch_forward(x2d, w1, w2);
  } else {
    PEFTCORE_DISPATCH_FLOATING(x.scalar_type(), op, [&] { y = monarch_forward_impl<scalar_t>(x2d, w1, w2); });
  }
  return y.view(with_last_dim(x, w2.size(0) * w2.size(1)));
}

std::tuple<at::Tensor, at::Tensor> monarch_matmul_with_h_cpu(const at::Tensor& x, const at::Tensor& w1,
                                                             const at::Tensor& w2) {
  constexpr const char* op = "monarch_matmul_with_h";
  check_cpu(op, "x", x);
  check_monarch_args(op, "x", x, w1, w2, false);
  auto x2d = flatten_tokens(x);
  at::Tensor y, h;
  // h reaches memory here anyway, so from BLAS-sized blocks on the two batched GEMMs beat the tile loop's many
  // small BLAS calls (measured 256x256 blocks: the per-tile calls took ~1.5x the batched stage GEMMs).
  if (std::min(w1.size(1) * w1.size(2), w2.size(1) * w2.size(2)) >= kBlasMinWeights) {
    h = bmm_monarch_intermediate(x2d, w1, w2.size(0), w2.size(2));
    y = bmm_monarch_stage2(h, w2);
  } else {
    h = at::empty({x2d.size(0), w1.size(0) * w1.size(1)}, x.options());
    PEFTCORE_DISPATCH_FLOATING(x.scalar_type(), op, [&] { y = monarch_forward_impl<scalar_t>(x2d, w1, w2, h); });
  }
  return {y.view(with_last_dim(x, w2.size(0) * w2.size(1))), h.view(with_last_dim(x, w1.size(0) * w1.size(1)))};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> monarch_matmul_backward_cpu(const at::Tensor& grad_out,
                                                                           const at::Tensor& x, const at::Tensor& w1,
                                                                           const at::Tensor& w2,
                                                                           std::array<bool, 3> mask,
                                                                           const std::optional<at::Tensor>& h) {
  constexpr const char* op = "monarch_matmul_backward";
  check_cpu(op, "grad_out", grad_out);
  check_monarch_args(op, "x", x, w1, w2, false);
  check_monarch_args(op, "grad_out", grad_out, w1, w2, true);
  check_grad_pair(op, grad_out, x);
  if (h.has_value()) check_saved_h(op, *h, x, w1);
  auto g2d = flatten_tokens(grad_out), x2d = flatten_tokens(x);
  const at::Tensor h2d = (h.has_value() && mask[2]) ? flatten_tokens(*h) : at::Tensor();
  at::Tensor gx, g1, g2;
  if (std::min(w1.size(1) * w1.size(2), w2.size(1) * w2.size(2)) >= kBlasMinWeights) {
    std::tie(gx, g1, g2) = bmm_monarch_backward(g2d, x2d, w1, w2, mask, h2d);  // see kLargeBlocksBackward
  } else {
    PEFTCORE_DISPATCH_FLOATING(x.scalar_type(), op, [&] {
      std::tie(gx, g1, g2) = monarch_backward_impl<scalar_t>(g2d, x2d, w1, w2, mask, h2d);
    });
  }
  return {mask[0] ? gx.view(x.sizes()) : empty_like_none(x), mask[1] ? g1 : empty_like_none(w1),
          mask[2] ? g2 : empty_like_none(w2)};
}

}  // namespace

// [path (1 fused kernel, 0 batched GEMMs), tokens per CTA, dynamic shared memory bytes]: the CUDA Monarch
// forward's plan (blockdiag_plan.h) for a device with `smem_limit` bytes of opt-in shared memory, reachable
// without a GPU. mode as PEFTCORE_MONARCH_KERNEL: "auto", "fused" or "bmm".
std::vector<int64_t> monarch_forward_plan(int64_t tokens, int64_t k, int64_t q, int64_t p, int64_t l, int64_t s,
                                          int64_t r, int64_t smem_limit, c10::string_view mode) {
  constexpr const char* op = "monarch_forward_plan";
  TORCH_CHECK(tokens >= 0, op, ": tokens must be >= 0, got ", tokens);
  const std::array<std::pair<const char*, int64_t>, 6> dims{
      {{"k", k}, {"q", q}, {"p", p}, {"l", l}, {"s", s}, {"r", r}}};
  for (const auto& [name, v] : dims) TORCH_CHECK(v >= 1, op, ": ", name, " must be >= 1, got ", v);
  TORCH_CHECK(l * r == k * q, op, ": l*r must equal k*q, got l*r = ", l * r, " and k*q = ", k * q);
  TORCH_CHECK(smem_limit >= 0, op, ": smem_limit must be >= 0, got ", smem_limit);
  TORCH_CHECK(mode == "auto" || mode == "fused" || mode == "bmm", op, ": mode must be auto, fused or bmm, got \"",
              mode, "\"");
  const int m = mode == "auto" ? 0 : mode == "fused" ? 1 : 2;
  const auto pl = plan::monarch_forward(tokens, k, q, p, l, s, r, smem_limit, m);
  return {static_cast<int64_t>(pl.path), pl.tile, pl.smem};
}

TORCH_LIBRARY_IMPL(peftcore, CPU, m) {
  m.impl("blockdiag_matmul", &blockdiag_matmul_cpu);
  m.impl("blockdiag_matmul_backward", &blockdiag_matmul_backward_cpu);
  m.impl("monarch_matmul", &monarch_matmul_cpu);
  m.impl("monarch_matmul_with_h", &monarch_matmul_with_h_cpu);
  m.impl("monarch_matmul_backward", &monarch_matmul_backward_cpu);
}

// No tensor arguments: a composite kernel serves every call.
TORCH_LIBRARY_IMPL(peftcore, CompositeImplicitAutograd, m) { m.impl("monarch_forward_plan", &monarch_forward_plan); }

}  // namespace peftcore::blockdiag
