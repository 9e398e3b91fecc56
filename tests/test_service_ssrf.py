"""Server-side request forgery (issue 17 item 5): the service applies the
library's URL policy per tenant.

Loopback is proved against a real ``cloudlets serve``: a tenant's manifest
naming the loopback tarball server (by address, by ``localhost``, in
decimal and hex notation) fails naming the rule, and that server received
no request, while a tenant the provider allowed it reaches it. The other
ranges are proved in this process, with the very policy the service builds
from its configuration, a patched resolver and a guard on
``socket.connect``: no packet leaves the machine.
"""

from __future__ import annotations

import http.server
import ipaddress
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudlets.errors import FetchError
from cloudlets.fetch import Fetcher
from cloudlets.mirrors import MirrorRules
from cloudlets.service.config import ServiceConfig
from cloudlets.service.jobs import url_policy
from tests.service_fixture import Service, TarballServer, served_cloudlet, serving, tarballs

pytest.importorskip("starlette", reason="pip install cloudlets[service]")

__all__ = ["tarballs"]  # the fixture, imported for this module

TOKENS = {"eve": "eve-token-0123456789abcdef", "trusted": "trusted-token-0123456789ab"}
DIGEST = "0" * 64

#: Test names and the internal addresses the patched resolver gives them,
#: with the rule the refusal must name.
RESOLVED = {
    "metadata.test": ("169.254.169.254", "link-local"),
    "private.test": ("10.0.0.1", "private"),
    "private172.test": ("172.16.5.4", "private"),
    "private192.test": ("192.168.1.1", "private"),
    "cgnat.test": ("100.64.0.1", "CGNAT"),
    "ula.test": ("fd00::1", "unique local"),
    "linklocal6.test": ("fe80::1", "link-local"),
    "multicast.test": ("224.0.0.1", "multicast"),
    "mapped.test": ("::ffff:169.254.169.254", "link-local"),
}


def config_text(server: TarballServer, extra: str = "") -> str:
    return f"""
[service]
data_dir = "state"
workers = 1
formats = ["tar"]
[targets.local]
driver = "local"
root = "images"
[formats.tar]
[tenants.eve]
token_env = "CLOUDLETS_TOKEN_EVE"
[tenants.trusted]
token_env = "CLOUDLETS_TOKEN_TRUSTED"
[tenants.trusted.fetch]
allow_hosts = ["{server.host}"]
{extra}
"""


# -- loopback, against the real service ---------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory,
            tarballs: TarballServer) -> Iterator[Service]:
    tarballs.gate.set()
    with serving(tmp_path_factory.mktemp("ssrf") / "etc", config_text(tarballs),
                 TOKENS) as running:
        yield running


def refusal(service: Service, tenant: str, body: dict[str, Any]) -> str:
    """POST ``body``; :returns: the refusal's message, whether the POST
    answered 400 or the job failed."""
    answer = service.call("POST", "/v1/images", tenant,
                          json={"format": "tar", "target": "local", **body})
    if answer.status_code == 400:
        return str(answer.json()["message"])
    assert answer.status_code == 202, answer.text
    image = service.wait_image(answer.json()["id"], tenant)
    assert image["status"] == "failed", image
    return str(image["error"]["message"])


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433", "0x7f000001",
                                  "127.1", "[::ffff:127.0.0.1]"])
def test_a_manifest_naming_loopback_fails_and_reaches_nothing(
        service: Service, tarballs: TarballServer, host: str) -> None:
    manifest = served_cloudlet(tarballs, name=f"lo{abs(hash(host)) % 10_000}")
    port = tarballs.httpd.server_address[1]
    manifest["filesystem"]["url"] = manifest["filesystem"]["url"].replace(
        tarballs.host, f"{host}:{port}")
    before = list(tarballs.requests)
    message = refusal(service, "eve", {"manifest": manifest})
    assert "refused by the URL policy" in message and "'loopback'" in message, message
    assert tarballs.requests == before


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "2130706433", "0x7f000001"])
def test_a_manifest_url_naming_loopback_is_refused_unread(
        service: Service, tarballs: TarballServer, host: str) -> None:
    port = tarballs.httpd.server_address[1]
    before = list(tarballs.requests)
    answer = service.call("POST", "/v1/images", "eve", json={
        "manifest_url": f"http://{host}:{port}/manifest.json", "format": "tar",
        "target": "local"})
    assert answer.status_code == 400, answer.text
    assert "'loopback'" in answer.json()["message"], answer.text
    assert tarballs.requests == before


def test_a_tenant_the_provider_allowed_reaches_the_same_server(
        service: Service, tarballs: TarballServer) -> None:
    """The control: the refusals above are the policy's, not a dead server."""
    manifest = served_cloudlet(tarballs, name="allowed")
    answer = service.call("POST", "/v1/images", "trusted",
                          json={"manifest": manifest, "format": "tar", "target": "local"})
    assert answer.status_code == 202, answer.text
    assert service.wait_image(answer.json()["id"], "trusted")["status"] == "ready"
    assert any(path.endswith("/allowed-1.0.tar.gz") for path in tarballs.requests)


# -- the other ranges, in this process ----------------------------------------------


@pytest.fixture
def off_loopback(monkeypatch: pytest.MonkeyPatch,
                 _no_packet_off_loopback: list[str]) -> list[str]:
    """A resolver answering :data:`RESOLVED`; the suite's guard on
    ``socket.connect`` (tests/conftest.py) fails the test on any connection
    off loopback. :returns: the attempts the guard refused."""
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name.rstrip(".").lower() in RESOLVED:
            address = ipaddress.ip_address(RESOLVED[name.rstrip(".").lower()][0])
            number = int(port or 80)
            if address.version == 6:
                return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "",
                         (str(address), number, 0, 0))]
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (str(address), number))]
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return _no_packet_off_loopback


