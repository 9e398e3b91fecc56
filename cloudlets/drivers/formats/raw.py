"""``raw``: the bootable disk as is, a sparse file."""

from __future__ import annotations

from typing import ClassVar

from cloudlets.drivers.base import FormatContext, FormatDriver, OutputFile
from cloudlets.drivers.types import Format, FormatCapability
from cloudlets.sparse import link_or_copy

__all__ = ["RawFormat"]


class RawFormat(FormatDriver):
    """The raw disk image, holes kept as holes: a hard link to the input
    disk where the work directory shares its file system, else a sparse copy."""

    name: ClassVar[str] = Format.RAW
    website: ClassVar[str] = "https://en.wikipedia.org/wiki/IMG_(file_format)"
    description: ClassVar[str] = "Raw sparse disk image (.raw)"
    capabilities: ClassVar[FormatCapability] = FormatCapability.BOOTABLE
    extension = ".raw"

    def convert(self, context: FormatContext) -> list[OutputFile]:
        name = f"{context.basename}.raw"
        target = context.workdir / name
        link_or_copy(context.disk.path, target, progress=context.progress)
        return [OutputFile(role="disk", path=target, name=name)]
