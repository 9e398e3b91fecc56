"""What a tarball may contain, and how its member names become paths.

:class:`ArchivePolicy` holds every limit :mod:`cloudlets.rootfs` enforces;
:func:`normalize` maps a tar member name to an absolute path inside the image
or refuses it.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass

from cloudlets.errors import UnsafeArchiveError

__all__ = ["ArchivePolicy", "encoded", "normalize", "parent_of", "path_ancestors"]

_KIB = 1024
_MIB = 1024 * _KIB
_GIB = 1024 * _MIB
_CONTROL = re.compile(r"[\x01-\x1f\x7f]")


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
    return path


def parent_of(path: str) -> str:
    return posixpath.dirname(path)


def path_ancestors(path: str) -> Iterator[str]:
    """Yield the ancestors of an absolute path, nearest last, without ``/``."""
    index = path.find("/", 1)
    while index != -1:
        yield path[:index]
        index = path.find("/", index + 1)
