"""The tarball reader, the tree model and the normalized tar it writes.

Every tarball is built here with :mod:`tarfile`; nothing binary is committed.
The builders are shared with the hostile-corpus, volatile and template tests.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import tarfile
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from cloudlets.errors import UnsafeArchiveError
from cloudlets.rootfs import (
    METADATA_PATH,
    ArchivePolicy,
    Compression,
    EntryType,
    RootTree,
    detect_compression,
    image_metadata,
    read_tarball,
    tar,
)
from cloudlets.rootfs import reader as tar_reader
from cloudlets.rootfs import stream as tar_stream

MTIME = 1_700_000_000


@dataclass
class M:
    """One member to put in a test tarball."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    linkname: str = ""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: int = MTIME
    devmajor: int = 0
    devminor: int = 0
    pax: dict[str, str] = field(default_factory=dict)
    uname: str = ""


def D(name: str, mode: int = 0o755, **kwargs: object) -> M:
    """A directory member."""
    return M(name, type=tarfile.DIRTYPE, mode=mode, **kwargs)  # type: ignore[arg-type]


def L(name: str, target: str, **kwargs: object) -> M:
    """A symlink member."""
    return M(name, type=tarfile.SYMTYPE, linkname=target, mode=0o777,
             **kwargs)  # type: ignore[arg-type]


def H(name: str, target: str) -> M:
    """A hardlink member."""
    return M(name, type=tarfile.LNKTYPE, linkname=target)


