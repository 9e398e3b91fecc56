"""The Fetcher against a real HTTP server on 127.0.0.1 that injects faults."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cloudlets.errors import ConfigurationError, FetchError, IntegrityError
from cloudlets.fetch import Fetcher, RetryPolicy, UrlPolicy
from cloudlets.mirrors import MirrorRules
from tests.httpfaults import FaultServer, Route
from tests.netpolicy import loopback_policy

BODY = os.urandom(3 * 1024 * 1024 + 123)
SHA = hashlib.sha256(BODY).hexdigest()


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        yield srv


class Clock:
    """Records the waits a Fetcher asks for, without waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def fetcher(clock: Clock | None = None, **kwargs: object) -> Fetcher:
    kwargs.setdefault("connect_timeout", 2.0)
    kwargs.setdefault("read_timeout", 2.0)
    kwargs.setdefault("retry", RetryPolicy(attempts=4, backoff=0.01, max_delay=0.05,
                                           total_time=10))
    kwargs.setdefault("policy", loopback_policy())
    return Fetcher(sleep=clock or Clock(), **kwargs)  # type: ignore[arg-type]


def test_fetch_verifies_and_reports_progress(server: FaultServer, tmp_path: Path) -> None:
    route = server.add("/t.tar", Route(BODY))
    seen: list[tuple[str, int, int | None]] = []
    dest = tmp_path / "out"
    result = fetcher().fetch(server.url("/t.tar"), dest, sha256=SHA, size=len(BODY),
                             progress=lambda *a: seen.append(a))
    assert dest.read_bytes() == BODY
    assert (result.sha256, result.size, result.attempts, result.resumed) == \
        (SHA, len(BODY), 1, 0)
    assert result.mirror_rule is None and result.url == server.url("/t.tar")
    assert seen[-1] == ("fetch", len(BODY), len(BODY))
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(seen))
    assert route.full_bodies == 1
    assert route.headers[0]["Accept-Encoding"] == "identity"


def test_fetch_without_size_uses_content_length(server: FaultServer, tmp_path: Path) -> None:
    server.add("/t.tar", Route(BODY))
    seen: list[int | None] = []
    fetcher().fetch(server.url("/t.tar"), tmp_path / "out", sha256=SHA,
                    progress=lambda s, d, t: seen.append(t))
    assert seen[-1] == len(BODY)


def test_dropped_connection_resumes_with_range(server: FaultServer, tmp_path: Path) -> None:
    route = server.add("/t.tar", Route(BODY, drop_after=1_000_000))
    result = fetcher().fetch(server.url("/t.tar"), tmp_path / "out", sha256=SHA,
                             size=len(BODY))
    assert (tmp_path / "out").read_bytes() == BODY
    assert result.attempts == 2 and result.resumed == 1
    assert route.headers[1]["Range"] == "bytes=1000000-"
    assert route.headers[1]["If-Range"] == '"v1"'
    assert route.bytes_sent == len(BODY)  # nothing was sent twice


def test_range_unsupported_restarts_cleanly(server: FaultServer, tmp_path: Path) -> None:
    route = server.add("/t.tar", Route(BODY, drop_after=1_000_000, ranges=False, etag=None))
    seen: list[int] = []
    fetcher().fetch(server.url("/t.tar"), tmp_path / "out", sha256=SHA, size=len(BODY),
                    progress=lambda s, d, t: seen.append(d))
    assert (tmp_path / "out").read_bytes() == BODY
    assert route.requests == 2 and route.full_bodies == 1
    assert 0 in seen  # the progress went back to the start


def test_changed_validator_restarts(server: FaultServer, tmp_path: Path) -> None:
    # The ETag changes between the two requests: If-Range makes the server send it all.
    route = server.add("/t.tar", Route(BODY, drop_after=500_000, next_etag='"v2"'))
    result = fetcher().fetch(server.url("/t.tar"), tmp_path / "out", sha256=SHA,
                             size=len(BODY))
    assert (tmp_path / "out").read_bytes() == BODY
    assert route.headers[1]["If-Range"] == '"v1"'
    assert route.full_bodies == 1 and route.requests == 2 and result.attempts == 2


def test_stalled_server_times_out_within_bounds(server: FaultServer, tmp_path: Path) -> None:
    route = server.add("/t.tar", Route(BODY, stall_after=100_000, fault_count=None))
    fetch = fetcher(read_timeout=0.3, retry=RetryPolicy(attempts=2, backoff=0, total_time=5))
    started = time.monotonic()
    with pytest.raises(FetchError) as info:
        fetch.fetch(server.url("/t.tar"), tmp_path / "out", sha256=SHA, size=len(BODY))
    assert time.monotonic() - started < 5
    assert "after 2 attempts" in str(info.value) and "Timeout" in str(info.value)
    assert server.url("/t.tar") in str(info.value)
    assert route.requests == 2
    assert not (tmp_path / "out").exists()


