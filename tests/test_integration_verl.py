"""The verl adapter (riskpo_kernels/integrations/verl.py) against the real verl
0.9.1: its own entry points (get_adv_estimator_fn, compute_advantage on a
DataProto reordered as verl's _balance_batch does, get_policy_loss_fn,
patch_forward_with_backends, the Hydra config) and the kernels' definitions."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

pytest.importorskip("verl", reason="verl is not installed")
# verl's engine registry warns about every optional engine this machine lacks.
pytestmark = pytest.mark.filterwarnings("ignore:.* engine is not available")

import verl  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.utils.seqlen_balancing import calculate_workload, get_seqlen_balanced_partitions  # noqa: E402

import riskpo_kernels as rk  # noqa: E402
from riskpo_kernels.integrations import verl as adapter  # noqa: E402
from riskpo_kernels.policy.aggregation import aggregation_weights  # noqa: E402
from riskpo_kernels.policy.token_loss import per_token_loss, weighted_sum  # noqa: E402
from riskpo_kernels.recipes import advantage_options  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VERL_DIR = Path(verl.__file__).parent


@pytest.fixture(autouse=True)
def fresh_tracker():
    adapter.reset_tracker()
    yield
    adapter.reset_tracker()


def _seed(key):
    return zlib.crc32(repr(key).encode())


def verl_compute_advantage():
    """verl's own ``compute_advantage`` (trainer/ppo/ray_trainer.py). That module
    imports the whole rollout stack, whose router needs ``cachetools``, which
    verl 0.9.1 does not declare: without it, the function's source is read from
    the installed file and run with the names it uses."""
    if importlib.util.find_spec("cachetools") is not None:
        from verl.trainer.ppo.ray_trainer import compute_advantage
        return compute_advantage
    path = VERL_DIR / "trainer" / "ppo" / "ray_trainer.py"
    source = path.read_text()
    wanted = {"compute_response_mask", "compute_advantage"}
    nodes = [node for node in ast.parse(source).body
             if isinstance(node, ast.FunctionDef) and node.name in wanted]
    assert {node.name for node in nodes} == wanted, f"{path} no longer defines {wanted}"
    namespace = {"DataProto": DataProto, "core_algos": core_algos, "np": np, "torch": torch,
                 "AdvantageEstimator": core_algos.AdvantageEstimator, "AlgoConfig": AlgoConfig,
                 "Optional": Optional}
    for node in nodes:
        exec(compile(ast.Module([node], []), str(path), "exec"), namespace)  # noqa: S102
    return namespace["compute_advantage"]


COMPUTE_ADVANTAGE = verl_compute_advantage()


def make_batch(key, P=7, n=5, T=6, dp=5, rewards=None):
    """A verl batch of P prompts x n responses, reordered the way verl's v1
    ``_balance_batch`` reorders it (balanced partitions of sequence lengths).

    Returns (DataProto, prompt-major rewards (P, n), rows (P * n,)): rows[p * n + j]
    is where sample j of prompt p ended up."""
    g = torch.Generator().manual_seed(_seed(key))
    if rewards is None:
        rewards = (torch.rand(P, n, generator=g) < 0.45).float()
        rewards[0] += 0.25 * torch.randn(n, generator=g)  # any real value must work
    lengths = torch.randint(1, T + 1, (P * n,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    token_rewards = torch.zeros(P * n, T)
    token_rewards[torch.arange(P * n), lengths - 1] = rewards.reshape(-1)
    uids = np.array([f"uid-{_seed((key, p)):08x}" for p in range(P) for _ in range(n)],
                    dtype=object)
    prompt_len = torch.randint(3, 40, (P * n,), generator=g)
    workload = calculate_workload(prompt_len + lengths)
    partitions = get_seqlen_balanced_partitions(workload.tolist(), k_partitions=dp,
                                                equal_size=True)
    order = torch.tensor([j for part in partitions for j in part])
    data = DataProto.from_dict(
        tensors={"token_level_rewards": token_rewards, "response_mask": mask},
        non_tensors={"uid": uids})
    data.reorder(order)
    rows = torch.empty_like(order)
    rows[order] = torch.arange(P * n)
    return data, rewards, rows


def grouped_rows(uids):
    """The oracle's prompt-major order: prompts by first appearance, rows in
    their order of appearance within a prompt."""
    groups: dict = {}
    for row, uid in enumerate(uids):
        groups.setdefault(uid, []).append(row)
    return torch.tensor([row for rows in groups.values() for row in rows])


def expected_from_order(data, options, **tracked):
    """``mvar_advantages`` on the batch's rows grouped by prompt, scattered back."""
    rows = grouped_rows(data.non_tensor_batch["uid"])
    P = len(set(data.non_tensor_batch["uid"]))
    scores = data.batch["token_level_rewards"].sum(-1)[rows].view(P, -1)
    result = rk.mvar_advantages(scores, **options, **tracked)
    flat = torch.zeros(len(data))
    flat[rows] = result.advantages
    return flat[:, None] * data.batch["response_mask"], result


