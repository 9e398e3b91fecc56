"""The image catalog as a store: claims, leases, schema migrations, listing.
The render side (idempotent renders, concurrent processes, deletion) is
tests/test_images.py. Real SQLite files."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import sqlite3
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cloudlets.catalog import (
    MIGRATIONS,
    SCHEMA_VERSION,
    CatalogError,
    ImageCatalog,
    ImageStatus,
    RenderRequest,
    default_catalog_path,
)
from cloudlets.manifest import Manifest
from cloudlets.renderer import Renderer

SPAWN = multiprocessing.get_context("spawn")


# -- fixtures (also used by test_compute and test_cli_images) ------------------

def make_cloudlet(root: Path, name: str = "tiny", version: str = "1.0") -> dict[str, Any]:
    """Write a tiny root filesystem tarball under ``root`` and return a
    renderable manifest pointing at it (a local path: renderers built with
    :func:`make_renderer` allow that)."""
    root.mkdir(parents=True, exist_ok=True)
    tarball = root / f"{name}.tar.gz"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path, data in (("boot/vmlinuz", b"kernel"), ("etc/hostname", b"old\n"),
                           ("etc/motd", b"{{ args.motd }} on {{ hostname }}\n")):
            info = tarfile.TarInfo(path)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    tarball.write_bytes(buffer.getvalue())
    return {
        "name": name, "version": version, "arch": "x86_64",
        "description": "catalog test cloudlet",
        "filesystem": {"url": str(tarball),
                       "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()},
        "boot": {"kernel": "/boot/vmlinuz", "cmdline": "console=ttyS0"},
        "args": {"motd": {"type": "string", "default": "hello"}},
        "templates": ["/etc/motd"],
    }


def make_renderer(base: Path) -> Renderer:
    """A real renderer whose cache and data live under ``base``."""
    return Renderer(cache_dir=base / "cache", data_dir=base / "data", ex_allow_file_urls=True,
                    ex_source_date_epoch=1_700_000_000)


class StageCounter:
    """A progress callback counting renders (``convert`` stages) and able to
    hold a render at its ``convert`` stage."""

    def __init__(self, hold: float = 0.0, marker: Path | None = None,
                 action: Callable[[], None] | None = None) -> None:
        self.converts = 0
        self.hold = hold
        self.marker = marker
        self.action = action

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if stage != "convert" or done != 0:
            return
        self.converts += 1
        if self.marker is not None:
            self.marker.write_text(str(os.getpid()))
        if self.action is not None:
            self.action()
        time.sleep(self.hold)


def wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


def test_v1_database_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(path)
    MIGRATIONS[0](conn)
    conn.execute("PRAGMA user_version = 1")
    artifacts = [{"role": "disk", "location": "/srv/a.qcow2", "size": 10, "sha256": "ab" * 32,
                  "media_type": "application/x-qcow2"},
                 {"role": "descriptor", "location": "/srv/a.ovf", "size": 3, "sha256": "cd" * 32}]
    rows = [("cat-1", "k1", "img-1", "web", "2.0", "ready", None, json.dumps(artifacts)),
            ("cat-2", "k2", None, "web", None, "rendering", None, "[]"),
            ("cat-3", "k3", None, "db", "1", "failed", "boom", "[]")]
    for entry_id, key, image_id, name, version, status, error, arts in rows:
        conn.execute("INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                     (entry_id, key, image_id, name, version, "d" * 64, "c" * 64, "qcow2",
                      "local", "/srv/", status, error, arts, 1_700_000_000.0,
                      1_700_000_100.0))
    conn.commit()
    conn.close()

    catalog = ImageCatalog(path)
    assert catalog.schema_version == SCHEMA_VERSION == 3
    ready = catalog.get("img-1")
    assert ready.status is ImageStatus.READY and ready.label == "web-2.0"
    assert [(a.role, a.location, a.size) for a in ready.artifacts] == [
        ("disk", "/srv/a.qcow2", 10), ("descriptor", "/srv/a.ovf", 3)]
    assert ready.artifacts[0].media_type == "application/x-qcow2"
    assert ready.finished_at == 1_700_000_100.0
    assert catalog.get("cat-3").error == "boom" and catalog.get("cat-3").label == "db-1"
    (reaped,) = catalog.reap_stale()  # v1 kept no lease: its render in flight is stale
    assert reaped.entry_id == "cat-2" and reaped.status is ImageStatus.FAILED
    assert [e.manifest_name for e in catalog.entries()] == ["db", "web", "web"]
    assert ImageCatalog(path).schema_version == 3  # reopening is a no-op
    assert ready.target == "local"  # v3: the target of an old row is its storage name


def test_v2_database_keeps_its_artifacts_through_the_v3_rebuild(tmp_path: Path) -> None:
    path = tmp_path / "v2.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    for step in MIGRATIONS[:2]:
        step(conn)
    conn.execute("PRAGMA user_version = 2")
    conn.execute("INSERT INTO images (entry_id, key, image_id, label, manifest_name, "
                 "manifest_digest, config_digest, format, storage, output, status, "
                 "created_at, updated_at) VALUES ('cat-a', 'k', 'img-a', 'web-1', 'web', "
                 "'d', 'c', 'raw', 's3', 's3://b/', 'ready', 1, 1)")
    conn.execute("INSERT INTO artifacts VALUES ('cat-a', 0, 'disk', 's3://b/web.raw', 5, "
                 "'ab', 'application/octet-stream', '{}')")
    conn.close()
    entry = ImageCatalog(path).get("img-a")
    assert [a.location for a in entry.artifacts] == ["s3://b/web.raw"]
    assert entry.target == "s3" and entry.status is ImageStatus.READY
    catalog = ImageCatalog(path)
    catalog.mark_deleting("cat-a")
    assert catalog.mark_delete_failed("cat-a", "x").status is ImageStatus.DELETE_FAILED


def test_read_only_lookups_create_nothing(tmp_path: Path) -> None:
    assert ImageCatalog.open_existing(tmp_path / "none" / "catalog.sqlite3") is None
    assert not (tmp_path / "none").exists()
    ImageCatalog(tmp_path / "catalog.sqlite3")
    assert ImageCatalog.open_existing(tmp_path / "catalog.sqlite3") is not None


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "new.sqlite3"
    ImageCatalog(path)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(CatalogError, match="upgrade cloudlets"):
        ImageCatalog(path)


def test_catalog_uses_wal_and_defaults_to_the_data_dir(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUDLETS_HOME", str(tmp_path / "home"))
    catalog = ImageCatalog()
    assert catalog.path == tmp_path / "home" / "catalog.sqlite3" == default_catalog_path()
    conn = sqlite3.connect(catalog.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_entries_sort_by_name_then_numeric_version(tmp_path: Path) -> None:
    catalog = ImageCatalog(tmp_path / "c.sqlite3")
    for name, version in (("web", "1.10"), ("app", "3"), ("web", "1.9"), ("web", None)):
        request = RenderRequest(name, version, "d" * 64, "c" * 64, "raw", "local",
                                f"/o/{name}{version}", label=name)
        catalog.fail(catalog.claim(request).entry.entry_id, "x")
    assert [(e.manifest_name, e.manifest_version) for e in catalog.entries()] == [
        ("app", "3"), ("web", None), ("web", "1.9"), ("web", "1.10")]
    assert [e.manifest_version for e in catalog.entries(name="web", version="1.9")] == ["1.9"]


def _request(renderer: Renderer, manifest: dict[str, Any], output: str) -> RenderRequest:
    loaded = Manifest.load(manifest)
    return RenderRequest(loaded.name, loaded.version, loaded.digest,
                         renderer.resolve_config(loaded).digest, "tar", "local", output,
                         label=loaded.label)


def test_the_catalog_is_a_store_importing_neither_renderer_nor_registry() -> None:
    import ast

    import cloudlets.catalog

    forbidden = {"cloudlets.renderer", "cloudlets.drivers.providers", "cloudlets.images",
                 "cloudlets.compute", "cloudlets.fetch", "cloudlets.disk"}
    package = Path(cloudlets.catalog.__file__).parent
    seen = set()
    for module in package.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                seen.add(node.module)
            elif isinstance(node, ast.Import):
                seen.update(alias.name for alias in node.names)
    assert "cloudlets.catalog.records" in seen  # the walk does see the imports
    assert not {name for name in seen if name in forbidden or
                any(name.startswith(f + ".") for f in forbidden)}
    store = set(vars(cloudlets.catalog.ImageCatalog))
    assert not store & {"render", "wait", "delete"}  # no rendering, waiting or driver calls


def test_a_forked_child_claims_with_its_own_connection_and_its_own_pid(tmp_path: Path) -> None:
    """Each thread keeps a connection and a claim records the process's
    token read once: a forked child must use neither of its parent's."""
    from cloudlets.catalog import OWNER_LOST
    from cloudlets.catalog.leases import process_token

    catalog = ImageCatalog(tmp_path / "c.sqlite3")

    def request(name: str) -> RenderRequest:
        return RenderRequest(name, "1", "d" * 64, "c" * 64, "raw", "local", f"/o/{name}")

    mine = catalog.claim(request("parent")).entry  # the parent's connection and token
    pid = os.fork()
    if pid == 0:  # the child: claim, and say whether the row is its own
        code = 1
        try:
            entry = catalog.claim(request("child")).entry
            own = os.getpid()
            code = 0 if (entry.owner_pid, entry.owner_token) == (own, process_token(own)) \
                else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert mine.owner_pid == os.getpid()
    (child,) = [e for e in catalog.entries() if e.manifest_name == "child"]
    assert child.owner_pid == pid
    # the child is gone: a poll marks its render failed; the parent's lives on
    assert catalog.refresh(child.entry_id).error_type == OWNER_LOST
    assert catalog.refresh(mine.entry_id).status is ImageStatus.PENDING
    assert catalog.claim(request("parent")).state.name == "BUSY"


