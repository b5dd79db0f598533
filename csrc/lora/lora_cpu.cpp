// lora CPU kernels (the layouts and the math are in lora.h).
//
// Every op groups the (token, slot) pairs by adapter with one counting sort over token_adapter, then runs each
// adapter's work as GEMMs on its group: H = X_g A_i^T [n, r_i], D = (w * s_i * H) B_i^T [n, out], accumulated into
// the output rows of the group's tokens. One adapter's A_i and B_i are read once per call whatever the number of
// its tokens, so a decode batch (one token per request, scattered adapters: Punica's BGMV) costs the adapters'
// bytes plus GEMV work, and a prefill batch (segments of one adapter: SGMV) runs BLAS GEMMs of n rows. A group
// whose tokens are one contiguous run of rows (segment-sorted input with one slot) is read and written as a view
// (no gather / scatter copies); otherwise its rows are gathered and index-added. Never a per-token copy of A or B.
// Math in the accumulation type (float32 for half types, float64 for float64); outputs in the inputs' dtypes.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "lora/lora.h"
#include "lora/lora_dropout.h"
#include "lora/lora_tc_plan.h"

namespace peftcore::lora {

void check_packed(const char* op, Dims& d, const at::Tensor& ref, const char* ref_name, const at::Tensor* a_packed,
                  const at::Tensor* b_packed, const at::Tensor& offsets, const at::Tensor* scales) {
  TORCH_CHECK(offsets.scalar_type() == at::kLong, op, ": offsets must be int64, got ", offsets.scalar_type());
  TORCH_CHECK(offsets.dim() == 1 && offsets.size(0) >= 1, op, ": offsets must be 1-D with N+1 >= 1 entries, got shape ",
              offsets.sizes());
  check_same_device(op, "offsets", offsets, ref, ref_name);
  d.N = offsets.size(0) - 1;
  if (a_packed != nullptr) {
    const at::Tensor& a = *a_packed;
    check_same_dtype(op, "a_packed", a, ref, ref_name);
    check_same_device(op, "a_packed", a, ref, ref_name);
    TORCH_CHECK(a.dim() == 2, op, ": a_packed must be 2-D [R, in], got shape ", a.sizes());
    d.R = a.size(0);
    TORCH_CHECK(a.size(1) == d.in, op, ": a_packed must have ", d.in, " columns (in_features), got shape ", a.sizes());
  }
  if (b_packed != nullptr) {
    const at::Tensor& b = *b_packed;
    check_same_dtype(op, "b_packed", b, ref, ref_name);
    check_same_device(op, "b_packed", b, ref, ref_name);
    TORCH_CHECK(b.dim() == 2, op, ": b_packed must be 2-D [out, R], got shape ", b.sizes());
    if (a_packed != nullptr)
      TORCH_CHECK(b.size(1) == d.R, op, ": b_packed must have R = ", d.R, " columns (a_packed's rows), got shape ",
                  b.sizes());
    d.R = b.size(1);
    d.out = b.size(0);
  }
  if (scales != nullptr) {
    TORCH_CHECK(scales->scalar_type() == at::kFloat, op, ": scales must be float32, got ", scales->scalar_type());
    TORCH_CHECK(scales->dim() == 1 && scales->size(0) == d.N, op, ": scales must have shape [", d.N,
                "] (one per adapter, N = offsets.numel() - 1), got ", scales->sizes());
    check_same_device(op, "scales", *scales, ref, ref_name);
  }
}

void check_tokens(const char* op, Dims& d, const at::Tensor& ref, const char* ref_name, const at::Tensor& token_adapter,
                  const std::optional<at::Tensor>& token_weight) {
  TORCH_CHECK(token_adapter.scalar_type() == at::kLong, op, ": token_adapter must be int64, got ",
              token_adapter.scalar_type());
  TORCH_CHECK(token_adapter.dim() == 1 || token_adapter.dim() == 2, op,
              ": token_adapter must be [T] or [T, k], got shape ", token_adapter.sizes());
  TORCH_CHECK(token_adapter.size(0) == d.T, op, ": token_adapter must have T = ", d.T,
              " rows (one per token), got shape ", token_adapter.sizes());
  check_same_device(op, "token_adapter", token_adapter, ref, ref_name);
  d.k = token_adapter.dim() == 2 ? token_adapter.size(1) : 1;
  if (token_weight.has_value()) {
    const at::Tensor& w = *token_weight;
    const auto t = w.scalar_type();
    const bool half = ref.scalar_type() == at::kHalf || ref.scalar_type() == at::kBFloat16;
    TORCH_CHECK(t == ref.scalar_type() || (half && t == at::kFloat), op, ": token_weight must have dtype ",
                ref.scalar_type(), half ? " or float32" : "", ", got ", t);
    TORCH_CHECK(w.sizes() == token_adapter.sizes(), op, ": token_weight must have token_adapter's shape ",
                token_adapter.sizes(), ", got ", w.sizes());
    check_same_device(op, "token_weight", w, ref, ref_name);
  }
}

void validate_values(const char* op, const Dims& d, const at::Tensor& offsets, const at::Tensor& token_adapter) {
  const auto off = offsets.to(at::kCPU).contiguous();
  const int64_t* o = off.const_data_ptr<int64_t>();
  TORCH_CHECK(o[0] == 0, op, ": offsets must start at 0, got offsets[0] = ", o[0]);
  for (int64_t i = 0; i < d.N; ++i)
    TORCH_CHECK(o[i + 1] >= o[i], op, ": offsets must not decrease, got offsets[", i, "] = ", o[i], " > offsets[",
                i + 1, "] = ", o[i + 1]);
  TORCH_CHECK(o[d.N] == d.R, op, ": offsets must end at R = ", d.R, " (the packed rank), got offsets[", d.N,
              "] = ", o[d.N]);
  const auto ta = token_adapter.to(at::kCPU).contiguous();
  const int64_t* a = ta.const_data_ptr<int64_t>();
  for (int64_t p = 0, n = ta.numel(); p < n; ++p)
    TORCH_CHECK(a[p] >= -1 && a[p] < d.N, op, ": token_adapter values must be in [-1, N) with N = ", d.N,
                " adapters (-1: no adapter), got ", a[p], " at flat position ", p);
}

std::vector<int64_t> with_last(const at::Tensor& t, int64_t last) {
  std::vector<int64_t> s(t.sizes().begin(), t.sizes().end());
  s.back() = last;
  return s;
}

std::vector<int64_t> h_shape(const at::Tensor& token_adapter, int64_t R) {
  std::vector<int64_t> s(token_adapter.sizes().begin(), token_adapter.sizes().end());
  s.push_back(R);
  return s;
}

at::Tensor flat_tokens(const char* op, const char* name, const at::Tensor& t, int64_t features) {
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have at least 1 dim, got a scalar");
  TORCH_CHECK(t.size(-1) == features, op, ": ", name, " must have last dim ", features, ", got shape ", t.sizes());
  return t.reshape({-1, features}).contiguous();
}

// The base-layer and packed-adapter checks shared by lora_multi_linear and its backward (`ref` is x or grad_out,
// whose dtype and device the others must have); x2d: x as [T, in].
Dims linear_dims(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& x,
                 const at::Tensor& weight, const at::Tensor& a_packed, const at::Tensor& b_packed,
                 const at::Tensor& offsets, const at::Tensor& scales, at::Tensor& x2d) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out, in], got shape ", weight.sizes());
  check_same_dtype(op, "weight", weight, ref, ref_name);
  check_same_device(op, "weight", weight, ref, ref_name);
  Dims d;
  d.in = weight.size(1);
  x2d = flat_tokens(op, "x", x, d.in);
  d.T = x2d.size(0);
  check_packed(op, d, ref, ref_name, &a_packed, &b_packed, offsets, &scales);
  TORCH_CHECK(d.out == weight.size(0), op, ": b_packed must have ", weight.size(0),
              " rows (weight's out_features), got shape ", b_packed.sizes());
  return d;
}

