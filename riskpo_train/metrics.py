"""Per-step records: metrics.jsonl (and TensorBoard scalars when installed)
while a run goes, and the summary of a finished run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from .config import TrainConfig
from .files import read_records

# Per-step record fields that measure the machine, not the training.
TIMING_FIELDS = ("tokens_per_s", "step_s")


class MetricsWriter:
    """metrics.jsonl lines (flushed per record) and TensorBoard scalars when
    TensorBoard is installed; only rank 0 writes."""

    def __init__(self, path: Path, out: Path, enabled: bool):
        self.file = open(path, "a") if enabled else None
        self.board = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.board = SummaryWriter(str(out / "tensorboard"))
            except ImportError:  # TensorBoard is optional
                self.board = None

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.board.add_scalar(f"{record['kind']}/{key}", value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()


def summarise(metrics_path: Path, cfg: TrainConfig, wall_s: float) -> dict:
    records = read_records(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    # The per-question counts stay in metrics.jsonl: a summary is for reading.
    evals = [{k: v for k, v in r.items() if k != "correct"}
             for r in records if r.get("kind") == "eval"]
    return {
        "algo": cfg.algo, "seed": cfg.seed, "steps": train[-1]["step"] if train else 0,
        "final_eval": evals[-1] if evals else None, "first_eval": evals[0] if evals else None,
        "final_train": train[-1] if train else None,
        "skipped_updates": sum(r.get("skipped_updates", 0) for r in train),
        "reward_errors": sum(r.get("reward_errors", 0) for r in train),
        "wall_s": wall_s,
        "versions": {"torch": torch.__version__, "python": sys.version.split()[0]},
    }
