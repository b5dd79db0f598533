// token_elim CPU kernels (token gather / scatter-add, the partial-save MLP's elementwise pieces), the argument
// checks and the MLP forward / backward shared with the CUDA glue (token_elim_shared.h), and token_block_scores
// (registered for every backend: a reduction of sparse_attn's attn_block_pool op).
//
// Layout and math. Token ops see x as [B, L, F] row-major (trailing dims flattened). A task is one kept row
// (b, j): gather copies F contiguous elements from x[b, keep[b, j]], scatter-add adds F contiguous elements into
// out[b, keep[b, j]] in the accumulate type, rounded once. Kept rows of one batch are unique, so the scatter needs
// no atomics; (b, j) rows go to threads in blocks of ~GRAIN_SIZE elements.
//
// MLP: the three GEMMs are ATen (BLAS); silu(g) * u, the column gather of the kept channels and the backward's
// dg = da * u * silu'(g), du = da * silu(g) are row-parallel loops here, in the accumulate type.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>

#include "checks.h"
#include "dispatch.h"
#include "token_elim/token_elim.h"
#include "token_elim/token_elim_plan.h"
#include "token_elim/token_elim_shared.h"

namespace peftcore::token_elim {

// ------------------------------------------------------------------------------------------------------------
// Shared checks (also used by the CUDA glue).

TokenDims check_token_args(const char* op, const at::Tensor& x, const at::Tensor& keep_index,
                           const at::Tensor* src) {
  const char* xname = src ? "residual" : "x";
  check_float(op, xname, x);
  TORCH_CHECK(x.dim() >= 2, op, ": ", xname, " must be [B, L, ...] (at least 2-D), got shape ", x.sizes());
  TORCH_CHECK(keep_index.scalar_type() == at::kLong, op, ": keep_index must be int64, got ",
              keep_index.scalar_type());
  check_dim(op, "keep_index", keep_index, 2);
  check_same_device(op, "keep_index", keep_index, x, xname);
  const int64_t B = x.size(0), L = x.size(1), K = keep_index.size(1);
  TORCH_CHECK(keep_index.size(0) == B, op, ": keep_index must have batch size ", B, " (", xname, " is ",
              x.sizes(), "), got shape ", keep_index.sizes());
  TORCH_CHECK(K <= L, op, ": keep_index keeps ", K, " tokens of a sequence of ", L);
  int64_t F = 1;
  for (int64_t d = 2; d < x.dim(); ++d) F *= x.size(d);
  if (src) {
    check_same_dtype(op, "src", *src, x, xname);
    check_same_device(op, "src", *src, x, xname);
    auto want = x.sizes().vec();
    want[1] = K;
    TORCH_CHECK(src->sizes() == at::IntArrayRef(want), op, ": src must have shape ", at::IntArrayRef(want),
                " (residual ", x.sizes(), " with K = ", K, " tokens), got ", src->sizes());
  }
  return {B, L, K, F};
}

void check_keep_values_cpu(const char* op, const at::Tensor& keep_index, int64_t L, const char* name) {
  auto kc = keep_index.contiguous();
  const int64_t* p = kc.const_data_ptr<int64_t>();
  const int64_t B = kc.size(0), K = kc.size(1);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* r = p + b * K;
    for (int64_t j = 0; j < K; ++j) {
      TORCH_CHECK(r[j] >= 0 && r[j] < L, op, ": ", name, " must lie in [0, ", L, "), got ", name, "[", b, ", ", j,
                  "] = ", r[j]);
      TORCH_CHECK(j == 0 || r[j] > r[j - 1], op, ": ", name, " rows must be sorted ascending and unique, but ", name,
                  "[", b, ", ", j, "] = ", r[j], " follows ", r[j - 1]);
    }
  }
}

