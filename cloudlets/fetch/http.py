"""HTTP transport: requests with redirects under the URL policy (every
connection policed, see :mod:`cloudlets.fetch.guard`), ranges and resumes,
retries with backoff, a minimum rate, and credentials scrubbed from the HTTP
stack's logs."""

from __future__ import annotations

import email.utils
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urljoin

from cloudlets.errors import FetchError, IntegrityError
from cloudlets.fetch.guard import AddressRefused, Hop, Lifeline, hop, police_session
from cloudlets.fetch.policy import RetryPolicy, UrlPolicy
from cloudlets.fetch.sink import Sink
from cloudlets.progress import STAGE_FETCH, ProgressCallback
from cloudlets.urls import redact, redact_text

if TYPE_CHECKING:  # imported when a download over HTTP needs them (0.04 s)
    import requests

__all__ = ["HttpTransport", "Stats", "install_scrubber"]

log = logging.getLogger(__package__)  # the logger of cloudlets.fetch, as before the split


class _ScrubFilter(logging.Filter):
    """Redact credentials from the log records of the HTTP stack: urllib3
    logs every request line at DEBUG, query string (signatures) included."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return True
        scrubbed = redact_text(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, ()
        return True


_SCRUB = _ScrubFilter()


def install_scrubber() -> None:
    for name in ("urllib3.connectionpool", "urllib3.connection", "urllib3.response"):
        logger = logging.getLogger(name)
        if _SCRUB not in logger.filters:
            logger.addFilter(_SCRUB)

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


@dataclass
class Stats:
    """Counters of one :meth:`Fetcher.fetch` call."""

    attempts: int = 0
    resumes: int = 0


class _Retryable(Exception):
    """An attempt failed in a way worth another try."""

    def __init__(self, message: str, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class HttpTransport:
    """The HTTP half of :class:`~cloudlets.fetch.Fetcher`: a session per
    thread, the attempts at one URL with their retries, resumes with
    ``Range`` guarded by ``If-Range``, and redirects followed by hand under
    the URL policy. It reads the settings the Fetcher holds."""

    CHUNK_SIZE: int
    policy: UrlPolicy
    retry: RetryPolicy
    timeout: tuple[float, float]
    deadline: float
    min_rate: float
    min_rate_window: float
    user_agent: str
    _shared_session: requests.Session | None
    _local: threading.local
    _sleep: Callable[[float], None] | None
    _rng: random.Random

    @property
    def session(self) -> requests.Session:
        """The HTTP session of the calling thread."""
        if self._shared_session is not None:
            return self._shared_session
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = self._local.session = police_session(requests.Session())
        return session

    def read(self, url: str, *, max_bytes: int, what: str = "document") -> bytes | None:
        """GET a small document whole (a manifest, a manifest's ``.sig``):
        under the same URL policy, policed connections, redirect rules,
        deadline and minimum rate as a download; one attempt, at most
        ``max_bytes``, the whole body within the read timeout.

        :param url: an ``http(s)://`` URL.
        :param max_bytes: the largest body accepted.
        :param what: what the document is, for messages.
        :returns: the body, or ``None`` when the server answers 404 or 410.
        :raises FetchError: the URL, a redirect or an address is refused, the
            request fails, another status is returned, or the body is too large.
        """
        import requests
        import urllib3

        shown = redact(url)
        if not url.startswith(("http://", "https://")):
            raise FetchError(f"{what} {shown}: only http and https URLs are read", url=shown)
        self.policy.check(url, what)
        line = Lifeline(self.deadline, self.min_rate, self.min_rate_window)
        try:
            headers = {"User-Agent": self.user_agent, "Accept-Encoding": "identity"}
            try:
                response = self._request(url, headers, Hop(self.policy, (), line))
            except _Retryable as exc:
                line.check(url)
                raise FetchError(f"GET {shown} ({what}) failed: {exc}", url=shown) from None
            with response:
                if response.status_code in (404, 410):
                    return None
                if response.status_code != 200:
                    raise FetchError(f"GET {shown} ({what}) failed: HTTP "
                                     f"{response.status_code}", url=shown,
                                     status=response.status_code)
                body = bytearray()
                line.body_started()
                # the read timeout bounds the whole body, not each byte: a server
                # dripping a byte a second cannot hold the render in prepare
                deadline = time.monotonic() + self.timeout[1]
                try:
                    while chunk := response.raw.read1(64 * 1024, decode_content=False):
                        body += chunk
                        line.received(len(chunk), url=shown)
                        if len(body) > max_bytes:
                            raise FetchError(f"GET {shown}: the {what} is larger than "
                                             f"{max_bytes} bytes", url=shown, status=200)
                        if time.monotonic() > deadline:
                            raise FetchError(f"GET {shown}: the {what} took longer than "
                                             f"{self.timeout[1]:g} s to arrive", url=shown,
                                             status=200)
                except (requests.RequestException, urllib3.exceptions.HTTPError,
                        OSError) as exc:
                    line.check(url)
                    raise FetchError(f"GET {shown} ({what}) failed: {describe(exc)}",
                                     url=shown) from None
                line.check(url)  # a body cut by the deadline may look complete
            return bytes(body)
        finally:
            line.close()

    def _download(self, url: str, sink: Sink, progress: ProgressCallback,
                  stats: Stats, rules: Hop) -> None:
        """Run the attempts for one HTTP URL under ``rules``, counting them
        in ``stats``. A cut lifeline (cancel, deadline, too slow) ends them."""
        policy = self.retry
        line = rules.line
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            stats.attempts += 1
            stats.resumes += 1 if sink.done else 0
            try:
                self._attempt(url, sink, progress, rules)
                if line is not None:  # a body cut short may look complete
                    line.check(url)
                return
            except (FetchError, IntegrityError):
                if line is not None:
                    line.check(url)
                raise
            except _Retryable as exc:
                if line is not None:
                    line.check(url)
                elapsed = time.monotonic() - started
                wait = policy.delay(attempt - 1, exc.retry_after, self._rng)
                if attempt >= policy.attempts or elapsed + wait > policy.total_time:
                    why = (f"{attempt} attempts" if attempt >= policy.attempts
                           else f"retry budget of {policy.total_time:g}s")
                    raise FetchError(f"GET {redact(url)} failed after {why}: {exc}",
                                     url=redact(url), status=exc.status) from None
                log.info("GET %s: %s; attempt %d of %d in %.2fs", redact(url), exc,
                         attempt + 1, policy.attempts, wait)
                if self._sleep is not None:
                    self._sleep(wait)
                elif line is not None:
                    line.sleep(wait)  # a cancel or the deadline ends it early
                    line.check(url)
                else:
                    time.sleep(wait)

    def _attempt(self, url: str, sink: Sink, progress: ProgressCallback, rules: Hop) -> None:
        """One request (following redirects) and its body, appended to ``sink``."""
        sink.check_cancelled()
        headers = {"User-Agent": self.user_agent, "Accept-Encoding": "identity"}
        offset = sink.done
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if sink.validator:
                headers["If-Range"] = sink.validator
        response = self._request(url, headers, rules)
        with response:
            where = redact(response.url or url)
            status = response.status_code
            if status == 206 and offset:
                self._check_range(response, where, offset, sink.expected_size)
            elif status == 200:
                if offset:
                    log.info("GET %s: server ignored Range, restarting from byte 0", where)
                    sink.restart()
                    progress(STAGE_FETCH, 0, sink.expected_size)
            elif status == 416 and offset:
                sink.restart()
                raise _Retryable(f"HTTP 416 for bytes={offset}-; restarting from byte 0",
                                 status=status)
            elif status in self.retry.retry_statuses:
                raise _Retryable(f"HTTP {status} {response.reason}", status=status,
                                 retry_after=_retry_after(response.headers.get("Retry-After")))
            else:
                raise FetchError(f"GET {where} failed: HTTP {status} {response.reason} "
                                 f"(expected 200{' or 206' if offset else ''})",
                                 url=where, status=status)
            if status == 200:
                sink.validator = _validator(response)
            total = sink.expected_size
            length = response.headers.get("Content-Length")
            if status == 200 and length and length.isdigit():
                if total is not None and int(length) != total:
                    raise IntegrityError(
                        f"{where}: size mismatch: expected {total} bytes, the server announces "
                        f"{length} (Content-Length)", url=where, expected=str(total),
                        actual=length)
                total = int(length) if total is None else total
            self._body(where, response, sink, progress, total, rules)
            if total is not None and sink.done < total:
                raise _Retryable(f"body ended after {sink.done} of {total} bytes")

    def _body(self, url: str, response: requests.Response, sink: Sink,
              progress: ProgressCallback, total: int | None, rules: Hop) -> None:
        """Append the body, as sent, to ``sink``: no content decoding, so a
        ``.tar.gz`` served with ``Content-Encoding: gzip`` keeps its bytes and
        its digest.

        Socket reads (``read1``) are gathered into whole chunks of
        :attr:`CHUNK_SIZE`; each read counts towards the minimum rate, so a
        server trickling a byte at a time fails within one rate window. A
        connection lost mid-chunk keeps the bytes that arrived; the resume
        starts after them."""
        import requests
        import urllib3

        raw = response.raw
        line = rules.line
        if line is not None:
            line.body_started()
        pieces: list[bytes] = []
        gathered = 0
        while True:
            try:
                piece = raw.read1(self.CHUNK_SIZE - gathered, decode_content=False)
            except (requests.RequestException, urllib3.exceptions.HTTPError,
                    OSError) as exc:
                if pieces:
                    sink.write(b"".join(pieces))
                raise _Retryable(f"connection lost after {sink.done} bytes: "
                                 f"{describe(exc)}") from None
            if piece:
                pieces.append(piece)
                gathered += len(piece)
                if line is not None:
                    line.received(len(piece), url=url)
            if pieces and (not piece or gathered >= self.CHUNK_SIZE):
                sink.write(pieces[0] if len(pieces) == 1 else b"".join(pieces))
                pieces, gathered = [], 0
                progress(STAGE_FETCH, sink.done, total)
            if not piece:
                return

    def _request(self, url: str, headers: dict[str, str], rules: Hop) -> requests.Response:
        """Send a GET, following redirects by hand within the policy; every
        hop is checked before it is sent, and its connection when it is made."""
        import requests

        seen = [url]
        current = url
        for _hop in range(self.policy.max_redirects + 1):
            problem = rules.policy.problem(current, rules.allowed)
            if problem:
                raise FetchError(f"GET {redact(current)} refused by the URL policy: {problem}",
                                 url=redact(current))
            try:
                with hop(rules):
                    response = self.session.get(current, headers=headers, stream=True,
                                                allow_redirects=False, timeout=self.timeout)
            except AddressRefused as exc:
                raise AddressRefused(f"GET {redact(current)}: {exc}", url=redact(current)) \
                    from None
            except requests.Timeout as exc:
                raise _Retryable(f"timed out: {describe(exc)}") from None
            except requests.ConnectionError as exc:
                raise _Retryable(f"connection failed: {describe(exc)}") from None
            except requests.RequestException as exc:
                raise FetchError(f"GET {redact(current)} failed: {describe(exc)}",
                                 url=redact(current)) from None
            if response.status_code not in _REDIRECTS:
                return response
            location = response.headers.get("Location")
            response.close()
            if not location:
                raise FetchError(f"GET {redact(current)}: HTTP {response.status_code} without "
                                 "a Location header", url=redact(current),
                                 status=response.status_code)
            target = urljoin(current, location)
            problem = rules.policy.problem(target, rules.allowed)
            if problem:
                raise FetchError(f"GET {redact(current)}: redirect to {redact(target)} refused "
                                 f"by the URL policy: {problem}", url=redact(current),
                                 status=response.status_code)
            if target in seen:
                raise FetchError(f"GET {redact(url)}: redirect loop at {redact(target)}",
                                 url=redact(url), status=response.status_code)
            log.debug("GET %s: redirected to %s", redact(current), redact(target))
            seen.append(target)
            current = target
        raise FetchError(f"GET {redact(url)}: more than {self.policy.max_redirects} redirects",
                         url=redact(url))

    @staticmethod
    def _check_range(response: requests.Response, where: str, offset: int,
                     size: int | None) -> None:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", "").strip())
        if not match or int(match.group(1)) != offset:
            raise FetchError(f"GET {where}: asked for bytes={offset}-, the server answered "
                             f"206 with Content-Range {response.headers.get('Content-Range')!r}",
                             url=where, status=206)
        whole = match.group(3)
        if size is not None and whole != "*" and int(whole) != size:
            raise IntegrityError(f"{where}: size mismatch: expected {size} bytes, the server "
                                 f"announces {whole} (Content-Range)", url=where,
                                 expected=str(size), actual=whole)


def _validator(response: requests.Response) -> str | None:
    """A strong ETag, else Last-Modified: what ``If-Range`` may carry."""
    etag = response.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return response.headers.get("Last-Modified")


def describe(exc: BaseException) -> str:
    """A short reason, without the URL (which may hold credentials)."""
    text = redact_text(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
