"""The error log (standard `logging`, logger "forkserver") and the access log (`AccessLog`).

One line per event: "[2026-11-24 15:00:00 +0000] [<pid>] [INFO] message", or with
``error_log_format = "json"`` one JSON object per line: time, level, pid, proc, message, the
structured fields the call passed (``extra={"worker_pid": pid, "slot": 3}``; see ``FIELDS``),
and the traceback if any. The pid comes from
logging's %(process)d, which is evaluated when a record is made, so workers that inherit the
master's handler across fork still write their own pid. Each process that inherits a file
handler holds its own descriptor on the same file (opened in append mode, so lines from
different processes do not overwrite each other), and on USR1 each process reopens its own.

The access log does not go through `logging`: it is written once per request, so it is one
formatted line and one os.write (see AccessLog).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import string
import sys
import time
import weakref
from collections.abc import Callable

__all__ = [
    "ACCESS_LOG_FIELDS",
    "ACCESS_LOG_FORMATS",
    "ERROR_LOG_FORMATS",
    "FIELDS",
    "LOGGER_NAME",
    "AccessLog",
    "ErrorsStream",
    "JsonFormatter",
    "access_log_format",
    "check_template",
    "error_stream",
    "get_logger",
    "reopen",
    "setup",
]

LOGGER_NAME = "forkserver"
_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S %z"
ERROR_LOG_FORMATS = ("text", "json")
# Structured fields a log call may pass with extra={...}; the json format writes each one given.
# A call may also pass extra={"fields": {...}} for anything else worth a key of its own.
FIELDS = ("worker_pid", "slot", "generation", "exit_code", "signal", "reason")
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}


class _ProcFilter(logging.Filter):
    """Stamps each record with the role of the process that wrote it (record.proc).

    The default line does not show it; it is there for a custom formatter or a test, since after
    fork the pid alone does not say whether a line came from the master or a worker.
    """

    def __init__(self, proc: str) -> None:
        super().__init__()
        self.proc = proc

    def filter(self, record: logging.LogRecord) -> bool:
        record.proc = self.proc
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line: every value goes through the JSON encoder with
    ensure_ascii, so no message (or app text) can break the line or forge another record."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": _iso_time(record.created),
            "level": record.levelname,
            "pid": record.process,
            "proc": getattr(record, "proc", ""),
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                data[name] = value
        extra = getattr(record, "fields", None)
        if isinstance(extra, dict):
            data.update({str(key): value for key, value in extra.items() if key not in data})
        if record.exc_info:
            data["traceback"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return json.dumps(data, ensure_ascii=True, separators=(",", ":"), default=str)


def _iso_time(created: float) -> str:
    """ISO 8601 local time with milliseconds and offset: 2026-11-24T15:00:00.123+00:00."""
    t = time.localtime(created)
    offset = t.tm_gmtoff
    sign = "-" if offset < 0 else "+"
    hours, minutes = divmod(abs(offset) // 60, 60)
    millis = int((created - int(created)) * 1000)
    return (time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{millis:03d}"
            f"{sign}{hours:02d}:{minutes:02d}")


def get_logger() -> logging.Logger:
    """The server's logger; configured by setup(), usable (stderr, WARNING+) before it."""
    return logging.getLogger(LOGGER_NAME)


def setup(level: str = "info", error_log: str = "-", *, proc: str = "master",
          fmt: str = "text") -> logging.Logger:
    """Configure the error log, replacing whatever a previous call installed.

    `error_log` is "-" for stderr or a file path, appended to and created if missing; `fmt` is
    "text" or "json" (error_log_format). An unknown level or format is a ValueError naming it;
    a file that cannot be opened raises the OSError (which names the path) before any existing
    handler is removed, so a bad reload keeps the old log working.
    """
    global _format
    numeric = _LEVELS.get(level.lower()) if isinstance(level, str) else None
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}: expected one of {', '.join(_LEVELS)}")
    if fmt not in ERROR_LOG_FORMATS:
        raise ValueError(f"unknown error log format {fmt!r}: expected one of "
                         f"{', '.join(ERROR_LOG_FORMATS)}")
    handler: logging.Handler
    if error_log == "-":
        handler = _StderrCopyHandler()
    else:
        handler = logging.FileHandler(error_log, mode="a", encoding="utf-8")
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(_FORMAT, _DATEFMT)
    handler.setFormatter(formatter)
    handler.addFilter(_ProcFilter(proc))
    _format = fmt

    logger = get_logger()
    for old in list(logger.handlers):
        logger.removeHandler(old)
        if old is not handler:
            old.close()  # closes our file descriptor (or our copy of stderr)
    logger.addHandler(handler)
    logger.setLevel(numeric)
    # The application may configure the root logger; server lines must not be duplicated there.
    logger.propagate = False
    return logger


