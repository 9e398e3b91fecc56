"""The README's main command: the example cloudlet renders end to end and boots.

``scripts/dev demo`` runs ``examples/render_example.py``. These tests run the
script as a user would, then render the example with a render config of
their own through the public API and boot the raw disk under SeaBIOS and the
qcow2 under OVMF: the guest must print exactly the files the templates make
of that config.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from cloudlets import Renderer
from cloudlets.testing import boot as bootfixture

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "render_example.py"

CONFIG = {
    "hostname": "db-7.test.invalid",
    "ip": {"interfaces": [
        {"name": "eth0", "dhcp": True},
        {"name": "eth1", "address": "2001:db8::7", "gateway": "2001:db8::1"},
    ]},
    "dns": {"nameservers": ["203.0.113.9"]},
}
EXPECTED = {
    "hostname": "db-7.test.invalid\n",
    "network": (
        "# tiny-debian 1.0: rendered from the render config's ip.interfaces\n"
        "auto lo\niface lo inet loopback\n\n"
        "auto eth0\niface eth0 inet dhcp\n\n"
        "auto eth1\niface eth1 inet static\n    address 2001:db8::7/64\n"
        "    gateway 2001:db8::1\n"
    ),
    "resolv": "nameserver 203.0.113.9\n",
}


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_example", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example() -> ModuleType:
    for tool in ("qemu-system-x86_64", "qemu-img"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install qemu-system-x86 qemu-utils)")
    return _load_example()


@pytest.fixture(scope="module")
def example_manifest(example: ModuleType) -> dict[str, object]:
    try:
        manifest: dict[str, object] = example.example_manifest(bootfixture.cache_dir())
    except bootfixture.FixtureUnavailable as exc:
        pytest.skip(f"cannot build the example cloudlet: {exc}")
    return manifest


def test_readme_demo_renders_raw_and_qcow2(example_manifest: dict[str, object],
                                           tmp_path: Path) -> None:
    env = dict(os.environ, CLOUDLETS_CACHE_DIR=str(bootfixture.cache_dir() / "example-cache"),
               CLOUDLETS_HOME=str(tmp_path / "home"))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--output", str(tmp_path / "out")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    raw = tmp_path / "out" / "tiny-debian-1.0.raw"
    qcow2 = tmp_path / "out" / "tiny-debian-1.0.qcow2"
    assert str(raw) in proc.stdout and str(qcow2) in proc.stdout
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(qcow2)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2" and "backing-filename" not in info
    assert info["virtual-size"] == raw.stat().st_size
    # The demo may be run again: it replaces its own output.
    again = subprocess.run([sys.executable, str(SCRIPT), "--output", str(tmp_path / "out")],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [qcow2.name, raw.name]


def test_the_example_renders_on_its_own(example_manifest: dict[str, object],
                                        tmp_path: Path) -> None:
    """The README's two commands: write the renderable manifest, then render
    it with the plain CLI and the example's own config."""
    env = dict(os.environ, CLOUDLETS_CACHE_DIR=str(bootfixture.cache_dir() / "example-cache"),
               CLOUDLETS_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))
    written = subprocess.run(
        [sys.executable, str(SCRIPT), "--write-manifest", "tiny-debian.json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert written.returncode == 0, written.stderr
    manifest = json.loads((tmp_path / "tiny-debian.json").read_text())
    assert manifest["filesystem"]["sha256"] == example_manifest["filesystem"]["sha256"]  # type: ignore[index]
    rendered = subprocess.run(
        [sys.executable, "-m", "cloudlets", "render", "tiny-debian.json", "--allow-file-urls",
         "--format", "raw", "--output", "out/", "--config",
         str(REPO / "examples" / "tiny-debian" / "config.json"), "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rendered.returncode == 0, rendered.stderr
    result = json.loads(rendered.stdout)
    assert result["manifest"]["name"] == "tiny-debian"
    assert (tmp_path / "out" / "tiny-debian-1.0.raw").stat().st_size > 64 * 1024 * 1024


def assert_boots_with_the_rendered_files(image: Path, firmware: str, disk_format: str,
                                         tmp_path: Path) -> None:
    """``image`` boots under QEMU and the guest prints the rendered files."""
    booted = bootfixture.boot(image, firmware=firmware, disk_format=disk_format,
                              workdir=tmp_path / "boot", timeout=90)
    context = f"console tail after {booted.seconds:.1f}s:\n{booted.tail()}"
    assert not booted.timed_out, context
    assert bootfixture.MARKER in booted.console, context
    for section, text in EXPECTED.items():
        assert bootfixture.console_section(booted.console, section) == text, context


@pytest.mark.boot
@pytest.mark.parametrize(("disk_format", "firmware", "one_pass"),
                         [("raw", "bios", False), ("qcow2", "uefi", True)],
                         ids=["raw-bios-two-pass", "qcow2-uefi-one-pass"])
def test_rendered_example_boots_with_the_render_config(
    example_manifest: dict[str, object], tmp_path: Path, disk_format: str, firmware: str,
    one_pass: bool,
) -> None:
    manifest = dict(example_manifest)
    epoch = None
    if one_pass:  # a root size and a clock: mke2fs reads the tree while it is read
        manifest["boot"] = {**manifest["boot"], "root": {"size": "96M"}}  # type: ignore[dict-item]
        epoch = 1_700_000_000
    renderer = Renderer(cache_dir=tmp_path / "cache",  # build the base, do not reuse one
                        data_dir=tmp_path / "home", ex_allow_file_urls=True,
                        ex_source_date_epoch=epoch)
    result = renderer.render(manifest, str(tmp_path / "out") + "/", storage="local",
                             format=disk_format, config=CONFIG)
    assert result.details["rootfs"].get("streamed", False) is one_pass
    assert result.details["disk"]["base_cached"] is False
    assert result.details["rootfs"]["templates"] == [
        "/etc/hostname", "/etc/motd", "/etc/network/interfaces", "/etc/resolv.conf"]
    image = Path(result.primary.location.removeprefix("file://"))
    assert_boots_with_the_rendered_files(image, firmware, disk_format, tmp_path)


@pytest.mark.boot
def test_a_qcow2_rerender_from_the_saved_prefix_state_boots(
    example_manifest: dict[str, object], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The second render over a cached base copies the qcow2's prefix (the
    unpatched base) under the hash state saved beside the base, and puts the
    patched clusters after it (their stale copies in the prefix unused):
    that file boots and the guest sees the rendered files."""
    from cloudlets.drivers.formats import qcow2_writer

    monkeypatch.setattr(qcow2_writer, "MEMO_SETTLED_NS", 0)
    monkeypatch.setattr(qcow2_writer, "_prefix_memo", type(qcow2_writer._prefix_memo)())
    renderer = Renderer(cache_dir=tmp_path / "cache", data_dir=tmp_path / "home",
                        ex_allow_file_urls=True)
    first = renderer.render(example_manifest, str(tmp_path / "first") + "/", storage="local",
                            format="qcow2", config=CONFIG)
    assert list((tmp_path / "cache" / "bases").glob("*.qcow2-prefix"))
    qcow2_writer._prefix_memo.clear()  # the state comes from the file, as in a fresh process
    again = renderer.render(example_manifest, str(tmp_path / "again") + "/", storage="local",
                            format="qcow2", config=CONFIG)
    assert again.details["disk"]["base_cached"] is True
    assert again.primary.sha256 == first.primary.sha256
    image = Path(again.primary.location.removeprefix("file://"))
    assert_boots_with_the_rendered_files(image, "bios", "qcow2", tmp_path)
