"""The image catalog: idempotent renders, concurrent processes, interrupted
renders, deletion and schema migrations. Real SQLite files, real renders
(``tar`` format, local storage) and real processes."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import signal
import sqlite3
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cloudlets.catalog import (
    MIGRATIONS,
    OWNER_LOST,
    SCHEMA_VERSION,
    CatalogError,
    ClaimState,
    ImageCatalog,
    ImageStatus,
    RenderRequest,
    default_catalog_path,
    expand_output,
)
from cloudlets.drivers.storage.local import LocalStorage
from cloudlets.errors import IntegrityError, StorageError
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


# -- child processes ------------------------------------------------------------

def _child_render(catalog_path: str, base: str, manifest: dict[str, Any], output: str,
                  counter: str, result: str, barrier: Any, hold: float) -> None:
    catalog = ImageCatalog(catalog_path, lease_seconds=5.0)
    renderer = make_renderer(Path(base))

    def note_render() -> None:
        with open(counter, "a") as handle:
            handle.write(f"{os.getpid()}\n")

    progress = StageCounter(hold=hold, action=note_render)
    barrier.wait()
    entry = catalog.render(renderer, manifest, output, "local", "tar", progress=progress,
                           poll_interval=0.05, wait_timeout=60)
    Path(result).write_text(json.dumps(entry.to_dict()))


def _child_hang(catalog_path: str, base: str, manifest: dict[str, Any], output: str,
                marker: str) -> None:
    catalog = ImageCatalog(catalog_path, lease_seconds=5.0)
    catalog.render(make_renderer(Path(base)), manifest, output, "local", "tar",
                   progress=StageCounter(hold=120.0, marker=Path(marker)))


# -- tests ------------------------------------------------------------------------

@pytest.fixture
def setup(tmp_path: Path) -> tuple[ImageCatalog, Renderer, dict[str, Any], str]:
    manifest = make_cloudlet(tmp_path / "src")
    return (ImageCatalog(tmp_path / "catalog.sqlite3"), make_renderer(tmp_path), manifest,
            str(tmp_path / "out") + "/{key}/")


def test_render_records_a_ready_image_with_versions_and_artifacts(setup: Any) -> None:
    catalog, renderer, manifest, output = setup
    entry = catalog.render(renderer, manifest, output, "local", "tar")
    assert entry.status is ImageStatus.READY
    assert entry.image_id and entry.image_id.startswith("img-")
    assert (entry.manifest_name, entry.manifest_version, entry.label) == ("tiny", "1.0", "tiny-1.0")
    assert entry.manifest_digest == Manifest.load(manifest).digest
    assert entry.config_digest == renderer.resolve_config(manifest).digest
    artifact = entry.artifacts[0]
    stored = Path(artifact.location)
    assert stored.is_file() and stored.stat().st_size == artifact.size
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == artifact.sha256
    assert entry.output == output.replace("{key}", entry.key[:16])
    assert entry.created_at <= entry.started_at <= entry.finished_at  # type: ignore[operator]
    assert catalog.get(entry.image_id) == entry == catalog.get(entry.entry_id)
    result = entry.to_result()
    assert result.artifacts == entry.artifacts and result.manifest_version == "1.0"


def test_same_request_is_rendered_once_and_force_renders_again(setup: Any) -> None:
    catalog, renderer, manifest, output = setup
    counter = StageCounter()
    first = catalog.render(renderer, manifest, output, "local", "tar", progress=counter)
    again = catalog.render(renderer, manifest, output, "local", "tar", progress=counter)
    assert counter.converts == 1 and again.entry_id == first.entry_id
    forced = catalog.render(renderer, manifest, output, "local", "tar", progress=counter,
                            force=True)
    assert counter.converts == 2
    assert forced.entry_id != first.entry_id and forced.image_id == first.image_id
    assert catalog.get(first.entry_id).status is ImageStatus.SUPERSEDED
    assert catalog.get(first.image_id).entry_id == forced.entry_id  # type: ignore[arg-type]
    other = catalog.render(renderer, manifest, output, "local", "tar", {"args": {"motd": "x"}},
                           progress=counter)
    assert counter.converts == 3
    assert other.config_digest != first.config_digest and other.image_id != first.image_id
    ready = catalog.entries(statuses=[ImageStatus.READY])
    assert sorted(e.entry_id for e in ready) == sorted([forced.entry_id, other.entry_id])


def test_failed_render_is_recorded_failed_and_never_ready(setup: Any) -> None:
    catalog, renderer, manifest, output = setup
    manifest["filesystem"]["sha256"] = "0" * 64
    for _ in range(2):  # a failed attempt does not block the next one
        with pytest.raises(IntegrityError):
            catalog.render(renderer, manifest, output, "local", "tar")
    failed = catalog.entries()
    assert [e.status for e in failed] == [ImageStatus.FAILED] * 2
    assert all(e.error_type == "IntegrityError" and "sha256" in (e.error or "") for e in failed)
    assert all(e.image_id is None and not e.artifacts for e in failed)
    assert catalog.entries(statuses=[ImageStatus.READY]) == []


def test_keyboard_interrupt_leaves_the_entry_failed(setup: Any, tmp_path: Path) -> None:
    catalog, renderer, manifest, output = setup

    def interrupt() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        catalog.render(renderer, manifest, output, "local", "tar",
                       progress=StageCounter(action=interrupt))
    (entry,) = catalog.entries()
    assert entry.status is ImageStatus.FAILED and entry.error_type == "KeyboardInterrupt"
    assert "interrupted" in (entry.error or "")
    assert not list((tmp_path / "out").rglob("*.tar*"))
    again = catalog.render(renderer, manifest, output, "local", "tar")
    assert again.ready and again.entry_id != entry.entry_id


def test_concurrent_processes_render_the_same_request_once(setup: Any, tmp_path: Path) -> None:
    catalog, _, manifest, output = setup
    counter = tmp_path / "renders.txt"
    barrier = SPAWN.Barrier(4)
    results = [tmp_path / f"result-{i}.json" for i in range(4)]
    processes = [SPAWN.Process(target=_child_render, args=(
        str(catalog.path), str(tmp_path), manifest, output, str(counter), str(result),
        barrier, 1.0)) for result in results]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    assert len(counter.read_text().split()) == 1
    entries = [json.loads(r.read_text()) for r in results]
    assert len({e["entry_id"] for e in entries}) == 1
    assert {e["status"] for e in entries} == {"ready"}
    (entry,) = catalog.entries()
    assert entry.ready and entry.entry_id == entries[0]["entry_id"]


def test_killed_renderer_is_failed_and_a_waiting_request_takes_over(
        setup: Any, tmp_path: Path) -> None:
    catalog, renderer, manifest, output = setup
    marker = tmp_path / "holding"
    child = SPAWN.Process(target=_child_hang, args=(
        str(catalog.path), str(tmp_path), manifest, output, str(marker)))
    child.start()
    try:
        wait_for(marker)
        (held,) = catalog.entries()
        assert held.status is ImageStatus.RENDERING and held.owner_pid == child.pid
        outcome: dict[str, Any] = {}

        def waiter() -> None:
            outcome["entry"] = catalog.render(renderer, manifest, output, "local", "tar",
                                              poll_interval=0.05, wait_timeout=30)

        thread = threading.Thread(target=waiter)
        thread.start()
        time.sleep(0.3)
        assert "entry" not in outcome  # waiting for the live owner
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        thread.join(30)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    taken = outcome["entry"]
    assert taken.ready and taken.entry_id != held.entry_id
    dead = catalog.get(held.entry_id)
    assert dead.status is ImageStatus.FAILED and dead.error_type == OWNER_LOST
    assert f"pid {child.pid}" in (dead.error or "") and "gone" in (dead.error or "")


def test_sigint_in_a_rendering_process_leaves_the_entry_failed(
        setup: Any, tmp_path: Path) -> None:
    catalog, _, manifest, output = setup
    marker = tmp_path / "holding"
    child = SPAWN.Process(target=_child_hang, args=(
        str(catalog.path), str(tmp_path), manifest, output, str(marker)))
    child.start()
    try:
        wait_for(marker)
        assert child.pid is not None
        os.kill(child.pid, signal.SIGINT)
        child.join(20)
    finally:
        if child.is_alive():
            child.kill()
            child.join()
    assert child.exitcode != 0
    (entry,) = catalog.entries()
    assert entry.status is ImageStatus.FAILED and entry.error_type == "KeyboardInterrupt"


def test_stale_lease_is_reaped_but_a_heartbeat_keeps_a_long_render(
        tmp_path: Path) -> None:
    manifest = make_cloudlet(tmp_path / "src")
    renderer = make_renderer(tmp_path)
    path = tmp_path / "catalog.sqlite3"
    short = ImageCatalog(path, lease_seconds=0.3)
    request = _request(renderer, manifest, str(tmp_path / "out") + "/")
    # An owner that stops renewing its lease (alive, but stuck) is reaped.
    stuck = short.claim(request)
    assert stuck.state is ClaimState.CLAIMED
    assert short.claim(request).state is ClaimState.BUSY
    time.sleep(0.5)
    retry = ImageCatalog(path).claim(request)
    assert retry.state is ClaimState.CLAIMED
    assert [e.entry_id for e in retry.reaped] == [stuck.entry.entry_id]
    assert "stopped renewing its lease" in (retry.reaped[0].error or "")
    with pytest.raises(CatalogError, match="not recorded"):
        short.start(stuck.entry.entry_id)
    short.fail(retry.entry.entry_id, "abandoned by the test")
    # A render held longer than its lease stays claimed thanks to the heartbeat.
    marker = tmp_path / "holding"
    done: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: done.setdefault("entry", short.render(
        renderer, manifest, request.output, "local", "tar",
        progress=StageCounter(hold=1.2, marker=marker))))
    thread.start()
    wait_for(marker)
    time.sleep(0.7)
    assert ImageCatalog(path).claim(request).state is ClaimState.BUSY
    thread.join(30)
    assert done["entry"].ready


def test_waiter_reports_a_concurrent_render_that_failed(setup: Any, tmp_path: Path) -> None:
    catalog, renderer, manifest, output = setup
    owner = catalog.claim(_request(renderer, manifest, output))
    outcome: dict[str, BaseException] = {}

    def waiter() -> None:
        try:
            catalog.render(renderer, manifest, output, "local", "tar", poll_interval=0.05,
                           wait_timeout=30)
        except CatalogError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.3)
    catalog.fail(owner.entry.entry_id, IntegrityError("sha256 mismatch in the test"))
    thread.join(30)
    assert "sha256 mismatch in the test" in str(outcome["error"])
    with pytest.raises(CatalogError, match="gave up"):
        blocked = catalog.claim(_request(renderer, manifest, output + "x/"))
        catalog.wait(blocked.entry.entry_id, 0.2, poll_interval=0.05)


def test_delete_removes_artifacts_through_the_storage_driver(setup: Any) -> None:
    catalog, renderer, manifest, output = setup
    entry = catalog.render(renderer, manifest, output, "local", "tar")
    location = Path(entry.artifacts[0].location)
    assert location.exists()
    deleted = catalog.delete(entry.image_id)  # type: ignore[arg-type]
    assert deleted.status is ImageStatus.DELETED and not location.exists()
    assert catalog.get(entry.image_id).status is ImageStatus.DELETED  # type: ignore[arg-type]
    assert catalog.delete(entry.entry_id).status is ImageStatus.DELETED  # idempotent
    again = catalog.render(renderer, manifest, output, "local", "tar")
    assert again.ready and again.entry_id != entry.entry_id and location.exists()
    with pytest.raises(CatalogError, match="not 'other'"):
        class Other(LocalStorage):
            name = "other"
        catalog.delete(again.entry_id, storage=Other())
    assert catalog.get(again.entry_id).ready
    with pytest.raises(CatalogError, match="no image"):
        catalog.get("img-unknown")


def test_delete_failure_keeps_the_entry_deleting_and_can_be_retried(setup: Any) -> None:
    catalog, renderer, manifest, output = setup
    entry = catalog.render(renderer, manifest, output, "local", "tar")
    location = Path(entry.artifacts[0].location)
    # Something the storage driver cannot unlink now sits at the location.
    location.unlink()
    (location / "blocker").mkdir(parents=True)
    with pytest.raises(StorageError, match="cannot delete"):
        catalog.delete(entry.entry_id)
    half = catalog.get(entry.entry_id)
    assert half.status is ImageStatus.DELETING and "deletion incomplete" in (half.error or "")
    assert catalog.entries(statuses=[ImageStatus.READY]) == []
    (location / "blocker").rmdir()
    location.rmdir()
    location.write_bytes(b"back")
    assert catalog.delete(entry.entry_id).status is ImageStatus.DELETED
    assert not location.exists()


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
    assert catalog.schema_version == SCHEMA_VERSION == 2
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
    assert ImageCatalog(path).schema_version == 2  # reopening is a no-op


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


def test_output_placeholders(tmp_path: Path) -> None:
    request = RenderRequest("web", "2", "d" * 64, "c" * 64, "raw", "local", "x")
    assert expand_output("/srv/{name}/{version}/{key}/", request) == \
        f"/srv/web/2/{request.key[:16]}/"
    with pytest.raises(CatalogError, match="unknown placeholder"):
        expand_output("/srv/{nope}/", request)


def _request(renderer: Renderer, manifest: dict[str, Any], output: str) -> RenderRequest:
    loaded = Manifest.load(manifest)
    return RenderRequest(loaded.name, loaded.version, loaded.digest,
                         renderer.resolve_config(loaded).digest, "tar", "local", output,
                         label=loaded.label)
