"""Lock files and least-recently-used eviction, shared by the two caches:
the tarball cache (:mod:`cloudlets.cache`) and the cache of base
filesystems (:mod:`cloudlets.disk.basecache`).

Each entry of a cache has two lock files:

* ``use``: held *shared* by everyone using the entry, for as long as they
  use it. Its mtime is the entry's last use (each user touches it).
* ``fill``: held *exclusively* while the entry is made (downloaded, built)
  or repaired, so that concurrent users make it once: the others wait on it
  and then find the entry in place.

An entry is evicted only by whoever takes both locks exclusively without
waiting (:func:`evict_unused`): nobody uses it and nobody is making it.
:func:`evict_lru` evicts least recently used entries first until a cache is
within its bound. The locks are ``fcntl.flock`` locks, each through a
descriptor of its own, so they hold between threads of one process as
between processes, and a process that dies lets go of its locks.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from cloudlets.errors import CacheError

__all__ = ["DEFAULT_BASE_CACHE_MAX_BYTES", "LockFile", "evict_lru", "evict_unused", "in_use",
           "last_used"]

#: The default bound of the cache of base filesystems
#: (:class:`cloudlets.disk.basecache.BaseCache`), in bytes on disk (a base
#: is a sparse file: it takes what its tree does, not its size).
DEFAULT_BASE_CACHE_MAX_BYTES = 10 * 1024**3

_Entry = TypeVar("_Entry")


class LockFile:
    """An ``flock`` on a lock file, through a descriptor of its own.

    Because each lock opens the file anew, two threads of one process
    exclude each other just as two processes do. A lock file may be removed
    by whoever holds it exclusively; a waiter that then gets the lock on the
    removed file notices (its inode is no longer at the path) and retries.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def take(cls, path: Path, *, exclusive: bool, wait: bool = True) -> LockFile | None:
        """:returns: the lock, or ``None`` when ``wait`` is false and it is held.

        :raises CacheError: when the lock file cannot be opened.
        """
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise CacheError(f"cannot open lock file {path}: {exc.strerror}") from None
            try:
                fcntl.flock(fd, mode)
            except BlockingIOError:
                os.close(fd)
                return None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return cls(path, fd)
            os.close(fd)

    @classmethod
    def use(cls, path: Path) -> LockFile:
        """Take the shared ``use`` lock at ``path`` and record the use (its
        mtime). Waits only while the entry is being evicted."""
        lock = cls.take(path, exclusive=False)
        assert lock is not None
        with contextlib.suppress(OSError):
            os.utime(path)
        return lock

    @property
    def held(self) -> bool:
        """Whether the lock is still held."""
        return self._fd is not None

    def release(self) -> None:
        """Release the lock (closing the descriptor releases the flock); a
        second call does nothing."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        # A user that never released its lock: do not hold it forever.
        self.release()

    def remove(self) -> None:
        """Remove the lock file, then release. Only while held exclusively."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.release()


def in_use(use: Path) -> bool:
    """Whether someone holds the ``use`` lock at ``use``."""
    probe = LockFile.take(use, exclusive=True, wait=False)
    if probe is None:
        return True
    probe.release()
    return False


def last_used(use: Path, fallback: float) -> float:
    """When the entry whose ``use`` lock is at ``use`` was last used
    (seconds since the epoch), else ``fallback``."""
    try:
        return use.stat().st_mtime
    except FileNotFoundError:
        return fallback


def evict_unused(use: Path, fill: Path, drop: Callable[[], None], *,
                 remove_locks: bool = True) -> bool:
    """Call ``drop`` (which removes the entry's files) if nobody uses or
    fills the entry, then remove its lock files (unless ``remove_locks`` is
    false: ``drop`` removed leftovers beside an entry that stays).

    :returns: whether ``drop`` was called.
    """
    used = LockFile.take(use, exclusive=True, wait=False)
    if used is None:
        return False
    filling = LockFile.take(fill, exclusive=True, wait=False)
    if filling is None:
        used.release()
        return False
    try:
        drop()
    finally:
        for lock in (filling, used):
            if remove_locks:
                lock.remove()
            else:
                lock.release()
    return True


def evict_lru(entries: Sequence[_Entry], limit: int, *, size: Callable[[_Entry], int],
              evict: Callable[[_Entry], bool]) -> tuple[list[_Entry], int]:
    """Evict entries, least recently used first, until they hold at most
    ``limit`` bytes; an entry ``evict`` refuses (in use) stays.

    :param entries: the cache's entries, least recently used first.
    :param limit: the bound, in bytes.
    :param size: an entry's bytes.
    :param evict: evicts an entry; :returns: whether it did.
    :returns: the entries evicted and the bytes that remain.
    """
    total = sum(size(entry) for entry in entries)
    removed: list[_Entry] = []
    for entry in entries:
        if total <= limit:
            break
        if evict(entry):
            total -= size(entry)
            removed.append(entry)
    return removed, total
