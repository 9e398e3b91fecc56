"""Hostile-input class 8: the network as an attacker's tool. A stranger's
manifest names the tarball URL, so the renderer must not become a way into
the provider's machine or network, nor be held up by a slow server.

No packet leaves loopback: names resolve through a patched resolver that
knows only the test names below (anything else is a resolution error, never
a DNS query), and the suite's guard on ``socket.connect`` (tests/conftest.py)
fails a test that tries to connect anywhere but loopback. The refusals of
the other ranges are proven by that guard staying silent."""

from __future__ import annotations

import io
import ipaddress
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudlets import Renderer
from cloudlets.cli import EXIT_RENDER_FAILED, EXIT_SETUP, main
from cloudlets.errors import ConfigurationError, FetchError
from cloudlets.fetch import DownloadCancelled, DownloadWatch, Fetcher, RetryPolicy, UrlPolicy
from cloudlets.fetch.policy import DEFAULT_DENY_NETWORKS, HostPort, literal_ip
from tests.httpfaults import FaultServer, Route
from tests.netpolicy import allow_args, host_port
from tests.test_catalog import make_cloudlet

#: Test names and what the patched resolver answers for them.
NAMES: dict[str, list[str]] = {
    "loopback.test": ["127.0.0.1"],
    "metadata.test": ["169.254.169.254"],
    "private10.test": ["10.0.0.1"],
    "private172.test": ["172.16.5.4"],
    "private192.test": ["192.168.0.10"],
    "cgnat.test": ["100.64.0.1"],
    "ula.test": ["fd00::1"],
    "linklocal6.test": ["fe80::1"],
    "loopback6.test": ["::1"],
    "multicast.test": ["224.0.0.251"],
    "unspecified.test": ["0.0.0.0"],
    "mapped.test": ["::ffff:169.254.169.254"],
}


@pytest.fixture
def resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, list[str]]]:
    """``socket.getaddrinfo`` answering :data:`NAMES` (and what a test adds),
    numeric hosts and ``localhost``, and nothing else: no DNS query is sent.
    :returns: the name map, which a test may change (rebinding)."""
    names = {name: list(addresses) for name, addresses in NAMES.items()}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, family: int = 0, type: int = 0,  # noqa: A002
                    proto: int = 0, flags: int = 0) -> list[Any]:
        name = host.decode() if isinstance(host, bytes) else host
        if name in names:
            answers = []
            for address in names[name]:
                ip = ipaddress.ip_address(address)
                if ip.version == 6:
                    answers.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "",
                                    (address, int(port), 0, 0)))
                else:
                    answers.append((socket.AF_INET, socket.SOCK_STREAM, 6, "",
                                    (address, int(port))))
            return answers
        if name == "localhost":
            return real(host, port, family, type, proto, flags)
        try:
            return real(host, port, family, type, proto, flags | socket.AI_NUMERICHOST)
        except socket.gaierror:
            raise socket.gaierror(socket.EAI_NONAME, f"{name!r} is not a test name") from None

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield names


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        yield srv


def _without_ranges(message: str) -> str:
    """``message`` without the ranges its rules name (``is in 10.0.0.0/8``):
    what remains must not tell what a name resolves to."""
    return re.sub(r"is in \S+/\d+", "", message)


def _fetcher(**kwargs: Any) -> Fetcher:
    kwargs.setdefault("retry", RetryPolicy(attempts=2, backoff=0.01, max_delay=0.02))
    kwargs.setdefault("connect_timeout", 2.0)
    kwargs.setdefault("read_timeout", 2.0)
    return Fetcher(**kwargs)


# -- the default policy ---------------------------------------------------------

