"""Memory of the server's processes as it is: RSS, USS and PSS, read with psutil.

* RSS (resident set size) counts every page a process has in RAM, its share of pages shared with
  other processes included, so the RSS of prefork workers adds up to far more than they use.
* USS (unique set size) counts the pages only this process maps: what it would give back by
  exiting. ``max_worker_memory`` is compared against it.
* PSS (proportional set size) counts each page divided by the number of processes that map it:
  the PSS of every process of the server adds up to what the server really uses.

USS and PSS come from walking /proc/PID/smaps (psutil's ``memory_full_info``), which costs
milliseconds for a big process, so a ``Sampler`` reads each pid at most once per interval and
serves its last reading in between. The master calls it from its loop, for the memory limit and
for /metrics and /status alike; nothing here blocks on anything but /proc.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

__all__ = ["Reading", "Sampler", "read_process", "total"]


class Reading(NamedTuple):
    """One process's memory in bytes; ``pss`` is 0 where the system does not report it."""

    rss: int
    uss: int
    pss: int


ZERO = Reading(0, 0, 0)


def read_process(pid: int) -> Reading | None:
    """A fresh reading of ``pid``, or None if it is gone or cannot be read.

    Where smaps cannot be read (not Linux, or no permission), USS falls back to RSS minus
    shared pages, which is close to it, and PSS is reported as 0 (unknown).
    """
    import psutil  # (imported where used: architecture.md, "What a worker inherits")

    try:
        proc = psutil.Process(pid)
        try:
            full = proc.memory_full_info()
        except psutil.AccessDenied:
            full = None
        if full is not None and hasattr(full, "uss"):
            return Reading(full.rss, full.uss, getattr(full, "pss", 0))
        basic = proc.memory_info()
    except psutil.Error:
        return None
    return Reading(basic.rss, max(0, basic.rss - getattr(basic, "shared", 0)), 0)


def total(readings: Iterable[Reading]) -> Reading:
    """The sum of readings (meaningful for PSS and USS; RSS counts shared pages repeatedly)."""
    rss = uss = pss = 0
    for reading in readings:
        rss += reading.rss
        uss += reading.uss
        pss += reading.pss
    return Reading(rss, uss, pss)


class Sampler:
    """Readings per pid, each at most ``interval`` seconds old, each read at most once per
    ``interval``.

    ``read`` is the function that reads one process (``read_process``; tests pass their own).
    Times are ``time.monotonic()`` values given by the caller, so the sampler holds no clock.
    """

    def __init__(self, interval: float,
                 read: Callable[[int], Reading | None] = read_process) -> None:
        self.interval = interval  # the master sets it again after a reload
        self._read = read
        self._cache: dict[int, tuple[float, Reading | None]] = {}

    def readings(self, pids: Iterable[int], now: float) -> dict[int, Reading]:
        """A reading for each of ``pids`` that can be read (a process that is gone has none).

        Callers may ask for different sets (the memory limit for the workers, a scrape for the
        whole server) without reading anything twice. A reading not asked for is dropped once
        it is due again, so the cache never outgrows the server; ``forget`` drops one at once.
        """
        wanted = set(pids)
        cache = self._cache
        for pid in [pid for pid, (taken, _) in cache.items()
                    if pid not in wanted and not 0 <= now - taken < self.interval]:
            del cache[pid]
        result = {}
        for pid in wanted:
            entry = cache.get(pid)
            if entry is None or now - entry[0] >= self.interval or now < entry[0]:
                entry = (now, self._read(pid))
                cache[pid] = entry
            if entry[1] is not None:
                result[pid] = entry[1]
        return result

    def forget(self, pid: int) -> None:
        """Drop a pid's reading (the master reaped it; the pid may be reused)."""
        self._cache.pop(pid, None)
