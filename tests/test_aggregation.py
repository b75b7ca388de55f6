"""Loss aggregation (riskpo_kernels/policy/aggregation.py) against verl 0.9.1's own
`agg_loss` when verl is installed, and the property a trainer relies on: split a
batch into parts (micro-batches, data-parallel ranks), scale each part's loss by
its share of the count, and the parts add up to the whole batch's loss."""

from __future__ import annotations

import zlib

import pytest
import torch

from riskpo_kernels.common import AGGREGATIONS
from riskpo_kernels.policy.aggregation import SCALED, aggregation_parts, aggregation_weights
from riskpo_kernels.policy.token_loss import weighted_sum

VERL_MODES = ("token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
              "seq-mean-token-sum-norm")


def random_batch(seed, B=7, T=9):
    """float64 per-token losses and a 0/1 mask with fully masked rows and rows
    of every length, float64."""
    g = torch.Generator().manual_seed(zlib.crc32(repr(seed).encode()))
    loss = torch.randn(B, T, generator=g, dtype=torch.float64) * 3
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = lengths[B // 2] = 0  # fully masked rows
    lengths[1] = T
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(torch.float64)
    loss[mask == 0] = float("nan")  # padding must never reach a loss
    return loss, mask


def ours(loss, mask, agg, loss_scale_factor=None):
    return weighted_sum(aggregation_weights(mask, agg, loss_scale_factor), loss)


@pytest.mark.parametrize("agg", VERL_MODES)
@pytest.mark.parametrize("seed", range(5))
def test_every_mode_equals_verl_agg_loss(agg, seed):
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos",
                                     reason="verl is not installed")
    loss, mask = random_batch((agg, seed))
    verl_loss = core_algos.agg_loss(torch.nan_to_num(loss), mask, agg)
    torch.testing.assert_close(ours(loss, mask, agg), verl_loss, rtol=1e-10, atol=1e-12)
    if agg in SCALED:
        verl_scaled = core_algos.agg_loss(torch.nan_to_num(loss), mask, agg, loss_scale_factor=64)
        torch.testing.assert_close(ours(loss, mask, agg, 64), verl_scaled, rtol=1e-10,
                                   atol=1e-12)


@pytest.mark.parametrize("agg", VERL_MODES)
def test_data_parallel_ranks_equal_verl_with_global_denominators(agg):
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos",
                                     reason="verl is not installed")
    loss, mask = random_batch(("dp", agg), B=8)
    ranks = [(loss[:4], mask[:4]), (loss[4:], mask[4:])]
    tokens = mask.sum()
    sequences = (mask.sum(1) > 0).sum()
    # FSDP averages the ranks' gradients: verl scales each rank's loss by dp_size.
    verl_mean = sum(core_algos.agg_loss(torch.nan_to_num(part), m, agg, dp_size=2,
                                        batch_num_tokens=tokens, global_batch_size=sequences)
                    for part, m in ranks) / 2
    torch.testing.assert_close(split_sum(loss, mask, agg, (4,)), verl_mean, rtol=1e-10, atol=1e-12)


def split_sum(loss, mask, agg, cuts, loss_scale_factor=None):
    """The parts' losses, each scaled by count_part / count_total (None: by 1)."""
    parts = torch.tensor_split(torch.arange(loss.shape[0]), cuts)
    counts = [aggregation_parts(mask[p], agg, loss_scale_factor)[1] for p in parts]
    total = None if counts[0] is None else sum(counts)
    out = torch.zeros((), dtype=torch.float64)
    for p, count in zip(parts, counts):
        share = 1.0 if count is None else count / total.clamp(min=1)
        out = out + ours(loss[p], mask[p], agg, loss_scale_factor) * share
    return out


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_parts_scaled_by_their_share_add_up_to_the_whole(agg):
    # What the trainer does with micro-batches and FSDP ranks (riskpo_train/update.py),
    # exact for every mode whose normaliser does not depend on the part's padded
    # length: seq-mean-token-sum-norm and trl-dr-grpo divide each part by its own T,
    # as verl does per micro-batch, so the parts here share one T.
    loss, mask = random_batch(("split", agg), B=10)
    whole = ours(loss, mask, agg)
    for cuts in ((5,), (1, 4, 9), (3, 6)):
        torch.testing.assert_close(split_sum(loss, mask, agg, cuts), whole, rtol=1e-12,
                                   atol=1e-12)


def test_a_batch_with_nothing_to_count_has_loss_zero():
    loss = torch.randn(3, 4, dtype=torch.float64)
    mask = torch.zeros(3, 4, dtype=torch.float64)
    for agg in AGGREGATIONS:
        assert ours(loss, mask, agg).item() == 0.0, agg
