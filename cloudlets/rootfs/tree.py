"""The tree a tarball was read into, and the normalized tar written from it.

:class:`RootTree` holds every member's metadata in memory and the content of
regular files in one spool file; :meth:`RootTree.write_tar` writes it as a
clean PAX tar. :class:`TreeStream` writes that tar while the tarball is still
being read. :func:`image_metadata` is the image's own description.
"""

from __future__ import annotations

import collections
import functools
import gc
import json
import os
import posixpath
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Self

from cloudlets.errors import CacheError
from cloudlets.rootfs.entry import Entry, EntryType
from cloudlets.rootfs.policy import encoded, parent_of
from cloudlets.rootfs.stream import Compression
from cloudlets.rootfs.tar import BLOCK, RECORD, Writer, member_header

if TYPE_CHECKING:
    from cloudlets.progress import PartProgress

__all__ = ["METADATA_PATH", "RootTree", "TreeStream", "fill_parents", "image_metadata",
           "nearest_entry"]

#: Where :func:`image_metadata` is meant to be stored inside the image.
METADATA_PATH = "/etc/cloudlets/image.json"

_SYMLINK_HOPS = 40
#: :meth:`RootTree.write_tar` reports its progress at most once a MiB.
_PROGRESS_STEP = 1024 * 1024
#: Synthesized parent directories noted one by one; the rest are counted.
_NOTED_PARENTS = 100


