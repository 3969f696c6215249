// Shared helpers for the mmr1 CPU kernels.
//
// The inner loops are written as plain scalar C++ over contiguous fp32 data so
// that GCC/Clang auto-vectorize them (-O3 -mavx2 -mfma -fopenmp-simd, see
// CMakeLists.txt); `#pragma omp simd reduction(...)` lets the compiler reorder
// the fp32 sums into vector lanes without -ffast-math (which would also break
// the NaN/inf handling the kernels rely on).
#pragma once

// Per-op ATen headers, not <ATen/ATen.h>, which declares every operator: the baseline build of the four files
// takes 24 s of CPU instead of 30 (a precompiled header of these and torch/library.h saved no more: writing it
// took 9.5 s).
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace mmr1 {

// 2^x for the arguments of a softmax, x <= 0 (z - max, in the exp2 domain:
// the caller folds log2(e)/T into its single FMA). Vectorizable fp32 code:
// x = n + f with n = round(x), |f| <= 1/2; 2^f by a degree-5 polynomial fitted
// on [-1/2, 1/2] (max rel. error 1.8e-7 ~ 1.5 ulp, measured over 2e5 points);
// 2^n built in the exponent bits. libm's expf is a call the vectorizer cannot
// inline, and an upper clamp is unnecessary because x <= 0 (tiny positive
// rounding excess is fine). x < -126 (incl. -inf) gives 2^-126 ~ 1.2e-38,
// negligible in a sum >= 1; NaN stays NaN (the clamp's compare is false for it).
static inline float exp2_nonpos(float x) {
  const float xc = x < -126.0f ? -126.0f : x;
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer (nearbyint blocks vectorizing)
  const float n = (xc + kRound) - kRound;
  const float f = xc - n;
  float p = 1.3218672247603536e-3f;
  p = std::fma(p, f, 9.671698324382305e-3f);
  p = std::fma(p, f, 5.550893023610115e-2f);
  p = std::fma(p, f, 2.4022237956523895e-1f);
  p = std::fma(p, f, 6.931468844413757e-1f);
  p = std::fma(p, f, 1.0f);
  return p * __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
}

constexpr float kLog2e = 1.44269504088896341f;

// fp64 logits (gradcheck, high-precision validation) are computed in fp64 with
// libm's exp; every other dtype computes in fp32.
template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};


// Row converters between the logits dtype and fp32. c10's scalar conversions
// carry branches the vectorizer cannot remove, so they are written out here:
// bf16 <-> fp32 is a 16-bit shift / round-to-nearest-even on the bit pattern,
// fp16 <-> fp32 uses the F16C instructions 8 lanes at a time.
static inline void load_row_f32(const float* __restrict src, float* __restrict dst, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}

static inline void load_row_f32(const double* __restrict src, float* __restrict dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

static inline void load_row_f32(const c10::BFloat16* __restrict src, float* __restrict dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = __builtin_bit_cast(float, static_cast<uint32_t>(s[i]) << 16);
}

static inline void load_row_f32(const c10::Half* __restrict src, float* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
#endif
  for (; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

static inline void store_row_f32(const float* __restrict src, float* __restrict dst, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));
}

static inline void store_row_f32(const double* __restrict src, double* __restrict dst, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(double));
}

static inline void store_row_f32(const float* __restrict src, c10::BFloat16* __restrict dst, int64_t n) {
  uint16_t* d = reinterpret_cast<uint16_t*>(dst);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t bits = __builtin_bit_cast(uint32_t, src[i]);
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;  // round to nearest even
    d[i] = static_cast<uint16_t>(src[i] != src[i] ? 0x7FC0u : rounded);   // NaN stays a quiet NaN
  }
}

static inline void store_row_f32(const float* __restrict src, c10::Half* __restrict dst, int64_t n) {
  int64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) dst[i] = static_cast<c10::Half>(src[i]);
}

