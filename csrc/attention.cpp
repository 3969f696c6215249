// Decode attention over a rollout's KV cache with shared prompt prefixes, on the CPU
// (docs/kernel-semantics.md, section 5; the spec is decode_attention in mmr1_kernels/reference.py).
//
// Why a kernel: a GRPO rollout step is bound by the bytes of cache it reads. With one static cache per row and a
// masked SDPA (the previous path), all 2N rows read the longest row's context: the unconditional CFG rows (whose
// context is only the image block being drawn) and G identical copies of every prompt. Profiled on the demo model
// at the GRPO batch (64 cache rows): 58-61% of the rollout's time was that SDPA.
//
// How, in two phases (both parallel over tasks, dynamically scheduled: rows have very different lengths):
//   1. one task per prompt: the prompt's prefix keys are read once for every query that sees them -- its G rows x
//      W window positions x H query heads -- leaving an online-softmax state (m, l, acc) per query;
//   2. one task per row: the row's own keys (slots < lengths[r] + w + 1 for window position w), starting
//      from phase 1's state. Continuing an online softmax from a partial state *is* the log-sum-exp merge of the
//      two partial attentions, so no separate merge pass exists. Then out = acc / l, lse = (m + log2 l) ln 2.
// A task reads its store row as one stream (a key's kv heads are contiguous): per block of 32 keys, per kv head,
// that head's queries' scores and online-softmax update (block_attend; a task per (row, kv head) read 128-byte
// pieces 768 bytes apart). 16-bit caches are converted to fp32 a block at a time. Scores are kept in the log2 domain
// (q pre-scaled by scale * log2 e), so each exponential is one exp2_nonpos.
#include "common.h"

#include <atomic>
#include <type_traits>

#include <torch/library.h>

namespace mmr1 {

namespace {

constexpr int64_t kKeyBlock = 32;
constexpr double kLn2 = 0.69314718055994530942;

static inline float exp2_le0(float x) { return exp2_nonpos(x); }
static inline double exp2_le0(double x) { return std::exp2(x); }

// ----------------------------------------------------------------------------------------------------------------
// Inner kernels over one block of n <= kKeyBlock keys (fp32/fp64 rows: key j at k + j * ks, value j at v + j * vs)
// for nq queries q [nq][D] (pre-scaled, log2 domain):
//   scores s [nq][kKeyBlock] = q . k, then per query the online-softmax update of its running max m, sum l and
//   unnormalized output acc [nq][D] by the keys it sees (the block's first visible[i]).
// Measured on the demo's shapes (D = 32, one core): plain loops ran at ~190 cycles per (key, head) for one query --
// one FMA chain per dot, a horizontal sum through the stack, and the output row reloaded from memory for every key.
// The fp32 kernels below (D a multiple of 8) use 8-lane vectors: 8 keys' dots at a time (8 independent FMA chains,
// then one transpose-and-add tree for the 8 sums), and the output row held in registers across the block's keys.

template <typename A>
static inline __attribute__((always_inline)) void block_update_tail(const A* __restrict si, int64_t nn,
                                                                    A* __restrict p, A& m, A& l, A& alpha) {
  // max, exponentials (lanes past nn are 0) and the new running sum; returns the old state's weight in alpha
  const A neg_inf = -std::numeric_limits<A>::infinity();
  A mx = neg_inf;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < kKeyBlock; ++j) mx = std::max(mx, j < nn ? si[j] : neg_inf);
  const A m_new = m > mx ? m : mx;
  // all scores -inf (or NaN) so far: exponentiate relative to 0, so -inf gives 0 and NaN stays NaN
  const A ref = m_new == neg_inf ? A(0) : m_new;
  alpha = exp2_le0(m - ref);  // the old state's weight (m = -inf: a tiny number times an all-zero state)
  A sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < kKeyBlock; ++j) {
    p[j] = j < nn ? exp2_le0(si[j] - ref) : A(0);
    sum += p[j];
  }
  l = l * alpha + sum;
  m = m_new;
}

// Any dtype / head dim: plain loops (fp64 validation, odd head dims).
template <typename A>
static void block_attend_generic(const A* __restrict q, int64_t nq, int64_t D, const A* __restrict k, int64_t ks,
                                 const A* __restrict v, int64_t vs, int64_t n, const int64_t* __restrict visible,
                                 A* __restrict m, A* __restrict l, A* __restrict acc) {
  A s[kKeyBlock], p[kKeyBlock];
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t nn = visible[i];
    if (nn <= 0) continue;
    const A* qi = q + i * D;
    for (int64_t j = 0; j < nn; ++j) {
      const A* kj = k + j * ks;
      A dot = 0;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < D; ++d) dot += qi[d] * kj[d];
      s[j] = dot;
    }
    A alpha;
    block_update_tail(s, nn, p, m[i], l[i], alpha);
    A* ai = acc + i * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) ai[d] *= alpha;
    for (int64_t j = 0; j < nn; ++j) {
      const A pj = p[j];
      const A* vj = v + j * vs;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ai[d] += pj * vj[d];
    }
  }
  (void)n;
}

#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
#define MMR1_VECTOR_ATTENTION 1
typedef float v8f __attribute__((vector_size(32)));