def test_stall_then_success_resumes(server: FaultServer, tmp_path: Path) -> None:
    # The stall hits the second chunk: every byte before it is kept, the resume
    # starts after the last one.
    route = server.add("/t.tar", Route(BODY, stall_after=Fetcher.CHUNK_SIZE + 200_000))
    fetcher(read_timeout=0.3).fetch(server.url("/t.tar"), tmp_path / "out", sha256=SHA)
    assert (tmp_path / "out").read_bytes() == BODY
    assert route.headers[1]["Range"] == f"bytes={Fetcher.CHUNK_SIZE + 200_000}-"


def test_wrong_content_is_an_integrity_error(server: FaultServer, tmp_path: Path) -> None:
    route = server.add("/t.tar", Route(b"not the tarball" * 1000))
    with pytest.raises(IntegrityError) as info:
        fetcher().fetch(server.url("/t.tar"), tmp_path / "out", sha256=SHA)
    error = info.value
    assert error.expected == SHA and error.actual == route.sha256
    assert "sha256 mismatch" in str(error) and SHA in str(error)
    assert error.url == server.url("/t.tar")
    assert not (tmp_path / "out").exists()
    assert route.requests == 1  # content errors are not retried


@pytest.mark.parametrize("statuses", [[500], [503, 500], [502, 504, 503]])
def test_5xx_then_success(server: FaultServer, tmp_path: Path, statuses: list[int]) -> None:
    route = server.add("/t.tar", Route(BODY, statuses=statuses))
    clock = Clock()
    result = fetcher(clock).fetch(server.url("/t.tar"), tmp_path / "out", sha256=SHA)
    assert result.attempts == len(statuses) + 1
    assert route.requests == len(statuses) + 1 and route.full_bodies == 1
    assert len(clock.waits) == len(statuses)


def test_429_honours_retry_after(server: FaultServer, tmp_path: Path) -> None:
    server.add("/t.tar", Route(BODY, statuses=[429], retry_after="2"))
    clock = Clock()
    fetch = fetcher(clock, retry=RetryPolicy(attempts=3, backoff=0.01, max_delay=10))
    fetch.fetch(server.url("/t.tar"), tmp_path / "out", sha256=SHA)
    assert clock.waits == [2.0]


def test_retry_after_beyond_budget_fails_at_once(server: FaultServer, tmp_path: Path) -> None:
    server.add("/t.tar", Route(BODY, statuses=[429], retry_after="3600"))
    clock = Clock()
    fetch = fetcher(clock, retry=RetryPolicy(attempts=3, max_delay=3600, total_time=60))
    with pytest.raises(FetchError) as info:
        fetch.fetch(server.url("/t.tar"), tmp_path / "out", sha256=SHA)
    assert info.value.status == 429 and "retry budget of 60s" in str(info.value)
    assert clock.waits == []


def test_retries_are_bounded(server: FaultServer, tmp_path: Path) -> None:
    route = server.add("/t.tar", Route(BODY, statuses=[503] * 10))
    clock = Clock()
    with pytest.raises(FetchError) as info:
        fetcher(clock).fetch(server.url("/t.tar"), tmp_path / "out", sha256=SHA)
    assert route.requests == 4 and len(clock.waits) == 3
    assert info.value.status == 503 and "HTTP 503" in str(info.value)
    assert all(0 <= w <= 0.05 for w in clock.waits)


@pytest.mark.parametrize("status", [404, 403, 501])
def test_permanent_statuses_fail_at_once(server: FaultServer, tmp_path: Path,
                                         status: int) -> None:
    route = server.add("/t.tar", Route(BODY, statuses=[status]))
    with pytest.raises(FetchError) as info:
        fetcher().fetch(server.url("/t.tar"), tmp_path / "out", sha256=SHA)
    assert info.value.status == status and route.requests == 1
    assert f"HTTP {status}" in str(info.value) and "expected 200" in str(info.value)


def test_connection_refused_is_retried_then_fails(tmp_path: Path) -> None:
    with FaultServer() as srv:
        url = srv.url("/gone")
    clock = Clock()
    with pytest.raises(FetchError) as info:
        fetcher(clock).fetch(url, tmp_path / "out", sha256=SHA)
    assert "connection failed" in str(info.value) and len(clock.waits) == 3


def test_redirect_is_followed(server: FaultServer, tmp_path: Path) -> None:
    server.add("/t.tar", Route(BODY))
    server.add("/old", Route(b"", redirect="/t.tar"))
    fetcher().fetch(server.url("/old"), tmp_path / "out", sha256=SHA)
    assert (tmp_path / "out").read_bytes() == BODY


