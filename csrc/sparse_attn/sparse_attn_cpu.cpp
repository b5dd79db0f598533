// sparse_attn CPU kernels: block-sparse flash attention forward / backward and the attention-map block pool, plus
// the argument checks shared with the CUDA glue (sparse_attn.h).
//
// Tiling. q / k / v are contiguous [B, H, L, D] in the accumulate type T (float32, or float64 for gradcheck;
// float16 / bfloat16 inputs are converted to float32 once, up front). A task is one (batch, query head, query
// block of bs rows); tasks go to threads through at::parallel_for. A task walks the key blocks its block-mask
// row keeps (and, when causal, only those starting at or before its last row): masked blocks cost nothing.
// Per kept key block the [m, n] score tile S = scale * Q K^T and the P V update are BLAS GEMMs
// (BLAS sgemm / dgemm on the tiles in place, row-major seen as transposed column-major), the softmax is
// online per query row (running max and sum, the accumulator rescaled when the max grows), with a vectorisable
// exp; the output is acc / sum and lse = max + log(sum). No [Lq, Lk] buffer: a thread holds one [bs, bs] tile,
// one [bs, D] accumulator.
//
// Backward (flash-attention 2): P = exp(S - lse) is recomputed tile by tile; Delta_i = dO_i . O_i - dlse_i.
//   dQ: task per (batch, query head, query block), over its kept key blocks: dP = dO V^T, dS = P (dP - Delta),
//       dQ += scale dS K.
//   dK, dV: task per (batch, kv head, key block), over the query heads of its GQA group and the query blocks whose
//       mask entry keeps this key block (the transposed mask, read in place): dV += P^T dO, dK += scale dS^T Q.
//       Each task owns its dK / dV rows: no atomics, no per-thread copies of dK / dV.
// The dlse term makes lse a differentiable output (d lse_i / d s_ij = P_ij, folded into Delta).
//
// Causal alignment: query i sees key j iff j <= i + off (Dims::off: 0 top-left, Lk - Lq bottom-right); every
// causal bound below (key blocks a query block reaches, the tile mask, the query blocks of a key block) is
// written in terms of the shifted row i + off.
//
// NaN / inf: the row max and the exp propagate NaN (std::max and _mm256_max_ps return one operand when the other
// is NaN, so neither is used bare on scores), a row is empty only when its sum is exactly 0 (a NaN sum is not),
// so a NaN or inf in q, or in k of a visible key, gives a NaN row as in SDPA; a row that sees nothing keeps
// out = 0, lse = -inf.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <dlfcn.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>
#include <initializer_list>
#include <utility>
#include <limits>
#include <vector>

#include "checks.h"
#include "sparse_attn/sparse_attn.h"
#include "sparse_attn/sparse_attn_tiles.h"

namespace peftcore::sparse_attn {

// ------------------------------------------------------------------------------------------------------------
// Shared checks (also used by the CUDA glue).

at::ScalarType stat_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

namespace {

// causal_align -> bottom-right?
bool parse_align(const char* op, c10::string_view causal_align) {
  TORCH_CHECK(causal_align == "top_left" || causal_align == "bottom_right", op,
              ": causal_align must be \"top_left\" or \"bottom_right\", got \"", std::string(causal_align), "\"");
  return causal_align == "bottom_right";
}

void check_qk(const char* op, const at::Tensor& q, const at::Tensor& k, int64_t block_size) {
  check_float(op, "q", q);
  check_dim(op, "q", q, 4);
  check_dim(op, "k", k, 4);
  check_float(op, "k", k);
  check_same_dtype(op, "k", k, q, "q");
  check_same_device(op, "k", k, q, "q");
  TORCH_CHECK(k.size(0) == q.size(0), op, ": k must have batch size ", q.size(0), " (q is ", q.sizes(),
              "), got k of shape ", k.sizes());
  TORCH_CHECK(k.size(3) == q.size(3), op, ": k must have head dim ", q.size(3), " (q is ", q.sizes(),
              "), got k of shape ", k.sizes());
  TORCH_CHECK(q.size(3) >= 1, op, ": head dim must be >= 1, got q of shape ", q.sizes());
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, op,
              ": the query heads must be a multiple of the key/value heads (Hq % Hkv == 0), got Hq = ", q.size(1),
              " and Hkv = ", k.size(1));
  TORCH_CHECK(block_size > 0, op, ": block_size must be > 0, got ", block_size);
}

Dims dims_of(const char* op, const at::Tensor& q, const at::Tensor& k, int64_t block_size, bool causal,
             std::optional<double> scale, c10::string_view causal_align) {
  const bool bottom_right = parse_align(op, causal_align);
  TORCH_CHECK(!scale.has_value() || std::isfinite(*scale), op, ": scale must be finite, got ", *scale);
  Dims d{};
  d.B = q.size(0);
  d.Hq = q.size(1);
  d.Lq = q.size(2);
  d.D = q.size(3);
  d.Hkv = k.size(1);
  d.Lk = k.size(2);
  d.bs = block_size;
  d.Qb = ceil_div(d.Lq, block_size);
  d.Kb = ceil_div(d.Lk, block_size);
  d.scale = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d.D));
  d.causal = causal;
  d.off = causal && bottom_right ? d.Lk - d.Lq : 0;
  return d;
}

}  // namespace

Dims check_pool_args(const char* op, const at::Tensor& q, const at::Tensor& k, int64_t block_size, bool causal,
                     std::optional<double> scale, c10::string_view causal_align) {
  check_qk(op, q, k, block_size);
  return dims_of(op, q, k, block_size, causal, scale, causal_align);
}