def service_fetcher(tmp_path: Path, server: TarballServer, tenant: str = "eve",
                    extra: str = "") -> tuple[Fetcher, ServiceConfig]:
    """The fetcher the service builds for ``tenant`` from its configuration."""
    path = tmp_path / "service.toml"
    path.write_text(config_text(server, extra).replace(
        'token_env = "CLOUDLETS_TOKEN_EVE"', f'token_sha256 = "{"a" * 64}"').replace(
        'token_env = "CLOUDLETS_TOKEN_TRUSTED"', f'token_sha256 = "{"b" * 64}"'))
    config = ServiceConfig.load(path)
    settings = config.tenants[tenant].fetch or config.fetch
    return Fetcher(policy=url_policy(settings, config.mirrors)), config


@pytest.mark.parametrize("name", sorted(RESOLVED))
def test_a_name_resolving_inside_is_refused_before_any_connect(
        tmp_path: Path, tarballs: TarballServer, off_loopback: list[str], name: str) -> None:
    fetcher, _ = service_fetcher(tmp_path, tarballs)
    with pytest.raises(FetchError) as caught:
        fetcher.fetch(f"http://{name}/t.tar.gz", tmp_path / "t", sha256=DIGEST)
    message = str(caught.value)
    assert RESOLVED[name][1] in message and "rule" in message, message
    assert RESOLVED[name][0] not in message  # what a name resolves to is not told
    assert off_loopback == []


@pytest.mark.parametrize("literal", ["169.254.169.254", "10.0.0.1", "100.64.0.1", "[fd00::1]",
                                     "[fe80::1]", "2852039166", "0xa9fea9fe", "[::ffff:a9fe:a9fe]"])
def test_an_internal_address_is_refused_in_any_notation(
        tmp_path: Path, tarballs: TarballServer, off_loopback: list[str], literal: str) -> None:
    fetcher, _ = service_fetcher(tmp_path, tarballs)
    with pytest.raises(FetchError, match="refused by the URL policy"):
        fetcher.fetch(f"http://{literal}/latest/meta-data", tmp_path / "t", sha256=DIGEST)
    assert off_loopback == []


class _Redirect(http.server.BaseHTTPRequestHandler):
    target = "http://metadata.test/latest/meta-data"

    def do_GET(self) -> None:
        self.send_response(302)
        self.send_header("Location", self.target)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def test_a_redirect_hop_into_the_metadata_service_is_refused(
        tmp_path: Path, tarballs: TarballServer, off_loopback: list[str]) -> None:
    redirector = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    thread = threading.Thread(target=redirector.serve_forever, daemon=True)
    thread.start()
    try:
        host = f"127.0.0.1:{redirector.server_address[1]}"
        fetcher, _ = service_fetcher(
            tmp_path, tarballs, "eve", f'[tenants.eve.fetch]\nallow_hosts = ["{host}"]\n')
        with pytest.raises(FetchError) as caught:
            fetcher.fetch(f"http://{host}/t.tar.gz", tmp_path / "t", sha256=DIGEST)
    finally:
        redirector.shutdown()
        redirector.server_close()
        thread.join(timeout=5)
    assert "link-local" in str(caught.value), caught.value
    assert off_loopback == []


def test_a_provider_mirror_is_allowed_where_the_origin_is_not(
        tmp_path: Path, tarballs: TarballServer, off_loopback: list[str]) -> None:
    """The origin resolves into the private network; the provider's mirror
    (the loopback tarball server, which no tenant exception allows) serves it."""
    manifest = served_cloudlet(tarballs, name="mirrored")
    name = manifest["filesystem"]["url"].rsplit("/", 1)[1]
    mirrors = f'[[mirrors]]\nprefix = "http://private.test/"\nmirrors = ["{tarballs.url}/"]\n'
    fetcher, config = service_fetcher(tmp_path, tarballs, "eve", mirrors)
    result = fetcher.fetch(f"http://private.test/{name}", tmp_path / "t",
                           sha256=manifest["filesystem"]["sha256"],
                           mirrors=MirrorRules.from_config(config.mirrors))
    assert result.mirror_rule is not None and (tmp_path / "t").exists()
    # and without the mirror, the same origin is refused before any connect
    with pytest.raises(FetchError, match="private"):
        fetcher.fetch(f"http://private.test/{name}", tmp_path / "u",
                      sha256=manifest["filesystem"]["sha256"])
    assert off_loopback == []


def test_service_fetch_settings_map_onto_the_policy(tmp_path: Path,
                                                    tarballs: TarballServer) -> None:
    extra = """[fetch]
allow_networks = ["10.20.0.0/16"]
ports = [80, 443]
[tenants.eve.fetch]
deny_networks = ["192.0.2.0/24"]
"""
    fetcher, config = service_fetcher(tmp_path, tarballs, "eve", extra)
    policy = fetcher.policy
    assert policy.problem("http://example.org:8080/t") is not None  # ports
    assert policy.problem("http://192.0.2.7/t") is not None  # the tenant's own deny list
    assert policy.problem("http://127.0.0.1/t") is None  # ... which replaced the default
    base = url_policy(config.fetch, config.mirrors)
    assert base.problem("http://10.20.3.4/t") is None  # allow_networks
    assert base.problem("http://10.21.3.4/t") is not None
