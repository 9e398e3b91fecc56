"""What a provider rendered, signed: in-toto Statement v1 with a SLSA
Provenance v1 predicate, in a DSSE envelope.

The statement's subjects are the stored artifacts with their sha256; its
resolved dependencies are the manifest (the sha256 of its bytes as
published, and of its canonical form), the root filesystem tarball and the
merged render config (by digest only: the config may hold secrets); the
builder names the cloudlets version and the format and storage drivers.
The envelope (``payloadType`` ``application/vnd.in-toto+json``) is signed
with the provider's Ed25519 or ECDSA P-256 key over DSSE's pre-authentication
encoding, so any DSSE implementation (``securesystemslib``, ``in-toto``,
``cosign verify-blob-attestation``) checks it without cloudlets.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from cloudlets.errors import SignatureError
from cloudlets.signing.sshsig import (
    MAX_KEY_BYTES,
    fingerprint,
    load_private_key,
    parse_public_key,
    parse_public_line,
    public_key_blob,
    read_bounded,
)
from cloudlets.urls import redact
from cloudlets.version import __version__

if TYPE_CHECKING:
    from cloudlets.drivers.base import StoredArtifact
    from cloudlets.manifest import Manifest
    from cloudlets.renderer import RenderJob

__all__ = [
    "BUILD_TYPE",
    "FILE_SUFFIX",
    "PAYLOAD_TYPE",
    "ProvenanceKey",
    "build_statement",
    "job_statement",
    "load_verify_key",
    "pae",
    "sign_envelope",
    "verify_artifact",
    "verify_envelope",
]

PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
#: The SLSA ``buildType`` of a cloudlets render.
BUILD_TYPE = "urn:cloudlets:build-type:render:v1"
#: The default ``builder.id``; a provider names its own renderer.
DEFAULT_BUILDER_ID = "urn:cloudlets:builder:renderer"
#: What a render's provenance file name ends with, beside its artifacts.
FILE_SUFFIX = ".provenance.intoto.json"
#: The artifact role of the provenance file.
ROLE = "provenance"
#: Largest envelope read.
MAX_ENVELOPE_BYTES = 4 * 1024 * 1024
#: Most signatures looked at in one envelope.
MAX_SIGNATURES = 16

VerifyKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is signed."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


def _check_key_kind(key: object, where: str | None) -> None:
    if isinstance(key, ed25519.Ed25519PublicKey | ed25519.Ed25519PrivateKey):
        return
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) \
            and isinstance(key.curve, ec.SECP256R1):
        return
    raise SignatureError("provenance keys are Ed25519 or ECDSA P-256", "key", where)


def key_id(key: VerifyKey) -> str:
    """:returns: the envelope's ``keyid``: the key's OpenSSH ``SHA256:``
    fingerprint (what ``ssh-keygen -l`` prints for its ``.pub``)."""
    return fingerprint(public_key_blob(key))


@dataclass(frozen=True)
class ProvenanceKey:
    """The provider's provenance signing key.

    :ivar private_key: an Ed25519 or ECDSA P-256 private key.
    :ivar builder_id: the SLSA ``builder.id`` the statements name.
    """

    private_key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey
    builder_id: str = DEFAULT_BUILDER_ID

    def __post_init__(self) -> None:
        _check_key_kind(self.private_key, None)

    def __repr__(self) -> str:  # never the key itself
        return f"<ProvenanceKey {self.key_id} builder={self.builder_id!r}>"

    @classmethod
    def load(cls, source: str | Path | bytes, password: bytes | None = None, *,
             builder_id: str = DEFAULT_BUILDER_ID) -> ProvenanceKey:
        """Read the key: PEM (``openssl genpkey -algorithm ed25519``, or
        ``-algorithm EC -pkeyopt ec_paramgen_curve:P-256``) or OpenSSH
        (``ssh-keygen -t ed25519`` / ``-t ecdsa -b 256``).

        :raises SignatureError: (``key``) unreadable, encrypted without a
            passphrase, or another kind of key.
        """
        key = load_private_key(source, password)
        _check_key_kind(key, None if isinstance(source, bytes) else str(source))
        assert isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey)
        return cls(private_key=key, builder_id=builder_id)

    @property
    def public_key(self) -> VerifyKey:
        """The key that verifies this one's envelopes."""
        return self.private_key.public_key()

    @property
    def key_id(self) -> str:
        """The ``keyid`` of this key's envelope signatures."""
        return key_id(self.public_key)

    def sign(self, data: bytes) -> bytes:
        """:returns: the signature over ``data`` (ECDSA: DER, SHA-256)."""
        if isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            return self.private_key.sign(data)
        return self.private_key.sign(data, ec.ECDSA(hashes.SHA256()))