static inline v8f ld8(const float* p) {
  v8f r;
  std::memcpy(&r, p, sizeof r);
  return r;
}
static inline void st8(float* p, v8f x) { std::memcpy(p, &x, sizeof x); }
// 8 16-bit cache elements as fp32 lanes, converted in registers (no fp32 copy of the block written and read back)
static inline v8f ld8(const c10::BFloat16* p) {
  typedef uint16_t v8u16 __attribute__((vector_size(16)));
  typedef uint32_t v8u32 __attribute__((vector_size(32)));
  v8u16 h;
  std::memcpy(&h, p, sizeof h);
  const v8u32 w = __builtin_convertvector(h, v8u32) << 16;  // bf16 = the top half of an fp32
  v8f r;
  std::memcpy(&r, &w, sizeof r);
  return r;
}
static inline v8f ld8(const c10::Half* p) {
#if defined(__F16C__) && defined(__AVX__)
  const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  v8f r;
  std::memcpy(&r, &x, sizeof r);
  return r;
#else
  alignas(32) float t[8];
  for (int i = 0; i < 8; ++i) t[i] = static_cast<float>(p[i]);
  return ld8(t);
#endif
}
// pairwise sums within 4-lane halves, like x86's vhaddps: [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7]
static inline v8f hadd8(v8f a, v8f b) {
  return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14) +
         __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}
// [sum(a0), ..., sum(a7)]: 6 pairwise-add levels and one cross-half add for 8 horizontal sums
static inline v8f sums8(v8f a0, v8f a1, v8f a2, v8f a3, v8f a4, v8f a5, v8f a6, v8f a7) {
  const v8f lo = hadd8(hadd8(a0, a1), hadd8(a2, a3));  // [a0..a3 (lanes 0-3) | a0..a3 (lanes 4-7)]
  const v8f hi = hadd8(hadd8(a4, a5), hadd8(a6, a7));
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 8, 9, 10, 11) +
         __builtin_shufflevector(lo, hi, 4, 5, 6, 7, 12, 13, 14, 15);
}

// p.V for two queries at once (a and b; probabilities pa[j * ps] / pb[j * ps] over the block's first nn keys, zero
// past each one's own count): 8 independent FMA chains per key and each V vector loaded once for both (one query
// alone is bound by the FMA latency of its 4 chains).
template <int64_t DD, typename T>
static inline __attribute__((always_inline)) void pv_pair(const float* __restrict pa, const float* __restrict pb,
                                                          int64_t ps, float alpha_a, float alpha_b, int64_t nn,
                                                          int64_t D, const T* __restrict v, int64_t vs,
                                                          float* __restrict oa, float* __restrict ob) {
  for (int64_t d0 = 0; d0 < D; d0 += 32) {
    if (D - d0 >= 32) {
      v8f a0 = ld8(oa + d0) * alpha_a, a1 = ld8(oa + d0 + 8) * alpha_a;
      v8f a2 = ld8(oa + d0 + 16) * alpha_a, a3 = ld8(oa + d0 + 24) * alpha_a;
      v8f b0 = ld8(ob + d0) * alpha_b, b1 = ld8(ob + d0 + 8) * alpha_b;
      v8f b2 = ld8(ob + d0 + 16) * alpha_b, b3 = ld8(ob + d0 + 24) * alpha_b;
      for (int64_t j = 0; j < nn; ++j) {
        const T* vj = v + j * vs + d0;
        const v8f v0 = ld8(vj), v1 = ld8(vj + 8), v2 = ld8(vj + 16), v3 = ld8(vj + 24);
        const float x = pa[j * ps], y = pb[j * ps];
        a0 += x * v0;
        a1 += x * v1;
        a2 += x * v2;
        a3 += x * v3;
        b0 += y * v0;
        b1 += y * v1;
        b2 += y * v2;
        b3 += y * v3;
      }
      st8(oa + d0, a0);
      st8(oa + d0 + 8, a1);
      st8(oa + d0 + 16, a2);
      st8(oa + d0 + 24, a3);
      st8(ob + d0, b0);
      st8(ob + d0 + 8, b1);
      st8(ob + d0 + 16, b2);
      st8(ob + d0 + 24, b3);
    } else {
      for (int64_t d1 = d0; d1 < D; d1 += 8) {
        v8f a = ld8(oa + d1) * alpha_a, b = ld8(ob + d1) * alpha_b;
        for (int64_t j = 0; j < nn; ++j) {
          const v8f vj = ld8(v + j * vs + d1);
          a += pa[j * ps] * vj;
          b += pb[j * ps] * vj;
        }
        st8(oa + d1, a);
        st8(ob + d1, b);
      }
    }
  }
}

typedef int32_t v8i __attribute__((vector_size(32)));

