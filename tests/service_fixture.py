"""``cloudlets serve`` as a real subprocess on a free loopback port, and a
loopback tarball server, for the service's tests.

:func:`start_service` writes the configuration file, starts
``[sys.executable, "-m", "cloudlets", "serve", ...]`` (so the code under
test is this checkout's) and waits, within :data:`STARTUP_TIMEOUT`, until
``/v1/healthz`` answers; :meth:`Service.stop` sends SIGTERM and waits within
:data:`STOP_TIMEOUT`, then kills.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

REPO = Path(__file__).resolve().parents[1]
#: Seconds a service gets to answer after its start.
STARTUP_TIMEOUT = 30.0
#: Seconds a service gets to stop after SIGTERM.
STOP_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    """A running ``cloudlets serve``."""

    url: str
    process: subprocess.Popen[str]
    config: Path
    log: Path
    tokens: dict[str, str] = field(default_factory=dict)

    def call(self, method: str, path: str, tenant: str | None = None, *,
             json: Any = None, data: bytes | str | None = None,
             headers: dict[str, str] | None = None, **kwargs: Any) -> requests.Response:
        """One HTTP request, with ``tenant``'s token when given."""
        sent = dict(headers or {})
        if tenant is not None:
            sent["Authorization"] = f"Bearer {self.tokens[tenant]}"
        if data is not None:
            sent.setdefault("Content-Type", "application/json")
        return requests.request(method, self.url + path, json=json, data=data,
                                headers=sent, timeout=30, **kwargs)

    def wait_image(self, image_id: str, tenant: str, timeout: float = 60.0) -> dict[str, Any]:
        """Poll an image until it is no longer in flight."""
        deadline = time.monotonic() + timeout
        while True:
            answer = self.call("GET", f"/v1/images/{image_id}", tenant)
            assert answer.status_code == 200, answer.text
            image: dict[str, Any] = answer.json()
            if image["status"] not in ("pending", "rendering"):
                return image
            if time.monotonic() > deadline:
                pytest.fail(f"image {image_id} still {image['status']} after {timeout} s")
            time.sleep(0.1)

    def output(self) -> str:
        """What the service wrote to its log so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Stop the service; :returns: its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)
                pytest.fail(f"the service did not stop on signal {sig}:\n{self.output()}")
        return int(self.process.returncode)


def service_env(tokens: dict[str, str], extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a service: the tokens as ``CLOUDLETS_TOKEN_<TENANT>``."""
    env = dict(os.environ)
    env.pop("COVERAGE_PROCESS_START", None)
    env.update({f"CLOUDLETS_TOKEN_{name.upper()}": token for name, token in tokens.items()})
    env.update(extra or {})
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def start_service(directory: Path, config: str, *, tokens: dict[str, str] | None = None,
                  env: dict[str, str] | None = None, port: int | None = None,
                  args: tuple[str, ...] = ()) -> Service:
    """Write ``config`` to ``directory/service.toml`` and serve it.

    ``{port}`` in the config is not used: the port is given with ``--listen``.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "service.toml"
    path.write_text(config)
    port = port or free_port()
    log = directory / f"service-{port}.log"
    with open(log, "a") as stream:
        process = subprocess.Popen(
            [sys.executable, "-m", "cloudlets", "serve", "--config", str(path),
             "--listen", f"127.0.0.1:{port}", *args],
            cwd=directory.parent, env=service_env(tokens or {}, env), stdout=stream,
            stderr=subprocess.STDOUT, text=True)
    service = Service(url=f"http://127.0.0.1:{port}", process=process, config=path, log=log,
                      tokens=dict(tokens or {}))
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if process.poll() is not None:
            pytest.fail(f"cloudlets serve exited with {process.returncode}:\n{service.output()}")
        try:
            if requests.get(service.url + "/v1/readyz", timeout=1).status_code == 200:
                return service
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            service.stop(signal.SIGKILL)
            pytest.fail(f"cloudlets serve did not answer in {STARTUP_TIMEOUT} s:\n"
                        f"{service.output()}")
        time.sleep(0.1)


@contextlib.contextmanager
def serving(directory: Path, config: str, tokens: dict[str, str]) -> Iterator[Service]:
    """A service for a block of tests: stopped cleanly at the end (exit code
    0), with no token, traceback nor internal error in its log."""
    running = start_service(directory, config, tokens=tokens)
    try:
        yield running
    finally:
        code = running.stop()
        log = running.output()
        assert code == 0, log
        for token in tokens.values():
            assert token not in log
        assert "Traceback" not in log and "internal error" not in log, log


class TarballServer:
    """A loopback HTTP server of files, which can hold requests.

    :ivar requests: every path asked for.
    :ivar gate: while clear, requests for paths under ``/slow/`` wait
        (at most :attr:`hold_timeout` seconds).
    """

    hold_timeout = 30.0

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requests: list[str] = []
        self.gate = threading.Event()
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self) -> None:
                server.requests.append(self.path)
                if self.path.startswith("/slow/"):
                    server.gate.wait(server.hold_timeout)
                    self.path = self.path.removeprefix("/slow")
                super().do_GET()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.host = f"127.0.0.1:{self.httpd.server_address[1]}"
        self.url = f"http://{self.host}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def tarballs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TarballServer]:
    """A loopback tarball server for a test module."""
    server = TarballServer(tmp_path_factory.mktemp("tarballs"))
    try:
        yield server
    finally:
        server.close()


def served_cloudlet(server: TarballServer, name: str = "tiny", version: str = "1.0", *,
                    slow: bool = False) -> dict[str, Any]:
    """A tiny cloudlet whose tarball ``server`` serves (held while its gate
    is clear when ``slow``)."""
    from tests.test_catalog import make_cloudlet

    manifest = make_cloudlet(server.root, name=name, version=version)
    tarball = Path(manifest["filesystem"]["url"])
    # each cloudlet its own tarball, so none is found in the service's cache
    unique = tarball.with_name(f"{name}-{version}.tar.gz")
    buffer = io.BytesIO()
    with tarfile.open(tarball) as source, tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for member in source.getmembers():
            tar.addfile(member, source.extractfile(member))
        stamp = f"{name} {version}\n".encode()
        info = tarfile.TarInfo("etc/cloudlet-id")
        info.size, info.mtime, info.mode = len(stamp), 1_700_000_000, 0o644
        tar.addfile(info, io.BytesIO(stamp))
    unique.write_bytes(buffer.getvalue())
    manifest["filesystem"]["sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    manifest["filesystem"]["url"] = f"{server.url}/{'slow/' if slow else ''}{unique.name}"
    return manifest
