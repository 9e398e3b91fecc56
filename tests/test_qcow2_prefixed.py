"""The qcow2 writer's layout over a cached base: a prefix the base alone
decides (header, the unpatched base's clusters), copied under a known hash
state on a re-render; qemu-img finds every such file clean and equal to the
disk, and the digest returned is the file's on every path (state remembered
in the process, saved beside the base, missing, damaged, or no libcrypto)."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudlets.drivers.formats import hashstate, qcow2_writer
from cloudlets.drivers.formats.qcow2_writer import CLUSTER_SIZE, write_qcow2
from cloudlets.errors import FormatError
from cloudlets.sparse import Piece, overlay

MiB = 1024 * 1024
KEY = "c0" * 32
OTHER_KEY = "d1" * 32
HEAD = MiB  # the disk's bytes before the base (partition table, boot code)
BASE_SIZE = 8 * MiB


@pytest.fixture(autouse=True)
def _settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every base counts as settled and large enough for its cluster map to
    be remembered, and the process remembers nothing yet."""
    monkeypatch.setattr(qcow2_writer, "MEMO_SETTLED_NS", 0)
    monkeypatch.setattr(qcow2_writer, "MEMO_MIN_SIZE", 0)
    monkeypatch.setattr(qcow2_writer, "_prefix_memo", type(qcow2_writer._prefix_memo)())
    monkeypatch.setattr(qcow2_writer, "_memo", type(qcow2_writer._memo)())


def _base(directory: Path, key: str = KEY, size: int = BASE_SIZE, salt: bytes = b"") -> Path:
    """A cached base filesystem ``<key>.ext4`` (with its ``.json``): data
    clusters, holes, a cluster of written zeros, a cluster with one byte."""
    path = directory / f"{key}.ext4"
    (directory / f"{key}.json").write_text(json.dumps({"size": size}))
    with open(path, "wb") as handle:
        handle.truncate(size)
        for offset, length in ((0, 2 * CLUSTER_SIZE), (3 * CLUSTER_SIZE, 5 * CLUSTER_SIZE),
                               (3 * MiB, MiB + 4096), (size - 3000, 3000)):
            handle.seek(offset)
            handle.write(_pattern(salt + b"%d" % offset, length))
        handle.seek(MiB)
        handle.write(bytes(CLUSTER_SIZE))  # data on the file system, zeros in content
        handle.seek(6 * MiB + 7)
        handle.write(b"\1")
    return path


