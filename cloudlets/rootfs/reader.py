"""One streaming pass over a hostile tarball: :func:`read_tarball`."""

from __future__ import annotations

import base64
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import IO, Any, BinaryIO, cast
from urllib.parse import unquote_to_bytes

from cloudlets.errors import UnsafeArchiveError
from cloudlets.patterns import compile_pattern
from cloudlets.rootfs.entry import Entry, EntryType
from cloudlets.rootfs.policy import (
    MAX_TIME,
    ArchivePolicy,
    clamp_time,
    encoded,
    normalize,
    parent_of,
)
from cloudlets.rootfs.stream import (
    Compression,
    TarStream,
    decode_errors,
    detect_compression,
    open_stream,
)
from cloudlets.rootfs.tar import (
    BLOCK,
    COPY_CHUNK,
    FROM_TAR,
    REGULAR_TYPES,
    XATTR_PREFIX,
    fast_member,
)
from cloudlets.rootfs.tree import RootTree, TreeStream, fill_parents, nearest_entry

__all__ = ["read_tarball"]

_SPOOL_BUFFER = 1024 * 1024
_MAX_ID = 2**32 - 2
_MAX_DEVICE = 8**7 - 1  # what a ustar header holds (Linux: 4095:1048575)
_LIBARCHIVE_XATTR_PREFIX = "LIBARCHIVE.xattr."
_ZEROS = bytes(COPY_CHUNK)
_MIB = 1024 * 1024


def _discard(data: bytes | memoryview) -> None:
    pass


