// C++ CPU kernels of the policy-loss family: parallel over rows (tokens),
// blocked over the vocabulary so that each block is read from memory once and
// reused from L1 for its max, exponentials and sums.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "policy_loss.h"

namespace riskpo {
namespace {

constexpr int64_t kBlock = 2048;  // floats per vocabulary block: 8 KiB, stays in L1

template <typename Fn>
void with_logits_type(LogitsType type, Fn&& fn) {
  switch (type) {
    case LogitsType::kFloat32: return fn(float{});
    case LogitsType::kFloat64: return fn(double{});
    case LogitsType::kFloat16: return fn(c10::Half{});
    case LogitsType::kBFloat16: return fn(c10::BFloat16{});
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
    logprobs[r] = static_cast<acc>(finite ? target - row_lse : nan);
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
    // d/dz = g_logprob * (onehot - p) - g_entropy * p * (log p + H), then / temperature.
    auto softmax_part = [&](int64_t i) -> acc {
      const acc log_p = static_cast<acc>(x[i]) * inv_temperature - row_lse;
      const acc p = std::exp(log_p);
      // A -inf logit has p = 0: no gradient, and no 0 * -inf.
      return p == acc(0) ? acc(0) : -p * (g_logprob + g_entropy * (log_p + row_entropy));
    };
    for (int64_t i = 0; i < vocab; ++i) out[i] = static_cast<T>(softmax_part(i) * inv_temperature);
    // The target's one-hot term is added before the single rounding to T: adding
    // it to an already rounded bf16 value loses the (1 - p) cancellation.
    const int64_t y = tokens[r];
    out[y] = static_cast<T>((softmax_part(y) + g_logprob) * inv_temperature);
  }
}

int64_t row_grain(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, vocab)); }

}  // namespace

template <typename acc>
void logprob_entropy_cpu(const void* logits, LogitsType type, int64_t rows, int64_t vocab,
                         int64_t row_stride, const int64_t* tokens, double temperature,
                         acc* logprobs, acc* entropy, acc* lse) {
  with_logits_type(type, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, double> == std::is_same_v<acc, double>) {
      at::parallel_for(0, rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
        forward_rows<acc>(static_cast<const T*>(logits), vocab, row_stride, tokens,
                          static_cast<acc>(1.0 / temperature), logprobs, entropy, lse, begin, end);
      });
    }
  });
}

template <typename acc>
void logprob_entropy_backward_cpu(const acc* grad_logprobs, const acc* grad_entropy,
                                  const void* logits, LogitsType type, int64_t rows,
                                  int64_t vocab, int64_t row_stride, const int64_t* tokens,
                                  const acc* lse, const acc* entropy, double temperature,
                                  void* grad_logits) {
  with_logits_type(type, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, double> == std::is_same_v<acc, double>) {
      at::parallel_for(0, rows, row_grain(vocab), [&](int64_t begin, int64_t end) {
        backward_rows<acc>(grad_logprobs, grad_entropy, static_cast<const T*>(logits), vocab,
                           row_stride, tokens, lse, entropy, static_cast<acc>(1.0 / temperature),
                           static_cast<T*>(grad_logits), begin, end);
      });
    }
  });
}

template void logprob_entropy_cpu<float>(const void*, LogitsType, int64_t, int64_t, int64_t,
                                         const int64_t*, double, float*, float*, float*);
template void logprob_entropy_cpu<double>(const void*, LogitsType, int64_t, int64_t, int64_t,
                                          const int64_t*, double, double*, double*, double*);
template void logprob_entropy_backward_cpu<float>(const float*, const float*, const void*,
                                                  LogitsType, int64_t, int64_t, int64_t,
                                                  const int64_t*, const float*, const float*,
                                                  double, void*);
template void logprob_entropy_backward_cpu<double>(const double*, const double*, const void*,
                                                   LogitsType, int64_t, int64_t, int64_t,
                                                   const int64_t*, const double*, const double*,
                                                   double, void*);

}  // namespace riskpo
