// CPU building blocks shared by the tiled kernels (blockdiag, orthogonal): a register-blocked small GEMM (AVX2+FMA
// for float picked at run time, BLAS for large weight panels), token-tile sizing, tile load / store with dtype
// conversion, and per-thread accumulators for weight gradients. Header-only, internal linkage per translation unit.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace peftcore::cpu {
namespace {

// Small GEMM: C[M, N] (+)= A[M, K] @ B[K, N], all row-major with leading dims. Register blocked 4 x 16 (the
// accumulators stay in vector registers; B's row is read once per 4 rows of A); tails take a plain loop.
template <typename T>
__attribute__((always_inline)) inline void gemm_body(int64_t M, int64_t N, int64_t K, const T* __restrict__ A,
                                                     int64_t lda, const T* __restrict__ B, int64_t ldb,
                                                     T* __restrict__ C, int64_t ldc, bool accumulate) {
  constexpr int MR = 4, NR = 16;
  int64_t m = 0;
  for (; m + MR <= M; m += MR) {
    int64_t n = 0;
    for (; n + NR <= N; n += NR) {
      T acc[MR][NR];
      for (int u = 0; u < MR; ++u)
        for (int v = 0; v < NR; ++v) acc[u][v] = accumulate ? C[(m + u) * ldc + n + v] : T(0);
      for (int64_t kk = 0; kk < K; ++kk) {
        const T* b = B + kk * ldb + n;
        for (int u = 0; u < MR; ++u) {
          const T a = A[(m + u) * lda + kk];
          for (int v = 0; v < NR; ++v) acc[u][v] += a * b[v];
        }
      }
      for (int u = 0; u < MR; ++u)
        for (int v = 0; v < NR; ++v) C[(m + u) * ldc + n + v] = acc[u][v];
    }
    if (n < N) {
      for (int u = 0; u < MR; ++u) {
        T* c = C + (m + u) * ldc;
        if (!accumulate) for (int64_t j = n; j < N; ++j) c[j] = T(0);
        for (int64_t kk = 0; kk < K; ++kk) {
          const T a = A[(m + u) * lda + kk];
          const T* b = B + kk * ldb;
          for (int64_t j = n; j < N; ++j) c[j] += a * b[j];
        }
      }
    }
  }
  for (; m < M; ++m) {
    T* c = C + m * ldc;
    if (!accumulate) for (int64_t j = 0; j < N; ++j) c[j] = T(0);
    for (int64_t kk = 0; kk < K; ++kk) {
      const T a = A[m * lda + kk];
      const T* b = B + kk * ldb;
      for (int64_t j = 0; j < N; ++j) c[j] += a * b[j];
    }
  }
}

// float: the 4 x 16 tile as eight 8-lane vectors (GCC vector extensions, ymm FMAs); a[u] is broadcast, B's row segment loaded once per kk for the four rows.
// No helper calls inside the AVX2 function: GCC does not inline default-target always_inline helpers into it.
typedef float v8f __attribute__((vector_size(32), aligned(4)));  // unaligned 8-lane load / store

__attribute__((noinline)) void gemm_tail_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda,
                                             const float* B, int64_t ldb, float* C, int64_t ldc, bool accumulate) {
  gemm_body<float>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

__attribute__((target("avx2,fma"))) void gemm_f32_avx2(int64_t M, int64_t N, int64_t K, const float* __restrict__ A,
                                                       int64_t lda, const float* __restrict__ B, int64_t ldb,
                                                       float* __restrict__ C, int64_t ldc, bool accumulate) {
  constexpr int MR = 4, NR = 16;
  const int64_t M4 = M / MR * MR, N16 = N / NR * NR;
  // n outer: one [K, 16] panel of B (the weight) serves every row strip of the tile while it is in L1/L2.
  for (int64_t n = 0; n < N16; n += NR) {
    for (int64_t m = 0; m < M4; m += MR) {
      v8f c00 = {}, c01 = {}, c10 = {}, c11 = {}, c20 = {}, c21 = {}, c30 = {}, c31 = {};
      if (accumulate) {
        c00 = *reinterpret_cast<const v8f*>(C + (m + 0) * ldc + n); c01 = *reinterpret_cast<const v8f*>(C + (m + 0) * ldc + n + 8);
        c10 = *reinterpret_cast<const v8f*>(C + (m + 1) * ldc + n); c11 = *reinterpret_cast<const v8f*>(C + (m + 1) * ldc + n + 8);
        c20 = *reinterpret_cast<const v8f*>(C + (m + 2) * ldc + n); c21 = *reinterpret_cast<const v8f*>(C + (m + 2) * ldc + n + 8);
        c30 = *reinterpret_cast<const v8f*>(C + (m + 3) * ldc + n); c31 = *reinterpret_cast<const v8f*>(C + (m + 3) * ldc + n + 8);
      }
      const float* a0 = A + (m + 0) * lda;
      const float* a1 = A + (m + 1) * lda;
      const float* a2 = A + (m + 2) * lda;
      const float* a3 = A + (m + 3) * lda;
      const float* b = B + n;
      for (int64_t kk = 0; kk < K; ++kk, b += ldb) {
        const v8f b0 = *reinterpret_cast<const v8f*>(b), b1 = *reinterpret_cast<const v8f*>(b + 8);
        c00 += a0[kk] * b0; c01 += a0[kk] * b1;
        c10 += a1[kk] * b0; c11 += a1[kk] * b1;
        c20 += a2[kk] * b0; c21 += a2[kk] * b1;
        c30 += a3[kk] * b0; c31 += a3[kk] * b1;
      }
      *reinterpret_cast<v8f*>(C + (m + 0) * ldc + n) = c00; *reinterpret_cast<v8f*>(C + (m + 0) * ldc + n + 8) = c01;
      *reinterpret_cast<v8f*>(C + (m + 1) * ldc + n) = c10; *reinterpret_cast<v8f*>(C + (m + 1) * ldc + n + 8) = c11;
      *reinterpret_cast<v8f*>(C + (m + 2) * ldc + n) = c20; *reinterpret_cast<v8f*>(C + (m + 2) * ldc + n + 8) = c21;
      *reinterpret_cast<v8f*>(C + (m + 3) * ldc + n) = c30; *reinterpret_cast<v8f*>(C + (m + 3) * ldc + n + 8) = c31;
    }
  }
  // Tails (columns past N16 of the blocked rows, rows past M4): the generic loops.
  if (N16 < N && M4 > 0) gemm_tail_f32(M4, N - N16, K, A, lda, B + N16, ldb, C + N16, ldc, accumulate);
  if (M4 < M) gemm_tail_f32(M - M4, N, K, A + M4 * lda, lda, B, ldb, C + M4 * ldc, ldc, accumulate);
}

const bool kHasAvx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");

// Blocks this large (K*N weights) go to BLAS on views of the tile buffers: its packed, cache-blocked GEMM beats the
// unpacked micro-kernel once a weight panel no longer stays in L1/L2 (measured: 512x512 blocks 2.5x faster),
// and the per-call overhead is amortised. Inside at::parallel_for the BLAS call runs on the calling thread.
constexpr int64_t kBlasMinWeights = 128 * 128;

void gemm_f32(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
              int64_t ldc, bool accumulate) {
  if (K * N >= kBlasMinWeights && M >= 16) {
    const auto opt = at::TensorOptions().dtype(at::kFloat);
    auto a = at::from_blob(const_cast<float*>(A), {M, K}, {lda, 1}, opt);
    auto b = at::from_blob(const_cast<float*>(B), {K, N}, {ldb, 1}, opt);
    auto c = at::from_blob(C, {M, N}, {ldc, 1}, opt);
    if (accumulate) c.addmm_(a, b);
    else at::mm_out(c, a, b);
    return;
  }
  if (kHasAvx2) gemm_f32_avx2(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
  else gemm_body<float>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

void gemm_f64(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb,
              double* C, int64_t ldc, bool accumulate) {
  gemm_body<double>(M, N, K, A, lda, B, ldb, C, ldc, accumulate);
}

inline void gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
                 int64_t ldc, bool acc) {
  gemm_f32(M, N, K, A, lda, B, ldb, C, ldc, acc);
}
inline void gemm(int64_t M, int64_t N, int64_t K, const double* A, int64_t lda, const double* B, int64_t ldb,
                 double* C, int64_t ldc, bool acc) {
  gemm_f64(M, N, K, A, lda, B, ldb, C, ldc, acc);
}

// Tokens per tile: the widest tile buffer stays within ~256 KB (L2), 4..64 tokens, a multiple of 4.
int64_t tile_tokens(int64_t widest, int64_t acc_bytes) {
  const int64_t tb = (int64_t{1} << 18) / std::max<int64_t>(1, widest * acc_bytes);
  return std::clamp<int64_t>(tb / 4 * 4, 4, 64);
}

template <typename acc_t>
at::Tensor as_acc(const at::Tensor& t) {
  return t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

// rows [t0, t0+tb) of a [T, F] scalar_t matrix into a [tb, F] acc_t buffer.
template <typename scalar_t, typename acc_t>
void load_tile(const scalar_t* src, int64_t F, int64_t t0, int64_t tb, acc_t* dst) {
  const scalar_t* s = src + t0 * F;
  for (int64_t i = 0; i < tb * F; ++i) dst[i] = static_cast<acc_t>(s[i]);
}
template <typename scalar_t, typename acc_t>
void store_tile(const acc_t* src, int64_t F, int64_t t0, int64_t tb, scalar_t* dst) {
  scalar_t* d = dst + t0 * F;
  for (int64_t i = 0; i < tb * F; ++i) d[i] = static_cast<scalar_t>(src[i]);
}

// Per-thread weight-gradient accumulators, summed at the end in acc_t and cast to the weight's dtype.
template <typename acc_t>
struct ThreadAccum {
  int64_t size;
  std::vector<acc_t> buf;
  explicit ThreadAccum(int64_t n) : size(n), buf(static_cast<size_t>(n) * at::get_num_threads(), acc_t(0)) {}
  acc_t* mine() { return buf.data() + static_cast<int64_t>(at::get_thread_num()) * size; }
  at::Tensor reduce(at::IntArrayRef shape, at::ScalarType out) const {
    const int64_t nt = static_cast<int64_t>(buf.size()) / std::max<int64_t>(size, 1);
    at::Tensor acc = at::zeros({size}, at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
    acc_t* a = acc.mutable_data_ptr<acc_t>();
    for (int64_t t = 0; t < nt; ++t)
      for (int64_t i = 0; i < size; ++i) a[i] += buf[t * size + i];
    return acc.view(shape).to(out);
  }
};

}  // namespace
}  // namespace peftcore::cpu
