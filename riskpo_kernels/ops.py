"""Schemas of every ``torch.ops.riskpo.*`` op, in one place, each with its fake
(shapes and dtypes only) and, for the differentiable ones, its autograd formula.

Implementations register themselves beside their kernels, for these schemas:
the C++/CUDA kernels in ``csrc/*/*_api.cpp`` (so the ops exist, and trace under
``torch.compile``, even when the extension is missing), the fused-linear ops in
``policy/fused_linear.py`` and the Triton ops in ``policy/triton_ops.py``. This
module imports none of them: importing it defines the ops and nothing else.
"""

from __future__ import annotations

import torch

from .common import accumulation_dtype

LIBRARY = torch.library.Library("riskpo", "DEF")

SCHEMAS = {
    # Defaults are the public functions' (risk_core/api.py, policy/api.py), so
    # that a keyword call of an op equals the function with the same options
    # (tests/test_raw_ops.py). torch.library takes defaults only on trailing
    # arguments; the backward ops and the fused-linear ops get none (see there).
    # Mixed-VaR bundle advantages (RISKPO_SPEC.md sections 2-5). rewards: (P * n,).
    # Returns advantages (P * n,) in the rewards' dtype, and bundle_scores
    # (num_bundles, n), q_lo and q_hi (num_bundles,) in the accumulation dtype.
    # None for a tracked quantile is batch quantiles; None for a baseline is 0.
    "mvar_advantages": (
        "(Tensor rewards, int group_size, int bundle_size=5, float alpha=0.2, float beta=0.8, "
        "float w_low=1.5, float w_high=0., str quantile_mode=\"batch\", Tensor? q_lo_track=None, "
        "Tensor? q_hi_track=None, str credit=\"uniform\", bool normalize_std=True, "
        "bool natural_baseline=True, Tensor? base_mid=None, Tensor? base_low=None, "
        "float eps=1e-06) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    # GRPO group advantages (section 7). rewards: (P * n,) -> (P * n,).
    "grpo_advantages": (
        "(Tensor rewards, int group_size, bool normalize_std=True, float eps=1e-06) -> Tensor"
    ),
    # Policy loss, vocabulary part (section 8). logits: (N, V), tokens: (N,) int64.
    # One pass per row: log-prob of the target, entropy, log-sum-exp of
    # softmax(logits / temperature), each (N,) float32 (float64 for float64 logits).
    "token_logprob_entropy": (
        "(Tensor logits, Tensor tokens, float temperature=1.) -> (Tensor, Tensor, Tensor)"
    ),
    # Its backward: d(loss)/d(logits) (N, V) in the logits' dtype, recomputing the
    # softmax from the saved log-sum-exp (nothing of size N * V is saved). No
    # default temperature: one that differed from the forward's would be a
    # silently wrong gradient.
    "token_logprob_entropy_backward": (
        "(Tensor grad_logprobs, Tensor grad_entropy, Tensor logits, Tensor tokens, Tensor lse, "
        "Tensor entropy, float temperature) -> Tensor"
    ),
    # The same gradient written over the logits, which must be contiguous: for a
    # caller whose logits are its own temporary (the fused-linear chunk). C++ only.
    "token_logprob_entropy_backward_": (
        "(Tensor grad_logprobs, Tensor grad_entropy, Tensor(a!) logits, Tensor tokens, "
        "Tensor lse, Tensor entropy, float temperature) -> ()"
    ),
    # Fused linear policy loss: hidden (N, H), weight (V, H), bias (V,)?, per-token
    # tokens, aggregation weights, advantages, old/ref log-probs (N,). Chunks of
    # chunk_size rows; the gradients are finished in forward and returned:
    # loss (), logprobs (N,), entropy (N,), grad_hidden (N, H), grad_weight (V, H),
    # grad_bias (V,) (empty without bias). vocab_impl: "cpp" or "triton". No
    # defaults: chunk_size and vocab_impl come last and have none that holds on
    # every device (the public function picks both per device).
    "fused_linear_policy_loss": (
        "(Tensor hidden, Tensor weight, Tensor? bias, Tensor tokens, Tensor weights, "
        "Tensor advantages, Tensor? old_logprobs, Tensor? ref_logprobs, float clip_low, "
        "float clip_high, float clip_ratio_c, float kl_coef, float entropy_coef, "
        "float temperature, int chunk_size, str vocab_impl) "
        "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    # Log-probs and entropies of softmax((hidden @ weight.T + bias) / temperature),
    # differentiable: hidden (N, H), weight (V, H), bias (V,)?, tokens (N,) ->
    # logprobs, entropy, lse (N,), float32 (float64 for float64 hidden), chunk by
    # chunk (verl's fused-kernel contract, for trainers that compute their own loss).
    "fused_linear_logprob_entropy": (
        "(Tensor hidden, Tensor weight, Tensor? bias, Tensor tokens, float temperature, "
        "int chunk_size, str vocab_impl) -> (Tensor, Tensor, Tensor)"
    ),
    # Its backward: grad_hidden (N, H), grad_weight (V, H), grad_bias (V,) (empty
    # without bias), each chunk's logits recomputed, its softmax from the saved lse.
    "fused_linear_logprob_entropy_backward": (
        "(Tensor grad_logprobs, Tensor grad_entropy, Tensor hidden, Tensor weight, Tensor? bias, "
        "Tensor tokens, Tensor lse, Tensor entropy, float temperature, int chunk_size, "
        "str vocab_impl) -> (Tensor, Tensor, Tensor)"
    ),
}

for _name, _schema in SCHEMAS.items():
    LIBRARY.define(_name + _schema)


def _check_fake_devices(op: str, primary_name: str, primary: torch.Tensor, **others) -> None:
    """Every tensor argument on the primary's device. A fake is also the op's
    Meta kernel, which the dispatcher picks when any argument is a meta tensor:
    without this check a CPU call with one meta argument returned the fake's
    uninitialised CPU memory as its result."""
    for name, tensor in others.items():
        if tensor is not None:
            torch._check(tensor.device == primary.device,
                         lambda: f"{op}: {name} is on {tensor.device} but {primary_name} is on "
                                 f"{primary.device}")


def gradients_or_zeros(like: torch.Tensor, *grads):
    """The upstream gradients of an op's per-row outputs, zeros for those autograd
    passes as None (an output the loss did not use)."""
    return tuple(torch.zeros_like(like) if g is None else g for g in grads)


def refuse_double_backward(public_name: str) -> None:
    """Raised from a backward run with ``create_graph=True`` (autograd runs
    backward in grad mode exactly then): these backwards are closed forms
    computed below autograd, so a second derivative through them would be
    silently wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{public_name}: double backward (a gradient taken with create_graph=True, e.g. a "
            f"gradient penalty) is not supported by its kernels; take the first gradient "
            f"without create_graph, or pass impl='reference', which autograd differentiates "
            f"twice")


def _check_fake_rewards(op: str, rewards: torch.Tensor, group_size: int) -> None:
    torch._check(rewards.dim() == 1, lambda: f"{op}: rewards must be 1-D, got {tuple(rewards.shape)}")
    torch._check(group_size >= 1, lambda: f"{op}: group_size must be >= 1, got {group_size}")


@torch.library.register_fake("riskpo::mvar_advantages")
def _mvar_advantages_fake(rewards, group_size, bundle_size=5, alpha=0.2, beta=0.8, w_low=1.5,
                          w_high=0.0, quantile_mode="batch", q_lo_track=None, q_hi_track=None,
                          credit="uniform", normalize_std=True, natural_baseline=True,
                          base_mid=None, base_low=None, eps=1e-6):
    # The schema's defaults: the dispatcher drops trailing arguments equal to
    # their defaults before calling a Python kernel (this fake included).
    _check_fake_rewards("mvar_advantages", rewards, group_size)
    _check_fake_devices("mvar_advantages", "rewards", rewards, q_lo_track=q_lo_track,
                        q_hi_track=q_hi_track, base_mid=base_mid, base_low=base_low)
    torch._check(bundle_size >= 1,
                 lambda: f"mvar_advantages: bundle_size must be >= 1, got {bundle_size}")
    num_prompts = rewards.shape[0] // group_size
    num_bundles = -(-num_prompts // bundle_size)
    acc = accumulation_dtype(rewards.dtype)
    return (
        rewards.new_empty(rewards.shape),
        rewards.new_empty((num_bundles, group_size), dtype=acc),
        rewards.new_empty((num_bundles,), dtype=acc),
        rewards.new_empty((num_bundles,), dtype=acc),
    )


@torch.library.register_fake("riskpo::grpo_advantages")
def _grpo_advantages_fake(rewards, group_size, normalize_std=True, eps=1e-6):
    _check_fake_rewards("grpo_advantages", rewards, group_size)
    return rewards.new_empty(rewards.shape)


@torch.library.register_fake("riskpo::token_logprob_entropy")
def _token_logprob_entropy_fake(logits, tokens, temperature=1.0):
    torch._check(logits.dim() == 2, lambda: f"logits must be (N, V), got {tuple(logits.shape)}")
    _check_fake_devices("token_logprob_entropy", "logits", logits, tokens=tokens)
    acc = accumulation_dtype(logits.dtype)
    rows = logits.shape[0]
    return (logits.new_empty((rows,), dtype=acc), logits.new_empty((rows,), dtype=acc),
            logits.new_empty((rows,), dtype=acc))


@torch.library.register_fake("riskpo::token_logprob_entropy_backward")
def _token_logprob_entropy_backward_fake(grad_logprobs, grad_entropy, logits, tokens, lse, entropy,
                                         temperature):
    _check_fake_devices("token_logprob_entropy_backward", "logits", logits,
                        grad_logprobs=grad_logprobs, grad_entropy=grad_entropy, tokens=tokens,
                        lse=lse, entropy=entropy)
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("riskpo::token_logprob_entropy_backward_")
def _token_logprob_entropy_backward_inplace_fake(grad_logprobs, grad_entropy, logits, tokens,
                                                 lse, entropy, temperature):
    _check_fake_devices("token_logprob_entropy_backward_", "logits", logits,
                        grad_logprobs=grad_logprobs, grad_entropy=grad_entropy, tokens=tokens,
                        lse=lse, entropy=entropy)
    return None


@torch.library.register_fake("riskpo::fused_linear_policy_loss")
def _fused_linear_policy_loss_fake(hidden, weight, bias, tokens, weights, advantages, old_logprobs,
                                   ref_logprobs, clip_low, clip_high, clip_ratio_c, kl_coef,
                                   entropy_coef, temperature, chunk_size, vocab_impl):
    _check_fake_devices("fused_linear_policy_loss", "hidden", hidden, weight=weight, bias=bias,
                        tokens=tokens, weights=weights, advantages=advantages,
                        old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
    acc = accumulation_dtype(hidden.dtype)
    rows = hidden.shape[0]
    return (hidden.new_empty((), dtype=acc), hidden.new_empty((rows,), dtype=acc),
            hidden.new_empty((rows,), dtype=acc), torch.empty_like(hidden),
            torch.empty_like(weight), weight.new_empty((weight.shape[0] if bias is not None else 0,)))


def _fused_linear_setup(ctx, inputs, output):
    _, logprobs, entropy, grad_hidden, grad_weight, grad_bias = output
    ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    ctx.has_bias = inputs[2] is not None
    ctx.mark_non_differentiable(logprobs, entropy, grad_hidden, grad_weight, grad_bias)


def _fused_linear_backward(ctx, grad_loss, *_unused):
    # The forward already holds d loss / d inputs: backward only scales them.
    refuse_double_backward("fused_linear_policy_loss")
    grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
    # type(...) is float: under fake-tensor tracing (opcheck, AOTAutograd) item()
    # is a symbol, and the shortcut is not taken.
    if (grad_loss.device.type == "cpu" and not torch.compiler.is_compiling()
            and type(scalar := grad_loss.item()) is float and scalar == 1.0):
        # loss.backward(): hand over the buffers themselves. Autograd frees its
        # saved tensors before accumulating, so the weight's .grad can take the
        # (V, H) buffer instead of a copy. (On CUDA, checking would cost a sync.)
        return (grad_hidden, grad_weight, grad_bias if ctx.has_bias else None) + (None,) * 13
    scale = grad_loss.to(grad_hidden.dtype)
    return (grad_hidden * scale, grad_weight * scale,
            grad_bias * scale if ctx.has_bias else None) + (None,) * 13


torch.library.register_autograd("riskpo::fused_linear_policy_loss", _fused_linear_backward,
                                setup_context=_fused_linear_setup)


@torch.library.register_fake("riskpo::fused_linear_logprob_entropy")
def _fused_linear_logprob_entropy_fake(hidden, weight, bias, tokens, temperature, chunk_size,
                                       vocab_impl):
    _check_fake_devices("fused_linear_logprob_entropy", "hidden", hidden, weight=weight, bias=bias,
                        tokens=tokens)
    acc = accumulation_dtype(hidden.dtype)
    rows = hidden.shape[0]
    return tuple(hidden.new_empty((rows,), dtype=acc) for _ in range(3))


@torch.library.register_fake("riskpo::fused_linear_logprob_entropy_backward")
def _fused_linear_logprob_entropy_backward_fake(grad_logprobs, grad_entropy, hidden, weight, bias,
                                                tokens, lse, entropy, temperature, chunk_size,
                                                vocab_impl):
    _check_fake_devices("fused_linear_logprob_entropy_backward", "hidden", hidden,
                        grad_logprobs=grad_logprobs, grad_entropy=grad_entropy, weight=weight,
                        bias=bias, tokens=tokens, lse=lse, entropy=entropy)
    return (torch.empty_like(hidden), torch.empty_like(weight),
            weight.new_empty((weight.shape[0] if bias is not None else 0,)))


def _fused_linear_logprob_entropy_setup(ctx, inputs, output):
    hidden, weight, bias, tokens, temperature, chunk_size, vocab_impl = inputs
    _, entropy, lse = output
    # Saved: the inputs and two floats per row; backward recomputes the logits
    # chunk by chunk (storing them costs N * V).
    ctx.save_for_backward(hidden, weight, bias, tokens, lse, entropy)
    ctx.arguments = (temperature, chunk_size, vocab_impl)
    ctx.mark_non_differentiable(lse)


def _fused_linear_logprob_entropy_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    refuse_double_backward("fused_linear_logprobs")
    hidden, weight, bias, tokens, lse, entropy = ctx.saved_tensors
    grad_logprobs, grad_entropy = gradients_or_zeros(lse, grad_logprobs, grad_entropy)
    grad_hidden, grad_weight, grad_bias = torch.ops.riskpo.fused_linear_logprob_entropy_backward(
        grad_logprobs, grad_entropy, hidden, weight, bias, tokens, lse, entropy, *ctx.arguments)
    return grad_hidden, grad_weight, grad_bias if bias is not None else None, None, None, None, None


torch.library.register_autograd("riskpo::fused_linear_logprob_entropy",
                                _fused_linear_logprob_entropy_backward,
                                setup_context=_fused_linear_logprob_entropy_setup)


def _token_logprob_entropy_setup(ctx, inputs, output):
    logits, tokens, temperature = inputs
    _, entropy, lse = output
    # Saved: the input and two floats per row. The softmax is recomputed.
    ctx.save_for_backward(logits, tokens, lse, entropy)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(lse)


def _vocab_backward(backward_op_name):
    """The autograd formula of a log-prob/entropy op: its backward op, fed with
    zeros for an output that received no gradient."""
    def backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
        refuse_double_backward("policy_loss")
        logits, tokens, lse, entropy = ctx.saved_tensors
        grad_logprobs, grad_entropy = gradients_or_zeros(lse, grad_logprobs, grad_entropy)
        grad_logits = getattr(torch.ops.riskpo, backward_op_name)(
            grad_logprobs, grad_entropy, logits, tokens, lse, entropy, ctx.temperature)
        return grad_logits, None, None

    return backward


torch.library.register_autograd("riskpo::token_logprob_entropy",
                                _vocab_backward("token_logprob_entropy_backward"),
                                setup_context=_token_logprob_entropy_setup)


# The Triton vocabulary ops (section 8): ops of their own rather than a CUDA
# kernel behind token_logprob_entropy, so that the C++ op keeps its CPU kernel
# and the Triton one can be chosen (and tested on the CPU under
# TRITON_INTERPRET=1) next to it. Their implementation (policy/triton_ops.py)
# serves every device and is opaque to torch.compile, which traces these
# fakes and calls it at run time.
TRITON_SCHEMAS = {
    # Same contract as token_logprob_entropy. logits: (N, V) on CUDA (or the CPU
    # under TRITON_INTERPRET=1), tokens: (N,) int64.
    "token_logprob_entropy_triton": SCHEMAS["token_logprob_entropy"],
    # Same contract as token_logprob_entropy_backward.
    "token_logprob_entropy_triton_backward": SCHEMAS["token_logprob_entropy_backward"],
    # Same contract as token_logprob_entropy_backward_ (the gradient over the logits).
    "token_logprob_entropy_triton_backward_": SCHEMAS["token_logprob_entropy_backward_"],
}

for _name, _schema in TRITON_SCHEMAS.items():
    LIBRARY.define(_name + _schema)
SCHEMAS.update(TRITON_SCHEMAS)


torch.library.register_fake("riskpo::token_logprob_entropy_triton", _token_logprob_entropy_fake)
torch.library.register_fake("riskpo::token_logprob_entropy_triton_backward",
                            _token_logprob_entropy_backward_fake)
torch.library.register_fake("riskpo::token_logprob_entropy_triton_backward_",
                            _token_logprob_entropy_backward_inplace_fake)


# The setup (what is saved: logits, tokens and two floats per row) is the C++ op's.
torch.library.register_autograd("riskpo::token_logprob_entropy_triton",
                                _vocab_backward("token_logprob_entropy_triton_backward"),
                                setup_context=_token_logprob_entropy_setup)
