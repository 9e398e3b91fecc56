"""The Xen driver against Xen's own tools, without a hypervisor.

Debian's Xen 4.17 packages are fetched with ``apt-get download`` and unpacked
with ``dpkg-deb -x`` into the test cache (nothing is installed or committed):

* ``pygrub`` (xen-utils-4.17, with its ``grub`` parsers and the
  ``xenfsimage`` extension and plugins) must find the kernel, initrd and
  arguments in the PV image; the kernel and initrd it extracts then boot the
  image in QEMU;
* the ``xl`` domain configuration is read with libxlutil, Xen's own
  configuration parser (``xlu_cfg_readfile``), and its ``disk`` line with
  ``xlu_disk_parse``, loaded with ctypes. ``xl -N create`` (the dry run)
  cannot be used: ``xl`` opens the hypervisor's privcmd interface before
  reading any configuration, so it needs a Xen host. The ``vif`` lines are
  parsed by ``xl`` itself (``parse_nic_config`` lives in the ``xl`` binary,
  not in a library), so only their list syntax is checked by libxlutil.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cloudlets.config import resolve_config
from cloudlets.disk import BootSpec, build_disk
from cloudlets.drivers.base import DiskImage, FormatContext, OutputFile
from cloudlets.drivers.formats.xen import XenFormat, pygrub_config
from cloudlets.drivers.providers import get_driver
from cloudlets.drivers.types import DriverKind, Format
from cloudlets.errors import ConfigurationError, FormatError
from cloudlets.manifest import Manifest
from cloudlets.testing.boot import (
    MARKER,
    BootCloudlet,
    FixtureUnavailable,
    build_boot_cloudlet,
    cache_dir,
)
from cloudlets.testing.formats import FormatDriverConformance, synthetic_disk

#: Library packages pygrub's extension and libxlutil need besides xen-utils.
XEN_LIBRARIES = ("libxencall1", "libxendevicemodel1", "libxenevtchn1", "libxenforeignmemory1",
                 "libxengnttab1", "libxenhypfs1", "libxenstore4", "libxentoolcore1",
                 "libxentoollog1", "libyajl2")
#: Load order for ctypes (dependencies first).
XL_LIBS = ("libxentoolcore.so.1", "libxentoollog.so.1", "libyajl.so.2", "libxencall.so.1",
           "libxenevtchn.so.1", "libxengnttab.so.1", "libxenforeignmemory.so.1",
           "libxendevicemodel.so.1", "libxenhypfs.so.1", "libxenstore.so.4")
CMDLINE = "console=ttyS0"
MiB = 1024 * 1024


# -- Xen's tools, unpacked ---------------------------------------------------------


@dataclass(frozen=True)
class XenTools:
    root: Path
    xen_version: str

    @property
    def lib(self) -> Path:
        return self.root / "usr" / "lib" / "x86_64-linux-gnu"

    @property
    def xen_lib(self) -> Path:
        return self.root / "usr" / "lib" / f"xen-{self.xen_version}"

    def pygrub_env(self) -> dict[str, str]:
        fsimage = self.xen_lib / "lib" / "x86_64-linux-gnu"
        return dict(os.environ, LD_LIBRARY_PATH=f"{self.lib}:{fsimage}",
                    PYTHONPATH=str(self.xen_lib / "lib" / "python"),
                    XEN_FSIMAGE_FSDIR=str(fsimage / "xenfsimage"), TERM="dumb")

    def pygrub(self, image: Path, output_dir: Path) -> subprocess.CompletedProcess[str]:
        output_dir.mkdir(parents=True, exist_ok=True)
        return subprocess.run(
            [sys.executable, str(self.xen_lib / "bin" / "pygrub"), "--quiet",
             "--output-format=simple", f"--output-directory={output_dir}", str(image)],
            capture_output=True, text=True, env=self.pygrub_env(), check=False, timeout=120,
            stdin=subprocess.DEVNULL)


def _apt(args: list[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, cwd=cwd, check=False,
                              timeout=300)
    except FileNotFoundError as exc:
        raise FixtureUnavailable(f"{args[0]} is not installed (not a Debian host?)") from exc
    if proc.returncode != 0:
        raise FixtureUnavailable(f"{' '.join(args)} failed: {proc.stderr.strip()[-400:]}")
    return proc.stdout


def _xen_tools() -> XenTools:
    names = _apt(["apt-cache", "search", "--names-only", r"^xen-utils-4\.[0-9]+$"]).split()
    packages = sorted((n for n in names if re.fullmatch(r"xen-utils-4\.\d+", n)),
                      key=lambda n: int(n.rsplit(".", 1)[1]))
    if not packages:
        raise FixtureUnavailable("apt knows no xen-utils-4.N package; run apt-get update")
    utils = packages[-1]
    xen_version = utils.removeprefix("xen-utils-")
    wanted = (utils, f"libxenmisc{xen_version}", *XEN_LIBRARIES)
    versions = {}
    for package in wanted:
        text = _apt(["apt-cache", "show", "--no-all-versions", package])
        match = re.search(r"^Version: (\S+)", text, re.MULTILINE)
        if match is None:
            raise FixtureUnavailable(f"apt knows no version of {package}")
        versions[package] = match.group(1)
    key = re.sub(r"[^A-Za-z0-9.+-]", "_", f"{utils}-{versions[utils]}")
    base = cache_dir() / "xen"
    root = base / key
    done = base / f"{key}.done"
    if not done.is_file():
        debs = base / "debs"
        debs.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root, ignore_errors=True)
        for package, version in versions.items():
            pattern = f"{package}_{version.replace(':', '%3a')}_*.deb"
            if not sorted(debs.glob(pattern)):
                _apt(["apt-get", "download", f"{package}={version}"], cwd=debs)
            [deb] = sorted(debs.glob(pattern))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=120)
        done.write_text("\n".join(f"{p}={v}" for p, v in versions.items()) + "\n")
    return XenTools(root=root, xen_version=xen_version)


@pytest.fixture(scope="module")
def xen_tools() -> XenTools:
    try:
        return _xen_tools()
    except FixtureUnavailable as exc:
        pytest.skip(f"Xen's tools cannot be fetched here: {exc}")


# -- a real bootable disk ---------------------------------------------------------


@pytest.fixture(scope="module")
def cloudlet() -> BootCloudlet:
    try:
        return build_boot_cloudlet()
    except FixtureUnavailable as exc:
        pytest.skip(f"boot cloudlet cannot be built here: {exc}")


def _build(cloudlet: BootCloudlet, directory: Path, firmware: str) -> tuple[DiskImage, str]:
    built = build_disk(cloudlet.tree_tar,
                       BootSpec(kernel=cloudlet.kernel, initrd=cloudlet.initrd,
                                cmdline=CMDLINE, firmware=firmware),  # type: ignore[arg-type]
                       directory / f"disk-{firmware}.raw", seed=f"xen-{firmware}",
                       workdir=directory / f"build-{firmware}", base_cache=cache_dir() / "base")
    return built.for_formats(tree_tar=cloudlet.tree_tar), built.root_uuid


@pytest.fixture(scope="module")
def disks(cloudlet: BootCloudlet,
          tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[DiskImage, str]]:
    directory = tmp_path_factory.mktemp("xen-disks")
    return {firmware: _build(cloudlet, directory, firmware) for firmware in ("bios", "uefi")}


def ext4_uuid(image: Path, offset: int) -> str:
    """The UUID in the superblock of the ext4 filesystem at ``offset``."""
    with open(image, "rb") as handle:
        handle.seek(offset + 1024)
        superblock = handle.read(1024)
    assert superblock[0x38:0x3A] == b"\x53\xef"  # the ext magic
    return str(uuid.UUID(bytes=superblock[0x68:0x78]))


def boot_manifest(cloudlet: BootCloudlet) -> Manifest:
    return Manifest({"name": "xenlet", "version": "1",
                     "boot": {"kernel": cloudlet.kernel, "initrd": cloudlet.initrd,
                              "cmdline": CMDLINE},
                     "hardware": {"cpus": 2, "memory": "384M"}})


def convert(tmp_path: Path, disk: DiskImage, manifest: Manifest, driver: XenFormat,
            config: dict[str, Any] | None = None) -> tuple[OutputFile, OutputFile]:
    workdir = tmp_path / "work"
    workdir.mkdir(parents=True)
    context = FormatContext(manifest=manifest, config=resolve_config(manifest, None, config),
                            disk=disk, workdir=workdir, basename=manifest.label)
    image, domain = driver.convert(context)
    return image, domain


def tree_file(cloudlet: BootCloudlet, path: str) -> bytes:
    """A file's content in the cloudlet's tree, symlinks followed."""
    with tarfile.open(cloudlet.tree_tar) as archive:
        name = path.lstrip("/")
        for _ in range(8):
            member = archive.getmember(name)
            if member.issym():
                name = str(Path(name).parent / member.linkname) \
                    if not member.linkname.startswith("/") else member.linkname.lstrip("/")
                continue
            handle = archive.extractfile(member)
            assert handle is not None
            return handle.read()
    raise AssertionError(f"symlink loop at {path}")


def parse_pygrub(stdout: str) -> dict[str, str]:
    result = {}
    for line in stdout.splitlines():
        key, _, value = line.partition(" ")
        if key in ("kernel", "ramdisk", "args"):
            result[key] = value
    return result


# -- conformance --------------------------------------------------------------------


class TestXenPVConformance(FormatDriverConformance):
    """PV patches the image, so the payload check does not apply; the disk is
    the boot cloudlet's (the synthetic disk has no filesystem for pygrub)."""

    @pytest.fixture
    def format_driver(self) -> XenFormat:
        return XenFormat()

    @pytest.fixture
    def disk_image(self, disks: dict[str, tuple[DiskImage, str]]) -> DiskImage:
        return disks["bios"][0]


