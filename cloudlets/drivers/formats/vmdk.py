"""streamOptimized VMDK, the disk inside OVF packages, written natively.

The layout is the stream-optimized form of VMware's hosted sparse extent
(*Virtual Disk Format* 1.1 / 5.0), version 3 as ESXi requires it:

* sector 0: the sparse extent header, version 3, flags *valid newline
  detection*, *compressed grains* and *markers*, 128-sector (64 KiB) grains,
  512 entries per grain table, deflate compression, and ``gdOffset`` set to
  ``GD_AT_END``: the grain directory's place is known only at the end;
* the embedded text descriptor (``createType="streamOptimized"``) from
  sector 1;
* from :data:`OVERHEAD_SECTORS` on, each grain that holds data, in disk
  order: a marker (its first sector, 8 bytes, and the compressed length,
  4 bytes) and the zlib stream of the whole 64 KiB grain (the last one
  padded with zeros), padded to a sector boundary. All-zero grains are not
  written (their table entry stays 0);
* after the grains of each 32 MiB span, a grain table marker and the grain
  table (for spans without data too, as VMware's writers do: 2.5 KiB per
  32 MiB);
* a grain directory marker and the directory, a footer marker and the
  footer (the header again, with the directory's real offset), and the
  end-of-stream marker, each a sector.

Independent grains are compressed on :data:`WORKERS` threads (ISA-L's and
zlib's compressors release the GIL) while one thread writes them in order;
at most a few MiB are in flight whatever the disk's size. The disk is read
as the disk stage built it: a raw file, or pieces of files
(:attr:`~cloudlets.drivers.base.DiskImage.pieces`), whose holes are found
with ``SEEK_DATA`` and never read.

The output is reproducible: the same disk gives the same bytes. The
descriptor's content id (``CID``) is derived from the content: each
grain's place, compressed length and the Adler-32 of its bytes (the zlib
stream's trailer), and the grain tables.

A grain of a cached base filesystem compresses to the same bytes on every
render of its cloudlet: :class:`GrainCache` keeps them beside the base, so a
re-render compresses only the grains its patch changed.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import struct
from array import array
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cloudlets import fastzlib
from cloudlets.drivers.base import DiskImage
from cloudlets.drivers.formats.pieces import DiskReader, disk_pieces
from cloudlets.errors import FormatError
from cloudlets.progress import PartProgress
from cloudlets.sparse import data_ranges

__all__ = ["ADAPTER_TYPES", "GRAIN_SIZE", "GrainCache", "descriptor_cid", "read_descriptor",
           "sparse_header", "write_stream_optimized"]

#: ``ddb.adapterType`` values.
ADAPTER_TYPES = ("ide", "lsilogic", "buslogic", "legacyESX")
#: VMware's sparse extent magic, ``KDMV``.
SPARSE_MAGIC = 0x564D444B
SECTOR = 512
#: Sectors per grain, the only grain size ESXi's stream-optimized reader takes.
GRAIN_SECTORS = 128
#: Bytes per grain.
GRAIN_SIZE = GRAIN_SECTORS * SECTOR
#: Grain table entries per grain table (a table covers 32 MiB).
GTES_PER_GT = 512
#: Sectors before the first grain: header, descriptor, padding.
OVERHEAD_SECTORS = 128
#: Where the descriptor is and how many sectors it may take.
DESCRIPTOR_OFFSET = 1
DESCRIPTOR_SECTORS = 20
#: ``gdOffset`` of a stream-optimized header: the directory's offset is in the footer.
GD_AT_END = 0xFFFFFFFFFFFFFFFF
FLAG_NEWLINE_DETECT = 1 << 0
FLAG_COMPRESSED = 1 << 16
FLAG_MARKERS = 1 << 17
#: The header flags written: valid newline detection, compressed grains, markers.
FLAGS = FLAG_NEWLINE_DETECT | FLAG_COMPRESSED | FLAG_MARKERS
COMPRESSION_DEFLATE = 1
MARKER_EOS, MARKER_GT, MARKER_GD, MARKER_FOOTER = 0, 1, 2, 3
#: Compressing threads.
WORKERS = 2
#: Grains per task a worker reads and compresses (1 MiB).
BATCH_GRAINS = 16
#: Tasks queued ahead of the writer per worker: the memory bound.
QUEUE_DEPTH = 4
#: The largest virtual size written (VMware's limit for a sparse extent is 62 TiB).
MAX_CAPACITY = 62 * 1024 ** 4
#: Grain table entries are 32-bit sector numbers: the file cannot grow past 2 TiB.
MAX_SECTOR = 0xFFFFFFFF

_HEADER = struct.Struct("<IIIQQQQIQQQ?ccccH433x")
_GRAIN_MARKER = struct.Struct("<QI")
_META_MARKER = struct.Struct("<QII496x")
_CID = re.compile(rb"^CID=([0-9a-fA-F]{1,8})$", re.MULTILINE)
_ZERO_GRAIN = bytes(GRAIN_SIZE)
_ZERO_SECTOR = bytes(SECTOR)
assert _HEADER.size == SECTOR and _META_MARKER.size == SECTOR


def sparse_header(path: Path, *, footer: bool = False) -> dict[str, int]:
    """Read the fields of a hosted sparse extent header.

    :param footer: read the footer's copy (the last sector but one of a
        stream-optimized extent) instead of the header.
    :returns: ``version``, ``flags``, ``capacity`` (sectors), ``grain_size``
        (sectors), ``descriptor_offset`` and ``descriptor_size`` (sectors),
        ``gtes_per_gt``, ``rgd_offset``, ``gd_offset``, ``overhead``
        (sectors) and ``compression``.
    :raises FormatError: the file is not a sparse VMDK extent.
    """
    with open(path, "rb") as handle:
        if footer:
            handle.seek(max(os.fstat(handle.fileno()).st_size - 2 * SECTOR, 0))
        data = handle.read(_HEADER.size)
    if len(data) < _HEADER.size:
        raise FormatError(f"{path.name} is too short to be a VMDK")
    (magic, version, flags, capacity, grain, desc_offset, desc_size, gtes, rgd, gd, overhead,
     _unclean, _nl1, _nl2, _nl3, _nl4, compression) = _HEADER.unpack(data)
    if magic != SPARSE_MAGIC:
        raise FormatError(f"{path.name} is not a sparse VMDK extent (magic {magic:#x})")
    return {"version": version, "flags": flags, "capacity": capacity, "grain_size": grain,
            "descriptor_offset": desc_offset, "descriptor_size": desc_size,
            "gtes_per_gt": gtes, "rgd_offset": rgd, "gd_offset": gd, "overhead": overhead,
            "compression": compression}


def read_descriptor(path: Path) -> str:
    """:returns: the embedded text descriptor of a sparse VMDK extent.

    :raises FormatError: the file is not a sparse VMDK extent.
    """
    header = sparse_header(path)
    with open(path, "rb") as handle:
        handle.seek(header["descriptor_offset"] * SECTOR)
        text = handle.read(header["descriptor_size"] * SECTOR)
    return text.split(b"\0", 1)[0].decode("ascii", "replace")


def _header(capacity: int, gd_offset: int) -> bytes:
    return _HEADER.pack(SPARSE_MAGIC, 3, FLAGS, capacity, GRAIN_SECTORS, DESCRIPTOR_OFFSET,
                        DESCRIPTOR_SECTORS, GTES_PER_GT, 0, gd_offset, OVERHEAD_SECTORS, False,
                        b"\n", b" ", b"\r", b"\n", COMPRESSION_DEFLATE)


def _descriptor(name: str, capacity: int, adapter_type: str, cid: str) -> bytes:
    heads = 16 if adapter_type == "ide" else 255
    cylinders = min(max(-(-capacity // (heads * 63)), 1), 16383 if adapter_type == "ide" else 65535)
    text = "\n".join([
        "# Disk DescriptorFile",
        "version=1",
        'encoding="UTF-8"',
        f"CID={cid}",
        "parentCID=ffffffff",
        'createType="streamOptimized"',
        "",
        "# Extent description",
        f'RW {capacity} SPARSE "{name}"',
        "",
        "# The Disk Data Base",
        "#DDB",
        "",
        'ddb.virtualHWVersion = "4"',
        f'ddb.geometry.cylinders = "{cylinders}"',
        f'ddb.geometry.heads = "{heads}"',
        'ddb.geometry.sectors = "63"',
        f'ddb.adapterType = "{adapter_type}"',
        'ddb.toolsVersion = "2147483647"',
        "",
    ]).encode("ascii")
    if len(text) > DESCRIPTOR_SECTORS * SECTOR:
        raise FormatError(f"the VMDK descriptor of {name!r} does not fit its "
                          f"{DESCRIPTOR_SECTORS} sectors")
    return text


def _marker(value: int, kind: int) -> bytes:
    return _META_MARKER.pack(value, 0, kind)


# -- the grain cache ------------------------------------------------------------------


class GrainCache:
    """The compressed grains of one immutable file (a cached base
    filesystem), as a stream-optimized VMDK stores them, kept in one file
    beside it.

    The file holds, for every :data:`GRAIN_SIZE` grain of the base from
    offset 0, its compressed zlib stream (or nothing, for an all-zero grain);
    its name says the compressor and level, so other settings never read
    it. It is written once, complete, by the first conversion that reads
    the base (:meth:`build`), and renamed into place; a damaged or short
    file is ignored. Its name is the base's cache key, which names the
    base's content, so a cache never outlives the bytes it was made from.

    :param path: the cache file.
    :param base: the file whose grains it holds.
    """

    _MAGIC = b"cloudlets-vmdk-grains-1\0"
    _ENTRY = struct.Struct("<QI")

    def __init__(self, path: Path, base: Path) -> None:
        self.path = path
        self.base = base
        self._fd: int | None = None
        self._index: array[int] | None = None
        self._lengths: array[int] | None = None

    @classmethod
    def beside(cls, base: Path, settings: str) -> GrainCache | None:
        """The grain cache of a cached base filesystem, named for the
        compression ``settings``; ``None`` when ``base`` is not one (see
        :func:`cloudlets.disk.assemble.base_sidecar`)."""
        from cloudlets.disk.assemble import base_sidecar

        sidecar = base_sidecar(base, f"vmdk-grains-{settings}")
        return None if sidecar is None else cls(sidecar, base)

    @property
    def grains(self) -> int:
        """Grains in the base."""
        return -(-self.base.stat().st_size // GRAIN_SIZE)

    def open(self) -> bool:
        """Open the cache for :meth:`get`. :returns: whether it is usable."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return False
        try:
            count = self.grains
            head = os.pread(fd, len(self._MAGIC) + 8, 0)
            expected = self._MAGIC + struct.pack("<Q", count)
            table = os.pread(fd, count * self._ENTRY.size, len(expected))
            if head != expected or len(table) != count * self._ENTRY.size:
                raise ValueError("not a grain cache of this base")
            offsets, lengths = array("Q"), array("I")
            size = os.fstat(fd).st_size
            for offset, length in self._ENTRY.iter_unpack(table):
                if length and offset + length > size:
                    raise ValueError("a grain past the file's end")
                offsets.append(offset)
                lengths.append(length)
        except (OSError, ValueError):
            os.close(fd)
            return False
        self._fd, self._index, self._lengths = fd, offsets, lengths
        return True

    def get(self, grain: int) -> bytes | None:
        """The compressed grain ``grain`` of the base.

        :returns: its zlib stream, ``b""`` for an all-zero grain, ``None``
            when the cache is not open.
        """
        if self._fd is None or self._index is None or self._lengths is None:
            return None
        length = self._lengths[grain]
        if not length:
            return b""
        data = os.pread(self._fd, length, self._index[grain])
        if len(data) != length:
            raise FormatError(f"the grain cache {self.path.name} ended early")
        return data

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = self._index = self._lengths = None

    def build(self, compress: Callable[[bytes], bytes]) -> None:
        """Compress every grain of the base into a new cache file (another
        process may do the same at once: the last rename wins, and both are
        the same bytes)."""
        count = self.grains
        partial = self.path.with_name(
            f"{self.path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        header_size = len(self._MAGIC) + 8 + count * self._ENTRY.size
        table = bytearray(count * self._ENTRY.size)
        try:
            with open(partial, "xb") as out, open(self.base, "rb") as src:
                out.seek(header_size)
                position = header_size
                ranges = data_ranges(src.fileno())
                todo = sorted({g for start, end in ranges
                               for g in range(start // GRAIN_SIZE, -(-end // GRAIN_SIZE))})
                for grain, packed in _parallel(todo, lambda g: _cache_grain(src.fileno(), g,
                                                                               compress)):
                    if packed:
                        self._ENTRY.pack_into(table, grain * self._ENTRY.size, position,
                                              len(packed))
                        out.write(packed)
                        position += len(packed)
                out.seek(0)
                out.write(self._MAGIC + struct.pack("<Q", count) + table)
            os.replace(partial, self.path)
        finally:
            partial.unlink(missing_ok=True)


def _cache_grain(fd: int, grain: int, compress: Callable[[bytes], bytes]) -> bytes:
    data = os.pread(fd, GRAIN_SIZE, grain * GRAIN_SIZE)
    if len(data) < GRAIN_SIZE:
        data += bytes(GRAIN_SIZE - len(data))
    return b"" if data == _ZERO_GRAIN else compress(data)


def _parallel(items: Sequence[int], work: Callable[[int], bytes]) -> Iterator[tuple[int, bytes]]:
    """``work`` over ``items`` on :data:`WORKERS` threads, results in order,
    a bounded number ahead."""
    with ThreadPoolExecutor(WORKERS, thread_name_prefix="vmdk") as pool:
        pending: deque[tuple[int, Future[bytes]]] = deque()
        try:
            for item in items:
                pending.append((item, pool.submit(work, item)))
                if len(pending) >= WORKERS * QUEUE_DEPTH * BATCH_GRAINS:
                    first, future = pending.popleft()
                    yield first, future.result()
            while pending:
                first, future = pending.popleft()
                yield first, future.result()
        finally:
            for _, future in pending:
                future.cancel()


# -- writing ------------------------------------------------------------------------------


def _compressor(level: int | None) -> tuple[Callable[[bytes], bytes], str]:
    """The grain compressor (zlib streams) and its settings' name."""
    module = fastzlib.module
    is_isal = module.__name__.startswith("isal")
    if level is None:
        level = 1
    if is_isal and not 0 <= level <= 3:
        raise FormatError(f"compression level {level} is not one ISA-L has (0 to 3)")
    if not is_isal and not 0 <= level <= 9:
        raise FormatError(f"compression level {level} is not one zlib has (0 to 9)")
    compress = module.compress

    def run(data: bytes) -> bytes:
        return bytes(compress(data, level))

    return run, f"{'isal' if is_isal else 'zlib'}{level}"


@dataclass(frozen=True)
class _BaseSource:
    """Grains of the disk that lie whole in one cached base file at a
    grain-aligned offset, and the cache of its compressed grains."""

    cache: GrainCache
    shift: int  # base grain = disk grain - shift

    def grain(self, disk: DiskReader, grain: int) -> bytes | None:
        """The cached compressed ``grain`` of the disk, if it is the base's."""
        start, end = grain * GRAIN_SIZE, (grain + 1) * GRAIN_SIZE
        spans = list(disk.spans_over(start, end))
        if not spans or spans[0].start > start or spans[-1].end < min(end, disk.size):
            return None
        if any(span.piece.path != self.cache.base for span in spans):
            return None
        if any((span.start - span.piece.offset) != self.shift * GRAIN_SIZE for span in spans):
            return None
        return self.cache.get(grain - self.shift)


def _grain_caches(disk: DiskReader, settings: str, compress: Callable[[bytes], bytes]
                  ) -> list[_BaseSource]:
    """The grain caches of the cached bases the disk is made of, built if
    they are missing (once: the first conversion of a base pays for it, as
    it compresses those grains anyway)."""
    sources: list[_BaseSource] = []
    seen: set[Path] = set()
    for span in disk.spans:
        path = span.piece.path
        delta = span.start - span.piece.offset
        if path in seen or delta % GRAIN_SIZE:
            continue
        seen.add(path)
        cache = GrainCache.beside(path, settings)
        if cache is None:
            continue
        if not cache.open():
            try:
                cache.build(compress)
            except OSError:  # a read-only cache directory, a full disk: go without
                continue
            if not cache.open():
                continue
        sources.append(_BaseSource(cache, delta // GRAIN_SIZE))
    return sources


def _batches(disk: DiskReader, grains: int) -> list[tuple[int, int]]:
    """``(first grain, count)`` of the grains that may hold data, in order,
    at most :data:`BATCH_GRAINS` each."""
    batches: list[tuple[int, int]] = []
    last = -1
    for start, end in disk.data_ranges():
        first = max(start // GRAIN_SIZE, last + 1)
        stop = min(-(-end // GRAIN_SIZE), grains)
        while first < stop:
            count = min(BATCH_GRAINS, stop - first)
            batches.append((first, count))
            first += count
            last = first - 1
    return batches


def _adler(record: bytes) -> bytes:
    """The Adler-32 trailer of a grain record's zlib stream."""
    (length,) = struct.unpack_from("<I", record, 8)
    return record[8 + length:12 + length]


def _record(grain: int, compressed: bytes) -> bytes:
    """A grain's marker and compressed data, padded to a sector."""
    record = _GRAIN_MARKER.pack(grain * GRAIN_SECTORS, len(compressed)) + compressed
    return record + bytes(-len(record) % SECTOR)


def _work(disk: DiskReader, first: int, count: int, compress: Callable[[bytes], bytes],
          bases: Sequence[_BaseSource]) -> list[tuple[int, bytes]]:
    """Read and compress ``count`` grains from ``first`` on.

    :returns: ``(grain, record)`` of the grains that are
        not all zeros.
    """
    out: list[tuple[int, bytes]] = []
    data: bytes | None = None
    for index in range(count):
        grain = first + index
        compressed = None
        for base in bases:
            compressed = base.grain(disk, grain)
            if compressed is not None:
                break
        if compressed is None:
            if data is None:
                data = disk.read(first * GRAIN_SIZE, count * GRAIN_SIZE)
            chunk = data[index * GRAIN_SIZE:(index + 1) * GRAIN_SIZE]
            compressed = b"" if chunk == _ZERO_GRAIN else compress(chunk)
        if compressed:
            record = _record(grain, compressed)
            out.append((grain, record))
    return out


def write_stream_optimized(source: Path | DiskImage, target: Path, *,
                           adapter_type: str = "lsilogic", level: int | None = None,
                           grain_cache: bool = True,
                           progress: PartProgress | None = None) -> None:
    """Write a raw disk as a reproducible streamOptimized VMDK (version 3).

    :param source: the raw disk, or the disk stage's image (which may be
        made of :attr:`~cloudlets.drivers.base.DiskImage.pieces`).
    :param target: the VMDK to write (must not exist); its file name is
        recorded in the VMDK's extent line, so give it its final name.
    :param adapter_type: the ``ddb.adapterType`` (one of :data:`ADAPTER_TYPES`).
    :param level: the deflate level (ISA-L: 0 to 3, zlib: 0 to 9; default 1).
    :param grain_cache: reuse (and keep) the compressed grains of a cached
        base filesystem the disk is made of (:class:`GrainCache`).
    :param progress: called as ``progress(done, total)`` with the bytes of
        the disk handled so far (holes included) and its size.
    :raises FormatError: the disk cannot be read or is too large, or an
        option is out of range.
    """
    if adapter_type not in ADAPTER_TYPES:
        raise FormatError(f"VMDK adapter type {adapter_type!r} is not one of {ADAPTER_TYPES}")
    if not re.fullmatch(r"[^\"\\\x00-\x1f\x7f]+", target.name) or not target.name.isascii():
        raise FormatError(f"{target.name!r} cannot be named in a VMDK descriptor")
    compress, settings = _compressor(level)
    pieces, size = disk_pieces(source)
    if size > MAX_CAPACITY:
        raise FormatError(f"a {size}-byte disk is larger than a VMDK extent holds "
                          f"({MAX_CAPACITY} bytes)")
    disk = DiskReader(pieces, size)
    bases: list[_BaseSource] = []
    try:
        with open(target, "xb") as out:
            try:
                if grain_cache:
                    bases = _grain_caches(disk, settings, compress)
                _write(disk, out.fileno(), target.name, adapter_type, compress, bases,
                       progress)
            except BaseException:
                out.close()
                target.unlink(missing_ok=True)
                raise
    finally:
        for base in bases:
            base.cache.close()
        disk.close()


def _write(disk: DiskReader, fd: int, name: str, adapter_type: str,
           compress: Callable[[bytes], bytes], bases: Sequence[_BaseSource],
           progress: PartProgress | None = None) -> None:
    capacity = -(-disk.size // SECTOR)
    grains = -(-capacity // GRAIN_SECTORS)
    tables = -(-grains // GTES_PER_GT)
    directory = array("I", bytes(4 * tables))
    table = array("I", bytes(4 * GTES_PER_GT))
    digest = hashlib.sha256(b"cloudlets-vmdk-cid-2\0")
    buffer = bytearray()
    position = OVERHEAD_SECTORS  # the next sector written
    written = [OVERHEAD_SECTORS * SECTOR]  # bytes in the file

    def emit(data: bytes) -> None:
        nonlocal position
        buffer.extend(data)
        position += len(data) // SECTOR
        if position > MAX_SECTOR:
            raise FormatError("the VMDK would grow past 2 TiB, more than its grain "
                              "tables can address")
        if len(buffer) >= 1 << 20:
            flush()

    def flush() -> None:
        view = memoryview(buffer)
        while view:
            done = os.pwrite(fd, view, written[0])
            written[0] += done
            view = view[done:]
        del view
        buffer.clear()

    current = 0  # the grain table being filled

    def close_table(index: int) -> None:
        # every table is written, empty ones too, as VMware's own writers do
        emit(_marker(GTES_PER_GT * 4 // SECTOR, MARKER_GT))
        directory[index] = position
        data = table.tobytes()
        digest.update(data)
        emit(data)
        if any(table):
            for slot in range(GTES_PER_GT):
                table[slot] = 0

    with ThreadPoolExecutor(WORKERS, thread_name_prefix="vmdk") as pool:
        pending: deque[tuple[int, Future[list[tuple[int, bytes]]]]] = deque()
        batches = iter(_batches(disk, grains))
        try:
            while True:
                while len(pending) < WORKERS * QUEUE_DEPTH:
                    batch = next(batches, None)
                    if batch is None:
                        break
                    pending.append((batch[0] + batch[1],
                                    pool.submit(_work, disk, *batch, compress, bases)))
                if not pending:
                    break
                end, future = pending.popleft()
                for grain, record in future.result():
                    while grain // GTES_PER_GT > current:
                        close_table(current)
                        current += 1
                    table[grain % GTES_PER_GT] = position
                    # the CID's input: where the grain is, its compressed
                    # length and the zlib stream's Adler-32 of its bytes
                    digest.update(record[:12] + _adler(record))
                    emit(record)
                if progress is not None:
                    progress(min(end * GRAIN_SIZE, disk.size), disk.size)
        finally:
            for _end, waiting in pending:
                waiting.cancel()
    while current < tables:
        close_table(current)
        current += 1
    if progress is not None:  # trailing holes are handled too
        progress(disk.size, disk.size)
    emit(_marker(-(-tables * 4 // SECTOR), MARKER_GD))
    gd_offset = position
    data = directory.tobytes()
    digest.update(data)
    emit(data + bytes(-len(data) % SECTOR))
    emit(_marker(1, MARKER_FOOTER))
    emit(_header(capacity, gd_offset))
    emit(_ZERO_SECTOR)  # end of stream
    flush()
    digest.update(_descriptor(name, capacity, adapter_type, "00000000"))
    cid = digest.hexdigest()[:8]
    if cid in ("ffffffff", "fffffffe"):  # reserved values (no parent / invalid)
        cid = "00000001"
    text = _descriptor(name, capacity, adapter_type, cid)
    head = _header(capacity, GD_AT_END) + text
    os.pwrite(fd, head + bytes(OVERHEAD_SECTORS * SECTOR - len(head)), 0)


def descriptor_cid(path: Path) -> str:
    """:returns: the ``CID`` of a VMDK's descriptor.

    :raises FormatError: it has none.
    """
    match = _CID.search(read_descriptor(path).encode())
    if match is None:
        raise FormatError(f"{path.name}: the VMDK descriptor has no CID")
    return match.group(1).decode()

