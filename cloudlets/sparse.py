"""Sparse file copies: holes stay holes (or no copy at all: :func:`link_or_copy`),
and files described as pieces of other files (:class:`Piece`)."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Piece", "copy_sparse", "data_ranges", "link_or_copy", "merge_ranges"]

_CHUNK = 4 * 1024 * 1024


def copy_sparse(source: Path, target: Path) -> None:
    """Copy ``source`` to a new file ``target``, skipping holes with
    ``SEEK_DATA``/``SEEK_HOLE`` so only data extents are read and written.

    :raises FileExistsError: when ``target`` exists.
    """
    size = source.stat().st_size
    with open(source, "rb") as src, open(target, "xb") as dst:
        dst.truncate(size)
        offset = 0
        while offset < size:
            try:
                data_start = os.lseek(src.fileno(), offset, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole remains
                break
            hole = os.lseek(src.fileno(), data_start, os.SEEK_HOLE)
            src.seek(data_start)
            dst.seek(data_start)
            remaining = hole - data_start
            while remaining:
                chunk = src.read(min(_CHUNK, remaining))
                if not chunk:
                    break
                dst.write(chunk)
                remaining -= len(chunk)
            offset = hole


def link_or_copy(source: Path, target: Path) -> None:
    """Give the new file ``target`` the bytes of ``source``: a hard link
    when both are on one file system, else a :func:`copy_sparse`. For a
    source nothing writes to any more (a format driver's input disk):
    ``target`` is the same file, so changing one changes the other.

    :raises FileExistsError: when ``target`` exists.
    """
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:  # another file system, no hard links there: copy
        copy_sparse(source, target)


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


def data_ranges(fd: int, size: int | None = None) -> list[tuple[int, int]]:
    """:returns: the ``[start, end)`` ranges of the first ``size`` bytes
    (default: all) of the open file ``fd`` that may hold data, found with
    ``SEEK_DATA``/``SEEK_HOLE``; all of it where those are missing."""
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
            return [(0, size)]
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
