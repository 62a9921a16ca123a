"""Memory benchmark: total PSS of a Django site's process tree (``make bench-memory``).

    .venv/bin/python load/bench_memory.py            # 3,000 warm-up requests per row
    .venv/bin/python load/bench_memory.py --quick    # 800

A stock Django project is generated at bench time under ``load/.memory-site/`` (``django-admin
startproject``, git-ignored, never committed) with the app ``load.memapp`` added: it builds the
lazy caches a real site builds in every process (URL resolver, templates, ORM metadata and
queries on SQLite, the admin). Each row serves it with 8 workers; a fixed warm-up of requests,
each on a new connection from 8 concurrent clients so they spread over all workers, is followed
by a settle time (so a refork finishes replacing workers) and a short second pass; then the
proportional set size (PSS, psutil ``memory_full_info().pss``) of every process of the tree is
summed. PSS splits each shared page among the processes that map it, so the sum is what the
server costs, copy-on-write sharing included.

Rows: gunicorn sync (no preload; ``--preload``) and forkserver (no preload; preload without
freeze; preload + ``gc_freeze``; preload + freeze + ``refork_after``). forkserver's settings go
in a TOML config file; a setting the build under test does not have (``forkserver
--print-config``) makes its row "not supported by this build", unless the row turns it off
(a build without ``gc_freeze`` never freezes). A setting a build accepts before it acts on it
is told by behaviour: a refork row in which no worker was replaced is "not supported by this
build" too, instead of a copy of the row above it. One run.

Writes ``load/results/bench-memory.md``, ``bench-memory.png`` and ``bench-memory.json``.
Exit status: 0 after a complete run, 1 when a server failed, 3 when setup failed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the ``load`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from load import bench_env
from load.contenders import Contender, gunicorn_common_flags, start_command
from load.servers import ROOT, ManagedServer, ServerError

SITE = ROOT / "load" / ".memory-site"
PROJECT = "memsite"
APP = f"{PROJECT}.wsgi:application"
SETTINGS_MODULE = f"{PROJECT}.bench_settings"
WORKERS = 8
CLIENTS = 8
REFORK_AFTER = [50, 500]
SETTLE_S = 3.0
SETTLE_LIMIT_S = 30.0
SECOND_PASS = 10  # requests per worker after settling, so replaced workers serve too
WARMUP_DEADLINE_S = 300.0
BASELINE = "gunicorn --preload"

# Generated next to the stock settings: the stock project plus the app, on SQLite.
BENCH_SETTINGS = '''"""Written by load/bench_memory.py at bench time: the stock settings plus load.memapp."""
from .settings import *  # noqa: F403

DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
INSTALLED_APPS = [*INSTALLED_APPS, "django.contrib.humanize", "load.memapp"]  # noqa: F405
ROOT_URLCONF = "memsite.bench_urls"
DATABASES = {"default": {"ENGINE": "django.db.backends.sqlite3",
                         "NAME": BASE_DIR / "bench.sqlite3"}}  # noqa: F405
LOGGING_CONFIG = None
'''
BENCH_URLS = '''"""Written by load/bench_memory.py at bench time: the stock admin plus load.memapp."""
from django.urls import include, path

from .urls import urlpatterns as stock

urlpatterns = [*stock, path("", include("load.memapp.urls"))]
'''


@dataclass(frozen=True)
class Row:
    label: str
    kind: str  # "forkserver" or "gunicorn-sync"
    settings: dict[str, object] = field(default_factory=dict)  # forkserver config file
    flags: tuple[str, ...] = ()  # gunicorn flags


ROWS = (
    Row("gunicorn", "gunicorn-sync"),
    Row(BASELINE, "gunicorn-sync", flags=("--preload",)),
    Row("forkserver", "forkserver"),
    Row("forkserver --preload, no freeze", "forkserver", {"preload": True, "gc_freeze": False}),
    Row("forkserver --preload + freeze", "forkserver", {"preload": True, "gc_freeze": True}),
    Row("forkserver --preload + freeze + refork", "forkserver",
        {"preload": True, "gc_freeze": True, "refork_after": REFORK_AFTER}),
)

# The URLs the warm-up cycles through: every view, template and a spread of patterns.
PATHS = ("/", "/?page=2", "/books/{n}/", "/authors/", "/authors/author-{a}/", "/tags/tag-{t}/",
         "/section-{s}/{n}/", "/section-{s}/{n}/more-words/", "/admin/login/")


def warmup_path(i: int) -> str:
    template = PATHS[i % len(PATHS)]
    return template.format(n=1 + i % 400, a=i % 40, t=i % 30, s=(i * 7) % 280)


@dataclass(frozen=True)
class Measurement:
    row: str
    requests: int
    failed: int
    workers_served: int
    processes: int
    total_pss: int
    master_pss: int
    pss_by_pid: dict[str, int]
    replaced: int  # processes under the master at the start that were gone at the end


# --------------------------------------------------------------------------------------------
# The site.

def generate_site(python: Path) -> dict[str, str]:
    """The project (once), its bench settings and seeded database; the server environment."""
    env = {"DJANGO_SETTINGS_MODULE": SETTINGS_MODULE}
    if not (SITE / "manage.py").exists():
        SITE.mkdir(parents=True, exist_ok=True)
        (SITE / ".gitignore").write_text("*\n")  # generated: never committed
        print(f"generating a stock Django project in {SITE}", flush=True)
        subprocess.run([str(python.parent / "django-admin"), "startproject", PROJECT,
                        str(SITE)], check=True, timeout=120)
    (SITE / PROJECT / "bench_settings.py").write_text(BENCH_SETTINGS)
    (SITE / PROJECT / "bench_urls.py").write_text(BENCH_URLS)
    seed = "import django; django.setup(); from load.memapp.seed import seed; seed()"
    subprocess.run([str(python), "-c", seed], cwd=SITE, check=True, timeout=300,
                   env={**_base_env(), **env})
    return env


def _base_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{SITE}{os.pathsep}{ROOT}"}


def forkserver_settings(python: Path) -> set[str]:
    """The setting names the forkserver under test knows (``--print-config``)."""
    result = subprocess.run([str(python), "-m", "forkserver", "--print-config"], cwd=SITE,
                            capture_output=True, text=True, check=False, timeout=60)
    try:
        return set(tomllib.loads(result.stdout))
    except tomllib.TOMLDecodeError:
        return set()


def _toml(settings: dict[str, object]) -> str:
    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v)  # ints and lists of ints read the same in TOML
    return "".join(f"{key} = {value(v)}\n" for key, v in settings.items())


# --------------------------------------------------------------------------------------------
# Load and measurement.

def _get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        response.read()
        return response.status, response.getheader("X-Worker-Pid") or ""
    except OSError:
        return 0, ""
    finally:
        conn.close()


def warm_up(port: int, count: int, offset: int = 0) -> tuple[int, Counter]:
    """``count`` requests from CLIENTS threads, bounded in time; (failures, requests per PID)."""
    deadline = time.monotonic() + WARMUP_DEADLINE_S
    pids: Counter = Counter()
    failed = 0
    lock = threading.Lock()

    def one(i: int) -> None:
        nonlocal failed
        if time.monotonic() > deadline:
            status, pid = 0, ""
        else:
            status, pid = _get(port, warmup_path(offset + i))
        with lock:
            if status == 200:
                pids[pid] += 1
            else:
                failed += 1

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(one, range(count)))
    return failed, pids


def settle(server: ManagedServer) -> None:
    """Wait until the process tree has kept the same PIDs for SETTLE_S (a refork is done)."""
    deadline = time.monotonic() + SETTLE_LIMIT_S
    last: set[str] = set()
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        now = set(server.pss()["processes"])  # type: ignore[arg-type]
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= SETTLE_S:
            return
        time.sleep(0.5)


def measure(server: ManagedServer, label: str, warmup: int) -> Measurement:
    first = server.descendant_pids()
    failed, pids = warm_up(server.port, warmup)
    settle(server)
    more_failed, more = warm_up(server.port, SECOND_PASS * WORKERS, offset=warmup)
    pids.update(more)
    pss = server.pss()
    by_pid: dict[str, int] = pss["processes"]  # type: ignore[assignment]
    master = str(server.proc.pid) if server.proc else ""
    return Measurement(label, warmup + SECOND_PASS * WORKERS, failed + more_failed,
                       len([p for p in pids if p]), len(by_pid), int(pss["total"]),
                       by_pid.get(master, 0), by_pid,
                       len(first - server.descendant_pids()))


def measure_row(server: ManagedServer, row: Row, warmup: int) -> Measurement:
    """Start the row's server, measure it, stop it."""
    server.start(timeout=60)
    try:
        m = measure(server, row.label, warmup)
    finally:
        server.stop()
    print(f"{row.label:<40} total PSS {_mib(m.total_pss):>7} MiB over {m.processes} "
          f"processes; {m.workers_served} workers served, {m.replaced} replaced, "
          f"{m.failed} failed", flush=True)
    return m


