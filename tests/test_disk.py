"""The disk stage against real tools: mke2fs, debugfs, sfdisk, mtools, grub-mkimage.

Every check reads the result back with a tool other than the one that wrote
it (debugfs for the ext4, sfdisk for the partition table, mtools for the ESP).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import stat
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from cloudlets.disk import BootSpec, DiskImage, build_disk, derive_uuid, ext4, tools
from cloudlets.disk.partition import BIOS_BOOT_GUID, ESP_GUID, LINUX_ROOT_X86_64_GUID
from cloudlets.errors import ConfigurationError, DiskError
from cloudlets.rootfs import TreeStream, read_tarball
from tests.conftest import RefuseSeekData

EPOCH = 1_600_000_000
SEED = "unit-seed"
MiB = 1024 * 1024
CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep
LONG_TARGET = "/usr/lib/" + "x" * 80 + "/target"
KERNEL = b"not really a kernel\n" * 100


@dataclass(frozen=True)
class Member:
    """One member of a synthetic tree, with what must come back out of the ext4."""

    name: str
    kind: bytes
    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = EPOCH - 1000
    data: bytes | None = None
    linkname: str = ""
    device: tuple[int, int] | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()


TREE = [
    Member("bin", tarfile.DIRTYPE, 0o755),
    Member("bin/busybox", tarfile.REGTYPE, 0o755, data=b"#!/bin/false\n", mtime=EPOCH - 5),
    Member("bin/sh", tarfile.SYMTYPE, 0o777, linkname="/bin/busybox"),
    Member("bin/relative", tarfile.SYMTYPE, 0o777, linkname="busybox"),
    Member("bin/long", tarfile.SYMTYPE, 0o777, linkname=LONG_TARGET),
    Member("bin/su", tarfile.REGTYPE, 0o4755, data=b"su" * 3000, mtime=EPOCH - 7),
    Member("bin/su-again", tarfile.LNKTYPE, 0o4755, linkname="bin/su", mtime=EPOCH - 7),
    Member(
        "bin/ping",
        tarfile.REGTYPE,
        0o755,
        data=b"ping",
        xattrs=(("security.capability", CAPABILITY),),
    ),
    Member(
        "bin/tagged",
        tarfile.REGTYPE,
        0o644,
        data=b"",
        xattrs=(("user.origin", b"cloudlets"), ("trusted.blob", bytes(range(256)))),
    ),
    Member("boot", tarfile.DIRTYPE, 0o755),
    Member("boot/vmlinuz", tarfile.REGTYPE, 0o644, data=KERNEL),
    Member("dev", tarfile.DIRTYPE, 0o755),
    Member("dev/null", tarfile.CHRTYPE, 0o666, device=(1, 3)),
    Member("dev/vda", tarfile.BLKTYPE, 0o660, gid=6, device=(254, 0)),
    Member("dev/initctl", tarfile.FIFOTYPE, 0o600),
    Member("etc", tarfile.DIRTYPE, 0o755),
    Member("etc/hostname", tarfile.REGTYPE, 0o644, data=b"placeholder\n"),
    Member("etc/shadow", tarfile.REGTYPE, 0o640, gid=42, data=b"root:*:1::::::\n"),
    Member("home", tarfile.DIRTYPE, 0o755),
    Member("home/alice", tarfile.DIRTYPE, 0o2750, uid=1000, gid=1000),
    Member("home/alice/notes", tarfile.REGTYPE, 0o600, uid=1000, gid=1000, data=b"hi\n"),
    Member("tmp", tarfile.DIRTYPE, 0o1777, mtime=EPOCH - 99),
    Member("usr", tarfile.DIRTYPE, 0o755),
    Member("usr/caf\u00e9", tarfile.REGTYPE, 0o644, data=b"UTF-8 name\n"),
    Member(b"usr/caf\xe9-latin1".decode("utf-8", "surrogateescape"), tarfile.REGTYPE, 0o644,
           data=b"not UTF-8\n"),
]


def write_tree(path: Path, members: list[Member]) -> Path:
    """Write members as a normalized PAX tar, the way the rootfs stage hands trees over."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for member in members:
            info = tarfile.TarInfo(member.name)
            info.type = member.kind
            info.mode = member.mode
            info.uid, info.gid = member.uid, member.gid
            info.mtime = member.mtime
            info.linkname = member.linkname
            if member.device:
                info.devmajor, info.devminor = member.device
            info.pax_headers = {
                f"SCHILY.xattr.{name}": value.decode("utf-8", "surrogateescape")
                for name, value in member.xattrs
            }
            data = None
            if member.data is not None:
                info.size = len(member.data)
                data = io.BytesIO(member.data)
            archive.addfile(info, data)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "tree.tar", TREE)