@pytest.mark.parametrize(("address", "rule"), [
    ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("::1", "loopback"),
    ("10.0.0.1", "private (RFC 1918)"), ("172.31.255.1", "private (RFC 1918)"),
    ("192.168.1.1", "private (RFC 1918)"),
    ("169.254.169.254", "link-local (cloud metadata)"), ("fe80::1", "link-local"),
    ("100.64.0.1", "CGNAT"), ("100.127.255.254", "CGNAT"),
    ("fd00::1", "unique local"), ("fc00::1", "unique local"),
    ("224.0.0.251", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    # the same addresses inside IPv6: mapped, NAT64, 6to4
    ("::ffff:127.0.0.1", "loopback"), ("64:ff9b::a9fe:a9fe", "link-local"),
    ("2002:0a00:0001::1", "private"),
])
def test_the_default_policy_refuses_every_internal_range(address: str, rule: str) -> None:
    problem = UrlPolicy().address_problem("some.test", 443, address)
    assert problem is not None and rule in problem
    assert problem.startswith("host 'some.test' resolves to an address that is in ")
    assert address not in _without_ranges(problem)


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:2800:220:1::1",
                                     "100.128.0.1", "172.32.0.1", "11.0.0.1"])
def test_the_default_policy_allows_public_addresses(address: str) -> None:
    assert UrlPolicy().address_problem("some.test", 443, address) is None


def test_every_default_range_has_a_named_rule() -> None:
    networks = [ipaddress.ip_network(n) for nets in DEFAULT_DENY_NETWORKS.values()
                for n in nets]
    assert set(UrlPolicy().deny_networks) == set(networks)  # type: ignore[arg-type]
    for name in ("loopback", "private", "link-local", "CGNAT", "unique local", "multicast",
                 "unspecified"):
        assert any(name in rule for rule in DEFAULT_DENY_NETWORKS)


@pytest.mark.parametrize(("host", "address"), [
    ("127.0.0.1", "127.0.0.1"), ("2130706433", "127.0.0.1"), ("0x7f000001", "127.0.0.1"),
    ("0177.0.0.1", "127.0.0.1"), ("127.1", "127.0.0.1"), ("0x7f.0.0.1", "127.0.0.1"),
    ("[::1]", "::1"), ("[::ffff:127.0.0.1]", "::ffff:7f00:1"), ("017700000001", "127.0.0.1"),
])
def test_ip_literals_in_every_notation_are_recognised(host: str, address: str) -> None:
    assert str(literal_ip(host)) == address
    problem = UrlPolicy().problem(f"http://{host}:8080/x.tar.gz")
    assert problem is not None and "loopback" in problem


@pytest.mark.parametrize("host", ["example.com", "1.example", "deadbeef", "0x.example", ""])
def test_names_are_not_ip_literals(host: str) -> None:
    assert literal_ip(host) is None


# -- refusals, with no packet off loopback ---------------------------------------

@pytest.mark.parametrize("name", sorted(set(NAMES) - {"loopback.test"}))
def test_a_name_resolving_inside_is_refused_before_connecting(
        name: str, resolver: dict[str, list[str]], tmp_path: Path,
        _no_packet_off_loopback: list[str]) -> None:
    with pytest.raises(FetchError, match="refused by the URL policy") as info:
        _fetcher().fetch(f"http://{name}/latest/meta-data/", tmp_path / "out", sha256="0" * 64)
    message = str(info.value)
    assert "rule '" in message and name in message
    for address in resolver[name]:
        assert address not in _without_ranges(message)
    assert _no_packet_off_loopback == []
    assert not (tmp_path / "out").exists()


def test_a_name_with_an_internal_and_a_loopback_address_reaches_only_the_allowed_one(
        resolver: dict[str, list[str]], server: FaultServer, tmp_path: Path,
        _no_packet_off_loopback: list[str]) -> None:
    route = server.add("/t.tar", Route(b"tarball" * 100))
    port = int(host_port(server.url("/")).rsplit(":", 1)[1])
    resolver["mixed.test"] = ["10.0.0.7", "127.0.0.1"]
    policy = UrlPolicy(allow_networks=["127.0.0.0/8"])
    result = _fetcher(policy=policy).fetch(f"http://mixed.test:{port}/t.tar", tmp_path / "out",
                                           sha256=route.sha256)
    assert result.size == len(route.body) and route.requests == 1
    assert _no_packet_off_loopback == []  # 10.0.0.7 was checked, refused, never connected


