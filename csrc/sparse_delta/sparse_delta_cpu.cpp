// sparse_delta CPU kernels, and the helpers shared with the CUDA glue (sparse_delta.h).
//
// Layout and math. Activations are flattened to [T, features] row-major. The kernels work on token tiles of
// kTile tokens: a tile of x (or grad) is transposed into a thread-local fp32 (fp64 for double) buffer
// xb[feature][kTile], so every nonzero (r, c, v) of S becomes one kTile-wide vector operation on a contiguous
// 64-byte row of the buffer (two AVX2 registers):
//   forward  (x S^T): acc[r][:]  += v * xb[c][:]         — acc for row r stays in registers while walking row r
//   grad_x   (g S):   gxb[c][:]  += v * gb[r][:]         — gb[r] stays in registers while walking row r
//   SDDMM:            part[k]    += <gb[r][:], xb[c][:]> — reuses gb[r] across all nonzeros of row r
// Tiles are independent, so they are spread over threads (at::parallel_for); the SDDMM keeps one fp32 partial
// per thread and nonzero and sums them at the end. Temporaries are O(nnz + out + threads * kTile * (in + out)):
// no [out, in] buffer is ever built. The inner loops are plain fixed-width loops that the compiler vectorises;
// a copy compiled for AVX2+FMA is picked at run time when the CPU has it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "checks.h"
#include "dispatch.h"
#include "sparse_delta/sparse_delta.h"
#include "sparse_delta/sparse_delta_plan.h"

namespace peftcore::sparse_delta {

// ------------------------------------------------------------------------------------------------------------
// Shared helpers (also used by the CUDA glue).

void check_indices(const char* op, const at::Tensor& indices, const at::Tensor& ref, const char* name) {
  check_index(op, name, indices);
  check_dim(op, name, indices, 1);
  check_same_device(op, name, indices, ref, "the input");
}

void check_delta(const char* op, const at::Tensor& indices, const at::Tensor& values, const at::Tensor& ref) {
  check_indices(op, indices, ref);
  check_float(op, "values", values);
  check_dim(op, "values", values, 1);
  TORCH_CHECK(values.size(0) == indices.size(0), op, ": values has ", values.size(0), " entries but indices has ",
              indices.size(0));
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == ref.scalar_type(), op,
              ": values must be float32 or the input's dtype (", ref.scalar_type(), "), got ", values.scalar_type());
  check_same_device(op, "values", values, ref, "the input");
}

at::ScalarType values_grad_dtype(const at::Tensor& values) { return values.scalar_type(); }

at::Tensor flatten_tokens(const char* op, const char* name, const at::Tensor& t, int64_t features) {
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have at least 1 dim, got a scalar");
  TORCH_CHECK(t.size(-1) == features, op, ": ", name, " must have last dim ", features, ", got shape ", t.sizes());
  return t.reshape({-1, features}).contiguous();
}

int64_t last_dim(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have at least 1 dim, got a scalar");
  return t.size(-1);
}

std::vector<int64_t> with_last_dim(const at::Tensor& t, int64_t last) {
  auto s = t.sizes().vec();
  s.back() = last;
  return s;
}

std::pair<at::Tensor, at::Tensor> token_pair(const char* op, const char* a_name, const at::Tensor& a,
                                             const char* b_name, const at::Tensor& b) {
  check_same_dtype(op, b_name, b, a, a_name);
  check_same_device(op, b_name, b, a, a_name);
  auto a2d = flatten_tokens(op, a_name, a, a.dim() ? a.size(-1) : 0);
  auto b2d = flatten_tokens(op, b_name, b, b.dim() ? b.size(-1) : 0);
  TORCH_CHECK(a2d.size(0) == b2d.size(0), op, ": ", a_name, " has ", a2d.size(0), " tokens but ", b_name, " has ",
              b2d.size(0), " (shapes ", a.sizes(), " and ", b.sizes(), ")");
  return {a2d, b2d};
}

void check_weight(const char* op, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const at::Tensor& x) {
  check_dim(op, "weight", weight, 2);
  check_same_dtype(op, "weight", weight, x, "x");
  check_same_device(op, "weight", weight, x, "x");
  if (bias.has_value() && bias->defined()) {
    check_same_dtype(op, "bias", *bias, x, "x");
    check_same_device(op, "bias", *bias, x, "x");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op, ": bias must have shape [", weight.size(0),
                "], got ", bias->sizes());
  }
}

at::Tensor dense_forward(const at::Tensor& x2d, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  auto y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x2d, weight.t()) : at::mm(x2d, weight.t());
  return y.contiguous();  // a no-op for BLAS outputs; the sparse kernels accumulate into row-major [T, out]
}

at::Tensor row_ptr(const at::Tensor& indices, int64_t out_features, int64_t in_features) {
  auto bounds = at::arange(0, out_features + 1, indices.options().dtype(at::kLong)).mul_(in_features);
  return at::searchsorted(indices.to(at::kLong), bounds);  // int64 [out+1]; no host sync on CUDA
}

std::vector<at::Tensor> build_csr(const at::Tensor& indices, int64_t out_features, int64_t in_features) {
  auto idx = indices.to(at::kLong).contiguous();
  auto lopts = idx.options();
  auto rp = at::searchsorted(idx, at::arange(0, out_features + 1, lopts).mul_(in_features));
  const int64_t in = std::max<int64_t>(in_features, 1), out = std::max<int64_t>(out_features, 1);
  auto r = at::div(idx, in, "floor");
  auto c = idx - r * in;
  auto valid = idx.ge(0).logical_and_(idx.lt(out_features * in_features));
  auto key = at::where(valid, c * out + r, at::Scalar(int64_t(-1)));  // flat index in S^T; -1 sorts before row 0
  auto [sorted, perm] = at::sort(key, /*stable=*/std::optional<bool>(true), /*dim=*/0, /*descending=*/false);
  auto cp = at::searchsorted(sorted, at::arange(0, in_features + 1, lopts).mul_(out_features));
  return {rp, cp, sorted, perm};
}