def load_verify_key(source: str | Path | bytes) -> VerifyKey:
    """Read the key that verifies provenance: a PEM public key (``openssl
    pkey -pubout``), an OpenSSH ``.pub`` line, or the private key itself.

    :raises SignatureError: (``key``) anything else.
    """
    where = None if isinstance(source, bytes) else str(source)
    data = source if isinstance(source, bytes) else read_bounded(
        Path(source), MAX_KEY_BYTES, "public key", "key")
    key: Any
    if b"PRIVATE KEY-----" in data:
        key = load_private_key(data).public_key()
    elif data.lstrip().startswith(b"-----BEGIN"):
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, UnsupportedAlgorithm):
            raise SignatureError("not a PEM public key", "key", where) from None
    else:
        try:
            key = parse_public_key(parse_public_line(data.decode("ascii", "replace").strip(),
                                                     where), where)
        except SignatureError as exc:
            raise SignatureError(f"not a public key: {exc}", "key", where) from None
    _check_key_kind(key, where)
    assert isinstance(key, ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey)
    return key


# -- the statement ------------------------------------------------------------

def _time(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime(
        "%Y-%m-%dT%H:%M:%SZ")


def subject_name(location: str) -> str:
    """:returns: an artifact's subject name: the last component of its
    location (what ``cloudlets verify-image`` compares with a file name)."""
    return location.rstrip("/").rsplit("/", 1)[-1]


def build_statement(*, artifacts: Sequence[StoredArtifact], manifest: Manifest,
                    config_digest: str, format_name: str, storage_name: str,
                    drivers: Mapping[str, str], version: str, builder_id: str,
                    image_id: str, output: str, started: float, finished: float,
                    signer: Mapping[str, str] | None = None,
                    source_date_epoch: int | None = None) -> dict[str, Any]:
    """The in-toto Statement of a render.

    :param artifacts: the stored artifacts: the subjects.
    :param manifest: the rendered manifest (its bytes as published, when known).
    :param config_digest: sha256 of the merged render config's canonical form.
    :param format_name: the format driver's name.
    :param storage_name: the storage driver's name.
    :param drivers: ``{"format": "module.Class", "storage": ...}``.
    :param version: the cloudlets version.
    :param builder_id: the SLSA ``builder.id``.
    :param image_id: the render's image id (the invocation id).
    :param output: the output location as requested (redacted here).
    :param started: when the render started (epoch seconds).
    :param finished: when it stored its artifacts.
    :param signer: the manifest's verified signer, if it was signed.
    :param source_date_epoch: the fixed timestamp of a reproducible render.
    :returns: the statement as a JSON-ready dict.
    """
    canonical = manifest.digest
    published = hashlib.sha256(manifest.raw).hexdigest() if manifest.raw is not None \
        else canonical
    manifest_dep: dict[str, Any] = {
        "name": "manifest", "digest": {"sha256": published},
        "annotations": {"canonical_sha256": canonical, "manifest_name": manifest.name,
                        "manifest_version": manifest.version}}
    if not manifest.source.startswith("<"):  # a path or URL, not <string>/<dict>
        manifest_dep["uri"] = redact(manifest.source)
    dependencies = [manifest_dep]
    fs = manifest.filesystem
    if fs is not None:
        dependencies.append({"name": "rootfs", "uri": redact(fs.url),
                             "digest": {"sha256": fs.sha256}})
    dependencies.append({
        "name": "render-config", "digest": {"sha256": config_digest},
        "annotations": {"note": "sha256 of the merged render config's canonical JSON; "
                                "the config itself is not included"}})
    internal: dict[str, Any] = {"source_date_epoch": source_date_epoch}
    if signer is not None:
        internal["manifest_signer"] = dict(signer)
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": subject_name(a.location), "uri": a.location,
                     "digest": {"sha256": a.sha256},
                     "annotations": {"role": a.role, "media_type": a.media_type,
                                     "size": a.size}}
                    for a in artifacts],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {"manifest": {"name": manifest.name,
                                                    "version": manifest.version,
                                                    "digest": canonical},
                                       "format": format_name, "storage": storage_name,
                                       "output": redact(output)},
                "internalParameters": internal,
                "resolvedDependencies": dependencies,
            },
            "runDetails": {
                "builder": {"id": builder_id,
                            "version": {"cloudlets": version, **dict(drivers)}},
                "metadata": {"invocationId": image_id, "startedOn": _time(started),
                             "finishedOn": _time(finished)},
            },
        },
    }


def job_statement(job: RenderJob, artifacts: Sequence[StoredArtifact], *, builder_id: str,
                  started: float, finished: float,
                  source_date_epoch: int | None = None) -> dict[str, Any]:
    """:func:`build_statement` for a render job and what it stored.

    :param job: the prepared render (:meth:`cloudlets.Renderer.prepare`).
    :param artifacts: what the storage driver stored.
    :param builder_id: the SLSA ``builder.id``.
    :param started: when the render started (epoch seconds).
    :param finished: when it stored its artifacts.
    :param source_date_epoch: the renderer's fixed timestamp, if any.
    :returns: the statement.
    """
    return build_statement(
        artifacts=artifacts, manifest=job.manifest, config_digest=job.config.digest,
        format_name=job.format.name, storage_name=job.storage.name,
        drivers={kind: f"{type(driver).__module__}.{type(driver).__qualname__}"
                 for kind, driver in (("format", job.format), ("storage", job.storage))},
        version=__version__, builder_id=builder_id, image_id=job.image_id,
        output=job.output, started=started, finished=finished,
        signer=job.signer.to_dict() if job.signer is not None else None,
        source_date_epoch=source_date_epoch)


