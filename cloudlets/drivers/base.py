"""The two driver contracts: :class:`FormatDriver` and :class:`StorageDriver`.

A **format driver** turns the bootable raw disk (and, when it asks for it, the
rendered root filesystem) into the files a consumer imports. It never stores
anything itself: it writes :class:`OutputFile` objects into a work directory
the Renderer owns.

A **storage driver** puts a stream of bytes at a location and reports a
:class:`StoredArtifact` (location, size, sha256). It never learns which format
produced the bytes. The base class counts and hashes what passes through,
checks the driver's declared capabilities before dispatch and refuses to
report success for bytes that do not match the expected digest.

The digest is computed once, as the bytes stream: that is the artifact's
digest. Only a driver that declares :attr:`StorageDriver.NEEDS_DIGEST_FIRST`
(it sends the digest before the first byte, e.g. as S3 object metadata at
the start of a multipart upload) gets a file source hashed beforehand when
the caller gave no ``sha256``; the streamed bytes are still hashed and must
match it.

Where a format needs a step after storing (EC2 registers an AMI once the disk
is on S3) it implements :meth:`FormatDriver.publish`, which receives the
stored artifacts and the storage driver; the two families never import each
other.
"""

from __future__ import annotations

import hashlib
import io
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar, Protocol
from urllib.parse import urlencode

from cloudlets.drivers.types import FormatCapability, StorageCapability
from cloudlets.errors import CloudletsError, ConfigurationError, StorageError
from cloudlets.progress import PartProgress
from cloudlets.sparse import Piece
from cloudlets.urls import redact

if TYPE_CHECKING:
    from cloudlets.config import RenderConfig
    from cloudlets.manifest import Manifest

__all__ = [
    "BaseInDisk",
    "Deletion",
    "DiskImage",
    "FormatContext",
    "FormatDriver",
    "HeadStart",
    "OutputFile",
    "PublishResult",
    "StorageDriver",
    "StoredArtifact",
    "UploadSource",
    "delete_locations",
]


@dataclass(frozen=True)
class DiskImage:
    """The bootable disk the disk stage built, handed to format drivers.

    :ivar path: the raw disk image (sparse file).
    :ivar size: its virtual size in bytes.
    :ivar firmware: ``bios``, ``uefi`` or ``both``.
    :ivar tree_tar: the rendered root filesystem as a normalized tar, for
        formats that ship the tree rather than a disk.
    :ivar details: what the render records about the disk
        (``RenderResult.details["disk"]``), for people; a driver reads the
        typed fields below.
    :ivar pieces: only for a driver with
        :attr:`~cloudlets.drivers.types.FormatCapability.COMPOSED_DISK`, and
        then possibly not empty: the disk is these byte ranges of files, in
        order, and :attr:`path` alone lacks the root filesystem.
        :func:`cloudlets.drivers.formats.qemuimg.convert` reads either form.
    :ivar unpatched: with :attr:`pieces`, possibly: the same disk before the
        render patched it (its root filesystem the cached base, whole), for
        a driver that lays out first what every render over that base
        shares (:mod:`~cloudlets.drivers.formats.qcow2_writer`).
    :ivar root_offset: where the root filesystem's partition starts, in
        bytes (``None``: not known, e.g. a tree).
    :ivar root_uuid: the root filesystem's UUID (what ``root=UUID=`` names).
    :ivar source_date_epoch: the timestamp the disk stage wrote everywhere a
        tool would have taken the clock; a reproducible driver uses it for
        its own timestamps (``None``: not pinned).
    """

    path: Path
    size: int
    firmware: str = "bios"
    tree_tar: Path | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    pieces: tuple[Piece, ...] = ()
    unpatched: tuple[Piece, ...] = ()
    root_offset: int | None = None
    root_uuid: str | None = None
    source_date_epoch: int | None = None


