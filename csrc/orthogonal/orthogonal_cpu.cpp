// orthogonal CPU kernels (Cayley / Neumann blocks and their backward) and the BOFT chain shared with the CUDA
// glue (orthogonal.h).
//
// Small-matrix kernels: blocks are independent, so ranges of blocks go to threads (at::parallel_for); each
// block is loaded into a per-thread fp32 (fp64 for double) buffer of a few b x b tiles, worked on there and
// written back once. The Cayley solve is Gauss-Jordan with partial pivoting on (I + S) X = (I - S) (I + S is
// never singular for skew S: its eigenvalues are 1 + i*lambda). Backward identities (R = (I - S)(I + S)^{-1}):
//   I + R = 2 (I + S)^{-1}  =>  dL/dS = -1/2 (I + R)^T G (I + R)^T, so only R is saved;
// Neumann R = sum_k c_k S^k: dL/dS = sum_k c_k H_k with H_1 = G, H_{k+1} = H_k S^T + (S^T)^k G.
// dL/dA = (dL/dS - dL/dS^T) / 2 (S = (A - A^T) / 2).
//
// The BOFT chain on CPU is one fused pass per tile of tokens (boft_fused_*): the tile is gathered once from x into
// a per-thread buffer in the accumulate type and stays there through all m factors — block products by the tile
// GEMM of cpu_tiles.h, the permutation between factor i and i-1 folded into one composed index gather — then
// scattered once into the output. The backward recomputes each factor's input inside the tile (only x is saved),
// runs the gradient chain the same way, and accumulates the rotation gradients per thread (no atomics). The ATen
// form (boft_forward / boft_backward: gathers + bmm) serves the CUDA glue.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "checks.h"
#include "cpu_tiles.h"
#include "dispatch.h"
#include "orthogonal/orthogonal.h"

