"""OVF and OVA: conformance, the descriptor against the DMTF DSP8023 schema
(xmllint, offline), the VMDK against qemu-img, the OVA layout and ``.mf``
digests, and a boot of the VMDK taken out of the OVA."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from cloudlets.config import resolve_config
from cloudlets.drivers.base import DiskImage, FormatContext, FormatDriver, OutputFile
from cloudlets.drivers.formats.ovf import OVAFormat, OVFFormat
from cloudlets.drivers.formats.vmdk import read_descriptor, sparse_header
from cloudlets.drivers.providers import get_driver
from cloudlets.drivers.types import DriverKind, Format
from cloudlets.errors import ConfigurationError
from cloudlets.manifest import Manifest
from cloudlets.testing.boot import FixtureUnavailable, build_boot_cloudlet, cache_dir
from cloudlets.testing.formats import FormatDriverConformance, synthetic_disk

SCHEMAS = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "ovf-schema"
OVF = "http://schemas.dmtf.org/ovf/envelope/1"
RASD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
VMW = "http://www.vmware.com/schema/ovf"
NS = {"ovf": OVF, "rasd": RASD, "vssd": VSSD, "vmw": VMW}


def xmllint_validate(path: Path) -> subprocess.CompletedProcess[str]:
    """Validate against DSP8023 1.1.1 exactly as the schema set's README says."""
    if not (SCHEMAS / "dsp8023_1.1.1.xsd").is_file():
        pytest.fail(f"{SCHEMAS} is missing: CI checks out shared/ beside the repository")
    env = dict(os.environ, XML_CATALOG_FILES=str(SCHEMAS / "catalog.xml"))
    return subprocess.run(
        ["xmllint", "--nonet", "--noout", "--schema", str(SCHEMAS / "dsp8023_1.1.1.xsd"),
         str(path)], capture_output=True, text=True, env=env, check=False, timeout=60)


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False,
                          timeout=120)


def make_context(tmp_path: Path, disk: DiskImage, manifest: Manifest,
                 config: dict[str, object] | None = None, work: str = "w") -> FormatContext:
    workdir = tmp_path / work
    workdir.mkdir()
    return FormatContext(manifest=manifest, config=resolve_config(manifest, None, config),
                         disk=disk, workdir=workdir, basename=manifest.label)


def rich_manifest() -> Manifest:
    return Manifest({
        "name": "webapp", "version": "2.1", "arch": "x86_64", "author": "Example Corp",
        "description": "A web application <server> & friends",
        "hardware": {"cpus": 4, "memory": "1536M", "network": "frontend"},
    })


class TestOVFConformance(FormatDriverConformance):
    @pytest.fixture
    def format_driver(self) -> OVFFormat:
        return OVFFormat()

    def extract_raw(self, outputs: list[OutputFile], tmp_path: Path) -> Path | None:
        [disk] = [o for o in outputs if o.role == "disk"]
        raw = tmp_path / "back.raw"
        subprocess.run(["qemu-img", "convert", "-f", "vmdk", "-O", "raw", str(disk.path),
                        str(raw)], check=True, timeout=120)
        return raw


class TestOVAConformance(FormatDriverConformance):
    @pytest.fixture
    def format_driver(self) -> OVAFormat:
        return OVAFormat()

    def extract_raw(self, outputs: list[OutputFile], tmp_path: Path) -> Path | None:
        with tarfile.open(outputs[0].path) as archive:
            [member] = [m for m in archive.getmembers() if m.name.endswith(".vmdk")]
            archive.extract(member, tmp_path / "ova", filter="data")
        raw = tmp_path / "back.raw"
        subprocess.run(["qemu-img", "convert", "-f", "vmdk", "-O", "raw",
                        str(tmp_path / "ova" / member.name), str(raw)], check=True, timeout=120)
        return raw


def test_registered() -> None:
    assert get_driver(DriverKind.FORMAT, Format.OVF) is OVFFormat
    assert get_driver(DriverKind.FORMAT, Format.OVA) is OVAFormat