@dataclass(frozen=True)
class BaseInDisk:
    """Where the cached base root filesystem lies in the disk of a render
    over it, known before the render has patched it
    (:meth:`FormatDriver.head_start`).

    :ivar path: the cached base filesystem (read only, never changed).
    :ivar start: its offset in the disk, in bytes.
    :ivar length: its size in bytes.
    :ivar disk_size: the disk's virtual size in bytes.
    """

    path: Path
    start: int
    length: int
    disk_size: int


class HeadStart(Protocol):
    """What :meth:`FormatDriver.head_start` began: closed by the Renderer
    when the render ends, whether :meth:`FormatDriver.convert` used it or
    not."""

    def close(self) -> None:
        """Stop the work and remove whatever ``convert`` did not adopt; wait
        for the driver's thread to end. Called once, never raises."""

    def details(self) -> Mapping[str, Any]:
        """What the render records about it (JSON-ready), in
        ``RenderResult.details["head_start"]``."""


def _no_progress(done: int, total: int | None = None) -> None:
    """The default :attr:`FormatContext.progress`: reports nowhere."""


@dataclass(frozen=True)
class FormatContext:
    """Everything a format driver receives.

    :ivar manifest: the validated manifest.
    :ivar config: the merged render configuration.
    :ivar disk: the bootable raw disk.
    :ivar workdir: an empty directory the driver writes its outputs into;
        the Renderer deletes it after storing.
    :ivar basename: the file stem outputs should use (``debian-12``).
    :ivar progress: the ``convert`` stage's progress, for a driver that can
        tell it: call ``progress(done, total)`` as the conversion advances,
        ``done`` of ``total`` bytes (``total`` defaults to
        :attr:`DiskImage.size`, the disk's virtual size; a driver counting
        other bytes gives its own total and the fraction is what counts).
        Cheap to call (reports are throttled and never go back), but call it
        per MiB or so, not per block. Optional: a driver that never calls it
        shows the stage complete when :meth:`FormatDriver.convert` returns;
        outside a render it does nothing.
        :func:`cloudlets.drivers.formats.qemuimg.convert` takes it as its
        ``progress``.
    :ivar head_start: what this driver's :meth:`FormatDriver.head_start`
        began for this render, if anything; ``convert`` checks that it fits
        :attr:`disk` before using it. The work directory then holds what it
        wrote.
    """

    manifest: Manifest
    config: RenderConfig
    disk: DiskImage
    workdir: Path
    basename: str
    progress: PartProgress = field(default=_no_progress, repr=False,
                                                        compare=False)
    head_start: HeadStart | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class OutputFile:
    """One file a format driver produced.

    :ivar role: what the file is (``disk``, ``descriptor``, ``manifest``,
        ``domain-config``...).
    :ivar path: where the driver wrote it (inside the work directory).
    :ivar name: the file name to store it under, relative to the output base.
    :ivar media_type: its MIME type.
    :ivar sha256: the file's digest, when the driver computed it in the pass
        that wrote the file (the renderer hands it to the storage driver as
        ``written_sha256``, which then need not read the file again).
    """

    role: str
    path: Path
    name: str
    media_type: str = "application/octet-stream"
    sha256: str | None = None