namespace peftcore::orthogonal {

// ------------------------------------------------------------------------------------------------------------
// Shared helpers (also used by the CUDA glue).

void check_params(const char* op, const char* name, const at::Tensor& p) {
  check_float(op, name, p);
  TORCH_CHECK(p.dim() == 3 && p.size(1) == p.size(2), op, ": ", name,
              " must be [num_blocks, b, b] (square blocks), got shape ", p.sizes());
}

void check_boft_args(const char* op, const at::Tensor& x, const at::Tensor& rotations, const at::Tensor& perm,
                     const at::Tensor& grad_out, bool check_values) {
  check_float(op, "x", x);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dim, got a scalar");
  check_float(op, "rotations", rotations);
  check_same_device(op, "rotations", rotations, x, "x");
  TORCH_CHECK(rotations.dim() == 4 && rotations.size(2) == rotations.size(3), op,
              ": rotations must be [m, num_blocks, b, b] (square blocks), got shape ", rotations.sizes());
  TORCH_CHECK(rotations.scalar_type() == at::kFloat || rotations.scalar_type() == x.scalar_type(), op,
              ": rotations must be float32 or the input's dtype (", x.scalar_type(), "), got ",
              rotations.scalar_type());
  const int64_t m = rotations.size(0), nb = rotations.size(1), b = rotations.size(2), d = x.size(-1);
  TORCH_CHECK(nb * b == d, op, ": rotations' num_blocks * b (", nb, " * ", b, " = ", nb * b,
              ") must equal the input's last dim ", d);
  TORCH_CHECK(perm.scalar_type() == at::kLong, op, ": perm must be int64, got ", perm.scalar_type());
  check_same_device(op, "perm", perm, x, "x");
  TORCH_CHECK(perm.dim() == 2 && perm.size(0) == m && perm.size(1) == d, op, ": perm must be [m, d] = [", m, ", ",
              d, "], got shape ", perm.sizes());
  if (grad_out.defined()) {
    check_float(op, "grad_out", grad_out);
    check_same_device(op, "grad_out", grad_out, x, "x");
    check_same_dtype(op, "grad_out", grad_out, x, "x");
    TORCH_CHECK(grad_out.sizes() == x.sizes(), op, ": grad_out must have x's shape ", x.sizes(), ", got ",
                grad_out.sizes());
  }
  if (!check_values || perm.numel() == 0) return;
  // Every row a permutation of [0, d): the fused kernels gather and scatter with these indices.
  auto pc = perm.contiguous();
  const int64_t* pp = pc.const_data_ptr<int64_t>();
  std::vector<int64_t> seen(d);
  for (int64_t i = 0; i < m; ++i) {
    std::fill(seen.begin(), seen.end(), -1);
    for (int64_t j = 0; j < d; ++j) {
      const int64_t v = pp[i * d + j];
      TORCH_CHECK(v >= 0 && v < d, op, ": every row of perm must be a permutation of [0, ", d, "), got perm[", i,
                  ", ", j, "] = ", v);
      TORCH_CHECK(seen[v] < 0, op, ": every row of perm must be a permutation of [0, ", d, "), got ", v,
                  " twice in row ", i, " (perm[", i, ", ", seen[v], "] and perm[", i, ", ", j, "])");
      seen[v] = j;
    }
  }
}

std::vector<double> neumann_coefficients(int64_t terms) {
  // PEFT OFTRotationModule._cayley_batch: terms <= 1 -> I; 2 -> I + 2S; else I + 2S + 2S^2 (+ 2S^k for
  // k = 3..terms-2) + S^top with top = max(3, terms - 1) (terms 3 and 4 give the same polynomial).
  if (terms <= 1) return {1.0};
  if (terms == 2) return {1.0, 2.0};
  const int64_t top = std::max<int64_t>(3, terms - 1);
  std::vector<double> c(top + 1, 2.0);
  c[0] = 1.0;
  c[top] = 1.0;
  return c;
}

namespace {

at::Tensor flat2d(const at::Tensor& t) {
  const int64_t d = t.size(-1);
  int64_t T = 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) T *= t.size(i);
  return t.reshape({T, d}).contiguous();
}

// z[t, r*b + c] = sum_k y[t, r*b + k] R[r, k, c] for y [T, d]; R [nb, b, b] (transposed when trans).
at::Tensor blockmm(const at::Tensor& y, const at::Tensor& R, bool trans) {
  const int64_t T = y.size(0), nb = R.size(0), b = R.size(1);
  auto z = at::bmm(y.view({T, nb, b}).transpose(0, 1), trans ? R.transpose(1, 2) : R);  // [nb, T, b]
  return z.transpose(0, 1).reshape({T, nb * b});
}

at::Tensor inverse_perm(const at::Tensor& perm) {
  const int64_t d = perm.size(1);
  auto ar = at::arange(d, perm.options()).expand_as(perm);
  return at::zeros_like(perm).scatter_(1, perm, ar);  // zeros: a non-permutation still leaves in-range entries
}

// perm's entries clamped into [0, d): on CUDA perm's values are not validated (that would sync), so an invalid row
// gives a wrong result but never an index outside the buffers. A no-op for a valid perm.
at::Tensor safe_perm(const at::Tensor& perm) {
  return perm.size(1) > 0 ? perm.clamp(0, perm.size(1) - 1) : perm;
}

}  // namespace

at::Tensor boft_forward(const at::Tensor& x, const at::Tensor& rotations, const at::Tensor& perm_in) {
  const int64_t m = rotations.size(0), d = x.size(-1);
  auto cur = flat2d(x);
  // No tokens, no features, or no factors (m = 0: the empty product, the identity map).
  if (cur.size(0) == 0 || d == 0 || m == 0) return x.clone(at::MemoryFormat::Contiguous);
  auto R = rotations.to(x.scalar_type());
  const auto perm = safe_perm(perm_in);
  auto inv = inverse_perm(perm);
  for (int64_t i = m - 1; i >= 0; --i) {  // x @ M_{m-1} ... M_0: the last factor acts first (PEFT's order)
    auto y = cur.index_select(1, inv[i]);
    cur = blockmm(y, R[i], false).index_select(1, perm[i]);
  }
  return cur.view(x.sizes());
}