def debugfs(image: str | Path, request: str) -> str:
    proc = subprocess.run(
        [tools.find_tool("debugfs"), "-R", request, str(image)],
        capture_output=True,
        check=True,
    )
    return proc.stdout.decode("utf-8", "surrogateescape")


def inode(image: str | Path, path: str) -> dict[str, object]:
    """An inode's attributes as ``debugfs stat`` prints them."""
    text = debugfs(image, f'stat "{path}"')
    fields: dict[str, object] = {}
    kind = re.search(r"Type: (\w+(?: special)?)", text)
    assert kind, f"{path} not found in {image}:\n{text}"
    fields["type"] = kind.group(1)
    fields["mode"] = int(re.search(r"Mode:\s+(0[0-7]*)", text).group(1), 8)  # type: ignore[union-attr]
    fields["uid"] = int(re.search(r"User:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    fields["gid"] = int(re.search(r"Group:\s+(\d+)", text).group(1))  # type: ignore[union-attr]
    fields["links"] = int(re.search(r"Links: (\d+)", text).group(1))  # type: ignore[union-attr]
    fields["inode"] = int(re.search(r"Inode: (\d+)", text).group(1))  # type: ignore[union-attr]
    fields["mtime"] = int(re.search(r" mtime: 0x([0-9a-f]+)", text).group(1), 16)  # type: ignore[union-attr]
    device = re.search(r"Device major/minor number: (\d+):(\d+)", text)
    fields["device"] = (int(device.group(1)), int(device.group(2))) if device else None
    fast = re.search(r'Fast link dest: "(.*)"', text)
    fields["fast_link"] = fast.group(1) if fast else None
    return fields


def xattr(image: str | Path, path: str, name: str) -> bytes:
    text = debugfs(image, f'ea_get -x "{path}" {name}')
    return bytes.fromhex("".join(re.findall(r"\b[0-9a-f]{2}\b", text.split("=", 1)[-1])))


def make_root(tree: Path, tmp_path: Path, method: str) -> Path:
    image = tmp_path / f"root-{method}.ext4"
    if method == "stream":  # the cold render's path: mke2fs reads while the tree is read
        mkfs = ext4.Ext4Stream(image, size=64 * 1024 * 1024, uuid=derive_uuid(SEED, "fs"),
                               hash_seed=derive_uuid(SEED, "hash"), label="unit-root",
                               timestamp=EPOCH, workdir=tmp_path / "work-stream")
        sink = TreeStream(mkfs.fd)
        with read_tarball(tree, sink=sink) as model:
            assert sink.close(model) is None
            mkfs.finish([ext4.TreeEntry(e.path, e.mode, e.uid, e.gid, e.mtime,
                                        xattrs=e.xattrs) for e in model if e.xattrs])
        return image
    ext4.make_ext4(
        tree,
        image,
        size=64 * 1024 * 1024,
        uuid=derive_uuid(SEED, "fs"),
        hash_seed=derive_uuid(SEED, "hash"),
        label="unit-root",
        timestamp=EPOCH,
        workdir=tmp_path / f"work-{method}",
        method=method,
    )
    return image


METHODS = ["tar", "directory", "stream"]


@pytest.fixture(params=METHODS)
def root_image(request: pytest.FixtureRequest, tree: Path, tmp_path: Path) -> Path:
    if request.param in ("tar", "stream") and ext4.populate_method() != "tar":
        pytest.skip("mke2fs < 1.47.1 cannot read tarballs (install e2fsprogs from backports)")
    return make_root(tree, tmp_path, request.param)


_TYPES = {
    tarfile.DIRTYPE: ("directory", stat.S_IFDIR),
    tarfile.REGTYPE: ("regular", stat.S_IFREG),
    tarfile.LNKTYPE: ("regular", stat.S_IFREG),
    tarfile.SYMTYPE: ("symlink", stat.S_IFLNK),
    tarfile.CHRTYPE: ("character special", stat.S_IFCHR),
    tarfile.BLKTYPE: ("block special", stat.S_IFBLK),
    tarfile.FIFOTYPE: ("FIFO", stat.S_IFIFO),
}


@pytest.mark.parametrize("member", TREE, ids=[m.name for m in TREE])
def test_every_member_keeps_type_owner_mode_and_mtime(root_image: Path, member: Member) -> None:
    found = inode(root_image, "/" + member.name)
    kind, _ = _TYPES[member.kind]
    assert found["type"] == kind
    assert found["mode"] == member.mode
    assert (found["uid"], found["gid"]) == (member.uid, member.gid)
    assert found["mtime"] == member.mtime
    assert found["device"] == member.device


def test_file_contents(root_image: Path) -> None:
    for member in TREE:
        if member.kind == tarfile.REGTYPE:
            assert (
                debugfs(root_image, f'cat "/{member.name}"').encode("utf-8", "surrogateescape")
                == member.data
            ), member.name


def test_hardlinks_share_an_inode(root_image: Path) -> None:
    su, again = inode(root_image, "/bin/su"), inode(root_image, "/bin/su-again")
    assert su["inode"] == again["inode"]
    assert su["links"] == 2


def test_symlinks_absolute_relative_and_long(root_image: Path) -> None:
    assert inode(root_image, "/bin/sh")["fast_link"] == "/bin/busybox"
    assert inode(root_image, "/bin/relative")["fast_link"] == "busybox"
    assert inode(root_image, "/bin/long")["fast_link"] is None  # stored in a block
    assert debugfs(root_image, 'cat "/bin/long"') == LONG_TARGET


def test_capability_and_other_xattrs(root_image: Path) -> None:
    assert xattr(root_image, "/bin/ping", "security.capability") == CAPABILITY
    assert xattr(root_image, "/bin/tagged", "user.origin") == b"cloudlets"
    assert xattr(root_image, "/bin/tagged", "trusted.blob") == bytes(range(256))


def test_superblock_is_pinned(root_image: Path) -> None:
    header = subprocess.run(
        [tools.find_tool("dumpe2fs"), "-h", str(root_image)], capture_output=True, text=True
    ).stdout
    assert f"Filesystem UUID:          {derive_uuid(SEED, 'fs')}" in header
    assert f"Directory Hash Seed:      {derive_uuid(SEED, 'hash')}" in header
    assert "Filesystem volume name:   unit-root" in header
    assert "Filesystem created:       Sun Sep 13 12:26:40 2020" in header  # EPOCH


def test_ext4_is_reproducible(tree: Path, tmp_path: Path) -> None:
    first = make_root(tree, tmp_path / "a", ext4.populate_method())
    second = make_root(tree, tmp_path / "b", ext4.populate_method())
    assert first.read_bytes() == second.read_bytes()
    assert first.stat().st_blocks * 512 < first.stat().st_size // 4  # sparse


def test_child_before_parent_is_refused(tmp_path: Path) -> None:
    bad = write_tree(tmp_path / "bad.tar", [TREE[1], TREE[0]])
    with pytest.raises(DiskError, match=r"'bin/busybox' comes before its parent"):
        ext4.scan_tree(bad)


# --- whole disks ----------------------------------------------------------------


def build(tree: Path, tmp_path: Path, name: str = "disk", **options: object) -> DiskImage:
    patch = options.pop("patch_files", None)
    cache = options.pop("base_cache", None)
    sync = bool(options.pop("sync", True))
    boot = BootSpec(kernel="/boot/vmlinuz", cmdline="console=ttyS0", **options)  # type: ignore[arg-type]
    return build_disk(
        tree,
        boot,
        tmp_path / f"{name}.raw",
        seed=SEED,
        workdir=tmp_path / f"work-{name}",
        source_date_epoch=EPOCH,
        patch_files=patch,  # type: ignore[arg-type]
        base_cache=cache,  # type: ignore[arg-type]
        sync=sync,
    )


def sfdisk_json(image: Path) -> dict[str, object]:
    proc = subprocess.run(
        [tools.find_tool("sfdisk"), "--json", str(image)], capture_output=True, text=True
    )
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    return json.loads(proc.stdout)["partitiontable"]  # type: ignore[no-any-return]


LAYOUTS = [
    ("bios", "gpt", [BIOS_BOOT_GUID, LINUX_ROOT_X86_64_GUID]),
    ("uefi", "gpt", [ESP_GUID, LINUX_ROOT_X86_64_GUID]),
    ("both", "gpt", [BIOS_BOOT_GUID, ESP_GUID, LINUX_ROOT_X86_64_GUID]),
    ("bios", "mbr", ["83"]),
    ("uefi", "mbr", ["ef", "83"]),
    ("both", "mbr", ["ef", "83"]),
]


@pytest.mark.parametrize(("firmware", "table", "types"), LAYOUTS)
def test_partition_table(
    tree: Path, tmp_path: Path, firmware: str, table: str, types: list[str]
) -> None:
    image = build(tree, tmp_path, firmware=firmware, partition_table=table)
    found = sfdisk_json(image.path)
    assert found["label"] == ("gpt" if table == "gpt" else "dos")
    parts = found["partitions"]
    assert isinstance(parts, list)
    assert [p["type"].lower() for p in parts] == types
    for part, expected in zip(parts, image.partitions, strict=True):
        assert part["start"] * 512 == expected.start
        assert part["size"] * 512 == expected.size
        assert part["start"] % 2048 == 0  # 1 MiB aligned
        if table == "gpt":
            assert part["uuid"].lower() == expected.guid
            assert part["name"] == expected.name
    if table == "gpt":
        assert str(found["id"]).lower() == image.disk_guid
        assert found["lastlba"] == image.size // 512 - 34
    else:
        assert int(str(found["id"]), 16) == image.disk_signature
    assert image.path.stat().st_size == image.size
    assert image.path.stat().st_blocks * 512 < image.size // 2  # sparse


def test_root_filesystem_inside_the_disk(tree: Path, tmp_path: Path) -> None:
    image = build(tree, tmp_path, firmware="both")
    inside = f"{image.path}?offset={image.root.start}"
    assert inode(inside, "/bin/su")["mode"] == 0o4755
    assert debugfs(inside, "stats").count(f"Filesystem UUID:          {image.root_uuid}") == 1
    assert image.root.size == image.partitions[image.root_partition].size


def test_bios_boot_code_points_at_core(tree: Path, tmp_path: Path) -> None:
    image = build(tree, tmp_path, firmware="bios")
    with open(image.path, "rb") as handle:
        mbr = handle.read(512)
        bios_boot = image.partitions[0]
        handle.seek(bios_boot.start)
        core = handle.read(512)
    assert mbr[510:] == b"\x55\xaa"
    assert int.from_bytes(mbr[0x5C:0x64], "little") == bios_boot.first_lba
    assert int.from_bytes(core[500:508], "little") == bios_boot.first_lba + 1
    assert mbr[:2] != b"\0\0"  # boot.img code, not an empty MBR


def test_esp_holds_grub_with_the_boot_config(tree: Path, tmp_path: Path) -> None:
    image = build(tree, tmp_path, firmware="uefi")
    esp = image.partitions[0]
    where = f"{image.path}@@{esp.start}"
    env = {"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"}
    listing = subprocess.run(
        ["mdir", "-i", where, "::/EFI/BOOT"], capture_output=True, text=True, env=env
    )
    assert "BOOTX64  EFI" in listing.stdout, listing.stderr
    volume = int.from_bytes(hashlib.sha256(f"{SEED}\0esp".encode()).digest()[:4], "little")
    serial = f"{volume >> 16:04X}-{volume & 0xFFFF:04X}"
    assert f"Volume Serial Number is {serial}" in listing.stdout
    binary = subprocess.run(
        ["mtype", "-i", where, "::/EFI/BOOT/BOOTX64.EFI"], capture_output=True, env=env
    ).stdout
    assert binary[:2] == b"MZ"
    assert f"search --no-floppy --fs-uuid --set=root {image.root_uuid}".encode() in binary
    assert f"root=UUID={image.root_uuid} console=ttyS0".encode() in binary


def test_cmdline_with_root_is_left_alone(tree: Path, tmp_path: Path) -> None:
    image = build_disk(
        tree,
        BootSpec(kernel="/boot/vmlinuz", cmdline="root=LABEL=unit ro", firmware="uefi"),
        tmp_path / "disk.raw",
        seed=SEED,
        workdir=tmp_path / "work",
        source_date_epoch=EPOCH,
    )
    binary = subprocess.run(
        ["mtype", "-i", f"{image.path}@@{image.partitions[0].start}", "::/EFI/BOOT/BOOTX64.EFI"],
        capture_output=True,
        env={"MTOOLS_SKIP_CHECK": "1", "PATH": "/usr/bin:/bin"},
    ).stdout
    assert b"linux /boot/vmlinuz root=LABEL=unit ro" in binary
    assert b"root=UUID=" not in binary


@pytest.mark.parametrize(("cmdline", "console", "expected"), [
    ("console=ttyS0", None, ["root=UUID=u", "console=ttyS0"]),
    ("root=/dev/xvda1 ro", None, ["root=/dev/xvda1", "ro"]),
    ("console=hvc0 quiet 'a b'", "hvc0", ["root=UUID=u", "quiet", "a b", "console=hvc0"]),
    ("console=ttyS0", "hvc0", ["root=UUID=u", "console=ttyS0", "console=hvc0"]),
])
def test_the_kernel_command_line_is_built_in_one_place(cmdline: str, console: str | None,
                                                       expected: list[str]) -> None:
    """The GRUB images and Xen's pygrub configuration both take it from here."""
    from cloudlets.disk.bootloader import kernel_cmdline
    from cloudlets.drivers.formats.xen import pygrub_config

    assert kernel_cmdline(cmdline, "u", console=console) == expected
    if console is not None and "a b" not in expected:
        assert f"linux /k {' '.join(expected)}\n" in pygrub_config(
            title="t", kernel="/k", initrd=None, cmdline=cmdline, root_uuid="u")
    with pytest.raises(DiskError, match="cannot parse kernel command line"):
        kernel_cmdline("init='/bin/sh", "u")


def test_patch_keeps_mode_and_owner_and_adds_files(tree: Path, tmp_path: Path) -> None:
    image = build(
        tree,
        tmp_path,
        patch_files={
            "/etc/shadow": b"root:$6$x:1::::::\n",
            "/home/alice/notes": b"rendered\n",
            "/etc/motd": b"hello\n",
        },
    )
    inside = f"{image.path}?offset={image.root.start}"
    shadow = inode(inside, "/etc/shadow")
    assert (shadow["mode"], shadow["uid"], shadow["gid"]) == (0o640, 0, 42)
    assert debugfs(inside, "cat /etc/shadow") == "root:$6$x:1::::::\n"
    notes = inode(inside, "/home/alice/notes")
    assert (notes["mode"], notes["uid"], notes["gid"]) == (0o600, 1000, 1000)
    assert notes["mtime"] == EPOCH
    assert debugfs(inside, "cat /home/alice/notes") == "rendered\n"
    motd = inode(inside, "/etc/motd")
    assert (motd["mode"], motd["uid"], motd["gid"]) == (0o644, 0, 0)
    fsck = subprocess.run(
        [tools.find_tool("e2fsck"), "-fn", inside], capture_output=True, text=True
    )
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr


def test_patch_on_cached_base_leaves_the_cache_alone(tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = build(tree, tmp_path, "first", base_cache=cache)
    (cached,) = cache.glob("*.ext4")
    before = hashlib.sha256(cached.read_bytes()).hexdigest()
    second = build(
        tree, tmp_path, "second", base_cache=cache, patch_files={"/etc/hostname": b"db-7\n"}
    )
    assert (first.base_cached, second.base_cached) == (False, True)
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == before
    inside = f"{second.path}?offset={second.root.start}"
    assert debugfs(inside, "cat /etc/hostname") == "db-7\n"
    cold = build(tree, tmp_path, "cold", patch_files={"/etc/hostname": b"db-7\n"})
    assert second.path.read_bytes() == cold.path.read_bytes()


def test_patched_ranges_are_every_block_the_patch_changed_and_no_other(
        tree: Path, tmp_path: Path) -> None:
    """The ranges ``patched_ranges`` returns are, block by block, those whose
    bytes differ from the base's metadata image or were holes in it (the
    patched copy compared a run at a time must say the same), and the base
    with those ranges laid over it is the base patched whole."""
    import os

    from cloudlets.sparse import data_ranges

    base = make_root(tree, tmp_path, "directory")
    metadata = tmp_path / "base.metadata"
    ext4.metadata_image(base, metadata)
    files = {"/etc/hostname": b"db-7\n", "/etc/motd": b"m" * (3 * 1024 * 1024 + 5),
             "/home/alice/notes": b"rendered\n"}  # motd: new blocks over 3 compare runs
    patched, ranges = ext4.patched_ranges(metadata, files, timestamp=EPOCH,
                                          workdir=tmp_path / "patch")
    block = ext4.BLOCK_SIZE
    old, new = metadata.read_bytes(), patched.read_bytes()
    with open(metadata, "rb") as handle:
        known = data_ranges(handle.fileno())
    expected: list[tuple[int, int]] = []
    with open(patched, "rb") as handle:
        for start, end in data_ranges(handle.fileno()):
            for offset in range(start - start % block, end, block):
                hole = not any(a <= offset < b for a, b in known)
                if hole or old[offset:offset + block] != new[offset:offset + block]:
                    if expected and expected[-1][1] == offset:
                        expected[-1] = (expected[-1][0], offset + block)
                    else:
                        expected.append((offset, offset + block))
    assert ranges == expected
    assert sum(end - start for start, end in ranges) > 3 * 1024 * 1024
    whole = tmp_path / "whole.raw"
    shutil.copyfile(base, whole)
    ext4.patch_ext4(str(whole), files, timestamp=EPOCH, workdir=tmp_path / "whole")
    laid = bytearray(base.read_bytes())
    for start, end in ranges:
        laid[start:end] = new[start:end]
    assert hashlib.sha256(laid).digest() == hashlib.sha256(whole.read_bytes()).digest()
    assert os.path.getsize(whole) == len(laid)


def _fsync_calls(argv: list[str], env: dict[str, str]) -> int:
    """How many fsync/fdatasync system calls a command makes (strace)."""
    log = Path(env["TMP_TRACE"])
    subprocess.run(["strace", "-f", "-qq", "-e", "trace=fsync,fdatasync", "-o", str(log),
                    *argv], env=env, check=True, capture_output=True, timeout=60)
    return sum(1 for line in log.read_text().splitlines() if "sync(" in line)


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed "
                    "(scripts/dev installs it)")
def test_an_intermediate_image_is_patched_without_flushing_it(tree: Path,
                                                               tmp_path: Path) -> None:
    import os

    if tools._eatmydata() is None:
        pytest.fail("libeatmydata is not installed (apt-get install eatmydata; scripts/dev "
                    "installs it)")
    image = build(tree, tmp_path, "flushed")
    inside = f"{image.path}?offset={image.root.start}"
    argv = [tools.find_tool("debugfs"), "-R", "stat /etc/hostname", inside]
    env = {**os.environ, "TMP_TRACE": str(tmp_path / "trace")}
    assert _fsync_calls(argv, env) >= 1  # debugfs flushes what it opened, even read-only
    assert _fsync_calls(argv, tools.unsynced(env)) == 0

    # and the image is the same either way
    files = {"/etc/hostname": b"db-7\n", "/etc/motd": b"hello\n"}
    synced = build(tree, tmp_path, "synced", patch_files=files)
    unsynced = build(tree, tmp_path, "unsynced", patch_files=files, sync=False)
    assert synced.path.read_bytes() == unsynced.path.read_bytes()


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed "
                    "(scripts/dev installs it)")
def test_reading_a_template_and_making_the_esp_flush_nothing(tree: Path,
                                                             tmp_path: Path) -> None:
    """A template's source read from the base and the ESP made for the disk
    ask for no flush: on a re-render, an fsync would wait for the journal,
    and so for the writeback of the image's prefix being copied meanwhile."""
    import os

    if tools._eatmydata() is None:
        pytest.fail("libeatmydata is not installed (apt-get install eatmydata; scripts/dev "
                    "installs it)")
    image = build(tree, tmp_path, "base")
    inside = f"{image.path}?offset={image.root.start}"
    size = len(b"placeholder\n")
    script = (
        "import sys; from pathlib import Path\n"
        "from cloudlets.disk import bootloader, ext4\n"
        f"assert ext4.read_file({inside!r}, '/etc/hostname', {size}) == b'placeholder\\n'\n"
        f"work = Path({str(tmp_path / 'esp')!r}); work.mkdir()\n"
        "bootloader.make_esp(work / 'esp.img', size=64 * 1024 * 1024, efi_binary=b'MZ' * 512,"
        " volume_id=0x1234ABCD, timestamp=1_700_000_000, workdir=work)\n")
    env = {**os.environ, "TMP_TRACE": str(tmp_path / "trace")}
    assert _fsync_calls([sys.executable, "-c", script], env) == 0
    assert (tmp_path / "esp" / "esp.img").stat().st_size == 64 * 1024 * 1024


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"/nowhere/file": b"x"}, r"/nowhere is not a directory"),
        ({"/etc": b"x"}, r"cannot patch /etc: it is a directory"),
        ({"/bin/sh": b"x"}, r"cannot patch /bin/sh: it is a symlink"),
    ],
)
def test_patch_errors(tree: Path, tmp_path: Path, patch: dict[str, bytes], message: str) -> None:
    with pytest.raises(DiskError, match=message):
        build(tree, tmp_path, patch_files=patch)
    assert not (tmp_path / "disk.raw").exists()


