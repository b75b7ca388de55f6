"""Every option of a training run, in one dataclass: loadable from YAML
(``--config``), overridden by command-line flags, saved as ``OUT/config.json``."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

ALGOS = ("riskpo", "grpo")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
QUANTILE_MODES = ("batch", "track", "mix")
CREDITS = ("uniform", "score", "std", "sum-mean")
REWARD_NAMES = ("auto", "exact", "math")
PARAM_DTYPES = ("float32", "bfloat16", "float16")


def _opt(default, help, choices=None, **kw):
    return field(default=default, metadata={"help": help, "choices": choices, **kw})


@dataclass
class TrainConfig:
    # The run.
    algo: str = _opt("riskpo", "advantage estimator: RiskPO's Mixed-VaR or GRPO", ALGOS)
    out: str = _opt("runs/default", "output directory: metrics, checkpoint, final model")
    seed: int = _opt(0, "seed of prompt choice, sampling and everything random in RL")
    device: str = _opt("auto", "auto (cuda when available), cpu, cuda, cuda:N")
    resume: bool = _opt(False, "continue from OUT/checkpoint.pt (same config)")
    # Model and data.
    model: str | None = _opt(None, "a Hugging Face causal-LM directory; default: the embedded tiny model")
    data: str | None = _opt(None, "a .jsonl or .parquet file with prompt and answer columns; "
                                  "default: the embedded arithmetic task")
    reward: str = _opt("auto", "reward function: exact match, math (math-verify), or auto "
                               "(exact for the embedded task, math for --data)", REWARD_NAMES)
    reward_errors: str = _opt("raise", "when the reward function raises: raise, or zero "
                                       "(score 0, counted in reward_errors)", ("raise", "zero"))
    test_fraction: float = _opt(0.1, "share of --data held out as the test split")
    # The embedded task and model.
    task_digits: int = _opt(2, "embedded task: operand digits")
    task_operators: str = _opt("+", "embedded task: operators, any of + - *")
    task_test_size: int = _opt(200, "embedded task: held-out test questions")
    task_seed: int = _opt(0, "embedded task: seed of the train/test split, model init and warm-up")
    tiny_hidden_size: int = _opt(128, "embedded model: hidden size")
    tiny_layers: int = _opt(2, "embedded model: decoder layers")
    warmup_steps: int = _opt(1500, "supervised warm-up steps of the embedded model (0 skips it)")
    warmup_lr: float = _opt(3e-3, "supervised warm-up learning rate")
    warmup_batch_size: int = _opt(64, "supervised warm-up batch size")
    warmup_cache: str = _opt("runs/warmup-cache", "where warmed-up checkpoints are cached")
    # Sampling.
    prompts_per_step: int = _opt(20, "P: prompts per RL step")
    group_size: int = _opt(8, "n: samples per prompt")
    max_new_tokens: int = _opt(6, "longest response")
    temperature: float = _opt(1.0, "sampling temperature (the loss uses the same)")
    top_p: float = _opt(1.0, "nucleus sampling threshold")
    # The update.
    rl_steps: int = _opt(120, "RL steps")
    lr: float = _opt(5e-4, "AdamW learning rate")
    weight_decay: float = _opt(0.0, "AdamW weight decay")
    max_grad_norm: float = _opt(1.0, "gradient clipping (0 disables)")
    ppo_epochs: int = _opt(1, "passes over each rollout batch")
    minibatches: int = _opt(2, "optimizer steps per pass (the batch is split in this many)")
    micro_batch_size: int = _opt(0, "responses per forward on a rank (0: the whole minibatch)")
    clip_low: float = _opt(0.2, "PPO clip below 1")
    clip_high: float = _opt(0.2, "PPO clip above 1")
    clip_ratio_c: float = _opt(3.0, "dual-clip constant")
    kl_coef: float = _opt(0.0, "k3 KL to the starting policy (> 0 keeps a reference model)")
    entropy_coef: float = _opt(0.0, "entropy bonus")
    loss_agg: str = _opt("token-mean", "loss aggregation", LOSS_AGGS)
    chunk_size: int = _opt(0, "tokens per chunk of the fused loss (0: the library's default)")
    param_dtype: str = _opt("float32", "under torchrun: FSDP mixed precision, the dtype forward "
                                       "and backward run in (master weights, optimizer and "
                                       "gradient reduction stay float32)", PARAM_DTYPES)
    # RiskPO (spec sections 3-6; defaults of the reference runs, section 9).
    bundle_size: int = _opt(5, "Q: prompts per bundle")
    alpha: float = _opt(0.2, "lower quantile level")
    beta: float = _opt(0.8, "upper quantile level")
    w_low: float = _opt(1.5, "weight of the lower tail (CVaR) part")
    w_high: float = _opt(0.0, "weight of the upper tail (risk-seeking) part")
    quantile_mode: str = _opt("track", "quantiles: batch, tracked, or their mix", QUANTILE_MODES)
    credit: str = _opt("std", "credit of a paper's advantage to its responses", CREDITS)
    normalize_std: bool = _opt(True, "divide advantages by the bundle score's std")
    natural_baseline: bool = _opt(True, "c = q_lo - q_hi in the middle part")
    mean_baseline: bool = _opt(False, "subtract the tracker's mean baselines")
    tracker_lr: float = _opt(0.1, "quantile tracker step size")
    # GRPO.
    grpo_normalize_std: bool = _opt(True, "GRPO: divide by the group's std (off: Dr. GRPO)")
    # Evaluation, logging, checkpoints.
    success_threshold: float = _opt(1.0, "a response with reward >= this counts as solved")
    eval_every: int = _opt(10, "evaluate on the test split every this many steps (0: only at the end)")
    eval_questions: int = _opt(200, "test questions per evaluation (0: all)")
    eval_samples: int = _opt(8, "samples per test question; Pass@k uses k = this")
    save_every: int = _opt(0, "checkpoint every this many steps (0: only at the end)")
    progress: bool = _opt(True, "tqdm progress bar")

    def validate(self) -> TrainConfig:
        """Raise ValueError naming the option for every inconsistent setting."""
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"--{_flag(f.name)} must be one of {', '.join(choices)}, "
                                 f"got {getattr(self, f.name)!r}")
        positive = ("prompts_per_step", "group_size", "max_new_tokens", "ppo_epochs", "minibatches",
                    "bundle_size", "eval_samples", "warmup_batch_size", "tiny_hidden_size",
                    "tiny_layers", "task_digits", "task_test_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        non_negative = ("rl_steps", "warmup_steps", "micro_batch_size", "chunk_size", "save_every",
                        "eval_every", "eval_questions", "kl_coef", "entropy_coef", "weight_decay",
                        "max_grad_norm", "w_low", "w_high")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.alpha < self.beta < 1:
            raise ValueError(f"need 0 < --alpha < --beta < 1, got {self.alpha} and {self.beta}")
        if not 0 < self.temperature:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.test_fraction < 1:
            raise ValueError(f"--test-fraction must be in [0, 1), got {self.test_fraction}")
        if self.algo == "riskpo" and self.prompts_per_step % self.bundle_size:
            raise ValueError(f"--prompts-per-step ({self.prompts_per_step}) must be a multiple of "
                             f"--bundle-size ({self.bundle_size}): RiskPO scores whole bundles")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _field_type(f) -> type:
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if text.startswith(name):
            return typ
    raise TypeError(f"unsupported option type {text} of {f.name}")


def build_parser(prog: str = "riskpo-train") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="RLVR training with RiskPO or GRPO. Defaults train the embedded "
        "tiny model on the embedded arithmetic task. `riskpo-train compare RUN...` compares runs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML file of options (flags override it)")
    for f in fields(TrainConfig):
        typ = _field_type(f)
        kwargs = {"default": argparse.SUPPRESS, "help": f.metadata["help"] + f" (default: {f.default})"}
        if typ is bool:
            parser.add_argument(f"--{_flag(f.name)}", action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(f"--{_flag(f.name)}", type=typ, choices=f.metadata.get("choices"),
                                **kwargs)
    return parser


def load_yaml(path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of option: value")
    known = {f.name: f for f in fields(TrainConfig)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ValueError(f"config file {str(path)!r}: unknown option {key!r}")
        typ = _field_type(known[name])
        if value is not None and typ is float and isinstance(value, (int, str)):
            value = float(value)  # YAML reads 1e-6 as a string and 1 as an int
        if value is not None and not isinstance(value, typ):
            raise ValueError(f"config file {str(path)!r}: {key} must be {typ.__name__}, got {value!r}")
        out[name] = value
    return out


def parse_config(argv=None) -> TrainConfig:
    """Defaults, then the YAML file, then the flags; validated."""
    args = vars(build_parser().parse_args(argv))
    values = load_yaml(args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    values.update(args)
    return TrainConfig(**values).validate()
