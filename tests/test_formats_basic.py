"""raw, qcow2 and tar pass the format conformance suite, with payload checks."""

from __future__ import annotations

import dataclasses
import errno
import gzip
import os
import subprocess
from pathlib import Path

import pytest

from cloudlets.config import resolve_config
from cloudlets.drivers.base import FormatContext, OutputFile
from cloudlets.drivers.formats.qcow2 import Qcow2Format
from cloudlets.drivers.formats.raw import RawFormat
from cloudlets.drivers.formats.tar import TarFormat
from cloudlets.errors import FormatError
from cloudlets.sparse import Piece, copy_into, copy_sparse, data_ranges, link_or_copy, merge_ranges
from cloudlets.testing.formats import (
    COMPOSED_FILES,
    FormatDriverConformance,
    composed_disk,
    conformance_manifest,
    join_pieces,
    synthetic_disk,
)
from tests.conftest import RefuseSeekData


class TestRawConformance(FormatDriverConformance):
    @pytest.fixture
    def format_driver(self) -> RawFormat:
        return RawFormat()

    def extract_raw(self, outputs: list[OutputFile], tmp_path: Path) -> Path | None:
        return outputs[0].path


class TestQcow2Conformance(FormatDriverConformance):
    @pytest.fixture
    def format_driver(self) -> Qcow2Format:
        return Qcow2Format()

    def extract_raw(self, outputs: list[OutputFile], tmp_path: Path) -> Path | None:
        raw = tmp_path / "back.raw"
        subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw",
                        str(outputs[0].path), str(raw)], check=True, timeout=120)
        return raw


class TestTarConformance(FormatDriverConformance):
    @pytest.fixture
    def format_driver(self) -> TarFormat:
        return TarFormat()


def test_qcow2_is_checked_and_standalone(tmp_path: Path) -> None:
    import json

    from cloudlets.config import resolve_config
    from cloudlets.drivers.base import FormatContext
    from cloudlets.manifest import Manifest

    disk = synthetic_disk(tmp_path)
    manifest = Manifest({"name": "q", "version": "1"})
    context = FormatContext(manifest=manifest, config=resolve_config(manifest),
                            disk=disk, workdir=tmp_path / "w", basename=manifest.label)
    context.workdir.mkdir()
    [output] = Qcow2Format().convert(context)
    check = subprocess.run(["qemu-img", "check", "--output=json", str(output.path)],
                           capture_output=True, text=True, check=False, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(output.path)],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["format"] == "qcow2"
    assert "backing-filename" not in info
    assert info["virtual-size"] == disk.size
    compare = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2",
                              str(disk.path), str(output.path)], check=False, timeout=60)
    assert compare.returncode == 0


def test_tar_output_is_the_tree(tmp_path: Path) -> None:
    from cloudlets.config import resolve_config
    from cloudlets.drivers.base import FormatContext
    from cloudlets.manifest import Manifest

    disk = synthetic_disk(tmp_path)
    manifest = Manifest({"name": "t"})
    context = FormatContext(manifest=manifest, config=resolve_config(manifest),
                            disk=disk, workdir=tmp_path / "w", basename=manifest.label)
    context.workdir.mkdir()
    [output] = TarFormat().convert(context)
    assert output.name == "t.tar.gz"
    assert disk.tree_tar is not None
    assert gzip.decompress(output.path.read_bytes()) == disk.tree_tar.read_bytes()


def test_copy_sparse_keeps_holes(tmp_path: Path) -> None:
    source = synthetic_disk(tmp_path).path
    target = tmp_path / "copy.raw"
    copy_sparse(source, target)
    assert target.read_bytes() == source.read_bytes()
    assert target.stat().st_blocks * 512 < source.stat().st_size // 2
    with pytest.raises(FileExistsError):
        copy_sparse(source, target)


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP])
def test_without_seek_data_the_whole_file_is_data(tmp_path: Path,
                                                  refuse_seek_data: RefuseSeekData,
                                                  code: int) -> None:
    """A file system that refuses SEEK_DATA: copies were all zeros (the error
    read as "only holes remain"); now the whole file is copied."""
    source = synthetic_disk(tmp_path).path
    size = source.stat().st_size
    refuse_seek_data(code)
    with open(source, "rb") as handle:
        assert data_ranges(handle.fileno()) == [(0, size)]
    copy_sparse(source, tmp_path / "copy.raw")
    assert (tmp_path / "copy.raw").read_bytes() == source.read_bytes()
    with open(tmp_path / "into.raw", "wb") as target:
        target.truncate(size + 4096)
        copy_into(source, target.fileno(), 4096)
    assert (tmp_path / "into.raw").read_bytes()[4096:] == source.read_bytes()


def test_enxio_means_only_holes(tmp_path: Path) -> None:
    hole = tmp_path / "hole.raw"
    with open(hole, "wb") as handle:
        handle.truncate(1 << 20)
    with open(hole, "rb") as handle:
        assert data_ranges(handle.fileno()) == []
    copy_sparse(hole, tmp_path / "copy.raw")
    assert (tmp_path / "copy.raw").read_bytes() == bytes(1 << 20)


def test_other_seek_errors_are_not_taken_for_holes(tmp_path: Path,
                                                   refuse_seek_data: RefuseSeekData) -> None:
    source = synthetic_disk(tmp_path).path
    refuse_seek_data(errno.EIO)
    with pytest.raises(OSError, match="Input/output"):
        copy_sparse(source, tmp_path / "copy.raw")