// exp2_nonpos (common.h) on 8 lanes: the same polynomial and exponent-bit construction
static inline v8f exp2_nonpos_v8(v8f x) {
  const v8f xc = (x < -126.0f) != 0 ? v8f{} - 126.0f : x;  // NaN compares false: stays NaN
  const v8f n = (xc + 12582912.0f) - 12582912.0f;
  const v8f f = xc - n;
  v8f p = f * 1.3218672247603536e-3f + 9.671698324382305e-3f;
  p = p * f + 5.550893023610115e-2f;
  p = p * f + 2.4022237956523895e-1f;
  p = p * f + 6.931468844413757e-1f;
  p = p * f + 1.0f;
  const v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
  return p * (v8f)e;
}

// Eight queries at once (a Jacobi window, or a group's rows sharing a prefix): the vector lanes are the queries.
// qt [D][8]: the queries transposed. Scores of 8 keys per pass: per dim, one query-vector load, 8 broadcast key
// elements and 8 FMAs -- every FMA does 8 useful multiply-adds and no horizontal sums exist; the softmax
// bookkeeping runs on the same [key][query] layout (st / pt), 8 queries per vector op.
template <int64_t DD>
static inline __attribute__((always_inline)) void block_attend_q8(
    const float* __restrict qt, int64_t D_, const float* const* __restrict kr, const float* __restrict v, int64_t vs,
    const int64_t* __restrict visible, float* __restrict m, float* __restrict l, float* __restrict acc,
    float* __restrict st, float* __restrict pt) {
  const int64_t D = DD > 0 ? DD : D_;
  int64_t nmax = 0;
  alignas(32) float visf[8];
  for (int64_t t = 0; t < 8; ++t) {
    nmax = std::max(nmax, visible[t]);
    visf[t] = static_cast<float>(std::max<int64_t>(visible[t], 0));
  }
  if (nmax <= 0) return;
  for (int64_t j = 0; j < nmax; j += 8) {  // 8 keys per pass: 8 independent FMA chains (4 were latency-bound)
    v8f s0 = {}, s1 = {}, s2 = {}, s3 = {}, s4 = {}, s5 = {}, s6 = {}, s7 = {};
    const float *k0 = kr[j], *k1 = kr[j + 1], *k2 = kr[j + 2], *k3 = kr[j + 3];
    const float *k4 = kr[j + 4], *k5 = kr[j + 5], *k6 = kr[j + 6], *k7 = kr[j + 7];
    for (int64_t d = 0; d < D; ++d) {
      const v8f qv = ld8(qt + d * 8);
      s0 += qv * k0[d];
      s1 += qv * k1[d];
      s2 += qv * k2[d];
      s3 += qv * k3[d];
      s4 += qv * k4[d];
      s5 += qv * k5[d];
      s6 += qv * k6[d];
      s7 += qv * k7[d];
    }
    float* sj = st + j * 8;
    st8(sj, s0);
    st8(sj + 8, s1);
    st8(sj + 16, s2);
    st8(sj + 24, s3);
    st8(sj + 32, s4);
    st8(sj + 40, s5);
    st8(sj + 48, s6);
    st8(sj + 56, s7);
  }
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const v8f vis = ld8(visf), ninf = v8f{} + neg_inf;
  v8f mx = ninf;
  for (int64_t j = 0; j < nmax; ++j) {
    const v8f sj = ld8(st + j * 8);
    const v8i use = (vis > static_cast<float>(j)) & (sj > mx);  // seen and larger (a NaN score is neither)
    mx = use != 0 ? sj : mx;
  }
  const v8f m_old = ld8(m);
  const v8f m_new = (m_old > mx) != 0 ? m_old : mx;
  const v8f ref = (m_new == ninf) != 0 ? v8f{} : m_new;  // nothing seen yet: exponentiate relative to 0
  const v8f alpha = exp2_nonpos_v8(m_old - ref);
  v8f sum = {};
  for (int64_t j = 0; j < nmax; ++j) {
    const v8f e = exp2_nonpos_v8(ld8(st + j * 8) - ref);
    const v8f pj = (vis > static_cast<float>(j)) != 0 ? e : v8f{};
    st8(pt + j * 8, pj);
    sum += pj;
  }
  st8(l, ld8(l) * alpha + sum);
  st8(m, m_new);
  alignas(32) float a[8];
  st8(a, alpha);
  for (int64_t t = 0; t < 8; t += 2)
    pv_pair<DD>(pt + t, pt + t + 1, 8, a[t], a[t + 1], nmax, D, v, vs, acc + t * D, acc + (t + 1) * D);
}

// p.V for one query: 8 output vectors (64 dims) per pass, 8 independent FMA chains.
template <typename T>
static inline __attribute__((always_inline)) void pv_one(const float* __restrict pa, float alpha, int64_t nn,
                                                         int64_t D, const T* __restrict v, int64_t vs,
                                                         float* __restrict oa) {
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) {
    v8f o[8];
    for (int64_t u = 0; u < 8; ++u) o[u] = ld8(oa + d0 + 8 * u) * alpha;
    for (int64_t j = 0; j < nn; ++j) {
      const float x = pa[j];
      const T* vj = v + j * vs + d0;
      for (int64_t u = 0; u < 8; ++u) o[u] += x * ld8(vj + 8 * u);
    }
    for (int64_t u = 0; u < 8; ++u) st8(oa + d0 + 8 * u, o[u]);
  }
  for (; d0 < D; d0 += 8) {
    v8f o = ld8(oa + d0) * alpha;
    for (int64_t j = 0; j < nn; ++j) o += pa[j] * ld8(v + j * vs + d0);
    st8(oa + d0, o);
  }
}