Dims check_attn_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor* block_mask, int64_t block_size, bool causal, std::optional<double> scale,
                     c10::string_view causal_align) {
  check_qk(op, q, k, block_size);
  check_float(op, "v", v);
  check_same_dtype(op, "v", v, q, "q");
  check_same_device(op, "v", v, q, "q");
  TORCH_CHECK(v.sizes() == k.sizes(), op, ": v must have k's shape ", k.sizes(), ", got ", v.sizes());
  Dims d = dims_of(op, q, k, block_size, causal, scale, causal_align);
  if (block_mask != nullptr) {
    const at::Tensor& m = *block_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool, op, ": block_mask must be bool, got ", m.scalar_type());
    check_same_device(op, "block_mask", m, q, "q");
    TORCH_CHECK(m.dim() == 4 && (m.size(0) == 1 || m.size(0) == d.B) && (m.size(1) == 1 || m.size(1) == d.Hq) &&
                    m.size(2) == d.Qb && m.size(3) == d.Kb,
                op, ": block_mask must have shape [", d.B, " or 1, ", d.Hq, " or 1, ", d.Qb, ", ", d.Kb,
                "] (ceil(Lq / block_size), ceil(Lk / block_size) for Lq = ", d.Lq, ", Lk = ", d.Lk,
                ", block_size = ", block_size, "), got ", m.sizes());
    d.mask_b = m.size(0);
    d.mask_h = m.size(1);
  }
  return d;
}

tc::TileGeom check_tc_tiles_args(const char* op, const at::Tensor& block_mask, int64_t q_len, int64_t k_len,
                                 int64_t block_size, bool causal, c10::string_view causal_align, int64_t tile_m,
                                 int64_t tile_n) {
  const bool bottom_right = parse_align(op, causal_align);
  TORCH_CHECK(block_mask.scalar_type() == at::kBool, op, ": block_mask must be bool, got ", block_mask.scalar_type());
  TORCH_CHECK(q_len >= 0 && k_len >= 0, op, ": q_len and k_len must be >= 0, got ", q_len, " and ", k_len);
  TORCH_CHECK(block_size > 0, op, ": block_size must be > 0, got ", block_size);
  TORCH_CHECK(tile_m >= 1 && tile_m <= 1024 && tile_n >= 1 && tile_n <= 1024, op,
              ": tile_m and tile_n must be in [1, 1024], got ", tile_m, " and ", tile_n);
  const tc::TileGeom g = tc::make_geom(q_len, k_len, block_size, causal, bottom_right ? k_len - q_len : 0, tile_m,
                                       tile_n);
  TORCH_CHECK(block_mask.dim() == 4 && block_mask.size(2) == g.Qb && block_mask.size(3) == g.Kb, op,
              ": block_mask must have shape [Bm, Hm, ", g.Qb, ", ", g.Kb, "] (ceil(q_len / block_size), ceil(k_len / ",
              "block_size) for q_len = ", q_len, ", k_len = ", k_len, ", block_size = ", block_size, "), got ",
              block_mask.sizes());
  TORCH_CHECK(g.Nt < (int64_t{1} << 30), op, ": too many key tiles (", g.Nt, ")");
  return g;
}

void check_backward_args(const char* op, const Dims& d, const at::Tensor& q, const at::Tensor& grad_out,
                         const std::optional<at::Tensor>& grad_lse, const at::Tensor& out, const at::Tensor& lse) {
  using Named = std::pair<const char*, const at::Tensor*>;
  for (auto [name, t] : std::initializer_list<Named>{{"grad_out", &grad_out}, {"out", &out}}) {
    check_same_dtype(op, name, *t, q, "q");
    check_same_device(op, name, *t, q, "q");
    TORCH_CHECK(t->sizes() == q.sizes(), op, ": ", name, " must have q's shape ", q.sizes(), ", got ", t->sizes());
  }
  const auto st = stat_dtype(q.scalar_type());
  const std::vector<int64_t> want{d.B, d.Hq, d.Lq};
  auto check_stat = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.scalar_type() == st, op, ": ", name, " must be ", st, " for q of dtype ", q.scalar_type(),
                ", got ", t.scalar_type());
    check_same_device(op, name, t, q, "q");
    TORCH_CHECK(t.sizes() == at::IntArrayRef(want), op, ": ", name, " must have shape ", at::IntArrayRef(want),
                ", got ", t.sizes());
  };
  check_stat("lse", lse);
  if (grad_lse.has_value() && grad_lse->defined()) check_stat("grad_lse", *grad_lse);
}

