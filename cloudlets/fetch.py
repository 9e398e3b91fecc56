"""Fetching tarballs: verified while streaming, resumable, retried, policed.

:class:`Fetcher` downloads one URL (``http``, ``https``, ``file://`` or a local
path) into a destination file and proves it is the expected content:

- the body is streamed in :attr:`Fetcher.CHUNK_SIZE` pieces, in constant memory;
- its sha256 (and its size, when known) is checked while it arrives: a body
  longer than the expected size is cut off at the first extra byte;
- a dropped connection is resumed with an HTTP ``Range`` request (guarded by
  ``If-Range``); a server that answers ``200`` instead restarts cleanly;
- connection errors, timeouts, 5xx and 429 are retried with exponential
  backoff and jitter, bounded in count and total time (:class:`RetryPolicy`);
- every request has a connect and a read timeout;
- the :class:`UrlPolicy` decides which schemes and hosts may be fetched, and
  every redirect is followed by hand, checked against the policy and bounded;
- on failure the destination file is removed, and the error
  (:class:`~cloudlets.errors.FetchError`,
  :class:`~cloudlets.errors.IntegrityError`) names the URL with its
  credentials redacted, the HTTP status and what was expected.

:meth:`Fetcher.fetch` also takes :class:`~cloudlets.mirrors.MirrorRules`: each
candidate URL is tried in order, the origin last.

A :class:`DownloadWatch` passed to :meth:`Fetcher.fetch` lets another thread
read the download while it lands (:meth:`DownloadWatch.reader`); nothing it
reads is verified until the fetch returns.
"""

from __future__ import annotations

import email.utils
import hashlib
import io
import logging
import os
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import unquote, urljoin, urlsplit

from cloudlets.errors import ConfigurationError, FetchError, IntegrityError
from cloudlets.mirrors import Candidate, MirrorRules
from cloudlets.progress import STAGE_FETCH, ProgressCallback, null_progress
from cloudlets.urls import is_url, redact

if TYPE_CHECKING:  # imported when a download over HTTP needs them (0.04 s)
    import requests

__all__ = ["DownloadCancelled", "DownloadRestarted", "DownloadWatch", "FetchResult", "Fetcher",
           "RetryPolicy", "UrlPolicy"]

log = logging.getLogger(__name__)


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


def _install_scrubber() -> None:
    for name in ("urllib3.connectionpool", "urllib3.connection", "urllib3.response"):
        logger = logging.getLogger(name)
        if _SCRUB not in logger.filters:
            logger.addFilter(_SCRUB)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def check_sha256(value: str) -> str:
    """:returns: ``value`` lower-cased.

    :raises ConfigurationError: when it is not 64 hex digits.
    """
    low = value.lower() if isinstance(value, str) else ""
    if not _SHA256.match(low):
        raise ConfigurationError(f"{value!r} is not a sha256 digest (64 hex digits)")
    return low


@dataclass(frozen=True)
class RetryPolicy:
    """How failed requests are retried.

    Attempt *n* (from 0) that fails waits ``uniform(0, min(max_delay,
    backoff * factor ** n))`` seconds ("full jitter") before the next, or the
    server's ``Retry-After`` when it is longer (capped by ``max_delay``). No
    new attempt starts once ``total_time`` seconds have passed since the
    first, or after ``attempts`` attempts in all.

    Retried: connection errors, timeouts, a body cut short, and the statuses
    in ``retry_statuses`` (429 and every 5xx but 501 and 505, which are
    permanent). Anything else fails at once.

    :ivar attempts: most attempts per URL, first included (1 = no retry).
    :ivar backoff: the base delay, in seconds.
    :ivar factor: growth of the delay per attempt.
    :ivar max_delay: longest single wait, in seconds.
    :ivar total_time: no attempt starts later than this after the first one.
    :ivar retry_statuses: the HTTP statuses worth another attempt.
    """

    attempts: int = 5
    backoff: float = 0.5
    factor: float = 2.0
    max_delay: float = 30.0
    total_time: float = 300.0
    retry_statuses: frozenset[int] = field(default_factory=lambda: frozenset(
        {429} | set(range(500, 600)) - {501, 505}))

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigurationError(
                f"RetryPolicy.attempts must be at least 1, not {self.attempts}")
        for name in ("backoff", "factor", "max_delay", "total_time"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"RetryPolicy.{name} must not be negative")

    def delay(self, attempt: int, retry_after: float | None = None,
              rng: random.Random | None = None) -> float:
        """:returns: the seconds to wait after failed attempt ``attempt`` (from 0).

        :param attempt: how many attempts failed before this one, minus one.
        :param retry_after: the server's ``Retry-After``, in seconds, if any.
        :param rng: the random source for the jitter.
        """
        ceiling = min(self.max_delay, self.backoff * self.factor ** attempt)
        wait = (rng or random).uniform(0, ceiling)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_delay))
        return wait


