"""Side-by-side benchmark: forkserver against gunicorn and meinheld (``make bench``).

    .venv/bin/python load/bench.py            # full matrix, about 8 minutes
    .venv/bin/python load/bench.py --quick    # same matrix, shorter runs, about 4 minutes

Every server serves ``load.apps:hello`` with the same number of workers on 127.0.0.1, from its
own virtualenv ``load/.bench-venv`` (gunicorn, meinheld where it builds, and this checkout of
forkserver, installed there by this script). ``wrk -t1`` measures keep-alive and
``Connection: close`` at each concurrency. All servers stay up for the whole run and take turns
within each round, with the order rotated every round, so drift on a shared machine (thermal,
noisy neighbours) hits them all alike; each figure is the median of the rounds. Worker RSS is
read after the last round.

Writes ``load/results/bench.md`` (tables, targets from issue 6, machine), ``bench.png``
(requests/s against concurrency) and ``bench.json`` (every single run, for re-analysis).

Exit status: 0 after a complete run, 1 when a server failed or left processes behind,
3 when wrk or the bench venv cannot be set up.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

try:
    from load.servers import ROOT, ManagedServer, ServerError
except ModuleNotFoundError:  # run as a script from elsewhere: make ``load`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from load.servers import ROOT, ManagedServer, ServerError

BENCH_VENV = ROOT / "load" / ".bench-venv"
RESULTS = ROOT / "load" / "results"
WRK_SCRIPT = ROOT / "load" / "wrk_report.lua"
APP = "load.apps:hello"

SERVERS = ("forkserver", "gunicorn-sync", "gunicorn-gthread", "meinheld")
BASELINE = "gunicorn-sync"
MODES = ("keepalive", "close")
MODE_LABEL = {"keepalive": "keep-alive", "close": "Connection: close"}
CONCURRENCIES = (1, 10, 50, 200)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_SETUP = 3

# Seconds each run costs beyond its duration: wrk start-up and exit, and the pause.
RUN_OVERHEAD = 0.4


class SetupError(Exception):
    """A tool or package the benchmark needs cannot be installed here."""


# --------------------------------------------------------------------------------------------
# Setup: wrk, the bench venv, matplotlib.

def _pip(python: Path | str, *args: str, timeout: float = 900) -> bool:
    result = subprocess.run([str(python), "-m", "pip", "install", "--quiet",
                             "--disable-pip-version-check", *args],
                            cwd=ROOT, check=False, timeout=timeout)
    return result.returncode == 0


def ensure_wrk(install: bool) -> str:
    """wrk's path; installs Debian's package when missing and allowed (as root)."""
    found = shutil.which("wrk")
    if found:
        return found
    if install and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        print("wrk missing: apt-get install -y wrk", flush=True)
        ok = subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], env=env,
                            check=False, timeout=600).returncode == 0
        if not ok:  # a fresh machine may not have read the package lists yet
            subprocess.run(["apt-get", "update", "-q"], env=env, check=False, timeout=600)
            subprocess.run(["apt-get", "install", "-y", "-q", "wrk"], env=env, check=False,
                           timeout=600)
        found = shutil.which("wrk")
    if not found:
        raise SetupError("wrk is not installed; install it with `apt-get install -y wrk` "
                         "(needs root) and run the benchmark again")
    return found


def ensure_bench_venv(install: bool, reinstall: bool) -> tuple[Path, bool]:
    """Return (the bench venv's python, whether meinheld is installed there).

    A stamp records what was installed for which pyproject.toml, so later runs skip pip.
    forkserver goes in editable, so the benchmark always measures the working tree.
    """
    python = BENCH_VENV / "bin" / "python"
    stamp = BENCH_VENV / ".installed.json"
    want = {"pyproject": hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest(),
            "python": platform.python_version()}
    if not reinstall and stamp.exists() and python.exists():
        have = json.loads(stamp.read_text())
        if all(have.get(key) == value for key, value in want.items()):
            return python, bool(have.get("meinheld"))
    if not install:
        raise SetupError(f"{BENCH_VENV} is missing or stale and --no-install was given")
    if not python.exists():
        print(f"creating {BENCH_VENV}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True, timeout=300)
        # Keeps git from listing the venv whatever the repository's .gitignore says.
        (BENCH_VENV / ".gitignore").write_text("*\n")
    print("installing gunicorn and forkserver into the bench venv", flush=True)
    if not _pip(python, "gunicorn") or not _pip(python, "-e", str(ROOT)):
        raise SetupError("pip could not install gunicorn and forkserver into the bench venv")
    # meinheld's last release pins a greenlet that does not build on Python 3.11; it works
    # with a current one, hence --no-deps. A C build may fail: then it is left out.
    meinheld = _pip(python, "--no-deps", "meinheld", "greenlet", timeout=600)
    if meinheld:
        meinheld = subprocess.run([str(python), "-c", "import meinheld.gmeinheld"],
                                  capture_output=True, check=False, timeout=60).returncode == 0
    if not meinheld:
        print("meinheld could not be installed: it is left out of the comparison", flush=True)
    stamp.write_text(json.dumps({**want, "meinheld": meinheld}))
    return python, meinheld


def ensure_matplotlib(install: bool) -> bool:
    """matplotlib for the picture, from the project's ``load`` extra (in this interpreter)."""
    if importlib.util.find_spec("matplotlib") is not None:
        return True
    if not install or sys.prefix == sys.base_prefix:
        return False
    print("matplotlib missing: installing the 'load' extra", flush=True)
    _pip(sys.executable, "-e", f"{ROOT}[load]")
    importlib.invalidate_caches()
    if importlib.util.find_spec("matplotlib") is None:
        _pip(sys.executable, "matplotlib")  # until the extra lists it
        importlib.invalidate_caches()
    return importlib.util.find_spec("matplotlib") is not None


# --------------------------------------------------------------------------------------------
# Servers.

def _gunicorn_has(python: Path, flag: str) -> bool:
    result = subprocess.run([str(python), "-m", "gunicorn", "--help"], capture_output=True,
                            text=True, check=False, timeout=60)
    return flag in result.stdout


def make_server(name: str, python: Path, workers: int, threads: int, results: Path,
                gunicorn_extra: list[str]) -> ManagedServer:
    log = results / f"bench_{name}.log"
    env = {"PYTHONPATH": str(ROOT)}
    if name == "forkserver":
        return ManagedServer(name, [str(python), "-m", "forkserver", APP, "--workers",
                                    str(workers), "--bind", "127.0.0.1:0"],
                             log, workers, ready_pattern=r"\d+ workers? ready", env=env)
    worker_class = {"gunicorn-sync": ["-k", "sync"],
                    "gunicorn-gthread": ["-k", "gthread", "--threads", str(threads)],
                    "meinheld": ["-k", "meinheld.gmeinheld.MeinheldWorker"]}[name]
    return ManagedServer(name, [str(python), "-m", "gunicorn", APP, *worker_class,
                                "--workers", str(workers), "--bind", "127.0.0.1:0",
                                *gunicorn_extra],
                         log, workers, ready_pattern=r"Booting worker with pid",
                         ready_count=workers, env=env)


# --------------------------------------------------------------------------------------------
# Measuring.

@dataclass(frozen=True)
class Run:
    """One wrk run; latencies in milliseconds."""

    server: str
    mode: str
    concurrency: int
    round: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())