MlpDims check_mlp_args(const char* op, const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up,
                       const at::Tensor& w_down, int64_t keep_channels,
                       const std::optional<at::Tensor>& channel_index, const char* x_name) {
  check_float(op, x_name, x);
  TORCH_CHECK(x.dim() >= 1, op, ": ", x_name, " must have at least 1 dim, got a scalar");
  check_dim(op, "w_gate", w_gate, 2);
  check_dim(op, "w_up", w_up, 2);
  check_dim(op, "w_down", w_down, 2);
  for (auto [name, w] : {std::pair<const char*, const at::Tensor*>{"w_gate", &w_gate}, {"w_up", &w_up},
                         {"w_down", &w_down}}) {
    check_same_dtype(op, name, *w, x, x_name);
    check_same_device(op, name, *w, x, x_name);
  }
  const int64_t H = x.size(-1), I = w_gate.size(0);
  TORCH_CHECK(w_gate.size(1) == H, op, ": w_gate must be [I, ", H, "] for ", x_name, "'s last dim ", H, ", got ",
              w_gate.sizes());
  TORCH_CHECK(w_up.sizes() == w_gate.sizes(), op, ": w_up must have w_gate's shape ", w_gate.sizes(), ", got ",
              w_up.sizes());
  TORCH_CHECK(w_down.size(0) == H && w_down.size(1) == I, op, ": w_down must be [", H, ", ", I, "], got ",
              w_down.sizes());
  int64_t C = keep_channels;
  if (channel_index.has_value()) {
    const auto& ci = *channel_index;
    TORCH_CHECK(ci.scalar_type() == at::kLong, op, ": channel_index must be int64, got ", ci.scalar_type());
    check_dim(op, "channel_index", ci, 1);
    check_same_device(op, "channel_index", ci, x, x_name);
    TORCH_CHECK(ci.numel() == keep_channels, op, ": channel_index has ", ci.numel(),
                " entries but keep_channels = ", keep_channels);
  }
  TORCH_CHECK(C >= 0 && C <= I, op, ": keep_channels must be in [0, ", I, "], got ", C);
  int64_t T = 1;
  for (int64_t d = 0; d + 1 < x.dim(); ++d) T *= x.size(d);
  return {T, H, I, C};
}

MlpDims check_mlp_backward_args(const char* op, const at::Tensor& grad_y, const at::Tensor& gate_kept,
                                const at::Tensor& up_kept, const at::Tensor& channel_index, const at::Tensor& w_gate,
                                const at::Tensor& w_up, const at::Tensor& w_down,
                                const std::optional<at::Tensor>& grad_gate_kept,
                                const std::optional<at::Tensor>& grad_up_kept) {
  const auto d = check_mlp_args(op, grad_y, w_gate, w_up, w_down, channel_index.numel(), channel_index, "grad_y");
  auto want = grad_y.sizes().vec();
  want.back() = d.C;
  auto check_kept = [&](const char* name, const at::Tensor& t) {
    check_same_dtype(op, name, t, grad_y, "grad_y");
    check_same_device(op, name, t, grad_y, "grad_y");
    TORCH_CHECK(t.sizes() == at::IntArrayRef(want), op, ": ", name, " must have shape ", at::IntArrayRef(want),
                " (grad_y ", grad_y.sizes(), " with C = ", d.C, " kept channels), got ", t.sizes());
  };
  check_kept("gate_kept", gate_kept);
  check_kept("up_kept", up_kept);
  if (grad_gate_kept.has_value() && grad_gate_kept->defined()) check_kept("grad_gate_kept", *grad_gate_kept);
  if (grad_up_kept.has_value() && grad_up_kept->defined()) check_kept("grad_up_kept", *grad_up_kept);
  return d;
}

