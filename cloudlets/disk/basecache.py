"""The disk stage over the cache of base filesystems: what one render reads,
streams and builds, given what the cache holds.

A *base* is the root filesystem of a cloudlet's tree before its templates
are rendered: the same manifest, tarball and clock give the same base, so it
is cached (under ``<cache>/bases``) and a render only patches its templated
files into a copy of it (:func:`~cloudlets.disk.build_disk`). A render takes
one of three ways, chosen here and nowhere else:

* **re-render**: the base and the tree's index are cached; the tree comes
  from the index, its templates' sources from the base, and the tarball is
  not read (:meth:`DiskPlan.cached_tree`);
* **cold render, streamed**: ``mke2fs`` builds the base while the tarball is
  read (:class:`~cloudlets.disk.assemble.BaseStream`), so the tree is never
  written out as a tar (:meth:`DiskPlan.read`);
* **two passes**: the base is built from the tree's tar once the tree is
  read (no root size or clock, old e2fsprogs, a tarball that cannot be
  streamed, a download that started over under its reader).

The :class:`~cloudlets.renderer.Renderer` runs the stages in order and asks
a :class:`DiskPlan` at each step; formats that ship the tree, not a disk,
get the rendered tree's tar from the same plan.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

from cloudlets.disk import ext4
from cloudlets.disk.assemble import BaseStream, base_cached, base_paths, build_disk
from cloudlets.disk.spec import BootSpec
from cloudlets.drivers.base import DiskImage
from cloudlets.errors import CloudletsError
from cloudlets.progress import StageMeter

if TYPE_CHECKING:
    from cloudlets.cache import CacheEntry
    from cloudlets.manifest import Manifest
    from cloudlets.progress import ProgressCallback
    from cloudlets.rootfs import ArchivePolicy, RootTree

__all__ = ["BASE_FORMAT", "DiskPlan", "boot_spec"]

#: Bump when the base tree a render builds from the same inputs changes, so
#: cached base filesystems from older versions are not reused.
BASE_FORMAT = "cloudlets-base-1"


def boot_spec(manifest: Manifest) -> BootSpec:
    """The manifest's ``boot`` section as the disk stage takes it.

    :raises DiskError: a value the schema cannot fully check is out of range.
    """
    boot = manifest.boot
    assert boot is not None  # Manifest.require_renderable() checked
    spec = BootSpec(kernel=boot.kernel, initrd=boot.initrd, cmdline=boot.cmdline,
                    firmware=boot.firmware,  # type: ignore[arg-type]
                    partition_table=boot.partition_table,  # type: ignore[arg-type]
                    fstype=boot.fstype,  # type: ignore[arg-type]
                    root_size=boot.root_size, label=boot.label, disk_size=boot.disk_size)
    spec.validate()
    return spec


class DiskPlan:
    """One render's way through rootfs → templates → disk over the base
    cache. Use it as a context manager: leaving it stops a ``mke2fs`` still
    streaming (a render that failed half-way caches nothing).

    :param manifest: the validated manifest (with a ``filesystem`` section,
        and a ``boot`` section unless ``tree``).
    :param base_cache: the directory of cached bases.
    :param workdir: the render's scratch directory.
    :param source_date_epoch: the render's clock, if pinned.
    :param archive_policy: the limits the tarball is read under.
    :param tree: the format ships the rendered tree (its tar), not a disk.
    :param compose: the format reads the disk as pieces
        (:attr:`~cloudlets.drivers.types.FormatCapability.COMPOSED_DISK`).
    :ivar stage: the last stage's name: ``"disk"``, or ``"tree"``.
    """

    def __init__(self, manifest: Manifest, *, base_cache: Path, workdir: Path,
                 source_date_epoch: int | None, archive_policy: ArchivePolicy,
                 tree: bool, compose: bool) -> None:
        fs = manifest.filesystem
        assert fs is not None  # Manifest.require_renderable() checked
        self._manifest = manifest
        self._workdir = workdir
        self._epoch = source_date_epoch
        self._policy = archive_policy
        self._compose = compose
        self._base_cache = base_cache
        self.stage = "tree" if tree else "disk"
        self._seed = hashlib.sha256(f"{manifest.digest}\0{fs.sha256}".encode()).hexdigest()
        #: what identifies the tree the base is made of, before its templates
        self._tree_digest = hashlib.sha256(
            f"{BASE_FORMAT}\0{manifest.digest}\0{fs.sha256}\0{source_date_epoch}"
            .encode()).hexdigest()
        self._boot = None if tree else boot_spec(manifest)
        self._stream: BaseStream | None = None
        self._meter = StageMeter(None, "rootfs", 0)
        self._streamed = False
        self._from_index = False

    def __enter__(self) -> DiskPlan:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self._stream is not None:
            self._stream.abort()

    def cached_tree(self) -> RootTree | None:
        """The tree of a re-render, from the cached base and the tree's index.

        :returns: the tree, or ``None`` when the tarball must be read
            (:meth:`read`).
        """
        from cloudlets.rootfs import RootTree

        if self._boot is None or not base_cached(self._boot, **self._lookup()):
            return None
        base_image, index = base_paths(self._boot, **self._lookup())
        with contextlib.suppress(ValueError):  # a damaged index: read the tarball
            tree = RootTree.from_index(index, functools.partial(ext4.read_file, base_image),
                                       workdir=self._workdir)
            self._from_index = True
            return tree
        return None

    def read(self, entry: CacheEntry, progress: ProgressCallback | None = None) -> RootTree:
        """Read the tree from the tarball ``entry``, while it may still be
        downloading, into ``mke2fs`` as well when the base can be streamed;
        a tree from a tarball that failed verification is never returned.

        :param progress: for a tarball already in the cache, told the
            ``rootfs`` stage's bytes as the tarball is read (from the thread
            that reads it); one still downloading is followed by the download's
            own ``fetch`` progress instead.
        :raises CloudletsError: the tarball is refused or its download failed.
        """
        self._meter = StageMeter(progress if entry.hit else None, "rootfs",
                                 entry.path.stat().st_size if entry.hit else 0)
        tree = self._read(entry)
        self._meter.finish()
        return tree

    def _read(self, entry: CacheEntry) -> RootTree:
        if self._boot is not None:
            # mke2fs builds the base while the tarball is read
            self._stream = BaseStream.open(self._boot, **self._lookup(),
                                           workdir=self._workdir / "stream",
                                           clamp=self._epoch)
        stream = self._stream
        tree = self._read_following(entry, stream)
        if tree is None:  # the download started over under its reader
            if stream is not None:
                stream.abort()
                stream.reason = "the download started over while read"
            return self._read_tree(entry.path, None)
        if stream is None:
            return tree
        try:
            self._streamed = stream.close(tree)
        except BaseException:
            tree.close()
            raise
        if self._streamed:  # templates read from the base mke2fs built
            return tree
        tree.close()  # the rare tarball that cannot be streamed: read it again
        return self._read_tree(entry.path, None)

    def rootfs_details(self, tree: RootTree, rendered: Mapping[str, bytes]) -> dict[str, Any]:
        """What the render records about the tree.

        :returns: ``RenderResult.details["rootfs"]``.
        """
        details: dict[str, Any] = {
            "entries": len(tree), "dropped": len(tree.dropped),
            "persistent": list(tree.persistent), "templates": sorted(rendered),
            "compression": tree.compression.value}
        if self._stream is not None:
            details["streamed"] = self._streamed
            if not self._streamed:
                details["not_streamed"] = self._stream.reason
        return details

    def build(self, tree: RootTree, rendered: Mapping[str, bytes],
              progress: ProgressCallback | None = None) -> DiskImage:
        """Make what the format driver converts: the bootable raw disk with
        the rendered templates, or, for a format that ships the tree, the
        rendered tree's tar. :attr:`DiskImage.details` is what the render
        records about the disk (``RenderResult.details["disk"]``).

        :param progress: told the :attr:`stage`'s bytes as it advances: for
            the tree, the tree's content written as a tar; for the disk,
            when the root filesystem is made in this stage, the tree's
            content written as a tar and read by ``mke2fs``, then the root
            filesystem (planned: its size, or an estimate when the tree sets
            it) copied into the disk or composed with it.
        :raises DiskError: the disk cannot be built.
        """
        workdir = self._workdir
        if self._boot is None:
            data = tree.total_size
            meter = StageMeter(progress, self.stage, data)
            tree_tar = tree.write_tar(workdir / "rendered-tree.tar", replacements=rendered,
                                      source_date_epoch=self._epoch,
                                      progress=meter.part(data) if progress else None)
            meter.finish()
            boot = self._manifest.boot
            return DiskImage(path=tree_tar, size=tree_tar.stat().st_size,
                             firmware=boot.firmware if boot is not None else "bios",
                             tree_tar=tree_tar, details={"kind": "tree"},
                             source_date_epoch=self._epoch)
        base_tar = None
        cold = not self._streamed and not base_cached(self._boot, **self._lookup())
        # a walk of every entry, needed only while the base is not built
        data = 0 if base_cached(self._boot, **self._lookup()) else tree.total_size
        # the tree's tar (written, then read by mke2fs), then the root filesystem
        meter = StageMeter(progress, self.stage,
                           (2 * data if cold else 0) + self._root_bytes(tree, data))
        if cold:
            base_tar = tree.write_tar(workdir / "base-tree.tar", source_date_epoch=self._epoch,
                                      progress=meter.part(data) if progress else None)
        built = meter.part(meter.total - (data if cold else 0))
        image = build_disk(
            base_tar, self._boot, workdir / "disk.raw", seed=self._seed,
            workdir=workdir / "disk", source_date_epoch=self._epoch,
            base_cache=self._base_cache, patch_files=rendered, tree_digest=self._tree_digest,
            sync=False,  # an intermediate: the storage makes its copy durable
            compose=self._compose, progress=built if progress else None)
        if base_tar is not None:  # gone now, its dirty pages are never written
            base_tar.unlink()
        if not self._from_index:
            tree.write_index(base_paths(self._boot, **self._lookup())[1])  # for a re-render
        meter.finish()
        # a base this render streamed was built now, not found in the cache
        return image.for_formats(details={**image.record(),
                                          "base_cached": image.base_cached
                                          and not self._streamed})

    # -- private helpers ----------------------------------------------------

    def _root_bytes(self, tree: RootTree, data: int) -> int:
        """The root filesystem's size, as the disk stage plans its progress:
        the cached base's, else ``boot.root.size``, else an estimate from
        the tree (the exact size is known once its tar is scanned)."""
        assert self._boot is not None
        if base_cached(self._boot, **self._lookup()):
            return base_paths(self._boot, **self._lookup())[0].stat().st_size
        if self._boot.root_size is not None:
            return self._boot.root_size
        return ext4.root_size_for(ext4.TreeStats(entries=len(tree), data_bytes=data,
                                                 max_mtime=0, xattr_entries=()))

    def _lookup(self) -> dict[str, Any]:
        """What identifies the cached base, for :mod:`cloudlets.disk.assemble`."""
        return {"seed": self._seed, "tree_digest": self._tree_digest,
                "source_date_epoch": self._epoch, "base_cache": self._base_cache}

    def _read_tree(self, source: Path | BinaryIO, sink: BaseStream | None) -> RootTree:
        from cloudlets.rootfs import METADATA_PATH, image_metadata, read_tarball

        manifest = self._manifest
        tree = read_tarball(source, self._policy, volatile=manifest.volatile,
                            persistent=manifest.persistent, workdir=self._workdir,
                            sink=sink.sink if sink is not None else None,
                            keep_content=sink is None,
                            # templates read their sources from the base mke2fs builds
                            content_reader=sink.read_file if sink is not None else None)
        tree.add_file(METADATA_PATH, image_metadata(
            name=manifest.name, version=manifest.version, digest=manifest.digest,
            persistent=tree.persistent))
        return tree

    def _read_following(self, entry: CacheEntry,
                        stream: BaseStream | None) -> RootTree | None:
        """Read the tree from ``entry`` while it may still be downloading,
        then wait for the download's verdict.

        :returns: the tree, or ``None`` when the download started over after
            bytes were read (read the finished file instead).
        """
        from cloudlets.fetch import DownloadRestarted

        with entry.open() as opened:
            source: BinaryIO = opened
            if self._meter.total:
                source = io.BufferedReader(_Counted(opened, self._meter), _READ_BUFFER)
            try:
                tree = self._read_tree(source, stream)
            except DownloadRestarted:
                entry.wait()
                return None
            except CloudletsError:
                entry.wait()  # a failed download explains a broken archive best
                raise
        try:
            entry.wait()
        except BaseException:
            tree.close()
            raise
        return tree


#: Bytes the ``rootfs`` stage reads from a cached tarball at a time.
_READ_BUFFER = 1024 * 1024


class _Counted(io.RawIOBase):
    """A tarball being read, its bytes counted on ``meter``."""

    def __init__(self, source: BinaryIO, meter: StageMeter) -> None:
        super().__init__()
        self._source = source
        self._meter = meter
        self._count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._source.read(len(buffer))
        size = len(data)
        buffer[:size] = data
        self._count += size
        self._meter.update(self._count)
        return size
