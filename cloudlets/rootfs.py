"""Reading a root filesystem tarball from someone we do not trust.

:func:`read_tarball` streams the archive once (uncompressed, gzip, xz, bzip2
or zstd, told apart by their magic bytes), checks every member against an
:class:`ArchivePolicy`, leaves out the manifest's ``volatile`` paths, and
builds a :class:`RootTree`: the metadata of every member in memory, the content
of regular files in one anonymous spool file. Nothing is ever extracted to the
host filesystem, so no member (and no symlink, however it points) can reach
outside the work area: paths are only ever looked up in the model. The
archive is decompressed on a worker thread (:mod:`cloudlets.tarstream`) while
this one parses it; plain ustar headers are parsed here, the rest by
:mod:`tarfile`.

:meth:`RootTree.write_tar` then writes the tree the disk stage consumes: a
clean, normalized, uncompressed PAX tar, sorted (parents before children),
with numeric owners, ``SCHILY.xattr.*`` extended attributes, rendered
templates in place of their sources, and mtimes clamped to
``SOURCE_DATE_EPOCH`` when one is given.

Typical use::

    with read_tarball(path, volatile=manifest.volatile,
                      persistent=manifest.persistent) as tree:
        tree.write_tar(work / "tree.tar", replacements=rendered)
"""

from __future__ import annotations

import base64
import enum
import functools
import json
import lzma
import os
import posixpath
import re
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Self
from urllib.parse import unquote_to_bytes

from cloudlets.errors import UnsafeArchiveError
from cloudlets.patterns import compile_pattern
from cloudlets.tarstream import TarStream, gzip_errors, open_stream

__all__ = [
    "METADATA_PATH",
    "ArchivePolicy",
    "Compression",
    "Entry",
    "EntryType",
    "RootTree",
    "TreeStream",
    "detect_compression",
    "image_metadata",
    "read_tarball",
]

#: Where :func:`image_metadata` is meant to be stored inside the image.
METADATA_PATH = "/etc/cloudlets/image.json"

_KIB = 1024
_MIB = 1024 * _KIB
_GIB = 1024 * _MIB
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE
_CHUNK = _MIB
_SPOOL_BUFFER = _MIB
_WRITE_SIZE = _MIB
_INLINE_SIZE = 64 * _KIB
_MAX_ID = 2**32 - 2
_MAX_DEVICE = 8**7 - 1  # what a ustar header holds (Linux: 4095:1048575)
_CONTROL = re.compile(r"[\x01-\x1f\x7f]")
_XATTR_PREFIX = "SCHILY.xattr."
_LIBARCHIVE_XATTR_PREFIX = "LIBARCHIVE.xattr."
_SYMLINK_HOPS = 40


class Compression(enum.StrEnum):
    """How a tarball is compressed, as told by its first bytes."""

    BZIP2 = "bzip2"
    GZIP = "gzip"
    NONE = "none"
    XZ = "xz"
    ZSTD = "zstd"


class EntryType(enum.StrEnum):
    """The kind of a file in the tree."""

    BLOCKDEV = "blockdev"
    CHARDEV = "chardev"
    DIR = "dir"
    FIFO = "fifo"
    FILE = "file"
    HARDLINK = "hardlink"
    SYMLINK = "symlink"


_FROM_TAR = {
    tarfile.REGTYPE: EntryType.FILE,
    tarfile.AREGTYPE: EntryType.FILE,
    tarfile.CONTTYPE: EntryType.FILE,
    tarfile.GNUTYPE_SPARSE: EntryType.FILE,
    tarfile.DIRTYPE: EntryType.DIR,
    tarfile.SYMTYPE: EntryType.SYMLINK,
    tarfile.LNKTYPE: EntryType.HARDLINK,
    tarfile.CHRTYPE: EntryType.CHARDEV,
    tarfile.BLKTYPE: EntryType.BLOCKDEV,
    tarfile.FIFOTYPE: EntryType.FIFO,
}
#: Types whose content follows the header (tarfile's ``REGULAR_TYPES`` but sparse).
_REGULAR_TYPES = frozenset((tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE))
#: Types :func:`_plain_header` parses; anything else goes through :mod:`tarfile`.
_PLAIN_TYPES = _REGULAR_TYPES | {tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                                 tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE}
_TO_TAR = {
    EntryType.FILE: tarfile.REGTYPE,
    EntryType.DIR: tarfile.DIRTYPE,
    EntryType.SYMLINK: tarfile.SYMTYPE,
    EntryType.HARDLINK: tarfile.LNKTYPE,
    EntryType.CHARDEV: tarfile.CHRTYPE,
    EntryType.BLOCKDEV: tarfile.BLKTYPE,
    EntryType.FIFO: tarfile.FIFOTYPE,
}


