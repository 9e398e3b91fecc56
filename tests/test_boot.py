"""Proof by boot: disks built by the disk stage boot in QEMU (TCG) and show the rendered files.

The cloudlet comes from :mod:`cloudlets.testing.boot` (a Debian kernel and busybox, built
at test time and cached). Its ``/etc/hostname`` and ``/etc/network/interfaces``
are rendered into the disk through ``patch_files`` on top of a cached base
filesystem, exactly as a render with templates does; the tests then read them
back from the serial console of the booted guest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cloudlets.disk import BootSpec, DiskImage, build_disk
from cloudlets.drivers.base import sha256_file
from cloudlets.testing import boot as bootfixture

pytestmark = pytest.mark.boot

HOSTNAME = b"web-01.example.test\n"
INTERFACES = (
    b"auto lo\niface lo inet loopback\n\n"
    b"auto eth0\niface eth0 inet static\n    address 192.0.2.10/24\n    gateway 192.0.2.1\n"
)
RENDERED = {"/etc/hostname": HOSTNAME, "/etc/network/interfaces": INTERFACES}
CMDLINE = "console=ttyS0 panic=-1"
SEED = "test-boot-seed"
EPOCH = 1_700_000_000
BOOT_TIMEOUT = 90


@pytest.fixture(scope="module")
def cloudlet() -> bootfixture.BootCloudlet:
    """The tiny Debian cloudlet (skips if apt or QEMU are not available)."""
    for tool in ("qemu-system-x86_64", "qemu-img"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install qemu-system-x86 qemu-utils)")
    try:
        return bootfixture.build_boot_cloudlet()
    except bootfixture.FixtureUnavailable as exc:
        pytest.skip(f"cannot build the boot cloudlet: {exc}")


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("boot-disks")


@pytest.fixture(scope="module")
def make_disk(
    cloudlet: bootfixture.BootCloudlet, disk_dir: Path
) -> Callable[[str, str], DiskImage]:
    """Build (once per firmware and table) a disk with the rendered files patched in."""
    built: dict[tuple[str, str], DiskImage] = {}
    base_cache = disk_dir / "base-cache"

    def make(firmware: str, table: str) -> DiskImage:
        if (firmware, table) not in built:
            boot = BootSpec(
                kernel=cloudlet.kernel,
                initrd=cloudlet.initrd,
                cmdline=CMDLINE,
                firmware=firmware,  # type: ignore[arg-type]
                partition_table=table,  # type: ignore[arg-type]
            )
            built[firmware, table] = build_disk(
                cloudlet.tree_tar,
                boot,
                disk_dir / f"{firmware}-{table}.raw",
                seed=SEED,
                workdir=disk_dir / f"work-{firmware}-{table}",
                source_date_epoch=EPOCH,
                base_cache=base_cache,
                patch_files=RENDERED,
                tree_digest=cloudlet.sha256,
            )
        return built[firmware, table]

    return make


def _to_qcow2(raw: Path) -> Path:
    qcow2 = raw.with_suffix(".qcow2")
    if not qcow2.exists():
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow2)], check=True
        )
    return qcow2


def _assert_booted(result: bootfixture.BootResult) -> None:
    context = f"console tail after {result.seconds:.1f}s:\n{result.tail()}"
    assert not result.timed_out, f"QEMU did not power off within {BOOT_TIMEOUT}s; {context}"
    assert bootfixture.MARKER in result.console, f"no boot marker; {context}"
    assert bootfixture.console_section(result.console, "hostname") == HOSTNAME.decode(), context
    assert bootfixture.console_section(result.console, "network") == INTERFACES.decode(), context


@pytest.mark.parametrize(
    ("firmware", "table", "machine", "disk_format"),
    [
        ("bios", "gpt", "bios", "raw"),
        ("bios", "gpt", "bios", "qcow2"),
        ("bios", "mbr", "bios", "raw"),
        ("uefi", "gpt", "uefi", "raw"),
        ("uefi", "gpt", "uefi", "qcow2"),
        ("both", "gpt", "bios", "raw"),
        ("both", "gpt", "uefi", "raw"),
    ],
)
def test_rendered_disk_boots(
    make_disk: Callable[[str, str], DiskImage],
    disk_dir: Path,
    firmware: str,
    table: str,
    machine: str,
    disk_format: str,
) -> None:
    """The disk boots under SeaBIOS or OVMF and the guest sees the rendered files."""
    if machine == "uefi" and not bootfixture.OVMF_CODE.exists():
        pytest.skip("OVMF is not installed (apt-get install ovmf)")
    image = make_disk(firmware, table)
    path = image.path if disk_format == "raw" else _to_qcow2(image.path)
    result = bootfixture.boot(
        path,
        firmware=machine,
        disk_format=disk_format,
        workdir=disk_dir / f"qemu-{firmware}-{table}-{machine}-{disk_format}",
        timeout=BOOT_TIMEOUT,
    )
    _assert_booted(result)


def test_unrendered_disk_shows_placeholders(
    cloudlet: bootfixture.BootCloudlet, disk_dir: Path
) -> None:
    """Without patches the guest prints the tarball's own files (the check can tell them apart)."""
    image = build_disk(
        cloudlet.tree_tar,
        BootSpec(kernel=cloudlet.kernel, initrd=cloudlet.initrd, cmdline=CMDLINE),
        disk_dir / "plain.raw",
        seed=SEED,
        workdir=disk_dir / "work-plain",
        source_date_epoch=EPOCH,
    )
    result = bootfixture.boot(
        image.path, firmware="bios", disk_format="raw", workdir=disk_dir / "qemu-plain"
    )
    assert bootfixture.MARKER in result.console, result.tail()
    hostname = bootfixture.console_section(result.console, "hostname")
    assert hostname == bootfixture.DEFAULT_HOSTNAME.decode(), result.tail()


