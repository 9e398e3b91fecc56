"""Hostile-input class 4: the shape of a tree. Deep paths, wide directories,
long names (GNU longname, PAX path), many links to one inode, long symlink
chains, big headers and extended attributes: whatever its shape, a megabyte
of tarball is read in under two seconds, because every step of the tree
model is linear in the number of path components, and what a shape could
multiply (depth, implied parents, metadata) is bounded by the policy.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import time
from pathlib import Path

import pytest

from cloudlets.errors import UnsafeArchiveError
from cloudlets.rootfs import ArchivePolicy, EntryType, read_tarball
from tests.hostile.tarcraft import MIB, SHAPES, cloudlet, renderer, shape, timed, without_end
from tests.test_rootfs import D, H, L, M, build_tar, read

#: entries each shape of a megabyte must at least give (it was really read)
AT_LEAST = {"deep-chains": 700, "deep-implied": 50_000, "long-names-gnu": 3000,
            "long-names-pax": 3000, "wide": 2000, "links": 2000, "xattrs": 5}


@pytest.mark.parametrize("compressed", [False, True], ids=["tar", "tar.gz"])
@pytest.mark.parametrize("name", SHAPES)
def test_a_megabyte_of_any_shape_is_read_in_under_two_seconds(name: str,
                                                              compressed: bool) -> None:
    data = shape(name)
    assert 0.8 * MIB < len(data) < 1.2 * MIB
    if compressed:
        data = gzip.compress(data, 1)
    if compressed and name == "deep-implied":  # 100,000 entries from 12 KB
        with timed(), pytest.raises(UnsafeArchiveError, match="max_members_per_mib"):
            read_tarball(io.BytesIO(data))
        return
    with timed(), read_tarball(io.BytesIO(data)) as tree:
        assert len(tree) >= AT_LEAST[name]


def test_a_megabyte_of_compressed_headers_is_refused_by_its_density() -> None:
    # 200,000 empty members: 100 MB of tar, 1.2 MB of gzip; at 80:1 the
    # compression ratio does not stop it, the members per compressed MiB do
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for n in range(200_000):
            archive.addfile(tarfile.TarInfo(f"d/{n:x}"))
    data = gzip.compress(buf.getvalue(), 6)
    assert len(data) < 1.5 * MIB
    with timed(), pytest.raises(UnsafeArchiveError, match="max_members_per_mib") as caught:
        read_tarball(io.BytesIO(data))
    member = caught.value.member
    assert member is not None and 20_000 < int(member[2:], 16) < 50_000  # soon past the grace
    # within the grace, any density is fine; so is a density the policy allows
    with read_tarball(io.BytesIO(gzip.compress(build_tar([M(f"f{n}") for n in range(5000)])))):
        pass


def test_the_quadratic_case_is_linear_now() -> None:
    # the case: one chain of nested directories as deep as the path
    # limit allows (2047 components), the depth limit raised to let it in
    chain = [D("/".join(["a"] * depth)) for depth in range(1, 2048)]
    data = build_tar(chain, tarfile.GNU_FORMAT)
    policy = ArchivePolicy(max_path_depth=4096)
    with timed(), read_tarball(io.BytesIO(data), policy) as tree:
        assert len(tree) == 2048
    files = [M(f"r{n}/" + "/".join(["a"] * 2000)) for n in range(10)]  # all parents implied
    with timed(), read_tarball(io.BytesIO(build_tar(files, tarfile.GNU_FORMAT)), policy) as tree:
        assert len(tree) == 1 + 10 * 2001
        assert tree.notes[-1].startswith("... and ")  # the notes stay small
        assert len(tree.notes) < 200


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
def test_depth_beyond_the_limit_is_refused_and_named(fmt: int) -> None:
    deep = "/".join(["d"] * 257)
    with timed(), pytest.raises(UnsafeArchiveError, match="max_path_depth") as caught:
        read_tarball(io.BytesIO(build_tar([M(deep, b"x")], fmt)))
    assert caught.value.member == deep
    assert "257 components deep, more than 256" in str(caught.value)
    # a hardlink's target and a persistent path are paths too
    with pytest.raises(UnsafeArchiveError, match="max_path_depth"):
        read([M("f", b"x"), H("link", deep)])
    with pytest.raises(UnsafeArchiveError, match="max_path_depth"):
        read([M("f", b"x")], persistent=["/" + deep])
    with read([M("/".join(["d"] * 256), b"x")]) as tree:  # the limit itself is fine
        assert len(tree) == 257


def test_implied_parents_count_as_members() -> None:
    files = [M(f"r{n}/" + "/".join(["d"] * 200)) for n in range(10)]
    with timed(), pytest.raises(UnsafeArchiveError, match="max_members") as caught:
        read(files, ArchivePolicy(max_members=1000))
    assert caught.value.member is not None and caught.value.member.startswith("r4/")


def test_metadata_is_bounded() -> None:
    names = [M(f"n{n}/" + "/".join(["x" * 200] * 19)) for n in range(100)]
    with timed(), pytest.raises(UnsafeArchiveError, match="max_metadata_size"):
        read(names, ArchivePolicy(max_metadata_size=MIB))
    xattrs = [M(f"x{n}", pax={"SCHILY.xattr.user.big": "v" * 60_000}) for n in range(40)]
    with timed(), pytest.raises(UnsafeArchiveError, match="max_metadata_size"):
        read(xattrs, ArchivePolicy(max_metadata_size=MIB))
    with pytest.raises(UnsafeArchiveError, match="max_xattr_size"):
        read([M("big", pax={"SCHILY.xattr.user.big": "v" * 70_000})])


def test_checks_still_walk_through_implied_parents() -> None:
    # only the nearest known ancestor is checked: it must still catch a file
    # or a symlink however far above the member it is
    with pytest.raises(UnsafeArchiveError, match="not a directory"):
        read([M("a/b/c/f", b""), M("x", b""), M("x/y/z/w", b"")])
    with pytest.raises(UnsafeArchiveError, match="through the symlink"):
        read([L("s", "/etc"), M("s/a/b/c/passwd", b"")])
    with pytest.raises(UnsafeArchiveError, match="replaces the directory"):
        read([M("a/b/c/f", b""), M("a/b", b"")])


def test_a_late_volatile_directory_drops_its_subtree_in_linear_time() -> None:
    # members first, their directories after: each directory is volatile
    members = [M(f"cache{n}/sub/{k}", b"") for n in range(200) for k in range(20)]
    members += [D(f"cache{n}") for n in range(200)]
    members += [M(f"cache{n}/sub/late", b"") for n in range(200)]  # under a dropped dir
    with timed(), read(members, volatile=[r"/cache\d+$"]) as tree:
        assert len(tree) == 1
        assert len(tree.dropped) == 200 * 21 + 200


def test_many_links_to_one_inode_and_a_rendered_template() -> None:
    links = [M("etc/motd", b"old"), *(H(f"l/{n}", "etc/motd") for n in range(5000))]
    with timed(), read(links) as tree:
        for _ in range(1000):
            tree.set_content("/etc/motd", b"new content")
        assert tree["/l/4999"].size == len(b"new content")
        assert tree["/l/0"].type is EntryType.HARDLINK


def test_symlink_chains_resolve_in_bounded_time() -> None:
    # 1000 links, each target as long as a path may be, a ring: every lookup
    # stops after 40 hops
    dots = "./" * 2000
    ring = [L(f"s{n}", f"{dots}s{(n + 1) % 1000}") for n in range(1000)]
    with timed(), read(ring) as tree:
        for n in range(0, 1000, 10):
            assert tree.resolve(f"/s{n}/x") is None
        assert tree.resolve("/s0") is None


def test_a_deep_tree_renders_in_bounded_time(tmp_path: Path) -> None:
    hostile = without_end(shape("deep-chains")) + shape("wide", MIB // 4)
    manifest = cloudlet(tmp_path / "src", hostile, root_size="64M")
    started = time.monotonic()
    renderer(tmp_path).render(manifest, str(tmp_path / "out") + "/", "local", "tar", {})
    assert time.monotonic() - started < 4.0  # reading, writing and gzip of the tree
    with tarfile.open(tmp_path / "out" / "hostile-1.0.tar.gz") as written:
        names = written.getnames()
    assert len(names) > 1200
    assert max(name.count("/") for name in names) == 256


def test_a_deep_tree_goes_through_the_disk_stage(tmp_path: Path) -> None:
    # 256-deep paths through mke2fs, as the cold render streams them
    manifest = cloudlet(tmp_path / "src", shape("deep-chains", MIB // 2), root_size="64M")
    with timed(10.0):  # a real mke2fs
        result = renderer(tmp_path).render(manifest, str(tmp_path / "out") + "/", "local",
                                           "raw", {})
    assert result.details["rootfs"]["entries"] > 500
    assert (tmp_path / "out" / "hostile-1.0.raw").stat().st_size >= 64 * MIB


@pytest.mark.parametrize("fmt", ["tar", "raw"])
def test_a_render_refuses_a_deep_member_and_leaves_nothing(fmt: str, tmp_path: Path) -> None:
    deep = "/".join(["d"] * 300)
    manifest = cloudlet(tmp_path / "src", build_tar([M(deep, b"x")], tarfile.GNU_FORMAT))
    with timed(), pytest.raises(UnsafeArchiveError, match="max_path_depth") as caught:
        renderer(tmp_path).render(manifest, str(tmp_path / "out") + "/", "local", fmt, {})
    assert caught.value.member == deep
    assert not list((tmp_path / "work").iterdir())
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    bases = tmp_path / "cache" / "bases"
    assert not bases.exists() or not [p for p in bases.iterdir() if "partial" in p.name]