@dataclass(frozen=True)
class ArchivePolicy:
    """What a root filesystem tarball may contain. Every limit is checked while
    streaming, so a bomb fails as soon as it crosses one.

    :ivar max_total_size: bytes the archive may expand to (tar stream, and
        separately the sum of the members' sizes, sparse files counted whole).
    :ivar max_member_size: bytes one member may hold.
    :ivar max_members: number of members.
    :ivar max_compression_ratio: uncompressed bytes per compressed byte, checked
        once ``ratio_grace`` bytes have come out of the decompressor.
    :ivar ratio_grace: uncompressed bytes read before the ratio is enforced.
    :ivar max_path_length: bytes in a path (and in a symlink target).
    :ivar max_name_length: bytes in one path component.
    :ivar max_header_size: bytes of tar headers (PAX records, GNU long names,
        sparse maps) one member may bring.
    :ivar allow_sparse: accept sparse members (they are stored dense).
    :ivar allow_control_characters: accept control characters (newline, tab,
        escape...) in member names; they break line-oriented tools downstream.
    :ivar xattr_prefixes: extended attributes kept; others are dropped and
        noted in :attr:`RootTree.notes`.
    :ivar max_xattr_size: bytes one extended attribute value may hold.
    """

    max_total_size: int = 16 * _GIB
    max_member_size: int = 8 * _GIB
    max_members: int = 1_000_000
    max_compression_ratio: float = 200.0
    ratio_grace: int = 64 * _MIB
    max_path_length: int = 4095
    max_name_length: int = 255
    max_header_size: int = 1 * _MIB
    allow_sparse: bool = True
    allow_control_characters: bool = False
    xattr_prefixes: tuple[str, ...] = ("security.", "trusted.", "user.",
                                       "system.posix_acl_access", "system.posix_acl_default")
    max_xattr_size: int = 64 * _KIB


@dataclass(eq=False)
class Entry:
    """One file of the tree.

    :ivar path: absolute path inside the image (``/`` for the root).
    :ivar type: what kind of file it is.
    :ivar mode: permission bits with setuid, setgid and sticky (``0o7777``).
    :ivar uid: numeric owner.
    :ivar gid: numeric group.
    :ivar mtime: modification time, seconds since the epoch.
    :ivar size: content bytes (regular files and hardlinks to them).
    :ivar linkname: a symlink's target as stored (resolved inside the image
        only), or the absolute path a hardlink was made to.
    :ivar devmajor: device major number (device nodes).
    :ivar devminor: device minor number (device nodes).
    :ivar xattrs: extended attributes, name to value.
    """

    path: str
    type: EntryType
    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    size: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    _offset: int = field(default=-1, repr=False)
    _data: bytes | None = field(default=None, repr=False)
    _origin: Entry | None = field(default=None, repr=False)

    @property
    def capabilities(self) -> bytes | None:
        """The ``security.capability`` extended attribute (file capabilities)."""
        return self.xattrs.get("security.capability")

    @property
    def inode(self) -> Entry:
        """The entry that owns the content: a hardlink's origin, else itself."""
        return self._origin if self._origin is not None else self

    @property
    def is_regular(self) -> bool:
        """Whether this is a regular file (directly or as a hardlink to one)."""
        return self.inode.type is EntryType.FILE


# -- streams -------------------------------------------------------------------


def detect_compression(head: bytes) -> Compression:
    """Tell how a tarball is compressed from its first 512 bytes.

    :param head: the first bytes of the file (512 or all of a shorter file).
    :returns: the compression.
    :raises UnsafeArchiveError: when it is neither a tar archive nor one of the
        supported compressions.
    """
    if head.startswith(b"\x1f\x8b"):
        return Compression.GZIP
    if head.startswith(b"\xfd7zXZ\x00"):
        return Compression.XZ
    if head.startswith(b"BZh") and head[3:4].isdigit():
        return Compression.BZIP2
    if head.startswith(b"\x28\xb5\x2f\xfd"):
        return Compression.ZSTD
    if head.startswith(b"\x04\x22\x4d\x18"):
        raise UnsafeArchiveError("lz4 compression is not supported (use gzip, xz, bzip2 or zstd)")
    if not head:
        raise UnsafeArchiveError("the tarball is empty")
    if head[257:262] == b"ustar":
        return Compression.NONE
    try:
        tarfile.TarInfo.frombuf(head[:_BLOCK], "utf-8", "surrogateescape")
    except tarfile.TarError:
        raise UnsafeArchiveError(
            "not a tar archive, nor a gzip, xz, bzip2 or zstd compressed one") from None
    return Compression.NONE


