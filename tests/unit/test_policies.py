"""The master's supervision policies and state tables as plain data: no fork, no signal, no clock.

Each policy of forkserver.supervision maps (worker record, scoreboard slot, settings, now) to the
actions due and the moment the worker next needs a look; the tests below pin both.
"""

from __future__ import annotations

import signal
import socket
import ssl
import tempfile

import pytest

from forkserver import config, generations, handoff, mold, pool, supervision
from forkserver.generations import Generations, TransitionError
from forkserver.master import (
    STOP_MOVES,
    STOP_READINESS,
    Master,
    StopMode,
    _prepare_generation,
    _refork_refusal,
)
from forkserver.pool import (
    TRANSITIONS,
    Blueprint,
    Phase,
    PhaseError,
    Pool,
    WorkerRecord,
    log_fields,
    worker_spec,
    workers_text,
)
from forkserver.scoreboard import Reason, SlotView, State
from forkserver.supervision import (
    BOOT_POLL,
    NEVER,
    SILENCE_FLOOR,
    Act,
    BootOutcome,
    after_boot_failure,
    escalation,
    overslept,
    quiet_period,
    readiness,
    recycle_paced,
    recycling,
    supervise,
    timeouts,
)

T0 = 1000.0  # a worker's fork time on the monotonic clock


def make_settings(**overrides):
    """Real Settings (defaults plus ``overrides``), read from an empty directory."""
    with tempfile.TemporaryDirectory() as empty:
        return config.resolve(overrides, None, {}, empty)


DEFAULTS = make_settings()


def record(phase: Phase = Phase.READY, **fields) -> WorkerRecord:
    return WorkerRecord(pid=4242, index=0, generation=1, started=T0, phase=phase, **fields)


def slot(state: State = State.IDLE, heartbeat: float = T0, request_start: float = 0.0,
         reason: Reason = Reason.NONE, line: str = "") -> SlotView:
    return SlotView(index=0, pid=4242, generation=1, state=state, reason=reason, requests=7,
                    bytes_sent=0, connections=1, booted_at=T0, heartbeat=heartbeat,
                    request_start=request_start, request_line=line, status_counts=(0,) * 5)


def acts(verdict) -> list[tuple[Act, Reason]]:
    return [(action.act, action.reason) for action in verdict.actions]


# -- readiness and boot timeout -------------------------------------------------------------
def test_a_booting_worker_is_polled_until_its_slot_leaves_booting():
    verdict = readiness(record(Phase.BOOTING), slot(State.BOOTING), DEFAULTS, T0 + 1)
    assert acts(verdict) == []
    assert verdict.wake_at == pytest.approx(T0 + 1 + BOOT_POLL)


@pytest.mark.parametrize("state", [State.IDLE, State.BUSY, State.KEEPALIVE])
def test_a_booting_worker_whose_slot_serves_is_ready(state):
    verdict = supervise(record(Phase.BOOTING), slot(state), DEFAULTS, T0 + 1)
    assert acts(verdict) == [(Act.READY, Reason.NONE)]


def test_a_worker_that_does_not_boot_in_time_is_killed():
    settings = make_settings(boot_timeout=5.0)
    before = readiness(record(Phase.BOOTING), slot(State.BOOTING), settings, T0 + 4.99)
    assert acts(before) == [] and before.wake_at <= T0 + 5.0
    after = readiness(record(Phase.BOOTING), slot(State.BOOTING), settings, T0 + 5.0)
    assert acts(after) == [(Act.KILL, Reason.TIMEOUT)]
    assert "did not boot within 5s" in after.actions[0].why


def test_the_boot_deadline_wakes_the_master_when_it_is_nearer_than_the_poll():
    settings = make_settings(boot_timeout=5.0)
    verdict = readiness(record(Phase.BOOTING), slot(State.BOOTING), settings, T0 + 4.99)
    assert verdict.wake_at == pytest.approx(T0 + 5.0)


def test_boot_timeout_zero_never_kills():
    settings = make_settings(boot_timeout=0.0)
    verdict = readiness(record(Phase.BOOTING), slot(State.BOOTING), settings, T0 + 10_000)
    assert acts(verdict) == []


