// Per-bundle math of the Mixed-VaR advantage (RISKPO_SPEC.md sections 3-5, 7).
//
// One definition, included by the C++ CPU kernel and the CUDA kernel, so both
// compute the same function. Every function works on values already converted
// to the accumulation type `acc` (float for float/half/bfloat16 storage,
// double for double): loading from storage is the caller's business.
#pragma once

#include <cmath>
#include <cstdint>

// enum Credit, enum QuantileMode and their names, generated from
// riskpo_kernels/common.py by setup.py (the one place they are written).
#include "riskpo_names.h"

#if defined(__CUDACC__)
#define RISKPO_HD __host__ __device__ __forceinline__
#else
#define RISKPO_HD inline
#endif

namespace riskpo {
namespace mvar {

// A standard deviation at or below this is treated as 1 (spec section 4, fix):
// dividing by ~0 turned identical-score bundles into advantages of ~1e6.
constexpr double kStdFloor = 1e-3;
// sum-mean credit: below this |D| the paper's advantage is split evenly.
constexpr double kSumMeanFloor = 1e-6;

template <typename acc>
struct Params {
  int64_t group_size;   // n, samples per prompt (= papers per bundle)
  int64_t bundle_size;  // Q, prompts per bundle (the last bundle may hold fewer)
  acc alpha, beta;      // quantile levels, 0 < alpha < beta < 1
  acc w_low, w_high;    // weights of the lower (CVaR) and upper tail terms
  acc eps;
  int credit;           // Credit
  int quantile_mode;    // QuantileMode
  bool normalize_std;
  bool natural_baseline;
};

// ceil(P / Q) without the overflow of (P + Q - 1) / Q.
RISKPO_HD int64_t num_bundles(int64_t num_prompts, int64_t bundle_size) {
  return num_prompts / bundle_size + (num_prompts % bundle_size != 0);
}

template <typename acc>
RISKPO_HD acc positive_part(acc x) {
  return x > acc(0) ? x : acc(0);
}

// torch.lerp's formula, so interpolated quantiles round as torch.quantile's do.
template <typename acc>
RISKPO_HD acc lerp(acc start, acc end, acc weight) {
  return weight < acc(0.5) ? start + weight * (end - start)
                           : end - (end - start) * (acc(1) - weight);
}

// Quantile with linear interpolation of n ascending values (numpy/torch default).
template <typename acc>
RISKPO_HD acc quantile_of_sorted(const acc* sorted, int64_t n, acc level) {
  const acc rank = level * acc(n - 1);
  int64_t below = static_cast<int64_t>(rank);  // rank >= 0: truncation is floor
  if (below > n - 1) below = n - 1;
  const int64_t above = below + 1 < n ? below + 1 : n - 1;
  return lerp(sorted[below], sorted[above], rank - acc(below));
}

// Replaces a degenerate standard deviation by 1: a single sample (n < 2) has no
// spread, and one at or below kStdFloor would blow the advantages up.
template <typename acc>
RISKPO_HD acc guarded_std(double sd, int64_t n) {
  return (n < 2 || !(sd > kStdFloor)) ? acc(1) : static_cast<acc>(sd);
}

// Mean and unbiased (n - 1) standard deviation, two passes, in double whatever
// acc is: sum-mean credit divides by sums of centred rewards that can be small,
// where float32 running sums over n samples (error ~ n ulp) would show.
// `value(i)` returns element i; sd is left raw (see guarded_std).
template <typename ValueAt>
RISKPO_HD void mean_and_std(ValueAt value, int64_t n, double* mean_out, double* sd_out) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(value(i));
  const double mean = sum / static_cast<double>(n);
  double squares = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(value(i)) - mean;
    squares += d * d;
  }
  using std::sqrt;
  *mean_out = mean;
  *sd_out = n > 1 ? sqrt(squares / static_cast<double>(n - 1)) : 0.0;
}

