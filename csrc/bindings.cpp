// Every peftcore schema, one comment each. Kernels register themselves per backend from their own files
// (TORCH_LIBRARY_IMPL(peftcore, CPU|CUDA, m)); fake kernels and autograd live in python/peftcore/ops/.
#include <Python.h>  // first, as Python asks; the stable ABI only (see PyInit__C below)

#include <torch/library.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>

#include <string>
#include <vector>

TORCH_LIBRARY(peftcore, m) {
  // ---- sparse_delta: W + scale*S with S given by sorted unique flat indices r*in+c and values [nnz] ----
  // y = x @ (W + scale*S)^T + bias, never materialising W + scale*S.
  m.def("sparse_delta_linear(Tensor x, Tensor weight, Tensor? bias, Tensor indices, Tensor values, float scale=1.0, Tensor? row_ptr=None, Tensor? csc_ptr=None, Tensor? csc_idx=None, Tensor? csc_perm=None) -> Tensor");
  // Backward of sparse_delta_linear: (grad_x, grad_values, grad_bias); outputs not asked for in output_mask are empty.
  m.def("sparse_delta_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor indices, Tensor values, float scale, bool[3] output_mask, Tensor? row_ptr=None, Tensor? csc_ptr=None, Tensor? csc_idx=None, Tensor? csc_perm=None) -> (Tensor, Tensor, Tensor)");
  // y = scale * x @ S^T for x [..., in], S [out_features, in]: the sparse half of the forward.
  m.def("sparse_delta_spmm(Tensor x, Tensor indices, Tensor values, int out_features, float scale=1.0, Tensor? row_ptr=None) -> Tensor");
  // y = scale * g @ S for g [..., out], S [out, in_features]: the sparse half of grad_x.
  m.def("sparse_delta_spmm_t(Tensor grad, Tensor indices, Tensor values, int in_features, float scale=1.0, Tensor? csc_ptr=None, Tensor? csc_idx=None, Tensor? csc_perm=None) -> Tensor");
  // SDDMM: out[k] = scale * sum_t grad[t, r_k] * x[t, c_k], fp32 accumulation; the values' gradient.
  m.def("sparse_delta_sddmm(Tensor grad, Tensor x, Tensor indices, float scale=1.0, ScalarType? out_dtype=None, Tensor? row_ptr=None) -> Tensor");
  // In place W += scale*S (unmerge with -scale).
  m.def("sparse_delta_merge_(Tensor(a!) weight, Tensor indices, Tensor values, float scale=1.0) -> ()");
  // Out of place W + scale*S.
  m.def("sparse_delta_merge(Tensor weight, Tensor indices, Tensor values, float scale=1.0) -> Tensor");
  // The k positions with largest |grad^T x| not in `exclude` (sorted flat indices), tile by tile: (indices int64 ascending, scores fp32).
  m.def("sparse_delta_topk_grad(Tensor grad, Tensor x, int k, Tensor? exclude=None) -> (Tensor, Tensor)");
  // Host-side validation (syncs on CUDA): indices 1-D int32/int64, sorted ascending, unique, in [0, out*in).
  m.def("sparse_delta_validate(Tensor indices, int out_features, int in_features) -> ()");
  // The CSR / CSC view of a delta, (row_ptr, csc_ptr, csc_idx, csc_perm), to pass to the ops above (no host sync).
  m.def("sparse_delta_csr(Tensor indices, int out_features, int in_features) -> (Tensor, Tensor, Tensor, Tensor)");
  // The CUDA launchers' tile plan for one kernel, as [tt, rows, cols, splits, smem, grid_x, grid_y, traffic].
  m.def("sparse_delta_tile_plan(str kernel, int tokens, int in_features, int out_features, int nnz, ScalarType dtype, int smem_optin, int sms, bool deterministic=False) -> int[]");
  // ---- partial: trainable delta on the rows (dim 0) or columns (dim 1) of W picked by a sorted unique int64 index ----
  // y = x @ W_eff^T + bias, W_eff = W with delta ([k,in] / [out,k]) added at index; range_start >= 0: index is [range_start, +k).
  m.def("partial_linear(Tensor x, Tensor weight, Tensor? bias, Tensor delta, Tensor index, int dim, int range_start=-1) -> Tensor");
  // Backward of partial_linear: (grad_x, grad_delta, grad_bias); saved is x[..., index] (dim 1) or x (dim 0); unasked outputs empty.
  m.def("partial_linear_backward(Tensor grad_out, Tensor saved, Tensor weight, Tensor delta, Tensor index, int dim, bool[3] output_mask, int range_start=-1) -> (Tensor, Tensor, Tensor)");
  // x[..., index]: gather along the last dim.
  m.def("partial_gather(Tensor x, Tensor index) -> Tensor");
  // zeros [..., size] with src [..., k] added at columns index (the gather's adjoint).
  m.def("partial_scatter_add(Tensor src, Tensor index, int size) -> Tensor");
  // Host-side validation (syncs on CUDA): index 1-D int64, sorted ascending, unique, in [0, size); == [range_start, +k) when range_start >= 0.
  m.def("partial_validate(Tensor index, int size, int range_start=-1) -> ()");
  // The CUDA gather / scatter-add launch for a [tokens, k] buffer of elem_size-byte elements at byte address `address`: [vec, tx, ty, grid_x, grid_y] (pure host planning, any build).
  m.def("partial_vec_plan(int tokens, int k, int elem_size, int address) -> int[]");
  // ---- lora: many LoRA adapters over one frozen linear in one batch (layouts in lora/lora.h) ----
  // y = x W^T + bias + sum_j token_weight[t, j] * scales[i] * (x[t] A_i^T) B_i^T, i = token_adapter[t, j] (-1: none);
  // a_packed [R, in] / b_packed [out, R] hold every adapter's rows / columns at offsets [N+1]; scales [N] float32.
  // Raises unless offsets start at 0, never decrease and end at R, and adapter ids are in [-1, N) (host sync:
  // the CUDA ops never read values on the host; the CPU ops check on every call).
  m.def("lora_validate(Tensor offsets, Tensor token_adapter, int R) -> ()");
  // The grouped CUDA kernels' tile schedule on the host (lora_tc_plan.h): [tiles, 5] int64 rows (adapter, column
  // offset, rank, first sorted position, pairs) for pairs sorted by adapter with runs at starts [N+1], and the
  // launch bound ceil(pairs / 64) + N it must fit. For tests.
  m.def("lora_tc_tiles(Tensor offsets, Tensor starts, int R, int pairs) -> (Tensor, int)");
  m.def("lora_multi_linear(Tensor x, Tensor weight, Tensor? bias, Tensor a_packed, Tensor b_packed, Tensor offsets, Tensor scales, Tensor token_adapter, Tensor? token_weight=None) -> Tensor");
  // Backward of lora_multi_linear (W and bias frozen): (grad_x, grad_a_packed, grad_b_packed, grad_token_weight).
  m.def("lora_multi_linear_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor a_packed, Tensor b_packed, Tensor offsets, Tensor scales, Tensor token_adapter, Tensor? token_weight, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
  // Punica's shrink: h [*token_adapter.shape, R], h[t, j, offsets[i] + m] = x[t] . A_i[m], zero elsewhere.
  m.def("lora_shrink(Tensor x, Tensor a_packed, Tensor offsets, Tensor token_adapter) -> Tensor");
  // Backward of lora_shrink: (grad_x, grad_a_packed).
  m.def("lora_shrink_backward(Tensor grad_h, Tensor x, Tensor a_packed, Tensor offsets, Tensor token_adapter, bool[2] output_mask) -> (Tensor, Tensor)");
  // Punica's expand: delta_y [T, out] = sum_j token_weight[t, j] * scales[i] * h[t, j, cols of i] B_i^T.
  m.def("lora_expand(Tensor h, Tensor b_packed, Tensor offsets, Tensor scales, Tensor token_adapter, Tensor? token_weight, int out_features) -> Tensor");
  // Backward of lora_expand: (grad_h, grad_b_packed, grad_token_weight).
  m.def("lora_expand_backward(Tensor grad_out, Tensor h, Tensor b_packed, Tensor offsets, Tensor scales, Tensor token_adapter, Tensor? token_weight, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // One LoRA adapter on a frozen linear, fused, with PEFT's dropout on the adapter input when training (composite:
  // draws the seed, runs lora_linear_dropout).
  m.def("lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, float scale, float dropout_p=0.0, bool training=False) -> Tensor");
  // One adapter, fused: y = x W^T + bias + scale * (drop(x) A^T) B^T with drop(x) = x * keep / (1 - p), the keep
  // mask a hash of (seed [1] int64, element index) regenerated by the backward (no dropped copy of x is kept);
  // dropout_p = 0 ignores seed. peftcore.ops.lora.lora_linear draws the seed.
  m.def("lora_linear_dropout(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor B, float scale, float dropout_p, Tensor seed) -> Tensor");
  // Backward of lora_linear_dropout (W and bias frozen): (grad_x, grad_A, grad_B).
  m.def("lora_linear_dropout_backward(Tensor grad_out, Tensor x, Tensor weight, Tensor A, Tensor B, float scale, float dropout_p, Tensor seed, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // ---- blockdiag: block-diagonal and Monarch (two block-diagonal stages + a stride permutation) matmuls ----
  // y[..., j*bo:(j+1)*bo] = x[..., j*bi:(j+1)*bi] @ blocks[j]^T for blocks [nb, bo, bi], x [..., nb*bi].
  m.def("blockdiag_matmul(Tensor x, Tensor blocks) -> Tensor");
  // Backward of blockdiag_matmul: (grad_x, grad_blocks); outputs not asked for in output_mask are empty.
  m.def("blockdiag_matmul_backward(Tensor grad_out, Tensor x, Tensor blocks, bool[2] output_mask) -> (Tensor, Tensor)");
  // fly's blockdiag_butterfly_multiply, fused: w1 [k, q, p], w2 [l, s, r], l*r == k*q; x [..., k*p] -> [..., l*s].
  m.def("monarch_matmul(Tensor x, Tensor w1, Tensor w2) -> Tensor");
  // monarch_matmul that also returns its intermediate h [..., l*r] in stage 2's layout (h[..., j*r + m] = stage-1
  // feature m*l + j: fly's out1 [..., l, r] flattened; x's dtype), so a training step's backward reads h instead of
  // recomputing it (one GEMM less, h's memory more).
  m.def("monarch_matmul_with_h(Tensor x, Tensor w1, Tensor w2) -> (Tensor, Tensor)");
  // Backward of monarch_matmul: (grad_x, grad_w1, grad_w2); the intermediate is h when given (from
  // monarch_matmul_with_h), else recomputed from x; unasked outputs empty.
  m.def("monarch_matmul_backward(Tensor grad_out, Tensor x, Tensor w1, Tensor w2, bool[3] output_mask, Tensor? h=None) -> (Tensor, Tensor, Tensor)");
  // The CUDA Monarch forward's plan (blockdiag_plan.h) for a device with smem_limit bytes of opt-in shared memory:
  // [path (1 fused kernel, 0 batched GEMMs), tokens per CTA, dynamic shared memory bytes]. Host code, no GPU needed.
  m.def("monarch_forward_plan(int tokens, int k, int q, int p, int l, int s, int r, int smem_limit, str mode=\"auto\") -> int[]");
  // ---- miss: MiSS (HF PEFT) fold of the input into r classes f % r, PEFT's zero padding implied ----
  // y[..., c] = sum over f < n with f % r == c of x[..., f], x [..., n] -> y [..., r]; 1 <= r <= n, fp32 accumulation.
  m.def("miss_fold(Tensor x, int r) -> Tensor");
  // out[..., f] = grad[..., f % r] for f < n, grad [..., r] -> [..., n]: miss_fold's adjoint (its backward, and vice versa).
  m.def("miss_unfold(Tensor grad, int n) -> Tensor");
  // The CUDA fold (or, unfold=True, unfold) launch for [rows, n] <-> [rows, r] of elem_size-byte elements at byte addresses x_address / out_address: [kind, vec, width, copies, tx, ty, grid_x, grid_y] (pure host planning, any build).
  m.def("miss_vec_plan(int rows, int n, int r, int elem_size, int x_address, int out_address, bool unfold=False) -> int[]");
  // ---- orthogonal: OFT / BOFT orthogonal blocks from free params A [nb, b, b] (S = (A - A^T)/2) and the butterfly chain ----
  // R = (I - S)(I + S)^{-1} per block (PEFT BOFT cayley_batch / OFT use_cayley_neumann=False), fp32 accumulation.
  m.def("orthogonal_cayley(Tensor params) -> Tensor");
  // Backward of orthogonal_cayley from its output R: dL/dA = skew(-1/2 (I + R)^T grad (I + R)^T).
  m.def("orthogonal_cayley_backward(Tensor grad, Tensor R) -> Tensor");
  // PEFT OFT's truncated Neumann series: I + 2S + ... + 2S^(terms-2) + S^(terms-1) per block.
  m.def("orthogonal_cayley_neumann(Tensor params, int terms=5) -> Tensor");
  // Backward of orthogonal_cayley_neumann: dL/dA.
  m.def("orthogonal_cayley_neumann_backward(Tensor grad, Tensor params, int terms) -> Tensor");
  // BOFT chain on x [..., d]: for i = m-1..0, x <- (x[..., inv(perm[i])] @ blockdiag(rotations[i]))[..., perm[i]].
  m.def("orthogonal_boft_apply(Tensor x, Tensor rotations, Tensor perm) -> Tensor");
  // Backward of orthogonal_boft_apply: (grad_x, grad_rotations), x's chain recomputed; unasked outputs empty.
  m.def("orthogonal_boft_apply_backward(Tensor grad_out, Tensor x, Tensor rotations, Tensor perm, bool[2] output_mask) -> (Tensor, Tensor)");
  // ---- sparse_attn: block-sparse flash attention (q [B,Hq,Lq,D], k/v [B,Hkv,Lk,D], GQA) and the attention-map block pool ----
  // (out, lse): softmax(scale q k^T) v over the keys block_mask [B|1, Hq|1, ceil(Lq/bs), ceil(Lk/bs)] bool keeps (and, if causal, j <= i top-left or j <= i + Lk - Lq bottom-right); lse fp32.
  m.def("block_sparse_attn(Tensor q, Tensor k, Tensor v, Tensor block_mask, int block_size, bool causal=False, float? scale=None, str causal_align=\"top_left\") -> (Tensor, Tensor)");
  // Backward of block_sparse_attn: (dq, dk, dv), P recomputed from q, k, lse; grad_lse may be None; unasked outputs empty.
  m.def("block_sparse_attn_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor block_mask, int block_size, bool causal, float? scale, bool[3] output_mask, str causal_align=\"top_left\") -> (Tensor, Tensor, Tensor)");
  // [B, Hq, Qb, Kb] fp32: max over each (query block, key block) tile of the full (causal if asked) softmax map (SeerAttention's gate target).
  m.def("attn_block_pool(Tensor q, Tensor k, int block_size, bool causal=False, float? scale=None, str causal_align=\"top_left\") -> Tensor");
  // The CUDA kernels' tile rows per kernel (forward, dq, dk/dv, pool; 0: none fits) and their shared memory bytes for head dim D under an opt-in limit (pure host planning, any build).
  m.def("sparse_attn_tile_plan(int head_dim, int smem_limit) -> int[]");
  // The tensor-core forward's configuration for head dim D under an opt-in limit: [tile_m, tile_n, warps, smem bytes] (zeros: none fits, the CUDA-core kernel runs; pure host planning, any build).
  m.def("sparse_attn_tc_plan(int head_dim, int smem_limit) -> int[]");
  // The tensor-core forward's kept key tiles per (mask batch, mask head, query tile): (count [Bm, Hm, Mt], entries [Bm, Hm, Mt, Nt]) int32, entry 2 n + partial ascending, -1 after the count.
  m.def("sparse_attn_tc_tiles(Tensor block_mask, int q_len, int k_len, int block_size, bool causal, str causal_align, int tile_m, int tile_n) -> (Tensor, Tensor)");
  // The tensor-core backward's configuration: [tile_m, tile_n, warps, dq smem bytes, dk/dv smem bytes, dk/dv split over a GQA group's query heads] for head dim D, an opt-in limit, the call's B, Hkv, G = Hq / Hkv, Lk and the device's SM count (zeros: none fits, the CUDA-core backward runs; pure host planning, any build).
  m.def("sparse_attn_tc_bwd_plan(int head_dim, int smem_limit, int batch, int kv_heads, int group, int k_len, int sm_count) -> int[]");
  // The tensor-core backward's transposed lists, kept query tiles per (mask batch, mask head, key tile): (count [Bm, Hm, Nt], entries [Bm, Hm, Nt, Mt]) int32, entry 2 m + partial ascending, -1 after the count.
  m.def("sparse_attn_tc_tiles_t(Tensor block_mask, int q_len, int k_len, int block_size, bool causal, str causal_align, int tile_m, int tile_n) -> (Tensor, Tensor)");
  // ---- token_elim: LeMo / Jenga token elimination (x [B, L, *], keep_index [B, K] int64, rows sorted unique; K static) ----
  // x[b, keep_index[b, j]] for every kept j: [B, K, *]. Backward: token_scatter_add into zeros.
  m.def("token_gather(Tensor x, Tensor keep_index) -> Tensor");
  // residual + src [B, K, *] added at the kept rows (out of place): dropped tokens ride the residual. Backward: (grad, token_gather(grad)).
  m.def("token_scatter_add(Tensor residual, Tensor src, Tensor keep_index) -> Tensor");
  // The CUDA launch of a token_elim kernel over rows x width elem_size-byte elements whose vectorised buffers start at `addresses`: [vec, tx, ty, grid_x, grid_y] (pure host planning, any build).
  m.def("token_elim_vec_plan(int rows, int width, int elem_size, int[] addresses) -> int[]");
  // [B, Kb] fp32: attention each key block receives, attn_block_pool's map summed over heads and query blocks (no [L, L] buffer).
  m.def("token_block_scores(Tensor q, Tensor k, int block_size, bool causal=True, float? scale=None) -> Tensor");
  // Frozen LlamaMLP (silu(x Wg^T) * x Wu^T) Wd^T, full forward; returns (y, gate_kept, up_kept, channel_index): the c kept channels' pre-activations (top-c by sum |act| unless channel_index is given).
  m.def("token_mlp_partial_save(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down, int keep_channels, Tensor? channel_index=None) -> (Tensor, Tensor, Tensor, Tensor)");
  // Backward of token_mlp_partial_save: grad_x through the kept channels only (+ the grads of gate_kept / up_kept when given).
  m.def("token_mlp_partial_save_backward(Tensor grad_y, Tensor gate_kept, Tensor up_kept, Tensor channel_index, Tensor w_gate, Tensor w_up, Tensor w_down, Tensor? grad_gate_kept=None, Tensor? grad_up_kept=None) -> Tensor");
}

// In-place ops (every schema with a Tensor(a!) argument and no return) behave as ATen's in-place ops, through the
// two generic boxed kernels below, registered per op:
// - ADInplaceOrView: refuses an inference tensor outside inference mode (before writing, with ATen's message),
//   then bumps the version counter of each mutated tensor, so a backward that saved it raises "modified by an
//   inplace operation" as it does after nn.Linear's weight.add_().
// - Autograd: with grad mode on, refuses a leaf that requires grad (ATen's message) and, since these ops have no
//   derivative, any call where an input requires grad (rather than returning a result that silently ignores it).
//   Under torch.no_grad() / inference mode they run as plain writes, as weight.add_() does.
// (PyTorch's autogradNotImplemented*Fallback only act on *returned* aliases, so they do neither for `-> ()`.)
namespace {

template <typename F>
void for_each_mutated_tensor(const c10::OperatorHandle& op, const torch::jit::Stack& stack, F&& f) {
  const auto& args = op.schema().arguments();
  const size_t base = stack.size() - args.size();
  for (size_t i = 0; i < args.size(); ++i) {
    const auto* alias = args[i].alias_info();
    if (alias != nullptr && alias->isWrite() && stack[base + i].isTensor()) f(stack[base + i].toTensor());
  }
}

void inplace_or_view_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  std::vector<at::Tensor> mutated;
  for_each_mutated_tensor(op, *stack, [&](const at::Tensor& t) {
    TORCH_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(), op.schema().name(),
                ": Inplace update to inference tensor outside InferenceMode is not allowed. You can make a clone to "
                "get a normal tensor before doing inplace update.");
    mutated.push_back(t);
  });
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(ks & c10::after_ADInplaceOrView_keyset, stack);
  }
  for (const auto& t : mutated) torch::autograd::increment_version(t);
}

void inplace_autograd_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    for_each_mutated_tensor(op, *stack, [&](const at::Tensor& t) {
      TORCH_CHECK(!(t.is_leaf() && t.requires_grad()), op.schema().name(),
                  ": a leaf Variable that requires grad is being used in an in-place operation.");
    });
    const auto& args = op.schema().arguments();
    const size_t base = stack->size() - args.size();
    for (size_t i = 0; i < args.size(); ++i) {
      const auto& v = (*stack)[base + i];
      TORCH_CHECK(!(v.isTensor() && v.toTensor().defined() && v.toTensor().requires_grad()), op.schema().name(),
                  ": ", args[i].name(), " requires grad, but this in-place op has no derivative; call it under "
                  "torch.no_grad() (or on detached tensors)");
    }
  }
  at::AutoDispatchBelowAutograd guard;
  op.redispatchBoxed(ks & c10::after_autograd_keyset, stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(peftcore, ADInplaceOrView, m) {
  m.impl("sparse_delta_merge_", torch::CppFunction::makeFromBoxedFunction<&inplace_or_view_kernel>());
}
TORCH_LIBRARY_IMPL(peftcore, Autograd, m) {
  m.impl("sparse_delta_merge_", torch::CppFunction::makeFromBoxedFunction<&inplace_autograd_kernel>());
}

// The small non-op surface, build information, as a Python module that uses only the stable ABI (Py_LIMITED_API,
// set by CMake): no pybind11, no torch Python bindings, so one build serves every CPython >= 3.9 (an abi3 wheel).
// Importing peftcore._C loads this library, whose static TORCH_LIBRARY initialisers register the ops.

namespace {
PyObject* with_cuda(PyObject*, PyObject*) {
#ifdef PEFTCORE_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}
PyObject* cuda_archs(PyObject*, PyObject*) {
#ifdef PEFTCORE_CUDA_ARCHS_STR
  return PyUnicode_FromString(PEFTCORE_CUDA_ARCHS_STR);
#else
  return PyUnicode_FromString("");
#endif
}
PyObject* torch_version(PyObject*, PyObject*) { return PyUnicode_FromString(PEFTCORE_TORCH_VERSION); }
PyObject* has_cutlass(PyObject*, PyObject*) {
#ifdef PEFTCORE_HAS_CUTLASS
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"with_cuda", with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled into this build"},
    {"cuda_archs", cuda_archs, METH_NOARGS, "The CUDA archs this build was compiled for ('' when CPU-only)"},
    {"torch_version", torch_version, METH_NOARGS, "The torch version built against"},
    {"has_cutlass", has_cutlass, METH_NOARGS, "Whether the CUTLASS / CuTe headers were found for the CUDA kernels"},
    {nullptr, nullptr, 0, nullptr},
};
PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "peftcore build information", -1, methods,
                          nullptr, nullptr, nullptr, nullptr};
}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
