"""Triton kernels of the policy-loss family: log-prob of the target token,
entropy and log-sum-exp of softmax(logits / temperature), forward and backward,
in one streaming pass over the vocabulary per row (RISKPO_SPEC.md section 8).

The C++ CPU twin is ``csrc/policy_loss/policy_loss_cpu.cpp``; both follow the
same math:

    z = logits / T,  m = running max,  s = sum exp(z - m),  t = sum exp(z - m) (z - m)
    lse = m + log s,   logprob = z[y] - lse,   entropy = log s - t / s

(the shifted form of the entropy avoids the cancellation of lse - E[z] at
logits of +-1e4). A -inf logit has probability 0 and adds nothing; a NaN or
+inf logit makes its row NaN (reported, never averaged away).

This module imports triton at import time; ``riskpo_kernels.ops`` imports it
lazily, on the first call of a ``riskpo::*_triton`` op. Kernels run on CUDA
tensors, or on CPU tensors under ``TRITON_INTERPRET=1``, which must be set
before the process first imports triton (see ``INTERPRETED`` below).
"""

from __future__ import annotations

import contextlib
import struct

import torch
import triton
import triton.language as tl

from .. import _validation as v

# Rows are spread over at most this many programs, each looping over its rows:
# no grid dimension overflows at 64k+ rows, and there are still far more
# programs than streaming multiprocessors.
MAX_PROGRAMS = 32768
# Largest vocabulary chunk one program holds in registers per loop step.
MAX_BLOCK_V = 4096

# Set below, once the kernels exist: True where the kernels run on CPU tensors.
INTERPRETED = False

# Compile options of every launch here. By default Triton lets LLVM and ptxas
# contract a multiply feeding an add into one fma: `z = x * inv_t` then
# `z - m` became fma(x, inv_t, -m), exact product minus a max taken over the
# *rounded* products, so the argmax of a row was shifted by up to half an ulp
# of z instead of 0 (at logits of 1e4 / 0.7: 2e-4, and a one-hot row's
# log-prob and gradient were off by that much). The first H100 run failed
# test_extreme_logits_stay_finite this way, while the interpreter (numpy, one
# rounding per operation) passed. Without fusion every float operation rounds
# as the interpreter's do, so CI's interpreter runs check what the card
# computes, up to the approximate exp2 / log / division (benchmarks/NOTES.md).
# The kernels are memory-bound (a few flops per loaded byte): the lost fmas
# cost no measurable time. tests/test_policy_loss_triton_ptx.py checks the PTX.
KERNEL_OPTIONS = {"enable_fp_fusion": False}


