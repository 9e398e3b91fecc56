"""A qcow2 (version 3) writer: a raw disk, or a disk made of pieces, to a
self-contained qcow2 file in one sequential pass that hashes what it writes.

``qemu-img convert`` writes the same kind of image, but its output must then
be read back to be hashed for the store (300 MB for a 1 GiB root filesystem
of shared libraries), and it allocates as it goes, so nothing about its file
is known before it exits. Here the layout is decided first, by content: the
disk is read once to find its non-zero clusters (holes are skipped without
reading), then the file is written front to back (header, refcounts, L1 and
L2 tables, the data clusters in guest order) while every byte is hashed on
its way out, a writer thread overlapping ``pwrite`` with the reads and the
hashing (both release the GIL). The same disk content always gives the same
bytes, whatever the pieces or the file system's holes.

The layout, all clusters of :data:`CLUSTER_SIZE` bytes::

    0                      header (version 3, refcount order 4: 16-bit counts)
    1                      refcount table
    2 .. 2+R               refcount blocks (R of them; every cluster has count 1)
    ..                     L1 table
    ..                     L2 tables, only those that map some data
    ..                     data clusters, in guest order

No backing file, no compression, no extensions: ``qemu-img check`` finds it
clean, and QEMU boots it.
"""

from __future__ import annotations

import array
import bisect
import collections
import contextlib
import hashlib
import os
import queue
import secrets
import struct
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from cloudlets.errors import FormatError
from cloudlets.progress import PartProgress
from cloudlets.sparse import Piece, data_ranges

__all__ = ["CLUSTER_SIZE", "write_qcow2"]

CLUSTER_BITS = 16
#: Bytes per cluster (qemu-img's default).
CLUSTER_SIZE = 1 << CLUSTER_BITS
#: Data clusters read, hashed and written at a time (at most).
RUN_CLUSTERS = 64
#: Buffers in flight between the reading thread and the writer thread.
BUFFERS = 3

_MAGIC = b"QFI\xfb"
_HEADER_LENGTH = 104
_COPIED = 1 << 63  # L1/L2 entry: refcount is exactly 1
_REFCOUNT_ORDER = 4  # 16-bit refcounts
_REFCOUNTS_PER_BLOCK = CLUSTER_SIZE * 8 // (1 << _REFCOUNT_ORDER)
_ENTRIES_PER_TABLE = CLUSTER_SIZE // 8
_ZERO_CLUSTER = bytes(CLUSTER_SIZE)


@dataclass(frozen=True)
class _Segment:
    """``length`` bytes of the disk from ``start`` on, read from ``fd`` at
    ``offset``."""

    start: int
    length: int
    fd: int
    offset: int


