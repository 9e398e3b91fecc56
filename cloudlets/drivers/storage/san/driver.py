"""The SAN storage driver: :class:`SANStorage` (see :mod:`cloudlets.drivers.storage.san`)."""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, unquote, urlsplit

from cloudlets.drivers.base import StorageDriver, UploadSource
from cloudlets.drivers.storage.san.file import FileTarget
from cloudlets.drivers.storage.san.iscsi import (
    ISCSI_PORT,
    BridgedTarget,
    ISCSIBridge,
    ISCSILocation,
)
from cloudlets.drivers.storage.san.nbd import NBD_PORT, NBDTarget
from cloudlets.drivers.storage.san.target import ALIGNMENT, HEADER_SIZE, Target
from cloudlets.drivers.types import Storage, StorageCapability
from cloudlets.errors import StorageError

__all__ = ["SANStorage", "redact_target"]

log = logging.getLogger(__package__)  # the logger of cloudlets.drivers.storage.san, as before


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

    def _write_body(self, source: UploadSource, target: Target, shown: str, *,
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
    def _wipe_header(target: Target) -> bool:
        """Zero the first MiB, when it holds anything.

        :returns: whether there was anything to wipe.
        """
        length = min(HEADER_SIZE, target.size)
        if not length or not target.read(length, 0).strip(b"\0"):
            return False
        target.write(bytes(length), 0)
        target.flush()
        return True

    def _digest(self, target: Target, start: int, end: int, digest: hashlib._Hash
                ) -> hashlib._Hash:
        target.hash_range(digest, start, end, self.CHUNK_SIZE)
        return digest

    def _open_target(self, location: str) -> Target:
        shown = redact_target(location)
        if location.startswith(("nbd://", "nbd+unix://")):
            return self._open_nbd(location, shown)
        if location.startswith("iscsi://"):
            bridge = ISCSIBridge(self._parse_iscsi(location, shown), shown)
            try:
                client = bridge.connect(self.timeout)
            except BaseException:
                bridge.close()
                raise
            return BridgedTarget(client, bridge)
        if location.startswith("file://"):
            parts = urlsplit(location)
            if parts.netloc not in ("", "localhost"):
                raise StorageError(f"file URL with a remote host: {shown}", shown)
            return FileTarget(Path(unquote(parts.path)), shown, direct=self.ex_direct,
                               block_size=self.CHUNK_SIZE)
        if "://" in location:
            raise StorageError(f"SAN storage cannot write to {shown}: use a path, "
                               f"nbd://, nbd+unix:// or iscsi://", shown)
        return FileTarget(Path(location), shown, direct=self.ex_direct,
                           block_size=self.CHUNK_SIZE)

    def _open_nbd(self, location: str, shown: str) -> Target:
        parts = urlsplit(location)
        export = unquote(parts.path.lstrip("/"))
        if parts.scheme == "nbd+unix":
            socket_path = parse_qs(parts.query).get("socket", [""])[0]
            if not socket_path:
                raise StorageError(f"{shown} names no ?socket=", shown)
            return NBDTarget.connect_unix(socket_path, export, shown, self.timeout)
        try:
            port = parts.port or NBD_PORT
        except ValueError:
            raise StorageError(f"bad port in {shown}", shown) from None
        if not parts.hostname:
            raise StorageError(f"{shown} names no host", shown)
        return NBDTarget.connect_tcp(parts.hostname, port, export, shown, self.timeout)

    def _parse_iscsi(self, location: str, shown: str) -> ISCSILocation:
        match = re.match(r"^iscsi://(?:(?P<user>[^/@%]*)(?:%(?P<password>[^/@]*))?@)?"
                         r"(?P<host>\[[^\]]+\]|[^/:@]+)(?::(?P<port>\d+))?"
                         r"/(?P<iqn>[^/]+)/(?P<lun>\d+)$", location)
        if match is None:
            raise StorageError(f"iSCSI location must be iscsi://[user%password@]host[:port]"
                               f"/iqn/lun, not {shown}", shown)
        user = match["user"]
        return ISCSILocation(
            host=match["host"].strip("[]"), port=int(match["port"] or ISCSI_PORT),
            iqn=unquote(match["iqn"]), lun=int(match["lun"]),
            user=unquote(user) if user else None,
            password=unquote(match["password"]) if match["password"] is not None else None,
            initiator=self.ex_initiator)