namespace {

// Column-major GEMM C = alpha op(A) op(B) + beta C on raw tile pointers. The BLAS torch links (MKL's sgemm_ /
// dgemm_ in the x86 wheels) is looked up once in the process; torch does not export its own cpublas::gemm
// overloads, and its exported gemm stub is a plain-loop fallback. Without a BLAS symbol (or with
// PEFTCORE_CPU_BLAS=aten) the tiles go through at::addmm_out on from_blob views instead (slower: a dispatch per
// tile).
template <typename T>
using BlasGemm = void (*)(const char*, const char*, const int*, const int*, const int*, const T*, const T*,
                          const int*, const T*, const int*, const T*, T*, const int*);

template <typename T>
BlasGemm<T> find_blas() {
  const char* env = std::getenv("PEFTCORE_CPU_BLAS");
  if (env != nullptr && std::string(env) == "aten") return nullptr;
  const char* name = std::is_same_v<T, float> ? "sgemm_" : "dgemm_";
  return reinterpret_cast<BlasGemm<T>>(dlsym(RTLD_DEFAULT, name));
}

template <typename T>
at::Tensor colmajor_view(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  return at::from_blob(const_cast<T*>(p), {cols, rows}, {ld, 1}, opts).t();
}

template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
          int64_t ldb, T beta, T* c, int64_t ldc) {
  static const BlasGemm<T> blas = find_blas<T>();
  if (blas != nullptr) {
    const int mi = static_cast<int>(m), ni = static_cast<int>(n), ki = static_cast<int>(k);
    const int la = static_cast<int>(lda), lb = static_cast<int>(ldb), lc = static_cast<int>(ldc);
    blas(ta ? "T" : "N", tb ? "T" : "N", &mi, &ni, &ki, &alpha, a, &la, b, &lb, &beta, c, &lc);
    return;
  }
  auto A = ta ? colmajor_view(a, k, m, lda).t() : colmajor_view(a, m, k, lda);
  auto B = tb ? colmajor_view(b, n, k, ldb).t() : colmajor_view(b, k, n, ldb);
  auto C = colmajor_view(static_cast<const T*>(c), m, n, ldc);
  if (beta == T(0)) C.zero_();
  C.addmm_(A, B, beta == T(0) ? T(1) : beta, alpha);
}
constexpr bool kN = false;
constexpr bool kT = true;

// exp(x) for softmax arguments x <= 0 (also -inf), branch free so that row loops vectorise: x = n ln2 + r,
// |r| <= ln2 / 2, exp(r) by the Cephes expf polynomial (relative error ~1e-7), 2^n from the exponent bits.
// x < -87 (exp underflows to a denormal) gives exactly 0.
inline float exp_softmax(float x) {
  const float xc = x >= -87.f ? (x <= 88.f ? x : 88.f) : -87.f;  // NaN -> -87 (keeps the int cast defined)
  const float n = (xc * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const float two_n = std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);
  return x < -87.f ? 0.f : (x == x ? p * two_n : x);
}
inline double exp_softmax(double x) { return std::exp(x); }

// max(a, b) that returns NaN when either is NaN (std::max(a, NaN) returns a).
template <typename T>
inline T nan_max(T a, T b) {
  return (a > b || a != a) ? a : b;
}

// Row kernels of the online softmax. float rows take an AVX2 + FMA path when the CPU has it (chosen at run time:
// the extension itself is built for baseline x86-64); the scalar versions are the fallback and the float64 path.
template <typename T>
inline T row_max_scalar(const T* s, int64_t n) {
  T mx = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) mx = nan_max(mx, s[j]);
  return mx;
}
// s[j] <- exp(s[j] - c); returns the row sum.
template <typename T>
inline T exp_row_sum_scalar(T* s, int64_t n, T c) {
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    s[j] = exp_softmax(s[j] - c);
    sum += s[j];
  }
  return sum;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define PEFTCORE_SA_AVX2 1
__attribute__((target("avx2,fma"))) inline __m256 exp_softmax8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);  // also -inf
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, lo), _mm256_set1_ps(88.f));  // NaN -> -87, fixed below
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 r8 = _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
  return _mm256_blendv_ps(r8, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));  // NaN in, NaN out
}

__attribute__((target("avx2,fma"))) inline float hsum8(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

// _mm256_max_ps drops a NaN in its first operand: NaN lanes are tracked apart and win at the end.
__attribute__((target("avx2,fma"))) float row_max_avx2(const float* s, int64_t n) {
  __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  __m256 nan = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 x = _mm256_loadu_ps(s + j);
    m = _mm256_max_ps(m, x);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  }
  if (_mm256_movemask_ps(nan) != 0) return std::numeric_limits<float>::quiet_NaN();
  __m128 a = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  a = _mm_max_ps(a, _mm_movehl_ps(a, a));
  a = _mm_max_ss(a, _mm_movehdup_ps(a));
  float mx = _mm_cvtss_f32(a);
  for (; j < n; ++j) mx = nan_max(mx, s[j]);
  return mx;
}

