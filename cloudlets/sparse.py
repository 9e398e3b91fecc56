"""Sparse file copies: holes stay holes (or no copy at all: :func:`link_or_copy`),
and files described as pieces of other files (:class:`Piece`)."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cloudlets.errors import CloudletsError

if TYPE_CHECKING:
    from cloudlets.progress import PartProgress

__all__ = ["Piece", "copy_into", "copy_sparse", "data_ranges", "link_or_copy", "merge_ranges",
           "overlay"]

_CHUNK = 4 * 1024 * 1024
#: With a progress callback, the most one ``copy_file_range`` call copies.
_PROGRESS_CHUNK = 64 * 1024 * 1024
#: How a file system says it cannot answer ``SEEK_DATA``/``SEEK_HOLE`` at all.
_NO_SEEK_DATA = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})
#: How ``copy_file_range`` says it cannot copy between these two files.
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.ENOTSUP,
                             errno.EOPNOTSUPP})


def copy_sparse(source: Path, target: Path, *,
                error: type[CloudletsError] = CloudletsError,
                progress: PartProgress | None = None) -> None:
    """Copy ``source`` to a new file ``target``, skipping holes: only the
    :func:`data_ranges` of ``source`` are read and written.

    :param error: the error to raise when ``source`` ends early (the
        caller's stage: :class:`~cloudlets.errors.DiskError`,
        :class:`~cloudlets.errors.FormatError`...).
    :param progress: called as ``progress(done, total)`` as the copy
        advances: ``done`` bytes of ``source`` (holes included) of its
        ``total`` size are copied.
    :raises FileExistsError: when ``target`` exists.
    """
    with open(target, "xb") as dst:
        dst.truncate(source.stat().st_size)
        copy_into(source, dst.fileno(), 0, error=error, progress=progress)


def copy_into(source: Path, fd: int, offset: int, *,
              error: type[CloudletsError] = CloudletsError,
              progress: PartProgress | None = None) -> None:
    """Copy the :func:`data_ranges` of ``source`` into the open file ``fd``
    at ``offset`` on (in the kernel where it can: ``copy_file_range``); the
    target's holes over ``source``'s holes stay holes.

    :param error: as for :func:`copy_sparse`.
    :param progress: as for :func:`copy_sparse`.
    :raises CloudletsError: ``error``, when ``source`` ends early.
    """
    with open(source, "rb") as src:
        sfd = src.fileno()
        size = os.fstat(sfd).st_size
        in_kernel = True
        # with a progress callback, the kernel copies in slices it can report
        kernel_chunk = _PROGRESS_CHUNK if progress is not None else None
        for start, end in data_ranges(sfd, size):
            while start < end:
                if not in_kernel:
                    length = min(_CHUNK, end - start)
                elif kernel_chunk is not None:
                    length = min(kernel_chunk, end - start)
                else:
                    length = end - start
                if in_kernel:
                    try:
                        copied = os.copy_file_range(sfd, fd, length, start, offset + start)
                    except OSError as exc:
                        if exc.errno not in _NO_KERNEL_COPY:
                            raise
                        in_kernel = False  # another file system, or none: read and write
                        continue
                else:
                    chunk = os.pread(sfd, length, start)
                    copied = len(chunk)
                    if copied:
                        copied = os.pwrite(fd, chunk, offset + start)
                if copied == 0:
                    raise error(f"{source} ended at byte {start} while copied; "
                                f"it had data up to {end}")
                start += copied
                if progress is not None:
                    progress(start, size)
        if progress is not None:
            progress(size, size)


def link_or_copy(source: Path, target: Path, *,
                 progress: PartProgress | None = None) -> None:
    """Give the new file ``target`` the bytes of ``source``: a hard link
    when both are on one file system, else a :func:`copy_sparse`. For a
    source nothing writes to any more (a format driver's input disk):
    ``target`` is the same file, so changing one changes the other.

    :param progress: as for :func:`copy_sparse` (a link is all of it at once).
    :raises FileExistsError: when ``target`` exists.
    """
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:  # another file system, no hard links there: copy
        copy_sparse(source, target, progress=progress)
        return
    if progress is not None:
        size = source.stat().st_size
        progress(size, size)


@dataclass(frozen=True)
class Piece:
    """``length`` bytes of ``path`` from ``offset`` on: one piece of a file
    that is the concatenation of pieces (a disk image made of the cached
    root filesystem, the blocks a render patched and the rest of the disk)."""

    path: Path
    offset: int
    length: int

    def qemu_source(self) -> str:
        """This piece as a ``qemu-img`` source (a raw slice of the file);
        ``qemu-img convert`` concatenates several sources in order."""
        import json

        spec = {"driver": "raw", "offset": self.offset, "size": self.length,
                "file": {"driver": "file", "filename": str(self.path)}}
        return "json:" + json.dumps(spec, sort_keys=True)


def overlay(base: Path, size: int, over: Path,
            ranges: Sequence[tuple[int, int]]) -> list[Piece]:
    """The first ``size`` bytes of ``base`` with the ``[start, end)`` byte
    ``ranges`` (sorted, not overlapping) taken from ``over`` at the same
    offsets, as pieces in order (a cached filesystem and the blocks a patch
    changed in a copy of it)."""
    pieces: list[Piece] = []
    position = 0
    for start, end in ranges:
        if start > position:
            pieces.append(Piece(base, position, start - position))
        pieces.append(Piece(over, start, end - start))
        position = end
    if position < size:
        pieces.append(Piece(base, position, size - position))
    return pieces


def data_ranges(fd: int, size: int | None = None) -> list[tuple[int, int]]:
    """The ``[start, end)`` ranges of the first ``size`` bytes (default: all)
    of the open file ``fd`` that may hold data, found with
    ``SEEK_DATA``/``SEEK_HOLE``: the one walk every sparse copy uses.

    ``ENXIO`` from ``SEEK_DATA`` means only a hole is left. A file system
    that refuses ``SEEK_DATA`` altogether (``EINVAL``, ``ENOTSUP`` or
    ``EOPNOTSUPP`` at offset 0) cannot tell holes from data: the whole file
    is then data, never "all holes" (a copy of zeros).

    :raises OSError: ``lseek`` failed any other way.
    """
    if size is None:
        size = os.fstat(fd).st_size
    ranges: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole remains
                break
            if offset == 0 and exc.errno in _NO_SEEK_DATA:
                return [(0, size)]
            raise
        if start >= size:
            break
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        ranges.append((start, end))
        offset = end
    return ranges


def merge_ranges(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping ``[start, end)`` ranges, touching ones joined."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(r for r in ranges if r[1] > r[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged
