// sparse_attn CUDA kernels instantiated for float storage (see sparse_attn_instantiate.cuh).
#include "sparse_attn/sparse_attn_instantiate.cuh"

PEFTCORE_SPARSE_ATTN_INSTANTIATE(float)
