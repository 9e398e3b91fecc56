"""Reading a download while it lands: :class:`DownloadWatch` and the errors
its reader may meet (:class:`DownloadRestarted`, :class:`DownloadCancelled`)."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from typing import Any

from cloudlets.errors import FetchError

__all__ = ["DownloadCancelled", "DownloadRestarted", "DownloadWatch"]


class DownloadRestarted(FetchError):
    """A download being followed started over (a server ignored ``Range``,
    or the next mirror was tried) after the reader had taken bytes of the
    first attempt: read the finished file instead."""


class DownloadCancelled(FetchError):
    """The reader no longer wants the download (:meth:`DownloadWatch.cancel`)."""


class DownloadWatch:
    """The progress of one download into its file, so that another thread
    can read the bytes already written while the rest arrives.

    The fetching side (:class:`~cloudlets.fetch.sink.Sink`, then whoever runs the fetch) reports
    each file it (re)creates, each chunk written and the end; readers block
    until the bytes they want are there. A reader gets the bytes as written,
    unverified: the digest is known only when the fetch is over, so act on
    what was read only after the caller's verdict (:meth:`CacheEntry.wait
    <cloudlets.cache.CacheEntry.wait>`). A read asking for more than has
    arrived waits for it or for the end, and the end comes with the
    verdict: a reader that reads to EOF gets the download's failure
    instead of its last bytes.
    Readers read through descriptors of their own, so a rename or unlink
    of the file does not disturb them. :meth:`close` when done.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._fd: int | None = None
        self._written = 0
        #: Bumped whenever the file is created or truncated again.
        self._generation = 0
        self._done = False
        self._error: BaseException | None = None
        self._on_cancel: list[Callable[[], None]] = []
        self.cancelled = False

    # -- the fetching side --------------------------------------------------

    def created(self, fd: int) -> None:
        """The file was (re)created or truncated, empty; ``fd`` (a readable
        descriptor of it, now owned by the watch) reads it from now on."""
        with self._cond:
            self._close_fd()
            self._fd = fd
            self._written = 0
            self._generation += 1
            self._cond.notify_all()

    def advance(self, count: int) -> None:
        """``count`` more bytes are in the file, readable by another descriptor."""
        with self._cond:
            self._written += count
            self._cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        """The download is over: complete and verified, or failed with ``error``."""
        with self._cond:
            self._done = True
            self._error = error
            self._cond.notify_all()

    # -- the reading side ---------------------------------------------------

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the cancelling thread) when the download is
        cancelled, or now if it already was: the fetch cuts its connection
        with it, so that a read blocked on the socket returns at once."""
        with self._cond:
            self._on_cancel.append(callback)
            cancelled = self.cancelled
        if cancelled:
            callback()

    def cancel(self) -> None:
        """Ask the fetch to stop: its active connection is shut down (see
        :meth:`on_cancel`) and its next chunk raises :class:`DownloadCancelled`."""
        with self._cond:
            self.cancelled = True
            self._cond.notify_all()
            callbacks = list(self._on_cancel)
        for callback in callbacks:
            callback()

    def reader(self) -> _Follower:
        """:returns: a binary file object reading the download from its start,
        blocking for bytes not written yet; it ends where the finished
        download ends and raises the download's failure, or
        :class:`DownloadRestarted` when the download started over after
        bytes were read."""
        return _Follower(self)

    def close(self) -> None:
        """Release the watch's descriptor (readers keep their own)."""
        with self._cond:
            self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _available(self, position: int, want: int, generation: int) \
            -> tuple[int, int, int | None]:
        """Wait until ``want`` bytes past ``position`` are written, or the
        download is over. :returns: how many are readable, the generation,
        and for a reader of an older generation a new descriptor of the
        file (its own, to close)."""
        with self._cond:
            while True:
                if self._generation != generation and position:
                    raise DownloadRestarted(
                        "the download started over after "
                        f"{position} bytes had been read from it")
                if self._error is not None:
                    raise self._error
                if self._written - position >= want or self._done:
                    break
                self._cond.wait()
            fd = None
            if self._generation != generation and self._fd is not None:
                fd = os.dup(self._fd)
            return max(0, min(want, self._written - position)), self._generation, fd


class _Follower(io.RawIOBase):
    """Reads a :class:`DownloadWatch`'s file as it grows (see
    :meth:`DownloadWatch.reader`)."""

    def __init__(self, watch: DownloadWatch) -> None:
        super().__init__()
        self._watch = watch
        self._position = 0
        self._generation = 0
        self._fd: int | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count, generation, fd = self._watch._available(self._position, len(view),
                                                       self._generation)
        if generation != self._generation:  # nothing read yet: read the new file
            self._close_fd()
            self._generation, self._fd = generation, fd
        if count == 0 or self._fd is None:
            return 0
        got = os.preadv(self._fd, [view[:count]], self._position)
        if got < count:  # truncated under us: the download started over
            raise DownloadRestarted(f"the download shrank under its reader at byte "
                                    f"{self._position + got}")
        self._position += got
        return got

    def close(self) -> None:
        self._close_fd()
        super().close()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