def _pattern(seed: bytes, length: int) -> bytes:
    block = hashlib.sha256(seed).digest() * 2048
    return (block * (length // len(block) + 1))[:length]


def _disk(directory: Path, base: Path, patches: dict[int, bytes], *,
          name: str = "d", tail: int = MiB) -> tuple[list[Piece], list[Piece], Path]:
    """The disk ``[HEAD][base, with patches over it][tail]`` as pieces, the
    same without the patches, and the raw disk joined."""
    base_size = base.stat().st_size
    size = HEAD + base_size + tail
    around = directory / f"{name}.around"
    with open(around, "wb") as handle:
        handle.truncate(size)
        handle.write(_pattern(b"mbr", 4096))
        handle.seek(HEAD - 8192)
        handle.write(_pattern(b"core", 8192))
        if tail:
            handle.seek(size - 4096)
            handle.write(_pattern(b"backup gpt", 4096))
    patched = directory / f"{name}.patched"
    with open(patched, "wb") as handle:
        handle.truncate(base_size)
        for offset, data in patches.items():
            handle.seek(offset)
            handle.write(data)
    ranges = sorted((offset, offset + len(data)) for offset, data in patches.items())
    tail_pieces = [Piece(around, HEAD + base_size, tail)] if tail else []
    pieces = [Piece(around, 0, HEAD), *overlay(base, base_size, patched, ranges), *tail_pieces]
    unpatched = [Piece(around, 0, HEAD), Piece(base, 0, base_size), *tail_pieces]
    raw = directory / f"{name}.raw"
    with open(raw, "wb") as out:
        out.truncate(size)
        position = 0
        for piece in pieces:
            with open(piece.path, "rb") as source:
                source.seek(piece.offset)
                out.seek(position)
                out.write(source.read(piece.length))
            position += piece.length
    return pieces, unpatched, raw


def _check(image: Path, raw: Path) -> None:
    check = subprocess.run(["qemu-img", "check", "--output=json", str(image)],
                           capture_output=True, text=True, check=False, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads(check.stdout)
    assert report.get("corruptions", 0) == report.get("leaks", 0) == 0, report
    assert not report.get("check-errors"), report
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw),
                              str(image)], capture_output=True, text=True, check=False,
                             timeout=60)
    assert compare.returncode == 0, compare.stdout + compare.stderr


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _offsets(image: Path) -> tuple[int, int]:
    """The L1 and refcount tables' offsets in the header."""
    header = image.read_bytes()[:104]
    return int.from_bytes(header[40:48], "big"), int.from_bytes(header[48:56], "big")


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The bytes the writer reads, counted: the disk's and the base's read
    for the hash (the prefix, when copied under a known state, is not read
    at all)."""
    counted: list[int] = []
    real = qcow2_writer._Disk.read
    real_exact = qcow2_writer._pread_exact

    def read(self: qcow2_writer._Disk, view: memoryview, position: int) -> None:
        counted.append(len(view))
        real(self, view, position)

    def read_exact(fd: int, view: memoryview, offset: int) -> None:
        counted.append(len(view))
        real_exact(fd, view, offset)

    monkeypatch.setattr(qcow2_writer._Disk, "read", read)
    monkeypatch.setattr(qcow2_writer, "_pread_exact", read_exact)
    yield counted


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The bytes the writer writes from user space (not copied in the kernel)."""
    counted: list[int] = []
    real = qcow2_writer._pwrite_all

    def write(fd: int, view: memoryview, offset: int) -> None:
        counted.append(len(view))
        real(fd, view, offset)

    monkeypatch.setattr(qcow2_writer, "_pwrite_all", write)
    yield counted


CASES = {
    "unpatched": {},
    "patched": {3 * CLUSTER_SIZE - 100: b"p" * 300, 3 * MiB + 5: b"q" * 70_000},
    "zero-in-base": {2 * MiB + 10: b"new data where the base is a hole"},
    "zeroed": {0: bytes(2 * CLUSTER_SIZE)},  # data clusters patched to zeros
}


