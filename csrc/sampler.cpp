// Fused classifier-free-guided sampler for KV-cached decoding, CPU.
//
// Spec: docs/kernel-semantics.md, section 1;, reference in
// mmr1_kernels/reference_sampler.py. One row at a time (rows in parallel):
//   1. z = (u + s (c - u)) / T over the vocab window, read once in the input
//      dtype (both branches converted to fp32 scratch), with its max and a NaN
//      count in the same pass
//   2. top-k threshold: the exact k-th largest z by bisection on the
//      order-preserving uint32 key of the floats (each step one vectorized
//      count pass over the L1/L2-resident row; stops as soon as the count is
//      exactly k, otherwise <= 32 steps) -- no sort, no heap
//   3. q = exp(z - max) on the kept set, and top-p by the same bisection on the
//      kept mass
//   4. exponential race argmax_j q_j / E_j, E_j = -log U_j (Gumbel-max), U_j
//      from Philox4x32-10 keyed by (seed, row_id, offset, j), 4 ids per call
// All math in fp32. The output token is always inside the window (or the
// forced id); a NaN row or an empty kept set sets status != 0 and returns the
// window start, never an out-of-bounds id.
#include "common.h"

#include <torch/library.h>

namespace mmr1 {

namespace {

constexpr int32_t kOk = 0, kNan = 1, kEmpty = 2;
constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u, kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;

struct Philox {
  uint32_t c0, c1, c2, c3;
};

static inline Philox philox4x32_10(Philox c, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    const uint64_t pb = static_cast<uint64_t>(kRoundB) * c.c2;
    const uint64_t pa = static_cast<uint64_t>(kRoundA) * c.c0;
    c = {static_cast<uint32_t>(pb >> 32) ^ c.c1 ^ k0, static_cast<uint32_t>(pb),
         static_cast<uint32_t>(pa >> 32) ^ c.c3 ^ k1, static_cast<uint32_t>(pa)};
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return c;
}

// Uniform in (0, 1): 24 random bits, centred, so never 0 or 1.
static inline float to_uniform(uint32_t x) { return (static_cast<float>(x >> 8) + 0.5f) * 5.9604644775390625e-8f; }

// ln(x) for normal positive x, vectorizable (Cephes logf polynomial, ~1 ulp).
static inline float log_approx(float x) {
  const uint32_t b = __builtin_bit_cast(uint32_t, x);
  float e = static_cast<float>(static_cast<int32_t>((b >> 23) & 0xFF) - 127);
  float m = __builtin_bit_cast(float, (b & 0x007FFFFFu) | 0x3F800000u);  // [1, 2)
  const bool big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1.0f : e;
  const float f = m - 1.0f, z = f * f;
  float y = 7.0376836292e-2f;
  y = std::fma(y, f, -1.1514610310e-1f);
  y = std::fma(y, f, 1.1676998740e-1f);
  y = std::fma(y, f, -1.2420140846e-1f);
  y = std::fma(y, f, 1.4249322787e-1f);
  y = std::fma(y, f, -1.6668057665e-1f);
  y = std::fma(y, f, 2.0000714765e-1f);
  y = std::fma(y, f, -2.4999993993e-1f);
  y = std::fma(y, f, 3.3333331174e-1f);
  y = y * f * z;
  y = std::fma(e, -2.12194440e-4f, y);
  y = std::fma(-0.5f, z, y);
  return f + y + e * 0.693359375f;
}

// Order-preserving map float -> uint32 (for non-NaN floats) and back.
static inline uint32_t fkey(float x) {
  const uint32_t b = __builtin_bit_cast(uint32_t, x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
static inline float unkey(uint32_t k) { return __builtin_bit_cast(float, (k & 0x80000000u) ? (k & 0x7FFFFFFFu) : ~k); }

MMR1_MULTIVERSION int64_t count_ge(const float* __restrict z, int64_t n, float t) {
  int64_t c = 0;
#pragma omp simd reduction(+ : c)
  for (int64_t i = 0; i < n; ++i) c += z[i] >= t;
  return c;
}

MMR1_MULTIVERSION float mass_ge(const float* __restrict z, const float* __restrict q, int64_t n, float t) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += z[i] >= t ? q[i] : 0.0f;
  return s;
}

MMR1_MULTIVERSION float min_ge(const float* __restrict z, int64_t n, float t) {
  float m = std::numeric_limits<float>::infinity();
#pragma omp simd reduction(min : m)
  for (int64_t i = 0; i < n; ++i) m = (z[i] >= t && z[i] < m) ? z[i] : m;
  return m;
}

// The k-th largest value of z (1 <= k <= n), exactly.
float kth_largest(const float* z, int64_t n, int64_t k, float max_z) {
  uint32_t lo = fkey(-std::numeric_limits<float>::infinity()), hi = fkey(max_z) + 1;  // count(>=lo) = n >= k > count(>=hi)
  while (hi - lo > 1) {
    const uint32_t mid = lo + (hi - lo) / 2;
    const int64_t c = count_ge(z, n, unkey(mid));
    if (c == k) return min_ge(z, n, unkey(mid));  // exactly k values >= mid: the smallest of them
    if (c > k) lo = mid; else hi = mid;
  }
  return unkey(lo);
}

// The largest kept value v with mass(z >= v) >= target (top-p threshold, ties kept).
float top_p_threshold(const float* z, const float* q, int64_t n, float target, float floor_value, float max_z) {
  uint32_t lo = fkey(floor_value), hi = fkey(max_z) + 1;
  while (hi - lo > 1) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (mass_ge(z, q, n, unkey(mid)) >= target) lo = mid; else hi = mid;
  }
  return unkey(lo);
}

// Pass 1: z = (u + s (c - u)) * inv_t (z = c * inv_t without uncond); returns (max, #NaN).
MMR1_MULTIVERSION void guide_row(const float* __restrict c, const float* __restrict u, int64_t n, float s, float inv_t,
                                 float* __restrict z, float* max_out, int64_t* nan_out) {
  float m = -std::numeric_limits<float>::infinity();
  int64_t bad = 0;
  if (u != nullptr) {
#pragma omp simd reduction(max : m) reduction(+ : bad)
    for (int64_t i = 0; i < n; ++i) {
      const float v = std::fma(s, c[i] - u[i], u[i]) * inv_t;
      z[i] = v;
      m = v > m ? v : m;
      bad += v != v;
    }
  } else {
#pragma omp simd reduction(max : m) reduction(+ : bad)
    for (int64_t i = 0; i < n; ++i) {
      const float v = c[i] * inv_t;
      z[i] = v;
      m = v > m ? v : m;
      bad += v != v;
    }
  }
  *max_out = m;
  *nan_out = bad;
}

// q = exp(z - m) where z >= thr (and finite), else 0; returns sum q.
MMR1_MULTIVERSION float kept_exp(const float* __restrict z, int64_t n, float m, float thr, float* __restrict q) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const float v = (z[i] >= thr && z[i] > -std::numeric_limits<float>::infinity())
                        ? exp2_nonpos((z[i] - m) * kLog2e) : 0.0f;
    q[i] = v;
    s += v;
  }
  return s;
}

