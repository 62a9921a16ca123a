"""Metrics: the scoreboard's duration histogram, collect(), both renderings, the metrics listener.

The Prometheus text is read back with prometheus_client's own parser, so a formatting mistake
that a real scraper would reject fails here. The listener is driven the way the master drives
it: select() on fds(), on_readable() for what is ready, expire() on every pass.
"""

from __future__ import annotations

import json
import math
import os
import select
import socket
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from forkserver import config, metrics
from forkserver.memory import Reading
from forkserver.metrics import (
    ListenerSample,
    MetricsServer,
    Running,
    Snapshot,
    Totals,
    WorkerSample,
    collect,
    render_prometheus,
    render_status,
)
from forkserver.scoreboard import DURATION_BUCKETS, HANDOFF_WAIT_BUCKETS, Reason, State
from tests.conftest import read_until_closed as read_all

# -------------------------------------------------------------- scoreboard duration histogram


def test_duration_buckets_are_inclusive_upper_bounds(board):
    board.claim(0, 1, 1)
    w = board.writer(0)
    # One duration per bucket: exactly on a bound counts in that bucket ("le"), a hair above
    # goes to the next one, and anything past the last finite bound goes to +Inf.
    durations = [0.0, 0.0050001, 0.025, 0.03, 0.1, 0.2, 0.5, 0.75, 2.5, 4.0, 10.0, 3600.0]
    for d in durations:
        w.request_finished(200, 1, State.IDLE, d)
    v = board.read(0)
    assert v.duration_buckets == (1,) * 12
    assert v.duration_sum == pytest.approx(sum(durations))
    assert v.requests == 12
    w.request_finished(200, 1, State.IDLE, 0.005)
    assert board.read(0).duration_buckets[0] == 2


def test_default_duration_counts_in_the_first_bucket(board):
    board.claim(0, 1, 1)
    board.writer(0).request_finished(204, 0, State.KEEPALIVE)
    v = board.read(0)
    assert v.duration_buckets == (1,) + (0,) * 11 and v.duration_sum == 0.0


@pytest.mark.parametrize("bad", [-0.001, float("nan")])
def test_bad_duration_is_rejected_without_damage(board, bad):
    board.claim(0, 1, 1)
    w = board.writer(0)
    w.request_finished(200, 5, State.IDLE, 0.2)
    with pytest.raises(ValueError):
        w.request_finished(200, 5, State.IDLE, bad)
    w.request_finished(200, 5, State.IDLE, 0.3)
    v = board.read(0)
    assert v.requests == 2 and v.bytes_sent == 10
    assert v.duration_sum == pytest.approx(0.5) and sum(v.duration_buckets) == 2


def test_request_start_keeps_the_histogram_and_claim_clears_it(board):
    board.claim(0, 1, 1)
    w = board.writer(0)
    w.request_finished(500, 3, State.IDLE, 1.5)
    w.request_started(b"GET /next")
    v = board.read(0)
    assert v.state is State.BUSY and v.duration_buckets[8] == 1 and v.duration_sum == 1.5
    assert v.status_counts == (0, 0, 0, 0, 1)
    # A second writer on the same slot (as after a fork) carries on from the shared values.
    board.writer(0).request_finished(200, 0, State.IDLE, 1.5)
    assert board.read(0).duration_buckets[8] == 2
    board.release(0)
    board.claim(0, 2, 2)
    v = board.read(0)
    assert v.duration_buckets == (0,) * 12 and v.duration_sum == 0.0


# -------------------------------------------------------------------------------- collect


def _serve(board, index, pid, finished, state=State.IDLE, busy_line=None, connections=0):
    board.claim(index, pid, 1 + index)
    w = board.writer(index)
    w.set_state(State.IDLE)
    w.set_connections(connections)
    for status, size, duration in finished:
        w.request_started(b"GET /x")
        w.request_finished(status, size, state, duration)
    if busy_line is not None:
        w.request_started(busy_line)
    return w


