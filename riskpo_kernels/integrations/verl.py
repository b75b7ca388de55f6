"""RiskPO in verl (tested with verl 0.9.1): the Mixed-VaR advantage estimator,
the quantile tracker's checkpoints, and a fused log-prob/entropy forward.

Loaded with ``VERL_USE_EXTERNAL_MODULES=riskpo_kernels.integrations.verl``:
``verl/__init__.py`` imports the listed modules (``import_external_libs``) in
every process that imports verl, the driver, the trainer's task runner and
each worker, so the registrations below exist wherever verl looks them up.
Export it before launching and also pass it to Ray's actors
(``+ray_kwargs.ray_init.runtime_env.env_vars.VERL_USE_EXTERNAL_MODULES=...``,
which verl merges into the runtime_env of ``ray.init``), so that actors on
every node import it, whichever way the cluster was started.

What importing this module does:

- ``algorithm.adv_estimator=riskpo``: :func:`compute_riskpo_outcome_advantage`
  through ``core_algos.register_adv_est``. Options under ``algorithm.riskpo``
  (added with Hydra's ``+``: ``+algorithm.riskpo.beta=0.8``), defaults from
  ``riskpo_kernels.recipes`` (``recipe=math`` unless given).
- no policy loss: verl's ``vanilla`` loss (the default ``policy_loss.loss_mode``)
  is already RiskPO's PPO token loss with dual clip (RISKPO_SPEC.md section 8,
  ``riskpo_kernels.policy.token_loss.per_token_loss``), reduced by ``agg_loss``
  with the global batch info; tests/test_integration_verl.py holds the two
  equal, loss and gradients. A registered copy would add nothing.
- ``actor_rollout_ref.model.fused_kernel_options.impl_backend=riskpo`` (with
  ``use_fused_kernels=True``): :func:`forward_with_riskpo_backend` replaces the
  model's forward, as verl's own ``torch`` and ``triton`` backends do, by a
  wrapper around verl's ``patch_forward_with_backends`` (verl has no backend
  registry; it accepts any ``impl_backend`` string in the config).
- ``trainer.checkpoint_callback_class=riskpo_kernels.integrations.verl.TrackerCheckpointCallback``:
  saves the quantile tracker beside each checkpoint and restores it on resume
  (v1 trainer, verl's default; the legacy trainer has no such hook and the
  tracker restarts there).
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

import riskpo_kernels as rk

from .. import _validation as v
from ..common import CREDITS, QUANTILE_MODES
from ..recipes import RECIPES, advantage_options, recipe
from ..riskpo_loss import tracked_inputs

TESTED_VERL = ("0.9.1",)
BACKEND = "riskpo"
ESTIMATOR = "riskpo"
TRACKER_FILE = "riskpo_tracker.pt"
# Options of the adapter itself, beside the recipe's mvar_advantages options.
ADAPTER_OPTIONS = ("recipe", "mean_baseline", "tracker_lr", "eps")
# verl's own forwards for these model types (monkey_patch.patch_forward_with_backends);
# ours covers the text models verl sends to dense_common.
_NOT_DENSE = ("qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "glm4v", "qwen3_5",
              "qwen3_5_moe", "kimi_vl")
_PREFIX = "riskpo (verl adapter)"
# verl's response masks are int64 (from the attention mask) or float; bool works alike.
_MASK_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                *v.FLOAT_DTYPES)


def _fail(message: str):
    raise ValueError(f"{_PREFIX}: {message}")


def check_verl(core_algos, monkey_patch, dense_common, checkpoint_callback, version: str) -> None:
    """Raises ImportError naming every piece of verl this adapter uses that the
    installed verl lacks (a version older or newer than the ones tested)."""
    needed = {core_algos: ("register_adv_est", "get_adv_estimator_fn", "ADV_ESTIMATOR_REGISTRY",
                           "agg_loss"),
              monkey_patch: ("patch_forward_with_backends",),
              dense_common: ("forward_base_model", "CausalLMOutputForPPO"),
              checkpoint_callback: ("CheckpointCallback",)}
    missing = [f"{getattr(module, '__name__', module)}.{name}"
               for module, names in needed.items() for name in names if not hasattr(module, name)]
    if missing:
        raise ImportError(f"{_PREFIX}: verl {version} lacks {', '.join(missing)}; this adapter "
                          f"supports verl {', '.join(TESTED_VERL)}")


def _import_verl():
    try:
        import verl
        from verl.models.transformers import dense_common, monkey_patch
        from verl.trainer.ppo import checkpoint_callback, core_algos
    except ImportError as error:
        raise ImportError(f"{_PREFIX}: needs verl {', '.join(TESTED_VERL)} importable: "
                          f"{error}") from error
    version = getattr(verl, "__version__", "unknown")
    check_verl(core_algos, monkey_patch, dense_common, checkpoint_callback, version)
    if version not in TESTED_VERL:
        warnings.warn(f"{_PREFIX}: tested with verl {', '.join(TESTED_VERL)}, running on {version}",
                      stacklevel=2)
    return core_algos, monkey_patch, dense_common, checkpoint_callback


_core_algos, _monkey_patch, _dense_common, _checkpoint_callback = _import_verl()


# ---------------------------------------------------------------- options


def riskpo_options(config) -> tuple[dict, dict]:
    """The ``algorithm.riskpo`` section of ``config`` (verl's ``algorithm``
    DictConfig, an ``AlgoConfig``, a dict, or None) as (``mvar_advantages``
    keyword arguments, adapter options ``mean_baseline``, ``tracker_lr``).
    Unknown keys, and values the estimator would refuse (``tracker_lr=0``, a
    NaN ``alpha``, a list as ``recipe``), raise ``ValueError`` naming the key
    (``algorithm.riskpo.tracker_lr``)."""
    section = None if config is None else config.get("riskpo", None)
    if section is None:
        section = {}
    elif hasattr(section, "items") and not isinstance(section, dict):
        from omegaconf import DictConfig, OmegaConf
        section = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) \
            else dict(section.items())
    if not isinstance(section, dict):
        _fail(f"algorithm.riskpo must be a mapping of options, got {type(section).__name__}")
    name = section.get("recipe", "math")
    if not isinstance(name, str):  # a list or a number: not a name to look up
        _fail(f"algorithm.riskpo.recipe: recipe must be one of {sorted(RECIPES)}, got {name!r}")
    try:
        table = recipe(name)
    except ValueError as error:
        _fail(f"algorithm.riskpo.recipe: {error}")
    allowed = sorted(set(table["advantage"]) | set(ADAPTER_OPTIONS))
    unknown = sorted(set(map(str, section)) - set(allowed))
    if unknown:
        _fail(f"unknown key(s) {', '.join(f'algorithm.riskpo.{k}' for k in unknown)}; "
              f"the keys are {', '.join(allowed)}")
    training = table["training"]
    tracker_lr = _key("tracker_lr", v.check_float, section.get("tracker_lr",
                                                               training["tracker_lr"]))
    if tracker_lr <= 0:
        _fail(f"algorithm.riskpo.tracker_lr must be > 0, got {tracker_lr}")
    adapter = {"mean_baseline": _key("mean_baseline", v.check_bool,
                                     section.get("mean_baseline", False)),
               "tracker_lr": tracker_lr}
    advantage = advantage_options(name, **{k: val for k, val in section.items()
                                           if k not in ADAPTER_OPTIONS})
    if "eps" in section:
        advantage["eps"] = section["eps"]
    return _checked_advantage_options(advantage), adapter


def _key(name: str, check, value, *args):
    """``check`` (a _validation function) with the error naming the config key."""
    return check(f"algorithm.riskpo.{name}", value, *args, op=_PREFIX)


def _checked_advantage_options(options: dict) -> dict:
    """The ``mvar_advantages`` options of the section, each checked here so
    that an error names its key (``algorithm.riskpo.alpha``), not the
    function's argument."""
    out = dict(options)
    out["bundle_size"] = _key("bundle_size", v.check_int, options["bundle_size"], 1)
    for name in ("alpha", "beta"):
        out[name] = _key(name, v.check_float, options[name])
    if not 0 < out["alpha"] < out["beta"] < 1:
        _fail(f"need 0 < algorithm.riskpo.alpha < algorithm.riskpo.beta < 1, got alpha="
              f"{out['alpha']}, beta={out['beta']}")
    for name in ("w_low", "w_high", "eps"):
        if name in options:
            out[name] = _key(name, v.check_float, options[name], 0.0)
    out["credit"] = _key("credit", v.check_choice, options["credit"], CREDITS)
    out["quantile_mode"] = _key("quantile_mode", v.check_choice, options["quantile_mode"],
                                QUANTILE_MODES)
    for name in ("normalize_std", "natural_baseline"):
        out[name] = _key(name, v.check_bool, options[name])
    return out


