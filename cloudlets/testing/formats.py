"""The format driver conformance suite.

Subclass :class:`FormatDriverConformance` (named ``Test...`` so pytest
collects it) and provide the fixture ``format_driver`` (a ready
:class:`~cloudlets.drivers.base.FormatDriver`). The suite supplies a small
synthetic disk, manifest and config; override ``disk_image`` to use a real
bootable disk. Override :meth:`FormatDriverConformance.extract_raw` to turn
your outputs back into raw disk bytes, and the suite checks the payload.

A driver that declares
:attr:`~cloudlets.drivers.types.FormatCapability.COMPOSED_DISK` is also
handed :func:`composed_disk`: a disk made of pieces (the cached root
filesystem, the blocks a render patched over it, the rest of the disk), as
the disk stage hands it. The suite checks that the output holds exactly the
pieces' bytes and that the root filesystem in it reads back (``debugfs``)
with the patched file's content.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import pytest

from cloudlets.config import RenderConfig, resolve_config
from cloudlets.drivers.base import DiskImage, FormatContext, FormatDriver, OutputFile
from cloudlets.drivers.types import FormatCapability
from cloudlets.manifest import Manifest
from cloudlets.sparse import Piece, copy_into, overlay

__all__ = ["COMPOSED_FILES", "FormatDriverConformance", "composed_disk", "conformance_manifest",
           "join_pieces", "synthetic_disk"]

MiB = 1024 * 1024

#: The files :func:`composed_disk` patches over its base root filesystem.
COMPOSED_FILES = {"/etc/hostname": b"composed-disk\n"}


def synthetic_disk(directory: Path, size: int = 8 * MiB) -> DiskImage:
    """A sparse raw disk with a recognisable, non-trivial pattern in a few
    places (and holes in between), plus a tiny tree tarball."""
    path = directory / "disk.raw"
    with open(path, "wb") as handle:
        handle.truncate(size)
        for index, offset in enumerate((0, MiB, 3 * MiB + 512, size - 4096)):
            handle.seek(offset)
            handle.write(hashlib.sha256(str(index).encode()).digest() * 128)
    tree = _tree_tar(directory / "tree.tar")
    return DiskImage(path=path, size=size, firmware="bios", tree_tar=tree,
                     details={"partition_table": "gpt"})


def _tree_tar(path: Path) -> Path:
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for name in ("etc",):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            archive.addfile(info)
        data = b"conformance\n"
        info = tarfile.TarInfo("etc/hostname")
        info.size = len(data)
        info.mode = 0o644
        archive.addfile(info, io.BytesIO(data))
    return path


def composed_disk(directory: Path, *, root_size: int = 16 * MiB) -> DiskImage:
    """A disk made of pieces, as the disk stage hands it to a driver with
    :attr:`~cloudlets.drivers.types.FormatCapability.COMPOSED_DISK`: the
    file ``disk.raw`` holds a recognisable pattern before and after the root
    partition (1 MiB in) and a hole where the root filesystem goes; the
    pieces take the root filesystem from an ext4 ``base.raw`` (made with
    mke2fs from a tiny tree) and, over it, the blocks that patching
    :data:`COMPOSED_FILES` in changed (from a patched copy of the base's
    metadata). :func:`join_pieces` writes the disk they describe."""
    from cloudlets.disk import ext4

    directory.mkdir(parents=True, exist_ok=True)
    tree = _tree_tar(directory / "tree.tar")
    base = directory / "base.raw"
    ext4.make_ext4(tree, base, size=root_size, uuid="8c0b6d5e-54c5-4e0b-9a6e-6f1d2a3b4c5d",
                   hash_seed="1f2e3d4c-5b6a-4978-8695-a4b3c2d1e0f9", label="conformance",
                   timestamp=1_700_000_000, workdir=directory / "mke2fs")
    metadata = directory / "base.metadata"
    ext4.metadata_image(base, metadata)
    patched, ranges = ext4.patched_ranges(metadata, COMPOSED_FILES, timestamp=1_700_000_000,
                                          workdir=directory / "patch")
    root_offset, tail = MiB, MiB
    size = root_offset + root_size + tail
    disk = directory / "disk.raw"
    with open(disk, "wb") as handle:
        handle.truncate(size)
        for index, offset in enumerate((0, 512, root_offset - 4096, root_offset + root_size,
                                        size - 4096)):
            handle.seek(offset)
            handle.write(hashlib.sha256(b"composed %d" % index).digest() * 128)
    pieces = [Piece(disk, 0, root_offset), *overlay(base, root_size, patched, ranges),
              Piece(disk, root_offset + root_size, tail)]
    return DiskImage(path=disk, size=size, firmware="bios", tree_tar=tree,
                     details={"partition_table": "gpt", "composed": True},
                     pieces=tuple(pieces), root_offset=root_offset,
                     root_uuid="8c0b6d5e-54c5-4e0b-9a6e-6f1d2a3b4c5d")


def join_pieces(disk: DiskImage, target: Path) -> Path:
    """Write the raw disk ``disk`` describes (its :attr:`~DiskImage.pieces`
    in order, else its :attr:`~DiskImage.path`) to the new file ``target``,
    sparse where the sources are."""
    import os

    with open(target, "xb") as handle:
        handle.truncate(disk.size)
        if not disk.pieces:
            copy_into(disk.path, handle.fileno(), 0)
            return target
        position = 0
        for piece in disk.pieces:
            with open(piece.path, "rb") as source:
                done = 0
                while done < piece.length:
                    chunk = os.pread(source.fileno(), min(4 * MiB, piece.length - done),
                                     piece.offset + done)
                    if not chunk:
                        break
                    if chunk.count(0) != len(chunk):
                        os.pwrite(handle.fileno(), chunk, position + done)
                    done += len(chunk)
            position += piece.length
        if position != disk.size:
            raise AssertionError(f"the pieces cover {position} bytes of a {disk.size}-byte disk")
    return target


def conformance_manifest() -> Manifest:
    """The manifest the suite renders with."""
    return Manifest({
        "name": "conformance", "version": "1.0", "arch": "x86_64",
        "description": "format conformance suite", "author": "cloudlets",
        "filesystem": {"url": "http://mirrors.cloudlets.com/c.tar.gz", "sha256": "0" * 64},
        "boot": {"kernel": "/boot/vmlinuz", "initrd": "/boot/initrd.img",
                 "cmdline": "console=ttyS0"},
        "hardware": {"cpus": 2, "memory": "1G"},
    })


class FormatDriverConformance:
    """Shared behaviour every format driver must show."""

    @pytest.fixture
    def manifest(self) -> Manifest:
        return conformance_manifest()

    @pytest.fixture
    def config(self, manifest: Manifest) -> RenderConfig:
        return resolve_config(manifest, None, {"hostname": "conformance"})

    @pytest.fixture
    def disk_image(self, tmp_path: Path) -> DiskImage:
        source = tmp_path / "source"
        source.mkdir()
        return synthetic_disk(source)

    @pytest.fixture
    def composed_disk_image(self, format_driver: FormatDriver, tmp_path: Path) -> DiskImage:
        """:func:`composed_disk`, for a driver that declares
        :attr:`~cloudlets.drivers.types.FormatCapability.COMPOSED_DISK`
        (the disk stage hands pieces to no other)."""
        if not format_driver.capabilities & FormatCapability.COMPOSED_DISK:
            pytest.skip("the driver does not read composed disks")
        return composed_disk(tmp_path / "composed")

    def _context(self, manifest: Manifest, config: RenderConfig, disk: DiskImage,
                 workdir: Path) -> FormatContext:
        workdir.mkdir(parents=True)
        return FormatContext(manifest=manifest, config=config, disk=disk, workdir=workdir,
                             basename=manifest.label)

    def extract_raw(self, outputs: list[OutputFile], tmp_path: Path) -> Path | None:
        """Turn the outputs back into a raw disk, when the format allows;
        ``None`` skips the payload check."""
        return None

    def test_declares_identity(self, format_driver: FormatDriver) -> None:
        assert isinstance(format_driver.name, str) and format_driver.name
        assert isinstance(format_driver.capabilities, FormatCapability)
        assert format_driver.description

    def test_outputs_follow_contract(self, format_driver: FormatDriver, manifest: Manifest,
                                     config: RenderConfig, disk_image: DiskImage,
                                     tmp_path: Path) -> None:
        context = self._context(manifest, config, disk_image, tmp_path / "work")
        outputs = format_driver.convert(context)
        assert outputs, "a format driver must produce at least one file"
        names = [o.name for o in outputs]
        assert len(set(names)) == len(names), f"duplicate output names {names}"
        for output in outputs:
            assert output.path.is_file()
            assert context.workdir.resolve() in output.path.resolve().parents
            assert output.name.startswith(context.basename) and "/" not in output.name
            assert output.role and output.media_type
            assert output.path.stat().st_size > 0
        if len(outputs) > 1:
            assert format_driver.capabilities & FormatCapability.MULTI_ARTIFACT

    def test_does_not_touch_the_input(self, format_driver: FormatDriver, manifest: Manifest,
                                      config: RenderConfig, disk_image: DiskImage,
                                      tmp_path: Path) -> None:
        before = hashlib.sha256(disk_image.path.read_bytes()).hexdigest()
        format_driver.convert(self._context(manifest, config, disk_image, tmp_path / "w"))
        assert hashlib.sha256(disk_image.path.read_bytes()).hexdigest() == before

    def test_reproducible(self, format_driver: FormatDriver, manifest: Manifest,
                          config: RenderConfig, disk_image: DiskImage, tmp_path: Path) -> None:
        digests = []
        for run in ("a", "b"):
            outputs = format_driver.convert(
                self._context(manifest, config, disk_image, tmp_path / run))
            digests.append({o.name: hashlib.sha256(o.path.read_bytes()).hexdigest()
                            for o in outputs})
        assert digests[0] == digests[1]

    def test_payload_round_trips(self, format_driver: FormatDriver, manifest: Manifest,
                                 config: RenderConfig, disk_image: DiskImage,
                                 tmp_path: Path) -> None:
        outputs = format_driver.convert(
            self._context(manifest, config, disk_image, tmp_path / "work"))
        raw = self.extract_raw(outputs, tmp_path)
        if raw is None:
            pytest.skip("this format's payload is not a disk (or has no extractor)")
        expected = disk_image.path.read_bytes()
        actual = raw.read_bytes()
        assert len(actual) >= len(expected)
        assert actual[:len(expected)] == expected
        assert actual[len(expected):].count(0) == len(actual) - len(expected)

    def test_composed_disk_round_trips(self, format_driver: FormatDriver, manifest: Manifest,
                                       config: RenderConfig, composed_disk_image: DiskImage,
                                       tmp_path: Path) -> None:
        """A composed disk's output holds exactly the pieces' bytes, and the
        root filesystem in it has the patched file's content."""
        from cloudlets.disk import ext4
        from cloudlets.errors import DiskError

        disk = composed_disk_image
        outputs = format_driver.convert(self._context(manifest, config, disk,
                                                      tmp_path / "work-composed"))
        (tmp_path / "composed-out").mkdir()
        raw = self.extract_raw(outputs, tmp_path / "composed-out")
        if raw is None:
            pytest.skip("this format's payload has no extractor")
        expected = join_pieces(disk, tmp_path / "composed-expected.raw")
        assert raw.stat().st_size >= disk.size
        assert disk.root_offset is not None
        for name, content in COMPOSED_FILES.items():
            try:
                found = ext4.read_file(f"{raw}?offset={disk.root_offset}", name, len(content))
            except DiskError as exc:
                raise AssertionError(f"the output's root filesystem: {exc}") from exc
            assert found == content, f"{name} in the output's root filesystem"
        with open(expected, "rb") as want, open(raw, "rb") as got:
            position = 0
            while position < disk.size:
                a = want.read(MiB)
                b = got.read(len(a))
                assert a == b, f"the output differs from the composed disk in MiB {position // MiB}"
                position += len(a)
            assert got.read().count(0) == raw.stat().st_size - disk.size
