"""The rendering service over HTTP: a real ``cloudlets serve`` subprocess on
a loopback port, a tiny cloudlet (tar format) served by a loopback tarball
server that the service's configuration allows explicitly."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.service_fixture import (
    REPO,
    Service,
    TarballServer,
    served_cloudlet,
    serving,
    start_service,
    tarballs,
)

pytest.importorskip("starlette", reason="pip install cloudlets[service]")
pytest.importorskip("uvicorn", reason="pip install cloudlets[service]")

__all__ = ["tarballs"]  # the fixture, imported for this module

TOKENS = {"alice": "alice-token-0123456789abcdef", "bob": "bob-token-0123456789abcdef",
          "reader": "reader-token-0123456789abcdef", "ops": "ops-token-0123456789abcdef",
          "carol": "carol-token-0123456789abcdef"}
STAGES = {"queued", "prepare", "fetch", "rootfs", "templates", "disk", "tree", "convert",
          "store", "publish", "done"}


def service_config(server: TarballServer, *, workers: int = 2, grace: float = 2.0,
                   per_tenant: int = 2, render_workers: str = "processes") -> str:
    return f"""
[service]
data_dir = "state"
workers = {workers}
render_workers = "{render_workers}"
shutdown_grace = {grace}
formats = ["tar", "qcow2"]
[limits]
max_body_bytes = 65536
renders_per_tenant = {per_tenant}
page_size = 2
[targets.local]
driver = "local"
root = "images"
[targets.other]
driver = "local"
root = "other-images"
[formats.tar]
[formats.qcow2]
[presets]
config = {{hostname = "provider-host"}}
locked = ["hostname"]
[tenants.alice]
token_env = "CLOUDLETS_TOKEN_ALICE"
[tenants.bob]
token_env = "CLOUDLETS_TOKEN_BOB"
targets = ["local"]
[tenants.reader]
token_env = "CLOUDLETS_TOKEN_READER"
operations = ["read"]
[tenants.ops]
token_env = "CLOUDLETS_TOKEN_OPS"
admin = true
[tenants.carol]
token_env = "CLOUDLETS_TOKEN_CAROL"
[tenants.carol.fetch]
only_hosts = ["mirror.invalid"]    # carol's own policy: not the loopback tarball server
[fetch]
allow_hosts = ["{server.host}"]
only_hosts = ["127.0.0.1"]
"""


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory,
            tarballs: TarballServer) -> Iterator[Service]:
    tarballs.gate.set()
    with serving(tmp_path_factory.mktemp("service") / "etc", service_config(tarballs),
                 TOKENS) as running:
        yield running


def create(service: Service, tenant: str, manifest: dict[str, Any], *,
           fmt: str = "tar", target: str = "local", **extra: Any) -> Any:
    body = {"manifest": manifest, "format": fmt, "target": target, **extra}
    return service.call("POST", "/v1/images", tenant, json=body)


def assert_error(answer: Any, status: int, error: str | None = None) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = answer.json()
    assert set(body) == {"error", "message", "problems"}
    assert "Traceback" not in answer.text
    if error is not None:
        assert body["error"] == error, body
    return body


# -- creating, polling, the same request again -------------------------------------

def test_create_answers_202_then_the_image_is_ready(service: Service,
                                                    tarballs: TarballServer) -> None:
    manifest = served_cloudlet(tarballs, "web", "1.0")
    answer = create(service, "alice", manifest, config={"args": {"motd": "welcome"}})
    assert answer.status_code == 202, answer.text
    image = answer.json()
    assert image["status"] in ("pending", "rendering", "ready")
    assert answer.headers["location"] == f"/v1/images/{image['id']}"
    ready = service.wait_image(image["id"], "alice")
    assert ready["status"] == "ready", ready
    assert ready["progress"] == {"stage": "done", "fraction": 1.0, "stage_fraction": None}
    assert ready["image_id"].startswith("img-") and ready["provider_id"] is None
    assert (ready["name"], ready["version"], ready["target"]) == ("web", "1.0", "local")
    artifact = ready["artifacts"][0]
    path = Path(artifact["location"])
    # relative paths of the configuration are relative to its file
    assert path.is_relative_to(service.config.parent / "images" / "alice")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == artifact["sha256"]
    assert path.stat().st_size == artifact["size"]
    with tarfile.open(path) as tar:
        member = tar.extractfile("./etc/motd")
        assert member is not None
        assert member.read() == b"welcome on provider-host\n"  # the provider's preset

    again = create(service, "alice", manifest, config={"args": {"motd": "welcome"}})
    assert again.status_code == 200, again.text
    assert again.json()["id"] == image["id"]
    listed = service.call("GET", "/v1/images?name=web", "alice").json()
    assert [i["id"] for i in listed["images"]] == [image["id"]]


def test_idempotency_key_answers_the_first_image(service: Service,
                                                 tarballs: TarballServer) -> None:
    manifest = served_cloudlet(tarballs, "keyed", "1.0")
    headers = {"Idempotency-Key": "order-42"}
    body = {"manifest": manifest, "format": "tar", "target": "local"}
    first = service.call("POST", "/v1/images", "alice", json=body, headers=headers)
    assert first.status_code == 202, first.text
    second = service.call("POST", "/v1/images", "alice", json=body, headers=headers)
    assert second.status_code == 200 and second.json()["id"] == first.json()["id"]
    other = service.call("POST", "/v1/images", "alice", headers=headers,
                         json={**body, "config": {"args": {"motd": "other"}}})
    assert_error(other, 422, "IdempotencyMismatch")
    # another tenant's key of the same name is its own
    bobs = service.call("POST", "/v1/images", "bob", json=body, headers=headers)
    assert bobs.status_code == 202 and bobs.json()["id"] != first.json()["id"]
    assert service.wait_image(first.json()["id"], "alice")["status"] == "ready"
    assert service.wait_image(bobs.json()["id"], "bob")["status"] == "ready"


# -- tenants --------------------------------------------------------------------------

def test_tenants_see_only_their_own_images_and_the_admin_sees_all(
        service: Service, tarballs: TarballServer) -> None:
    image = create(service, "alice", served_cloudlet(tarballs, "private", "1.0")).json()
    service.wait_image(image["id"], "alice")
    for method in ("GET", "DELETE"):
        assert_error(service.call(method, f"/v1/images/{image['id']}", "bob"), 404, "NotFound")
    ready = service.call("GET", f"/v1/images/{image['id']}", "alice").json()
    assert_error(service.call("GET", f"/v1/images/{ready['image_id']}", "bob"), 404)
    bobs = service.call("GET", "/v1/images?limit=500", "bob").json()["images"]
    assert image["id"] not in {i["id"] for i in bobs}
    seen = service.call("GET", f"/v1/images/{image['id']}", "ops")
    assert seen.status_code == 200 and seen.json()["tenant"] == "alice"
    everything = service.call("GET", "/v1/images?limit=500", "ops").json()["images"]
    assert image["id"] in {i["id"] for i in everything}


def test_tokens_and_permissions(service: Service, tarballs: TarballServer) -> None:
    for headers in ({}, {"Authorization": "Bearer not-a-token-of-anyone"},
                    {"Authorization": f"Basic {TOKENS['alice']}"}):
        answer = service.call("GET", "/v1/images", headers=headers)
        assert_error(answer, 401, "Unauthorized")
        assert answer.headers["www-authenticate"].startswith("Bearer")
    manifest = served_cloudlet(tarballs, "perm", "1.0")
    assert_error(create(service, "reader", manifest), 403, "Forbidden")  # read only
    assert service.call("GET", "/v1/images", "reader").status_code == 200
    assert_error(create(service, "bob", manifest, target="other"), 403, "Forbidden")


# -- bad input ------------------------------------------------------------------------

def test_bad_input_answers_4xx_with_a_json_body(service: Service,
                                                tarballs: TarballServer) -> None:
    manifest = served_cloudlet(tarballs, "bad", "1.0")
    body = assert_error(service.call("POST", "/v1/images", "alice", data='{"manifest": '), 400,
                        "JSONSyntaxError")
    assert body["problems"]
    assert_error(service.call("POST", "/v1/images", "alice", data="[1, 2]"), 400)
    assert_error(service.call("POST", "/v1/images", "alice", data='{"a": 1, "a": 2}'), 400)
    body = assert_error(create(service, "alice", manifest, fmt="floppy", target="nowhere",
                               colour="red"), 400)
    assert {p["pointer"] for p in body["problems"]} == {"/format", "/target", "/colour"}
    body = assert_error(service.call("POST", "/v1/images", "alice",
                                     json={"format": "tar", "target": "local"}), 400)
    assert "manifest" in body["problems"][0]["message"]

    broken = {**manifest, "version": 7, "filesystem": {"url": "x", "sha256": "nope"}}
    broken.pop("boot")
    body = assert_error(create(service, "alice", broken), 400, "ManifestError")
    pointers = {p["pointer"] for p in body["problems"]}
    assert "/manifest/version" in pointers and "/manifest/filesystem/sha256" in pointers
    assert len(pointers) >= 2

    body = assert_error(create(service, "alice", manifest, config={"hostname": "mine"}), 400,
                        "LockedKeyError")
    assert body["problems"][0]["pointer"] == "/config/hostname"
    assert "hostname" in body["message"]
    body = assert_error(create(service, "alice", manifest,
                               format_options={"ex_root": "/etc"}), 400)
    assert body["problems"][0]["pointer"] == "/format_options/ex_root"

    huge = json.dumps({"manifest": manifest, "format": "tar", "target": "local",
                       "config": {"args": {"motd": "x" * 70000}}})
    assert_error(service.call("POST", "/v1/images", "alice", data=huge), 413, "PayloadTooLarge")
    assert_error(service.call("POST", "/v1/images", "alice", data=b"{}",
                              headers={"Content-Type": "text/plain"}), 415)
    assert_error(service.call("GET", "/v1/images?limit=0&cursor=x", "alice"), 400)
    assert_error(service.call("GET", "/v1/images?status=lost", "alice"), 400)
    assert_error(service.call("GET", "/v1/nothing", "alice"), 404)
    assert_error(service.call("PUT", "/v1/images", "alice"), 405)
    assert_error(service.call("POST", "/v1/images", "alice",
                              json={"manifest_url": "file:///etc/passwd", "format": "tar",
                                    "target": "local"}), 400)
    # no render was recorded for any of them
    names = {i["name"] for i in service.call("GET", "/v1/images?limit=500", "alice")
             .json()["images"]}
    assert "bad" not in names


def test_a_refused_tarball_url_fails_the_render_naming_the_rule(
        service: Service, tarballs: TarballServer) -> None:
    manifest = served_cloudlet(tarballs, "elsewhere", "1.0")
    manifest["filesystem"]["url"] = "http://tarballs.example.invalid/tiny.tar.gz"
    image = create(service, "alice", manifest).json()
    failed = service.wait_image(image["id"], "alice")
    assert failed["status"] == "failed"
    assert failed["error"]["type"] == "FetchError"
    assert "policy" in failed["error"]["message"]


def test_a_tenants_own_url_policy_applies_to_its_renders(service: Service,
                                                          tarballs: TarballServer) -> None:
    manifest = served_cloudlet(tarballs, "carols", "1.0")
    (tarballs.root / "carols.json").write_text(json.dumps(manifest))
    image = create(service, "carol", manifest).json()
    failed = service.wait_image(image["id"], "carol")
    assert failed["status"] == "failed" and failed["error"]["type"] == "FetchError"
    assert "policy" in failed["error"]["message"]
    refused = service.call("POST", "/v1/images", "carol", json={
        "manifest_url": f"{tarballs.url}/carols.json", "format": "tar", "target": "local"})
    assert_error(refused, 400, "FetchError")
    assert not [path for path in tarballs.requests if "carols" in path]  # never asked
    # the same cloudlet, another tenant: the service's policy allows it
    assert service.wait_image(create(service, "alice", manifest).json()["id"],
                              "alice")["status"] == "ready"


def test_manifest_url_is_fetched_under_the_policy(service: Service,
                                                  tarballs: TarballServer) -> None:
    manifest = served_cloudlet(tarballs, "byurl", "1.0")
    (tarballs.root / "byurl.json").write_text(json.dumps(manifest))
    answer = service.call("POST", "/v1/images", "alice", json={
        "manifest_url": f"{tarballs.url}/byurl.json", "format": "tar", "target": "local"})
    assert answer.status_code == 202, answer.text
    assert service.wait_image(answer.json()["id"], "alice")["status"] == "ready"
    refused = service.call("POST", "/v1/images", "alice", json={
        "manifest_url": "http://manifests.example.invalid/m.json", "format": "tar",
        "target": "local"})
    assert "policy" in assert_error(refused, 400, "FetchError")["message"]


# -- listing, progress, limits, deleting -------------------------------------------------

def test_list_pages_and_filters(service: Service, tarballs: TarballServer) -> None:
    ids = []
    for version in ("1.0", "2.0", "10.0"):  # one at a time: bob may have 2 in flight
        ids.append(create(service, "bob", served_cloudlet(tarballs, "paged", version))
                   .json()["id"])
        service.wait_image(ids[-1], "bob")
    first = service.call("GET", "/v1/images?name=paged", "bob").json()
    assert len(first["images"]) == 2 and first["next"]  # page_size = 2
    rest = service.call("GET", f"/v1/images?name=paged&cursor={first['next']}", "bob").json()
    assert rest["next"] is None
    versions = [i["version"] for i in first["images"] + rest["images"]]
    assert versions == ["1.0", "2.0", "10.0"]  # numbers compared as numbers
    only = service.call("GET", "/v1/images?name=paged&version=2.0&status=ready", "bob").json()
    assert [i["id"] for i in only["images"]] == [ids[1]]
    assert service.call("GET", "/v1/images?name=paged&status=failed", "bob").json() == {
        "images": [], "next": None}


def test_progress_while_rendering_and_the_tenant_limit(service: Service,
                                                       tarballs: TarballServer) -> None:
    tarballs.gate.clear()
    try:
        held = [create(service, "bob", served_cloudlet(tarballs, f"held{n}", "1.0", slow=True))
                for n in range(2)]
        assert [a.status_code for a in held] == [202, 202], [a.text for a in held]
        deadline = time.monotonic() + 20
        while True:
            image = service.call("GET", f"/v1/images/{held[0].json()['id']}", "bob").json()
            if image["status"] == "rendering":
                break
            assert time.monotonic() < deadline, image
            time.sleep(0.05)
        assert image["progress"]["stage"] in STAGES
        assert 0.0 <= image["progress"]["fraction"] < 1.0
        over = create(service, "bob", served_cloudlet(tarballs, "held3", "1.0"))
        assert_error(over, 429, "TooManyRequests")
        assert over.headers["retry-after"].isdigit()
        # another tenant is not limited by bob's renders
        other = create(service, "alice", served_cloudlet(tarballs, "free", "1.0"))
        assert other.status_code == 202
    finally:
        tarballs.gate.set()
    for answer in held:
        assert service.wait_image(answer.json()["id"], "bob")["status"] == "ready"


def test_delete_removes_the_artifacts(service: Service, tarballs: TarballServer) -> None:
    image = create(service, "alice", served_cloudlet(tarballs, "gone", "1.0")).json()
    ready = service.wait_image(image["id"], "alice")
    path = Path(ready["artifacts"][0]["location"])
    assert path.exists()
    deleted = service.call("DELETE", f"/v1/images/{image['id']}", "alice")
    assert deleted.status_code == 200 and deleted.json()["status"] == "deleted"
    assert not path.exists()
    assert service.call("GET", f"/v1/images/{image['id']}", "alice").json()["status"] == \
        "deleted"
    assert service.call("DELETE", f"/v1/images/{image['id']}", "alice").status_code == 200
    assert_error(service.call("DELETE", f"/v1/images/{image['id']}", "reader"), 403)
    listed = service.call("GET", "/v1/images?name=gone", "alice").json()["images"]
    assert listed == []


# -- the rest of the API ---------------------------------------------------------------

def test_a_create_waiting_for_another_process_lock_does_not_stop_the_service(
        service: Service, tarballs: TarballServer) -> None:
    """A create claims on the event loop; another process holding the
    catalog's write lock (here this test's own connection) must not stall
    the loop: the create waits on a thread and the service goes on answering."""
    import sqlite3
    import threading

    holder = sqlite3.connect(service.config.parent / "state" / "catalog.sqlite3",
                             isolation_level=None, timeout=5)
    holder.execute("BEGIN IMMEDIATE")
    answers: list[Any] = []
    posting = threading.Thread(target=lambda: answers.append(
        create(service, "alice", served_cloudlet(tarballs, "locked-out", "1.0"))))
    try:
        posting.start()
        time.sleep(0.3)  # the create has reached the claim and waits for the lock
        began = time.monotonic()
        for _ in range(5):
            assert service.call("GET", "/v1/healthz").json() == {"status": "ok"}
        assert time.monotonic() - began < 2.0
        assert posting.is_alive() and not answers  # still waiting for the lock
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        posting.join(timeout=30)
    assert answers and answers[0].status_code == 202, answers
    assert service.wait_image(answers[0].json()["id"], "alice")["status"] == "ready"


def test_formats_targets_health_and_metrics(service: Service) -> None:
    formats = service.call("GET", "/v1/formats", "alice").json()["formats"]
    assert {f["name"] for f in formats} == {"tar", "qcow2"}
    assert "bootable" in next(f for f in formats if f["name"] == "qcow2")["capabilities"]
    targets = service.call("GET", "/v1/targets", "alice").json()["targets"]
    assert [(t["name"], t["driver"]) for t in targets] == [("local", "local"),
                                                           ("other", "local")]
    assert "delete" in targets[0]["capabilities"]
    assert "root" not in json.dumps(targets)  # no host paths
    assert_error(service.call("GET", "/v1/formats"), 401)
    assert service.call("GET", "/v1/healthz").json() == {"status": "ok"}
    assert service.call("GET", "/v1/readyz").json() == {"status": "ready"}
    metrics = service.call("GET", "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'cloudlets_http_requests_total{method="GET",route="/v1/formats",status="200"}' in text
    assert "cloudlets_render_queue_depth" in text
    assert "cloudlets_render_duration_seconds_bucket" in text
    assert "cloudlets_renders_total" in text
    assert 'cloudlets_http_request_duration_seconds_count{method="GET",route="/v1/formats"}' \
        in text
    listed = service.call("GET", "/v1/images", "ops", params={"limit": 100}).json()["images"]
    assert "warm-up" not in {image["name"] for image in listed}  # the start's claims nothing


def test_the_openapi_document_is_kept_in_docs(service: Service) -> None:
    served = service.call("GET", "/v1/openapi.json").json()
    kept = json.loads((REPO / "docs" / "openapi.json").read_text())
    assert served == kept, "regenerate: python -m cloudlets.service.openapi > docs/openapi.json"
    assert served["openapi"].startswith("3.1")


# -- stopping and starting again -----------------------------------------------------

def test_sigterm_fails_the_renders_it_cuts_off_and_a_restart_says_so(
        tmp_path: Path, tarballs: TarballServer) -> None:
    config = service_config(tarballs, workers=1, grace=0.5, per_tenant=4)
    first = start_service(tmp_path / "etc", config, tokens=TOKENS)
    tarballs.gate.clear()
    try:
        running = create(first, "alice", served_cloudlet(tarballs, "cut", "1.0", slow=True))
        queued = create(first, "alice", served_cloudlet(tarballs, "queued", "1.0", slow=True))
        deadline = time.monotonic() + 20
        while first.call("GET", f"/v1/images/{running.json()['id']}", "alice") \
                .json()["status"] != "rendering":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        renders = children(first.process.pid)
        assert len(renders) == 1
        started = time.monotonic()
        assert first.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 10
        # the render cut off was terminated with its process: it writes nothing more
        assert not any(alive(pid) for pid in renders)
    finally:
        tarballs.gate.set()
    second = start_service(tmp_path / "etc", config, tokens=TOKENS)
    try:
        for answer, when in ((running, "while"), (queued, "before")):
            image = second.call("GET", f"/v1/images/{answer.json()['id']}", "alice").json()
            assert image["status"] == "failed", image
            assert image["error"]["type"] == "ServiceStopped"
            assert when in image["error"]["message"]
        # the same request renders again, now
        again = create(second, "alice", served_cloudlet(tarballs, "cut", "1.0"))
        assert again.status_code == 202
        assert second.wait_image(again.json()["id"], "alice")["status"] == "ready"
    finally:
        assert second.stop() == 0


def children(pid: int) -> set[int]:
    """The render processes of the service ``pid``: its children that
    multiprocessing spawned (not its resource tracker)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and b"spawn_main" in command:
            found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def wait_status(service: Service, image_id: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 20
    while True:
        image: dict[str, Any] = service.call("GET", f"/v1/images/{image_id}", "alice").json()
        if image["status"] == status:
            return image
        assert time.monotonic() < deadline, image
        time.sleep(0.05)


def test_a_render_process_that_dies_fails_its_render_and_is_started_again(
        tmp_path: Path, tarballs: TarballServer) -> None:
    config = service_config(tarballs, workers=1)
    with serving(tmp_path / "etc", config, TOKENS) as running:
        processes = children(running.process.pid)
        assert len(processes) == 1  # workers = 1: one render process, started with the service
        tarballs.gate.clear()
        try:
            answer = create(running, "alice", served_cloudlet(tarballs, "lost", "1.0", slow=True))
            wait_status(running, answer.json()["id"], "rendering")
            (render,) = processes
            assert alive(render)  # it renders
            os.kill(render, signal.SIGKILL)
            image = wait_status(running, answer.json()["id"], "failed")
        finally:
            tarballs.gate.set()
        assert image["error"]["type"] == "WorkerLost", image
        assert str(render) in image["error"]["message"]
        again = create(running, "alice", served_cloudlet(tarballs, "after", "1.0"))
        assert running.wait_image(again.json()["id"], "alice")["status"] == "ready"
        assert len(children(running.process.pid) - {render}) == 1


def test_render_workers_threads_render_in_the_service_process(
        tmp_path: Path, tarballs: TarballServer) -> None:
    config = service_config(tarballs, workers=1, render_workers="threads")
    with serving(tmp_path / "etc", config, TOKENS) as running:
        answer = create(running, "alice", served_cloudlet(tarballs, "threads", "1.0"))
        assert running.wait_image(answer.json()["id"], "alice")["status"] == "ready"
        assert children(running.process.pid) == set()


def test_a_killed_service_reports_its_render_failed_after_a_restart(
        tmp_path: Path, tarballs: TarballServer) -> None:
    config = service_config(tarballs)
    first = start_service(tmp_path / "etc", config, tokens=TOKENS)
    tarballs.gate.clear()
    try:
        answer = create(first, "alice", served_cloudlet(tarballs, "killed", "1.0", slow=True))
        assert answer.status_code == 202
        orphans = children(first.process.pid)
        assert orphans
        first.stop(signal.SIGKILL)
        # its render processes do not outlive it (they would write on for nobody)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in orphans):
            assert time.monotonic() < deadline, "render processes outlived a killed service"
            time.sleep(0.1)
    finally:
        tarballs.gate.set()
    second = start_service(tmp_path / "etc", config, tokens=TOKENS)
    try:
        image = second.call("GET", f"/v1/images/{answer.json()['id']}", "alice").json()
        assert image["status"] == "failed" and image["error"]["type"] == "OwnerLost", image
    finally:
        second.stop()


def test_a_failed_render_of_invalid_input_lists_its_problems(tmp_path: Path) -> None:
    from cloudlets.catalog import ImageCatalog, RenderRequest
    from cloudlets.errors import ConfigError, Problem
    from cloudlets.service.app import image_view

    catalog = ImageCatalog(tmp_path / "catalog.sqlite3")
    request = RenderRequest(manifest_name="web", manifest_version="1", manifest_digest="d",
                            config_digest="c", format="tar", storage="local", output="o/")
    entry = catalog.claim(request).entry
    failed = catalog.fail(entry.entry_id, ConfigError(
        [Problem("/ip/interfaces/0/address", "not an address"), Problem("", "bad")]))
    view = image_view(failed, None, None, lambda text: text.replace("address", "***"))
    assert view["status"] == "failed" and view["progress"] is None
    assert view["error"]["type"] == "ConfigError"
    assert view["error"]["problems"] == [
        {"pointer": "/ip/interfaces/0/***", "message": "not an ***"},
        {"pointer": "", "message": "bad"}]


def test_a_first_create_opens_and_imports_nothing_on_the_event_loop(tmp_path: Path) -> None:
    """Every create of a first burst waits behind the first on the event loop:
    the start opens the loop's catalog connection and loads what a create
    body's parse needs, so the first create (its body with a byte-order mark)
    opens no database and imports no module."""
    script = (
        "import hashlib, json, sqlite3, sys, threading\n"
        "from pathlib import Path\n"
        "from starlette.testclient import TestClient\n"
        "from cloudlets.service.app import create_app\n"
        "from cloudlets.service.config import ServiceConfig\n"
        "config = ServiceConfig.default(Path(sys.argv[1]), hashlib.sha256(b't').hexdigest())\n"
        "manifest = {'name': 'first', 'version': '1', 'arch': 'x86_64',\n"
        "            'filesystem': {'url': 'http://127.0.0.1:9/rootfs.tar.gz',\n"
        "                           'sha256': '0' * 64},\n"
        "            'boot': {'kernel': '/boot/vmlinuz', 'cmdline': 'console=ttyS0'}}\n"
        "body = json.dumps({'manifest': manifest, 'format': 'tar', 'target': 'local'})\n"
        "with TestClient(create_app(config)) as client:\n"
        "    client.get('/v1/healthz')\n"
        "    opened, connect = [], sqlite3.connect\n"
        "    def counted(*args, **kwargs):\n"
        "        if not threading.current_thread().name.startswith('cloudlets-render'):\n"
        "            opened.append(args[0])  # a render's worker thread opens its own\n"
        "        return connect(*args, **kwargs)\n"
        "    sqlite3.connect = counted\n"
        "    before = set(sys.modules)\n"
        "    answer = client.post('/v1/images', content=b'\\xef\\xbb\\xbf' + body.encode(),\n"
        "                         headers={'Authorization': 'Bearer t'})\n"
        "    print(answer.status_code, len(opened), len(set(sys.modules) - before))\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-3:] == ["202", "0", "0"]