def test_a_worker_told_to_go_while_booting_is_judged_by_boot_timeout_not_silence():
    """Importing a slow app is not a hang, even for a worker of an abandoned reload."""
    settings = make_settings(timeout=1.0, boot_timeout=60.0)
    retiring = record(Phase.RETIRING, reason=Reason.RELOAD)
    assert acts(supervise(retiring, slot(State.BOOTING), settings, T0 + 30)) == []
    assert acts(supervise(retiring, slot(State.BOOTING), settings, T0 + 60)) == \
        [(Act.KILL, Reason.TIMEOUT)]


# -- request timeout and silence (issue 10, item 7) -------------------------------------------
def test_a_request_past_the_timeout_is_aborted_with_its_line():
    settings = make_settings(timeout=2.0)
    busy = slot(State.BUSY, heartbeat=T0, request_start=T0, line="GET /hang")
    verdict = timeouts(busy, settings, T0 + 2.5)
    assert acts(verdict) == [(Act.ABORT, Reason.TIMEOUT)]
    assert verdict.actions[0].why == "timed out after 2.5s serving 'GET /hang'"


def test_a_request_within_the_timeout_wakes_the_master_at_its_deadline():
    settings = make_settings(timeout=30.0)
    busy = slot(State.BUSY, heartbeat=T0, request_start=T0)
    verdict = timeouts(busy, settings, T0 + 10)
    assert acts(verdict) == [] and verdict.wake_at == T0 + 30


@pytest.mark.parametrize("state", [State.IDLE, State.KEEPALIVE, State.EXITING])
def test_a_silent_worker_is_aborted_in_any_state(state):
    """A SIGSTOPped or wedged worker holds its keep-alive clients whatever its slot says."""
    settings = make_settings(timeout=10.0)
    verdict = supervise(record(), slot(state, heartbeat=T0), settings, T0 + 10)
    assert acts(verdict) == [(Act.ABORT, Reason.TIMEOUT)]
    assert f"gave no sign of life for 10.0s while {state.name.lower()}" in \
        verdict.actions[0].why


def test_a_beating_idle_worker_is_left_alone_and_looked_at_when_it_could_go_silent():
    settings = make_settings(timeout=10.0)
    verdict = supervise(record(), slot(State.IDLE, heartbeat=T0 + 9), settings, T0 + 10)
    assert acts(verdict) == [] and verdict.wake_at == T0 + 19


def test_silence_is_never_judged_below_a_few_heartbeats():
    """The idle loop beats every HEARTBEAT_EVERY; a short request timeout must not turn a
    worker between two beats into a hang."""
    settings = make_settings(timeout=0.5)
    beat = T0 + 100
    assert supervision.silence_limit(0.5) == SILENCE_FLOOR
    quiet = supervise(record(), slot(State.IDLE, heartbeat=beat), settings, beat + 2.0)
    assert acts(quiet) == [] and quiet.wake_at == beat + SILENCE_FLOOR
    silent = supervise(record(), slot(State.IDLE, heartbeat=beat), settings, beat + SILENCE_FLOOR)
    assert acts(silent) == [(Act.ABORT, Reason.TIMEOUT)]


def test_timeout_zero_disables_both_rules():
    settings = make_settings(timeout=0.0)
    busy = slot(State.BUSY, heartbeat=T0, request_start=T0)
    verdict = supervise(record(), busy, settings, T0 + 10_000)
    assert acts(verdict) == [] and verdict.wake_at == NEVER


def test_after_an_oversleep_silence_waits_but_a_long_request_does_not():
    settings = make_settings(timeout=5.0)
    woke = T0 + 60  # the whole process group was stopped for a minute
    quiet_until = quiet_period(woke)
    idle = supervise(record(), slot(State.IDLE, heartbeat=T0), settings, woke,
                     quiet_until=quiet_until)
    assert acts(idle) == [] and idle.wake_at == quiet_until
    busy = slot(State.BUSY, heartbeat=T0, request_start=T0)
    assert acts(supervise(record(), busy, settings, woke, quiet_until=quiet_until)) == \
        [(Act.ABORT, Reason.TIMEOUT)]


def test_oversleep_detection():
    assert not overslept(NEVER, T0)
    assert not overslept(T0, T0 + 0.1)
    assert overslept(T0, T0 + 2)


@pytest.mark.parametrize("phase", [Phase.READY, Phase.RECYCLING, Phase.RETIRING])
def test_serving_and_draining_workers_are_judged(phase):
    settings = make_settings(timeout=5.0)
    verdict = supervise(record(phase), slot(State.IDLE, heartbeat=T0), settings, T0 + 6)
    assert acts(verdict) == [(Act.ABORT, Reason.TIMEOUT)]


