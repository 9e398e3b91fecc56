"""The service's client side: :class:`cloudlets.client.ServiceClient` and the
libcloud driver over it, against a real ``cloudlets serve``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from libcloud.compute.base import Node, NodeImage  # type: ignore[import-untyped]

from cloudlets.client import CloudletsServiceNodeDriver, RenderFailed, ServiceClient
from cloudlets.errors import CloudletsError
from cloudlets.service.errors import (
    BadRequest,
    NotFound,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
)
from tests.service_fixture import (
    Service,
    TarballServer,
    free_port,
    served_cloudlet,
    serving,
    tarballs,
)
from tests.test_service import TOKENS, service_config

pytest.importorskip("starlette", reason="pip install cloudlets[service]")

__all__ = ["tarballs"]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory,
            tarballs: TarballServer) -> Iterator[Service]:
    tarballs.gate.set()
    with serving(tmp_path_factory.mktemp("client") / "etc",
                 service_config(tarballs, per_tenant=8), TOKENS) as running:
        yield running


def test_client_creates_waits_lists_and_deletes(service: Service,
                                                tarballs: TarballServer) -> None:
    client = ServiceClient(service.url, TOKENS["alice"], timeout=10)
    assert TOKENS["alice"] not in repr(client)
    manifest = served_cloudlet(tarballs, "client", "1.0")
    image = client.create(manifest, format="tar", target="local",
                          config={"args": {"motd": "hi"}}, idempotency_key="c-1")
    assert image["status"] in ("pending", "rendering", "ready")
    ready = client.wait(image["id"], timeout=60, poll_interval=0.05)
    assert ready["status"] == "ready" and Path(ready["artifacts"][0]["location"]).exists()
    assert client.get(ready["image_id"])["id"] == image["id"]  # by image id too
    assert image["id"] in {i["id"] for i in client.list(name="client", page_size=1)}
    assert {f["name"] for f in client.formats()} == {"tar", "qcow2"}
    assert [t["name"] for t in client.targets()] == ["local", "other"]
    assert client.delete(image["id"])["status"] == "deleted"
    assert not Path(ready["artifacts"][0]["location"]).exists()


def test_client_errors_are_cloudlets_errors(service: Service, tarballs: TarballServer,
                                            tmp_path: Path) -> None:
    alice = ServiceClient(service.url, TOKENS["alice"], timeout=10)
    manifest = served_cloudlet(tarballs, "errs", "1.0")
    with pytest.raises(BadRequest) as bad:
        alice.create({**manifest, "version": 3}, format="tar", target="local")
    assert bad.value.error == "ManifestError"
    assert [p.pointer for p in bad.value.problems] == ["/manifest/version"]
    mine = alice.create(manifest, format="tar", target="local")
    with pytest.raises(NotFound):
        ServiceClient(service.url, TOKENS["bob"]).get(mine["id"])
    with pytest.raises(Unauthorized):
        list(ServiceClient(service.url, "wrong-token-0000000000").list())
    refused = {**manifest, "filesystem": {**manifest["filesystem"],
                                          "url": "http://elsewhere.invalid/t.tar.gz",
                                          "sha256": "0" * 64}}
    failed = alice.create(refused, format="tar", target="local")
    with pytest.raises(RenderFailed) as render:
        alice.wait(failed["id"], timeout=60, poll_interval=0.05)
    assert render.value.error == "FetchError"
    with pytest.raises(ServiceUnavailable):
        ServiceClient(f"http://127.0.0.1:{free_port()}", "x" * 20, timeout=2).formats()
    with pytest.raises(CloudletsError, match="cannot read"):
        alice.create(tmp_path / "missing.json", format="tar", target="local")
    assert issubclass(TooManyRequests, CloudletsError)


def test_libcloud_driver_creates_and_lists_the_tenants_images(
        service: Service, tarballs: TarballServer) -> None:
    driver = CloudletsServiceNodeDriver(TOKENS["bob"], ex_url=service.url, ex_format="tar",
                                        ex_target="local")
    image = driver.create_image(served_cloudlet(tarballs, "libcloud", "2.0"))
    assert isinstance(image, NodeImage) and image.driver is driver
    assert image.extra["cloudlets"]["status"] in ("pending", "rendering", "ready")
    ready = driver.ex_wait_image(image, timeout=60)
    assert ready.id == image.id and ready.extra["cloudlets"]["status"] == "ready"
    assert ready.name == "libcloud-2.0"
    assert image.id in {i.id for i in driver.list_images()}
    assert driver.get_image(image.id).extra["cloudlets"]["image_id"].startswith("img-")
    # another tenant's driver does not list it
    other = CloudletsServiceNodeDriver(TOKENS["alice"], ex_url=service.url, ex_format="tar")
    assert image.id not in {i.id for i in other.list_images()}
    assert driver.delete_image(ready) is True
    assert image.id not in {i.id for i in driver.list_images()}
    with pytest.raises(CloudletsError, match="not from nodes"):
        driver.create_image(Node(id="n", name="n", state=0, public_ips=[], private_ips=[],
                                 driver=driver))
