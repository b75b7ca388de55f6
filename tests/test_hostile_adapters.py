"""Hostile input on the adapters (issue 19, section 2), one test per class:
verl's prompt ids as a tensor or an array, verl's options named by their config
key, and tracker files that are empty, truncated or corrupted, in both adapters
and in QuantileTracker.load_file itself. tests/hostile_cases.py sweeps the same
entry points by argument kind; these pin the answers and the messages."""

from __future__ import annotations

import re
import zlib

import numpy as np
import pytest
import torch

import riskpo_kernels as rk

TRACKER_FILE = "riskpo_tracker.pt"


def _saved_tracker(folder, steps=3):
    tracker = rk.QuantileTracker(lr=0.2)
    g = torch.Generator().manual_seed(steps)
    for _ in range(steps):
        tracker.update(torch.randn(4, 5, generator=g))
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(tracker.state_dict(), folder / TRACKER_FILE)
    return tracker


def _damage(path, how):
    good = path.read_bytes()
    if how == "empty":
        path.write_bytes(b"")
    elif how == "half-written":
        path.write_bytes(good[:len(good) // 2])
    elif how == "one byte short":
        path.write_bytes(good[:-1])
    elif how == "text":
        path.write_text("lr: 0.1\n")
    elif how == "a list":
        torch.save([1.0, 2.0], path)
    elif how == "a bad state":
        torch.save({"lr": 0.1, "levels": [0.5], "steps": 1, "values": None}, path)


# What the message says of each damage (after the file's path).
UNREADABLE = "not a readable quantile tracker state \\(empty, truncated or corrupted"
DAMAGE = {"empty": UNREADABLE, "half-written": UNREADABLE, "one byte short": UNREADABLE,
          "text": UNREADABLE, "a list": "not a valid quantile tracker state",
          "a bad state": "not a valid quantile tracker state"}
WAY_OUT = "delete the file to start the quantile tracker afresh, or replace it with a good copy"


# ---- QuantileTracker.load_file: the one reader both adapters use ---------------

def test_load_file_restores_what_was_saved(tmp_path):
    saved = _saved_tracker(tmp_path)
    tracker = rk.QuantileTracker()
    tracker.load_file(tmp_path / TRACKER_FILE)
    assert tracker.steps == 3 and tracker.lr == 0.2
    torch.testing.assert_close(tracker.values, saved.values, rtol=0, atol=0)


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_tracker_file_is_named_and_leaves_the_tracker_as_it_was(tmp_path, how):
    _saved_tracker(tmp_path)
    path = tmp_path / TRACKER_FILE
    _damage(path, how)
    tracker = rk.QuantileTracker(lr=0.3)
    tracker.update(torch.arange(8.0))
    before = tracker.state_dict()
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + DAMAGE[how]) as error:
        tracker.load_file(path)
    assert WAY_OUT in str(error.value)
    after = tracker.state_dict()
    assert after["steps"] == before["steps"] and after["lr"] == before["lr"]
    assert torch.equal(after["values"], before["values"])


def test_a_missing_file_or_a_directory_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none.pt"))):
        rk.QuantileTracker().load_file(tmp_path / "none.pt")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path)) + ": a directory"):
        rk.QuantileTracker().load_file(tmp_path)


# ---- verl ------------------------------------------------------------------------

# verl's engine registry warns about every optional engine this machine lacks.
pytestmark = pytest.mark.filterwarnings("ignore:.* engine is not available")


@pytest.fixture
def adapter():
    """The verl adapter (skipped without verl), its tracker reset around the test."""
    pytest.importorskip("verl", reason="verl is not installed")
    from riskpo_kernels.integrations import verl as module
    module.reset_tracker()
    yield module
    module.reset_tracker()