def test_a_file_system_without_seek_data_gives_the_same_disk(
        tree: Path, tmp_path: Path, refuse_seek_data: RefuseSeekData) -> None:
    """The ESP and the cached base are copied in: where SEEK_DATA is refused
    the copy was all zeros (the error read as "only holes remain")."""
    cache = tmp_path / "cache"
    first = build(tree, tmp_path, "first", firmware="both", base_cache=cache)
    refuse_seek_data()
    again = build(tree, tmp_path, "again", firmware="both", base_cache=cache)
    assert again.base_cached
    assert again.path.read_bytes() == first.path.read_bytes()


def test_sizes(tree: Path, tmp_path: Path) -> None:
    auto = build(tree, tmp_path, "auto", firmware="bios")
    assert auto.root.size == ext4.root_size_for(ext4.scan_tree(tree))
    fixed = build(tree, tmp_path, "fixed", firmware="bios", root_size=100 * 1024 * 1024)
    assert fixed.root.size == 100 * 1024 * 1024
    assert fixed.size == 1024 * 1024 * (1 + 1 + 100 + 1)


@pytest.mark.parametrize("table", ["gpt", "mbr"])
def test_disk_size_is_the_whole_image(tree: Path, tmp_path: Path, table: str) -> None:
    """boot.disk_size was parsed and documented, and dropped."""
    image = build(tree, tmp_path, table, firmware="bios", partition_table=table,
                  root_size=100 * MiB, disk_size=300 * MiB)
    assert image.size == image.path.stat().st_size == 300 * MiB
    assert image.root.size == 100 * MiB  # the rest is free, for the guest to grow into
    found = sfdisk_json(image.path)
    if table == "gpt":
        assert found["lastlba"] == 300 * MiB // 512 - 34  # the backup table at the end
    [root] = [p for p in found["partitions"] if p["size"] * 512 == 100 * MiB]  # type: ignore[attr-defined]
    assert root["start"] * 512 == image.root.start


