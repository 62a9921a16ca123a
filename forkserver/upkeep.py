"""What a worker's loop does besides serving connections: act on the signals its handlers
recorded, the once-a-second housekeeping (heartbeat, orphan check, resuming accepts), and the
start of a graceful stop."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from forkserver import logs, mold, promotion
from forkserver.scoreboard import Reason, State

# The worker's Worker (typed Any: this module is imported by worker.py).
Worker = Any


def begin_stop(worker: Worker, reason: Reason, idle_grace: float) -> None:
    """Stop gracefully: no more accepting (what waits in the backlog is served), idle
    connections offered to other workers, finish what was received, then exit."""
    if worker.stopping:
        return
    worker.stopping = worker.requests.retiring = True
    now = time.monotonic()
    settings = worker.settings
    worker.stop_deadline = now + settings.graceful_timeout
    worker.slot.set_state(State.EXITING, reason)
    worker.listeners.close_all()
    if worker.handing is not None:
        worker.handing.leave()
    # Idle keep-alive connections get a short grace: a client about to reuse one gets its
    # answer (with Connection: close) instead of a close under its request.
    grace = now + min(settings.keepalive, idle_grace)
    for conn in worker.idle.values():
        conn.deadline = min(conn.deadline, grace)
    worker.next_deadline = min(worker.next_deadline, grace)


def handle_signals(worker: Worker, run: Any) -> None:
    """Act on each recorded signal, in arrival order. ``run`` is ``worker.run`` (a promoted
    worker's mold starts new workers with it)."""
    pending = worker.pending_signals
    while pending:
        signum = pending.popleft()
        if signum == signal.SIGTERM:
            worker.begin_stop()
        elif signum in (signal.SIGINT, signal.SIGQUIT):
            worker.quick_exit = True
        elif signum == signal.SIGUSR1:
            logs.reopen()
        elif signum == signal.SIGWINCH:
            # The master's shutdown_delay: serve and accept on (a load balancer sends
            # traffic until it notices), but every next response closes its connection
            # (an idle one is not closed under a request its client may be sending).
            worker.requests.retiring = True
            if worker.handing is not None:
                worker.handing.sync()
        elif signum == mold.PROMOTE_SIGNAL:
            promotion.promote(worker, run)


def housekeeping(worker: Worker, guard_std_fds: Any) -> None:
    worker.slot.heartbeat()
    guard_std_fds()  # an app may have closed 0-2; log writers must not hit its files
    if os.getppid() != worker.spec.master_pid and not worker.stopping:
        # Nobody supervises us any more: finish what clients already sent, then go.
        worker.log.warning("worker %d: master is gone; exiting", os.getpid())
        worker.begin_stop()
    worker.slot.set_connections(len(worker.conns))
    if worker.lending is not None:
        worker.lending.check_stuck(time.monotonic())
    if worker.handing is not None:
        worker.handing.sync()  # (stops taking connections once the worker retires)
    if not worker.listeners.accepting and not worker.stopping and \
            len(worker.conns) < worker.settings.worker_connections:
        worker.listeners.on()  # resume after an accept failure paused us
