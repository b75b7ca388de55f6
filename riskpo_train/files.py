"""The files of a run: metrics.jsonl read back, and every file a run writes
(checkpoint, config, summary, metrics) written through a temporary sibling, an
fsync and a rename, so that a process killed mid-write leaves the previous
version whole. Temporaries of killed writes are removed, never read."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import torch


def read_records(path: Path) -> list[dict]:
    """Every record of a metrics.jsonl, in file order; [] when there is no file.

    A last line that does not parse is dropped (the run was killed mid-write);
    a malformed line anywhere else is an error naming the file and the line.
    """
    path = Path(path)
    if not path.is_file():
        return []
    # Lines are decoded one by one so that a multi-byte character cut off by a
    # kill only spoils the last line, which is then dropped like any partial line.
    lines = [(n, raw) for n, raw in enumerate(path.read_bytes().split(b"\n"), start=1)
             if raw.strip()]
    records: list[dict] = []
    for i, (lineno, raw) in enumerate(lines):
        try:
            record = json.loads(raw.decode("utf-8"))
            problem = None if isinstance(record, dict) else "not a JSON object"
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError included
            problem = str(exc)
        if problem is not None:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{lineno}: malformed record: {problem}")
        records.append(record)
    return records


def keep_records_up_to(path: Path, step: int) -> None:
    """Drop records of steps after ``step``: a resumed run rewrites them."""
    if not path.exists():
        return
    kept = [r for r in read_records(path) if r.get("step", 0) <= step] if step else []
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def remove_stale_temporaries(path: Path) -> None:
    """Delete ``path``'s temporary siblings (``NAME.tmp-PID``) that an earlier
    save, killed before its rename, left behind. They are never read: only
    ``path`` itself is. A file whose PID is another live process is left
    alone: that process may be writing it."""
    for tmp in Path(path).parent.glob(glob.escape(Path(path).name) + ".tmp-*"):
        pid = tmp.name.rpartition(".tmp-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and _process_exists(int(pid)):
            continue
        if tmp.is_file() or tmp.is_symlink():
            tmp.unlink(missing_ok=True)


def _process_exists(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except PermissionError:
        return True  # another user's process
    except (ProcessLookupError, OverflowError):
        return False
    return True


def _atomic_write(path: Path, mode: str, write) -> None:
    """``write(file)`` into a temporary sibling, fsync, rename over ``path``,
    fsync the directory: ``path`` is always whole, the old or the new version.
    Temporary files of earlier, killed writes are removed first."""
    remove_stale_temporaries(path)
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # Make the rename itself durable.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, "w", lambda f: f.write(text))


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` through :func:`_atomic_write`: a process killed mid-save
    leaves the previous checkpoint whole."""
    _atomic_write(path, "wb", lambda f: torch.save(obj, f))
