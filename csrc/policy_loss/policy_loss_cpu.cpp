// C++ CPU kernels of the policy-loss family: parallel over rows (tokens),
// blocked over the vocabulary so that each block is read from memory once and
// reused from L1 for its max, exponentials and sums.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "../common/dispatch_cpu.h"
#include "../common/parallel.h"
#include "policy_loss.h"

namespace riskpo {
namespace {

constexpr int64_t kBlock = 2048;  // floats per vocabulary block: 8 KiB, stays in L1

// The float32 hot loops are compiled twice, for AVX2+FMA and for baseline
// x86-64, and picked at load time: a source build need not know its CPU.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define RISKPO_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RISKPO_CPU_CLONES
#endif

// max(x, lo), NaN giving lo. A select, not std::fmax: GCC does not inline
// fmaxf in the AVX2 clone, and the call stops vectorisation.
__attribute__((always_inline)) inline float floor_at(float x, float lo) { return x > lo ? x : lo; }

// exp(x) for x <= ~0 (arguments are logits minus their max), written so that
// loops calling it vectorise (libm's expf is a call per element): Cephes'
// reduction x = n ln2 + r, |r| <= ln2 / 2, and its polynomial for e^r (~1 ulp).
// Below -87 (where expf underflows) it is exactly 0, so -inf logits give p = 0
// (and so does NaN, which the callers flag separately).
__attribute__((always_inline)) inline float exp_nonpositive(float x) {
  const float xc = floor_at(x, -87.0f);
  const int32_t n = static_cast<int32_t>(xc * 1.44269504088896341f - 0.5f);  // round, for <= 0.5
  const float fn = static_cast<float>(n);
  const float r = (xc - fn * 0.693359375f) + fn * 2.12194440e-4f;
  float poly = 1.9875691500e-4f;
  poly = poly * r + 1.3981999507e-3f;
  poly = poly * r + 8.3334519073e-3f;
  poly = poly * r + 4.1665795894e-2f;
  poly = poly * r + 1.6666665459e-1f;
  poly = poly * r + 5.0000001201e-1f;
  const float e_r = poly * r * r + r + 1.0f;
  const int32_t bits = (n + 127) << 23;  // 2^n, n in [-126, 0]
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return static_cast<float>(x >= -87.0f) * (e_r * two_n);
}

// Max of a block and whether it holds NaN or +inf (which make the row NaN;
// -inf is a legitimate logit with probability 0).
RISKPO_CPU_CLONES void block_max_and_bad(const float* z, int64_t len, float* max_out, bool* bad_out) {
  float m = -std::numeric_limits<float>::infinity();
  int bad = 0;
#pragma omp simd reduction(max : m) reduction(| : bad)
  for (int64_t i = 0; i < len; ++i) {
    m = z[i] > m ? z[i] : m;
    bad |= (z[i] != z[i]) | (z[i] == std::numeric_limits<float>::infinity());
  }
  *max_out = m;
  *bad_out = bad != 0;
}

// s = sum exp(z - shift), t = sum exp(z - shift) (z - shift) over one block.
RISKPO_CPU_CLONES void block_exp_sums(const float* z, int64_t len, float shift, double* s_out,
                                      double* t_out) {
  float s = 0, t = 0;  // a block is short: float partial sums, merged in double
#pragma omp simd reduction(+ : s, t)
  for (int64_t i = 0; i < len; ++i) {
    const float d = z[i] - shift;
    const float e = exp_nonpositive(d);
    s += e;
    t += e * floor_at(d, -87.0f);  // -inf logits add 0, not 0 * -inf = NaN
  }
  *s_out = s;
  *t_out = t;
}

// out = (-p (g_lp + g_H (log p + H))) / T with log p = z - lse, for one block.
RISKPO_CPU_CLONES void block_softmax_grad(const float* z, int64_t len, float lse, float g_logprob,
                                          float g_entropy, float entropy, float inv_temperature,
                                          float* out) {
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const float log_p = z[i] - lse;
    const float p = exp_nonpositive(log_p);
    // A -inf logit has p = 0 and gets 0, not 0 * -inf = NaN: log p is floored.
    out[i] = -p * (g_logprob + g_entropy * (floor_at(log_p, -87.0f) + entropy)) * inv_temperature;
  }
}

// Softmax statistics of one row, relative to its running max m:
//   s = sum exp(z - m),  t = sum exp(z - m) * (z - m).
// Then lse = m + log s and entropy = log s - t / s: the shifted form avoids the
// cancellation of lse - E[z] when logits are large (+-1e4).
struct RowStats {
  double max = -std::numeric_limits<double>::infinity();
  double s = 0, t = 0;

