// partial CUDA launch planning: plain C++ (no torch, no CUDA headers), shared by the launchers (partial.cu) and
// the partial_vec_plan op (partial_cpu.cpp), which lets the CPU tests check the rule without a GPU.
//
// gather / scatter-add move a [tokens, k] contiguous buffer (gather's out, scatter-add's src) against scattered
// columns of the activation. Only the [tokens, k] side is vectorised (the other side's columns are arbitrary):
// 16-byte accesses when its address is 16-byte aligned and k is a multiple of V = 16 / sizeof(T) (then every
// row starts aligned), else V = 1. The block is tx threads along a row x ty rows (vec_plan.h).
#pragma once
#include <cstdint>

#include "vec_plan.h"

namespace peftcore::partial::plan {

struct Launch {
  int vec;                   // elements per access of the [tokens, k] side
  vec_plan::RowLaunch rows;  // block / grid
};

inline Launch rows(int64_t tokens, int64_t k, int64_t elem_size, uint64_t address) {
  const int v = vec_plan::vec_width(elem_size, {address}, {k});
  return {v, vec_plan::row_launch(tokens, k / v)};
}

}  // namespace peftcore::partial::plan