# ---------------------------------------------------------------- tracker state


@dataclass
class _DriverState:
    """What lives in the process that computes the advantages (verl's task runner)."""

    tracker: rk.QuantileTracker | None = None
    callback_installed: bool = False
    warned_restart: bool = False


_STATE = _DriverState()


def quantile_tracker() -> rk.QuantileTracker | None:
    """The tracker of this process (None before the first RiskPO step or restore)."""
    return _STATE.tracker


def reset_tracker() -> None:
    """Forgets the tracker and whether a checkpoint callback was built (a new
    run in the same process starts from scratch)."""
    _STATE.tracker = None
    _STATE.callback_installed = False
    _STATE.warned_restart = False


def _tracker(lr: float) -> rk.QuantileTracker:
    if _STATE.tracker is None:
        _STATE.tracker = rk.QuantileTracker(lr=lr)
    elif _STATE.tracker.lr != lr:
        # A restored tracker keeps its values; the step size is the run's config.
        _STATE.tracker.lr = rk.QuantileTracker(lr=lr).lr
    return _STATE.tracker


# ---------------------------------------------------------------- advantages


def _uid(uid):
    """A uid as a value: a 0-d tensor in a list hashes by identity, as a tensor's elements do."""
    if isinstance(uid, torch.Tensor):
        if uid.dim() != 0 or uid.dtype.is_floating_point or uid.dtype.is_complex:
            _fail(f"index holds a tensor uid of shape {tuple(uid.shape)} and dtype {uid.dtype}; "
                  "uids are integers or strings")
        return uid.item()
    return uid


