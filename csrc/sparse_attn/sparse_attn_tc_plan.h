// sparse_attn tensor-core forward: the host-side plan and the kept-tile lists. Plain C++ (no torch, no CUDA
// headers; the tile functions are __host__ __device__ under nvcc), shared by the CUDA kernels
// (sparse_attn_tc_kernels.cuh, sparse_attn_tc.cu), the CUDA glue and the CPU ops sparse_attn_tc_plan /
// sparse_attn_tc_tiles, which let the CPU tests check both without a GPU.
//
// Configurations. The kernel holds one tile of tile_m query rows and two stages of tile_n key rows of K and V in
// shared memory, in the storage dtype (2 bytes): 2 D (tile_m + 4 tile_n) bytes. Each configuration is one
// compiled instantiation per dtype (sparse_attn_tc_{f16,bf16}_d{64,128}.cu); plan() takes the first one of a head
// dim that fits the device's opt-in shared memory per block, and none (tile_m = 0: the CUDA-core kernel runs) when
// none fits. 64 x 64 tiles with 4 warps (16 query rows per warp) need 40 KB at D = 64 and 80 KB at D = 128, so
// every arch the wheel targets runs them (sm_80 163 KB, sm_86 / sm_89 99 KB, sm_90 227 KB). 64-row query tiles
// also keep the union of kept key tiles small at block_size 64 (a 128-row tile would take the union of two query
// blocks' key sets).
//
// Kept-tile lists. Query tiles are m = 0 .. Mt-1 (rows [m tile_m, min((m+1) tile_m, Lq))), key tiles n = 0 ..
// Nt-1, independent of the mask's block_size bs. Key tile n is kept for query tile m when some block pair (I, J)
// the two tiles overlap is kept by the mask and, when causal, has a key visible to a query inside the overlap
// (its first key column <= its last query row + off). A kept tile is "partial" when some overlapped pair that
// causal leaves something visible in is masked: the kernel then checks the block mask per element; other kept
// tiles skip that check (causal and the Lk bound are checked separately, per tile). With bs < tile a tile takes
// several blocks, with bs > tile a block spans several tiles.
// Lists are per (mask batch, mask head, query tile) row: count [rows] and entries [rows, Nt] int32, entry
// 2 n + partial, ascending in n, -1 after the count (FlexAttention's kv_num_blocks / kv_indices form with a flag).
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define PEFTCORE_SA_HD __host__ __device__ __forceinline__
#else
#define PEFTCORE_SA_HD inline
#endif

