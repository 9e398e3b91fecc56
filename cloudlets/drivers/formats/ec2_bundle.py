"""The EC2 instance-store ("S3-backed") image bundle, as ``ec2-bundle-image``
and euca2ools write it (manifest version ``2007-10-10``).

The image file goes into a one-member tar; the tar is gzipped, encrypted
with AES-128-CBC under a fresh random key and IV (PKCS#7 padding, as
``openssl enc``), and split into parts of :data:`PART_SIZE` bytes. The
``manifest.xml`` beside the parts carries:

* the SHA1 of the unencrypted tar (``image/digest``) and of every part;
* the key and IV, each as its hex string, encrypted with RSA PKCS#1 v1.5
  once for the EC2 certificate (``ec2_encrypted_*``, so EC2 can unbundle)
  and once for the user's certificate (``user_encrypted_*``);
* an RSA-SHA1 PKCS#1 v1.5 signature, by the user's private key, over the
  serialized ``machine_configuration`` element followed by the serialized
  ``image`` element, exactly as they appear in the file.

Everything streams: memory use does not depend on the image size. The key
and IV are random per bundle, so two bundles of one image differ.
"""

from __future__ import annotations

import binascii
import hashlib
import os
import tarfile
import xml.etree.ElementTree as ET
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

from cloudlets.errors import ConfigurationError, FormatError
from cloudlets.progress import PartProgress

__all__ = [
    "CHUNK_SIZE",
    "PART_SIZE",
    "Bundle",
    "BundlePart",
    "build_bundle",
    "load_certificate",
    "load_private_key",
    "signed_text",
]

#: Bytes per bundle part (the last part may be shorter).
PART_SIZE = 10 * 1024 * 1024
#: Bytes read from the image at a time.
CHUNK_SIZE = 1024 * 1024
#: The manifest format version EC2 understands.
MANIFEST_VERSION = "2007-10-10"
#: Digest and cipher names as the manifest spells them.
DIGEST_ALGORITHM = "SHA1"
CIPHER_ALGORITHM = "AES-128-CBC"


@dataclass(frozen=True)
class BundlePart:
    """One encrypted part.

    :ivar filename: its name, as the manifest lists it.
    :ivar path: where it was written.
    :ivar size: its length in bytes.
    :ivar sha1: hex SHA1 of its bytes.
    """

    filename: str
    path: Path
    size: int
    sha1: str


@dataclass(frozen=True)
class Bundle:
    """A written bundle.

    :ivar manifest_path: the ``PREFIX.manifest.xml`` file.
    :ivar parts: the parts, in order.
    :ivar image_size: bytes of the bundled image file.
    :ivar image_sha1: hex SHA1 of the unencrypted tar.
    :ivar bundled_size: total bytes of all parts.
    """

    manifest_path: Path
    parts: tuple[BundlePart, ...]
    image_size: int
    image_sha1: str
    bundled_size: int


def _read_pem(source: Path | str | bytes, what: str) -> bytes:
    if isinstance(source, bytes):
        return source
    text = str(source)
    if text.lstrip().startswith("-----BEGIN"):
        return text.encode()
    try:
        return Path(text).expanduser().read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read the {what} {text}: {exc.strerror}") from None


def load_certificate(source: Path | str | bytes, what: str = "certificate") -> Any:
    """Load an X.509 certificate with an RSA public key.

    :param source: a PEM file path, PEM text or PEM bytes.
    :param what: how messages name it (``EC2 certificate``).
    :returns: a :class:`cryptography.x509.Certificate`.
    :raises ConfigurationError: when it is unreadable or not RSA.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import rsa

    data = _read_pem(source, what)
    try:
        certificate = x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ConfigurationError(f"the {what} is not a PEM X.509 certificate") from None
    if not isinstance(certificate.public_key(), rsa.RSAPublicKey):
        raise ConfigurationError(f"the {what} does not hold an RSA public key")
    return certificate


def load_private_key(source: Path | str | bytes, password: bytes | None = None) -> Any:
    """Load the user's RSA private key (PEM, PKCS#1 or PKCS#8).

    :param source: a PEM file path, PEM text or PEM bytes.
    :param password: its passphrase, if it is encrypted.
    :returns: a :class:`cryptography.hazmat.primitives.asymmetric.rsa.RSAPrivateKey`.
    :raises ConfigurationError: when it is unreadable or not RSA (the
        message never quotes the key).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    data = _read_pem(source, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError):
        raise ConfigurationError("the private key is not a PEM RSA private key, or its "
                                 "passphrase is wrong") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ConfigurationError("the private key is not an RSA key")
    return key