def _xattrs(info: tarfile.TarInfo, policy: ArchivePolicy, path: str,
            notes: list[str]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for key, value in info.pax_headers.items():
        if key.startswith(XATTR_PREFIX):
            found[key[len(XATTR_PREFIX):]] = encoded(value)
    for key, value in info.pax_headers.items():
        if key.startswith(_LIBARCHIVE_XATTR_PREFIX):
            name = unquote_to_bytes(key[len(_LIBARCHIVE_XATTR_PREFIX):]).decode(
                "utf-8", "surrogateescape")
            if name not in found:
                try:
                    padded = value + "=" * (-len(value) % 4)
                    found[name] = base64.b64decode(padded, validate=True)
                except ValueError:
                    raise UnsafeArchiveError(f"extended attribute {name!r} is not valid base64",
                                             info.name) from None
    kept: dict[str, bytes] = {}
    for name, data in found.items():
        if "\x00" in name or not name:
            raise UnsafeArchiveError("extended attribute with an empty or NUL name", info.name)
        if len(data) > policy.max_xattr_size:
            raise UnsafeArchiveError(
                f"extended attribute {name!r} holds {len(data)} bytes, more than "
                f"{policy.max_xattr_size} (ArchivePolicy.max_xattr_size)", info.name)
        if name.startswith(policy.xattr_prefixes):
            kept[name] = data
        else:
            notes.append(f"{path}: extended attribute {name!r} dropped "
                         "(not in ArchivePolicy.xattr_prefixes)")
    return kept


class _Reader:
    """One pass over a tarball, gathering what :meth:`finish` makes a
    :class:`RootTree` of."""

    def __init__(self, spool: IO[bytes], policy: ArchivePolicy, volatile: Sequence[str],
                 persistent: set[str], stream: TarStream,
                 sink: TreeStream | None = None, keep: bool = True) -> None:
        self.spool = spool
        self.entries: dict[str, Entry] = {"/": Entry("/", EntryType.DIR, 0o755)}
        #: the ancestors of the members seen: directories, explicit or not
        self.implied: set[str] = set()
        #: directory to the paths seen directly below it (to drop a subtree)
        self.children: dict[str, list[str]] = {}
        #: bytes of metadata held (ArchivePolicy.max_metadata_size)
        self.metadata = 0
        #: member times clamped into 0 .. MAX_TIME
        self.clamped = 0
        self.dropped: list[str] = []
        self.notes: list[str] = []
        self.root_seen = False
        self.stream_bytes = 0
        self.sink = sink
        self.keep = keep
        self.policy = policy
        self.volatile = [compile_pattern(pattern) for pattern in volatile]
        self.persistent = persistent
        self.stream = stream
        self.members = 0
        self.data_total = 0
        self.dropped_dirs: set[str] = set()
        self.dropped_files: set[str] = set()
        self.max_mtime = 0
        self._spooled = spool.tell()
        self._write = spool.write

    def run(self) -> None:
        stream = self.stream
        stream.headers()
        readable: Any = stream
        archive = tarfile.TarFile(fileobj=readable, mode="r", encoding="utf-8",
                                  errors="surrogateescape")
        opened: Any = archive  # tarfile's undeclared attributes
        while True:
            stream.headers()
            info = self._next(archive)
            if info is None:
                break
            stream.content(info.name)
            self.member(info, archive)
            stream.seek(archive.offset)
            opened.members.clear()
        self.stream_bytes = stream.total

    def _next(self, archive: tarfile.TarFile) -> tarfile.TarInfo | None:
        """The next member: a plain ustar header is parsed here, anything else
        (PAX and GNU extensions, global headers in force, odd numbers, the
        end of the archive, a header across two chunks) by :mod:`tarfile`."""
        opened: Any = archive  # tarfile's undeclared attributes
        if opened.firstmember is None and not archive.pax_headers:
            stream = self.stream
            found = fast_member(stream.peek)
            if found is not None:
                info, length = found
                info.offset = stream.tell()
                stream.skip(length)
                info.offset_data = info.offset + length
                archive.offset = info.offset_data
                if info.type in REGULAR_TYPES:
                    archive.offset += -(-info.size // BLOCK) * BLOCK
                return info
        return archive.next()

    def _is_volatile(self, path: str) -> bool:
        if not self.volatile or path in self.persistent:
            return False
        return any(pattern.match(path) for pattern in self.volatile)

    def member(self, info: tarfile.TarInfo, archive: tarfile.TarFile) -> None:
        policy = self.policy
        name = info.name
        self.members += 1
        self._count_members(name)
        try:
            path = normalize(name, policy)
        except UnsafeArchiveError as exc:
            raise UnsafeArchiveError(str(exc), name) from None
        kind = FROM_TAR.get(info.type)
        if kind is None:
            raise UnsafeArchiveError(f"unsupported member type {info.type!r}", name)
        if info.issparse() and not policy.allow_sparse:
            raise UnsafeArchiveError("sparse member (ArchivePolicy.allow_sparse)", name)
        for number, what in ((info.uid, "uid"), (info.gid, "gid")):
            if not 0 <= number <= _MAX_ID:
                raise UnsafeArchiveError(f"{what} {number} is out of range", name)
        if kind is EntryType.FILE:
            if info.size < 0:
                raise UnsafeArchiveError(f"negative size {info.size}", name)
            if info.size > policy.max_member_size:
                raise UnsafeArchiveError(
                    f"{info.size} bytes, more than {policy.max_member_size} "
                    "(ArchivePolicy.max_member_size)", name)
            self.data_total += info.size
            if self.data_total > policy.max_total_size:
                raise UnsafeArchiveError(
                    f"the members add up to more than {policy.max_total_size} bytes "
                    "(ArchivePolicy.max_total_size)", name)

        entries = self.entries
        if path == "/":
            if kind is not EntryType.DIR:
                raise UnsafeArchiveError(f"the root of the tree is a {kind.value}", name)
            under_dropped = False
        else:
            under_dropped = self._ancestry(path, name)
        # volatile paths, and everything under a dropped directory
        if path != "/" and (under_dropped or self._is_volatile(path)):
            self.dropped.append(path)
            if kind is EntryType.DIR:
                self.dropped_dirs.add(path)
                if path in self.children:
                    self._drop_subtree(path)
            else:
                self.dropped_files.add(path)
            self.entries.pop(path, None)
            return

        existing = entries.get(path)
        if kind is not EntryType.DIR and (path in self.implied or (
                existing is not None and existing.type is EntryType.DIR)):
            raise UnsafeArchiveError(
                f"a {kind.value} replaces the directory {path} seen earlier", name)

        mtime = clamp_time(info.mtime, name)
        if not 0 <= info.mtime <= MAX_TIME:
            self.clamped += 1
        self.max_mtime = max(self.max_mtime, mtime)
        entry = Entry(path, kind, info.mode & 0o7777, info.uid, info.gid, mtime,
                      xattrs=_xattrs(info, policy, path, self.notes))
        self._account(len(path) + len(info.linkname)
                      + sum(len(k) + len(v) for k, v in entry.xattrs.items()), name)
        if kind is EntryType.FILE:
            entry.size = info.size
        elif kind is EntryType.SYMLINK:
            target = info.linkname
            if not target or "\x00" in target:
                raise UnsafeArchiveError("symlink with an empty or NUL target", name)
            if len(encoded(target)) > policy.max_path_length:
                raise UnsafeArchiveError(
                    f"symlink target longer than {policy.max_path_length} bytes", name)
            entry.linkname = target
        elif kind is EntryType.HARDLINK:
            try:
                target_path = normalize(info.linkname, policy, "hardlink target")
            except UnsafeArchiveError as exc:
                raise UnsafeArchiveError(str(exc), name) from None
            # every member seen below a dropped directory is in dropped_files
            if target_path in self.dropped_files:
                self.dropped.append(path)
                self.notes.append(f"{path}: hardlink to the volatile {target_path} dropped too")
                return
            linked = entries.get(target_path)
            if linked is None:
                raise UnsafeArchiveError(
                    f"hardlink to {info.linkname!r}, which is not a member seen earlier", name)
            if linked.type is EntryType.DIR:
                raise UnsafeArchiveError(f"hardlink to the directory {target_path}", name)
            if target_path == path:
                return
            origin = linked.inode
            entry = Entry(path, EntryType.HARDLINK, origin.mode, origin.uid, origin.gid,
                          origin.mtime, origin.size, target_path, origin.devmajor,
                          origin.devminor, origin.xattrs, _origin=origin)
        elif kind in (EntryType.CHARDEV, EntryType.BLOCKDEV):
            if not (0 <= info.devmajor <= _MAX_DEVICE and 0 <= info.devminor <= _MAX_DEVICE):
                raise UnsafeArchiveError(
                    f"device number {info.devmajor}:{info.devminor} is out of range", name)
            entry.devmajor, entry.devminor = info.devmajor, info.devminor

        if path == "/":
            entries["/"] = entry
            self.root_seen = True
            return
        sink = self.sink
        send = sink is not None and sink.entry(entry)
        if kind is EntryType.FILE:
            entry._offset = self._spool_content(info, archive, sink if send else None)
            if not self.keep:
                entry._offset = -1
        if path not in entries:
            self.children.setdefault(parent_of(path), []).append(path)
        entries[path] = entry

    def _count_members(self, name: str) -> None:
        """Check the members so far (implied parents included) against the
        policy: their number, and their density in a compressed tarball."""
        policy, members = self.policy, self.members
        if members > policy.max_members:
            raise UnsafeArchiveError(
                f"more than {policy.max_members} members with the parent directories they "
                "imply (ArchivePolicy.max_members)", name)
        compressed = self.stream.compressed
        if compressed and members > policy.members_grace:
            density = members * _MIB / compressed
            if density > policy.max_members_per_mib:
                raise UnsafeArchiveError(
                    f"{density:.0f} members per MiB of compressed tarball, more than "
                    f"{policy.max_members_per_mib} (ArchivePolicy.max_members_per_mib): "
                    "a bomb of headers?", name)

    def _account(self, size: int, name: str) -> None:
        """Count ``size`` bytes of metadata against the policy."""
        self.metadata += size
        if self.metadata > self.policy.max_metadata_size:
            raise UnsafeArchiveError(
                f"the tree's paths, links and extended attributes exceed "
                f"{self.policy.max_metadata_size} bytes (ArchivePolicy.max_metadata_size)",
                name)

    def _ancestry(self, path: str, name: str) -> bool:
        """Check the directories above ``path`` and note those not seen yet.

        Only the nearest ancestor already known is looked at: everything above
        a known directory was checked when it became known, so the cost is one
        step, plus one per directory seen for the first time (each only once).

        :returns: whether ``path`` lies below a dropped directory.
        :raises UnsafeArchiveError: an ancestor is a symlink or not a directory.
        """
        missing: list[str] = []
        child, parent = path, parent_of(path)
        children = self.children
        dropped = False
        while parent != "/":
            if parent in self.dropped_dirs:
                dropped = True
                break
            if parent in self.implied:
                break
            found = self.entries.get(parent)
            if found is not None:
                if found.inode.type is EntryType.SYMLINK:
                    raise UnsafeArchiveError(
                        f"written through the symlink {parent} "
                        f"(-> {found.inode.linkname!r})", name)
                if found.type is not EntryType.DIR:
                    raise UnsafeArchiveError(
                        f"its parent {parent} is a {found.inode.type.value}, not a directory",
                        name)
                break
            missing.append(parent)
            child, parent = parent, parent_of(parent)
            children.setdefault(parent, []).append(child)
        if missing:
            self.members += len(missing)
            self._count_members(name)
            self._account(sum(map(len, missing)), name)
            (self.dropped_dirs if dropped else self.implied).update(missing)
        return dropped

    def _drop_subtree(self, path: str) -> None:
        """A volatile directory came after members below it: drop those too,
        and mark the directories below it dropped (each entry is dropped at
        most once: the cost is the size of the subtree)."""
        pending = [path]
        while pending:
            for below in self.children.pop(pending.pop(), ()):
                pending.append(below)
                if self.entries.pop(below, None) is not None:
                    self.dropped.append(below)
                    self.dropped_files.add(below)
                if below in self.implied:
                    self.implied.discard(below)
                    self.dropped_dirs.add(below)

    def _spool_content(self, info: tarfile.TarInfo, archive: tarfile.TarFile,
                       sink: TreeStream | None) -> int:
        offset = self._spooled
        write: Callable[[bytes | memoryview], object] = self._write
        if not self.keep:
            write = sink.content if sink is not None else _discard
        elif sink is not None:
            spool, send = self._write, sink.content

            def tee(data: bytes | memoryview) -> None:
                spool(data)
                send(data)

            write = tee
        if info.sparse is not None:
            self._sparse_content(info, archive, write, sink)
        else:
            self.stream.seek(info.offset_data)
            copied = self.stream.copy_to(write, info.size)
            if copied < info.size:
                raise UnsafeArchiveError(
                    f"content ends {info.size - copied} bytes early (truncated archive)",
                    info.name)
        if self.keep:
            self._spooled += info.size
        if sink is not None:
            sink.end_content(info.size)
        return offset

    def _sparse_content(self, info: tarfile.TarInfo, archive: tarfile.TarFile,
                        write: Callable[[bytes | memoryview], object],
                        sink: TreeStream | None) -> None:
        """Copy a sparse member's data regions, keeping its holes as holes in
        the spool (a relative seek; the file system stores nothing there).
        Only a sink (a pipe) gets the holes as zeros. The declared size was
        counted against the policy before anything was copied."""
        name, size = info.name, info.size
        assert info.sparse is not None
        stored = archive.offset - info.offset_data  # the data blocks in the archive
        position = data = 0
        self.stream.seek(info.offset_data)

        def hole(count: int) -> None:
            if self.keep:
                self.spool.seek(count, os.SEEK_CUR)
            if sink is not None:
                while count:
                    zeros = _ZEROS[:min(count, len(_ZEROS))]
                    sink.content(zeros)
                    count -= len(zeros)

        regions = cast("list[tuple[int, int]]", info.sparse)  # typeshed says bytes
        for start, length in regions:
            if length == 0:  # an empty slot of the header
                continue
            if start < position or length < 0 or start + length > size:
                raise UnsafeArchiveError(
                    f"sparse map region {start}+{length} is out of order or beyond the "
                    f"declared size {size}", name)
            data += length
            if data > stored:
                raise UnsafeArchiveError(
                    f"sparse map holds more data than the {stored} bytes the member stores",
                    name)
            if start > position:
                hole(start - position)
            copied = self.stream.copy_to(write, length)
            if copied < length:
                raise UnsafeArchiveError(
                    f"content ends {length - copied} bytes early (truncated archive)", name)
            position = start + length
        if position < size:
            hole(size - position)
        if self.keep:
            self.spool.truncate()  # a hole at the end still counts in the file's length

    def finish(self, compression: Compression,
               content_reader: Callable[[str, int], bytes] | None = None) -> RootTree:
        """Complete the tree: the root's mtime, the persistent directories
        and the missing parents.

        :param compression: how the tarball was compressed.
        :returns: the tree, which owns the spool from now on.
        """
        entries = self.entries
        root = entries["/"]
        if not self.root_seen:
            root.mtime = self.max_mtime
        if self.clamped:
            self.notes.append(f"{self.clamped} member times clamped to 0 .. {MAX_TIME} "
                              "(rootfs.policy.MAX_TIME)")
        persistent = sorted(self.persistent)
        for path in persistent:
            if path not in entries:
                found = nearest_entry(entries, path)
                if found is not None and found.type is not EntryType.DIR:
                    raise UnsafeArchiveError(
                        f"persistent path {path} cannot be created: {found.path} is not a "
                        "directory")
                entries[path] = Entry(path, EntryType.DIR, 0o755, mtime=root.mtime)
                self.notes.append(f"{path}: persistent path missing, created as an empty "
                                  "directory 0755 root:root")
        # what only reading needed goes before the missing parents are made
        self.implied, self.children, self.dropped_dirs = set(), {}, set()
        fill_parents(entries, self.notes)
        return RootTree(self.spool, persistent, entries=entries, dropped=self.dropped,
                        notes=self.notes, compression=compression,
                        stream_bytes=self.stream_bytes, kept=self.keep,
                        content_reader=content_reader)


def read_tarball(source: str | os.PathLike[str] | BinaryIO,
                 policy: ArchivePolicy | None = None, *,
                 volatile: Sequence[str] = (), persistent: Iterable[str] = (),
                 workdir: str | os.PathLike[str] | None = None,
                 sink: TreeStream | None = None, keep_content: bool = True,
                 content_reader: Callable[[str, int], bytes] | None = None) -> RootTree:
    """Read a root filesystem tarball into a :class:`RootTree`, in one
    streaming pass with constant memory (besides the entries' metadata).

    :param source: a path, or a binary file object positioned at the start.
    :param policy: the limits and rules; :class:`ArchivePolicy` defaults.
    :param volatile: regular expressions; a member whose absolute path
        (``/var/log/syslog``) they match (in linear time, see
        :mod:`cloudlets.patterns`; anchored at the start, as the dotCloud
        tool did) is left out, and a left-out directory takes its whole
        subtree with it.
    :param persistent: absolute paths kept even if a volatile pattern matches
        them, listed in :attr:`RootTree.persistent`, created as empty
        directories when the tarball lacks them.
    :param workdir: directory for the spool file (the system's temporary
        directory by default); nothing else is written.
    :param sink: also send the tree as a normalized tar while reading it;
        finish with :meth:`TreeStream.close` once the tree is complete.
    :param keep_content: with a sink, ``False`` sends file content only
        there: nothing is spooled, :meth:`RootTree.read_bytes` goes through
        :attr:`RootTree.content_reader` and the tree cannot be written
        with :meth:`RootTree.write_tar` (read the tarball again for that).
    :param content_reader: the tree's :attr:`RootTree.content_reader`, for
        ``keep_content=False`` (the sink's consumer reads the content back,
        once it has it).
    :returns: the tree; close it when done.
    :raises UnsafeArchiveError: naming the member that breaks the policy, or
        when the archive is malformed.
    """
    policy = policy or ArchivePolicy()
    clean_persistent = set()
    for path in persistent:
        if not path.startswith("/"):
            raise UnsafeArchiveError(f"persistent path {path!r} is not absolute")
        clean_persistent.add(normalize(path[1:] or ".", policy, "persistent path"))
    owned: IO[bytes] | None = None
    if isinstance(source, (str, os.PathLike)):
        try:
            owned = open(source, "rb")  # noqa: SIM115 - closed in the finally below
        except OSError as exc:
            raise UnsafeArchiveError(f"cannot open tarball {source}: {exc.strerror}") from None
        raw: IO[bytes] = owned
    else:
        raw = source
    # owned by the tree once read, which closes it
    spool = tempfile.TemporaryFile(dir=workdir, buffering=_SPOOL_BUFFER)  # noqa: SIM115
    keep = keep_content or sink is None
    try:
        head = raw.read(BLOCK)
        kind = detect_compression(head)
        with open_stream(kind.value, head, raw, policy) as stream:
            reader = _Reader(spool, policy, volatile, clean_persistent, stream, sink, keep)
            try:
                reader.run()
            except UnsafeArchiveError:
                raise
            except decode_errors() as exc:
                what = "" if kind is Compression.NONE else f" {kind.value}"
                raise UnsafeArchiveError(f"malformed{what} tar archive: {exc}",
                                         stream.member) from None
        tree = reader.finish(kind, content_reader)
    except BaseException:
        spool.close()
        raise
    finally:
        if owned is not None:
            owned.close()
    return tree
