"""The RL loop: sample, score, advantages (RiskPO or GRPO), clipped policy
updates with the fused loss, evaluation, metrics and checkpoints.

One step, as ``rl_step`` runs it:

1. ``P`` prompts chosen by (seed, step); this rank samples ``n`` answers for
   its ``P / world`` of them and scores them.
2. Rewards are all-gathered; every rank computes the advantages of the whole
   batch (``rk.mvar_advantages`` over bundles with the tracked quantiles, or
   ``rk.grpo_advantages``) and keeps its rows; the tracker is then updated with
   the step's bundle scores (spec section 6: step t uses the state of t - 1).
3. Old (and reference) log-probs in one no-grad pass, then ``ppo_epochs``
   passes of ``minibatches`` AdamW steps, each over micro-batches of the fused
   loss scaled so that the sum over micro-batches and ranks is the loss of the
   whole minibatch under the chosen aggregation.
"""

from __future__ import annotations

import dataclasses

import json
import os
import random
import sys
import time
import zlib
from dataclasses import asdict
from pathlib import Path

import torch

import riskpo_kernels as rk
from riskpo_kernels.riskpo_loss import tracked_inputs

from . import data as data_lib
from .checkpoint import CHECKPOINT, RESUMABLE_CHANGES, brief, read_checkpoint
from .config import TrainConfig
from .distributed import (DistContext, init_distributed, launched_by_torchrun, shard_policy,
                          shutdown)
from .files import (atomic_torch_save, atomic_write_text, keep_records_up_to,
                    remove_stale_temporaries)
from .metrics import MetricsWriter, summarise
from .model import (
    build_char_tokenizer,
    build_tiny_model,
    load_model_dir,
    save_model_dir,
)
from .policy import Policy
from .rollout import Rollout, check_prompt_lengths, pass_at_k, reported_ks, sample
from .task import ArithmeticTask
from .update import rollout_logprobs, update
from .warmup import cached_model_dir, supervised_warmup

# The files a run writes through a temporary sibling (NAME.tmp-PID) and a rename.
RUN_FILES = (CHECKPOINT, "metrics.jsonl", "summary.json", "config.json")


