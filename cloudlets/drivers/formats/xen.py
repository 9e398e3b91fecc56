"""``xen``: a disk and its ``xl`` domain configuration, PV (pygrub) or HVM.

**PV** (the default): Xen's ``pygrub`` runs in dom0, opens the guest disk,
reads a GRUB configuration from the root filesystem and hands the kernel,
initrd and command line it names to the hypervisor; the disk's own boot
sector is never run. The disk stage embeds its GRUB script in the boot
images and writes no ``/boot/grub/grub.cfg``, so this driver writes one into
the root filesystem of its copy of the disk: one ``menuentry`` with the
manifest's kernel, initrd and command line, ``root=UUID=`` of the root
filesystem when the command line names no root, and ``console=hvc0`` (the
Xen PV console) last. The file is written rootlessly with ``debugfs`` at the
root partition's offset (``image?offset=N``), its times pinned with
``E2FSPROGS_FAKE_TIME`` so the output stays reproducible. A
``/boot/grub/grub.cfg`` already in the image is replaced (pygrub reads
``grub.cfg`` before ``menu.lst``).

**HVM** (``ex_mode="hvm"``): the disk boots through its own firmware and
bootloader, unchanged; the configuration asks for UEFI firmware when the
disk boots only that way.

Outputs: ``<basename>.img`` (role ``disk``, raw) and ``<basename>.cfg``
(role ``domain-config``), whose ``disk`` line expects the image at
``<ex_image_dir>/<basename>.img``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import ClassVar

from cloudlets.disk.bootloader import kernel_cmdline
from cloudlets.drivers.base import FormatContext, FormatDriver, OutputFile
from cloudlets.drivers.formats.pieces import copy_disk
from cloudlets.drivers.types import Format, FormatCapability
from cloudlets.errors import ConfigurationError, FormatError
from cloudlets.tools import run

__all__ = ["GRUB_CONFIG_PATH", "XenFormat", "pygrub_config"]

MiB = 1024 * 1024
#: Where the PV variant writes the boot configuration pygrub reads.
GRUB_CONFIG_PATH = "/boot/grub/grub.cfg"
#: The Xen PV console.
XEN_CONSOLE = "hvc0"
#: debugfs prints its version banner on stderr; anything else there is an error.
_DEBUGFS_ERROR = r"^(?!debugfs \d)\S.*$"
#: Characters a kernel argument may hold in a pygrub configuration: pygrub
#: passes the rest of the ``linux`` line verbatim, so nothing that GRUB
#: would need quoted can be expressed.
_SAFE_ARG = re.compile(r"^[A-Za-z0-9_.,:=/+@%-]+$")
_SAFE_CFG_STRING = re.compile(r"^[^'\"\\\n\r]+$")


def pygrub_config(*, title: str, kernel: str, initrd: str | None, cmdline: str,
                  root_uuid: str) -> str:
    """A GRUB 2 configuration pygrub's parser understands.

    :param title: the menu entry's title.
    :param kernel: the kernel's absolute path inside the root filesystem.
    :param initrd: the initrd's absolute path, or ``None``.
    :param cmdline: the manifest's kernel command line.
    :param root_uuid: the root filesystem UUID, used unless ``cmdline`` names a root.
    :returns: the configuration text.
    :raises FormatError: a path or argument cannot be written unquoted.
    :raises DiskError: the command line cannot be split.
    """
    args = kernel_cmdline(cmdline, root_uuid, console=XEN_CONSOLE)
    for value in (kernel, initrd, *args):
        if value is not None and not _SAFE_ARG.match(value):
            raise FormatError(f"{value!r} cannot be written into a pygrub configuration "
                              "(only letters, digits and _.,:=/+@%- are passed through)")
    for value in (kernel, initrd):
        if value is not None and not value.startswith("/"):
            raise FormatError(f"boot file {value!r} must be an absolute path")
    safe_title = re.sub(r"[^A-Za-z0-9_.+ -]", "_", title)
    lines = [
        "# Written by cloudlets for Xen's pygrub.",
        "set default=0",
        "set timeout=0",
        f"menuentry '{safe_title}' {{",
        f"\tlinux {kernel} {' '.join(args)}",
    ]
    if initrd is not None:
        lines.append(f"\tinitrd {initrd}")
    lines.append("}")
    return "\n".join(lines) + "\n"


class XenFormat(FormatDriver):
    """Xen guest disk (``.img``) with its ``xl`` configuration (``.cfg``).

    :param ex_mode: ``"pv"`` (pygrub boots the kernel named in the image) or
        ``"hvm"`` (the disk's own bootloader under emulated firmware).
    :param ex_image_dir: the dom0 directory the ``disk`` line points into.
    :param ex_bridge: the dom0 bridge every ``vif`` joins.
    :param ex_timestamp: the time written into the patched inodes; by default
        the disk stage's :attr:`~cloudlets.drivers.base.DiskImage.source_date_epoch`
        (else 1970-01-01).
    """

    name: ClassVar[str] = Format.XEN
    website: ClassVar[str] = "https://xenbits.xen.org/docs/unstable/man/xl.cfg.5.html"
    description: ClassVar[str] = \
        "Xen PV (pygrub) or HVM disk with its xl domain configuration (.img, .cfg)"
    capabilities: ClassVar[FormatCapability] = (FormatCapability.BOOTABLE
                                                 | FormatCapability.MULTI_ARTIFACT
                                                 | FormatCapability.COMPOSED_DISK)
    extension = ".img"

    def __init__(self, ex_mode: str = "pv", ex_image_dir: str = "/var/lib/xen/images",
                 ex_bridge: str = "xenbr0", ex_timestamp: int | None = None) -> None:
        if ex_mode not in ("pv", "hvm"):
            raise ConfigurationError(f"ex_mode {ex_mode!r} is not 'pv' or 'hvm'")
        for label, value in (("ex_image_dir", ex_image_dir), ("ex_bridge", ex_bridge)):
            if not _SAFE_CFG_STRING.match(value) or "," in value:
                raise ConfigurationError(f"{label} {value!r} cannot be written into an xl "
                                  "configuration (quotes, backslashes, commas, newlines)")
        self.mode = ex_mode
        self.image_dir = ex_image_dir
        self.bridge = ex_bridge
        self.timestamp = ex_timestamp

    def convert(self, context: FormatContext) -> list[OutputFile]:
        disk_name = f"{context.basename}.img"
        disk = context.workdir / disk_name
        copy_disk(context.disk, disk)  # whole or from pieces, holes kept
        if self.mode == "pv":
            self._install_pygrub_config(context, disk)
        config_name = f"{context.basename}.cfg"
        config = context.workdir / config_name
        config.write_text(self.ex_domain_config(context, disk_name), encoding="utf-8")
        return [
            OutputFile(role="disk", path=disk, name=disk_name),
            OutputFile(role="domain-config", path=config, name=config_name,
                       media_type="text/plain"),
        ]

    def ex_domain_config(self, context: FormatContext, disk_name: str) -> str:
        """The ``xl`` domain configuration (xl.cfg(5) syntax).

        :param context: the conversion's context.
        :param disk_name: the image's file name inside :attr:`image_dir`.
        :returns: the configuration text.
        """
        manifest = context.manifest
        hardware = manifest.hardware
        memory_mib = max(-(-int(hardware["memory"]) // MiB), 64)
        target = f"{self.image_dir.rstrip('/')}/{disk_name}"
        interfaces = context.config.interfaces or [{"name": "eth0"}]
        vifs = []
        for interface in interfaces:
            spec = [f"bridge={self.bridge}"]
            if interface.get("mac"):
                spec.insert(0, f"mac={interface['mac']}")
            vifs.append("'" + ",".join(spec) + "'")
        lines = [
            f"# Xen domain configuration for {manifest.label}, written by cloudlets.",
            f"# Copy {disk_name} to {self.image_dir} and run: xl create <this file>",
            f'name = "{context.config.hostname}"',
            f'type = "{self.mode}"',
        ]
        if self.mode == "pv":
            lines.append('bootloader = "pygrub"')
        else:
            if context.disk.firmware == "uefi":
                lines.append('firmware = "uefi"')
            lines += ['boot = "c"', 'serial = "pty"']
        lines += [
            f"memory = {memory_mib}",
            f"vcpus = {int(hardware['cpus'])}",
            f"disk = [ 'format=raw,vdev=xvda,access=rw,target={target}' ]",
            f"vif = [ {', '.join(vifs)} ]",
            'on_poweroff = "destroy"',
            'on_reboot = "restart"',
            'on_crash = "destroy"',
        ]
        return "\n".join(lines) + "\n"

    # -- private helpers ----------------------------------------------------

    def _install_pygrub_config(self, context: FormatContext, disk: Path) -> None:
        boot = context.manifest.boot
        if boot is None:
            raise FormatError("the Xen PV format needs the manifest's boot section "
                              "(kernel, initrd, cmdline) to write pygrub's configuration")
        offset, root_uuid = context.disk.root_offset, context.disk.root_uuid
        if offset is None or root_uuid is None:
            raise FormatError(f"{context.disk.path.name} has no root filesystem for pygrub to "
                              "read (the disk stage records its offset and UUID in "
                              "DiskImage.root_offset and root_uuid; this disk has none)")
        text = pygrub_config(title=context.manifest.label, kernel=boot.kernel,
                             initrd=boot.initrd, cmdline=boot.cmdline, root_uuid=root_uuid)
        timestamp = self.timestamp
        if timestamp is None:
            timestamp = context.disk.source_date_epoch or 0
        image = f"{disk}?offset={offset}"
        source = context.workdir / ".grub.cfg"
        script = context.workdir / ".grub.debugfs"
        source.write_text(text, encoding="ascii")
        lines = []
        for directory in ("/boot", "/boot/grub"):
            if not self._exists(image, directory):
                lines.append(f"mkdir {directory}")
        if self._exists(image, GRUB_CONFIG_PATH):
            lines.append(f"rm {GRUB_CONFIG_PATH}")
        lines += [
            f"write {source} {GRUB_CONFIG_PATH}",
            f"sif {GRUB_CONFIG_PATH} mode 0100644",
            f"sif {GRUB_CONFIG_PATH} uid 0",
            f"sif {GRUB_CONFIG_PATH} gid 0",
        ]
        script.write_text("\n".join(lines) + "\n", encoding="utf-8")
        env = dict(os.environ, E2FSPROGS_FAKE_TIME=str(max(timestamp, 1)), LC_ALL="C",
                   TZ="UTC")
        try:
            run("debugfs", ["-w", "-f", script, image], error=FormatError, env=env,
                timeout=120, check_stderr=_DEBUGFS_ERROR)
        finally:
            source.unlink()
            script.unlink()

    @staticmethod
    def _exists(image: str, path: str) -> bool:
        proc = run("debugfs", ["-R", f"stat {path}", image], error=FormatError, timeout=60)
        return b"Inode:" in proc.stdout
