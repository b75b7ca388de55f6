"""The raw ops' defaults: torch.ops.riskpo.* called with keywords, or with only
their required arguments, equals the public function with the same options;
the schema defaults are the public functions' defaults; every Python kernel of
an op with defaults (its fake, the Triton implementation) takes the call with
the defaulted arguments left out, as the dispatcher hands them over."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import riskpo_kernels as rk
from riskpo_kernels.risk_core.reference import grpo_advantages_reference, mvar_advantages_reference

from conftest import DTYPES, assert_close_for, make_rewards

ROOT = Path(__file__).resolve().parents[1]

# Op argument -> public keyword, where the names differ.
_PUBLIC_NAME = {"q_lo_track": "q_lo", "q_hi_track": "q_hi"}


def _schema_defaults(op_name):
    schema = getattr(torch.ops.riskpo, op_name).default._schema
    return {a.name: a.default_value for a in schema.arguments if a.has_default_value()}


def _public_defaults(function):
    return {name: p.default for name, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("op_name, function", [
    ("mvar_advantages", rk.mvar_advantages),
    ("grpo_advantages", rk.grpo_advantages),
    ("token_logprob_entropy", rk.policy_loss),
    ("token_logprob_entropy_triton", rk.policy_loss),
])
def test_schema_defaults_are_the_public_defaults(op_name, function):
    defaults = _schema_defaults(op_name)
    assert defaults, f"{op_name} has no defaults"
    public = _public_defaults(function)
    for name, value in defaults.items():
        expected = public[_PUBLIC_NAME.get(name, name)]
        if name in ("base_mid", "base_low"):
            # The op's None baseline is the function's 0.0 (no fill).
            assert value is None and expected == 0.0, name
        else:
            assert value == expected and type(value) is type(expected), (name, value, expected)


def test_ops_without_defaults_are_the_documented_ones():
    # A default temperature on a backward op could differ from the forward's (a
    # silently wrong gradient); the fused ops end in chunk_size and vocab_impl,
    # which have no device-independent default.
    without = {name for name in rk.ops.SCHEMAS if not _schema_defaults(name)}
    assert without == {
        "token_logprob_entropy_backward", "token_logprob_entropy_backward_",
        "token_logprob_entropy_triton_backward", "token_logprob_entropy_triton_backward_",
        "fused_linear_policy_loss", "fused_linear_logprob_entropy",
        "fused_linear_logprob_entropy_backward"}


def _assert_mvar_equal(op_out, public, dtype):
    advantages, scores, q_lo, q_hi = op_out
    assert advantages.dtype == dtype
    assert_close_for(advantages, public.advantages, dtype, equal_nan=True)
    torch.testing.assert_close(scores, public.bundle_scores)
    torch.testing.assert_close(q_lo, public.q_lo)
    torch.testing.assert_close(q_hi, public.q_hi)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P, n", [(7, 3), (5, 1), (12, 5)])  # 7 prompts: a last bundle of 2
def test_mvar_op_with_defaults_equals_public_function(request, device, dtype, P, n):
    request.getfixturevalue("cuda_device" if device == "cuda" else "cpp_available")
    g = torch.Generator().manual_seed(P * 31 + n)
    rewards = make_rewards("ternary", P, n, g, dtype, device)
    public = rk.mvar_advantages(rewards, group_size=n)
    _assert_mvar_equal(torch.ops.riskpo.mvar_advantages(rewards, n), public, dtype)
    _assert_mvar_equal(torch.ops.riskpo.mvar_advantages(rewards, group_size=n), public, dtype)
    # The oracle, called with every argument (the op's defaults written out).
    reference = mvar_advantages_reference(rewards, n, 5, 0.2, 0.8, 1.5, 0.0, "batch", None, None,
                                          "uniform", True, True, None, None, 1e-6)
    assert_close_for(public.advantages, reference[0], dtype)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64, torch.bfloat16))
def test_mvar_op_keyword_calls_equal_public_function(cpp_available, dtype):
    """The issue's call, a recipe's options, and tracked quantiles and baselines
    (0-d tensors for the op, floats for the function)."""
    g = torch.Generator().manual_seed(5)
    rewards = make_rewards("continuous", 11, 4, g, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    _assert_mvar_equal(torch.ops.riskpo.mvar_advantages(rewards, group_size=4, bundle_size=5),
                       rk.mvar_advantages(rewards, group_size=4, bundle_size=5), dtype)
    for recipe in rk.recipes.RECIPES:
        options = rk.recipes.advantage_options(recipe, bundle_size=3)
        _assert_mvar_equal(torch.ops.riskpo.mvar_advantages(rewards, group_size=4, **options),
                           rk.mvar_advantages(rewards, group_size=4, **options), dtype)
    tracked = dict(quantile_mode="track", credit="sum-mean", w_high=0.5, eps=1e-4)
    op_out = torch.ops.riskpo.mvar_advantages(
        rewards, 4, q_lo_track=torch.tensor(-0.3, dtype=acc),
        q_hi_track=torch.tensor(0.7, dtype=acc),
        base_mid=torch.tensor(0.1, dtype=acc), base_low=torch.tensor(-0.2, dtype=acc), **tracked)
    public = rk.mvar_advantages(rewards, group_size=4, q_lo=-0.3, q_hi=0.7, base_mid=0.1,
                                base_low=-0.2, **tracked)
    _assert_mvar_equal(op_out, public, dtype)
    # And a tracked call really differs from the batch-quantile default.
    assert not torch.equal(op_out[0], torch.ops.riskpo.mvar_advantages(rewards, 4)[0])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_grpo_op_with_defaults_equals_public_function(request, device, dtype):
    request.getfixturevalue("cuda_device" if device == "cuda" else "cpp_available")
    g = torch.Generator().manual_seed(9)
    rewards = make_rewards("continuous", 6, 5, g, dtype, device)
    for call in (lambda: torch.ops.riskpo.grpo_advantages(rewards, 5),
                 lambda: torch.ops.riskpo.grpo_advantages(rewards, group_size=5)):
        out = call()
        assert_close_for(out, rk.grpo_advantages(rewards, group_size=5), dtype)
        assert_close_for(out, grpo_advantages_reference(rewards, 5, True, 1e-6), dtype)
    unnormalized = torch.ops.riskpo.grpo_advantages(rewards, 5, normalize_std=False)
    assert_close_for(unnormalized, rk.grpo_advantages(rewards, group_size=5, normalize_std=False),
                     dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_token_logprob_entropy_default_temperature(cpp_available, dtype):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(9, 13, generator=g) * 3).to(dtype)
    tokens = torch.randint(0, 13, (9,), generator=g)
    default = torch.ops.riskpo.token_logprob_entropy(logits, tokens)
    explicit = torch.ops.riskpo.token_logprob_entropy(logits, tokens, temperature=1.0)
    for a, b in zip(default, explicit):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    logprobs, entropy = rk.policy.logprobs_and_entropy_reference(logits, tokens, 1.0)
    assert_close_for(default[0], logprobs.to(default[0].dtype), torch.float32)
    assert_close_for(default[1], entropy.to(default[1].dtype), torch.float32)
    # Not the default: a temperature is honoured.
    assert not torch.allclose(torch.ops.riskpo.token_logprob_entropy(logits, tokens, 0.5)[0],
                              default[0])


def test_fakes_take_calls_without_the_defaulted_arguments():
    """The dispatcher drops trailing arguments equal to their defaults before it
    calls a Python kernel, the fakes (torch.compile's shape inference) included."""
    with FakeTensorMode():
        rewards = torch.empty(35)
        advantages, scores, q_lo, q_hi = torch.ops.riskpo.mvar_advantages(rewards, 5)
        assert advantages.shape == (35,) and scores.shape == (2, 5) and q_lo.shape == (2,)
        assert torch.ops.riskpo.mvar_advantages(rewards, 5, bundle_size=7)[1].shape == (1, 5)
        assert torch.ops.riskpo.grpo_advantages(rewards, 5).shape == (35,)
        logits, tokens = torch.empty(4, 11), torch.zeros(4, dtype=torch.long)
        for name in ("token_logprob_entropy", "token_logprob_entropy_triton"):
            out = getattr(torch.ops.riskpo, name)(logits, tokens)
            assert [o.shape for o in out] == [(4,)] * 3


def test_opcheck_with_defaults_left_out(cpp_available):
    g = torch.Generator().manual_seed(4)
    rewards = make_rewards("ternary", 7, 3, g)
    torch.library.opcheck(torch.ops.riskpo.mvar_advantages.default, (rewards, 3))
    torch.library.opcheck(torch.ops.riskpo.mvar_advantages.default, (rewards, 3),
                          {"credit": "std", "bundle_size": 2})
    torch.library.opcheck(torch.ops.riskpo.grpo_advantages.default, (rewards, 3))
    logits = torch.randn(5, 7, generator=g, requires_grad=True)
    torch.library.opcheck(torch.ops.riskpo.token_logprob_entropy.default,
                          (logits, torch.randint(0, 7, (5,), generator=g)))


def test_missing_or_unknown_op_arguments_are_named(cpp_available):
    rewards = torch.rand(20)
    with pytest.raises(RuntimeError, match="missing value for argument 'group_size'"):
        torch.ops.riskpo.mvar_advantages(rewards)
    with pytest.raises(RuntimeError, match="Unknown keyword argument 'bundel_size'"):
        torch.ops.riskpo.mvar_advantages(rewards, 4, bundel_size=3)
    with pytest.raises(RuntimeError, match="credit must be one of"):
        torch.ops.riskpo.mvar_advantages(rewards, 4, credit="x")


_TRITON_DEFAULT_TEMPERATURE = """
import torch, riskpo_kernels as rk
g = torch.Generator().manual_seed(0)
logits, tokens = torch.randn(3, 10, generator=g), torch.randint(0, 10, (3,), generator=g)
out = torch.ops.riskpo.token_logprob_entropy_triton(logits, tokens)
ref = rk.policy.logprobs_and_entropy_reference(logits, tokens, 1.0)
torch.testing.assert_close(out[0], ref[0]); torch.testing.assert_close(out[1], ref[1])
print("ok")
"""


def test_triton_forward_default_temperature_runs():
    """The Triton op's Python implementation gets (logits, tokens) alone when the
    caller leaves the temperature at its default. In a fresh process: the
    interpreter must be chosen before triton is imported."""
    pytest.importorskip("triton", reason="needs the triton package")
    if torch.version.cuda is not None or torch.version.hip is not None:
        pytest.skip("a GPU build of torch: test_triton_forward_default_temperature_on_cuda")
    script = _TRITON_DEFAULT_TEMPERATURE
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_triton_forward_default_temperature_on_cuda(cuda_device):
    pytest.importorskip("triton", reason="needs the triton package")
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(5, 37, generator=g) * 2).cuda()
    tokens = torch.randint(0, 37, (5,), generator=g).cuda()
    default = torch.ops.riskpo.token_logprob_entropy_triton(logits, tokens)
    explicit = torch.ops.riskpo.token_logprob_entropy_triton(logits, tokens, 1.0)
    logprobs, entropy = rk.policy.logprobs_and_entropy_reference(logits, tokens, 1.0)
    for a, b in zip(default, explicit):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(default[0], logprobs)
    torch.testing.assert_close(default[1], entropy)
