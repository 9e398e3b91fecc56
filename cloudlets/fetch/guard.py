"""The connections of a download, policed and cuttable.

Every TCP connection a :class:`~cloudlets.fetch.Fetcher` opens goes through
:func:`open_socket`: it resolves the host itself, checks every address
against the :class:`~cloudlets.fetch.UrlPolicy` and connects to an address
it checked, so what was checked is what is reached (no DNS-rebinding gap); a
kept-alive connection is checked again before each request. The rules of
the request being sent travel in a :class:`Hop`, set for the duration of
each request (:func:`hop`).

A :class:`Lifeline` holds the connections of one fetch so that another
thread can cut them at once: cancelling a download
(:meth:`DownloadWatch.cancel <cloudlets.fetch.DownloadWatch.cancel>`) or
passing the fetch's deadline shuts the active socket down, and the read
blocked on it returns at once instead of after the read timeout. It also
enforces the minimum transfer rate.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cloudlets.errors import FetchError
from cloudlets.fetch.policy import HostPort, UrlPolicy
from cloudlets.fetch.watch import DownloadCancelled
from cloudlets.urls import redact

if TYPE_CHECKING:
    import requests

__all__ = ["AddressRefused", "Hop", "Lifeline", "hop", "open_socket", "police_session"]

#: Why a :class:`Lifeline` was cut.
CANCELLED, DEADLINE = "cancelled", "deadline"


class AddressRefused(FetchError):
    """A connection the URL policy refuses (the resolved address is in a
    refused range); nothing was sent to it."""


class Lifeline:
    """The connections of one fetch, its deadline and its minimum rate.

    :param deadline: seconds from now after which the fetch is cut
        (``None``: none).
    :param min_rate: bytes per second a response body must sustain,
        measured over each ``window`` seconds (``0``: no minimum).
    :param window: the measuring window, in seconds.
    """

    def __init__(self, deadline: float | None = None, min_rate: float = 0.0,
                 window: float = 30.0) -> None:
        self.deadline = deadline
        self.min_rate = min_rate
        self.window = window
        #: Why the connections were cut (``None`` while they are not).
        self.reason: str | None = None
        self._lock = threading.Lock()
        self._cut = threading.Event()
        self._connections: set[Any] = set()
        self._timer: threading.Timer | None = None
        self._window_start = 0.0
        self._window_bytes = 0
        if deadline is not None:
            self._timer = threading.Timer(deadline, self.cut, (DEADLINE,))
            self._timer.daemon = True
            self._timer.start()

    def attach(self, connection: Any) -> None:
        """Hold ``connection`` (an urllib3 connection: its ``sock`` is shut
        down when the lifeline is cut)."""
        with self._lock:
            self._connections.add(connection)
            cut = self.reason is not None
        if cut:
            _shutdown(connection)

    def cut(self, reason: str = CANCELLED) -> None:
        """Shut down every connection held, now: a read blocked on one
        returns at once."""
        with self._lock:
            if self.reason is None:
                self.reason = reason
            connections = list(self._connections)
        self._cut.set()
        for connection in connections:
            _shutdown(connection)

    def close(self) -> None:
        """The fetch is over: stop the deadline timer, let the connections go."""
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            self._connections.clear()

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less when the lifeline is cut meanwhile."""
        self._cut.wait(seconds)

    def body_started(self) -> None:
        """A response body starts: the rate is measured from now."""
        self._window_start, self._window_bytes = time.monotonic(), 0

    def received(self, count: int, url: str) -> None:
        """``count`` more bytes of the body arrived.

        :raises FetchError: when the last window was slower than the minimum
            rate (this candidate fails; the next mirror may still be tried).
        """
        self._window_bytes += count
        now = time.monotonic()
        if now - self._window_start < self.window or not self.min_rate:
            return
        if self._window_bytes < self.min_rate * (now - self._window_start):
            where = redact(url)
            raise FetchError(f"GET {where}: slower than the minimum rate of "
                             f"{self.min_rate:g} bytes/s over {self.window:g} s "
                             "(Fetcher min_rate)", url=where)
        self._window_start, self._window_bytes = now, 0

    def check(self, url: str) -> None:
        """:raises DownloadCancelled: when the download was cancelled.
        :raises FetchError: when it passed its deadline."""
        if self.reason is None:
            return
        where = redact(url)
        if self.reason == CANCELLED:
            raise DownloadCancelled(f"download of {where} cancelled by its reader", url=where)
        raise FetchError(f"GET {where}: not complete after the fetch deadline of "
                         f"{self.deadline:g} s (Fetcher deadline)", url=where)


