"""The format driver conformance suite.

Subclass :class:`FormatDriverConformance` (named ``Test...`` so pytest
collects it) and provide the fixture ``format_driver`` (a ready
:class:`~cloudlets.drivers.base.FormatDriver`). The suite supplies a small
synthetic disk, manifest and config; override ``disk_image`` to use a real
bootable disk. Override :meth:`FormatDriverConformance.extract_raw` to turn
your outputs back into raw disk bytes, and the suite checks the payload.
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

__all__ = ["FormatDriverConformance", "synthetic_disk"]

MiB = 1024 * 1024


def synthetic_disk(directory: Path, size: int = 8 * MiB) -> DiskImage:
    """A sparse raw disk with a recognisable, non-trivial pattern in a few
    places (and holes in between), plus a tiny tree tarball."""
    path = directory / "disk.raw"
    with open(path, "wb") as handle:
        handle.truncate(size)
        for index, offset in enumerate((0, MiB, 3 * MiB + 512, size - 4096)):
            handle.seek(offset)
            handle.write(hashlib.sha256(str(index).encode()).digest() * 128)
    tree = directory / "tree.tar"
    with tarfile.open(tree, "w", format=tarfile.PAX_FORMAT) as archive:
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
    return DiskImage(path=path, size=size, firmware="bios", tree_tar=tree,
                     details={"partition_table": "gpt"})


class FormatDriverConformance:
    """Shared behaviour every format driver must show."""

    @pytest.fixture
    def manifest(self) -> Manifest:
        return Manifest({
            "name": "conformance", "version": "1.0", "arch": "x86_64",
            "description": "format conformance suite", "author": "cloudlets",
            "filesystem": {"url": "http://mirrors.cloudlets.com/c.tar.gz", "sha256": "0" * 64},
            "boot": {"kernel": "/boot/vmlinuz", "initrd": "/boot/initrd.img",
                     "cmdline": "console=ttyS0"},
            "hardware": {"cpus": 2, "memory": "1G"},
        })

    @pytest.fixture
    def config(self, manifest: Manifest) -> RenderConfig:
        return resolve_config(manifest, None, {"hostname": "conformance"})

    @pytest.fixture
    def disk_image(self, tmp_path: Path) -> DiskImage:
        source = tmp_path / "source"
        source.mkdir()
        return synthetic_disk(source)

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