def test_an_aborting_worker_is_not_aborted_again_only_killed_at_its_time():
    settings = make_settings(timeout=5.0)
    aborting = record(Phase.ABORTING, reason=Reason.TIMEOUT, kill_at=T0 + 11)
    stale = slot(State.IDLE, heartbeat=T0)
    waiting = supervise(aborting, stale, settings, T0 + 10)
    assert acts(waiting) == [] and waiting.wake_at == T0 + 11
    assert acts(supervise(aborting, stale, settings, T0 + 11)) == [(Act.KILL, Reason.TIMEOUT)]


def test_a_killed_worker_only_waits_for_its_reap():
    killed = record(Phase.KILLED, kill_at=T0)
    verdict = supervise(killed, slot(State.IDLE, heartbeat=T0), DEFAULTS, T0 + 1000)
    assert acts(verdict) == [] and verdict.wake_at == NEVER


def test_a_worker_without_a_slot_is_only_escalated():
    """Adopted after a USR2: its slot is in the previous image's scoreboard."""
    adopted = record(Phase.RETIRING, reason=Reason.SHUTDOWN, kill_at=T0 + 30)
    assert supervise(adopted, None, DEFAULTS, T0 + 10).wake_at == T0 + 30
    assert acts(supervise(adopted, None, DEFAULTS, T0 + 30)) == [(Act.KILL, Reason.SHUTDOWN)]


def test_escalation_is_one_rule_for_every_way_out():
    for reason in (Reason.TIMEOUT, Reason.SHUTDOWN, Reason.RELOAD):
        leaving = record(Phase.RETIRING, reason=reason, kill_at=T0 + 1)
        assert acts(escalation(leaving, T0 + 1)) == [(Act.KILL, reason)]
    assert escalation(record(Phase.RETIRING, reason=Reason.RELOAD), T0 + 1000).wake_at == NEVER


# -- recycling --------------------------------------------------------------------------------
def test_a_worker_that_asked_to_be_replaced_is_recycled():
    asked = slot(State.IDLE, heartbeat=T0 + 1, reason=Reason.REQUESTS)
    assert acts(recycling(record(), asked, DEFAULTS, T0 + 1)) == [(Act.RECYCLE, Reason.REQUESTS)]
    exiting = slot(State.EXITING, heartbeat=T0 + 1, reason=Reason.SHUTDOWN)
    assert acts(recycling(record(), exiting, DEFAULTS, T0 + 1)) == []


def test_with_max_requests_on_slots_are_read_for_requests_every_poll():
    """A worker's request to be replaced sits in its slot: nothing wakes the master for it."""
    assert recycling(record(), slot(), DEFAULTS, T0).wake_at == NEVER  # max_requests off
    settings = make_settings(max_requests=100)
    verdict = recycling(record(), slot(), settings, T0 + 5)
    assert acts(verdict) == [] and verdict.wake_at == T0 + 5 + supervision.REQUEST_POLL


def test_lifetime_recycles_and_its_deadline_wakes_the_master():
    settings = make_settings(max_worker_lifetime=60.0)
    young = recycling(record(), slot(heartbeat=T0 + 30), settings, T0 + 30)
    assert acts(young) == [] and young.wake_at == T0 + 60
    old = recycling(record(), slot(heartbeat=T0 + 60), settings, T0 + 60)
    assert acts(old) == [(Act.RECYCLE, Reason.LIFETIME)]


def test_memory_recycles_only_on_a_sampled_pass_over_the_limit():
    settings = make_settings(max_worker_memory=100)
    mib = 1024 * 1024
    assert acts(recycling(record(), slot(), settings, T0, None)) == []
    assert acts(recycling(record(), slot(), settings, T0, 100 * mib)) == []
    over = recycling(record(), slot(), settings, T0, 150 * mib)
    assert acts(over) == [(Act.RECYCLE, Reason.MEMORY)]
    assert over.actions[0].why == "uses 150.0 MiB of its own memory (USS; limit 100 MiB)"