class _PartWriter:
    """Splits a byte stream into numbered part files, hashing each."""

    def __init__(self, directory: Path, prefix: str, part_size: int) -> None:
        self.directory = directory
        self.prefix = prefix
        self.part_size = part_size
        self.parts: list[BundlePart] = []
        self.total = 0
        self._handle: IO[bytes] | None = None
        self._hash: Any = None
        self._size = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._handle is None:
                self._open()
            assert self._handle is not None
            room = self.part_size - self._size
            piece = view[:room]
            self._handle.write(piece)
            self._hash.update(piece)
            self._size += len(piece)
            self.total += len(piece)
            view = view[len(piece):]
            if self._size == self.part_size:
                self._close()

    def finish(self) -> tuple[BundlePart, ...]:
        if self._handle is not None:
            self._close()
        return tuple(self.parts)

    def _open(self) -> None:
        name = f"{self.prefix}.part.{len(self.parts):02d}"
        self._handle = open(self.directory / name, "wb")  # noqa: SIM115 - closed in _close
        self._hash = hashlib.sha1()
        self._size = 0

    def _close(self) -> None:
        assert self._handle is not None
        path = Path(self._handle.name)
        self._handle.close()
        self._handle = None
        self.parts.append(BundlePart(filename=path.name, path=path, size=self._size,
                                     sha1=self._hash.hexdigest()))


class _Pipeline:
    """tar bytes → SHA1 → gzip → AES-128-CBC → parts."""

    #: gzip compression level.
    LEVEL: ClassVar[int] = 6

    def __init__(self, key: bytes, iv: bytes, parts: _PartWriter) -> None:
        from cryptography.hazmat.primitives import padding
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        self.tar_sha1: Any = hashlib.sha1()
        # wbits 31: a gzip member with a zero mtime and no file name.
        self._gzip = zlib.compressobj(self.LEVEL, zlib.DEFLATED, 31)
        self._encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        self._padder = padding.PKCS7(128).padder()
        self._parts = parts

    def write(self, data: bytes) -> None:
        self.tar_sha1.update(data)
        self._encrypt(self._gzip.compress(data))

    def close(self) -> None:
        self._encrypt(self._gzip.flush())
        self._parts.write(self._encryptor.update(self._padder.finalize())
                          + self._encryptor.finalize())

    def _encrypt(self, data: bytes) -> None:
        if data:
            self._parts.write(self._encryptor.update(self._padder.update(data)))


def _tar_stream(image: Path, member: str, mtime: int, sink: _Pipeline,
                progress: PartProgress | None = None) -> int:
    """Write a one-member GNU tar of ``image`` into ``sink``.

    :returns: the image size.
    """
    size = image.stat().st_size
    info = tarfile.TarInfo(member)
    info.size = size
    info.mode = 0o644
    info.mtime = mtime
    info.uname = info.gname = "root"
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    sink.write(header)
    written = len(header)
    copied = 0
    with open(image, "rb") as handle:
        while chunk := handle.read(CHUNK_SIZE):
            copied += len(chunk)
            sink.write(chunk)
            if progress is not None:
                progress(copied, size)
    if copied != size:
        raise FormatError(f"{image} changed size while it was bundled")
    written += copied
    remainder = written % tarfile.BLOCKSIZE
    if remainder:
        sink.write(bytes(tarfile.BLOCKSIZE - remainder))
        written += tarfile.BLOCKSIZE - remainder
    trailer = 2 * tarfile.BLOCKSIZE
    written += trailer
    record_pad = -written % tarfile.RECORDSIZE
    sink.write(bytes(trailer + record_pad))
    return size


def _rsa_encrypt_hex(certificate: Any, data: bytes) -> str:
    from cryptography.hazmat.primitives.asymmetric import padding

    return binascii.hexlify(certificate.public_key().encrypt(data, padding.PKCS1v15())).decode()


def _sub(parent: ET.Element, tag: str, text: str | None = None,
         **attributes: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attributes)
    if text is not None:
        element.text = text
    return element


def signed_text(manifest: bytes | str) -> bytes:
    """The bytes a bundle manifest's signature covers: the serialized
    ``machine_configuration`` element followed by the ``image`` element.

    :param manifest: the manifest document.
    :raises FormatError: when the document lacks either element.
    """
    root = ET.fromstring(manifest)
    pieces = []
    for tag in ("machine_configuration", "image"):
        element = root.find(tag)
        if element is None:
            raise FormatError(f"bundle manifest has no <{tag}> element")
        element.tail = None
        pieces.append(ET.tostring(element, encoding="unicode"))
    return "".join(pieces).encode()