class TestXenHVMConformance(FormatDriverConformance):
    @pytest.fixture
    def format_driver(self) -> XenFormat:
        return XenFormat(ex_mode="hvm")

    def extract_raw(self, outputs: list[OutputFile], tmp_path: Path) -> Path | None:
        assert outputs[0].role == "disk"
        return outputs[0].path


def test_registered() -> None:
    assert get_driver(DriverKind.FORMAT, Format.XEN) is XenFormat


# -- pygrub -------------------------------------------------------------------------


@pytest.mark.parametrize("firmware", ["bios", "uefi"])
def test_pygrub_finds_kernel_initrd_and_args(tmp_path: Path, xen_tools: XenTools,
                                             cloudlet: BootCloudlet,
                                             disks: dict[str, tuple[DiskImage, str]],
                                             firmware: str) -> None:
    disk, root_uuid = disks[firmware]
    image, _ = convert(tmp_path, disk, boot_manifest(cloudlet), XenFormat())
    result = xen_tools.pygrub(image.path, tmp_path / "pygrub")
    assert result.returncode == 0, result.stderr[-2000:]
    found = parse_pygrub(result.stdout)
    assert Path(found["kernel"]).read_bytes() == tree_file(cloudlet, cloudlet.kernel)
    assert Path(found["ramdisk"]).read_bytes() == tree_file(cloudlet, cloudlet.initrd)
    args = found["args"].split()
    assert args == [f"root=UUID={root_uuid}", "console=ttyS0", "console=hvc0"]
    # the patch touched only the copy, and only the root filesystem
    assert disk.root_offset is not None
    assert ext4_uuid(image.path, disk.root_offset) == root_uuid


