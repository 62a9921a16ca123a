"""What the master knows about its workers, as Prometheus text (/metrics) and JSON (/status).

The master is the only process that sees every worker, so it is the one that answers: a scrape
still works when every worker is busy or hung, which is exactly when it matters. Three parts:

* ``collect`` turns the scoreboard, memory readings (``memory.Sampler``: RSS, USS, PSS per
  process, each read at most once per interval) and the master's own counters into one
  ``Snapshot``. Counters of exited workers live in ``Totals`` (the master folds a dead worker's
  final slot in before it reuses the slot), so the totals never go back when workers restart.
  A threaded worker's counters are the sum of its threads' records; "in flight" counts busy
  threads, not busy workers.
* ``render_prometheus`` and ``render_status`` are pure functions of a snapshot.
* ``MetricsServer`` is a tiny non-blocking HTTP/1.1 listener that the master drives from its own
  select loop. It accepts only ``GET``/``HEAD`` of four paths, with small limits, one request per
  connection, and never blocks: the master's loop is the control plane and must keep turning.

The listener answers ``/livez`` and ``/readyz`` (probes) to anyone, and ``/metrics`` and
``/status`` only to requests whose ``Host`` names the listener or loopback (else 421, so a web
page cannot read them through DNS rebinding) and, when ``metrics_token`` is set, that carry it
as a bearer token (else 401). ``/status`` leaves out query strings unless ``status_show_query``.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from forkserver import addresses
from forkserver.http.parser import NEED_DATA, HTTPError, Limits, Request, RequestParser
from forkserver.memory import Reading, Sampler
from forkserver.memory import total as memory_total
from forkserver.scoreboard import (
    DURATION_BUCKETS,
    HANDOFF_WAIT_BUCKETS,
    Reason,
    Scoreboard,
    SlotView,
    State,
    ThreadState,
)

__all__ = [
    "ListenerSample",
    "MetricsServer",
    "ProcessSample",
    "Running",
    "Snapshot",
    "Totals",
    "WorkerSample",
    "collect",
    "not_ready",
    "render_prometheus",
    "render_status",
]

STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
WORKER_STATES = ("idle", "busy", "keepalive", "booting", "exiting")
# Every restart reason is reported from the start, at 0, so that rate() sees the first one.
RESTART_REASONS = tuple(reason.name.lower() for reason in Reason if reason is not Reason.NONE)

_STATE_NAMES = {
    State.IDLE: "idle",
    State.BUSY: "busy",
    State.KEEPALIVE: "keepalive",
    State.BOOTING: "booting",
    State.EXITING: "exiting",
}
UNKNOWN = "unknown"  # a worker without a readable slot (one of the image before a USR2 upgrade)
ZERO_MEMORY = Reading(0, 0, 0)
MEMORY_KINDS = Reading._fields  # rss, uss, pss


# --------------------------------------------------------------------------------------------
# Collecting.


class Totals:
    """Counters of workers that have exited, so that totals survive worker restarts."""

    def __init__(self) -> None:
        self.requests = 0
        self.sent_bytes = 0
        self.status_counts = [0] * len(STATUS_CLASSES)
        self.duration_buckets = [0] * len(DURATION_BUCKETS)
        self.duration_sum = 0.0
        self.handoffs_sent = 0
        self.handoffs_adopted = 0
        self.handoff_wait_buckets = [0] * len(HANDOFF_WAIT_BUCKETS)
        self.handoff_wait_sum = 0.0
        self.workers = 0  # how many slots were folded in

    def fold(self, view: SlotView) -> None:
        """Add a dead worker's final slot; call it once per worker, before the slot is released."""
        self.add(view)
        self.workers += 1

    def add(self, view: SlotView) -> None:
        """Add a slot's counters (``fold`` for the dead; ``collect`` for the living, on a copy)."""
        self.requests += view.requests
        self.sent_bytes += view.bytes_sent
        for i, count in enumerate(view.status_counts):
            self.status_counts[i] += count
        for i, count in enumerate(view.duration_buckets):
            self.duration_buckets[i] += count
        self.duration_sum += view.duration_sum
        self.handoffs_sent += view.handoffs_sent
        self.handoffs_adopted += view.handoffs_adopted
        for i, count in enumerate(view.handoff_wait_buckets):
            self.handoff_wait_buckets[i] += count
        self.handoff_wait_sum += view.handoff_wait_sum

    def copy(self) -> Totals:
        other = Totals()
        for name, value in vars(self).items():
            setattr(other, name, list(value) if isinstance(value, list) else value)
        return other


@dataclass(frozen=True)
class Running:
    """A request being run by one of a worker's threads."""

    thread: int  # 0 .. threads - 1
    request: str  # "METHOD /path" (a single-threaded worker's full request line)
    seconds: float  # since it started


