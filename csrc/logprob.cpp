// Fused token log-prob / GRPO ratio / k3-KL kernels for the CPU.
//
// Semantics: docs/kernel-semantics.md, sections 2-3, and the reference in
// mmr1_kernels/reference.py. Per token row (a window [lo, hi) of the vocab):
//   pass 1: max of the window (reads the row from DRAM once)
//   pass 2: sum of exp((z - max)/T) (the window is now in L1/L2: 8192 fp32
//           logits are 32 KiB, a full 65536 row 256 KiB)
// and then O(1) scalar math for the loss. The backward recomputes
// softmax(z/T) from the saved fp32 logsumexp and writes dz in the logits dtype,
// optionally into the logits' own storage (no second [N, V] buffer).
#include "common.h"

#include <torch/library.h>

#ifdef __linux__
#include <sys/mman.h>
#endif


namespace mmr1 {

namespace {

constexpr int64_t kRowGrain = 8;  // rows per parallel task: ~256 KiB of fp32 logits at V=8192

template <typename acc_t>
struct GrpoParams {
  acc_t eps_low, eps_high, beta;
};

template <typename acc_t>
struct TokenGrpo {
  acc_t loss, coef, ratio, kl;
};

// Per-token clipped surrogate + k3 KL and d(loss)/d(logp). Log-ratio and the KL
// exponent are clamped to +-20 (exp(20) = 4.9e8) so one stale old log-prob
// cannot overflow the loss; the clamp's gradient is 0 outside the range.
template <typename acc_t>
static inline TokenGrpo<acc_t> grpo_token(acc_t logp, acc_t old, acc_t ref, acc_t adv, const GrpoParams<acc_t>& p) {
  const acc_t lim = 20, one = 1;
  TokenGrpo<acc_t> out;
  const acc_t log_ratio = logp - old;
  const bool lr_clamped = log_ratio > lim || log_ratio < -lim;
  const acc_t ratio = std::exp(std::min(std::max(log_ratio, -lim), lim));
  const acc_t unclipped = ratio * adv;
  const acc_t clipped = std::min(std::max(ratio, one - p.eps_low), one + p.eps_high) * adv;
  // -min(unclipped, clipped): the gradient flows only when the unclipped term is the min.
  out.loss = -std::min(unclipped, clipped);
  out.coef = (unclipped <= clipped && !lr_clamped) ? -adv * ratio : acc_t(0);
  out.ratio = ratio;
  out.kl = 0;
  if (p.beta != 0) {
    const acc_t delta_raw = ref - logp;
    const bool d_clamped = delta_raw > lim || delta_raw < -lim;
    const acc_t delta = std::min(std::max(delta_raw, -lim), lim);
    const acc_t e = std::exp(delta);
    out.kl = e - delta - one;
    out.loss += p.beta * out.kl;
    if (!d_clamped) out.coef += p.beta * (one - e);
  }
  return out;
}

template <typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
void logprob_rows(const at::Tensor& logits, const int64_t* targets, const bool* mask, acc_t inv_t, int64_t lo,
                  int64_t hi, acc_t* logp_out, acc_t* lse_out, int64_t begin, int64_t end, acc_t* ent_out = nullptr) {
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  const RowIndexer idx = make_row_indexer(logits);
  const int64_t W = hi - lo;
  RowReader<scalar_t> reader(W);
  for (int64_t n = begin; n < end; ++n) {
    if (mask != nullptr && !mask[n]) {
      logp_out[n] = 0;
      lse_out[n] = 0;
      if (ent_out != nullptr) ent_out[n] = 0;
      continue;
    }
    const acc_t* z = reader.read(base + idx.offset(n) + lo, W);
    const acc_t m = row_max(z, W);
    const bool all_neg_inf = m == -std::numeric_limits<acc_t>::infinity();
    acc_t lse;
    if (ent_out == nullptr) {
      // all -inf window: logsumexp is -inf (z - max would be -inf - -inf = NaN)
      lse = all_neg_inf ? m : m * inv_t + std::log(row_sum_exp(z, W, m, inv_t));
    } else {
      // entropy in the same pass: H = log s - t / s with s = sum e^x, t = sum e^x x, x = (z - m) / T
      // (shifted by the max, so no cancellation against a large lse); an all -inf window has no distribution: NaN
      acc_t t = 0;
      const acc_t s = all_neg_inf ? acc_t(1) : row_sum_exp_ent(z, W, m, inv_t, &t);
      lse = all_neg_inf ? m : m * inv_t + std::log(s);
      ent_out[n] = all_neg_inf ? std::numeric_limits<acc_t>::quiet_NaN() : std::log(s) - t / s;
    }
    const int64_t t = targets[n] - lo;
    // A target outside the window is rejected by the Python wrapper in checked
    // mode; here it must still never be read out of bounds, so it gives NaN.
    lse_out[n] = lse;
    logp_out[n] = (t >= 0 && t < W) ? z[t] * inv_t - lse : std::numeric_limits<acc_t>::quiet_NaN();
  }
}

void check_common(const at::Tensor& logits, const at::Tensor& targets, const c10::optional<at::Tensor>& mask,
                  double temperature, int64_t lo, int64_t hi, const char* op) {
  check_logits(logits, op);
  const int64_t N = num_rows(logits);
  check_vector(targets, N, at::kLong, "targets", op);
  if (mask.has_value()) check_vector(*mask, N, at::kBool, "mask", op);
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be finite and > 0, got ",
              temperature);
  const int64_t V = logits.size(-1);
  TORCH_CHECK(0 <= lo && lo < hi && hi <= V, op, ": vocab window [", lo, ", ", hi, ") must satisfy 0 <= lo < hi <= V=", V);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> token_logprobs_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                                                  const c10::optional<at::Tensor>& mask,
                                                                  double temperature, int64_t lo, int64_t hi,
                                                                  bool with_entropy) {
  check_common(logits, targets, mask, temperature, lo, hi, "mmr1::token_logprobs");
  const int64_t N = num_rows(logits);
  auto opts = logits.options().dtype(acc_dtype(logits));
  at::Tensor logp = at::empty({N}, opts), lse = at::empty({N}, opts), ent = at::empty({with_entropy ? N : 0}, opts);
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  const bool* mk = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
  MMR1_DISPATCH_LOGITS(logits.scalar_type(), "mmr1::token_logprobs", [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    at::parallel_for(0, N, kRowGrain, [&](int64_t b, int64_t e) {
      logprob_rows<scalar_t>(logits, tgt, mk, inv_t, lo, hi, logp.data_ptr<acc_t>(), lse.data_ptr<acc_t>(), b, e,
                             with_entropy ? ent.data_ptr<acc_t>() : nullptr);
    });
  });
  return {logp, lse, ent};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grpo_token_loss_cpu(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& advantages,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& old_logprobs,
    const c10::optional<at::Tensor>& ref_logprobs, double temperature, int64_t lo, int64_t hi, double eps_low,
    double eps_high, double beta, bool /*inplace_backward: used by the autograd formula only*/) {
  const char* op = "mmr1::grpo_token_loss";
  check_common(logits, targets, mask, temperature, lo, hi, op);
  const int64_t N = num_rows(logits);
  const at::ScalarType acc = acc_dtype(logits);
  check_vector(advantages, N, acc, "advantages", op);
  if (old_logprobs.has_value()) check_vector(*old_logprobs, N, acc, "old_logprobs", op);
  if (ref_logprobs.has_value()) check_vector(*ref_logprobs, N, acc, "ref_logprobs", op);
  TORCH_CHECK(beta == 0.0 || ref_logprobs.has_value(), op, ": ref_logprobs is required when beta != 0");

  auto opts = logits.options().dtype(acc);
  at::Tensor logp = at::empty({N}, opts), lse = at::empty({N}, opts), loss = at::empty({N}, opts),
             coef = at::empty({N}, opts), ratio = at::empty({N}, opts), kl = at::empty({N}, opts);
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  const bool* mk = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
  MMR1_DISPATCH_LOGITS(logits.scalar_type(), op, [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    const acc_t* adv = advantages.const_data_ptr<acc_t>();
    const acc_t* old = old_logprobs.has_value() ? old_logprobs->const_data_ptr<acc_t>() : nullptr;
    const acc_t* ref = ref_logprobs.has_value() ? ref_logprobs->const_data_ptr<acc_t>() : nullptr;
    const GrpoParams<acc_t> p{static_cast<acc_t>(eps_low), static_cast<acc_t>(eps_high), static_cast<acc_t>(beta)};
    acc_t *lp = logp.data_ptr<acc_t>(), *lo_ = loss.data_ptr<acc_t>(), *co = coef.data_ptr<acc_t>(),
          *ra = ratio.data_ptr<acc_t>(), *kl_ = kl.data_ptr<acc_t>();
    at::parallel_for(0, N, kRowGrain, [&](int64_t b, int64_t e) {
      logprob_rows<scalar_t>(logits, tgt, mk, inv_t, lo, hi, lp, lse.data_ptr<acc_t>(), b, e);
      for (int64_t n = b; n < e; ++n) {
        if (mk != nullptr && !mk[n]) {
          lo_[n] = 0;
          co[n] = 0;
          ra[n] = 1;
          kl_[n] = 0;
          continue;
        }
        // old = logp.detach() when no old log-probs are given: ratio 1, gradient -A.
        const TokenGrpo<acc_t> g = grpo_token<acc_t>(lp[n], old ? old[n] : lp[n], ref ? ref[n] : acc_t(0), adv[n], p);
        lo_[n] = g.loss;
        co[n] = g.coef;
        ra[n] = g.ratio;
        kl_[n] = g.kl;
      }
    });
  });
  return {logp, lse, loss, coef, ratio, kl};
}

// dz = g/T * (onehot(y) - softmax(z/T)) on the window, 0 outside. `out` may be
// the logits themselves (in-place backward): every element is read before the
// same element is written, and bf16/fp16 rows are first copied to fp32 scratch.
template <typename scalar_t, typename acc_t = typename AccType<scalar_t>::type>
void backward_rows(const at::Tensor& logits, const int64_t* targets, const acc_t* lse, const acc_t* grad,
                   acc_t inv_t, int64_t lo, int64_t hi, const at::Tensor& out, bool out_zeroed, int64_t begin,
                   int64_t end, const acc_t* ent = nullptr, const acc_t* grad_ent = nullptr) {
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  scalar_t* obase = static_cast<scalar_t*>(out.data_ptr());
  const RowIndexer idx = make_row_indexer(logits), oidx = make_row_indexer(out);
  const int64_t V = logits.size(-1), W = hi - lo;
  RowReader<scalar_t> reader(W);
  std::vector<acc_t> dz(static_cast<size_t>(W));
  for (int64_t n = begin; n < end; ++n) {
    scalar_t* orow = obase + oidx.offset(n);
    // all-zero bits are +0.0 in every float format: memset the out-of-window columns
    // (skipped when the output comes from zeros_untouched: its pages stay untouched)
    if (!out_zeroed) {
      std::memset(static_cast<void*>(orow), 0, static_cast<size_t>(lo) * sizeof(scalar_t));
      std::memset(static_cast<void*>(orow + hi), 0, static_cast<size_t>(V - hi) * sizeof(scalar_t));
    }
    const acc_t g = grad[n], gh = grad_ent != nullptr ? grad_ent[n] : acc_t(0);
    if (g == 0 && gh == 0) {  // masked token: no softmax needed
      if (!out_zeroed) std::memset(static_cast<void*>(orow + lo), 0, static_cast<size_t>(W) * sizeof(scalar_t));
      continue;
    }
    const acc_t* z = reader.read(base + idx.offset(n) + lo, W);
    acc_t* d = dz.data();
    if (gh == 0)
      row_scaled_exp(z, W, inv_t, lse[n], -g * inv_t, d);
    else
      row_entropy_grad(z, W, inv_t, lse[n], ent[n], g, gh, d);
    const int64_t t = targets[n] - lo;
    if (t >= 0 && t < W) d[t] += g * inv_t;
    store_row_f32(d, orow + lo, W);
  }
}

using OptTensor = c10::optional<at::Tensor>;

void check_backward(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                    const at::Tensor& grad, double temperature, int64_t lo, int64_t hi, const OptTensor& entropy,
                    const OptTensor& grad_entropy, const char* op) {
  check_common(logits, targets, c10::nullopt, temperature, lo, hi, op);
  const int64_t N = num_rows(logits);
  check_vector(lse, N, acc_dtype(logits), "lse", op);
  check_vector(grad, N, acc_dtype(logits), "grad_logprobs", op);
  TORCH_CHECK(entropy.has_value() == grad_entropy.has_value(), op,
              ": entropy and grad_entropy must be given together");
  if (entropy.has_value()) {
    check_vector(*entropy, N, acc_dtype(logits), "entropy", op);
    check_vector(*grad_entropy, N, acc_dtype(logits), "grad_entropy", op);
  }
}

void run_backward(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                  const at::Tensor& grad, double temperature, int64_t lo, int64_t hi, const at::Tensor& out,
                  bool out_zeroed, const OptTensor& entropy, const OptTensor& grad_entropy, const char* op) {
  const int64_t N = num_rows(logits);
  MMR1_DISPATCH_LOGITS(logits.scalar_type(), op, [&] {
    using acc_t = typename AccType<scalar_t>::type;
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    const acc_t* ent = entropy.has_value() ? entropy->const_data_ptr<acc_t>() : nullptr;
    const acc_t* gent = grad_entropy.has_value() ? grad_entropy->const_data_ptr<acc_t>() : nullptr;
    at::parallel_for(0, N, kRowGrain, [&](int64_t b, int64_t e) {
      backward_rows<scalar_t>(logits, targets.const_data_ptr<int64_t>(), lse.const_data_ptr<acc_t>(),
                              grad.const_data_ptr<acc_t>(), inv_t, lo, hi, out, out_zeroed, b, e, ent, gent);
    });
  });
}

at::Tensor logprob_backward_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                const at::Tensor& grad, double temperature, int64_t lo, int64_t hi,
                                const OptTensor& entropy, const OptTensor& grad_entropy) {
  const char* op = "mmr1::logprob_backward";
  check_backward(logits, targets, lse, grad, temperature, lo, hi, entropy, grad_entropy, op);
  // Only the window is written; outside it the untouched zero pages are never faulted in.
  // (MADV_HUGEPAGE was tried instead: with THP defrag=madvise it stalls in direct
  // compaction, measured 65-670 ms for the same call.)
  at::Tensor out = zeros_untouched(logits.sizes(), logits.options());
  run_backward(logits, targets, lse, grad, temperature, lo, hi, out, /*out_zeroed=*/true, entropy, grad_entropy, op);
  return out;
}

void logprob_backward_inplace_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                  const at::Tensor& grad, double temperature, int64_t lo, int64_t hi,
                                  const OptTensor& entropy, const OptTensor& grad_entropy) {
  const char* op = "mmr1::logprob_backward_";
  check_backward(logits, targets, lse, grad, temperature, lo, hi, entropy, grad_entropy, op);
  run_backward(logits, targets, lse, grad, temperature, lo, hi, logits, /*out_zeroed=*/false, entropy, grad_entropy,
               op);
}

}  // namespace

