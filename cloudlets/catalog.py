"""The image catalog: what was rendered, from which manifest version, where it
is stored, and whether it is ready.

An embedded SQLite database (default ``<data_dir>/catalog.sqlite3``) holds one
row per render attempt. A render is identified by its *key*: the manifest
digest, the merged config digest, the format, the storage and the output
location. The catalog makes renders idempotent and safe across processes:

* :meth:`ImageCatalog.claim` runs in a ``BEGIN IMMEDIATE`` transaction, so of
  several processes asking for the same key exactly one gets to render; the
  others see the existing ready image, or the render in flight and wait for it.
* A render in flight holds a *lease* that a heartbeat thread renews. A row
  whose owner process is gone (same host, the pid no longer runs the same
  process) or whose lease expired is *stale*: the next claim marks it failed
  ("owner lost") and renders again.
* A render that raises, including ``KeyboardInterrupt``, leaves its row
  failed with the reason; it is never ready.

The schema is versioned with ``PRAGMA user_version`` and upgraded in place by
the steps in :data:`MIGRATIONS` when a catalog is opened.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import importlib
import json
import os
import re
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloudlets.drivers.base import FormatDriver, StorageDriver, StoredArtifact
from cloudlets.drivers.providers import get_driver
from cloudlets.drivers.types import DriverKind, StorageCapability
from cloudlets.errors import CloudletsError, ConfigurationError
from cloudlets.manifest import Manifest
from cloudlets.paths import default_data_dir
from cloudlets.result import RenderResult

if TYPE_CHECKING:
    from cloudlets.renderer import ManifestSource, ProgressCallback, Renderer

__all__ = [
    "CATALOG_FILENAME",
    "IN_FLIGHT",
    "MIGRATIONS",
    "OWNER_LOST",
    "SCHEMA_VERSION",
    "CatalogEntry",
    "CatalogError",
    "Claim",
    "ClaimState",
    "ImageCatalog",
    "ImageStatus",
    "RenderRequest",
    "default_catalog_path",
    "expand_output",
    "storage_driver_for",
]

#: File name of the catalog inside the data directory.
CATALOG_FILENAME = "catalog.sqlite3"


class CatalogError(CloudletsError):
    """The image catalog cannot do what was asked: an unknown image, a
    database written by a newer cloudlets, a concurrent render that failed.

    :ivar entry_id: the catalog entry concerned, when there is one.
    """

    def __init__(self, message: str, entry_id: str | None = None) -> None:
        self.entry_id = entry_id
        super().__init__(message)


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
    #: Its artifacts are being deleted (a failed deletion stays here).
    DELETING = "deleting"
    #: Its artifacts were deleted.
    DELETED = "deleted"
    #: Replaced by a forced render of the same key.
    SUPERSEDED = "superseded"


#: Statuses of a render in flight: at most one entry per key is in one of them.
IN_FLIGHT = (ImageStatus.PENDING, ImageStatus.RENDERING)
#: ``error_type`` of an entry whose owner went away; a waiter renders again.
OWNER_LOST = "OwnerLost"
#: Error types meaning the render was interrupted, not that its input is bad.
_INTERRUPTIONS = frozenset({OWNER_LOST, "KeyboardInterrupt", "SystemExit"})


def default_catalog_path(data_dir: str | Path | None = None) -> Path:
    """:returns: ``<data_dir>/catalog.sqlite3``; ``data_dir`` defaults to
    :func:`cloudlets.paths.default_data_dir`."""
    return Path(data_dir if data_dir is not None else default_data_dir()) / CATALOG_FILENAME


# -- schema -----------------------------------------------------------------

_V1 = """
CREATE TABLE images (
    entry_id         TEXT PRIMARY KEY,
    key              TEXT NOT NULL,
    image_id         TEXT,
    manifest_name    TEXT NOT NULL,
    manifest_version TEXT,
    manifest_digest  TEXT NOT NULL,
    config_digest    TEXT NOT NULL,
    format           TEXT NOT NULL,
    storage          TEXT NOT NULL,
    output           TEXT NOT NULL,
    status           TEXT NOT NULL
                     CHECK (status IN ('pending', 'rendering', 'ready', 'failed', 'deleted')),
    error            TEXT,
    artifacts        TEXT NOT NULL DEFAULT '[]',
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL
);
CREATE INDEX images_key ON images (key);
CREATE INDEX images_image_id ON images (image_id);
"""

_V2_TABLES = """
CREATE TABLE images_v2 (
    entry_id         TEXT PRIMARY KEY,
    key              TEXT NOT NULL,
    image_id         TEXT,
    label            TEXT NOT NULL,
    manifest_name    TEXT NOT NULL,
    manifest_version TEXT,
    manifest_digest  TEXT NOT NULL,
    config_digest    TEXT NOT NULL,
    format           TEXT NOT NULL,
    storage          TEXT NOT NULL,
    storage_class    TEXT,
    output           TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('pending', 'rendering', 'ready', 'failed',
                                                     'deleting', 'deleted', 'superseded')),
    error            TEXT,
    error_type       TEXT,
    details          TEXT NOT NULL DEFAULT '{}',
    owner_host       TEXT,
    owner_pid        INTEGER,
    owner_token      TEXT,
    lease_expires    REAL,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    started_at       REAL,
    finished_at      REAL
);
CREATE TABLE artifacts (
    entry_id   TEXT NOT NULL REFERENCES images (entry_id) ON DELETE CASCADE,
    position   INTEGER NOT NULL,
    role       TEXT NOT NULL,
    location   TEXT NOT NULL,
    size       INTEGER NOT NULL,
    sha256     TEXT NOT NULL,
    media_type TEXT NOT NULL,
    extra      TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (entry_id, position)
);
"""

_V2_INDEXES = """
CREATE INDEX images_key ON images (key);
CREATE INDEX images_image_id ON images (image_id);
CREATE INDEX images_name ON images (manifest_name, manifest_version);
CREATE UNIQUE INDEX images_one_in_flight ON images (key)
    WHERE status IN ('pending', 'rendering');