class RootTree:
    """A root filesystem: entry metadata in memory, file content in a spool.

    Build one with :func:`read_tarball`; close it (or use it as a context
    manager) to free the spool.

    :ivar persistent: the manifest's persistent paths, normalized and sorted.
    :ivar dropped: paths left out because they matched a volatile pattern (or
        lay under a dropped directory), in archive order.
    :ivar notes: neutralized oddities (dropped xattrs, parents synthesized...).
    :ivar compression: how the tarball was compressed.
    :ivar stream_bytes: uncompressed bytes read from the tarball.
    :ivar kept: whether file content was kept in the spool (``False`` when
        it only went to a :class:`TreeStream`).
    :ivar content_reader: for a tree whose content was not kept, a function
        ``(path, size) -> bytes`` reading a file back from where the stream
        put it (the built filesystem), for templates.

    :param spool: the file holding the content of regular files (owned by
        the tree from now on).
    :param persistent: the :attr:`persistent` paths.
    :param entries: every entry by path, the root included (a lone root
        directory by default).
    :param dropped: the :attr:`dropped` paths.
    :param notes: the :attr:`notes`.
    :param compression: the :attr:`compression`.
    :param stream_bytes: the :attr:`stream_bytes`.
    :param kept: :attr:`kept`.
    :param content_reader: the :attr:`content_reader`.
    """

    def __init__(self, spool: IO[bytes], persistent: Iterable[str] = (), *,
                 entries: Mapping[str, Entry] | None = None, dropped: Iterable[str] = (),
                 notes: Iterable[str] = (), compression: Compression = Compression.NONE,
                 stream_bytes: int = 0, kept: bool = True,
                 content_reader: Callable[[str, int], bytes] | None = None) -> None:
        self._spool = spool
        self.kept = kept
        self.content_reader = content_reader
        self._all: dict[str, Entry] = (dict(entries) if entries is not None
                                       else {"/": Entry("/", EntryType.DIR, 0o755)})
        # A tree from an index looks its entries up there one by one
        # (:class:`_IndexLines`) until something needs them all.
        self._index: _IndexLines | None = None
        self._looked_up: dict[str, Entry | None] = {}
        self.persistent = sorted(set(persistent))
        self.dropped = list(dropped)
        self.notes = list(notes)
        self.compression = compression
        self.stream_bytes = stream_bytes
        self._links: dict[int, list[Entry]] | None = None

    @property
    def _entries(self) -> dict[str, Entry]:
        """Every entry by path (a tree from an index reads them all now)."""
        if self._index is not None:
            self._read_all()
        return self._all

    def _lookup(self, path: str) -> Entry | None:
        """The entry at ``path``; from a tree's index, only that one is read."""
        index = self._index
        if index is None:
            return self._all.get(path)
        if path in self._looked_up:
            return self._looked_up[path]
        row = index.row(path)
        entry = None if row is None else self._entry_of(row, index)
        self._looked_up[path] = entry
        return entry

    def _entry_of(self, row: Any, index: _IndexLines) -> Entry:
        try:
            path, kind, mode, uid, gid, mtime, size, linkname, major, minor, origin = row
            entry = Entry(path, _KINDS[kind], mode, uid, gid, mtime, size, linkname,
                          major, minor)
            if origin is not None:
                primary = self._lookup(origin)
                if primary is None or primary._origin is not None:
                    raise ValueError(f"{path}: no link target {origin}")
                entry._origin = primary
        except (ValueError, KeyError, TypeError) as exc:
            raise index.damaged(exc) from None
        return entry

    def _read_all(self) -> None:
        # Building ~20,000 entries allocates some 100,000 objects, none of
        # them garbage: the collector's passes over them would cost 6-20 ms.
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._read_rows()
        finally:
            if collecting:
                gc.enable()

    def _read_rows(self) -> None:
        index = self._index
        assert index is not None
        known = self._looked_up
        entries: dict[str, Entry] = {}
        links: list[tuple[str, str]] = []
        kinds = _KINDS  # ~20,000 entries: no EntryType() calls
        try:
            for (path, kind, mode, uid, gid, mtime, size, linkname, major, minor,
                 origin) in index.rows():
                found = known.get(path)
                if found is not None:  # looked up already: the same object
                    entries[path] = found
                    continue
                entries[path] = Entry(path, kinds[kind], mode, uid, gid, mtime, size,
                                      linkname, major, minor)
                if origin is not None:
                    links.append((path, origin))
            for path, origin in links:
                entries[path]._origin = entries[origin]
        except (ValueError, KeyError, TypeError) as exc:
            raise index.damaged(exc) from None
        self._all = entries
        self._index = None
        self._looked_up = {}

    # -- mapping ---------------------------------------------------------

    def __contains__(self, path: object) -> bool:
        if isinstance(path, str) and self._index is not None:
            return self._lookup(path) is not None
        return path in self._entries

    def __getitem__(self, path: str) -> Entry:
        entry = self._lookup(path)
        if entry is None:
            raise KeyError(path)
        return entry

    def __len__(self) -> int:
        return self._index.count if self._index is not None else len(self._all)

    def __iter__(self) -> Iterator[Entry]:
        """Entries in output order: sorted by path bytes, parents first."""
        for path in self.paths():
            yield self._entries[path]

    def get(self, path: str) -> Entry | None:
        """:returns: the entry at an absolute path, or ``None``."""
        return self._lookup(path)

    def paths(self) -> list[str]:
        """:returns: every path, sorted by bytes (parents before children)."""
        return sorted(self._entries, key=encoded)

    @property
    def total_size(self) -> int:
        """Bytes of regular file content (each hardlinked inode once)."""
        seen: set[int] = set()
        total = 0
        for entry in self._entries.values():
            inode = entry.inode
            if inode.type is EntryType.FILE and id(inode) not in seen:
                seen.add(id(inode))
                total += inode.size
        return total

    # -- lookups inside the image ----------------------------------------

    def resolve(self, path: str) -> Entry | None:
        """Find what an absolute path names inside the image, following
        symlinks the way the image's kernel would (absolute targets from the
        image root, ``..`` stopping at the root). The host is never consulted.

        :param path: an absolute path inside the image.
        :returns: the entry, or ``None`` when it does not exist or a symlink
            loop is found.
        """
        pending = [p for p in reversed(path.split("/")) if p]  # a stack: next part last
        current = "/"
        hops = 0
        while pending:
            part = pending.pop()
            if part == ".":
                continue
            if part == "..":
                current = parent_of(current) or "/"
                continue
            candidate = posixpath.join(current, part)
            entry = self._lookup(candidate)
            if entry is None:
                return None
            if entry.inode.type is EntryType.SYMLINK:
                hops += 1
                if hops > _SYMLINK_HOPS:
                    return None
                target = entry.inode.linkname
                pending.extend(p for p in reversed(target.split("/")) if p)
                if target.startswith("/"):
                    current = "/"
                continue
            if pending and entry.type is not EntryType.DIR:
                return None
            current = candidate
        return self._lookup(current)

    def read_bytes(self, path: str, limit: int | None = None) -> bytes:
        """Read a regular file's content.

        :param path: absolute path of a regular file (or a hardlink to one).
        :param limit: refuse files larger than this many bytes.
        :returns: the content, rendered replacement included.
        :raises KeyError: when there is no such entry.
        :raises ValueError: when it is not a regular file or is too large.
        """
        entry = self[path]
        inode = entry.inode
        if inode.type is not EntryType.FILE:
            raise ValueError(f"{path} is a {entry.type.value}, not a regular file")
        if limit is not None and inode.size > limit:
            raise ValueError(f"{path} is {inode.size} bytes, more than {limit}")
        if inode._data is not None:
            return inode._data
        if inode.size == 0:
            return b""
        if inode._offset < 0:
            if self.content_reader is None:
                raise ValueError(f"{path}: the content was streamed, not kept")
            return self.content_reader(inode.path, inode.size)
        self._spool.flush()
        return os.pread(self._spool.fileno(), inode.size, inode._offset)

    # -- changes -----------------------------------------------------------

    def set_content(self, path: str, data: bytes) -> None:
        """Replace a regular file's content, keeping its mode, owner and
        hardlinks (a rendered template).

        :raises KeyError: when there is no such entry.
        :raises ValueError: when it is not a regular file.
        """
        entry = self._entries[path]
        inode = entry.inode
        if inode.type is not EntryType.FILE:
            raise ValueError(f"{path} is a {entry.type.value}, not a regular file")
        inode._data = bytes(data)
        inode.size = len(data)
        if self._links is None:  # built once: a render sets many files
            self._links = {}
            for other in self._entries.values():
                if other._origin is not None:
                    self._links.setdefault(id(other._origin), []).append(other)
        for other in self._links.get(id(inode), ()):
            other.size = len(data)

    def add_file(self, path: str, data: bytes, *, mode: int = 0o644, uid: int = 0,
                 gid: int = 0, mtime: int | None = None) -> Entry:
        """Add (or replace) a regular file, e.g. the image metadata. Missing
        parent directories are created ``0755 root:root``.

        :param path: absolute path inside the image.
        :raises ValueError: when the path is not a clean absolute path or a
            directory or symlink is in the way.
        """
        clean = posixpath.normpath(path)
        if not path.startswith("/") or clean != path or path == "/":
            raise ValueError(f"{path!r} is not a clean absolute path")
        found = nearest_entry(self._entries, path)
        if found is not None and found.type is not EntryType.DIR:
            raise ValueError(f"cannot add {path}: {found.path} is a {found.type.value}")
        existing = self._entries.get(path)
        if existing is not None and existing.type is EntryType.DIR:
            raise ValueError(f"cannot add {path}: it is a directory")
        stamp = mtime if mtime is not None else self._entries["/"].mtime
        entry = Entry(path, EntryType.FILE, mode & 0o7777, uid, gid, stamp, len(data),
                      _data=bytes(data))
        self._entries[path] = entry
        fill_parents(self._entries, self.notes, [path])
        return entry

    # -- output ------------------------------------------------------------

    def write_tar(self, dest: str | os.PathLike[str], *,
                  replacements: Mapping[str, bytes] | None = None,
                  source_date_epoch: int | None = None,
                  progress: PartProgress | None = None) -> Path:
        """Write the tree as a clean, normalized, uncompressed PAX tar.

        Members are named ``./path``, sorted by path bytes (so parents come
        before children and the output is reproducible), with numeric owners
        and no user or group names, extended attributes as ``SCHILY.xattr.*``.
        The first path of each hardlinked inode carries the content; the
        others link to it.

        :param dest: file to write (created or truncated).
        :param replacements: absolute path to new content for regular files
            (rendered templates); mode and owner are kept.
        :param source_date_epoch: clamp every mtime to this time.
        :param progress: called as ``progress(done, total)`` after each file
            whose content took the bytes written past another MiB, and at
            the end: ``done`` of the :attr:`total_size` bytes of content.
        :returns: ``dest`` as a :class:`~pathlib.Path`.
        :raises KeyError: a replacement names a path not in the tree.
        :raises ValueError: a replacement names something not a regular file.
        """
        if not self.kept:
            raise ValueError("the tree's content was streamed, not kept: read the tarball "
                             "again to write it")
        for path, data in (replacements or {}).items():
            self.set_content(path, data)
        dest = Path(dest)
        self._spool.flush()
        spool_fd = self._spool.fileno()
        primaries: dict[int, str] = {}
        total = self.total_size if progress is not None else 0
        written = reported = 0
        with open(dest, "wb", buffering=0) as out:
            writer = Writer(out.fileno())
            for path in self.paths():
                inode = self._entries[path].inode
                key = id(inode)
                primary = primaries.get(key)
                if primary is not None and inode.type is not EntryType.DIR:
                    writer.add(member_header(path, inode, source_date_epoch, link_to=primary))
                    continue
                primaries[key] = path
                writer.add(member_header(path, inode, source_date_epoch))
                size = inode.size if inode.type is EntryType.FILE else 0
                if size:
                    if inode._data is not None:
                        writer.add(inode._data)
                    else:
                        writer.copy(spool_fd, inode._offset, size)
                    writer.pad(-size % BLOCK)
                    written += size
                    if progress is not None and written - reported >= _PROGRESS_STEP:
                        reported = written
                        progress(written, total)
            writer.pad(2 * BLOCK)
            writer.pad(-writer.position % RECORD)
            writer.flush()
        if progress is not None:
            progress(total, total)
        return dest

    # -- the index: the tree without its content ---------------------------

    #: Bumped when the index's layout changes.
    INDEX_FORMAT = 2

    def write_index(self, dest: str | os.PathLike[str]) -> None:
        """Save what the tree knows without its content: every entry's path,
        type, mode, owner, mtime, size, link and device numbers (not xattrs),
        the persistent and dropped paths, the notes. :meth:`from_index` reads
        it back, with content read through :attr:`content_reader` (a re-render
        reads templates from the cached base filesystem, not the tarball).

        The file is a line of JSON (the format, the number of entries and the
        tree's lists), then one JSON array a line for each entry, sorted by
        path bytes: a re-render looks up its few templates by bisection and
        parses nothing else.

        :param dest: the file to write (replaced atomically).
        """
        # Written row by row: a list of every row and the whole document as
        # one string would cost some 350 bytes per entry at the peak.
        entries = self._entries
        linked = {id(entry.inode) for entry in entries.values() if entry.inode is not entry}
        origins = {id(entry): path for path, entry in entries.items() if id(entry) in linked}
        compact = json.JSONEncoder(separators=(",", ":")).encode  # ASCII: one line each
        dest = Path(dest)
        partial = dest.with_name(f"{dest.name}.partial-{os.getpid()}-{id(self):x}")
        try:
            with open(partial, "w", encoding="ascii") as out:
                out.write(compact({
                    "format": self.INDEX_FORMAT, "count": len(entries),
                    "persistent": self.persistent, "dropped": self.dropped,
                    "notes": self.notes, "compression": self.compression.value,
                    "stream_bytes": self.stream_bytes}) + "\n")
                for path in self.paths():
                    entry = entries[path]
                    origin = origins.get(id(entry.inode)) if entry.inode is not entry \
                        else None
                    out.write(compact(
                        [path, entry.type.value, entry.mode, entry.uid, entry.gid,
                         entry.mtime, entry.size, entry.linkname, entry.devmajor,
                         entry.devminor, origin]) + "\n")
            os.replace(partial, dest)
        finally:
            partial.unlink(missing_ok=True)

    @classmethod
    def from_index(cls, source: str | os.PathLike[str],
                   content_reader: Callable[[str, int], bytes],
                   workdir: str | os.PathLike[str] | None = None) -> RootTree:
        """A tree from :meth:`write_index`, its content read on demand.

        Its entries are read from the index as they are looked up (a
        re-render reads its templates' and their parents'); the first use
        that needs them all (iterating, adding a file) reads every one.

        :param source: the index file.
        :param content_reader: ``(path, size) -> bytes`` for regular files.
        :param workdir: directory for the (empty) spool file.
        :raises ValueError: the index is unreadable, of another format, or
            cut short.
        """
        try:
            index = _read_index(Path(source))
            header = index.header
            spool = tempfile.TemporaryFile(dir=workdir)  # noqa: SIM115 - owned by the tree
            tree = cls(spool, header["persistent"], dropped=header["dropped"],
                       notes=header["notes"], compression=Compression(header["compression"]),
                       stream_bytes=int(header["stream_bytes"]), kept=False,
                       content_reader=content_reader)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read the tree index {source}: {exc}") from None
        tree._index = index
        return tree

    def _spool_fd(self) -> int:
        self._spool.flush()
        return self._spool.fileno()

    def close(self) -> None:
        """Free the spool file. The tree can no longer be read or written."""
        self._spool.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RootTree {len(self._entries)} entries, {self.total_size} bytes>"


