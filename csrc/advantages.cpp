// Group-relative advantage normalization on the CPU (docs/kernel-semantics.md,
// section 4; reference in mmr1_kernels/reference.py).
//
// Statistics are computed in fp64 with a shifted two-pass: every value is taken
// relative to the first valid value of its group, so a constant group has
// deviations of exactly 0.0, std exactly 0.0 and advantage exactly 0.0 (the
// E[x^2]-E[x]^2 form leaves a ~1e-4 residue in fp32 that, divided by eps=1e-4,
// produced the ~4000x advantage blow-ups reported in NeMo-RL #4158).
// N is small (a rollout batch, typically <= 65536), so this is one sequential
// O(N) sweep per statistic; 65536 rewards take well under a millisecond.
#include "common.h"

#include <torch/library.h>

namespace mmr1 {

namespace {

enum Mode : int64_t { kGrpo = 0, kDrGrpo = 1, kRloo = 2, kBatch = 3, kGdpo = 4 };

// d / (std + eps) with 0 for a zero deviation, so a constant group stays exactly
// 0 even with eps = 0 (0/0 would be NaN).
static inline double scaled(double d, double denom) { return d == 0.0 ? 0.0 : d / denom; }

struct Stats {
  std::vector<double> shift, shifted_sum, count, mean, std;
};

// Group statistics of values v[i] (NaN = missing) under dense group ids g[i].
template <typename Get>
Stats group_stats(int64_t N, int64_t G, const int64_t* g, Get v, bool unbiased) {
  Stats s;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  s.shift.assign(G, nan);
  s.shifted_sum.assign(G, 0.0);
  s.count.assign(G, 0.0);
  s.mean.assign(G, nan);
  s.std.assign(G, 0.0);
  for (int64_t i = 0; i < N; ++i) {
    const double x = v(i);
    if (std::isnan(x)) continue;
    const int64_t k = g[i];
    if (s.count[k] == 0.0) s.shift[k] = x;
    s.shifted_sum[k] += x - s.shift[k];
    s.count[k] += 1.0;
  }
  std::vector<double> m2(G, 0.0);
  for (int64_t k = 0; k < G; ++k)
    if (s.count[k] > 0) s.mean[k] = s.shift[k] + s.shifted_sum[k] / s.count[k];
  for (int64_t i = 0; i < N; ++i) {
    const double x = v(i);
    if (std::isnan(x)) continue;
    const double d = x - s.mean[g[i]];
    m2[g[i]] += d * d;
  }
  for (int64_t k = 0; k < G; ++k) {
    const double dof = unbiased ? s.count[k] - 1.0 : s.count[k];
    s.std[k] = (s.count[k] > 1.0 && dof > 0.0) ? std::sqrt(m2[k] / dof) : 0.0;
  }
  return s;
}

// One "group" holding every row: batch-level mean/std.
template <typename Get>
std::pair<double, double> batch_stats(int64_t N, Get v, bool unbiased) {
  std::vector<int64_t> zero(static_cast<size_t>(N), 0);
  Stats s = group_stats(N, 1, zero.data(), v, unbiased);
  return {s.mean[0], s.std[0]};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_advantages_cpu(
    const at::Tensor& rewards_in, const at::Tensor& group_index, int64_t num_groups,
    const c10::optional<at::Tensor>& weights_in, int64_t mode, double eps, bool unbiased) {
  const char* op = "mmr1::group_advantages";
  TORCH_CHECK(rewards_in.device().is_cpu(), op, ": rewards must be a CPU tensor");
  TORCH_CHECK(rewards_in.dim() == 2, op, ": rewards must be [N, R], got ", rewards_in.sizes());
  TORCH_CHECK(rewards_in.scalar_type() == at::kFloat || rewards_in.scalar_type() == at::kDouble, op,
              ": rewards must be float32 or float64, got ", rewards_in.scalar_type());
  const int64_t N = rewards_in.size(0), R = rewards_in.size(1);
  TORCH_CHECK(R >= 1, op, ": rewards must have at least one column");
  check_vector(group_index, N, at::kLong, "group_index", op);
  TORCH_CHECK(num_groups >= 0, op, ": num_groups must be >= 0");
  TORCH_CHECK(mode >= kGrpo && mode <= kGdpo, op, ": mode must be in [0, 4], got ", mode);
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, op, ": eps must be finite and >= 0, got ", eps);
  const at::Tensor rewards = rewards_in.to(at::kDouble).contiguous();
  at::Tensor weights = weights_in.has_value() ? weights_in->to(at::kDouble).contiguous()
                                              : at::ones({R}, rewards.options());
  TORCH_CHECK(weights.dim() == 1 && weights.size(0) == R, op, ": weights must have shape [", R, "]");

  const double* r = rewards.const_data_ptr<double>();
  const double* w = weights.const_data_ptr<double>();
  const int64_t* g = group_index.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i)
    TORCH_CHECK(g[i] >= 0 && g[i] < num_groups, op, ": group_index[", i, "]=", g[i], " outside [0, ", num_groups, ")");

