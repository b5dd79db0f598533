// partial CPU kernels (gather / scatter-add along the last dim), the linear forward / backward shared with the
// CUDA glue (partial.h), and the helpers both backends use.
//
// Layout and math. Activations are flattened to [T, features] row-major. The gather out[t, j] = x[t, idx[j]] and
// the scatter-add y[t, idx[j]] += src[t, j] walk one token row at a time; rows are independent (index entries
// are unique), so blocks of rows go to threads (at::parallel_for) with no atomics and no per-thread buffers.
// When the index is a contiguous range [a, a+k) the inner loop is a plain contiguous copy / add that the
// compiler vectorises; otherwise it is an indexed load (gather) or store (scatter) per element.
//
// The linear ops are GEMMs through ATen (BLAS) on views of x, W, y, grad_x; see linear_forward for the split.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#include "checks.h"
#include "dispatch.h"
#include "partial/partial.h"
#include "partial/partial_plan.h"

namespace peftcore::partial {

// ------------------------------------------------------------------------------------------------------------
// Shared helpers (also used by the CUDA glue).

void check_index(const char* op, const at::Tensor& index, const at::Tensor& ref) {
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": index must be int64, got ", index.scalar_type());
  check_dim(op, "index", index, 1);
  check_same_device(op, "index", index, ref, "the input");
}

at::Tensor flatten_tokens(const char* op, const char* name, const at::Tensor& t, int64_t features) {
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have at least 1 dim, got a scalar");
  TORCH_CHECK(t.size(-1) == features, op, ": ", name, " must have last dim ", features, ", got shape ", t.sizes());
  int64_t tokens = 1;  // not reshape(-1, ...): features may be 0 (an empty index)
  for (int64_t i = 0; i + 1 < t.dim(); ++i) tokens *= t.size(i);
  return t.reshape({tokens, features}).contiguous();
}

std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t last) {
  auto s = t.sizes().vec();
  s.back() = last;
  return s;
}

void validate_index(const char* op, const at::Tensor& index, int64_t size, int64_t range_start) {
  TORCH_CHECK(index.scalar_type() == at::kLong, op, ": index must be int64, got ", index.scalar_type());
  check_dim(op, "index", index, 1);
  TORCH_CHECK(size >= 0, op, ": size must be >= 0, got ", size);
  const int64_t n = index.numel();
  TORCH_CHECK(range_start >= -1, op, ": range_start must be -1 (use index) or >= 0, got ", range_start);
  TORCH_CHECK(range_start < 0 || range_start + n <= size, op, ": range [range_start, range_start + k) = [",
              range_start, ", ", range_start + n, ") exceeds size ", size);
  if (n == 0) return;
  if (range_start >= 0) {
    auto want = at::arange(range_start, range_start + n, index.options());
    auto bad = (index != want).nonzero();
    if (bad.numel() > 0) {
      const int64_t j = bad[0][0].item<int64_t>();
      TORCH_CHECK(false, op, ": range_start = ", range_start, " declares index == [", range_start, ", ",
                  range_start + n, "), but index[", j, "] = ", index[j].item<int64_t>());
    }
    return;
  }
  const int64_t lo = index.min().item<int64_t>(), hi = index.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < size, op, ": index must lie in [0, ", size, "), got values in [", lo, ", ", hi, "]");
  if (n > 1) {
    auto bad = (index.slice(0, 1) <= index.slice(0, 0, n - 1)).nonzero();
    if (bad.numel() > 0) {
      const int64_t k = bad[0][0].item<int64_t>();
      const int64_t a = index[k].item<int64_t>(), b = index[k + 1].item<int64_t>();
      TORCH_CHECK(false, op, ": index must be sorted ascending and unique, but index[", k + 1, "] = ", b,
                  " follows index[", k, "] = ", a);
    }
  }
}

