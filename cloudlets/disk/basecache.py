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

import builtins
import contextlib
import functools
import hashlib
import io
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO

from cloudlets.cachelocks import (
    DEFAULT_BASE_CACHE_MAX_BYTES,
    LockFile,
    evict_lru,
    evict_unused,
    in_use,
    last_used,
)
from cloudlets.disk import ext4
from cloudlets.disk.assemble import (
    BaseStream,
    base_cached,
    base_in_disk,
    base_key,
    base_paths,
    build_disk,
)
from cloudlets.disk.spec import BootSpec
from cloudlets.drivers.base import BaseInDisk, DiskImage
from cloudlets.errors import CacheError, CloudletsError
from cloudlets.progress import StageMeter

if TYPE_CHECKING:
    from cloudlets.cache import CacheEntry
    from cloudlets.manifest import Manifest
    from cloudlets.progress import ProgressCallback
    from cloudlets.rootfs import ArchivePolicy, RootTree

__all__ = ["BASE_FORMAT", "DEFAULT_BASE_CACHE_MAX_BYTES", "BaseCache", "BaseEntryInfo",
           "DiskPlan", "boot_spec"]

log = logging.getLogger(__name__)

#: Bump when the base tree a render builds from the same inputs changes, so
#: cached base filesystems from older versions are not reused.
BASE_FORMAT = "cloudlets-base-1"

#: ``<key>.ext4`` and the files beside it (``<key>.*``): its facts
#: (``.json``), the tree's index (``.tree.json``), its metadata image
#: (``.metadata``), format drivers' sidecars
#: (:func:`~cloudlets.disk.assemble.base_sidecar`: VMDK's compressed grains),
#: and files being written (``.partial-...`` in the name).
_ENTRY_FILE = re.compile(r"(?P<key>[0-9a-f]{64})\.(?P<rest>.+)")


@dataclass(frozen=True)
class BaseEntryInfo:
    """One cached base filesystem, as listed by :meth:`BaseCache.list`.

    :ivar key: its name (a digest of the inputs that made it).
    :ivar size: the bytes it and the files beside it take on disk.
    :ivar apparent_size: the root filesystem's size (the base is sparse).
    :ivar path: the base filesystem.
    :ivar built_at: when it was built (seconds since the epoch).
    :ivar last_used: when a render last used it (seconds since the epoch).
    :ivar in_use: whether a render holds it right now.
    """

    key: str
    size: int
    apparent_size: int
    path: Path
    built_at: float
    last_used: float
    in_use: bool

    def to_dict(self) -> dict[str, Any]:
        """:returns: a JSON-ready dict."""
        return {"key": self.key, "size": self.size, "apparent_size": self.apparent_size,
                "path": str(self.path),
                "built_at": datetime.fromtimestamp(self.built_at, UTC).isoformat(),
                "last_used": datetime.fromtimestamp(self.last_used, UTC).isoformat(),
                "in_use": self.in_use}