std::tuple<at::Tensor, at::Tensor> boft_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                 const at::Tensor& rotations, const at::Tensor& perm_in,
                                                 std::array<bool, 2> mask) {
  const int64_t m = rotations.size(0), nb = rotations.size(1), b = rotations.size(2);
  auto x2d = flat2d(x);
  auto g = flat2d(grad_out);
  if (m == 0) g = g.clone();  // the identity map: grad_x = grad_out (a new tensor, never an alias of the input)
  const int64_t T = x2d.size(0);
  auto R = rotations.to(x.scalar_type());
  const auto perm = safe_perm(perm_in);
  auto inv = inverse_perm(perm);
  const auto acc = at::toOpMathType(x.scalar_type());
  // Recompute the inputs of the block products (only x is saved).
  std::vector<at::Tensor> ys(m);
  if (mask[1]) {
    auto cur = x2d;
    for (int64_t i = m - 1; i >= 0; --i) {
      ys[i] = cur.index_select(1, inv[i]);
      if (i > 0) cur = blockmm(ys[i], R[i], false).index_select(1, perm[i]);
    }
  }
  at::Tensor grot = mask[1] ? at::zeros(rotations.sizes(), rotations.options().dtype(acc)) : at::Tensor();
  for (int64_t i = 0; i < m; ++i) {  // reverse of the forward order
    auto gz = g.index_select(1, inv[i]);  // x_out = z[perm] -> gz = g[inv]
    if (mask[1] && T > 0)
      grot[i].copy_(at::bmm(ys[i].to(acc).view({T, nb, b}).permute({1, 2, 0}),
                            gz.to(acc).view({T, nb, b}).transpose(0, 1)));
    if (mask[0] || i + 1 < m) g = blockmm(gz, R[i], true).index_select(1, perm[i]);  // y = x[inv] -> gx = gy[perm]
  }
  auto empty = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  return {mask[0] ? g.view(x.sizes()) : empty(x), mask[1] ? grot.to(rotations.scalar_type()) : empty(rotations)};
}

namespace {

void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor here, got ", t.device());
}

// ------------------------------------------------------------------------------------------------------------
// Per-block kernels. Tiles are row-major b x b in acc_t.

template <typename acc_t>
void gauss_jordan_solve(acc_t* M, acc_t* X, int64_t b) {
  // Solves M X' = X in place (X <- M^{-1} X), partial pivoting.
  for (int64_t k = 0; k < b; ++k) {
    int64_t p = k;
    for (int64_t i = k + 1; i < b; ++i)
      if (std::abs(M[i * b + k]) > std::abs(M[p * b + k])) p = i;
    if (p != k)
      for (int64_t j = 0; j < b; ++j) {
        std::swap(M[k * b + j], M[p * b + j]);
        std::swap(X[k * b + j], X[p * b + j]);
      }
    const acc_t inv = acc_t(1) / M[k * b + k];
    for (int64_t j = 0; j < b; ++j) {
      M[k * b + j] *= inv;
      X[k * b + j] *= inv;
    }
    for (int64_t i = 0; i < b; ++i) {
      if (i == k) continue;
      const acc_t f = M[i * b + k];
      if (f == acc_t(0)) continue;
      for (int64_t j = 0; j < b; ++j) {
        M[i * b + j] -= f * M[k * b + j];
        X[i * b + j] -= f * X[k * b + j];
      }
    }
  }
}

