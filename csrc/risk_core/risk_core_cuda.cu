// CUDA kernels of the risk core. Plain CUDA (no torch headers): the API file
// hands over raw pointers and the stream, so `nvcc -c` builds this file alone.
//
// Mixed-VaR: one block per bundle, one launch for the batch. The block sums the
// bundle's papers into shared memory, sorts the n scores there by ranking
// (each thread counts the scores below its own: exact, stable, no extra pass),
// and writes every response's advantage. GRPO: one warp per group.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "risk_core.h"

namespace riskpo {
namespace {

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(float x);
template <typename T> __device__ __forceinline__ T from_acc(double x);
template <> __device__ __forceinline__ float from_acc<float>(float x) { return x; }
template <> __device__ __forceinline__ double from_acc<double>(double x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename acc> __device__ __forceinline__ acc quiet_nan();
template <> __device__ __forceinline__ float quiet_nan<float>() { return __int_as_float(0x7fc00000); }
template <> __device__ __forceinline__ double quiet_nan<double>() {
  return __longlong_as_double(0x7ff8000000000000LL);
}

constexpr int kMaxBlockThreads = 256;

template <typename T, typename acc>
__global__ void mvar_advantages_kernel(const T* __restrict__ rewards,  // (P, n)
                                       int64_t num_prompts, mvar::Params<acc> p,
                                       MVaRScalars<acc> s,
                                       T* __restrict__ advantages,       // (P, n)
                                       acc* __restrict__ bundle_scores,  // (num_bundles, n)
                                       acc* __restrict__ q_lo_out,       // (num_bundles,)
                                       acc* __restrict__ q_hi_out) {     // (num_bundles,)
  const int64_t n = p.group_size, Q = p.bundle_size;
  const int64_t num_bundles = mvar::num_bundles(num_prompts, Q);
  // Per-prompt statistics stay in double (see mean_and_std); doubles come first
  // so that every array is aligned.
  extern __shared__ double shared_words[];
  double* prompt_mean = shared_words;                      // (Q,)  std / sum-mean credit only
  double* centred_sum = prompt_mean + Q;                   // (n,)  sum-mean credit only
  acc* scores = reinterpret_cast<acc*>(centred_sum + n);  // (n,)
  acc* sorted = scores + n;                                // (n,)
  acc* prompt_sd = sorted + n;                             // (Q,)
  __shared__ acc bundle_stats[3];                       // q_lo, q_hi, guarded std of scores

  const acc base_mid = s.base_mid ? *s.base_mid : acc(0);
  const acc base_low = s.base_low ? *s.base_low : acc(0);
  const bool per_prompt_stats = p.credit == mvar::kCreditStd || p.credit == mvar::kCreditSumMean;
  const int tid = threadIdx.x, threads = blockDim.x;

  for (int64_t b = blockIdx.x; b < num_bundles; b += gridDim.x) {
    const int64_t first_prompt = b * Q;
    const int64_t prompts = min(Q, num_prompts - first_prompt);
    const T* r = rewards + first_prompt * n;
    T* adv = advantages + first_prompt * n;

    int finite = 1;
    for (int64_t j = tid; j < n; j += threads) {
      acc sum = 0;
      for (int64_t q = 0; q < prompts; ++q) sum += to_acc(r[q * n + j]);
      scores[j] = sum;
      bundle_scores[b * n + j] = sum;
      finite &= isfinite(sum) ? 1 : 0;
    }
    if (!__syncthreads_and(finite)) {  // documented NaN propagation, uniform across the block
      for (int64_t i = tid; i < prompts * n; i += threads) adv[i] = from_acc<T>(quiet_nan<acc>());
      if (tid == 0) q_lo_out[b] = q_hi_out[b] = quiet_nan<acc>();
      continue;
    }

    for (int64_t j = tid; j < n; j += threads) {
      const acc v = scores[j];
      int64_t rank = 0;
      for (int64_t i = 0; i < n; ++i) {
        const acc u = scores[i];
        rank += (u < v || (u == v && i < j)) ? 1 : 0;
      }
      sorted[rank] = v;
    }
    if (per_prompt_stats) {
      for (int64_t q = tid; q < prompts; q += threads) {
        double sd;
        mvar::mean_and_std([&](int64_t j) { return to_acc(r[q * n + j]); }, n, &prompt_mean[q], &sd);
        prompt_sd[q] = mvar::guarded_std<acc>(sd, n);
      }
    }
    __syncthreads();

    if (tid == 0) {
      double mean, sd;
      mvar::bundle_quantiles(sorted, p, s.track_lo, s.track_hi, &bundle_stats[0], &bundle_stats[1]);
      mvar::mean_and_std([&](int64_t j) { return scores[j]; }, n, &mean, &sd);
      bundle_stats[2] = mvar::guarded_std<acc>(sd, n);
      q_lo_out[b] = bundle_stats[0];
      q_hi_out[b] = bundle_stats[1];
    }
    if (p.credit == mvar::kCreditSumMean) {
      for (int64_t j = tid; j < n; j += threads) {
        double D = 0;
        for (int64_t q = 0; q < prompts; ++q) D += static_cast<double>(to_acc(r[q * n + j])) - prompt_mean[q];
        centred_sum[j] = D;
      }
    }
    __syncthreads();

    const acc q_lo = bundle_stats[0], q_hi = bundle_stats[1], bundle_sd = bundle_stats[2];
    for (int64_t i = tid; i < prompts * n; i += threads) {
      const int64_t q = i / n, j = i - q * n;
      const acc x = to_acc(r[i]);
      // Recomputing the paper's advantage per response (a few flops) is cheaper
      // than a shared array and another barrier.
      const acc A = mvar::paper_advantage(scores[j], q_lo, q_hi, base_mid, base_low, bundle_sd, p);
      const acc value = per_prompt_stats
          ? mvar::response_advantage(A, x, prompt_sd[q], static_cast<double>(x) - prompt_mean[q],
                                     p.credit == mvar::kCreditSumMean ? centred_sum[j] : 0.0,
                                     prompts, p)
          : mvar::response_advantage(A, x, acc(1), 0.0, 0.0, prompts, p);
      adv[i] = from_acc<T>(value);
    }
    __syncthreads();  // the next bundle reuses shared memory
  }
}

template <typename T, typename acc>
__global__ void grpo_advantages_kernel(const T* __restrict__ rewards,  // (G, n)
                                       int64_t num_groups, int64_t n, bool normalize_std, acc eps,
                                       T* __restrict__ advantages) {    // (G, n)
  const int lane = threadIdx.x % 32;
  const int64_t warps_per_block = blockDim.x / 32;
  const int64_t first = blockIdx.x * warps_per_block + threadIdx.x / 32;
  for (int64_t g = first; g < num_groups; g += gridDim.x * warps_per_block) {
    const T* r = rewards + g * n;
    T* adv = advantages + g * n;
    // Sums in double, as the CPU kernel: the std of float32 rewards near the
    // float32 limit overflows float32 (mvar_math.h, grpo_advantage).
    double sum = 0;
    for (int64_t j = lane; j < n; j += 32) sum += static_cast<double>(to_acc(r[j]));
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    const double mean = sum / static_cast<double>(n);
    double squares = 0;
    for (int64_t j = lane; j < n; j += 32) {
      const double d = static_cast<double>(to_acc(r[j])) - mean;
      squares += d * d;
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      squares += __shfl_xor_sync(0xffffffffu, squares, offset);
    }
    const double sd = n > 1 ? sqrt(squares / static_cast<double>(n - 1)) : 0.0;
    const bool finite = isfinite(mean) && isfinite(sd);
    for (int64_t j = lane; j < n; j += 32) {
      const acc value = finite ? mvar::grpo_advantage<acc>(to_acc(r[j]), mean, sd, n, normalize_std,
                                                           static_cast<double>(eps))
                               : quiet_nan<acc>();
      adv[j] = from_acc<T>(value);
    }
  }
}

// Calls fn(T{}) with the CUDA element type of the storage.
template <typename Fn>
int with_storage_type(FloatType storage, Fn&& fn) {
  switch (storage) {
    case FloatType::kFloat32: return fn(float{});
    case FloatType::kFloat64: return fn(double{});
    case FloatType::kFloat16: return fn(__half{});
    case FloatType::kBFloat16: return fn(__nv_bfloat16{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

// Lets `kernel` use `bytes` of dynamic shared memory. A failed runtime call is
// also recorded as the thread's last error, which the next unrelated launch
// check (PyTorch's included) would report as its own: clear it before returning.
template <typename Kernel>
cudaError_t raise_shared_memory_limit(Kernel kernel, size_t bytes) {
  int device = 0, limit = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err == cudaSuccess && bytes > static_cast<size_t>(limit)) return cudaErrorInvalidValue;
  if (err == cudaSuccess) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  }
  if (err != cudaSuccess) cudaGetLastError();
  return err;
}

// Grids stay far below the 2^31 - 1 block limit; the kernels loop past it.
constexpr int64_t kMaxBlocks = int64_t(1) << 20;

}  // namespace

template <typename acc>
int mvar_advantages_cuda(const void* rewards, FloatType storage, int64_t num_prompts,
                         const mvar::Params<acc>& params, const MVaRScalars<acc>& scalars,
                         const MVaROutputs<acc>& out, void* stream) {
  const int64_t num_bundles = mvar::num_bundles(num_prompts, params.bundle_size);
  if (num_bundles == 0) return static_cast<int>(cudaSuccess);
  const int64_t work = params.bundle_size * params.group_size;
  const int threads = static_cast<int>(std::min<int64_t>(kMaxBlockThreads, (work + 31) / 32 * 32));
  const size_t shared_bytes = sizeof(double) * (params.bundle_size + params.group_size) +
                              sizeof(acc) * (2 * params.group_size + params.bundle_size);
  const dim3 grid(static_cast<unsigned>(std::min(num_bundles, kMaxBlocks)));
  return with_storage_type(storage, [&](auto tag) {
    using T = decltype(tag);
    // Accumulation is double exactly for double storage; other pairs never run.
    if constexpr (std::is_same<T, double>::value != std::is_same<acc, double>::value) {
      return static_cast<int>(cudaErrorInvalidValue);
    } else {
    auto kernel = mvar_advantages_kernel<T, acc>;
    if (shared_bytes > 48 * 1024) {  // above the default, the limit must be raised per kernel
      const cudaError_t err = raise_shared_memory_limit(kernel, shared_bytes);
      if (err != cudaSuccess) return static_cast<int>(err);
    }
    kernel<<<grid, threads, shared_bytes, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(rewards), num_prompts, params, scalars,
        static_cast<T*>(out.advantages), out.bundle_scores, out.q_lo, out.q_hi);
    return static_cast<int>(cudaGetLastError());
    }
  });
}

template int mvar_advantages_cuda<float>(const void*, FloatType, int64_t, const mvar::Params<float>&,
                                         const MVaRScalars<float>&, const MVaROutputs<float>&, void*);
template int mvar_advantages_cuda<double>(const void*, FloatType, int64_t, const mvar::Params<double>&,
                                          const MVaRScalars<double>&, const MVaROutputs<double>&,
                                          void*);

int grpo_advantages_cuda(const void* rewards, FloatType storage, int64_t num_groups,
                         int64_t group_size, bool normalize_std, double eps, void* advantages,
                         void* stream) {
  if (num_groups == 0) return static_cast<int>(cudaSuccess);
  constexpr int kThreads = 256;
  constexpr int64_t kGroupsPerBlock = kThreads / 32;
  const dim3 grid(static_cast<unsigned>(
      std::min((num_groups + kGroupsPerBlock - 1) / kGroupsPerBlock, kMaxBlocks)));
  return with_storage_type(storage, [&](auto tag) {
    using T = decltype(tag);
    using acc = std::conditional_t<std::is_same<T, double>::value, double, float>;
    grpo_advantages_kernel<T, acc><<<grid, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        static_cast<const T*>(rewards), num_groups, group_size, normalize_std,
        static_cast<acc>(eps), static_cast<T*>(advantages));
    return static_cast<int>(cudaGetLastError());
  });
}

}  // namespace riskpo
