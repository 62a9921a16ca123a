"""Running wrk and reading its exact figures (through load/wrk_report.lua's JSON line)."""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass

from load.servers import ROOT

WRK_SCRIPT = ROOT / "load" / "wrk_report.lua"
ERROR_KINDS = ("connect", "read", "write", "timeout", "status")


@dataclass(frozen=True)
class WrkResult:
    """One wrk run; latencies in milliseconds."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())


def parse_wrk(stdout: str) -> WrkResult:
    """The JSON line printed by wrk_report.lua."""
    for line in stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            data = json.loads(line[len("BENCH_JSON "):])
            return WrkResult(int(data["requests"]), data["duration_us"] / 1e6,
                             data["p50_us"] / 1000, data["p99_us"] / 1000,
                             {key: int(data[key]) for key in ERROR_KINDS})
    raise ValueError("wrk printed no BENCH_JSON line:\n" + stdout[-2000:])


def wrk_command(wrk: str, url: str, concurrency: int, duration: float,
                close: bool = False, headers: tuple[str, ...] = ()) -> list[str]:
    # wrk takes whole seconds only.
    argv = [wrk, "-t1", f"-c{concurrency}", f"-d{math.ceil(duration)}s", "--timeout", "5s",
            "-s", str(WRK_SCRIPT)]
    if close:
        argv += ["-H", "Connection: close"]
    for header in headers:
        argv += ["-H", header]
    return [*argv, url]


def start_wrk(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_wrk(proc: subprocess.Popen, timeout: float) -> WrkResult:
    """Wait for a wrk started by start_wrk; kill it (by its PID) if it overruns."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"wrk still running {timeout:.0f}s after start: killed") from None
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): "
                           f"{(stderr.strip() or stdout.strip())[-500:]}")
    return parse_wrk(stdout)


def run_wrk(wrk: str, url: str, concurrency: int, duration: float,
            close: bool = False, headers: tuple[str, ...] = ()) -> WrkResult:
    proc = start_wrk(wrk_command(wrk, url, concurrency, duration, close, headers))
    return finish_wrk(proc, duration + 60)