void check_linear_args(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor& weight,
                       const at::Tensor& delta, const at::Tensor& index, int64_t dim, int64_t range_start) {
  check_float(op, x_name, x);
  check_dim(op, "weight", weight, 2);
  check_same_dtype(op, "weight", weight, x, x_name);
  check_same_device(op, "weight", weight, x, x_name);
  TORCH_CHECK(dim == 0 || dim == 1, op, ": dim must be 0 (rows) or 1 (columns), got ", dim);
  check_index(op, index, x);
  check_float(op, "delta", delta);
  check_same_device(op, "delta", delta, x, x_name);
  TORCH_CHECK(delta.scalar_type() == at::kFloat || delta.scalar_type() == weight.scalar_type(), op,
              ": delta must be float32 or the weight's dtype (", weight.scalar_type(), "), got ",
              delta.scalar_type());
  const int64_t out = weight.size(0), in = weight.size(1), k = index.numel();
  const std::vector<int64_t> want = dim == 0 ? std::vector<int64_t>{k, in} : std::vector<int64_t>{out, k};
  TORCH_CHECK(delta.sizes() == at::IntArrayRef(want), op, ": delta must have shape ", at::IntArrayRef(want),
              " for dim=", dim, ", k=", k, " and weight ", weight.sizes(), ", got ", delta.sizes());
  const int64_t size = weight.size(dim);
  TORCH_CHECK(range_start >= -1, op, ": range_start must be -1 (use index) or >= 0, got ", range_start);
  TORCH_CHECK(range_start < 0 || range_start + k <= size, op, ": range [range_start, range_start + k) = [",
              range_start, ", ", range_start + k, ") exceeds weight.size(", dim, ") = ", size);
}

namespace {

// Structural check of the index on the CPU (sorted ascending, unique, in [0, size)), O(k). Returns a when the
// index is the range [a, a+k) (0 for an empty index), -1 otherwise.
int64_t check_index_values_cpu(const char* op, const at::Tensor& index, int64_t size) {
  auto idx_c = index.contiguous();
  const int64_t* idx = idx_c.const_data_ptr<int64_t>();
  const int64_t k = idx_c.numel();
  for (int64_t j = 0; j < k; ++j) {
    TORCH_CHECK(idx[j] >= 0 && idx[j] < size, op, ": index must lie in [0, ", size, "), got index[", j, "] = ",
                idx[j]);
    TORCH_CHECK(j == 0 || idx[j] > idx[j - 1], op, ": index must be sorted ascending and unique, but index[", j,
                "] = ", idx[j], " follows index[", j - 1, "] = ", idx[j - 1]);
  }
  if (k == 0) return 0;
  return idx[k - 1] - idx[0] == k - 1 ? idx[0] : -1;
}

// The range start when the index is a range, else -1 (the CPU ops validate the index here; an explicit
// range_start must agree with it: O(k), no sync on the CPU).
int64_t resolve_range_cpu(const char* op, const at::Tensor& index, int64_t size, int64_t range_start) {
  const int64_t a = check_index_values_cpu(op, index, size);
  if (range_start < 0) return a;
  if (a != range_start && index.numel() > 0) {
    auto idx_c = index.contiguous();
    const int64_t* p = idx_c.const_data_ptr<int64_t>();
    int64_t j = 0;
    while (p[j] == range_start + j) ++j;  // a mismatch exists: index is sorted unique but not [range_start, ...)
    TORCH_CHECK(false, op, ": range_start = ", range_start, " declares index == [", range_start, ", ",
                range_start + index.numel(), "), but index[", j, "] = ", p[j]);
  }
  return range_start;
}

void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  check_float(op, name, t);
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor here, got ", t.device());
}

// Token rows per parallel task: at::internal::GRAIN_SIZE elements each (these loops are memory bound; smaller
// tasks cost more in thread wake-ups than they save).
int64_t row_grain(int64_t k) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(k, 1)); }

// out[t, j] = x[t, idx[j]] (range: x[t, a + j]).
template <typename scalar_t>
void gather_rows(const scalar_t* x, int64_t ldx, const int64_t* idx, int64_t a, int64_t k, scalar_t* out,
                 int64_t T) {
  at::parallel_for(0, T, row_grain(k), [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const scalar_t* __restrict__ row = x + t * ldx;
      scalar_t* __restrict__ o = out + t * k;
      if (a >= 0) {
        std::memcpy(o, row + a, k * sizeof(scalar_t));
      } else {
        for (int64_t j = 0; j < k; ++j) o[j] = row[idx[j]];
      }
    }
  });
}