__attribute__((target("avx2,fma"))) float exp_row_sum_avx2(float* s, int64_t n, float c) {
  const __m256 vc = _mm256_set1_ps(c);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp_softmax8(_mm256_sub_ps(_mm256_loadu_ps(s + j), vc));
    _mm256_storeu_ps(s + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum8(acc);
  for (; j < n; ++j) {
    s[j] = exp_softmax(s[j] - c);
    sum += s[j];
  }
  return sum;
}

// PEFTCORE_CPU_SIMD=scalar forces the scalar row kernels (read once; the tests run both paths).
bool have_avx2() {
  const char* env = std::getenv("PEFTCORE_CPU_SIMD");
  if (env != nullptr && std::string(env) == "scalar") return false;
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
const bool kHaveAvx2 = have_avx2();
#endif

inline float row_max(const float* s, int64_t n) {
#ifdef PEFTCORE_SA_AVX2
  if (kHaveAvx2) return row_max_avx2(s, n);
#endif
  return row_max_scalar(s, n);
}
inline double row_max(const double* s, int64_t n) { return row_max_scalar(s, n); }
inline float exp_row_sum(float* s, int64_t n, float c) {
#ifdef PEFTCORE_SA_AVX2
  if (kHaveAvx2) return exp_row_sum_avx2(s, n, c);
#endif
  return exp_row_sum_scalar(s, n, c);
}
inline double exp_row_sum(double* s, int64_t n, double c) { return exp_row_sum_scalar(s, n, c); }

template <typename T>
constexpr T kNegInf = -std::numeric_limits<T>::infinity();

// The block-mask row of (b, h, I): [Kb] flags, the mask broadcast over batch / heads.
inline const bool* mask_row(const bool* mask, const Dims& d, int64_t b, int64_t h, int64_t I) {
  const int64_t mb = d.mask_b > 1 ? b : 0, mh = d.mask_h > 1 ? h : 0;
  return mask + ((mb * d.mask_h + mh) * d.Qb + I) * d.Kb;
}

// Block order within a (batch, head): 0, n-1, 1, n-2, ... at::parallel_for hands each thread a contiguous range
// of tasks, and under causal a block's cost grows with its index: pairing cheap and dear blocks balances the
// threads also when batch x heads is small.
inline int64_t zigzag(int64_t t, int64_t n) { return (t & 1) ? n - 1 - t / 2 : t / 2; }

// Key blocks a query block [i0, i0 + m) can see: all, or when causal those starting at or before key
// i0 + m - 1 + off (none when that is negative).
inline int64_t key_blocks_end(const Dims& d, int64_t i0, int64_t m) {
  if (!d.causal) return d.Kb;
  const int64_t last = i0 + m - 1 + d.off;
  return last < 0 ? 0 : std::min(d.Kb, last / d.bs + 1);
}

// Query blocks that can see key block J (starting at key j0) under causal: from the block holding row j0 - off.
inline int64_t query_blocks_begin(const Dims& d, int64_t j0) {
  if (!d.causal) return 0;
  const int64_t r = j0 - d.off;
  return r <= 0 ? 0 : std::min(d.Qb, r / d.bs);
}

// Causal mask of an [m, n] tile of rows i0.., keys j0..: s[i, j] = -inf where j0 + j > i0 + i + off.
template <typename T>
inline void causal_mask_tile(const Dims& d, T* s, int64_t m, int64_t n, int64_t i0, int64_t j0) {
  const int64_t top = i0 + d.off;  // the tile's first row, shifted
  if (j0 + n - 1 <= top) return;   // fully visible
  for (int64_t i = 0; i < m; ++i) {
    const int64_t first_hidden = std::clamp<int64_t>(top + i - j0 + 1, 0, n);
    for (int64_t j = first_hidden; j < n; ++j) s[i * n + j] = kNegInf<T>;
  }
}

// S [m, n] = alpha * X [m, D] Y [n, D]^T (row-major, leading dims D and n).
template <typename T>
inline void gemm_abt(int64_t m, int64_t n, int64_t D, T alpha, const T* x, const T* y, T* s) {
  gemm(kT, kN, n, m, D, alpha, y, D, x, D, T(0), s, n);
}
// C [m, D] += alpha * P [m, n] Y [n, D].
template <typename T>
inline void gemm_acc_ab(int64_t m, int64_t n, int64_t D, T alpha, const T* p, const T* y, T* c) {
  gemm(kN, kN, D, m, n, alpha, y, D, p, n, T(1), c, D);
}
// C [n, D] += alpha * P [m, n]^T X [m, D].
template <typename T>
inline void gemm_acc_atb(int64_t m, int64_t n, int64_t D, T alpha, const T* p, const T* x, T* c) {
  gemm(kN, kT, D, n, m, alpha, x, D, p, n, T(1), c, D);
}

// P tile = exp(scale Q K^T - lse) with the causal mask; rows with lse = -inf (no visible key) give 0.
template <typename T>
inline void probs_tile(const Dims& d, int64_t m, int64_t n, int64_t i0, int64_t j0, const T* qp, const T* kp,
                       const T* lse_rows, T* p) {
  gemm_abt<T>(m, n, d.D, static_cast<T>(d.scale), qp, kp, p);
  if (d.causal) causal_mask_tile(d, p, m, n, i0, j0);
  for (int64_t i = 0; i < m; ++i) {
    const T l = lse_rows[i] == kNegInf<T> ? std::numeric_limits<T>::infinity() : lse_rows[i];
    exp_row_sum(p + i * n, n, l);
  }
}

// dS = P (dP - Delta) in place of dP.
template <typename T>
inline void ds_tile(int64_t m, int64_t n, const T* p, const T* delta_rows, T* dp) {
  for (int64_t i = 0; i < m; ++i) {
    const T di = delta_rows[i];
    const T* __restrict__ pr = p + i * n;
    T* __restrict__ r = dp + i * n;
    for (int64_t j = 0; j < n; ++j) r[j] = pr[j] * (r[j] - di);
  }
}

template <typename T>
void forward_kernel(const Dims& d, const T* q, const T* k, const T* v, const bool* mask, T* out,
                    T* lse) {
  const int64_t bs = d.bs, D = d.D, G = d.Hq / d.Hkv;
  at::parallel_for(0, d.B * d.Hq * d.Qb, 1, [&](int64_t begin, int64_t end) {
    const int64_t bm = std::min(bs, d.Lq), bn = std::min(bs, d.Lk);  // tile extents (bs may exceed L)
    std::vector<T> S(bm * bn), acc(bm * D), mx(bm), sum(bm);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t I = zigzag(task % d.Qb, d.Qb), h = (task / d.Qb) % d.Hq, b = task / (d.Qb * d.Hq);
      const int64_t i0 = I * bs, m = std::min(bs, d.Lq - i0);
      const int64_t row0 = (b * d.Hq + h) * d.Lq + i0;
      const T* qp = q + row0 * D;
      const int64_t kv0 = (b * d.Hkv + h / G) * d.Lk;
      const bool* keep = mask_row(mask, d, b, h, I);
      std::fill(acc.begin(), acc.begin() + m * D, T(0));
      std::fill(mx.begin(), mx.begin() + m, kNegInf<T>);
      std::fill(sum.begin(), sum.begin() + m, T(0));
      const int64_t jend = key_blocks_end(d, i0, m);
      for (int64_t J = 0; J < jend; ++J) {
        if (!keep[J]) continue;
        const int64_t j0 = J * bs, n = std::min(bs, d.Lk - j0);
        T* s = S.data();
        gemm_abt<T>(m, n, D, static_cast<T>(d.scale), qp, k + (kv0 + j0) * D, s);
        if (d.causal) causal_mask_tile(d, s, m, n, i0, j0);
        for (int64_t i = 0; i < m; ++i) {
          T* r = s + i * n;
          const T mnew = nan_max(mx[i], row_max(r, n));
          if (mnew == kNegInf<T>) {  // nothing visible in this row yet
            std::fill(r, r + n, T(0));
            continue;
          }
          const T alpha = exp_softmax(mx[i] - mnew);  // 0 when mx[i] = -inf
          const T rs = exp_row_sum(r, n, mnew);
          sum[i] = sum[i] * alpha + rs;
          mx[i] = mnew;
          if (alpha != T(1)) {
            T* a = acc.data() + i * D;
            for (int64_t c = 0; c < D; ++c) a[c] *= alpha;
          }
        }
        gemm_acc_ab<T>(m, n, D, T(1), s, v + (kv0 + j0) * D, acc.data());
      }
      T* op = out + row0 * D;
      for (int64_t i = 0; i < m; ++i) {
        // Empty (no visible finite score): exactly 0, even if 0 x a non-finite v reached acc. NaN sums are not.
        const bool empty = sum[i] == T(0);
        const T inv = T(1) / sum[i];
        for (int64_t c = 0; c < D; ++c) op[i * D + c] = empty ? T(0) : acc[i * D + c] * inv;
        lse[row0 + i] = empty ? kNegInf<T> : mx[i] + std::log(sum[i]);
      }
    }
  });
}

template <typename T>
void backward_dq_kernel(const Dims& d, const T* q, const T* k, const T* v, const T* go, const T* lse,
                        const T* delta, const bool* mask, T* dq) {
  const int64_t bs = d.bs, D = d.D, G = d.Hq / d.Hkv;
  at::parallel_for(0, d.B * d.Hq * d.Qb, 1, [&](int64_t begin, int64_t end) {
    const int64_t bm = std::min(bs, d.Lq), bn = std::min(bs, d.Lk);
    std::vector<T> P(bm * bn), dP(bm * bn), acc(bm * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t I = zigzag(task % d.Qb, d.Qb), h = (task / d.Qb) % d.Hq, b = task / (d.Qb * d.Hq);
      const int64_t i0 = I * bs, m = std::min(bs, d.Lq - i0);
      const int64_t row0 = (b * d.Hq + h) * d.Lq + i0;
      const int64_t kv0 = (b * d.Hkv + h / G) * d.Lk;
      const bool* keep = mask_row(mask, d, b, h, I);
      std::fill(acc.begin(), acc.begin() + m * D, T(0));
      const int64_t jend = key_blocks_end(d, i0, m);
      for (int64_t J = 0; J < jend; ++J) {
        if (!keep[J]) continue;
        const int64_t j0 = J * bs, n = std::min(bs, d.Lk - j0);
        const T* kp = k + (kv0 + j0) * D;
        probs_tile<T>(d, m, n, i0, j0, q + row0 * D, kp, lse + row0, P.data());
        gemm_abt<T>(m, n, D, T(1), go + row0 * D, v + (kv0 + j0) * D, dP.data());
        ds_tile<T>(m, n, P.data(), delta + row0, dP.data());
        gemm_acc_ab<T>(m, n, D, static_cast<T>(d.scale), dP.data(), kp, acc.data());
      }
      std::copy(acc.begin(), acc.begin() + m * D, dq + row0 * D);
    }
  });
}

template <typename T>
void backward_dkdv_kernel(const Dims& d, const T* q, const T* k, const T* v, const T* go, const T* lse,
                          const T* delta, const bool* mask, T* dk, T* dv) {
  const int64_t bs = d.bs, D = d.D, G = d.Hq / d.Hkv;
  at::parallel_for(0, d.B * d.Hkv * d.Kb, 1, [&](int64_t begin, int64_t end) {
    const int64_t bm = std::min(bs, d.Lq), bn = std::min(bs, d.Lk);
    std::vector<T> P(bm * bn), dP(bm * bn), dk_acc(bn * D), dv_acc(bn * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t J = zigzag(task % d.Kb, d.Kb), hk = (task / d.Kb) % d.Hkv, b = task / (d.Kb * d.Hkv);
      const int64_t j0 = J * bs, n = std::min(bs, d.Lk - j0);
      const int64_t kv0 = (b * d.Hkv + hk) * d.Lk + j0;
      const T* kp = k + kv0 * D;
      const T* vp = v + kv0 * D;
      std::fill(dk_acc.begin(), dk_acc.begin() + n * D, T(0));
      std::fill(dv_acc.begin(), dv_acc.begin() + n * D, T(0));
      // Causal: query block I sees key block J iff its last row + off is >= j0.
      const int64_t ibeg = query_blocks_begin(d, j0);
      for (int64_t h = hk * G; h < (hk + 1) * G; ++h) {
        for (int64_t I = ibeg; I < d.Qb; ++I) {
          if (!mask_row(mask, d, b, h, I)[J]) continue;
          const int64_t i0 = I * bs, m = std::min(bs, d.Lq - i0);
          if (d.causal && i0 + m - 1 + d.off < j0) continue;
          const int64_t row0 = (b * d.Hq + h) * d.Lq + i0;
          const T* qp = q + row0 * D;
          const T* gp = go + row0 * D;
          probs_tile<T>(d, m, n, i0, j0, qp, kp, lse + row0, P.data());
          gemm_acc_atb<T>(m, n, D, T(1), P.data(), gp, dv_acc.data());
          gemm_abt<T>(m, n, D, T(1), gp, vp, dP.data());
          ds_tile<T>(m, n, P.data(), delta + row0, dP.data());
          gemm_acc_atb<T>(m, n, D, static_cast<T>(d.scale), dP.data(), qp, dk_acc.data());
        }
      }
      std::copy(dk_acc.begin(), dk_acc.begin() + n * D, dk + kv0 * D);
      std::copy(dv_acc.begin(), dv_acc.begin() + n * D, dv + kv0 * D);
    }
  });
}

// Two passes per query block: lse over every visible key (online max / sum), then per key block the max of
// exp(s - lse) over the tile, taken as exp(max(s - lse)).
template <typename T>
void block_pool_kernel(const Dims& d, const T* q, const T* k, T* pool) {
  const int64_t bs = d.bs, D = d.D, G = d.Hq / d.Hkv;
  at::parallel_for(0, d.B * d.Hq * d.Qb, 1, [&](int64_t begin, int64_t end) {
    const int64_t bm = std::min(bs, d.Lq), bn = std::min(bs, d.Lk);
    std::vector<T> S(bm * bn), mx(bm), sum(bm);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t I = zigzag(task % d.Qb, d.Qb), h = (task / d.Qb) % d.Hq, b = task / (d.Qb * d.Hq);
      const int64_t i0 = I * bs, m = std::min(bs, d.Lq - i0);
      const T* qp = q + ((b * d.Hq + h) * d.Lq + i0) * D;
      const int64_t kv0 = (b * d.Hkv + h / G) * d.Lk;
      T* prow = pool + ((b * d.Hq + h) * d.Qb + I) * d.Kb;
      std::fill(prow, prow + d.Kb, T(0));
      std::fill(mx.begin(), mx.begin() + m, kNegInf<T>);
      std::fill(sum.begin(), sum.begin() + m, T(0));
      const int64_t jend = key_blocks_end(d, i0, m);
      T* s = S.data();
      for (int64_t J = 0; J < jend; ++J) {
        const int64_t j0 = J * bs, n = std::min(bs, d.Lk - j0);
        gemm_abt<T>(m, n, D, static_cast<T>(d.scale), qp, k + (kv0 + j0) * D, s);
        if (d.causal) causal_mask_tile(d, s, m, n, i0, j0);
        for (int64_t i = 0; i < m; ++i) {
          T* r = s + i * n;
          const T mnew = nan_max(mx[i], row_max(r, n));
          if (mnew == kNegInf<T>) continue;
          const T rs = exp_row_sum(r, n, mnew);
          sum[i] = sum[i] * exp_softmax(mx[i] - mnew) + rs;
          mx[i] = mnew;
        }
      }
      // lse per row; +inf for rows that see nothing (their p is 0), NaN stays NaN.
      for (int64_t i = 0; i < m; ++i)
        mx[i] = sum[i] == T(0) ? std::numeric_limits<T>::infinity() : mx[i] + std::log(sum[i]);
      for (int64_t J = 0; J < jend; ++J) {
        const int64_t j0 = J * bs, n = std::min(bs, d.Lk - j0);
        gemm_abt<T>(m, n, D, static_cast<T>(d.scale), qp, k + (kv0 + j0) * D, s);
        if (d.causal) causal_mask_tile(d, s, m, n, i0, j0);
        T best = kNegInf<T>;
        for (int64_t i = 0; i < m; ++i) {
          const T rm = row_max(s + i * n, n);
          if (rm == kNegInf<T>) continue;  // the row sees nothing in this block (a NaN lse must not reach it)
          best = nan_max(best, rm - mx[i]);
        }
        prow[J] = best == kNegInf<T> ? T(0) : std::exp(best);
      }
    }
  });
}