class _IndexLines:
    """The entry lines of a tree's index (:meth:`RootTree.write_index`),
    sorted by path bytes: one is found by bisecting the file's bytes, each
    probe parsing one line (some 15 for 20,000 entries).

    :param data: the whole file.
    :param source: the file's name, for errors.
    :raises ValueError: the header is not the current format's, or the
        number of lines is not the one it announces (a file cut short).
    """

    def __init__(self, data: bytes, source: Path) -> None:
        self.data = data
        self.source = source
        end = data.find(b"\n")
        header = json.loads(data[:end] if end >= 0 else data)  # an older format: one line
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
        if header.get("format") != RootTree.INDEX_FORMAT:
            raise ValueError(f"index format {header.get('format')!r}")
        self.header: dict[str, Any] = header
        self.count = header["count"]
        self.start = end + 1
        if type(self.count) is not int or data.count(b"\n", self.start) != self.count \
                or not data.endswith(b"\n"):
            raise ValueError(f"not the {self.count!r} entries it announces")

    def row(self, path: str) -> Any:
        """:returns: the parsed line of ``path``, or ``None``."""
        data, key = self.data, encoded(path)
        low, high = self.start, len(data)  # low: a line's start; high: a line's start or the end
        try:
            while low < high:
                middle = (low + high) // 2
                begin = data.rfind(b"\n", low, middle) + 1  # the start of middle's line
                if begin == 0:
                    begin = low
                end = data.index(b"\n", begin)
                row = json.loads(data[begin:end])
                found = encoded(row[0])
                if found == key:
                    return row
                if found < key:
                    low = end + 1
                else:
                    high = begin
        except (ValueError, IndexError, TypeError, AttributeError) as exc:
            raise self.damaged(exc) from None
        return None

    def rows(self) -> Iterator[Any]:
        """Every line, parsed, in path order (one at a time: a list of
        60,000 parsed rows would add some 15 MiB to a render's peak)."""
        data, loads, find = self.data, json.loads, self.data.find
        begin = self.start
        while begin < len(data):
            end = find(b"\n", begin)
            yield loads(data[begin:end])
            begin = end + 1

    def damaged(self, exc: Exception) -> CacheError:
        return CacheError(f"the cached base's tree index {self.source} is damaged ({exc}): "
                          "empty the cache of bases (cloudlets cache prune --bases-max-bytes 0) "
                          "and render again")


