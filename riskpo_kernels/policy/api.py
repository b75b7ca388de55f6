"""Public policy-loss function: checks, implementation choice, output."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .. import _validation as v
from .. import backends
from ..ops import gradients_or_zeros, refuse_double_backward
from .aggregation import aggregation_weights, check_aggregation
from .fused_linear import check_linear, default_chunk_size
from .reference import logprobs_and_entropy_reference, token_policy_loss


@dataclass(frozen=True)
class PolicyLossOutput:
    """loss: scalar, differentiable. logprobs, entropy: (B, T) float32 (float64
    for float64 logits), detached. metrics: 0-d tensors clipfrac, clipfrac_lower,
    approx_kl, entropy, and kl when reference log-probs are given."""

    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    metrics: dict = field(default_factory=dict)


def _check_token_tensor(name, t, shape, device):
    v.check_tensor(name, t)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but logits is on {device}")


def _resolve(impl, device):
    """auto: Triton on CUDA, C++ on CPU, the reference where neither is built
    (backends.py)."""
    return backends.resolve(impl, device, backends.POLICY, "logits")


def _checked_tokens(tokens, B, T, V, device):
    """tokens: (B, T) int64/int32 on ``device`` -> int64, the range checked where
    that costs no device sync."""
    _check_token_tensor("tokens", tokens, (B, T), device)
    if tokens.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"tokens must be int64 (or int32), got {tokens.dtype}")
    tokens = tokens.long()
    # Out-of-range ids would index outside a row. Checking costs a sync on GPU,
    # so there the kernels' callers must pass valid ids (the C++ op checks too).
    v.check_token_range(tokens, V)
    return tokens


def _check_mask(mask, B, T, device):
    """mask: (B, T) bool or float, finite and >= 0 (where that costs no sync)."""
    _check_token_tensor("mask", mask, (B, T), device)
    if not (mask.dtype == torch.bool or mask.is_floating_point()):
        raise ValueError(f"mask must be bool or floating point, got {mask.dtype}")
    v.check_mask_values(mask)


@dataclass(frozen=True)
class _LossArgs:
    tokens: torch.Tensor  # (B, T) int64
    clip_low: float
    clip_high: float
    clip_ratio_c: float
    kl_coef: float
    entropy_coef: float
    temperature: float
    agg: str
    loss_scale_factor: float | None

    def loss_options(self) -> dict:
        """The keywords token_policy_loss takes after the per-token inputs."""
        return dict(clip_low=self.clip_low, clip_high=self.clip_high, clip_ratio_c=self.clip_ratio_c,
                    kl_coef=self.kl_coef, entropy_coef=self.entropy_coef, agg=self.agg,
                    loss_scale_factor=self.loss_scale_factor)


def _check_loss_args(B, T, V, device, tokens, mask, advantages, old_logprobs, ref_logprobs,
                     clip_low, clip_high, clip_ratio_c, kl_coef, entropy_coef, temperature,
                     agg, loss_scale_factor) -> _LossArgs:
    """The checks shared by both loss paths; each error names its argument."""
    tokens = _checked_tokens(tokens, B, T, V, device)
    _check_mask(mask, B, T, device)
    if not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) not in ((B,), (B, T)):
        shape = tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else type(advantages).__name__
        raise ValueError(f"advantages must be (B,) = ({B},) or (B, T) = ({B}, {T}), got {shape}")
    _check_token_tensor("advantages", advantages, advantages.shape, device)
    v.check_float_tensor("advantages", advantages)
    for name, t in (("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if t is not None:
            _check_token_tensor(name, t, (B, T), device)
            v.check_float_tensor(name, t)
    clip_low, clip_high, clip_ratio_c, kl_coef, entropy_coef, temperature = v.check_loss_scalars(
        clip_low, clip_high, clip_ratio_c, kl_coef, entropy_coef, temperature)
    agg, loss_scale_factor = check_aggregation(agg, loss_scale_factor)
    return _LossArgs(tokens, clip_low, clip_high, clip_ratio_c, kl_coef, entropy_coef, temperature,
                     agg, loss_scale_factor)


class _GradientOverLogits(torch.autograd.Function):
    """A backend's vocabulary forward whose backward writes d loss / d logits over
    the logits themselves and hands them on as the gradient: no (N, V) buffer of
    its own (``policy_loss(inplace_backward=True)``; Liger's default)."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature, vocab):
        logprobs, entropy, lse = vocab.op("forward")(logits, tokens, temperature)
        ctx.save_for_backward(logits, tokens, lse, entropy)
        ctx.temperature, ctx.vocab = temperature, vocab
        ctx.mark_non_differentiable(lse)
        return logprobs, entropy, lse

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
        refuse_double_backward("policy_loss")
        logits, tokens, lse, entropy = ctx.saved_tensors
        grad_logprobs, grad_entropy = gradients_or_zeros(lse, grad_logprobs, grad_entropy)
        ctx.vocab.op("backward_in_place")(grad_logprobs, grad_entropy, logits, tokens, lse, entropy,
                                          ctx.temperature)
        return logits, None, None, None


def policy_loss(logits, tokens, mask, advantages, *, old_logprobs=None, ref_logprobs=None,
                clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0, kl_coef=0.0, entropy_coef=0.0,
                temperature=1.0, agg="token-mean", loss_scale_factor=None, impl="auto",
                inplace_backward=False) -> PolicyLossOutput:
    """PPO-clip policy loss of RiskPO / GRPO (RISKPO_SPEC.md section 8), per token::

        logp  = log_softmax(logits / T)[y],   H = entropy(softmax(logits / T))
        ratio = exp(clamp(logp - old, -20, 20))
        l     = max(-A ratio, -A clamp(ratio, 1 - clip_low, 1 + clip_high))
        l     = min(l, -A clip_ratio_c)        where A < 0 (dual clip)
        l    += kl_coef (exp(ref - logp) - (ref - logp) - 1) - entropy_coef H

    aggregated over the mask by ``agg``: verl 0.9.1's token-mean, token-sum,
    seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm (divided by
    ``loss_scale_factor``, or the padded length T when None), or TRL's grpo and
    dr_grpo as trl-grpo and trl-dr-grpo (policy/aggregation.py has each formula).

    logits: (B, T, V); tokens: (B, T) int64 in [0, V); mask: (B, T) bool or
    float; advantages: (B,) or (B, T); old_logprobs, ref_logprobs: (B, T) or None.
    The vocabulary-sized work runs in one pass forward and one backward
    (``impl="triton"`` on CUDA, ``"cpp"`` on CPU; ``"auto"`` picks by device);
    nothing of size B*T*V is saved for backward, and the logits are never
    written, unless ``inplace_backward=True``: then the backward writes the
    gradient over the caller's (contiguous) logits and hands them on as their
    gradient, saving one (B, T, V) buffer. Opt in only when nothing else reads
    those logits after the loss (their values become the gradient; autograd
    raises if another op saved them for its backward).
    """
    v.check_tensor("logits", logits, dtypes="float")
    if logits.dim() != 3:
        raise ValueError(f"logits must be (B, T, V), got shape {tuple(logits.shape)}")
    B, T, V = logits.shape
    if V < 1:
        raise ValueError("logits has an empty vocabulary (V = 0)")
    args = _check_loss_args(B, T, V, logits.device, tokens, mask, advantages, old_logprobs,
                            ref_logprobs, clip_low, clip_high, clip_ratio_c, kl_coef,
                            entropy_coef, temperature, agg, loss_scale_factor)
    backend = _resolve(impl, logits.device)
    inplace_backward = v.check_bool("inplace_backward", inplace_backward)
    if inplace_backward and not logits.is_contiguous():
        raise ValueError("inplace_backward=True writes the gradient over logits, which must be "
                         f"contiguous; got strides {logits.stride()}")

    flat_logits, flat_tokens = logits.reshape(B * T, V), args.tokens.reshape(B * T)
    if backend.vocab is None:  # the reference: log_softmax, differentiated by autograd
        # A NaN logit in a masked row makes log_softmax's backward NaN on that
        # row even for a zero upstream gradient; routing masked rows through a
        # detached copy keeps the values and gives them the kernels' exact 0.
        active = (mask != 0).reshape(B * T, 1)
        flat_logits = torch.where(active, flat_logits, flat_logits.detach())
        logprobs, entropy = logprobs_and_entropy_reference(flat_logits, flat_tokens, args.temperature)
    elif inplace_backward and torch.is_grad_enabled() and logits.requires_grad:
        logprobs, entropy, _ = _GradientOverLogits.apply(flat_logits, flat_tokens, args.temperature,
                                                         backend.vocab)
    else:
        logprobs, entropy, _ = backend.vocab.op("forward")(flat_logits, flat_tokens, args.temperature)
    logprobs, entropy = logprobs.view(B, T), entropy.view(B, T)
    loss, metrics = token_policy_loss(logprobs, entropy, mask, advantages, old_logprobs,
                                      ref_logprobs, **args.loss_options())
    return PolicyLossOutput(loss, logprobs.detach(), entropy.detach(), metrics)


def _check_linear(hidden, weight, bias) -> tuple[int, int, int, int]:
    """(B, T, H, V) of ``hidden @ weight.T + bias``, every argument checked."""
    H, V = check_linear(hidden, weight, bias)
    B, T, _ = hidden.shape
    return B, T, H, V


def _fused_linear_auto(backend, device):
    """impl="auto" of the fused loss: backends.FUSED_LINEAR_AUTO's entry for the
    device type where it can run, else the family's auto choice."""
    name = backends.FUSED_LINEAR_AUTO.get(device.type)
    if name is not None and backend.vocab is not None and backends.BACKENDS[name].unavailable() is None:
        return backends.BACKENDS[name]
    return backend


class _ActiveRows:
    """Which rows the fused ops compute: those with ``active`` True (a non-zero
    mask, or a non-zero aggregation weight). Masked rows never enter a product
    or a vocabulary pass: their hidden states are gathered away and their
    gradient is exactly 0, whatever they hold (NaN included).

    Gathering needs the row count on the host (a sync on CUDA). Where no sync is
    allowed (``torch.compile`` tracing, CUDA graph capture) every row is
    computed instead, with the masked rows' hidden states replaced by zeros
    (so a NaN there cannot reach the weight's gradient). The outputs at masked
    positions are 0 either way."""

    def __init__(self, active: torch.Tensor):
        self.active = active                      # (N,) bool
        self.count = active.shape[0]
        capturing = active.is_cuda and torch.cuda.is_current_stream_capturing()
        if torch.compiler.is_compiling() or capturing:
            self.rows, self.all = None, False     # dense, masked rows zeroed
        else:
            rows = active.nonzero().squeeze(1)    # host sync on CUDA
            self.all = rows.numel() == self.count
            self.rows = None if self.all else rows

    def hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (N, H) -> the rows to compute (M, H), differentiable."""
        if self.all:
            return hidden
        if self.rows is None:
            return torch.where(self.active[:, None], hidden, 0)
        return hidden.index_select(0, self.rows)

    def take(self, t):
        """A per-row (N,) tensor (or None) -> its computed rows."""
        if t is None or self.rows is None:
            return t
        return t.index_select(0, self.rows)

    def spread(self, values: torch.Tensor) -> torch.Tensor:
        """Per-row results of the computed rows -> (N,), 0 at masked rows
        (differentiable)."""
        if self.all:
            return values
        if self.rows is None:
            return torch.where(self.active, values, 0)
        return values.new_zeros(self.count).index_copy(0, self.rows, values)


def fused_linear_policy_loss(hidden, weight, tokens, mask, advantages, *, bias=None,
                             chunk_size=None, old_logprobs=None, ref_logprobs=None,
                             clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0, kl_coef=0.0,
                             entropy_coef=0.0, temperature=1.0, agg="token-mean",
                             loss_scale_factor=None, impl="auto") -> PolicyLossOutput:
    """:func:`policy_loss` of ``logits = hidden @ weight.T + bias`` without ever
    holding the (B, T, V) logits: chunks of ``chunk_size`` tokens go through the
    matmul, the vocabulary kernels and the gradient in the forward pass, so peak
    extra memory is O(chunk_size * V). The loss is differentiable w.r.t. hidden,
    weight and bias.

    Only tokens with a non-zero mask are computed: the others are gathered away
    before the first matmul (their ``logprobs`` and ``entropy`` are 0, their
    gradient exactly 0 even if their hidden state is NaN), and within a chunk
    the rows whose gradient is exactly 0 (clipped tokens without KL or entropy
    terms) skip both backward products when there are enough of them. On CUDA
    counting the valid rows costs one host sync per call; under
    ``torch.compile`` or CUDA graph capture every row is computed instead.

    hidden: (B, T, H); weight: (V, H) (an lm_head); bias: (V,) or None; the other
    arguments as in :func:`policy_loss`. ``impl="reference"`` materialises the
    logits and runs the reference (the oracle).
    """
    B, T, H, V = _check_linear(hidden, weight, bias)
    if chunk_size is not None:
        chunk_size = v.check_int("chunk_size", chunk_size, 1)
    args = _check_loss_args(B, T, V, hidden.device, tokens, mask, advantages, old_logprobs,
                            ref_logprobs, clip_low, clip_high, clip_ratio_c, kl_coef,
                            entropy_coef, temperature, agg, loss_scale_factor)
    backend = _resolve(impl, hidden.device)
    if impl == "auto":
        backend = _fused_linear_auto(backend, hidden.device)
    N = B * T
    if backend.vocab is None:
        # The oracle of the contract above: masked rows' hidden states zeroed
        # (a NaN there must not reach weight.grad), their outputs 0.
        active = (mask != 0).reshape(N)
        logits = torch.nn.functional.linear(
            torch.where(active.view(B, T, 1), hidden, 0), weight, bias)
        out = policy_loss(logits, args.tokens, mask, advantages, old_logprobs=old_logprobs,
                          ref_logprobs=ref_logprobs, temperature=args.temperature,
                          impl="reference", **args.loss_options())
        zero = ~active.view(B, T)
        return PolicyLossOutput(out.loss, out.logprobs.masked_fill(zero, 0),
                                out.entropy.masked_fill(zero, 0), out.metrics)

    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    weights = aggregation_weights(mask, args.agg, args.loss_scale_factor).to(acc).reshape(N)
    A = advantages.to(acc)
    A = (A[:, None].expand(B, T) if A.dim() == 1 else A).reshape(N)
    old = None if old_logprobs is None else old_logprobs.to(acc).reshape(N)
    ref = None if ref_logprobs is None else ref_logprobs.to(acc).reshape(N)
    # A row of aggregation weight 0 contributes nothing to the loss or its gradient.
    rows = _ActiveRows(weights != 0)
    M = rows.count if rows.rows is None else rows.rows.numel()
    if chunk_size is None:
        chunk_size = default_chunk_size(M, V, hidden.device, hidden.element_size())
    loss, logprobs, entropy, *_ = torch.ops.riskpo.fused_linear_policy_loss(
        rows.hidden(hidden.reshape(N, H)), weight, bias, rows.take(args.tokens.reshape(N)),
        rows.take(weights), rows.take(A), rows.take(old), rows.take(ref),
        args.clip_low, args.clip_high, args.clip_ratio_c, args.kl_coef, args.entropy_coef,
        args.temperature, chunk_size, backend.name)
    logprobs, entropy = rows.spread(logprobs).view(B, T), rows.spread(entropy).view(B, T)
    with torch.no_grad():  # the metrics are cheap O(B*T) functions of the detached values
        _, metrics = token_policy_loss(logprobs, entropy, mask, advantages, old_logprobs,
                                       ref_logprobs, **args.loss_options())
    return PolicyLossOutput(loss, logprobs, entropy, metrics)


def fused_linear_logprobs(hidden, weight, tokens, *, bias=None, mask=None, temperature=1.0,
                          chunk_size=None, impl="auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of ``tokens`` and entropies under
    ``softmax(z)``, ``z = (hidden @ weight.T + bias) / temperature``, chunk by
    chunk, never holding the (B, T, V) logits::

        logprobs = z[tokens] - logsumexp(z),   entropy = -sum softmax(z) log softmax(z)

    hidden: (B, T, H); weight: (V, H); bias: (V,) or None; tokens: (B, T) in [0, V);
    mask: (B, T) bool or float, or None (every position). Returns logprobs,
    entropy: (B, T) float32 (float64 for float64 hidden), differentiable w.r.t.
    hidden, weight and bias: the backward takes (d logprobs, d entropy) and
    recomputes each chunk's logits from the saved inputs and one log-sum-exp per
    token (``riskpo::fused_linear_logprob_entropy``). With a mask, only its
    non-zero positions are computed; both outputs are 0 elsewhere and no
    gradient reaches those rows (on CUDA counting them costs one host sync; under
    ``torch.compile`` or CUDA graph capture every row is computed, the masked
    ones from zeroed hidden states). Under ``torch.no_grad()`` (old and
    reference log-probs) nothing is saved. Peak extra memory is one
    (chunk_size, V) block of logits, forward and backward.
    ``impl="reference"`` materialises the logits (the oracle).
    """
    B, T, H, V = _check_linear(hidden, weight, bias)
    tokens = _checked_tokens(tokens, B, T, V, hidden.device)
    if mask is not None:
        _check_mask(mask, B, T, hidden.device)
    temperature = v.check_temperature(temperature)
    N = B * T
    if chunk_size is not None:
        chunk_size = v.check_int("chunk_size", chunk_size, 1)
    backend = _resolve(impl, hidden.device)
    flat_hidden, flat_tokens = hidden.reshape(N, H), tokens.reshape(N)
    if backend.vocab is None:
        if mask is not None:  # the oracle: masked rows from zeroed hidden states, outputs 0
            active = (mask != 0).reshape(N)
            flat_hidden = torch.where(active[:, None], flat_hidden, 0)
        logprobs, entropy = logprobs_and_entropy_reference(
            torch.nn.functional.linear(flat_hidden, weight, bias), flat_tokens, temperature)
        if mask is not None:
            logprobs, entropy = (torch.where(active, x, 0) for x in (logprobs, entropy))
        return logprobs.view(B, T), entropy.view(B, T)
    rows = None if mask is None else _ActiveRows((mask != 0).reshape(N))
    if rows is not None:
        flat_hidden, flat_tokens = rows.hidden(flat_hidden), rows.take(flat_tokens)
    if chunk_size is None:
        chunk_size = default_chunk_size(flat_hidden.shape[0], V, hidden.device,
                                        hidden.element_size())
    logprobs, entropy, _ = torch.ops.riskpo.fused_linear_logprob_entropy(
        flat_hidden, weight, bias, flat_tokens, temperature, chunk_size, backend.name)
    if rows is not None:
        logprobs, entropy = rows.spread(logprobs), rows.spread(entropy)
    return logprobs.view(B, T), entropy.view(B, T)
