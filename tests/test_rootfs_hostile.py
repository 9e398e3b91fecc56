"""A hostile corpus, built at test time: every case is rejected with the member
named, or read into a neutralized tree. Plus a property: whatever members an
archive holds, the normalized tar we write cannot make a naive extractor write
outside its directory.
"""

from __future__ import annotations

import gzip
import io
import os
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudlets.errors import UnsafeArchiveError
from cloudlets.rootfs import ArchivePolicy, Compression, EntryType, read_tarball
from tests.test_rootfs import D, H, L, M, build_tar, compress, read

# (case id, members, member the error must name, words the message must hold)
REJECTED: list[tuple[str, list[M], str | None, str]] = [
    ("absolute-path", [M("/etc/passwd", b"x")], "/etc/passwd", "absolute"),
    ("dotdot", [M("../evil", b"x")], "../evil", "'..'"),
    ("dotdot-deep", [D("a"), M("a/../../evil", b"x")], "a/../../evil", "'..'"),
    ("dotdot-after-dot", [M("./../x", b"x")], "./../x", "'..'"),
    ("dotdot-inside", [D("a"), M("a/../b", b"x")], "a/../b", "'..'"),
    ("nul-in-name", [M("a", b"x", pax={"path": "etc/pass\x00wd"})], "etc/pass\x00wd", "NUL"),
    ("empty-name", [M("a", b"x", pax={"path": ""})], "", "empty"),
    ("newline-in-name", [M("etc/evil\nname", b"x")], "etc/evil\nname", "control character"),
    ("escape-in-name", [M("etc/\x1b[31mred", b"x")], "etc/\x1b[31mred", "control character"),
    ("path-too-long", [M("a/" * 2100 + "f", b"x")], "a/" * 2100 + "f", "longer than 4095"),
    ("name-too-long", [M("d/" + "n" * 256, b"x")], "d/" + "n" * 256, "longer than 255"),
    ("write-through-symlink", [L("etc", "/tmp"), M("etc/passwd", b"x")], "etc/passwd",
     "written through the symlink /etc"),
    ("write-through-relative-symlink", [L("up", "../../.."), D("up/etc")], "up/etc",
     "written through the symlink /up"),
    ("write-through-nested-symlink", [D("a"), L("a/b", "/"), M("a/b/c/d", b"x")], "a/b/c/d",
     "written through the symlink /a/b"),
    ("symlink-replaces-directory", [D("lib"), M("lib/libc.so", b"x"), L("lib", "/tmp")], "lib",
     "replaces the directory /lib"),
    ("symlink-replaces-implied-directory", [M("usr/share/x", b"x"), L("usr", "/")], "usr",
     "replaces the directory /usr"),
    ("file-replaces-directory", [D("etc"), M("etc", b"x")], "etc", "replaces the directory"),
    ("child-of-a-file", [M("a", b"x"), M("a/b", b"y")], "a/b", "parent /a is a file"),
    ("hardlink-absolute", [H("shadow", "/etc/shadow")], "shadow", "absolute hardlink target"),
    ("hardlink-dotdot", [H("shadow", "../../etc/shadow")], "shadow", "'..' in hardlink target"),
    ("hardlink-forward", [H("a", "b"), M("b", b"x")], "a", "not a member seen earlier"),
    ("hardlink-missing", [M("x", b"x"), H("a", "etc/shadow")], "a", "not a member seen earlier"),
    ("hardlink-through-symlink", [L("l", "/etc"), H("h", "l/shadow")], "h",
     "not a member seen earlier"),
    ("hardlink-to-directory", [D("d"), H("h", "d")], "h", "hardlink to the directory /d"),
    ("hardlink-empty-target", [M("x", b"x"), H("h", "")], "h", "empty hardlink target"),
    ("symlink-empty-target", [L("l", "")], "l", "empty or NUL target"),
    ("symlink-nul-target", [L("l", "a", pax={"linkpath": "/a\x00b"})], "l", "empty or NUL"),
    ("symlink-target-too-long", [L("l", "x" * 5000)], "l", "symlink target longer"),
    ("unknown-type", [M("v", b"", type=b"V")], "v", "unsupported member type"),
    ("root-is-a-file", [M(".", b"x")], ".", "root of the tree is a file"),
    ("uid-out-of-range", [M("f", b"", pax={"uid": str(2**40)})], "f", "uid"),
    ("gid-minus-one", [M("f", b"", pax={"gid": str(2**32 - 1)})], "f", "gid"),
    ("xattr-too-large", [M("f", b"", pax={"SCHILY.xattr.user.big": "x" * 70000})], "f",
     "more than 65536"),
    ("xattr-bad-base64", [M("f", b"", pax={"LIBARCHIVE.xattr.user.a": "!!!"})], "f", "base64"),
    ("negative-size", [M("f", b"", pax={"size": "-1"})], "f", "negative size"),
    ("mtime-infinite", [M("f", b"", pax={"mtime": "inf"})], "f", "malformed"),
]