def test_collect_adds_live_slots_to_the_totals_of_dead_workers(board):
    me = os.getpid()
    _serve(board, 0, me, [(200, 10, 0.01), (404, 5, 0.3)], connections=2)
    _serve(board, 1, 999_999_999, [(200, 7, 0.002)], busy_line=b"GET /slow?s=2", connections=1)
    totals = Totals()
    # A dead worker's last slot: folded in by the master before it reuses the slot.
    _serve(board, 2, 12345, [(503, 100, 12.0), (301, 0, 0.04)])
    totals.fold(board.read(2))
    board.release(2)
    started = time.monotonic() - 90
    snap = collect(board, [(me, 0, 1), (999_999_999, 1, 2), (4242, -1, 0)], totals,
                   {"crash": 2}, 3, started, [])
    assert snap.requests == 2 + 1 + 2
    assert snap.responses == {"1xx": 0, "2xx": 2, "3xx": 1, "4xx": 1, "5xx": 1}
    assert snap.sent_bytes == 10 + 5 + 7 + 100
    assert sum(snap.duration_buckets) == 5
    assert snap.duration_buckets[DURATION_BUCKETS.index(float("inf"))] == 1
    assert snap.duration_sum == pytest.approx(0.01 + 0.3 + 0.002 + 12.0 + 0.04)
    assert snap.reloads == 3 and snap.master_pid == me
    assert snap.restarts["crash"] == 2 and snap.restarts["oom"] == 0
    assert set(snap.restarts) == {r.name.lower() for r in Reason if r is not Reason.NONE}
    assert 90 <= snap.uptime < 100
    assert snap.in_flight == 1 and snap.connections == 3
    assert snap.workers_by_state == {"idle": 1, "busy": 1, "keepalive": 0, "booting": 0,
                                     "exiting": 0, "unknown": 1}
    first, second, old = snap.workers
    assert (first.pid, first.index, first.state, first.requests) == (me, 0, "idle", 2)
    assert 0 < first.memory.uss <= first.memory.pss <= first.memory.rss
    assert first.cpu_seconds > 0
    assert first.current_request == "" and first.busy_seconds == 0.0
    assert (second.state, second.current_request) == ("busy", "GET /slow?s=2")
    assert 0 <= second.busy_seconds < 5
    assert second.memory == (0, 0, 0)  # no such process: zeros, not an error
    assert snap.master_memory.pss > 0 and snap.memory.pss >= snap.master_memory.pss
    assert (old.index, old.state, old.requests) == (-1, "unknown", 0)


def test_counters_never_go_back_across_a_worker_restart(board):
    totals = Totals()
    w = _serve(board, 0, 100, [(200, 1, 0.01)] * 3)

    def requests():
        return collect(board, [(100, 0, 1)], totals, {}, 0, time.monotonic(), []).requests

    assert requests() == 3
    w.set_state(State.EXITING, Reason.REQUESTS)
    totals.fold(board.read(0))
    board.release(0)
    board.claim(0, 101, 1)  # the replacement starts from zero in the same slot
    assert collect(board, [(101, 0, 1)], totals, {}, 0, time.monotonic(), []).requests == 3
    board.writer(0).request_finished(200, 1, State.IDLE, 0.01)
    assert collect(board, [(101, 0, 1)], totals, {}, 0, time.monotonic(), []).requests == 4
    assert totals.workers == 1


def test_reason_and_heartbeat_age_are_reported(board):
    w = _serve(board, 0, 7, [])
    w.set_state(State.EXITING, Reason.MEMORY)
    [sample] = collect(board, [(7, 0, 1)], Totals(), {}, 0, time.monotonic(), []).workers
    assert (sample.state, sample.reason) == ("exiting", "memory")
    assert 0 <= sample.heartbeat_age < 5 and 0 <= sample.age_seconds < 5


# ------------------------------------------------------------------------ listen backlog


def test_listen_backlog_of_a_tcp_listener():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(7)
        clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
        try:
            sample = metrics.listen_backlog(listener)
            assert sample == ListenerSample(f"127.0.0.1:{listener.getsockname()[1]}", 3, 7)
            listener.accept()[0].close()
            assert metrics.listen_backlog(listener).queued == 2
        finally:
            for client in clients:
                client.close()


def test_listen_backlog_ipv6_name():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    with socket.socket(socket.AF_INET6) as listener:
        try:
            listener.bind(("::1", 0))
        except OSError:
            pytest.skip("no IPv6 loopback")
        listener.listen(5)
        sample = metrics.listen_backlog(listener)
        assert sample == ListenerSample(f"[::1]:{listener.getsockname()[1]}", 0, 5)


def test_no_backlog_where_the_kernel_does_not_report_one(tmp_path):
    with socket.socket(socket.AF_UNIX) as unix_listener, socket.socket() as unbound:
        unix_listener.bind(str(tmp_path / "s"))
        unix_listener.listen(5)
        assert metrics.listen_backlog(unix_listener) is None
        assert metrics.listener_name(unix_listener) == f"unix:{tmp_path / 's'}"
        assert metrics.listen_backlog(unbound) is None  # TCP, but not listening
    closed = socket.socket()
    closed.close()
    assert metrics.listen_backlog(closed) is None


def test_collect_reports_tcp_listeners_only(board, tmp_path):
    with socket.socket() as tcp, socket.socket(socket.AF_UNIX) as unix:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(16)
        unix.bind(str(tmp_path / "u"))
        unix.listen(16)
        snap = collect(board, [], Totals(), {}, 0, time.monotonic(), [tcp, unix])
        assert [(s.queued, s.max) for s in snap.listeners] == [(0, 16)]


