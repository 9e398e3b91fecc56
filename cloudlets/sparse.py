"""Sparse file copies: holes stay holes (or no copy at all: :func:`link_or_copy`)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["copy_sparse", "link_or_copy"]

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