@pytest.mark.parametrize(("case", "members", "member", "words"), REJECTED,
                         ids=[case[0] for case in REJECTED])
def test_hostile_member_is_rejected_and_named(case: str, members: list[M], member: str | None,
                                              words: str) -> None:
    with pytest.raises(UnsafeArchiveError) as caught:
        read([D("."), M("ok", b"fine"), *members])
    assert caught.value.member == member, case
    assert words in str(caught.value), case
    assert f"tar member {member!r}" in str(caught.value)


def test_corpus_is_large_enough() -> None:
    assert len(REJECTED) + len(NEUTRALIZED) >= 25


def test_pax_global_header_cannot_smuggle_a_path() -> None:
    data = build_tar([M("innocent", b"x")], global_pax={"path": "../../etc/cron.d/evil"})
    with pytest.raises(UnsafeArchiveError, match=r"'\.\.'") as caught:
        read_tarball(io.BytesIO(data))
    assert caught.value.member == "../../etc/cron.d/evil"


@pytest.mark.parametrize("policy_field", ["max_members", "max_member_size"])
def test_limits_stop_the_member_that_crosses_them(policy_field: str) -> None:
    members = [M(f"f{n}", b"x" * 600) for n in range(10)]
    limits = {"max_members": ArchivePolicy(max_members=5),
              "max_member_size": ArchivePolicy(max_member_size=500)}
    with pytest.raises(UnsafeArchiveError, match=policy_field) as caught:
        read(members, limits[policy_field])
    expected = {"max_members": "f5", "max_member_size": "f0"}
    assert caught.value.member == expected[policy_field]


def test_member_sizes_add_up_against_the_total() -> None:
    # sparse members expand: their real sizes count, not the bytes in the stream
    data = _pax_sparse("one", 600_000, b"1", ("two", 600_000, b"2"))
    policy = ArchivePolicy(max_total_size=1_000_000)
    with pytest.raises(UnsafeArchiveError, match="add up") as caught:
        read_tarball(io.BytesIO(data), policy)
    assert caught.value.member == "two"


def test_tar_stream_size_is_limited_even_without_content() -> None:
    members = [D(f"d{n:04d}") for n in range(400)]
    with pytest.raises(UnsafeArchiveError, match="expands beyond"):
        read(members, ArchivePolicy(max_total_size=64 * 1024))


