// Decode attention over a rollout's KV cache with shared prompt prefixes, on the CPU
// (DESIGN.md "Kernel semantics" 4; the spec is decode_attention in mmr1_kernels/reference.py).
//
// Why a kernel: a GRPO rollout step is bound by the bytes of cache it reads. With one static cache per row and a
// masked SDPA (the previous path), all 2N rows read the longest row's context: the unconditional CFG rows (whose
// context is only the image block being drawn) and G identical copies of every prompt. Profiled on the demo model
// at the GRPO batch (64 cache rows): 58-61% of the rollout's time was that SDPA.
//
// How, in two phases (both parallel over tasks, dynamically scheduled: rows have very different lengths):
//   1. one task per (prompt, kv head): the prompt's prefix keys are read once for every query that sees them --
//      its G rows x W window positions x H/Hkv query heads -- leaving an online-softmax state (m, l, acc) per query;
//   2. one task per (row, kv head): the row's own keys (slots < lengths[r] + w + 1 for window position w), starting
//      from phase 1's state. Continuing an online softmax from a partial state *is* the log-sum-exp merge of the
//      two partial attentions, so no separate merge pass exists. Then out = acc / l, lse = (m + log2 l) ln 2.
// Inner loop, per block of 32 keys: K is converted once to fp32 and transposed to [D][32], so a query's 32 scores
// are D FMAs over 32 key lanes (4 AVX2 / 2 AVX-512 vectors) with no horizontal sums, and every query of the task
// reuses the block from L1; V is converted to fp32 [32][D] and p.V is an axpy over D per key. Scores are kept in
// the log2 domain (q pre-scaled by scale * log2 e) so each exponential is one exp2_nonpos.
#include "common.h"

#include <atomic>

#include <torch/library.h>

namespace mmr1 {

namespace {

constexpr int64_t kKeyBlock = 32;
constexpr double kLn2 = 0.69314718055994530942;

static inline float exp2_le0(float x) { return exp2_nonpos(x); }
static inline double exp2_le0(double x) { return std::exp2(x); }

// One block of n <= kKeyBlock keys for nq queries. q [nq][D] (pre-scaled, log2 domain); kt [D][kKeyBlock] (the
// block's keys transposed; lanes >= n are zero); vb [n][D]; visible[i] in 0..n: the leading keys of the block query
// i sees. Updates each query's running max m, sum l and unnormalized output acc [nq][D].
template <typename A>
static inline __attribute__((always_inline)) void attend_block_body(const A* __restrict q, int64_t nq, int64_t D,
                                                                    const A* __restrict kt, const A* __restrict vb,
                                                                    const int64_t* __restrict visible,
                                                                    A* __restrict m, A* __restrict l,
                                                                    A* __restrict acc) {
  const A neg_inf = -std::numeric_limits<A>::infinity();
  for (int64_t i = 0; i < nq; ++i) {
    const int64_t nn = visible[i];
    if (nn <= 0) continue;
    A s[kKeyBlock];
#pragma omp simd
    for (int64_t j = 0; j < kKeyBlock; ++j) s[j] = 0;
    const A* qi = q + i * D;
    for (int64_t d = 0; d < D; ++d) {
      const A qd = qi[d];
      const A* kd = kt + d * kKeyBlock;
#pragma omp simd
      for (int64_t j = 0; j < kKeyBlock; ++j) s[j] += qd * kd[j];
    }
    A mx = neg_inf;
    for (int64_t j = 0; j < nn; ++j) mx = s[j] > mx ? s[j] : mx;
    const A m_new = m[i] > mx ? m[i] : mx;
    // all scores -inf (or NaN) so far: exponentiate relative to 0, so -inf gives 0 and NaN stays NaN
    const A ref = m_new == neg_inf ? A(0) : m_new;
    const A alpha = exp2_le0(m[i] - ref);  // the old state's weight; m = -inf: tiny, times an all-zero state
    A p[kKeyBlock];
#pragma omp simd
    for (int64_t j = 0; j < kKeyBlock; ++j) p[j] = j < nn ? exp2_le0(s[j] - ref) : A(0);
    A sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < kKeyBlock; ++j) sum += p[j];
    l[i] = l[i] * alpha + sum;
    m[i] = m_new;
    A* ai = acc + i * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) ai[d] *= alpha;
    for (int64_t j = 0; j < nn; ++j) {
      const A pj = p[j];
      const A* vj = vb + j * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ai[d] += pj * vj[d];
    }
  }
}

MMR1_MULTIVERSION void attend_block_f32(const float* q, int64_t nq, int64_t D, const float* kt, const float* vb,
                                        const int64_t* visible, float* m, float* l, float* acc) {
  attend_block_body<float>(q, nq, D, kt, vb, visible, m, l, acc);
}

