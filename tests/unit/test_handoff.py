"""The handoff channel, its policy and the single-threaded worker's watcher, on real sockets."""

from __future__ import annotations

import array
import os
import socket
import threading
import time

import pytest

from forkserver import handoff
from forkserver.handoff import Candidate, Channel, Why


@pytest.fixture
def channel():
    ch = Channel.create()
    yield ch
    while handoff.receive(ch) is not None:
        pass
    ch.close()


def open_fds() -> set[int]:
    return set(map(int, os.listdir("/proc/self/fd")))


def client_pair() -> tuple[socket.socket, socket.socket]:
    """(the client's end, the server's end) of a real TCP connection on loopback."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def raw_send(ch: Channel, data: bytes, fds: list[int]) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    ch.sending.sendmsg([data], ancillary)


# -- the wire ------------------------------------------------------------------------------
def test_socket_and_fields_arrive_intact(channel):
    client, server = client_pair()
    with client:
        assert handoff.send(channel, server, b"GET /a HTTP/1.1\r\n", ("203.0.113.9", "4711"),
                            0, 123.5, requests=7)
        server.close()  # the sender's descriptor; the connection lives on in the channel
        handed = handoff.receive(channel)
        assert handed is not None
        with handed.sock:
            assert handed.pending == b"GET /a HTTP/1.1\r\n"
            assert handed.remote == ("203.0.113.9", "4711")
            assert handed.hops == 1
            assert handed.ready_at == 123.5
            assert handed.requests == 7
            assert not handed.sock.getblocking()
            client.sendall(b"ping")
            time.sleep(0.05)
            assert handed.sock.recv(10) == b"ping"
            handed.sock.sendall(b"pong")
            assert client.recv(10) == b"pong"


def test_handed_between_processes_keeps_byte_order(channel):
    """A real SCM_RIGHTS trip to another process: the pending bytes come first, then what
    the client sent after the handoff, in order."""
    client, server = client_pair()
    pipelined = b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHo"
    pid = os.fork()
    if pid == 0:  # the adopting worker: echo everything it is given, in order, then exit
        code = 1
        try:
            client.close()
            server.close()
            deadline = time.monotonic() + 5
            handed = None
            while handed is None and time.monotonic() < deadline:
                handed = handoff.receive(channel)
                time.sleep(0.005)
            handed.sock.setblocking(True)
            data = handed.pending
            while not data.endswith(b"END"):
                data += handed.sock.recv(4096)
            handed.sock.sendall(f"{os.getpid()}:".encode() + data)
            code = 0
        finally:
            os._exit(code)
    with client:
        assert handoff.send(channel, server, pipelined, ("", ""), 0, time.monotonic())
        server.close()
        client.sendall(b"st: x\r\n\r\nEND")
        client.settimeout(5)
        reply = b""
        while not reply.endswith(b"END"):
            chunk = client.recv(4096)
            assert chunk, "the adopting process closed early"
            reply += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert reply == f"{pid}:".encode() + pipelined + b"st: x\r\n\r\nEND"


def test_hop_limit(channel):
    client, server = client_pair()
    with client, server:
        assert not handoff.send(channel, server, b"", ("", ""), handoff.HOP_LIMIT, 0.0)
        assert not channel.queued()
        assert handoff.send(channel, server, b"", ("", ""), handoff.HOP_LIMIT - 1, 0.0)
        handed = handoff.receive(channel)
        handed.sock.close()
        assert handed.hops == handoff.HOP_LIMIT
        assert not handoff.hop_allowed(handed.hops)


def test_oversized_pending_is_not_sent(channel):
    client, server = client_pair()
    with client, server:
        assert not handoff.send(channel, server, b"x" * (handoff.MAX_PENDING + 1), ("", ""),
                                0, 0.0)
        assert not channel.queued()
        assert handoff.send(channel, server, b"x" * handoff.MAX_PENDING, ("", ""), 0, 0.0)
        handed = handoff.receive(channel)
        handed.sock.close()
        assert handed.pending == b"x" * handoff.MAX_PENDING


def test_nobody_taking_means_false(channel):
    """While one handed connection waits, nobody is idle: the next one is refused and stays."""
    pairs = [client_pair() for _ in range(2)]
    try:
        assert handoff.send(channel, pairs[0][1], b"", ("", ""), 0, 0.0)
        assert channel.queued()
        assert not handoff.send(channel, pairs[1][1], b"", ("", ""), 0, 0.0)
        assert not handoff.settle(channel, 0.01)
        handoff.receive(channel).sock.close()
        assert handoff.settle(channel, 0.01)
        pairs[1][0].sendall(b"x")  # still ours, still open
        assert pairs[1][1].recv(1) == b"x"
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_eagain_when_the_queue_is_full(channel, monkeypatch):
    """With the queue check out of the way, the kernel's EAGAIN is still a plain False."""
    monkeypatch.setattr(Channel, "queued", lambda self: False)
    client, server = client_pair()
    with client, server:
        sent = 0
        while handoff.send(channel, server, b"", ("", ""), 0, 0.0):
            sent += 1
            assert sent < 100_000
        assert sent >= 1