def test_a_write_waiting_at_most_gives_up_on_a_taken_lock_having_written_nothing(
        tmp_path: Path) -> None:
    """What the service's event loop asks: past the wait, a claim raises
    CatalogBusyError (the lock of another process, of another thread of this
    one); afterwards the thread's writes wait as long as the catalog says."""
    import threading

    from cloudlets.catalog import ClaimState
    from cloudlets.catalog.store import _writer_lock
    from cloudlets.errors import CatalogBusyError

    catalog = ImageCatalog(tmp_path / "c.sqlite3")
    request = RenderRequest("web", "1", "d" * 64, "c" * 64, "raw", "local", "/o/web")
    holder = sqlite3.connect(catalog.path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another process's writer, as SQLite sees it
    try:
        began = time.monotonic()
        with catalog.waiting_at_most(0.005), \
                pytest.raises(CatalogBusyError, match="another process kept the write lock"):
            catalog.claim(request)
        assert time.monotonic() - began < 1.0
        assert catalog.entries() == []  # nothing claimed; reads go on meanwhile
        releaser = threading.Timer(0.3, lambda: holder.execute("ROLLBACK"))
        releaser.start()
        claim = catalog.claim(request)  # no limit: waits for the lock as before
        releaser.join()
        assert claim.state is ClaimState.CLAIMED
    finally:
        holder.close()
    with _writer_lock(catalog.path), catalog.waiting_at_most(0.005), \
            pytest.raises(CatalogBusyError, match="another thread of this process"):
        catalog.fail(claim.entry.entry_id, "x")
    assert catalog.get(claim.entry.entry_id).status is ImageStatus.PENDING
