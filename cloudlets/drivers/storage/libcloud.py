"""Any libcloud storage provider: Swift, Azure Blobs, Google Storage, MinIO, Local...

:class:`LibcloudStorage` adapts a libcloud ``StorageDriver`` (an instance,
or a provider name and its credentials) to the cloudlets storage contract.
Bytes are streamed with ``upload_object_via_stream``; the expected size and
digest are checked as the last chunk is pulled, *before* the provider is
told the upload is complete, so a mismatch aborts the request (or the S3
multipart upload) and nothing appears.

Object stores publish an object only once its upload completes (an S3
``CompleteMultipartUpload``, an Azure block list commit, a Swift or GCS
``PUT``), which makes the direct upload atomic. libcloud's ``LOCAL``
provider writes straight into the final file, so for it (and for any
provider declared with ``ex_atomic=False``) the driver uploads to a hidden
temporary object and promotes it once verified: a rename on disk for
``LOCAL``, a streamed server-to-client-to-server copy otherwise.

libcloud's ``LOCAL`` provider locks each object with a file named after
the object path's sha256 in the system temporary directory, and never
removes it. The driver moves those lock files under the cloudlets cache
directory (``locks/libcloud/`` in :func:`~cloudlets.paths.default_cache_dir`),
where the tarball cache keeps its own locks.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, cast

from cloudlets.drivers.base import StorageDriver, UploadSource
from cloudlets.drivers.types import Storage, StorageCapability
from cloudlets.errors import ConfigurationError, StorageError
from cloudlets.paths import default_cache_dir

__all__ = ["LibcloudStorage"]

log = logging.getLogger(__name__)


def _libcloud() -> Any:
    """Import libcloud's storage API, or say what to install."""
    try:
        import libcloud.storage.providers as providers
    except ImportError:  # pragma: no cover - a core dependency
        raise ConfigurationError("libcloud storage needs apache-libcloud: "
                                 "pip install apache-libcloud") from None
    return providers


def _lock_under_cache(driver: Any) -> None:
    """Make a libcloud ``LOCAL`` driver that locks (``ex_use_locking``, its
    default) keep its lock files under the cache directory instead of the
    system temporary directory."""
    from libcloud.storage.drivers.local import LockLocalStorage

    if getattr(driver, "_lock_cls", None) is not LockLocalStorage:
        return  # locking off (or a subclass that chose its own locks)
    directory = default_cache_dir() / "locks" / "libcloud"

    class CacheDirLock(LockLocalStorage):
        def __init__(self, path: str, timeout: int = 5) -> None:
            import fasteners  # type: ignore[import-untyped]

            super().__init__(path, timeout)  # type: ignore[no-untyped-call]
            directory.mkdir(parents=True, exist_ok=True)
            self.ipc_lock_path = os.fspath(directory / Path(self.ipc_lock_path).name)
            self.ipc_lock = fasteners.InterProcessLock(self.ipc_lock_path)

    driver._lock_cls = CacheDirLock