void check_block_scores_args(const char* op, const at::Tensor& q, const at::Tensor& k, int64_t block_size,
                             std::optional<double> scale) {
  check_float(op, "q", q);
  check_dim(op, "q", q, 4);
  check_dim(op, "k", k, 4);
  check_same_dtype(op, "k", k, q, "q");
  check_same_device(op, "k", k, q, "q");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(3) == q.size(3), op, ": k must be [", q.size(0), ", Hkv, Lk, ",
              q.size(3), "] for q of shape ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(q.size(3) >= 1, op, ": head dim must be >= 1, got q of shape ", q.sizes());
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, op,
              ": the query heads must be a multiple of the key heads (Hq % Hkv == 0), got Hq = ", q.size(1),
              " and Hkv = ", k.size(1));
  TORCH_CHECK(block_size > 0, op, ": block_size must be > 0, got ", block_size);
  TORCH_CHECK(!scale.has_value() || std::isfinite(*scale), op, ": scale must be finite, got ", scale.value_or(0.0));
}

at::Tensor select_channels(const at::Tensor& act2d, int64_t keep_channels,
                           const std::optional<at::Tensor>& channel_index) {
  if (channel_index.has_value()) return channel_index->clone(at::MemoryFormat::Contiguous);  // an output: never alias
  const auto acc = act2d.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto score = act2d.abs().sum(0, /*keepdim=*/false, acc);
  auto top = std::get<1>(at::topk(score, keep_channels, /*dim=*/0, /*largest=*/true, /*sorted=*/false));
  return std::get<0>(at::sort(top)).contiguous();
}

// ------------------------------------------------------------------------------------------------------------
// The MLP, backend independent: ATen GEMMs around the backend's elementwise kernels.

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mlp_forward(
    const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
    const MlpDims& d, const std::optional<at::Tensor>& channel_index, const MlpKernels& kern) {
  auto x2d = x.reshape({d.T, d.H}).contiguous();
  auto g = at::mm(x2d, w_gate.t());
  auto u = at::mm(x2d, w_up.t());
  auto a = kern.silu_mul(g, u);
  auto idx = select_channels(a, d.C, channel_index);
  auto y = at::mm(a, w_down.t());
  auto gk = kern.gather_cols(g, idx);
  auto uk = kern.gather_cols(u, idx);
  auto shape = x.sizes().vec();
  auto y_shape = shape;
  shape.back() = d.C;
  return {y.view(y_shape), gk.view(shape), uk.view(shape), idx};
}

at::Tensor mlp_backward(const at::Tensor& grad_y, const at::Tensor& gate_kept, const at::Tensor& up_kept,
                        const at::Tensor& channel_index, const at::Tensor& w_gate, const at::Tensor& w_up,
                        const at::Tensor& w_down, const std::optional<at::Tensor>& grad_gate_kept,
                        const std::optional<at::Tensor>& grad_up_kept, const MlpKernels& kern) {
  const int64_t H = w_down.size(0), C = channel_index.numel();
  int64_t T = 1;  // not numel / H: H may be 0
  for (int64_t i = 0; i + 1 < grad_y.dim(); ++i) T *= grad_y.size(i);
  auto gy = grad_y.reshape({T, H}).contiguous();
  auto gk = gate_kept.reshape({T, C}).contiguous();
  auto uk = up_kept.reshape({T, C}).contiguous();
  // CUDA does not read channel_index on the host: clamp it for the weight gathers (index_select would trip a
  // device assert on a bad entry); the CPU ops validated it.
  const auto ci = channel_index.is_cpu() ? channel_index : channel_index.clamp(0, std::max<int64_t>(w_gate.size(0) - 1, 0));
  auto da = at::mm(gy, w_down.index_select(1, ci));  // [T, C]
  auto opt2d = [&](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
    if (!t.has_value() || !t->defined()) return std::nullopt;
    return t->reshape({T, C}).contiguous();
  };
  auto [dg, du] = kern.silu_mul_backward(da, gk, uk, opt2d(grad_gate_kept), opt2d(grad_up_kept));
  auto dx = at::mm(dg, w_gate.index_select(0, ci));
  dx.addmm_(du, w_up.index_select(0, ci));
  auto shape = grad_y.sizes().vec();
  return dx.view(shape);
}

