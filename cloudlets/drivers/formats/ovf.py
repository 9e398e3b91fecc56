"""``ovf`` and ``ova``: an OVF 1.x package, as VMware, VirtualBox and most
virtualization managers import it (DMTF DSP0243).

An OVF package is three files:

* the **descriptor** (``.ovf``), an OVF 1.x ``Envelope``: the file
  references, a ``DiskSection``, a ``NetworkSection`` and one
  ``VirtualSystem`` with a ``ProductSection`` (name, version, vendor from the
  manifest), an ``OperatingSystemSection`` and a ``VirtualHardwareSection``
  (CPUs and memory from the manifest's ``hardware``, a disk controller, the
  disk and one NIC per configured interface on a named network);
* the **disk**, a streamOptimized VMDK of version 3
  (:mod:`cloudlets.drivers.formats.vmdk`);
* the **manifest** (``.mf``): ``SHA256(name)= hex`` for the descriptor and
  the disk.

An OVA is the same package as one ustar archive, the descriptor first and the
manifest right after it, then the disk, as DSP0243 requires.

Import traps avoided on purpose (each reported by users of Packer and KIWI):
the envelope is OVF 1.x (``http://schemas.dmtf.org/ovf/envelope/1``; VMware
refuses 2.0 envelopes), there are no VirtualBox-only elements
(``vbox:Machine``), the VMDK is version 3 streamOptimized, and the firmware
is always declared (OVF 1.x has no standard element for it; VMware reads
``<vmw:Config vmw:key="firmware" vmw:value="efi"/>``, marked
``ovf:required="false"`` so other importers may ignore it).
"""

from __future__ import annotations

import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from cloudlets.drivers.base import FormatContext, FormatDriver, OutputFile, sha256_file
from cloudlets.drivers.formats.vmdk import write_stream_optimized
from cloudlets.drivers.types import Format, FormatCapability
from cloudlets.errors import ConfigurationError, FormatError

__all__ = ["OVAFormat", "OVFFormat", "OVFPackage"]

MiB = 1024 * 1024

OVF_NS = "http://schemas.dmtf.org/ovf/envelope/1"
RASD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData"
VSSD_NS = "http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData"
VMW_NS = "http://www.vmware.com/schema/ovf"
XSI_NS = "http://www.w3.org/2001/XMLSchema-instance"
#: The ``ovf:format`` URI of a streamOptimized VMDK.
VMDK_STREAM_OPTIMIZED = \
    "http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized"

#: Disk controllers: name -> (RASD ResourceType, ResourceSubType, VMDK adapter type).
DISK_CONTROLLERS: dict[str, tuple[int, str | None, str]] = {
    "ide": (5, "PIIX4", "ide"),
    "lsilogic": (6, "lsilogic", "lsilogic"),
    "lsilogicsas": (6, "lsilogicsas", "lsilogic"),
    "pvscsi": (6, "VirtualSCSI", "lsilogic"),
}
#: NIC models (RASD ResourceSubType) VMware and VirtualBox both know.
NIC_TYPES = ("E1000", "E1000e", "VmxNet3")
#: Architecture -> (CIM_OperatingSystem.OsType, VMware guest id).
OS_TYPES: dict[str, tuple[int, str]] = {
    "x86_64": (101, "other3xLinux64Guest"),  # 101: "Linux 64-Bit"
    "i386": (36, "other3xLinuxGuest"),  # 36: "LINUX"
    "i686": (36, "other3xLinuxGuest"),
    "aarch64": (101, "arm-other5xlinux-64"),
}
#: The network VMware hosts create by default.
DEFAULT_NETWORK = "VM Network"

_RESOURCE_CPU = 3
_RESOURCE_MEMORY = 4
_RESOURCE_ETHERNET = 10
_RESOURCE_DISK = 17

for _prefix, _uri in (("ovf", OVF_NS), ("rasd", RASD_NS), ("vssd", VSSD_NS),
                      ("vmw", VMW_NS), ("xsi", XSI_NS)):
    ET.register_namespace(_prefix, _uri)


def _q(namespace: str, name: str) -> str:
    return f"{{{namespace}}}{name}"


def _sub(parent: ET.Element, namespace: str, tag: str, text: str | None = None, /,
         **attributes: str) -> ET.Element:
    element = ET.SubElement(parent, _q(namespace, tag),
                            {_q(OVF_NS, key): value for key, value in attributes.items()})
    if text is not None:
        element.text = text
    return element