@dataclass(frozen=True)
class WorkerSample:
    """One worker as seen at collection time; memory in bytes, times in seconds."""

    pid: int
    index: int  # scoreboard slot, -1 when it has none
    generation: int
    state: str  # one of WORKER_STATES, or "unknown"
    reason: str  # why it is being (or asked to be) replaced; "" when it is not
    requests: int
    sent_bytes: int
    connections: int
    current_request: str  # request line of the (oldest) running request, "" when none
    busy_seconds: float  # how long that request has been running; 0 when none
    age_seconds: float  # since the master started it
    heartbeat_age: float  # since the worker last showed a sign of life
    memory: Reading  # rss, uss (its own pages), pss (its fair share); zeros when unread
    cpu_seconds: float  # user + system
    threads: int = 1  # application threads
    running: tuple[Running, ...] = ()  # one per busy thread, oldest first
    handoffs_sent: int = 0
    handoffs_adopted: int = 0

    @property
    def busy_threads(self) -> int:
        return len(self.running)


@dataclass(frozen=True)
class ProcessSample:
    """A process of the server that serves no requests (the mold of a refork)."""

    role: str
    pid: int
    memory: Reading


@dataclass(frozen=True)
class ListenerSample:
    """A TCP listener's accept queue as the kernel reports it."""

    name: str
    queued: int  # connections waiting to be accepted
    max: int  # the effective backlog limit


@dataclass(frozen=True)
class Snapshot:
    """Everything /metrics and /status show, taken at one moment by ``collect``.

    Counters include the workers that have exited (``Totals``). ``duration_buckets`` holds one
    plain count per bucket of ``scoreboard.DURATION_BUCKETS`` (``handoff_wait_buckets`` of
    ``HANDOFF_WAIT_BUCKETS``); Prometheus' cumulative form is made when rendering.
    """

    master_pid: int
    time: float  # wall clock (time.time()) of the snapshot
    uptime: float
    reloads: int
    restarts: dict[str, int]
    workers: tuple[WorkerSample, ...]
    listeners: tuple[ListenerSample, ...]
    requests: int
    responses: dict[str, int]  # by status class, "1xx" .. "5xx"
    sent_bytes: int
    duration_buckets: tuple[int, ...]
    duration_sum: float
    master_memory: Reading = ZERO_MEMORY
    # Why the master itself says the server must not get traffic ("draining", "shutting
    # down"), or None when it has nothing against it; /readyz adds what the workers show.
    not_ready: str | None = None
    others: tuple[ProcessSample, ...] = ()  # the mold, when there is one
    handoffs_sent: int = 0
    handoffs_adopted: int = 0
    handoff_wait_buckets: tuple[int, ...] = (0,) * len(HANDOFF_WAIT_BUCKETS)
    handoff_wait_sum: float = 0.0
    workers_by_state: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        counts = dict.fromkeys(WORKER_STATES, 0)
        for worker in self.workers:
            counts[worker.state] = counts.get(worker.state, 0) + 1
        object.__setattr__(self, "workers_by_state", counts)

    @property
    def in_flight(self) -> int:
        """Requests being run right now: one per busy thread."""
        return sum(worker.busy_threads for worker in self.workers)

    @property
    def threads(self) -> int:
        """Application threads of the workers that have a slot."""
        return sum(worker.threads for worker in self.workers if worker.index >= 0)

    @property
    def connections(self) -> int:
        return sum(worker.connections for worker in self.workers)

    @property
    def memory(self) -> Reading:
        """The whole server: master, workers and the other processes (PSS is what adds up)."""
        return memory_total([self.master_memory, *(w.memory for w in self.workers),
                             *(p.memory for p in self.others)])


# Readings taken when the master passes none (an older master, or a test): the same cache
# rule, at the default memory_check_interval.
FALLBACK_INTERVAL = 10.0
_fallback = Sampler(FALLBACK_INTERVAL)


