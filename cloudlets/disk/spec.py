"""The disk stage's inputs and outputs as plain data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cloudlets.disk.partition import Partition
from cloudlets.drivers.base import DiskImage as FormatDisk
from cloudlets.errors import DiskError
from cloudlets.sparse import Piece

__all__ = ["BootSpec", "DiskImage", "Firmware", "FsType", "PartitionTable"]

Firmware = Literal["bios", "uefi", "both"]
PartitionTable = Literal["gpt", "mbr"]
FsType = Literal["ext4"]

_FIRMWARES = ("bios", "uefi", "both")
_TABLES = ("gpt", "mbr")
_FSTYPES = ("ext4",)


@dataclass(frozen=True)
class BootSpec:
    """How the disk boots: the manifest's ``boot`` section, as the disk stage needs it.

    :ivar kernel: the kernel's path inside the tree, e.g. ``/boot/vmlinuz``.
    :ivar initrd: the initrd's path inside the tree, or ``None``.
    :ivar cmdline: the kernel command line; ``root=UUID=<root fs uuid>`` is
        prepended unless it already has a ``root=``.
    :ivar firmware: ``"bios"`` (GRUB in the MBR), ``"uefi"`` (GRUB in an EFI
        system partition) or ``"both"`` (one disk that boots either way).
    :ivar partition_table: ``"gpt"`` (with a protective MBR) or ``"mbr"``.
    :ivar fstype: the root filesystem type; only ``"ext4"``.
    :ivar root_size: the root filesystem size in bytes, or ``None`` to size it
        from the tree with headroom.
    :ivar label: the root filesystem label (at most 16 bytes).
    :ivar disk_size: the whole disk image's size in bytes (a multiple of 512),
        or ``None`` for the partitions plus alignment; the space past the
        last partition is left free (for the guest to grow into).
    """

    kernel: str
    initrd: str | None = None
    cmdline: str = ""
    firmware: Firmware = "bios"
    partition_table: PartitionTable = "gpt"
    fstype: FsType = "ext4"
    root_size: int | None = None
    label: str = "cloudlets-root"
    disk_size: int | None = None

    def validate(self) -> None:
        """Check the values a manifest schema cannot fully check.

        :raises DiskError: a value is out of range; the message names the field.
        """
        if self.firmware not in _FIRMWARES:
            raise DiskError(f"boot.firmware {self.firmware!r} is not one of {_FIRMWARES}")
        if self.partition_table not in _TABLES:
            raise DiskError(
                f"boot.partition_table {self.partition_table!r} is not one of {_TABLES}"
            )
        if self.fstype not in _FSTYPES:
            raise DiskError(f"boot.fstype {self.fstype!r} is not one of {_FSTYPES}")
        for name, path in (("kernel", self.kernel), ("initrd", self.initrd)):
            if path is not None and not path.startswith("/"):
                raise DiskError(f"boot.{name} {path!r} must be an absolute path in the tree")
        if self.root_size is not None and self.root_size <= 0:
            raise DiskError(f"boot.root_size {self.root_size} must be positive")
        if not self.label or len(self.label.encode()) > 16:
            raise DiskError(f"boot.label {self.label!r} must be 1 to 16 bytes")
        if self.disk_size is not None and (self.disk_size <= 0 or self.disk_size % 512):
            raise DiskError(f"boot.disk_size {self.disk_size} must be a positive multiple "
                            "of 512 bytes")


@dataclass(frozen=True)
class DiskImage:
    """A raw, bootable disk image the disk stage made.

    :ivar path: the image file (sparse).
    :ivar size: its size in bytes.
    :ivar firmware: how it boots.
    :ivar partition_table: ``"gpt"`` or ``"mbr"``.
    :ivar disk_guid: the GPT disk GUID (``None`` for MBR).
    :ivar disk_signature: the MBR disk signature.
    :ivar root_uuid: the root filesystem UUID.
    :ivar root_label: the root filesystem label.
    :ivar partitions: the partitions in table order.
    :ivar root_partition: index of the root partition in ``partitions``.
    :ivar source_date_epoch: the timestamp used for everything the tools would
        have taken from the clock.
    :ivar base_cached: ``True`` if the root filesystem came from the base cache.
    :ivar pieces: when not empty, the image is these byte ranges of files,
        in order, and :attr:`path` alone lacks the root filesystem (see
        :func:`~cloudlets.disk.build_disk`'s ``compose``).
    :ivar unpatched: with :attr:`pieces`, the same disk before the render's
        patches: the cached base filesystem whole where :attr:`pieces` has
        the patched blocks over it.
    """

    path: Path
    size: int
    firmware: Firmware
    partition_table: PartitionTable
    disk_guid: str | None
    disk_signature: int
    root_uuid: str
    root_label: str
    partitions: tuple[Partition, ...]
    root_partition: int
    source_date_epoch: int
    base_cached: bool = False
    pieces: tuple[Piece, ...] = ()
    unpatched: tuple[Piece, ...] = ()

    @property
    def root(self) -> Partition:
        """The root filesystem's partition."""
        return self.partitions[self.root_partition]

    @property
    def root_offset(self) -> int:
        """Where the root filesystem starts in the image, in bytes."""
        return self.root.start

    def for_formats(self, *, tree_tar: Path | None = None,
                    details: Mapping[str, Any] | None = None) -> FormatDisk:
        """This image as format drivers receive it, with the facts they need
        typed (root offset and UUID, the timestamp), so none parses the disk
        again.

        :param tree_tar: the rendered tree's tar, for a driver that wants it.
        :param details: what the render records about the disk; default
            :meth:`record`.
        """
        return FormatDisk(path=self.path, size=self.size, firmware=self.firmware,
                          tree_tar=tree_tar,
                          details=dict(details if details is not None else self.record()),
                          pieces=self.pieces, unpatched=self.unpatched,
                          root_offset=self.root_offset,
                          root_uuid=self.root_uuid, source_date_epoch=self.source_date_epoch)

    def record(self) -> dict[str, Any]:
        """What a render records about the image, JSON-ready.

        :returns: ``RenderResult.details["disk"]``.
        """
        return {"size": self.size, "firmware": self.firmware,
                "partition_table": self.partition_table, "root_uuid": self.root_uuid,
                "disk_guid": self.disk_guid, "partitions": self.partition_uuids,
                "base_cached": self.base_cached, "composed": bool(self.pieces),
                "source_date_epoch": self.source_date_epoch}

    @property
    def partition_uuids(self) -> dict[str, str]:
        """Partition name -> unique partition GUID."""
        return {p.name: p.guid for p in self.partitions}