def test_a_source_that_ends_early_is_named(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    source = synthetic_disk(tmp_path).path
    monkeypatch.setattr(os, "copy_file_range", lambda *args: 0)
    with pytest.raises(FormatError, match=f"{source.name} ended at byte 0"):
        copy_sparse(source, tmp_path / "copy.raw", error=FormatError)


def test_copy_across_file_systems_reads_and_writes(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    source = synthetic_disk(tmp_path).path

    def cross_device(*args: object) -> int:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "copy_file_range", cross_device)
    copy_sparse(source, tmp_path / "copy.raw")
    assert (tmp_path / "copy.raw").read_bytes() == source.read_bytes()
    assert (tmp_path / "copy.raw").stat().st_blocks * 512 < source.stat().st_size // 2


def test_link_or_copy_links_on_one_file_system(tmp_path: Path) -> None:
    source = synthetic_disk(tmp_path).path
    target = tmp_path / "linked.raw"
    link_or_copy(source, target)
    assert os.path.samefile(source, target)
    with pytest.raises(FileExistsError):
        link_or_copy(source, target)


def test_link_or_copy_copies_across_file_systems(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK) \
            or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no writable /dev/shm on another file system than the test's")
    source = synthetic_disk(tmp_path).path
    target = shm / f"cloudlets-test-{os.getpid()}.raw"
    try:
        link_or_copy(source, target)
        assert not os.path.samefile(source, target)
        assert target.read_bytes() == source.read_bytes()
        assert target.stat().st_blocks * 512 < source.stat().st_size // 2  # holes kept
    finally:
        target.unlink(missing_ok=True)


def test_raw_output_is_the_disk_without_a_copy(tmp_path: Path) -> None:
    from cloudlets.config import resolve_config
    from cloudlets.drivers.base import FormatContext
    from cloudlets.manifest import Manifest

    disk = synthetic_disk(tmp_path)
    manifest = Manifest({"name": "r", "version": "1"})
    context = FormatContext(manifest=manifest, config=resolve_config(manifest),
                            disk=disk, workdir=tmp_path / "w", basename=manifest.label)
    context.workdir.mkdir()
    [output] = RawFormat().convert(context)
    assert output.name == "r-1.raw"
    assert os.path.samefile(output.path, disk.path)


def test_merge_ranges() -> None:
    assert merge_ranges([(8, 12), (0, 4), (4, 6), (10, 20), (30, 30)]) == [(0, 6), (8, 20)]
    assert merge_ranges([]) == []


def test_qemu_img_reads_a_disk_made_of_pieces(tmp_path: Path) -> None:
    """Pieces of several files, in order, odd sizes and offsets: qemu-img
    converts their concatenation, holes included."""
    from cloudlets.drivers.base import DiskImage
    from cloudlets.drivers.formats import qemuimg

    one, two = tmp_path / "one", tmp_path / "two"
    one.write_bytes(os.urandom(3 * 4096))
    with open(two, "wb") as handle:
        handle.truncate(1 << 20)  # a hole...
        handle.seek(5 * 4096)
        handle.write(b"\xaa" * 4096)
    pieces = (Piece(one, 4096, 8192), Piece(two, 0, 6 * 4096), Piece(one, 0, 512))
    expected = b"".join(p.path.read_bytes()[p.offset:p.offset + p.length] for p in pieces)
    disk = DiskImage(path=one, size=len(expected), pieces=pieces)
    qemuimg.convert(disk, tmp_path / "out.raw", "raw")
    assert (tmp_path / "out.raw").read_bytes() == expected
    qemuimg.convert(DiskImage(path=one, size=3 * 4096), tmp_path / "plain.raw", "raw")
    assert (tmp_path / "plain.raw").read_bytes() == one.read_bytes()


def test_the_version_has_a_module_of_its_own() -> None:
    """ec2.py read ``cloudlets.__version__`` through the package face (whose
    imports run back down into the drivers); every module now reads it from
    :mod:`cloudlets.version`, and the face re-exports the same object."""
    import ast

    import cloudlets
    from cloudlets import version
    from cloudlets.drivers.formats import ec2

    assert cloudlets.__version__ is version.__version__ is ec2.__version__
    package = Path(cloudlets.__file__).parent
    through_face = []
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module == "cloudlets" \
                    and any(alias.name == "__version__" for alias in node.names):
                through_face.append(str(path.relative_to(package)))
    assert through_face == []


class _RootZeroingQcow2(Qcow2Format):
    """A broken driver: it converts the disk file alone, ignoring the
    pieces, so the root filesystem comes out as zeros."""

    def convert(self, context: FormatContext) -> list[OutputFile]:
        flat = dataclasses.replace(context.disk, pieces=())
        return super().convert(dataclasses.replace(context, disk=flat))


def test_the_composed_disk_check_fails_a_driver_that_zeroes_the_root(tmp_path: Path) -> None:
    suite = TestQcow2Conformance()
    manifest = conformance_manifest()
    disk = composed_disk(tmp_path / "disk")
    with pytest.raises(AssertionError, match="root filesystem"):
        suite.test_composed_disk_round_trips(
            _RootZeroingQcow2(), manifest, resolve_config(manifest, None, {}), disk,
            tmp_path / "run")


def test_the_composed_disk_is_what_the_disk_stage_composes(tmp_path: Path) -> None:
    """The fixture's pieces join to a disk whose root filesystem holds the
    patched file, and whose root region is not in disk.raw itself."""
    from cloudlets.disk import ext4

    disk = composed_disk(tmp_path / "disk")
    assert len(disk.pieces) > 3 and disk.root_offset
    joined = join_pieces(disk, tmp_path / "joined.raw")
    assert joined.stat().st_size == disk.size
    for name, content in COMPOSED_FILES.items():
        assert ext4.read_file(f"{joined}?offset={disk.root_offset}", name,
                              len(content)) == content
    with open(disk.path, "rb") as flat:
        flat.seek(disk.root_offset)
        assert flat.read(1024 * 1024).count(0) == 1024 * 1024
