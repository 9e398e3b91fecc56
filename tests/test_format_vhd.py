"""The fixed VHD driver: conformance, a footer parsed back field by field, and
QEMU's own VHD reader agreeing on geometry and payload."""

from __future__ import annotations

import struct
import subprocess
import uuid
from pathlib import Path

import pytest

from cloudlets.config import resolve_config
from cloudlets.drivers.base import DiskImage, FormatContext, OutputFile
from cloudlets.drivers.formats.vhd import VHDFormat, chs_geometry
from cloudlets.drivers.providers import get_driver
from cloudlets.drivers.types import DriverKind, Format
from cloudlets.manifest import Manifest
from cloudlets.testing.formats import FormatDriverConformance, synthetic_disk
from tests.conftest import RefuseSeekData

MiB = 1024 * 1024
VHD_EPOCH = 946_684_800  # 2000-01-01T00:00:00Z


def parse_footer(footer: bytes) -> dict[str, object]:
    """Decode a VHD footer independently of the driver (spec field offsets)."""
    assert len(footer) == 512
    fields = {
        "cookie": footer[0:8],
        "features": struct.unpack(">I", footer[8:12])[0],
        "version": struct.unpack(">I", footer[12:16])[0],
        "data_offset": struct.unpack(">Q", footer[16:24])[0],
        "timestamp": struct.unpack(">I", footer[24:28])[0],
        "creator_app": footer[28:32],
        "creator_host": footer[36:40],
        "original_size": struct.unpack(">Q", footer[40:48])[0],
        "current_size": struct.unpack(">Q", footer[48:56])[0],
        "geometry": struct.unpack(">HBB", footer[56:60]),
        "disk_type": struct.unpack(">I", footer[60:64])[0],
        "checksum": struct.unpack(">I", footer[64:68])[0],
        "unique_id": uuid.UUID(bytes=footer[68:84]),
        "saved_state": footer[84],
        "reserved": footer[85:],
    }
    summed = footer[:64] + b"\0\0\0\0" + footer[68:]
    fields["expected_checksum"] = ~sum(summed) & 0xFFFFFFFF
    return fields


def qemu_footer(tmp_path: Path, size: int) -> dict[str, object]:
    """The footer qemu-img writes for a fixed VHD of ``size`` bytes."""
    path = tmp_path / f"qemu-{size}.vhd"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed",
                    str(path), str(size)], check=True, timeout=60)
    with open(path, "rb") as handle:
        handle.seek(-512, 2)
        return parse_footer(handle.read())


def convert(tmp_path: Path, disk: DiskImage, **kwargs: int) -> OutputFile:
    manifest = Manifest({"name": "v", "version": "1"})
    workdir = tmp_path / "w"
    workdir.mkdir()
    context = FormatContext(manifest=manifest, config=resolve_config(manifest), disk=disk,
                            workdir=workdir, basename=manifest.label)
    [output] = VHDFormat(**kwargs).convert(context)
    return output


class TestVHDConformance(FormatDriverConformance):
    @pytest.fixture
    def format_driver(self) -> VHDFormat:
        return VHDFormat()

    def extract_raw(self, outputs: list[OutputFile], tmp_path: Path) -> Path | None:
        raw = tmp_path / "back.raw"
        data = outputs[0].path.read_bytes()
        raw.write_bytes(data[:-512])
        return raw


def test_registered() -> None:
    assert get_driver(DriverKind.FORMAT, Format.VHD) is VHDFormat


def test_footer_fields(tmp_path: Path) -> None:
    disk = synthetic_disk(tmp_path, size=8 * MiB + 4096)  # not MiB-aligned on purpose
    output = convert(tmp_path, disk, ex_timestamp=1_700_000_000)
    assert output.name == "v-1.vhd"
    data = output.path.read_bytes()
    assert len(data) == 9 * MiB + 512
    footer = parse_footer(data[-512:])
    assert footer["cookie"] == b"conectix"
    assert footer["features"] == 2
    assert footer["version"] == 0x00010000
    assert footer["data_offset"] == 0xFFFFFFFFFFFFFFFF
    assert footer["disk_type"] == 2
    assert footer["original_size"] == footer["current_size"] == 9 * MiB
    assert footer["timestamp"] == 1_700_000_000 - VHD_EPOCH
    assert footer["checksum"] == footer["expected_checksum"]
    assert footer["saved_state"] == 0
    assert footer["reserved"] == bytes(427)
    assert isinstance(footer["unique_id"], uuid.UUID) and footer["unique_id"].int != 0
    # the payload is the raw disk, zero-padded to the MiB
    raw = disk.path.read_bytes()
    assert data[:len(raw)] == raw
    assert data[len(raw):-512].count(0) == 9 * MiB - len(raw)


