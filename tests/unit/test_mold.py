"""Refork (forkserver.mold): the pure policies as plain data, then the fork protocol with real
processes in a small harness that needs no server.

The harness is a process forked from pytest that makes itself a child subreaper (as the master
does), so pytest's own process never changes. It forks a "template" that builds a large object
and forks a mold; the harness then asks the mold for workers and reports what it saw as JSON.
Every pid the harness makes is stopped and waited for by the harness, and the test checks that
none of them is left.
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import struct
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import psutil
import pytest

from forkserver import mold
from forkserver.mold import Event, Order, Seat, Stage

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="refork needs PR_SET_CHILD_SUBREAPER (Linux)")

THRESHOLDS = (20, 100)


def seat(pid: int, requests: int = 0, *, phase: str = "ready", generation: int = 1,
         started: float | None = None, from_mold: int = 0) -> Seat:
    return Seat(pid, generation, float(pid) if started is None else started, phase, requests,
                from_mold)


# -- the stage table ------------------------------------------------------------------------
def test_stage_table_walks_a_promotion_a_remold_and_a_loss():
    stage = Stage.IDLE
    for event, expected in [(Event.ASK, Stage.PROMOTING), (Event.ANNOUNCED, Stage.MOLDED),
                            (Event.ASK, Stage.REMOLDING), (Event.GAVE_UP, Stage.MOLDED),
                            (Event.ASK, Stage.REMOLDING), (Event.LOST, Stage.PROMOTING),
                            (Event.GAVE_UP, Stage.IDLE)]:
        stage = mold.move(stage, event)
        assert stage is expected


@pytest.mark.parametrize(("stage", "event"), [(Stage.IDLE, Event.ANNOUNCED),
                                              (Stage.IDLE, Event.LOST),
                                              (Stage.PROMOTING, Event.ASK),
                                              (Stage.REMOLDING, Event.ASK)])
def test_stage_table_refuses_unlisted_moves(stage, event):
    with pytest.raises(mold.TransitionError, match=event.value):
        mold.move(stage, event)


def test_stop_is_allowed_from_every_stage():
    assert all(mold.move(stage, Event.STOP) is Stage.IDLE for stage in Stage)


# -- when to promote ------------------------------------------------------------------------
def test_no_promotion_below_the_first_threshold():
    seats = [seat(10, 19), seat(11, 5)]
    assert mold.promotion_due(seats, 1, THRESHOLDS, 0, Stage.IDLE) is None


def test_the_warmest_serving_worker_is_promoted_at_the_threshold():
    seats = [seat(10, 20), seat(11, 5), seat(12, 30, phase="retiring"), seat(13, 40,
                                                                           phase="booting")]
    assert mold.promotion_due(seats, 1, THRESHOLDS, 0, Stage.IDLE) == mold.Promote(10, 0)


def test_a_worker_waiting_for_its_replacement_may_be_promoted():
    # A fast load and a low max_requests: every warm worker is recycling when the master looks.
    seats = [seat(10, 300, phase="recycling"), seat(11, 2, phase="booting")]
    assert mold.promotion_due(seats, 1, THRESHOLDS, 0, Stage.IDLE) == mold.Promote(10, 0)


def test_equal_counts_promote_the_oldest():
    seats = [seat(12, 25, started=5.0), seat(11, 25, started=1.0)]
    assert mold.promotion_due(seats, 1, THRESHOLDS, 0, Stage.IDLE).pid == 11


def test_only_the_current_generation_is_a_candidate():
    seats = [seat(10, 500, generation=1), seat(11, 3, generation=2)]
    assert mold.promotion_due(seats, 2, THRESHOLDS, 0, Stage.IDLE) is None


def test_one_threshold_at_a_time_and_spent_ones_stay_spent():
    seats = [seat(10, 150)]
    assert mold.promotion_due(seats, 1, THRESHOLDS, 0, Stage.IDLE) == mold.Promote(10, 0)
    assert mold.promotion_due(seats, 1, THRESHOLDS, 1, Stage.IDLE) == mold.Promote(10, 1)
    assert mold.promotion_due(seats, 1, THRESHOLDS, 2, Stage.IDLE) is None  # all spent


def test_while_a_mold_serves_only_its_children_count():
    template = seat(10, 500)
    children = [seat(20, 99, from_mold=99), seat(21, 40, from_mold=99)]
    assert mold.promotion_due([template, *children], 1, THRESHOLDS, 1, Stage.MOLDED, 99) is None
    children[0] = seat(20, 100, from_mold=99)
    assert mold.promotion_due([template, *children], 1, THRESHOLDS, 1, Stage.MOLDED, 99) == \
        mold.Promote(20, 1)


def test_after_a_lost_mold_any_worker_counts_for_the_next_threshold():
    seats = [seat(20, 130, from_mold=99), seat(10, 20)]
    assert mold.promotion_due(seats, 1, THRESHOLDS, 1, Stage.IDLE) == mold.Promote(20, 1)


@pytest.mark.parametrize("stage", [Stage.PROMOTING, Stage.REMOLDING])
def test_no_promotion_while_one_is_on_its_way(stage):
    assert mold.promotion_due([seat(10, 1000)], 1, THRESHOLDS, 0, stage) is None


# -- which worker to replace next -----------------------------------------------------------
def test_replacement_oldest_first_and_the_template_last():
    seats = [seat(10, 40, started=1.0), seat(11, 3, started=2.0), seat(12, 3, started=3.0),
             seat(13, 0, started=9.0, from_mold=99)]
    assert mold.next_replacement(seats, 1, mold_pid=99, template_pid=10) == 11
    seats = [seat(10, 40, started=1.0), seat(13, 0, from_mold=99), seat(14, 0, from_mold=99)]
    assert mold.next_replacement(seats, 1, mold_pid=99, template_pid=10) == 10


@pytest.mark.parametrize("phase", ["booting", "recycling"])
def test_one_replacement_at_a_time(phase):
    seats = [seat(10, 40), seat(11, 3), seat(13, 0, phase=phase, from_mold=99)]
    assert mold.next_replacement(seats, 1, mold_pid=99, template_pid=10) is None


def test_nothing_to_replace_once_every_worker_comes_from_the_mold():
    seats = [seat(13, 0, from_mold=99), seat(14, 5, from_mold=99), seat(10, 1, phase="retiring")]
    assert mold.next_replacement(seats, 1, mold_pid=99, template_pid=10) is None


def test_children_of_an_older_mold_are_replaced_too():
    seats = [seat(13, 0, from_mold=98), seat(14, 5, from_mold=99)]
    assert mold.next_replacement(seats, 1, mold_pid=99, template_pid=14) == 13


def test_workers_of_other_generations_are_left_to_the_reload():
    seats = [seat(10, 40, generation=1), seat(11, 0, generation=2, from_mold=99)]
    assert mold.next_replacement(seats, 2, mold_pid=99, template_pid=11) is None


# -- when to fall back ----------------------------------------------------------------------
@pytest.mark.parametrize(("stage", "mold_generation", "generation", "expected"), [
    (Stage.MOLDED, 1, 1, True),
    (Stage.REMOLDING, 1, 1, True),
    (Stage.MOLDED, 1, 2, False),      # a reload: the new generation is cold
    (Stage.IDLE, 1, 1, False),
    (Stage.PROMOTING, 1, 1, False),   # the mold is not there yet (or was lost)
])
def test_spawns_from_mold(stage, mold_generation, generation, expected):
    assert mold.spawns_from_mold(stage, mold_generation, generation) is expected


def test_promotion_expires():
    assert not mold.promotion_expired(100.0, 100.0 + mold.PROMOTE_TIMEOUT - 0.1)
    assert mold.promotion_expired(100.0, 100.0 + mold.PROMOTE_TIMEOUT)


# -- refusal and messages -------------------------------------------------------------------
class FakeSettings:
    def __init__(self, **values: Any) -> None:
        self.refork_after = (20,)
        self.threads = 1
        self.reload = False
        self.__dict__.update(values)


def test_refusal():
    assert mold.refusal(FakeSettings(refork_after=())) is None
    assert mold.refusal(FakeSettings()) is None
    assert mold.refusal(FakeSettings(threads=4)).startswith("refork_after: not with threads")
    assert mold.refusal(FakeSettings(reload=True)).startswith("refork_after: not with reload")


def test_refusal_off_linux(monkeypatch):
    monkeypatch.setattr(mold.sys, "platform", "darwin")
    assert mold.refusal(FakeSettings()) == \
        "refork_after: needs Linux (PR_SET_CHILD_SUBREAPER); this is darwin"
    with pytest.raises(mold.MoldUnsupported, match="needs Linux"):
        mold.set_child_subreaper()


def test_order_round_trip_and_garbage():
    order = Order(3, 7, 1234, "forkserver: worker 3 [app:app] é")
    assert Order.decode(order.encode(42)) == (42, order)
    with pytest.raises(ValueError):
        Order.decode(b"HELO" + bytes(40))


# -- the harness ----------------------------------------------------------------------------
BIG_MIB = 64


def build_big() -> list[bytes]:
    """About BIG_MIB MiB of distinct objects, as an app's warmed caches would be."""
    return [i.to_bytes(8, "little") * 128 for i in range(BIG_MIB * 1024)]