namespace {

void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor here, got ", t.device());
}

int64_t grain_rows(int64_t f) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(f, 1)); }

// out[b, j, :] = x[b, keep[b, j], :] for contiguous x [B, L, F].
template <typename scalar_t>
void gather_rows(const scalar_t* x, const int64_t* keep, scalar_t* out, const TokenDims& d) {
  at::parallel_for(0, d.B * d.K, grain_rows(d.F), [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const int64_t b = r / d.K;
      std::memcpy(out + r * d.F, x + (b * d.L + keep[r]) * d.F, d.F * sizeof(scalar_t));
    }
  });
}

// out[b, keep[b, j], :] += src[b, j, :] for contiguous out [B, L, F] (kept rows unique per batch: no races).
template <typename scalar_t>
void scatter_add_rows(const scalar_t* src, const int64_t* keep, scalar_t* out, const TokenDims& d) {
  using acc_t = at::opmath_type<scalar_t>;
  at::parallel_for(0, d.B * d.K, grain_rows(d.F), [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const int64_t b = r / d.K;
      const scalar_t* __restrict__ s = src + r * d.F;
      scalar_t* __restrict__ o = out + (b * d.L + keep[r]) * d.F;
      for (int64_t f = 0; f < d.F; ++f) o[f] = static_cast<scalar_t>(static_cast<acc_t>(o[f]) + static_cast<acc_t>(s[f]));
    }
  });
}

template <typename acc_t>
inline acc_t sigmoid(acc_t z) { return acc_t(1) / (acc_t(1) + std::exp(-z)); }

at::Tensor silu_mul_cpu(const at::Tensor& g, const at::Tensor& u) {
  auto a = at::empty_like(g);
  const int64_t T = g.size(0), I = g.size(1);
  if (a.numel() == 0) return a;
  PEFTCORE_DISPATCH_FLOATING(g.scalar_type(), "token_mlp_partial_save", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* up = u.const_data_ptr<scalar_t>();
    scalar_t* ap = a.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T, grain_rows(I), [&](int64_t tb, int64_t te) {
      for (int64_t i = tb * I; i < te * I; ++i) {
        const acc_t z = static_cast<acc_t>(gp[i]);
        ap[i] = static_cast<scalar_t>(z * sigmoid(z) * static_cast<acc_t>(up[i]));
      }
    });
  });
  return a;
}

at::Tensor gather_cols_cpu(const at::Tensor& t2d, const at::Tensor& idx) {
  const int64_t T = t2d.size(0), I = t2d.size(1), C = idx.numel();
  auto out = at::empty({T, C}, t2d.options());
  if (T == 0 || C == 0) return out;
  auto ic = idx.contiguous();
  PEFTCORE_DISPATCH_FLOATING(t2d.scalar_type(), "token_mlp_partial_save", [&] {
    const scalar_t* src = t2d.const_data_ptr<scalar_t>();
    const int64_t* ip = ic.const_data_ptr<int64_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T, grain_rows(C), [&](int64_t tb, int64_t te) {
      for (int64_t t = tb; t < te; ++t)
        for (int64_t c = 0; c < C; ++c) op[t * C + c] = src[t * I + ip[c]];
    });
  });
  return out;
}