def prompt_major_order(index, response_mask: torch.Tensor):
    """Groups the rows of a (possibly reordered) verl batch by prompt.

    index: (bs,) prompt uids (verl's ``non_tensor_batch["uid"]``): a list, a
    1-D NumPy array or a 1-D tensor; array and tensor elements are compared as
    Python values (``.tolist()``), so equal ids group (a tensor's elements
    would otherwise hash by identity, every row a prompt of its own);
    response_mask: (bs, T). Prompts are numbered in order of first appearance
    and rows keep their relative order within a prompt. Prompts none of whose
    rows has a response token (verl v1's synthetic padding rows share one such
    uid) are left out: they reach no loss.

    Returns (rows (P * n,) int64, P, n): ``rows[p * n + j]`` is the batch row of
    sample j of prompt p. Uneven groups raise ValueError naming the prompt.
    """
    bs = response_mask.shape[0]
    if index is None:
        _fail("index is None: RiskPO groups responses by prompt uid; verl passes "
              "non_tensor_batch['uid'] as index (compute_advantage does when the batch has 'uid')")
    if isinstance(index, (torch.Tensor, np.ndarray)):
        if index.ndim != 1:
            _fail(f"index must be a 1-D sequence of prompt uids, got a "
                  f"{type(index).__name__} of shape {tuple(index.shape)}")
        if isinstance(index, torch.Tensor):
            v.check_tensor("index", index, op=_PREFIX)  # freed storage, meta, sparse
        inexact = (index.dtype.is_floating_point or index.dtype.is_complex
                   if isinstance(index, torch.Tensor) else np.issubdtype(index.dtype, np.inexact))
        if inexact:  # float ids would group 1.0 with 1, and never NaN with NaN
            _fail(f"index must hold integer or string prompt uids, got dtype {index.dtype}")
        index = index.tolist()
    elif isinstance(index, (str, bytes)):
        _fail(f"index must be a sequence of prompt uids, got a {type(index).__name__}")
    try:
        n_index = len(index)
    except TypeError:
        _fail(f"index must be a sequence of prompt uids, got {type(index).__name__}")
    if n_index != bs:
        _fail(f"index has {n_index} uids but the batch has {bs} rows")
    ids: dict = {}
    try:
        group = np.fromiter((ids.setdefault(_uid(uid), len(ids)) for uid in index),
                            dtype=np.int64, count=bs)
    except TypeError as error:
        _fail(f"index holds an unhashable uid: {error}")
    has_tokens = (response_mask != 0).any(1).cpu().numpy()
    live = np.zeros(len(ids), dtype=bool)
    np.logical_or.at(live, group, has_tokens)
    keep = live[group]
    counts = np.bincount(group[keep], minlength=len(ids))[live]
    if counts.size == 0:
        return torch.zeros(0, dtype=torch.int64), 0, 0
    n = int(counts[0])
    if (counts != n).any():
        uids = [uid for uid, g in ids.items() if live[g]]
        bad = int(np.flatnonzero(counts != n)[0])
        _fail(f"prompt uid {uids[bad]!r} has {int(counts[bad])} responses but uid {uids[0]!r} has "
              f"{n}: RiskPO pairs the j-th responses of a bundle's prompts, so every prompt needs "
              f"the same number (actor_rollout_ref.rollout.n); group sizes seen: "
              f"{sorted(set(counts.tolist()))}")
    rows = np.flatnonzero(keep)
    rows = rows[np.argsort(group[rows], kind="stable")]
    return torch.from_numpy(rows), int(counts.size), n