def test_a_disk_size_too_small_for_the_partitions_is_named(tree: Path,
                                                          tmp_path: Path) -> None:
    with pytest.raises(DiskError, match=r"boot.disk_size 100 MiB is too small for the "
                                        r"partitions: they need 103 MiB"):
        build(tree, tmp_path, firmware="bios", root_size=100 * MiB, disk_size=100 * MiB)
    with pytest.raises(DiskError, match=r"boot\.disk_size 1000 must be a positive multiple"):
        build(tree, tmp_path, firmware="bios", disk_size=1000)
    assert not (tmp_path / "disk.raw").exists()


def test_tree_too_big_for_root_size(tmp_path: Path) -> None:
    big = [
        *TREE,
        Member("big", tarfile.DIRTYPE, 0o755),
        *(
            Member(f"big/{i}", tarfile.REGTYPE, 0o644, data=bytes([i]) * 1024 * 1024)
            for i in range(1, 40)
        ),
    ]
    tree = write_tree(tmp_path / "big.tar", big)
    with pytest.raises(
        DiskError,
        match=r"(?s)mke2fs failed with exit code \d+: .*does not fit; raise boot.root_size",
    ):
        build(tree, tmp_path, root_size=32 * 1024 * 1024)


def test_missing_kernel_is_named(tree: Path, tmp_path: Path) -> None:
    with pytest.raises(DiskError, match=r"boot.initrd /boot/initrd.img is not in the tree"):
        build_disk(
            tree,
            BootSpec(kernel="/boot/vmlinuz", initrd="/boot/initrd.img"),
            tmp_path / "d.raw",
            seed=SEED,
            workdir=tmp_path / "w",
        )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"firmware": "coreboot"}, "boot.firmware"),
        ({"partition_table": "apm"}, "boot.partition_table"),
        ({"fstype": "xfs"}, "boot.fstype"),
        ({"label": "x" * 17}, "boot.label"),
    ],
)
def test_bad_boot_spec(tree: Path, tmp_path: Path, options: dict[str, str], message: str) -> None:
    with pytest.raises(DiskError, match=message):
        build(tree, tmp_path, **options)