def collect(
    scoreboard: Scoreboard,
    workers: list[tuple[int, int, int]],
    totals: Totals,
    restarts: dict[str, int],
    reloads: int,
    started: float,
    listeners: list[socket.socket],
    not_ready: str | None = None,
    readings: Mapping[int, Reading] | None = None,
    others: Mapping[int, str] | None = None,
) -> Snapshot:
    """Take a snapshot. ``workers`` holds (pid, slot index or -1, generation) per live worker.

    ``started`` is the master's start as a ``time.monotonic()`` value; ``not_ready`` is the
    master's reason to refuse traffic ("draining", "shutting down"), None when it has none.
    ``others`` names the server's other processes by pid ({pid: "mold"}). ``readings`` is the
    master's memory.Sampler output for its own pid, the workers and ``others``; without it they
    are read here through a cache of the same kind. Runs in the master's loop, so it only reads
    shared memory, /proc (through psutil) and socket options: no waiting.
    """
    now = time.monotonic()
    master_pid = os.getpid()
    others = dict(others or {})
    if readings is None:
        pids = [master_pid, *(pid for pid, _index, _gen in workers), *others]
        readings = _fallback.readings(pids, now)
    sums = totals.copy()  # plus every live worker's counters, added by _samples
    samples = _samples(scoreboard, workers, readings, sums, now)
    return Snapshot(
        master_pid=master_pid,
        time=time.time(),
        uptime=max(0.0, now - started),
        reloads=reloads,
        restarts={**dict.fromkeys(RESTART_REASONS, 0), **restarts},
        workers=tuple(samples),
        listeners=tuple(s for s in map(listen_backlog, listeners) if s is not None),
        requests=sums.requests,
        responses=dict(zip(STATUS_CLASSES, sums.status_counts)),
        sent_bytes=sums.sent_bytes,
        duration_buckets=tuple(sums.duration_buckets),
        duration_sum=sums.duration_sum,
        master_memory=readings.get(master_pid, ZERO_MEMORY),
        not_ready=not_ready,
        others=tuple(ProcessSample(role, pid, readings.get(pid, ZERO_MEMORY))
                     for pid, role in sorted(others.items())),
        handoffs_sent=sums.handoffs_sent,
        handoffs_adopted=sums.handoffs_adopted,
        handoff_wait_buckets=tuple(sums.handoff_wait_buckets),
        handoff_wait_sum=sums.handoff_wait_sum,
    )


def _samples(scoreboard: Scoreboard, workers: list[tuple[int, int, int]],
             readings: Mapping[int, Reading], sums: Totals, now: float) -> list[WorkerSample]:
    """The live workers, in slot order (those without a slot last); adds their counters."""
    samples = []
    for pid, index, generation in workers:
        usage = readings.get(pid, ZERO_MEMORY)
        cpu = _cpu_seconds(pid)
        if index < 0:
            samples.append(WorkerSample(pid, index, generation, UNKNOWN, "", 0, 0, 0, "", 0.0,
                                        0.0, 0.0, usage, cpu))
            continue
        view = scoreboard.read(index)
        sums.add(view)
        samples.append(_sample(pid, index, generation, view, now, usage, cpu))
    samples.sort(key=lambda s: (s.index < 0, s.index, s.pid))
    return samples


def _running(view: SlotView, now: float) -> tuple[Running, ...]:
    """The requests a worker runs, oldest first."""
    if view.threads:
        busy = [Running(t.number, f"{t.method} {t.path}", max(0.0, now - t.request_start))
                for t in view.threads if t.state is ThreadState.BUSY and t.request_start > 0]
        return tuple(sorted(busy, key=lambda r: -r.seconds))
    if view.state is State.BUSY and view.request_start > 0:
        return (Running(0, view.request_line, max(0.0, now - view.request_start)),)
    return ()


def _sample(pid: int, index: int, generation: int, view: SlotView, now: float, usage: Reading,
            cpu: float) -> WorkerSample:
    """One worker from its scoreboard slot and its process readings."""
    running = _running(view, now)
    return WorkerSample(
        pid=pid,
        index=index,
        generation=generation,
        state=_STATE_NAMES.get(view.state, UNKNOWN),
        reason=view.reason.name.lower() if view.reason is not Reason.NONE else "",
        requests=view.requests,
        sent_bytes=view.bytes_sent,
        connections=view.connections,
        current_request=running[0].request if running else "",
        busy_seconds=running[0].seconds if running else 0.0,
        age_seconds=max(0.0, now - view.booted_at) if view.booted_at else 0.0,
        heartbeat_age=max(0.0, now - view.heartbeat) if view.heartbeat else 0.0,
        memory=usage,
        cpu_seconds=cpu,
        threads=view.thread_count,
        running=running,
        handoffs_sent=view.handoffs_sent,
        handoffs_adopted=view.handoffs_adopted,
    )


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process; 0 if it is gone or unreadable."""
    import psutil  # (imported where used: architecture.md, "What a worker inherits")

    try:
        cpu = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return cpu.user + cpu.system


# The head of Linux's struct tcp_info (include/uapi/linux/tcp.h), which is all that is read:
#   off 0   u8  tcpi_state            (10 = TCP_LISTEN)
#   off 1-7 u8  ca_state, retransmits, probes, backoff, options, wscales, rate/fastopen bits
#   off 8   u32 tcpi_rto, 12 ato, 16 snd_mss, 20 rcv_mss
#   off 24  u32 tcpi_unacked          on a listener: connections in the accept queue
#   off 28  u32 tcpi_sacked           on a listener: the accept queue's limit
# (tcp_get_info() reuses those two fields for sk_ack_backlog and sk_max_ack_backlog.)
_TCP_INFO_HEAD = struct.Struct("=B7xIIIIII")
_TCP_LISTEN = 10


def listen_backlog(sock: socket.socket) -> ListenerSample | None:
    """The accept queue of a listening TCP socket, or None where the kernel does not say."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_HEAD.size)
        name = listener_name(sock)
    except OSError:  # closed meanwhile, or not a TCP socket after all
        return None
    if len(raw) < _TCP_INFO_HEAD.size:
        return None
    state, _rto, _ato, _snd_mss, _rcv_mss, unacked, sacked = _TCP_INFO_HEAD.unpack(raw)
    if state != _TCP_LISTEN:
        return None
    return ListenerSample(name, unacked, sacked)


