"""What a tarball may contain, and how its member names become paths.

:class:`ArchivePolicy` holds every limit :mod:`cloudlets.rootfs` enforces;
:func:`normalize` maps a tar member name to an absolute path inside the image
or refuses it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from cloudlets.errors import UnsafeArchiveError

__all__ = ["MAX_TIME", "ArchivePolicy", "clamp_time", "encoded", "normalize", "parent_of"]

_KIB = 1024
_MIB = 1024 * _KIB
_GIB = 1024 * _MIB
_CONTROL = re.compile(r"[\x01-\x1f\x7f]")

#: The latest time a member keeps (2106-02-07T06:28:15Z, the largest unsigned
#: 32-bit time): every consumer of the tree can hold it: a ustar header without
#: a PAX record (up to 2242), ext4 with 256-byte inodes (2446), FAT directory
#: entries (2107), the VHD footer (2136). Member times beyond it are clamped to
#: it, times before 1970 to 0.
MAX_TIME = 2**32 - 1


@dataclass(frozen=True)
class ArchivePolicy:
    """What a root filesystem tarball may contain. Every limit is checked while
    streaming, so a bomb fails as soon as it crosses one.

    :ivar max_total_size: bytes the archive may expand to (tar stream, and
        separately the sum of the members' sizes, sparse files counted at
        their declared size, holes included, before any of their content is
        read). The renderer lowers it to the image size a render may make.
    :ivar max_member_size: bytes one member may hold (a sparse member: its
        declared size, holes included).
    :ivar max_members: number of entries: members, and the missing parent
        directories their paths imply.
    :ivar max_compression_ratio: uncompressed bytes per compressed byte, checked
        once ``ratio_grace`` bytes have come out of the decompressor.
    :ivar ratio_grace: uncompressed bytes read before the ratio is enforced.
    :ivar max_members_per_mib: members (implied parents included) per MiB of
        compressed tarball, checked once ``members_grace`` are in: a member
        costs a thousand times what its 512 bytes of header do to inflate,
        so a compressed stream of empty headers is a bomb of its own.
    :ivar members_grace: members read before the density is enforced.
    :ivar max_path_length: bytes in a path (and in a symlink target).
    :ivar max_name_length: bytes in one path component.
    :ivar max_path_depth: components in a path (``/a/b`` has two): every
        component of every member is a directory the tree holds, so this and
        :attr:`max_members` bound the directories one long name can imply.
    :ivar max_metadata_size: bytes of metadata the tree may hold in memory:
        the paths of its entries (implied parents included), symlink targets,
        extended attribute names and values.
    :ivar max_header_size: bytes of tar headers (PAX records, GNU long names,
        sparse maps) one member may bring.
    :ivar allow_sparse: accept sparse members (their holes stay holes in
        the spool; the declared size counts against the size limits).
    :ivar allow_control_characters: accept control characters (newline, tab,
        escape...) in member names; they break line-oriented tools downstream.
    :ivar xattr_prefixes: extended attributes kept; others are dropped and
        noted in :attr:`RootTree.notes`.
    :ivar max_xattr_size: bytes one extended attribute value may hold.
    """

    max_total_size: int = 8 * _GIB
    max_member_size: int = 4 * _GIB
    max_members: int = 1_000_000
    max_compression_ratio: float = 200.0
    ratio_grace: int = 64 * _MIB
    max_members_per_mib: int = 20_000
    members_grace: int = 20_000
    max_path_length: int = 4095
    max_name_length: int = 255
    max_path_depth: int = 256
    max_metadata_size: int = 256 * _MIB
    max_header_size: int = 1 * _MIB
    allow_sparse: bool = True
    allow_control_characters: bool = False
    xattr_prefixes: tuple[str, ...] = ("security.", "trusted.", "user.",
                                       "system.posix_acl_access", "system.posix_acl_default")
    max_xattr_size: int = 64 * _KIB


def encoded(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def normalize(name: str, policy: ArchivePolicy, what: str = "member name") -> str:
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
    if len(encoded(path)) > policy.max_path_length:
        raise UnsafeArchiveError(
            f"{what} longer than {policy.max_path_length} bytes (ArchivePolicy.max_path_length)")
    for part in parts:
        if len(encoded(part)) > policy.max_name_length:
            raise UnsafeArchiveError(
                f"a component of the {what} is longer than {policy.max_name_length} bytes "
                "(ArchivePolicy.max_name_length)")
    if len(parts) > policy.max_path_depth:
        raise UnsafeArchiveError(
            f"{what} is {len(parts)} components deep, more than {policy.max_path_depth} "
            "(ArchivePolicy.max_path_depth)")
    return path


def clamp_time(value: float, name: str) -> int:
    """A member's time as whole seconds within ``0 .. MAX_TIME``.

    :param value: the time as the archive gives it (a PAX record may hold
        any decimal number).
    :param name: the member, for the error.
    :raises UnsafeArchiveError: the time is not a finite number.
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise UnsafeArchiveError(f"malformed time {value!r}: not a finite number", name)
    return min(max(int(value), 0), MAX_TIME)


def parent_of(path: str) -> str:
    """The parent of an absolute, normalized path (``/`` for ``/``): a slice,
    several times faster than :func:`posixpath.dirname`."""
    return path[:path.rfind("/")] or "/"
