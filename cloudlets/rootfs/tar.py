"""The tar codec: the normalized tar's headers, written an order of magnitude
faster than :meth:`tarfile.TarInfo.tobuf`; plain headers parsed faster than
:mod:`tarfile` parses them (anything else is left to it); and :class:`Writer`,
the one buffer the normalized tar goes out through.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import tarfile
import zlib
from collections.abc import Callable, Mapping
from typing import Any

from cloudlets.rootfs.entry import Entry, EntryType

__all__ = ["BLOCK", "COPY_CHUNK", "FROM_TAR", "RECORD", "REGULAR_TYPES", "XATTR_PREFIX",
           "Writer", "byte_sum", "fast_member", "member_header", "pax_member",
           "plain_header"]

_KIB = 1024
_MIB = 1024 * _KIB
BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE
#: Bytes copied at a time where the kernel cannot copy a range.
COPY_CHUNK = _MIB
_WRITE_SIZE = _MIB
_INLINE_SIZE = 64 * _KIB
XATTR_PREFIX = "SCHILY.xattr."

FROM_TAR = {
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
REGULAR_TYPES = frozenset((tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE))
#: Types :func:`plain_header` parses; anything else goes through :mod:`tarfile`.
_PLAIN_TYPES = REGULAR_TYPES | {tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                                 tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE}
TO_TAR = {
    EntryType.FILE: tarfile.REGTYPE,
    EntryType.DIR: tarfile.DIRTYPE,
    EntryType.SYMLINK: tarfile.SYMTYPE,
    EntryType.HARDLINK: tarfile.LNKTYPE,
    EntryType.CHARDEV: tarfile.CHRTYPE,
    EntryType.BLOCKDEV: tarfile.BLKTYPE,
    EntryType.FIFO: tarfile.FIFOTYPE,
}


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
    return b"%s%06o\0%s" % (block[:148], byte_sum(block), block[155:])


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


def pax_member(name: str, kind: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
                *, linkname: str = "", devmajor: int = 0, devminor: int = 0,
                xattrs: Mapping[str, bytes] | None = None) -> bytes:
    """The header blocks of one member of the normalized tar (no content)."""
    records: dict[str, str] = {}
    binary = False
    for xattr, value in sorted((xattrs or {}).items()):
        text = value.decode("utf-8", "surrogateescape")
        records[XATTR_PREFIX + xattr] = text
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
    return extended + payload + bytes(-len(payload) % BLOCK) + header


def member_header(path: str, inode: Entry, source_date_epoch: int | None, *,
                   link_to: str | None = None) -> bytes:
    """The normalized tar header of ``path`` (named ``./path``) whose inode is
    ``inode``; with ``link_to``, a hardlink to that earlier path."""
    name = "." + path if path != "/" else "."
    mtime = max(0, inode.mtime)
    if source_date_epoch is not None:
        mtime = min(mtime, source_date_epoch)
    if link_to is not None:
        return pax_member(name, tarfile.LNKTYPE, inode.mode, inode.uid, inode.gid, 0, mtime,
                           linkname="." + link_to)
    kind = TO_TAR[inode.type]
    return pax_member(
        name + "/" if kind == tarfile.DIRTYPE else name, kind, inode.mode, inode.uid,
        inode.gid, inode.size if inode.type is EntryType.FILE else 0, mtime,
        linkname=inode.linkname if inode.type is EntryType.SYMLINK else "",
        devmajor=inode.devmajor, devminor=inode.devminor, xattrs=inode.xattrs)


class Writer:
    """Writes the normalized tar through one buffer: headers and small files
    are gathered (small files read straight into the buffer), large files
    are copied by the kernel (:func:`os.copy_file_range`). Into a regular
    file, the holes of a large file (a sparse member's, in the spool) stay
    holes: the output is sought over, not written with zeros."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._holes = stat.S_ISREG(os.fstat(fd).st_mode)
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
            if self._holes:
                _copy_sparse_range(src, self._fd, offset, size)
            else:
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
        chunk = os.pread(src, min(COPY_CHUNK, size - done), offset + done)
        if not chunk:
            raise OSError(f"spool file ended {size - done} bytes early")
        os.write(dst, chunk)
        done += len(chunk)


def _copy_sparse_range(src: int, dst: int, offset: int, size: int) -> None:
    """:func:`_copy_range`, seeking ``dst`` over the holes of ``src``."""
    end = offset + size
    position = offset
    while position < end:
        try:
            data = min(os.lseek(src, position, os.SEEK_DATA), end)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # no SEEK_DATA here: copy it all
                _copy_range(src, dst, position, end - position)
                return
            data = end  # only a hole remains
        if data > position:
            os.lseek(dst, data - position, os.SEEK_CUR)
        if data >= end:
            break
        stop = min(os.lseek(src, data, os.SEEK_HOLE), end)
        _copy_range(src, dst, data, stop - data)
        position = stop


# -- parsing headers -----------------------------------------------------------------

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


def byte_sum(data: bytes) -> int:
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
    if checksum != byte_sum(block) - sum(block[148:156]) + 8 * 0x20:
        return None
    return numbers


def plain_header(block: bytes) -> tarfile.TarInfo | None:
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
    padded = -(-numbers[3] // BLOCK) * BLOCK
    whole = peek(BLOCK + padded + BLOCK)
    if whole is None:
        return None
    records = whole[BLOCK:BLOCK + padded]
    if b"hdrcharset" in records or b"GNU.sparse" in records:
        return None
    info = plain_header(whole[BLOCK + padded:])
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
    return info, BLOCK + padded + BLOCK


def fast_member(peek: Callable[[int], bytes | None]) -> tuple[tarfile.TarInfo, int] | None:
    """The next member and the bytes its headers take, when
    :func:`plain_header` or :func:`_extended_header` can parse it."""
    block = peek(BLOCK)
    if block is None:
        return None
    if block[156:157] == tarfile.XHDTYPE:
        return _extended_header(block, peek)
    info = plain_header(block)
    return None if info is None else (info, BLOCK)
