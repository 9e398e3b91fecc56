"""The OpenSSH signature format (SSHSIG): what ``ssh-keygen -Y sign`` writes
and ``ssh-keygen -Y verify`` checks (OpenSSH's ``PROTOCOL.sshsig``).

Signing and verifying are written here over the ``cryptography`` core
dependency, which does the cryptography and reads the keys; this module
does only the wire format. The ``sshsig`` package on PyPI verifies but does
not sign, and ``cloudlets sign`` must write what ``ssh-keygen -Y verify``
accepts, so one implementation serves both directions.

Keys: ``ssh-ed25519``, ``ecdsa-sha2-nistp256``/``384``/``521`` and RSA
(signed ``rsa-sha2-512``; ``rsa-sha2-256`` verified too, SHA-1 ``ssh-rsa``
refused as OpenSSH refuses it). Every parse of a signature is bounded and
fails with :class:`~cloudlets.errors.SignatureError` naming the reason.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from cloudlets.errors import SignatureError

__all__ = [
    "MAX_SIGNATURE_BYTES",
    "NAMESPACE",
    "PrivateKey",
    "PublicKey",
    "SshSignature",
    "fingerprint",
    "load_private_key",
    "parse_public_key",
    "public_key_blob",
    "sign",
]

#: The namespace of a manifest signature (``ssh-keygen -Y sign -n``).
NAMESPACE = "cloudlets-manifest"
#: Largest armored signature read: an RSA-16384 signature is some 5 KiB.
MAX_SIGNATURE_BYTES = 64 * 1024
#: Largest key file read.
MAX_KEY_BYTES = 64 * 1024

PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey
PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_MAGIC = b"SSHSIG"
_VERSION = 1
_BEGIN = b"-----BEGIN SSH SIGNATURE-----"
_END = b"-----END SSH SIGNATURE-----"
_HASHES: dict[str, Callable[[bytes], Any]] = {"sha256": hashlib.sha256,
                                              "sha512": hashlib.sha512}
_CURVES: dict[str, tuple[type[ec.EllipticCurve], hashes.HashAlgorithm]] = {
    "ecdsa-sha2-nistp256": (ec.SECP256R1, hashes.SHA256()),
    "ecdsa-sha2-nistp384": (ec.SECP384R1, hashes.SHA384()),
    "ecdsa-sha2-nistp521": (ec.SECP521R1, hashes.SHA512()),
}
_RSA_SIGNATURES: dict[str, hashes.HashAlgorithm] = {"rsa-sha2-512": hashes.SHA512(),
                                                    "rsa-sha2-256": hashes.SHA256()}
#: Key types accepted, as their public key blobs name them.
KEY_TYPES = frozenset({"ssh-ed25519", "ssh-rsa", *_CURVES})
#: RSA keys shorter than this are refused, as OpenSSH refuses them.
MIN_RSA_BITS = 2048


class _Reader:
    """Reads SSH wire types from a bounded buffer; every short read or
    trailing byte is a :class:`SignatureError`."""

    def __init__(self, data: bytes, what: str, source: str | None) -> None:
        self.data, self.pos, self.what, self.source = data, 0, what, source

    def fail(self, message: str) -> SignatureError:
        return SignatureError(f"malformed {self.what}: {message}", "malformed", self.source)

    def raw(self, count: int) -> bytes:
        if count > len(self.data) - self.pos:
            raise self.fail("truncated")
        chunk = self.data[self.pos:self.pos + count]
        self.pos += count
        return chunk

    def uint32(self) -> int:
        value: int = struct.unpack(">I", self.raw(4))[0]
        return value

    def string(self) -> bytes:
        return self.raw(self.uint32())

    def text(self) -> str:
        value = self.string()
        try:
            return value.decode("ascii")
        except UnicodeDecodeError:
            raise self.fail("a name is not ASCII") from None

    def mpint(self) -> int:
        value = self.string()
        if value and value[0] & 0x80:
            raise self.fail("negative integer")
        return int.from_bytes(value, "big")

    def end(self) -> None:
        if self.pos != len(self.data):
            raise self.fail(f"{len(self.data) - self.pos} bytes after the end")


def _string(value: bytes | str) -> bytes:
    data = value.encode("ascii") if isinstance(value, str) else value
    return struct.pack(">I", len(data)) + data


def _mpint(value: int) -> bytes:
    data = value.to_bytes((value.bit_length() + 8) // 8, "big") if value else b""
    return _string(data)


# -- keys ---------------------------------------------------------------------

def public_key_blob(key: PublicKey | PrivateKey) -> bytes:
    """:returns: the key's SSH wire encoding (a ``.pub`` line's base64)."""
    public = key.public_key() if not isinstance(key, PublicKey) else key
    line = public.public_bytes(serialization.Encoding.OpenSSH,
                               serialization.PublicFormat.OpenSSH)
    return base64.b64decode(line.split()[1])


def fingerprint(blob: bytes) -> str:
    """The key's fingerprint as ``ssh-keygen -l`` prints it.

    :returns: ``SHA256:`` and the unpadded base64 of the blob's sha256.
    """
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def key_type(blob: bytes, source: str | None = None) -> str:
    """:returns: the key type a public key blob names.
    :raises SignatureError: for a malformed blob."""
    return _Reader(blob, "public key", source).text()


def parse_public_key(blob: bytes, source: str | None = None) -> PublicKey:
    """Decode an SSH public key blob.

    :param blob: the key in SSH wire encoding.
    :param source: where it came from, for messages.
    :returns: the key.
    :raises SignatureError: a malformed blob (``malformed``), a key type
        cloudlets does not accept or an RSA key under 2048 bits
        (``algorithm``).
    """
    name = key_type(blob, source)
    if name not in KEY_TYPES:
        raise SignatureError(f"key type {name!r} is not accepted (accepted: "
                             f"{', '.join(sorted(KEY_TYPES))})", "algorithm", source)
    try:
        key = serialization.load_ssh_public_key(
            name.encode() + b" " + base64.b64encode(blob))
    except (ValueError, UnsupportedAlgorithm):
        raise SignatureError(f"malformed {name} public key", "malformed", source) from None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise SignatureError(f"RSA key of {key.key_size} bits is too short "
                             f"(at least {MIN_RSA_BITS})", "algorithm", source)
    if not isinstance(key, PublicKey):
        raise SignatureError(f"key type {name!r} is not accepted", "algorithm", source)
    return key


def parse_public_line(line: str, source: str | None = None) -> bytes:
    """Decode ``TYPE BASE64 [COMMENT]`` (a ``.pub`` file, an
    ``allowed_signers`` key) into its blob, checking the type matches.

    :returns: the key's canonical blob (as cryptography re-encodes it), so
        that a key is compared and fingerprinted the same however it was
        encoded.

    :raises SignatureError: ``malformed`` or ``algorithm``.
    """
    parts = line.split(None, 2)
    if len(parts) < 2:
        raise SignatureError("expected 'TYPE BASE64' for a public key", "malformed", source)
    blob = _b64(parts[1].encode("ascii", "replace"), "public key", source)
    if key_type(blob, source) != parts[0]:
        raise SignatureError(f"the key says {parts[0]!r} but its data is a "
                             f"{key_type(blob, source)!r} key", "malformed", source)
    return public_key_blob(parse_public_key(blob, source))  # canonical: one key, one blob


def load_private_key(source: str | Path | bytes, password: bytes | None = None) -> PrivateKey:
    """Read a private key: OpenSSH (``ssh-keygen``) or PEM (``openssl
    genpkey``, PKCS#8 or traditional).

    :param source: a path, or the key file's bytes.
    :param password: the key's passphrase, when it is encrypted.
    :returns: the key (Ed25519, ECDSA or RSA).
    :raises SignatureError: (``key``) the file cannot be read, is encrypted
        without a passphrase, or holds another kind of key. The message
        never quotes the key.
    """
    where = None if isinstance(source, bytes) else str(source)
    data = source if isinstance(source, bytes) else read_bounded(
        Path(source), MAX_KEY_BYTES, "private key", "key")
    try:
        if b"BEGIN OPENSSH PRIVATE KEY" in data:
            key: Any = serialization.load_ssh_private_key(data, password)
        else:
            key = serialization.load_pem_private_key(data, password)
    except TypeError:
        problem = ("the key is encrypted: give its passphrase" if password is None
                   else "the key is not encrypted, but a passphrase was given")
        raise SignatureError(problem, "key", where) from None
    except UnsupportedAlgorithm as exc:
        if "bcrypt" in str(exc):
            raise SignatureError("encrypted OpenSSH keys need the bcrypt package (pip install "
                                 "bcrypt), or sign with ssh-keygen -Y sign", "key",
                                 where) from None
        raise SignatureError("not a private key cloudlets can read: UnsupportedAlgorithm",
                             "key", where) from None
    except ValueError as exc:
        hint = " (wrong passphrase?)" if password is not None else ""
        raise SignatureError(f"not a private key cloudlets can read{hint}: "
                             f"{type(exc).__name__}", "key", where) from None
    if not isinstance(key, PrivateKey):
        raise SignatureError(f"{type(key).__name__} keys are not accepted "
                             "(Ed25519, ECDSA or RSA)", "key", where)
    return key


def read_bounded(path: Path, limit: int, what: str, reason: str) -> bytes:
    """:returns: the bytes of a small file.
    :raises SignatureError: with ``reason``, when it cannot be read or
        exceeds ``limit`` bytes."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise SignatureError(f"cannot read the {what}: {exc.strerror or type(exc).__name__}",
                             reason, str(path)) from None
    if len(data) > limit:
        raise SignatureError(f"the {what} is larger than {limit} bytes", reason, str(path))
    return data