def test_collect_with_a_threaded_worker_and_handoffs(board):
    board.claim(0, 4001, 1)
    w = board.writer(0)
    w.set_state(State.KEEPALIVE)
    t = w.thread_writers(4)
    t[0].request_finished(200, 10, 0.01)
    t[3].request_finished(500, 5, 0.2)
    t[1].request_started("GET", "/first?secret=1")
    time.sleep(0.01)
    t[2].request_started("POST", "/second")
    w.handoff_sent(2)
    w.handoff_adopted(0.002)
    totals = Totals()
    board.claim(1, 4002, 1)  # a dead worker that had handed off and adopted
    dead = board.writer(1)
    dead.handoff_sent()
    dead.handoff_adopted(2.0)
    totals.fold(board.read(1))
    board.release(1)
    readings = {4001: Reading(30, 10, 20), os.getpid(): Reading(50, 40, 45), 4003: Reading(9, 1, 3)}
    snap = collect(board, [(4001, 0, 1)], totals, {}, 0, time.monotonic(), [],
                   readings=readings, others={4003: "mold"})
    (worker,) = snap.workers
    assert (worker.state, worker.threads, worker.busy_threads) == ("busy", 4, 2)
    assert [(r.thread, r.request) for r in worker.running] == [(1, "GET /first"),
                                                               (2, "POST /second")]
    assert worker.running[0].seconds >= worker.running[1].seconds
    assert (worker.current_request, worker.busy_seconds) == ("GET /first",
                                                             worker.running[0].seconds)
    assert (snap.in_flight, snap.threads, snap.requests, snap.sent_bytes) == (2, 4, 2, 15)
    assert snap.responses["5xx"] == 1
    assert (worker.handoffs_sent, worker.handoffs_adopted) == (2, 1)
    assert (snap.handoffs_sent, snap.handoffs_adopted) == (3, 2)
    assert snap.handoff_wait_buckets[HANDOFF_WAIT_BUCKETS.index(0.0025)] == 1
    assert snap.handoff_wait_buckets[-1] == 1
    assert snap.handoff_wait_sum == pytest.approx(2.002)
    # The master's readings are used as given: no process 4001 exists to be read.
    assert worker.memory == Reading(30, 10, 20) and snap.master_memory == Reading(50, 40, 45)
    assert [(p.role, p.pid, p.memory) for p in snap.others] == [("mold", 4003, (9, 1, 3))]
    assert snap.memory == Reading(89, 51, 68)
    fams = families(render_prometheus(snap))
    assert samples(fams["forkserver_requests_in_flight"]) == {
        ("forkserver_requests_in_flight", ()): 2}
    assert samples(fams["forkserver_threads"]) == {
        ("forkserver_threads", (("state", "busy"),)): 2,
        ("forkserver_threads", (("state", "idle"),)): 2}
    assert samples(fams["forkserver_worker_threads"]) == {
        ("forkserver_worker_threads", (("pid", "4001"),)): 4}
    process = samples(fams["forkserver_process_memory_bytes"])
    assert process[("forkserver_process_memory_bytes",
                    (("kind", "pss"), ("pid", "4003"), ("process", "mold")))] == 3
    assert samples(fams["forkserver_handoffs_sent"]) == {("forkserver_handoffs_sent_total", ()): 3}
    wait = fams["forkserver_handoff_wait_seconds"]
    buckets = [(s.labels["le"], s.value) for s in wait.samples if s.name.endswith("_bucket")]
    assert [le for le, _ in buckets] == [metrics._number(b) for b in HANDOFF_WAIT_BUCKETS]
    assert dict(buckets)["0.0025"] == 1 and dict(buckets)["+Inf"] == 2
    data = json.loads(render_status(snap))
    (entry,) = data["workers"]
    assert entry["running"][0]["request"] == "GET /first" and entry["busy_threads"] == 2
    assert data["totals"]["handoffs"]["adopted"] == 2
    assert data["master"]["others"] == [{"role": "mold", "pid": 4003, "rss": 9, "uss": 1,
                                         "pss": 3}]


def test_collect_reads_memory_itself_through_a_cache_when_given_none(board, monkeypatch):
    calls = []

    def fake_read(pid):
        calls.append(pid)
        return Reading(3, 2, 1)

    monkeypatch.setattr(metrics, "_fallback", metrics.Sampler(60.0, fake_read))
    board.claim(0, 5001, 1)
    for _ in range(3):
        snap = collect(board, [(5001, 0, 1)], Totals(), {}, 0, time.monotonic(), [])
    assert sorted(calls) == sorted([os.getpid(), 5001])  # once each, not once per scrape
    assert snap.workers[0].memory == Reading(3, 2, 1) and snap.memory == Reading(6, 4, 2)


# ------------------------------------------------------------------------------ rendering


def make_snapshot(**changes) -> Snapshot:
    workers = (
        WorkerSample(101, 0, 1, "busy", "", 12, 3000, 2, "GET /slow?s=2", 1.5, 60.0, 0.1,
                     Reading(25 * 2**20, 5 * 2**20, 9 * 2**20), 1.25,
                     running=(Running(0, "GET /slow?s=2", 1.5),)),
        WorkerSample(102, 1, 1, "idle", "requests", 7, 700, 0, "", 0.0, 60.0, 0.2,
                     Reading(24 * 2**20, 4 * 2**20, 8 * 2**20), 0.5),
    )
    values = {
        "master_pid": 100, "time": 1_800_000_000.0, "uptime": 3725.5, "reloads": 2,
        "restarts": {"crash": 1, "oom": 0, "memory": 3}, "workers": workers,
        "listeners": (ListenerSample("127.0.0.1:8000", 4, 2048),),
        "requests": 42, "responses": {"1xx": 0, "2xx": 30, "3xx": 2, "4xx": 9, "5xx": 1},
        "sent_bytes": 123456, "duration_buckets": (10, 5, 5, 5, 5, 4, 3, 2, 1, 1, 0, 1),
        "duration_sum": 31.5, "master_memory": Reading(30 * 2**20, 20 * 2**20, 25 * 2**20),
    }
    values.update(changes)
    return Snapshot(**values)