static void attend_block(const float* q, int64_t nq, int64_t D, const float* kt, const float* vb,
                         const int64_t* visible, float* m, float* l, float* acc) {
  attend_block_f32(q, nq, D, kt, vb, visible, m, l, acc);
}

static void attend_block(const double* q, int64_t nq, int64_t D, const double* kt, const double* vb,
                         const int64_t* visible, double* m, double* l, double* acc) {
  attend_block_body<double>(q, nq, D, kt, vb, visible, m, l, acc);
}

static inline void load_row(const double* src, double* dst, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(double));
}
template <typename T>
static inline void load_row(const T* src, float* dst, int64_t n) {
  load_row_f32(src, dst, n);
}

// Per-task scratch: a transposed key block, a value block, a converted key row, the queries' visibilities.
template <typename A>
struct Scratch {
  std::vector<A> kt, vb, krow;
  std::vector<int64_t> visible;
  Scratch(int64_t D, int64_t nq_max) : kt(D * kKeyBlock), vb(kKeyBlock * D), krow(D), visible(nq_max) {}
};

// Streams keys [0, nkeys) of one (store row, kv head): base points at key 0, key j at base + j * kstride (D
// contiguous elements). limit[i]: how many leading keys query i sees (clamped to nkeys by the caller).
template <typename scalar_t, typename A>
void attend_keys(const scalar_t* kbase, const scalar_t* vbase, int64_t kstride, int64_t nkeys, int64_t D, const A* q,
                 int64_t nq, const int64_t* limit, A* m, A* l, A* acc, Scratch<A>& sc) {
  for (int64_t kb = 0; kb < nkeys; kb += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, nkeys - kb);
    bool any = false;
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t vis = std::min(std::max(limit[i] - kb, int64_t(0)), n);
      sc.visible[i] = vis;
      any = any || vis > 0;
    }
    if (!any) break;  // limits only shrink the visible range: no later block is seen either
    for (int64_t j = 0; j < n; ++j) {
      load_row(kbase + (kb + j) * kstride, sc.krow.data(), D);
      for (int64_t d = 0; d < D; ++d) sc.kt[d * kKeyBlock + j] = sc.krow[d];
      load_row(vbase + (kb + j) * kstride, sc.vb.data() + j * D, D);
    }
    for (int64_t j = n; j < kKeyBlock; ++j)
      for (int64_t d = 0; d < D; ++d) sc.kt[d * kKeyBlock + j] = 0;
    attend_block(q, nq, D, sc.kt.data(), sc.vb.data(), sc.visible.data(), m, l, acc);
  }
}