def _b64(data: bytes, what: str, source: str | None) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"malformed {what}: not base64", "malformed", source) from None


# -- signatures ---------------------------------------------------------------

@dataclass(frozen=True)
class SshSignature:
    """A parsed SSHSIG signature (not yet verified).

    :ivar public_key: the signer's public key blob.
    :ivar namespace: what the signer said the signature is for.
    :ivar hash_algorithm: ``sha256`` or ``sha512``: how the message was hashed.
    :ivar algorithm: the signature algorithm (``ssh-ed25519``, ``rsa-sha2-512``...).
    :ivar signature: the raw signature bytes of that algorithm.
    """

    public_key: bytes
    namespace: str
    hash_algorithm: str
    algorithm: str
    signature: bytes

    @property
    def fingerprint(self) -> str:
        """The signer key's ``SHA256:`` fingerprint."""
        return fingerprint(self.public_key)

    @property
    def key_type(self) -> str:
        """The signer key's type (``ssh-ed25519``...)."""
        return key_type(self.public_key)

    @classmethod
    def parse(cls, armored: bytes | str, source: str | None = None) -> SshSignature:
        """Parse an armored signature (``-----BEGIN SSH SIGNATURE-----``).

        :param armored: the ``.sig`` file's content.
        :param source: where it came from, for messages.
        :raises SignatureError: (``malformed``) anything but one well-formed
            SSHSIG version 1 signature of at most
            :data:`MAX_SIGNATURE_BYTES`.
        """
        data = armored.encode("ascii", "replace") if isinstance(armored, str) else armored
        if len(data) > MAX_SIGNATURE_BYTES:
            raise SignatureError(f"signature larger than {MAX_SIGNATURE_BYTES} bytes",
                                 "malformed", source)
        lines = [line.strip() for line in data.strip().splitlines()]
        if len(lines) < 3 or lines[0] != _BEGIN or lines[-1] != _END:
            raise SignatureError(f"not an SSH signature (expected {_BEGIN.decode()} ... "
                                 f"{_END.decode()})", "malformed", source)
        blob = _b64(b"".join(lines[1:-1]), "signature", source)
        reader = _Reader(blob, "signature", source)
        if reader.raw(len(_MAGIC)) != _MAGIC:
            raise reader.fail("no SSHSIG preamble")
        version = reader.uint32()
        if version != _VERSION:
            raise reader.fail(f"version {version} (cloudlets reads version {_VERSION})")
        public_key = reader.string()
        namespace = reader.text()
        reader.string()  # reserved
        hash_algorithm = reader.text()
        inner = _Reader(reader.string(), "signature", source)
        reader.end()
        algorithm = inner.text()
        signature = inner.string()
        inner.end()
        key_type(public_key, source)
        return cls(public_key=public_key, namespace=namespace, hash_algorithm=hash_algorithm,
                   algorithm=algorithm, signature=signature)

    def armor(self) -> str:
        """:returns: the signature armored as ``ssh-keygen -Y sign`` writes it."""
        blob = (_MAGIC + struct.pack(">I", _VERSION) + _string(self.public_key)
                + _string(self.namespace.encode()) + _string(b"")
                + _string(self.hash_algorithm)
                + _string(_string(self.algorithm) + _string(self.signature)))
        text = base64.b64encode(blob).decode("ascii")
        body = "\n".join(text[i:i + 70] for i in range(0, len(text), 70))
        return f"{_BEGIN.decode()}\n{body}\n{_END.decode()}\n"

    def verify(self, message: bytes, namespace: str = NAMESPACE,
               source: str | None = None) -> None:
        """Check the signature over ``message`` with its own public key
        (whether that key is trusted is :class:`~cloudlets.signing.TrustPolicy`'s
        question).

        :param message: the exact bytes that were signed.
        :param namespace: the namespace the signature must be for.
        :param source: what was signed, for messages.
        :raises SignatureError: ``namespace`` when made for another
            namespace; ``algorithm`` for an algorithm not accepted;
            ``mismatch`` when the signature does not match ``message`` (a
            changed manifest, or a signature of another file).
        """
        if self.namespace != namespace:
            raise SignatureError(f"the signature is for namespace {self.namespace!r}, "
                                 f"not {namespace!r}", "namespace", source)
        hasher = _HASHES.get(self.hash_algorithm)
        if hasher is None:
            raise SignatureError(f"message hash {self.hash_algorithm!r} is not accepted "
                                 "(sha256, sha512)", "algorithm", source)
        key = parse_public_key(self.public_key, source)
        signed = _signed_data(self.namespace, self.hash_algorithm, hasher(message).digest())
        try:
            _verify_raw(key, self.key_type, self.algorithm, self.signature, signed, source)
        except InvalidSignature:
            raise SignatureError(
                f"the {self.key_type} signature by {self.fingerprint} does not match the "
                "manifest's bytes (changed after signing, or signed another file)",
                "mismatch", source) from None