// dg = da * u * silu'(g) (+ grad_gate_kept), du = da * silu(g) (+ grad_up_kept); silu'(z) = s (1 + z (1 - s)).
std::tuple<at::Tensor, at::Tensor> silu_mul_backward_cpu(const at::Tensor& da, const at::Tensor& gk,
                                                         const at::Tensor& uk, const std::optional<at::Tensor>& ggk,
                                                         const std::optional<at::Tensor>& guk) {
  auto dg = at::empty_like(gk), du = at::empty_like(uk);
  const int64_t T = gk.size(0), C = gk.size(1);
  if (dg.numel() == 0) return {dg, du};
  PEFTCORE_DISPATCH_FLOATING(gk.scalar_type(), "token_mlp_partial_save_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* dap = da.const_data_ptr<scalar_t>();
    const scalar_t* gp = gk.const_data_ptr<scalar_t>();
    const scalar_t* up = uk.const_data_ptr<scalar_t>();
    const scalar_t* ggp = ggk ? ggk->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* gup = guk ? guk->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* dgp = dg.mutable_data_ptr<scalar_t>();
    scalar_t* dup = du.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, T, grain_rows(C), [&](int64_t tb, int64_t te) {
      for (int64_t i = tb * C; i < te * C; ++i) {
        const acc_t z = static_cast<acc_t>(gp[i]), s = sigmoid(z), a = static_cast<acc_t>(dap[i]);
        acc_t g = a * static_cast<acc_t>(up[i]) * s * (acc_t(1) + z * (acc_t(1) - s));
        acc_t v = a * z * s;
        if (ggp) g += static_cast<acc_t>(ggp[i]);
        if (gup) v += static_cast<acc_t>(gup[i]);
        dgp[i] = static_cast<scalar_t>(g);
        dup[i] = static_cast<scalar_t>(v);
      }
    });
  });
  return {dg, du};
}

const MlpKernels kCpuMlp{&silu_mul_cpu, &gather_cols_cpu, &silu_mul_backward_cpu};

// ------------------------------------------------------------------------------------------------------------
// Ops.

at::Tensor token_gather_cpu(const at::Tensor& x, const at::Tensor& keep_index) {
  constexpr const char* op = "token_gather";
  check_cpu(op, "x", x);
  const auto d = check_token_args(op, x, keep_index, nullptr);
  check_keep_values_cpu(op, keep_index, d.L);
  auto shape = x.sizes().vec();
  shape[1] = d.K;
  auto out = at::empty(shape, x.options());
  if (out.numel() == 0) return out;
  auto xc = x.contiguous();
  auto kc = keep_index.contiguous();
  PEFTCORE_DISPATCH_FLOATING(x.scalar_type(), op, [&] {
    gather_rows<scalar_t>(xc.const_data_ptr<scalar_t>(), kc.const_data_ptr<int64_t>(),
                          out.mutable_data_ptr<scalar_t>(), d);
  });
  return out;
}

