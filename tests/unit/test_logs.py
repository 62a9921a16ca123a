"""The error log: line format, level filtering, handler replacement, reopen, pid after fork."""

from __future__ import annotations

import json
import logging
import os
import re

import pytest

from forkserver import logs

LINE = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4})\] \[(\d+)\] \[([A-Z]+)\] (.*)$"
)


@pytest.fixture(autouse=True)
def restore_logger():
    logger = logging.getLogger(logs.LOGGER_NAME)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]
    logs._format = "text"


def _lines(path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_line_format_in_a_file(tmp_path):
    path = tmp_path / "error.log"
    logger = logs.setup("info", str(path))
    assert logger is logs.get_logger() and logger.name == "forkserver"
    logger.info("listening at %s", "http://127.0.0.1:8000")
    [line] = _lines(path)
    match = LINE.match(line)
    assert match, line
    assert match.group(2) == str(os.getpid())
    assert match.group(3) == "INFO"
    assert match.group(4) == "listening at http://127.0.0.1:8000"


def test_file_is_appended_not_truncated(tmp_path):
    path = tmp_path / "error.log"
    path.write_text("older line\n")
    logs.setup("info", str(path)).warning("newer")
    lines = _lines(path)
    assert lines[0] == "older line" and lines[1].endswith("[WARNING] newer")


def test_stderr_is_the_default(capfd):
    logs.setup("debug", "-").debug("to stderr")
    err = capfd.readouterr().err
    assert LINE.match(err.rstrip("\n"))
    assert err.rstrip("\n").endswith("[DEBUG] to stderr")


@pytest.mark.parametrize("level, shown", [
    ("debug", ["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]),
    ("INFO", ["INFO", "WARNING", "ERROR", "CRITICAL"]),
    ("warning", ["WARNING", "ERROR", "CRITICAL"]),
    ("error", ["ERROR", "CRITICAL"]),
    ("critical", ["CRITICAL"]),
])
def test_level_filtering(tmp_path, level, shown):
    path = tmp_path / "error.log"
    logger = logs.setup(level, str(path))
    for name in ("debug", "info", "warning", "error", "critical"):
        getattr(logger, name)("m")
    assert [LINE.match(line).group(3) for line in _lines(path)] == shown


def test_unknown_level_is_rejected_by_name():
    with pytest.raises(ValueError, match="'loud'"):
        logs.setup("loud")


def test_setup_again_replaces_handlers(tmp_path):
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    logs.setup("info", str(first)).info("one")
    logger = logs.setup("info", str(second))
    logger.info("two")
    assert len(logger.handlers) == 1
    assert [line[-3:] for line in _lines(first)] == ["one"]
    assert [line[-3:] for line in _lines(second)] == ["two"]


def test_unopenable_file_keeps_the_previous_log(tmp_path):
    good = tmp_path / "good.log"
    logs.setup("info", str(good))
    with pytest.raises(OSError):
        logs.setup("info", str(tmp_path / "missing-dir" / "x.log"))
    logs.get_logger().info("still here")
    assert _lines(good)[-1].endswith("still here")


def test_does_not_propagate_to_the_root_logger(tmp_path):
    seen = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append(record)

    catch = Catch()
    logging.getLogger().addHandler(catch)
    try:
        logs.setup("info", str(tmp_path / "e.log")).info("server line")
    finally:
        logging.getLogger().removeHandler(catch)
    assert seen == []


def test_reopen_after_rename_writes_a_new_file(tmp_path):
    path = tmp_path / "error.log"
    rotated = tmp_path / "error.log.1"
    logger = logs.setup("info", str(path))
    logger.info("before rotation")
    os.rename(path, rotated)
    logger.info("after rename, before reopen")  # still goes to the moved file
    logs.reopen()
    logger.info("after reopen")
    assert [line.split("] ", 3)[-1] for line in _lines(rotated)] == [
        "before rotation", "after rename, before reopen"]
    assert [line.split("] ", 3)[-1] for line in _lines(path)] == ["after reopen"]


def test_reopen_with_stderr_is_harmless(capfd):
    logs.setup("info", "-")
    logs.reopen()
    logs.get_logger().info("ok")
    assert capfd.readouterr().err.rstrip().endswith("[INFO] ok")


def test_log_writers_never_hold_fds_0_to_2():
    """An app may close its stdout/stderr; a client socket can then get that number, and a log
    line written there would land in a stranger's stream (issue 10, item 5)."""
    logger = logs.setup("info", "-")
    assert logger.handlers[0].stream.fileno() > 2
    access = logs.AccessLog("-")
    try:
        assert access._fd > 2
    finally:
        access.close()
    import os

    os.fstat(1)  # closing the access log closed its copy, never stdout


def test_records_carry_the_process_role(tmp_path):
    seen = []
    logger = logs.setup("info", str(tmp_path / "e.log"), proc="worker")
    logger.handlers[0].addFilter(lambda record: seen.append(record.proc) or True)
    logger.info("x")
    assert seen == ["worker"]


def test_a_forked_child_logs_its_own_pid(tmp_path):
    path = tmp_path / "error.log"
    logger = logs.setup("info", str(path))
    logger.info("from master")
    pid = os.fork()
    if pid == 0:
        try:
            logger.info("from worker")
            logging.shutdown()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    pids = {LINE.match(line).group(4): int(LINE.match(line).group(2)) for line in _lines(path)}
    assert pids == {"from master": os.getpid(), "from worker": pid}


# -- error_log_format = "json" -------------------------------------------------------------


def test_json_lines_carry_time_level_pid_message_and_fields(tmp_path):
    path = tmp_path / "error.log"
    logger = logs.setup("info", str(path), fmt="json")
    logger.error("worker %d exited with code %d", 4321, 3,
                 extra={"worker_pid": 4321, "slot": 2, "generation": 5, "exit_code": 3,
                        "reason": "crash"})
    logger.warning("worker %d killed by %s", 4322, "SIGKILL",
                   extra={"worker_pid": 4322, "signal": "SIGKILL",
                          "fields": {"rss_mib": 812}})
    first, second = (json.loads(line) for line in _lines(path))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d", first["time"])
    assert first == {"time": first["time"], "level": "ERROR", "pid": os.getpid(),
                     "proc": "master", "message": "worker 4321 exited with code 3",
                     "worker_pid": 4321, "slot": 2, "generation": 5, "exit_code": 3,
                     "reason": "crash"}
    assert (second["signal"], second["rss_mib"], second["level"]) == ("SIGKILL", 812, "WARNING")
    assert "exit_code" not in second  # only the fields the call gave


def test_json_escapes_everything_and_stays_one_line_per_record(tmp_path):
    path = tmp_path / "error.log"
    logger = logs.setup("info", str(path), fmt="json")
    hostile = 'evil\n[2026-01-01 00:00:00 +0000] [1] [INFO] forged "quote" \\ \x1b[31m caf\xe9'
    logger.info("got %s", hostile)
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        logger.exception("request failed")
    lines = _lines(path)
    assert len(lines) == 2  # one line each, whatever the message and traceback hold
    assert all(line.isascii() for line in lines)
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "got " + hostile
    assert second["message"] == "request failed"
    assert second["traceback"].startswith("Traceback") and "boom" in second["traceback"]


def test_unknown_error_log_format_is_refused_by_name():
    with pytest.raises(ValueError, match="'xml'"):
        logs.setup("info", "-", fmt="xml")


def test_wsgi_errors_become_json_records_line_by_line(tmp_path):
    path = tmp_path / "error.log"
    logs.setup("info", str(path), fmt="json")
    stream = logs.ErrorsStream()
    assert stream.write("first part, ") == len("first part, ")
    stream.write("same line\nsecond line\nunfinished")
    lines = _lines(path)
    assert [json.loads(line)["message"] for line in lines] == [
        "first part, same line", "second line"]
    stream.flush()
    records = [json.loads(line) for line in _lines(path)]
    assert records[-1]["message"] == "unfinished"
    assert {r["source"] for r in records} == {"wsgi.errors"}
    assert {r["level"] for r in records} == {"ERROR"}


def test_text_format_writes_wsgi_errors_as_given(tmp_path):
    path = tmp_path / "error.log"
    logs.setup("info", str(path))
    logs.ErrorsStream().write("plain text\n")
    assert _lines(path) == ["plain text"]


def test_a_failing_error_log_never_fails_the_app(monkeypatch):
    class Full:
        def write(self, text):
            raise OSError(28, "No space left on device")

        def flush(self):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(logs, "error_stream", lambda: Full())
    for fmt in ("text", "json"):
        monkeypatch.setattr(logs, "_format", fmt)
        stream = logs.ErrorsStream()
        assert stream.write("a line\n") == len("a line\n")
        stream.flush()


def test_json_from_a_forked_child_carries_its_own_pid(tmp_path):
    path = tmp_path / "error.log"
    logs.setup("info", str(path), fmt="json", proc="master")
    pid = os.fork()
    if pid == 0:
        try:
            logs.get_logger().info("from the child")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    [record] = [json.loads(line) for line in _lines(path)]
    assert record["pid"] == pid and record["message"] == "from the child"