def test_descriptor_validates_against_dsp8023(tmp_path: Path) -> None:
    context = make_context(tmp_path, synthetic_disk(tmp_path), rich_manifest(), {
        "ip": {"interfaces": [{"name": "eth0", "dhcp": True, "mac": "52:54:00:12:34:56"},
                              {"name": "eth1", "address": "10.0.0.5", "prefix": 24}]}})
    outputs = OVFFormat().convert(context)
    assert [(o.role, o.name) for o in outputs] == [
        ("descriptor", "webapp-2.1.ovf"), ("disk", "webapp-2.1.vmdk"),
        ("manifest", "webapp-2.1.mf")]
    result = xmllint_validate(outputs[0].path)
    assert result.returncode == 0, result.stderr
    assert "validates" in result.stderr


def test_schema_check_can_fail(tmp_path: Path) -> None:
    """The validation really checks: a RASD field out of schema order is refused."""
    context = make_context(tmp_path, synthetic_disk(tmp_path), rich_manifest())
    descriptor = OVFFormat().convert(context)[0].path
    text = descriptor.read_text()
    broken = re.sub(r"(\s*<rasd:AllocationUnits>[^<]*</rasd:AllocationUnits>)"
                    r"(\s*<rasd:Description>[^<]*</rasd:Description>)", r"\2\1", text, count=1)
    assert broken != text
    bad = tmp_path / "bad.ovf"
    bad.write_text(broken)
    result = xmllint_validate(bad)
    assert result.returncode != 0
    assert "fails to validate" in result.stderr


def test_descriptor_content(tmp_path: Path) -> None:
    manifest = rich_manifest()
    context = make_context(tmp_path, synthetic_disk(tmp_path), manifest, {
        "ip": {"interfaces": [{"name": "eth0", "dhcp": True, "mac": "52:54:00:12:34:56"},
                              {"name": "eth1", "dhcp": True}]}})
    descriptor, disk, _ = OVFFormat().convert(context)
    raw_text = descriptor.path.read_text()
    assert "envelope/2" not in raw_text and "virtualbox" not in raw_text.lower()
    root = ET.parse(descriptor.path).getroot()
    assert root.tag == f"{{{OVF}}}Envelope"
    [file] = root.findall("ovf:References/ovf:File", NS)
    assert file.get(f"{{{OVF}}}href") == disk.name
    assert int(file.get(f"{{{OVF}}}size", "0")) == disk.path.stat().st_size
    [vdisk] = root.findall("ovf:DiskSection/ovf:Disk", NS)
    assert int(vdisk.get(f"{{{OVF}}}capacity", "0")) == context.disk.size
    assert vdisk.get(f"{{{OVF}}}format", "").endswith("#streamOptimized")
    assert [n.get(f"{{{OVF}}}name") for n in root.findall(
        "ovf:NetworkSection/ovf:Network", NS)] == ["frontend"]
    product = root.find("ovf:VirtualSystem/ovf:ProductSection", NS)
    assert product is not None
    assert product.findtext("ovf:Product", namespaces=NS) == manifest.description
    assert product.findtext("ovf:Vendor", namespaces=NS) == "Example Corp"
    assert product.findtext("ovf:Version", namespaces=NS) == "2.1"
    os_section = root.find("ovf:VirtualSystem/ovf:OperatingSystemSection", NS)
    assert os_section is not None and os_section.get(f"{{{VMW}}}osType")
    items = root.findall("ovf:VirtualSystem/ovf:VirtualHardwareSection/ovf:Item", NS)
    by_type: dict[str, list[ET.Element]] = {}
    for item in items:
        by_type.setdefault(item.findtext("rasd:ResourceType", namespaces=NS) or "", []).append(
            item)
    assert by_type["3"][0].findtext("rasd:VirtualQuantity", namespaces=NS) == "4"
    memory = by_type["4"][0]
    assert memory.findtext("rasd:VirtualQuantity", namespaces=NS) == "1536"
    assert memory.findtext("rasd:AllocationUnits", namespaces=NS) == "byte * 2^20"
    controller = by_type["6"][0]
    assert controller.findtext("rasd:ResourceSubType", namespaces=NS) == "lsilogic"
    disk_item = by_type["17"][0]
    assert disk_item.findtext("rasd:HostResource", namespaces=NS) == "ovf:/disk/vmdisk1"
    assert disk_item.findtext("rasd:Parent", namespaces=NS) == \
        controller.findtext("rasd:InstanceID", namespaces=NS)
    nics = by_type["10"]
    assert [n.findtext("rasd:Connection", namespaces=NS) for n in nics] == ["frontend"] * 2
    assert nics[0].findtext("rasd:Address", namespaces=NS) == "52:54:00:12:34:56"
    ids = [i.findtext("rasd:InstanceID", namespaces=NS) for i in items]
    assert len(ids) == len(set(ids))
    [firmware] = root.findall(
        "ovf:VirtualSystem/ovf:VirtualHardwareSection/vmw:Config", NS)
    assert firmware.get(f"{{{VMW}}}key") == "firmware"
    assert firmware.get(f"{{{VMW}}}value") == "bios"
    assert firmware.get(f"{{{OVF}}}required") == "false"