def test_offer_outcomes_and_rescue(channel):
    """Nobody listening: QUEUED, then KEPT for the next; an exiting worker takes it back."""
    pairs = [client_pair() for _ in range(2)]
    try:
        assert handoff.offer(channel, pairs[0][1], b"q", ("", ""), 0, 0.0,
                             wait=0.01) is handoff.Outcome.QUEUED
        assert handoff.offer(channel, pairs[1][1], b"", ("", ""), 0, 0.0,
                             wait=0.01) is handoff.Outcome.KEPT
        pairs[0][1].close()
        rescued = handoff.rescue(channel, 0.01)
        assert [h.pending for h in rescued] == [b"q"]
        with rescued[0].sock as sock:
            pairs[0][0].sendall(b"still there")
            time.sleep(0.02)
            assert sock.recv(100) == b"still there"
        assert handoff.rescue(channel, 0.01) == []
    finally:
        for a, b in pairs:
            a.close()
            b.close()


def test_offer_taken_by_another_process(channel):
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # an idle worker: waits in epoll with EPOLLEXCLUSIVE, takes one, says so
        code = 1
        try:
            import select
            poller = select.epoll()
            poller.register(channel.fileno(), select.EPOLLIN | select.EPOLLEXCLUSIVE)
            os.write(ready_w, b"r")
            if poller.poll(5):
                handed = handoff.receive(channel)
                handed.sock.sendall(b"adopted")
                code = 0
        finally:
            os._exit(code)
    client, server = client_pair()
    with client:
        assert os.read(ready_r, 1) == b"r"
        time.sleep(0.05)  # the child is in epoll_wait
        outcome = handoff.offer(channel, server, b"", ("", ""), 0, time.monotonic(), wait=2)
        server.close()
        assert outcome is handoff.Outcome.TAKEN
        client.settimeout(5)
        assert client.recv(100) == b"adopted"
    _, status = os.waitpid(pid, 0)
    os.close(ready_r)
    os.close(ready_w)
    assert os.waitstatus_to_exitcode(status) == 0


def test_empty_channel_gives_none(channel):
    assert handoff.receive(channel) is None


@pytest.mark.parametrize("make", [
    "bad_magic", "two_fds", "no_fd", "pipe", "datagram_socket", "too_long", "short",
])
def test_malformed_messages_leak_nothing(channel, make):
    good = handoff.encode(b"abc", ("h", "1"), 1, 0.0)
    peer, mine = socket.socketpair()
    other_stream, other_dgram = socket.socketpair(), socket.socketpair(socket.AF_UNIX,
                                                                         socket.SOCK_DGRAM)
    pipe_r, pipe_w = os.pipe()
    data, fds = {
        "bad_magic": (b"XXXX" + good[4:], [mine.fileno()]),
        "two_fds": (good, [mine.fileno(), other_stream[0].fileno()]),
        "no_fd": (good, []),
        "pipe": (good, [pipe_r]),
        "datagram_socket": (good, [other_dgram[0].fileno()]),
        "too_long": (good + b"y" * handoff.MAX_MESSAGE, [mine.fileno()]),
        "short": (good[:5], [mine.fileno()]),
    }[make]
    before = open_fds()
    raw_send(channel, data, fds)
    assert handoff.receive(channel) is None
    assert not channel.queued()
    assert open_fds() == before  # nothing received was left open
    mine.close()
    for sock in (*other_stream, *other_dgram):
        sock.close()
    os.close(pipe_r)
    os.close(pipe_w)
    peer.settimeout(1)
    assert peer.recv(1) == b""  # every copy of the passed socket is closed
    peer.close()


