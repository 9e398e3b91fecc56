"""Partition tables written in Python: GPT (with a protective MBR) and MBR.

Writing the tables ourselves rather than driving ``sfdisk`` keeps the bytes
under our control (the GUIDs come from the seed, nothing from a tool version
or the clock), needs no host tool, and lets the BIOS boot code share the first
sector with the table in one write. ``sfdisk --json`` reads them back in the
tests.
"""

from __future__ import annotations

import os
import struct
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from cloudlets.errors import DiskError

__all__ = [
    "BIOS_BOOT_GUID",
    "ESP_GUID",
    "GPT_ENTRIES",
    "GPT_RESERVED_SECTORS",
    "LINUX_ROOT_X86_64_GUID",
    "MBR_TYPE_ESP",
    "MBR_TYPE_LINUX",
    "SECTOR",
    "Partition",
    "gpt_tables",
    "mbr_sector",
    "write_table",
]

#: Logical sector size in bytes.
SECTOR = 512
#: Number of GPT partition entries and their size.
GPT_ENTRIES = 128
GPT_ENTRY_SIZE = 128
#: Sectors one copy of the GPT takes: header plus entry array.
GPT_RESERVED_SECTORS = 1 + GPT_ENTRIES * GPT_ENTRY_SIZE // SECTOR

#: GPT partition types.
BIOS_BOOT_GUID = "21686148-6449-6e6f-744e-656564454649"
ESP_GUID = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
#: The Discoverable Partitions Specification's x86-64 root type.
LINUX_ROOT_X86_64_GUID = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709"

#: MBR partition types.
MBR_TYPE_LINUX = 0x83
MBR_TYPE_ESP = 0xEF
MBR_TYPE_PROTECTIVE = 0xEE

_MBR_BOOTCODE_SIZE = 440
_MBR_TABLE_OFFSET = 446


@dataclass(frozen=True)
class Partition:
    """One partition of a disk.

    :ivar name: GPT partition name (ignored by MBR).
    :ivar start: first byte, a multiple of :data:`SECTOR`.
    :ivar size: length in bytes, a multiple of :data:`SECTOR`.
    :ivar gpt_type: GPT partition type GUID.
    :ivar mbr_type: MBR partition type byte.
    :ivar guid: GPT unique partition GUID.
    :ivar bootable: MBR active flag / GPT "legacy BIOS bootable" attribute.
    """

    name: str
    start: int
    size: int
    gpt_type: str
    mbr_type: int
    guid: str
    bootable: bool = False

    @property
    def first_lba(self) -> int:
        """First sector."""
        return self.start // SECTOR

    @property
    def last_lba(self) -> int:
        """Last sector (inclusive)."""
        return (self.start + self.size) // SECTOR - 1


def _check(disk_size: int, partitions: Sequence[Partition], first: int, last: int) -> None:
    """Refuse misaligned, overlapping or out-of-range partitions."""
    if disk_size % SECTOR:
        raise DiskError(f"disk size {disk_size} is not a multiple of {SECTOR}")
    previous_end = first
    for part in sorted(partitions, key=lambda p: p.start):
        if part.start % SECTOR or part.size % SECTOR or part.size <= 0:
            raise DiskError(f"partition {part.name!r} is not sector aligned")
        if part.first_lba < previous_end or part.last_lba > last:
            raise DiskError(f"partition {part.name!r} overlaps another or the disk's edge")
        previous_end = part.last_lba + 1