// Gives an fp32 pointer to a row window: the row itself for fp32 input, or a
// per-thread scratch buffer filled once for bf16/fp16 (so later passes over the
// window hit L1/L2 in fp32 instead of converting again).
template <typename T>
struct RowReader {
  std::vector<float> scratch;
  explicit RowReader(int64_t n) : scratch(static_cast<size_t>(n)) {}
  const float* read(const T* src, int64_t n) {
    load_row_f32(src, scratch.data(), n);
    return scratch.data();
  }
};

template <>
struct RowReader<float> {
  explicit RowReader(int64_t) {}
  const float* read(const float* src, int64_t) { return src; }
};

template <>
struct RowReader<double> {
  explicit RowReader(int64_t) {}
  const double* read(const double* src, int64_t) { return src; }
};

// The hot row loops, multi-versioned: GCC/Clang emit an AVX-512 (x86-64-v4)
// clone and a baseline (AVX2, per CMakeLists.txt) clone and pick one at load
// time through an ifunc. AVX-512 is 1.45x faster on the softmax passes
// (measured: 5.9 -> 4.1 ms for 1024 x 8192 fp32 rows on a 2-core EPYC).
// -DMMR1_NO_MULTIVERSION=ON (CMake) builds the baseline alone: how the tests run the AVX2 path on an AVX-512 host.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && !defined(MMR1_NO_MULTIVERSION)
#define MMR1_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "default")))
#else
#define MMR1_MULTIVERSION
#endif

// max_i z_i
MMR1_MULTIVERSION float row_max_f32(const float* __restrict z, int64_t n);
// sum_i exp((z_i - m) * inv_t)
MMR1_MULTIVERSION float row_sum_exp_f32(const float* __restrict z, int64_t n, float m, float inv_t);
// d_i = scale * exp(z_i * inv_t - shift)
MMR1_MULTIVERSION void row_scaled_exp_f32(const float* __restrict z, int64_t n, float inv_t, float shift, float scale,
                                          float* __restrict d);
// sum_i exp(x_i) and (returned through t) sum_i exp(x_i) x_i, x_i = (z_i - m) * inv_t: the entropy of the
// window's softmax is then log(s) - t / s, from the same pass as the logsumexp
MMR1_MULTIVERSION float row_sum_exp_ent_f32(const float* __restrict z, int64_t n, float m, float inv_t, float* t);
// d_i = -inv_t * p_i * (g + gh * (log p_i + H)), log p_i = z_i * inv_t - lse: the logits gradient of
// g * logp_y + gh * H without the one-hot term (the caller adds g * inv_t at the target)
MMR1_MULTIVERSION void row_entropy_grad_f32(const float* __restrict z, int64_t n, float inv_t, float lse, float h,
                                            float g, float gh, float* __restrict d);

// fp64 versions (validation / gradcheck only): plain loops with libm exp.
static inline double row_max(const double* z, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = z[i] > m ? z[i] : m;
  return m;
}
static inline double row_sum_exp(const double* z, int64_t n, double m, double inv_t) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += std::exp(z[i] * inv_t - m * inv_t);
  return s;
}
static inline void row_scaled_exp(const double* z, int64_t n, double inv_t, double shift, double scale, double* d) {
  for (int64_t i = 0; i < n; ++i) d[i] = scale * std::exp(z[i] * inv_t - shift);
}
static inline double row_sum_exp_ent(const double* z, int64_t n, double m, double inv_t, double* t) {
  double s = 0, acc = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = z[i] * inv_t - m * inv_t;
    const double e = std::exp(x);
    s += e;
    if (e > 0) acc += e * x;  // e = 0: a -inf logit contributes nothing (0 * -inf would be NaN)
  }
  *t = acc;
  return s;
}
static inline void row_entropy_grad(const double* z, int64_t n, double inv_t, double lse, double h, double g,
                                    double gh, double* d) {
  for (int64_t i = 0; i < n; ++i) {
    const double lp = z[i] * inv_t - lse;
    const double p = std::exp(lp);
    d[i] = p > 0 ? -inv_t * p * (g + gh * (lp + h)) : 0.0;
  }
}
static inline float row_sum_exp_ent(const float* z, int64_t n, float m, float inv_t, float* t) {
  return row_sum_exp_ent_f32(z, n, m, inv_t, t);
}
static inline void row_entropy_grad(const float* z, int64_t n, float inv_t, float lse, float h, float g, float gh,
                                    float* d) {
  row_entropy_grad_f32(z, n, inv_t, lse, h, g, gh, d);
}
static inline float row_max(const float* z, int64_t n) { return row_max_f32(z, n); }
static inline float row_sum_exp(const float* z, int64_t n, float m, float inv_t) {
  return row_sum_exp_f32(z, n, m, inv_t);
}
static inline void row_scaled_exp(const float* z, int64_t n, float inv_t, float shift, float scale, float* d) {
  row_scaled_exp_f32(z, n, inv_t, shift, scale, d);
}

