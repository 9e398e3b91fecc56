"""The service configuration file, ``cloudlets serve`` without one, and
without the ``cloudlets[service]`` extra."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from cloudlets.errors import ConfigurationError
from cloudlets.service.auth import Authenticator, ensure_admin_token, token_digest
from cloudlets.service.config import ServiceConfig, ServiceConfigError
from cloudlets.service.jobs import url_policy
from tests.service_fixture import REPO, free_port, service_env, start_service

SECRET = "s3cr3t-value-never-shown-anywhere"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "conf" / "service.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_issue_example_loads_and_relative_paths_follow_the_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLOUDLETS_TOKEN_DEMO", "demo-token-0123456789")
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, """
[service]
listen = "127.0.0.1:8750"
data_dir = "state"
workers = 2
[targets.local]
driver = "local"
root = "images"
[tenants.demo]
token_env = "CLOUDLETS_TOKEN_DEMO"
[fetch]
allow_hosts = ["127.0.0.1:8080"]
""")
    config = ServiceConfig.load(path)
    assert config.listen == ("127.0.0.1", 8750)
    assert config.data_dir == path.parent / "state"
    assert config.targets["local"].driver.root == path.parent / "images"  # type: ignore[attr-defined]
    assert config.workers == 2 and config.fetch.allow_hosts == ("127.0.0.1:8080",)
    tenant = config.tenants["demo"]
    assert tenant.token_sha256 == token_digest("demo-token-0123456789")
    assert "demo-token" not in repr(tenant)
    auth = Authenticator(config.tenants)
    assert auth.tenant("Bearer demo-token-0123456789") is tenant
    assert auth.tenant("bearer demo-token-0123456789") is tenant
    assert auth.tenant("Bearer demo-token-012345678") is None
    assert auth.tenant(None) is None
    assert ServiceConfig.load(path, listen="[::1]:9000").listen == ("::1", 9000)
    assert "demo-token-0123456789" in config.secrets


def test_a_bad_file_is_refused_with_the_key_path_of_each_problem(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHORT_TOKEN", SECRET[:6])
    monkeypatch.setenv("GOOD_TOKEN", SECRET)
    path = write(tmp_path, """
[service]
workers = 0
render_workers = "fibers"
listen = "nowhere"
formats = ["tar", "floppy"]
[limits]
max_body_bytes = "big"
[targets.local]
driver = "local"
[targets.s3]
driver = "s3"
[targets.Bad]
driver = "ftp"
[tenants.a]
token_env = "SHORT_TOKEN"
[tenants.b]
token_env = "UNSET_TOKEN_VARIABLE"
token_file = "token.txt"
[tenants.c]
token_env = "GOOD_TOKEN"
operations = ["create", "fly"]
targets = ["nowhere"]
[presets]
config = {hostname = 7}
[fetch]
allow_hosts = ["bad host!"]
schemes = ["gopher"]
[colours]
""")
    with pytest.raises(ServiceConfigError) as refused:
        ServiceConfig.load(path)
    paths = {p for p, _ in refused.value.problems}
    assert {"service.workers", "service.render_workers", "service.listen", "service.formats",
            "limits.max_body_bytes",
            "targets.local.root", "targets.s3.prefix", "targets.Bad", "tenants.a.token_env",
            "tenants.b", "tenants.c.operations", "tenants.c.targets", "presets.config.hostname",
            "fetch.allow_hosts", "fetch.schemes", "colours"} <= paths, paths
    message = str(refused.value)
    assert str(path) in message and SECRET not in message and SECRET[:6] not in message


def test_unreadable_and_invalid_toml_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ServiceConfigError, match="cannot read"):
        ServiceConfig.load(tmp_path / "missing.toml")
    with pytest.raises(ServiceConfigError, match="not valid TOML"):
        ServiceConfig.load(write(tmp_path, "[service\n"))


def test_secrets_from_files_and_the_url_policy(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "token").write_text(SECRET + "\n")
    path = write(tmp_path, """
