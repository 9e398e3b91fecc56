"""LocalStorage: the conformance suite plus atomicity and sparseness on the filesystem."""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloudlets import StorageError
from cloudlets.drivers.storage import local
from cloudlets.drivers.storage.local import LocalStorage
from cloudlets.testing.storage import StorageDriverConformance


class TestLocalStorageConformance(StorageDriverConformance):
    @pytest.fixture
    def storage(self) -> LocalStorage:
        return LocalStorage()

    @pytest.fixture
    def new_location(self, tmp_path: Path) -> Callable[[str], str]:
        counter = itertools.count()
        return lambda name: str(tmp_path / "out" / f"{next(counter)}-{name}")


class TestLocalStorageFileURLConformance(StorageDriverConformance):
    @pytest.fixture
    def storage(self) -> LocalStorage:
        return LocalStorage()

    @pytest.fixture
    def new_location(self, tmp_path: Path) -> Callable[[str], str]:
        counter = itertools.count()
        return lambda name: (tmp_path / f"{next(counter)} {name}").as_uri()


def test_no_partial_file_visible_while_writing(tmp_path: Path) -> None:
    storage = LocalStorage()
    final = tmp_path / "image.raw"
    seen: list[bool] = []

    def chunks() -> Iterator[bytes]:
        for _ in range(4):
            seen.append(final.exists())
            yield b"x" * 1000

    storage.upload(chunks(), str(final))
    assert seen == [False] * 4
    assert final.read_bytes() == b"x" * 4000
    assert [p.name for p in tmp_path.iterdir()] == ["image.raw"]


def test_failure_leaves_no_temporary_files(tmp_path: Path) -> None:
    storage = LocalStorage()

    def chunks() -> Iterator[bytes]:
        yield b"abc"
        raise OSError(28, "No space left on device")

    with pytest.raises(StorageError, match="No space left on device"):
        storage.upload(chunks(), str(tmp_path / "x.img"))
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path: Path) -> None:
    storage = LocalStorage()
    target = tmp_path / "x.img"
    target.write_bytes(b"old")
    with pytest.raises(StorageError, match="sha256"):
        storage.upload(b"new", str(target), sha256="1" * 64, overwrite=True)
    assert target.read_bytes() == b"old"


def test_root_confines_locations(tmp_path: Path) -> None:
    storage = LocalStorage(root=tmp_path / "jail")
    artifact = storage.upload(b"ok", "sub/a.img")
    assert artifact.location == str(tmp_path / "jail" / "sub" / "a.img")
    with pytest.raises(StorageError, match="outside the storage root"):
        storage.upload(b"no", "../escape.img")
    assert not (tmp_path / "escape.img").exists()


@pytest.mark.parametrize("location", ["http://example.com/x", "file://otherhost/x"])
def test_rejects_foreign_locations(location: str) -> None:
    with pytest.raises(StorageError):
        LocalStorage().upload(b"x", location)


def test_unreadable_directory_is_storage_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="cannot create directory"):
        LocalStorage().upload(b"x", str(blocker / "x.img"))


def test_artifact_is_fsynced_and_readable(tmp_path: Path) -> None:
    target = tmp_path / "x.img"
    artifact = LocalStorage().upload(b"data", str(target))
    assert oct(os.stat(target).st_mode & 0o777) == oct(0o644)
    assert artifact.size == 4


# -- sparse, in-kernel copies -------------------------------------------------

MiB = 1024 * 1024


def _sparse_source(path: Path) -> bytes:
    """A 64 MiB file: 3 MiB of data in four places, 2 MiB of written zeros,
    the rest holes. :returns: its content."""
    pieces = {0: os.urandom(MiB), 10 * MiB + 123: os.urandom(5000),
              20 * MiB: bytes(2 * MiB), 40 * MiB - 7: os.urandom(MiB + 9),
              64 * MiB - 1000: os.urandom(1000)}
    with open(path, "wb") as handle:
        handle.truncate(64 * MiB)
        for offset, data in pieces.items():
            handle.seek(offset)
            handle.write(data)
    return path.read_bytes()


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_sparse_source_stays_sparse(tmp_path: Path) -> None:
    source = tmp_path / "disk.raw"
    data = _sparse_source(source)
    if _allocated(source) > 16 * MiB:
        pytest.skip("this filesystem does not keep holes")
    target = tmp_path / "out" / "disk.raw"
    artifact = LocalStorage().upload(source, str(target))
    assert target.read_bytes() == data
    assert artifact.size == len(data) == 64 * MiB
    assert artifact.sha256 == hashlib.sha256(data).hexdigest()
    # 3 MiB of data, each piece rounded out to whole 1 MiB zero blocks at
    # most; the 2 MiB of written zeros are not written again.
    assert _allocated(target) <= 8 * MiB
    assert _allocated(target) < _allocated(source)


