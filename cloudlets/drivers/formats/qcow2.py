"""``qcow2``: QEMU copy-on-write v2, compact and self-contained.

Written by :mod:`~cloudlets.drivers.formats.qcow2_writer` (zero clusters
stay unallocated), which hashes the file in the pass that writes it, so the
storage need not read it again; with ``ex_compress``, by ``qemu-img convert
-c``. Never with a backing file: the output must stand alone wherever it is
imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from cloudlets.drivers.base import BaseInDisk, FormatContext, FormatDriver, HeadStart, OutputFile
from cloudlets.drivers.formats import qemuimg
from cloudlets.drivers.formats.qcow2_writer import PrefixCopy, write_qcow2
from cloudlets.drivers.types import Format, FormatCapability
from cloudlets.errors import FormatError
from cloudlets.sparse import Piece

__all__ = ["Qcow2Format"]


class Qcow2Format(FormatDriver):
    """qcow2 (compat 1.1), no backing file.

    :param ex_compress: compress clusters with zlib (smaller, slower).
    """

    name: ClassVar[str] = Format.QCOW2
    website: ClassVar[str] = "https://www.qemu.org/docs/master/interop/qcow2.html"
    description: ClassVar[str] = "QEMU qcow2 v3 image, self-contained (.qcow2)"
    capabilities: ClassVar[FormatCapability] = (FormatCapability.BOOTABLE
                                                 | FormatCapability.COMPOSED_DISK)
    extension = ".qcow2"

    def __init__(self, ex_compress: bool = False) -> None:
        self.compress = ex_compress

    def head_start(self, base: BaseInDisk, workdir: Path, basename: str) -> HeadStart | None:
        """Copy the file's header and the base's clusters (the same for
        every render over ``base``) while the render patches the base: a
        :class:`~cloudlets.drivers.formats.qcow2_writer.PrefixCopy`."""
        if self.compress:
            return None
        return PrefixCopy.start(base.path, start=base.start, disk_size=base.disk_size,
                                target=workdir / f"{basename}.qcow2")

    def convert(self, context: FormatContext) -> list[OutputFile]:
        name = f"{context.basename}.qcow2"
        target = context.workdir / name
        ahead = context.head_start if isinstance(context.head_start, PrefixCopy) else None
        if not self.compress:
            disk = context.disk
            pieces = disk.pieces or (Piece(disk.path, 0, disk.path.stat().st_size),)
            unpatched = disk.unpatched if disk.pieces and disk.unpatched else None
            digest = write_qcow2(pieces, target, unpatched=unpatched, progress=context.progress,
                                 ahead=ahead)
            return [OutputFile(role="disk", path=target, name=name,
                               media_type="application/x-qemu-disk", sha256=digest)]
        qemuimg.convert(context.disk, target, "qcow2", options={"compat": "1.1"},
                        compress=True, progress=context.progress)
        details = qemuimg.info(target)
        if details.get("format") != "qcow2" or "backing-filename" in details:
            raise FormatError(f"qemu-img wrote {target.name} as {details.get('format')!r} "
                              f"with backing file {details.get('backing-filename')!r}")
        return [OutputFile(role="disk", path=target, name=name,
                           media_type="application/x-qemu-disk")]
