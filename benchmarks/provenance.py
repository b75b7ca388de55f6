"""What every benchmark row records about the code that ran."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """The short commit of the code that ran, "+dirty" with uncommitted changes.

    RISKPO_COMMIT overrides it: a copy of the tree (the device tool's, on the
    GPU machine) has no history of its own, and its `git rev-parse` named a
    commit that is not the project's (the first H100 run's c93130d)."""
    if os.environ.get("RISKPO_COMMIT"):
        return os.environ["RISKPO_COMMIT"]

    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        return commit + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def append_csv_rows(path: Path, columns: list[str], rows: list[dict]) -> None:
    """Appends ``rows`` to the CSV at ``path``. A file written before a column
    was added is rewritten once with the new header, its old rows' new
    columns left empty, so one file never mixes two headers."""
    import csv

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            if header != columns:
                missing = [c for c in header if c not in columns]
                if missing:
                    raise ValueError(f"{path} has columns {missing} this benchmark does not write")
                old = list(reader)
                with path.open("w", newline="") as out:
                    writer = csv.DictWriter(out, fieldnames=columns)
                    writer.writeheader()
                    writer.writerows(old)
    new = not path.exists() or not path.stat().st_size
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)
