"""The TRL adapter (riskpo_kernels/integrations/trl.py) against real TRL classes:
a tiny Qwen2 model with a character tokenizer, trained and scored on CPU."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

import riskpo_kernels as rk
from riskpo_kernels.integrations import trl as rtrl
from riskpo_kernels.integrations.trl import RiskPOConfig, RiskPOTrainer
from riskpo_train.model import build_char_tokenizer, build_tiny_model

ROOT = Path(__file__).resolve().parent.parent
N = 4          # num_generations
PROMPTS = 4    # prompts per generation batch
COMPLETION = 6  # max_completion_length


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer("0123456789+= ")


@pytest.fixture(scope="module")
def model_dir(tokenizer, tmp_path_factory):
    """The tiny model saved once: TRL loads it, and its reference model, by path."""
    path = tmp_path_factory.mktemp("tiny-qwen2")
    build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_dict({"prompt": [f"{i}+{i % 7}=" for i in range(24)]})


def digit_reward(completions, **kwargs):
    return [float(sum(c.count(d) for d in "13579")) for c in completions]


def length_reward(completions, **kwargs):
    return [0.25 * len(c) for c in completions]


def config(tmp_path, cls=RiskPOConfig, **overrides):
    options = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, fp16=False,
                   report_to="none", max_completion_length=COMPLETION, num_generations=N,
                   per_device_train_batch_size=N * PROMPTS, max_steps=2, logging_steps=1,
                   save_strategy="no", seed=0, learning_rate=1e-3)
    if cls is RiskPOConfig:
        options["bundle_size"] = 2
    options.update(overrides)
    return cls(**options)


def trainer(model_dir, tokenizer, dataset, args, cls=RiskPOTrainer, reward_funcs=None):
    return cls(model=model_dir, reward_funcs=reward_funcs or [digit_reward, length_reward],
               args=args, train_dataset=dataset, processing_class=tokenizer)


def generation_inputs(dataset, start=0):
    """One generation batch as TRL's sampler lays it out: each prompt N times."""
    return [{"prompt": dataset[i]["prompt"]} for i in range(start, start + PROMPTS)
            for _ in range(N)]


def generate(tr, inputs, seed=0):
    tr.model.train()
    torch.manual_seed(seed)
    return tr._generate_and_score_completions(copy.deepcopy(inputs))


# ----- runs -------------------------------------------------------------------

def test_a_riskpo_run_trains_tracks_and_sees_grouped_prompts(model_dir, tokenizer, dataset,
                                                            tmp_path):
    seen = []

    def recording_reward(prompts, completions, **kwargs):
        seen.append(list(prompts))
        return digit_reward(completions)

    args = config(tmp_path, quantile_mode="track", use_riskpo_loss=True, entropy_coef=0.01,
                  max_steps=3)
    tr = trainer(model_dir, tokenizer, dataset, args, reward_funcs=[recording_reward])
    before = {k: v.detach().clone() for k, v in tr.model.named_parameters()}
    tr.train()
    assert tr.tracker.steps == 3 and tr.tracker.initialized
    changed = [k for k, v in tr.model.named_parameters() if not torch.equal(v, before[k])]
    assert "lm_head.weight" in changed and len(changed) > len(before) // 2
    logs = [entry for entry in tr.state.log_history if "loss" in entry]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(e["loss"])) for e in logs)
    assert all("riskpo/q_lo" in e and "clip_ratio/region_mean" in e for e in logs)
    assert "riskpo/tracked_q_lo" in logs[-1]
    # The gathered batch is prompt-major: N consecutive completions of one prompt.
    assert len(seen) == 3
    for prompts in seen:
        assert len(prompts) == N * PROMPTS
        groups = [prompts[i:i + N] for i in range(0, len(prompts), N)]
        assert all(len(set(g)) == 1 for g in groups)
        assert len({g[0] for g in groups}) == PROMPTS


