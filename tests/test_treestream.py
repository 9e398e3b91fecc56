"""The tree streamed as a normalized tar while it is read (mke2fs's input on a cold render).

What goes out must be what :meth:`RootTree.write_tar` would write, member for
member, in the tarball's own order with parents first and the root last; a
tree that cannot go out that way is detected (never sent wrong) and says why.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest

from cloudlets.rootfs import METADATA_PATH, RootTree, TreeStream, read_tarball
from tests.test_rootfs import MTIME, D, H, L, M, _mke2fs_reads_tar, build_tar

FULL = [
    D("./"),
    D("./etc"),
    M("./etc/hostname", b"localhost\n"),
    M("./etc/shadow", b"root:*:1::::::\n", mode=0o640, gid=42),
    D("./tmp", mode=0o1777),
    D("./usr"),
    D("./usr/bin"),
    M("./usr/bin/passwd", b"\x7fELF passwd", mode=0o4755),
    M("./usr/bin/ping", b"\x7fELF ping", mode=0o755,
      pax={"SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00",
           "SCHILY.xattr.user.note": "hello"}),
    H("./usr/bin/ping6", "./usr/bin/ping"),
    L("./bin", "usr/bin"),
    D("./dev"),
    M("./dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
    M("./dev/sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660, gid=6),
    M("./dev/initctl", type=tarfile.FIFOTYPE, mode=0o600),
    D("./srv"),
    M("./srv/" + "long-name-" * 15, b"PAX path\n", mtime=MTIME + 50),
    M("./srv/caf\u00e9", b"non-ASCII name\n", uid=100_000, gid=4_000_000_000),
    M("./srv/empty", b""),
    M("./srv/big", os.urandom(3 * 1024 * 1024 + 7)),
]


def stream(members: list[Any], tmp_path: Path, *, epoch: int | None = None,
           **kwargs: Any) -> tuple[RootTree, TreeStream, Path]:
    """Read a tarball, streaming it into a file; the tree gains its metadata file."""
    out = tmp_path / "streamed.tar"
    with out.open("wb") as handle:
        sink = TreeStream(handle.fileno(), source_date_epoch=epoch)
        tree = read_tarball(io.BytesIO(build_tar(members)), sink=sink, **kwargs)
        tree.add_file(METADATA_PATH, b"{}\n")
        sink.close(tree)
    return tree, sink, out


def described(path: Path) -> tuple[list[str], dict[str, tuple[Any, ...]]]:
    """The member names in order, and per path what a filesystem gets from it."""
    order: list[str] = []
    seen: dict[str, tuple[Any, ...]] = {}
    with tarfile.open(path, "r:") as archive:
        for info in archive:
            name = info.name.removeprefix("./").rstrip("/") or "."
            order.append(name)
            content = b""
            if info.islnk():
                target = archive.getmember(info.linkname)
                content = archive.extractfile(target).read()  # type: ignore[union-attr]
            elif info.isreg():
                content = archive.extractfile(info).read()  # type: ignore[union-attr]
            kind = tarfile.REGTYPE if info.islnk() else info.type
            xattrs = {k: v for k, v in info.pax_headers.items() if k.startswith("SCHILY.")}
            seen[name] = (kind, info.mode, info.uid, info.gid, info.mtime, info.linkname
                          if info.issym() else "", info.devmajor, info.devminor, xattrs,
                          content)
    return order, seen


@pytest.mark.parametrize("epoch", [None, MTIME + 10])
def test_stream_sends_what_write_tar_writes(tmp_path: Path, epoch: int | None) -> None:
    tree, sink, out = stream(FULL, tmp_path, epoch=epoch)
    with tree:
        assert sink.broken is None
        written = tree.write_tar(tmp_path / "written.tar", source_date_epoch=epoch)
    order, streamed = described(out)
    _, expected = described(written)
    assert streamed == expected
    assert len(order) == len(set(order)) == len(expected)
    assert order[-1] == "."  # the root last, with its final attributes
    position = {name: index for index, name in enumerate(order)}
    for name in order[:-1]:
        parent = name.rpartition("/")[0]
        assert not parent or position[parent] < position[name], name
    assert sink.position == out.stat().st_size
    assert out.stat().st_size % tarfile.RECORDSIZE == 0


def test_members_keep_the_tarballs_order(tmp_path: Path) -> None:
    members = [D("./"), D("zz"), M("zz/b", b"b"), M("zz/a", b"a"), D("aa"), M("aa/c", b"c")]
    tree, sink, out = stream(members, tmp_path)
    tree.close()
    assert sink.broken is None
    order, _ = described(out)
    assert order == ["zz", "zz/b", "zz/a", "aa", "aa/c", "etc", "etc/cloudlets",
                     "etc/cloudlets/image.json", "."]


@pytest.mark.parametrize(("members", "kwargs", "reason"), [
    ([D("etc"), M("etc/a", b"1"), M("etc/a", b"2")], {}, "/etc/a appears twice in the tarball"),
    ([D("etc"), D("etc"), M("etc/a", b"1")], {}, "/etc appears twice in the tarball"),
    ([M("etc/a", b"1")], {}, "/etc/a comes before its parent directory"),
    ([D("var"), M("var/cache/x", b"x"), D("var/cache")], {"volatile": ["/var/cache$"]},
     "/var/cache/x comes before its parent directory"),
    ([D("etc"), D("etc/cloudlets"), M("etc/cloudlets/image.json", b"old")], {},
     "/etc/cloudlets/image.json changed after it was read"),
], ids=["duplicate-file", "duplicate-dir", "implied-parent", "volatile-after-children",
        "replaced-after-reading"])
def test_a_tree_that_cannot_be_streamed_says_why(tmp_path: Path, members: list[Any],
                                                  kwargs: dict[str, Any], reason: str) -> None:
    tree, sink, _ = stream(members, tmp_path, **kwargs)
    with tree:
        assert sink.broken == reason
        # the tree itself is complete and right: the caller falls back to write_tar
        written = tree.write_tar(tmp_path / "written.tar")
    with tarfile.open(written, "r:") as archive:
        names = archive.getnames()
    assert "./etc/cloudlets/image.json" in names
    if "volatile" in kwargs:
        assert "./var/cache/x" not in names


def test_a_consumer_that_stops_reading_breaks_the_stream_not_the_read(tmp_path: Path) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        sink = TreeStream(write_end)
        with read_tarball(io.BytesIO(build_tar(FULL)), sink=sink) as tree:
            assert tree.read_bytes("/etc/hostname") == b"localhost\n"
            assert sink.close(tree) is not None
        assert sink.broken is not None and "consumer stopped reading" in sink.broken
    finally:
        os.close(write_end)


def _mkfs(image: Path, mib: int, tmp_path: Path) -> Any:
    """``mke2fs -d -`` making a ``mib`` MiB filesystem in ``image``."""
    from cloudlets.disk.ext4 import Ext4Stream

    return Ext4Stream(image, size=mib * 1024 * 1024, uuid="2b5f1c9e-7d1a-4e0b-9c2a-5d6e7f809a1b",
                      hash_seed="6a1d2c3b-4e5f-4a6b-8c7d-9e0f1a2b3c4d", label="root",
                      timestamp=MTIME, workdir=tmp_path / "mkfs")


@pytest.mark.skipif(not _mke2fs_reads_tar(), reason="needs mke2fs >= 1.47.1 and debugfs")
def test_mke2fs_builds_the_filesystem_from_the_stream(tmp_path: Path) -> None:
    from cloudlets.disk.ext4 import TreeEntry

    image = tmp_path / "fs.img"
    mkfs = _mkfs(image, 64, tmp_path)
    sink = TreeStream(mkfs.fd)
    with read_tarball(io.BytesIO(build_tar(FULL)), sink=sink) as tree:
        assert sink.close(tree) is None
        mkfs.finish([TreeEntry(e.path, e.mode, e.uid, e.gid, e.mtime, xattrs=e.xattrs)
                     for e in tree if e.xattrs])

    def debugfs(request: str) -> str:
        return subprocess.run(["debugfs", "-R", request, str(image)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, check=True).stdout

    assert subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True).returncode == 0
    assert debugfs("cat /etc/hostname").endswith("\nlocalhost\n")
    assert "Mode:  04755" in debugfs("stat /usr/bin/passwd")
    notes = debugfs("ea_list /usr/bin/ping")
    assert "security.capability (8) = 01 00 00 02 00 20 00 00" in notes
    assert 'user.note (5) = "hello"' in notes
    ping, ping6 = debugfs("stat /usr/bin/ping"), debugfs("stat /usr/bin/ping6")
    assert ping.split()[1] == ping6.split()[1] and "Links: 2" in ping
    assert "01:03" in debugfs("stat /dev/null")
    assert f"{MTIME:#x}" in debugfs("stat /")


@pytest.mark.skipif(not _mke2fs_reads_tar(), reason="needs mke2fs >= 1.47.1 and debugfs")
def test_mke2fs_failing_midway_is_reported_and_its_image_removed(tmp_path: Path) -> None:
    from cloudlets.errors import DiskError

    image = tmp_path / "fs.img"
    mkfs = _mkfs(image, 8, tmp_path)
    sink = TreeStream(mkfs.fd)
    big = [D("./"), D("srv"), *(M(f"srv/f{i}", os.urandom(1024 * 1024)) for i in range(12))]
    with read_tarball(io.BytesIO(build_tar(big)), sink=sink) as tree:
        sink.close(tree)
    with pytest.raises(DiskError, match=r"(?s)mke2fs failed .*Could not allocate.*"
                                        r"does not fit; raise boot\.root_size"):
        mkfs.finish()
    mkfs.abort()
    assert not image.exists()


def test_content_sent_only_to_the_stream_is_read_back_through_the_reader(
        tmp_path: Path) -> None:
    out = tmp_path / "streamed.tar"
    with out.open("wb") as handle:
        sink = TreeStream(handle.fileno())
        tree = read_tarball(io.BytesIO(build_tar(FULL)), sink=sink, keep_content=False)
        assert sink.close(tree) is None
    with tree:
        assert not tree.kept
        assert os.fstat(tree._spool_fd()).st_size == 0  # nothing spooled beside the stream
        with pytest.raises(ValueError, match="/etc/hostname: the content was streamed"):
            tree.read_bytes("/etc/hostname")
        with pytest.raises(ValueError, match="read the tarball again"):
            tree.write_tar(tmp_path / "again.tar")
        with tarfile.open(out, "r:") as archive:

            def from_stream(path: str, size: int) -> bytes:
                data = archive.extractfile("." + path).read()  # type: ignore[union-attr]
                assert len(data) == size
                return data

            tree.content_reader = from_stream
            assert tree.read_bytes("/etc/hostname") == b"localhost\n"
            assert tree.read_bytes("/usr/bin/ping6") == b"\x7fELF ping"  # via its inode
