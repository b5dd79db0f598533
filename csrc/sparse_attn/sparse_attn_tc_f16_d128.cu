// sparse_attn tensor-core forward, float16, head dim 128, 64 x 64 tiles, 4 warps (sparse_attn_tc_kernels.cuh).
#include "sparse_attn/sparse_attn_tc_kernels.cuh"

PEFTCORE_SPARSE_ATTN_TC_INSTANTIATE(kFloat16, 128, 64, 64, 4)