def parse_wrk(stdout: str) -> dict[str, float]:
    """The JSON line printed by wrk_report.lua."""
    for line in stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            return json.loads(line[len("BENCH_JSON "):])
    raise ValueError("wrk printed no BENCH_JSON line:\n" + stdout[-2000:])


def run_wrk(wrk: str, url: str, concurrency: int, duration: int, mode: str) -> dict[str, float]:
    argv = [wrk, "-t1", f"-c{concurrency}", f"-d{duration}s", "--timeout", "5s",
            "-s", str(WRK_SCRIPT)]
    if mode == "close":
        argv += ["-H", "Connection: close"]
    argv.append(url + "/")
    result = subprocess.run(argv, capture_output=True, text=True, check=False,
                            timeout=duration + 60)
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stderr.strip()}")
    return parse_wrk(result.stdout)


def measure(wrk: str, server: ManagedServer, mode: str, concurrency: int, duration: int,
            round_no: int) -> Run:
    data = run_wrk(wrk, server.url, concurrency, duration, mode)
    seconds = data["duration_us"] / 1e6 or 1.0
    errors = {key: int(data[key]) for key in ("connect", "read", "write", "timeout", "status")}
    return Run(server.name, mode, concurrency, round_no, int(data["requests"]),
               data["requests"] / seconds, data["p50_us"] / 1000, data["p99_us"] / 1000, errors)


# --------------------------------------------------------------------------------------------
# Summaries.

@dataclass(frozen=True)
class Cell:
    """Median of the rounds for one server, mode and concurrency."""

    server: str
    mode: str
    concurrency: int
    rounds: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    ratio: float | None  # rps / the baseline's rps in the same mode and concurrency


