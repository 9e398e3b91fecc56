"""The Renderer end to end on small tarballs: fetch over HTTP on 127.0.0.1,
rootfs, templates, disk, format, storage; outputs read back with real tools."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import pytest

from cloudlets import (
    DiskError,
    FetchError,
    Manifest,
    ManifestError,
    Presets,
    Renderer,
    StorageError,
    TemplateError,
    UnsafeArchiveError,
)
from cloudlets.drivers.base import (
    DiskImage,
    FormatContext,
    FormatDriver,
    OutputFile,
    UploadSource,
)
from cloudlets.drivers.storage.local import LocalStorage
from cloudlets.drivers.types import FormatCapability
from cloudlets.renderer import plan_output
from cloudlets.rootfs import RootTree
from tests.netpolicy import LOOPBACK_HOSTS, loopback_policy

HOSTNAME_TEMPLATE = b"{{ hostname }}\n"
INTERFACES_TEMPLATE = b"""{% for i in ip.interfaces %}iface {{ i.name }} \
{{- ' dhcp' if i.dhcp else ' static' }}
{% if not i.dhcp %}  address {{ i.address }}/{{ i.prefix }}
{% endif %}{% endfor %}nameservers {{ dns.nameservers | join(' ') }}
"""


def make_tarball(files: dict[str, bytes], dirs: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for directory in ("boot", "etc", "etc/network", "var", "var/log", "tmp", *dirs):
            info = tarfile.TarInfo(directory)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 1_600_000_000
            archive.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 1_600_000_000
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


BASE_FILES = {
    "boot/vmlinuz": b"not really a kernel\n" * 100,
    "etc/hostname": HOSTNAME_TEMPLATE,
    "etc/network/interfaces": INTERFACES_TEMPLATE,
    "var/log/old.log": b"volatile\n",
    "tmp/junk": b"volatile\n",
}


@pytest.fixture
def cloudlet(static_http: tuple[str, Path]) -> Callable[..., dict[str, Any]]:
    """Publish a tarball on the loopback HTTP server; return its manifest."""
    base, root = static_http

    def publish(files: dict[str, bytes] | None = None, name: str = "tiny",
                dirs: tuple[str, ...] = (), **extra: Any) -> dict[str, Any]:
        data = make_tarball(files if files is not None else BASE_FILES, dirs)
        digest = hashlib.sha256(data).hexdigest()
        (root / f"{digest}.tar.gz").write_bytes(data)
        manifest = {
            "name": name, "version": "1.0",
            "filesystem": {"url": f"{base}/{digest}.tar.gz", "sha256": digest,
                           "size": len(data)},
            "boot": {"kernel": "/boot/vmlinuz", "cmdline": "console=ttyS0"},
            "args": {"hostname": {"type": "string", "default": "tiny-host"}},
            "templates": ["/etc/hostname", "/etc/network/interfaces"],
            "persistent": ["/var/log"],
            "volatile": ["/var/log/.+", "/tmp/.+"],
        }
        manifest.update(extra)
        return manifest

    return publish


@pytest.fixture
def renderer(tmp_path: Path) -> Renderer:
    return Renderer(cache_dir=tmp_path / "cache", data_dir=tmp_path / "data",
                    work_dir=tmp_path / "work", ex_source_date_epoch=1_700_000_000,
                    ex_allow_hosts=LOOPBACK_HOSTS)


def root_partition_offset(disk: Path) -> int:
    table = json.loads(subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True,
                                      text=True, check=True, timeout=30).stdout)
    partitions = table["partitiontable"]["partitions"]
    largest = max(partitions, key=lambda p: p["size"])
    return int(largest["start"]) * 512


def read_from_disk(disk: Path, path: str) -> bytes:
    image = f"{disk}?offset={root_partition_offset(disk)}"
    result = subprocess.run(["debugfs", "-R", f"cat {path}", image], capture_output=True,
                            check=True, timeout=30)
    return result.stdout


def ls_disk(disk: Path, path: str) -> str:
    image = f"{disk}?offset={root_partition_offset(disk)}"
    return subprocess.run(["debugfs", "-R", f"ls -l {path}", image], capture_output=True,
                          text=True, check=True, timeout=30).stdout


CONFIG = {"hostname": "web1",
          "ip": {"interfaces": [{"name": "eth0", "address": "192.0.2.10", "prefix": 24}]},
          "dns": {"nameservers": ["192.0.2.53"]}}


def test_render_raw_end_to_end(renderer: Renderer, cloudlet: Callable[..., dict[str, Any]],
                               tmp_path: Path) -> None:
    seen: list[str] = []
    result = renderer.render(cloudlet(), str(tmp_path / "out") + "/", storage="local",
                             format="raw", config=CONFIG,
                             progress=lambda stage, done, total: seen.append(stage))
    disk = Path(result.primary.location)
    assert disk == tmp_path / "out" / "tiny-1.0.raw"
    assert result.primary.sha256 == hashlib.sha256(disk.read_bytes()).hexdigest()
    assert result.primary.size == disk.stat().st_size
    assert read_from_disk(disk, "/etc/hostname") == b"web1\n"
    interfaces = read_from_disk(disk, "/etc/network/interfaces").decode()
    assert "iface eth0 static\n  address 192.0.2.10/24\n" in interfaces
    assert "nameservers 192.0.2.53" in interfaces
    metadata = json.loads(read_from_disk(disk, "/etc/cloudlets/image.json"))
    assert metadata["digest"] == result.manifest_digest
    assert metadata["persistent"] == ["/var/log"]
    assert "old.log" not in ls_disk(disk, "/var/log")
    assert "junk" not in ls_disk(disk, "/tmp")
    for stage in ("fetch", "rootfs", "templates", "disk", "convert", "store"):
        assert stage in result.timings
        assert stage in seen
    assert result.details["tarball"]["cache_hit"] is False
    assert result.details["rootfs"]["templates"] == ["/etc/hostname", "/etc/network/interfaces"]
    assert result.image_id.startswith("img-")


def test_same_inputs_give_identical_images(renderer: Renderer,
                                           cloudlet: Callable[..., dict[str, Any]],
                                           tmp_path: Path) -> None:
    manifest = cloudlet()
    first = renderer.render(manifest, str(tmp_path / "a") + "/", "local", "raw", CONFIG)
    fresh = Renderer(cache_dir=tmp_path / "cache2", work_dir=tmp_path / "work2",
                     ex_source_date_epoch=1_700_000_000, ex_allow_hosts=LOOPBACK_HOSTS)
    second = fresh.render(manifest, str(tmp_path / "b") + "/", "local", "raw", CONFIG)
    assert first.primary.sha256 == second.primary.sha256
    assert second.details["disk"]["base_cached"] is False
    other = renderer.render(manifest, str(tmp_path / "c") + "/", "local", "raw",
                            {**CONFIG, "hostname": "web2"})
    assert other.primary.sha256 != first.primary.sha256


def test_rerender_reuses_cached_base_and_tarball(renderer: Renderer,
                                                 cloudlet: Callable[..., dict[str, Any]],
                                                 tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    manifest = cloudlet()
    renderer.render(manifest, str(tmp_path / "a") + "/", "local", "raw", CONFIG)
    read_whole: list[RootTree] = []  # the tree's index is bisected, never read whole
    whole = RootTree._read_all
    monkeypatch.setattr(RootTree, "_read_all",
                        lambda tree: (read_whole.append(tree), whole(tree))[1])
    again = renderer.render(manifest, str(tmp_path / "b") + "/", "local", "raw",
                            {"hostname": "second"})
    assert read_whole == []
    assert again.details["tarball"] == {"read": False, "reason": "base filesystem cached"}
    assert "fetch" not in again.timings and "rootfs" not in again.timings
    assert again.details["disk"]["base_cached"] is True
    assert read_from_disk(Path(again.primary.location), "/etc/hostname") == b"second\n"


# A re-render in a fresh process, as `cloudlets render` is: the base is
# cached, so nothing is downloaded and the HTTP stack is never imported (no
# hosts are allowed, as none need to be: they would be checked at once).
_FRESH_RERENDER = """
import json, sys
from cloudlets import Renderer
work = sys.argv[1]
renderer = Renderer(cache_dir=work + "/cache", data_dir=work + "/data", work_dir=work + "/work",
                    ex_source_date_epoch=1_700_000_000)
