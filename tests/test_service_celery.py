"""The service in Celery mode with the real parts: Debian's ``redis-server``
on a free loopback port (no persistence, its files in the test's
directory), two ``cloudlets worker`` processes and a ``cloudlets serve``
enqueueing to them, a loopback tarball server the configuration allows."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.celery_fixture import REDIS_SERVER, RedisServer, Worker, start_worker
from tests.service_fixture import (
    REPO,
    STOP_TIMEOUT,
    Service,
    TarballServer,
    served_cloudlet,
    service_env,
    start_service,
    tarballs,
)

pytest.importorskip("starlette", reason="pip install cloudlets[service]")
pytest.importorskip("celery", reason="pip install cloudlets[celery]")
pytest.importorskip("redis", reason="pip install cloudlets[celery]")
if not os.access(REDIS_SERVER, os.X_OK):
    pytest.skip("needs Debian's redis-server (scripts/dev installs it)", allow_module_level=True)

__all__ = ["tarballs"]  # the fixture, imported for this module

TOKENS = {"alice": "alice-token-0123456789abcdef"}
#: Seconds a render gets to become ready (a redelivery included).
RENDER_TIMEOUT = 60.0
#: The Redis visibility timeout of the tests: a killed worker's render is
#: handed to the other worker within about this time.
VISIBILITY = 3


def celery_config(server: TarballServer, broker: str) -> str:
    return f"""
[service]
data_dir = "state"
workers = 2
shutdown_grace = 2.0
formats = ["tar"]
[limits]
renders_per_tenant = 16
[queue]
backend = "celery"
broker_url = "{broker}"
visibility_timeout = {VISIBILITY}
max_attempts = 3
poll_interval = 0.05
[targets.local]
driver = "local"
root = "images"
[formats.tar]
[presets]
config = {{hostname = "provider-host"}}
locked = ["hostname"]
[tenants.alice]
token_env = "CLOUDLETS_TOKEN_ALICE"
[fetch]
allow_hosts = ["{server.host}"]
only_hosts = ["127.0.0.1"]
"""


@dataclasses.dataclass
class Cluster:
    redis: RedisServer
    service: Service
    workers: list[Worker]
    config: Path
    root: Path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory,
            tarballs: TarballServer) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("celery")
    server = RedisServer(base / "redis")
    server.start()
    workers: list[Worker] = []
    service: Service | None = None
    try:
        etc = base / "etc"
        etc.mkdir()
        config = etc / "service.toml"
        config.write_text(celery_config(tarballs, server.url))
        workers = [start_worker(config, number, TOKENS) for number in (1, 2)]
        service = start_service(etc, config.read_text(), tokens=TOKENS)
        yield Cluster(server, service, workers, config, etc)
    finally:
        if service is not None:
            service.stop(signal.SIGKILL if service.process.poll() is None else 0)
        for worker in workers:
            worker.stop(signal.SIGKILL)
        server.stop()


def create(service: Service, manifest: dict[str, Any]) -> requests.Response:
    return service.call("POST", "/v1/images", "alice",
                        json={"manifest": manifest, "format": "tar", "target": "local"})


def direct_sha256(cluster: Cluster, manifest: dict[str, Any], tmp: Path) -> str:
    """The sha256 of the same request rendered by a Renderer in this
    process, with the service's presets and URL policy and its own cache."""
    from cloudlets.drivers.storage.local import LocalStorage
    from cloudlets.service.config import ServiceConfig
    from cloudlets.service.jobs import renderer_for

    config = ServiceConfig.load(cluster.config)
    config = dataclasses.replace(config, cache_dir=tmp / "cache", data_dir=tmp / "data")
    renderer = renderer_for(config, config.fetch)
    result = renderer.render(manifest, "direct/", LocalStorage(root=str(tmp / "images")),
                             "tar")
    return result.primary.sha256