def run_in_harness(scenario: Callable[[dict], None], timeout: float = 60.0) -> dict:
    """Fork a harness that sets itself as subreaper, run ``scenario(report)`` there, and
    return the report. The harness kills and waits every pid it lists in report["made"]."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the harness; never returns into pytest
        os.close(read_end)
        report: dict = {"made": [], "reaped": [], "not_ours": [], "harness": os.getpid()}
        try:
            mold.set_child_subreaper()
            scenario(report)
        except BaseException:  # noqa: BLE001 - carried back to the test
            report["error"] = traceback.format_exc()
        finally:
            try:
                _reap_all(report)
                os.write(write_end, json.dumps(report).encode())
            finally:
                os._exit(0)
    os.close(write_end)
    data = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([read_end], [], [], deadline - time.monotonic())
            if not ready:
                break
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(read_end)
        if not data:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    assert data, "the harness reported nothing in time"
    report = json.loads(data)
    assert "error" not in report, report["error"]
    left = [p for p in report["made"] if psutil.pid_exists(p)]
    assert not left, f"processes left behind: {left}"
    return report


def _reap_all(report: dict) -> None:
    """Harness side: kill what is still there, and wait for every pid made (our children)."""
    live = [pid for pid in report["made"] if pid not in report["reaped"]]
    for pid in live:
        try:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in live:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            report["not_ours"].append(pid)
    deadline = time.monotonic() + 5  # the molds' own middle processes, if any
    while time.monotonic() < deadline:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                time.sleep(0.01)
        except ChildProcessError:
            return


class Lines:
    """JSON lines written by the harness' descendants into one pipe."""

    def __init__(self) -> None:
        self.read_end, self.write_end = os.pipe()
        self.buffer = b""

    def write(self, **values: Any) -> None:
        os.write(self.write_end, json.dumps(values).encode() + b"\n")

    def take(self, count: int, timeout: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while self.buffer.count(b"\n") < count:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.read_end], [], [], max(0.0, left))
            if not ready:
                raise AssertionError(f"got {self.buffer!r}, wanted {count} lines")
            self.buffer += os.read(self.read_end, 65536)
        lines = self.buffer.split(b"\n")
        self.buffer = b"\n".join(lines[count:])
        return [json.loads(line) for line in lines[:count]]


