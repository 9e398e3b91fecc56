"""Hostile-input class 5: sizes an archive declares without storing them.

A sparse member (GNU type ``S`` or PAX 1.0) declares a real size its data
does not fill: the declared size counts against the size limits before any
of its content is read, its holes stay holes (in the spool, in the tree tar,
in the image), and a render's limits are the image size it may make. The
image a manifest may ask for is bounded by the provider
(``Renderer(ex_max_image_bytes=...)``) before anything is fetched.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from cloudlets.errors import ManifestError, UnsafeArchiveError
from cloudlets.renderer import DEFAULT_MAX_IMAGE_BYTES
from cloudlets.rootfs import ArchivePolicy, read_tarball
from tests.hostile.tarcraft import (
    MIB,
    bytes_on_disk,
    cloudlet,
    gnu_sparse,
    largest_file,
    members_then_end,
    pax_sparse,
    renderer,
    timed,
)

Sparse = Callable[[str, int, Sequence[tuple[int, bytes]]], bytes]
KINDS: dict[str, Sparse] = {"gnu": gnu_sparse, "pax": pax_sparse}
GIB = 1024 * MIB


@pytest.mark.parametrize("kind", KINDS)
def test_a_sparse_member_keeps_its_holes(kind: str, tmp_path: Path) -> None:
    size = 64 * MIB
    regions = [(0, b"head"), (32 * MIB, b"mid" * 1000), (size - 5, b"tail!")]
    blob = members_then_end(KINDS[kind]("var/lastlog", size, regions))
    with timed(), read_tarball(io.BytesIO(blob), workdir=tmp_path) as tree:
        assert tree["/var/lastlog"].size == size
        content = tree.read_bytes("/var/lastlog")
        assert content[:4] == b"head" and content[-5:] == b"tail!"
        assert content[32 * MIB:32 * MIB + 3000] == b"mid" * 1000
        assert content.count(0) == size - 3009
        del content
        out = tree.write_tar(tmp_path / "tree.tar")
    assert out.stat().st_size > size  # the tar holds the whole file...
    assert bytes_on_disk(tmp_path) < 1 * MIB  # ...but not its holes
    with tarfile.open(out) as written:
        member = written.getmember("./var/lastlog")
        handle = written.extractfile(member)
        assert handle is not None and member.size == size
        handle.seek(size - 5)
        assert handle.read() == b"tail!"


@pytest.mark.parametrize("kind", KINDS)
def test_the_declared_size_counts_before_the_content(kind: str) -> None:
    policy = ArchivePolicy(max_member_size=MIB, max_total_size=3 * MIB // 2)
    big = members_then_end(KINDS[kind]("big", MIB + 1, [(0, b"x")]))
    with timed(), pytest.raises(UnsafeArchiveError, match="max_member_size") as caught:
        read_tarball(io.BytesIO(big), policy)
    assert caught.value.member == "big"
    # two that fit alone, not together: the second is refused by their sum
    pair = members_then_end(KINDS[kind]("a", MIB, [(0, b"x")]),
                            KINDS[kind]("b", MIB, [(0, b"y")]))
    with timed(), pytest.raises(UnsafeArchiveError, match="max_total_size") as caught:
        read_tarball(io.BytesIO(pair), policy)
    assert caught.value.member == "b"


@pytest.mark.parametrize(("regions", "words"), [
    ([(4096, b"b"), (0, b"a")], "out of order"),
    ([(0, b"aaaa"), (2, b"bb")], "out of order"),
    ([(10_000, b"past the end")], "beyond the declared size"),
], ids=["backwards", "overlapping", "past-the-end"])
def test_a_sparse_map_that_lies_is_refused(regions: list[tuple[int, bytes]],
                                           words: str) -> None:
    blob = members_then_end(gnu_sparse("liar", 10_000, regions))
    with timed(), pytest.raises(UnsafeArchiveError, match=words) as caught:
        read_tarball(io.BytesIO(blob))
    assert caught.value.member == "liar"


def test_a_sparse_map_claiming_more_data_than_stored_is_refused() -> None:
    member = bytearray(gnu_sparse("liar", 10 * MIB, [(0, b"x" * 600)]))
    # the header says 600 bytes of data; the map now says 5 MiB of them
    member[398:410] = b"%011o\0" % (5 * MIB)
    member[148:156] = b" " * 8
    member[148:156] = b"%06o\0 " % sum(member[:512])
    with timed(), pytest.raises(UnsafeArchiveError, match="more data") as caught:
        read_tarball(io.BytesIO(members_then_end(bytes(member))))
    assert caught.value.member == "liar"


def _render(base: Path, manifest: dict[str, object], fmt: str, **kwargs: object) -> None:
    renderer(base, **kwargs).render(manifest, str(base / "out") + "/", "local", fmt, {})


@pytest.mark.parametrize("fmt", ["raw", "tar"])
def test_a_tiny_tarball_cannot_make_the_renderer_write_gigabytes(fmt: str,
                                                                 tmp_path: Path) -> None:
    # the 562-byte case: a sparse member declaring 2 GiB, into a 64 MiB root
    hostile = members_then_end(gnu_sparse("var/zeros", 2 * GIB, [(0, b"z")]))
    assert len(hostile) <= 2048
    manifest = cloudlet(tmp_path / "src", hostile, root_size="64M")
    with timed(), pytest.raises(UnsafeArchiveError, match="max_member_size") as caught:
        _render(tmp_path, manifest, fmt)
    assert caught.value.member == "var/zeros"
    assert not list((tmp_path / "work").iterdir())  # no work directory left
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    assert bytes_on_disk(tmp_path / "cache") < MIB and largest_file(tmp_path / "cache") < MIB


def test_without_a_root_size_the_provider_bound_applies(tmp_path: Path) -> None:
    hostile = members_then_end(pax_sparse("var/zeros", 2 * GIB, [(0, b"z")]))
    manifest = cloudlet(tmp_path / "src", hostile, root_size=None)
    with timed(), pytest.raises(UnsafeArchiveError, match="max_member_size"):
        _render(tmp_path, manifest, "tar", ex_max_image_bytes=64 * MIB)
    assert bytes_on_disk(tmp_path / "cache") < MIB


def test_a_sparse_file_that_fits_stays_sparse_in_the_image(tmp_path: Path) -> None:
    size = 40 * MIB
    hostile = members_then_end(gnu_sparse("var/lastlog", size,
                                          [(0, b"head"), (size - 5, b"tail!")]))
    manifest = cloudlet(tmp_path / "src", hostile, root_size="64M")
    with timed(10.0):  # a real mke2fs
        _render(tmp_path, manifest, "raw")
    image = tmp_path / "out" / "hostile-1.0.raw"
    assert image.stat().st_size >= 64 * MIB
    # the image, the cached base and the work area hold the data, not the holes
    assert bytes_on_disk(tmp_path) < 8 * MIB


@pytest.mark.parametrize(("boot", "pointer"), [
    ({"root": {"size": "100G"}}, "/boot/root/size"),
    ({"disk_size": "1T"}, "/boot/disk_size"),
], ids=["root-size", "disk-size"])
def test_the_image_size_a_manifest_asks_for_is_bounded(boot: dict[str, object], pointer: str,
                                                       tmp_path: Path) -> None:
    manifest = cloudlet(tmp_path / "src", members_then_end(), root_size=None)
    manifest["boot"] = {**manifest["boot"], **boot}  # type: ignore[dict-item]
    with timed(), pytest.raises(ManifestError) as caught:
        _render(tmp_path, manifest, "raw")
    assert [p.pointer for p in caught.value.problems] == [pointer]
    assert "ex_max_image_bytes" in str(caught.value)
    assert not (tmp_path / "cache").exists() or bytes_on_disk(tmp_path / "cache") == 0
    assert not list((tmp_path / "work").iterdir())


def test_the_provider_sets_the_image_bound(tmp_path: Path) -> None:
    assert DEFAULT_MAX_IMAGE_BYTES == 8 * GIB
    manifest = cloudlet(tmp_path / "src", members_then_end(), root_size="128M")
    with pytest.raises(ManifestError, match="/boot/root/size"):
        _render(tmp_path, manifest, "raw", ex_max_image_bytes=64 * MIB)
    with timed(10.0):
        _render(tmp_path, manifest, "raw", ex_max_image_bytes=128 * MIB)
    assert (tmp_path / "out" / "hostile-1.0.raw").stat().st_size >= 128 * MIB