@triton.jit
def _logprob_entropy_fwd_kernel(
    logits_ptr,        # (N, V) float32/float64/float16/bfloat16, unit stride along V
    tokens_ptr,        # (N,) int64
    logprobs_ptr,      # (N,) ACC
    entropy_ptr,       # (N,) ACC
    lse_ptr,           # (N,) ACC
    N,
    V,
    stride_logits_row,  # elements between two rows of logits
    inv_temp_hi,       # float32: 1 / temperature = inv_temp_hi + inv_temp_lo
    inv_temp_lo,       # float32: the rounding error of inv_temp_hi, for float64 math
    ACC: tl.constexpr,      # tl.float32, or tl.float64 for float64 logits
    BLOCK_V: tl.constexpr,  # power of two
):
    # 1 / T arrives as two float32 scalars (Triton types a Python float as
    # float32): hi alone for float32 math, hi + lo exact to ~2^-48 for float64.
    inv_t = tl.cast(inv_temp_hi, ACC) + tl.cast(inv_temp_lo, ACC)
    offs = tl.arange(0, BLOCK_V)
    for row in range(tl.program_id(0), N, tl.num_programs(0)):
        # int64: row * stride exceeds 2^31 at 64k rows of a 151936-word vocabulary.
        x_row = logits_ptr + tl.cast(row, tl.int64) * stride_logits_row
        m = tl.full([], float("-inf"), ACC)  # running max
        s = tl.full([], 0.0, ACC)            # sum exp(z - m)
        t = tl.full([], 0.0, ACC)            # sum exp(z - m) * (z - m)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            z = tl.load(x_row + cols, mask=cols < V, other=float("-inf")).to(ACC) * inv_t
            m_new = tl.maximum(m, tl.max(z, axis=0))
            # Shift by 0 while every logit so far is -inf: -inf - -inf is NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new).to(ACC)
            d = z - shift
            e = tl.exp(d)
            # -inf logits (masked vocabulary, the tail) have e = 0 and add
            # nothing: 0 * -inf would be NaN.
            block_t = tl.sum(e * tl.where(e != 0.0, d, 0.0), axis=0)
            # Rescale the running sums from the old max to the new one (scale = 0
            # while s = 0, and m - shift = -inf then). NaN or +inf logits make s
            # NaN (exp(NaN), inf - inf), hence the whole row NaN.
            scale = tl.exp(m - shift)
            t = scale * (t + tl.where(s > 0.0, m - shift, 0.0) * s) + block_t
            s = scale * s + tl.sum(e, axis=0)
            m = m_new
        log_s = tl.log(s)
        row_lse = m + log_s
        y = tl.load(tokens_ptr + row)
        # An out-of-range token (only checked on the host for CPU tensors) gives
        # a NaN log-prob instead of a read outside the row.
        valid = (y >= 0) & (y < V)
        z_y = tl.load(x_row + y, mask=valid, other=float("nan")).to(ACC) * inv_t
        tl.store(lse_ptr + row, row_lse)
        # (z_y - m) - log s, not z_y - lse: at logits of 1e4 a float32 lse is
        # only good to ~5e-4 absolute, while z_y - m is exact.
        tl.store(logprobs_ptr + row, (z_y - m) - log_s)
        tl.store(entropy_ptr + row, log_s - t / s)


