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
