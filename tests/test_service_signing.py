"""Signed cloudlets through the service (issue 19 items 2 and 3): the
configuration's trust policy (for all tenants or per tenant) and provenance
key, signatures beside ``manifest_url`` or in the request, refusals as 400
with the reason code, the signer in the image resource and the DSSE envelope
at ``GET /v1/images/{id}/provenance``. Keys are made at test time by
``ssh-keygen``."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudlets.errors import SignatureError
from cloudlets.signing.provenance import load_verify_key, verify_envelope
from tests.service_fixture import Service, TarballServer, served_cloudlet, serving, tarballs

pytest.importorskip("starlette", reason="pip install cloudlets[service]")
if shutil.which("ssh-keygen") is None:
    pytest.skip("ssh-keygen is not installed", allow_module_level=True)

__all__ = ["tarballs"]  # the fixture, imported for this module

TOKENS = {"signed": "signed-token-0123456789abcd", "open": "open-token-0123456789abcdef"}
NS = "cloudlets-manifest"


def ssh_keygen(*args: str | Path) -> bytes:
    result = subprocess.run(["ssh-keygen", *[str(a) for a in args]], capture_output=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def make_key(root: Path, name: str) -> Path:
    key = root / name
    ssh_keygen("-q", "-t", "ed25519", "-N", "", "-C", name, "-f", key)
    return key


def public(key: Path) -> str:
    return Path(f"{key}.pub").read_text().strip()


def fingerprint(key: Path) -> str:
    return ssh_keygen("-lf", f"{key}.pub").split()[1].decode()


def sign(key: Path, path: Path) -> str:
    """``ssh-keygen -Y sign`` of ``path``: writes ``path.sig``, :returns: it."""
    ssh_keygen("-q", "-Y", "sign", "-f", key, "-n", NS, path)
    return Path(f"{path}.sig").read_text()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("keys")
    return {name: make_key(root, name)
            for name in ("publisher", "stranger", "retired", "provider")}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, tarballs: TarballServer,
            keys: dict[str, Path]) -> Iterator[Service]:
    tarballs.gate.set()
    etc = tmp_path_factory.mktemp("signing") / "etc"
    etc.mkdir()
    (etc / "allowed_signers").write_text(
        f"publisher@example.com {public(keys['publisher'])}\n"
        f"retired@example.com {public(keys['retired'])}\n")
    (etc / "revoked").write_text(public(keys["retired"]) + "\n")
    shutil.copy(keys["provider"], etc / "provenance.key")
    config = f"""