def test_advantages_are_mvar_advantages_of_the_gathered_rewards(model_dir, tokenizer, dataset,
                                                                 tmp_path):
    seen = {}

    def noisy_reward(completions, **kwargs):
        seen["noisy"] = [x + 0.1 * len(c) for x, c in zip(digit_reward(completions), completions)]
        return seen["noisy"]

    def recorded_length_reward(completions, **kwargs):
        seen["length"] = length_reward(completions)
        return seen["length"]

    args = config(tmp_path, quantile_mode="mix", credit="sum-mean", w_high=0.5,
                  mean_baseline=True, reward_weights=[1.0, 0.5])
    tr = trainer(model_dir, tokenizer, dataset, args,
                 reward_funcs=[noisy_reward, recorded_length_reward])
    expected_tracker = rk.QuantileTracker(lr=args.tracker_lr)
    for step in range(2):  # the first uses batch quantiles, the second the tracked ones
        inputs = generation_inputs(dataset, start=PROMPTS * step)
        tracked = rk.riskpo_loss.tracked_inputs(expected_tracker, args.riskpo_alpha,
                                                args.riskpo_beta, "mix", True, True)
        assert (tracked["q_lo"] is None) == (step == 0)
        out = generate(tr, inputs, seed=step)
        rewards = torch.tensor(seen["noisy"]) + 0.5 * torch.tensor(seen["length"])
        expected = rk.mvar_advantages(rewards, group_size=N, bundle_size=2, alpha=0.2, beta=0.9,
                                      w_low=1.5, w_high=0.5, quantile_mode="mix",
                                      credit="sum-mean", **tracked)
        torch.testing.assert_close(out["advantages"], expected.advantages, rtol=1e-6, atol=1e-6)
        assert out["advantages"].std() > 0
        expected_tracker.update(expected.bundle_scores)
        torch.testing.assert_close(tr.tracker.values, expected_tracker.values)
        assert list(tr._logs["advantages"])[-N * PROMPTS:] == pytest.approx(
            out["advantages"].tolist())
    assert tr.tracker.steps == 2


@pytest.mark.parametrize("scale_rewards", ["group", "none"])
def test_grpo_advantages_reproduce_grpo_trainer(model_dir, tokenizer, dataset, tmp_path,
                                                scale_rewards):
    common = dict(scale_rewards=scale_rewards, gradient_accumulation_steps=2)
    ours = trainer(model_dir, tokenizer, dataset,
                   config(tmp_path / "a", advantage="grpo", **common))
    theirs = trainer(model_dir, tokenizer, dataset, config(tmp_path / "b", GRPOConfig, **common),
                     cls=GRPOTrainer)
    inputs = generation_inputs(dataset)
    a, b = generate(ours, inputs), generate(theirs, inputs)
    assert torch.equal(a["completion_ids"], b["completion_ids"])  # the same batch
    assert b["advantages"].abs().max() > 0
    torch.testing.assert_close(a["advantages"], b["advantages"], rtol=1e-5, atol=1e-5)
    for tr in (ours, theirs):
        tr.current_gradient_accumulation_steps = 2
    loss_a = ours._compute_loss(ours.model, a)
    loss_b = theirs._compute_loss(theirs.model, b)
    assert loss_b.abs() > 1e-3
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-5)


# ----- the fused-linear loss against TRL's own ------------------------------------

def _perturbed_batch(out, generator):
    """The generated batch made hard: ragged masks (one row empty), old and
    reference log-probs off the current ones (ratios beyond both clip bounds and
    the dual clip), advantages of both signs."""
    batch = dict(out)
    B, T = batch["completion_ids"].shape
    lengths = torch.randint(1, T + 1, (B,), generator=generator)
    lengths[1] = 0
    mask = (torch.arange(T)[None, :] < lengths[:, None]).to(batch["completion_mask"].dtype)
    batch["completion_mask"] = batch["completion_mask"] * mask
    base = batch["ref_per_token_logps"]
    batch["old_per_token_logps"] = base + 0.6 * torch.randn(B, T, generator=generator)
    batch["ref_per_token_logps"] = base + 0.3 * torch.randn(B, T, generator=generator)
    batch["advantages"] = torch.randn(B, generator=generator) * 2
    batch["num_items_in_batch"] = batch["completion_mask"].sum() * 2
    return batch