void check_cpu(const char* op, const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu(), op, ": q must be a CPU tensor here, got ", q.device());
}

template <typename F>
void dispatch_acc(at::ScalarType st, F&& f) {
  if (st == at::kDouble) f(double{});
  else f(float{});
}

// ------------------------------------------------------------------------------------------------------------
// Ops (CPU).

std::tuple<at::Tensor, at::Tensor> block_sparse_attn_cpu(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v, const at::Tensor& block_mask,
                                                         int64_t block_size, bool causal,
                                                         std::optional<double> scale, c10::string_view causal_align) {
  constexpr const char* op = "block_sparse_attn";
  const Dims d = check_attn_args(op, q, k, v, &block_mask, block_size, causal, scale, causal_align);
  check_cpu(op, q);
  const auto st = stat_dtype(q.scalar_type());
  auto qc = q.to(st).contiguous(), kc = k.to(st).contiguous(), vc = v.to(st).contiguous();
  auto mc = block_mask.contiguous();
  auto out = at::empty({d.B, d.Hq, d.Lq, d.D}, qc.options());
  auto lse = at::empty({d.B, d.Hq, d.Lq}, qc.options());
  if (out.numel() > 0) {
    dispatch_acc(st, [&](auto tag) {
      using T = decltype(tag);
      forward_kernel<T>(d, qc.const_data_ptr<T>(), kc.const_data_ptr<T>(), vc.const_data_ptr<T>(),
                        mc.const_data_ptr<bool>(), out.mutable_data_ptr<T>(), lse.mutable_data_ptr<T>());
    });
  }
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attn_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& block_mask,
    int64_t block_size, bool causal, std::optional<double> scale, std::array<bool, 3> output_mask,
    c10::string_view causal_align) {
  constexpr const char* op = "block_sparse_attn_backward";
  const Dims d = check_attn_args(op, q, k, v, &block_mask, block_size, causal, scale, causal_align);
  check_cpu(op, q);
  check_backward_args(op, d, q, grad_out, grad_lse, out, lse);
  const auto st = stat_dtype(q.scalar_type());
  auto qc = q.to(st).contiguous(), kc = k.to(st).contiguous(), vc = v.to(st).contiguous();
  auto gc = grad_out.to(st).contiguous();
  auto lc = lse.contiguous();
  auto mc = block_mask.contiguous();
  // Delta_i = dO_i . O_i - dlse_i ([B, Hq, Lq], accumulate type).
  auto delta = at::sum(gc * out.to(st), -1);
  if (grad_lse.has_value() && grad_lse->defined()) delta.sub_(*grad_lse);
  delta = delta.contiguous();
  at::Tensor dq, dk, dv;
  if (output_mask[0]) dq = at::zeros_like(qc);
  if (output_mask[1] || output_mask[2]) {
    dk = at::zeros_like(kc);
    dv = at::zeros_like(vc);
  }
  if (q.numel() > 0 && k.numel() > 0) {
    dispatch_acc(st, [&](auto tag) {
      using T = decltype(tag);
      if (output_mask[0])
        backward_dq_kernel<T>(d, qc.const_data_ptr<T>(), kc.const_data_ptr<T>(), vc.const_data_ptr<T>(),
                              gc.const_data_ptr<T>(), lc.const_data_ptr<T>(), delta.const_data_ptr<T>(),
                              mc.const_data_ptr<bool>(), dq.mutable_data_ptr<T>());
      if (output_mask[1] || output_mask[2])
        backward_dkdv_kernel<T>(d, qc.const_data_ptr<T>(), kc.const_data_ptr<T>(), vc.const_data_ptr<T>(),
                                gc.const_data_ptr<T>(), lc.const_data_ptr<T>(), delta.const_data_ptr<T>(),
                                mc.const_data_ptr<bool>(), dk.mutable_data_ptr<T>(), dv.mutable_data_ptr<T>());
    });
  }
  auto finish = [&](bool want, const at::Tensor& t, const at::Tensor& like) {
    return want ? t.to(like.scalar_type()) : at::empty({0}, like.options());
  };
  return {finish(output_mask[0], dq, q), finish(output_mask[1], dk, k), finish(output_mask[2], dv, v)};
}

