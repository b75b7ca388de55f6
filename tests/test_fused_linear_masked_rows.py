"""The fused-linear ops compute only the rows that count (issue 18 section 1).

Masked tokens are gathered away before the first matmul, rows whose gradient
is exactly 0 skip the two backward products, and the sync-free path (every
row computed, masked hidden states zeroed) used under torch.compile and CUDA
graph capture gives the same numbers. Also the contracts this adds: outputs
0 at masked positions, a NaN in a masked row's hidden state never reaches any
gradient, and double backward through the kernels is refused by name.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import riskpo_kernels as rk
from riskpo_kernels.policy import fused_linear

AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm", "trl-grpo")
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.float64: dict(rtol=1e-11, atol=1e-13)}


def _batch(dtype, B=3, T=9, H=12, V=41, masked=0.4, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype)
    weight = (0.3 * torch.randn(V, H, generator=g)).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) >= masked
    mask[0, 0] = True
    advantages = torch.randn(B, generator=g).to(dtype)
    old = (torch.randn(B, T, generator=g) * 0.5 - 3.5).to(dtype)
    return hidden, weight, b, tokens, mask, advantages, old


def _loss_and_grads(impl, hidden, weight, bias, tokens, mask, advantages, old, **kw):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    b = None if bias is None else bias.clone().requires_grad_()
    out = rk.fused_linear_policy_loss(h, w, tokens, mask, advantages, bias=b, old_logprobs=old,
                                      impl=impl, **kw)
    out.loss.backward()
    return dict(loss=out.loss.detach(), logprobs=out.logprobs, entropy=out.entropy,
                hidden=h.grad, weight=w.grad, bias=None if b is None else b.grad,
                metrics=out.metrics)


def _assert_same(got, want, dtype):
    for key in ("loss", "logprobs", "entropy", "hidden", "weight", "bias"):
        if want[key] is None:
            assert got[key] is None, key
            continue
        torch.testing.assert_close(got[key], want[key], **TOL[dtype], msg=key)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
@pytest.mark.parametrize("agg", AGGS)
@pytest.mark.parametrize("bias", (True, False))
def test_gathered_rows_match_the_reference(dtype, agg, bias):
    args = _batch(dtype, bias=bias, seed=len(agg))
    got = _loss_and_grads("cpp", *args, agg=agg, chunk_size=5)
    want = _loss_and_grads("reference", *args, agg=agg)
    _assert_same(got, want, dtype)
    mask = args[4]
    assert torch.all(got["logprobs"][~mask] == 0) and torch.all(got["entropy"][~mask] == 0)
    assert torch.all(got["hidden"][~mask] == 0)
    for name, value in got["metrics"].items():
        torch.testing.assert_close(value, want["metrics"][name], **TOL[dtype], msg=name)


class _RowsSeen(TorchDispatchMode):
    """Records the row count of every fused-linear op call."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "riskpo" and "fused_linear" in func.name():
            self.rows.append(args[0].shape[0])
        return func(*args, **(kwargs or {}))


def test_masked_rows_never_reach_the_op():
    """The op sees only the valid rows: its hidden argument has M < N rows."""
    hidden, weight, bias, tokens, mask, advantages, old = _batch(torch.float32)
    with _RowsSeen() as seen:
        rk.fused_linear_policy_loss(hidden, weight, tokens, mask, advantages, bias=bias,
                                    old_logprobs=old)
        rk.fused_linear_logprobs(hidden, weight, tokens, bias=bias, mask=mask)
    assert seen.rows == [int(mask.sum())] * 2


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_nan_hidden_at_masked_tokens_stays_out_of_every_gradient(dtype):
    hidden, weight, bias, tokens, mask, advantages, old = _batch(dtype)
    hidden[~mask] = float("nan")
    old = old.masked_fill(~mask, float("nan"))
    clean = _batch(dtype)[0]
    clean[~mask] = 0
    for impl in ("cpp", "reference"):
        got = _loss_and_grads(impl, hidden, weight, bias, tokens, mask, advantages, old)
        want = _loss_and_grads(impl, clean, weight, bias, tokens, mask, advantages, old)
        for key in ("loss", "hidden", "weight", "bias"):
            assert torch.isfinite(got[key]).all(), (impl, key)
        _assert_same(got, want, dtype)
        assert torch.all(got["hidden"][~mask] == 0)


def test_nan_hidden_at_an_unmasked_token_is_reported():
    hidden, weight, bias, tokens, mask, advantages, old = _batch(torch.float32)
    hidden[0, 0] = float("nan")  # mask[0, 0] is True
    got = _loss_and_grads("cpp", hidden, weight, bias, tokens, mask, advantages, old)
    assert torch.isnan(got["loss"])


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_sync_free_dense_path_matches_the_gathered_one(dtype, monkeypatch):
    """What runs under torch.compile / CUDA graph capture: every row, masked
    hidden states zeroed, no host sync."""
    args = list(_batch(dtype))
    args[0][~args[4]] = float("nan")
    gathered = _loss_and_grads("cpp", *args, chunk_size=4)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    # The per-chunk skip would drop the masked rows too: test the zeroing alone.
    monkeypatch.setattr(fused_linear, "ZERO_ROW_SKIP_MIN_FRACTION", 2.0)
    dense = _loss_and_grads("cpp", *args, chunk_size=4)
    _assert_same(dense, gathered, dtype)
    assert torch.isfinite(dense["weight"]).all()


