"""The native streamOptimized VMDK writer: layout read back byte by byte,
``qemu-img check`` and ``compare`` against the source, reproducibility, the
grain cache, and hostile or edge-case disks."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from cloudlets.drivers.base import DiskImage
from cloudlets.drivers.formats import vmdk
from cloudlets.errors import FormatError
from cloudlets.sparse import Piece
from cloudlets.testing.formats import composed_disk, join_pieces

MiB = 1024 * 1024
GRAIN = vmdk.GRAIN_SIZE


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def check_and_compare(raw: Path, image: Path) -> None:
    check = qemu_img("check", "-f", "vmdk", str(image))
    assert check.returncode == 0, check.stdout + check.stderr
    compare = qemu_img("compare", "-f", "raw", "-F", "vmdk", str(raw), str(image))
    assert compare.returncode == 0, compare.stdout + compare.stderr


def walk(path: Path) -> dict[str, object]:
    """Read a stream-optimized VMDK as a streaming reader does, checking
    every layout rule on the way; :returns: the grains (lba -> bytes) and
    what was found."""
    data = path.read_bytes()
    assert len(data) % 512 == 0, "the file is not a whole number of sectors"
    header = vmdk.sparse_header(path)
    footer = vmdk.sparse_header(path, footer=True)
    assert header["version"] == 3
    assert header["flags"] == 0x30001  # newline detection, compressed grains, markers
    assert header["grain_size"] == 128 and header["gtes_per_gt"] == 512
    assert header["compression"] == 1
    assert header["gd_offset"] == 0xFFFFFFFFFFFFFFFF
    assert header["rgd_offset"] == 0
    assert {**footer, "gd_offset": 0} == {**header, "gd_offset": 0}
    assert data[:4] == b"KDMV" and data[512:533] == b"# Disk DescriptorFile"
    # the end: GD marker ... footer marker, footer, end-of-stream marker
    eos = data[-512:]
    assert eos == bytes(512)
    footer_marker = struct.unpack_from("<QII", data, len(data) - 1536)
    assert footer_marker == (1, 0, 3)
    grains: dict[int, bytes] = {}
    tables: dict[int, list[int]] = {}
    directory: list[int] = []
    grain_at: dict[int, int] = {}  # sector -> lba
    sector = header["overhead"]
    last_lba = -1
    while True:
        offset = sector * 512
        value, size = struct.unpack_from("<QI", data, offset)
        if size:  # a grain
            assert value % 128 == 0 and value > last_lba, "grains out of order"
            last_lba = value
            raw = zlib.decompress(data[offset + 12:offset + 12 + size])
            assert len(raw) == GRAIN
            assert raw != bytes(GRAIN), "an all-zero grain was written"
            grains[value] = raw
            grain_at[sector] = value
            sector += -(-(12 + size) // 512)
            continue
        kind = struct.unpack_from("<I", data, offset + 12)[0]
        assert data[offset + 16:offset + 512] == bytes(496)
        if kind == 1:  # grain table
            assert value == 4
            tables[sector + 1] = list(struct.unpack_from("<512I", data, offset + 512))
            sector += 1 + value
        elif kind == 2:  # grain directory
            assert sector + 1 == footer["gd_offset"]
            count = -(-header["capacity"] // (128 * 512))
            directory = list(struct.unpack_from(f"<{count}I", data, offset + 512))
            sector += 1 + value
        elif kind == 3:  # footer
            assert offset == len(data) - 1536
            break
        else:
            raise AssertionError(f"marker of type {kind} at sector {sector}")
    assert all(directory), "a grain table is missing"
    assert sorted(directory) == sorted(tables)
    for index, table_sector in enumerate(directory):
        if not table_sector:
            continue
        for slot, entry in enumerate(tables[table_sector]):
            if entry:
                assert grain_at[entry] == (index * 512 + slot) * 128
    assert len(grain_at) == len(grains)
    return {"grains": grains, "capacity": header["capacity"], "directory": directory}


def expand(found: dict[str, object], size: int) -> bytes:
    grains = found["grains"]
    assert isinstance(grains, dict)
    out = bytearray(-(-size // GRAIN) * GRAIN)
    for lba, raw in grains.items():
        out[lba * 512:lba * 512 + GRAIN] = raw
    return bytes(out[:size])


def patterned(path: Path, size: int, offsets: tuple[int, ...]) -> Path:
    with open(path, "wb") as handle:
        handle.truncate(size)
        for index, offset in enumerate(offsets):
            handle.seek(offset)
            handle.write(os.urandom(3000) + bytes([index + 1]) * 70_000)
    with open(path, "r+b") as handle:
        handle.truncate(size)
    return path


def test_raw_disk_layout_check_and_compare(tmp_path: Path) -> None:
    raw = patterned(tmp_path / "disk.raw", 40 * MiB,
                    (0, 5 * MiB + 100, 33 * MiB, 40 * MiB - 70_000))
    image = tmp_path / "disk.vmdk"
    vmdk.write_stream_optimized(raw, image)
    found = walk(image)
    assert found["capacity"] == 40 * MiB // 512
    assert expand(found, 40 * MiB) == raw.read_bytes()
    check_and_compare(raw, image)
    descriptor = vmdk.read_descriptor(image)
    assert 'createType="streamOptimized"' in descriptor
    assert f'RW {40 * MiB // 512} SPARSE "disk.vmdk"' in descriptor
    info = json.loads(qemu_img("info", "--output=json", str(image)).stdout)
    assert info["virtual-size"] == 40 * MiB


def test_pieces_disk(tmp_path: Path) -> None:
    disk = composed_disk(tmp_path / "composed")
    assert disk.pieces
    image = tmp_path / "composed.vmdk"
    vmdk.write_stream_optimized(disk, image)
    joined = join_pieces(disk, tmp_path / "joined.raw")
    assert expand(walk(image), disk.size) == joined.read_bytes()
    check_and_compare(joined, image)


def test_reproducible_and_content_bound(tmp_path: Path) -> None:
    raw = patterned(tmp_path / "disk.raw", 9 * MiB, (MiB, 4 * MiB))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "disk.vmdk", tmp_path / "b" / "disk.vmdk"
    vmdk.write_stream_optimized(raw, first)
    vmdk.write_stream_optimized(raw, second)
    assert first.read_bytes() == second.read_bytes()
    with open(raw, "r+b") as handle:
        handle.seek(4 * MiB + 10)
        handle.write(b"changed")
    third = tmp_path / "c.vmdk"
    vmdk.write_stream_optimized(raw, third)
    assert vmdk.descriptor_cid(third) != vmdk.descriptor_cid(first)


def test_size_not_a_multiple_of_the_grain(tmp_path: Path) -> None:
    size = 3 * MiB + 3 * 512
    raw = patterned(tmp_path / "odd.raw", size, (0, size - 70_000 - 3000))
    image = tmp_path / "odd.vmdk"
    vmdk.write_stream_optimized(raw, image)
    assert expand(walk(image), size) == raw.read_bytes()
    check_and_compare(raw, image)


def test_size_not_a_multiple_of_the_sector(tmp_path: Path) -> None:
    size = 2 * MiB + 1000
    raw = tmp_path / "odd.raw"
    raw.write_bytes(os.urandom(size))
    image = tmp_path / "odd.vmdk"
    vmdk.write_stream_optimized(raw, image)
    found = walk(image)
    assert found["capacity"] == -(-size // 512)
    assert expand(found, -(-size // 512) * 512) == raw.read_bytes() + bytes(-size % 512)


def test_all_zero_disk(tmp_path: Path) -> None:
    raw = tmp_path / "zero.raw"
    with open(raw, "wb") as handle:
        handle.write(bytes(3 * MiB))  # data, not holes: read, found zero, not written
        handle.truncate(64 * MiB)
    image = tmp_path / "zero.vmdk"
    vmdk.write_stream_optimized(raw, image)
    found = walk(image)
    assert found["grains"] == {}
    check_and_compare(raw, image)


def test_large_sparse_disk(tmp_path: Path) -> None:
    """A 6 GiB disk that is nearly all holes: quick, since holes are never read."""
    size = 6 * 1024 * MiB
    raw = tmp_path / "big.raw"
    with open(raw, "wb") as handle:
        handle.truncate(size)
        for offset in (0, 4 * 1024 * MiB + 12345, size - 512):
            handle.seek(offset)
            handle.write(b"data at %d" % offset)
    image = tmp_path / "big.vmdk"
    vmdk.write_stream_optimized(raw, image)
    found = walk(image)
    assert found["capacity"] == size // 512
    assert sorted(found["grains"]) == [0, (4 * 1024 * MiB // GRAIN) * 128,  # type: ignore[arg-type]
                                       (size // GRAIN - 1) * 128]
    assert image.stat().st_size < MiB
    check_and_compare(raw, image)


def test_refuses_hostile_inputs(tmp_path: Path) -> None:
    raw = patterned(tmp_path / "disk.raw", 2 * MiB, (0,))
    with pytest.raises(FormatError, match="adapter type"):
        vmdk.write_stream_optimized(raw, tmp_path / "a.vmdk", adapter_type="scsi\n")
    with pytest.raises(FormatError, match="cannot be named"):
        vmdk.write_stream_optimized(raw, tmp_path / 'a".vmdk')
    short = DiskImage(path=raw, size=4 * MiB, pieces=(Piece(raw, 0, 4 * MiB),))
    with pytest.raises(FormatError, match="ended at byte"):
        vmdk.write_stream_optimized(short, tmp_path / "short.vmdk")
    assert not (tmp_path / "short.vmdk").exists()
    gap = DiskImage(path=raw, size=4 * MiB, pieces=(Piece(raw, 0, MiB),))
    with pytest.raises(FormatError, match="cover"):
        vmdk.write_stream_optimized(gap, tmp_path / "gap.vmdk")
    missing = DiskImage(path=raw, size=MiB, pieces=(Piece(tmp_path / "nope", 0, MiB),))
    with pytest.raises(FormatError, match="cannot open"):
        vmdk.write_stream_optimized(missing, tmp_path / "missing.vmdk")
    with pytest.raises(FormatError, match="compression level"):
        vmdk.write_stream_optimized(raw, tmp_path / "l.vmdk", level=12)
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    with pytest.raises(FormatError, match="empty"):
        vmdk.write_stream_optimized(empty, tmp_path / "e.vmdk")
    assert sorted(p.name for p in tmp_path.glob("*.vmdk")) == []


def _cached_base(directory: Path, size: int) -> Path:
    """A file laid out as a base filesystem in a base cache."""
    directory.mkdir()
    base = patterned(directory / f"{'ab' * 32}.ext4", size, (0, MiB, 3 * MiB + 7, size - 70_000))
    (directory / f"{'ab' * 32}.json").write_text("{}")
    return base


def _disk_over(base: Path, tmp_path: Path, patch: bytes, name: str) -> DiskImage:
    """``disk`` = 1 MiB of ``outer``, the base with ``patch`` over its byte
    2 MiB + 100, 1 MiB of ``outer``."""
    outer = patterned(tmp_path / f"{name}.outer", 3 * MiB + base.stat().st_size, (0, 512))
    over = tmp_path / f"{name}.patch"
    over.write_bytes(bytes(2 * MiB + 100) + patch)
    size = base.stat().st_size
    pieces = (Piece(outer, 0, MiB), Piece(base, 0, 2 * MiB + 100),
              Piece(over, 2 * MiB + 100, len(patch)),
              Piece(base, 2 * MiB + 100 + len(patch), size - 2 * MiB - 100 - len(patch)),
              Piece(outer, MiB + size, MiB))
    return DiskImage(path=outer, size=2 * MiB + size, pieces=pieces)


def test_grain_cache_reused_on_rerender(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = _cached_base(tmp_path / "bases", 12 * MiB)
    cold = _disk_over(base, tmp_path, b"web-01\n", "cold")
    again = _disk_over(base, tmp_path, b"web-02\n", "again")
    # without the cache, for reference
    plain = {}
    (tmp_path / "plain").mkdir()
    (tmp_path / "again2").mkdir()
    for name, disk in (("cold", cold), ("again", again)):
        plain[name] = tmp_path / "plain" / f"{name}.vmdk"
        vmdk.write_stream_optimized(disk, plain[name], grain_cache=False)
    assert not list(base.parent.glob("*.vmdk-grains-*"))
    vmdk.write_stream_optimized(cold, tmp_path / "cold.vmdk")
    [cache] = base.parent.glob("*.vmdk-grains-*")
    assert cache.name.startswith(base.stem + ".vmdk-grains-")
    assert (tmp_path / "cold.vmdk").read_bytes() == plain["cold"].read_bytes()
    # a re-render compresses only the grains its own pieces changed
    compressed = []
    original = vmdk._compressor

    def counting(level: int | None) -> tuple[object, str]:
        compress, settings = original(level)

        def spy(data: bytes) -> bytes:
            compressed.append(len(data))
            return compress(data)

        return spy, settings

    monkeypatch.setattr(vmdk, "_compressor", counting)
    vmdk.write_stream_optimized(again, tmp_path / "again.vmdk")
    assert (tmp_path / "again.vmdk").read_bytes() == plain["again"].read_bytes()
    assert len(compressed) == 3  # the two grains of the outer pattern, the patched one
    joined = join_pieces(again, tmp_path / "again.raw")
    check_and_compare(joined, tmp_path / "again.vmdk")
    # a damaged cache is ignored, and rebuilt
    monkeypatch.setattr(vmdk, "_compressor", original)
    cache.write_bytes(cache.read_bytes()[:100])
    vmdk.write_stream_optimized(again, tmp_path / "again2" / "again.vmdk")
    assert (tmp_path / "again2" / "again.vmdk").read_bytes() == plain["again"].read_bytes()
    assert cache.stat().st_size > 100


def test_grain_cache_only_beside_cached_bases(tmp_path: Path) -> None:
    from cloudlets.disk.assemble import base_sidecar

    base = _cached_base(tmp_path / "bases", 2 * MiB)
    assert base_sidecar(base, "vmdk-grains-isal1") == base.with_suffix(".vmdk-grains-isal1")
    assert base_sidecar(base, "../x") is None
    plain = patterned(tmp_path / "disk.raw", 2 * MiB, (0,))
    assert base_sidecar(plain, "vmdk-grains-isal1") is None
    (tmp_path / "bases" / f"{'ab' * 32}.json").unlink()
    assert base_sidecar(base, "vmdk-grains-isal1") is None
    vmdk.write_stream_optimized(plain, tmp_path / "disk.vmdk")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bases", "disk.raw", "disk.vmdk"]


def test_no_file_left_open(tmp_path: Path) -> None:
    base = _cached_base(tmp_path / "bases", 4 * MiB)
    disk = _disk_over(base, tmp_path, b"web-01\n", "open")
    before = len(os.listdir("/proc/self/fd"))
    for run in range(3):
        (tmp_path / str(run)).mkdir()
        vmdk.write_stream_optimized(disk, tmp_path / str(run) / "disk.vmdk")
    assert len(os.listdir("/proc/self/fd")) == before


def test_progress_reports_the_disk_in_order(tmp_path: Path) -> None:
    """The writer reports the bytes of the disk handled, holes included:
    never backwards, ending at the disk's size."""
    size = 40 * MiB
    raw = patterned(tmp_path / "disk.raw", size, (0, 5 * MiB + 100, 33 * MiB, size - 70_000))
    reports: list[tuple[int, int | None]] = []
    vmdk.write_stream_optimized(raw, tmp_path / "disk.vmdk",
                                progress=lambda done, total=None: reports.append((done, total)))
    assert len(reports) >= 2
    assert {total for _done, total in reports} == {size}
    done = [value for value, _total in reports]
    assert done == sorted(done) and done[0] > 0 and done[-1] == size