result = renderer.render(json.loads(sys.argv[2]), work + "/fresh/", "local", "raw",
                         {"hostname": "fresh"})
print(json.dumps({"location": result.primary.location,
                  "fetch_imported": "cloudlets.fetch" in sys.modules}))
"""


def test_rerender_in_a_fresh_process_imports_no_downloader(
        renderer: Renderer, cloudlet: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    manifest = cloudlet()
    renderer.render(manifest, str(tmp_path / "a") + "/", "local", "raw", CONFIG)
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", _FRESH_RERENDER, str(tmp_path),
                           json.dumps(manifest)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)}, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    fresh = json.loads(proc.stdout)
    assert fresh["fetch_imported"] is False
    assert read_from_disk(Path(fresh["location"]), "/etc/hostname") == b"fresh\n"
    # the downloader is still there, under the renderer's URL policy, once asked for
    assert renderer.fetcher is renderer.fetcher
    assert renderer.fetcher.policy.problem("http://127.0.0.1:8080/x") is None


def test_a_manifest_url_is_read_under_the_renderers_url_policy(
        renderer: Renderer, cloudlet: Callable[..., dict[str, Any]],
        static_http: tuple[str, Path], tmp_path: Path) -> None:
    base, root = static_http
    (root / "m.json").write_text(json.dumps(cloudlet()))
    # the renderer's fetcher, which allows this loopback server, reads it
    assert renderer.resolve_config(f"{base}/m.json", {"hostname": "url"}).hostname == "url"
    # a renderer that allows no internal host refuses it, as the default fetcher would
    strict = Renderer(cache_dir=tmp_path / "strict", data_dir=tmp_path / "strict-data")
    with pytest.raises(ManifestError, match="loopback"):
        strict.resolve_config(f"{base}/m.json", {})


def test_boot_disk_size_sizes_the_rendered_disk(renderer: Renderer,
                                               cloudlet: Callable[..., dict[str, Any]],
                                               tmp_path: Path) -> None:
    """The manifest's boot.disk_size reached no one: the disk was the
    partitions plus alignment whatever it said."""
    manifest = cloudlet()
    manifest["boot"] = {**manifest["boot"], "root": {"size": "64M"}, "disk_size": "200M"}
    result = renderer.render(manifest, str(tmp_path / "out") + "/", "local", "raw", CONFIG)
    assert Path(result.primary.location).stat().st_size == 200 * 1024 * 1024
    assert result.details["disk"]["size"] == 200 * 1024 * 1024
    manifest["boot"]["disk_size"] = "65M"
    with pytest.raises(DiskError, match=r"boot.disk_size 65 MiB is too small"):
        renderer.render(manifest, str(tmp_path / "small") + "/", "local", "raw", CONFIG)
    assert not (tmp_path / "small").exists() or not list((tmp_path / "small").iterdir())


def test_qcow2_and_tar_outputs(renderer: Renderer, cloudlet: Callable[..., dict[str, Any]],
                               tmp_path: Path) -> None:
    manifest = cloudlet()
    qcow2 = renderer.render(manifest, str(tmp_path / "out" / "web"), "local", "qcow2", CONFIG)
    assert qcow2.primary.location == str(tmp_path / "out" / "web.qcow2")
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json",
                                      qcow2.primary.location], capture_output=True,
                                     check=True, text=True).stdout)
    assert info["format"] == "qcow2" and "backing-filename" not in info
    tar = renderer.render(manifest, str(tmp_path / "out" / "web.tar.gz"), "local", "tar",
                          CONFIG)
    assert tar.primary.location == str(tmp_path / "out" / "web.tar.gz")
    with tarfile.open(tar.primary.location) as archive:
        names = archive.getnames()
        hostname = archive.extractfile("./etc/hostname")
        assert hostname is not None and hostname.read() == b"web1\n"
    assert "./tmp/junk" not in names and "./etc/cloudlets/image.json" in names
    assert "disk" not in tar.timings and "tree" in tar.timings


def test_existing_output_is_refused_then_overwritten(renderer: Renderer,
                                                     cloudlet: Callable[..., dict[str, Any]],
                                                     tmp_path: Path) -> None:
    target = tmp_path / "out" / "tiny-1.0.raw"
    target.parent.mkdir()
    target.write_bytes(b"precious")
    stages: list[str] = []
    with pytest.raises(StorageError, match=r"refusing to overwrite.*overwrite=True.*--overwrite"):
        renderer.render(cloudlet(), str(tmp_path / "out") + "/", "local", "raw", CONFIG,
                        lambda stage, done, total: stages.append(stage))
    assert stages == []  # refused before any stage ran: nothing fetched, built or converted
    assert target.read_bytes() == b"precious"
    result = renderer.render(cloudlet(), str(tmp_path / "out") + "/", "local", "raw", CONFIG,
                             overwrite=True)
    assert target.stat().st_size == result.primary.size > 8


def test_template_error_leaves_nothing(renderer: Renderer,
                                       cloudlet: Callable[..., dict[str, Any]],
                                       tmp_path: Path) -> None:
    files = {**BASE_FILES, "etc/hostname": b"line one\n{{ nosuchvar }}\n"}
    with pytest.raises(TemplateError) as caught:
        renderer.render(cloudlet(files), str(tmp_path / "out") + "/", "local", "raw", CONFIG)
    assert caught.value.path == "/etc/hostname" and caught.value.line == 2
    assert not (tmp_path / "out").exists()
    assert list((tmp_path / "work").iterdir()) == []


def test_missing_kernel_is_named(renderer: Renderer, cloudlet: Callable[..., dict[str, Any]],
                                 tmp_path: Path) -> None:
    files = {k: v for k, v in BASE_FILES.items() if k != "boot/vmlinuz"}
    with pytest.raises(DiskError, match="/boot/vmlinuz"):
        renderer.render(cloudlet(files), str(tmp_path / "out") + "/", "local", "raw")
    assert not (tmp_path / "out").exists()


def test_hostile_tarball_is_refused(renderer: Renderer, static_http: tuple[str, Path],
                                    cloudlet: Callable[..., dict[str, Any]],
                                    tmp_path: Path) -> None:
    base, root = static_http
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        info = tarfile.TarInfo("../../etc/evil")
        info.size = 4
        archive.addfile(info, io.BytesIO(b"evil"))
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    (root / "evil.tar").write_bytes(data)
    manifest = cloudlet()
    manifest["filesystem"] = {"url": f"{base}/evil.tar", "sha256": digest}
    with pytest.raises(UnsafeArchiveError) as caught:
        renderer.render(manifest, str(tmp_path / "out") + "/", "local", "raw")
    assert "../../etc/evil" in str(caught.value)
    assert not (tmp_path / "out").exists()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_unreachable_origin_is_a_fetch_error(renderer: Renderer,
                                             cloudlet: Callable[..., dict[str, Any]],
                                             tmp_path: Path) -> None:
    from cloudlets.fetch import Fetcher, RetryPolicy

    manifest = cloudlet()
    manifest["filesystem"]["url"] = f"http://127.0.0.1:{_closed_port()}/x.tar.gz"
    quick = Renderer(cache_dir=tmp_path / "c", work_dir=tmp_path / "w",
                     ex_fetcher=Fetcher(policy=loopback_policy(),
                                        retry=RetryPolicy(attempts=2, backoff=0.01,
                                                          max_delay=0.02, total_time=5)))
    with pytest.raises(FetchError, match=r"127\.0\.0\.1"):
        quick.render(manifest, str(tmp_path / "out") + "/", "local", "raw")
    assert not (tmp_path / "out").exists()


def test_mirror_rule_is_used_and_recorded(cloudlet: Callable[..., dict[str, Any]],
                                          static_http: tuple[str, Path],
                                          tmp_path: Path) -> None:
    base, _ = static_http
    manifest = cloudlet()
    filename = manifest["filesystem"]["url"].rsplit("/", 1)[1]
    manifest["filesystem"]["url"] = f"http://mirrors.cloudlets.com/tiny/{filename}"
    renderer = Renderer(cache_dir=tmp_path / "cache", work_dir=tmp_path / "work",
                        mirrors=[{"prefix": "http://mirrors.cloudlets.com/tiny/",
                                  "mirrors": [base + "/"]}])  # the provider's: allowed
    result = renderer.render(manifest, str(tmp_path / "out") + "/", "local", "raw", CONFIG)
    rule = result.details["tarball"]["mirror_rule"]
    assert rule is not None and rule["prefix"] == "http://mirrors.cloudlets.com/tiny/"
    assert result.details["tarball"]["source_url"].startswith(base)


def test_locked_preset_applies_to_the_image(cloudlet: Callable[..., dict[str, Any]],
                                            tmp_path: Path) -> None:
    from cloudlets import LockedKeyError

    presets = Presets(values={"dns": {"nameservers": ["198.51.100.53"]}},
                      locked=frozenset({"dns.nameservers"}))
    renderer = Renderer(cache_dir=tmp_path / "cache", work_dir=tmp_path / "work",
                        presets=presets, ex_allow_hosts=LOOPBACK_HOSTS)
    with pytest.raises(LockedKeyError):
        renderer.render(cloudlet(), str(tmp_path / "o") + "/", "local", "raw",
                        {"dns": {"nameservers": ["192.0.2.1"]}})
    result = renderer.render(cloudlet(), str(tmp_path / "o") + "/", "local", "raw",
                             {"hostname": "h"})
    assert b"nameservers 198.51.100.53" in read_from_disk(
        Path(result.primary.location), "/etc/network/interfaces")


class TwoFiles(FormatDriver):
    """A two-artifact format for the rollback test."""

    name: ClassVar[str] = "two-files"
    description: ClassVar[str] = "two files"
    capabilities: ClassVar[FormatCapability] = FormatCapability.MULTI_ARTIFACT

    def convert(self, context: FormatContext) -> list[OutputFile]:
        outputs = []
        for suffix in (".a", ".b"):
            path = context.workdir / f"{context.basename}{suffix}"
            path.write_bytes(suffix.encode() * 10)
            outputs.append(OutputFile(role=suffix[1:], path=path, name=path.name))
        return outputs


class RefusesB(LocalStorage):
    """Local storage whose disk 'fills up' on files ending in .b."""

    name: ClassVar[str] = "refuses-b"

    def _upload(self, source: UploadSource, location: str, *, overwrite: bool) -> str:
        if location.endswith(".b"):
            raise StorageError("disk full", location)
        return super()._upload(source, location, overwrite=overwrite)


def test_half_stored_output_is_rolled_back(renderer: Renderer,
                                           cloudlet: Callable[..., dict[str, Any]],
                                           tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="disk full"):
        renderer.render(cloudlet(), str(tmp_path / "out" / "x"), RefusesB(), TwoFiles())
    assert not (tmp_path / "out" / "x.a").exists()
    assert not (tmp_path / "out" / "x.b").exists()


@pytest.mark.parametrize(("output", "extension", "basename", "names", "expected"), [
    ("out/", ".ovf", "w-1", ["w-1.ovf", "w-1.vmdk"], ["out/w-1.ovf", "out/w-1.vmdk"]),
    ("out/web", ".ovf", "web", ["web.ovf", "web.vmdk"], ["out/web.ovf", "out/web.vmdk"]),
    ("out/web.ovf", ".ovf", "web", ["web.ovf", "web.mf"], ["out/web.ovf", "out/web.mf"]),
    ("out/web.ovf", "", "web.ovf", ["web.ovf.x"], ["out/web.ovf.x"]),
    ("web.tar.gz", ".tar.gz", "web", ["web.tar.gz"], ["web.tar.gz"]),
    ("s3://b/k/", ".raw", "w-1", ["w-1.raw"], ["s3://b/k/w-1.raw"]),
    ("s3://b/k/disk", ".raw", "disk", ["disk.raw"], ["s3://b/k/disk.raw"]),
])
def test_output_plan(output: str, extension: str, basename: str, names: list[str],
                     expected: list[str]) -> None:
    plan = plan_output(output, "w-1", extension=extension)
    assert plan.basename == basename and not plan.block
    assert plan.locations(names) == expected


def test_output_plan_for_a_block_target() -> None:
    plan = plan_output("nbd://127.0.0.1:10809/lun0", "w-1", extension=".raw", block=True)
    assert plan.block and plan.locations(["w-1.raw"]) == ["nbd://127.0.0.1:10809/lun0"]
    with pytest.raises(StorageError, match="a block target holds one image"):
        plan.locations(["w-1.img", "w-1.cfg"])
    with pytest.raises(StorageError, match="empty"):
        plan_output("", "w-1")


def test_named_output_names_the_files_inside_each_other(
        renderer: Renderer, cloudlet: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    """A base name (not a directory) reaches the format before it runs: the
    OVF descriptor and .mf name the stored VMDK, the Xen config its disk."""
    result = renderer.render(cloudlet(), str(tmp_path / "out" / "vm"), "local", "ovf")
    stored = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert stored == ["vm.mf", "vm.ovf", "vm.vmdk"]
    descriptor = (tmp_path / "out" / "vm.ovf").read_text()
    assert 'ovf:href="vm.vmdk"' in descriptor and "tiny-1.0.vmdk" not in descriptor
    assert "SHA256(vm.vmdk)= " in (tmp_path / "out" / "vm.mf").read_text()
    assert result.primary.location.endswith("vm.ovf")
    renderer.render(cloudlet(), str(tmp_path / "xen" / "guest.img"), "local", "xen")
    config = (tmp_path / "xen" / "guest.cfg").read_text()
    assert "/var/lib/xen/images/guest.img'" in config
    assert (tmp_path / "xen" / "guest.img").is_file()


def test_tar_format_needs_no_boot_section(renderer: Renderer,
                                          cloudlet: Callable[..., dict[str, Any]],
                                          tmp_path: Path) -> None:
    manifest = cloudlet()
    del manifest["boot"]
    result = renderer.render(manifest, str(tmp_path / "t") + "/", "local", "tar",
                             {"hostname": "treeonly"})
    with tarfile.open(Path(result.primary.location.removeprefix("file://"))) as archive:
        hostname = archive.extractfile("./etc/hostname")
        assert hostname is not None and hostname.read() == b"treeonly\n"
    with pytest.raises(Exception, match="/boot: a render needs"):
        renderer.render(manifest, str(tmp_path / "r") + "/", "local", "raw")


class FailsToPublish(FormatDriver):
    """A format whose registration step fails after the disk was stored."""

    name: ClassVar[str] = "fails-to-publish"
    capabilities: ClassVar[FormatCapability] = (FormatCapability.BOOTABLE
                                                | FormatCapability.PUBLISH)

    def convert(self, context: FormatContext) -> list[OutputFile]:
        path = context.workdir / f"{context.basename}.img"
        path.write_bytes(b"disk")
        return [OutputFile(role="disk", path=path, name=path.name)]

    def publish(self, context: FormatContext, stored: Any, storage: Any) -> Any:
        assert Path(stored[0].location.removeprefix("file://")).is_file()
        raise StorageError("the consumer refused the image", stored[0].location)


def test_failed_publish_removes_what_was_stored(renderer: Renderer,
                                                cloudlet: Callable[..., dict[str, Any]],
                                                tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="refused"):
        renderer.render(cloudlet(), str(tmp_path / "p") + "/", "local", FailsToPublish())
    assert not (tmp_path / "p").exists()  # nothing left to refuse a retry, no empty dir
    renderer.render(cloudlet(), str(tmp_path / "p") + "/", "local", "raw")


def test_manifest_object_and_path_are_accepted(renderer: Renderer,
                                               cloudlet: Callable[..., dict[str, Any]],
                                               tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps(cloudlet()))
    by_path = renderer.render(str(path), str(tmp_path / "a") + "/", "local", "raw")
    by_object = renderer.render(Manifest.load(path), str(tmp_path / "b") + "/", "local", "raw")
    assert by_path.primary.sha256 == by_object.primary.sha256
    assert by_path.manifest_digest == by_object.manifest_digest


# -- the cold render's one pass: mke2fs reads the tree while the tarball is read --

STREAMED_BOOT = {"kernel": "/boot/vmlinuz", "cmdline": "console=ttyS0", "root": {"size": "64M"}}


def fs_listing(disk: Path) -> dict[str, tuple[str, ...]]:
    """Every path of the root filesystem: mode, owner, size, mtime, xattrs, content digest."""
    image = f"{disk}?offset={root_partition_offset(disk)}"

    def debugfs(request: str) -> bytes:
        return subprocess.run(["debugfs", "-R", request, image], capture_output=True,
                              check=True, timeout=30).stdout

    listing: dict[str, tuple[str, ...]] = {}
    pending = ["/"]
    while pending:
        directory = pending.pop()
        for line in debugfs(f"ls -p {directory}").decode().splitlines():
            fields = line.strip().split("/")  # /inode/mode/uid/gid/name/size/
            if len(fields) < 7 or fields[5] in (".", ".."):
                continue
            _, _, mode, uid, gid, name, size = fields[:7]
            path = directory.rstrip("/") + "/" + name
            stat = debugfs(f"stat {path}").decode()
            mtime = re.search(r"mtime: (0x[0-9a-f]+)", stat)
            assert mtime is not None, stat
            xattrs = debugfs(f"ea_list {path}").decode().strip()
            directory_entry = mode.startswith("04")  # its blocks hold inode numbers
            content = "" if directory_entry else hashlib.sha256(debugfs(f"cat {path}")).hexdigest()
            listing[path] = (mode, uid, gid, size, mtime.group(1), xattrs, content)
            if directory_entry:
                pending.append(path)
    return listing


def root_filesystem_is_clean(disk: Path, tmp_path: Path) -> None:
    offset = root_partition_offset(disk)
    part = tmp_path / "root.ext4"
    with disk.open("rb") as source, part.open("wb") as target:
        source.seek(offset)
        while chunk := source.read(1 << 20):
            target.write(chunk)
    check = subprocess.run(["e2fsck", "-fn", str(part)], capture_output=True, text=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_cold_render_streams_the_tree_into_mke2fs(cloudlet: Callable[..., dict[str, Any]],
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudlets.disk.assemble import BaseStream

    manifest = cloudlet(boot=STREAMED_BOOT)
    one_pass = Renderer(cache_dir=tmp_path / "c1", work_dir=tmp_path / "w1",
                        ex_source_date_epoch=1_700_000_000, ex_allow_hosts=LOOPBACK_HOSTS)
    first = one_pass.render(manifest, str(tmp_path / "a") + "/", "local", "raw", CONFIG)
    assert first.details["rootfs"]["streamed"] is True
    assert first.details["disk"]["base_cached"] is False
    disk = Path(first.primary.location)
    root_filesystem_is_clean(disk, tmp_path)
    assert read_from_disk(disk, "/etc/hostname") == b"web1\n"
    assert "old.log" not in ls_disk(disk, "/var/log")

    # the same inputs built the two-pass way (write the tree's tar, then mke2fs)
    monkeypatch.setattr(BaseStream, "open", classmethod(lambda cls, *a, **k: None))
    two_pass = Renderer(cache_dir=tmp_path / "c2", work_dir=tmp_path / "w2",
                        ex_source_date_epoch=1_700_000_000, ex_allow_hosts=LOOPBACK_HOSTS)
    second = two_pass.render(manifest, str(tmp_path / "b") + "/", "local", "raw", CONFIG)
    assert "streamed" not in second.details["rootfs"]
    listing = fs_listing(disk)
    assert "/etc/cloudlets/image.json" in listing and "/boot/vmlinuz" in listing
    assert listing == fs_listing(Path(second.primary.location))

    # and the streamed base serves re-renders like any cached base
    again = one_pass.render(manifest, str(tmp_path / "c") + "/", "local", "raw",
                            {"hostname": "second"})
    assert again.details["disk"]["base_cached"] is True
    assert read_from_disk(Path(again.primary.location), "/etc/hostname") == b"second\n"


def test_a_tree_that_cannot_be_streamed_is_built_in_two_passes(
        renderer: Renderer, cloudlet: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    files = {**BASE_FILES, "opt/tool/run": b"#!/bin/sh\n"}  # no opt/ member: implied
    result = renderer.render(cloudlet(files, boot=STREAMED_BOOT), str(tmp_path / "out") + "/",
                             "local", "raw", CONFIG)
    assert result.details["rootfs"]["streamed"] is False
    assert result.details["rootfs"]["not_streamed"] == \
        "/opt/tool/run comes before its parent directory"
    disk = Path(result.primary.location)
    assert read_from_disk(disk, "/opt/tool/run") == b"#!/bin/sh\n"
    assert read_from_disk(disk, "/etc/hostname") == b"web1\n"
    assert not list((tmp_path / "cache" / "bases").glob("*partial*"))


def test_a_streamed_tree_that_does_not_fit_is_named_and_leaves_nothing(
        renderer: Renderer, cloudlet: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    from cloudlets import DiskError

    many = {f"var/lib/f{index:05d}": b"" for index in range(5000)}  # 64M has 4096 inodes
    files = {**BASE_FILES, **many}
    with pytest.raises(DiskError, match=r"does not fit; raise boot\.root_size"):
        renderer.render(cloudlet(files, dirs=("var/lib",), boot=STREAMED_BOOT),
                        str(tmp_path / "out") + "/", "local", "raw", CONFIG)
    assert not (tmp_path / "out").exists()
    bases = tmp_path / "cache" / "bases"
    assert [path.name for path in bases.iterdir()] == ["locks"]  # no base, no partial
    assert {path.suffix for path in (bases / "locks").iterdir()} <= {".use", ".fill"}
    assert list((tmp_path / "work").iterdir()) == []


class SeesTheWorkdir(LocalStorage):
    """Local storage that notes which intermediates are still there when it stores."""

    name: ClassVar[str] = "sees-the-workdir"
    workdir: ClassVar[Path]
    seen: ClassVar[list[list[str]]] = []

    def _upload(self, source: UploadSource, location: str, *, overwrite: bool) -> str:
        self.seen.append(sorted(p.name for p in self.workdir.rglob("*")
                                if p.name in ("disk.raw", "base-tree.tar")))
        return super()._upload(source, location, overwrite=overwrite)


@pytest.mark.parametrize("boot", [None, STREAMED_BOOT], ids=["two-pass", "one-pass"])
def test_the_raw_disk_is_gone_before_the_output_is_stored(
        renderer: Renderer, cloudlet: Callable[..., dict[str, Any]], tmp_path: Path,
        boot: dict[str, Any] | None) -> None:
    SeesTheWorkdir.workdir, SeesTheWorkdir.seen = tmp_path / "work", []
    manifest = cloudlet(**({"boot": boot} if boot else {}))
    result = renderer.render(manifest, str(tmp_path / "out") + "/", SeesTheWorkdir(),
                             "qcow2", CONFIG)
    assert SeesTheWorkdir.seen == [[]]  # neither the raw disk nor the tree's tar
    assert result.primary.size == Path(result.primary.location).stat().st_size
    # a raw output is a copy of the disk: the stored image is whole
    raw = renderer.render(manifest, str(tmp_path / "raw") + "/", SeesTheWorkdir(), "raw",
                          CONFIG)
    assert read_from_disk(Path(raw.primary.location), "/etc/hostname") == b"web1\n"


class NotesTheSource(LocalStorage):
    """Local storage that notes whether the stored file is the render's own
    output file (linked into place) and the raw disk itself."""

    name: ClassVar[str] = "notes-the-source"
    workdir: ClassVar[Path]
    seen: ClassVar[list[tuple[bool, bool, bool]]] = []

    def _upload(self, source: UploadSource, location: str, *, overwrite: bool) -> str:
        final = super()._upload(source, location, overwrite=overwrite)
        assert source.path is not None
        disks = list(self.workdir.rglob("disk.raw"))
        self.seen.append((source.disposable, os.path.samefile(source.path, final),
                          any(os.path.samefile(disk, final) for disk in disks)))
        return final


def test_a_local_render_writes_its_output_once(
        renderer: Renderer, cloudlet: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    NotesTheSource.workdir, NotesTheSource.seen = tmp_path / "work", []
    manifest = cloudlet()
    qcow2 = renderer.render(manifest, str(tmp_path / "out") + "/", NotesTheSource(), "qcow2",
                            CONFIG)
    raw = renderer.render(manifest, str(tmp_path / "raw") + "/", NotesTheSource(), "raw",
                          CONFIG)
    # the qcow2 is qemu-img's file linked into place; the raw image is the disk itself
    assert NotesTheSource.seen == [(True, True, False), (True, True, True)]
    assert list((tmp_path / "work").iterdir()) == []
    assert os.stat(raw.primary.location).st_nlink == 1  # the work dir's name is gone
    assert read_from_disk(Path(raw.primary.location), "/etc/hostname") == b"web1\n"
    assert qcow2.primary.sha256 == hashlib.sha256(
        Path(qcow2.primary.location).read_bytes()).hexdigest()


class NotesTheDisk(FormatDriver):
    """A raw format that keeps the DiskImage it was handed."""

    name: ClassVar[str] = "notes-the-disk"
    capabilities: ClassVar[FormatCapability] = FormatCapability.BOOTABLE
    seen: ClassVar[list[DiskImage]] = []

    def convert(self, context: FormatContext) -> list[OutputFile]:
        self.seen.append(context.disk)
        target = context.workdir / f"{context.basename}.raw"
        shutil.copyfile(context.disk.path, target)
        return [OutputFile("disk", target, target.name)]


@pytest.mark.parametrize("boot", [None, STREAMED_BOOT], ids=["two-pass", "one-pass"])
def test_a_format_gets_the_disk_stages_facts_typed(
        renderer: Renderer, cloudlet: Callable[..., dict[str, Any]], tmp_path: Path,
        boot: dict[str, Any] | None) -> None:
    """Root offset, root UUID and clock: the Xen driver parsed the partition
    table and the superblock for them, and read the clock from a dict."""
    NotesTheDisk.seen = []
    manifest = cloudlet(**({"boot": boot} if boot else {}))
    for output in ("a", "b"):  # cold, then from the cached base
        result = renderer.render(manifest, str(tmp_path / output) + "/", "local",
                                 NotesTheDisk(), CONFIG)
        disk = NotesTheDisk.seen[-1]
        stored = Path(result.primary.location)
        assert disk.root_offset == root_partition_offset(stored)
        stats = subprocess.run(["debugfs", "-R", "stats", f"{stored}?offset={disk.root_offset}"],
                               capture_output=True, text=True, check=True, timeout=30).stdout
        assert f"Filesystem UUID:          {disk.root_uuid}" in stats
        assert disk.source_date_epoch == 1_700_000_000
        assert result.details["disk"]["root_uuid"] == disk.root_uuid


def test_an_output_that_is_the_disk_itself_is_kept(tmp_path: Path) -> None:
    from cloudlets.renderer import _discard_intermediates

    disk, other = tmp_path / "disk.raw", tmp_path / "out.qcow2"
    disk.write_bytes(b"disk")
    other.write_bytes(b"qcow2")
    image = DiskImage(path=disk, size=4, firmware="bios", tree_tar=None, details={})
    _discard_intermediates(image, [OutputFile("disk", other, "out.qcow2")])
    assert not disk.exists() and other.exists()
    disk.write_bytes(b"disk")
    os.link(disk, tmp_path / "same.raw")
    _discard_intermediates(image, [OutputFile("disk", tmp_path / "same.raw", "same.raw")])
    assert disk.exists()



@pytest.mark.parametrize("boot", [None, STREAMED_BOOT], ids=["two-pass", "one-pass"])
def test_a_rerender_from_the_cached_base_is_the_image_a_full_render_makes(
        cloudlet: Callable[..., dict[str, Any]], static_http: tuple[str, Path],
        tmp_path: Path, boot: dict[str, Any] | None) -> None:
    manifest = cloudlet(**({"boot": boot} if boot else {}))
    other = {**CONFIG, "hostname": "web2", "dns": {"nameservers": ["192.0.2.54"]}}
    cached = Renderer(cache_dir=tmp_path / "c1", work_dir=tmp_path / "w1",
                      ex_source_date_epoch=1_700_000_000, ex_allow_hosts=LOOPBACK_HOSTS)
    cached.render(manifest, str(tmp_path / "a") + "/", "local", "raw", CONFIG)
    published = {path: path.read_bytes() for path in static_http[1].iterdir()}
    for path in published:  # the re-render must not need the tarball
        path.unlink()
    again = cached.render(manifest, str(tmp_path / "b") + "/", "local", "raw", other)
    assert again.details["tarball"]["read"] is False
    assert again.details["rootfs"]["templates"] == ["/etc/hostname", "/etc/network/interfaces"]
    assert read_from_disk(Path(again.primary.location), "/etc/hostname") == b"web2\n"
    # the same render from scratch, in a fresh cache, from the tarball
    for path, data in published.items():
        path.write_bytes(data)
    fresh = Renderer(cache_dir=tmp_path / "c2", work_dir=tmp_path / "w2",
                     ex_source_date_epoch=1_700_000_000, ex_allow_hosts=LOOPBACK_HOSTS)
    full = fresh.render(manifest, str(tmp_path / "c") + "/", "local", "raw", other)
    assert full.details["tarball"]["cache_hit"] is False
    assert again.primary.sha256 == full.primary.sha256


@pytest.mark.parametrize("boot", [None, STREAMED_BOOT], ids=["two-pass", "one-pass"])
def test_a_composed_qcow2_holds_the_disk_a_whole_raw_render_writes(
        renderer: Renderer, cloudlet: Callable[..., dict[str, Any]], tmp_path: Path,
        boot: dict[str, Any] | None) -> None:
    """qcow2 reads the disk as pieces (the cached base, the patched blocks):
    its content is the raw render's, byte for byte, for templates that grow
    past a block, shrink, and sit in directories of many files."""
    big = b"".join(b"line %d of {{ hostname }}\n" % n for n in range(900))  # ~20 KiB
    many = {f"etc/conf.d/f{n:04d}": b"x" * (n % 7) for n in range(300)}
    files = {**BASE_FILES, **many, "etc/conf.d/big.conf": big}
    manifest = cloudlet(files, dirs=("etc/conf.d",), templates=[
        "/etc/hostname", "/etc/network/interfaces", "/etc/conf.d/big.conf",
        "/etc/conf.d/f0003"], **({"boot": boot} if boot else {}))
    longer = "a-much-longer-name." * 3 + "example"
    for number, config in enumerate([CONFIG, {**CONFIG, "hostname": longer},
                                     {**CONFIG, "hostname": "b"}]):
        qcow2 = renderer.render(manifest, str(tmp_path / f"q{number}") + "/", "local",
                                "qcow2", config)
        raw = renderer.render(manifest, str(tmp_path / f"r{number}") + "/", "local", "raw",
                              config)
        assert qcow2.details["disk"]["composed"] is True
        assert raw.details["disk"]["composed"] is False
        back = tmp_path / f"back{number}.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                        qcow2.primary.location, str(back)], check=True, timeout=120)
        assert hashlib.sha256(back.read_bytes()).hexdigest() == raw.primary.sha256
        hostname = config["hostname"].encode()
        assert read_from_disk(back, "/etc/hostname") == hostname + b"\n"
        assert read_from_disk(back, "/etc/conf.d/big.conf").count(hostname) == 900
        back.unlink()
    # the base is untouched by the patches: one cached base, one metadata image
    assert len(list((tmp_path / "cache" / "bases").glob("*.ext4"))) == 1
    assert len(list((tmp_path / "cache" / "bases").glob("*.metadata"))) == 1


def test_an_ova_rerender_from_cached_grains_is_the_ova_a_cold_render_makes(
        cloudlet: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    """OVA reads the disk as pieces and keeps the base's compressed grains
    beside it; a re-render that reuses them writes the bytes a cold render
    in a fresh cache writes, and holds the raw render's disk."""
    manifest = cloudlet()
    other = {**CONFIG, "hostname": "web2"}
    options = {"ex_source_date_epoch": 1_700_000_000, "ex_allow_hosts": LOOPBACK_HOSTS}
    cached = Renderer(cache_dir=tmp_path / "c1", work_dir=tmp_path / "w1", **options)
    first = cached.render(manifest, str(tmp_path / "a") + "/", "local", "ova", CONFIG)
    assert first.details["disk"]["composed"] is True
    [grains] = (tmp_path / "c1" / "bases").glob("*.vmdk-grains-*")
    again = cached.render(manifest, str(tmp_path / "b") + "/", "local", "ova", other)
    assert again.details["disk"]["base_cached"] is True
    assert list((tmp_path / "c1" / "bases").glob("*.vmdk-grains-*")) == [grains]
    fresh = Renderer(cache_dir=tmp_path / "c2", work_dir=tmp_path / "w2", **options)
    full = fresh.render(manifest, str(tmp_path / "c") + "/", "local", "ova", other)
    assert again.primary.sha256 == full.primary.sha256
    raw = fresh.render(manifest, str(tmp_path / "r") + "/", "local", "raw", other)
    with tarfile.open(again.primary.location) as archive:
        [member] = [m for m in archive.getmembers() if m.name.endswith(".vmdk")]
        archive.extract(member, tmp_path / "unpacked", filter="data")
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "vmdk",
                              raw.primary.location, str(tmp_path / "unpacked" / member.name)],
                             capture_output=True, text=True, timeout=120, check=False)
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_a_qcow2_rerender_over_a_known_prefix_is_the_qcow2_a_cold_render_makes(
        cloudlet: Callable[..., dict[str, Any]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """qcow2 over a cached base starts with the header and the unpatched
    base's clusters; a re-render copies them under the hash state the
    first render kept (in the process, then beside the base for a fresh
    one) and writes the bytes a cold render in a fresh cache writes."""
    from cloudlets.drivers.formats import qcow2_writer

    monkeypatch.setattr(qcow2_writer, "MEMO_SETTLED_NS", 0)
    monkeypatch.setattr(qcow2_writer, "_prefix_memo", type(qcow2_writer._prefix_memo)())
    manifest = cloudlet()
    other = {**CONFIG, "hostname": "web2"}
    options = {"ex_source_date_epoch": 1_700_000_000, "ex_allow_hosts": LOOPBACK_HOSTS}
    cached = Renderer(cache_dir=tmp_path / "c1", work_dir=tmp_path / "w1", **options)
    first = cached.render(manifest, str(tmp_path / "a") + "/", "local", "qcow2", CONFIG)
    assert first.details["disk"]["composed"] is True
    [state] = (tmp_path / "c1" / "bases").glob("*.qcow2-prefix")
    warm = cached.render(manifest, str(tmp_path / "b") + "/", "local", "qcow2", other)
    qcow2_writer._prefix_memo.clear()  # as in a fresh process: the state from the file
    fresh_process = cached.render(manifest, str(tmp_path / "d") + "/", "local", "qcow2",
                                  other)
    fresh = Renderer(cache_dir=tmp_path / "c2", work_dir=tmp_path / "w2", **options)
    cold = fresh.render(manifest, str(tmp_path / "c") + "/", "local", "qcow2", other)
    assert warm.primary.sha256 == fresh_process.primary.sha256 == cold.primary.sha256
    for result in (first, warm, fresh_process, cold):
        image = Path(result.primary.location)
        with open(image, "rb") as handle:
            assert hashlib.file_digest(handle, "sha256").hexdigest() == result.primary.sha256
    assert Path(warm.primary.location).read_bytes() == Path(cold.primary.location).read_bytes()
    # the render with another hostname shares the prefix, up to the L1 table
    header = Path(first.primary.location).read_bytes()[:104]
    l1_offset = int.from_bytes(header[40:48], "big")
    assert int.from_bytes(header[48:56], "big") > l1_offset > 65536  # refcounts after L1
    # the re-renders copied that prefix while they patched the base
    assert "head_start" not in first.details and "head_start" not in cold.details
    for result in (warm, fresh_process):
        assert result.details["head_start"] == {"adopted": True, "bytes": l1_offset}
    assert Path(first.primary.location).read_bytes()[:l1_offset] \
        == Path(warm.primary.location).read_bytes()[:l1_offset]
    assert state.is_file()
    raw = fresh.render(manifest, str(tmp_path / "r") + "/", "local", "raw", other)
    check = subprocess.run(["qemu-img", "check", cold.primary.location],
                           capture_output=True, text=True, timeout=120, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2",
                              raw.primary.location, warm.primary.location],
                             capture_output=True, text=True, timeout=120, check=False)
    assert compare.returncode == 0, compare.stdout + compare.stderr


def _primed(cloudlet: Callable[..., dict[str, Any]], tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch, **options: Any) -> tuple[dict[str, Any], Path]:
    """A cloudlet rendered once as qcow2 (its base and prefix state
    cached) and the cache, for a re-render that gets a head start."""
    from cloudlets.drivers.formats import qcow2_writer

    monkeypatch.setattr(qcow2_writer, "MEMO_SETTLED_NS", 0)
    monkeypatch.setattr(qcow2_writer, "_prefix_memo", type(qcow2_writer._prefix_memo)())
    manifest = cloudlet()
    Renderer(cache_dir=tmp_path / "cache", work_dir=tmp_path / "w0",
             ex_allow_hosts=LOOPBACK_HOSTS).render(
        manifest, str(tmp_path / "first") + "/", "local", "qcow2", CONFIG)
    return manifest, tmp_path / "cache"


def _ahead_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate()
            if t.name == "cloudlets-qcow2-ahead" and t.is_alive()]


