"""riskpo_train.data: loading prompt/answer files, splitting, answer extraction, rewards."""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time

import pytest

from riskpo_train.data import (
    REWARDS,
    Example,
    exact_match_reward,
    extract_final_answer,
    get_reward,
    load_examples,
    math_reward,
    split_examples,
)

ROWS = [
    {"prompt": "What is 2+2?", "answer": "4"},
    {"prompt": "Half of one?", "answer": 0.5},
    {"prompt": "Ten times three?", "answer": 30},
]
EXPECTED = [Example("What is 2+2?", "4"), Example("Half of one?", "0.5"),
            Example("Ten times three?", "30")]

# What math-verify accepts (make test installs it; a bare GPU image may lack it).
needs_math_verify = pytest.mark.skipif(importlib.util.find_spec("math_verify") is None,
                                       reason="math-verify is not installed")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path, columns):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table(columns), path)
    return path


# ---------------------------------------------------------------------------
# load_examples


def test_jsonl_round_trip_skips_blank_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    lines = [json.dumps(row) for row in ROWS]
    path.write_text(lines[0] + "\n\n   \n" + "\n".join(lines[1:]) + "\n\n", encoding="utf-8")
    assert load_examples(path) == EXPECTED
    assert load_examples(str(path)) == EXPECTED


def test_parquet_round_trip(tmp_path):
    path = write_parquet(tmp_path / "data.parquet",
                         {"prompt": ["What is 2+2?", "Half of one?"], "answer": ["4", "0.5"]})
    assert load_examples(path) == EXPECTED[:2]


def test_parquet_numeric_answer_column(tmp_path):
    path = write_parquet(tmp_path / "data.parquet",
                         {"prompt": ["a", "b"], "answer": [3, 41]})
    assert [ex.answer for ex in load_examples(path)] == ["3", "41"]
    path = write_parquet(tmp_path / "floats.parquet",
                         {"prompt": ["a", "b"], "answer": [3.0, 0.25]})
    assert [ex.answer for ex in load_examples(path)] == ["3.0", "0.25"]


def test_custom_column_names(tmp_path):
    rows = [{"question": "q1", "solution": "#### 7", "prompt": "ignored", "answer": "x"}]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    assert load_examples(path, prompt_key="question", answer_key="solution") == [
        Example("q1", "#### 7")]
    path = write_parquet(tmp_path / "data.parquet", {"question": ["q1"], "solution": [7]})
    assert load_examples(path, prompt_key="question", answer_key="solution") == [
        Example("q1", "7")]