class _StreamReader(io.RawIOBase):
    """A readable file over an iterator of byte chunks (a download)."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while not self._pending:
            try:
                self._pending = bytes(next(self._chunks))
            except StopIteration:
                return 0
        count = min(len(view), len(self._pending))
        view[:count] = self._pending[:count]
        self._pending = self._pending[count:]
        return count

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if close is not None:
            close()
        super().close()


class LibcloudStorage(StorageDriver):
    """Store artifacts with any libcloud storage driver.

    Location syntax: ``libcloud://container/object/name`` or just
    ``container/object/name``. The container must exist.

    :param driver: a libcloud storage driver instance, or a provider name
        (``"s3"``, ``"azure_blobs"``, ``"google_storage"``, ``"local"``...,
        see :class:`libcloud.storage.types.Provider`) to instantiate.
    :param key: the provider's key (user, account, base path for ``local``),
        when ``driver`` is a provider name.
    :param secret: the provider's secret, when ``driver`` is a provider name.
    :param ex_driver_options: further keyword arguments for the libcloud
        driver's constructor (``region``, ``host``, ``ex_use_locking``...).
    :param ex_atomic: whether the provider publishes an object only once its
        upload completes; ``None`` decides from the provider (all but
        ``local``).
    :param ex_read_back: after uploading, download the object and compare
        its digest (slow; for providers whose transport has no integrity
        check of its own).
    :raises ConfigurationError: for an unknown provider.
    """

    name: ClassVar[str] = Storage.LIBCLOUD
    website: ClassVar[str] = "https://libcloud.readthedocs.io/en/stable/storage/"
    description: ClassVar[str] = "Any libcloud storage provider (Swift, Azure, GCS, ...)"
    capabilities: ClassVar[StorageCapability] = (
        StorageCapability.STREAM | StorageCapability.VERIFY | StorageCapability.DELETE
        | StorageCapability.READ | StorageCapability.ATOMIC)
    CHUNK_SIZE: ClassVar[int] = 1024 * 1024
    #: The sha256 goes into the object's metadata, which providers take with
    #: the first request of an upload.
    NEEDS_DIGEST_FIRST: ClassVar[bool] = True
    #: The location scheme this driver accepts (besides ``container/object``).
    SCHEME: ClassVar[str] = "libcloud"
    #: Whether ``container/object`` without a scheme is accepted.
    BARE_LOCATIONS: ClassVar[bool] = True

    def __init__(self, driver: Any, key: str | None = None, secret: str | None = None, *,
                 ex_driver_options: Mapping[str, Any] | None = None,
                 ex_atomic: bool | None = None, ex_read_back: bool = False) -> None:
        providers = _libcloud()
        if isinstance(driver, str):
            try:
                cls = providers.get_driver(driver)
            except AttributeError:
                raise ConfigurationError(f"libcloud has no storage provider {driver!r}") \
                    from None
            try:
                driver = cls(key, secret, **dict(ex_driver_options or {}))
            except Exception as exc:  # noqa: BLE001 - libcloud raises anything here
                raise ConfigurationError(f"cannot set up libcloud provider {driver!r}: "
                                         f"{type(exc).__name__}: {exc}") from None
        from libcloud.storage.base import StorageDriver as LibcloudDriver
        if not isinstance(driver, LibcloudDriver):
            raise ConfigurationError(f"not a libcloud storage driver: {type(driver).__name__}")
        self.driver: Any = driver
        self._local = self._is_local(driver)
        if self._local:
            _lock_under_cache(driver)
        self.ex_atomic = (not self._local) if ex_atomic is None else ex_atomic
        self.ex_read_back = ex_read_back

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.driver).__name__})"

    def identity(self) -> dict[str, str]:
        """The libcloud provider and its endpoint (host, port, region) when
        it has one; never the key or secret."""
        found = {"provider": type(self.driver).__name__}
        for attribute in ("region", "host", "port", "api_version"):
            value = getattr(self.driver, attribute, None)
            if isinstance(value, str | int) and not isinstance(value, bool) and value != "":
                found[attribute] = str(value)
        return found

    # -- standard API -------------------------------------------------------

    def exists(self, location: str) -> bool:
        container, name = self.ex_parse_location(location)
        return self._get_object(container, name, location) is not None

    # -- extensions ---------------------------------------------------------

    def ex_parse_location(self, location: str) -> tuple[str, str]:
        """Split a location into container and object name.

        :returns: ``(container, object_name)``.
        :raises StorageError: for a location of another scheme, or without a
            container or an object name.
        """
        rest = location
        prefix = f"{self.SCHEME}://"
        if location.startswith(prefix):
            rest = location[len(prefix):]
        elif "://" in location or not self.BARE_LOCATIONS:
            raise StorageError(f"{self.name} storage needs a {prefix}container/object "
                               f"location, not {location}", location)
        container, _, name = rest.partition("/")
        if not container or not name or name.endswith("/"):
            raise StorageError(f"{location} does not name a container and an object",
                               location)
        return container, name

    # -- for the base class -------------------------------------------------

    def _upload(self, source: UploadSource, location: str, *, overwrite: bool) -> str:
        container_name, name = self.ex_parse_location(location)
        container = self._get_container(container_name, location)
        target = name if self.ex_atomic else self._temporary(name)
        try:
            self._stream_to(container, target, self._verified(source, location), source,
                            location)
            self._check_stored(container_name, target, source, location)
            if not self.ex_atomic:
                self._promote(container, target, name, source, location, overwrite=overwrite)
            self._after_upload(container, name, source, location)
        except BaseException:
            if target != name or not overwrite:
                # Ours alone: a temporary object, or a name that was free.
                self._discard(container_name, target)
            raise
        return location

    def _delete(self, location: str) -> None:
        container, name = self.ex_parse_location(location)
        obj = self._get_object(container, name, location)
        if obj is None:
            raise StorageError(f"{location} does not exist", location)
        try:
            deleted = self.driver.delete_object(obj)
        except Exception as exc:  # noqa: BLE001 - libcloud errors have no common base
            raise self._error("delete", location, exc) from None
        if deleted is False:
            raise StorageError(f"cannot delete {location}", location)

    def _open(self, location: str) -> BinaryIO:
        container, name = self.ex_parse_location(location)
        obj = self._get_object(container, name, location)
        if obj is None:
            raise StorageError(f"{location} does not exist", location)
        try:
            chunks = iter(self.driver.download_object_as_stream(obj,
                                                                chunk_size=self.CHUNK_SIZE))
        except Exception as exc:  # noqa: BLE001
            raise self._error("read", location, exc) from None
        return cast(BinaryIO, io.BufferedReader(_StreamReader(chunks), self.CHUNK_SIZE))

    # -- hooks for provider-specific subclasses ---------------------------------

    def _object_extra(self, source: UploadSource) -> dict[str, Any]:
        """The ``extra`` libcloud passes to the provider (content type,
        metadata, ACL...)."""
        extra: dict[str, Any] = {"content_type": source.media_type}
        if source.sha256 is not None:
            extra["meta_data"] = {"sha256": source.sha256}
        return extra

    def _after_upload(self, container: Any, name: str, source: UploadSource,
                      location: str) -> None:
        """Run once the object is in place (e.g. record a late digest)."""

    # -- private helpers ----------------------------------------------------

    @staticmethod
    def _is_local(driver: Any) -> bool:
        # By module, so a missing "fasteners" (which libcloud's LOCAL driver
        # imports) does not break the other providers.
        return any(cls.__module__ == "libcloud.storage.drivers.local"
                   for cls in type(driver).__mro__)

    def _error(self, what: str, location: str, exc: BaseException) -> StorageError:
        detail = getattr(exc, "value", None) or str(exc) or type(exc).__name__
        return StorageError(f"cannot {what} {location}: {type(exc).__name__}: {detail}",
                            location)

    def _get_container(self, container: str, location: str) -> Any:
        from libcloud.storage.types import ContainerDoesNotExistError
        try:
            return self.driver.get_container(container)
        except ContainerDoesNotExistError:
            raise StorageError(f"container {container!r} of {location} does not exist",
                               location) from None
        except Exception as exc:  # noqa: BLE001
            raise self._error("open the container of", location, exc) from None

    def _get_object(self, container: str, name: str, location: str) -> Any | None:
        from libcloud.storage.types import (
            ContainerDoesNotExistError,
            ObjectDoesNotExistError,
        )
        try:
            return self.driver.get_object(container, name)
        except (ObjectDoesNotExistError, ContainerDoesNotExistError):
            return None
        except Exception as exc:  # noqa: BLE001
            raise self._error("look up", location, exc) from None

    def _verified(self, source: UploadSource, location: str) -> _Verified:
        return _Verified(source, location, self.CHUNK_SIZE)

    def _stream_to(self, container: Any, name: str, chunks: _Verified,
                   source: UploadSource, location: str) -> Any:
        try:
            result = self.driver.upload_object_via_stream(
                iterator=iter(chunks), container=container, object_name=name,
                extra=self._object_extra(source))
        except BaseException as exc:
            if chunks.error is not None or isinstance(exc, StorageError):
                raise  # the source failed: its own error is what the caller needs
            raise self._error("upload to", location, exc) from None
        # Some providers swallow an error raised by the iterator (libcloud
        # 3.9's LOCAL driver without locking does): do not trust a return.
        if chunks.error is not None:
            raise chunks.error
        if not chunks.finished:
            raise StorageError(f"the provider stopped reading before the end of the "
                               f"upload to {location}", location)
        return result

    def _check_stored(self, container: str, name: str, source: UploadSource,
                      location: str) -> None:
        obj = self._stored_object(container, name, source, location)
        if self.ex_read_back:
            self._read_back(obj, source, location)

    def _stored_object(self, container: str, name: str, source: UploadSource,
                       location: str) -> Any:
        """:returns: the uploaded object, which must hold what was sent.
        :raises StorageError: it is missing or of another size."""
        obj = self._get_object(container, name, location)
        if obj is None:
            raise StorageError(f"{location} is missing after upload", location)
        if obj.size is not None and int(obj.size) != source.bytes_read:
            raise StorageError(f"{location} holds {obj.size} bytes after upload, "
                               f"sent {source.bytes_read}", location)
        return obj

    def _read_back(self, obj: Any, source: UploadSource, location: str) -> None:
        """Download the object and compare its sha256 with what was sent.

        :raises StorageError: on a mismatch or a failed download."""
        digest = hashlib.sha256()
        try:
            for chunk in self.driver.download_object_as_stream(obj, self.CHUNK_SIZE):
                digest.update(chunk)
        except Exception as exc:  # noqa: BLE001
            raise self._error("read back", location, exc) from None
        if digest.hexdigest() != source.digest:
            raise StorageError(f"{location} reads back with sha256 {digest.hexdigest()},"
                               f" sent {source.digest}", location)

    def _promote(self, container: Any, temporary: str, name: str, source: UploadSource,
                 location: str, *, overwrite: bool) -> None:
        """Give a verified temporary object its final name."""
        if self._local:
            base = self.driver.get_object_cdn_url(_ObjectRef(container, temporary))
            final = self.driver.get_object_cdn_url(_ObjectRef(container, name))
            os.makedirs(os.path.dirname(final), exist_ok=True)
            try:
                if overwrite:
                    os.replace(base, final)
                else:
                    os.link(base, final)
                    os.unlink(base)
            except FileExistsError:
                raise StorageError(f"refusing to overwrite existing {location}",
                                   location) from None
            except OSError as exc:
                raise StorageError(f"cannot move {location} into place: {exc.strerror}",
                                   location) from None
            return
        obj = self.driver.get_object(container.name, temporary)
        copy = iter(self.driver.download_object_as_stream(obj, self.CHUNK_SIZE))
        try:
            self.driver.upload_object_via_stream(iterator=copy, container=container,
                                                 object_name=name,
                                                 extra=self._object_extra(source))
        except Exception as exc:  # noqa: BLE001 - any provider error, reported
            if not overwrite:
                self._discard(container.name, name)
            raise self._error("copy into place", location, exc) from None
        self._check_stored(container.name, name, source, location)
        self._discard(container.name, temporary)

    def _temporary(self, name: str) -> str:
        directory, _, base = name.rpartition("/")
        tmp = f".{base}.{secrets.token_hex(8)}.partial"
        return f"{directory}/{tmp}" if directory else tmp

    def _discard(self, container: str, name: str) -> None:
        try:
            obj = self.driver.get_object(container, name)
            self.driver.delete_object(obj)
        except Exception:  # noqa: BLE001 - best effort, the upload error wins
            log.debug("nothing to clean up at %s/%s", container, name)


class _Verified:
    """The source's chunks; once the last is pulled, and before the provider
    is told the upload is complete, size and digest are checked. Records
    whether the stream ended and what it raised."""

    def __init__(self, source: UploadSource, location: str, chunk_size: int) -> None:
        self._source = source
        self._location = location
        self._chunk_size = chunk_size
        self.finished = False
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[bytes]:
        source = self._source
        size = source.size
        try:
            for chunk in source.chunks(self._chunk_size):
                if size is not None and source.bytes_read > size:
                    source.verify(self._location)
                yield chunk
            source.verify(self._location)
        except GeneratorExit:
            raise
        except BaseException as exc:
            self.error = exc
            raise
        self.finished = True


class _ObjectRef:
    """The two attributes libcloud's LOCAL driver reads to map an object to
    its path, for an object that does not exist yet."""

    def __init__(self, container: Any, name: str) -> None:
        self.container = container
        self.name = name