def compute_riskpo_outcome_advantage(token_level_rewards: torch.Tensor,
                                     response_mask: torch.Tensor, index=None, config=None,
                                     **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator ``riskpo`` (RISKPO_SPEC.md sections 2-6).

    token_level_rewards: (bs, T) float; the reward of a response is
    ``token_level_rewards.sum(-1)``. response_mask: (bs, T), bool, integer
    or float, values >= 0 (1 at response tokens). index: (bs,) prompt uids
    (a list, a NumPy array or a 1-D integer tensor: elements compare as
    Python values), in any order
    (verl reorders the batch before this call): rows are grouped by uid,
    prompts bundled in order of first appearance, the j-th rows of each
    prompt form paper j. The last bundle holds fewer prompts when bundle_size
    does not divide the number of prompts (spec section 2). config: verl's
    ``algorithm`` config; options under ``algorithm.riskpo`` (see
    :func:`riskpo_options`; a bad value raises ``ValueError`` naming its key,
    ``algorithm.riskpo.<name>``). Other keyword arguments verl passes
    (``reward_baselines``) are not used.

    The quantile tracker of this process supplies q_lo/q_hi (quantile_mode
    track / mix) and the mean baselines (mean_baseline), then is updated with
    the step's bundle scores.

    Returns (advantages, returns): both (bs, T) float32, ``A[:, None] * mask``.
    """
    v.check_tensor("token_level_rewards", token_level_rewards, dtypes="float", op=_PREFIX)
    v.check_tensor("response_mask", response_mask, dtypes=_MASK_DTYPES, op=_PREFIX)
    if token_level_rewards.dim() != 2 or response_mask.shape != token_level_rewards.shape:
        _fail(f"token_level_rewards and response_mask must both be (bs, T), got "
              f"{tuple(token_level_rewards.shape)} and {tuple(response_mask.shape)}")
    if response_mask.device.type == "cpu" and response_mask.numel() and \
            response_mask.dtype != torch.bool:
        # A weight below 0 would flip its row's advantage; NaN would reach every gradient.
        low, high = (float(x) for x in torch.aminmax(response_mask))
        if not (math.isfinite(low) and math.isfinite(high)) or low < 0:
            _fail(f"response_mask must hold finite values >= 0 (1 for a response token), got "
                  f"values in [{low}, {high}]")
    advantage, adapter = riskpo_options(config)
    rows, P, n = prompt_major_order(index, response_mask)
    device = token_level_rewards.device
    mask = response_mask.to(torch.float32)
    flat = torch.zeros(token_level_rewards.shape[0], dtype=torch.float32, device=device)
    if P:
        rows = rows.to(device)
        scores = token_level_rewards.detach().sum(-1)
        tracker = _tracker(adapter["tracker_lr"])
        inputs = tracked_inputs(tracker, advantage["alpha"], advantage["beta"],
                                advantage["quantile_mode"], adapter["mean_baseline"],
                                advantage["natural_baseline"])
        if (advantage["quantile_mode"] != "batch" or adapter["mean_baseline"]) \
                and not _STATE.callback_installed and not _STATE.warned_restart:
            _STATE.warned_restart = True
            warnings.warn(f"{_PREFIX}: quantile_mode={advantage['quantile_mode']!r} reads the "
                          "quantile tracker, which lives in this process and restarts on resume "
                          "unless trainer.checkpoint_callback_class="
                          f"{__name__}.TrackerCheckpointCallback (v1 trainer)", stacklevel=2)
        result = rk.mvar_advantages(scores[rows].view(P, n), **advantage, **inputs)
        tracker.update(result.bundle_scores)
        flat[rows] = result.advantages.to(torch.float32)
    advantages = flat[:, None] * mask
    return advantages, advantages


def _register_estimator():
    registry = _core_algos.ADV_ESTIMATOR_REGISTRY
    current = registry.get(ESTIMATOR)
    if current is not None and getattr(current, "__module__", None) == __name__:
        del registry[ESTIMATOR]  # this module imported again (importlib.reload)
    _core_algos.register_adv_est(ESTIMATOR)(compute_riskpo_outcome_advantage)


_register_estimator()


# ---------------------------------------------------------------- checkpoints


def resume_folder(trainer_config) -> str | None:
    """The ``global_step_N`` folder verl's v1 trainer resumes from under this
    ``trainer`` config (``resume_mode`` auto / resume_path / disable), or None:
    the same rule as ``PPOTrainer._load_checkpoint``."""
    from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

    mode = trainer_config.get("resume_mode", "auto")
    if mode == "auto":
        folder = trainer_config.get("default_local_dir")
        if folder is None:
            return None
        return find_latest_ckpt_path(os.path.abspath(folder))
    if mode == "resume_path":
        path = trainer_config.get("resume_from_path")
        return None if path is None else os.path.abspath(path)
    return None


class TrackerCheckpointCallback(_checkpoint_callback.CheckpointCallback):
    """``trainer.checkpoint_callback_class`` for RiskPO: writes the quantile
    tracker to ``<checkpoint_dir>/riskpo_tracker.pt`` after every save, and on
    construction (the v1 trainer builds it before it loads a checkpoint)
    restores the tracker saved in the folder the trainer will resume from.
    A folder without the file resumes with a fresh tracker (and a warning); a
    file that is empty, truncated or corrupted raises ``ValueError`` naming
    it (``QuantileTracker.load_file``): delete it to resume with a fresh
    tracker, or put back a good copy."""

    def __init__(self, config=None):
        super().__init__(config=config)
        _STATE.callback_installed = True
        folder = None if config is None else resume_folder(config.trainer)
        if folder is None:
            return
        path = os.path.join(folder, TRACKER_FILE)
        if not os.path.exists(path):
            warnings.warn(f"{_PREFIX}: resuming from {folder}, which holds no {TRACKER_FILE}: "
                          "the quantile tracker starts afresh", stacklevel=2)
            return
        tracker = rk.QuantileTracker()
        try:
            tracker.load_file(path)  # names the file, and what to do about it
        except ValueError as error:
            raise ValueError(f"{_PREFIX}: {error}") from None
        _STATE.tracker = tracker

    def on_save(self, trainer, global_step: int, checkpoint_dir: str, async_save: bool = False,
                **kwargs) -> None:
        """Writes the tracker (if any step has run) through a temporary file and a rename."""
        if _STATE.tracker is None:
            return
        os.makedirs(checkpoint_dir, exist_ok=True)
        path = os.path.join(checkpoint_dir, TRACKER_FILE)
        temporary = f"{path}.tmp-{os.getpid()}"
        torch.save(_STATE.tracker.state_dict(), temporary)
        os.replace(temporary, path)


# ---------------------------------------------------------------- fused forward


def forward_with_riskpo_backend(self, input_ids=None, attention_mask=None, position_ids=None,
                                past_key_values=None, inputs_embeds=None, labels=None,
                                use_cache=None, output_attentions=None, output_hidden_states=None,
                                return_dict=None, cache_position=None, logits_to_keep=0,
                                temperature: float = 1.0, shift_labels=None, **loss_kwargs):
    """Drop-in ``forward`` of a causal LM for verl's fused-kernel path (the
    contract of verl's ``forward_with_torch_backend``): the decoder's hidden
    states (1, total_nnz, H) and the lm_head (V, H) (+ bias) go through
    :func:`riskpo_kernels.fused_linear_logprobs`, chunk by chunk, without the
    (total_nnz, V) logits. Targets: ``shift_labels`` when given (verl passes
    the rolled, sequence-parallel-sliced ids), else ``labels`` or
    ``input_ids`` rolled left by one.

    Returns verl's ``CausalLMOutputForPPO`` with log_probs and entropy
    (B, T) float32, differentiable w.r.t. the model's parameters.
    """
    if not return_dict:
        raise NotImplementedError("forward_with_riskpo_backend has to return_dict")
    outputs = _dense_common.forward_base_model(
        self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
        output_attentions=output_attentions, output_hidden_states=output_hidden_states,
        return_dict=return_dict, cache_position=cache_position)
    hidden = outputs[0]
    if shift_labels is not None:
        targets = shift_labels
    elif labels is not None:
        targets = torch.roll(labels, shifts=-1, dims=-1)
    elif input_ids is not None:
        targets = torch.roll(input_ids, shifts=-1, dims=-1)
    else:
        raise RuntimeError("forward_with_riskpo_backend needs shift_labels, labels or input_ids")
    head = self.get_output_embeddings()
    # Padded batches (verl without remove-padding) skip their padding rows, whose
    # log-probs and entropies are then 0; packed ones (1, total_nnz) have none.
    mask = attention_mask if (isinstance(attention_mask, torch.Tensor)
                              and attention_mask.shape == hidden.shape[:-1]) else None
    log_probs, entropy = rk.fused_linear_logprobs(
        hidden, head.weight, targets.reshape(hidden.shape[:-1]).to(torch.int64),
        bias=getattr(head, "bias", None), mask=None if mask is None else mask != 0,
        temperature=float(temperature))
    return _dense_common.CausalLMOutputForPPO(
        log_probs=log_probs, entropy=entropy, past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def patch_model_class(model) -> None:
    """Makes every instance of ``type(model)`` use :func:`forward_with_riskpo_backend`
    (class-level, as verl patches its backends). Text (dense) models only: a
    vision-language model needs the multimodal forward verl writes per family."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _NOT_DENSE:
        _fail(f"fused_kernel_options.impl_backend={BACKEND!r} supports text models only, not "
              f"model_type {model_type!r}; use verl's 'torch' or 'triton' backend for it")
    if not callable(getattr(model, "get_output_embeddings", None)) or \
            model.get_output_embeddings() is None:
        _fail(f"{type(model).__name__} has no output embeddings (lm_head) to fuse")
    model._verl_fused_kernels_backend = BACKEND
    type(model).forward = forward_with_riskpo_backend


def _install_backend_hook():
    original = _monkey_patch.patch_forward_with_backends
    original = getattr(original, "_riskpo_original", original)

    def patch_forward_with_backends(model, use_fused_kernels=False, fused_kernels_backend=None):
        if use_fused_kernels and fused_kernels_backend == BACKEND:
            patch_model_class(model)
            print(f"Using RiskPO backend for fused kernels in {model.__class__.__name__}")
            return None
        return original(model, use_fused_kernels=use_fused_kernels,
                        fused_kernels_backend=fused_kernels_backend)

    patch_forward_with_backends._riskpo_original = original
    patch_forward_with_backends.__doc__ = original.__doc__
    _monkey_patch.patch_forward_with_backends = patch_forward_with_backends


_install_backend_hook()

__all__ = ["ADAPTER_OPTIONS", "BACKEND", "ESTIMATOR", "TESTED_VERL", "TRACKER_FILE",
           "TrackerCheckpointCallback", "check_verl", "compute_riskpo_outcome_advantage",
           "forward_with_riskpo_backend", "patch_model_class", "prompt_major_order",
           "quantile_tracker", "reset_tracker", "resume_folder", "riskpo_options"]