namespace {
void check_csr_tensor(const char* op, const char* name, const at::Tensor& t, int64_t len, const at::Tensor& indices) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == len, op, ": ", name, " must have shape [", len, "], got ", t.sizes());
  check_same_device(op, name, t, indices, "the input");  // indices is on the input's device (checked first)
}
}  // namespace

void check_row_ptr(const char* op, const std::optional<at::Tensor>& row_ptr, const at::Tensor& indices, int64_t out) {
  if (given(row_ptr)) check_csr_tensor(op, "row_ptr", *row_ptr, out + 1, indices);
}

void check_csc(const char* op, const std::optional<at::Tensor>& csc_ptr, const std::optional<at::Tensor>& csc_idx,
               const std::optional<at::Tensor>& csc_perm, const at::Tensor& indices, int64_t in) {
  const int n = int(given(csc_ptr)) + int(given(csc_idx)) + int(given(csc_perm));
  TORCH_CHECK(n == 0 || n == 3, op, ": csc_ptr, csc_idx and csc_perm go together (all or none), got ", n, " of 3");
  if (n == 0) return;
  check_csr_tensor(op, "csc_ptr", *csc_ptr, in + 1, indices);
  check_csr_tensor(op, "csc_idx", *csc_idx, indices.numel(), indices);
  check_csr_tensor(op, "csc_perm", *csc_perm, indices.numel(), indices);
}

void match_csr(const char* op, const at::Tensor& indices, int64_t out, int64_t in,
               const std::optional<at::Tensor>& row_ptr, const std::optional<at::Tensor>& csc_ptr,
               const std::optional<at::Tensor>& csc_idx, const std::optional<at::Tensor>& csc_perm) {
  if (!given(row_ptr) && !given(csc_ptr)) return;
  auto ref = build_csr(indices, out, in);
  const std::optional<at::Tensor>* got[4] = {&row_ptr, &csc_ptr, &csc_idx, &csc_perm};
  const char* names[4] = {"row_ptr", "csc_ptr", "csc_idx", "csc_perm"};
  for (int i = 0; i < 4; ++i)
    TORCH_CHECK(!given(*got[i]) || at::equal(**got[i], ref[i]), op, ": ", names[i],
                " does not match indices (build the CSR view with sparse_delta_csr(indices, ", out, ", ", in,
                ") after every change of indices)");
}

void validate_indices(const char* op, const at::Tensor& indices, int64_t out_features, int64_t in_features) {
  check_index(op, "indices", indices);
  check_dim(op, "indices", indices, 1);
  checked_numel(op, "out_features", out_features, "in_features", in_features);
  const int64_t n = indices.numel();
  if (n == 0) return;
  auto idx = indices.to(at::kLong);
  const int64_t lo = idx.min().item<int64_t>(), hi = idx.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi < out_features * in_features, op, ": indices must lie in [0, ", out_features, "*",
              in_features, " = ", out_features * in_features, "), got values in [", lo, ", ", hi, "]");
  if (n > 1) {
    auto bad = (idx.slice(0, 1) <= idx.slice(0, 0, n - 1)).nonzero();
    if (bad.numel() > 0) {
      const int64_t k = bad[0][0].item<int64_t>();
      const int64_t a = idx[k].item<int64_t>(), b = idx[k + 1].item<int64_t>();
      TORCH_CHECK(false, op, ": indices must be sorted ascending and unique, but indices[", k, "] = ", a,
                  (a == b ? " is repeated at " : " > indices["), (a == b ? "" : std::to_string(k + 1)),
                  (a == b ? std::to_string(k + 1) : std::string("] = ") + std::to_string(b)));
    }
  }
}

