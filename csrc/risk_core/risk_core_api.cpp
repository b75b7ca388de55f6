// The risk core's one API file: argument checks, output allocation and
// dispatch to the CPU and CUDA kernels. The schemas live in
// riskpo_kernels/ops.py; this file only registers implementations for them.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "../common/check.h"
#include "risk_core.h"

#if defined(RISKPO_WITH_CUDA)
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace riskpo {
namespace {

using at::Tensor;


void check_rewards(const char* op, const Tensor& rewards, int64_t group_size) {
  RISKPO_CHECK(rewards.dim() == 1, op, ": rewards must be 1-D (P * n,), got shape ", rewards.sizes());
  float_type_of(op, "rewards", rewards);
  check_storage(op, "rewards", rewards);
  RISKPO_CHECK(group_size >= 1, op, ": group_size must be >= 1, got ", group_size);
  RISKPO_CHECK(rewards.numel() % group_size == 0, op, ": rewards length ", rewards.numel(),
               " is not a multiple of group_size ", group_size);
}

// The position of `value` in `names` (riskpo_names.h, generated from the
// Python side's lists), or an error listing them.
int parse_choice(const char* what, c10::string_view value, const char* const* names, int count) {
  std::string listed;
  for (int i = 0; i < count; ++i) {
    if (value == names[i]) return i;
    listed += std::string(i ? ", " : "") + names[i];
  }
  RISKPO_CHECK(false, "mvar_advantages: ", what, " must be one of ", listed, "; got '", value, "'");
}

// A 0-d (or one-element) scalar argument, on the rewards' device, in `dtype`.
std::optional<Tensor> scalar_argument(const char* name, const std::optional<Tensor>& value,
                                      const Tensor& rewards, at::ScalarType dtype) {
  if (!value.has_value()) return std::nullopt;
  const Tensor& t = *value;
  RISKPO_CHECK(t.numel() == 1, "mvar_advantages: ", name, " must hold one value, got shape ", t.sizes());
  RISKPO_CHECK(at::isFloatingType(t.scalar_type()), "mvar_advantages: ", name,
               " must be floating point, got ", t.scalar_type());
  RISKPO_CHECK(t.device() == rewards.device(), "mvar_advantages: ", name, " is on ", t.device(),
               " but rewards is on ", rewards.device());
  check_storage("mvar_advantages", name, t);
  return t.reshape({}).to(dtype).contiguous();
}

template <typename acc>
const acc* data_or_null(const std::optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr<acc>() : nullptr;
}

struct MVaRCall {
  Tensor rewards;  // contiguous
  int64_t num_prompts;
  mvar::Params<double> params;  // narrowed to float below when the math is float32
  std::optional<Tensor> track_lo, track_hi, base_mid, base_low;
  Tensor advantages, bundle_scores, q_lo, q_hi;
};

MVaRCall prepare_mvar(const Tensor& rewards_in, int64_t group_size, int64_t bundle_size,
                      double alpha, double beta, double w_low, double w_high,
                      c10::string_view quantile_mode, const std::optional<Tensor>& q_lo_track,
                      const std::optional<Tensor>& q_hi_track, c10::string_view credit,
                      bool normalize_std, bool natural_baseline,
                      const std::optional<Tensor>& base_mid, const std::optional<Tensor>& base_low,
                      double eps) {
  check_rewards("mvar_advantages", rewards_in, group_size);
  RISKPO_CHECK(bundle_size >= 1, "mvar_advantages: bundle_size must be >= 1, got ", bundle_size);
  RISKPO_CHECK(alpha > 0 && alpha < beta && beta < 1,
               "mvar_advantages: need 0 < alpha < beta < 1, got alpha=", alpha, " beta=", beta);
  RISKPO_CHECK(std::isfinite(w_low) && w_low >= 0, "mvar_advantages: w_low must be finite and >= 0, got ", w_low);
  RISKPO_CHECK(std::isfinite(w_high) && w_high >= 0, "mvar_advantages: w_high must be finite and >= 0, got ", w_high);
  RISKPO_CHECK(std::isfinite(eps) && eps >= 0, "mvar_advantages: eps must be finite and >= 0, got ", eps);
  RISKPO_CHECK(q_lo_track.has_value() == q_hi_track.has_value(),
               "mvar_advantages: q_lo_track and q_hi_track must be given together");

  MVaRCall call;
  call.rewards = rewards_in.contiguous();
  const int64_t n = group_size;
  call.num_prompts = call.rewards.numel() / n;
  // A bundle larger than the batch is the whole batch. Clamped here, so that
  // neither the bundle count (no (P + Q - 1) / Q overflow) nor scratch and
  // shared memory are sized by a bundle_size in the billions.
  const int64_t effective_bundle = std::min(bundle_size, std::max<int64_t>(call.num_prompts, 1));
  call.params = mvar::Params<double>{n, effective_bundle, alpha, beta, w_low, w_high, eps,
                                     parse_choice("credit", credit, mvar::kCreditNames,
                                                  mvar::kNumCredits),
                                     parse_choice("quantile_mode", quantile_mode,
                                                  mvar::kQuantileModeNames, mvar::kNumQuantileModes),
                                     normalize_std, natural_baseline};
  const at::ScalarType acc_type = accumulation_type(call.rewards);
  call.track_lo = scalar_argument("q_lo_track", q_lo_track, call.rewards, acc_type);
  call.track_hi = scalar_argument("q_hi_track", q_hi_track, call.rewards, acc_type);
  call.base_mid = scalar_argument("base_mid", base_mid, call.rewards, acc_type);
  call.base_low = scalar_argument("base_low", base_low, call.rewards, acc_type);

  const int64_t num_bundles = mvar::num_bundles(call.num_prompts, effective_bundle);
  const auto acc_options = call.rewards.options().dtype(acc_type);
  call.advantages = at::empty({call.rewards.numel()}, call.rewards.options());
  call.bundle_scores = at::empty({num_bundles, n}, acc_options);
  call.q_lo = at::empty({num_bundles}, acc_options);
  call.q_hi = at::empty({num_bundles}, acc_options);
  return call;
}

// Runs `kernel(params, scalars, outputs)` with the accumulation type of the call.
template <typename Kernel>
void run_mvar(MVaRCall& call, Kernel&& kernel) {
  auto go = [&](auto acc_tag) {
    using acc = decltype(acc_tag);
    const auto& d = call.params;
    const mvar::Params<acc> params{d.group_size, d.bundle_size, acc(d.alpha), acc(d.beta),
                                   acc(d.w_low), acc(d.w_high), acc(d.eps), d.credit,
                                   d.quantile_mode, d.normalize_std, d.natural_baseline};
    MVaRScalars<acc> scalars;
    scalars.track_lo = data_or_null<acc>(call.track_lo);
    scalars.track_hi = data_or_null<acc>(call.track_hi);
    scalars.base_mid = data_or_null<acc>(call.base_mid);
    scalars.base_low = data_or_null<acc>(call.base_low);
    const MVaROutputs<acc> out{call.advantages.data_ptr(), call.bundle_scores.data_ptr<acc>(),
                               call.q_lo.data_ptr<acc>(), call.q_hi.data_ptr<acc>()};
    kernel(params, scalars, out);
  };
  if (accumulation_type(call.rewards) == at::kDouble) {
    go(double{});
  } else {
    go(float{});
  }
}

using MVaRResult = std::tuple<Tensor, Tensor, Tensor, Tensor>;

template <typename Impl>
MVaRResult mvar_advantages_with(Impl&& impl, const Tensor& rewards, int64_t group_size,
                                int64_t bundle_size, double alpha, double beta, double w_low,
                                double w_high, c10::string_view quantile_mode,
                                const std::optional<Tensor>& q_lo_track,
                                const std::optional<Tensor>& q_hi_track, c10::string_view credit,
                                bool normalize_std, bool natural_baseline,
                                const std::optional<Tensor>& base_mid,
                                const std::optional<Tensor>& base_low, double eps) {
  MVaRCall call = prepare_mvar(rewards, group_size, bundle_size, alpha, beta, w_low, w_high,
                               quantile_mode, q_lo_track, q_hi_track, credit, normalize_std,
                               natural_baseline, base_mid, base_low, eps);
  impl(call);
  return {call.advantages, call.bundle_scores, call.q_lo, call.q_hi};
}

MVaRResult mvar_advantages_cpu_op(const Tensor& rewards, int64_t group_size, int64_t bundle_size,
                                  double alpha, double beta, double w_low, double w_high,
                                  c10::string_view quantile_mode,
                                  const std::optional<Tensor>& q_lo_track,
                                  const std::optional<Tensor>& q_hi_track, c10::string_view credit,
                                  bool normalize_std, bool natural_baseline,
                                  const std::optional<Tensor>& base_mid,
                                  const std::optional<Tensor>& base_low, double eps) {
  auto impl = [](MVaRCall& call) {
    run_mvar(call, [&](const auto& params, const auto& scalars, const auto& out) {
      mvar_advantages_cpu(call.rewards.data_ptr(),
                          float_type_of("mvar_advantages", "rewards", call.rewards), call.num_prompts,
                          params, scalars, out);
    });
  };
  return mvar_advantages_with(impl, rewards, group_size, bundle_size, alpha, beta, w_low, w_high,
                              quantile_mode, q_lo_track, q_hi_track, credit, normalize_std,
                              natural_baseline, base_mid, base_low, eps);
}

Tensor grpo_advantages_cpu_op(const Tensor& rewards_in, int64_t group_size, bool normalize_std,
                              double eps) {
  check_rewards("grpo_advantages", rewards_in, group_size);
  RISKPO_CHECK(std::isfinite(eps) && eps >= 0, "grpo_advantages: eps must be finite and >= 0, got ", eps);
  const Tensor rewards = rewards_in.contiguous();
  Tensor advantages = at::empty_like(rewards);
  grpo_advantages_cpu(rewards.data_ptr(), float_type_of("grpo_advantages", "rewards", rewards),
                      rewards.numel() / group_size,
                      group_size, normalize_std, eps, advantages.data_ptr());
  return advantages;
}

#if defined(RISKPO_WITH_CUDA)
void check_cuda(int err, const char* op, const MVaRCall* call) {
  if (err == 0) return;
  const std::string what = cudaGetErrorString(static_cast<cudaError_t>(err));
  if (call != nullptr) {
    RISKPO_CHECK(false, op, ": CUDA error '", what, "' (group_size=", call->params.group_size,
                 ", bundle_size=", call->params.bundle_size, " need ",
                 8 * (call->params.group_size + call->params.bundle_size) +
                     call->bundle_scores.element_size() *
                         (2 * call->params.group_size + call->params.bundle_size),
                 " bytes of shared memory per block)");
  }
  RISKPO_CHECK(false, op, ": CUDA error '", what, "'");
}

MVaRResult mvar_advantages_cuda_op(const Tensor& rewards, int64_t group_size, int64_t bundle_size,
                                   double alpha, double beta, double w_low, double w_high,
                                   c10::string_view quantile_mode,
                                   const std::optional<Tensor>& q_lo_track,
                                   const std::optional<Tensor>& q_hi_track, c10::string_view credit,
                                   bool normalize_std, bool natural_baseline,
                                   const std::optional<Tensor>& base_mid,
                                   const std::optional<Tensor>& base_low, double eps) {
  const c10::cuda::CUDAGuard guard(rewards.device());
  auto impl = [](MVaRCall& call) {
    void* stream = c10::cuda::getCurrentCUDAStream().stream();
    run_mvar(call, [&](const auto& params, const auto& scalars, const auto& out) {
      check_cuda(mvar_advantages_cuda(call.rewards.data_ptr(),
                                      float_type_of("mvar_advantages", "rewards", call.rewards),
                                      call.num_prompts, params, scalars, out, stream),
                 "mvar_advantages", &call);
    });
  };
  return mvar_advantages_with(impl, rewards, group_size, bundle_size, alpha, beta, w_low, w_high,
                              quantile_mode, q_lo_track, q_hi_track, credit, normalize_std,
                              natural_baseline, base_mid, base_low, eps);
}

Tensor grpo_advantages_cuda_op(const Tensor& rewards_in, int64_t group_size, bool normalize_std,
                               double eps) {
  check_rewards("grpo_advantages", rewards_in, group_size);
  RISKPO_CHECK(std::isfinite(eps) && eps >= 0, "grpo_advantages: eps must be finite and >= 0, got ", eps);
  const c10::cuda::CUDAGuard guard(rewards_in.device());
  const Tensor rewards = rewards_in.contiguous();
  Tensor advantages = at::empty_like(rewards);
  check_cuda(grpo_advantages_cuda(rewards.data_ptr(), float_type_of("grpo_advantages", "rewards", rewards),
                                  rewards.numel() / group_size, group_size, normalize_std, eps,
                                  advantages.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
             "grpo_advantages", nullptr);
  return advantages;
}
#endif

}  // namespace

TORCH_LIBRARY_IMPL(riskpo, CPU, m) {
  m.impl("mvar_advantages", &mvar_advantages_cpu_op);
  m.impl("grpo_advantages", &grpo_advantages_cpu_op);
}

#if defined(RISKPO_WITH_CUDA)
TORCH_LIBRARY_IMPL(riskpo, CUDA, m) {
  m.impl("mvar_advantages", &mvar_advantages_cuda_op);
  m.impl("grpo_advantages", &grpo_advantages_cuda_op);
}
#endif

}  // namespace riskpo
