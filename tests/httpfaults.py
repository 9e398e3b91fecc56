"""A real HTTP server on 127.0.0.1 whose routes misbehave on request.

Tests register a :class:`Route` per path (its body, and the faults it should
inject), fetch from :meth:`FaultServer.url`, then read the route's counters:
how many requests came, how many times the whole body was sent, what headers
the client sent.

Faults, each for the first ``fault_count`` requests of a route (``None``:
every request):

- ``statuses``: answer these statuses first, one per request (500, 503, 429);
- ``drop_after``: announce the full length, send this many bytes, close;
- ``stall_after``: send this many bytes, then stall until the server stops;
- ``redirect``: answer 302 to this location (every request);
- ``ranges=False``: ignore ``Range`` and answer 200 with the whole body;
- ``extra``: bytes sent after the body (``length="announce"`` counts them in
  ``Content-Length``; ``length="none"`` sends no length and closes);
- ``delay``: seconds to wait before answering (widens concurrency windows);
- ``next_etag``: the ETag from the second request on (the file changed).
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Literal, Self

__all__ = ["FaultServer", "Route"]


@dataclass
class Route:
    """One path of the server and the faults it injects."""

    body: bytes
    statuses: list[int] = field(default_factory=list)
    retry_after: str | None = None
    drop_after: int | None = None
    stall_after: int | None = None
    fault_count: int | None = 1
    redirect: str | None = None
    ranges: bool = True
    extra: bytes = b""
    length: Literal["exact", "announce", "none"] = "exact"
    delay: float = 0.0
    #: seconds between the body's bytes, sent one at a time (a trickling server)
    trickle: float | None = None
    etag: str | None = '"v1"'
    #: the ETag served from the second request on (the file changed)
    next_etag: str | None = None
    #: counters, updated by the server
    requests: int = 0
    full_bodies: int = 0
    bytes_sent: int = 0
    headers: list[dict[str, str]] = field(default_factory=list)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.body).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Keep test output quiet."""

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        route = self.server.routes.get(path)
        if route is None:
            self._plain(404, b"no such route\n")
            return
        with self.server.lock:
            index = route.requests
            route.requests += 1
            route.headers.append(dict(self.headers.items()))
        faulty = route.fault_count is None or index < route.fault_count
        if index and route.next_etag is not None:
            route.etag = route.next_etag
        if route.delay:
            time.sleep(route.delay)
        if index < len(route.statuses):
            status = route.statuses[index]
            extra = {"Retry-After": route.retry_after} if status == 429 and \
                route.retry_after else {}
            self._plain(status, f"injected {status}\n".encode(), extra)
            return
        if route.redirect is not None:
            self._plain(302, b"moved\n", {"Location": route.redirect})
            return
        body = route.body + route.extra
        start = 0
        status = 200
        wanted = self.headers.get("Range")
        match = re.match(r"bytes=(\d+)-$", wanted or "")
        if route.ranges and match and int(match.group(1)) < len(body):
            if_range = self.headers.get("If-Range")
            if if_range is None or if_range == route.etag:
                start = int(match.group(1))
                status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        if route.etag:
            self.send_header("ETag", route.etag)
        if route.ranges:
            self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        if route.length == "none":
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            announced = len(body) if route.length == "announce" else len(route.body)
            self.send_header("Content-Length", str(announced - start))
        self.end_headers()
        payload = memoryview(body)[start:]
        if route.length == "exact":
            payload = payload[:len(route.body) - start]
        self._send_body(route, payload, faulty, whole=start == 0)

    def _send_body(self, route: Route, payload: memoryview, faulty: bool, whole: bool) -> None:
        cut = None
        if faulty and route.drop_after is not None:
            cut = route.drop_after
        elif faulty and route.stall_after is not None:
            cut = route.stall_after
        sent = 0
        if route.trickle is not None:
            self._trickle(route, payload)
            return
        try:
            for piece in _pieces(payload if cut is None else payload[:cut]):
                self.wfile.write(piece)
                sent += len(piece)
            self.wfile.flush()
        except OSError:
            self.close_connection = True
        with self.server.lock:
            route.bytes_sent += sent
            if cut is None and whole and sent == len(payload):
                route.full_bodies += 1
        if cut is None:
            return
        if faulty and route.stall_after is not None:
            self.server.stop.wait(30)
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _trickle(self, route: Route, payload: memoryview) -> None:
        """One byte at a time, until the body is sent, the client hangs up or
        the server stops."""
        assert route.trickle is not None
        for offset in range(len(payload)):
            try:
                self.wfile.write(payload[offset:offset + 1])
                self.wfile.flush()
            except OSError:
                break
            with self.server.lock:
                route.bytes_sent += 1
            if self.server.stop.wait(route.trickle):
                break
        self.close_connection = True

    def _plain(self, status: int, text: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)


def _pieces(data: memoryview, size: int = 1 << 16) -> Iterator[memoryview]:
    for offset in range(0, len(data), size):
        yield data[offset:offset + size]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: object, client_address: object) -> None:
        """Clients that hang up early are part of the tests: stay quiet."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.routes: dict[str, Route] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()


class FaultServer:
    """A threaded HTTP server on 127.0.0.1, on a free port.

    Use it as a context manager, or call :meth:`start` and :meth:`close`.
    """

    def __init__(self) -> None:
        self._server = _Server()
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def close(self) -> None:
        self._server.stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def base(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def add(self, path: str, route: Route) -> Route:
        """Serve ``route`` at ``path`` (replacing any route there)."""
        self._server.routes[path] = route
        return route

    def url(self, path: str) -> str:
        return self.base + path