def test_a_name_that_rebinds_between_connections_is_checked_at_each(
        resolver: dict[str, list[str]], server: FaultServer, tmp_path: Path,
        _no_packet_off_loopback: list[str]) -> None:
    # The first answer is allowed; the download stalls, and when the retry
    # connects again the name resolves inside the provider's network.
    route = server.add("/t.tar", Route(b"x" * 300_000, stall_after=100_000))
    port = int(host_port(server.url("/")).rsplit(":", 1)[1])
    resolver["rebind.test"] = ["127.0.0.1"]
    original = socket.getaddrinfo

    def rebinding(host: Any, *args: Any, **kwargs: Any) -> Any:
        answer = original(host, *args, **kwargs)
        if host == "rebind.test":
            resolver["rebind.test"] = ["10.20.30.40"]
        return answer

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket, "getaddrinfo", rebinding)
        policy = UrlPolicy(allow_networks=["127.0.0.0/8"])
        with pytest.raises(FetchError, match=r"rule 'private \(RFC 1918\)'") as info:
            _fetcher(policy=policy, read_timeout=0.3).fetch(
                f"http://rebind.test:{port}/t.tar", tmp_path / "out", sha256=route.sha256)
    assert "10.20.30.40" not in str(info.value)
    assert route.requests == 1 and _no_packet_off_loopback == []


def test_every_redirect_hop_is_checked(resolver: dict[str, list[str]], server: FaultServer,
                                       tmp_path: Path,
                                       _no_packet_off_loopback: list[str]) -> None:
    # a "public" host (the loopback server, allowed by name) redirects inside
    port = int(host_port(server.url("/")).rsplit(":", 1)[1])
    resolver["public.test"] = ["127.0.0.1"]
    policy = UrlPolicy(allow_hosts=[f"public.test:{port}"])
    secret = server.add("/secret", Route(b"internal only"))
    for target, rule in ((f"http://metadata.test:{port}/latest/", "link-local"),
                         ("http://169.254.169.254/latest/meta-data/", "link-local"),
                         (f"http://2130706433:{port}/secret", "loopback"),
                         (f"http://0x7f000001:{port}/secret", "loopback"),
                         (f"http://loopback.test:{port}/secret", "loopback"),
                         (f"http://[fd00::1]:{port}/", "unique local")):
        server.add("/hop", Route(b"", redirect=target))
        with pytest.raises(FetchError, match=rule):
            _fetcher(policy=policy).fetch(f"http://public.test:{port}/hop", tmp_path / "out",
                                          sha256="0" * 64)
    assert secret.requests == 0 and _no_packet_off_loopback == []


@pytest.mark.parametrize("host", ["127.0.0.1", "loopback.test", "2130706433", "0x7f000001",
                                  "0177.0.0.1", "127.1", "[::ffff:127.0.0.1]", "localhost"])
def test_a_manifest_pointing_at_loopback_fails_and_the_server_gets_no_request(
        host: str, resolver: dict[str, list[str]], server: FaultServer,
        tmp_path: Path, _no_packet_off_loopback: list[str]) -> None:
    manifest = make_cloudlet(tmp_path / "src")
    route = server.add("/tiny.tar.gz", Route(Path(manifest["filesystem"]["url"]).read_bytes()))
    port = int(host_port(server.url("/")).rsplit(":", 1)[1])
    manifest["filesystem"]["url"] = f"http://{host}:{port}/tiny.tar.gz"
    renderer = Renderer(cache_dir=tmp_path / "cache", data_dir=tmp_path / "data",
                        work_dir=tmp_path / "work")
    with pytest.raises(FetchError, match=r"refused by the URL policy: .*rule 'loopback'") \
            as info:
        renderer.render(manifest, str(tmp_path / "out") + "/", "local", "tar")
    assert route.requests == 0
    assert route.sha256 not in str(info.value) and "200" not in str(info.value)
    assert not (tmp_path / "out").exists() and list((tmp_path / "work").iterdir()) == []
    assert _no_packet_off_loopback == []


