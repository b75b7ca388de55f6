"""The folded fused-linear policy loss (issue 18 section 2): the lm_head GEMMs
with the vocabulary work folded into their epilogue (forward) and prologue
(backward), so no pass over the vocabulary runs on its own.

Per chunk of rows (hidden_c: (M, H), weight: (V, H), bias: (V,) or None):

1. ``_fwd_kernel``, one program per (row tile, V tile j), a tl.dot over H:
   z = (hidden_c @ weight.T + bias) / T in float32, then per row and tile

       k_j  = floor(max_v z_v log2 e)          (an integer; -inf for a tile of -inf)
       d_v  = z_v log2 e - k_j                 (< 1: no overflow)
       E_v  = 2^d_v                            stored, (M, V)
       s_j  = sum_v E_v,   t_j = sum_v E_v d_v,   d_y if the target y is in tile j

2. ``_combine`` (torch, O(M * V / BLOCK_V)): with K = max_j k_j and w_j = 2^(k_j - K)
   (exact powers of two)

       S = sum_j w_j s_j,   T2 = sum_j w_j (t_j + (k_j - K) s_j),   lse = ln2 (K + log2 S)
       logprob = ln2 ((d_y + k_y - K) - log2 S),   entropy = ln2 (log2 S - T2 / S)

   (base-2 twin of triton_kernels.py's shifted form: d is exact 0-ish at the
   row's maximum, so a one-hot row has log-prob ~0 and entropy ~0).
3. token_loss.token_loss_and_grads(logprob, entropy, ...) -> g_lp, g_H: (M,).
4. With c_j = 2^(k_j - K - log2 S), p_v = E_v c_j and log p_v = ln2 log2 E_v + ln c_j,
   d loss / d logits = (g_lp (1[v=y] - p) - g_H p (log p + H)) / T becomes

       dz_v = E_v alpha_j + (E_v log2 E_v) beta_j + 1[v=y] g_lp / T
       alpha_j = -c_j (g_lp + g_H (ln c_j + H)) / T,   beta_j = -c_j g_H ln2 / T

   alpha, beta: (M, V / BLOCK_V) float32, from torch. ``_dhidden_kernel`` and
   ``_dweight_kernel`` form dz in their prologue: one multiply per element, no
   exp: the SFU would otherwise bound the prologue, which is run H / BLOCK_H
   times per element. With an entropy term, one lg2.approx more (one SFU
   instruction; tl.log and tl.log2 compile to libdevice's ~20-instruction
   logf/log2f, with a branch). The target's one-hot term is not formed per
   element: d hidden adds g_lp / T W[y] in its epilogue, d weight adds
   sum_{r: y_r = v} g_lp,r / T h_r from the rows sorted by target (a small dot
   per V tile; deterministic, no atomics).
   grad_hidden_c = dz @ W (rows x H tiles, loop over V);
   grad_weight += dz.T @ hidden_c (V x H tiles, loop over rows, float32: the
   first chunk writes it, later ones add), grad_bias += sum_rows dz.

E is stored in float32 for float32 inputs and in the inputs' 16-bit dtype
otherwise: dz is rounded to that dtype for the tensor-core dot anyway, so a
16-bit E costs one more rounding of the same size (2^-9 relative for bf16),
while it halves the chunk's memory and its traffic (the chunked path keeps its
bf16 logits, whose rounding moves p by far more at logits of ~10).
Rows of weight 0 (padding) store E = 0 and read as 0 in d weight, so a NaN
hidden state there never reaches a gradient (in the chunked path at 2026-12-07
it does: its zero d-logits row times the NaN row in dz.T @ hidden).

Kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set
before triton is first imported): see triton_kernels.py. Under the interpreter
a bf16 tl.dot multiplies bit patterns (triton issue 11584), so only float32 is
checked there; tests/test_folded_triton.py also compiles the bf16 launches for
sm_90a and checks registers, spills and shared memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .. import _validation as v
from .fused_linear import _check_rows
from .token_loss import token_loss_and_grads
from .triton_kernels import KERNEL_OPTIONS, _on_device, _temperature_pair

LN2 = math.log(2.0)
_LOG2E = tl.constexpr(1.4426950408889634)
# log2 of 0 is -inf and 0 * -inf NaN: E log2 E is taken at max(E, 2^-126),
# which changes it by at most 2^-126 * 126 where E is smaller.
_TINY = tl.constexpr(1.1754943508222875e-38)


@dataclass(frozen=True)
class Tiles:
    """One kernel's blocks: rows, vocabulary words and hidden features per
    program or loop step (powers of two, >= 16 for tl.dot), and its launch."""

    rows: int
    vocab: int
    hidden: int
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class FoldedConfig:
    """Blocks of the three kernels. ``forward.vocab`` is the tile of the row
    statistics (k_j, alpha_j, beta_j); each backward vocabulary block must
    divide it. ``target`` is the block of target rows per dot in d weight."""

    forward: Tiles    # rows x vocab program, loop over hidden (the dot's K)
    dhidden: Tiles    # rows x hidden program, loop over vocab
    dweight: Tiles    # vocab x hidden program, loop over rows
    target: int = 16

    def check(self) -> None:
        for name in ("forward", "dhidden", "dweight"):
            t = getattr(self, name)
            for field in ("rows", "vocab", "hidden"):
                b = getattr(t, field)
                if not (isinstance(b, int) and b >= 16 and b & (b - 1) == 0):
                    raise ValueError(f"config.{name}.{field} must be a power of two >= 16, "
                                     f"got {b!r}")
        for name in ("dhidden", "dweight"):
            if self.forward.vocab % getattr(self, name).vocab:
                raise ValueError(f"config.{name}.vocab must divide config.forward.vocab "
                                 f"({self.forward.vocab}), got {getattr(self, name).vocab}")
        t = self.target
        if not (isinstance(t, int) and t >= 16 and t & (t - 1) == 0):
            raise ValueError(f"config.target must be a power of two >= 16, got {self.target!r}")


# bf16/fp16 on Hopper: 128 x 128 output tiles; each fits 255 registers without
# spills and well under 227 KiB of shared memory at H 1536 and 4096
# (tests/test_folded_triton.py compiles them for sm_90a). Untimed: the device
# check sweeps them.
CUDA_16BIT = FoldedConfig(forward=Tiles(128, 128, 64, 8, 3), dhidden=Tiles(128, 64, 128, 8, 3),
                          dweight=Tiles(64, 128, 128, 8, 3))
# Wider forward tiles (the epilogue's statistics for 256 words at once, half
# the partials) and 128-row backward steps: 255 registers, no spills. Untimed.
CUDA_16BIT_WIDE = FoldedConfig(forward=Tiles(128, 256, 64, 8, 3),
                               dhidden=Tiles(128, 128, 128, 8, 3),
                               dweight=Tiles(128, 128, 128, 8, 3))
# What the device check times (each compiled for sm_90a in the tests).
CUDA_16BIT_CANDIDATES = {"default": CUDA_16BIT, "wide": CUDA_16BIT_WIDE}
CUDA_FLOAT32 = FoldedConfig(forward=Tiles(64, 64, 32, 4, 2), dhidden=Tiles(64, 32, 64, 4, 2),
                            dweight=Tiles(32, 64, 64, 4, 2))
# The interpreter runs each program as numpy calls: few, large programs.
INTERPRETER = FoldedConfig(forward=Tiles(32, 64, 32, 1, 1), dhidden=Tiles(32, 64, 32, 1, 1),
                           dweight=Tiles(32, 64, 32, 1, 1))


def default_config(dtype: torch.dtype, device: torch.device) -> FoldedConfig:
    if device.type == "cpu":
        return INTERPRETER
    return CUDA_FLOAT32 if dtype == torch.float32 else CUDA_16BIT


@triton.jit
def _log2(x, APPROX: tl.constexpr):
    if APPROX:
        # The card's one-instruction log2 (max relative error ~2^-22).
        return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.log2(x)  # the interpreter runs no PTX


@triton.jit
def _fwd_kernel(
    h_ptr,       # (M, H) hidden rows of the chunk, unit stride along H
    w_ptr,       # (V, H) weight, unit stride along H
    b_ptr,       # (V,) bias (unread without HAS_BIAS)
    tokens_ptr,  # (M,) int64 targets
    live_ptr,    # (M,) float32 token weights: rows of weight 0 store E = 0
    e_ptr,       # (M, V) E_DTYPE scaled exponentials 2^(z log2e - k)
    k_ptr,       # (M, NT) float32 k_j (integer-valued; -inf for an all -inf tile)
    s_ptr,       # (M, NT) float32 sum E
    t_ptr,       # (M, NT) float32 sum E d
    dy_ptr,      # (M,) float32 d of the target (written by the tile holding it)
    M, V, H,
    stride_h, stride_w, stride_e, stride_p,
    inv_t,       # float32 1 / temperature
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    # Row tiles fastest: consecutive programs share one weight tile (read from
    # device memory once) while the chunk's hidden rows stay in L2.
    pid_m = pid % num_m
    pid_v = pid // num_m
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < M
    col_ok = cols < V
    # int64 offsets: chunk rows x V and V x H pass 2^31 at large vocabularies.
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_w
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(h_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_cols + ks[:, None], mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    z = tl.where(col_ok[None, :], acc * inv_t, float("-inf"))
    m = tl.max(z, axis=1)
    # Shift by 0 while the tile is all -inf: -inf - -inf is NaN.
    k = tl.where(m == float("-inf"), 0.0, tl.floor(m * _LOG2E))
    d = z * _LOG2E - k[:, None]
    e = tl.exp2(d)
    s = tl.sum(e, axis=1)
    # e == 0 (a -inf logit, the tail): nothing, not 0 * -inf. NaN stays NaN.
    t = tl.sum(e * tl.where(e != 0.0, d, 0.0), axis=1)
    y = tl.load(tokens_ptr + rows, mask=row_ok, other=-1)
    dy = tl.sum(tl.where(cols[None, :] == y[:, None], d, 0.0), axis=1)
    y_here = row_ok & (y >= pid_v * BLOCK_V) & (y < pid_v * BLOCK_V + BLOCK_V) & (y < V)
    tl.store(dy_ptr + rows, dy, mask=y_here)
    p_off = rows.to(tl.int64) * stride_p + pid_v
    tl.store(k_ptr + p_off, tl.where(m == float("-inf"), float("-inf"), k), mask=row_ok)
    tl.store(s_ptr + p_off, s, mask=row_ok)
    tl.store(t_ptr + p_off, t, mask=row_ok)
    live = tl.load(live_ptr + rows, mask=row_ok, other=0.0) != 0.0
    e = tl.where(live[:, None], e, 0.0)
    tl.store(e_ptr + rows.to(tl.int64)[:, None] * stride_e + cols[None, :],
             e.to(e_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _dhidden_kernel(
    e_ptr,       # (M, V) E
    w_ptr,       # (V, H) weight
    alpha_ptr,   # (M, NT) float32
    beta_ptr,    # (M, NT) float32 (unread without ENTROPY)
    tokens_ptr,  # (M,) int64
    g_ptr,       # (M,) float32 g_lp / T, the target's one-hot coefficient
    out_ptr,     # (M, H) grad_hidden rows of the chunk, hidden's dtype
    M, V, H,
    stride_e, stride_w, stride_p, stride_out,
    ENTROPY: tl.constexpr,
    APPROX_LOG: tl.constexpr,   # lg2.approx (compiled) or tl.log2 (interpreter)
    DOT_PRECISION: tl.constexpr,
    SCALE_TILE: tl.constexpr,   # the forward's BLOCK_V: alpha's column is v0 // SCALE_TILE
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    num_h = tl.cdiv(H, BLOCK_H)
    # Hidden tiles fastest: the programs of one row tile read the same E rows together.
    pid_h = pid % num_h
    pid_m = pid // num_h
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < M
    h_ok = hs < H
    e_rows = e_ptr + rows.to(tl.int64)[:, None] * stride_e
    p_rows = rows.to(tl.int64) * stride_p
    acc = tl.zeros([BLOCK_M, BLOCK_H], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        e = tl.load(e_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        j = v0 // SCALE_TILE
        alpha = tl.load(alpha_ptr + p_rows + j, mask=row_ok, other=0.0)
        dz = e * alpha[:, None]
        if ENTROPY:
            beta = tl.load(beta_ptr + p_rows + j, mask=row_ok, other=0.0)
            dz += (e * _log2(tl.maximum(e, _TINY), APPROX_LOG)) * beta[:, None]
        w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_w + hs[None, :],
                    mask=col_ok[:, None] & h_ok[None, :], other=0.0)
        acc = tl.dot(dz.to(w.dtype), w, acc, input_precision=DOT_PRECISION)
    # The target's term g W[y]: one gathered row per row, not a compare per element.
    y = tl.load(tokens_ptr + rows, mask=row_ok, other=0)
    y_ok = row_ok & (y >= 0) & (y < V)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    w_y = tl.load(w_ptr + y[:, None] * stride_w + hs[None, :], mask=y_ok[:, None] & h_ok[None, :],
                  other=0.0).to(tl.float32)
    acc += g[:, None] * w_y
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_out + hs[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & h_ok[None, :])


@triton.jit
def _dweight_kernel(
    e_ptr,       # (M, V) E
    h_ptr,       # (M, H) hidden rows of the chunk
    alpha_ptr,   # (M, NT) float32
    beta_ptr,    # (M, NT) float32 (unread without ENTROPY)
    perm_ptr,    # (M,) int64 rows sorted by target (stable)
    start_ptr,   # (V / BLOCK_V + 1,) int64: perm[start[i]:start[i+1]] target vocab block i
    tokens_ptr,  # (M,) int64
    g_ptr,       # (M,) float32 g_lp / T
    live_ptr,    # (M,) float32 token weights: rows of weight 0 read as 0 (a NaN there stays out)
    gw_ptr,      # (V, H) float32 accumulator, contiguous
    gb_ptr,      # (V,) float32 accumulator (unread without HAS_BIAS)
    M, V, H,
    stride_e, stride_h, stride_p,
    FIRST: tl.constexpr,        # the first chunk writes the accumulators instead of adding
    HAS_BIAS: tl.constexpr,
    ENTROPY: tl.constexpr,
    APPROX_LOG: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SCALE_TILE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    pid = tl.program_id(0)
    num_h = tl.cdiv(H, BLOCK_H)
    pid_h = pid % num_h
    pid_v = pid // num_h
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    hs = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    col_ok = cols < V
    h_ok = hs < H
    j = (pid_v * BLOCK_V) // SCALE_TILE
    # Only one program per V tile sums the bias gradient (a uniform branch).
    with_bias = pid_h == 0
    acc = tl.zeros([BLOCK_V, BLOCK_H], dtype=tl.float32)
    bias_acc = tl.zeros([BLOCK_V], dtype=tl.float32)
    for r0 in range(0, M, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < M
        rows64 = rows.to(tl.int64)
        # A zero row of dz times a NaN hidden row would still be NaN.
        h_row_ok = row_ok & (tl.load(live_ptr + rows, mask=row_ok, other=0.0) != 0.0)
        e_t = tl.load(e_ptr + rows64[None, :] * stride_e + cols[:, None],
                      mask=col_ok[:, None] & row_ok[None, :], other=0.0).to(tl.float32)
        alpha = tl.load(alpha_ptr + rows64 * stride_p + j, mask=row_ok, other=0.0)
        dz_t = e_t * alpha[None, :]
        if ENTROPY:
            beta = tl.load(beta_ptr + rows64 * stride_p + j, mask=row_ok, other=0.0)
            dz_t += (e_t * _log2(tl.maximum(e_t, _TINY), APPROX_LOG)) * beta[None, :]
        h = tl.load(h_ptr + rows64[:, None] * stride_h + hs[None, :],
                    mask=h_row_ok[:, None] & h_ok[None, :], other=0.0)
        acc = tl.dot(dz_t.to(h.dtype), h, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            if with_bias:
                bias_acc += tl.sum(dz_t, axis=1)
    # The one-hot term: sum over the rows whose target is in this V tile of
    # g_r h_r, as a small dot of (word, row) one-hot weights. In the inputs'
    # dtype, on the tensor cores: a float32 dot on the CUDA cores cost as much
    # as half the prologue (SASS: 1024 FFMA per thread and block of targets),
    # and g in bf16 is one rounding of the size dz gets anyway.
    t_start = tl.load(start_ptr + pid_v)
    t_end = tl.load(start_ptr + pid_v + 1)
    for t0 in range(t_start, t_end, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        t_ok = ts < t_end
        r = tl.load(perm_ptr + ts, mask=t_ok, other=0)
        y = tl.load(tokens_ptr + r, mask=t_ok, other=-1)
        g = tl.load(g_ptr + r, mask=t_ok, other=0.0)
        t_ok = t_ok & (tl.load(live_ptr + r, mask=t_ok, other=0.0) != 0.0)
        onehot = tl.where(cols[:, None] == y[None, :], g[None, :], 0.0)
        h_r = tl.load(h_ptr + r[:, None] * stride_h + hs[None, :],
                      mask=t_ok[:, None] & h_ok[None, :], other=0.0)
        acc = tl.dot(onehot.to(h_r.dtype), h_r, acc, input_precision=DOT_PRECISION)
        if HAS_BIAS:
            if with_bias:
                bias_acc += tl.sum(onehot, axis=1)
    gw = gw_ptr + cols.to(tl.int64)[:, None] * H + hs[None, :]
    gw_mask = col_ok[:, None] & h_ok[None, :]
    if not FIRST:
        acc += tl.load(gw, mask=gw_mask, other=0.0)
    tl.store(gw, acc, mask=gw_mask)
    if HAS_BIAS:
        if with_bias:
            if not FIRST:
                bias_acc += tl.load(gb_ptr + cols, mask=col_ok, other=0.0)
            tl.store(gb_ptr + cols, bias_acc, mask=col_ok)


# True where the kernels run on CPU tensors (triton_kernels.INTERPRETED's test).
INTERPRETED = all(type(f).__name__ == "InterpretedFunction"
                  for f in (_fwd_kernel, _dhidden_kernel, _dweight_kernel, tl.sum))
# Fixed at import, not per call: the sm_90a compile test lets CPU tensors
# through the launcher (INTERPRETED = True) and must still get the card's code.
APPROX_LOG = not INTERPRETED


def _run(kernel, grid, *args, **meta):
    # One seam for every launch: tests/test_folded_triton.py records what the
    # launcher passes here and compiles exactly that for sm_90a.
    kernel[grid](*args, **meta)


def _chunk_ranges(N: int, chunk_size: int):
    """ceil(N / chunk_size) chunks of near-equal size: no thin tail chunk."""
    count = max(1, -(-N // chunk_size))
    return [(i * N // count, (i + 1) * N // count) for i in range(count) if N]


def _combine(k, s, t, dy, tokens, tile):
    """Row statistics from the per-tile partials k, s, t: (M, NT) and the
    target's d: (M,). Returns logprobs, entropy: (M,), and rel = k - K - log2 S:
    (M, NT), the base-2 log of c_j (p = E c_j)."""
    K = k.amax(1, keepdim=True)
    shift = k - K   # exact: integers (or -inf for a tile of -inf logits)
    w = torch.exp2(shift)
    S = (w * s).sum(1, keepdim=True)
    # A tile with s == 0 adds nothing (its shift may be -inf: no -inf * 0); NaN stays.
    T2 = torch.where(s == 0, 0.0, w * (t + shift * s)).sum(1, keepdim=True)
    log2_s = torch.log2(S)
    tile_y = torch.clamp(tokens // tile, 0, k.shape[1] - 1)
    k_y = k.gather(1, tile_y[:, None])
    logprobs = LN2 * ((dy[:, None] + (k_y - K)) - log2_s)
    entropy = LN2 * (log2_s - T2 / S)
    return logprobs.squeeze(1), entropy.squeeze(1), shift - log2_s


def _backward_scalars(rel, grad_logprobs, grad_entropy, entropy, inv_t, with_entropy):
    """alpha, beta: (M, NT) (beta None without an entropy term) and the one-hot
    coefficient g_lp / T: (M,) of dz = E alpha + E log2(E) beta + 1[v=y] g_lp / T,
    from rel = log2 c: (M, NT) and the rows' g_lp, g_H, entropy: (M,)."""
    c = torch.exp2(rel)
    g_lp = (grad_logprobs * inv_t)[:, None]
    # Rows with no upstream gradient get exact zeros, whatever their statistics.
    live = ((grad_logprobs != 0) | (grad_entropy != 0))[:, None]
    beta = None
    if with_entropy:
        g_h = (grad_entropy * inv_t)[:, None]
        # c == 0 (a tile far below the row's max, or of -inf logits): rel may
        # be -inf there, and c * -inf NaN.
        alpha = torch.where(c == 0, 0.0, -c * (g_lp + g_h * (LN2 * rel + entropy[:, None])))
        beta = torch.where(live, -c * g_h * LN2, 0.0)
    else:
        alpha = -c * g_lp
    alpha = torch.where(live, alpha, 0.0)
    return alpha.contiguous(), beta, torch.where(live.squeeze(1), g_lp.squeeze(1), 0.0)


