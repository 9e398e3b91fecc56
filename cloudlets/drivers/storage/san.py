"""Block targets: a local device or file, an NBD export, an iSCSI LUN.

A block target has a fixed size and no names: the image is written from its
first byte and the rest of the target is left alone. The driver

- refuses a target smaller than the image before writing anything (and a
  stream of unknown length as soon as it would pass the end): nothing is
  ever written past the image's last byte;
- writes the first MiB (boot code, partition table, filesystem signatures)
  *last*, once every other byte is written, flushed, read back and its
  sha256 compared: until then the target does not look like a complete
  disk. Overwriting wipes the old first MiB before the first byte of the
  new body, and a failure after that leaves it zero, so a half-written
  disk never looks bootable; a target refused before any write (too
  small, unreachable) keeps what it held;
- treats a target whose first MiB holds anything but zeros as "something
  is stored here": it is not overwritten unless asked, and ``delete`` wipes
  that MiB (as ``wipefs`` would the signatures).

How bytes get there:

- **local device or file** (``/dev/sdb``, ``/srv/lun0.img``, ``file:///...``):
  ``pwrite`` in aligned 4 MiB blocks (optionally ``O_DIRECT`` from a
  page-aligned buffer, the odd tail without it), ``fsync`` at the end;
- **NBD** (``nbd://host[:port]/export``, ``nbd+unix:///export?socket=/path``):
  a native client of the NBD protocol (fixed newstyle handshake,
  ``NBD_OPT_GO``, ``WRITE``/``READ``/``FLUSH``, simple replies), streaming
  from the source in constant memory. It keeps a window of requests in
  flight and takes their replies in any order; writes are sent from a
  second thread while the caller reads and hashes the next chunk, with a
  ``FLUSH`` every 64 MiB that nothing waits for (the server writes back
  as the rest arrives); the read-back runs while the server works on the
  last ``FLUSH``, and is hashed on a second thread while the next reads
  arrive. Every write is answered before that ``FLUSH``, a read or the
  header's write is sent;
- **iSCSI** (``iscsi://[user%password@]host[:port]/iqn/lun``): QEMU's libiscsi
  block driver, through a ``qemu-nbd`` started for the operation on a
  private Unix socket, then the same NBD client. The password goes to
  ``qemu-nbd`` in a mode-0600 file (a QEMU ``secret`` object), never on a
  command line.

Why not ``qemu-img convert -n``: it needs a seekable source file (a render
hands over streams too), it cannot write the header last nor read back a
digest, and it does not bound the write to the image size without a JSON
filename. A native NBD client is a few hundred lines of a small, stable,
documented protocol; iSCSI is not, so it goes through QEMU's client.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import queue
import re
import socket
import stat
import struct
import subprocess
import tempfile
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, unquote, urlsplit

from cloudlets.drivers.base import StorageDriver, UploadSource
from cloudlets.drivers.types import Storage, StorageCapability
from cloudlets.errors import CloudletsError, ConfigurationError, StorageError
from cloudlets.tools import find_tool

__all__ = ["HEADER_SIZE", "SANStorage", "redact_target"]

log = logging.getLogger(__name__)

#: The leading bytes written last and wiped on failure or delete.
HEADER_SIZE = 1024 * 1024
#: Alignment of every write but the image's tail (and of O_DIRECT buffers).
ALIGNMENT = 4096
#: The IANA port of NBD and of iSCSI.
NBD_PORT = 10809
ISCSI_PORT = 3260

# NBD protocol constants (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md)
_NBDMAGIC = b"NBDMAGIC"
_IHAVEOPT = 0x49484156454F5054
_OPT_REPLY_MAGIC = 0x0003E889045565A9
_REQUEST_MAGIC = 0x25609513
_SIMPLE_REPLY_MAGIC = 0x67446698
_FLAG_FIXED_NEWSTYLE = 1 << 0
_FLAG_NO_ZEROES = 1 << 1
_OPT_GO = 7
_REP_ACK = 1
_REP_INFO = 3
_REP_ERROR_BIT = 1 << 31
_INFO_EXPORT = 0
_TFLAG_READ_ONLY = 1 << 1
_TFLAG_SEND_FLUSH = 1 << 2
_CMD_READ = 0
_CMD_WRITE = 1
_CMD_DISC = 2
_CMD_FLUSH = 3
_COMMAND_NAMES = {_CMD_READ: "read", _CMD_WRITE: "write", _CMD_FLUSH: "flush"}
_REP_ERRORS = {
    (_REP_ERROR_BIT | 1): "unsupported option",
    (_REP_ERROR_BIT | 2): "policy refusal",
    (_REP_ERROR_BIT | 3): "invalid request",
    (_REP_ERROR_BIT | 5): "permission denied",
    (_REP_ERROR_BIT | 6): "unknown export",
    (_REP_ERROR_BIT | 8): "TLS required",
}


def redact_target(location: str) -> str:
    """Hide the iSCSI password (``user%password@``) and URL passwords.

    An iSCSI location cannot hold ``@`` but in its user part (IQNs and LUNs
    have no ``@``), so everything up to its last ``@`` is hidden: a password
    with an unescaped ``/`` or ``@`` does not leak through an error about
    the malformed location.

    >>> redact_target("iscsi://bob%hunter2@10.0.0.1/iqn.2026-01.x:t/1")
    'iscsi://bob%***@10.0.0.1/iqn.2026-01.x:t/1'
    >>> redact_target("iscsi://bob%hunt/er@2@10.0.0.1/iqn.2026-01.x:t/1")
    'iscsi://bob%***@10.0.0.1/iqn.2026-01.x:t/1'
    >>> redact_target("nbd://bob:hunter2@10.0.0.1/export")
    'nbd://bob:***@10.0.0.1/export'
    """
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*://)(.*)$", location, re.DOTALL)
    if match is None:
        return location
    scheme, rest = match.groups()
    if scheme.lower() == "iscsi://":
        userinfo, at, host = rest.rpartition("@")
    else:
        authority, slash, path = rest.partition("/")
        userinfo, at, host = authority.rpartition("@")
        host += slash + path
    if not at:
        return location
    user = re.split(r"[%:]", userinfo, maxsplit=1)
    if len(user) == 1:
        return location  # a user name, no password
    separator = userinfo[len(user[0])]
    return f"{scheme}{user[0]}{separator}***@{host}"


# -- targets ------------------------------------------------------------------


class _Target(ABC):
    """An open block target.

    :ivar size: its size in bytes.
    :ivar shown: its location, credentials redacted, for error messages.
    """

    size: int
    shown: str

    @abstractmethod
    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Write ``data`` at ``offset``. It may complete later (an NBD target
        sends from a second thread and keeps several writes in flight):
        :meth:`flush`, :meth:`read` and :meth:`hash_range` wait for every
        write before their own work, and a failed write raises from
        whichever call learns of it. ``data`` must not change until then."""

    @abstractmethod
    def read(self, length: int, offset: int) -> bytes: ...

    @abstractmethod
    def flush(self) -> None:
        """Wait for every write, then make them durable."""

    @abstractmethod
    def close(self) -> None: ...

    def hash_range(self, digest: hashlib._Hash, start: int, end: int, block: int) -> None:
        """Read bytes ``start`` to ``end`` back into ``digest``, in offset
        order, at most ``block`` bytes a read."""
        offset = start
        while offset < end:
            length = min(block, end - offset)
            data = self.read(length, offset)
            if len(data) != length:
                raise StorageError(f"short read from {self.shown} at offset {offset}",
                                   self.shown)
            digest.update(data)
            offset += length

    def flush_and_hash(self, digest: hashlib._Hash, start: int, end: int, block: int) -> None:
        """:meth:`flush`, then :meth:`hash_range` (an NBD target reads back
        while the server flushes: both are done when this returns)."""
        self.flush()
        self.hash_range(digest, start, end, block)