def test_build_is_bit_identical(cloudlet: bootfixture.BootCloudlet, tmp_path: Path) -> None:
    """Two cold builds of the same inputs give the same bytes; another seed does not."""
    boot = BootSpec(
        kernel=cloudlet.kernel, initrd=cloudlet.initrd, cmdline=CMDLINE, firmware="both"
    )
    digests = []
    for run, seed in enumerate((SEED, SEED, "another-seed")):
        image = build_disk(
            cloudlet.tree_tar,
            boot,
            tmp_path / f"run{run}.raw",
            seed=seed,
            workdir=tmp_path / f"work{run}",
            source_date_epoch=EPOCH,
            patch_files=RENDERED,
        )
        digests.append(sha256_file(image.path))
    assert digests[0] == digests[1]
    assert digests[2] != digests[0]


def test_patched_cached_base_equals_cold_build(
    cloudlet: bootfixture.BootCloudlet, tmp_path: Path
) -> None:
    """A render from the cached base filesystem is byte-identical to a cold render."""
    boot = BootSpec(
        kernel=cloudlet.kernel, initrd=cloudlet.initrd, cmdline=CMDLINE, firmware="both"
    )
    images = []
    for run, cache in enumerate((None, tmp_path / "cache", tmp_path / "cache")):
        images.append(
            build_disk(
                cloudlet.tree_tar,
                boot,
                tmp_path / f"run{run}.raw",
                seed=SEED,
                workdir=tmp_path / f"work{run}",
                source_date_epoch=EPOCH,
                base_cache=cache,
                patch_files=RENDERED,
            )
        )
    assert [image.base_cached for image in images] == [False, False, True]
    assert len({sha256_file(image.path) for image in images}) == 1


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory an unprivileged user can write (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="cloudlets-rootless-"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


_ROOTLESS_BUILD = f"""
import sys
from pathlib import Path
from cloudlets.disk import BootSpec, build_disk
tree, out, work, kernel, initrd = sys.argv[1:6]
boot = BootSpec(kernel=kernel, initrd=initrd, cmdline={CMDLINE!r}, firmware="both")
build_disk(Path(tree), boot, Path(out), seed={SEED!r}, workdir=Path(work),
           source_date_epoch={EPOCH}, patch_files={RENDERED!r})
"""


def test_rootless_build_matches_and_boots(
    cloudlet: bootfixture.BootCloudlet, shared_dir: Path, tmp_path: Path
) -> None:
    """Built as ``nobody`` (no root, no capabilities), the disk is byte-identical and boots."""
    command = [sys.executable, "-c", _ROOTLESS_BUILD]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is needed to drop root")
        command = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    tree = shared_dir / "tree.tar"
    shutil.copyfile(cloudlet.tree_tar, tree)
    tree.chmod(0o644)
    out = shared_dir / "rootless.raw"
    repo = Path(__file__).resolve().parent.parent
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "PYTHONPATH": str(repo), "HOME": str(shared_dir)}
    proc = subprocess.run(
        [*command, str(tree), str(out), str(shared_dir / "work"), cloudlet.kernel, cloudlet.initrd],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.stat().st_uid == os.geteuid() or os.geteuid() == 0
    if os.geteuid() == 0:
        assert out.stat().st_uid == 65534
    reference = build_disk(
        cloudlet.tree_tar,
        BootSpec(kernel=cloudlet.kernel, initrd=cloudlet.initrd, cmdline=CMDLINE, firmware="both"),
        tmp_path / "as-root.raw",
        seed=SEED,
        workdir=tmp_path / "work",
        source_date_epoch=EPOCH,
        patch_files=RENDERED,
    )
    assert sha256_file(out) == sha256_file(reference.path)
    _assert_booted(
        bootfixture.boot(out, firmware="uefi", disk_format="raw", workdir=tmp_path / "qemu")
    )
