"""The ``forkserver`` command: argv to Settings, the one-shot actions, then the master.

User errors (bad settings, an app that does not import) end here as one line on stderr and a
non-zero exit status: 2 for configuration and usage errors, 1 when --check-config finds that the
app does not load. A traceback is added only with ``--log-level debug``, because for these errors
the line names the culprit and the traceback would mostly show forkserver's own frames.

``forkserver status`` is the one subcommand: it asks a running server's metrics listener for
/status and prints the workers as a table, like Apache's server-status page.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any, NamedTuple

from forkserver import addresses, config, loader

EXIT_USAGE = 2
EXIT_LOAD = 1


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and return the exit status."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["status"]:
        # A subcommand word, not an app: an app module named "status" is "status:app" or
        # "status:application" on the command line.
        return status_main(args[1:])
    cwd = os.getcwd()
    namespace: argparse.Namespace | None = None
    try:
        namespace = config.parse_args(args)
        if namespace.version:
            # Before reading any config, so --version works even where the config is broken.
            print(f"forkserver {_version()}")
            return 0
        overrides = config.cli_overrides(namespace)
        settings = config.resolve(overrides, namespace.config, os.environ, cwd)
    except config.ConfigError as exc:
        return _fail(exc, EXIT_USAGE, _debug_requested(namespace, os.environ))
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0

    if namespace.print_config:
        print(config.to_toml(settings), end="")
        return 0

    debug = settings.log_level == "debug"
    try:
        _prepare_imports(settings)
    except config.ConfigError as exc:
        return _fail(exc, EXIT_USAGE, debug)

    if namespace.check_config:
        try:
            loader.load_app(settings.app)
        except loader.LoadError as exc:
            return _fail(exc, EXIT_LOAD, debug)
        print(f"forkserver: config ok, app {settings.app} loads")
        return 0

    # Imported here so that the one-shot actions above never pay for (or depend on) the
    # server machinery.
    from forkserver.master import Master

    config_file = namespace.config

    def reload() -> Any:
        # A HUP re-reads the file and the environment, but the command line cannot change
        # after start, so the same overrides are applied on top again.
        return config.resolve(overrides, config_file, os.environ, cwd)

    return Master(settings, reload=reload).run()


def _version() -> str:
    # (imported where used: architecture.md, "What a worker inherits")
    from importlib import metadata

    try:
        return metadata.version("forkserver")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def _prepare_imports(settings: Any) -> None:
    """Apply ``chdir`` and ``pythonpath`` and put the working directory first on sys.path.

    The console script's sys.path[0] is its bin directory, not the directory it was started
    from, so without this ``forkserver myapp:app`` would not find ./myapp.py.
    """
    chdir = settings.chdir
    if chdir:
        try:
            os.chdir(chdir)
        except OSError as exc:
            raise config.ConfigError(f"chdir = {chdir!r}: {exc.strerror}") from None
    here = os.getcwd()
    extra = [p.strip() for p in settings.pythonpath.split(",") if p.strip()]
    for path in reversed([here, *(os.path.abspath(p) for p in extra)]):
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)


def _debug_requested(namespace: argparse.Namespace | None, environ: Mapping[str, str]) -> bool:
    """Whether the user asked for debug, judged before the settings could be resolved."""
    level = getattr(namespace, "log_level", None) or environ.get("FORKSERVER_LOG_LEVEL", "")
    return level.strip().lower() == "debug"


def _fail(exc: Exception, status: int, debug: bool) -> int:
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    print(f"forkserver: error: {exc}", file=sys.stderr)
    return status


# --------------------------------------------------------------------------------------------
# forkserver status

EXIT_UNREACHABLE = 1
STATUS_TIMEOUT = 5.0
STATUS_MAX_BYTES = 16 * 1024 * 1024  # far above any real page; stops an endless answer
WATCH_INTERVAL = 1.0
_CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen
# One character per worker, as in Apache's scoreboard line.
_STATE_KEYS = {"idle": "_", "busy": "W", "keepalive": "K", "booting": "S", "exiting": "G"}


class StatusTarget(NamedTuple):
    """Where ``forkserver status`` connects: an AF_UNIX path, or a (host, port) to resolve."""

    family: int
    where: str | tuple[str, int]
    shown: str  # the address as the user wrote it, for messages
    host: str = "localhost"  # the Host header: the listener answers only names of its own


class StatusError(Exception):
    """The server could not be asked (down, wrong address, not a forkserver metrics port)."""


class _StatusParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise config.ConfigError(message)


def _status_parser() -> argparse.ArgumentParser:
    parser = _StatusParser(
        prog="forkserver status",
        description="Show the workers of a running forkserver, read from its metrics listener "
        "(/status).",
        allow_abbrev=False,
    )
    parser.add_argument("--metrics-bind", metavar="ADDRESS", default=None,
                        help="the server's metrics address, HOST:PORT or unix:/path (default: "
                        "metrics_bind from the configuration)")
    parser.add_argument("-c", "--config", metavar="FILE", default=None,
                        help="config file to read metrics_bind from (found as the server finds it)")
    parser.add_argument("--pidfile", metavar="FILE", default=None,
                        help="the server's pidfile: its metrics address is read from FILE.metrics, "
                        "which the master writes beside it")
    parser.add_argument("--metrics-token", metavar="TOKEN", default=None,
                        help="bearer token the listener asks for (default: metrics_token from "
                        "the configuration)")
    parser.add_argument("--watch", action="store_true",
                        help="refresh every second until Ctrl-C")
    parser.add_argument("--count", type=int, metavar="N", default=None,
                        help="refresh N times, then stop (implies --watch)")
    return parser


def status_main(argv: list[str]) -> int:
    """``forkserver status``: 0 when shown, 1 when the server cannot be asked, 2 on usage."""
    try:
        namespace = _status_parser().parse_args(argv)
        address = namespace.metrics_bind
        if address is None and namespace.pidfile:
            address = _address_beside_pidfile(namespace.pidfile)
        settings = None
        if address is None:
            settings = config.resolve({}, namespace.config, os.environ, os.getcwd())
            address = settings.metrics_bind
            if not address:
                raise config.ConfigError("no metrics address: pass --metrics-bind or set "
                                         "metrics_bind in the configuration")
        target = _status_target(address)
        token = namespace.metrics_token
        if token is None:
            token = _configured_token(settings, namespace.config)
        if namespace.count is not None and namespace.count < 1:
            raise config.ConfigError("--count must be at least 1")
    except config.ConfigError as exc:
        return _fail(exc, EXIT_USAGE, False)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    watch = namespace.watch or namespace.count is not None
    rounds = namespace.count if watch else 1
    shown = 0
    try:
        while True:
            try:
                data = fetch_status(target, token=token)
                try:
                    text = format_status(data)
                except (TypeError, ValueError, AttributeError):
                    raise StatusError(f"{target.shown} answered a /status page that this "
                                      "version cannot read") from None
            except StatusError as exc:
                return _fail(exc, EXIT_UNREACHABLE, False)
            sys.stdout.write((_CLEAR if watch else "") + text)
            sys.stdout.flush()
            shown += 1
            if rounds is not None and shown >= rounds:
                return 0
            time.sleep(WATCH_INTERVAL)
    except KeyboardInterrupt:
        return 0


def _configured_token(settings: config.Settings | None, config_file: str | None) -> str:
    """metrics_token as the server reads it. When the address was given directly, a broken
    configuration only means no token: the listener then says whether it wants one."""
    if settings is None:
        try:
            settings = config.resolve({}, config_file, os.environ, os.getcwd())
        except config.ConfigError:
            return ""
    return settings.metrics_token


def _address_beside_pidfile(pidfile: str) -> str:
    path = pidfile + ".metrics"
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()
    except OSError as exc:
        raise config.ConfigError(f"cannot read {path} (is metrics_bind set on that server?): "
                                 f"{exc.strerror}") from None


def _status_target(address: str) -> StatusTarget:
    """Where to connect for a metrics address written in the bind forms."""
    address = address.strip()
    try:
        spec = addresses.parse(address)
    except addresses.AddressError as exc:
        raise config.ConfigError(f"metrics address {address!r}: {exc.why}") from None
    if spec.kind == "unix":
        return StatusTarget(socket.AF_UNIX, spec.path, address)
    if spec.kind == "fd":
        raise config.ConfigError(f"metrics address {address!r}: an inherited descriptor has no "
                                 "address to connect to; pass --metrics-bind HOST:PORT")
    # A wildcard bind listens on loopback too, and the wildcard itself is no destination.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(spec.host, spec.host)
    return StatusTarget(socket.AF_UNSPEC, (host, spec.port), address,
                        addresses.host_port(host, spec.port))


def _connect(target: StatusTarget, timeout: float) -> socket.socket:
    if isinstance(target.where, str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(target.where)
        except OSError:
            sock.close()
            raise
        return sock
    return socket.create_connection(target.where, timeout=timeout)


def fetch_status(target: StatusTarget, timeout: float = STATUS_TIMEOUT, token: str = "") -> dict:
    """GET /status from the metrics listener and decode its JSON."""
    shown = target.shown
    authorization = f"Authorization: Bearer {token}\r\n" if token else ""
    request = (f"GET /status HTTP/1.1\r\nHost: {target.host}\r\nAccept: application/json\r\n"
               f"{authorization}Connection: close\r\n\r\n")
    try:
        with _connect(target, timeout) as sock:
            sock.sendall(request.encode("latin-1"))
            chunks = []
            received = 0
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                received += len(chunk)
                if received > STATUS_MAX_BYTES:
                    raise StatusError(f"{shown} answered more than "
                                      f"{STATUS_MAX_BYTES // 1048576} MiB; not a /status page")
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise StatusError(f"cannot reach the metrics listener at {shown}: {reason}") from None
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    if status_line.startswith("HTTP/1.1 401 "):
        what = "a different token" if token else "a token"
        raise StatusError(f"{shown} wants {what}: pass --metrics-token or set metrics_token")
    if not status_line.startswith("HTTP/1.1 200 "):
        raise StatusError(f"{shown} answered {status_line or 'nothing'!r}, not a /status page")
    try:
        data = json.loads(body)
    except ValueError:
        raise StatusError(f"{shown} answered with something that is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("workers"), list):
        raise StatusError(f"{shown} answered JSON that is not a forkserver /status page")
    return data


def _printable(value: object, width: int = 0) -> str:
    # What a server sends ends up on a terminal: no escape sequences get through.
    text = "".join(ch if ch.isprintable() else "?" for ch in str(value))
    if width and len(text) > width:
        text = text[: width - 1] + "~"
    return text


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _mib(size: object) -> str:
    return f"{int(size or 0) / 1048576:.1f}"


RUNNING_SHOWN = 8  # requests listed per worker; more are summed up in one line
_COLUMNS = (f"{'PID':>7} {'GEN':>4} {'STATE':<9} {'THREADS':>7} {'REQUESTS':>9} {'FOR':>7} "
            f"{'USS MiB':>8} {'PSS MiB':>8} {'CONN':>5}  REQUEST")
# Where the FOR and REQUEST columns end and begin, for a worker's further running requests.
_FOR_END = _COLUMNS.index("FOR") + len("FOR")
_REQUEST_AT = _COLUMNS.rindex("REQUEST")


def _running(worker: dict) -> list[tuple[float, str]]:
    """(seconds, request) of each request a worker runs, oldest first; a server without
    per-thread records gives its one current request."""
    running = worker.get("running")
    if isinstance(running, list):
        return [(float(r.get("seconds", 0)), str(r.get("request", ""))) for r in running]
    if worker.get("state") == "busy" and worker.get("current_request"):
        return [(float(worker.get("busy_seconds", 0)), str(worker["current_request"]))]
    return []


def _worker_lines(w: dict) -> list[str]:
    """A worker's row, then one line per further running request (at most RUNNING_SHOWN)."""
    running = _running(w)
    threads = int(w.get("threads", 1))
    first_for, first = (_duration(running[0][0]), running[0][1]) if running else ("-", "")
    lines = [
        f"{_printable(w.get('pid', '?')):>7} {_printable(w.get('generation', '?')):>4} "
        f"{_printable(w.get('state', '?'), 9):<9} {f'{len(running)}/{threads}':>7} "
        f"{int(w.get('requests', 0)):>9} {first_for:>7} "
        f"{_mib(w.get('uss')):>8} {_mib(w.get('pss')):>8} {int(w.get('connections', 0)):>5}  "
        f"{_printable(first, 60)}".rstrip()
    ]
    for seconds, request in running[1:RUNNING_SHOWN]:
        lines.append(f"{_duration(seconds):>{_FOR_END}}{'':{_REQUEST_AT - _FOR_END}}"
                     f"{_printable(request, 60)}")
    if len(running) > RUNNING_SHOWN:
        lines.append(f"{'':{_REQUEST_AT}}... and {len(running) - RUNNING_SHOWN} more")
    return lines