Dims multi_backward_dims(const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& a_packed, const at::Tensor& b_packed, const at::Tensor& offsets,
                         const at::Tensor& scales, const at::Tensor& token_adapter,
                         const std::optional<at::Tensor>& token_weight, std::array<bool, 4> mask, at::Tensor& x2d,
                         at::Tensor& g2d) {
  check_same_dtype(op, "x", x, grad_out, "grad_out");
  check_same_device(op, "x", x, grad_out, "grad_out");
  Dims d = linear_dims(op, grad_out, "grad_out", x, weight, a_packed, b_packed, offsets, scales, x2d);
  g2d = flat_tokens(op, "grad_out", grad_out, weight.size(0));
  TORCH_CHECK(g2d.size(0) == d.T, op, ": grad_out must have x's ", d.T, " tokens, got shape ", grad_out.sizes());
  check_tokens(op, d, x, "x", token_adapter, token_weight);
  TORCH_CHECK(!mask[3] || token_weight.has_value(), op,
              ": output_mask asks for grad_token_weight but token_weight is None");
  return d;
}

void check_bias(const char* op, const std::optional<at::Tensor>& bias, const at::Tensor& x, int64_t out) {
  if (!bias.has_value()) return;
  check_same_dtype(op, "bias", *bias, x, "x");
  check_same_device(op, "bias", *bias, x, "x");
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out, op, ": bias must have shape [", out, "], got ",
              bias->sizes());
}

Dims shrink_shapes(const char* op, const at::Tensor& x, const at::Tensor& a_packed, const at::Tensor& offsets,
                   const at::Tensor& token_adapter, at::Tensor& x2d) {
  TORCH_CHECK(a_packed.dim() == 2, op, ": a_packed must be 2-D [R, in], got shape ", a_packed.sizes());
  Dims d;
  d.in = a_packed.size(1);
  x2d = flat_tokens(op, "x", x, d.in);
  d.T = x2d.size(0);
  check_packed(op, d, x, "x", &a_packed, nullptr, offsets, nullptr);
  check_tokens(op, d, x, "x", token_adapter, std::nullopt);
  return d;
}

Dims expand_shapes(const char* op, const at::Tensor& h, const at::Tensor& b_packed, const at::Tensor& offsets,
                   const at::Tensor& scales, const at::Tensor& token_adapter,
                   const std::optional<at::Tensor>& token_weight, int64_t out_features) {
  Dims d;
  TORCH_CHECK(token_adapter.dim() >= 1, op, ": token_adapter must be [T] or [T, k], got shape ",
              token_adapter.sizes());
  d.T = token_adapter.size(0);
  check_packed(op, d, h, "h", nullptr, &b_packed, offsets, &scales);
  TORCH_CHECK(out_features == d.out, op, ": out_features must equal b_packed.size(0) = ", d.out, ", got ",
              out_features);
  check_tokens(op, d, h, "h", token_adapter, token_weight);
  const auto hshape = h_shape(token_adapter, d.R);
  TORCH_CHECK(h.sizes() == at::IntArrayRef(hshape), op, ": h must have shape ", at::IntArrayRef(hshape),
              " (token_adapter's shape + [R]), got ", h.sizes());
  return d;
}

void check_single_shapes(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor& weight,
                         const at::Tensor& A, const at::Tensor& B) {
  TORCH_CHECK(weight.dim() == 2, op, ": weight must be 2-D [out, in], got shape ", weight.sizes());
  check_same_dtype(op, "weight", weight, x, x_name);
  check_same_device(op, "weight", weight, x, x_name);
  TORCH_CHECK(A.dim() == 2 && A.size(1) == weight.size(1), op, ": A must be [r, ", weight.size(1), "], got shape ",
              A.sizes());
  TORCH_CHECK(B.dim() == 2 && B.size(0) == weight.size(0) && B.size(1) == A.size(0), op, ": B must be [",
              weight.size(0), ", ", A.size(0), "] (out, r), got shape ", B.sizes());
  check_same_dtype(op, "A", A, x, x_name);
  check_same_dtype(op, "B", B, x, x_name);
  check_same_device(op, "A", A, x, x_name);
  check_same_device(op, "B", B, x, x_name);
}

