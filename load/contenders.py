"""How each server of the benchmarks is started, from the bench venv, on 127.0.0.1.

A ``Contender`` is one row: a server kind with its worker count, threads and extra flags.
``start_command`` turns it into a ``ManagedServer`` that knows when the server is ready and
how to stop it. forkserver's optional flags (``--threads``, ``--handoff-delay``,
``--certfile``...) are checked against ``forkserver --help`` by the caller, so a row the build
under test cannot run is reported as such instead of failing the benchmark.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from load.servers import ROOT, ManagedServer, free_port

GUNICORN_CLASSES = {"gunicorn-sync": "sync", "gunicorn-gthread": "gthread",
                    "meinheld": "meinheld.gmeinheld.MeinheldWorker"}
KINDS = ("ceiling", "forkserver", "granian", "bjoern", "meinheld", "gunicorn-sync",
         "gunicorn-gthread")


@dataclass(frozen=True)
class Tls:
    certfile: Path
    keyfile: Path


@dataclass(frozen=True)
class Contender:
    """One server configuration; ``label`` names its row."""

    label: str
    kind: str
    workers: int
    threads: int = 1
    extra: tuple[str, ...] = ()  # further flags for the server's own command line
    env: dict[str, str] = field(default_factory=dict)

    def needs_flags(self) -> tuple[str, ...]:
        """forkserver flags this row uses beyond the basics (checked against --help)."""
        wanted = [arg.split("=", 1)[0] for arg in self.extra if arg.startswith("--")]
        if self.kind == "forkserver" and self.threads > 1:
            wanted.append("--threads")
        return tuple(wanted)


def start_command(contender: Contender, python: Path, app: str, log: Path,
                  gunicorn_extra: list[str], tls: Tls | None = None,
                  cwd: Path = ROOT) -> ManagedServer:
    """The ManagedServer for one contender (not started yet)."""
    c = contender
    env = {"PYTHONPATH": os.pathsep.join([str(cwd), str(ROOT)]), **c.env}
    bin_dir = python.parent
    scheme = "https" if tls else "http"
    common = {"log_path": log, "workers": c.workers, "env": env, "cwd": cwd, "scheme": scheme}
    if c.kind == "forkserver":
        argv = [str(python), "-m", "forkserver", app, "--workers", str(c.workers),
                "--bind", "127.0.0.1:0"]
        if c.threads > 1:
            argv += ["--threads", str(c.threads)]
        if tls:
            argv += ["--certfile", str(tls.certfile), "--keyfile", str(tls.keyfile)]
        return ManagedServer(c.label, [*argv, *c.extra], ready_pattern=r"\d+ workers? ready",
                             **common)
    if c.kind in ("ceiling", "bjoern"):
        argv = [str(python), str(ROOT / "load" / "prefork.py"), c.kind, "--workers",
                str(c.workers), "--bind", "127.0.0.1:0", "--app", app]
        return ManagedServer(c.label, argv, ready_pattern=r"\d+ workers ready", **common)
    if c.kind == "granian":
        port = free_port()
        argv = [str(bin_dir / "granian"), "--interface", "wsgi", "--http", "1", "--no-ws",
                "--workers", str(c.workers), "--host", "127.0.0.1", "--port", str(port),
                *c.extra, app]
        return ManagedServer(c.label, argv, ready_pattern=r"Started worker",
                             ready_count=c.workers, fixed_port=port, **common)
    worker_class = ["-k", GUNICORN_CLASSES[c.kind]]
    if c.kind == "gunicorn-gthread":
        worker_class += ["--threads", str(c.threads)]
    if tls:
        worker_class += ["--certfile", str(tls.certfile), "--keyfile", str(tls.keyfile)]
    argv = [str(python), "-m", "gunicorn", app, *worker_class, "--workers", str(c.workers),
            "--bind", "127.0.0.1:0", *gunicorn_extra, *c.extra]
    return ManagedServer(c.label, argv, ready_pattern=r"Booting worker with pid",
                         ready_count=c.workers, **common)


def gunicorn_common_flags(gunicorn_help: str) -> list[str]:
    flags = ["--log-level", "info"]
    if "--no-control-socket" in gunicorn_help:
        # gunicorn >= 24 opens a control socket at one fixed path per user; several masters
        # at once would fight over it, and the benchmarks do not need it.
        flags.append("--no-control-socket")
    return flags
