"""The trainer end to end on the embedded task (tiny shapes): files it writes,
exact resumption, atomic checkpoints, skipped non-finite updates, bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from riskpo_train.config import TrainConfig, load_yaml, parse_config  # noqa: E402
from riskpo_train.distributed import DistContext  # noqa: E402
from riskpo_train.model import build_char_tokenizer, build_tiny_model, save_model_dir  # noqa: E402
from riskpo_train.policy import Policy  # noqa: E402
from riskpo_train.rollout import Rollout, cut_at_eos, encode_prompts, pass_at_k  # noqa: E402
from riskpo_train.checkpoint import CHECKPOINT  # noqa: E402
from riskpo_train.files import atomic_torch_save, read_records  # noqa: E402
from riskpo_train.metrics import TIMING_FIELDS  # noqa: E402
from riskpo_train.trainer import Trainer  # noqa: E402
from riskpo_train.update import update  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def warmup_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("warmup-cache")


def tiny_config(out, warmup_cache, **overrides) -> TrainConfig:
    values = dict(out=str(out), warmup_cache=str(warmup_cache), warmup_steps=30,
                  tiny_hidden_size=32, task_test_size=20, rl_steps=4, prompts_per_step=10,
                  group_size=4, max_new_tokens=4, eval_every=2, eval_questions=10,
                  eval_samples=4, progress=False, device="cpu", lr=1e-3)
    values.update(overrides)
    return TrainConfig(**values)


def run(cfg: TrainConfig) -> dict:
    return Trainer(cfg, DistContext()).run()


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def test_a_run_writes_metrics_summary_checkpoint_and_a_loadable_model(tmp_path, warmup_cache):
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(tmp_path / "run", warmup_cache)
    summary = run(cfg)
    records = read_records(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert [r["step"] for r in evals] == [0, 2, 4]
    for key in ("reward_mean", "pass@1", "pass@k", "entropy", "clipfrac", "approx_kl", "loss",
                "q_lo", "q_hi", "grad_norm", "tokens_per_s"):
        assert all(math.isfinite(r[key]) for r in train), key
    assert all(0 <= r["pass@1"] <= r["pass@k"] <= 1 for r in train + evals)
    assert all(r["entropy"] > 0 for r in train)
    assert summary["algo"] == "riskpo" and summary["steps"] == 4
    assert summary["final_eval"] == {k: v for k, v in evals[-1].items() if k != "correct"}
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == summary
    assert json.loads((tmp_path / "run" / "config.json").read_text())["algo"] == "riskpo"
    state = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=False)
    assert state["step"] == 4 and state["tracker"] is not None
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final_model")
    for name, w in lm.state_dict().items():
        torch.testing.assert_close(w, state["model"]["lm." + name], rtol=0, atol=0)


@pytest.mark.parametrize("algo", ["riskpo", "grpo"])
def test_two_steps_then_resume_equals_four_straight(tmp_path, warmup_cache, algo):
    straight = tiny_config(tmp_path / "straight", warmup_cache, algo=algo, ppo_epochs=2,
                           minibatches=2)
    run(straight)
    first = dataclasses.replace(straight, out=str(tmp_path / "resumed"), rl_steps=2)
    run(first)
    run(dataclasses.replace(first, rl_steps=4, resume=True))
    a = torch.load(tmp_path / "straight" / CHECKPOINT, weights_only=False)
    b = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=False)
    assert a["step"] == b["step"] == 4
    for name, w in a["model"].items():
        assert torch.equal(w, b["model"][name]), name
    if algo == "riskpo":
        assert a["tracker"]["steps"] == b["tracker"]["steps"] == 4
        assert torch.equal(a["tracker"]["values"], b["tracker"]["values"])
    assert without_timing(read_records(tmp_path / "straight" / "metrics.jsonl")) == \
        without_timing(read_records(tmp_path / "resumed" / "metrics.jsonl"))
    # RL moved the weights: the comparison is of two trained models.
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["final_train"]["grad_norm"] > 0
    start = Trainer(dataclasses.replace(straight, out=str(tmp_path / "fresh")), DistContext())
    assert any(not torch.equal(w, a["model"][name]) for name, w in start.policy.state_dict().items())


def test_a_new_run_refuses_an_existing_run_and_resume_refuses_changed_options(tmp_path,
                                                                              warmup_cache):
    cfg = tiny_config(tmp_path / "run", warmup_cache, rl_steps=1, eval_every=0)
    run(cfg)
    with pytest.raises(FileExistsError, match="--resume"):
        run(cfg)
    with pytest.raises(ValueError, match="clip_low"):
        run(dataclasses.replace(cfg, resume=True, rl_steps=2, clip_low=0.1))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(dataclasses.replace(cfg, out=str(tmp_path / "empty"), resume=True))


KILL_MID_SAVE = """
import os, signal, sys, torch
sys.path.insert(0, {root!r})
from riskpo_train.files import atomic_torch_save