// y[t, idx[j]] += src[t, j] (range: y[t, a + j]), in the accumulate type, rounded once.
template <typename scalar_t>
void scatter_add_rows(const scalar_t* src, const int64_t* idx, int64_t a, int64_t k, scalar_t* y, int64_t ldy,
                      int64_t T) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, T, row_grain(k), [&](int64_t tb, int64_t te) {
    for (int64_t t = tb; t < te; ++t) {
      const scalar_t* __restrict__ s = src + t * k;
      scalar_t* __restrict__ row = y + t * ldy;
      if (a >= 0) {
        scalar_t* __restrict__ d = row + a;
        for (int64_t j = 0; j < k; ++j) d[j] = static_cast<scalar_t>(static_cast<acc_t>(d[j]) + static_cast<acc_t>(s[j]));
      } else {
        for (int64_t j = 0; j < k; ++j) {
          scalar_t& d = row[idx[j]];
          d = static_cast<scalar_t>(static_cast<acc_t>(d) + static_cast<acc_t>(s[j]));
        }
      }
    }
  });
}

// The Kernels of the CPU backend. The index was validated by the calling op; a range index takes the
// contiguous inner loop.
int64_t range_of(const at::Tensor& idx_c) {
  const int64_t k = idx_c.numel();
  const int64_t* p = idx_c.const_data_ptr<int64_t>();
  return k > 0 && p[k - 1] - p[0] == k - 1 ? p[0] : -1;
}

at::Tensor gather_cpu_kernel(const at::Tensor& x2d, const at::Tensor& index) {
  auto idx_c = index.contiguous();
  const int64_t T = x2d.size(0), F = x2d.size(1), k = idx_c.numel();
  auto out = at::empty({T, k}, x2d.options());
  if (T == 0 || k == 0) return out;
  PEFTCORE_DISPATCH_FLOATING(x2d.scalar_type(), "partial_gather", [&] {
    gather_rows<scalar_t>(x2d.const_data_ptr<scalar_t>(), F, idx_c.const_data_ptr<int64_t>(), range_of(idx_c), k,
                          out.mutable_data_ptr<scalar_t>(), T);
  });
  return out;
}

void scatter_add_into_cpu_kernel(const at::Tensor& y2d, const at::Tensor& src, const at::Tensor& index) {
  auto idx_c = index.contiguous();
  const int64_t T = y2d.size(0), F = y2d.size(1), k = idx_c.numel();
  if (T == 0 || k == 0) return;
  auto s = src.contiguous();
  PEFTCORE_DISPATCH_FLOATING(y2d.scalar_type(), "partial_scatter_add", [&] {
    scatter_add_rows<scalar_t>(s.const_data_ptr<scalar_t>(), idx_c.const_data_ptr<int64_t>(), range_of(idx_c), k,
                               y2d.mutable_data_ptr<scalar_t>(), F, T);
  });
}

const Kernels kCpuKernels{&gather_cpu_kernel, &scatter_add_into_cpu_kernel};

}  // namespace

