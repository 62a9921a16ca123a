"""Run the locust scenarios against a forkserver started for the occasion (``make load``).

    .venv/bin/python load/run.py --run-time 30s --users 24 --spawn-rate 12 [--max-p95-ms 500]

Steps: make sure locust is installed (the project's ``load`` extra, into the running venv),
start ``forkserver load.apps:app`` on 127.0.0.1 with a port the kernel picks, run locust
headless as a subprocess for a bounded time, write its CSV and HTML report under
``load/results/``, stop the server and check that it exited and left no process behind.

Exit status: 0 when every request succeeded (and p95 is within ``--max-p95-ms`` if given);
1 when the load gate failed; 2 when the server misbehaved (did not start, did not stop, exited
non-zero, left processes); 3 when locust is not available and could not be installed.

Locust runs in its own process on purpose: importing it monkey-patches the interpreter with
gevent, which must never happen inside a process that forks and signals servers (pytest).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

try:
    from load.servers import ROOT, ManagedServer, ServerError
except ModuleNotFoundError:  # run as a script from elsewhere: make ``load`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from load.servers import ROOT, ManagedServer, ServerError

LOCUSTFILE = ROOT / "load" / "locustfile.py"
RESULTS = ROOT / "load" / "results"
SCENARIOS = ("HelloUser", "JsonEchoUser", "DownloadUser", "ChunkedUploadUser", "SlowMixUser",
             "NewConnectionUser")

EXIT_OK = 0
EXIT_GATE = 1
EXIT_SERVER = 2
EXIT_NO_LOCUST = 3

# Time locust may take beyond --run-time: start-up, --stop-timeout, writing the reports.
LOCUST_GRACE = 60.0
STOP_TIMEOUT = 5


class NoLocust(Exception):
    """Locust is missing and could not be installed here."""


_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def parse_duration(text: str) -> float:
    """Seconds in locust's ``--run-time`` syntax: ``90``, ``90s``, ``1m30s``, ``1h``."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    match = _DURATION.fullmatch(text)
    if not text or match is None:
        raise ValueError(f"not a duration: {text!r} (examples: 30, 30s, 1m30s)")
    hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    return hours * 3600.0 + minutes * 60.0 + seconds


def _duration_arg(text: str) -> str:
    try:
        if parse_duration(text) <= 0:
            raise ValueError("must be longer than 0 s")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def ensure_locust(install: bool = True) -> None:
    """Install the ``load`` extra into this interpreter's venv if locust is missing.

    ``find_spec`` locates the package without importing it, so gevent is never loaded here.
    """
    if importlib.util.find_spec("locust") is not None:
        return
    if not install:
        raise NoLocust("locust is not installed (and --no-install was given)")
    if sys.prefix == sys.base_prefix:
        raise NoLocust("locust is not installed and this Python is not a virtualenv; run "
                       "with the project's .venv/bin/python (make load) to install it there")
    print(f"locust missing: installing the 'load' extra into {sys.prefix}", flush=True)
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "-e",
                             f"{ROOT}[load]"], cwd=ROOT, check=False, timeout=600)
    importlib.invalidate_caches()
    if result.returncode != 0 or importlib.util.find_spec("locust") is None:
        raise NoLocust(f"installing locust failed (pip exit status {result.returncode})")


@dataclass(frozen=True)
class StatsRow:
    """One line of locust's ``*_stats.csv``; latencies in milliseconds (None when no data)."""

    method: str
    name: str
    requests: int
    failures: int
    median_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    rps: float


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # locust writes "N/A" for percentiles of an empty row
        return None


def read_stats(path: Path) -> list[StatsRow]:
    """Parse locust's stats CSV; the last row is the "Aggregated" total."""
    with open(path, newline="") as f:
        return [StatsRow(method=row["Type"], name=row["Name"],
                         requests=int(row["Request Count"]),
                         failures=int(row["Failure Count"]),
                         median_ms=_number(row["50%"]), p95_ms=_number(row["95%"]),
                         p99_ms=_number(row["99%"]), rps=float(row["Requests/s"]))
                for row in csv.DictReader(f)]


def gate(rows: list[StatsRow], max_p95_ms: float | None) -> list[str]:
    """Why the run fails, from the CSV totals; an empty list means it passed.

    This repeats the locustfile's own verdict on purpose: the CSV is what is kept, and a
    locust that crashed before its ``quitting`` listener ran must not pass silently.
    """
    total = next((row for row in rows if row.name == "Aggregated"), None)
    if total is None:
        return ["the stats CSV has no Aggregated row"]
    reasons = []
    if total.requests == 0:
        reasons.append("no request was made")
    if total.failures:
        reasons.append(f"{total.failures} of {total.requests} requests failed")
    if max_p95_ms and total.p95_ms is not None and total.p95_ms > max_p95_ms:
        reasons.append(f"p95 {total.p95_ms:g} ms exceeds --max-p95-ms {max_p95_ms:g}")
    return reasons