class BaseCache:
    """The cache of base filesystems under ``root`` (``<cache>/bases``):
    bounded, least recently used evicted first, as the tarball cache is
    (:mod:`cloudlets.cachelocks` holds what they share).

    A render holds a :meth:`lease` on its base from before it looks it up
    until its disk has been converted (a composed disk reads the base as one
    of its pieces): a base in use is never evicted. A render that does not
    find its base takes :meth:`building` before it reads the tarball, so
    that concurrent renders of one cloudlet, threads or processes, build it
    once: the others wait, then find it cached.

    Layout under ``root``: ``<key>.ext4`` and its sidecars,
    ``locks/<key>.use``, ``locks/<key>.fill``, ``prune.lock``.

    :param root: the directory (created when needed).
    :param max_bytes: after a base is built, evict least recently used bases
        not in use until the cache takes at most this many bytes on disk
        (``None``: no bound).
    :raises CacheError: ``max_bytes`` is negative.
    """

    def __init__(self, root: str | Path, *,
                 max_bytes: int | None = DEFAULT_BASE_CACHE_MAX_BYTES) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise CacheError(f"the base cache's max_bytes must not be negative, not {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes

    def lease(self, key: str) -> LockFile:
        """Hold the base ``key`` (which need not exist yet) against
        eviction, and record its use; release the lock when done.

        :raises CacheError: the cache directory is unusable.
        """
        self._make_dirs()
        return LockFile.use(self._lock(key, "use"))

    def building(self, key: str) -> LockFile:
        """Wait until nobody else builds the base ``key``, then hold it
        until released: build it, unless it is cached by then.

        :raises CacheError: the cache directory is unusable.
        """
        self._make_dirs()
        lock = LockFile.take(self._lock(key, "fill"), exclusive=True)
        assert lock is not None
        return lock

    def list(self) -> builtins.list[BaseEntryInfo]:
        """:returns: every cached base, least recently used first."""
        infos = []
        for key, files in self._entries().items():
            image = self.root / f"{key}.ext4"
            if image not in files:
                continue
            try:
                st = image.stat()
            except FileNotFoundError:
                continue
            infos.append(BaseEntryInfo(
                key=key, size=sum(_disk_bytes(path) for path in files),
                apparent_size=st.st_size, path=image, built_at=st.st_mtime,
                last_used=last_used(self._lock(key, "use"), st.st_mtime),
                in_use=in_use(self._lock(key, "use"))))
        infos.sort(key=lambda info: (info.last_used, info.key))
        return infos

    def total_bytes(self) -> int:
        """:returns: the bytes the cached bases take on disk."""
        return sum(info.size for info in self.list())

    def prune(self, max_bytes: int | None = None) -> builtins.list[BaseEntryInfo]:
        """Remove what renders that died left behind, then evict least
        recently used bases not in use until at most ``max_bytes`` remain.

        :param max_bytes: the bound; the cache's ``max_bytes`` by default.
            With neither, only leftovers are removed.
        :returns: the bases evicted.
        """
        limit = self.max_bytes if max_bytes is None else max_bytes
        if not self.root.is_dir():
            return []
        self._make_dirs()
        guard = LockFile.take(self.root / "prune.lock", exclusive=True)
        assert guard is not None
        try:
            self._remove_leftovers()
            if limit is None:
                return []
            removed, total = evict_lru(self.list(), limit, size=lambda info: info.size,
                                       evict=lambda info: self._evict(info.key))
            for info in removed:
                log.info("evicted base filesystem %s (%d bytes on disk)", info.key, info.size)
            if total > limit:
                log.info("the base cache takes %d bytes, above its %d-byte bound: the rest "
                         "is in use", total, limit)
            return removed
        finally:
            guard.release()

    # -- private helpers ----------------------------------------------------

    def _lock(self, key: str, kind: str) -> Path:
        return self.root / "locks" / f"{key}.{kind}"

    def _make_dirs(self) -> None:
        try:
            (self.root / "locks").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheError(f"cannot create the base cache {self.root}: "
                             f"{exc.strerror}") from None

    def _entries(self) -> dict[str, builtins.list[Path]]:
        """Every file of the cache's entries, by key."""
        found: dict[str, builtins.list[Path]] = {}
        with contextlib.suppress(FileNotFoundError):
            for path in sorted(self.root.iterdir()):
                match = _ENTRY_FILE.fullmatch(path.name)
                if match is not None and path.is_file():
                    found.setdefault(match["key"], []).append(path)
        return found

    def _evict(self, key: str) -> bool:
        files = self._entries().get(key, [])
        return evict_unused(self._lock(key, "use"), self._lock(key, "fill"),
                            lambda: _unlink(files))

    def _remove_leftovers(self) -> None:
        """Files being written by a render that died, and sidecars of a base
        that is gone, when nobody holds their base."""
        for key, files in self._entries().items():
            image = self.root / f"{key}.ext4"
            stale = [path for path in files if ".partial-" in path.name
                     or image not in files]
            if stale and evict_unused(self._lock(key, "use"), self._lock(key, "fill"),
                                      functools.partial(_unlink, stale),
                                      remove_locks=image not in files):
                log.info("removed leftovers of base filesystem %s", key)


def _disk_bytes(path: Path) -> int:
    try:
        return path.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def _unlink(paths: builtins.list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


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
    :param base_cache_max_bytes: the bound of the base cache
        (:class:`BaseCache`), applied after this plan built a base.
    :param hold: where the lease on the base goes (the render's exit stack,
        so that the base stays until the disk's pieces were converted);
        default: released when the plan exits.
    :ivar stage: the last stage's name: ``"disk"``, or ``"tree"``.
    """

    def __init__(self, manifest: Manifest, *, base_cache: Path, workdir: Path,
                 source_date_epoch: int | None, archive_policy: ArchivePolicy,
                 tree: bool, compose: bool,
                 base_cache_max_bytes: int | None = DEFAULT_BASE_CACHE_MAX_BYTES,
                 hold: contextlib.ExitStack | None = None) -> None:
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
        self._bases = BaseCache(base_cache, max_bytes=base_cache_max_bytes)
        self._held = contextlib.ExitStack()
        self._building: LockFile | None = None
        self._key: str | None = None
        if self._boot is not None:
            self._key = base_key(self._boot, **self._lookup())
            lease = self._bases.lease(self._key)  # before the lookup: not evicted under us
            (hold if hold is not None else self._held).callback(lease.release)

    def __enter__(self) -> DiskPlan:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        try:
            if self._stream is not None:
                self._stream.abort()
        finally:
            self._built()
            self._held.close()

    def cached_tree(self) -> RootTree | None:
        """The tree of a re-render, from the cached base and the tree's index.
        While another render builds the same base, wait for it and use it.

        :returns: the tree, or ``None`` when the tarball must be read
            (:meth:`read`); this plan then builds the base, and the renders
            of the same cloudlet that start meanwhile wait for it.
        """
        if self._key is None:
            return None
        tree = self._tree_from_index()
        if tree is None and self._building is None:
            self._building = self._bases.building(self._key)
            tree = self._tree_from_index()  # built while we waited
            if tree is not None:
                self._built()
        return tree

    def base_in_disk(self) -> BaseInDisk | None:
        """Where the cached base lies in the disk :meth:`build` will compose
        over it, for a format driver's head start
        (:meth:`~cloudlets.drivers.base.FormatDriver.head_start`); ``None``
        unless this plan composes a disk over a cached base."""
        if self._boot is None or not self._compose or self._key is None:
            return None
        return base_in_disk(self._boot, **self._lookup())

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
        if self._key is not None and self._building is None:
            self._building = self._bases.building(self._key)
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
        if self._building is not None:  # a base built now: the cache's bound applies
            self._built()
            self._bases.prune()
        meter.finish()
        # a base this render streamed was built now, not found in the cache
        return image.for_formats(details={**image.record(),
                                          "base_cached": image.base_cached
                                          and not self._streamed})

    # -- private helpers ----------------------------------------------------

    def _tree_from_index(self) -> RootTree | None:
        from cloudlets.rootfs import RootTree

        if self._boot is None or not base_cached(self._boot, **self._lookup()):
            return None
        base_image, index = base_paths(self._boot, **self._lookup())
        # a damaged or missing index: read the tarball
        with contextlib.suppress(ValueError, FileNotFoundError):
            tree = RootTree.from_index(index, functools.partial(ext4.read_file, base_image),
                                       workdir=self._workdir)
            self._from_index = True
            return tree
        return None

    def _built(self) -> None:
        """Let the renders waiting for this plan's base go on."""
        if self._building is not None:
            self._building.release()
            self._building = None

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
