"""rk.fused_linear_logprobs / riskpo::fused_linear_logprob_entropy: log-probs and
entropies of softmax((hidden @ W.T + b) / T), chunked and differentiable
(verl's fused-kernel contract), against autograd through the materialised logits.
The Triton backend's cases are in test_policy_loss_triton.py."""

from __future__ import annotations

import pytest
import torch

import riskpo_kernels as rk

from conftest import assert_compiled_matches_eager, check_fused_logprob_gradients


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_values_and_gradients_match_the_reference(cpp_available, dtype, with_bias):
    check_fused_logprob_gradients("cpp", dtype, with_bias)


@pytest.mark.parametrize("chunk_size", [1, 4, 15, 1000])
def test_any_chunking_gives_the_same_gradients(cpp_available, chunk_size):
    check_fused_logprob_gradients("cpp", torch.float32, True, chunk_size=chunk_size)


def test_only_inputs_and_per_token_statistics_are_saved(cpp_available):
    # Never (N, V): the backward recomputes the logits chunk by chunk.
    g = torch.Generator().manual_seed(3)
    B, T, H, V = 2, 6, 5, 101
    hidden = torch.randn(B, T, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    tokens = torch.randint(0, V, (B, T), generator=g)
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, ent = rk.fused_linear_logprobs(hidden, weight, tokens, chunk_size=5)
    assert saved and all(torch.Size(s).numel() < B * T * V for s in saved), saved
    (lp.sum() + ent.sum()).backward()
    assert hidden.grad is not None and weight.grad is not None
    # Under no_grad (old and reference log-probs) nothing is saved at all.
    saved.clear()
    with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp2, ent2 = rk.fused_linear_logprobs(hidden, weight, tokens, chunk_size=5)
    assert saved == [] and not lp2.requires_grad
    torch.testing.assert_close(lp2, lp.detach(), rtol=0, atol=0)


def test_a_gradient_on_one_output_only(cpp_available):
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(2, 3, 4, generator=g, requires_grad=True)
    weight = torch.randn(9, 4, generator=g)
    tokens = torch.randint(0, 9, (2, 3), generator=g)
    for pick in (0, 1):
        outputs = rk.fused_linear_logprobs(hidden, weight, tokens, chunk_size=2)
        ref = rk.fused_linear_logprobs(hidden, weight, tokens, impl="reference")
        got, = torch.autograd.grad(outputs[pick].sum(), hidden)
        want, = torch.autograd.grad(ref[pick].sum(), hidden)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_opcheck(cpp_available):
    g = torch.Generator().manual_seed(11)
    N, H, V = 7, 6, 11
    for bias in (None, torch.randn(V, generator=g)):
        hidden = torch.randn(N, H, generator=g, requires_grad=True)
        weight = torch.randn(V, H, generator=g, requires_grad=True)
        bias = None if bias is None else bias.requires_grad_()
        tokens = torch.randint(0, V, (N,), generator=g)
        torch.library.opcheck(torch.ops.riskpo.fused_linear_logprob_entropy.default,
                              (hidden, weight, bias, tokens, 0.9, 3, "cpp"))
        with torch.no_grad():
            _, entropy, lse = torch.ops.riskpo.fused_linear_logprob_entropy(
                hidden, weight, bias, tokens, 0.9, 3, "cpp")
        torch.library.opcheck(
            torch.ops.riskpo.fused_linear_logprob_entropy_backward.default,
            (torch.randn(N, generator=g), torch.randn(N, generator=g), hidden.detach(),
             weight.detach(), None if bias is None else bias.detach(), tokens, lse, entropy, 0.9,
             3, "cpp"))


def test_torch_compile_fullgraph(cpp_available):
    g = torch.Generator().manual_seed(13)
    weight = torch.randn(19, 8, generator=g)
    bias = torch.randn(19, generator=g)
    tokens = torch.randint(0, 19, (2, 3), generator=g)
    g_lp, g_h = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)

    def step(hidden):
        lp, ent = rk.fused_linear_logprobs(hidden, weight, tokens, bias=bias, temperature=0.8,
                                           chunk_size=4)
        return (lp * g_lp + ent * g_h).sum()

    assert_compiled_matches_eager(step, torch.randn(2, 3, 8, generator=g))
