"""``ec2``: an Amazon Machine Image, EBS-backed or instance-store.

**EBS-backed** (``ex_mode="ebs"``, the default): :meth:`EC2Format.convert`
writes the disk (raw, or VMDK/VHD with ``ex_disk_format``); the storage
driver puts it on S3; :meth:`EC2Format.publish` then runs ImportSnapshot on
the S3 object, polls DescribeImportSnapshotTasks on its own schedule
(``ex_poll_interval``, ``ex_poll_deadline``; a task EC2 reports ``deleted``
fails at once with its status message), registers the snapshot as the root
device of an HVM image (architecture, boot mode and ENA from the manifest),
tags the image and the snapshot with the manifest's name, version and digest,
and returns the AMI id.

**Instance-store** (``ex_mode="instance-store"``): :meth:`EC2Format.convert`
writes the classic encrypted bundle (:mod:`cloudlets.drivers.formats.ec2_bundle`):
``NAME.manifest.xml`` first, then ``NAME.part.NN``; :meth:`EC2Format.publish`
registers ``bucket/key`` of the stored manifest.

The format never talks to S3 itself: it reads ``s3://bucket/key`` from the
stored artifacts, so any S3-compatible storage driver serves it. AWS calls go
through libcloud's EC2 driver (:class:`cloudlets.aws.EC2Client`).
"""

from __future__ import annotations

import logging
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

from cloudlets.aws import (
    AWSError,
    EC2Client,
    resolve_credentials,
    resolve_endpoint,
    resolve_region,
)
from cloudlets.drivers.base import (
    FormatContext,
    FormatDriver,
    OutputFile,
    PublishResult,
    StorageDriver,
    StoredArtifact,
)
from cloudlets.drivers.formats.vmdk import write_stream_optimized
from cloudlets.drivers.types import Format, FormatCapability
from cloudlets.errors import ConfigurationError, FormatError
from cloudlets.sparse import link_or_copy
from cloudlets.urls import redact
from cloudlets.version import __version__

__all__ = ["EC2Format", "S3Location", "boot_mode", "ec2_architecture", "parse_s3_location"]

log = logging.getLogger(__name__)

#: Manifest ``arch`` → EC2 ``Architecture``.
ARCHITECTURES: Mapping[str, str] = {"aarch64": "arm64", "i386": "i386", "x86_64": "x86_64"}
#: Manifest ``boot.firmware`` → EC2 ``BootMode``.
BOOT_MODES: Mapping[str, str] = {"bios": "legacy-bios", "both": "uefi-preferred",
                                 "uefi": "uefi"}
#: ``ex_disk_format`` → (file extension, ImportSnapshot ``DiskContainer.Format``).
DISK_FORMATS: Mapping[str, tuple[str, str]] = {"raw": ("raw", "RAW"), "vhd": ("vhd", "VHD"),
                                               "vmdk": ("vmdk", "VMDK")}
#: Import task states that mean it failed (EC2 reports failures as ``deleted``).
FAILED_STATES = frozenset({"deleted", "deleting", "error", "failed", "cancelled"})
MODES = ("ebs", "instance-store")
_ROOT_DEVICES = ("/dev/xvda", "/dev/sda1")
_AMI_NAME = re.compile(r"[^A-Za-z0-9()\[\] ./'@_-]")


@dataclass(frozen=True)
class S3Location:
    """``s3://bucket/key`` split up."""

    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_s3_location(location: str) -> S3Location:
    """:returns: the bucket and key of ``s3://bucket/key``.

    :raises FormatError: for any other location.
    """
    match = re.fullmatch(r"s3://([^/?#]+)/([^?#]+)", location)
    if match is None:
        raise FormatError(
            f"the EC2 format needs its artifacts on S3 (s3://bucket/key), but they were "
            f"stored at {redact(location)!r}: use an S3-compatible storage driver")
    return S3Location(bucket=match.group(1), key=match.group(2))


def ec2_architecture(arch: str) -> str:
    """:returns: EC2's name for a manifest architecture.

    :raises FormatError: when EC2 has no such architecture.
    """
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise FormatError(f"EC2 cannot run manifest architecture {arch!r}; it runs "
                          f"{', '.join(sorted(ARCHITECTURES))}") from None


def boot_mode(firmware: str) -> str:
    """:returns: EC2's ``BootMode`` for a manifest's ``boot.firmware``."""
    try:
        return BOOT_MODES[firmware]
    except KeyError:
        raise FormatError(f"EC2 has no boot mode for firmware {firmware!r}") from None


