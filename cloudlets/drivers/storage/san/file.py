"""A local block device or regular file: :class:`FileTarget` (``pwrite``,
optionally ``O_DIRECT``, ``fsync``)."""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path

from cloudlets.drivers.storage.san.target import ALIGNMENT, HEADER_SIZE, Target
from cloudlets.errors import StorageError

__all__ = ["FileTarget"]


class FileTarget(Target):
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
