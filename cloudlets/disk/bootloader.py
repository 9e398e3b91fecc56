"""GRUB for BIOS and UEFI, assembled without grub-install.

``grub-install`` wants root and block devices, so we do its work by hand:

* the boot configuration is embedded into the GRUB image (``grub-mkimage -c``)
  and runs without the ``normal`` module: it finds the root filesystem by its
  UUID, loads the kernel and initrd from it and boots; nothing has to be
  installed in ``/boot/grub`` of the root filesystem;
* BIOS: ``boot.img`` goes into the first sector's code area and ``core.img``
  into the BIOS boot partition (GPT) or the gap before the first partition
  (MBR); the two sector pointers ``grub-bios-setup`` would patch are patched
  here;
* UEFI: the ``x86_64-efi`` image becomes ``EFI/BOOT/BOOTX64.EFI`` on a FAT32
  EFI system partition built with ``mkfs.fat`` and mtools, with a fixed volume
  id and timestamps.
"""

from __future__ import annotations

import os
import shlex
import struct
from pathlib import Path

from cloudlets.disk.tools import (
    GRUB_I386_PC_DIR,
    GRUB_X86_64_EFI_DIR,
    grub_platform_dir,
    run,
    tool_environment,
    unsynced,
)
from cloudlets.errors import DiskError

__all__ = [
    "BIOS_MODULES",
    "EFI_MODULES",
    "build_bios_core",
    "build_efi_binary",
    "grub_config",
    "install_bios_boot",
    "kernel_cmdline",
    "make_esp",
]

#: GRUB modules built into the BIOS core image (dependencies are added by grub-mkimage).
BIOS_MODULES = (
    "biosdisk",
    "part_gpt",
    "part_msdos",
    "ext2",
    "search",
    "search_fs_uuid",
    "linux",
    "boot",
    "echo",
)
#: GRUB modules built into the EFI image.
EFI_MODULES = (
    "part_gpt",
    "part_msdos",
    "ext2",
    "fat",
    "search",
    "search_fs_uuid",
    "linux",
    "boot",
    "echo",
    "efi_gop",
)

# Offsets inside GRUB's boot.img (grub/include/grub/i386/pc/boot.h).
_KERNEL_SECTOR_OFFSET = 0x5C
_BOOT_DRIVE_OFFSET = 0x64
_DRIVE_CHECK_OFFSET = 0x66
_BOOT_CODE_SIZE = 440
# The last 12 bytes of diskboot.img (core.img's first sector) are a blocklist
# entry: start sector (u64), sector count (u16), load segment (u16).
_BLOCKLIST_OFFSET = 512 - 12


def _grub_quote(word: str) -> str:
    """Quote a word for GRUB's script parser (single quotes, as in sh)."""
    if word and all(c.isalnum() or c in "-_./=:,+@%" for c in word):
        return word
    return "'" + word.replace("'", "'\\''") + "'"


def kernel_cmdline(cmdline: str, root_uuid: str, *, console: str | None = None) -> list[str]:
    """The kernel's arguments, built here for every boot path (the GRUB
    images, Xen's pygrub configuration): the manifest's, with
    ``root=UUID=`` first unless it names a root.

    :param cmdline: the manifest's kernel command line.
    :param root_uuid: the root filesystem UUID.
    :param console: a console the boot path needs (``hvc0`` under Xen PV):
        ``console=<it>`` goes last, once, so it is ``/dev/console`` (the
        kernel's last ``console=``).
    :returns: the arguments as a list.
    :raises DiskError: the command line cannot be split (unbalanced quotes).
    """
    try:
        words = shlex.split(cmdline)
    except ValueError as exc:
        raise DiskError(f"cannot parse kernel command line {cmdline!r}: {exc}") from exc
    if not any(word.startswith("root=") for word in words):
        words.insert(0, f"root=UUID={root_uuid}")
    if console is not None:
        words = [word for word in words if word != f"console={console}"]
        words.append(f"console={console}")
    return words


def grub_config(*, kernel: str, initrd: str | None, cmdline: str, root_uuid: str) -> str:
    """The GRUB script embedded in the boot images.

    It uses only commands the core image provides (no ``normal`` module):
    ``search``, ``linux``, ``initrd``, ``boot``.

    :param kernel: the kernel's path inside the root filesystem.
    :param initrd: the initrd's path inside the root filesystem, or ``None``.
    :param cmdline: the kernel command line from the manifest.
    :param root_uuid: the root filesystem UUID.
    :returns: the script.
    """
    for path in (kernel, initrd):
        if path is not None and not path.startswith("/"):
            raise DiskError(f"boot file {path!r} must be an absolute path inside the tree")
    args = " ".join(_grub_quote(w) for w in kernel_cmdline(cmdline, root_uuid))
    lines = [
        f"search --no-floppy --fs-uuid --set=root {root_uuid}",
        f"echo {_grub_quote(f'cloudlets: loading {kernel}')}",
        f"linux {_grub_quote(kernel)} {args}",
    ]
    if initrd is not None:
        lines.append(f"initrd {_grub_quote(initrd)}")
    lines.append("boot")
    return "\n".join(lines) + "\n"