def _signed_data(namespace: str, hash_algorithm: str, digest: bytes) -> bytes:
    return (_MAGIC + _string(namespace.encode()) + _string(b"") + _string(hash_algorithm)
            + _string(digest))


def _verify_raw(key: PublicKey, name: str, algorithm: str, signature: bytes,
                signed: bytes, source: str | None) -> None:
    """:raises InvalidSignature: a bad signature.
    :raises SignatureError: an algorithm that does not fit the key."""
    refused = SignatureError(f"signature algorithm {algorithm!r} does not fit a {name} key"
                             + (" (SHA-1 ssh-rsa signatures are refused)"
                                if algorithm == "ssh-rsa" else ""), "algorithm", source)
    if isinstance(key, ed25519.Ed25519PublicKey):
        if algorithm != "ssh-ed25519":
            raise refused
        key.verify(signature, signed)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        if algorithm != name:
            raise refused
        reader = _Reader(signature, "ECDSA signature", source)
        r, s = reader.mpint(), reader.mpint()
        reader.end()
        key.verify(encode_dss_signature(r, s), signed, ec.ECDSA(_CURVES[name][1]))
    else:
        digest = _RSA_SIGNATURES.get(algorithm)
        if digest is None:
            raise refused
        key.verify(signature, signed, padding.PKCS1v15(), digest)


def sign(message: bytes, key: PrivateKey, namespace: str = NAMESPACE) -> str:
    """Sign ``message`` as ``ssh-keygen -Y sign -n NAMESPACE`` does (SHA-512
    message hash; RSA keys sign ``rsa-sha2-512``).

    :param message: the exact bytes to sign (the manifest file).
    :param key: the signer's private key (:func:`load_private_key`).
    :param namespace: what the signature is for.
    :returns: the armored signature, the content of ``MANIFEST.sig``.
    """
    signed = _signed_data(namespace, "sha512", hashlib.sha512(message).digest())
    if isinstance(key, ed25519.Ed25519PrivateKey):
        algorithm, raw = "ssh-ed25519", key.sign(signed)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        algorithm = key_type(public_key_blob(key))
        r, s = decode_dss_signature(key.sign(signed, ec.ECDSA(_CURVES[algorithm][1])))
        raw = _mpint(r) + _mpint(s)
    else:
        algorithm = "rsa-sha2-512"
        raw = key.sign(signed, padding.PKCS1v15(), hashes.SHA512())
    return SshSignature(public_key=public_key_blob(key), namespace=namespace,
                        hash_algorithm="sha512", algorithm=algorithm, signature=raw).armor()