def families(text: bytes) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text.decode("utf-8"))}


def samples(family) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for s in family.samples}


def test_prometheus_text_parses_and_has_every_family():
    text = render_prometheus(make_snapshot())
    assert text.endswith(b"\n")
    fams = families(text)
    expected = {
        "forkserver_requests": "counter",
        "forkserver_responses": "counter",
        "forkserver_request_duration_seconds": "histogram",
        "forkserver_requests_in_flight": "gauge",
        "forkserver_workers": "gauge",
        "forkserver_connections_open": "gauge",
        "forkserver_threads": "gauge",
        "forkserver_worker_threads": "gauge",
        "forkserver_worker_threads_busy": "gauge",
        "forkserver_handoffs_sent": "counter",
        "forkserver_handoffs_adopted": "counter",
        "forkserver_handoff_wait_seconds": "histogram",
        "forkserver_worker_memory_bytes": "gauge",
        "forkserver_process_memory_bytes": "gauge",
        "forkserver_memory_bytes": "gauge",
        "forkserver_worker_cpu_seconds": "counter",
        "forkserver_worker_restarts": "counter",
        "forkserver_reloads": "counter",
        "forkserver_uptime_seconds": "gauge",
        "forkserver_listen_backlog": "gauge",
        "forkserver_listen_backlog_max": "gauge",
        "forkserver_sent_bytes": "counter",
    }
    assert {name: f.type for name, f in fams.items()} == expected
    assert all(f.documentation for f in fams.values())
    lines = text.decode().splitlines()
    for name, kind in expected.items():
        full = name + "_total" if kind == "counter" else name
        assert sum(line.startswith(f"# HELP {full} ") for line in lines) == 1
        assert sum(line == f"# TYPE {full} {kind}" for line in lines) == 1


def test_prometheus_values():
    fams = families(render_prometheus(make_snapshot()))
    assert samples(fams["forkserver_requests"]) == {("forkserver_requests_total", ()): 42}
    assert samples(fams["forkserver_responses"])[
        ("forkserver_responses_total", (("class", "4xx"),))] == 9
    assert len(fams["forkserver_responses"].samples) == 5
    assert samples(fams["forkserver_requests_in_flight"]) == {
        ("forkserver_requests_in_flight", ()): 1}
    workers = samples(fams["forkserver_workers"])
    assert workers[("forkserver_workers", (("state", "busy"),))] == 1
    assert workers[("forkserver_workers", (("state", "idle"),))] == 1
    assert workers[("forkserver_workers", (("state", "booting"),))] == 0
    assert {dict(k[1])["state"] for k in workers} == {"idle", "busy", "keepalive", "booting",
                                                      "exiting"}
    assert samples(fams["forkserver_connections_open"]) == {
        ("forkserver_connections_open", ()): 2}
    memory = samples(fams["forkserver_worker_memory_bytes"])
    name = "forkserver_worker_memory_bytes"
    assert memory[(name, (("kind", "rss"), ("pid", "101")))] == 25 * 2**20
    assert memory[(name, (("kind", "uss"), ("pid", "101")))] == 5 * 2**20
    assert memory[(name, (("kind", "pss"), ("pid", "102")))] == 8 * 2**20
    assert len(memory) == 6
    master = samples(fams["forkserver_process_memory_bytes"])
    assert master == {("forkserver_process_memory_bytes",
                       (("kind", kind), ("pid", "100"), ("process", "master"))): value * 2**20
                      for kind, value in (("rss", 30), ("uss", 20), ("pss", 25))}
    server = samples(fams["forkserver_memory_bytes"])
    assert server[("forkserver_memory_bytes", (("kind", "pss"),))] == (25 + 9 + 8) * 2**20
    assert server[("forkserver_memory_bytes", (("kind", "uss"),))] == (20 + 5 + 4) * 2**20
    threads = samples(fams["forkserver_threads"])
    assert threads == {("forkserver_threads", (("state", "busy"),)): 1,
                       ("forkserver_threads", (("state", "idle"),)): 1}
    busy = samples(fams["forkserver_worker_threads_busy"])
    assert busy == {("forkserver_worker_threads_busy", (("pid", "101"),)): 1,
                    ("forkserver_worker_threads_busy", (("pid", "102"),)): 0}
    cpu = samples(fams["forkserver_worker_cpu_seconds"])
    assert cpu[("forkserver_worker_cpu_seconds_total", (("pid", "102"),))] == 0.5
    restarts = samples(fams["forkserver_worker_restarts"])
    assert restarts[("forkserver_worker_restarts_total", (("reason", "memory"),))] == 3
    assert samples(fams["forkserver_reloads"]) == {("forkserver_reloads_total", ()): 2}
    assert samples(fams["forkserver_uptime_seconds"]) == {("forkserver_uptime_seconds", ()): 3725.5}
    assert samples(fams["forkserver_listen_backlog"]) == {
        ("forkserver_listen_backlog", (("listener", "127.0.0.1:8000"),)): 4}
    assert samples(fams["forkserver_listen_backlog_max"]) == {
        ("forkserver_listen_backlog_max", (("listener", "127.0.0.1:8000"),)): 2048}
    assert samples(fams["forkserver_sent_bytes"]) == {("forkserver_sent_bytes_total", ()): 123456}


