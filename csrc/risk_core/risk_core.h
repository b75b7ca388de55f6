// Kernel entry points of the risk core, shared by the API file (checks and
// dispatch) and the kernels. The CUDA side takes raw pointers and a stream so
// that risk_core_cuda.cu needs no torch headers and compiles with plain nvcc.
#pragma once

#include <cstdint>

#include "../common/float_type.h"
#include "mvar_math.h"

namespace riskpo {

// Optional per-call scalars (0-d device tensors in the op); null means absent.
template <typename acc>
struct MVaRScalars {
  const acc* track_lo = nullptr;
  const acc* track_hi = nullptr;
  const acc* base_mid = nullptr;
  const acc* base_low = nullptr;
};

// Outputs of the Mixed-VaR op; `advantages` is in the rewards' storage type.
template <typename acc>
struct MVaROutputs {
  void* advantages;     // (P * n,)
  acc* bundle_scores;   // (num_bundles, n)
  acc* q_lo;            // (num_bundles,)
  acc* q_hi;            // (num_bundles,)
};

// CPU kernels (risk_core_cpu.cpp), parallel over bundles / groups.
template <typename acc>
void mvar_advantages_cpu(const void* rewards, FloatType storage, int64_t num_prompts,
                         const mvar::Params<acc>& params, const MVaRScalars<acc>& scalars,
                         const MVaROutputs<acc>& out);

void grpo_advantages_cpu(const void* rewards, FloatType storage, int64_t num_groups,
                         int64_t group_size, bool normalize_std, double eps, void* advantages);

// CUDA kernels (risk_core_cuda.cu), one launch each. Return a cudaError_t as
// int (0 is success) so that callers need no CUDA headers.
template <typename acc>
int mvar_advantages_cuda(const void* rewards, FloatType storage, int64_t num_prompts,
                         const mvar::Params<acc>& params, const MVaRScalars<acc>& scalars,
                         const MVaROutputs<acc>& out, void* stream);

int grpo_advantages_cuda(const void* rewards, FloatType storage, int64_t num_groups,
                         int64_t group_size, bool normalize_std, double eps, void* advantages,
                         void* stream);

}  // namespace riskpo