// Branch-free compaction of the kept entries (q > 0) into zk/qk; returns their count.
int64_t compact_kept(const float* __restrict z, const float* __restrict q, int64_t n, float* __restrict zk,
                     float* __restrict qk) {
  int64_t m = 0;
  for (int64_t i = 0; i < n; ++i) {
    zk[m] = z[i];
    qk[m] = q[i];
    m += q[i] > 0.0f;
  }
  return m;
}

MMR1_MULTIVERSION float drop_below(const float* __restrict z, int64_t n, float thr, float* __restrict q) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    q[i] = z[i] >= thr ? q[i] : 0.0f;
    s += q[i];
  }
  return s;
}

// U for the ids 4*g_begin .. 4*g_end-1: one Philox call serves the 4 ids of a group j >> 2.
MMR1_MULTIVERSION void philox_uniforms(int64_t g_begin, int64_t g_end, uint32_t row, uint64_t seed, uint64_t offset,
                                       float* __restrict u4) {
  const uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  const uint32_t c2 = static_cast<uint32_t>(offset), c3 = static_cast<uint32_t>(offset >> 32);
#pragma omp simd
  for (int64_t g = g_begin; g < g_end; ++g) {
    const Philox r = philox4x32_10({static_cast<uint32_t>(g), row, c2, c3}, k0, k1);
    float* o = u4 + 4 * (g - g_begin);
    o[0] = to_uniform(r.c0);
    o[1] = to_uniform(r.c1);
    o[2] = to_uniform(r.c2);
    o[3] = to_uniform(r.c3);
  }
}