def summarize(runs: list[Run], servers: list[str]) -> list[Cell]:
    groups: dict[tuple[str, str, int], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.server, run.mode, run.concurrency), []).append(run)
    medians = {key: statistics.median(r.rps for r in group) for key, group in groups.items()}
    cells = []
    for (server, mode, conc), group in groups.items():
        base = medians.get((BASELINE, mode, conc))
        cells.append(Cell(server, mode, conc, len(group), medians[(server, mode, conc)],
                          statistics.median(r.p50_ms for r in group),
                          statistics.median(r.p99_ms for r in group),
                          sum(r.error_total for r in group),
                          medians[(server, mode, conc)] / base if base else None))
    order = {name: i for i, name in enumerate(servers)}
    cells.sort(key=lambda c: (MODES.index(c.mode), c.concurrency, order.get(c.server, 99)))
    return cells


def _cell(cells: list[Cell], server: str, mode: str, conc: int) -> Cell | None:
    return next((c for c in cells if (c.server, c.mode, c.concurrency) == (server, mode, conc)),
                None)


def _mean_worker_rss(rss: dict[str, dict], server: str) -> float | None:
    workers = rss.get(server, {}).get("workers") or []
    return sum(workers) / len(workers) if workers else None


def check_targets(cells: list[Cell], rss: dict[str, dict]) -> list[tuple[str, str, str]]:
    """Issue 6's targets as (target, measured, verdict); n/a when a server is missing."""
    rows: list[tuple[str, str, str]] = []

    def ratio(mode: str, conc: int, other: str) -> float | None:
        mine, theirs = _cell(cells, "forkserver", mode, conc), _cell(cells, other, mode, conc)
        return mine.rps / theirs.rps if mine and theirs and theirs.rps else None

    def add(target: str, value: float | None, limit: float, fmt: str, higher: bool) -> None:
        if value is None:
            rows.append((target, "n/a", "n/a"))
            return
        ok = value >= limit if higher else value <= limit
        rows.append((target, fmt.format(value), "met" if ok else "NOT met"))

    add("keep-alive, c=50: >= 6x gunicorn sync", ratio("keepalive", 50, BASELINE), 6.0,
        "{:.2f}x", True)
    add("keep-alive, c=50: >= 1.0x meinheld", ratio("keepalive", 50, "meinheld"), 1.0,
        "{:.2f}x", True)
    add("Connection: close, c=50: >= 2.5x gunicorn sync", ratio("close", 50, BASELINE), 2.5,
        "{:.2f}x", True)
    mine, theirs = _mean_worker_rss(rss, "forkserver"), _mean_worker_rss(rss, BASELINE)
    add("worker RSS within 10% of a gunicorn sync worker",
        mine / theirs if mine and theirs else None, 1.10, "{:.2f}x", False)
    ours = [c for c in cells if c.server == "forkserver"]
    failed = sum(c.errors for c in ours)
    rows.append(("no failed request at any concurrency", f"{failed} errors",
                 ("met" if failed == 0 else "NOT met") if ours else "n/a"))
    for mode in MODES:
        for other in ("gunicorn-sync", "gunicorn-gthread"):
            mine_c, theirs_c = (_cell(cells, "forkserver", mode, 200),
                                _cell(cells, other, mode, 200))
            target = f"{MODE_LABEL[mode]}, c=200: p99 below {other}"
            if mine_c is None or theirs_c is None:
                rows.append((target, "n/a", "n/a"))
            else:
                rows.append((target, f"{mine_c.p99_ms:.1f} vs {theirs_c.p99_ms:.1f} ms",
                             "met" if mine_c.p99_ms < theirs_c.p99_ms else "NOT met"))
    return rows


# Run by the bench venv's python: the versions that were actually measured.
_VERSIONS_SCRIPT = """
import importlib.metadata as m, json, platform
out = {"python": platform.python_version()}
for name in ("forkserver", "gunicorn", "meinheld", "greenlet"):
    try:
        out[name] = m.version(name)
    except m.PackageNotFoundError:
        pass
print(json.dumps(out))
"""