MMR1_MULTIVERSION float row_max_f32(const float* __restrict z, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) m = z[i] > m ? z[i] : m;
  return m;
}

MMR1_MULTIVERSION float row_sum_exp_f32(const float* __restrict z, int64_t n, float m, float inv_t) {
  float s = 0.0f;
  const float a = inv_t * kLog2e, b = m * a;  // exp((z - m)/T) = 2^(z*a - b)
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += exp2_nonpos(std::fma(z[i], a, -b));
  return s;
}

MMR1_MULTIVERSION float row_sum_exp_ent_f32(const float* __restrict z, int64_t n, float m, float inv_t, float* t) {
  float s = 0.0f, acc = 0.0f;
  const float a = inv_t * kLog2e, b = m * a;  // x2 = (z - m)/T in log2 units
#pragma omp simd reduction(+ : s, acc)
  for (int64_t i = 0; i < n; ++i) {
    const float x2 = std::fma(z[i], a, -b);
    const float e = exp2_nonpos(x2);
    s += e;
    // below 2^-126 the term is negligible; the clamp also keeps a -inf logit from giving 0 * -inf
    acc += e * (x2 < -126.0f ? -126.0f : x2);
  }
  *t = acc * (1.0f / kLog2e);  // back to natural-log units
  return s;
}

