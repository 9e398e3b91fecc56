"""A qcow2 (version 3) writer: a raw disk, or a disk made of pieces, to a
self-contained qcow2 file in one sequential pass that hashes what it writes.

``qemu-img convert`` writes the same kind of image, but its output must then
be read back to be hashed for the store (300 MB for a 1 GiB root filesystem
of shared libraries), and it allocates as it goes, so nothing about its file
is known before it exits. Here the layout is decided first, by content: the
disk is read once to find its non-zero clusters (holes are skipped without
reading), then the file is written front to back while every byte is hashed
on its way out, a writer thread overlapping ``pwrite`` with the reads and
the hashing (both release the GIL). The same disk content always gives the
same bytes, whatever the pieces or the file system's holes.

The plain layout, all clusters of :data:`CLUSTER_SIZE` bytes::

    0                      header (version 3, refcount order 4: 16-bit counts)
    1                      refcount table
    2 .. 2+R               refcount blocks (R of them; every cluster has count 1)
    ..                     L1 table
    ..                     L2 tables, only those that map some data
    ..                     data clusters, in guest order

A disk that a render made by patching a cached base filesystem (its
``unpatched`` pieces name that base) gets the prefixed layout instead
(:class:`_Prefixed`): the header and the non-zero clusters of the unpatched
base come first, so that they are the same bytes for every render over that
base; then the L1 and refcount tables, the clusters this render changed or
took from elsewhere (partition table, boot code, ESP), the L2 tables and the
refcount blocks. The stale copies of changed clusters in the prefix have
count 0 and no reference. The sha256 state after the prefix is kept in the
process and beside the base (``<key>.qcow2-prefix``, OpenSSL's
``SHA256_CTX``: :mod:`~cloudlets.drivers.formats.hashstate`), so that a
re-render copies the prefix with ``copy_file_range`` (in the kernel, never
through user space) and hashes only the rest. A cold render over the same
base writes the same bytes: it only hashes the prefix too.

No backing file, no compression, no extensions: ``qemu-img check`` finds it
clean, and QEMU boots it.
"""

from __future__ import annotations

import array
import bisect
import collections
import contextlib
import errno
import hashlib
import itertools
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

from cloudlets.drivers.formats import hashstate
from cloudlets.errors import FormatError
from cloudlets.progress import PartProgress
from cloudlets.sparse import Piece, data_ranges

__all__ = ["CLUSTER_SIZE", "PrefixCopy", "write_qcow2"]

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
_L2_BITS = CLUSTER_BITS - 3  # log2 of the entries per table
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
                 segments: Sequence[_Segment] = (), share: _Disk | None = None) -> None:
        """Open the files of ``pieces``; or read ``segments`` of files
        opened already (closed by their owner). With ``share``, a file
        ``share`` has open is read through its descriptor, and any other is
        opened into it (``share`` closes them all)."""
        self._fds: dict[Path, int] = share._fds if share is not None else {}
        self._owner = share is None
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
        self._ranges: dict[int, list[tuple[int, int]]] = \
            share._ranges if share is not None else {}

    def close(self) -> None:
        if not self._owner:
            return
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