namespace {

constexpr int64_t kTile = 16;

// CSR view of S built per call on the CPU: row pointers, column of each nonzero, values in the accumulate type.
template <typename acc_t>
struct Csr {
  std::vector<int64_t> rp;    // [out+1]
  std::vector<int32_t> cols;  // [nnz]
  std::vector<acc_t> vals;    // [nnz], empty when values are not needed
  int64_t out = 0, in = 0, nnz = 0;
};

// Builds the CSR view and validates the indices on the way (O(nnz + out), cheap next to any product).
template <typename acc_t>
Csr<acc_t> make_csr(const char* op, const at::Tensor& indices, const at::Tensor* values, int64_t out, int64_t in) {
  checked_numel(op, "out_features", out, "in_features", in);
  TORCH_CHECK(in <= std::numeric_limits<int32_t>::max(), op, ": in_features ", in, " too large");
  Csr<acc_t> s;
  s.out = out;
  s.in = in;
  s.nnz = indices.numel();
  s.rp.assign(out + 1, 0);
  s.cols.resize(s.nnz);
  auto idx_c = indices.contiguous();
  PEFTCORE_DISPATCH_INDEX(idx_c.scalar_type(), op, [&] {
    const index_t* idx = idx_c.data_ptr<index_t>();
    TORCH_CHECK(s.nnz == 0 || idx[0] >= 0, op, ": indices must lie in [0, ", out, "*", in, " = ", out * in,
                "), got indices[0] = ", static_cast<int64_t>(s.nnz ? idx[0] : 0));
    int64_t k = 0, prev = -1;
    for (int64_t r = 0; r < out; ++r) {
      const int64_t end = (r + 1) * in;
      s.rp[r] = k;
      for (; k < s.nnz && static_cast<int64_t>(idx[k]) < end; ++k) {
        const int64_t v = idx[k];
        TORCH_CHECK(v > prev, op, ": indices must be sorted ascending and unique, but indices[", k, "] = ", v,
                    " follows ", prev);
        prev = v;
        s.cols[k] = static_cast<int32_t>(v - r * in);
      }
    }
    s.rp[out] = k;
    TORCH_CHECK(k == s.nnz, op, ": indices must lie in [0, ", out, "*", in, " = ", out * in, "), got indices[", k,
                "] = ", static_cast<int64_t>(k < s.nnz ? idx[k] : 0));
  });
  if (values != nullptr) {
    auto v = values->contiguous().to(c10::CppTypeToScalarType<acc_t>::value);
    s.vals.assign(v.template data_ptr<acc_t>(), v.template data_ptr<acc_t>() + s.nnz);
  }
  return s;
}

#if defined(__x86_64__) && defined(__GNUC__)
#define PEFTCORE_AVX2 __attribute__((target("avx2,fma,f16c")))
#define PEFTCORE_HAVE_X86 1
inline bool cpu_has_avx2() {
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
}
#else
#define PEFTCORE_AVX2
inline bool cpu_has_avx2() { return false; }
#endif

#ifdef PEFTCORE_HAVE_X86
// 8 consecutive elements as fp32.
PEFTCORE_AVX2 inline __m256 load8_ps(const float* p) { return _mm256_loadu_ps(p); }
PEFTCORE_AVX2 inline __m256 load8_ps(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
PEFTCORE_AVX2 inline __m256 load8_ps(const c10::BFloat16* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
// In-register transpose of an 8x8 fp32 block.
PEFTCORE_AVX2 inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
    u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}
// Full tile (kTile rows), fp32 buffer: buf[f * kTile + j] = src[(t0 + j) * ld + f], 8x8 blocks in registers.
template <typename scalar_t>
PEFTCORE_AVX2 void load_tile_t_avx2(const scalar_t* src, int64_t ld, int64_t t0, int64_t features, float* buf) {
  // 8 source rows at a time (rows kTile apart in features often alias in L1; 8 stay within its ways).
  const int64_t fv = features & ~int64_t(7);
  for (int64_t jb = 0; jb < kTile; jb += 8)
    for (int64_t f0 = 0; f0 < fv; f0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = load8_ps(src + (t0 + jb + i) * ld + f0);
      transpose8(r);
      for (int i = 0; i < 8; ++i) _mm256_storeu_ps(buf + (f0 + i) * kTile + jb, r[i]);
    }
  for (int64_t f = fv; f < features; ++f)
    for (int64_t j = 0; j < kTile; ++j) buf[f * kTile + j] = static_cast<float>(src[(t0 + j) * ld + f]);
}
// Full tile, fp32 destination: dst[(t0 + j) * ld + f] += scale * buf[f * kTile + j].
PEFTCORE_AVX2 inline void add_tile_t_avx2(const float* buf, float scale, int64_t t0, int64_t features, float* dst,
                                          int64_t ld) {
  const int64_t fv = features & ~int64_t(7);
  const __m256 sc = _mm256_set1_ps(scale);
  for (int64_t jb = 0; jb < kTile; jb += 8)
    for (int64_t f0 = 0; f0 < fv; f0 += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(buf + (f0 + i) * kTile + jb);
      transpose8(r);
      for (int i = 0; i < 8; ++i) {
        float* d = dst + (t0 + jb + i) * ld + f0;
        _mm256_storeu_ps(d, _mm256_fmadd_ps(sc, r[i], _mm256_loadu_ps(d)));
      }
    }
  for (int64_t f = fv; f < features; ++f)
    for (int64_t j = 0; j < kTile; ++j) dst[(t0 + j) * ld + f] += scale * buf[f * kTile + j];
}
#endif

// buf[f * kTile + j] = src[(t0 + j) * ld + f] for j < nt, zero for nt <= j < kTile. Done in blocks of kBlock
// features so the kBlock destination lines stay in L1 while the kTile source rows stream through.
template <typename scalar_t, typename acc_t>
inline void load_tile_t(const scalar_t* src, int64_t ld, int64_t t0, int64_t nt, int64_t features, acc_t* buf) {
#ifdef PEFTCORE_HAVE_X86
  if constexpr (std::is_same_v<acc_t, float>) {
    if (nt == kTile && cpu_has_avx2()) return load_tile_t_avx2(src, ld, t0, features, buf);
  }
#endif
  constexpr int64_t kBlock = 64;
  if (nt < kTile) std::fill(buf, buf + features * kTile, acc_t(0));
  for (int64_t f0 = 0; f0 < features; f0 += kBlock) {
    const int64_t f1 = std::min(features, f0 + kBlock);
    for (int64_t j = 0; j < nt; ++j) {
      const scalar_t* row = src + (t0 + j) * ld;
      for (int64_t f = f0; f < f1; ++f) buf[f * kTile + j] = static_cast<acc_t>(row[f]);
    }
  }
}

// ---- inner tile kernels: GCC vector extensions, 32-byte vectors (one AVX2 register; two SSE ones otherwise) ----

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 32 / sizeof(T);
  static constexpr int64_t per_tile = kTile / lanes;  // vectors per kTile-wide buffer row
};

template <typename V, typename T>
__attribute__((always_inline)) inline V vload(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
__attribute__((always_inline)) inline void vstore(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// yb[r][j] = sum_{k in row r} v_k * xb[c_k][j]  (every row written, zeros for empty rows)
template <typename acc_t>
__attribute__((always_inline)) inline void fwd_tile_body(const Csr<acc_t>& s, const acc_t* xb, acc_t* yb) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = Vec<acc_t>::lanes, NV = Vec<acc_t>::per_tile;
  const int64_t* rp = s.rp.data();
  const int32_t* cols = s.cols.data();
  const acc_t* vals = s.vals.data();
  for (int64_t r = 0; r < s.out; ++r) {
    const int64_t kb = rp[r], ke = rp[r + 1];
    // two accumulator sets (even / odd nonzeros) hide the FMA latency chain
    V acc[2][NV] = {};
    int64_t k = kb;
    for (; k + 1 < ke; k += 2) {
      const acc_t v0 = vals[k], v1 = vals[k + 1];
      const acc_t* p0 = xb + static_cast<int64_t>(cols[k]) * kTile;
      const acc_t* p1 = xb + static_cast<int64_t>(cols[k + 1]) * kTile;
      for (int64_t u = 0; u < NV; ++u) {
        acc[0][u] += v0 * vload<V>(p0 + u * L);
        acc[1][u] += v1 * vload<V>(p1 + u * L);
      }
    }
    if (k < ke) {
      const acc_t v0 = vals[k];
      const acc_t* p0 = xb + static_cast<int64_t>(cols[k]) * kTile;
      for (int64_t u = 0; u < NV; ++u) acc[0][u] += v0 * vload<V>(p0 + u * L);
    }
    for (int64_t u = 0; u < NV; ++u) vstore(yb + r * kTile + u * L, acc[0][u] + acc[1][u]);
  }
}

// gxb[c_k][:] += v_k * gb[r][:] (when kGX) and part[k] += <gb[r], xb[c_k]> (when kGV), walking S row by row.
template <typename acc_t, bool kGX, bool kGV>
__attribute__((always_inline)) inline void bwd_tile_body(const Csr<acc_t>& s, const acc_t* gb, const acc_t* xb,
                                                         acc_t* gxb, acc_t* part) {
  using V = typename Vec<acc_t>::type;
  constexpr int64_t L = Vec<acc_t>::lanes, NV = Vec<acc_t>::per_tile;
  const int64_t* rp = s.rp.data();
  const int32_t* cols = s.cols.data();
  const acc_t* vals = s.vals.data();
  for (int64_t r = 0; r < s.out; ++r) {
    const int64_t kb = rp[r], ke = rp[r + 1];
    if (kb == ke) continue;
    V g[NV];
    for (int64_t u = 0; u < NV; ++u) g[u] = vload<V>(gb + r * kTile + u * L);
    for (int64_t k = kb; k < ke; ++k) {
      const int64_t c = cols[k];
      if constexpr (kGX) {
        const acc_t v = vals[k];
        acc_t* q = gxb + c * kTile;
        for (int64_t u = 0; u < NV; ++u) vstore(q + u * L, vload<V>(q + u * L) + v * g[u]);
      }
      if constexpr (kGV) {
        const acc_t* p = xb + c * kTile;
        V d = g[0] * vload<V>(p);
        for (int64_t u = 1; u < NV; ++u) d += g[u] * vload<V>(p + u * L);
        acc_t lanes[L];
        vstore(lanes, d);
        acc_t sum = 0;
        for (int64_t j = 0; j < L; ++j) sum += lanes[j];
        part[k] += sum;
      }
    }
  }
}


template <typename acc_t>
PEFTCORE_AVX2 void fwd_tile_avx2(const Csr<acc_t>& s, const acc_t* xb, acc_t* yb) {
  fwd_tile_body(s, xb, yb);
}
template <typename acc_t>
void fwd_tile_generic(const Csr<acc_t>& s, const acc_t* xb, acc_t* yb) {
  fwd_tile_body(s, xb, yb);
}

// dst[(t0 + j) * ld + f] += scale * buf[f * kTile + j] for j < nt.
template <typename scalar_t, typename acc_t>
inline void add_tile_t(const acc_t* buf, acc_t scale, int64_t t0, int64_t nt, int64_t features, scalar_t* dst,
                       int64_t ld) {
#ifdef PEFTCORE_HAVE_X86
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (nt == kTile && cpu_has_avx2()) return add_tile_t_avx2(buf, scale, t0, features, dst, ld);
  }
#endif
  for (int64_t j = 0; j < nt; ++j) {
    scalar_t* row = dst + (t0 + j) * ld;
    for (int64_t f = 0; f < features; ++f)
      row[f] = static_cast<scalar_t>(static_cast<acc_t>(row[f]) + scale * buf[f * kTile + j]);
  }
}
template <typename acc_t, bool kGX, bool kGV>
PEFTCORE_AVX2 void bwd_tile_avx2(const Csr<acc_t>& s, const acc_t* gb, const acc_t* xb, acc_t* gxb, acc_t* part) {
  bwd_tile_body<acc_t, kGX, kGV>(s, gb, xb, gxb, part);
}
template <typename acc_t, bool kGX, bool kGV>
void bwd_tile_generic(const Csr<acc_t>& s, const acc_t* gb, const acc_t* xb, acc_t* gxb, acc_t* part) {
  bwd_tile_body<acc_t, kGX, kGV>(s, gb, xb, gxb, part);
}

// y [T, out] += scale * x [T, in] @ S^T
template <typename scalar_t>
void spmm_accumulate_cpu(const at::Tensor& x2d, const Csr<at::opmath_type<scalar_t>>& s, double scale,
                         at::Tensor& y2d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = x2d.size(0), in = s.in;
  const int64_t ntiles = (T + kTile - 1) / kTile;
  if (ntiles == 0 || s.nnz == 0) return;
  const scalar_t* x = x2d.const_data_ptr<scalar_t>();
  scalar_t* y = y2d.mutable_data_ptr<scalar_t>();
  const bool avx2 = cpu_has_avx2();
  at::parallel_for(0, ntiles, 1, [&](int64_t tb, int64_t te) {
    std::vector<acc_t> xb(in * kTile), yb(s.out * kTile);
    for (int64_t tile = tb; tile < te; ++tile) {
      const int64_t t0 = tile * kTile, nt = std::min(kTile, T - t0);
      load_tile_t(x, in, t0, nt, in, xb.data());
      if (avx2) fwd_tile_avx2(s, xb.data(), yb.data());
      else fwd_tile_generic(s, xb.data(), yb.data());
      add_tile_t(yb.data(), static_cast<acc_t>(scale), t0, nt, s.out, y, s.out);
    }
  });
}

// gx [T, in] += scale * g [T, out] @ S   (when gx2d defined) and
// gv [nnz] = scale * SDDMM(g, x)          (when gv defined; fp32/fp64 accumulation, returned in acc type)
template <typename scalar_t>
void backward_cpu(const at::Tensor& g2d, const at::Tensor& x2d, const Csr<at::opmath_type<scalar_t>>& s,
                  double scale, at::Tensor* gx2d, at::Tensor* gv) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = g2d.size(0), in = s.in, out = s.out;
  const int64_t ntiles = (T + kTile - 1) / kTile;
  const bool want_gx = gx2d != nullptr, want_gv = gv != nullptr;
  const scalar_t* g = g2d.const_data_ptr<scalar_t>();
  const scalar_t* x = want_gv ? x2d.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* gx = want_gx ? gx2d->mutable_data_ptr<scalar_t>() : nullptr;
  const int nthreads = at::get_num_threads();
  // One SDDMM partial per thread (fp32/fp64), summed below.
  std::vector<acc_t> parts(want_gv ? static_cast<size_t>(nthreads) * s.nnz : 0, acc_t(0));
  const bool avx2 = cpu_has_avx2();
  if (ntiles > 0 && s.nnz > 0) {
    at::parallel_for(0, ntiles, 1, [&](int64_t tb, int64_t te) {
      std::vector<acc_t> gb(out * kTile), xb(want_gv ? in * kTile : 0), gxb(want_gx ? in * kTile : 0);
      acc_t* part = want_gv ? parts.data() + static_cast<size_t>(at::get_thread_num()) * s.nnz : nullptr;
      for (int64_t tile = tb; tile < te; ++tile) {
        const int64_t t0 = tile * kTile, nt = std::min(kTile, T - t0);
        load_tile_t(g, out, t0, nt, out, gb.data());
        if (want_gv) load_tile_t(x, in, t0, nt, in, xb.data());
        if (want_gx) std::fill(gxb.begin(), gxb.end(), acc_t(0));
        auto run = [&](auto gx_tag, auto gv_tag) {
          constexpr bool A = decltype(gx_tag)::value, B = decltype(gv_tag)::value;
          if (avx2) bwd_tile_avx2<acc_t, A, B>(s, gb.data(), xb.data(), gxb.data(), part);
          else bwd_tile_generic<acc_t, A, B>(s, gb.data(), xb.data(), gxb.data(), part);
        };
        if (want_gx && want_gv) run(std::true_type{}, std::true_type{});
        else if (want_gx) run(std::true_type{}, std::false_type{});
        else run(std::false_type{}, std::true_type{});
        if (want_gx) add_tile_t(gxb.data(), static_cast<acc_t>(scale), t0, nt, in, gx, in);
      }
    });
  }
  if (want_gv) {
    acc_t* dst = gv->mutable_data_ptr<acc_t>();
    const acc_t sc = static_cast<acc_t>(scale);
    at::parallel_for(0, s.nnz, 4096, [&](int64_t kb, int64_t ke) {
      for (int64_t k = kb; k < ke; ++k) {
        acc_t sum = 0;
        for (int t = 0; t < nthreads; ++t) sum += parts[static_cast<size_t>(t) * s.nnz + k];
        dst[k] = sc * sum;
      }
    });
  }
}