@pytest.mark.parametrize(("disk_firmware", "option", "declared"), [
    ("uefi", None, "efi"), ("both", None, "bios"), ("bios", None, "bios"),
    ("both", "efi", "efi")])
def test_firmware_declared(tmp_path: Path, disk_firmware: str, option: str | None,
                           declared: str) -> None:
    base = synthetic_disk(tmp_path)
    disk = DiskImage(path=base.path, size=base.size, firmware=disk_firmware)
    context = make_context(tmp_path, disk, rich_manifest())
    descriptor = OVFFormat(ex_firmware=option).convert(context)[0].path
    [config] = ET.parse(descriptor).getroot().findall(".//vmw:Config", NS)
    assert config.get(f"{{{VMW}}}value") == declared
    assert xmllint_validate(descriptor).returncode == 0


def test_bad_options_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="ex_nic_type"):
        OVFFormat(ex_nic_type="virtio")
    with pytest.raises(ConfigurationError, match="ex_disk_controller"):
        OVFFormat(ex_disk_controller="nvme2")
    with pytest.raises(ConfigurationError, match="ex_firmware"):
        OVFFormat(ex_firmware="uefi")


def test_vmdk_is_version3_stream_optimized_and_identical(tmp_path: Path) -> None:
    disk = synthetic_disk(tmp_path)
    context = make_context(tmp_path, disk, rich_manifest())
    _, vmdk, _ = OVFFormat().convert(context)
    header = sparse_header(vmdk.path)
    assert header["version"] == 3
    descriptor = read_descriptor(vmdk.path)
    assert 'createType="streamOptimized"' in descriptor
    assert f'"{vmdk.name}"' in descriptor
    assert 'ddb.adapterType = "lsilogic"' in descriptor
    info = json.loads(qemu_img("info", "--output=json", str(vmdk.path)).stdout)
    assert info["format"] == "vmdk"
    assert info["virtual-size"] == disk.size
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    check = qemu_img("check", "-f", "vmdk", str(vmdk.path))
    assert check.returncode == 0, check.stdout + check.stderr
    compare = qemu_img("compare", "-f", "raw", "-F", "vmdk", str(disk.path), str(vmdk.path))
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_vmdk_cid_is_reproducible_but_content_bound(tmp_path: Path) -> None:
    cids = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        disk = synthetic_disk(tmp_path / name)
        if name == "b":
            with open(disk.path, "r+b") as handle:
                handle.seek(6 * 1024 * 1024)
                handle.write(b"changed")
        context = make_context(tmp_path / name, disk, rich_manifest())
        vmdk = OVFFormat().convert(context)[1].path
        match = re.search(r"^CID=([0-9a-f]{8})$", read_descriptor(vmdk), re.MULTILINE)
        assert match is not None
        cids.append(match.group(1))
    assert cids[0] != cids[1]


def _parse_mf(text: str) -> dict[str, str]:
    entries = {}
    for line in text.splitlines():
        match = re.fullmatch(r"SHA256\(([^)]+)\)= ([0-9a-f]{64})", line)
        assert match, f"bad .mf line {line!r}"
        entries[match.group(1)] = match.group(2)
    return entries