[service]
data_dir = "state"
workers = 1
formats = ["tar"]
[targets.local]
driver = "local"
root = "images"
[formats.tar]
[signing]
allowed_signers = "allowed_signers"
revoked = "revoked"
provenance_key = "provenance.key"
[tenants.signed]
token_env = "CLOUDLETS_TOKEN_SIGNED"
[tenants.open]
token_env = "CLOUDLETS_TOKEN_OPEN"
[tenants.open.signing]
allowed_signers = "allowed_signers"
require_signature = false
[fetch]
allow_hosts = ["{tarballs.host}"]
"""
    with serving(etc, config, TOKENS) as running:
        yield running


def publish(server: TarballServer, name: str, key: Path | None) -> tuple[str, dict[str, Any]]:
    """Write a cloudlet's manifest file on the tarball server (signed beside
    it by ``key``); :returns: its URL and document."""
    manifest = served_cloudlet(server, name=name)
    path = server.root / f"{name}.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    if key is not None:
        sign(key, path)
    return f"{server.url}/{name}.json", manifest


def create(service: Service, tenant: str, **body: Any) -> Any:
    return service.call("POST", "/v1/images", tenant,
                        json={"format": "tar", "target": "local", **body})


def refused(answer: Any, reason: str) -> dict[str, Any]:
    assert answer.status_code == 400, answer.text
    body: dict[str, Any] = answer.json()
    assert body["error"] == "SignatureError" and body["reason"] == reason, body
    return body


def test_a_signature_beside_the_manifest_url_is_checked_and_recorded(
        service: Service, tarballs: TarballServer, keys: dict[str, Path]) -> None:
    url, _ = publish(tarballs, "beside", keys["publisher"])
    answer = create(service, "signed", manifest_url=url)
    assert answer.status_code == 202, answer.text
    image = service.wait_image(answer.json()["id"], "signed")
    assert image["status"] == "ready", image
    assert image["signer"] == {"principal": "publisher@example.com",
                               "fingerprint": fingerprint(keys["publisher"])}
    assert "/beside.json.sig" in tarballs.requests
    # the provenance: a DSSE envelope over the artifact, signed by the provider's key
    got = service.call("GET", f"/v1/images/{image['id']}/provenance", "signed")
    assert got.status_code == 200, got.text
    assert got.headers["content-type"].startswith("application/vnd.dsse.envelope.v1+json")
    statement = verify_envelope(got.content, load_verify_key(Path(f"{keys['provider']}.pub")))
    digests = {s["digest"]["sha256"] for s in statement["subject"]}
    assert image["artifacts"][0]["sha256"] in digests
    assert image["provenance"]["location"].endswith("provenance.intoto.json")
    # a flipped byte of the payload fails the check
    envelope = got.json()
    envelope["payload"] = ("A" if envelope["payload"][0] != "A" else "B") + \
        envelope["payload"][1:]
    with pytest.raises(SignatureError):
        verify_envelope(json.dumps(envelope).encode(),
                        load_verify_key(Path(f"{keys['provider']}.pub")))


def test_a_signature_in_the_request_is_checked(service: Service, tarballs: TarballServer,
                                               keys: dict[str, Path]) -> None:
    url, _ = publish(tarballs, "inrequest", keys["publisher"])
    path = tarballs.root / "inrequest.json.sig"
    signature = path.read_text()
    path.unlink()  # nothing beside: only the request holds it
    answer = create(service, "signed", manifest_url=url, signature=signature)
    assert answer.status_code == 202, answer.text
    image = service.wait_image(answer.json()["id"], "signed")
    assert image["status"] == "ready" and image["signer"]["principal"] == \
        "publisher@example.com"


@pytest.mark.parametrize("case", ["missing", "mismatch", "unknown-key", "revoked", "inline"])
def test_a_refused_signature_answers_400_with_its_reason_before_any_download(
        service: Service, tarballs: TarballServer, keys: dict[str, Path], case: str) -> None:
    name = f"refused-{case}"
    signer = {"unknown-key": keys["stranger"], "revoked": keys["retired"],
              "missing": None}.get(case, keys["publisher"])
    url, manifest = publish(tarballs, name, signer)
    if case == "mismatch":  # the manifest changed after it was signed
        path = tarballs.root / f"{name}.json"
        path.write_text(path.read_text().replace('"version": "1.0"', '"version": "1.1"'))
    body = {"manifest": manifest} if case == "inline" else {"manifest_url": url}
    refused(create(service, "signed", **body), "missing" if case == "inline" else case)
    assert not any(path.endswith(f"/{name}-1.0.tar.gz") for path in tarballs.requests)


def test_a_signature_over_another_manifest_is_refused(
        service: Service, tarballs: TarballServer, keys: dict[str, Path]) -> None:
    url, _ = publish(tarballs, "first", keys["publisher"])
    publish(tarballs, "second", keys["publisher"])
    signature = (tarballs.root / "second.json.sig").read_text()
    refused(create(service, "signed", manifest_url=url, signature=signature), "mismatch")


def test_a_tenant_of_its_own_policy_may_render_unsigned(
        service: Service, tarballs: TarballServer) -> None:
    manifest = served_cloudlet(tarballs, name="unsigned")
    answer = create(service, "open", manifest=manifest)
    assert answer.status_code == 202, answer.text
    image = service.wait_image(answer.json()["id"], "open")
    assert image["status"] == "ready" and image["signer"] is None
    # the service's policy, for the other tenant, requires a signature
    refused(create(service, "signed", manifest=served_cloudlet(tarballs, name="unsigned2")),
            "missing")


def test_provenance_of_an_unknown_or_another_tenants_image_is_404(
        service: Service, tarballs: TarballServer) -> None:
    assert service.call("GET", "/v1/images/cat-0000/provenance", "open").status_code == 404
    answer = create(service, "open", manifest=served_cloudlet(tarballs, name="mine"))
    image = service.wait_image(answer.json()["id"], "open")
    mine = service.call("GET", f"/v1/images/{image['id']}/provenance", "open")
    assert mine.status_code == 200, mine.text
    assert mine.json()["payloadType"] == "application/vnd.in-toto+json"
    theirs = service.call("GET", f"/v1/images/{image['id']}/provenance", "signed")
    assert theirs.status_code == 404, theirs.text


def test_a_bad_signing_table_is_refused_with_its_key_paths(tmp_path: Path) -> None:
    from cloudlets.service.config import ServiceConfig, ServiceConfigError

    (tmp_path / "service.toml").write_text(f"""
[targets.local]
driver = "local"
root = "images"
[signing]
allowed_signers = "nowhere"
provenance_key = "no-key"
colour = "blue"
[tenants.a]
token_sha256 = "{"a" * 64}"
[tenants.a.signing]
require_signature = "yes"
""")
    with pytest.raises(ServiceConfigError) as caught:
        ServiceConfig.load(tmp_path / "service.toml")
    paths = {path for path, _ in caught.value.problems}
    assert {"signing", "signing.provenance_key", "signing.colour",
            "tenants.a.signing.allowed_signers"} <= paths, caught.value.problems
    # revoked keys without a keyring are no policy: refused, not ignored
    text = (tmp_path / "service.toml").read_text()
    (tmp_path / "service.toml").write_text(text.replace(
        'allowed_signers = "nowhere"\nprovenance_key = "no-key"\ncolour = "blue"\n',
        'revoked = "revoked"\n'))
    with pytest.raises(ServiceConfigError) as caught:
        ServiceConfig.load(tmp_path / "service.toml")
    assert "signing.allowed_signers" in {path for path, _ in caught.value.problems}