// fp32, D = DD (a multiple of 8; 0: any multiple of 8 given at run time). p [nq][kKeyBlock] and alpha [nq]:
// scratch for the queries' probabilities and old-state weights.
// T: the keys' and values' element type (fp32, or a 16-bit cache read and converted in registers; the 16-bit
// kernels serve fewer than 8 queries per kv head -- with more, the block is converted once and shared).
template <int64_t DD, typename T>
static inline __attribute__((always_inline)) void block_attend_v8_body(
    const float* __restrict q, int64_t nq, int64_t D_, const T* __restrict k, int64_t ks, const T* __restrict v,
    int64_t vs, int64_t n, const int64_t* __restrict visible, float* __restrict m, float* __restrict l,
    float* __restrict acc, float* __restrict p, float* __restrict alpha, const float* __restrict qt) {
  const int64_t D = DD > 0 ? DD : D_;
  alignas(32) float s[kKeyBlock];
  const T* kr[kKeyBlock];  // key rows; past the block's n keys, the last one again (read, never used)
  for (int64_t t = 0; t < kKeyBlock; ++t) kr[t] = k + std::min<int64_t>(t, n - 1) * ks;
  int64_t first = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; first + 8 <= nq; first += 8)  // groups of 8 queries, lanes = queries (qt: the groups transposed)
      block_attend_q8<DD>(qt + first * D, D, kr, v, vs, visible + first, m + first, l + first, acc + first * D, p,
                          p + kKeyBlock * 8);
  }
  for (int64_t i = first; i < nq; ++i) {  // the rest: scores and the softmax bookkeeping one query at a time
    const int64_t nn = visible[i];
    float* pi = p + i * kKeyBlock;
    if (nn <= 0) {
      alpha[i] = 1;
      for (int64_t j = 0; j < kKeyBlock; ++j) pi[j] = 0;
      continue;
    }
    const float* qi = q + i * D;
    for (int64_t j = 0; j < nn; j += 8) {  // 8 keys at a time: 8 independent FMA chains, one tree for the sums
      v8f a0 = {}, a1 = {}, a2 = {}, a3 = {}, a4 = {}, a5 = {}, a6 = {}, a7 = {};
      const T* const* kj = kr + j;
      for (int64_t c = 0; c < D; c += 8) {
        const v8f qv = ld8(qi + c);
        a0 += qv * ld8(kj[0] + c);
        a1 += qv * ld8(kj[1] + c);
        a2 += qv * ld8(kj[2] + c);
        a3 += qv * ld8(kj[3] + c);
        a4 += qv * ld8(kj[4] + c);
        a5 += qv * ld8(kj[5] + c);
        a6 += qv * ld8(kj[6] + c);
        a7 += qv * ld8(kj[7] + c);
      }
      st8(s + j, sums8(a0, a1, a2, a3, a4, a5, a6, a7));
    }
    block_update_tail(s, nn, pi, m[i], l[i], alpha[i]);
  }
  int64_t i = first;
  for (; i + 2 <= nq; i += 2) {  // p.V, two queries at a time
    const int64_t nn = std::max(visible[i], visible[i + 1]);
    if (nn > 0)
      pv_pair<DD>(p + i * kKeyBlock, p + (i + 1) * kKeyBlock, 1, alpha[i], alpha[i + 1], nn, D, v, vs, acc + i * D,
                  acc + (i + 1) * D);
  }
  if (i < nq && visible[i] > 0) pv_one(p + i * kKeyBlock, alpha[i], visible[i], D, v, vs, acc + i * D);
}

#define MMR1_ATTN_V8(DD, T, SUFFIX)                                                                               \
  MMR1_MULTIVERSION void block_attend_v8_##SUFFIX##DD(const float* q, int64_t nq, int64_t D, const T* k,         \
                                                      int64_t ks, const T* v, int64_t vs, int64_t n,               \
                                                      const int64_t* visible, float* m, float* l, float* acc,      \
                                                      float* p, float* alpha, const float* qt) {                   \
    block_attend_v8_body<DD, T>(q, nq, D, k, ks, v, vs, n, visible, m, l, acc, p, alpha, qt);                     \
  }
MMR1_ATTN_V8(0, float, f32_)
MMR1_ATTN_V8(32, float, f32_)
MMR1_ATTN_V8(64, float, f32_)
MMR1_ATTN_V8(128, float, f32_)
MMR1_ATTN_V8(0, c10::BFloat16, bf16_)
MMR1_ATTN_V8(32, c10::BFloat16, bf16_)
MMR1_ATTN_V8(64, c10::BFloat16, bf16_)
MMR1_ATTN_V8(128, c10::BFloat16, bf16_)
MMR1_ATTN_V8(0, c10::Half, f16_)
MMR1_ATTN_V8(32, c10::Half, f16_)
MMR1_ATTN_V8(64, c10::Half, f16_)
MMR1_ATTN_V8(128, c10::Half, f16_)
#undef MMR1_ATTN_V8