at::Tensor attn_block_pool_cpu(const at::Tensor& q, const at::Tensor& k, int64_t block_size, bool causal,
                               std::optional<double> scale, c10::string_view causal_align) {
  constexpr const char* op = "attn_block_pool";
  Dims d = check_pool_args(op, q, k, block_size, causal, scale, causal_align);
  check_cpu(op, q);
  const auto st = stat_dtype(q.scalar_type());
  auto qc = q.to(st).contiguous(), kc = k.to(st).contiguous();
  auto pool = at::empty({d.B, d.Hq, d.Qb, d.Kb}, qc.options());
  if (pool.numel() > 0) {
    dispatch_acc(st, [&](auto tag) {
      using T = decltype(tag);
      block_pool_kernel<T>(d, qc.const_data_ptr<T>(), kc.const_data_ptr<T>(), pool.mutable_data_ptr<T>());
    });
  }
  return pool;
}

// [tile_m, tile_n, warps, shared memory bytes] of the tensor-core forward at head dim D under an opt-in limit
// (sparse_attn_tc_plan.h; zeros: no compiled configuration fits, the CUDA-core kernel runs), without a GPU.
std::vector<int64_t> sparse_attn_tc_plan(int64_t head_dim, int64_t smem_limit) {
  constexpr const char* op = "sparse_attn_tc_plan";
  TORCH_CHECK(smem_limit >= 0, op, ": smem_limit must be >= 0, got ", smem_limit);
  const tc::Config c = tc::plan(head_dim, smem_limit);
  return {c.tile_m, c.tile_n, c.warps, c.tile_m ? tc::smem_bytes(head_dim, c) : 0};
}