def test_a_rerender_that_fails_after_its_head_start_leaves_nothing(
        cloudlet: Callable[..., dict[str, Any]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The prefix copy starts before the templates render: a template that
    fails then stops it and removes its file with the rest of the render."""
    from cloudlets.drivers.formats import qcow2_writer
    from cloudlets.templates import TemplateLimits

    manifest, cache = _primed(cloudlet, tmp_path, monkeypatch)
    closed: list[tuple[bool, bool]] = []  # (its file there before, after)
    close = qcow2_writer.PrefixCopy.close

    def recorded(self: qcow2_writer.PrefixCopy) -> None:
        self._planned.wait(10)
        before = self.target.exists()
        close(self)
        closed.append((before, self.target.exists()))

    monkeypatch.setattr(qcow2_writer.PrefixCopy, "close", recorded)
    strict = Renderer(cache_dir=cache, work_dir=tmp_path / "w1",
                      ex_allow_hosts=LOOPBACK_HOSTS,
                      ex_template_limits=TemplateLimits(max_output_bytes=2))
    with pytest.raises(TemplateError, match="max_output_bytes"):
        strict.render(manifest, str(tmp_path / "out") + "/", "local", "qcow2", CONFIG)
    assert closed[-1][1] is False and len(closed) == 1  # closed by the render, and gone
    assert list((tmp_path / "w1").iterdir()) == []
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    assert _ahead_threads() == []


def test_a_head_start_the_disk_does_not_use_is_removed(
        cloudlet: Callable[..., dict[str, Any]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A patch of too many ranges gets the disk written whole, in the plain
    layout: the prefix copied ahead is dropped, and the image is right."""
    from cloudlets.disk import assemble

    manifest, cache = _primed(cloudlet, tmp_path, monkeypatch)
    monkeypatch.setattr(assemble, "MAX_PATCHED_RANGES", 1)
    again = Renderer(cache_dir=cache, work_dir=tmp_path / "w1", ex_allow_hosts=LOOPBACK_HOSTS)
    result = again.render(manifest, str(tmp_path / "q") + "/", "local", "qcow2",
                          {**CONFIG, "hostname": "whole"})
    assert result.details["disk"]["composed"] is False
    assert result.details["head_start"]["adopted"] is False
    assert [p.name for p in (tmp_path / "q").iterdir()] == [Path(result.primary.location).name]
    assert _ahead_threads() == []
    back = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                    result.primary.location, str(back)], check=True, timeout=120)
    assert read_from_disk(back, "/etc/hostname") == b"whole\n"