def test_pygrub_finds_nothing_in_the_unpatched_disk(tmp_path: Path, xen_tools: XenTools,
                                                    disks: dict[str, tuple[DiskImage, str]]
                                                    ) -> None:
    """The check above can fail: the disk stage's own image has no pygrub config."""
    result = xen_tools.pygrub(disks["bios"][0].path, tmp_path / "pygrub")
    assert result.returncode != 0
    assert "Unable to find partition containing kernel" in result.stderr


def test_existing_config_is_replaced(tmp_path: Path, xen_tools: XenTools,
                                     cloudlet: BootCloudlet,
                                     disks: dict[str, tuple[DiskImage, str]]) -> None:
    disk, root_uuid = disks["bios"]
    first, _ = convert(tmp_path / "a", disk, boot_manifest(cloudlet), XenFormat())
    again = dataclasses.replace(disk, path=first.path)
    manifest = Manifest({"name": "xenlet", "version": "2",
                         "boot": {"kernel": cloudlet.kernel, "initrd": cloudlet.initrd,
                                  "cmdline": "console=ttyS0 quiet"}})
    second, _ = convert(tmp_path / "b", again, manifest, XenFormat())
    result = xen_tools.pygrub(second.path, tmp_path / "pygrub")
    assert result.returncode == 0, result.stderr[-2000:]
    assert parse_pygrub(result.stdout)["args"].split() == [
        f"root=UUID={root_uuid}", "console=ttyS0", "quiet", "console=hvc0"]