def _l1_shape(size: int) -> tuple[int, int, int]:
    """A disk of ``size`` bytes: its guest clusters, L1 entries and L1 clusters."""
    guest_clusters = -(-size // CLUSTER_SIZE)
    l1_entries = max(1, -(-guest_clusters // _ENTRIES_PER_TABLE))
    return guest_clusters, l1_entries, -(-l1_entries * 8 // CLUSTER_SIZE)


def _plan(size: int, data: list[int]) -> _Layout:
    _, l1_entries, l1_clusters = _l1_shape(size)
    tables = tuple(sorted({cluster // _ENTRIES_PER_TABLE for cluster in data}))
    blocks = _blocks_for(2 + l1_clusters + len(tables) + len(data))
    if blocks > _ENTRIES_PER_TABLE:
        raise FormatError(f"a disk of {size} bytes is too large for one refcount table")
    return _Layout(size, l1_entries, blocks, l1_clusters, tables, tuple(data))


def _header(size: int, l1_entries: int, l1_offset: int, table_offset: int,
            table_clusters: int) -> bytes:
    """The header cluster (no extensions: the end marker is its zeros)."""
    header = struct.pack(
        ">4sIQIIQIIQQIIQQQQII", _MAGIC, 3, 0, 0, CLUSTER_BITS, size, 0,
        l1_entries, l1_offset, table_offset, table_clusters, 0, 0,
        0, 0, 0, _REFCOUNT_ORDER, _HEADER_LENGTH)
    return header + bytes(CLUSTER_SIZE - len(header))


def _metadata(layout: _Layout) -> bytes:
    """Every cluster before the data: header, refcount table and blocks, L1
    and L2 tables."""
    out = bytearray(layout.first_data * CLUSTER_SIZE)
    out[:CLUSTER_SIZE] = _header(layout.size, layout.l1_entries, layout.l1_offset,
                                 CLUSTER_SIZE, 1)
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


# -- the prefixed layout: a re-render over a cached base ------------------------------

#: Bumped whenever the prefixed layout's bytes would change for the same
#: disk: part of every remembered or saved prefix state's key.
PREFIX_LAYOUT = 1
#: How many prefix hash states a process remembers (least recently used go).
PREFIX_MEMO = 8
#: The suffix of the prefix's hash state kept beside a cached base.
PREFIX_SIDECAR = "qcow2-prefix"
_PREFIX_MAGIC = b"cloudlets-qcow2-prefix-1\n"
_PREFIX_BODY = struct.Struct(f"<32sQ{hashstate.STATE_SIZE}s")  # key, prefix bytes, state
_prefix_memo: collections.OrderedDict[tuple[object, ...], hashstate.Sha256] = \
    collections.OrderedDict()


@dataclass(frozen=True)
class _Prefixed:
    """The layout over a cached base, all clusters of :data:`CLUSTER_SIZE`
    bytes::

        0                   header
        1 .. 1+len(prefix)  the unpatched base's non-zero clusters (guest order)
        ..                  L1 table
        ..                  refcount table (sized for the largest file possible)
        ..                  tail: every other cluster stored (guest order)
        ..                  L2 tables
        ..                  refcount blocks

    The header and the prefix depend on the disk's size and the base alone,
    so they are the same bytes, and have the same hash, in every render over
    that base.
    """

    size: int
    l1_entries: int
    l1_clusters: int
    table_clusters: int
    prefix: tuple[int, ...]  # guest clusters
    stale: frozenset[int]  # prefix clusters the render changed: count 0, no reference
    tail: tuple[int, ...]  # guest clusters
    l2_tables: tuple[int, ...]
    refcount_blocks: int

    @property
    def l1_offset(self) -> int:
        return (1 + len(self.prefix)) * CLUSTER_SIZE

    @property
    def table_offset(self) -> int:
        return self.l1_offset + self.l1_clusters * CLUSTER_SIZE

    @property
    def first_tail(self) -> int:
        return self.table_offset // CLUSTER_SIZE + self.table_clusters

    @property
    def first_l2(self) -> int:
        return self.first_tail + len(self.tail)

    @property
    def first_block(self) -> int:
        return self.first_l2 + len(self.l2_tables)

    @property
    def clusters(self) -> int:
        return self.first_block + self.refcount_blocks

    def header(self) -> bytes:
        return _header(self.size, self.l1_entries, self.l1_offset, self.table_offset,
                       self.table_clusters)


def _blocks_for(clusters_without_blocks: int) -> int:
    """Refcount blocks for a file of this many clusters plus the blocks."""
    blocks = 1
    while -(-(clusters_without_blocks + blocks) // _REFCOUNTS_PER_BLOCK) > blocks:
        blocks = -(-(clusters_without_blocks + blocks) // _REFCOUNTS_PER_BLOCK)
    return blocks


def _plan_prefixed(size: int, prefix: list[int], stale: set[int],
                   tail: list[int]) -> _Prefixed:
    guest_clusters, l1_entries, l1_clusters = _l1_shape(size)
    # the refcount table covers the largest file the disk could give: every
    # guest cluster in the tail, every L2 table present
    table_clusters = 1
    while True:
        bound = 1 + len(prefix) + l1_clusters + table_clusters + guest_clusters + l1_entries
        if _blocks_for(bound) <= table_clusters * _ENTRIES_PER_TABLE:
            break
        table_clusters += 1
    mapped = [cluster for cluster in prefix if cluster not in stale] + tail
    tables = tuple(sorted({cluster // _ENTRIES_PER_TABLE for cluster in mapped}))
    layout = _Prefixed(size, l1_entries, l1_clusters, table_clusters, tuple(prefix),
                       frozenset(stale), tuple(tail), tables, 0)
    blocks = _blocks_for(layout.first_block)
    if blocks > table_clusters * _ENTRIES_PER_TABLE:  # pragma: no cover - bounded above
        raise FormatError(f"a disk of {size} bytes outgrew its refcount table")
    return _Prefixed(size, l1_entries, l1_clusters, table_clusters, tuple(prefix),
                     frozenset(stale), tuple(tail), tables, blocks)


def _prefixed_tables(layout: _Prefixed) -> tuple[bytes, bytes]:
    """The L1 and refcount tables (after the prefix), and the L2 tables and
    refcount blocks (after the tail)."""
    slot = {index: layout.first_l2 + k for k, index in enumerate(layout.l2_tables)}
    middle = bytearray((layout.l1_clusters + layout.table_clusters) * CLUSTER_SIZE)
    for index, cluster in slot.items():
        struct.pack_into(">Q", middle, 8 * index, (cluster * CLUSTER_SIZE) | _COPIED)
    table = layout.l1_clusters * CLUSTER_SIZE
    for block in range(layout.refcount_blocks):
        struct.pack_into(">Q", middle, table + 8 * block,
                         (layout.first_block + block) * CLUSTER_SIZE)
    end = bytearray((len(layout.l2_tables) + layout.refcount_blocks) * CLUSTER_SIZE)
    # each guest cluster's entry in the L2 tables (at the start of ``end``)
    entry = {index: k * CLUSTER_SIZE for k, index in enumerate(layout.l2_tables)}
    pack, stale = struct.Struct(">Q").pack_into, layout.stale
    counts = array.array("H", [1]) * layout.clusters
    mapped = []
    for host, guest in enumerate(layout.prefix, 1):
        if guest in stale:
            counts[host] = 0
        else:
            mapped.append((host, guest))
    mapped.extend(enumerate(layout.tail, layout.first_tail))
    for host, guest in mapped:
        at = entry[guest >> _L2_BITS] + 8 * (guest % _ENTRIES_PER_TABLE)
        pack(end, at, (host << CLUSTER_BITS) | _COPIED)
    if sys.byteorder == "little":
        counts.byteswap()  # refcounts are big-endian
    start = len(layout.l2_tables) * CLUSTER_SIZE
    end[start:start + len(counts) * 2] = counts.tobytes()
    return bytes(middle), bytes(end)


def _base_files(unpatched: _Disk) -> dict[int, Path]:
    """The cached base filesystems among the unpatched disk's files, by
    descriptor."""
    return {fd: path for fd, path in unpatched.paths.items() if _map_sidecar(path) is not None}


def _eligible(unpatched: _Disk, bases: dict[int, Path]) -> dict[int, _Segment]:
    """The guest clusters the prefix may hold: wholly inside a piece of a
    cached base, at a cluster boundary of that file; with their segment."""
    found: dict[int, _Segment] = {}
    for segment in unpatched.segments:
        if segment.fd not in bases:
            continue
        first = -(-segment.start // CLUSTER_SIZE)
        end = (segment.start + segment.length) // CLUSTER_SIZE
        if first >= end or (segment.offset + (first << CLUSTER_BITS) - segment.start) \
                % CLUSTER_SIZE:
            continue
        for cluster in range(first, end):
            found[cluster] = segment
    return found


def _changed(disk: _Disk, unpatched: _Disk) -> set[int]:
    """The guest clusters holding a byte that ``disk`` takes from elsewhere
    than ``unpatched`` (both read through the same descriptors)."""
    points = sorted({s.start for s in disk.segments} | {s.start for s in unpatched.segments})
    changed: set[int] = set()
    for low, high in itertools.pairwise([*points, disk.size]):
        if low >= high or low >= disk.size:
            continue
        mine, theirs = disk._overlapping(low, 1), unpatched._overlapping(low, 1)
        if mine and theirs and mine[0].fd == theirs[0].fd \
                and mine[0].offset - mine[0].start == theirs[0].offset - theirs[0].start:
            continue
        changed.update(range(low >> CLUSTER_BITS, ((high - 1) >> CLUSTER_BITS) + 1))
    return changed


def _settled(info: os.stat_result) -> bool:
    return time.time_ns() - max(info.st_mtime_ns, info.st_ctime_ns) >= MEMO_SETTLED_NS


def _prefix_nonzero(unpatched: _Disk, eligible: dict[int, _Segment]) -> list[int]:
    """The eligible clusters holding a non-zero byte (from the base's
    remembered map where there is one)."""
    kept: list[int] = []
    unknown: list[int] = []
    maps: dict[int, frozenset[int] | None] = {}
    for cluster in unpatched.data_clusters():
        segment = eligible.get(cluster)
        if segment is None:
            continue
        if segment.fd not in maps:
            maps[segment.fd] = _file_map(segment.fd, unpatched.paths.get(segment.fd))
        known = maps[segment.fd]
        if known is None:
            unknown.append(cluster)
        elif (segment.offset + (cluster << CLUSTER_BITS) - segment.start) >> CLUSTER_BITS \
                in known:
            kept.append(cluster)
    kept.extend(_nonzero(unpatched, unknown))
    return sorted(kept)


def _prefix_keys(layout: _Prefixed, eligible: dict[int, _Segment],
                 bases: dict[int, Path]) -> tuple[tuple[object, ...], bytes] | None:
    """What the prefix's bytes are made of: the key of its state in this
    process (the base files' identities) and on disk (their sizes and
    mtimes, as the cluster map's sidecar checks); ``None`` while a base
    could still change within its clock tick."""
    order = sorted(bases)
    index = {fd: k for k, fd in enumerate(order)}
    sources = array.array("Q")
    for cluster in layout.prefix:
        segment = eligible[cluster]
        sources.append(index[segment.fd])
        sources.append(segment.offset + (cluster << CLUSTER_BITS) - segment.start)
    if sys.byteorder != "little":  # pragma: no cover - big-endian hosts
        sources.byteswap()
    made_of = hashlib.sha256(struct.pack("<Q", PREFIX_LAYOUT) + layout.header()
                             + sources.tobytes())
    identities: list[tuple[int, ...]] = []
    for fd in order:
        info = os.fstat(fd)
        if not _settled(info):
            return None
        identities.append((info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns,
                           info.st_ctime_ns))
        made_of.update(struct.pack("<QQ", info.st_size, info.st_mtime_ns))
    return (made_of.digest(), *identities), made_of.digest()


def _load_prefix(sidecar: Path, key: bytes, length: int) -> hashstate.Sha256 | None:
    """The prefix's hash state saved in ``sidecar``, if it is this prefix's
    and intact; else ``None``."""
    size = len(_PREFIX_MAGIC) + _PREFIX_BODY.size + 32
    try:
        with open(sidecar, "rb") as handle:
            data = handle.read(size + 1)
    except OSError:
        return None
    if len(data) != size or not data.startswith(_PREFIX_MAGIC) \
            or hashlib.sha256(data[:-32]).digest() != data[-32:]:
        return None
    saved_key, saved_length, state = _PREFIX_BODY.unpack_from(data, len(_PREFIX_MAGIC))
    if saved_key != key or saved_length != length:
        return None
    return hashstate.Sha256.restore(state, length)


def _save_prefix(sidecar: Path, key: bytes, length: int, state: bytes) -> None:
    """Keep the prefix's hash state in ``sidecar`` (atomically; a cache
    directory that cannot take it goes without)."""
    data = _PREFIX_MAGIC + _PREFIX_BODY.pack(key, length, state)
    data += hashlib.sha256(data).digest()
    partial = sidecar.with_name(f"{sidecar.name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(partial, "xb") as out:
            out.write(data)
        os.replace(partial, sidecar)
    except OSError:
        pass
    finally:
        partial.unlink(missing_ok=True)


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


def _pread_exact(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset``."""
    while view:
        done = os.preadv(fd, [view], offset)
        if done <= 0:
            raise FormatError("the cached base ended early")
        view, offset = view[done:], offset + done


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def write_qcow2(pieces: Sequence[Piece], target: Path, *,
                unpatched: Sequence[Piece] | None = None,
                progress: PartProgress | None = None,
                ahead: PrefixCopy | None = None) -> str:
    """Write the disk made of ``pieces`` (concatenated in order) as a qcow2
    file.

    :param pieces: the disk; a raw disk file is one piece of its whole length.
    :param target: the file to write (must not exist).
    :param unpatched: the same disk before a render patched it (the cached
        base filesystem where ``pieces`` has the patched blocks): the file
        then starts with the header and the unpatched base's clusters, the
        same bytes for every render over that base, copied in the kernel
        and not hashed again when their hash state is known (see
        :class:`_Prefixed`). Without a cached base in it, it is ignored.
    :param progress: called as ``progress(done, total)`` with the bytes of
        the file hashed and queued for writing so far, and its size.
    :param ahead: the header and prefix copied into ``target`` ahead of
        time (:class:`PrefixCopy`): adopted if they are the ones this disk's
        layout starts with, else removed first (``target`` is then written
        as without it).
    :returns: the sha256 of the file as written, computed while writing it.
    :raises FormatError: a piece cannot be read, or the target written.
    """
    try:
        disk = _Disk(pieces)
    except OSError as exc:
        if ahead is not None:
            ahead.close()
        raise FormatError(f"cannot read the disk: {exc.strerror or exc}") from None
    try:
        before = None
        if ahead is not None and ahead.target != target:
            ahead.close()
            ahead = None
        if unpatched is not None:
            try:
                before = _Disk(unpatched, share=disk)
            except OSError as exc:
                raise FormatError(f"cannot read the disk: {exc.strerror or exc}") from None
            if before.size != disk.size:
                raise FormatError(f"the unpatched disk is {before.size} bytes, "
                                  f"the disk {disk.size}")
        bases = _base_files(before) if before is not None else {}
        if before is not None and bases:
            return _write_prefixed(disk, before, bases, target, progress, ahead)
        if ahead is not None:
            ahead.close()
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


# What the file is written as, in file order:
@dataclass(frozen=True)
class _Bytes:
    """Computed bytes (tables), hashed and written at ``offset``."""

    data: bytes
    offset: int


@dataclass(frozen=True)
class _Read:
    """``count`` guest clusters of ``disk`` from ``first`` on (at most
    :data:`RUN_CLUSTERS`), read, hashed and written at ``offset``."""

    disk: _Disk
    first: int
    count: int
    offset: int


@dataclass(frozen=True)
class _Copy:
    """``length`` bytes of ``fd`` from ``source`` on, copied to ``offset``
    in the kernel: not hashed (the hash state covers them already)."""

    fd: int
    source: int
    length: int
    offset: int


@dataclass(frozen=True)
class _HashedCopy:
    """A :class:`_Copy` of at most one buffer whose bytes are not hashed
    yet: read into a buffer for the hash, but written by copying in the
    kernel (the bytes cross into user space once, not twice)."""

    copy: _Copy


class _Mark:
    """The hash's state here is the prefix's."""


_MARK = _Mark()
_Extent = _Bytes | _Read | _Copy | _HashedCopy | _Mark
#: A buffer, how much of it holds the data for ``offset`` of the file,
#: whether it goes back to the free buffers, and the copy that writes those
#: bytes in the kernel (else the buffer is written).
_Item = tuple[memoryview, int, int, bool, _Copy | None]
_END = None


def _write(disk: _Disk, target: Path, progress: PartProgress | None = None) -> str:
    """The plain layout (:class:`_Layout`)."""
    layout = _plan(disk.size, _allocated(disk))
    extents: list[_Extent] = [_Bytes(_metadata(layout), 0)]
    offset = layout.first_data * CLUSTER_SIZE
    for first, count in _runs(layout.data):
        extents.append(_Read(disk, first, count, offset))
        offset += count * CLUSTER_SIZE
    digest, _ = _pipeline(target, extents, hashstate.Sha256(),
                          layout.clusters * CLUSTER_SIZE, progress)
    return digest.hexdigest()


def _write_prefixed(disk: _Disk, unpatched: _Disk, bases: dict[int, Path], target: Path,
                    progress: PartProgress | None, ahead: PrefixCopy | None = None) -> str:
    """The prefixed layout (:class:`_Prefixed`): the prefix copied from the
    base under a known hash state (copied ahead already, or remembered in
    this process, or saved beside the base), else read and hashed as any
    cluster."""
    eligible = _eligible(unpatched, bases)
    prefix = _prefix_nonzero(unpatched, eligible)
    changed = _changed(disk, unpatched)
    candidates = [cluster for cluster in disk.data_clusters()
                  if cluster not in eligible or cluster in changed]
    tail = _nonzero(disk, candidates)
    layout = _plan_prefixed(disk.size, prefix, changed.intersection(prefix), tail)
    middle, end = _prefixed_tables(layout)
    keys = _prefix_keys(layout, eligible, bases)
    prefix_bytes = layout.l1_offset
    sidecar = _prefix_sidecar(bases[min(bases)])  # any base: the key covers all
    known = ahead.adopt(keys, layout.prefix) if ahead is not None else None
    adopted = known is not None
    if known is None:
        known = _known_prefix(keys, sidecar, prefix_bytes)
    extents: list[_Extent] = []
    if adopted:
        assert ahead is not None and known is not None
        digest = known
    elif known is not None:
        extents.extend(_prefix_copies(layout, eligible))
        digest = known
    else:
        digest = hashstate.Sha256()
        extents.append(_Bytes(layout.header(), 0))
        extents.extend(_HashedCopy(copy) for copy in
                       _prefix_copies(layout, eligible, CLUSTER_SIZE * RUN_CLUSTERS))
        extents.append(_MARK)
    extents.append(_Bytes(middle, layout.l1_offset))
    offset = layout.first_tail * CLUSTER_SIZE
    for first, count in _runs(layout.tail):
        extents.append(_Read(disk, first, count, offset))
        offset += count * CLUSTER_SIZE
    extents.append(_Bytes(end, layout.first_l2 * CLUSTER_SIZE))
    if known is not None and not adopted:  # the header is in the hash state already
        _pwrite_all_new(target, layout.header())
    digest, marked = _pipeline(target, extents, digest, layout.clusters * CLUSTER_SIZE,
                               progress, created=known is not None,
                               submitted=ahead.flushed if adopted and ahead is not None else 0)
    if marked is not None and keys is not None:
        with _memo_lock:
            _prefix_memo[keys[0]] = marked
            while len(_prefix_memo) > PREFIX_MEMO:
                _prefix_memo.popitem(last=False)
        state = marked.state()
        if sidecar is not None and state is not None:
            _save_prefix(sidecar, keys[1], prefix_bytes, state)
    return digest.hexdigest()


def _known_prefix(keys: tuple[tuple[object, ...], bytes] | None, sidecar: Path | None,
                  prefix_bytes: int) -> hashstate.Sha256 | None:
    """The hash state after the prefix of ``keys``, remembered in this
    process or saved in ``sidecar``; ``None`` when neither knows it."""
    if keys is None:
        return None
    with _memo_lock:
        known = _prefix_memo.get(keys[0])
        if known is not None:
            _prefix_memo.move_to_end(keys[0])
            return known.copy()
    if sidecar is None:
        return None
    return _load_prefix(sidecar, keys[1], prefix_bytes)


def _prefix_sidecar(path: Path) -> Path | None:
    from cloudlets.disk.assemble import base_sidecar

    return base_sidecar(path, PREFIX_SIDECAR)


def _pwrite_all_new(target: Path, header: bytes) -> None:
    """Create ``target`` with ``header`` at its start."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _pwrite_all(fd, memoryview(header), 0)
    finally:
        os.close(fd)


def _prefix_copies(layout: _Prefixed, eligible: dict[int, _Segment],
                   limit: int = WRITEBACK_BYTES) -> Iterator[_Copy]:
    """The prefix's clusters as in-kernel copies from the base, each run of
    clusters consecutive in both files in one copy of at most ``limit``
    bytes (:data:`WRITEBACK_BYTES`, so that writeback follows; a buffer's
    size, for copies read for the hash as well)."""
    fd = start = length = offset = -1
    for host, cluster in enumerate(layout.prefix, 1):
        segment = eligible[cluster]
        source = segment.offset + (cluster << CLUSTER_BITS) - segment.start
        if segment.fd == fd and start + length == source and length < limit:
            length += CLUSTER_SIZE
            continue
        if fd >= 0:
            yield _Copy(fd, start, length, offset)
        fd, start, length, offset = segment.fd, source, CLUSTER_SIZE, host << CLUSTER_BITS
    if fd >= 0:
        yield _Copy(fd, start, length, offset)


#: How ``copy_file_range`` says it cannot copy between these two files.
_NO_KERNEL_COPY = frozenset({errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.ENOTSUP,
                             errno.EOPNOTSUPP, errno.EPERM})


class _Copier:
    """Copies into one file: ``copy_file_range`` while the kernel takes it,
    else through a buffer of user space."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.in_kernel = True
        self._buffer: memoryview | None = None

    def copy(self, copy: _Copy) -> None:
        source, offset, left = copy.source, copy.offset, copy.length
        while left:
            if self.in_kernel:
                try:
                    done = os.copy_file_range(copy.fd, self.fd, left, source, offset)
                except OSError as exc:
                    if exc.errno not in _NO_KERNEL_COPY:
                        raise
                    self.in_kernel = False  # another file system, or none: read and write
                    continue
            else:
                if self._buffer is None:
                    self._buffer = memoryview(bytearray(CLUSTER_SIZE * RUN_CLUSTERS))
                part = self._buffer[:min(left, len(self._buffer))]
                done = os.preadv(copy.fd, [part], source)
                if done > 0:
                    _pwrite_all(self.fd, part[:done], offset)
            if done <= 0:
                raise FormatError("the cached base ended early")
            source, offset, left = source + done, offset + done, left - done


class PrefixCopy:
    """A head start on a re-render's qcow2 file: its header and prefix
    (:class:`_Prefixed`), which the cached base and the disk's size alone
    decide, copied into ``target`` on a thread of their own while the render
    still renders its templates and patches the base (the copy runs in the
    kernel, on the other core, and its writeback starts early).
    :func:`write_qcow2` adopts the file when the prefix its layout starts
    with is the one copied (the same base files, header and clusters) and
    writes the rest; else the file is removed and written as without it.

    Only a prefix whose hash state is known (remembered in this process or
    saved beside the base, see :class:`_Prefixed`) is copied ahead: one that
    must be hashed as well is read by the writer. Use :meth:`start`; always
    :meth:`close` it, used or not.

    :ivar target: the file being written.
    :ivar flushed: the bytes of ``target`` whose writeback was started.
    """

    def __init__(self, base: Path, *, start: int, disk_size: int, target: Path) -> None:
        self.target = target
        self.flushed = 0
        self._base, self._start, self._disk_size = base, start, disk_size
        self._keys: tuple[tuple[object, ...], bytes] | None = None
        self._prefix: tuple[int, ...] = ()
        self._state: hashstate.Sha256 | None = None
        self._copied = 0
        self._declined = ""
        self._created = self._adopted = False
        self._stop = threading.Event()
        self._planned = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cloudlets-qcow2-ahead",
                                        daemon=True)

    @classmethod
    def start(cls, base: Path, *, start: int, disk_size: int, target: Path) -> PrefixCopy:
        """Begin copying, into ``target`` (which must not exist), the header
        and prefix of the qcow2 file of a ``disk_size``-byte disk holding the
        cached base filesystem ``base`` at byte ``start``."""
        ahead = cls(base, start=start, disk_size=disk_size, target=target)
        ahead._thread.start()
        return ahead

    def adopt(self, keys: tuple[tuple[object, ...], bytes] | None,
              prefix: tuple[int, ...]) -> hashstate.Sha256 | None:
        """Wait for the copy and hand ``target`` over to the writer, if it
        holds the prefix of ``keys`` (see :func:`_prefix_keys`) made of the
        guest clusters ``prefix``.

        :returns: the hash state after the prefix; ``None`` when the copy is
            not that prefix, was declined or failed (``target`` is then
            removed).
        """
        self._planned.wait()
        if self._keys is None or keys is None or self._keys != keys or self._prefix != prefix:
            if self._keys is not None:
                self._declined = "the disk's prefix is another"
            self.close()
            return None
        self._thread.join()
        if self._state is None:  # the copy failed or was stopped
            self.close()
            return None
        self._adopted = True
        return self._state.copy()

    def close(self) -> None:
        """Stop the copy and remove ``target`` unless the writer adopted it."""
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()
        if not self._adopted and self._created:
            self.target.unlink(missing_ok=True)
            self._created = False

    def details(self) -> dict[str, object]:
        """What the render records: whether the writer adopted the copy and
        how many bytes of the file it held, or why nothing was copied."""
        found: dict[str, object] = {"adopted": self._adopted,
                                    "bytes": self._copied if self._adopted else 0}
        if self._declined:
            found["declined"] = self._declined
        return found

    def _run(self) -> None:
        try:
            declined = self._copy()
            if not self._declined:  # (adopt may have said why first)
                self._declined = declined
        except (OSError, FormatError) as exc:  # the writer then writes the file itself
            detail = exc.strerror if isinstance(exc, OSError) else str(exc)
            self._declined = f"the copy failed: {detail or type(exc).__name__}"
            self._keys = self._state = None
        finally:
            self._planned.set()
        if self._state is None and self._created:
            self.target.unlink(missing_ok=True)
            self._created = False

    def _copy(self) -> str:
        """:returns: why nothing was copied, or ``""``."""
        fd = os.open(self._base, os.O_RDONLY)
        try:
            length = os.fstat(fd).st_size
            if self._start + length > self._disk_size:
                return "the base does not fit in the disk"
            if _file_map(fd, self._base) is None:
                return "the base's clusters are not known yet"
            sidecar = _prefix_sidecar(self._base)
            disk = _Disk([], segments=[_Segment(self._start, length, fd, 0)])
            bases = {fd: self._base}
            eligible = _eligible(disk, bases)
            layout = _plan_prefixed(self._disk_size, _prefix_nonzero(disk, eligible), set(), [])
            keys = _prefix_keys(layout, eligible, bases)
            state = _known_prefix(keys, sidecar, layout.l1_offset)
            if keys is None or state is None:
                return "the prefix's hash state is not known yet"
            self._keys, self._prefix = keys, layout.prefix
            self._planned.set()
            out = os.open(self.target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            self._created = True
            try:
                _pwrite_all(out, memoryview(layout.header()), 0)
                copier, flushed = _Copier(out), 0
                for copy in _prefix_copies(layout, eligible):
                    if self._stop.is_set():
                        return "stopped"
                    copier.copy(copy)
                    end = copy.offset + copy.length
                    if end - flushed >= WRITEBACK_BYTES:
                        _start_writeback(out, flushed, end - flushed)
                        flushed = end
            finally:
                os.close(out)
            if os.stat(self.target).st_size != layout.l1_offset:
                return "the cached base ended early"
            self.flushed, self._copied, self._state = flushed, layout.l1_offset, state
            return ""
        finally:
            os.close(fd)


def _pipeline(target: Path, extents: Sequence[_Extent], digest: hashstate.Sha256, total: int,
              progress: PartProgress | None, *, created: bool = False,
              submitted: int = 0) -> tuple[hashstate.Sha256, hashstate.Sha256 | None]:
    """Write ``extents`` to ``target`` (a new file, or one just ``created``,
    whose first ``submitted`` bytes are being written back already) on three
    threads: the reads and the writes release the GIL, and so does hashing
    large buffers, so the hash (the slowest step) has a core of its own.
    :returns: the hash of the file, and its state at the mark, if any."""
    flags = os.O_WRONLY if created else os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = os.open(target, flags, 0o644)
    free: queue.Queue[memoryview] = queue.Queue()
    read: queue.Queue[_Item | _Copy | _Mark | BaseException | None] = queue.Queue()
    written: queue.Queue[_Item | _Copy | None] = queue.Queue()
    stop = threading.Event()
    errors: list[BaseException] = []
    marked: list[hashstate.Sha256] = []

    def reading() -> None:
        try:
            for extent in extents:
                if isinstance(extent, _Read):
                    buffer = free.get()
                    if stop.is_set():
                        break
                    length = extent.count * CLUSTER_SIZE
                    extent.disk.read(buffer[:length], extent.first << CLUSTER_BITS)
                    read.put((buffer, length, extent.offset, True, None))
                elif isinstance(extent, _HashedCopy):
                    buffer = free.get()
                    if stop.is_set():
                        break
                    copy = extent.copy
                    _pread_exact(copy.fd, buffer[:copy.length], copy.source)
                    read.put((buffer, copy.length, copy.offset, True, copy))
                elif isinstance(extent, _Bytes):
                    read.put((memoryview(extent.data), len(extent.data), extent.offset, False,
                              None))
                else:
                    read.put(extent)
        except BaseException as exc:  # noqa: BLE001 - raised by the hashing thread
            read.put(exc)
        read.put(_END)

    def writing() -> None:
        flushed = written_to = submitted
        copier = _Copier(fd)
        while (item := written.get()) is not _END:
            try:
                if errors:
                    pass
                elif isinstance(item, _Copy):
                    copier.copy(item)
                    written_to = item.offset + item.length
                else:
                    buffer, length, offset, _, copy = item
                    if copy is not None and copier.in_kernel:
                        copier.copy(copy)
                    else:
                        _pwrite_all(fd, buffer[:length], offset)
                    written_to = offset + length
                if not errors and written_to - flushed >= WRITEBACK_BYTES:
                    _start_writeback(fd, flushed, written_to - flushed)
                    flushed = written_to
            except BaseException as exc:  # noqa: BLE001 - raised by the hashing thread
                errors.append(exc)
                stop.set()
            if not isinstance(item, _Copy) and item[3]:
                free.put(item[0])
        if not errors:  # the rest, to the end (a header written before went with the first)
            _start_writeback(fd, flushed, 0)

    threads = [threading.Thread(target=reading, name="cloudlets-qcow2-read", daemon=True),
               threading.Thread(target=writing, name="cloudlets-qcow2-write", daemon=True)]
    try:
        for _ in range(BUFFERS):
            free.put(memoryview(bytearray(CLUSTER_SIZE * RUN_CLUSTERS)))
        for thread in threads:
            thread.start()
        while (item := read.get()) is not _END:
            if isinstance(item, BaseException):
                errors.append(item)
                stop.set()
                continue
            if isinstance(item, _Mark):
                marked.append(digest.copy())
                continue
            if not stop.is_set():
                if isinstance(item, _Copy):
                    done = item.offset + item.length
                else:
                    digest.update(item[0][:item[1]])
                    done = item[2] + item[1]
                if progress is not None:
                    progress(done, total)
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
    if os.stat(target).st_size != total:
        raise FormatError(f"{target.name} is not {total} bytes long")
    return digest, marked[0] if marked else None
