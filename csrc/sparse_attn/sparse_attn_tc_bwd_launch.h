// sparse_attn tensor-core backward: the per-instantiation launchers (no CuTe here). Defined by
// sparse_attn_tc_bwd_kernels.cuh, instantiated once per compiled (dtype, head dim, configuration) in
// sparse_attn_tc_bwd_{f16,bf16}_d{64,128}.cu, called by tc_backward in sparse_attn_tc.cu.
#pragma once
#include "sparse_attn/sparse_attn_launch.h"

namespace peftcore::sparse_attn::cuda::tc_kernels {

// Query rows per S^T piece in the dK / dV kernel: the whole query tile at D = 64; 16 at D >= 128, where the dK and
// dV accumulators (2 D fp32 registers per thread) leave no room for a 64-wide S^T and dP^T beside them.
constexpr int bwd_sub_rows(int D, int tile_m) { return D >= 128 ? 16 : tile_m; }

// kDType: static_cast<int>(CudaDType) (float16 or bfloat16). dq: one CTA per (query tile, query head, batch) over
// p.tc_count / p.tc_entries. dk / dv: one CTA per (key tile, kv head x split, batch) over p.tc_t_count /
// p.tc_t_entries, into p.dk / p.dv (split 1) or p.dk_part / p.dv_part.
template <int kDType, int kD, int kBM, int kBN, int kWarps>
void backward_dq_launch(const Params& p, cudaStream_t stream);
template <int kDType, int kD, int kBM, int kBN, int kWarps>
void backward_dkdv_launch(const Params& p, cudaStream_t stream);

}  // namespace peftcore::sparse_attn::cuda::tc_kernels