def test_prometheus_histogram_is_cumulative():
    snap = make_snapshot()
    hist = families(render_prometheus(snap))["forkserver_request_duration_seconds"]
    buckets = [(s.labels["le"], s.value) for s in hist.samples if s.name.endswith("_bucket")]
    assert [le for le, _ in buckets] == ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5",
                                         "1.0", "2.5", "5.0", "10.0", "+Inf"]
    values = [v for _, v in buckets]
    assert values == sorted(values)
    running = 0
    for value, plain in zip(values, snap.duration_buckets):
        running += plain
        assert value == running
    by_name = {s.name: s.value for s in hist.samples if not s.name.endswith("_bucket")}
    assert by_name["forkserver_request_duration_seconds_count"] == values[-1] == 42
    assert by_name["forkserver_request_duration_seconds_sum"] == 31.5


def test_prometheus_label_values_are_escaped():
    name = 'unix:/run/we"ird\\path\nx'
    text = render_prometheus(make_snapshot(listeners=(ListenerSample(name, 1, 2),)))
    # The raw newline must not reach the output, or the next line would be forged.
    assert not any(line.startswith("x") for line in text.decode().splitlines())
    backlog = families(text)["forkserver_listen_backlog"]
    assert backlog.samples[0].labels == {"listener": name}


def test_prometheus_with_no_workers_and_special_floats():
    snap = make_snapshot(workers=(), listeners=(), duration_sum=float("inf"))
    fams = families(render_prometheus(snap))
    assert fams["forkserver_worker_memory_bytes"].samples == []
    assert fams["forkserver_worker_threads_busy"].samples == []
    assert math.isinf(samples(fams["forkserver_request_duration_seconds"])[
        ("forkserver_request_duration_seconds_sum", ())])
    assert metrics._number(float("nan")) == "NaN" and metrics._number(float("-inf")) == "-Inf"


def test_status_json():
    data = json.loads(render_status(make_snapshot()))
    assert data["master"]["pid"] == 100 and data["master"]["reloads"] == 2
    assert data["master"]["uptime"] == 3725.5
    assert data["master"]["restarts"]["memory"] == 3
    assert data["master"]["listeners"] == [{"name": "127.0.0.1:8000", "queued": 4, "max": 2048}]
    busy, idle = data["workers"]
    for key in ("pid", "generation", "state", "requests", "current_request", "busy_seconds",
                "rss", "uss", "pss", "connections", "threads", "busy_threads", "running"):
        assert key in busy
    assert (busy["pid"], busy["state"], busy["current_request"], busy["busy_seconds"]) == (
        101, "busy", "GET /slow", 1.5)  # query strings may carry tokens: cut by default
    assert busy["running"] == [{"thread": 0, "request": "GET /slow", "seconds": 1.5}]
    assert (busy["threads"], busy["busy_threads"]) == (1, 1)
    assert (idle["state"], idle["retiring"], idle["rss"], idle["uss"], idle["pss"]) == (
        "idle", "requests", 24 * 2**20, 4 * 2**20, 8 * 2**20)
    assert data["master"]["pss"] == 25 * 2**20 and data["master"]["others"] == []
    totals = data["totals"]
    assert totals["requests"] == 42 and totals["in_flight"] == 1 and totals["connections"] == 2
    assert totals["responses"]["2xx"] == 30
    assert totals["workers"]["busy"] == 1
    assert totals["duration_buckets"]["+Inf"] == 1 and totals["duration_buckets"]["0.005"] == 10
    assert (totals["threads"], totals["busy_threads"]) == (2, 1)
    assert totals["memory"] == {"rss": (30 + 25 + 24) * 2**20, "uss": (20 + 5 + 4) * 2**20,
                                "pss": (25 + 9 + 8) * 2**20}
    assert totals["handoffs"]["sent"] == 0 and totals["handoffs"]["wait_buckets"]["+Inf"] == 0


# --------------------------------------------------------------------------- the listener


class Harness:
    """A MetricsServer on a real socket, pumped the way the master's loop would pump it."""

    def __init__(self, family=socket.AF_INET, path=None, snapshot=None,
                 use_write_fds=True, settings=None) -> None:
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_UNIX:
            self.listener.bind(path)
            self.address = path
        else:
            self.listener.bind(("127.0.0.1", 0))
            self.address = self.listener.getsockname()
        self.listener.listen(64)
        self.family = family
        self.calls = 0

        def default():
            self.calls += 1
            return make_snapshot()

        self.server = MetricsServer(self.listener, snapshot or default, settings)
        self.use_write_fds = use_write_fds

    def pump(self, rounds: int = 20, now: float | None = None) -> None:
        server = self.server
        for _ in range(rounds):
            wfds = server.write_fds() if self.use_write_fds else []
            readable, writable, _ = select.select(server.fds(), wfds, [], 0.01)
            for fd in readable:
                server.on_readable(fd)
            for fd in writable:
                server.on_writable(fd)
            server.expire(time.monotonic() if now is None else now)
            if not readable and not writable:
                return

    def client(self) -> socket.socket:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(self.address)
        return sock

    def exchange(self, raw: bytes) -> bytes:
        """Send raw bytes, pump, and read the whole answer up to the server's close."""
        with self.client() as sock:
            sock.sendall(raw)
            self.pump()
            sock.shutdown(socket.SHUT_WR)
            self.pump()
            return read_all(sock)

    def close(self) -> None:
        self.server.close()