// ------------------------------------------------------------------------------------------------------------
// The linear ops, backend independent (GEMMs through ATen: BLAS on CPU, cuBLAS on CUDA).
//
// Range path, index = [a, b). The selected block of every product is a strided view (x[:, a:b], g[:, a:b],
// y[:, a:b], grad_x[:, a:b]), so no gather, no scatter and no [T, k] temporary:
//   dim 1 forward   y = x W^T (+ bias);            y += x[:, a:b] delta^T                  (skinny GEMM, beta=1)
//   dim 0 forward   y = x W^T (+ bias);            y[:, a:b] += x delta^T                  (skinny GEMM into a view)
//   dim 0 grad_x    gx = g W;                       gx += g[:, a:b] delta
//   dim 1 grad_x    gx = g W;                       gx[:, a:b] += g delta
// The delta always enters as its own product (the GEMM accumulates in fp32 for half types and adds it to the
// dense result before one rounding). Folding it into the weight block first (W_sel + delta in W's dtype, then
// one GEMM per column block) rounds it away: with bf16 weights near 8 a delta under 0.03 vanishes. The K split
// and that N split also measured no faster on the CPU (BLAS re-packs the shared operand per block).
// General path: the dense GEMM with W, plus a k-wide GEMM through gather / scatter-add.
at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                          const at::Tensor& delta, const at::Tensor& index, int64_t dim, int64_t a,
                          const Kernels& kern) {
  constexpr const char* op = "partial_linear";
  const int64_t out = weight.size(0), in = weight.size(1), k = index.numel();
  auto x2d = flatten_tokens(op, "x", x, in);
  const int64_t T = x2d.size(0);
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    check_same_dtype(op, "bias", *bias, x, "x");
    check_same_device(op, "bias", *bias, x, "x");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, op, ": bias must have shape [", out, "], got ",
                bias->sizes());
  }
  auto dense = [&] { return (has_bias ? at::addmm(*bias, x2d, weight.t()) : at::mm(x2d, weight.t())).contiguous(); };
  at::Tensor y2d;
  if (a >= 0) {
    y2d = dense();
    if (k > 0 && T > 0) {
      auto d = delta.to(x.scalar_type());
      if (dim == 1) y2d.addmm_(x2d.narrow(1, a, k), d.t());
      else y2d.narrow(1, a, k).addmm_(x2d, d.t());
    }
  } else {
    y2d = dense();
    if (k > 0 && T > 0) {
      auto d = delta.to(x.scalar_type());
      if (dim == 1) y2d.addmm_(kern.gather(x2d, index), d.t());
      else kern.scatter_add_into(y2d, at::mm(x2d, d.t()), index);
    }
  }
  return y2d.view(with_last_dim(x, out));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_backward(const at::Tensor& grad_out, const at::Tensor& saved,
                                                               const at::Tensor& weight, const at::Tensor& delta,
                                                               const at::Tensor& index, int64_t dim,
                                                               std::array<bool, 3> mask, int64_t a,
                                                               const Kernels& kern) {
  constexpr const char* op = "partial_linear_backward";
  check_same_dtype(op, "saved", saved, grad_out, "grad_out");
  check_same_device(op, "saved", saved, grad_out, "grad_out");
  const int64_t out = weight.size(0), in = weight.size(1), k = index.numel();
  auto g2d = flatten_tokens(op, "grad_out", grad_out, out);
  // dim 1: saved = x[..., index] [..., k]; dim 0: saved = x [..., in].
  auto s2d = flatten_tokens(op, "saved", saved, dim == 1 ? k : in);
  TORCH_CHECK(saved.sizes().slice(0, saved.dim() - 1) == grad_out.sizes().slice(0, grad_out.dim() - 1), op,
              ": grad_out and saved must have the same leading (token) dims, got ", g2d.size(0), " tokens in ",
              grad_out.sizes(), " and ", s2d.size(0), " in ", saved.sizes());
  const int64_t T = g2d.size(0);
  at::Tensor gx, gd, gb;
  at::Tensor g_sel;  // dim 0: g[:, index] [T, k] (a view on the range path), for grad_x and grad_delta
  if (dim == 0 && (mask[1] || mask[0]))
    g_sel = a >= 0 ? g2d.narrow(1, a, k) : kern.gather(g2d, index);
  if (mask[0]) {
    gx = at::mm(g2d, weight).contiguous();
    if (k > 0 && T > 0) {
      auto d = delta.to(g2d.scalar_type());
      if (dim == 0) gx.addmm_(g_sel, d);
      else if (a >= 0) gx.narrow(1, a, k).addmm_(g2d, d);
      else kern.scatter_add_into(gx, at::mm(g2d, d), index);
    }
  }
  if (mask[1]) {
    // dim 1: g^T x_sel [out, k]; dim 0: g_sel^T x [k, in].
    gd = (dim == 1 ? at::mm(g2d.t(), s2d) : at::mm(g_sel.t(), s2d)).to(delta.scalar_type());
  }
  if (mask[2]) gb = g2d.sum(0);
  auto empty = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  return {mask[0] ? gx.view(with_last_dim(saved, in)) : empty(saved), mask[1] ? gd : empty(delta),
          mask[2] ? gb : empty(grad_out)};
}

