// Which kernel runs the Monarch forward on CUDA: a plain host function (no CUDA, no torch), shared by the CUDA glue
// (blockdiag_cuda.cpp), the launcher (blockdiag.cu) and the monarch_forward_plan op (blockdiag_cpu.cpp), which lets
// the CPU tests check the rule without a GPU.
//
// Two ways to run y = monarch(x, w1 [k, q, p], w2 [l, s, r]) over T tokens:
//   * fused (blockdiag_kernels.cuh): one CTA per tile of up to 16 tokens keeps the tile's x and intermediate in
//     shared memory (fp32) and computes both stages with CUDA-core FMAs; every CTA reads all the weights (through
//     L1/L2). Its cost per token is 2 * (k*p*q + l*s*r) FLOPs on CUDA cores plus, per CTA, the weights'
//     (k*q*p + l*s*r) elements from L2.
//   * batched GEMMs (bmm_monarch_forward in blockdiag.h): two cuBLAS strided-batched GEMMs on tensor cores, with
//     permuting copies of x, the intermediate and y through global memory (about 3 extra round trips of the
//     activations).
// The fused kernel wins only where the per-block GEMMs are too small for tensor-core tiles to pay: a block's
// inner dimension (p for stage 1, r for stage 2) and outer dimension (q, s) of at most kFusedMaxBlock (32). There
// each output costs at most 32 FMAs, the weights are at most 32 * (in + out) elements (L2-resident: 512 KB in
// bf16 at in = out = 4096), and the two batched GEMMs would run K <= 32 tiles that spend more time on the permuting
// copies than on math. Above that (e.g. d = 4096 in 4 / 16 / 64 blocks: blocks of 1024 / 256 / 64) the GEMMs run
// on tensor cores and the fused kernel would re-read megabytes of weights per 16 tokens. A shape whose
// per-token tile does not fit the shared memory takes the GEMMs too.
// This rule is a design estimate; the GPU bench (bench/bench_blockdiag.py) compares both forms side by side.
#pragma once
#include <algorithm>
#include <cstdint>

namespace peftcore::blockdiag::plan {

constexpr int64_t kFusedMaxBlock = 32;  // largest p, q, r, s the fused kernel takes by default
constexpr int64_t kFusedMaxTile = 16;   // tokens per CTA of the fused kernel
constexpr int64_t kDefaultSmem = 48 * 1024;  // a CTA within this needs no opt-in (more CTAs per SM)

enum class Path : int { kBatchedGemm = 0, kFused = 1 };

struct MonarchPlan {
  Path path = Path::kBatchedGemm;
  int tile = 0;        // tokens per CTA (fused only)
  int64_t smem = 0;    // dynamic shared memory bytes per CTA (fused only)
};

// The fused kernel's tile for these shapes within `smem_limit` bytes (the device's opt-in limit), or tile 0.
inline MonarchPlan fused_tile(int64_t k, int64_t q, int64_t p, int64_t smem_limit) {
  MonarchPlan m;
  const int64_t per_token = (k * p + k * q) * static_cast<int64_t>(sizeof(float));  // x tile + intermediate, fp32
  if (per_token <= 0) return m;
  int64_t tile = std::min<int64_t>(kFusedMaxTile, std::min(kDefaultSmem, smem_limit) / per_token);
  if (tile < 1) tile = std::min<int64_t>(kFusedMaxTile, smem_limit / per_token);
  if (tile < 1) return m;
  m.path = Path::kFused;
  m.tile = static_cast<int>(tile);
  m.smem = tile * per_token;
  return m;
}

// mode: 0 auto (the rule above), 1 fused whenever it fits (batched GEMMs otherwise), 2 batched GEMMs always.
inline MonarchPlan monarch_forward(int64_t tokens, int64_t k, int64_t q, int64_t p, int64_t l, int64_t s, int64_t r,
                                   int64_t smem_limit, int mode = 0) {
  (void)tokens;  // the rule does not depend on T: both forms scale linearly in it once the GPU is full
  (void)l;
  if (mode == 2) return {};
  if (mode == 0 && std::max({p, q, r, s}) > kFusedMaxBlock) return {};
  return fused_tile(k, q, p, smem_limit);
}

}  // namespace peftcore::blockdiag::plan