def private_copy(fd: int) -> int:
    """A close-on-exec copy of ``fd`` numbered above 2, or -1 if ``fd`` is not open.

    Log writers keep these instead of 1 and 2: an app that closes its stdout or stderr frees
    those numbers, and the next accepted client socket could take one; a log line written to
    "fd 2" would then land in a stranger's TCP stream.
    """
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    except OSError:
        return -1


class _StderrCopyHandler(logging.StreamHandler):
    """The error log for "-": writes to a private copy of stderr (see private_copy), which it
    closes with itself; stderr itself if fd 2 is not open."""

    def __init__(self) -> None:
        fd = private_copy(2)
        stream = (open(fd, "w", encoding="utf-8", errors="backslashreplace", buffering=1)  # noqa: SIM115
                  if fd >= 0 else sys.stderr)
        super().__init__(stream)

    def close(self) -> None:
        stream = self.stream
        super().close()
        if stream is not sys.stderr:
            stream.close()


def reopen() -> None:
    """Reopen every log file by its path: USR1, after logrotate has moved the file away.

    That is the error log's file handlers and every AccessLog of this process. The new file is
    opened before the old one is swapped out and closed, so a line written concurrently goes to
    one or the other, never to a closed file. If the path cannot be opened the old file stays in
    use and the error is logged.
    """
    logger = get_logger()
    for handler in logger.handlers:
        if not isinstance(handler, logging.FileHandler):
            continue
        try:
            # Not a `with`: the handler owns the stream from here on.
            path, mode, encoding = handler.baseFilename, handler.mode, handler.encoding
            stream = open(path, mode, encoding=encoding)  # noqa: SIM115
        except OSError as exc:
            logger.error("cannot reopen log file %s: %s", handler.baseFilename, exc.strerror)
            continue
        old = handler.setStream(stream)
        if old is not None:
            old.close()
    for access_log in list(_access_logs):
        access_log.reopen()


def error_stream():
    """The open stream the error log writes to (the file, or stderr): where a worker's
    faulthandler dumps its traceback on SIGABRT, so the trace lands beside the log lines."""
    for handler in get_logger().handlers:
        stream = getattr(handler, "stream", None)
        if stream is not None:
            return stream
    return sys.stderr


# --------------------------------------------------------------------------------------------
# The access log.

ACCESS_LOG_FORMATS = ("combined", "common", "json")
# The names a custom template may use, with a value of each one's type. The "json" format writes
# the first eleven; "target", "version" and "time_local" (Apache's timestamp, without brackets)
# are for templates. The settings check a format with access_log_format() below.
ACCESS_LOG_FIELDS: dict[str, object] = {
    "time": "", "remote": "", "method": "", "path": "", "query": "", "status": 0, "bytes": 0,
    "duration_ms": 0.0, "user_agent": "", "referer": "", "request_id": "",
    "target": "", "version": "", "time_local": "",
}
_JSON_FIELDS = tuple(ACCESS_LOG_FIELDS)[:11]
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

# Apache's escaping of logged values: a quote or backslash gets a backslash, and every byte that
# is not printable ASCII becomes \xNN, so no value can end a quoted field or the line early and
# forge another entry. Values are latin-1 decodes of the wire bytes, so code point == byte.
_ESCAPES = {i: f"\\x{i:02x}" for i in range(256) if not 0x20 <= i < 0x7F}
_ESCAPES[ord('"')] = '\\"'
_ESCAPES[ord("\\")] = "\\\\"
_PLAIN = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*").fullmatch
_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC

# The error log's format, as setup() last set it: ErrorsStream writes in it too.
_format = "text"

# Every AccessLog of this process, so that reopen() (USR1) finds them without being told.
_access_logs: weakref.WeakSet[AccessLog] = weakref.WeakSet()