def build_tar(members: Sequence[M], fmt: int = tarfile.PAX_FORMAT,
              global_pax: dict[str, str] | None = None) -> bytes:
    """An uncompressed tarball holding ``members`` in order."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt,
                      pax_headers=global_pax or {}) as archive:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.type = member.type
            info.linkname = member.linkname
            info.mode = member.mode
            info.uid, info.gid = member.uid, member.gid
            info.uname = info.gname = member.uname
            info.mtime = member.mtime
            info.devmajor, info.devminor = member.devmajor, member.devminor
            info.pax_headers = dict(member.pax)
            if member.type in (tarfile.REGTYPE, tarfile.AREGTYPE):
                info.size = len(member.data)
                archive.addfile(info, io.BytesIO(member.data))
            else:
                archive.addfile(info)
    return buf.getvalue()


def compress(data: bytes, kind: Compression) -> bytes:
    """``data`` compressed the given way."""
    if kind is Compression.GZIP:
        return gzip.compress(data, mtime=0)
    if kind is Compression.XZ:
        return lzma.compress(data)
    if kind is Compression.BZIP2:
        return bz2.compress(data)
    if kind is Compression.ZSTD:
        return zstandard.ZstdCompressor().compress(data)
    return data


def read(members: Sequence[M], policy: ArchivePolicy | None = None, **kwargs: object) -> RootTree:
    """Build and read a tarball in memory."""
    return read_tarball(io.BytesIO(build_tar(members)), policy, **kwargs)  # type: ignore[arg-type]


def members_of(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path, "r:") as archive:
        return archive.getmembers()


SAMPLE = [
    D("./"),
    D("./etc"),
    M("./etc/hostname", b"localhost\n"),
    M("./etc/shadow", b"root:*:1::::::\n", mode=0o640, gid=42),
    D("./tmp", mode=0o1777),
    D("./usr/bin"),
    M("./usr/bin/passwd", b"\x7fELF passwd", mode=0o4755),
    M("./usr/bin/wall", b"\x7fELF wall", mode=0o2755, gid=5),
    M("./usr/bin/ping", b"\x7fELF ping", mode=0o755,
      pax={"SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00"}),
    H("./usr/bin/ping6", "./usr/bin/ping"),
    L("./bin", "usr/bin"),
    L("./etc/localtime", "/usr/share/zoneinfo/UTC"),
    M("./dev/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
    M("./dev/sda", type=tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660, gid=6),
    M("./run/initctl", type=tarfile.FIFOTYPE, mode=0o600),
    M("./home/user/.profile", b"export A=1\n", uid=1000, gid=1000),
    M("./srv/big-ids", b"x", uid=100_000, gid=4_000_000_000),
]


# -- compression -------------------------------------------------------------


@pytest.mark.parametrize("kind", list(Compression))
def test_every_compression_is_read_by_its_magic_bytes(tmp_path: Path, kind: Compression) -> None:
    # a misleading file name: detection must not look at it
    path = tmp_path / "rootfs.txt"
    path.write_bytes(compress(build_tar(SAMPLE), kind))
    with read_tarball(path) as tree:
        assert tree.compression is kind
        assert tree.read_bytes("/etc/hostname") == b"localhost\n"
        assert tree["/usr/bin/passwd"].mode == 0o4755


def test_detect_compression_rejects_unknown_formats() -> None:
    with pytest.raises(UnsafeArchiveError, match="lz4"):
        detect_compression(b"\x04\x22\x4d\x18" + b"\0" * 100)
    with pytest.raises(UnsafeArchiveError, match="not a tar archive"):
        detect_compression(b"PK\x03\x04" + b"junk" * 200)
    with pytest.raises(UnsafeArchiveError, match="empty"):
        detect_compression(b"")


@pytest.mark.parametrize("kind", list(Compression))
def test_the_disk_stage_refuses_what_the_reader_decompresses(tmp_path: Path,
                                                             kind: Compression) -> None:
    # one place knows the magic bytes: the tree scanner asks the stream module
    from cloudlets.disk.tarscan import iter_headers
    from cloudlets.errors import DiskError

    head = compress(build_tar(SAMPLE), kind)
    found = tar_stream.compression_of(head[:6])
    assert found is (None if kind is Compression.NONE else kind)
    path = tmp_path / "tree.tar"
    path.write_bytes(head)
    if kind is Compression.NONE:
        assert any(header.name for header in iter_headers(path))
    else:
        with pytest.raises(DiskError, match="is compressed"):
            list(iter_headers(path))


def test_concatenated_zstd_frames_are_read_across(tmp_path: Path) -> None:
    data = build_tar(SAMPLE)
    half = len(data) // 2
    framed = zstandard.ZstdCompressor().compress(data[:half]) + \
        zstandard.ZstdCompressor().compress(data[half:])
    with read_tarball(io.BytesIO(framed)) as tree:
        assert tree.read_bytes("/home/user/.profile") == b"export A=1\n"


# -- the model ---------------------------------------------------------------


def test_model_keeps_every_attribute_faithfully() -> None:
    with read(SAMPLE) as tree:
        assert tree["/tmp"].mode == 0o1777
        assert tree["/usr/bin/passwd"].mode == 0o4755
        assert tree["/usr/bin/wall"].mode == 0o2755
        assert (tree["/etc/shadow"].mode, tree["/etc/shadow"].gid) == (0o640, 42)
        assert (tree["/srv/big-ids"].uid, tree["/srv/big-ids"].gid) == (100_000, 4_000_000_000)
        assert tree["/etc/hostname"].mtime == MTIME
        assert tree["/etc/hostname"].size == len(b"localhost\n")
        null = tree["/dev/null"]
        assert (null.type, null.devmajor, null.devminor, null.mode) == \
            (EntryType.CHARDEV, 1, 3, 0o666)
        assert (tree["/dev/sda"].type, tree["/dev/sda"].devmajor) == (EntryType.BLOCKDEV, 8)
        assert tree["/run/initctl"].type is EntryType.FIFO
        assert tree["/bin"].type is EntryType.SYMLINK
        assert tree["/bin"].linkname == "usr/bin"
        # absolute symlinks are kept as they are: resolved inside the image only
        assert tree["/etc/localtime"].linkname == "/usr/share/zoneinfo/UTC"
        ping6 = tree["/usr/bin/ping6"]
        assert ping6.type is EntryType.HARDLINK and ping6.linkname == "/usr/bin/ping"
        assert ping6.is_regular and ping6.inode is tree["/usr/bin/ping"]
        assert tree["/usr/bin/ping"].capabilities == b"\x01\x00\x00\x02\x00\x20\x00\x00"
        assert tree.read_bytes("/usr/bin/ping6") == b"\x7fELF ping"


def test_libarchive_xattrs_are_read_too() -> None:
    tree = read([M("f", b"x", pax={"LIBARCHIVE.xattr.user.comment": "aGVsbG8",
                                   "LIBARCHIVE.xattr.user.with%20space": "AAE"})])
    with tree:
        assert tree["/f"].xattrs == {"user.comment": b"hello", "user.with space": b"\x00\x01"}


def test_dot_slash_and_bare_names_are_the_same_paths() -> None:
    with read([D("."), M("./a", b"1"), M("b", b"2"), M(".//c/./d", b"3")]) as tree:
        assert {e.path for e in tree} == {"/", "/a", "/b", "/c", "/c/d"}


def test_duplicates_later_member_replaces_earlier() -> None:
    with read([M("etc/motd", b"old", mode=0o600), M("etc/motd", b"new", mode=0o644),
               D("etc", mode=0o700), D("etc", mode=0o755, uid=3)]) as tree:
        assert tree.read_bytes("/etc/motd") == b"new"
        assert tree["/etc/motd"].mode == 0o644
        assert (tree["/etc"].mode, tree["/etc"].uid) == (0o755, 3)


def test_a_directory_may_replace_a_file_or_symlink() -> None:
    with read([M("a", b"x"), D("a"), M("a/b", b"y"), L("c", "/x"), D("c"), M("c/d")]) as tree:
        assert tree["/a"].type is EntryType.DIR and tree["/c"].type is EntryType.DIR
        assert tree.read_bytes("/a/b") == b"y"


def test_hardlink_keeps_the_content_it_was_made_with() -> None:
    # tar semantics: replacing the link's target later does not change the link
    with read([M("a", b"first"), H("b", "a"), M("a", b"second")]) as tree:
        assert tree.read_bytes("/b") == b"first"
        assert tree.read_bytes("/a") == b"second"


def test_resolve_follows_symlinks_inside_the_image_only() -> None:
    members = [D("usr/lib"), M("usr/lib/os-release", b"ID=test\n"), L("lib", "/usr/lib"),
               L("etc/os-release", "../lib/os-release"), L("loop1", "loop2"),
               L("loop2", "loop1"), L("up", "../../../../../usr")]
    with read(members) as tree:
        found = tree.resolve("/etc/os-release")
        assert found is not None and found.path == "/usr/lib/os-release"
        up = tree.resolve("/up/lib/os-release")
        assert up is not None and up.path == "/usr/lib/os-release"  # '..' stops at the root
        assert tree.resolve("/loop1") is None
        assert tree.resolve("/etc/passwd") is None  # present on the host, not in the image
        assert tree.resolve("/usr/lib/os-release/x") is None


def test_read_bytes_and_set_content_refuse_non_files() -> None:
    with read(SAMPLE) as tree:
        with pytest.raises(ValueError, match="not a regular file"):
            tree.read_bytes("/dev/null")
        with pytest.raises(ValueError, match="not a regular file"):
            tree.set_content("/bin", b"x")
        with pytest.raises(KeyError):
            tree.set_content("/nope", b"x")
        with pytest.raises(ValueError, match="more than"):
            tree.read_bytes("/etc/hostname", limit=3)


def test_spool_lives_in_workdir_and_leaves_nothing(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    tree = read_tarball(io.BytesIO(build_tar(SAMPLE)), workdir=work)
    assert list(work.iterdir()) == []  # an anonymous, already unlinked spool
    tree.close()
    assert list(work.iterdir()) == []


def test_read_tarball_reports_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UnsafeArchiveError, match="cannot open"):
        read_tarball(tmp_path / "absent.tar")


# -- the normalized tar ------------------------------------------------------


def test_write_tar_is_sorted_pax_numeric_and_parents_first(tmp_path: Path) -> None:
    with read(SAMPLE) as tree:
        out = tree.write_tar(tmp_path / "tree.tar")
    members = members_of(out)
    names = [m.name for m in members]
    assert names[0] == "."
    assert all(n == "." or n.startswith("./") for n in names)
    paths = [n[1:] or "/" for n in names]
    assert paths == sorted(paths, key=lambda p: p.encode())
    seen = set()
    for member in members:
        path = member.name[1:] or "/"
        parent = os.path.dirname(path)
        assert path == "/" or parent in seen, f"{path} before its parent"
        if member.isdir():
            seen.add(path)
        assert member.uname == "" and member.gname == ""
    with out.open("rb") as handle:
        assert handle.read()[:512].find(b"ustar\x0000") == 257
    by_name = {m.name: m for m in members}
    assert by_name["./usr/bin/passwd"].mode == 0o4755
    assert by_name["./srv/big-ids"].gid == 4_000_000_000
    assert by_name["./dev/null"].devmajor == 1 and by_name["./dev/null"].devminor == 3
    assert by_name["./etc/localtime"].linkname == "/usr/share/zoneinfo/UTC"
    assert by_name["./usr/bin/ping"].pax_headers["SCHILY.xattr.security.capability"] \
        .encode("utf-8", "surrogateescape") == b"\x01\x00\x00\x02\x00\x20\x00\x00"
    assert by_name["./usr/bin/ping6"].islnk()
    assert by_name["./usr/bin/ping6"].linkname == "./usr/bin/ping"
    assert out.stat().st_size % tarfile.RECORDSIZE == 0


def test_missing_parents_are_synthesized_root_owned(tmp_path: Path) -> None:
    with read([M("a/b/c", b"x", uid=7, gid=7)]) as tree:
        assert any("/a/b: missing parent" in note for note in tree.notes)
        out = tree.write_tar(tmp_path / "t.tar")
    by_name = {m.name: m for m in members_of(out)}
    for name in ("./a", "./a/b"):
        assert by_name[name].isdir()
        assert (by_name[name].mode, by_name[name].uid, by_name[name].gid) == (0o755, 0, 0)


def test_hardlink_sorted_before_its_target_is_reelected(tmp_path: Path) -> None:
    # "z/data" is the original, "a/link" sorts first: it must carry the content
    with read([M("z/data", b"payload", mode=0o600, uid=9), H("a/link", "z/data")]) as tree:
        out = tree.write_tar(tmp_path / "t.tar")
    with tarfile.open(out) as archive:
        first = archive.getmember("./a/link")
        assert first.isfile() and (first.mode, first.uid) == (0o600, 9)
        second = archive.getmember("./z/data")
        assert second.islnk() and second.linkname == "./a/link"
        extracted = archive.extractfile(first)
        assert extracted is not None and extracted.read() == b"payload"


def test_output_is_reproducible_whatever_the_input_order(tmp_path: Path) -> None:
    reordered = list(reversed(SAMPLE[1:]))
    # the hardlink must still follow its target
    reordered.remove(SAMPLE[9])
    reordered.append(SAMPLE[9])
    with read(SAMPLE) as one, read([SAMPLE[0], *reordered]) as two:
        a = one.write_tar(tmp_path / "a.tar", source_date_epoch=MTIME)
        b = two.write_tar(tmp_path / "b.tar", source_date_epoch=MTIME)
    assert a.read_bytes() == b.read_bytes()


def test_source_date_epoch_clamps_mtimes(tmp_path: Path) -> None:
    with read([M("old", b"", mtime=100), M("new", b"", mtime=MTIME + 5000)]) as tree:
        out = tree.write_tar(tmp_path / "t.tar", source_date_epoch=MTIME)
    mtimes = {m.name: m.mtime for m in members_of(out)}
    assert mtimes["./old"] == 100 and mtimes["./new"] == MTIME


def test_replacements_keep_mode_owner_and_hardlinks(tmp_path: Path) -> None:
    members = [M("etc/hostname", b"{{ hostname }}\n", mode=0o640, uid=0, gid=4),
               H("etc/hostname.link", "etc/hostname")]
    with read(members) as tree:
        out = tree.write_tar(tmp_path / "t.tar", replacements={"/etc/hostname": b"web-1\n"})
    with tarfile.open(out) as archive:
        info = archive.getmember("./etc/hostname")
        assert (info.mode, info.gid, info.size) == (0o640, 4, 6)
        handle = archive.extractfile(info)
        assert handle is not None and handle.read() == b"web-1\n"
        assert archive.getmember("./etc/hostname.link").linkname == "./etc/hostname"


def test_replacement_of_a_non_file_is_refused(tmp_path: Path) -> None:
    with read(SAMPLE) as tree, pytest.raises(ValueError, match="not a regular file"):
        tree.write_tar(tmp_path / "t.tar", replacements={"/dev/null": b"x"})


def test_image_metadata_file(tmp_path: Path) -> None:
    with read([D("var/log")], persistent=["/var/log", "/srv/data"]) as tree:
        assert tree.persistent == ["/srv/data", "/var/log"]
        assert tree["/srv/data"].type is EntryType.DIR  # created for the volume
        tree.add_file(METADATA_PATH, image_metadata(
            name="tiny", version="1.0", digest="ab" * 32, persistent=tree.persistent))
        out = tree.write_tar(tmp_path / "t.tar")
    with tarfile.open(out) as archive:
        handle = archive.extractfile("./etc/cloudlets/image.json")
        assert handle is not None
        text = handle.read().decode()
    assert '"persistent": [\n    "/srv/data",\n    "/var/log"\n  ]' in text
    assert '"name": "tiny"' in text


def test_add_file_refuses_unclean_paths_and_symlinked_parents() -> None:
    with read(SAMPLE) as tree:
        for bad in ("relative", "/a/../b", "/"):
            with pytest.raises(ValueError, match="clean absolute"):
                tree.add_file(bad, b"")
        with pytest.raises(ValueError, match="symlink"):
            tree.add_file("/bin/evil", b"")
        with pytest.raises(ValueError, match="directory"):
            tree.add_file("/etc", b"")


# -- streaming ----------------------------------------------------------------


def test_reading_streams_with_constant_memory(tmp_path: Path) -> None:
    big = os.urandom(1024 * 1024) * 48  # 48 MiB, compressible only by dedup windows
    members = [D("data"), M("data/big.bin", big)]
    members += [M(f"data/small/{n:05d}", b"s" * (n % 700)) for n in range(3000)]
    path = tmp_path / "big.tar.zst"
    path.write_bytes(zstandard.ZstdCompressor(level=1).compress(build_tar(members)))
    del big
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with read_tarball(path) as tree:
            assert len(tree) == 3000 + 4
            peak = tracemalloc.get_traced_memory()[1]
            out = tree.write_tar(tmp_path / "tree.tar")
    finally:
        tracemalloc.stop()
    elapsed = time.perf_counter() - started
    assert peak < 16 * 1024 * 1024, f"peak {peak} bytes while reading"
    assert out.stat().st_size > 48 * 1024 * 1024
    assert elapsed < 30


def test_binary_names_and_xattr_values_survive_the_round_trip(tmp_path: Path) -> None:
    name = b"srv/caf\xe9-latin1".decode("utf-8", "surrogateescape")
    value = b"\x01\x00\x00\x02\xff\xfe\x00\x80"
    members = [M(name, b"x"),
               M("bin/ping", b"y",
                 pax={"SCHILY.xattr.security.capability": value.decode("utf-8",
                                                                       "surrogateescape")})]
    with read(members) as tree:
        assert "/" + name in tree
        assert tree["/bin/ping"].capabilities == value
        out = tree.write_tar(tmp_path / "t.tar")
    with read_tarball(out) as again:
        assert "/" + name in again
        assert again["/bin/ping"].capabilities == value


def _mke2fs_reads_tar() -> bool:
    import re
    import shutil
    import subprocess

    if shutil.which("mke2fs") is None or shutil.which("debugfs") is None:
        return False
    banner = subprocess.run(["mke2fs", "-V"], capture_output=True, text=True).stderr
    found = re.search(r"mke2fs (\d+)\.(\d+)\.(\d+)", banner)
    return found is not None and tuple(map(int, found.groups())) >= (1, 47, 1)


@pytest.mark.skipif(not _mke2fs_reads_tar(), reason="needs mke2fs >= 1.47.1 and debugfs")
def test_mke2fs_builds_the_filesystem_from_the_normalized_tar(tmp_path: Path) -> None:
    import subprocess

    with read([*SAMPLE, M("z/data", b"payload"), H("a/link", "z/data")]) as tree:
        out = tree.write_tar(tmp_path / "tree.tar", replacements={"/etc/hostname": b"web-1\n"})
    image = tmp_path / "fs.img"
    with image.open("wb") as handle:
        handle.truncate(64 * 1024 * 1024)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-O", "ext_attr", "-d", str(out),
                    str(image)], check=True)

    def debugfs(request: str) -> str:
        return subprocess.run(["debugfs", "-R", request, str(image)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, check=True).stdout

    assert debugfs("cat /etc/hostname").endswith("\nweb-1\n")  # after debugfs's banner
    assert "Mode:  04755" in debugfs("stat /usr/bin/passwd")
    ids = debugfs("stat /srv/big-ids").split()
    assert ids[ids.index("User:") + 1] == "100000"
    # debugfs prints a 32-bit gid signed
    assert int(ids[ids.index("Group:") + 1]) % 2**32 == 4_000_000_000
    assert "security.capability (8) = 01 00 00 02 00 20 00 00" in \
        debugfs("ea_list /usr/bin/ping")
    assert "01:03" in debugfs("stat /dev/null")
    link, data = debugfs("stat /a/link"), debugfs("stat /z/data")
    assert link.split()[1] == data.split()[1]  # the same inode
    assert "Links: 2" in link


# -- the fast paths: the same results as tarfile's, whatever the chunking ------

_PLAIN_KINDS = [tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE, tarfile.DIRTYPE,
                tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE,
                tarfile.FIFOTYPE]
_names = st.text(st.characters(codec="utf-8") | st.sampled_from("/./é"), max_size=90)


@st.composite
def _header_blocks(draw: st.DrawFn) -> bytes:
    """A ustar, GNU or v7-ish header block, sometimes damaged in its numbers."""
    info = tarfile.TarInfo(draw(_names))
    info.type = draw(st.sampled_from(_PLAIN_KINDS))
    info.mode = draw(st.integers(0, 0o7777))
    info.uid, info.gid = draw(st.integers(0, 8**7 - 1)), draw(st.integers(0, 8**7 - 1))
    info.size = draw(st.integers(0, 8**11 - 1))
    info.mtime = draw(st.integers(0, 8**11 - 1))
    info.linkname = draw(_names)
    info.devmajor, info.devminor = draw(st.integers(0, 4095)), draw(st.integers(0, 2**20 - 1))
    fmt = draw(st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]))
    try:
        block = bytearray(info.tobuf(fmt, "utf-8", "surrogateescape")[-512:])
    except ValueError:  # a name ustar cannot split
        block = bytearray(tarfile.TarInfo("x").tobuf(fmt)[-512:])
    for _ in range(draw(st.integers(0, 3))):
        where = draw(st.sampled_from([100, 107, 108, 124, 130, 135, 136, 148, 150, 154, 155,
                                      156, 329, 336, 337, 345, 400, 0, 99]))
        block[where] = draw(st.sampled_from(b" \0 0789-+_xe\x80\xff"))
    return bytes(block)


@settings(max_examples=400, deadline=None)
@given(block=_header_blocks())
def test_plain_header_parses_as_tarfile_does(block: bytes) -> None:
    ours = tar.plain_header(block)
    try:
        theirs = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        assert ours is None  # tarfile refuses it (or ends the archive there): so do we
        return
    if ours is None:
        return  # left to tarfile
    if theirs.isdir():
        theirs.name = theirs.name.rstrip("/")  # as its _proc_builtin does
    fields = ("name", "type", "mode", "uid", "gid", "size", "mtime", "linkname", "devmajor",
              "devminor", "sparse", "pax_headers")
    assert [getattr(ours, f) for f in fields] == [getattr(theirs, f) for f in fields]


@given(st.binary(min_size=512, max_size=512))
def test_byte_sum_is_the_sum_of_the_bytes(block: bytes) -> None:
    assert tar.byte_sum(block) == sum(block)


_raw_names = st.binary(min_size=1, max_size=130).map(
    lambda raw: raw.replace(b"\0", b"x").decode("utf-8", "surrogateescape"))


@settings(max_examples=300, deadline=None)
@given(name=_raw_names, linkname=_raw_names,
       kind=st.sampled_from(_PLAIN_KINDS[:1] + _PLAIN_KINDS[3:]),
       mode=st.integers(0, 0o7777), uid=st.integers(0, 2**32 - 2), gid=st.integers(0, 2**32 - 2),
       size=st.integers(0, 2**40), mtime=st.integers(0, 2**40), devmajor=st.integers(0, 4095),
       devminor=st.integers(0, 2**20 - 1),
       xattrs=st.dictionaries(st.sampled_from(["user.a", "security.capability", "user.é"]),
                              st.binary(max_size=40), max_size=3))
def test_header_writer_writes_what_tarfile_writes(
        name: str, linkname: str, kind: bytes, mode: int, uid: int, gid: int, size: int,
        mtime: int, devmajor: int, devminor: int, xattrs: dict[str, bytes]) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, mtime
    info.size, info.linkname = size, linkname
    info.devmajor, info.devminor = devmajor, devminor
    info.uname = info.gname = ""
    info.pax_headers = {"SCHILY.xattr." + key: value.decode("utf-8", "surrogateescape")
                        for key, value in sorted(xattrs.items())}
    if kind == tarfile.DIRTYPE and not name.endswith("/"):
        name += "/"  # tarfile adds it; write_tar does
    ours = tar.pax_member(name, kind, mode, uid, gid, size, mtime, linkname=linkname,
                          devmajor=devmajor, devminor=devminor, xattrs=xattrs)
    assert ours == info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _chunky_members() -> list[M]:
    rng = __import__("random").Random(7)
    members: list[M] = [D("./"), *SAMPLE[1:]]
    for n in range(120):
        members.append(M(f"./data/{n:03d}/" + "n" * (n % 140), rng.randbytes(n * 37 % 3000)))
    members.append(M("./srv/" + "é" * 70, b"long name"))
    return members


@pytest.mark.parametrize("kind", [Compression.NONE, Compression.GZIP, Compression.XZ,
                                  Compression.ZSTD])
def test_chunk_boundaries_do_not_change_the_tree(tmp_path: Path, kind: Compression,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # headers across chunks take tarfile's path, whole ones the fast path: same bytes out
    data = compress(build_tar(_chunky_members()), kind)
    outputs = []
    for chunk in (tar_stream.CHUNK_SIZE, 700, 4099, 512):
        monkeypatch.setattr(tar_stream, "CHUNK_SIZE", chunk)
        with read_tarball(io.BytesIO(data)) as tree:
            outputs.append(tree.write_tar(tmp_path / f"{chunk}.tar",
                                          source_date_epoch=MTIME).read_bytes())
    assert all(output == outputs[0] for output in outputs)
    with read_tarball(io.BytesIO(outputs[0])) as again:
        assert again.read_bytes("/srv/" + "é" * 70) == b"long name"


def test_concatenated_streams_are_read_across(tmp_path: Path) -> None:
    data = build_tar(SAMPLE)
    half = len(data) // 2
    framed = {
        "gzip": gzip.compress(data[:half]) + bytes(100) + gzip.compress(data[half:]) + bytes(9),
        "xz": lzma.compress(data[:half]) + lzma.compress(data[half:]) + b"junk",  # as LZMAFile
        "bzip2": bz2.compress(data[:half]) + bz2.compress(data[half:]),
    }
    for kind, packed in framed.items():
        with read_tarball(io.BytesIO(packed)) as tree:
            assert tree.compression == kind
            assert tree.read_bytes("/home/user/.profile") == b"export A=1\n", kind


def test_a_binary_xattr_name_survives_the_round_trip(tmp_path: Path) -> None:
    # a LIBARCHIVE.xattr name is URL-encoded bytes: not always UTF-8
    with read([M("f", b"x", pax={"LIBARCHIVE.xattr.user.%FF": "AAE"})]) as tree:
        name = b"user.\xff".decode("utf-8", "surrogateescape")
        assert tree["/f"].xattrs == {name: b"\x00\x01"}
        out = tree.write_tar(tmp_path / "t.tar")
    with read_tarball(out) as again:
        assert again["/f"].xattrs == {name: b"\x00\x01"}
    with tarfile.open(out) as archive:
        assert archive.getmember("./f").pax_headers["SCHILY.xattr." + name] == "\x00\x01"


_pax_keys = st.sampled_from(["path", "linkpath", "size", "uid", "gid", "mtime", "atime", "uname",
                             "comment", "SCHILY.xattr.user.a", "SCHILY.xattr.security.x",
                             "LIBARCHIVE.xattr.user.b", "GNU.sparse.size", "hdrcharset"])
_pax_values = st.sampled_from(["0", "12", " 7", "1_0", "-5", "abc", "1.5", "inf", "", "a/b/",
                               "etc/x", "../up", "é", "AAE", "4294967296"]) | st.text(max_size=8)


@st.composite
def _extended_members(draw: st.DrawFn) -> bytes:
    """Members with PAX records, some of them odd, written by hand so that
    tarfile's own writer does not tidy them."""
    out = io.BytesIO()
    for index in range(draw(st.integers(1, 4))):
        info = tarfile.TarInfo(f"m{index}")
        info.type = draw(st.sampled_from([tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE]))
        data = draw(st.binary(max_size=600)) if info.type == tarfile.REGTYPE else b""
        info.size = len(data)
        info.linkname = "t" if info.type == tarfile.SYMTYPE else ""
        records = draw(st.dictionaries(_pax_keys, _pax_values, max_size=4))
        if records:
            payload = tarfile.TarInfo._create_pax_generic_header(  # type: ignore[attr-defined]
                records, tarfile.XHDTYPE, "utf-8")[512:].rstrip(b"\0")
            if draw(st.booleans()):  # a raw record tarfile would not write
                payload += b"%d junk\n" % draw(st.integers(0, 12))
            extended = tarfile.TarInfo("././@PaxHeader")
            extended.type, extended.size = tarfile.XHDTYPE, len(payload)
            out.write(extended.tobuf(tarfile.USTAR_FORMAT))
            out.write(payload + bytes(-len(payload) % 512))
        out.write(info.tobuf(tarfile.USTAR_FORMAT))
        out.write(data + bytes(-len(data) % 512))
    out.write(bytes(1024))
    return out.getvalue()