uint32_t dropout_threshold(double p) { return static_cast<uint32_t>(p * 16777216.0); }

void check_dropout(const char* op, double p, const at::Tensor& seed, const at::Tensor& x) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
  if (p == 0.0) return;
  TORCH_CHECK(seed.scalar_type() == at::kLong && seed.numel() == 1, op,
              ": seed must be one int64 element when dropout_p > 0, got ", seed.scalar_type(), " of shape ",
              seed.sizes());
  TORCH_CHECK(seed.device() == x.device() || seed.device().is_cpu(), op, ": seed must be on x's device (",
              x.device(), ") or the CPU, got ", seed.device());
}

at::Tensor linear_dropout_forward(const char* op, const at::Tensor& x, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
                                  double scale, const DropoutRows& drop, int64_t chunk) {
  const int64_t in = weight.size(1), out = weight.size(0);
  const auto x2d = flat_tokens(op, "x", x, in);
  const int64_t T = x2d.size(0);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto Aa = A.to(acc), Ba = B.to(acc);
  auto h = at::empty({T, A.size(0)}, x2d.options().dtype(acc));
  for (int64_t r0 = 0; r0 < T; r0 += chunk) {
    const int64_t n = std::min(chunk, T - r0);
    auto hc = h.narrow(0, r0, n);
    at::mm_out(hc, drop.dropped(x2d, r0, n, acc), Aa.t());
  }
  auto delta = h.mm(Ba.t()).mul_(scale);
  auto y = at::linear(x2d, weight, bias);
  if (y.scalar_type() == acc) y.add_(delta);
  else y = y.to(acc).add_(delta).to(x.scalar_type());
  return y.view(with_last(x, out));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_dropout_backward(
    const char* op, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, double scale, const DropoutRows& drop, std::array<bool, 3> mask, int64_t chunk) {
  const int64_t in = weight.size(1), out = weight.size(0);
  const auto x2d = flat_tokens(op, "x", x, in);
  const auto g2d = flat_tokens(op, "grad_out", grad_out, out);
  TORCH_CHECK(g2d.size(0) == x2d.size(0), op, ": grad_out must have x's ", x2d.size(0), " tokens, got shape ",
              grad_out.sizes());
  const int64_t T = x2d.size(0), r = A.size(0);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto Aa = A.to(acc), Ba = B.to(acc);
  at::Tensor gx = mask[0] ? g2d.mm(weight).to(acc) : at::Tensor();
  at::Tensor gA = mask[1] ? at::zeros({r, in}, x2d.options().dtype(acc)) : at::Tensor();
  at::Tensor gB = mask[2] ? at::zeros({out, r}, x2d.options().dtype(acc)) : at::Tensor();
  for (int64_t r0 = 0; r0 < T && (mask[0] || mask[1] || mask[2]); r0 += chunk) {
    const int64_t n = std::min(chunk, T - r0);
    const auto G = g2d.narrow(0, r0, n).to(acc);
    const auto GB = G.mm(Ba).mul_(scale);  // [n, r]: dL/dh
    if (mask[0]) {
      auto gxd = GB.mm(Aa).contiguous();    // dL/d(dropped x)
      drop.mask_(gxd, r0);                  // dL/dx = keep / (1 - p) * dL/d(dropped x): the mask regenerated
      gx.narrow(0, r0, n).add_(gxd);
    }
    if (mask[1] || mask[2]) {
      const auto xd = drop.dropped(x2d, r0, n, acc);
      if (mask[1]) gA.add_(GB.t().mm(xd));
      if (mask[2]) gB.add_(G.t().mm(xd.mm(Aa.t())).mul_(scale));
    }
  }
  return {mask[0] ? gx.to(x.scalar_type()).view(x.sizes()) : at::empty({0}, x.options()),
          mask[1] ? gA.to(A.scalar_type()) : at::empty({0}, A.options()),
          mask[2] ? gB.to(B.scalar_type()) : at::empty({0}, B.options())};
}

namespace {

// The (token, slot) pairs of each adapter: pairs[start[i]:start[i+1]] ascending (a counting sort).
struct Groups {
  std::vector<int64_t> start;  // [N+1]
  std::vector<int64_t> pairs;
  std::vector<int64_t> off;    // offsets on the host
};

Groups group_pairs(const Dims& d, const at::Tensor& offsets, const at::Tensor& token_adapter) {
  Groups g;
  const auto ta = token_adapter.contiguous();
  const int64_t* a = ta.const_data_ptr<int64_t>();
  const int64_t P = d.T * d.k;
  g.start.assign(d.N + 1, 0);
  for (int64_t p = 0; p < P; ++p)
    if (a[p] >= 0) ++g.start[a[p] + 1];
  for (int64_t i = 0; i < d.N; ++i) g.start[i + 1] += g.start[i];
  g.pairs.resize(g.start[d.N]);
  std::vector<int64_t> fill(g.start.begin(), g.start.end() - 1);
  for (int64_t p = 0; p < P; ++p)
    if (a[p] >= 0) g.pairs[fill[a[p]]++] = p;
  const auto off = offsets.contiguous();
  g.off.assign(off.const_data_ptr<int64_t>(), off.const_data_ptr<int64_t>() + d.N + 1);
  return g;
}

// One adapter's group: its pairs, their tokens, and whether the tokens are one contiguous run of rows.
struct Group {
  int64_t n = 0, r = 0, off = 0;
  int64_t first_token = 0;
  bool run = false;    // tokens first_token .. first_token + n - 1, each once
  at::Tensor pairs;    // [n] int64
  at::Tensor tokens;   // [n] int64
};

Group group(const Groups& g, const Dims& d, int64_t i) {
  Group G;
  G.n = g.start[i + 1] - g.start[i];
  G.off = g.off[i];
  G.r = g.off[i + 1] - g.off[i];
  if (G.n == 0 || G.r == 0) return G;
  const int64_t* p = g.pairs.data() + g.start[i];
  G.pairs = at::empty({G.n}, at::kLong);
  G.tokens = at::empty({G.n}, at::kLong);
  int64_t* pp = G.pairs.mutable_data_ptr<int64_t>();
  int64_t* tt = G.tokens.mutable_data_ptr<int64_t>();
  G.run = true;
  for (int64_t m = 0; m < G.n; ++m) {
    pp[m] = p[m];
    tt[m] = p[m] / d.k;
    G.run = G.run && tt[m] == tt[0] + m;
  }
  G.first_token = tt[0];
  return G;
}

// Rows of a [T, *] tensor for the group's tokens, in the accumulation type.
at::Tensor rows(const at::Tensor& t2d, const Group& G, at::ScalarType acc) {
  return (G.run ? t2d.narrow(0, G.first_token, G.n) : t2d.index_select(0, G.tokens)).to(acc);
}

// out[token rows] += v for the group (out [T, *] in the accumulation type).
void add_rows(const at::Tensor& out, const Group& G, const at::Tensor& v) {
  if (G.run) out.narrow(0, G.first_token, G.n).add_(v);
  else out.index_add_(0, G.tokens, v);
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Per pair weight * scale of the group, [n] in the accumulation type.
at::Tensor pair_weights(const std::optional<at::Tensor>& tw_flat, const Group& G, float scale, at::ScalarType acc) {
  if (!tw_flat.has_value()) return at::full({G.n}, static_cast<double>(scale), at::TensorOptions().dtype(acc));
  return tw_flat->index_select(0, G.pairs).to(acc).mul_(static_cast<double>(scale));
}

void check_cpu(const char* op, const char* name, const at::Tensor& t) {
  check_float(op, name, t);
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor here, got ", t.device());
}

std::optional<at::Tensor> flat_weight(const std::optional<at::Tensor>& tw) {
  if (!tw.has_value()) return std::nullopt;
  return tw->reshape({-1}).contiguous();
}

const float* scale_ptr(const at::Tensor& scales, at::Tensor& holder) {
  holder = scales.contiguous();
  return holder.const_data_ptr<float>();
}

// sum_j w * s * (x A^T) B^T for every token, added into `target` [T, out] (the accumulation type: a fresh zero
// delta, or the output itself when it already has that dtype). A group whose tokens are one contiguous run adds its
// GEMM straight into its rows (addmm_ on the view: no [n, out] temporary); others index_add a temporary.
void multi_delta(const Dims& d, const at::Tensor& x2d, const at::Tensor& a_packed, const at::Tensor& b_packed,
                 const Groups& g, const at::Tensor& scales, const std::optional<at::Tensor>& tw,
                 const at::Tensor& target) {
  const auto acc = acc_type(x2d.scalar_type());
  at::Tensor sh;
  const float* s = scale_ptr(scales, sh);
  for (int64_t i = 0; i < d.N; ++i) {
    const Group G = group(g, d, i);
    if (G.n == 0 || G.r == 0) continue;
    const auto A = a_packed.narrow(0, G.off, G.r).to(acc);  // [r, in]
    const auto B = b_packed.narrow(1, G.off, G.r).to(acc);  // [out, r]
    const auto H = rows(x2d, G, acc).mm(A.t()).mul_(pair_weights(tw, G, s[i], acc).unsqueeze(1));
    if (G.run) target.narrow(0, G.first_token, G.n).addmm_(H, B.t());
    else target.index_add_(0, G.tokens, H.mm(B.t()));
  }
}

// The same sum token by token, for small groups (decode: one token per request, scattered adapters). A group of a
// few tokens costs ~8 ATen calls in multi_delta above, which dominates there (64 adapters of rank 8 at 4096 wide:
// 1.34x the frozen linear against a floor of 1.25x); here one parallel loop over tokens computes, per slot,
// h = A_i x[t] (r dot products over in) and delta[t] += w s_i B_i h, reading A_i and B_i in place (B_i's row o is
// b_packed[o, offsets[i]:offsets[i+1]], contiguous). Never a copy of A or B.
at::Tensor multi_delta_tokens(const Dims& d, const at::Tensor& x2d, const at::Tensor& a_packed,
                              const at::Tensor& b_packed, const at::Tensor& offsets, const at::Tensor& scales,
                              const at::Tensor& token_adapter, const std::optional<at::Tensor>& tw) {
  const auto acc = acc_type(x2d.scalar_type());
  auto delta = at::zeros({d.T, d.out}, x2d.options().dtype(acc));
  const auto off_t = offsets.contiguous();
  const int64_t* off = off_t.const_data_ptr<int64_t>();
  int64_t rmax = 0;
  for (int64_t i = 0; i < d.N; ++i) rmax = std::max(rmax, off[i + 1] - off[i]);
  const auto ta_t = token_adapter.contiguous();
  const int64_t* ta = ta_t.const_data_ptr<int64_t>();
  const auto sc_t = scales.contiguous();
  const float* sc = sc_t.const_data_ptr<float>();
  const auto tw_t = tw.has_value() ? std::optional<at::Tensor>(tw->to(acc).contiguous()) : std::nullopt;
  const auto A_t = a_packed.contiguous(), B_t = b_packed.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x2d.scalar_type(), "lora_multi_linear", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = x2d.const_data_ptr<scalar_t>();
    const scalar_t* A = A_t.const_data_ptr<scalar_t>();
    const scalar_t* B = B_t.const_data_ptr<scalar_t>();
    const acc_t* w = tw_t.has_value() ? tw_t->const_data_ptr<acc_t>() : nullptr;
    acc_t* y = delta.mutable_data_ptr<acc_t>();
    at::parallel_for(0, d.T, 1, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> h(static_cast<size_t>(std::max<int64_t>(rmax, 1)));
      for (int64_t t = t0; t < t1; ++t) {
        const scalar_t* xt = x + t * d.in;
        acc_t* yt = y + t * d.out;
        for (int64_t j = 0; j < d.k; ++j) {
          const int64_t p = t * d.k + j, i = ta[p];
          if (i < 0) continue;
          const int64_t o0 = off[i], r = off[i + 1] - o0;
          if (r == 0) continue;
          const acc_t ws = static_cast<acc_t>(sc[i]) * (w != nullptr ? w[p] : acc_t(1));
          for (int64_t m = 0; m < r; ++m) {
            const scalar_t* am = A + (o0 + m) * d.in;
            acc_t s = 0;
            for (int64_t c = 0; c < d.in; ++c) s += static_cast<acc_t>(am[c]) * static_cast<acc_t>(xt[c]);
            h[m] = ws * s;
          }
          // B_i's rows are r_i elements R apart: a stride the hardware prefetchers follow poorly, so ask for
          // the row kPrefetchRows ahead.
          constexpr int64_t kPrefetchRows = 16;
          for (int64_t o = 0; o < d.out; ++o) {
            const scalar_t* bo = B + o * d.R + o0;
            if (o + kPrefetchRows < d.out) __builtin_prefetch(bo + kPrefetchRows * d.R);
            acc_t s = 0;
            for (int64_t m = 0; m < r; ++m) s += static_cast<acc_t>(bo[m]) * h[m];
            yt[o] += s;
          }
        }
      }
    });
  });
  return delta;
}

