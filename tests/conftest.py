"""Shared fixtures. Stage-specific fixtures live in their own modules."""

from __future__ import annotations

import errno
import http.server
import ipaddress
import json
import os
import shutil
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

REFERENCE = Path(__file__).resolve().parents[1].parent / "shared" / "reference"

#: The session's temporary directory (``$TMPDIR`` for the tests and every
#: process they start) and the cache directory inside it.
_SESSION_TMP: Path | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Point ``$TMPDIR`` (and ``$CLOUDLETS_CACHE_DIR``) at fresh directories
    for the session, so :func:`pytest_sessionfinish` can see what the library
    left behind in the temporary directory. pytest's own ``tmp_path``
    directories (``pytest-of-USER``) live there too and are not counted."""
    global _SESSION_TMP
    if _SESSION_TMP is not None or hasattr(config, "workerinput"):
        return
    _SESSION_TMP = Path(tempfile.mkdtemp(prefix="cloudlets-tests-"))
    session_tmp = _SESSION_TMP / "tmp"
    session_tmp.mkdir()
    # Like /tmp: the rootless tests' unprivileged user makes its files here too.
    _SESSION_TMP.chmod(0o755)
    session_tmp.chmod(0o1777)
    os.environ["TMPDIR"] = str(session_tmp)
    os.environ.setdefault("CLOUDLETS_CACHE_DIR", str(_SESSION_TMP / "cache"))
    tempfile.tempdir = None  # gettempdir() reads $TMPDIR again


def _left_in_tmp() -> list[str]:
    if _SESSION_TMP is None:
        return []
    return sorted(entry.name for entry in (_SESSION_TMP / "tmp").iterdir()
                  if not entry.name.startswith("pytest-of-"))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run when anything (a ``cloudlets-render-*`` work directory,
    a lock file...) is left in the session's temporary directory."""
    left = _left_in_tmp()
    if left:
        shown = ", ".join(left[:10]) + (f" and {len(left) - 10} more" if len(left) > 10 else "")
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = f"the tests left {len(left)} entries in the temporary directory: {shown}"
        if reporter is not None:
            reporter.write_line(f"ERROR: {message}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SESSION_TMP is not None and not hasattr(config, "workerinput"):
        shutil.rmtree(_SESSION_TMP, ignore_errors=True)


@pytest.fixture(autouse=True)
def _private_data_dir(tmp_path_factory: pytest.TempPathFactory,
                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Renders through the CLI record into a catalog: every test gets its own
    data directory (tests that want a particular one set CLOUDLETS_HOME
    themselves), so none writes to the user's."""
    monkeypatch.setenv("CLOUDLETS_HOME", str(tmp_path_factory.mktemp("cloudlets-home")))


def _off_loopback(address: Any) -> str | None:
    """:returns: the host of an internet ``address`` that is not loopback."""
    if not isinstance(address, tuple) or not address:
        return None  # AF_UNIX and friends
    host = str(address[0]).split("%", 1)[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host  # a name: connect() would resolve it
    mapped = getattr(ip, "ipv4_mapped", None)
    return None if (mapped or ip).is_loopback else host


@pytest.fixture(autouse=True)
def _no_packet_off_loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """No test sends a packet off loopback: a connection to any other address
    (a patched resolver's answer, say 169.254.169.254) fails the test.
    :returns: the refused addresses (tests of the URL policy check it is empty)."""
    attempts: list[str] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def guard(address: Any) -> None:
        host = _off_loopback(address)
        if host is not None:
            attempts.append(host)
            pytest.fail(f"a test tried to connect off loopback, to {address!r}")

    def connect(self: socket.socket, address: Any) -> None:
        guard(address)
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        guard(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield attempts


@pytest.fixture
def dotcloud_manifest_path() -> Path:
    path = REFERENCE / "dotcloud-sample-manifest.json"
    if not path.exists():
        pytest.fail(f"{path} is missing: CI checks out shared/ beside the repository")
    return path


@pytest.fixture
def complete_manifest() -> dict[str, Any]:
    """A manifest with every section a render needs."""
    return {
        "name": "tiny",
        "version": "1.0",
        "arch": "x86_64",
        "description": "test cloudlet",
        "author": "cloudlets tests",
        "filesystem": {"url": "http://mirrors.cloudlets.com/tiny.tar.gz",
                       "sha256": "a" * 64, "size": 1024},
        "boot": {"kernel": "/boot/vmlinuz", "initrd": "/boot/initrd.img",
                 "cmdline": "console=ttyS0", "firmware": "bios"},
        "args": {"hostname": {"type": "string", "default": "tiny-host"},
                 "motd": {"type": "string", "default": "hello"}},
        "templates": ["/etc/hostname"],
    }


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture
def static_http(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A static file server on 127.0.0.1 serving a temporary directory."""
    root = tmp_path / "www"
    root.mkdir()

    def handler(*args: Any, **kwargs: Any) -> _QuietHandler:
        return _QuietHandler(*args, directory=str(root), **kwargs)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data))
    return path


class RefuseSeekData(Protocol):
    """``refuse_seek_data(errno)``, the fixture's switch: call it (the errno
    is optional) to refuse ``SEEK_DATA`` from then on."""

    def __call__(self, code: int = ...) -> None: ...


@pytest.fixture
def refuse_seek_data(monkeypatch: pytest.MonkeyPatch) -> RefuseSeekData:
    """Make ``lseek(SEEK_DATA)`` fail with the given errno (default
    ``EOPNOTSUPP``), as on a file system that does not implement it."""
    real = os.lseek

    def refuse(code: int = errno.EOPNOTSUPP) -> None:
        def lseek(fd: int, offset: int, whence: int) -> int:
            if whence == os.SEEK_DATA:
                raise OSError(code, os.strerror(code))
            return real(fd, offset, whence)

        monkeypatch.setattr(os, "lseek", lseek)

    return refuse