// Runs task(t) for t in [0, n) on ATen's threads, handing tasks out one at a time (rows differ in length by 10x:
// a static split would give one thread every long conditional row and the other the short unconditional ones).
template <typename F>
void dynamic_parallel_for(int64_t n, const F& task) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t t = next.fetch_add(1); t < n; t = next.fetch_add(1)) task(t);
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
  const int64_t R = q.size(0), W = q.size(1), H = q.size(2), D = q.size(3);
  const int64_t S = k.size(1), Hkv = k.size(2), rep = H / Hkv;
  const A qscale = static_cast<A>(scale * 1.44269504088896340736);  // log2 domain: exp2 per score
  const scalar_t* qp = q.const_data_ptr<scalar_t>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2), qs3 = q.stride(3);
  auto gather_q = [&](int64_t r, int64_t g, A* dst) {  // the W x rep queries of (row r, kv head g), [W*rep][D]
    for (int64_t w = 0; w < W; ++w)
      for (int64_t hh = 0; hh < rep; ++hh) {
        const scalar_t* src = qp + r * qs0 + w * qs1 + (g * rep + hh) * qs2;
        A* d = dst + (w * rep + hh) * D;
        for (int64_t e = 0; e < D; ++e) d[e] = static_cast<A>(src[e * qs3]) * qscale;
      }
  };
  const int64_t nq_row = W * rep;
  // queries are indexed (r, w, h) -> ((r * W + w) * H + h), the layout of out / lse
  std::vector<A> m_s, l_s, acc_s;
  const int64_t P = pk != nullptr ? pk->size(0) : 0;
  std::vector<std::vector<int64_t>> rows_of(P);
  if (P > 0) {
    for (int64_t r = 0; r < R; ++r)
      if (prefix_of_row[r] >= 0 && prefix_of_row[r] < P) rows_of[prefix_of_row[r]].push_back(r);
    m_s.assign(R * W * H, -std::numeric_limits<A>::infinity());
    l_s.assign(R * W * H, A(0));
    acc_s.assign(R * W * H * D, A(0));
    const int64_t Sp = pk->size(1);
    const scalar_t* pkp = pk->const_data_ptr<scalar_t>();
    const scalar_t* pvp = pv->const_data_ptr<scalar_t>();
    const int64_t ks0 = pk->stride(0), ks1 = pk->stride(1), ks2 = pk->stride(2);
    const int64_t vs0 = pv->stride(0), vs2 = pv->stride(2);
    TORCH_CHECK(pv->stride(1) == ks1, "mmr1::decode_attention: prefix_k and prefix_v must have the same strides");
    dynamic_parallel_for(P * Hkv, [&](int64_t t) {
      const int64_t p = t / Hkv, g = t % Hkv;
      const auto& rows = rows_of[p];
      const int64_t nkeys = std::min(std::max(plen[p], int64_t(0)), Sp);
      if (rows.empty() || nkeys == 0) return;
      const int64_t nq = static_cast<int64_t>(rows.size()) * nq_row;
      std::vector<A> qbuf(nq * D), m(nq, -std::numeric_limits<A>::infinity()), l(nq, A(0)), acc(nq * D, A(0));
      std::vector<int64_t> limit(nq, nkeys);
      for (size_t i = 0; i < rows.size(); ++i) gather_q(rows[i], g, qbuf.data() + i * nq_row * D);
      Scratch<A> sc(D, nq);
      attend_keys<scalar_t, A>(pkp + p * ks0 + g * ks2, pvp + p * vs0 + g * vs2, ks1, nkeys, D, qbuf.data(), nq,
                               limit.data(), m.data(), l.data(), acc.data(), sc);
      for (size_t i = 0; i < rows.size(); ++i)  // scatter the state to the rows' queries
        for (int64_t w = 0; w < W; ++w)
          for (int64_t hh = 0; hh < rep; ++hh) {
            const int64_t src = i * nq_row + w * rep + hh;
            const int64_t dst = (rows[i] * W + w) * H + g * rep + hh;
            m_s[dst] = m[src];
            l_s[dst] = l[src];
            std::memcpy(acc_s.data() + dst * D, acc.data() + src * D, static_cast<size_t>(D) * sizeof(A));
          }
    });
  }
  const scalar_t* kp = k.const_data_ptr<scalar_t>();
  const scalar_t* vp = v.const_data_ptr<scalar_t>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs2 = v.stride(2);
  TORCH_CHECK(v.stride(1) == ks1, "mmr1::decode_attention: k and v must have the same strides");
  scalar_t* op = out.data_ptr<scalar_t>();
  A* lp = lse.data_ptr<A>();
  dynamic_parallel_for(R * Hkv, [&](int64_t t) {
    const int64_t r = t / Hkv, g = t % Hkv;
    std::vector<A> qbuf(nq_row * D), m(nq_row), l(nq_row), acc(nq_row * D);
    std::vector<int64_t> limit(nq_row);
    gather_q(r, g, qbuf.data());
    const bool has_prefix = P > 0 && prefix_of_row[r] >= 0 && prefix_of_row[r] < P;
    const int64_t len = std::max(lengths[r], int64_t(0));
    for (int64_t w = 0; w < W; ++w)
      for (int64_t hh = 0; hh < rep; ++hh) {
        const int64_t i = w * rep + hh, src = (r * W + w) * H + g * rep + hh;
        limit[i] = std::min(len + w + 1, S);  // causal inside the window; never past the cache
        m[i] = has_prefix ? m_s[src] : -std::numeric_limits<A>::infinity();
        l[i] = has_prefix ? l_s[src] : A(0);
        for (int64_t e = 0; e < D; ++e) acc[i * D + e] = has_prefix ? acc_s[src * D + e] : A(0);
      }
    Scratch<A> sc(D, nq_row);
    attend_keys<scalar_t, A>(kp + r * ks0 + g * ks2, vp + r * vs0 + g * vs2, ks1, std::min(len + W, S), D, qbuf.data(),
                             nq_row, limit.data(), m.data(), l.data(), acc.data(), sc);
    std::vector<A> row(D);
    for (int64_t w = 0; w < W; ++w)
      for (int64_t hh = 0; hh < rep; ++hh) {
        const int64_t i = w * rep + hh, dst = (r * W + w) * H + g * rep + hh;
        // l = 0: no key seen (output 0, lse -inf); a NaN l propagates
        const A inv = l[i] == A(0) ? A(0) : A(1) / l[i];
        for (int64_t e = 0; e < D; ++e) row[e] = acc[i * D + e] * inv;
        lp[dst] = l[i] == A(0) ? -std::numeric_limits<A>::infinity() : (m[i] + std::log2(l[i])) * A(kLn2);
        store_row_f32(row.data(), op + dst * D, D);
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