def _outcome(data: bytes) -> object:
    try:
        with read_tarball(io.BytesIO(data)) as tree:
            return [(e.path, e.type, e.mode, e.uid, e.gid, e.mtime, e.size, e.linkname, e.xattrs,
                     tree.read_bytes(e.path) if e.type is EntryType.FILE else None)
                    for e in tree] + tree.notes
    except UnsafeArchiveError as exc:
        return str(exc)


@settings(max_examples=300, deadline=None)
@given(data=_extended_members())
def test_fast_paths_read_what_tarfile_reads(data: bytes) -> None:
    fast = _outcome(data)
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(tar_reader, "fast_member", lambda peek: None)
        slow = _outcome(data)
    assert fast == slow


def test_a_tree_index_is_parsed_once_per_process_until_it_is_replaced(tmp_path: Path) -> None:
    """A warm process re-reads the same index without parsing it again, gets
    trees of their own from it, sees an index written anew, and refuses an
    index that is not a JSON object as damaged."""
    from cloudlets.rootfs import tree as tree_module

    with RootTree(open(tmp_path / "spool", "w+b")) as tree:
        tree.add_file("/etc/hostname", b"a\n")
        tree.add_file("/etc/hosts", b"b\n")
        tree.write_index(tmp_path / "index.json")

    def reader(path: str, size: int) -> bytes:
        return b"x" * size

    first = RootTree.from_index(tmp_path / "index.json", reader, workdir=tmp_path)
    parsed = list(tree_module._index_memo.values())[-1]
    second = RootTree.from_index(tmp_path / "index.json", reader, workdir=tmp_path)
    assert list(tree_module._index_memo.values())[-1] is parsed
    assert second.paths() == first.paths() and "/etc/hosts" in second
    assert second["/etc/hosts"] is not first["/etc/hosts"]  # entries of its own
    first.set_content("/etc/hosts", b"changed\n")
    assert second["/etc/hosts"].size == 2
    with RootTree(open(tmp_path / "spool2", "w+b")) as tree:
        tree.add_file("/only", b"c\n")
        tree.write_index(tmp_path / "index.json")  # replaced: read again
    assert "/only" in RootTree.from_index(tmp_path / "index.json", reader, workdir=tmp_path)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        RootTree.from_index(tmp_path / "list.json", reader, workdir=tmp_path)
    for opened in (first, second):
        opened.close()


