"""The per-row PPO-clip math of a fused-linear chunk in one Triton kernel.

``token_loss.token_loss_and_grads`` is the definition (RISKPO_SPEC.md section
8): the loss partial sum and d loss / d (logp, H) of each row, in 53 aten
ops with old log-probs, 66 with ref log-probs and an entropy term too (counted
under a dispatch mode), most of them a kernel launch on CUDA.
:func:`token_loss_and_grads_triton` computes the same numbers in one launch
(plus a sum of the per-program partials when there are several). It evaluates
the definition operation by operation in the same order and rounding, so only
``exp`` differs from torch's (the card's ``ex2.approx`` for float32); the tests hold it to
``token_loss_and_grads`` on random rows, on the clip boundaries and ties, and
on rows of weight 0 whose inputs are NaN/inf.

This module imports triton at import time (import it lazily). Kernels run on
CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` set before the
process first imports triton (see triton_kernels.py).
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

from .. import _validation as v
from .token_loss import RATIO_LOG_CLAMP
from .triton_kernels import KERNEL_OPTIONS, _on_device

# Rows per program: the chunks have ~256 (CPU) to ~3500 (GPU, bf16 at
# V = 151936) rows, so one to four programs; a row is a few loads and a few
# dozen flops, so the launch, not the block, is the cost.
BLOCK_N = 1024
NUM_WARPS = 4

# The kernel's float64 scalars arrive as two int32 halves of their bits (see
# _f64_halves): their parameter names, kept out of value specialisation.
_SCALARS = ("lower", "upper", "clip_c", "kl_coef", "entropy_coef")
_SCALAR_ARGS = tuple(f"{name}_{half}" for name in _SCALARS for half in ("hi", "lo"))


@triton.jit
def _from_halves(hi, lo):
    """The float64 whose bits are (hi << 32) | (lo as unsigned)."""
    bits = (hi.to(tl.int64) << 32) | lo.to(tl.uint32, bitcast=True).to(tl.int64)
    return bits.to(tl.float64, bitcast=True)


@triton.jit
def _clamp(x, lo, hi):
    # torch.clamp propagates a NaN; tl.maximum's default would drop it on the card.
    return tl.minimum(tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL), hi,
                      propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _tie_split(a, b, grad_a, grad_b, TAKE_LARGER: tl.constexpr):
    # token_loss._tie_split: the winner's gradient, the mean on a tie (or a NaN).
    if TAKE_LARGER:
        a_wins = a > b
        b_wins = a < b
    else:
        a_wins = a < b
        b_wins = a > b
    # * 0.5, not / 2: the same correctly rounded value, and no approximate division.
    return tl.where(a_wins, grad_a, tl.where(b_wins, grad_b, (grad_a + grad_b) * 0.5))


@triton.jit(do_not_specialize=_SCALAR_ARGS)
def _token_loss_kernel(
    logprobs_ptr,       # (N,) ACC
    entropy_ptr,        # (N,) float, read only with HAS_ENTROPY
    weights_ptr,        # (N,) float
    advantages_ptr,     # (N,) float
    old_ptr,            # (N,) float, read only with HAS_OLD
    ref_ptr,            # (N,) float, read only with HAS_REF
    partial_ptr,        # (programs,) ACC: sum over the program's rows of w l
    grad_logprobs_ptr,  # (N,) ACC
    grad_entropy_ptr,   # (N,) ACC
    N,
    lower_hi, lower_lo,                # 1 - clip_low
    upper_hi, upper_lo,                # 1 + clip_high
    clip_c_hi, clip_c_lo,              # clip_ratio_c
    kl_coef_hi, kl_coef_lo,
    entropy_coef_hi, entropy_coef_lo,
    LOG_CLAMP: tl.constexpr,    # 20.0
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,  # entropy_coef != 0
    ACC: tl.constexpr,          # tl.float32 or tl.float64
    BLOCK: tl.constexpr,
):
    # Python floats reach a kernel as float32; torch rounds a float64 scalar
    # once, to the tensor's dtype. The bits keep the float64 exact, and one
    # cast gives what torch computes with (the clip bounds decide ties).
    lower = _from_halves(lower_hi, lower_lo).to(ACC)
    upper = _from_halves(upper_hi, upper_lo).to(ACC)
    clip_c = _from_halves(clip_c_hi, clip_c_lo).to(ACC)
    kl_coef = _from_halves(kl_coef_hi, kl_coef_lo).to(ACC)
    entropy_coef = _from_halves(entropy_coef_hi, entropy_coef_lo).to(ACC)

    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = rows < N
    logp = tl.load(logprobs_ptr + rows, mask=in_range, other=0.0).to(ACC)
    A = tl.load(advantages_ptr + rows, mask=in_range, other=0.0).to(ACC)
    # Rows past N load weight 0: inactive, like padding.
    w = tl.load(weights_ptr + rows, mask=in_range, other=0.0).to(ACC)
    if HAS_OLD:
        old = tl.load(old_ptr + rows, mask=in_range, other=0.0).to(ACC)
    else:
        old = logp  # old = logp.detach(): logp - old is 0 (NaN for a non-finite logp)

    # per_token_loss, one torch op at a time.
    diff = logp - old
    ratio = tl.exp(_clamp(diff, -LOG_CLAMP, LOG_CLAMP))
    neg_A = -A
    l1 = neg_A * ratio
    l2 = neg_A * _clamp(ratio, lower, upper)
    clipped = tl.maximum(l1, l2, propagate_nan=tl.PropagateNan.ALL)
    l3 = neg_A * clip_c
    dual = A < 0
    loss = tl.where(dual, tl.minimum(clipped, l3, propagate_nan=tl.PropagateNan.ALL), clipped)

    # The closed form of token_loss_and_grads. The interval masks multiply (as
    # torch's bool masks do), so an inf or NaN upstream stays a NaN as there.
    passes = ((diff >= -LOG_CLAMP) & (diff <= LOG_CLAMP)).to(ACC)
    d_l1 = neg_A * (ratio * passes)
    d_l2 = d_l1 * ((ratio >= lower) & (ratio <= upper)).to(ACC)
    d_clipped = _tie_split(l1, l2, d_l1, d_l2, True)
    d_dual = _tie_split(clipped, l3, d_clipped, tl.zeros_like(d_clipped), False)
    d_logp = tl.where(dual, d_dual, d_clipped)
    if HAS_REF:
        # Applied with kl_coef = 0 too, as the definition does (0 * inf is NaN).
        delta = tl.load(ref_ptr + rows, mask=in_range, other=0.0).to(ACC) - logp
        e = tl.exp(delta)
        loss = loss + kl_coef * ((e - delta) - 1)
        d_logp = d_logp + kl_coef * (1 - e)
    if HAS_ENTROPY:
        H = tl.load(entropy_ptr + rows, mask=in_range, other=0.0).to(ACC)
        loss = loss - entropy_coef * H

    # Weight-0 rows (padding) select 0: a NaN or inf computed there never leaves.
    active = w != 0
    tl.store(partial_ptr + pid, tl.sum(tl.where(active, w * loss, 0.0), axis=0))
    tl.store(grad_logprobs_ptr + rows, tl.where(active, w * d_logp, 0.0), mask=in_range)
    tl.store(grad_entropy_ptr + rows, tl.where(active, -entropy_coef * w, 0.0), mask=in_range)


# True where the kernel runs on CPU tensors (triton_kernels.INTERPRETED's test).
INTERPRETED = all(type(f).__name__ == "InterpretedFunction" for f in (_token_loss_kernel, tl.sum))


def _f64_halves(x: float) -> tuple[int, int]:
    """The bits of float64 x as two signed int32 values (high, low word)."""
    bits = struct.unpack("<q", struct.pack("<d", x))[0]
    lo = bits & 0xFFFFFFFF
    return bits >> 32, lo - (1 << 32) if lo >= 1 << 31 else lo


def _run(grid, *args, **meta):
    # One seam for the launch: tests/test_token_loss_triton.py records what
    # the launcher passes here and compiles exactly that for sm_90a.
    _token_loss_kernel[grid](*args, **meta)


def _check(op, logprobs, entropy, weights, advantages, old_logprobs, ref_logprobs, entropy_coef):
    if not isinstance(logprobs, torch.Tensor):
        raise TypeError(f"{op}: logprobs must be a tensor, got {type(logprobs).__name__}")
    if logprobs.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: logprobs must be float32 or float64 (the accumulation dtype), "
                        f"got {logprobs.dtype}")
    if logprobs.dim() != 1:
        v._fail(op, f"logprobs must be (N,), got shape {tuple(logprobs.shape)}")
    device = logprobs.device
    if device.type == "cpu":
        if not INTERPRETED:
            raise RuntimeError(f"{op}: the triton kernel needs CUDA tensors, or CPU tensors with "
                               "TRITON_INTERPRET=1 set before the process first imports triton")
    elif device.type != "cuda":
        v._fail(op, f"logprobs must be on a CUDA device (or the CPU under TRITON_INTERPRET=1), "
                    f"got {device}")
    N = logprobs.shape[0]
    for name, t in (("entropy", entropy), ("weights", weights), ("advantages", advantages),
                    ("old_logprobs", old_logprobs), ("ref_logprobs", ref_logprobs)):
        if t is None and (name in ("old_logprobs", "ref_logprobs")
                          or (name == "entropy" and entropy_coef == 0)):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be floating point, got {t.dtype}")
        if tuple(t.shape) != (N,):
            v._fail(op, f"{name} must be (N,) = ({N},), got shape {tuple(t.shape)}")
        if t.device != device:
            v._fail(op, f"{name} must be on logprobs' device {device}, got {t.device}")


def token_loss_and_grads_triton(logprobs, entropy, weights, advantages, old_logprobs=None,
                                ref_logprobs=None, clip_low=0.2, clip_high=0.2, clip_ratio_c=3.0,
                                kl_coef=0.0, entropy_coef=0.0):
    """:func:`token_loss.token_loss_and_grads` in one kernel launch.

    logprobs: (N,) float32/float64 (the accumulation dtype: every term is
    computed in it), entropy, weights, advantages, old_logprobs, ref_logprobs:
    (N,) any float dtype (old/ref may be None; entropy may be None when
    entropy_coef == 0). Returns (sum_t w_t l_t: (), grad_logprobs: (N,),
    grad_entropy: (N,)), all in logprobs' dtype, with per row t

        ratio = exp(clamp(logp - old, -20, 20))
        l     = max(-A ratio, -A clamp(ratio, 1 - clip_low, 1 + clip_high))
        l     = min(l, -A clip_ratio_c)                 where A < 0
        l    += kl_coef (exp(ref - logp) - (ref - logp) - 1) - entropy_coef H
        grad_logprobs = w d l / d logp,  grad_entropy = -entropy_coef w

    (torch's conventions: the clamp passes the gradient on its closed
    interval, max/min split it evenly on a tie); 0 at rows of weight 0,
    whatever their inputs. The loss is a sum of per-program partials in a
    fixed order: the same inputs give the same bits.
    """
    op = "token_loss_and_grads_triton"
    scalars = {}
    for name, value in (("clip_low", clip_low), ("clip_high", clip_high),
                        ("clip_ratio_c", clip_ratio_c), ("kl_coef", kl_coef),
                        ("entropy_coef", entropy_coef)):
        scalars[name] = v.check_float(name, value, op=op)
    _check(op, logprobs, entropy, weights, advantages, old_logprobs, ref_logprobs,
           scalars["entropy_coef"])
    acc = logprobs.dtype
    N, device = logprobs.shape[0], logprobs.device
    grad_logprobs = torch.empty(N, dtype=acc, device=device)
    grad_entropy = torch.empty(N, dtype=acc, device=device)
    if N == 0:
        return torch.zeros((), dtype=acc, device=device), grad_logprobs, grad_entropy
    programs = triton.cdiv(N, BLOCK_N)
    partial = torch.empty(programs, dtype=acc, device=device)
    logprobs = logprobs.contiguous()
    # Absent inputs: any valid pointer; their constexpr flag keeps it unread.
    inputs = [logprobs if t is None else t.contiguous()
              for t in (entropy, weights, advantages, old_logprobs, ref_logprobs)]
    halves = []
    for value in (1 - scalars["clip_low"], 1 + scalars["clip_high"], scalars["clip_ratio_c"],
                  scalars["kl_coef"], scalars["entropy_coef"]):
        halves.extend(_f64_halves(value))
    with _on_device(device):
        _run((programs,), logprobs, *inputs, partial, grad_logprobs, grad_entropy, N, *halves,
             LOG_CLAMP=RATIO_LOG_CLAMP, HAS_OLD=old_logprobs is not None,
             HAS_REF=ref_logprobs is not None, HAS_ENTROPY=scalars["entropy_coef"] != 0,
             ACC=tl.float64 if acc == torch.float64 else tl.float32, BLOCK=BLOCK_N,
             num_warps=NUM_WARPS, **KERNEL_OPTIONS)
    # One program: its partial is the loss (a view, no second launch).
    return (partial[0] if programs == 1 else partial.sum()), grad_logprobs, grad_entropy
