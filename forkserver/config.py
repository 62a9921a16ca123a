"""The settings table, and everything derived from it.

Each setting is declared exactly once, as a typed field of the frozen ``Settings`` dataclass whose
metadata holds its row (style rule 1); ``SETTINGS`` is read off those fields. The row drives the
argparse flags, the config-file key, the ``FORKSERVER_<NAME>`` environment variable,
``--print-config`` and ``docs/settings.md``, so adding a setting is one edit and nothing can drift.
Parsing and validation live in a few shared *kinds* (integer, seconds, bool, ...), never per
setting, so every setting of one type accepts and rejects the same spellings.

Sources, weakest first: defaults < config file < environment < command line. ``resolve`` is the
part a HUP reload re-runs: it re-reads the file and the environment while keeping the command-line
values of the original start. Nothing here reads the environment or the disk at import time;
``WEB_CONCURRENCY`` and the CPU count are looked at only when a ``Settings`` is built.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import itertools
import math
import os
import re
import textwrap
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from forkserver import addresses, handoff, logs, proxy, scoreboard, tls

ENV_PREFIX = "FORKSERVER_"
# Variables with the prefix that are not settings: the master hands its listeners and old workers
# to its own re-exec (USR2) through these. Every other FORKSERVER_* variable must be a setting,
# so that a typo is an error rather than silently ignored.
# Passed by a USR2 upgrade to the new master (see generations); never settings.
ENV_INHERIT_FDS = "FORKSERVER_INHERIT_FDS"
ENV_OLD_WORKERS = "FORKSERVER_OLD_WORKERS"
RESERVED_ENV = frozenset({ENV_INHERIT_FDS, ENV_OLD_WORKERS, handoff.ENV_HANDOFF_FDS})
CONFIG_FILE = "forkserver.toml"
PYPROJECT = "pyproject.toml"


class ConfigError(Exception):
    """A configuration mistake the user can fix; ``str()`` is the whole one-line message."""


class _Invalid(ValueError):
    """A kind's verdict on one value ("expected an integer").

    Kinds do not know which setting or source they are checking, so the caller turns this into a
    ``ConfigError`` that names both.
    """


# --------------------------------------------------------------------------------------------
# Kinds: how one type of value is parsed from text (env, CLI) and from TOML, checked and written.


class Kind:
    """Base for the shared per-type parsers; subclasses are small frozen dataclasses."""

    #: docs column "Type"
    label = "value"
    #: argparse metavar
    metavar = "VALUE"

    def from_value(self, value: object) -> Any:
        """Check a typed value (TOML, or already-parsed CLI) and return it normalised."""
        raise NotImplementedError

    def from_text(self, text: str) -> Any:
        """Parse the string form used by environment variables and command-line flags."""
        return self.from_value(text)

    def argparse_options(self) -> dict[str, Any]:
        """Extra ``add_argument`` keywords; by default a flag takes one string."""
        return {"metavar": self.metavar}

    def from_cli(self, raw: Any) -> Any:
        """Turn what argparse stored (see ``argparse_options``) into a value."""
        return self.from_text(raw)

    def to_toml(self, value: Any) -> str | None:
        """The TOML literal for ``value``; None when TOML cannot say it and the key is left out."""
        return _toml_value(value)


@dataclass(frozen=True)
class Int(Kind):
    minimum: int = 0
    metavar: str = "INT"
    maximum: int | None = None

    @property
    def label(self) -> str:  # type: ignore[override]
        if self.maximum is not None:
            return f"integer {self.minimum} to {self.maximum}"
        return f"integer >= {self.minimum}"

    def from_value(self, value: object) -> int:
        # bool is an int subclass; `workers = true` is a typo, not 1.
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid("expected an integer")
        if value < self.minimum:
            raise _Invalid(f"must be at least {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise _Invalid(f"must be at most {self.maximum}")
        return value

    def from_text(self, text: str) -> int:
        if not re.fullmatch(r"\s*[+-]?\d+\s*", text, re.ASCII):
            raise _Invalid("expected an integer")
        return self.from_value(int(text))


@dataclass(frozen=True)
class Seconds(Kind):
    """A duration as a float number of seconds (or of ``unit``, e.g. milliseconds).

    ``allow_zero`` is off for deadlines whose absence would let one slow client hold a worker
    forever (header and send timeouts); where 0 is allowed it means "off", as the help says.
    """

    allow_zero: bool = True
    metavar: str = "SECONDS"
    unit: str = "seconds"

    @property
    def label(self) -> str:  # type: ignore[override]
        return f"{self.unit} >= 0" if self.allow_zero else f"{self.unit} > 0"

    def from_value(self, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Invalid(f"expected a number of {self.unit}")
        seconds = float(value)
        if not math.isfinite(seconds):
            raise _Invalid(f"expected a finite number of {self.unit}")
        if seconds < 0 or (seconds == 0 and not self.allow_zero):
            raise _Invalid("must not be negative" if seconds < 0 else "must be greater than 0")
        return seconds

    def from_text(self, text: str) -> float:
        try:
            seconds = float(text)
        except ValueError:
            raise _Invalid(f"expected a number of {self.unit}") from None
        return self.from_value(seconds)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Bool(Kind):
    label = "bool"

    def from_value(self, value: object) -> bool:
        # TOML has real booleans, so a quoted "true" in a file is a mistake worth reporting.
        if not isinstance(value, bool):
            raise _Invalid("expected true or false")
        return value

    def from_text(self, text: str) -> bool:
        word = text.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise _Invalid("expected one of 1/0, true/false, yes/no, on/off")

    def argparse_options(self) -> dict[str, Any]:
        return {"action": argparse.BooleanOptionalAction}

    def from_cli(self, raw: Any) -> bool:
        return self.from_value(raw)


def _check_text(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid("expected a string")
    if "\x00" in value:
        raise _Invalid("must not contain a NUL character")
    # Lone surrogates come from undecodable bytes in the environment; they cannot be written
    # back as TOML or passed to most OS calls, so refuse them here with a clear message.
    if any("\ud800" <= ch <= "\udfff" for ch in value):
        raise _Invalid("is not valid UTF-8 text")
    return value


@dataclass(frozen=True)
class Text(Kind):
    """A string; ``metavar`` says what it holds (PATH, NAME, ...) in --help and the docs."""

    metavar: str = "TEXT"
    label = "string"

    def from_value(self, value: object) -> str:
        return _check_text(value)


@dataclass(frozen=True)
class Choice(Kind):
    choices: tuple[str, ...] = ()
    metavar: str = "LEVEL"

    @property
    def label(self) -> str:  # type: ignore[override]
        return "one of " + ", ".join(self.choices)

    def from_value(self, value: object) -> str:
        word = _check_text(value).strip().lower()
        if word not in self.choices:
            raise _Invalid("expected one of " + ", ".join(self.choices))
        return word


@dataclass(frozen=True)
class Umask(Kind):
    """An optional file mode mask, written in octal as everywhere else (``022``).

    Unset is None ("leave the inherited umask alone"), which TOML cannot express, so an unset
    umask is simply left out of --print-config and an empty string means unset in the
    environment and on the command line.
    """

    label = "octal mode or unset"
    metavar = "MODE"

    def from_value(self, value: object) -> int | None:
        if value is None:
            return None
        if isinstance(value, str):
            return self.from_text(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid("expected an octal mode such as 0o022")
        if not 0 <= value <= 0o777:
            raise _Invalid("must be between 0o000 and 0o777")
        return value

    def from_text(self, text: str) -> int | None:
        digits = text.strip().lower().removeprefix("0o")
        if not text.strip():
            return None
        if not re.fullmatch(r"[0-7]{1,4}", digits):
            raise _Invalid("expected an octal mode such as 022")
        return self.from_value(int(digits, 8))

    def to_toml(self, value: Any) -> str | None:
        return None if value is None else f"0o{value:03o}"


_TOKEN68 = re.compile(r"[A-Za-z0-9._~+/-]+=*", re.ASCII)


@dataclass(frozen=True)
class Token(Kind):
    """A bearer token (RFC 6750's b64token characters), or empty for none."""

    label = "token or empty"
    metavar = "TOKEN"

    def from_value(self, value: object) -> str:
        text = _check_text(value).strip()
        if text and not _TOKEN68.fullmatch(text):
            raise _Invalid("expected letters, digits and -._~+/ (a bearer token)")
        return text


_HOOK = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", re.ASCII)


@dataclass(frozen=True)
class Hook(Kind):
    """A "module:function" string, or empty for none.

    Only the form is checked here; importing is the loader's job, done by the master, so that
    reading the configuration never runs application code.
    """

    label = "module:function"
    metavar = "MODULE:FUNC"

    def from_value(self, value: object) -> str:
        text = _check_text(value).strip()
        if text and not _HOOK.fullmatch(text):
            raise _Invalid("expected module:function")
        return text


@dataclass(frozen=True)
class TextList(Kind):
    """A non-empty list of strings, each checked by ``item``.

    The forms differ per source because each source has its own natural list syntax: a repeated
    flag on the command line, an array (or a single string) in TOML, commas in the environment.
    Stored as a tuple so that ``Settings`` stays immutable.
    """

    item: Callable[[str], str] = _check_text
    metavar: str = "ITEM"
    allow_empty: bool = False   # an empty list is meaningful (e.g. "trust no proxy")

    @property
    def label(self) -> str:  # type: ignore[override]
        return f"list of {self.metavar}"

    def from_value(self, value: object) -> tuple[str, ...]:
        items: Iterable[object]
        if isinstance(value, str):
            items = [value]
        elif isinstance(value, (list, tuple)):
            items = value
        else:
            raise _Invalid("expected a string or an array of strings")
        checked: list[str] = []
        for entry in items:
            text = _check_text(entry)
            if self.allow_empty and not text.strip():
                continue
            try:
                text = self.item(text)
            except _Invalid as exc:
                raise _Invalid(f"{_toml_value(text)}: {exc}") from None
            if text in checked:
                raise _Invalid(f"{_toml_value(text)} is listed twice")
            checked.append(text)
        if not checked and not self.allow_empty:
            raise _Invalid("must list at least one entry")
        return tuple(checked)

    def from_text(self, text: str) -> tuple[str, ...]:
        return self.from_value([part.strip() for part in text.split(",") if part.strip()])

    def argparse_options(self) -> dict[str, Any]:
        return {"action": "append", "metavar": self.metavar}

    def from_cli(self, raw: Any) -> tuple[str, ...]:
        return self.from_value(raw)


@dataclass(frozen=True)
class CountList(Kind):
    """An increasing list of positive counts: an array of integers in TOML, commas elsewhere."""

    metavar: str = "N"
    label = "list of increasing integers >= 1"

    def from_value(self, value: object) -> tuple[int, ...]:
        if isinstance(value, str):
            return self.from_text(value)
        if not isinstance(value, (list, tuple)):
            raise _Invalid("expected an array of integers")
        counts = tuple(_POSITIVE.from_value(entry) for entry in value)
        if any(b <= a for a, b in itertools.pairwise(counts)):
            raise _Invalid("the counts must increase")
        return counts

    def from_text(self, text: str) -> tuple[int, ...]:
        return self.from_value([_POSITIVE.from_text(part) for part in text.split(",")
                                if part.strip()])

    def argparse_options(self) -> dict[str, Any]:
        return {"metavar": "N[,N...]"}


@dataclass(frozen=True)
class TLSVersion(Kind):
    """1.2 or 1.3; TOML's bare 1.2 is a float, so numbers are taken as well as strings."""

    metavar: str = "VERSION"
    label = "1.2 or 1.3"

    def from_value(self, value: object) -> str:
        if isinstance(value, float):
            value = repr(value)
        word = _check_text(value).strip()
        if word not in ("1.2", "1.3"):
            raise _Invalid("expected 1.2 or 1.3")
        return word


def check_proxy(entry: str) -> str:
    """One forwarded_allow_ips entry; the proxy module owns the rule."""
    try:
        return proxy.check_allow_entry(entry)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def check_forwarded_header(name: str) -> str:
    """One forwarded_headers entry, in its canonical spelling; the proxy module owns the list."""
    try:
        return proxy.check_header_name(name)
    except ValueError as exc:
        raise _Invalid(str(exc)) from None


def check_bind(spec: str) -> str:
    """Validate one bind address with the rule the sockets module binds by.

    Checking the form here makes a typo a config error (caught by --check-config and by a HUP
    reload before any worker is touched) rather than a failure deep inside startup.
    """
    try:
        addresses.parse(spec)
    except addresses.AddressError as exc:
        raise _Invalid(exc.why) from None
    return spec


@dataclass(frozen=True)
class Address(Kind):
    """One listen address in the bind forms, or empty for "off" (the metrics listener)."""

    label = "address or empty"
    metavar = "ADDRESS"

    def from_value(self, value: object) -> str:
        text = _check_text(value).strip()
        return check_bind(text) if text else ""


@dataclass(frozen=True)
class AccessLogFormat(Kind):
    """A preset name, or a template of {field}s, checked by the access log's own rule so that a
    typo fails --check-config."""

    label = "combined, common, json or a template"
    metavar = "FORMAT"

    def from_value(self, value: object) -> str:
        try:
            return logs.access_log_format(_check_text(value))
        except ValueError as exc:
            raise _Invalid(str(exc)) from None


# --------------------------------------------------------------------------------------------
# The table.


@dataclass(frozen=True)
class Setting:
    """One configurable value; see the module docstring for what is derived from it."""

    name: str  # snake_case; the TOML key; the env var is FORKSERVER_<NAME upper>
    kind: Kind
    default: object  # a value, or a zero-argument callable for computed defaults
    flags: tuple[str, ...]  # command-line flags; empty for the positional APP
    help: str
    positional: bool = False
    # Another environment variable that, when set, replaces the default (WEB_CONCURRENCY, the
    # convention of Heroku-style platforms). It is a default, so every real source beats it.
    default_env: str | None = None
    default_doc: str | None = None  # how the docs describe a computed default

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def dest(self) -> str:
        """Where argparse stores the value; the setting name, so the Namespace reads naturally."""
        return self.name


def usable_cpus(
    cgroup_root: str = "/sys/fs/cgroup", self_cgroup: str = "/proc/self/cgroup"
) -> int:
    """CPUs this process may actually use: its affinity mask, capped by the cgroup v2 quota.

    ``os.cpu_count()`` reports the machine, which in a container or a systemd unit with
    ``CPUQuota=`` would start far more workers than there is CPU time for. Every ``cpu.max`` from
    the process's own cgroup up to the root is a cap, so the smallest one wins. A fractional
    quota is rounded up: a worker that waits on I/O leaves the rest of its share to the others.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit(cgroup_root, self_cgroup)
    if limit is not None:
        cpus = min(cpus, limit)
    return max(1, cpus)


def _cgroup_cpu_limit(cgroup_root: str, self_cgroup: str) -> int | None:
    relative = ""
    try:
        with open(self_cgroup, encoding="utf-8") as f:
            for line in f:
                if line.startswith("0::"):  # the unified (v2) hierarchy
                    relative = line[3:].strip().strip("/")
    except OSError:
        pass
    parts = [p for p in relative.split("/") if p and p not in {".", ".."}]
    limits = []
    for depth in range(len(parts), -1, -1):
        limit = _read_cpu_max(os.path.join(cgroup_root, *parts[:depth], "cpu.max"))
        if limit is not None:
            limits.append(limit)
    return min(limits) if limits else None


def _read_cpu_max(path: str) -> int | None:
    """``cpu.max`` holds "QUOTA PERIOD" in microseconds, or "max PERIOD" for no limit."""
    try:
        with open(path, encoding="ascii") as f:
            fields = f.read().split()
    except (OSError, UnicodeDecodeError):
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))


_SECONDS = Seconds()
_POSITIVE_SECONDS = Seconds(allow_zero=False)
_COUNT = Int(minimum=0)
_HOOK_KIND = Hook()
_POSITIVE = Int(minimum=1)

def setting(
    kind: Kind,
    default: object,
    flags: tuple[str, ...],
    help: str,
    *,
    positional: bool = False,
    default_env: str | None = None,
    default_doc: str | None = None,
) -> Any:
    """A field of ``Settings`` that carries its table row (everything but the name) as metadata.

    A callable default is computed when a ``Settings`` is built, never at import.
    """
    row = {"kind": kind, "default": default, "flags": flags, "help": help,
           "positional": positional, "default_env": default_env, "default_doc": default_doc}
    if callable(default):
        return dataclasses.field(default_factory=default, metadata={"setting": row})
    return dataclasses.field(default=default, metadata={"setting": row})


@dataclass(frozen=True)
class Settings:
    """The effective configuration: one typed field per setting, each declared once, here.

    ``SETTINGS`` (the rows that generate flags, TOML keys, environment variables, --print-config
    and the docs) is read off these fields. ``config_file`` is the absolute path of the file that
    was read, or None. Frozen, so a reload builds a new one.
    """

    app: str = setting(
        Text(metavar="APP"), "forkserver.demo:app", (),
        "WSGI application: module:callable, module:factory() (called once, literal arguments "
        "allowed) or a bare module (its 'application', else its 'app').",
        positional=True,
    )
    bind: tuple[str, ...] = setting(
        TextList(item=check_bind, metavar="ADDRESS"), ("127.0.0.1:8000",),
        ("-b", "--bind"),
        "Address to listen on: HOST:PORT, [IPv6]:PORT, unix:/path or fd://N. Repeat the flag "
        "for several; the environment variable takes a comma-separated list. Sockets passed by "
        "systemd (LISTEN_FDS) are used automatically.",
    )
    workers: int = setting(
        _POSITIVE, usable_cpus, ("-w", "--workers"),
        "Number of worker processes; each runs one request at a time per thread (see threads).",
        default_env="WEB_CONCURRENCY",
        default_doc="usable CPUs (affinity and cgroup `cpu.max`); `WEB_CONCURRENCY` if set",
    )
    threads: int = setting(
        Int(minimum=1, maximum=scoreboard.THREADS_MAX), 1, ("--threads",),
        "Threads per worker that run the app. With more than 1 the worker's loop parks idle "
        "connections and hands complete requests to this many threads: for I/O-bound apps "
        "(databases, HTTP APIs); CPU-bound apps want more workers instead.",
    )
    handoff_delay: float = setting(
        Seconds(unit="milliseconds", metavar="MS"), 2.0, ("--handoff-delay",),
        "Milliseconds all of a worker's threads must have been busy before it passes a "
        "keep-alive connection with a request waiting to an idle worker (connection handoff), "
        "so no request waits behind another while a worker is free; 0 disables handoff.",
    )
    backlog: int = setting(
        _POSITIVE, 2048, ("--backlog",),
        "Listen queue length: connections the kernel holds until a worker accepts them.",
    )
    reuse_port: bool = setting(
        Bool(), False, ("--reuse-port",),
        "Set SO_REUSEPORT on TCP listeners, so another server can bind the same port.",
    )
    keepalive: float = setting(
        _SECONDS, 5.0, ("--keepalive",),
        "Seconds an idle keep-alive connection stays open waiting for the next request; "
        "0 disables keep-alive.",
    )
    keepalive_requests: int = setting(
        _POSITIVE, 1000, ("--keepalive-requests",),
        "Requests served on one connection before it is closed.",
    )
    header_timeout: float = setting(
        _POSITIVE_SECONDS, 10.0, ("--header-timeout",),
        "Seconds a client has to send a complete request head, so slow clients cannot hold "
        "connections open.",
    )
    timeout: float = setting(
        _SECONDS, 30.0, ("-t", "--timeout"),
        "Seconds a worker may spend on one request before the master aborts it; 0 disables.",
    )
    graceful_timeout: float = setting(
        _SECONDS, 30.0, ("--graceful-timeout",),
        "Seconds workers get to finish in-flight requests on shutdown or reload before they "
        "are killed.",
    )
    shutdown_delay: float = setting(
        _SECONDS, 0.0, ("--shutdown-delay",),
        "Seconds between TERM and the graceful drain: /readyz turns 503 at once and the server "
        "keeps serving, with Connection: close, while load balancers stop sending to it. A "
        "second TERM, or INT or QUIT, cuts it short.",
    )
    boot_timeout: float = setting(
        _SECONDS, 60.0, ("--boot-timeout",),
        "Seconds a new worker has to import the app and become ready before it is killed; "
        "0 disables.",
    )
    send_timeout: float = setting(
        _POSITIVE_SECONDS, 10.0, ("--send-timeout",),
        "Seconds a client may make no progress reading a response (or, while the app reads a "
        "request body, sending it) before the connection is cut off. It counts stalls, not "
        "the whole transfer, so a slow client that keeps reading is never cut; while it "
        "stalls it holds a worker (or, with threads, one thread).",
    )
    min_body_rate: int = setting(
        _COUNT, 8192, ("--min-body-rate",),
        "Bytes per second a request body streamed to the app must keep up, after "
        "header_timeout of grace; slower uploads get a 408, since the worker waits on them. "
        "0 turns the check off (then only send_timeout and timeout bound them).",
    )
    worker_connections: int = setting(
        _POSITIVE, 1000, ("--worker-connections",),
        "Most connections one worker holds at once, busy plus idle keep-alive; at the limit it "
        "stops accepting.",
    )
    limit_request_line: int = setting(
        _POSITIVE, 8190, ("--limit-request-line",),
        "Longest request line in bytes; longer ones get 414.",
    )
    limit_request_fields: int = setting(
        _POSITIVE, 100, ("--limit-request-fields",),
        "Most header fields in one request; more get 431.",
    )
    limit_request_field_size: int = setting(
        _POSITIVE, 8190, ("--limit-request-field-size",),
        "Longest header field (name and value) in bytes; longer ones get 431.",
    )
    limit_request_body: int = setting(
        _COUNT, 100 * 1024 * 1024, ("--limit-request-body",),
        "Largest request body in bytes; larger ones get 413. 0 means unlimited.",
    )
    limit_request_head: int = setting(
        _POSITIVE, 64 * 1024, ("--limit-request-head",),
        "Largest request head in bytes (request line and all header fields); larger ones get "
        "431. It bounds what one connection's unfinished head can hold in memory.",
    )
    linger_timeout: float = setting(
        _SECONDS, 5.0, ("--linger-timeout",),
        "Seconds a connection is drained (read and discarded) after its last response while "
        "the client is still sending, e.g. a body the app did not read; closing earlier would "
        "make the kernel reset the connection and destroy the response in flight.",
    )
    linger_bytes: int = setting(
        _COUNT, 16 * 1024 * 1024, ("--linger-bytes",),
        "Most bytes drained after the last response before the connection is closed anyway; "
        "0 means no draining.",
    )
    max_requests: int = setting(
        _COUNT, 0, ("--max-requests",),
        "Requests a worker serves before it is replaced, to contain memory leaks; 0 disables.",
    )
    max_requests_jitter: int = setting(
        _COUNT, 0, ("--max-requests-jitter",),
        "Random extra requests (0 to this) added to max_requests per worker, so workers are "
        "not all replaced at once.",
    )
    max_worker_lifetime: float = setting(
        _SECONDS, 0.0, ("--max-worker-lifetime",),
        "Seconds after which a worker is replaced (its successor starts first); 0 disables.",
    )
    max_worker_memory: int = setting(
        _COUNT, 0, ("--max-worker-memory",),
        "MiB of memory a worker may hold on its own (USS: the pages only it maps, as "
        "/proc/PID/smaps counts them; pages shared with the master after fork or preload do not "
        "count) before it is replaced, its successor starting first. Read every "
        "memory_check_interval; 0 disables.",
    )
    memory_check_interval: float = setting(
        _POSITIVE_SECONDS, 10.0, ("--memory-check-interval",),
        "Seconds between the master's readings of each process's memory (RSS, USS, PSS: one "
        "walk of /proc/PID/smaps per process), used by max_worker_memory, /metrics and /status.",
    )
    preload: bool = setting(
        Bool(), False, ("--preload",),
        "Import the application in the master before forking: faster worker start and shared "
        "memory, but a reload (HUP) no longer picks up code changes.",
    )
    gc_freeze: bool = setting(
        Bool(), True, ("--gc-freeze",),
        "With preload: collect garbage, then gc.freeze() in the master right before forking, so "
        "the workers' collections never write to (and unshare) the preloaded objects.",
    )
    refork_after: tuple[int, ...] = setting(
        CountList(), (), ("--refork-after",),
        "Request counts (e.g. 50,500) at which the first worker of a generation, warmed up, "
        "becomes the template the other workers are forked from again, so caches the app built "
        "lazily are shared. Empty turns it off.",
    )
    reload: bool = setting(
        Bool(), False, ("--reload",),
        "Development: start a new generation of workers when a source file the app imported "
        "(or one matching reload_extra_files) changes. Not with preload.",
    )
    reload_extra_files: tuple[str, ...] = setting(
        TextList(metavar="GLOB", allow_empty=True), (), ("--reload-extra-files",),
        "More files to watch with reload (globs; ** recurses), such as templates.",
    )
    chdir: str = setting(
        Text(metavar="DIR"), "", ("--chdir",),
        "Directory to change to before the application is imported; empty to stay.",
    )
    pythonpath: str = setting(
        Text(metavar="DIRS"), "", ("--pythonpath",),
        "Comma-separated directories put in front of sys.path before the application is "
        "imported.",
    )
    pidfile: str = setting(
        Text(metavar="FILE"), "", ("-p", "--pidfile"),
        "File to write the master's PID to; empty for none.",
    )
    user: str = setting(
        Text(metavar="USER"), "", ("-u", "--user"),
        "User (name or uid) the workers switch to when started as root; empty to stay.",
    )
    group: str = setting(
        Text(metavar="GROUP"), "", ("-g", "--group"),
        "Group (name or gid) the workers switch to when started as root; empty for the user's.",
    )
    umask: int | None = setting(
        Umask(), None, ("--umask",),
        "File mode mask for the master and workers, in octal (022); unset keeps the inherited "
        "one.",
    )
    proc_name: str = setting(
        Text(metavar="NAME"), "forkserver", ("-n", "--proc-name"),
        "Name shown in ps and top for the master and workers.",
    )
    log_level: str = setting(
        Choice(choices=("debug", "info", "warning", "error", "critical")),
        "info", ("--log-level",),
        "Least severe error-log messages written; debug also shows tracebacks for "
        "configuration and import errors.",
    )
    error_log: str = setting(
        Text(metavar="FILE"), "-", ("--error-log",),
        "File for the error log; - is stderr. Reopened on USR1.",
    )
    error_log_format: str = setting(
        Choice(choices=("text", "json"), metavar="FORMAT"), "text", ("--error-log-format",),
        "Error log lines: text ([time] [pid] [LEVEL] message) or json (one object per line: "
        "time, level, pid, message and the fields the message carries, such as worker_pid, "
        "slot, generation, exit_code, signal and reason).",
    )
    access_log: str = setting(
        Text(metavar="FILE"), "", ("--access-log",),
        "File for the access log, one line per request; - is stdout, empty turns it off. "
        "Reopened on USR1.",
    )
    access_log_format: str = setting(
        AccessLogFormat(), "combined", ("--access-log-format",),
        "Access log lines: combined or common (as Apache), json (one object per line: time, "
        "remote, method, path, query, status, bytes, duration_ms, user_agent, referer, "
        "request_id), or a template such as \"{remote} {method} {path} {status} "
        "{duration_ms}\" (also target, version, time_local).",
    )
    forwarded_allow_ips: tuple[str, ...] = setting(
        TextList(item=check_proxy, metavar="ADDRESS", allow_empty=True),
        ("127.0.0.1", "::1", "unix"), ("--forwarded-allow-ips",),
        "Peers (IPs, CIDR networks, 'unix', '*' for all) whose forwarding headers (see "
        "forwarded_headers) set REMOTE_ADDR, wsgi.url_scheme and, if named, HTTP_HOST; "
        "anyone else's are passed on untouched. An empty list trusts nobody.",
    )
    forwarded_headers: tuple[str, ...] = setting(
        TextList(item=check_forwarded_header, metavar="HEADER", allow_empty=True),
        ("X-Forwarded-For", "X-Forwarded-Proto"), ("--forwarded-headers",),
        "The only forwarding headers read from trusted proxies: X-Forwarded-For, -Proto, "
        "-Host, Forwarded (RFC 7239; wins over X-Forwarded-* when named). Name only headers "
        "the proxy sets or replaces on every request; see docs/proxies.md.",
    )
    metrics_bind: str = setting(
        Address(), "", ("--metrics-bind",),
        "Address (HOST:PORT or unix:/path) where the master serves /metrics, /status and the "
        "probes /livez and /readyz; empty turns it off. /metrics and /status answer only a "
        "Host naming the listener or loopback. Keep it private.",
    )
    metrics_token: str = setting(
        Token(), "", ("--metrics-token",),
        "Bearer token that /metrics and /status require (Authorization: Bearer TOKEN); empty "
        "turns the check off. /livez and /readyz never ask for it. Give it in the config file "
        "or the environment: ps shows the command line.",
    )
    status_show_query: bool = setting(
        Bool(), False, ("--status-show-query",),
        "Show the query strings of running requests in /status; off by default because query "
        "strings often carry tokens.",
    )
    certfile: str = setting(
        Text(metavar="FILE"), "", ("--certfile",),
        "PEM certificate chain, server certificate first; setting it serves TLS on every "
        "listener. Reloaded on HUP.",
    )
    keyfile: str = setting(
        Text(metavar="FILE"), "", ("--keyfile",),
        "Unencrypted PEM private key; empty if certfile holds the key too.",
    )
    ca_certs: str = setting(
        Text(metavar="FILE"), "", ("--ca-certs",),
        "PEM file of the CAs client certificates must chain to; needed unless cert_reqs is none.",
    )
    cert_reqs: str = setting(
        Choice(choices=("none", "optional", "required"), metavar="MODE"), "none",
        ("--cert-reqs",),
        "Client certificates: none (not asked for), optional (checked if sent), required "
        "(mutual TLS).",
    )
    ciphers: str = setting(
        Text(metavar="LIST"), "", ("--ciphers",),
        "OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are fixed); empty keeps OpenSSL's.",
    )
    tls_min_version: str = setting(
        TLSVersion(), "1.2", ("--tls-min-version",),
        "Oldest TLS version accepted: 1.2 or 1.3.",
    )
    proxy_protocol: str = setting(
        Choice(choices=("off", "v1", "v2", "auto"), metavar="MODE"), "off",
        ("--proxy-protocol",),
        "Read a PROXY protocol header (from HAProxy or a network load balancer) before each "
        "connection's first byte: v1, v2, or auto for either. Every mode but off requires one.",
    )
    proxy_allow_ips: tuple[str, ...] = setting(
        TextList(item=check_proxy, metavar="ADDRESS", allow_empty=True), ("127.0.0.1", "::1"),
        ("--proxy-allow-ips",),
        "Peers (IPs, CIDR networks, 'unix', '*') allowed to send a PROXY header; connections "
        "from anyone else are closed unread.",
    )
    on_starting: str = setting(
        _HOOK_KIND, "", ("--on-starting",),
        "Hook f(settings) in the master before the first workers start.",
    )
    when_ready: str = setting(
        _HOOK_KIND, "", ("--when-ready",),
        "Hook f(settings) in the master once the first workers are all ready.",
    )
    pre_fork: str = setting(
        _HOOK_KIND, "", ("--pre-fork",),
        "Hook f(settings, index) in the master just before each worker is forked.",
    )
    on_reload: str = setting(
        _HOOK_KIND, "", ("--on-reload",),
        "Hook f(settings) in the master after a reload (HUP) read new settings.",
    )
    on_exit: str = setting(
        _HOOK_KIND, "", ("--on-exit",),
        "Hook f(settings) in the master as it exits.",
    )
    post_fork: str = setting(
        _HOOK_KIND, "", ("--post-fork",),
        "Hook f(pid) in each worker right after the fork, before loading the app.",
    )
    post_worker_init: str = setting(
        _HOOK_KIND, "", ("--post-worker-init",),
        "Hook f(pid) in each worker once the app is loaded.",
    )
    worker_exit: str = setting(
        _HOOK_KIND, "", ("--worker-exit",),
        "Hook f(pid) in each worker as it exits.",
    )
    pre_request: str = setting(
        _HOOK_KIND, "", ("--pre-request",),
        "Hook f(environ) in the worker before each request.",
    )
    post_request: str = setting(
        _HOOK_KIND, "", ("--post-request",),
        "Hook f(environ, status_code) in the worker after each request.",
    )
    config_file: str | None = None


SETTINGS: tuple[Setting, ...] = tuple(
    Setting(f.name, **f.metadata["setting"])
    for f in dataclasses.fields(Settings) if "setting" in f.metadata
)
_BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
_BY_ENV: dict[str, Setting] = {s.env: s for s in SETTINGS}



# --------------------------------------------------------------------------------------------
# Building Settings from the sources.


def _toml_string(text: str) -> str:
    """A TOML basic string; escapes everything TOML forbids raw (controls, DEL, quote, \\)."""
    out = ['"']
    for ch in text:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch < " " or ch == "\x7f":
            named = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
            out.append(named.get(ch, f"\\u{ord(ch):04X}"))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(value: object) -> str:
    """Render a value the way it would be written in TOML; also used to quote it in errors."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return _toml_string(str(value))


def _coerce(setting: Setting, raw: object, parse: Callable[[Any], Any], where: str) -> Any:
    try:
        return parse(raw)
    except _Invalid as exc:
        raise ConfigError(f"{setting.name} = {_toml_value(raw)} {where}: {exc}") from None


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _read_toml(path: str, label: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {label}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{label} is not valid TOML: {exc}") from None


def _tool_table(data: dict[str, Any], label: str) -> dict[str, Any] | None:
    tool = data.get("tool", {})
    table = tool.get("forkserver") if isinstance(tool, dict) else None
    if table is not None and not isinstance(table, dict):
        raise ConfigError(f"{label}: tool.forkserver must be a table")
    return table


def _find_config(config_file: str | None, cwd: str) -> tuple[str | None, str, dict[str, Any]]:
    """Return (absolute path or None, label for messages, the table of settings)."""
    if config_file:
        path = os.path.abspath(os.path.join(cwd, config_file))
        data = _read_toml(path, config_file)
        if os.path.basename(path) == PYPROJECT:
            label = f"{config_file} [tool.forkserver]"
            return path, label, _tool_table(data, config_file) or {}
        return path, config_file, data
    path = os.path.join(cwd, CONFIG_FILE)
    if os.path.exists(path):
        return os.path.abspath(path), CONFIG_FILE, _read_toml(path, CONFIG_FILE)
    path = os.path.join(cwd, PYPROJECT)
    if os.path.exists(path):
        table = _tool_table(_read_toml(path, PYPROJECT), PYPROJECT)
        if table is not None:
            return os.path.abspath(path), f"{PYPROJECT} [tool.forkserver]", table
    return None, "", {}


def _default(setting: Setting, environ: Mapping[str, str]) -> Any:
    if setting.default_env and environ.get(setting.default_env, "").strip():
        where = f"in environment variable {setting.default_env}"
        return _coerce(setting, environ[setting.default_env], setting.kind.from_text, where)
    if callable(setting.default):
        return setting.default()
    return setting.default


def resolve(
    cli_overrides: Mapping[str, Any],
    config_file: str | None,
    environ: Mapping[str, str],
    cwd: str,
) -> Settings:
    """Build Settings from defaults < config file < environment < ``cli_overrides``.

    ``cli_overrides`` maps setting names to already-parsed values (see ``cli_overrides``); they
    are checked again so that a programmatic caller gets the same errors. ``config_file`` is the
    ``-c`` argument (relative to ``cwd``) or None to look for one in ``cwd``. A HUP reload calls
    this again with the original arguments, so edits to the file and environment take effect.
    """
    values: dict[str, Any] = {}
    path, label, table = _find_config(config_file, cwd)
    for key, raw in table.items():
        setting = _BY_NAME.get(key)
        if setting is None:
            hint = _did_you_mean(key, _BY_NAME)
            raise ConfigError(f"unknown setting {key!r} in {label}{hint}")
        values[key] = _coerce(setting, raw, setting.kind.from_value, f"in {label}")
    for var in sorted(environ):
        if not var.startswith(ENV_PREFIX) or var in RESERVED_ENV:
            continue
        setting = _BY_ENV.get(var)
        if setting is None:
            hint = _did_you_mean(var, _BY_ENV)
            raise ConfigError(f"unknown environment variable {var}{hint}")
        where = f"in environment variable {var}"
        values[setting.name] = _coerce(setting, environ[var], setting.kind.from_text, where)
    for name, raw in cli_overrides.items():
        setting = _BY_NAME.get(name)
        if setting is None:
            raise ConfigError(f"unknown setting {name!r}{_did_you_mean(name, _BY_NAME)}")
        values[name] = _coerce(setting, raw, setting.kind.from_value, _cli_where(setting))
    for setting in SETTINGS:
        if setting.name not in values:
            values[setting.name] = _default(setting, environ)
    settings = Settings(**values, config_file=path)
    _check_together(settings)
    return settings


def _check_together(settings: Settings) -> None:
    """Rules that join several settings. A TLS context is built once here and thrown away, so
    bad certificate settings fail at startup, in --check-config and in a HUP reload (which then
    keeps the old generation serving) with one line naming the setting."""
    if settings.reload and settings.preload:
        raise ConfigError("reload: cannot be combined with preload (the master would keep "
                          "serving the code it imported)")
    if tls.enabled(settings):
        try:
            tls.server_context(settings)
        except tls.TLSConfigError as error:
            raise ConfigError(str(error)) from None


# --------------------------------------------------------------------------------------------
# Command line.


class _Parser(argparse.ArgumentParser):
    """Raise instead of printing usage and exiting, so the CLI prints one line and returns 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        prefix = "unrecognized arguments: "
        if message.startswith(prefix):
            options = [o for action in self._actions for o in action.option_strings]
            for word in message[len(prefix):].split():
                if word.startswith("--"):
                    message += _did_you_mean(word.partition("=")[0], options)
                    break
        raise ConfigError(message)


def _default_text(setting: Setting) -> str:
    if setting.default_doc:
        return setting.default_doc
    if setting.default == "":
        return "empty"
    return setting.kind.to_toml(setting.default) or "unset"


def _cli_where(setting: Setting) -> str:
    return f"on the command line ({'/'.join(setting.flags) or 'APP'})"


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser; every setting flag comes from SETTINGS.

    Setting options default to SUPPRESS so the Namespace holds only what was actually typed:
    that is what lets the command line override the file and environment without a default
    sneaking in over them.
    """
    parser = _Parser(
        prog="forkserver",
        description="A preforking WSGI HTTP/1.1 server.",
        epilog="Every setting can also come from the config file (its name as the key) or the "
        "environment (FORKSERVER_<NAME>). Precedence: default < file < environment < command "
        "line. See docs/settings.md. `forkserver status --help` shows the command that lists a "
        "running server's workers.",
        argument_default=argparse.SUPPRESS,
        # Abbreviations would make every new flag a possible break for existing scripts.
        allow_abbrev=False,
    )
    actions = parser.add_argument_group("actions")
    actions.add_argument(
        "-c", "--config", metavar="FILE", default=None,
        help="TOML config file (default: ./forkserver.toml, else [tool.forkserver] in "
        "./pyproject.toml)",
    )
    mode = actions.add_mutually_exclusive_group()
    mode.add_argument(
        "--check-config", action="store_true", default=False,
        help="validate the settings and import the app, then exit 0 or 1",
    )
    mode.add_argument(
        "--print-config", action="store_true", default=False,
        help="print the effective settings as TOML and exit",
    )
    actions.add_argument(
        "--version", action="store_true", default=False, help="print the version and exit"
    )
    group = parser.add_argument_group("settings")
    for setting in SETTINGS:
        help_text = f"{setting.help} [default: {_default_text(setting)}; env {setting.env}]"
        options = setting.kind.argparse_options()
        options["help"] = help_text.replace("%", "%%")
        if setting.positional:
            options["metavar"] = setting.kind.metavar
            group.add_argument(setting.dest, nargs="?", **options)
        else:
            group.add_argument(*setting.flags, dest=setting.dest, **options)
    return parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the command line; usage errors become ConfigError. ``--help`` exits (SystemExit)."""
    return build_parser().parse_args(argv)


def cli_overrides(namespace: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line, parsed; the input ``resolve`` keeps on reload."""
    overrides: dict[str, Any] = {}
    for setting in SETTINGS:
        if hasattr(namespace, setting.dest):
            raw = getattr(namespace, setting.dest)
            where = _cli_where(setting)
            overrides[setting.name] = _coerce(setting, raw, setting.kind.from_cli, where)
    return overrides


def load(
    argv: list[str], environ: Mapping[str, str], cwd: str
) -> tuple[Settings, argparse.Namespace]:
    """Parse ``argv`` and resolve all sources; the Namespace carries the non-setting options."""
    namespace = parse_args(argv)
    return resolve(cli_overrides(namespace), namespace.config, environ, cwd), namespace


# --------------------------------------------------------------------------------------------
# Output derived from the table.


def to_toml(settings: Settings) -> str:
    """The effective configuration as a TOML file that ``-c`` loads back to the same Settings."""
    source = settings.config_file or "defaults, environment and command line only"
    lines = [
        "# forkserver effective configuration",
        f"# config file: {source}".replace("\n", " "),
    ]
    for setting in SETTINGS:
        lines.append("")
        lines.extend("# " + line for line in textwrap.wrap(setting.help, 96))
        literal = setting.kind.to_toml(getattr(settings, setting.name))
        if literal is None:
            lines.append(f"# {setting.name} is not set")
        else:
            lines.append(f"{setting.name} = {literal}")
    return "\n".join(lines) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_code(text: str) -> str:
    return f"`{text}`" if text else ""


def _flag_text(setting: Setting) -> str:
    if setting.positional:
        return f"`{setting.kind.metavar}` (positional)"
    if isinstance(setting.kind, Bool):
        longs = [f for f in setting.flags if f.startswith("--")]
        return ", ".join(f"`{f}` / `--no-{f[2:]}`" for f in longs)
    return ", ".join(f"`{f} {setting.kind.metavar}`" for f in setting.flags)


def settings_markdown() -> str:
    """The content of docs/settings.md; a unit test keeps the committed file equal to it."""
    lines = [
        "# Settings",
        "",
        "<!-- Generated from the SETTINGS table in forkserver/config.py by",
        "     `python -m forkserver.config > docs/settings.md`. Do not edit by hand. -->",
        "",
        "Every setting can be given in four places. Weakest first:",
        "",
        "1. its default;",
        (
            f"2. the config file: `-c FILE`, else `./{CONFIG_FILE}`, else the "
            f"`[tool.forkserver]` table of `./{PYPROJECT}` (TOML, the setting name is the key);"
        ),
        f"3. the environment variable `{ENV_PREFIX}<NAME>`;",
        "4. the command line.",
        "",
        "Unknown keys in the file and unknown `FORKSERVER_*` variables are errors. In the",
        "environment, booleans are `1/0`, `true/false`, `yes/no` or `on/off`, and lists are",
        "comma-separated. `forkserver --print-config` prints the effective settings as a file",
        "that `-c` accepts; `forkserver --check-config` validates them and imports the app.",
        "",
        "| Setting | Type | Default | Command line | Environment | Description |",
        "|---|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        default = _default_text(s)
        if not s.default_doc and s.default not in ("", None):
            default = _md_code(default)
        cells = [
            _md_code(s.name),
            s.kind.label,
            default,
            _flag_text(s),
            _md_code(s.env),
            s.help,
        ]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(settings_markdown(), end="")