"""


def _run_script(conn: sqlite3.Connection, script: str) -> None:
    """Run statements one by one: ``executescript`` would commit the
    migration's transaction half-way."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


def _migrate_v1(conn: sqlite3.Connection) -> None:
    _run_script(conn, _V1)


def _migrate_v2(conn: sqlite3.Connection) -> None:
    """Artifacts move from a JSON column to their own table; rows gain the
    owner and lease of a render in flight, a label, the storage class and the
    render details. SQLite cannot change a CHECK constraint in place, so the
    table is rebuilt."""
    _run_script(conn, _V2_TABLES)
    conn.execute("""
        INSERT INTO images_v2 (entry_id, key, image_id, label, manifest_name,
            manifest_version, manifest_digest, config_digest, format, storage, output,
            status, error, error_type, lease_expires, created_at, updated_at, finished_at)
        SELECT entry_id, key, image_id,
            CASE WHEN manifest_version IS NULL THEN manifest_name
                 ELSE manifest_name || '-' || manifest_version END,
            manifest_name, manifest_version, manifest_digest, config_digest, format,
            storage, output, status, error,
            CASE WHEN status = 'failed' THEN 'Error' END,
            -- v1 kept no lease: a render it shows in flight is stale at once.
            CASE WHEN status IN ('pending', 'rendering') THEN 0 END,
            created_at, updated_at,
            CASE WHEN status IN ('ready', 'failed', 'deleted') THEN updated_at END
        FROM images
    """)
    rows = conn.execute("SELECT entry_id, artifacts FROM images").fetchall()
    # Drop the old table before filling ``artifacts``: with foreign keys on,
    # dropping the table its rows reference would cascade to them.
    conn.execute("DROP TABLE images")
    conn.execute("ALTER TABLE images_v2 RENAME TO images")
    _run_script(conn, _V2_INDEXES)
    for entry_id, artifacts in rows:
        for position, item in enumerate(json.loads(artifacts or "[]")):
            conn.execute(
                "INSERT INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (entry_id, position, item.get("role", "disk"), item["location"],
                 int(item["size"]), item["sha256"],
                 item.get("media_type", "application/octet-stream"),
                 json.dumps(item.get("extra", {}), sort_keys=True)))


#: Schema steps, in order: step ``n`` (1-based) upgrades version ``n - 1`` to
#: ``n``. Append a step to change the schema; never edit a released one.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_migrate_v1, _migrate_v2)
#: The schema version this cloudlets writes.
SCHEMA_VERSION = len(MIGRATIONS)


