"""The EC2 format: the instance-store bundle (decrypted back with the keys,
with ``cryptography`` and with the ``openssl`` command line), the EBS and
instance-store publish paths against the local AWS stand-in
(:mod:`tests.awsstandin`: moto's server on 127.0.0.1), failure paths,
endpoints and credentials.

Keys and certificates are generated at test time; nothing secret is committed.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import io
import logging
import os
import re
import shutil
import subprocess
import tarfile
import time
import tracemalloc
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("moto", reason="the AWS stand-in needs moto[server]==5.2.5")
boto3 = pytest.importorskip("boto3")

from cryptography import x509  # noqa: E402
from cryptography.hazmat.primitives import hashes, padding, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: E402
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

from cloudlets.aws import (  # noqa: E402
    AWSError,
    Credentials,
    resolve_credentials,
    resolve_endpoint,
)
from cloudlets.config import RenderConfig, resolve_config  # noqa: E402
from cloudlets.drivers.base import (  # noqa: E402
    DiskImage,
    FormatContext,
    FormatDriver,
    OutputFile,
    StorageDriver,
    StoredArtifact,
    UploadSource,
)
from cloudlets.drivers.formats import ec2_bundle  # noqa: E402
from cloudlets.drivers.formats.ec2 import EC2Format, boot_mode, ec2_architecture  # noqa: E402
from cloudlets.drivers.types import StorageCapability  # noqa: E402
from cloudlets.errors import CloudletsError, ConfigurationError, FormatError  # noqa: E402
from cloudlets.manifest import Manifest  # noqa: E402
from cloudlets.testing.formats import FormatDriverConformance, synthetic_disk  # noqa: E402
from tests import awsstandin  # noqa: E402
from tests.awsstandin import AWSStandIn  # noqa: E402

#: The stand-in fixture, served on 127.0.0.1 per test.
aws_standin = awsstandin.aws_standin

MiB = 1024 * 1024
BUCKET = "cloudlets-images"
SECRET = "s3cr3t-never-shown"
FAST = {"ex_poll_interval": 0.05, "ex_poll_deadline": 20.0}


# -- keys and certificates, made at test time ---------------------------------

@dataclass(frozen=True)
class KeyPair:
    key: rsa.RSAPrivateKey
    certificate: x509.Certificate
    key_path: Path
    cert_path: Path
    public_path: Path


def _key_pair(directory: Path, name: str) -> KeyPair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"cloudlets test {name}")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .sign(key, hashes.SHA256()))
    key_path = directory / f"{name}.key"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    cert_path = directory / f"{name}.crt"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    public_path = directory / f"{name}.pub"
    public_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return KeyPair(key, certificate, key_path, cert_path, public_path)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    directory = tmp_path_factory.mktemp("keys")
    return {"user": _key_pair(directory, "user"), "ec2": _key_pair(directory, "ec2")}


# -- manifests, contexts, S3 ---------------------------------------------------

def _manifest(arch: str = "x86_64", firmware: str = "both", ena: bool | None = True,
              name: str = "web") -> Manifest:
    hardware: dict[str, Any] = {"cpus": 1, "memory": "512M"}
    if ena is not None:
        hardware["ena"] = ena
    return Manifest({
        "name": name, "version": "1.2", "arch": arch, "description": "EC2 test cloudlet",
        "filesystem": {"url": "http://mirrors.cloudlets.com/w.tar.gz", "sha256": "0" * 64},
        "boot": {"kernel": "/boot/vmlinuz", "firmware": firmware, "cmdline": "console=ttyS0"},
        "hardware": hardware,
    })


def _context(tmp_path: Path, manifest: Manifest | None = None,
             disk: DiskImage | None = None) -> FormatContext:
    manifest = manifest or _manifest()
    config: RenderConfig = resolve_config(manifest, None, {"hostname": "web"})
    source = tmp_path / "source"
    source.mkdir(parents=True, exist_ok=True)
    workdir = tmp_path / "work"
    workdir.mkdir()
    return FormatContext(manifest=manifest, config=config,
                         disk=disk or synthetic_disk(source), workdir=workdir,
                         basename=manifest.label)


def _random_image(path: Path, size: int) -> Path:
    with open(path, "wb") as handle:
        remaining = size
        while remaining:
            chunk = os.urandom(min(remaining, MiB))
            handle.write(chunk)
            remaining -= len(chunk)
    return path


class Boto3S3Storage(StorageDriver):
    """A test-only S3 storage driver on boto3, so publish runs against
    artifacts a storage driver stored (any S3-compatible driver will do)."""

    name = "test-s3"
    capabilities = StorageCapability.DELETE

    def __init__(self, client: Any) -> None:
        self.client = client

    def exists(self, location: str) -> bool:
        bucket, key = location.removeprefix("s3://").split("/", 1)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
        except self.client.exceptions.ClientError:
            return False
        return True

    def _upload(self, source: UploadSource, location: str, *, overwrite: bool) -> str:
        bucket, key = location.removeprefix("s3://").split("/", 1)
        self.client.put_object(Bucket=bucket, Key=key, Body=b"".join(source.chunks(MiB)))
        source.verify(location)
        return location

    def _delete(self, location: str) -> None:
        bucket, key = location.removeprefix("s3://").split("/", 1)
        self.client.delete_object(Bucket=bucket, Key=key)


@pytest.fixture
def s3(aws_standin: AWSStandIn) -> Any:
    client = boto3.client("s3", endpoint_url=aws_standin.url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture
def ec2(aws_standin: AWSStandIn) -> Any:
    return boto3.client("ec2", endpoint_url=aws_standin.url, region_name="us-east-1",
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def _store(storage: StorageDriver, outputs: list[OutputFile],
           prefix: str = "renders/") -> list[StoredArtifact]:
    return [storage.upload(o.path, f"s3://{BUCKET}/{prefix}{o.name}", role=o.role,
                           media_type=o.media_type) for o in outputs]


def _render(driver: EC2Format, tmp_path: Path, s3: Any, manifest: Manifest | None = None,
            prefix: str = "renders/") -> tuple[FormatContext, Any]:
    """convert → store → publish, as the Renderer runs them."""
    context = _context(tmp_path, manifest)
    storage = Boto3S3Storage(s3)
    stored = _store(storage, driver.convert(context), prefix)
    return context, driver.publish(context, stored, storage)


# -- the bundle ----------------------------------------------------------------

@dataclass
class OpenedBundle:
    root: ET.Element
    text: str
    key: bytes
    iv: bytes
    tar: bytes


def _rsa_decrypt(key: rsa.RSAPrivateKey, hex_text: str | None) -> bytes:
    assert hex_text
    return key.decrypt(bytes.fromhex(hex_text), asym_padding.PKCS1v15())


def _open_bundle(manifest_path: Path, keys: dict[str, KeyPair]) -> OpenedBundle:
    """Decrypt a bundle with the private keys, checking every digest and
    the signature on the way."""
    text = manifest_path.read_text()
    root = ET.fromstring(text)
    image = root.find("image")
    assert image is not None
    assert root.findtext("version") == "2007-10-10"
    # Both the EC2 and the user copy of the key and IV decrypt to the same hex.
    hex_key = _rsa_decrypt(keys["user"].key, image.findtext("user_encrypted_key"))
    assert hex_key == _rsa_decrypt(keys["ec2"].key, image.findtext("ec2_encrypted_key"))
    hex_iv = _rsa_decrypt(keys["user"].key, image.findtext("user_encrypted_iv"))
    assert hex_iv == _rsa_decrypt(keys["ec2"].key, image.findtext("ec2_encrypted_iv"))
    assert re.fullmatch(rb"[0-9a-f]{32}", hex_key) and re.fullmatch(rb"[0-9a-f]{32}", hex_iv)
    for tag in ("ec2_encrypted_key", "user_encrypted_key"):
        element = image.find(tag)
        assert element is not None and element.get("algorithm") == "AES-128-CBC"
    # Every part's SHA1, in index order.
    parts = image.findall("parts/part")
    assert image.find("parts").get("count") == str(len(parts))  # type: ignore[union-attr]
    encrypted = bytearray()
    for index, part in enumerate(parts):
        assert part.get("index") == str(index)
        data = (manifest_path.parent / (part.findtext("filename") or "")).read_bytes()
        digest = part.find("digest")
        assert digest is not None and digest.get("algorithm") == "SHA1"
        assert hashlib.sha1(data).hexdigest() == digest.text
        encrypted += data
    assert int(image.findtext("bundled_size") or -1) == len(encrypted)
    # The signature, over the serialized elements and over the file's bytes.
    public = keys["user"].certificate.public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    signature = bytes.fromhex(root.findtext("signature") or "")
    signed = ec2_bundle.signed_text(text)
    public.verify(signature, signed, asym_padding.PKCS1v15(), hashes.SHA1())
    raw = re.search(r"<machine_configuration>.*</image>", text, re.DOTALL)
    assert raw is not None and raw.group(0).encode() == signed
    # Decrypt, unpad, gunzip; the tar's SHA1 is the image digest.
    key, iv = bytes.fromhex(hex_key.decode()), bytes.fromhex(hex_iv.decode())
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    compressed = unpadder.update(decryptor.update(bytes(encrypted)) + decryptor.finalize())
    compressed += unpadder.finalize()
    tar = gzip.decompress(compressed)
    digest = image.find("digest")
    assert digest is not None and digest.get("algorithm") == "SHA1"
    assert hashlib.sha1(tar).hexdigest() == digest.text
    return OpenedBundle(root=root, text=text, key=key, iv=iv, tar=tar)


def _tar_member(tar: bytes) -> tuple[tarfile.TarInfo, bytes]:
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        members = archive.getmembers()
        assert len(members) == 1
        handle = archive.extractfile(members[0])
        assert handle is not None
        return members[0], handle.read()


def test_bundle_decrypts_back_to_the_image(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    image = _random_image(tmp_path / "disk.raw", 13 * MiB + 12345)
    out = tmp_path / "bundle"
    out.mkdir()
    bundle = ec2_bundle.build_bundle(
        image, out, "web-1.2", architecture="x86_64", account_id="1234-5678-9012",
        user_certificate=keys["user"].certificate, private_key=keys["user"].key,
        ec2_certificate=keys["ec2"].certificate,
        block_device_mappings={"ami": "xvda", "root": "/dev/xvda"})
    # Random data does not compress: two parts, the first exactly 10 MiB.
    assert [p.filename for p in bundle.parts] == ["web-1.2.part.00", "web-1.2.part.01"]
    assert bundle.parts[0].size == ec2_bundle.PART_SIZE
    opened = _open_bundle(bundle.manifest_path, keys)
    member, data = _tar_member(opened.tar)
    assert member.name == "web-1.2" and member.size == image.stat().st_size
    assert data == image.read_bytes()
    image_element = opened.root.find("image")
    assert image_element is not None
    assert image_element.findtext("size") == str(image.stat().st_size)
    assert image_element.findtext("user") == "123456789012"
    assert image_element.findtext("name") == "web-1.2"
    assert image_element.findtext("type") == "machine"
    assert opened.root.findtext("machine_configuration/architecture") == "x86_64"
    mappings = {m.findtext("virtual"): m.findtext("device")
                for m in opened.root.iterfind("machine_configuration/block_device_mapping/"
                                              "mapping")}
    assert mappings == {"ami": "xvda", "root": "/dev/xvda"}


def test_bundle_with_the_openssl_command_line(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    """The same checks with ``openssl``: pkeyutl -decrypt, enc -d, dgst -verify."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed (apt-get install openssl)")
    image = _random_image(tmp_path / "disk.raw", 3 * MiB)
    out = tmp_path / "bundle"
    out.mkdir()
    bundle = ec2_bundle.build_bundle(
        image, out, "img", architecture="arm64", account_id="123456789012",
        user_certificate=keys["user"].certificate, private_key=keys["user"].key,
        ec2_certificate=keys["ec2"].certificate, block_device_mappings={}, part_size=MiB)
    assert len(bundle.parts) == 4
    root = ET.parse(bundle.manifest_path).getroot()

    def run(*args: str | Path, data: bytes | None = None) -> bytes:
        return subprocess.run([openssl, *map(str, args)], input=data, capture_output=True,
                              check=True, timeout=60).stdout

    secrets: dict[str, set[str]] = {}
    for who, tag in (("user", "user_encrypted_key"), ("ec2", "ec2_encrypted_key"),
                     ("user", "user_encrypted_iv"), ("ec2", "ec2_encrypted_iv")):
        encrypted = tmp_path / f"{tag}.bin"
        encrypted.write_bytes(bytes.fromhex(root.findtext(f"image/{tag}") or ""))
        plain = run("pkeyutl", "-decrypt", "-inkey", keys[who].key_path, "-in", encrypted,
                    "-pkeyopt", "rsa_padding_mode:pkcs1")
        secrets.setdefault(tag.split("_")[-1], set()).add(plain.decode())
    assert len(secrets["key"]) == 1 and len(secrets["iv"]) == 1
    hex_key, hex_iv = secrets["key"].pop(), secrets["iv"].pop()

    joined = tmp_path / "joined.enc"
    with open(joined, "wb") as handle:
        for part in root.iterfind("image/parts/part"):
            path = out / (part.findtext("filename") or "")
            line = run("dgst", "-sha1", "-r", path).decode()
            assert line.split()[0] == part.findtext("digest")
            handle.write(path.read_bytes())
    tgz = tmp_path / "image.tar.gz"
    run("enc", "-d", "-aes-128-cbc", "-K", hex_key, "-iv", hex_iv, "-in", joined, "-out", tgz)
    tar = gzip.decompress(tgz.read_bytes())
    assert hashlib.sha1(tar).hexdigest() == root.findtext("image/digest")
    assert _tar_member(tar)[1] == image.read_bytes()

    signed = tmp_path / "signed.txt"
    signed.write_bytes(ec2_bundle.signed_text(bundle.manifest_path.read_bytes()))
    signature = tmp_path / "signature.bin"
    signature.write_bytes(bytes.fromhex(root.findtext("signature") or ""))
    verified = run("dgst", "-sha1", "-verify", keys["user"].public_path, "-signature",
                   signature, signed)
    assert verified.strip() == b"Verified OK"
    # And a tampered manifest does not verify.
    signed.write_bytes(signed.read_bytes().replace(b"arm64", b"armhf"))
    proc = subprocess.run([openssl, "dgst", "-sha1", "-verify", str(keys["user"].public_path),
                           "-signature", str(signature), str(signed)], capture_output=True,
                          timeout=60)
    assert proc.returncode != 0