void check_activation(const char* op, const char* name, const at::Tensor& t) {
  check_float(op, name, t);
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor here, got ", t.device());
}

// ------------------------------------------------------------------------------------------------------------
// Ops (CPU).

at::Tensor sparse_delta_spmm_cpu(const at::Tensor& x, const at::Tensor& indices, const at::Tensor& values,
                                 int64_t out_features, double scale, const std::optional<at::Tensor>& row_ptr) {
  constexpr const char* op = "sparse_delta_spmm";
  check_activation(op, "x", x);
  check_delta(op, indices, values, x);
  const int64_t in = last_dim(op, "x", x);
  checked_numel(op, "out_features", out_features, "in_features", in);
  check_row_ptr(op, row_ptr, indices, out_features);
  auto x2d = flatten_tokens(op, "x", x, in);
  auto y2d = at::zeros({x2d.size(0), out_features}, x.options());
  PEFTCORE_DISPATCH_FLOATING(x.scalar_type(), op, [&] {
    auto s = make_csr<at::opmath_type<scalar_t>>(op, indices, &values, out_features, in);
    match_csr(op, indices, out_features, in, row_ptr, std::nullopt, std::nullopt, std::nullopt);
    spmm_accumulate_cpu<scalar_t>(x2d, s, scale, y2d);
  });
  return y2d.view(with_last_dim(x, out_features));
}