def _rasd_item(section: ET.Element, fields: dict[str, str | None]) -> ET.Element:
    """A ``<Item>`` with its RASD fields in schema (alphabetical) order."""
    item = _sub(section, OVF_NS, "Item")
    for key in sorted(fields):
        value = fields[key]
        if value is not None:
            _sub(item, RASD_NS, key, value)
    return item


@dataclass(frozen=True)
class OVFPackage:
    """The three files of an OVF package, written into one directory.

    :ivar descriptor: the ``.ovf``.
    :ivar disk: the ``.vmdk``.
    :ivar manifest: the ``.mf``.
    """

    descriptor: Path
    disk: Path
    manifest: Path


class OVFFormat(FormatDriver):
    """OVF 1.x descriptor + streamOptimized VMDK + SHA256 ``.mf``.

    Outputs (primary first): ``<basename>.ovf`` (role ``descriptor``),
    ``<basename>.vmdk`` (``disk``), ``<basename>.mf`` (``manifest``).

    :param ex_network: the network the NICs connect to; by default the
        manifest's ``hardware.network``, else ``VM Network``.
    :param ex_nic_type: the NIC model, one of :data:`NIC_TYPES`.
    :param ex_disk_controller: the disk controller, a key of :data:`DISK_CONTROLLERS`.
    :param ex_hardware_version: the VMware virtual hardware family
        (``vmx-10`` is ESXi 5.5 and later, with EFI and every NIC above).
    :param ex_firmware: ``"bios"`` or ``"efi"``; by default ``efi`` for a
        UEFI-only disk and ``bios`` otherwise (a ``both`` disk boots either way).
    :param ex_os_type: the VMware guest id (``vmw:osType``); by default from
        the manifest's architecture.
    """

    name: ClassVar[str] = Format.OVF
    website: ClassVar[str] = "https://www.dmtf.org/standards/ovf"
    description: ClassVar[str] = \
        "OVF 1.x descriptor, streamOptimized VMDK and SHA256 manifest (.ovf, .vmdk, .mf)"
    capabilities: ClassVar[FormatCapability] = (FormatCapability.BOOTABLE
                                                 | FormatCapability.MULTI_ARTIFACT
                                                 | FormatCapability.COMPOSED_DISK)
    extension = ".ovf"

    def __init__(self, ex_network: str | None = None, ex_nic_type: str = "E1000",
                 ex_disk_controller: str = "lsilogic", ex_hardware_version: str = "vmx-10",
                 ex_firmware: str | None = None, ex_os_type: str | None = None) -> None:
        if ex_nic_type not in NIC_TYPES:
            raise ConfigurationError(f"ex_nic_type {ex_nic_type!r} is not one of {NIC_TYPES}")
        if ex_disk_controller not in DISK_CONTROLLERS:
            raise ConfigurationError(f"ex_disk_controller {ex_disk_controller!r} is not one of "
                              f"{tuple(DISK_CONTROLLERS)}")
        if ex_firmware not in (None, "bios", "efi"):
            raise ConfigurationError(f"ex_firmware {ex_firmware!r} is not 'bios' or 'efi'")
        self.network = ex_network
        self.nic_type = ex_nic_type
        self.disk_controller = ex_disk_controller
        self.hardware_version = ex_hardware_version
        self.firmware = ex_firmware
        self.os_type = ex_os_type

    def convert(self, context: FormatContext) -> list[OutputFile]:
        package = self.ex_write_package(context, context.workdir)
        return [
            OutputFile(role="descriptor", path=package.descriptor, name=package.descriptor.name,
                       media_type="application/ovf+xml"),
            OutputFile(role="disk", path=package.disk, name=package.disk.name,
                       media_type="application/x-vmdk"),
            OutputFile(role="manifest", path=package.manifest, name=package.manifest.name,
                       media_type="text/plain"),
        ]

    def ex_write_package(self, context: FormatContext, directory: Path) -> OVFPackage:
        """Write the descriptor, disk and manifest into ``directory``.

        :param context: the conversion's context.
        :param directory: an existing directory.
        :returns: the three files.
        :raises FormatError: when the conversion fails.
        """
        disk = directory / f"{context.basename}.vmdk"
        adapter = DISK_CONTROLLERS[self.disk_controller][2]
        write_stream_optimized(context.disk, disk, adapter_type=adapter,
                               progress=context.progress)
        descriptor = directory / f"{context.basename}.ovf"
        descriptor.write_bytes(self.ex_descriptor(context, disk))
        manifest = directory / f"{context.basename}.mf"
        manifest.write_text("".join(f"SHA256({path.name})= {sha256_file(path)}\n"
                                    for path in (descriptor, disk)), encoding="ascii")
        return OVFPackage(descriptor=descriptor, disk=disk, manifest=manifest)

    def ex_firmware_for(self, context: FormatContext) -> str:
        """:returns: the firmware declared for this disk, ``bios`` or ``efi``."""
        if self.firmware is not None:
            return self.firmware
        return "efi" if context.disk.firmware == "uefi" else "bios"

    def ex_descriptor(self, context: FormatContext, disk: Path) -> bytes:
        """Build the OVF 1.x envelope for a VMDK already written.

        :param context: the conversion's context.
        :param disk: the VMDK (its name and size go into ``References``).
        :returns: the descriptor as UTF-8 XML.
        """
        manifest = context.manifest
        hardware = manifest.hardware
        network = self.network or str(hardware.get("network") or DEFAULT_NETWORK)
        os_id, os_type = OS_TYPES.get(manifest.arch, (101, "otherLinux64Guest"))
        os_type = self.os_type or os_type
        memory_mib = -(-int(hardware["memory"]) // MiB)
        system_id = manifest.name

        envelope = ET.Element(_q(OVF_NS, "Envelope"))
        references = _sub(envelope, OVF_NS, "References")
        _sub(references, OVF_NS, "File", href=disk.name, id="file1",
             size=str(disk.stat().st_size))

        disks = _sub(envelope, OVF_NS, "DiskSection")
        _sub(disks, OVF_NS, "Info", "Virtual disk information")
        _sub(disks, OVF_NS, "Disk", capacity=str(context.disk.size),
             capacityAllocationUnits="byte", diskId="vmdisk1", fileRef="file1",
             format=VMDK_STREAM_OPTIMIZED)

        networks = _sub(envelope, OVF_NS, "NetworkSection")
        _sub(networks, OVF_NS, "Info", "The logical networks the virtual machine uses")
        net = _sub(networks, OVF_NS, "Network", name=network)
        _sub(net, OVF_NS, "Description", f"The {network} network")

        system = _sub(envelope, OVF_NS, "VirtualSystem", id=system_id)
        _sub(system, OVF_NS, "Info", f"The {manifest.label} cloudlet")
        _sub(system, OVF_NS, "Name", manifest.name)

        product = _sub(system, OVF_NS, "ProductSection")
        _sub(product, OVF_NS, "Info", "Information about the installed software")
        _sub(product, OVF_NS, "Product", manifest.description or manifest.name)
        if manifest.author:
            _sub(product, OVF_NS, "Vendor", manifest.author)
        if manifest.version:
            _sub(product, OVF_NS, "Version", manifest.version)
        _sub(product, OVF_NS, "FullVersion", manifest.label)

        if manifest.description:
            annotation = _sub(system, OVF_NS, "AnnotationSection")
            _sub(annotation, OVF_NS, "Info", "A human-readable annotation")
            _sub(annotation, OVF_NS, "Annotation", manifest.description)

        operating_system = _sub(system, OVF_NS, "OperatingSystemSection", id=str(os_id))
        operating_system.set(_q(VMW_NS, "osType"), os_type)
        _sub(operating_system, OVF_NS, "Info", "The kind of installed guest operating system")
        _sub(operating_system, OVF_NS, "Description", f"Linux ({manifest.arch})")

        virtual_hardware = _sub(system, OVF_NS, "VirtualHardwareSection")
        _sub(virtual_hardware, OVF_NS, "Info", "Virtual hardware requirements")
        vssd = _sub(virtual_hardware, OVF_NS, "System")
        _sub(vssd, VSSD_NS, "ElementName", "Virtual Hardware Family")
        _sub(vssd, VSSD_NS, "InstanceID", "0")
        _sub(vssd, VSSD_NS, "VirtualSystemIdentifier", system_id)
        _sub(vssd, VSSD_NS, "VirtualSystemType", self.hardware_version)

        cpus = int(hardware["cpus"])
        _rasd_item(virtual_hardware, {
            "AllocationUnits": "hertz * 10^6",
            "Description": "Number of virtual CPUs",
            "ElementName": f"{cpus} virtual CPU(s)",
            "InstanceID": "1",
            "ResourceType": str(_RESOURCE_CPU),
            "VirtualQuantity": str(cpus),
        })
        _rasd_item(virtual_hardware, {
            "AllocationUnits": "byte * 2^20",
            "Description": "Memory size",
            "ElementName": f"{memory_mib} MB of memory",
            "InstanceID": "2",
            "ResourceType": str(_RESOURCE_MEMORY),
            "VirtualQuantity": str(memory_mib),
        })
        resource_type, subtype, _ = DISK_CONTROLLERS[self.disk_controller]
        _rasd_item(virtual_hardware, {
            "Address": "0",
            "Description": "Disk controller",
            "ElementName": "diskController0",
            "InstanceID": "3",
            "ResourceSubType": subtype,
            "ResourceType": str(resource_type),
        })
        _rasd_item(virtual_hardware, {
            "AddressOnParent": "0",
            "ElementName": "disk0",
            "HostResource": "ovf:/disk/vmdisk1",
            "InstanceID": "4",
            "Parent": "3",
            "ResourceType": str(_RESOURCE_DISK),
        })
        interfaces = context.config.interfaces or [{"name": "eth0"}]
        for index, interface in enumerate(interfaces):
            _rasd_item(virtual_hardware, {
                "Address": interface.get("mac"),
                "AddressOnParent": str(7 + index),
                "AutomaticAllocation": "true",
                "Connection": network,
                "Description": f"{self.nic_type} ethernet adapter for {interface['name']}",
                "ElementName": f"ethernet{index}",
                "InstanceID": str(5 + index),
                "ResourceSubType": self.nic_type,
                "ResourceType": str(_RESOURCE_ETHERNET),
            })
        config = ET.SubElement(virtual_hardware, _q(VMW_NS, "Config"))
        config.set(_q(OVF_NS, "required"), "false")
        config.set(_q(VMW_NS, "key"), "firmware")
        config.set(_q(VMW_NS, "value"), self.ex_firmware_for(context))

        ET.indent(envelope, space="  ")
        text = ET.tostring(envelope, encoding="unicode", xml_declaration=False)
        return ('<?xml version="1.0" encoding="UTF-8"?>\n' + text + "\n").encode("utf-8")


class OVAFormat(OVFFormat):
    """The OVF package as one ustar archive (``<basename>.ova``): descriptor,
    then manifest, then disk. Takes the same ``ex_`` parameters as
    :class:`OVFFormat`; member times are the disk stage's ``source_date_epoch``
    (else 0), owners root, modes 0644.
    """

    name: ClassVar[str] = Format.OVA
    description: ClassVar[str] = "OVF 1.x package as a single ustar archive (.ova)"
    capabilities: ClassVar[FormatCapability] = (FormatCapability.BOOTABLE
                                                 | FormatCapability.COMPOSED_DISK)
    extension = ".ova"

    #: ustar stores sizes in 11 octal digits.
    USTAR_MAX_SIZE: ClassVar[int] = 8**11 - 1

    def convert(self, context: FormatContext) -> list[OutputFile]:
        staging = context.workdir / "ova-members"
        staging.mkdir()
        package = self.ex_write_package(context, staging)
        members = (package.descriptor, package.manifest, package.disk)
        for member in members:
            if member.stat().st_size > self.USTAR_MAX_SIZE:
                raise FormatError(f"{member.name} is larger than a ustar member can be (8 GiB)")
        mtime = context.disk.source_date_epoch or 0
        name = f"{context.basename}.ova"
        target = context.workdir / name
        with open(target, "xb") as raw, \
                tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as archive:
            for member in members:
                info = tarfile.TarInfo(member.name)
                info.size = member.stat().st_size
                info.mode = 0o644
                info.mtime = mtime
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                with open(member, "rb") as handle:
                    archive.addfile(info, handle)
        for member in members:
            member.unlink()
        staging.rmdir()
        return [OutputFile(role="package", path=target, name=name,
                           media_type="application/x-tar")]