def build_bundle(image: Path, directory: Path, prefix: str, *, architecture: str,
                 account_id: str, user_certificate: Any, private_key: Any,
                 ec2_certificate: Any, block_device_mappings: Mapping[str, str],
                 kernel_id: str | None = None, ramdisk_id: str | None = None,
                 bundler: tuple[str, str] = ("cloudlets", "0"), mtime: int = 0,
                 part_size: int = PART_SIZE, progress: PartProgress | None = None) -> Bundle:
    """Bundle ``image`` into ``directory`` as ``PREFIX.part.NN`` files and
    ``PREFIX.manifest.xml``.

    :param image: the image file (a raw disk for an HVM image).
    :param directory: where to write the parts and the manifest.
    :param prefix: the file name stem; also the tar member's name.
    :param architecture: ``x86_64``, ``i386`` or ``arm64``.
    :param account_id: the AWS account id (12 digits, dashes dropped).
    :param user_certificate: the user's certificate (:func:`load_certificate`).
    :param private_key: the user's private key (:func:`load_private_key`).
    :param ec2_certificate: the cloud's certificate.
    :param block_device_mappings: virtual name → device (``ami`` → ``sda1``,
        ``root`` → ``/dev/sda1``).
    :param kernel_id: an AKI, for paravirtual images.
    :param ramdisk_id: an ARI, for paravirtual images.
    :param bundler: name and version recorded in ``<bundler>``.
    :param mtime: the tar member's modification time.
    :param part_size: bytes per part.
    :param progress: called as ``progress(done, total)`` as ``done`` bytes
        of the image's ``total`` are bundled.
    :returns: the bundle.
    :raises FormatError: when the image cannot be read or written.
    """
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    account = account_id.replace("-", "")
    if not account.isdigit():
        raise ConfigurationError("the AWS account id must be 12 digits (dashes allowed)")
    key, iv = os.urandom(16), os.urandom(16)
    writer = _PartWriter(directory, prefix, part_size)
    pipeline = _Pipeline(key, iv, writer)
    try:
        image_size = _tar_stream(image, prefix, mtime, pipeline, progress)
        pipeline.close()
        parts = writer.finish()
    except OSError as exc:
        raise FormatError(f"cannot bundle {image}: {exc.strerror or exc}") from None

    configuration = ET.Element("machine_configuration")
    _sub(configuration, "architecture", architecture)
    if kernel_id:
        _sub(configuration, "kernel_id", kernel_id)
    if ramdisk_id:
        _sub(configuration, "ramdisk_id", ramdisk_id)
    if block_device_mappings:
        mappings = _sub(configuration, "block_device_mapping")
        for virtual, device in sorted(block_device_mappings.items()):
            mapping = _sub(mappings, "mapping")
            _sub(mapping, "virtual", virtual)
            _sub(mapping, "device", device)

    hex_key, hex_iv = key.hex().encode(), iv.hex().encode()
    image_element = ET.Element("image")
    _sub(image_element, "name", prefix)
    _sub(image_element, "user", account)
    _sub(image_element, "type", "machine")
    _sub(image_element, "digest", pipeline.tar_sha1.hexdigest(), algorithm=DIGEST_ALGORITHM)
    _sub(image_element, "size", str(image_size))
    _sub(image_element, "bundled_size", str(writer.total))
    _sub(image_element, "ec2_encrypted_key", _rsa_encrypt_hex(ec2_certificate, hex_key),
         algorithm=CIPHER_ALGORITHM)
    _sub(image_element, "user_encrypted_key", _rsa_encrypt_hex(user_certificate, hex_key),
         algorithm=CIPHER_ALGORITHM)
    _sub(image_element, "ec2_encrypted_iv", _rsa_encrypt_hex(ec2_certificate, hex_iv))
    _sub(image_element, "user_encrypted_iv", _rsa_encrypt_hex(user_certificate, hex_iv))
    parts_element = _sub(image_element, "parts", count=str(len(parts)))
    for index, part in enumerate(parts):
        part_element = _sub(parts_element, "part", index=str(index))
        _sub(part_element, "filename", part.filename)
        _sub(part_element, "digest", part.sha1, algorithm=DIGEST_ALGORITHM)

    # Serialized without whitespace between elements, so the signed bytes
    # are literally a substring of the file.
    configuration_xml = ET.tostring(configuration, encoding="unicode")
    image_xml = ET.tostring(image_element, encoding="unicode")
    signature = private_key.sign((configuration_xml + image_xml).encode(),
                                 padding.PKCS1v15(), hashes.SHA1())
    head = ET.Element("manifest")
    _sub(head, "version", MANIFEST_VERSION)
    bundler_element = _sub(head, "bundler")
    _sub(bundler_element, "name", bundler[0])
    _sub(bundler_element, "version", bundler[1])
    _sub(bundler_element, "release", "0")
    head_xml = ET.tostring(head, encoding="unicode").removesuffix("</manifest>")
    document = (f'<?xml version="1.0" encoding="UTF-8"?>\n{head_xml}{configuration_xml}'
                f"{image_xml}<signature>{signature.hex()}</signature></manifest>\n")
    manifest_path = directory / f"{prefix}.manifest.xml"
    manifest_path.write_text(document, encoding="utf-8")
    return Bundle(manifest_path=manifest_path, parts=parts, image_size=image_size,
                  image_sha1=pipeline.tar_sha1.hexdigest(), bundled_size=writer.total)