def _mkimage(
    platform: str,
    directory: Path,
    modules: tuple[str, ...],
    config: str,
    prefix: str,
    output: Path,
    workdir: Path,
) -> bytes:
    config_file = workdir / f"grub-{platform}.cfg"
    config_file.write_text(config)
    run(
        "grub-mkimage",
        [
            "-O",
            platform,
            "-d",
            grub_platform_dir(directory),
            "-p",
            prefix,
            "-c",
            config_file,
            "-o",
            output,
            *modules,
        ],
        env=tool_environment(0),
    )
    return output.read_bytes()


def build_bios_core(config: str, workdir: Path) -> bytes:
    """Build GRUB's BIOS ``core.img`` with the configuration embedded.

    :param config: the script from :func:`grub_config`.
    :param workdir: a scratch directory.
    :returns: the core image, a whole number of sectors.
    :raises DiskError: grub-mkimage failed.
    :raises ConfigurationError: grub-common or grub-pc-bin is missing.
    """
    core = _mkimage(
        "i386-pc",
        GRUB_I386_PC_DIR,
        BIOS_MODULES,
        config,
        "/boot/grub",
        workdir / "core.img",
        workdir,
    )
    if len(core) % 512:
        core += b"\0" * (512 - len(core) % 512)
    return core


def build_efi_binary(config: str, workdir: Path) -> bytes:
    """Build GRUB's ``x86_64-efi`` image with the configuration embedded.

    :param config: the script from :func:`grub_config`.
    :param workdir: a scratch directory.
    :returns: the PE binary for ``EFI/BOOT/BOOTX64.EFI``.
    :raises DiskError: grub-mkimage failed.
    :raises ConfigurationError: grub-common or grub-efi-amd64-bin is missing.
    """
    return _mkimage(
        "x86_64-efi",
        GRUB_X86_64_EFI_DIR,
        EFI_MODULES,
        config,
        "/EFI/BOOT",
        workdir / "BOOTX64.EFI",
        workdir,
    )


def install_bios_boot(fd: int, core: bytes, core_offset: int, limit: int) -> bytes:
    """Place ``core.img`` and return the patched ``boot.img`` code for the MBR.

    Does what ``grub-bios-setup`` does for an embedded core: boot.img learns
    the sector where core.img starts, core.img's first sector learns where the
    rest of it lies (one contiguous run), and the BIOS drive number is taken
    from the BIOS.

    :param fd: the disk image, open for writing.
    :param core: the core image from :func:`build_bios_core`.
    :param core_offset: byte offset where core.img goes (sector aligned).
    :param limit: bytes available there (BIOS boot partition or MBR gap).
    :returns: the first 440 bytes of boot.img, patched, for the MBR.
    :raises DiskError: core.img does not fit.
    """
    if len(core) > limit:
        raise DiskError(f"GRUB core.img is {len(core)} bytes; only {limit} fit before the root")
    boot = bytearray((grub_platform_dir(GRUB_I386_PC_DIR) / "boot.img").read_bytes())
    if len(boot) != 512:
        raise DiskError(f"GRUB boot.img is {len(boot)} bytes, not 512")
    first_sector = core_offset // 512
    struct.pack_into("<Q", boot, _KERNEL_SECTOR_OFFSET, first_sector)
    boot[_BOOT_DRIVE_OFFSET] = 0xFF  # use the drive the BIOS booted from
    boot[_DRIVE_CHECK_OFFSET : _DRIVE_CHECK_OFFSET + 2] = b"\x90\x90"  # a hard disk, not a floppy
    patched = bytearray(core)
    _start, _count, segment = struct.unpack_from("<QHH", patched, _BLOCKLIST_OFFSET)
    if segment != 0x820:
        raise DiskError("GRUB core.img has an unexpected diskboot blocklist")
    rest = len(core) // 512 - 1
    struct.pack_into("<QHH", patched, _BLOCKLIST_OFFSET, first_sector + 1, rest, segment)
    os.pwrite(fd, bytes(patched), core_offset)
    return bytes(boot[:_BOOT_CODE_SIZE])


def make_esp(
    image: Path, *, size: int, efi_binary: bytes, volume_id: int, timestamp: int, workdir: Path
) -> None:
    """Make a FAT32 EFI system partition image holding ``EFI/BOOT/BOOTX64.EFI``.

    :param image: the file to create (replaced if it exists).
    :param size: its size in bytes, a multiple of 1 KiB (at least 33 MiB for FAT32).
    :param efi_binary: the GRUB EFI image.
    :param volume_id: the 32-bit FAT volume id.
    :param timestamp: the time stamped on directory entries.
    :param workdir: a scratch directory.
    :raises DiskError: mkfs.fat or mtools failed.
    :raises ConfigurationError: dosfstools or mtools is missing.
    """
    # an intermediate, copied into the disk: mkfs.fat's fsync would wait for
    # the journal, and so for whatever else the file system is writing back
    env = unsynced(tool_environment(timestamp))
    image.unlink(missing_ok=True)
    run(
        "mkfs.fat",
        [
            "-C",
            "--invariant",
            "-F",
            "32",
            "-S",
            "512",
            "-s",
            "1",
            "-i",
            f"{volume_id:08X}",
            "-n",
            "ESP",
            image,
            str(size // 1024),
        ],
        env=env,
    )
    binary = workdir / "BOOTX64.EFI.copy"
    binary.write_bytes(efi_binary)
    os.utime(binary, (timestamp, timestamp))
    run("mmd", ["-i", image, "::/EFI", "::/EFI/BOOT"], env=env)
    run("mcopy", ["-m", "-i", image, binary, "::/EFI/BOOT/BOOTX64.EFI"], env=env)
