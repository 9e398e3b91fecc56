"""Reading a root filesystem tarball from someone we do not trust.

:func:`read_tarball` streams the archive once (uncompressed, gzip, xz, bzip2
or zstd, told apart by their magic bytes), checks every member against an
:class:`ArchivePolicy`, leaves out the manifest's ``volatile`` paths, and
builds a :class:`RootTree`: the metadata of every member in memory, the content
of regular files in one anonymous spool file. Nothing is ever extracted to the
host filesystem, so no member (and no symlink, however it points) can reach
outside the work area: paths are only ever looked up in the model. The
archive is decompressed on a worker thread (:mod:`cloudlets.rootfs.stream`)
while this one parses it; plain ustar headers are parsed by
:mod:`cloudlets.rootfs.tar`, the rest by :mod:`tarfile`.

:meth:`RootTree.write_tar` then writes the tree the disk stage consumes: a
clean, normalized, uncompressed PAX tar, sorted (parents before children),
with numeric owners, ``SCHILY.xattr.*`` extended attributes, rendered
templates in place of their sources, and mtimes clamped to
``SOURCE_DATE_EPOCH`` when one is given (member times are already within
``0 ..`` :data:`~cloudlets.rootfs.policy.MAX_TIME` once read).

The package's modules, each importing only those before it:

- :mod:`~cloudlets.rootfs.policy`: :class:`ArchivePolicy` and the normalization
  of member names;
- :mod:`~cloudlets.rootfs.entry`: :class:`Entry` and :class:`EntryType`;
- :mod:`~cloudlets.rootfs.stream`: the compression (told by its magic bytes,
  decompressed, its errors) and the metered uncompressed stream;
- :mod:`~cloudlets.rootfs.tar`: the tar codec (headers written and parsed);
- :mod:`~cloudlets.rootfs.tree`: :class:`RootTree`, :class:`TreeStream`,
  :func:`image_metadata`;
- :mod:`~cloudlets.rootfs.reader`: :func:`read_tarball`.

Typical use::

    with read_tarball(path, volatile=manifest.volatile,
                      persistent=manifest.persistent) as tree:
        tree.write_tar(work / "tree.tar", replacements=rendered)
"""

from cloudlets.rootfs.entry import Entry, EntryType
from cloudlets.rootfs.policy import ArchivePolicy
from cloudlets.rootfs.reader import read_tarball
from cloudlets.rootfs.stream import Compression, detect_compression
from cloudlets.rootfs.tree import METADATA_PATH, RootTree, TreeStream, image_metadata

__all__ = [
    "METADATA_PATH",
    "ArchivePolicy",
    "Compression",
    "Entry",
    "EntryType",
    "RootTree",
    "TreeStream",
    "detect_compression",
    "image_metadata",
    "read_tarball",
]