// Which forward path: the token loop when the adapters' groups are small (fewer than kTokenPathMaxGroup pairs per
// used adapter on average), the GEMMs per group otherwise. PEFTCORE_LORA_CPU_PATH=tokens|groups forces one (tests,
// bench).
constexpr int64_t kTokenPathMaxGroup = 8;

bool token_path(const Groups& g) {
  if (const char* env = std::getenv("PEFTCORE_LORA_CPU_PATH")) {
    const std::string mode(env);
    if (mode == "tokens") return true;
    if (mode == "groups") return false;
    TORCH_CHECK(mode.empty() || mode == "auto", "lora_multi_linear: PEFTCORE_LORA_CPU_PATH must be auto, tokens or ",
                "groups, got \"", mode, "\"");
  }
  int64_t used = 0;
  for (size_t i = 0; i + 1 < g.start.size(); ++i) used += g.start[i + 1] > g.start[i];
  return used > 0 && static_cast<int64_t>(g.pairs.size()) < kTokenPathMaxGroup * used;
}

// ---------------------------------------------------------------------------------------------------------------

at::Tensor lora_multi_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                 const at::Tensor& a_packed, const at::Tensor& b_packed, const at::Tensor& offsets,
                                 const at::Tensor& scales, const at::Tensor& token_adapter,
                                 const std::optional<at::Tensor>& token_weight) {
  constexpr const char* op = "lora_multi_linear";
  check_cpu(op, "x", x);
  at::Tensor x2d;
  Dims d = linear_dims(op, x, "x", x, weight, a_packed, b_packed, offsets, scales, x2d);
  check_bias(op, bias, x, d.out);
  check_tokens(op, d, x, "x", token_adapter, token_weight);
  validate_values(op, d, offsets, token_adapter);
  const auto g = group_pairs(d, offsets, token_adapter);
  auto y = at::linear(x2d, weight, bias);
  const auto acc = acc_type(x.scalar_type());
  if (token_path(g)) {
    const auto delta = multi_delta_tokens(d, x2d, a_packed, b_packed, offsets, scales, token_adapter,
                                          flat_weight(token_weight));
    if (y.scalar_type() == acc) y.add_(delta);
    else y = y.to(acc).add_(delta).to(x.scalar_type());
  } else if (y.scalar_type() == acc) {
    multi_delta(d, x2d, a_packed, b_packed, g, scales, flat_weight(token_weight), y);
  } else {
    auto y32 = y.to(acc);
    multi_delta(d, x2d, a_packed, b_packed, g, scales, flat_weight(token_weight), y32);
    y = y32.to(x.scalar_type());
  }
  return y.view(with_last(x, d.out));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_multi_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& a_packed,
    const at::Tensor& b_packed, const at::Tensor& offsets, const at::Tensor& scales, const at::Tensor& token_adapter,
    const std::optional<at::Tensor>& token_weight, std::array<bool, 4> mask) {
  constexpr const char* op = "lora_multi_linear_backward";
  check_cpu(op, "grad_out", grad_out);
  at::Tensor x2d, g2d;
  Dims d = multi_backward_dims(op, grad_out, x, weight, a_packed, b_packed, offsets, scales, token_adapter,
                               token_weight, mask, x2d, g2d);
  validate_values(op, d, offsets, token_adapter);
  const auto g = group_pairs(d, offsets, token_adapter);
  const auto acc = acc_type(x.scalar_type());
  const auto tw = flat_weight(token_weight);
  at::Tensor gx, ga, gb, gtw;
  if (mask[0]) gx = g2d.mm(weight).to(acc);
  if (mask[1]) ga = at::zeros({d.R, d.in}, x2d.options().dtype(acc));
  if (mask[2]) gb = at::zeros({d.out, d.R}, x2d.options().dtype(acc));
  if (mask[3]) gtw = at::zeros({d.T * d.k}, x2d.options().dtype(acc));
  at::Tensor sh;
  const float* s = scale_ptr(scales, sh);
  for (int64_t i = 0; i < d.N && (mask[0] || mask[1] || mask[2] || mask[3]); ++i) {
    const Group G = group(g, d, i);
    if (G.n == 0 || G.r == 0) continue;
    const auto A = a_packed.narrow(0, G.off, G.r).to(acc);
    const auto B = b_packed.narrow(1, G.off, G.r).to(acc);
    const auto Gi = rows(g2d, G, acc);                   // [n, out]
    const auto ws = pair_weights(tw, G, s[i], acc).unsqueeze(1);  // [n, 1]
    const auto GB = Gi.mm(B);                            // [n, r]: dL / d(w s H)
    at::Tensor Xi;
    if (mask[1] || mask[2] || mask[3]) Xi = rows(x2d, G, acc);
    if (mask[0] || mask[1]) {
      const auto GBw = GB * ws;
      if (mask[0]) add_rows(gx, G, GBw.mm(A));
      if (mask[1]) ga.narrow(0, G.off, G.r).add_(GBw.t().mm(Xi));
    }
    if (mask[2] || mask[3]) {
      const auto H = Xi.mm(A.t());                       // [n, r]
      if (mask[2]) gb.narrow(1, G.off, G.r).add_(Gi.t().mm(H * ws));
      if (mask[3]) gtw.index_add_(0, G.pairs, (GB * H).sum(1).mul_(static_cast<double>(s[i])));
    }
  }
  const auto none = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  return {mask[0] ? gx.to(x.scalar_type()).view(x.sizes()) : none(x),
          mask[1] ? ga.to(a_packed.scalar_type()) : none(a_packed),
          mask[2] ? gb.to(b_packed.scalar_type()) : none(b_packed),
          mask[3] ? gtw.to(token_weight->scalar_type()).view(token_weight->sizes())
                  : (token_weight.has_value() ? none(*token_weight) : none(x))};
}