def _qemu_direct_boot(tmp_path: Path, kernel: str, initrd: str, args: str,
                      image: Path) -> str:
    console = tmp_path / "console.log"
    proc = subprocess.run(
        ["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "256", "-smp", "1",
         "-nodefaults", "-display", "none", "-no-reboot", "-serial", f"file:{console}",
         "-kernel", kernel, "-initrd", initrd, "-append", args,
         "-drive", f"file={image},format=raw,if=virtio,snapshot=on"],
        capture_output=True, text=True, check=False, timeout=150, stdin=subprocess.DEVNULL)
    text = console.read_text("utf-8", "replace") if console.exists() else ""
    return text + proc.stderr


@pytest.mark.boot
def test_what_pygrub_extracts_boots(tmp_path: Path, xen_tools: XenTools,
                                    cloudlet: BootCloudlet,
                                    disks: dict[str, tuple[DiskImage, str]]) -> None:
    image, _ = convert(tmp_path, disks["bios"][0], boot_manifest(cloudlet), XenFormat())
    result = xen_tools.pygrub(image.path, tmp_path / "pygrub")
    assert result.returncode == 0, result.stderr[-2000:]
    found = parse_pygrub(result.stdout)
    console = _qemu_direct_boot(tmp_path, found["kernel"], found["ramdisk"], found["args"],
                                image.path)
    assert MARKER in console, console[-3000:]


# -- the xl configuration, read by libxlutil --------------------------------------------


