"""Every option of a training run, in one dataclass: loadable from YAML
(``--config``), overridden by command-line flags, saved as ``OUT/config.json``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path

from riskpo_kernels.common import AGGREGATIONS, CREDITS, QUANTILE_MODES
from riskpo_kernels.policy.aggregation import SCALED
from riskpo_kernels.recipes import RECIPES, recipe


from .task import OPERATORS

ALGOS = ("riskpo", "grpo")
RECIPE_NAMES = tuple(RECIPES)
# A recipe's training values, under this trainer's option names.
_RECIPE_TRAINING_OPTIONS = {
    "samples_per_prompt": "group_size", "prompts_per_step": "prompts_per_step",
    "minibatches": "minibatches", "epochs": "ppo_epochs", "lr": "lr",
    "weight_decay": "weight_decay", "clip_low": "clip_low", "clip_high": "clip_high",
    "clip_ratio_c": "clip_ratio_c", "grad_clip": "max_grad_norm", "kl_coef": "kl_coef",
    "entropy_coef": "entropy_coef", "agg": "loss_agg", "temperature": "temperature",
    "tracker_lr": "tracker_lr"}
# The trainer's RiskPO defaults are the published math recipe's (as it ran).
_MATH = RECIPES["math"]["advantage"]
LOSS_AGGS = AGGREGATIONS
REWARD_NAMES = ("auto", "exact", "math")
PARAM_DTYPES = ("float32", "bfloat16", "float16")


MIN_TEMPERATURE = 1e-4
MAX_NEW_TOKENS = 4096


def _opt(default, help, choices=None, **kw):
    return field(default=default, metadata={"help": help, "choices": choices, **kw})


@dataclass
class TrainConfig:
    # The run.
    algo: str = _opt("riskpo", "advantage estimator: RiskPO's Mixed-VaR or GRPO", ALGOS)
    recipe: str | None = _opt(None, "a published RiskPO recipe as it ran "
                                    "(riskpo_kernels/recipes.py): its values replace the "
                                    "defaults; the config file and flags still override them",
                              RECIPE_NAMES)
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
    warmup_cache: str = _opt("runs/warmup-cache", "directory of the embedded model's cached "
                                                  "warm-ups, one warmup-KEY subdirectory per "
                                                  "warm-up setting; a relative path is under the "
                                                  "current directory, not under --out, so the runs "
                                                  "of a comparison share it")
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
    loss_agg: str = _opt("token-mean", "loss aggregation (verl 0.9.1's modes; trl-grpo and "
                                       "trl-dr-grpo are TRL's grpo and dr_grpo)", LOSS_AGGS)
    loss_scale_factor: float | None = _opt(None, "seq-mean-token-sum-norm and trl-dr-grpo: a "
                                                 "constant to divide by instead of the padded "
                                                 "response length (verl's loss_scale_factor)")
    chunk_size: int = _opt(0, "tokens per chunk of the fused loss (0: the library's default)")
    param_dtype: str = _opt("float32", "under torchrun: FSDP mixed precision, the dtype forward "
                                       "and backward run in (master weights, optimizer and "
                                       "gradient reduction stay float32)", PARAM_DTYPES)
    # RiskPO (spec sections 3-6): defaults of the published math recipe as it ran
    # (section 9), per-bundle batch quantiles included (section 6).
    bundle_size: int = _opt(_MATH["bundle_size"], "Q: prompts per bundle")
    alpha: float = _opt(_MATH["alpha"], "lower quantile level")
    beta: float = _opt(_MATH["beta"], "upper quantile level")
    w_low: float = _opt(_MATH["w_low"], "weight of the lower tail (CVaR) part")
    w_high: float = _opt(_MATH["w_high"], "weight of the upper tail (risk-seeking) part")
    quantile_mode: str = _opt(_MATH["quantile_mode"], "quantiles: per-bundle batch (what the "
                                                      "published runs used), the tracker's "
                                                      "(the spec's track), or their mix",
                              QUANTILE_MODES)
    credit: str = _opt(_MATH["credit"], "credit of a paper's advantage to its responses", CREDITS)
    normalize_std: bool = _opt(_MATH["normalize_std"],
                               "divide advantages by the bundle score's std")
    natural_baseline: bool = _opt(_MATH["natural_baseline"], "c = q_lo - q_hi in the middle part")
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
        """Raise :class:`OptionError` (a ValueError) naming the option for every
        wrongly typed, non-finite, out-of-range or inconsistent setting.

        Every option must have its declared type (see :func:`check_type`); an
        int given for a float option becomes a float and an integral float
        given for an int option becomes an int, in place, so that config.json
        and the checkpoint hold one spelling of each value."""
        for f in fields(self):
            setattr(self, f.name, check_type(f, getattr(self, f.name)))
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices \
                    and not (f.name == "recipe" and self.recipe is None):
                raise OptionError(f.name, f"--{_flag(f.name)} must be one of {', '.join(choices)}, "
                                          f"got {getattr(self, f.name)!r}")
        positive = ("prompts_per_step", "group_size", "max_new_tokens", "ppo_epochs", "minibatches",
                    "bundle_size", "eval_samples", "warmup_batch_size", "tiny_hidden_size",
                    "tiny_layers", "task_digits", "task_test_size", "warmup_lr", "temperature",
                    "tracker_lr")
        for name in positive:
            if not getattr(self, name) > 0:
                raise OptionError(name, f"--{_flag(name)} must be > 0, got {getattr(self, name)}")
        # Sampling divides logits by the temperature: below MIN_TEMPERATURE the
        # quotient overflows and torch.multinomial fails with its own message.
        if not math.isfinite(self.temperature) or self.temperature < MIN_TEMPERATURE:
            raise OptionError("temperature", f"--temperature must be a finite float >= "
                                             f"{MIN_TEMPERATURE}, got {self.temperature}")
        # An explicit cap: the KV cache and logits buffers grow with it (1e6 asks for ~1 TB).
        if self.max_new_tokens > MAX_NEW_TOKENS:
            raise OptionError("max_new_tokens", f"--max-new-tokens must be <= {MAX_NEW_TOKENS}, "
                                                f"got {self.max_new_tokens}")
        non_negative = ("rl_steps", "warmup_steps", "micro_batch_size", "chunk_size", "save_every",
                        "eval_every", "eval_questions", "kl_coef", "entropy_coef", "weight_decay",
                        "max_grad_norm", "w_low", "w_high", "lr", "clip_low", "clip_high")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise OptionError(name, f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("seed", "task_seed"):  # torch.manual_seed takes 64-bit seeds
            if not 0 <= getattr(self, name) < 2 ** 63:
                raise OptionError(name, f"--{_flag(name)} must be in [0, 2**63), "
                                        f"got {getattr(self, name)}")
        if not 1 <= self.task_digits <= 4:
            raise OptionError("task_digits", f"--task-digits must be in [1, 4], got {self.task_digits}")
        if set(self.task_operators) - set(OPERATORS):
            raise OptionError("task_operators", f"--task-operators must be made of "
                                                f"{''.join(OPERATORS)}, "
                                                f"got {self.task_operators!r}")
        if not 0 < self.alpha < self.beta < 1:
            raise OptionError(("alpha", "beta"), f"need 0 < --alpha < --beta < 1, got {self.alpha} "
                                                 f"and {self.beta}")
        if not 0 < self.top_p <= 1:
            raise OptionError("top_p", f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.test_fraction < 1:
            raise OptionError("test_fraction", f"--test-fraction must be in [0, 1), "
                                               f"got {self.test_fraction}")
        if not self.clip_low < 1:
            raise OptionError("clip_low", f"--clip-low must be < 1 (the ratio's lower bound is "
                                          f"1 - clip_low), got {self.clip_low}")
        if not self.clip_ratio_c > 1:
            raise OptionError("clip_ratio_c", f"--clip-ratio-c must be > 1 (dual clip), "
                                              f"got {self.clip_ratio_c}")
        if self.loss_scale_factor is not None:
            if not self.loss_scale_factor > 0:
                raise OptionError("loss_scale_factor", f"--loss-scale-factor must be > 0, "
                                                       f"got {self.loss_scale_factor}")
            if self.loss_agg not in SCALED:
                raise OptionError(("loss_scale_factor", "loss_agg"),
                                  f"--loss-scale-factor applies to --loss-agg "
                                  f"{' or '.join(SCALED)} only, got --loss-agg {self.loss_agg}")
        return self

    @classmethod
    def from_recipe(cls, name: str, **overrides) -> TrainConfig:
        """The recipe's values over the defaults, ``overrides`` over both; validated.
        (Only this and :func:`parse_config` apply a recipe: ``TrainConfig(recipe=...)``
        records the name and keeps the values it is given.)"""
        if "recipe" in overrides:
            raise ValueError("from_recipe: the recipe is its first argument, not an override")
        return cls(**{**recipe_options(name), **overrides, "recipe": name}).validate()

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def recipe_options(name: str) -> dict:
    """{option: value} of recipe ``name`` (``math`` or ``dapo``) in this trainer's terms."""
    chosen = recipe(name)
    options = dict(chosen["advantage"])
    for key, value in chosen["training"].items():
        options[_RECIPE_TRAINING_OPTIONS[key]] = value
    return options