def _escape(text: str) -> str:
    if _PLAIN(text):  # the usual case: nothing to do
        return text
    escaped = text.translate(_ESCAPES)
    # Code points above 255 cannot come off the wire; if a caller passes one, keep the line ASCII.
    return escaped if escaped.isascii() else escaped.encode("ascii", "backslashreplace").decode()


def _dash(text: str) -> str:
    return _escape(text) if text else "-"


def check_template(template: str) -> None:
    """Raise ValueError naming the problem if `template` is not a usable custom format."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(f"access log format {template!r}: {error}") from None
    names = [name for _, name, _, _ in parsed if name is not None]
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in ACCESS_LOG_FIELDS:
            raise ValueError(f"unknown access log field {name!r} in {template!r}; known fields: "
                             f"{', '.join(ACCESS_LOG_FIELDS)}")
        if conversion or (spec and "{" in spec):
            raise ValueError(f"access log field {name!r}: conversions and nested fields are not "
                             "supported")
    if not names:
        raise ValueError(f"access log format {template!r} is none of "
                         f"{', '.join(ACCESS_LOG_FORMATS)} and has no {{field}}")
    try:
        template.format_map(ACCESS_LOG_FIELDS)
    except (ValueError, TypeError) as error:
        raise ValueError(f"access log format {template!r}: {error}") from None


def access_log_format(text: str) -> str:
    """The access_log_format setting's rule: a preset (any case, spaces around it allowed),
    returned as its lower-case name, or a template that check_template accepts, returned as is."""
    preset = text.strip().lower()
    if preset in ACCESS_LOG_FORMATS:
        return preset
    check_template(text)
    return text


class AccessLog:
    """One line per request, to stdout ("-") or appended to a file.

    Each line is written with one os.write: with O_APPEND the kernel places it whole at the end
    of the file even when every worker writes at once, and a pipe keeps writes of up to 4 KiB in
    one piece. Formats: "combined" and "common" as Apache writes them, "json" (one object per
    line, every value escaped by the JSON encoder with ensure_ascii), or a template such as
    "{remote} {method} {path} {status} {duration_ms}" using the names in ACCESS_LOG_FIELDS,
    whose string values are escaped as Apache does.
    """

    def __init__(self, target: str, fmt: str = "combined") -> None:
        self.target = target
        self.format = fmt
        render: Callable[..., str]
        if fmt == "combined":
            render = self._combined
        elif fmt == "common":
            render = self._common
        elif fmt == "json":
            render = self._json
        else:
            check_template(fmt)
            render = self._template
        self._render = render
        self._second = -1
        self._time_local = self._time_iso = ""
        self._failing = False
        if target == "-":
            self._fd = private_copy(1)  # never fd 1 itself: see private_copy
            self._reopenable = False
        else:
            self._fd = os.open(target, _OPEN_FLAGS, 0o644)
            self._reopenable = True
        _access_logs.add(self)

    def write(self, remote: str, method: str, target: str, version: str, status: int,
              size: int, duration: float, user_agent: str, referer: str, request_id: str,
              now: float | None = None) -> None:
        """Log one finished request. `duration` is in seconds; `now` (time.time()) defaults to
        the current time. Failures (disk full, closed stdout) are reported once in the error
        log and never raised: a request must not fail because its log line could not be kept."""
        if now is None:
            now = time.time()
        line = self._render(remote, method, target, version, status, size, duration, user_agent,
                            referer, request_id, now)
        data = line.encode("utf-8")
        try:
            written = os.write(self._fd, data)
            while written < len(data):  # only a pipe or a signal can cut a write short
                data = data[written:]
                written = os.write(self._fd, data)
        except OSError as error:
            if not self._failing:
                self._failing = True
                get_logger().error("cannot write the access log %s: %s", self.target, error)
            return
        self._failing = False

    def render(self, remote: str, method: str, target: str, version: str, status: int,
               size: int, duration: float, user_agent: str, referer: str, request_id: str,
               now: float) -> str:
        """The line write() would write, newline included."""
        return self._render(remote, method, target, version, status, size, duration, user_agent,
                            referer, request_id, now)

    def reopen(self) -> None:
        """Open the path again (USR1 after a rotation) under the same descriptor number.

        dup2 swaps the new file in atomically, so there is no moment without a valid descriptor,
        and a descriptor inherited by forked workers stays theirs to reopen.
        """
        if not self._reopenable or self._fd < 0:
            return
        try:
            fd = os.open(self.target, _OPEN_FLAGS, 0o644)
        except OSError as error:
            get_logger().error("cannot reopen access log %s: %s", self.target, error.strerror)
            return
        try:
            os.dup2(fd, self._fd, inheritable=False)
        finally:
            os.close(fd)
        self._failing = False

    def close(self) -> None:
        _access_logs.discard(self)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    # -- formats ----------------------------------------------------------------------------
    def _times(self, now: float) -> tuple[str, str]:
        """(Apache's "24/Nov/2026:15:00:00 +0000", ISO 8601), local time, computed once a second."""
        second = int(now)
        if second != self._second:
            t = time.localtime(second)
            offset = t.tm_gmtoff
            sign = "-" if offset < 0 else "+"
            hours, minutes = divmod(abs(offset) // 60, 60)
            clock = f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
            self._time_local = (f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:{clock} "
                                f"{sign}{hours:02d}{minutes:02d}")
            self._time_iso = (f"{t.tm_year}-{t.tm_mon:02d}-{t.tm_mday:02d}T{clock}"
                              f"{sign}{hours:02d}:{minutes:02d}")
            self._second = second
        return self._time_local, self._time_iso

    def _common(self, remote: str, method: str, target: str, version: str, status: int,
                size: int, duration: float, user_agent: str, referer: str, request_id: str,
                now: float) -> str:
        local = self._times(now)[0]
        return (f'{_dash(remote)} - - [{local}] "{_escape(method)} {_escape(target)} '
                f'{_escape(version)}" {status} {size or "-"}\n')

    def _combined(self, remote: str, method: str, target: str, version: str, status: int,
                  size: int, duration: float, user_agent: str, referer: str, request_id: str,
                  now: float) -> str:
        local = self._times(now)[0]
        return (f'{_dash(remote)} - - [{local}] "{_escape(method)} {_escape(target)} '
                f'{_escape(version)}" {status} {size or "-"} "{_dash(referer)}" '
                f'"{_dash(user_agent)}"\n')

    def _fields(self, remote: str, method: str, target: str, version: str, status: int,
                size: int, duration: float, user_agent: str, referer: str, request_id: str,
                now: float) -> dict[str, object]:
        local, iso = self._times(now)
        path, _, query = target.partition("?")
        return {
            "time": iso, "remote": remote, "method": method, "path": path, "query": query,
            "status": status, "bytes": size, "duration_ms": round(duration * 1000.0, 3),
            "user_agent": user_agent, "referer": referer, "request_id": request_id,
            "target": target, "version": version, "time_local": local,
        }

    def _json(self, *args: object) -> str:
        fields = self._fields(*args)  # type: ignore[arg-type]
        data = {name: fields[name] for name in _JSON_FIELDS}
        return json.dumps(data, ensure_ascii=True, separators=(",", ":")) + "\n"

    def _template(self, *args: object) -> str:
        fields = self._fields(*args)  # type: ignore[arg-type]
        for name, value in fields.items():
            if isinstance(value, str):
                fields[name] = _escape(value)
        return self.format.format_map(fields) + "\n"


class ErrorsStream:
    """``wsgi.errors``: a text stream that always writes to the current error log, so an app's
    messages land beside the server's and follow it across a USR1 reopen.

    With the json format each complete line the app writes becomes one JSON object (level
    "ERROR", ``source`` "wsgi.errors"), so the log stays one object per line. A write that fails
    (disk full) is dropped: the request must still get its answer.
    """

    def __init__(self) -> None:
        self._partial = ""

    def write(self, text: str) -> int:
        try:
            if _format == "json":
                self._write_json(text)
            else:
                stream = error_stream()
                stream.write(text)
                stream.flush()
        except (OSError, ValueError):  # disk full, or a stream closed under us
            pass
        return len(text)

    def _write_json(self, text: str) -> None:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        if not lines:
            return
        stream = error_stream()
        for line in lines:
            record = logging.LogRecord(LOGGER_NAME, logging.ERROR, "wsgi.errors", 0, line,
                                       None, None)
            record.proc = "worker"
            record.fields = {"source": "wsgi.errors"}
            stream.write(JsonFormatter().format(record) + "\n")
        stream.flush()

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self._partial and _format == "json":
            self.write("\n")
        try:
            error_stream().flush()
        except (OSError, ValueError):
            pass