@pytest.mark.parametrize("size", [1 * MiB, 9 * MiB, 127 * MiB, 2048 * MiB, 40 * 1024 * MiB,
                                  127 * 1024 * MiB])
def test_geometry_matches_qemu(tmp_path: Path, size: int) -> None:
    """Our CHS geometry equals the one qemu-img computes by the same spec algorithm.

    qemu-img (without ``force_size``) grows the disk until the geometry covers
    it, so compare at the size it settled on, where the geometry is exact."""
    geometry = qemu_footer(tmp_path, size)["geometry"]
    assert isinstance(geometry, tuple)
    cylinders, heads, sectors = geometry
    exact = cylinders * heads * sectors * 512
    assert exact >= size
    assert chs_geometry(exact) == (cylinders, heads, sectors)


def test_qemu_img_info_sees_a_fixed_vhd(tmp_path: Path) -> None:
    """As docs/drivers/formats/vhd.rst says: probing reads it as raw (no
    header), ``-f vpc`` as a VHD without clusters (fixed, not dynamic)."""
    import json

    output = convert(tmp_path, synthetic_disk(tmp_path, size=8 * MiB))

    def info(*args: str) -> dict[str, object]:
        proc = subprocess.run(["qemu-img", "info", "--output=json", *args],
                              capture_output=True, text=True, check=True, timeout=60)
        data: dict[str, object] = json.loads(proc.stdout)
        return data

    assert info(str(output.path))["format"] == "raw"
    named = info("-f", "vpc", str(output.path))
    assert named["format"] == "vpc" and "cluster-size" not in named
    dynamic = tmp_path / "dynamic.vhd"
    subprocess.run(["qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=dynamic",
                    str(dynamic), str(8 * MiB)], check=True, timeout=60)
    assert "cluster-size" in info("-f", "vpc", str(dynamic))  # what tells them apart
    assert parse_footer(output.path.read_bytes()[-512:])["disk_type"] == 2  # fixed
    full = info("--image-opts",
                f"driver=vpc,force_size_calc=current_size,file.filename={output.path}")
    assert full["virtual-size"] == 8 * MiB


def test_qemu_reads_it(tmp_path: Path) -> None:
    disk = synthetic_disk(tmp_path, size=8 * MiB)
    output = convert(tmp_path, disk)
    check = subprocess.run(
        ["qemu-img", "info", "--output=json", "--image-opts",
         f"driver=vpc,force_size_calc=current_size,file.filename={output.path}"],
        capture_output=True, text=True, check=True, timeout=60)
    import json

    info = json.loads(check.stdout)
    assert info["format"] == "vpc"
    assert info["virtual-size"] == 8 * MiB
    compare = subprocess.run(
        ["qemu-img", "compare", "--image-opts",
         f"driver=raw,file.filename={disk.path}",
         f"driver=vpc,force_size_calc=current_size,file.filename={output.path}"],
        capture_output=True, text=True, check=False, timeout=60)
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_unique_id_follows_content(tmp_path: Path) -> None:
    first = tmp_path / "a"
    second = tmp_path / "b"
    first.mkdir()
    second.mkdir()
    disk_a = synthetic_disk(first)
    disk_b = synthetic_disk(second)
    with open(disk_b.path, "r+b") as handle:
        handle.seek(5 * MiB)
        handle.write(b"different")
    id_a = parse_footer(convert(first, disk_a).path.read_bytes()[-512:])["unique_id"]
    id_b = parse_footer(convert(second, disk_b).path.read_bytes()[-512:])["unique_id"]
    assert id_a != id_b


def test_keeps_holes(tmp_path: Path) -> None:
    disk = synthetic_disk(tmp_path, size=64 * MiB)
    output = convert(tmp_path, disk)
    assert output.path.stat().st_blocks * 512 < 2 * MiB


def test_a_file_system_without_seek_data_gives_the_same_vhd(
        tmp_path: Path, refuse_seek_data: RefuseSeekData) -> None:
    """The copy read SEEK_DATA's refusal as "only holes": a VHD of zeros."""
    disk = synthetic_disk(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    expected = convert(tmp_path / "a", disk).path.read_bytes()
    refuse_seek_data()
    assert convert(tmp_path / "b", disk).path.read_bytes() == expected
