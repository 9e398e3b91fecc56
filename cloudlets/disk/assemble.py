"""Assemble a bootable disk image from a tree tarball, rootless and reproducibly."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

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
from cloudlets.disk.tools import e2fsprogs_version
from cloudlets.errors import DiskError

__all__ = ["ESP_SIZE", "build_disk", "derive_uuid", "resolve_timestamp"]

_MIB = 1024 * 1024
#: Alignment of every partition.
ALIGN = _MIB
#: Size of the BIOS boot partition that holds GRUB's core.img on GPT disks.
BIOS_BOOT_SIZE = _MIB
#: Size of the EFI system partition (FAT32 needs at least 65525 clusters).
ESP_SIZE = 64 * _MIB
#: Bumped whenever the base filesystem's bytes would change for the same inputs.
_BASE_FORMAT = 1


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
    """Place the partitions: [BIOS boot] [ESP] root, 1 MiB aligned, 1 MiB spare at the end."""
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
    return _Layout(pos + ALIGN, tuple(parts), root_index, esp_index, core_offset, core_limit)


def _copy_sparse(source: Path, fd: int, offset: int) -> None:
    """Copy a sparse file into an open file at an offset, skipping its holes."""
    with open(source, "rb") as src:
        sfd = src.fileno()
        end = os.fstat(sfd).st_size
        pos = 0
        while pos < end:
            try:
                data = os.lseek(sfd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: only a hole is left
                break
            hole = os.lseek(sfd, data, os.SEEK_HOLE)
            while data < hole:
                copied = os.copy_file_range(sfd, fd, hole - data, data, offset + data)
                if copied == 0:
                    raise DiskError(f"short copy of {source} into the disk image")
                data += copied
            pos = hole


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


def build_disk(
    tree_tar: Path,
    boot: BootSpec,
    output: Path,
    *,
    seed: str,
    workdir: Path,
    source_date_epoch: int | None = None,
    base_cache: Path | None = None,
    patch_files: Mapping[str, bytes] | None = None,
    tree_digest: str | None = None,
) -> DiskImage:
    """Build a bootable raw disk image from a tree tarball, without root.

    The same inputs give the same bytes: GUIDs, UUIDs, the ext4 hash seed and
    the FAT volume id come from ``seed``; every timestamp from
    ``source_date_epoch`` (else ``$SOURCE_DATE_EPOCH``, else the newest mtime
    in the tree).

    :param tree_tar: the rendered root filesystem as an uncompressed, normalized
        tar (parents before children; PAX headers with owners, modes, xattrs).
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
        key = _base_key(tree_digest or _tree_digest(tree_tar), boot, seed, source_date_epoch)
        cached = _cache_lookup(base_cache, key)
    stats: ext4.TreeStats | None = None
    if cached is not None:
        _, size, timestamp = cached
    else:
        size, stats, timestamp = _plan_root(boot, tree_tar, source_date_epoch)
        if stats is not None:
            _check_boot_files(boot, stats, tree_tar)
    layout = _layout(boot, size, seed)
    config = bootloader.grub_config(
        kernel=boot.kernel, initrd=boot.initrd, cmdline=boot.cmdline, root_uuid=root_uuid
    )
    disk_guid = derive_uuid(seed, "disk")
    signature = int.from_bytes(hashlib.sha256(f"{seed}\0mbr".encode()).digest()[:4], "little")
    volume_id = int.from_bytes(hashlib.sha256(f"{seed}\0esp".encode()).digest()[:4], "little")
    make_root = functools.partial(
        ext4.make_ext4,
        tree_tar,
        size=size,
        uuid=root_uuid,
        hash_seed=derive_uuid(seed, "root-fs-hash-seed"),
        label=boot.label,
        timestamp=timestamp,
        workdir=workdir / "ext4",
        stats=stats,
        inodes=ext4.inode_count(size, stats if boot.root_size is None else None),
    )

    esp_image = None
    if layout.esp_index is not None:
        esp_image = workdir / "esp.img"
        bootloader.make_esp(
            esp_image,
            size=ESP_SIZE,
            efi_binary=bootloader.build_efi_binary(config, workdir),
            volume_id=volume_id,
            timestamp=timestamp,
            workdir=workdir,
        )
    core = bootloader.build_bios_core(config, workdir) if layout.core_offset is not None else None

    output.parent.mkdir(parents=True, exist_ok=True)
    output.unlink(missing_ok=True)
    root = layout.partitions[layout.root_index]
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
                _copy_sparse(esp_image, fd, layout.partitions[layout.esp_index].start)
            if cached is not None:
                _copy_sparse(cached[0], fd, root.start)
            elif base_cache is not None and key is not None:
                base_cache.mkdir(parents=True, exist_ok=True)
                partial = base_cache / f"{key}.ext4.partial-{os.getpid()}"
                try:
                    _check_boot_files(boot, make_root(partial), tree_tar)
                    _copy_sparse(partial, fd, root.start)
                    os.replace(partial, base_cache / f"{key}.ext4")
                finally:
                    partial.unlink(missing_ok=True)
                meta = {"size": size, "timestamp": timestamp}
                (base_cache / f"{key}.json").write_text(json.dumps(meta))
        if cached is None and base_cache is None:
            _check_boot_files(boot, make_root(output, offset=root.start), tree_tar)
        if patch_files:
            ext4.patch_ext4(
                f"{output}?offset={root.start}",
                patch_files,
                timestamp=timestamp,
                workdir=workdir / "patch",
            )
    except BaseException:
        output.unlink(missing_ok=True)
        raise
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
    )