def test_only_a_ready_worker_is_recycled():
    settings = make_settings(max_worker_lifetime=1.0)
    for phase in (Phase.RECYCLING, Phase.RETIRING):
        verdict = supervise(record(phase), slot(heartbeat=T0 + 9), settings, T0 + 10)
        assert Act.RECYCLE not in [act for act, _ in acts(verdict)]


def test_master_found_recycles_are_paced_one_a_second():
    assert recycle_paced(Reason.LIFETIME, T0, T0 + 0.5) == T0 + supervision.RECYCLE_SPACING
    assert recycle_paced(Reason.MEMORY, T0, T0 + 1.0) == 0.0
    assert recycle_paced(Reason.REQUESTS, T0, T0) == 0.0  # spread by max_requests_jitter


def test_the_verdict_wakes_at_the_nearest_deadline_of_every_rule():
    settings = make_settings(timeout=30.0, max_worker_lifetime=20.0)
    busy = slot(State.BUSY, heartbeat=T0 + 5, request_start=T0 + 5)
    verdict = supervise(record(), busy, settings, T0 + 6)
    assert acts(verdict) == [] and verdict.wake_at == T0 + 20


# -- boot failures ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, outcome",
    [
        ({"current": False, "stopping": False, "reloading": False, "ever_ready": True},
         BootOutcome.IGNORE),
        ({"current": True, "stopping": True, "reloading": False, "ever_ready": True},
         BootOutcome.IGNORE),
        ({"current": True, "stopping": False, "reloading": True, "ever_ready": True},
         BootOutcome.ABANDON),
        ({"current": True, "stopping": False, "reloading": False, "ever_ready": False},
         BootOutcome.HALT),
        ({"current": True, "stopping": False, "reloading": False, "ever_ready": True},
         BootOutcome.RETRY),
    ],
)
def test_what_a_boot_failure_means(flags, outcome):
    assert after_boot_failure(1, **flags)[0] is outcome


def test_boot_back_off_doubles_up_to_its_cap():
    delays = [after_boot_failure(n, current=True, stopping=False, reloading=False,
                                 ever_ready=True)[1] for n in range(1, 8)]
    assert delays == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]


# -- the state tables -------------------------------------------------------------------------
def test_every_phase_has_a_row_and_an_unlisted_move_raises():
    assert set(TRANSITIONS) == set(Phase)
    worker = record(Phase.KILLED)
    with pytest.raises(PhaseError):
        worker.move(Phase.READY)
    booting = record(Phase.BOOTING)
    with pytest.raises(PhaseError):
        booting.move(Phase.ABORTING)  # a booting worker is judged by boot_timeout: KILLED
    booting.move(Phase.READY)
    assert booting.phase is Phase.READY


def test_stop_modes_only_get_harder():
    assert set(STOP_MOVES) == set(StopMode) == set(STOP_READINESS)
    assert StopMode.RUNNING not in set().union(*STOP_MOVES.values())
    assert STOP_MOVES[StopMode.QUICK] == frozenset()
    # The shutdown delay sits between running and the drain; INT/QUIT may cut it short.
    assert STOP_MOVES[StopMode.DELAYING] == {StopMode.GRACEFUL, StopMode.QUICK}
    assert StopMode.DELAYING not in STOP_MOVES[StopMode.GRACEFUL]
    assert STOP_READINESS[StopMode.DELAYING] == "shutting down"


def test_generation_moves_outside_the_table_raise():
    gens = Generations(DEFAULTS, None, lambda settings: None)
    assert gens.steady and not gens.reloading
    with pytest.raises(TransitionError):
        gens.exec_failed(OSError("not exec'ing"))  # no exec from STEADY
    assert all(isinstance(stage, generations.Stage) for stage in generations.TABLE.values())


def test_the_usr2_handover_environment_round_trips():
    env = generations.handover_env({"PATH": "/bin"}, [3, 4], [101, 102])
    assert env["PATH"] == "/bin"
    assert {generations.ENV_INHERIT_FDS, generations.ENV_OLD_WORKERS} <= config.RESERVED_ENV
    assert generations.take_inherited_fds(env) == [3, 4]
    assert generations.take_old_workers(env) == [101, 102]
    assert generations.take_old_workers(env) == []  # taken: no child inherits the note