@dataclass(frozen=True)
class UrlPolicy:
    """Which URLs may be fetched.

    :ivar schemes: allowed URL schemes. ``file`` (which also covers plain
        local paths) is refused unless listed, or unless ``allow_file`` is set.
    :ivar allow_file: shorthand to add ``file`` to ``schemes``.
    :ivar hosts: when set, the only host names allowed; an entry starting
        with a dot (``.example.com``) allows every subdomain of it.
    :ivar max_redirects: most redirects followed for one request.
    """

    schemes: frozenset[str] = frozenset({"http", "https"})
    allow_file: bool = False
    hosts: frozenset[str] | None = None
    max_redirects: int = 5

    def __post_init__(self) -> None:
        schemes = frozenset(s.lower() for s in self.schemes)
        if self.allow_file:
            schemes |= {"file"}
        unknown = schemes - {"http", "https", "file"}
        if unknown:
            raise ConfigurationError(f"UrlPolicy: unsupported schemes {sorted(unknown)} "
                                     "(supported: file, http, https)")
        object.__setattr__(self, "schemes", schemes)
        if self.hosts is not None:
            object.__setattr__(self, "hosts", frozenset(h.lower() for h in self.hosts))
        if self.max_redirects < 0:
            raise ConfigurationError("UrlPolicy.max_redirects must not be negative")

    def problem(self, url: str) -> str | None:
        """:returns: why ``url`` is refused, or ``None`` when it is allowed."""
        scheme = urlsplit(url).scheme.lower() if is_url(url) else "file"
        if scheme not in self.schemes:
            return (f"scheme {scheme!r} is not allowed (allowed: "
                    f"{', '.join(sorted(self.schemes))})")
        if scheme == "file" or self.hosts is None:
            return None
        host = (urlsplit(url).hostname or "").lower()
        if host in self.hosts or any(h.startswith(".") and host.endswith(h) for h in self.hosts):
            return None
        return f"host {host!r} is not in the allowed hosts"

    def check(self, url: str, what: str = "URL") -> None:
        """:raises FetchError: when ``url`` is refused, naming why."""
        problem = self.problem(url)
        if problem:
            raise FetchError(f"{what} {redact(url)} refused by the URL policy: {problem}",
                             url=redact(url))


@dataclass(frozen=True)
class FetchResult:
    """What :meth:`Fetcher.fetch` did.

    :ivar url: the URL the content came from, credentials redacted.
    :ivar mirror_rule: the mirror rule used (``{"prefix", "mirror",
        "source"}``), or ``None`` when the origin served it.
    :ivar sha256: the verified digest.
    :ivar size: the verified size in bytes.
    :ivar attempts: requests made, across candidates and retries.
    :ivar resumed: how many times a download resumed with ``Range``.
    """

    url: str
    mirror_rule: dict[str, Any] | None
    sha256: str
    size: int
    attempts: int
    resumed: int


@dataclass
class _Stats:
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


class DownloadRestarted(FetchError):
    """A download being followed started over (a server ignored ``Range``,
    or the next mirror was tried) after the reader had taken bytes of the
    first attempt: read the finished file instead."""


class DownloadCancelled(FetchError):
    """The reader no longer wants the download (:meth:`DownloadWatch.cancel`)."""