#: How many indexes a process keeps in memory (a service re-renders the same
#: cloudlets: reading 20,000 entries' lines is a few ms).
INDEX_MEMO_FILES = 2
_index_memo: collections.OrderedDict[tuple[int, ...], _IndexLines] = collections.OrderedDict()
_index_lock = threading.Lock()


def _read_index(path: Path) -> _IndexLines:
    """The index file's lines, remembered by the file's identity (an index
    is replaced, never changed in place)."""
    with open(path, "rb") as handle:
        info = os.fstat(handle.fileno())
        key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        with _index_lock:
            found = _index_memo.get(key)
            if found is not None:
                _index_memo.move_to_end(key)
                return found
        index = _IndexLines(handle.read(), path)
    with _index_lock:
        _index_memo[key] = index
        while len(_index_memo) > INDEX_MEMO_FILES:
            _index_memo.popitem(last=False)
    return index


#: :class:`EntryType` by value, for reading an index.
_KINDS = {kind.value: kind for kind in EntryType}


def fill_parents(entries: dict[str, Entry], notes: list[str],
                 paths: Iterable[str] | None = None) -> None:
    """Create the missing parent directories of ``entries`` (``0755
    root:root``, the root's mtime), each noted in ``notes``.

    Linear in the number of entries: from each path, only the parents not
    there yet are walked (each is created once), never every prefix.

    :param paths: only the parents of these (default: of every entry).
    """
    stamp = entries["/"].mtime
    created = 0
    for path in list(entries) if paths is None else list(paths):
        missing = []
        parent = parent_of(path)
        while parent not in entries:
            missing.append(parent)
            parent = parent_of(parent)
        for ancestor in reversed(missing):
            entries[ancestor] = Entry(ancestor, EntryType.DIR, 0o755, mtime=stamp)
            created += 1
            if created <= _NOTED_PARENTS:
                notes.append(f"{ancestor}: missing parent directory created 0755 root:root")
    if created > _NOTED_PARENTS:  # one deep name can imply hundreds: notes stay small
        notes.append(f"... and {created - _NOTED_PARENTS} more missing parent directories "
                     "created 0755 root:root")


