"""The fused-linear ops: lm_head matmul, vocabulary kernels and gradient, chunk
by chunk, so that peak extra memory is O(chunk_size * V), not O(N * V). The
vocabulary kernels are those of the backend named by ``vocab_impl``
(backends.py).

The aggregation weights are known from the mask before any logit exists, so
each chunk's gradient is finished in the forward pass (flash-attention's and
Liger's fused-linear trick): hidden_c @ W.T -> log-prob/entropy pass ->
closed-form d loss / d (logp, H) -> d logits pass -> grad_hidden_c and the
grad_weight / grad_bias accumulators. Backward only scales them.
"""

from __future__ import annotations

import torch

from .. import _validation as v
from .. import backends, ops
from .token_loss import token_loss_and_grads

# The per-row PPO math of a chunk, per device type: True runs token_loss_triton's
# one Triton kernel instead of token_loss_and_grads's 53-66 aten ops (the
# closed form stays defined once, in token_loss; tests/test_token_loss_triton.py
# holds the kernel to it). A table entry that benchmarks/bench_token_loss.py's
# measurement on the card decides.
ROW_MATH_TRITON = {"cuda": True}


def _row_math(device: torch.device):
    """token_loss_and_grads, or its Triton kernel where ROW_MATH_TRITON says so
    and triton imports."""
    if ROW_MATH_TRITON.get(device.type, False):
        try:
            from .token_loss_triton import token_loss_and_grads_triton
        except ImportError:  # no triton: the torch ops
            return token_loss_and_grads
        return token_loss_and_grads_triton
    return token_loss_and_grads