// C = A @ B (trans_a: A^T, trans_b: B^T), b x b.
template <typename acc_t>
void matmul(const acc_t* A, const acc_t* B, acc_t* C, int64_t b, bool trans_a, bool trans_b) {
  // Transposed operands are copied to a per-thread scratch, then the register-blocked tile GEMM of cpu_tiles.h.
  thread_local std::vector<acc_t> scratch;
  if (trans_a || trans_b) scratch.resize(2 * b * b);
  auto transposed = [&](const acc_t* M, acc_t* out) {
    for (int64_t i = 0; i < b; ++i)
      for (int64_t j = 0; j < b; ++j) out[j * b + i] = M[i * b + j];
    return out;
  };
  const acc_t* a = trans_a ? transposed(A, scratch.data()) : A;
  const acc_t* bm = trans_b ? transposed(B, scratch.data() + b * b) : B;
  peftcore::cpu::gemm(b, b, b, a, b, bm, b, C, b, false);
}

template <typename scalar_t, typename acc_t>
void load_skew(const scalar_t* a, acc_t* S, int64_t b) {
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j < b; ++j)
      S[i * b + j] = (static_cast<acc_t>(a[i * b + j]) - static_cast<acc_t>(a[j * b + i])) * acc_t(0.5);
}

template <typename scalar_t, typename acc_t>
void store_skew_grad(const acc_t* gS, scalar_t* out, int64_t b) {
  for (int64_t i = 0; i < b; ++i)
    for (int64_t j = 0; j < b; ++j) out[i * b + j] = static_cast<scalar_t>((gS[i * b + j] - gS[j * b + i]) * acc_t(0.5));
}

// Runs fn(block index, scratch of `tiles` b x b acc_t tiles) over every block, blocks split across threads.
template <typename acc_t, typename F>
void for_each_block(int64_t nb, int64_t b, int64_t tiles, F fn) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, b * b * b));
  at::parallel_for(0, nb, grain, [&](int64_t lo, int64_t hi) {
    std::vector<acc_t> buf(tiles * b * b);
    for (int64_t n = lo; n < hi; ++n) fn(n, buf.data());
  });
}

at::Tensor cayley_cpu(const at::Tensor& params) {
  constexpr const char* op = "orthogonal_cayley";
  check_cpu(op, "params", params);
  check_params(op, "params", params);
  auto p = params.contiguous();
  auto out = at::empty_like(p);
  const int64_t nb = p.size(0), b = p.size(1);
  PEFTCORE_DISPATCH_FLOATING(p.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = p.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for_each_block<acc_t>(nb, b, 2, [&](int64_t n, acc_t* buf) {
      acc_t *M = buf, *X = buf + b * b;
      load_skew(src + n * b * b, X, b);  // X = S
      for (int64_t i = 0; i < b * b; ++i) {
        M[i] = X[i];
        X[i] = -X[i];
      }
      for (int64_t i = 0; i < b; ++i) {
        M[i * b + i] += acc_t(1);
        X[i * b + i] += acc_t(1);
      }
      gauss_jordan_solve(M, X, b);  // (I + S)^{-1}(I - S) = (I - S)(I + S)^{-1}
      for (int64_t i = 0; i < b * b; ++i) dst[n * b * b + i] = static_cast<scalar_t>(X[i]);
    });
  });
  return out;
}

at::Tensor cayley_backward_cpu(const at::Tensor& grad, const at::Tensor& R) {
  constexpr const char* op = "orthogonal_cayley_backward";
  check_cpu(op, "grad", grad);
  check_params(op, "grad", grad);
  check_params(op, "R", R);
  check_same_device(op, "R", R, grad, "grad");
  check_same_dtype(op, "R", R, grad, "grad");
  TORCH_CHECK(R.sizes() == grad.sizes(), op, ": R must have grad's shape ", grad.sizes(), ", got ", R.sizes());
  auto g = grad.contiguous(), r = R.contiguous();
  auto out = at::empty_like(g);
  const int64_t nb = g.size(0), b = g.size(1);
  PEFTCORE_DISPATCH_FLOATING(g.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *gp = g.const_data_ptr<scalar_t>(), *rp = r.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for_each_block<acc_t>(nb, b, 4, [&](int64_t n, acc_t* buf) {
      acc_t *P = buf, *G = buf + b * b, *T1 = buf + 2 * b * b, *gS = buf + 3 * b * b;
      for (int64_t i = 0; i < b * b; ++i) {
        P[i] = static_cast<acc_t>(rp[n * b * b + i]);
        G[i] = static_cast<acc_t>(gp[n * b * b + i]);
      }
      for (int64_t i = 0; i < b; ++i) P[i * b + i] += acc_t(1);
      matmul(G, P, T1, b, false, true);   // G P^T
      matmul(P, T1, gS, b, true, false);  // P^T G P^T
      for (int64_t i = 0; i < b * b; ++i) gS[i] *= acc_t(-0.5);
      store_skew_grad(gS, dst + n * b * b, b);
    });
  });
  return out;
}

