"""LibcloudStorage over libcloud's LOCAL driver (on disk) and its S3 driver (moto)."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from libcloud.storage.drivers.local import LocalStorageDriver
from libcloud.storage.drivers.s3 import S3StorageDriver

from cloudlets.drivers.providers import get_driver
from cloudlets.drivers.storage.libcloud import LibcloudStorage
from cloudlets.errors import ConfigurationError, StorageError
from cloudlets.testing.storage import StorageDriverConformance
from tests.moto_fixture import ACCESS_KEY, REGION, SECRET_KEY, MotoServer, moto_server

__all__ = ["moto_server"]  # the fixture, imported for pytest

_counter = itertools.count()


def _local_driver(base: Path, *, locking: bool = True) -> LocalStorageDriver:
    base.mkdir(parents=True, exist_ok=True)
    (base / "images").mkdir(exist_ok=True)
    return LocalStorageDriver(str(base), ex_use_locking=locking)


def _moto_driver(server: MotoServer) -> S3StorageDriver:
    host, port = server.endpoint.removeprefix("http://").split(":")
    return S3StorageDriver(ACCESS_KEY, SECRET_KEY, secure=False, host=host, port=int(port),
                           region=REGION)


class TestLibcloudLocalConformance(StorageDriverConformance):
    @pytest.fixture
    def storage(self, tmp_path: Path) -> LibcloudStorage:
        return LibcloudStorage(_local_driver(tmp_path / "store"))

    @pytest.fixture
    def new_location(self) -> Callable[[str], str]:
        return lambda name: f"libcloud://images/{next(_counter)}/{name}"


class TestLibcloudLocalBareLocationConformance(StorageDriverConformance):
    @pytest.fixture
    def storage(self, tmp_path: Path) -> LibcloudStorage:
        (tmp_path / "store" / "images").mkdir(parents=True)
        return LibcloudStorage("local", str(tmp_path / "store"))

    @pytest.fixture
    def new_location(self) -> Callable[[str], str]:
        return lambda name: f"images/{next(_counter)}-{name}"


class TestLibcloudLocalWithoutLockingConformance(StorageDriverConformance):
    """libcloud 3.9's LOCAL driver without locking swallows an exception the
    upload iterator raises; the adapter must notice anyway."""

    @pytest.fixture
    def storage(self, tmp_path: Path) -> LibcloudStorage:
        return LibcloudStorage(_local_driver(tmp_path / "store", locking=False))

    @pytest.fixture
    def new_location(self) -> Callable[[str], str]:
        return lambda name: f"libcloud://images/{next(_counter)}/{name}"


class TestLibcloudS3MotoConformance(StorageDriverConformance):
    @pytest.fixture
    def storage(self, moto_server: MotoServer) -> LibcloudStorage:
        moto_server.make_bucket("libcloud-conformance")
        return LibcloudStorage(_moto_driver(moto_server))

    @pytest.fixture
    def new_location(self) -> Callable[[str], str]:
        return lambda name: f"libcloud://libcloud-conformance/{next(_counter)}/{name}"


def test_registered_under_its_name() -> None:
    assert get_driver("storage", "libcloud") is LibcloudStorage


def test_local_provider_is_promoted_from_a_hidden_temporary(tmp_path: Path) -> None:
    base = tmp_path / "store"
    storage = LibcloudStorage(_local_driver(base))
    final = base / "images" / "disk.img"
    seen: list[list[str]] = []

    def chunks() -> Iterator[bytes]:
        for _ in range(3):
            seen.append(sorted(p.name for p in (base / "images").iterdir()))
            yield b"x" * 1000

    artifact = storage.upload(chunks(), "images/disk.img")
    assert artifact.size == 3000
    assert final.read_bytes() == b"x" * 3000
    assert all("disk.img" not in names for names in seen)
    assert all(n.startswith(".disk.img.") and n.endswith(".partial")
               for names in seen[1:] for n in names)
    assert sorted(p.name for p in (base / "images").iterdir()) == ["disk.img"]


def test_local_locks_live_under_the_cache_directory(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile

    system_tmp, cache = tmp_path / "tmp", tmp_path / "cache"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    monkeypatch.setenv("CLOUDLETS_CACHE_DIR", str(cache))
    storage = LibcloudStorage(_local_driver(tmp_path / "store"))
    storage.upload(iter([b"x" * 10]), "images/disk.img")
    storage.delete("images/disk.img")
    assert list(system_tmp.iterdir()) == []
    locks = list((cache / "locks" / "libcloud").iterdir())
    assert locks and all(p.suffix == ".lock" and len(p.stem) == 64 for p in locks)


def test_local_failure_leaves_no_temporary(tmp_path: Path) -> None:
    base = tmp_path / "store"
    storage = LibcloudStorage(_local_driver(base))
    with pytest.raises(StorageError, match="sha256"):
        storage.upload(b"abc", "images/x.img", sha256="3" * 64)
    assert list((base / "images").iterdir()) == []


def test_failed_overwrite_keeps_the_old_object(tmp_path: Path) -> None:
    base = tmp_path / "store"
    storage = LibcloudStorage(_local_driver(base))
    storage.upload(b"old", "images/keep.img")
    with pytest.raises(StorageError, match="sha256"):
        storage.upload(b"new", "images/keep.img", overwrite=True, sha256="4" * 64)
    assert (base / "images" / "keep.img").read_bytes() == b"old"


def test_s3_digest_mismatch_aborts_the_multipart_upload(moto_server: MotoServer) -> None:
    bucket = moto_server.make_bucket("libcloud-abort")
    storage = LibcloudStorage(_moto_driver(moto_server))
    with pytest.raises(StorageError, match="sha256"):
        storage.upload(b"payload", f"{bucket}/x.img", sha256="5" * 64)
    client = moto_server.client()
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_s3_object_and_metadata_seen_by_boto3(moto_server: MotoServer, tmp_path: Path) -> None:
    bucket = moto_server.make_bucket("libcloud-meta")
    data = bytes(range(256)) * 40_000  # two multipart parts
    source = tmp_path / "disk.raw"
    source.write_bytes(data)
    LibcloudStorage(_moto_driver(moto_server)).upload(source, f"libcloud://{bucket}/d.raw")
    head = moto_server.client().head_object(Bucket=bucket, Key="d.raw")
    assert head["ContentLength"] == len(data)
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    body = moto_server.client().get_object(Bucket=bucket, Key="d.raw")["Body"].read()
    assert body == data


def test_read_back_option(tmp_path: Path) -> None:
    storage = LibcloudStorage(_local_driver(tmp_path / "s"), ex_read_back=True)
    artifact = storage.upload(b"verified", "images/r.img")
    assert artifact.sha256 == hashlib.sha256(b"verified").hexdigest()


def test_missing_container_is_named(tmp_path: Path) -> None:
    storage = LibcloudStorage(_local_driver(tmp_path / "s"))
    with pytest.raises(StorageError, match="container 'nope'"):
        storage.upload(b"x", "nope/x.img")


@pytest.mark.parametrize("location", ["s3://images/x", "images", "images/", "/x",
                                      "libcloud://images/dir/"])
def test_rejects_bad_locations(tmp_path: Path, location: str) -> None:
    storage = LibcloudStorage(_local_driver(tmp_path / "s"))
    with pytest.raises(StorageError):
        storage.exists(location)


def test_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="no storage provider"):
        LibcloudStorage("no-such-provider")
    not_a_driver: Any = object()
    with pytest.raises(ConfigurationError, match="not a libcloud storage driver"):
        LibcloudStorage(not_a_driver)