// The 16-bit caches read in place (fewer than 8 queries per kv head, D a multiple of 8); false: convert the block.
#define MMR1_ATTN_DIRECT(T, SUFFIX)                                                                                \
  static bool block_attend_direct(const float* q, int64_t nq, int64_t D, const T* k, int64_t ks, const T* v,     \
                                  int64_t vs, int64_t n, const int64_t* visible, float* m, float* l, float* acc,  \
                                  float* p, float* alpha) {                                                       \
    if (nq >= 8 || D % 8 != 0) return false;                                                                      \
    switch (D) {                                                                                                  \
      case 32: block_attend_v8_##SUFFIX##32(q, nq, D, k, ks, v, vs, n, visible, m, l, acc, p, alpha, nullptr);   \
        return true;                                                                                              \
      case 64: block_attend_v8_##SUFFIX##64(q, nq, D, k, ks, v, vs, n, visible, m, l, acc, p, alpha, nullptr);   \
        return true;                                                                                              \
      case 128: block_attend_v8_##SUFFIX##128(q, nq, D, k, ks, v, vs, n, visible, m, l, acc, p, alpha, nullptr); \
        return true;                                                                                              \
      default: block_attend_v8_##SUFFIX##0(q, nq, D, k, ks, v, vs, n, visible, m, l, acc, p, alpha, nullptr);    \
        return true;                                                                                              \
    }                                                                                                             \
  }
MMR1_ATTN_DIRECT(c10::BFloat16, bf16_)
MMR1_ATTN_DIRECT(c10::Half, f16_)
#undef MMR1_ATTN_DIRECT
#endif

MMR1_MULTIVERSION void block_attend_generic_f32(const float* q, int64_t nq, int64_t D, const float* k, int64_t ks,
                                                const float* v, int64_t vs, int64_t n, const int64_t* visible,
                                                float* m, float* l, float* acc) {
  block_attend_generic<float>(q, nq, D, k, ks, v, vs, n, visible, m, l, acc);
}

static void block_attend(const float* q, int64_t nq, int64_t D, const float* k, int64_t ks, const float* v,
                         int64_t vs, int64_t n, const int64_t* visible, float* m, float* l, float* acc, float* p,
                         float* alpha, const float* qt) {
#ifdef MMR1_VECTOR_ATTENTION
  switch (D) {
    case 32: return block_attend_v8_f32_32(q, nq, D, k, ks, v, vs, n, visible, m, l, acc, p, alpha, qt);
    case 64: return block_attend_v8_f32_64(q, nq, D, k, ks, v, vs, n, visible, m, l, acc, p, alpha, qt);
    case 128: return block_attend_v8_f32_128(q, nq, D, k, ks, v, vs, n, visible, m, l, acc, p, alpha, qt);
    default:
      if (D % 8 == 0) return block_attend_v8_f32_0(q, nq, D, k, ks, v, vs, n, visible, m, l, acc, p, alpha, qt);
  }
#endif
  (void)p;
  (void)alpha;
  (void)qt;
  block_attend_generic_f32(q, nq, D, k, ks, v, vs, n, visible, m, l, acc);
}

static void block_attend(const double* q, int64_t nq, int64_t D, const double* k, int64_t ks, const double* v,
                         int64_t vs, int64_t n, const int64_t* visible, double* m, double* l, double* acc, double*,
                         double*, const double*) {
  block_attend_generic<double>(q, nq, D, k, ks, v, vs, n, visible, m, l, acc);
}

// Per-worker scratch (allocated once per thread, reused by its tasks): converted key and value blocks (16-bit
// caches), and per kv head g the queries' state q/m/l/acc [g][nq][...]; the queries' limits (the same for every kv
// head) and visibilities.
template <typename A>
struct Scratch {
  std::vector<A> kb, vb, q, qt, m, l, acc, p, alpha;
  std::vector<int64_t> visible, limit;
  explicit Scratch(int64_t D) : kb(kKeyBlock * D), vb(kKeyBlock * D) {}
  void reserve(int64_t Hkv, int64_t nq, int64_t D) {  // room for nq queries per kv head
    const int64_t n = Hkv * nq;
    if (static_cast<int64_t>(m.size()) < n) {
      q.resize(n * D);
      qt.resize(n * D);
      m.resize(n);
      l.resize(n);
      acc.resize(n * D);
    }
    if (static_cast<int64_t>(visible.size()) < nq) {
      p.resize(std::max<int64_t>(nq, 16) * kKeyBlock);  // >= 2 x [32 keys][8 queries] for block_attend_q8
      alpha.resize(nq);
      visible.resize(nq);
      limit.resize(nq);
    }
  }
};

// Key / value rows as fp32 (fp64) pointers: in place for fp32 / fp64 caches, converted block by block otherwise.
template <typename scalar_t, typename A>
struct Rows {
  static const A* get(const scalar_t* base, int64_t stride, int64_t n, int64_t D, std::vector<A>& buf,
                      int64_t* out_stride) {
    for (int64_t j = 0; j < n; ++j) load_row_f32(base + j * stride, buf.data() + j * D, D);
    *out_stride = D;
    return buf.data();
  }
};
template <typename A>
struct Rows<A, A> {
  static const A* get(const A* base, int64_t stride, int64_t, int64_t, std::vector<A>&, int64_t* out_stride) {
    *out_stride = stride;
    return base;
  }
};