namespace {

// ------------------------------------------------------------------------------------------------------------
// Ops (CPU).

at::Tensor partial_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              const at::Tensor& delta, const at::Tensor& index, int64_t dim, int64_t range_start) {
  constexpr const char* op = "partial_linear";
  check_cpu(op, "x", x);
  check_linear_args(op, "x", x, weight, delta, index, dim, range_start);
  const int64_t a = resolve_range_cpu(op, index, weight.size(dim), range_start);
  return linear_forward(x, weight, bias, delta, index, dim, a, kCpuKernels);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& saved, const at::Tensor& weight, const at::Tensor& delta,
    const at::Tensor& index, int64_t dim, std::array<bool, 3> mask, int64_t range_start) {
  constexpr const char* op = "partial_linear_backward";
  check_cpu(op, "grad_out", grad_out);
  check_linear_args(op, "grad_out", grad_out, weight, delta, index, dim, range_start);
  const int64_t a = resolve_range_cpu(op, index, weight.size(dim), range_start);
  return linear_backward(grad_out, saved, weight, delta, index, dim, mask, a, kCpuKernels);
}

at::Tensor partial_gather_cpu(const at::Tensor& x, const at::Tensor& index) {
  constexpr const char* op = "partial_gather";
  check_cpu(op, "x", x);
  check_index(op, index, x);
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dim, got a scalar");
  const int64_t F = x.size(-1);
  check_index_values_cpu(op, index, F);
  auto x2d = flatten_tokens(op, "x", x, F);
  return gather_cpu_kernel(x2d, index).view(with_last_dim(x, index.numel()));
}

at::Tensor partial_scatter_add_cpu(const at::Tensor& src, const at::Tensor& index, int64_t size) {
  constexpr const char* op = "partial_scatter_add";
  check_cpu(op, "src", src);
  check_index(op, index, src);
  TORCH_CHECK(size >= 0, op, ": size must be >= 0, got ", size);
  const int64_t k = index.numel();
  auto s2d = flatten_tokens(op, "src", src, k);  // "src must have last dim k"
  check_index_values_cpu(op, index, size);
  auto y2d = at::zeros({s2d.size(0), size}, src.options());
  scatter_add_into_cpu_kernel(y2d, s2d, index);
  return y2d.view(with_last_dim(src, size));
}

void partial_validate_impl(const at::Tensor& index, int64_t size, int64_t range_start) {
  validate_index("partial_validate", index, size, range_start);
}

// The CUDA launchers' plan (partial_plan.h), without a GPU.
std::vector<int64_t> partial_vec_plan(int64_t tokens, int64_t k, int64_t elem_size, int64_t address) {
  constexpr const char* op = "partial_vec_plan";
  TORCH_CHECK(tokens >= 0 && k >= 0, op, ": tokens and k must be >= 0, got ", tokens, " and ", k);
  TORCH_CHECK(elem_size > 0 && address >= 0, op, ": elem_size must be > 0 and address >= 0, got ", elem_size, " and ",
              address);
  const plan::Launch l = plan::rows(tokens, k, elem_size, static_cast<uint64_t>(address));
  return {l.vec, l.rows.tx, l.rows.ty, l.rows.grid_x, l.rows.grid_y};
}

}  // namespace

TORCH_LIBRARY_IMPL(peftcore, CPU, m) {
  m.impl("partial_linear", &partial_linear_cpu);
  m.impl("partial_linear_backward", &partial_linear_backward_cpu);
  m.impl("partial_gather", &partial_gather_cpu);
  m.impl("partial_scatter_add", &partial_scatter_add_cpu);
}

// Validation is device independent (ATen ops + a host sync), so it is registered once for every backend.
TORCH_LIBRARY_IMPL(peftcore, CompositeExplicitAutograd, m) {
  m.impl("partial_validate", &partial_validate_impl);
}

// Pure host planning (no tensors): one kernel for every backend.
TORCH_LIBRARY_IMPL(peftcore, CompositeImplicitAutograd, m) {
  m.impl("partial_vec_plan", &partial_vec_plan);
}

}  // namespace peftcore::partial
