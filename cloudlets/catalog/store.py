"""The image catalog: a store of image records.

An embedded SQLite database (default ``<data_dir>/catalog.sqlite3``) holds one
row per render attempt. A render is identified by its *key*
(:attr:`~cloudlets.catalog.RenderRequest.key`): the manifest digest, the
merged config digest, the format, the storage and the output location. The
store makes renders idempotent and safe across processes:

* :meth:`ImageCatalog.claim` runs in a ``BEGIN IMMEDIATE`` transaction, so of
  several processes asking for the same key exactly one gets to render; the
  others see the existing ready image, or the render in flight.
* A render in flight holds a lease (:mod:`cloudlets.catalog.leases`); a
  stale one is marked failed ("owner lost") by the next claim.
* A render that raises, including ``KeyboardInterrupt``, leaves its row
  failed with the reason; it is never ready.

The store only gets, adds, updates and lists records: it renders nothing,
builds no driver and never waits. The life of an image (claim, render,
record, withdraw, delete) is :mod:`cloudlets.images`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cloudlets.catalog.leases import HOST, own_token, stale_reason
from cloudlets.catalog.records import (
    IN_FLIGHT,
    OWNER_LOST,
    CatalogEntry,
    Claim,
    ClaimState,
    ImageStatus,
    RenderRequest,
    jsonable,
    version_key,
)
from cloudlets.catalog.schema import MIGRATIONS, SCHEMA_VERSION
from cloudlets.drivers.base import StoredArtifact
from cloudlets.errors import CatalogBusyError, CatalogError, ImageNotFoundError
from cloudlets.paths import default_data_dir
from cloudlets.result import RenderResult

__all__ = ["CATALOG_FILENAME", "ImageCatalog", "default_catalog_path"]

#: File name of the catalog inside the data directory.
CATALOG_FILENAME = "catalog.sqlite3"


def default_catalog_path(data_dir: str | Path | None = None) -> Path:
    """The catalog's default path, ``<data_dir>/catalog.sqlite3``;
    ``data_dir`` defaults to :func:`cloudlets.paths.default_data_dir`."""
    return Path(data_dir if data_dir is not None else default_data_dir()) / CATALOG_FILENAME


_COLUMNS = ("entry_id, key, image_id, label, manifest_name, manifest_version, manifest_digest, "
            "config_digest, format, storage, storage_class, output, status, error, error_type, "
            "details, owner_host, owner_pid, owner_token, lease_expires, created_at, "
            "updated_at, started_at, finished_at, target")

_STATUS_ORDER = ("CASE status WHEN 'ready' THEN 0 WHEN 'rendering' THEN 1 WHEN 'pending' THEN 1 "
                 "WHEN 'deleting' THEN 2 WHEN 'delete_failed' THEN 2 WHEN 'failed' THEN 3 "
                 "WHEN 'deleted' THEN 4 ELSE 5 END")


_WRITER_LOCKS: dict[str, threading.Lock] = {}
_WRITER_LOCKS_GUARD = threading.Lock()


def _writer_lock(path: Path) -> threading.Lock:
    """The lock this process's writers of a catalog file take turns on."""
    key = os.path.realpath(path)
    with _WRITER_LOCKS_GUARD:
        return _WRITER_LOCKS.setdefault(key, threading.Lock())