def test_bundle_streams_in_constant_memory(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    image = tmp_path / "big.raw"
    with open(image, "wb") as handle:
        handle.truncate(256 * MiB)
        handle.seek(100 * MiB)
        handle.write(os.urandom(24 * MiB))
    out = tmp_path / "bundle"
    out.mkdir()
    tracemalloc.start()
    try:
        bundle = ec2_bundle.build_bundle(
            image, out, "big", architecture="x86_64", account_id="123456789012",
            user_certificate=keys["user"].certificate, private_key=keys["user"].key,
            ec2_certificate=keys["ec2"].certificate, block_device_mappings={})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert bundle.image_size == 256 * MiB and len(bundle.parts) >= 3
    assert peak < 12 * MiB, f"bundling a 256 MiB image peaked at {peak / MiB:.1f} MiB"


def test_bundle_refuses_bad_keys(tmp_path: Path, keys: dict[str, KeyPair]) -> None:
    with pytest.raises(ConfigurationError, match=r"not a PEM X\.509 certificate"):
        ec2_bundle.load_certificate(keys["user"].key_path, "user certificate")
    with pytest.raises(ConfigurationError, match="private key") as caught:
        ec2_bundle.load_private_key(keys["user"].cert_path)
    assert "BEGIN" not in str(caught.value)
    with pytest.raises(ConfigurationError, match="cannot read"):
        ec2_bundle.load_private_key(tmp_path / "missing.key")


def _bundle_driver(keys: dict[str, KeyPair], standin: AWSStandIn | None = None,
                   **options: Any) -> EC2Format:
    return EC2Format(ex_mode="instance-store", ex_certificate=keys["user"].cert_path,
                     ex_private_key=keys["user"].key_path,
                     ex_ec2_certificate=keys["ec2"].cert_path, ex_account_id="123456789012",
                     ex_endpoint_url=standin.url if standin else None, **options)


def test_instance_store_needs_its_keys() -> None:
    with pytest.raises(ConfigurationError, match="ex_private_key, ex_account_id"):
        EC2Format(ex_mode="instance-store", ex_certificate="c", ex_ec2_certificate="e")


# -- conformance ---------------------------------------------------------------

class TestEC2RawConformance(FormatDriverConformance):
    @pytest.fixture
    def format_driver(self) -> FormatDriver:
        return EC2Format()

    def extract_raw(self, outputs: list[OutputFile], tmp_path: Path) -> Path | None:
        assert [o.role for o in outputs] == ["disk"]
        return outputs[0].path


class TestEC2VMDKConformance(FormatDriverConformance):
    @pytest.fixture
    def format_driver(self) -> FormatDriver:
        if shutil.which("qemu-img") is None:
            pytest.skip("qemu-img is not installed (apt-get install qemu-utils)")
        return EC2Format(ex_disk_format="vmdk")

    def extract_raw(self, outputs: list[OutputFile], tmp_path: Path) -> Path | None:
        raw = tmp_path / "back.raw"
        subprocess.run(["qemu-img", "convert", "-O", "raw", str(outputs[0].path), str(raw)],
                       check=True, timeout=120)
        return raw


class TestEC2BundleConformance(FormatDriverConformance):
    @pytest.fixture
    def format_driver(self, keys: dict[str, KeyPair]) -> FormatDriver:
        self.keys = keys
        return _bundle_driver(keys)

    def test_reproducible(self, format_driver: FormatDriver, manifest: Manifest,
                          config: RenderConfig, disk_image: DiskImage, tmp_path: Path) -> None:
        """Each bundle has a fresh random key: two runs must differ."""
        manifests = []
        for run in ("a", "b"):
            outputs = format_driver.convert(
                self._context(manifest, config, disk_image, tmp_path / run))
            assert outputs[0].role == "manifest"
            manifests.append(outputs[0].path.read_text())
        assert manifests[0] != manifests[1]

    def extract_raw(self, outputs: list[OutputFile], tmp_path: Path) -> Path | None:
        assert [o.role for o in outputs] == ["manifest"] + ["bundle-part"] * (len(outputs) - 1)
        raw = tmp_path / "unbundled.raw"
        raw.write_bytes(_tar_member(_open_bundle(outputs[0].path, self.keys).tar)[1])
        return raw


# -- the image facts -----------------------------------------------------------

@pytest.mark.parametrize(("arch", "expected"), [("x86_64", "x86_64"), ("amd64", "x86_64"),
                                                ("aarch64", "arm64"), ("arm64", "arm64"),
                                                ("i386", "i386")])
def test_architecture_mapping(arch: str, expected: str) -> None:
    assert ec2_architecture(_manifest(arch=arch).arch) == expected


def test_unsupported_architecture_and_firmware(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="riscv64"):
        EC2Format().convert(_context(tmp_path / "a", _manifest(arch="riscv64")))
    with pytest.raises(FormatError, match="UEFI only"):
        EC2Format().convert(_context(tmp_path / "b", _manifest(arch="aarch64", firmware="bios")))
    assert [boot_mode(f) for f in ("bios", "uefi", "both")] == \
        ["legacy-bios", "uefi", "uefi-preferred"]


def test_bad_options_are_refused() -> None:
    for options in ({"ex_mode": "ami"}, {"ex_disk_format": "qcow2"},
                    {"ex_root_device": "/dev/sdb"}, {"ex_poll_interval": 0}):
        with pytest.raises(ConfigurationError):
            EC2Format(**options)


# -- EBS path against the stand-in --------------------------------------------

def test_ebs_publish_registers_an_ami(tmp_path: Path, aws_standin: AWSStandIn, s3: Any,
                                      ec2: Any) -> None:
    aws_standin.import_polls = 2
    driver = EC2Format(ex_endpoint_url=aws_standin.url, **FAST)  # type: ignore[arg-type]
    context, published = _render(driver, tmp_path, s3)
    ami, snapshot = published.image_id, published.details["snapshot_id"]
    assert re.fullmatch(r"ami-[0-9a-f]+", ami) and re.fullmatch(r"snap-[0-9a-f]+", snapshot)
    # Our own poll loop ran until the task completed.
    assert aws_standin.calls.count("DescribeImportSnapshotTasks") == 3
    task = aws_standin.tasks[published.details["import_task_id"]]
    assert (task.bucket, task.key, task.disk_format) == (BUCKET, "renders/web-1.2.raw", "RAW")

    image = ec2.describe_images(ImageIds=[ami])["Images"][0]
    assert image["RootDeviceName"] == "/dev/xvda"
    assert image["RootDeviceType"] == "ebs"
    assert image["BlockDeviceMappings"][0]["DeviceName"] == "/dev/xvda"
    assert image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"] == snapshot
    assert image["BlockDeviceMappings"][0]["Ebs"]["VolumeType"] == "gp3"
    assert image["Architecture"] == "x86_64"
    assert image["VirtualizationType"] == "hvm"
    assert image["BootMode"] == "uefi-preferred"
    assert image["EnaSupport"] is True
    assert image["Name"].startswith("web-1.2-")
    tags = {t["Key"]: t["Value"] for t in image["Tags"]}
    expected = {"Name": "web-1.2", "cloudlets:name": "web", "cloudlets:version": "1.2",
                "cloudlets:digest": context.manifest.digest}
    assert tags == expected
    snap = ec2.describe_snapshots(SnapshotIds=[snapshot])["Snapshots"][0]
    assert {t["Key"]: t["Value"] for t in snap["Tags"]} == expected


def test_libcloud_reads_the_standin(tmp_path: Path, aws_standin: AWSStandIn, s3: Any) -> None:
    """The stand-in's namespace fix: libcloud's own parser sees the AMI."""
    driver = EC2Format(ex_endpoint_url=aws_standin.url, ex_root_device="/dev/sda1",
                       **FAST)  # type: ignore[arg-type]
    _, published = _render(driver, tmp_path, s3, _manifest(arch="aarch64", firmware="uefi",
                                                           ena=False))
    images = driver.ex_client().driver.list_images(ex_image_ids=[published.image_id])
    assert [i.id for i in images] == [published.image_id]
    assert images[0].extra["architecture"] == "arm64"
    assert images[0].extra["root_device_type"] == "ebs"
    mapping = images[0].extra["block_device_mapping"][0]
    assert mapping["device_name"] == "/dev/sda1"
    assert mapping["ebs"]["snapshot_id"] == published.details["snapshot_id"]


@pytest.mark.parametrize("disk_format", ["vmdk", "vhd"])
def test_ebs_publish_other_disk_formats(tmp_path: Path, aws_standin: AWSStandIn, s3: Any,
                                        ec2: Any, disk_format: str) -> None:
    if disk_format == "vmdk" and shutil.which("qemu-img") is None:
        pytest.skip("qemu-img is not installed (apt-get install qemu-utils)")
    driver = EC2Format(ex_endpoint_url=aws_standin.url, ex_disk_format=disk_format,
                       **FAST)  # type: ignore[arg-type]
    _, published = _render(driver, tmp_path, s3, _manifest(firmware="bios", ena=None))
    task = aws_standin.tasks[published.details["import_task_id"]]
    assert task.disk_format == disk_format.upper()
    assert task.key.endswith(f".{disk_format}")
    image = ec2.describe_images(ImageIds=[published.image_id])["Images"][0]
    assert image["BootMode"] == "legacy-bios"
    assert not image.get("EnaSupport")


def test_missing_object_fails_fast_with_the_task_message(tmp_path: Path,
                                                         aws_standin: AWSStandIn) -> None:
    context = _context(tmp_path)
    missing = StoredArtifact(role="disk", location=f"s3://{BUCKET}/renders/gone.raw", size=1,
                             sha256="0" * 64)
    driver = EC2Format(ex_endpoint_url=aws_standin.url, ex_poll_interval=0.05,
                       ex_poll_deadline=60)
    started = time.monotonic()
    with pytest.raises(FormatError, match=r"import task import-snap-\w+ failed \(deleted\): "
                                          r"ClientError: Disk validation failed") as caught:
        driver.publish(context, [missing], Boto3S3Storage(None))
    assert time.monotonic() - started < 5
    assert "s3://cloudlets-images/renders/gone.raw" in str(caught.value)
    assert "RegisterImage" not in aws_standin.calls


def test_wrong_disk_format_fails_with_the_task_message(tmp_path: Path, aws_standin: AWSStandIn,
                                                       s3: Any) -> None:
    context = _context(tmp_path)
    raw = EC2Format().convert(context)
    stored = _store(Boto3S3Storage(s3), raw)
    driver = EC2Format(ex_endpoint_url=aws_standin.url, ex_disk_format="vhd", **FAST)  # type: ignore[arg-type]
    with pytest.raises(FormatError, match="Unknown Image Format"):
        driver.publish(context, stored, Boto3S3Storage(s3))


def test_poll_deadline_cancels_the_task(tmp_path: Path, aws_standin: AWSStandIn,
                                        s3: Any) -> None:
    aws_standin.import_polls = None
    driver = EC2Format(ex_endpoint_url=aws_standin.url, ex_poll_interval=0.1,
                       ex_poll_deadline=0.6)
    started = time.monotonic()
    with pytest.raises(FormatError, match=r"did not complete within 0.6 s \(last status "
                                          r"active, converting\); it was cancelled"):
        _render(driver, tmp_path, s3)
    elapsed = time.monotonic() - started
    assert 0.6 <= elapsed < 10
    polls = aws_standin.calls.count("DescribeImportSnapshotTasks")
    assert 4 <= polls <= 9, polls
    assert aws_standin.calls[-1] == "CancelImportTask"
    assert [t.status for t in aws_standin.tasks.values()] == ["deleted"]


@pytest.mark.parametrize("action", ["ImportSnapshot", "DescribeImportSnapshotTasks",
                                    "RegisterImage", "CreateTags"])
def test_aws_errors_name_the_call_and_code(tmp_path: Path, aws_standin: AWSStandIn, s3: Any,
                                           action: str) -> None:
    aws_standin.fail_next(action, "UnauthorizedOperation",
                          "You are not authorized to perform this operation.", status=403)
    driver = EC2Format("testing", SECRET, ex_endpoint_url=aws_standin.url,
                       **FAST)  # type: ignore[arg-type]
    with pytest.raises(AWSError) as caught:
        _render(driver, tmp_path, s3)
    error = caught.value
    assert isinstance(error, CloudletsError)
    assert (error.service, error.action, error.code) == ("ec2", action, "UnauthorizedOperation")
    assert str(error) == (f"EC2 {action} failed: UnauthorizedOperation: "
                          "You are not authorized to perform this operation.")
    assert SECRET not in str(error) and SECRET not in repr(driver)


def test_throttled_polls_are_retried(tmp_path: Path, aws_standin: AWSStandIn, s3: Any) -> None:
    aws_standin.fail_next("DescribeImportSnapshotTasks", "RequestLimitExceeded",
                          "Request limit exceeded.", status=503)
    driver = EC2Format(ex_endpoint_url=aws_standin.url, **FAST)  # type: ignore[arg-type]
    _, published = _render(driver, tmp_path, s3)
    assert published.image_id.startswith("ami-")
    assert aws_standin.calls.count("DescribeImportSnapshotTasks") == 3


def test_register_needs_an_existing_root_snapshot(aws_standin: AWSStandIn) -> None:
    """The stand-in's RegisterImage checks the snapshot, as EC2 does."""
    client = EC2Format(ex_endpoint_url=aws_standin.url).ex_client()
    with pytest.raises(AWSError, match=r"RegisterImage failed: InvalidSnapshot\.NotFound"):
        client.call("RegisterImage", {
            "Name": "x", "RootDeviceName": "/dev/xvda", "Architecture": "x86_64",
            "BlockDeviceMapping.1.DeviceName": "/dev/xvda",
            "BlockDeviceMapping.1.Ebs.SnapshotId": "snap-0123456789abcdef0"})
    with pytest.raises(AWSError, match="InvalidBlockDeviceMapping"):
        client.call("RegisterImage", {"Name": "y", "RootDeviceName": "/dev/xvda"})


def test_duplicate_ami_name_is_an_aws_error(tmp_path: Path, aws_standin: AWSStandIn,
                                            s3: Any) -> None:
    driver = EC2Format(ex_endpoint_url=aws_standin.url, ex_image_name="web-fixed",
                       **FAST)  # type: ignore[arg-type]
    _render(driver, tmp_path / "a", s3)
    with pytest.raises(AWSError, match=r"EC2 RegisterImage failed: InvalidAMIName\.Duplicate"):
        _render(driver, tmp_path / "b", s3, prefix="again/")


def test_non_s3_storage_is_refused(tmp_path: Path, aws_standin: AWSStandIn) -> None:
    context = _context(tmp_path)
    local = StoredArtifact(role="disk", location="/srv/images/web-1.2.raw", size=1,
                           sha256="0" * 64)
    with pytest.raises(FormatError, match=r"needs its artifacts on S3 \(s3://bucket/key\)"):
        EC2Format(ex_endpoint_url=aws_standin.url).publish(context, [local],
                                                           Boto3S3Storage(None))
    assert aws_standin.calls == []


def test_unreachable_endpoint_names_the_call(tmp_path: Path, aws_standin: AWSStandIn) -> None:
    context = _context(tmp_path)
    stored = StoredArtifact(role="disk", location=f"s3://{BUCKET}/x.raw", size=1,
                            sha256="0" * 64)
    driver = EC2Format(ex_endpoint_url="http://127.0.0.1:9", ex_timeout=5)
    with pytest.raises(AWSError, match=r"EC2 ImportSnapshot failed: \w+: cannot reach "
                                       r"http://127.0.0.1:9"):
        driver.publish(context, [stored], Boto3S3Storage(None))


# -- endpoints and credentials ---------------------------------------------------

@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL_EC2", "AWS_ENDPOINT_URL"])
def test_endpoint_from_the_environment(tmp_path: Path, aws_standin: AWSStandIn, s3: Any,
                                       monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    monkeypatch.setenv(variable, aws_standin.url)
    if variable == "AWS_ENDPOINT_URL":
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # not EC2's
    _, published = _render(EC2Format(**FAST), tmp_path, s3)  # type: ignore[arg-type]
    assert published.image_id.startswith("ami-")


def test_endpoint_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"AWS_ENDPOINT_URL": "http://generic:1", "AWS_ENDPOINT_URL_EC2": "https://ec2.x:2/p"}
    endpoint = resolve_endpoint("ec2", environ=env)
    assert endpoint is not None
    assert (endpoint.host, endpoint.port, endpoint.secure, endpoint.path) == \
        ("ec2.x", 2, True, "/p")
    assert resolve_endpoint("s3", environ=env).host == "generic"  # type: ignore[union-attr]
    assert resolve_endpoint("ec2", "http://over:3", environ=env).host == "over"  # type: ignore[union-attr]
    assert resolve_endpoint("ec2", environ={}) is None
    with pytest.raises(ConfigurationError, match="not an http"):
        resolve_endpoint("ec2", "ftp://x", environ={})


def test_region_from_the_environment(tmp_path: Path, aws_standin: AWSStandIn, s3: Any,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")  # wins, as in the AWS SDKs
    driver = EC2Format("testing", "testing", ex_endpoint_url=aws_standin.url, **FAST)  # type: ignore[arg-type]
    assert driver.region == "eu-west-1"
    _, published = _render(driver, tmp_path, s3)
    assert published.details["region"] == "eu-west-1"

    def images(region: str) -> list[str]:
        client = boto3.client("ec2", endpoint_url=aws_standin.url, region_name=region,
                              aws_access_key_id="testing", aws_secret_access_key="testing")
        return [i["ImageId"] for i in client.describe_images()["Images"]]

    assert images("eu-west-1") == [published.image_id]
    assert images("us-east-1") == []
    assert EC2Format("k", "s", region="us-west-2").region == "us-west-2"


def test_explicit_endpoint_beats_the_environment(tmp_path: Path, aws_standin: AWSStandIn,
                                                 s3: Any,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", "http://127.0.0.1:9")
    driver = EC2Format(ex_endpoint_url=aws_standin.url, **FAST)  # type: ignore[arg-type]
    assert _render(driver, tmp_path, s3)[1].image_id.startswith("ami-")


def test_credentials_sources(tmp_path: Path) -> None:
    profile = tmp_path / "credentials"
    profile.write_text("[default]\naws_access_key_id = AKDEFAULT\n"
                       f"aws_secret_access_key = {SECRET}\n"
                       "[ci]\naws_access_key_id = AKCI\naws_secret_access_key = x\n"
                       "aws_session_token = tok\n")
    env = {"AWS_ACCESS_KEY_ID": "AKENV", "AWS_SECRET_ACCESS_KEY": "envsecret",
           "AWS_SESSION_TOKEN": "envtoken", "AWS_SHARED_CREDENTIALS_FILE": str(profile)}
    assert resolve_credentials("AKARG", "argsecret", environ=env) == \
        Credentials("AKARG", "argsecret", None, "arguments")
    found = resolve_credentials(environ=env)
    assert (found.key, found.token, found.source) == ("AKENV", "envtoken", "environment")
    found = resolve_credentials(environ={"AWS_SHARED_CREDENTIALS_FILE": str(profile)})
    assert (found.key, found.secret, found.source) == ("AKDEFAULT", SECRET, "profile default")
    assert SECRET not in repr(found)
    found = resolve_credentials(profile="ci", environ=env)
    assert (found.key, found.token) == ("AKCI", "tok")
    found = resolve_credentials(environ={"AWS_PROFILE": "ci",
                                         "AWS_SHARED_CREDENTIALS_FILE": str(profile)})
    assert found.key == "AKCI"
    with pytest.raises(ConfigurationError, match=r"no AWS credentials.*\[nope\]"):
        resolve_credentials(profile="nope", environ=env)
    with pytest.raises(ConfigurationError, match="both a key and a secret"):
        resolve_credentials("AKONLY", environ={})
    with pytest.raises(ConfigurationError) as caught:
        resolve_credentials(environ={"AWS_ACCESS_KEY_ID": "AK",
                                     "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")})
    assert "set together" in str(caught.value)


def test_profile_credentials_reach_ec2_and_are_never_logged(
        tmp_path: Path, aws_standin: AWSStandIn, s3: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    profile = tmp_path / "credentials"
    profile.write_text(f"[render]\naws_access_key_id = AKRENDER\n"
                       f"aws_secret_access_key = {SECRET}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(profile))
    caplog.set_level(logging.DEBUG)
    driver = EC2Format(ex_profile="render", ex_endpoint_url=aws_standin.url,
                       **FAST)  # type: ignore[arg-type]
    _, published = _render(driver, tmp_path / "r", s3)
    assert published.image_id.startswith("ami-")
    assert "EC2 import task" in caplog.text
    assert SECRET not in caplog.text


# -- instance-store path against the stand-in ----------------------------------

def test_instance_store_publish_registers_the_manifest(tmp_path: Path, keys: dict[str, KeyPair],
                                                       aws_standin: AWSStandIn, s3: Any,
                                                       ec2: Any) -> None:
    driver = _bundle_driver(keys, aws_standin)
    context, published = _render(driver, tmp_path, s3, _manifest(firmware="uefi"))
    location = f"{BUCKET}/renders/web-1.2.manifest.xml"
    assert published.details["image_location"] == location
    image = ec2.describe_images(ImageIds=[published.image_id])["Images"][0]
    assert image["ImageLocation"] == location
    assert image["RootDeviceType"] == "instance-store"
    assert (image["Architecture"], image["BootMode"]) == ("x86_64", "uefi")
    assert {t["Key"]: t["Value"] for t in image["Tags"]}["cloudlets:digest"] == \
        context.manifest.digest
    # What landed on S3 decrypts back to the disk.
    download = tmp_path / "download"
    download.mkdir()
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix="renders/")["Contents"]
    for item in listing:
        s3.download_file(BUCKET, item["Key"], str(download / item["Key"].split("/")[-1]))
    opened = _open_bundle(download / "web-1.2.manifest.xml", keys)
    assert _tar_member(opened.tar)[1] == context.disk.path.read_bytes()


def test_instance_store_refuses_renamed_parts(tmp_path: Path, keys: dict[str, KeyPair],
                                              aws_standin: AWSStandIn, s3: Any) -> None:
    driver = _bundle_driver(keys, aws_standin)
    context = _context(tmp_path)
    storage = Boto3S3Storage(s3)
    outputs = driver.convert(context)
    stored = [storage.upload(o.path, f"s3://{BUCKET}/x/other{o.name[len('web-1.2'):]}",
                             role=o.role) for o in outputs]
    with pytest.raises(FormatError, match="lists parts"):
        driver.publish(context, stored, storage)
    assert aws_standin.calls == []


def test_register_checks_the_bundle_manifest_exists(tmp_path: Path, keys: dict[str, KeyPair],
                                                    aws_standin: AWSStandIn, s3: Any) -> None:
    """The stand-in refuses a manifest that is not on S3, as EC2 does."""
    driver = _bundle_driver(keys, aws_standin)
    context = _context(tmp_path)
    outputs = driver.convert(context)
    storage = Boto3S3Storage(s3)
    stored = _store(storage, outputs)
    s3.delete_object(Bucket=BUCKET, Key="renders/web-1.2.part.00")
    with pytest.raises(AWSError, match="RegisterImage failed: InvalidManifest: bundle part"):
        driver.publish(context, stored, storage)


# -- end to end ----------------------------------------------------------------

@pytest.fixture
def boot_cloudlet() -> Iterator[Any]:
    from cloudlets.testing import boot as bootfixture

    try:
        yield bootfixture.build_boot_cloudlet()
    except bootfixture.FixtureUnavailable as exc:
        pytest.skip(f"cannot build the boot cloudlet: {exc}")


@pytest.mark.slow
def test_render_to_an_ami(tmp_path: Path, aws_standin: AWSStandIn, s3: Any, ec2: Any,
                          boot_cloudlet: Any) -> None:
    """Renderer → S3Storage → EC2Format → an AMI DescribeImages shows."""
    from cloudlets import Renderer
    from cloudlets.errors import StageNotAvailableError

    try:
        from cloudlets.drivers.storage.s3 import S3Storage  # type: ignore[import-not-found]
    except ImportError:
        pytest.skip("S3Storage (cloudlets.drivers.storage.s3) is not committed yet")
    manifest = {
        "name": "bootlet", "version": "1.0", "arch": "x86_64",
        "filesystem": {"url": boot_cloudlet.tarball.as_uri(), "sha256": boot_cloudlet.sha256},
        "boot": {"kernel": boot_cloudlet.kernel, "initrd": boot_cloudlet.initrd,
                 "cmdline": "console=ttyS0", "firmware": "bios"},
        "hardware": {"ena": True},
    }
    storage = S3Storage("testing", "testing", ex_endpoint_url=aws_standin.url)
    driver = EC2Format("testing", "testing", ex_endpoint_url=aws_standin.url, **FAST)  # type: ignore[arg-type]
    renderer = Renderer(cache_dir=tmp_path / "cache", work_dir=tmp_path / "work",
                        ex_allow_file_urls=True)
    try:
        result = renderer.render(manifest, f"s3://{BUCKET}/prefix/", storage=storage,
                                 format=driver, config={"hostname": "bootlet"})
    except StageNotAvailableError as exc:
        pytest.skip(f"the render pipeline is not wired end to end yet: {exc}")
    assert result.image_id.startswith("ami-")
    image = ec2.describe_images(ImageIds=[result.image_id])["Images"][0]
    snapshot = image["BlockDeviceMappings"][0]["Ebs"]["SnapshotId"]
    assert snapshot == result.details["publish"]["snapshot_id"]
    assert image["Architecture"] == "x86_64" and image["BootMode"] == "legacy-bios"
    tags = {t["Key"]: t["Value"] for t in image["Tags"]}
    assert tags["cloudlets:name"] == "bootlet" and tags["cloudlets:version"] == "1.0"
    assert tags["cloudlets:digest"] == result.manifest_digest
    task = aws_standin.tasks[result.details["publish"]["import_task_id"]]
    assert (task.bucket, task.key) == (BUCKET, "prefix/bootlet-1.0.raw")


@pytest.mark.slow
def test_cli_prints_the_ami_id(tmp_path: Path, aws_standin: AWSStandIn, s3: Any, ec2: Any,
                               boot_cloudlet: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``cloudlets render --format ec2 --storage s3``: endpoints and credentials
    from the environment, the AMI id on stdout (human and --json)."""
    import io
    import json

    from cloudlets.cli import main

    for name, value in {"AWS_ENDPOINT_URL": aws_standin.url, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": SECRET,
                        "CLOUDLETS_CACHE_DIR": str(tmp_path / "cache"),
                        "CLOUDLETS_HOME": str(tmp_path / "home")}.items():
        monkeypatch.setenv(name, value)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({
        "name": "clilet", "version": "2.0", "arch": "x86_64",
        "filesystem": {"url": boot_cloudlet.tarball.as_uri(), "sha256": boot_cloudlet.sha256},
        "boot": {"kernel": boot_cloudlet.kernel, "initrd": boot_cloudlet.initrd,
                 "cmdline": "console=ttyS0", "firmware": "uefi"},
    }))

    def render(*extra: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = main(["render", str(manifest), "--format", "ec2", "--storage", "s3",
                     "--allow-file-urls", "-F", "ex_poll_interval=0.05",
                     "-F", "ex_poll_deadline=20", *extra], out=out, err=err)
        return code, out.getvalue(), err.getvalue()

    code, out, err = render("--output", f"s3://{BUCKET}/json/", "-F", "ex_image_name=cli-json",
                            "--json")
    assert code == 0, err
    ami = json.loads(out)["image_id"]
    assert ami.startswith("ami-")
    code, out, err = render("--output", f"s3://{BUCKET}/human/", "-F", "ex_image_name=cli-text")
    assert code == 0, err
    human = re.search(r"image (ami-[0-9a-f]+)", out)
    assert human is not None and human.group(1) != ami
    images = {i["ImageId"]: i for i in ec2.describe_images()["Images"]}
    assert images[ami]["Name"] == "cli-json" and images[ami]["BootMode"] == "uefi"
    assert images[human.group(1)]["Name"] == "cli-text"
    assert SECRET not in out + err