class XLConfig:
    """Xen's own configuration parser (libxlutil), loaded with ctypes."""

    def __init__(self, tools: XenTools) -> None:
        for name in XL_LIBS:
            ctypes.CDLL(str(tools.lib / name), mode=ctypes.RTLD_GLOBAL)
        version = tools.xen_version
        ctypes.CDLL(str(tools.lib / f"libxenctrl.so.{version}"), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(tools.lib / f"libxenguest.so.{version}"), mode=ctypes.RTLD_GLOBAL)
        self.xl = ctypes.CDLL(str(tools.lib / f"libxenlight.so.{version}"),
                              mode=ctypes.RTLD_GLOBAL)
        self.xlu = ctypes.CDLL(str(tools.lib / f"libxlutil.so.{version}"))
        self.yajl = ctypes.CDLL(str(tools.lib / "libyajl.so.2"))
        self.libc = ctypes.CDLL(None)
        c_void_p, c_char_p, c_int = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
        self.libc.fopen.restype = c_void_p
        self.libc.fopen.argtypes = [c_char_p, c_char_p]
        self.libc.fclose.argtypes = [c_void_p]
        self.xlu.xlu_cfg_init.restype = c_void_p
        self.xlu.xlu_cfg_init.argtypes = [c_void_p, c_char_p]
        self.xlu.xlu_cfg_readfile.argtypes = [c_void_p, c_char_p]
        self.xlu.xlu_cfg_destroy.argtypes = [c_void_p]
        self.xlu.xlu_cfg_get_string.argtypes = [c_void_p, c_char_p,
                                                ctypes.POINTER(c_char_p), c_int]
        self.xlu.xlu_cfg_get_long.argtypes = [c_void_p, c_char_p,
                                              ctypes.POINTER(ctypes.c_long), c_int]
        self.xlu.xlu_cfg_get_list.argtypes = [c_void_p, c_char_p, ctypes.POINTER(c_void_p),
                                              ctypes.POINTER(c_int), c_int]
        self.xlu.xlu_cfg_get_listitem.restype = c_char_p
        self.xlu.xlu_cfg_get_listitem.argtypes = [c_void_p, c_int]
        self.xlu.xlu_disk_parse.argtypes = [c_void_p, c_int, c_void_p, c_void_p]
        self.xl.libxl_device_disk_init.argtypes = [c_void_p]
        self.xl.libxl_device_disk_dispose.argtypes = [c_void_p]
        self.xl.libxl_device_disk_gen_json.argtypes = [c_void_p, c_void_p]
        self.yajl.yajl_gen_alloc.restype = c_void_p
        self.yajl.yajl_gen_alloc.argtypes = [c_void_p]
        self.yajl.yajl_gen_get_buf.argtypes = [c_void_p, ctypes.POINTER(c_char_p),
                                               ctypes.POINTER(ctypes.c_size_t)]
        self.yajl.yajl_gen_free.argtypes = [c_void_p]

    def parse(self, path: Path, report: Path) -> dict[str, Any]:
        """Read a configuration; return the scalar settings, the list
        settings and the parsed disks, or ``{"error": ..., "report": ...}``."""
        stream = self.libc.fopen(str(report).encode(), b"w")
        cfg = self.xlu.xlu_cfg_init(stream, path.name.encode())
        try:
            rc = self.xlu.xlu_cfg_readfile(cfg, str(path).encode())
            if rc != 0:
                return {"error": rc}
            result: dict[str, Any] = {}
            value = ctypes.c_char_p()
            for key in ("name", "type", "bootloader", "firmware", "boot", "serial",
                        "on_poweroff", "on_reboot", "on_crash"):
                if self.xlu.xlu_cfg_get_string(cfg, key.encode(), ctypes.byref(value), 1) == 0:
                    result[key] = (value.value or b"").decode()
            number = ctypes.c_long()
            for key in ("memory", "vcpus"):
                if self.xlu.xlu_cfg_get_long(cfg, key.encode(), ctypes.byref(number), 1) == 0:
                    result[key] = number.value
            for key in ("disk", "vif"):
                items = ctypes.c_void_p()
                count = ctypes.c_int()
                if self.xlu.xlu_cfg_get_list(cfg, key.encode(), ctypes.byref(items),
                                             ctypes.byref(count), 1) == 0:
                    result[key] = [self.xlu.xlu_cfg_get_listitem(items, i).decode()
                                   for i in range(count.value)]
            result["disks"] = [self._disk(cfg, spec) for spec in result.get("disk", [])]
            return result
        finally:
            self.xlu.xlu_cfg_destroy(cfg)
            self.libc.fclose(stream)

    def _disk(self, cfg: int, spec: str) -> dict[str, Any]:
        disk = ctypes.create_string_buffer(4096)  # larger than libxl_device_disk
        self.xl.libxl_device_disk_init(disk)
        specs = (ctypes.c_char_p * 1)(spec.encode())
        rc = self.xlu.xlu_disk_parse(cfg, 1, specs, disk)
        assert rc == 0, f"xlu_disk_parse refused {spec!r}: {rc}"
        gen = self.yajl.yajl_gen_alloc(None)
        try:
            assert self.xl.libxl_device_disk_gen_json(gen, disk) == 0
            buf = ctypes.c_char_p()
            length = ctypes.c_size_t()
            self.yajl.yajl_gen_get_buf(gen, ctypes.byref(buf), ctypes.byref(length))
            assert buf.value is not None
            parsed: dict[str, Any] = json.loads(buf.value[:length.value])
            return parsed
        finally:
            self.yajl.yajl_gen_free(gen)
            self.xl.libxl_device_disk_dispose(disk)


