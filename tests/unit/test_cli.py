"""The command line: exit codes, one-line errors, --print-config, --check-config, the hand-off.

The real server is tested in tests/integration; here ``main`` only runs paths that return before a
master would start, plus the hand-off itself with a stand-in Master.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
import types
from pathlib import Path
from typing import ClassVar

import pytest

import forkserver
from forkserver import cli, config

ROOT = Path(__file__).resolve().parents[2]

GOOD_APP = "def app(environ, start_response):\n    return [b'ok']\n"


@pytest.fixture
def clean(tmp_path, monkeypatch):
    """An empty working directory, no FORKSERVER_* variables, and sys.path restored afterwards."""
    for var in list(os.environ):
        if var.startswith("FORKSERVER_") or var == "WEB_CONCURRENCY":
            monkeypatch.delenv(var)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_version(clean, capsys):
    status, out, err = run(capsys, "--version")
    assert (status, out, err) == (0, f"forkserver {forkserver.__version__}\n", "")


def test_version_works_with_a_broken_config(clean, capsys, monkeypatch):
    monkeypatch.setenv("FORKSERVER_WORKERS", "many")
    assert run(capsys, "--version")[0] == 0


def test_help_exits_zero(clean, capsys):
    status, out, _ = run(capsys, "--help")
    assert status == 0
    assert "--check-config" in out and "--workers" in out


def test_config_error_is_one_line_and_exit_2(clean, capsys):
    (clean / "forkserver.toml").write_text('workers = "x"\n')
    status, out, err = run(capsys, "--print-config")
    assert (status, out) == (2, "")
    assert err == 'forkserver: error: workers = "x" in forkserver.toml: expected an integer\n'


def test_usage_error_is_one_line_and_exit_2(clean, capsys):
    status, _, err = run(capsys, "--wrokers=3")
    assert status == 2
    assert err == (
        "forkserver: error: unrecognized arguments: --wrokers=3 (did you mean '--workers'?)\n"
    )


def test_debug_log_level_adds_a_traceback(clean, capsys):
    status, _, err = run(capsys, "--log-level", "debug", "-w", "0", "--print-config")
    assert status == 2
    assert "Traceback" in err
    assert err.endswith("forkserver: error: workers = \"0\" on the command line (-w/--workers): "
                        "must be at least 1\n")


def test_print_config_round_trips_through_config(clean, capsys):
    argv = ["-w", "3", "-b", "unix:/tmp/x.sock", "--no-preload", "--keepalive", "0", "my.mod:app"]
    status, printed, err = run(capsys, *argv, "--print-config")
    assert (status, err) == (0, "")
    (clean / "printed.toml").write_text(printed)
    status, again, _ = run(capsys, "-c", "printed.toml", "--print-config")
    assert status == 0
    assert tomllib.loads(again) == tomllib.loads(printed)
    assert tomllib.loads(printed)["bind"] == ["unix:/tmp/x.sock"]
    assert tomllib.loads(printed)["app"] == "my.mod:app"


def test_check_config_ok_finds_the_app_in_the_working_directory(clean, capsys):
    (clean / "goodapp_cli.py").write_text(GOOD_APP)
    try:
        status, out, err = run(capsys, "--check-config", "goodapp_cli:app")
    finally:
        sys.modules.pop("goodapp_cli", None)
    assert (status, out, err) == (0, "forkserver: config ok, app goodapp_cli:app loads\n", "")
    assert sys.path[0] == str(clean)


def test_check_config_applies_chdir_and_pythonpath(clean, capsys, monkeypatch):
    (clean / "site" / "libs").mkdir(parents=True)
    (clean / "site" / "libs" / "goodapp_cli_lib.py").write_text(GOOD_APP)
    (clean / "forkserver.toml").write_text('chdir = "site"\npythonpath = "libs"\n')
    try:
        status, out, _ = run(capsys, "--check-config", "goodapp_cli_lib")
    finally:
        sys.modules.pop("goodapp_cli_lib", None)
    assert status == 0, out
    assert os.getcwd() == str(clean / "site")
    assert sys.path[:2] == [str(clean / "site"), str(clean / "site" / "libs")]


def test_bad_chdir_is_a_config_error(clean, capsys):
    status, _, err = run(capsys, "--check-config", "--chdir", "nowhere")
    assert status == 2
    assert err == "forkserver: error: chdir = 'nowhere': No such file or directory\n"


def test_check_config_failing_app_exits_1_with_one_line(clean, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    status, out, err = run(capsys, "--check-config", "tests.apps.bad_import:app")
    assert (status, out) == (1, "")
    assert err == (
        "forkserver: error: cannot import module 'tests.apps.bad_import' "
        "(ModuleNotFoundError: No module named 'module_that_does_not_exist_xyz')\n"
    )


def test_check_config_as_a_real_process():
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORKSERVER_")}
    result = subprocess.run(
        [sys.executable, "-m", "forkserver", "--check-config", "tests.apps.bad_import:app"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("forkserver: error: cannot import module 'tests.apps.bad_import'")
    assert "module_that_does_not_exist_xyz" in lines[0]


class FakeMaster:
    """Stands in for forkserver.master.Master to check what main hands over."""

    created: ClassVar[list[FakeMaster]] = []

    def __init__(self, settings, reload):
        self.settings = settings
        self.reload = reload
        FakeMaster.created.append(self)

    def run(self) -> int:
        return 17


def test_main_hands_settings_and_a_reload_callable_to_the_master(clean, capsys, monkeypatch):
    fake = types.ModuleType("forkserver.master")
    fake.Master = FakeMaster
    monkeypatch.setitem(sys.modules, "forkserver.master", fake)
    FakeMaster.created.clear()
    (clean / "conf.toml").write_text("workers = 2\nbacklog = 5\n")

    status = cli.main(["-c", "conf.toml", "--backlog", "64", "some.mod:app"])

    assert status == 17
    (master,) = FakeMaster.created
    assert (master.settings.workers, master.settings.backlog) == (2, 64)
    assert master.settings.app == "some.mod:app"
    assert sys.path[0] == str(clean)
    # A reload re-reads the file and environment and keeps the command line on top.
    (clean / "conf.toml").write_text("workers = 3\nbacklog = 6\n")
    monkeypatch.setenv("FORKSERVER_KEEPALIVE", "1.5")
    reloaded = master.reload()
    assert (reloaded.workers, reloaded.backlog, reloaded.keepalive) == (3, 64, 1.5)
    assert reloaded.app == "some.mod:app"
    assert isinstance(reloaded, config.Settings)
