"""The native qcow2 writer: qemu-img reads back what it wrote, the digest it
returns is the file's, the bytes depend on the disk's content only, and the
storage takes the digest without reading the file again."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from cloudlets.drivers.formats import qcow2_writer
from cloudlets.drivers.formats.qcow2_writer import CLUSTER_SIZE, write_qcow2
from cloudlets.drivers.storage.local import LocalStorage
from cloudlets.errors import FormatError, StorageError
from cloudlets.sparse import Piece
from cloudlets.testing.formats import composed_disk, join_pieces

MiB = 1024 * 1024


def _check(image: Path, raw: Path) -> dict[str, object]:
    check = subprocess.run(["qemu-img", "check", "--output=json", str(image)],
                           capture_output=True, text=True, check=False, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw),
                              str(image)], capture_output=True, text=True, check=False,
                             timeout=60)
    assert compare.returncode == 0, compare.stdout + compare.stderr
    info: dict[str, object] = json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", str(image)], capture_output=True, text=True,
        check=True, timeout=60).stdout)
    return info


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def test_a_composed_disk_reads_back_identical(tmp_path: Path) -> None:
    disk = composed_disk(tmp_path / "composed")
    raw = join_pieces(disk, tmp_path / "joined.raw")
    digest = write_qcow2(disk.pieces, tmp_path / "out.qcow2")
    info = _check(tmp_path / "out.qcow2", raw)
    assert info["format"] == "qcow2" and "backing-filename" not in info
    assert info["virtual-size"] == disk.size
    assert digest == _sha256(tmp_path / "out.qcow2")


def test_the_bytes_depend_on_the_content_only(tmp_path: Path) -> None:
    """The same disk as pieces, as one sparse file and as one file whose
    zeros are written out gives the same file: zero clusters are left out by
    content, not by the holes of the file system."""
    disk = composed_disk(tmp_path / "composed")
    sparse = join_pieces(disk, tmp_path / "sparse.raw")
    dense = tmp_path / "dense.raw"
    dense.write_bytes(sparse.read_bytes())
    size = disk.size
    outputs = []
    for name, pieces in (("pieces", disk.pieces), ("sparse", [Piece(sparse, 0, size)]),
                         ("dense", [Piece(dense, 0, size)])):
        write_qcow2(pieces, tmp_path / f"{name}.qcow2")
        outputs.append((tmp_path / f"{name}.qcow2").read_bytes())
    assert outputs[0] == outputs[1] == outputs[2]
    # only the clusters holding data are stored (with 6 of metadata)
    assert len(outputs[0]) < size // 2


@pytest.mark.parametrize("size", [CLUSTER_SIZE - 512, 3 * CLUSTER_SIZE + 512,
                                  (8192 * CLUSTER_SIZE) + 4096])
def test_sizes_that_are_not_whole_clusters_or_tables(tmp_path: Path, size: int) -> None:
    """A last cluster only partly on the disk, and an L2 table boundary
    crossed (8192 clusters a table)."""
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as handle:
        handle.truncate(size)
        for offset in (0, size // 2, size - 512):
            handle.seek(offset)
            handle.write(b"\xa5" * 512)
    digest = write_qcow2([Piece(raw, 0, size)], tmp_path / "out.qcow2")
    info = _check(tmp_path / "out.qcow2", raw)
    assert info["virtual-size"] == size
    assert digest == _sha256(tmp_path / "out.qcow2")


def test_an_all_zero_disk_stores_no_data(tmp_path: Path) -> None:
    raw = tmp_path / "zeros.raw"
    raw.write_bytes(bytes(2 * MiB))
    write_qcow2([Piece(raw, 0, 2 * MiB)], tmp_path / "out.qcow2")
    _check(tmp_path / "out.qcow2", raw)
    # header, refcount table, one refcount block, L1; no L2 table, no data
    assert (tmp_path / "out.qcow2").stat().st_size == 4 * CLUSTER_SIZE


def test_a_piece_shorter_than_its_file_is_refused(tmp_path: Path) -> None:
    raw = tmp_path / "short.raw"
    raw.write_bytes(b"x" * 4096)
    target = tmp_path / "out.qcow2"
    with pytest.raises(FormatError, match="shorter than the piece"):
        write_qcow2([Piece(raw, 0, 8192)], target)
    assert not target.exists()


def test_a_write_error_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(MiB))
    real = os.pwrite
    calls = []

    def failing(fd: int, data: bytes | memoryview, offset: int) -> int:
        calls.append(offset)
        if len(calls) > 1:  # the metadata goes, then the data fails
            raise OSError(28, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(qcow2_writer.os, "pwrite", failing)
    with pytest.raises(FormatError, match="No space left"):
        write_qcow2([Piece(raw, 0, MiB)], tmp_path / "out.qcow2")
    assert not (tmp_path / "out.qcow2").exists()


def test_the_storage_takes_the_written_digest_of_a_linked_file(tmp_path: Path) -> None:
    raw = tmp_path / "disk.raw"
    raw.write_bytes(os.urandom(MiB))
    image = tmp_path / "work" / "out.qcow2"
    image.parent.mkdir()
    digest = write_qcow2([Piece(raw, 0, MiB)], image)
    storage = LocalStorage(tmp_path / "store")
    stored = storage.upload(image, "a.qcow2", disposable=True, written_sha256=digest)
    assert stored.sha256 == digest == _sha256(tmp_path / "store" / "a.qcow2")
    assert os.path.samefile(image, tmp_path / "store" / "a.qcow2")  # linked, not copied


def test_a_copied_file_is_checked_against_the_written_digest(tmp_path: Path) -> None:
    """A source that is not disposable is copied and hashed as it is stored;
    the writer's digest is then ignored, and a disposable file is checked
    against it when it is given with another expected one."""
    image = tmp_path / "out.bin"
    image.write_bytes(b"content")
    storage = LocalStorage(tmp_path / "store")
    real = hashlib.sha256(b"content").hexdigest()
    stored = storage.upload(image, "kept.bin", written_sha256="0" * 64)
    assert stored.sha256 == real
    with pytest.raises(StorageError, match="is not the"):
        storage.upload(image, "b.bin", disposable=True, sha256=real, written_sha256="0" * 64)
    assert not (tmp_path / "store" / "b.bin").exists()


def test_a_large_file_is_read_once_per_process_until_it_changes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file of at least MEMO_MIN_SIZE (the cached base) has its non-zero
    clusters remembered: the second image reads none of its clusters to
    decide the layout, is the same, and a change to the file is seen."""
    size = qcow2_writer.MEMO_MIN_SIZE
    raw = tmp_path / "base.raw"
    with open(raw, "wb") as handle:
        handle.truncate(size)
        handle.seek(5 * CLUSTER_SIZE)
        handle.write(b"\x01" * CLUSTER_SIZE)
        handle.seek(9 * CLUSTER_SIZE)
        handle.write(bytes(CLUSTER_SIZE))  # data, but zeros: not stored
    # a file changed less than MEMO_SETTLED_NS ago is read every time
    monkeypatch.setattr(qcow2_writer, "MEMO_SETTLED_NS", 300_000_000)
    write_qcow2([Piece(raw, 0, size)], tmp_path / "fresh.qcow2")
    assert not any(key[1] == raw.stat().st_ino for key in qcow2_writer._memo)
    time.sleep(0.35)
    first = write_qcow2([Piece(raw, 0, size)], tmp_path / "first.qcow2")
    reads: list[int] = []
    real = qcow2_writer._nonzero

    def counting(disk: object, candidates: list[int], base: int = 0) -> list[int]:
        reads.extend(candidates)
        return real(disk, candidates, base)  # type: ignore[arg-type]

    monkeypatch.setattr(qcow2_writer, "_nonzero", counting)
    second = write_qcow2([Piece(raw, 0, size)], tmp_path / "second.qcow2")
    assert reads == [] and second == first
    assert (tmp_path / "second.qcow2").read_bytes() == (tmp_path / "first.qcow2").read_bytes()
    with open(raw, "r+b") as handle:  # a change: a new mtime, a new map
        handle.seek(9 * CLUSTER_SIZE)
        handle.write(b"\x02")
    write_qcow2([Piece(raw, 0, size)], tmp_path / "changed.qcow2")
    assert reads  # read again
    _check(tmp_path / "changed.qcow2", raw)
    # pieces cut across clusters are read, whatever the map says
    reads.clear()
    pieces = [Piece(raw, 0, 5 * CLUSTER_SIZE + 100), Piece(raw, 5 * CLUSTER_SIZE + 100,
                                                           size - 5 * CLUSTER_SIZE - 100)]
    write_qcow2(pieces, tmp_path / "cut.qcow2")
    assert 5 in reads
    _check(tmp_path / "cut.qcow2", raw)


