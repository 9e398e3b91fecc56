"""Mirror-aware download orchestration: :class:`Fetcher` tries each candidate
URL in turn, copies local files, and says what it did (:class:`FetchResult`)."""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from cloudlets.errors import ConfigurationError, FetchError, IntegrityError
from cloudlets.fetch.guard import Hop, Lifeline, police_session
from cloudlets.fetch.http import HttpTransport, Stats, install_scrubber
from cloudlets.fetch.policy import HostPort, RetryPolicy, UrlPolicy, check_sha256, url_port
from cloudlets.fetch.sink import Sink
from cloudlets.fetch.watch import DownloadCancelled, DownloadWatch
from cloudlets.mirrors import Candidate, MirrorRules
from cloudlets.progress import STAGE_FETCH, ProgressCallback, null_progress
from cloudlets.urls import is_url, redact

if TYPE_CHECKING:  # imported when a download over HTTP needs them (0.04 s)
    import requests

__all__ = ["FetchResult", "Fetcher"]

log = logging.getLogger(__package__)  # the logger of cloudlets.fetch, as before the split


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


def _local_path(url: str) -> Path:
    if not is_url(url):
        return Path(url)
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise FetchError(f"{redact(url)}: a file:// URL must not name a remote host "
                         f"({parts.netloc!r})", url=redact(url))
    return Path(unquote(parts.path))


#: Mirror rule sources the provider set: their mirrors are allowed.
TRUSTED_SOURCES = frozenset({"renderer", "presets"})