// The kept-tile lists of the tensor-core forward (sparse_attn_tc_plan.h), computed on the host: the reference of
// the CUDA builder (sparse_attn_tc.cu), which the CUDA kernel of this op runs.
std::tuple<at::Tensor, at::Tensor> sparse_attn_tc_tiles_cpu(const at::Tensor& block_mask, int64_t q_len,
                                                            int64_t k_len, int64_t block_size, bool causal,
                                                            c10::string_view causal_align, int64_t tile_m,
                                                            int64_t tile_n) {
  constexpr const char* op = "sparse_attn_tc_tiles";
  const tc::TileGeom g = check_tc_tiles_args(op, block_mask, q_len, k_len, block_size, causal, causal_align, tile_m,
                                             tile_n);
  const int64_t heads = block_mask.size(0) * block_mask.size(1);
  auto mc = block_mask.contiguous();
  auto opts = block_mask.options().dtype(at::kInt);
  auto count = at::empty({block_mask.size(0), block_mask.size(1), g.Mt}, opts);
  auto entries = at::empty({block_mask.size(0), block_mask.size(1), g.Mt, g.Nt}, opts);
  const bool* mp = mc.const_data_ptr<bool>();
  int32_t* cp = count.mutable_data_ptr<int32_t>();
  int32_t* ep = entries.mutable_data_ptr<int32_t>();
  at::parallel_for(0, heads * g.Mt, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)
      cp[row] = tc::build_row(mp + (row / g.Mt) * g.Qb * g.Kb, g, row % g.Mt, ep + row * g.Nt);
  });
  return {count, entries};
}

