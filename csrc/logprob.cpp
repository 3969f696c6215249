// Fused token log-prob / GRPO ratio / k3-KL kernels for the CPU.
//
// Semantics: ../DESIGN.md "Kernel semantics" 2 and the reference in
// mmr1_kernels/reference.py. Per token row (a window [lo, hi) of the vocab):
//   pass 1: max of the window (reads the row from DRAM once)
//   pass 2: sum of exp((z - max)/T) (the window is now in L1/L2: 8192 fp32
//           logits are 32 KiB, a full 65536 row 256 KiB)
// and then O(1) scalar math for the loss. The backward recomputes
// softmax(z/T) from the saved fp32 logsumexp and writes dz in the logits dtype,
// optionally into the logits' own storage (no second [N, V] buffer).
#include "common.h"

#include <torch/library.h>

namespace mmr1 {

namespace {

constexpr int64_t kRowGrain = 8;  // rows per parallel task: ~256 KiB of fp32 logits at V=8192

struct GrpoParams {
  float eps_low, eps_high, beta;
  bool has_old, has_ref;
};

struct TokenGrpo {
  float loss, coef, ratio, kl;
};

// Per-token clipped surrogate + k3 KL and d(loss)/d(logp). Log-ratio and the KL
// exponent are clamped to +-20 (exp(20) = 4.9e8) so one stale old log-prob
// cannot overflow the loss; the clamp's gradient is 0 outside the range.
static inline TokenGrpo grpo_token(float logp, float old, float ref, float adv, const GrpoParams& p) {
  TokenGrpo out;
  const float log_ratio = logp - old;
  const bool lr_clamped = log_ratio > 20.0f || log_ratio < -20.0f;
  const float ratio = std::exp(std::min(std::max(log_ratio, -20.0f), 20.0f));
  const float unclipped = ratio * adv;
  const float r_clip = std::min(std::max(ratio, 1.0f - p.eps_low), 1.0f + p.eps_high);
  const float clipped = r_clip * adv;
  // -min(unclipped, clipped): the gradient flows only when the unclipped term is the min.
  out.loss = -std::min(unclipped, clipped);
  out.coef = (unclipped <= clipped && !lr_clamped) ? -adv * ratio : 0.0f;
  out.ratio = ratio;
  out.kl = 0.0f;
  if (p.beta != 0.0f) {
    const float delta_raw = ref - logp;
    const bool d_clamped = delta_raw > 20.0f || delta_raw < -20.0f;
    const float delta = std::min(std::max(delta_raw, -20.0f), 20.0f);
    const float e = std::exp(delta);
    out.kl = e - delta - 1.0f;
    out.loss += p.beta * out.kl;
    if (!d_clamped) out.coef += p.beta * (1.0f - e);
  }
  return out;
}

template <typename scalar_t>
void logprob_rows(const at::Tensor& logits, const int64_t* targets, const bool* mask, float inv_t,
                  int64_t lo, int64_t hi, float* logp_out, float* lse_out, int64_t begin, int64_t end) {
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  const RowIndexer idx = make_row_indexer(logits);
  const int64_t W = hi - lo;
  RowReader<scalar_t> reader(W);
  for (int64_t n = begin; n < end; ++n) {
    if (mask != nullptr && !mask[n]) {
      logp_out[n] = 0.0f;
      lse_out[n] = 0.0f;
      continue;
    }
    const float* z = reader.read(base + idx.offset(n) + lo, W);
    const float m = row_max(z, W);
    const float s = row_sum_exp(z, W, m, inv_t);
    const float lse = m * inv_t + std::log(s);
    const int64_t t = targets[n] - lo;
    // A target outside the window is rejected by the Python wrapper in checked
    // mode; here it must still never be read out of bounds, so it gives NaN.
    lse_out[n] = lse;
    logp_out[n] = (t >= 0 && t < W) ? z[t] * inv_t - lse : std::numeric_limits<float>::quiet_NaN();
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

std::tuple<at::Tensor, at::Tensor> token_logprobs_cpu(const at::Tensor& logits, const at::Tensor& targets,
                                                      const c10::optional<at::Tensor>& mask, double temperature,
                                                      int64_t lo, int64_t hi) {
  check_common(logits, targets, mask, temperature, lo, hi, "mmr1::token_logprobs");
  const int64_t N = num_rows(logits);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({N}, opts), lse = at::empty({N}, opts);
  const float inv_t = static_cast<float>(1.0 / temperature);
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  const bool* mk = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
  MMR1_DISPATCH_LOGITS(logits.scalar_type(), "mmr1::token_logprobs", [&] {
    at::parallel_for(0, N, kRowGrain, [&](int64_t b, int64_t e) {
      logprob_rows<scalar_t>(logits, tgt, mk, inv_t, lo, hi, logp.data_ptr<float>(), lse.data_ptr<float>(), b, e);
    });
  });
  return {logp, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> grpo_token_loss_cpu(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& advantages,
    const c10::optional<at::Tensor>& mask, const c10::optional<at::Tensor>& old_logprobs,
    const c10::optional<at::Tensor>& ref_logprobs, double temperature, int64_t lo, int64_t hi, double eps_low,
    double eps_high, double beta, bool /*inplace_backward: used by the autograd formula only*/) {
  const char* op = "mmr1::grpo_token_loss";
  check_common(logits, targets, mask, temperature, lo, hi, op);
  const int64_t N = num_rows(logits);
  check_vector(advantages, N, at::kFloat, "advantages", op);
  if (old_logprobs.has_value()) check_vector(*old_logprobs, N, at::kFloat, "old_logprobs", op);
  if (ref_logprobs.has_value()) check_vector(*ref_logprobs, N, at::kFloat, "ref_logprobs", op);
  TORCH_CHECK(beta == 0.0 || ref_logprobs.has_value(), op, ": ref_logprobs is required when beta != 0");

  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({N}, opts), lse = at::empty({N}, opts), loss = at::empty({N}, opts),
             coef = at::empty({N}, opts), ratio = at::empty({N}, opts), kl = at::empty({N}, opts);
  const float inv_t = static_cast<float>(1.0 / temperature);
  const int64_t* tgt = targets.const_data_ptr<int64_t>();
  const bool* mk = mask.has_value() ? mask->const_data_ptr<bool>() : nullptr;
  const float* adv = advantages.const_data_ptr<float>();
  const float* old = old_logprobs.has_value() ? old_logprobs->const_data_ptr<float>() : nullptr;
  const float* ref = ref_logprobs.has_value() ? ref_logprobs->const_data_ptr<float>() : nullptr;
  const GrpoParams p{static_cast<float>(eps_low), static_cast<float>(eps_high), static_cast<float>(beta),
                     old != nullptr, ref != nullptr};
  MMR1_DISPATCH_LOGITS(logits.scalar_type(), op, [&] {
    at::parallel_for(0, N, kRowGrain, [&](int64_t b, int64_t e) {
      float* lp = logp.data_ptr<float>();
      logprob_rows<scalar_t>(logits, tgt, mk, inv_t, lo, hi, lp, lse.data_ptr<float>(), b, e);
      for (int64_t n = b; n < e; ++n) {
        if (mk != nullptr && !mk[n]) {
          loss.data_ptr<float>()[n] = 0.0f;
          coef.data_ptr<float>()[n] = 0.0f;
          ratio.data_ptr<float>()[n] = 1.0f;
          kl.data_ptr<float>()[n] = 0.0f;
          continue;
        }
        // old = logp.detach() when no old log-probs are given: ratio 1, gradient -A.
        const TokenGrpo g = grpo_token(lp[n], old ? old[n] : lp[n], ref ? ref[n] : 0.0f, adv[n], p);
        loss.data_ptr<float>()[n] = g.loss;
        coef.data_ptr<float>()[n] = g.coef;
        ratio.data_ptr<float>()[n] = g.ratio;
        kl.data_ptr<float>()[n] = g.kl;
      }
    });
  });
  return {logp, lse, loss, coef, ratio, kl};
}

// dz = g/T * (onehot(y) - softmax(z/T)) on the window, 0 outside. `out` may be
// the logits themselves (in-place backward): every element is read before the
// same element is written, and bf16/fp16 rows are first copied to fp32 scratch.
template <typename scalar_t>
void backward_rows(const at::Tensor& logits, const int64_t* targets, const float* lse, const float* grad,
                   float inv_t, int64_t lo, int64_t hi, const at::Tensor& out, int64_t begin, int64_t end) {
  const scalar_t* base = logits.const_data_ptr<scalar_t>();
  scalar_t* obase = static_cast<scalar_t*>(out.data_ptr());
  const RowIndexer idx = make_row_indexer(logits), oidx = make_row_indexer(out);
  const int64_t V = logits.size(-1), W = hi - lo;
  RowReader<scalar_t> reader(W);
  std::vector<float> dz(static_cast<size_t>(W));
  const scalar_t zero = static_cast<scalar_t>(0.0f);
  for (int64_t n = begin; n < end; ++n) {
    scalar_t* orow = obase + oidx.offset(n);
    for (int64_t j = 0; j < lo; ++j) orow[j] = zero;
    for (int64_t j = hi; j < V; ++j) orow[j] = zero;
    const float g = grad[n];
    if (g == 0.0f) {  // masked token: no softmax needed
      for (int64_t j = lo; j < hi; ++j) orow[j] = zero;
      continue;
    }
    const float* z = reader.read(base + idx.offset(n) + lo, W);
    const float scale = -g * inv_t, shift = lse[n];
    float* d = dz.data();
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) d[j] = scale * exp_approx(std::fma(z[j], inv_t, -shift));
    const int64_t t = targets[n] - lo;
    if (t >= 0 && t < W) d[t] += g * inv_t;
    scalar_t* ow = orow + lo;
#pragma omp simd
    for (int64_t j = 0; j < W; ++j) ow[j] = static_cast<scalar_t>(d[j]);
  }
}

void check_backward(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                    const at::Tensor& grad, double temperature, int64_t lo, int64_t hi, const char* op) {
  check_common(logits, targets, c10::nullopt, temperature, lo, hi, op);
  const int64_t N = num_rows(logits);
  check_vector(lse, N, at::kFloat, "lse", op);
  check_vector(grad, N, at::kFloat, "grad_logprobs", op);
}

void run_backward(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                  const at::Tensor& grad, double temperature, int64_t lo, int64_t hi, const at::Tensor& out,
                  const char* op) {
  const int64_t N = num_rows(logits);
  const float inv_t = static_cast<float>(1.0 / temperature);
  MMR1_DISPATCH_LOGITS(logits.scalar_type(), op, [&] {
    at::parallel_for(0, N, kRowGrain, [&](int64_t b, int64_t e) {
      backward_rows<scalar_t>(logits, targets.const_data_ptr<int64_t>(), lse.const_data_ptr<float>(),
                              grad.const_data_ptr<float>(), inv_t, lo, hi, out, b, e);
    });
  });
}

at::Tensor logprob_backward_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                const at::Tensor& grad, double temperature, int64_t lo, int64_t hi) {
  const char* op = "mmr1::logprob_backward";
  check_backward(logits, targets, lse, grad, temperature, lo, hi, op);
  at::Tensor out = at::empty(logits.sizes(), logits.options());
  run_backward(logits, targets, lse, grad, temperature, lo, hi, out, op);
  return out;
}

void logprob_backward_inplace_cpu(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& lse,
                                  const at::Tensor& grad, double temperature, int64_t lo, int64_t hi) {
  const char* op = "mmr1::logprob_backward_";
  check_backward(logits, targets, lse, grad, temperature, lo, hi, op);
  run_backward(logits, targets, lse, grad, temperature, lo, hi, logits, op);
}

}  // namespace

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
}

}  // namespace mmr1
