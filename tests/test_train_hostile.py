"""Hostile input to the trainer (issue 9): every bad option, config file,
checkpoint, run list or prompt is refused before any training, with an error
that names the option or file; a moved run directory still resumes."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from riskpo_train.compare import compare  # noqa: E402
from riskpo_train.compare import main as compare_main  # noqa: E402
from riskpo_train.config import OptionError, TrainConfig, load_yaml, parse_config  # noqa: E402
from riskpo_train.data import load_examples, split_examples  # noqa: E402
from riskpo_train.distributed import DistContext  # noqa: E402
from riskpo_train.checkpoint import CHECKPOINT, read_checkpoint  # noqa: E402
from riskpo_train.files import atomic_torch_save, read_records  # noqa: E402
from riskpo_train.trainer import Trainer  # noqa: E402


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _options_of(typ) -> list[str]:
    return [f.name for f in fields(TrainConfig) if f.type.split(" ")[0] == typ]


# ---------------------------------------------------------------------------
# Options: types, finiteness, ranges (TrainConfig.validate, the one check)


@pytest.mark.parametrize("name", _options_of("int"))
def test_an_int_option_refuses_a_bool_a_fraction_and_none(name):
    for value in (True, 2.5, None, "3"):
        with pytest.raises(OptionError, match=f"^{_flag(name)} must be an integer, got "):
            TrainConfig(**{name: value}).validate()


def _optional(name) -> bool:
    return next(f for f in fields(TrainConfig) if f.name == name).type.endswith("None")


@pytest.mark.parametrize("name", _options_of("float"))
def test_a_float_option_refuses_nan_inf_a_bool_and_a_string(name):
    for value in (math.nan, math.inf, -math.inf):
        with pytest.raises(OptionError, match=f"^{_flag(name)} must be a finite number, got "):
            TrainConfig(**{name: value}).validate()
    # None only where the option is optional (loss_scale_factor: "not set").
    for value in (False, "0.5") + (() if _optional(name) else (None,)):
        with pytest.raises(OptionError, match=f"^{_flag(name)} must be a number( or null)?, got "):
            TrainConfig(**{name: value}).validate()


@pytest.mark.parametrize("name", _options_of("str"))
def test_a_string_option_refuses_other_types_and_blanks(name):
    for value in (1, False, ["a"]):
        with pytest.raises(OptionError, match=f"^{_flag(name)} must be a string"):
            TrainConfig(**{name: value}).validate()
    with pytest.raises(OptionError, match=f"^{_flag(name)} must be a non-empty string"):
        TrainConfig(**{name: " "}).validate()


@pytest.mark.parametrize("name", _options_of("bool"))
def test_a_bool_option_refuses_numbers_and_strings(name):
    for value in (1, 0, "yes", None):
        with pytest.raises(OptionError, match=f"^{_flag(name)} must be true or false"):
            TrainConfig(**{name: value}).validate()


def test_exact_numbers_are_stored_in_the_options_type():
    cfg = TrainConfig(rl_steps=3.0, lr=1, model=None, data=None).validate()
    assert cfg.rl_steps == 3 and type(cfg.rl_steps) is int
    assert cfg.lr == 1.0 and type(cfg.lr) is float
    assert json.loads(cfg.to_json())["rl_steps"] == 3


@pytest.mark.parametrize("argv, message", [
    (["--tracker-lr", "0"], "--tracker-lr must be > 0, got 0.0"),
    (["--tracker-lr", "-1"], "--tracker-lr must be > 0"),
    (["--tracker-lr", "inf"], "--tracker-lr must be a finite number"),
    (["--max-grad-norm", "nan"], "--max-grad-norm must be a finite number, got nan"),
    (["--max-grad-norm", "-1"], "--max-grad-norm must be >= 0"),
    (["--success-threshold", "nan"], "--success-threshold must be a finite number"),
    (["--success-threshold", "inf"], "--success-threshold must be a finite number"),
    (["--temperature", "inf"], "--temperature must be a finite number"),
    (["--warmup-lr", "0"], "--warmup-lr must be > 0"),
    (["--lr=-1e-3"], "--lr must be >= 0"),
    (["--clip-low", "1"], "--clip-low must be < 1"),
    (["--clip-high", "-0.1"], "--clip-high must be >= 0"),
    (["--clip-ratio-c", "1"], "--clip-ratio-c must be > 1"),
    (["--loss-scale-factor", "4"], "--loss-scale-factor applies to --loss-agg seq-mean-token-sum-norm"),
    (["--loss-agg", "trl-dr-grpo", "--loss-scale-factor", "0"], "--loss-scale-factor must be > 0"),
    (["--seed", "-1"], r"--seed must be in \[0, 2\*\*63\)"),
    (["--task-seed", str(2 ** 64)], "--task-seed must be in"),
    (["--task-digits", "5"], r"--task-digits must be in \[1, 4\]"),
    (["--task-operators", "+/"], "--task-operators must be made of"),
    (["--out", ""], "--out must be a non-empty string"),
    (["--data", ""], "--data must be a non-empty string"),
])
def test_flags_out_of_range_are_named(argv, message):
    with pytest.raises(OptionError, match=f"^{message}"):
        parse_config(argv)


# ---------------------------------------------------------------------------
# YAML config files


@pytest.mark.parametrize("text, message", [
    ("rl_steps: true\n", "line 1: rl_steps must be an integer, got True"),
    ("lr: 1e-3\nseed: null\n", "line 2: seed must be an integer, got null"),
    ("rl-steps: 2.5\n", "line 1: rl-steps must be an integer, got 2.5"),
    ("lr: abc\n", "line 1: lr must be a number, got 'abc'"),
    ("lr: .nan\n", "line 1: lr must be a finite number, got nan"),
    ("max_grad_norm: nan\n", "line 1: max_grad_norm must be a finite number, got nan"),
    ("progress: 1\n", "line 1: progress must be true or false, got 1"),
    ("out: no\n", "line 1: out must be a string, got False"),  # YAML 1.1: no is false
    ("algo: [riskpo]\n", "line 1: algo must be a string"),
    ("rl_steps: 3\nrl-steps: 4\n", "line 2: option 'rl-steps' repeats line 1"),
    ("a: [1,\n", "line 2, column 1: not valid YAML: .*expected the node content"),
    ("lr: 1\n  bad: 2\n", "line 2, column 6: not valid YAML: mapping values are not allowed"),
    ("lr: !!python/object:os.system x\n", "line 1, column 5: not valid YAML: could not "
                                          "determine a constructor"),
    ("- 1\n- 2\n", "must hold a mapping of option: value, got list"),
    ("false\n", "must hold a mapping of option: value, got bool"),
    ("just text\n", "must hold a mapping of option: value, got str"),
])
def test_a_bad_config_file_is_named_with_its_line(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"^config file '{path}'(, | )" + message):
        load_yaml(path)
    with pytest.raises(ValueError, match=f"^config file '{path}'"):
        parse_config(["--config", str(path)])


def test_a_config_file_may_be_empty_and_integral_floats_are_ints(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# nothing set\n")
    assert load_yaml(path) == {}
    path.write_text("rl_steps: 30.0\nlr: 1\n")
    values = load_yaml(path)
    assert values == {"rl_steps": 30, "lr": 1.0}
    assert type(values["rl_steps"]) is int and type(values["lr"]) is float


def test_an_out_of_range_value_from_the_config_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tracker_lr: 0\nalpha: 0.9\n")
    with pytest.raises(OptionError, match=r"^--tracker-lr must be > 0, got 0.0 \(set by "
                                          f"tracker_lr in config file '{path}'\\)"):
        parse_config(["--config", str(path)])
    with pytest.raises(OptionError, match=r"--alpha < --beta .*\(set by alpha in config file"):
        parse_config(["--config", str(path), "--tracker-lr", "0.5"])
    # A flag overrides the file: the file is then not to blame.
    with pytest.raises(OptionError, match=r"^--tracker-lr must be > 0, got -1.0$"):
        parse_config(["--config", str(path), "--tracker-lr", "-1"])
    assert parse_config(["--config", str(path), "--tracker-lr", "0.5",
                         "--alpha", "0.1"]).tracker_lr == 0.5


# ---------------------------------------------------------------------------
# compare


def _run_dir(root: Path, name: str, seed: int) -> Path:
    path = root / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"algo": "grpo", "seed": seed}))
    (path / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1,
                                                    "reward_mean": 0.5}) + "\n")
    return path


def test_compare_refuses_one_run_given_twice(tmp_path, capsys):
    a = _run_dir(tmp_path, "a", 0)
    _run_dir(tmp_path, "b", 1)
    (tmp_path / "link").symlink_to(a)
    for twice in ([a, a], [a, tmp_path / "b", tmp_path / "b" / ".." / "a"], [a, tmp_path / "link"]):
        with pytest.raises(ValueError, match="given twice"):
            compare(twice, tmp_path / "cmp")
    assert compare_main([str(a), str(a) + "/", "--out", str(tmp_path / "cmp")]) == 1
    assert "is given twice" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


# ---------------------------------------------------------------------------
# Checkpoints, resumption, prompts: tiny runs of a randomly initialised model


def tiny_config(out, **overrides) -> TrainConfig:
    values = dict(out=str(out), warmup_steps=0, tiny_hidden_size=32, task_test_size=20,
                  rl_steps=1, prompts_per_step=10, group_size=4, max_new_tokens=4,
                  eval_every=0, eval_questions=10, eval_samples=2, progress=False,
                  device="cpu", lr=1e-3)
    values.update(overrides)
    return TrainConfig(**values)


def run(cfg: TrainConfig) -> dict:
    return Trainer(cfg, DistContext()).run()


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    """A finished one-step run; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("runs") / "done"
    run(tiny_config(out))
    return out