at::Tensor sparse_delta_spmm_t_cpu(const at::Tensor& grad, const at::Tensor& indices, const at::Tensor& values,
                                   int64_t in_features, double scale, const std::optional<at::Tensor>& csc_ptr,
                                   const std::optional<at::Tensor>& csc_idx, const std::optional<at::Tensor>& csc_perm) {
  constexpr const char* op = "sparse_delta_spmm_t";
  check_activation(op, "grad", grad);
  check_delta(op, indices, values, grad);
  const int64_t out = last_dim(op, "grad", grad);
  checked_numel(op, "out_features", out, "in_features", in_features);
  check_csc(op, csc_ptr, csc_idx, csc_perm, indices, in_features);
  auto g2d = flatten_tokens(op, "grad", grad, out);
  auto gx2d = at::zeros({g2d.size(0), in_features}, grad.options());
  PEFTCORE_DISPATCH_FLOATING(grad.scalar_type(), op, [&] {
    auto s = make_csr<at::opmath_type<scalar_t>>(op, indices, &values, out, in_features);
    match_csr(op, indices, out, in_features, std::nullopt, csc_ptr, csc_idx, csc_perm);
    backward_cpu<scalar_t>(g2d, at::Tensor(), s, scale, &gx2d, nullptr);
  });
  return gx2d.view(with_last_dim(grad, in_features));
}

