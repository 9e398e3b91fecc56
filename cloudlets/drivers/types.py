"""Driver names and capability flags.

Names are ``str`` enums so ``Format.QCOW2 == "qcow2"`` and either form can be
passed wherever a driver name is expected. Members are alphabetical.
"""

from __future__ import annotations

import enum

__all__ = ["DriverKind", "Format", "FormatCapability", "Storage", "StorageCapability"]


class DriverKind(enum.StrEnum):
    """The two driver families."""

    #: Output types: turn the bootable raw disk into what a consumer imports.
    FORMAT = "format"
    #: Output providers: put the artifacts somewhere.
    STORAGE = "storage"


class Format(enum.StrEnum):
    """Names of the format drivers cloudlets ships."""

    #: Amazon EC2 machine image (EBS-backed or instance-store bundle).
    EC2 = "ec2"
    #: OVF package as a single OVA tar (descriptor, manifest, VMDK).
    OVA = "ova"
    #: OVF descriptor with a streamOptimized VMDK and a ``.mf`` manifest.
    OVF = "ovf"
    #: QEMU copy-on-write v2 (never with a backing file).
    QCOW2 = "qcow2"
    #: Raw sparse disk image.
    RAW = "raw"
    #: The rendered, configured root filesystem as a tarball.
    TAR = "tar"
    #: Fixed VHD, size aligned to 1 MiB (Azure, Hyper-V).
    VHD = "vhd"
    #: Xen PV (pygrub) or HVM disk with its ``xl`` domain configuration.
    XEN = "xen"


class Storage(enum.StrEnum):
    """Names of the storage drivers cloudlets ships."""

    #: HTTP(S) PUT, e.g. a WebDAV server.
    HTTP = "http"
    #: Any libcloud storage provider (Swift, Azure Blobs, GCS, ...).
    LIBCLOUD = "libcloud"
    #: A local directory (``file://`` URLs and plain paths).
    LOCAL = "local"
    #: Amazon S3 and S3-compatible stores.
    S3 = "s3"
    #: Block targets: a device or file, NBD, iSCSI.
    SAN = "san"


class FormatCapability(enum.IntFlag):
    """What a format driver can do, declared on the driver class."""

    NONE = 0
    #: The output contains a bootable disk.
    BOOTABLE = enum.auto()
    #: Produces more than one artifact (descriptor + disk, bundle parts...).
    MULTI_ARTIFACT = enum.auto()
    #: Has a step after storing (:meth:`FormatDriver.publish`), e.g. register an AMI.
    PUBLISH = enum.auto()
    #: Needs the rendered root filesystem tree rather than the disk.
    NEEDS_TREE = enum.auto()
    #: Reads the disk only through :func:`cloudlets.drivers.formats.qemuimg.convert`
    #: (or :attr:`DiskImage.pieces <cloudlets.drivers.base.DiskImage.pieces>`
    #: itself), so the disk stage may hand it a disk made of pieces: the
    #: cached root filesystem and the blocks the render patched, never
    #: copied into one file.
    COMPOSED_DISK = enum.auto()


class StorageCapability(enum.IntFlag):
    """What a storage driver can do, declared on the driver class and
    checked by :class:`~cloudlets.drivers.base.StorageDriver` before dispatch."""

    NONE = 0
    #: Accepts an iterator of bytes of unknown length.
    STREAM = enum.auto()
    #: Can resume an interrupted upload.
    RESUME = enum.auto()
    #: Verifies size and digest after upload.
    VERIFY = enum.auto()
    #: Can delete what it stored.
    DELETE = enum.auto()
    #: Can read back what it stored.
    READ = enum.auto()
    #: The artifact appears at its final location all at once, or not at all.
    ATOMIC = enum.auto()
    #: Can hand out a time-limited URL to read an artifact.
    PRESIGN = enum.auto()
    #: Writes to a fixed-size block target rather than an object namespace.
    BLOCK = enum.auto()