class RunsCode:
    """Unpickling calls Path.touch(marker)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _copy(run_dir: Path, to: Path) -> Path:
    shutil.copytree(run_dir, to)
    return to


def test_read_checkpoint_accepts_what_a_run_saves(one_step_run):
    state = read_checkpoint(one_step_run / CHECKPOINT)
    assert state["step"] == 1 and state["tracker"]["steps"] == 1


@pytest.mark.parametrize("damage, message", [
    ("truncate", r"is not a readable checkpoint \(truncated, corrupted"),
    ("empty", "is not a readable checkpoint"),
    ("text", "is not a readable checkpoint"),
    ("code", "is not a readable checkpoint .*: it holds objects other than tensors and plain"),
    ("list", "is not a riskpo-train checkpoint: it holds a list"),
    ("no optimizer", "is not a riskpo-train checkpoint: it lacks optimizer"),
    ("step is text", "malformed entry 'step'"),
    ("rng lacks python", "the random-generator state lacks python"),
    ("model of another shape", "its model or optimizer state does not fit this run's model"),
    ("no tracker", "no quantile tracker state for --algo riskpo"),
    ("tracker garbage", "malformed tracker or random-generator state"),
    ("model empty", "the model state is empty"),
    ("weight deleted", "the model state lacks "),
    ("weight added", "the model state lacks nothing and has unexpected extra.weight"),
    ("config lost a key", "the saved config lacks lr"),
])
def test_resume_from_a_damaged_checkpoint_names_the_file(one_step_run, tmp_path, damage,
                                                         message):
    out = _copy(one_step_run, tmp_path / "run")
    path = out / CHECKPOINT
    good = path.read_bytes()
    state = torch.load(path, weights_only=True)
    if damage == "truncate":
        path.write_bytes(good[:len(good) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "text":
        path.write_text("step: 1\n")
    elif damage == "code":  # loading it would run code: weights_only refuses
        torch.save({**state, "step": RunsCode(out / "ran")}, path)
    else:
        if damage == "list":
            state = [state]
        elif damage == "no optimizer":
            del state["optimizer"]
        elif damage == "step is text":
            state["step"] = "1"
        elif damage == "rng lacks python":
            del state["rng"]["python"]
        elif damage == "model of another shape":
            key = next(k for k, v in state["model"].items() if v.dim() == 2)
            state["model"][key] = state["model"][key][:, :3]
        elif damage == "no tracker":
            state["tracker"] = None
        elif damage == "tracker garbage":
            state["tracker"] = {"lr": 0.1}
        elif damage == "model empty":
            state["model"] = {}
        elif damage == "weight deleted":
            del state["model"][next(iter(state["model"]))]
        elif damage == "weight added":
            state["model"]["extra.weight"] = torch.zeros(2)
        elif damage == "config lost a key":
            del state["config"]["lr"]
        torch.save(state, path)
    with pytest.raises(ValueError, match=f"^--resume: {path}:? " + message):
        run(tiny_config(out, rl_steps=2, resume=True))
    assert not (out / "ran").exists()
    # A refused resume leaves the directory as it was.
    assert [r["step"] for r in read_records(out / "metrics.jsonl")] == [0, 1, 1]


def test_a_moved_run_directory_resumes_and_changed_options_are_still_refused(one_step_run,
                                                                             tmp_path):
    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.copytree(one_step_run, tmp_path / "original")
    (tmp_path / "original").rename(moved)  # mv original elsewhere/renamed
    with pytest.raises(ValueError, match=r"options differ .*\(lr: 0.001 -> 0.002\)"):
        run(tiny_config(moved, rl_steps=2, resume=True, lr=2e-3))
    summary = run(tiny_config(moved, rl_steps=2, resume=True))
    assert summary["steps"] == 2
    assert read_checkpoint(moved / CHECKPOINT)["step"] == 2
    assert json.loads((moved / "config.json").read_text())["out"] == str(moved)


def _dead_pid() -> int:
    """The PID of a process that has exited (a killed save's PID)."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def test_stale_temporary_checkpoints_are_removed_and_never_loaded(one_step_run, tmp_path):
    out = _copy(one_step_run, tmp_path / "run")
    dead = _dead_pid()
    stale = out / f"{CHECKPOINT}.tmp-{dead}"  # a save killed before its rename
    stale.write_bytes(b"half a checkpoint")
    stale_summary = out / f"summary.json.tmp-{dead}"
    stale_summary.write_text("{")
    assert run(tiny_config(out, rl_steps=2, resume=True))["steps"] == 2
    assert not stale.exists() and not stale_summary.exists()
    # A new run in a directory that only holds a killed first save's leftover
    # removes it when it starts, even if it then fails before saving anything.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / f"{CHECKPOINT}.tmp-{dead}").write_bytes(b"\x80")
    trainer = Trainer(tiny_config(fresh), DistContext())
    trainer.reward_fn = lambda completion, answer: 1 / 0
    with pytest.raises(RuntimeError, match="reward function failed"):
        trainer.run()
    names = [p.name for p in fresh.iterdir()]
    assert "config.json" in names and not [name for name in names if ".tmp-" in name]


def test_the_next_save_removes_a_stale_temporary_file_but_not_a_live_writers(tmp_path):
    path = tmp_path / CHECKPOINT
    dead, alive = _dead_pid(), os.getppid()
    (tmp_path / f"{CHECKPOINT}.tmp-{dead}").write_bytes(b"stale")
    (tmp_path / f"{CHECKPOINT}.tmp-{alive}").write_bytes(b"another process is writing this")
    (tmp_path / f"other.pt.tmp-{dead}").write_bytes(b"not ours")
    atomic_torch_save({"step": 3}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [CHECKPOINT, f"{CHECKPOINT}.tmp-{alive}", f"other.pt.tmp-{dead}"])
    assert torch.load(path)["step"] == 3


def test_an_over_long_test_prompt_is_refused_before_training(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"{a}+{a}=", "answer": 2 * a} for a in range(20)]
    data = tmp_path / "q.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # The row that the split puts in the test split, which training never samples.
    _, test = split_examples(load_examples(data), 0.1, 0)
    row = next(i for i, r in enumerate(rows) if r["prompt"] == test[0].prompt)
    rows[row]["prompt"] = "1" * 14 + "+1="  # 17 characters and BOS; the context leaves 12
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=f"^{data}, row {row} \\('1111.*has 18 tokens, more "
                                         "than the 12 the context leaves"):
        Trainer(tiny_config(tmp_path / "run", model=str(tiny_model_dir), data=str(data)),
                DistContext())
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag, value", [("--temperature", "1e-40"), ("--temperature", "nan"),
                                         ("--temperature", "inf"),
                                         ("--max-new-tokens", "1000000")])