at::Tensor sparse_delta_sddmm_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& indices,
                                  double scale, std::optional<at::ScalarType> out_dtype,
                                  const std::optional<at::Tensor>& row_ptr) {
  constexpr const char* op = "sparse_delta_sddmm";
  check_activation(op, "grad", grad);
  check_activation(op, "x", x);
  check_indices(op, indices, grad);
  TORCH_CHECK(!out_dtype.has_value() || is_float_dtype(*out_dtype), op,
              ": out_dtype must be float32, float16, bfloat16 or float64, got ", *out_dtype);
  auto [g2d, x2d] = token_pair(op, "grad", grad, "x", x);
  const int64_t out = g2d.size(1), in = x2d.size(1);
  check_row_ptr(op, row_ptr, indices, out);
  at::Tensor result;
  PEFTCORE_DISPATCH_FLOATING(grad.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto s = make_csr<acc_t>(op, indices, nullptr, out, in);
    match_csr(op, indices, out, in, row_ptr, std::nullopt, std::nullopt, std::nullopt);
    auto gv = at::empty({s.nnz}, grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    backward_cpu<scalar_t>(g2d, x2d, s, scale, nullptr, &gv);
    result = gv;
  });
  const auto dt = out_dtype.value_or(grad.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  return result.to(dt);
}

at::Tensor sparse_delta_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                   const at::Tensor& indices, const at::Tensor& values, double scale,
                                   const std::optional<at::Tensor>& row_ptr, const std::optional<at::Tensor>& csc_ptr,
                                   const std::optional<at::Tensor>& csc_idx, const std::optional<at::Tensor>& csc_perm) {
  constexpr const char* op = "sparse_delta_linear";
  check_activation(op, "x", x);
  check_weight(op, weight, bias, x);
  check_delta(op, indices, values, x);
  const int64_t out = weight.size(0), in = weight.size(1);
  check_row_ptr(op, row_ptr, indices, out);
  check_csc(op, csc_ptr, csc_idx, csc_perm, indices, in);
  auto x2d = flatten_tokens(op, "x", x, in);
  auto y2d = dense_forward(x2d, weight, bias);
  PEFTCORE_DISPATCH_FLOATING(x.scalar_type(), op, [&] {
    auto s = make_csr<at::opmath_type<scalar_t>>(op, indices, &values, out, in);
    match_csr(op, indices, out, in, row_ptr, csc_ptr, csc_idx, csc_perm);
    spmm_accumulate_cpu<scalar_t>(x2d, s, scale, y2d);
  });
  return y2d.view(with_last_dim(x, out));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_delta_linear_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& indices,
    const at::Tensor& values, double scale, std::array<bool, 3> mask, const std::optional<at::Tensor>& row_ptr,
    const std::optional<at::Tensor>& csc_ptr, const std::optional<at::Tensor>& csc_idx,
    const std::optional<at::Tensor>& csc_perm) {
  constexpr const char* op = "sparse_delta_linear_backward";
  check_activation(op, "grad_out", grad_out);
  check_weight(op, weight, std::nullopt, x);
  check_delta(op, indices, values, x);
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(grad_out.dim() >= 1 && grad_out.size(-1) == out, op, ": grad_out must have last dim ", out,
              ", got shape ", grad_out.sizes());
  auto [g2d, x2d] = token_pair(op, "grad_out", grad_out, "x", x);
  TORCH_CHECK(x2d.size(1) == in, op, ": x must have last dim ", in, ", got shape ", x.sizes());
  check_row_ptr(op, row_ptr, indices, out);
  check_csc(op, csc_ptr, csc_idx, csc_perm, indices, in);
  at::Tensor gx, gv, gb;
  if (mask[0]) gx = at::mm(g2d, weight);
  PEFTCORE_DISPATCH_FLOATING(x.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto s = make_csr<acc_t>(op, indices, &values, out, in);  // validates the delta even when only grad_bias is asked
    match_csr(op, indices, out, in, row_ptr, csc_ptr, csc_idx, csc_perm);
    if (!mask[0] && !mask[1]) return;
    at::Tensor gv_acc;
    if (mask[1]) gv_acc = at::empty({s.nnz}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    backward_cpu<scalar_t>(g2d, x2d, s, scale, mask[0] ? &gx : nullptr, mask[1] ? &gv_acc : nullptr);
    if (mask[1]) gv = gv_acc.to(values.scalar_type());
  });
  if (mask[2]) gb = g2d.sum(0);
  auto empty = [&](const at::Tensor& like) { return at::empty({0}, like.options()); };
  return {mask[0] ? gx.view(x.sizes()) : empty(x), mask[1] ? gv : empty(values), mask[2] ? gb : empty(weight)};
}

