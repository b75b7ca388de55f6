"""RiskPO in TRL: ``RiskPOTrainer``, a ``trl.GRPOTrainer`` whose advantages are
RiskPO's Mixed-VaR advantages (RISKPO_SPEC.md sections 2-6), and whose loss can
be this package's fused-linear op (section 8) with TRL's own normalisation.

    from riskpo_kernels.integrations.trl import RiskPOConfig, RiskPOTrainer
    args = RiskPOConfig(output_dir="out", num_generations=5, per_device_train_batch_size=25)
    RiskPOTrainer(model="Qwen/Qwen2.5-1.5B-Instruct", reward_funcs=reward, args=args,
                  train_dataset=dataset).train()

TRL 1.16's ``GRPOTrainer`` has no advantage hook. Its
``_generate_and_score_completions`` gathers every process's rewards (through
``_calculate_rewards``), computes the advantages of the whole generation batch
and keeps this process's slice. The trainer here overrides those two methods:
``_calculate_rewards`` hands the gathered rewards on unchanged and keeps them,
and ``_generate_and_score_completions`` replaces the slice TRL computed with the
same slice of ``mvar_advantages`` over the gathered rewards. The gathered batch
is prompt-major, ``num_generations`` consecutive completions per prompt (TRL's
``RepeatSampler``; TRL's own advantages assume the same layout), which is
``mvar_advantages``' layout; bundles are ``bundle_size`` consecutive prompts of
the generation batch (all processes, all ``steps_per_generation`` steps).

With ``use_riskpo_loss=True``, ``_compute_loss`` runs the model's backbone and
:func:`riskpo_kernels.fused_linear_policy_loss` on its last hidden state inside
the model's forward (through a second forward patch, as TRL's own fused LM head
does, so DDP / FSDP / ZeRO-3 see a forward), with TRL's per-token loss and
normalisation for loss types ``dapo``, ``bnpo``, ``grpo`` and ``dr_grpo``; the
options our op cannot reproduce exactly are refused by name (see
``RiskPOConfig``).

This module imports trl; ``import riskpo_kernels`` does not import it.
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import types
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import trl
from packaging.version import Version
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import ModelOutput
from trl import GRPOConfig, GRPOTrainer

import riskpo_kernels as rk
from riskpo_kernels import _validation as v
from riskpo_kernels import backends
from riskpo_kernels.common import CREDITS, QUANTILE_MODES
from riskpo_kernels.recipes import advantage_options
from riskpo_kernels.riskpo_loss import tracked_inputs

# The TRL releases this adapter was written against (it reads GRPOTrainer's
# private methods and attributes, which TRL changes between minor releases).
SUPPORTED_TRL = ">=1.16,<1.17"
TESTED_TRL = "1.16.0"

# Overridden (or called) GRPOTrainer methods and the parameters the overrides rely on.
REQUIRED_METHODS = {
    "_calculate_rewards": ("inputs", "prompts", "completions", "completion_ids_list"),
    "_generate_and_score_completions": ("inputs",),
    "_compute_loss": ("model", "inputs"),
    "_save_checkpoint": ("model", "trial"),
    "_load_optimizer_and_scheduler": ("checkpoint",),
}
# GRPOTrainer attributes read by the overrides (checked once the trainer is built).
REQUIRED_ATTRIBUTES = ("num_generations", "num_generations_eval", "reward_weights", "_logs",
                       "_metrics", "accelerator", "loss_type", "epsilon_low", "epsilon_high",
                       "beta", "temperature", "max_completion_length", "scale_rewards",
                       "multi_objective_aggregation", "aux_loss_enabled", "entropy_coef")

LOSS_TYPES = ("dapo", "bnpo", "grpo", "dr_grpo")
ADVANTAGES = ("riskpo", "grpo")
PARTIAL_BUNDLE = ("warn", "allow", "error")
TRACKER_FILE = "riskpo_tracker.pt"
# TRL has no dual clip unless ``delta`` is set: a bound no ratio reaches.
NO_DUAL_CLIP = 1e30
# TRL's GRPO advantages divide by (std + 1e-4).
TRL_GRPO_EPS = 1e-4
# Inputs of vision-language batches; the fused-loss path runs the text backbone only.
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes",
                    "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids",
                    "num_images", "num_tiles")
# Model-config attributes that change the logits after the LM head (TRL's fused
# head applies them); the fused-linear op computes plain ``hidden @ W.T + b``.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier",
                     "lm_head_multiplier", "logits_scaling")


def check_trl_compatibility(trainer_cls=GRPOTrainer, version: str | None = None) -> None:
    """Raise ``ImportError`` naming what is missing when ``trainer_cls`` (TRL's
    ``GRPOTrainer``) lacks a method this adapter overrides, or has it with other
    parameters; warn when the methods are there but ``version`` (TRL's, by
    default) is outside :data:`SUPPORTED_TRL`."""
    version = trl.__version__ if version is None else version
    problems = []
    for name, params in REQUIRED_METHODS.items():
        method = getattr(trainer_cls, name, None)
        if not callable(method):
            problems.append(f"{name} (missing)")
            continue
        try:
            found = tuple(inspect.signature(method).parameters)
        except (TypeError, ValueError):
            continue
        if found[1:1 + len(params)] != params:
            problems.append(f"{name}{tuple(found[1:])} (expected parameters {params})")
    if problems:
        raise ImportError(
            "riskpo_kernels.integrations.trl overrides GRPOTrainer's "
            f"{', '.join(REQUIRED_METHODS)}; TRL {version}'s GRPOTrainer differs: "
            f"{'; '.join(problems)}. Supported TRL versions: {SUPPORTED_TRL} "
            f"(tested with {TESTED_TRL}).")
    low, high = (Version(s.strip("<>=")) for s in SUPPORTED_TRL.split(","))
    if not low <= Version(version) < high:
        warnings.warn(f"riskpo_kernels.integrations.trl was tested with TRL {TESTED_TRL} "
                      f"(supported: {SUPPORTED_TRL}); TRL {version} has the methods it overrides, "
                      "but their behaviour may differ", stacklevel=2)


check_trl_compatibility()

_RECIPE = advantage_options("math")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class RiskPOConfig(GRPOConfig):
    """``GRPOConfig`` plus the RiskPO options. Defaults: the published math recipe
    (``riskpo_kernels.recipes.advantage_options("math")``: bundles of 5, alpha 0.2,
    beta 0.9, w_low 1.5, credit ``std``, batch quantiles as the published runs
    had). TRL's ``num_generations`` is the group size n; TRL's ``beta`` stays the
    KL coefficient, so RiskPO's quantile levels are ``riskpo_alpha`` and
    ``riskpo_beta``. With ``advantage="riskpo"`` TRL's ``scale_rewards`` is not
    read (``normalize_std`` is RiskPO's scaling). The recipe's dual clip
    (c = 3) is TRL's ``delta=3.0``: for ``delta >= 1 + epsilon_high`` TRL's
    two-sided clip and the dual clip are the same loss.

    Bundles are cut from the generation batch (``generation_batch_size /
    num_generations`` prompts, all processes). When that is not a multiple of
    ``bundle_size`` the last bundle holds fewer prompts (spec section 2; the
    published math recipe, 1024 prompts in bundles of 5, ran so):
    ``partial_bundle`` says what to do then: ``warn`` (default, once, when the
    config is made), ``allow``, or ``error`` (refuse the config, and any
    training batch that is not whole bundles).

    ``use_riskpo_loss=True`` computes the loss with the fused-linear op and TRL's
    definition of it; refused (``ValueError`` naming the option) where the op
    cannot reproduce TRL exactly: loss types other than dapo/bnpo/grpo/dr_grpo,
    ``importance_sampling_level="sequence"``, ``delta < 1 + epsilon_high``,
    ``use_bias_correction_kl`` with ``beta != 0`` (TRL's default: set it False),
    ``off_policy_mask_threshold``, ``top_entropy_quantile < 1``,
    ``use_adaptive_entropy``, ``entropy_coef`` with ``loss_type="grpo"``, vLLM
    importance-sampling correction, a MoE router loss, logit soft-capping or
    scaling in the model's config, multimodal inputs. One difference remains:
    the op clamps the log-ratio to [-20, 20] before ``exp`` (verl's guard),
    TRL does not; the two agree wherever ``|logp - old| <= 20``.
    """

    advantage: str = field(default="riskpo", metadata=_help(
        "riskpo: Mixed-VaR advantages over bundles; grpo: TRL's GRPO advantages computed by "
        "riskpo_kernels.grpo_advantages (a baseline through the same code path)"))
    bundle_size: int = field(default=_RECIPE["bundle_size"], metadata=_help("prompts per bundle"))
    riskpo_alpha: float = field(default=_RECIPE["alpha"], metadata=_help("lower quantile level"))
    riskpo_beta: float = field(default=_RECIPE["beta"], metadata=_help("upper quantile level"))
    w_low: float = field(default=_RECIPE["w_low"], metadata=_help("weight of the lower tail"))
    w_high: float = field(default=_RECIPE["w_high"], metadata=_help("weight of the upper tail"))
    quantile_mode: str = field(default=_RECIPE["quantile_mode"],
                               metadata=_help(f"one of {', '.join(QUANTILE_MODES)}"))
    credit: str = field(default=_RECIPE["credit"], metadata=_help(f"one of {', '.join(CREDITS)}"))
    normalize_std: bool = field(default=_RECIPE["normalize_std"],
                                metadata=_help("divide by the bundle score's std"))
    natural_baseline: bool = field(default=_RECIPE["natural_baseline"],
                                   metadata=_help("c = q_lo - q_hi in the middle part"))
    mean_baseline: bool = field(default=False, metadata=_help("subtract the tracker's baselines"))
    tracker_lr: float = field(default=0.1, metadata=_help("quantile tracker step size"))
    partial_bundle: str = field(default="warn", metadata=_help(
        "a generation batch that is not whole bundles: warn, allow or error"))
    use_riskpo_loss: bool = field(default=False, metadata=_help(
        "compute the loss with riskpo_kernels.fused_linear_policy_loss"))
    riskpo_chunk_size: int | None = field(default=None, metadata=_help(
        "tokens per chunk of the fused loss (None: the library's default)"))
    riskpo_impl: str = field(default="auto", metadata=_help("backend of the fused loss"))

    def __post_init__(self):
        super().__post_init__()
        # A NaN weight would make every summed reward NaN and the loss silently 0.
        weights = getattr(self, "reward_weights", None)
        if weights is not None:
            for w in weights:
                if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                    _fail("reward_weights", f"must be finite real numbers, got {list(weights)!r}")
        check_riskpo_options(self)


def _fail(name: str, message: str):
    raise ValueError(f"RiskPOConfig.{name}: {message}")


def _real(config, name, minimum=None, strict=False) -> float:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(name, f"must be a finite real number, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        _fail(name, f"must be {'>' if strict else '>='} {minimum}, got {value}")
    return float(value)


def _count(config, name, alternative="") -> int:
    """An integer in [1, 2**63 - 1] (the ops' int64): bool and float refused, not cast."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= v.INT64_MAX:
        _fail(name, f"must be {alternative}an integer >= 1 (and <= 2**63 - 1), got {value!r}")
    return value


def _flag(config, name) -> bool:
    value = getattr(config, name)
    if not isinstance(value, bool):
        _fail(name, f"must be True or False, got {value!r}")
    return value


def check_advantage_options(config: RiskPOConfig) -> None:
    """``ValueError`` naming the option for each invalid option the advantages
    read. Run when the config is made and again by every
    ``riskpo_advantages`` call: a dataclass field set after construction
    (``args.bundle_size = 0``) skips ``__post_init__``."""
    if config.advantage not in ADVANTAGES:
        _fail("advantage", f"must be one of {', '.join(ADVANTAGES)}, got {config.advantage!r}")
    _count(config, "bundle_size")
    alpha, beta = _real(config, "riskpo_alpha"), _real(config, "riskpo_beta")
    if not 0 < alpha < beta < 1:
        name = ("riskpo_alpha" if not 0 < alpha < 1 else "riskpo_beta" if not 0 < beta < 1
                else "riskpo_alpha, riskpo_beta")
        _fail(name, f"need 0 < riskpo_alpha < riskpo_beta < 1, got {alpha}, {beta}")
    _real(config, "w_low", 0.0)
    _real(config, "w_high", 0.0)
    _real(config, "tracker_lr", 0.0, strict=True)
    if config.quantile_mode not in QUANTILE_MODES:
        _fail("quantile_mode", f"must be one of {', '.join(QUANTILE_MODES)}, "
                               f"got {config.quantile_mode!r}")
    if config.credit not in CREDITS:
        _fail("credit", f"must be one of {', '.join(CREDITS)}, got {config.credit!r}")
    for name in ("normalize_std", "natural_baseline", "mean_baseline"):
        _flag(config, name)
    if config.partial_bundle not in PARTIAL_BUNDLE:
        _fail("partial_bundle", f"must be one of {', '.join(PARTIAL_BUNDLE)}, "
                                f"got {config.partial_bundle!r}")


def check_riskpo_options(config: RiskPOConfig) -> None:
    """``ValueError`` naming the option for each invalid RiskPO option, and for the
    TRL options the chosen advantages or loss cannot honour."""
    check_advantage_options(config)
    size = config.bundle_size
    _flag(config, "use_riskpo_loss")
    if config.riskpo_chunk_size is not None:
        _count(config, "riskpo_chunk_size", "None or ")
    if config.riskpo_impl not in backends.choices(backends.POLICY):
        _fail("riskpo_impl", f"must be one of {', '.join(backends.choices(backends.POLICY))}, "
                             f"got {config.riskpo_impl!r}")
    if config.multi_objective_aggregation != "sum_then_normalize":
        _fail("multi_objective_aggregation", "RiskPOTrainer scores each completion by the weighted "
              "sum of its rewards (sum_then_normalize); normalize_then_sum would bundle rewards "
              "already normalised per group")
    if config.advantage == "grpo" and config.scale_rewards not in ("group", "none"):
        _fail("scale_rewards", f"advantage='grpo' reproduces scale_rewards 'group' or 'none', "
                               f"got {config.scale_rewards!r}")
    prompts = config.generation_batch_size // config.num_generations
    if config.advantage == "riskpo" and prompts % size and config.partial_bundle != "allow":
        message = (f"the generation batch holds {prompts} prompts (generation_batch_size "
                   f"{config.generation_batch_size} / num_generations {config.num_generations}), "
                   f"not a multiple of bundle_size {size}: its last bundle holds "
                   f"{prompts % size} prompt(s) and gets quantiles from them alone")
        if config.partial_bundle == "error":
            _fail("bundle_size", f"{message}. Change the batch sizes or bundle_size, or set "
                                 "partial_bundle='allow'")
        warnings.warn(f"RiskPOConfig.bundle_size: {message} (partial_bundle='allow' silences "
                      "this)", stacklevel=4)
    if config.use_riskpo_loss:
        _check_loss_options(config)


def _check_loss_options(config) -> None:
    if config.loss_type not in LOSS_TYPES:
        _fail("loss_type", f"use_riskpo_loss supports {', '.join(LOSS_TYPES)}, "
                           f"got {config.loss_type!r}")
    if config.importance_sampling_level != "token":
        _fail("importance_sampling_level", "use_riskpo_loss computes token-level ratios only, "
                                           f"got {config.importance_sampling_level!r}")
    eps_low = _real(config, "epsilon", 0.0)
    if eps_low >= 1:
        _fail("epsilon", f"use_riskpo_loss needs epsilon < 1, got {eps_low}")
    eps_high = eps_low if config.epsilon_high is None else _real(config, "epsilon_high", 0.0)
    if config.delta is not None:
        delta = _real(config, "delta")
        # TRL's two-sided clip caps the ratio at delta for both signs of A; that
        # equals our dual clip (negative A only) exactly when delta >= 1 + epsilon_high.
        if not (delta >= 1 + eps_high and delta > 1):
            _fail("delta", "use_riskpo_loss reproduces delta >= 1 + epsilon_high "
                           f"(= {1 + eps_high}) and > 1 only, got {delta}")
    if config.loss_type == "dr_grpo" and config.max_completion_length is None:
        _fail("max_completion_length", "loss_type 'dr_grpo' divides by it; it must be set")
    refused = (("use_bias_correction_kl", config.beta != 0 and config.use_bias_correction_kl,
                "the KL term times the ratio, TRL's default when beta != 0"),
               ("off_policy_mask_threshold", config.off_policy_mask_threshold is not None,
                "a per-sequence mask from the sampler's log-probs"),
               ("top_entropy_quantile", config.top_entropy_quantile < 1.0,
                "a per-token mask from the entropies of the same forward"),
               ("use_adaptive_entropy", config.use_adaptive_entropy,
                "an entropy coefficient that changes inside an accumulation window"),
               ("vllm_importance_sampling_correction",
                config.use_vllm and config.vllm_importance_sampling_correction,
                "a per-token importance weight from vLLM's log-probs"))
    for name, on, what in refused:
        if on:
            _fail(name, f"use_riskpo_loss cannot reproduce it ({what}); turn it off or set "
                        "use_riskpo_loss=False")
    if config.loss_type == "grpo" and config.entropy_coef != 0:
        _fail("entropy_coef", "with loss_type 'grpo', TRL's entropy bonus is a token mean while "
                              "its policy loss is a mean of sequence means; the fused op has one "
                              "weight per token for both. Use loss_type bnpo, dapo or dr_grpo, or "
                              "use_riskpo_loss=False")


@dataclass
class RiskPOHeadOutput(ModelOutput):
    """Output of a model patched by the trainer and called with ``riskpo_loss=``.

    loss: scalar, the op's aggregate (before TRL's accumulation/normaliser division).
    log_probs, entropy: (B, logits_to_keep) float32, detached.
    """

    loss: torch.Tensor | None = None
    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def _full(t):
    """FSDP2 exposes sharded parameters as DTensors: the whole head, as TRL does."""
    if t is not None and hasattr(t, "full_tensor") and type(t).__name__ == "DTensor":
        return t.full_tensor()
    return t


def _gather_ctx(weight, bias):
    """DeepSpeed ZeRO-3 gathers the head only inside its own forward; TRL's helper
    gathers it for a direct read (a null context otherwise)."""
    try:
        from trl.trainer.utils import maybe_gather_lm_head_ctx
    except ImportError:
        return nullcontext()
    return maybe_gather_lm_head_ctx(weight, bias)


def _riskpo_head_forward(model, args, kwargs, logits_to_keep, **loss_kwargs):
    """Backbone, then the fused-linear policy loss of the completion positions."""
    kwargs["use_cache"] = False
    hidden = model.base_model(*args, **kwargs).last_hidden_state
    # Position t predicts token t + 1: the completion's K tokens come from the K
    # positions before the last one.
    hidden = hidden[:, -(logits_to_keep + 1):-1]
    lm_head = model.get_output_embeddings()
    with _gather_ctx(lm_head.weight, lm_head.bias):
        weight, bias = _full(lm_head.weight), _full(lm_head.bias)
        hidden = hidden.to(device=weight.device, dtype=weight.dtype)
        out = rk.fused_linear_policy_loss(hidden, weight, bias=bias, **loss_kwargs)
    return RiskPOHeadOutput(loss=out.loss, log_probs=out.logprobs, entropy=out.entropy)


def add_riskpo_head(model) -> None:
    """Patch ``model.forward`` (a Hugging Face causal LM, already patched by TRL)
    so that ``model(input_ids=..., attention_mask=..., riskpo_loss=dict(...))``
    returns a :class:`RiskPOHeadOutput`; every other call goes to the previous
    forward. The loss runs inside the forward so that DDP, FSDP and ZeRO-3
    wrappers see the lm_head used, as TRL's own fused head does."""
    previous = model.forward

    # The class's signature is kept: generate() validates its kwargs against it.
    @functools.wraps(type(model).forward)
    def forward(self, *args, riskpo_loss=None, **kwargs):
        if riskpo_loss is None:
            return previous(*args, **kwargs)
        return _riskpo_head_forward(self, args, kwargs, **riskpo_loss)

    model.forward = types.MethodType(forward, model)


def restore_tracker(tracker: rk.QuantileTracker, checkpoint) -> None:
    """Loads ``<checkpoint>/riskpo_tracker.pt`` into ``tracker``; warns, and
    leaves it fresh, when the folder holds none. A file that cannot be read
    (empty, truncated, corrupted, not a tracker state) is a ``ValueError``
    naming it and what to do (``QuantileTracker.load_file``)."""
    path = os.path.join(os.fspath(checkpoint), TRACKER_FILE)
    if not os.path.exists(path):
        warnings.warn(f"{checkpoint} holds no {TRACKER_FILE}: the quantile tracker restarts",
                      stacklevel=3)
        return
    try:
        tracker.load_file(path)
    except ValueError as error:
        raise ValueError(f"RiskPOTrainer: resuming from {checkpoint}: {error}") from None


class RiskPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` with RiskPO's Mixed-VaR advantages, its quantile
    tracker (saved with each checkpoint as ``riskpo_tracker.pt`` and restored on
    resume), and optionally the fused-linear policy loss. Takes GRPOTrainer's
    arguments; ``args`` must be a :class:`RiskPOConfig`.

    Advantages: the gathered rewards (N,) = (P * n,), each completion's reward the
    weighted sum of its reward functions (TRL's ``reward_weights``), go through
    ``mvar_advantages`` (bundles of ``bundle_size`` consecutive prompts of the
    generation batch); this process keeps its slice as TRL does. A completion
    for which every reward function returned None raises ``ValueError`` (TRL
    zeroes its advantage; a bundle score needs every reward). In track / mix
    mode the tracker supplies ``q_lo``, ``q_hi`` and is updated with the bundle
    scores after the advantages, in training only.
    """

    def __init__(self, model, reward_funcs, args: RiskPOConfig | None = None, *rest, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            args = RiskPOConfig(f"{name.split('/')[-1]}-RiskPO")
        if not isinstance(args, RiskPOConfig):
            raise TypeError("RiskPOTrainer needs args=RiskPOConfig(...), "
                            f"got {type(args).__name__}")
        super().__init__(model, reward_funcs, args, *rest, **kwargs)
        missing = [name for name in REQUIRED_ATTRIBUTES if not hasattr(self, name)]
        if missing:
            raise ImportError(f"RiskPOTrainer reads GRPOTrainer attributes {missing}, which TRL "
                              f"{trl.__version__} does not set. Supported TRL versions: "
                              f"{SUPPORTED_TRL} (tested with {TESTED_TRL}).")
        self.tracker = (rk.QuantileTracker(lr=args.tracker_lr) if args.advantage == "riskpo"
                        else None)
        self._riskpo_rewards = None
        if args.use_riskpo_loss:
            self._setup_riskpo_loss()

    # ----- advantages -------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions,
                                                      completion_ids_list)
        self._riskpo_rewards = rewards_per_func  # (N, F), gathered over processes
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        self._riskpo_rewards = None
        output = super()._generate_and_score_completions(inputs)
        rewards_per_func, self._riskpo_rewards = self._riskpo_rewards, None
        if rewards_per_func is None:
            raise RuntimeError("GRPOTrainer._generate_and_score_completions did not call "
                               f"_calculate_rewards; TRL {trl.__version__} is not supported "
                               f"({SUPPORTED_TRL})")
        mode = "train" if self.model.training else "eval"
        advantages = self.riskpo_advantages(rewards_per_func, mode)
        local = output["advantages"].shape[0]
        if advantages.shape[0] != local * self.accelerator.num_processes:
            raise RuntimeError(f"{advantages.shape[0]} gathered rewards for {local} completions on "
                               f"each of {self.accelerator.num_processes} processes")
        start = self.accelerator.process_index * local
        output["advantages"] = advantages[start:start + local].to(output["advantages"].dtype)
        logged = self._logs["advantages"]  # TRL logged its own advantages of the whole batch
        for _ in range(min(len(logged), advantages.shape[0])):
            logged.pop()
        logged.extend(advantages.tolist())
        return output

    def riskpo_advantages(self, rewards_per_func: torch.Tensor,
                          mode: str = "train") -> torch.Tensor:
        """Advantages (N,) of the gathered rewards ``rewards_per_func``.

        rewards_per_func: (N, F) float, N = P * n completions prompt-major, one
            column per reward function (TRL's ``_calculate_rewards``; NaN where
            a function returned None). 2-D only, also for one function
            (``rewards[:, None]``): a 1-D tensor is refused, since it could be
            one function's rewards or one completion's. F must equal the
            number of ``reward_weights``.
        mode: ``"train"`` (n = ``num_generations``; updates the tracker
            afterwards) or ``"eval"`` (``num_generations_eval``).

        The options it reads are checked again here (``check_advantage_options``):
        one set on ``args`` after construction skips the config's checks.
        """
        args = self.args
        v.check_choice("mode", mode, ("train", "eval"), op="RiskPOTrainer.riskpo_advantages")
        check_advantage_options(args)
        v.check_tensor("rewards_per_func", rewards_per_func, dtypes="float",
                       op="RiskPOTrainer.riskpo_advantages")
        weights = self.reward_weights
        if rewards_per_func.dim() != 2 or rewards_per_func.shape[1] != weights.numel():
            raise ValueError(f"RiskPOTrainer.riskpo_advantages: rewards_per_func must be (N, F) = "
                             f"(completions, {weights.numel()} reward functions), got shape "
                             f"{tuple(rewards_per_func.shape)}"
                             + ("; for a single reward function pass rewards[:, None]"
                                if rewards_per_func.dim() == 1 else ""))
        n = self.num_generations if mode == "train" else self.num_generations_eval
        unscorable = torch.isnan(rewards_per_func).all(dim=1)
        if bool(unscorable.any()):
            rows = unscorable.nonzero().flatten()[:5].tolist()
            raise ValueError(f"every reward function returned None for completions {rows} (of the "
                             "gathered batch): RiskPOTrainer needs a reward for every completion")
        weights = weights.to(rewards_per_func.device)
        rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
        if rewards.numel() % n:
            raise ValueError(f"{rewards.numel()} gathered rewards are not whole groups of "
                             f"num_generations={n}")
        if args.advantage == "grpo":
            return rk.grpo_advantages(rewards, group_size=n, eps=TRL_GRPO_EPS,
                                      normalize_std=self.scale_rewards == "group")
        prompts = rewards.numel() // n
        if mode == "train" and prompts % args.bundle_size and args.partial_bundle == "error":
            raise ValueError(f"RiskPOConfig.bundle_size: the batch holds {prompts} prompts, not a "
                             f"multiple of bundle_size {args.bundle_size}, and partial_bundle is "
                             "'error'")
        if self.tracker is None:
            raise ValueError("RiskPOConfig.advantage: set to 'riskpo' after the trainer was built "
                             "with advantage='grpo' (no quantile tracker); build the trainer with "
                             "the config it trains with")
        tracker = self.tracker.to(rewards.device)
        result = rk.mvar_advantages(
            rewards, group_size=n, bundle_size=args.bundle_size, alpha=args.riskpo_alpha,
            beta=args.riskpo_beta, w_low=args.w_low, w_high=args.w_high,
            quantile_mode=args.quantile_mode, credit=args.credit, normalize_std=args.normalize_std,
            natural_baseline=args.natural_baseline,
            **tracked_inputs(tracker, args.riskpo_alpha, args.riskpo_beta, args.quantile_mode,
                             args.mean_baseline, args.natural_baseline))
        if mode == "train":
            tracker.update(result.bundle_scores)
        metrics = self._metrics[mode]
        metrics["riskpo/q_lo"].append(result.q_lo.float().mean().item())
        metrics["riskpo/q_hi"].append(result.q_hi.float().mean().item())
        if tracker.initialized:
            metrics["riskpo/tracked_q_lo"].append(float(tracker.value(args.riskpo_alpha)))
            metrics["riskpo/tracked_q_hi"].append(float(tracker.value(args.riskpo_beta)))
        return result.advantages

    # ----- tracker checkpoints ----------------------------------------------

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.tracker is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            state = self.tracker.state_dict()
            if state["values"] is not None:
                state["values"] = state["values"].cpu()
            torch.save(state, os.path.join(folder, TRACKER_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if self.tracker is None or checkpoint is None:
            return
        restore_tracker(self.tracker, checkpoint)

    # ----- fused-linear loss ------------------------------------------------

    def _setup_riskpo_loss(self):
        from accelerate.utils import is_peft_model

        if self.aux_loss_enabled:
            raise ValueError("RiskPOConfig.use_riskpo_loss: the model adds a MoE router auxiliary "
                             "loss, which the fused loss does not compute; set router_aux_loss_coef"
                             "=0.0 or use_riskpo_loss=False")
        target = self.model.get_base_model() if is_peft_model(self.model) else self.model
        text_config = target.config.get_text_config()
        for name in _LOGIT_TRANSFORMS:
            value = getattr(text_config, name, None)
            if value is not None and value != 1.0:
                raise ValueError(f"RiskPOConfig.use_riskpo_loss: the model's config sets {name}="
                                 f"{value}, a transform of the logits the fused-linear op does not "
                                 "apply; use use_riskpo_loss=False")
        add_riskpo_head(target)

    def _compute_loss(self, model, inputs):
        if not self.args.use_riskpo_loss:
            return super()._compute_loss(model, inputs)
        for key in _MULTIMODAL_KEYS:
            if inputs.get(key) is not None:
                raise ValueError(f"RiskPOConfig.use_riskpo_loss: multimodal inputs ({key}) are not "
                                 "supported; use use_riskpo_loss=False")
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask.bool()
        if "tool_mask" in inputs:
            mask = mask & inputs["tool_mask"].bool()
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        advantages = inputs["advantages"]
        if advantages.dim() == 2 and advantages.shape[1] == 1:
            advantages = advantages.squeeze(1)
        old = inputs.get("old_per_token_logps")
        ref = inputs["ref_per_token_logps"] if self.beta != 0.0 else None
        agg, scale_factor, divisor, entropy_coef = self._riskpo_normalisation(
            inputs, mask, mode, accumulation)
        loss_kwargs = dict(
            logits_to_keep=logits_to_keep, tokens=completion_ids, mask=mask, advantages=advantages,
            old_logprobs=old, ref_logprobs=ref, clip_low=self.epsilon_low,
            clip_high=self.epsilon_high,
            clip_ratio_c=self.args.delta if self.args.delta is not None else NO_DUAL_CLIP,
            kl_coef=self.beta, entropy_coef=entropy_coef, temperature=self.temperature, agg=agg,
            loss_scale_factor=scale_factor, chunk_size=self.args.riskpo_chunk_size,
            impl=self.args.riskpo_impl)
        with self.accelerator.autocast():
            out = model(input_ids=input_ids, attention_mask=attention_mask, riskpo_loss=loss_kwargs)
        self._log_loss_metrics(mode, out.log_probs, out.entropy, old, ref, advantages, mask)
        return out.loss / divisor

    def _riskpo_normalisation(self, inputs, mask, mode, accumulation):
        """(agg, loss_scale_factor, divisor, entropy_coef) such that the op's loss
        over ``divisor`` is TRL 1.16's ``_compute_loss`` for ``self.loss_type``.

        TRL's entropy bonus is ``coef * sum(H m) / max(n, 1) / accumulation`` (n
        the micro-batch's tokens) for every loss type; the op weights entropy
        like the policy term, so the coefficient is rescaled by the ratio of the
        two weights, one number per micro-batch where the loss weights tokens
        uniformly (refused for grpo, whose weights are per sequence)."""
        coef = float(self.entropy_coef)
        tokens = max(float(mask.sum()), 1.0) if coef != 0 else 1.0
        if self.loss_type == "bnpo":  # sum(l m) / sum(m), per micro-batch
            return "token-mean", None, accumulation, coef
        if self.loss_type == "grpo":  # mean over rows of sum_t(l m) / max(sum_t m, 1)
            return "trl-grpo", None, accumulation, coef
        if self.loss_type == "dr_grpo":  # sum(l m) / (B * max_completion_length)
            rows_times_length = mask.shape[0] * self.max_completion_length
            return ("trl-dr-grpo", float(self.max_completion_length), accumulation,
                    coef * rows_times_length / tokens)
        # dapo: sum(l m) over the global token count per process and accumulation window
        normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
        if mode == "train":
            accumulated = self.current_gradient_accumulation_steps / self.args.steps_per_generation
            normalizer = normalizer * accumulated
        if coef != 0:
            coef = coef * float(normalizer) / (tokens * accumulation)
        return "token-sum", None, normalizer, coef

    def _log_loss_metrics(self, mode, logprobs, entropy, old, ref, advantages, mask):
        """TRL's entropy, kl and clip-ratio metrics, from the op's detached log-probs."""
        from trl.trainer.utils import nanmax, nanmin

        m = mask.to(logprobs.dtype)
        metrics = self._metrics[mode]

        def global_masked_mean(x):
            totals = self.accelerator.reduce(torch.stack([(x * m).sum(), m.sum()]), reduction="sum")
            return (totals[0] / totals[1].clamp(min=1.0)).item()

        with torch.no_grad():
            A = advantages if advantages.dim() == 2 else advantages[:, None]
            if ref is not None:
                delta = ref - logprobs
                metrics["kl"].append(global_masked_mean(torch.exp(delta) - delta - 1))
            metrics["entropy"].append(global_masked_mean(entropy))
            ratio = torch.exp(logprobs - (logprobs if old is None else old))
            low = ((ratio < 1 - self.epsilon_low) & (A < 0)).to(m.dtype)
            high = ((ratio > 1 + self.epsilon_high) & (A > 0)).to(m.dtype)
            metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
            metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
            metrics["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
            per_row = m.sum(-1)
            metrics["clip_ratio/low_min"].append(
                nanmin(self.accelerator.gather((low * m).sum(-1) / per_row)).item())
            metrics["clip_ratio/high_max"].append(
                nanmax(self.accelerator.gather((high * m).sum(-1) / per_row)).item())
