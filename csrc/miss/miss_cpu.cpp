// miss CPU kernels (miss_fold / miss_unfold, see miss.h for the math) and the argument checks both backends use.
//
// Layout. Activations are flattened to [rows, n] row-major, the folded side to [rows, r]. Rows are independent,
// so blocks of rows go to threads (at::parallel_for); no atomics, one small per-task buffer.
//
// Fold. A row is read once, front to back, in spans of L elements, L a multiple of r (L = r when r >= kSpan, else
// the smallest multiple of r >= kSpan): since L % r == 0, element f lands in acc[f % L] and acc[j] belongs to
// class j % r. The inner loop `acc[j] += x[f0 + j]` over a span is contiguous and vectorises even when r is tiny;
// the ragged tail (n % L elements) is the same loop, shorter, which is exactly PEFT's zero padding. Finally
// y[c] = sum_k acc[c + k*r] (L / r terms), rounded once to x's dtype. acc is at::opmath_type (fp32 for half
// types, fp64 for double).
//
// Unfold. out[f] = g[f % r]: the first min(L, n) outputs are copies of g (r at a time), the rest copies of that
// prefix (L at a time, a multiple of r) — all memcpy.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "checks.h"
#include "dispatch.h"
#include "miss/miss.h"
#include "miss/miss_plan.h"

namespace peftcore::miss {

// ------------------------------------------------------------------------------------------------------------
// Shared helpers (also used by the CUDA glue).

void check_fold_args(const char* op, const at::Tensor& x, int64_t r) {
  check_float(op, "x", x);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dim [..., in_features], got a scalar");
  TORCH_CHECK(r >= 1, op, ": r must be >= 1, got ", r);
  const int64_t n = x.size(-1);
  TORCH_CHECK(r <= n, op, ": r must be <= x's last dim (in_features, as PEFT MiSS requires), got r = ", r,
              " for x of shape ", x.sizes());
}

void check_unfold_args(const char* op, const at::Tensor& grad, int64_t n) {
  check_float(op, "grad", grad);
  TORCH_CHECK(grad.dim() >= 1, op, ": grad must have at least 1 dim [..., r], got a scalar");
  TORCH_CHECK(n >= 1, op, ": n must be >= 1, got ", n);
  const int64_t r = grad.size(-1);
  TORCH_CHECK(r >= 1, op, ": grad's last dim r must be >= 1, got grad of shape ", grad.sizes());
  TORCH_CHECK(r <= n, op, ": grad's last dim r must be <= n (the fold's in_features), got r = ", r, " and n = ", n);
}

at::Tensor flatten_rows(const at::Tensor& t) {
  const int64_t last = t.size(-1);
  int64_t rows = 1;  // not reshape(-1, last): leading dims may hold a 0
  for (int64_t i = 0; i + 1 < t.dim(); ++i) rows *= t.size(i);
  return t.reshape({rows, last}).contiguous();
}

std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t last) {
  auto s = t.sizes().vec();
  s.back() = last;
  return s;
}

namespace {

constexpr int64_t kSpan = 64;

// The span length L: a multiple of r, at least kSpan.
int64_t span_for(int64_t r) { return r >= kSpan ? r : r * ((kSpan + r - 1) / r); }

// Rows per parallel task: ~GRAIN_SIZE elements each (memory bound).
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(n, 1)); }

template <typename scalar_t>
void fold_rows(const scalar_t* x, int64_t n, int64_t r, scalar_t* y, int64_t rows) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t L = span_for(r);
  at::parallel_for(0, rows, row_grain(n), [&](int64_t rb, int64_t re) {
    std::vector<acc_t> buf(L);
    acc_t* __restrict__ acc = buf.data();
    for (int64_t t = rb; t < re; ++t) {
      const scalar_t* __restrict__ xr = x + t * n;
      std::fill(acc, acc + L, acc_t(0));
      int64_t f0 = 0;
      for (; f0 + L <= n; f0 += L) {
        const scalar_t* __restrict__ s = xr + f0;
        for (int64_t j = 0; j < L; ++j) acc[j] += static_cast<acc_t>(s[j]);
      }
      const int64_t tail = n - f0;
      const scalar_t* __restrict__ s = xr + f0;
      for (int64_t j = 0; j < tail; ++j) acc[j] += static_cast<acc_t>(s[j]);
      scalar_t* __restrict__ yr = y + t * r;
      for (int64_t c = 0; c < r; ++c) {
        acc_t v = acc[c];
        for (int64_t j = c + r; j < L; j += r) v += acc[j];
        yr[c] = static_cast<scalar_t>(v);
      }
    }
  });
}

