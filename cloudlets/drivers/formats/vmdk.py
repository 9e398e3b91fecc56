"""streamOptimized VMDK, the disk inside OVF packages.

``qemu-img convert -O vmdk -o subformat=streamOptimized`` (QEMU 2.x and later)
writes the sparse extent header with version 3, the version ESXi requires
of streamOptimized disks; :func:`write_stream_optimized` checks it. The only
non-reproducible bytes in its output are the descriptor's random content id
(``CID``, printed without zero padding), replaced here by eight hex digits
derived from the file's content.
"""

from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path

from cloudlets.drivers.formats import qemuimg
from cloudlets.errors import FormatError

__all__ = ["ADAPTER_TYPES", "read_descriptor", "sparse_header", "write_stream_optimized"]

#: ``ddb.adapterType`` values qemu-img accepts.
ADAPTER_TYPES = ("ide", "lsilogic", "buslogic", "legacyESX")
#: VMware's sparse extent magic, ``KDMV``.
SPARSE_MAGIC = 0x564D444B
SECTOR = 512
_HEADER = struct.Struct("<IIIQQQQIQQQ?cccc")
_CID = re.compile(rb"^CID=([0-9a-fA-F]{1,8})$", re.MULTILINE)


def sparse_header(path: Path) -> dict[str, int]:
    """Read the fields of a hosted sparse extent header that matter here.

    :returns: ``version``, ``flags``, ``capacity`` (sectors), ``grain_size``
        (sectors), ``descriptor_offset`` and ``descriptor_size`` (sectors).
    :raises FormatError: the file is not a sparse VMDK extent.
    """
    with open(path, "rb") as handle:
        data = handle.read(_HEADER.size)
    if len(data) < _HEADER.size:
        raise FormatError(f"{path.name} is too short to be a VMDK")
    (magic, version, flags, capacity, grain, desc_offset, desc_size,
     *_rest) = _HEADER.unpack(data)
    if magic != SPARSE_MAGIC:
        raise FormatError(f"{path.name} is not a sparse VMDK extent (magic {magic:#x})")
    return {"version": version, "flags": flags, "capacity": capacity, "grain_size": grain,
            "descriptor_offset": desc_offset, "descriptor_size": desc_size}


def read_descriptor(path: Path) -> str:
    """:returns: the embedded text descriptor of a sparse VMDK extent.

    :raises FormatError: the file is not a sparse VMDK extent.
    """
    header = sparse_header(path)
    with open(path, "rb") as handle:
        handle.seek(header["descriptor_offset"] * SECTOR)
        text = handle.read(header["descriptor_size"] * SECTOR)
    return text.split(b"\0", 1)[0].decode("ascii", "replace")


def _content_id(path: Path) -> bytes:
    """Eight hex digits derived from the file's content."""
    digest = hashlib.sha256(b"cloudlets-vmdk-cid\0")
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()[:8].encode()


def write_stream_optimized(source: Path, target: Path, *, adapter_type: str = "lsilogic") -> None:
    """Convert a raw disk into a reproducible streamOptimized VMDK (version 3).

    :param source: the raw disk.
    :param target: the VMDK to write (must not exist); its file name is
        recorded in the VMDK's extent line, so give it its final name.
    :param adapter_type: the ``ddb.adapterType`` (one of :data:`ADAPTER_TYPES`).
    :raises FormatError: qemu-img failed or wrote something unexpected.
    """
    if adapter_type not in ADAPTER_TYPES:
        raise FormatError(f"VMDK adapter type {adapter_type!r} is not one of {ADAPTER_TYPES}")
    qemuimg.convert(source, target, "vmdk",
                    options={"subformat": "streamOptimized", "adapter_type": adapter_type})
    header = sparse_header(target)
    if header["version"] != 3:
        raise FormatError(f"qemu-img wrote a streamOptimized VMDK of version "
                          f"{header['version']}; ESXi requires version 3")
    start = header["descriptor_offset"] * SECTOR
    area = header["descriptor_size"] * SECTOR
    with open(target, "r+b") as handle:
        handle.seek(start)
        text = handle.read(area).split(b"\0", 1)[0]
        if not _CID.search(text) or b'createType="streamOptimized"' not in text:
            raise FormatError(f"{target.name}: unexpected VMDK descriptor from qemu-img")
        # qemu-img prints the random CID without zero padding: normalize it to
        # eight zeros, derive the real one from the content, then write it.
        text = _CID.sub(b"CID=00000000", text, count=1)
        if len(text) > area:
            raise FormatError(f"{target.name}: the VMDK descriptor does not fit its area")
        handle.seek(start)
        handle.write(text + bytes(area - len(text)))
        handle.flush()
        cid_at = start + text.index(b"\nCID=") + len(b"\nCID=")
        cid = _content_id(target)
        if cid in (b"ffffffff", b"fffffffe"):  # reserved values (no parent / invalid)
            cid = b"00000001"
        handle.seek(cid_at)
        handle.write(cid)