  void merge(double block_max, double block_s, double block_t) {
    if (block_s == 0) return;  // a block of -inf logits: probability 0
    if (s == 0) {
      max = block_max, s = block_s, t = block_t;
      return;
    }
    const double m = std::max(max, block_max);
    const double old_scale = std::exp(max - m);
    const double new_scale = std::exp(block_max - m);
    t = old_scale * (t + (max - m) * s) + new_scale * (block_t + (block_max - m) * block_s);
    s = old_scale * s + new_scale * block_s;
    max = m;
  }
};

template <typename acc, typename T>
void forward_rows(const T* logits, int64_t vocab, int64_t row_stride, const int64_t* tokens,
                  acc inv_temperature, acc* logprobs, acc* entropy, acc* lse, int64_t begin,
                  int64_t end) {
  acc z[kBlock];
  for (int64_t r = begin; r < end; ++r) {
    const T* x = logits + r * row_stride;
    RowStats stats;
    bool finite = true;
    for (int64_t b0 = 0; b0 < vocab; b0 += kBlock) {
      const int64_t len = std::min(kBlock, vocab - b0);
      if constexpr (std::is_same_v<acc, float>) {
        for (int64_t i = 0; i < len; ++i) z[i] = static_cast<float>(x[b0 + i]) * inv_temperature;
        float block_max;
        bool bad;
        block_max_and_bad(z, len, &block_max, &bad);
        finite = finite && !bad;
        double block_s = 0, block_t = 0;
        if (block_max != -std::numeric_limits<float>::infinity() && !bad) {
          block_exp_sums(z, len, block_max, &block_s, &block_t);
        }
        stats.merge(block_max, block_s, block_t);
        continue;
      }
      acc block_max = -std::numeric_limits<acc>::infinity();
      for (int64_t i = 0; i < len; ++i) {
        z[i] = static_cast<acc>(x[b0 + i]) * inv_temperature;
        block_max = std::max(block_max, z[i]);
        // NaN or +inf make the row NaN (reported, never averaged away); -inf is p = 0.
        finite = finite && !(std::isnan(z[i]) || z[i] == std::numeric_limits<acc>::infinity());
      }
      double block_s = 0, block_t = 0;
      if (block_max != -std::numeric_limits<acc>::infinity()) {
        for (int64_t i = 0; i < len; ++i) {
          const acc shifted = z[i] - block_max;
          const acc e = std::exp(shifted);
          block_s += e;
          // -inf logits (masked vocabulary) have p = 0 and add nothing: 0 * -inf is NaN.
          if (e != acc(0)) block_t += static_cast<double>(e) * shifted;
        }
      }
      stats.merge(block_max, block_s, block_t);
    }
    const double log_s = std::log(stats.s);
    const double row_lse = stats.max + log_s;
    const double target = static_cast<double>(static_cast<acc>(x[tokens[r]]) * inv_temperature);
    const double nan = std::numeric_limits<double>::quiet_NaN();
    lse[r] = static_cast<acc>(finite ? row_lse : nan);
    // (z_y - max) - log s, not z_y - lse: at logits of 1e15 a float32 lse has
    // lost log s (V = 7 gave 0 instead of -log 7), while z_y - max is exact.
    logprobs[r] = static_cast<acc>(finite ? (target - stats.max) - log_s : nan);
    entropy[r] = static_cast<acc>(finite ? log_s - stats.t / stats.s : nan);
  }
}

template <typename acc, typename T>
void backward_rows(const acc* grad_logprobs, const acc* grad_entropy, const T* logits,
                   int64_t vocab, int64_t row_stride, const int64_t* tokens, const acc* lse,
                   const acc* entropy, acc inv_temperature, T* grad_logits, int64_t begin,
                   int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    T* out = grad_logits + r * vocab;
    const acc g_logprob = grad_logprobs[r], g_entropy = grad_entropy[r];
    if (g_logprob == acc(0) && g_entropy == acc(0)) {
      std::fill(out, out + vocab, static_cast<T>(0));
      continue;
    }
    const T* x = logits + r * row_stride;
    const acc row_lse = lse[r], row_entropy = entropy[r];
    const int64_t y = tokens[r];
    // Read before the row is written: grad_logits may be the logits themselves
    // (the in-place op), and each block is loaded before it is overwritten.
    const T x_y = x[y];
    if constexpr (std::is_same_v<acc, float>) {
      float z[kBlock], g[kBlock];
      for (int64_t b0 = 0; b0 < vocab; b0 += kBlock) {
        const int64_t len = std::min(kBlock, vocab - b0);
        for (int64_t i = 0; i < len; ++i) z[i] = static_cast<float>(x[b0 + i]) * inv_temperature;
        if constexpr (std::is_same_v<T, float>) {
          block_softmax_grad(z, len, row_lse, g_logprob, g_entropy, row_entropy, inv_temperature,
                             out + b0);
        } else {
          block_softmax_grad(z, len, row_lse, g_logprob, g_entropy, row_entropy, inv_temperature, g);
          for (int64_t i = 0; i < len; ++i) out[b0 + i] = static_cast<T>(g[i]);
        }
      }
      // The target's one-hot term joins before the single rounding to T: added
      // to an already rounded bf16 value it would lose the (1 - p) cancellation.
      const float z_y = static_cast<float>(x_y) * inv_temperature;
      float g_y;
      block_softmax_grad(&z_y, 1, row_lse, g_logprob, g_entropy, row_entropy, inv_temperature, &g_y);
      out[y] = static_cast<T>(g_y + g_logprob * inv_temperature);
      continue;
    }
    // d/dz = g_logprob * (onehot - p) - g_entropy * p * (log p + H), then / temperature.
    auto softmax_part = [&](T value) -> acc {
      const acc log_p = static_cast<acc>(value) * inv_temperature - row_lse;
      const acc p = std::exp(log_p);
      // A -inf logit has p = 0: no gradient, and no 0 * -inf.
      return p == acc(0) ? acc(0) : -p * (g_logprob + g_entropy * (log_p + row_entropy));
    };
    for (int64_t i = 0; i < vocab; ++i) out[i] = static_cast<T>(softmax_part(x[i]) * inv_temperature);
    out[y] = static_cast<T>((softmax_part(x_y) + g_logprob) * inv_temperature);
  }
}

