"""Every benchmark in a row, their tables copied to docs/benchmark/ (``make bench-all``).

    .venv/bin/python load/bench_all.py            # about 18 minutes on 2 cores
    .venv/bin/python load/bench_all.py --quick    # smoke run of each; docs/ left alone
    .venv/bin/python load/bench_all.py --full     # other arguments go to load/bench.py

Runs load/bench.py, load/bench_mixed.py and load/bench_memory.py one after the other (never at
once: each needs the machine to itself), each in its own process, so one that fails does not
stop the others. Then the tables and pictures each one wrote to ``load/results/`` are copied to
``docs/benchmark/``, where the committed figures live; a smoke run (``--quick``) copies
nothing, so it can never replace real figures with 2-second ones. A benchmark that failed
still has its report copied (it says "Incomplete run" at the top); the exit status is the
worst of the three (0 when all ran to the end).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the ``load`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from load.bench_env import RESULTS
from load.servers import ROOT

DOCS = ROOT / "docs" / "benchmark"


@dataclass(frozen=True)
class Step:
    script: str
    outputs: tuple[str, ...]  # files it writes into the results directory
    limit_s: float  # a run longer than this is stuck: it is stopped


STEPS = (
    Step("bench.py", ("bench.md", "bench.png"), 40 * 60),
    Step("bench_mixed.py", ("bench-mixed.md",), 20 * 60),
    Step("bench_memory.py", ("bench-memory.md", "bench-memory.png"), 20 * 60),
)


def run_step(step: Step, extra: list[str]) -> tuple[int, float]:
    """Run one benchmark script to the end; (exit status, seconds taken)."""
    argv = [sys.executable, str(ROOT / "load" / step.script), *extra]
    print(f"=== {' '.join(argv[1:])}", flush=True)
    began = time.monotonic()
    proc = subprocess.Popen(argv, cwd=ROOT)
    try:
        status = proc.wait(step.limit_s)
    except subprocess.TimeoutExpired:
        # SIGTERM: the script stops its servers and writes what it has.
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        print(f"{step.script}: still running after {step.limit_s / 60:.0f} minutes: stopped",
              file=sys.stderr)
        status = 1
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(60)
        raise
    return status, time.monotonic() - began


def copy_outputs(step: Step, results: Path, docs: Path) -> list[str]:
    """Copy what the step wrote to docs/; the names of the files copied."""
    copied = []
    for name in step.outputs:
        source = results / name
        if source.exists():
            shutil.copyfile(source, docs / name)
            copied.append(name)
    return copied


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run every benchmark; copy the results.")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run of each benchmark; nothing is copied to docs/")
    parser.add_argument("--no-install", action="store_true",
                        help="install nothing; fail if wrk or the bench venv is missing")
    # Any other argument (--full, --rounds 5...) is load/bench.py's.
    args, bench_only = parser.parse_known_args(argv)
    extra = [flag for flag, on in (("--quick", args.quick), ("--no-install", args.no_install))
             if on]
    began = time.monotonic()
    worst = 0
    lines = []
    for step in STEPS:
        status, seconds = run_step(step, extra + (bench_only if step is STEPS[0] else []))
        worst = max(worst, status)
        copied = [] if args.quick else copy_outputs(step, RESULTS, DOCS)
        lines.append(f"{step.script}: exit {status} after {seconds / 60:.1f} minutes; "
                     + (f"copied {', '.join(copied)} to {DOCS}/" if copied
                        else "nothing copied" + (" (--quick)" if args.quick else "")))
    print("\n".join(["", *lines, f"all done in {(time.monotonic() - began) / 60:.1f} minutes"]))
    return worst


if __name__ == "__main__":
    sys.exit(main())