def algo(**riskpo):
    from omegaconf import OmegaConf
    config = {"adv_estimator": "riskpo", "gamma": 1.0, "lam": 1.0}
    if riskpo:
        config["riskpo"] = riskpo
    return OmegaConf.create(config)


def run_compute_advantage(data, estimator="riskpo", config=None):
    return COMPUTE_ADVANTAGE(data, adv_estimator=estimator, num_repeat=5,
                             config=algo() if config is None else config)


CASES = {
    "math recipe": ({}, 7),
    "dapo recipe": ({"recipe": "dapo"}, 7),
    "score credit, risk-seeking tail": ({"credit": "score", "w_high": 0.5, "w_low": 0.0}, 7),
    "no std, no natural baseline": ({"normalize_std": False, "natural_baseline": False,
                                     "credit": "uniform"}, 7),
    "partial last bundle": ({"bundle_size": 3}, 8),
    "one bundle": ({"bundle_size": 100, "alpha": 0.1, "beta": 0.6}, 4),
}


@pytest.mark.parametrize("case", CASES)
def test_compute_advantage_equals_mvar_on_the_prompt_major_order(case):
    riskpo, P = CASES[case]
    assert core_algos.get_adv_estimator_fn("riskpo") is adapter.compute_riskpo_outcome_advantage
    data, rewards, rows = make_batch(case, P=P)
    assert not torch.equal(rows, torch.arange(len(rows))), "the batch should be reordered"
    out = run_compute_advantage(data, config=algo(**riskpo))
    recipe_options = {k: v for k, v in riskpo.items() if k != "recipe"}
    options = advantage_options(riskpo.get("recipe", "math"), **recipe_options)
    expected, result = expected_from_order(data, options)
    assert out.batch["advantages"].dtype == torch.float32
    torch.testing.assert_close(out.batch["advantages"], expected, rtol=0, atol=0)
    torch.testing.assert_close(out.batch["returns"], expected, rtol=0, atol=0)
    assert bool((out.batch["advantages"] != 0).any())
    # the batch's rewards are the prompt-major ones, and bundles are real bundles
    assert result.bundle_scores.shape == (-(-P // min(options["bundle_size"], P)), 5)
    torch.testing.assert_close(data.batch["token_level_rewards"].sum(-1)[rows],
                               rewards.reshape(-1))


def test_within_prompt_order_and_prompt_order_follow_the_batch():
    """Bundles are cut from the prompts in order of first appearance: moving a
    prompt's rows changes its bundle, as the docstring says, and the estimator
    follows the batch rather than any stored order."""
    data, _, _ = make_batch("order", P=6)
    first, _ = adapter.compute_riskpo_outcome_advantage(
        data.batch["token_level_rewards"], data.batch["response_mask"],
        index=data.non_tensor_batch["uid"], config=algo(bundle_size=2))
    uids = data.non_tensor_batch["uid"]
    leading = torch.from_numpy(uids == uids[0])  # the first prompt's rows go last
    moved = torch.cat([torch.nonzero(~leading).flatten(), torch.nonzero(leading).flatten()])
    data.reorder(moved)
    second, _ = adapter.compute_riskpo_outcome_advantage(
        data.batch["token_level_rewards"], data.batch["response_mask"],
        index=data.non_tensor_batch["uid"], config=algo(bundle_size=2))
    expected, _ = expected_from_order(data, advantage_options("math", bundle_size=2))
    torch.testing.assert_close(second, expected, rtol=0, atol=0)
    assert not torch.allclose(second, first[moved])  # every bundle changed


def test_grpo_through_verl_equals_grpo_advantages():
    """The harness itself: verl's GRPO on the reordered batch is the kernels' GRPO."""
    data, _, _ = make_batch("grpo")
    out = run_compute_advantage(data, estimator="grpo")
    rows = grouped_rows(data.non_tensor_batch["uid"])
    scores = data.batch["token_level_rewards"].sum(-1)[rows]
    flat = torch.zeros(len(data))
    flat[rows] = rk.grpo_advantages(scores, group_size=5)
    torch.testing.assert_close(out.batch["advantages"], flat[:, None] * data.batch["response_mask"],
                               rtol=1e-6, atol=1e-6)


def test_padding_rows_of_the_v1_trainer_are_left_out():
    """verl's v1 _balance_batch appends rows with an empty response mask under
    one 'pad...' uid (trainer/ppo/padding_utils.py): they get advantage 0 and
    do not count as a prompt, whatever their number."""
    data, _, _ = make_batch("padding", P=5)
    advantages, _ = adapter.compute_riskpo_outcome_advantage(
        data.batch["token_level_rewards"], data.batch["response_mask"],
        index=data.non_tensor_batch["uid"], config=algo())
    T = data.batch["response_mask"].shape[1]
    rewards = torch.cat([data.batch["token_level_rewards"], torch.zeros(3, T)])
    mask = torch.cat([data.batch["response_mask"], torch.zeros(3, T)])
    index = np.concatenate([np.array(["padabc"] * 3, dtype=object), data.non_tensor_batch["uid"]])
    rewards, mask = torch.cat([rewards[-3:], rewards[:-3]]), torch.cat([mask[-3:], mask[:-3]])
    padded, _ = adapter.compute_riskpo_outcome_advantage(rewards, mask, index=index, config=algo())
    torch.testing.assert_close(padded[3:], advantages, rtol=0, atol=0)
    assert bool((padded[:3] == 0).all())


def _verl_vanilla_loss(old, logp, advantages, mask, agg, **batch_info):
    from verl.workers.config import ActorConfig
    config = ActorConfig(strategy="fsdp", rollout_n=5, ppo_micro_batch_size_per_gpu=2,
                         clip_ratio=0.2, clip_ratio_low=0.2, clip_ratio_high=0.28,
                         clip_ratio_c=3.0, loss_agg_mode=agg)
    config.global_batch_info.update(batch_info)
    loss_fn = core_algos.get_policy_loss_fn("vanilla")
    return loss_fn(old_log_prob=old, log_prob=logp, advantages=advantages, response_mask=mask,
                   loss_agg_mode=agg, config=config, rollout_is_weights=None)


@pytest.mark.parametrize("estimator", ["riskpo", "grpo"])
@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum",
                                 "seq-mean-token-sum-norm", "token-sum"])