def test_compiled_fullgraph_matches_eager():
    hidden, weight, bias, tokens, mask, advantages, old = _batch(torch.float32)

    def loss(h, w, b):
        return rk.fused_linear_policy_loss(h, w, tokens, mask, advantages, bias=b,
                                           old_logprobs=old).loss

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True)
    grads = []
    for fn in (loss, compiled):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        value = fn(h, w, b)
        value.backward()
        grads.append((value.detach(), h.grad, w.grad, b.grad))
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, **TOL[torch.float32])


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_all_masked_gives_zero_loss_and_gradients(dtype):
    hidden, weight, bias, tokens, mask, advantages, old = _batch(dtype)
    got = _loss_and_grads("cpp", hidden, weight, bias, tokens, torch.zeros_like(mask), advantages,
                          old)
    want = _loss_and_grads("reference", hidden, weight, bias, tokens, torch.zeros_like(mask),
                           advantages, old)
    _assert_same(got, want, dtype)
    for key in ("loss", "logprobs", "entropy", "hidden", "weight", "bias"):
        assert torch.all(got[key] == 0), key


def _clipping_batch(dtype, clipped_fraction=0.5):
    """Positive advantages and old log-probs far below logp for about
    ``clipped_fraction`` of the tokens: ratio > 1 + clip_high, gradient 0."""
    hidden, weight, bias, tokens, mask, advantages, _ = _batch(dtype, B=4, T=16, masked=0.0)
    advantages = advantages.abs() + 0.1
    with torch.no_grad():
        lp, _ = rk.fused_linear_logprobs(hidden, weight, tokens, bias=bias)
    g = torch.Generator().manual_seed(7)
    clip = torch.rand(lp.shape, generator=g) < clipped_fraction
    old = torch.where(clip, lp - 1.0, lp + 0.01 * torch.randn(lp.shape, generator=g)).to(dtype)
    return hidden, weight, bias, tokens, mask, advantages, old


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_zero_gradient_rows_skip_the_products_with_the_same_result(dtype, monkeypatch):
    args = _clipping_batch(dtype)
    calls = []
    pick = fused_linear._rows_worth_skipping

    def spy(live):
        kept = pick(live)
        calls.append(None if kept is None else (live.shape[0], kept.numel()))
        return kept

    monkeypatch.setattr(fused_linear, "_rows_worth_skipping", spy)
    skipped = _loss_and_grads("cpp", *args, chunk_size=16)
    assert any(c is not None and c[1] < c[0] for c in calls), calls
    monkeypatch.setattr(fused_linear, "ZERO_ROW_SKIP_MIN_FRACTION", 2.0)  # never skip
    calls.clear()
    full = _loss_and_grads("cpp", *args, chunk_size=16)
    assert all(c is None for c in calls)
    _assert_same(skipped, full, dtype)
    _assert_same(skipped, _loss_and_grads("reference", *args), dtype)


def test_a_chunk_of_only_zero_gradient_rows_adds_nothing():
    hidden, weight, bias, tokens, mask, advantages, old = _clipping_batch(torch.float64, 1.0)
    got = _loss_and_grads("cpp", hidden, weight, bias, tokens, mask, advantages, old, chunk_size=8)
    want = _loss_and_grads("reference", hidden, weight, bias, tokens, mask, advantages, old)
    _assert_same(got, want, torch.float64)
    assert torch.all(got["weight"] == 0) and torch.all(got["hidden"] == 0)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_logprobs_with_a_mask(dtype):
    hidden, weight, bias, tokens, mask, _, _ = _batch(dtype)
    hidden[~mask] = float("nan")
    g = torch.Generator().manual_seed(3)
    up_lp, up_ent = (torch.randn(mask.shape, generator=g, dtype=dtype) for _ in range(2))
    results = {}
    for impl in ("cpp", "reference"):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        lp, ent = rk.fused_linear_logprobs(h, w, tokens, bias=b, mask=mask, impl=impl,
                                           chunk_size=4)
        ((lp * up_lp).sum() + (ent * up_ent).sum()).backward()
        results[impl] = (lp.detach(), ent.detach(), h.grad, w.grad, b.grad)
        assert torch.all(lp[~mask] == 0) and torch.all(ent[~mask] == 0), impl
        assert torch.all(h.grad[~mask] == 0) and torch.isfinite(w.grad).all(), impl
    for got, want in zip(results["cpp"], results["reference"]):
        torch.testing.assert_close(got, want, **TOL[dtype])
    # Valid positions equal the unmasked call's.
    clean = hidden.masked_fill(~mask[..., None], 0)
    lp_all, ent_all = rk.fused_linear_logprobs(clean, weight, tokens, bias=bias)
    torch.testing.assert_close(results["cpp"][0][mask], lp_all[mask], **TOL[dtype])
    torch.testing.assert_close(results["cpp"][1][mask], ent_all[mask], **TOL[dtype])


