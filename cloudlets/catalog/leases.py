"""Leases of renders in flight: who owns a render, whether that owner is
still alive, and the heartbeat that renews its lease.

A render in flight holds a *lease* that a heartbeat thread renews. A row
whose owner process is gone (same host, the pid no longer runs the same
process) or whose lease expired is *stale*: the next claim marks it failed
(``OwnerLost``) and renders again.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator

from cloudlets.catalog.records import CatalogEntry
from cloudlets.errors import CloudletsError
from cloudlets.processes import own_token, process_alive, process_token

__all__ = ["HOST", "keep_lease", "own_token", "process_alive", "process_token", "stale_reason"]

#: This host's name, recorded as the owner host of a claim.
HOST = socket.gethostname()


def stale_reason(entry: CatalogEntry, now: float) -> str | None:
    """Why a render in flight is abandoned, or ``None`` while its owner
    lives and renews its lease."""
    who = f"pid {entry.owner_pid} on {entry.owner_host}"
    if entry.owner_host == HOST and entry.owner_pid is not None \
            and not process_alive(entry.owner_pid, entry.owner_token):
        return f"interrupted: the rendering process ({who}) is gone"
    if entry.lease_expires is None or entry.lease_expires < now:
        return f"interrupted: the rendering process ({who}) stopped renewing its lease"
    return None


@contextlib.contextmanager
def keep_lease(renew: Callable[[], bool], interval: float, *, name: str) -> Iterator[None]:
    """Renew a lease every ``interval`` seconds on a thread while the body
    runs.

    :param renew: renews the lease; returns ``False`` once the entry is no
        longer in flight (the thread then stops). A busy database is tried
        again at the next beat.
    :param interval: seconds between renewals.
    :param name: the thread's name.
    """
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                if not renew():
                    return
            except CloudletsError:
                continue

    thread = threading.Thread(target=beat, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
