"""Assemble a bootable disk image from a tree tarball, rootless and reproducibly."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import secrets
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cloudlets.disk import bootloader, ext4
from cloudlets.disk.partition import (
    BIOS_BOOT_GUID,
    ESP_GUID,
    LINUX_ROOT_X86_64_GUID,
    MBR_TYPE_ESP,
    MBR_TYPE_LINUX,
    SECTOR,
    Partition,
    write_table,
)
from cloudlets.disk.spec import BootSpec, DiskImage
from cloudlets.disk.tools import (
    GRUB_I386_PC_DIR,
    GRUB_X86_64_EFI_DIR,
    e2fsprogs_version,
    find_tool,
)
from cloudlets.drivers.base import BaseInDisk
from cloudlets.errors import DiskError
from cloudlets.progress import StageMeter
from cloudlets.sparse import Piece, copy_into, overlay

if TYPE_CHECKING:
    from cloudlets.progress import PartProgress, ProgressCallback
    from cloudlets.rootfs import RootTree

__all__ = [
    "ESP_SIZE",
    "BaseStream",
    "base_cached",
    "base_in_disk",
    "base_key",
    "base_paths",
    "base_sidecar",
    "build_disk",
    "derive_uuid",
    "resolve_timestamp",
]

_MIB = 1024 * 1024
#: Alignment of every partition.
ALIGN = _MIB
#: Size of the BIOS boot partition that holds GRUB's core.img on GPT disks.
BIOS_BOOT_SIZE = _MIB
#: Size of the EFI system partition (FAT32 needs at least 65525 clusters).
ESP_SIZE = 64 * _MIB
#: Bumped whenever the base filesystem's bytes would change for the same inputs.
_BASE_FORMAT = 3  # 3: member times clamped to rootfs.policy.MAX_TIME, a clock of 0 pinned to 1


def derive_uuid(seed: str, purpose: str) -> str:
    """A UUID (version 4 layout) derived from a seed, one per purpose.

    :param seed: the render's seed (should cover the input digests).
    :param purpose: what the UUID is for, e.g. ``"root-fs"``.
    :returns: the UUID as a string.
    """
    digest = hashlib.sha256(f"cloudlets-disk\0{seed}\0{purpose}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def resolve_timestamp(explicit: int | None, fallback: int) -> int:
    """The clock for the build: the argument, else ``$SOURCE_DATE_EPOCH``, else a fallback.

    :param explicit: the caller's value, if any.
    :param fallback: used when neither is set (the newest mtime in the tree).
    :returns: seconds since the epoch.
    :raises DiskError: ``SOURCE_DATE_EPOCH`` is not an integer.
    """
    if explicit is not None:
        return int(explicit)
    env = os.environ.get("SOURCE_DATE_EPOCH")
    if env:
        try:
            return int(env)
        except ValueError as exc:
            raise DiskError(f"SOURCE_DATE_EPOCH={env!r} is not an integer") from exc
    return fallback


@dataclass(frozen=True)
class _Layout:
    size: int
    partitions: tuple[Partition, ...]
    root_index: int
    esp_index: int | None
    core_offset: int | None
    core_limit: int


def _layout(boot: BootSpec, root_size: int, seed: str) -> _Layout:
    """Place the partitions: [BIOS boot] [ESP] root, 1 MiB aligned, 1 MiB spare at the end
    (or free space up to ``boot.disk_size``).

    :raises DiskError: ``boot.disk_size`` is smaller than the partitions need.
    """
    bios = boot.firmware in ("bios", "both")
    uefi = boot.firmware in ("uefi", "both")
    gpt = boot.partition_table == "gpt"
    parts: list[Partition] = []
    pos = ALIGN
    core_offset: int | None = None
    core_limit = 0
    if bios and gpt:
        parts.append(
            Partition(
                "BIOS boot",
                pos,
                BIOS_BOOT_SIZE,
                BIOS_BOOT_GUID,
                0,
                derive_uuid(seed, "part-bios-boot"),
            )
        )
        core_offset, core_limit = pos, BIOS_BOOT_SIZE
        pos += BIOS_BOOT_SIZE
    elif bios:
        core_offset, core_limit = SECTOR, ALIGN - SECTOR  # the MBR gap
    esp_index = None
    if uefi:
        esp_index = len(parts)
        parts.append(
            Partition(
                "EFI System", pos, ESP_SIZE, ESP_GUID, MBR_TYPE_ESP, derive_uuid(seed, "part-esp")
            )
        )
        pos += ESP_SIZE
    root_index = len(parts)
    parts.append(
        Partition(
            "root",
            pos,
            root_size,
            LINUX_ROOT_X86_64_GUID,
            MBR_TYPE_LINUX,
            derive_uuid(seed, "part-root"),
            bootable=bios and not gpt,
        )
    )
    pos += root_size
    size = pos + ALIGN
    if boot.disk_size is not None:
        if boot.disk_size < size:
            raise DiskError(
                f"boot.disk_size {_mib(boot.disk_size)} is too small for the partitions: "
                f"they need {_mib(size)} ({size} bytes: a root filesystem of "
                f"{_mib(root_size)}, boot partitions and 1 MiB alignment at each end)")
        size = boot.disk_size
    return _Layout(size, tuple(parts), root_index, esp_index, core_offset, core_limit)


def _forward(progress: PartProgress) -> ProgressCallback:
    """A stage callback reporting to a part's ``progress(done, total)``."""
    def report(stage: str, done: int, total: int | None) -> None:
        progress(done, total)

    return report


