// sparse_attn tensor-core backward (dq, dk / dv), float16, head dim 128, 64 x 64 tiles, 4 warps
// (sparse_attn_tc_bwd_kernels.cuh).
#include "sparse_attn/sparse_attn_tc_bwd_kernels.cuh"

PEFTCORE_SPARSE_ATTN_TC_BWD_INSTANTIATE(kFloat16, 128, 64, 64, 4)
