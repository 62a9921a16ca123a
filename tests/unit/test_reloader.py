"""The development reloader on a temporary directory: edits, rename-over saves, delete and
recreate, globs, debounce, and the module reports a worker writes for the master.

The clock is a fake one the test advances, so nothing here sleeps except to let the file
system's timestamps move on.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
import types

import pytest

from forkserver import reloader
from forkserver.reloader import DEBOUNCE, INTERVAL, MAX_SETTLE, Phase, Reloader


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


def write(path, text):
    path.write_text(text)
    return str(path)


def tick():
    time.sleep(0.02)  # past the kernel's coarse timestamp granularity


def run_until_reload(watcher, clock, limit=10.0):
    """Advance the fake clock to each next_check(); return the time of the True answer."""
    end = clock.now + limit
    while clock.now < end:
        clock.now = max(clock.now, watcher.next_check())
        if watcher.check():
            return clock.now
    return None


def quiet_for(watcher, clock, seconds):
    """Run scans for ``seconds`` of fake time; True if any of them asked for a reload."""
    end = clock.now + seconds
    fired = False
    while watcher.next_check() <= end:
        clock.now = watcher.next_check()
        fired |= watcher.check()
    clock.now = end
    return fired


def test_no_change_no_reload(tmp_path, clock):
    path = write(tmp_path / "app.py", "x = 1\n")
    watcher = Reloader([path], clock=clock)
    assert not quiet_for(watcher, clock, 10 * INTERVAL)
    assert watcher.phase is Phase.WATCHING


def test_modify(tmp_path, clock):
    path = write(tmp_path / "app.py", "x = 1\n")
    watcher = Reloader([path], clock=clock)
    tick()
    write(tmp_path / "app.py", "x = 2\n")  # same size: only the mtime tells
    started = clock.now
    fired_at = run_until_reload(watcher, clock)
    assert fired_at is not None and fired_at - started <= INTERVAL + DEBOUNCE + 1e-9
    assert watcher.changed == [os.path.abspath(path)]
    assert not quiet_for(watcher, clock, 10 * INTERVAL)  # exactly once


def test_rename_over_keeps_size_and_mtime_but_not_inode(tmp_path, clock):
    path = write(tmp_path / "app.py", "x = 1\n")
    old = os.stat(path)
    watcher = Reloader([path], clock=clock)
    # what "atomic save" editors do: write a new file beside it, rename it over the old one
    replacement = write(tmp_path / ".app.py.swp", "x = 2\n")
    os.utime(replacement, ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(replacement, path)
    assert (os.stat(path).st_mtime_ns, os.stat(path).st_size) == (old.st_mtime_ns, old.st_size)
    assert run_until_reload(watcher, clock) is not None
    assert watcher.changed == [os.path.abspath(path)]


def test_delete_and_recreate_is_one_reload(tmp_path, clock):
    path = write(tmp_path / "app.py", "x = 1\n")
    watcher = Reloader([path], clock=clock)
    os.unlink(path)
    clock.now = watcher.next_check()
    assert not watcher.check()  # gone: a change, settling
    assert watcher.phase is Phase.SETTLING
    write(tmp_path / "app.py", "x = 22\n")
    clock.now = watcher.next_check()
    watcher.check()
    assert run_until_reload(watcher, clock) is not None
    assert not quiet_for(watcher, clock, 10 * INTERVAL)


def test_a_deleted_file_alone_is_a_change(tmp_path, clock):
    path = write(tmp_path / "app.py", "x = 1\n")
    watcher = Reloader([path], clock=clock)
    os.unlink(path)
    assert run_until_reload(watcher, clock) is not None
    assert not quiet_for(watcher, clock, 10 * INTERVAL)  # staying gone is not a new change


def test_glob_match_new_and_changed(tmp_path, clock, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "templates" / "mail").mkdir(parents=True)
    write(tmp_path / "templates" / "index.html", "<p>1</p>")
    watcher = Reloader(extra_globs=["templates/**/*.html"], clock=clock)
    assert not quiet_for(watcher, clock, 3 * INTERVAL)
    write(tmp_path / "templates" / "notes.txt", "not matched")
    assert not quiet_for(watcher, clock, 3 * INTERVAL)
    new = write(tmp_path / "templates" / "mail" / "welcome.html", "<p>hi</p>")
    assert run_until_reload(watcher, clock) is not None
    assert watcher.changed == [new]
    tick()
    write(tmp_path / "templates" / "index.html", "<p>2</p>")
    assert run_until_reload(watcher, clock) is not None
    assert watcher.changed == [str(tmp_path / "templates" / "index.html")]


def test_debounce_waits_for_the_burst_to_end(tmp_path, clock):
    paths = [write(tmp_path / f"m{i}.py", "x = 1\n") for i in range(4)]
    watcher = Reloader(paths, clock=clock, interval=0.1, debounce=0.35)
    for i, path in enumerate(paths):  # a formatter touching one file per scan
        tick()
        write(tmp_path / f"m{i}.py", f"x = {i + 10}\n")
        clock.now = watcher.next_check()
        assert not watcher.check(), i
    burst_end = clock.now
    fired_at = run_until_reload(watcher, clock)
    assert fired_at is not None and fired_at >= burst_end + 0.35 - 1e-9
    assert watcher.changed == sorted(os.path.abspath(p) for p in paths)  # one reload for all


def test_a_burst_that_never_ends_still_reloads(tmp_path, clock):
    path = write(tmp_path / "log.txt", "")
    watcher = Reloader([path], clock=clock, interval=0.1, debounce=0.35)
    started = None
    for i in range(int(MAX_SETTLE / 0.1) + 5):
        with open(path, "a") as file:
            file.write(f"{i}\n")
        clock.now = watcher.next_check()
        if watcher.check():
            break
        if started is None and watcher.phase is Phase.SETTLING:
            started = clock.now
    else:
        pytest.fail("a file changing on every scan never triggered a reload")
    assert clock.now - started <= MAX_SETTLE + 0.2


def test_next_check_bounds_the_masters_sleep(tmp_path, clock):
    path = write(tmp_path / "app.py", "x = 1\n")
    watcher = Reloader([path], clock=clock, interval=1.0, debounce=0.2)
    assert watcher.next_check() == clock.now + 1.0
    os.unlink(path)
    clock.now = watcher.next_check()
    watcher.check()
    assert watcher.next_check() == pytest.approx(clock.now + 0.2)  # settle before next scan


# -- module reports -----------------------------------------------------------------------

def test_module_files_skips_inherited_and_fileless_modules(tmp_path):
    source = write(tmp_path / "mine.py", "")
    modules = {
        "mine": types.SimpleNamespace(__file__=source),
        "os": os,
        "builtin": sys,  # no __file__
        "ghost": types.SimpleNamespace(__file__=str(tmp_path / "gone.py")),
        "broken": None,
    }
    assert reloader.module_files(modules, inherited={"os"}) == [source]


def test_report_is_adopted_with_the_signature_seen_at_import(tmp_path, clock):
    reports = tmp_path / "reports"
    reports.mkdir()
    module = write(tmp_path / "views.py", "A = 1\n")
    modules = {"views": types.SimpleNamespace(__file__=module), "os": os}
    report = reloader.report_modules(str(reports), inherited={"os"}, modules=modules)
    assert os.path.basename(report) == f"worker-{os.getpid()}.modules"
    assert os.listdir(reports) == [os.path.basename(report)]  # no leftovers
    tick()
    write(tmp_path / "views.py", "A = 2\n")  # edited after the worker imported it
    watcher = Reloader(report_dir=str(reports), clock=clock)
    assert run_until_reload(watcher, clock) is not None
    assert watcher.changed == [module]


def test_a_worker_process_reports_what_the_app_imported(tmp_path, clock):
    package = tmp_path / "demoapp"
    package.mkdir()
    write(package / "__init__.py", "from . import views\n")
    views = write(package / "views.py", "import json\nANSWER = 1\n")
    reports = tmp_path / "reports"
    reports.mkdir()
    code = ("import sys; from forkserver import reloader; before = set(sys.modules); "
            "import demoapp; print(reloader.report_modules(sys.argv[1], before))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    done = subprocess.run([sys.executable, "-c", code, str(reports)], env=env, timeout=60,
                          capture_output=True, text=True, check=True)
    with open(done.stdout.strip()) as report:
        listed = [line.split("\t")[3].rstrip("\n") for line in report]
    assert str(package / "__init__.py") in listed and views in listed
    assert not any(p.endswith(os.sep + "reloader.py") for p in listed)  # inherited
    watcher = Reloader(report_dir=str(reports), clock=clock)
    assert not quiet_for(watcher, clock, 3 * INTERVAL)
    tick()
    write(package / "views.py", "import json\nANSWER = 2\n")
    assert run_until_reload(watcher, clock) is not None
    assert watcher.changed == [views]


def test_a_truncated_report_is_ignored(tmp_path, clock):
    reports = tmp_path / "reports"
    reports.mkdir()
    write(reports / "worker-1.modules", "12\t3\n")
    watcher = Reloader(report_dir=str(reports), clock=clock)
    assert not quiet_for(watcher, clock, 3 * INTERVAL)


def test_the_state_table_refuses_an_unlisted_transition(tmp_path, clock):
    watcher = Reloader(clock=clock)
    with pytest.raises(KeyError):
        watcher._advance(reloader.Event.QUIET)


def test_a_failed_import_reports_the_file_to_fix(tmp_path, clock):
    package = tmp_path / "brokenapp"
    package.mkdir()
    write(package / "__init__.py", "from . import helpers\n")
    helpers = write(package / "helpers.py", "def broken(:\n")  # a SyntaxError
    code = ("import sys; from forkserver import reloader; before = set(sys.modules)\n"
            "try:\n    import brokenapp\n"
            "except Exception as error:\n"
            "    print(reloader.report_modules(sys.argv[1], before, error=error))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    watcher = Reloader.for_workers(clock=clock)
    try:
        done = subprocess.run([sys.executable, "-c", code, watcher.report_dir], env=env,
                              timeout=60, capture_output=True, text=True, check=True)
        assert done.stdout.strip()
        assert not quiet_for(watcher, clock, 3 * INTERVAL)
        tick()
        write(package / "helpers.py", "def fixed():\n    pass\n")
        assert run_until_reload(watcher, clock) is not None
        assert watcher.changed == [helpers]
    finally:
        watcher.close()
    assert not os.path.exists(watcher.report_dir)


def test_error_files_of_a_runtime_error(tmp_path):
    module = write(tmp_path / "boom.py", "raise RuntimeError('at import')\n")
    spec = importlib.util.spec_from_file_location("boom", module)
    with pytest.raises(RuntimeError) as info:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert module in reloader.error_files(info.value)


def test_forget_drops_a_reaped_workers_report(tmp_path, clock):
    watcher = Reloader.for_workers(clock=clock)
    try:
        module = write(tmp_path / "m.py", "")
        modules = {"m": types.SimpleNamespace(__file__=module)}
        report = reloader.report_modules(watcher.report_dir, (), modules=modules)
        watcher.scan()
        watcher.forget(os.getpid())
        assert not os.path.exists(report)
        tick()
        write(tmp_path / "m.py", "x = 1\n")  # still watched
        assert run_until_reload(watcher, clock) is not None
    finally:
        watcher.close()