def _target_blocks(tokens, vocab, block_v):
    """perm: (M,) rows sorted by target (stable: a fixed order of the adds),
    start: (ceil(V / block_v) + 1,) with perm[start[i]:start[i + 1]] the rows
    whose target lies in vocabulary block i (out-of-range targets in none)."""
    block = torch.div(tokens, block_v, rounding_mode="floor")
    order = torch.sort(block, stable=True)
    edges = torch.arange(triton.cdiv(vocab, block_v) + 1, device=tokens.device)
    start = torch.searchsorted(order.values, edges)
    return order.indices.contiguous(), start.contiguous()


def _dot_precision(dtype):
    # float32: as torch's matmuls on CUDA (TF32 only where torch allows it).
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def folded_fused_linear_policy_loss_forward(hidden, weight, bias, tokens, weights, advantages,
                                            old_logprobs, ref_logprobs, clip_low, clip_high,
                                            clip_ratio_c, kl_coef, entropy_coef, temperature,
                                            chunk_size, config: FoldedConfig | None = None):
    """fused_linear.fused_linear_policy_loss_forward with the folded kernels:
    hidden: (N, H), weight: (V, H), bias: (V,) or None (float32, bfloat16 or
    float16, one dtype), tokens: (N,) int64, weights/advantages/old/ref: (N,)
    (old/ref may be None). Returns loss (), logprobs (N,), entropy (N,) in
    float32, grad_hidden (N, H), grad_weight (V, H), grad_bias (V,) (empty
    without bias) in the inputs' dtype: the gradients of loss. Rows run in
    chunks of at most ``chunk_size``; each keeps an (chunk, V) buffer of E.
    ``config``: the kernels' blocks (default_config when None)."""
    op = "fused_linear_policy_loss"
    _check_rows(op, hidden, weight, bias, tokens, temperature, chunk_size, "triton",
                dict(weights=weights, advantages=advantages, old_logprobs=old_logprobs,
                     ref_logprobs=ref_logprobs), optional=("old_logprobs", "ref_logprobs"))
    clip_low, clip_high, clip_ratio_c, kl_coef, entropy_coef, temperature = v.check_loss_scalars(
        clip_low, clip_high, clip_ratio_c, kl_coef, entropy_coef, temperature, op=op)
    dtype, device = hidden.dtype, hidden.device
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: the folded kernels take float32, bfloat16 or float16 hidden, got "
                        f"{dtype} (float64 runs on the chunked path)")
    if device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(f"{op}: the folded triton kernels need CUDA tensors, or CPU tensors "
                           "with TRITON_INTERPRET=1 set before the process first imports triton")
    if device.type not in ("cpu", "cuda"):
        v._fail(op, f"hidden must be on a CUDA device (or the CPU under TRITON_INTERPRET=1), "
                    f"got {device}")
    config = default_config(dtype, device) if config is None else config
    if not isinstance(config, FoldedConfig):
        raise TypeError(f"{op}: config must be a FoldedConfig, got {type(config).__name__}")
    config.check()
    fwd, dh, dw = config.forward, config.dhidden, config.dweight

    N, H = hidden.shape
    V = weight.shape[0]
    acc = torch.float32
    hidden, weight = hidden.contiguous(), weight.contiguous()
    bias_arg = bias.contiguous() if bias is not None else weight  # unread without HAS_BIAS
    tokens = tokens.contiguous()
    live = weights.to(acc).contiguous()
    inv_t = _temperature_pair(temperature)[0]
    with_entropy = entropy_coef != 0
    e_dtype = acc if dtype == torch.float32 else dtype
    precision = _dot_precision(dtype)
    nt = triton.cdiv(V, fwd.vocab)
    padded_v = triton.cdiv(V, 16) * 16  # 16-element-aligned rows of E

    logprobs = torch.empty(N, dtype=acc, device=device)
    entropy = torch.empty(N, dtype=acc, device=device)
    loss = torch.zeros((), dtype=acc, device=device)
    grad_hidden = torch.empty_like(hidden)
    # float32 accumulators; empty, not zeros: the first chunk writes them.
    grad_weight = torch.empty((V, H), dtype=acc, device=device)
    grad_bias = torch.empty(V if bias is not None else 0, dtype=acc, device=device)
    ranges = _chunk_ranges(N, chunk_size)
    with _on_device(device):
        for index, (start, end) in enumerate(ranges):
            rows = end - start
            h, y = hidden[start:end], tokens[start:end]
            e = torch.empty((rows, padded_v), dtype=e_dtype, device=device)
            k, s, t = torch.empty((3, rows, nt), dtype=acc, device=device)
            # An out-of-range target (unchecked on CUDA) is in no tile: NaN log-prob.
            dy = torch.full((rows,), float("nan"), dtype=acc, device=device)
            _run(_fwd_kernel, (triton.cdiv(rows, fwd.rows) * nt,),
                 h, weight, bias_arg, y, live[start:end], e, k, s, t, dy, rows, V, H,
                 h.stride(0), weight.stride(0), e.stride(0), k.stride(0), inv_t,
                 HAS_BIAS=bias is not None, DOT_PRECISION=precision, BLOCK_M=fwd.rows,
                 BLOCK_V=fwd.vocab, BLOCK_K=fwd.hidden, num_warps=fwd.num_warps,
                 num_stages=fwd.num_stages, **KERNEL_OPTIONS)
            lp, ent, rel = _combine(k, s, t, dy, y, fwd.vocab)
            del k, s, t
            part, grad_lp, grad_ent = token_loss_and_grads(
                lp, ent, weights[start:end], advantages[start:end],
                None if old_logprobs is None else old_logprobs[start:end],
                None if ref_logprobs is None else ref_logprobs[start:end],
                clip_low, clip_high, clip_ratio_c, kl_coef, entropy_coef)
            alpha, beta, g_y = _backward_scalars(rel, grad_lp, grad_ent, ent, inv_t, with_entropy)
            beta_arg = alpha if beta is None else beta  # unread without ENTROPY
            out = grad_hidden[start:end]
            _run(_dhidden_kernel, (triton.cdiv(rows, dh.rows) * triton.cdiv(H, dh.hidden),),
                 e, weight, alpha, beta_arg, y, g_y, out, rows, V, H,
                 e.stride(0), weight.stride(0), alpha.stride(0), out.stride(0),
                 ENTROPY=with_entropy, APPROX_LOG=APPROX_LOG, DOT_PRECISION=precision,
                 SCALE_TILE=fwd.vocab,
                 BLOCK_M=dh.rows, BLOCK_V=dh.vocab,
                 BLOCK_H=dh.hidden, num_warps=dh.num_warps, num_stages=dh.num_stages,
                 **KERNEL_OPTIONS)
            perm, block_start = _target_blocks(y, V, dw.vocab)
            _run(_dweight_kernel, (triton.cdiv(V, dw.vocab) * triton.cdiv(H, dw.hidden),),
                 e, h, alpha, beta_arg, perm, block_start, y, g_y, live[start:end], grad_weight,
                 grad_bias if bias is not None else grad_weight, rows, V, H,
                 e.stride(0), h.stride(0), alpha.stride(0),
                 FIRST=index == 0, HAS_BIAS=bias is not None, ENTROPY=with_entropy,
                 APPROX_LOG=APPROX_LOG,
                 DOT_PRECISION=precision, SCALE_TILE=fwd.vocab, BLOCK_M=dw.rows,
                 BLOCK_V=dw.vocab, BLOCK_H=dw.hidden, BLOCK_T=config.target,
                 num_warps=dw.num_warps, num_stages=dw.num_stages, **KERNEL_OPTIONS)
            del e
            logprobs[start:end] = lp
            entropy[start:end] = ent
            loss += part
    if not ranges:  # no rows: nothing wrote the accumulators
        grad_weight.zero_()
        grad_bias.zero_()
    return (loss, logprobs, entropy, grad_hidden, grad_weight.to(weight.dtype),
            grad_bias.to(weight.dtype))
