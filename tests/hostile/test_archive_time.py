"""Hostile-input class 10: time from the archive. Member times are clamped to
``0 .. MAX_TIME`` as they are read (a PAX ``mtime`` may hold any decimal
number, a GNU header any base-256 one), so neither the tree's times nor the
clock derived from them (the newest) can go beyond what every consumer holds;
``SOURCE_DATE_EPOCH`` clamps them further, must itself be in range, and a
clock of 0 renders the same bytes every time.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from cloudlets.errors import ConfigurationError, UnsafeArchiveError
from cloudlets.rootfs import read_tarball
from cloudlets.rootfs.policy import MAX_TIME
from tests.hostile.tarcraft import cloudlet, renderer, timed, without_end
from tests.test_rootfs import M, build_tar, read

HUGE = [("pax-1e300", {"mtime": "1e300"}, MAX_TIME),
        ("pax-2514", {"mtime": str(17_500_000_000)}, MAX_TIME),
        ("pax-negative", {"mtime": "-1e300"}, 0),
        ("pax-fraction", {"mtime": "1700000000.75"}, 1_700_000_000)]


@pytest.mark.parametrize(("pax", "expected"), [case[1:] for case in HUGE],
                         ids=[case[0] for case in HUGE])
def test_pax_times_are_clamped(pax: dict[str, str], expected: int) -> None:
    with timed(), read([M("f", b"x", pax=pax)]) as tree:
        assert tree["/f"].mtime == expected
        assert tree["/"].mtime == expected  # the root takes the newest
        assert any("clamped" in note for note in tree.notes) == (expected in (0, MAX_TIME))


@pytest.mark.parametrize("mtime", [8**11, 2**60, -(2**40)], ids=["2242", "2^60", "negative"])
def test_gnu_base256_times_are_clamped(mtime: int) -> None:
    info = tarfile.TarInfo("f")
    info.mtime = mtime
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as archive:
        archive.addfile(info)
    with read_tarball(io.BytesIO(buf.getvalue())) as tree:
        assert tree["/f"].mtime == min(max(mtime, 0), MAX_TIME)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e400"])
def test_times_that_are_no_number_are_refused(value: str) -> None:
    with timed(), pytest.raises(UnsafeArchiveError, match="malformed") as caught:
        read([M("f", b"x", pax={"mtime": value})])
    assert caught.value.member == "f"


def _hostile_times() -> bytes:
    return without_end(build_tar([M("etc/new", b"x", pax={"mtime": "1e300"}),
                                  M("etc/old", b"y", mtime=1000)]))


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs GNU tar")
def test_the_tree_tar_stays_readable_by_gnu_tar(tmp_path: Path) -> None:
    blob = _hostile_times() + bytes(1024)
    with read_tarball(io.BytesIO(blob)) as tree:
        out = tree.write_tar(tmp_path / "tree.tar")
    listing = subprocess.run(["tar", "--full-time", "-tvf", str(out)], capture_output=True,
                             text=True, check=True, timeout=30)
    assert listing.stderr == ""
    assert "2106-02-07 06:28:15 ./etc/new" in listing.stdout
    with tarfile.open(out) as written:
        assert max(member.mtime for member in written) == MAX_TIME


def test_the_image_clock_from_the_archive_is_clamped(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    manifest = cloudlet(tmp_path / "src", _hostile_times() + bytes(1024))
    with timed(10.0):
        result = renderer(tmp_path, ex_source_date_epoch=None).render(
            manifest, str(tmp_path / "out") + "/", "local", "raw", {})
    assert result.details["disk"]["source_date_epoch"] == MAX_TIME


def test_source_date_epoch_clamps_every_member(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "5000")
    manifest = cloudlet(tmp_path / "src", _hostile_times() + bytes(1024))
    with timed():
        renderer(tmp_path, ex_source_date_epoch=None).render(
            manifest, str(tmp_path / "out") + "/", "local", "tar", {})
    with tarfile.open(tmp_path / "out" / "hostile-1.0.tar.gz") as written:
        times = {member.name: member.mtime for member in written}
    assert max(times.values()) == 5000 and times["./etc/old"] == 1000


@pytest.mark.parametrize("epoch", [2**40, -1], ids=["2^40", "negative"])
def test_a_source_date_epoch_out_of_range_is_refused(epoch: int, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigurationError, match="source date epoch"):
        renderer(tmp_path, ex_source_date_epoch=epoch)
    for value in (str(2**40), "-5", "1e300", "soon"):
        monkeypatch.setenv("SOURCE_DATE_EPOCH", value)
        with pytest.raises(ConfigurationError, match="SOURCE_DATE_EPOCH"):
            renderer(tmp_path, ex_source_date_epoch=None)


@pytest.mark.parametrize("how", ["argument", "environment", "archive"])
def test_a_clock_of_zero_renders_the_same_bytes_twice(how: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    # e2fsprogs takes a fake time of 0 for none and stamps the real clock
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    if how == "environment":
        monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    epoch = 0 if how == "argument" else None
    zero = without_end(build_tar([M("etc/f", b"x", mtime=0)])) + bytes(1024)
    digests = []
    with timed(15.0):
        for attempt in range(2):
            base = tmp_path / str(attempt)
            manifest = cloudlet(tmp_path / "src", zero)
            if how == "archive":  # every member at 0: the tree's clock is 0
                manifest = cloudlet(tmp_path / "src", zero, mtime=0)
            result = renderer(base, ex_source_date_epoch=epoch).render(
                manifest, str(base / "out") + "/", "local", "raw", {})
            assert result.details["disk"]["source_date_epoch"] == 0
            digests.append(result.artifacts[0].sha256)
            time.sleep(1.1)  # the real clock moves on
    assert digests[0] == digests[1]
