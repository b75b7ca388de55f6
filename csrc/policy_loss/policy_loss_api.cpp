// The policy-loss family's API file: argument checks, allocation, dispatch.
// Schemas live in riskpo_kernels/ops.py (with the autograd formula); this file
// registers the CPU implementations.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <utility>

#include "../common/check.h"
#include "policy_loss.h"

namespace riskpo {
namespace {

using at::Tensor;

// logits (N, V) with unit stride along V; tokens (N,) int64 in [0, V).
Tensor checked_logits(const char* op, const Tensor& logits, const Tensor& tokens, double temperature) {
  RISKPO_CHECK(logits.dim() == 2, op, ": logits must be (N, V), got shape ", logits.sizes());
  float_type_of(op, "logits", logits);
  RISKPO_CHECK(logits.size(1) >= 1, op, ": the vocabulary is empty");
  RISKPO_CHECK(tokens.dim() == 1 && tokens.size(0) == logits.size(0), op, ": tokens must be (N,) = (",
               logits.size(0), ",), got shape ", tokens.sizes());
  RISKPO_CHECK(tokens.scalar_type() == at::kLong, op, ": tokens must be int64, got ", tokens.scalar_type());
  RISKPO_CHECK(tokens.device() == logits.device(), op, ": tokens is on ", tokens.device(),
               " but logits is on ", logits.device());
  RISKPO_CHECK(std::isfinite(temperature) && temperature > 0, op,
               ": temperature must be finite and > 0, got ", temperature);
  check_storage(op, "logits", logits);
  check_storage(op, "tokens", tokens);
  return logits.stride(1) == 1 ? logits : logits.contiguous();
}

// Token ids index the rows: out of range would read outside the logits.
void check_token_range(const char* op, const Tensor& tokens, int64_t vocab) {
  const int64_t* t = tokens.data_ptr<int64_t>();
  for (int64_t i = 0; i < tokens.numel(); ++i) {
    RISKPO_CHECK(t[i] >= 0 && t[i] < vocab, op, ": tokens must lie in [0, ", vocab, "), got ",
                 t[i], " at position ", i);
  }
}

// What both ops start from: checked, unit-stride logits and their shape.
struct Rows {
  Tensor logits, tokens;
  int64_t rows, vocab;
  FloatType type;
};

Rows checked_rows(const char* op, const Tensor& logits_in, const Tensor& tokens_in, double temperature) {
  Rows r;
  r.logits = checked_logits(op, logits_in, tokens_in, temperature);
  r.tokens = tokens_in.contiguous();
  r.rows = r.logits.size(0);
  r.vocab = r.logits.size(1);
  r.type = float_type_of(op, "logits", r.logits);
  check_token_range(op, r.tokens, r.vocab);
  return r;
}

std::tuple<Tensor, Tensor, Tensor> logprob_entropy_cpu_op(const Tensor& logits_in, const Tensor& tokens_in,
                                                         double temperature) {
  const auto [logits, tokens, rows, vocab, type] =
      checked_rows("token_logprob_entropy", logits_in, tokens_in, temperature);
  const auto options = logits.options().dtype(accumulation_type(logits));
  Tensor logprobs = at::empty({rows}, options), entropy = at::empty({rows}, options),
         lse = at::empty({rows}, options);
  if (accumulation_type(logits) == at::kDouble) {
    logprob_entropy_cpu<double>(logits.data_ptr(), type, rows, vocab, logits.stride(0),
                                tokens.data_ptr<int64_t>(), temperature, logprobs.data_ptr<double>(),
                                entropy.data_ptr<double>(), lse.data_ptr<double>());
  } else {
    logprob_entropy_cpu<float>(logits.data_ptr(), type, rows, vocab, logits.stride(0),
                               tokens.data_ptr<int64_t>(), temperature, logprobs.data_ptr<float>(),
                               entropy.data_ptr<float>(), lse.data_ptr<float>());
  }
  return {logprobs, entropy, lse};
}

// Writes d(loss)/d(logits) into grad_logits, which may be logits itself.
void logprob_entropy_backward_into(const char* op, const Tensor& grad_logprobs,
                                   const Tensor& grad_entropy, const Rows& checked,
                                   const Tensor& lse, const Tensor& entropy, double temperature,
                                   Tensor& grad_logits) {
  const auto& [logits, tokens, rows, vocab, type] = checked;
  const at::ScalarType acc = accumulation_type(logits);
  const std::pair<const char*, const Tensor*> per_row[] = {
      {"grad_logprobs", &grad_logprobs}, {"grad_entropy", &grad_entropy}, {"lse", &lse},
      {"entropy", &entropy}};
  for (const auto& [name, t] : per_row) {
    RISKPO_CHECK(t->dim() == 1 && t->size(0) == rows, op, ": ", name, " must be (N,) = (", rows,
                 ",), got shape ", t->sizes());
    check_real_floating(op, name, *t);
    RISKPO_CHECK(t->device() == logits.device(), op, ": ", name, " is on ", t->device(),
                 " but logits is on ", logits.device());
    check_storage(op, name, *t);
  }
  const Tensor g_logprobs = grad_logprobs.to(acc).contiguous(), g_entropy = grad_entropy.to(acc).contiguous();
  const Tensor row_lse = lse.to(acc).contiguous(), row_entropy = entropy.to(acc).contiguous();
  if (acc == at::kDouble) {
    logprob_entropy_backward_cpu<double>(g_logprobs.data_ptr<double>(), g_entropy.data_ptr<double>(),
                                         logits.data_ptr(), type, rows, vocab,
                                         logits.stride(0), tokens.data_ptr<int64_t>(),
                                         row_lse.data_ptr<double>(), row_entropy.data_ptr<double>(),
                                         temperature, grad_logits.data_ptr());
  } else {
    logprob_entropy_backward_cpu<float>(g_logprobs.data_ptr<float>(), g_entropy.data_ptr<float>(),
                                        logits.data_ptr(), type, rows, vocab,
                                        logits.stride(0), tokens.data_ptr<int64_t>(),
                                        row_lse.data_ptr<float>(), row_entropy.data_ptr<float>(),
                                        temperature, grad_logits.data_ptr());
  }
}

Tensor logprob_entropy_backward_cpu_op(const Tensor& grad_logprobs, const Tensor& grad_entropy,
                                       const Tensor& logits_in, const Tensor& tokens_in,
                                       const Tensor& lse, const Tensor& entropy, double temperature) {
  const char* op = "token_logprob_entropy_backward";
  const Rows checked = checked_rows(op, logits_in, tokens_in, temperature);
  Tensor grad_logits = at::empty({checked.rows, checked.vocab}, checked.logits.options());
  logprob_entropy_backward_into(op, grad_logprobs, grad_entropy, checked, lse, entropy,
                                temperature, grad_logits);
  return grad_logits;
}

// The same gradient written over the logits: for callers whose logits are a
// temporary of their own (the fused-linear loss's chunk), it saves an (N, V) buffer.
void logprob_entropy_backward_inplace_cpu_op(const Tensor& grad_logprobs,
                                             const Tensor& grad_entropy, Tensor logits,
                                             const Tensor& tokens, const Tensor& lse,
                                             const Tensor& entropy, double temperature) {
  const char* op = "token_logprob_entropy_backward_";
  RISKPO_CHECK(logits.dim() == 2 && logits.is_contiguous(), op,
               ": logits must be a contiguous (N, V) tensor to be overwritten, got shape ",
               logits.sizes(), " and strides ", logits.strides());
  check_writable(op, "logits", logits);
  const Rows checked = checked_rows(op, logits, tokens, temperature);
  logprob_entropy_backward_into(op, grad_logprobs, grad_entropy, checked, lse, entropy,
                                temperature, logits);
}

}  // namespace

TORCH_LIBRARY_IMPL(riskpo, CPU, m) {
  m.impl("token_logprob_entropy", &logprob_entropy_cpu_op);
  m.impl("token_logprob_entropy_backward", &logprob_entropy_backward_cpu_op);
  m.impl("token_logprob_entropy_backward_", &logprob_entropy_backward_inplace_cpu_op);
}

}  // namespace riskpo