def test_encode_decode_round_trip():
    message = handoff.encode(b"\x00\xffbody", ("::1", "80"), 2, 1.25, 9)
    assert handoff.decode(message) == (b"\x00\xffbody", ("::1", "80"), 2, 1.25, 9)
    assert handoff.decode(message[:-1]) is None
    assert handoff.decode(message + b"x") is None
    assert handoff.encode(b"", ("h" * 256, "1"), 0, 0.0) is None


def test_channel_survives_an_exec_handover():
    ch = Channel.create()
    try:
        ch.set_inheritable(True)
        environ = dict(ch.environ())
        assert os.get_inheritable(ch.fileno())
        again = Channel.inherit(environ)
        assert handoff.ENV_HANDOFF_FDS not in environ
        assert again.fileno() == ch.fileno()
        assert not os.get_inheritable(again.fileno())
        assert Channel.inherit({}) is None
        client, server = client_pair()
        with client, server:
            assert handoff.send(again, server, b"p", ("a", "1"), 0, 0.0)
            handoff.receive(ch).sock.close()
        again.receiving.detach()
        again.sending.detach()
    finally:
        ch.close()


# -- policy --------------------------------------------------------------------------------
@pytest.mark.parametrize(("delay", "free", "busy_for", "waiting", "exiting", "expected"), [
    (0.0, 0, 9.0, True, False, None),         # handoff_delay = 0: off
    (0.0, 0, 0.0, True, True, None),          # ... even when exiting
    (0.005, 0, 0.010, True, False, Why.BUSY),
    (0.005, 0, 0.001, True, False, None),     # not busy long enough yet
    (0.005, 1, 1.0, True, False, None),       # a free thread will serve it
    (0.005, 0, 1.0, False, False, None),      # nothing waits
    (0.005, 3, 0.0, False, True, Why.EXIT),
])
def test_give_away(delay, free, busy_for, waiting, exiting, expected):
    assert handoff.give_away(delay, free, busy_for, waiting, exiting) is expected


def cand(**fields) -> Candidate:
    base = {"waiting": True, "dispatched": False, "tls": False, "hops": 0, "pending": 0}
    return Candidate(**{**base, **fields})


@pytest.mark.parametrize(("candidate", "why", "expected"), [
    (cand(), Why.BUSY, True),
    (cand(waiting=False), Why.BUSY, False),        # nothing to gain
    (cand(waiting=False), Why.EXIT, True),         # exiting: idle ones go too
    (cand(dispatched=True), Why.BUSY, False),      # never a dispatched request
    (cand(dispatched=True), Why.EXIT, False),
    (cand(tls=True), Why.BUSY, False),             # TLS state lives in this worker
    (cand(tls=True), Why.EXIT, False),
    (cand(hops=handoff.HOP_LIMIT), Why.BUSY, False),
    (cand(hops=handoff.HOP_LIMIT - 1), Why.BUSY, True),
    (cand(pending=handoff.MAX_PENDING + 1), Why.EXIT, False),
    (cand(settled=False), Why.BUSY, False),        # mid-body, mid-PROXY header
])
def test_eligible(candidate, why, expected):
    assert handoff.eligible(candidate, why) is expected


def test_choose_puts_waiting_first_and_filters():
    items = [("idle", cand(waiting=False)), ("tls", cand(tls=True)), ("w1", cand()),
             ("busy", cand(dispatched=True)), ("w2", cand())]
    assert handoff.choose(items, Why.BUSY) == ["w1", "w2"]
    assert handoff.choose(items, Why.EXIT) == ["w1", "w2", "idle"]