def test_a_patch_of_too_many_ranges_gets_the_whole_disk_written(
        renderer: Renderer, cloudlet: Callable[..., dict[str, Any]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from cloudlets.disk import assemble

    monkeypatch.setattr(assemble, "MAX_PATCHED_RANGES", 1)
    result = renderer.render(cloudlet(), str(tmp_path / "q") + "/", "local", "qcow2", CONFIG)
    assert result.details["disk"]["composed"] is False
    back = tmp_path / "back.raw"
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                    result.primary.location, str(back)], check=True, timeout=120)
    assert read_from_disk(back, "/etc/hostname") == b"web1\n"


def test_a_damaged_tree_index_means_reading_the_tarball(renderer: Renderer,
                                                        cloudlet: Callable[..., dict[str, Any]],
                                                        tmp_path: Path) -> None:
    manifest = cloudlet()
    renderer.render(manifest, str(tmp_path / "a") + "/", "local", "raw", CONFIG)
    (index,) = (tmp_path / "cache" / "bases").glob("*.tree.json")
    index.write_text("{not json")
    again = renderer.render(manifest, str(tmp_path / "b") + "/", "local", "raw",
                            {"hostname": "second"})
    assert again.details["tarball"]["cache_hit"] is True  # read, and the index rewritten
    assert again.details["disk"]["base_cached"] is True
    assert read_from_disk(Path(again.primary.location), "/etc/hostname") == b"second\n"
    assert json.loads(index.read_text().splitlines()[0])["format"] == RootTree.INDEX_FORMAT


