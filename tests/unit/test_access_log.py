"""The access log: formats parsed back with hostile values, one write per line, reopen, config.

Values reach the log as latin-1 decodes of what the client sent, so every code point 0..255 is
possible. The Apache formats must escape them so that no value can close its quoted field or
start a new line; the JSON format must stay one valid object per line.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time

import pytest

from forkserver import config, logs
from forkserver.logs import AccessLog

NOW = 1795532400.25  # 2026-11-24 15:00:00.25 UTC

HOSTILE = [
    'quote " in the middle',
    'ends with backslash \\',
    '\\" escaped-looking quote',
    "new\nline and\r\nCRLF",
    "nul \x00 tab \t del \x7f esc \x1b[31m",
    "latin-1 caf\xe9 \xff\x80",
    '" 200 0 "-" "forged',
    "",
    "-",
]


@pytest.fixture
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def error_records():
    """Records of the server's error log, whatever handlers it has."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep()
    logger = logs.get_logger()
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def lines_of(path) -> list[str]:
    return path.read_bytes().decode("ascii").splitlines(keepends=True)


# ------------------------------------------------------------------------- Apache formats

# Apache's escaping as a reader sees it: \" \\ and \xNN; anything else inside quotes is literal.
QUOTED = r'"((?:[^"\\]|\\.)*)"'
COMBINED = re.compile(
    r"^(\S+) - - \[([^\]]+)\] " + QUOTED + r" (\d{3}) (\d+|-) " + QUOTED + " " + QUOTED + r"\n$"
)
COMMON = re.compile(r"^(\S+) - - \[([^\]]+)\] " + QUOTED + r" (\d{3}) (\d+|-)\n$")


def unescape(text: str) -> str:
    return re.sub(r'\\(x[0-9a-f]{2}|["\\])',
                  lambda m: chr(int(m.group(1)[1:], 16)) if m.group(1)[0] == "x" else m.group(1),
                  text)


def test_combined_line(utc):
    log = AccessLog("-", "combined")
    line = log.render("203.0.113.9", "GET", "/a/b?c=1", "HTTP/1.1", 200, 1234, 0.01,
                      "curl/8.5", "https://example.com/", "req-1", NOW)
    assert line == ('203.0.113.9 - - [24/Nov/2026:15:00:00 +0000] "GET /a/b?c=1 HTTP/1.1" 200 '
                    '1234 "https://example.com/" "curl/8.5"\n')
    log.close()


def test_common_line_and_dashes_for_empty_values(utc):
    log = AccessLog("-", "common")
    line = log.render("", "HEAD", "/", "HTTP/1.0", 304, 0, 0.0, "ua", "ref", "", NOW)
    assert line == '- - - [24/Nov/2026:15:00:00 +0000] "HEAD / HTTP/1.0" 304 -\n'
    combined = AccessLog("-").render("", "GET", "/", "HTTP/1.1", 200, 0, 0.0, "", "", "", NOW)
    assert combined.endswith(' 200 - "-" "-"\n')
    log.close()


@pytest.mark.parametrize("value", HOSTILE)
def test_combined_escapes_hostile_values(utc, value):
    log = AccessLog("-", "combined")
    target = "/p?q=" + value.replace(" ", "%20")
    line = log.render("10.0.0.1", "GET", target, "HTTP/1.1", 404, 9, 0.5, value, value, "", NOW)
    assert line.isascii()
    assert line.count("\n") == 1 and "\r" not in line
    match = COMBINED.match(line)
    assert match, line
    remote, when, request, status, size, referer, agent = match.groups()
    assert (remote, when, status, size) == ("10.0.0.1", "24/Nov/2026:15:00:00 +0000", "404", "9")
    assert unescape(request) == f"GET {target} HTTP/1.1"
    expected = value or "-"
    assert unescape(referer) == expected and unescape(agent) == expected
    log.close()


def test_common_escapes_the_request_line(utc):
    log = AccessLog("-", "common")
    line = log.render('1.2.3.4"', 'G"T', '/"x\\', "HTTP/1.1", 200, 1, 0.0, "", "", "", NOW)
    match = COMMON.match(line)
    assert match, line
    assert unescape(match.group(1)) == '1.2.3.4"'
    assert unescape(match.group(3)) == 'G"T /"x\\ HTTP/1.1'
    log.close()