@triton.jit
def _logprob_entropy_bwd_kernel(
    grad_logprobs_ptr,  # (N,) ACC
    grad_entropy_ptr,   # (N,) ACC
    logits_ptr,         # (N, V) float32/float64/float16/bfloat16, unit stride along V
    tokens_ptr,         # (N,) int64
    lse_ptr,            # (N,) ACC, saved by the forward
    entropy_ptr,        # (N,) ACC, saved by the forward
    grad_logits_ptr,    # (N, V) logits' dtype, contiguous
    N,
    V,
    stride_logits_row,
    stride_grad_row,
    inv_temp_hi,
    inv_temp_lo,
    ACC: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    inv_t = tl.cast(inv_temp_hi, ACC) + tl.cast(inv_temp_lo, ACC)
    offs = tl.arange(0, BLOCK_V)
    for row in range(tl.program_id(0), N, tl.num_programs(0)):
        row64 = tl.cast(row, tl.int64)
        x_row = logits_ptr + row64 * stride_logits_row
        out_row = grad_logits_ptr + row64 * stride_grad_row
        g_lp = tl.load(grad_logprobs_ptr + row)
        g_h = tl.load(grad_entropy_ptr + row)
        if (g_lp == 0.0) & (g_h == 0.0):
            # Masked tokens (padding): zeros, without reading logits that may be NaN.
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs
                tl.store(out_row + cols, tl.zeros([BLOCK_V], grad_logits_ptr.dtype.element_ty), mask=cols < V)
        else:
            row_lse = tl.load(lse_ptr + row)
            row_h = tl.load(entropy_ptr + row)
            y = tl.load(tokens_ptr + row)
            # d/dz = g_lp (onehot_y - p) - g_H p (log p + H), then d/dlogits = d/dz / T.
            # p is recomputed from the saved lse: storing it costs N * V floats.
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + offs
                in_row = cols < V
                x = tl.load(x_row + cols, mask=in_row, other=float("-inf")).to(ACC)
                log_p = x * inv_t - row_lse
                p = tl.exp(log_p)
                # p == 0 (a -inf logit): exactly 0, and no 0 * -inf on the way.
                live = p != 0.0
                g = tl.where(live, -p * (g_lp + g_h * (tl.where(live, log_p, 0.0) + row_h)), 0.0)
                g = g + tl.where(cols == y, g_lp, 0.0)
                tl.store(out_row + cols, (g * inv_t).to(grad_logits_ptr.dtype.element_ty), mask=in_row)


# triton.jit reads TRITON_INTERPRET when it decorates a function: triton's own
# library functions (tl.sum, tl.max) when triton is first imported, these
# kernels when this module is. CPU tensors need both in interpreter form, so
# TRITON_INTERPRET=1 must be set before the process first imports triton.
INTERPRETED = all(type(f).__name__ == "InterpretedFunction"
                  for f in (_logprob_entropy_fwd_kernel, _logprob_entropy_bwd_kernel, tl.sum, tl.max))


def _check_logits_tokens(op, logits, tokens, temperature):
    v.check_tensor("logits", logits, dtypes="float", op=op)
    if logits.dim() != 2:
        v._fail(op, f"logits must be (N, V), got shape {tuple(logits.shape)}")
    if logits.shape[1] < 1:
        v._fail(op, "logits has an empty vocabulary (V = 0)")
    v.check_tensor("tokens", tokens, dtypes=(torch.int64,), device=logits.device,
                   device_name="logits is", op=op)
    if tokens.dim() != 1 or tokens.shape[0] != logits.shape[0]:
        v._fail(op, f"tokens must be (N,) = ({logits.shape[0]},), got shape {tuple(tokens.shape)}")
    temperature = v.check_temperature(temperature, op=op)
    if logits.device.type == "cpu":
        if not INTERPRETED:
            raise RuntimeError(f"{op}: the triton kernels need CUDA tensors, or CPU tensors with "
                               "TRITON_INTERPRET=1 set before the process first imports triton")
        # A sync is free on CPU. On CUDA an out-of-range token gives a NaN
        # log-prob (the kernel never reads outside the row) rather than a sync.
        v.check_token_range(tokens, logits.shape[1], op=op)
    elif logits.device.type != "cuda":
        v._fail(op, f"logits must be on a CUDA device (or the CPU under TRITON_INTERPRET=1), "
                    f"got {logits.device}")
    # The kernels need unit stride along V only; rows may be strided (a slice).
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return logits, tokens.contiguous(), temperature


def _launch_config(vocab, block_v):
    """BLOCK_V and num_warps: the whole row in one step when it fits, else
    MAX_BLOCK_V chunks; about 512 elements per warp and step."""
    if block_v is None:
        block_v = min(triton.next_power_of_2(vocab), MAX_BLOCK_V)
    elif isinstance(block_v, bool) or not isinstance(block_v, int) or block_v < 1 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 1, got {block_v!r}")
    num_warps = min(16, max(1, block_v // 512))
    return block_v, num_warps


def _temperature_pair(temperature):
    """1 / temperature as two float32 values, hi + lo (hi alone is what float32 math uses)."""
    def to_f32(x):
        return struct.unpack("f", struct.pack("f", x))[0]

    inv = 1.0 / temperature
    hi = to_f32(inv)
    return hi, to_f32(inv - hi)


def _acc(dtype):
    return (torch.float64, tl.float64) if dtype == torch.float64 else (torch.float32, tl.float32)


def logprob_entropy_triton(logits, tokens, temperature, block_v=None):
    """logits: (N, V), tokens: (N,) int64 -> logprobs, entropy, lse: (N,) float32
    (float64 for float64 logits), of softmax(logits / temperature).

    block_v: vocabulary chunk (a power of two); None picks it from V.
    """
    op = "token_logprob_entropy_triton"
    logits, tokens, temperature = _check_logits_tokens(op, logits, tokens, temperature)
    rows, vocab = logits.shape
    acc, acc_tl = _acc(logits.dtype)
    logprobs = torch.empty(rows, dtype=acc, device=logits.device)
    entropy = torch.empty(rows, dtype=acc, device=logits.device)
    lse = torch.empty(rows, dtype=acc, device=logits.device)
    if rows == 0:
        return logprobs, entropy, lse
    block, num_warps = _launch_config(vocab, block_v)
    hi, lo = _temperature_pair(temperature)
    grid = (min(rows, MAX_PROGRAMS),)
    with _on_device(logits.device):
        _logprob_entropy_fwd_kernel[grid](
            logits, tokens, logprobs, entropy, lse, rows, vocab, logits.stride(0), hi, lo,
            ACC=acc_tl, BLOCK_V=block, num_warps=num_warps, **KERNEL_OPTIONS)
    return logprobs, entropy, lse


def logprob_entropy_backward_triton(grad_logprobs, grad_entropy, logits, tokens, lse, entropy,
                                    temperature, block_v=None, in_place=False):
    """d(loss)/d(logits): (N, V) in the logits' dtype, from grad_logprobs,
    grad_entropy: (N,) and the forward's lse, entropy: (N,), with

        d/dlogits = (g_lp (onehot_y - p) - g_H p (log p + H)) / temperature.

    in_place: write the gradient over ``logits`` (contiguous) and return it. The
    kernel loads each block before it stores that block, and the target's term
    is added inside its block, so nothing it reads has been overwritten.
    """
    op = "token_logprob_entropy_triton_backward" + ("_" if in_place else "")
    if in_place:
        v.check_tensor("logits", logits, op=op)
        if not (logits.dim() == 2 and logits.is_contiguous()):
            v._fail(op, f"logits must be a contiguous (N, V) tensor to be overwritten, got shape "
                        f"{tuple(logits.shape)} and strides {logits.stride()}")
        v.check_writable("logits", logits, op=op)
    original = logits
    logits, tokens, temperature = _check_logits_tokens(op, logits, tokens, temperature)
    assert not in_place or logits is original  # contiguous logits are not copied
    rows, vocab = logits.shape
    acc, acc_tl = _acc(logits.dtype)
    per_row = {}
    for name, t in (("grad_logprobs", grad_logprobs), ("grad_entropy", grad_entropy), ("lse", lse),
                    ("entropy", entropy)):
        v.check_tensor(name, t, device=logits.device, device_name="logits is", op=op)
        if t.dim() != 1 or t.shape[0] != rows:
            v._fail(op, f"{name} must be (N,) = ({rows},), got shape {tuple(t.shape)}")
        if not t.is_floating_point():  # bool, integer and complex would be cast silently
            v._fail(op, f"{name} must be floating point (real), got {t.dtype}")
        per_row[name] = t.to(acc).contiguous()
    grad_logits = logits if in_place else torch.empty((rows, vocab), dtype=logits.dtype,
                                                      device=logits.device)
    if rows == 0:
        return grad_logits
    block, num_warps = _launch_config(vocab, block_v)
    hi, lo = _temperature_pair(temperature)
    grid = (min(rows, MAX_PROGRAMS),)
    with _on_device(logits.device):
        _logprob_entropy_bwd_kernel[grid](
            per_row["grad_logprobs"], per_row["grad_entropy"], logits, tokens, per_row["lse"],
            per_row["entropy"], grad_logits, rows, vocab, logits.stride(0), grad_logits.stride(0),
            hi, lo, ACC=acc_tl, BLOCK_V=block, num_warps=num_warps, **KERNEL_OPTIONS)
    return grad_logits


def _on_device(device):
    # Triton launches on the current CUDA device, which need not be the tensors'.
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