def _memory_line(master: dict, workers: list, totals: dict) -> str:
    """The server's memory: PSS adds up, so it leads; USS and RSS follow."""
    memory = totals.get("memory", {})
    parts = [f"master {_mib(master.get('pss'))}",
             f"workers {_mib(sum(int(w.get('pss') or 0) for w in workers))}"]
    parts += [f"{_printable(p.get('role', '?'), 12)} {_mib(p.get('pss'))}"
              for p in master.get("others", [])]
    return (f"memory: {_mib(memory.get('pss'))} MiB PSS in all ({', '.join(parts)}); "
            f"USS {_mib(memory.get('uss'))} MiB, RSS {_mib(memory.get('rss'))} MiB")


def _summary(workers: list, totals: dict) -> list[str]:
    states = totals.get("workers", {})
    by_state = ", ".join(f"{n} {_printable(state)}" for state, n in states.items() if n)
    responses = ", ".join(f"{_printable(k)} {n}" for k, n in totals.get("responses", {}).items()
                          if n)
    busy = int(totals.get("busy_threads", totals.get("in_flight", 0)))
    threads = int(totals.get("threads", len(workers)))
    handoffs = totals.get("handoffs", {})
    handed = ""
    if handoffs.get("sent") or handoffs.get("adopted"):
        handed = (f"; {int(handoffs.get('sent', 0))} connections handed off, "
                  f"{int(handoffs.get('adopted', 0))} adopted")
    serving = (f"{len(workers)} workers ({by_state or 'none'}); {busy} of {threads} threads "
               f"busy; {int(totals.get('connections', 0))} connections open")
    served = (f"{int(totals.get('requests', 0))} requests ({responses or 'none'}); "
              f"{_mib(totals.get('sent_bytes'))} MiB sent{handed}")
    return [serving, served]


def format_status(data: dict) -> str:
    """The table ``forkserver status`` prints: a header, one row per worker (and a line per
    further running request of a threaded worker), a summary line."""
    master = data.get("master", {})
    totals = data.get("totals", {})
    workers = data.get("workers", [])
    restarts = master.get("restarts", {})
    keys = "".join(_STATE_KEYS.get(w.get("state"), "?") for w in workers)
    lines = [
        (f"forkserver master {_printable(master.get('pid', '?'))}, "
         f"up {_duration(master.get('uptime', 0))}, "
         f"{int(master.get('reloads', 0))} reloads, "
         f"{sum(int(n) for n in restarts.values())} worker restarts"),
        f"scoreboard: {keys}   (_ idle, W busy, K keep-alive, S starting, G exiting)",
        _memory_line(master, workers, totals),
        "",
        _COLUMNS,
    ]
    for w in workers:
        lines.extend(_worker_lines(w))
    lines.append("")
    lines.extend(_summary(workers, totals))
    return "\n".join(lines) + "\n"
