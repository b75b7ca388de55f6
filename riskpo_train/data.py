"""Prompts with verifiable answers: the record type, file loading, math rewards."""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Example:
    """One question: the text the model is prompted with and the reference answer."""

    prompt: str
    answer: str


# ---------------------------------------------------------------------------
# Loading

EXTENSIONS = (".jsonl", ".parquet")


def load_examples(path: str | os.PathLike, *, prompt_key: str = "prompt",
                  answer_key: str = "answer", limit: int | None = None) -> list[Example]:
    """Read :class:`Example` rows from a ``.jsonl`` or ``.parquet`` file.

    prompt_key, answer_key: the column names. The prompt must be a non-empty
    string; the answer a string, int or float (stored as its ``str``).
    limit: keep only the first ``limit`` rows (later rows are not read).
    Raises FileNotFoundError or ValueError naming the file and the problem.
    """
    path = Path(path)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{path}: limit must be a positive integer or None, got {limit!r}")
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        examples = _load_jsonl(path, prompt_key, answer_key, limit)
    elif suffix == ".parquet":
        examples = _load_parquet(path, prompt_key, answer_key, limit)
    else:
        raise ValueError(f"{path}: unsupported extension {suffix or '(none)'!r}; "
                         f"expected one of {', '.join(EXTENSIONS)}")
    if not examples:
        raise ValueError(f"{path}: the file has no rows")
    return examples


def _load_jsonl(path: Path, prompt_key: str, answer_key: str,
                limit: int | None) -> list[Example]:
    examples: list[Example] = []
    try:
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if limit is not None and len(examples) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}, line {lineno}: malformed JSON: {exc}") from None
                where = f"{path}, row {len(examples)} (line {lineno})"
                if not isinstance(row, dict):
                    raise ValueError(  # noqa: TRY004 (bad file content, as in _make_example)
                        f"{where}: expected a JSON object, got {type(row).__name__}")
                for key in (prompt_key, answer_key):
                    if key not in row:
                        raise ValueError(f"{where}: missing column {key!r}; "
                                         f"columns present: {sorted(row)}")
                examples.append(_make_example(row[prompt_key], row[answer_key], where,
                                              prompt_key, answer_key))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text: {exc}") from None
    return examples


def _load_parquet(path: Path, prompt_key: str, answer_key: str,
                  limit: int | None) -> list[Example]:
    # Lazy: pyarrow is heavy and only parquet datasets need it.
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        columns = parquet.schema_arrow.names
        for key in (prompt_key, answer_key):
            if key not in columns:
                raise ValueError(f"{path}: missing column {key!r}; columns present: {columns}")
        table = parquet.read(columns=[prompt_key, answer_key])
    except pa.ArrowException as exc:
        raise ValueError(f"{path}: not a readable parquet file: {exc}") from None
    if limit is not None:
        table = table.slice(0, limit)
    prompts = table.column(prompt_key).to_pylist()
    answers = table.column(answer_key).to_pylist()
    return [_make_example(prompt, answer, f"{path}, row {i}", prompt_key, answer_key)
            for i, (prompt, answer) in enumerate(zip(prompts, answers))]


def _make_example(prompt, answer, where: str, prompt_key: str, answer_key: str) -> Example:
    # ValueError throughout, TypeError never: a wrongly typed cell is bad file
    # content, and callers catch one exception type for every data problem.
    if not isinstance(prompt, str):
        raise ValueError(  # noqa: TRY004
            f"{where}: {prompt_key!r} must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError(f"{where}: empty {prompt_key!r}")
    if answer is None:
        raise ValueError(f"{where}: null {answer_key!r}")
    # bool is an int subclass, but True as a reference answer is a data bug.
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"{where}: {answer_key!r} must be a string or number, "  # noqa: TRY004
                         f"got {type(answer).__name__}")
    if isinstance(answer, float) and not math.isfinite(answer):
        raise ValueError(f"{where}: {answer_key!r} is {answer}")
    answer = str(answer)
    if not answer.strip():
        # No response could match an empty reference: every reward would be 0.
        raise ValueError(f"{where}: empty {answer_key!r}")
    return Example(prompt, answer)


def split_examples(examples: Sequence[Example], test_fraction: float,
                   seed: int) -> tuple[list[Example], list[Example]]:
    """(train, test): shuffled with ``random.Random(seed)``, then split.

    test gets ``max(1, round(len * test_fraction))`` examples when
    test_fraction > 0 (at most ``len - 1``, so train is never empty) and none
    when it is 0. The input is not modified.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    if test_fraction == 0:
        return shuffled, []
    if len(shuffled) < 2:
        raise ValueError(f"cannot split {len(shuffled)} example(s) into train and test; "
                         "need at least 2 (or test_fraction=0)")
    n_test = min(max(1, round(len(shuffled) * test_fraction)), len(shuffled) - 1)
    return shuffled[n_test:], shuffled[:n_test]


# ---------------------------------------------------------------------------
# Answers and rewards

# A minus sign counts only where it cannot be a binary operator ("10-5" -> 5).
# Thousands groups must be exactly three digits so "1,2,3" is read as 3.
_NUMBER_RE = re.compile(r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_COMMA_NUMBER_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_BOXED_RE = re.compile(r"\\boxed\s*\{")
# math_verify's parser is superlinear on some inputs (~100 s for 200k chars of
# "1 2 1 2 ..."), and the final answer sits at the end of a response anyway.
_MAX_VERIFY_CHARS = 4096


def _after_last_hashes(text: str) -> str | None:
    """The first non-empty line after the last ``####``, or None if there is none.

    Only one line: a base model often keeps generating after ``#### 18``, and
    the numbers in that run-on text are not its answer.
    """
    at = text.rfind("####")
    if at < 0:
        return None
    for line in text[at + 4:].splitlines():
        if line.strip():
            return line
    return ""


def _last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}``, or None if there is none or it is unclosed."""
    start = None
    for start in _BOXED_RE.finditer(text):
        pass
    if start is None:
        return None
    # Only the last box is tried: retrying earlier ones on a truncated
    # response would make this quadratic in its length.
    depth = 1
    for i in range(start.end(), len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start.end():i]
    return None