// race[i] = q[i] / E_i with E_i = -log U_i (exponential race == Gumbel-max); -1 where q == 0.
MMR1_MULTIVERSION void race_keys(const float* __restrict q, const float* __restrict u, int64_t n, float* __restrict race) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) race[i] = q[i] > 0.0f ? q[i] / -log_approx(u[i]) : -1.0f;
}

// First index of the maximum (the lowest id wins ties).
int64_t argmax_first(const float* z, int64_t n) {
  const float m = row_max_f32(z, n);
  for (int64_t i = 0; i < n; ++i)
    if (z[i] == m) return i;
  return 0;
}

// log_softmax(c * inv_t over the window)[t]
float window_log_softmax_at(const float* c, int64_t n, float inv_t, int64_t t) {
  const float m = row_max_f32(c, n);
  return (c[t] - m) * inv_t - std::log(row_sum_exp_f32(c, n, m, inv_t));
}

struct RowOut {
  int64_t token;
  float logp, cond_logp;
  int32_t status;
};

struct RowScratch {
  std::vector<float> c, u, z, q, u4, c2;
  explicit RowScratch(int64_t n) : c(n), u(n), z(n), q(n), u4(n + 8), c2(n) {}
};

template <typename scalar_t>
RowOut sample_row(const scalar_t* crow, const scalar_t* urow, int64_t lo, int64_t W, float cfg, float temp,
                  int64_t top_k, float top_p, uint32_t row_id, uint64_t seed, uint64_t offset, bool want_cond,
                  RowScratch& s) {
  RowOut out{lo, 0.0f, 0.0f, kOk};
  load_row_f32(crow, s.c.data(), W);
  if (urow != nullptr) load_row_f32(urow, s.u.data(), W);
  const bool greedy = temp == 0.0f;
  const float inv_t = greedy ? 1.0f : 1.0f / temp;
  float m;
  int64_t bad;
  guide_row(s.c.data(), urow ? s.u.data() : nullptr, W, cfg, inv_t, s.z.data(), &m, &bad);
  if (bad > 0) return {lo, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::quiet_NaN(), kNan};
  int64_t idx;
  if (greedy) {
    idx = argmax_first(s.z.data(), W);
  } else {
    const float thr = (top_k > 0 && top_k < W) ? kth_largest(s.z.data(), W, top_k, m)
                                               : -std::numeric_limits<float>::infinity();
    float total = kept_exp(s.z.data(), W, m, thr, s.q.data());
    if (top_p < 1.0f && total > 0.0f) {
      // the ~32 mass passes of the bisection run over the kept entries only (top-k 2000 of 8192: 4x fewer)
      const int64_t nk = compact_kept(s.z.data(), s.q.data(), W, s.c2.data(), s.u4.data());
      const float thr_p = top_p_threshold(s.c2.data(), s.u4.data(), nk, top_p * total, thr, m);
      total = drop_below(s.z.data(), W, thr_p, s.q.data());
    }
    if (!(total > 0.0f))
      return {lo, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::quiet_NaN(), kEmpty};
    const int64_t g_begin = lo >> 2, g_end = (lo + W + 3) >> 2;
    philox_uniforms(g_begin, g_end, row_id, seed, offset, s.u4.data());
    race_keys(s.q.data(), s.u4.data() + (lo & 3), W, s.u.data());  // u scratch reused for the race keys
    idx = argmax_first(s.u.data(), W);
    out.logp = (s.z[idx] - m) - std::log(total);
  }
  out.token = lo + idx;
  if (want_cond) out.cond_logp = window_log_softmax_at(s.c.data(), W, inv_t, idx);
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cfg_sample_cpu(
    const at::Tensor& cond, const c10::optional<at::Tensor>& uncond, const at::Tensor& cfg_scale,
    const at::Tensor& temperature, const at::Tensor& top_k, const at::Tensor& top_p,
    const c10::optional<at::Tensor>& forced, const at::Tensor& seed, const at::Tensor& offset,
    const at::Tensor& row_ids, int64_t lo, int64_t hi, bool return_cond_logprobs) {
  const char* op = "mmr1::cfg_sample";
  TORCH_CHECK(cond.device().is_cpu() && cond.dim() == 2, op, ": cond must be a CPU [B, V] tensor, got ", cond.sizes());
  TORCH_CHECK(cond.size(-1) == 0 || cond.stride(-1) == 1, op, ": cond must have unit stride on the vocab dim");
  const int64_t B = cond.size(0), V = cond.size(1);
  TORCH_CHECK(0 <= lo && lo < hi && hi <= V, op, ": vocab window [", lo, ", ", hi, ") must satisfy 0 <= lo < hi <= V=", V);
  if (uncond.has_value()) {
    TORCH_CHECK(uncond->sizes() == cond.sizes() && uncond->scalar_type() == cond.scalar_type(), op,
                ": uncond must match cond's shape and dtype");
    TORCH_CHECK(uncond->size(-1) == 0 || uncond->stride(-1) == 1, op, ": uncond must have unit stride on the vocab dim");
  }
  check_vector(cfg_scale, B, at::kFloat, "cfg_scale", op);
  check_vector(temperature, B, at::kFloat, "temperature", op);
  check_vector(top_k, B, at::kLong, "top_k", op);
  check_vector(top_p, B, at::kFloat, "top_p", op);
  check_vector(row_ids, B, at::kLong, "row_ids", op);
  if (forced.has_value()) check_vector(*forced, B, at::kLong, "forced", op);
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, op, ": seed must be a 0-dim int64 tensor");
  // one offset for the batch, or one per row (a Jacobi window: each position keeps its sequential offset)
  TORCH_CHECK((offset.numel() == 1 || (offset.dim() == 1 && offset.numel() == B && offset.is_contiguous())) &&
                  offset.scalar_type() == at::kLong && offset.device().is_cpu(),
              op, ": offset must be a 0-dim or contiguous [B] int64 CPU tensor, got ", offset.sizes());

  auto f32 = cond.options().dtype(at::kFloat);
  at::Tensor tokens = at::empty({B}, cond.options().dtype(at::kLong)), logp = at::empty({B}, f32),
             cond_lp = at::empty({return_cond_logprobs ? B : 0}, f32),
             status = at::empty({B}, cond.options().dtype(at::kInt));
  const uint64_t sd = static_cast<uint64_t>(seed.item<int64_t>());
  const int64_t* ofs = offset.const_data_ptr<int64_t>();
  const int64_t of_stride = offset.numel() == 1 ? 0 : 1;
  const float *cs = cfg_scale.const_data_ptr<float>(), *ts = temperature.const_data_ptr<float>(),
              *ps = top_p.const_data_ptr<float>();
  const int64_t *ks = top_k.const_data_ptr<int64_t>(), *rid = row_ids.const_data_ptr<int64_t>(),
                *fz = forced.has_value() ? forced->const_data_ptr<int64_t>() : nullptr;
  int64_t* tok = tokens.data_ptr<int64_t>();
  float *lp = logp.data_ptr<float>(), *clp = return_cond_logprobs ? cond_lp.data_ptr<float>() : nullptr;
  int32_t* st = status.data_ptr<int32_t>();
  const int64_t W = hi - lo;
  TORCH_CHECK(cond.scalar_type() != at::kDouble, op, ": cond must be float32, bfloat16 or float16");
  MMR1_DISPATCH_LOGITS(cond.scalar_type(), op, [&] {
    {
      const scalar_t* cb = cond.const_data_ptr<scalar_t>();
      const scalar_t* ub = uncond.has_value() ? uncond->const_data_ptr<scalar_t>() : nullptr;
      const int64_t cstride = cond.stride(0), ustride = uncond.has_value() ? uncond->stride(0) : 0;
      at::parallel_for(0, B, 1, [&](int64_t b, int64_t e) {
        RowScratch scratch(W);
        for (int64_t r = b; r < e; ++r) {
          if (fz != nullptr && fz[r] >= 0) {  // structure token: no logits read at all
            tok[r] = fz[r];
            lp[r] = 0.0f;
            if (clp) clp[r] = 0.0f;
            st[r] = kOk;
            continue;
          }
          const RowOut o = sample_row<scalar_t>(cb + r * cstride + lo, ub ? ub + r * ustride + lo : nullptr, lo, W,
                                                cs[r], ts[r], ks[r], ps[r], static_cast<uint32_t>(rid[r]), sd,
                                                static_cast<uint64_t>(ofs[r * of_stride]),
                                                clp != nullptr, scratch);
          tok[r] = o.token;
          lp[r] = o.logp;
          if (clp) clp[r] = o.cond_logp;
          st[r] = o.status;
        }
      });
    }
  });
  return {tokens, logp, cond_lp, status};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmr1, CPU, m) { m.impl("cfg_sample", &cfg_sample_cpu); }

}  // namespace mmr1