void check_terms(const char* op, int64_t terms) {
  TORCH_CHECK(terms >= 0 && terms <= 64, op, ": terms must be in [0, 64], got ", terms);
}

at::Tensor neumann_cpu(const at::Tensor& params, int64_t terms) {
  constexpr const char* op = "orthogonal_cayley_neumann";
  check_cpu(op, "params", params);
  check_params(op, "params", params);
  check_terms(op, terms);
  auto p = params.contiguous();
  auto out = at::empty_like(p);
  const int64_t nb = p.size(0), b = p.size(1);
  const auto c = neumann_coefficients(terms);
  const int64_t top = static_cast<int64_t>(c.size()) - 1;
  PEFTCORE_DISPATCH_FLOATING(p.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = p.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for_each_block<acc_t>(nb, b, 3, [&](int64_t n, acc_t* buf) {
      acc_t *S = buf, *Rm = buf + b * b, *T = buf + 2 * b * b;
      load_skew(src + n * b * b, S, b);
      // Horner: R = c_top I; R = R S + c_k I for k = top-1..0.
      for (int64_t i = 0; i < b * b; ++i) Rm[i] = 0;
      for (int64_t i = 0; i < b; ++i) Rm[i * b + i] = static_cast<acc_t>(c[top]);
      for (int64_t k = top - 1; k >= 0; --k) {
        matmul(Rm, S, T, b, false, false);
        for (int64_t i = 0; i < b; ++i) T[i * b + i] += static_cast<acc_t>(c[k]);
        std::swap(Rm, T);
      }
      for (int64_t i = 0; i < b * b; ++i) dst[n * b * b + i] = static_cast<scalar_t>(Rm[i]);
    });
  });
  return out;
}