def test_failing_tool_reports_name_code_and_stderr(tmp_path: Path) -> None:
    with pytest.raises(DiskError, match=r"(?s)mke2fs failed with exit code 1: .*nosuchfs"):
        tools.run("mke2fs", ["-q", "-t", "nosuchfs", tmp_path / "x.img", "1M"])


def test_missing_tool_names_the_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(tools, "_SBIN_DIRS", ())
    tools.find_tool.cache_clear()
    try:
        with pytest.raises(ConfigurationError, match="apt-get install mtools"):
            tools.find_tool("mcopy")
    finally:
        tools.find_tool.cache_clear()


def test_source_date_epoch_from_environment(
    tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1234567890")
    image = build_disk(
        tree,
        BootSpec(kernel="/boot/vmlinuz", firmware="bios"),
        tmp_path / "d.raw",
        seed=SEED,
        workdir=tmp_path / "w",
        patch_files={"/etc/hostname": b"x\n"},
    )
    assert image.source_date_epoch == 1234567890
    inside = f"{image.path}?offset={image.root.start}"
    assert inode(inside, "/etc/hostname")["mtime"] == 1234567890
    assert inode(inside, "/bin/busybox")["mtime"] == EPOCH - 5  # the tree's own mtimes stay


def test_whole_disk_is_reproducible(tree: Path, tmp_path: Path) -> None:
    digests: Callable[[DiskImage], str] = lambda image: hashlib.sha256(  # noqa: E731
        image.path.read_bytes()
    ).hexdigest()
    one = build(tree, tmp_path / "1", firmware="both", patch_files={"/etc/hostname": b"a\n"})
    two = build(tree, tmp_path / "2", firmware="both", patch_files={"/etc/hostname": b"a\n"})
    assert digests(one) == digests(two)


def test_grub_images_are_cached_beside_their_base(tree: Path, tmp_path: Path) -> None:
    """A re-render takes GRUB's images from the cache: the same bytes as
    grub-mkimage makes, one file per platform and config, and a changed
    command line makes new ones."""
    cache = tmp_path / "cache"
    first = build(tree, tmp_path, "first", firmware="both", base_cache=cache)
    images = sorted(cache.glob("*.grub-*.img"))
    assert [p.name.split(".grub-")[1].split("-")[0] for p in images] == ["i386", "x86_64"]
    (key,) = {p.name.split(".grub-")[0] for p in images}
    assert (cache / f"{key}.ext4").is_file()  # named after the base: evicted with it
    stamps = [p.stat().st_mtime_ns for p in images]
    again = build(tree, tmp_path, "again", firmware="both", base_cache=cache)
    assert again.base_cached and [p.stat().st_mtime_ns for p in images] == stamps
    uncached = build(tree, tmp_path, "uncached", firmware="both")
    assert again.path.read_bytes() == first.path.read_bytes() == uncached.path.read_bytes()
    # a cached image that is not what grub-mkimage makes would show: the
    # cache is keyed by the config, and another command line misses it
    build_disk(tree, BootSpec(kernel="/boot/vmlinuz", cmdline="quiet", firmware="both"),
               tmp_path / "other.raw", seed=SEED, workdir=tmp_path / "work-other",
               source_date_epoch=EPOCH, base_cache=cache)
    assert len(list(cache.glob("*.grub-*.img"))) == 4