def test_logprobs_mask_is_checked():
    hidden, weight, bias, tokens, mask, _, _ = _batch(torch.float32)
    with pytest.raises(ValueError, match="mask must have shape"):
        rk.fused_linear_logprobs(hidden, weight, tokens, mask=mask[:, :-1])
    with pytest.raises(ValueError, match="mask"):
        rk.fused_linear_logprobs(hidden, weight, tokens, mask=mask.long())
    with pytest.raises(ValueError, match="mask"):
        rk.fused_linear_logprobs(hidden, weight, tokens, mask=-mask.float())


def _double_backward(fn, x):
    (g,) = torch.autograd.grad(fn(x), x, create_graph=True)
    return torch.autograd.grad((g ** 2).sum(), x)[0]


@pytest.mark.parametrize("impl", ("cpp",))
def test_double_backward_is_refused_by_the_public_name(impl):
    hidden, weight, bias, tokens, mask, advantages, old = _batch(torch.float64)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    cases = {
        "fused_linear_policy_loss": (hidden, lambda h: rk.fused_linear_policy_loss(
            h, weight, tokens, mask, advantages, bias=bias, old_logprobs=old, impl=impl).loss),
        "fused_linear_logprobs": (hidden, lambda h: rk.fused_linear_logprobs(
            h, weight, tokens, bias=bias, impl=impl)[0].sum()),
        "policy_loss": (logits, lambda z: rk.policy_loss(
            z, tokens, mask, advantages, old_logprobs=old, impl=impl).loss),
    }
    for name, (x, fn) in cases.items():
        x = x.clone().requires_grad_()
        with pytest.raises(RuntimeError, match=f"^{name}: double backward") as info:
            _double_backward(fn, x)
        assert "logits" not in str(info.value) or name == "policy_loss"
    z = logits.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="^policy_loss: double backward"):
        _double_backward(lambda z: rk.policy_loss(z * 1, tokens, mask, advantages, impl=impl,
                                                  inplace_backward=True).loss, z)


def test_double_backward_through_the_reference_is_autograd():
    hidden, weight, bias, tokens, mask, advantages, old = _batch(torch.float64, B=2, T=3, V=7)

    def ours(h):
        return rk.fused_linear_policy_loss(h, weight, tokens, mask, advantages, bias=bias,
                                           old_logprobs=old, impl="reference").loss

    def plain(h):  # the same loss written directly, no masking tricks needed (no NaN)
        logits = torch.nn.functional.linear(h, weight, bias)
        lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
        ratio = torch.exp(torch.clamp(lp - old, -20, 20))
        A = advantages[:, None]
        l = torch.maximum(-A * ratio, -A * torch.clamp(ratio, 0.8, 1.2))
        l = torch.where(A < 0, torch.minimum(l, -A * 3.0), l)
        m = mask.to(l.dtype)
        return (l * m).sum() / m.sum()

    x = hidden.clone().requires_grad_()
    torch.testing.assert_close(_double_backward(ours, x), _double_backward(plain, x),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64))
def test_raw_op_weight_zero_rows_with_nan_hidden_leave_the_gradients_finite(dtype, monkeypatch):
    """A trainer calling torch.ops.riskpo.fused_linear_policy_loss itself may leave
    padding rows (weight 0) in, NaN included: too few of them to be skipped, they
    must still give the gradients nothing."""
    monkeypatch.setattr(fused_linear, "ZERO_ROW_SKIP_MIN_FRACTION", 2.0)
    g = torch.Generator().manual_seed(5)
    N, H, V = 20, 8, 30
    hidden = torch.randn(N, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype)
    bias = torch.randn(V, generator=g, dtype=dtype)
    tokens = torch.randint(0, V, (N,), generator=g)
    weights = torch.full((N,), 1.0 / N, dtype=dtype)
    weights[[3, 7]] = 0
    advantages = torch.randn(N, generator=g, dtype=dtype)
    clean = hidden.clone()
    clean[[3, 7]] = 0
    hidden[[3, 7]] = float("nan")
    args = (weight, bias, tokens, weights, advantages, None, None, 0.2, 0.2, 3.0, 0.0, 0.0, 1.0, 8,
            "cpp")
    got = torch.ops.riskpo.fused_linear_policy_loss(hidden, *args)
    want = torch.ops.riskpo.fused_linear_policy_loss(clean, *args)
    for index in (0, 3, 4, 5):  # loss, grad_hidden, grad_weight, grad_bias
        assert torch.isfinite(got[index]).all(), index
        torch.testing.assert_close(got[index], want[index], **TOL[dtype])