at::Tensor token_scatter_add_cpu(const at::Tensor& residual, const at::Tensor& src, const at::Tensor& keep_index) {
  constexpr const char* op = "token_scatter_add";
  check_cpu(op, "residual", residual);
  const auto d = check_token_args(op, residual, keep_index, &src);
  check_keep_values_cpu(op, keep_index, d.L);
  auto out = residual.clone(at::MemoryFormat::Contiguous);
  if (src.numel() == 0) return out;
  auto sc = src.contiguous();
  auto kc = keep_index.contiguous();
  PEFTCORE_DISPATCH_FLOATING(out.scalar_type(), op, [&] {
    scatter_add_rows<scalar_t>(sc.const_data_ptr<scalar_t>(), kc.const_data_ptr<int64_t>(),
                               out.mutable_data_ptr<scalar_t>(), d);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> token_mlp_partial_save_cpu(
    const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up, const at::Tensor& w_down,
    int64_t keep_channels, const std::optional<at::Tensor>& channel_index) {
  constexpr const char* op = "token_mlp_partial_save";
  check_cpu(op, "x", x);
  const auto d = check_mlp_args(op, x, w_gate, w_up, w_down, keep_channels, channel_index);
  if (channel_index.has_value()) {
    check_keep_values_cpu(op, channel_index->reshape({1, -1}), d.I, "channel_index");
  }
  return mlp_forward(x, w_gate, w_up, w_down, d, channel_index, kCpuMlp);
}

at::Tensor token_mlp_partial_save_backward_cpu(const at::Tensor& grad_y, const at::Tensor& gate_kept,
                                               const at::Tensor& up_kept, const at::Tensor& channel_index,
                                               const at::Tensor& w_gate, const at::Tensor& w_up,
                                               const at::Tensor& w_down,
                                               const std::optional<at::Tensor>& grad_gate_kept,
                                               const std::optional<at::Tensor>& grad_up_kept) {
  constexpr const char* op = "token_mlp_partial_save_backward";
  check_cpu(op, "grad_y", grad_y);
  const auto d = check_mlp_backward_args(op, grad_y, gate_kept, up_kept, channel_index, w_gate, w_up, w_down,
                                         grad_gate_kept, grad_up_kept);
  check_keep_values_cpu(op, channel_index.reshape({1, -1}), d.I, "channel_index");
  return mlp_backward(grad_y, gate_kept, up_kept, channel_index, w_gate, w_up, w_down, grad_gate_kept,
                      grad_up_kept, kCpuMlp);
}

// [B, Kb]: attention received by each key block, summed over heads and query blocks of attn_block_pool's map.
// Device agnostic (it calls the attn_block_pool op, whose CPU / CUDA kernel does the flash-style work).
at::Tensor token_block_scores_impl(const at::Tensor& q, const at::Tensor& k, int64_t block_size, bool causal,
                                   std::optional<double> scale) {
  constexpr const char* op = "token_block_scores";
  check_block_scores_args(op, q, k, block_size, scale);
  static auto pool = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("peftcore::attn_block_pool", "")
                         .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool, std::optional<double>,
                                           c10::string_view)>();
  auto pooled = pool.call(q, k, block_size, causal, scale, "top_left");  // [B, Hq, Qb, Kb], fp32 (fp64 for fp64)
  return pooled.sum(at::IntArrayRef{1, 2});
}

// The CUDA launchers' plan (token_elim_plan.h), without a GPU.
std::vector<int64_t> token_elim_vec_plan(int64_t rows, int64_t width, int64_t elem_size,
                                         at::IntArrayRef addresses) {
  constexpr const char* op = "token_elim_vec_plan";
  TORCH_CHECK(rows >= 0 && width >= 0, op, ": rows and width must be >= 0, got ", rows, " and ", width);
  TORCH_CHECK(elem_size > 0, op, ": elem_size must be > 0, got ", elem_size);
  TORCH_CHECK(addresses.size() <= 7, op, ": at most 7 addresses (the most a kernel vectorises), got ",
              addresses.size());
  uint64_t a[7] = {0, 0, 0, 0, 0, 0, 0};  // 0 is aligned: absent buffers do not count
  for (size_t i = 0; i < addresses.size(); ++i) {
    TORCH_CHECK(addresses[i] >= 0, op, ": addresses must be >= 0, got ", addresses[i]);
    a[i] = static_cast<uint64_t>(addresses[i]);
  }
  const plan::Launch l = plan::rows(rows, width, elem_size, {a[0], a[1], a[2], a[3], a[4], a[5], a[6]});
  return {l.vec, l.rows.tx, l.rows.ty, l.rows.grid_x, l.rows.grid_y};
}

}  // namespace

TORCH_LIBRARY_IMPL(peftcore, CPU, m) {
  m.impl("token_gather", &token_gather_cpu);
  m.impl("token_scatter_add", &token_scatter_add_cpu);
  m.impl("token_mlp_partial_save", &token_mlp_partial_save_cpu);
  m.impl("token_mlp_partial_save_backward", &token_mlp_partial_save_backward_cpu);
}

TORCH_LIBRARY_IMPL(peftcore, CompositeExplicitAutograd, m) {
  m.impl("token_block_scores", &token_block_scores_impl);
}

// Pure host planning (no tensors): one kernel for every backend.
TORCH_LIBRARY_IMPL(peftcore, CompositeImplicitAutograd, m) {
  m.impl("token_elim_vec_plan", &token_elim_vec_plan);
}

}  // namespace peftcore::token_elim