at::Tensor neumann_backward_cpu(const at::Tensor& grad, const at::Tensor& params, int64_t terms) {
  constexpr const char* op = "orthogonal_cayley_neumann_backward";
  check_cpu(op, "grad", grad);
  check_params(op, "grad", grad);
  check_params(op, "params", params);
  check_same_device(op, "params", params, grad, "grad");
  check_same_dtype(op, "params", params, grad, "grad");
  TORCH_CHECK(params.sizes() == grad.sizes(), op, ": params must have grad's shape ", grad.sizes(), ", got ",
              params.sizes());
  check_terms(op, terms);
  auto g = grad.contiguous(), p = params.contiguous();
  auto out = at::empty_like(g);
  const int64_t nb = g.size(0), b = g.size(1);
  const auto c = neumann_coefficients(terms);
  const int64_t top = static_cast<int64_t>(c.size()) - 1;
  PEFTCORE_DISPATCH_FLOATING(g.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t *gp = g.const_data_ptr<scalar_t>(), *pp = p.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    for_each_block<acc_t>(nb, b, 6, [&](int64_t n, acc_t* buf) {
      acc_t *S = buf, *G = buf + b * b, *H = buf + 2 * b * b, *Pk = buf + 3 * b * b, *T = buf + 4 * b * b,
            *gS = buf + 5 * b * b;
      load_skew(pp + n * b * b, S, b);
      for (int64_t i = 0; i < b * b; ++i) {
        G[i] = static_cast<acc_t>(gp[n * b * b + i]);
        H[i] = G[i];  // H_1
        gS[i] = 0;
        Pk[i] = 0;
      }
      for (int64_t i = 0; i < b; ++i) Pk[i * b + i] = 1;  // (S^T)^0
      for (int64_t k = 1; k <= top; ++k) {
        const acc_t ck = static_cast<acc_t>(c[k]);
        for (int64_t i = 0; i < b * b; ++i) gS[i] += ck * H[i];
        if (k == top) break;
        // Pk <- (S^T)^k; H <- H S^T + Pk G.
        matmul(Pk, S, T, b, false, true);
        std::swap(Pk, T);
        matmul(H, S, T, b, false, true);
        std::swap(H, T);
        matmul(Pk, G, T, b, false, false);
        for (int64_t i = 0; i < b * b; ++i) H[i] += T[i];
      }
      store_skew_grad(gS, dst + n * b * b, b);
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------------------------------
// Fused BOFT chain (CPU). Factor i (applied for i = m-1 .. 0): y_i = cur[inv_i]; z_i = blockdiag(R_i) y_i;
// cur = z_i[perm_i]. Between factors, y_{i-1}[j] = z_i[perm_i[inv_{i-1}[j]]]: one gather by fwd_comp[i].

using namespace peftcore::cpu;

struct BoftIndex {
  int64_t m, d;
  std::vector<int64_t> perm, inv, fwd_comp, bwd_comp;  // [m, d] each (comp rows unused at the ends)
  explicit BoftIndex(const at::Tensor& p) : m(p.size(0)), d(p.size(1)) {
    auto pc = p.contiguous();
    const int64_t* pp = pc.const_data_ptr<int64_t>();
    perm.assign(pp, pp + m * d);
    inv.resize(m * d);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < d; ++j) inv[i * d + perm[i * d + j]] = j;
    fwd_comp.assign(m * d, 0);
    bwd_comp.assign(m * d, 0);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < d; ++j) {
        if (i > 0) fwd_comp[i * d + j] = perm[i * d + inv[(i - 1) * d + j]];      // y_{i-1} from z_i
        if (i + 1 < m) bwd_comp[i * d + j] = perm[i * d + inv[(i + 1) * d + j]];  // gz_{i+1} from gy_i
      }
  }
  const int64_t* row(const std::vector<int64_t>& v, int64_t i) const { return v.data() + i * d; }
};

template <typename acc_t>
void blockmm_tile(int64_t tb, int64_t d, int64_t nb, int64_t b, const acc_t* src, const acc_t* R, acc_t* dst) {
  for (int64_t r = 0; r < nb; ++r) gemm(tb, b, b, src + r * b, d, R + r * b * b, b, dst + r * b, d, false);
}

template <typename acc_t>
void gather_tile(int64_t tb, int64_t d, const acc_t* src, const int64_t* idx, acc_t* dst) {
  for (int64_t t = 0; t < tb; ++t) {
    const acc_t* s = src + t * d;
    acc_t* o = dst + t * d;
    for (int64_t j = 0; j < d; ++j) o[j] = s[idx[j]];
  }
}

template <typename scalar_t>
at::Tensor boft_fused_forward(const at::Tensor& x, const at::Tensor& rotations, const at::Tensor& perm) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t m = rotations.size(0), nb = rotations.size(1), b = rotations.size(2), d = x.size(-1);
  auto x2d = flat2d(x);
  const int64_t T = x2d.size(0);
  if (m == 0) return x.clone(at::MemoryFormat::Contiguous);  // no factors: the identity map
  auto y = at::empty({T, d}, x.options());
  if (T == 0 || d == 0) return y.view(x.sizes());
  // PEFT casts the rotations to the input's dtype before the products; then everything accumulates in acc_t.
  at::Tensor R = rotations.to(x.scalar_type()).to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* Rp = R.const_data_ptr<acc_t>();
  const BoftIndex ix(perm);
  const scalar_t* xp = x2d.const_data_ptr<scalar_t>();
  scalar_t* yp = y.mutable_data_ptr<scalar_t>();
  const int64_t TB = tile_tokens(2 * d, sizeof(acc_t));
  at::parallel_for(0, (T + TB - 1) / TB, 1, [&](int64_t t0b, int64_t t1b) {
    std::vector<acc_t> A(TB * d), B(TB * d);
    for (int64_t tile = t0b; tile < t1b; ++tile) {
      const int64_t t0 = tile * TB, tb = std::min(TB, T - t0);
      const int64_t* inv = ix.row(ix.inv, m - 1);
      for (int64_t t = 0; t < tb; ++t)
        for (int64_t j = 0; j < d; ++j) B[t * d + j] = static_cast<acc_t>(xp[(t0 + t) * d + inv[j]]);
      for (int64_t i = m - 1; i >= 0; --i) {
        blockmm_tile(tb, d, nb, b, B.data(), Rp + i * nb * b * b, A.data());
        if (i > 0) {
          gather_tile(tb, d, A.data(), ix.row(ix.fwd_comp, i), B.data());
        } else {
          const int64_t* p0 = ix.row(ix.perm, 0);
          for (int64_t t = 0; t < tb; ++t)
            for (int64_t j = 0; j < d; ++j) yp[(t0 + t) * d + j] = static_cast<scalar_t>(A[t * d + p0[j]]);
        }
      }
    }
  });
  return y.view(x.sizes());
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor> boft_fused_backward(const at::Tensor& grad_out, const at::Tensor& x,
                                                       const at::Tensor& rotations, const at::Tensor& perm,
                                                       std::array<bool, 2> mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t m = rotations.size(0), nb = rotations.size(1), b = rotations.size(2), d = x.size(-1);
  auto empty = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  if (m == 0)  // no factors: the identity map; grad_x = grad_out, rotations [0, nb, b, b] get an empty gradient
    return {mask[0] ? grad_out.clone(at::MemoryFormat::Contiguous) : empty(x),
            mask[1] ? at::zeros(rotations.sizes(), rotations.options()) : empty(rotations)};
  auto x2d = flat2d(x), g2d = flat2d(grad_out);
  const int64_t T = x2d.size(0);
  at::Tensor gx = mask[0] ? at::empty({T, d}, x.options()) : at::Tensor();
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor R = rotations.to(x.scalar_type()).to(acc_type).contiguous();
  at::Tensor RT = R.transpose(-1, -2).contiguous();
  const acc_t* Rp = R.const_data_ptr<acc_t>();
  const acc_t* RTp = RT.const_data_ptr<acc_t>();
  const BoftIndex ix(perm);
  const scalar_t* xp = x2d.const_data_ptr<scalar_t>();
  const scalar_t* gp = g2d.const_data_ptr<scalar_t>();
  scalar_t* gxp = mask[0] ? gx.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t bb = b * b;
  ThreadAccum<acc_t> grot(mask[1] ? m * nb * bb : 0);
  const int64_t TB = tile_tokens((mask[1] ? m + 2 : 2) * d, sizeof(acc_t));
  if (T > 0 && d > 0 && (mask[0] || mask[1])) {
    at::parallel_for(0, (T + TB - 1) / TB, 1, [&](int64_t t0b, int64_t t1b) {
      std::vector<acc_t> Y(mask[1] ? m * TB * d : 0), A(TB * d), G(TB * d), yt(mask[1] ? b * TB : 0);
      acc_t* gr = mask[1] ? grot.mine() : nullptr;
      for (int64_t tile = t0b; tile < t1b; ++tile) {
        const int64_t t0 = tile * TB, tb = std::min(TB, T - t0);
        if (mask[1]) {  // recompute every factor's input y_i inside the tile
          const int64_t* inv = ix.row(ix.inv, m - 1);
          acc_t* y0 = Y.data() + (m - 1) * TB * d;
          for (int64_t t = 0; t < tb; ++t)
            for (int64_t j = 0; j < d; ++j) y0[t * d + j] = static_cast<acc_t>(xp[(t0 + t) * d + inv[j]]);
          for (int64_t i = m - 1; i > 0; --i) {
            blockmm_tile(tb, d, nb, b, Y.data() + i * TB * d, Rp + i * nb * bb, A.data());
            gather_tile(tb, d, A.data(), ix.row(ix.fwd_comp, i), Y.data() + (i - 1) * TB * d);
          }
        }
        // gz_0 = g[inv_0]
        const int64_t* inv0 = ix.row(ix.inv, 0);
        for (int64_t t = 0; t < tb; ++t)
          for (int64_t j = 0; j < d; ++j) G[t * d + j] = static_cast<acc_t>(gp[(t0 + t) * d + inv0[j]]);
        for (int64_t i = 0; i < m; ++i) {
          if (mask[1]) {  // grot_i[r] += y_i[:, r]^T gz[:, r]
            const acc_t* yi = Y.data() + i * TB * d;
            for (int64_t r = 0; r < nb; ++r) {
              for (int64_t t = 0; t < tb; ++t)
                for (int64_t k = 0; k < b; ++k) yt[k * tb + t] = yi[t * d + r * b + k];
              gemm(b, b, tb, yt.data(), tb, G.data() + r * b, d, gr + (i * nb + r) * bb, b, true);
            }
          }
          const bool last = i + 1 == m;
          if (last && !mask[0]) break;
          blockmm_tile(tb, d, nb, b, G.data(), RTp + i * nb * bb, A.data());  // gy_i = gz_i @ R_i^T per block
          if (!last) {
            gather_tile(tb, d, A.data(), ix.row(ix.bwd_comp, i), G.data());  // gz_{i+1}
          } else {
            const int64_t* pl = ix.row(ix.perm, i);  // gx = gy_{m-1}[perm_{m-1}]
            for (int64_t t = 0; t < tb; ++t)
              for (int64_t j = 0; j < d; ++j) gxp[(t0 + t) * d + j] = static_cast<scalar_t>(A[t * d + pl[j]]);
          }
        }
      }
    });
  }
  at::Tensor gr = mask[1] ? grot.reduce(rotations.sizes(), rotations.scalar_type()) : at::Tensor();
  return {mask[0] ? gx.view(x.sizes()) : empty(x), mask[1] ? gr : empty(rotations)};
}

at::Tensor boft_apply_cpu(const at::Tensor& x, const at::Tensor& rotations, const at::Tensor& perm) {
  constexpr const char* op = "orthogonal_boft_apply";
  check_cpu(op, "x", x);
  check_boft_args(op, x, rotations, perm, at::Tensor(), /*check_values=*/true);
  at::Tensor y;
  PEFTCORE_DISPATCH_FLOATING(x.scalar_type(), op, [&] { y = boft_fused_forward<scalar_t>(x, rotations, perm); });
  return y;
}

std::tuple<at::Tensor, at::Tensor> boft_apply_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                           const at::Tensor& rotations, const at::Tensor& perm,
                                                           std::array<bool, 2> mask) {
  constexpr const char* op = "orthogonal_boft_apply_backward";
  check_cpu(op, "x", x);
  check_boft_args(op, x, rotations, perm, grad_out, /*check_values=*/true);
  std::tuple<at::Tensor, at::Tensor> out;
  PEFTCORE_DISPATCH_FLOATING(x.scalar_type(), op,
                             [&] { out = boft_fused_backward<scalar_t>(grad_out, x, rotations, perm, mask); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(peftcore, CPU, m) {
  m.impl("orthogonal_cayley", &cayley_cpu);
  m.impl("orthogonal_cayley_backward", &cayley_backward_cpu);
  m.impl("orthogonal_cayley_neumann", &neumann_cpu);
  m.impl("orthogonal_cayley_neumann_backward", &neumann_backward_cpu);
  m.impl("orthogonal_boft_apply", &boft_apply_cpu);
  m.impl("orthogonal_boft_apply_backward", &boft_apply_backward_cpu);
}

}  // namespace peftcore::orthogonal