// Row addressing for logits given as [N, V] or [B, T, V] with unit stride on V
// (e.g. the common `logits[:, :-1]` view, which cannot be flattened to 2-D
// without a copy of the whole tensor).
struct RowIndexer {
  int64_t rows_per_batch;  // T (or N for 2-D input)
  int64_t stride_batch;    // element stride of dim 0 for 3-D, unused for 2-D
  int64_t stride_row;      // element stride between consecutive rows
  int64_t offset(int64_t n) const {
    return (n / rows_per_batch) * stride_batch + (n % rows_per_batch) * stride_row;
  }
};

static inline RowIndexer make_row_indexer(const at::Tensor& logits) {
  if (logits.dim() == 2) return {logits.size(0) > 0 ? logits.size(0) : 1, 0, logits.stride(0)};
  return {logits.size(1) > 0 ? logits.size(1) : 1, logits.stride(0), logits.stride(1)};
}

static inline int64_t num_rows(const at::Tensor& logits) {
  return logits.dim() == 2 ? logits.size(0) : logits.size(0) * logits.size(1);
}

void check_logits(const at::Tensor& logits, const char* op);
void check_vector(const at::Tensor& t, int64_t n, at::ScalarType dtype, const char* name, const char* op);

// A zero-filled tensor whose pages are not touched: large CPU tensors come from a
// fresh anonymous mapping (the kernel supplies zero pages on first write), so a
// [N, V] logits gradient that is nonzero only on the vocab window faults in only
// the window's pages (1/8 at Lumina's 8192-of-65536 window) instead of zero-
// filling all of them (measured: 70 ms per 256 MiB of first-touch faults here).
at::Tensor zeros_untouched(at::IntArrayRef sizes, const at::TensorOptions& options);

// Per-token vectors (log-probs, lse, advantages, ...) are fp64 for fp64 logits, fp32 otherwise.
static inline at::ScalarType acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace mmr1

// Dispatch over the three logits dtypes the kernels accept.
#define MMR1_DISPATCH_LOGITS(dtype, name, ...)                                             \
  [&] {                                                                                    \
    switch (dtype) {                                                                       \
      case at::kFloat: {                                                                   \
        using scalar_t = float;                                                            \
        return __VA_ARGS__();                                                              \
      }                                                                                    \
      case at::kDouble: {                                                                  \
        using scalar_t = double;                                                           \
        return __VA_ARGS__();                                                              \
      }                                                                                    \
      case at::kBFloat16: {                                                                \
        using scalar_t = c10::BFloat16;                                                    \
        return __VA_ARGS__();                                                              \
      }                                                                                    \
      case at::kHalf: {                                                                    \
        using scalar_t = c10::Half;                                                        \
        return __VA_ARGS__();                                                              \
      }                                                                                    \
      default:                                                                             \
        TORCH_CHECK(false, name, ": logits must be float32, bfloat16, float16 or float64, got ", dtype); \
    }                                                                                      \
  }()