class _Disk:
    """The disk as segments of open files, read by disk offset."""

    def __init__(self, pieces: Sequence[Piece], *,
                 segments: Sequence[_Segment] = ()) -> None:
        """Open the files of ``pieces``; or read ``segments`` of files
        opened already (closed by their owner)."""
        self._fds: dict[Path, int] = {}
        self.segments: list[_Segment] = list(segments)
        position = sum(segment.length for segment in segments)
        try:
            for piece in pieces:
                fd = self._fds.get(piece.path)
                if fd is None:
                    fd = self._fds[piece.path] = os.open(piece.path, os.O_RDONLY)
                if os.fstat(fd).st_size < piece.offset + piece.length:
                    raise FormatError(f"{piece.path} is shorter than the piece of the disk "
                                      f"at {piece.offset}+{piece.length}")
                self.segments.append(_Segment(position, piece.length, fd, piece.offset))
                position += piece.length
        except BaseException:
            self.close()
            raise
        self.size = position
        #: the file each descriptor this disk opened reads
        self.paths = {fd: path for path, fd in self._fds.items()}
        self._starts = [segment.start for segment in self.segments]
        self._ranges: dict[int, list[tuple[int, int]]] = {}

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def data_clusters(self) -> list[int]:
        """The indexes of the clusters that may hold data (holes skipped),
        sorted, without duplicates."""
        found: set[int] = set()
        for segment in self.segments:
            ranges = self._ranges.get(segment.fd)
            if ranges is None:
                ranges = self._ranges[segment.fd] = data_ranges(segment.fd)
            low, high = segment.offset, segment.offset + segment.length
            # the ranges are sorted: start at the last one beginning before the piece
            first_range = max(bisect.bisect_right(ranges, (low, low)) - 1, 0)
            for start, end in ranges[first_range:]:
                if start >= high:
                    break
                start, end = max(start, low), min(end, high)
                if start >= end:
                    continue
                first = (segment.start + start - low) >> CLUSTER_BITS
                last = (segment.start + end - low - 1) >> CLUSTER_BITS
                found.update(range(first, last + 1))
        return sorted(found)

    def read(self, view: memoryview, position: int) -> None:
        """Fill ``view`` with the disk's bytes from ``position`` on (zeros
        past its end)."""
        done = 0
        wanted = len(view)
        for segment in self._overlapping(position, wanted):
            start = max(position, segment.start)
            end = min(position + wanted, segment.start + segment.length)
            if start - position > done:
                view[done:start - position] = _zeros(start - position - done)
            target = view[start - position:end - position]
            offset = segment.offset + start - segment.start
            while len(target):
                got = os.preadv(segment.fd, [target], offset)
                if got <= 0:
                    raise FormatError("a piece of the disk ended early")
                target, offset = target[got:], offset + got
            done = end - position
        if done < wanted:
            view[done:] = _zeros(wanted - done)

    def _overlapping(self, position: int, length: int) -> list[_Segment]:
        """The segments holding bytes of ``[position, position + length)``
        (a composed disk has hundreds: found by bisection)."""
        segments = self.segments
        index = max(bisect.bisect_right(self._starts, position) - 1, 0)
        found = []
        while index < len(segments) and segments[index].start < position + length:
            segment = segments[index]
            if position < segment.start + segment.length:
                found.append(segment)
            index += 1
        return found


def _zeros(length: int) -> bytes:
    return _ZERO_CLUSTER[:length] if length <= CLUSTER_SIZE else bytes(length)


