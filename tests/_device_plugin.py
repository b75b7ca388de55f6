"""pytest plugin for benchmarks/device_check.sh: answers that survive a killed run.

Inert unless its environment variables are set (a plain `pytest` / `make test`
only gets the `gpu` marker's registration). tests/conftest.py registers it; the
device check also loads it with `-p _device_plugin` (tests/ on PYTHONPATH), so
it works for test files outside tests/ too.

RISKPO_FAILURE_LOG=path  (on the xdist controller, or the single pytest process)
    appends each failed / errored / timed-out / crashed test's nodeid and
    traceback (plus captured output) to `path` as the report arrives, and
    flushes: a run killed by its time limit still says what failed and why.
    Also the file the hard timeout below dumps a hung process's stacks into.
RISKPO_TEST_COUNTS=path  (controller only; taken out of the environment so that
    a nested pytest does not overwrite it)
    keeps a small JSON file up to date after every report: outcome counts,
    collected, the tests running now, the failures' one-line reasons, the
    slowest tests so far, and whether the session finished.
RISKPO_TEST_RUN=label    names the run in both files.
RISKPO_TEST_TIMEOUT=N    per-test limit in seconds (setup + call + teardown):
    - soft: SIGALRM in the main thread fails the test with "timed out after N s"
      and its traceback, unless pytest-timeout is active (--timeout) and does it;
    - hard: N + RISKPO_TEST_TIMEOUT_GRACE (default 30) seconds, for a hang the
      signal cannot interrupt (inside C/CUDA code): a watchdog thread writes
      "HARD TIMEOUT <nodeid>" and every thread's stack to the failure log (or
      stderr) and ends the process; faulthandler.dump_traceback_later(...,
      exit=True) 10 s later is the backstop where the hang holds the GIL.
      Under xdist the controller then reports the worker's crash.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import threading
import time

import pytest

FAILURE_LOG = "RISKPO_FAILURE_LOG"
COUNTS = "RISKPO_TEST_COUNTS"
RUN_LABEL = "RISKPO_TEST_RUN"
TIMEOUT = "RISKPO_TEST_TIMEOUT"
GRACE = "RISKPO_TEST_TIMEOUT_GRACE"

GPU_MARKER = ("gpu: can touch CUDA or the Triton kernels on a card; set by tests/conftest.py "
              "(benchmarks/device_check.sh runs these first)")
MAX_ENTRY_CHARS = 30_000      # one failure's text in the log, head and tail kept
MAX_SECTION_CHARS = 4_000     # each captured-output section, tail kept
MAX_LOG_BYTES = 12 * 2**20    # the device tool returns files up to 16 MiB
SOFT_TIMEOUT_TEXT = "timed out after"
PYTEST_TIMEOUT_TEXT = "Timeout (>"  # pytest-timeout's failure message


def _clip(text: str, limit: int, keep_head: bool = True) -> str:
    if len(text) <= limit:
        return text
    if not keep_head:
        return f"[... {len(text) - limit} characters left out ...]\n" + text[-limit:]
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - limit} characters left out ...]\n{text[-half:]}"


def _worker_id(config) -> str:
    return getattr(config, "workerinput", {}).get("workerid", "")


def is_timeout_text(text: str) -> bool:
    return SOFT_TIMEOUT_TEXT in text or PYTEST_TIMEOUT_TEXT in text


class FailureRecorder:
    """Controller side: the failure log and the counts file."""

    def __init__(self, config, log_path: str | None, counts_path: str | None, label: str):
        self.config = config
        self.log_path = log_path
        self.counts_path = counts_path
        self.label = label
        self.started = time.time()
        self.collected: int | None = None
        self.outcomes: dict[str, str] = {}
        self.running: dict[str, float] = {}
        self.failures: list[dict] = []
        self.durations: dict[str, float] = {}
        self.finished = False
        self.exitstatus: int | None = None
        self.interrupted = False
        self.log_full = False

    # -- writing -----------------------------------------------------------
    def write_log(self, text: str) -> None:
        if not self.log_path or self.log_full:
            return
        try:
            if os.path.exists(self.log_path) and os.path.getsize(self.log_path) > MAX_LOG_BYTES:
                self.log_full = True
                text = f"##### failure log over {MAX_LOG_BYTES >> 20} MiB: later failures only in the counts and tests.log\n"
            with open(self.log_path, "a", encoding="utf-8", errors="replace") as f:
                f.write(text)
                f.flush()
        except OSError as error:  # never let the log break the run
            print(f"riskpo device plugin: cannot write {self.log_path}: {error}", file=sys.stderr)

    def counts(self) -> dict:
        tally: dict[str, int] = {}
        for outcome in self.outcomes.values():
            tally[outcome] = tally.get(outcome, 0) + 1
        slowest = sorted(self.durations.items(), key=lambda kv: -kv[1])[:15]
        return {
            "label": self.label, "pid": os.getpid(), "collected": self.collected, "counts": tally,
            "running": sorted(self.running), "failures": self.failures[:200],
            "slowest": [[round(d, 2), n] for n, d in slowest], "finished": self.finished,
            "exitstatus": self.exitstatus, "interrupted": self.interrupted,
            "elapsed_s": round(time.time() - self.started, 1),
        }

    def write_counts(self) -> None:
        if not self.counts_path:
            return
        tmp = f"{self.counts_path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(self.counts(), f)
            os.replace(tmp, self.counts_path)
        except OSError as error:
            print(f"riskpo device plugin: cannot write {self.counts_path}: {error}", file=sys.stderr)

    # -- hooks -------------------------------------------------------------
    def pytest_sessionstart(self, session):
        args = " ".join(self.config.invocation_params.args)
        self.write_log(f"##### {self.label}: pytest started {time.strftime('%H:%M:%S')} "
                       f"(pid {os.getpid()}): pytest {args}\n")
        self.write_counts()

    def pytest_collection_finish(self, session):
        self.collected = len(session.items)
        self.write_counts()

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids):
        self.collected = max(self.collected or 0, len(ids))
        self.write_counts()

    def pytest_runtest_logstart(self, nodeid, location):
        self.running[nodeid] = time.time()
        self.write_counts()

    def pytest_runtest_logreport(self, report):
        nodeid, when = report.nodeid, report.when
        self.durations[nodeid] = self.durations.get(nodeid, 0.0) + (getattr(report, "duration", 0.0) or 0.0)
        outcome = None
        if report.failed:
            text = report.longreprtext or ""
            if when == "???":
                outcome = "crashed"
            elif is_timeout_text(text):
                outcome = "timeout"
            else:
                outcome = "failed" if when == "call" else "error"
            self.record_failure(report, outcome)
        elif report.skipped and when in ("setup", "call"):
            outcome = "xfailed" if hasattr(report, "wasxfail") else "skipped"
        elif report.passed and when == "call":
            outcome = "xpassed" if hasattr(report, "wasxfail") else "passed"
        if outcome is not None and self.outcomes.get(nodeid) not in ("failed", "error", "timeout", "crashed"):
            self.outcomes[nodeid] = outcome
        if when in ("teardown", "???"):
            self.running.pop(nodeid, None)
        self.write_counts()

    def record_failure(self, report, outcome: str) -> None:
        text = report.longreprtext or "(no traceback)"
        crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
        message = getattr(crash, "message", None) or next(
            (line.strip() for line in reversed(text.splitlines()) if line.strip()), "")
        node = getattr(report, "node", None)  # xdist: the worker the report came from
        worker = getattr(getattr(node, "gateway", None), "id", "") if node is not None else ""
        self.failures.append({"nodeid": report.nodeid, "outcome": outcome, "when": report.when,
                              "worker": worker, "message": _clip(message.splitlines()[0] if message else "", 300)})
        head = (f"=== {outcome.upper()} {report.nodeid} ({report.when} phase, "
                f"{getattr(report, 'duration', 0.0) or 0.0:.1f} s{', ' + worker if worker else ''}, "
                f"{time.strftime('%H:%M:%S')}, {self.label})\n")
        body = _clip(text, MAX_ENTRY_CHARS)
        if outcome == "crashed":
            body += ("\n(a hard per-test timeout ends the process after writing 'HARD TIMEOUT' and its "
                     "stacks above in this file; otherwise the worker died on its own)")
        sections = "".join(f"--- {name} ---\n{_clip(content, MAX_SECTION_CHARS, keep_head=False)}\n"
                           for name, content in getattr(report, "sections", []) if content.strip())
        self.write_log(head + body.rstrip("\n") + "\n" + sections + "\n")

    def pytest_keyboard_interrupt(self, excinfo):
        self.interrupted = True
        self.write_log(f"##### {self.label}: interrupted {time.strftime('%H:%M:%S')} (time limit?) "
                       f"while running: {', '.join(sorted(self.running)) or 'nothing'}\n")
        self.write_counts()

    def pytest_sessionfinish(self, session, exitstatus):
        self.finished = True
        self.exitstatus = int(exitstatus)
        tally = self.counts()["counts"]
        summary = ", ".join(f"{n} {k}" for k, n in sorted(tally.items())) or "no tests"
        self.write_log(f"##### {self.label}: pytest finished {time.strftime('%H:%M:%S')}, "
                       f"exit {self.exitstatus}: {summary}\n")
        self.write_counts()


class Timeouts:
    """Test side (xdist worker or the single pytest process): per-test limits."""

    def __init__(self, config, soft: float, grace: float, log_path: str | None):
        self.config = config
        self.soft = soft
        self.hard = soft + grace
        self.log_path = log_path
        self.use_signal = not self.timeout_plugin_active(config) and hasattr(signal, "setitimer")
        self.fault_file = None
        if log_path:
            try:  # kept open: faulthandler writes to its file descriptor
                self.fault_file = open(log_path, "a", encoding="utf-8", errors="replace")
            except OSError:
                self.fault_file = None

    @staticmethod
    def timeout_plugin_active(config) -> bool:
        if not config.pluginmanager.hasplugin("timeout"):
            return False
        value = config.getoption("timeout", None)
        if value is None:
            value = os.environ.get("PYTEST_TIMEOUT") or config.getini("timeout")
        try:
            return float(value or 0) > 0
        except (TypeError, ValueError):
            return False

    def _out(self):
        return self.fault_file or sys.stderr

    def _hard_timeout(self, nodeid: str) -> None:
        out = self._out()
        where = _worker_id(self.config) or f"pid {os.getpid()}"
        try:
            out.write(f"=== HARD TIMEOUT {nodeid} still running after {self.hard:g} s ({where}, "
                      f"{time.strftime('%H:%M:%S')}): every thread's stack, then this process ends\n")
            out.flush()
            faulthandler.dump_traceback(file=out, all_threads=True)
            out.write("\n")
            out.flush()
        finally:
            os._exit(70)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        soft = self.soft
        previous = None
        use_signal = self.use_signal and threading.current_thread() is threading.main_thread()
        if use_signal:
            def on_alarm(signum, frame):
                __tracebackhide__ = True
                pytest.fail(f"{SOFT_TIMEOUT_TEXT} {soft:g} s (the per-test limit, {TIMEOUT}); "
                            "the traceback shows where it was", pytrace=True)
            previous = signal.signal(signal.SIGALRM, on_alarm)
            signal.setitimer(signal.ITIMER_REAL, soft)
        watchdog = threading.Timer(self.hard, self._hard_timeout, args=(item.nodeid,))
        watchdog.daemon = True
        watchdog.start()
        faulthandler.dump_traceback_later(self.hard + 10, exit=True, file=self._out())
        try:
            return (yield)
        finally:
            faulthandler.cancel_dump_traceback_later()
            watchdog.cancel()
            if use_signal:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)


def _float_env(name: str, default: float | None) -> float | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return float(value)
    except ValueError:
        raise pytest.UsageError(f"{name}={value!r}: expected a number of seconds") from None


def pytest_configure(config):
    if not any(line.split(":")[0].strip() == "gpu" for line in config.getini("markers")):
        config.addinivalue_line("markers", GPU_MARKER)
    manager = config.pluginmanager
    log_path = os.environ.get(FAILURE_LOG) or None
    if log_path:
        log_path = os.path.abspath(log_path)
    label = os.environ.get(RUN_LABEL) or "pytest"
    if not hasattr(config, "workerinput"):  # the controller, or a run without xdist
        counts_path = os.environ.pop(COUNTS, None) or None
        if (log_path or counts_path) and not manager.has_plugin("riskpo-failure-recorder"):
            if counts_path:
                counts_path = os.path.abspath(counts_path)
            manager.register(FailureRecorder(config, log_path, counts_path, label), "riskpo-failure-recorder")
    soft = _float_env(TIMEOUT, None)
    if soft and soft > 0 and not manager.has_plugin("riskpo-test-timeouts"):
        grace = _float_env(GRACE, 30.0)
        manager.register(Timeouts(config, soft, max(grace, 0.0), log_path), "riskpo-test-timeouts")
