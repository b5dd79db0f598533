// token_elim CUDA launch planning: plain C++ (no torch, no CUDA headers), shared by the launchers
// (token_elim.cu) and the token_elim_vec_plan op (token_elim_cpu.cpp), which lets the CPU tests check the rule
// without a GPU.
//
// Every token_elim kernel walks `rows` rows of `width` elements (the elementwise MLP kernels: one row of n). It
// moves 16 bytes per access (V = 16 / sizeof(T)) when every buffer it vectorises starts 16-byte aligned and width
// is a multiple of V (so every row starts aligned), else one element (V = 1):
//   gather_rows / scatter_add_rows   rows B * K of F: x / src and out (both sides are whole rows)
//   gather_cols                      rows T of C: out only (the source columns are scattered)
//   silu_mul(_backward)              one row of n: every operand
// The block is tx threads along a row x ty rows (vec_plan.h).
#pragma once
#include <cstdint>
#include <initializer_list>

#include "vec_plan.h"

namespace peftcore::token_elim::plan {

struct Launch {
  int vec;                   // elements per access
  vec_plan::RowLaunch rows;  // block / grid
};

inline Launch rows(int64_t rows, int64_t width, int64_t elem_size, std::initializer_list<uint64_t> addresses) {
  const int v = vec_plan::vec_width(elem_size, addresses, {width});
  return {v, vec_plan::row_launch(rows, width / v)};
}

}  // namespace peftcore::token_elim::plan
