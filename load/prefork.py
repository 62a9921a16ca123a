"""A bare prefork skeleton for the benchmark's reference servers (the ceiling loop, bjoern).

    python load/prefork.py ceiling --bind 127.0.0.1:0 --workers 2
    python load/prefork.py bjoern --app load.apps:hello --bind 127.0.0.1:0 --workers 2

The master binds one listening socket, prints ``Listening at: http://HOST:PORT (PID)`` and
``N workers ready`` (the lines load/servers.py waits for, as with forkserver), forks the
workers and waits. On SIGTERM or SIGINT it terminates the workers by PID and reaps them; if a
worker dies on its own, the master stops the rest and exits 1, so a broken row fails loudly
instead of running on fewer workers. Workers get SIGKILL if the master dies (PR_SET_PDEATHSIG),
so nothing outlives a killed benchmark.

Deliberately not forkserver code: a reference point must not share the code it measures.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1
STOP_GRACE = 5.0
SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _fork_worker(listener: socket.socket, run: Callable[[socket.socket], None]) -> int:
    pid = os.fork()
    if pid:
        return pid
    try:
        _die_with_parent()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        run(listener)
        os._exit(0)
    finally:
        # Only reached when run() raised: report it, and never return into the master's code.
        traceback.print_exc()
        os._exit(1)


def _stop(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + STOP_GRACE
    while pids and time.monotonic() < deadline:
        pid, _ = os.waitpid(-1, os.WNOHANG)
        if pid:
            pids.discard(pid)
        else:
            time.sleep(0.02)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)


def serve(host: str, port: int, workers: int, run: Callable[[socket.socket], None]) -> int:
    """Bind, fork ``workers`` running ``run(listener)``, wait for a signal; the exit status."""
    listener = socket.create_server((host, port), backlog=2048)
    listener.setblocking(False)
    bound_host, bound_port = listener.getsockname()[:2]
    # Blocked before forking: a signal that arrives early waits for sigwait instead of killing.
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    print(f"Listening at: http://{bound_host}:{bound_port} ({os.getpid()})", flush=True)
    pids = {_fork_worker(listener, run) for _ in range(workers)}
    listener.close()
    print(f"{workers} workers ready", flush=True)
    while True:
        signum = signal.sigwait(SIGNALS)
        if signum != signal.SIGCHLD:
            _stop(pids)
            return 0
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid in pids:
            pids.discard(pid)
            print(f"worker {pid} died (status {status}): stopping", file=sys.stderr, flush=True)
            _stop(pids)
            return 1


def _bjoern_worker(app_spec: str) -> Callable[[socket.socket], None]:
    module, _, name = app_spec.partition(":")
    app = getattr(importlib.import_module(module), name or "application")

    def run(listener: socket.socket) -> None:
        import bjoern
        bjoern.server_run(listener, app)
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("ceiling", "bjoern"))
    parser.add_argument("--bind", default="127.0.0.1:0", help="HOST:PORT (default: port 0)")
    parser.add_argument("-w", "--workers", type=int, default=2)
    parser.add_argument("--app", default="load.apps:hello", help="WSGI app (bjoern only)")
    args = parser.parse_args(argv)
    host, _, port = args.bind.rpartition(":")
    if args.kind == "ceiling":
        from load.ceiling import run_worker
        return serve(host, int(port), args.workers, run_worker)
    return serve(host, int(port), args.workers, _bjoern_worker(args.app))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