// Checks shared by lora_shrink and its backward (values included); x2d: x as [T, in].
Dims shrink_dims(const char* op, const at::Tensor& x, const at::Tensor& a_packed, const at::Tensor& offsets,
                 const at::Tensor& token_adapter, at::Tensor& x2d) {
  check_cpu(op, "x", x);
  const Dims d = shrink_shapes(op, x, a_packed, offsets, token_adapter, x2d);
  validate_values(op, d, offsets, token_adapter);
  return d;
}

// h: token_adapter's shape + [R] (h[t, j, offsets[i] + m] = x[t] . A_i[m] for i = token_adapter[t, j], zero in
// every other column and for slots without an adapter).
at::Tensor lora_shrink_cpu(const at::Tensor& x, const at::Tensor& a_packed, const at::Tensor& offsets,
                           const at::Tensor& token_adapter) {
  constexpr const char* op = "lora_shrink";
  at::Tensor x2d;
  const Dims d = shrink_dims(op, x, a_packed, offsets, token_adapter, x2d);
  const auto g = group_pairs(d, offsets, token_adapter);
  const auto acc = acc_type(x.scalar_type());
  auto h = at::zeros({d.T * d.k, d.R}, x.options());
  for (int64_t i = 0; i < d.N; ++i) {
    const Group G = group(g, d, i);
    if (G.n == 0 || G.r == 0) continue;
    const auto H = rows(x2d, G, acc).mm(a_packed.narrow(0, G.off, G.r).to(acc).t());
    h.narrow(1, G.off, G.r).index_copy_(0, G.pairs, H.to(x.scalar_type()));
  }
  return h.view(h_shape(token_adapter, d.R));
}

