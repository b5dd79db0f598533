// sparse_attn CUDA glue: argument checks (shared with the CPU, sparse_attn.h, plus the CUDA limits: head dim 64 /
// 128 / 256, no float64), the tile plan for the device's opt-in shared memory (sparse_attn_tiles.h), contiguous
// copies, output allocation and the plain-CUDA launchers of sparse_attn.cu; the choice between the tensor-core
// forward and backward (sparse_attn_tc*.cu, float16 / bfloat16, D = 64 / 128) and the CUDA-core kernels
// (tc_config).
// No host sync anywhere: the block mask is read by the kernels, so every op can be captured in a CUDA graph.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>

#include "checks.h"
#include "cuda_glue.h"
#include "sparse_attn/sparse_attn.h"
#include "sparse_attn/sparse_attn_launch.h"
#include "sparse_attn/sparse_attn_tc_plan.h"
#include "sparse_attn/sparse_attn_tiles.h"

namespace peftcore::sparse_attn {
namespace {

namespace cu = peftcore::sparse_attn::cuda;

cu::DType kernel_dtype(at::ScalarType t) { return peftcore::kernel_dtype("sparse_attn", t); }

void check_cuda_dims(const char* op, const at::Tensor& q, const Dims& d) {
  check_cuda_activation(op, "q", q);
  TORCH_CHECK(cu::supported_head_dim(d.D), op, ": head dim must be 64, 128 or 256 on CUDA, got ", d.D,
              " (q of shape ", q.sizes(), ")");
  TORCH_CHECK(d.Hq <= 65535 && d.B <= 65535, op, ": batch and heads must be <= 65535 on CUDA, got B = ", d.B,
              ", Hq = ", d.Hq);
}

// The device's opt-in shared memory per block, lowered by PEFTCORE_SPARSE_ATTN_SMEM_LIMIT (bytes) when set: the
// GPU tests use it to run the smaller tiles of a 99 KB (sm_86 / sm_89) or 48 KB device on a larger one.
int64_t smem_limit(const at::Tensor& q) {
  int64_t lim = cu::smem_optin(q.device().index());
  if (const char* env = std::getenv("PEFTCORE_SPARSE_ATTN_SMEM_LIMIT")) {
    const long long v = std::atoll(env);
    if (v > 0) lim = std::min<int64_t>(lim, v);
  }
  return lim;
}

// The tile rows of `kernel` at head dim D on q's device, or a clear error when even the smallest tile does not fit.
int plan_tile(const char* op, const at::Tensor& q, int kernel, int64_t D) {
  const int64_t lim = smem_limit(q);
  const int t = tiles::plan(kernel, D, lim);
  TORCH_CHECK(t > 0, op, ": head dim ", D, " needs ", tiles::smem_bytes(kernel, D, tiles::smallest_tile(D)),
              " bytes of shared memory per block even with the smallest tile (", tiles::smallest_tile(D),
              " rows), but ", q.device(), " allows ", lim, " (opt-in maximum per block)");
  return t;
}

// Which kernels a call takes. PEFTCORE_SPARSE_ATTN_KERNEL: "auto" (or unset) takes the tensor-core forward
// (sparse_attn_tc_kernels.cuh) / backward (sparse_attn_tc_bwd_kernels.cuh) for float16 / bfloat16 at head dim 64 /
// 128 on compute capability >= 8 when one of its configurations fits the opt-in shared memory (smem_limit above),
// else the CUDA-core kernels; "simt" always takes the CUDA-core kernels (the on-GPU reference of the tests); "tc"
// takes the tensor-core kernels or raises why they cannot run. Returns the tensor-core configuration, tile_m = 0
// for the CUDA-core kernels.
tc::Config tc_config(const char* op, const at::Tensor& q, const Dims& d, bool backward) {
  const char* env = std::getenv("PEFTCORE_SPARSE_ATTN_KERNEL");
  const std::string mode = env != nullptr && *env != '\0' ? env : "auto";
  TORCH_CHECK(mode == "auto" || mode == "simt" || mode == "tc", op,
              ": PEFTCORE_SPARSE_ATTN_KERNEL must be auto, simt or tc, got \"", mode, "\"");
  if (mode == "simt") return {};
  constexpr int64_t kMaxLen = (int64_t{1} << 31) - 256;  // the kernel's in-tile row / key arithmetic is 32-bit
  std::string why;
  tc::Config c;
  if (q.scalar_type() != at::kHalf && q.scalar_type() != at::kBFloat16) {
    why = std::string("dtype ") + c10::toString(q.scalar_type()) + " (float16 and bfloat16 only)";
  } else if (d.D != 64 && d.D != 128) {
    why = "head dim " + std::to_string(d.D) + " (64 and 128 only)";
  } else if (cu::compute_major(q.device().index()) < 8) {
    why = "compute capability " + std::to_string(cu::compute_major(q.device().index())) + ".x (sm_80 or newer only)";
  } else if (d.Lq > kMaxLen || d.Lk > kMaxLen) {
    why = "sequence lengths above 2^31 - 256";
  } else {
    const int64_t lim = smem_limit(q);
    c = backward ? tc::bwd_plan(d.D, lim) : tc::plan(d.D, lim);
    if (c.tile_m == 0)
      why = "no configuration of head dim " + std::to_string(d.D) + " fits " + std::to_string(lim) +
            " bytes of shared memory per block";
    else if (!cu::tc_compiled(kernel_dtype(q.scalar_type()), d.D, c.tile_m, c.tile_n, c.warps))
      why = "not compiled in this build (the CUTLASS / CuTe headers were not found)";
  }
  TORCH_CHECK(mode != "tc" || why.empty(), op, ": PEFTCORE_SPARSE_ATTN_KERNEL=tc but the tensor-core ",
              backward ? "backward" : "forward", " cannot run: ", why);
  return why.empty() ? c : tc::Config{};
}

// The kept-tile lists of configuration c (device workspace, built on the stream): the forward's per query tile,
// and with `transposed` also the backward's per key tile. The returned tensors own the memory p points to.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> tc_lists(cu::Params& p, const tc::Config& c,
                                                                    const at::Tensor& q, const Dims& d,
                                                                    bool forward_lists, bool transposed) {
  p.tc_tile_m = c.tile_m;
  p.tc_tile_n = c.tile_n;
  p.tc_warps = c.warps;
  p.tc_Mt = ceil_div(d.Lq, c.tile_m);
  p.tc_Nt = ceil_div(d.Lk, c.tile_n);
  const auto opts = q.options().dtype(at::kInt);
  at::Tensor count, entries, count_t, entries_t;
  if (forward_lists) {
    const int64_t rows = d.mask_b * d.mask_h * p.tc_Mt;
    count = at::empty({rows}, opts);
    entries = at::empty({rows * p.tc_Nt}, opts);
    p.tc_count = count.mutable_data_ptr<int32_t>();
    p.tc_entries = entries.mutable_data_ptr<int32_t>();
    cu::tc_build_tiles(p, current_stream());
  }
  if (transposed) {
    const int64_t rows = d.mask_b * d.mask_h * p.tc_Nt;
    count_t = at::empty({rows}, opts);
    entries_t = at::empty({rows * p.tc_Mt}, opts);
    p.tc_t_count = count_t.mutable_data_ptr<int32_t>();
    p.tc_t_entries = entries_t.mutable_data_ptr<int32_t>();
    cu::tc_build_tiles_t(p, current_stream());
  }
  return {count, entries, count_t, entries_t};
}

cu::Params params_of(const Dims& d, bool causal) {
  cu::Params p;
  p.B = d.B;
  p.Hq = d.Hq;
  p.Hkv = d.Hkv;
  p.Lq = d.Lq;
  p.Lk = d.Lk;
  p.D = d.D;
  p.bs = d.bs;
  p.Qb = d.Qb;
  p.Kb = d.Kb;
  p.mask_b = d.mask_b;
  p.mask_h = d.mask_h;
  p.scale = static_cast<float>(d.scale);
  p.causal = causal;
  p.off = d.off;
  return p;
}

std::tuple<at::Tensor, at::Tensor> block_sparse_attn_cuda(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const at::Tensor& block_mask,
                                                          int64_t block_size, bool causal,
                                                          std::optional<double> scale, c10::string_view causal_align) {
  constexpr const char* op = "block_sparse_attn";
  const Dims d = check_attn_args(op, q, k, v, &block_mask, block_size, causal, scale, causal_align);
  check_cuda_dims(op, q, d);
  const c10::cuda::CUDAGuard guard(q.device());
  const tc::Config tcc = tc_config(op, q, d, /*backward=*/false);
  const int tile = tcc.tile_m != 0 ? 0 : plan_tile(op, q, tiles::kForward, d.D);
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), mc = block_mask.contiguous();
  auto out = at::empty({d.B, d.Hq, d.Lq, d.D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({d.B, d.Hq, d.Lq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  cu::Params p = params_of(d, causal);
  p.tile[tiles::kForward] = tile;
  p.q = qc.const_data_ptr();
  p.k = kc.const_data_ptr();
  p.v = vc.const_data_ptr();
  p.mask = mc.const_data_ptr<bool>();
  p.out = out.mutable_data_ptr();
  p.lse = lse.mutable_data_ptr<float>();
  if (tcc.tile_m == 0) {
    cu::forward(kernel_dtype(q.scalar_type()), p, current_stream());
    return {out, lse};
  }
  // Tensor-core forward: the kept-tile lists, then the attention kernel.
  const auto lists = tc_lists(p, tcc, q, d, /*forward_lists=*/true, /*transposed=*/false);
  cu::tc_forward(kernel_dtype(q.scalar_type()), p, current_stream());
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attn_backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& block_mask,
    int64_t block_size, bool causal, std::optional<double> scale, std::array<bool, 3> output_mask,
    c10::string_view causal_align) {
  constexpr const char* op = "block_sparse_attn_backward";
  const Dims d = check_attn_args(op, q, k, v, &block_mask, block_size, causal, scale, causal_align);
  check_cuda_dims(op, q, d);
  check_backward_args(op, d, q, grad_out, grad_lse, out, lse);
  const c10::cuda::CUDAGuard guard(q.device());
  const bool want_dq = output_mask[0], want_dkdv = output_mask[1] || output_mask[2];
  const tc::Config tcc = want_dq || want_dkdv ? tc_config(op, q, d, /*backward=*/true) : tc::Config{};
  const bool use_tc = tcc.tile_m != 0;
  const int tile_dq = want_dq && !use_tc ? plan_tile(op, q, tiles::kDq, d.D) : 0;
  const int tile_dkdv = want_dkdv && !use_tc ? plan_tile(op, q, tiles::kDkdv, d.D) : 0;
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), mc = block_mask.contiguous();
  auto gc = grad_out.contiguous(), oc = out.contiguous(), lc = lse.contiguous();
  at::Tensor glc;
  if (grad_lse.has_value() && grad_lse->defined()) glc = grad_lse->contiguous();
  at::Tensor dq = want_dq ? at::empty_like(qc) : at::empty({0}, q.options());
  // dK / dV rows of a key block no query block keeps are never visited by the CUDA-core kernel: start from zeros
  // there (the tensor-core kernels write every row).
  at::Tensor dk = !want_dkdv ? at::empty({0}, k.options()) : use_tc ? at::empty_like(kc) : at::zeros_like(kc);
  at::Tensor dv = !want_dkdv ? at::empty({0}, v.options()) : use_tc ? at::empty_like(vc) : at::zeros_like(vc);
  if (q.numel() > 0 && want_dq && k.numel() == 0) dq.zero_();
  if (k.numel() > 0 && want_dkdv && q.numel() == 0) {  // no query: nothing reaches k / v
    dk.zero_();
    dv.zero_();
  }
  if (q.numel() > 0 && k.numel() > 0 && (want_dq || want_dkdv)) {
    auto delta = at::empty({d.B, d.Hq, d.Lq}, q.options().dtype(at::kFloat));
    cu::Params p = params_of(d, causal);
    p.tile[tiles::kDq] = tile_dq;
    p.tile[tiles::kDkdv] = tile_dkdv;
    p.q = qc.const_data_ptr();
    p.k = kc.const_data_ptr();
    p.v = vc.const_data_ptr();
    p.mask = mc.const_data_ptr<bool>();
    p.out = const_cast<void*>(oc.const_data_ptr());
    p.lse = const_cast<float*>(lc.const_data_ptr<float>());
    p.grad_out = gc.const_data_ptr();
    p.grad_lse = glc.defined() ? glc.const_data_ptr<float>() : nullptr;
    p.delta = delta.mutable_data_ptr<float>();
    p.dq = want_dq ? dq.mutable_data_ptr() : nullptr;
    p.dk = want_dkdv ? dk.mutable_data_ptr() : nullptr;
    p.dv = want_dkdv ? dv.mutable_data_ptr() : nullptr;
    if (!use_tc) {
      cu::backward(kernel_dtype(q.scalar_type()), p, want_dq, want_dkdv, current_stream());
    } else {
      // Tensor-core backward: the forward's lists (dq) and the transposed ones (dk / dv), the GQA split of the dk /
      // dv grid for the device's SM count and its fp32 partials, then the kernels.
      const auto lists = tc_lists(p, tcc, q, d, want_dq, want_dkdv);
      at::Tensor part;
      if (want_dkdv) {
        p.tc_bwd_splits = tc::bwd_splits(d.B, d.Hkv, d.Hq / d.Hkv, p.tc_Nt, cu::sm_count(q.device().index()));
        if (p.tc_bwd_splits > 1) {
          part = at::empty({2, p.tc_bwd_splits, d.B, d.Hkv, d.Lk, d.D}, q.options().dtype(at::kFloat));
          p.dk_part = part[0].mutable_data_ptr<float>();
          p.dv_part = part[1].mutable_data_ptr<float>();
        }
      }
      cu::tc_backward(kernel_dtype(q.scalar_type()), p, want_dq, want_dkdv, current_stream());
    }
  }
  return {dq, output_mask[1] ? dk : at::empty({0}, k.options()), output_mask[2] ? dv : at::empty({0}, v.options())};
}

at::Tensor attn_block_pool_cuda(const at::Tensor& q, const at::Tensor& k, int64_t block_size, bool causal,
                                std::optional<double> scale, c10::string_view causal_align) {
  constexpr const char* op = "attn_block_pool";
  const Dims d = check_pool_args(op, q, k, block_size, causal, scale, causal_align);
  check_cuda_dims(op, q, d);
  const c10::cuda::CUDAGuard guard(q.device());
  const int tile = plan_tile(op, q, tiles::kPool, d.D);
  auto qc = q.contiguous(), kc = k.contiguous();
  auto pool = at::zeros({d.B, d.Hq, d.Qb, d.Kb}, q.options().dtype(at::kFloat));
  if (pool.numel() == 0) return pool;
  cu::Params p = params_of(d, causal);
  p.tile[tiles::kPool] = tile;
  p.q = qc.const_data_ptr();
  p.k = kc.const_data_ptr();
  p.pool = pool.mutable_data_ptr<float>();
  cu::block_pool(kernel_dtype(q.scalar_type()), p, current_stream());
  return pool;
}

// The tensor-core kept-tile lists, built by the CUDA builders (sparse_attn_tc.cu): the forward's (transposed =
// false) or the backward's transposed ones; the tests compare them with the CPU ops'.
std::tuple<at::Tensor, at::Tensor> tc_tiles_cuda(const char* op, bool transposed, const at::Tensor& block_mask,
                                                 int64_t q_len, int64_t k_len, int64_t block_size, bool causal,
                                                 c10::string_view causal_align, int64_t tile_m, int64_t tile_n) {
  const tc::TileGeom g = check_tc_tiles_args(op, block_mask, q_len, k_len, block_size, causal, causal_align, tile_m,
                                             tile_n);
  const c10::cuda::CUDAGuard guard(block_mask.device());
  auto mc = block_mask.contiguous();
  auto opts = block_mask.options().dtype(at::kInt);
  const int64_t per_head = transposed ? g.Nt : g.Mt, len = transposed ? g.Mt : g.Nt;
  auto count = at::empty({block_mask.size(0), block_mask.size(1), per_head}, opts);
  auto entries = at::empty({block_mask.size(0), block_mask.size(1), per_head, len}, opts);
  if (count.numel() == 0) return {count, entries};
  cu::Params p;
  p.mask = mc.const_data_ptr<bool>();
  p.Lq = q_len;
  p.Lk = k_len;
  p.bs = block_size;
  p.Qb = g.Qb;
  p.Kb = g.Kb;
  p.mask_b = block_mask.size(0);
  p.mask_h = block_mask.size(1);
  p.causal = causal;
  p.off = g.off;
  p.tc_tile_m = static_cast<int>(tile_m);
  p.tc_tile_n = static_cast<int>(tile_n);
  p.tc_Mt = g.Mt;
  p.tc_Nt = g.Nt;
  if (transposed) {
    p.tc_t_count = count.mutable_data_ptr<int32_t>();
    p.tc_t_entries = entries.mutable_data_ptr<int32_t>();
    cu::tc_build_tiles_t(p, current_stream());
  } else {
    p.tc_count = count.mutable_data_ptr<int32_t>();
    p.tc_entries = entries.mutable_data_ptr<int32_t>();
    cu::tc_build_tiles(p, current_stream());
  }
  return {count, entries};
}

std::tuple<at::Tensor, at::Tensor> sparse_attn_tc_tiles_cuda(const at::Tensor& block_mask, int64_t q_len,
                                                             int64_t k_len, int64_t block_size, bool causal,
                                                             c10::string_view causal_align, int64_t tile_m,
                                                             int64_t tile_n) {
  return tc_tiles_cuda("sparse_attn_tc_tiles", false, block_mask, q_len, k_len, block_size, causal, causal_align,
                       tile_m, tile_n);
}

std::tuple<at::Tensor, at::Tensor> sparse_attn_tc_tiles_t_cuda(const at::Tensor& block_mask, int64_t q_len,
                                                               int64_t k_len, int64_t block_size, bool causal,
                                                               c10::string_view causal_align, int64_t tile_m,
                                                               int64_t tile_n) {
  return tc_tiles_cuda("sparse_attn_tc_tiles_t", true, block_mask, q_len, k_len, block_size, causal, causal_align,
                       tile_m, tile_n);
}

}  // namespace

TORCH_LIBRARY_IMPL(peftcore, CUDA, m) {
  m.impl("block_sparse_attn", &block_sparse_attn_cuda);
  m.impl("block_sparse_attn_backward", &block_sparse_attn_backward_cuda);
  m.impl("attn_block_pool", &attn_block_pool_cuda);
  m.impl("sparse_attn_tc_tiles", &sparse_attn_tc_tiles_cuda);
  m.impl("sparse_attn_tc_tiles_t", &sparse_attn_tc_tiles_t_cuda);
}

}  // namespace peftcore::sparse_attn