def test_code_points_above_latin_1_stay_ascii(utc):
    log = AccessLog("-", "combined")
    line = log.render("::1", "GET", "/", "HTTP/1.1", 200, 1, 0.0, "snow \u2603", "", "", NOW)
    assert line.isascii() and "\\u2603" in line
    log.close()


# ----------------------------------------------------------------------------------- json


def test_json_fields(utc):
    log = AccessLog("-", "json")
    line = log.render("192.0.2.1", "POST", "/submit?a=1&b=2", "HTTP/1.1", 201, 17, 0.0123456,
                      "ua", "ref", "abc-123", NOW)
    assert line.endswith("\n") and line.count("\n") == 1
    data = json.loads(line)
    assert data == {
        "time": "2026-11-24T15:00:00+00:00", "remote": "192.0.2.1", "method": "POST",
        "path": "/submit", "query": "a=1&b=2", "status": 201, "bytes": 17,
        "duration_ms": 12.346, "user_agent": "ua", "referer": "ref", "request_id": "abc-123",
    }
    assert list(data) == list(logs.ACCESS_LOG_FIELDS)[:11]
    log.close()


@pytest.mark.parametrize("value", HOSTILE)
def test_json_round_trips_hostile_values(utc, value):
    log = AccessLog("-", "json")
    line = log.render(value, value, "/x?" + value, value, 400, 0, 0.0, value, value, value, NOW)
    assert line.isascii() and line.count("\n") == 1
    data = json.loads(line)
    for key in ("remote", "method", "user_agent", "referer", "request_id"):
        assert data[key] == value
    assert data["path"] == "/x" and data["query"] == value
    log.close()


# ------------------------------------------------------------------------------ templates


def test_custom_template(utc):
    log = AccessLog("-", "{remote} {method} {path} {status} {duration_ms} [{time_local}] "
                         "{target} {version} {bytes} {request_id} {time} q={query}")
    line = log.render("::1", "GET", "/a?b", "HTTP/1.1", 200, 5, 0.25, "ua", "", "r1", NOW)
    assert line == ("::1 GET /a 200 250.0 [24/Nov/2026:15:00:00 +0000] /a?b HTTP/1.1 5 r1 "
                    "2026-11-24T15:00:00+00:00 q=b\n")
    log.close()


def test_custom_template_escapes_strings_and_honours_format_specs(utc):
    log = AccessLog("-", '"{user_agent}" {status:>4} {duration_ms:.1f}')
    line = log.render("", "GET", "/", "HTTP/1.1", 200, 0, 0.01234, 'a"b\nc', "", "", NOW)
    assert line == '"a\\"b\\x0ac"  200 12.3\n'
    log.close()


@pytest.mark.parametrize("template, message", [
    ("{remot} {status}", "'remot'"),
    ("{}", "''"),
    ("{0}", "'0'"),
    ("{remote.__class__}", "remote.__class__"),
    ("{remote[0]}", "remote[0]"),
    ("{remote!r}", "conversions"),
    ("{status:{width}}", "nested"),
    ("{remote", "format"),
    ("no fields at all", "no {field}"),
    ("{remote:d}", "format"),
])
def test_bad_templates_are_refused_at_construction(template, message):
    with pytest.raises(ValueError) as excinfo:
        AccessLog("-", template)
    assert message in str(excinfo.value)


def test_the_same_templates_are_refused_by_the_settings(tmp_path):
    for template in ("{remot}", "{}", "{remote!r}", "{remote:d}", "{remote", "plain"):
        with pytest.raises(config.ConfigError, match="access_log_format"):
            config.resolve({"access_log_format": template}, None, {}, str(tmp_path))
    assert "{remot}" in str(pytest.raises(
        config.ConfigError, config.resolve, {}, None,
        {"FORKSERVER_ACCESS_LOG_FORMAT": "{remot}"}, str(tmp_path)).value)


