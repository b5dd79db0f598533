// miss CUDA launch planning: plain C++ (no torch, no CUDA headers), shared by the launchers (miss.cu) and the
// miss_vec_plan op (miss_cpu.cpp), which lets the CPU tests check the rule without a GPU.
//
// Vector width V = 16 / sizeof(T) when x / y (fold) or grad / out (unfold) start 16-byte aligned and both n and r
// are multiples of V (so every row, and every r-chunk of a row, starts aligned), else V = 1 (vec_plan.h).
//
// fold, V > 1 (work in units of V-element vectors: rv = r / V classes of vectors, nv = n / V vectors per row):
//  * rv <= 32: kFoldVecGroup. A row is a group of tx lanes (a power of two <= 32 covering nv, so short rows do
//    not idle a warp; ty = 256 / tx rows per block). copies = the largest power of two with rv * copies <= tx:
//    lanes p < rv * copies read vectors p, p + rv * copies, ..., so lane p's class p % rv never changes; a
//    shuffle tree (offsets copies / 2 * rv, ..., rv) leaves the class sums in lanes 0 .. rv - 1.
//  * rv > 32: kFoldVecCols. Thread c of a row walks vectors c, c + rv, ...: tx threads per row (a power of two
//    covering rv, <= 256), ty rows per block, grid.y over chunks of classes.
// fold, V = 1: the scalar kernels: kFoldNarrow (r <= 256: groups of `width` lanes per row, width from n) or
//    kFoldWide (r > 256: a thread per class, blockIdx.y over rows).
// unfold: kUnfold with V = 16 / sizeof(T) or 1: tx threads along a row's nv accesses x ty rows (vec_plan.h).
#pragma once
#include <algorithm>
#include <cstdint>

#include "vec_plan.h"

namespace peftcore::miss::plan {

enum Kind : int { kFoldNarrow = 0, kFoldWide = 1, kFoldVecGroup = 2, kFoldVecCols = 3, kUnfold = 4 };

constexpr int kThreads = vec_plan::kThreads;
constexpr int64_t kNarrowMaxGridX = int64_t{1} << 24;  // the narrow fold's blocks stride beyond this
constexpr int64_t kMaxGridY = 65535;

struct Launch {
  int kind;
  int vec;                   // elements per access
  int width;                 // kFoldNarrow: lanes per row group (32..256); else 0
  int copies;                // kFoldVecGroup: lanes per class (a power of two); else 0
  vec_plan::RowLaunch rows;  // block (tx x ty) and grid
};

inline Launch fold(int64_t rows, int64_t n, int64_t r, int64_t elem_size, uint64_t x_address, uint64_t y_address) {
  Launch l{};
  l.vec = vec_plan::vec_width(elem_size, {x_address, y_address}, {n, r});
  if (l.vec > 1) {
    const int64_t rv = r / l.vec, nv = n / l.vec;
    if (rv <= 32) {
      l.kind = kFoldVecGroup;
      const int tx = vec_plan::pow2_at_least(nv, 1, 32);  // >= rv, as r <= n
      l.copies = 1;
      while (rv * l.copies * 2 <= tx) l.copies *= 2;
      l.rows.tx = tx;
      l.rows.ty = kThreads / tx;
      l.rows.grid_x = std::max<int64_t>(1, std::min<int64_t>((rows + l.rows.ty - 1) / l.rows.ty, vec_plan::kMaxGridX));
      l.rows.grid_y = 1;
    } else {
      l.kind = kFoldVecCols;
      l.rows = vec_plan::row_launch(rows, rv);
    }
  } else if (r <= kThreads) {
    l.kind = kFoldNarrow;
    l.width = vec_plan::pow2_at_least(n, 32, kThreads);
    const int groups = kThreads / l.width;
    l.rows = {kThreads, 1, std::max<int64_t>(1, std::min<int64_t>((rows + groups - 1) / groups, kNarrowMaxGridX)), 1};
  } else {
    l.kind = kFoldWide;
    l.rows = {kThreads, 1, (r + kThreads - 1) / kThreads, std::max<int64_t>(1, std::min(rows, kMaxGridY))};
  }
  return l;
}

inline Launch unfold(int64_t rows, int64_t r, int64_t n, int64_t elem_size, uint64_t grad_address,
                     uint64_t out_address) {
  Launch l{};
  l.kind = kUnfold;
  l.vec = vec_plan::vec_width(elem_size, {grad_address, out_address}, {n, r});
  l.rows = vec_plan::row_launch(rows, n / l.vec);
  return l;
}

}  // namespace peftcore::miss::plan