def test_a_cached_base_keeps_its_map_beside_it_for_fresh_processes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The map of a cached base filesystem is written beside it
    (``<key>.qcow2-clusters``): a process that never read the base (its
    memo empty) reads none of its clusters to decide the layout, and writes
    the same bytes. A map of another version of the file, or a damaged one,
    is not believed."""
    size = qcow2_writer.MEMO_MIN_SIZE
    key = "ab" * 32
    base = tmp_path / f"{key}.ext4"
    (tmp_path / f"{key}.json").write_text("{}")
    with open(base, "wb") as handle:
        handle.truncate(size)
        handle.seek(3 * CLUSTER_SIZE)
        handle.write(b"\x01" * CLUSTER_SIZE)
        handle.seek(7 * CLUSTER_SIZE)
        handle.write(bytes(CLUSTER_SIZE))  # data, but zeros: not stored
    monkeypatch.setattr(qcow2_writer, "MEMO_SETTLED_NS", 200_000_000)
    time.sleep(0.25)  # settled
    sidecar = tmp_path / f"{key}.{qcow2_writer.MAP_SIDECAR}"
    first = write_qcow2([Piece(base, 0, size)], tmp_path / "first.qcow2")
    assert sidecar.is_file()
    assert [p.name for p in tmp_path.iterdir() if ".partial" in p.name] == []
    reads: list[int] = []
    real = qcow2_writer._nonzero

    def counting(disk: object, candidates: list[int], base: int = 0) -> list[int]:
        reads.extend(candidates)
        return real(disk, candidates, base)  # type: ignore[arg-type]

    monkeypatch.setattr(qcow2_writer, "_nonzero", counting)
    monkeypatch.setattr(qcow2_writer, "_memo", type(qcow2_writer._memo)())  # a fresh process
    second = write_qcow2([Piece(base, 0, size)], tmp_path / "second.qcow2")
    assert reads == [] and second == first
    _check(tmp_path / "second.qcow2", base)
    good = sidecar.read_bytes()
    for damaged in (good[:-2], good[:10], b"x" + good[1:], good + bytes(4)):
        sidecar.write_bytes(damaged)
        monkeypatch.setattr(qcow2_writer, "_memo", type(qcow2_writer._memo)())
        reads.clear()
        assert write_qcow2([Piece(base, 0, size)], tmp_path / "d.qcow2") == first
        assert reads  # read, and the map written again
        assert sidecar.read_bytes() == good
        (tmp_path / "d.qcow2").unlink()
    with open(base, "r+b") as handle:  # another version of the base: its own map
        handle.seek(7 * CLUSTER_SIZE)
        handle.write(b"\x02")
    time.sleep(0.25)
    monkeypatch.setattr(qcow2_writer, "_memo", type(qcow2_writer._memo)())
    reads.clear()
    write_qcow2([Piece(base, 0, size)], tmp_path / "changed.qcow2")
    assert reads
    _check(tmp_path / "changed.qcow2", base)
    assert sidecar.read_bytes() != good


def test_the_writeback_of_the_whole_file_is_started_as_it_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer asks for the writeback of every byte it wrote, in order,
    range after range (so the store's fsync finds the file written); a file
    system that refuses the advice gets the same file."""
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as handle:
        handle.write(os.urandom(40 * MiB))
        handle.truncate(64 * MiB)
    expected = write_qcow2([Piece(raw, 0, 64 * MiB)], tmp_path / "plain.qcow2")
    monkeypatch.setattr(qcow2_writer, "WRITEBACK_BYTES", 8 * MiB)
    calls: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def advise(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_DONTNEED
        calls.append((offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", advise)
    target = tmp_path / "advised.qcow2"
    assert write_qcow2([Piece(raw, 0, 64 * MiB)], target) == expected
    assert len(calls) >= 5 and calls[0][0] == 0 and calls[-1][1] == 0  # the rest, to the end
    for (offset, length), (following, _) in itertools.pairwise(calls):
        assert length >= 8 * MiB and offset + length == following
    assert calls[-1][0] <= target.stat().st_size

    def refuse(fd: int, offset: int, length: int, advice: int) -> None:
        raise OSError(95, "Operation not supported")

    monkeypatch.setattr(os, "posix_fadvise", refuse)
    assert write_qcow2([Piece(raw, 0, 64 * MiB)], tmp_path / "refused.qcow2") == expected
    assert _sha256(tmp_path / "refused.qcow2") == expected


def test_progress_counts_the_file_as_it_is_written(tmp_path: Path) -> None:
    """Reports never go back and end at the size of the file written."""
    raw = tmp_path / "disk.raw"
    with open(raw, "wb") as handle:
        handle.truncate(64 * 1024 * 1024)
        for offset in (0, 20 * 1024 * 1024, 63 * 1024 * 1024):
            handle.seek(offset)
            handle.write(os.urandom(3 * 1024 * 1024 if offset < 60 * 1024 * 1024 else 1024 * 1024))
    target = tmp_path / "disk.qcow2"
    reports: list[tuple[int, int | None]] = []
    write_qcow2((Piece(raw, 0, raw.stat().st_size),), target,
                progress=lambda done, total=None: reports.append((done, total)))
    assert len(reports) >= 2
    assert {total for _done, total in reports} == {target.stat().st_size}
    done = [value for value, _total in reports]
    assert done == sorted(done) and done[-1] == target.stat().st_size