@dataclass(frozen=True)
class StoredArtifact:
    """One artifact as the storage driver stored it.

    :ivar role: copied from the :class:`OutputFile`.
    :ivar location: where it is now (a path or URL, credentials redacted).
    :ivar size: bytes stored.
    :ivar sha256: hex digest of the bytes stored.
    :ivar media_type: its MIME type.
    :ivar extra: driver-specific facts (a presigned URL, an ETag...).
    """

    role: str
    location: str
    size: int
    sha256: str
    media_type: str = "application/octet-stream"
    extra: Mapping[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """:returns: a JSON-ready dict."""
        return {
            "role": self.role,
            "location": self.location,
            "size": self.size,
            "sha256": self.sha256,
            "media_type": self.media_type,
            "extra": dict(self.extra),
        }


@dataclass(frozen=True)
class PublishResult:
    """What :meth:`FormatDriver.publish` reports, e.g. a registered AMI.

    :ivar image_id: the consumer's id for the image, if it assigned one.
    :ivar details: anything else worth recording.
    """

    image_id: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class UploadSource:
    """Bytes on their way to a storage driver.

    The base class builds this from a path, a binary file or an iterator of
    bytes, and hashes and counts every chunk a driver pulls through
    :meth:`chunks`. Drivers that hand a file to an external tool may read
    :attr:`path` instead (set only when the source is a regular file).

    :ivar path: the source file, when there is one.
    :ivar size: the length in bytes, when known beforehand.
    :ivar sha256: the expected digest, when known beforehand.
    :ivar media_type: the MIME type.
    :ivar disposable: the caller gives the file up (see
        :meth:`StorageDriver.upload`): a driver may move it into place
        instead of copying it.
    :ivar on_bytes: called with :attr:`bytes_read` as bytes are counted
        (the ``progress`` of :meth:`StorageDriver.upload`).
    :ivar written_sha256: for a :attr:`disposable` file, its digest as its
        writer computed it in the pass that wrote it (see
        :meth:`take_written_digest`).
    """

    path: Path | None
    size: int | None
    sha256: str | None
    media_type: str
    disposable: bool = False
    _iterable: Iterable[bytes] | None = None
    _file: BinaryIO | None = None
    _hash: Any = field(default_factory=hashlib.sha256)
    bytes_read: int = 0
    on_bytes: Callable[[int], None] | None = None
    written_sha256: str | None = None
    _consumed: bool = False

    def chunks(self, chunk_size: int) -> Iterator[bytes]:
        """Yield the content once, in chunks of at most ``chunk_size`` bytes
        (iterator sources yield their own chunk sizes).

        :raises StorageError: when called twice on a non-rewindable source.
        """
        if self._consumed and self.path is None:
            raise StorageError("upload source is a stream and was already consumed")
        self._consumed = True
        self._hash = hashlib.sha256()
        self.bytes_read = 0
        if self._iterable is not None:
            for chunk in self._iterable:
                if chunk:
                    self._account(chunk)
                    yield chunk
            return
        handle: BinaryIO
        close = False
        if self.path is not None:
            handle = open(self.path, "rb")  # noqa: SIM115
            close = True
        else:
            assert self._file is not None
            handle = self._file
        try:
            while True:
                chunk = handle.read(chunk_size)
                if not chunk:
                    break
                self._account(chunk)
                yield chunk
        finally:
            if close:
                handle.close()

    def account(self, data: bytes | bytearray | memoryview) -> None:
        """Count and hash bytes a driver moved itself, in order.

        For a driver that copies :attr:`path` without pulling :meth:`chunks`
        (in the kernel, say): it reads back what it stored and passes it
        here, so the digest is of the bytes as stored.

        :raises StorageError: for a stream source (pull :meth:`chunks`).
        """
        if self.path is None:
            raise StorageError("a stream source is read through chunks()")
        self._consumed = True
        self._account(data)

    def restart(self) -> None:
        """Forget what :meth:`account` counted: a driver sends a file again
        (a retried upload). :meth:`chunks` does this itself."""
        if self.path is None:
            raise StorageError("a stream source cannot be sent again")
        self._hash = hashlib.sha256()
        self.bytes_read = 0

    def account_zeros(self, length: int) -> None:
        """Like :meth:`account` for ``length`` zero bytes: a hole the driver
        left in what it stored, which reads as zeros."""
        while length > 0:
            step = min(length, len(_ZEROS))
            self.account(_ZEROS_VIEW[:step])
            length -= step

    def _account(self, chunk: bytes | bytearray | memoryview) -> None:
        self._hash.update(chunk)
        self.bytes_read += len(chunk)
        if self.on_bytes is not None:
            self.on_bytes(self.bytes_read)

    def verify(self, location: str) -> None:
        """Check the bytes pulled so far against the expected size and digest.
        Drivers call this before making an artifact visible at its final
        location; the base calls it again after :meth:`StorageDriver._upload`.

        :raises StorageError: on a mismatch.
        """
        shown = redact(location)
        if self.size is not None and self.bytes_read != self.size:
            raise StorageError(f"upload to {shown} sent {self.bytes_read} bytes, "
                               f"expected {self.size}", shown)
        if self.sha256 is not None and self.digest != self.sha256:
            raise StorageError(f"upload to {shown} sent content with sha256 {self.digest}, "
                               f"expected {self.sha256}", shown)

    @property
    def digest(self) -> str:
        """sha256 of the bytes pulled through :meth:`chunks` so far."""
        return str(self._hash.hexdigest())

    def take_written_digest(self) -> bool:
        """For a driver that stores the very file its writer wrote (a hard
        link, no byte copied): count :attr:`size` bytes with the digest the
        writer computed while writing them, instead of reading the file back.

        :returns: ``False`` (nothing counted) unless the source is a
            disposable file with a :attr:`written_sha256` that agrees with the
            expected :attr:`sha256`, if any; then read it as usual.
        """
        written = self.written_sha256
        if (written is None or not self.disposable or self.path is None or self.size is None
                or self.sha256 not in (None, written)):
            return False
        self._consumed = True
        self.bytes_read = self.size
        self._hash = _FixedDigest(written)
        if self.on_bytes is not None:
            self.on_bytes(self.bytes_read)
        return True

    def mark_read_externally(self) -> None:
        """Declare that a driver handed :attr:`path` to an external tool
        instead of pulling :meth:`chunks`; the base then trusts the
        precomputed :attr:`sha256` and :attr:`size` (a driver doing this
        declares :attr:`StorageDriver.NEEDS_DIGEST_FIRST`)."""
        if self.path is None or self.sha256 is None or self.size is None:
            raise StorageError("only a file source with a known digest can be read externally")
        self._consumed = True
        self.bytes_read = self.size
        self._hash = _FixedDigest(self.sha256)


#: Zeros for :meth:`UploadSource.account_zeros`.
_ZEROS = bytes(1024 * 1024)
_ZEROS_VIEW = memoryview(_ZEROS)


class _FixedDigest:
    def __init__(self, hexdigest: str) -> None:
        self._hex = hexdigest

    def hexdigest(self) -> str:
        return self._hex


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    """:returns: the hex sha256 of a file, read in constant memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


class FormatDriver(ABC):
    """Base of every output type.

    Subclasses declare :attr:`name`, :attr:`website`, :attr:`capabilities`
    and :attr:`description`, and implement :meth:`convert`.
    """

    #: Registry name (a :class:`~cloudlets.drivers.types.Format` value for ours).
    name: ClassVar[str]
    #: Where the format is specified.
    website: ClassVar[str] = ""
    #: One line for ``cloudlets drivers`` and the docs matrix.
    description: ClassVar[str] = ""
    #: What the driver can do.
    capabilities: ClassVar[FormatCapability] = FormatCapability.BOOTABLE
    #: The suffix of the primary output's name (``".qcow2"``). An output
    #: location given as a base that already ends with it (``out/web.qcow2``)
    #: names the files ``web.*``; without it that suffix is not recognized.
    #: An instance may set its own (EC2's depends on the disk format).
    extension: str = ""

    @abstractmethod
    def convert(self, context: FormatContext) -> list[OutputFile]:
        """Convert the disk into this format.

        :param context: the manifest, config, disk and an empty work directory.
        :returns: the files written, the primary one first; every path lies
            inside ``context.workdir``.
        :raises FormatError: when the conversion fails.
        """

    def head_start(self, base: BaseInDisk, workdir: Path, basename: str) -> HeadStart | None:
        """Optionally begin, on a thread of the driver's own, the part of the
        output that every render over a cached base shares, while this
        render still renders its templates and patches the base.

        Called for a re-render over a cached base, before the disk is
        built, with the work directory and basename :meth:`convert` will
        get; what it returns reaches :meth:`convert` as
        :attr:`FormatContext.head_start`, and is closed when the render
        ends. It must be quick (start the work, do not do it) and is only a
        head start: :meth:`convert` must write the same bytes without it.

        :returns: the work begun, or ``None`` (the default: nothing to begin).
        """
        return None

    def publish(self, context: FormatContext, stored: list[StoredArtifact],
                storage: StorageDriver) -> PublishResult | None:
        """Run a step after storing, e.g. register the stored disk as an image.
        Only called when :attr:`capabilities` has ``PUBLISH``.

        :param context: the same context :meth:`convert` received.
        :param stored: the stored artifacts, in :meth:`convert`'s order.
        :param storage: the storage driver that stored them.
        :returns: the published image, or ``None``.
        """
        return None


class StorageDriver(ABC):
    """Base of every output provider.

    Subclasses declare :attr:`name`, :attr:`website`, :attr:`capabilities`
    and implement :meth:`_upload`, and, as their capabilities say,
    :meth:`_delete`, :meth:`_open` and :meth:`exists`. Callers use the public
    :meth:`upload`, :meth:`delete` and :meth:`open`, which check capabilities,
    hash what passes and clean up on failure.
    """

    #: Registry name (a :class:`~cloudlets.drivers.types.Storage` value for ours).
    name: ClassVar[str]
    #: Where the target is documented.
    website: ClassVar[str] = ""
    #: One line for ``cloudlets drivers`` and the docs matrix.
    description: ClassVar[str] = ""
    #: What the driver can do. An instance whose configuration rules a
    #: capability out declares less than its class, never more
    #: (``HTTPStorage(ex_move=False)`` is not ``ATOMIC``): the checks here,
    #: and callers, read the instance's.
    capabilities: ClassVar[StorageCapability] = StorageCapability.NONE
    #: Bytes per read when streaming a file source.
    CHUNK_SIZE: ClassVar[int] = 4 * 1024 * 1024
    #: Whether :meth:`_upload` needs the expected digest before the first
    #: byte goes out (S3 sends it as object metadata when a multipart upload
    #: starts). The base then hashes a file source first when the caller
    #: gave no ``sha256``; for every other driver the digest of what was
    #: streamed is the artifact's, and the file is read once.
    NEEDS_DIGEST_FIRST: ClassVar[bool] = False

    # -- public API ---------------------------------------------------------

    def upload(self, source: Path | str | bytes | BinaryIO | Iterable[bytes], location: str, *,
               size: int | None = None, sha256: str | None = None,
               media_type: str = "application/octet-stream", role: str = "disk",
               overwrite: bool = False, disposable: bool = False,
               progress: Callable[[int], None] | None = None,
               written_sha256: str | None = None) -> StoredArtifact:
        """Store ``source`` at ``location``.

        :param source: a file path, the content as ``bytes``, a binary file
            object or an iterator of bytes.
        :param location: where to store it, in this driver's location syntax.
        :param size: the length, when known (required unless the driver can
            ``STREAM``).
        :param sha256: the expected digest; a mismatch fails the upload.
            Without it, the digest of the bytes stored is reported.
        :param media_type: the MIME type.
        :param role: the artifact's role, copied into the result.
        :param overwrite: replace an existing object instead of refusing.
        :param disposable: ``source`` is a file the caller deletes afterwards
            and never changes again (a render's intermediate output). A
            driver may then take the file itself instead of a copy:
            :class:`~cloudlets.drivers.storage.local.LocalStorage` links it
            into place when it is on the same file system. The caller must
            still delete its own name for the file; the stored artifact keeps
            the data.
        :param progress: called with the number of bytes stored (and hashed)
            so far; it may go back to 0 when a driver sends the file again.
        :param written_sha256: for a ``disposable`` file, its digest as its
            writer computed it while writing it (a format driver's
            :attr:`OutputFile.sha256`). A driver that keeps that very file
            reports it without reading the file again; one that copies the
            bytes checks them against it, as against ``sha256``.
        :returns: the stored artifact.
        :raises StorageError: on failure; nothing complete-looking is left at
            ``location``.
        """
        upload_source = self._make_source(source, size, sha256, media_type)
        upload_source.disposable = disposable and upload_source.path is not None
        upload_source.on_bytes = progress
        if written_sha256 is not None and upload_source.disposable:
            if sha256 is not None and sha256 != written_sha256:
                raise StorageError(f"upload to {redact(location)}: the expected sha256 "
                                   f"{sha256} is not the {written_sha256} the file was "
                                   "written with", redact(location))
            upload_source.written_sha256 = upload_source.sha256 = written_sha256
        if upload_source.size is None and not self.capabilities & StorageCapability.STREAM:
            raise StorageError(
                f"storage driver {self.name!r} cannot store a stream of unknown length",
                redact(location))
        if not overwrite and self.exists(location):
            raise StorageError(f"refusing to overwrite existing {redact(location)}",
                               redact(location))
        if self.NEEDS_DIGEST_FIRST and upload_source.path is not None \
                and upload_source.sha256 is None:
            try:
                upload_source.sha256 = sha256_file(upload_source.path, self.CHUNK_SIZE)
            except OSError as exc:
                raise StorageError(f"cannot read upload source {upload_source.path}: "
                                   f"{exc.strerror or exc}", str(upload_source.path)) from None
        try:
            final = self._upload(upload_source, location, overwrite=overwrite)
            upload_source.verify(location)
        except BaseException:
            self._cleanup_failed(location)
            raise
        extra = self._extra(final)
        return StoredArtifact(role=role, location=final, size=upload_source.bytes_read,
                              sha256=upload_source.digest, media_type=media_type, extra=extra)

    def delete(self, location: str) -> None:
        """Delete what was stored at ``location``.

        :raises ConfigurationError: when the driver cannot delete.
        :raises StorageError: when the deletion fails.
        """
        self._require(StorageCapability.DELETE, "delete")
        self._delete(location)

    def open(self, location: str) -> BinaryIO:
        """Open what was stored at ``location`` for reading.

        :raises ConfigurationError: when the driver cannot read back.
        :raises StorageError: when it is missing or unreadable.
        """
        self._require(StorageCapability.READ, "read back")
        return self._open(location)

    @abstractmethod
    def exists(self, location: str) -> bool:
        """:returns: whether something is stored at ``location``."""

    def identity(self) -> dict[str, str]:
        """The options that tell this target apart from another target of
        the same driver (a root directory, an endpoint): what the catalog
        records with an image and scopes list, get and delete to. Never
        credentials. The default, no options, suits drivers whose locations
        name everything (URLs).
        """
        return {}

    @property
    def target(self) -> str:
        """This target's name in the catalog: the driver's name, then its
        :meth:`identity` as a query string (``local?root=/srv/images``)."""
        identity = self.identity()
        if not identity:
            return self.name
        return self.name + "?" + urlencode(sorted(identity.items()))

    # -- for subclasses -----------------------------------------------------

    @abstractmethod
    def _upload(self, source: UploadSource, location: str, *, overwrite: bool) -> str:
        """Store the bytes of ``source`` at ``location``.

        Pull bytes with ``source.chunks(self.CHUNK_SIZE)``; the base hashes
        them (a driver that copies ``source.path`` itself feeds what it
        stored to ``source.account``). Make the artifact appear complete only
        once every byte is written and ``source.verify`` passed: it checks
        the size, and the digest when ``source.sha256`` is known (always for
        a file source when :attr:`NEEDS_DIGEST_FIRST` is set).

        :returns: the final location (credentials redacted).
        """

    def _delete(self, location: str) -> None:
        raise ConfigurationError(f"storage driver {self.name!r} does not implement delete")

    def _open(self, location: str) -> BinaryIO:
        raise ConfigurationError(f"storage driver {self.name!r} does not implement read back")

    def _cleanup_failed(self, location: str) -> None:
        """Remove whatever a failed upload left at ``location``. Atomic
        drivers never leave anything, so nothing is deleted for them (that
        could remove an object that existed before). Errors here are
        swallowed: the original failure is what the caller needs."""
        atomic = self.capabilities & StorageCapability.ATOMIC
        if self.capabilities & StorageCapability.DELETE and not atomic:
            try:
                if self.exists(location):
                    self._delete(location)
            except Exception:  # noqa: BLE001 - best effort, the upload error wins
                pass

    def _extra(self, location: str) -> dict[str, str]:
        """Driver-specific facts to record about a stored artifact."""
        return {}

    # -- private helpers ----------------------------------------------------

    def _require(self, capability: StorageCapability, what: str) -> None:
        if not self.capabilities & capability:
            raise ConfigurationError(f"storage driver {self.name!r} cannot {what}")

    @staticmethod
    def _make_source(source: Path | str | bytes | BinaryIO | Iterable[bytes], size: int | None,
                     sha256: str | None, media_type: str) -> UploadSource:
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if not path.is_file():
                raise StorageError(f"upload source {path} is not a regular file", str(path))
            actual_size = path.stat().st_size
            if size is not None and size != actual_size:
                raise StorageError(f"upload source {path} has {actual_size} bytes, "
                                   f"expected {size}", str(path))
            return UploadSource(path=path, size=actual_size, sha256=sha256,
                                media_type=media_type)
        if isinstance(source, (io.IOBase,)) or hasattr(source, "read"):
            return UploadSource(path=None, size=size, sha256=sha256, media_type=media_type,
                                _file=source)  # type: ignore[arg-type]
        if isinstance(source, (bytes, bytearray)):
            data = bytes(source)
            return UploadSource(path=None, size=len(data), sha256=sha256,
                                media_type=media_type, _iterable=[data])
        return UploadSource(path=None, size=size, sha256=sha256, media_type=media_type,
                            _iterable=source)


@dataclass(frozen=True)
class Deletion:
    """What :func:`delete_locations` did, location by location (as given:
    credentials included, so show them through :func:`~cloudlets.urls.redact`).

    :ivar removed: locations deleted.
    :ivar missing: locations where the driver found nothing.
    :ivar failed: ``(location, error)`` of those that could not be deleted.
    """

    removed: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    failed: tuple[tuple[str, CloudletsError], ...] = ()

    @property
    def complete(self) -> bool:
        """Whether nothing failed."""
        return not self.failed


def delete_locations(storage: StorageDriver, locations: Iterable[str], *,
                     check_exists: bool = True) -> Deletion:
    """Delete every location through ``storage``, going on past failures.

    The one loop behind a failed render's roll-back, an image's deletion
    and the withdrawal of superseded images.

    :param storage: the driver the locations were stored with.
    :param locations: what to delete, in order; duplicates are deleted once.
    :param check_exists: ask :meth:`StorageDriver.exists` first and report
        what it cannot see as missing (a roll-back of what this very process
        just stored skips the look-up).
    :returns: the :class:`Deletion` report.
    :raises ConfigurationError: when the driver cannot delete.
    """
    storage._require(StorageCapability.DELETE, "delete")
    removed: list[str] = []
    missing: list[str] = []
    failed: list[tuple[str, CloudletsError]] = []
    for location in dict.fromkeys(locations):
        try:
            if check_exists and not storage.exists(location):
                missing.append(location)
                continue
            storage.delete(location)
        except CloudletsError as exc:
            failed.append((location, exc))
            continue
        removed.append(location)
    return Deletion(tuple(removed), tuple(missing), tuple(failed))
