// Kernel entry points of the policy-loss family (vocabulary-sized work only:
// the O(B*T) loss on top of per-token log-probs and entropies is elementwise).
#pragma once

#include <cstdint>

#include "../common/float_type.h"

namespace riskpo {

// One streaming pass per row: log-prob of the target, entropy and log-sum-exp
// of softmax(logits / temperature). Outputs are float64 for float64 logits,
// float32 otherwise (`acc`).
template <typename acc>
void logprob_entropy_cpu(const void* logits, FloatType type, int64_t rows, int64_t vocab,
                         int64_t row_stride, const int64_t* tokens, double temperature,
                         acc* logprobs, acc* entropy, acc* lse);

// One pass per row: d(loss)/d(logits) from the gradients of the log-probs and
// entropies, recomputing the softmax from the saved log-sum-exp. Rows whose two
// gradients are 0 (masked tokens) are written as zeros without reading logits.
template <typename acc>
void logprob_entropy_backward_cpu(const acc* grad_logprobs, const acc* grad_entropy,
                                  const void* logits, FloatType type, int64_t rows,
                                  int64_t vocab, int64_t row_stride, const int64_t* tokens,
                                  const acc* lse, const acc* entropy, double temperature,
                                  void* grad_logits);

}  // namespace riskpo
