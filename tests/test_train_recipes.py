"""Issue 12: the published recipes as trainer presets, Pass@k at several k with
per-question counts, Pass@k per difficulty bucket, and the experiment table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from riskpo_kernels.recipes import RECIPES, advantage_options  # noqa: E402
from riskpo_train import compare as cmp  # noqa: E402
from riskpo_train.buckets import BUCKETS, bucket_of, pass_at_k_by_bucket  # noqa: E402
from riskpo_train.config import OptionError, TrainConfig, parse_config, recipe_options  # noqa: E402
from riskpo_train.demo import demo_options  # noqa: E402
from riskpo_train.experiments import EXPERIMENTS, _run_dir  # noqa: E402
from riskpo_train.rollout import pass_at_k, reported_ks  # noqa: E402


# --- recipes --------------------------------------------------------------------------

def test_math_recipe_sets_every_published_value():
    cfg = parse_config(["--recipe", "math"])
    assert (cfg.bundle_size, cfg.alpha, cfg.beta, cfg.w_low, cfg.w_high) == (5, 0.2, 0.9, 1.5, 0.0)
    assert (cfg.quantile_mode, cfg.credit, cfg.normalize_std, cfg.natural_baseline) == \
        ("batch", "std", True, True)
    assert (cfg.group_size, cfg.prompts_per_step, cfg.minibatches, cfg.ppo_epochs) == \
        (5, 1024, 2, 1)
    assert (cfg.lr, cfg.weight_decay, cfg.max_grad_norm) == (1e-6, 0.01, 1.0)
    assert (cfg.clip_low, cfg.clip_high, cfg.clip_ratio_c) == (0.2, 0.2, 3.0)
    assert (cfg.kl_coef, cfg.entropy_coef, cfg.loss_agg, cfg.temperature) == \
        (0.0, 0.0, "token-mean", 1.0)
    assert cfg.recipe == "math"


def test_dapo_recipe_differs_where_the_published_run_did():
    cfg = parse_config(["--recipe", "dapo"])
    assert (cfg.beta, cfg.group_size, cfg.credit, cfg.natural_baseline) == \
        (0.8, 10, "sum-mean", False)
    assert (cfg.prompts_per_step, cfg.minibatches) == (512, 4)


def test_flags_and_config_file_override_the_recipe(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("recipe: math\nbeta: 0.7\nlr: 0.001\n")
    cfg = parse_config(["--config", str(path), "--lr", "0.002", "--quantile-mode", "track"])
    assert (cfg.recipe, cfg.beta, cfg.lr, cfg.quantile_mode, cfg.group_size) == \
        ("math", 0.7, 0.002, "track", 5)
    cfg = TrainConfig.from_recipe("math", prompts_per_step=100)
    assert (cfg.prompts_per_step, cfg.group_size) == (100, 5)


def test_unknown_recipe_is_refused_by_name(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("recipe: gsm8k\n")
    with pytest.raises(OptionError, match="--recipe must be one of math, dapo, got 'gsm8k'"):
        parse_config(["--config", str(path)])
    with pytest.raises(ValueError, match="recipe must be one of"):
        TrainConfig.from_recipe("gsm8k")
    with pytest.raises(OptionError, match=r"gsm8k'.*set by recipe in config file"):
        parse_config(["--config", str(path)])
    with pytest.raises(ValueError, match="the recipe is its first argument"):
        TrainConfig.from_recipe("math", recipe="dapo")
    with pytest.raises(ValueError, match=r"unknown RiskPO advantage option\(s\) \['gamma'\]"):
        advantage_options("math", gamma=1)
    # A list where a recipe name belongs (a YAML `recipe: [math]` handed on).
    with pytest.raises(ValueError,
                       match=r"recipe must be one of \['dapo', 'math'\], got \['math'\] \(list\)"):
        TrainConfig.from_recipe(["math"])
    path.write_text("recipe: [math]\n")
    with pytest.raises(ValueError, match="recipe must be a string"):
        parse_config(["--config", str(path)])


def test_trainer_defaults_are_the_math_recipes_advantage():
    cfg = TrainConfig()
    for key, value in RECIPES["math"]["advantage"].items():
        assert getattr(cfg, key) == value, key
    assert cfg.recipe is None


def test_every_recipe_value_is_a_trainer_option():
    for name in RECIPES:
        options = recipe_options(name)
        assert len(options) == len(RECIPES[name]["advantage"]) + len(RECIPES[name]["training"])
        TrainConfig(**options).validate()


def test_partial_last_bundle_is_allowed_as_in_the_published_run():
    # 1024 prompts in bundles of 5: 204 bundles and one of 4.
    TrainConfig.from_recipe("math")


# --- --help in sections ---------------------------------------------------------------

def test_every_option_is_in_exactly_one_help_section():
    from dataclasses import fields

    from riskpo_train.config import OPTION_GROUPS

    grouped = [name for _, _, names in OPTION_GROUPS for name in names]
    assert sorted(grouped) == sorted(f.name for f in fields(TrainConfig))
    assert len(grouped) == len(set(grouped))
    assert [title for title, _, _ in OPTION_GROUPS] == [
        "task", "model", "RL", "RiskPO", "optimisation", "evaluation", "output", "distributed"]


def test_help_lists_the_sections_in_order_and_every_flag_once():
    from dataclasses import fields

    from riskpo_train.config import build_parser

    text = build_parser().format_help()
    lines = text.splitlines()
    titles = ["task:", "model:", "RL:", "RiskPO:", "optimisation:", "evaluation:", "output:",
              "distributed:"]
    assert [line for line in lines if line in titles] == titles
    assert "other:" not in lines
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        # Once in its section; the usage line names no option but --config.
        starts = [line.split()[0] for line in lines if line.strip()]
        assert starts.count(flag) + starts.count(flag + ",") == 1, flag
    assert "--warmup-cache" not in text.split("\n\n")[0]
    # The section of a flag: --beta under RiskPO, --lr under optimisation.
    assert text.index("RiskPO:") < text.index("--beta BETA") < text.index("optimisation:")
    assert text.index("optimisation:") < text.index("--lr LR") < text.index("evaluation:")
    # Where the warm-up cache goes, said in its help.
    cache_help = " ".join(text[text.index("--warmup-cache"):text.index("RL:")].split())
    assert "under the current directory, not under --out" in cache_help


def test_sections_leave_parsing_unchanged(tmp_path):
    """Every flag kind still parses as before: values, choices, --no- booleans,
    the YAML file under the flags, the defaults of flags not given."""
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.01\nbeta: 0.85\n")
    cfg = parse_config(["--config", str(path), "--lr", "0.002", "--no-normalize-std",
                        "--credit", "uniform", "--device", "cpu", "--eval-every", "3",
                        "--warmup-cache", str(tmp_path / "cache"), "--out", str(tmp_path / "o")])
    assert (cfg.lr, cfg.beta, cfg.normalize_std, cfg.credit, cfg.device, cfg.eval_every) == \
        (0.002, 0.85, False, "uniform", "cpu", 3)
    assert (cfg.warmup_cache, cfg.out) == (str(tmp_path / "cache"), str(tmp_path / "o"))
    assert parse_config([]) == TrainConfig().validate()
    with pytest.raises(SystemExit):
        parse_config(["--credit", "nope"])


# --- Pass@k at several k, per question ------------------------------------------------

def test_reported_ks():
    assert reported_ks(32) == [1, 4, 16, 32]
    assert reported_ks(8) == [1, 4, 8]
    assert reported_ks(1) == [1]


def test_eval_records_hold_every_k_and_per_question_counts(tmp_path):
    from riskpo_train.distributed import DistContext
    from riskpo_train.trainer import Trainer

    cfg = TrainConfig(out=str(tmp_path / "run"), warmup_steps=0, tiny_hidden_size=32,
                      task_test_size=20, rl_steps=1, prompts_per_step=10, group_size=4,
                      max_new_tokens=4, eval_every=0, eval_questions=7, eval_samples=5,
                      progress=False, device="cpu", lr=1e-3)
    Trainer(cfg, DistContext()).run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 1]
    for record in evals:
        assert record["k"] == 5 and len(record["correct"]) == 7
        assert all(0 <= c <= 5 for c in record["correct"])
        import torch
        counts = torch.tensor(record["correct"])
        for k in (1, 4, 5):
            assert record[f"pass@{k}"] == pytest.approx(pass_at_k(5, counts, k).mean().item())
        assert record["pass@k"] == record["pass@5"]
        assert record["pass@1"] == pytest.approx(sum(record["correct"]) / 35)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert "correct" not in summary["final_eval"] and summary["final_eval"]["pass@5"] >= 0


def test_resuming_a_recipe_run_without_the_recipe_says_to_pass_it(tmp_path):
    from riskpo_train.distributed import DistContext
    from riskpo_train.trainer import Trainer

    tiny = dict(out=str(tmp_path / "run"), warmup_steps=0, tiny_hidden_size=32,
                task_test_size=20, rl_steps=1, prompts_per_step=10, max_new_tokens=4,
                eval_every=0, eval_questions=4, eval_samples=2, progress=False, device="cpu")
    Trainer(TrainConfig.from_recipe("dapo", **tiny), DistContext()).run()
    with pytest.raises(ValueError, match=r"credit: 'sum-mean' -> 'std'.*"
                                         r"started with --recipe dapo: pass it again"):
        Trainer(TrainConfig(**{**tiny, "rl_steps": 2, "resume": True}), DistContext()).run()
    # The same values under the recipe's name resume.
    Trainer(TrainConfig.from_recipe("dapo", **{**tiny, "rl_steps": 2, "resume": True}),
            DistContext()).run()


# --- buckets --------------------------------------------------------------------------

def test_bucket_edges():
    names = [b[0] for b in BUCKETS]
    assert names[bucket_of(0, 32)].startswith("unsolved")
    assert names[bucket_of(1, 32)].startswith("hard")
    assert names[bucket_of(8, 32)].startswith("hard")       # 0.25 is in (0, 0.25]
    assert names[bucket_of(9, 32)].startswith("medium")
    assert names[bucket_of(24, 32)].startswith("medium")    # 0.75 is in (0.25, 0.75]
    assert names[bucket_of(25, 32)].startswith("easy")
    assert names[bucket_of(32, 32)].startswith("easy")
    with pytest.raises(ValueError, match="0 <= correct <= samples"):
        bucket_of(5, 4)


def test_pass_at_k_by_bucket_by_hand():
    # Reference with 4 samples: questions 0, 1 unsolved; 2 hard (1/4); 3 easy (4/4).
    reference = {"k": 4, "correct": [0, 0, 1, 4]}
    # Later model, 4 samples: 2 of 4, 0 of 4, 4 of 4, 3 of 4.
    later = {"k": 4, "correct": [2, 0, 4, 3]}
    rows = {r["bucket"].split()[0]: r for r in pass_at_k_by_bucket(reference, later, [1, 2])}
    assert rows["unsolved"]["questions"] == 2
    assert rows["unsolved"]["pass@1"] == pytest.approx((0.5 + 0.0) / 2)
    # Pass@2 with 2 of 4 correct: 1 - C(2,2)/C(4,2) = 5/6.
    assert rows["unsolved"]["pass@2"] == pytest.approx((5 / 6 + 0.0) / 2)
    assert rows["hard"]["pass@1"] == 1.0 and rows["easy"]["pass@1"] == 0.75
    assert rows["medium"]["questions"] == 0 and rows["medium"]["pass@1"] is None


def test_pass_at_k_by_bucket_refuses_mismatched_records():
    with pytest.raises(ValueError, match="not the same test questions"):
        pass_at_k_by_bucket({"k": 4, "correct": [0, 1]}, {"k": 4, "correct": [0]}, [1])
    with pytest.raises(ValueError, match="no per-question counts"):
        pass_at_k_by_bucket({"k": 4, "pass@1": 0.5}, {"k": 4, "correct": [0]}, [1])
    with pytest.raises(ValueError, match="k=8 needs 1 <= k <= 4"):
        pass_at_k_by_bucket({"k": 4, "correct": [0]}, {"k": 4, "correct": [0]}, [8])


def _write_run(root: Path, name: str, algo: str, seed: int, finals: list[int]) -> Path:
    d = root / name
    d.mkdir(parents=True)
    evals = [{"kind": "eval", "step": 0, "k": 4, "pass@1": 0.25, "pass@4": 0.5,
              "pass@k": 0.5, "entropy": 1.0, "correct": [0, 1, 4, 2]},
             {"kind": "eval", "step": 5, "k": 4, "pass@1": sum(finals) / 16,
              "pass@4": 0.75, "pass@k": 0.75, "entropy": 0.5 + seed, "correct": finals}]
    train = [{"kind": "train", "step": s, "reward_mean": 0.1 * s, "pass@1": 0.1, "pass@k": 0.2,
              "entropy": 1.0, "clipfrac": 0.0} for s in range(1, 6)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [evals[0], *train,
                                                                           evals[1]]))
    (d / "config.json").write_text(json.dumps({"algo": algo, "seed": seed}))
    return d


def test_compare_groups_by_directory_and_tables_the_buckets(tmp_path):
    runs = [_write_run(tmp_path, "riskseeking-seed0", "riskpo", 0, [1, 2, 4, 2]),
            _write_run(tmp_path, "riskseeking-seed1", "riskpo", 1, [3, 2, 4, 2]),
            _write_run(tmp_path, "riskpo-seed0", "riskpo", 0, [0, 0, 4, 4])]
    reference = _write_run(tmp_path, "warmup", "riskpo", 0, [0, 1, 4, 2])
    table = cmp.compare(runs, out_dir=tmp_path / "out", reference=reference)
    assert "| riskseeking |     2 |" in table and "| riskpo      |     1 |" in table
    # Buckets from the reference's first evaluation: q0 unsolved, q1 hard, q2 easy, q3 medium.
    line = next(row for row in table.splitlines()
                if row.startswith("| unsolved") and "|   1 |" in row)
    cells = [c.strip() for c in line.strip("|").split("|")]
    # step 0 (every run: 0 of 4) Pass@1 0; riskseeking seeds 1/4 and 3/4: 0.500 ± 0.354; riskpo 0.
    # Every run drew the same step-0 samples: one draw, not three.
    assert "step 0 (1 draw)" in table
    assert cells[1:] == ["1", "1", "0.000", "0.500 ± 0.354", "0.000"]
    assert (tmp_path / "out" / "seeds.png").stat().st_size > 0
    # A group whose runs differ in algo is split, never pooled.
    mixed = [_write_run(tmp_path / "m", "x-seed0", "riskpo", 0, [1, 2, 4, 2]),
             _write_run(tmp_path / "m", "x-seed1", "grpo", 1, [1, 2, 4, 2])]
    groups = cmp._groups([cmp.load_run(p) for p in mixed])
    assert list(groups) == ["x (riskpo)", "x (grpo)"]
    with pytest.raises(ValueError, match="no per-question counts"):
        legacy = tmp_path / "legacy-seed0"
        legacy.mkdir()
        (legacy / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "step": 0, "k": 4,
                                                          "pass@1": 0.5}) + "\n")
        cmp.compare([legacy], out_dir=tmp_path / "out2", reference=legacy)


# --- the demo's and the experiments' settings ------------------------------------------

def test_demo_and_every_experiment_run_are_valid_configs():
    TrainConfig(**demo_options()).validate()
    for name, experiment in EXPERIMENTS.items():
        for run_name, options in experiment.runs.items():
            cfg = TrainConfig(**demo_options(**options)).validate()
            if options.get("algo") == "grpo" or run_name.startswith("grpo"):
                assert cfg.algo == "grpo"
            assert _run_dir(Path("o"), name, run_name, 0).name == f"{run_name}-seed0"


def test_bundling_experiment_keeps_the_prompt_budget():
    runs = EXPERIMENTS["bundling"].runs
    budgets = {o["prompts_per_step"] * o["rl_steps"] for o in runs.values()}
    assert len(budgets) == 1 and {o["prompts_per_step"] for o in runs.values()} == {20, 60, 200}


def test_advantage_signal_simulation():
    from riskpo_train.experiments import advantage_signal

    table = advantage_signal([0.0, 0.3, 0.6, 1.0], prompts=20, repeats=5)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:5]]
            for line in table.splitlines()[2:]}
    # A bundle of one prompt: the advantage is a function of the response's own
    # reward (correlation 1) and a prompt with one outcome gets 0, as in GRPO.
    assert rows["bundle 1"] == ["1.00", "+0.00", "+0.00"]
    # The math recipe's bundles mix prompts: weaker signal, and the natural
    # baseline pushes a prompt answered right every time down.
    corr, all_right, _ = rows["math recipe (credit std)"]
    assert 0 < float(corr) < 0.95 and float(all_right) < 0
