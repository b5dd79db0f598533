// lora CUDA glue: argument checks shared with the CPU (lora.h), the path choice, and the launchers of lora.cu
// (CUDA cores) and lora_tc.cu (tensor cores). No host sync anywhere: offsets and adapter ids are never read on
// the host (lora_validate does that), pairs are sorted by adapter on the device (a stable at::sort and a
// searchsorted), the base GEMMs are cuBLAS through ATen, so every op can be captured in a CUDA graph.
//
// Paths (PEFTCORE_LORA_CUDA_PATH=auto|gathered|grouped):
//   gathered  any pair order: one CTA per pair for the shrink (Punica's BGMV), one thread per (token, column)
//             for the expand; every pair reads its adapter's A_i / B_i (from L2 when adapters repeat). Decode.
//   grouped   pairs sorted by adapter; tiles of 64 pairs of one adapter on tensor cores (fp16 / bf16): each
//             adapter's A_i / B_i is read once per tile (SGMV). Prefill. The expand is grouped only with one
//             slot per token (k = 1: a token's rows are then written by one tile); with k > 1 it is gathered.
//   auto      grouped when the dtype has tensor-core kernels and there are at least kGroupedPairsPerAdapter pairs
//             per adapter on average (T k >= 16 N: shapes only, no sync), else gathered.
// The backward is the same for both paths: gathered kernels for the gradients of x and of the pair weights, and
// per-adapter reductions over the sorted pairs for the gradients of A and B (deterministic: no atomics).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "checks.h"
#include "cuda_glue.h"
#include "lora/lora.h"
#include "lora/lora_launch.h"