def _chs(lba: int) -> bytes:
    """CHS address for an MBR entry (255 heads, 63 sectors; capped as usual)."""
    heads, sectors = 255, 63
    cylinder = lba // (heads * sectors)
    if cylinder > 1023:
        return b"\xfe\xff\xff"
    head = (lba // sectors) % heads
    sector = lba % sectors + 1
    return bytes([head, sector | ((cylinder >> 2) & 0xC0), cylinder & 0xFF])


def _mbr_entry(bootable: bool, kind: int, first: int, count: int) -> bytes:
    last = first + count - 1
    return struct.pack(
        "<B3sB3sII", 0x80 if bootable else 0, _chs(first), kind, _chs(last), first, count
    )


def mbr_sector(
    disk_size: int,
    partitions: Sequence[Partition],
    *,
    signature: int,
    protective: bool,
    boot_code: bytes = b"",
) -> bytes:
    """Build the first sector: boot code, disk signature, four entries, 0x55AA.

    :param disk_size: disk size in bytes.
    :param partitions: up to four partitions (ignored when ``protective``).
    :param signature: 32-bit disk signature.
    :param protective: write a GPT protective MBR (one 0xEE entry) instead.
    :param boot_code: up to 440 bytes of boot code (GRUB's boot.img).
    :returns: 512 bytes.
    :raises DiskError: too many partitions or boot code too long.
    """
    if len(boot_code) > _MBR_BOOTCODE_SIZE:
        raise DiskError(f"MBR boot code is {len(boot_code)} bytes, more than 440")
    sectors = disk_size // SECTOR
    if protective:
        entries = [_mbr_entry(False, MBR_TYPE_PROTECTIVE, 1, min(sectors - 1, 0xFFFFFFFF))]
    else:
        if len(partitions) > 4:
            raise DiskError(f"an MBR holds 4 primary partitions, not {len(partitions)}")
        if sectors > 0xFFFFFFFF:
            raise DiskError("an MBR cannot address a disk larger than 2 TiB; use GPT")
        _check(disk_size, partitions, 1, sectors - 1)
        entries = [
            _mbr_entry(p.bootable, p.mbr_type, p.first_lba, p.size // SECTOR) for p in partitions
        ]
    table = b"".join(entries).ljust(64, b"\0")
    head = boot_code.ljust(_MBR_BOOTCODE_SIZE, b"\0")
    return head + struct.pack("<IH", signature, 0) + table + b"\x55\xaa"


def _gpt_header(
    *,
    current: int,
    backup: int,
    first_usable: int,
    last_usable: int,
    disk_guid: str,
    entries_lba: int,
    entries_crc: int,
) -> bytes:
    fields = [
        b"EFI PART",
        0x00010000,
        92,
        0,
        0,
        current,
        backup,
        first_usable,
        last_usable,
        uuid.UUID(disk_guid).bytes_le,
        entries_lba,
        GPT_ENTRIES,
        GPT_ENTRY_SIZE,
        entries_crc,
    ]
    fmt = "<8sIIIIQQQQ16sQIII"
    header = struct.pack(fmt, *fields)
    fields[3] = zlib.crc32(header)
    return struct.pack(fmt, *fields).ljust(SECTOR, b"\0")


def gpt_tables(
    disk_size: int, partitions: Sequence[Partition], *, disk_guid: str
) -> list[tuple[int, bytes]]:
    """Build the primary and backup GPT (without the protective MBR).

    :param disk_size: disk size in bytes.
    :param partitions: the partitions, in table order.
    :param disk_guid: the disk GUID.
    :returns: ``(byte offset, bytes)`` pairs to write.
    :raises DiskError: partitions overlap, are misaligned or too many.
    """
    sectors = disk_size // SECTOR
    first_usable = 1 + GPT_RESERVED_SECTORS
    last_usable = sectors - 1 - GPT_RESERVED_SECTORS
    if len(partitions) > GPT_ENTRIES:
        raise DiskError(f"a GPT holds {GPT_ENTRIES} partitions, not {len(partitions)}")
    _check(disk_size, partitions, first_usable, last_usable)
    array = bytearray(GPT_ENTRIES * GPT_ENTRY_SIZE)
    for index, part in enumerate(partitions):
        name = part.name.encode("utf-16-le")
        if len(name) > 72:
            raise DiskError(f"GPT partition name {part.name!r} is longer than 36 characters")
        attributes = 1 << 2 if part.bootable else 0
        array[index * GPT_ENTRY_SIZE : (index + 1) * GPT_ENTRY_SIZE] = struct.pack(
            "<16s16sQQQ72s",
            uuid.UUID(part.gpt_type).bytes_le,
            uuid.UUID(part.guid).bytes_le,
            part.first_lba,
            part.last_lba,
            attributes,
            name,
        )
    entries = bytes(array)
    entries_crc = zlib.crc32(entries)
    backup_entries_lba = sectors - 1 - (GPT_RESERVED_SECTORS - 1)
    primary = _gpt_header(
        current=1,
        backup=sectors - 1,
        first_usable=first_usable,
        last_usable=last_usable,
        disk_guid=disk_guid,
        entries_lba=2,
        entries_crc=entries_crc,
    )
    backup = _gpt_header(
        current=sectors - 1,
        backup=1,
        first_usable=first_usable,
        last_usable=last_usable,
        disk_guid=disk_guid,
        entries_lba=backup_entries_lba,
        entries_crc=entries_crc,
    )
    return [
        (SECTOR, primary),
        (2 * SECTOR, entries),
        (backup_entries_lba * SECTOR, entries),
        ((sectors - 1) * SECTOR, backup),
    ]


def write_table(
    fd: int,
    disk_size: int,
    partitions: Sequence[Partition],
    *,
    table: str,
    disk_guid: str,
    signature: int,
    boot_code: bytes = b"",
) -> None:
    """Write a partition table (and the MBR boot code) into an open disk image.

    :param fd: a file descriptor open for writing, the disk already sized.
    :param disk_size: disk size in bytes.
    :param partitions: the partitions, in table order.
    :param table: ``"gpt"`` or ``"mbr"``.
    :param disk_guid: the GPT disk GUID (unused for MBR).
    :param signature: the MBR disk signature.
    :param boot_code: MBR boot code, up to 440 bytes.
    :raises DiskError: the layout does not fit the table.
    """
    if table == "gpt":
        writes = gpt_tables(disk_size, partitions, disk_guid=disk_guid)
        first = mbr_sector(
            disk_size, partitions, signature=signature, protective=True, boot_code=boot_code
        )
    elif table == "mbr":
        writes = []
        first = mbr_sector(
            disk_size, partitions, signature=signature, protective=False, boot_code=boot_code
        )
    else:
        raise DiskError(f"unknown partition table {table!r}; expected 'gpt' or 'mbr'")
    for offset, data in [(0, first), *writes]:
        os.pwrite(fd, data, offset)