@pytest.fixture(scope="module")
def xl_config(xen_tools: XenTools) -> Iterator[XLConfig]:
    yield XLConfig(xen_tools)


NETWORK = {"hostname": "xen-guest",
           "ip": {"interfaces": [{"name": "eth0", "dhcp": True, "mac": "00:16:3e:01:02:03"},
                                 {"name": "eth1", "address": "10.1.0.2", "prefix": 24}]}}


def test_pv_domain_config_read_by_libxlutil(tmp_path: Path, xl_config: XLConfig,
                                            cloudlet: BootCloudlet,
                                            disks: dict[str, tuple[DiskImage, str]]) -> None:
    image, domain = convert(tmp_path, disks["bios"][0], boot_manifest(cloudlet),
                            XenFormat(ex_image_dir="/srv/xen", ex_bridge="br-guests"),
                            NETWORK)
    assert (image.name, domain.name) == ("xenlet-1.img", "xenlet-1.cfg")
    assert domain.role == "domain-config"
    parsed = xl_config.parse(domain.path, tmp_path / "report.txt")
    assert "error" not in parsed, (tmp_path / "report.txt").read_text()
    assert parsed["name"] == "xen-guest"
    assert parsed["type"] == "pv"
    assert parsed["bootloader"] == "pygrub"
    assert parsed["memory"] == 384
    assert parsed["vcpus"] == 2
    assert parsed["disks"] == [{"pdev_path": "/srv/xen/xenlet-1.img", "vdev": "xvda",
                                "format": "raw", "readwrite": 1}]
    assert parsed["vif"] == ["mac=00:16:3e:01:02:03,bridge=br-guests", "bridge=br-guests"]


def test_hvm_domain_config_read_by_libxlutil(tmp_path: Path, xl_config: XLConfig,
                                             cloudlet: BootCloudlet,
                                             disks: dict[str, tuple[DiskImage, str]]) -> None:
    for firmware, expected in (("bios", None), ("uefi", "uefi")):
        work = tmp_path / firmware
        disk = disks[firmware][0]
        image, domain = convert(work, disk, boot_manifest(cloudlet), XenFormat(ex_mode="hvm"))
        parsed = xl_config.parse(domain.path, work / "report.txt")
        assert "error" not in parsed, (work / "report.txt").read_text()
        assert parsed["type"] == "hvm"
        assert "bootloader" not in parsed
        assert parsed.get("firmware") == expected
        assert parsed["disks"][0]["pdev_path"].endswith("/xenlet-1.img")
        assert image.path.read_bytes() == disk.path.read_bytes()  # HVM leaves the disk alone


def test_libxlutil_rejects_a_broken_config(tmp_path: Path, xl_config: XLConfig) -> None:
    """The parser check can fail."""
    broken = tmp_path / "broken.cfg"
    broken.write_text('name = "x"\ndisk = [ \'format=raw\'\n')
    report = tmp_path / "report.txt"
    assert xl_config.parse(broken, report).get("error")
    assert "syntax error" in report.read_text()