template <typename scalar_t>
void unfold_rows(const scalar_t* g, int64_t r, int64_t n, scalar_t* out, int64_t rows) {
  const int64_t head = std::min(span_for(r), n);  // a multiple of r unless it is n itself
  at::parallel_for(0, rows, row_grain(n), [&](int64_t rb, int64_t re) {
    for (int64_t t = rb; t < re; ++t) {
      const scalar_t* gr = g + t * r;
      scalar_t* o = out + t * n;
      for (int64_t f = 0; f < head; f += r) std::memcpy(o + f, gr, std::min(r, head - f) * sizeof(scalar_t));
      for (int64_t f = head; f < n; f += head) std::memcpy(o + f, o, std::min(head, n - f) * sizeof(scalar_t));
    }
  });
}

void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor here, got ", t.device());
}

// ------------------------------------------------------------------------------------------------------------
// Ops (CPU).

at::Tensor miss_fold_cpu(const at::Tensor& x, int64_t r) {
  constexpr const char* op = "miss_fold";
  check_fold_args(op, x, r);
  check_cpu(op, "x", x);
  const int64_t n = x.size(-1);
  auto x2d = flatten_rows(x);
  const int64_t rows = x2d.size(0);
  auto y = at::empty({rows, r}, x.options());
  if (rows > 0) {
    PEFTCORE_DISPATCH_FLOATING(x.scalar_type(), op, [&] {
      fold_rows<scalar_t>(x2d.const_data_ptr<scalar_t>(), n, r, y.mutable_data_ptr<scalar_t>(), rows);
    });
  }
  return y.view(with_last_dim(x, r));
}

at::Tensor miss_unfold_cpu(const at::Tensor& grad, int64_t n) {
  constexpr const char* op = "miss_unfold";
  check_unfold_args(op, grad, n);
  check_cpu(op, "grad", grad);
  const int64_t r = grad.size(-1);
  auto g2d = flatten_rows(grad);
  const int64_t rows = g2d.size(0);
  auto out = at::empty({rows, n}, grad.options());
  if (rows > 0) {
    PEFTCORE_DISPATCH_FLOATING(grad.scalar_type(), op, [&] {
      unfold_rows<scalar_t>(g2d.const_data_ptr<scalar_t>(), r, n, out.mutable_data_ptr<scalar_t>(), rows);
    });
  }
  return out.view(with_last_dim(grad, n));
}

// The CUDA launchers' plan (miss_plan.h), without a GPU.
std::vector<int64_t> miss_vec_plan(int64_t rows, int64_t n, int64_t r, int64_t elem_size, int64_t x_address,
                                   int64_t out_address, bool unfold) {
  constexpr const char* op = "miss_vec_plan";
  TORCH_CHECK(rows >= 0, op, ": rows must be >= 0, got ", rows);
  TORCH_CHECK(r >= 1 && r <= n, op, ": need 1 <= r <= n, got r = ", r, " and n = ", n);
  TORCH_CHECK(elem_size > 0 && x_address >= 0 && out_address >= 0, op,
              ": elem_size must be > 0 and addresses >= 0, got ", elem_size, ", ", x_address, ", ", out_address);
  const uint64_t xa = static_cast<uint64_t>(x_address), oa = static_cast<uint64_t>(out_address);
  const plan::Launch l = unfold ? plan::unfold(rows, r, n, elem_size, xa, oa) : plan::fold(rows, n, r, elem_size, xa, oa);
  return {l.kind, l.vec, l.width, l.copies, l.rows.tx, l.rows.ty, l.rows.grid_x, l.rows.grid_y};
}

}  // namespace

TORCH_LIBRARY_IMPL(peftcore, CPU, m) {
  m.impl("miss_fold", &miss_fold_cpu);
  m.impl("miss_unfold", &miss_unfold_cpu);
}

// Pure host planning (no tensors): one kernel for every backend.
TORCH_LIBRARY_IMPL(peftcore, CompositeImplicitAutograd, m) {
  m.impl("miss_vec_plan", &miss_vec_plan);
}

}  // namespace peftcore::miss
