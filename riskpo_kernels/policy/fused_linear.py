"""Fused linear policy loss: lm_head matmul, vocabulary kernels and gradient,
chunk by chunk, so that peak extra memory is O(chunk_size * V), not O(N * V).

The aggregation weights are known from the mask before any logit exists, so
each chunk's gradient is finished in the forward pass (flash-attention's and
Liger's fused-linear trick): hidden_c @ W.T -> log-prob/entropy pass ->
closed-form d loss / d (logp, H) -> d logits pass -> grad_hidden_c and the
grad_weight / grad_bias accumulators. Backward only scales them.
"""

from __future__ import annotations

import torch

from .. import _validation as v
from .token_loss import token_loss_and_grads

# Per-row vocabulary ops of each backend: forward (logprobs, entropy, lse) and backward.
# (forward, backward, backward written over the logits) of each implementation.
VOCAB_OPS = {
    "cpp": ("token_logprob_entropy", "token_logprob_entropy_backward",
            "token_logprob_entropy_backward_"),
    "triton": ("token_logprob_entropy_triton", "token_logprob_entropy_triton_backward",
               "token_logprob_entropy_triton_backward_"),
}


def default_chunk_size(num_rows: int, vocab: int, device: torch.device) -> int:
    """Rows per chunk. The chunk's gradient overwrites its logits, so a chunk
    holds chunk * V floats.

    CPU: ~32 MiB of logits, but at least 128 rows, since thinner matmuls run
    slowly. Measured on the 2-core EPYC, fwd+bwd, float32, H = 256:
      - V = 32768: 128 to 2048 rows within noise; 64 rows 13% slower.
      - V = 151936, 1024 tokens: 55 rows 2070 ms, 110 rows 1699 ms, 220 rows
        1553 ms; 4096 tokens: 7069, 6722, 6294 ms.
    128 rows at V = 151936 is 74 MiB of logits, which keeps the peak below
    Liger's fused loss; 220 rows would not.

    GPU: ~1 GiB, enough rows to keep the matrix units busy at any vocabulary
    (not yet measured on a GPU)."""
    budget = (32 << 20) if device.type == "cpu" else (1 << 30)
    rows = max(128 if device.type == "cpu" else 16, budget // (4 * max(vocab, 1)))
    return int(min(max(num_rows, 1), rows))


def check_linear(hidden, weight, bias, hidden_dims=(3,), op=None) -> tuple[int, int]:
    """(H, V) of ``hidden @ weight.T + bias``, each argument checked: float
    tensors, weight (V, H) with V >= 1, bias (V,), one dtype and device."""
    v.check_tensor("hidden", hidden, dtypes="float", op=op)
    if hidden.dim() not in hidden_dims:
        shape = "(B, T, H)" if hidden_dims == (3,) else "(N, H)"
        v._fail(op, f"hidden must be {shape}, got shape {tuple(hidden.shape)}")
    H = hidden.shape[-1]
    v.check_tensor("weight", weight, dtypes="float", op=op)
    if weight.dim() != 2 or weight.shape[1] != H or weight.shape[0] < 1:
        v._fail(op, f"weight must be (V, H) with H = {H} and V >= 1, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        v._fail(op, f"weight ({weight.dtype}, {weight.device}) must match hidden "
                    f"({hidden.dtype}, {hidden.device})")
    V = weight.shape[0]
    if bias is not None:
        v.check_tensor("bias", bias, dtypes="float", op=op)
        if tuple(bias.shape) != (V,) or bias.dtype != hidden.dtype or bias.device != hidden.device:
            v._fail(op, f"bias must be ({V},) {hidden.dtype} on {hidden.device}, got "
                        f"{tuple(bias.shape)} {bias.dtype} on {bias.device}")
    return H, V


def _check_op_args(hidden, weight, bias, tokens, weights, advantages, old_logprobs, ref_logprobs,
                   clip_low, clip_high, clip_ratio_c, kl_coef, entropy_coef, temperature,
                   chunk_size, vocab_impl):
    """The raw op's contract, checked for trainers that call
    torch.ops.riskpo.fused_linear_policy_loss directly (the public function
    has checked its own arguments, which become these)."""
    op = "fused_linear_policy_loss"
    _, V = check_linear(hidden, weight, bias, hidden_dims=(2,), op=op)
    N, device = hidden.shape[0], hidden.device
    per_token = {"tokens": (tokens, (torch.int64,)), "weights": (weights, "float"),
                 "advantages": (advantages, "float"), "old_logprobs": (old_logprobs, "float"),
                 "ref_logprobs": (ref_logprobs, "float")}
    for name, (tensor, dtypes) in per_token.items():
        if tensor is None and name in ("old_logprobs", "ref_logprobs"):
            continue
        v.check_tensor(name, tensor, dtypes=dtypes, device=device, device_name="hidden is", op=op)
        if tuple(tensor.shape) != (N,):
            v._fail(op, f"{name} must be (N,) = ({N},), got shape {tuple(tensor.shape)}")
    v.check_token_range(tokens, V, op=op)
    scalars = v.check_loss_scalars(clip_low, clip_high, clip_ratio_c, kl_coef, entropy_coef,
                                   temperature, op=op)
    v.check_int("chunk_size", chunk_size, 1, op=op)
    v.check_choice("vocab_impl", vocab_impl, tuple(VOCAB_OPS), op=op)
    return scalars


def fused_linear_policy_loss_forward(hidden, weight, bias, tokens, weights, advantages,
                                     old_logprobs, ref_logprobs, clip_low, clip_high,
                                     clip_ratio_c, kl_coef, entropy_coef, temperature,
                                     chunk_size, vocab_impl):
    """hidden: (N, H), weight: (V, H), bias: (V,) or None, tokens/weights/advantages/
    old/ref: (N,). Returns loss (), logprobs (N,), entropy (N,), grad_hidden (N, H),
    grad_weight (V, H), grad_bias (V,) (empty without bias): the gradients of loss."""
    _check_op_args(hidden, weight, bias, tokens, weights, advantages, old_logprobs, ref_logprobs,
                   clip_low, clip_high, clip_ratio_c, kl_coef, entropy_coef, temperature,
                   chunk_size, vocab_impl)
    forward_name, _, backward_in_place_name = VOCAB_OPS[vocab_impl]
    vocab_forward = getattr(torch.ops.riskpo, forward_name)
    vocab_backward_in_place = getattr(torch.ops.riskpo, backward_in_place_name)
    N = hidden.shape[0]
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logprobs = hidden.new_empty((N,), dtype=acc)
    entropy = hidden.new_empty((N,), dtype=acc)
    grad_hidden = torch.empty_like(hidden)
    # Accumulated over chunks in float32 at least: bf16 partial sums would drift.
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    grad_bias = torch.zeros(weight.shape[0] if bias is not None else 0, dtype=acc, device=weight.device)
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    for start in range(0, N, chunk_size):
        end = min(start + chunk_size, N)
        h = hidden[start:end]
        logits = torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()
        lp, ent, lse = vocab_forward(logits, tokens[start:end], temperature)
        part, grad_lp, grad_ent = token_loss_and_grads(
            lp, ent, weights[start:end], advantages[start:end],
            None if old_logprobs is None else old_logprobs[start:end],
            None if ref_logprobs is None else ref_logprobs[start:end],
            clip_low, clip_high, clip_ratio_c, kl_coef, entropy_coef)
        # The chunk's logits are ours and dead after this: the gradient
        # overwrites them instead of taking a second (chunk, V) buffer.
        vocab_backward_in_place(grad_lp, grad_ent, logits, tokens[start:end], lse, ent,
                                temperature)
        grad_logits = logits
        del logits
        # Not mm(out=grad_hidden[start:end]): for bf16 on CPU that left the view
        # unwritten (seen with torch 2.13), and the (chunk, H) temporary is small.
        grad_hidden[start:end] = grad_logits @ weight
        if grad_logits.dtype == acc:
            grad_weight.addmm_(grad_logits.t(), h)
        else:
            grad_weight += (grad_logits.t() @ h).to(acc)
        if bias is not None:
            grad_bias += grad_logits.sum(0, dtype=acc)
        logprobs[start:end] = lp
        entropy[start:end] = ent
        loss += part
    return (loss, logprobs, entropy, grad_hidden, grad_weight.to(weight.dtype),
            grad_bias.to(weight.dtype))