def _shutdown(connection: Any) -> None:
    sock = getattr(connection, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            # the socket's own shutdown: an SSLSocket's would drop its TLS state
            # under the thread reading it
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


@dataclass(frozen=True)
class Hop:
    """The rules of the request being sent.

    :ivar policy: the URL policy.
    :ivar allowed: exceptions of this request (the provider's mirror it
        was rewritten to).
    :ivar line: the fetch's lifeline, which holds the connection.
    """

    policy: UrlPolicy
    allowed: tuple[HostPort, ...] = ()
    line: Lifeline | None = None


_HOP: contextvars.ContextVar[Hop | None] = contextvars.ContextVar("cloudlets_fetch_hop",
                                                                  default=None)


@contextlib.contextmanager
def hop(rules: Hop) -> Iterator[None]:
    """Send the requests made inside under ``rules``."""
    token = _HOP.set(rules)
    try:
        yield
    finally:
        _HOP.reset(token)


def _current() -> Hop:
    return _HOP.get() or Hop(UrlPolicy())


def open_socket(host: str, port: int, timeout: Any, source_address: Any = None,
                socket_options: Any = None) -> socket.socket:
    """Resolve ``host``, and connect to the first of its addresses the
    current :class:`Hop`'s policy allows. Refused addresses are never
    connected to.

    :raises AddressRefused: when the policy refuses every address.
    :raises OSError: when no allowed address could be connected to
        (``socket.gaierror`` when the name does not resolve).
    """
    rules = _current()
    refused: str | None = None
    error: OSError | None = None
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, 0,
                                                               socket.SOCK_STREAM):
        problem = rules.policy.address_problem(host, port, str(sockaddr[0]), rules.allowed)
        if problem:
            refused = refused or problem
            continue
        sock = socket.socket(family, kind, proto)
        try:
            for option in socket_options or ():
                sock.setsockopt(*option)
            if timeout is None or isinstance(timeout, (int, float)):
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock
    if error is not None:
        raise error
    raise AddressRefused(f"connection to {host}:{port} refused by the URL policy: "
                         f"{refused or 'the name resolves to no address'}")


def check_peer(connection: Any) -> None:
    """Before a request on ``connection``: hold it on the current lifeline,
    and check a kept-alive connection's peer against the current rules.

    :raises AddressRefused: when the rules refuse the peer (the connection
        is closed, nothing is sent).
    """
    rules = _current()
    sock = getattr(connection, "sock", None)
    if sock is not None:
        try:
            peer = str(sock.getpeername()[0])
        except OSError:
            peer = None
        host = connection._dns_host
        problem = (rules.policy.address_problem(host, connection.port, peer, rules.allowed)
                   if peer else None)
        if problem:
            connection.close()
            raise AddressRefused(f"connection to {host}:{connection.port} refused by the URL "
                                 f"policy: {problem}")
    if rules.line is not None:
        rules.line.attach(connection)


class _Policed:
    """What the policed urllib3 connections add: connecting through
    :func:`open_socket`, checking the peer before each request."""

    def _new_conn(self) -> socket.socket:
        from urllib3.exceptions import (
            ConnectTimeoutError,
            NameResolutionError,
            NewConnectionError,
        )

        conn: Any = self
        try:
            return open_socket(conn._dns_host, conn.port, conn.timeout,
                               conn.source_address, conn.socket_options)
        except socket.gaierror as exc:
            raise NameResolutionError(conn.host, conn, exc) from exc
        except TimeoutError as exc:
            raise ConnectTimeoutError(conn, f"Connection to {conn.host} timed out. "
                                            f"(connect timeout={conn.timeout})") from exc
        except OSError as exc:
            raise NewConnectionError(conn, f"Failed to establish a new connection: {exc}") \
                from exc

    def request(self, *args: Any, **kwargs: Any) -> Any:
        check_peer(self)
        return super().request(*args, **kwargs)  # type: ignore[misc]


@functools.cache
def _adapter_class() -> type[requests.adapters.HTTPAdapter]:
    """The requests adapter whose connections are :class:`_Policed` (built
    on first use: urllib3 is imported only for HTTP downloads)."""
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class PolicedHTTPConnection(_Policed, HTTPConnection):
        pass

    class PolicedHTTPSConnection(_Policed, HTTPSConnection):
        pass

    class PolicedHTTPPool(HTTPConnectionPool):
        ConnectionCls = PolicedHTTPConnection

    class PolicedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = PolicedHTTPSConnection

    class PolicedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {  # this manager's own, not shared
                "http": PolicedHTTPPool, "https": PolicedHTTPSPool}

    return PolicedAdapter


def police_session(session: requests.Session) -> requests.Session:
    """Route ``session``'s HTTP and HTTPS connections through
    :func:`open_socket`, and stop it from reading proxies and ``.netrc``
    credentials from the environment (a proxy would be the connected
    address, and a provider's ``.netrc`` would be sent to a stranger's
    host). :returns: ``session``."""
    adapter = _adapter_class()()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.trust_env = False
    return session
