"""Sparse file copies: holes stay holes."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["copy_sparse"]

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
