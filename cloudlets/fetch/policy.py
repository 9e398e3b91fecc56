"""What may be fetched and how failures are retried: :class:`UrlPolicy`,
:class:`RetryPolicy`, and :func:`check_sha256` for the digest asked for."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from cloudlets.errors import ConfigurationError, FetchError
from cloudlets.urls import is_url, redact

__all__ = ["RetryPolicy", "UrlPolicy", "check_sha256"]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


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
