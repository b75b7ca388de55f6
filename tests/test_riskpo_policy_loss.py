"""rk.riskpo_policy_loss: rewards in, loss out, equal to composing the parts."""

from __future__ import annotations

import pytest
import torch

import riskpo_kernels as rk


def inputs(P, n, T, H, V, g, device="cpu"):
    B = P * n
    hidden = torch.randn(B, T, H, generator=g).to(device)
    weight = (torch.randn(V, H, generator=g) / H**0.5).to(device)
    tokens = torch.randint(0, V, (B, T), generator=g).to(device)
    mask = (torch.rand(B, T, generator=g) > 0.2).to(device)
    rewards = torch.randint(0, 2, (P, n), generator=g).float().to(device)
    return hidden, weight, tokens, mask, rewards


@pytest.mark.parametrize("quantile_mode, mean_baseline", [("batch", False), ("track", False),
                                                          ("mix", True)])
def test_equals_the_composition_of_its_parts(quantile_mode, mean_baseline):
    g = torch.Generator().manual_seed(0)
    hidden, weight, tokens, mask, rewards = inputs(7, 4, 5, 8, 23, g)
    tracker = rk.QuantileTracker()
    tracker.update(rk.mvar_advantages(torch.rand(28, generator=g) * 3, group_size=4).bundle_scores)
    kwargs = dict(bundle_size=3, alpha=0.2, beta=0.8, credit="std")
    out, risk = rk.riskpo_policy_loss(hidden, weight, tokens, mask, rewards, group_size=4,
                                      quantile_mode=quantile_mode, mean_baseline=mean_baseline,
                                      tracker=tracker, chunk_size=6, entropy_coef=0.01, **kwargs)
    q = (tracker.value(0.2), tracker.value(0.8)) if quantile_mode != "batch" else (None, None)
    base = tracker.baselines(0.2, 0.8) if mean_baseline else (0.0, 0.0)
    want_risk = rk.mvar_advantages(rewards, group_size=4, quantile_mode=quantile_mode, q_lo=q[0],
                                   q_hi=q[1], base_mid=base[0], base_low=base[1], **kwargs)
    want = rk.fused_linear_policy_loss(hidden, weight, tokens, mask, want_risk.advantages,
                                       chunk_size=6, entropy_coef=0.01)
    torch.testing.assert_close(risk.advantages, want_risk.advantages, rtol=0, atol=0)
    torch.testing.assert_close(out.loss, want.loss, rtol=0, atol=0)
    assert tracker.steps == 1  # read, not updated


def test_rejects_mismatched_batch_and_missing_tracker():
    g = torch.Generator().manual_seed(1)
    hidden, weight, tokens, mask, rewards = inputs(3, 2, 4, 6, 11, g)
    with pytest.raises(ValueError, match="B must equal P \\* n"):
        rk.riskpo_policy_loss(hidden, weight, tokens, mask, rewards[:2], group_size=2)
    with pytest.raises(ValueError, match="mean_baseline needs a tracker"):
        rk.riskpo_policy_loss(hidden, weight, tokens, mask, rewards, group_size=2, mean_baseline=True)


@pytest.mark.cuda
def test_cuda_graph_capture_of_the_whole_step(cuda_device):
    """No host sync from rewards to loss: the forward can be captured in a CUDA graph."""
    g = torch.Generator().manual_seed(2)
    hidden, weight, tokens, mask, rewards = inputs(8, 4, 16, 64, 1000, g, cuda_device)
    tracker = rk.QuantileTracker()
    tracker.update(rk.mvar_advantages(rewards, group_size=4).bundle_scores)

    def step():
        out, _ = rk.riskpo_policy_loss(hidden, weight, tokens, mask, rewards, group_size=4,
                                       quantile_mode="track", tracker=tracker, chunk_size=32)
        return out.loss

    eager = step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, eager)
