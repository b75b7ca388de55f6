"""One RL update on fixed rollouts, run by tests/test_train_distributed.py in
one process and under ``torchrun --nproc_per_node 2`` (FSDP2, gloo): both
write the loss and the updated weights, which must agree.

usage: python fsdp_parity_worker.py OUT_FILE
"""

from __future__ import annotations

import os
import sys

import torch

from riskpo_train.config import LOSS_AGGS, TrainConfig
from riskpo_train.distributed import init_distributed, shard_policy, shutdown
from riskpo_train.model import build_char_tokenizer, build_tiny_model
from riskpo_train.policy import Policy
from riskpo_train.rollout import Rollout
from riskpo_train.update import update


def fixed_rollout(vocab: int, rows: int = 8, prompt_len: int = 5, response_len: int = 6):
    """Random prompts and responses with ragged response masks (one row has none),
    advantages of both signs and old log-probs off the current ones (clipping on)."""
    g = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(4, vocab, (rows, prompt_len + response_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0  # left padding
    lengths = torch.tensor([6, 1, 3, 0, 5, 2, 6, 4])
    response_mask = (torch.arange(response_len)[None] < lengths[:, None]).float()
    attention_mask[:, prompt_len:] = response_mask.long()
    rollout = Rollout(input_ids, attention_mask, input_ids[:, prompt_len:], response_mask,
                      torch.zeros(rows), [""] * rows)
    advantages = torch.randn(rows, generator=g)
    old_shift = 0.3 * torch.randn(rows, response_len, generator=g)
    return rollout, advantages, old_shift


def main(out_file: str) -> None:
    ctx = init_distributed("cpu")
    results = {}
    for agg, optimizer_name in [(agg, "sgd") for agg in LOSS_AGGS] + [("token-mean", "adamw")]:
        cfg = TrainConfig(loss_agg=agg, micro_batch_size=3, lr=1e-2, max_grad_norm=0.0,
                          kl_coef=0.1)
        tokenizer = build_char_tokenizer()
        policy = Policy(build_tiny_model(tokenizer, hidden_size=32, num_layers=2, seed=5))
        rollout, advantages, old_shift = fixed_rollout(len(tokenizer))
        with torch.no_grad():
            current, _ = policy(rollout.input_ids, rollout.attention_mask, rollout.response)
        old = current + old_shift
        ref = current - old_shift
        policy = shard_policy(policy, ctx)
        # Plain SGD makes the updated weights a direct image of the gradients;
        # AdamW's first step, g / (|g| + eps), amplifies rounding where |g| ~ eps.
        optimizer = (torch.optim.SGD(policy.parameters(), lr=0.5) if optimizer_name == "sgd"
                     else torch.optim.AdamW(policy.parameters(), lr=cfg.lr))
        share = rollout.response.shape[0] // ctx.world
        rows = slice(ctx.rank * share, (ctx.rank + 1) * share)
        stats = update(policy, optimizer, rollout.select(rows), advantages[rows], old[rows],
                       ref[rows], cfg, ctx)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        weights = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True,
                                                                       cpu_offload=True))
        results[agg, optimizer_name] = {"loss": stats["loss"], "grad_norm": stats["grad_norm"],
                        "clipfrac": stats["clipfrac"], "weights": weights}
    if ctx.rank == 0:
        torch.save(results, out_file)
    shutdown(ctx)
    if ctx.enabled:
        sys.stdout.flush()
        os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1])