@pytest.mark.parametrize("case", CASES)
def test_the_layout_reads_back_clean_and_equal(tmp_path: Path, case: str) -> None:
    base = _base(tmp_path)
    pieces, unpatched, raw = _disk(tmp_path, base, CASES[case])
    image = tmp_path / "out.qcow2"
    digest = write_qcow2(pieces, image, unpatched=unpatched)
    _check(image, raw)
    assert digest == _sha256(image)
    l1_offset, table_offset = _offsets(image)
    assert table_offset > l1_offset > CLUSTER_SIZE  # the prefixed layout
    # the prefix: the header and the base's non-zero clusters (the written zeros left out)
    base_clusters = {offset // CLUSTER_SIZE for offset in (0, 65536, 3 * 65536, 4 * 65536,
                                                            5 * 65536, 6 * 65536, 7 * 65536)}
    base_clusters |= set(range(3 * MiB // CLUSTER_SIZE, (4 * MiB + 4096) // CLUSTER_SIZE + 1))
    base_clusters |= {6 * MiB // CLUSTER_SIZE, (BASE_SIZE - 3000) // CLUSTER_SIZE}
    assert l1_offset == (1 + len(base_clusters)) * CLUSTER_SIZE


def test_every_patch_over_a_base_shares_its_prefix(tmp_path: Path) -> None:
    """The file up to its L1 table is the same for any patch (the bytes a
    re-render copies instead of hashing); the rest differs."""
    base = _base(tmp_path)
    prefixes = set()
    files = set()
    for number, patches in enumerate(CASES.values()):
        pieces, unpatched, _ = _disk(tmp_path, base, patches, name=f"d{number}")
        image = tmp_path / f"{number}.qcow2"
        write_qcow2(pieces, image, unpatched=unpatched)
        data = image.read_bytes()
        prefixes.add(data[:_offsets(image)[0]])
        files.add(data)
    assert len(prefixes) == 1 and len(files) == len(CASES)


def test_a_patch_in_the_last_partial_cluster(tmp_path: Path) -> None:
    """A base whose end is not a cluster's, at the end of the disk: its
    last cluster is not in the prefix but in the tail, patched or not."""
    base = _base(tmp_path, size=BASE_SIZE - 4096)
    for name, patches in (("plain", {}), ("end", {BASE_SIZE - 4096 - 50: b"e" * 50})):
        pieces, unpatched, raw = _disk(tmp_path, base, patches, name=name, tail=0)
        image = tmp_path / f"{name}.qcow2"
        assert write_qcow2(pieces, image, unpatched=unpatched) == _sha256(image)
        _check(image, raw)


def test_warm_fresh_and_cold_paths_write_the_same_file(tmp_path: Path, reads: list[int],
                                                       writes: list[int]) -> None:
    """The first write hashes the prefix (read once, for the hash; written
    by copying in the kernel) and keeps its state; the next (remembered
    state) and one in a fresh process (state from the file beside the base)
    copy it without reading it: same bytes, and the digest is hashlib's over
    the file each time."""
    base = _base(tmp_path)
    pieces, unpatched, raw = _disk(tmp_path, base, CASES["patched"])
    sidecar = tmp_path / f"{KEY}.{qcow2_writer.PREFIX_SIDECAR}"
    cold = tmp_path / "cold.qcow2"
    assert write_qcow2(pieces, cold, unpatched=unpatched) == _sha256(cold)
    prefix_data = _offsets(cold)[0] - CLUSTER_SIZE  # 26 clusters of the base
    assert sidecar.is_file() and sum(reads) >= prefix_data > MiB
    assert sum(writes) < MiB  # the header, the tail and the tables
    reads.clear()
    warm = tmp_path / "warm.qcow2"
    assert write_qcow2(pieces, warm, unpatched=unpatched) == _sha256(warm)
    assert sum(reads) < MiB  # the tail only: the head's data, the patched clusters
    reads.clear()
    qcow2_writer._prefix_memo.clear()  # a fresh process
    fresh = tmp_path / "fresh.qcow2"
    assert write_qcow2(pieces, fresh, unpatched=unpatched) == _sha256(fresh)
    assert sum(reads) < MiB
    assert cold.read_bytes() == warm.read_bytes() == fresh.read_bytes()
    _check(fresh, raw)


def test_without_libcrypto_the_state_stays_in_the_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reads: list[int]) -> None:
    monkeypatch.setattr(hashstate, "_loaded", True)
    monkeypatch.setattr(hashstate, "_lib", None)
    assert not hashstate.available()
    base = _base(tmp_path)
    pieces, unpatched, raw = _disk(tmp_path, base, CASES["patched"])
    first = tmp_path / "first.qcow2"
    assert write_qcow2(pieces, first, unpatched=unpatched) == _sha256(first)
    assert not (tmp_path / f"{KEY}.{qcow2_writer.PREFIX_SIDECAR}").exists()
    reads.clear()
    second = tmp_path / "second.qcow2"
    assert write_qcow2(pieces, second, unpatched=unpatched) == _sha256(second)
    assert sum(reads) < MiB  # hashlib's copy, remembered
    assert first.read_bytes() == second.read_bytes()
    _check(second, raw)


def _written_once(directory: Path, key: str) -> Path:
    """Another base (other content), in ``directory``, written over once:
    its prefix's hash state is saved beside it."""
    directory.mkdir()
    other = _base(directory, key, salt=b"other")
    pieces, unpatched, _ = _disk(directory, other, {})
    write_qcow2(pieces, directory / "o.qcow2", unpatched=unpatched)
    return other


def _recounted(data: bytes) -> bytes:
    """A state file whose SHA256_CTX says one byte more was hashed, with its
    checksum made good: only the state's own check can refuse it."""
    magic = len(qcow2_writer._PREFIX_MAGIC)
    body = bytearray(data[magic:-32])
    state_at = 32 + 8
    count = int.from_bytes(body[state_at + 32:state_at + 36], "little")
    body[state_at + 32:state_at + 36] = (count + 8).to_bytes(4, "little")
    head = data[:magic] + bytes(body)
    return head + hashlib.sha256(head).digest()


@pytest.mark.parametrize("damage", ["flipped", "truncated", "longer", "empty", "recounted",
                                    "other-base", "base-touched"])
def test_a_state_that_does_not_fit_is_not_used(tmp_path: Path, damage: str,
                                               reads: list[int]) -> None:
    """A damaged state file, or one of another base, or of a base changed
    since: the prefix is read and hashed again (same file, right digest)
    and the state saved anew."""
    base = _base(tmp_path)
    pieces, unpatched, _ = _disk(tmp_path, base, CASES["patched"])
    reference = tmp_path / "reference.qcow2"
    write_qcow2(pieces, reference, unpatched=unpatched)
    sidecar = tmp_path / f"{KEY}.{qcow2_writer.PREFIX_SIDECAR}"
    good = sidecar.read_bytes()
    if damage == "flipped":
        sidecar.write_bytes(good[:70] + bytes([good[70] ^ 1]) + good[71:])  # in h[]
    elif damage == "truncated":
        sidecar.write_bytes(good[:-1])
    elif damage == "longer":
        sidecar.write_bytes(good + b"\0")
    elif damage == "empty":
        sidecar.write_bytes(b"")
    elif damage == "recounted":
        sidecar.write_bytes(_recounted(good))
    elif damage == "other-base":
        other = _written_once(tmp_path / "other", KEY)
        shutil.copyfile(other.with_name(sidecar.name), sidecar)
        assert sidecar.read_bytes() != good
    else:
        os.utime(base, ns=(base.stat().st_atime_ns, base.stat().st_mtime_ns + 1_000_000))
    qcow2_writer._prefix_memo.clear()
    reads.clear()
    again = tmp_path / "again.qcow2"
    assert write_qcow2(pieces, again, unpatched=unpatched) == _sha256(again)
    assert again.read_bytes() == reference.read_bytes()
    assert sum(reads) >= _offsets(again)[0] - CLUSTER_SIZE  # the prefix read and hashed
    if damage != "base-touched":
        assert sidecar.read_bytes() == good  # saved anew


def test_a_file_system_that_cannot_copy_in_the_kernel(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    base = _base(tmp_path)
    pieces, unpatched, raw = _disk(tmp_path, base, CASES["patched"])
    expected = write_qcow2(pieces, tmp_path / "first.qcow2", unpatched=unpatched)
    calls: list[int] = []

    def refuse(*args: object) -> int:
        calls.append(1)
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(qcow2_writer.os, "copy_file_range", refuse)
    image = tmp_path / "copied.qcow2"
    assert write_qcow2(pieces, image, unpatched=unpatched) == expected == _sha256(image)
    assert calls == [1]  # asked once, then read and written
    _check(image, raw)


def test_the_copied_prefix_is_written_back_as_it_goes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writeback advice covers the whole file, the copied prefix
    included, range after range."""
    base = _base(tmp_path)
    pieces, unpatched, _ = _disk(tmp_path, base, CASES["patched"])
    write_qcow2(pieces, tmp_path / "first.qcow2", unpatched=unpatched)
    monkeypatch.setattr(qcow2_writer, "WRITEBACK_BYTES", CLUSTER_SIZE * 4)
    calls: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def advise(fd: int, offset: int, length: int, advice: int) -> None:
        calls.append((offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", advise)
    image = tmp_path / "advised.qcow2"
    write_qcow2(pieces, image, unpatched=unpatched)
    assert len(calls) >= 5 and calls[0][0] == 0 and calls[-1][1] == 0
    for (offset, length), (following, _) in itertools.pairwise(calls):
        assert offset + length == following
    assert calls[1][0] <= _offsets(image)[0]  # advised within the prefix


def test_without_a_cached_base_the_plain_layout(tmp_path: Path) -> None:
    """Unpatched pieces with no cached base among them change nothing; a
    different size is refused."""
    base = _base(tmp_path)
    (tmp_path / f"{KEY}.json").unlink()  # no longer a cached base
    pieces, unpatched, _ = _disk(tmp_path, base, CASES["patched"])
    plain = tmp_path / "plain.qcow2"
    write_qcow2(pieces, plain)
    given = tmp_path / "given.qcow2"
    write_qcow2(pieces, given, unpatched=unpatched)
    assert plain.read_bytes() == given.read_bytes()
    assert _offsets(given)[1] == CLUSTER_SIZE  # the refcount table in cluster 1
    with pytest.raises(FormatError, match="unpatched disk"):
        write_qcow2(pieces, tmp_path / "short.qcow2", unpatched=unpatched[:-1])
    assert not (tmp_path / "short.qcow2").exists()


def test_saved_states_restore_only_where_they_fit() -> None:
    """hashstate: a state saved after some bytes continues to hashlib's
    digest; a state that cannot be the one after that many bytes is refused."""
    if not hashstate.available():  # pragma: no cover - libcrypto is in the image
        pytest.skip("no libcrypto")
    data = _pattern(b"state", 3 * 65536 + 17)
    running = hashstate.Sha256()
    running.update(data[:65536])
    state = running.state()
    assert state is not None and len(state) == hashstate.STATE_SIZE
    restored = hashstate.Sha256.restore(state, 65536)
    assert restored is not None
    restored.update(memoryview(bytearray(data[65536:])))
    assert restored.hexdigest() == hashlib.sha256(data).hexdigest()
    copy = running.copy()
    copy.update(data[65536:])
    assert copy.hexdigest() == hashlib.sha256(data).hexdigest()
    assert running.hexdigest() == hashlib.sha256(data[:65536]).hexdigest()
    assert hashstate.Sha256.restore(state, 65537) is None
    assert hashstate.Sha256.restore(state[:-1], 65536) is None


# -- the head start: the prefix copied while the render still patches ----------


def _ahead(base: Path, target: Path, size: int | None = None) -> qcow2_writer.PrefixCopy:
    disk_size = size if size is not None else HEAD + base.stat().st_size + MiB
    return qcow2_writer.PrefixCopy.start(base, start=HEAD, disk_size=disk_size, target=target)


def test_a_prefix_copied_ahead_is_adopted(tmp_path: Path, reads: list[int],
                                          writes: list[int]) -> None:
    """Under a known state, the header and the base's clusters are copied
    before the patch is known; the writer adopts them and writes the rest:
    the file a write without the head start makes, the digest hashlib's."""
    base = _base(tmp_path)
    first, first_unpatched, _ = _disk(tmp_path, base, CASES["zero-in-base"], name="first")
    write_qcow2(first, tmp_path / "first.qcow2", unpatched=first_unpatched)
    qcow2_writer._prefix_memo.clear()  # a fresh process: the state from the file beside the base
    target = tmp_path / "ahead.qcow2"
    ahead = _ahead(base, target)
    pieces, unpatched, raw = _disk(tmp_path, base, CASES["patched"])
    reads.clear()
    writes.clear()
    try:
        digest = write_qcow2(pieces, target, unpatched=unpatched, ahead=ahead)
    finally:
        ahead.close()
    assert digest == _sha256(target)
    l1_offset = _offsets(target)[0]
    assert ahead.details() == {"adopted": True, "bytes": l1_offset}
    assert sum(reads) < MiB and sum(writes) < MiB  # the prefix was neither read nor written here
    plain = tmp_path / "plain.qcow2"
    write_qcow2(pieces, plain, unpatched=unpatched)
    assert target.read_bytes() == plain.read_bytes()
    _check(target, raw)
    assert target.is_file()  # closing an adopted copy leaves the writer's file


def test_without_a_known_state_nothing_is_copied_ahead(tmp_path: Path) -> None:
    """A prefix that must be hashed as well is left to the writer: the head
    start says why, leaves no file, and the write is the plain one."""
    base = _base(tmp_path)
    target = tmp_path / "out.qcow2"
    ahead = _ahead(base, target)
    pieces, unpatched, raw = _disk(tmp_path, base, CASES["patched"])
    try:
        digest = write_qcow2(pieces, target, unpatched=unpatched, ahead=ahead)
    finally:
        ahead.close()
    assert digest == _sha256(target)
    details = ahead.details()
    assert details["adopted"] is False and details["bytes"] == 0
    assert "hash state is not known" in str(details["declined"])
    _check(target, raw)


@pytest.mark.parametrize("other", ["another-base", "another-place", "another-target"])
def test_a_copy_of_another_prefix_is_removed_and_the_file_written_whole(
        tmp_path: Path, other: str) -> None:
    """A head start whose prefix is not the disk's (another base, the base
    elsewhere in the disk, another file) is discarded: its file is removed
    and the disk's own file written as without it."""
    base = _base(tmp_path)
    pieces, unpatched, raw = _disk(tmp_path, base, CASES["patched"])
    reference = tmp_path / "reference.qcow2"
    write_qcow2(pieces, reference, unpatched=unpatched)  # the state is known from here on
    target = tmp_path / "out.qcow2"
    if other == "another-base":
        ahead = _ahead(_written_once(tmp_path / "other", OTHER_KEY), target)
    elif other == "another-place":
        ahead = qcow2_writer.PrefixCopy.start(
            base, start=HEAD + CLUSTER_SIZE, disk_size=HEAD + 2 * BASE_SIZE, target=target)
    else:
        ahead = _ahead(base, tmp_path / "elsewhere.qcow2")
    try:
        digest = write_qcow2(pieces, target, unpatched=unpatched, ahead=ahead)
    finally:
        ahead.close()
    assert digest == _sha256(target)
    assert target.read_bytes() == reference.read_bytes()
    assert ahead.details()["adopted"] is False
    assert not (tmp_path / "elsewhere.qcow2").exists()
    _check(target, raw)


def test_a_head_start_closed_unused_leaves_nothing(tmp_path: Path) -> None:
    base = _base(tmp_path)
    pieces, unpatched, _ = _disk(tmp_path, base, {})
    write_qcow2(pieces, tmp_path / "first.qcow2", unpatched=unpatched)
    target = tmp_path / "out.qcow2"
    ahead = _ahead(base, target)
    ahead.close()
    assert not target.exists()
    assert not any(thread.name == "cloudlets-qcow2-ahead" and thread.is_alive()
                   for thread in threading.enumerate())
    ahead.close()  # twice: nothing more to do


def test_a_head_start_that_cannot_write_leaves_the_writer_to_say_why(tmp_path: Path) -> None:
    """The head start's own failure is never the render's: it declines, and
    the writer writes the file (or fails with its own error)."""
    base = _base(tmp_path)
    pieces, unpatched, raw = _disk(tmp_path, base, {})
    write_qcow2(pieces, tmp_path / "first.qcow2", unpatched=unpatched)
    target = tmp_path / "out.qcow2"
    target.write_bytes(b"in the way")  # the head start creates its file exclusively
    ahead = _ahead(base, target)
    try:
        assert ahead.adopt(None, ()) is None  # waits for it: it has declined by now
    finally:
        ahead.close()
    assert "the copy failed: File exists" in str(ahead.details()["declined"])
    assert target.read_bytes() == b"in the way"  # not its file: left alone
    target.unlink()
    again = _ahead(base, target)
    try:
        assert write_qcow2(pieces, target, unpatched=unpatched, ahead=again) == _sha256(target)
    finally:
        again.close()
    _check(target, raw)