def test_settings_defaults_and_accepted_values(tmp_path):
    settings = config.resolve({}, None, {}, str(tmp_path))
    assert (settings.access_log, settings.access_log_format) == ("", "combined")
    for value, expected in [("JSON", "json"), (" common ", "common"),
                            ("{remote} {status}", "{remote} {status}")]:
        resolved = config.resolve({"access_log_format": value}, None, {}, str(tmp_path))
        assert resolved.access_log_format == expected
        AccessLog("-", resolved.access_log_format).close()  # what config accepts, logs takes


# ----------------------------------------------------------------------------------- time


def test_time_is_local_with_its_offset(monkeypatch):
    try:
        for tz, local, iso in [
            ("UTC0", "24/Nov/2026:15:00:00 +0000", "2026-11-24T15:00:00+00:00"),
            ("IST-5:30", "24/Nov/2026:20:30:00 +0530", "2026-11-24T20:30:00+05:30"),
            ("EST+5", "24/Nov/2026:10:00:00 -0500", "2026-11-24T10:00:00-05:00"),
        ]:
            monkeypatch.setenv("TZ", tz)
            time.tzset()
            log = AccessLog("-", "{time_local}|{time}")
            assert log.render("", "GET", "/", "HTTP/1.1", 200, 0, 0.0, "", "", "",
                              NOW) == f"{local}|{iso}\n"
            log.close()
    finally:
        monkeypatch.undo()
        time.tzset()


def test_timestamp_is_cached_per_second(utc, monkeypatch):
    log = AccessLog("-", "{time_local}")
    calls = []
    real = time.localtime
    monkeypatch.setattr(logs.time, "localtime", lambda s: calls.append(s) or real(s))

    def render(now):
        return log.render("", "GET", "/", "HTTP/1.1", 200, 0, 0.0, "", "", "", now)

    first = render(NOW)
    assert render(NOW + 0.7) == first
    assert len(calls) == 1
    assert render(NOW + 1) == "24/Nov/2026:15:00:01 +0000\n"
    assert len(calls) == 2
    log.close()


# ------------------------------------------------------------------------------ writing


def test_one_os_write_per_request(tmp_path, monkeypatch):
    path = tmp_path / "access.log"
    log = AccessLog(str(path), "json")
    writes = []
    real = os.write
    monkeypatch.setattr(logs.os, "write", lambda fd, data: writes.append(data) or real(fd, data))
    for i in range(5):
        log.write("1.1.1.1", "GET", f"/{i}", "HTTP/1.1", 200, i, 0.001, "ua", "", "")
    monkeypatch.undo()
    assert len(writes) == 5 and all(w.endswith(b"\n") and w.count(b"\n") == 1 for w in writes)
    assert [json.loads(line)["path"] for line in lines_of(path)] == [f"/{i}" for i in range(5)]
    log.close()


def test_file_is_appended_and_created(tmp_path):
    path = tmp_path / "access.log"
    path.write_text("older\n")
    log = AccessLog(str(path), "common")
    log.write("h", "GET", "/", "HTTP/1.1", 200, 1, 0.0, "", "", "")
    log.close()
    assert lines_of(path)[0] == "older\n" and len(lines_of(path)) == 2
    new = tmp_path / "new.log"
    AccessLog(str(new)).close()
    assert new.exists()


def test_missing_directory_raises_at_construction(tmp_path):
    with pytest.raises(OSError):
        AccessLog(str(tmp_path / "nowhere" / "access.log"))


def test_stdout_target(capfd):
    log = AccessLog("-", "{method} {path}")
    log.write("", "GET", "/to-stdout", "HTTP/1.1", 200, 0, 0.0, "", "", "")
    log.close()  # must not close stdout
    log2 = AccessLog("-", "{path}")
    log2.write("", "GET", "/again", "HTTP/1.1", 200, 0, 0.0, "", "", "")
    log2.close()
    assert capfd.readouterr().out == "GET /to-stdout\n/again\n"


