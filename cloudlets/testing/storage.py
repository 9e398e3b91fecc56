"""The storage driver conformance suite.

Subclass :class:`StorageDriverConformance` (named ``Test...`` so pytest
collects it) and provide two fixtures:

``storage``
    a ready :class:`~cloudlets.drivers.base.StorageDriver` instance.
``new_location``
    a callable ``name -> location`` returning a fresh location each call.

Tests that need a capability the driver does not declare are skipped, so a
driver is only held to what it claims; capabilities are read from the
instance, which may declare less than its class (an HTTP driver that writes
the final name directly is not ``ATOMIC``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloudlets.drivers.base import StorageDriver
from cloudlets.drivers.types import StorageCapability
from cloudlets.errors import StorageError

__all__ = ["StorageDriverConformance"]

NewLocation = Callable[[str], str]


def _payload(size: int, seed: int = 0) -> bytes:
    block = hashlib.sha256(f"cloudlets-conformance-{seed}".encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def _read_back(storage: StorageDriver, location: str) -> bytes:
    with storage.open(location) as handle:
        return handle.read()


class StorageDriverConformance:
    """Shared behaviour every storage driver must show."""

    #: Payload size for the multi-chunk test; drivers with a large chunk
    #: size may lower their CHUNK_SIZE in the fixture instead.
    multi_chunk_count = 3

    def _needs(self, storage: StorageDriver, capability: StorageCapability) -> None:
        if not storage.capabilities & capability:
            pytest.skip(f"{storage.name} does not declare {capability.name}")

    def test_declares_identity(self, storage: StorageDriver) -> None:
        assert isinstance(storage.name, str) and storage.name
        assert isinstance(storage.capabilities, StorageCapability)
        assert storage.CHUNK_SIZE > 0

    def test_fresh_location_does_not_exist(self, storage: StorageDriver,
                                           new_location: NewLocation) -> None:
        assert not storage.exists(new_location("fresh.img"))

    def test_upload_file_reports_size_and_digest(self, storage: StorageDriver,
                                                 new_location: NewLocation,
                                                 tmp_path: Path) -> None:
        data = _payload(100_003)
        source = tmp_path / "source.img"
        source.write_bytes(data)
        location = new_location("file.img")
        artifact = storage.upload(source, location, role="disk")
        assert artifact.size == len(data)
        assert artifact.sha256 == hashlib.sha256(data).hexdigest()
        assert artifact.role == "disk"
        assert storage.exists(location)
        if storage.capabilities & StorageCapability.READ:
            assert _read_back(storage, location) == data

    def test_upload_multi_chunk_stream(self, storage: StorageDriver,
                                       new_location: NewLocation) -> None:
        self._needs(storage, StorageCapability.STREAM)
        chunk = storage.CHUNK_SIZE
        size = chunk * self.multi_chunk_count + 17
        data = _payload(size, seed=1)

        def chunks() -> Iterator[bytes]:
            for offset in range(0, size, 65536):
                yield data[offset:offset + 65536]

        location = new_location("stream.img")
        artifact = storage.upload(chunks(), location)
        assert artifact.size == size
        assert artifact.sha256 == hashlib.sha256(data).hexdigest()
        if storage.capabilities & StorageCapability.READ:
            assert _read_back(storage, location) == data

    def test_refuses_silent_overwrite(self, storage: StorageDriver,
                                      new_location: NewLocation) -> None:
        location = new_location("twice.img")
        storage.upload(b"first", location, size=5)
        with pytest.raises(StorageError, match="overwrite"):
            storage.upload(b"second", location, size=6)
        if storage.capabilities & StorageCapability.READ:
            assert _read_back(storage, location) == b"first"

    def test_overwrite_when_asked(self, storage: StorageDriver,
                                  new_location: NewLocation) -> None:
        location = new_location("replace.img")
        storage.upload(b"first", location, size=5)
        artifact = storage.upload(b"second!", location, size=7, overwrite=True)
        assert artifact.size == 7
        if storage.capabilities & StorageCapability.READ:
            assert _read_back(storage, location) == b"second!"

    def test_digest_mismatch_leaves_nothing(self, storage: StorageDriver,
                                            new_location: NewLocation) -> None:
        location = new_location("mismatch.img")
        with pytest.raises(StorageError, match="sha256"):
            storage.upload(b"payload", location, size=7, sha256="0" * 64)
        assert not storage.exists(location)

    def test_file_digest_mismatch_leaves_nothing(self, storage: StorageDriver,
                                                 new_location: NewLocation,
                                                 tmp_path: Path) -> None:
        source = tmp_path / "mismatch.img"
        source.write_bytes(_payload(70_001, seed=2))
        location = new_location("file-mismatch.img")
        with pytest.raises(StorageError, match="sha256"):
            storage.upload(source, location, sha256="1" * 64)
        assert not storage.exists(location)

    def test_failing_source_leaves_nothing(self, storage: StorageDriver,
                                           new_location: NewLocation) -> None:
        self._needs(storage, StorageCapability.STREAM)
        location = new_location("broken.img")

        class SourceBroke(Exception):
            pass

        def chunks() -> Iterator[bytes]:
            yield os.urandom(1000)
            raise SourceBroke("the source failed half-way")

        with pytest.raises(SourceBroke):
            storage.upload(chunks(), location)
        assert not storage.exists(location)

    def test_short_source_leaves_nothing(self, storage: StorageDriver,
                                         new_location: NewLocation) -> None:
        location = new_location("short.img")
        with pytest.raises(StorageError, match="bytes"):
            storage.upload(iter([b"12345"]), location, size=10)
        assert not storage.exists(location)

    def test_delete(self, storage: StorageDriver, new_location: NewLocation) -> None:
        self._needs(storage, StorageCapability.DELETE)
        location = new_location("delete.img")
        storage.upload(b"bye", location, size=3)
        storage.delete(location)
        assert not storage.exists(location)
        with pytest.raises(StorageError):
            storage.delete(location)

    def test_atomic_interrupted_upload_keeps_what_was_there(
            self, storage: StorageDriver, new_location: NewLocation) -> None:
        """``ATOMIC``: while an upload runs, the final name shows the previous
        object, and an upload that fails half-way leaves it in place."""
        self._needs(storage, StorageCapability.ATOMIC)
        location = new_location("atomic.img")
        storage.upload(b"first", location, size=5)
        first = _payload(storage.CHUNK_SIZE + 4096, seed=3)
        seen: list[bytes | bool] = []

        class SourceBroke(Exception):
            pass

        def chunks() -> Iterator[bytes]:
            yield first  # more than a chunk: the driver has started writing
            readable = storage.capabilities & StorageCapability.READ
            seen.append(_read_back(storage, location) if readable
                        else storage.exists(location))
            raise SourceBroke("the source failed half-way")

        with pytest.raises(SourceBroke):
            storage.upload(chunks(), location, size=len(first) * 2, overwrite=True)
        expected: bytes | bool = b"first" if storage.capabilities & StorageCapability.READ \
            else True
        assert seen == [expected], "the final name changed during an atomic upload"
        assert storage.exists(location)
        if storage.capabilities & StorageCapability.READ:
            assert _read_back(storage, location) == b"first"

    def test_atomic_failed_verification_keeps_what_was_there(
            self, storage: StorageDriver, new_location: NewLocation, tmp_path: Path) -> None:
        """``ATOMIC``: every byte sent, then the digest check fails: the
        previous object is still the one at the final name."""
        self._needs(storage, StorageCapability.ATOMIC)
        location = new_location("atomic-verify.img")
        storage.upload(b"first", location, size=5)
        source = tmp_path / "second.img"
        source.write_bytes(_payload(50_001, seed=4))
        with pytest.raises(StorageError, match="sha256"):
            storage.upload(source, location, sha256="2" * 64, overwrite=True)
        assert storage.exists(location)
        if storage.capabilities & StorageCapability.READ:
            assert _read_back(storage, location) == b"first"

    def test_atomic_failed_upload_to_a_free_name_leaves_nothing(
            self, storage: StorageDriver, new_location: NewLocation) -> None:
        """``ATOMIC``: the base deletes nothing after an atomic driver's
        failure (that could remove an object that existed before), so the
        driver itself must leave nothing at the final name."""
        self._needs(storage, StorageCapability.ATOMIC)
        location = new_location("atomic-free.img")
        seen: list[bool] = []

        class SourceBroke(Exception):
            pass

        def chunks() -> Iterator[bytes]:
            yield _payload(storage.CHUNK_SIZE + 4096, seed=5)
            seen.append(storage.exists(location))
            raise SourceBroke("the source failed half-way")

        with pytest.raises(SourceBroke):
            storage.upload(chunks(), location, size=2 * storage.CHUNK_SIZE + 8192)
        assert seen == [False], "the final name appeared during an atomic upload"
        assert not storage.exists(location)
