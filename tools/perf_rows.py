#!/usr/bin/env python
"""Run the benchmark rows of a suite within a time budget (called by tools/perf_suite.sh).

    python tools/perf_rows.py ROWS --out OUT --prefix gpu --isolate --budget-s 420

ROWS has one row a line: ``NAME LIMIT_S ARGS...`` (``#`` starts a comment); each row is
``tools/benchmark.py ARGS --output OUT/<prefix>_NAME.json`` with its log in
``OUT/<prefix>_NAME.log``. Outcomes go to ``OUT/rows.tsv`` (name, status, rc, seconds, limit,
reason; status ok / failed / timeout / skipped), and the results table of every JSON to
``OUT/results.md``.

* ``--isolate``: one process per row, killed (with its process group) after
  ``min(LIMIT_S, budget left)`` seconds; a row starts only while at least half its limit is left
  in the budget. Use it on the GPU: a crash, hang or out-of-memory costs one row only.
* otherwise every row runs in this process (no per-row timeout, the budget is checked between
  rows): the ``tiny`` suite does this to keep interpreter start-up out of a CPU test.

``--skip-compile`` records rows with ``--compile`` as skipped. Exit code 1 when a row failed or
timed out, else 0 (rows skipped for the budget or by ``--skip-compile`` do not count).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from typing import List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_SCRIPT = os.path.join(ROOT, "tools", "benchmark.py")
TSV_HEADER = "name\tstatus\trc\tseconds\tlimit\treason\n"


@dataclass
class Row:
    name: str
    limit_s: float
    args: List[str]


def parse_rows(path: str) -> List[Row]:
    """Rows of a rows file; raises ValueError on a malformed line or a repeated name."""
    rows: List[Row] = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            tokens = shlex.split(line, comments=True)
            if not tokens:
                continue
            if len(tokens) < 2:
                raise ValueError(f"{path}:{number}: expected NAME LIMIT_S ARGS...")
            try:
                limit = float(tokens[1])
            except ValueError:
                raise ValueError(f"{path}:{number}: LIMIT_S {tokens[1]!r} is not a number")
            if any(r.name == tokens[0] for r in rows):
                raise ValueError(f"{path}:{number}: row {tokens[0]!r} appears twice")
            rows.append(Row(tokens[0], limit, tokens[2:]))
    return rows


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_isolated(cmd: List[str], log: str, timeout: float) -> tuple:
    """(return code, timed out) of ``cmd`` with output in ``log``."""
    with open(log, "w") as logf:
        proc = subprocess.Popen(
            cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True
        )
        try:
            return proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return proc.returncode, True
        except BaseException:  # Ctrl-C: do not leave the row running
            _kill_group(proc)
            raise


class InProcess:
    """Runs ``main(argv)`` of the benchmark script in this process."""

    def __init__(self, script: str):
        spec = importlib.util.spec_from_file_location("perf_benchmark_tool", script)
        self.module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.module)

    def run(self, args: List[str], log: str) -> int:
        with (
            open(log, "w") as logf,
            contextlib.redirect_stdout(logf),
            contextlib.redirect_stderr(logf),
        ):
            try:
                self.module.main(args)
                return 0
            except SystemExit as exc:
                return exc.code if isinstance(exc.code, int) else 1
            except Exception:  # one broken row must not stop the suite
                traceback.print_exc(file=logf)
                return 1


def run_rows(
    rows: List[Row],
    out: str,
    *,
    prefix: str = "",
    isolate: bool = False,
    budget_s: float = 0.0,
    skip_compile: bool = False,
    python: str = sys.executable,
    script: str = DEFAULT_SCRIPT,
) -> int:
    """Run ``rows`` in order, writing ``OUT/<prefix>_<name>.json|.log``, ``OUT/rows.tsv`` and
    ``OUT/results.md``; returns 1 when a row failed or timed out, else 0."""
    os.makedirs(out, exist_ok=True)
    start = time.time()
    runner: Optional[InProcess] = None
    counts = {"ok": 0, "failed": 0, "timeout": 0, "skipped": 0}
    tsv = open(os.path.join(out, "rows.tsv"), "w")
    tsv.write(TSV_HEADER)
    for row in rows:
        name = f"{prefix}_{row.name}" if prefix else row.name
        json_path, log = os.path.join(out, name + ".json"), os.path.join(out, name + ".log")
        for stale in (json_path, log):
            if os.path.exists(stale):
                os.remove(stale)
        left = budget_s - (time.time() - start) if budget_s > 0 else float("inf")
        limit = min(row.limit_s, left)
        reason = ""
        if skip_compile and "--compile" in row.args:
            status, rc, seconds, reason = "skipped", "", 0.0, "compile rows are off in this suite"
        elif left < row.limit_s / 2:
            status, rc, seconds = "skipped", "", 0.0
            reason = f"budget: {max(left, 0):.0f} s left of {budget_s:.0f} s"
        else:
            print(f"== {name} (limit {limit:.0f} s): {' '.join(row.args)}", file=sys.stderr)
            t0 = time.time()
            argv = row.args + ["--output", json_path]
            timed_out = False
            if isolate:
                rc, timed_out = run_isolated([python, script, *argv], log, limit)
            else:
                if runner is None:
                    runner = InProcess(script)
                rc = runner.run(argv, log)
            seconds = time.time() - t0
            if timed_out:
                status, reason = "timeout", f"killed after {limit:.0f} s"
            elif rc == 0 and os.path.exists(json_path):
                status = "ok"
            else:
                status, reason = "failed", f"rc {rc}: {_last_line(log)}"
            line = _last_line(log) if status == "ok" else reason
            print(f"   {status} in {seconds:.0f} s: {line}", file=sys.stderr)
        if status == "skipped":
            print(f"== {name}: skipped ({reason})", file=sys.stderr)
        counts[status] += 1
        fields = [name, status, str(rc), f"{seconds:.1f}", f"{row.limit_s:g}", reason]
        tsv.write("\t".join(f.replace("\t", " ").replace("\n", " ") for f in fields) + "\n")
        tsv.flush()
    tsv.close()
    print(
        f"[rows] {counts['ok']} ok, {counts['failed']} failed, {counts['timeout']} timed out, "
        f"{counts['skipped']} skipped in {time.time() - start:.0f} s",
        file=sys.stderr,
    )
    _write_table(out, prefix, runner, isolate, python, script)
    return 1 if counts["failed"] or counts["timeout"] else 0


def _write_table(
    out: str, prefix: str, runner: Optional[InProcess], isolate: bool, python: str, script: str
) -> None:
    """``OUT/results.md``: ``tools/benchmark.py --table`` of this suite's JSON files."""
    files = sorted(glob.glob(os.path.join(out, f"{prefix}_*.json" if prefix else "*.json")))
    path = os.path.join(out, "results.md")
    if not files:
        with open(path, "w") as f:
            f.write("(no results)\n")
        return
    if runner is None and not isolate:
        runner = InProcess(script)
    if runner is not None:
        rc = runner.run(["--table", *files], path)
    else:
        with open(path, "w") as f:
            rc = subprocess.run([python, script, "--table", *files], stdout=f, cwd=ROOT).returncode
    if rc != 0:
        print(f"[rows] the results table failed (rc {rc}), see {path}", file=sys.stderr)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", help="rows file: NAME LIMIT_S ARGS... per line")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--prefix", default="", help="file name prefix (the suite)")
    parser.add_argument("--isolate", action="store_true", help="one process per row, timeouts")
    parser.add_argument("--budget-s", type=float, default=0.0, help="0: no budget")
    parser.add_argument("--skip-compile", action="store_true", help="skip rows with --compile")
    parser.add_argument("--script", default=DEFAULT_SCRIPT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        rows = parse_rows(args.rows)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    return run_rows(
        rows,
        args.out,
        prefix=args.prefix,
        isolate=args.isolate,
        budget_s=args.budget_s,
        skip_compile=args.skip_compile,
        script=args.script,
    )


if __name__ == "__main__":
    sys.exit(main())