# -- readiness reason (for /readyz) ----------------------------------------------------------
def test_readiness_reason_follows_the_pool_and_the_stop_mode(board):
    master = Master(DEFAULTS)
    master.pool = Pool(board, 2, (signal.SIGTERM,), lambda: None)
    assert master.readiness == "no workers"
    master.pool.records[1] = record(Phase.BOOTING)
    assert master.readiness == "booting"
    master.pool.records[2] = WorkerRecord(2, 1, 1, T0, Phase.READY)
    assert master.readiness is None
    master.pool.records[2].move(Phase.RETIRING)
    assert master.readiness == "booting"
    master.stop_mode = StopMode.GRACEFUL
    assert master.readiness == "draining"
    master.stop_mode = StopMode.QUICK
    assert master.readiness == "shutting down"


# -- worker notes instead of polls -------------------------------------------------------------
def test_a_notifying_worker_is_not_polled_while_it_boots():
    """With the note pipe, the worker's byte wakes the master: only boot_timeout is a deadline."""
    booting = readiness(record(Phase.BOOTING), slot(State.BOOTING), DEFAULTS, T0 + 1,
                        notified=True)
    assert acts(booting) == [] and booting.wake_at == T0 + DEFAULTS.boot_timeout
    no_limit = make_settings(boot_timeout=0)
    assert readiness(record(Phase.BOOTING), slot(State.BOOTING), no_limit, T0 + 1,
                     notified=True).wake_at == NEVER
    ready = supervise(record(Phase.BOOTING), slot(State.IDLE), DEFAULTS, T0 + 1, notified=True)
    assert acts(ready) == [(Act.READY, Reason.NONE)]


def test_a_notifying_worker_asking_to_be_replaced_needs_no_request_poll():
    settings = make_settings(max_requests=100)
    assert recycling(record(), slot(), settings, T0 + 5, notified=True).wake_at == NEVER
    assert supervise(record(), slot(heartbeat=T0 + 5), settings, T0 + 5,
                     notified=True).wake_at > T0 + 5 + supervision.REQUEST_POLL
    asked = slot(State.IDLE, heartbeat=T0 + 5, reason=Reason.REQUESTS)
    assert acts(supervise(record(), asked, settings, T0 + 5, notified=True)) == \
        [(Act.RECYCLE, Reason.REQUESTS)]


# -- stopping -------------------------------------------------------------------------------
def stopping_master(board, **overrides) -> Master:
    master = Master(make_settings(**overrides))
    master.pool = Pool(board, 2, (signal.SIGTERM,), lambda: None)
    return master


def test_term_with_a_shutdown_delay_delays_and_a_second_term_drains(board):
    master = stopping_master(board, shutdown_delay=10.0)
    master._on_term()
    assert master.stop_mode is StopMode.DELAYING and master.serving and not master.running
    assert master.readiness == "shutting down"
    assert master._delay(master.delay_until - 1) == master.delay_until
    master._on_term()
    assert master.stop_mode is StopMode.GRACEFUL and not master.serving


def test_the_shutdown_delay_runs_out_into_the_drain_and_int_cuts_it_short(board):
    master = stopping_master(board, shutdown_delay=10.0)
    master._on_term()
    assert master._delay(master.delay_until) == NEVER
    assert master.stop_mode is StopMode.GRACEFUL
    quick = stopping_master(board, shutdown_delay=10.0)
    quick._on_term()
    quick._on_quick()
    assert quick.stop_mode is StopMode.QUICK


def test_term_without_a_shutdown_delay_drains_at_once(board):
    master = stopping_master(board)
    master._on_term()
    assert master.stop_mode is StopMode.GRACEFUL
    assert master._delay(T0) == NEVER


# -- exits while stopping (Ctrl-C reaches every worker) ---------------------------------------
@pytest.mark.parametrize(("status", "stopping", "reason"), [
    (0, True, "shutdown"),                        # exit code 0 during a stop
    (signal.SIGINT, True, "shutdown"),            # killed by the group's INT during a stop
    (signal.SIGTERM, True, "shutdown"),
    (0, False, "crash"),                          # nobody asked it to go
    (signal.SIGINT, False, "crash"),
    (1 << 8, True, "crash"),                      # exit code 1 is a failure even then
    (signal.SIGSEGV, True, "crash"),
])
def test_a_worker_stopped_with_the_server_is_not_a_crash(board, status, stopping, reason):
    pool = Pool(board, 1, (signal.SIGTERM,), lambda: None)
    board.claim(0, 0, 1)
    pool.records[4242] = record(Phase.READY, ready_at=T0)
    exit_ = pool.reaped(4242, status, stopping=stopping)
    assert not exit_.boot_failed
    assert pool.restarts == {reason: 1}