std::tuple<at::Tensor, at::Tensor> lora_shrink_backward_cpu(const at::Tensor& grad_h, const at::Tensor& x,
                                                            const at::Tensor& a_packed, const at::Tensor& offsets,
                                                            const at::Tensor& token_adapter, std::array<bool, 2> mask) {
  constexpr const char* op = "lora_shrink_backward";
  at::Tensor x2d;
  const Dims d = shrink_dims(op, x, a_packed, offsets, token_adapter, x2d);
  check_same_dtype(op, "grad_h", grad_h, x, "x");
  check_same_device(op, "grad_h", grad_h, x, "x");
  const auto hshape = h_shape(token_adapter, d.R);
  TORCH_CHECK(grad_h.sizes() == at::IntArrayRef(hshape), op, ": grad_h must have shape ", at::IntArrayRef(hshape),
              ", got ", grad_h.sizes());
  const auto g = group_pairs(d, offsets, token_adapter);
  const auto acc = acc_type(x.scalar_type());
  const auto gh = grad_h.reshape({d.T * d.k, d.R});
  at::Tensor gx = mask[0] ? at::zeros({d.T, d.in}, x.options().dtype(acc)) : at::Tensor();
  at::Tensor ga = mask[1] ? at::zeros({d.R, d.in}, x.options().dtype(acc)) : at::Tensor();
  for (int64_t i = 0; i < d.N && (mask[0] || mask[1]); ++i) {
    const Group G = group(g, d, i);
    if (G.n == 0 || G.r == 0) continue;
    const auto Gh = gh.narrow(1, G.off, G.r).index_select(0, G.pairs).to(acc);  // [n, r]
    if (mask[0]) add_rows(gx, G, Gh.mm(a_packed.narrow(0, G.off, G.r).to(acc)));
    if (mask[1]) ga.narrow(0, G.off, G.r).add_(Gh.t().mm(rows(x2d, G, acc)));
  }
  return {mask[0] ? gx.to(x.scalar_type()).view(x.sizes()) : at::empty({0}, x.options()),
          mask[1] ? ga.to(a_packed.scalar_type()) : at::empty({0}, a_packed.options())};
}

// Checks shared by lora_expand and its backward (values included); h [*token_adapter.shape, R].
Dims expand_dims(const char* op, const at::Tensor& h, const at::Tensor& b_packed, const at::Tensor& offsets,
                 const at::Tensor& scales, const at::Tensor& token_adapter,
                 const std::optional<at::Tensor>& token_weight, int64_t out_features) {
  check_cpu(op, "h", h);
  const Dims d = expand_shapes(op, h, b_packed, offsets, scales, token_adapter, token_weight, out_features);
  validate_values(op, d, offsets, token_adapter);
  return d;
}

