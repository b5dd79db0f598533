// sparse_delta CUDA tile planner: plain C++ (no torch, no CUDA headers), shared by the CUDA launchers
// (sparse_delta.cu) and the sparse_delta_tile_plan op, which lets the CPU tests check the plan without a GPU.
//
// The kernels (sparse_delta_kernels.cuh) walk a CSR matrix M [rows, cols] — S itself for spmm / sddmm, S^T through
// its cached CSC view for spmm_t — for a tile of TT tokens, a block of R rows and one column chunk of CW columns at
// a time. Per block, dynamic shared memory holds
//   xs  [CW][TT]     activations of the token tile, restricted to the column chunk (storage dtype)
//   acc [R][TT|1]    fp32 per (row, token): spmm's output tile / sddmm's staged grad rows
//   cur [R]          int64 per-row cursor into the row's nonzeros (columns ascend within a row, so the walk over
//                    successive column chunks resumes where the previous chunk stopped)
// so TT and R are free of the input width: only CW shrinks with shared memory, never the token tile.
//
// L2-traffic estimate (bytes, what the rule minimises). With D = bytes of the delta a block re-reads per token tile
// (spmm: nnz * (4 index + 4 value) + (rows + 1) * 8 row pointers; sddmm: nnz * (4 index + 8 read-modify-write of
// the fp32 output) + pointers), E the activation element size:
//   traffic = ceil(T / TT) * D  +  T * cols * E * ceil(rows / R)  +  T * rows * E * (2 for spmm's y RMW, 1 for g)
// The first term is the delta re-read once per token tile (the old kernels had TT = 1 for cols >= ~9.7K in bf16:
// ~44 GB at T = 8192 for Llama's down_proj [4096, 11008] at 1%); the second is x re-staged once per row block.
// Example, that down_proj at T = 8192, bf16, 1% (nnz 451K), sm_90 (budget 112 KB, 132 SMs): TT = 32, R = 512,
// CW = 640: 256 * 3.6 MB + 180 MB * 8 + 134 MB ~= 2.5 GB.
//
// The rule (plan()): over the compiled token tiles TT in {32, 16, 8, 4, 1} not above the smallest one holding all
// tokens, and R in {1024, 512, 256, 128, 64, 32} (capped at rows rounded up to 8), keep the pairs whose shared
// memory leaves a column chunk of at least min(cols, 256) within the budget (CW = the most columns that fit,
// a multiple of 32, at most cols) and whose grid fits CUDA's limits. Among those that launch at least 2 blocks
// per SM (counting sddmm's token splits), take the least traffic (ties: larger TT, then larger R); when none
// does, the most blocks (ties: least traffic). The budget is min(opt-in, max(48 KB, opt-in / 2 - 1.5 KB)), so two
// blocks share an SM where the device allows it (sm_80: 80 KB, sm_86/89: 48 KB, sm_90: 112 KB).
#pragma once
#include <cstdint>