def test_redirect_loop(server: FaultServer, tmp_path: Path) -> None:
    server.add("/a", Route(b"", redirect="/b"))
    server.add("/b", Route(b"", redirect="/a"))
    with pytest.raises(FetchError, match="redirect loop"):
        fetcher().fetch(server.url("/a"), tmp_path / "out", sha256=SHA)


def test_redirect_count_is_bounded(server: FaultServer, tmp_path: Path) -> None:
    for i in range(10):
        server.add(f"/r{i}", Route(b"", redirect=f"/r{i + 1}"))
    with pytest.raises(FetchError, match="more than 3 redirects"):
        fetcher(policy=loopback_policy(max_redirects=3)).fetch(server.url("/r0"), tmp_path / "out",
                                                          sha256=SHA)
    assert server._server.routes["/r4"].requests == 0


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/x",
                                    "http://example.invalid/x"])
def test_redirect_outside_policy_is_refused(server: FaultServer, tmp_path: Path,
                                            target: str) -> None:
    server.add("/a", Route(b"", redirect=target))
    policy = loopback_policy(allow_file=False, hosts=frozenset({"127.0.0.1"}))
    with pytest.raises(FetchError, match="refused by the URL policy") as info:
        fetcher(policy=policy).fetch(server.url("/a"), tmp_path / "out", sha256=SHA)
    assert info.value.status == 302


def test_host_allowlist(server: FaultServer, tmp_path: Path) -> None:
    server.add("/t.tar", Route(BODY))
    policy = UrlPolicy(hosts=frozenset({".example.com"}))
    with pytest.raises(FetchError, match=re.escape("host '127.0.0.1' is not in the allowed")):
        fetcher(policy=policy).fetch(server.url("/t.tar"), tmp_path / "out", sha256=SHA)
    assert server._server.routes["/t.tar"].requests == 0
    assert policy.problem("https://a.example.com/x") is None
    assert policy.problem("https://example.com.evil.org/x") is not None


def test_more_bytes_than_announced_size(server: FaultServer, tmp_path: Path) -> None:
    server.add("/t.tar", Route(BODY, extra=b"x" * 10_000_000, length="announce"))
    with pytest.raises(IntegrityError, match="Content-Length") as info:
        fetcher().fetch(server.url("/t.tar"), tmp_path / "out", sha256=SHA, size=len(BODY))
    assert info.value.expected == str(len(BODY))


def test_more_bytes_than_size_without_length(server: FaultServer, tmp_path: Path) -> None:
    route = server.add("/t.tar", Route(BODY, extra=b"x" * 50_000_000, length="none"))
    with pytest.raises(IntegrityError, match="more data than the expected"):
        fetcher().fetch(server.url("/t.tar"), tmp_path / "out", sha256=SHA, size=len(BODY))
    assert not (tmp_path / "out").exists()
    assert route.requests == 1


def test_body_without_length_is_read_to_the_end(server: FaultServer, tmp_path: Path) -> None:
    server.add("/t.tar", Route(BODY, length="none"))
    fetcher().fetch(server.url("/t.tar"), tmp_path / "out", sha256=SHA, size=len(BODY))
    assert (tmp_path / "out").read_bytes() == BODY


def test_file_urls_need_the_policy(tmp_path: Path) -> None:
    source = tmp_path / "src.tar"
    source.write_bytes(BODY)
    with pytest.raises(FetchError, match="scheme 'file' is not allowed"):
        fetcher().fetch(source.as_uri(), tmp_path / "out", sha256=SHA)
    with pytest.raises(FetchError, match="scheme 'file' is not allowed"):
        fetcher().fetch(str(source), tmp_path / "out", sha256=SHA)
    allowed = fetcher(policy=loopback_policy(allow_file=True))
    for url in (source.as_uri(), str(source)):
        result = allowed.fetch(url, tmp_path / "out", sha256=SHA, size=len(BODY))
        assert result.size == len(BODY) and (tmp_path / "out").read_bytes() == BODY
    with pytest.raises(IntegrityError, match="size mismatch"):
        allowed.fetch(str(source), tmp_path / "out", sha256=SHA, size=len(BODY) - 1)
    with pytest.raises(FetchError, match="cannot read"):
        allowed.fetch(str(tmp_path / "missing"), tmp_path / "out", sha256=SHA)
    with pytest.raises(FetchError, match="remote host"):
        allowed.fetch("file://server/share/x", tmp_path / "out", sha256=SHA)