def test_manifest_digests(tmp_path: Path) -> None:
    context = make_context(tmp_path, synthetic_disk(tmp_path), rich_manifest())
    descriptor, vmdk, mf = OVFFormat().convert(context)
    entries = _parse_mf(mf.path.read_text())
    assert entries == {
        descriptor.name: hashlib.sha256(descriptor.path.read_bytes()).hexdigest(),
        vmdk.name: hashlib.sha256(vmdk.path.read_bytes()).hexdigest(),
    }


def test_ova_layout(tmp_path: Path) -> None:
    manifest = rich_manifest()
    context = make_context(tmp_path, synthetic_disk(tmp_path), manifest)
    [ova] = OVAFormat().convert(context)
    assert ova.name == "webapp-2.1.ova"
    assert sorted(p.name for p in context.workdir.iterdir()) == [ova.name]
    first = ova.path.read_bytes()[:512]
    assert first[257:263] == b"ustar\0"  # POSIX ustar, not GNU or PAX
    with tarfile.open(ova.path) as archive:
        members = archive.getmembers()
        assert [m.name for m in members] == [
            "webapp-2.1.ovf", "webapp-2.1.mf", "webapp-2.1.vmdk"]
        assert all(m.isreg() and m.mode == 0o644 for m in members)
        data = {}
        for member in members:
            extracted = archive.extractfile(member)
            assert extracted is not None
            data[member.name] = extracted.read()
    entries = _parse_mf(data["webapp-2.1.mf"].decode())
    assert entries == {name: hashlib.sha256(content).hexdigest()
                       for name, content in data.items() if not name.endswith(".mf")}
    (tmp_path / "x.ovf").write_bytes(data["webapp-2.1.ovf"])
    assert xmllint_validate(tmp_path / "x.ovf").returncode == 0


# -- boot ----------------------------------------------------------------------

def _boot_disk(tmp_path: Path, firmware: str) -> tuple[DiskImage, Manifest]:
    """A real bootable disk from the boot fixture's cloudlet."""
    from cloudlets.disk import BootSpec, build_disk

    try:
        cloudlet = build_boot_cloudlet()
    except FixtureUnavailable as exc:
        pytest.skip(f"boot cloudlet cannot be built here: {exc}")
    built = build_disk(cloudlet.tree_tar,
                       BootSpec(kernel=cloudlet.kernel, initrd=cloudlet.initrd,
                                cmdline="console=ttyS0", firmware=firmware),  # type: ignore[arg-type]
                       tmp_path / "disk.raw", seed=f"ovf-boot-{firmware}",
                       workdir=tmp_path / "build", base_cache=cache_dir() / "base")
    manifest = Manifest({"name": "bootme", "version": "1",
                         "boot": {"kernel": cloudlet.kernel, "initrd": cloudlet.initrd,
                                  "cmdline": "console=ttyS0", "firmware": firmware}})
    disk = built.for_formats()
    return disk, manifest


def _boot_from_ova(tmp_path: Path, firmware: str, driver: FormatDriver) -> str:
    from cloudlets.testing.boot import MARKER, boot

    disk, manifest = _boot_disk(tmp_path, firmware)
    [ova] = driver.convert(make_context(tmp_path, disk, manifest))
    with tarfile.open(ova.path) as archive:
        archive.extract("bootme-1.vmdk", tmp_path / "unpacked", filter="data")
    vmdk = tmp_path / "unpacked" / "bootme-1.vmdk"
    result = boot(vmdk, firmware=firmware, disk_format="vmdk", workdir=tmp_path / "qemu",
                  timeout=120)
    assert not result.timed_out, result.tail()
    assert MARKER in result.console, result.tail()
    return str(result.console)


@pytest.mark.boot
def test_vmdk_from_ova_boots_bios(tmp_path: Path) -> None:
    _boot_from_ova(tmp_path, "bios", OVAFormat())


@pytest.mark.boot
def test_vmdk_from_ova_boots_uefi(tmp_path: Path) -> None:
    from cloudlets.testing.boot import OVMF_CODE

    if not OVMF_CODE.is_file():
        pytest.skip("OVMF is not installed (Debian package ovmf)")
    _boot_from_ova(tmp_path, "uefi", OVAFormat())