def listener_name(sock: socket.socket) -> str:
    """The address as the bind setting spells it: HOST:PORT, [IPv6]:PORT or unix:PATH."""
    return addresses.sockname(sock)


# --------------------------------------------------------------------------------------------
# Rendering.


def _number(value: float) -> str:
    """A sample value as the text format spells it (Go's ParseFloat reads all of these)."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def _label(value: str) -> str:
    # The text format's three escapes; a unix socket path may contain any of these.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


_METRICS = {
    # name: (type, help)
    "forkserver_requests_total": ("counter", "Requests served, by all workers past and present."),
    "forkserver_responses_total": ("counter", "Responses sent, by status class."),
    "forkserver_request_duration_seconds": (
        "histogram", "Time from the start of the application call to the end of the response."),
    "forkserver_requests_in_flight": (
        "gauge", "Requests being run right now (one per busy thread)."),
    "forkserver_workers": ("gauge", "Worker processes, by state."),
    "forkserver_threads": ("gauge", "Application threads of all workers, by state."),
    "forkserver_worker_threads": ("gauge", "Application threads of each worker."),
    "forkserver_worker_threads_busy": (
        "gauge", "Application threads of each worker running a request."),
    "forkserver_connections_open": ("gauge", "Client connections held open by the workers."),
    "forkserver_handoffs_sent_total": (
        "counter", "Keep-alive connections a busy worker handed to another worker."),
    "forkserver_handoffs_adopted_total": (
        "counter", "Connections a worker took over from another worker."),
    "forkserver_handoff_wait_seconds": (
        "histogram", "Time from a handed-off connection being ready to its adopter serving it."),
    "forkserver_worker_memory_bytes": (
        "gauge", ("Memory of each worker: rss (resident), uss (its own pages), pss (its share "
                  "of every page it maps).")),
    "forkserver_process_memory_bytes": (
        "gauge", "Memory of the master and of the other processes that serve no requests."),
    "forkserver_memory_bytes": (
        "gauge", ("Memory of the whole server (master, workers, others); pss is the one that "
                  "adds up to what the server uses.")),
    "forkserver_worker_cpu_seconds_total": (
        "counter", "CPU time (user and system) of each worker."),
    "forkserver_worker_restarts_total": ("counter", "Workers that exited, by reason."),
    "forkserver_reloads_total": ("counter", "Configuration reloads (HUP) started."),
    "forkserver_uptime_seconds": ("gauge", "Seconds since the master started."),
    "forkserver_listen_backlog": (
        "gauge", "Connections waiting in a listener's accept queue (TCP listeners only)."),
    "forkserver_listen_backlog_max": ("gauge", "The accept queue limit of each TCP listener."),
    "forkserver_sent_bytes_total": ("counter", "Response bytes sent to clients."),
}

_Sample = tuple[str, str, float]  # suffix, labels, value


def _histogram(bounds: tuple[float, ...], counts: tuple[int, ...], total: float
               ) -> list[_Sample]:
    cumulative = 0
    samples = []
    for bound, count in zip(bounds, counts):
        cumulative += count
        samples.append(("_bucket", f'{{le="{_number(bound)}"}}', cumulative))
    return [*samples, ("_sum", "", total), ("_count", "", cumulative)]


def _memory(labels: str, reading: Reading) -> list[_Sample]:
    return [("", f'{{{labels}kind="{kind}"}}', value)
            for kind, value in zip(MEMORY_KINDS, reading)]


def _traffic(snapshot: Snapshot) -> dict[str, list[_Sample]]:
    busy = snapshot.in_flight
    return {
        "forkserver_requests_total": [("", "", snapshot.requests)],
        "forkserver_responses_total": [("", f'{{class="{k}"}}', n)
                                       for k, n in snapshot.responses.items()],
        "forkserver_request_duration_seconds": _histogram(
            DURATION_BUCKETS, snapshot.duration_buckets, snapshot.duration_sum),
        "forkserver_requests_in_flight": [("", "", busy)],
        "forkserver_workers": [("", f'{{state="{s}"}}', n)
                               for s, n in snapshot.workers_by_state.items()],
        "forkserver_threads": [("", '{state="busy"}', busy),
                               ("", '{state="idle"}', max(0, snapshot.threads - busy))],
        "forkserver_connections_open": [("", "", snapshot.connections)],
        "forkserver_handoffs_sent_total": [("", "", snapshot.handoffs_sent)],
        "forkserver_handoffs_adopted_total": [("", "", snapshot.handoffs_adopted)],
        "forkserver_handoff_wait_seconds": _histogram(
            HANDOFF_WAIT_BUCKETS, snapshot.handoff_wait_buckets, snapshot.handoff_wait_sum),
    }


def _processes(snapshot: Snapshot) -> dict[str, list[_Sample]]:
    workers = snapshot.workers
    others = [("master", snapshot.master_pid, snapshot.master_memory),
              *((p.role, p.pid, p.memory) for p in snapshot.others)]
    return {
        "forkserver_worker_threads": [("", f'{{pid="{w.pid}"}}', w.threads) for w in workers],
        "forkserver_worker_threads_busy": [("", f'{{pid="{w.pid}"}}', w.busy_threads)
                                           for w in workers],
        "forkserver_worker_memory_bytes": [sample for w in workers
                                           for sample in _memory(f'pid="{w.pid}",', w.memory)],
        "forkserver_process_memory_bytes": [
            sample for role, pid, reading in others
            for sample in _memory(f'process="{_label(role)}",pid="{pid}",', reading)],
        "forkserver_memory_bytes": _memory("", snapshot.memory),
        "forkserver_worker_cpu_seconds_total": [("", f'{{pid="{w.pid}"}}', w.cpu_seconds)
                                                for w in workers],
    }


def _server(snapshot: Snapshot) -> dict[str, list[_Sample]]:
    return {
        "forkserver_worker_restarts_total": [("", f'{{reason="{_label(r)}"}}', n)
                                             for r, n in snapshot.restarts.items()],
        "forkserver_reloads_total": [("", "", snapshot.reloads)],
        "forkserver_uptime_seconds": [("", "", round(snapshot.uptime, 3))],
        "forkserver_listen_backlog": [("", f'{{listener="{_label(s.name)}"}}', s.queued)
                                      for s in snapshot.listeners],
        "forkserver_listen_backlog_max": [("", f'{{listener="{_label(s.name)}"}}', s.max)
                                          for s in snapshot.listeners],
        "forkserver_sent_bytes_total": [("", "", snapshot.sent_bytes)],
    }


def render_prometheus(snapshot: Snapshot) -> bytes:
    """The Prometheus text exposition format, version 0.0.4; families in _METRICS' order."""
    families = {**_traffic(snapshot), **_processes(snapshot), **_server(snapshot)}
    out: list[str] = []
    for name, (kind, help_text) in _METRICS.items():
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")
        for suffix, labels, value in families[name]:
            out.append(f"{name}{suffix}{labels} {_number(value)}")
    out.append("")
    return "\n".join(out).encode("utf-8")


