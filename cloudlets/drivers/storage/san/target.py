"""What every block target offers the driver: :class:`Target`."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod

from cloudlets.errors import StorageError

__all__ = ["ALIGNMENT", "HEADER_SIZE", "Target"]

#: The leading bytes written last and wiped on failure or delete.
HEADER_SIZE = 1024 * 1024
#: Alignment of every write but the image's tail (and of O_DIRECT buffers).
ALIGNMENT = 4096


class Target(ABC):
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
