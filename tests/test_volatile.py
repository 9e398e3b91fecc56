"""Volatile paths are left out, persistent ones kept and listed: with the
patterns of the dotCloud sample manifest, matched as the dotCloud tool did
(``re.match`` against the absolute path, so anchored at the start only)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from cloudlets.errors import UnsafeArchiveError
from cloudlets.manifest import Manifest
from cloudlets.rootfs import METADATA_PATH, EntryType, RootTree, image_metadata
from tests.test_rootfs import D, H, M, read

ROOTFS = [
    D("."), D("etc"), D("etc/rc6.d"), D("var"), D("var/log"), D("var/log/apt"), D("var/run"),
    D("var/lib/apt/lists/partial"), D("var/cache/apt/archives/partial"), D("tmp", mode=0o1777),
    D("sys"), D("proc"), D("dev"), D("usr/lib/python2.6"), D("var/cache/debconf"),
    M("etc/hostname", b"<%= args.hostname %>\n"),
    M("etc/rc6.d/S00vzreboot", b"x"), M("etc/rc6.d/S00vzreboot.orig", b"x"),
    M("etc/mtab", b"x"), M("etc/mtab.d", b"x"), M("etc/nologin", b"x"),
    M("var/log/syslog", b"x"), M("var/log/dmesg.0", b"x"), D("var/log/nginx"),
    M("var/log/nginx/access.log", b"x"), M("var/log/apt/term.log", b"x"),
    M("var/log/aptitude", b"x"),
    M("var/run/utmp", b"x"), D("var/run/sshd"),
    M("sys/kernel", b"x"), M("proc/1", b"x"),
    D("tmp/.X11-unix"), M("tmp/.X11-unix/X0", b"x"), M("var/tmp/scratch", b"x"),
    M("var/cache/apt/archives/lock", b"x"), M("var/cache/apt/archives/bash_4.0.deb", b"x"),
    M("var/cache/apt/archives/partial/x.deb", b"x"),
    M("var/cache/apt/pkgcache.bin", b"x"), M("var/cache/apt/srcpkgcache.bin", b"x"),
    M("var/cache/debconf/config.dat", b"x"),
    M("dev/log", type=tarfile.FIFOTYPE), M("dev/null", type=tarfile.CHRTYPE, devmajor=1,
                                          devminor=3),
    M("var/lib/urandom/random-seed", b"x"),
    M("usr/lib/python2.6/os.py", b"x"), M("usr/lib/python2.6/os.pyc", b"x"),
    M("usr/lib/python2.6/os.pyc.bak", b"x"),
    M("var/lib/apt/lists/lock", b"x"), M("var/lib/apt/lists/ftp.debian.org_Release", b"x"),
    M("var/lib/apt/lists/partial/half", b"x"),
    # a hardlink to a dropped file goes with it
    H("root-copy-of-utmp", "var/run/utmp"),
]

DROPPED = {
    "/etc/rc6.d/S00vzreboot", "/etc/mtab", "/etc/nologin",
    "/var/log/syslog", "/var/log/dmesg.0", "/var/log/nginx", "/var/log/nginx/access.log",
    "/var/log/apt/term.log", "/var/run/utmp", "/var/run/sshd", "/sys/kernel", "/proc/1",
    "/tmp/.X11-unix", "/tmp/.X11-unix/X0", "/var/tmp/scratch",
    "/var/cache/apt/archives/lock", "/var/cache/apt/archives/bash_4.0.deb",
    "/var/cache/apt/archives/partial/x.deb", "/var/cache/apt/pkgcache.bin",
    "/var/cache/apt/srcpkgcache.bin", "/var/cache/debconf/config.dat", "/dev/log",
    "/var/lib/urandom/random-seed", "/usr/lib/python2.6/os.pyc",
    "/usr/lib/python2.6/os.pyc.bak", "/var/lib/apt/lists/lock",
    "/var/lib/apt/lists/ftp.debian.org_Release", "/var/lib/apt/lists/partial/half",
    "/root-copy-of-utmp",
}

KEPT = {
    "/etc/hostname", "/etc/rc6.d/S00vzreboot.orig", "/etc/mtab.d", "/var/log",
    "/var/log/apt", "/var/run", "/tmp", "/sys", "/proc", "/dev", "/dev/null",
    "/usr/lib/python2.6/os.py", "/var/lib/apt/lists/partial", "/var/cache/apt/archives/partial",
    "/var/cache/debconf",
    # '/var/log/(?!apt).+' refuses any name starting with "apt", as the dotCloud tool did
    "/var/log/aptitude",
}


@pytest.fixture
def sample(dotcloud_manifest_path: Path) -> Manifest:
    return Manifest.load(dotcloud_manifest_path)


@pytest.fixture
def tree(sample: Manifest) -> RootTree:
    return read(ROOTFS, volatile=sample.volatile, persistent=sample.persistent)


def test_sample_patterns_drop_exactly_the_volatile_paths(tree: RootTree) -> None:
    with tree:
        present = {entry.path for entry in tree}
        assert set(tree.dropped) == DROPPED
        assert not present & DROPPED
        assert present >= KEPT


def test_directories_whose_contents_are_volatile_stay(tree: RootTree) -> None:
    # ".+" needs at least one character after the slash: the directory itself stays
    with tree:
        for path in ("/tmp", "/var/run", "/var/log", "/var/log/apt", "/proc", "/sys"):
            assert tree[path].type is EntryType.DIR, path
        assert tree["/tmp"].mode == 0o1777


def test_dropped_directory_takes_its_subtree() -> None:
    # "/opt/cache$" matches the directory only; its children go with it
    with read([D("opt/cache"), M("opt/cache/a/b", b"x"), M("opt/cachet", b"y")],
              volatile=["/opt/cache$"]) as tree:
        assert "/opt/cache" not in tree and "/opt/cache/a/b" not in tree
        assert "/opt/cachet" in tree
        assert tree.dropped == ["/opt/cache", "/opt/cache/a/b"]


def test_patterns_are_anchored_at_the_start_only() -> None:
    with read([M("srv/tmp/x", b""), M("tmp/x", b"")], volatile=["/tmp/.+"]) as tree:
        assert "/srv/tmp/x" in tree and "/tmp/x" not in tree


def test_persistent_paths_are_kept_even_when_volatile_matches() -> None:
    with read([D("var/lib/db"), M("var/lib/db/data", b"x")], volatile=["/var/lib/.+"],
              persistent=["/var/lib/db"]) as tree:
        assert tree["/var/lib/db"].type is EntryType.DIR
        assert "/var/lib/db/data" not in tree  # its contents are still volatile
        assert tree.persistent == ["/var/lib/db"]


def test_persistent_list_reaches_the_image_metadata(sample: Manifest, tree: RootTree,
                                                    tmp_path: Path) -> None:
    with tree:
        assert tree.persistent == ["/var/log"]
        tree.add_file(METADATA_PATH, image_metadata(
            name=sample.name, version=sample.version, digest=sample.digest,
            persistent=tree.persistent))
        out = tree.write_tar(tmp_path / "tree.tar")
    with tarfile.open(out) as archive:
        names = set(archive.getnames())
        handle = archive.extractfile("./etc/cloudlets/image.json")
        assert handle is not None
        metadata = json.load(handle)
    assert metadata == {"name": "debian-5.0", "version": None, "digest": sample.digest,
                        "persistent": ["/var/log"]}
    assert "./var/log" in names and "./var/log/syslog" not in names


def test_template_listed_in_the_sample_survives_the_volatile_patterns(tree: RootTree,
                                                                      sample: Manifest) -> None:
    with tree:
        for path in sample.templates:
            assert tree[path].is_regular


def test_relative_persistent_path_is_refused() -> None:
    with pytest.raises(UnsafeArchiveError, match="not absolute"):
        read([D("var")], persistent=["var/log"])


def test_volatile_directory_after_its_children_drops_them_too() -> None:
    with read([M("cache/a/b", b"x"), M("cache/c", b"y"), M("cached", b"z"), D("cache")],
              volatile=["/cache$"]) as tree:
        assert {e.path for e in tree} == {"/", "/cached"}
        assert sorted(tree.dropped) == ["/cache", "/cache/a/b", "/cache/c"]