def _flag(name: str) -> str:
    return name.replace("_", "-")


class OptionError(ValueError):
    """A bad option value; ``options`` names the option(s) at fault (field names),
    so that :func:`parse_config` can say which config file set them."""

    def __init__(self, options: str | tuple[str, ...], message: str):
        super().__init__(message)
        self.options = (options,) if isinstance(options, str) else tuple(options)


def _field_type(f) -> tuple[type, bool]:
    """(the option's type, whether it may be None)."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    for name, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if text.startswith(name):
            return typ, "None" in text
    raise TypeError(f"unsupported option type {text} of {f.name}")


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def type_problem(f, value):
    """(value in the option's type, None), or (None, what is wrong) when it has
    another type. bool is never an int or a float; an int option takes an
    integral float (100.0 -> 100); a float option takes an int (1 -> 1.0) and
    must be finite; a string must not be blank; None only where the option is
    optional (model, data)."""
    typ, optional = _field_type(f)
    wanted = _TYPE_NAMES[typ] + (" or null" if optional else "")
    if value is None:
        return (None, None) if optional else (None, f"must be {wanted}, got null (None)")
    if typ is bool:
        if isinstance(value, bool):
            return value, None
    elif typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        if isinstance(value, float) and value.is_integer():
            return int(value), None
    elif typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value), None
            return None, f"must be a finite number, got {value}"
    elif isinstance(value, str):
        if value.strip():
            return value, None
        return None, f"must be a non-empty string, got {value!r}"
    return None, f"must be {wanted}, got {value!r} ({type(value).__name__})"


def check_type(f, value):
    """``value`` in the type of option ``f``; :class:`OptionError` naming the
    flag when it has another type (see :func:`type_problem`)."""
    value, problem = type_problem(f, value)
    if problem is not None:
        raise OptionError(f.name, f"--{_flag(f.name)} {problem}")
    return value


# The --help sections, in order: (title, description, options). Every option
# of TrainConfig is in exactly one (tests/test_train_recipes.py checks).
OPTION_GROUPS = (
    ("task", "the prompts and their reward: the embedded arithmetic task, or --data",
     ("data", "reward", "reward_errors", "test_fraction", "task_digits", "task_operators",
      "task_test_size", "task_seed")),
    ("model", "the policy: --model, or the embedded tiny model and its supervised warm-up",
     ("model", "tiny_hidden_size", "tiny_layers", "warmup_steps", "warmup_lr",
      "warmup_batch_size", "warmup_cache")),
    ("RL", "the algorithm and the rollouts of each step",
     ("algo", "recipe", "seed", "rl_steps", "prompts_per_step", "group_size", "max_new_tokens",
      "temperature", "top_p", "grpo_normalize_std")),
    ("RiskPO", "the Mixed-VaR advantages (--algo riskpo); defaults: the published math recipe",
     ("bundle_size", "alpha", "beta", "w_low", "w_high", "quantile_mode", "credit",
      "normalize_std", "natural_baseline", "mean_baseline", "tracker_lr")),
    ("optimisation", "the PPO-clip loss and the AdamW updates",
     ("lr", "weight_decay", "max_grad_norm", "ppo_epochs", "minibatches", "micro_batch_size",
      "clip_low", "clip_high", "clip_ratio_c", "kl_coef", "entropy_coef", "loss_agg",
      "loss_scale_factor", "chunk_size")),
    ("evaluation", "Pass@k on the held-out test split",
     ("success_threshold", "eval_every", "eval_questions", "eval_samples")),
    ("output", "the run directory (--out): metrics, checkpoints, final model",
     ("out", "resume", "save_every", "progress")),
    ("distributed", "devices and, under torchrun, FSDP2",
     ("device", "param_dtype")),
)


def build_parser(prog: str = "riskpo-train") -> argparse.ArgumentParser:
    # A short usage line: argparse's own lists all ~70 flags before the sections.
    parser = argparse.ArgumentParser(
        prog=prog, usage="%(prog)s [-h] [--config FILE] [--OPTION VALUE ...]\n"
                         "       %(prog)s compare RUN_DIR [RUN_DIR ...] [--out DIR]",
        description="RLVR training with RiskPO or GRPO. Defaults train the embedded "
        "tiny model on the embedded arithmetic task. `riskpo-train compare RUN...` compares runs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="YAML file of options (flags override it)")
    by_name = {f.name: f for f in fields(TrainConfig)}
    grouped = [name for _, _, names in OPTION_GROUPS for name in names]
    # An option missing from the table still gets its flag, in a last section.
    rest = tuple(name for name in by_name if name not in grouped)
    for title, description, names in OPTION_GROUPS + ((("other", None, rest),) if rest else ()):
        group = parser.add_argument_group(title, description)
        for f in (by_name[name] for name in names):
            typ, _ = _field_type(f)
            kwargs = {"default": argparse.SUPPRESS,
                      "help": f.metadata["help"] + f" (default: {f.default})"}
            if typ is bool:
                group.add_argument(f"--{_flag(f.name)}", action=argparse.BooleanOptionalAction,
                                   **kwargs)
            else:
                group.add_argument(f"--{_flag(f.name)}", type=typ,
                                   choices=f.metadata.get("choices"), **kwargs)
    return parser


def _yaml_error(path: Path, exc) -> ValueError:
    """A ValueError naming the file, and the line and column where yaml knows them."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None)
    context = getattr(exc, "context", None)
    text = ": ".join(p for p in (context, problem) if p) if problem else str(exc)
    return ValueError(f"config file {str(path)!r}{where}: not valid YAML: {text}")


def load_yaml(path) -> dict:
    """The options of a YAML file: {field name: value}, each of its option's type.

    Keys may be spelled with - or _. Raises FileNotFoundError, or ValueError
    naming the file (and the line where known) for malformed YAML, a top level
    that is not a mapping, an unknown or repeated option, or a value of the
    wrong type. Ranges are checked by :meth:`TrainConfig.validate`."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"config file {str(path)!r}: not UTF-8 text: {exc}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # nodes: where each key is
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    if data is None:  # an empty file, or only comments
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of option: value, "
                         f"got {type(data).__name__}")
    lines: dict[str, int] = {}
    for key_node, _ in getattr(root, "value", ()):
        if isinstance(key_node, yaml.ScalarNode):
            name, line = key_node.value.replace("-", "_"), key_node.start_mark.line + 1
            if name in lines:
                raise ValueError(f"config file {str(path)!r}, line {line}: option "
                                 f"{key_node.value!r} repeats line {lines[name]}")
            lines[name] = line
    known = {f.name: f for f in fields(TrainConfig)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        where = f"config file {str(path)!r}" + (f", line {lines[name]}" if name in lines else "")
        if name not in known:
            raise ValueError(f"{where}: unknown option {key!r}")
        if _field_type(known[name])[0] is float and isinstance(value, str):
            try:  # YAML 1.1 reads 1e-6 (no dot) as a string
                value = float(value)
            except ValueError:
                pass  # type_problem names it
        value, problem = type_problem(known[name], value)
        if problem is not None:
            raise ValueError(f"{where}: {key} {problem}")
        out[name] = value
    return out


def parse_config(argv=None) -> TrainConfig:
    """Defaults, then the YAML file, then the flags; validated. An invalid value
    that the YAML file set (and no flag overrode) is reported with the file."""
    args = vars(build_parser().parse_args(argv))
    path = args.pop("config", None)
    values = load_yaml(path) if path else {}
    from_file = set(values) - set(args)
    values.update(args)
    if values.get("recipe") is not None:  # the recipe fills what neither file nor flag set
        if values["recipe"] not in RECIPES:
            where = f" (set by recipe in config file {str(path)!r})" if "recipe" in from_file else ""
            raise OptionError("recipe", f"--recipe must be one of {', '.join(RECIPE_NAMES)}, "
                                        f"got {values['recipe']!r}{where}")
        values = {**recipe_options(values["recipe"]), **values}
    try:
        return TrainConfig(**values).validate()
    except OptionError as exc:
        named = [name for name in exc.options if name in from_file]
        if not named:
            raise
        raise OptionError(exc.options, f"{exc} (set by {', '.join(named)} in config file "
                                       f"{str(path)!r})") from None