at::Tensor lora_expand_cpu(const at::Tensor& h, const at::Tensor& b_packed, const at::Tensor& offsets,
                           const at::Tensor& scales, const at::Tensor& token_adapter,
                           const std::optional<at::Tensor>& token_weight, int64_t out_features) {
  constexpr const char* op = "lora_expand";
  const Dims d = expand_dims(op, h, b_packed, offsets, scales, token_adapter, token_weight, out_features);
  const auto g = group_pairs(d, offsets, token_adapter);
  const auto acc = acc_type(h.scalar_type());
  const auto h2 = h.reshape({d.T * d.k, d.R});
  const auto tw = flat_weight(token_weight);
  auto y = at::zeros({d.T, d.out}, h.options().dtype(acc));
  at::Tensor sh;
  const float* s = scale_ptr(scales, sh);
  for (int64_t i = 0; i < d.N; ++i) {
    const Group G = group(g, d, i);
    if (G.n == 0 || G.r == 0) continue;
    const auto H = h2.narrow(1, G.off, G.r).index_select(0, G.pairs).to(acc).mul_(pair_weights(tw, G, s[i], acc).unsqueeze(1));
    add_rows(y, G, H.mm(b_packed.narrow(1, G.off, G.r).to(acc).t()));
  }
  return y.to(h.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_expand_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& b_packed, const at::Tensor& offsets,
    const at::Tensor& scales, const at::Tensor& token_adapter, const std::optional<at::Tensor>& token_weight,
    std::array<bool, 3> mask) {
  constexpr const char* op = "lora_expand_backward";
  TORCH_CHECK(b_packed.dim() == 2, op, ": b_packed must be 2-D [out, R], got shape ", b_packed.sizes());
  const Dims d = expand_dims(op, h, b_packed, offsets, scales, token_adapter, token_weight, b_packed.size(0));
  check_same_dtype(op, "grad_out", grad_out, h, "h");
  check_same_device(op, "grad_out", grad_out, h, "h");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == d.T && grad_out.size(1) == d.out, op,
              ": grad_out must have shape [", d.T, ", ", d.out, "], got ", grad_out.sizes());
  TORCH_CHECK(!mask[2] || token_weight.has_value(), op,
              ": output_mask asks for grad_token_weight but token_weight is None");
  const auto g = group_pairs(d, offsets, token_adapter);
  const auto acc = acc_type(h.scalar_type());
  const auto h2 = h.reshape({d.T * d.k, d.R});
  const auto g2d = grad_out.contiguous();
  const auto tw = flat_weight(token_weight);
  at::Tensor gh = mask[0] ? at::zeros({d.T * d.k, d.R}, h.options().dtype(acc)) : at::Tensor();
  at::Tensor gb = mask[1] ? at::zeros({d.out, d.R}, h.options().dtype(acc)) : at::Tensor();
  at::Tensor gtw = mask[2] ? at::zeros({d.T * d.k}, h.options().dtype(acc)) : at::Tensor();
  at::Tensor sh;
  const float* s = scale_ptr(scales, sh);
  for (int64_t i = 0; i < d.N && (mask[0] || mask[1] || mask[2]); ++i) {
    const Group G = group(g, d, i);
    if (G.n == 0 || G.r == 0) continue;
    const auto B = b_packed.narrow(1, G.off, G.r).to(acc);
    const auto Gi = rows(g2d, G, acc);
    const auto ws = pair_weights(tw, G, s[i], acc).unsqueeze(1);
    const auto GB = Gi.mm(B);  // [n, r]
    if (mask[0]) gh.narrow(1, G.off, G.r).index_copy_(0, G.pairs, GB * ws);
    if (mask[1] || mask[2]) {
      const auto H = h2.narrow(1, G.off, G.r).index_select(0, G.pairs).to(acc);
      if (mask[1]) gb.narrow(1, G.off, G.r).add_(Gi.t().mm(H * ws));
      if (mask[2]) gtw.index_add_(0, G.pairs, (GB * H).sum(1).mul_(static_cast<double>(s[i])));
    }
  }
  return {mask[0] ? gh.to(h.scalar_type()).view(h.sizes()) : at::empty({0}, h.options()),
          mask[1] ? gb.to(b_packed.scalar_type()) : at::empty({0}, b_packed.options()),
          mask[2] ? gtw.to(token_weight->scalar_type()).view(token_weight->sizes())
                  : (token_weight.has_value() ? at::empty({0}, token_weight->options()) : at::empty({0}, h.options()))};
}


// ---------------------------------------------------------------------------------------------------------------
// One adapter, fused: y = x W^T + bias + scale * (drop(x) A^T) B^T, drop(x) = x * keep / (1 - p).
// The dropout mask is a counter-based hash of (seed, flat element index) (lora_dropout.h), so the backward
// regenerates it instead of keeping a dropped copy of x: both passes walk the tokens in chunks of rows, building
// the chunk's dropped rows in a temporary that is freed at the end of the chunk. The chunk loop is shared with the
// CUDA glue (lora.h: linear_dropout_forward / _backward); each backend brings its mask kernel.

constexpr int64_t kChunk = 256;

struct Dropout {
  bool active = false;
  uint64_t seed = 0;
  uint32_t threshold = 0;  // p * 2^24
  double inv_keep = 1.0;
};

Dropout dropout_of(double p, const at::Tensor& seed) {
  Dropout d;
  if (p == 0.0) return d;
  d.active = true;
  d.seed = static_cast<uint64_t>(seed.to(at::kCPU).item<int64_t>());
  d.threshold = dropout_threshold(p);
  d.inv_keep = 1.0 / (1.0 - p);
  return d;
}

// rows *= keep / (1 - p) in place, rows [n, in] contiguous (accumulation type) being rows r0 .. r0+n of the input.
void apply_dropout_(const at::Tensor& rows, int64_t r0, const Dropout& d) {
  if (!d.active) return;
  const int64_t n = rows.size(0), in = rows.size(1);
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "lora_dropout", [&] {
    scalar_t* p = rows.mutable_data_ptr<scalar_t>();
    const auto scale = static_cast<scalar_t>(d.inv_keep);
    at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const uint64_t base = static_cast<uint64_t>(r0 + i) * static_cast<uint64_t>(in);
        scalar_t* row = p + i * in;
        for (int64_t c = 0; c < in; ++c)
          row[c] = keep_element(d.seed, base + c, d.threshold) ? row[c] * scale : scalar_t(0);
      }
    });
  });
}

DropoutRows cpu_dropout_rows(const Dropout& d) {
  DropoutRows f;
  f.dropped = [d](const at::Tensor& x2d, int64_t r0, int64_t n, at::ScalarType acc) {
    auto xs = x2d.narrow(0, r0, n).to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
    apply_dropout_(xs, r0, d);
    return xs;
  };
  f.mask_ = [d](const at::Tensor& rows, int64_t r0) { apply_dropout_(rows, r0, d); };
  return f;
}

