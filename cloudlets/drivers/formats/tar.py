"""``tar``: the rendered, configured root filesystem as a gzip tarball, as
the first cloudlets tool's ``tar --config`` produced.

The tree is the normalized tar the rootfs stage wrote (sorted, parents
first, numeric owners, templates rendered); compressing it with a fixed
gzip header (no name, mtime 0) keeps the output reproducible.
"""

from __future__ import annotations

import gzip
from typing import ClassVar

from cloudlets.drivers.base import FormatContext, FormatDriver, OutputFile
from cloudlets.drivers.types import Format, FormatCapability
from cloudlets.errors import FormatError

__all__ = ["TarFormat"]


class TarFormat(FormatDriver):
    """The configured root filesystem as ``.tar.gz``.

    :param ex_compresslevel: gzip level, 1 (fast) to 9 (small).
    """

    name: ClassVar[str] = Format.TAR
    website: ClassVar[str] = "https://www.gnu.org/software/tar/manual/html_node/Formats.html"
    description: ClassVar[str] = "Configured root filesystem tarball (.tar.gz)"
    capabilities: ClassVar[FormatCapability] = FormatCapability.NEEDS_TREE
    extension = ".tar.gz"
    #: Bytes of the tree compressed at a time.
    CHUNK_SIZE: ClassVar[int] = 1024 * 1024

    def __init__(self, ex_compresslevel: int = 6) -> None:
        self.compresslevel = ex_compresslevel

    def convert(self, context: FormatContext) -> list[OutputFile]:
        tree = context.disk.tree_tar
        if tree is None or not tree.is_file():
            raise FormatError("the tar format needs the rendered root filesystem tree, "
                              "which the disk stage did not provide")
        name = f"{context.basename}.tar.gz"
        target = context.workdir / name
        size = tree.stat().st_size
        done = 0
        with open(tree, "rb") as src, open(target, "xb") as raw, \
                gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0,
                              compresslevel=self.compresslevel) as dst:
            while chunk := src.read(self.CHUNK_SIZE):
                dst.write(chunk)
                done += len(chunk)
                context.progress(done, size)
        return [OutputFile(role="rootfs", path=target, name=name, media_type="application/gzip")]