# -- the tarball is read while it downloads ----------------------------------------------

def _served_manifest(url: str, data: bytes) -> dict[str, Any]:
    return {"name": "tiny", "version": "1.0",
            "filesystem": {"url": url, "sha256": hashlib.sha256(data).hexdigest(),
                           "size": len(data)},
            "boot": STREAMED_BOOT, "templates": ["/etc/hostname"]}


def test_a_download_that_starts_over_under_its_reader_is_read_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    from cloudlets.disk.assemble import BaseStream
    from cloudlets.fetch import Fetcher, RetryPolicy
    from tests.httpfaults import FaultServer, Route

    # 3 MiB that do not compress: the fetcher gets them in several chunks
    files = {**BASE_FILES, "opt/blob": random.Random(3).randbytes(3 << 20)}
    data = make_tarball(files, ("opt",))
    fetcher = Fetcher(policy=loopback_policy(), connect_timeout=2, read_timeout=0.5,
                      retry=RetryPolicy(attempts=3, backoff=0.01, max_delay=0.02))
    with FaultServer() as server:
        # The first answer stalls after 1.5 MiB (the reader has taken the first
        # chunk meanwhile); the retry's Range is ignored: a 200 from byte 0.
        route = server.add("/t.tar.gz", Route(data, stall_after=3 << 19, ranges=False,
                                              etag=None))
        manifest = _served_manifest(server.url("/t.tar.gz"), data)
        renderer = Renderer(cache_dir=tmp_path / "c1", work_dir=tmp_path / "w1",
                            ex_source_date_epoch=1_700_000_000, ex_fetcher=fetcher)
        result = renderer.render(manifest, str(tmp_path / "a") + "/", "local", "raw", CONFIG)
        assert route.requests == 2
        assert result.details["tarball"]["read_while_fetched"] is True
        assert result.details["rootfs"]["streamed"] is False
        assert result.details["rootfs"]["not_streamed"] == "the download started over while read"
        disk = Path(result.primary.location)
        assert read_from_disk(disk, "/opt/blob") == files["opt/blob"]
        assert read_from_disk(disk, "/etc/hostname") == b"web1\n"

        # the same image as a two-pass render whose download went through at once
        monkeypatch.setattr(BaseStream, "open", classmethod(lambda cls, *a, **k: None))
        clean = Renderer(cache_dir=tmp_path / "c2", work_dir=tmp_path / "w2",
                         ex_source_date_epoch=1_700_000_000, ex_fetcher=fetcher)
        second = clean.render(manifest, str(tmp_path / "b") + "/", "local", "raw", CONFIG)
        assert route.requests == 3 and "streamed" not in second.details["rootfs"]
        assert second.primary.sha256 == result.primary.sha256