def test_verl_vanilla_loss_is_our_token_loss(estimator, agg):
    """No policy loss is registered: verl's vanilla loss is RiskPO's token loss
    (per_token_loss, dual clip) with verl's aggregation, loss and gradients,
    on the advantages verl's compute_advantage hands the actor."""
    data, _, _ = make_batch(("loss", estimator, agg), P=6)
    data.batch["response_mask"][1] = 0  # a fully masked row
    advantages = run_compute_advantage(data, estimator=estimator).batch["advantages"]
    advantages = advantages.to(torch.float64)
    mask = data.batch["response_mask"].to(torch.float64)
    g = torch.Generator().manual_seed(_seed(("logp", agg)))
    old = -torch.rand(mask.shape, generator=g, dtype=torch.float64) * 3
    start = old + 0.4 * torch.randn(mask.shape, generator=g, dtype=torch.float64)

    logp_verl = start.clone().requires_grad_()
    verl_loss, metrics = _verl_vanilla_loss(old, logp_verl, advantages, mask.bool(), agg)
    verl_loss.backward()
    logp_ours = start.clone().requires_grad_()
    per_token, terms = per_token_loss(logp_ours, None, advantages, old, clip_low=0.2,
                                      clip_high=0.28, clip_ratio_c=3.0)
    ours = weighted_sum(aggregation_weights(mask, agg), per_token)
    ours.backward()
    # verl adds its 1e-8 to an integer count of a bool mask (float32: lost), we in float64
    rtol = 1e-7 if agg == "seq-mean-token-mean" else 1e-12
    torch.testing.assert_close(verl_loss, ours, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(logp_verl.grad, logp_ours.grad, rtol=rtol, atol=1e-12)
    clipped = (terms.l2 > terms.l1).to(torch.float64)
    assert metrics["actor/pg_clipfrac"] == pytest.approx(float((clipped * mask).sum() / mask.sum()))
    assert 0 < metrics["actor/pg_clipfrac"] < 1  # the clip is exercised


def test_verl_vanilla_loss_across_data_parallel_ranks_is_our_whole_loss():
    data, _, _ = make_batch("dp loss", P=6)
    advantages = run_compute_advantage(data).batch["advantages"].to(torch.float64)
    mask = data.batch["response_mask"].to(torch.float64)
    g = torch.Generator().manual_seed(_seed("dp logp"))
    old = -torch.rand(mask.shape, generator=g, dtype=torch.float64) * 3
    logp = (old + 0.4 * torch.randn(mask.shape, generator=g, dtype=torch.float64)).requires_grad_()
    half = len(data) // 2
    info = {"dp_size": 2, "batch_num_tokens": mask.sum(), "global_batch_size": None}
    # FSDP averages the ranks' gradients, so the mean of the ranks' losses is what trains.
    ranks = [_verl_vanilla_loss(old[s], logp[s], advantages[s], mask[s].bool(), "token-mean",
                                **info)[0] for s in (slice(None, half), slice(half, None))]
    per_token, _ = per_token_loss(logp, None, advantages, old, clip_low=0.2, clip_high=0.28)
    whole = weighted_sum(aggregation_weights(mask, "token-mean"), per_token)
    torch.testing.assert_close(sum(ranks) / 2, whole, rtol=1e-12, atol=1e-12)


def test_track_mode_uses_the_tracker_of_the_previous_step():
    options = advantage_options("math", quantile_mode="track")
    reference = rk.QuantileTracker(lr=0.1)
    with pytest.warns(UserWarning, match="restarts on resume"):
        first = run_compute_advantage(make_batch("track 1")[0],
                                      config=algo(quantile_mode="track")).batch["advantages"]
    data, _, _ = make_batch("track 1")
    expected, result = expected_from_order(data, options)  # no tracker yet: batch quantiles
    torch.testing.assert_close(first, expected, rtol=0, atol=0)
    reference.update(result.bundle_scores)
    torch.testing.assert_close(adapter.quantile_tracker().values, reference.values)

    data, _, _ = make_batch("track 2")
    second = run_compute_advantage(data, config=algo(quantile_mode="track", mean_baseline=True))
    expected, result = expected_from_order(
        data, options, q_lo=reference.value(0.2), q_hi=reference.value(0.9),
        base_mid=reference.baselines(0.2, 0.9)[0], base_low=reference.baselines(0.2, 0.9)[1])
    torch.testing.assert_close(second.batch["advantages"], expected, rtol=0, atol=0)
    reference.update(result.bundle_scores)
    torch.testing.assert_close(adapter.quantile_tracker().values, reference.values)
    assert adapter.quantile_tracker().steps == 2


def _trainer_config(tmp_path, resume_mode="auto"):
    from omegaconf import OmegaConf
    return OmegaConf.create({"trainer": {"default_local_dir": str(tmp_path),
                                         "resume_mode": resume_mode, "resume_from_path": None}})


def test_checkpoint_callback_saves_and_restores_the_tracker(tmp_path):
    from verl.trainer.ppo.checkpoint_callback import build_checkpoint_callback
    config = _trainer_config(tmp_path)
    config.trainer.checkpoint_callback_class = \
        "riskpo_kernels.integrations.verl.TrackerCheckpointCallback"
    callback = build_checkpoint_callback(config)  # as verl's v1 trainer builds it
    assert isinstance(callback, adapter.TrackerCheckpointCallback)
    for step in range(3):
        run_compute_advantage(make_batch(("ckpt", step))[0], config=algo(quantile_mode="mix"))
    saved = adapter.quantile_tracker().state_dict()
    folder = tmp_path / "global_step_3"
    callback.on_save(trainer=None, global_step=3, checkpoint_dir=str(folder))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3")

    adapter.reset_tracker()
    build_checkpoint_callback(config)  # a resumed run
    restored = adapter.quantile_tracker()
    assert restored is not None and restored.steps == 3
    torch.testing.assert_close(restored.values, saved["values"], rtol=0, atol=0)

    adapter.reset_tracker()
    adapter.TrackerCheckpointCallback(_trainer_config(tmp_path, resume_mode="disable"))
    assert adapter.quantile_tracker() is None
    (folder / adapter.TRACKER_FILE).unlink()
    with pytest.warns(UserWarning, match="starts afresh"):
        adapter.TrackerCheckpointCallback(config)
    assert adapter.quantile_tracker() is None


def _readme_overrides():
    # The full command line of the verl guide (the README shows a short form of it).
    text = (ROOT / "docs" / "verl.md").read_text()
    command = next(block for block in re.findall(r"```bash\n(.*?)```", text, re.S)
                   if "verl.trainer.main_ppo" in block)
    return [token for token in re.findall(r"(\+?[A-Za-z_][\w.]*=\S+)", command)
            if not re.match(r"[A-Z_]+=", token)]  # environment variables, not overrides


def test_the_readme_command_line_is_a_valid_verl_config():
    """Every key of the README's command line exists in verl's ppo_trainer
    config (Hydra refuses unknown keys without '+'), and the algorithm section
    verl hands the estimator carries the RiskPO options."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException
    overrides = [o for o in _readme_overrides() if not o.startswith("data.train_files")
                 and not o.startswith("data.val_files")]
    assert any(o.startswith("+algorithm.riskpo.") for o in overrides)
    with initialize_config_dir(config_dir=str(VERL_DIR / "trainer" / "config"), version_base=None):
        config = compose(config_name="ppo_trainer", overrides=overrides)
        with pytest.raises(ConfigCompositionException):
            compose(config_name="ppo_trainer", overrides=["algorithm.riskpo.beta=0.8"])
    assert config.algorithm.adv_estimator == "riskpo"
    assert config.actor_rollout_ref.model.fused_kernel_options.impl_backend == adapter.BACKEND
    env = config.ray_kwargs.ray_init.runtime_env.env_vars
    assert env.VERL_USE_EXTERNAL_MODULES == "riskpo_kernels.integrations.verl"
    options, extra = adapter.riskpo_options(config.algorithm)
    assert options == advantage_options("math", **{k: v for k, v in config.algorithm.riskpo.items()
                                                   if k not in adapter.ADAPTER_OPTIONS})
    assert options["beta"] == 0.9 and options["credit"] == "std" and options["bundle_size"] == 5
    data, _, _ = make_batch("readme")
    out = run_compute_advantage(data, config=config.algorithm)  # verl's own config object
    torch.testing.assert_close(out.batch["advantages"], expected_from_order(data, options)[0],
                               rtol=0, atol=0)


def test_bad_input_is_refused_by_name():
    data, _, _ = make_batch("bad", P=4)
    rewards, mask = data.batch["token_level_rewards"], data.batch["response_mask"]
    uids = data.non_tensor_batch["uid"]
    fn = core_algos.get_adv_estimator_fn("riskpo")
    with pytest.raises(ValueError, match="index is None"):
        fn(rewards, mask, config=algo())
    uneven = uids.copy()
    other = next(uid for uid in uids if uid != uids[0])
    uneven[np.flatnonzero(uids == other)[-1]] = uids[0]
    message = rf"uid '{other}' has 4 responses but uid '{uids[0]}' has 6"
    with pytest.raises(ValueError, match=message):
        fn(rewards, mask, index=uneven, config=algo())
    with pytest.raises(ValueError, match="algorithm.riskpo.bundel_size"):
        fn(rewards, mask, index=uids, config=algo(bundel_size=5))
    with pytest.raises(ValueError, match="alpha"):
        fn(rewards, mask, index=uids, config=algo(alpha=0.95))
    with pytest.raises(ValueError, match="algorithm.riskpo.recipe: recipe must be one of"):
        fn(rewards, mask, index=uids, config=algo(recipe="gsm8k"))
    with pytest.raises(ValueError, match="index has 3 uids"):
        fn(rewards, mask, index=uids[:3], config=algo())
    with pytest.raises(ValueError, match="response_mask"):
        fn(rewards, mask[:, :-1], index=uids, config=algo())
    # an AlgoConfig (no riskpo field) means the math recipe
    assert torch.equal(fn(rewards, mask, index=uids, config=AlgoConfig())[0],
                       fn(rewards, mask, index=uids, config=algo())[0])
    # Prompt ids as a tensor group as verl's object array does (a tensor's
    # elements hash by identity: every row was a prompt of its own, all zeros).
    as_ints = torch.from_numpy(np.unique(uids, return_inverse=True)[1].reshape(-1))
    want = fn(rewards, mask, index=uids, config=algo())[0]
    assert want.abs().sum() > 0
    assert torch.equal(fn(rewards, mask, index=as_ints, config=algo())[0], want)
    # Options name their key, as verl's config spells it.
    with pytest.raises(ValueError, match=r"algorithm\.riskpo\.tracker_lr must be > 0, got 0"):
        fn(rewards, mask, index=uids, config=algo(tracker_lr=0))
    with pytest.raises(ValueError, match=r"algorithm\.riskpo\.bundle_size must be >= 1"):
        fn(rewards, mask, index=uids, config=algo(bundle_size=0))


def test_a_verl_without_the_registries_is_named():
    from verl.models.transformers import dense_common, monkey_patch
    from verl.trainer.ppo import checkpoint_callback

    class OldCoreAlgos:
        __name__ = "verl.trainer.ppo.core_algos"
        agg_loss = core_algos.agg_loss

    with pytest.raises(ImportError, match=r"verl 0\.4\.0 lacks .*register_adv_est.*supports "
                                          r"verl 0\.9\.1"):
        adapter.check_verl(OldCoreAlgos, monkey_patch, dense_common, checkpoint_callback, "0.4.0")
    adapter.check_verl(core_algos, monkey_patch, dense_common, checkpoint_callback, "0.9.1")


# ---------------------------------------------------------------- fused forward


def tiny_model(cls_name="Qwen2ForCausalLM", seed=0):
    import transformers
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    base = getattr(transformers, cls_name)
    # A subclass per test: verl patches forward on the class, for every instance.
    cls = type(f"Tiny{cls_name}", (base,), {"__module__": base.__module__})
    torch.manual_seed(seed)
    return cls(config).to(torch.float64).eval()


def _inputs(seed, length=23):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (1, length), generator=g)
    return ids, torch.arange(length)[None], torch.roll(ids, -1, -1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_forward_equals_verl_torch_backend(temperature):
    from verl.models.transformers import monkey_patch
    from verl.models.transformers.dense_common import (
        CausalLMOutputForPPO,
        forward_with_torch_backend,
    )

    model = tiny_model().float()  # verl's torch backend computes in float32
    other = tiny_model().float()
    other.load_state_dict(model.state_dict())
    assert monkey_patch.apply_monkey_patch.__globals__["patch_forward_with_backends"] is \
        monkey_patch.patch_forward_with_backends  # apply_monkey_patch reaches our hook
    monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True,
                                             fused_kernels_backend="riskpo")
    assert type(model).forward is adapter.forward_with_riskpo_backend
    ids, positions, labels = _inputs(1)
    ours = model(input_ids=ids, position_ids=positions, temperature=temperature,
                 shift_labels=labels, return_dict=True)
    theirs = forward_with_torch_backend(other, input_ids=ids, position_ids=positions,
                                        temperature=temperature, shift_labels=labels,
                                        return_dict=True)
    assert isinstance(ours, CausalLMOutputForPPO)
    assert ours.log_probs.shape == ours.entropy.shape == (1, 23)
    assert ours.log_probs.dtype == ours.entropy.dtype == torch.float32
    assert ours.log_probs.requires_grad and ours.entropy.requires_grad
    torch.testing.assert_close(ours.log_probs, theirs.log_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.entropy, theirs.entropy, rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(7)
    w1, w2 = torch.randn(2, 1, 23, generator=g)
    (ours.log_probs * w1 + ours.entropy * w2).sum().backward()
    (theirs.log_probs * w1 + theirs.entropy * w2).sum().backward()
    for (name, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_forward_float64_with_a_biased_head_equals_materialised_logits():
    """verl's torch backend drops an lm_head bias and computes in float32; ours
    keeps the bias and the dtype. Oracle: log_softmax of the unpatched model's
    logits, float64, targets rolled from input_ids (no shift_labels)."""
    models = []
    for _ in range(2):
        model = tiny_model(seed=3)
        model.lm_head = torch.nn.Linear(32, 64, bias=True, dtype=torch.float64)
        models.append(model)
    model, plain = models
    torch.nn.init.normal_(model.lm_head.bias)
    plain.load_state_dict(model.state_dict())
    adapter.patch_model_class(model)
    ids, positions, labels = _inputs(5, length=17)
    out = model(input_ids=ids, position_ids=positions, temperature=0.6, return_dict=True)
    log_softmax = torch.log_softmax(plain(input_ids=ids, position_ids=positions).logits / 0.6, -1)
    expected_lp = log_softmax.gather(-1, labels[..., None]).squeeze(-1)
    expected_h = -(log_softmax.exp() * log_softmax).sum(-1)
    assert out.log_probs.dtype == out.entropy.dtype == torch.float64
    torch.testing.assert_close(out.log_probs, expected_lp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.entropy, expected_h, rtol=1e-10, atol=1e-10)
    g = torch.Generator().manual_seed(8)
    w1, w2 = torch.randn(2, 1, 17, generator=g, dtype=torch.float64)
    (out.log_probs * w1 + out.entropy * w2).sum().backward()
    (expected_lp * w1 + expected_h * w2).sum().backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=name)
    assert model.lm_head.bias.grad.abs().sum() > 0


def test_other_backends_still_reach_verl_and_vision_models_are_refused():
    from verl.models.transformers import monkey_patch
    model = tiny_model(seed=4)
    before = type(model).forward
    monkey_patch.patch_forward_with_backends(model, use_fused_kernels=False,
                                             fused_kernels_backend="riskpo")
    assert type(model).forward is before
    monkey_patch.patch_forward_with_backends(model, use_fused_kernels=True,
                                             fused_kernels_backend="torch")
    assert type(model).forward.__module__ == "verl.models.transformers.dense_common"
    model.config.model_type = "qwen2_vl"
    with pytest.raises(ValueError, match="text models only"):
        adapter.patch_model_class(model)


# ---------------------------------------------------------------- loading


def test_loaded_by_verl_external_modules_and_not_by_riskpo_kernels():
    env = dict(os.environ, VERL_USE_EXTERNAL_MODULES="riskpo_kernels.integrations.verl",
               PYTHONWARNINGS="ignore")
    script = ("import verl\n"
              "from verl.trainer.ppo import core_algos\n"
              "from verl.models.transformers import monkey_patch\n"
              "fn = core_algos.get_adv_estimator_fn('riskpo')\n"
              "assert hasattr(monkey_patch.patch_forward_with_backends, '_riskpo_original')\n"
              "print(fn.__module__)\n")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "riskpo_kernels.integrations.verl"
    env.pop("VERL_USE_EXTERNAL_MODULES")
    done = subprocess.run([sys.executable, "-c",
                           "import sys, riskpo_kernels\nassert 'verl' not in sys.modules"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