def test_limit_keeps_first_rows(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", ROWS)
    assert load_examples(path, limit=2) == EXPECTED[:2]
    assert load_examples(path, limit=100) == EXPECTED
    path = write_parquet(tmp_path / "data.parquet",
                         {"prompt": [r["prompt"] for r in ROWS],
                          "answer": [str(r["answer"]) for r in ROWS]})
    assert load_examples(path, limit=1) == EXPECTED[:1]


def test_limit_stops_reading_before_a_bad_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n", encoding="utf-8")
    assert load_examples(path, limit=1) == EXPECTED[:1]


@pytest.mark.parametrize("limit", [0, -1, 1.5, True])
def test_bad_limit(tmp_path, limit):
    path = write_jsonl(tmp_path / "data.jsonl", ROWS)
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        load_examples(path, limit=limit)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_examples(path)


def test_unknown_extension_lists_accepted(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,answer\nq,1\n")
    with pytest.raises(ValueError, match=r"data\.csv.*'\.csv'.*\.jsonl, \.parquet"):
        load_examples(path)


def test_malformed_json_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n{\"prompt\": \"q\", \"answer\": \n",
                    encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: malformed JSON"):
        load_examples(path)


def test_jsonl_line_must_be_an_object(tmp_path):
    path = tmp_path / "list.jsonl"
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"list\.jsonl, row 0 \(line 1\): expected a JSON object"):
        load_examples(path)


def test_jsonl_missing_column_names_it_and_lists_present(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl",
                       [ROWS[0], {"question": "q", "answer": "1"}])
    with pytest.raises(ValueError, match=r"data\.jsonl, row 1 \(line 2\): missing column "
                                         r"'prompt'; columns present: \['answer', 'question'\]"):
        load_examples(path)
    with pytest.raises(ValueError, match=r"missing column 'solution'"):
        load_examples(path, answer_key="solution")


def test_parquet_missing_column_names_it_and_lists_present(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", {"question": ["q"], "answer": ["1"]})
    with pytest.raises(ValueError, match=r"data\.parquet: missing column 'prompt'; "
                                         r"columns present: \['question', 'answer'\]"):
        load_examples(path)


def test_empty_prompt_names_row(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [ROWS[0], {"prompt": "  ", "answer": "1"}])
    with pytest.raises(ValueError, match=r"data\.jsonl, row 1 \(line 2\): empty 'prompt'"):
        load_examples(path)
    path = write_parquet(tmp_path / "data.parquet", {"prompt": ["q", "", "r"],
                                                     "answer": ["1", "2", "3"]})
    with pytest.raises(ValueError, match=r"data\.parquet, row 1: empty 'prompt'"):
        load_examples(path)


def test_null_answer_names_row(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [ROWS[0], ROWS[1], {"prompt": "q", "answer": None}])
    with pytest.raises(ValueError, match=r"data\.jsonl, row 2 \(line 3\): null 'answer'"):
        load_examples(path)
    path = write_parquet(tmp_path / "data.parquet", {"prompt": ["q", "r"], "answer": [1.5, None]})
    with pytest.raises(ValueError, match=r"data\.parquet, row 1: null 'answer'"):
        load_examples(path)


@pytest.mark.parametrize("row, message", [
    ({"prompt": 5, "answer": "1"}, r"'prompt' must be a string, got int"),
    ({"prompt": "q", "answer": [1]}, r"'answer' must be a string or number, got list"),
    ({"prompt": "q", "answer": True}, r"'answer' must be a string or number, got bool"),
    ({"prompt": "q", "answer": " "}, r"empty 'answer'"),
])
def test_bad_cell_types(tmp_path, row, message):
    path = write_jsonl(tmp_path / "data.jsonl", [row])
    with pytest.raises(ValueError, match=r"data\.jsonl, row 0 \(line 1\): " + message):
        load_examples(path)


def test_zero_rows(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.jsonl: the file has no rows"):
        load_examples(path)
    pa = pytest.importorskip("pyarrow")
    path = write_parquet(tmp_path / "empty.parquet",
                         {"prompt": pa.array([], pa.string()), "answer": pa.array([], pa.string())})
    with pytest.raises(ValueError, match=r"empty\.parquet: the file has no rows"):
        load_examples(path)


def test_corrupt_parquet_names_file(tmp_path):
    path = tmp_path / "junk.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(ValueError, match=r"junk\.parquet: not a readable parquet file"):
        load_examples(path)


# ---------------------------------------------------------------------------
# split_examples


def numbered(n):
    return [Example(f"q{i}", str(i)) for i in range(n)]


def test_split_sizes_and_disjoint_cover():
    examples = numbered(10)
    train, test = split_examples(examples, 0.25, seed=0)
    assert len(test) == 2  # round(2.5) == 2
    assert len(train) == 8
    assert sorted(train + test, key=lambda e: int(e.answer)) == examples
    assert examples == numbered(10)  # input untouched


def test_split_is_deterministic_and_seeded():
    examples = numbered(50)
    assert split_examples(examples, 0.2, seed=3) == split_examples(examples, 0.2, seed=3)
    assert split_examples(examples, 0.2, seed=3) != split_examples(examples, 0.2, seed=4)
    train, test = split_examples(examples, 0.2, seed=3)
    assert train + test != examples  # shuffled, not the file order


def test_split_gives_at_least_one_test_and_one_train_example():
    assert [len(part) for part in split_examples(numbered(3), 0.01, seed=0)] == [2, 1]
    assert [len(part) for part in split_examples(numbered(2), 0.9, seed=0)] == [1, 1]


def test_split_zero_fraction_keeps_everything_in_train():
    train, test = split_examples(numbered(1), 0.0, seed=0)
    assert (train, test) == (numbered(1), [])


def test_split_errors():
    with pytest.raises(ValueError, match="need at least 2"):
        split_examples(numbered(1), 0.5, seed=0)
    with pytest.raises(ValueError, match="need at least 2"):
        split_examples([], 0.5, seed=0)
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="test_fraction must be in"):
            split_examples(numbered(4), bad, seed=0)


# ---------------------------------------------------------------------------
# extract_final_answer


@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 1,234", "1234"),
    ("#### 72", "72"),
    ("Uses #### twice #### 5.", "5"),
    ("#### 18\nQuestion: what is 40 + 2? 42", "18"),  # run-on text after the answer
    ("so the area is \\boxed{\\frac{1}{\\sqrt{2}}} square units", "\\frac{1}{\\sqrt{2}}"),
    ("\\boxed{3} at first, then \\boxed{ {4} }.", "{4}"),
    ("\\boxed{1,000}", "1000"),
    ("The answer is 18.", "18"),
    ("He has 3 apples and then 12 pears", "12"),
    ("The temperature fell to -3.5.", "-3.5"),
    ("It cost $1,234,567.25 in total", "1234567.25"),
    ("10-5 leaves 5", "5"),
    ("no digits here.", "no digits here"),
    ("  42  ", "42"),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_extract_final_answer_unclosed_box_falls_back_to_last_number():
    assert extract_final_answer("so 7 \\boxed{\\frac{1}{2") == "2"


# ---------------------------------------------------------------------------
# rewards


@pytest.mark.parametrize("completion, answer", [
    ("The answer is 18.", "18"),
    ("18", "The answer is 18."),
    ("#### 18", "18"),
    ("Half is 3 + 6 = 9.\n#### 9", "Some working 3 + 6 = 9\n#### 9"),
    ("so \\boxed{\\frac{1}{2}}", "0.5"),
    ("so \\boxed{0.5}", "\\frac{1}{2}"),
    ("The total is 1,234 dollars", "#### 1,234"),
    ("x = -3.5", "-3.5"),
    ("#### 18\nQuestion: what is 40 + 2? 42", "18"),
    ("\\boxed{x^2 + 1}", "x^2+1"),
    # math_verify reads a bare "(1, 2)" in prose as 2; it needs LaTeX delimiters.
    ("so it is $(1, 2)$.", "(1,2)"),
    ("yes", "yes"),  # math_verify parses neither; the string comparison does
])
@needs_math_verify
def test_math_reward_right(completion, answer):
    assert math_reward(completion, answer) == 1.0


@pytest.mark.parametrize("completion, answer", [
    ("The answer is 17.", "18"),
    ("#### 18", "#### 81"),
    ("\\boxed{\\frac{1}{3}}", "0.5"),
    ("-5", "5"),
    ("18 apples, so 20 left", "18"),
    ("no", "yes"),
    # A bare reference is the answer as a whole, not its last number.
    ("2", "\\frac{1}{2}"),
    ("The answer is 1", "x^2+1"),
])
@needs_math_verify
def test_math_reward_wrong(completion, answer):
    assert math_reward(completion, answer) == 0.0


@pytest.mark.parametrize("completion", [
    "", "   ", "\x00\x01garbage ### }}{{", "\\boxed{", "\\boxed{\\frac{", "$$$$", "\\", "{" * 5000,
    "\\frac{1}{0}", "nan", "inf",
])
@needs_math_verify
def test_math_reward_odd_completions_score_zero(completion):
    assert math_reward(completion, "18") == 0.0


@needs_math_verify
def test_math_reward_huge_completion_is_fast():
    # Without the length cap math_verify spends about 100 s parsing this (an
    # anchor such as "the answer is" would let it skip the long search).
    completion = "1 2 " * 50_000 + "18"
    start = time.perf_counter()
    assert math_reward(completion, "18") == 1.0
    assert math_reward(completion, "19") == 0.0
    assert time.perf_counter() - start < 5.0


@needs_math_verify
def test_math_reward_outside_main_thread():
    # math_verify's default timeouts use SIGALRM, which raises off the main
    # thread; the reward must then still compare rather than score 0.
    results = []
    thread = threading.Thread(target=lambda: results.append(
        math_reward("so \\boxed{\\frac{1}{2}}", "0.5")))
    thread.start()
    thread.join()
    assert results == [1.0]


FALLBACK_CASES = [
    ("The answer is 18.", "18", 1.0),
    ("#### 1,234", "1234", 1.0),
    ("so 18.0000001", "18", 1.0),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{x+1}", "#### x+1", 1.0),
    ("The answer is 17.", "18", 0.0),
    ("18.01", "18", 0.0),
    ("", "18", 0.0),
    ("garbage", "18", 0.0),
]


@pytest.mark.parametrize("completion, answer, expected", FALLBACK_CASES)
def test_math_reward_without_math_verify(monkeypatch, completion, answer, expected):
    monkeypatch.setitem(sys.modules, "math_verify", None)  # import raises ImportError
    with pytest.raises(ImportError):
        import math_verify  # noqa: F401
    assert math_reward(completion, answer) == expected


@pytest.mark.parametrize("completion, answer, expected", FALLBACK_CASES)
def test_math_reward_when_math_verify_raises(monkeypatch, completion, answer, expected):
    math_verify = pytest.importorskip("math_verify")

    def boom(*args, **kwargs):
        raise RuntimeError("math_verify failed")

    monkeypatch.setattr(math_verify, "verify", boom)
    assert math_reward(completion, answer) == expected


@needs_math_verify
def test_math_verify_fallback_is_what_scores_a_fraction_against_a_decimal(monkeypatch):
    # Only math_verify knows \frac{1}{2} == 0.5; the string fallback does not.
    assert math_reward("\\boxed{\\frac{1}{2}}", "0.5") == 1.0
    monkeypatch.setitem(sys.modules, "math_verify", None)
    assert math_reward("\\boxed{\\frac{1}{2}}", "0.5") == 0.0


def test_exact_match_reward():
    assert exact_match_reward(" 42\n", "42") == 1.0
    assert exact_match_reward("42", " 42 ") == 1.0
    assert exact_match_reward("420", "42") == 0.0
    assert exact_match_reward("42.0", "42") == 0.0
    assert exact_match_reward("", "42") == 0.0


def test_reward_registry():
    assert REWARDS == {"exact": exact_match_reward, "math": math_reward}
    assert get_reward("exact") is exact_match_reward
    assert get_reward("math") is math_reward
    with pytest.raises(ValueError, match=r"unknown reward 'bleu'; choices: exact, math"):
        get_reward("bleu")
