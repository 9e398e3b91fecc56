"""HTTPStorage against a real nginx with WebDAV, plus a flaky server for retries."""

from __future__ import annotations

import base64
import hashlib
import http.server
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from cloudlets.drivers.providers import get_driver
from cloudlets.drivers.storage.http import HTTPStorage
from cloudlets.drivers.types import StorageCapability
from cloudlets.errors import ConfigurationError, StorageError
from cloudlets.testing.storage import StorageDriverConformance
from tests.nginx_fixture import (
    API_KEY,
    BASIC_PASSWORD,
    BASIC_USER,
    BEARER_TOKEN,
    Nginx,
    nginx_server,
)

__all__ = ["nginx_server"]  # the fixture, imported for pytest

_counter = itertools.count()


def _locator(server: Nginx, area: str, *, userinfo: str = "") -> Callable[[str], str]:
    def new(name: str) -> str:
        base = server.base.replace("http://", f"http://{userinfo}")
        return f"{base}/{area}/{next(_counter)}/{name}"
    return new


def _leftovers(server: Nginx) -> list[str]:
    return sorted(p.name for p in server.root.rglob("*.partial"))


class TestHTTPStorageConformance(StorageDriverConformance):
    @pytest.fixture
    def storage(self) -> HTTPStorage:
        return HTTPStorage()

    @pytest.fixture
    def new_location(self, nginx_server: Nginx) -> Callable[[str], str]:
        return _locator(nginx_server, "dav")


class TestHTTPStorageWithoutMoveConformance(StorageDriverConformance):
    """A server with PUT and DELETE only: the final name written directly."""

    @pytest.fixture
    def storage(self) -> HTTPStorage:
        return HTTPStorage(ex_move=False)

    @pytest.fixture
    def new_location(self, nginx_server: Nginx) -> Callable[[str], str]:
        return _locator(nginx_server, "nomove")


class TestHTTPStorageSizeOnlyConformance(StorageDriverConformance):
    @pytest.fixture
    def storage(self) -> HTTPStorage:
        return HTTPStorage(ex_verify="size", ex_move=False)

    @pytest.fixture
    def new_location(self, nginx_server: Nginx) -> Callable[[str], str]:
        return _locator(nginx_server, "dav")


def test_registered_under_its_name() -> None:
    assert get_driver("storage", "http") is HTTPStorage


