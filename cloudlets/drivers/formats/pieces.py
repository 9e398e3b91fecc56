"""Reading the disk a format driver receives, whole or as pieces.

The disk stage hands a driver with
:attr:`~cloudlets.drivers.types.FormatCapability.COMPOSED_DISK` the disk as
:attr:`~cloudlets.drivers.base.DiskImage.pieces` (the cached base
filesystem, the blocks a render patched, the rest of the disk) instead of
one file. :class:`DiskReader` reads either form by virtual offset and finds
the ranges that may hold data (holes of the files, by ``SEEK_DATA``, are
never read); :func:`copy_disk` writes the disk into one new file, sparse,
in the kernel where it can.
"""

from __future__ import annotations

import bisect
import errno
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cloudlets.drivers.base import DiskImage
from cloudlets.errors import FormatError
from cloudlets.sparse import Piece, data_ranges, merge_ranges

__all__ = ["DiskReader", "Span", "copy_disk", "disk_pieces"]

#: How ``copy_file_range`` says it cannot copy between these two files.
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.ENOTSUP,
                             errno.EOPNOTSUPP})
_CHUNK = 4 * 1024 * 1024


def disk_pieces(source: Path | DiskImage) -> tuple[tuple[Piece, ...], int]:
    """The pieces a disk is made of, and its size.

    :param source: a raw disk file, or the disk stage's image (its
        :attr:`~cloudlets.drivers.base.DiskImage.pieces`, else its
        :attr:`~cloudlets.drivers.base.DiskImage.path`).
    :raises FormatError: the disk is empty or cannot be read.
    """
    if isinstance(source, Path):
        try:
            size = source.stat().st_size
        except OSError as exc:
            raise FormatError(f"cannot read the disk {source}: {exc.strerror}") from None
        pieces: tuple[Piece, ...] = (Piece(source, 0, size),)
    else:
        size = source.size
        pieces = source.pieces or (Piece(source.path, 0, size),)
    if size <= 0:
        raise FormatError("the disk is empty")
    return pieces, size


@dataclass(frozen=True)
class Span:
    """A piece at its place in the disk: virtual bytes ``[start, end)``."""

    start: int
    end: int
    piece: Piece


class DiskReader:
    """The disk as pieces of open files; reads a byte range of it. Close it
    (:meth:`close`) when done.

    :param pieces: the disk's pieces, in order (:func:`disk_pieces`).
    :param size: the disk's size: the pieces must cover exactly that.
    :raises FormatError: a piece's file cannot be opened or is shorter than
        the piece, or the pieces do not cover ``size`` bytes.
    """

    def __init__(self, pieces: Sequence[Piece], size: int) -> None:
        self.size = size
        self.spans: list[Span] = []
        self._fds: dict[Path, int] = {}
        position = 0
        try:
            for piece in pieces:
                if piece.length < 0 or piece.offset < 0:
                    raise FormatError(f"a disk piece of {piece.path} has a negative range")
                if piece.length:
                    self.spans.append(Span(position, position + piece.length, piece))
                    if piece.path not in self._fds:
                        self._fds[piece.path] = os.open(piece.path, os.O_RDONLY)
                    have = os.fstat(self._fds[piece.path]).st_size
                    if piece.offset + piece.length > have:
                        raise FormatError(f"{piece.path} ended at byte {have}; the disk's "
                                          f"piece needs it up to {piece.offset + piece.length}")
                position += piece.length
        except OSError as exc:
            self.close()
            raise FormatError(f"cannot open the disk piece {exc.filename}: "
                              f"{exc.strerror}") from None
        except BaseException:
            self.close()
            raise
        if position != size:
            self.close()
            raise FormatError(f"the disk's pieces cover {position} bytes of its {size}")
        self._starts = [span.start for span in self.spans]

    def close(self) -> None:
        """Close the pieces' files."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def fd(self, path: Path) -> int:
        return self._fds[path]

    def data_ranges(self) -> list[tuple[int, int]]:
        """The virtual ranges that may hold data (holes of the files skipped)."""
        per_file: dict[Path, list[tuple[int, int]]] = {}
        found: list[tuple[int, int]] = []
        for span in self.spans:
            piece = span.piece
            ranges = per_file.get(piece.path)
            if ranges is None:
                ranges = per_file[piece.path] = data_ranges(self._fds[piece.path])
            low, high = piece.offset, piece.offset + piece.length
            index = bisect.bisect_right(ranges, (low, 1 << 63)) - 1
            for start, end in ranges[max(index, 0):]:
                if start >= high:
                    break
                start, end = max(start, low), min(end, high)
                if start < end:
                    found.append((span.start + start - low, span.start + end - low))
        return merge_ranges(found)

    def spans_over(self, start: int, end: int) -> Iterator[Span]:
        index = bisect.bisect_right(self._starts, start) - 1
        for span in self.spans[max(index, 0):]:
            if span.start >= end:
                break
            if span.end > start:
                yield span

    def read(self, start: int, length: int) -> bytes:
        """``length`` bytes from ``start`` on; zeros past the disk's end."""
        end = min(start + length, self.size)
        parts: list[bytes] = []
        for span in self.spans_over(start, end):
            low, high = max(start, span.start), min(end, span.end)
            offset = span.piece.offset + low - span.start
            try:
                chunk = os.pread(self._fds[span.piece.path], high - low, offset)
            except OSError as exc:
                raise FormatError(f"cannot read {span.piece.path} at byte {offset}: "
                                  f"{exc.strerror}") from None
            if len(chunk) != high - low:
                raise FormatError(f"{span.piece.path} ended at byte {offset + len(chunk)}; "
                                  f"the disk's piece needs it up to {offset + high - low}")
            parts.append(chunk)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        if len(data) < length:
            data += bytes(length - len(data))
        return data


def copy_disk(source: Path | DiskImage, target: Path, *, size: int | None = None) -> None:
    """Write the disk into the new file ``target``, holes kept (in the
    kernel with ``copy_file_range`` where the file systems allow).

    :param size: the target's length (at least the disk's; default the disk's).
    :raises FormatError: a piece cannot be read or ends early.
    :raises FileExistsError: ``target`` exists.
    """
    pieces, disk_size = disk_pieces(source)
    reader = DiskReader(pieces, disk_size)
    try:
        with open(target, "xb") as out:
            try:
                out.truncate(max(size or 0, disk_size))
                _copy_spans(reader, out.fileno())
            except BaseException:
                out.close()
                target.unlink(missing_ok=True)
                raise
    finally:
        reader.close()


def _copy_spans(reader: DiskReader, fd: int) -> None:
    in_kernel = True
    for start, end in reader.data_ranges():
        for span in reader.spans_over(start, end):
            low, high = max(start, span.start), min(end, span.end)
            src = reader.fd(span.piece.path)
            offset = span.piece.offset + low - span.start
            while low < high:
                if in_kernel:
                    try:
                        done = os.copy_file_range(src, fd, high - low, offset, low)
                    except OSError as exc:
                        if exc.errno not in _NO_KERNEL_COPY:
                            raise FormatError(f"cannot copy {span.piece.path}: "
                                              f"{exc.strerror}") from None
                        in_kernel = False  # another file system: read and write
                        continue
                else:
                    chunk = os.pread(src, min(_CHUNK, high - low), offset)
                    done = os.pwrite(fd, chunk, low) if chunk else 0
                if done == 0:
                    raise FormatError(f"{span.piece.path} ended at byte {offset} while copied")
                low += done
                offset += done