class DownloadWatch:
    """The progress of one download into its file, so that another thread
    can read the bytes already written while the rest arrives.

    The fetching side (:class:`_Sink`, then whoever runs the fetch) reports
    each file it (re)creates, each chunk written and the end; readers block
    until the bytes they want are there. A reader gets the bytes as written,
    unverified: the digest is known only when the fetch is over, so act on
    what was read only after the caller's verdict (:meth:`CacheEntry.wait
    <cloudlets.cache.CacheEntry.wait>`). A read asking for more than has
    arrived waits for it or for the end, and the end comes with the
    verdict: a reader that reads to EOF gets the download's failure
    instead of its last bytes.
    Readers read through descriptors of their own, so a rename or unlink
    of the file does not disturb them. :meth:`close` when done.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._fd: int | None = None
        self._written = 0
        #: Bumped whenever the file is created or truncated again.
        self._generation = 0
        self._done = False
        self._error: BaseException | None = None
        self.cancelled = False

    # -- the fetching side --------------------------------------------------

    def created(self, fd: int) -> None:
        """The file was (re)created or truncated, empty; ``fd`` (a readable
        descriptor of it, now owned by the watch) reads it from now on."""
        with self._cond:
            self._close_fd()
            self._fd = fd
            self._written = 0
            self._generation += 1
            self._cond.notify_all()

    def advance(self, count: int) -> None:
        """``count`` more bytes are in the file, readable by another descriptor."""
        with self._cond:
            self._written += count
            self._cond.notify_all()

    def finish(self, error: BaseException | None = None) -> None:
        """The download is over: complete and verified, or failed with ``error``."""
        with self._cond:
            self._done = True
            self._error = error
            self._cond.notify_all()

    # -- the reading side ---------------------------------------------------

    def cancel(self) -> None:
        """Ask the fetch to stop: its next chunk raises :class:`DownloadCancelled`."""
        with self._cond:
            self.cancelled = True
            self._cond.notify_all()

    def reader(self) -> _Follower:
        """:returns: a binary file object reading the download from its start,
        blocking for bytes not written yet; it ends where the finished
        download ends and raises the download's failure, or
        :class:`DownloadRestarted` when the download started over after
        bytes were read."""
        return _Follower(self)

    def close(self) -> None:
        """Release the watch's descriptor (readers keep their own)."""
        with self._cond:
            self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _available(self, position: int, want: int, generation: int) \
            -> tuple[int, int, int | None]:
        """Wait until ``want`` bytes past ``position`` are written, or the
        download is over. :returns: how many are readable, the generation,
        and for a reader of an older generation a new descriptor of the
        file (its own, to close)."""
        with self._cond:
            while True:
                if self._generation != generation and position:
                    raise DownloadRestarted(
                        "the download started over after "
                        f"{position} bytes had been read from it")
                if self._error is not None:
                    raise self._error
                if self._written - position >= want or self._done:
                    break
                self._cond.wait()
            fd = None
            if self._generation != generation and self._fd is not None:
                fd = os.dup(self._fd)
            return max(0, min(want, self._written - position)), self._generation, fd


