// sparse_delta CUDA glue: argument checks (shared with the CPU kernels, sparse_delta.h), the CSR view, dense
// products through ATen (cuBLAS), and the plain-CUDA launchers of sparse_delta.cu. No host sync anywhere, so
// every op here can be captured in a CUDA graph. sparse_delta_validate is registered for all backends by the
// CPU file.
//
// Validation: shapes, dtypes and devices are checked as on CPU; the *values* of indices / exclude / a passed CSR
// view are not (that needs a host sync): the kernels clamp row pointers to [0, nnz], skip every entry outside its
// row / buffer and give a csc_perm entry outside [0, nnz) the value 0, so malformed indices or a CSR view that does
// not belong to them give wrong numbers, never an out-of-bounds access. sparse_delta_validate checks indices; a
// CSR view is trusted to be sparse_delta_csr(indices, out, in) of the indices passed with it.
// CSR view: passed by the caller (built once per delta by sparse_delta_csr), else built here per call (row_ptr:
// one searchsorted; S's CSC for grad_x: a sort and two searchsorteds).
// Determinism: grad_x is always the forward kernel on S^T (fixed summation order per output, no atomics). Under
// torch.use_deterministic_algorithms(True) the SDDMM runs one block per row block over all tokens (no atomics).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>

#include "checks.h"
#include "cuda_glue.h"
#include "sparse_delta/sparse_delta.h"
#include "sparse_delta/sparse_delta_launch.h"