def fake_worker(lines: Lines, master_pid: int) -> Callable[[Order], None]:
    """What ``become`` does in a real worker, reduced: report, then wait to be told to go."""
    def become(order: Order) -> None:
        mold.set_title(order.title)
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        lines.write(kind="worker", pid=os.getpid(), ppid=os.getppid(), index=order.index,
                    max_requests=order.max_requests, frozen=gc.get_freeze_count())
        while os.getppid() == master_pid:
            time.sleep(0.05)
    return become


def start_template(report: dict, lines: Lines, link: mold.Link, *,
                   on_signal: bool = False) -> int:
    """Fork the template: it builds the big object, then forks the mold (at once, or when
    PROMOTE_SIGNAL comes, as a worker would), then idles until killed."""
    harness = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            promoted: list[int] = []
            signal.signal(mold.PROMOTE_SIGNAL, lambda *_: promoted.append(1))
            big = build_big()
            lines.write(kind="template", pid=os.getpid(), size=sum(map(len, big)))
            template = mold.Template(
                link.worker, generation=1, master_pid=harness, title="harness: mold",
                drop=lambda: lines.write(kind="dropped", pid=os.getpid()),
                become=fake_worker(lines, harness))
            while on_signal and not promoted:
                time.sleep(0.01)
            lines.write(kind="forked", mold=mold.fork_mold(template))
            while os.getppid() == harness:
                time.sleep(0.05)
            code = 0
        finally:
            os._exit(code)
    report["made"].append(pid)
    return pid


