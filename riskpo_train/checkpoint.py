"""What a checkpoint holds, and reading one back with every entry checked
(writing goes through files.atomic_torch_save)."""

from __future__ import annotations

from pathlib import Path

import torch

CHECKPOINT = "checkpoint.pt"
# Settings that may change between a run and its resumption. out and
# warmup_cache are places, not settings: a run directory (or the cache) that
# was moved resumes from its new place. (The warm-up cache is keyed by every
# setting its weights depend on, and those settings must not change.) recipe
# is a name: every value it set is compared on its own.
RESUMABLE_CHANGES = {"resume", "rl_steps", "progress", "save_every", "device", "out",
                     "warmup_cache", "recipe"}
# What a checkpoint holds, with the types each entry must have.
CHECKPOINT_ENTRIES = {"step": int, "config": dict, "model": dict, "optimizer": dict,
                      "tracker": (dict, type(None)), "rng": dict}


def read_checkpoint(path: Path) -> dict:
    """The checkpoint at ``path``, checked to hold what :meth:`Trainer.save_checkpoint`
    writes (tensors and plain data only: ``weights_only`` loading runs no code).
    FileNotFoundError or ValueError naming the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (pickle, zip and EOF errors alike)
        raise ValueError(f"--resume: {path} is not a readable checkpoint (truncated, corrupted, "
                         f"or not written by riskpo-train): {type(exc).__name__}: "
                         f"{brief(exc)}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"--resume: {path} is not a riskpo-train checkpoint: it holds a "
                         f"{type(state).__name__}, not a dict")
    missing = [key for key in CHECKPOINT_ENTRIES if key not in state]
    if missing:
        raise ValueError(f"--resume: {path} is not a riskpo-train checkpoint: it lacks "
                         f"{', '.join(missing)}")
    for key, typ in CHECKPOINT_ENTRIES.items():
        if not isinstance(state[key], typ) or isinstance(state[key], bool):
            raise ValueError(f"--resume: {path}: malformed entry {key!r} "
                             f"({type(state[key]).__name__})")
    if state["step"] < 0:
        raise ValueError(f"--resume: {path}: negative step {state['step']}")
    missing = [key for key in ("torch", "python", "cuda") if key not in state["rng"]]
    if missing:
        raise ValueError(f"--resume: {path}: the random-generator state lacks "
                         f"{', '.join(missing)}")
    return state


def brief(exc: BaseException) -> str:
    """An exception's message on one line, shortened; for a refused
    weights-only load, only what was refused (not torch's advice to load the
    file with weights_only=False, which would run whatever code it holds)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    refused = text.find("WeightsUnpickler error:")
    if refused >= 0:
        text = ("it holds objects other than tensors and plain data ("
                + text[refused + len("WeightsUnpickler error:"):].strip().split(". ")[0] + ")")
    text = text or "(no message)"
    return text if len(text) <= 300 else text[:300] + "..."
