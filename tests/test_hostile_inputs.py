"""Hostile input, swept by class over every public function and raw op.

The promise (README, "Bad input"): a clear error that names the argument,
never a crash, never a silent wrong answer, and inputs left as they were.
tests/hostile_cases.py generates the cases from each entry point's valid call:
freed storage, meta and sparse tensors, non-tensors and wrong dtypes for every tensor
argument, 'False' for every boolean, integers past int64 and negative ones,
NaN and infinity for every float, unknown strings, and writes into tensors
that require grad or are inference tensors for the in-place ops; and for the
adapters, recipes and the trainer's resume, bad config options (named by
their config key), prompt ids in every container, and damaged files (named
by their path, their code never run). They run in
a subprocess of their own (a crash or a hang there is reported here as that
case's failure, and the sweep resumes after it). The last tests check the
answers to inputs that are odd but valid.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hostile_cases as cases
import riskpo_kernels as rk

HERE = Path(__file__).resolve().parent
CLEAR_ERRORS = ("ValueError", "RuntimeError", "TypeError")
# A file argument may also be refused by the OSError that says what is at its path.
CLEAR_FILE_ERRORS = CLEAR_ERRORS + ("FileNotFoundError", "IsADirectoryError")


def _sweep(device: str) -> dict:
    """case id -> result, running the cases in a subprocess that is restarted
    after any case that ends it (crash, or a hang past the case's time limit)."""
    results, skip = {}, 0
    while True:
        run = subprocess.run([sys.executable, str(HERE / "hostile_cases.py"), "--device", device,
                              "--skip", str(skip)], capture_output=True, text=True, timeout=900,
                             cwd=HERE.parent)
        started, done = None, False
        for line in run.stdout.splitlines():
            record = json.loads(line)
            if "start" in record:
                started = record
            elif "outcome" in record:
                results[record["case"]] = record
            done = done or record.get("done", False)
        if done:
            return results
        if started is None or started["case"] in results:
            raise AssertionError(f"the sweep's process failed outside a case (exit "
                                 f"{run.returncode}):\n{run.stderr[-3000:]}")
        results[started["case"]] = {"case": started["case"], "outcome": "crashed",
                                    "returncode": run.returncode, "stderr": run.stderr[-1500:]}
        skip = started["start"] + 1


@pytest.fixture(scope="module")
def sweep():
    cache = {}

    def results(device):
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        if device not in cache:
            cache[device] = _sweep(device)
        return cache[device]

    return results


def _problem(case: str, result: dict) -> str | None:
    """Why a result breaks the promise, or None."""
    entry, arg, mutation = case.split("::")
    outcome = result["outcome"]
    if outcome == "crashed":
        return f"crashed or hung (exit {result['returncode']}): {result['stderr'][-400:]}"
    if mutation == "valid":
        if outcome != "returned":
            return f"the valid call raised {result['type']}: {result['message'][:300]}"
        return f"modified its inputs {result['modified']}" if result["modified"] else None
    if result.get("ran_code"):
        return "loading the file ran the code it holds"
    expect = result.get("expect")  # an odd but valid input: an answer, not an error
    if expect is not None:
        if outcome != "returned":
            wanted = "the valid call's answer" if expect == "same" else "an answer"
            return f"raised {result['type']} for a valid input (expected {wanted}): " \
                   f"{result['message'][:300]}"
        if expect == "same" and not result["same"]:
            return "answered differently from the valid call, for an input that means the same"
        return None
    if outcome == "returned":
        # A raw op called with meta tensors only is torch's shape inference:
        # meta outputs, not data. Anything else returned is a silent answer.
        if entry.startswith("op.") and mutation == "meta" and result["all_meta"]:
            return None
        return "returned instead of raising"
    if (entry.startswith("op.") and mutation == "sparse" and result["type"] == "NotImplementedError"
            and "Could not run 'riskpo::" in result["message"] and "Sparse" in result["message"]):
        return None  # torch's dispatcher refuses a sparse tensor before any kernel of ours
    clear = CLEAR_FILE_ERRORS if result.get("kind") == "file" else CLEAR_ERRORS
    if result["type"] not in clear:
        return f"raised {result['type']}, not a clear error: {result['message'][:300]}"
    # What the error must name: the argument, or the config key or file it came from.
    name = result.get("must_name", arg)
    if name not in result["message"]:
        return f"the {result['type']} does not name {name!r}: {result['message'][:300]}"
    return None


def _entry_cases(device):
    return [(device, e.name) for e in cases.entries(device)]


@pytest.mark.parametrize("device, entry", _entry_cases("cpu") + _entry_cases("cuda"))
def test_every_hostile_input_is_refused_clearly(sweep, device, entry):
    results = sweep(device)
    ids = [c for c in cases.case_ids(device) if c.split("::")[0] == entry]
    assert ids and all(c in results for c in ids)
    problems = {c: p for c in ids if (p := _problem(c, results[c])) is not None}
    assert not problems, "\n".join(f"{c}: {p}" for c, p in problems.items())


def test_every_op_and_public_function_is_swept():
    entries = cases.entries("cpu")
    swept_ops = {e.name.removeprefix("op.") for e in entries if e.name.startswith("op.")}
    assert swept_ops == set(rk.ops.SCHEMAS), "give each new op a valid call in hostile_cases.py"
    public = {name for name in rk.__all__
              if callable(getattr(rk, name)) and not dataclasses.is_dataclass(getattr(rk, name))}
    assert public == set(cases.PUBLIC_FUNCTIONS)
    covered = {e.name.removeprefix("rk.").split("[")[0] for e in entries if e.name.startswith("rk.")}
    assert covered == public
    # Every class of mutation reaches every tensor argument of every entry.
    some = next(e for e in entries if e.name == "op.fused_linear_policy_loss")
    assert {m for a, m, _ in cases.mutations(some) if a == "hidden"} >= {
        "freed", "meta", "not_a_tensor", "int64", "bool", "complex64"}


def _public_names(module: str) -> set:
    """A module's __all__, else its public functions and classes; constants
    (UPPER_CASE) aside. Read from the source: nothing is imported."""
    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__"
                                                for t in node.targets):
            names = set(ast.literal_eval(node.value))
            break
    else:
        names = {node.name for node in tree.body
                 if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    return {n for n in names if not n.startswith("_") and not n.isupper()}


@pytest.mark.parametrize("module", sorted(cases.SURFACE))
def test_every_entry_point_of_the_adapters_recipes_and_trainer_is_swept(module):
    # A new public function of these modules fails here until it is given a
    # valid call in hostile_cases.surface_entries() or a reason in NOT_SWEPT.
    swept, skipped = set(cases.SURFACE[module]), set(cases.NOT_SWEPT[module])
    assert not swept & skipped
    assert _public_names(module) == swept | skipped, (
        f"{module}: sweep each new entry point in hostile_cases.py (or say why not in NOT_SWEPT)")
    needs = {"riskpo_kernels.integrations.verl": "verl", "riskpo_kernels.integrations.trl": "trl",
             "riskpo_train.trainer": "transformers"}.get(module)
    if needs is not None and importlib.util.find_spec(needs) is None:
        pytest.skip(f"{needs} is not installed")
    names = [e.name.split(".") for e in cases.surface_entries()]
    assert all(any(name in parts for parts in names) for name in swept)
    if module == "riskpo_kernels.integrations.verl":  # its entries use every kind of the surface
        kinds = {k for e in cases.surface_entries() for k in e.kinds.values()}
        assert set(cases._SURFACE_MUTATIONS) | {"matrix"} <= kinds


def test_a_crash_is_reported_as_the_cases_failure(tmp_path):
    # The harness itself: a case that kills its process is named, not lost.
    problem = _problem("op.x::rewards::freed", {"outcome": "crashed", "returncode": -11,
                                                "stderr": "Segmentation fault"})
    assert problem is not None and "crashed" in problem
    assert _problem("rk.x::rewards::meta", {"outcome": "returned", "all_meta": True})
    assert _problem("op.x::alpha::nan", {"outcome": "raised", "type": "IndexError",
                                         "message": "alpha"})
    assert _problem("op.x::alpha::nan", {"outcome": "raised", "type": "ValueError",
                                         "message": "eps must be finite"})
    # The surface's rules: the config key or file named, code never run, and
    # odd but valid input answered (the valid call's answer where it means the same).
    key = {"outcome": "raised", "type": "ValueError", "must_name": "algorithm.riskpo.alpha"}
    assert _problem("verl.x::algorithm.riskpo.alpha::nan", {**key, "message": "alpha must be"})
    assert not _problem("verl.x::algorithm.riskpo.alpha::nan",
                        {**key, "message": "algorithm.riskpo.alpha must be finite"})
    file = {"outcome": "raised", "kind": "file", "must_name": "/x/t.pt", "ran_code": False}
    assert not _problem("e::f::absent", {**file, "type": "FileNotFoundError", "message": "/x/t.pt"})
    assert _problem("e::f::empty", {**file, "type": "EOFError", "message": "/x/t.pt"})
    assert _problem("e::f::empty", {**file, "type": "ValueError", "message": "t.pt is bad"})
    assert _problem("e::f::runs_code", {**file, "ran_code": True, "type": "ValueError",
                                        "message": "/x/t.pt"})
    same = {"expect": "same", "outcome": "returned", "all_meta": False}
    assert _problem("e::index::tensor", {**same, "same": False})
    assert not _problem("e::index::tensor", {**same, "same": True})
    assert _problem("e::index::tensor", {"expect": "same", "outcome": "raised",
                                         "type": "ValueError", "message": "index"})


# ---- odd but valid input: the right answer, not an error ----------------------

@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("bundle_size", [5, 6, 3_000_000_000, 2**62, 2**63 - 1])
def test_a_bundle_larger_than_the_batch_is_the_batch(cpp_available, impl, bundle_size):
    rewards = torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0])  # P = 5, n = 2
    want = rk.mvar_advantages(rewards, group_size=2, bundle_size=5, credit="sum-mean", impl=impl)
    got = rk.mvar_advantages(rewards, group_size=2, bundle_size=bundle_size, credit="sum-mean",
                             impl=impl)
    for name in ("advantages", "bundle_scores", "q_lo", "q_hi"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=0, atol=0)
    raw = torch.ops.riskpo.mvar_advantages(rewards, 2, bundle_size, 0.2, 0.8, 1.5, 0.0, "batch",
                                           None, None, "sum-mean", True, True, None, None, 1e-6)
    torch.testing.assert_close(raw[0], want.advantages, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("dtype, big", [(torch.float32, 3.4e38), (torch.float16, 65504.0),
                                        (torch.bfloat16, 3.38e38)])
def test_grpo_near_the_dtype_limit_is_not_zero(cpp_available, impl, dtype, big):
    rewards = torch.tensor([big, -big, big, -big], dtype=dtype)
    got = rk.grpo_advantages(rewards, group_size=2, impl=impl)
    want = torch.tensor([1.0, -1.0, 1.0, -1.0]) / math.sqrt(2)
    torch.testing.assert_close(got.float(), want, rtol=1e-2 if dtype != torch.float32 else 1e-6,
                               atol=0)


def test_bundle_scores_that_overflow_float32_raise_on_cpu(cpp_available):
    rewards = torch.tensor([3e38, 1.0, 3e38, 0.0])  # P = 2, n = 2: paper 0 scores 6e38
    with pytest.raises(ValueError, match="overflow torch.float32; pass float64 rewards"):
        rk.mvar_advantages(rewards, group_size=2, bundle_size=2)
    res = rk.mvar_advantages(rewards.double(), group_size=2, bundle_size=2)
    assert torch.isfinite(res.advantages).all()


@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("value", [1e10, 1e15, 1e20, 1e30, -1e30])
def test_log_prob_of_identical_huge_logits_is_minus_log_v(cpp_available, impl, value):
    V = 7
    logits = torch.full((2, 3, V), value)
    tokens = torch.zeros(2, 3, dtype=torch.long)
    out = rk.policy_loss(logits, tokens, torch.ones(2, 3), torch.ones(2), impl=impl)
    torch.testing.assert_close(out.logprobs, torch.full((2, 3), -math.log(V)))
    torch.testing.assert_close(out.entropy, torch.full((2, 3), math.log(V)))


def test_a_rejected_tracker_state_leaves_the_tracker_unchanged():
    tracker = rk.QuantileTracker(lr=0.1)
    tracker.update(torch.arange(10.0))
    good = tracker.state_dict()
    bad_states = [
        {**good, "steps": "x"}, {**good, "steps": -1}, {**good, "steps": True},
        {**good, "lr": float("nan")}, {**good, "lr": 0.5, "values": torch.zeros(3)},
        {**good, "values": good["values"].long()}, {**good, "values": None},
        {**good, "steps": 0}, {**good, "levels": "abc"}, {**good, "lr": 0.5, "steps": 2.5},
        {**good, "values": torch.full_like(good["values"], float("nan"))},
        {k: v for k, v in good.items() if k != "steps"}, [1, 2],
    ]
    for state in bad_states:
        with pytest.raises(ValueError):
            tracker.load_state_dict(state)
        after = tracker.state_dict()
        assert after["lr"] == good["lr"] and after["steps"] == good["steps"]
        assert torch.equal(after["values"], good["values"])
        assert torch.equal(after["levels"], good["levels"])
    fresh = rk.QuantileTracker(lr=0.3)
    fresh.load_state_dict(good)
    assert torch.equal(fresh.values, tracker.values) and fresh.lr == 0.1 and fresh.steps == 1


def test_in_place_ops_write_where_torch_would(cpp_available):
    # The refusals are not broader than torch's: under no_grad a leaf that
    # requires grad may be written, and inference tensors inside inference_mode.
    logits = torch.randn(3, 5)
    tokens = torch.tensor([0, 1, 4])
    _, entropy, lse = torch.ops.riskpo.token_logprob_entropy(logits, tokens, 1.0)
    g = torch.ones(3)
    want = torch.ops.riskpo.token_logprob_entropy_backward(g, g, logits, tokens, lse, entropy, 1.0)
    leaf = logits.clone().requires_grad_()
    with torch.no_grad():
        torch.ops.riskpo.token_logprob_entropy_backward_(g, g, leaf, tokens, lse, entropy, 1.0)
    torch.testing.assert_close(leaf.detach(), want, rtol=0, atol=0)
    with torch.inference_mode():
        inference = logits.clone()
        torch.ops.riskpo.token_logprob_entropy_backward_(g, g, inference, tokens, lse, entropy, 1.0)
    torch.testing.assert_close(inference, want, rtol=0, atol=0)


def test_a_raw_op_on_meta_tensors_only_infers_shapes():
    rewards = torch.empty(12, device="meta")
    advantages, scores, q_lo, q_hi = torch.ops.riskpo.mvar_advantages(
        rewards, 3, 3, 0.2, 0.8, 1.5, 0.0, "batch", None, None, "std", True, True, None, None, 1e-6)
    assert advantages.is_meta and advantages.shape == (12,)
    assert scores.shape == (2, 3) and q_lo.shape == q_hi.shape == (2,)
    with pytest.raises(RuntimeError, match="q_lo_track is on cpu but rewards is on meta"):
        torch.ops.riskpo.mvar_advantages(rewards, 3, 3, 0.2, 0.8, 1.5, 0.0, "track",
                                         torch.tensor(0.0), torch.tensor(1.0), "std", True, True,
                                         None, None, 1e-6)
