"""Fused linear policy loss (chunked lm_head + vocabulary kernels, gradient in
forward) against the reference that materialises the logits."""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

import riskpo_kernels as rk
from riskpo_kernels.policy import AGGREGATIONS, aggregation_weights, token_policy_loss
from riskpo_kernels.policy.token_loss import token_loss_and_grads

from conftest import assert_close_for


def seeded(*parts):
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def make_inputs(B, T, H, V, dtype, g, with_bias, with_old, with_ref, per_token_adv):
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64).to(dtype)
    weight = (torch.randn(V, H, generator=g, dtype=torch.float64) / H**0.5).to(dtype)
    bias = torch.randn(V, generator=g, dtype=torch.float64).to(dtype) if with_bias else None
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[-1] = False
    mask[0, 0] = True
    advantages = torch.randn((B, T) if per_token_adv else (B,), generator=g)
    with torch.no_grad():
        logits = torch.nn.functional.linear(hidden.double(), weight.double(),
                                            None if bias is None else bias.double())
        logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    old = (logp + 0.6 * torch.randn(B, T, generator=g, dtype=torch.float64)).float() if with_old else None
    ref = (logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)).float() if with_ref else None
    return hidden, weight, bias, tokens, mask, advantages, old, ref


def run(impl, hidden, weight, bias, tokens, mask, advantages, old, ref, **kwargs):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None
              for t in (hidden, weight, bias)]
    out = rk.fused_linear_policy_loss(leaves[0], leaves[1], tokens, mask, advantages, bias=leaves[2],
                                      old_logprobs=old, ref_logprobs=ref, impl=impl, **kwargs)
    (out.loss * 1.5).backward()  # a non-unit upstream gradient: backward must scale
    return out, [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias, with_old, with_ref", [(False, False, False), (True, True, False),
                                                          (False, True, True)])
def test_fused_cpp_matches_reference(cpp_available, agg, dtype, with_bias, with_old, with_ref):
    g = seeded(agg, dtype, with_bias, with_old, with_ref)
    for (B, T, H, V), chunk, temperature, per_token in itertools.product(
            [(2, 3, 8, 1), (3, 4, 16, 37), (2, 5, 12, 2053)], (1, 4, None), (1.0, 0.7), (False, True)):
        inputs = make_inputs(B, T, H, V, dtype, g, with_bias, with_old, with_ref, per_token)
        kwargs = dict(agg=agg, temperature=temperature, kl_coef=0.05 if with_ref else 0.0,
                      entropy_coef=0.01)
        got, got_grads = run("cpp", *inputs, chunk_size=chunk, **kwargs)
        want, want_grads = run("reference", *inputs, **kwargs)
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        what = f"{(B, T, H, V)} chunk={chunk} T={temperature}"
        assert_close_for(got.loss, want.loss.to(acc), acc, msg=lambda m: f"loss {what}: {m}")
        for name in ("logprobs", "entropy"):
            assert_close_for(getattr(got, name), getattr(want, name), acc,
                             msg=lambda m: f"{name} {what}: {m}")
        for key in want.metrics:
            assert_close_for(got.metrics[key], want.metrics[key], acc, msg=lambda m: f"{key}: {m}")
        for name, a, b in zip(("hidden", "weight", "bias"), got_grads, want_grads):
            if b is None:
                assert a is None
                continue
            assert a.dtype == dtype
            if dtype == torch.bfloat16:
                # Both round the logits and their gradient to bf16 between matmuls,
                # in different chunkings: compare by relative norm, as METHOD.md does.
                err = (a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-12)
                assert err < 2e-2, f"grad {name} {what}: relative error {err:.2e}"
            else:
                assert_close_for(a, b, dtype, msg=lambda m: f"grad {name} {what}: {m}")