def test_a_worker_that_leaves_by_itself_with_its_reason_is_not_a_crash(board):
    """A threaded worker drains around a stuck request and exits 0 with TIMEOUT in its slot."""
    pool = Pool(board, 1, (signal.SIGTERM,), lambda: None)
    board.claim(0, 0, 1)
    board.writer(0).set_state(State.EXITING, Reason.TIMEOUT)
    pool.records[4242] = record(Phase.READY, ready_at=T0)
    pool.reaped(4242, 0)
    assert pool.restarts == {"timeout": 1}


def test_log_fields_and_counted_words():
    fields = log_fields(record(), reason=Reason.MEMORY, exit_code=None)
    assert fields == {"worker_pid": 4242, "slot": 0, "generation": 1, "reason": "memory"}
    assert workers_text(1) == "1 worker" and workers_text(2) == "2 workers"


def test_the_worker_spec_carries_what_the_master_made_for_the_generation(board):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    blueprint = Blueprint(DEFAULTS, 3, [], None, {}, None, 1, tls_context=context,
                          reload_dir="/tmp/reports", notify_fd=17)
    spec = worker_spec(blueprint, 1, board)
    assert (spec.tls_context, spec.reload_dir, spec.notify_fd) == (context, "/tmp/reports", 17)
    assert (spec.generation, spec.index) == (3, 1)
    plain = worker_spec(Blueprint(DEFAULTS, 1, [], None, {}, None, 1), 0, board)
    assert (plain.tls_context, plain.reload_dir, plain.notify_fd) == (None, None, -1)


def test_the_worker_spec_carries_the_handoff_channel_and_the_mold_link(board):
    channel = handoff.Channel.create()
    link_end, other = socket.socketpair()
    try:
        blueprint = Blueprint(DEFAULTS, 1, [], None, {}, None, 1, handoff=channel)
        spec = worker_spec(blueprint, 0, board, link_end)
        assert (spec.handoff, spec.mold_link) == (channel, link_end)
        bare = worker_spec(Blueprint(DEFAULTS, 1, [], None, {}, None, 1), 0, board)
        assert (bare.handoff, bare.mold_link) == (None, None)
    finally:
        channel.close()
        link_end.close()
        other.close()


@pytest.mark.parametrize(("delay", "given"), [(2.0, True), (0.0, False)])
def test_the_master_gives_its_one_channel_only_while_handoff_delay_is_on(delay, given):
    master = Master(make_settings(handoff_delay=delay))
    master.channel = handoff.Channel.create()
    try:
        first, second = master._blueprint(), master._blueprint()
        assert first.handoff is second.handoff  # the same channel for every generation
        assert (first.handoff is master.channel) is given
        assert given or first.handoff is None
    finally:
        master.channel.close()


@pytest.mark.parametrize(("overrides", "line"), [
    ({}, None),
    ({"refork_after": (20,), "threads": 2}, "refork_after: not with threads > 1"),
    ({"refork_after": (20,), "reload": True}, "refork_after: not with reload"),
])
def test_refork_that_cannot_run_is_refused_in_one_line(overrides, line):
    why = _refork_refusal(make_settings(**overrides))
    assert why is None if line is None else why.startswith(line)


def test_a_reload_to_refork_settings_it_cannot_serve_is_refused():
    assert _prepare_generation(DEFAULTS) is None  # no TLS: no context
    with pytest.raises(ValueError, match="refork_after: not with threads > 1"):
        _prepare_generation(make_settings(refork_after=(20,), threads=2))


# -- refork: the pool carries out the keeper's plan -----------------------------------------
class Signals:
    """What the pool sent, instead of sending it (the pids here are made up)."""

    def __init__(self, monkeypatch, target: Pool) -> None:
        self.sent: list[tuple[int, int]] = []
        monkeypatch.setattr(target, "_signal", lambda pid, signum: self.sent.append((pid,
                                                                                      signum)))


def served(board, index: int, requests: int) -> None:
    """``requests`` more answered in slot ``index`` (as its worker would count them)."""
    writer = board.writer(index)
    for _ in range(requests):
        writer.request_finished(200, 0, State.IDLE)