namespace peftcore::sparse_delta::plan {

enum Kernel : int { kSpmm = 0, kSddmm = 1 };

constexpr int kTokenTiles[] = {32, 16, 8, 4, 1};  // compiled instances (sparse_delta.cu dispatch_tt)
constexpr int64_t kRowBlocks[] = {1024, 512, 256, 128, 64, 32};
constexpr int64_t kMinCols = 256;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 2147483647;

struct Plan {
  int tt = 0;           // tokens per tile; 0: nothing to launch (empty problem) or no configuration fits
  int64_t rows = 0;     // R: rows of M per block
  int64_t cols = 0;     // CW: columns per chunk
  int64_t splits = 1;   // sddmm: token splits along grid y (float atomics when > 1)
  int64_t smem = 0;     // dynamic shared memory bytes
  int64_t grid_x = 0, grid_y = 0;
  int64_t traffic = 0;  // estimated L2 bytes (see above)
};

constexpr int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t align16(int64_t v) { return (v + 15) / 16 * 16; }

constexpr int64_t budget(int64_t optin) {
  const int64_t half = optin / 2 - 1536;
  const int64_t pref = half > 48 * 1024 ? half : 48 * 1024;
  return pref < optin ? pref : optin;
}

constexpr int64_t smem_bytes(int tt, int64_t rows, int64_t cols, int64_t elem) {
  return align16(cols * tt * elem) + align16(rows * (tt | 1) * 4) + rows * 8;
}

// The plan for `kernel` on M [rows, cols] (spmm_t: rows = S's in, cols = S's out) with `tokens` tokens of element
// size `elem` bytes, nnz nonzeros, `optin` bytes of opt-in shared memory per block and `sms` SMs.
constexpr Plan plan(int kernel, int64_t tokens, int64_t rows, int64_t cols, int64_t nnz, int64_t elem, int64_t optin,
                    int64_t sms, bool deterministic) {
  Plan best{};
  if (tokens <= 0 || rows <= 0 || cols <= 0 || nnz <= 0 || elem <= 0) return best;
  const int64_t lim = budget(optin);
  const int64_t target = 2 * (sms > 0 ? sms : 1);
  const int64_t min_cols = cols < kMinCols ? cols : kMinCols;
  const int64_t rows8 = cdiv(rows, 8) * 8;
  int tt_max = 32;
  for (int tt : kTokenTiles)
    if (tt >= tokens) tt_max = tt;
  bool best_ok = false;
  int64_t best_blocks = 0;
  for (int tt : kTokenTiles) {
    if (tt > tt_max) continue;
    int64_t prev_r = 0;
    for (int64_t r_cand : kRowBlocks) {
      const int64_t R = r_cand < rows8 ? r_cand : rows8;
      if (R == prev_r) continue;
      prev_r = R;
      const int64_t fixed = align16(R * (tt | 1) * 4) + R * 8 + 16;
      if (fixed >= lim) continue;
      int64_t cw = (lim - fixed) / (tt * elem) / 32 * 32;
      if (cw > cols) cw = cols;
      if (cw < min_cols || cw <= 0) continue;
      const int64_t tiles = cdiv(tokens, tt), rblocks = cdiv(rows, R);
      Plan p{};
      p.tt = tt;
      p.rows = R;
      p.cols = cw;
      p.smem = smem_bytes(tt, R, cw, elem);
      int64_t blocks = 0;
      if (kernel == kSpmm) {
        if (tiles > kMaxGridX || rblocks > kMaxGridY) continue;
        p.grid_x = tiles;
        p.grid_y = rblocks;
        blocks = tiles * rblocks;
        p.traffic = tiles * (nnz * 8 + (rows + 1) * 8) + tokens * cols * elem * rblocks + 2 * tokens * rows * elem;
      } else {
        if (rblocks > kMaxGridX) continue;
        int64_t splits = 1;
        if (!deterministic) {
          splits = cdiv(target, rblocks);
          if (splits > tiles) splits = tiles;
          if (splits > kMaxGridY) splits = kMaxGridY;
          if (splits < 1) splits = 1;
          const int64_t per = tiles / splits > 0 ? tiles / splits : 1;  // tiles per split, rounded down,
          splits = cdiv(tiles, per);                                      // so no split is empty and none is lost
        }
        p.splits = splits;
        p.grid_x = rblocks;
        p.grid_y = splits;
        blocks = rblocks * splits;
        p.traffic = tiles * (nnz * 12 + (rows + 1) * 8) + tokens * cols * elem * rblocks + tokens * rows * elem;
      }
      const bool ok = blocks >= target;
      bool better = false;
      if (best.tt == 0) better = true;
      else if (ok != best_ok) better = ok;
      else if (ok) better = p.traffic < best.traffic;  // candidates come larger-TT / larger-R first: ties keep those
      else better = blocks > best_blocks || (blocks == best_blocks && p.traffic < best.traffic);
      if (better) {
        best = p;
        best_ok = ok;
        best_blocks = blocks;
      }
    }
  }
  return best;
}

}  // namespace peftcore::sparse_delta::plan