def test_stream_zeros_are_not_written(tmp_path: Path) -> None:
    data = os.urandom(100) + bytes(16 * MiB) + os.urandom(MiB) + bytes(8 * MiB)
    target = tmp_path / "stream.raw"

    def chunks() -> Iterator[bytes]:
        for offset in range(0, len(data), 3 * MiB + 5):  # unaligned chunks
            yield data[offset:offset + 3 * MiB + 5]

    artifact = LocalStorage().upload(chunks(), str(target))
    assert target.read_bytes() == data
    assert artifact.sha256 == hashlib.sha256(data).hexdigest()
    assert os.path.getsize(target) == len(data)
    assert _allocated(target) <= 4 * MiB


def test_all_zero_and_empty_sources(tmp_path: Path) -> None:
    zeros = tmp_path / "zeros.raw"
    zeros.write_bytes(bytes(3 * MiB + 1))
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    for source in (zeros, empty):
        target = tmp_path / "out" / source.name
        artifact = LocalStorage().upload(source, str(target))
        assert target.read_bytes() == source.read_bytes()
        assert artifact.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()
        assert _allocated(target) <= 64 * 1024


@pytest.mark.parametrize("unsupported", [("copy_file_range",),
                                         ("copy_file_range", "sendfile")])
def test_copy_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                         unsupported: tuple[str, ...]) -> None:
    """Across filesystems (EXDEV) or where a call is missing, the copy falls
    back to sendfile, then to pread/pwrite, with the same result."""
    calls: list[str] = []

    def refuse(name: str) -> Callable[..., int]:
        def refused(*args: object) -> int:
            calls.append(name)
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return refused

    for name in unsupported:
        monkeypatch.setattr(os, name, refuse(name))
    source = tmp_path / "disk.raw"
    data = _sparse_source(source)
    target = tmp_path / "out" / "disk.raw"
    artifact = LocalStorage().upload(source, str(target))
    assert target.read_bytes() == data
    assert artifact.sha256 == hashlib.sha256(data).hexdigest()
    assert sorted(set(calls)) == sorted(unsupported)


def test_copy_error_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "copy_file_range", full)
    source = tmp_path / "disk.raw"
    _sparse_source(source)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(StorageError, match="No space left on device"):
        LocalStorage().upload(source, str(out / "disk.raw"))
    assert list(out.iterdir()) == []


def test_source_changing_size_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "disk.raw"
    _sparse_source(source)
    runs = local.data_ranges

    def grow_then_list(fd: int, size: int | None = None) -> list[tuple[int, int]]:
        found = runs(fd, size)
        with open(source, "ab") as handle:
            handle.write(b"late")
        return found

    monkeypatch.setattr(local, "data_ranges", grow_then_list)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(StorageError, match="changed size"):
        LocalStorage().upload(source, str(out / "disk.raw"))
    assert list(out.iterdir()) == []


def test_caller_digest_still_checked_for_files(tmp_path: Path) -> None:
    source = tmp_path / "disk.raw"
    data = _sparse_source(source)
    target = tmp_path / "disk-copy.raw"
    with pytest.raises(StorageError, match="sha256"):
        LocalStorage().upload(source, str(target), sha256="2" * 64)
    assert not target.exists()
    digest = hashlib.sha256(data).hexdigest()
    assert LocalStorage().upload(source, str(target), sha256=digest).sha256 == digest