def refork_pool(board, monkeypatch, thresholds=(5, 50)) -> tuple[Pool, Signals]:
    keeper = mold.Keeper(thresholds)
    keeper.follow(1)
    target = Pool(board, 2, (signal.SIGTERM,), lambda: None, keeper)
    return target, Signals(monkeypatch, target)


def test_without_refork_the_pool_never_looks(board, monkeypatch):
    target = Pool(board, 2, (signal.SIGTERM,), lambda: None)
    signals = Signals(monkeypatch, target)
    target.records[11] = WorkerRecord(11, 0, 1, T0, Phase.READY)
    assert target.refork(T0) == NEVER and signals.sent == []


def test_the_warmest_worker_past_the_threshold_is_sent_the_promote_signal(board, monkeypatch):
    target, signals = refork_pool(board, monkeypatch)
    try:
        target.records[11] = WorkerRecord(11, 0, 1, T0, Phase.READY)
        target.records[12] = WorkerRecord(12, 1, 1, T0 + 1, Phase.READY)
        board.claim(0, 11, 1)
        board.claim(1, 12, 1)
        served(board, 0, 3)
        served(board, 1, 4)
        assert target.refork(T0 + 10) == T0 + 10 + mold.REQUEST_POLL  # below 5: look again
        assert signals.sent == []
        served(board, 1, 2)  # now 6
        target.refork(T0 + 11)
        assert signals.sent == [(12, mold.PROMOTE_SIGNAL)]
        assert target.keeper.stage is mold.Stage.PROMOTING
        assert all(record.phase is Phase.READY for record in target.records.values())
    finally:
        target.keeper.close()


def test_with_a_mold_the_oldest_cold_worker_is_recycled_one_at_a_time(board, monkeypatch):
    target, signals = refork_pool(board, monkeypatch)
    master_end, mold_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    keeper = target.keeper
    try:
        # As after the hello of mold 900 forked from worker 12 (keeper.receive does this).
        keeper.client, keeper.template = mold.MoldClient(900, 1, master_end), 12
        keeper.stage, keeper.level = mold.Stage.MOLDED, 1
        target.records[11] = WorkerRecord(11, 0, 1, T0, Phase.READY)
        target.records[12] = WorkerRecord(12, 1, 1, T0 + 1, Phase.READY)
        target.records[13] = WorkerRecord(13, 2, 1, T0 + 2, Phase.READY, mold=900)
        assert target.refork(T0 + 10) == T0 + 10
        assert target.records[11].phase is Phase.RECYCLING
        assert target.records[11].reason is mold.REASON
        assert target.refork(T0 + 11) > T0 + 11  # one at a time: 11 waits for its successor
        assert target.records[12].phase is Phase.READY
        assert signals.sent == []  # recycling is the retire path's job, once all are ready
    finally:
        keeper.close()
        mold_end.close()


def test_spawns_go_to_the_master_without_a_mold_of_the_generation(board, monkeypatch):
    target, signals = refork_pool(board, monkeypatch)
    try:
        spec = worker_spec(Blueprint(DEFAULTS, 1, [], None, {}, None, 1), 0, board,
                           target.keeper.worker_link)
        assert spec.mold_link is target.keeper.worker_link is not None
        assert target._spawn_from_mold(spec) is False
        assert target.records == {} and signals.sent == []
    finally:
        target.keeper.close()


def test_a_record_remembers_the_mold_it_came_from():
    assert WorkerRecord(1, 0, 1, T0).mold == 0
    assert mold.Seat.of(WorkerRecord(1, 0, 1, T0, Phase.READY, mold=77), 5) == \
        mold.Seat(1, 1, T0, "ready", 5, 77)
    assert pool.mold is mold


def test_a_forked_worker_drops_the_metrics_listener_but_leaves_the_masters_socket(tmp_path):
    """A worker must not hold the master's metrics listener: the image a USR2 execs binds the
    same address again."""
    from forkserver import outputs
    path = tmp_path / "metrics.sock"
    outs = outputs.Outputs()
    outs.open(make_settings(metrics_bind=f"unix:{path}"), lambda: None)
    listener = outs.listener[0]
    try:
        assert outs.fds()[0] == [listener.fileno()]
        outs.in_child()
        assert listener.fileno() == -1 and outs.fds() == ([], [])
        assert path.exists()  # the path is the master's to remove
    finally:
        outs.close()
        path.unlink(missing_ok=True)