def default_chunk_size(num_rows: int, vocab: int, device: torch.device,
                       element_size: int = 4) -> int:
    """Rows per chunk. The chunk's gradient overwrites its logits, so a chunk
    holds chunk * V logits of ``element_size`` bytes (the hidden states' dtype).

    CPU: ~64 MiB of logits, but at least 512 rows, since thinner matmuls run
    slowly and each chunk reads and writes the (V, H) float32 accumulator of
    the weight's gradient once. Measured on the 2-core EPYC, fwd+bwd, float32,
    H = 256, dense batch, best of 8 against the three matmuls in the same run:
      - 2048 tokens, V = 32768: 256 rows 1.23x, 512 rows 1.15x, 1024 rows
        1.12x, 2048 rows (one chunk) 1.09x.
      - 1024 tokens, V = 151936: 256 rows 1.21x, 512 rows 1.14x.
    512 rows at V = 151936 is 297 MiB of logits (peaks in benchmarks/results).

    GPU: ~1 GiB of logits, counted in their own dtype (bf16: 3534 rows at
    V = 151936). Each chunk adds its (V, H) product of the weight's gradient
    into the float32 accumulator, the overhead the first H100 run showed
    (benchmarks/NOTES.md): fewer chunks at the same bytes, fewer of those."""
    budget = (64 << 20) if device.type == "cpu" else (1 << 30)
    rows = max(512 if device.type == "cpu" else 16, budget // (element_size * max(vocab, 1)))
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


def _check_rows(op, hidden, weight, bias, tokens, temperature, chunk_size, vocab_impl,
                per_row: dict, optional=()) -> None:
    """The contract of the fused ops: hidden (N, H), weight (V, H), bias (V,) or
    None, tokens (N,) int64 in [0, V), each of ``per_row`` a float (N,) tensor
    (those named in ``optional`` may be None), on hidden's device; checked for
    trainers that call torch.ops.riskpo.* directly (the public functions have
    checked their own arguments, which become these)."""
    _, V = check_linear(hidden, weight, bias, hidden_dims=(2,), op=op)
    N, device = hidden.shape[0], hidden.device
    tensors = {"tokens": (tokens, (torch.int64,))}
    tensors.update({name: (tensor, "float") for name, tensor in per_row.items()})
    for name, (tensor, dtypes) in tensors.items():
        if tensor is None and name in optional:
            continue
        v.check_tensor(name, tensor, dtypes=dtypes, device=device, device_name="hidden is", op=op)
        if tuple(tensor.shape) != (N,):
            v._fail(op, f"{name} must be (N,) = ({N},), got shape {tuple(tensor.shape)}")
    v.check_token_range(tokens, V, op=op)
    v.check_temperature(temperature, op=op)
    v.check_int("chunk_size", chunk_size, 1, op=op)
    backends.vocab_ops(vocab_impl, op=op)


_FLOAT32_OUTPUT_GEMM: dict = {}


def _float32_output_gemm(device: torch.device) -> bool:
    """Whether torch.addmm(..., out_dtype=float32) accumulates bf16 products
    into a float32 tensor in place on ``device`` (CUDA, torch >= 2.8; CPU has
    no kernel for it). Probed once per device on a small case and checked
    against float32 math, so a torch without it falls back to a copy."""
    key = (device.type, device.index)
    if key not in _FLOAT32_OUTPUT_GEMM:
        works = False
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False  # the probe reads its result back: not inside a CUDA graph capture
        if device.type == "cuda":
            try:
                a = torch.arange(6.0, device=device).view(2, 3)
                acc = torch.ones(2, 2, device=device)
                torch.addmm(acc, a.bfloat16(), a.t().bfloat16(), out_dtype=torch.float32, out=acc)
                works = acc.dtype == torch.float32 and torch.equal(acc, 1 + a @ a.t())
            except (TypeError, RuntimeError, NotImplementedError):
                works = False
        _FLOAT32_OUTPUT_GEMM[key] = works
    return _FLOAT32_OUTPUT_GEMM[key]


# Gathering a chunk's kept rows copies their logits (rows x V); skipping a zero
# row saves 2 x V x H multiply-adds. Measured on the 2-core EPYC (float32,
# 512 tokens, H 512, V 32768, chunks of 256, median of 5, skip vs no skip):
# 3% zero rows 1.06x, 6% 1.02x, 12.5% 0.98x, 25% 0.91x. The saving grows with H.
ZERO_ROW_SKIP_MIN_FRACTION = 0.125


def _rows_worth_skipping(live):
    """Indices (M,) of the chunk's rows with a non-zero upstream gradient
    (``live``: (rows,) bool), or None to run every row: too few zero rows, or
    no host sync allowed (the count is read on the host; inside a CUDA graph
    capture it cannot be)."""
    if live.is_cuda and torch.cuda.is_current_stream_capturing():
        return None
    rows = live.shape[0]
    kept = live.nonzero().squeeze(1)  # its size is the one host sync on CUDA, per chunk
    if rows - kept.numel() < max(1, ZERO_ROW_SKIP_MIN_FRACTION * rows):
        return None
    return kept


class _Chunks:
    """The chunk loop the fused ops share: logits of rows [start, end) and
    the accumulation of their gradient into d hidden, d weight and d bias."""

    def __init__(self, hidden, weight, bias, chunk_size, vocab_impl, with_grads):
        vocab = backends.vocab_ops(vocab_impl)
        self.vocab_forward = vocab.op("forward")
        self.vocab_backward_in_place = vocab.op("backward_in_place")
        self.hidden, self.weight, self.bias, self.chunk_size = hidden, weight, bias, chunk_size
        self.acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        if with_grads:
            self.grad_hidden = torch.empty_like(hidden)
            # Accumulated over chunks in float32 at least: bf16 partial sums would drift.
            # Empty, not zeros: the first chunk writes it (beta 0), later ones add.
            self.grad_weight = torch.empty(weight.shape, dtype=self.acc, device=weight.device)
            self._first = True
            self.grad_bias = torch.zeros(weight.shape[0] if bias is not None else 0,
                                         dtype=self.acc, device=weight.device)

    def ranges(self):
        """ceil(N / chunk_size) chunks of near-equal size (rounded up to a
        multiple of 128 rows where N allows), so no thin tail chunk runs a
        slow skinny matmul."""
        N = self.hidden.shape[0]
        count = max(1, -(-N // max(self.chunk_size, 1)))
        size = -(-N // count)
        rounded = min(-(-size // 128) * 128, max(self.chunk_size, 1))
        # Keep the multiple of 128 only if the tail stays at least half a chunk.
        if size > 128 and rounded >= size and 2 * (N - (-(-N // rounded) - 1) * rounded) >= rounded:
            return ((start, min(start + rounded, N)) for start in range(0, N, rounded))
        return ((i * N // count, (i + 1) * N // count) for i in range(count) if N)

    def logits(self, start, end):
        h = self.hidden[start:end]
        return torch.addmm(self.bias, h, self.weight.t()) if self.bias is not None else h @ self.weight.t()

    def add_gradient(self, start, end, logits, tokens, grad_logprobs, grad_entropy, lse, entropy,
                     temperature):
        """Writes d loss / d logits over ``logits`` (a dead temporary of ours:
        no second (chunk, V) buffer), then accumulates its products. Rows whose
        upstream gradients are both exactly 0 (clipped tokens without KL or
        entropy terms) have a zero row of d logits: when enough of them are in
        the chunk, the kept rows are gathered and the zero ones skip both
        products."""
        h = self.hidden[start:end]
        live = (grad_logprobs != 0) | (grad_entropy != 0)
        kept = _rows_worth_skipping(live)
        if kept is not None:
            self.grad_hidden[start:end] = 0
            if kept.numel() == 0:
                return  # nothing to add (a first chunk leaves the accumulator to the next)
            logits, h = logits.index_select(0, kept), h.index_select(0, kept)
            grad_logprobs, grad_entropy = grad_logprobs[kept], grad_entropy[kept]
            tokens, lse, entropy = tokens[kept], lse[kept], entropy[kept]
        self.vocab_backward_in_place(grad_logprobs, grad_entropy, logits, tokens, lse, entropy,
                                     temperature)
        grad_logits = logits
        # Not mm(out=grad_hidden[start:end]): for bf16 on CPU that left the view
        # unwritten (seen with torch 2.13), and the (chunk, H) temporary is small.
        if kept is None:
            self.grad_hidden[start:end] = grad_logits @ self.weight
            # A zero row of d logits times a NaN hidden row (padding a raw-op
            # caller left in) would still be NaN in d weight: zero those rows.
            h = torch.where(live[:, None], h, 0)
        else:
            self.grad_hidden[start:end].index_copy_(0, kept, grad_logits @ self.weight)
        first, self._first = self._first, False
        if first and grad_logits.dtype != self.acc and not _float32_output_gemm(grad_logits.device):
            # The empty accumulator is written, not added to (no zero fill).
            self.grad_weight.copy_(grad_logits.t() @ h)
        elif grad_logits.dtype == self.acc:
            self.grad_weight.addmm_(grad_logits.t(), h, beta=0 if first else 1)
        elif _float32_output_gemm(grad_logits.device):
            # bf16/fp16 operands accumulated straight into the float32 buffer:
            # no (V, H) product in the low precision and no float32 copy of it.
            torch.addmm(self.grad_weight, grad_logits.t(), h, out_dtype=self.acc,
                        beta=0 if first else 1, out=self.grad_weight)
        else:
            self.grad_weight += (grad_logits.t() @ h).to(self.acc)
        if self.bias is not None:
            self.grad_bias += grad_logits.sum(0, dtype=self.acc)

    def grads(self):
        if self._first:  # no rows, so no chunk wrote the accumulator
            self.grad_weight.zero_()
        return (self.grad_hidden, self.grad_weight.to(self.weight.dtype),
                self.grad_bias.to(self.weight.dtype))


def fused_linear_policy_loss_forward(hidden, weight, bias, tokens, weights, advantages,
                                     old_logprobs, ref_logprobs, clip_low, clip_high,
                                     clip_ratio_c, kl_coef, entropy_coef, temperature,
                                     chunk_size, vocab_impl):
    """hidden: (N, H), weight: (V, H), bias: (V,) or None, tokens/weights/advantages/
    old/ref: (N,). Returns loss (), logprobs (N,), entropy (N,), grad_hidden (N, H),
    grad_weight (V, H), grad_bias (V,) (empty without bias): the gradients of loss."""
    op = "fused_linear_policy_loss"
    _check_rows(op, hidden, weight, bias, tokens, temperature, chunk_size, vocab_impl,
                dict(weights=weights, advantages=advantages, old_logprobs=old_logprobs,
                     ref_logprobs=ref_logprobs), optional=("old_logprobs", "ref_logprobs"))
    clip_low, clip_high, clip_ratio_c, kl_coef, entropy_coef, temperature = v.check_loss_scalars(
        clip_low, clip_high, clip_ratio_c, kl_coef, entropy_coef, temperature, op=op)
    whole_op = backends.BACKENDS[vocab_impl].fused_linear
    if whole_op is not None and hidden.dtype != torch.float64:
        return whole_op(hidden, weight, bias, tokens, weights, advantages, old_logprobs,
                        ref_logprobs, clip_low, clip_high, clip_ratio_c, kl_coef, entropy_coef,
                        temperature, chunk_size)
    chunks = _Chunks(hidden, weight, bias, chunk_size, vocab_impl, with_grads=True)
    N, acc = hidden.shape[0], chunks.acc
    logprobs = hidden.new_empty((N,), dtype=acc)
    entropy = hidden.new_empty((N,), dtype=acc)
    loss = torch.zeros((), dtype=acc, device=hidden.device)
    row_math = _row_math(hidden.device)
    for start, end in chunks.ranges():
        logits = chunks.logits(start, end)
        lp, ent, lse = chunks.vocab_forward(logits, tokens[start:end], temperature)
        part, grad_lp, grad_ent = row_math(
            lp, ent, weights[start:end], advantages[start:end],
            None if old_logprobs is None else old_logprobs[start:end],
            None if ref_logprobs is None else ref_logprobs[start:end],
            clip_low, clip_high, clip_ratio_c, kl_coef, entropy_coef)
        # The aggregation weights are known up front, so the chunk's gradient is
        # finished here, in the forward: backward only scales it.
        chunks.add_gradient(start, end, logits, tokens[start:end], grad_lp, grad_ent, lse, ent,
                            temperature)
        del logits
        logprobs[start:end] = lp
        entropy[start:end] = ent
        loss += part
    return (loss, logprobs, entropy, *chunks.grads())


def fused_linear_logprob_entropy_forward(hidden, weight, bias, tokens, temperature, chunk_size,
                                         vocab_impl):
    """hidden: (N, H), weight: (V, H), bias: (V,) or None, tokens: (N,). Returns
    logprobs, entropy, lse: (N,) float32 (float64 for float64 hidden) of
    softmax((hidden @ weight.T + bias) / temperature), one chunk of logits at a time."""
    _check_rows("fused_linear_logprob_entropy", hidden, weight, bias, tokens, temperature,
                chunk_size, vocab_impl, {})
    chunks = _Chunks(hidden, weight, bias, chunk_size, vocab_impl, with_grads=False)
    N = hidden.shape[0]
    logprobs, entropy, lse = (hidden.new_empty((N,), dtype=chunks.acc) for _ in range(3))
    for start, end in chunks.ranges():
        lp, ent, chunk_lse = chunks.vocab_forward(chunks.logits(start, end), tokens[start:end],
                                                  temperature)
        logprobs[start:end], entropy[start:end], lse[start:end] = lp, ent, chunk_lse
    return logprobs, entropy, lse


def fused_linear_logprob_entropy_backward(grad_logprobs, grad_entropy, hidden, weight, bias,
                                          tokens, lse, entropy, temperature, chunk_size,
                                          vocab_impl):
    """The gradients (grad_hidden (N, H), grad_weight (V, H), grad_bias (V,),
    empty without bias) of sum(grad_logprobs * logprobs + grad_entropy *
    entropy), recomputing each chunk's logits from hidden and weight and its
    softmax from the saved lse: nothing of size N * V was kept."""
    _check_rows("fused_linear_logprob_entropy_backward", hidden, weight, bias, tokens,
                temperature, chunk_size, vocab_impl,
                dict(grad_logprobs=grad_logprobs, grad_entropy=grad_entropy, lse=lse,
                     entropy=entropy))
    chunks = _Chunks(hidden, weight, bias, chunk_size, vocab_impl, with_grads=True)
    acc = chunks.acc
    for start, end in chunks.ranges():
        rows = slice(start, end)
        chunks.add_gradient(start, end, chunks.logits(start, end), tokens[rows],
                            grad_logprobs[rows].to(acc), grad_entropy[rows].to(acc),
                            lse[rows].to(acc), entropy[rows].to(acc), temperature)
    return chunks.grads()


# One Python implementation for every device (it composes the backend's
# per-device ops); schemas, fakes and autograd formulas are in ops.py.
for _name, _implementation in (
        ("fused_linear_policy_loss", fused_linear_policy_loss_forward),
        ("fused_linear_logprob_entropy", fused_linear_logprob_entropy_forward),
        ("fused_linear_logprob_entropy_backward", fused_linear_logprob_entropy_backward)):
    ops.LIBRARY.impl(_name, _implementation, "CompositeExplicitAutograd")
