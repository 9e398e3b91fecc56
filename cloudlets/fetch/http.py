"""HTTP transport: requests with redirects under the URL policy, ranges and
resumes, retries with backoff, and credentials scrubbed from the HTTP
stack's logs."""

from __future__ import annotations

import email.utils
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urljoin

from cloudlets.errors import FetchError, IntegrityError
from cloudlets.fetch.policy import RetryPolicy, UrlPolicy
from cloudlets.fetch.sink import Sink
from cloudlets.progress import STAGE_FETCH, ProgressCallback
from cloudlets.urls import redact

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
        scrubbed = _scrub(message)
        if scrubbed != message:
            record.msg, record.args = scrubbed, ()
        return True


def _scrub(text: str) -> str:
    """Redact every URL in ``text``, and the query of every bare path."""
    text = re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"']+", lambda m: redact(m.group(0)), text)
    return re.sub(r"(?<![^\s\"'])/[^\s\"'?]*\?[^\s\"']*",
                  lambda m: redact("http://h" + m.group(0))[len("http://h"):], text)


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
    user_agent: str
    _shared_session: requests.Session | None
    _local: threading.local
    _sleep: Callable[[float], None]
    _rng: random.Random

    @property
    def session(self) -> requests.Session:
        """The HTTP session of the calling thread."""
        if self._shared_session is not None:
            return self._shared_session
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            import requests

            session = self._local.session = requests.Session()
        return session

    def _download(self, url: str, sink: Sink, progress: ProgressCallback,
                  stats: Stats) -> None:
        """Run the attempts for one HTTP URL, counting them in ``stats``."""
        policy = self.retry
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            stats.attempts += 1
            stats.resumes += 1 if sink.done else 0
            try:
                self._attempt(url, sink, progress)
                return
            except _Retryable as exc:
                elapsed = time.monotonic() - started
                wait = policy.delay(attempt - 1, exc.retry_after, self._rng)
                if attempt >= policy.attempts or elapsed + wait > policy.total_time:
                    why = (f"{attempt} attempts" if attempt >= policy.attempts
                           else f"retry budget of {policy.total_time:g}s")
                    raise FetchError(f"GET {redact(url)} failed after {why}: {exc}",
                                     url=redact(url), status=exc.status) from None
                log.info("GET %s: %s; attempt %d of %d in %.2fs", redact(url), exc,
                         attempt + 1, policy.attempts, wait)
                self._sleep(wait)

    def _attempt(self, url: str, sink: Sink, progress: ProgressCallback) -> None:
        """One request (following redirects) and its body, appended to ``sink``."""
        sink.check_cancelled()
        headers = {"User-Agent": self.user_agent, "Accept-Encoding": "identity"}
        offset = sink.done
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if sink.validator:
                headers["If-Range"] = sink.validator
        response = self._request(url, headers)
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
            import requests
            import urllib3

            chunks = _body(response, self.CHUNK_SIZE)
            while True:
                try:
                    chunk = next(chunks, None)
                except (requests.RequestException, urllib3.exceptions.HTTPError,
                        OSError) as exc:
                    raise _Retryable(f"connection lost after {sink.done} bytes: "
                                     f"{describe(exc)}") from None
                if chunk is None:
                    break
                sink.write(chunk)
                progress(STAGE_FETCH, sink.done, total)
            if total is not None and sink.done < total:
                raise _Retryable(f"body ended after {sink.done} of {total} bytes")

    def _request(self, url: str, headers: dict[str, str]) -> requests.Response:
        """Send a GET, following redirects by hand within the policy."""
        import requests

        seen = [url]
        current = url
        for _hop in range(self.policy.max_redirects + 1):
            try:
                response = self.session.get(current, headers=headers, stream=True,
                                            allow_redirects=False, timeout=self.timeout)
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
            problem = self.policy.problem(target)
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


def _body(response: requests.Response, chunk_size: int) -> Iterator[bytes]:
    """The body as sent: no content decoding, so a ``.tar.gz`` served with
    ``Content-Encoding: gzip`` keeps its bytes and its digest.

    Whole chunks are read (``read``, not ``read1``: one socket read returns
    some 64 KiB, and the per-call overhead halves the throughput). A read that
    times out loses its partial chunk; the resume starts after the last whole
    one. A connection closed early returns its partial chunk first."""
    raw = response.raw
    while True:
        chunk = raw.read(chunk_size, decode_content=False)
        if not chunk:
            return
        yield chunk


def describe(exc: BaseException) -> str:
    """A short reason, without the URL (which may hold credentials)."""
    text = _scrub(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
