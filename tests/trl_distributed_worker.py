"""Run under ``torch.distributed.run --nproc_per_node 2`` (gloo, CPU): RiskPOTrainer
on two processes. Rank 0 writes a JSON summary to argv[1] for
tests/test_integration_trl.py:

- each process's advantages are its slice of mvar_advantages over the rewards
  of both processes;
- the fused loss equals TRL's (dapo divides by the global token count over the
  number of processes);
- after a short training run, both processes hold the same tracker.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import warnings

import torch

warnings.filterwarnings("ignore")

from datasets import Dataset
from trl import GRPOTrainer

import riskpo_kernels as rk
from riskpo_kernels.integrations.trl import RiskPOConfig, RiskPOTrainer
from riskpo_train.model import build_char_tokenizer, build_tiny_model

N, LOCAL_PROMPTS = 4, 2


def main(out_path):
    torch.set_num_threads(1)
    tokenizer = build_char_tokenizer("0123456789+= ")
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2)
    dataset = Dataset.from_dict({"prompt": [f"{i}+{i % 7}=" for i in range(24)]})
    local_rewards = {}

    def reward(completions, **kwargs):
        local_rewards["last"] = [float(sum(c.count(d) for d in "13579")) + 0.1 * len(c)
                                 for c in completions]
        return local_rewards["last"]

    args = RiskPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, fp16=False,
                        report_to="none", max_completion_length=6, num_generations=N,
                        per_device_train_batch_size=N * LOCAL_PROMPTS, max_steps=2,
                        save_strategy="no", seed=0, bundle_size=2, quantile_mode="track",
                        use_riskpo_loss=True, entropy_coef=0.02, learning_rate=1e-3)
    trainer = RiskPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                            processing_class=tokenizer)
    acc = trainer.accelerator
    rank = acc.process_index
    result = {"num_processes": acc.num_processes}

    # Each process scores its own prompts; the advantages cover both.
    inputs = [{"prompt": dataset[i]["prompt"]}
              for i in range(rank * LOCAL_PROMPTS, (rank + 1) * LOCAL_PROMPTS) for _ in range(N)]
    trainer.model.train()
    torch.manual_seed(rank)
    out = trainer._generate_and_score_completions(copy.deepcopy(inputs))
    gathered = acc.gather(torch.tensor(local_rewards["last"]))
    expected = rk.mvar_advantages(gathered, group_size=N, bundle_size=2, alpha=0.2, beta=0.9,
                                  credit="std")
    local = slice(rank * N * LOCAL_PROMPTS, (rank + 1) * N * LOCAL_PROMPTS)
    error = (out["advantages"] - expected.advantages[local]).abs().max()
    result["advantage_error"] = acc.gather(error[None]).max().item()
    result["advantages_differ_across_ranks"] = bool(
        (expected.advantages[:8] - expected.advantages[8:]).abs().max() > 0)

    # The fused loss against TRL's on this process's micro-batch.
    trainer.current_gradient_accumulation_steps = 1
    generator = torch.Generator().manual_seed(rank)
    batch = dict(out)
    batch["old_per_token_logps"] = torch.zeros_like(batch["completion_mask"], dtype=torch.float32)
    with torch.no_grad():
        batch["old_per_token_logps"] += 0.5 * torch.randn(batch["completion_mask"].shape,
                                                          generator=generator)
    losses = []
    for fn in (lambda m, b: GRPOTrainer._compute_loss(trainer, m, b), trainer._compute_loss):
        with torch.no_grad():
            losses.append(fn(trainer.model, batch))
    result["loss_error"] = acc.gather((losses[0] - losses[1]).abs()[None]).max().item()
    result["loss"] = acc.gather(losses[0][None]).tolist()
    result["num_items_in_batch"] = float(out["num_items_in_batch"])
    result["local_tokens"] = acc.gather(out["completion_mask"].sum()[None]).tolist()

    trainer.train()
    values = trainer.tracker.values
    result["tracker_steps"] = trainer.tracker.steps
    result["tracker_spread"] = (acc.gather(values[None]) - values).abs().max().item()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
