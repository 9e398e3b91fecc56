"""A real nginx with WebDAV on 127.0.0.1, configured, run and stopped by a test.

Everything nginx touches (configuration, document root, temporary body
files, pid file, logs) lives under one directory. Locations:

- ``/dav/``: open WebDAV (PUT, DELETE, MKCOL, COPY, MOVE);
- ``/basic/``: the same behind basic authentication (``alice``/``s3cr3t``);
- ``/bearer/``: behind ``Authorization: Bearer token-123``;
- ``/apikey/``: behind ``X-Api-Key: key-456``;
- ``/nomove/``: PUT and DELETE only (no MOVE: a plain upload server).
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["Nginx", "nginx_server", "running_nginx", "BASIC_USER", "BASIC_PASSWORD",
           "BEARER_TOKEN", "API_KEY"]

BASIC_USER = "alice"
BASIC_PASSWORD = "s3cr3t"
BEARER_TOKEN = "token-123"
API_KEY = "key-456"

#: Seconds to wait for nginx to answer or to stop.
STARTUP_TIMEOUT = 10.0

_DAV = """
            dav_methods {methods};
            create_full_put_path on;
            dav_access user:rw group:r all:r;
"""

_CONF = """
{user}
daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/logs/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {prefix}/logs/access.log;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    client_max_body_size 0;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        server_name localhost;
        root {prefix}/www;
        location /dav/ {{ {dav} }}
        location /basic/ {{
            auth_basic "cloudlets";
            auth_basic_user_file {prefix}/htpasswd;
            {dav}
        }}
        location /bearer/ {{
            if ($http_authorization != "Bearer {token}") {{ return 401; }}
            {dav}
        }}
        location /apikey/ {{
            if ($http_x_api_key != "{apikey}") {{ return 401; }}
            {dav}
        }}
        location /nomove/ {{ {dav_nomove} }}
    }}
}}
"""


@dataclass
class Nginx:
    """A running nginx: its base URL and document root."""

    base: str
    root: Path
    prefix: Path
    process: subprocess.Popen[bytes]

    def url(self, path: str) -> str:
        """:returns: the URL of ``path`` (starting with ``/``)."""
        return f"{self.base}{path}"

    def error_log(self) -> str:
        """:returns: nginx's error log so far."""
        log = self.prefix / "logs" / "error.log"
        return log.read_text() if log.exists() else ""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _user_directive() -> str:
    # As root, nginx's workers switch to "nobody" unless told otherwise and
    # could not write the test's directory: keep them as the current user.
    if os.geteuid() != 0:
        return ""
    user = pwd.getpwuid(os.geteuid()).pw_name
    group = grp.getgrgid(os.getegid()).gr_name
    return f"user {user} {group};"


def start_nginx(prefix: Path) -> Nginx:
    """Write a configuration under ``prefix`` and start nginx on a free port.

    :raises RuntimeError: when nginx does not answer in time.
    """
    binary = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if binary is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    for sub in ("www", "logs", "tmp", "tmp/body"):
        (prefix / sub).mkdir(parents=True, exist_ok=True)
    (prefix / "htpasswd").write_text(f"{BASIC_USER}:{{PLAIN}}{BASIC_PASSWORD}\n")
    last_error = ""
    for _ in range(3):  # another process may take the port between probe and bind
        port = _free_port()
        conf = _CONF.format(user=_user_directive(), prefix=prefix, port=port,
                            token=BEARER_TOKEN, apikey=API_KEY,
                            dav=_DAV.format(methods="PUT DELETE MKCOL COPY MOVE"),
                            dav_nomove=_DAV.format(methods="PUT DELETE"))
        conf_path = prefix / "nginx.conf"
        conf_path.write_text(conf)
        process = subprocess.Popen(
            [binary, "-p", str(prefix), "-c", str(conf_path), "-e",
             str(prefix / "logs" / "error.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline and process.poll() is None:
            if _answers(port):
                return Nginx(base=f"http://127.0.0.1:{port}", root=prefix / "www",
                             prefix=prefix, process=process)
            time.sleep(0.05)
        stop_nginx(process)
        assert process.stderr is not None
        last_error = process.stderr.read().decode(errors="replace")
        log = prefix / "logs" / "error.log"
        if log.exists():
            last_error += log.read_text()
    raise RuntimeError(f"nginx did not start: {last_error[-2000:]}")


def stop_nginx(process: subprocess.Popen[bytes]) -> None:
    """Stop nginx quickly (SIGTERM), killing it if it lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STARTUP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=STARTUP_TIMEOUT)
    if process.stderr is not None and not process.stderr.closed:
        process.stderr.close()


@contextmanager
def running_nginx(prefix: Path) -> Iterator[Nginx]:
    """nginx under ``prefix`` for the ``with`` block, stopped afterwards (for
    scripts such as ``benchmarks/bench_upload.py`` as well as the fixture).
    Outside pytest, a missing nginx raises pytest's ``Skipped``: check for
    the binary first."""
    server = start_nginx(prefix)
    try:
        yield server
    finally:
        stop_nginx(server.process)


@pytest.fixture(scope="module")
def nginx_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nginx]:
    """A WebDAV nginx on 127.0.0.1 for a test module, stopped afterwards."""
    with running_nginx(tmp_path_factory.mktemp("nginx")) as server:
        yield server
