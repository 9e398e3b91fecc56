"""The cloudlets error family.

Every failure the library reports on purpose is a :class:`CloudletsError`.
Each subclass carries the structured facts a caller may want (a JSON pointer,
a tar member, a URL with its credentials redacted) and a message that names
the problem and where it happened.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "CacheError",
    "CatalogBusyError",
    "CatalogError",
    "CloudletsError",
    "ConfigError",
    "ConfigurationError",
    "DiskError",
    "DriverNotFoundError",
    "FetchError",
    "FormatError",
    "ImageNotFoundError",
    "IntegrityError",
    "LockedKeyError",
    "ManifestError",
    "Problem",
    "RenderError",
    "SignatureError",
    "StageNotAvailableError",
    "StorageError",
    "TemplateError",
    "Terminated",
    "UnsafeArchiveError",
]


class CloudletsError(Exception):
    """Root of every error cloudlets raises on purpose."""


class ConfigurationError(CloudletsError):
    """The library is set up wrongly: a missing optional dependency or tool,
    an unknown driver, a driver that does not honour its contract."""


class DriverNotFoundError(ConfigurationError):
    """No driver is registered under the requested kind and name."""

    def __init__(self, kind: str, name: str, known: Iterable[str] = ()) -> None:
        self.kind = kind
        self.name = name
        self.known = sorted(known)
        hint = f"; known {kind} drivers: {', '.join(self.known)}" if self.known else ""
        super().__init__(f"no {kind} driver named {name!r}{hint}")


@dataclass(frozen=True)
class Problem:
    """One problem in a JSON document: where (a JSON pointer) and what."""

    pointer: str
    message: str

    def __str__(self) -> str:
        return f"{self.pointer or '/'}: {self.message}"


class _ProblemsError(CloudletsError):
    """An error that reports every problem of a document at once."""

    what = "document"

    def __init__(self, problems: Sequence[Problem], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f" {source}" if source else ""
        if len(self.problems) == 1:  # one line, as the command line prints it
            super().__init__(f"invalid {self.what}{where}: {self.problems[0]}")
            return
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"invalid {self.what}{where} ({len(self.problems)} problems):\n{lines}")


class ManifestError(_ProblemsError):
    """A manifest is not valid JSON or does not follow the manifest v1 schema.

    :ivar problems: every :class:`Problem` found, each with its JSON pointer.
    :ivar source: where the manifest came from (path, URL or ``<string>``).
    """

    what = "manifest"


class ConfigError(_ProblemsError):
    """A render configuration is invalid (its own schema or the manifest's
    ``args``)."""

    what = "render config"


class LockedKeyError(ConfigError):
    """A request tried to override a key the hosting provider locked."""

    def __init__(self, keys: Sequence[str]) -> None:
        self.keys = list(keys)
        super().__init__(
            [Problem("/" + k.replace(".", "/"), f"{k!r} is locked by the provider preset")
             for k in self.keys]
        )


class FetchError(CloudletsError):
    """A download failed. ``url`` has its credentials redacted."""

    def __init__(self, message: str, url: str | None = None, status: int | None = None) -> None:
        self.url = url
        self.status = status
        super().__init__(message)


class IntegrityError(CloudletsError):
    """Content does not match its expected digest or size."""

    def __init__(self, message: str, url: str | None = None,
                 expected: str | None = None, actual: str | None = None) -> None:
        self.url = url
        self.expected = expected
        self.actual = actual
        super().__init__(message)


class CacheError(CloudletsError):
    """The tarball cache cannot be used (permissions, lock, corrupted index)."""


class UnsafeArchiveError(CloudletsError):
    """A tarball breaks the archive policy. ``member`` names the tar member."""

    def __init__(self, message: str, member: str | None = None) -> None:
        self.member = member
        where = f"tar member {member!r}: " if member is not None else ""
        super().__init__(f"{where}{message}")


class TemplateError(CloudletsError):
    """A template failed to render. ``path`` and ``line`` say where."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None) -> None:
        self.path = path
        self.line = line
        where = ""
        if path is not None:
            where = f"template {path}" + (f", line {line}" if line is not None else "") + ": "
        super().__init__(f"{where}{message}")


class CatalogError(CloudletsError):
    """The image catalog cannot do what was asked: an unknown image, a
    database written by a newer cloudlets, a concurrent render that failed.

    :ivar entry_id: the catalog entry concerned, when there is one.
    """

    def __init__(self, message: str, entry_id: str | None = None) -> None:
        self.entry_id = entry_id
        super().__init__(message)


class CatalogBusyError(CatalogError):
    """The catalog's write lock stayed taken past what the caller would
    wait (:meth:`ImageCatalog.waiting_at_most
    <cloudlets.catalog.ImageCatalog.waiting_at_most>`); nothing was written."""


class ImageNotFoundError(CatalogError):
    """No image (or catalog entry) has the id asked for."""


class DiskError(CloudletsError):
    """Building the bootable disk failed."""


class FormatError(CloudletsError):
    """A format driver failed to convert the disk to its output format."""


class StorageError(CloudletsError):
    """A storage driver failed to store, read or delete an artifact.
    ``location`` has its credentials redacted."""

    def __init__(self, message: str, location: str | None = None) -> None:
        self.location = location
        super().__init__(message)


class SignatureError(CloudletsError):
    """A signature, a trust policy or a provenance envelope does not hold:
    a manifest signed by nobody the policy trusts, a tampered manifest, an
    expired or revoked key, a malformed signature, ``allowed_signers`` line
    or envelope. Never carries key material or a passphrase.

    :ivar reason: a short stable code a program can test: ``missing``,
        ``malformed``, ``namespace``, ``mismatch``, ``unknown-key``,
        ``revoked``, ``expired``, ``not-yet-valid``, ``algorithm``,
        ``policy`` (an unusable ``allowed_signers`` or revocation file),
        ``key`` (an unusable signing or verification key), ``subject`` (an
        artifact its provenance does not name).
    :ivar source: what was being checked (a path or a URL, credentials
        redacted), when known.
    """

    def __init__(self, message: str, reason: str, source: str | None = None) -> None:
        self.reason = reason
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{message}")


class RenderError(CloudletsError):
    """The render pipeline failed for a reason no narrower class covers."""


class StageNotAvailableError(RenderError):
    """A pipeline stage the render needs is not available in this build."""

    def __init__(self, stage: str, detail: str) -> None:
        self.stage = stage
        super().__init__(f"render stage {stage!r} is not available: {detail}")


class Terminated(KeyboardInterrupt):
    """The process was asked to stop (SIGTERM). Raised in the main thread by
    the command line's signal handler, like ``KeyboardInterrupt`` for
    SIGINT, so that every cleanup on the way out runs: the work directory,
    a half-written artifact, the catalog entry (recorded failed)."""

    def __init__(self, signal_name: str = "SIGTERM") -> None:
        self.signal_name = signal_name
        super().__init__(f"interrupted ({signal_name})")