def _loss_and_grads(tr, loss_fn, batch):
    tr.model.zero_grad(set_to_none=True)
    tr._metrics["train"].clear()
    loss = loss_fn(tr.model, batch)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in tr.model.named_parameters()}
    metrics = {k: v[-1] for k, v in tr._metrics["train"].items()}
    return loss.detach(), grads, metrics


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo", "grpo", "dr_grpo"])
def test_riskpo_loss_equals_trl_loss_and_gradients(model_dir, tokenizer, dataset, tmp_path,
                                                   loss_type):
    args = config(tmp_path, loss_type=loss_type, use_riskpo_loss=True, beta=0.05,
                  use_bias_correction_kl=False, epsilon=0.2, epsilon_high=0.28, delta=1.5,
                  temperature=0.7, gradient_accumulation_steps=2, steps_per_generation=4,
                  entropy_coef=0.0 if loss_type == "grpo" else 0.03)
    tr = trainer(model_dir, tokenizer, dataset, args)
    tr.current_gradient_accumulation_steps = 2
    batch = _perturbed_batch(generate(tr, generation_inputs(dataset)),
                             torch.Generator().manual_seed(1))

    trl_loss, trl_grads, trl_metrics = _loss_and_grads(
        tr, lambda m, b: GRPOTrainer._compute_loss(tr, m, b), batch)
    our_loss, our_grads, our_metrics = _loss_and_grads(tr, tr._compute_loss, batch)
    assert trl_loss.abs() > 1e-3
    torch.testing.assert_close(our_loss, trl_loss, rtol=1e-5, atol=1e-6)
    for name, grad in trl_grads.items():
        torch.testing.assert_close(our_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert trl_grads["lm_head.weight"].abs().max() > 1e-4
    assert trl_metrics["clip_ratio/low_mean"] > 0 and trl_metrics["clip_ratio/high_mean"] > 0
    for key in ("entropy", "kl", "clip_ratio/low_mean", "clip_ratio/high_mean",
                "clip_ratio/region_mean", "clip_ratio/low_min", "clip_ratio/high_max"):
        assert our_metrics[key] == pytest.approx(trl_metrics[key], rel=1e-5, abs=1e-6), key

    tr.model.eval()  # evaluation: no accumulation, TRL's dapo normaliser unscaled
    with torch.no_grad():
        torch.testing.assert_close(tr._compute_loss(tr.model, batch),
                                   GRPOTrainer._compute_loss(tr, tr.model, batch),
                                   rtol=1e-5, atol=1e-6)


def test_two_processes_slice_the_advantages_and_agree_on_the_tracker(tmp_path):
    """Both processes' rewards are gathered, bundled and sliced as TRL slices
    its own advantages; dapo divides by the global token count per process."""
    worker = Path(__file__).with_name("trl_distributed_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--standalone", str(worker), str(out)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["num_processes"] == 2
    assert result["advantages_differ_across_ranks"]  # so a wrong slice would show
    assert result["advantage_error"] <= 1e-6
    assert result["num_items_in_batch"] == sum(result["local_tokens"])
    assert result["loss_error"] <= 1e-6 and min(abs(x) for x in result["loss"]) > 1e-3
    assert result["tracker_steps"] == 3 and result["tracker_spread"] == 0.0


# ----- checkpoints ------------------------------------------------------------

def test_the_tracker_is_saved_with_the_checkpoint_and_restored(model_dir, tokenizer, dataset,
                                                                tmp_path):
    out = tmp_path / "run"
    tr = trainer(model_dir, tokenizer, dataset,
                 config(out, quantile_mode="track", save_strategy="steps", save_steps=2))
    tr.train()
    checkpoint = out / "checkpoint-2"
    saved = torch.load(checkpoint / rtrl.TRACKER_FILE, weights_only=True)
    assert saved["steps"] == 2
    torch.testing.assert_close(saved["values"], tr.tracker.values)

    resumed = trainer(model_dir, tokenizer, dataset,
                      config(out, quantile_mode="track", max_steps=3))
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.tracker.steps == 3  # two restored, one more step

    # A tracker file cut off mid-write (or empty) is named, with the way out.
    path = checkpoint / rtrl.TRACKER_FILE
    good = path.read_bytes()
    for damaged in (good[:len(good) // 2], b""):
        path.write_bytes(damaged)
        broken = trainer(model_dir, tokenizer, dataset,
                         config(out, quantile_mode="track", max_steps=3))
        with pytest.raises(ValueError, match=re.escape(str(path)) + r": not a readable quantile "
                           r"tracker state \(empty, truncated or corrupted.*delete the file"):
            broken.train(resume_from_checkpoint=str(checkpoint))

    path.unlink()
    restarted = trainer(model_dir, tokenizer, dataset,
                        config(out, quantile_mode="track", max_steps=3))
    with pytest.warns(UserWarning, match="quantile tracker restarts"):
        restarted.train(resume_from_checkpoint=str(checkpoint))
    assert restarted.tracker.steps == 1


# ----- bad input ----------------------------------------------------------------

def test_an_older_trl_without_the_overridden_methods_is_refused():
    class OldTrainer:
        def _generate_and_score_completions(self, inputs):
            pass

        def _compute_loss(self, model, inputs, extra):
            pass

        def _save_checkpoint(self, model, trial):
            pass

        def _load_optimizer_and_scheduler(self, checkpoint):
            pass

    with pytest.raises(ImportError, match=r"_calculate_rewards \(missing\).*"
                                          r"Supported TRL versions: >=1\.16,<1\.17"):
        rtrl.check_trl_compatibility(OldTrainer, "0.19.0")

    class ChangedTrainer(OldTrainer):
        def _calculate_rewards(self, inputs, prompts, completions):
            pass

    with pytest.raises(ImportError,
                       match=r"_calculate_rewards\('inputs', 'prompts', 'completions'\)"):
        rtrl.check_trl_compatibility(ChangedTrainer, "1.16.0")
    with pytest.warns(UserWarning, match="tested with TRL 1.16.0"):
        rtrl.check_trl_compatibility(GRPOTrainer, "1.17.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rtrl.check_trl_compatibility(GRPOTrainer, "1.16.0")


@pytest.mark.parametrize("option, value, message", [
    ("advantage", "ppo", "advantage: must be one of riskpo, grpo"),
    ("bundle_size", 0, "bundle_size: must be an integer >= 1"),
    ("bundle_size", 2.0, "bundle_size: must be an integer"),
    ("riskpo_alpha", 0.95, "riskpo_alpha, riskpo_beta: need 0 < riskpo_alpha < riskpo_beta"),
    ("riskpo_beta", 1.0, "riskpo_beta: need 0 < riskpo_alpha < riskpo_beta < 1"),
    ("riskpo_alpha", 0.0, "riskpo_alpha: need"),
    ("w_low", -1.0, "w_low: must be >= 0"),
    ("w_high", float("nan"), "w_high: must be a finite real number"),
    ("tracker_lr", 0.0, "tracker_lr: must be > 0"),
    ("quantile_mode", "tracked", "quantile_mode: must be one of batch, track, mix"),
    ("credit", "mean", "credit: must be one of uniform, score, std, sum-mean"),
    ("normalize_std", "yes", "normalize_std: must be True or False"),
    ("riskpo_chunk_size", 0, "riskpo_chunk_size: must be None or an integer >= 1"),
    ("riskpo_impl", "cuda", "riskpo_impl: must be one of auto"),
    ("multi_objective_aggregation", "normalize_then_sum", "multi_objective_aggregation"),
    ("partial_bundle", "drop", "partial_bundle: must be one of warn, allow, error"),
])
def test_invalid_riskpo_options_are_named(tmp_path, option, value, message):
    with pytest.raises(ValueError, match=f"RiskPOConfig.{message}"):
        config(tmp_path, **{option: value})


def test_grpo_advantages_refuse_batch_scaling(tmp_path):
    with pytest.raises(ValueError, match="RiskPOConfig.scale_rewards"):
        config(tmp_path, advantage="grpo", scale_rewards="batch")


@pytest.mark.parametrize("overrides, option", [
    (dict(loss_type="cispo"), "loss_type"),
    (dict(loss_type="sapo"), "loss_type"),
    (dict(importance_sampling_level="sequence"), "importance_sampling_level"),
    (dict(delta=1.1, epsilon_high=0.28), "delta"),
    (dict(beta=0.1), "use_bias_correction_kl"),
    (dict(off_policy_mask_threshold=0.5), "off_policy_mask_threshold"),
    (dict(top_entropy_quantile=0.5), "top_entropy_quantile"),
    (dict(use_adaptive_entropy=True), "use_adaptive_entropy"),
    (dict(loss_type="grpo", entropy_coef=0.01), "entropy_coef"),
    (dict(epsilon=1.0), "epsilon"),
])
def test_trl_options_the_fused_loss_cannot_reproduce_are_refused(tmp_path, overrides, option):
    with pytest.raises(ValueError, match=f"RiskPOConfig.{option}"):
        config(tmp_path, use_riskpo_loss=True, **overrides)
    config(tmp_path, use_riskpo_loss=False, **overrides)  # TRL's own loss takes them


def test_partial_bundles_warn_by_default_and_can_be_refused(model_dir, tokenizer, dataset,
                                                           tmp_path):
    # 3 prompts per generation batch, bundles of 2: the last bundle holds one.
    small = dict(per_device_train_batch_size=3 * N)
    with pytest.warns(UserWarning, match=r"RiskPOConfig.bundle_size: the generation batch holds "
                                         r"3 prompts.*last bundle holds 1 prompt"):
        config(tmp_path, **small)
    with pytest.raises(ValueError, match=r"RiskPOConfig.bundle_size: the generation batch holds "
                                         r"3 prompts.*partial_bundle='allow'"):
        config(tmp_path, partial_bundle="error", **small)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config(tmp_path, partial_bundle="allow", **small)
        config(tmp_path)  # whole bundles: no warning

    rewards = torch.arange(3 * N, dtype=torch.float32).remainder(5)[:, None].repeat(1, 2)
    expected = rk.mvar_advantages(rewards.sum(1), group_size=N, bundle_size=2, beta=0.9,
                                  credit="std")
    strict = trainer(model_dir, tokenizer, dataset, config(tmp_path, partial_bundle="error"))
    with pytest.raises(ValueError, match="RiskPOConfig.bundle_size: the batch holds 3 prompts"):
        strict.riskpo_advantages(rewards, "train")
    assert strict.tracker.steps == 0
    # Evaluation batches may end in a partial bundle, and do not move the tracker.
    torch.testing.assert_close(strict.riskpo_advantages(rewards, "eval"), expected.advantages)
    assert strict.tracker.steps == 0
    tr = trainer(model_dir, tokenizer, dataset, config(tmp_path))
    torch.testing.assert_close(tr.riskpo_advantages(rewards, "train"), expected.advantages)
    assert tr.tracker.steps == 1


def test_options_set_after_construction_and_bad_rewards_are_named(model_dir, tokenizer,
                                                                  dataset, tmp_path):
    # A dataclass field assigned later skips __post_init__: riskpo_advantages
    # checks what it reads again (bundle_size 0 was a ZeroDivisionError).
    tr = trainer(model_dir, tokenizer, dataset, config(tmp_path))
    rewards = torch.arange(PROMPTS * N * 2, dtype=torch.float32).view(-1, 2).remainder(3)
    want = tr.riskpo_advantages(rewards, "eval")
    for value in (0, -2, 2.0, True, None):
        tr.args.bundle_size = value
        with pytest.raises(ValueError, match=r"RiskPOConfig.bundle_size: must be an integer >= 1"):
            tr.riskpo_advantages(rewards, "eval")
    tr.args.bundle_size = 2
    tr.args.riskpo_alpha = float("nan")
    with pytest.raises(ValueError, match="RiskPOConfig.riskpo_alpha: must be a finite"):
        tr.riskpo_advantages(rewards, "eval")
    tr.args.riskpo_alpha = 0.2
    torch.testing.assert_close(tr.riskpo_advantages(rewards, "eval"), want, rtol=0, atol=0)
    # 1-D rewards: refused (one function's rewards, or one completion's?), with the fix.
    with pytest.raises(ValueError, match=r"rewards_per_func must be \(N, F\) = \(completions, 2 "
                                         r"reward functions\), got shape \(16,\); for a single "
                                         r"reward function pass rewards\[:, None\]"):
        tr.riskpo_advantages(rewards.sum(1), "eval")
    with pytest.raises(ValueError, match=r"rewards_per_func must be \(N, F\).*got shape \(16, 1\)"):
        tr.riskpo_advantages(rewards[:, :1], "eval")
    with pytest.raises(ValueError, match="rewards_per_func must be float32"):
        tr.riskpo_advantages(rewards.long(), "eval")
    with pytest.raises(ValueError, match="mode must be one of 'train', 'eval'"):
        tr.riskpo_advantages(rewards, "test")
    assert tr.tracker.steps == 0


def test_a_completion_without_any_reward_is_refused(model_dir, tokenizer, dataset, tmp_path):
    tr = trainer(model_dir, tokenizer, dataset, config(tmp_path))
    rewards = torch.ones(PROMPTS * N, 2)
    rewards[5, 0] = float("nan")  # one function without a reward: nansum, as TRL
    tr.riskpo_advantages(rewards, "eval")
    rewards[5, 1] = float("nan")
    with pytest.raises(ValueError,
                       match=r"every reward function returned None for completions \[5\]"):
        tr.riskpo_advantages(rewards, "eval")


def test_models_and_batches_the_fused_loss_cannot_handle_are_refused(model_dir, tokenizer,
                                                                     dataset, tmp_path):
    model = build_tiny_model(tokenizer, hidden_size=32, num_layers=2, num_heads=2)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
        RiskPOTrainer(model=model, reward_funcs=digit_reward, train_dataset=dataset,
                      processing_class=tokenizer, args=config(tmp_path, use_riskpo_loss=True))
    with pytest.raises(TypeError, match="RiskPOConfig"):
        RiskPOTrainer(model=model_dir, reward_funcs=digit_reward, train_dataset=dataset,
                      processing_class=tokenizer, args=config(tmp_path, GRPOConfig))
    tr = trainer(model_dir, tokenizer, dataset, config(tmp_path, use_riskpo_loss=True))
    batch = generate(tr, generation_inputs(dataset))
    batch["pixel_values"] = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"multimodal inputs \(pixel_values\)"):
        tr._compute_loss(tr.model, batch)


def test_importing_riskpo_kernels_does_not_import_trl():
    code = "import sys, riskpo_kernels; assert 'trl' not in sys.modules, 'trl imported'"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