// The bundle's quantile pair after the mode is applied. `track_lo/hi` may be
// null (no tracker value yet), in which case every mode is batch.
template <typename acc>
RISKPO_HD void bundle_quantiles(const acc* sorted_scores, const Params<acc>& p,
                                const acc* track_lo, const acc* track_hi,
                                acc* q_lo, acc* q_hi) {
  const acc batch_lo = quantile_of_sorted(sorted_scores, p.group_size, p.alpha);
  const acc batch_hi = quantile_of_sorted(sorted_scores, p.group_size, p.beta);
  const bool tracked = track_lo != nullptr && track_hi != nullptr;
  if (tracked && p.quantile_mode == kTrack) {
    *q_lo = *track_lo;
    *q_hi = *track_hi;
  } else if (tracked && p.quantile_mode == kMix) {
    *q_lo = (*track_lo + batch_lo) * acc(0.5);
    *q_hi = (*track_hi + batch_hi) * acc(0.5);
  } else {
    *q_lo = batch_lo;
    *q_hi = batch_hi;
  }
}

// Mixed-VaR advantage of one paper with bundle score `score` (spec section 4),
// including the division by the bundle's guarded standard deviation `bundle_sd`.
template <typename acc>
RISKPO_HD acc paper_advantage(acc score, acc q_lo, acc q_hi, acc base_mid, acc base_low,
                              acc bundle_sd, const Params<acc>& p) {
  const acc baseline = p.natural_baseline ? q_lo - q_hi : acc(0);
  acc g_mid = positive_part(score - q_lo) - positive_part(score - q_hi) + baseline;
  g_mid = (g_mid - base_mid) / (p.beta - p.alpha + p.eps);
  const acc g_low = (-positive_part(q_lo - score) - base_low) / (p.alpha + p.eps);
  acc mixed = g_mid + p.w_low * g_low;
  if (p.w_high != acc(0)) {  // skipped when off so an infinite tail cannot leak in as 0*inf
    mixed += p.w_high * positive_part(score - q_hi) / (acc(1) - p.beta + p.eps);
  }
  mixed /= (acc(1) + p.w_low + p.w_high);
  return p.normalize_std ? mixed / (bundle_sd + p.eps) : mixed;
}

// Share of the paper's advantage `A` that goes to one of its responses
// (spec section 5). `reward` is r[p_q, j]; `prompt_sd` the guarded std of the
// prompt's rewards; `centred` = r[p_q, j] - mean(r[p_q, :]); `paper_centred_sum`
// = D, the sum of `centred` over the paper's prompts; `prompts_in_bundle` = Qb.
// centred and D stay in double: their ratio is where cancellation would show.
template <typename acc>
RISKPO_HD acc response_advantage(acc A, acc reward, acc prompt_sd, double centred,
                                 double paper_centred_sum, int64_t prompts_in_bundle,
                                 const Params<acc>& p) {
  switch (p.credit) {
    case kCreditScore:
      return reward > acc(0) ? acc(0.5) * A : acc(1.5) * A;
    case kCreditStd:
      return A / (prompt_sd + p.eps);
    case kCreditSumMean: {
      const double D = paper_centred_sum;
      const bool spread = (D > 0 ? D : -D) > kSumMeanFloor;
      return spread ? A * static_cast<acc>(centred / D) : A / acc(prompts_in_bundle);
    }
    default:
      return A;
  }
}

// GRPO group advantage (spec section 7). A group of one has mean 0 and std 1.
// In double whatever the storage: the std of float32 rewards near the float32
// limit overflows float32 (and the advantage became r / inf = 0), while the
// advantage itself is of order 1.
template <typename acc>
RISKPO_HD acc grpo_advantage(acc reward, double mean, double sd, int64_t n, bool normalize_std,
                             double eps) {
  if (n < 2) {
    mean = 0;
    sd = 1;
  }
  const double centred = static_cast<double>(reward) - mean;
  return static_cast<acc>(normalize_std ? centred / (sd + eps) : centred);
}

}  // namespace mvar
}  // namespace riskpo
