"""The catalog's records: what a render request is, what an entry holds,
and what a claim found."""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cloudlets.drivers.base import StoredArtifact
from cloudlets.errors import CatalogError
from cloudlets.result import RenderResult, request_key

__all__ = [
    "IN_FLIGHT",
    "INTERRUPTIONS",
    "OWNER_LOST",
    "CatalogEntry",
    "Claim",
    "ClaimState",
    "ImageStatus",
    "RenderRequest",
    "jsonable",
    "version_key",
]


class ImageStatus(enum.StrEnum):
    """Where a catalog entry is in its life."""

    #: Claimed by a process that has not started rendering yet.
    PENDING = "pending"
    #: Being rendered; the owner renews its lease.
    RENDERING = "rendering"
    #: Rendered and stored; its artifacts are listed.
    READY = "ready"
    #: The render raised, was interrupted or its owner died; ``error`` says why.
    FAILED = "failed"
    #: Its artifacts are being deleted.
    DELETING = "deleting"
    #: A deletion failed half-way: ``error`` says what is left; deleting
    #: again finishes it.
    DELETE_FAILED = "delete_failed"
    #: Its artifacts were deleted.
    DELETED = "deleted"
    #: Replaced by a forced render of the same key.
    SUPERSEDED = "superseded"


#: Statuses of a render in flight: at most one entry per key is in one of them.
IN_FLIGHT = (ImageStatus.PENDING, ImageStatus.RENDERING)
#: ``error_type`` of an entry whose owner went away; a waiter renders again.
OWNER_LOST = "OwnerLost"
#: Error types meaning the render was interrupted, not that its input is bad.
INTERRUPTIONS = frozenset({OWNER_LOST, "KeyboardInterrupt", "Terminated", "SystemExit"})