void merge_into(const char* op, at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values,
                double scale) {
  check_activation(op, "weight", weight);
  check_dim(op, "weight", weight, 2);
  TORCH_CHECK(weight.is_contiguous(), op, ": weight must be contiguous, got strides ", weight.strides());
  check_delta(op, indices, values, weight);
  const int64_t out = weight.size(0), in = weight.size(1);
  PEFTCORE_DISPATCH_FLOATING(weight.scalar_type(), "sparse_delta_merge", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto s = make_csr<acc_t>(op, indices, &values, out, in);
    scalar_t* w = weight.mutable_data_ptr<scalar_t>();
    const acc_t sc = static_cast<acc_t>(scale);
    at::parallel_for(0, out, 64, [&](int64_t rb, int64_t re) {
      for (int64_t r = rb; r < re; ++r)
        for (int64_t k = s.rp[r]; k < s.rp[r + 1]; ++k) {
          scalar_t& dst = w[r * in + s.cols[k]];
          dst = static_cast<scalar_t>(static_cast<acc_t>(dst) + sc * s.vals[k]);
        }
    });
  });
}

void sparse_delta_merge__cpu(at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values, double scale) {
  merge_into("sparse_delta_merge_", weight, indices, values, scale);
}

at::Tensor sparse_delta_merge_cpu(const at::Tensor& weight, const at::Tensor& indices, const at::Tensor& values,
                                  double scale) {
  constexpr const char* op = "sparse_delta_merge";
  check_activation(op, "weight", weight);
  check_dim(op, "weight", weight, 2);
  auto w = weight.clone(at::MemoryFormat::Contiguous);
  merge_into(op, w, indices, values, scale);
  return w;
}

// Top-k of |grad^T x| over positions not in `exclude`, one block of rows at a time: each block's scores come from
// a GEMM on a row slice (at most kTopkTileElems entries), then a candidate pool of at most 2k entries is pruned
// with nth_element. Memory: one score tile + the pool; never an [out, in] buffer (unless out*in is small).
//
// Ranking (a strict total order, so the result does not depend on tiling or threads): larger |score| first; every
// NaN score ranks above +inf, which ranks above every finite score (torch.topk / torch.sort also treat NaN as the
// largest value); equal scores, and NaNs among themselves, rank by ascending flat index. Scores are ranked in the
// GEMM's precision: float64 for float64 inputs, fp32 otherwise.
constexpr int64_t kTopkTileElems = int64_t(1) << 20;

// The rank key of a score: the bit pattern of its magnitude (monotone in the value for non-negative IEEE floats,
// +inf included), every NaN mapped to one key above +inf's.
template <typename score_t>
inline uint64_t topk_rank_key(score_t v) {
  if (std::isnan(v)) return std::numeric_limits<uint64_t>::max();
  const score_t a = std::fabs(v);
  if constexpr (std::is_same_v<score_t, double>) {
    uint64_t bits;
    std::memcpy(&bits, &a, sizeof(bits));
    return bits;
  } else {
    uint32_t bits;
    std::memcpy(&bits, &a, sizeof(bits));
    return bits;
  }
}

struct TopkCand {
  uint64_t key;
  int64_t flat;
  float score;  // |score| as returned (NaN stays NaN)
};

// true when a ranks before b
inline bool topk_before(const TopkCand& a, const TopkCand& b) {
  return a.key > b.key || (a.key == b.key && a.flat < b.flat);
}

std::tuple<at::Tensor, at::Tensor> sparse_delta_topk_grad_cpu(const at::Tensor& grad, const at::Tensor& x, int64_t k,
                                                              const std::optional<at::Tensor>& exclude) {
  constexpr const char* op = "sparse_delta_topk_grad";
  check_activation(op, "grad", grad);
  check_activation(op, "x", x);
  auto [g2d, x2d] = token_pair(op, "grad", grad, "x", x);
  const int64_t out = g2d.size(1), in = x2d.size(1);
  const int64_t numel = checked_numel(op, "out_features", out, "in_features", in);
  std::vector<int64_t> excl;
  if (exclude.has_value() && exclude->defined()) {
    check_indices(op, *exclude, grad, "exclude");
    auto e = exclude->to(at::kLong).contiguous();
    excl.assign(e.data_ptr<int64_t>(), e.data_ptr<int64_t>() + e.numel());
    for (size_t i = 0; i < excl.size(); ++i) {
      TORCH_CHECK(excl[i] >= 0 && excl[i] < numel, op, ": exclude[", i, "] = ", excl[i], " is outside [0, ", out,
                  "*", in, " = ", numel, ")");
      TORCH_CHECK(i == 0 || excl[i] > excl[i - 1], op, ": exclude must be sorted ascending and unique, but exclude[",
                  i, "] = ", excl[i], " follows ", excl[i - 1]);
    }
  }
  const int64_t avail = numel - static_cast<int64_t>(excl.size());
  TORCH_CHECK(k >= 0 && k <= avail, op, ": k must be in [0, ", avail, "] (", out, "*", in, " positions, ",
              excl.size(), " excluded), got ", k);
  const bool dbl = grad.scalar_type() == at::kDouble;
  auto gT = (dbl ? g2d : g2d.to(at::kFloat)).t();
  auto xf = dbl ? x2d : x2d.to(at::kFloat);
  std::vector<TopkCand> pool;
  pool.reserve(2 * k + 1);
  uint64_t thresh = 0;  // once the pool holds k entries, a later (larger-index) candidate with key <= thresh loses
  auto prune = [&] {
    if (static_cast<int64_t>(pool.size()) <= k) return;
    std::nth_element(pool.begin(), pool.begin() + (k - 1), pool.end(), topk_before);
    pool.resize(k);
    thresh = pool[k - 1].key;  // the k-th ranked entry: every kept one ranks before it or is it
  };
  const int64_t rows = std::max<int64_t>(1, std::min<int64_t>(out, kTopkTileElems / std::max<int64_t>(in, 1)));
  auto scan = [&](auto score_tag) {
    using score_t = decltype(score_tag);
    size_t ex = 0;
    for (int64_t r0 = 0; r0 < out; r0 += rows) {
      const int64_t nr = std::min(rows, out - r0);
      auto tile = at::mm(gT.slice(0, r0, r0 + nr), xf).contiguous();  // [nr, in] scores (float64 or fp32)
      const score_t* sc = tile.const_data_ptr<score_t>();
      const int64_t base = r0 * in, n = nr * in;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t flat = base + i;  // flat indices are visited in ascending order
        while (ex < excl.size() && excl[ex] < flat) ++ex;
        if (ex < excl.size() && excl[ex] == flat) continue;
        const uint64_t key = topk_rank_key(sc[i]);
        if (static_cast<int64_t>(pool.size()) >= k && key <= thresh) continue;
        pool.push_back({key, flat, static_cast<float>(std::fabs(sc[i]))});
        if (static_cast<int64_t>(pool.size()) >= 2 * k) prune();
      }
    }
    prune();
  };
  if (k > 0) {
    if (dbl) scan(double{});
    else scan(float{});
  }
  std::sort(pool.begin(), pool.end(), [](const TopkCand& a, const TopkCand& b) { return a.flat < b.flat; });
  auto idx = at::empty({k}, grad.options().dtype(at::kLong));
  auto scores = at::empty({k}, grad.options().dtype(at::kFloat));
  for (int64_t i = 0; i < k; ++i) {
    idx.data_ptr<int64_t>()[i] = pool[i].flat;
    scores.data_ptr<float>()[i] = pool[i].score;
  }
  return {idx, scores};
}