@pytest.mark.parametrize(("delay", "free", "stopping", "retiring", "expected"), [
    (0.005, 1, False, False, True),
    (0.0, 1, False, False, False),
    (0.005, 0, False, False, False),   # at capacity: let an idle worker take it
    (0.005, 1, True, False, False),    # never into a leaving worker
    (0.005, 1, False, True, False),
])
def test_receiving(delay, free, stopping, retiring, expected):
    assert handoff.receiving(delay, free, stopping, retiring) is expected


# -- the watcher ---------------------------------------------------------------------------
class FakeReactor(handoff.Inline):
    """The reactor's side of the watcher protocol (as ``worker.Requests`` and ``_process`` do
    it), with parked connections as real socketpairs; ``give`` records instead of sending."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.pairs = [socket.socketpair() for _ in range(count)]
        self.parked = [server for _, server in self.pairs]
        self.given: list[tuple[socket.socket, float]] = []
        self.calls = 0
        self.watcher: handoff.Watcher | None = None

    def parked_conns(self):
        self.calls += 1
        return list(self.parked)

    def give(self, conn, seen_at) -> bool:
        self.given.append((conn, seen_at))
        return True

    def watch(self, delay: float, give=None, parked=None, **options) -> handoff.Watcher:
        self.watcher = handoff.Watcher(delay, self, parked or self.parked_conns,
                                       give or self.give, lambda s: s.fileno(), **options)
        self.watcher.start()
        return self.watcher

    def begin(self, now: float | None = None) -> None:
        self.app_since = time.monotonic() if now is None else now
        self.count += 1
        if self.dozing:
            self.watcher.wake()

    def end(self) -> list:
        self.app_since = 0.0
        return self.watcher.collect() if self.giving else []

    def requests_for(self, seconds: float, each: float) -> None:
        """Back-to-back requests of ``each`` seconds for ``seconds``."""
        end_at = time.monotonic() + seconds
        while time.monotonic() < end_at:
            self.begin()
            time.sleep(each)
            self.end()

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        for a, b in self.pairs:
            a.close()
            b.close()


@pytest.fixture
def reactor():
    r = FakeReactor(3)
    yield r
    r.close()


def wait_until(condition, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.002)


def test_watcher_hands_off_only_waiting_connections_after_the_delay(reactor):
    reactor.watch(0.1, quiet_after=0.05)
    reactor.pairs[1][0].sendall(b"GET / HTTP/1.1\r\n")  # a request waits on conn 1
    began = time.monotonic()
    reactor.begin(began)
    time.sleep(0.05)
    assert reactor.given == []  # not before handoff_delay
    wait_until(lambda: reactor.given)
    assert reactor.end() == [reactor.parked[1]]
    assert [conn for conn, _ in reactor.given] == [reactor.parked[1]]
    assert reactor.given[0][1] >= began + 0.1
    assert not reactor.giving  # collected


def test_watcher_does_nothing_for_fast_requests(reactor):
    reactor.watch(0.05, quiet_after=0.05)
    reactor.pairs[0][0].sendall(b"x")
    for _ in range(20):
        reactor.begin()
        time.sleep(0.001)
        assert reactor.end() == []
    time.sleep(0.15)  # after the last request ended nothing runs: nothing to hand off
    assert reactor.given == []
    assert reactor.calls == 0
    assert not reactor.giving


def test_watcher_dozes_through_a_quiet_spell_and_wakes_for_a_request(reactor):
    watcher = reactor.watch(0.02, quiet_after=0.05)
    wait_until(lambda: reactor.dozing)
    assert reactor.dozing  # no request for quiet_after: it sleeps on its event
    reactor.pairs[2][0].sendall(b"x")
    reactor.begin()  # wakes it
    wait_until(lambda: reactor.given)
    assert reactor.end() == [reactor.parked[2]]
    assert not reactor.dozing
    assert watcher._thread.is_alive()


def counted_waits(reactor: FakeReactor, delay: float) -> list[float | None]:
    """Start a watcher that gives nothing away; the list fills with each wait's timeout."""
    waits: list[float | None] = []
    watcher = handoff.Watcher(delay, reactor, list, lambda conn, seen: False, lambda conn: -1)
    real_wait = watcher._wake.wait

    def counting_wait(timeout=None):
        waits.append(timeout)
        return real_wait(timeout)

    watcher._wake.wait = counting_wait
    reactor.watcher = watcher
    watcher.start()
    return waits


