"""The catalog's SQLite schema and its migrations.

The schema is versioned with ``PRAGMA user_version`` and upgraded in place by
the steps in :data:`MIGRATIONS` when a catalog is opened.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable

__all__ = ["MIGRATIONS", "SCHEMA_VERSION"]

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


_V3_COLUMNS = (
    "entry_id, key, image_id, label, manifest_name, manifest_version, manifest_digest, "
    "config_digest, format, storage, storage_class, output, status, error, error_type, "
    "details, owner_host, owner_pid, owner_token, lease_expires, created_at, updated_at, "
    "started_at, finished_at")


_V3_TABLE = """
CREATE TABLE images_v3 (
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
    target           TEXT NOT NULL DEFAULT '',
    output           TEXT NOT NULL,
    status           TEXT NOT NULL CHECK (status IN ('pending', 'rendering', 'ready', 'failed',
                                                     'deleting', 'delete_failed', 'deleted',
                                                     'superseded')),
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
)
"""


def _migrate_v3(conn: sqlite3.Connection) -> None:
    """Rows gain the storage *target* (the driver's name and its
    identity-bearing options, never its secrets), which scopes list, get and
    delete; a deletion that failed is ``delete_failed``. The table is rebuilt
    for the new CHECK constraint; the artifacts are kept aside meanwhile, since
    dropping the table their rows reference would cascade to them."""
    conn.execute("CREATE TEMP TABLE artifacts_kept AS SELECT * FROM artifacts")
    conn.execute(_V3_TABLE)
    conn.execute(f"INSERT INTO images_v3 ({_V3_COLUMNS}, target) "
                 f"SELECT {_V3_COLUMNS}, storage FROM images")
    conn.execute("DROP TABLE images")
    conn.execute("ALTER TABLE images_v3 RENAME TO images")
    _run_script(conn, _V2_INDEXES)
    conn.execute("CREATE INDEX images_target ON images (target)")
    conn.execute("INSERT INTO artifacts SELECT * FROM artifacts_kept")
    conn.execute("DROP TABLE artifacts_kept")


#: Schema steps, in order: step ``n`` (1-based) upgrades version ``n - 1`` to
#: ``n``. Append a step to change the schema; never edit a released one.
MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _migrate_v1, _migrate_v2, _migrate_v3)
#: The schema version this cloudlets writes.
SCHEMA_VERSION = len(MIGRATIONS)