  // Weighted sum of the reward columns; NaN columns are skipped (nansum) and a
  // row with every column NaN stays NaN (left out of all statistics).
  std::vector<double> combined(static_cast<size_t>(N));
  for (int64_t i = 0; i < N; ++i) {
    double acc = 0.0;
    bool any = false;
    for (int64_t j = 0; j < R; ++j) {
      const double x = r[i * R + j];
      if (!std::isnan(x)) {
        acc += w[j] * x;
        any = true;
      }
    }
    combined[i] = any ? acc : std::numeric_limits<double>::quiet_NaN();
  }
  auto get_combined = [&](int64_t i) { return combined[i]; };
  const Stats st = group_stats(N, num_groups, g, get_combined, unbiased);

  at::Tensor adv = at::zeros({N}, rewards_in.options().dtype(at::kFloat));
  float* a = adv.data_ptr<float>();
  if (mode == kGdpo) {
    std::vector<double> summed(static_cast<size_t>(N), 0.0);
    std::vector<bool> any(static_cast<size_t>(N), false);
    for (int64_t j = 0; j < R; ++j) {
      auto col = [&](int64_t i) { return r[i * R + j]; };
      const Stats cs = group_stats(N, num_groups, g, col, unbiased);
      for (int64_t i = 0; i < N; ++i) {
        const double x = col(i);
        if (std::isnan(x)) continue;
        summed[i] += w[j] * scaled(x - cs.mean[g[i]], cs.std[g[i]] + eps);
        any[i] = true;
      }
    }
    auto get_summed = [&](int64_t i) { return any[i] ? summed[i] : std::numeric_limits<double>::quiet_NaN(); };
    const auto [bm, bs] = batch_stats(N, get_summed, unbiased);
    for (int64_t i = 0; i < N; ++i)
      if (any[i]) a[i] = static_cast<float>(scaled(summed[i] - bm, bs + eps));
  } else {
    double batch_std = 0.0;
    if (mode == kBatch) batch_std = batch_stats(N, get_combined, unbiased).second;
    for (int64_t i = 0; i < N; ++i) {
      const double x = combined[i];
      if (std::isnan(x)) continue;
      const int64_t k = g[i];
      const double d = x - st.mean[k];
      switch (mode) {
        case kGrpo: a[i] = static_cast<float>(scaled(d, st.std[k] + eps)); break;
        case kDrGrpo: a[i] = static_cast<float>(d); break;
        case kBatch: a[i] = static_cast<float>(scaled(d, batch_std + eps)); break;
        case kRloo: {
          // r - mean(others) = (r - shift) - (S' - (r - shift)) / (n - 1), S' the shifted group sum.
          const double n = st.count[k];
          if (n > 1.0) {
            const double xs = x - st.shift[k];
            a[i] = static_cast<float>(xs - (st.shifted_sum[k] - xs) / (n - 1.0));
          }
          break;
        }
      }
    }
  }
  at::Tensor mean = at::empty({num_groups}, adv.options()), std_t = at::empty({num_groups}, adv.options());
  for (int64_t k = 0; k < num_groups; ++k) {
    mean.data_ptr<float>()[k] = static_cast<float>(st.mean[k]);
    std_t.data_ptr<float>()[k] = static_cast<float>(st.std[k]);
  }
  return {adv, mean, std_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmr1, CPU, m) { m.impl("group_advantages", &group_advantages_cpu); }

}  // namespace mmr1