def test_credentials_never_shown(server: FaultServer, tmp_path: Path,
                                 caplog: pytest.LogCaptureFixture) -> None:
    server.add("/t.tar", Route(BODY, statuses=[503, 404]))
    url = server.url("/t.tar").replace("http://", "http://bob:hunter2@") + "?sig=s3cr3t"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(FetchError) as info:
        fetcher().fetch(url, tmp_path / "out", sha256=SHA)
    text = str(info.value) + str(info.value.url) + caplog.text
    assert "hunter2" not in text and "s3cr3t" not in text
    assert "bob:***@" in str(info.value)
    # The credentials did reach the server (as Basic auth), and only there.
    assert server._server.routes["/t.tar"].headers[0]["Authorization"].startswith("Basic ")


def test_mirror_used_first(server: FaultServer, tmp_path: Path) -> None:
    mirror = server.add("/mirror/t.tar", Route(BODY))
    origin = server.add("/origin/t.tar", Route(BODY))
    rules = MirrorRules([{"prefix": server.url("/origin/"), "mirrors": [server.url("/mirror/")]}])
    result = fetcher().fetch(server.url("/origin/t.tar"), tmp_path / "out", sha256=SHA,
                             mirrors=rules)
    assert result.url == server.url("/mirror/t.tar")
    assert result.mirror_rule == {"prefix": server.url("/origin/"),
                                  "mirror": server.url("/mirror/"), "source": "renderer"}
    assert (mirror.requests, origin.requests) == (1, 0)


def test_mirror_fallback_to_next_then_origin(server: FaultServer, tmp_path: Path) -> None:
    server.add("/m1/t.tar", Route(BODY, statuses=[404]))
    server.add("/m2/t.tar", Route(b"stale content"))
    origin = server.add("/origin/t.tar", Route(BODY))
    rules = MirrorRules([{"prefix": server.url("/origin/"),
                          "mirrors": [server.url("/m1/"), server.url("/m2/")]}])
    result = fetcher().fetch(server.url("/origin/t.tar"), tmp_path / "out", sha256=SHA,
                             mirrors=rules)
    assert result.url == server.url("/origin/t.tar") and result.mirror_rule is None
    assert origin.requests == 1 and result.attempts == 3


def test_every_candidate_failing_lists_them_all(server: FaultServer, tmp_path: Path) -> None:
    server.add("/m1/t.tar", Route(BODY, statuses=[404]))
    server.add("/origin/t.tar", Route(b"wrong"))
    rules = MirrorRules([{"prefix": server.url("/origin/"), "mirrors": [server.url("/m1/")]}])
    with pytest.raises(IntegrityError) as info:
        fetcher().fetch(server.url("/origin/t.tar"), tmp_path / "out", sha256=SHA,
                        mirrors=rules)
    assert "every candidate URL failed" in str(info.value)
    assert "/m1/t.tar" in str(info.value) and "HTTP 404" in str(info.value)
    assert info.value.url == server.url("/origin/t.tar")


def test_bad_arguments() -> None:
    with pytest.raises(ConfigurationError, match="not a sha256"):
        Fetcher().fetch("http://127.0.0.1/x", "/nonexistent/out", sha256="abc")
    with pytest.raises(ConfigurationError, match="timeouts"):
        Fetcher(read_timeout=0)
    with pytest.raises(ConfigurationError, match="unsupported schemes"):
        UrlPolicy(schemes=frozenset({"ftp"}))
    with pytest.raises(ConfigurationError, match="at least 1"):
        RetryPolicy(attempts=0)


@given(attempt=st.integers(0, 30), retry_after=st.none() | st.floats(0, 1e6))
def test_delay_is_bounded(attempt: int, retry_after: float | None) -> None:
    policy = RetryPolicy(backoff=0.5, factor=2, max_delay=30)
    wait = policy.delay(attempt, retry_after)
    assert 0 <= wait <= 30
    assert wait <= 0.5 * 2 ** attempt or (retry_after is not None and wait <= retry_after)
    if retry_after is not None:
        assert wait >= min(retry_after, 30)


def test_a_failing_progress_callback_is_not_a_network_error(server: FaultServer,
                                                            tmp_path: Path) -> None:
    route = server.add("/t.tar", Route(BODY))

    def broken(stage: str, done: int, total: int | None) -> None:
        raise BrokenPipeError("stderr is gone")

    with pytest.raises(BrokenPipeError):
        fetcher().fetch(server.url("/t.tar"), tmp_path / "out", sha256=SHA, progress=broken)
    assert route.requests == 1 and not (tmp_path / "out").exists()


def test_unwritable_destination(server: FaultServer, tmp_path: Path) -> None:
    server.add("/t.tar", Route(BODY))
    with pytest.raises(FetchError, match="cannot write the download"):
        fetcher().fetch(server.url("/t.tar"), tmp_path / "missing" / "out", sha256=SHA)