def derived_seed(*parts) -> int:
    """A 31-bit seed from any tuple of values: sampling at step t on rank r
    depends only on (seed, t, r), which is what makes a resumed run exact."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFFFFFF


def log(ctx: DistContext, message: str) -> None:
    if ctx.is_main:
        print(message, file=sys.stderr, flush=True)


class Trainer:
    """Holds everything of one run; ``run()`` trains and returns the summary."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext | None = None):
        self.cfg = cfg.validate()
        self.ctx = ctx or init_distributed(cfg.device)
        self.out = Path(cfg.out)
        if cfg.algo == "riskpo" and cfg.prompts_per_step % cfg.bundle_size and \
                (cfg.quantile_mode != "batch" or cfg.mean_baseline):
            log(self.ctx, f"note: {cfg.prompts_per_step} prompts make a last bundle of "
                          f"{cfg.prompts_per_step % cfg.bundle_size} (of {cfg.bundle_size}); its "
                          "smaller scores enter the quantile tracker with the others")
        if cfg.prompts_per_step % self.ctx.world:
            raise ValueError(f"--prompts-per-step ({cfg.prompts_per_step}) must be a multiple of "
                             f"the number of processes ({self.ctx.world})")
        self._load_task()
        self._load_policy()

    # --- setup -----------------------------------------------------------------------

    def _load_task(self) -> None:
        cfg = self.cfg
        if cfg.data:
            if not cfg.model:
                raise ValueError("--data needs --model: the embedded tiny model's tokenizer only "
                                 "spells the arithmetic task")
            examples = data_lib.load_examples(cfg.data)
            self.train_set, self.test_set = data_lib.split_examples(examples, cfg.test_fraction,
                                                                     cfg.task_seed)
            # Both splits, in file order, so that an error names the file's row.
            self.prompt_sources = [(f"{cfg.data}, row", [e.prompt for e in examples])]
            reward = "math" if cfg.reward == "auto" else cfg.reward
        else:
            task = ArithmeticTask(cfg.task_digits, cfg.task_operators, cfg.task_test_size,
                                  cfg.task_seed)
            self.train_set, self.test_set = task.split()
            self.prompt_sources = [
                ("the embedded task's train split, prompt", [e.prompt for e in self.train_set]),
                ("the embedded task's test split, prompt", [e.prompt for e in self.test_set])]
            reward = "exact" if cfg.reward == "auto" else cfg.reward
        if not self.train_set:
            raise ValueError("the training split is empty")
        self.reward_fn = data_lib.get_reward(reward)

    def _initial_model_dir(self) -> Path | None:
        """The directory the run starts from: --model, or the cached warm-up of
        the embedded model (built by rank 0 on first use), or None for a
        randomly initialised embedded model (--warmup-steps 0)."""
        cfg = self.cfg
        if cfg.model:
            return Path(cfg.model)
        if cfg.warmup_steps == 0:
            return None
        settings = {k: getattr(cfg, k) for k in (
            "task_digits", "task_operators", "task_test_size", "task_seed", "tiny_hidden_size",
            "tiny_layers", "warmup_steps", "warmup_lr", "warmup_batch_size")}
        settings["max_positions"] = self._tiny_max_positions()
        settings["format"] = 1
        path = cached_model_dir(cfg.warmup_cache, settings)
        if self.ctx.is_main and not (path / "config.json").is_file():
            # On a GPU the warm-up runs there; the cached weights serve any device.
            log(self.ctx, f"supervised warm-up ({cfg.warmup_steps} steps), cached in {path}")
            tokenizer = build_char_tokenizer()
            lm = self._tiny_model(tokenizer).to(self.ctx.device)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.task_seed)
                supervised_warmup(lm, tokenizer, self.train_set, steps=cfg.warmup_steps,
                                  lr=cfg.warmup_lr, batch_size=cfg.warmup_batch_size,
                                  seed=cfg.task_seed, progress=cfg.progress)
            save_model_dir(lm, tokenizer, path)
            (path / "warmup.json").write_text(json.dumps(settings, indent=2))
        self.ctx.barrier()
        return path

    def _tiny_max_positions(self) -> int:
        """Context of the embedded model: bos, two operands, operator, '=', and the answer."""
        cfg = self.cfg
        return max(64, 2 * cfg.task_digits + 3 + cfg.max_new_tokens + 8)

    def _tiny_model(self, tokenizer):
        cfg = self.cfg
        return build_tiny_model(tokenizer, hidden_size=cfg.tiny_hidden_size,
                                num_layers=cfg.tiny_layers, max_positions=self._tiny_max_positions(),
                                seed=cfg.task_seed)

    def _load_lm(self):
        path = self._initial_model_dir()
        if path is None:
            tokenizer = build_char_tokenizer()
            return self._tiny_model(tokenizer).to(self.ctx.device), tokenizer
        return load_model_dir(path, device=self.ctx.device)

    def _load_policy(self) -> None:
        cfg = self.cfg
        lm, self.tokenizer = self._load_lm()
        self.eos_ids = end_of_sequence_ids(lm, self.tokenizer)
        # Sampling must draw from softmax(logits / T), the distribution the loss
        # sees: drop the directory's sampling defaults (top-k, repetition
        # penalty, ...); temperature and top-p are passed on every call.
        from transformers import GenerationConfig
        lm.generation_config = GenerationConfig(
            bos_token_id=lm.generation_config.bos_token_id, eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id)
        self.max_prompt_tokens = lm.config.max_position_embeddings - cfg.max_new_tokens
        if self.max_prompt_tokens < 1:
            raise ValueError(f"--max-new-tokens ({cfg.max_new_tokens}) leaves no room for the "
                             f"prompt in the model's context ({lm.config.max_position_embeddings})")
        self._check_prompt_lengths()
        chunk = cfg.chunk_size or None
        self.ref_policy = None
        if cfg.kl_coef > 0:
            ref_lm, _ = self._load_lm()
            ref_lm.requires_grad_(False)
            self.ref_policy = shard_policy(Policy(ref_lm.eval(), temperature=cfg.temperature,
                                                  chunk_size=chunk), self.ctx, cfg.param_dtype)
        self.policy = shard_policy(Policy(lm.eval(), temperature=cfg.temperature,
                                          chunk_size=chunk), self.ctx, cfg.param_dtype)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=cfg.lr,
                                           weight_decay=cfg.weight_decay)
        self.tracker = rk.QuantileTracker(lr=cfg.tracker_lr) if cfg.algo == "riskpo" else None

    def _check_prompt_lengths(self) -> None:
        """Every prompt of both splits fits the context: an error now, naming
        the first that does not, rather than when it is first sampled. (The
        warm-up, which ran in _load_lm, only exists for the embedded model,
        whose context is sized to fit the embedded task's prompts.)"""
        for where, prompts in self.prompt_sources:
            first = 0
            if self.cfg.model is None and prompts:
                # The embedded tokenizer spells one token per character, so the
                # longest prompt in characters is the longest in tokens: check
                # (and name) that one; a million 3-digit questions would take a
                # minute to tokenize.
                first = max(range(len(prompts)), key=lambda i: len(prompts[i]))
                prompts = prompts[first:first + 1]
            check_prompt_lengths(self.tokenizer, prompts, self.max_prompt_tokens, where,
                                 first_index=first)

    # --- one step --------------------------------------------------------------------

    def _step_prompts(self, step: int) -> list:
        rng = random.Random(derived_seed(self.cfg.seed, "prompts", step))
        chosen = [rng.choice(self.train_set) for _ in range(self.cfg.prompts_per_step)]
        share = self.cfg.prompts_per_step // self.ctx.world
        return chosen[self.ctx.rank * share:(self.ctx.rank + 1) * share]

    def _sample(self, examples, num_samples: int, seed_parts) -> Rollout:
        cfg = self.cfg
        torch.manual_seed(derived_seed(cfg.seed, *seed_parts, self.ctx.rank))
        return sample(self.policy.generate, self.tokenizer, [e.prompt for e in examples],
                      [e.answer for e in examples], eos_ids=self.eos_ids, num_samples=num_samples,
                      max_new_tokens=cfg.max_new_tokens, max_prompt_tokens=self.max_prompt_tokens,
                      temperature=cfg.temperature, top_p=cfg.top_p, reward_fn=self.reward_fn,
                      device=self.ctx.device, synced=self.ctx.enabled,
                      reward_errors=cfg.reward_errors, response_len=cfg.max_new_tokens)

    def advantages(self, rewards: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Per-response advantages (B_global,) of the whole batch's rewards, and
        the risk statistics; updates the tracker afterwards (RiskPO)."""
        cfg, n = self.cfg, self.cfg.group_size
        if cfg.algo == "grpo":
            return rk.grpo_advantages(rewards, group_size=n,
                                      normalize_std=cfg.grpo_normalize_std), {}
        res = rk.mvar_advantages(rewards, group_size=n, bundle_size=cfg.bundle_size,
                                 alpha=cfg.alpha, beta=cfg.beta, w_low=cfg.w_low,
                                 w_high=cfg.w_high, quantile_mode=cfg.quantile_mode,
                                 credit=cfg.credit, normalize_std=cfg.normalize_std,
                                 natural_baseline=cfg.natural_baseline,
                                 **tracked_inputs(self.tracker, cfg.alpha, cfg.beta,
                                                  cfg.quantile_mode, cfg.mean_baseline,
                                                  cfg.natural_baseline))
        self.tracker.update(res.bundle_scores)
        return res.advantages, {"q_lo": res.q_lo.float().mean().item(),
                                "q_hi": res.q_hi.float().mean().item()}

    def rl_step(self, step: int) -> dict:
        cfg, ctx = self.cfg, self.ctx
        started = time.perf_counter()
        examples = self._step_prompts(step)
        batch = self._sample(examples, cfg.group_size, ("sample", step))
        all_rewards = ctx.all_gather_cat(batch.rewards)
        advantages, risk = self.advantages(all_rewards)
        rows = batch.rewards.shape[0]
        advantages = advantages[ctx.rank * rows:(ctx.rank + 1) * rows].to(torch.float32)

        old_logprobs, entropy = rollout_logprobs(self.policy, batch, cfg.micro_batch_size)
        ref_logprobs = None
        if self.ref_policy is not None:
            ref_logprobs, _ = rollout_logprobs(self.ref_policy, batch, cfg.micro_batch_size)

        totals: dict[str, float] = {}
        updates = 0
        order_rng = torch.Generator().manual_seed(derived_seed(cfg.seed, "order", step, ctx.rank))
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(rows, generator=order_rng).to(ctx.device)
            for part in torch.tensor_split(order, cfg.minibatches):
                result = update(self.policy, self.optimizer, batch.select(part), advantages[part],
                                old_logprobs[part], None if ref_logprobs is None
                                else ref_logprobs[part], cfg, ctx)
                for key, value in result.items():
                    totals[key] = totals.get(key, 0.0) + value
                updates += 1

        successes = (all_rewards >= cfg.success_threshold - 1e-9).float().view(-1, cfg.group_size)
        stats = torch.stack([
            (entropy * batch.response_mask).sum(dtype=torch.float64),
            batch.response_mask.sum(dtype=torch.float64),
            torch.tensor(float(batch.reward_errors), dtype=torch.float64, device=ctx.device)])
        ctx.all_reduce_sum(stats)
        tokens = max(totals["tokens"], 1.0)
        elapsed = time.perf_counter() - started
        record = {
            "kind": "train", "step": step,
            "reward_mean": all_rewards.float().mean().item(),
            "pass@1": successes.mean().item(),
            "pass@k": pass_at_k(cfg.group_size, successes.sum(1), cfg.group_size).mean().item(),
            "k": cfg.group_size,
            "entropy": (stats[0] / stats[1].clamp(min=1)).item(),
            "response_len": (stats[1] / all_rewards.numel()).item(),
            "loss": totals["loss"] / updates,
            "grad_norm": totals["grad_norm"] / updates,
            "clipfrac": totals["clipfrac"] / tokens,
            "clipfrac_lower": totals["clipfrac_lower"] / tokens,
            "approx_kl": totals["approx_kl"] / tokens,
            "skipped_updates": int(totals["skipped"]),
            "reward_errors": int(stats[2].item()),
            "tokens_per_s": stats[1].item() / elapsed,
            "step_s": elapsed,
        }
        if ref_logprobs is not None:
            record["kl"] = totals["kl"] / tokens
        record.update(risk)
        if record["skipped_updates"]:
            log(ctx, f"step {step}: {record['skipped_updates']} update(s) skipped: non-finite "
                     "loss or gradient (weights unchanged)")
        return record

    @torch.no_grad()
    def evaluate(self, step: int) -> dict:
        """Pass@k for every k of ``reported_ks(eval_samples)`` on the test split,
        and each question's number of successes (``correct``, in test-split
        order: the difficulty buckets of ``riskpo-train compare`` read it).
        Each rank takes every world-th question, sampled with the training
        temperature."""
        cfg, ctx = self.cfg, self.ctx
        questions = self.test_set[:cfg.eval_questions] if cfg.eval_questions else self.test_set
        mine = questions[ctx.rank::ctx.world]
        if not mine:  # every rank must join every generate call under FSDP
            mine = questions[:1]
            weight = 0.0
        else:
            weight = 1.0
        batch = self._sample(mine, cfg.eval_samples, ("eval", step))
        k = cfg.eval_samples
        correct = (batch.rewards >= cfg.success_threshold - 1e-9).view(-1, k).sum(1)
        _, entropy = rollout_logprobs(self.policy, batch, cfg.micro_batch_size)
        ks = reported_ks(k)
        stats = torch.stack([
            *(pass_at_k(k, correct, j).sum().to(torch.float64) for j in ks),
            batch.rewards.view(-1, k).mean(1).sum(dtype=torch.float64),
            (entropy * batch.response_mask).sum(dtype=torch.float64),
            batch.response_mask.sum(dtype=torch.float64),
            torch.tensor(float(len(mine)), dtype=torch.float64, device=ctx.device)]) * weight
        ctx.all_reduce_sum(stats)
        count = stats[-1].clamp(min=1)
        record = {"kind": "eval", "step": step, "k": k}
        record.update({f"pass@{j}": (stats[i] / count).item() for i, j in enumerate(ks)})
        record["pass@k"] = record[f"pass@{k}"]
        record.update({"reward_mean": (stats[-4] / count).item(),
                       "entropy": (stats[-3] / stats[-2].clamp(min=1)).item(),
                       "questions": int(stats[-1].item()),
                       "correct": self._gather_question_counts(correct, len(questions),
                                                               weight > 0)})
        return record

    def _gather_question_counts(self, counts: torch.Tensor, questions: int, mine: bool) -> list:
        """Every rank's per-question counts, back in test-split order (rank r
        held questions r, r + world, ...)."""
        ctx = self.ctx
        width = -(-questions // ctx.world)  # ranks hold equal shares, padded with -1
        padded = torch.full((width,), -1, dtype=torch.int64, device=ctx.device)
        if mine:
            padded[:counts.numel()] = counts
        table = ctx.all_gather_cat(padded).view(ctx.world, width)
        return [c for c in table.t().reshape(-1).tolist() if c >= 0][:questions]

    # --- checkpoints -----------------------------------------------------------------

    def _state_dicts(self) -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_state_dict,
        )

        return get_state_dict(self.policy, self.optimizer,
                              options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_checkpoint(self, step: int) -> None:
        """Rank 0 writes OUT/checkpoint.pt through a temporary file and a rename:
        a crash mid-save leaves the previous checkpoint whole."""
        model_state, optim_state = self._state_dicts()
        if self.ctx.is_main:
            state = {
                "step": step, "config": asdict(self.cfg), "model": model_state,
                "optimizer": optim_state,
                "tracker": None if self.tracker is None else self.tracker.state_dict(),
                "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            }
            atomic_torch_save(state, self.out / CHECKPOINT)
        self.ctx.barrier()

    def load_checkpoint(self) -> int:
        """Restore OUT/checkpoint.pt; the step it was saved after. ValueError
        naming the file when it is unreadable, not a checkpoint of this trainer,
        from a run with other options, or does not fit this run's model."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_state_dict,
        )

        path = self.out / CHECKPOINT
        state = read_checkpoint(path)
        # A saved config that lost a key would otherwise pass the comparison below.
        lost = sorted(f.name for f in dataclasses.fields(self.cfg)
                      if f.name not in state["config"] and f.name not in RESUMABLE_CHANGES)
        if lost:
            raise ValueError(f"--resume: {path}: the saved config lacks {', '.join(lost)}")
        # set_state_dict may accept a partial state dict; every weight must be there.
        expected = set(self.policy.state_dict())
        missing = sorted(expected - set(state["model"]))
        unexpected = sorted(set(state["model"]) - expected)
        if missing or unexpected:
            raise ValueError(f"--resume: {path}: the model state "
                             + ("is empty" if not state["model"] else
                                f"lacks {', '.join(missing[:5]) or 'nothing'} and has unexpected "
                                f"{', '.join(unexpected[:5]) or 'nothing'}"))
        changed = sorted(k for k, v in state["config"].items()
                         if k not in RESUMABLE_CHANGES and getattr(self.cfg, k, None) != v)
        if changed:
            details = ", ".join(f"{k}: {state['config'][k]!r} -> {getattr(self.cfg, k, None)!r}"
                                for k in changed)
            saved_recipe = state["config"].get("recipe")
            hint = (f" (the run was started with --recipe {saved_recipe}: pass it again)"
                    if saved_recipe is not None and saved_recipe != self.cfg.recipe else "")
            raise ValueError(f"--resume: the options differ from the checkpoint's ({details}); "
                             "only " + ", ".join(sorted(RESUMABLE_CHANGES)) + f" may change{hint}")
        if (self.tracker is None) != (state["tracker"] is None):
            raise ValueError(f"--resume: {path}: "
                             + ("no quantile tracker state for --algo riskpo" if state["tracker"]
                                is None else "a quantile tracker state, but --algo is not riskpo"))
        try:
            set_state_dict(self.policy, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optimizer"],
                           options=StateDictOptions(full_state_dict=True))
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"--resume: {path}: its model or optimizer state does not fit this "
                             f"run's model: {brief(exc)}") from exc
        try:
            if self.tracker is not None:
                self.tracker.load_state_dict(state["tracker"])
            torch.set_rng_state(state["rng"]["torch"])
            random.setstate(state["rng"]["python"])
            if state["rng"]["cuda"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"--resume: {path}: malformed tracker or random-generator state: "
                             f"{brief(exc)}") from exc
        return state["step"]

    def save_final_model(self) -> None:
        """OUT/final_model: a Hugging Face directory (``from_pretrained`` loads it)."""
        model_state, _ = self._state_dicts()
        if self.ctx.is_main:
            lm_state = {k[len("lm."):]: v for k, v in model_state.items() if k.startswith("lm.")}
            lm = self.policy.lm
            save_model_dir(lm, self.tokenizer, self.out / "final_model", state_dict=lm_state)
        self.ctx.barrier()

    # --- the run ---------------------------------------------------------------------

    def run(self) -> dict:
        cfg, ctx = self.cfg, self.ctx
        metrics_path = self.out / "metrics.jsonl"
        start = 0
        if cfg.resume:
            start = self.load_checkpoint()
            log(ctx, f"resuming {self.out} after step {start}")
        elif (self.out / CHECKPOINT).exists():
            raise FileExistsError(f"{self.out} already holds a run ({CHECKPOINT}): pass --resume "
                                  "to continue it, or choose another --out")
        if ctx.is_main:
            for name in RUN_FILES:  # what saves killed mid-write left behind
                remove_stale_temporaries(self.out / name)
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.json", self.cfg.to_json())
            keep_records_up_to(metrics_path, start)
        writer = MetricsWriter(metrics_path, self.out, ctx.is_main)
        began = time.perf_counter()
        try:
            if start == 0:
                writer.write(self.evaluate(0))
            steps = range(start + 1, cfg.rl_steps + 1)
            bar = None
            if cfg.progress and ctx.is_main:
                from tqdm import tqdm
                bar = tqdm(total=cfg.rl_steps, initial=start, desc=f"{cfg.algo} RL",
                           dynamic_ncols=True)
            last_train = last_eval = None
            for step in steps:
                last_train = self.rl_step(step)
                writer.write(last_train)
                if step == cfg.rl_steps or (cfg.eval_every and step % cfg.eval_every == 0):
                    last_eval = self.evaluate(step)
                    writer.write(last_eval)
                if step == cfg.rl_steps or (cfg.save_every and step % cfg.save_every == 0):
                    self.save_checkpoint(step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{last_train['reward_mean']:.3f}",
                                    pass1=f"{last_train['pass@1']:.3f}",
                                    entropy=f"{last_train['entropy']:.3f}")
            if bar is not None:
                bar.close()
            if cfg.rl_steps == 0 or start >= cfg.rl_steps:
                self.save_checkpoint(max(start, cfg.rl_steps))
            self.save_final_model()
        finally:
            writer.close()
        summary = summarise(metrics_path, self.cfg, time.perf_counter() - began) if ctx.is_main else {}
        if ctx.is_main:
            atomic_write_text(self.out / "summary.json", json.dumps(summary, indent=2))
        return summary


def end_of_sequence_ids(lm, tokenizer) -> list[int]:
    """The tokenizer's EOS and every EOS of the model's generation config (Qwen
    lists two): a response ends at the first of any of them."""
    ids = lm.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("the model and its tokenizer define no end-of-sequence token")
    return sorted(set(ids))


def train(cfg: TrainConfig) -> dict:
    """Run one training job (single process, or one rank under torchrun)."""
    ctx = init_distributed(cfg.device)
    try:
        return Trainer(cfg, ctx).run()
    finally:
        shutdown(ctx)


def main(argv=None) -> int:
    from .config import parse_config

    cfg = parse_config(argv)
    summary = train(cfg)
    if summary:
        final = summary.get("final_eval") or {}
        print(json.dumps({"out": cfg.out, "steps": summary["steps"],
                          "test_pass@1": final.get("pass@1"), "test_pass@k": final.get("pass@k")}))
    if launched_by_torchrun():
        # torchrun CPU workers can abort in interpreter teardown after a clean
        # run; the process group is already gone, so leave now with success.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0