# -- records ----------------------------------------------------------------

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

    @property
    def key(self) -> str:
        """sha256 over the manifest digest, config digest, format, storage
        and output."""
        parts = [self.manifest_digest, self.config_digest, self.format, self.storage, self.output]
        return hashlib.sha256("\0".join(parts).encode()).hexdigest()


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
    :ivar details: the render's details (publish result, cache hits...).
    :ivar owner_host: host of the process rendering it.
    :ivar owner_pid: pid of the process rendering it.
    :ivar lease_expires: when an in-flight render is considered abandoned.
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
        return RenderResult(
            image_id=self.image_id, format=self.format, storage=self.storage,
            artifacts=self.artifacts, manifest_name=self.manifest_name,
            manifest_version=self.manifest_version, manifest_digest=self.manifest_digest,
            config_digest=self.config_digest, details=dict(self.details))

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
    """

    state: ClaimState
    entry: CatalogEntry
    reaped: tuple[CatalogEntry, ...] = ()


# -- process identity ---------------------------------------------------------

def _process_token(pid: int) -> str | None:
    """:returns: the process's start time in clock ticks (Linux), which
    tells a reused pid from the original; ``None`` when unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses.
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _process_alive(pid: int, token: str | None) -> bool:
    """:returns: whether ``pid`` runs on this host and is the process that
    had ``token``. Zombies count as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0) and the lease
    if stat[stat.rfind(")") + 2:][:1] in ("Z", "X"):
        return False
    return token is None or _process_token(pid) in (None, token)


_HOST = socket.gethostname()


# -- the catalog ----------------------------------------------------------------

_COLUMNS = ("entry_id, key, image_id, label, manifest_name, manifest_version, manifest_digest, "
            "config_digest, format, storage, storage_class, output, status, error, error_type, "
            "details, owner_host, owner_pid, owner_token, lease_expires, created_at, "
            "updated_at, started_at, finished_at")

_STATUS_ORDER = ("CASE status WHEN 'ready' THEN 0 WHEN 'rendering' THEN 1 WHEN 'pending' THEN 1 "
                 "WHEN 'deleting' THEN 2 WHEN 'failed' THEN 3 WHEN 'deleted' THEN 4 ELSE 5 END")


class ImageCatalog:
    """The SQLite image catalog.

    Each call opens its own short connection, so one catalog object may be
    used from several threads, and any number of processes may open the
    same file.

    :param path: the database file; default ``<data_dir>/catalog.sqlite3``.
    :param data_dir: the data directory used when ``path`` is not given
        (default :func:`cloudlets.paths.default_data_dir`).
    :param timeout: seconds to wait for another process's write lock.
    :param lease_seconds: how long a render in flight stays claimed without a
        heartbeat; the heartbeat renews it every third of that.
    :raises CatalogError: when the database cannot be opened or was written
        by a newer cloudlets.
    """

    def __init__(self, path: str | Path | None = None, *, data_dir: str | Path | None = None,
                 timeout: float = 30.0, lease_seconds: float = 60.0) -> None:
        self.path = Path(path) if path is not None else default_catalog_path(data_dir)
        self.timeout = timeout
        self.lease_seconds = lease_seconds
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CatalogError(f"cannot create {self.path.parent}: {exc.strerror}") from None
        self._migrate()

    def __repr__(self) -> str:
        return f"<ImageCatalog {self.path}>"

    # -- rendering ----------------------------------------------------------

    def render(self, renderer: Renderer, manifest: ManifestSource, output_path: str,
               storage: StorageDriver | str, format: FormatDriver | str,  # noqa: A002
               config: Mapping[str, Any] | None = None,
               progress: ProgressCallback | None = None, *, label: str | None = None,
               force: bool = False, overwrite: bool = False, wait_timeout: float = 3600.0,
               poll_interval: float = 0.5) -> CatalogEntry:
        """Render through the catalog: return the ready image of the same
        request if there is one, wait for the same render in flight in
        another process, or render and record it.

        :param renderer: the :class:`~cloudlets.renderer.Renderer` to use.
        :param manifest: as for :meth:`Renderer.render`.
        :param output_path: as for :meth:`Renderer.render`; it may contain
            ``{name}``, ``{version}`` and ``{key}`` (16 hex digits of the
            request key), so every distinct render gets its own location
            (``/srv/images/{key}/``). The key is computed from the template.
        :param storage: a storage driver instance or a registered name.
        :param format: a format driver instance or a registered name.
        :param config: the request's render config.
        :param progress: called as ``progress(stage, done, total)``.
        :param label: the image's display name; default ``name-version``.
        :param force: render again even if a ready image has this key (its
            artifacts are overwritten and the old entry superseded).
        :param overwrite: replace artifacts the catalog does not know about.
        :param wait_timeout: seconds to wait for another process's render
            of the same key.
        :param poll_interval: seconds between looks at that render.
        :returns: the ready entry.
        :raises CatalogError: when the concurrent render of the same key
            failed, or did not finish within ``wait_timeout``.
        :raises CloudletsError: what the render raised; the entry is failed.
        """
        loaded = Manifest.load(manifest)
        merged = renderer.resolve_config(loaded, config)
        request = RenderRequest(
            manifest_name=loaded.name, manifest_version=loaded.version,
            manifest_digest=loaded.digest, config_digest=merged.digest,
            format=_driver_name(DriverKind.FORMAT, format),
            storage=_driver_name(DriverKind.STORAGE, storage),
            output=output_path, label=label or loaded.label,
            storage_class=_driver_class_path(DriverKind.STORAGE, storage))
        deadline = time.monotonic() + wait_timeout
        waited_on: str | None = None
        while True:
            claim = self.claim(request, force=force and waited_on is None)
            if claim.state is ClaimState.EXISTING:
                return claim.entry
            if claim.state is ClaimState.CLAIMED:
                break
            waited_on = claim.entry.entry_id
            finished = self.wait(claim.entry.entry_id, deadline - time.monotonic(),
                                 poll_interval=poll_interval)
            if finished.ready:
                return finished
            if finished.error_type not in _INTERRUPTIONS:
                raise CatalogError(
                    f"the concurrent render {finished.entry_id} of {finished.label} failed: "
                    f"{finished.error}", finished.entry_id)
        entry = claim.entry
        replaces_ready = self._ready_for_key(request.key) is not None
        expanded = expand_output(output_path, request)
        if expanded != request.output:
            self._set_output(entry.entry_id, expanded)
        with self._heartbeat(entry.entry_id):
            try:
                self.start(entry.entry_id)
                result = renderer.render(loaded, expanded, storage, format, config, progress,
                                         overwrite=overwrite or (force and replaces_ready))
            except BaseException as exc:
                self.fail(entry.entry_id, exc)
                raise
        try:
            return self.complete(entry.entry_id, result)
        except BaseException as exc:
            self.fail(entry.entry_id, exc)
            raise

    def claim(self, request: RenderRequest, *, force: bool = False) -> Claim:
        """Atomically find or claim the render of ``request``.

        Stale entries of the key (their owner died or stopped renewing its
        lease) are marked failed first.

        :param request: what to render.
        :param force: claim a new render even when a ready image exists.
        :returns: the :class:`Claim`.
        """
        now = time.time()
        with self._write() as conn:
            reaped = self._reap(conn, now, key=request.key)
            if not force:
                ready = self._select_one(conn, "key = ? AND status = 'ready' "
                                               "ORDER BY created_at DESC", (request.key,))
                if ready is not None:
                    return Claim(ClaimState.EXISTING, ready, reaped)
            busy = self._select_one(conn, "key = ? AND status IN ('pending', 'rendering')",
                                    (request.key,))
            if busy is not None:
                return Claim(ClaimState.BUSY, busy, reaped)
            entry_id = "cat-" + uuid.uuid4().hex[:20]
            pid = os.getpid()
            conn.execute(
                "INSERT INTO images (entry_id, key, label, manifest_name, manifest_version, "
                "manifest_digest, config_digest, format, storage, storage_class, output, "
                "status, owner_host, owner_pid, owner_token, lease_expires, created_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?)",
                (entry_id, request.key, request.label or request.manifest_name,
                 request.manifest_name, request.manifest_version, request.manifest_digest,
                 request.config_digest, request.format, request.storage, request.storage_class,
                 request.output, _HOST, pid, _process_token(pid), now + self.lease_seconds,
                 now, now))
            entry = self._select_one(conn, "entry_id = ?", (entry_id,))
            assert entry is not None
            return Claim(ClaimState.CLAIMED, entry, reaped)

    def start(self, entry_id: str) -> CatalogEntry:
        """Mark a claimed entry as rendering.

        :raises CatalogError: when this process no longer owns it.
        """
        now = time.time()
        with self._write() as conn:
            self._owned(conn, entry_id)
            conn.execute("UPDATE images SET status = 'rendering', started_at = ?, "
                         "updated_at = ?, lease_expires = ? WHERE entry_id = ?",
                         (now, now, now + self.lease_seconds, entry_id))
            return self._get_entry(conn, entry_id)

    def heartbeat(self, entry_id: str) -> bool:
        """Renew the lease of a render in flight.

        :returns: ``False`` when the entry is no longer in flight (it was
            reaped, e.g. after this process was suspended past its lease).
        """
        now = time.time()
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE images SET lease_expires = ? WHERE entry_id = ? "
                "AND status IN ('pending', 'rendering')", (now + self.lease_seconds, entry_id))
            return cursor.rowcount == 1

    def complete(self, entry_id: str, result: RenderResult) -> CatalogEntry:
        """Record a finished render: the entry becomes ready with the
        result's image id and artifacts; an older ready entry of the same key
        is superseded.

        :raises CatalogError: when the entry is no longer in flight.
        """
        now = time.time()
        with self._write() as conn:
            entry = self._owned(conn, entry_id)
            conn.execute("UPDATE images SET status = 'superseded', updated_at = ? "
                         "WHERE key = ? AND status = 'ready'", (now, entry.key))
            conn.execute("DELETE FROM artifacts WHERE entry_id = ?", (entry_id,))
            for position, artifact in enumerate(result.artifacts):
                conn.execute("INSERT INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                             (entry_id, position, artifact.role, artifact.location,
                              artifact.size, artifact.sha256, artifact.media_type,
                              json.dumps(dict(artifact.extra), sort_keys=True)))
            conn.execute(
                "UPDATE images SET status = 'ready', image_id = ?, config_digest = ?, "
                "details = ?, error = NULL, error_type = NULL, lease_expires = NULL, "
                "finished_at = ?, updated_at = ? WHERE entry_id = ?",
                (result.image_id, result.config_digest,
                 json.dumps(_jsonable(dict(result.details)), sort_keys=True), now, now,
                 entry_id))
            return self._get_entry(conn, entry_id)

    def fail(self, entry_id: str, error: BaseException | str, *,
             error_type: str | None = None) -> CatalogEntry:
        """Record that a render failed; the entry is never ready afterwards.

        :param error: the exception (its class names the type) or a reason.
        :param error_type: overrides the type recorded.
        """
        if isinstance(error, BaseException):
            reason = str(error) or type(error).__name__
            if isinstance(error, KeyboardInterrupt):
                reason = "interrupted (KeyboardInterrupt)"
            kind = error_type or type(error).__name__
        else:
            reason, kind = error, error_type or "Error"
        now = time.time()
        with self._write() as conn:
            conn.execute(
                "UPDATE images SET status = 'failed', error = ?, error_type = ?, "
                "lease_expires = NULL, finished_at = ?, updated_at = ? "
                "WHERE entry_id = ? AND status IN ('pending', 'rendering')",
                (reason, kind, now, now, entry_id))
            return self._get_entry(conn, entry_id)

    def wait(self, entry_id: str, timeout: float, *, poll_interval: float = 0.5) -> CatalogEntry:
        """Wait until an entry is no longer in flight. An entry whose owner
        is gone is marked failed (``OwnerLost``) rather than waited for.

        :param timeout: seconds to wait at most.
        :param poll_interval: seconds between looks.
        :returns: the entry, ready or failed.
        :raises CatalogError: on timeout.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            with self._write() as conn:
                self._reap(conn, time.time(), entry_id=entry_id)
                entry = self._get_entry(conn, entry_id)
            if entry.status not in IN_FLIGHT:
                return entry
            if time.monotonic() >= deadline:
                raise CatalogError(
                    f"gave up after {timeout:.0f} s waiting for render {entry_id} of "
                    f"{entry.label} (pid {entry.owner_pid} on {entry.owner_host})", entry_id)
            time.sleep(min(poll_interval, max(deadline - time.monotonic(), 0.0)))

    def reap_stale(self) -> list[CatalogEntry]:
        """Mark every stale render in flight failed (``OwnerLost``).

        :returns: the entries marked.
        """
        with self._write() as conn:
            return list(self._reap(conn, time.time()))

    # -- reading ------------------------------------------------------------

    def get(self, ref: str) -> CatalogEntry:
        """Find an entry by image id or entry id. Of several entries with the
        same image id (a forced re-render, a deleted image), the ready one,
        else the newest, is returned.

        :raises CatalogError: when none matches.
        """
        with self._read() as conn:
            entry = self._select_one(
                conn, f"image_id = ? OR entry_id = ? ORDER BY {_STATUS_ORDER}, "
                      "created_at DESC", (ref, ref))
        if entry is None:
            raise CatalogError(f"no image {ref!r} in the catalog {self.path}")
        return entry

    def superseded(self, entry: CatalogEntry) -> list[CatalogEntry]:
        """The entries a forced render of ``entry``'s key superseded that were
        published under another image id (an older AMI), oldest first: what
        :meth:`retire` is for once the provider let go of them."""
        with self._read() as conn:
            found = self._select(conn, "key = ? AND status = 'superseded' AND image_id IS NOT NULL"
                                       " AND image_id != ? ORDER BY created_at",
                                 (entry.key, entry.image_id or ""))
        return [old for old in found if old.published]

    def retire(self, entry_id: str) -> CatalogEntry:
        """Mark a superseded entry deleted (its provider image is gone; its
        artifacts were deleted or belong to the entry that replaced it).

        :raises CatalogError: when the entry is not superseded.
        """
        with self._write() as conn:
            entry = self._get_entry(conn, entry_id)
            if entry.status is not ImageStatus.SUPERSEDED:
                raise CatalogError(f"image {entry.ref} is {entry.status}, not superseded",
                                   entry_id)
            conn.execute("UPDATE images SET status = 'deleted', updated_at = ? "
                         "WHERE entry_id = ?", (time.time(), entry_id))
            return self._get_entry(conn, entry_id)

    def find_ready(self, image_id: str) -> CatalogEntry | None:
        """:returns: the ready entry with this image id, if any."""
        with self._read() as conn:
            return self._select_one(conn, "image_id = ? AND status = 'ready' "
                                          "ORDER BY created_at DESC", (image_id,))

    def entries(self, *, name: str | None = None, version: str | None = None,
                statuses: Sequence[ImageStatus | str] | None = None,
                format: str | None = None, storage: str | None = None  # noqa: A002
                ) -> list[CatalogEntry]:
        """List entries, sorted by manifest name, then version (numbers
        compared as numbers), then age.

        :param name: only this manifest name.
        :param version: only this manifest version.
        :param statuses: only these statuses (default: all).
        :param format: only this format driver name.
        :param storage: only this storage driver name.
        """
        clauses, params = ["1 = 1"], []
        for column, value in (("manifest_name", name), ("manifest_version", version),
                              ("format", format), ("storage", storage)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if statuses is not None:
            wanted = [str(ImageStatus(s)) for s in statuses]
            clauses.append(f"status IN ({', '.join('?' * len(wanted))})")
            params.extend(wanted)
        with self._read() as conn:
            found = self._select(conn, " AND ".join(clauses), tuple(params))
        return sorted(found, key=lambda e: (e.manifest_name, _version_key(e.manifest_version),
                                            e.created_at))

    @property
    def schema_version(self) -> int:
        """The database's ``PRAGMA user_version``."""
        with self._read() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    # -- deleting -----------------------------------------------------------

    def delete(self, ref: str, *, storage: StorageDriver | None = None) -> CatalogEntry:
        """Delete an image's artifacts through its storage driver and mark
        the entry deleted. A failed entry (nothing stored) is just marked.

        The entry is ``deleting`` while its artifacts go: it is no longer
        offered as ready, and if a deletion fails half-way (the error is
        recorded) calling this again finishes it.

        :param ref: image id or entry id.
        :param storage: the storage driver to delete with; default rebuilt
            from the entry's record (:func:`storage_driver_for`).
        :returns: the deleted entry.
        :raises CatalogError: for a render in flight or an unknown image.
        :raises StorageError: when an artifact cannot be deleted.
        """
        entry = self.get(ref)
        if entry.status in IN_FLIGHT:
            raise CatalogError(f"image {entry.ref} is being rendered by pid {entry.owner_pid} "
                               f"on {entry.owner_host}; it cannot be deleted now", entry.entry_id)
        if entry.status in (ImageStatus.DELETED, ImageStatus.SUPERSEDED):
            return entry
        driver: StorageDriver | None = None
        if entry.artifacts:
            driver = storage if storage is not None else storage_driver_for(entry)
            if driver.name != entry.storage:
                raise CatalogError(f"image {entry.ref} is stored with {entry.storage!r}, "
                                   f"not {driver.name!r}", entry.entry_id)
        with self._write() as conn:
            conn.execute("UPDATE images SET status = 'deleting', updated_at = ? "
                         "WHERE entry_id = ?", (time.time(), entry.entry_id))
        if driver is not None:
            try:
                for artifact in entry.artifacts:
                    if driver.exists(artifact.location):
                        driver.delete(artifact.location)
            except CloudletsError as exc:
                with self._write() as conn:
                    conn.execute("UPDATE images SET error = ?, updated_at = ? "
                                 "WHERE entry_id = ?",
                                 (f"deletion incomplete: {exc}", time.time(), entry.entry_id))
                raise
        now = time.time()
        with self._write() as conn:
            conn.execute("UPDATE images SET status = 'deleted', updated_at = ? "
                         "WHERE entry_id = ?", (now, entry.entry_id))
            return self._get_entry(conn, entry.entry_id)

    # -- internals ------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise CatalogError(f"cannot open the catalog {self.path}: {exc}") from None
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction: the write lock is taken up
        front, so a read-then-write cannot race another process."""
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise CatalogError(f"catalog {self.path}: {exc}") from None
        finally:
            conn.close()

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            yield conn
        except sqlite3.Error as exc:
            raise CatalogError(f"catalog {self.path}: {exc}") from None
        finally:
            conn.close()

    def _migrate(self) -> None:
        conn = self._connect()
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise CatalogError(f"catalog {self.path}: cannot use WAL (journal mode {mode})")
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                if version > SCHEMA_VERSION:
                    raise CatalogError(
                        f"catalog {self.path} has schema version {version}; this cloudlets "
                        f"knows up to {SCHEMA_VERSION}: upgrade cloudlets")
                for number in range(version + 1, SCHEMA_VERSION + 1):
                    MIGRATIONS[number - 1](conn)
                    conn.execute(f"PRAGMA user_version = {number}")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise CatalogError(f"cannot open the catalog {self.path}: {exc}") from None
        finally:
            conn.close()

    def _reap(self, conn: sqlite3.Connection, now: float, *, key: str | None = None,
              entry_id: str | None = None) -> tuple[CatalogEntry, ...]:
        where = "status IN ('pending', 'rendering')"
        params: tuple[Any, ...] = ()
        if key is not None:
            where, params = where + " AND key = ?", (*params, key)
        if entry_id is not None:
            where, params = where + " AND entry_id = ?", (*params, entry_id)
        reaped = []
        for entry in self._select(conn, where, params):
            reason = self._stale_reason(entry, now)
            if reason is None:
                continue
            conn.execute("UPDATE images SET status = 'failed', error = ?, error_type = ?, "
                         "lease_expires = NULL, finished_at = ?, updated_at = ? "
                         "WHERE entry_id = ?", (reason, OWNER_LOST, now, now, entry.entry_id))
            reaped.append(self._get_entry(conn, entry.entry_id))
        return tuple(reaped)

    @staticmethod
    def _stale_reason(entry: CatalogEntry, now: float) -> str | None:
        who = f"pid {entry.owner_pid} on {entry.owner_host}"
        if entry.owner_host == _HOST and entry.owner_pid is not None \
                and not _process_alive(entry.owner_pid, entry.owner_token):
            return f"interrupted: the rendering process ({who}) is gone"
        if entry.lease_expires is None or entry.lease_expires < now:
            return f"interrupted: the rendering process ({who}) stopped renewing its lease"
        return None

    def _owned(self, conn: sqlite3.Connection, entry_id: str) -> CatalogEntry:
        entry = self._get_entry(conn, entry_id)
        if entry.status not in IN_FLIGHT:
            raise CatalogError(f"render {entry_id} is {entry.status} "
                               f"({entry.error or 'no longer in flight'}); its result is not "
                               "recorded", entry_id)
        return entry

    def _ready_for_key(self, key: str) -> CatalogEntry | None:
        with self._read() as conn:
            return self._select_one(conn, "key = ? AND status = 'ready'", (key,))

    def _set_output(self, entry_id: str, output: str) -> None:
        with self._write() as conn:
            conn.execute("UPDATE images SET output = ? WHERE entry_id = ?", (output, entry_id))

    @contextlib.contextmanager
    def _heartbeat(self, entry_id: str) -> Iterator[None]:
        stop = threading.Event()
        interval = max(self.lease_seconds / 3.0, 0.05)

        def beat() -> None:
            while not stop.wait(interval):
                try:
                    if not self.heartbeat(entry_id):
                        return
                except CloudletsError:
                    continue  # a busy database: try again at the next beat

        thread = threading.Thread(target=beat, name=f"cloudlets-lease-{entry_id}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _get_entry(self, conn: sqlite3.Connection, entry_id: str) -> CatalogEntry:
        entry = self._select_one(conn, "entry_id = ?", (entry_id,))
        if entry is None:
            raise CatalogError(f"no entry {entry_id!r} in the catalog {self.path}", entry_id)
        return entry

    def _select_one(self, conn: sqlite3.Connection, where: str,
                    params: tuple[Any, ...]) -> CatalogEntry | None:
        found = self._select(conn, where + " LIMIT 1", params)
        return found[0] if found else None

    @staticmethod
    def _select(conn: sqlite3.Connection, where: str,
                params: tuple[Any, ...]) -> list[CatalogEntry]:
        rows = conn.execute(f"SELECT {_COLUMNS} FROM images WHERE {where}", params).fetchall()
        entries = []
        for row in rows:
            artifacts = tuple(
                StoredArtifact(role=a[0], location=a[1], size=a[2], sha256=a[3],
                               media_type=a[4], extra=json.loads(a[5]))
                for a in conn.execute(
                    "SELECT role, location, size, sha256, media_type, extra FROM artifacts "
                    "WHERE entry_id = ? ORDER BY position", (row[0],)))
            entries.append(CatalogEntry(
                entry_id=row[0], key=row[1], image_id=row[2], label=row[3],
                manifest_name=row[4], manifest_version=row[5], manifest_digest=row[6],
                config_digest=row[7], format=row[8], storage=row[9], storage_class=row[10],
                output=row[11], status=ImageStatus(row[12]), error=row[13], error_type=row[14],
                details=json.loads(row[15] or "{}"), owner_host=row[16], owner_pid=row[17],
                owner_token=row[18], lease_expires=row[19], created_at=row[20],
                updated_at=row[21], started_at=row[22], finished_at=row[23],
                artifacts=artifacts))
        return entries


# -- helpers --------------------------------------------------------------------

def expand_output(template: str, request: RenderRequest) -> str:
    """Fill ``{name}``, ``{version}`` and ``{key}`` in an output location.

    :raises CatalogError: for another placeholder.
    """
    values = {"name": request.manifest_name, "version": request.manifest_version or "",
              "key": request.key[:16]}

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise CatalogError(f"output {template!r}: unknown placeholder {{{name}}} "
                               "(known: {name}, {version}, {key})")
        return values[name]

    return re.sub(r"\{([^{}]*)\}", substitute, template)


def storage_driver_for(entry: CatalogEntry) -> StorageDriver:
    """Rebuild the storage driver an entry was stored with, to delete or read
    its artifacts: by its registered name, else by its recorded class. A
    driver that needs credentials reads them from its environment variables.

    :raises ConfigurationError: when the driver cannot be found or built
        without arguments.
    """
    try:
        cls: type = get_driver(DriverKind.STORAGE, entry.storage)
    except ConfigurationError:
        if not entry.storage_class:
            raise
        module, _, name = entry.storage_class.partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise ConfigurationError(
                f"storage driver {entry.storage!r} ({entry.storage_class}) cannot be "
                f"loaded: {exc}") from None
    try:
        driver = cls()
    except TypeError as exc:
        raise ConfigurationError(
            f"storage driver {entry.storage!r} needs arguments to be rebuilt; pass an "
            f"instance: {exc}") from None
    if not isinstance(driver, StorageDriver):
        raise ConfigurationError(f"{cls!r} is not a storage driver")
    if not driver.capabilities & StorageCapability.DELETE:
        raise ConfigurationError(f"storage driver {entry.storage!r} cannot delete")
    return driver


def _driver_name(kind: DriverKind, driver: object) -> str:
    if isinstance(driver, str):
        driver = get_driver(kind, driver)
    name = getattr(driver, "name", None)
    if not isinstance(name, str):
        raise ConfigurationError(f"not a {kind} driver: {driver!r}")
    return name


def _driver_class_path(kind: DriverKind, driver: object) -> str | None:
    cls = get_driver(kind, driver) if isinstance(driver, str) else (
        driver if isinstance(driver, type) else type(driver))
    return f"{cls.__module__}:{cls.__qualname__}"


def _version_key(version: str | None) -> tuple[Any, ...]:
    if version is None:
        return ()
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", version) if part)


def _jsonable(value: Any) -> Any:
    """Render details may hold paths or other objects: keep them readable."""
    return json.loads(json.dumps(value, default=str))