namespace peftcore::lora {
namespace {

namespace cu = peftcore::lora::cuda;

constexpr int64_t kGroupedPairsPerAdapter = 16;

cu::DType kernel_dtype(at::ScalarType t) { return peftcore::kernel_dtype("lora", t); }

enum class Path { kGathered, kGrouped };

Path choose_path(const char* op, const Dims& d, at::ScalarType dtype) {
  const bool tc = cu::tc_supported(kernel_dtype(dtype));
  if (const char* env = std::getenv("PEFTCORE_LORA_CUDA_PATH")) {
    const std::string mode(env);
    if (mode == "gathered") return Path::kGathered;
    if (mode == "grouped") {
      TORCH_CHECK(tc, op, ": PEFTCORE_LORA_CUDA_PATH=grouped needs float16 or bfloat16 (tensor cores), got ", dtype);
      return Path::kGrouped;
    }
    TORCH_CHECK(mode.empty() || mode == "auto", op, ": PEFTCORE_LORA_CUDA_PATH must be auto, gathered or grouped, ",
                "got \"", mode, "\"");
  }
  return tc && d.T * d.k >= kGroupedPairsPerAdapter * d.N ? Path::kGrouped : Path::kGathered;
}

// The kernels' view of the pairs; the tensors must outlive the launches (the caller keeps them).
struct PairTensors {
  at::Tensor ta, offsets, scales, tw;
  cu::Pairs pr;
};

PairTensors pairs_of(const Dims& d, const at::Tensor& token_adapter, const at::Tensor& offsets,
                     const at::Tensor* scales, const std::optional<at::Tensor>& token_weight) {
  PairTensors p;
  p.ta = token_adapter.reshape({-1}).contiguous();
  p.offsets = offsets.contiguous();
  p.pr.ta = p.ta.const_data_ptr<int64_t>();
  p.pr.T = d.T;
  p.pr.k = d.k;
  p.pr.offsets = p.offsets.const_data_ptr<int64_t>();
  p.pr.N = d.N;
  p.pr.R = d.R;
  if (scales != nullptr) {
    p.scales = scales->contiguous();
    p.pr.scales = p.scales.const_data_ptr<float>();
  }
  if (token_weight.has_value()) {
    p.tw = token_weight->reshape({-1}).contiguous();
    p.pr.tw = p.tw.const_data_ptr();
    p.pr.tw_dtype = kernel_dtype(p.tw.scalar_type());
  }
  return p;
}

// The same pairs without scales and weights (the kernels then take ws = 1).
cu::Pairs unweighted(cu::Pairs pr) {
  pr.scales = nullptr;
  pr.tw = nullptr;
  return pr;
}

// ws(p) = scales[i] * token_weight[p] per pair, fp32 [P], through ATen (the kernels' weight_of; 0 for slots
// without a valid id: their columns are never read anyway).
at::Tensor pair_weights(const PairTensors& pt, const Dims& d) {
  if (d.N == 0) return at::zeros({pt.ta.numel()}, pt.ta.options().dtype(at::kFloat));
  const auto valid = pt.ta.ge(0).logical_and(pt.ta.lt(d.N));
  auto ws = pt.scales.index_select(0, pt.ta.clamp(0, std::max<int64_t>(d.N - 1, 0)));
  if (pt.tw.defined()) ws = ws * pt.tw.to(at::kFloat);
  return ws.masked_fill(valid.logical_not(), 0);
}

// Pairs sorted by adapter (stable: pair order within an adapter) and where each adapter's run starts:
// perm[starts[i]:starts[i+1]] are adapter i's pairs; ids outside [0, N) fall outside every run.
struct Sorted {
  at::Tensor perm, starts;
};

Sorted sort_pairs(const at::Tensor& ta_flat, int64_t N) {
  const auto sorted = at::sort(ta_flat, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const auto& values = std::get<0>(sorted);
  const auto bounds = at::arange(N + 1, ta_flat.options());
  return {std::get<1>(sorted).contiguous(), at::searchsorted(values, bounds).contiguous()};
}

// ---------------------------------------------------------------------------------------------------------------

at::Tensor lora_multi_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                  const at::Tensor& a_packed, const at::Tensor& b_packed, const at::Tensor& offsets,
                                  const at::Tensor& scales, const at::Tensor& token_adapter,
                                  const std::optional<at::Tensor>& token_weight) {
  constexpr const char* op = "lora_multi_linear";
  check_cuda_activation(op, "x", x);
  at::Tensor x2d;
  Dims d = linear_dims(op, x, "x", x, weight, a_packed, b_packed, offsets, scales, x2d);
  check_bias(op, bias, x, d.out);
  check_tokens(op, d, x, "x", token_adapter, token_weight);
  const c10::cuda::CUDAGuard guard(x.device());
  auto y = at::linear(x2d, weight, bias).contiguous();
  if (d.T > 0 && d.R > 0 && d.out > 0) {
    const auto dt = kernel_dtype(x.scalar_type());
    const auto a = a_packed.contiguous(), b = b_packed.contiguous();
    const PairTensors pt = pairs_of(d, token_adapter, offsets, &scales, token_weight);
    // h = ws * x A_i^T per pair, fp32 (only the adapter's columns are written and read).
    auto h = at::empty({d.T * d.k, d.R}, x.options().dtype(at::kFloat));
    const auto stream = current_stream();
    if (choose_path(op, d, x.scalar_type()) == Path::kGrouped) {
      const Sorted s = sort_pairs(pt.ta, d.N);
      const int64_t* perm = s.perm.const_data_ptr<int64_t>();
      const int64_t* starts = s.starts.const_data_ptr<int64_t>();
      cu::shrink_grouped(dt, x2d.const_data_ptr(), d.in, a.const_data_ptr(), d.in, perm, starts, pt.pr,
                         h.mutable_data_ptr<float>(), /*weighted=*/true, stream);
      if (d.k == 1) {
        cu::expand_grouped(dt, h.const_data_ptr<float>(), /*h_fp32=*/true, b.const_data_ptr(), d.out, perm, starts,
                           pt.pr, y.mutable_data_ptr(), d.out, /*accumulate=*/true, /*weighted=*/false, stream);
        return y.view(with_last(x, d.out));
      }
    } else {
      cu::shrink_gathered(dt, x2d.const_data_ptr(), d.in, a.const_data_ptr(), d.in, pt.pr, h.mutable_data_ptr(),
                          /*h_fp32=*/true, /*weighted=*/true, stream);
    }
    cu::expand_gathered(dt, h.const_data_ptr(), /*h_fp32=*/true, b.const_data_ptr(), d.R, 1, d.out, pt.pr,
                        y.mutable_data_ptr(), d.out, /*y_fp32=*/false, /*accumulate=*/true, /*weighted=*/false,
                        stream);
  }
  return y.view(with_last(x, d.out));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_multi_linear_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& a_packed,
    const at::Tensor& b_packed, const at::Tensor& offsets, const at::Tensor& scales, const at::Tensor& token_adapter,
    const std::optional<at::Tensor>& token_weight, std::array<bool, 4> mask) {
  constexpr const char* op = "lora_multi_linear_backward";
  check_cuda_activation(op, "grad_out", grad_out);
  at::Tensor x2d, g2d;
  Dims d = multi_backward_dims(op, grad_out, x, weight, a_packed, b_packed, offsets, scales, token_adapter,
                               token_weight, mask, x2d, g2d);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dt = kernel_dtype(x.scalar_type());
  const auto stream = current_stream();
  const auto f32 = x.options().dtype(at::kFloat);
  const int64_t P = d.T * d.k;
  at::Tensor gx, ga, gb, gtw;
  if (mask[0]) gx = g2d.mm(weight).to(at::kFloat).contiguous();
  if (mask[1]) ga = at::zeros({d.R, d.in}, a_packed.options());
  if (mask[2]) gb = at::zeros({d.out, d.R}, b_packed.options());
  if (mask[3]) gtw = at::zeros({P}, token_weight->options());
  if (P > 0 && d.R > 0 && (mask[0] || mask[1] || mask[2] || mask[3])) {
    const auto a = a_packed.contiguous(), b = b_packed.contiguous();
    const PairTensors pt = pairs_of(d, token_adapter, offsets, &scales, token_weight);
    Sorted s;
    if (mask[1] || mask[2]) s = sort_pairs(pt.ta, d.N);
    const cu::Pairs plain = unweighted(pt.pr);
    // Each kernel pass once, unweighted (fp32 packed): gbu = g B_i (dL/dh / ws), hu = x A_i^T; the pair weights ws
    // scale rows afterwards.
    at::Tensor gbu, hu, ws;
    if (mask[0] || mask[1] || mask[3]) {
      gbu = at::empty({P, d.R}, f32);
      cu::expand_t_gathered(dt, g2d.const_data_ptr(), d.out, b.const_data_ptr(), d.out, plain,
                            gbu.mutable_data_ptr<float>(), /*weighted=*/false, stream);
    }
    if (mask[2] || mask[3]) {
      hu = at::empty({P, d.R}, f32);
      cu::shrink_gathered(dt, x2d.const_data_ptr(), d.in, a.const_data_ptr(), d.in, plain, hu.mutable_data_ptr(),
                          /*h_fp32=*/true, /*weighted=*/false, stream);
    }
    if (mask[0] || mask[1] || mask[2]) ws = pair_weights(pt, d).unsqueeze(1);
    if (mask[0] || mask[1]) {
      const auto gbw = (gbu * ws).contiguous();  // dL/dh
      if (mask[0])
        cu::expand_gathered(dt, gbw.const_data_ptr(), /*h_fp32=*/true, a.const_data_ptr(), /*so=*/1, /*sm=*/d.in,
                            d.in, pt.pr, gx.mutable_data_ptr(), d.in, /*y_fp32=*/true, /*accumulate=*/true,
                            /*weighted=*/false, stream);
      if (mask[1])
        cu::segment_outer(dt, gbw.const_data_ptr<float>(), x2d.const_data_ptr(), d.in, d.in,
                          s.perm.const_data_ptr<int64_t>(), s.starts.const_data_ptr<int64_t>(), pt.pr,
                          ga.mutable_data_ptr(), /*sdm=*/d.in, /*sdc=*/1, stream);
    }
    if (mask[2]) {
      const auto hw = (hu * ws).contiguous();  // ws * x A_i^T
      cu::segment_outer(dt, hw.const_data_ptr<float>(), g2d.const_data_ptr(), d.out, d.out,
                        s.perm.const_data_ptr<int64_t>(), s.starts.const_data_ptr<int64_t>(), pt.pr,
                        gb.mutable_data_ptr(), /*sdm=*/1, /*sdc=*/d.R, stream);
    }
    if (mask[3])  // d/dw[p] = scales[i] * (g B_i) . (x A_i^T)
      cu::pair_dot(gbu.const_data_ptr<float>(), hu.const_data_ptr<float>(), pt.pr, gtw.mutable_data_ptr(),
                   kernel_dtype(gtw.scalar_type()), stream);
  }
  const auto none = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  return {mask[0] ? gx.to(x.scalar_type()).view(x.sizes()) : none(x), mask[1] ? ga : none(a_packed),
          mask[2] ? gb : none(b_packed),
          mask[3] ? gtw.view(token_weight->sizes()) : (token_weight.has_value() ? none(*token_weight) : none(x))};
}

at::Tensor lora_shrink_cuda(const at::Tensor& x, const at::Tensor& a_packed, const at::Tensor& offsets,
                            const at::Tensor& token_adapter) {
  constexpr const char* op = "lora_shrink";
  check_cuda_activation(op, "x", x);
  at::Tensor x2d;
  const Dims d = shrink_shapes(op, x, a_packed, offsets, token_adapter, x2d);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dt = kernel_dtype(x.scalar_type());
  const int64_t P = d.T * d.k;
  at::Tensor h;
  if (P > 0 && d.R > 0) {
    const auto a = a_packed.contiguous();
    const PairTensors pt = pairs_of(d, token_adapter, offsets, nullptr, std::nullopt);
    if (choose_path(op, d, x.scalar_type()) == Path::kGrouped) {
      auto h32 = at::zeros({P, d.R}, x.options().dtype(at::kFloat));
      const Sorted s = sort_pairs(pt.ta, d.N);
      cu::shrink_grouped(dt, x2d.const_data_ptr(), d.in, a.const_data_ptr(), d.in, s.perm.const_data_ptr<int64_t>(),
                         s.starts.const_data_ptr<int64_t>(), pt.pr, h32.mutable_data_ptr<float>(),
                         /*weighted=*/false, current_stream());
      h = h32.to(x.scalar_type());
    } else {
      h = at::zeros({P, d.R}, x.options());
      cu::shrink_gathered(dt, x2d.const_data_ptr(), d.in, a.const_data_ptr(), d.in, pt.pr, h.mutable_data_ptr(),
                          /*h_fp32=*/false, /*weighted=*/false, current_stream());
    }
  } else {
    h = at::zeros({P, d.R}, x.options());
  }
  return h.view(h_shape(token_adapter, d.R));
}

std::tuple<at::Tensor, at::Tensor> lora_shrink_backward_cuda(const at::Tensor& grad_h, const at::Tensor& x,
                                                             const at::Tensor& a_packed, const at::Tensor& offsets,
                                                             const at::Tensor& token_adapter,
                                                             std::array<bool, 2> mask) {
  constexpr const char* op = "lora_shrink_backward";
  check_cuda_activation(op, "x", x);
  at::Tensor x2d;
  const Dims d = shrink_shapes(op, x, a_packed, offsets, token_adapter, x2d);
  check_same_dtype(op, "grad_h", grad_h, x, "x");
  check_same_device(op, "grad_h", grad_h, x, "x");
  const auto hs = h_shape(token_adapter, d.R);
  TORCH_CHECK(grad_h.sizes() == at::IntArrayRef(hs), op, ": grad_h must have shape ", at::IntArrayRef(hs), ", got ",
              grad_h.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const auto dt = kernel_dtype(x.scalar_type());
  const auto stream = current_stream();
  const int64_t P = d.T * d.k;
  at::Tensor gx = mask[0] ? at::zeros({d.T, d.in}, x.options().dtype(at::kFloat)) : at::Tensor();
  at::Tensor ga = mask[1] ? at::zeros({d.R, d.in}, a_packed.options()) : at::Tensor();
  if (P > 0 && d.R > 0 && (mask[0] || mask[1])) {
    const auto a = a_packed.contiguous();
    const auto gh = grad_h.reshape({P, d.R}).contiguous();
    const PairTensors pt = pairs_of(d, token_adapter, offsets, nullptr, std::nullopt);
    if (mask[0])
      cu::expand_gathered(dt, gh.const_data_ptr(), /*h_fp32=*/false, a.const_data_ptr(), /*so=*/1, /*sm=*/d.in, d.in,
                          pt.pr, gx.mutable_data_ptr(), d.in, /*y_fp32=*/true, /*accumulate=*/false,
                          /*weighted=*/false, stream);
    if (mask[1]) {
      const Sorted s = sort_pairs(pt.ta, d.N);
      const auto gh32 = gh.to(at::kFloat).contiguous();
      cu::segment_outer(dt, gh32.const_data_ptr<float>(), x2d.const_data_ptr(), d.in, d.in,
                        s.perm.const_data_ptr<int64_t>(), s.starts.const_data_ptr<int64_t>(), pt.pr,
                        ga.mutable_data_ptr(), /*sdm=*/d.in, /*sdc=*/1, stream);
    }
  }
  return {mask[0] ? gx.to(x.scalar_type()).view(x.sizes()) : at::empty({0}, x.options()),
          mask[1] ? ga : at::empty({0}, a_packed.options())};
}

at::Tensor lora_expand_cuda(const at::Tensor& h, const at::Tensor& b_packed, const at::Tensor& offsets,
                            const at::Tensor& scales, const at::Tensor& token_adapter,
                            const std::optional<at::Tensor>& token_weight, int64_t out_features) {
  constexpr const char* op = "lora_expand";
  check_cuda_activation(op, "h", h);
  const Dims d = expand_shapes(op, h, b_packed, offsets, scales, token_adapter, token_weight, out_features);
  const c10::cuda::CUDAGuard guard(h.device());
  const auto dt = kernel_dtype(h.scalar_type());
  const int64_t P = d.T * d.k;
  if (P == 0 || d.R == 0 || d.out == 0) return at::zeros({d.T, d.out}, h.options());
  const auto b = b_packed.contiguous();
  const auto h2 = h.reshape({P, d.R}).contiguous();
  const PairTensors pt = pairs_of(d, token_adapter, offsets, &scales, token_weight);
  if (d.k == 1 && choose_path(op, d, h.scalar_type()) == Path::kGrouped) {
    auto y = at::zeros({d.T, d.out}, h.options());
    const Sorted s = sort_pairs(pt.ta, d.N);
    cu::expand_grouped(dt, h2.const_data_ptr(), /*h_fp32=*/false, b.const_data_ptr(), d.out,
                       s.perm.const_data_ptr<int64_t>(), s.starts.const_data_ptr<int64_t>(), pt.pr,
                       y.mutable_data_ptr(), d.out, /*accumulate=*/false, /*weighted=*/true, current_stream());
    return y;
  }
  auto y = at::empty({d.T, d.out}, h.options());
  cu::expand_gathered(dt, h2.const_data_ptr(), /*h_fp32=*/false, b.const_data_ptr(), d.R, 1, d.out, pt.pr,
                      y.mutable_data_ptr(), d.out, /*y_fp32=*/false, /*accumulate=*/false, /*weighted=*/true,
                      current_stream());
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_expand_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& h, const at::Tensor& b_packed, const at::Tensor& offsets,
    const at::Tensor& scales, const at::Tensor& token_adapter, const std::optional<at::Tensor>& token_weight,
    std::array<bool, 3> mask) {
  constexpr const char* op = "lora_expand_backward";
  check_cuda_activation(op, "h", h);
  TORCH_CHECK(b_packed.dim() == 2, op, ": b_packed must be 2-D [out, R], got shape ", b_packed.sizes());
  const Dims d = expand_shapes(op, h, b_packed, offsets, scales, token_adapter, token_weight, b_packed.size(0));
  check_same_dtype(op, "grad_out", grad_out, h, "h");
  check_same_device(op, "grad_out", grad_out, h, "h");
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == d.T && grad_out.size(1) == d.out, op,
              ": grad_out must have shape [", d.T, ", ", d.out, "], got ", grad_out.sizes());
  TORCH_CHECK(!mask[2] || token_weight.has_value(), op,
              ": output_mask asks for grad_token_weight but token_weight is None");
  const c10::cuda::CUDAGuard guard(h.device());
  const auto dt = kernel_dtype(h.scalar_type());
  const auto stream = current_stream();
  const auto f32 = h.options().dtype(at::kFloat);
  const int64_t P = d.T * d.k;
  at::Tensor gh = mask[0] ? at::zeros({P, d.R}, f32) : at::Tensor();
  at::Tensor gb = mask[1] ? at::zeros({d.out, d.R}, b_packed.options()) : at::Tensor();
  at::Tensor gtw = mask[2] ? at::zeros({P}, token_weight->options()) : at::Tensor();
  if (P > 0 && d.R > 0 && (mask[0] || mask[1] || mask[2])) {
    const auto b = b_packed.contiguous();
    const auto g2d = grad_out.contiguous();
    const PairTensors pt = pairs_of(d, token_adapter, offsets, &scales, token_weight);
    const auto h32 = h.reshape({P, d.R}).to(at::kFloat).contiguous();
    if (mask[0])
      cu::expand_t_gathered(dt, g2d.const_data_ptr(), d.out, b.const_data_ptr(), d.out, pt.pr,
                            gh.mutable_data_ptr<float>(), /*weighted=*/true, stream);
    if (mask[1]) {
      const auto hw = (h32 * pair_weights(pt, d).unsqueeze(1)).contiguous();
      const Sorted s = sort_pairs(pt.ta, d.N);
      cu::segment_outer(dt, hw.const_data_ptr<float>(), g2d.const_data_ptr(), d.out, d.out,
                        s.perm.const_data_ptr<int64_t>(), s.starts.const_data_ptr<int64_t>(), pt.pr,
                        gb.mutable_data_ptr(), /*sdm=*/1, /*sdc=*/d.R, stream);
    }
    if (mask[2]) {
      auto gbu = at::empty({P, d.R}, f32);
      cu::expand_t_gathered(dt, g2d.const_data_ptr(), d.out, b.const_data_ptr(), d.out, unweighted(pt.pr),
                            gbu.mutable_data_ptr<float>(), /*weighted=*/false, stream);
      cu::pair_dot(gbu.const_data_ptr<float>(), h32.const_data_ptr<float>(), pt.pr, gtw.mutable_data_ptr(),
                   kernel_dtype(gtw.scalar_type()), stream);
    }
  }
  return {mask[0] ? gh.to(h.scalar_type()).view(h.sizes()) : at::empty({0}, h.options()),
          mask[1] ? gb : at::empty({0}, b_packed.options()),
          mask[2] ? gtw.view(token_weight->sizes())
                  : (token_weight.has_value() ? at::empty({0}, token_weight->options()) : at::empty({0}, h.options()))};
}

// ---------------------------------------------------------------------------------------------------------------
// lora_linear on CUDA: cuBLAS GEMMs (ATen) in chunks of rows, the dropout mask regenerated on the device from the
// seed tensor (never read on the host).

// Rows per chunk: the dropped fp32 copy of a chunk stays near 64 MiB.
int64_t cuda_chunk(int64_t in) { return std::max<int64_t>(1, (int64_t{64} << 20) / (4 * std::max<int64_t>(in, 1))); }

DropoutRows cuda_dropout_rows(double p, const at::Tensor& seed) {
  DropoutRows f;
  if (p == 0.0) {
    f.dropped = [](const at::Tensor& x2d, int64_t r0, int64_t n, at::ScalarType acc) {
      return x2d.narrow(0, r0, n).to(acc, /*non_blocking=*/false, /*copy=*/true).contiguous();
    };
    f.mask_ = [](const at::Tensor&, int64_t) {};
    return f;
  }
  const uint32_t threshold = dropout_threshold(p);
  const float inv_keep = static_cast<float>(1.0 / (1.0 - p));
  f.dropped = [seed, threshold, inv_keep](const at::Tensor& x2d, int64_t r0, int64_t n, at::ScalarType acc) {
    const int64_t in = x2d.size(1);
    auto out = at::empty({n, in}, x2d.options().dtype(acc));
    cu::dropout(kernel_dtype(x2d.scalar_type()), static_cast<const char*>(x2d.const_data_ptr()) +
                                                     r0 * in * static_cast<int64_t>(x2d.element_size()),
                out.mutable_data_ptr<float>(), n * in, r0 * in, seed.const_data_ptr<int64_t>(), threshold, inv_keep,
                current_stream());
    return out;
  };
  f.mask_ = [seed, threshold, inv_keep](const at::Tensor& rows, int64_t r0) {
    cu::dropout(cu::DType::kFloat32, rows.const_data_ptr(), rows.mutable_data_ptr<float>(), rows.numel(),
                r0 * rows.size(1), seed.const_data_ptr<int64_t>(), threshold, inv_keep, current_stream());
  };
  return f;
}

at::Tensor device_seed(const at::Tensor& seed, const at::Tensor& x, double p) {
  if (p == 0.0) return seed;
  return seed.to(x.device(), at::kLong).contiguous();
}

void check_single_cuda(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
                       const at::Tensor& B) {
  check_cuda_activation(op, "x", x);
  check_single_shapes(op, "x", x, weight, A, B);
}

at::Tensor lora_linear_dropout_cuda(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const at::Tensor& A, const at::Tensor& B,
                                    double scale, double dropout_p, const at::Tensor& seed) {
  constexpr const char* op = "lora_linear";
  check_single_cuda(op, x, weight, A, B);
  check_bias(op, bias, x, weight.size(0));
  check_dropout(op, dropout_p, seed, x);
  const c10::cuda::CUDAGuard guard(x.device());
  return linear_dropout_forward(op, x, weight, bias, A, B, scale,
                                cuda_dropout_rows(dropout_p, device_seed(seed, x, dropout_p)),
                                cuda_chunk(weight.size(1)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_linear_dropout_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& A,
    const at::Tensor& B, double scale, double dropout_p, const at::Tensor& seed, std::array<bool, 3> mask) {
  constexpr const char* op = "lora_linear_backward";
  check_single_cuda(op, x, weight, A, B);
  check_same_dtype(op, "grad_out", grad_out, x, "x");
  check_same_device(op, "grad_out", grad_out, x, "x");
  check_dropout(op, dropout_p, seed, x);
  const c10::cuda::CUDAGuard guard(x.device());
  return linear_dropout_backward(op, grad_out, x, weight, A, B, scale,
                                 cuda_dropout_rows(dropout_p, device_seed(seed, x, dropout_p)), mask,
                                 cuda_chunk(weight.size(1)));
}

}  // namespace

TORCH_LIBRARY_IMPL(peftcore, CUDA, m) {
  m.impl("lora_multi_linear", &lora_multi_linear_cuda);
  m.impl("lora_multi_linear_backward", &lora_multi_linear_backward_cuda);
  m.impl("lora_shrink", &lora_shrink_cuda);
  m.impl("lora_shrink_backward", &lora_shrink_backward_cuda);
  m.impl("lora_expand", &lora_expand_cuda);
  m.impl("lora_expand_backward", &lora_expand_backward_cuda);
  m.impl("lora_linear_dropout", &lora_linear_dropout_cuda);
  m.impl("lora_linear_dropout_backward", &lora_linear_dropout_backward_cuda);
}

}  // namespace peftcore::lora
