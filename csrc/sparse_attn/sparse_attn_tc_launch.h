// sparse_attn tensor-core forward: the per-instantiation launchers (no CuTe here). Defined by
// sparse_attn_tc_kernels.cuh, instantiated once per compiled (dtype, head dim, configuration) in
// sparse_attn_tc_{f16,bf16}_d{64,128}.cu, called by the dispatch in sparse_attn_tc.cu.
#pragma once
#include "sparse_attn/sparse_attn_launch.h"

namespace peftcore::sparse_attn::cuda::tc_kernels {

// kDType: static_cast<int>(CudaDType) (float16 or bfloat16). Launches one CTA per (query tile, query head, batch)
// over the kept-tile lists in p.tc_count / p.tc_entries.
template <int kDType, int kD, int kBM, int kBN, int kWarps>
void forward_launch(const Params& p, cudaStream_t stream);

}  // namespace peftcore::sparse_attn::cuda::tc_kernels