def split(response: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.close()


def get(path: str, method: str = "GET", extra: str = "", host: str = "localhost") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode("latin-1")


def test_get_metrics(harness):
    status, headers, body = split(harness.exchange(get("/metrics")))
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    assert body == render_prometheus(make_snapshot())
    assert "forkserver_requests" in families(body)


def test_get_status_with_a_query_string(harness):
    status, headers, body = split(harness.exchange(get("/status?x=1")))
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body)["master"]["pid"] == 100


def test_head_sends_the_headers_only(harness):
    status, headers, body = split(harness.exchange(get("/status", "HEAD")))
    assert status == 200 and body == b""
    assert int(headers["content-length"]) == len(render_status(make_snapshot()))


@pytest.mark.parametrize("raw, expected", [
    (get("/"), 404),
    (get("/metrics/"), 404),
    (get("/nope", "HEAD"), 404),
    (get("/metrics", "POST", "Content-Length: 0\r\n"), 405),
    (get("/metrics", "DELETE"), 405),
    (get("/metrics", "GET", "Content-Length: 5\r\n") + b"hello", 413),
    (get("/metrics", "GET", "Transfer-Encoding: chunked\r\n") + b"0\r\n\r\n", 413),
    (b"GET /" + b"a" * 1100 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n", 414),
    (get("/metrics", "GET", "".join(f"X-{i}: v\r\n" for i in range(21))), 431),
    (get("/metrics", "GET", "X-Big: " + "v" * 1100 + "\r\n"), 431),
    (b"GET /metrics HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"\x16\x03\x01 hello\r\n\r\n", 400),  # TLS to a plain port, say
    (b"GET /metrics HTTP/1.1\nHost: localhost\n\n", 400),  # bare LF
    (get("/metrics", host="evil.example"), 421),  # DNS rebinding: a name that is not ours
    (get("/status", host="evil.example:80"), 421),
])
def test_everything_else_is_refused_with_a_status(harness, raw, expected):
    response = harness.exchange(raw)
    status, headers, _ = split(response)
    assert status == expected
    assert headers["connection"] == "close"
    if expected == 405:
        assert headers["allow"] == "GET, HEAD"
    assert headers["cache-control"] == "no-store"
    assert harness.calls == 0  # no snapshot was taken for any of these


def test_twenty_headers_are_fine(harness):
    raw = get("/status", "GET", "".join(f"X-{i}: v\r\n" for i in range(19)))  # + Host = 20
    assert split(harness.exchange(raw))[0] == 200


def test_one_request_per_connection(harness):
    response = harness.exchange(get("/status") + get("/metrics"))
    assert response.count(b"HTTP/1.1 ") == 1
    assert harness.calls == 1


def test_a_request_in_pieces_is_answered_once_complete(harness):
    raw = get("/status")
    with harness.client() as sock:
        for i in range(0, len(raw), 7):
            sock.sendall(raw[i:i + 7])
            harness.pump()
        assert harness.calls == 1
        assert split(read_all(sock))[0] == 200


def test_snapshot_failure_is_a_500_and_the_server_keeps_going():
    broken = {"fail": True}

    def snapshot():
        if broken["fail"]:
            raise RuntimeError("metrics bug")
        return make_snapshot()

    h = Harness(snapshot=snapshot)
    try:
        assert split(h.exchange(get("/metrics")))[0] == 500
        broken["fail"] = False
        assert split(h.exchange(get("/metrics")))[0] == 200
    finally:
        h.close()


def test_idle_connections_expire(harness):
    with harness.client() as idle, harness.client() as partial:
        partial.sendall(b"GET /met")
        harness.pump()
        assert len(harness.server.fds()) == 3  # listener + both connections
        harness.pump(now=time.monotonic() + metrics.CONNECTION_TTL / 2)
        assert len(harness.server.fds()) == 3
        harness.pump(now=time.monotonic() + metrics.CONNECTION_TTL + 0.1)
        assert harness.server.fds() == [harness.listener.fileno()]
        assert read_all(idle) == b"" and read_all(partial) == b""


def test_connection_cap_pauses_the_listener(harness):
    clients = [harness.client() for _ in range(metrics.MAX_CONNECTIONS + 5)]
    try:
        harness.pump()
        fds = harness.server.fds()
        assert len(fds) == metrics.MAX_CONNECTIONS
        assert harness.listener.fileno() not in fds
        harness.pump(now=time.monotonic() + metrics.CONNECTION_TTL + 1)
        harness.pump()  # the listener is back and takes the queued five
        assert len(harness.server.fds()) == 5 + 1
    finally:
        for client in clients:
            client.close()


def test_unix_socket_listener(tmp_path):
    h = Harness(socket.AF_UNIX, str(tmp_path / "metrics.sock"))
    try:
        status, _, body = split(h.exchange(get("/status")))
        assert status == 200 and json.loads(body)["workers"][0]["pid"] == 101
    finally:
        h.close()


@pytest.mark.parametrize("use_write_fds", [True, False])
def test_an_answer_larger_than_the_socket_buffer_still_arrives(use_write_fds):
    # ~2 MB of text: more than one send() can take, so the rest goes out later, through
    # on_writable() when the master selects for writing, else through expire().
    many = tuple(WorkerSample(1000 + i, i, 1, "idle", "", i, 0, 0, "", 0.0, 1.0, 0.0,
                                Reading(i, i, i), 0.0)
                 for i in range(20000))
    expected = render_prometheus(make_snapshot(workers=many))
    h = Harness(snapshot=lambda: make_snapshot(workers=many), use_write_fds=use_write_fds)
    try:
        with h.client() as sock:
            sock.sendall(get("/metrics"))
            sock.setblocking(False)
            received = bytearray()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                h.pump(rounds=1)
                try:
                    data = sock.recv(1 << 20)
                except BlockingIOError:
                    continue
                if not data:
                    break
                received += data
        status, headers, body = split(bytes(received))
        assert status == 200 and body == expected
        assert int(headers["content-length"]) == len(expected)
    finally:
        h.close()


def test_close_closes_the_listener_and_connections(harness):
    with harness.client() as sock:
        harness.pump()
        harness.server.close()
        assert read_all(sock) == b""
    assert harness.listener.fileno() == -1
    assert harness.server.fds() == []
    harness.server.close()  # twice is harmless


def test_a_client_that_vanishes_does_not_disturb_the_server(harness):
    sock = harness.client()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.sendall(b"GET /sta")
    harness.pump()
    sock.close()  # RST
    harness.pump()
    assert harness.server.fds() == [harness.listener.fileno()]
    assert split(harness.exchange(get("/status")))[0] == 200


# ----------------------------------------------------- who may read: Host, token, query strings


def settings_with(tmp_path, **values):
    return config.resolve(values, None, {}, str(tmp_path))


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST", "127.0.0.1", "[::1]",
                                  "localhost:{port}", "127.0.0.1:{port}"])