def _busy(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite answered that the database is locked by another writer."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


class ImageCatalog:
    """The SQLite image catalog.

    Each thread keeps its own connection (opened on its first call, and
    again in a forked child), so one catalog object may be used from
    several threads, and any number of processes may open the same file.

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
        # Opening a connection (and its pragmas) cost a busy service's poll
        # as much as the query; each thread keeps one, per process.
        self._local = threading.local()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CatalogError(f"cannot create {self.path.parent}: {exc.strerror}") from None
        self._writer = _writer_lock(self.path)
        self._migrate()

    @contextlib.contextmanager
    def waiting_at_most(self, seconds: float | None) -> Iterator[None]:
        """Within the block, this thread's writes wait at most ``seconds``
        for the write lock (another thread's of this process, then another
        process's), and raise :class:`~cloudlets.errors.CatalogBusyError`
        past it, having written nothing: what an event loop that must not
        stall asks, to run the call on a thread instead. ``None`` waits up
        to the catalog's ``timeout``, as outside the block."""
        local = self._local
        previous = getattr(local, "budget", None)
        local.budget = seconds
        try:
            yield
        finally:
            local.budget = previous

    @classmethod
    def open_existing(cls, path: str | Path | None = None, *,
                      data_dir: str | Path | None = None) -> ImageCatalog | None:
        """Open a catalog only if its database exists: what read-only
        callers use, so that looking creates no state.

        :returns: the catalog, or ``None`` when there is none yet.
        """
        resolved = Path(path) if path is not None else default_catalog_path(data_dir)
        return cls(resolved) if resolved.is_file() else None

    def __repr__(self) -> str:
        return f"<ImageCatalog {self.path}>"

    # -- writing ----------------------------------------------------------

    def claim(self, request: RenderRequest, *, force: bool = False,
              output: str | None = None) -> Claim:
        """Atomically find or claim the render of ``request``.

        Stale entries of the key (their owner died or stopped renewing its
        lease) are marked failed first, when the key has no ready image to
        answer with (found without taking the write lock).

        :param request: what to render.
        :param force: claim a new render even when a ready image exists.
        :param output: the location a new entry records, when it differs
            from ``request.output`` (the request's template, expanded).
        :returns: the :class:`Claim`.
        """
        if not force:  # the image is there already: no write, no writer's lock
            with self._read() as conn:
                ready = self._select_one(conn, "key = ? AND status = 'ready' "
                                               "ORDER BY created_at DESC", (request.key,))
            if ready is not None:
                return Claim(ClaimState.EXISTING, ready, ())
        now = time.time()
        with self._write() as conn:
            reaped = self._reap(conn, now, key=request.key)
            ready = self._select_one(conn, "key = ? AND status = 'ready' "
                                           "ORDER BY created_at DESC", (request.key,))
            if ready is not None and not force:
                return Claim(ClaimState.EXISTING, ready, reaped)
            busy = self._select_one(conn, "key = ? AND status IN ('pending', 'rendering')",
                                    (request.key,))
            if busy is not None:
                return Claim(ClaimState.BUSY, busy, reaped)
            entry_id = "cat-" + uuid.uuid4().hex[:20]
            pid, token = own_token()
            conn.execute(
                "INSERT INTO images (entry_id, key, label, manifest_name, manifest_version, "
                "manifest_digest, config_digest, format, storage, storage_class, target, "
                "output, status, owner_host, owner_pid, owner_token, lease_expires, "
                "created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?)",
                (entry_id, request.key, request.label or request.manifest_name,
                 request.manifest_name, request.manifest_version, request.manifest_digest,
                 request.config_digest, request.format, request.storage, request.storage_class,
                 request.target or request.storage,
                 output if output is not None else request.output, HOST, pid,
                 token, now + self.lease_seconds, now, now))
            return Claim(ClaimState.CLAIMED, self._get_entry(conn, entry_id), reaped, ready)

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

    def adopt(self, entry_id: str) -> CatalogEntry:
        """Make this process the owner of a render in flight that another
        process of the same service started and handed to a worker elsewhere
        (a restarted service following its queued renders), renewing its
        lease.

        :raises CatalogError: when the entry is no longer in flight.
        """
        now = time.time()
        pid, token = own_token()
        with self._write() as conn:
            self._owned(conn, entry_id)
            conn.execute("UPDATE images SET owner_host = ?, owner_pid = ?, owner_token = ?, "
                         "lease_expires = ?, updated_at = ? WHERE entry_id = ?",
                         (HOST, pid, token, now + self.lease_seconds, now,
                          entry_id))
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
                 json.dumps(jsonable({**result.details, "timings": dict(result.timings)}),
                            sort_keys=True), now, now, entry_id))
            return self._get_entry(conn, entry_id)

    def fail(self, entry_id: str, error: BaseException | str, *,
             error_type: str | None = None) -> CatalogEntry:
        """Record that a render failed; the entry is never ready afterwards.

        :param error: the exception (its class names the type) or a reason.
        :param error_type: overrides the type recorded.
        """
        if isinstance(error, BaseException):
            reason = str(error) or type(error).__name__
            if isinstance(error, KeyboardInterrupt) and not str(error):
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

    def refresh(self, entry_id: str) -> CatalogEntry:
        """The entry as it is now; a render in flight whose owner is gone is
        marked failed (``OwnerLost``) first.

        :raises CatalogError: for an unknown entry.
        """
        with self._read() as conn:
            entry = self._get_entry(conn, entry_id)
        if entry.status not in IN_FLIGHT or stale_reason(entry, time.time()) is None:
            return entry  # what a poll finds: no write, no writer's lock
        with self._write() as conn:
            self._reap(conn, time.time(), entry_id=entry_id)
            return self._get_entry(conn, entry_id)

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
            raise ImageNotFoundError(f"no image {ref!r} in the catalog {self.path}")
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

    def find_ready(self, image_id: str, *, target: str | None = None) -> CatalogEntry | None:
        """The ready entry with this image id, if any.

        :param target: only one stored to this storage target.
        """
        where, params = "image_id = ? AND status = 'ready'", [image_id]
        if target is not None:
            where, params = where + " AND target = ?", [image_id, target]
        with self._read() as conn:
            return self._select_one(conn, where + " ORDER BY created_at DESC", tuple(params))

    def entries(self, *, name: str | None = None, version: str | None = None,
                statuses: Sequence[ImageStatus | str] | None = None,
                format: str | None = None, storage: str | None = None,  # noqa: A002
                target: str | None = None) -> list[CatalogEntry]:
        """List entries, sorted by manifest name, then version (numbers
        compared as numbers), then age.

        :param name: only this manifest name.
        :param version: only this manifest version.
        :param statuses: only these statuses (default: all).
        :param format: only this format driver name.
        :param storage: only this storage driver name.
        :param target: only this storage target (driver and identity).
        """
        clauses, params = ["1 = 1"], []
        for column, value in (("manifest_name", name), ("manifest_version", version),
                              ("format", format), ("storage", storage), ("target", target)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if statuses is not None:
            wanted = [str(ImageStatus(s)) for s in statuses]
            clauses.append(f"status IN ({', '.join('?' * len(wanted))})")
            params.extend(wanted)
        with self._read() as conn:
            found = self._select(conn, " AND ".join(clauses), tuple(params))
        return sorted(found, key=lambda e: (e.manifest_name, version_key(e.manifest_version),
                                            e.created_at))

    def open_here(self) -> None:
        """Open the calling thread's connection now and take and release the
        write lock once, writing nothing: a service calls it on its event
        loop at start, so the first create's claim does not pay for opening
        the database, reading its schema and first touching its WAL."""
        with self._write():
            pass

    @property
    def schema_version(self) -> int:
        """The database's ``PRAGMA user_version``."""
        with self._read() as conn:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])

    # -- deleting -----------------------------------------------------------

    def mark_deleting(self, entry_id: str) -> CatalogEntry:
        """Mark an entry ``deleting``: it is no longer offered as ready while
        its artifacts go (see :func:`cloudlets.images.ImageService.delete`).

        :raises CatalogError: for a render in flight or an unknown entry.
        """
        with self._write() as conn:
            entry = self._get_entry(conn, entry_id)
            if entry.status in IN_FLIGHT:
                raise CatalogError(
                    f"image {entry.ref} is being rendered by pid {entry.owner_pid} on "
                    f"{entry.owner_host}; it cannot be deleted now", entry_id)
            conn.execute("UPDATE images SET status = 'deleting', updated_at = ? "
                         "WHERE entry_id = ?", (time.time(), entry_id))
            return self._get_entry(conn, entry_id)

    def mark_deleted(self, entry_id: str) -> CatalogEntry:
        """Mark an entry deleted (its artifacts are gone)."""
        with self._write() as conn:
            conn.execute("UPDATE images SET status = 'deleted', error = NULL, updated_at = ? "
                         "WHERE entry_id = ?", (time.time(), entry_id))
            return self._get_entry(conn, entry_id)

    def mark_delete_failed(self, entry_id: str, error: str) -> CatalogEntry:
        """Record a deletion that failed half-way: the entry is
        ``delete_failed`` with ``error`` saying what is left, and deleting
        again finishes it."""
        with self._write() as conn:
            conn.execute("UPDATE images SET status = 'delete_failed', error = ?, updated_at = ? "
                         "WHERE entry_id = ?", (error, time.time(), entry_id))
            return self._get_entry(conn, entry_id)

    # -- internals ------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise CatalogError(f"cannot open the catalog {self.path}: {exc}") from None
        conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        # WAL with synchronous=NORMAL: a commit is not fsynced, the WAL is at
        # checkpoints. Safe against a crash of the application (no corruption,
        # no lost commit); a power loss may lose the last commits. FULL made
        # every POST of a busy service wait behind an fsync per commit.
        conn.execute("PRAGMA synchronous = NORMAL")
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction: the write lock is taken up
        front, so a read-then-write cannot race another process. Threads of
        one process take turns on a lock first: waiting on SQLite's busy
        handler instead, whose sleeps grow to 100 ms, made a service's POST
        wait up to a second behind nine others."""
        budget: float | None = getattr(self._local, "budget", None)
        if budget is None:
            with self._writer, self._transaction() as conn:
                yield conn
            return
        if not self._writer.acquire(timeout=budget):
            raise CatalogBusyError(f"catalog {self.path}: another thread of this process "
                                   f"kept the write lock past {budget:g} s")
        try:
            with self._transaction(busy_ms=max(int(budget * 1000), 1)) as conn:
                yield conn
        finally:
            self._writer.release()

    def _connection(self) -> sqlite3.Connection:
        """This thread's connection, opened on first use (and again in a
        forked child: a connection never crosses a fork)."""
        local = self._local
        conn: sqlite3.Connection | None = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            conn = self._connect()
            local.conn, local.pid = conn, os.getpid()
        return conn

    def _discard(self, conn: sqlite3.Connection) -> None:
        """Drop this thread's connection after an error: the next call opens
        a fresh one rather than reuse one left in an unknown state."""
        if getattr(self._local, "conn", None) is conn:
            self._local.conn = None
        with contextlib.suppress(sqlite3.Error):
            conn.close()

    @contextlib.contextmanager
    def _transaction(self, busy_ms: int | None = None) -> Iterator[sqlite3.Connection]:
        """A ``BEGIN IMMEDIATE`` transaction, waiting ``busy_ms`` (default
        the catalog's ``timeout``) for another process's write lock.

        :raises CatalogBusyError: when ``busy_ms`` is given and the lock
            stayed taken that long (nothing written).
        """
        conn = self._connection()
        try:
            if busy_ms is None:
                conn.execute("BEGIN IMMEDIATE")
            else:
                conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
                try:
                    conn.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as exc:
                    if _busy(exc):
                        raise CatalogBusyError(f"catalog {self.path}: another process kept "
                                               f"the write lock past {busy_ms} ms") from None
                    raise
                finally:  # the rest of the transaction, and later calls, as usual
                    conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._discard(conn)
            raise CatalogError(f"catalog {self.path}: {exc}") from None
        except BaseException:
            if conn.in_transaction:  # a ROLLBACK that failed
                self._discard(conn)
            raise

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = self._connection()
        try:
            yield conn
        except sqlite3.Error as exc:
            self._discard(conn)
            raise CatalogError(f"catalog {self.path}: {exc}") from None

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
            reason = stale_reason(entry, now)
            if reason is None:
                continue
            conn.execute("UPDATE images SET status = 'failed', error = ?, error_type = ?, "
                         "lease_expires = NULL, finished_at = ?, updated_at = ? "
                         "WHERE entry_id = ?", (reason, OWNER_LOST, now, now, entry.entry_id))
            reaped.append(self._get_entry(conn, entry.entry_id))
        return tuple(reaped)

    def _owned(self, conn: sqlite3.Connection, entry_id: str) -> CatalogEntry:
        entry = self._get_entry(conn, entry_id)
        if entry.status not in IN_FLIGHT:
            raise CatalogError(f"render {entry_id} is {entry.status} "
                               f"({entry.error or 'no longer in flight'}); its result is not "
                               "recorded", entry_id)
        return entry

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
                updated_at=row[21], started_at=row[22], finished_at=row[23], target=row[24],
                artifacts=artifacts))
        return entries