def without_query(request_line: str) -> str:
    """A request line with the query string cut out of its target ("GET /a?t=1 HTTP/1.1" ->
    "GET /a HTTP/1.1"); query strings often carry tokens. Works on a truncated line too."""
    method, space, rest = request_line.partition(" ")
    target, space2, version = rest.partition(" ")
    return method + space + target.partition("?")[0] + space2 + version


def not_ready(snapshot: Snapshot) -> str | None:
    """Why /readyz says 503, in a word or two; None when the server can take traffic.

    The master's own reason comes first (a shutdown or drain it has begun). Otherwise at least
    one worker must be past booting and not on its way out; a worker without a slot (one of the
    image before a USR2 upgrade) is serving.
    """
    if snapshot.not_ready:
        return snapshot.not_ready
    states = [worker.state for worker in snapshot.workers]
    if not states:
        return "no workers"
    if any(state in ("idle", "busy", "keepalive", UNKNOWN) for state in states):
        return None
    return "booting" if "booting" in states else "draining"


def _memory_json(reading: Reading) -> dict[str, int]:
    return dict(zip(MEMORY_KINDS, reading))


def _worker_json(w: WorkerSample, show_query: bool) -> dict[str, Any]:
    def shown(line: str) -> str:
        return line if show_query else without_query(line)

    return {
        "pid": w.pid,
        "slot": w.index,
        "generation": w.generation,
        "state": w.state,
        "retiring": w.reason,
        "requests": w.requests,
        "current_request": shown(w.current_request),
        "busy_seconds": round(w.busy_seconds, 3),
        "threads": w.threads,
        "busy_threads": w.busy_threads,
        "running": [{"thread": r.thread, "request": shown(r.request),
                     "seconds": round(r.seconds, 3)} for r in w.running],
        "age_seconds": round(w.age_seconds, 3),
        "heartbeat_age": round(w.heartbeat_age, 3),
        **_memory_json(w.memory),
        "cpu_seconds": round(w.cpu_seconds, 3),
        "connections": w.connections,
        "sent_bytes": w.sent_bytes,
        "handoffs_sent": w.handoffs_sent,
        "handoffs_adopted": w.handoffs_adopted,
    }


