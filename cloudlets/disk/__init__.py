"""The disk stage: a rendered root filesystem tarball in, a bootable raw disk out.

Everything runs as an ordinary user: no root, loop devices, mounts, user
namespaces or KVM. See ``docs/disk.rst`` for the design.

>>> from cloudlets.disk import BootSpec, build_disk
>>> image = build_disk(  # doctest: +SKIP
...     Path("tree.tar"),
...     BootSpec(kernel="/boot/vmlinuz", initrd="/boot/initrd.img",
...              cmdline="console=ttyS0", firmware="both"),
...     Path("out/disk.raw"),
...     seed=manifest_digest + tarball_digest,
...     workdir=Path("work"),
... )
"""

from __future__ import annotations

from cloudlets.disk.assemble import build_disk, derive_uuid
from cloudlets.disk.partition import Partition
from cloudlets.disk.spec import BootSpec, DiskImage, Firmware, FsType, PartitionTable

__all__ = [
    "BootSpec",
    "DiskImage",
    "Firmware",
    "FsType",
    "Partition",
    "PartitionTable",
    "build_disk",
    "derive_uuid",
]
