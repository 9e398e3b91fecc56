"""A tiny real cloudlet built from Debian packages, and a QEMU runner: boot proofs.

The cloudlet is a Debian kernel, ``busybox-static`` and a small initramfs that
loads just the modules a virtio disk with ext4 needs, mounts the root by the
``root=`` of the kernel command line and switches to it. The root's
``/sbin/init`` prints :data:`MARKER`, then ``/etc/hostname``,
``/etc/network/interfaces`` and ``/etc/resolv.conf`` between delimiter lines,
to the serial console and powers off. An *overlay* replaces or adds files
(templates, say) before the tarball is packed.

cloudlets' own tests boot every bootable format with it, the example in
``examples/`` is built from it, and a driver author can prove that their
format's output boots::

    from cloudlets.testing.boot import MARKER, boot, build_boot_cloudlet

    cloudlet = build_boot_cloudlet()            # cached after the first call
    # ... render a manifest whose filesystem is cloudlet.tarball ...
    result = boot(image, firmware="bios", disk_format="raw", workdir=tmp)
    assert MARKER in result.console

It needs a Debian host (``apt-get download`` and ``dpkg-deb`` work as any
user) and, to boot, ``qemu-system-x86_64`` (OVMF for UEFI). QEMU runs with
software emulation (``accel=tcg``), so no KVM is needed. Nothing binary is
committed: the ``.deb`` files and the built tarballs are cached under
``$CLOUDLETS_TEST_CACHE`` (default ``~/.cache/cloudlets-tests``), keyed by the
package versions, the overlay and :data:`FIXTURE_VERSION`.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import re
import shutil
import struct
import subprocess
import tarfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "FIXTURE_VERSION",
    "MARKER",
    "BootCloudlet",
    "BootResult",
    "FixtureUnavailable",
    "boot",
    "build_boot_cloudlet",
    "cache_dir",
    "console_section",
]

#: Printed by the cloudlet's init once the root filesystem is up.
MARKER = "CLOUDLETS-BOOT-OK"
#: Bump when the built tree changes, to invalidate cached tarballs.
FIXTURE_VERSION = 4
#: Reproducible mtime for every member of the tree.
TREE_MTIME = 1_700_000_000
#: Modules the initramfs must load (their dependencies are added).
ROOT_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
#: Kernel directories searched for those modules.
_MODULE_DIRS = (
    "kernel/drivers/block/",
    "kernel/drivers/virtio/",
    "kernel/fs/",
    "kernel/lib/",
    "kernel/crypto/",
    "kernel/arch/x86/crypto/",
)

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS.fd")
#: Guest memory in MiB. Debian's GRUB 2.06 for EFI fails to allocate the
#: kernel ("out of memory") under OVMF with 256 MiB, so UEFI boots get 512.
MEMORY_MIB = {"bios": 256, "uefi": 512}

_INITRAMFS_INIT = """#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$module" || echo "initramfs: insmod $module failed"
done
root=
for arg in $(cat /proc/cmdline); do
    case "$arg" in root=*) root="${arg#root=}" ;; esac
