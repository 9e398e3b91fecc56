"""Signed provenance out: an in-toto Statement v1 with a SLSA Provenance v1
predicate in a DSSE envelope, written beside the artifacts, kept in the
catalog, verified here with securesystemslib (not our own code)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cloudlets import Renderer, SignatureError, StorageError
from cloudlets.cli import main
from cloudlets.drivers.storage.local import LocalStorage
from cloudlets.images import Images
from cloudlets.signing import ProvenanceKey, load_verify_key, verify_artifact, verify_envelope
from tests.test_catalog import make_cloudlet

securesystemslib = pytest.importorskip("securesystemslib")

#: how each kind of provider key is made, and its public half exported
KEYS = {
    "openssl-ed25519": (["openssl", "genpkey", "-algorithm", "ed25519", "-out", "{key}"],
                        ["openssl", "pkey", "-in", "{key}", "-pubout", "-out", "{pub}"]),
    "openssl-p256": (["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                      "ec_paramgen_curve:P-256", "-out", "{key}"],
                     ["openssl", "pkey", "-in", "{key}", "-pubout", "-out", "{pub}"]),
    "ssh-ed25519": (["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", "{key}"],
                    ["cp", "{key}.pub", "{pub}"]),
    "ssh-p256": (["ssh-keygen", "-q", "-t", "ecdsa", "-b", "256", "-N", "", "-f", "{key}"],
                 ["cp", "{key}.pub", "{pub}"]),
}


def make_key(root: Path, kind: str) -> tuple[Path, Path]:
    make, export = KEYS[kind]
    if shutil.which(make[0]) is None:
        pytest.skip(f"{make[0]} is not installed")
    key, pub = root / f"{kind}.key", root / f"{kind}.pub"
    for command in (make, export):
        argv = [part.format(key=key, pub=pub) for part in command]
        result = subprocess.run(argv, capture_output=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
    return key, pub


def independent_public_key(pub: Path) -> Any:
    """The public key, read by cryptography directly (not our loader)."""
    from cryptography.hazmat.primitives import serialization

    data = pub.read_bytes()
    if data.startswith(b"-----BEGIN"):
        return serialization.load_pem_public_key(data)
    return serialization.load_ssh_public_key(data)


def check_with_securesystemslib(envelope: bytes, pub: Path) -> dict[str, Any]:
    """Verify a DSSE envelope with securesystemslib. :returns: the statement.
    :raises securesystemslib.exceptions.VerificationError: a bad signature."""
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    parsed = Envelope.from_dict(json.loads(envelope))
    keyid = parsed.signatures and next(iter(parsed.signatures))
    key = SSlibKey.from_crypto(independent_public_key(pub), keyid=keyid)
    parsed.verify([key], 1)
    assert parsed.payload_type == "application/vnd.in-toto+json"
    statement: dict[str, Any] = json.loads(parsed.payload)
    return statement


def render(base: Path, key: ProvenanceKey | None, *, storage: Any = "local",
           overwrite: bool = False) -> Any:
    manifest = make_cloudlet(base / "c")
    (base / "manifest.json").write_text(json.dumps(manifest))
    renderer = Renderer(cache_dir=base / "cache", data_dir=base / "data",
                        ex_allow_file_urls=True, ex_source_date_epoch=1_700_000_000,
                        provenance_key=key)
    return renderer.render(manifest, str(base / "out") + "/", storage, "tar",
                           overwrite=overwrite)


@pytest.mark.parametrize("kind", sorted(KEYS))
def test_provenance_verifies_with_securesystemslib(tmp_path: Path, kind: str) -> None:
    key_path, pub = make_key(tmp_path, kind)
    result = render(tmp_path, ProvenanceKey.load(key_path))
    roles = [a.role for a in result.artifacts]
    assert roles == ["rootfs", "provenance"]
    disk, provenance = result.artifacts
    assert provenance.location == disk.location + ".provenance.intoto.json"
    assert result.to_dict()["provenance"]["location"] == provenance.location
    envelope = Path(provenance.location).read_bytes()
    statement = check_with_securesystemslib(envelope, pub)
    assert statement["_type"] == "https://in-toto.io/Statement/v1"
    assert statement["predicateType"] == "https://slsa.dev/provenance/v1"
    artifact = Path(disk.location)
    assert statement["subject"] == [{
        "name": artifact.name, "uri": disk.location,
        "digest": {"sha256": hashlib.sha256(artifact.read_bytes()).hexdigest()},
        "annotations": {"role": "rootfs", "media_type": disk.media_type, "size": disk.size}}]
    build = statement["predicate"]["buildDefinition"]
    deps = {d["name"]: d for d in build["resolvedDependencies"]}
    rendered = json.loads((tmp_path / "manifest.json").read_text())
    assert deps["rootfs"] == {"name": "rootfs", "uri": rendered["filesystem"]["url"],
                              "digest": {"sha256": rendered["filesystem"]["sha256"]}}
    assert deps["render-config"]["digest"]["sha256"] == result.config_digest
    assert deps["manifest"]["annotations"]["canonical_sha256"] == result.manifest_digest
    builder = statement["predicate"]["runDetails"]["builder"]
    assert builder["version"]["format"] == "cloudlets.drivers.formats.tar.TarFormat"
    assert builder["version"]["storage"] == "cloudlets.drivers.storage.local.LocalStorage"
    assert statement["predicate"]["runDetails"]["metadata"]["invocationId"] == result.image_id

    from securesystemslib.exceptions import VerificationError

    data = json.loads(envelope)
    payload = bytearray(base64.b64decode(data["payload"]))
    payload[len(payload) // 2] ^= 0x01  # one flipped bit in the statement
    data["payload"] = base64.b64encode(bytes(payload)).decode()
    flipped = json.dumps(data).encode()
    with pytest.raises(VerificationError):
        check_with_securesystemslib(flipped, pub)
    with pytest.raises(SignatureError) as caught:
        verify_envelope(flipped, load_verify_key(pub))
    assert caught.value.reason == "mismatch"


def test_verify_image_on_the_command_line(tmp_path: Path) -> None:
    key_path, pub = make_key(tmp_path, "openssl-ed25519")
    result = render(tmp_path, ProvenanceKey.load(key_path))
    artifact, provenance = (Path(a.location) for a in result.artifacts)
    argv = ["verify-image", str(artifact), "--provenance", str(provenance), "--key", str(pub)]
    out, err = io.StringIO(), io.StringIO()
    assert main([*argv, "--json"], out, err) == 0, err.getvalue()
    assert json.loads(out.getvalue())["subject"]["name"] == artifact.name
    data = bytearray(artifact.read_bytes())
    data[-1] ^= 0x01  # a flipped byte in the artifact
    artifact.write_bytes(bytes(data))
    out, err = io.StringIO(), io.StringIO()
    assert main(argv, out, err) == 3
    assert "is not a subject of the provenance" in err.getvalue()
    _, other_pub = make_key(tmp_path, "openssl-p256")
    out, err = io.StringIO(), io.StringIO()
    assert main([*argv[:-1], str(other_pub)], out, err) == 3
    assert "no signature by key" in err.getvalue()


def test_provenance_is_rolled_back_with_the_artifacts(tmp_path: Path) -> None:
    key_path, _ = make_key(tmp_path, "openssl-ed25519")

    class FailingProvenance(LocalStorage):
        def upload(self, source: Any, location: str, **kwargs: Any) -> Any:
            if kwargs.get("role") == "provenance":
                raise StorageError("disk full", location)
            return super().upload(source, location, **kwargs)

    with pytest.raises(StorageError, match="disk full"):
        render(tmp_path, ProvenanceKey.load(key_path), storage=FailingProvenance())
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())  # the stored rootfs went too


def test_a_taken_provenance_location_is_refused_before_storing(tmp_path: Path) -> None:
    key_path, _ = make_key(tmp_path, "openssl-ed25519")
    taken = tmp_path / "out" / "tiny-1.0.tar.gz.provenance.intoto.json"
    taken.parent.mkdir()
    taken.write_text("someone else's")
    with pytest.raises(StorageError, match="refusing to overwrite"):
        render(tmp_path, ProvenanceKey.load(key_path))
    assert sorted(p.name for p in taken.parent.iterdir()) == [taken.name]
    assert taken.read_text() == "someone else's"
    render(tmp_path, ProvenanceKey.load(key_path), overwrite=True)
    assert taken.read_text().startswith("{")


def test_the_catalog_keeps_the_provenance(tmp_path: Path) -> None:
    key_path, pub = make_key(tmp_path, "openssl-p256")
    renderer = Renderer(cache_dir=tmp_path / "cache", data_dir=tmp_path / "data",
                        ex_allow_file_urls=True, ex_source_date_epoch=1_700_000_000)
    images = Images(renderer)
    entry = images.create(make_cloudlet(tmp_path / "c"), str(tmp_path / "out") + "/",
                          "local", "tar", provenance_key=ProvenanceKey.load(key_path))
    kept = images.catalog.get(entry.entry_id)
    envelope = json.dumps(kept.details["provenance"]["envelope"]).encode()
    statement = check_with_securesystemslib(envelope, pub)
    assert statement["subject"][0]["digest"]["sha256"] == kept.artifacts[0].sha256
    assert [a.role for a in kept.artifacts] == ["rootfs", "provenance"]
    images.delete(entry.entry_id)
    out = tmp_path / "out"
    assert not out.exists() or not any(out.iterdir())  # deleted with the image


def test_provider_keys_are_checked_and_never_shown(tmp_path: Path) -> None:
    rsa = tmp_path / "rsa.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt",
                    "rsa_keygen_bits:2048", "-out", str(rsa)], check=True, timeout=60,
                   capture_output=True)
    with pytest.raises(SignatureError) as caught:
        ProvenanceKey.load(rsa)
    assert caught.value.reason == "key" and "Ed25519 or ECDSA P-256" in str(caught.value)
    p384 = tmp_path / "p384.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt",
                    "ec_paramgen_curve:P-384", "-out", str(p384)], check=True, timeout=60,
                   capture_output=True)
    with pytest.raises(SignatureError):
        ProvenanceKey.load(p384)
    key_path, pub = make_key(tmp_path, "openssl-ed25519")
    key = ProvenanceKey.load(key_path)
    secret_line = key_path.read_text().splitlines()[1]
    assert secret_line not in repr(key)
    assert key.key_id in repr(key)
    assert load_verify_key(key_path).public_bytes_raw() == \
        load_verify_key(pub).public_bytes_raw()  # type: ignore[union-attr]
    with pytest.raises(SignatureError) as caught:
        load_verify_key(tmp_path / "missing.pub")
    assert caught.value.reason == "key"


def test_malformed_envelopes_are_refused(tmp_path: Path) -> None:
    _, pub = make_key(tmp_path, "openssl-ed25519")
    public = load_verify_key(pub)
    artifact = tmp_path / "a"
    artifact.write_bytes(b"x")
    for data, expected in [
        (b"[", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"payloadType": "text/plain"}', "payloadType"),
        (b'{"payloadType": "application/vnd.in-toto+json", "payload": "!"}', "not base64"),
        (b'{"payloadType": "application/vnd.in-toto+json", "payload": "", '
         b'"signatures": []}', "no signatures"),
        (b"[" * 100_000, "not JSON"),
        (b" " * (4 * 1024 * 1024 + 1), "larger than"),
    ]:
        with pytest.raises(SignatureError) as caught:
            verify_artifact(artifact, data, public, "p.json")
        assert expected in str(caught.value), (data[:40], str(caught.value))
        assert caught.value.reason == "malformed"