MMR1_MULTIVERSION void row_entropy_grad_f32(const float* __restrict z, int64_t n, float inv_t, float lse, float h,
                                            float g, float gh, float* __restrict d) {
  const float a = inv_t * kLog2e, b = lse * kLog2e;  // log2 p = z*a - b
  const float c0 = g + gh * h, c1 = gh * (1.0f / kLog2e);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float x2 = std::fma(z[i], a, -b);
    const float xc = x2 < -126.0f ? -126.0f : x2;  // a -inf logit: p ~ 2^-126, log p finite (no 0 * -inf)
    d[i] = -inv_t * exp2_nonpos(xc) * std::fma(c1, xc, c0);
  }
}

MMR1_MULTIVERSION void row_scaled_exp_f32(const float* __restrict z, int64_t n, float inv_t, float shift, float scale,
                                          float* __restrict d) {
  const float a = inv_t * kLog2e, b = shift * kLog2e;  // exp(z/T - shift) = 2^(z*a - b)
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) d[i] = scale * exp2_nonpos(std::fma(z[i], a, -b));
}

at::Tensor zeros_untouched(at::IntArrayRef sizes, const at::TensorOptions& options) {
#ifdef __linux__
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (nbytes >= (size_t(1) << 20)) {  // small tensors: the normal allocator is cheaper than a mapping
    void* p = mmap(nullptr, nbytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p != MAP_FAILED)
      return at::from_blob(p, sizes, [nbytes](void* q) { munmap(q, nbytes); }, options);
  }
#endif
  return at::zeros(sizes, options);
}

at::Tensor zeros_untouched_op(const at::Tensor& like, at::IntArrayRef size, at::ScalarType dtype) {
  return zeros_untouched(size, like.options().dtype(dtype));
}

void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.device().is_cpu(), op, ": logits must be a CPU tensor for the CPU kernel");
  TORCH_CHECK(logits.dim() == 2 || logits.dim() == 3, op, ": logits must be [N, V] or [B, T, V], got ",
              logits.sizes());
  TORCH_CHECK(logits.size(-1) == 0 || logits.stride(-1) == 1, op,
              ": logits must have unit stride on the vocab dim, got strides ", logits.strides());
}

void check_vector(const at::Tensor& t, int64_t n, at::ScalarType dtype, const char* name, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "], got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

TORCH_LIBRARY_IMPL(mmr1, CPU, m) {
  m.impl("token_logprobs", &token_logprobs_cpu);
  m.impl("grpo_token_loss", &grpo_token_loss_cpu);
  m.impl("logprob_backward", &logprob_backward_cpu);
  m.impl("logprob_backward_", &logprob_backward_inplace_cpu);
  m.impl("zeros_untouched", &zeros_untouched_op);
}

}  // namespace mmr1