def _iso(stamp: float | None) -> str | None:
    if stamp is None:
        return None
    return datetime.fromtimestamp(stamp, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class RenderRequest:
    """What identifies a render: two requests with the same :attr:`key` give
    the same image.

    :ivar manifest_name: the manifest's name.
    :ivar manifest_version: the manifest's version, if any.
    :ivar manifest_digest: sha256 of the manifest's canonical form.
    :ivar config_digest: sha256 of the merged render config.
    :ivar format: the format driver's name.
    :ivar storage: the storage driver's name.
    :ivar output: the output location, as given to the renderer.
    :ivar label: the image's display name (default ``name-version``).
    :ivar storage_class: ``module:Class`` of the storage driver, to rebuild it
        when its name is not registered in another process.
    :ivar target: the storage target
        (:attr:`StorageDriver.target <cloudlets.drivers.base.StorageDriver.target>`:
        the driver's name and identity-bearing options); default the
        storage driver's name.
    """

    manifest_name: str
    manifest_version: str | None
    manifest_digest: str
    config_digest: str
    format: str
    storage: str
    output: str
    label: str = ""
    storage_class: str | None = None
    target: str = ""

    @property
    def key(self) -> str:
        """The request's digest (:func:`cloudlets.result.request_key`) over
        the manifest digest, config digest, format, storage target and
        output."""
        return request_key(self.manifest_digest, self.config_digest, self.format,
                           self.target or self.storage, self.output)


@dataclass(frozen=True)
class CatalogEntry:
    """One render attempt as the catalog records it.

    :ivar entry_id: the catalog's id for the attempt (``cat-`` and hex).
    :ivar key: the :attr:`RenderRequest.key`.
    :ivar image_id: the image id the render reported (the provider's id, an
        AMI id for EC2); ``None`` until ready.
    :ivar status: an :class:`ImageStatus`.
    :ivar error: why it failed (or why a deletion is incomplete).
    :ivar error_type: the exception class name, or ``OwnerLost``.
    :ivar artifacts: what was stored, the primary artifact first.
    :ivar details: the render's details (publish result, cache hits...) and,
        under ``timings``, its seconds per stage.
    :ivar owner_host: host of the process rendering it.
    :ivar owner_pid: pid of the process rendering it.
    :ivar lease_expires: when an in-flight render is considered abandoned.
    :ivar target: the storage target it was stored to (see
        :attr:`RenderRequest.target`).
    :ivar created_at: when it was claimed (seconds since the epoch).
    :ivar updated_at: its last change.
    :ivar started_at: when rendering started.
    :ivar finished_at: when it became ready or failed.
    """

    entry_id: str
    key: str
    image_id: str | None
    label: str
    manifest_name: str
    manifest_version: str | None
    manifest_digest: str
    config_digest: str
    format: str
    storage: str
    storage_class: str | None
    output: str
    status: ImageStatus
    error: str | None
    error_type: str | None
    artifacts: tuple[StoredArtifact, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)
    owner_host: str | None = None
    owner_pid: int | None = None
    owner_token: str | None = None
    lease_expires: float | None = None
    target: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def ready(self) -> bool:
        """Whether the image is rendered and stored."""
        return self.status is ImageStatus.READY

    @property
    def ref(self) -> str:
        """The id to show: the image id once known, else the entry id."""
        return self.image_id or self.entry_id

    @property
    def published(self) -> bool:
        """Whether the format registered the image with a consumer (an AMI)."""
        return bool(self.details.get("publish"))

    def to_result(self) -> RenderResult:
        """:returns: the :class:`~cloudlets.result.RenderResult` of a ready entry.
        :raises CatalogError: when the entry is not ready."""
        if not self.ready or self.image_id is None:
            raise CatalogError(f"image {self.ref} is {self.status}, not ready", self.entry_id)
        details = dict(self.details)
        timings = details.pop("timings", None) or {}
        return RenderResult(
            image_id=self.image_id, format=self.format, storage=self.storage,
            artifacts=self.artifacts, manifest_name=self.manifest_name,
            manifest_version=self.manifest_version, manifest_digest=self.manifest_digest,
            config_digest=self.config_digest, timings=timings, details=details)

    def to_dict(self) -> dict[str, Any]:
        """:returns: a JSON-ready dict (what ``cloudlets image show --json`` prints)."""
        return {
            "image_id": self.image_id,
            "entry_id": self.entry_id,
            "label": self.label,
            "status": str(self.status),
            "error": self.error,
            "error_type": self.error_type,
            "manifest": {"name": self.manifest_name, "version": self.manifest_version,
                         "digest": self.manifest_digest},
            "config_digest": self.config_digest,
            "format": self.format,
            "storage": self.storage,
            "storage_class": self.storage_class,
            "target": self.target or self.storage,
            "output": self.output,
            "key": self.key,
            "artifacts": [a.to_dict() for a in self.artifacts],
            "details": dict(self.details),
            "owner": ({"host": self.owner_host, "pid": self.owner_pid,
                       "lease_expires": _iso(self.lease_expires)}
                      if self.status in IN_FLIGHT else None),
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "started_at": _iso(self.started_at),
            "finished_at": _iso(self.finished_at),
        }


class ClaimState(enum.StrEnum):
    """What :meth:`ImageCatalog.claim` found."""

    #: The caller owns a new entry and must render it, then call
    #: :meth:`ImageCatalog.complete` or :meth:`ImageCatalog.fail`.
    CLAIMED = "claimed"
    #: A ready image has this key: use it.
    EXISTING = "existing"
    #: Another live process is rendering this key: wait for it.
    BUSY = "busy"


@dataclass(frozen=True)
class Claim:
    """The outcome of :meth:`ImageCatalog.claim`.

    :ivar state: a :class:`ClaimState`.
    :ivar entry: the new entry (``CLAIMED``), the ready one (``EXISTING``) or
        the one in flight (``BUSY``).
    :ivar reaped: stale entries of this key the claim marked failed.
    :ivar replaces: the ready entry of this key that a forced claim will
        supersede once its render completes.
    """

    state: ClaimState
    entry: CatalogEntry
    reaped: tuple[CatalogEntry, ...] = ()
    replaces: CatalogEntry | None = None


def version_key(version: str | None) -> tuple[Any, ...]:
    """:returns: a sort key for manifest versions, numbers compared as numbers."""
    if version is None:
        return ()
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", version) if part)


def jsonable(value: Any) -> Any:
    """Render details may hold paths or other objects: keep them readable."""
    return json.loads(json.dumps(value, default=str))