def _buckets_json(bounds: tuple[float, ...], counts: tuple[int, ...]) -> dict[str, int]:
    return {_number(bound): count for bound, count in zip(bounds, counts)}


def render_status(snapshot: Snapshot, show_query: bool = False) -> bytes:
    """/status: the master, one entry per worker, and the totals, as one JSON object.

    Query strings are cut from the running requests unless ``show_query`` (a threaded worker's
    threads never record them).
    """
    data = {
        "master": {
            "pid": snapshot.master_pid,
            "time": round(snapshot.time, 3),
            "uptime": round(snapshot.uptime, 3),
            **_memory_json(snapshot.master_memory),
            "reloads": snapshot.reloads,
            "restarts": snapshot.restarts,
            "listeners": [{"name": s.name, "queued": s.queued, "max": s.max}
                          for s in snapshot.listeners],
            "others": [{"role": p.role, "pid": p.pid, **_memory_json(p.memory)}
                       for p in snapshot.others],
        },
        "workers": [_worker_json(w, show_query) for w in snapshot.workers],
        "totals": {
            "requests": snapshot.requests,
            "responses": snapshot.responses,
            "sent_bytes": snapshot.sent_bytes,
            "in_flight": snapshot.in_flight,
            "threads": snapshot.threads,
            "busy_threads": snapshot.in_flight,
            "connections": snapshot.connections,
            "workers": snapshot.workers_by_state,
            "memory": _memory_json(snapshot.memory),
            "duration_sum": round(snapshot.duration_sum, 6),
            "duration_buckets": _buckets_json(DURATION_BUCKETS, snapshot.duration_buckets),
            "handoffs": {
                "sent": snapshot.handoffs_sent,
                "adopted": snapshot.handoffs_adopted,
                "wait_sum": round(snapshot.handoff_wait_sum, 6),
                "wait_buckets": _buckets_json(HANDOFF_WAIT_BUCKETS,
                                              snapshot.handoff_wait_buckets),
            },
        },
    }
    return json.dumps(data, ensure_ascii=True, indent=1).encode("ascii") + b"\n"


# --------------------------------------------------------------------------------------------
# The listener.

# Scrapers and probes send short heads; anything bigger is not one of them.
REQUEST_LIMITS = Limits(max_line=1024, max_fields=20, max_field_size=1024, max_head=8192)
MAX_CONNECTIONS = 32  # past this the listener is left out of fds(): new scrapes wait in the queue
CONNECTION_TTL = 2.0  # seconds a connection may live, request, answer and drain included
ACCEPT_BATCH = 8  # connections taken per wakeup, so a burst cannot hog the master's loop
RECV_SIZE = 4096
DRAIN_LIMIT = 64 * 1024  # bytes read after answering before giving up on a polite close
SEND_BUFFER = 256 * 1024  # so that a whole answer fits the socket and one send() suffices

PLAIN = b"text/plain; charset=utf-8"
PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"
LOOPBACK_NAMES = frozenset(("localhost", "127.0.0.1", "::1"))
PROBES = ("/livez", "/readyz")
GUARDED = ("/metrics", "/status")  # Host-checked, and token-checked when a token is set

_log = logging.getLogger("forkserver.metrics")  # a child of the server's error log


def _head_end(data: bytes) -> int:
    return data.index(b"\r\n\r\n") + 4


def _response(status: bytes, content_type: bytes, body: bytes, head_only: bool = False) -> bytes:
    """A response with a body (200 pages, /readyz's 503): never cached, never kept alive."""
    head = (b"HTTP/1.1 %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            b"Cache-Control: no-store\r\nConnection: close\r\n\r\n"
            % (status, content_type, len(body)))
    return head if head_only else head + body


def _error_bytes(error: HTTPError, extra: bytes = b"") -> bytes:
    """An error answer as http.errors builds it, with ``Cache-Control: no-store`` and ``extra``
    header lines added before the blank line (where ``HTTPError.response`` puts a Date)."""
    data = error.response()
    cut = data.index(b"\r\n\r\n") + 2
    return data[:cut] + b"Cache-Control: no-store\r\n" + extra + data[cut:]


