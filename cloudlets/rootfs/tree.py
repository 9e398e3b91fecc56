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
        self._entries: dict[str, Entry] = (dict(entries) if entries is not None
                                           else {"/": Entry("/", EntryType.DIR, 0o755)})
        self.persistent = sorted(set(persistent))
        self.dropped = list(dropped)
        self.notes = list(notes)
        self.compression = compression
        self.stream_bytes = stream_bytes
        self._links: dict[int, list[Entry]] | None = None

    # -- mapping ---------------------------------------------------------

    def __contains__(self, path: object) -> bool:
        return path in self._entries

    def __getitem__(self, path: str) -> Entry:
        return self._entries[path]

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        """Entries in output order: sorted by path bytes, parents first."""
        for path in self.paths():
            yield self._entries[path]

    def get(self, path: str) -> Entry | None:
        """:returns: the entry at an absolute path, or ``None``."""
        return self._entries.get(path)

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
            entry = self._entries.get(candidate)
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
        return self._entries.get(current)

    def read_bytes(self, path: str, limit: int | None = None) -> bytes:
        """Read a regular file's content.

        :param path: absolute path of a regular file (or a hardlink to one).
        :param limit: refuse files larger than this many bytes.
        :returns: the content, rendered replacement included.
        :raises KeyError: when there is no such entry.
        :raises ValueError: when it is not a regular file or is too large.
        """
        entry = self._entries[path]
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
    INDEX_FORMAT = 1

    def write_index(self, dest: str | os.PathLike[str]) -> None:
        """Save what the tree knows without its content: every entry's path,
        type, mode, owner, mtime, size, link and device numbers (not xattrs),
        the persistent and dropped paths, the notes. :meth:`from_index` reads
        it back, with content read through :attr:`content_reader` (a re-render
        reads templates from the cached base filesystem, not the tarball).

        :param dest: the file to write (replaced atomically).
        """
        # Written row by row: a list of every row and the whole document as
        # one string would cost some 350 bytes per entry at the peak.
        linked = {id(entry.inode) for entry in self._entries.values()
                  if entry.inode is not entry}
        origins = {id(entry): path for path, entry in self._entries.items()
                   if id(entry) in linked}
        compact = json.JSONEncoder(separators=(",", ":")).encode
        dest = Path(dest)
        partial = dest.with_name(f"{dest.name}.partial-{os.getpid()}-{id(self):x}")
        try:
            with open(partial, "w", encoding="utf-8", errors="surrogateescape") as out:
                out.write(f'{{"format":{self.INDEX_FORMAT},"entries":[')
                for number, (path, entry) in enumerate(self._entries.items()):
                    origin = origins.get(id(entry.inode)) if entry.inode is not entry \
                        else None
                    out.write(("," if number else "") + compact(
                        [path, entry.type.value, entry.mode, entry.uid, entry.gid,
                         entry.mtime, entry.size, entry.linkname, entry.devmajor,
                         entry.devminor, origin]))
                rest = compact({"persistent": self.persistent, "dropped": self.dropped,
                                "notes": self.notes, "compression": self.compression.value,
                                "stream_bytes": self.stream_bytes})
                out.write("]," + rest[1:])
            os.replace(partial, dest)
        finally:
            partial.unlink(missing_ok=True)

    @classmethod
    def from_index(cls, source: str | os.PathLike[str],
                   content_reader: Callable[[str, int], bytes],
                   workdir: str | os.PathLike[str] | None = None) -> RootTree:
        """A tree from :meth:`write_index`, its content read on demand.

        :param source: the index file.
        :param content_reader: ``(path, size) -> bytes`` for regular files.
        :param workdir: directory for the (empty) spool file.
        :raises ValueError: the index is unreadable or of another format.
        """
        # Parsing the index and building its ~20,000 entries allocates some
        # 100,000 objects, none of them garbage: the collector's passes over
        # them cost a fresh re-render 6-20 ms.
        collecting = gc.isenabled()
        gc.disable()
        try:
            return cls._from_index(source, content_reader, workdir)
        finally:
            if collecting:
                gc.enable()

    @classmethod
    def _from_index(cls, source: str | os.PathLike[str],
                    content_reader: Callable[[str, int], bytes],
                    workdir: str | os.PathLike[str] | None) -> RootTree:
        try:
            document = _read_index(Path(source))
            if not isinstance(document, dict):
                raise ValueError("not a JSON object")
            if document.get("format") != cls.INDEX_FORMAT:
                raise ValueError(f"index format {document.get('format')!r}")
            persistent = document["persistent"]
            entries: dict[str, Entry] = {}
            links: list[tuple[str, str]] = []
            kinds = _KINDS  # a re-render reads ~20,000 entries: no EntryType() calls
            for (path, kind, mode, uid, gid, mtime, size, linkname, major, minor,
                 origin) in document["entries"]:
                entries[path] = Entry(path, kinds[kind], mode, uid, gid, mtime, size,
                                      linkname, major, minor)
                if origin is not None:
                    links.append((path, origin))
            for path, origin in links:
                entries[path]._origin = entries[origin]
            spool = tempfile.TemporaryFile(dir=workdir)  # noqa: SIM115 - owned by the tree
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read the tree index {source}: {exc}") from None
        return cls(spool, persistent, entries=entries, dropped=document["dropped"],
                   notes=document["notes"], compression=Compression(document["compression"]),
                   stream_bytes=int(document["stream_bytes"]), kept=False,
                   content_reader=content_reader)

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


#: How many parsed indexes a process keeps (a service re-renders the same
#: cloudlets: the JSON of 20,000 entries takes 0.05 s to parse).
INDEX_MEMO_FILES = 2
_index_memo: collections.OrderedDict[tuple[int, ...], Any] = collections.OrderedDict()
_index_lock = threading.Lock()


def _read_index(path: Path) -> Any:
    """The parsed JSON of an index file, remembered by the file's identity
    (an index is replaced, never changed in place). Never modified by its
    readers."""
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        info = os.fstat(handle.fileno())
        key = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
        with _index_lock:
            found = _index_memo.get(key)
            if found is not None:
                _index_memo.move_to_end(key)
                return found
        document = json.loads(handle.read())
    if isinstance(document, dict):
        with _index_lock:
            _index_memo[key] = document
            while len(_index_memo) > INDEX_MEMO_FILES:
                _index_memo.popitem(last=False)
    return document


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