def machine_info(python: Path, wrk: str) -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = subprocess.run([str(python), "-c", _VERSIONS_SCRIPT], check=False,
                              capture_output=True, text=True, timeout=60)
    info = {"date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs "
                       f"({len(os.sched_getaffinity(0))} usable), {platform.platform()}"}
    try:
        info.update(json.loads(versions.stdout))
    except ValueError:
        pass
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False, timeout=30)
    if head.returncode == 0:
        # --no-optional-locks: a status must not rewrite the index of a tree others work in.
        dirty = subprocess.run(["git", "--no-optional-locks", "-C", str(ROOT), "status",
                                "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               check=False, timeout=30).stdout.strip()
        info["commit"] = head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    wrk_version = subprocess.run([wrk, "--version"], capture_output=True, text=True,
                                 check=False, timeout=30)
    # "wrk debian/4.1.0-3+b2 [epoll] Copyright ..." -> "debian/4.1.0-3+b2"
    words = (wrk_version.stdout or wrk_version.stderr).split()
    info["wrk"] = words[1] if len(words) > 1 else "unknown"
    return info


def _mib(value: float | None) -> str:
    return "-" if not value else f"{value / (1 << 20):.1f}"


def render_markdown(cells: list[Cell], rss: dict[str, dict], info: dict[str, str],
                    settings: dict[str, object], targets: list[tuple[str, str, str]],
                    incomplete: str = "") -> str:
    lines = ["# forkserver benchmark", ""]
    if incomplete:
        lines += [(f"**Incomplete run ({incomplete}): the figures below cover part of the "
                   "matrix only.**"), ""]
    lines += [
        f"{info['date']} on {info['machine']}.",
        "",
        "Versions: " + ", ".join(f"{k} {info[k]}" for k in
                                 ("python", "forkserver", "gunicorn", "meinheld", "greenlet",
                                  "wrk") if k in info)
        + (f"; forkserver commit {info['commit']}" if "commit" in info else "") + ".",
        "",
        (f"App `{APP}` (13-byte body with Content-Length), {settings['workers']} workers per "
         f"server (gthread: {settings['threads']} threads each), "
         f"`wrk -t1 -d{settings['duration']}s`, median of {settings['rounds']} rounds with the "
         "server order rotated every round. Errors: wrk's socket errors (connect, read, write, "
         "timeout) plus non-2xx/3xx responses, summed over the rounds. Ratio: requests/s over "
         "gunicorn sync's in the same mode and concurrency."),
        "",
        "| server | mode | concurrency | req/s | p50 (ms) | p99 (ms) | errors | x gunicorn sync |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        ratio = "-" if c.ratio is None else f"{c.ratio:.2f}"
        lines.append(f"| {c.server} | {MODE_LABEL[c.mode]} | {c.concurrency} | {c.rps:,.0f} | "
                     f"{c.p50_ms:.2f} | {c.p99_ms:.2f} | {c.errors} | {ratio} |")
    lines += ["", "## Worker memory after the run", "",
              "| server | workers | RSS per worker (MiB) | workers' sum (MiB) | master (MiB) |",
              "|---|---:|---|---:|---:|"]
    for server, data in rss.items():
        per = ", ".join(_mib(v) for v in data.get("workers", []))
        lines.append(f"| {server} | {len(data.get('workers', []))} | {per} | "
                     f"{_mib(data.get('workers_sum'))} | {_mib(data.get('master'))} |")
    lines += ["", "## Targets (issue 6)", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in targets]
    lines += ["", "![requests/s against concurrency](bench.png)", ""]
    return "\n".join(lines)


def render_png(cells: list[Cell], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if any(c.mode == m for c in cells)]
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        servers = list(dict.fromkeys(c.server for c in cells if c.mode == mode))
        for server in servers:
            points = sorted((c.concurrency, c.rps) for c in cells
                            if c.mode == mode and c.server == server)
            # One colour per server in every panel, whichever servers took part.
            color = f"C{SERVERS.index(server)}" if server in SERVERS else None
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", color=color,
                    linewidth=2.5 if server == "forkserver" else 1.5, label=server)
        concs = sorted({c.concurrency for c in cells})
        ax.set_xscale("log")
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrent connections (wrk -t1)")
        ax.set_ylabel("requests/s (median of rounds)")
        ax.set_title(MODE_LABEL[mode])
        ax.grid(True, alpha=0.3)
    # One legend for both panels, below them, where it cannot hide a line.
    handles, labels = {}, []
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in handles:
                handles[label] = handle
                labels.append(label)
    fig.legend([handles[label] for label in labels], labels, loc="lower center",
               ncol=len(labels), frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line.

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark forkserver against gunicorn and meinheld with wrk.")
    parser.add_argument("--quick", action="store_true",
                        help="2 s runs instead of 4 s (3 rounds still): about 4 minutes")
    parser.add_argument("--duration", type=int, default=None,
                        help="seconds per wrk run (default: 4; 2 with --quick)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds per figure; the median is reported (default: 3)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCIES),
                        help="wrk connection counts (default: 1 10 50 200)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS),
                        help="servers to compare (meinheld is skipped when it did not build)")
    parser.add_argument("-w", "--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4, help="gunicorn gthread threads")
    parser.add_argument("--warmup", type=int, default=1,
                        help="seconds of warm-up per server, 0 for none (default: 1)")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between runs")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--no-install", action="store_true",
                        help="install nothing; fail if wrk or the bench venv is missing")
    parser.add_argument("--reinstall", action="store_true",
                        help="reinstall the bench venv's packages")
    return parser


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    duration = args.duration or (2 if args.quick else 4)
    if duration < 1 or args.rounds < 1 or args.workers < 1 or args.threads < 1 \
            or min(args.concurrency) < 1:
        print("bench.py: durations, rounds, workers, threads and concurrencies must be >= 1",
              file=sys.stderr)
        return EXIT_FAILED
    if args.rounds < 3:
        print("note: fewer than 3 rounds; the medians are not robust", flush=True)
    install = not args.no_install
    try:
        wrk = ensure_wrk(install)
        python, has_meinheld = ensure_bench_venv(install, args.reinstall)
    except (SetupError, subprocess.CalledProcessError) as exc:
        print(f"bench.py: {exc}", file=sys.stderr)
        return EXIT_SETUP
    can_plot = ensure_matplotlib(install)
    if not can_plot:
        print("matplotlib is not available: bench.png will not be drawn", flush=True)
    names = [s for s in args.servers if s != "meinheld" or has_meinheld]
    results: Path = args.results_dir
    results.mkdir(parents=True, exist_ok=True)
    concurrencies = sorted(set(args.concurrency))

    total_runs = len(names) * len(args.modes) * len(concurrencies) * args.rounds
    estimate = total_runs * (duration + args.pause + RUN_OVERHEAD) + len(names) * (args.warmup + 3)
    print(f"{total_runs} wrk runs of {duration}s: about {estimate / 60:.1f} minutes", flush=True)

    signal.signal(signal.SIGTERM, _raise_interrupt)
    gunicorn_extra = ["--log-level", "info"]
    if _gunicorn_has(python, "--no-control-socket"):
        # gunicorn >= 24 opens a control socket at one fixed path per user; several masters
        # at once would fight over it, and the benchmark does not need it.
        gunicorn_extra.append("--no-control-socket")
    servers: list[ManagedServer] = []
    runs: list[Run] = []
    rss: dict[str, dict] = {}
    problems: list[str] = []
    try:
        for name in names:
            server = make_server(name, python, args.workers, args.threads, results,
                                 gunicorn_extra)
            servers.append(server)
            server.start()
            print(f"{name}: {server.url}", flush=True)
            if args.warmup > 0:
                run_wrk(wrk, server.url, 10, args.warmup, "keepalive")
        for mode in args.modes:
            for conc in concurrencies:
                for round_no in range(args.rounds):
                    shift = round_no % len(servers)
                    for server in servers[shift:] + servers[:shift]:
                        time.sleep(args.pause)
                        run = measure(wrk, server, mode, conc, duration, round_no)
                        runs.append(run)
                        errors = f", {run.error_total} errors" if run.error_total else ""
                        print(f"{MODE_LABEL[mode]:>17} c={conc:<3} round {round_no + 1}: "
                              f"{server.name:<16} {run.rps:>9,.0f} req/s  "
                              f"p99 {run.p99_ms:7.2f} ms{errors}", flush=True)
        for server in servers:
            rss[server.name] = server.rss()
    except KeyboardInterrupt:
        problems.append("interrupted")
    except (ServerError, RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
        problems.append(str(exc))
    finally:
        for server in servers:
            try:
                status = server.stop()
                if status != 0:
                    problems.append(f"{server.name} exited with status {status}")
            except ServerError as exc:
                problems.append(str(exc))

    if runs:
        cells = summarize(runs, names)
        info = machine_info(python, wrk)
        settings = {"workers": args.workers, "threads": args.threads, "duration": duration,
                    "rounds": args.rounds}
        targets = check_targets(cells, rss)
        (results / "bench.json").write_text(json.dumps(
            {"info": info, "settings": settings, "rss": rss,
             "runs": [asdict(r) for r in runs]}, indent=1))
        markdown = render_markdown(cells, rss, info, settings, targets,
                                   "; ".join(problems)[:200])
        (results / "bench.md").write_text(markdown)
        if can_plot:
            render_png(cells, results / "bench.png",
                       f"forkserver vs gunicorn, hello world, {args.workers} workers - "
                       f"{info['date']} - {info['machine']}")
        print(markdown)
        print(f"wrote {results / 'bench.md'}" + (" and bench.png" if can_plot else ""))
    if problems:
        print("bench.py: " + "\n".join(problems), file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