def test_a_tarball_that_fails_verification_after_it_was_read_leaves_nothing(
        tmp_path: Path, static_http: tuple[str, Path]) -> None:
    from cloudlets import IntegrityError

    def plain_tar(hostname: bytes) -> bytes:  # uncompressed: same size, parses either way
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            for name, data in (("boot/vmlinuz", b"kernel\n"), ("etc/hostname", hostname)):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 1_600_000_000
                archive.addfile(info, io.BytesIO(data))
        return buffer.getvalue()

    base, root = static_http
    good, tampered = plain_tar(b"{{ hostname }}\n"), plain_tar(b"{{ hostnamf }}\n")
    assert len(good) == len(tampered)
    (root / "t.tar").write_bytes(tampered)
    renderer = Renderer(cache_dir=tmp_path / "cache", work_dir=tmp_path / "work",
                        ex_source_date_epoch=1_700_000_000, ex_allow_hosts=LOOPBACK_HOSTS)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        renderer.render(_served_manifest(f"{base}/t.tar", good), str(tmp_path / "out") + "/",
                        "local", "raw", CONFIG)
    # mke2fs was fed the tree: and still no base, no tarball, no output
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()
                and "locks" not in p.parts]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_a_render_asks_the_storage_about_its_primary_location_once_before_uploading(
        renderer: Renderer, cloudlet: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    from cloudlets.drivers.storage.local import LocalStorage

    asked: list[str] = []

    class Counting(LocalStorage):
        def exists(self, location: str) -> bool:
            asked.append(location)
            return super().exists(location)

    result = renderer.render(cloudlet(), str(tmp_path / "out") + "/", Counting(), "raw", CONFIG)
    primary = result.primary.location
    # once before any work, once by the upload's own refusal to overwrite
    assert asked.count(primary) == 2, asked


class _Recorder:
    """A progress callback keeping every report, checking each stage's as
    it goes: started as ``(stage, 0, None)``, then bytes against one total,
    never going back."""

    def __init__(self) -> None:
        self.reports: dict[str, list[tuple[int, int | None]]] = {}

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        self.reports.setdefault(stage, []).append((done, total))

    def measured(self, stage: str) -> list[tuple[int, int]]:
        reports = self.reports[stage]
        assert reports[0] == (0, None), reports
        rest = [(done, total) for done, total in reports[1:] if total is not None]
        assert len(rest) == len(reports) - 1 and rest, reports
        assert len({total for _, total in rest}) == 1, reports
        dones = [done for done, _ in rest]
        assert dones == sorted(dones) and dones[0] > 0 and dones[-1] == rest[-1][1], reports
        return rest


BLOB = {"usr/lib/a": bytes(range(256)) * 4096 * 2,  # 2 MiB each
        "usr/lib/b": bytes(range(255, -1, -1)) * 4096 * 2}


def test_disk_rootfs_tree_and_convert_stages_report_bytes(
        renderer: Renderer, cloudlet: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    manifest = cloudlet({**BASE_FILES, **BLOB}, dirs=("usr", "usr/lib"))
    cold = _Recorder()
    result = renderer.render(manifest, str(tmp_path / "a") + "/", storage="local",
                             format="raw", progress=cold)
    assert "rootfs" not in {s for s, r in cold.reports.items() if len(r) > 1}  # fetch says it
    disk = cold.measured("disk")
    # the tree written as a tar, read by mke2fs, then the root filesystem copied:
    # reported on the way, not only at the end
    assert len(disk) >= 3 and disk[0][0] < disk[-1][1] // 2
    assert cold.measured("convert")[-1] == (result.primary.size,) * 2
    # The same tarball again (another version of the cloudlet): read from the cache.
    again = _Recorder()
    renderer.render({**manifest, "version": "2.0"}, str(tmp_path / "b") + "/",
                    storage="local", format="tar", progress=again)
    assert again.measured("rootfs")[-1] == (manifest["filesystem"]["size"],) * 2
    tree = again.measured("tree")
    assert len(tree) >= 2 and tree[-1][0] > 4 * 1024 * 1024
    converted = again.measured("convert")
    assert len(converted) >= 2 and "disk" not in again.reports


def test_streamed_disk_reports_the_root_filesystem(
        renderer: Renderer, cloudlet: Callable[..., dict[str, Any]], tmp_path: Path) -> None:
    manifest = cloudlet({**BASE_FILES, **BLOB}, dirs=("usr", "usr/lib"))
    manifest["boot"]["root"] = {"size": 192 * 1024 * 1024}
    seen = _Recorder()
    result = renderer.render(manifest, str(tmp_path / "a") + "/", storage="local",
                             format="qcow2", progress=seen)
    assert result.details["rootfs"]["streamed"] is True
    assert seen.measured("disk")[-1][1] == 192 * 1024 * 1024  # the base, composed
    converted = seen.measured("convert")
    assert converted[-1][0] == json.loads(subprocess.run(
        ["qemu-img", "info", "--output=json", result.primary.location], capture_output=True,
        check=True, timeout=60).stdout)["virtual-size"]