def test_loopback_and_own_address_hosts_are_answered(harness, host):
    port = harness.address[1]
    assert split(harness.exchange(get("/metrics", host=host.format(port=port))))[0] == 200


@pytest.mark.parametrize("host", ["evil.example", "localhost.evil.example", "127.0.0.2",
                                  "localhost:1", "[::2]", "10.0.0.1:{port}"])
def test_other_hosts_get_421_without_a_snapshot(harness, host):
    raw = get("/status", host=host.format(port=harness.address[1]))
    status, headers, body = split(harness.exchange(raw))
    assert (status, body) == (421, b"421 Misdirected Request\n")
    assert harness.calls == 0


def test_the_host_of_metrics_bind_is_answered(tmp_path):
    h = Harness(settings=settings_with(tmp_path, metrics_bind="metrics.internal:9100"))
    try:
        assert split(h.exchange(get("/metrics", host="metrics.internal")))[0] == 200
        assert split(h.exchange(get("/metrics", host="other.internal")))[0] == 421
    finally:
        h.close()


def test_a_request_without_host_and_a_unix_listener_are_not_host_checked(harness, tmp_path):
    # HTTP/1.0 without Host comes from no browser; a unix socket is out of a browser's reach.
    assert split(harness.exchange(b"GET /status HTTP/1.0\r\n\r\n"))[0] == 200
    h = Harness(socket.AF_UNIX, str(tmp_path / "m.sock"))
    try:
        assert split(h.exchange(get("/status", host="anything.example")))[0] == 200
    finally:
        h.close()


@pytest.fixture
def guarded(tmp_path):
    h = Harness(settings=settings_with(tmp_path, metrics_token="s3cret-token"))
    yield h
    h.close()


@pytest.mark.parametrize("path", ["/metrics", "/status"])
@pytest.mark.parametrize("authorization", [
    "", "Authorization: Bearer wrong\r\n", "Authorization: Bearer s3cret-toke\r\n",
    "Authorization: Basic czNjcmV0LXRva2Vu\r\n", "Authorization: s3cret-token\r\n",
])
def test_a_missing_or_wrong_token_is_401(guarded, path, authorization):
    status, headers, _ = split(guarded.exchange(get(path, extra=authorization)))
    assert status == 401
    assert headers["www-authenticate"].startswith("Bearer")
    assert guarded.calls == 0


@pytest.mark.parametrize("authorization", ["Bearer s3cret-token", "bearer  s3cret-token "])
def test_the_right_token_is_answered(guarded, authorization):
    raw = get("/metrics", extra=f"Authorization: {authorization}\r\n")
    assert split(guarded.exchange(raw))[0] == 200


def test_the_token_is_compared_in_constant_time(guarded, monkeypatch):
    compared = []
    real = metrics.hmac.compare_digest
    monkeypatch.setattr(metrics.hmac, "compare_digest",
                        lambda a, b: compared.append((a, b)) or real(a, b))
    guarded.exchange(get("/status", extra="Authorization: Bearer guess\r\n"))
    assert compared == [(b"guess", b"s3cret-token")]


