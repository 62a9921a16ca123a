"""memory.py: readings of real processes, and the sampler's once-per-interval cache."""

from __future__ import annotations

import os

from forkserver import memory
from forkserver.memory import Reading, Sampler


def test_a_real_reading_of_this_process():
    r = memory.read_process(os.getpid())
    assert r is not None
    assert 0 < r.uss <= r.pss <= r.rss


def test_a_forked_child_shares_pages_so_its_pss_is_below_its_rss():
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(ready_r)
            os.close(done_w)
            os.write(ready_w, b"x")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        os.read(ready_r, 1)
        child = memory.read_process(pid)
        assert child is not None
        # The child maps the interpreter's pages with its parent: it owns few of them.
        assert child.uss < child.pss < child.rss
    finally:
        os.close(done_w)
        os.close(ready_r)
        os.waitpid(pid, 0)
    assert memory.read_process(pid) is None  # reaped: gone


def test_total():
    assert memory.total([Reading(1, 2, 3), Reading(10, 20, 30)]) == Reading(11, 22, 33)
    assert memory.total([]) == Reading(0, 0, 0)


class Counting:
    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, pid):
        self.calls.append(pid)
        return None if pid == 13 else Reading(pid, len(self.calls), 0)


def test_each_pid_is_read_at_most_once_per_interval():
    read = Counting()
    sampler = Sampler(10.0, read)
    first = sampler.readings([1, 2], now=100.0)
    assert sorted(read.calls) == [1, 2] and set(first) == {1, 2}
    again = sampler.readings([1, 2], now=109.9)
    assert again == first and len(read.calls) == 2
    sampler.readings([1, 2, 3], now=105.0)  # only the new pid is read
    assert sorted(read.calls) == [1, 2, 3]
    later = sampler.readings([1, 2, 3], now=110.0)  # 1 and 2 are due, 3 is not
    assert sorted(read.calls) == [1, 1, 2, 2, 3]
    assert later[1] != first[1]


def test_a_gone_process_has_no_reading_and_is_not_read_again_within_the_interval():
    read = Counting()
    sampler = Sampler(5.0, read)
    assert sampler.readings([13], now=0.0) == {}
    assert sampler.readings([13], now=1.0) == {}
    assert read.calls == [13]


def test_a_reading_not_asked_for_is_kept_until_due_and_forget_drops_one():
    read = Counting()
    sampler = Sampler(60.0, read)
    sampler.readings([1, 2], now=0.0)
    sampler.readings([2], now=1.0)  # another caller, another set: 1 is kept
    sampler.readings([1, 2], now=2.0)
    assert sorted(read.calls) == [1, 2]
    sampler.readings([2], now=61.0)  # 1 is due and not asked for: dropped, 2 is read again
    assert sampler._cache.keys() == {2}
    sampler.forget(2)  # reaped: its pid may be reused, so no old reading may be served
    sampler.readings([1, 2], now=62.0)
    assert sorted(read.calls) == [1, 1, 2, 2, 2]


def test_a_clock_that_went_back_reads_again():
    read = Counting()
    sampler = Sampler(60.0, read)
    sampler.readings([1], now=100.0)
    sampler.readings([1], now=50.0)
    assert read.calls == [1, 1]


def test_interval_zero_reads_every_time():
    read = Counting()
    sampler = Sampler(0.0, read)
    sampler.readings([1], now=0.0)
    sampler.readings([1], now=0.0)
    assert read.calls == [1, 1]