def test_stored_bytes_on_disk_match(nginx_server: Nginx, tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000
    source = tmp_path / "image.raw"
    source.write_bytes(data)
    location = _locator(nginx_server, "dav")("disk.raw")
    artifact = HTTPStorage().upload(source, location)
    on_disk = nginx_server.root / location.split("/", 3)[3]
    assert on_disk.read_bytes() == data
    assert artifact.sha256 == hashlib.sha256(data).hexdigest()
    assert artifact.location == location
    assert _leftovers(nginx_server) == []


def test_content_length_and_chunked_bodies(nginx_server: Nginx) -> None:
    storage = HTTPStorage()
    new = _locator(nginx_server, "dav")
    data = b"z" * 3_000_000
    known = storage.upload(iter([data[:1000], data[1000:]]), new("known.img"),
                           size=len(data))
    unknown = storage.upload(iter([data[:1000], data[1000:]]), new("unknown.img"))
    assert known.sha256 == unknown.sha256 == hashlib.sha256(data).hexdigest()
    log = (nginx_server.prefix / "logs" / "access.log").read_text()
    assert "PUT /dav/" in log


def test_partial_upload_is_never_visible_at_the_final_name(nginx_server: Nginx) -> None:
    storage = HTTPStorage()
    location = _locator(nginx_server, "dav")("atomic.img")
    seen: list[int] = []

    def chunks() -> Iterator[bytes]:
        for _ in range(5):
            seen.append(requests.head(location, timeout=5).status_code)
            yield b"x" * 100_000

    storage.upload(chunks(), location)
    assert seen == [404] * 5
    assert requests.get(location, timeout=5).content == b"x" * 500_000


def test_failed_overwrite_keeps_the_old_object(nginx_server: Nginx) -> None:
    storage = HTTPStorage()
    location = _locator(nginx_server, "dav")("keep.img")
    storage.upload(b"old", location, size=3)
    with pytest.raises(StorageError, match="sha256"):
        storage.upload(b"new", location, sha256="1" * 64, overwrite=True)
    assert requests.get(location, timeout=5).content == b"old"
    assert _leftovers(nginx_server) == []


def test_move_refuses_to_clobber_an_object_created_meanwhile(nginx_server: Nginx) -> None:
    """Overwrite: F makes the server refuse, even if the name appears after
    the base's existence check (a concurrent writer)."""
    storage = HTTPStorage()
    location = _locator(nginx_server, "dav")("race.img")

    def chunks() -> Iterator[bytes]:
        yield b"mine"
        requests.put(location, data=b"theirs", timeout=5).raise_for_status()

    with pytest.raises(StorageError, match="overwrite"):
        storage.upload(chunks(), location)
    assert requests.get(location, timeout=5).content == b"theirs"
    assert _leftovers(nginx_server) == []


def test_basic_auth_from_url_and_arguments(nginx_server: Nginx) -> None:
    in_url = _locator(nginx_server, "basic", userinfo=f"{BASIC_USER}:{BASIC_PASSWORD}@")
    artifact = HTTPStorage().upload(b"hello", in_url("a.img"))
    assert BASIC_PASSWORD not in artifact.location
    assert "***" in artifact.location
    plain = _locator(nginx_server, "basic")
    storage = HTTPStorage(BASIC_USER, BASIC_PASSWORD)
    location = plain("b.img")
    storage.upload(b"hello", location)
    with storage.open(location) as handle:
        assert handle.read() == b"hello"
    storage.delete(location)
    assert not storage.exists(location)


def test_wrong_credentials_fail_without_leaking_them(nginx_server: Nginx) -> None:
    location = _locator(nginx_server, "basic", userinfo=f"{BASIC_USER}:wrong-pw@")("c.img")
    with pytest.raises(StorageError) as info:
        HTTPStorage().upload(b"hello", location)
    assert "401" in str(info.value)
    assert "wrong-pw" not in str(info.value)
    assert "wrong-pw" not in (info.value.location or "")
    assert "127.0.0.1" in str(info.value)


def test_bearer_token_and_custom_headers(nginx_server: Nginx) -> None:
    bearer = _locator(nginx_server, "bearer")("t.img")
    with pytest.raises(StorageError, match="401"):
        HTTPStorage().upload(b"x", bearer)
    HTTPStorage(token=BEARER_TOKEN).upload(b"x", bearer)
    keyed = _locator(nginx_server, "apikey")("k.img")
    with pytest.raises(StorageError, match="401"):
        HTTPStorage(headers={"X-Api-Key": "nope"}).upload(b"x", keyed)
    storage = HTTPStorage(headers={"X-Api-Key": API_KEY})
    storage.upload(b"x", keyed)
    assert storage.exists(keyed)


@pytest.mark.parametrize("size", [5, 8 * 1024 * 1024 + 3])  # one send, and many
def test_file_sent_in_the_kernel_with_every_kind_of_credentials(
        nginx_server: Nginx, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    source = tmp_path / "disk.raw"
    source.write_bytes(data)
    cases = [
        (HTTPStorage(), _locator(nginx_server, "basic",
                                 userinfo=f"{BASIC_USER}:{BASIC_PASSWORD}@")("a.img")),
        (HTTPStorage(BASIC_USER, BASIC_PASSWORD), _locator(nginx_server, "basic")("b.img")),
        (HTTPStorage(token=BEARER_TOKEN), _locator(nginx_server, "bearer")("c.img")),
        (HTTPStorage(headers={"X-Api-Key": API_KEY}), _locator(nginx_server, "apikey")("d.img")),
    ]
    for storage, location in cases:
        artifact = storage.upload(source, location)
        assert artifact.sha256 == hashlib.sha256(data).hexdigest() and artifact.size == size
        stored = nginx_server.root / location.split("/", 3)[3].split("@")[-1]
        assert stored.read_bytes() == data
    # refused before the body is read: the server's answer, not a broken pipe
    wrong = _locator(nginx_server, "basic", userinfo=f"{BASIC_USER}:wrong-pw@")("e.img")
    with pytest.raises(StorageError, match="HTTP 401") as info:
        HTTPStorage(retries=0).upload(source, wrong)
    assert "wrong-pw" not in str(info.value)
    assert _leftovers(nginx_server) == []


def test_credentials_never_logged(nginx_server: Nginx, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    location = _locator(nginx_server, "basic",
                        userinfo=f"{BASIC_USER}:{BASIC_PASSWORD}@")("logged.img")
    HTTPStorage(headers={"X-Trace": "trace-secret"}).upload(b"data", location)
    HTTPStorage(token=BEARER_TOKEN).upload(b"data", _locator(nginx_server, "bearer")("l.img"))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "PUT" in text or "stored" in text
    for secret in (BASIC_PASSWORD, BEARER_TOKEN, "trace-secret"):
        assert secret not in text


def test_without_move_a_failure_deletes_the_partial_file(nginx_server: Nginx) -> None:
    storage = HTTPStorage(ex_move=False)
    location = _locator(nginx_server, "nomove")("partial.img")
    with pytest.raises(StorageError, match="sha256"):
        storage.upload(b"abc" * 1000, location, sha256="2" * 64)
    assert not storage.exists(location)


def test_only_an_instance_that_moves_into_place_declares_atomic() -> None:
    """``ex_move=False`` writes the final name directly: it declared ATOMIC all
    the same, so nothing cleaned up after it (see the conformance suite's
    interrupted-upload checks)."""
    assert HTTPStorage.capabilities & StorageCapability.ATOMIC
    assert HTTPStorage().capabilities & StorageCapability.ATOMIC
    direct = HTTPStorage(ex_move=False)
    assert not direct.capabilities & StorageCapability.ATOMIC
    assert direct.capabilities == HTTPStorage.capabilities & ~StorageCapability.ATOMIC


def test_an_atomic_upload_refuses_a_server_without_move(nginx_server: Nginx) -> None:
    """The promise cannot be kept there: refused before a byte is written
    (it used to write the final name directly, though ATOMIC)."""
    storage = HTTPStorage()
    location = _locator(nginx_server, "nomove")("atomic.img")
    with pytest.raises(StorageError, match=r"does not implement WebDAV MOVE \(HTTP 405\).*"
                                           r"pass ex_move=False"):
        storage.upload(b"abc" * 1000, location)
    assert not storage.exists(location)
    assert not list((nginx_server.root / "nomove").rglob("atomic.img"))


def test_unreachable_server_names_the_target() -> None:
    with socket_port() as port:
        location = f"http://bob:pw-xyz@127.0.0.1:{port}/x.img"
    with pytest.raises(StorageError) as info:
        HTTPStorage(retries=0, timeout=2).upload(b"x", location)
    assert f"127.0.0.1:{port}/x.img" in str(info.value)
    assert "pw-xyz" not in str(info.value)


@pytest.mark.parametrize("location", ["ftp://host/x", "http://host/", "http:///x", "s3://b/k"])
def test_rejects_foreign_locations(location: str) -> None:
    with pytest.raises(StorageError):
        HTTPStorage().exists(location)


def test_configuration_is_checked() -> None:
    with pytest.raises(ConfigurationError):
        HTTPStorage("u", "p", token="t")
    with pytest.raises(ConfigurationError):
        HTTPStorage(ex_verify="md5")  # type: ignore[arg-type]


# -- retries, against a server that fails on purpose ---------------------------


class socket_port:
    """A port nobody listens on (bound then released)."""

    def __enter__(self) -> int:
        import socket
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        return int(self._sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


class _Flaky(http.server.BaseHTTPRequestHandler):
    """PUT answers 503 for the first ``failures`` requests, then stores."""

    protocol_version = "HTTP/1.1"
    store: dict[str, bytes] = {}
    failures = 0
    puts = 0
    gets = 0
    #: flip a byte of what is stored (damage on the server's side)
    corrupt = False
    #: the digest HEAD reports of what is stored: "repr-digest", "digest",
    #: "md5-etag", "other-etag" (32 hex digits that are no MD5) or None
    report: str | None = None

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding") == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _answer(self, status: int, body: bytes = b"", length: int | None = None,
                headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_PUT(self) -> None:
        body = self._read_body()
        type(self).puts += 1
        if type(self).puts <= self.failures:
            self._answer(503)
            return
        if self.corrupt and body:
            body = bytes([body[0] ^ 1]) + body[1:]
        self.store[self.path] = body
        self._answer(201)

    def _digest_headers(self, data: bytes) -> dict[str, str]:
        sha = base64.b64encode(hashlib.sha256(data).digest()).decode()
        return {"repr-digest": {"Repr-Digest": f"sha-256=:{sha}:"},
                "digest": {"Digest": f"SHA-256={sha}"},
                "md5-etag": {"ETag": f'"{hashlib.md5(data).hexdigest()}"'},
                "other-etag": {"ETag": '"0123456789abcdef0123456789abcdef"'},
                }.get(self.report or "", {})

    def do_HEAD(self) -> None:
        if self.path in self.store:
            data = self.store[self.path]
            self._answer(200, length=len(data), headers=self._digest_headers(data))
        else:
            self._answer(404)

    def do_GET(self) -> None:
        type(self).gets += 1
        if self.path in self.store:
            self._answer(200, self.store[self.path])
        else:
            self._answer(404)

    def do_DELETE(self) -> None:
        self._answer(204 if self.store.pop(self.path, None) is not None else 404)

    def do_MOVE(self) -> None:
        self._answer(405)


@pytest.fixture
def flaky() -> Iterator[tuple[str, type[_Flaky]]]:
    handler = type("Flaky", (_Flaky,), {"store": {}, "failures": 2, "puts": 0, "gets": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_file_upload_is_retried_within_the_bound(flaky: tuple[str, type[_Flaky]],
                                                 tmp_path: Path) -> None:
    base, handler = flaky
    source = tmp_path / "a.img"
    source.write_bytes(b"payload" * 1000)
    artifact = HTTPStorage(retries=2, backoff=0.01, ex_move=False).upload(
        source, f"{base}/a.img")
    assert handler.puts == 3
    assert handler.store["/a.img"] == b"payload" * 1000
    assert artifact.size == 7000


def test_retries_give_up_after_the_bound(flaky: tuple[str, type[_Flaky]],
                                         tmp_path: Path) -> None:
    base, handler = flaky
    source = tmp_path / "a.img"
    source.write_bytes(b"payload")
    with pytest.raises(StorageError, match="503"):
        HTTPStorage(retries=1, backoff=0.01, ex_move=False).upload(source, f"{base}/a.img")
    assert handler.puts == 2
    assert "/a.img" not in handler.store


def test_a_stream_is_not_retried(flaky: tuple[str, type[_Flaky]]) -> None:
    base, handler = flaky
    with pytest.raises(StorageError, match="503"):
        HTTPStorage(retries=3, backoff=0.01, ex_move=False).upload(iter([b"once"]),
                                                                   f"{base}/s.img")
    assert handler.puts == 1


# -- verification: what the server reports, or a read-back when asked -----------


@pytest.mark.parametrize("report", ["repr-digest", "digest", "md5-etag"])
def test_a_digest_the_server_reports_is_checked_without_reading_back(
        flaky: tuple[str, type[_Flaky]], tmp_path: Path, report: str) -> None:
    base, handler = flaky
    handler.failures, handler.report = 0, report
    source = tmp_path / "a.img"
    source.write_bytes(os.urandom(100_000))
    HTTPStorage(ex_move=False).upload(source, f"{base}/a.img")
    assert handler.gets == 0
    handler.corrupt = True
    with pytest.raises(StorageError, match=r"b\.img (reports sha256|reads back)") as caught:
        HTTPStorage(ex_move=False).upload(source, f"{base}/b.img", overwrite=True)
    assert "/b.img" not in handler.store  # deleted: nothing complete-looking is left
    # an MD5 ETag that does not match could be a non-MD5 ETag: it is read back to tell
    assert handler.gets == (1 if report == "md5-etag" else 0), caught.value


def test_without_a_reported_digest_the_size_is_checked_and_digest_reads_back(
        flaky: tuple[str, type[_Flaky]], tmp_path: Path) -> None:
    base, handler = flaky
    handler.failures, handler.corrupt = 0, True  # same size, one byte flipped
    source = tmp_path / "a.img"
    source.write_bytes(os.urandom(100_000))
    HTTPStorage(ex_move=False).upload(source, f"{base}/a.img")  # the default trusts the size
    assert handler.gets == 0
    with pytest.raises(StorageError, match="reads back 100000 bytes with sha256"):
        HTTPStorage(ex_move=False, ex_verify="digest").upload(source, f"{base}/b.img")
    assert handler.gets == 1 and "/b.img" not in handler.store


def test_an_etag_that_only_looks_like_an_md5_is_read_back(flaky: tuple[str, type[_Flaky]],
                                                          tmp_path: Path) -> None:
    base, handler = flaky
    handler.failures, handler.report = 0, "other-etag"
    source = tmp_path / "a.img"
    source.write_bytes(os.urandom(100_000))
    HTTPStorage(ex_move=False).upload(source, f"{base}/a.img")
    assert handler.gets == 1 and handler.store["/a.img"] == source.read_bytes()