def test_the_cli_refuses_loopback_and_allow_host_lets_it_through(
        server: FaultServer, tmp_path: Path) -> None:
    manifest = make_cloudlet(tmp_path / "src")
    route = server.add("/tiny.tar.gz", Route(Path(manifest["filesystem"]["url"]).read_bytes()))
    manifest["filesystem"]["url"] = server.url("/tiny.tar.gz")
    path = tmp_path / "m.json"
    path.write_text(json.dumps(manifest))
    argv = ["render", str(path), "-f", "tar", "-o", str(tmp_path / "out") + "/",
            "--cache-dir", str(tmp_path / "cache")]
    err = io.StringIO()
    assert main(argv, out=io.StringIO(), err=err) == EXIT_RENDER_FAILED
    assert "rule 'loopback'" in err.getvalue() and "--allow-host" in err.getvalue()
    assert route.requests == 0
    # another port of the same host is still refused
    other = ["--allow-host", "127.0.0.1:1"]
    assert main([*argv, *other], out=io.StringIO(), err=io.StringIO()) == EXIT_RENDER_FAILED
    assert route.requests == 0
    out = io.StringIO()
    assert main([*argv, *other, *allow_args(server.url("/")), "--json"], out=out,
                err=io.StringIO()) == 0
    assert route.requests == 1 and json.loads(out.getvalue())["image_id"]
    err = io.StringIO()
    assert main([*argv, "--allow-host", "127.0.0.1:http"], out=io.StringIO(),
                err=err) == EXIT_SETUP
    assert "not a port number" in err.getvalue()


def test_error_messages_do_not_echo_what_internal_servers_answer(
        resolver: dict[str, list[str]], server: FaultServer, tmp_path: Path) -> None:
    # the internal resource exists and would answer 403 with a body: nothing of it
    # reaches the requester
    port = int(host_port(server.url("/")).rsplit(":", 1)[1])
    inside = server.add("/admin", Route(b"s3cr3t-admin-page", statuses=[403, 403, 403]))
    resolver["intranet.test"] = ["127.0.0.1"]
    with pytest.raises(FetchError) as info:
        _fetcher().fetch(f"http://intranet.test:{port}/admin", tmp_path / "out",
                         sha256="0" * 64, size=17)
    message = str(info.value)
    assert "403" not in message and "17 bytes" not in message and inside.sha256 not in message
    assert "127.0.0.1" not in message and inside.requests == 0


# -- the provider's exceptions ----------------------------------------------------

def test_the_providers_mirrors_are_allowed_a_requests_are_not(
        resolver: dict[str, list[str]], server: FaultServer, tmp_path: Path,
        _no_packet_off_loopback: list[str]) -> None:
    from cloudlets import Presets

    manifest = make_cloudlet(tmp_path / "src")
    route = server.add("/m/tiny.tar.gz", Route(Path(manifest["filesystem"]["url"]).read_bytes()))
    resolver["tarballs.test"] = ["10.9.9.9"]  # the origin: inside, refused if ever tried
    manifest["filesystem"]["url"] = "http://tarballs.test/tiny.tar.gz"
    rule = {"prefix": "http://tarballs.test/", "mirrors": [server.url("/m/")]}
    for renderer in (Renderer(cache_dir=tmp_path / "c1", data_dir=tmp_path / "d",
                              mirrors=[rule]),
                     Renderer(cache_dir=tmp_path / "c2", data_dir=tmp_path / "d",
                              presets=Presets(values={"mirrors": [rule]}))):
        result = renderer.render(manifest, str(tmp_path / "out") + "/", "local", "tar",
                                 overwrite=True)
        assert result.details["tarball"]["mirror_rule"]["source"] in ("renderer", "presets")
    assert route.requests == 2
    # the same mirror in a request's config is policed like any URL
    with pytest.raises(FetchError, match="rule 'loopback'"):
        Renderer(cache_dir=tmp_path / "c3", data_dir=tmp_path / "d").render(
            manifest, str(tmp_path / "out2") + "/", "local", "tar", {"mirrors": [rule]})
    assert route.requests == 2 and _no_packet_off_loopback == []


