// C++ CPU kernels of the risk core: one task per bundle (Mixed-VaR) or group
// (GRPO) through at::parallel_for; the math is mvar_math.h's.
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/dispatch_cpu.h"
#include "../common/parallel.h"
#include "risk_core.h"

namespace riskpo {
namespace {

// Measured costs on one thread (2-core AMD EPYC, torch 2.13, -O3; op calls at
// 512 x 10 ... 8192 x 16, bundles of 5, binary rewards, credit "std"):
// Mixed-VaR 280-300 ns per bundle at n = 10 and ~420 ns at n = 16, i.e. 5.2-5.7
// ns per reward; GRPO 24-34 ns per group at n = 10-16, 2.1-2.4 ns per reward.
// With the lower bounds below, 512 x 10 (~30 µs) and 2048 x 16 (~170 µs Mixed-
// VaR, ~70 µs GRPO) run on the calling thread, and 8192 x 16 (~690 µs) in two
// chunks of ~340 µs (see ../common/parallel.h for why 2 x 100 µs per grain).
constexpr double kMVaRNsPerReward = 5.0;
constexpr double kGRPONsPerReward = 2.0;

int64_t grain_for(double ns_per_reward, int64_t rewards_per_task) {
  return grain_for_cost(ns_per_reward * static_cast<double>(std::max<int64_t>(1, rewards_per_task)));
}

template <typename acc, typename T>
void mvar_bundles(const T* rewards, T* advantages, int64_t num_prompts,
                  const mvar::Params<acc>& p, const MVaRScalars<acc>& s,
                  const MVaROutputs<acc>& out, int64_t first_bundle, int64_t end_bundle) {
  const int64_t n = p.group_size, Q = p.bundle_size;
  const acc nan = std::numeric_limits<acc>::quiet_NaN();
  const acc zero = 0;
  const acc base_mid = s.base_mid ? *s.base_mid : zero;
  const acc base_low = s.base_low ? *s.base_low : zero;
  const bool per_prompt_stats = p.credit == mvar::kCreditStd || p.credit == mvar::kCreditSumMean;
  // Scratch reused across this task's bundles.
  std::vector<acc> sorted(n), paper_adv(n), prompt_sd(Q);
  std::vector<double> centred_sum(n), prompt_mean(Q);  // double: see mean_and_std

  for (int64_t b = first_bundle; b < end_bundle; ++b) {
    const int64_t first_prompt = b * Q;
    const int64_t prompts = std::min(Q, num_prompts - first_prompt);
    const T* r = rewards + first_prompt * n;  // (prompts, n)
    T* adv = advantages + first_prompt * n;   // (prompts, n)
    acc* scores = out.bundle_scores + b * n;  // (n,)
    auto reward = [&](int64_t q, int64_t j) { return static_cast<acc>(r[q * n + j]); };

    bool finite = true;
    for (int64_t j = 0; j < n; ++j) {
      acc sum = 0;
      for (int64_t q = 0; q < prompts; ++q) sum += reward(q, j);
      scores[j] = sum;
      finite = finite && std::isfinite(sum);
    }
    if (!finite) {  // documented NaN propagation: the whole bundle is marked
      out.q_lo[b] = out.q_hi[b] = nan;
      for (int64_t i = 0; i < prompts * n; ++i) adv[i] = static_cast<T>(nan);
      continue;
    }

    std::copy(scores, scores + n, sorted.begin());
    std::sort(sorted.begin(), sorted.end());
    acc q_lo, q_hi;
    double mean_score, sd_score;
    mvar::bundle_quantiles(sorted.data(), p, s.track_lo, s.track_hi, &q_lo, &q_hi);
    mvar::mean_and_std([&](int64_t j) { return scores[j]; }, n, &mean_score, &sd_score);
    const acc bundle_sd = mvar::guarded_std<acc>(sd_score, n);
    out.q_lo[b] = q_lo;
    out.q_hi[b] = q_hi;
    for (int64_t j = 0; j < n; ++j) {
      paper_adv[j] = mvar::paper_advantage(scores[j], q_lo, q_hi, base_mid, base_low, bundle_sd, p);
    }

    if (per_prompt_stats) {
      for (int64_t q = 0; q < prompts; ++q) {
        double sd;
        mvar::mean_and_std([&](int64_t j) { return reward(q, j); }, n, &prompt_mean[q], &sd);
        prompt_sd[q] = mvar::guarded_std<acc>(sd, n);
      }
      for (int64_t j = 0; j < n; ++j) {
        double D = 0;
        for (int64_t q = 0; q < prompts; ++q) D += static_cast<double>(reward(q, j)) - prompt_mean[q];
        centred_sum[j] = D;
      }
    }
    for (int64_t q = 0; q < prompts; ++q) {
      for (int64_t j = 0; j < n; ++j) {
        const acc x = reward(q, j);
        const acc value = per_prompt_stats
            ? mvar::response_advantage(paper_adv[j], x, prompt_sd[q],
                                       static_cast<double>(x) - prompt_mean[q], centred_sum[j],
                                       prompts, p)
            : mvar::response_advantage(paper_adv[j], x, acc(1), 0.0, 0.0, prompts, p);
        adv[q * n + j] = static_cast<T>(value);
      }
    }
  }
}

}  // namespace

template <typename acc>
void mvar_advantages_cpu(const void* rewards, FloatType storage, int64_t num_prompts,
                         const mvar::Params<acc>& params, const MVaRScalars<acc>& scalars,
                         const MVaROutputs<acc>& out) {
  const int64_t num_bundles = mvar::num_bundles(num_prompts, params.bundle_size);
  const int64_t grain = grain_for(kMVaRNsPerReward, params.bundle_size * params.group_size);
  with_float_type(storage, [&](auto tag) {
    using T = decltype(tag);
    // Accumulation is double exactly for double storage; other pairs never run.
    if constexpr (std::is_same_v<T, double> == std::is_same_v<acc, double>) {
      at::parallel_for(0, num_bundles, grain, [&](int64_t begin, int64_t end) {
        mvar_bundles<acc>(static_cast<const T*>(rewards), static_cast<T*>(out.advantages),
                          num_prompts, params, scalars, out, begin, end);
      });
    }
  });
}

template void mvar_advantages_cpu<float>(const void*, FloatType, int64_t, const mvar::Params<float>&,
                                         const MVaRScalars<float>&, const MVaROutputs<float>&);
template void mvar_advantages_cpu<double>(const void*, FloatType, int64_t, const mvar::Params<double>&,
                                          const MVaRScalars<double>&, const MVaROutputs<double>&);

void grpo_advantages_cpu(const void* rewards, FloatType storage, int64_t num_groups,
                         int64_t group_size, bool normalize_std, double eps, void* advantages) {
  const int64_t n = group_size;
  with_float_type(storage, [&](auto tag) {
    using T = decltype(tag);
    using acc = std::conditional_t<std::is_same_v<T, double>, double, float>;
    const T* r_all = static_cast<const T*>(rewards);
    T* adv_all = static_cast<T*>(advantages);
    at::parallel_for(0, num_groups, grain_for(kGRPONsPerReward, n), [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const T* r = r_all + g * n;
        T* adv = adv_all + g * n;
        double mean, sd;
        mvar::mean_and_std([&](int64_t j) { return static_cast<acc>(r[j]); }, n, &mean, &sd);
        if (!std::isfinite(mean) || !std::isfinite(sd)) {  // NaN propagation, as Mixed-VaR
          for (int64_t j = 0; j < n; ++j) adv[j] = static_cast<T>(std::numeric_limits<acc>::quiet_NaN());
          continue;
        }
        for (int64_t j = 0; j < n; ++j) {
          adv[j] = static_cast<T>(mvar::grpo_advantage<acc>(static_cast<acc>(r[j]), mean, sd, n,
                                                            normalize_std, eps));
        }
      }
    });
  });
}

}  // namespace riskpo