def test_file_source_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No hashing pass before the copy: the digest is taken from the copy."""
    import cloudlets.drivers.base as base

    def no_prehash(path: Path, chunk_size: int = 0) -> str:
        raise AssertionError("the file was hashed before the upload")

    monkeypatch.setattr(base, "sha256_file", no_prehash)
    source = tmp_path / "disk.raw"
    data = _sparse_source(source)
    artifact = LocalStorage().upload(source, str(tmp_path / "copy.raw"))
    assert artifact.sha256 == hashlib.sha256(data).hexdigest()


# -- disposable sources: linked into place, not copied ---------------------------


def test_disposable_source_is_linked_not_copied(tmp_path: Path) -> None:
    source = tmp_path / "work" / "disk.raw"
    source.parent.mkdir()
    data = _sparse_source(source)
    target = tmp_path / "out" / "disk.raw"
    artifact = LocalStorage().upload(source, str(target), disposable=True)
    assert os.path.samefile(source, target)  # the same inode: no byte copied
    assert artifact.size == len(data)
    assert artifact.sha256 == hashlib.sha256(data).hexdigest()
    assert oct(os.stat(target).st_mode & 0o777) == oct(0o644)
    assert sorted(p.name for p in target.parent.iterdir()) == ["disk.raw"]  # no temp left
    source.unlink()  # what the renderer does with its work directory
    assert target.read_bytes() == data


def test_disposable_source_is_still_verified(tmp_path: Path) -> None:
    source = tmp_path / "disk.raw"
    data = _sparse_source(source)
    target = tmp_path / "out" / "disk.raw"
    with pytest.raises(StorageError, match="sha256"):
        LocalStorage().upload(source, str(target), sha256="2" * 64, disposable=True)
    assert not target.parent.exists()  # nothing left, not even the directory it made
    assert source.read_bytes() == data  # the caller's file is untouched
    assert os.stat(source).st_nlink == 1


def test_disposable_source_refuses_to_overwrite(tmp_path: Path) -> None:
    source = tmp_path / "disk.raw"
    source.write_bytes(b"new")
    target = tmp_path / "old.raw"
    target.write_bytes(b"old")
    with pytest.raises(StorageError, match="overwrite"):
        LocalStorage().upload(source, str(target), disposable=True)
    assert target.read_bytes() == b"old"
    LocalStorage().upload(source, str(target), disposable=True, overwrite=True)
    assert target.read_bytes() == b"new" and os.path.samefile(source, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.raw", "old.raw"]


def test_disposable_source_on_another_file_system_is_copied(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) \
            or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no writable /dev/shm on another file system than the test's")
    source = shm / f"cloudlets-test-{os.getpid()}.raw"
    try:
        data = _sparse_source(source)
        target = tmp_path / "out" / "disk.raw"
        artifact = LocalStorage().upload(source, str(target), disposable=True)
        assert not os.path.samefile(source, target)
        assert target.read_bytes() == data
        assert artifact.sha256 == hashlib.sha256(data).hexdigest()
    finally:
        source.unlink(missing_ok=True)


def test_non_disposable_source_is_copied(tmp_path: Path) -> None:
    source = tmp_path / "disk.raw"
    source.write_bytes(b"keep me apart")
    target = tmp_path / "copy.raw"
    LocalStorage().upload(source, str(target))
    assert not os.path.samefile(source, target)
    source.write_bytes(b"changed")
    assert target.read_bytes() == b"keep me apart"


def test_a_failed_upload_or_a_deletion_leaves_no_directory_it_made(tmp_path: Path) -> None:
    storage = LocalStorage(root=str(tmp_path))
    (tmp_path / "kept").mkdir()

    def broken() -> Iterator[bytes]:
        yield b"x" * 1000
        raise StorageError("the source went away")

    with pytest.raises(StorageError, match="went away"):
        storage.upload(broken(), "kept/key0123/sub/disk.raw")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"]
    assert list((tmp_path / "kept").iterdir()) == []  # it existed before: kept
    storage.upload(b"data", "kept/key4567/disk.raw")
    storage.upload(b"more", "kept/key4567/other.raw")
    storage.delete("kept/key4567/disk.raw")
    assert (tmp_path / "kept" / "key4567").is_dir()  # not empty yet
    storage.delete("kept/key4567/other.raw")
    assert list((tmp_path / "kept").iterdir()) == []


def test_remove_partials_clears_what_a_killed_writer_left(tmp_path: Path) -> None:
    store = LocalStorage(root=str(tmp_path))
    directory = tmp_path / "tenant" / "img"
    directory.mkdir(parents=True)
    (directory / ".disk.raw.abc123.partial").write_bytes(b"half")
    (directory / "disk.raw").write_bytes(b"whole")
    removed = store.ex_remove_partials("tenant/img/")
    assert removed == [str(directory / ".disk.raw.abc123.partial")]
    assert sorted(p.name for p in directory.iterdir()) == ["disk.raw"]
    assert store.ex_remove_partials("tenant/nothing-here/") == []