class EC2Format(FormatDriver):
    """An AMI, registered after the storage driver put the disk (or bundle) on S3.

    :param key: AWS access key id (else the environment or a profile).
    :param secret: AWS secret access key.
    :param token: AWS session token.
    :param region: the EC2 region to import into and register in (else
        ``AWS_REGION``, ``AWS_DEFAULT_REGION``, ``us-east-1``).
    :param ex_mode: ``ebs`` (ImportSnapshot + RegisterImage) or
        ``instance-store`` (encrypted bundle + RegisterImage).
    :param ex_disk_format: the disk uploaded for ``ebs``: ``raw``, ``vmdk``
        (streamOptimized) or ``vhd`` (fixed).
    :param ex_endpoint_url: the EC2 endpoint, overriding
        ``AWS_ENDPOINT_URL_EC2`` and ``AWS_ENDPOINT_URL``.
    :param ex_profile: a profile of the shared credentials file.
    :param ex_image_name: the AMI name (default ``NAME-VERSION-YYYYmmddHHMMSS``).
    :param ex_description: the AMI description (default: the manifest's).
    :param ex_root_device: ``/dev/xvda`` or ``/dev/sda1``.
    :param ex_volume_type: the root volume's EBS type.
    :param ex_role_name: the VM Import service role (default ``vmimport``).
    :param ex_poll_interval: seconds between DescribeImportSnapshotTasks calls.
    :param ex_poll_deadline: seconds to wait for the import before giving up
        (the task is then cancelled).
    :param ex_timeout: seconds per HTTP request.
    :param ex_certificate: instance-store: the user's X.509 certificate
        (PEM path or text).
    :param ex_private_key: instance-store: the user's RSA private key (PEM
        path or text), which signs the bundle manifest.
    :param ex_ec2_certificate: instance-store: the cloud's certificate the
        bundle key is encrypted for.
    :param ex_account_id: instance-store: the AWS account id.
    """

    name: ClassVar[str] = Format.EC2
    website: ClassVar[str] = "https://docs.aws.amazon.com/AWSEC2/latest/UserGuide/AMIs.html"
    description: ClassVar[str] = ("Amazon Machine Image: EBS snapshot import or "
                                  "instance-store bundle, registered on EC2")
    capabilities: ClassVar[FormatCapability] = (
        FormatCapability.BOOTABLE | FormatCapability.MULTI_ARTIFACT | FormatCapability.PUBLISH)

    def __init__(self, key: str | None = None, secret: str | None = None, *,
                 token: str | None = None, region: str | None = None,
                 ex_mode: str = "ebs", ex_disk_format: str = "raw",
                 ex_endpoint_url: str | None = None, ex_profile: str | None = None,
                 ex_image_name: str | None = None, ex_description: str | None = None,
                 ex_root_device: str = "/dev/xvda", ex_volume_type: str = "gp3",
                 ex_role_name: str | None = None, ex_poll_interval: float = 15.0,
                 ex_poll_deadline: float = 3600.0, ex_timeout: float = 60.0,
                 ex_certificate: str | Path | None = None,
                 ex_private_key: str | Path | None = None,
                 ex_ec2_certificate: str | Path | None = None,
                 ex_account_id: str | None = None) -> None:
        if ex_mode not in MODES:
            raise ConfigurationError(f"EC2 ex_mode {ex_mode!r} is not one of {', '.join(MODES)}")
        if ex_disk_format not in DISK_FORMATS:
            raise ConfigurationError(f"EC2 ex_disk_format {ex_disk_format!r} is not one of "
                                     f"{', '.join(DISK_FORMATS)}")
        if ex_root_device not in _ROOT_DEVICES:
            raise ConfigurationError(f"EC2 ex_root_device {ex_root_device!r} is not one of "
                                     f"{', '.join(_ROOT_DEVICES)}")
        if ex_poll_interval <= 0 or ex_poll_deadline <= 0 or ex_timeout <= 0:
            raise ConfigurationError("EC2 ex_poll_interval, ex_poll_deadline and ex_timeout "
                                     "must be positive")
        if ex_mode == "instance-store":
            missing = [name for name, value in (
                ("ex_certificate", ex_certificate), ("ex_private_key", ex_private_key),
                ("ex_ec2_certificate", ex_ec2_certificate), ("ex_account_id", ex_account_id))
                if not value]
            if missing:
                raise ConfigurationError("an EC2 instance-store bundle needs "
                                         + ", ".join(missing))
        self.key = key
        self._secret = secret
        self._token = token
        self.region = resolve_region(region)
        self.mode = ex_mode
        self.disk_format = ex_disk_format
        self.extension = (".manifest.xml" if ex_mode == "instance-store"
                          else "." + DISK_FORMATS[ex_disk_format][0])
        self.endpoint_url = ex_endpoint_url
        self.profile = ex_profile
        self.image_name = ex_image_name
        self.image_description = ex_description
        self.root_device = ex_root_device
        self.volume_type = ex_volume_type
        self.role_name = ex_role_name
        self.poll_interval = float(ex_poll_interval)
        self.poll_deadline = float(ex_poll_deadline)
        self.timeout = float(ex_timeout)
        self.certificate = ex_certificate
        self.private_key = ex_private_key
        self.ec2_certificate = ex_ec2_certificate
        self.account_id = ex_account_id
        #: What the poll loop sleeps and measures time with.
        self._sleep: Callable[[float], None] = time.sleep
        self._clock: Callable[[], float] = time.monotonic

    def __repr__(self) -> str:
        return f"<EC2Format mode={self.mode} region={self.region}>"

    # -- FormatDriver API ---------------------------------------------------

    def convert(self, context: FormatContext) -> list[OutputFile]:
        """Write the disk (``ebs``) or the bundle (``instance-store``).

        :raises FormatError: when the manifest's architecture or firmware has
            no EC2 equivalent, or the conversion fails.
        """
        self._image_facts(context)  # fail before any upload
        if self.mode == "instance-store":
            return self._convert_bundle(context)
        extension, _ = DISK_FORMATS[self.disk_format]
        name = f"{context.basename}.{extension}"
        target = context.workdir / name
        if self.disk_format == "raw":
            link_or_copy(context.disk.path, target, progress=context.progress)
            return [OutputFile(role="disk", path=target, name=name)]
        if self.disk_format == "vhd":
            from cloudlets.drivers.formats.vhd import VHDFormat

            return VHDFormat().convert(context)
        # Reproducible (content-derived CID), version 3, as the OVF driver's.
        write_stream_optimized(context.disk.path, target, progress=context.progress)
        return [OutputFile(role="disk", path=target, name=name,
                           media_type="application/x-vmdk")]

    def publish(self, context: FormatContext, stored: list[StoredArtifact],
                storage: StorageDriver) -> PublishResult:
        """Register the stored disk or bundle as an AMI.

        :returns: the AMI id and, in ``details``, the snapshot, import task,
            region and the image's attributes.
        :raises FormatError: when an artifact is not on S3, the import fails
            or times out (with EC2's status message).
        :raises AWSError: naming the call and AWS's error code.
        :raises ConfigurationError: when no credentials are found.
        """
        if self.mode == "instance-store":
            return self._publish_bundle(context, stored)
        return self._publish_ebs(context, stored)

    # -- ex_ API ------------------------------------------------------------

    def ex_client(self) -> EC2Client:
        """:returns: a client for this driver's region, endpoint and credentials.

        :raises ConfigurationError: when no credentials are found.
        """
        credentials = resolve_credentials(self.key, self._secret, self._token,
                                          profile=self.profile)
        endpoint = resolve_endpoint("ec2", self.endpoint_url)
        return EC2Client(credentials, region=self.region, endpoint=endpoint,
                         timeout=self.timeout)

    def ex_wait_for_import(self, client: EC2Client, task_id: str) -> str:
        """Poll an ImportSnapshot task until it completes.

        :returns: the snapshot id.
        :raises FormatError: at once when the task fails (with its status
            message), or once :attr:`poll_deadline` passes (the task is then
            cancelled, best effort).
        :raises AWSError: when a poll fails for a reason retrying cannot fix;
            throttling, 5xx answers and network failures are retried until
            the deadline.
        """
        started = self._clock()
        status = message = ""
        while True:
            try:
                response = client.call("DescribeImportSnapshotTasks",
                                       {"ImportTaskId.1": task_id})
            except AWSError as exc:
                if not exc.transient or self._clock() - started >= self.poll_deadline:
                    raise
                log.warning("EC2 import task %s: %s; polling again", task_id, exc)
                self._sleep(self.poll_interval)
                continue
            item = response.find("importSnapshotTaskSet/item")
            if item is None:
                raise FormatError(f"EC2 import task {task_id} has disappeared")
            detail = item.find("snapshotTaskDetail")
            status = _text(detail, "status")
            message = _text(detail, "statusMessage")
            log.info("EC2 import task %s: %s %s%% %s", task_id, status,
                     _text(detail, "progress") or "-", message)
            if status == "completed":
                snapshot = _text(detail, "snapshotId")
                if not snapshot:
                    raise FormatError(f"EC2 import task {task_id} completed without a snapshot")
                return snapshot
            if status in FAILED_STATES:
                raise FormatError(f"EC2 import task {task_id} failed ({status}): "
                                  f"{message or 'no status message'}")
            remaining = self.poll_deadline - (self._clock() - started)
            if remaining <= 0:
                self._cancel(client, task_id)
                raise FormatError(
                    f"EC2 import task {task_id} did not complete within "
                    f"{self.poll_deadline:g} s (last status {status or 'unknown'}"
                    f"{', ' + message if message else ''}); it was cancelled")
            self._sleep(min(self.poll_interval, remaining))

    # -- private helpers ----------------------------------------------------

    def _image_facts(self, context: FormatContext) -> dict[str, str]:
        manifest = context.manifest
        architecture = ec2_architecture(manifest.arch)
        firmware = manifest.boot.firmware if manifest.boot is not None else context.disk.firmware
        mode = boot_mode(firmware)
        if architecture == "arm64" and mode == "legacy-bios":
            raise FormatError("EC2 boots arm64 images with UEFI only; the manifest's "
                              "boot.firmware is 'bios'")
        facts = {"Architecture": architecture, "BootMode": mode, "VirtualizationType": "hvm",
                 "RootDeviceName": self.root_device}
        ena = manifest.hardware.get("ena")
        if ena is not None:
            facts["EnaSupport"] = "true" if ena else "false"
        return facts

    def _register_params(self, context: FormatContext) -> dict[str, str]:
        manifest = context.manifest
        stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        name = self.image_name or _AMI_NAME.sub("_", f"{manifest.label}-{stamp}")[:128]
        description = self.image_description
        if description is None:
            description = manifest.description or manifest.label
        params = {"Name": name, "Description": description[:255]}
        params.update(self._image_facts(context))
        return params

    @staticmethod
    def _tags(context: FormatContext) -> dict[str, str]:
        manifest = context.manifest
        tags = {"Name": manifest.label, "cloudlets:name": manifest.name,
                "cloudlets:digest": manifest.digest}
        if manifest.version is not None:
            tags["cloudlets:version"] = manifest.version
        return tags

    def _tag(self, client: EC2Client, resources: list[str], tags: Mapping[str, str]) -> None:
        params: dict[str, str] = {}
        for index, resource in enumerate(resources, 1):
            params[f"ResourceId.{index}"] = resource
        for index, (key, value) in enumerate(sorted(tags.items()), 1):
            params[f"Tag.{index}.Key"] = key
            params[f"Tag.{index}.Value"] = value
        client.call("CreateTags", params)

    def _cancel(self, client: EC2Client, task_id: str) -> None:
        try:
            client.call("CancelImportTask", {"ImportTaskId": task_id,
                                             "CancelReason": "cloudlets poll deadline passed"})
        except AWSError as exc:
            log.warning("could not cancel EC2 import task %s: %s", task_id, exc)

    def _publish_ebs(self, context: FormatContext,
                     stored: list[StoredArtifact]) -> PublishResult:
        disk = next((artifact for artifact in stored if artifact.role == "disk"), None)
        if disk is None:
            raise FormatError("the EC2 format found no stored disk to import")
        where = parse_s3_location(disk.location)
        register = self._register_params(context)  # before any call: fail fast
        client = self.ex_client()
        _, container_format = DISK_FORMATS[self.disk_format]
        params = {"Description": f"cloudlets {context.manifest.label}",
                  "DiskContainer.Description": context.manifest.label,
                  "DiskContainer.Format": container_format,
                  "DiskContainer.UserBucket.S3Bucket": where.bucket,
                  "DiskContainer.UserBucket.S3Key": where.key}
        if self.role_name:
            params["RoleName"] = self.role_name
        response = client.call("ImportSnapshot", params)
        task_id = _text(response, "importTaskId")
        if not task_id:
            raise AWSError("ec2", "ImportSnapshot", "MalformedResponse", "no importTaskId")
        log.info("EC2 importing %s as task %s", where, task_id)
        snapshot_id = self.ex_wait_for_import(client, task_id)
        register.update({
            "BlockDeviceMapping.1.DeviceName": self.root_device,
            "BlockDeviceMapping.1.Ebs.SnapshotId": snapshot_id,
            "BlockDeviceMapping.1.Ebs.DeleteOnTermination": "true",
            "BlockDeviceMapping.1.Ebs.VolumeType": self.volume_type,
        })
        image_id = _text(client.call("RegisterImage", register), "imageId")
        if not image_id:
            raise AWSError("ec2", "RegisterImage", "MalformedResponse", "no imageId")
        self._tag(client, [image_id, snapshot_id], self._tags(context))
        log.info("EC2 registered %s from %s", image_id, snapshot_id)
        return PublishResult(image_id=image_id, details={
            "ami": image_id, "snapshot_id": snapshot_id, "import_task_id": task_id,
            "region": self.region, "mode": self.mode, "name": register["Name"],
            "architecture": register["Architecture"], "boot_mode": register["BootMode"],
            "source": str(where)})

    def _convert_bundle(self, context: FormatContext) -> list[OutputFile]:
        from cloudlets.drivers.formats import ec2_bundle

        assert self.certificate and self.private_key and self.ec2_certificate
        assert self.account_id
        user_cert = ec2_bundle.load_certificate(self.certificate, "user certificate")
        ec2_cert = ec2_bundle.load_certificate(self.ec2_certificate, "EC2 certificate")
        private_key = ec2_bundle.load_private_key(self.private_key)
        facts = self._image_facts(context)
        device = self.root_device.removeprefix("/dev/")
        bundle = ec2_bundle.build_bundle(
            context.disk.path, context.workdir, context.basename,
            architecture=facts["Architecture"], account_id=self.account_id,
            user_certificate=user_cert, private_key=private_key, ec2_certificate=ec2_cert,
            block_device_mappings={"ami": device, "root": self.root_device},
            bundler=("cloudlets", __version__), mtime=context.disk.source_date_epoch or 0,
            progress=context.progress)
        outputs = [OutputFile(role="manifest", path=bundle.manifest_path,
                              name=bundle.manifest_path.name, media_type="application/xml")]
        outputs += [OutputFile(role="bundle-part", path=part.path, name=part.filename)
                    for part in bundle.parts]
        return outputs

    def _publish_bundle(self, context: FormatContext,
                        stored: list[StoredArtifact]) -> PublishResult:
        manifest = next((artifact for artifact in stored if artifact.role == "manifest"), None)
        if manifest is None:
            raise FormatError("the EC2 format found no stored bundle manifest to register")
        where = parse_s3_location(manifest.location)
        directory = where.key.rpartition("/")[0]
        expected = _bundle_part_names(context.workdir / f"{context.basename}.manifest.xml")
        parts = [artifact for artifact in stored if artifact.role == "bundle-part"]
        found = []
        for artifact in parts:
            part = parse_s3_location(artifact.location)
            if part.bucket != where.bucket or part.key.rpartition("/")[0] != directory:
                raise FormatError(f"bundle part {part} is not beside its manifest {where}")
            found.append(part.key.rpartition("/")[2])
        if found != expected:
            raise FormatError(
                f"the bundle manifest lists parts {expected} but they were stored as {found}: "
                "store an instance-store bundle under a directory (an output path ending "
                "with '/') so the names match")
        register = self._register_params(context)
        register["ImageLocation"] = f"{where.bucket}/{where.key}"
        client = self.ex_client()
        image_id = _text(client.call("RegisterImage", register), "imageId")
        if not image_id:
            raise AWSError("ec2", "RegisterImage", "MalformedResponse", "no imageId")
        self._tag(client, [image_id], self._tags(context))
        log.info("EC2 registered %s from %s", image_id, where)
        return PublishResult(image_id=image_id, details={
            "ami": image_id, "region": self.region, "mode": self.mode,
            "name": register["Name"], "architecture": register["Architecture"],
            "boot_mode": register["BootMode"], "image_location": register["ImageLocation"],
            "parts": len(parts)})


def _text(element: ET.Element | None, path: str) -> str:
    if element is None:
        return ""
    return (element.findtext(path) or "").strip()


def _bundle_part_names(manifest_path: Path) -> list[str]:
    try:
        root = ET.parse(manifest_path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise FormatError(f"cannot read the bundle manifest {manifest_path}: {exc}") from None
    return [(part.findtext("filename") or "") for part in root.iterfind("image/parts/part")]
