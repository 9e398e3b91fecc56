"""Telling a live process from a dead one or a reused pid on this host:
what a lease's owner (:mod:`cloudlets.catalog.leases`) and a render's work
directory (:mod:`cloudlets.renderer`) record."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["own_token", "process_alive", "process_token"]

_OWN_TOKEN: tuple[int, str | None] | None = None


def own_token() -> tuple[int, str | None]:
    """:returns: this process's pid and :func:`process_token`, read once per
    process (a forked child reads its own): what every claim records."""
    global _OWN_TOKEN
    pid = os.getpid()
    if _OWN_TOKEN is None or _OWN_TOKEN[0] != pid:
        _OWN_TOKEN = (pid, process_token(pid))
    return _OWN_TOKEN


def process_token(pid: int) -> str | None:
    """:returns: the process's start time in clock ticks (Linux), which
    tells a reused pid from the original; ``None`` when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses.
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def process_alive(pid: int, token: str | None) -> bool:
    """:returns: whether ``pid`` runs on this host and is the process that
    had ``token``. Zombies count as dead."""
    if pid == os.getpid() and token == own_token()[1]:
        return True  # this very process: what a service's polls ask most
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0) and the lease
    if stat[stat.rfind(")") + 2:][:1] in ("Z", "X"):
        return False
    return token is None or process_token(pid) in (None, token)