class DiesWhilePickled:
    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGKILL)  # like an OOM kill half-way through the file

atomic_torch_save({{"step": 2, "model": torch.ones(100_000), "bomb": DiesWhilePickled()}},
                  __import__("pathlib").Path({path!r}))
"""


def test_a_process_killed_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path = tmp_path / CHECKPOINT
    atomic_torch_save({"step": 1, "model": torch.zeros(3)}, path)
    script = KILL_MID_SAVE.format(root=str(ROOT), path=str(path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != CHECKPOINT]
    assert leftovers and all(".tmp-" in name for name in leftovers)  # it did start writing
    state = torch.load(path, weights_only=False)
    assert state["step"] == 1 and torch.equal(state["model"], torch.zeros(3))


def _fixed_batch(vocab):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (4, 7), generator=g)
    mask = torch.ones(4, 3)
    return Rollout(ids, torch.ones_like(ids), ids[:, 4:], mask, torch.zeros(4), [""] * 4)


def test_a_non_finite_loss_skips_the_update_and_is_counted(tmp_path):
    tokenizer = build_char_tokenizer()
    policy = Policy(build_tiny_model(tokenizer, hidden_size=32))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    batch = _fixed_batch(len(tokenizer))
    old = torch.zeros(4, 3)
    old[1, 2] = float("nan")
    stats = update(policy, optimizer, batch, torch.ones(4), old, None, TrainConfig(), DistContext())
    assert stats["skipped"] == 1.0
    for k, v in policy.state_dict().items():
        assert torch.equal(v, before[k]), k
    stats = update(policy, optimizer, batch, torch.ones(4), torch.zeros(4, 3), None, TrainConfig(),
                   DistContext())
    assert stats["skipped"] == 0.0
    assert any(not torch.equal(v, before[k]) for k, v in policy.state_dict().items())


def test_the_loss_positions_are_the_ones_that_predict_each_response_token():
    tokenizer = build_char_tokenizer()
    lm = build_tiny_model(tokenizer, hidden_size=32)
    policy = Policy(lm, temperature=0.7)
    ids, mask = encode_prompts(tokenizer, ["12+3=", "4+5="], 16, "cpu")
    response = torch.tensor([[5, 6, 2], [7, 2, 0]])
    response_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    full_ids = torch.cat([ids, response], 1)
    full_mask = torch.cat([mask, response_mask], 1)
    logprobs, _ = policy(full_ids, full_mask, response)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    logits = lm(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits
    expected = torch.log_softmax(logits[:, ids.shape[1] - 1:-1] / 0.7, -1)
    expected = expected.gather(-1, response[..., None]).squeeze(-1)
    valid = response_mask.bool()
    torch.testing.assert_close(logprobs[valid], expected[valid], rtol=1e-5, atol=1e-5)


def test_prompts_are_left_padded_after_bos():
    tokenizer = build_char_tokenizer()
    ids, mask = encode_prompts(tokenizer, ["1+2=", "10+20="], 16, "cpu")
    assert mask.tolist() == [[0, 0, 1, 1, 1, 1, 1], [1] * 7]
    assert ids[0, 2].item() == tokenizer.bos_token_id == ids[1, 0].item()
    with pytest.raises(ValueError, match="prompt 1 .* has 7 tokens"):
        encode_prompts(tokenizer, ["1+2=", "10+20="], 6, "cpu")


def test_responses_are_cut_after_the_first_eos():
    eos, pad = [2, 9], 0
    response, mask = cut_at_eos(torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 5, 5, 5],
                                              [5, 9, 2, 5]]), eos, pad)
    assert response.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0], [5, 9, 0, 0]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0]]


@pytest.mark.parametrize("n,k", [(4, 1), (4, 2), (5, 5), (8, 3)])
def test_pass_at_k_is_the_probability_that_k_draws_contain_a_success(n, k):
    for c in range(n + 1):
        outcomes = [1] * c + [0] * (n - c)
        draws = list(combinations(outcomes, k))
        expected = sum(any(d) for d in draws) / len(draws)
        assert pass_at_k(n, torch.tensor([c]), k).item() == pytest.approx(expected)


def test_bad_options_and_inputs_get_clear_errors(tmp_path, warmup_cache):
    # The last bundle may hold fewer prompts, as in the published math recipe
    # (1024 prompts in bundles of 5).
    tiny_config(tmp_path, warmup_cache, prompts_per_step=12, bundle_size=5).validate()
    with pytest.raises(ValueError, match="--alpha"):
        tiny_config(tmp_path, warmup_cache, alpha=0.9).validate()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Trainer(tiny_config(tmp_path / "a", warmup_cache, model=str(tmp_path / "nope")),
                DistContext())
    with pytest.raises(ValueError, match="--data needs --model"):
        Trainer(tiny_config(tmp_path / "b", warmup_cache, data=str(tmp_path / "x.jsonl")),
                DistContext())


def test_a_data_file_with_a_math_reward_trains(tmp_path, warmup_cache, tiny_model_dir):
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": 2 * a}) + "\n"
                            for a in range(20)))
    cfg = tiny_config(tmp_path / "run", warmup_cache, model=str(tiny_model_dir), data=str(data),
                      rl_steps=1, eval_every=0)
    summary = run(cfg)
    assert summary["steps"] == 1 and summary["final_eval"]["questions"] == 2  # 10% of 20


def test_data_errors_name_the_problem(tmp_path, warmup_cache, tiny_model_dir):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match="prompt"):
        Trainer(tiny_config(tmp_path / "a", warmup_cache, model=str(tiny_model_dir),
                            data=str(data)), DistContext())
    data.write_text("".join(json.dumps({"prompt": "1" * 14 + "+1=", "answer": "2"}) + "\n"
                            for _ in range(4)))
    # Caught when the trainer is built, not when the prompt is first sampled.
    with pytest.raises(ValueError, match=r"q.jsonl, row 0 .* has 18 tokens, more than the 12 "
                                         r".*context"):
        Trainer(tiny_config(tmp_path / "b", warmup_cache, model=str(tiny_model_dir),
                            data=str(data), test_fraction=0.25), DistContext())


def test_a_raising_reward_is_an_error_or_a_counted_zero(tmp_path, warmup_cache, monkeypatch):
    def broken(completion, answer):
        if completion.startswith("1"):
            raise KeyError("boom")
        return float(completion == answer)

    trainer = Trainer(tiny_config(tmp_path / "a", warmup_cache, rl_steps=1), DistContext())
    trainer.reward_fn = broken
    with pytest.raises(RuntimeError, match="reward function failed .*boom.*--reward-errors zero"):
        trainer.run()
    trainer = Trainer(tiny_config(tmp_path / "b", warmup_cache, rl_steps=1, eval_every=0,
                                  reward_errors="zero"), DistContext())
    trainer.reward_fn = broken
    trainer.run()
    train = [r for r in read_records(tmp_path / "b" / "metrics.jsonl") if r["kind"] == "train"]
    assert train[0]["reward_errors"] > 0


def test_yaml_config_then_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("algo: grpo\nlr: 1e-6\nrl-steps: 7\nclip_high: 0.28\n")
    assert load_yaml(path) == {"algo": "grpo", "lr": 1e-6, "rl_steps": 7, "clip_high": 0.28}
    cfg = parse_config(["--config", str(path), "--rl-steps", "9", "--no-normalize-std"])
    assert (cfg.algo, cfg.lr, cfg.rl_steps, cfg.clip_high, cfg.normalize_std) == \
        ("grpo", 1e-6, 9, 0.28, False)
    path.write_text("learning_rate: 1\n")
    with pytest.raises(ValueError, match="unknown option 'learning_rate'"):
        load_yaml(path)


def test_the_cli_help_lists_the_contract_flags():
    out = subprocess.run([sys.executable, "-m", "riskpo_train", "--help"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    for flag in ("--algo", "--out", "--seed", "--warmup-steps", "--rl-steps", "--save-every",
                 "--resume", "--model", "--data", "--config", "--bundle-size", "--alpha",
                 "--beta", "--w-low", "--quantile-mode", "--credit"):
        assert flag in out.stdout, flag


def test_a_model_directorys_sampling_defaults_are_dropped(tmp_path, warmup_cache):
    tokenizer = build_char_tokenizer()
    lm = build_tiny_model(tokenizer, hidden_size=32)
    lm.generation_config.repetition_penalty = 1.5  # would bias samples away from the policy
    lm.generation_config.eos_token_id = [tokenizer.eos_token_id, 9]
    save_model_dir(lm, tokenizer, tmp_path / "model")
    trainer = Trainer(tiny_config(tmp_path / "run", warmup_cache, model=str(tmp_path / "model")),
                      DistContext())
    assert trainer.policy.lm.generation_config.repetition_penalty in (None, 1.0)
    assert trainer.eos_ids == sorted({tokenizer.eos_token_id, 9})
