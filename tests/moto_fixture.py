"""A real ``moto_server`` (S3 API) on 127.0.0.1, started and stopped by a test.

The server runs in its own process at a free port; the fixture waits (within
:data:`STARTUP_TIMEOUT`) until it answers HTTP, and stops it afterwards.
Credentials are moto's dummies; :func:`make_bucket` creates a bucket with
boto3 (the reference client, independent of the code under test).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = ["MotoServer", "moto_server", "running_moto", "ACCESS_KEY", "SECRET_KEY", "REGION"]

ACCESS_KEY = "AKIACLOUDLETSTEST000"
SECRET_KEY = "cloudlets-moto-secret-key-not-real"
REGION = "us-east-1"
#: Seconds to wait for moto_server to answer or to stop.
STARTUP_TIMEOUT = 30.0


@dataclass
class MotoServer:
    """A running moto_server."""

    endpoint: str
    process: subprocess.Popen[bytes]

    def client(self) -> Any:
        """:returns: a boto3 S3 client for this server."""
        boto3 = pytest.importorskip("boto3")
        return boto3.client("s3", endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def make_bucket(self, name: str) -> str:
        """Create a bucket (if missing). :returns: its name."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def start_moto(workdir: Path) -> MotoServer:
    """Start moto_server on a free loopback port.

    :raises RuntimeError: when it does not answer in time.
    """
    pytest.importorskip("moto.server", reason="pip install 'moto[server]'")
    log = workdir / "moto.log"
    last = ""
    for _ in range(3):  # the port may be taken between probe and bind
        port = _free_port()
        env = dict(os.environ, AWS_ACCESS_KEY_ID=ACCESS_KEY,
                   AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION=REGION)
        with open(log, "wb") as handle:
            process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, env=env)
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            if _answers(endpoint):
                return MotoServer(endpoint=endpoint, process=process)
            time.sleep(0.1)
        stop_moto(process)
        last = log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"moto_server did not start: {last}")


def stop_moto(process: subprocess.Popen[bytes]) -> None:
    """Stop moto_server, killing it if it lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextmanager
def running_moto(workdir: Path) -> Iterator[MotoServer]:
    """moto_server (log in ``workdir``) for the ``with`` block, stopped
    afterwards (for scripts such as ``benchmarks/bench_upload.py`` as well as
    the fixture). Outside pytest, a missing moto raises pytest's ``Skipped``:
    check for ``moto.server`` first."""
    server = start_moto(workdir)
    try:
        yield server
    finally:
        stop_moto(server.process)


@pytest.fixture(scope="module")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """moto_server on 127.0.0.1 for a test module, stopped afterwards."""
    with running_moto(tmp_path_factory.mktemp("moto")) as server:
        yield server
