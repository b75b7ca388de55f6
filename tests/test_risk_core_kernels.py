"""Compiled kernels (C++ CPU, CUDA) against the reference on seeded random sweeps.

Every credit x quantile mode x natural baseline x normalisation x w_high, with
n in 1..64, bundle_size in 1..8, P not a multiple of the bundle size, binary,
ternary and continuous rewards, and each storage dtype.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch

import riskpo_kernels as rk
from riskpo_kernels.risk_core import CREDITS, QUANTILE_MODES

from conftest import DTYPES, assert_close_for, assert_error_budget, make_rewards

# (P, n, Q): extremes first (n = 1 and 64, Q = 1 and 8, P below, at and off a
# multiple of Q), then a few irregular ones.
SHAPES = [(1, 1, 1), (7, 1, 3), (3, 2, 5), (11, 5, 5), (10, 5, 5), (13, 8, 4), (9, 64, 8),
          (17, 3, 8), (15, 4, 7), (6, 16, 1), (41, 10, 5), (5, 37, 2), (23, 7, 6)]
REWARD_KINDS = ("binary", "ternary", "continuous")


def seed_of(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def tracked_pair(rewards, n, Q, g):
    """Plausible tracked quantiles: near the range of the bundle scores."""
    r = rewards.double().view(-1, n)
    scale = float(r.abs().max()) * min(Q, r.shape[0]) + 1
    lo, hi = sorted((torch.rand(2, generator=g, dtype=torch.float64) * scale - 0.25 * scale).tolist())
    return lo, hi


def check_against_reference(impl, device, credit, quantile_mode, natural_baseline, normalize_std,
                            w_high):
    g = torch.Generator().manual_seed(seed_of(credit, quantile_mode, natural_baseline,
                                              normalize_std, w_high))
    for (P, n, Q), kind in itertools.product(SHAPES, REWARD_KINDS):
        base = make_rewards(kind, P, n, g, torch.float64)
        q_lo, q_hi = tracked_pair(base, n, Q, g)
        kwargs = dict(group_size=n, bundle_size=Q, alpha=0.2, beta=0.8, w_low=1.5, w_high=w_high,
                      quantile_mode=quantile_mode, q_lo=q_lo, q_hi=q_hi, credit=credit,
                      normalize_std=normalize_std, natural_baseline=natural_baseline)
        for dtype in DTYPES:
            rewards = base.to(dtype).to(device)
            got = rk.mvar_advantages(rewards, impl=impl, **kwargs)
            want = rk.mvar_advantages(rewards.cpu(), impl="reference", **kwargs)
            assert got.advantages.dtype == dtype and got.advantages.shape == (P * n,)
            assert got.bundle_scores.shape == (-(-P // Q), n)
            acc = torch.float64 if dtype == torch.float64 else torch.float32
            for name in ("bundle_scores", "q_lo", "q_hi"):
                assert getattr(got, name).dtype == acc
                assert_close_for(getattr(got, name).cpu(), getattr(want, name), acc,
                                 msg=lambda m: f"{name} {dtype} {kind} {(P, n, Q)}: {m}")
            # sum-mean divides by D, a sum of centred rewards: with continuous
            # rewards D can be small, and any two float32 summation orders then
            # differ by more than 1e-5. There the kernel must be as accurate as
            # torch itself in the same precision instead.
            ill_conditioned = credit == "sum-mean" and kind == "continuous" and Q > 1
            if dtype == torch.float64 or not ill_conditioned:
                assert_close_for(got.advantages.cpu(), want.advantages, dtype,
                                 msg=lambda m: f"advantages {dtype} {kind} {(P, n, Q)}: {m}")
            else:
                exact = rk.mvar_advantages(rewards.cpu().double(), impl="reference", **kwargs)
                assert_error_budget(got.advantages.cpu(), want.advantages, exact.advantages)


SWEEP = pytest.mark.parametrize(
    "credit, quantile_mode, natural_baseline, normalize_std, w_high",
    list(itertools.product(CREDITS, QUANTILE_MODES, (True, False), (True, False), (0.0, 0.7))))


@SWEEP
def test_cpp_matches_reference(cpp_available, credit, quantile_mode, natural_baseline,
                               normalize_std, w_high):
    check_against_reference("cpp", "cpu", credit, quantile_mode, natural_baseline, normalize_std,
                            w_high)


@pytest.mark.cuda
@SWEEP
def test_cuda_matches_reference(cuda_device, credit, quantile_mode, natural_baseline,
                                normalize_std, w_high):
    check_against_reference("cuda", cuda_device, credit, quantile_mode, natural_baseline,
                            normalize_std, w_high)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 7, 16, 33, 64, 300])
@pytest.mark.parametrize("normalize_std", [True, False])
def test_grpo_matches_reference(request, device, dtype, n, normalize_std):
    request.getfixturevalue("cuda_device" if device == "cuda" else "cpp_available")
    g = torch.Generator().manual_seed(seed_of(dtype, n, normalize_std))
    for kind in REWARD_KINDS:
        rewards = make_rewards(kind, 13, n, g, dtype)
        got = rk.grpo_advantages(rewards.to(device), group_size=n, normalize_std=normalize_std)
        want = rk.grpo_advantages(rewards, group_size=n, normalize_std=normalize_std,
                                  impl="reference")
        assert got.dtype == dtype
        assert_close_for(got.cpu(), want, dtype)


def nonfinite_case(dtype):
    # Bundles of Q=2 prompts, n=3: NaN in bundle 0, +Inf in bundle 2, -Inf and +Inf
    # (sum NaN) in bundle 3; bundles 1 and 4 are finite.
    r = torch.tensor([[0, 1, 1], [1, float("nan"), 0],
                      [1, 0, 0], [0, 1, 1],
                      [0, 0, float("inf")], [1, 1, 1],
                      [float("-inf"), 0, 1], [float("inf"), 1, 0],
                      [0.5, 1, 0]], dtype=dtype)
    return r.reshape(-1), torch.tensor([True, False, True, True, False])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("credit", CREDITS)
def test_nonfinite_rewards_propagate_nan_to_their_bundle_only(request, device, dtype, credit):
    """Without a host sync the ops cannot raise: a bundle with a non-finite
    reward gets NaN advantages and quantiles (the public API raises on CPU)."""
    request.getfixturevalue("cuda_device" if device == "cuda" else "cpp_available")
    rewards, bad = nonfinite_case(dtype)
    args = [2, 0.2, 0.8, 1.5, 0.0, "batch", None, None, credit, True, True, None, None, 1e-6]
    adv, scores, q_lo, q_hi = torch.ops.riskpo.mvar_advantages(rewards.to(device), 3, *args)
    ref = rk.risk_core.mvar_advantages_reference(rewards, 3, *args)
    per_bundle = adv.cpu().float().view(-1, 3)
    per_bundle = torch.cat([per_bundle, per_bundle.new_zeros(1, 3)]).view(5, 2, 3)
    assert per_bundle[bad].isnan().all() and not per_bundle[~bad].isnan().any()
    assert q_lo.cpu()[bad].isnan().all() and q_hi.cpu()[bad].isnan().all()
    assert_close_for(adv.cpu(), ref[0], dtype, equal_nan=True)
    torch.testing.assert_close(scores.cpu(), ref[1], equal_nan=True)
    grpo = torch.ops.riskpo.grpo_advantages(rewards.to(device), 3, True, 1e-6).cpu().view(-1, 3)
    assert grpo[[1, 4, 6, 7]].isnan().all() and not grpo[[0, 2, 3, 5, 8]].isnan().any()


def test_tensor_arguments_on_device_and_as_floats_agree(cpp_available):
    g = torch.Generator().manual_seed(3)
    rewards = make_rewards("ternary", 12, 6, g)
    kwargs = dict(group_size=6, bundle_size=4, quantile_mode="mix", credit="std")
    floats = rk.mvar_advantages(rewards, q_lo=-0.5, q_hi=1.25, base_mid=0.3, base_low=-0.1, **kwargs)
    tensors = rk.mvar_advantages(rewards, q_lo=torch.tensor(-0.5, dtype=torch.float64),
                                 q_hi=torch.tensor([1.25]), base_mid=torch.tensor(0.3),
                                 base_low=torch.tensor(-0.1), **kwargs)
    for a, b in zip((floats.advantages, floats.q_lo), (tensors.advantages, tensors.q_lo)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_two_dimensional_rewards_and_empty_batch(cpp_available):
    g = torch.Generator().manual_seed(4)
    rewards = make_rewards("binary", 7, 4, g)
    flat = rk.mvar_advantages(rewards, group_size=4, bundle_size=3)
    square = rk.mvar_advantages(rewards.view(7, 4), bundle_size=3)
    torch.testing.assert_close(flat.advantages, square.advantages, rtol=0, atol=0)
    for impl in ("cpp", "reference"):
        empty = rk.mvar_advantages(torch.empty(0), group_size=4, impl=impl)
        assert empty.advantages.shape == (0,) and empty.bundle_scores.shape == (0, 4)
        assert rk.grpo_advantages(torch.empty(0), group_size=4, impl=impl).shape == (0,)


def test_rewards_requiring_grad_are_treated_as_constants(cpp_available):
    rewards = torch.tensor([0.0, 1.0, 1.0, 1.0], requires_grad=True)
    res = rk.mvar_advantages(rewards, group_size=2, bundle_size=1)
    assert not res.advantages.requires_grad
    assert not rk.grpo_advantages(rewards, group_size=2).requires_grad


def test_noncontiguous_rewards(cpp_available):
    g = torch.Generator().manual_seed(5)
    wide = make_rewards("continuous", 10, 6, g).view(10, 6)
    strided = wide.t().contiguous().t()  # same values, column-major storage
    assert not strided.is_contiguous()
    a = rk.mvar_advantages(strided, credit="sum-mean", bundle_size=3)
    b = rk.mvar_advantages(wide, credit="sum-mean", bundle_size=3)
    torch.testing.assert_close(a.advantages, b.advantages, rtol=0, atol=0)


# ---- CUDA only -----------------------------------------------------------------

@pytest.mark.cuda
def test_cuda_no_host_sync_and_graph_capture(cuda_device):
    g = torch.Generator().manual_seed(6)
    rewards = make_rewards("binary", 64, 8, g, device=cuda_device)
    tracker = rk.QuantileTracker()
    tracker.update(rk.mvar_advantages(rewards, group_size=8).bundle_scores)
    kwargs = dict(group_size=8, quantile_mode="track", q_lo=tracker.value(0.2),
                  q_hi=tracker.value(0.8), credit="std")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = rk.mvar_advantages(rewards, **kwargs)
        rk.grpo_advantages(rewards, group_size=8)
        tracker.update(eager.bundle_scores)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    static = rewards.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        rk.mvar_advantages(static, **kwargs)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = rk.mvar_advantages(static, **kwargs)
    static.copy_(make_rewards("binary", 64, 8, g, device=cuda_device))
    graph.replay()
    torch.cuda.synchronize()
    want = rk.mvar_advantages(static.cpu(), impl="reference",
                              **{**kwargs, "q_lo": kwargs["q_lo"].cpu(), "q_hi": kwargs["q_hi"].cpu()})
    assert_close_for(captured.advantages.cpu(), want.advantages, torch.float32)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_large_groups_use_extended_shared_memory(cuda_device, dtype):
    g = torch.Generator().manual_seed(7)
    n = 5000  # (3n + 2Q) * 8 bytes > 48 KiB for float64: the opt-in path
    rewards = make_rewards("continuous", 6, n, g, dtype)
    got = rk.mvar_advantages(rewards.to(cuda_device), group_size=n, bundle_size=4, credit="std")
    want = rk.mvar_advantages(rewards, group_size=n, bundle_size=4, credit="std", impl="reference")
    assert_close_for(got.advantages.cpu(), want.advantages, dtype)
    too_big = torch.zeros(40000, dtype=torch.float64, device=cuda_device)
    with pytest.raises(RuntimeError, match="group_size=40000"):
        rk.mvar_advantages(too_big, group_size=40000, bundle_size=1)
    # The refused launch leaves no CUDA error behind for the next launch to report.
    torch.ones(4, device=cuda_device).add_(1)
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_cuda_more_bundles_than_blocks(cuda_device):
    g = torch.Generator().manual_seed(8)
    rewards = make_rewards("continuous", (1 << 20) + 3, 1, g)  # grid is capped at 2^20 blocks
    got = rk.mvar_advantages(rewards.to(cuda_device), group_size=1, bundle_size=1)
    want = rk.mvar_advantages(rewards, group_size=1, bundle_size=1, impl="reference")
    assert_close_for(got.advantages.cpu(), want.advantages, torch.float32)
    got = rk.grpo_advantages(make_rewards("binary", (1 << 23) + 5, 1, g, device=cuda_device), group_size=1)
    assert got.shape == ((1 << 23) + 5,)
