"""``vhd``: a fixed VHD, as Azure and Hyper-V import it.

A fixed VHD is the raw disk followed by a 512-byte footer (Microsoft's
*Virtual Hard Disk Image Format Specification*, 2006). Azure only accepts
fixed VHDs whose virtual size is a whole number of MiB, so the payload is
padded with zeros (holes) to the next MiB before the footer is appended.

The footer is written here rather than by ``qemu-img convert -O vpc``: its
timestamp and unique id would otherwise come from the clock and a random
generator. Here the timestamp comes from the build (``ex_timestamp``, else
the disk stage's ``source_date_epoch``, else the VHD epoch) and the unique id
from the payload's content, so the same disk gives the same bytes.

Readers size a VHD in one of two ways: Hyper-V and Azure use the footer's
*current size*; Virtual PC (and QEMU, for creator applications it does not
know) use the CHS geometry, which cannot express every size and rounds down.
Open our VHDs with QEMU's ``force_size_calc=current_size`` to see all of it.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from cloudlets.drivers.base import FormatContext, FormatDriver, OutputFile
from cloudlets.drivers.formats.pieces import DiskReader, disk_pieces
from cloudlets.drivers.types import Format, FormatCapability
from cloudlets.errors import FormatError

__all__ = ["VHDFooter", "VHDFormat", "chs_geometry", "vhd_footer"]

MiB = 1024 * 1024
SECTOR = 512
#: ``1 January 2000 00:00:00 UTC``, the VHD timestamp epoch, in Unix seconds.
VHD_EPOCH = 946_684_800
#: The most sectors CHS geometry can describe (65535 cylinders, 16 heads, 255 sectors).
MAX_CHS_SECTORS = 65535 * 16 * 255

_COOKIE = b"conectix"
_FEATURES_RESERVED = 0x00000002
_FORMAT_VERSION = 0x00010000
_FIXED_DATA_OFFSET = 0xFFFFFFFFFFFFFFFF
_DISK_TYPE_FIXED = 2
#: ``>8sIIQI4sI4sQQHBBII16sB`` then 427 reserved bytes: 512 in all.
_LAYOUT = struct.Struct(">8sIIQI4sI4sQQHBBII16sB427x")
_CHECKSUM_OFFSET = 64
_CHUNK = 1 * MiB
_BLOCK = 64 * 1024


@dataclass(frozen=True)
class VHDFooter:
    """The fields of a VHD footer this driver sets.

    :ivar size: the virtual size in bytes (original and current size).
    :ivar timestamp: Unix seconds (stored as seconds since 2000-01-01).
    :ivar unique_id: the disk's UUID.
    :ivar creator_app: four bytes naming the writer.
    :ivar creator_version: the writer's version, ``major << 16 | minor``.
    :ivar creator_host: four bytes naming the host OS (``Wi2k`` or ``Mac ``).
    """

    size: int
    timestamp: int
    unique_id: uuid.UUID
    creator_app: bytes = b"clts"
    creator_version: int = 0x00010000
    creator_host: bytes = b"Wi2k"


def chs_geometry(size: int) -> tuple[int, int, int]:
    """The CHS geometry for a disk size, by the algorithm in the VHD specification
    (appendix "CHS Calculation").

    :param size: the disk size in bytes.
    :returns: ``(cylinders, heads, sectors_per_track)``.
    """
    total = min(size // SECTOR, MAX_CHS_SECTORS)
    if total >= 65535 * 16 * 63:
        sectors, heads = 255, 16
        cylinders_times_heads = total // sectors
    else:
        sectors = 17
        cylinders_times_heads = total // sectors
        heads = max((cylinders_times_heads + 1023) // 1024, 4)
        if cylinders_times_heads >= heads * 1024 or heads > 16:
            sectors, heads = 31, 16
            cylinders_times_heads = total // sectors
        if cylinders_times_heads >= heads * 1024:
            sectors, heads = 63, 16
            cylinders_times_heads = total // sectors
    return cylinders_times_heads // heads, heads, sectors


def vhd_footer(footer: VHDFooter) -> bytes:
    """Encode a fixed-disk VHD footer, checksum included.

    :param footer: the values to encode.
    :returns: the 512-byte footer.
    :raises FormatError: the size is not a whole number of sectors or the
        timestamp predates the VHD epoch.
    """
    if footer.size <= 0 or footer.size % SECTOR:
        raise FormatError(f"a VHD size must be a positive multiple of {SECTOR}: {footer.size}")
    if footer.timestamp < VHD_EPOCH:
        raise FormatError(f"VHD timestamps start in 2000; got Unix time {footer.timestamp}")
    cylinders, heads, sectors = chs_geometry(footer.size)

    def pack(checksum: int) -> bytes:
        return _LAYOUT.pack(
            _COOKIE, _FEATURES_RESERVED, _FORMAT_VERSION, _FIXED_DATA_OFFSET,
            (footer.timestamp - VHD_EPOCH) & 0xFFFFFFFF, footer.creator_app,
            footer.creator_version, footer.creator_host, footer.size, footer.size,
            cylinders, heads, sectors, _DISK_TYPE_FIXED, checksum, footer.unique_id.bytes, 0)

    unsummed = pack(0)
    checksum = ~sum(unsummed) & 0xFFFFFFFF
    encoded = pack(checksum)
    assert len(encoded) == SECTOR
    return encoded


_ZERO_CHUNK = bytes(_CHUNK)


def _is_zero(data: bytes) -> bool:
    """Whether ``data`` (at most a chunk) is all zeros: a ``memcmp``, not a count."""
    return data == _ZERO_CHUNK if len(data) == _CHUNK else data == _ZERO_CHUNK[:len(data)]


def _write_nonzero(dst: BinaryIO, offset: int, chunk: bytes) -> None:
    """Write the blocks of ``chunk`` that are not all zeros (the rest stay holes)."""
    view = memoryview(chunk)
    for start in range(0, len(chunk), _BLOCK):
        if not _is_zero(chunk[start:start + _BLOCK]):
            dst.seek(offset + start)
            dst.write(view[start:start + _BLOCK])


def _copy_and_digest(source: DiskReader, target: Path, size: int) -> str:
    """Copy a raw disk (whole or in pieces) into a new file of ``size``
    bytes, keeping holes, and digest its content independently of how it is
    laid out in holes: every non-zero MiB is hashed with its offset. The
    hash of one chunk runs on a thread of its own while the next is read
    and written (hashlib releases the GIL).

    :returns: the hex digest.
    """
    digest = hashlib.sha256()
    with open(target, "xb") as dst, ThreadPoolExecutor(1, thread_name_prefix="vhd") as hasher:
        hashing: Future[None] | None = None
        dst.truncate(size)
        end = source.size
        done = 0  # chunks before this offset are digested
        for data, hole in source.data_ranges():
            # Walk MiB-aligned chunks so the digest ignores where holes happen to be.
            chunk_start = max(data - data % _CHUNK, done)
            while chunk_start < hole:
                length = min(_CHUNK, end - chunk_start)
                chunk = source.read(chunk_start, length)
                if not _is_zero(chunk):
                    if hashing is not None:
                        hashing.result()
                    hashing = hasher.submit(_update, digest, struct.pack(">Q", chunk_start),
                                            chunk)
                    _write_nonzero(dst, chunk_start, chunk)
                chunk_start += _CHUNK
            done = max(done, chunk_start)
        if hashing is not None:
            hashing.result()
    digest.update(struct.pack(">Q", size))
    return digest.hexdigest()


def _update(digest: Any, *parts: bytes) -> None:
    for part in parts:
        digest.update(part)


class VHDFormat(FormatDriver):
    """Fixed VHD (``.vhd``), size rounded up to a whole MiB.

    :param ex_timestamp: the footer's timestamp in Unix seconds; by default
        the disk stage's ``source_date_epoch``, else 2000-01-01.
    """

    name: ClassVar[str] = Format.VHD
    website: ClassVar[str] = \
        "https://www.microsoft.com/en-us/download/details.aspx?id=23850"
    description: ClassVar[str] = "Fixed VHD, size aligned to 1 MiB (Azure, Hyper-V) (.vhd)"
    capabilities: ClassVar[FormatCapability] = (FormatCapability.BOOTABLE
                                                 | FormatCapability.COMPOSED_DISK)
    extension = ".vhd"

    def __init__(self, ex_timestamp: int | None = None) -> None:
        self.timestamp = ex_timestamp

    def convert(self, context: FormatContext) -> list[OutputFile]:
        name = f"{context.basename}.vhd"
        target = context.workdir / name
        pieces, disk_size = disk_pieces(context.disk)
        size = -(-disk_size // MiB) * MiB
        reader = DiskReader(pieces, disk_size)
        try:
            digest = _copy_and_digest(reader, target, size)
        finally:
            reader.close()
        unique_id = uuid.UUID(bytes=hashlib.sha256(
            f"cloudlets-vhd\0{digest}".encode()).digest()[:16], version=4)
        footer = VHDFooter(size=size, timestamp=self._timestamp(context), unique_id=unique_id)
        with open(target, "r+b") as handle:
            handle.seek(size)
            handle.write(vhd_footer(footer))
        return [OutputFile(role="disk", path=target, name=name,
                           media_type="application/x-vhd")]

    def _timestamp(self, context: FormatContext) -> int:
        if self.timestamp is not None:
            return self.timestamp
        epoch = context.disk.source_date_epoch
        return max(epoch, VHD_EPOCH) if epoch is not None else VHD_EPOCH