// Rows per grain from measured per-row costs on one thread (2-core AMD EPYC,
// torch 2.13, AVX2 clone; forward and backward ops, V = 128 ... 151936):
// float32 / bfloat16 0.62-1.1 ns per element forward and 0.64-1.5 backward, plus
// ~50 ns per row (V = 128: 103-147 ns a row); float64 4.9-8.9 ns per element.
// With these lower bounds a region opens only when each thread gets >= 100 µs
// (../common/parallel.h): at V = 32768 float32 a grain is ~10 rows (~200 µs),
// at V = 151936 two rows, at V = 128 ~2,000 rows.
template <typename T>
int64_t row_grain(int64_t vocab) {
  const double ns_per_element = std::is_same_v<T, double> ? 4.5 : 0.6;
  return grain_for_cost(40.0 + ns_per_element * static_cast<double>(vocab));
}

}  // namespace

template <typename acc>
void logprob_entropy_cpu(const void* logits, FloatType type, int64_t rows, int64_t vocab,
                         int64_t row_stride, const int64_t* tokens, double temperature,
                         acc* logprobs, acc* entropy, acc* lse) {
  with_float_type(type, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, double> == std::is_same_v<acc, double>) {
      // Tasks of half a grain (>= kMinChunkNs of work each), handed out dynamically.
      const int64_t grain = row_grain<T>(vocab);
      parallel_for_dynamic(0, rows, grain, grain / 2, [&](int64_t begin, int64_t end) {
        forward_rows<acc>(static_cast<const T*>(logits), vocab, row_stride, tokens,
                          static_cast<acc>(1.0 / temperature), logprobs, entropy, lse, begin, end);
      });
    }
  });
}

template <typename acc>
void logprob_entropy_backward_cpu(const acc* grad_logprobs, const acc* grad_entropy,
                                  const void* logits, FloatType type, int64_t rows,
                                  int64_t vocab, int64_t row_stride, const int64_t* tokens,
                                  const acc* lse, const acc* entropy, double temperature,
                                  void* grad_logits) {
  with_float_type(type, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, double> == std::is_same_v<acc, double>) {
      const int64_t grain = row_grain<T>(vocab);
      parallel_for_dynamic(0, rows, grain, grain / 2, [&](int64_t begin, int64_t end) {
        backward_rows<acc>(grad_logprobs, grad_entropy, static_cast<const T*>(logits), vocab,
                           row_stride, tokens, lse, entropy, static_cast<acc>(1.0 / temperature),
                           static_cast<T*>(grad_logits), begin, end);
      });
    }
  });
}

template void logprob_entropy_cpu<float>(const void*, FloatType, int64_t, int64_t, int64_t,
                                         const int64_t*, double, float*, float*, float*);
template void logprob_entropy_cpu<double>(const void*, FloatType, int64_t, int64_t, int64_t,
                                          const int64_t*, double, double*, double*, double*);
template void logprob_entropy_backward_cpu<float>(const float*, const float*, const void*,
                                                  FloatType, int64_t, int64_t, int64_t,
                                                  const int64_t*, const float*, const float*,
                                                  double, void*);
template void logprob_entropy_backward_cpu<double>(const double*, const double*, const void*,
                                                   FloatType, int64_t, int64_t, int64_t,
                                                   const int64_t*, const double*, const double*,
                                                   double, void*);

}  // namespace riskpo
