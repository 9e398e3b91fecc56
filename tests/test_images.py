"""The create-image operation (cloudlets.images): idempotent renders,
concurrent processes, interrupted renders, deletion. Real SQLite files, real
renders (``tar`` format, local storage) and real processes."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import pytest

from cloudlets.catalog import (
    OWNER_LOST,
    CatalogError,
    ClaimState,
    ImageCatalog,
    ImageStatus,
    RenderRequest,
)
from cloudlets.drivers.storage.local import LocalStorage
from cloudlets.errors import (
    DriverNotFoundError,
    ImageNotFoundError,
    IntegrityError,
    StorageError,
)
from cloudlets.images import Images, expand_output
from cloudlets.manifest import Manifest
from cloudlets.renderer import Renderer
from tests.test_catalog import StageCounter, _request, make_cloudlet, make_renderer, wait_for

SPAWN = multiprocessing.get_context("spawn")


# -- child processes ------------------------------------------------------------

def _child_render(catalog_path: str, base: str, manifest: dict[str, Any], output: str,
                  counter: str, result: str, barrier: Any, hold: float) -> None:
    images = Images(make_renderer(Path(base)), ImageCatalog(catalog_path, lease_seconds=5.0))

    def note_render() -> None:
        with open(counter, "a") as handle:
            handle.write(f"{os.getpid()}\n")

    progress = StageCounter(hold=hold, action=note_render)
    barrier.wait()
    claim = images.submit(manifest, output, "local", "tar")
    if claim.state is ClaimState.CLAIMED:
        entry = images.run(claim.entry.entry_id, progress)
    else:  # the caller chooses to wait
        entry = images.wait(claim.entry.entry_id, 60, poll_interval=0.05)
    Path(result).write_text(json.dumps({**entry.to_dict(), "claim": str(claim.state)}))


def _child_hang(catalog_path: str, base: str, manifest: dict[str, Any], output: str,
                marker: str) -> None:
    images = Images(make_renderer(Path(base)), ImageCatalog(catalog_path, lease_seconds=5.0))
    images.create(manifest, output, "local", "tar",
                  progress=StageCounter(hold=120.0, marker=Path(marker)))


# -- tests ------------------------------------------------------------------------

@pytest.fixture
def setup(tmp_path: Path) -> tuple[Images, Renderer, dict[str, Any], str]:
    manifest = make_cloudlet(tmp_path / "src")
    renderer = make_renderer(tmp_path)
    return (Images(renderer, ImageCatalog(tmp_path / "catalog.sqlite3")), renderer, manifest,
            str(tmp_path / "out") + "/{key}/")


def test_render_records_a_ready_image_with_versions_and_artifacts(setup: Any) -> None:
    images, renderer, manifest, output = setup
    catalog = images.catalog
    entry = images.create(manifest, output, "local", "tar")
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
    images, _renderer, manifest, output = setup
    catalog = images.catalog
    counter = StageCounter()
    first = images.create(manifest, output, "local", "tar", progress=counter)
    again = images.create(manifest, output, "local", "tar", progress=counter)
    assert counter.converts == 1 and again.entry_id == first.entry_id
    forced = images.create(manifest, output, "local", "tar", progress=counter,
                            force=True)
    assert counter.converts == 2
    assert forced.entry_id != first.entry_id and forced.image_id == first.image_id
    assert catalog.get(first.entry_id).status is ImageStatus.SUPERSEDED
    assert catalog.get(first.image_id).entry_id == forced.entry_id  # type: ignore[arg-type]
    other = images.create(manifest, output, "local", "tar", {"args": {"motd": "x"}},
                           progress=counter)
    assert counter.converts == 3
    assert other.config_digest != first.config_digest and other.image_id != first.image_id
    ready = catalog.entries(statuses=[ImageStatus.READY])
    assert sorted(e.entry_id for e in ready) == sorted([forced.entry_id, other.entry_id])


def test_failed_render_is_recorded_failed_and_never_ready(setup: Any) -> None:
    images, _renderer, manifest, output = setup
    catalog = images.catalog
    manifest["filesystem"]["sha256"] = "0" * 64
    for _ in range(2):  # a failed attempt does not block the next one
        with pytest.raises(IntegrityError):
            images.create(manifest, output, "local", "tar")
    failed = catalog.entries()
    assert [e.status for e in failed] == [ImageStatus.FAILED] * 2
    assert all(e.error_type == "IntegrityError" and "sha256" in (e.error or "") for e in failed)
    assert all(e.image_id is None and not e.artifacts for e in failed)
    assert catalog.entries(statuses=[ImageStatus.READY]) == []


def test_keyboard_interrupt_leaves_the_entry_failed(setup: Any, tmp_path: Path) -> None:
    images, _renderer, manifest, output = setup
    catalog = images.catalog

    def interrupt() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        images.create(manifest, output, "local", "tar",
                       progress=StageCounter(action=interrupt))
    (entry,) = catalog.entries()
    assert entry.status is ImageStatus.FAILED and entry.error_type == "KeyboardInterrupt"
    assert "interrupted" in (entry.error or "")
    assert not list((tmp_path / "out").rglob("*.tar*"))
    again = images.create(manifest, output, "local", "tar")
    assert again.ready and again.entry_id != entry.entry_id


def test_concurrent_processes_render_the_same_request_once(setup: Any, tmp_path: Path) -> None:
    images, _, manifest, output = setup
    catalog = images.catalog
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
    assert sorted(e["claim"] for e in entries) == ["busy"] * 3 + ["claimed"]
    assert len({e["entry_id"] for e in entries}) == 1
    assert {e["status"] for e in entries} == {"ready"}
    (entry,) = catalog.entries()
    assert entry.ready and entry.entry_id == entries[0]["entry_id"]


def test_killed_renderer_is_failed_and_a_waiting_request_takes_over(
        setup: Any, tmp_path: Path) -> None:
    images, _renderer, manifest, output = setup
    catalog = images.catalog
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
            claim = images.submit(manifest, output, "local", "tar")
            assert claim.state is ClaimState.BUSY
            # create() never waits; this caller does, then claims the render again.
            assert images.create(manifest, output, "local", "tar").status \
                is ImageStatus.RENDERING
            outcome["waited"] = images.wait(claim.entry.entry_id, 30, poll_interval=0.05)
            outcome["entry"] = images.create(manifest, output, "local", "tar")

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
    assert outcome["waited"].entry_id == held.entry_id
    assert outcome["waited"].error_type == OWNER_LOST
    dead = catalog.get(held.entry_id)
    assert dead.status is ImageStatus.FAILED and dead.error_type == OWNER_LOST
    assert f"pid {child.pid}" in (dead.error or "") and "gone" in (dead.error or "")


def test_sigint_in_a_rendering_process_leaves_the_entry_failed(
        setup: Any, tmp_path: Path) -> None:
    images, _, manifest, output = setup
    catalog = images.catalog
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
    thread = threading.Thread(target=lambda: done.setdefault("entry", Images(
        renderer, short).create(manifest, request.output, "local", "tar",
                                progress=StageCounter(hold=1.2, marker=marker))))
    thread.start()
    wait_for(marker)
    time.sleep(0.7)
    assert ImageCatalog(path).claim(request).state is ClaimState.BUSY
    thread.join(30)
    assert done["entry"].ready


def test_waiter_reports_a_concurrent_render_that_failed(setup: Any, tmp_path: Path) -> None:
    images, renderer, manifest, output = setup
    catalog = images.catalog
    owner = catalog.claim(_request(renderer, manifest, output))
    outcome: dict[str, Any] = {}

    def waiter() -> None:
        claim = images.submit(manifest, output, "local", "tar")
        outcome["state"] = claim.state
        outcome["entry"] = images.wait(claim.entry.entry_id, 30, poll_interval=0.05)

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.3)
    assert "entry" not in outcome
    catalog.fail(owner.entry.entry_id, IntegrityError("sha256 mismatch in the test"))
    thread.join(30)
    assert outcome["state"] is ClaimState.BUSY
    failed = outcome["entry"]
    assert failed.status is ImageStatus.FAILED and failed.error_type == "IntegrityError"
    assert "sha256 mismatch in the test" in (failed.error or "")
    blocked = catalog.claim(_request(renderer, manifest, output + "x/"))
    started = time.monotonic()
    with pytest.raises(CatalogError, match="gave up"):
        images.wait(blocked.entry.entry_id, 0.2, poll_interval=0.05)
    assert time.monotonic() - started < 5


def test_delete_removes_artifacts_through_the_storage_driver(setup: Any) -> None:
    images, _renderer, manifest, output = setup
    catalog = images.catalog
    entry = images.create(manifest, output, "local", "tar")
    location = Path(entry.artifacts[0].location)
    assert location.exists()
    deleted = images.delete(entry.image_id)  # type: ignore[arg-type]
    assert deleted.entry.status is ImageStatus.DELETED and not location.exists()
    assert deleted.removed == (str(location),) and deleted.missing == () and not deleted.already
    assert catalog.get(entry.image_id).status is ImageStatus.DELETED  # type: ignore[arg-type]
    twice = images.delete(entry.entry_id)  # idempotent, and says nothing was removed
    assert twice.entry.status is ImageStatus.DELETED and twice.already and twice.removed == ()
    again = images.create(manifest, output, "local", "tar")
    assert again.ready and again.entry_id != entry.entry_id and location.exists()
    with pytest.raises(CatalogError, match="not 'other'"):
        class Other(LocalStorage):
            name = "other"
        images.delete(again.entry_id, storage=Other())
    # Another target of the same driver (another root) may not delete it.
    with pytest.raises(CatalogError, match="stored in the target"):
        images.delete(again.entry_id, storage=LocalStorage(root=str(location.parent)))
    assert catalog.get(again.entry_id).ready
    with pytest.raises(ImageNotFoundError, match="no image"):
        catalog.get("img-unknown")
    # An artifact the driver cannot find is reported missing, not removed.
    location.unlink()
    gone = images.delete(again.entry_id)
    assert gone.missing == (str(location),) and gone.removed == ()


def test_delete_failure_leaves_the_entry_delete_failed_and_can_be_retried(setup: Any) -> None:
    images, _renderer, manifest, output = setup
    catalog = images.catalog
    entry = images.create(manifest, output, "local", "tar")
    location = Path(entry.artifacts[0].location)
    # Something the storage driver cannot unlink now sits at the location.
    location.unlink()
    (location / "blocker").mkdir(parents=True)
    with pytest.raises(StorageError, match="cannot delete"):
        images.delete(entry.entry_id)
    half = catalog.get(entry.entry_id)
    assert half.status is ImageStatus.DELETE_FAILED
    assert "deletion incomplete" in (half.error or "") and "0 removed" in (half.error or "")
    assert catalog.entries(statuses=[ImageStatus.READY]) == []
    (location / "blocker").rmdir()
    location.rmdir()
    location.write_bytes(b"back")
    assert images.delete(entry.entry_id).entry.status is ImageStatus.DELETED
    assert not location.exists()


def test_output_placeholders(tmp_path: Path) -> None:
    request = RenderRequest("web", "2", "d" * 64, "c" * 64, "raw", "local", "x")
    assert expand_output("/srv/{name}/{version}/{key}/", request) == \
        f"/srv/web/2/{request.key[:16]}/"
    with pytest.raises(CatalogError, match="unknown placeholder"):
        expand_output("/srv/{nope}/", request)




def test_submit_then_run_is_create_and_run_refuses_what_it_did_not_claim(setup: Any) -> None:
    images, renderer, manifest, output = setup
    claim = images.submit(manifest, output, "local", "tar")
    assert claim.state is ClaimState.CLAIMED and claim.entry.status is ImageStatus.PENDING
    # The output template is expanded once, at submit, and recorded with the claim.
    assert claim.entry.output == expand_output(output, RenderRequest(
        claim.entry.manifest_name, claim.entry.manifest_version, claim.entry.manifest_digest,
        claim.entry.config_digest, "tar", "local", output))
    assert "{key}" not in claim.entry.output
    entry = images.run(claim.entry.entry_id)
    assert entry.ready and entry.entry_id == claim.entry.entry_id
    # One digest: the catalog key, the renderer's job key and the image id agree.
    job = renderer.prepare(manifest, output, "local", "tar")
    assert job.key == entry.key and entry.image_id == job.image_id
    assert entry.image_id == Renderer.image_id(job.manifest, job.config, "tar", "local", output)
    with pytest.raises(CatalogError, match="not submitted here"):
        images.run(entry.entry_id)
    assert images.submit(manifest, output, "local", "tar").state is ClaimState.EXISTING
    assert entry.to_result().timings["convert"] > 0  # the timings are recorded


def test_invalid_input_records_nothing(setup: Any) -> None:
    images, _, manifest, output = setup
    with pytest.raises(CatalogError, match="unknown placeholder"):
        images.submit(manifest, "/srv/{nope}/", "local", "tar")
    manifest["args"]["motd"]["type"] = "integer"
    with pytest.raises(Exception, match="motd"):
        images.submit(manifest, output, "local", "tar")
    assert images.catalog.entries() == []


def test_superseded_published_images_are_withdrawn(setup: Any) -> None:
    images, _, manifest, output = setup
    catalog = images.catalog
    first = images.create(manifest, output, "local", "tar")
    # Pretend the first render was published under a provider id (an AMI).
    with catalog._write() as conn:
        conn.execute("UPDATE images SET image_id = 'ami-old', details = ? WHERE entry_id = ?",
                     (json.dumps({"publish": {"image_id": "ami-old"}}), first.entry_id))
    withdrawn: list[tuple[str, str]] = []
    forced = images.create(manifest, output, "local", "tar", force=True,
                           withdraw=lambda image_id, label: withdrawn.append((image_id, label))
                           or True)
    assert withdrawn == [("ami-old", "tiny-1.0")]
    assert catalog.get(first.entry_id).status is ImageStatus.DELETED
    assert Path(forced.artifacts[0].location).exists()  # shared artifact kept
    # A provider that refuses leaves the old entry superseded for a later try.
    again = images.create(manifest, output, "local", "tar", force=True,
                          withdraw=lambda image_id, label: False)
    assert again.ready and catalog.get(forced.entry_id).status is ImageStatus.SUPERSEDED


def test_storage_driver_for_rebuilds_by_name_or_class(setup: Any) -> None:
    from cloudlets.images import storage_driver_for

    images, _, manifest, output = setup
    entry = images.create(manifest, output, "local", "tar")
    assert storage_driver_for(entry).name == "local"
    assert entry.storage_class == "cloudlets.drivers.storage.local:LocalStorage"
    unregistered = type(entry)(**{**entry.__dict__, "storage": "gone"})
    assert isinstance(storage_driver_for(unregistered), LocalStorage)  # by its class
    lost = type(entry)(**{**entry.__dict__, "storage": "gone", "storage_class": None})
    with pytest.raises(DriverNotFoundError, match="no storage driver named 'gone'"):
        storage_driver_for(lost)


def test_targets_of_one_driver_keep_their_images_apart(tmp_path: Path) -> None:
    manifest = make_cloudlet(tmp_path / "src")
    images = Images(make_renderer(tmp_path), ImageCatalog(tmp_path / "catalog.sqlite3"))
    tenant_a = LocalStorage(root=str(tmp_path / "a"))
    tenant_b = LocalStorage(root=str(tmp_path / "b"))
    assert tenant_a.target == f"local?root={quote_plus(str(tmp_path / 'a'))}"
    first = images.create(manifest, "images/{key}/", tenant_a, "tar")
    # The same request to another root is another image, not the first one again.
    second = images.create(manifest, "images/{key}/", tenant_b, "tar")
    assert second.entry_id != first.entry_id and second.image_id != first.image_id
    assert Path(first.artifacts[0].location).is_relative_to(tmp_path / "a")
    assert Path(second.artifacts[0].location).is_relative_to(tmp_path / "b")
    assert [e.entry_id for e in images.catalog.entries(target=tenant_b.target)] == [
        second.entry_id]
    with pytest.raises(CatalogError, match="stored in the target"):
        images.delete(first.entry_id, storage=tenant_b)
    assert Path(first.artifacts[0].location).exists()
