"""A busy core for the benchmarks' ``--loaded`` mode.

Trainers run the advantage and loss ops on a driver process that shares its
CPU with data loading, tokenisation, reward workers and Ray actors. An OpenMP
parallel region that waits for a thread the OS has descheduled then costs
milliseconds instead of microseconds (issue 19). ``busy_core()`` starts a
process that spins on one core (the last one this process may use, so the
benchmark's first thread keeps core 0) until the context exits; timings taken
inside it are the loaded medians the benchmarks print beside the quiet ones.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time


def _spin(core: int | None, ready, stop) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})
    ready.set()
    x = 0
    while not stop.is_set():  # pure Python arithmetic: one core at 100%, no memory traffic
        for _ in range(10000):
            x = (x * 1103515245 + 12345) & 0x7FFFFFFF


def busy_core_index() -> int | None:
    """The core the spinner is pinned to: the highest this process may use,
    or None where affinity cannot be set (it then runs wherever the OS puts it)."""
    try:
        return max(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


@contextlib.contextmanager
def busy_core():
    """Keeps one core busy (a spinning process pinned to it) while the block runs."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding OpenMP threads
    ready, stop = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_spin, args=(busy_core_index(), ready, stop), daemon=True)
    proc.start()
    # A spawned child re-imports the benchmark's main module (torch included)
    # before it spins: wait for it, so no timing sees a half-started load.
    deadline = time.monotonic() + 120
    while not ready.wait(timeout=0.2):
        if not proc.is_alive() or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the busy-core process did not start (exit code {proc.exitcode})")
    time.sleep(0.1)
    try:
        yield proc
    finally:
        stop.set()
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
            proc.join()
