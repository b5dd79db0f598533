// sparse_attn CUDA kernels instantiated for __nv_bfloat16 storage (see sparse_attn_instantiate.cuh).
#include "sparse_attn/sparse_attn_instantiate.cuh"

PEFTCORE_SPARSE_ATTN_INSTANTIATE(__nv_bfloat16)