def nearest_entry(entries: Mapping[str, Entry], path: str) -> Entry | None:
    """The entry of the nearest ancestor of ``path`` that ``entries`` holds
    (the root counts), or ``None`` when they lack even the root. Everything
    above a known entry is a directory (the reader checked it), so this one
    decides whether ``path`` can be created."""
    parent = parent_of(path)
    while parent not in entries:
        if parent == "/":
            return None
        parent = parent_of(parent)
    return entries[parent]


class TreeStream:
    """The normalized tar of a tree, written while :func:`read_tarball` reads
    it, for a consumer that reads a tar from a pipe (``mke2fs -d -``).

    Members go out in the order the tarball has them, normalized as
    :meth:`RootTree.write_tar` normalizes them; the root directory's header
    goes last, once its attributes are final (mke2fs applies it to the
    existing root). A tree that cannot be written this way is only
    detected, never written wrong: a member before its parent directory, a
    path seen twice, a member a later volatile directory takes back, a file
    changed after it was sent. :attr:`broken` then says why, nothing more is
    sent, and the consumer's output must be thrown away (write the tree with
    :meth:`RootTree.write_tar` instead).

    :param fd: where the tar goes (a pipe's write end).
    :param source_date_epoch: clamp every mtime to this time.
    """

    def __init__(self, fd: int, *, source_date_epoch: int | None = None) -> None:
        self._writer = Writer(fd)
        self._epoch = source_date_epoch
        self._sent: dict[str, Entry] = {}
        self._primaries: dict[int, str] = {}
        #: why the tree could not be streamed, or ``None``
        self.broken: str | None = None
        #: bytes sent so far
        self.position = 0
        #: the stream broke because the consumer stopped reading
        self.consumer_failed = False

    def _break(self, reason: str) -> bool:
        if self.broken is None:
            self.broken = reason
        return False

    def entry(self, entry: Entry) -> bool:
        """Send one member's header; for a regular file that returns ``True``
        its content must follow (:meth:`content`, then :meth:`end_content`)."""
        if self.broken is not None:
            return False
        path = entry.path
        if path == "/":
            return False  # sent last
        if path in self._sent:
            return self._break(f"{path} appears twice in the tarball")
        parent = parent_of(path)
        if parent != "/" and parent not in self._sent:
            return self._break(f"{path} comes before its parent directory")
        inode = entry.inode
        link_to = None
        if entry.type is EntryType.HARDLINK or inode is not entry:
            link_to = self._primaries.get(id(inode))
            if link_to is None:
                return self._break(f"{path} links to an inode that was not sent")
        else:
            self._primaries[id(inode)] = path
        self._sent[path] = entry
        self._send(self._writer.add, member_header(path, inode, self._epoch, link_to=link_to))
        return (self.broken is None and link_to is None and inode.type is EntryType.FILE
                and inode.size > 0)

    def _send(self, write: Callable[[Any], None], data: Any) -> None:
        if self.broken is None:
            try:
                write(data)
            except OSError as exc:  # the consumer exited: its own error says why
                self.consumer_failed = self.broken is None
                self._break(f"the consumer stopped reading ({exc.strerror or exc})")

    def content(self, data: bytes | memoryview) -> None:
        """Send content bytes of the file whose header went last."""
        self._send(self._writer.add, data)

    def end_content(self, size: int) -> None:
        """Pad the content of a ``size``-byte file to a whole block."""
        self._send(self._writer.pad, -size % BLOCK)

    def close(self, tree: RootTree) -> str | None:
        """Send what the tree gained after reading (the image metadata, the
        persistent directories), the root and the end of the archive.

        :param tree: the tree as it will be built.
        :returns: :attr:`broken`: ``None`` when the consumer got the whole tree.
        """
        if self.broken is None:
            for path, sent in self._sent.items():
                if tree.get(path) is not sent:
                    self._break(f"{path} changed after it was read")
                    break
        if self.broken is None:
            spool_fd = tree._spool_fd()
            for path in tree.paths():
                entry = tree[path]
                if path == "/" or path in self._sent:
                    continue
                if self.entry(entry):
                    inode = entry.inode
                    if inode._data is not None:
                        self.content(inode._data)
                    else:
                        self._send(functools.partial(self._writer.copy, spool_fd,
                                                     inode._offset), inode.size)
                    self.end_content(inode.size)
                if self.broken is not None:
                    break
        writer = self._writer
        self._send(writer.add, member_header("/", tree["/"], self._epoch))
        self._send(writer.pad, 2 * BLOCK)
        self._send(writer.pad, -writer.position % RECORD)
        self._send(lambda _: writer.flush(), None)
        self.position = writer.position
        return self.broken


def image_metadata(*, name: str, version: str | None, digest: str,
                   persistent: Sequence[str]) -> bytes:
    """The image's own description, stored at :data:`METADATA_PATH`.

    :returns: canonical JSON (sorted keys, newline-terminated): ``name``,
        ``version``, ``digest`` (the manifest's) and ``persistent`` (sorted).
    """
    document = {"name": name, "version": version, "digest": digest,
                "persistent": sorted(persistent)}
    return (json.dumps(document, sort_keys=True, indent=2) + "\n").encode("utf-8")