@pytest.mark.parametrize("path, body", [("/livez", b"ok\n"), ("/readyz", b"ready\n")])
def test_probes_stay_open_without_token_and_with_any_host(guarded, path, body):
    status, headers, answer = split(guarded.exchange(get(path, host="kubelet.example:1")))
    assert (status, answer) == (200, body)
    assert headers["content-type"] == "text/plain; charset=utf-8"
    assert headers["cache-control"] == "no-store"


def test_status_shows_query_strings_only_when_asked(tmp_path):
    auth = "Authorization: Bearer t\r\n"
    for show, expected in [(False, "GET /slow"), (True, "GET /slow?s=2")]:
        h = Harness(settings=settings_with(tmp_path, status_show_query=show, metrics_token="t"))
        try:
            body = split(h.exchange(get("/status", extra=auth)))[2]
            assert json.loads(body)["workers"][0]["current_request"] == expected
        finally:
            h.close()


@pytest.mark.parametrize("line, expected", [
    ("GET /a?token=1 HTTP/1.1", "GET /a HTTP/1.1"),
    ("GET /a HTTP/1.1", "GET /a HTTP/1.1"),
    ("POST /x?y=1&z=2", "POST /x"),  # truncated by the scoreboard
    ("GET /?", "GET /"),
    ("", ""),
])
def test_without_query(line, expected):
    assert metrics.without_query(line) == expected


# ------------------------------------------------------------------------- /livez, /readyz


def sample(state: str, generation: int = 1) -> WorkerSample:
    return WorkerSample(1, 0, generation, state, "", 0, 0, 0, "", 0.0, 0.0, 0.0,
                        Reading(0, 0, 0), 0.0)


@pytest.mark.parametrize("states, reason", [
    ((), "no workers"),
    (("booting",), "booting"),
    (("booting", "booting"), "booting"),
    (("exiting",), "draining"),
    (("exiting", "booting"), "booting"),
    (("idle",), None),
    (("busy", "busy"), None),  # every worker busy is still ready: the probe is the master's
    (("keepalive", "booting"), None),
    (("unknown",), None),  # a worker of the image before a USR2 upgrade still serves
])
def test_readiness_from_the_workers(states, reason):
    snapshot = make_snapshot(workers=tuple(sample(state) for state in states))
    assert metrics.not_ready(snapshot) == reason


def test_the_masters_reason_comes_first(board):
    snapshot = make_snapshot(not_ready="shutting down")
    assert metrics.not_ready(snapshot) == "shutting down"
    # collect() carries the master's reason through; by default it has none.
    _serve(board, 0, os.getpid(), [])
    workers = [(os.getpid(), 0, 1)]
    taken = collect(board, workers, Totals(), {}, 0, time.monotonic(), [], "draining")
    assert metrics.not_ready(taken) == "draining"
    assert metrics.not_ready(collect(board, workers, Totals(), {}, 0, time.monotonic(), [])) is None


@pytest.mark.parametrize("changes, status, body", [
    ({"workers": ()}, 503, b"no workers\n"),
    ({"workers": (sample("booting"),)}, 503, b"booting\n"),
    ({"not_ready": "draining"}, 503, b"draining\n"),
    ({}, 200, b"ready\n"),
])
def test_readyz_answers(changes, status, body):
    h = Harness(snapshot=lambda: make_snapshot(**changes))
    try:
        code, headers, answer = split(h.exchange(get("/readyz")))
        assert (code, answer) == (status, body)
        assert answer.count(b"\n") == 1  # one line
        assert headers["cache-control"] == "no-store" and headers["connection"] == "close"
        code, headers, answer = split(h.exchange(get("/readyz", "HEAD")))
        assert (code, answer) == (status, b"") and int(headers["content-length"]) == len(body)
    finally:
        h.close()


def test_livez_takes_no_snapshot(harness):
    assert split(harness.exchange(get("/livez")))[:3:2] == (200, b"ok\n")
    assert harness.calls == 0


# ------------------------------------------------------------------------------- settings


@pytest.mark.parametrize("value, expected", [
    ("", ""), ("127.0.0.1:9100", "127.0.0.1:9100"), (" unix:/run/fs-metrics.sock ",
                                                      "unix:/run/fs-metrics.sock"),
    ("[::1]:9100", "[::1]:9100"),
])
def test_metrics_bind_setting_accepts(tmp_path, value, expected):
    settings = config.resolve({"metrics_bind": value}, None, {}, str(tmp_path))
    assert settings.metrics_bind == expected


def test_metrics_bind_is_off_by_default(tmp_path):
    assert config.resolve({}, None, {}, str(tmp_path)).metrics_bind == ""


@pytest.mark.parametrize("value", ["9100", "localhost", "::1:9100", "unix:", "host:99999"])
def test_metrics_bind_setting_rejects(tmp_path, value):
    with pytest.raises(config.ConfigError, match="metrics_bind"):
        config.resolve({}, None, {"FORKSERVER_METRICS_BIND": value}, str(tmp_path))
