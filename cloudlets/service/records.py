"""What the service records beside the image catalog: which tenant owns
an image, the target it was stored to, and the ``Idempotency-Key`` values
seen.

The catalog (:mod:`cloudlets.catalog`) knows images, not tenants; this small
SQLite file (``<data_dir>/service.sqlite3``) is the service's own.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cloudlets.errors import CatalogError

__all__ = ["Owner", "ServiceRecords"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS owners (
    entry_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    target TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS owners_tenant ON owners (tenant);
CREATE TABLE IF NOT EXISTS idempotency (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    request_digest TEXT NOT NULL,
    entry_id TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (tenant, key)
);
"""


@dataclass(frozen=True)
class Owner:
    """Who an image belongs to.

    :ivar entry_id: the catalog entry.
    :ivar tenant: the tenant that asked for it.
    :ivar target: the storage target it went to.
    """

    entry_id: str
    tenant: str
    target: str


class ServiceRecords:
    """The service's SQLite records.

    :param path: the database file.
    :raises CatalogError: when it cannot be opened.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection for the process, used under a lock: opening and
        # closing one per call made every close a WAL checkpoint (fsyncs:
        # 12 ms a call on a loaded virtual disk).
        try:
            self._conn = sqlite3.connect(path, timeout=30.0, isolation_level=None,
                                         check_same_thread=False)
        except sqlite3.Error as exc:
            raise CatalogError(f"cannot open the service records {path}: {exc}") from None
        self._lock = threading.Lock()
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode = WAL")
            # No fsync per commit: a power cut may lose the last records, and
            # each heals itself, as the same request again records its owner
            # and its key again (the catalog keeps its own durability).
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(_SCHEMA)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._conn.close()

    def own(self, entry_id: str, tenant: str, target: str) -> None:
        """Record the owner of an entry (kept if already recorded)."""
        with self._connect() as conn:
            conn.execute("INSERT OR IGNORE INTO owners VALUES (?, ?, ?, ?)",
                         (entry_id, tenant, target, time.time()))

    def owner(self, entry_id: str) -> Owner | None:
        """The owner of an entry.

        :returns: the owner, or ``None`` when the service did not make it
            (an image rendered by the CLI into the same catalog)."""
        with self._connect() as conn:
            row = conn.execute("SELECT entry_id, tenant, target FROM owners WHERE entry_id = ?",
                               (entry_id,)).fetchone()
        return Owner(*row) if row else None

    def owners(self, tenant: str | None = None) -> dict[str, Owner]:
        """:returns: the owners by entry id, of one tenant or of all."""
        with self._connect() as conn:
            if tenant is None:
                rows = conn.execute("SELECT entry_id, tenant, target FROM owners").fetchall()
            else:
                rows = conn.execute("SELECT entry_id, tenant, target FROM owners "
                                    "WHERE tenant = ?", (tenant,)).fetchall()
        return {row[0]: Owner(*row) for row in rows}

    def idempotent(self, tenant: str, key: str) -> tuple[str, str] | None:
        """What a tenant's ``Idempotency-Key`` answered.

        :returns: ``(request digest, entry id)``, or ``None``."""
        with self._connect() as conn:
            row = conn.execute("SELECT request_digest, entry_id FROM idempotency "
                               "WHERE tenant = ? AND key = ?", (tenant, key)).fetchone()
        return (row[0], row[1]) if row else None

    def remember(self, tenant: str, key: str, request_digest: str, entry_id: str) -> None:
        """Record what an ``Idempotency-Key`` answered (the first answer stays)."""
        with self._connect() as conn:
            conn.execute("INSERT OR IGNORE INTO idempotency VALUES (?, ?, ?, ?, ?)",
                         (tenant, key, request_digest, entry_id, time.time()))

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise CatalogError(f"service records {self.path}: {exc}") from None
