"""``qemu-img``, the converter every disk format driver shares."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cloudlets.drivers.base import DiskImage
from cloudlets.errors import FormatError
from cloudlets.tools import run

__all__ = ["convert", "info"]

#: Seconds a conversion may take before it is killed.
CONVERT_TIMEOUT = 3600.0


def convert(source: Path | DiskImage, target: Path, output_format: str, *,
            options: dict[str, str] | None = None, compress: bool = False) -> None:
    """Convert a raw image with ``qemu-img convert``.

    :param source: the raw disk, or the disk stage's image, which may be
        made of pieces (:attr:`~cloudlets.drivers.base.DiskImage.pieces`):
        qemu-img then reads each piece as a raw slice of its file and
        concatenates them.
    :param target: the file to write (must not exist).
    :param output_format: qemu-img's format name (``qcow2``, ``vmdk``, ``vpc``).
    :param options: ``-o`` creation options.
    :param compress: compress the output's clusters (qcow2, vmdk streamOptimized).
    :raises FormatError: when qemu-img fails.
    """
    sources: list[str | Path]
    if isinstance(source, Path):
        sources = ["-f", "raw", source]
    elif source.pieces:
        sources = [piece.qemu_source() for piece in source.pieces]
    else:
        sources = ["-f", "raw", source.path]
    args: list[str | Path] = ["convert", "-q", "-O", output_format]
    if compress:
        args.append("-c")
    if options:
        args += ["-o", ",".join(f"{k}={v}" for k, v in sorted(options.items()))]
    args += [*sources, target]
    run("qemu-img", args, error=FormatError, timeout=CONVERT_TIMEOUT)


def info(path: Path) -> dict[str, Any]:
    """:returns: ``qemu-img info --output=json`` of an image.

    :raises FormatError: when qemu-img cannot read it.
    """
    proc = run("qemu-img", ["info", "--output=json", path], error=FormatError, timeout=60)
    data: dict[str, Any] = json.loads(proc.stdout)
    return data