# -- the envelope -------------------------------------------------------------

def sign_envelope(statement: Mapping[str, Any], key: ProvenanceKey) -> bytes:
    """Wrap a statement in a DSSE envelope signed with ``key``.

    :returns: the envelope's JSON bytes (the ``.intoto.json`` file).
    """
    payload = json.dumps(statement, sort_keys=True, separators=(",", ":")).encode()
    signature = key.sign(pae(PAYLOAD_TYPE, payload))
    envelope = {"payloadType": PAYLOAD_TYPE,
                "payload": base64.b64encode(payload).decode(),
                "signatures": [{"keyid": key.key_id,
                                "sig": base64.b64encode(signature).decode()}]}
    return (json.dumps(envelope, indent=2) + "\n").encode()


def _b64(value: Any, what: str, source: str | None) -> bytes:
    if not isinstance(value, str):
        raise SignatureError(f"malformed envelope: {what} is not a string", "malformed", source)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"malformed envelope: {what} is not base64", "malformed",
                             source) from None


def _json(data: bytes, what: str, source: str | None) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        raise SignatureError(f"malformed {what}: not JSON", "malformed", source) from None
    if not isinstance(value, dict):
        raise SignatureError(f"malformed {what}: not a JSON object", "malformed", source)
    return value


def verify_envelope(data: bytes, key: VerifyKey, source: str | None = None) -> dict[str, Any]:
    """Check a DSSE envelope's signature with ``key`` and return its
    statement.

    :param data: the envelope's JSON bytes.
    :param key: the provider's public key (:func:`load_verify_key`).
    :param source: where the envelope came from, for messages.
    :returns: the in-toto statement, once the signature holds.
    :raises SignatureError: ``malformed`` (not a DSSE envelope of an in-toto
        v1 statement, or larger than :data:`MAX_ENVELOPE_BYTES`) or
        ``mismatch`` (no signature by ``key`` over these bytes).
    """
    if len(data) > MAX_ENVELOPE_BYTES:
        raise SignatureError(f"envelope larger than {MAX_ENVELOPE_BYTES} bytes", "malformed",
                             source)
    envelope = _json(data, "envelope", source)
    if envelope.get("payloadType") != PAYLOAD_TYPE:
        raise SignatureError(f"payloadType is {envelope.get('payloadType')!r}, not "
                             f"{PAYLOAD_TYPE!r}", "malformed", source)
    payload = _b64(envelope.get("payload"), "payload", source)
    signatures = envelope.get("signatures")
    if not isinstance(signatures, list) or not signatures:
        raise SignatureError("malformed envelope: no signatures", "malformed", source)
    signed = pae(PAYLOAD_TYPE, payload)
    for entry in signatures[:MAX_SIGNATURES]:
        if not isinstance(entry, dict):
            raise SignatureError("malformed envelope: a signature is not an object",
                                 "malformed", source)
        raw = _b64(entry.get("sig"), "sig", source)
        try:
            if isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(raw, signed)
            else:
                key.verify(raw, signed, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            continue
        break
    else:
        raise SignatureError(f"no signature by key {key_id(key)} holds over the envelope",
                             "mismatch", source)
    statement = _json(payload, "statement", source)
    if statement.get("_type") != STATEMENT_TYPE:
        raise SignatureError(f"the payload is not an in-toto {STATEMENT_TYPE} statement",
                             "malformed", source)
    subjects = statement.get("subject")
    if not isinstance(subjects, list) or not all(
            isinstance(s, dict) and isinstance(s.get("digest"), dict) for s in subjects):
        raise SignatureError("malformed statement: subjects without digests", "malformed",
                             source)
    return statement


def verify_artifact(artifact: str | Path, envelope: bytes, key: VerifyKey,
                    source: str | None = None) -> dict[str, Any]:
    """Check that a signed provenance names ``artifact`` by its sha256.

    :param artifact: the artifact file.
    :param envelope: the provenance envelope's bytes.
    :param key: the provider's public key.
    :param source: where the envelope came from, for messages.
    :returns: the subject that matched.
    :raises SignatureError: as for :func:`verify_envelope`, or ``subject``
        when no subject has the artifact's sha256.
    """
    statement = verify_envelope(envelope, key, source)
    digest = hashlib.sha256()
    try:
        with open(artifact, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        raise SignatureError(f"cannot read the artifact: {exc.strerror or exc}", "subject",
                             str(artifact)) from None
    actual = digest.hexdigest()
    for subject in statement["subject"]:
        if subject["digest"].get("sha256") == actual:
            return dict(subject)
    names = ", ".join(str(s.get("name")) for s in statement["subject"])
    raise SignatureError(f"sha256 {actual} is not a subject of the provenance "
                         f"(subjects: {names})", "subject", str(artifact))