// The transposed lists of the tensor-core backward (sparse_attn_tc_plan.h build_col), computed on the host: the
// reference of the CUDA builder.
std::tuple<at::Tensor, at::Tensor> sparse_attn_tc_tiles_t_cpu(const at::Tensor& block_mask, int64_t q_len,
                                                              int64_t k_len, int64_t block_size, bool causal,
                                                              c10::string_view causal_align, int64_t tile_m,
                                                              int64_t tile_n) {
  constexpr const char* op = "sparse_attn_tc_tiles_t";
  const tc::TileGeom g = check_tc_tiles_args(op, block_mask, q_len, k_len, block_size, causal, causal_align, tile_m,
                                             tile_n);
  const int64_t heads = block_mask.size(0) * block_mask.size(1);
  auto mc = block_mask.contiguous();
  auto opts = block_mask.options().dtype(at::kInt);
  auto count = at::empty({block_mask.size(0), block_mask.size(1), g.Nt}, opts);
  auto entries = at::empty({block_mask.size(0), block_mask.size(1), g.Nt, g.Mt}, opts);
  const bool* mp = mc.const_data_ptr<bool>();
  int32_t* cp = count.mutable_data_ptr<int32_t>();
  int32_t* ep = entries.mutable_data_ptr<int32_t>();
  at::parallel_for(0, heads * g.Nt, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row)
      cp[row] = tc::build_col(mp + (row / g.Nt) * g.Qb * g.Kb, g, row % g.Nt, ep + row * g.Mt);
  });
  return {count, entries};
}

// [tile_m, tile_n, warps, dq smem, dk/dv smem, splits] of the tensor-core backward (sparse_attn_tc_plan.h bwd_plan,
// bwd_splits; zeros: no compiled configuration fits, the CUDA-core backward runs), without a GPU.
std::vector<int64_t> sparse_attn_tc_bwd_plan(int64_t head_dim, int64_t smem_limit, int64_t batch, int64_t kv_heads,
                                             int64_t group, int64_t k_len, int64_t sm_count) {
  constexpr const char* op = "sparse_attn_tc_bwd_plan";
  TORCH_CHECK(smem_limit >= 0, op, ": smem_limit must be >= 0, got ", smem_limit);
  TORCH_CHECK(batch >= 0 && kv_heads >= 0 && k_len >= 0, op, ": batch, kv_heads and k_len must be >= 0, got ", batch,
              ", ", kv_heads, " and ", k_len);
  TORCH_CHECK(group >= 1 && sm_count >= 1, op, ": group and sm_count must be >= 1, got ", group, " and ", sm_count);
  const tc::Config c = tc::bwd_plan(head_dim, smem_limit);
  if (c.tile_m == 0) return {0, 0, 0, 0, 0, 0};
  return {c.tile_m,
          c.tile_n,
          c.warps,
          tc::bwd_smem_bytes(tc::kBwdDq, head_dim, c),
          tc::bwd_smem_bytes(tc::kBwdDkdv, head_dim, c),
          tc::bwd_splits(batch, kv_heads, group, ceil_div(k_len, c.tile_n), sm_count)};
}

// [tile rows of forward, dq, dk/dv, pool (0: none fits), then their shared memory bytes]: the CUDA launchers'
// plan (sparse_attn_tiles.h), reachable without a GPU.
std::vector<int64_t> sparse_attn_tile_plan(int64_t head_dim, int64_t smem_limit) {
  constexpr const char* op = "sparse_attn_tile_plan";
  TORCH_CHECK(tiles::smallest_tile(head_dim) > 0, op, ": head dim must be 64, 128 or 256, got ", head_dim);
  TORCH_CHECK(smem_limit >= 0, op, ": smem_limit must be >= 0, got ", smem_limit);
  std::vector<int64_t> out(2 * tiles::kKernels);
  for (int kern = 0; kern < tiles::kKernels; ++kern) {
    out[kern] = tiles::plan(kern, head_dim, smem_limit);
    out[tiles::kKernels + kern] = out[kern] ? tiles::smem_bytes(kern, head_dim, out[kern]) : 0;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(peftcore, CPU, m) {
  m.impl("block_sparse_attn", &block_sparse_attn_cpu);
  m.impl("block_sparse_attn_backward", &block_sparse_attn_backward_cpu);
  m.impl("attn_block_pool", &attn_block_pool_cpu);
  m.impl("sparse_attn_tc_tiles", &sparse_attn_tc_tiles_cpu);
  m.impl("sparse_attn_tc_tiles_t", &sparse_attn_tc_tiles_t_cpu);
}

// No tensor arguments: a composite kernel serves every call.
TORCH_LIBRARY_IMPL(peftcore, CompositeImplicitAutograd, m) {
  m.impl("sparse_attn_tile_plan", &sparse_attn_tile_plan);
  m.impl("sparse_attn_tc_plan", &sparse_attn_tc_plan);
  m.impl("sparse_attn_tc_bwd_plan", &sparse_attn_tc_bwd_plan);
}

}  // namespace peftcore::sparse_attn
