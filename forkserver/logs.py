"""The error log: the standard `logging` module under the logger name "forkserver".

One line per event: "[2026-11-24 15:00:00 +0000] [<pid>] [INFO] message". The pid comes from
logging's %(process)d, which is evaluated when a record is made, so workers that inherit the
master's handler across fork still write their own pid. Each process that inherits a file
handler holds its own descriptor on the same file (opened in append mode, so lines from
different processes do not overwrite each other), and on USR1 each process reopens its own.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["LOGGER_NAME", "get_logger", "reopen", "setup"]

LOGGER_NAME = "forkserver"
_FORMAT = "[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"
_DATEFMT = "%Y-%m-%d %H:%M:%S %z"
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


def get_logger() -> logging.Logger:
    """The server's logger; configured by setup(), usable (stderr, WARNING+) before it."""
    return logging.getLogger(LOGGER_NAME)


def setup(level: str = "info", error_log: str = "-", *, proc: str = "master") -> logging.Logger:
    """Configure the error log, replacing whatever a previous call installed.

    `error_log` is "-" for stderr or a file path, appended to and created if missing. An unknown
    level is a ValueError naming it; a file that cannot be opened raises the OSError (which names
    the path) before any existing handler is removed, so a bad reload keeps the old log working.
    """
    numeric = _LEVELS.get(level.lower()) if isinstance(level, str) else None
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}: expected one of {', '.join(_LEVELS)}")
    handler: logging.Handler
    if error_log == "-":
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.FileHandler(error_log, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter(_FORMAT, _DATEFMT))
    handler.addFilter(_ProcFilter(proc))

    logger = get_logger()
    for old in list(logger.handlers):
        logger.removeHandler(old)
        if old is not handler:
            old.close()  # closes our file descriptor; a StreamHandler leaves stderr open
    logger.addHandler(handler)
    logger.setLevel(numeric)
    # The application may configure the root logger; server lines must not be duplicated there.
    logger.propagate = False
    return logger


def reopen() -> None:
    """Reopen every file handler by its path: USR1, after logrotate has moved the file away.

    The new file is opened before the old stream is swapped out and closed, so a record logged
    concurrently goes to one or the other, never to a closed stream. If the path cannot be
    opened the old file stays in use and the error is logged there.
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


def error_stream():
    """The open stream the error log writes to (the file, or stderr): where a worker's
    faulthandler dumps its traceback on SIGABRT, so the trace lands beside the log lines."""
    for handler in get_logger().handlers:
        stream = getattr(handler, "stream", None)
        if stream is not None:
            return stream
    return sys.stderr