def test_fused_token_gradients_equal_autograd_through_the_reference():
    # The fused path adds the closed-form derivative of per_token_loss; the
    # reference differentiates the same definition with autograd. Ties on the
    # clip boundaries and the dual clip included.
    g = seeded("closed-form")
    for agg, with_old in itertools.product(AGGREGATIONS, (False, True)):
        B, T = 5, 7
        logp = (torch.randn(B, T, generator=g, dtype=torch.float64) - 2).requires_grad_()
        entropy = (torch.rand(B, T, generator=g, dtype=torch.float64) * 3).requires_grad_()
        mask = torch.rand(B, T, generator=g) > 0.3
        A = torch.randn(B, generator=g, dtype=torch.float64)
        A[0] = 0.0
        old = logp.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.7 if with_old else None
        if with_old:  # exact ties: ratio on each clip boundary, and on the dual clip
            old[1, 0] = logp[1, 0].detach() - torch.log(torch.tensor(1.2, dtype=torch.float64))
            old[1, 1] = logp[1, 1].detach() - torch.log(torch.tensor(0.8, dtype=torch.float64))
        ref = logp.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3
        loss, _ = token_policy_loss(logp, entropy, mask, A, old, ref, kl_coef=0.1,
                                    entropy_coef=0.02, agg=agg)
        want_lp, want_h = torch.autograd.grad(loss, (logp, entropy))
        w = aggregation_weights(mask, agg).double().reshape(-1)
        got_loss, got_lp, got_h = token_loss_and_grads(
            logp.detach().reshape(-1), entropy.detach().reshape(-1), w,
            A[:, None].expand(B, T).reshape(-1), None if old is None else old.reshape(-1),
            ref.reshape(-1), kl_coef=0.1, entropy_coef=0.02)
        torch.testing.assert_close(got_loss, loss.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_lp.view(B, T), want_lp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got_h.view(B, T), want_h, rtol=1e-12, atol=1e-12)


def test_fused_token_gradients_ignore_nan_at_tokens_of_weight_zero():
    logp = torch.tensor([-1.0, float("nan"), -2.0])
    entropy = torch.tensor([0.5, float("nan"), 1.0])
    weights = torch.tensor([0.5, 0.0, 0.5])
    loss, grad_lp, grad_h = token_loss_and_grads(logp, entropy, weights, torch.tensor([1.0, 1.0, -1.0]),
                                                 torch.tensor([-1.1, -3.0, -1.9]), entropy_coef=0.1)
    assert torch.isfinite(loss) and torch.isfinite(grad_lp).all() and torch.isfinite(grad_h).all()
    assert grad_lp[1].item() == 0.0 and grad_h[1].item() == 0.0
    weights[1] = 1e-3  # a response token: its NaN is reported
    assert torch.isnan(token_loss_and_grads(logp, entropy, weights, torch.ones(3))[0])


def test_opcheck_fused_op(cpp_available):
    g = seeded("opcheck")
    N, H, V = 7, 6, 11
    for bias in (None, torch.randn(V, generator=g)):
        args = (torch.randn(N, H, generator=g, requires_grad=True),
                torch.randn(V, H, generator=g, requires_grad=True),
                None if bias is None else bias.requires_grad_(),
                torch.randint(0, V, (N,), generator=g), torch.rand(N, generator=g),
                torch.randn(N, generator=g), torch.randn(N, generator=g) - 2, None,
                0.2, 0.28, 3.0, 0.0, 0.01, 0.9, 3, "cpp")
        torch.library.opcheck(torch.ops.riskpo.fused_linear_policy_loss.default, args)