def _stream_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [tarfile.TarError, OSError, EOFError, lzma.LZMAError,
                                         ValueError, OverflowError, *gzip_errors()]
    try:
        import zstandard
        errors.append(zstandard.ZstdError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


# -- names ---------------------------------------------------------------------


def _encoded(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _normalize(name: str, policy: ArchivePolicy, what: str = "member name") -> str:
    """Map a tar member name to an absolute path inside the image.

    :raises UnsafeArchiveError: (without the member; the caller adds it).
    """
    if not name:
        raise UnsafeArchiveError(f"empty {what}")
    if "\x00" in name:
        raise UnsafeArchiveError(f"NUL byte in {what}")
    if name.startswith("/"):
        raise UnsafeArchiveError(f"absolute {what} {name!r}")
    if not policy.allow_control_characters and _CONTROL.search(name):
        raise UnsafeArchiveError(
            f"control character in {what} (ArchivePolicy.allow_control_characters)")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"'..' in {what} {name!r}")
    path = "/" + "/".join(parts)
    if len(_encoded(path)) > policy.max_path_length:
        raise UnsafeArchiveError(
            f"{what} longer than {policy.max_path_length} bytes (ArchivePolicy.max_path_length)")
    for part in parts:
        if len(_encoded(part)) > policy.max_name_length:
            raise UnsafeArchiveError(
                f"a component of the {what} is longer than {policy.max_name_length} bytes "
                "(ArchivePolicy.max_name_length)")
    return path


def _parent(path: str) -> str:
    return posixpath.dirname(path)


def _ancestors(path: str) -> Iterator[str]:
    """Yield the ancestors of an absolute path, nearest last, without ``/``."""
    index = path.find("/", 1)
    while index != -1:
        yield path[:index]
        index = path.find("/", index + 1)


# -- the normalized tar's headers ----------------------------------------------------
#
# The blocks tarfile.TarInfo.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
# writes for our members (empty user and group names, no prefix), made an order
# of magnitude faster: a ustar block, preceded by a PAX "x" header when a name is
# not ASCII or longer than its field, a number too large for its field, or there
# are extended attributes. Unlike tobuf, a record keyword that is not UTF-8 (an
# extended attribute's name) is written as its bytes instead of failing.

_USTAR_MAGIC = b"ustar\x0000"
_NO_DEVICE = bytes(16)
_PAX_NAME = "././@PaxHeader"
_NUMBER_LIMITS = (("uid", 8**7), ("gid", 8**7), ("size", 8**11), ("mtime", 8**11))


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _ustar_block(name: str, kind: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
                 linkname: str, devices: bytes) -> bytes:
    block = b"".join((
        name.encode("ascii", "replace")[:100].ljust(100, b"\0"),
        b"%07o\0%07o\0%07o\0%011o\0%011o\0        " % (mode & 0o7777, uid, gid, size, mtime),
        kind,
        linkname.encode("ascii", "replace")[:100].ljust(100, b"\0"),
        _USTAR_MAGIC, bytes(64), devices, bytes(167),
    ))
    return b"%s%06o\0%s" % (block[:148], _byte_sum(block), block[155:])


def _pax_record(keyword: str, value: bytes) -> bytes:
    key = keyword.encode("utf-8", "surrogateescape")
    length = len(key) + len(value) + 3
    total = 0
    while True:  # the length counts its own digits
        grown = length + len(str(total))
        if grown == total:
            break
        total = grown
    return b"%d %s=%s\n" % (total, key, value)


def _pax_member(name: str, kind: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
                *, linkname: str = "", devmajor: int = 0, devminor: int = 0,
                xattrs: Mapping[str, bytes] | None = None) -> bytes:
    """The header blocks of one member of the normalized tar (no content)."""
    records: dict[str, str] = {}
    binary = False
    for xattr, value in sorted((xattrs or {}).items()):
        text = value.decode("utf-8", "surrogateescape")
        records[_XATTR_PREFIX + xattr] = text
        binary = binary or not _utf8(text)
    if not name.isascii() or len(name) > 100:
        records["path"] = name
        binary = binary or not _utf8(name)
    if not linkname.isascii() or len(linkname) > 100:
        records["linkpath"] = linkname
        binary = binary or not _utf8(linkname)
    numbers = [uid, gid, size, mtime]
    for index, (field_name, limit) in enumerate(_NUMBER_LIMITS):
        if not 0 <= numbers[index] < limit:  # too large for its field: a record
            records[field_name] = str(numbers[index])
            numbers[index] = 0
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        if not (0 <= devmajor < 8**7 and 0 <= devminor < 8**7):
            raise ValueError(f"device number {devmajor}:{devminor} does not fit a tar header")
        devices = b"%07o\0%07o\0" % (devmajor, devminor)
    else:
        devices = _NO_DEVICE
    uid, gid, size, mtime = numbers
    header = _ustar_block(name, kind, mode, uid, gid, size, mtime, linkname, devices)
    if not records:
        return header
    payload = b"".join(
        ([b"21 hdrcharset=BINARY\n"] if binary else [])
        + [_pax_record(key, value.encode("utf-8", "surrogateescape"))
           for key, value in records.items()])
    extended = _ustar_block(_PAX_NAME, tarfile.XHDTYPE, 0, 0, 0, len(payload), 0, "",
                            _NO_DEVICE)
    return extended + payload + bytes(-len(payload) % _BLOCK) + header


def _member_header(path: str, inode: Entry, source_date_epoch: int | None, *,
                   link_to: str | None = None) -> bytes:
    """The normalized tar header of ``path`` (named ``./path``) whose inode is
    ``inode``; with ``link_to``, a hardlink to that earlier path."""
    name = "." + path if path != "/" else "."
    mtime = max(0, inode.mtime)
    if source_date_epoch is not None:
        mtime = min(mtime, source_date_epoch)
    if link_to is not None:
        return _pax_member(name, tarfile.LNKTYPE, inode.mode, inode.uid, inode.gid, 0, mtime,
                           linkname="." + link_to)
    kind = _TO_TAR[inode.type]
    return _pax_member(
        name + "/" if kind == tarfile.DIRTYPE else name, kind, inode.mode, inode.uid,
        inode.gid, inode.size if inode.type is EntryType.FILE else 0, mtime,
        linkname=inode.linkname if inode.type is EntryType.SYMLINK else "",
        devmajor=inode.devmajor, devminor=inode.devminor, xattrs=inode.xattrs)


# -- the tree ------------------------------------------------------------------


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
    """

    def __init__(self, spool: IO[bytes], persistent: Sequence[str] = ()) -> None:
        self._spool = spool
        self.kept = True
        self.content_reader: Callable[[str, int], bytes] | None = None
        self._entries: dict[str, Entry] = {"/": Entry("/", EntryType.DIR, 0o755)}
        self._implied: set[str] = set()
        self.persistent = sorted(set(persistent))
        self.dropped: list[str] = []
        self.notes: list[str] = []
        self.compression = Compression.NONE
        self.stream_bytes = 0
        self._root_seen = False

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
        return sorted(self._entries, key=_encoded)

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
        pending = [p for p in path.split("/") if p]
        current = "/"
        hops = 0
        while pending:
            part = pending.pop(0)
            if part == ".":
                continue
            if part == "..":
                current = _parent(current) or "/"
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
                pending = [p for p in target.split("/") if p] + pending
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
        for other in self._entries.values():
            if other._origin is inode:
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
        for ancestor in _ancestors(path):
            found = self._entries.get(ancestor)
            if found is not None and found.type is not EntryType.DIR:
                raise ValueError(f"cannot add {path}: {ancestor} is a {found.type.value}")
        existing = self._entries.get(path)
        if existing is not None and existing.type is EntryType.DIR:
            raise ValueError(f"cannot add {path}: it is a directory")
        stamp = mtime if mtime is not None else self._entries["/"].mtime
        entry = Entry(path, EntryType.FILE, mode & 0o7777, uid, gid, stamp, len(data),
                      _data=bytes(data))
        self._entries[path] = entry
        self._fill_parents()
        return entry

    def _fill_parents(self) -> None:
        stamp = self._entries["/"].mtime
        for path in list(self._entries):
            for ancestor in _ancestors(path):
                if ancestor not in self._entries:
                    self._entries[ancestor] = Entry(ancestor, EntryType.DIR, 0o755, mtime=stamp)
                    self.notes.append(f"{ancestor}: missing parent directory created 0755 "
                                      "root:root")

    # -- output ------------------------------------------------------------

    def write_tar(self, dest: str | os.PathLike[str], *,
                  replacements: Mapping[str, bytes] | None = None,
                  source_date_epoch: int | None = None) -> Path:
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
        with open(dest, "wb", buffering=0) as out:
            writer = _Writer(out.fileno())
            for path in self.paths():
                inode = self._entries[path].inode
                key = id(inode)
                primary = primaries.get(key)
                if primary is not None and inode.type is not EntryType.DIR:
                    writer.add(_member_header(path, inode, source_date_epoch, link_to=primary))
                    continue
                primaries[key] = path
                writer.add(_member_header(path, inode, source_date_epoch))
                size = inode.size if inode.type is EntryType.FILE else 0
                if size:
                    if inode._data is not None:
                        writer.add(inode._data)
                    else:
                        writer.copy(spool_fd, inode._offset, size)
                    writer.pad(-size % _BLOCK)
            writer.pad(2 * _BLOCK)
            writer.pad(-writer.position % _RECORD)
            writer.flush()
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
        origins: dict[int, str] = {}
        rows = []
        for path, entry in self._entries.items():
            inode = entry.inode
            if inode is entry:
                origins[id(entry)] = path
        for path, entry in self._entries.items():
            origin = origins.get(id(entry.inode)) if entry.inode is not entry else None
            rows.append([path, entry.type.value, entry.mode, entry.uid, entry.gid,
                         entry.mtime, entry.size, entry.linkname, entry.devmajor,
                         entry.devminor, origin])
        document = {"format": self.INDEX_FORMAT, "entries": rows,
                    "persistent": self.persistent, "dropped": self.dropped,
                    "notes": self.notes, "compression": self.compression.value,
                    "stream_bytes": self.stream_bytes}
        dest = Path(dest)
        partial = dest.with_name(f"{dest.name}.partial-{os.getpid()}-{id(self):x}")
        try:
            partial.write_text(json.dumps(document, separators=(",", ":")),
                               encoding="utf-8", errors="surrogateescape")
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
        try:
            document = json.loads(Path(source).read_text(encoding="utf-8",
                                                         errors="surrogateescape"))
            if document.get("format") != cls.INDEX_FORMAT:
                raise ValueError(f"index format {document.get('format')!r}")
            spool = tempfile.TemporaryFile(dir=workdir)  # noqa: SIM115 - owned by the tree
            tree = cls(spool, document["persistent"])
            entries: dict[str, Entry] = {}
            for (path, kind, mode, uid, gid, mtime, size, linkname, major, minor,
                 _origin) in document["entries"]:
                entries[path] = Entry(path, EntryType(kind), mode, uid, gid, mtime, size,
                                      linkname, major, minor)
            for path, *_, origin in document["entries"]:
                if origin is not None:
                    entries[path]._origin = entries[origin]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"cannot read the tree index {source}: {exc}") from None
        tree._entries = entries
        tree._root_seen = True
        tree.dropped = list(document["dropped"])
        tree.notes = list(document["notes"])
        tree.compression = Compression(document["compression"])
        tree.stream_bytes = int(document["stream_bytes"])
        tree.kept = False
        tree.content_reader = content_reader
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


class _Writer:
    """Writes the normalized tar through one buffer: headers and small files
    are gathered (small files read straight into the buffer), large files
    are copied by the kernel (:func:`os.copy_file_range`)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._buffer = bytearray(_WRITE_SIZE)
        self._view = memoryview(self._buffer)
        self._used = 0
        #: bytes written so far (buffered included)
        self.position = 0

    def _room(self, size: int) -> None:
        if self._used + size > len(self._buffer):
            self.flush()

    def add(self, data: bytes | memoryview) -> None:
        size = len(data)
        if size > len(self._buffer):
            self.flush()
            _write_all(self._fd, data)
        else:
            self._room(size)
            self._view[self._used:self._used + size] = data
            self._used += size
        self.position += size

    def pad(self, size: int) -> None:
        self._room(size)
        self._view[self._used:self._used + size] = bytes(size)
        self._used += size
        self.position += size

    def copy(self, src: int, offset: int, size: int) -> None:
        """Copy ``size`` bytes at ``offset`` of the file ``src``."""
        if size > _INLINE_SIZE:
            self.flush()
            _copy_range(src, self._fd, offset, size)
        else:
            self._room(size)
            target = self._view[self._used:self._used + size]
            got = os.preadv(src, [target], offset)
            if got != size:
                raise OSError(f"spool file ended {size - got} bytes early")
            self._used += size
        self.position += size

    def flush(self) -> None:
        _write_all(self._fd, self._view[:self._used])
        self._used = 0


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
        self._writer = _Writer(fd)
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
        parent = _parent(path)
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
        self._send(self._writer.add, _member_header(path, inode, self._epoch, link_to=link_to))
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
        self._send(self._writer.pad, -size % _BLOCK)

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
        self._send(writer.add, _member_header("/", tree["/"], self._epoch))
        self._send(writer.pad, 2 * _BLOCK)
        self._send(writer.pad, -writer.position % _RECORD)
        self._send(lambda _: writer.flush(), None)
        self.position = writer.position
        return self.broken


def _discard(data: bytes | memoryview) -> None:
    pass


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _copy_range(src: int, dst: int, offset: int, size: int) -> None:
    """Copy ``size`` bytes at ``offset`` of ``src`` to the end of ``dst``."""
    done = 0
    try:
        while done < size:
            copied = os.copy_file_range(src, dst, size - done, offset + done)
            if copied <= 0:
                break
            done += copied
    except (OSError, AttributeError):
        pass
    while done < size:
        chunk = os.pread(src, min(_CHUNK, size - done), offset + done)
        if not chunk:
            raise OSError(f"spool file ended {size - done} bytes early")
        os.write(dst, chunk)
        done += len(chunk)


# -- reading -------------------------------------------------------------------


def _xattrs(info: tarfile.TarInfo, policy: ArchivePolicy, path: str,
            notes: list[str]) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    for key, value in info.pax_headers.items():
        if key.startswith(_XATTR_PREFIX):
            found[key[len(_XATTR_PREFIX):]] = _encoded(value)
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


# An octal header field as every tar writes it: digits between spaces, up to a
# NUL (what follows the NUL is ignored, as tarfile ignores it).
_OCTAL = re.compile(rb" *([0-7]*) *(?:\0[\s\S]*)?")
_NUMBER_FIELDS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (148, 156),
                  (329, 337), (337, 345))