class _Follower(io.RawIOBase):
    """Reads a :class:`DownloadWatch`'s file as it grows (see
    :meth:`DownloadWatch.reader`)."""

    def __init__(self, watch: DownloadWatch) -> None:
        super().__init__()
        self._watch = watch
        self._position = 0
        self._generation = 0
        self._fd: int | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        count, generation, fd = self._watch._available(self._position, len(view),
                                                       self._generation)
        if generation != self._generation:  # nothing read yet: read the new file
            self._close_fd()
            self._generation, self._fd = generation, fd
        if count == 0 or self._fd is None:
            return 0
        got = os.preadv(self._fd, [view[:count]], self._position)
        if got < count:  # truncated under us: the download started over
            raise DownloadRestarted(f"the download shrank under its reader at byte "
                                    f"{self._position + got}")
        self._position += got
        return got

    def close(self) -> None:
        self._close_fd()
        super().close()

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _Sink:
    """The destination file with its running digest and byte count.

    Hashing and writing run on two worker threads, each fed the same chunks
    through a short queue, so they overlap with each other and with reading
    the socket (``hashlib`` and file writes release the GIL): memory stays
    bounded by twice ``QUEUE_DEPTH`` chunks. The size bound is checked as
    chunks arrive, before they are queued.
    """

    #: Chunks waiting to be hashed, and to be written, at most.
    QUEUE_DEPTH = 4

    def __init__(self, path: Path, url: str, sha256: str, size: int | None,
                 watch: DownloadWatch | None = None) -> None:
        self.path = path
        self.watch = watch
        self.url = url
        self.expected_sha256 = sha256
        self.expected_size = size
        try:
            # readable too: a watch's readers follow it through a duplicate
            self.file: IO[bytes] = open(path, "w+b")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise FetchError(f"cannot write the download of {redact(url)} to {path}: "
                             f"{exc.strerror}", url=redact(url)) from None
        if watch is not None:
            watch.created(os.dup(self.file.fileno()))
        self.hasher = hashlib.sha256()
        self.done = 0
        #: ETag or Last-Modified of the bytes written so far, for ``If-Range``.
        self.validator: str | None = None
        self._workers: list[tuple[threading.Thread, queue.Queue[bytes | None]]] = []
        self._error: Exception | None = None

    def restart(self) -> None:
        self._drain()
        self.file.seek(0)
        self.file.truncate()
        if self.watch is not None:
            self.watch.created(os.dup(self.file.fileno()))
        self.hasher = hashlib.sha256()
        self.done = 0
        self.validator = None

    def write(self, chunk: bytes) -> None:
        self.check_cancelled()
        if self.expected_size is not None and self.done + len(chunk) > self.expected_size:
            raise IntegrityError(
                f"{redact(self.url)}: more data than the expected {self.expected_size} bytes",
                url=redact(self.url), expected=str(self.expected_size),
                actual=f"more than {self.expected_size} bytes")
        self._raise_error()
        if not self._workers:
            for name, task in (("hash", self._hash), ("write", self._write)):
                work: queue.Queue[bytes | None] = queue.Queue(self.QUEUE_DEPTH)
                thread = threading.Thread(target=self._run, args=(task, work),
                                          name=f"cloudlets-fetch-{name}", daemon=True)
                thread.start()
                self._workers.append((thread, work))
        for _, work in self._workers:
            work.put(chunk)
        self.done += len(chunk)

    def check_cancelled(self) -> None:
        if self.watch is not None and self.watch.cancelled:
            raise DownloadCancelled(f"download of {redact(self.url)} cancelled by its reader",
                                    url=redact(self.url))

    def finish(self) -> str:
        """Check size and digest; flush Python's buffer (durability, ``fsync``,
        is the caller's business: the cache does it before its rename).

        :returns: the digest.
        :raises IntegrityError: on a mismatch.
        :raises FetchError: when the file could not be written.
        """
        self._drain()
        self._raise_error()
        where = redact(self.url)
        if self.expected_size is not None and self.done != self.expected_size:
            raise IntegrityError(
                f"{where}: size mismatch: expected {self.expected_size} bytes, got {self.done}",
                url=where, expected=str(self.expected_size), actual=str(self.done))
        actual = self.hasher.hexdigest()
        if actual != self.expected_sha256:
            raise IntegrityError(
                f"{where}: sha256 mismatch: expected {self.expected_sha256}, got {actual} "
                f"({self.done} bytes)", url=where, expected=self.expected_sha256, actual=actual)
        self.file.flush()
        return actual

    def close(self) -> None:
        self._drain()
        self.file.close()

    def _hash(self, chunk: bytes) -> None:
        self.hasher.update(chunk)

    def _write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        if self.watch is not None:  # readable through another descriptor from now on
            self.file.flush()
            self.watch.advance(len(chunk))

    def _run(self, task: Callable[[bytes], None], work: queue.Queue[bytes | None]) -> None:
        while (chunk := work.get()) is not None:
            if self._error is None:
                try:
                    task(chunk)
                except Exception as exc:  # noqa: BLE001 - re-raised by the reading thread
                    self._error = exc

    def _drain(self) -> None:
        """Wait until every queued chunk is hashed and written."""
        for _, work in self._workers:
            work.put(None)
        for thread, _ in self._workers:
            thread.join()
        self._workers = []

    def _raise_error(self) -> None:
        if self._error is not None:
            reason = getattr(self._error, "strerror", None) or self._error
            raise FetchError(f"cannot write the download of {redact(self.url)} to {self.path}: "
                             f"{reason}", url=redact(self.url))


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


def _local_path(url: str) -> Path:
    if not is_url(url):
        return Path(url)
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise FetchError(f"{redact(url)}: a file:// URL must not name a remote host "
                         f"({parts.netloc!r})", url=redact(url))
    return Path(unquote(parts.path))


