"""Refork end to end (issue 17, item 2): a real server with ``--preload --refork-after 20,100``
and 4 workers, under the ops load loop. A warm worker's copy becomes the mold (its process
title says so, its parent is the master), the workers are replaced one at a time by children
of the mold that are children of the master, and no request fails. Then every operation with
a mold in place: TTIN/TTOU, TERM, HUP, USR2, a request timeout, max_requests recycling, and a
mold that dies (spawns fall back to the master).

How a worker's origin is seen from outside: the app counts the requests each process served
in a module-level dict. A worker forked by the cold master inherits nothing; one forked from
the mold inherits the template's counts (``inherited`` > 0 on its first answer). The master's
log says the same: "booting worker PID (slot I, generation G, from mold M)".
"""

from __future__ import annotations

import re
import signal
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import requests

from tests.conftest import Server
from tests.ops.load_loop import LoadLoop

WORKERS = 4

APP = """
import gc
import os
import time

VERSION = {version!r}
SERVED = {{}}  # pid -> requests served there; a forked child inherits its parent's entries
CACHE = []     # built lazily by the first request a process serves, as apps' caches are


def app(environ, start_response):
    if environ["PATH_INFO"] == "/hang":
        while True:
            time.sleep(0.1)
    if not CACHE:
        CACHE.extend(i.to_bytes(8, "little") * 96 for i in range({cache_items}))
    pid = os.getpid()
    SERVED[pid] = SERVED.get(pid, 0) + 1
    inherited = sum(count for owner, count in SERVED.items() if owner != pid)
    body = f"{{VERSION}} {{pid}} {{os.getppid()}} {{inherited}} {{gc.get_freeze_count()}}"
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(body)))])
    return [body.encode()]
"""

BOOTED_FROM_MOLD = re.compile(r"booting worker (\d+) \(slot \d+, generation (\d+), "
                              r"from mold (\d+)\)")
BOOTED_COLD = re.compile(r"booting worker (\d+) \(slot \d+, generation (\d+)\)")
MOLD_UP = re.compile(r"mold (\d+) forked from worker (\d+) \(generation (\d+)\)")


@pytest.fixture(autouse=True)
def integrated():
    """Until the pool drives the mold and workers fork it, fail at once instead of waiting out
    every timeout."""
    from forkserver import pool, worker
    assert hasattr(pool, "mold"), "forkserver.pool does not use forkserver.mold yet"
    assert hasattr(worker, "mold"), "forkserver.worker does not fork a mold yet"


CACHE_MIB = 24


def write_app(directory: Path, version: str) -> None:
    items = CACHE_MIB * 1024 * 1024 // 800  # a 768-byte bytes object takes about 800
    (directory / "warm.py").write_text(textwrap.dedent(APP.format(version=version,
                                                                  cache_items=items)))


@pytest.fixture
def app_dir(tmp_path) -> Path:
    directory = tmp_path / "app"
    directory.mkdir()
    write_app(directory, "v1")
    return directory


def start(server_factory, app_dir: Path, *args: str, refork: str = "20,100") -> Server:
    return server_factory("warm:app", "--preload", "--refork-after", refork, *args,
                          workers=WORKERS, cwd=app_dir, env={"PYTHONDONTWRITEBYTECODE": "1"})


# -- what the server looks like from outside ------------------------------------------------
def children(server: Server) -> dict[int, str]:
    """The master's children, pid -> command line (the process title)."""
    found = {}
    try:
        kids = psutil.Process(server.pid).children()
    except psutil.NoSuchProcess:
        return found
    for child in kids:
        try:
            found[child.pid] = " ".join(child.cmdline())
        except psutil.Error:
            continue
    server.known_pids.update(found)  # so the final stop checks none is left
    return found


def molds(server: Server) -> list[int]:
    return [pid for pid, title in children(server).items() if ": mold" in title]


def workers(server: Server) -> list[int]:
    return [pid for pid, title in children(server).items() if ": worker" in title]