# The numbers as tarfile, GNU tar and libarchive write them, all at once: mode,
# uid, gid ("0000644\0" or "000644 \0"), size, mtime, checksum ("006543\0 ");
# device numbers the same way, or NUL.
_COMMON_NUMBERS = re.compile(rb"([0-7]{6}[0-7 ])\0" * 3 + rb"([0-7]{11})[\0 ]" * 2
                             + rb"([0-7]{6})\0 ")
_COMMON_DEVICES = re.compile(rb"([0-7]{6}[0-7 ])\0([0-7]{6}[0-7 ])\0|\0{16}")
# A PAX record's start, as tarfile matches it.
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")


def _byte_sum(data: bytes) -> int:
    """The sum of the bytes of a 512-byte block, from two Adler-32s (whose low
    half is one plus the sum of the bytes, modulo 65521: exact for 256 bytes,
    which add up to 65280 at most)."""
    return (zlib.adler32(data[:256]) & 0xFFFF) + (zlib.adler32(data[256:512]) & 0xFFFF) - 2


def _nts(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _numbers(block: bytes) -> list[int] | None:
    """The numbers of a header block (mode, uid, gid, size, mtime, device
    major and minor) when all are plain octal and the unsigned checksum is
    right; ``None`` otherwise."""
    common = _COMMON_NUMBERS.fullmatch(block, 100, 156)
    devices = _COMMON_DEVICES.fullmatch(block, 329, 345)
    if common is not None and devices is not None:
        numbers = [int(digits, 8) for digits in common.groups()]
        numbers += [int(digits or b"0", 8) for digits in devices.groups()]
    else:
        numbers = []
        for start, end in _NUMBER_FIELDS:
            found = _OCTAL.fullmatch(block, start, end)
            if found is None:
                return None
            digits = found.group(1)
            numbers.append(int(digits, 8) if digits else 0)
    checksum = numbers.pop(5)
    if checksum != _byte_sum(block) - sum(block[148:156]) + 8 * 0x20:
        return None
    return numbers


def _plain_header(block: bytes) -> tarfile.TarInfo | None:
    """Parse a plain ustar (or v7) header block as :mod:`tarfile` would, a
    fast path for the common case: a member type without extension records,
    every number in octal, the checksum unsigned and right. Anything else
    gives ``None``, and tarfile parses the block itself.
    """
    kind = block[156:157]
    if kind not in _PLAIN_TYPES:
        return None
    numbers = _numbers(block)
    if numbers is None:
        return None
    name = _nts(block[0:100])
    if kind == tarfile.AREGTYPE and name.endswith("/"):
        kind = tarfile.DIRTYPE
    if kind == tarfile.DIRTYPE:
        name = name.rstrip("/")
    prefix = _nts(block[345:500])
    if prefix:
        name = prefix + "/" + name
        if kind == tarfile.DIRTYPE:
            name = name.rstrip("/")
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode, info.uid, info.gid, info.size, info.mtime, info.devmajor, info.devminor = numbers
    info.linkname = _nts(block[157:257])  # user and group names are never used
    return info


def _extended_header(block: bytes, peek: Callable[[int], bytes | None]
                     ) -> tuple[tarfile.TarInfo, int] | None:
    """Parse a PAX ``x`` header and the plain header it extends, as
    tarfile's ``_proc_pax`` would, when they are plain: no ``hdrcharset``,
    no GNU sparse records, a plain header next, all of it in the chunk at hand.

    :returns: the member and the bytes its headers take, or ``None``.
    """
    numbers = _numbers(block)
    if numbers is None:
        return None
    padded = -(-numbers[3] // _BLOCK) * _BLOCK
    whole = peek(_BLOCK + padded + _BLOCK)
    if whole is None:
        return None
    records = whole[_BLOCK:_BLOCK + padded]
    if b"hdrcharset" in records or b"GNU.sparse" in records:
        return None
    info = _plain_header(whole[_BLOCK + padded:])
    if info is None:
        return None
    pax: dict[str, str] = {}
    position = 0
    while True:
        found = _PAX_RECORD.match(records, position)
        if found is None:
            break
        length = int(found.group(1))
        if length == 0:
            return None  # tarfile ends the archive there
        value = records[found.end(2) + 1:found.start(1) + length - 1]
        pax[found.group(2).decode("utf-8", "surrogateescape")] = value.decode(
            "utf-8", "surrogateescape")
        position += length
    opened: Any = info  # tarfile's own override rules: sizes, paths, bad numbers
    opened._apply_pax_info(pax, "utf-8", "surrogateescape")
    return info, _BLOCK + padded + _BLOCK


def _fast_member(peek: Callable[[int], bytes | None]) -> tuple[tarfile.TarInfo, int] | None:
    """The next member and the bytes its headers take, when
    :func:`_plain_header` or :func:`_extended_header` can parse it."""
    block = peek(_BLOCK)
    if block is None:
        return None
    if block[156:157] == tarfile.XHDTYPE:
        return _extended_header(block, peek)
    info = _plain_header(block)
    return None if info is None else (info, _BLOCK)


class _Reader:
    """One pass over a tarball, building a :class:`RootTree`."""

    def __init__(self, tree: RootTree, policy: ArchivePolicy, volatile: Sequence[str],
                 persistent: set[str], stream: TarStream,
                 sink: TreeStream | None = None, keep: bool = True) -> None:
        self.tree = tree
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
        self._spooled = tree._spool.tell()
        self._write = tree._spool.write

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
        self.tree.stream_bytes = stream.total

    def _next(self, archive: tarfile.TarFile) -> tarfile.TarInfo | None:
        """The next member: a plain ustar header is parsed here, anything else
        (PAX and GNU extensions, global headers in force, odd numbers, the
        end of the archive, a header across two chunks) by :mod:`tarfile`."""
        opened: Any = archive  # tarfile's undeclared attributes
        if opened.firstmember is None and not archive.pax_headers:
            stream = self.stream
            found = _fast_member(stream.peek)
            if found is not None:
                info, length = found
                info.offset = stream.tell()
                stream.skip(length)
                info.offset_data = info.offset + length
                archive.offset = info.offset_data
                if info.type in _REGULAR_TYPES:
                    archive.offset += -(-info.size // _BLOCK) * _BLOCK
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
        if self.members > policy.max_members:
            raise UnsafeArchiveError(
                f"more than {policy.max_members} members (ArchivePolicy.max_members)", name)
        try:
            path = _normalize(name, policy)
        except UnsafeArchiveError as exc:
            raise UnsafeArchiveError(str(exc), name) from None
        kind = _FROM_TAR.get(info.type)
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

        # volatile paths, and everything under a dropped directory
        ancestors = list(_ancestors(path))
        if path != "/" and ((self.dropped_dirs and any(a in self.dropped_dirs
                                                       for a in ancestors))
                            or self._is_volatile(path)):
            self.tree.dropped.append(path)
            if kind is EntryType.DIR:
                self.dropped_dirs.add(path)
                if path in self.tree._implied:
                    self._drop_subtree(path)
            else:
                self.dropped_files.add(path)
            self.tree._entries.pop(path, None)
            return

        tree = self.tree
        entries = tree._entries
        if path == "/" and kind is not EntryType.DIR:
            raise UnsafeArchiveError(f"the root of the tree is a {kind.value}", name)
        for ancestor in ancestors:
            found = entries.get(ancestor)
            if found is None:
                continue
            if found.inode.type is EntryType.SYMLINK:
                raise UnsafeArchiveError(
                    f"written through the symlink {ancestor} "
                    f"(-> {found.inode.linkname!r})", name)
            if found.type is not EntryType.DIR:
                raise UnsafeArchiveError(
                    f"its parent {ancestor} is a {found.inode.type.value}, not a directory", name)
        existing = entries.get(path)
        if kind is not EntryType.DIR and (path in tree._implied or (
                existing is not None and existing.type is EntryType.DIR)):
            raise UnsafeArchiveError(
                f"a {kind.value} replaces the directory {path} seen earlier", name)

        mtime = int(info.mtime)
        self.max_mtime = max(self.max_mtime, mtime)
        entry = Entry(path, kind, info.mode & 0o7777, info.uid, info.gid, mtime,
                      xattrs=_xattrs(info, policy, path, tree.notes))
        if kind is EntryType.FILE:
            entry.size = info.size
        elif kind is EntryType.SYMLINK:
            target = info.linkname
            if not target or "\x00" in target:
                raise UnsafeArchiveError("symlink with an empty or NUL target", name)
            if len(_encoded(target)) > policy.max_path_length:
                raise UnsafeArchiveError(
                    f"symlink target longer than {policy.max_path_length} bytes", name)
            entry.linkname = target
        elif kind is EntryType.HARDLINK:
            try:
                target_path = _normalize(info.linkname, policy, "hardlink target")
            except UnsafeArchiveError as exc:
                raise UnsafeArchiveError(str(exc), name) from None
            if target_path in self.dropped_files or any(
                    a in self.dropped_dirs for a in _ancestors(target_path)):
                tree.dropped.append(path)
                tree.notes.append(f"{path}: hardlink to the volatile {target_path} dropped too")
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
            tree._root_seen = True
            return
        sink = self.sink
        send = sink is not None and sink.entry(entry)
        if kind is EntryType.FILE:
            entry._offset = self._spool_content(info, archive, sink if send else None)
            if not self.keep:
                entry._offset = -1
        entries[path] = entry
        tree._implied.update(ancestors)

    def _drop_subtree(self, path: str) -> None:
        """A volatile directory came after members below it: drop those too."""
        prefix = path + "/"
        for below in [p for p in self.tree._entries if p.startswith(prefix)]:
            del self.tree._entries[below]
            self.tree.dropped.append(below)
            self.dropped_files.add(below)

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
        if info.sparse is not None:  # stored dense: tarfile fills the holes
            handle = archive.extractfile(info)
            if handle is None:  # pragma: no cover - regular files always have one
                raise UnsafeArchiveError("no content", info.name)
            remaining = info.size
            while remaining:
                chunk = handle.read(min(_CHUNK, remaining))
                if not chunk:
                    raise UnsafeArchiveError(
                        f"content ends {remaining} bytes early (truncated archive)", info.name)
                write(chunk)
                remaining -= len(chunk)
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

    def finish(self) -> None:
        tree = self.tree
        entries = tree._entries
        root = entries["/"]
        if not tree._root_seen:
            root.mtime = self.max_mtime
        for path in tree.persistent:
            if path not in entries:
                found = [a for a in _ancestors(path) if a in entries
                         and entries[a].type is not EntryType.DIR]
                if found:
                    raise UnsafeArchiveError(
                        f"persistent path {path} cannot be created: {found[0]} is not a "
                        "directory")
                entries[path] = Entry(path, EntryType.DIR, 0o755, mtime=root.mtime)
                tree.notes.append(f"{path}: persistent path missing, created as an empty "
                                  "directory 0755 root:root")
        tree._fill_parents()


def read_tarball(source: str | os.PathLike[str] | BinaryIO,
                 policy: ArchivePolicy | None = None, *,
                 volatile: Sequence[str] = (), persistent: Iterable[str] = (),
                 workdir: str | os.PathLike[str] | None = None,
                 sink: TreeStream | None = None, keep_content: bool = True) -> RootTree:
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
    :returns: the tree; close it when done.
    :raises UnsafeArchiveError: naming the member that breaks the policy, or
        when the archive is malformed.
    """
    policy = policy or ArchivePolicy()
    clean_persistent = set()
    for path in persistent:
        if not path.startswith("/"):
            raise UnsafeArchiveError(f"persistent path {path!r} is not absolute")
        clean_persistent.add(_normalize(path[1:] or ".", policy, "persistent path"))
    owned: IO[bytes] | None = None
    if isinstance(source, (str, os.PathLike)):
        try:
            owned = open(source, "rb")  # noqa: SIM115 - closed in the finally below
        except OSError as exc:
            raise UnsafeArchiveError(f"cannot open tarball {source}: {exc.strerror}") from None
        raw: IO[bytes] = owned
    else:
        raw = source
    # owned by the tree, which closes it
    spool = tempfile.TemporaryFile(dir=workdir, buffering=_SPOOL_BUFFER)  # noqa: SIM115
    tree = RootTree(spool, sorted(clean_persistent))
    tree.kept = keep_content or sink is None
    try:
        head = raw.read(_BLOCK)
        kind = detect_compression(head)
        tree.compression = kind
        with open_stream(kind.value, head, raw, policy) as stream:
            reader = _Reader(tree, policy, volatile, clean_persistent, stream, sink, tree.kept)
            try:
                reader.run()
            except UnsafeArchiveError:
                raise
            except _stream_errors() as exc:
                raise UnsafeArchiveError(f"malformed {kind.value} tar archive: {exc}",
                                         stream.member) from None
        reader.finish()
    except BaseException:
        tree.close()
        raise
    finally:
        if owned is not None:
            owned.close()
    return tree


def image_metadata(*, name: str, version: str | None, digest: str,
                   persistent: Sequence[str]) -> bytes:
    """The image's own description, stored at :data:`METADATA_PATH`.

    :returns: canonical JSON (sorted keys, newline-terminated): ``name``,
        ``version``, ``digest`` (the manifest's) and ``persistent`` (sorted).
    """
    document = {"name": name, "version": version, "digest": digest,
                "persistent": sorted(persistent)}
    return (json.dumps(document, sort_keys=True, indent=2) + "\n").encode("utf-8")