def test_a_late_wake_does_not_make_the_watcher_spin(reactor):
    """A wake() that comes after the doze it was meant for ended (the reactor read ``dozing``
    just before the watcher cleared it) must not leave the event set for every next wait."""
    waits = counted_waits(reactor, 0.002)
    reactor.requests_for(0.05, 0.0002)  # the watcher is awake, in its timed waits
    reactor.watcher.wake()  # the late wake
    time.sleep(0.2)  # fast requests no more; quiet_after (0.25 s) not yet passed
    assert len(waits) < 40  # a spin would be thousands


def test_collect_waits_for_a_handoff_in_progress(reactor):
    """The reactor and the watcher never both hold a connection: once the app has returned,
    the reactor sees ``giving`` and collect() returns only once the watcher's give() has
    finished, with what it gave."""
    inside = threading.Event()
    release = threading.Event()

    def slow_give(conn, seen_at):
        inside.set()
        release.wait(2)
        return True

    reactor.pairs[0][0].sendall(b"x")
    reactor.watch(0.01, give=slow_give)
    try:
        reactor.begin()
        assert inside.wait(2)
        result: list = []
        ender = threading.Thread(target=lambda: result.append(reactor.end()))
        ender.start()
        time.sleep(0.05)
        assert result == []  # still giving: the reactor waits
        release.set()
        ender.join(2)
        assert result[0] == [reactor.parked[0]]
    finally:
        release.set()


def test_watcher_hands_off_through_a_real_channel(channel, reactor):
    """End to end in one process: a waiting connection travels, its pending bytes with it."""
    client, server = client_pair()

    def give(conn, seen_at):
        if not handoff.send(channel, conn, b"", ("127.0.0.1", "1"), 0, seen_at):
            return False
        handoff.settle(channel, handoff.SETTLE_SLOW)
        return True

    reactor.watch(0.01, give=give, parked=lambda: [server])
    try:
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.02)
        reactor.begin()
        wait_until(channel.queued)
        assert reactor.end() == [server]
        server.close()
        handed = handoff.receive(channel)
        with handed.sock:
            time.sleep(0.01)
            assert handed.sock.recv(100) == b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    finally:
        client.close()


def test_the_watcher_looks_less_often_while_every_request_is_fast(reactor):
    """A fast load must not wake the watcher every handoff_delay (it would take the GIL from
    the serving thread hundreds of times a second); a slow request brings it back."""
    waits = counted_waits(reactor, 0.002)
    reactor.requests_for(0.4, 0.0002)  # back-to-back requests of about 0.2 ms each
    reactor.watcher.stop()
    assert max(t for t in waits if t is not None) >= handoff.BACKOFF * 0.002 * 0.99
    assert len(waits) < 0.4 / 0.002 / 2  # far fewer than one wake per delay


def test_the_watcher_backs_off_further_only_while_no_request_is_slow(reactor):
    """While it has seen no slow request (BACKOFF delays old) for SLOW_MEMORY, the wait grows
    to QUIET_BACKOFF delays; a slow request seen caps it at BACKOFF again, so the next slow
    request is caught soon."""
    delay = 0.002
    waits = counted_waits(reactor, delay)
    reactor.requests_for(1.2, 0.0002)  # fast only: the quiet ceiling
    quiet = [t for t in waits if t is not None]
    assert max(quiet) > handoff.BACKOFF * delay * 1.5
    assert max(quiet) <= handoff.QUIET_BACKOFF * delay + 1e-9
    reactor.requests_for(0.4, 0.15)  # slow: each outlives the longest wait, so it is seen
    assert reactor.watcher.slow_at > 0
    waits.clear()
    reactor.requests_for(0.3, 0.0002)  # fast again, within SLOW_MEMORY of the slow ones
    later = [t for t in waits if t is not None]
    assert later and max(later) <= handoff.BACKOFF * delay + 1e-9
