"""Policy-loss kernels (C++ CPU) against the reference: loss, log-probs,
entropy, metrics and gradients, for every aggregation, dtype and odd vocabulary."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

import riskpo_kernels as rk
from riskpo_kernels.policy import AGGREGATIONS, logprobs_and_entropy_reference

from conftest import assert_close_for, assert_compiled_matches_eager, check_inplace_backward

LOGIT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def make_batch(B, T, V, dtype, g, with_old, with_ref, per_token_adv):
    logits = (torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[-1] = False  # a fully masked row
    mask[0, 0] = True
    shape = (B, T) if per_token_adv else (B,)
    advantages = torch.randn(shape, generator=g, dtype=torch.float64).float()
    with torch.no_grad():
        logp, _ = logprobs_and_entropy_reference(logits.reshape(-1, V).double(), tokens.reshape(-1), 1.0)
    # Old log-probs spread widely around the current ones: ratios land inside
    # the clip range, above and below it, and past the dual clip.
    old = (logp.view(B, T) + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.6).float() if with_old else None
    ref = (logp.view(B, T) + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3).float() if with_ref else None
    return logits, tokens, mask, advantages, old, ref


def run(impl, logits, tokens, mask, advantages, old, ref, **kwargs):
    x = logits.detach().clone().requires_grad_()
    out = rk.policy_loss(x, tokens, mask, advantages, old_logprobs=old, ref_logprobs=ref,
                         impl=impl, **kwargs)
    out.loss.backward()
    return out, x.grad


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("with_old, with_ref", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("dtype", LOGIT_DTYPES)
def test_cpp_matches_reference(cpp_available, agg, with_old, with_ref, dtype):
    g = torch.Generator().manual_seed(zlib.crc32(repr((agg, with_old, with_ref, dtype)).encode()))
    for (B, T, V), temperature, per_token in itertools.product(
            [(3, 4, 1), (2, 5, 7), (3, 3, 2049), (2, 2, 5003)], (1.0, 0.7), (False, True)):
        batch = make_batch(B, T, V, dtype, g, with_old, with_ref, per_token)
        kwargs = dict(agg=agg, temperature=temperature, kl_coef=0.05 if with_ref else 0.0,
                      entropy_coef=0.01)
        got, got_grad = run("cpp", *batch, **kwargs)
        want, want_grad = run("reference", *batch, **kwargs)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        what = f"{(B, T, V)} T={temperature} per_token={per_token}"
        for name in ("logprobs", "entropy"):
            assert getattr(got, name).dtype == acc
            assert_close_for(getattr(got, name), getattr(want, name), acc, msg=lambda m: f"{name} {what}: {m}")
        assert_close_for(got.loss, want.loss, acc, msg=lambda m: f"loss {what}: {m}")
        assert got.metrics.keys() == want.metrics.keys()
        for key in got.metrics:
            assert_close_for(got.metrics[key], want.metrics[key], acc, msg=lambda m: f"{key} {what}: {m}")
        assert got_grad.dtype == dtype
        assert_close_for(got_grad, want_grad, dtype, msg=lambda m: f"grad {what}: {m}")


def test_gradcheck_of_the_op(cpp_available):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randint(0, 9, (4,), generator=g)

    def f(x):
        logprobs, entropy, _ = torch.ops.riskpo.token_logprob_entropy(x, tokens, 0.8)
        return logprobs, entropy

    assert torch.autograd.gradcheck(f, (logits,))


def test_opcheck(cpp_available):
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        logits = torch.randn(5, 13, generator=g).to(dtype)
        tokens = torch.randint(0, 13, (5,), generator=g)
        torch.library.opcheck(torch.ops.riskpo.token_logprob_entropy.default, (logits, tokens, 0.9))
        torch.library.opcheck(torch.ops.riskpo.token_logprob_entropy.default,
                              (logits.clone().requires_grad_(), tokens, 1.0))
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        logprobs, entropy, lse = torch.ops.riskpo.token_logprob_entropy(logits, tokens, 0.9)
        torch.library.opcheck(torch.ops.riskpo.token_logprob_entropy_backward.default,
                              (torch.randn(5, generator=g).to(acc), torch.randn(5, generator=g).to(acc),
                               logits, tokens, lse, entropy, 0.9))
        torch.library.opcheck(torch.ops.riskpo.token_logprob_entropy_backward_.default,
                              (torch.randn(5, generator=g).to(acc), torch.randn(5, generator=g).to(acc),
                               logits.clone(), tokens, lse, entropy, 0.9))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 7, 301, 1031])
def test_the_in_place_backward_writes_exactly_the_out_of_place_gradient(cpp_available, dtype, vocab):
    g = torch.Generator().manual_seed(vocab)
    rows = 6
    logits = (torch.randn(rows, vocab, generator=g) * 4).to(dtype)
    logits[1, 0] = float("-inf") if vocab > 1 else 0.0  # a masked entry: zero gradient, no NaN
    tokens = torch.randint(0, vocab, (rows,), generator=g)
    tokens[1] = vocab - 1
    logprobs, entropy, lse = torch.ops.riskpo.token_logprob_entropy(logits, tokens, 0.7)
    grad_lp = torch.randn(rows, generator=g).to(logprobs.dtype)
    grad_ent = torch.randn(rows, generator=g).to(logprobs.dtype)
    grad_lp[3] = grad_ent[3] = 0  # the all-zero row shortcut
    expected = torch.ops.riskpo.token_logprob_entropy_backward(grad_lp, grad_ent, logits, tokens,
                                                               lse, entropy, 0.7)
    buffer = logits.clone()
    torch.ops.riskpo.token_logprob_entropy_backward_(grad_lp, grad_ent, buffer, tokens, lse,
                                                     entropy, 0.7)
    assert torch.equal(buffer, expected)  # the target's logit is read before its row is written


def test_the_in_place_backward_refuses_logits_it_cannot_overwrite(cpp_available):
    logits = torch.randn(4, 10)
    tokens = torch.zeros(4, dtype=torch.long)
    _, entropy, lse = torch.ops.riskpo.token_logprob_entropy(logits, tokens, 1.0)
    with pytest.raises(RuntimeError, match="logits must be a contiguous"):
        torch.ops.riskpo.token_logprob_entropy_backward_(torch.ones(4), torch.ones(4), logits.t(),
                                                         tokens, lse, entropy, 1.0)


def test_torch_compile_fullgraph_forward_and_backward(cpp_available):
    g = torch.Generator().manual_seed(2)
    logits, tokens, mask, advantages, old, _ = make_batch(2, 3, 17, torch.float32, g, True, False, False)

    def step(x):
        out = rk.policy_loss(x, tokens, mask, advantages, old_logprobs=old, agg="seq-mean-token-mean")
        return out.loss

    assert_compiled_matches_eager(step, logits)


@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_extreme_logits_stay_finite(impl):
    V = 4099
    rows = [torch.full((V,), 1e4), torch.full((V,), -1e4), torch.zeros(V),
            torch.cat([torch.tensor([1e4]), torch.full((V - 1,), -1e4)]),  # one-hot
            torch.cat([torch.tensor([3.0, float("-inf")]), torch.randn(V - 2)])]  # masked vocabulary
    logits = torch.stack(rows)[None]                                    # (1, 5, V)
    tokens = torch.tensor([[0, 5, 7, 0, 2]])
    out, grad = run(impl, logits, tokens, torch.ones(1, 5), torch.tensor([1.0]), None,
                    None, entropy_coef=0.1)
    assert torch.isfinite(out.loss) and torch.isfinite(out.logprobs).all()
    assert torch.isfinite(out.entropy).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(out.entropy[0, :3], torch.full((3,), float(torch.log(torch.tensor(V * 1.0)))),
                               rtol=1e-5, atol=1e-4)
    assert abs(float(out.entropy[0, 3])) < 1e-6 and float(out.logprobs[0, 3]) == 0.0


@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_nan_logits_are_reported_unless_masked(impl):
    logits = torch.randn(1, 3, 6)
    logits[0, 1, 2] = float("nan")
    tokens = torch.zeros(1, 3, dtype=torch.long)
    masked = rk.policy_loss(logits, tokens, torch.tensor([[True, False, True]]), torch.tensor([1.0]),
                            entropy_coef=0.1, impl=impl)
    assert torch.isfinite(masked.loss) and all(torch.isfinite(m) for m in masked.metrics.values())
    unmasked = rk.policy_loss(logits, tokens, torch.ones(1, 3), torch.tensor([1.0]), impl=impl)
    assert torch.isnan(unmasked.loss) and torch.isnan(unmasked.logprobs[0, 1])


def test_inplace_backward_writes_the_gradient_over_the_logits(cpp_available):
    check_inplace_backward("cpp")


def test_inplace_backward_refuses_what_it_cannot_overwrite(cpp_available):
    args = (torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="must be contiguous"):
        rk.policy_loss(torch.randn(2, 5, 3).transpose(1, 2), *args, inplace_backward=True)
    with pytest.raises(ValueError, match="inplace_backward must be True or False"):
        rk.policy_loss(torch.randn(2, 3, 5), *args, inplace_backward="yes")


def test_input_logits_are_not_modified(cpp_available):
    logits = torch.randn(2, 3, 10, requires_grad=True)
    before = logits.detach().clone()
    rk.policy_loss(logits, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3),
                   torch.tensor([1.0, -1.0])).loss.backward()
    assert torch.equal(logits.detach(), before)


GOOD = dict(logits=torch.randn(2, 3, 5), tokens=torch.zeros(2, 3, dtype=torch.long),
            mask=torch.ones(2, 3), advantages=torch.ones(2))


@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("overrides, match", [
    (dict(logits=torch.randn(6, 5)), r"logits must be \(B, T, V\)"),
    (dict(logits=torch.randn(2, 3, 5).long()), "logits must be float32"),
    (dict(logits=torch.randn(2, 3, 0)), "empty vocabulary"),
    (dict(tokens=torch.zeros(2, 4, dtype=torch.long)), r"tokens must have shape \(2, 3\)"),
    (dict(tokens=torch.zeros(2, 3)), "tokens must be int64"),
    (dict(tokens=torch.full((2, 3), 5)), r"tokens must lie in \[0, 5\)"),
    (dict(tokens=torch.full((2, 3), -1)), r"tokens must lie in \[0, 5\)"),
    (dict(mask=torch.ones(3, 2)), r"mask must have shape \(2, 3\)"),
    (dict(mask=torch.ones(2, 3, dtype=torch.long)), "mask must be bool or floating"),
    (dict(advantages=torch.ones(3)), "advantages must be"),
    (dict(advantages=torch.ones(2, dtype=torch.long)), "advantages must be float32"),
    (dict(old_logprobs=torch.zeros(2, 2)), r"old_logprobs must have shape \(2, 3\)"),
    (dict(ref_logprobs=torch.zeros(2, 3, dtype=torch.int32)), "ref_logprobs must be float32"),
    (dict(agg="seq-sum"), "agg must be one of"),
    (dict(impl="triton-ish"), "impl must be one of"),
    (dict(temperature=0.0), "temperature must be finite and > 0"),
    (dict(clip_ratio_c=1.0), "clip_ratio_c must be > 1"),
    (dict(clip_low=-0.1), "clip_low must be >= 0"),
    (dict(kl_coef=float("nan")), "kl_coef must be finite"),
])
def test_bad_input(impl, overrides, match):
    kwargs = {**GOOD, "impl": impl, **overrides}
    with pytest.raises(ValueError, match=match):
        rk.policy_loss(kwargs.pop("logits"), kwargs.pop("tokens"), kwargs.pop("mask"),
                       kwargs.pop("advantages"), **kwargs)


def test_op_rejects_out_of_range_tokens(cpp_available):
    with pytest.raises(RuntimeError, match=r"tokens must lie in \[0, 5\), got 7 at position 1"):
        torch.ops.riskpo.token_logprob_entropy(torch.randn(2, 5), torch.tensor([0, 7]), 1.0)
    with pytest.raises(RuntimeError, match="temperature must be finite and > 0"):
        torch.ops.riskpo.token_logprob_entropy(torch.randn(2, 5), torch.tensor([0, 1]), -1.0)
    with pytest.raises(RuntimeError, match="tokens must be int64"):
        torch.ops.riskpo.token_logprob_entropy(torch.randn(2, 5), torch.tensor([0, 1], dtype=torch.int32), 1.0)