def test_allowed_hosts_parse_and_match() -> None:
    assert HostPort.parse("Mirror.Example:8080") == HostPort("mirror.example", 8080)
    assert HostPort.parse("[::1]:80") == HostPort("::1", 80)
    assert HostPort.parse("2130706433") == HostPort("127.0.0.1", None)
    assert str(HostPort("::1", 80)) == "[::1]:80"
    policy = UrlPolicy(allow_hosts=["127.0.0.1:8080", "mirror.internal"])
    assert policy.problem("http://127.0.0.1:8080/x") is None
    assert policy.problem("http://0x7f000001:8080/x") is None  # the same address
    assert "loopback" in (policy.problem("http://127.0.0.1:8081/x") or "")
    assert policy.address_problem("mirror.internal", 9999, "10.0.0.5") is None
    assert policy.address_problem("localhost", 8080, "127.0.0.1") is None  # by address
    assert HostPort.parse("user:pw@mirror.example:8080") == HostPort("mirror.example", 8080)
    for bad in ("", "host:0", "host:99999", "a/b", "user@", "[::1]x", "h?x"):
        with pytest.raises(ConfigurationError):
            HostPort.parse(bad)


def test_a_service_builds_its_policy_from_its_fetch_table() -> None:
    policy = UrlPolicy.from_dict({"allow_hosts": ["127.0.0.1:8080"],
                                  "allow_networks": ["10.20.0.0/16"],
                                  "ports": [80, 443, 8080], "max_redirects": 2})
    assert policy.problem("http://127.0.0.1:8080/x") is None
    assert policy.problem("http://10.20.1.1/x") is None
    assert "private" in (policy.problem("http://10.21.1.1/x") or "")
    assert "port 22" in (policy.problem("http://example.com:22/x") or "")
    only = UrlPolicy.from_dict({"deny_networks": ["203.0.113.0/24"]})
    assert only.problem("http://127.0.0.1/x") is None  # the provider chose its own list
    assert "203.0.113.0/24" in (only.problem("http://203.0.113.9/x") or "")
    for table, key in (({"allow_host": []}, "fetch.allow_host"),
                       ({"deny_networks": ["10.0.0.0/33"]}, "fetch"),
                       ({"allow_hosts": "127.0.0.1"}, "fetch.allow_hosts"),
                       ({"allow_file": "yes"}, "fetch.allow_file")):
        with pytest.raises(ConfigurationError, match=key.replace(".", r"\.")):
            UrlPolicy.from_dict(table)


def test_the_renderer_takes_allowed_hosts_or_a_fetcher_not_both(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="not both"):
        Renderer(cache_dir=tmp_path, ex_allow_hosts=["127.0.0.1"], ex_fetcher=Fetcher())
    renderer = Renderer(cache_dir=tmp_path, ex_allow_hosts=["127.0.0.1:8080"])
    assert renderer.fetcher.policy.problem("http://127.0.0.1:8080/x") is None


# -- time: deadline, minimum rate, cancel -----------------------------------------

def test_a_trickling_server_fails_at_the_minimum_rate(server: FaultServer,
                                                      tmp_path: Path) -> None:
    route = server.add("/t.tar", Route(b"x" * 10_000, trickle=0.05))
    fetcher = _fetcher(policy=UrlPolicy(allow_hosts=["127.0.0.1"]), min_rate=1000,
                       min_rate_window=0.5)
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"slower than the minimum rate of 1000 bytes/s"):
        fetcher.fetch(server.url("/t.tar"), tmp_path / "out", sha256=route.sha256)
    assert time.monotonic() - started < 3
    assert not (tmp_path / "out").exists()


def test_the_deadline_cuts_a_download_that_never_ends(server: FaultServer,
                                                      tmp_path: Path) -> None:
    # fast enough for any minimum rate, endless for any patience
    route = server.add("/t.tar", Route(b"x" * 10_000_000, trickle=0.001))
    manifest = make_cloudlet(tmp_path / "src")
    manifest["filesystem"] = {"url": server.url("/t.tar"), "sha256": route.sha256}
    fetcher = _fetcher(policy=UrlPolicy(allow_hosts=["127.0.0.1"]), deadline=1.0, min_rate=10)
    renderer = Renderer(cache_dir=tmp_path / "cache", data_dir=tmp_path / "data",
                        work_dir=tmp_path / "work", ex_fetcher=fetcher)
    started = time.monotonic()
    with pytest.raises(FetchError, match=r"fetch deadline of 1 s"):
        renderer.render(manifest, str(tmp_path / "out") + "/", "local", "tar")
    assert time.monotonic() - started < 3
    assert route.requests == 1  # a deadline is not retried
    assert not (tmp_path / "out").exists() and list((tmp_path / "work").iterdir()) == []
    assert not list((tmp_path / "cache").rglob("*.part"))