def from_mold(server: Server) -> dict[int, int]:
    """Workers the log says were forked by a mold: pid -> mold pid."""
    return {int(m[1]): int(m[3]) for m in BOOTED_FROM_MOLD.finditer(server.log())}


def molds_logged(server: Server, after: int = 0, generation: int | None = None) -> list[int]:
    """Molds the log announced past offset ``after`` (of ``generation``, if given)."""
    return [int(m[1]) for m in MOLD_UP.finditer(server.log(), after)
            if generation is None or int(m[3]) == generation]


def wait_until(check: Callable[[], object], what: str, server: Server,
               timeout: float = 30.0) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; the master's children: "
                         f"{children(server)}\n{server.log()[-4000:]}")


def reforked(server: Server, count: int = WORKERS, molds_seen: int = 1) -> int:
    """Wait until the ``molds_seen``-th mold was announced, and then until one mold lives and
    every one of ``count`` workers was forked by it; returns that mold's pid."""
    server.wait_for_log(MOLD_UP, timeout=60, count=molds_seen)

    def settled() -> int | None:
        live = molds(server)
        if len(live) != 1:
            return None
        current = workers(server)
        origin = from_mold(server)
        if len(current) == count and all(origin.get(pid) == live[0] for pid in current):
            return live[0]
        return None

    return wait_until(settled, f"{count} workers forked from one mold", server, 60)


def gone(server: Server, pids: list[int]) -> None:
    wait_until(lambda: not [pid for pid in pids if psutil.pid_exists(pid)],
               f"{pids} to exit", server)


def report(name: str, result) -> None:
    print(f"\nSCENARIO {name}: sent={result.sent} failed={result.failed} "
          f"retried={result.retried} refused-after-stop={result.refused}")


def answers(result) -> list[tuple[int, int, int]]:
    """(pid, ppid, inherited) of every answer the load got."""
    found = []
    for body in result.bodies:
        _, pid, ppid, inherited, _ = body.split()
        found.append((int(pid), int(ppid), int(inherited)))
    return found


# -- the refork itself ----------------------------------------------------------------------
def test_workers_are_replaced_by_children_of_the_mold_with_no_failure(server_factory, app_dir):
    server = start(server_factory, app_dir)
    cold = set(workers(server))
    with LoadLoop(server.port, max_seconds=90) as load:
        load.wait_for(50)
        first = reforked(server)
        mold = psutil.Process(first)
        assert mold.ppid() == server.pid                  # double fork: the master's child
        assert ": mold" in " ".join(mold.cmdline())
        second = reforked(server, molds_seen=2)           # refork_after's second threshold
        assert second != first
        gone(server, [first])
        load.wait_for(200)
    result = load.result
    report("refork 20,100", result)
    assert result.failed == 0, result.errors
    now = workers(server)
    assert not set(now) & cold
    for pid in now:
        assert psutil.Process(pid).ppid() == server.pid   # reaped, timed out, signalled by it
    seen = answers(result)
    assert all(ppid == server.pid for _, ppid, _ in seen)
    # Answers came from workers that inherited a warm template's state.
    assert any(inherited > 0 for pid, _, inherited in seen if pid in now)
    server.wait_for_log(r"recycling worker \d+ \((reload|refork)\)")
    server.wait_for_log(rf"booting worker \d+ \(slot \d+, generation 1, from mold {second}\)")


def test_mold_children_share_the_cache_the_template_built(server_factory, app_dir):
    server = start(server_factory, app_dir)
    with LoadLoop(server.port, max_seconds=60) as load:
        load.wait_for(50)
        mold = reforked(server, molds_seen=2)
        load.wait_for(100)
        readings = {pid: psutil.Process(pid).memory_full_info() for pid in workers(server)}
    assert load.result.failed == 0, load.result.errors
    assert molds(server) == [mold]
    cache = CACHE_MIB * 1024 * 1024
    for pid, info in readings.items():
        # A cold worker builds the cache itself (USS over CACHE_MIB); a child of the mold
        # maps the template's copy and owns little of it.
        assert info.rss > cache, (pid, info)
        assert info.uss < cache / 2, (pid, info)
        assert info.pss < info.rss