done
device=
tries=0
while [ -z "$device" ] && [ "$tries" -lt 100 ]; do
    case "$root" in
        UUID=*|LABEL=*) device=$(findfs "$root" 2>/dev/null) ;;
        /dev/*) [ -b "$root" ] && device="$root" ;;
    esac
    [ -n "$device" ] || { sleep 0.1; tries=$((tries + 1)); }
done
if [ -z "$device" ] || ! mount -t ext4 -o ro "$device" /newroot; then
    echo "initramfs: cannot mount root $root"
    ls /dev
    poweroff -f
fi
umount /proc /sys
mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
"""

_ROOT_INIT = f"""#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
echo {MARKER}
echo ---hostname---
cat /etc/hostname
echo ---network---
cat /etc/network/interfaces
echo ---resolv---
cat /etc/resolv.conf 2>/dev/null
echo ---end---
poweroff -f
"""

#: Placeholder contents the render is expected to replace.
DEFAULT_HOSTNAME = b"unconfigured\n"
DEFAULT_INTERFACES = b"# unconfigured\n"


class FixtureUnavailable(RuntimeError):
    """The boot cloudlet cannot be built here (no apt lists, no network...)."""


@dataclass(frozen=True)
class BootCloudlet:
    """The built cloudlet.

    :ivar tree_tar: the root tree as an uncompressed, normalized PAX tar.
    :ivar tarball: the same, gzip'd, as a cloudlet's filesystem tarball.
    :ivar sha256: the gzip'd tarball's sha256.
    :ivar kernel: kernel path in the tree (a symlink, as on Debian).
    :ivar initrd: initrd path in the tree.
    :ivar kernel_version: the Debian kernel's version string.
    """

    tree_tar: Path
    tarball: Path
    sha256: str
    kernel: str
    initrd: str
    kernel_version: str


def cache_dir() -> Path:
    """Where downloads and built tarballs are kept between runs."""
    env = os.environ.get("CLOUDLETS_TEST_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "cloudlets-tests"
    base.mkdir(parents=True, exist_ok=True)
    return base


def _apt(args: list[str], cwd: Path | None = None) -> str:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, cwd=cwd, check=False)
    except FileNotFoundError as exc:
        raise FixtureUnavailable(f"{args[0]} is not installed (not a Debian host?)") from exc
    if proc.returncode != 0:
        raise FixtureUnavailable(
            f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}"
        )
    return proc.stdout


def _package_version(package: str) -> str:
    text = _apt(["apt-cache", "show", "--no-all-versions", package])
    match = re.search(r"^Version: (\S+)", text, re.MULTILINE)
    if match is None:
        raise FixtureUnavailable(f"apt knows no version of {package}; run apt-get update")
    return match.group(1)


def _kernel_package() -> str:
    text = _apt(["apt-cache", "depends", "linux-image-amd64"])
    match = re.search(r"Depends: (linux-image-\d\S*-amd64)\b", text)
    if match is None:
        raise FixtureUnavailable("apt-cache depends linux-image-amd64 names no kernel package")
    return match.group(1)


def _download(package: str, version: str, debs: Path) -> Path:
    """Fetch a .deb into the cache (apt-get download works as any user)."""
    safe_version = version.replace(":", "%3a")
    found = sorted(debs.glob(f"{package}_{safe_version}_*.deb"))
    if found:
        return found[0]
    debs.mkdir(parents=True, exist_ok=True)
    _apt(["apt-get", "download", f"{package}={version}"], cwd=debs)
    found = sorted(debs.glob(f"{package}_{safe_version}_*.deb"))
    if not found:
        raise FixtureUnavailable(f"apt-get download {package}={version} left no .deb")
    return found[0]


def _deb_members(deb: Path, wanted: re.Pattern[str]) -> dict[str, bytes]:
    """Read the matching regular files out of a .deb's data (streamed, nothing extracted)."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=proc.stdout, mode="r|") as archive:
        for member in archive:
            name = member.name.removeprefix("./")
            if member.isreg() and wanted.search(name):
                handle = archive.extractfile(member)
                assert handle is not None
                found[name] = handle.read()
    if proc.wait() != 0:
        raise FixtureUnavailable(f"dpkg-deb --fsys-tarfile {deb} failed")
    return found


def _modinfo(module: bytes) -> dict[str, str]:
    """The ``.modinfo`` section of an ELF64 kernel module as key -> value."""
    (shoff,) = struct.unpack_from("<Q", module, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", module, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        base = shoff + index * shentsize
        name, _type, _flags, _addr, offset, size = struct.unpack_from("<IIQQQQ", module, base)
        return name, offset, size

    _, str_off, _ = section(shstrndx)
    info: dict[str, str] = {}
    for index in range(shnum):
        name_off, offset, size = section(index)
        end = module.index(b"\0", str_off + name_off)
        if module[str_off + name_off : end] == b".modinfo":
            for item in module[offset : offset + size].split(b"\0"):
                key, sep, value = item.decode("utf-8", "replace").partition("=")
                if sep:
                    info.setdefault(key, value)
    return info


def _module_load_order(modules: Mapping[str, bytes], roots: Iterable[str]) -> list[str]:
    """Resolve ``depends=`` and return module file names, dependencies first."""
    by_name = {Path(path).name.removesuffix(".ko").replace("-", "_"): path for path in modules}
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen:
            return
        seen.add(name)
        if name not in by_name:
            raise FixtureUnavailable(f"kernel module {name} not found in the kernel package")
        depends = _modinfo(modules[by_name[name]]).get("depends", "")
        for dep in filter(None, depends.split(",")):
            visit(dep)
        order.append(by_name[name])

    for root in roots:
        visit(root)
    return order


def _cpio_newc(entries: list[tuple[str, int, bytes, int]]) -> bytes:
    """An uncompressed ``newc`` cpio archive (name, mode, data, rdev) with fixed metadata."""
    out = io.BytesIO()

    def record(ino: int, name: str, mode: int, data: bytes, rdev: int) -> None:
        encoded = name.encode() + b"\0"
        header = "070701" + "".join(
            f"{v:08x}"
            for v in (
                ino,
                mode,
                0,
                0,
                1,
                TREE_MTIME,
                len(data),
                0,
                0,
                rdev >> 8,
                rdev & 0xFF,
                len(encoded),
                0,
            )
        )
        out.write(header.encode() + encoded)
        out.write(b"\0" * (-(110 + len(encoded)) % 4))
        out.write(data)
        out.write(b"\0" * (-len(data) % 4))

    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        record(ino, name, mode, data, rdev)
    record(0, "TRAILER!!!", 0, b"", 0)
    return out.getvalue()


def _initramfs(busybox: bytes, modules: Mapping[str, bytes], order: list[str]) -> bytes:
    names = [Path(path).name for path in order]
    entries: list[tuple[str, int, bytes, int]] = [
        ("bin", 0o040755, b"", 0),
        ("bin/busybox", 0o100755, busybox, 0),
        ("bin/sh", 0o120777, b"busybox", 0),
        ("dev", 0o040755, b"", 0),
        ("dev/console", 0o020600, b"", (5 << 8) | 1),
        ("init", 0o100755, _INITRAMFS_INIT.encode(), 0),
        ("lib", 0o040755, b"", 0),
        ("lib/modules", 0o040755, b"", 0),
        ("lib/modules/load-order", 0o100644, ("\n".join(names) + "\n").encode(), 0),
    ]
    for path, name in zip(order, names, strict=True):
        entries.append((f"lib/modules/{name}", 0o100644, modules[path], 0))
    entries += [
        ("newroot", 0o040755, b"", 0),
        ("proc", 0o040755, b"", 0),
        ("sys", 0o040755, b"", 0),
    ]
    return gzip.compress(_cpio_newc(entries), compresslevel=6, mtime=0)


def _tree(
    busybox: bytes,
    kernel: bytes,
    kernel_version: str,
    initrd: bytes,
    overlay: Mapping[str, bytes] | None = None,
) -> list[tuple[tarfile.TarInfo, bytes | None]]:
    """The root tree's members, parents before children, overlay applied."""
    members: list[tuple[tarfile.TarInfo, bytes | None]] = []

    def add(name: str, kind: bytes, mode: int, data: bytes | None = None, **extra: object) -> None:
        info = tarfile.TarInfo(name)
        info.type = kind
        info.mode = mode
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        info.mtime = TREE_MTIME
        for key, value in extra.items():
            setattr(info, key, value)
        if data is not None:
            info.size = len(data)
        members.append((info, data))

    directory, regular, symlink = tarfile.DIRTYPE, tarfile.REGTYPE, tarfile.SYMTYPE
    add("bin", directory, 0o755)
    add("bin/busybox", regular, 0o755, busybox)
    for applet in ("cat", "echo", "ls", "mount", "sh"):
        add(f"bin/{applet}", symlink, 0o777, linkname="/bin/busybox")
    add("boot", directory, 0o755)
    add(f"boot/initrd.img-{kernel_version}", regular, 0o644, initrd)
    add(f"boot/vmlinuz-{kernel_version}", regular, 0o644, kernel)
    add("boot/initrd.img", symlink, 0o777, linkname=f"initrd.img-{kernel_version}")
    add("boot/vmlinuz", symlink, 0o777, linkname=f"vmlinuz-{kernel_version}")
    add("dev", directory, 0o755)
    add("dev/console", tarfile.CHRTYPE, 0o600, devmajor=5, devminor=1)
    add("dev/null", tarfile.CHRTYPE, 0o666, devmajor=1, devminor=3)
    add("etc", directory, 0o755)
    add("etc/hostname", regular, 0o644, DEFAULT_HOSTNAME)
    add("etc/network", directory, 0o755)
    add("etc/network/interfaces", regular, 0o644, DEFAULT_INTERFACES)
    add("proc", directory, 0o555)
    add("root", directory, 0o700)
    add("sbin", directory, 0o755)
    add("sbin/init", regular, 0o755, _ROOT_INIT.encode())
    add("sbin/poweroff", symlink, 0o777, linkname="/bin/busybox")
    add("sys", directory, 0o555)
    add("tmp", directory, 0o1777)
    for name, data in sorted((overlay or {}).items()):
        name = name.strip("/")
        index = {info.name: i for i, (info, _) in enumerate(members)}
        if name in index:
            info, _ = members[index[name]]
            if not info.isreg():
                raise ValueError(f"overlay {name}: the tree has a non-regular file there")
            info.size = len(data)
            members[index[name]] = (info, data)
            continue
        parts = name.split("/")
        for depth in range(1, len(parts)):
            parent = "/".join(parts[:depth])
            if parent not in index:
                add(parent, directory, 0o755)
                index[parent] = len(members) - 1
        add(name, regular, 0o644, data)
    return members


def build_boot_cloudlet(
    cache: Path | None = None, overlay: Mapping[str, bytes] | None = None
) -> BootCloudlet:
    """Build (or take from the cache) the boot cloudlet.

    :param cache: the cache directory; :func:`cache_dir` by default.
    :param overlay: files to replace or add, path inside the tree -> content
        (a replaced file keeps its mode; an added one is 0644, its missing
        parent directories 0755), e.g. template sources.
    :returns: the cloudlet's tarballs and boot paths.
    :raises FixtureUnavailable: apt lists or the network are missing.
    """
    cache = cache or cache_dir()
    kernel_pkg = _kernel_package()
    kernel_ver = _package_version(kernel_pkg)
    busybox_ver = _package_version("busybox-static")
    overlay_digest = hashlib.sha256()
    for name, data in sorted((overlay or {}).items()):
        overlay_digest.update(f"{name}\0{len(data)}\0".encode() + data)
    key = hashlib.sha256(
        f"{FIXTURE_VERSION}\0{kernel_pkg}\0{kernel_ver}\0{busybox_ver}\0"
        f"{overlay_digest.hexdigest() if overlay else ''}".encode()
    ).hexdigest()[:16]
    kernel_version = kernel_pkg.removeprefix("linux-image-")
    tree_tar = cache / f"cloudlet-{key}.tar"
    tarball = cache / f"cloudlet-{key}.tar.gz"
    digest_file = cache / f"cloudlet-{key}.tar.gz.sha256"
    if not (tree_tar.is_file() and tarball.is_file() and digest_file.is_file()):
        debs = cache / "debs"
        kernel_deb = _download(kernel_pkg, kernel_ver, debs)
        busybox_deb = _download("busybox-static", busybox_ver, debs)
        busybox = _deb_members(busybox_deb, re.compile(r"^bin/busybox$"))["bin/busybox"]
        dirs = "|".join(re.escape(d) for d in _MODULE_DIRS)
        files = _deb_members(
            kernel_deb, re.compile(rf"^(boot/vmlinuz-.*|lib/modules/[^/]+/({dirs}).*\.ko)$")
        )
        kernel = next(data for name, data in files.items() if name.startswith("boot/vmlinuz-"))
        modules = {name: data for name, data in files.items() if name.endswith(".ko")}
        initrd = _initramfs(busybox, modules, _module_load_order(modules, ROOT_MODULES))
        partial = tree_tar.with_suffix(f".partial-{os.getpid()}")
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as archive:
            for info, content in _tree(busybox, kernel, kernel_version, initrd, overlay):
                archive.addfile(info, io.BytesIO(content) if content is not None else None)
        gz_partial = tarball.with_suffix(f".partial-{os.getpid()}")
        with (
            open(partial, "rb") as src,
            open(gz_partial, "wb") as raw,
            gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as out,
        ):
            shutil.copyfileobj(src, out, 1 << 20)
        digest = hashlib.sha256(gz_partial.read_bytes()).hexdigest()
        os.replace(partial, tree_tar)
        os.replace(gz_partial, tarball)
        digest_file.write_text(f"{digest}  {tarball.name}\n")
    return BootCloudlet(
        tree_tar=tree_tar,
        tarball=tarball,
        sha256=digest_file.read_text().split()[0],
        kernel="/boot/vmlinuz",
        initrd="/boot/initrd.img",
        kernel_version=kernel_version,
    )


@dataclass(frozen=True)
class BootResult:
    """What a boot printed and how it ended.

    :ivar console: everything written to the serial console.
    :ivar timed_out: QEMU was killed at the deadline.
    :ivar seconds: wall-clock duration.
    """

    console: str
    timed_out: bool
    seconds: float

    def tail(self, lines: int = 40) -> str:
        """The last lines of the console, for failure messages."""
        return "\n".join(self.console.splitlines()[-lines:])


def boot(
    image: Path, *, firmware: str, disk_format: str, workdir: Path, timeout: float = 90
) -> BootResult:
    """Boot a disk image in QEMU with software emulation until it powers off.

    :param image: the disk image (opened with ``snapshot=on``; never modified).
    :param firmware: ``"bios"`` (SeaBIOS) or ``"uefi"`` (OVMF).
    :param disk_format: ``"raw"`` or ``"qcow2"``.
    :param workdir: where the console log and the OVMF variable store go.
    :param timeout: seconds before QEMU is killed.
    :returns: the console output.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    console = workdir / f"console-{firmware}-{disk_format}.log"
    console.unlink(missing_ok=True)
    args = [
        "qemu-system-x86_64",
        "-machine", "pc,accel=tcg",
        "-m", str(MEMORY_MIB[firmware]),
        "-smp", "1",
        "-nodefaults",
        "-display", "none",
        "-no-reboot",
        "-serial", f"file:{console}",
        "-drive", f"file={image},format={disk_format},if=virtio,snapshot=on",
    ]  # fmt: skip
    if firmware == "uefi":
        variables = workdir / "OVMF_VARS.fd"
        shutil.copyfile(OVMF_VARS, variables)
        args += [
            "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
            "-drive", f"if=pflash,format=raw,file={variables}",
        ]  # fmt: skip
    started = time.monotonic()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    timed_out = False
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        _, stderr = proc.communicate()
    seconds = time.monotonic() - started
    text = console.read_text("utf-8", "replace") if console.exists() else ""
    if stderr:
        text += "\n[qemu stderr] " + stderr.decode("utf-8", "replace")
    return BootResult(console=text.replace("\r\n", "\n"), timed_out=timed_out, seconds=seconds)


def console_section(console: str, name: str) -> str | None:
    """The text the cloudlet's init printed between ``---name---`` and the next delimiter.

    :returns: the section's content (with its final newline), or ``None``.
    """
    match = re.search(
        rf"^---{re.escape(name)}---\n(.*?)^---\w+---$", console, re.MULTILINE | re.DOTALL
    )
    return match.group(1) if match else None