def format_stats(rows: list[StatsRow]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"
    header = (f"{'request':<28} {'count':>8} {'fail':>6} {'req/s':>8} {'p50':>6} {'p95':>6} "
              f"{'p99':>6}  (ms)")
    lines = [header]
    for row in rows:
        label = f"{row.method} {row.name}".strip()
        lines.append(f"{label[:28]:<28} {row.requests:>8} {row.failures:>6} {row.rps:>8.1f} "
                     f"{ms(row.median_ms):>6} {ms(row.p95_ms):>6} {ms(row.p99_ms):>6}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Run the locust scenarios against a freshly started forkserver.",
        epilog="Scenarios (user classes): " + ", ".join(SCENARIOS) + ". Tags: hello json "
               "download upload slow close. Give at least one user per selected scenario.")
    parser.add_argument("-t", "--run-time", type=_duration_arg, default="30s",
                        help="how long locust sends load, e.g. 30s or 2m (default: 30s)")
    parser.add_argument("-u", "--users", type=int, default=24,
                        help="concurrent simulated users (default: 24)")
    parser.add_argument("-r", "--spawn-rate", type=float, default=12.0,
                        help="users started per second (default: 12)")
    parser.add_argument("--max-p95-ms", type=float, default=None,
                        help="fail when the overall 95th percentile exceeds this (ms)")
    parser.add_argument("--tags", nargs="+", default=None, metavar="TAG",
                        help="run only the scenarios with these tags")
    parser.add_argument("--scenario", dest="scenarios", action="append", default=None,
                        choices=SCENARIOS, metavar="CLASS",
                        help="run only this user class (repeatable; default: all)")
    parser.add_argument("--processes", type=int, default=None,
                        help="locust --processes N: more load-generator CPU (default: 1)")
    parser.add_argument("-w", "--workers", type=int, default=2,
                        help="forkserver workers (default: 2)")
    parser.add_argument("--app", default="load.apps:app", help="WSGI app to serve")
    parser.add_argument("--server-args", default="",
                        help="extra forkserver options, one shell-quoted string")
    parser.add_argument("--results-dir", type=Path, default=RESULTS,
                        help="where the CSV, HTML and server log go (default: load/results)")
    parser.add_argument("--prefix", default="locust",
                        help="file name prefix for the reports (default: locust)")
    parser.add_argument("--no-install", action="store_true",
                        help="do not pip-install locust when it is missing; exit 3 instead")
    return parser


def locust_command(args: argparse.Namespace, url: str, csv_prefix: Path,
                   html: Path) -> list[str]:
    argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
            "--host", url, "--users", str(args.users), "--spawn-rate", str(args.spawn_rate),
            "--run-time", args.run_time, "--stop-timeout", str(STOP_TIMEOUT),
            "--csv", str(csv_prefix), "--html", str(html), "--only-summary"]
    if args.max_p95_ms:
        argv += ["--max-p95-ms", str(args.max_p95_ms)]
    if args.tags:
        argv += ["--tags", *args.tags]
    if args.processes:
        argv += ["--processes", str(args.processes)]
    argv += args.scenarios or []
    return argv


def run_locust(argv: list[str], timeout: float) -> int:
    """Run locust and return its exit status; kill its whole process group if it overruns."""
    # Own process group, so --processes children are reached too if it must be killed.
    proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"locust still running {timeout:.0f}s after start: killing it", flush=True)
        return -1
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.users < 1 or args.spawn_rate <= 0 or args.workers < 1:
        print("run.py: --users, --spawn-rate and --workers must be positive", file=sys.stderr)
        return EXIT_GATE
    try:
        ensure_locust(install=not args.no_install)
    except NoLocust as exc:
        print(f"run.py: {exc}", file=sys.stderr)
        return EXIT_NO_LOCUST
    # A TERM to the driver (CI cancelling) must still stop the server it started.
    signal.signal(signal.SIGTERM, _raise_interrupt)

    results: Path = args.results_dir
    results.mkdir(parents=True, exist_ok=True)
    csv_prefix = results / args.prefix
    html = results / f"{args.prefix}_report.html"
    stats_csv = results / f"{args.prefix}_stats.csv"
    for stale in (stats_csv, html):
        stale.unlink(missing_ok=True)  # a report from an earlier run must not pass for this one

    server = ManagedServer(
        name="forkserver",
        argv=[sys.executable, "-m", "forkserver", args.app, "--workers", str(args.workers),
              "--bind", "127.0.0.1:0", *shlex.split(args.server_args)],
        log_path=results / f"{args.prefix}_server.log", workers=args.workers,
        ready_pattern=r"\d+ workers? ready", probe_path="/hello",
        env={"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                         os.environ.get("PYTHONPATH")]))})
    locust_status = None
    server_problem = None
    try:
        server.start()
        print(f"forkserver {args.app} with {args.workers} workers at {server.url}", flush=True)
        timeout = parse_duration(args.run_time) + STOP_TIMEOUT + LOCUST_GRACE
        started = time.monotonic()
        locust_status = run_locust(locust_command(args, server.url, csv_prefix, html), timeout)
        print(f"locust exited with status {locust_status} after "
              f"{time.monotonic() - started:.1f}s", flush=True)
    except ServerError as exc:
        server_problem = str(exc)
    except KeyboardInterrupt:
        print("interrupted: stopping the server", file=sys.stderr, flush=True)
        server_problem = "interrupted"
    finally:
        try:
            status = server.stop()
            if status != 0 and server_problem is None:
                server_problem = f"forkserver exited with status {status}:\n{server.log_tail()}"
        except ServerError as exc:
            server_problem = server_problem or str(exc)

    if server_problem:
        print(f"run.py: {server_problem}", file=sys.stderr)
        return EXIT_SERVER
    if not stats_csv.exists():
        print(f"run.py: locust wrote no {stats_csv}", file=sys.stderr)
        return EXIT_GATE
    rows = read_stats(stats_csv)
    print(format_stats(rows))
    print(f"reports: {stats_csv}  {html}")
    reasons = gate(rows, args.max_p95_ms)
    if locust_status != 0:
        reasons.append(f"locust exited with status {locust_status}")
    if reasons:
        failures = results / f"{args.prefix}_failures.csv"
        if failures.exists():
            print(failures.read_text(errors="replace")[:2000])
        print("FAILED: " + "; ".join(reasons), file=sys.stderr)
        return EXIT_GATE
    print("load run passed")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