# -- driver errors -------------------------------------------------------------------


def test_pv_needs_a_root_filesystem(tmp_path: Path) -> None:
    manifest = Manifest({"name": "x", "boot": {"kernel": "/boot/vmlinuz"}})
    with pytest.raises(FormatError, match=r"no root filesystem for pygrub.*root_offset"):
        convert(tmp_path, synthetic_disk(tmp_path), manifest, XenFormat())


def test_pv_reads_the_disk_stages_facts_not_the_disk(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The root offset, UUID and clock come typed from the disk stage: the
    driver no longer parses the partition table and superblock (a disk whose
    table says nothing still gets its configuration where the facts say)."""
    disk = synthetic_disk(tmp_path)
    facts = dataclasses.replace(disk, root_offset=MiB, root_uuid="1234-facts",
                                source_date_epoch=1_650_000_000)
    scripts: list[str] = []

    def debugfs(tool: str, args: list[object], **options: object) -> object:
        if "-f" in args:
            scripts.append(Path(str(args[args.index("-f") + 1])).read_text())
            assert options["env"]["E2FSPROGS_FAKE_TIME"] == "1650000000"  # type: ignore[index]
        assert str(args[-1]).endswith(f"?offset={MiB}")
        return subprocess.CompletedProcess(args, 0, b"", b"")

    monkeypatch.setattr("cloudlets.drivers.formats.xen.run", debugfs)
    manifest = Manifest({"name": "x", "boot": {"kernel": "/boot/vmlinuz"}})
    convert(tmp_path, facts, manifest, XenFormat())
    assert len(scripts) == 1 and "write " in scripts[0]


def test_pv_needs_a_boot_section(tmp_path: Path) -> None:
    manifest = Manifest({"name": "x"})
    with pytest.raises(FormatError, match="boot section"):
        convert(tmp_path, synthetic_disk(tmp_path), manifest, XenFormat())


def test_unexpressible_arguments_are_refused() -> None:
    with pytest.raises(FormatError, match="pygrub"):
        pygrub_config(title="t", kernel="/boot/vmlinuz", initrd=None,
                      cmdline="init='/bin/sh -x'", root_uuid="u")
    text = pygrub_config(title="t", kernel="/boot/vmlinuz", initrd=None,
                         cmdline="console=hvc0 ro", root_uuid="u")
    assert "linux /boot/vmlinuz root=UUID=u ro console=hvc0\n" in text


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="ex_mode"):
        XenFormat(ex_mode="pvh")
    with pytest.raises(ConfigurationError, match="ex_image_dir"):
        XenFormat(ex_image_dir="/srv/it's")


def test_pv_from_a_composed_disk(tmp_path: Path) -> None:
    """A disk made of pieces (the cached base, the patched blocks) is copied
    whole into the output once; pygrub's configuration goes into the copy,
    never into the base it came from."""
    import hashlib

    from cloudlets.disk import ext4
    from cloudlets.testing.formats import COMPOSED_FILES, composed_disk, conformance_manifest

    disk = composed_disk(tmp_path / "composed")
    base = tmp_path / "composed" / "base.raw"
    before = hashlib.sha256(base.read_bytes()).hexdigest()
    image, _ = convert(tmp_path, disk, conformance_manifest(), XenFormat())
    assert hashlib.sha256(base.read_bytes()).hexdigest() == before
    assert image.path.stat().st_size == disk.size
    root = f"{image.path}?offset={disk.root_offset}"
    for name, content in COMPOSED_FILES.items():
        assert ext4.read_file(root, name, len(content)) == content
    grub = subprocess.run(["debugfs", "-R", "cat /boot/grub/grub.cfg", root],
                          capture_output=True, check=True).stdout
    assert b"\tlinux /boot/vmlinuz " in grub and b"console=hvc0" in grub