def _mib(size: int) -> str:
    return f"{size / _MIB:.1f} MiB" if size % _MIB else f"{size // _MIB} MiB"


#: At most this many patched ranges go to qemu-img as pieces; past it the
#: disk is written whole (a command line of thousands of slices).
MAX_PATCHED_RANGES = 256


def _metadata(base: Path, key: str) -> Path:
    """The cached base's :func:`~cloudlets.disk.ext4.metadata_image`, made
    on first use (a few MiB, a fraction of a second)."""
    path = base.with_name(f"{key}.metadata")
    if not path.is_file():
        partial = base.with_name(_partial_name(key) + ".metadata")
        try:
            ext4.metadata_image(base, partial)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    return path


def _compose(disk: Path, size: int, root_start: int, base: Path, metadata: Path,
             files: Mapping[str, bytes], *, timestamp: int,
             workdir: Path) -> tuple[tuple[Piece, ...], tuple[Piece, ...]]:
    """The disk as pieces: ``disk`` (everything but the root filesystem),
    the cached ``base`` at ``root_start`` and over it the ranges the patch
    changed; and the same disk without the patch (for a writer that lays
    out what every render over this base shares first).
    :returns: ``((), ())`` when the patch changed too many ranges (then the
    caller writes the disk whole)."""
    ranges: list[tuple[int, int]] = []
    patched = base
    if files:
        patched, ranges = ext4.patched_ranges(metadata, files, timestamp=timestamp,
                                              workdir=workdir)
        if len(ranges) > MAX_PATCHED_RANGES:
            return (), ()
    base_size = base.stat().st_size
    head, tail = [Piece(disk, 0, root_start)], []
    if root_start + base_size < size:
        tail.append(Piece(disk, root_start + base_size, size - root_start - base_size))
    pieces = (*head, *overlay(base, base_size, patched, ranges), *tail)
    return pieces, (*head, Piece(base, 0, base_size), *tail)


