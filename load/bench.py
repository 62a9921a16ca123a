"""Side-by-side benchmark: forkserver against the ceiling and its peers (``make bench``).

    .venv/bin/python load/bench.py            # c=50, 3 rounds, about 8 minutes on 2 cores
    .venv/bin/python load/bench.py --full     # also 1, 10 and 200 connections, about 17 minutes
    .venv/bin/python load/bench.py --quick    # smoke run: 2 s runs, 1 round, about 2 minutes

Every server serves ``load.apps:hello`` with the same number of workers on 127.0.0.1, from its
own virtualenv ``load/.bench-venv`` (load/bench_env.py). The rows:

- ``ceiling``: load/ceiling.py, a pure-Python prefork epoll loop that does no parsing at all,
  the yardstick: what this interpreter on this machine can do per request;
- ``forkserver`` (this checkout), ``granian`` (WSGI), ``bjoern`` (forked N times, as its
  README does; needs libev-dev), ``meinheld``, gunicorn ``sync`` and ``gthread``.

``wrk -t1`` measures keep-alive and ``Connection: close`` at 50 connections (``--full``: at 1,
10, 50 and 200); at 50 connections only, keep-alive with a browser-like request (9 header
fields, a cookie), keep-alive over TLS for forkserver and gunicorn gthread with one certificate
made by trustme for the run (when the forkserver under test completes a TLS handshake), and
keep-alive on a Flask app (load/flaskapp.py: hello and a small ``jsonify`` object) for
forkserver, granian, meinheld and gunicorn gthread (the ceiling runs no app: not applicable).
All servers stay up for the whole run and take turns within each round, with the order rotated
every round, so drift on a shared machine hits them all alike; each figure is the median of the
rounds. CPU per request is the user + system CPU time of the server's whole process tree
(psutil, before and after each run) over the requests served. Every table is ratio-first: each
row against forkserver and against the ceiling, measured in the same run; absolute figures move
with the machine.

Writes ``load/results/bench.md`` (tables, targets, machine), ``bench.png`` (requests/s per
server at 50 connections; with ``--full``, against concurrency) and ``bench.json`` (every
single run, for re-analysis).

Exit status: 0 after a complete run, 1 when a server failed or left processes behind,
3 when wrk or the bench venv cannot be set up.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the ``load`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from load import bench_env
from load.contenders import KINDS, Contender, Tls, gunicorn_common_flags, start_command
from load.servers import ManagedServer, NoTls, ServerError
from load.wrk import run_wrk

APP = "load.apps:hello"
FLASK_APP = "load.flaskapp:app"
REFERENCE = "forkserver"
CEILING = "ceiling"
MODES = ("keepalive", "close", "browser", "tls", "flask", "flask-json")
MODE_LABEL = {"keepalive": "keep-alive", "close": "Connection: close",
              "browser": "keep-alive, browser-like request", "tls": "keep-alive over TLS",
              "flask": "Flask hello, keep-alive", "flask-json": "Flask JSON, keep-alive"}
# Run at one concurrency (--side-concurrency), not the whole range.
SIDE_MODES = ("browser", "tls", "flask", "flask-json")
# The modes whose servers run the Flask app (load/flaskapp.py), and the path each one asks.
FLASK_MODES = ("flask", "flask-json")
MODE_PATH = {"flask-json": "/json"}
FLASK_KINDS = ("forkserver", "granian", "meinheld", "gunicorn-gthread")
# Why the ceiling has no row in a mode: it speaks no TLS and runs no app.
NO_CEILING = {"tls": "it speaks no TLS", "flask": "it runs no app",
              "flask-json": "it runs no app"}
# With wrk's own Host, the 9 header fields a browser sends for a page (issue 14's request).
BROWSER_HEADERS = (
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    "Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "Accept-Language: en-GB,en;q=0.7,fr;q=0.3",
    "Accept-Encoding: gzip, deflate, br, zstd",
    "Referer: http://127.0.0.1/catalogue/index.html?page=2",
    "Cookie: sessionid=3k9x0v2m7q1w8e5r4t6y; csrftoken=Zx81kLmN0pQrStUvWxYz1234; theme=dark",
    "Upgrade-Insecure-Requests: 1",
    "Sec-Fetch-Mode: navigate",
)
TLS_KINDS = ("forkserver", "gunicorn-gthread")
TLS_FLAGS = ("--certfile", "--keyfile")
# The default run measures the headline concurrency only (about 8 minutes on 2 cores);
# --full adds the curve.
CONCURRENCIES = (50,)
FULL_CONCURRENCIES = (1, 10, 50, 200)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_SETUP = 3

# Seconds each run costs beyond its duration: wrk start-up and exit, and the pause.
RUN_OVERHEAD = 0.15
# Seconds a server takes to start and stop, besides its warm-up.
START_SECONDS = 1.5


# --------------------------------------------------------------------------------------------
# Measuring.

@dataclass(frozen=True)
class Run:
    """One wrk run; latencies in milliseconds, CPU in microseconds per request."""

    server: str
    mode: str
    concurrency: int
    round: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float | None
    errors: dict[str, int]

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())


def measure(wrk: str, server: ManagedServer, mode: str, concurrency: int, duration: int,
            round_no: int) -> Run:
    before = server.cpu_seconds()
    result = run_wrk(wrk, server.url + MODE_PATH.get(mode, "/"), concurrency, duration,
                     close=mode == "close",
                     headers=BROWSER_HEADERS if mode == "browser" else ())
    spent = server.cpu_seconds() - before
    cpu_us = spent / result.requests * 1e6 if result.requests else None
    return Run(server.name, mode, concurrency, round_no, result.requests, result.rps,
               result.p50_ms, result.p99_ms, cpu_us, result.errors)


# --------------------------------------------------------------------------------------------
# Summaries.

@dataclass(frozen=True)
class Cell:
    """Median of the rounds for one server, mode and concurrency; ratios of requests/s."""

    server: str
    mode: str
    concurrency: int
    rounds: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float | None
    errors: int
    x_reference: float | None  # over forkserver's, same mode and concurrency
    x_ceiling: float | None  # over the ceiling's


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(runs: list[Run], servers: list[str]) -> list[Cell]:
    groups: dict[tuple[str, str, int], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.server, run.mode, run.concurrency), []).append(run)
    medians = {key: statistics.median(r.rps for r in group) for key, group in groups.items()}

    def over(base: str, server: str, mode: str, conc: int) -> float | None:
        theirs = medians.get((base, mode, conc))
        return medians[(server, mode, conc)] / theirs if theirs else None

    cells = [Cell(server, mode, conc, len(group), medians[(server, mode, conc)],
                  statistics.median(r.p50_ms for r in group),
                  statistics.median(r.p99_ms for r in group),
                  _median([r.cpu_us for r in group]), sum(r.error_total for r in group),
                  over(REFERENCE, server, mode, conc), over(CEILING, server, mode, conc))
             for (server, mode, conc), group in groups.items()]
    order = {name: i for i, name in enumerate(servers)}
    cells.sort(key=lambda c: (MODES.index(c.mode), c.concurrency, order.get(c.server, 99)))
    return cells


def _cell(cells: list[Cell], server: str, mode: str, conc: int) -> Cell | None:
    return next((c for c in cells if (c.server, c.mode, c.concurrency) == (server, mode, conc)),
                None)


def _mean_worker_rss(rss: dict[str, dict], server: str) -> float | None:
    workers = rss.get(server, {}).get("workers") or []
    return sum(workers) / len(workers) if workers else None


Target = tuple[str, str, str]


def _verdict(target: str, value: float | None, limit: float, higher: bool = True) -> Target:
    if value is None:
        return (target, "n/a", "n/a")
    return (target, *bench_env.judged(value, limit, higher))


def _cpu_ratio(cells: list[Cell]) -> float | None:
    browser, plain = _cell(cells, REFERENCE, "browser", 50), _cell(cells, REFERENCE, "keepalive", 50)
    if browser and plain and browser.cpu_us and plain.cpu_us:
        return browser.cpu_us / plain.cpu_us
    return None


def check_targets(cells: list[Cell], rss: dict[str, dict]) -> list[Target]:
    """Targets of issues 6, 14 and 16 as (target, measured, verdict); n/a when a row is missing."""
    def ratio(mode: str, conc: int, other: str) -> float | None:
        mine, theirs = _cell(cells, REFERENCE, mode, conc), _cell(cells, other, mode, conc)
        return mine.rps / theirs.rps if mine and theirs and theirs.rps else None

    rows = [
        _verdict("keep-alive, c=50: >= 1.0x granian", ratio("keepalive", 50, "granian"), 1.0),
        _verdict("keep-alive, c=50: >= 1.2x meinheld", ratio("keepalive", 50, "meinheld"), 1.2),
        _verdict("keep-alive, c=50: >= 0.5x the ceiling", ratio("keepalive", 50, CEILING), 0.5),
        _verdict("Connection: close, c=50: >= 0.75x the ceiling",
                 ratio("close", 50, CEILING), 0.75),
        _verdict("TLS keep-alive, c=50: >= 2x gunicorn gthread",
                 ratio("tls", 50, "gunicorn-gthread"), 2.0),
        _verdict("CPU per request, browser-like vs wrk's request, c=50: <= 1.5x",
                 _cpu_ratio(cells), 1.5, higher=False),
        _verdict("Flask hello, keep-alive, c=50: >= 1.0x meinheld",
                 ratio("flask", 50, "meinheld"), 1.0),
        _verdict("Flask JSON, keep-alive, c=50: >= 1.0x meinheld",
                 ratio("flask-json", 50, "meinheld"), 1.0),
        _verdict("keep-alive, c=50: >= 6x gunicorn sync",
                 ratio("keepalive", 50, "gunicorn-sync"), 6.0),
        _verdict("Connection: close, c=50: >= 2.5x gunicorn sync",
                 ratio("close", 50, "gunicorn-sync"), 2.5),
    ]
    mine, theirs = _mean_worker_rss(rss, REFERENCE), _mean_worker_rss(rss, "gunicorn-sync")
    rows.append(_verdict("worker RSS within 10% of a gunicorn sync worker",
                         mine / theirs if mine and theirs else None, 1.10, higher=False))
    ours = [c for c in cells if c.server == REFERENCE]
    failed = sum(c.errors for c in ours)
    rows.append(("no failed request at any concurrency", f"{failed} errors",
                 ("met" if failed == 0 else "NOT met") if ours else "n/a"))
    return rows


def _mib(value: float | None) -> str:
    return "-" if not value else f"{value / (1 << 20):.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _mode_table(cells: list[Cell], mode: str, info: dict[str, str]) -> list[str]:
    lines = [f"## {MODE_LABEL[mode]}", ""]
    if mode in FLASK_MODES:
        lines += [f"App `{FLASK_APP}`, path `{MODE_PATH.get(mode, '/')}`.", ""]
    lines += [bench_env.caption(info), "",
              ("| server | concurrency | x forkserver | x ceiling | req/s | CPU µs/req | "
               "p50 (ms) | p99 (ms) | errors |"),
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    no_ceiling = NO_CEILING.get(mode)
    for c in cells:
        if c.mode != mode:
            continue
        cpu = "-" if c.cpu_us is None else f"{c.cpu_us:.0f}"
        lines.append(f"| {c.server} | {c.concurrency} | {_x(c.x_reference)} | "
                     f"{'n/a' if no_ceiling else _x(c.x_ceiling)} | {c.rps:,.0f} | {cpu} | "
                     f"{c.p50_ms:.2f} | {c.p99_ms:.2f} | {c.errors} |")
    if no_ceiling:
        lines.append(f"| {CEILING} | - | not applicable: {no_ceiling} | | | | | | |")
    return [*lines, ""]


def render_markdown(cells: list[Cell], rss: dict[str, dict], info: dict[str, str],
                    settings: dict[str, object], targets: list[Target], notes: list[str],
                    incomplete: str = "") -> str:
    lines = ["# forkserver benchmark", ""]
    if incomplete:
        lines += [(f"**Incomplete run ({incomplete}): the figures below cover part of the "
                   "matrix only.**"), ""]
    lines += [
        f"{info['date']} on {info['machine']}.", "", bench_env.versions_line(info), "",
        (f"App `{APP}` (13-byte body with Content-Length; the Flask rows: `{FLASK_APP}`), "
         f"{settings['workers']} workers per server (gthread: {settings['threads']} threads "
         "each), "
         f"`wrk -t1 -d{settings['duration']}s`, median of {settings['rounds']} rounds with the "
         "server order rotated every round. Ratios: requests/s over forkserver's and over the "
         "ceiling's (load/ceiling.py: a pure-Python prefork epoll loop with no parsing) in "
         "the same mode and concurrency, in this run. CPU µs/req: user + system CPU of the "
         "server's whole process tree over the requests served. Errors: wrk's socket errors "
         "plus non-2xx/3xx responses, summed over the rounds. Absolute figures move with the "
         "machine (2x between machines is common); ratios from one run are what to compare."),
        "",
    ]
    lines += [f"- {note}" for note in notes] + ([""] if notes else [])
    for mode in MODES:
        if any(c.mode == mode for c in cells):
            lines += _mode_table(cells, mode, info)
    lines += ["## Worker memory after the run", "", bench_env.caption(info), "",
              "| server | workers | RSS per worker (MiB) | workers' sum (MiB) | master (MiB) |",
              "|---|---:|---|---:|---:|"]
    for server, data in rss.items():
        per = ", ".join(_mib(v) for v in data.get("workers", []))
        lines.append(f"| {server} | {len(data.get('workers', []))} | {per} | "
                     f"{_mib(data.get('workers_sum'))} | {_mib(data.get('master'))} |")
    lines += ["", "## Targets (issues 6, 14, 16)", "", "| target | measured | verdict |",
              "|---|---|---|"]
    lines += [f"| {t} | {m} | {v} |" for t, m, v in targets]
    lines += ["", "![requests/s against concurrency](bench.png)", ""]
    return "\n".join(lines)


def render_png(cells: list[Cell], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    curve = len({c.concurrency for c in cells if c.mode in ("keepalive", "close")}) > 1
    modes = [m for m in (("keepalive", "close") if curve else MODES)
             if any(c.mode == m for c in cells)]
    if not modes:
        return
    columns = min(len(modes), 3)
    rows = -(-len(modes) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4.2 * rows), squeeze=False)
    for ax, mode in zip(axes.flat, modes):
        (_draw_curve if curve else _draw_bars)(ax, [c for c in cells if c.mode == mode])
        ax.set_title(MODE_LABEL[mode], fontsize=10)
    for ax in list(axes.flat)[len(modes):]:
        ax.set_visible(False)
    if curve:
        # One legend for both panels, below them, where it cannot hide a line.
        handles: dict[str, object] = {}
        for ax in axes.flat:
            for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
                handles.setdefault(label, handle)
        fig.legend(list(handles.values()), list(handles), loc="lower center",
                   ncol=len(handles), frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.07 if curve else 0, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _color(server: str) -> str | None:
    # One colour per server in every panel, whichever servers took part.
    return f"C{KINDS.index(server)}" if server in KINDS else None


def _draw_curve(ax: object, cells: list[Cell]) -> None:
    """Requests/s against concurrency, one line per server (the --full matrix)."""
    for server in dict.fromkeys(c.server for c in cells):
        points = sorted((c.concurrency, c.rps) for c in cells if c.server == server)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                color=_color(server), linewidth=2.5 if server == REFERENCE else 1.5,
                linestyle="--" if server == CEILING else "-", label=server)
    concs = sorted({c.concurrency for c in cells})
    ax.set_xscale("log")
    ax.set_xticks(concs, [str(c) for c in concs])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent connections (wrk -t1)")
    ax.set_ylabel("requests/s (median of rounds)")
    ax.grid(True, alpha=0.3)


def _draw_bars(ax: object, cells: list[Cell]) -> None:
    """Requests/s of each server at one concurrency, labelled with its ratio to forkserver."""
    from matplotlib.ticker import FuncFormatter

    cells = sorted(cells, key=lambda c: c.rps)
    bars = ax.barh([c.server for c in cells], [c.rps for c in cells],
                   color=[_color(c.server) for c in cells])
    ax.bar_label(bars, [f"{c.rps:,.0f}" + ("" if c.x_reference is None
                                           else f" ({c.x_reference:.2f}x)") for c in cells],
                 padding=3, fontsize=8)
    ax.set_xlim(0, max(c.rps for c in cells) * 1.45)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value / 1000:g}k"))
    ax.set_xlabel(f"requests/s at c={cells[0].concurrency} (median of rounds; x forkserver)")
    ax.grid(True, axis="x", alpha=0.3)


# --------------------------------------------------------------------------------------------
# Command line.

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark forkserver against the ceiling loop and its peers with wrk.")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 2 s runs, 1 round (unless --rounds is given)")
    parser.add_argument("--full", action="store_true",
                        help="keep-alive and close at 1, 10, 50 and 200 connections, not 50 only "
                             "(about 3 times as long)")
    parser.add_argument("--duration", type=int, default=None,
                        help="seconds per wrk run (default: 4; 2 with --quick)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds per figure; the median is reported (default: 3; 1 with "
                             "--quick)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=None,
                        help="wrk connection counts of the keep-alive and close runs "
                             "(default: 50; 1 10 50 200 with --full)")
    parser.add_argument("--side-concurrency", type=int, default=50,
                        help="connection count of the browser-like and TLS runs (default: 50)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--servers", nargs="+", choices=KINDS, default=list(KINDS),
                        help="servers to compare (those that did not build are skipped)")
    parser.add_argument("-w", "--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4, help="gunicorn gthread threads")
    parser.add_argument("--warmup", type=int, default=1,
                        help="seconds of warm-up per server, 0 for none (default: 1)")
    parser.add_argument("--pause", type=float, default=0.2, help="seconds between runs")
    parser.add_argument("--results-dir", type=Path, default=bench_env.RESULTS)
    parser.add_argument("--no-install", action="store_true",
                        help="install nothing; fail if wrk or the bench venv is missing")
    parser.add_argument("--reinstall", action="store_true",
                        help="reinstall the bench venv's packages")
    return parser


def make_tls(results: Path) -> Tls | None:
    """A throwaway CA and a certificate for 127.0.0.1, made by trustme for this run."""
    try:
        import trustme
    except ImportError:
        return None
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    certfile, keyfile = results / "bench-tls-cert.pem", results / "bench-tls-key.pem"
    cert.cert_chain_pems[0].write_to_path(str(certfile))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(certfile), append=True)
    cert.private_key_pem.write_to_path(str(keyfile))
    return Tls(certfile, keyfile)


@dataclass
class Plan:
    """What runs: the servers per mode and the notes about rows left out."""

    servers: dict[str, list[ManagedServer]]
    notes: list[str]

    def distinct(self) -> list[ManagedServer]:
        """Every server once, in the order the modes name them (modes share servers)."""
        seen: dict[int, ManagedServer] = {}
        for group in self.servers.values():
            for server in group:
                seen.setdefault(id(server), server)
        return list(seen.values())

    def drop(self, server: ManagedServer) -> None:
        """Take a server out of every mode (it could not be started)."""
        self.servers = {mode: kept for mode, group in self.servers.items()
                        if (kept := [s for s in group if s is not server])}


def plan_servers(args: argparse.Namespace, python: Path, missing: dict[str, str],
                 results: Path) -> Plan:
    forkserver_help = bench_env.help_text(python, "forkserver")
    gunicorn_extra = gunicorn_common_flags(bench_env.help_text(python, "gunicorn"))
    notes = [f"{name}: left out ({why})" for name, why in missing.items()
             if why and name in args.servers]
    names = [s for s in args.servers if not missing.get(s)]

    def make(kind: str, tls: Tls | None = None, app: str = APP, tag: str = "") -> ManagedServer:
        contender = Contender(kind, kind, args.workers,
                              args.threads if kind == "gunicorn-gthread" else 1)
        log = results / f"bench_{kind}{tag}.log"
        return start_command(contender, python, app, log, gunicorn_extra, tls)

    plain = [make(kind) for kind in names]
    servers = {mode: plain for mode in args.modes if mode in ("keepalive", "close", "browser")}
    flask_modes = [mode for mode in args.modes if mode in FLASK_MODES]
    if flask_modes:
        flask = [make(kind, app=FLASK_APP, tag="_flask") for kind in FLASK_KINDS
                 if kind in names]
        servers.update({mode: flask for mode in flask_modes if flask})
    if "tls" in args.modes:
        tls = make_tls(results)
        tls_kinds = [k for k in TLS_KINDS if k in names]
        if tls is None:
            notes.append("TLS rows: left out (trustme is not installed in this venv)")
            tls_kinds = []
        elif "forkserver" in tls_kinds and not bench_env.supports(forkserver_help, *TLS_FLAGS):
            notes.append("forkserver over TLS: not supported by this build (no --certfile)")
            tls_kinds.remove("forkserver")
        if tls_kinds:
            servers["tls"] = [make(kind, tls, tag="_tls") for kind in tls_kinds]
    return Plan(servers, notes)


def start_servers(plan: Plan, wrk: str, warmup: int, problems: list[str]
                  ) -> list[ManagedServer]:
    """Start and warm up every server of the plan; those that fail leave the plan.

    A server given a certificate must complete a TLS handshake: a build that accepts
    ``--certfile`` but answers in plain text is "not supported by this build", not a failure.
    Any other failure to start is a problem (exit 1) but the other rows still run.
    """
    running: list[ManagedServer] = []
    for server in plan.distinct():
        label = f"{server.name}{' over TLS' if server.scheme == 'https' else ''}"
        try:
            server.start()
        except NoTls as exc:
            plan.notes.append(f"{label}: not supported by this build ({exc.reason})")
            plan.drop(server)
            print(plan.notes[-1], flush=True)
            continue
        except ServerError as exc:
            problems.append(str(exc))
            plan.notes.append(f"{label}: left out (did not start; see {server.log_path.name})")
            plan.drop(server)
            print(plan.notes[-1], flush=True)
            continue
        running.append(server)
        print(f"{label}: {server.url}", flush=True)
        if warmup > 0:
            run_wrk(wrk, server.url + "/", 10, warmup)
    return running


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_rounds(args: argparse.Namespace, wrk: str, plan: Plan, duration: int,
               concurrencies: list[int]) -> list[Run]:
    runs: list[Run] = []
    for mode, servers in plan.servers.items():
        for conc in ([args.side_concurrency] if mode in SIDE_MODES else concurrencies):
            for round_no in range(args.rounds):
                shift = round_no % len(servers)
                for server in servers[shift:] + servers[:shift]:
                    time.sleep(args.pause)
                    run = measure(wrk, server, mode, conc, duration, round_no)
                    runs.append(run)
                    errors = f", {run.error_total} errors" if run.error_total else ""
                    cpu = f"{run.cpu_us:5.0f} µs/req" if run.cpu_us else ""
                    print(f"{MODE_LABEL[mode]:>19} c={conc:<3} round {round_no + 1}: "
                          f"{server.name:<16} {run.rps:>9,.0f} req/s  {cpu}  "
                          f"p99 {run.p99_ms:7.2f} ms{errors}", flush=True)
    return runs


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    duration = args.duration or (2 if args.quick else 4)
    args.rounds = args.rounds or (1 if args.quick else 3)
    concurrencies = sorted(set(args.concurrency or (FULL_CONCURRENCIES if args.full
                                                    else CONCURRENCIES)))
    if min(duration, args.rounds, args.workers, args.threads, args.side_concurrency,
           *concurrencies) < 1:
        print("bench.py: durations, rounds, workers, threads and concurrencies must be >= 1",
              file=sys.stderr)
        return EXIT_FAILED
    if args.rounds < 3:
        print("note: fewer than 3 rounds; the medians are not robust", flush=True)
    install = not args.no_install
    try:
        wrk = bench_env.ensure_wrk(install)
        python, missing = bench_env.ensure_bench_venv(install, args.reinstall)
    except (bench_env.SetupError, subprocess.CalledProcessError) as exc:
        print(f"bench.py: {exc}", file=sys.stderr)
        return EXIT_SETUP
    can_plot = bench_env.ensure_matplotlib(install)
    if not can_plot:
        print("matplotlib is not available: bench.png will not be drawn", flush=True)
    results: Path = args.results_dir
    results.mkdir(parents=True, exist_ok=True)
    plan = plan_servers(args, python, missing, results)
    for note in plan.notes:
        print(note, flush=True)
    minutes = estimate_seconds(plan, args, duration, concurrencies) / 60
    print(f"{count_runs(plan, args.rounds, concurrencies)} wrk runs of {duration}s: about "
          f"{minutes:.1f} minutes", flush=True)

    signal.signal(signal.SIGTERM, _raise_interrupt)
    runs: list[Run] = []
    rss: dict[str, dict] = {}
    problems: list[str] = []
    started = plan.distinct()
    try:
        running = start_servers(plan, wrk, args.warmup, problems)
        runs = run_rounds(args, wrk, plan, duration, concurrencies)
        # Memory of the hello-world servers (the Flask and TLS ones hold more by design).
        hello = plan.servers.get("keepalive") or plan.servers.get("close") or []
        for server in running:
            if any(server is s for s in hello):
                rss[server.name] = server.rss()
    except KeyboardInterrupt:
        problems.append("interrupted")
    except (ServerError, RuntimeError, ValueError, subprocess.TimeoutExpired) as exc:
        problems.append(str(exc))
    finally:
        for server in started:
            try:
                status = server.stop()
                if status not in (0, None):
                    problems.append(f"{server.name} exited with status {status}")
            except ServerError as exc:
                problems.append(str(exc))
    if runs:
        write_report(args, runs, rss, python, wrk, duration, plan.notes, problems, can_plot)
    if problems:
        print("bench.py: " + "\n".join(problems), file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def count_runs(plan: Plan, rounds: int, concurrencies: list[int]) -> int:
    return sum(len(group) * rounds * (1 if mode in SIDE_MODES else len(concurrencies))
               for mode, group in plan.servers.items())


def estimate_seconds(plan: Plan, args: argparse.Namespace, duration: int,
                     concurrencies: list[int]) -> float:
    """The run's length: every wrk run and every server's start-up and warm-up."""
    return (count_runs(plan, args.rounds, concurrencies) * (duration + args.pause + RUN_OVERHEAD)
            + len(plan.distinct()) * (args.warmup + START_SECONDS))


def write_report(args: argparse.Namespace, runs: list[Run], rss: dict[str, dict],
                 python: Path, wrk: str, duration: int, notes: list[str], problems: list[str],
                 can_plot: bool) -> None:
    results: Path = args.results_dir
    cells = summarize(runs, list(KINDS))
    info = bench_env.machine_info(python, wrk)
    settings = {"workers": args.workers, "threads": args.threads, "duration": duration,
                "rounds": args.rounds, "concurrencies": sorted({r.concurrency for r in runs})}
    targets = check_targets(cells, rss)
    (results / "bench.json").write_text(json.dumps(
        {"info": info, "settings": settings, "notes": notes, "rss": rss,
         "runs": [asdict(r) for r in runs]}, indent=1))
    markdown = render_markdown(cells, rss, info, settings, targets, notes,
                               "; ".join(problems)[:200])
    (results / "bench.md").write_text(markdown)
    if can_plot:
        render_png(cells, results / "bench.png",
                   f"hello world and Flask, {args.workers} workers - {info['cpu']}, {info['cores']} "
                   f"cores, Python {info.get('python', '?')} - {info['date']}")
    print(markdown)
    print(f"wrote {results / 'bench.md'}" + (" and bench.png" if can_plot else ""))


if __name__ == "__main__":
    sys.exit(main())