def test_cli_refuses_unusable_sampling_options_in_one_line(flag, value, capsys):
    from riskpo_train.__main__ import main

    assert main([flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and flag in err and "Traceback" not in err


@pytest.mark.parametrize("damage", ["negative count", "count above k", "fractional count",
                                    "nan seed", "inf seed"])
def test_compare_refuses_impossible_counts_and_seeds_naming_the_file(one_step_run, tmp_path,
                                                                     damage):
    from riskpo_train.compare import load_run

    out = _copy(one_step_run, tmp_path / "run")
    metrics = out / "metrics.jsonl"
    if damage.endswith("seed"):
        target = out / "summary.json"
        summary = json.loads(target.read_text())
        summary["seed"] = float("nan") if damage == "nan seed" else float("inf")
        target.write_text(json.dumps(summary))
    else:
        target = metrics
        lines = metrics.read_text().splitlines()
        for i, line in enumerate(lines):
            record = json.loads(line)
            if isinstance(record.get("correct"), list) and record["correct"]:
                record["correct"][0] = {"negative count": -1, "count above k":
                                        record["k"] + 1, "fractional count": 0.5}[damage]
                lines[i] = json.dumps(record)
                break
        else:
            pytest.fail("the run saved no per-question counts")
        metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"^{target}"):
        load_run(out)