def _indexed(tmp_path: Path, members: Sequence[M]) -> tuple[RootTree, RootTree]:
    """A tree read from ``members`` and the tree its index gives back, whose
    content is read from the first one."""
    tree = read(members)
    tree.write_index(tmp_path / "index.json")
    lazy = RootTree.from_index(tmp_path / "index.json",
                               lambda path, size: tree.read_bytes(path), workdir=tmp_path)
    return tree, lazy


def _row(entry: object) -> tuple[object, ...]:
    return tuple(getattr(entry, name) for name in (
        "path", "type", "mode", "uid", "gid", "mtime", "size", "linkname",
        "devmajor", "devminor"))


def test_a_tree_from_its_index_answers_lookups_without_reading_every_entry(
        tmp_path: Path) -> None:
    """get, [], in, len, resolve and read_bytes on a tree from an index give
    what the original tree gives (hardlinks, symlinks and names that are not
    UTF-8 included) while the index is still only bisected, never read whole."""
    latin1 = b"srv/caf\xe9".decode("utf-8", "surrogateescape")
    members = [*SAMPLE, M(latin1, b"latin-1 name"), D("usr/lib"),
               M("usr/lib/os-release", b"ID=test\n"), L("lib", "/usr/lib"),
               L("etc/os-release", "../lib/os-release"), M("a-b", b"sorts before a/"),
               D("a"), M("a/b", b"under a")]
    tree, lazy = _indexed(tmp_path, members)
    with tree, lazy:
        assert len(lazy) == len(tree)
        for path in tree.paths():
            assert _row(lazy[path]) == _row(tree[path]), path
            assert path in lazy
        for absent in ("/nope", "/etc/hostnam", "/etc/hostname/x", "/a/c", "/zzz", "/!"):
            assert lazy.get(absent) is None and absent not in lazy
            with pytest.raises(KeyError):
                lazy[absent]
        assert lazy["/usr/bin/ping6"].inode is lazy["/usr/bin/ping"]  # a hardlink
        assert lazy.read_bytes("/usr/bin/ping6") == b"\x7fELF ping"
        assert lazy.read_bytes("/" + latin1) == b"latin-1 name"
        found = lazy.resolve("/etc/os-release")
        assert found is not None and found.path == "/usr/lib/os-release"
        via_bin = lazy.resolve("/bin/passwd")
        assert via_bin is not None and via_bin.mode == 0o4755
        assert lazy.resolve("/etc/passwd") is None
        assert lazy._index is not None  # nothing needed every entry yet
        kept = lazy["/usr/bin/ping6"]
        assert lazy.paths() == tree.paths()  # now it does
        assert lazy._index is None
        assert lazy["/usr/bin/ping6"] is kept and kept.inode is lazy["/usr/bin/ping"]
        assert [_row(entry) for entry in lazy] == [_row(entry) for entry in tree]


