"""The model of one file of the tree: :class:`Entry` and its :class:`EntryType`."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["Entry", "EntryType"]


class EntryType(enum.StrEnum):
    """The kind of a file in the tree."""

    BLOCKDEV = "blockdev"
    CHARDEV = "chardev"
    DIR = "dir"
    FIFO = "fifo"
    FILE = "file"
    HARDLINK = "hardlink"
    SYMLINK = "symlink"


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