void check_single(const char* op, const char* x_name, const at::Tensor& x, const at::Tensor& weight,
                  const at::Tensor& A, const at::Tensor& B) {
  check_cpu(op, x_name, x);
  check_single_shapes(op, x_name, x, weight, A, B);
}

at::Tensor lora_linear_dropout_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                   const at::Tensor& A, const at::Tensor& B, double scale, double dropout_p,
                                   const at::Tensor& seed) {
  constexpr const char* op = "lora_linear";
  check_single(op, "x", x, weight, A, B);
  check_bias(op, bias, x, weight.size(0));
  check_dropout(op, dropout_p, seed, x);
  return linear_dropout_forward(op, x, weight, bias, A, B, scale, cpu_dropout_rows(dropout_of(dropout_p, seed)),
                                kChunk);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_dropout_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, double scale, double dropout_p, const at::Tensor& seed, std::array<bool, 3> mask) {
  constexpr const char* op = "lora_linear_backward";
  check_single(op, "x", x, weight, A, B);
  check_same_dtype(op, "grad_out", grad_out, x, "x");
  check_same_device(op, "grad_out", grad_out, x, "x");
  check_dropout(op, dropout_p, seed, x);
  return linear_dropout_backward(op, grad_out, x, weight, A, B, scale,
                                 cpu_dropout_rows(dropout_of(dropout_p, seed)), mask, kChunk);
}

// lora_linear: draws the dropout seed (a device tensor from the default generator: no host sync) when dropout
// applies, then runs lora_linear_dropout, whose autograd saves the seed instead of a dropped copy of x.
at::Tensor lora_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                       const at::Tensor& A, const at::Tensor& B, double scale, double dropout_p, bool training) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "lora_linear: dropout_p must be in [0, 1), got ", dropout_p);
  const bool drop = training && dropout_p > 0.0;
  const auto opts = x.options().dtype(at::kLong);
  const at::Tensor seed = drop ? at::randint(std::numeric_limits<int64_t>::max(), {1}, opts) : at::empty({0}, opts);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("peftcore::lora_linear_dropout", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         const at::Tensor&, const at::Tensor&, double, double, const at::Tensor&)>();
  return op.call(x, weight, bias, A, B, scale, drop ? dropout_p : 0.0, seed);
}

void lora_validate_impl(const at::Tensor& offsets, const at::Tensor& token_adapter, int64_t R) {
  constexpr const char* op = "lora_validate";
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.size(0) >= 1, op,
              ": offsets must be 1-D int64 with N+1 >= 1 entries, got ", offsets.scalar_type(), " of shape ",
              offsets.sizes());
  TORCH_CHECK(token_adapter.scalar_type() == at::kLong, op, ": token_adapter must be int64, got ",
              token_adapter.scalar_type());
  TORCH_CHECK(R >= 0, op, ": R must be >= 0, got ", R);
  Dims d;
  d.N = offsets.size(0) - 1;
  d.R = R;
  validate_values(op, d, offsets, token_adapter);
}

std::tuple<at::Tensor, int64_t> lora_tc_tiles_impl(const at::Tensor& offsets, const at::Tensor& starts, int64_t R,
                                                   int64_t pairs) {
  constexpr const char* op = "lora_tc_tiles";
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1 && offsets.size(0) >= 1, op,
              ": offsets must be 1-D int64 with N+1 >= 1 entries, got ", offsets.scalar_type(), " of shape ",
              offsets.sizes());
  TORCH_CHECK(starts.scalar_type() == at::kLong && starts.sizes() == offsets.sizes(), op,
              ": starts must be int64 of offsets' shape ", offsets.sizes(), ", got ", starts.scalar_type(), " of shape ",
              starts.sizes());
  TORCH_CHECK(pairs >= 0, op, ": pairs must be >= 0, got ", pairs);
  const auto off = offsets.to(at::kCPU).contiguous(), st = starts.to(at::kCPU).contiguous();
  const int64_t N = offsets.size(0) - 1;
  const int64_t bound = tc_plan::tiles_bound(pairs, N);
  std::vector<int64_t> rows;
  tc_plan::TileRef t{};
  for (int64_t b = 0; tc_plan::find_tile(off.const_data_ptr<int64_t>(), st.const_data_ptr<int64_t>(), N, R, b, t); ++b)
    rows.insert(rows.end(), {t.i, t.off, t.r, t.q0, t.n});
  auto out = at::empty({static_cast<int64_t>(rows.size() / 5), 5}, at::kLong);
  std::copy(rows.begin(), rows.end(), out.mutable_data_ptr<int64_t>());
  return {out, bound};
}

}  // namespace

// Validation is device independent (reads the values on the host), so it is registered once for every backend.
TORCH_LIBRARY_IMPL(peftcore, CompositeExplicitAutograd, m) {
  m.impl("lora_validate", &lora_validate_impl);
  m.impl("lora_tc_tiles", &lora_tc_tiles_impl);
}

TORCH_LIBRARY_IMPL(peftcore, CPU, m) {
  m.impl("lora_multi_linear", &lora_multi_linear_cpu);
  m.impl("lora_multi_linear_backward", &lora_multi_linear_backward_cpu);
  m.impl("lora_shrink", &lora_shrink_cpu);
  m.impl("lora_shrink_backward", &lora_shrink_backward_cpu);
  m.impl("lora_expand", &lora_expand_cpu);
  m.impl("lora_expand_backward", &lora_expand_backward_cpu);
  m.impl("lora_linear_dropout", &lora_linear_dropout_cpu);
  m.impl("lora_linear_dropout_backward", &lora_linear_dropout_backward_cpu);
}

// Composite: autograd and every backend come from lora_linear_dropout.
TORCH_LIBRARY_IMPL(peftcore, CompositeImplicitAutograd, m) { m.impl("lora_linear", &lora_linear); }

}  // namespace peftcore::lora