void sparse_delta_validate_impl(const at::Tensor& indices, int64_t out_features, int64_t in_features) {
  validate_indices("sparse_delta_validate", indices, out_features, in_features);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sparse_delta_csr_impl(const at::Tensor& indices,
                                                                                 int64_t out_features,
                                                                                 int64_t in_features) {
  constexpr const char* op = "sparse_delta_csr";
  check_index(op, "indices", indices);
  check_dim(op, "indices", indices, 1);
  checked_numel(op, "out_features", out_features, "in_features", in_features);
  auto v = build_csr(indices, out_features, in_features);
  return {v[0], v[1], v[2], v[3]};
}

// [tt, rows, cols, splits, smem, grid_x, grid_y, traffic]: the CUDA launchers' plan (sparse_delta_plan.h) for one
// kernel ("spmm", "spmm_t" or "sddmm"), reachable without a GPU. tt = 0: nothing to launch.
std::vector<int64_t> sparse_delta_tile_plan(c10::string_view kernel, int64_t tokens, int64_t in_features,
                                            int64_t out_features, int64_t nnz, at::ScalarType dtype,
                                            int64_t smem_optin, int64_t sms, bool deterministic) {
  constexpr const char* op = "sparse_delta_tile_plan";
  TORCH_CHECK(kernel == "spmm" || kernel == "spmm_t" || kernel == "sddmm", op,
              ": kernel must be \"spmm\", \"spmm_t\" or \"sddmm\", got \"", std::string(kernel), "\"");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": dtype must be float32, float16 or bfloat16 (the CUDA kernels' dtypes), got ", dtype);
  TORCH_CHECK(tokens >= 0 && nnz >= 0 && smem_optin >= 0 && sms >= 0, op,
              ": tokens, nnz, smem_optin and sms must be >= 0, got ", tokens, ", ", nnz, ", ", smem_optin, ", ", sms);
  checked_numel(op, "out_features", out_features, "in_features", in_features);
  const bool t = kernel == "spmm_t";
  const auto p = plan::plan(kernel == "sddmm" ? plan::kSddmm : plan::kSpmm, tokens, t ? in_features : out_features,
                            t ? out_features : in_features, nnz, c10::elementSize(dtype), smem_optin, sms,
                            deterministic);
  return {p.tt, p.rows, p.cols, p.splits, p.smem, p.grid_x, p.grid_y, p.traffic};
}

}  // namespace

TORCH_LIBRARY_IMPL(peftcore, CPU, m) {
  m.impl("sparse_delta_linear", &sparse_delta_linear_cpu);
  m.impl("sparse_delta_linear_backward", &sparse_delta_linear_backward_cpu);
  m.impl("sparse_delta_spmm", &sparse_delta_spmm_cpu);
  m.impl("sparse_delta_spmm_t", &sparse_delta_spmm_t_cpu);
  m.impl("sparse_delta_sddmm", &sparse_delta_sddmm_cpu);
  m.impl("sparse_delta_merge_", &sparse_delta_merge__cpu);
  m.impl("sparse_delta_merge", &sparse_delta_merge_cpu);
  m.impl("sparse_delta_topk_grad", &sparse_delta_topk_grad_cpu);
}

// Validation is device independent (ATen ops + a host sync), so it is registered once for every backend.
TORCH_LIBRARY_IMPL(peftcore, CompositeExplicitAutograd, m) {
  m.impl("sparse_delta_validate", &sparse_delta_validate_impl);
  m.impl("sparse_delta_csr", &sparse_delta_csr_impl);
}

// No tensor arguments: a composite kernel serves every call.
TORCH_LIBRARY_IMPL(peftcore, CompositeImplicitAutograd, m) {
  m.impl("sparse_delta_tile_plan", &sparse_delta_tile_plan);
}

}  // namespace peftcore::sparse_delta