def await_hello(link: mold.Link, timeout: float = 10.0) -> mold.Hello:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([link.master], [], [], deadline - time.monotonic())
        hellos = link.hellos()
        if hellos:
            return hellos[0]
    raise AssertionError("no mold announced itself")


def memory(pid: int) -> dict:
    info = psutil.Process(pid).memory_full_info()
    return {"rss": info.rss, "uss": info.uss, "pss": info.pss}


def wait_exit(report: dict, pid: int, timeout: float = 5.0) -> int | None:
    """The status of our child ``pid`` once it exits (booked as reaped), or None if it did not
    exit in time. Raises ChildProcessError if it is not the harness' child."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            report["reaped"].append(pid)
            return status
        time.sleep(0.01)
    return None


def mold_up(report: dict, *, on_signal: bool = False) -> tuple[Lines, mold.Link, int]:
    lines, link = Lines(), mold.Link()
    report["template"] = start_template(report, lines, link, on_signal=on_signal)
    report["big"] = lines.take(1, timeout=30)[0]["size"]
    return lines, link, report["template"]


# -- the protocol with real processes -------------------------------------------------------
def test_workers_forked_by_the_mold_are_the_masters_children_and_share_its_pages():
    def scenario(report: dict) -> None:
        lines, link, _ = mold_up(report)
        hello = await_hello(link)
        report["made"].append(hello.pid)
        client = mold.MoldClient(hello.pid, hello.generation, hello.channel)
        report["hello"] = [hello.pid, hello.template, hello.generation]
        report["mold_ppid"] = psutil.Process(hello.pid).ppid()
        report["mold_title"] = " ".join(psutil.Process(hello.pid).cmdline())
        pids = [client.spawn(Order(i, 1, 100 + i, f"harness: worker {i}")) for i in range(3)]
        report["made"] += pids
        report["pids"] = pids
        report["said"] = sorted(lines.take(5), key=lambda line: line["kind"])
        report["ppids"] = [psutil.Process(pid).ppid() for pid in pids]
        report["titles"] = [" ".join(psutil.Process(pid).cmdline()) for pid in pids]
        report["memory"] = [memory(pid) for pid in pids]
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        report["statuses"] = [wait_exit(report, pid) for pid in pids]
        client.close()  # EOF: the mold exits by itself
        report["mold_status"] = wait_exit(report, hello.pid)

    report = run_in_harness(scenario)
    harness, pids = report["harness"], report["pids"]
    template = report["template"]
    assert report["hello"][1:] == [template, 1]
    said = report["said"]  # sorted by kind: dropped, forked, worker x3
    assert said[0] == {"kind": "dropped", "pid": report["hello"][0]}  # drop ran in the mold only
    assert said[1] == {"kind": "forked", "mold": report["hello"][0]}  # fork_mold returned its pid
    workers = {line["pid"]: line for line in said[2:]}
    assert set(workers) == set(pids)
    for i, pid in enumerate(pids):
        assert workers[pid]["ppid"] == harness      # re-parented to the subreaper at once
        assert workers[pid]["index"] == i and workers[pid]["max_requests"] == 100 + i
        assert workers[pid]["frozen"] > 0            # the mold froze the warmed objects
    assert report["mold_ppid"] == harness
    assert "harness: mold" in report["mold_title"]
    assert report["ppids"] == [harness] * 3
    assert [f"harness: worker {i}" in title for i, title in enumerate(report["titles"])] == \
        [True] * 3
    big = report["big"]
    for reading in report["memory"]:
        assert reading["rss"] > big                 # the template's object is mapped ...
        assert reading["uss"] < big / 4             # ... but not copied
        assert reading["pss"] < reading["rss"]
    # The harness reaped them (waitpid only works on one's own children): TERM, exit 0.
    assert report["statuses"] == [0, 0, 0]
    assert report["mold_status"] == 0
    assert report["not_ours"] == []


def test_a_killed_mold_fails_requests_at_once_and_its_workers_stay_ours():
    def scenario(report: dict) -> None:
        lines, link, _ = mold_up(report)
        hello = await_hello(link)
        report["made"].append(hello.pid)
        client = mold.MoldClient(hello.pid, 1, hello.channel)
        worker = client.spawn(Order(0, 1, 0, "harness: worker 0"))
        report["made"].append(worker)
        lines.take(3)  # dropped, forked, the worker
        os.kill(hello.pid, signal.SIGKILL)
        report["mold_status"] = wait_exit(report, hello.pid)
        started = time.monotonic()
        try:
            client.spawn(Order(1, 1, 0, "harness: worker 1"), timeout=5.0)
        except mold.MoldError as error:
            report["error_text"] = str(error)
        report["failed_after"] = time.monotonic() - started
        report["worker_alive"] = psutil.Process(worker).status() != psutil.STATUS_ZOMBIE
        os.kill(worker, signal.SIGTERM)
        report["worker_status"] = wait_exit(report, worker)

    report = run_in_harness(scenario)
    assert os.WIFSIGNALED(report["mold_status"])
    assert "is gone" in report["error_text"]
    assert report["failed_after"] < 1.0  # EOF, not the timeout
    assert report["worker_alive"] and report["worker_status"] == 0


def test_a_hung_mold_times_out_and_a_wrong_generation_is_refused():
    def scenario(report: dict) -> None:
        _, link, _ = mold_up(report)
        hello = await_hello(link)
        report["made"].append(hello.pid)
        client = mold.MoldClient(hello.pid, 1, hello.channel)
        try:
            client.spawn(Order(0, 2, 0, "harness: worker of generation 2"))
        except mold.MoldError as error:
            report["refused"] = str(error)
        os.kill(hello.pid, signal.SIGSTOP)
        started = time.monotonic()
        try:
            client.spawn(Order(0, 1, 0, "harness: worker 0"), timeout=0.5)
        except mold.MoldError as error:
            report["hung"] = str(error)
        report["waited"] = time.monotonic() - started

    report = run_in_harness(scenario)
    assert "could not fork: Invalid argument" in report["refused"]
    assert "did not answer within 0.5s" in report["hung"]
    assert 0.4 < report["waited"] < 3.0


def test_keeper_promotes_on_signal_spawns_from_the_mold_and_falls_back_when_it_dies():
    def scenario(report: dict) -> None:
        lines, link, template = mold_up(report, on_signal=True)
        keeper = mold.Keeper(THRESHOLDS)
        keeper.link.close()
        keeper.link = link  # the one the template inherited
        keeper.follow(1)
        seats = [seat(template, 19, started=0.0)]
        report["early"] = keeper.plan(seats, 1.0).promote
        seats = [seat(template, 20, started=0.0)]
        plan = keeper.plan(seats, 2.0)
        report["promote"] = plan.promote
        report["stage_asked"] = keeper.stage.value
        os.kill(plan.promote, mold.PROMOTE_SIGNAL)  # what the pool does
        deadline = time.monotonic() + 10
        while keeper.stage is not Stage.MOLDED and time.monotonic() < deadline:
            select.select([link.master], [], [], 0.1)
            keeper.receive()
        report["made"].append(keeper.mold_pid)
        report["mold"], report["stage_molded"] = keeper.mold_pid, keeper.stage.value
        report["others"] = {str(pid): role for pid, role in keeper.others().items()}
        worker = keeper.spawn(Order(1, 1, 0, "harness: worker 1"))
        report["made"].append(worker)
        report["worker"] = worker
        lines.take(3)
        seats.append(seat(worker, 0, started=3.0, from_mold=keeper.mold_pid))
        report["replace"] = keeper.plan(seats, 3.0).recycle
        report["cold_for_gen2"] = keeper.spawn(Order(2, 2, 0, "harness: worker 2"))
        os.kill(keeper.mold_pid, signal.SIGKILL)
        status = wait_exit(report, keeper.mold_pid)
        report["was_mold"] = keeper.reaped(report["mold"], status)
        report["stage_lost"] = keeper.stage.value
        report["after_loss"] = keeper.spawn(Order(2, 1, 0, "harness: worker 2"))
        keeper.close()

    report = run_in_harness(scenario)
    template = report["template"]
    assert report["early"] is None
    assert report["promote"] == template and report["stage_asked"] == "promoting"
    assert report["stage_molded"] == "molded"
    assert report["others"] == {str(report["mold"]): "mold"}
    assert report["worker"] > 0
    assert report["replace"] == template           # the only stale worker, the template
    assert report["cold_for_gen2"] is None         # another generation: from the master
    assert report["was_mold"] is True and report["stage_lost"] == "idle"
    assert report["after_loss"] is None            # fall back to the master


def test_keeper_stops_a_mold_nobody_asked_for_and_one_of_an_old_generation():
    def scenario(report: dict) -> None:
        _, link, _ = mold_up(report)  # forks its mold at once, unasked
        keeper = mold.Keeper(THRESHOLDS)
        keeper.link.close()
        keeper.link = link
        keeper.follow(1)
        select.select([link.master], [], [], 10)
        keeper.receive()
        report["stage"] = keeper.stage.value
        report["leaving"] = sorted(keeper.leaving)
        report["made"] += report["leaving"]
        report["statuses"] = [wait_exit(report, pid) for pid in report["leaving"]]
        report["was_mold"] = [keeper.reaped(pid, 0) for pid in report["leaving"]]
        keeper.level = 2
        keeper.follow(2)
        report["level_after_follow"] = keeper.level
        keeper.close()

    report = run_in_harness(scenario)
    assert report["stage"] == "idle" and len(report["leaving"]) == 1
    assert report["statuses"] == [0]          # it read EOF and exited by itself
    assert report["was_mold"] == [True]
    assert report["level_after_follow"] == 0


def test_in_child_closes_the_masters_ends():
    keeper = mold.Keeper(THRESHOLDS)
    try:
        master_end, worker_end = keeper.link.master, keeper.worker_link
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                keeper.in_child()
                code = 0 if master_end.fileno() == -1 and worker_end.fileno() >= 0 else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert master_end.fileno() >= 0  # only the child's copy was closed
    finally:
        keeper.close()
    assert mold.Keeper(()).enabled is False and mold.Keeper(()).fds() == []


def test_when_the_master_dies_the_mold_exits_by_itself():
    """A nested harness (subreaper too) makes a template and a mold and dies without a word:
    both are re-parented to the outer harness, see that their master is gone, and exit."""
    def scenario(report: dict) -> None:
        read_end, write_end = os.pipe()
        inner = os.fork()
        if inner == 0:
            code = 1
            try:
                mold.set_child_subreaper()
                inner_report: dict = {"made": []}
                _, link, template = mold_up(inner_report)
                hello = await_hello(link)
                os.write(write_end, json.dumps([template, hello.pid]).encode())
                code = 0
            finally:
                os._exit(code)  # no cleanup: the master "crashed"
        report["made"].append(inner)
        os.close(write_end)
        select.select([read_end], [], [], 30)
        orphans = json.loads(os.read(read_end, 4096) or b"[]")
        os.close(read_end)
        report["made"] += orphans
        report["inner_status"] = wait_exit(report, inner)
        report["orphans"] = orphans
        report["statuses"] = [wait_exit(report, pid, timeout=10) for pid in orphans]

    report = run_in_harness(scenario)
    assert report["inner_status"] == 0 and len(report["orphans"]) == 2
    # Re-parented to the outer harness (it could wait for them), and gone by themselves.
    assert report["statuses"] == [0, 0], report


def test_a_child_the_master_never_booked_exits_before_it_becomes_a_worker():
    """The master read the pid but never said "took" (it gave up, or the mold died): the new
    process must not serve or touch its slot, and must not be left behind."""
    def scenario(report: dict) -> None:
        lines, link, _ = mold_up(report)
        hello = await_hello(link)
        report["made"].append(hello.pid)
        lines.take(2)  # dropped, forked
        hello.channel.settimeout(5)
        hello.channel.send(Order(0, 1, 0, "harness: worker 0").encode(7))
        kind, token, pid = struct.unpack("=4sIi", hello.channel.recv(64))
        report["made"].append(pid)
        report["answer"] = [kind.decode(), token]
        hello.channel.close()  # no "took"
        report["child_status"] = wait_exit(report, pid)
        report["mold_status"] = wait_exit(report, hello.pid)
        try:
            report["said"] = lines.take(1, timeout=1.0)
        except AssertionError:
            report["said"] = []

    report = run_in_harness(scenario)
    assert report["answer"] == ["PID ", 7]
    assert report["child_status"] == 0 and report["mold_status"] == 0
    assert report["said"] == []  # become() never ran