# -- every operation with a mold in place ---------------------------------------------------
def test_ttin_and_ttou_with_a_mold(server_factory, app_dir):
    server = start(server_factory, app_dir)
    with LoadLoop(server.port, max_seconds=90) as load:
        load.wait_for(50)
        mold = reforked(server, molds_seen=2)
        server.send_signal(signal.SIGTTIN)
        server.wait_for_log(rf"TTIN: {WORKERS + 1} workers")
        assert reforked(server, WORKERS + 1, molds_seen=2) == mold  # the new one from the mold
        server.send_signal(signal.SIGTTOU)
        server.wait_for_log(rf"TTOU: {WORKERS} workers")
        wait_until(lambda: len(workers(server)) == WORKERS, f"{WORKERS} workers", server)
        load.wait_for(200)
    result = load.result
    report("TTIN/TTOU with a mold", result)
    assert result.failed == 0, result.errors
    assert molds(server) == [mold]


def test_term_stops_the_mold_too(server_factory, app_dir):
    server = start(server_factory, app_dir)
    with LoadLoop(server.port, threads=2, max_seconds=90) as load:
        load.wait_for(50)
        mold = reforked(server)
        everyone = [mold, *workers(server)]
        code = server.stop(signal.SIGTERM)   # checks that none of known_pids is left
    result = load.result
    report("TERM with a mold", result)
    assert code == 0
    assert result.failed == 0, result.errors
    assert not [pid for pid in everyone if psutil.pid_exists(pid)]


def test_hup_starts_a_cold_generation_and_stops_the_old_mold(server_factory, app_dir):
    server = start(server_factory, app_dir)
    with LoadLoop(server.port, max_seconds=120) as load:
        load.wait_for(50)
        reforked(server)
        old_workers = set(workers(server))
        offset = len(server.log())
        server.send_signal(signal.SIGHUP)
        server.wait_for_log(rf"{WORKERS} workers ready \(generation 2\)", timeout=30)
        cold = [int(m[1]) for m in BOOTED_COLD.finditer(server.log(), offset) if m[2] == "2"]
        assert len(cold) >= WORKERS                       # the new generation is cold
        gone(server, molds_logged(server, generation=1))  # the old mold went with its workers
        wait_until(lambda: molds_logged(server, offset, generation=2), "a mold of generation 2",
                   server, 60)
        new_mold = reforked(server)                       # reforked at its own threshold
        assert new_mold in molds_logged(server, offset, generation=2)
        load.wait_for(200)
    result = load.result
    report("HUP with a mold", result)
    assert result.failed == 0, result.errors
    assert not set(workers(server)) & old_workers  # (with preload, HUP keeps the code)


def test_usr2_upgrades_in_place_and_the_new_image_reforks(server_factory, app_dir):
    server = start(server_factory, app_dir)
    master = server.pid
    with LoadLoop(server.port, max_seconds=120) as load:
        load.wait_for(50)
        reforked(server)
        write_app(app_dir, "v2")
        server.send_signal(signal.SIGUSR2)
        upgraded = server.wait_for_log(r"upgraded in place", timeout=30).end()
        server.wait_for_log(rf"generation 1 ready; retiring {WORKERS} old workers", timeout=30)
        old = molds_logged(server)
        old = [pid for pid in old if pid not in molds_logged(server, upgraded)]
        gone(server, old)                                 # the exec closed their channels
        wait_until(lambda: molds_logged(server, upgraded), "a mold of the new image", server, 60)
        new_mold = reforked(server, molds_seen=len(old) + 1)
        assert new_mold in molds_logged(server, upgraded)
        assert psutil.Process(new_mold).ppid() == master
        load.wait_for(100)
    result = load.result
    report("USR2 with a mold", result)
    assert result.failed == 0, result.errors
    assert server.proc.poll() is None and server.pid == master
    assert requests.get(server.url, timeout=10).text.startswith("v2")