class _FileTarget(_Target):
    """A local block device or regular file."""

    def __init__(self, path: Path, shown: str, *, direct: bool, block_size: int) -> None:
        self.shown = shown
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise StorageError(f"block target {shown} does not exist", shown) from None
        except OSError as exc:
            raise StorageError(f"cannot open {shown}: {exc.strerror}", shown) from None
        if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise StorageError(f"{shown} is neither a block device nor a file", shown)
        self._fd = self._direct_fd = -1
        self._buffer: mmap.mmap | None = None
        what = ""
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            if direct:
                what = " with O_DIRECT"
                self._direct_fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_DIRECT)
        except OSError as exc:
            self.close()
            raise StorageError(f"cannot open {shown}{what}: {exc.strerror}", shown) from None
        self.size = os.lseek(self._fd, 0, os.SEEK_END)
        if direct:  # anonymous mappings are page-aligned, as O_DIRECT requires
            self._buffer = mmap.mmap(-1, max(block_size, HEADER_SIZE))

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        length = len(data)
        try:
            if self._buffer is not None and offset % ALIGNMENT == 0 \
                    and length % ALIGNMENT == 0 and length <= len(self._buffer):
                self._buffer[:length] = data  # page-aligned, as O_DIRECT requires
                written = os.pwrite(self._direct_fd, memoryview(self._buffer)[:length], offset)
            else:
                written = os.pwrite(self._fd, data, offset)
            while written < length:
                written += os.pwrite(self._fd, memoryview(data)[written:], offset + written)
        except OSError as exc:
            raise StorageError(f"cannot write to {self.shown} at offset {offset}: "
                               f"{exc.strerror}", self.shown) from None

    def read(self, length: int, offset: int) -> bytes:
        try:
            return os.pread(self._fd, length, offset)
        except OSError as exc:
            raise StorageError(f"cannot read {self.shown}: {exc.strerror}",
                               self.shown) from None

    def flush(self) -> None:
        try:
            for fd in (self._fd, self._direct_fd):
                if fd >= 0:
                    os.fsync(fd)
        except OSError as exc:
            raise StorageError(f"cannot flush {self.shown}: {exc.strerror}",
                               self.shown) from None

    def close(self) -> None:
        for fd in (self._fd, self._direct_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._direct_fd = -1
        if self._buffer is not None:
            self._buffer.close()
            self._buffer = None


class _NBDTarget(_Target):
    """A native NBD client: fixed newstyle handshake, simple replies."""

    #: The largest payload of one request: servers refuse more than 32 MiB
    #: (qemu-nbd's limit, the protocol's advice).
    MAX_REQUEST: ClassVar[int] = 32 * 1024 * 1024
    #: Requests in flight at most, and the bytes of their payloads at most:
    #: the server works on one while the next ones arrive (qemu-img keeps 8
    #: in flight too). The window bounds the server's queue, not our
    #: memory: a request leaves whole before the next one is sent.
    WINDOW: ClassVar[int] = 8
    WINDOW_BYTES: ClassVar[int] = 32 * 1024 * 1024
    #: Writes queued for the sending thread at most (their data is held
    #: until sent): the caller reads and hashes the next chunk while the
    #: thread sends this one. 0 sends from the caller's thread.
    WRITE_BEHIND: ClassVar[int] = 2
    #: Bytes written between two FLUSHes sent on the way, not waited for:
    #: the server writes the body back while the rest arrives, and the FLUSH
    #: that must precede the header has that much less to do.
    FLUSH_EVERY: ClassVar[int] = 64 * 1024 * 1024
    #: Bytes a read-back READ at most: a window of them (8 MiB) stays in the
    #: CPU's caches between arriving and being hashed (against nbdkit, 15 %
    #: faster than 4 MiB reads), and costs a quarter of the memory.
    READ_BLOCK: ClassVar[int] = 1024 * 1024

    def __init__(self, sock: socket.socket, export: str, shown: str) -> None:
        self._sock = sock
        self.shown = shown
        self._cookie = 0
        self._inflight: dict[int, _Request] = {}  # by cookie
        self._inflight_bytes = 0
        self._broken: str | None = None  # why no request may be sent any more
        self._unflushed = 0  # bytes written since the last FLUSH
        # the sending thread, its queue and what it failed with; the socket
        # is the thread's from a write until _settle() returns
        self._writer: threading.Thread | None = None
        self._queue: queue.Queue[tuple[memoryview, int] | None] = queue.Queue(
            max(self.WRITE_BEHIND, 1))
        self._failure: BaseException | None = None
        try:
            self._handshake(export)
        except (OSError, struct.error) as exc:
            self.close()
            raise StorageError(f"NBD handshake with {shown} failed: {exc}", shown) from None
        except StorageError:
            self.close()
            raise

    @classmethod
    def connect_tcp(cls, host: str, port: int, export: str, shown: str,
                    timeout: float) -> _NBDTarget:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise StorageError(f"cannot connect to {shown}: {exc.strerror or exc}",
                               shown) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, export, shown)

    @classmethod
    def connect_unix(cls, path: str, export: str, shown: str, timeout: float) -> _NBDTarget:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise StorageError(f"cannot connect to {shown}: {exc.strerror or exc}",
                               shown) from None
        return cls(sock, export, shown)

    def _recv(self, length: int) -> bytes:
        buffer = bytearray(length)
        self._recv_into(memoryview(buffer))
        return bytes(buffer)

    def _recv_into(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            count = self._sock.recv_into(view[got:])
            if count == 0:
                self._broken = "the server closed it"
                raise StorageError(f"{self.shown} closed the NBD connection", self.shown)
            got += count

    def _handshake(self, export: str) -> None:
        if self._recv(8) != _NBDMAGIC:
            raise StorageError(f"{self.shown} does not speak NBD", self.shown)
        magic, = struct.unpack(">Q", self._recv(8))
        if magic != _IHAVEOPT:
            raise StorageError(f"{self.shown} speaks only oldstyle NBD", self.shown)
        server_flags, = struct.unpack(">H", self._recv(2))
        if not server_flags & _FLAG_FIXED_NEWSTYLE:
            raise StorageError(f"{self.shown} lacks fixed newstyle NBD", self.shown)
        self._sock.sendall(struct.pack(">I", server_flags & (_FLAG_FIXED_NEWSTYLE
                                                             | _FLAG_NO_ZEROES)))
        name = export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self._sock.sendall(struct.pack(">QII", _IHAVEOPT, _OPT_GO, len(data)) + data)
        size: int | None = None
        flags = 0
        while True:
            magic, _option, reply, length = struct.unpack(">QIII", self._recv(20))
            payload = self._recv(length) if length else b""
            if magic != _OPT_REPLY_MAGIC:
                raise StorageError(f"{self.shown} sent a bad NBD option reply", self.shown)
            if reply & _REP_ERROR_BIT:
                reason = _REP_ERRORS.get(reply, f"error {reply & ~_REP_ERROR_BIT}")
                detail = payload.decode("utf-8", "replace")
                raise StorageError(f"{self.shown} refused export {export!r}: {reason}"
                                   + (f" ({detail})" if detail else ""), self.shown)
            if reply == _REP_INFO and len(payload) >= 12:
                info, = struct.unpack(">H", payload[:2])
                if info == _INFO_EXPORT:
                    size, flags = struct.unpack(">QH", payload[2:12])
            elif reply == _REP_ACK:
                break
        if size is None:
            raise StorageError(f"{self.shown} did not report the export size", self.shown)
        self.size = size
        self._flags = flags
        if flags & _TFLAG_READ_ONLY:
            raise StorageError(f"NBD export {self.shown} is read-only", self.shown)

    # -- transmission: a window of requests, replies in any order ----------

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        if self._failure is not None:
            self._settle()  # raises it
        if not self.WRITE_BEHIND:
            self._send_write(memoryview(data), offset)
            return
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_behind, daemon=True,
                                            name="cloudlets-nbd-writer")
            self._writer.start()
        self._queue.put((memoryview(data), offset))

    def read(self, length: int, offset: int) -> bytes:
        self._settle()
        self._drain()  # a READ overtaking a WRITE of the same bytes may see the old ones
        buffer = memoryview(bytearray(length))
        requests = []
        for start in range(0, length, self.MAX_REQUEST):
            piece = buffer[start:start + self.MAX_REQUEST]
            self._make_room(len(piece))
            requests.append(self._send(_CMD_READ, offset + start, len(piece), into=piece))
        for request in requests:
            while not request.done:
                self._reap()
        return buffer.tobytes()

    def hash_range(self, digest: hashlib._Hash, start: int, end: int, block: int) -> None:
        """Keep up to :attr:`WINDOW` reads of :attr:`READ_BLOCK` bytes (or
        ``block``, if smaller) in flight, each into its own buffer, and hash
        them in offset order on a second thread (``hashlib`` releases the
        GIL) while the next ones arrive. A buffer is reused once its bytes
        are hashed: memory stays at the window's size."""
        self._settle()
        self._drain()
        self._hash_range(digest, start, end, block)

    def flush_and_hash(self, digest: hashlib._Hash, start: int, end: int, block: int) -> None:
        """Send ``FLUSH`` once every write is answered, and read back while
        the server works on it (it covers only the writes answered before it;
        the reads must see them all). Both are done when this returns."""
        self._settle()
        self._drain()
        flush = self._send(_CMD_FLUSH, 0, 0) if self._flags & _TFLAG_SEND_FLUSH else None
        self._unflushed = 0
        self._hash_range(digest, start, end, block)
        if flush is not None:
            self._drain(flush)

    def _hash_range(self, digest: hashlib._Hash, start: int, end: int, block: int) -> None:
        block = min(block, self.READ_BLOCK, self.MAX_REQUEST)
        count = -(-(end - start) // block)
        window = max(1, min(self.WINDOW, self.WINDOW_BYTES // block, count))
        buffers = [memoryview(bytearray(min(block, end - start))) for _ in range(window)]
        hashed: list[Future[None] | None] = [None] * window
        pending: deque[tuple[_Request, int]] = deque()  # reads not yet hashed, in offset order
        offset = start
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloudlets-sha256") as hasher:
            for number in range(count):
                slot = number % window
                job = hashed[slot]
                if job is not None:
                    job.result()  # that buffer's bytes are hashed: it may be reused
                length = min(block, end - offset)
                pending.append((self._send(_CMD_READ, offset, length,
                                           into=buffers[slot][:length]), slot))
                offset += length
                if len(pending) == window or number == count - 1:
                    self._hash_next(pending, hashed, hasher, digest)
            while pending:
                self._hash_next(pending, hashed, hasher, digest)

    def _hash_next(self, pending: deque[tuple[_Request, int]],
                   hashed: list[Future[None] | None], hasher: ThreadPoolExecutor,
                   digest: hashlib._Hash) -> None:
        """Wait for the first read of ``pending`` and hand its bytes to ``hasher``
        (one thread: the bytes are hashed in the order they are handed over)."""
        request, slot = pending.popleft()
        while not request.done:
            self._reap()
        assert request.into is not None
        hashed[slot] = hasher.submit(digest.update, request.into)

    def flush(self) -> None:
        self._settle()
        self._drain()  # FLUSH covers only the writes already answered
        if self._flags & _TFLAG_SEND_FLUSH:
            self._drain(self._send(_CMD_FLUSH, 0, 0))
        self._unflushed = 0

    def close(self) -> None:
        try:
            try:
                self._settle()
            except StorageError:
                pass  # an error here is not the one to report
            if getattr(self, "size", None) is not None:
                while self._inflight and self._broken is None:
                    try:  # wait for the last replies before leaving, as the protocol asks
                        self._reap()
                    except StorageError:
                        pass
                if self._broken is None:
                    self._send(_CMD_DISC, 0, 0)
        except StorageError:
            pass
        finally:
            if self._writer is not None:
                self._queue.put(None)  # it has sent what was queued, or will first
                self._writer.join()
                self._writer = None
            self._sock.close()

    def _write_behind(self) -> None:
        """The sending thread: send queued writes until ``None``; once one
        fails, drop the rest (the caller learns of it from :meth:`_settle`)."""
        while (item := self._queue.get()) is not None:
            try:
                if self._failure is None:
                    self._send_write(*item)
            except BaseException as exc:  # noqa: BLE001 - raised by the caller's _settle()
                self._failure = exc
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def _settle(self) -> None:
        """Wait until the sending thread has sent every queued write (their
        replies may still be on their way) and raise what it failed with."""
        if self._writer is not None:
            self._queue.join()
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def _send_write(self, view: memoryview, offset: int) -> None:
        for start in range(0, len(view), self.MAX_REQUEST):
            piece = view[start:start + self.MAX_REQUEST]
            self._make_room(len(piece))
            self._send(_CMD_WRITE, offset + start, len(piece), data=piece)
            self._unflushed += len(piece)
            if self._unflushed >= self.FLUSH_EVERY and self._flags & _TFLAG_SEND_FLUSH:
                self._make_room(0)
                self._send(_CMD_FLUSH, 0, 0)  # covers what is answered by then: a head start
                self._unflushed = 0

    def _make_room(self, length: int) -> None:
        """Wait for replies until one more request of ``length`` bytes fits
        in the window."""
        while self._inflight and (len(self._inflight) >= self.WINDOW
                                  or self._inflight_bytes + length > self.WINDOW_BYTES):
            self._reap()

    def _drain(self, request: _Request | None = None) -> None:
        """Wait for every reply, or only until ``request``'s has come."""
        while not request.done if request is not None else self._inflight:
            self._reap()

    def _send(self, command: int, offset: int, length: int, *,
              data: memoryview | None = None, into: memoryview | None = None) -> _Request:
        """Send a request without waiting for its reply.

        :param data: a WRITE's payload, sent before this returns.
        :param into: where a READ's payload goes when its reply comes.
        """
        if self._broken is not None:
            raise StorageError(f"NBD connection to {self.shown} is unusable: {self._broken}",
                               self.shown)
        self._cookie += 1
        header = struct.pack(">IHHQQI", _REQUEST_MAGIC, 0, command, self._cookie, offset,
                             length)
        try:
            if data is None:
                self._sock.sendall(header)
            else:
                sent = self._sock.sendmsg([header, data])  # no copy of the payload
                if sent < len(header):
                    self._sock.sendall(header[sent:])
                    sent = len(header)
                if sent < len(header) + len(data):
                    self._sock.sendall(data[sent - len(header):])
        except OSError as exc:
            raise self._lost(exc) from None
        request = _Request(command, offset, length, into)
        if command != _CMD_DISC:  # the one request without a reply
            self._inflight[self._cookie] = request
            self._inflight_bytes += length
        return request

    def _reap(self) -> _Request:
        """Read one reply, to whichever request it answers.

        :raises StorageError: on an error reply, naming its request's offset.
        """
        try:
            magic, error, cookie = struct.unpack(">IIQ", self._recv(16))
            request = self._inflight.pop(cookie, None)
            if magic != _SIMPLE_REPLY_MAGIC or request is None:
                self._broken = "it sent a bad reply"
                raise StorageError(f"{self.shown} sent a bad NBD reply", self.shown)
            self._inflight_bytes -= request.length
            if error:
                if request.command == _CMD_READ:
                    # whether a failed READ's payload follows, servers differ
                    self._broken = "a read failed"
                what = _COMMAND_NAMES.get(request.command, "request")
                at = "" if request.command == _CMD_FLUSH else f" at offset {request.offset}"
                raise StorageError(f"{self.shown} failed an NBD {what}{at}: "
                                   f"{os.strerror(error)}", self.shown)
            if request.into is not None:
                self._recv_into(request.into)
        except OSError as exc:
            raise self._lost(exc) from None
        request.done = True
        return request

    def _lost(self, exc: OSError) -> StorageError:
        self._broken = "its socket failed"  # a timeout, too, leaves a reply half-read
        return StorageError(f"NBD connection to {self.shown} failed: {exc.strerror or exc}",
                            self.shown)


@dataclass(eq=False)
class _Request:
    """An NBD request sent, its reply not yet read."""

    command: int
    offset: int
    length: int
    #: where a READ's payload goes
    into: memoryview | None = None
    done: bool = False


class _ISCSIBridge:
    """``qemu-nbd`` exporting an iSCSI LUN on a private Unix socket.

    ``qemu-nbd`` listens before it logs in to the target, and exits when
    the login fails: :meth:`connect` retries while the socket is not
    listening yet and reports ``qemu-nbd``'s own error when the handshake
    ends early. The CHAP password lives in a mode-0600 file in a private
    directory, removed as soon as the login succeeded.
    """

    def __init__(self, target: _ISCSILocation, shown: str) -> None:
        self._shown = shown
        qemu_nbd = find_tool("qemu-nbd")
        self._dir = tempfile.TemporaryDirectory(prefix="cloudlets-iscsi-")
        self.socket = os.path.join(self._dir.name, "nbd.sock")
        self._secret: str | None = None
        host = f"[{target.host}]" if ":" in target.host else target.host
        opts = ["driver=raw", "file.driver=iscsi", "file.transport=tcp",
                f"file.portal={_qemu_escape(f'{host}:{target.port}')}",
                f"file.target={_qemu_escape(target.iqn)}", f"file.lun={target.lun}"]
        argv = [qemu_nbd, "--socket", self.socket, "--cache=none",
                "--aio=threads", "--discard=ignore"]
        if target.initiator:
            opts.append(f"file.initiator-name={_qemu_escape(target.initiator)}")
        self._process: subprocess.Popen[bytes] | None = None
        try:
            if target.user is not None:
                self._secret = os.path.join(self._dir.name, "password")
                fd = os.open(self._secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write((target.password or "").encode())
                argv += ["--object", f"secret,id=iscsipw,file={_qemu_escape(self._secret)}"]
                opts += [f"file.user={_qemu_escape(target.user)}",
                         "file.password-secret=iscsipw"]
            argv += ["--image-opts", ",".join(opts)]
            self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except BaseException:
            self._stop()
            raise

    def connect(self, timeout: float) -> _NBDTarget:
        """Connect the NBD client once ``qemu-nbd`` listens and has logged in.

        :param timeout: seconds for both, and then for each request.
        :raises StorageError: naming the target and ``qemu-nbd``'s error.
        :raises ConfigurationError: when QEMU lacks its iSCSI block driver.
        """
        assert self._process is not None
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.socket)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()  # not listening yet
            except OSError as exc:
                sock.close()
                raise self._failure(exc.strerror or str(exc)) from None
            if self._process.poll() is not None:
                raise self._failure("qemu-nbd exited")
            if time.monotonic() > deadline:
                raise self._failure(f"qemu-nbd did not listen within {timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        # the handshake waits for the iSCSI login: bound both by the deadline
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            client = _NBDTarget(sock, "", self._shown)
        except StorageError:
            if time.monotonic() >= deadline:
                raise self._failure(f"no answer within {timeout:g} s",
                                    quote_stderr=False) from None
            try:  # it closed the connection: it is exiting, with its reason on stderr
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            raise self._failure("qemu-nbd closed the connection") from None
        sock.settimeout(timeout)
        if self._secret is not None:  # read at start-up: no longer needed on disk
            os.unlink(self._secret)
            self._secret = None
        return client

    def _failure(self, reason: str, *, quote_stderr: bool = True) -> CloudletsError:
        error = self._stop()
        if "Unknown driver 'iscsi'" in error:
            return ConfigurationError("iSCSI targets need QEMU's libiscsi block driver, "
                                      "which is not installed: apt-get install "
                                      "qemu-block-extra")
        # qemu-nbd quotes its option string: long, and no help to the reader
        error = re.sub(r"'driver=raw,file\.driver=iscsi[^']*'", "the LUN", error)
        detail = error if error and quote_stderr else reason
        return StorageError(f"cannot reach iSCSI target {self._shown}: {detail}", self._shown)

    def _stop(self) -> str:
        error = ""
        process = self._process
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
            assert process.stderr is not None
            error = process.stderr.read().decode("utf-8", "replace").strip()
            process.stderr.close()
            self._process = None
        self._dir.cleanup()
        return error[-400:]

    def close(self) -> None:
        self._stop()


def _qemu_escape(value: str) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax."""
    return value.replace(",", ",,")


@dataclass(frozen=True)
class _ISCSILocation:
    host: str
    port: int
    iqn: str
    lun: int
    user: str | None
    password: str | None
    initiator: str | None


class _BridgedTarget(_Target):
    """An NBD client on a bridge that must be stopped with it."""

    def __init__(self, client: _NBDTarget, bridge: _ISCSIBridge) -> None:
        self._client = client
        self._bridge = bridge
        self.size = client.size
        self.shown = client.shown

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self._client.write(data, offset)

    def read(self, length: int, offset: int) -> bytes:
        return self._client.read(length, offset)

    def hash_range(self, digest: hashlib._Hash, start: int, end: int, block: int) -> None:
        self._client.hash_range(digest, start, end, block)

    def flush_and_hash(self, digest: hashlib._Hash, start: int, end: int, block: int) -> None:
        self._client.flush_and_hash(digest, start, end, block)

    def flush(self) -> None:
        self._client.flush()

    def close(self) -> None:
        try:
            self._client.close()
        finally:
            self._bridge.close()


# -- the driver -----------------------------------------------------------------


class SANStorage(StorageDriver):
    """Write images to block targets.

    Location syntax: a path (``/dev/sdb``, ``/srv/lun0.img``) or
    ``file:///path``; ``nbd://host[:port]/export`` or
    ``nbd+unix:///export?socket=/path``; ``iscsi://[user%password@]host[:port]/iqn/lun``.

    :param ex_direct: open local targets with ``O_DIRECT`` (aligned blocks
        bypass the page cache; the tail is written without it).
    :param ex_verify: read the written image back and compare its sha256
        (twice the traffic; off by default, as ``qemu-img convert`` does not:
        the writes are flushed and every request's reply checked).
    :param ex_initiator: the iSCSI initiator name (QEMU's default otherwise).
    :param timeout: seconds to connect to a network target (for iSCSI: to start
        ``qemu-nbd`` and log in), then for each request.
    """

    name: ClassVar[str] = Storage.SAN
    website: ClassVar[str] = "https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md"
    description: ClassVar[str] = "Block targets: device or file, NBD, iSCSI; header written last"
    capabilities: ClassVar[StorageCapability] = (
        StorageCapability.STREAM | StorageCapability.VERIFY | StorageCapability.DELETE
        | StorageCapability.BLOCK)
    CHUNK_SIZE: ClassVar[int] = 4 * 1024 * 1024

    def __init__(self, *, ex_direct: bool = False, ex_verify: bool = False,
                 ex_initiator: str | None = None, timeout: float = 30.0) -> None:
        self.ex_direct = ex_direct
        self.ex_verify = ex_verify
        self.ex_initiator = ex_initiator
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"SANStorage(ex_direct={self.ex_direct}, ex_verify={self.ex_verify})"

    # -- standard API -------------------------------------------------------

    def exists(self, location: str) -> bool:
        """:returns: whether the target's first MiB holds anything but zeros."""
        target = self._open_target(location)
        try:
            length = min(HEADER_SIZE, target.size)
            return bool(target.read(length, 0).strip(b"\0")) if length else False
        finally:
            target.close()

    # -- extensions ---------------------------------------------------------

    def ex_size(self, location: str) -> int:
        """:returns: the target's size in bytes."""
        target = self._open_target(location)
        try:
            return target.size
        finally:
            target.close()

    def ex_digest(self, location: str, size: int) -> str:
        """Read the first ``size`` bytes of a target back.

        :returns: their sha256.
        :raises StorageError: when the target is smaller.
        """
        target = self._open_target(location)
        try:
            if size > target.size:
                shown = redact_target(location)
                raise StorageError(f"{shown} has only {target.size} bytes", shown)
            return self._digest(target, 0, size, hashlib.sha256()).hexdigest()
        finally:
            target.close()

    # -- for the base class -------------------------------------------------

    def _upload(self, source: UploadSource, location: str, *, overwrite: bool) -> str:
        shown = redact_target(location)
        target = self._open_target(location)
        header_written = False
        try:
            if source.size is not None and source.size > target.size:
                raise StorageError(f"{shown} has {target.size} bytes, smaller than the "
                                   f"{source.size}-byte image", shown)
            # an old header over a half-written new body would look whole
            header, end = self._write_body(source, target, shown, wipe=overwrite)
            source.verify(location)
            if self.ex_verify:
                digest = hashlib.sha256(header)
                target.flush_and_hash(digest, len(header), end, self.CHUNK_SIZE)
                if digest.hexdigest() != source.digest:
                    raise StorageError(f"{shown} reads back with sha256 {digest.hexdigest()}, "
                                       f"wrote {source.digest}", shown)
            else:
                target.flush()
            header_written = True
            target.write(header, 0)
            target.flush()
            if self.ex_verify and target.read(len(header), 0) != header:
                raise StorageError(f"the first MiB of {shown} does not read back as "
                                   f"written", shown)
        except BaseException:
            if header_written:
                try:
                    self._wipe_header(target)
                except StorageError:
                    pass  # the upload's own error is the one to report
            raise
        finally:
            target.close()
        log.debug("wrote %d bytes to %s", source.bytes_read, shown)
        return shown

    def _cleanup_failed(self, location: str) -> None:
        """Nothing to do: :meth:`_upload` leaves the first MiB zero on any
        failure after its first write, and the target untouched on a failure
        before it (a refused target keeps what it held: the base's clean-up,
        which deletes what ``exists``, would wipe it)."""

    def _delete(self, location: str) -> None:
        target = self._open_target(location)
        try:
            if not self._wipe_header(target):
                raise StorageError(f"nothing is stored on {target.shown}", target.shown)
        finally:
            target.close()

    # -- private helpers ----------------------------------------------------

    def _write_body(self, source: UploadSource, target: _Target, shown: str, *,
                    wipe: bool) -> tuple[bytes, int]:
        """Write everything after the first MiB, in aligned blocks.

        :param wipe: zero the first MiB before the first byte of the body
            (an image that fits in it has no body, and replaces no more
            than its own length).
        :returns: the first MiB (held back) and the image's size.
        """
        header = bytearray()
        # bytes not yet written (less than a block, or unaligned): a new
        # bytearray once part of it is written, as the target may still hold it
        pending = bytearray()
        offset = HEADER_SIZE  # where the first pending byte goes

        def put(data: bytes | bytearray | memoryview) -> None:
            nonlocal offset, wipe
            if wipe:
                self._wipe_header(target)
                wipe = False
            target.write(data, offset)
            offset += len(data)

        for chunk in source.chunks(self.CHUNK_SIZE):
            if source.bytes_read > target.size:
                raise StorageError(f"the image is larger than {shown} ({target.size} "
                                   f"bytes): refusing to write past its end", shown)
            # the target may send a block after the source reused its buffer
            view = memoryview(chunk if isinstance(chunk, bytes) else bytes(chunk))
            if len(header) < HEADER_SIZE:
                take = HEADER_SIZE - len(header)
                header += view[:take]
                view = view[take:]
            if pending:
                pending += view
                view = memoryview(pending)
            usable = len(view) - len(view) % ALIGNMENT
            if pending and usable < self.CHUNK_SIZE:
                continue  # gather a full block before writing unaligned input
            for position in range(0, usable, self.CHUNK_SIZE):  # aligned: no copy
                put(view[position:min(position + self.CHUNK_SIZE, usable)])
            pending = bytearray(view[usable:])
        if pending:
            put(pending)
        if len(header) < HEADER_SIZE:
            return bytes(header), len(header)
        return bytes(header), offset

    @staticmethod
    def _wipe_header(target: _Target) -> bool:
        """Zero the first MiB, when it holds anything.

        :returns: whether there was anything to wipe.
        """
        length = min(HEADER_SIZE, target.size)
        if not length or not target.read(length, 0).strip(b"\0"):
            return False
        target.write(bytes(length), 0)
        target.flush()
        return True

    def _digest(self, target: _Target, start: int, end: int, digest: hashlib._Hash
                ) -> hashlib._Hash:
        target.hash_range(digest, start, end, self.CHUNK_SIZE)
        return digest

    def _open_target(self, location: str) -> _Target:
        shown = redact_target(location)
        if location.startswith(("nbd://", "nbd+unix://")):
            return self._open_nbd(location, shown)
        if location.startswith("iscsi://"):
            bridge = _ISCSIBridge(self._parse_iscsi(location, shown), shown)
            try:
                client = bridge.connect(self.timeout)
            except BaseException:
                bridge.close()
                raise
            return _BridgedTarget(client, bridge)
        if location.startswith("file://"):
            parts = urlsplit(location)
            if parts.netloc not in ("", "localhost"):
                raise StorageError(f"file URL with a remote host: {shown}", shown)
            return _FileTarget(Path(unquote(parts.path)), shown, direct=self.ex_direct,
                               block_size=self.CHUNK_SIZE)
        if "://" in location:
            raise StorageError(f"SAN storage cannot write to {shown}: use a path, "
                               f"nbd://, nbd+unix:// or iscsi://", shown)
        return _FileTarget(Path(location), shown, direct=self.ex_direct,
                           block_size=self.CHUNK_SIZE)

    def _open_nbd(self, location: str, shown: str) -> _Target:
        parts = urlsplit(location)
        export = unquote(parts.path.lstrip("/"))
        if parts.scheme == "nbd+unix":
            socket_path = parse_qs(parts.query).get("socket", [""])[0]
            if not socket_path:
                raise StorageError(f"{shown} names no ?socket=", shown)
            return _NBDTarget.connect_unix(socket_path, export, shown, self.timeout)
        try:
            port = parts.port or NBD_PORT
        except ValueError:
            raise StorageError(f"bad port in {shown}", shown) from None
        if not parts.hostname:
            raise StorageError(f"{shown} names no host", shown)
        return _NBDTarget.connect_tcp(parts.hostname, port, export, shown, self.timeout)

    def _parse_iscsi(self, location: str, shown: str) -> _ISCSILocation:
        match = re.match(r"^iscsi://(?:(?P<user>[^/@%]*)(?:%(?P<password>[^/@]*))?@)?"
                         r"(?P<host>\[[^\]]+\]|[^/:@]+)(?::(?P<port>\d+))?"
                         r"/(?P<iqn>[^/]+)/(?P<lun>\d+)$", location)
        if match is None:
            raise StorageError(f"iSCSI location must be iscsi://[user%password@]host[:port]"
                               f"/iqn/lun, not {shown}", shown)
        user = match["user"]
        return _ISCSILocation(
            host=match["host"].strip("[]"), port=int(match["port"] or ISCSI_PORT),
            iqn=unquote(match["iqn"]), lun=int(match["lun"]),
            user=unquote(user) if user else None,
            password=unquote(match["password"]) if match["password"] is not None else None,
            initiator=self.ex_initiator)