def _tree_digest(tree_tar: Path) -> str:
    digest = hashlib.sha256()
    with open(tree_tar, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _base_key(digest: str, boot: BootSpec, seed: str, source_date_epoch: int | None) -> str:
    facts = {
        "format": _BASE_FORMAT,
        "tree": digest,
        "seed": seed,
        "fstype": boot.fstype,
        "root_size": boot.root_size,
        "label": boot.label,
        "source_date_epoch": source_date_epoch,
        "env_epoch": os.environ.get("SOURCE_DATE_EPOCH"),
        "e2fsprogs": list(e2fsprogs_version()),
        "method": ext4.populate_method(),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def _plan_root(
    boot: BootSpec, tree_tar: Path, epoch: int | None
) -> tuple[int, ext4.TreeStats | None, int]:
    """Root size, the tree summary if it had to be read first, and the clock.

    The tree is scanned before mke2fs only when the size or the clock depend on
    it; otherwise the scan overlaps with mke2fs.
    """
    stats: ext4.TreeStats | None = None
    timestamp = resolve_timestamp(epoch, -1)
    if boot.root_size is None or timestamp < 0:
        stats = ext4.scan_tree(tree_tar)
        timestamp = resolve_timestamp(epoch, stats.max_mtime)
    if boot.root_size is not None:
        size = boot.root_size
    else:
        assert stats is not None
        size = ext4.root_size_for(stats)
    return -(-size // ALIGN) * ALIGN, stats, timestamp


def _check_boot_files(boot: BootSpec, stats: ext4.TreeStats, tree_tar: Path) -> None:
    for what, path in (("kernel", boot.kernel), ("initrd", boot.initrd)):
        if path is not None and path not in stats.paths:
            raise DiskError(f"boot.{what} {path} is not in the tree {tree_tar}")


def _grub_fingerprint(platform: str) -> list[object]:
    """What identifies the installed GRUB for ``platform``: its tool and its
    modules' directory, by size and modification time."""
    directory = GRUB_I386_PC_DIR if platform == "i386-pc" else GRUB_X86_64_EFI_DIR
    facts: list[object] = []
    for path in (Path(find_tool("grub-mkimage")), directory / "moddep.lst",
                 directory / "kernel.img"):
        try:
            info = path.stat()
        except OSError:
            facts.append([str(path), None])
            continue
        facts.append([str(path), info.st_size, info.st_mtime_ns])
    return facts


def _cached_grub_image(base_cache: Path, key: str, platform: str, config: str,
                       build: Callable[[], bytes]) -> bytes:
    """GRUB's image for ``platform`` with ``config`` embedded, made once per
    base and kept beside it (``grub-mkimage`` compresses the BIOS core: 0.1 to
    0.3 s of every re-render). The name covers the config, the platform and
    the installed GRUB; a cached image of the same name is the same bytes
    :func:`~cloudlets.disk.bootloader.build_bios_core` or
    :func:`~cloudlets.disk.bootloader.build_efi_binary` would make."""
    facts = {"platform": platform, "config": config, "grub": _grub_fingerprint(platform)}
    digest = hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:32]
    path = base_cache / f"{key}.grub-{platform}-{digest}.img"
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    image = build()
    partial = base_cache / (_partial_name(key) + ".grub")
    try:
        base_cache.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(image)
        os.replace(partial, path)
    except OSError:  # a read-only cache still renders
        pass
    finally:
        partial.unlink(missing_ok=True)
    return image


def _partial_name(key: str) -> str:
    """A base being built: unique to this process and thread (two renders of
    one cloudlet may build the same base at once; the last rename wins, and
    both are the same bytes)."""
    return f"{key}.ext4.partial-{os.getpid()}-{secrets.token_hex(4)}"


def _cache_lookup(base_cache: Path, key: str) -> tuple[Path, int, int] | None:
    """A cached base filesystem: (image, size, timestamp), or ``None``."""
    image = base_cache / f"{key}.ext4"
    meta_file = base_cache / f"{key}.json"
    if not (image.is_file() and meta_file.is_file()):
        return None
    try:
        meta = json.loads(meta_file.read_text())
        return image, int(meta["size"]), int(meta["timestamp"])
    except (ValueError, KeyError, TypeError):
        return None


class BaseStream:
    """Build a base root filesystem into the cache while the tree is read.

    The cold render's fast path: ``mke2fs -d -`` reads the normalized tar
    :func:`~cloudlets.rootfs.read_tarball` writes to :attr:`sink` as it reads
    the tarball, so the tree is never written out as a tar first. On success
    the base is in ``base_cache`` under the key :func:`build_disk` looks up
    (same inputs, same key), and :func:`build_disk` only copies and patches
    it. Use :meth:`open`, which says when the path does not apply.

    :ivar sink: where the tree goes while it is read.
    :ivar reason: why the tree could not be streamed, after :meth:`close`
        returned ``False``.
    """

    def __init__(self, boot: BootSpec, *, seed: str, tree_digest: str,
                 source_date_epoch: int | None, base_cache: Path, workdir: Path,
                 clamp: int | None) -> None:
        from cloudlets.rootfs import TreeStream

        assert boot.root_size is not None
        self._boot = boot
        self._key = _base_key(tree_digest, boot, seed, source_date_epoch)
        self._cache = base_cache
        self._size = -(-boot.root_size // ALIGN) * ALIGN
        self._timestamp = resolve_timestamp(source_date_epoch, -1)
        base_cache.mkdir(parents=True, exist_ok=True)
        self._partial = base_cache / _partial_name(self._key)
        self._mkfs = ext4.Ext4Stream(
            self._partial, size=self._size, uuid=derive_uuid(seed, "root-fs"),
            hash_seed=derive_uuid(seed, "root-fs-hash-seed"), label=boot.label,
            timestamp=self._timestamp, workdir=workdir,
            inodes=ext4.inode_count(self._size))
        self.sink = TreeStream(self._mkfs.fd, source_date_epoch=clamp)
        self.reason: str | None = None
        #: the cached base, once :meth:`close` built it
        self.image: Path | None = None
        self._done = False

    @classmethod
    def open(cls, boot: BootSpec, *, seed: str, tree_digest: str,
             source_date_epoch: int | None, base_cache: Path, workdir: Path,
             clamp: int | None = None) -> BaseStream | None:
        """Start mke2fs for a base that is not cached yet, if it can be streamed.

        :param boot: the boot section; streaming needs ``root_size`` (the
            filesystem is made before the tree is known).
        :param seed: as for :func:`build_disk`.
        :param tree_digest: as for :func:`build_disk` (here required).
        :param source_date_epoch: as for :func:`build_disk`; streaming needs a
            clock (this or ``$SOURCE_DATE_EPOCH``), as the tree's newest mtime
            is not known in advance.
        :param base_cache: as for :func:`build_disk`.
        :param workdir: a scratch directory.
        :param clamp: the mtime clamp the tree's tar would be written with.
        :returns: the stream, or ``None`` when the base is cached already or
            cannot be streamed (no root size, no clock, e2fsprogs too old).
        """
        if (boot.root_size is None or resolve_timestamp(source_date_epoch, -1) < 0
                or ext4.populate_method() != "tar"):
            return None
        key = _base_key(tree_digest, boot, seed, source_date_epoch)
        if _cache_lookup(base_cache, key) is not None:
            return None
        return cls(boot, seed=seed, tree_digest=tree_digest,
                   source_date_epoch=source_date_epoch, base_cache=base_cache,
                   workdir=workdir, clamp=clamp)

    def close(self, tree: RootTree) -> bool:
        """Send the rest of the tree and store the base in the cache.

        :param tree: the complete tree (as :meth:`~cloudlets.rootfs.RootTree.write_tar`
            would write it).
        :returns: ``True`` when the base is cached; ``False`` when the tree
            could not be streamed (see :attr:`reason`): nothing was cached and
            the caller builds the disk from the tree's tar as usual.
        :raises DiskError: mke2fs failed, or the boot files are missing.
        """
        from cloudlets.rootfs import EntryType

        self._done = True
        self.reason = self.sink.close(tree)
        if self.reason is not None and self.sink.consumer_failed:
            # mke2fs stopped reading: its own error (the tree does not fit...)
            # is the render's error; reading the tarball again would only repeat it
            try:
                self._mkfs.finish()
            finally:
                self._mkfs.abort()
        if self.reason is not None:
            self._mkfs.abort()
            return False
        xattrs = [ext4.TreeEntry(path=e.path, mode=e.mode, uid=e.uid, gid=e.gid,
                                 mtime=e.mtime, xattrs=e.xattrs)
                  for e in tree if e.type is not EntryType.HARDLINK
                  and any(name != "security.capability" for name in e.xattrs)]
        try:
            self._mkfs.finish(xattrs)
            for what, path in (("kernel", self._boot.kernel), ("initrd", self._boot.initrd)):
                if path is not None and path not in tree:
                    raise DiskError(f"boot.{what} {path} is not in the tree")
            os.replace(self._partial, self._cache / f"{self._key}.ext4")
        finally:
            self._partial.unlink(missing_ok=True)
        meta = {"size": self._size, "timestamp": self._timestamp}
        (self._cache / f"{self._key}.json").write_text(json.dumps(meta))
        self.image = self._cache / f"{self._key}.ext4"
        return True

    def read_file(self, path: str, size: int) -> bytes:
        """Read a file back from the base built by :meth:`close` (for templates
        of a tree whose content was streamed, not kept)."""
        if self.image is None:
            raise DiskError("the base filesystem was not built")
        return ext4.read_file(self.image, path, size)

    def abort(self) -> None:
        """Stop mke2fs and cache nothing (safe to call after :meth:`close`)."""
        if not self._done:
            self._done = True
            self._mkfs.abort()


def base_cached(boot: BootSpec, *, seed: str, tree_digest: str,
                source_date_epoch: int | None, base_cache: Path) -> bool:
    """Whether ``base_cache`` holds the base filesystem :func:`build_disk`
    would make for these inputs (it then needs no tree tar)."""
    key = _base_key(tree_digest, boot, seed, source_date_epoch)
    return _cache_lookup(base_cache, key) is not None


def base_in_disk(boot: BootSpec, *, seed: str, tree_digest: str,
                 source_date_epoch: int | None, base_cache: Path) -> BaseInDisk | None:
    """Where the cached base filesystem for these inputs lies in the disk
    :func:`build_disk` composes over it (``compose``), before the render
    patches it; ``None`` when no such base is cached."""
    key = _base_key(tree_digest, boot, seed, source_date_epoch)
    cached = _cache_lookup(base_cache, key)
    if cached is None:
        return None
    image, size, _ = cached
    try:
        layout = _layout(boot, size, seed)
        length = image.stat().st_size
    except (DiskError, OSError):  # build_disk says what is wrong
        return None
    root = layout.partitions[layout.root_index]
    return BaseInDisk(path=image, start=root.start, length=length, disk_size=layout.size)


def base_key(boot: BootSpec, *, seed: str, tree_digest: str,
             source_date_epoch: int | None, base_cache: Path) -> str:
    """The name of the base filesystem :func:`build_disk` would make for
    these inputs in ``base_cache`` (the cache's locks are named after it)."""
    return _base_key(tree_digest, boot, seed, source_date_epoch)


def base_paths(boot: BootSpec, *, seed: str, tree_digest: str,
               source_date_epoch: int | None, base_cache: Path) -> tuple[Path, Path]:
    """The cached base filesystem for these inputs and the file beside it
    where the caller may keep the tree's index
    (:meth:`~cloudlets.rootfs.RootTree.write_index`); neither need exist."""
    key = _base_key(tree_digest, boot, seed, source_date_epoch)
    return base_cache / f"{key}.ext4", base_cache / f"{key}.tree.json"


_KEY = re.compile(r"^[0-9a-f]{64}$")


def base_sidecar(path: Path, name: str) -> Path | None:
    """Where a consumer of a cached base filesystem may keep a file derived
    from it (a format driver's compressed grains): ``<key>.<name>`` beside
    the base ``<key>.ext4``, in the base cache, so whatever removes the base
    (``<key>.*``) removes it too.

    :param path: a file the disk is made of (a piece's file).
    :param name: the sidecar's suffix (letters, digits, ``-`` and ``.``).
    :returns: the sidecar's path, or ``None`` when ``path`` is not a cached
        base (or ``name`` is not a safe suffix).
    """
    if path.suffix != ".ext4" or not _KEY.match(path.stem) \
            or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.-]*", name):
        return None
    if not path.with_suffix(".json").is_file():
        return None
    return path.with_name(f"{path.stem}.{name}")


def build_disk(
    tree_tar: Path | None,
    boot: BootSpec,
    output: Path,
    *,
    seed: str,
    workdir: Path,
    source_date_epoch: int | None = None,
    base_cache: Path | None = None,
    patch_files: Mapping[str, bytes] | None = None,
    tree_digest: str | None = None,
    sync: bool = True,
    compose: bool = False,
    progress: PartProgress | None = None,
) -> DiskImage:
    """Build a bootable raw disk image from a tree tarball, without root.

    The same inputs give the same bytes: GUIDs, UUIDs, the ext4 hash seed and
    the FAT volume id come from ``seed``; every timestamp from
    ``source_date_epoch`` (else ``$SOURCE_DATE_EPOCH``, else the newest mtime
    in the tree).

    :param tree_tar: the rendered root filesystem as an uncompressed, normalized
        tar (parents before children; PAX headers with owners, modes, xattrs);
        ``None`` when ``base_cache`` holds the base already (a
        :class:`BaseStream` put it there).
    :param boot: the boot section.
    :param output: the raw image to write (replaced if it exists).
    :param seed: the render's seed; derive it from the manifest and tarball
        digests so a different input gives different identifiers.
    :param workdir: a scratch directory (may be removed afterwards).
    :param source_date_epoch: the clock for every timestamp the tools write.
    :param base_cache: a directory caching base root filesystems, keyed by the
        tree's digest, seed and filesystem options; a hit skips mke2fs.
    :param patch_files: files (absolute path in the tree -> content) written
        into the root filesystem of this image only, keeping each replaced
        file's mode and owner: the templated files of a render.
    :param tree_digest: the tree tarball's sha256, if the caller knows it
        (saves hashing it for the cache key).
    :param sync: let debugfs flush ``output`` to the medium as it patches
        it. ``False`` when the image is an intermediate that is converted,
        or stored by a driver that makes its own copy durable (the Renderer):
        that flush wrote the whole copied base for nothing. The base cache is
        flushed either way.
    :param compose: with ``base_cache``, do not copy the base into
        ``output``: the image returned is :attr:`~DiskImage.pieces`, the
        cached base with the blocks the patch changed (found by patching a
        copy of the base's metadata only, see
        :func:`~cloudlets.disk.ext4.patched_ranges`) between the rest of
        ``output``. For a consumer that reads the disk as pieces (``qemu-img
        convert``): the copy of the base, its page cache and its writeback
        are saved. Without a base cache the image is written whole.
    :param progress: called as ``progress(done, total)`` as the build
        advances, in bytes: the tree's tar as ``mke2fs`` has read it (when
        the root filesystem is made here), then the root filesystem as it is
        copied into the disk (or composed).
    :returns: the description of the image.
    :raises DiskError: the tree does not fit, a tool failed, or the boot
        section is inconsistent with the tree.
    :raises ConfigurationError: a host tool is missing.
    """
    boot.validate()
    workdir.mkdir(parents=True, exist_ok=True)
    root_uuid = derive_uuid(seed, "root-fs")
    cached: tuple[Path, int, int] | None = None
    key = None
    if base_cache is not None:
        if tree_digest is not None:
            digest = tree_digest
        elif tree_tar is not None:
            digest = _tree_digest(tree_tar)
        else:
            raise DiskError("build_disk needs the tree's tar or its digest")
        key = _base_key(digest, boot, seed, source_date_epoch)
        cached = _cache_lookup(base_cache, key)
    stats: ext4.TreeStats | None = None
    if cached is not None:
        _, size, timestamp = cached
    elif tree_tar is None:
        raise DiskError("no tree tar given and no base filesystem cached for it")
    else:
        size, stats, timestamp = _plan_root(boot, tree_tar, source_date_epoch)
        if stats is not None:
            _check_boot_files(boot, stats, tree_tar)
    layout = _layout(boot, size, seed)
    # in bytes: the tree's tar mke2fs reads here (if it runs), then the root filesystem
    tar_bytes = tree_tar.stat().st_size if cached is None and tree_tar is not None else 0
    meter = StageMeter(None if progress is None else _forward(progress), "disk",
                       tar_bytes + size)
    mkfs_part, root_part = meter.part(tar_bytes), meter.part(size)
    follow_mkfs = mkfs_part if progress is not None else None  # nobody listens: no polling
    config = bootloader.grub_config(
        kernel=boot.kernel, initrd=boot.initrd, cmdline=boot.cmdline, root_uuid=root_uuid
    )
    disk_guid = derive_uuid(seed, "disk")
    signature = int.from_bytes(hashlib.sha256(f"{seed}\0mbr".encode()).digest()[:4], "little")
    volume_id = int.from_bytes(hashlib.sha256(f"{seed}\0esp".encode()).digest()[:4], "little")
    tar_path = tree_tar if tree_tar is not None else Path()  # read only when not cached
    make_root = functools.partial(
        ext4.make_ext4,
        tar_path,
        size=size,
        uuid=root_uuid,
        hash_seed=derive_uuid(seed, "root-fs-hash-seed"),
        label=boot.label,
        timestamp=timestamp,
        workdir=workdir / "ext4",
        stats=stats,
        inodes=ext4.inode_count(size, stats if boot.root_size is None else None),
    )

    def grub_image(platform: str, build: Callable[[str, Path], bytes]) -> bytes:
        if base_cache is None or key is None:
            return build(config, workdir)
        return _cached_grub_image(base_cache, key, platform, config,
                                  functools.partial(build, config, workdir))

    esp_image = None
    if layout.esp_index is not None:
        esp_image = workdir / "esp.img"
        bootloader.make_esp(
            esp_image,
            size=ESP_SIZE,
            efi_binary=grub_image("x86_64-efi", bootloader.build_efi_binary),
            volume_id=volume_id,
            timestamp=timestamp,
            workdir=workdir,
        )
    core = (grub_image("i386-pc", bootloader.build_bios_core)
            if layout.core_offset is not None else None)

    output.parent.mkdir(parents=True, exist_ok=True)
    output.unlink(missing_ok=True)
    root = layout.partitions[layout.root_index]
    compose = compose and base_cache is not None and key is not None
    base_image: Path | None = None
    pieces: tuple[Piece, ...] = ()
    unpatched: tuple[Piece, ...] = ()
    try:
        with open(output, "wb") as handle:
            fd = handle.fileno()
            handle.truncate(layout.size)
            boot_code = b""
            if core is not None and layout.core_offset is not None:
                boot_code = bootloader.install_bios_boot(
                    fd, core, layout.core_offset, layout.core_limit
                )
            write_table(
                fd,
                layout.size,
                layout.partitions,
                table=boot.partition_table,
                disk_guid=disk_guid,
                signature=signature,
                boot_code=boot_code,
            )
            if esp_image is not None and layout.esp_index is not None:
                copy_into(esp_image, fd, layout.partitions[layout.esp_index].start,
                          error=DiskError)
            if cached is not None:
                base_image = cached[0]
            elif base_cache is not None and key is not None:
                base_cache.mkdir(parents=True, exist_ok=True)
                partial = base_cache / _partial_name(key)
                try:
                    _check_boot_files(boot, make_root(partial, progress=follow_mkfs), tar_path)
                    mkfs_part(1, 1)
                    os.replace(partial, base_cache / f"{key}.ext4")
                finally:
                    partial.unlink(missing_ok=True)
                meta = {"size": size, "timestamp": timestamp}
                (base_cache / f"{key}.json").write_text(json.dumps(meta))
                base_image = base_cache / f"{key}.ext4"
            if base_image is not None and compose and key is not None:
                pieces, unpatched = _compose(output, layout.size, root.start, base_image,
                                  _metadata(base_image, key), patch_files or {},
                                  timestamp=timestamp, workdir=workdir / "patch")
            if base_image is not None and not pieces:
                copy_into(base_image, fd, root.start, error=DiskError,
                          progress=root_part if progress is not None else None)
        if cached is None and base_cache is None:
            _check_boot_files(boot, make_root(output, offset=root.start, progress=follow_mkfs),
                              tar_path)
            mkfs_part(1, 1)
        if patch_files and not pieces:
            ext4.patch_ext4(
                f"{output}?offset={root.start}",
                patch_files,
                timestamp=timestamp,
                workdir=workdir / "patch",
                sync=sync,
            )
    except BaseException:
        output.unlink(missing_ok=True)
        raise
    meter.finish()
    return DiskImage(
        path=output,
        size=layout.size,
        firmware=boot.firmware,
        partition_table=boot.partition_table,
        disk_guid=disk_guid if boot.partition_table == "gpt" else None,
        disk_signature=signature,
        root_uuid=root_uuid,
        root_label=boot.label,
        partitions=layout.partitions,
        root_partition=layout.root_index,
        source_date_epoch=timestamp,
        base_cached=cached is not None,
        pieces=pieces,
        unpatched=unpatched,
    )
