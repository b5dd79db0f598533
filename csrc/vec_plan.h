// Launch planning of the memory-bound row kernels (partial, token_elim, miss): plain C++ (no torch, no CUDA),
// shared by their CUDA launchers and their *_vec_plan ops, so the CPU tests check the rule without a GPU.
//
// Vector width. A kernel moves V = 16 / sizeof(T) elements per 16-byte load / store when every base address it
// vectorises is 16-byte aligned and every extent it steps by (row strides and row lengths, in elements) is a
// multiple of V; otherwise V = 1 (the scalar instantiation of the same kernel, or the family's scalar kernel).
//
// Row mapping. A block of kThreads threads is tx x ty: tx threads along a row (a power of two covering the row's
// accesses, at most kThreads), ty = kThreads / tx rows side by side, so a row of a few accesses does not idle a
// block (k = 1: 256 rows per block). grid.x strides over row groups, grid.y over chunks of tx accesses.
#pragma once
#include <algorithm>
#include <cstdint>
#include <initializer_list>

namespace peftcore::vec_plan {

constexpr int kBytes = 16;
constexpr int kThreads = 256;
constexpr int64_t kMaxGridX = int64_t{1} << 20;  // rows stride beyond this many blocks
constexpr int64_t kMaxGridY = 65535;

// Elements per access for elem_size-byte elements (see above): kBytes / elem_size or 1.
inline int vec_width(int64_t elem_size, std::initializer_list<uint64_t> addresses,
                     std::initializer_list<int64_t> extents) {
  if (elem_size <= 0 || elem_size >= kBytes || kBytes % elem_size != 0) return 1;
  const int v = static_cast<int>(kBytes / elem_size);
  for (uint64_t a : addresses)
    if (a % kBytes != 0) return 1;
  for (int64_t e : extents)
    if (e % v != 0) return 1;
  return v;
}

// Smallest power of two >= x, clamped to [lo, hi] (lo, hi powers of two).
inline int pow2_at_least(int64_t x, int lo, int hi) {
  int p = lo;
  while (p < hi && p < x) p *= 2;
  return p;
}

struct RowLaunch {
  int tx, ty;             // block shape (tx * ty == kThreads)
  int64_t grid_x, grid_y;  // row groups, access chunks
};

// rows rows of `units` accesses each (units = row length / V).
inline RowLaunch row_launch(int64_t rows, int64_t units) {
  RowLaunch l{};
  l.tx = pow2_at_least(units, 1, kThreads);
  l.ty = kThreads / l.tx;
  l.grid_x = std::max<int64_t>(1, std::min<int64_t>((rows + l.ty - 1) / l.ty, kMaxGridX));
  l.grid_y = std::max<int64_t>(1, std::min<int64_t>((units + l.tx - 1) / l.tx, kMaxGridY));
  return l;
}

}  // namespace peftcore::vec_plan