def test_lines_from_many_processes_never_interleave(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(str(path), "json")
    agent = "x" * 1500  # long lines make a split write likelier if writes were not whole
    pids = []
    for child in range(4):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for i in range(300):
                    log.write("1.2.3.4", "GET", f"/{child}/{i}", "HTTP/1.1", 200, i, 0.0, agent,
                              "", "")
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for pid in pids:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    log.close()
    paths = [json.loads(line)["path"] for line in lines_of(path)]
    assert sorted(paths) == sorted(f"/{c}/{i}" for c in range(4) for i in range(300))


def test_write_failure_is_reported_once_and_never_raised(tmp_path, monkeypatch, error_records):
    log = AccessLog(str(tmp_path / "a.log"))

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(logs.os, "write", full)
    for _ in range(3):
        log.write("h", "GET", "/", "HTTP/1.1", 200, 0, 0.0, "", "", "")
    assert len(error_records) == 1 and "No space left" in error_records[0].getMessage()
    monkeypatch.undo()
    log.write("h", "GET", "/ok", "HTTP/1.1", 200, 0, 0.0, "", "", "")  # recovers
    monkeypatch.setattr(logs.os, "write", full)
    log.write("h", "GET", "/", "HTTP/1.1", 200, 0, 0.0, "", "", "")
    assert len(error_records) == 2  # a new failure after a success is reported again
    monkeypatch.undo()
    log.close()


def test_short_writes_are_completed(tmp_path, monkeypatch):
    path = tmp_path / "a.log"
    log = AccessLog(str(path), "{path}")
    real = os.write
    monkeypatch.setattr(logs.os, "write", lambda fd, data: real(fd, data[:3]))
    log.write("h", "GET", "/a-longer-path", "HTTP/1.1", 200, 0, 0.0, "", "", "")
    monkeypatch.undo()
    log.close()
    assert path.read_text() == "/a-longer-path\n"


# ------------------------------------------------------------------------------- reopen


def test_reopen_after_the_file_was_moved_away(tmp_path):
    path = tmp_path / "access.log"
    log = AccessLog(str(path), "{path}")
    fd = log._fd
    log.write("h", "GET", "/before", "HTTP/1.1", 200, 0, 0.0, "", "", "")
    os.rename(path, tmp_path / "access.log.1")
    log.write("h", "GET", "/still-old", "HTTP/1.1", 200, 0, 0.0, "", "", "")
    logs.reopen()  # what USR1 runs: reopens every AccessLog of the process
    log.write("h", "GET", "/after", "HTTP/1.1", 200, 0, 0.0, "", "", "")
    assert (tmp_path / "access.log.1").read_text() == "/before\n/still-old\n"
    assert path.read_text() == "/after\n"
    assert log._fd == fd  # same descriptor number, now on the new file
    assert not os.get_inheritable(fd)
    log.close()


def test_reopen_failure_keeps_the_old_file(tmp_path, error_records):
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "access.log"
    log = AccessLog(str(path), "{path}")
    os.rename(directory, tmp_path / "moved")
    log.reopen()
    assert any("cannot reopen access log" in r.getMessage() for r in error_records)
    log.write("h", "GET", "/kept", "HTTP/1.1", 200, 0, 0.0, "", "", "")
    assert (tmp_path / "moved" / "access.log").read_text() == "/kept\n"
    log.close()


def test_reopen_leaves_stdout_alone_and_closed_logs_are_forgotten(tmp_path, capfd):
    out = AccessLog("-", "{path}")
    closed = AccessLog(str(tmp_path / "closed.log"))
    closed.close()
    os.remove(tmp_path / "closed.log")
    logs.reopen()
    assert not (tmp_path / "closed.log").exists()
    out.write("", "GET", "/x", "HTTP/1.1", 200, 0, 0.0, "", "", "")
    assert capfd.readouterr().out == "/x\n"
    out.close()


def test_the_registry_does_not_keep_logs_alive(tmp_path):
    import gc

    before = len(logs._access_logs)
    closed = AccessLog(str(tmp_path / "a.log"))
    closed.close()
    assert len(logs._access_logs) == before
    dropped = AccessLog(str(tmp_path / "b.log"))
    fd = dropped._fd
    assert len(logs._access_logs) == before + 1
    del dropped
    gc.collect()
    assert len(logs._access_logs) == before
    os.close(fd)