def not_wired(row: Row, m: Measurement) -> str:
    """Why a row measured something other than what it names ("" when it did not).

    A build may accept ``refork_after`` before it reforks: then no worker is replaced during
    a warm-up far longer than the first refork count, and the row would only repeat the one
    above it. Told by behaviour, so the row comes back by itself once the feature works.
    """
    if row.settings.get("refork_after") and m.replaced == 0:
        return ("not supported by this build (refork_after is accepted, but no worker was "
                f"re-forked in {m.requests:,} requests)")
    return ""


# --------------------------------------------------------------------------------------------
# Report.

def _mib(value: float) -> str:
    return f"{value / (1 << 20):.1f}"


def render_markdown(results: list[Measurement], unsupported: dict[str, str],
                    info: dict[str, str], warmup: int, problems: list[str]) -> str:
    base = next((m.total_pss for m in results if m.row == BASELINE), 0)
    lines = ["# forkserver memory benchmark", ""]
    if problems:
        lines += [f"**Incomplete run ({'; '.join(problems)[:200]}).**", ""]
    lines += [
        f"{info['date']} on {info['machine']}.", "", bench_env.versions_line(info), "",
        (f"A stock Django project (`django-admin startproject`) with the app `load.memapp` "
         f"(URL resolver of ~300 patterns, templates, ORM on SQLite, the admin), {WORKERS} "
         f"workers (gunicorn: sync). Warm-up: {warmup:,} requests over new connections from "
         f"{CLIENTS} clients, a settle time, then {SECOND_PASS * WORKERS} more; then the total "
         "PSS (proportional set size) of the whole process tree. forkserver's refork row: "
         f"`refork_after = {REFORK_AFTER}`. One run; the ratio is over gunicorn `--preload`'s "
         "total in this run."),
        "", bench_env.caption(info), "",
        ("| server | x gunicorn --preload | total PSS (MiB) | master (MiB) | "
         "mean other (MiB) | processes | workers that served | replaced | failed |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in ROWS:
        if row.label in unsupported:
            lines.append(f"| {row.label} | {unsupported[row.label]} | | | | | | | |")
            continue
        m = next((m for m in results if m.row == row.label), None)
        if m is None:
            continue
        others = (m.total_pss - m.master_pss) / max(m.processes - 1, 1)
        ratio = f"{m.total_pss / base:.2f}" if base else "-"
        lines.append(f"| {m.row} | {ratio} | {_mib(m.total_pss)} | {_mib(m.master_pss)} | "
                     f"{_mib(others)} | {m.processes} | {m.workers_served} | {m.replaced} | "
                     f"{m.failed} |")
    refork = next((m for m in results if m.row == ROWS[-1].label), None)
    verdict = ("n/a", "n/a")
    if refork and base:
        ratio = refork.total_pss / base
        verdict = bench_env.judged(ratio, 0.75, higher=False)
    lines += ["", "## Target (issue 17)", "", "| target | measured | verdict |", "|---|---|---|",
              (f"| preload + freeze + refork <= 0.75x gunicorn --preload | {verdict[0]} | "
               f"{verdict[1]} |"), "", "![total PSS per server](bench-memory.png)", ""]
    return "\n".join(lines)


def render_png(results: list[Measurement], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.6 * len(results) + 1.5))
    labels = [m.row for m in results][::-1]
    values = [m.total_pss / (1 << 20) for m in results][::-1]
    colors = ["C0" if label.startswith("forkserver") else "C7" for label in labels]
    bars = ax.barh(labels, values, color=colors)
    ax.bar_label(bars, fmt="%.0f MiB", padding=3, fontsize=8)
    ax.set_xlabel(f"total PSS of the process tree, {WORKERS} workers (MiB)")
    ax.set_xlim(0, max(values, default=1) * 1.2)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line.

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Total PSS of a Django site, 8 workers.")
    parser.add_argument("--quick", action="store_true", help="800 warm-up requests, not 3,000")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up requests per row")
    parser.add_argument("--rows", nargs="+", default=None, metavar="WORD",
                        help="only the rows whose label contains one of these words")
    parser.add_argument("--results-dir", type=Path, default=bench_env.RESULTS)
    parser.add_argument("--no-install", action="store_true",
                        help="install nothing; fail if the bench venv is missing")
    return parser


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def plan_rows(python: Path, words: list[str] | None,
              results: Path) -> tuple[list[tuple[Row, Contender]], dict[str, str]]:
    known = forkserver_settings(python)
    plan, unsupported = [], {}
    for row in ROWS:
        if words and not any(w in row.label for w in words):
            continue
        # A setting turned off that the build does not have is off there anyway.
        settings = {k: v for k, v in row.settings.items() if k in known or v}
        lacking = [key for key in settings if key not in known]
        if lacking:
            unsupported[row.label] = f"not supported by this build (no {', '.join(lacking)})"
            print(f"{row.label}: {unsupported[row.label]}", flush=True)
            continue
        extra = row.flags
        if row.kind == "forkserver":
            config = results / f"memory_{len(plan)}.toml"
            config.write_text(_toml(settings))
            extra = ("--config", str(config))
        plan.append((row, Contender(row.label, row.kind, WORKERS, extra=extra)))
    return plan, unsupported


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warmup = args.warmup or (800 if args.quick else 3000)
    if warmup < WORKERS:
        print(f"bench_memory.py: --warmup must be at least {WORKERS}", file=sys.stderr)
        return 1
    results: Path = args.results_dir
    results.mkdir(parents=True, exist_ok=True)
    try:
        python, _ = bench_env.ensure_bench_venv(not args.no_install, reinstall=False)
        env = generate_site(python)
    except (bench_env.SetupError, subprocess.CalledProcessError) as exc:
        print(f"bench_memory.py: {exc}", file=sys.stderr)
        return 3
    can_plot = bench_env.ensure_matplotlib(not args.no_install)
    gunicorn_extra = gunicorn_common_flags(bench_env.help_text(python, "gunicorn"))
    plan, unsupported = plan_rows(python, args.rows, results)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    measured: list[Measurement] = []
    problems: list[str] = []
    try:
        for row, contender in plan:
            log = results / f"memory_{''.join(ch if ch.isalnum() else '_' for ch in row.label)}.log"
            server = start_command(Contender(contender.label, contender.kind, WORKERS,
                                             extra=contender.extra, env=env),
                                   python, APP, log, gunicorn_extra, cwd=SITE)
            try:
                m = measure_row(server, row, warmup)
            except (ServerError, RuntimeError, subprocess.TimeoutExpired) as exc:
                # One broken row is reported; the others still run.
                problems.append(str(exc))
                unsupported[row.label] = f"did not run (see {log.name})"
                continue
            if why := not_wired(row, m):
                unsupported[row.label] = why
                print(f"{row.label}: {why}", flush=True)
                continue
            measured.append(m)
    except KeyboardInterrupt:
        problems.append("interrupted")
    info = bench_env.machine_info(python, None)
    (results / "bench-memory.json").write_text(json.dumps(
        {"info": info, "warmup": warmup, "unsupported": unsupported,
         "rows": [asdict(m) for m in measured]}, indent=1))
    markdown = render_markdown(measured, unsupported, info, warmup, problems)
    (results / "bench-memory.md").write_text(markdown)
    if can_plot and measured:
        render_png(measured, results / "bench-memory.png",
                   f"Django, {WORKERS} workers, after {warmup:,} requests\n{info['cpu']}, "
                   f"{info['cores']} cores, Python {info.get('python', '?')} - {info['date']}")
    print(markdown)
    if problems:
        print("bench_memory.py: " + "\n".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