def _zero_bomb(size: int) -> bytes:
    """A zstd tarball holding one file of ``size`` zero bytes, compressed as it streams."""
    info = tarfile.TarInfo("var/bomb")
    info.size = size
    sink = io.BytesIO()
    compressor = zstandard.ZstdCompressor(level=1)
    with compressor.stream_writer(sink, closefd=False) as writer:
        writer.write(info.tobuf(tarfile.PAX_FORMAT))
        zeros = bytes(4 * 1024 * 1024)
        for _ in range(size // len(zeros)):
            writer.write(zeros)
        writer.write(bytes(2 * tarfile.RECORDSIZE))
    return sink.getvalue()


def test_decompression_bomb_fails_fast_with_default_policy() -> None:
    bomb = _zero_bomb(512 * 1024 * 1024)
    assert len(bomb) < 100 * 1024  # half a gigabyte in a few kilobytes
    started = time.perf_counter()
    with pytest.raises(UnsafeArchiveError, match="compression ratio") as caught:
        read_tarball(io.BytesIO(bomb))
    assert caught.value.member == "var/bomb"
    assert time.perf_counter() - started < 5  # it stopped near ratio_grace, not at 512 MiB


@pytest.mark.parametrize("kind", [Compression.GZIP, Compression.XZ, Compression.BZIP2])
def test_bombs_in_every_compression(kind: Compression) -> None:
    data = compress(build_tar([M("zeros", bytes(8 * 1024 * 1024))]), kind)
    policy = ArchivePolicy(ratio_grace=1024 * 1024, max_compression_ratio=50)
    with pytest.raises(UnsafeArchiveError, match="compression ratio"):
        read_tarball(io.BytesIO(data), policy)


def test_oversized_pax_header_is_a_header_bomb() -> None:
    members = [M("first", b"x"), M("second", b"y", pax={"comment": "c" * (3 * 1024 * 1024)})]
    with pytest.raises(UnsafeArchiveError, match="max_header_size") as caught:
        read(members)
    assert caught.value.member == "first"


def test_oversized_gnu_longname_is_a_header_bomb() -> None:
    data = build_tar([M("first", b"x"), M("n/" * (1024 * 1024) + "f", b"y")],
                     fmt=tarfile.GNU_FORMAT)
    with pytest.raises(UnsafeArchiveError, match="max_header_size"):
        read_tarball(io.BytesIO(data))


def _pax_sparse(name: str, realsize: int, data: bytes,
                *more: tuple[str, int, bytes]) -> bytes:
    """PAX 1.0 sparse members: ``data`` at offset 0, the rest a hole."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for member, size, content in ((name, realsize, data), *more):
            sparse_map = f"1\n0\n{len(content)}\n".encode().ljust(512, b"\0")
            payload = sparse_map + content.ljust(512, b"\0")
            info = tarfile.TarInfo(f"GNUSparseFile.0/{member}")
            info.size = len(payload)
            info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                                "GNU.sparse.name": member, "GNU.sparse.realsize": str(size)}
            archive.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def test_sparse_member_is_stored_dense(tmp_path: Path) -> None:
    with read_tarball(io.BytesIO(_pax_sparse("var/lastlog", 70000, b"head"))) as tree:
        entry = tree["/var/lastlog"]
        assert entry.size == 70000
        content = tree.read_bytes("/var/lastlog")
        assert content[:4] == b"head" and content[4:] == bytes(70000 - 4)


def test_sparse_bomb_is_stopped_by_its_real_size() -> None:
    with pytest.raises(UnsafeArchiveError, match="max_member_size") as caught:
        read_tarball(io.BytesIO(_pax_sparse("huge", 2**50, b"x")))
    assert caught.value.member == "huge"


def test_sparse_members_can_be_refused() -> None:
    with pytest.raises(UnsafeArchiveError, match="allow_sparse"):
        read_tarball(io.BytesIO(_pax_sparse("s", 4096, b"x")), ArchivePolicy(allow_sparse=False))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "bad-gzip"])
def test_malformed_archives_are_refused(damage: str) -> None:
    data = build_tar([M("a", b"x" * 5000), M("b", b"y")])
    if damage == "truncated":
        data = data[:1200]
    elif damage == "garbage":
        data = b"\x00junk" * 300
    else:
        packed = compress(data, Compression.GZIP)
        data = packed[: len(packed) // 2]
    with pytest.raises(UnsafeArchiveError):
        read_tarball(io.BytesIO(data))


def test_device_numbers_beyond_a_tar_header_are_refused() -> None:
    # GNU base-256 numbers hold what the normalized tar could not write back
    data = build_tar([M("dev/x", type=tarfile.CHRTYPE, devmajor=2**30)], fmt=tarfile.GNU_FORMAT)
    with pytest.raises(UnsafeArchiveError, match="device number") as caught:
        read_tarball(io.BytesIO(data))
    assert caught.value.member == "dev/x"


def test_a_bomb_is_metered_while_its_content_is_skipped() -> None:
    # a volatile member's content is never spooled, but still decompressed and counted
    started = time.perf_counter()
    with pytest.raises(UnsafeArchiveError, match="compression ratio") as caught:
        read_tarball(io.BytesIO(_zero_bomb(512 * 1024 * 1024)), volatile=["/var"])
    assert caught.value.member == "var/bomb"
    assert time.perf_counter() - started < 5


def _decompressing() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "cloudlets-decompress" and t.is_alive()]


@pytest.mark.parametrize("kind", [Compression.GZIP, Compression.ZSTD])
def test_the_decompressing_thread_stops_when_a_member_is_refused(kind: Compression) -> None:
    # the thread is ahead of the parser, blocked on a full queue, when the parser refuses
    noise = os.urandom(1024 * 1024)
    members = [M("ok", b"fine"), M("../evil", b"x")]
    members += [M(f"data/{n}", noise) for n in range(24)]
    data = compress(build_tar(members), kind)
    with pytest.raises(UnsafeArchiveError, match=r"'\.\.'"):
        read_tarball(io.BytesIO(data))
    assert _decompressing() == []


def test_a_corrupt_stream_is_reported_and_the_thread_stops() -> None:
    text = b"".join(b"line %d of a configuration file\n" % n for n in range(200_000))
    packed = bytearray(gzip.compress(build_tar([M("a", b"x"), M("big", text), M("c", b"y")])))
    packed[len(packed) // 2] ^= 0x55
    with pytest.raises(UnsafeArchiveError, match="malformed gzip tar archive") as caught:
        read_tarball(io.BytesIO(bytes(packed)))
    assert caught.value.member in ("big", "c")
    assert _decompressing() == []


def test_the_source_is_left_alone_once_read_tarball_returns() -> None:
    class Watched(io.BytesIO):
        reads = 0

        def read(self, size: int | None = -1) -> bytes:
            self.reads += 1
            return super().read(size)

    source = Watched(compress(build_tar(SAMPLE_BIG), Compression.GZIP))
    with read_tarball(source) as tree:
        assert _decompressing() == []
        reads = source.reads
        time.sleep(0.05)
        assert source.reads == reads
        assert tree.read_bytes("/big/0")[:4] == b"\0\0\0\0"


SAMPLE_BIG = [M(f"big/{n}", bytes(300_000)) for n in range(40)]


# -- neutralized: accepted, but made harmless or kept faithfully inside ------

NEUTRALIZED: list[tuple[str, list[M]]] = [
    ("absolute-symlink-kept", [L("etc/alternatives/vi", "/usr/bin/vim.basic")]),
    ("escaping-symlink-kept", [L("evil", "../../../../etc/shadow")]),
    ("device-and-setuid-kept", [M("dev/kmem", type=tarfile.CHRTYPE, devmajor=1, devminor=2),
                                M("bin/su", b"x", mode=0o4755)]),
    ("unknown-xattr-dropped", [M("f", b"", pax={"SCHILY.xattr.system.nfs4_acl": "x"})]),
    ("control-chars-allowed-by-policy", [M("odd\tname", b"x")]),
    ("uname-ignored", [M("owned", b"x", uid=33, uname="root")]),
]


def test_neutralized_cases() -> None:
    with read([D("."), *NEUTRALIZED[0][1]]) as tree:
        assert tree["/etc/alternatives/vi"].linkname == "/usr/bin/vim.basic"
    with read(NEUTRALIZED[1][1]) as tree:
        assert tree["/evil"].linkname == "../../../../etc/shadow"
        assert tree.resolve("/evil") is None  # resolved in the image, where it is absent
    with read(NEUTRALIZED[2][1]) as tree:
        assert tree["/dev/kmem"].type is EntryType.CHARDEV
        assert tree["/bin/su"].mode == 0o4755
    with read(NEUTRALIZED[3][1]) as tree:
        assert tree["/f"].xattrs == {}
        assert any("system.nfs4_acl" in note for note in tree.notes)
    with read(NEUTRALIZED[4][1], ArchivePolicy(allow_control_characters=True)) as tree:
        assert "/odd\tname" in tree
    with read(NEUTRALIZED[5][1]) as tree:
        assert tree["/owned"].uid == 33  # numeric ids win; names are never looked up


# -- the property ---------------------------------------------------------------

_COMPONENTS = ["a", "b", "etc", ".", "..", ""]
# a small pool of names makes collisions (a symlink, then a member under it) common
_POOL = ["a", "b", "a/b", "a/b/c", "b/a", "etc", "etc/a", ".", "a/..", "a//b", "a/./b"]
_name = st.sampled_from(_POOL) | st.lists(st.sampled_from(_COMPONENTS), min_size=1,
                                          max_size=4).map("/".join)
_prefixed = st.tuples(st.sampled_from(["", "", "", "./", "/"]), _name).map("".join)
_kind = st.sampled_from(["file", "dir", "symlink", "hardlink"])


@st.composite
def _members(draw: st.DrawFn, outside: str) -> list[M]:
    """Random member sequences; symlinks may aim at ``outside`` (a canary
    directory beside the extraction root) directly or through ``..``."""
    targets = st.sampled_from([outside, outside + "/x", "../outside", "../../outside/x",
                               "..", "/", "a", "etc/../.."]) | _prefixed
    result = []
    for _ in range(draw(st.integers(1, 10))):
        name = draw(_prefixed)
        kind = draw(_kind)
        if kind == "file":
            result.append(M(name, draw(st.binary(max_size=16))))
        elif kind == "dir":
            result.append(D(name))
        elif kind == "symlink":
            result.append(L(name, draw(targets)))
        else:
            result.append(H(name, draw(_prefixed)))
    return result


def _inside(path: str, root: str) -> bool:
    return os.path.commonpath([os.path.realpath(path), root]) == root


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_normalized_tar_never_writes_outside_a_naive_extraction(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as sandbox:
        sandbox = os.path.realpath(sandbox)
        root = os.path.join(sandbox, "root")
        outside = os.path.join(sandbox, "outside")
        os.mkdir(root)
        os.mkdir(outside)
        members = data.draw(_members(outside))
        try:
            tree = read_tarball(io.BytesIO(build_tar(members)))
        except UnsafeArchiveError:
            return  # refused: nothing is written anywhere
        with tree:
            out = tree.write_tar(os.path.join(sandbox, "tree.tar"))
        # the adversary: extract with no filter and no checks at all
        with tarfile.open(out) as archive:
            archive.extractall(root, filter="fully_trusted")
        assert os.listdir(outside) == []
        assert sorted(os.listdir(sandbox)) == ["outside", "root", "tree.tar"]
        for directory, subdirs, files in os.walk(root):
            for name in subdirs + files:
                path = os.path.join(directory, name)
                if not os.path.islink(path):
                    assert _inside(path, root), path