def test_cancelling_a_download_cuts_its_connection_at_once(server: FaultServer,
                                                          tmp_path: Path) -> None:
    # the server stalls for 30 s after 100 kB; the read timeout is 20 s
    route = server.add("/t.tar", Route(b"x" * 500_000, stall_after=100_000))
    fetcher = _fetcher(policy=UrlPolicy(allow_hosts=["127.0.0.1"]), read_timeout=20.0,
                       min_rate=0)
    watch = DownloadWatch()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fetcher.fetch(server.url("/t.tar"), tmp_path / "out", sha256=route.sha256,
                          watch=watch)
        except BaseException as exc:  # noqa: BLE001 - checked below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 10
    while route.bytes_sent < 100_000:
        assert time.monotonic() < deadline, "the download never started"
        time.sleep(0.01)
    time.sleep(0.2)  # blocked in a read now
    cancelled = time.monotonic()
    watch.cancel()
    thread.join(5)
    assert not thread.is_alive()
    assert time.monotonic() - cancelled < 1.0
    assert len(errors) == 1 and isinstance(errors[0], DownloadCancelled)
    assert route.requests == 1 and not (tmp_path / "out").exists()
    watch.close()


def test_the_suites_guard_fails_a_connection_off_loopback(
        _no_packet_off_loopback: list[str]) -> None:
    with socket.socket() as sock, pytest.raises(pytest.fail.Exception, match="off loopback"):
        sock.connect(("10.255.255.1", 9))
    assert _no_packet_off_loopback == ["10.255.255.1"]
    _no_packet_off_loopback.clear()
    with socket.socket(socket.AF_INET6) as sock, pytest.raises(pytest.fail.Exception):
        sock.connect_ex(("fd00::1", 9, 0, 0))
    _no_packet_off_loopback.clear()


def test_a_manifest_url_is_read_under_the_same_policy(
        resolver: dict[str, list[str]], server: FaultServer, tmp_path: Path,
        _no_packet_off_loopback: list[str]) -> None:
    from cloudlets import ManifestError
    from cloudlets.manifest import MAX_MANIFEST_BYTES

    manifest = make_cloudlet(tmp_path / "src")
    route = server.add("/m.json", Route(json.dumps(manifest).encode()))
    port = int(host_port(server.url("/")).rsplit(":", 1)[1])
    for url in (server.url("/m.json"), f"http://loopback.test:{port}/m.json",
                f"http://2130706433:{port}/m.json"):
        with pytest.raises(ManifestError, match="rule 'loopback'"):
            Renderer(cache_dir=tmp_path / "c").prepare(url, str(tmp_path / "o") + "/",
                                                       "local", "tar")
    assert route.requests == 0
    server.add("/hop.json", Route(b"", redirect="http://metadata.test/latest/user-data"))
    allowed = Renderer(cache_dir=tmp_path / "c", ex_allow_hosts=[host_port(server.url("/"))])
    with pytest.raises(ManifestError, match="link-local"):
        allowed.prepare(server.url("/hop.json"), str(tmp_path / "o") + "/", "local", "tar")
    server.add("/big.json", Route(b" " * (MAX_MANIFEST_BYTES + 1)))
    with pytest.raises(ManifestError, match=f"larger than {MAX_MANIFEST_BYTES} bytes"):
        allowed.prepare(server.url("/big.json"), str(tmp_path / "o") + "/", "local", "tar")
    job = allowed.prepare(server.url("/m.json"), str(tmp_path / "o") + "/", "local", "tar")
    assert job.manifest.name == manifest["name"] and route.requests == 1
    assert _no_packet_off_loopback == []