def _normalize(answer: str) -> str:
    answer = answer.strip().rstrip(".").strip()
    if _COMMA_NUMBER_RE.fullmatch(answer):
        answer = answer.replace(",", "")
    return answer


def extract_final_answer(text: str) -> str:
    """The final answer in a GSM8K-style reference or a model response.

    In order: what follows the last ``####`` (its first non-empty line); else
    the content of the last ``\\boxed{...}`` (nested braces kept); else the
    last number (sign and decimals kept, thousands commas removed); else the
    whole text. Whitespace and a trailing period are stripped either way.
    """
    after = _after_last_hashes(text)
    if after is not None:
        return _normalize(after)
    boxed = _last_boxed(text)
    if boxed is not None:
        return _normalize(boxed)
    last = None
    for last in _NUMBER_RE.finditer(text):
        pass
    if last is not None:
        return _normalize(last.group())
    return _normalize(text)


def _reference_answer(answer: str) -> str:
    """The final answer in a reference: marked by ``####`` or a box, else all of it.

    Unlike a response, a reference without a marker is the answer itself, and
    the last-number rule would turn ``\\frac{1}{2}`` into ``2`` and ``x^2+1``
    into ``1``, rewarding responses that say so.
    """
    if "####" in answer or _BOXED_RE.search(answer):
        return extract_final_answer(answer)
    return _normalize(answer)


def _extracted_match(completion: str, answer: str) -> bool:
    """Final answers equal as strings, or as numbers to a 1e-6 relative tolerance."""
    pred, gold = extract_final_answer(completion), _reference_answer(answer)
    if not pred or not gold:
        return False
    if pred == gold:
        return True
    try:
        a, b = float(pred), float(gold)
    except ValueError:
        return False
    return abs(a - b) <= 1e-6 * max(1.0, abs(b))


def math_reward(completion: str, answer: str) -> float:
    """1.0 if the response's final answer equals the reference mathematically, else 0.0.

    answer: a bare final answer (``"18"``, ``"1,234"``, ``"\\frac{1}{2}"``) or a
    solution that marks it with ``####`` or ``\\boxed{}``. Compared with
    math_verify, or by :func:`_extracted_match` when math_verify is missing or
    fails. Never raises on odd responses.
    """
    try:
        return 1.0 if _math_equal(completion, answer) else 0.0
    except Exception:  # noqa: BLE001
        # A reward function that raises stops the run; an unreadable response
        # is simply wrong.
        return 0.0


def _math_equal(completion: str, answer: str) -> bool:
    after = _after_last_hashes(completion)
    pred_text = (after if after is not None else completion)[-_MAX_VERIFY_CHARS:]
    gold_text = _reference_answer(answer)
    try:
        from math_verify import parse, verify
    except ImportError:
        return _extracted_match(completion, answer)
    try:
        # Timeouts off: math_verify implements them with SIGALRM, which raises
        # outside the main thread; the length cap above bounds the work instead.
        # Gold parsed both as LaTeX ("$...$") and raw; verify accepts any pair.
        gold = (parse(f"${gold_text}$", parsing_timeout=None)
                + parse(gold_text, parsing_timeout=None))
        pred = parse(pred_text, parsing_timeout=None)
        if verify(gold, pred, timeout_seconds=None):
            return True
    except Exception:  # noqa: BLE001 (any math_verify failure: use the fallback)
        return _extracted_match(completion, answer)
    # math_verify reads words as products of symbols ("yes" -> E*s*y) and
    # extracts nothing from a plain-word response, so textual answers
    # only match as identical strings.
    return bool(gold_text) and extract_final_answer(completion) == gold_text


def exact_match_reward(completion: str, answer: str) -> float:
    """1.0 if the response is the reference answer up to surrounding whitespace, else 0.0."""
    return 1.0 if completion.strip() == answer.strip() else 0.0


REWARDS: dict[str, Callable[[str, str], float]] = {
    "exact": exact_match_reward,
    "math": math_reward,
}


def get_reward(name: str) -> Callable[[str, str], float]:
    """The reward function registered as ``name`` in :data:`REWARDS`."""
    try:
        return REWARDS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown reward {name!r}; choices: {', '.join(REWARDS)}") from None
