"""``qemu-img``, the converter every disk format driver shares."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from cloudlets.drivers.base import DiskImage, FormatContext
from cloudlets.errors import FormatError
from cloudlets.progress import PartProgress
from cloudlets.tools import run, run_streaming

__all__ = ["ConvertProgress", "convert", "info"]

#: Seconds a conversion may take before it is killed.
CONVERT_TIMEOUT = 3600.0


class ConvertProgress:
    """Reads ``qemu-img convert -p`` output as it arrives: the tool rewrites
    one line, ``    (12.34/100%)``, ending each update with a carriage
    return. Whatever else arrives (a warning, garbled bytes, a number past
    100) moves nothing; the percentage never goes back; at most
    :data:`MAX_PENDING` bytes of an unfinished update are kept.

    :param report: called as ``report(done, total)`` with the percentage
        mapped to bytes of ``total``, each time it advances.
    :param total: the bytes 100 % stands for (the disk's virtual size).
    """

    #: The longest unfinished update kept; qemu-img's are 16 bytes.
    MAX_PENDING = 64
    _UPDATE = re.compile(rb"\(\s*(\d{1,3}(?:\.\d{1,6})?)/100%\)")

    def __init__(self, report: PartProgress, total: int) -> None:
        self._report = report
        self.total = total
        self._pending = b""
        #: the highest percentage read so far
        self.percent = 0.0

    def feed(self, data: bytes) -> None:
        """Take the next bytes of the tool's standard output."""
        *lines, rest = re.split(rb"[\r\n]", self._pending + data)
        # an update cut in two waits for its end; a line longer than any
        # update cannot become one and is dropped
        self._pending = rest if len(rest) <= self.MAX_PENDING else b""
        best = self.percent
        for line in lines:
            for match in self._UPDATE.finditer(line):
                value = float(match.group(1))
                if value <= 100.0:
                    best = max(best, value)
        if best > self.percent:
            self.percent = best
            self._report(int(self.total * best / 100), self.total)


def convert(source: Path | DiskImage, target: Path, output_format: str, *,
            options: dict[str, str] | None = None, compress: bool = False,
            progress: PartProgress | None = None) -> None:
    """Convert a raw image with ``qemu-img convert``.

    :param source: the raw disk, or the disk stage's image, which may be
        made of pieces (:attr:`~cloudlets.drivers.base.DiskImage.pieces`):
        qemu-img then reads each piece as a raw slice of its file and
        concatenates them.
    :param target: the file to write (must not exist).
    :param output_format: qemu-img's format name (``qcow2``, ``vmdk``, ``vpc``).
    :param options: ``-o`` creation options.
    :param compress: compress the output's clusters (qcow2, vmdk streamOptimized).
    :param progress: called as ``progress(done, total)`` while qemu-img
        works (``qemu-img convert -p``), ``total`` being the disk's virtual
        size and ``done`` its share of it qemu-img says it converted; pass a
        driver's :attr:`FormatContext.progress
        <cloudlets.drivers.base.FormatContext.progress>`.
    :raises FormatError: when qemu-img fails.
    """
    sources: list[str | Path]
    if isinstance(source, Path):
        sources = ["-f", "raw", source]
    elif source.pieces:
        sources = [piece.qemu_source() for piece in source.pieces]
    else:
        sources = ["-f", "raw", source.path]
    listened = progress is not None and progress is not FormatContext.progress
    args: list[str | Path] = ["convert", "-p" if listened else "-q", "-O", output_format]
    if compress:
        args.append("-c")
    if options:
        args += ["-o", ",".join(f"{k}={v}" for k, v in sorted(options.items()))]
    args += [*sources, target]
    if progress is None or not listened:  # a context's default hook tells nobody
        run("qemu-img", args, error=FormatError, timeout=CONVERT_TIMEOUT)
        return
    try:
        size = source.stat().st_size if isinstance(source, Path) else source.size
    except OSError:
        size = 0  # qemu-img says what is wrong with it
    reader = ConvertProgress(progress, size)
    run_streaming("qemu-img", args, error=FormatError, on_stdout=reader.feed,
                  timeout=CONVERT_TIMEOUT)


def info(path: Path) -> dict[str, Any]:
    """:returns: ``qemu-img info --output=json`` of an image.

    :raises FormatError: when qemu-img cannot read it.
    """
    proc = run("qemu-img", ["info", "--output=json", path], error=FormatError, timeout=60)
    data: dict[str, Any] = json.loads(proc.stdout)
    return data
