"""The demo's second half: the example cloudlet (``examples/tiny-debian``),
POSTed to ``cloudlets serve`` as qcow2 on a local target, boots under QEMU
and prints the files its templates made of the request's render config."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import tests.test_example as example_test
from cloudlets.testing import boot as bootfixture
from tests.service_fixture import TarballServer, start_service, tarballs

pytest.importorskip("starlette", reason="pip install cloudlets[service]")

pytestmark = pytest.mark.boot

__all__ = ["tarballs"]

TOKEN = "boot-token-0123456789abcdef"


def test_the_example_rendered_by_the_service_boots(tmp_path: Path,
                                                   tarballs: TarballServer) -> None:
    for tool in ("qemu-system-x86_64", "qemu-img"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    try:
        manifest = example_test._load_example().example_manifest(bootfixture.cache_dir())
    except bootfixture.FixtureUnavailable as exc:
        pytest.skip(f"cannot build the example cloudlet: {exc}")
    # served from loopback, as the service fetches nothing from local paths
    tarball = Path(manifest["filesystem"]["url"].removeprefix("file://"))
    (tarballs.root / "tiny-debian.tar.gz").symlink_to(tarball)
    manifest["filesystem"]["url"] = f"{tarballs.url}/tiny-debian.tar.gz"
    tarballs.gate.set()
    service = start_service(tmp_path / "etc", f"""
[service]
data_dir = "state"
formats = ["qcow2"]
[targets.local]
driver = "local"
root = "images"
[tenants.demo]
token_env = "CLOUDLETS_TOKEN_DEMO"
[fetch]
allow_hosts = ["{tarballs.host}"]
only_hosts = ["127.0.0.1"]
""", tokens={"demo": TOKEN})
    try:
        created = service.call("POST", "/v1/images", "demo", json={
            "manifest": manifest, "config": example_test.CONFIG, "format": "qcow2",
            "target": "local"})
        assert created.status_code == 202, created.text
        image = service.wait_image(created.json()["id"], "demo", timeout=300)
        assert image["status"] == "ready", image
    finally:
        service.stop()
    disk = Path(image["artifacts"][0]["location"])
    booted = bootfixture.boot(disk, firmware="bios", disk_format="qcow2",
                              workdir=tmp_path / "boot", timeout=120)
    context = f"console tail after {booted.seconds:.1f}s:\n{booted.tail()}"
    assert not booted.timed_out, context
    assert bootfixture.MARKER in booted.console, context
    for section, text in example_test.EXPECTED.items():
        assert bootfixture.console_section(booted.console, section) == text, context