def test_a_damaged_or_cut_index_is_refused(tmp_path: Path) -> None:
    """A line that is not an entry is a damaged cache (CacheError naming the
    file and how to recover); a file cut short, or of the older one-document
    format, is not an index at all (ValueError: the tarball is read instead)."""
    from cloudlets.errors import CacheError

    tree, lazy = _indexed(tmp_path, SAMPLE)
    lazy.close()
    index = tmp_path / "index.json"
    lines = index.read_bytes().split(b"\n")
    target = next(n for n, line in enumerate(lines) if b'"/etc/hostname"' in line)
    damaged = lines.copy()
    damaged[target] = b'["/etc/hostname",'
    index.write_bytes(b"\n".join(damaged))
    reader = lambda path, size: b""  # noqa: E731
    with (RootTree.from_index(index, reader, workdir=tmp_path) as broken,
          pytest.raises(CacheError, match=r"index\.json is damaged.*cache prune")):
        broken.get("/etc/hostname")
    with (RootTree.from_index(index, reader, workdir=tmp_path) as broken,
          pytest.raises(CacheError, match="is damaged")):
        broken.paths()
    index.write_bytes(b"\n".join(lines[:-3]) + b"\n")
    with pytest.raises(ValueError, match="entries it announces"):
        RootTree.from_index(index, reader, workdir=tmp_path)
    index.write_text('{"format":1,"entries":[],"persistent":[]}')
    with pytest.raises(ValueError, match="index format 1"):
        RootTree.from_index(index, reader, workdir=tmp_path)
    tree.close()
