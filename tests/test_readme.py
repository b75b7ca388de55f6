"""The README's code runs, its links resolve, and its plot is made from the CSVs.

Every fenced block of README.md is tagged. ```python blocks are run, each in a fresh
process (so one block cannot lean on another's names) in an empty directory, on the
CPU at toy size. A python block preceded by `<!-- skip-test: reason -->` is only
compiled: that is for the few that need a GPU or a download, and the reason must say
which. ```bash blocks are not run: they install packages, build the extension or
train for minutes; the commands they name are covered elsewhere (the install by the
packaging tests, the trainer by tests/test_train_*.py).
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
SKIP = re.compile(r"<!--\s*skip-test:\s*(\S.*?)\s*-->\s*$")
NOT_RUN = {"bash", "sh", "text"}
# Written in parallel by other changes of this release; drop a name once its file exists.
PENDING_LINKS: set[str] = set()
BLOCK_TIMEOUT_S = 180  # a few seconds alone; the shared CI machine can be slow


def readme_blocks():
    """[(language, code, skip reason or None, line number)] of every fenced block."""
    text = README.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((match.group(1), match.group(2), skip.group(1) if skip else None, line))
    return blocks


BLOCKS = readme_blocks()
PYTHON = [(code, skip, line) for lang, code, skip, line in BLOCKS if lang == "python"]


def test_every_block_is_tagged_with_a_known_language():
    assert PYTHON, "README.md has no python block"
    bad = [(line, lang) for lang, _, _, line in BLOCKS if lang not in NOT_RUN | {"python"}]
    assert not bad, f"blocks with no or an unknown language tag (line, tag): {bad}"


def test_skip_markers_are_few_and_only_on_python_blocks():
    skipped = [line for _, skip, line in PYTHON if skip]
    assert len(skipped) <= 2, f"too many skipped python blocks, at lines {skipped}"
    misplaced = [line for lang, _, skip, line in BLOCKS if skip and lang != "python"]
    assert not misplaced, f"skip-test markers on blocks that are never run: {misplaced}"


@pytest.mark.parametrize("code,skip,line", PYTHON, ids=[f"line{b[2]}" for b in PYTHON])
def test_readme_python_block_runs(code, skip, line, tmp_path):
    compile(code, f"README.md:{line}", "exec")
    if skip:
        pytest.skip(f"README.md:{line}: {skip}")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = tmp_path / "block.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, text=True,
                          capture_output=True, timeout=BLOCK_TIMEOUT_S)
    assert proc.returncode == 0, f"README.md:{line} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"


def _anchors(markdown: str) -> set:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", markdown, re.M)}


LINKED_PAGES = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", LINKED_PAGES, ids=[str(p.relative_to(ROOT)) for p in LINKED_PAGES])
def test_links_resolve_inside_the_repository(page):
    """A clone is self-contained: every relative link of the README, the changelog and
    docs/ names a file of the repository, and an anchor a heading of that file."""
    text = page.read_text()
    missing = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert ROOT in resolved.parents, f"{page.name}: {target} leaves the repository"
        if not resolved.exists():
            if str(resolved.relative_to(ROOT)) not in PENDING_LINKS:
                missing.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved.read_text()):
            missing.append(target)
    assert not missing, f"{page.name} links to missing files or headings: {missing}"


def test_readme_is_short_and_has_no_provenance():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert not re.search(r"\bissue\s+#?\d+", text, re.I), "issue numbers belong in the tracker"
    hashes = [h for h in re.findall(r"\b[0-9a-f]{7,40}\b", text) if re.search(r"[a-f]", h)
              and re.search(r"\d", h)]
    assert not hashes, f"commit hashes belong in the CSVs and benchmarks/NOTES.md: {hashes}"


def _load_plot_results():
    import importlib.util
    spec = importlib.util.spec_from_file_location("plot_results", ROOT / "benchmarks" / "plot_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_plot_is_the_one_plot_results_makes(tmp_path):
    pytest.importorskip("matplotlib")
    plot_results = _load_plot_results()
    csv_path = ROOT / "benchmarks" / "results" / "policy_loss_h100.csv"
    assert plot_results.main(["--csv", str(csv_path), "--out", str(tmp_path)]) == 0
    made = sorted(p.name for p in tmp_path.glob("*.png"))
    shown = re.findall(r"!\[[^]]*\]\(docs/benchmarks/([^)]+\.png)\)", README.read_text())
    assert len(shown) == 1 and shown[0] in made, (shown, made)


def test_plot_results_tolerates_new_and_missing_columns(tmp_path):
    pytest.importorskip("matplotlib")
    plot_results = _load_plot_results()
    rows = [  # no commit/torch/best_ms columns; an unknown `load` value and an extra column
        {"timestamp": "2026-01-01T00:00:00", "device": "Toy CPU", "method": m, "tokens": t,
         "H": 8, "V": 32, "median_ms": ms, "peak_extra_mib": mib, "batch": batch, "extra": "x"}
        for m, ms, mib in (("riskpo fused-linear", 1.0, 2.0), ("three matmuls", 0.9, ""))
        for t in (16, 32) for batch in ("dense", "realistic")]
    rows.append(dict(rows[0], timestamp="2026-01-02T00:00:00", median_ms="nan"))  # failed: ignored
    path = tmp_path / "policy_loss_toy.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    chosen = plot_results.latest_rows(plot_results.read_rows(str(path)), "median_ms")
    assert sorted(split for _, split in chosen) == [(("batch", "dense"),), (("batch", "realistic"),)]
    for sizes in chosen.values():
        assert sizes[(16, 8, 32)]["riskpo fused-linear"]["median_ms"] == "1.0"
    out = tmp_path / "png"
    assert plot_results.main(["--csv", str(path), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.glob("*.png")) == [
        "policy_loss_toy-cpu_dense.png", "policy_loss_toy-cpu_realistic.png"]

    bad = tmp_path / "policy_loss_bad.csv"
    bad.write_text("timestamp,device,tokens\n1,cpu,2\n")
    with pytest.raises(ValueError, match="method"):
        plot_results.read_rows(str(bad))