namespace peftcore::sparse_attn::tc {

// One compiled configuration: tile_m query rows, tile_n key rows, warps (16 query rows per warp and m16 atom).
struct Config {
  int tile_m = 0, tile_n = 0, warps = 0;
};

constexpr int kMaxConfigs = 1;

// The configurations compiled for head dim D, best first (tile_m = 0 ends the list). Keep in step with the
// instantiations (sparse_attn_tc_*.cu) and with_config() in sparse_attn_tc.cu.
constexpr Config config_candidate(int64_t D, int i) {
  if ((D == 64 || D == 128) && i == 0) return Config{64, 64, 4};
  return Config{};
}

// Dynamic shared memory of a configuration: Q, then two stages of K and two of V, 2-byte elements.
constexpr int64_t smem_bytes(int64_t D, const Config& c) { return 2 * D * (c.tile_m + 4 * c.tile_n); }

// The first compiled configuration of head dim D that fits `smem_limit` bytes; tile_m = 0 when none does.
constexpr Config plan(int64_t D, int64_t smem_limit) {
  for (int i = 0; i < kMaxConfigs; ++i) {
    const Config c = config_candidate(D, i);
    if (c.tile_m != 0 && smem_bytes(D, c) <= smem_limit) return c;
  }
  return Config{};
}

// Backward (sparse_attn_tc_bwd_kernels.cuh): the same tile shapes, two kernels.
//   dQ    per (query tile, query head, batch) over the forward's lists: Q and dO [tile_m, D] once, K and V
//         [tile_n, D] in two stages each: 2 D (2 tile_m + 4 tile_n) bytes.
//   dK dV per (key tile, kv head, batch, split) over the transposed lists: K and V [tile_n, D] once, Q and dO
//         [tile_m, D] in two stages each, plus lse and Delta (fp32) of the tile's query rows per stage:
//         2 D (2 tile_n + 4 tile_m) + 16 tile_m bytes.
// 64 x 64 tiles, 4 warps: 48 / 49 KB at D = 64 and 96 / 97 KB at D = 128, under every target arch's opt-in limit.
enum BwdKernel : int { kBwdDq = 0, kBwdDkdv = 1 };

constexpr int64_t bwd_smem_bytes(int kernel, int64_t D, const Config& c) {
  return kernel == kBwdDq ? 2 * D * (2 * c.tile_m + 4 * c.tile_n) : 2 * D * (2 * c.tile_n + 4 * c.tile_m) + 16 * c.tile_m;
}

// The first compiled backward configuration of head dim D whose two kernels both fit `smem_limit`; tile_m = 0 when
// none does (the CUDA-core backward runs).
constexpr Config bwd_plan(int64_t D, int64_t smem_limit) {
  for (int i = 0; i < kMaxConfigs; ++i) {
    const Config c = config_candidate(D, i);
    if (c.tile_m != 0 && bwd_smem_bytes(kBwdDq, D, c) <= smem_limit && bwd_smem_bytes(kBwdDkdv, D, c) <= smem_limit)
      return c;
  }
  return Config{};
}

// CTAs the dK / dV grid aims for, per SM of the device: two (shared memory lets one to four CTAs of this kernel
// share an SM, depending on D and the arch), so that no SM idles while others run a long causal column.
constexpr int64_t kBwdCtasPerSm = 2;

// How many CTAs share the query heads of one (key tile, kv head, batch) in the dK / dV kernel. One CTA per
// (key tile, kv head, batch) owns its dK / dV rows (no reduction); when that grid (B Hkv Nt CTAs) is smaller than
// kBwdCtasPerSm x sm_count, the G = Hq / Hkv query heads of a GQA / MQA group are dealt round-robin to up to G
// CTAs (split s takes heads s, s + splits, ...), which write fp32 partial sums that a second pass adds up in
// split order (deterministic). MHA (G = 1) and large grids: 1.
constexpr int64_t bwd_splits(int64_t B, int64_t Hkv, int64_t G, int64_t Nt, int64_t sm_count) {
  const int64_t ctas = B * Hkv * Nt, target = kBwdCtasPerSm * sm_count;
  if (ctas <= 0 || G <= 1 || ctas >= target) return 1;
  const int64_t want = (target + ctas - 1) / ctas;
  return want < G ? want : G;
}

// Tile geometry of one call.
struct TileGeom {
  int64_t Lq = 0, Lk = 0, bs = 1, Qb = 0, Kb = 0;
  bool causal = false;
  int64_t off = 0;  // causal: key j visible to query i iff j <= i + off
  int64_t tile_m = 64, tile_n = 64, Mt = 0, Nt = 0;
};

PEFTCORE_SA_HD int64_t cdiv(int64_t a, int64_t b) { return a <= 0 ? 0 : (a - 1) / b + 1; }
PEFTCORE_SA_HD int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
PEFTCORE_SA_HD int64_t imax(int64_t a, int64_t b) { return a > b ? a : b; }

PEFTCORE_SA_HD TileGeom make_geom(int64_t Lq, int64_t Lk, int64_t bs, bool causal, int64_t off, int64_t tile_m,
                                  int64_t tile_n) {
  TileGeom g;
  g.Lq = Lq;
  g.Lk = Lk;
  g.bs = bs;
  g.Qb = cdiv(Lq, bs);
  g.Kb = cdiv(Lk, bs);
  g.causal = causal;
  g.off = causal ? off : 0;
  g.tile_m = tile_m;
  g.tile_n = tile_n;
  g.Mt = cdiv(Lq, tile_m);
  g.Nt = cdiv(Lk, tile_n);
  return g;
}

enum TileState : int { kSkip = 0, kKeep = 1, kKeepPartial = 3 };

// Key tile n for query tile m under one mask head (`mask`: bool [Qb, Kb] row-major): kSkip, kKeep or kKeepPartial.
PEFTCORE_SA_HD int tile_state(const bool* mask, const TileGeom& g, int64_t m, int64_t n) {
  const int64_t r0 = m * g.tile_m, r1 = imin(r0 + g.tile_m, g.Lq) - 1;  // rows [r0, r1]
  const int64_t c0 = n * g.tile_n, c1 = imin(c0 + g.tile_n, g.Lk) - 1;  // keys [c0, c1]
  if (r1 < r0 || c1 < c0) return kSkip;
  if (g.causal && c0 > r1 + g.off) return kSkip;  // every key after every row
  bool keep = false, masked = false;
  for (int64_t I = r0 / g.bs; I <= r1 / g.bs; ++I) {
    const int64_t last_row = imin((I + 1) * g.bs - 1, r1);  // of block I inside the tile
    const bool* row = mask + I * g.Kb;
    for (int64_t J = c0 / g.bs; J <= c1 / g.bs; ++J) {
      const int64_t first_key = imax(J * g.bs, c0);  // of block J inside the tile
      if (g.causal && first_key > last_row + g.off) break;  // this and later J: nothing visible
      if (row[J]) keep = true;
      else masked = true;
    }
  }
  return keep ? (masked ? kKeepPartial : kKeep) : kSkip;
}

PEFTCORE_SA_HD int32_t encode_entry(int64_t n, int state) {
  return static_cast<int32_t>(2 * n + (state == kKeepPartial ? 1 : 0));
}

// One row of the lists (host reference of the device builder in sparse_attn_tc.cu): writes the kept key tiles
// of query tile m into entries[0, Nt) (then -1) and returns their count.
inline int32_t build_row(const bool* mask, const TileGeom& g, int64_t m, int32_t* entries) {
  int32_t count = 0;
  for (int64_t n = 0; n < g.Nt; ++n) {
    const int st = tile_state(mask, g, m, n);
    if (st != kSkip) entries[count++] = encode_entry(n, st);
  }
  for (int64_t i = count; i < g.Nt; ++i) entries[i] = -1;
  return count;
}

// One row of the transposed lists (the dK / dV kernel's; host reference of the device builder): the query tiles m
// for which key tile n is kept, entries 2 m + partial ascending in m, -1 after the count, into entries[0, Mt).
inline int32_t build_col(const bool* mask, const TileGeom& g, int64_t n, int32_t* entries) {
  int32_t count = 0;
  for (int64_t m = 0; m < g.Mt; ++m) {
    const int st = tile_state(mask, g, m, n);
    if (st != kSkip) entries[count++] = encode_entry(m, st);
  }
  for (int64_t i = count; i < g.Mt; ++i) entries[i] = -1;
  return count;
}

}  // namespace peftcore::sparse_attn::tc
