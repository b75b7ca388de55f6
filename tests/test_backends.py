"""The backend registry (riskpo_kernels/backends.py): the one place that says
which implementations exist, where they run and which one `impl="auto"` takes."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import riskpo_kernels as rk
from riskpo_kernels import backends


def test_the_choices_of_each_family_come_from_the_registry():
    assert backends.choices(backends.RISK_CORE) == ("auto", "reference", "cpp", "cuda")
    assert backends.choices(backends.POLICY) == ("auto", "reference", "cpp", "triton",
                                                 "triton-folded")
    assert backends.vocab_backends() == ("cpp", "triton", "triton-folded")
    with pytest.raises(ValueError, match="impl must be one of 'auto', 'reference', 'cpp', 'triton'"):
        rk.policy_loss(torch.randn(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2),
                       torch.ones(1), impl="cuda")


def test_a_new_backend_is_one_entry(cpp_available, monkeypatch):
    # A backend registered under a new name (here: the C++ vocabulary ops
    # again) is taken by impl= and by the fused ops' vocab_impl, with no other
    # change anywhere.
    twin = dataclasses.replace(backends.BACKENDS["cpp"], name="cpp-twin", mvar_advantages=None,
                               grpo_advantages=None)
    monkeypatch.setitem(backends.BACKENDS, "cpp-twin", twin)
    assert "cpp-twin" in backends.choices(backends.POLICY)
    assert "cpp-twin" not in backends.choices(backends.RISK_CORE)
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 3, 4, generator=g), torch.randn(7, 4, generator=g)
    tokens = torch.randint(0, 7, (2, 3), generator=g)
    mask, adv = torch.ones(2, 3), torch.randn(2, generator=g)
    for fn in (rk.fused_linear_policy_loss, lambda *a, **k: rk.policy_loss(
            torch.nn.functional.linear(a[0], a[1]), *a[2:], **k)):
        want = fn(hidden, weight, tokens, mask, adv, impl="cpp").loss
        got = fn(hidden, weight, tokens, mask, adv, impl="cpp-twin").loss
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    lp, _ = rk.fused_linear_logprobs(hidden, weight, tokens, impl="cpp-twin")
    torch.testing.assert_close(lp, rk.fused_linear_logprobs(hidden, weight, tokens, impl="cpp")[0])


def test_auto_falls_back_to_the_reference_and_says_so_once(monkeypatch):
    # Pure logic: no CUDA device is needed to resolve for one.
    cuda = torch.device("cuda")
    monkeypatch.setitem(backends.BACKENDS, "cuda", dataclasses.replace(
        backends.BACKENDS["cuda"], unavailable=lambda: "built without CUDA kernels (test)"))
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(RuntimeWarning, match="built without CUDA kernels .test.; CUDA tensors use "
                                            "the reference implementation of the risk core"):
        assert backends.resolve("auto", cuda, backends.RISK_CORE, "rewards").name == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backends.resolve("auto", cuda, backends.RISK_CORE, "rewards").name == "reference"
    with pytest.raises(RuntimeError, match=r"impl='cuda': built without CUDA kernels \(test\)"):
        backends.resolve("cuda", cuda, backends.RISK_CORE, "rewards")
    with pytest.raises(ValueError, match="impl='cuda' needs cuda tensors, got rewards on cpu"):
        backends.resolve("cuda", torch.device("cpu"), backends.RISK_CORE, "rewards")


def test_the_fused_ops_refuse_an_unknown_vocabulary_backend(cpp_available):
    with pytest.raises(ValueError, match="vocab_impl must be one of 'cpp', 'triton', 'triton-folded'; got 'cuda'"):
        torch.ops.riskpo.fused_linear_logprob_entropy(torch.randn(3, 4), torch.randn(5, 4), None,
                                                      torch.zeros(3, dtype=torch.long), 1.0, 2,
                                                      "cuda")