// Streams keys [0, nkeys) of one store row (a row's own cache, or a prompt's prefix), every kv head: key j of kv
// head g at base + j * kstride + g * D (D contiguous elements; a key's heads are contiguous, so the task reads
// the row as one stream). The nq queries of each kv head are sc.q[g] with limits sc.limit (how many leading keys
// each sees; the same for every head).
template <typename scalar_t, typename A>
void attend_keys(const scalar_t* kbase, const scalar_t* vbase, int64_t kstride, int64_t hstride, int64_t nkeys,
                 int64_t Hkv, int64_t D, int64_t nq, Scratch<A>& sc) {
  // each full group of 8 queries also transposed to [D][8] (lanes = queries; see block_attend_q8), once per task
  for (int64_t g = 0; g < Hkv; ++g)
    for (int64_t first = 0; first + 8 <= nq; first += 8)
      for (int64_t d = 0; d < D; ++d)
        for (int64_t t = 0; t < 8; ++t)
          sc.qt[(g * nq + first) * D + d * 8 + t] = sc.q[(g * nq + first + t) * D + d];
  for (int64_t kb = 0; kb < nkeys; kb += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, nkeys - kb);
    bool any = false;
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t vis = std::min(std::max(sc.limit[i] - kb, int64_t(0)), n);
      sc.visible[i] = vis;
      any = any || vis > 0;
    }
    if (!any) break;  // limits only shrink the visible range: no later block is seen either
    for (int64_t g = 0; g < Hkv; ++g) {
      // software prefetch of the (block, head) step `dist` steps ahead, ~48 KiB of keys and values: a key's heads
      // span Hkv * D elements, and past 4 KiB (Lumina: 32 x 128 bf16 = 8 KiB) every key of a head is on another
      // page, where the hardware prefetchers stop; a whole next block (512 KiB there) would evict the current one
      // from L2. Measured at Lumina's shapes, bf16, 16 rows x 2200 keys: ~2x the throughput of no prefetch.
      {
        const int64_t step_bytes = 2 * kKeyBlock * D * static_cast<int64_t>(sizeof(scalar_t));
        const int64_t dist = std::max<int64_t>(1, (48 << 10) / step_bytes);
        const int64_t ahead = (kb / kKeyBlock) * Hkv + g + dist;
        const int64_t kb1 = (ahead / Hkv) * kKeyBlock, g1 = ahead % Hkv;
        const int64_t n1 = std::min(kKeyBlock, nkeys - kb1);
        for (int64_t j = 0; j < n1; ++j) {
          const char* kp = reinterpret_cast<const char*>(kbase + (kb1 + j) * kstride + g1 * hstride);
          const char* vp = reinterpret_cast<const char*>(vbase + (kb1 + j) * kstride + g1 * hstride);
          for (int64_t b = 0; b < D * static_cast<int64_t>(sizeof(scalar_t)); b += 64) {
            __builtin_prefetch(kp + b, 0, 2);
            __builtin_prefetch(vp + b, 0, 2);
          }
        }
      }
      const int64_t at = g * nq;
#ifdef MMR1_VECTOR_ATTENTION
      if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
        if (block_attend_direct(sc.q.data() + at * D, nq, D, kbase + kb * kstride + g * hstride, kstride,
                                vbase + kb * kstride + g * hstride, kstride, n, sc.visible.data(), sc.m.data() + at,
                                sc.l.data() + at, sc.acc.data() + at * D, sc.p.data(), sc.alpha.data()))
          continue;
      }
#endif
      int64_t ks = 0, vs = 0;
      const A* k = Rows<scalar_t, A>::get(kbase + kb * kstride + g * hstride, kstride, n, D, sc.kb, &ks);
      const A* v = Rows<scalar_t, A>::get(vbase + kb * kstride + g * hstride, kstride, n, D, sc.vb, &vs);
      block_attend(sc.q.data() + at * D, nq, D, k, ks, v, vs, n, sc.visible.data(), sc.m.data() + at,
                   sc.l.data() + at, sc.acc.data() + at * D, sc.p.data(), sc.alpha.data(), sc.qt.data() + at * D);
    }
  }
}

// Runs task(t, scratch) for t in [0, n) on ATen's threads, handing tasks out one at a time (rows differ in length
// by 10x: a static split would give one thread every long conditional row and the other the short unconditional
// ones); each thread makes its scratch once.
template <typename MakeScratch, typename F>
void dynamic_parallel_for(int64_t n, const MakeScratch& make, const F& task) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto scratch = make();
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) task(t, scratch);
  });
}

void check_store(const at::Tensor& t, const char* name, const at::Tensor& q, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be [rows, slots, kv_heads, head_dim], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ", q.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.size(3) == q.size(3), op, ": ", name, " head_dim ", t.size(3), " != q's ", q.size(3));
  TORCH_CHECK(t.stride(3) == 1, op, ": ", name, " must be contiguous in head_dim");
}