def test_a_request_timeout_aborts_a_mold_child_and_the_mold_replaces_it(server_factory,
                                                                         app_dir):
    server = start(server_factory, app_dir, "--timeout", "2")
    with LoadLoop(server.port, max_seconds=60) as load:
        load.wait_for(50)
        mold = reforked(server, molds_seen=2)
    assert load.result.failed == 0, load.result.errors
    try:
        requests.get(f"{server.url}/hang", timeout=15)
    except requests.RequestException:
        pass  # the hung worker was aborted under it: that is the point
    hung = int(server.wait_for_log(r"worker (\d+) timed out after", timeout=20)[1])
    assert from_mold(server).get(hung) == mold
    server.wait_for_log(rf"worker {hung} killed by SIG(ABRT|KILL)", timeout=20)
    assert reforked(server, molds_seen=2) == mold      # its replacement came from the mold
    with LoadLoop(server.port, max_seconds=30) as load:
        load.wait_for(100)
    assert load.result.failed == 0, load.result.errors


def test_max_requests_recycling_forks_from_the_mold(server_factory, app_dir):
    server = start(server_factory, app_dir, "--max-requests", "300")
    with LoadLoop(server.port, max_seconds=120) as load:
        load.wait_for(50)
        mold = reforked(server, molds_seen=2)
        recycled = int(server.wait_for_log(r"recycling worker (\d+) \(requests\)",
                                           timeout=60)[1])
        server.wait_for_log(rf"worker {recycled} exited with code 0 \(requests", timeout=30)
        assert reforked(server, molds_seen=2) == mold
        load.wait_for(100)
    result = load.result
    report("max_requests with a mold", result)
    assert result.failed == 0, result.errors


def test_a_dead_mold_means_cold_spawns_until_the_next_threshold(server_factory, app_dir):
    # Until the kill, one request at a time (a few thousand at most), so that no worker is
    # near the second threshold when the mold dies: the spawn that follows must be cold.
    server = start(server_factory, app_dir, refork="20,5000")
    for _ in range(3000):
        assert requests.get(server.url, timeout=10).status_code == 200
        if MOLD_UP.search(server.log()):
            break
    mold = int(server.wait_for_log(MOLD_UP, timeout=30)[1])
    psutil.Process(mold).kill()
    # Seen by its reap, or by a spawn that found it gone first.
    lost = server.wait_for_log(rf"mold {mold} (was killed by SIGKILL|is gone)[^\n]*; "
                               r"forking workers from the master").end()
    before = len(list(BOOTED_COLD.finditer(server.log())))
    server.send_signal(signal.SIGTTIN)
    server.wait_for_log(BOOTED_COLD, count=before + 1)   # the master forked it, cold
    assert str(mold) not in [m[3] for m in BOOTED_FROM_MOLD.finditer(server.log(), lost)]
    with LoadLoop(server.port, max_seconds=120) as load:
        second = reforked(server, WORKERS + 1, molds_seen=2)  # the next threshold: a new one
        assert second != mold
        load.wait_for(100)
    result = load.result
    report("after a mold was killed", result)
    assert result.failed == 0, result.errors


@pytest.mark.parametrize(("args", "line"), [
    (("--threads", "2"), "refork_after: not with threads > 1"),
    (("--reload",), "refork_after: not with reload"),
], ids=["threads", "reload"])
def test_refork_with_settings_it_cannot_serve_is_refused_in_one_line(tmp_path, app_dir, args,
                                                                    line):
    server = Server(tmp_path, "warm:app", "--refork-after", "20", *args, wait_ready=False,
                    cwd=app_dir)
    server.start()
    code = server.wait_exit(30)
    assert code != 0
    log = server.log()
    assert line in log
    assert "Traceback" not in log
    assert not server._kill_leftovers()
