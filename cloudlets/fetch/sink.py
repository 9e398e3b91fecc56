"""The destination of one download: :class:`Sink` writes and hashes it on
two threads and checks its size and digest."""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO

from cloudlets.errors import FetchError, IntegrityError
from cloudlets.fetch.watch import DownloadCancelled, DownloadWatch
from cloudlets.urls import redact

__all__ = ["Sink"]


class Sink:
    """The destination file with its running digest and byte count.

    Hashing and writing run on two worker threads, each fed the same chunks
    through a short queue, so they overlap with each other and with reading
    the socket (``hashlib`` and file writes release the GIL): memory stays
    bounded by twice ``QUEUE_DEPTH`` chunks. The size bound is checked as
    chunks arrive, before they are queued.
    """

    #: Chunks waiting to be hashed, and to be written, at most.
    QUEUE_DEPTH = 4

    def __init__(self, path: Path, url: str, sha256: str, size: int | None,
                 watch: DownloadWatch | None = None) -> None:
        self.path = path
        self.watch = watch
        self.url = url
        self.expected_sha256 = sha256
        self.expected_size = size
        try:
            # readable too: a watch's readers follow it through a duplicate
            self.file: IO[bytes] = open(path, "w+b")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise FetchError(f"cannot write the download of {redact(url)} to {path}: "
                             f"{exc.strerror}", url=redact(url)) from None
        if watch is not None:
            watch.created(os.dup(self.file.fileno()))
        self.hasher = hashlib.sha256()
        self.done = 0
        #: ETag or Last-Modified of the bytes written so far, for ``If-Range``.
        self.validator: str | None = None
        self._workers: list[tuple[threading.Thread, queue.Queue[bytes | None]]] = []
        self._error: Exception | None = None

    def restart(self) -> None:
        self._drain()
        self.file.seek(0)
        self.file.truncate()
        if self.watch is not None:
            self.watch.created(os.dup(self.file.fileno()))
        self.hasher = hashlib.sha256()
        self.done = 0
        self.validator = None

    def write(self, chunk: bytes) -> None:
        self.check_cancelled()
        if self.expected_size is not None and self.done + len(chunk) > self.expected_size:
            raise IntegrityError(
                f"{redact(self.url)}: more data than the expected {self.expected_size} bytes",
                url=redact(self.url), expected=str(self.expected_size),
                actual=f"more than {self.expected_size} bytes")
        self._raise_error()
        if not self._workers:
            for name, task in (("hash", self._hash), ("write", self._write)):
                work: queue.Queue[bytes | None] = queue.Queue(self.QUEUE_DEPTH)
                thread = threading.Thread(target=self._run, args=(task, work),
                                          name=f"cloudlets-fetch-{name}", daemon=True)
                thread.start()
                self._workers.append((thread, work))
        for _, work in self._workers:
            work.put(chunk)
        self.done += len(chunk)

    def check_cancelled(self) -> None:
        if self.watch is not None and self.watch.cancelled:
            raise DownloadCancelled(f"download of {redact(self.url)} cancelled by its reader",
                                    url=redact(self.url))

    def finish(self) -> str:
        """Check size and digest; flush Python's buffer (durability, ``fsync``,
        is the caller's business: the cache does it before its rename).

        :returns: the digest.
        :raises IntegrityError: on a mismatch.
        :raises FetchError: when the file could not be written.
        """
        self._drain()
        self._raise_error()
        where = redact(self.url)
        if self.expected_size is not None and self.done != self.expected_size:
            raise IntegrityError(
                f"{where}: size mismatch: expected {self.expected_size} bytes, got {self.done}",
                url=where, expected=str(self.expected_size), actual=str(self.done))
        actual = self.hasher.hexdigest()
        if actual != self.expected_sha256:
            raise IntegrityError(
                f"{where}: sha256 mismatch: expected {self.expected_sha256}, got {actual} "
                f"({self.done} bytes)", url=where, expected=self.expected_sha256, actual=actual)
        self.file.flush()
        return actual

    def close(self) -> None:
        self._drain()
        self.file.close()

    def _hash(self, chunk: bytes) -> None:
        self.hasher.update(chunk)

    def _write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        if self.watch is not None:  # readable through another descriptor from now on
            self.file.flush()
            self.watch.advance(len(chunk))

    def _run(self, task: Callable[[bytes], None], work: queue.Queue[bytes | None]) -> None:
        while (chunk := work.get()) is not None:
            if self._error is None:
                try:
                    task(chunk)
                except Exception as exc:  # noqa: BLE001 - re-raised by the reading thread
                    self._error = exc

    def _drain(self) -> None:
        """Wait until every queued chunk is hashed and written."""
        for _, work in self._workers:
            work.put(None)
        for thread, _ in self._workers:
            thread.join()
        self._workers = []

    def _raise_error(self) -> None:
        if self._error is not None:
            reason = getattr(self._error, "strerror", None) or self._error
            raise FetchError(f"cannot write the download of {redact(self.url)} to {self.path}: "
                             f"{reason}", url=redact(self.url))
