"""Pass@k per difficulty bucket: where on the test split did RL gain or lose?

A test question's difficulty is its pass rate under a reference model (the
warm-up checkpoint): ``c / n`` with ``c`` of its ``n`` samples correct, as an
evaluation record's ``correct`` list holds them. Pass@k of a later model is then
averaged over the questions of each bucket, with the unbiased estimator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .rollout import pass_at_k

# (name, lower, upper): a question with reference pass rate p is in the first
# bucket with lower < p <= upper; "unsolved" holds p == 0 exactly.
BUCKETS = (("unsolved (0)", -1.0, 0.0), ("hard (0, 0.25]", 0.0, 0.25),
           ("medium (0.25, 0.75]", 0.25, 0.75), ("easy (0.75, 1]", 0.75, 1.0))


def bucket_of(correct: int, samples: int) -> int:
    """Index into BUCKETS of a question with ``correct`` of ``samples`` right."""
    if not 0 <= correct <= samples or samples < 1:
        raise ValueError(f"need 0 <= correct <= samples, samples >= 1; got {correct} of {samples}")
    rate = correct / samples
    return next(i for i, (_, lo, hi) in enumerate(BUCKETS) if lo < rate <= hi)


def _counts(record: dict, where: str) -> tuple[list[int], int]:
    correct, samples = record.get("correct"), record.get("k")
    if not isinstance(correct, list) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"{where}: the evaluation record has no per-question counts "
                         "('correct' and 'k'); it was written before they were recorded")
    return correct, samples


def pass_at_k_by_bucket(reference: dict, evaluation: dict, ks: Sequence[int]) -> list[dict]:
    """Pass@k of ``evaluation`` per difficulty bucket of ``reference``.

    reference, evaluation: eval records (metrics.jsonl) over the same test
    questions, each with ``correct`` (Q,) and ``k`` (samples per question).
    Returns one dict per bucket: name, questions, and ``pass@k`` for each k
    (None for an empty bucket). k above the evaluation's samples is refused.
    """
    ref_correct, ref_samples = _counts(reference, "reference")
    correct, samples = _counts(evaluation, "evaluation")
    if len(ref_correct) != len(correct):
        raise ValueError(f"the reference evaluated {len(ref_correct)} questions and the "
                         f"evaluation {len(correct)}: not the same test questions")
    for k in ks:
        if not 1 <= k <= samples:
            raise ValueError(f"k={k} needs 1 <= k <= {samples} (samples per question)")
    members = [bucket_of(c, ref_samples) for c in ref_correct]
    counts = torch.tensor(correct, dtype=torch.int64)
    rows = []
    for index, (name, _, _) in enumerate(BUCKETS):
        chosen = torch.tensor([m == index for m in members], dtype=torch.bool)
        row = {"bucket": name, "questions": int(chosen.sum())}
        for k in ks:
            row[f"pass@{k}"] = (pass_at_k(samples, counts[chosen], k).mean().item()
                                if row["questions"] else None)
        rows.append(row)
    return rows
