"""A worker's side of refork (issue 17): promoted by the master, it forks the mold.

The mold is a copy of this warm worker that serves nothing: it drops what belongs to the
worker's clients and loop, keeps the listeners and the handoff channel, and forks new workers
on the master's orders (``forkserver.mold``). Each of those becomes a worker with the app this
one has already loaded and warmed.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from forkserver import mold

# The worker's Worker (typed Any: this module is imported by worker.py).
Worker = Any


def promote(worker: Worker, run: Any) -> None:
    """Fork the mold from ``worker`` (the master asked with ``mold.PROMOTE_SIGNAL``). A
    failure is logged; the worker keeps serving either way. ``run`` is ``worker.run``."""
    spec = worker.spec
    if spec.mold_link is None or worker.stopping:
        return
    app = worker.requests.app

    def become(order: mold.Order) -> None:
        run(dataclasses.replace(spec, index=order.index, max_requests=order.max_requests,
                                title=order.title, load_app=lambda: app))

    settings = spec.settings
    template = mold.Template(
        spec.mold_link, spec.generation, spec.master_pid,
        f"{settings.proc_name}: mold [{settings.app}]", lambda: drop(worker), become,
        settings.gc_freeze)
    try:
        pid = mold.fork_mold(template)
    except OSError as error:
        worker.log.error("worker %d could not fork a mold: %s", os.getpid(), error)
        return
    worker.log.info("worker %d forked mold %d", os.getpid(), pid)


def drop(worker: Worker) -> None:
    """In the mold: close what is the worker's alone (client connections, epoll, the wakeup
    pipe, the thread pool's pipe; threads do not survive a fork); keep the listeners and the
    handoff channel, which the workers forked from here serve on."""
    for conn in worker.conns.values():
        try:
            conn.sock.close()  # no TLS close_notify: the session is the worker's
        except OSError:
            pass
    worker.conns.clear()
    worker.idle.clear()
    if worker.handing is not None:
        worker.handing.forget()
    if worker.lending is not None:
        worker.lending.forget()
        worker.lending = None
    worker.epoll.close()
    for fd in (worker.wake_r, worker.wake_w):
        try:
            os.close(fd)
        except OSError:
            pass
