"""The ext4 root filesystem: built from a tarball without root, patched in place.

Two ways to populate the filesystem, chosen by the installed e2fsprogs:

``tar``
    e2fsprogs >= 1.47.1 reads the tarball itself (``mke2fs -d tree.tar``) and
    keeps ownership, modes, device nodes, hardlinks and mtimes; it copies only
    the ``security.capability`` extended attribute, so every other xattr is
    set afterwards with a ``debugfs`` script.
``directory``
    older e2fsprogs: the tree is extracted (as the invoking user) into a work
    directory, ``mke2fs -d dir`` copies it, and a ``debugfs`` script then
    restores what an unprivileged extraction loses: owners, modes, mtimes,
    device nodes, FIFOs and xattrs.

Both are deterministic: mke2fs gets its UUID and directory hash seed from the
caller, its clock from ``E2FSPROGS_FAKE_TIME`` and its profile from a file we
write, not from the host's ``/etc/mke2fs.conf``.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import subprocess
import tarfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cloudlets.disk import tarscan
from cloudlets.disk.tools import (
    STDERR_TAIL,
    e2fsprogs_version,
    find_tool,
    finish,
    read_position,
    run,
    start,
    tool_environment,
    unsynced,
)
from cloudlets.errors import DiskError

if TYPE_CHECKING:
    from cloudlets.progress import PartProgress

__all__ = [
    "BLOCK_SIZE",
    "Ext4Stream",
    "TreeEntry",
    "TreeStats",
    "inode_attributes",
    "inode_count",
    "make_ext4",
    "metadata_image",
    "patch_ext4",
    "patched_ranges",
    "populate_method",
    "read_file",
    "root_size_for",
    "scan_tree",
]

#: Filesystem block size in bytes.
BLOCK_SIZE = 4096
#: Bytes per inode on disk.
INODE_SIZE = 256
#: Smallest root filesystem we make (mke2fs needs room for a journal).
MIN_ROOT_SIZE = 64 * 1024 * 1024
#: Extra space over what the tree needs, as a fraction, and a fixed amount.
HEADROOM_FRACTION = 0.25
HEADROOM_BYTES = 64 * 1024 * 1024
#: First e2fsprogs release whose mke2fs populates from a tarball.
TAR_POPULATE_VERSION = (1, 47, 1)

_MIB = 1024 * 1024

#: Features spelled out so the host's mke2fs.conf cannot change them. GRUB 2.06
#: reads all of these; ``metadata_csum_seed`` and ``orphan_file`` are left out
#: for older bootloaders and kernels.
_MKE2FS_PROFILE = """\
[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384

[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,64bit,dir_nlink,extra_isize
\t}
"""

_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_PIPE_SIZE = _MIB

_DEBUGFS_ERROR = r"^(?!debugfs \d)(?!\s*$).+"
_SAFE_NAME = re.compile(r'^[^"\n\\]+$')


@dataclass(frozen=True)
class TreeEntry:
    """What the fix-up scripts need to know about one tar member.

    :ivar path: absolute path inside the filesystem, e.g. ``/usr/bin/ping``.
    :ivar mode: ``st_mode``, with the file type bits.
    :ivar uid: owner.
    :ivar gid: group.
    :ivar mtime: modification time, seconds since the epoch.
    :ivar rdev: ``(major, minor)`` of a device node, else ``None``.
    :ivar xattrs: extended attributes, name to value.
    """

    path: str
    mode: int
    uid: int
    gid: int
    mtime: int
    rdev: tuple[int, int] | None = None
    xattrs: Mapping[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class TreeStats:
    """A summary of a root filesystem tarball, read in one pass over its headers.

    :ivar entries: number of members (inodes plus hardlinks).
    :ivar data_bytes: bytes the regular files, directories and long symlinks
        occupy once rounded up to whole blocks.
    :ivar max_mtime: newest member mtime (a reproducible default clock).
    :ivar xattr_entries: members with extended attributes mke2fs does not copy.
    :ivar paths: every member's absolute path.
    """

    entries: int
    data_bytes: int
    max_mtime: int
    xattr_entries: tuple[TreeEntry, ...]
    paths: frozenset[str] = frozenset()


def _member_path(name: str) -> str:
    """Map a tar member name to an absolute path ("" for the root itself)."""
    parts = [p for p in name.split("/") if p and p != "."]
    if ".." in parts:
        raise DiskError(f"tree tarball member {name!r} escapes the root")
    return "/" + "/".join(parts) if parts else ""


_KINDS = {
    tarscan.REGULAR: stat.S_IFREG,
    tarscan.HARDLINK: stat.S_IFREG,
    tarscan.SYMLINK: stat.S_IFLNK,
    tarscan.CHARDEV: stat.S_IFCHR,
    tarscan.BLOCKDEV: stat.S_IFBLK,
    tarscan.DIRECTORY: stat.S_IFDIR,
    tarscan.FIFO: stat.S_IFIFO,
}


def _entries(tree_tar: Path) -> Iterator[tuple[tarscan.TarHeader, TreeEntry]]:
    """Yield each member of a tree tarball with its :class:`TreeEntry`.

    :raises DiskError: the tarball cannot be read, is compressed, holds a
        member type a filesystem cannot, or lists a child before its parent.
    """
    seen_dirs: set[str] = {""}
    for header in tarscan.iter_headers(tree_tar):
        path = _member_path(header.name)
        parent = path.rsplit("/", 1)[0] if path else ""
        if path and parent not in seen_dirs:
            raise DiskError(
                f"tree tarball {tree_tar}: member {header.name!r} comes before its parent directory"
            )
        kind = _KINDS.get(header.kind)
        if kind is None:
            raise DiskError(
                f"tree tarball {tree_tar}: member {header.name!r} has unsupported "
                f"type {header.kind!r}"
            )
        if kind == stat.S_IFDIR:
            seen_dirs.add(path)
        device = header.kind in (tarscan.CHARDEV, tarscan.BLOCKDEV)
        yield (
            header,
            TreeEntry(
                path=path or "/",
                mode=kind | header.mode,
                uid=header.uid,
                gid=header.gid,
                mtime=header.mtime,
                rdev=(header.devmajor, header.devminor) if device else None,
                xattrs=header.xattrs,
            ),
        )


def _round_block(size: int) -> int:
    return -(-size // BLOCK_SIZE) * BLOCK_SIZE


def scan_tree(tree_tar: Path) -> TreeStats:
    """Read a tree tarball's headers once and summarize what the filesystem needs.

    :param tree_tar: an uncompressed tar, parents before children.
    :returns: the summary.
    :raises DiskError: the tarball is unreadable or badly ordered.
    """
    entries = 0
    data = 0
    max_mtime = 0
    with_xattrs: list[TreeEntry] = []
    paths: set[str] = set()
    for header, entry in _entries(tree_tar):
        entries += 1
        paths.add(entry.path)
        max_mtime = max(max_mtime, entry.mtime)
        if header.kind == tarscan.REGULAR:
            data += _round_block(header.size)
        elif header.kind == tarscan.DIRECTORY or (
            header.kind == tarscan.SYMLINK and len(header.linkname.encode()) >= 60
        ):
            data += BLOCK_SIZE
        if any(name not in ("security.capability",) for name in entry.xattrs):
            with_xattrs.append(entry)
    return TreeStats(
        entries=entries,
        data_bytes=data,
        max_mtime=max_mtime,
        xattr_entries=tuple(with_xattrs),
        paths=frozenset(paths),
    )


def root_size_for(stats: TreeStats) -> int:
    """Size a root filesystem for a tree, with headroom, in whole MiB.

    :param stats: the tree's summary from :func:`scan_tree`.
    :returns: the size in bytes.
    """
    needed = stats.data_bytes + stats.entries * INODE_SIZE * 2
    size = int(needed * (1 + HEADROOM_FRACTION)) + HEADROOM_BYTES
    size = max(size, MIN_ROOT_SIZE)
    return -(-size // _MIB) * _MIB


def inode_count(size: int, stats: TreeStats | None = None) -> int:
    """Inodes for a filesystem: one per 16 KiB, and with ``stats`` at least twice the tree's.

    :param size: filesystem size in bytes.
    :param stats: the tree's summary, if known.
    :returns: the inode count.
    """
    count = max(size // 16384, 1024)
    if stats is not None:
        count = max(count, stats.entries * 2 + 1024)
    return count


def populate_method() -> str:
    """Return how the installed e2fsprogs can populate a filesystem.

    :returns: ``"tar"`` (mke2fs reads the tarball) or ``"directory"``.
    """
    return "tar" if e2fsprogs_version() >= TAR_POPULATE_VERSION else "directory"


def _quote(path: str) -> str:
    """Quote a path for a debugfs script.

    :raises DiskError: the path holds characters debugfs cannot quote.
    """
    if not _SAFE_NAME.match(path):
        raise DiskError(f"debugfs cannot address the path {path!r}")
    return f'"{path}"'


def _debugfs_script(image: str, lines: list[str], workdir: Path, env: Mapping[str, str]) -> None:
    """Run a list of debugfs commands read-write against a filesystem image."""
    if not lines:
        return
    script = workdir / "debugfs.script"
    script.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
    run("debugfs", ["-w", "-f", script, image], env=env, check_stderr=_DEBUGFS_ERROR)


def _xattr_commands(
    entries: tuple[TreeEntry, ...] | list[TreeEntry], workdir: Path, *, skip_caps: bool
) -> list[str]:
    """debugfs ``ea_set`` commands for the given entries (values go through files)."""
    lines: list[str] = []
    values = workdir / "xattrs"
    values.mkdir(exist_ok=True)
    for entry in entries:
        for name, value in sorted(entry.xattrs.items()):
            if skip_caps and name == "security.capability":
                continue
            if not re.fullmatch(r"[A-Za-z0-9_.@:-]+", name):
                raise DiskError(f"cannot set extended attribute {name!r} on {entry.path}")
            value_file = values / f"{len(lines)}"
            value_file.write_bytes(value)
            lines.append(f"ea_set -f {value_file} {_quote(entry.path)} {name}")
    return lines


def make_ext4(
    tree_tar: Path,
    image: Path,
    *,
    size: int,
    uuid: str,
    hash_seed: str,
    label: str,
    timestamp: int,
    workdir: Path,
    offset: int = 0,
    stats: TreeStats | None = None,
    inodes: int | None = None,
    method: str | None = None,
    progress: PartProgress | None = None,
) -> TreeStats:
    """Make an ext4 filesystem holding a tree, without root.

    Its UUID, hash seed and every timestamp mke2fs would take from the clock
    are fixed, so the same inputs give the same bytes. Without ``stats`` (the
    usual case when the size is known up front) mke2fs starts at once and the
    tarball's headers are scanned while it runs; the inode count is then
    derived from the size alone. With ``stats`` it also accounts for the
    number of entries.

    :param tree_tar: the tree as an uncompressed tar, parents before children.
    :param image: with ``offset`` 0, the file to create (replaced if it exists,
        a sparse file of exactly ``size`` bytes); otherwise an existing disk
        image to write the filesystem into at ``offset``.
    :param size: filesystem size in bytes, a multiple of :data:`BLOCK_SIZE`.
    :param uuid: the filesystem UUID.
    :param hash_seed: the directory hash seed (a UUID).
    :param label: the volume label (at most 16 bytes).
    :param timestamp: the clock mke2fs and debugfs see.
    :param workdir: a scratch directory (the ``directory`` method extracts here).
    :param offset: byte offset of the filesystem inside ``image``.
    :param stats: the tree's summary if already computed.
    :param inodes: the inode count; by default :func:`inode_count`.
    :param method: ``"tar"`` or ``"directory"``; by default :func:`populate_method`.
    :param progress: called as ``progress(done, total)`` while mke2fs reads
        the tar (``tar`` method, where ``/proc`` tells how far): ``done`` of
        its ``total`` bytes.
    :returns: the tree's summary.
    :raises DiskError: a tool failed, e.g. the tree does not fit in ``size``;
        the message names mke2fs and quotes its error.
    :raises ConfigurationError: e2fsprogs is not installed.
    """
    _check_label_size(label, size)
    method = method or populate_method()
    workdir.mkdir(parents=True, exist_ok=True)
    env = _mke2fs_environment(timestamp, workdir)
    if offset == 0:
        image.unlink(missing_ok=True)
        with open(image, "wb") as handle:
            handle.truncate(size)
    elif image.stat().st_size < offset + size:
        raise DiskError(f"{image} is too small for a filesystem of {size} bytes at {offset}")

    entries: list[TreeEntry] = []
    if method == "tar":
        source = tree_tar
    elif method == "directory":
        source = workdir / "tree"
        entries = _extract(tree_tar, source)
        stats = stats or scan_tree(tree_tar)
    else:
        raise DiskError(f"unknown populate method {method!r}")

    if inodes is None:
        inodes = inode_count(size, stats)
    args = _mke2fs_args(source, image, size=size, uuid=uuid, hash_seed=hash_seed, label=label,
                        inodes=inodes, offset=offset)
    proc = start("mke2fs", args, env=env)
    follow = None
    if progress is not None and method == "tar":
        tar_size = tree_tar.stat().st_size

        def follow() -> None:
            position = read_position(proc.pid, tree_tar)
            if position is not None:
                progress(position, tar_size)

    try:
        if stats is None:
            stats = scan_tree(tree_tar)  # while mke2fs works
        finish("mke2fs", proc, while_running=follow)
    except DiskError as exc:
        proc.kill()
        proc.wait()
        if stats is None or "mke2fs" not in str(exc):
            raise
        hint = f"{_DOES_NOT_FIT}. " if _full(str(exc)) else ""
        raise DiskError(
            f"{exc} ({hint}root filesystem of {size} bytes, {inodes} inodes, for "
            f"{stats.entries} entries and {stats.data_bytes} bytes of data from {tree_tar})"
        ) from exc

    if method == "tar":
        lines = _xattr_commands(stats.xattr_entries, workdir, skip_caps=True)
    else:
        lines = _fixup_commands(entries, workdir)
    target = f"{image}?offset={offset}" if offset else os.fspath(image)
    _debugfs_script(target, lines, workdir, env)
    return stats


_DOES_NOT_FIT = "the tree does not fit; raise boot.root_size"


def _full(mke2fs_output: str) -> bool:
    """Whether mke2fs failed because the filesystem is full (blocks or inodes)."""
    return re.search(r"Could not allocate|No space left", mke2fs_output) is not None


def _mke2fs_environment(timestamp: int, workdir: Path) -> dict[str, str]:
    """The pinned environment for mke2fs, with our profile written to ``workdir``."""
    profile = workdir / "mke2fs.conf"
    profile.write_text(_MKE2FS_PROFILE)
    return tool_environment(timestamp, profile, e2fsprogs=True)


def _check_label_size(label: str, size: int) -> None:
    if len(label.encode()) > 16:
        raise DiskError(f"ext4 label {label!r} is longer than 16 bytes")
    if size % BLOCK_SIZE:
        raise DiskError(f"root filesystem size {size} is not a multiple of {BLOCK_SIZE}")


def _mke2fs_args(source: str | os.PathLike[str], image: Path, *, size: int, uuid: str,
                 hash_seed: str, label: str, inodes: int, offset: int = 0
                 ) -> list[str | os.PathLike[str]]:
    """mke2fs's arguments. Inode tables are always zeroed (a lazily initialized
    one is flagged so, and the kernel zeroes it at the first mount). The
    journal is zeroed only inside an existing image (offset > 0), which may
    hold old data: a file we just created is sparse and reads as zeros, so
    skipping that write gives the same bytes (checked: same sha256) and saves
    the journal's 32 MiB per GiB, a third of mke2fs's time on the bench."""
    extended = [
        f"hash_seed={hash_seed}",
        "root_owner=0:0",
        "lazy_itable_init=0",
        f"lazy_journal_init={0 if offset else 1}",
        "nodiscard",
    ]
    if offset:
        extended.append(f"offset={offset}")
    return [
        "-q", "-F", "-t", "ext4", "-b", str(BLOCK_SIZE), "-I", str(INODE_SIZE),
        "-N", str(inodes), "-m", "0", "-L", label, "-U", uuid, "-E", ",".join(extended),
        "-d", source, image, str(size // 1024) + "k",
    ]


class Ext4Stream:
    """``mke2fs -d -``: an ext4 filesystem populated from a tar written to a
    pipe while the tree is still being read (the ``tar`` method only).

    Write the normalized tar to :attr:`fd`, then call :meth:`finish`, or
    :meth:`abort` to throw the filesystem away. The parameters are those of
    :func:`make_ext4`; the same tar gives the same bytes as
    :func:`make_ext4` would.

    :raises ConfigurationError: e2fsprogs is not installed.
    :raises DiskError: mke2fs could not be started or cannot read tarballs.
    """

    def __init__(self, image: Path, *, size: int, uuid: str, hash_seed: str, label: str,
                 timestamp: int, workdir: Path, inodes: int | None = None) -> None:
        _check_label_size(label, size)
        if populate_method() != "tar":
            raise DiskError("mke2fs cannot read a tar from a pipe before e2fsprogs "
                            f"{'.'.join(map(str, TAR_POPULATE_VERSION))}")
        workdir.mkdir(parents=True, exist_ok=True)
        self._workdir = workdir
        self._image = image
        self._env = _mke2fs_environment(timestamp, workdir)
        image.unlink(missing_ok=True)
        with open(image, "wb") as handle:
            handle.truncate(size)
        self._size = size
        self._inodes = inode_count(size) if inodes is None else inodes
        args = _mke2fs_args("-", image, size=size, uuid=uuid, hash_seed=hash_seed, label=label,
                            inodes=self._inodes)
        self._stderr = open(workdir / "mke2fs.stderr", "w+b")  # noqa: SIM115 - closed below
        try:
            self._proc = subprocess.Popen(
                [find_tool("mke2fs"), *(os.fspath(arg) for arg in args)], env=self._env,
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._stderr)
        except OSError as exc:
            self._stderr.close()
            raise DiskError(f"mke2fs could not be started: {exc}") from exc
        assert self._proc.stdin is not None
        #: the write end of mke2fs's standard input
        self.fd = self._proc.stdin.fileno()
        try:  # fewer, larger hand-overs to mke2fs (Linux; 64 KiB otherwise)
            fcntl.fcntl(self.fd, _F_SETPIPE_SZ, _PIPE_SIZE)
        except OSError:  # pragma: no cover - above /proc/sys/fs/pipe-max-size
            pass

    def finish(self, xattr_entries: Iterable[TreeEntry] = ()) -> None:
        """Wait for mke2fs, then set the extended attributes it does not copy.

        :param xattr_entries: entries whose xattrs besides
            ``security.capability`` must be set.
        :raises DiskError: mke2fs failed (e.g. the tree does not fit); the
            message quotes its error.
        """
        try:
            self._close_input()
            code = self._proc.wait()
            self._stderr.seek(0)
            output = self._stderr.read().decode("utf-8", "replace").strip()
        finally:
            self._stderr.close()
        if code != 0:
            hint = f" ({_DOES_NOT_FIT})" if _full(output) else ""
            raise DiskError(f"mke2fs failed with exit code {code}: {output[-STDERR_TAIL:]}"
                            f"{hint}; root filesystem of {self._size} bytes, "
                            f"{self._inodes} inodes")
        lines = _xattr_commands(list(xattr_entries), self._workdir, skip_caps=True)
        _debugfs_script(os.fspath(self._image), lines, self._workdir, self._env)

    def abort(self) -> None:
        """Stop mke2fs and remove the image."""
        self._close_input()
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._stderr.close()
        self._image.unlink(missing_ok=True)

    def _close_input(self) -> None:
        stdin = self._proc.stdin
        if stdin is not None and not stdin.closed:
            try:
                stdin.close()
            except OSError:  # BrokenPipe: mke2fs stopped early; wait() says why
                pass


def _extract(tree_tar: Path, target: Path) -> list[TreeEntry]:
    """Extract a tree as the invoking user for ``mke2fs -d dir``.

    Regular files, directories, symlinks, hardlinks and FIFOs (no privilege
    needed) are created; device nodes are left to debugfs. Modes are made owner-accessible so the
    extraction works unprivileged; the real modes are restored by debugfs.

    :returns: every member, for the fix-up script.
    """
    import shutil

    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    entries: list[TreeEntry] = []
    with tarfile.open(tree_tar, "r:") as archive:
        for member, (_, entry) in zip(archive, _entries(tree_tar), strict=True):
            entries.append(entry)
            if entry.path == "/":
                continue
            dest = target / entry.path.lstrip("/")
            if member.isdir():
                dest.mkdir(mode=0o755, exist_ok=True)
            elif member.issym():
                os.symlink(member.linkname, dest)
            elif member.islnk():
                os.link(target / _member_path(member.linkname).lstrip("/"), dest)
            elif member.isfifo():
                os.mkfifo(dest, 0o644)
            elif member.isreg():
                source = archive.extractfile(member)
                if source is None:
                    raise DiskError(f"cannot read {member.name!r} from {tree_tar}")
                with source, open(dest, "wb") as out:
                    while chunk := source.read(1 << 20):
                        out.write(chunk)
                os.chmod(dest, 0o644)
    return entries


def _fixup_commands(entries: list[TreeEntry], workdir: Path) -> list[str]:
    """debugfs commands restoring what an unprivileged extraction lost."""
    lines: list[str] = []
    for entry in entries:
        path = _quote(entry.path)
        if entry.rdev is not None:
            parent, _, name = entry.path.rpartition("/")
            kind = "c" if stat.S_ISCHR(entry.mode) else "b"
            lines.append(f"cd {_quote(parent or '/')}")
            lines.append(f"mknod {_quote(name)} {kind} {entry.rdev[0]} {entry.rdev[1]}")
            lines.append("cd /")
        if not stat.S_ISLNK(entry.mode):
            lines.append(f"sif {path} mode 0{entry.mode:o}")
        lines.append(f"sif {path} uid {entry.uid}")
        lines.append(f"sif {path} gid {entry.gid}")
        for field_name in ("mtime", "atime", "ctime", "crtime"):
            lines.append(f"sif {path} {field_name} @{entry.mtime}")
    lines.extend(_xattr_commands(entries, workdir, skip_caps=False))
    return lines


_STAT_RE = {
    "type": re.compile(r"Type:\s+(\S+)"),
    "mode": re.compile(r"Mode:\s+(0[0-7]+)"),
    "uid": re.compile(r"User:\s+(\d+)"),
    "gid": re.compile(r"Group:\s+(\d+)"),
}


def inode_attributes(image: str, path: str,
                     env: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """Read an inode's type, mode, owner and group with ``debugfs stat``.

    :param image: the filesystem image (``file`` or ``file?offset=N``).
    :param path: absolute path inside the filesystem.
    :param env: debugfs's environment (the caller's if ``None``).
    :returns: ``{"type", "mode", "uid", "gid"}`` as debugfs prints them, or
        ``None`` if the path does not exist.
    :raises DiskError: debugfs failed.
    """
    proc = run("debugfs", ["-R", f"stat {_quote(path)}", image], env=env)
    text = proc.stdout.decode("utf-8", "replace")
    result: dict[str, str] = {}
    for key, pattern in _STAT_RE.items():
        match = pattern.search(text)
        if match is None:
            return None
        result[key] = match.group(1)
    return result


def read_file(image: str | os.PathLike[str], path: str, size: int) -> bytes:
    """Read a regular file out of an ext4 image (``debugfs cat``).

    :param image: the filesystem image (or ``file?offset=N``).
    :param path: absolute path inside the filesystem.
    :param size: the file's expected size.
    :returns: its content.
    :raises DiskError: the file cannot be read, or is not ``size`` bytes long.
    """
    # read only: the fsync debugfs does as it exits would only wait for
    # whatever else the file system is writing back (a head start's copy)
    proc = run("debugfs", ["-R", f"cat {_quote(path)}", image],
               env=unsynced(tool_environment(0, e2fsprogs=True)))
    if len(proc.stdout) != size:
        detail = proc.stderr.decode("utf-8", "replace").strip().splitlines()[-1:]
        raise DiskError(f"cannot read {path} from {image}: {len(proc.stdout)} bytes, "
                        f"expected {size} {' '.join(detail)}".rstrip())
    return proc.stdout


def patch_ext4(
    image: str,
    files: Mapping[str, bytes],
    *,
    timestamp: int,
    workdir: Path,
    sync: bool = True,
) -> None:
    """Replace (or add) files in an ext4 image, keeping each file's mode and owner.

    Each existing file is removed and written anew (``rm`` + ``write``), then
    given the old inode's mode, owner and group and ``timestamp`` as its times.
    A new file gets mode 0644 and root ownership; its parent directory must
    exist. A replaced file loses its extended attributes and its other hard
    links keep the old content.

    :param image: the filesystem image (``file`` or ``file?offset=N`` to patch
        a filesystem inside a disk image).
    :param files: absolute path inside the filesystem -> new content.
    :param timestamp: the files' times, and the clock debugfs sees.
    :param workdir: a scratch directory for the new contents and the script.
    :param sync: let debugfs flush the image to the medium when it exits;
        ``False`` for an intermediate image (see :func:`~cloudlets.disk.tools.unsynced`).
    :raises DiskError: a path is not a regular file, its parent is missing, or
        debugfs failed.
    """
    if not files:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    env = tool_environment(timestamp, e2fsprogs=True)
    if not sync:
        env = unsynced(env)
    lines: list[str] = []
    for index, (raw_path, content) in enumerate(sorted(files.items())):
        path = _member_path(raw_path)
        if not path:
            raise DiskError("cannot patch the root directory as a file")
        attrs = inode_attributes(image, path, env)
        if attrs is None:
            parent = path.rsplit("/", 1)[0] or "/"
            parent_attrs = inode_attributes(image, parent, env)
            if parent_attrs is None or parent_attrs["type"] != "directory":
                raise DiskError(f"cannot add {path}: {parent} is not a directory in the image")
            attrs = {"type": "regular", "mode": "0644", "uid": "0", "gid": "0"}
        elif attrs["type"] != "regular":
            raise DiskError(f"cannot patch {path}: it is a {attrs['type']}, not a regular file")
        else:
            lines.append(f"rm {_quote(path)}")
        source = workdir / f"patch-{index}"
        source.write_bytes(content)
        mode = stat.S_IFREG | int(attrs["mode"], 8)
        parent, _, name = path.rpartition("/")
        lines.append(f"cd {_quote(parent or '/')}")
        lines.append(f"write {source} {_quote(name)}")
        lines.append("cd /")
        lines.append(f"sif {_quote(path)} mode 0{mode:o}")
        lines.append(f"sif {_quote(path)} uid {attrs['uid']}")
        lines.append(f"sif {_quote(path)} gid {attrs['gid']}")
        for field_name in ("mtime", "atime", "ctime", "crtime"):
            lines.append(f"sif {_quote(path)} {field_name} @{timestamp}")
    _debugfs_script(image, lines, workdir, env)


def metadata_image(image: Path, target: Path) -> None:
    """Write ``target``: a sparse file as long as the ext4 ``image`` holding
    only its metadata (superblocks, group descriptors, bitmaps, inode
    tables, directory, extent-tree and xattr blocks), byte for byte at the
    same offsets; file data and free blocks are holes (``e2image -r``).

    A few MiB for a root filesystem of hundreds: :func:`patched_ranges`
    patches a copy of it instead of a copy of the whole filesystem.

    :raises DiskError: e2image failed.
    """
    target.unlink(missing_ok=True)
    run("e2image", ["-r", image, target], env=tool_environment(0, e2fsprogs=True))
    if target.stat().st_size != image.stat().st_size:
        raise DiskError(f"e2image wrote {target.stat().st_size} bytes for the "
                        f"{image.stat().st_size} of {image.name}")


def patched_ranges(metadata: Path, files: Mapping[str, bytes], *, timestamp: int,
                   workdir: Path) -> tuple[Path, list[tuple[int, int]]]:
    """Patch ``files`` (as :func:`patch_ext4`) into a copy of a filesystem's
    :func:`metadata_image` and say which bytes the patch changed.

    debugfs reads only metadata to remove, write and re-own files, so on the
    metadata copy it writes exactly what it would write on a full copy of
    the filesystem: the same metadata blocks changed the same way, and the
    new content in the same newly allocated blocks. The filesystem patched
    is therefore the base filesystem with the returned ranges taken from the
    returned file: a block is changed when it was a hole in ``metadata`` and
    holds data now (written by the patch, even with zeros), or differs from
    ``metadata``.

    :returns: the patched copy and the changed ``[start, end)`` byte ranges,
        sorted, in 4 KiB blocks.
    :raises DiskError: as :func:`patch_ext4`.
    """
    from cloudlets.sparse import copy_sparse, data_ranges, merge_ranges

    workdir.mkdir(parents=True, exist_ok=True)
    patched = workdir / "root-patch.raw"
    patched.unlink(missing_ok=True)
    copy_sparse(metadata, patched, error=DiskError)
    patch_ext4(str(patched), files, timestamp=timestamp, workdir=workdir / "script",
               sync=False)
    changed: list[tuple[int, int]] = []
    size = patched.stat().st_size
    with open(metadata, "rb") as old, open(patched, "rb") as new:
        ofd, nfd = old.fileno(), new.fileno()
        known = data_ranges(ofd)
        for start, end in data_ranges(nfd):
            start -= start % BLOCK_SIZE
            end = -(-end // BLOCK_SIZE) * BLOCK_SIZE
            while start < end:
                # Compared a run of blocks at a time (the patch leaves all but
                # a few of the metadata's some 2,000 runs as they were), block
                # by block only where a run differs.
                data = os.pread(nfd, min(_COMPARE_RUN, end - start), start)
                if not data:
                    break
                if not (_covered(known, start, start + len(data))
                        and os.pread(ofd, len(data), start) == data):
                    view = memoryview(data)
                    for offset in range(0, len(data), BLOCK_SIZE):
                        block = start + offset
                        piece = view[offset:offset + BLOCK_SIZE]
                        if not _inside(known, block) or os.pread(ofd, len(piece),
                                                                 block) != piece:
                            changed.append((block, min(block + BLOCK_SIZE, size)))
                start += len(data)
    return patched, merge_ranges(changed)


#: Bytes of the patched metadata compared at once (:func:`patched_ranges`).
_COMPARE_RUN = 1 << 20


def _inside(ranges: list[tuple[int, int]], offset: int) -> bool:
    """Whether ``offset`` falls in one of the sorted ``ranges``."""
    return _covered(ranges, offset, offset + 1)


def _covered(ranges: list[tuple[int, int]], start: int, end: int) -> bool:
    """Whether one of the sorted, disjoint ``ranges`` holds all of ``[start, end)``."""
    import bisect

    index = bisect.bisect_right(ranges, (start, float("inf"))) - 1
    return index >= 0 and ranges[index][0] <= start and end <= ranges[index][1]