def _is_zero(view: memoryview) -> bool:
    """Whether a cluster's bytes are all zeros (most data clusters fail on
    their first or last byte, without a copy)."""
    if view[0] or view[-1] or view[len(view) // 2]:
        return False
    return view.tobytes() == _ZERO_CLUSTER[:len(view)]


def _nonzero(disk: _Disk, candidates: Sequence[int], base: int = 0) -> list[int]:
    """The ``candidates`` (sorted cluster indexes, counted from ``base``
    bytes into the disk) that hold a non-zero byte, by reading them."""
    kept: list[int] = []
    view = memoryview(bytearray(CLUSTER_SIZE * RUN_CLUSTERS))
    for first, count in _runs(candidates):  # each run of consecutive clusters read at once
        disk.read(view[:count * CLUSTER_SIZE], base + (first << CLUSTER_BITS))
        for k in range(count):
            if not _is_zero(view[k * CLUSTER_SIZE:(k + 1) * CLUSTER_SIZE]):
                kept.append(first + k)
    return kept


#: Files whose non-zero clusters are remembered (the cached base filesystem
#: every re-render reads again, 300 MB of data): at least this long.
MEMO_MIN_SIZE = 64 * 1024 * 1024
#: ... and unchanged for this long (nanoseconds): a file written within the
#: clock tick of its last change could change again without new times.
MEMO_SETTLED_NS = 2_000_000_000
#: How many files' maps are remembered in a process (least recently used go).
MEMO_FILES = 8
_memo: collections.OrderedDict[tuple[int, ...], frozenset[int]] = collections.OrderedDict()
_memo_lock = threading.Lock()


def _file_map(fd: int, path: Path | None = None) -> frozenset[int] | None:
    """The non-zero clusters of the whole file ``fd`` (offsets // cluster
    size), remembered while the file keeps its identity, size and times;
    ``None`` for a small file (read it). For a cached base filesystem
    (``path``), the map is also kept beside it (:data:`MAP_SIDECAR`), so
    that a fresh process does not read the base to find it."""
    info = os.fstat(fd)
    if info.st_size < MEMO_MIN_SIZE:
        return None
    if time.time_ns() - max(info.st_mtime_ns, info.st_ctime_ns) < MEMO_SETTLED_NS:
        # a change within the file system's clock tick would keep the times
        return None
    key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
    with _memo_lock:
        found = _memo.get(key)
        if found is not None:
            _memo.move_to_end(key)
            return found
    sidecar = _map_sidecar(path) if path is not None else None
    found = _load_map(sidecar, info) if sidecar is not None else None
    if found is None:
        whole = _Disk([], segments=[_Segment(0, info.st_size, fd, 0)])
        found = frozenset(_nonzero(whole, whole.data_clusters()))
        if sidecar is not None:
            _save_map(sidecar, info, found)
    with _memo_lock:
        _memo[key] = found
        while len(_memo) > MEMO_FILES:
            _memo.popitem(last=False)
    return found


#: The suffix of the cluster map kept beside a cached base filesystem
#: (:func:`cloudlets.disk.assemble.base_sidecar`).
MAP_SIDECAR = "qcow2-clusters"
_MAP_MAGIC = b"cloudlets-qcow2-clusters-1\n"
_MAP_HEAD = struct.Struct("<QQQ")  # the file's size and mtime (ns), the clusters listed


def _map_sidecar(path: Path) -> Path | None:
    from cloudlets.disk.assemble import base_sidecar

    return base_sidecar(path, MAP_SIDECAR)


def _load_map(sidecar: Path, info: os.stat_result) -> frozenset[int] | None:
    """The map kept in ``sidecar``, if it is one of the file as it is now
    (its size and mtime) and well formed; else ``None``."""
    head = len(_MAP_MAGIC) + _MAP_HEAD.size
    limit = -(-info.st_size // CLUSTER_SIZE)
    try:
        with open(sidecar, "rb") as handle:  # never more than a whole file's map
            data = handle.read(head + 4 * limit + 1)
    except OSError:
        return None
    if len(data) < head or not data.startswith(_MAP_MAGIC):
        return None
    size, mtime_ns, count = _MAP_HEAD.unpack_from(data, len(_MAP_MAGIC))
    clusters = array.array("I")
    if (size, mtime_ns) != (info.st_size, info.st_mtime_ns) \
            or len(data) != head + count * clusters.itemsize:
        return None
    clusters.frombytes(data[head:])
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        clusters.byteswap()
    if count and max(clusters) >= limit:
        return None
    return frozenset(clusters)


def _save_map(sidecar: Path, info: os.stat_result, clusters: frozenset[int]) -> None:
    """Keep the map in ``sidecar`` (atomically; a cache directory that
    cannot take it goes without)."""
    listed = array.array("I", sorted(clusters))
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        listed.byteswap()
    partial = sidecar.with_name(f"{sidecar.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(partial, "xb") as out:
            out.write(_MAP_MAGIC + _MAP_HEAD.pack(info.st_size, info.st_mtime_ns, len(listed)))
            out.write(listed.tobytes())
        os.replace(partial, sidecar)
    except OSError:
        pass
    finally:
        partial.unlink(missing_ok=True)


def _allocated(disk: _Disk) -> list[int]:
    """The clusters holding a non-zero byte: the ones the image stores. A
    cluster taken whole, cluster-aligned, from a large file is looked up in
    that file's remembered map (a re-render in the same process does not
    read the cached base again); any other is read."""
    kept: list[int] = []
    unknown: list[int] = []
    maps: dict[int, frozenset[int] | None] = {}
    for cluster in disk.data_clusters():
        start = cluster << CLUSTER_BITS
        found = disk._overlapping(start, CLUSTER_SIZE)
        if len(found) == 1 and found[0].start <= start \
                and start + CLUSTER_SIZE <= found[0].start + found[0].length:
            segment = found[0]
            offset = segment.offset + start - segment.start
            if offset % CLUSTER_SIZE == 0:
                if segment.fd not in maps:
                    maps[segment.fd] = _file_map(segment.fd, disk.paths.get(segment.fd))
                known = maps[segment.fd]
                if known is not None:
                    if offset >> CLUSTER_BITS in known:
                        kept.append(cluster)
                    continue
        unknown.append(cluster)
    kept.extend(_nonzero(disk, unknown))
    return sorted(kept)


@dataclass(frozen=True)
class _Layout:
    size: int
    l1_entries: int
    refcount_blocks: int
    l1_clusters: int
    l2_tables: tuple[int, ...]  # the L1 indexes that have an L2 table
    data: tuple[int, ...]  # guest clusters stored, in order

    @property
    def l1_offset(self) -> int:
        return (2 + self.refcount_blocks) * CLUSTER_SIZE

    @property
    def first_l2(self) -> int:
        return 2 + self.refcount_blocks + self.l1_clusters

    @property
    def first_data(self) -> int:
        return self.first_l2 + len(self.l2_tables)

    @property
    def clusters(self) -> int:
        return self.first_data + len(self.data)


def _plan(size: int, data: list[int]) -> _Layout:
    guest_clusters = -(-size // CLUSTER_SIZE)
    l1_entries = max(1, -(-guest_clusters // _ENTRIES_PER_TABLE))
    l1_clusters = -(-l1_entries * 8 // CLUSTER_SIZE)
    tables = tuple(sorted({cluster // _ENTRIES_PER_TABLE for cluster in data}))
    blocks = 1
    while True:  # the refcount blocks count themselves
        total = 2 + blocks + l1_clusters + len(tables) + len(data)
        needed = -(-total // _REFCOUNTS_PER_BLOCK)
        if needed <= blocks:
            break
        blocks = needed
    if blocks > _ENTRIES_PER_TABLE:
        raise FormatError(f"a disk of {size} bytes is too large for one refcount table")
    return _Layout(size, l1_entries, blocks, l1_clusters, tables, tuple(data))


def _metadata(layout: _Layout) -> bytes:
    """Every cluster before the data: header, refcount table and blocks, L1
    and L2 tables."""
    header = struct.pack(
        ">4sIQIIQIIQQIIQQQQII", _MAGIC, 3, 0, 0, CLUSTER_BITS, layout.size, 0,
        layout.l1_entries, layout.l1_offset, CLUSTER_SIZE, 1, 0, 0,
        0, 0, 0, _REFCOUNT_ORDER, _HEADER_LENGTH)
    out = bytearray(layout.first_data * CLUSTER_SIZE)
    out[:len(header)] = header
    # header extensions: the end marker only (8 zero bytes, already there)
    table = CLUSTER_SIZE
    for block in range(layout.refcount_blocks):
        struct.pack_into(">Q", out, table + 8 * block, (2 + block) * CLUSTER_SIZE)
    counts = struct.pack(">H", 1) * layout.clusters
    out[2 * CLUSTER_SIZE:2 * CLUSTER_SIZE + len(counts)] = counts
    slot = {index: layout.first_l2 + k for k, index in enumerate(layout.l2_tables)}
    for index, cluster in slot.items():
        struct.pack_into(">Q", out, layout.l1_offset + 8 * index,
                         (cluster * CLUSTER_SIZE) | _COPIED)
    for host, guest in enumerate(layout.data, layout.first_data):
        table_cluster = slot[guest // _ENTRIES_PER_TABLE]
        struct.pack_into(">Q", out, table_cluster * CLUSTER_SIZE
                         + 8 * (guest % _ENTRIES_PER_TABLE), (host * CLUSTER_SIZE) | _COPIED)
    return bytes(out)


#: Bytes written after which the writer asks the kernel to start writing
#: them back, so that the store's fsync finds the file on disk already
#: (0.02 s instead of 0.2 s for 300 MB here) while the cost, paid on the
#: writer thread, hides behind the hashing.
WRITEBACK_BYTES = 16 * 1024 * 1024


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing back ``[offset, offset + length)`` of ``fd`` without
    waiting for it: on Linux, ``POSIX_FADV_DONTNEED`` submits the dirty pages
    for writeback (and drops the clean ones: nothing reads the file again
    here). Only a hint: durability is the store's fsync."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        with contextlib.suppress(OSError):  # a file system that does not take advice
            advise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def write_qcow2(pieces: Sequence[Piece], target: Path, *,
                progress: PartProgress | None = None) -> str:
    """Write the disk made of ``pieces`` (concatenated in order) as a qcow2
    file.

    :param pieces: the disk; a raw disk file is one piece of its whole length.
    :param target: the file to write (must not exist).
    :param progress: called as ``progress(done, total)`` with the bytes of
        the file hashed and queued for writing so far, and its size.
    :returns: the sha256 of the file as written, computed while writing it.
    :raises FormatError: a piece cannot be read, or the target written.
    """
    try:
        disk = _Disk(pieces)
    except OSError as exc:
        raise FormatError(f"cannot read the disk: {exc.strerror or exc}") from None
    try:
        return _write(disk, target, progress)
    except OSError as exc:
        target.unlink(missing_ok=True)
        raise FormatError(f"cannot write {target.name}: {exc.strerror or exc}") from None
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    finally:
        disk.close()


def _runs(data: Sequence[int]) -> Iterator[tuple[int, int]]:
    """``(first, count)``: the runs of consecutive guest clusters in
    ``data``, at most :data:`RUN_CLUSTERS` long."""
    index = 0
    while index < len(data):
        first = data[index]
        count = 1
        while (index + count < len(data) and count < RUN_CLUSTERS
               and data[index + count] == first + count):
            count += 1
        yield first, count
        index += count


#: A buffer and how much of it holds the data for ``offset`` of the file.
_Item = tuple[memoryview, int, int]
_END = None


def _write(disk: _Disk, target: Path, progress: PartProgress | None = None) -> str:
    """Read, hash and write on three threads: the reads and the writes
    release the GIL, and so does hashing large buffers, so the hash (the
    slowest step) has a core of its own."""
    layout = _plan(disk.size, _allocated(disk))
    digest = hashlib.sha256()
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    free: queue.Queue[memoryview] = queue.Queue()
    read: queue.Queue[_Item | BaseException | None] = queue.Queue()
    written: queue.Queue[_Item | None] = queue.Queue()
    stop = threading.Event()
    errors: list[BaseException] = []

    def reading() -> None:
        offset = layout.first_data * CLUSTER_SIZE
        try:
            for first, count in _runs(layout.data):
                buffer = free.get()
                if stop.is_set():
                    break
                length = count * CLUSTER_SIZE
                disk.read(buffer[:length], first << CLUSTER_BITS)
                read.put((buffer, length, offset))
                offset += length
        except BaseException as exc:  # noqa: BLE001 - raised by the hashing thread
            read.put(exc)
        read.put(_END)

    def writing() -> None:
        flushed = written_to = 0
        while (item := written.get()) is not _END:
            buffer, length, offset = item
            try:
                if not errors:
                    _pwrite_all(fd, buffer[:length], offset)
                    written_to = offset + length
                    if written_to - flushed >= WRITEBACK_BYTES:
                        _start_writeback(fd, flushed, written_to - flushed)
                        flushed = written_to
            except BaseException as exc:  # noqa: BLE001 - raised by the hashing thread
                errors.append(exc)
                stop.set()
            free.put(buffer)
        if not errors:  # the rest, to the end (the metadata went with the first range)
            _start_writeback(fd, flushed, 0)

    threads = [threading.Thread(target=reading, name="cloudlets-qcow2-read", daemon=True),
               threading.Thread(target=writing, name="cloudlets-qcow2-write", daemon=True)]
    try:
        metadata = _metadata(layout)
        digest.update(metadata)
        _pwrite_all(fd, memoryview(metadata), 0)
        for _ in range(BUFFERS):
            free.put(memoryview(bytearray(CLUSTER_SIZE * RUN_CLUSTERS)))
        for thread in threads:
            thread.start()
        while (item := read.get()) is not _END:
            if isinstance(item, BaseException):
                errors.append(item)
                stop.set()
                continue
            if not stop.is_set():
                digest.update(item[0][:item[1]])
                if progress is not None:
                    progress(item[2] + item[1], layout.clusters * CLUSTER_SIZE)
            written.put(item)
    finally:
        stop.set()
        written.put(_END)
        for _ in range(BUFFERS):  # wakes a reader waiting for a buffer
            free.put(memoryview(bytearray(0)))
        for thread in threads:
            if thread.is_alive() or thread.ident is not None:
                thread.join()
        os.close(fd)
    if errors:
        raise errors[0]
    if os.stat(target).st_size != layout.clusters * CLUSTER_SIZE:
        raise FormatError(f"{target.name} is not {layout.clusters * CLUSTER_SIZE} bytes long")
    return digest.hexdigest()