class Fetcher:
    """Downloads one tarball at a time into a local file, verified.

    A Fetcher may be shared by threads: unless ``session`` is given, each
    thread gets its own :class:`requests.Session` (connection reuse).

    :param policy: which URLs may be fetched; http and https by default.
    :param retry: how failures are retried.
    :param connect_timeout: seconds to wait for a connection.
    :param read_timeout: seconds to wait for any bytes from the server.
    :param session: one HTTP session for every thread (by default, a new one
        per thread).
    :param user_agent: the ``User-Agent`` header.
    :param sleep: how to wait between attempts (tests pass a fake clock).
    """

    #: Bytes read and written at a time.
    CHUNK_SIZE = 1 << 20

    def __init__(self, *, policy: UrlPolicy | None = None, retry: RetryPolicy | None = None,
                 connect_timeout: float = 10.0, read_timeout: float = 60.0,
                 session: requests.Session | None = None,
                 user_agent: str = "cloudlets-fetch/1",
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if connect_timeout <= 0 or read_timeout <= 0:
            raise ConfigurationError("Fetcher timeouts must be positive numbers of seconds")
        self.policy = policy or UrlPolicy()
        self.retry = retry or RetryPolicy()
        self.timeout = (connect_timeout, read_timeout)
        self._shared_session = session
        _install_scrubber()
        self._local = threading.local()
        self.user_agent = user_agent
        self._sleep = sleep
        self._rng = random.Random()

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

    # -- public API ---------------------------------------------------------

    def fetch(self, url: str, dest: str | os.PathLike[str], *, sha256: str,
              size: int | None = None, mirrors: MirrorRules | None = None,
              progress: ProgressCallback | None = None,
              watch: DownloadWatch | None = None) -> FetchResult:
        """Download ``url`` (or its mirrors) into ``dest`` and verify it.

        Candidates from ``mirrors.rewrite(url)`` are tried in order, the
        origin last; each gets the full :class:`RetryPolicy`. A candidate the
        URL policy refuses is skipped.

        :param url: ``http(s)://``, ``file://`` URL or local path.
        :param dest: the file to write; replaced. Removed again on failure.
        :param sha256: the expected digest (64 hex digits).
        :param size: the expected size in bytes, when known.
        :param mirrors: mirror rules to apply to ``url``.
        :param progress: called with ``(STAGE_FETCH, done, total)``.
        :param watch: told of every byte written to ``dest``, so that another
            thread can read it meanwhile; the caller calls
            :meth:`DownloadWatch.finish` once this returns or raises.
        :returns: what was fetched, from where.
        :raises FetchError: when no candidate could be downloaded.
        :raises IntegrityError: when every candidate that answered served the
            wrong content (digest or size).
        :raises ConfigurationError: when ``sha256`` is not a digest.
        """
        sha256 = check_sha256(sha256)
        if size is not None and size < 0:
            raise ConfigurationError(f"expected size must not be negative, not {size}")
        candidates = (mirrors or MirrorRules()).rewrite(url)
        failures: list[Exception] = []
        stats = _Stats()
        for candidate in candidates:
            problem = self.policy.problem(candidate.url)
            if problem:
                where = "mirror" if candidate.rule else "URL"
                failures.append(FetchError(f"{where} {redact(candidate.url)} refused by the "
                                           f"URL policy: {problem}", url=redact(candidate.url)))
                continue
            try:
                digest, done = self._fetch_one(candidate, Path(dest), sha256, size,
                                               progress or null_progress, stats, watch)
            except DownloadCancelled:
                raise
            except (FetchError, IntegrityError) as exc:
                failures.append(exc)
                if not candidate.is_origin:
                    log.warning("mirror failed, trying the next candidate: %s", exc)
                continue
            return FetchResult(redact(candidate.url), candidate.rule_dict(), digest, done,
                               stats.attempts, stats.resumes)
        raise self._combined(failures)

    def read(self, url: str, *, max_bytes: int, what: str = "document") -> bytes | None:
        """GET a small document whole (a manifest's ``.sig``): within the URL
        policy, redirects included, one attempt, at most ``max_bytes``, the
        whole body within the read timeout.

        :param url: an ``http(s)://`` URL.
        :param max_bytes: the largest body accepted.
        :param what: what the document is, for messages.
        :returns: the body, or ``None`` when the server answers 404 or 410.
        :raises FetchError: the URL or a redirect is refused, the request
            fails, another status is returned, or the body is too large.
        """
        import requests
        import urllib3

        shown = redact(url)
        if not url.startswith(("http://", "https://")):
            raise FetchError(f"{what} {shown}: only http and https URLs are read", url=shown)
        self.policy.check(url, what)
        try:
            response = self._request(url, {"User-Agent": self.user_agent,
                                           "Accept-Encoding": "identity"})
        except _Retryable as exc:
            raise FetchError(f"GET {shown} ({what}) failed: {exc}", url=shown) from None
        with response:
            if response.status_code in (404, 410):
                return None
            if response.status_code != 200:
                raise FetchError(f"GET {shown} ({what}) failed: HTTP {response.status_code}",
                                 url=shown, status=response.status_code)
            body = bytearray()
            # the read timeout bounds the whole body, not each byte: a server
            # dripping a byte a second cannot hold the render in prepare
            deadline = time.monotonic() + self.timeout[1]
            try:
                while chunk := response.raw.read1(64 * 1024, decode_content=False):
                    body += chunk
                    if len(body) > max_bytes:
                        raise FetchError(f"GET {shown}: the {what} is larger than "
                                         f"{max_bytes} bytes", url=shown, status=200)
                    if time.monotonic() > deadline:
                        raise FetchError(f"GET {shown}: the {what} took longer than "
                                         f"{self.timeout[1]:g} s to arrive", url=shown,
                                         status=200)
            except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
                raise FetchError(f"GET {shown} ({what}) failed: {_describe(exc)}",
                                 url=shown) from None
        return bytes(body)

    # -- one candidate ------------------------------------------------------

    def _fetch_one(self, candidate: Candidate, dest: Path, sha256: str, size: int | None,
                   progress: ProgressCallback, stats: _Stats,
                   watch: DownloadWatch | None) -> tuple[str, int]:
        """:returns: the verified sha256 and size."""
        url = candidate.url
        sink = _Sink(dest, url, sha256, size, watch)
        ok = False
        try:
            if not is_url(url) or urlsplit(url).scheme.lower() == "file":
                stats.attempts += 1
                self._copy_local(url, sink, progress)
                digest = sink.finish()
                ok = True
                return digest, sink.done
            resumes_before = stats.resumes
            self._download(url, sink, progress, stats)
            try:
                digest = sink.finish()
            except IntegrityError:
                if stats.resumes == resumes_before:
                    raise
                # The pieces may come from two versions of the file (a server
                # without validators): try once more in one piece.
                log.warning("GET %s: resumed download failed verification; fetching it "
                            "again in one piece", redact(url))
                sink.restart()
                self._download(url, sink, progress, stats)
                digest = sink.finish()
            ok = True
            return digest, sink.done
        finally:
            sink.close()
            if not ok:
                dest.unlink(missing_ok=True)

    def _copy_local(self, url: str, sink: _Sink, progress: ProgressCallback) -> None:
        path = _local_path(url)
        try:
            with open(path, "rb") as src:
                total = os.fstat(src.fileno()).st_size
                if sink.expected_size is not None and total != sink.expected_size:
                    raise IntegrityError(
                        f"{redact(url)}: size mismatch: expected {sink.expected_size} bytes, "
                        f"the file has {total}", url=redact(url),
                        expected=str(sink.expected_size), actual=str(total))
                while chunk := src.read(self.CHUNK_SIZE):
                    sink.write(chunk)
                    progress(STAGE_FETCH, sink.done, total)
        except OSError as exc:
            raise FetchError(f"cannot read {redact(url)}: {exc.strerror or exc}",
                             url=redact(url)) from None

    def _download(self, url: str, sink: _Sink, progress: ProgressCallback,
                  stats: _Stats) -> None:
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

    def _attempt(self, url: str, sink: _Sink, progress: ProgressCallback) -> None:
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
                                     f"{_describe(exc)}") from None
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
                raise _Retryable(f"timed out: {_describe(exc)}") from None
            except requests.ConnectionError as exc:
                raise _Retryable(f"connection failed: {_describe(exc)}") from None
            except requests.RequestException as exc:
                raise FetchError(f"GET {redact(current)} failed: {_describe(exc)}",
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

    @staticmethod
    def _combined(failures: list[Exception]) -> Exception:
        """One error for every failed candidate: the type and facts of the
        last one (the origin), a message listing them all."""
        last = failures[-1]
        if len(failures) == 1:
            return last
        lines = "\n".join(f"  - {f}" for f in failures)
        message = f"every candidate URL failed:\n{lines}"
        if isinstance(last, IntegrityError):
            return IntegrityError(message, url=last.url, expected=last.expected,
                                  actual=last.actual)
        assert isinstance(last, FetchError)
        return FetchError(message, url=last.url, status=last.status)


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


def _describe(exc: BaseException) -> str:
    """A short reason, without the URL (which may hold credentials)."""
    text = _scrub(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
