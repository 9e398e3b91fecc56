"""LocalStorage: the conformance suite plus atomicity on the filesystem."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloudlets import StorageError
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