def _batch(seed, P=6, n=3, T=4):
    """A batch whose rows are shuffled (verl reorders before the estimator):
    rewards, mask and integer prompt ids (bs,)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(P).repeat_interleave(n)[torch.randperm(P * n, generator=g)]
    rewards = torch.zeros(P * n, T)
    # A little noise: papers that tie in every bundle have zero advantages, and
    # zero is the answer the identity-hashed ids gave.
    rewards[:, -1] = ((torch.rand(P * n, generator=g) < 0.5).float() + 0.1 * ids
                      + 0.01 * torch.randn(P * n, generator=g))
    return rewards, torch.ones(P * n, T), ids


def _advantages(rewards, mask, index, **options):
    from riskpo_kernels.integrations import verl as adapter
    adapter.reset_tracker()
    return adapter.compute_riskpo_outcome_advantage(
        rewards, mask, index=index, config={"riskpo": {"bundle_size": 4, **options}})[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("form", ["int64 tensor", "int32 tensor", "numpy int array",
                                  "numpy object array", "list of 0-d tensors"])
def test_prompt_ids_as_a_tensor_or_an_array_group_as_the_list_does(adapter, seed, form):
    rewards, mask, ids = _batch(seed)
    want = _advantages(rewards, mask, ids.tolist())
    assert want.abs().sum() > 0  # the list form groups: not the all-zero answer
    index = {"int64 tensor": ids, "int32 tensor": ids.int(), "numpy int array": ids.numpy(),
             "numpy object array": np.array([f"uid-{i}" for i in ids.tolist()], dtype=object),
             "list of 0-d tensors": list(ids)}[form]
    got = _advantages(rewards, mask, index)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("index, message", [
    (lambda ids: ids[:, None], r"index must be a 1-D sequence of prompt uids, got a Tensor of "
                               r"shape \(18, 1\)"),
    (lambda ids: ids.float(), "index must hold integer or string prompt uids, got dtype "
                              "torch.float32"),
    (lambda ids: ids.numpy().astype(np.float64), "index must hold integer or string prompt "
                                                 "uids, got dtype float64"),
    (lambda ids: [t[None] for t in ids], r"index holds a tensor uid of shape \(1,\)"),
    (lambda ids: "uid-0" * len(ids), "index must be a sequence of prompt uids, got a str"),
])
def test_prompt_ids_that_cannot_group_are_refused_by_name(adapter, index, message):
    rewards, mask, ids = _batch(0)
    with pytest.raises(ValueError, match=message):
        _advantages(rewards, mask, index(ids))


@pytest.mark.parametrize("key, value, message", [
    ("tracker_lr", 0, "algorithm.riskpo.tracker_lr must be > 0, got 0.0"),
    ("tracker_lr", -0.1, "algorithm.riskpo.tracker_lr must be > 0, got -0.1"),
    ("tracker_lr", float("nan"), "algorithm.riskpo.tracker_lr must be finite"),
    ("tracker_lr", "0.1", "algorithm.riskpo.tracker_lr must be a real number"),
    ("mean_baseline", "yes", "algorithm.riskpo.mean_baseline must be True or False"),
    ("bundle_size", 0, "algorithm.riskpo.bundle_size must be >= 1"),
    ("bundle_size", 2.0, "algorithm.riskpo.bundle_size must be an integer"),
    ("alpha", float("inf"), "algorithm.riskpo.alpha must be finite"),
    ("beta", 0.1, r"need 0 < algorithm.riskpo.alpha < algorithm.riskpo.beta < 1, got "
                  r"alpha=0.2, beta=0.1"),
    ("w_low", -1.0, "algorithm.riskpo.w_low must be >= 0.0"),
    ("eps", None, "algorithm.riskpo.eps must be a real number"),
    ("credit", "mean", "algorithm.riskpo.credit must be one of"),
    ("quantile_mode", ["track"], "algorithm.riskpo.quantile_mode must be one of"),
    ("normalize_std", 1, "algorithm.riskpo.normalize_std must be True or False"),
    ("recipe", ["math"], r"algorithm.riskpo.recipe: recipe must be one of \['dapo', 'math'\], "
                         r"got \['math'\]"),
])
def test_a_bad_option_names_its_config_key(adapter, key, value, message):
    rewards, mask, ids = _batch(0)
    with pytest.raises(ValueError, match=r"^riskpo \(verl adapter\): " + message):
        _advantages(rewards, mask, ids, **{key: value})
    assert adapter.quantile_tracker() is None  # refused before any tracker was made


@pytest.mark.parametrize("mask, message", [
    (lambda m: m.to(torch.complex64), "response_mask must be bool or uint8"),
    (lambda m: m - 2 * (torch.arange(m.shape[1]) == 0),  # -1 on every row's first token
     r"response_mask must hold finite values >= 0 .*got values in \[-1.0, 1.0\]"),
    (lambda m: m.index_fill(1, torch.tensor([0]), float("nan")), "response_mask must hold finite"),
])
def test_a_mask_no_weighting_could_mean_is_refused(adapter, mask, message):
    rewards, good, ids = _batch(0)
    with pytest.raises(ValueError, match=message):
        _advantages(rewards, mask(good), ids)
    # int64 (verl's own) and bool masks are the float mask's answer
    want = _advantages(rewards, good, ids)
    for same in (good.long(), good.bool()):
        torch.testing.assert_close(_advantages(rewards, same, ids), want, rtol=0, atol=0)


def _resume_config(root, step):
    from omegaconf import OmegaConf
    (root / "latest_checkpointed_iteration.txt").write_text(str(step))
    return OmegaConf.create({"trainer": {"default_local_dir": str(root), "resume_mode": "auto",
                                         "resume_from_path": None}})


@pytest.mark.parametrize("how", DAMAGE)
def test_verl_resume_from_a_damaged_tracker_file_names_it(adapter, tmp_path, how):
    folder = tmp_path / "global_step_4"
    saved = _saved_tracker(folder)
    config = _resume_config(tmp_path, 4)
    adapter.TrackerCheckpointCallback(config)  # the good file restores
    torch.testing.assert_close(adapter.quantile_tracker().values, saved.values, rtol=0, atol=0)
    adapter.reset_tracker()
    path = folder / TRACKER_FILE
    _damage(path, how)
    with pytest.raises(ValueError, match=r"^riskpo \(verl adapter\): " + re.escape(str(path))
                       + ": .*" + DAMAGE[how]) as error:
        adapter.TrackerCheckpointCallback(config)
    assert WAY_OUT in str(error.value)
    assert adapter.quantile_tracker() is None
    path.unlink()  # the way out the message gives: the run resumes, the tracker starts afresh
    with pytest.warns(UserWarning, match="starts afresh"):
        adapter.TrackerCheckpointCallback(config)
    assert adapter.quantile_tracker() is None


def test_a_seeded_sweep_of_random_ids_agrees_with_the_list_form(adapter):
    # Random uids with repeats in random order, as integers in every container.
    for seed in range(5):
        g = torch.Generator().manual_seed(zlib.crc32(b"ids") + seed)
        P = int(torch.randint(2, 9, (1,), generator=g))
        n = int(torch.randint(1, 5, (1,), generator=g))
        uids = torch.randint(-2**40, 2**40, (P,), generator=g)
        while uids.unique().numel() < P:
            uids = torch.randint(-2**40, 2**40, (P,), generator=g)
        index = uids.repeat_interleave(n)[torch.randperm(P * n, generator=g)]
        rewards = torch.zeros(P * n, 2)
        rewards[:, 1] = torch.rand(P * n, generator=g)
        want = _advantages(rewards, torch.ones(P * n, 2), index.tolist())
        for form in (index, index.numpy(), list(index)):
            torch.testing.assert_close(_advantages(rewards, torch.ones(P * n, 2), form), want,
                                       rtol=0, atol=0)