def _error_class(code: int, text: str) -> type[HTTPError]:
    # A subclass gets its response bytes built once by http.errors (HTTPError.__init_subclass__).
    return type(f"HTTP{code}", (HTTPError,), {"status": code, "reason": text})


NOT_FOUND = _error_bytes(_error_class(404, "Not Found")())
NOT_ALLOWED = _error_bytes(_error_class(405, "Method Not Allowed")(), b"Allow: GET, HEAD\r\n")
TOO_LARGE = _error_bytes(_error_class(413, "Content Too Large")())
# 421: the request names a host this listener does not answer for (RFC 9110 section 15.5.20).
MISDIRECTED = _error_bytes(_error_class(421, "Misdirected Request")())
UNAUTHORIZED = _error_bytes(_error_class(401, "Unauthorized")(),
                            b'WWW-Authenticate: Bearer realm="forkserver"\r\n')
BROKEN = _error_bytes(_error_class(500, "Internal Server Error")())


def _cut(data: bytes, head_only: bool) -> bytes:
    return data[:_head_end(data)] if head_only else data


def _local_name(sock: socket.socket) -> str:
    """The address a client reached, as Host would name it (no brackets, no IPv4 mapping)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return ""
    try:
        name = str(sock.getsockname()[0]).lower()
    except OSError:
        return ""
    return name.removeprefix("::ffff:") if "." in name else name


def _host_name(value: str) -> tuple[str, str]:
    """(name, port) of a Host value; an IPv6 literal loses its brackets, the name its case."""
    if value.startswith("["):
        name, _, rest = value[1:].partition("]")
        return name.lower(), rest[1:] if rest.startswith(":") else ""
    name, _, port = value.partition(":")
    return name.lower(), port


class _Conn:
    __slots__ = ("answered", "born", "drained", "fd", "local", "out", "parser", "sock")

    def __init__(self, sock: socket.socket, born: float, local: str) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.born = born
        self.local = local  # the address this connection reached, a name Host may give
        self.parser = RequestParser(REQUEST_LIMITS)
        self.out = b""  # answer bytes not sent yet
        self.answered = False  # the answer is out and our side shut down; only draining now
        self.drained = 0


class MetricsServer:
    """The master's tiny GET-only HTTP listener, driven by the master's own select loop.

    The master selects for reading on ``fds()`` and calls ``on_readable`` for each ready one,
    and calls ``expire`` on every pass. An answer normally leaves in one send (the send buffer
    is enlarged for that); if the client does not take it at once, the rest goes out as the
    master calls ``on_writable`` for ``write_fds()``, or at the latest on the next ``expire``.
    """

    def __init__(self, sock: socket.socket, snapshot: Callable[[], Snapshot],
                 settings: Any = None) -> None:
        sock.setblocking(False)
        self._listener = sock
        self._listener_fd = sock.fileno()
        self._snapshot = snapshot
        self._conns: dict[int, _Conn] = {}
        self._unix = sock.family == socket.AF_UNIX
        self._port = "" if self._unix else str(sock.getsockname()[1])
        self._token = b""
        self._show_query = False
        self._bind_host = ""
        self.configure(settings)

    def configure(self, settings: Any) -> None:
        """Take metrics_token, status_show_query and the host of metrics_bind from ``settings``
        (a ``config.Settings``; None keeps the defaults: no token, no query strings). The master
        calls it again after a reload."""
        if settings is None:
            return
        self._token = settings.metrics_token.encode("ascii")
        self._show_query = settings.status_show_query
        spec = settings.metrics_bind
        self._bind_host = addresses.parse(spec).host.lower() if spec else ""

    def fds(self) -> list[int]:
        """Descriptors to select() on for reading: the listener (unless full) and connections."""
        fds = list(self._conns)
        if len(fds) < MAX_CONNECTIONS and self._listener_fd >= 0:
            fds.append(self._listener_fd)
        return fds

    def write_fds(self) -> list[int]:
        """Connections with part of an answer still to send (rare; see the class docstring)."""
        return [fd for fd, conn in self._conns.items() if conn.out]

    def on_readable(self, fd: int) -> None:
        """Accept, or read from one connection and answer once its request head is complete."""
        if fd == self._listener_fd:
            self._accept()
            return
        conn = self._conns.get(fd)
        if conn is None:
            return
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if conn.answered or conn.out:
            # Anything after the one request is read and dropped so the close is not a reset.
            conn.drained += len(data)
            if not data or conn.drained > DRAIN_LIMIT:
                self._close(conn)
            return
        if not data:
            self._close(conn)  # the client gave up before finishing its request
            return
        conn.parser.feed(data)
        try:
            event = conn.parser.next_event()
        except HTTPError as error:
            self._answer(conn, _error_bytes(error))
            return
        if event is NEED_DATA:
            return
        if isinstance(event, Request):
            self._answer(conn, self._respond(conn, event))

    def on_writable(self, fd: int) -> None:
        """Send more of a pending answer."""
        conn = self._conns.get(fd)
        if conn is not None and conn.out:
            self._flush(conn)

    def expire(self, now: float) -> None:
        """Drop connections older than CONNECTION_TTL (``now`` from time.monotonic())."""
        for conn in list(self._conns.values()):
            if now - conn.born > CONNECTION_TTL:
                self._close(conn)
            elif conn.out:
                self._flush(conn)

    def close(self) -> None:
        """Close every connection and the listener (a unix socket's path is the caller's)."""
        for conn in list(self._conns.values()):
            self._close(conn)
        if self._listener_fd >= 0:
            self._listener.close()
            self._listener_fd = -1

    # -- internals --------------------------------------------------------------------------
    def _accept(self) -> None:
        now = time.monotonic()
        for _ in range(ACCEPT_BATCH):
            if len(self._conns) >= MAX_CONNECTIONS:
                return
            try:
                sock, _address = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                # ECONNABORTED and friends: that client is gone. EMFILE: the master is out of
                # descriptors; the next pass retries rather than spinning here.
                _log.debug("metrics listener: accept failed: %s", error)
                return
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
            except OSError:
                pass
            self._conns[sock.fileno()] = _Conn(sock, now, _local_name(sock))

    def _respond(self, conn: _Conn, request: Request) -> bytes:
        if request.chunked or request.content_length:
            return TOO_LARGE  # nothing here takes a body, and reading one is not worth it
        head_only = request.method == "HEAD"
        if request.method not in ("GET", "HEAD"):
            return NOT_ALLOWED
        path = request.path
        if path == "/livez":
            # Answered from the master's loop, so an answer means the loop is turning.
            return _response(b"200 OK", PLAIN, b"ok\n", head_only)
        if path not in PROBES and path not in GUARDED:
            return _cut(NOT_FOUND, head_only)
        if path in GUARDED and not self._host_allowed(conn, request.host):
            return _cut(MISDIRECTED, head_only)
        if path in GUARDED and not self._authorized(request.headers):
            return _cut(UNAUTHORIZED, head_only)
        try:
            return self._page(path, head_only)
        except Exception:  # noqa: BLE001 - a metrics bug must not take the master down
            _log.exception("metrics: cannot answer %s %s", request.method, path)
            return _cut(BROKEN, head_only)

    def _page(self, path: str, head_only: bool) -> bytes:
        snapshot = self._snapshot()
        if path == "/readyz":
            reason = not_ready(snapshot)
            if reason is None:
                return _response(b"200 OK", PLAIN, b"ready\n", head_only)
            body = reason.replace("\n", " ").encode("ascii", "replace") + b"\n"
            return _response(b"503 Service Unavailable", PLAIN, body, head_only)
        if path == "/metrics":
            return _response(b"200 OK", PROMETHEUS, render_prometheus(snapshot), head_only)
        body = render_status(snapshot, self._show_query)
        return _response(b"200 OK", b"application/json", body, head_only)

    def _host_allowed(self, conn: _Conn, host: str | None) -> bool:
        """Whether Host names this listener: the address the client reached, the host of
        metrics_bind, or a loopback name, on the listener's port if a port is given.

        A request without Host (HTTP/1.0) comes from no browser, and a unix socket is out of a
        browser's reach, so DNS rebinding is not possible there and both are let through.
        """
        if host is None or self._unix:
            return True
        name, port = _host_name(host)
        if port and port != self._port:
            return False
        return name in LOOPBACK_NAMES or name == conn.local or name == self._bind_host

    def _authorized(self, headers: list[tuple[str, str]]) -> bool:
        if not self._token:
            return True
        for name, value in headers:
            if name == "AUTHORIZATION":
                scheme, _, credentials = value.strip().partition(" ")
                if scheme.lower() == "bearer":
                    given = credentials.strip().encode("latin-1")
                    # Constant time: how much of a guess matched must not show in the timing.
                    return hmac.compare_digest(given, self._token)
        return False

    def _answer(self, conn: _Conn, data: bytes) -> None:
        conn.out = data
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            return
        # All sent: shut our side and wait (in fds(), bounded by the TTL) for the client's EOF.
        # Closing at once could turn unread client bytes into a reset that destroys the answer.
        conn.answered = True
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        self._conns.pop(conn.fd, None)
        try:
            conn.sock.close()
        except OSError:
            pass