[targets.local]
driver = "local"
root = "/srv/images"
[tenants.ops]
token_file = "token"
admin = true
[[mirrors]]
prefix = "http://origin.example/"
mirrors = ["http://mirror.internal:8080/"]
[fetch]
allow_hosts = ["127.0.0.1:8080"]
only_hosts = ["127.0.0.1"]
""")
    config = ServiceConfig.load(path)
    assert config.tenants["ops"].admin and config.tenants["ops"].token_sha256 == \
        token_digest(SECRET)
    policy = url_policy(config.fetch, config.mirrors)
    assert policy.problem("http://127.0.0.1:8080/t.tar.gz") is None
    assert policy.problem("http://mirror.internal:8080/t.tar.gz") is None  # mirrors allowed
    assert policy.problem("http://169.254.169.254/latest/meta-data") is not None
    assert policy.problem("file:///etc/passwd") is not None


def test_serve_refuses_a_bad_config_with_exit_code_5(tmp_path: Path) -> None:
    path = write(tmp_path, "[service]\nworkers = 0\n[tenants.a]\ntoken_env = \"NOPE_NOT_SET\"\n")
    proc = subprocess.run([sys.executable, "-m", "cloudlets", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, env=service_env({}),
                          cwd=tmp_path)
    assert proc.returncode == 5, proc.stderr
    assert "service.workers" in proc.stderr and "targets" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_serve_without_the_extra_names_it(tmp_path: Path) -> None:
    code = ("import sys\n"
            "sys.modules['starlette'] = None\n"
            "from cloudlets.cli import main\n"
            "sys.exit(main(['serve']))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=service_env({}, {"CLOUDLETS_HOME": str(tmp_path)}),
                          cwd=REPO)
    assert proc.returncode == 5, proc.stderr
    assert "ConfigurationError" in proc.stderr
    assert "pip install cloudlets[service]" in proc.stderr


def test_serve_without_a_config_writes_an_owner_only_admin_token(tmp_path: Path) -> None:
    pytest.importorskip("starlette")
    data_dir = tmp_path / "data"
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as stream:
        process = subprocess.Popen(
            [sys.executable, "-m", "cloudlets", "serve", "--data-dir", str(data_dir),
             "--listen", f"127.0.0.1:{port}"], stdout=stream, stderr=subprocess.STDOUT,
            env=service_env({}), cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if requests.get(url + "/v1/readyz", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert process.poll() is None, log.read_text()
            time.sleep(0.1)
        token_file = data_dir / "admin-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        output = log.read_text()
        assert str(token_file) in output and token not in output
        answer = requests.get(url + "/v1/targets", timeout=10,
                              headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200
        assert [t["name"] for t in answer.json()["targets"]] == ["local"]
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert process.returncode == 0, log.read_text()
    # the same token is used again
    assert ensure_admin_token(token_file) == token_digest(token)
    os.chmod(token_file, 0o644)
    with pytest.raises(ConfigurationError, match="readable by others"):
        ensure_admin_token(token_file)


def test_start_service_helper_is_bounded(tmp_path: Path) -> None:
    """The fixture fails (not hangs) when the service exits at once."""
    with pytest.raises(pytest.fail.Exception, match="exited with 5"):
        start_service(tmp_path / "etc", "[service]\nworkers = 0\n")


def test_the_in_process_pool_accounts_for_every_task_when_it_stops() -> None:
    from cloudlets.service.jobs import InProcessPool, QueueFull, RenderTask

    release = threading.Event()
    ran: list[str] = []

    def run(task: RenderTask) -> None:
        ran.append(task.entry_id)
        release.wait(5)

    pool = InProcessPool(workers=2, queue_length=3)
    pool.start(run)
    tasks = [RenderTask(f"cat-{n}", "t", {}) for n in range(5)]
    for task in tasks[:2]:
        pool.submit(task)
    deadline = time.monotonic() + 5
    while len(ran) < 2:  # both workers busy
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for task in tasks[2:]:
        pool.submit(task)
    with pytest.raises(QueueFull):
        pool.submit(RenderTask("cat-over", "t", {}))
    assert pool.running() == 2 and pool.queued() == 3
    report = pool.stop(grace=0.2)
    release.set()
    running = {t.entry_id for t in report.still_running}
    never = {t.entry_id for t in report.never_started}
    assert running == set(ran) and len(never) == 3
    assert running | never == {t.entry_id for t in tasks}
    with pytest.raises(QueueFull, match="stopping"):
        pool.submit(tasks[0])


QUEUE_BASE = """
[targets.local]
driver = "local"
root = "images"
[tenants.admin]
token_sha256 = "%s"
""" % ("0" * 64)


def test_the_queue_section_is_checked(tmp_path: Path) -> None:
    config = ServiceConfig.load(write(tmp_path, QUEUE_BASE))
    assert config.queue.backend == "embedded"
    assert config.render_workers == "processes"  # the embedded pool's default
    config = ServiceConfig.load(write(tmp_path, QUEUE_BASE + """
[queue]
backend = "celery"
broker_url = "redis://127.0.0.1:6379/2"
visibility_timeout = 600
"""))
    assert (config.queue.backend, config.queue.broker_url, config.queue.result_backend,
            config.queue.visibility_timeout) == ("celery", "redis://127.0.0.1:6379/2",
                                                 "redis://127.0.0.1:6379/2", 600.0)
    with pytest.raises(ServiceConfigError) as caught:
        ServiceConfig.load(write(tmp_path, QUEUE_BASE + """
[queue]
backend = "rabbit"
broker_url = "amqp://x"
max_attempts = 0
colour = 1
"""))
    paths = [path for path, _ in caught.value.problems]
    assert paths == ["queue.colour", "queue.backend", "queue.broker_url", "queue.max_attempts"]
    with pytest.raises(ServiceConfigError, match="needs the Redis broker"):
        ServiceConfig.load(write(tmp_path, QUEUE_BASE + '[queue]\nbackend = "celery"\n'))


def test_the_cache_bounds_reach_the_renderer(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudlets.cachelocks import DEFAULT_BASE_CACHE_MAX_BYTES
    from cloudlets.service.jobs import renderer_for

    monkeypatch.setenv("CLOUDLETS_TOKEN_DEMO", SECRET)
    base = "[service]\ndata_dir = \"state\"\n[targets.local]\ndriver = \"local\"\n" \
           "root = \"images\"\n[tenants.demo]\ntoken_env = \"CLOUDLETS_TOKEN_DEMO\"\n"
    config = ServiceConfig.load(write(tmp_path, base))
    assert (config.cache_max_bytes, config.base_cache_max_bytes) == \
        (None, DEFAULT_BASE_CACHE_MAX_BYTES)
    config = ServiceConfig.load(write(tmp_path, base.replace(
        "[targets", "cache_max_bytes = 1000\nbase_cache_max_bytes = 0\n[targets", 1)))
    renderer = renderer_for(config, config.fetch)
    assert (renderer.cache_max_bytes, renderer.base_cache_max_bytes) == (1000, 0)
    with pytest.raises(ServiceConfigError) as refused:
        ServiceConfig.load(write(tmp_path, base.replace(
            "[targets", "base_cache_max_bytes = -1\n[targets", 1)))
    assert {p for p, _ in refused.value.problems} == {"service.base_cache_max_bytes"}