def test_torch_compile_fullgraph(cpp_available):
    torch._dynamo.reset()
    hidden, weight, bias, tokens, mask, advantages, old, _ = make_inputs(
        2, 3, 8, 19, torch.float32, seeded("compile"), True, True, False, False)

    def step(h, w):
        return rk.fused_linear_policy_loss(h, w, tokens, mask, advantages, bias=bias,
                                           old_logprobs=old, chunk_size=2).loss

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    compiled(h1, w1).backward()
    step(h2, w2).backward()
    torch.testing.assert_close(h1.grad, h2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


GOOD = dict(hidden=torch.randn(2, 3, 4), weight=torch.randn(5, 4),
            tokens=torch.zeros(2, 3, dtype=torch.long), mask=torch.ones(2, 3),
            advantages=torch.ones(2))


@pytest.mark.parametrize("overrides, match", [
    (dict(hidden=torch.randn(6, 4)), r"hidden must be \(B, T, H\)"),
    (dict(weight=torch.randn(5, 3)), r"weight must be \(V, H\) with H = 4"),
    (dict(weight=torch.randn(5, 4).double()), "must match hidden"),
    (dict(bias=torch.randn(4)), r"bias must be \(5,\)"),
    (dict(chunk_size=0), "chunk_size must be >= 1"),
    (dict(tokens=torch.full((2, 3), 5)), r"tokens must lie in \[0, 5\)"),
    (dict(agg="mean"), "agg must be one of"),
])
def test_bad_input(overrides, match):
    kwargs = {**GOOD, **overrides}
    with pytest.raises(ValueError, match=match):
        rk.fused_linear_policy_loss(kwargs.pop("hidden"), kwargs.pop("weight"), kwargs.pop("tokens"),
                                    kwargs.pop("mask"), kwargs.pop("advantages"), **kwargs)


@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_logprobs_matches_the_materialised_logits(impl, dtype, request):
    if impl == "cpp":
        request.getfixturevalue("cpp_available")  # fails loudly when the build is missing
    g = torch.Generator().manual_seed(7)
    B, T, H, V = 3, 5, 16, 37
    hidden = torch.randn(B, T, H, generator=g).to(dtype)
    weight = torch.randn(V, H, generator=g).to(dtype)
    bias = torch.randn(V, generator=g).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    # The oracle starts from the same logits (the matmul in the storage dtype):
    # what is checked is everything after them, in float32.
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    logp_all = torch.log_softmax(logits / 0.7, dim=-1)
    expected_lp = logp_all.gather(-1, tokens[..., None]).squeeze(-1)
    expected_ent = -(logp_all.exp() * logp_all).sum(-1)
    lp, ent = rk.fused_linear_logprobs(hidden, weight, tokens, bias=bias, temperature=0.7,
                                       chunk_size=4, impl=impl)
    assert lp.shape == ent.shape == (B, T) and lp.dtype == torch.float32
    torch.testing.assert_close(lp, expected_lp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, expected_ent, atol=1e-5, rtol=1e-5)


def test_fused_linear_logprobs_rejects_bad_tokens():
    hidden, weight = torch.randn(2, 3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="tokens must lie in"):
        rk.fused_linear_logprobs(hidden, weight, torch.full((2, 3), 5))
    with pytest.raises(ValueError, match="tokens must have shape"):
        rk.fused_linear_logprobs(hidden, weight, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        rk.fused_linear_logprobs(hidden, weight, torch.zeros(2, 3, dtype=torch.long), temperature=0)


def test_unit_backward_hands_over_its_buffers_and_stays_right_when_repeated(cpp_available):
    """loss.backward() gives .grad the op's own gradient buffers (no scaled copy);
    a retained graph backpropagated twice still accumulates exactly twice the
    gradient, and a later scaled backward is unaffected."""
    g = torch.Generator().manual_seed(11)
    B, T, H, V = 2, 5, 8, 29
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    advantages = torch.randn(B, generator=g)

    def loss_of(impl):
        return rk.fused_linear_policy_loss(hidden, weight, tokens, mask, advantages,
                                           chunk_size=3, impl=impl).loss

    expected = torch.autograd.grad(loss_of("reference"), (hidden, weight))
    loss = loss_of("cpp")
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(hidden.grad, 2 * expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad, 2 * expected[1], rtol=1e-5, atol=1e-6)
    hidden.grad = weight.grad = None
    loss_of("cpp").backward()
    first = weight.grad
    weight.grad.mul_(0.5)  # an optimizer-style in-place edit of .grad ...
    hidden.grad = weight.grad = None
    (3 * loss_of("cpp")).backward()  # ... does not leak into the next call
    torch.testing.assert_close(weight.grad, 3 * expected[1], rtol=1e-5, atol=1e-6)
    assert first is not weight.grad


@pytest.mark.parametrize("n,chunk", [(1, 256), (300, 256), (1000, 256), (1025, 512), (7, 3)])
def test_chunks_are_balanced_and_cover_all_rows(n, chunk):
    from riskpo_kernels.policy.fused_linear import _Chunks
    c = _Chunks.__new__(_Chunks)
    c.hidden, c.chunk_size = torch.empty(n, 4), chunk
    spans = list(c.ranges())
    assert spans[0][0] == 0 and spans[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    sizes = [e - s for s, e in spans]
    assert max(sizes) <= max(chunk, 1) and len(spans) <= -(-n // chunk)
    if len(sizes) > 1:
        assert sizes[-1] >= min(128, sizes[0]) or sizes[-1] * 2 >= sizes[0]