def _trusted(candidate: Candidate) -> tuple[HostPort, ...]:
    """:returns: the exception a provider's mirror gets: its own host and port."""
    if candidate.rule is None or candidate.rule.source not in TRUSTED_SOURCES \
            or not is_url(candidate.url):
        return ()
    parts = urlsplit(candidate.url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        return ()
    try:
        port = url_port(parts)
    except ValueError:
        return ()
    return (HostPort.parse(str(HostPort(parts.hostname, port))),)


class Fetcher(HttpTransport):
    """Downloads one tarball at a time into a local file, verified.

    A Fetcher may be shared by threads: unless ``session`` is given, each
    thread gets its own :class:`requests.Session` (connection reuse).

    Every connection is policed (:mod:`cloudlets.fetch.guard`): made to
    an address the policy allowed, checked again on every redirect hop, cut
    at once on cancel or at the deadline. Proxies and ``.netrc`` from the
    environment are not used.

    :param policy: which URLs may be fetched and which addresses reached:
        http and https to public addresses by default (:class:`UrlPolicy`).
    :param retry: how failures are retried.
    :param connect_timeout: seconds to wait for a connection.
    :param read_timeout: seconds to wait for any bytes from the server.
    :param deadline: seconds one :meth:`fetch` may take in all, mirrors,
        retries and redirects included; its connection is cut then.
    :param min_rate: bytes per second a response body must sustain over
        each ``min_rate_window`` seconds (``0`` for no minimum): a server
        trickling its body fails within one window.
    :param min_rate_window: the window of ``min_rate``, in seconds.
    :param session: one HTTP session for every thread (by default, a new one
        per thread); its connections are policed too.
    :param user_agent: the ``User-Agent`` header.
    :param sleep: how to wait between attempts (tests pass a fake clock); by
        default a wait that a cancel or the deadline ends early.
    """

    #: Bytes written at a time.
    CHUNK_SIZE = 1 << 20
    #: The default :attr:`deadline`, :attr:`min_rate` and :attr:`min_rate_window`.
    DEADLINE, MIN_RATE, MIN_RATE_WINDOW = 1800.0, 16384.0, 30.0

    def __init__(self, *, policy: UrlPolicy | None = None, retry: RetryPolicy | None = None,
                 connect_timeout: float = 10.0, read_timeout: float = 60.0,
                 deadline: float = DEADLINE, min_rate: float = MIN_RATE,
                 min_rate_window: float = MIN_RATE_WINDOW,
                 session: requests.Session | None = None,
                 user_agent: str = "cloudlets-fetch/1",
                 sleep: Callable[[float], None] | None = None) -> None:
        if connect_timeout <= 0 or read_timeout <= 0 or deadline <= 0 or min_rate_window <= 0:
            raise ConfigurationError("Fetcher timeouts, deadline and min_rate_window must be "
                                     "positive numbers of seconds")
        if min_rate < 0:
            raise ConfigurationError("Fetcher min_rate must not be negative")
        self.policy = policy or UrlPolicy()
        self.retry = retry or RetryPolicy()
        self.timeout = (connect_timeout, read_timeout)
        self.deadline = deadline
        self.min_rate = min_rate
        self.min_rate_window = min_rate_window
        self._shared_session = police_session(session) if session is not None else None
        install_scrubber()
        self._local = threading.local()
        self.user_agent = user_agent
        self._sleep = sleep
        self._rng = random.Random()

    # -- public API ---------------------------------------------------------

    def fetch(self, url: str, dest: str | os.PathLike[str], *, sha256: str,
              size: int | None = None, mirrors: MirrorRules | None = None,
              progress: ProgressCallback | None = None,
              watch: DownloadWatch | None = None) -> FetchResult:
        """Download ``url`` (or its mirrors) into ``dest`` and verify it.

        Candidates from ``mirrors.rewrite(url)`` are tried in order, the
        origin last; each gets the full :class:`RetryPolicy`, all of them
        together :attr:`deadline` seconds. A candidate the URL policy refuses
        is skipped. A mirror of a rule the provider set (source
        ``renderer`` or ``presets``, see
        :class:`~cloudlets.mirrors.MirrorRule`) is allowed whatever address
        its host has; a mirror a request set is policed like any URL.

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
        stats = Stats()
        line = Lifeline(self.deadline, self.min_rate, self.min_rate_window)
        if watch is not None:
            watch.on_cancel(line.cut)
        try:
            for candidate in candidates:
                allowed = _trusted(candidate)
                problem = self.policy.problem(candidate.url, allowed)
                if problem:
                    where = "mirror" if candidate.rule else "URL"
                    failures.append(FetchError(f"{where} {redact(candidate.url)} refused by "
                                               f"the URL policy: {problem}",
                                               url=redact(candidate.url)))
                    continue
                try:
                    digest, done = self._fetch_one(candidate, Path(dest), sha256, size,
                                                   progress or null_progress, stats, watch,
                                                   Hop(self.policy, allowed, line))
                except DownloadCancelled:
                    raise
                except (FetchError, IntegrityError) as exc:
                    failures.append(exc)
                    if line.reason is not None:
                        break  # past the deadline: no other candidate either
                    if not candidate.is_origin:
                        log.warning("mirror failed, trying the next candidate: %s", exc)
                    continue
                return FetchResult(redact(candidate.url), candidate.rule_dict(), digest, done,
                                   stats.attempts, stats.resumes)
        finally:
            line.close()
        raise self._combined(failures)

    # -- one candidate ------------------------------------------------------

    def _fetch_one(self, candidate: Candidate, dest: Path, sha256: str, size: int | None,
                   progress: ProgressCallback, stats: Stats,
                   watch: DownloadWatch | None, rules: Hop) -> tuple[str, int]:
        """:returns: the verified sha256 and size."""
        url = candidate.url
        sink = Sink(dest, url, sha256, size, watch)
        ok = False
        try:
            if not is_url(url) or urlsplit(url).scheme.lower() == "file":
                stats.attempts += 1
                self._copy_local(url, sink, progress)
                digest = sink.finish()
                ok = True
                return digest, sink.done
            resumes_before = stats.resumes
            self._download(url, sink, progress, stats, rules)
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
                self._download(url, sink, progress, stats, rules)
                digest = sink.finish()
            ok = True
            return digest, sink.done
        finally:
            sink.close()
            if not ok:
                dest.unlink(missing_ok=True)

    def _copy_local(self, url: str, sink: Sink, progress: ProgressCallback) -> None:
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