def partials(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.partial")]


def task_meta(cluster: Cluster, entry_id: str) -> dict[str, Any]:
    raw = cluster.redis.client().get(f"celery-task-meta-{entry_id}")
    return json.loads(raw) if raw else {}


# -- the tests ------------------------------------------------------------------

def test_eight_concurrent_creates_render_on_the_workers(
        cluster: Cluster, tarballs: TarballServer, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUDLETS_TOKEN_ALICE", TOKENS["alice"])  # to read the config here
    tarballs.gate.set()
    manifests = [served_cloudlet(tarballs, f"app{n}", "1.0") for n in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda m: create(cluster.service, m), manifests))
    assert [a.status_code for a in answers] == [202] * 8, [a.text for a in answers]
    images = [cluster.service.wait_image(a.json()["id"], "alice", RENDER_TIMEOUT)
              for a in answers]
    assert [i["status"] for i in images] == ["ready"] * 8, images
    hosts = {task_meta(cluster, i["id"]).get("result", {}).get("ok") for i in images}
    assert hosts == {True}
    for manifest, image in zip(manifests, images, strict=True):
        artifact = image["artifacts"][0]
        stored = cluster.root / "images" / artifact["location"]
        path = stored if stored.exists() else Path(artifact["location"])
        assert hashlib.sha256(path.read_bytes()).hexdigest() == artifact["sha256"]
        assert artifact["sha256"] == direct_sha256(cluster, manifest, tmp_path / image["id"])
    # the same request again: the ready image, not a new render
    again = create(cluster.service, manifests[0])
    assert again.status_code == 200 and again.json()["id"] == images[0]["id"]
    # the service did not render: its workers did (their logs name the tasks)
    logs = "".join(w.output() for w in cluster.workers)
    assert all(i["id"] in logs for i in images), logs[-3000:]
    assert partials(cluster.root) == []


def test_a_worker_host_downloads_a_cloudlet_once(cluster: Cluster,
                                                 tarballs: TarballServer) -> None:
    tarballs.gate.set()
    manifest = served_cloudlet(tarballs, "repeated", "1.0")
    path = "/" + manifest["filesystem"]["url"].rsplit("/", 1)[1]
    for motd in ("one", "two", "three"):  # three renders, both workers may take them
        answer = cluster.service.call("POST", "/v1/images", "alice", json={
            "manifest": manifest, "format": "tar", "target": "local",
            "config": {"args": {"motd": motd}}})
        assert answer.status_code == 202, answer.text
        image = cluster.service.wait_image(answer.json()["id"], "alice", RENDER_TIMEOUT)
        assert image["status"] == "ready", image
    assert tarballs.requests.count(path) == 1, tarballs.requests


def test_a_worker_killed_mid_render_leaves_the_job_to_the_other(
        cluster: Cluster, tarballs: TarballServer) -> None:
    # the tarball is held: the render stays in its fetch
    entry_id, victim = held_render_and_its_worker(cluster, tarballs, "held")
    victim.process.kill()
    victim.process.wait(timeout=STOP_TIMEOUT)
    image = cluster.service.call("GET", f"/v1/images/{entry_id}", "alice").json()
    assert image["status"] in ("pending", "rendering"), image  # not failed: it is redelivered
    tarballs.gate.set()
    image = cluster.service.wait_image(entry_id, "alice", RENDER_TIMEOUT)
    assert image["status"] == "ready", image
    assert task_meta(cluster, entry_id)["status"] == "SUCCESS"
    attempts = cluster.redis.client().get(f"cloudlets-attempts-{entry_id}")
    assert int(attempts) == 2
    other = next(w for w in cluster.workers if w is not victim)
    assert entry_id in other.output()
    assert partials(cluster.root) == []
    cluster.workers[cluster.workers.index(victim)] = start_worker(cluster.config, 3, TOKENS)


def held_render_and_its_worker(cluster: Cluster, tarballs: TarballServer,
                               name: str) -> tuple[str, Worker]:
    """Create a render held in its fetch; :returns: its id and its worker."""
    tarballs.gate.clear()
    answer = create(cluster.service, served_cloudlet(tarballs, name, "1.0", slow=True))
    assert answer.status_code == 202, answer.text
    entry_id = str(answer.json()["id"])
    deadline = time.monotonic() + 20
    while True:  # which worker took it: its progress names it
        meta = task_meta(cluster, entry_id)
        worker = (meta.get("result") or {}).get("worker") if meta.get("status") == "PROGRESS" \
            else None
        if worker:
            break
        assert time.monotonic() < deadline, f"no worker reported the render: {meta}"
        time.sleep(0.05)
    pid = int(re.match(r"cloudlets-(\d+)@", worker).group(1))  # type: ignore[union-attr]
    return entry_id, next(w for w in cluster.workers if w.process.pid == pid)


def test_a_render_whose_workers_keep_dying_fails_with_the_reason(
        cluster: Cluster, tarballs: TarballServer) -> None:
    entry_id, victim = held_render_and_its_worker(cluster, tarballs, "doomed")
    # as if two workers had died with it already: this is the third loss
    cluster.redis.client().set(f"cloudlets-attempts-{entry_id}", 3)
    victim.process.kill()
    victim.process.wait(timeout=STOP_TIMEOUT)
    cluster.workers[cluster.workers.index(victim)] = start_worker(cluster.config, 4, TOKENS)
    image = cluster.service.wait_image(entry_id, "alice", RENDER_TIMEOUT)
    assert image["status"] == "failed", image
    assert image["error"]["type"] == "WorkerLost", image
    assert "started 3 times and its worker was lost each time" in image["error"]["message"]
    tarballs.gate.set()


def test_redis_away_fails_readyz_and_creates_then_recovers(
        cluster: Cluster, tarballs: TarballServer) -> None:
    service = cluster.service
    assert service.call("GET", "/v1/readyz").status_code == 200
    cluster.redis.stop()
    ready = service.call("GET", "/v1/readyz")
    assert ready.status_code == 503, ready.text
    assert ready.json()["error"] and "Redis" in ready.json()["message"]
    tarballs.gate.set()
    manifest = served_cloudlet(tarballs, "during-outage", "1.0")
    refused = create(service, manifest)
    assert refused.status_code == 503, refused.text
    body = refused.json()
    assert set(body) == {"error", "message", "problems"} and "Traceback" not in refused.text
    cluster.redis.start()
    deadline = time.monotonic() + 20
    while service.call("GET", "/v1/readyz").status_code != 200:
        assert time.monotonic() < deadline, "readyz did not recover"
        time.sleep(0.1)
    answer = create(service, manifest)
    assert answer.status_code == 202, answer.text
    image = service.wait_image(answer.json()["id"], "alice", RENDER_TIMEOUT)
    assert image["status"] == "ready", image


def queue_and_stop(cluster: Cluster, tarballs: TarballServer, name: str) -> str:
    """Create a render held in its fetch, then stop the service (SIGTERM).

    :returns: the render's entry id."""
    tarballs.gate.clear()
    answer = create(cluster.service, served_cloudlet(tarballs, name, "1.0", slow=True))
    assert answer.status_code == 202, answer.text
    assert cluster.service.stop() == 0
    return str(answer.json()["id"])


def test_a_restarted_service_follows_the_renders_it_queued(
        cluster: Cluster, tarballs: TarballServer) -> None:
    entry_id = queue_and_stop(cluster, tarballs, "across-restart")
    tarballs.gate.set()  # the worker renders while no service runs
    deadline = time.monotonic() + RENDER_TIMEOUT
    while task_meta(cluster, entry_id).get("status") != "SUCCESS":
        assert time.monotonic() < deadline, task_meta(cluster, entry_id)
        time.sleep(0.1)
    cluster.service = start_service(cluster.root, cluster.config.read_text(), tokens=TOKENS)
    image = cluster.service.wait_image(entry_id, "alice", RENDER_TIMEOUT)
    assert image["status"] == "ready", image
    assert image["artifacts"] and image["artifacts"][0]["sha256"]
    assert f"following render {entry_id}" in cluster.service.output()


def test_a_render_the_queue_lost_is_reported_failed_after_a_restart(
        cluster: Cluster, tarballs: TarballServer) -> None:
    entry_id = queue_and_stop(cluster, tarballs, "lost-with-redis")
    # Once the worker waits in the held fetch it writes nothing more to Redis
    # until the gate opens: lose the task's record only then, or a worker that
    # had not yet started the task would write it back.
    deadline = time.monotonic() + RENDER_TIMEOUT
    while "/slow/lost-with-redis-1.0.tar.gz" not in tarballs.requests:
        assert time.monotonic() < deadline, tarballs.requests
        time.sleep(0.05)
    cluster.redis.client().delete(f"celery-task-meta-{entry_id}")  # Redis lost its data
    cluster.service = start_service(cluster.root, cluster.config.read_text(), tokens=TOKENS)
    image = cluster.service.call("GET", f"/v1/images/{entry_id}", "alice").json()
    assert image["status"] == "failed", image
    assert image["error"]["type"] == "OwnerLost", image
    tarballs.gate.set()


def test_the_logs_hold_no_traceback_nor_token(cluster: Cluster) -> None:
    for log in (cluster.service.output(), *(w.output() for w in cluster.workers)):
        assert "Traceback" not in log and TOKENS["alice"] not in log, log[-3000:]


def test_celery_mode_without_the_extra_names_it(tmp_path: Path,
                                                tarballs: TarballServer) -> None:
    config = tmp_path / "service.toml"
    config.write_text(celery_config(tarballs, "redis://127.0.0.1:1/0"))
    code = ("import sys; sys.modules['celery'] = None; "
            "from cloudlets.cli import main; sys.exit(main(['serve', '--config', "
            f"{str(config)!r}]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=service_env(TOKENS),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 5, done.stdout + done.stderr
    assert "pip install cloudlets[celery]" in done.stdout + done.stderr


def test_a_signed_render_on_a_worker_keeps_its_signer_and_provenance(
        tmp_path: Path, tarballs: TarballServer) -> None:
    """The service checks the signature before it queues the render; the
    worker signs the provenance where the artifacts are."""
    import shutil

    from cloudlets.signing.provenance import load_verify_key, verify_envelope
    from tests.test_service_signing import fingerprint, make_key, public, publish

    tarballs.gate.set()
    keys = {name: make_key(tmp_path, name) for name in ("publisher", "provider")}
    server = RedisServer(tmp_path / "redis")
    server.start()
    worker: Worker | None = None
    service: Service | None = None
    try:
        etc = tmp_path / "etc"
        etc.mkdir()
        (etc / "allowed_signers").write_text(
            f"publisher@example.com {public(keys['publisher'])}\n")
        shutil.copy(keys["provider"], etc / "provenance.key")
        config = etc / "service.toml"
        config.write_text(celery_config(tarballs, server.url).replace(
            "[tenants.alice]", '[signing]\nallowed_signers = "allowed_signers"\n'
            'provenance_key = "provenance.key"\n[tenants.alice]'))
        worker = start_worker(config, 1, TOKENS)
        service = start_service(etc, config.read_text(), tokens=TOKENS)
        url, _ = publish(tarballs, "signed-on-worker", keys["publisher"])
        answer = service.call("POST", "/v1/images", "alice",
                              json={"manifest_url": url, "format": "tar", "target": "local"})
        assert answer.status_code == 202, answer.text
        image = service.wait_image(answer.json()["id"], "alice")
        assert image["status"] == "ready", image
        assert image["signer"] == {"principal": "publisher@example.com",
                                   "fingerprint": fingerprint(keys["publisher"])}
        got = service.call("GET", f"/v1/images/{image['id']}/provenance", "alice")
        assert got.status_code == 200, got.text
        statement = verify_envelope(got.content,
                                    load_verify_key(Path(f"{keys['provider']}.pub")))
        assert image["artifacts"][0]["sha256"] in {
            s["digest"]["sha256"] for s in statement["subject"]}
    finally:
        if service is not None:
            service.stop(signal.SIGKILL if service.process.poll() is None else 0)
        if worker is not None:
            worker.stop(signal.SIGKILL)
        server.stop()