std::vector<int64_t> as_int64(const at::Tensor& t, int64_t n, const char* name, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must be [", n, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, op, ": ", name,
              " must be int64 or int32, got ", t.scalar_type());
  const at::Tensor c = t.to(at::kLong).contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  return std::vector<int64_t>(p, p + n);
}

template <typename scalar_t>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const std::vector<int64_t>& lengths, const at::Tensor* pk, const at::Tensor* pv,
                           const std::vector<int64_t>& plen, const std::vector<int64_t>& prefix_of_row, double scale,
                           at::Tensor& out, at::Tensor& lse) {
  using A = typename AccType<scalar_t>::type;
  const A neg_inf = -std::numeric_limits<A>::infinity();
  const int64_t R = q.size(0), W = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t S = k.size(1), Hkv = k.size(2), rep = H / Hkv;
  const A qscale = static_cast<A>(scale * 1.44269504088896340736);  // log2 domain: exp2 per score
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2), qs3 = q.stride(3);
  const int64_t nq_row = W * rep;  // queries of one row per kv head: (w, hh)
  // the row's queries of kv head g into dst [nq_row][D] (a task's q for head g starts at (g * nq + first) * D)
  auto gather_q = [&](int64_t r, int64_t g, A* dst) {
    for (int64_t w = 0; w < W; ++w)
      for (int64_t hh = 0; hh < rep; ++hh) {
        const scalar_t* src = qp + r * qs0 + w * qs1 + (g * rep + hh) * qs2;
        A* d = dst + (w * rep + hh) * D;
        for (int64_t e = 0; e < D; ++e) d[e] = static_cast<A>(src[e * qs3]) * qscale;
      }
  };
  auto make_scratch = [D] { return Scratch<A>(D); };
  // query (r, w, h) -> ((r * W + w) * H + h): the layout of out / lse and of the prefix phase's states
  std::vector<A> m_s, l_s, acc_s;
  const int64_t P = pk != nullptr ? pk->size(0) : 0;
  std::vector<std::vector<int64_t>> rows_of(P);
  if (P > 0) {
    for (int64_t r = 0; r < R; ++r)
      if (prefix_of_row[r] >= 0 && prefix_of_row[r] < P) rows_of[prefix_of_row[r]].push_back(r);
    m_s.assign(R * W * H, neg_inf);
    l_s.assign(R * W * H, A(0));
    acc_s.assign(R * W * H * D, A(0));
    const int64_t Sp = pk->size(1);
    const scalar_t* pkp = pk->const_data_ptr<scalar_t>();
    const scalar_t* pvp = pv->const_data_ptr<scalar_t>();
    TORCH_CHECK(pv->strides() == pk->strides(), "mmr1::decode_attention: prefix_k and prefix_v must have the same "
                "strides");
    dynamic_parallel_for(P, make_scratch, [&](int64_t p, Scratch<A>& sc) {  // one prompt, all its rows and heads
      const auto& rows = rows_of[p];
      const int64_t nkeys = std::min(std::max(plen[p], int64_t(0)), Sp);
      if (rows.empty() || nkeys == 0) return;
      const int64_t nq = static_cast<int64_t>(rows.size()) * nq_row;
      sc.reserve(Hkv, nq, D);
      for (int64_t g = 0; g < Hkv; ++g)
        for (size_t i = 0; i < rows.size(); ++i) gather_q(rows[i], g, sc.q.data() + (g * nq + i * nq_row) * D);
      std::fill(sc.m.begin(), sc.m.begin() + Hkv * nq, neg_inf);
      std::fill(sc.l.begin(), sc.l.begin() + Hkv * nq, A(0));
      std::fill(sc.acc.begin(), sc.acc.begin() + Hkv * nq * D, A(0));
      std::fill(sc.limit.begin(), sc.limit.begin() + nq, nkeys);
      attend_keys<scalar_t, A>(pkp + p * pk->stride(0), pvp + p * pv->stride(0), pk->stride(1), pk->stride(2),
                               nkeys, Hkv, D, nq, sc);
      for (int64_t g = 0; g < Hkv; ++g)  // scatter the states to the rows' queries
        for (size_t i = 0; i < rows.size(); ++i)
          for (int64_t w = 0; w < W; ++w)
            for (int64_t hh = 0; hh < rep; ++hh) {
              const int64_t src = g * nq + i * nq_row + w * rep + hh;
              const int64_t dst = (rows[i] * W + w) * H + g * rep + hh;
              m_s[dst] = sc.m[src];
              l_s[dst] = sc.l[src];
              std::memcpy(acc_s.data() + dst * D, sc.acc.data() + src * D, static_cast<size_t>(D) * sizeof(A));
            }
    });
  }
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  TORCH_CHECK(v.strides() == k.strides(), "mmr1::decode_attention: k and v must have the same strides");
  scalar_t* op = out.data_ptr<scalar_t>();
  A* lp = lse.data_ptr<A>();
  dynamic_parallel_for(R, make_scratch, [&](int64_t r, Scratch<A>& sc) {  // one row, all heads
    sc.reserve(Hkv, nq_row, D);
    const bool has_prefix = P > 0 && prefix_of_row[r] >= 0 && prefix_of_row[r] < P;
    const int64_t len = std::max(lengths[r], int64_t(0));
    for (int64_t w = 0; w < W; ++w)
      for (int64_t hh = 0; hh < rep; ++hh)
        sc.limit[w * rep + hh] = std::min(len + w + 1, S);  // causal inside the window; never past the cache
    for (int64_t g = 0; g < Hkv; ++g) {
      gather_q(r, g, sc.q.data() + g * nq_row * D);
      for (int64_t w = 0; w < W; ++w)
        for (int64_t hh = 0; hh < rep; ++hh) {
          const int64_t i = g * nq_row + w * rep + hh, src = (r * W + w) * H + g * rep + hh;
          sc.m[i] = has_prefix ? m_s[src] : neg_inf;
          sc.l[i] = has_prefix ? l_s[src] : A(0);
          for (int64_t e = 0; e < D; ++e) sc.acc[i * D + e] = has_prefix ? acc_s[src * D + e] : A(0);
        }
    }
    attend_keys<scalar_t, A>(kp + r * k.stride(0), vp + r * v.stride(0), k.stride(1), k.stride(2),
                             std::min(len + W, S), Hkv, D, nq_row, sc);
    A* row = sc.kb.data();  // D values of scratch, free at this point
    for (int64_t g = 0; g < Hkv; ++g)
      for (int64_t w = 0; w < W; ++w)
        for (int64_t hh = 0; hh < rep; ++hh) {
          const int64_t i = g * nq_row + w * rep + hh, dst = (r * W + w) * H + g * rep + hh;
          // l = 0: no key seen (output 0, lse -inf); a NaN l propagates
          const A inv = sc.l[i] == A(0) ? A(0) : A(1) / sc.l[i];
          for (int64_t e = 0; e < D; ++e) row[e] = sc.acc[i * D + e] * inv;
          lp[dst] = sc.l[i] == A(0) ? neg_inf : (sc.m[i] + std::log2(sc.l[i])) * A(kLn2);
          store_row_f32(row, op + dst * D, D);
        }
  });
}