namespace peftcore::sparse_delta {
namespace {

namespace cu = peftcore::sparse_delta::cuda;

cu::DType kernel_dtype(at::ScalarType t) { return peftcore::kernel_dtype("sparse_delta", t); }


using OptT = std::optional<at::Tensor>;

// The CSR view of S (or S^T) for one call. Holds the tensors the launch params point into (freed back to the
// caching allocator after the call, which is safe: later work on the same stream is ordered after the kernels).
struct Delta {
  at::Tensor idx, rp, vals;
  cu::DeltaParams p{};
};

// M [rows, cols] given by flat indices (r*cols + c) and row pointers; `vals` fp32 or undefined (SDDMM needs only
// the structure).
Delta make_view(const at::Tensor& indices, const at::Tensor& rp, const at::Tensor& vals, int64_t rows, int64_t cols,
                at::ScalarType dtype, double scale) {
  Delta d;
  d.idx = indices.contiguous();
  if (rp.defined()) d.rp = rp.contiguous();
  d.vals = vals;
  d.p.dtype = kernel_dtype(dtype);
  d.p.index64 = d.idx.scalar_type() == at::kLong;
  d.p.indices = d.idx.const_data_ptr();
  d.p.row_ptr = rp.defined() ? d.rp.const_data_ptr<int64_t>() : nullptr;
  d.p.values = vals.defined() ? vals.const_data_ptr<float>() : nullptr;
  d.p.nnz = d.idx.numel();
  d.p.out_features = rows;
  d.p.in_features = cols;
  d.p.scale = static_cast<float>(scale);
  d.p.deterministic = at::globalContext().deterministicAlgorithms();
  return d;
}

// S [out, in] with its row pointers (given or built); `values` may be null (SDDMM).
Delta make_delta(const at::Tensor& indices, const at::Tensor* values, int64_t out, int64_t in, at::ScalarType dtype,
                 double scale, const OptT& row_ptr_arg) {
  checked_numel("sparse_delta", "out_features", out, "in_features", in);
  auto rp = given(row_ptr_arg) ? *row_ptr_arg : row_ptr(indices, out, in);
  at::Tensor vals;
  if (values != nullptr) vals = values->to(at::kFloat).contiguous();
  return make_view(indices, rp, vals, out, in, dtype, scale);
}

// gx2d [T, in] += scale * g2d [T, out] @ S: the forward kernel on S^T [in, out], whose CSR is S's CSC view (given,
// or built here: a sort, no host sync); S's values are permuted into it by one gather launch.
void spmm_t_into(const at::Tensor& indices, const at::Tensor& values, int64_t out, int64_t in, at::ScalarType dtype,
                 double scale, const OptT& csc_ptr, const OptT& csc_idx, const OptT& csc_perm, const at::Tensor& g2d,
                 at::Tensor& gx2d) {
  const int64_t tokens = g2d.size(0), nnz = indices.numel();
  if (tokens == 0 || out == 0 || in == 0 || nnz == 0) return;
  at::Tensor cp, ci, perm;
  if (given(csc_ptr)) {
    cp = *csc_ptr, ci = *csc_idx, perm = csc_perm->contiguous();
  } else {
    auto v = build_csr(indices, out, in);
    cp = v[1], ci = v[2], perm = v[3];
  }
  auto vals = values.contiguous();
  auto tvals = at::empty({nnz}, values.options().dtype(at::kFloat));
  cu::gather_values(perm.const_data_ptr<int64_t>(), vals.const_data_ptr(), kernel_dtype(vals.scalar_type()), nnz,
                    tvals.mutable_data_ptr<float>(), current_stream());
  auto dt = make_view(ci, cp, tvals, in, out, dtype, scale);
  cu::spmm_accumulate(dt.p, g2d.const_data_ptr(), gx2d.mutable_data_ptr(), tokens, current_stream());
}

// ------------------------------------------------------------------------------------------------------------
at::Tensor sparse_delta_spmm_cuda(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& values,
                                  int64_t out_features, double scale, const OptT& row_ptr) {
  constexpr const char* op = "sparse_delta_spmm";
  check_cuda_activation(op, "x", x);
  check_delta(op, indices, values, x);
  const int64_t in = last_dim(op, "x", x);
  checked_numel(op, "out_features", out_features, "in_features", in);
  check_row_ptr(op, row_ptr, indices, out_features);
  const c10::cuda::CUDAGuard guard(x.device());
  auto x2d = flatten_tokens(op, "x", x, in);
  auto y2d = at::zeros({x2d.size(0), out_features}, x.options());
  auto d = make_delta(indices, &values, out_features, in, x.scalar_type(), scale, row_ptr);
  cu::spmm_accumulate(d.p, x2d.const_data_ptr(), y2d.mutable_data_ptr(), x2d.size(0), current_stream());
  return y2d.view(with_last_dim(x, out_features));
}

at::Tensor sparse_delta_spmm_t_cuda(const at::Tensor& grad, const at::Tensor& indices, const at::Tensor& values,
                                    int64_t in_features, double scale, const OptT& csc_ptr, const OptT& csc_idx,
                                    const OptT& csc_perm) {
  constexpr const char* op = "sparse_delta_spmm_t";
  check_cuda_activation(op, "grad", grad);
  check_delta(op, indices, values, grad);
  const int64_t out = last_dim(op, "grad", grad);
  checked_numel(op, "out_features", out, "in_features", in_features);
  check_csc(op, csc_ptr, csc_idx, csc_perm, indices, in_features);
  const c10::cuda::CUDAGuard guard(grad.device());
  auto g2d = flatten_tokens(op, "grad", grad, out);
  auto gx2d = at::zeros({g2d.size(0), in_features}, grad.options());
  spmm_t_into(indices, values, out, in_features, grad.scalar_type(), scale, csc_ptr, csc_idx, csc_perm, g2d, gx2d);
  return gx2d.view(with_last_dim(grad, in_features));
}

at::Tensor sparse_delta_sddmm_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& indices,
                                   double scale, std::optional<at::ScalarType> out_dtype, const OptT& row_ptr) {
  constexpr const char* op = "sparse_delta_sddmm";
  check_cuda_activation(op, "grad", grad);
  check_cuda_activation(op, "x", x);
  check_indices(op, indices, grad);
  TORCH_CHECK(!out_dtype.has_value() || is_float_dtype(*out_dtype), op,
              ": out_dtype must be float32, float16, bfloat16 or float64, got ", *out_dtype);
  const c10::cuda::CUDAGuard guard(grad.device());
  auto [g2d, x2d] = token_pair(op, "grad", grad, "x", x);
  const int64_t out = g2d.size(1), in = x2d.size(1);
  check_row_ptr(op, row_ptr, indices, out);
  auto d = make_delta(indices, nullptr, out, in, grad.scalar_type(), scale, row_ptr);
  auto gv = at::zeros({d.p.nnz}, grad.options().dtype(at::kFloat));
  cu::sddmm(d.p, g2d.const_data_ptr(), x2d.const_data_ptr(), gv.mutable_data_ptr<float>(), g2d.size(0), current_stream());
  return gv.to(out_dtype.value_or(at::kFloat));
}

at::Tensor sparse_delta_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                    const at::Tensor& indices, const at::Tensor& values, double scale,
                                    const OptT& row_ptr, const OptT& csc_ptr, const OptT& csc_idx,
                                    const OptT& csc_perm) {
  constexpr const char* op = "sparse_delta_linear";
  check_cuda_activation(op, "x", x);
  check_weight(op, weight, bias, x);
  check_delta(op, indices, values, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t out = weight.size(0), in = weight.size(1);
  check_row_ptr(op, row_ptr, indices, out);
  check_csc(op, csc_ptr, csc_idx, csc_perm, indices, in);
  auto x2d = flatten_tokens(op, "x", x, in);
  auto y2d = dense_forward(x2d, weight, bias);
  auto d = make_delta(indices, &values, out, in, x.scalar_type(), scale, row_ptr);
  cu::spmm_accumulate(d.p, x2d.const_data_ptr(), y2d.mutable_data_ptr(), x2d.size(0), current_stream());
  return y2d.view(with_last_dim(x, out));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_delta_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& indices,
    const at::Tensor& values, double scale, std::array<bool, 3> mask, const OptT& row_ptr, const OptT& csc_ptr,
    const OptT& csc_idx, const OptT& csc_perm) {
  constexpr const char* op = "sparse_delta_linear_backward";
  check_cuda_activation(op, "grad_out", grad_out);
  check_weight(op, weight, std::nullopt, x);
  check_delta(op, indices, values, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(grad_out.dim() >= 1 && grad_out.size(-1) == out, op, ": grad_out must have last dim ", out,
              ", got shape ", grad_out.sizes());
  auto [g2d, x2d] = token_pair(op, "grad_out", grad_out, "x", x);
  TORCH_CHECK(x2d.size(1) == in, op, ": x must have last dim ", in, ", got shape ", x.sizes());
  check_row_ptr(op, row_ptr, indices, out);
  check_csc(op, csc_ptr, csc_idx, csc_perm, indices, in);
  const int64_t tokens = g2d.size(0);
  at::Tensor gx, gv, gb;
  if (mask[0]) {
    gx = at::mm(g2d, weight).contiguous();  // dense part of grad_x; the sparse part is added in place
    spmm_t_into(indices, values, out, in, x.scalar_type(), scale, csc_ptr, csc_idx, csc_perm, g2d, gx);
  }
  if (mask[1]) {
    auto d = make_delta(indices, nullptr, out, in, x.scalar_type(), scale, row_ptr);
    auto gv32 = at::zeros({d.p.nnz}, x.options().dtype(at::kFloat));
    cu::sddmm(d.p, g2d.const_data_ptr(), x2d.const_data_ptr(), gv32.mutable_data_ptr<float>(), tokens, current_stream());
    gv = gv32.to(values.scalar_type());
  }
  if (mask[2]) gb = g2d.sum(0);
  auto empty = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  return {mask[0] ? gx.view(x.sizes()) : empty(x), mask[1] ? gv : empty(values), mask[2] ? gb : empty(weight)};
}

void merge_into(const char* op, at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values,
                double scale) {
  check_cuda_activation(op, "weight", weight);
  check_dim(op, "weight", weight, 2);
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous, got strides ", weight.strides());
  check_delta(op, indices, values, weight);
  const c10::cuda::CUDAGuard guard(weight.device());
  checked_numel(op, "out_features", weight.size(0), "in_features", weight.size(1));
  // merge needs no CSR view: one thread per 4 nonzeros, the flat index is the address
  auto d = make_view(indices, at::Tensor(), values.to(at::kFloat).contiguous(),
                     weight.size(0), weight.size(1), weight.scalar_type(), scale);
  cu::merge(d.p, weight.mutable_data_ptr(), current_stream());
}

void sparse_delta_merge__cuda(at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values, double scale) {
  merge_into("sparse_delta_merge_", weight, indices, values, scale);
}

at::Tensor sparse_delta_merge_cuda(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values,
                                   double scale) {
  constexpr const char* op = "sparse_delta_merge";
  check_cuda_activation(op, "weight", weight);
  check_dim(op, "weight", weight, 2);
  auto w = weight.clone(at::MemoryFormat::Contiguous);
  merge_into(op, w, indices, values, scale);
  return w;
}

// Top-k of |grad^T x| outside `exclude`, tile by tile over rows of the [out, in] score matrix: each tile
// (<= kTopkTileElems scores) is one fp32 GEMM on a row slice, masked (excluded -> -1), and merged into a
// running candidate set of k with at::topk over cat(candidates, tile). Unlike the CPU version, `exclude` is not
// checked for order and range here (that needs a host sync; out-of-range entries are ignored). NaN scores rank
// first (at::topk treats NaN as the largest value), as on CPU; ties may resolve to a different index than on CPU.
constexpr int64_t kTopkTileElems = int64_t(1) << 22;

std::tuple<at::Tensor, at::Tensor> sparse_delta_topk_grad_cuda(const at::Tensor& grad, const at::Tensor& x, int64_t k,
                                                               const std::optional<at::Tensor>& exclude) {
  constexpr const char* op = "sparse_delta_topk_grad";
  check_cuda_activation(op, "grad", grad);
  check_cuda_activation(op, "x", x);
  const c10::cuda::CUDAGuard guard(grad.device());
  auto [g2d, x2d] = token_pair(op, "grad", grad, "x", x);
  const int64_t out = g2d.size(1), in = x2d.size(1);
  at::Tensor excl;
  const int64_t numel = checked_numel(op, "out_features", out, "in_features", in);
  if (exclude.has_value() && exclude->defined()) {
    check_indices(op, *exclude, grad, "exclude");
    if (exclude->numel() > 0) excl = exclude->to(at::kLong).contiguous();
  }
  const int64_t n_excl = excl.defined() ? excl.numel() : 0;
  const int64_t avail = numel - n_excl;
  TORCH_CHECK(k >= 0 && k <= avail, op, ": k must be in [0, ", avail, "] (", out, "*", in, " positions, ", n_excl,
              " excluded), got ", k);
  auto long_opts = grad.options().dtype(at::kLong);
  auto float_opts = grad.options().dtype(at::kFloat);
  if (k == 0) return {at::empty({0}, long_opts), at::empty({0}, float_opts)};
  auto gT = g2d.to(at::kFloat).t();  // [out, T]
  auto xf = x2d.to(at::kFloat);      // [T, in]
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(out, kTopkTileElems / std::max<int64_t>(in, 1)));
  at::Tensor cand_s = at::empty({0}, float_opts), cand_i = at::empty({0}, long_opts);
  for (int64_t r0 = 0; r0 < out; r0 += rows) {
    const int64_t nr = std::min(rows, out - r0), flat0 = r0 * in, n = nr * in;
    auto tile = at::mm(gT.slice(0, r0, r0 + nr), xf).contiguous();  // [nr, in] fp32
    auto scores = at::empty({n}, float_opts);
    cu::mask_abs_excluded(tile.const_data_ptr<float>(), n, flat0, n_excl ? excl.const_data_ptr<int64_t>() : nullptr,
                          n_excl, scores.mutable_data_ptr<float>(), current_stream());
    const int64_t nc = cand_s.numel();
    auto pool = nc ? at::cat({cand_s, scores}) : scores;
    auto [vals, pos] = at::topk(pool, std::min<int64_t>(k, pool.numel()), 0, /*largest=*/true, /*sorted=*/false);
    // Position -> flat index: the first nc pool entries are the old candidates, the rest this tile.
    auto flat = pos + (flat0 - nc);
    if (nc) flat = at::where(pos < nc, cand_i.index_select(0, pos.clamp_max(nc - 1)), flat);
    cand_s = vals;
    cand_i = flat;
  }
  auto [sorted_i, perm] = at::sort(cand_i);
  return {sorted_i, cand_s.index_select(0, perm)};
}

}  // namespace

TORCH_LIBRARY_IMPL(peftcore, CUDA, m) {
  m.impl("sparse_delta_linear", &sparse_delta_linear_cuda);
  m.impl("sparse_delta_linear_backward", &sparse_delta_linear_backward_cuda);
  m.impl("sparse_delta_spmm", &sparse_delta_spmm_cuda);
  m.impl("sparse_delta_spmm_t", &sparse_delta_spmm_t_cuda);
  m.impl("sparse_delta_sddmm", &sparse_delta_sddmm_cuda);
  m.impl("sparse_delta_merge_", &sparse_delta_merge__cuda);
  m.impl("sparse_delta_merge", &sparse_delta_merge_cuda);
  m.impl("sparse_delta_topk_grad", &sparse_delta_topk_grad_cuda);
}

}  // namespace peftcore::sparse_delta
