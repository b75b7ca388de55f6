"""The one-screen summary that benchmarks/device_check.sh prints last (summary.txt).

Reads what the script and tests/_device_plugin.py leave behind: the step table
(WORK/steps.tsv: name, result, seconds, note), the pytest runs' counts files,
failures.log and bench.log in OUT. Everything is optional: a step that never ran
is simply not listed. Stays within about 40 lines.

    python benchmarks/summarize_device_check.py --work WORK --out OUT [--mode gpu] \
        [--elapsed S] [--deadline S]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

MAX_FAILED_LINES = 10
WIDTH = 150

ADVANTAGE_COLUMNS = [  # (op, impl, short name)
    ("mvar_advantages", "compiled op", "mvar op"),
    ("mvar_advantages", "compiled op (CUDA graph)", "graph"),
    ("mvar_advantages", "public API (with checks)", "API"),
    ("mvar_advantages", "vectorised reference", "ref"),
    ("mvar_advantages", "loop estimator", "loop"),
    ("grpo_advantages", "compiled op", "grpo op"),
    ("grpo_advantages", "compiled op (CUDA graph)", "graph"),
    ("grpo_advantages", "vectorised reference", "ref"),
]
POLICY_SHORT = {"plain GRPO loss": "plain", "riskpo logits": "rk-logits",
                "riskpo fused-linear": "rk-fused", "liger fused-linear": "lg-fused",
                "liger triton grpo": "lg-grpo", "three matmuls": "matmuls",
                "riskpo fused-linear folded": "rk-folded",
                "three matmuls (valid rows)": "mm-valid"}
# The fused-linear implementations whose measured medians set
# backends.FUSED_LINEAR_AUTO on CUDA, by the name bench_policy_loss.py prints.
FUSED_CANDIDATES = {"riskpo fused-linear": "triton", "riskpo fused-linear folded": "triton-folded"}


def clip(text: str, width: int = WIDTH) -> str:
    text = " ".join(text.splitlines()).rstrip()
    return text if len(text) <= width else text[: width - 3] + "..."


def read_steps(work: Path) -> list[dict]:
    steps = []
    path = work / "steps.tsv"
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            name, result, seconds, note = (line.split("\t") + ["", "", ""])[:4]
            if name:
                steps.append(dict(name=name, result=result, seconds=seconds, note=note))
    return steps


def note_fields(note: str) -> dict:
    return dict(kv.split("=", 1) for kv in note.split() if "=" in kv)


def load_counts(path: str | None) -> dict | None:
    try:
        return json.loads(Path(path).read_text()) if path else None
    except (OSError, ValueError):
        return None


def pytest_details(counts: dict | None, result: str, limit: str | None) -> str:
    if counts is None:
        return "no counts (pytest did not start? see tests.log)"
    tally = dict(counts.get("counts") or {})
    done = sum(tally.values())
    parts = [f"{tally.pop(k)} {k}" for k in ("passed", "failed", "error", "timeout", "crashed",
                                             "skipped", "xfailed", "xpassed") if tally.get(k)]
    parts += [f"{n} {k}" for k, n in tally.items()]
    collected = counts.get("collected")
    if collected is not None and done < collected:
        parts.append(f"{collected - done} not run")
    text = (f"{collected} collected: " if collected is not None else "") + (", ".join(parts) or "nothing ran")
    if result == "timed out":
        text += f"; cut at its {limit} s limit" if limit else "; cut by its time limit"
    elif not counts.get("finished"):
        text += "; pytest ended early (a hard timeout? see failures.log)"
    return text


def running_line(counts: dict | None) -> str | None:
    """The tests a cut-off or crashed run was in the middle of."""
    running = (counts or {}).get("running") or []
    if not running:
        return None
    line = f"{'':<22} {'':<18} {'':>6}  running then:"
    for i, nodeid in enumerate(running):
        name = nodeid.removeprefix("tests/")
        more = f" (+{len(running) - i - 1} more)" if i < len(running) - 1 else ""
        if i and len(line) + len(name) + len(more) + 2 > WIDTH:
            return line + f" (+{len(running) - i} more)"
        line += (", " if i else " ") + name
    return clip(line)


def failed_lines(steps: list[dict], out: Path) -> list[str]:
    lines, seen = [], set()
    log = out / "failures.log"
    hard, backstops = {}, 0
    if log.is_file():
        text = log.read_text(errors="replace")
        for m in re.finditer(r"^=== HARD TIMEOUT (\S+) still running after ([\d.]+) s", text, re.M):
            hard[m.group(1)] = m.group(2)
        # faulthandler's own backstop, where the hang held the GIL: no test name
        backstops = len(re.findall(r"^Timeout \(\d+:\d\d:\d\d\)!$", text, re.M))
    for step in steps:
        counts = load_counts(note_fields(step["note"]).get("counts"))
        if counts is None:
            continue
        run = counts.get("label", step["name"]).replace(" tests", "")
        for failure in counts.get("failures", []):
            nodeid = failure["nodeid"]
            outcome = failure["outcome"].upper()
            message = failure.get("message", "")
            if nodeid in hard:
                outcome, message = "HARD TIMEOUT", f"hung past {hard[nodeid]} s; its stacks are in failures.log"
            seen.add(nodeid)
            lines.append(clip(f"  [{run}] {outcome} {nodeid}: {message}"))
    for nodeid, seconds in hard.items():  # a process ended by the hard limit reports nothing itself
        if nodeid not in seen:
            lines.append(clip(f"  HARD TIMEOUT {nodeid}: hung past {seconds} s; its stacks are in failures.log"))
    if backstops:
        lines.append(f"  HARD TIMEOUT x{backstops}: faulthandler ended a process hung holding the GIL "
                     "(the step's 'running then' names the test); stacks in failures.log")
    if len(lines) > MAX_FAILED_LINES:
        rest = len(lines) - (MAX_FAILED_LINES - 1)
        lines = lines[: MAX_FAILED_LINES - 1] + [f"  ... and {rest} more (failures.log)"]
    return lines


def bench_sections(out: Path) -> dict[str, list[str]]:
    path = out / "bench.log"
    sections: dict[str, list[str]] = {}
    if not path.is_file():
        return sections
    current = None
    for line in path.read_text(errors="replace").splitlines():
        m = re.match(r"^##### (.+?): ", line)
        if m:
            current = m.group(1)
            sections[current] = []
        elif current:
            sections[current].append(line)
    return sections


def table_rows(lines: list[str]) -> list[dict]:
    rows, header = [], None
    for line in lines:
        if not line.startswith("|"):
            header = None if not line.strip() else header
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not all(set(c) <= set("-:") for c in cells):
            rows.append(dict(zip(header, cells)))
    return rows


def advantage_lines(lines: list[str]) -> list[str]:
    rows = table_rows(lines)
    out = [clip(line) for line in lines if line.startswith("note:")][:2]
    if rows:
        values: dict[str, dict] = {}
        for r in rows:
            values.setdefault(r.get("size (P x n)", "?"), {})[r.get("op"), r.get("impl")] = r.get("median (µs)", "")
        columns = [c for c in ADVANTAGE_COLUMNS if any((c[0], c[1]) in v for v in values.values())]
        widths = [2 + max([len(c[2])] + [len(v.get((c[0], c[1]), "")) for v in values.values()])
                  for c in columns]
        out.append("advantages, median µs".ljust(22) + "".join(f"{c[2]:>{w}}" for c, w in zip(columns, widths)))
        for size, v in values.items():
            out.append(f"  {size}".ljust(22)
                       + "".join(f"{v.get((c[0], c[1]), '-'):>{w}}" for c, w in zip(columns, widths)))
    out += [clip(line) for line in lines if line.startswith("compiled op / loop estimator")]
    return out


def policy_lines(lines: list[str]) -> list[str]:
    rows = table_rows(lines)
    out = [clip(line) for line in lines if line.startswith("note:")][:2]
    if rows:
        methods = list(dict.fromkeys(r.get("method", "?") for r in rows))
        values: dict[str, dict] = {}
        for r in rows:
            batch = r.get("batch (valid, zero-grad)", "").split(" ")[0]
            key = r.get("tokens x H x V", "?") + (f" {batch}" if batch else "")
            if r.get("load", "quiet") == "quiet":
                values.setdefault(key, {})[r.get("method")] = r.get("median ms", "")
        out.append("policy loss fwd+bwd, median ms".ljust(32)
                   + "".join(f"{POLICY_SHORT.get(m, m[:10]):>10}" for m in methods))
        for size, v in values.items():
            out.append(f"  {size}".ljust(32) + "".join(f"{v.get(m, '-'):>10}" for m in methods))
        out += fused_default_lines(values)
    return out


def fused_default_lines(values: dict) -> list[str]:
    """The fused-linear default this run's medians pick: the candidate fastest
    at the most (size, batch) pairs where all candidates ran."""
    wins: dict[str, int] = {}
    compared = 0
    for v in values.values():
        times = {impl: float(v[m]) for m, impl in FUSED_CANDIDATES.items()
                 if m in v and v[m] not in ("", "-", "nan")}
        if len(times) == len(FUSED_CANDIDATES):
            compared += 1
            best = min(times, key=times.get)
            wins[best] = wins.get(best, 0) + 1
    if not compared:
        return []
    choice = max(wins, key=wins.get)
    return [clip(f"fused-linear default from these medians: backends.FUSED_LINEAR_AUTO['cuda'] = "
                 f"{choice!r} (fastest at {wins[choice]} of {compared} size x batch pairs)")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--mode", default="gpu")
    ap.add_argument("--elapsed", type=int, default=None)
    ap.add_argument("--deadline", type=int, default=None)
    args = ap.parse_args(argv)

    steps = read_steps(args.work)
    bad = [s["name"] for s in steps if s["result"].startswith(("FAILED", "timed"))]
    skipped = [s["name"] for s in steps if s["result"] == "skipped"]
    verdict = ("FAILED or timed out: " + ", ".join(bad)) if bad else "no failures"
    if skipped:
        verdict += "; skipped: " + ", ".join(skipped)
    took = f", {args.elapsed} s of the {args.deadline} s budget" if args.elapsed is not None else ""
    print(clip(f"device check ({args.mode}){took}: {verdict}"))
    machine = args.work / "machine.txt"
    if machine.is_file():
        for line in machine.read_text(errors="replace").splitlines()[:2]:
            print(clip(line))
    print(f"{'step':<22} {'result':<18} {'time':>6}  details")
    for s in steps:
        fields = note_fields(s["note"])
        counts = load_counts(fields.get("counts"))
        if "counts" in fields:
            details = pytest_details(counts, s["result"], fields.get("limit"))
        else:
            details = s["note"]
        print(clip(f"{s['name']:<22} {s['result']:<18} {s['seconds'] + ' s':>6}  {details}"))
        if running_line(counts):
            print(running_line(counts))
    failed = failed_lines(steps, args.out)
    if failed:
        print("failed tests (tracebacks in failures.log):")
        print("\n".join(failed))
    sections = bench_sections(args.out)
    for name, lines in sections.items():
        if "advantage" in name:
            body = advantage_lines(lines)
        elif "policy" in name:
            body = policy_lines(lines)
        else:  # the candidates' own benchmarks: their result lines
            body = [clip(line) for line in lines if line[:1].isdigit() or line.startswith("note:")]
        if body:
            print("\n".join(body))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