std::tuple<at::Tensor, at::Tensor> decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                        const at::Tensor& lengths,
                                                        const c10::optional<at::Tensor>& prefix_k,
                                                        const c10::optional<at::Tensor>& prefix_v,
                                                        const c10::optional<at::Tensor>& prefix_lengths,
                                                        const c10::optional<at::Tensor>& prefix_of_row, double scale) {
  const char* op = "mmr1::decode_attention";
  TORCH_CHECK(q.device().is_cpu(), op, ": q must be a CPU tensor");
  TORCH_CHECK(q.dim() == 4, op, ": q must be [rows, window, heads, head_dim], got ", q.sizes());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, op,
              ": q must be float32, bfloat16, float16 or float64, got ", dt);
  check_store(k, "k", q, op);
  check_store(v, "v", q, op);
  const int64_t R = q.size(0), W = q.size(1), H = q.size(2), D = q.size(3);
  TORCH_CHECK(k.size(0) == R && v.sizes() == k.sizes(), op, ": k and v must be [", R, ", S, Hkv, ", D, "], got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(2) > 0 && H % k.size(2) == 0, op, ": heads ", H, " must be a multiple of kv_heads ", k.size(2));
  TORCH_CHECK(std::isfinite(scale), op, ": scale must be finite");
  const std::vector<int64_t> len = as_int64(lengths, R, "lengths", op);
  const bool has_prefix = prefix_k.has_value();
  TORCH_CHECK(has_prefix == prefix_v.has_value() && has_prefix == prefix_lengths.has_value() &&
                  has_prefix == prefix_of_row.has_value(),
              op, ": prefix_k, prefix_v, prefix_lengths and prefix_of_row go together");
  std::vector<int64_t> plen, of_row;
  if (has_prefix) {
    check_store(*prefix_k, "prefix_k", q, op);
    check_store(*prefix_v, "prefix_v", q, op);
    TORCH_CHECK(prefix_v->sizes() == prefix_k->sizes() && prefix_k->size(2) == k.size(2), op,
                ": prefix_k and prefix_v must be [P, Sp, ", k.size(2), ", ", D, "], got ", prefix_k->sizes(), " and ",
                prefix_v->sizes());
    plen = as_int64(*prefix_lengths, prefix_k->size(0), "prefix_lengths", op);
    of_row = as_int64(*prefix_of_row, R, "prefix_of_row", op);
  }
  at::Tensor out = at::empty({R, W, H, D}, q.options());
  at::Tensor lse = at::empty({R, W, H}, q.options().dtype(dt == at::kDouble ? at::kDouble : at::kFloat));
  if (out.numel() == 0) return {out, lse};
  MMR1_DISPATCH_LOGITS(dt, op, [&] {
    decode_attention_impl<scalar_t>(q, k, v, len, has_prefix ? &*prefix_k : nullptr,
                                    has_prefix ? &*prefix_v : nullptr, plen, of_row, scale, out, lse);
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmr1, CPU, m) { m.impl("decode_attention", &decode_attention_cpu); }

}  // namespace mmr1
