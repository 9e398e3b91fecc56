"""Publisher signatures (SSHSIG), the allowed_signers keyring and the trust
policy a render applies before anything is downloaded.

Keys are generated at test time with ``ssh-keygen`` and ``openssl genpkey``;
signatures go both ways: ``ssh-keygen -Y sign`` → cloudlets verifies,
``cloudlets sign`` → ``ssh-keygen -Y verify`` accepts.
"""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudlets import FetchError, Renderer, SignatureError
from cloudlets.cli import main
from cloudlets.fetch import Fetcher, UrlPolicy
from cloudlets.manifest import Manifest
from cloudlets.signing import (
    AllowedSigners,
    RevokedKeys,
    SshSignature,
    TrustPolicy,
    load_private_key,
    sign,
    signature_location,
)
from cloudlets.signing.allowed_signers import parse_timestamp
from cloudlets.signing.sshsig import MAX_SIGNATURE_BYTES
from tests.httpfaults import FaultServer, Route
from tests.netpolicy import LOOPBACK_HOSTS, loopback_policy
from tests.test_catalog import make_cloudlet

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None,
                                reason="ssh-keygen (openssh-client) is not installed")

#: ssh-keygen arguments per key kind the tests sign with.
KINDS = {"ed25519": ["-t", "ed25519"], "ecdsa256": ["-t", "ecdsa", "-b", "256"],
         "ecdsa384": ["-t", "ecdsa", "-b", "384"], "ecdsa521": ["-t", "ecdsa", "-b", "521"],
         "rsa": ["-t", "rsa", "-b", "2048"]}
NS = "cloudlets-manifest"


def run(*args: str | Path, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(a) for a in args], input=data, capture_output=True,
                          timeout=60, check=False)


@dataclasses.dataclass
class Key:
    kind: str
    private: Path

    @property
    def public(self) -> str:
        return Path(str(self.private) + ".pub").read_text().strip()

    @property
    def fingerprint(self) -> str:
        return run("ssh-keygen", "-lf", str(self.private) + ".pub").stdout.split()[1].decode()

    def allowed(self, principal: str, options: str = "") -> str:
        return f"{principal} {options} {self.public}\n".replace("  ", " ")

    def keygen_sign(self, path: Path, namespace: str = NS) -> bytes:
        """Sign ``path`` with ``ssh-keygen -Y sign``: :returns: the signature."""
        result = run("ssh-keygen", "-q", "-Y", "sign", "-f", self.private, "-n", namespace,
                     path)
        assert result.returncode == 0, result.stderr
        signature = Path(str(path) + ".sig")
        data = signature.read_bytes()
        signature.unlink()
        return data


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Key]:
    root = tmp_path_factory.mktemp("keys")
    found = {}
    for kind, args in {**KINDS, "other": ["-t", "ed25519"]}.items():
        path = root / kind
        result = run("ssh-keygen", "-q", *args, "-N", "", "-C", f"{kind}@test", "-f", path)
        assert result.returncode == 0, result.stderr
        found[kind] = Key(kind, path)
    return found


def manifest_file(tmp_path: Path, text: bytes = b'{"name": "hello", "version": "1"}\n') -> Path:
    path = tmp_path / "manifest.json"
    path.write_bytes(text)
    return path


# -- both directions ----------------------------------------------------------

@pytest.mark.parametrize("kind", sorted(KINDS))
def test_ssh_keygen_signature_verifies_in_cloudlets(keys: dict[str, Key], tmp_path: Path,
                                                   kind: str) -> None:
    key = keys[kind]
    path = manifest_file(tmp_path)
    signature = key.keygen_sign(path)
    policy = TrustPolicy(AllowedSigners.parse(key.allowed("alice@example.com")))
    signer = policy.verify(path.read_bytes(), signature)
    assert signer.principal == "alice@example.com"
    assert signer.fingerprint == key.fingerprint  # as ssh-keygen -l prints it
    assert signer.namespace == NS
    with pytest.raises(SignatureError) as caught:
        policy.verify(path.read_bytes() + b" ", signature)
    assert caught.value.reason == "mismatch"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_cloudlets_signature_verifies_with_ssh_keygen(keys: dict[str, Key], tmp_path: Path,
                                                     kind: str) -> None:
    key = keys[kind]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(make_cloudlet(tmp_path / "c")))
    out, err = io.StringIO(), io.StringIO()
    assert main(["sign", str(path), "--key", str(key.private)], out, err) == 0, err.getvalue()
    assert key.fingerprint in out.getvalue()
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(key.allowed("pub@example.com"))
    ok = run("ssh-keygen", "-Y", "verify", "-f", allowed, "-I", "pub@example.com", "-n", NS,
             "-s", str(path) + ".sig", data=path.read_bytes())
    assert ok.returncode == 0, ok.stderr
    assert b"Good" in ok.stdout
    bad = run("ssh-keygen", "-Y", "verify", "-f", allowed, "-I", "pub@example.com", "-n", NS,
              "-s", str(path) + ".sig", data=path.read_bytes() + b"\n")
    assert bad.returncode != 0  # and ssh-keygen does check


@pytest.mark.parametrize("algorithm", ["ed25519", "ec-p256"])
def test_a_pem_key_from_openssl_signs_what_ssh_keygen_accepts(tmp_path: Path,
                                                              algorithm: str) -> None:
    private = tmp_path / "key.pem"
    args = ["-algorithm", "ed25519"] if algorithm == "ed25519" else [
        "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
    assert run("openssl", "genpkey", *args, "-out", private).returncode == 0
    key = load_private_key(private)
    path = manifest_file(tmp_path)
    path.with_suffix(".json.sig").write_text(sign(path.read_bytes(), key))
    from cryptography.hazmat.primitives import serialization

    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                         serialization.PublicFormat.OpenSSH).decode()
    allowed = tmp_path / "allowed"
    allowed.write_text(f"p@x {line}\n")
    ok = run("ssh-keygen", "-Y", "verify", "-f", allowed, "-I", "p@x", "-n", NS,
             "-s", str(path) + ".sig", data=path.read_bytes())
    assert ok.returncode == 0, ok.stderr


def test_cli_verify_accepts_and_refuses(keys: dict[str, Key], tmp_path: Path) -> None:
    key = keys["ed25519"]
    path = manifest_file(tmp_path, json.dumps(make_cloudlet(tmp_path / "c")).encode())
    Path(str(path) + ".sig").write_bytes(key.keygen_sign(path))
    allowed = tmp_path / "allowed"
    allowed.write_text(key.allowed("*@example.com"))
    out, err = io.StringIO(), io.StringIO()
    code = main(["verify", str(path), "--allowed-signers", str(allowed), "--json"], out, err)
    assert code == 0, err.getvalue()
    report = json.loads(out.getvalue())
    assert report["signature"] == {"principal": "*@example.com",
                                   "fingerprint": key.fingerprint,
                                   "key_type": "ssh-ed25519", "namespace": NS}
    revoked = tmp_path / "revoked"
    revoked.write_text(key.fingerprint + "\n")
    out, err = io.StringIO(), io.StringIO()
    code = main(["verify", str(path), "--allowed-signers", str(allowed), "--revoked",
                 str(revoked)], out, err)
    assert code == 3
    assert "revoked" in err.getvalue()
    path.write_bytes(path.read_bytes().replace(b"catalog test", b"catalog t3st"))
    out, err = io.StringIO(), io.StringIO()
    assert main(["verify", str(path), "--allowed-signers", str(allowed)], out, err) == 3
    assert "does not match the manifest's bytes" in err.getvalue()


def test_cli_sign_asks_no_passphrase_off_a_terminal_and_never_shows_the_key(
        tmp_path: Path) -> None:
    private = tmp_path / "locked"
    assert run("ssh-keygen", "-q", "-t", "ed25519", "-N", "s3cret-pass", "-f",
               private).returncode == 0
    path = manifest_file(tmp_path, json.dumps(make_cloudlet(tmp_path / "c")).encode())
    out, err = io.StringIO(), io.StringIO()
    assert main(["sign", str(path), "--key", str(private)], out, err) == 3
    message = err.getvalue()
    assert "encrypted" in message
    body = private.read_text().splitlines()[1]
    assert body not in message and "s3cret" not in message
    with pytest.raises(SignatureError) as caught:
        load_private_key(private, b"hunter2-xyz")
    assert "hunter2" not in str(caught.value) and caught.value.reason == "key"
    assert not Path(str(path) + ".sig").exists()


# -- the signature format -----------------------------------------------------

def test_malformed_signatures_are_refused_naming_the_reason(keys: dict[str, Key],
                                                            tmp_path: Path) -> None:
    path = manifest_file(tmp_path)
    good = keys["ed25519"].keygen_sign(path).decode()
    parsed = SshSignature.parse(good)
    body = "".join(good.strip().splitlines()[1:-1])
    import base64

    blob = base64.b64decode(body)

    def armored(data: bytes) -> str:
        return ("-----BEGIN SSH SIGNATURE-----\n" + base64.b64encode(data).decode()
                + "\n-----END SSH SIGNATURE-----\n")

    cases = {
        "no armor": ("hello", "not an SSH signature"),
        "not base64": ("-----BEGIN SSH SIGNATURE-----\n!!!!\n-----END SSH SIGNATURE-----",
                       "not base64"),
        "truncated": (armored(blob[:-10]), "truncated"),
        "trailing bytes": (armored(blob + b"\0\0\0\0"), "after the end"),
        "no preamble": (armored(b"SSHSIX" + blob[6:]), "no SSHSIG preamble"),
        "version 2": (armored(blob[:6] + b"\0\0\0\2" + blob[10:]), "version 2"),
        "huge": ("x" * (MAX_SIGNATURE_BYTES + 1), "larger than"),
        "huge length field": (armored(blob[:10] + b"\xff\xff\xff\xff" + blob[14:]),
                              "truncated"),
    }
    for name, (text, expected) in cases.items():
        with pytest.raises(SignatureError) as caught:
            SshSignature.parse(text, "m.json.sig")
        assert caught.value.reason == "malformed", name
        assert expected in str(caught.value), (name, str(caught.value))
        assert "m.json.sig" in str(caught.value)
    assert parsed.armor().strip() == good.strip()  # the armor round-trips byte for byte


def test_sha1_rsa_signatures_and_short_rsa_keys_are_refused(keys: dict[str, Key],
                                                            tmp_path: Path) -> None:
    path = manifest_file(tmp_path)
    parsed = SshSignature.parse(keys["rsa"].keygen_sign(path))
    assert parsed.algorithm == "rsa-sha2-512"
    sha1 = dataclasses.replace(parsed, algorithm="ssh-rsa")
    with pytest.raises(SignatureError) as caught:
        SshSignature.parse(sha1.armor()).verify(path.read_bytes())
    assert caught.value.reason == "algorithm" and "SHA-1" in str(caught.value)
    short = tmp_path / "short"
    assert run("ssh-keygen", "-q", "-t", "rsa", "-b", "1024", "-N", "", "-f",
               short).returncode in (0, 1)
    if short.exists():  # newer OpenSSH refuses to make one at all
        with pytest.raises(SignatureError) as caught:
            AllowedSigners.parse(f"a@b {Path(str(short) + '.pub').read_text()}")
        assert "too short" in str(caught.value)


def test_a_signature_for_another_namespace_is_refused(keys: dict[str, Key],
                                                      tmp_path: Path) -> None:
    path = manifest_file(tmp_path)
    signature = keys["ed25519"].keygen_sign(path, namespace="file")
    policy = TrustPolicy(AllowedSigners.parse(keys["ed25519"].allowed("a@b")))
    with pytest.raises(SignatureError) as caught:
        policy.verify(path.read_bytes(), signature)
    assert caught.value.reason == "namespace" and "'file'" in str(caught.value)


# -- allowed_signers ----------------------------------------------------------

def test_allowed_signers_lines_parse_as_openssh_reads_them(keys: dict[str, Key]) -> None:
    ed, ec = keys["ed25519"], keys["ecdsa256"]
    text = (
        "# comment\n\n"
        f'alice@example.com,*@build.example.com,!evil@build.example.com '
        f'namespaces="cloudlets-manifest,git",valid-after="20200101",'
        f'valid-before="209912312359Z" {ed.public}\n'
        f'"bob@example.com" {ec.public}\n')
    signers = AllowedSigners.parse(text, "keyring")
    first, second = signers.entries
    assert first.principals == ("alice@example.com", "*@build.example.com",
                                "!evil@build.example.com")
    assert first.namespaces == ("cloudlets-manifest", "git")
    assert first.valid_before == parse_timestamp("209912312359Z")
    assert first.line == 3 and second.line == 4
    assert second.principals == ("bob@example.com",) and second.namespaces is None
    blob = SshSignature  # the entries hold the key blobs as the signature does
    assert blob is not None
    assert signers.find(first.key, NS, identity="ci@build.example.com") == first
    with pytest.raises(SignatureError) as caught:
        signers.find(first.key, NS, identity="evil@build.example.com")
    assert caught.value.reason == "unknown-key"
    with pytest.raises(SignatureError) as caught:
        signers.find(first.key, "file")
    assert caught.value.reason == "namespace" and "keyring, line 3" in str(caught.value)


def test_timestamps_are_utc_with_z_and_local_time_without() -> None:
    assert parse_timestamp("20260102Z") == 1767312000.0
    assert parse_timestamp("202601021030Z") == 1767312000.0 + 10.5 * 3600
    assert parse_timestamp("20260102103005Z") == 1767312000.0 + 10.5 * 3600 + 5
    assert parse_timestamp("20260102") == time.mktime(time.strptime("20260102", "%Y%m%d"))
    for bad in ("2026010", "20261301Z", "2026-01-02", "20260102103Z", "202601021030055"):
        with pytest.raises(SignatureError) as caught:
            parse_timestamp(bad)
        assert caught.value.reason == "policy", bad


@pytest.mark.parametrize(("line", "expected"), [
    ("a@b cert-authority {key}", "cert-authority (SSH certificates) is not supported"),
    ("a@b unknown-option {key}", "unknown option 'unknown-option'"),
    ("a@b namespaces {key}", "option 'namespaces' needs a value"),
    ('a@b valid-before="tomorrow" {key}', "is not YYYYMMDD"),
    ('a@b namespaces="x {key}', "unterminated quote"),
    ("a@b", "expected 'PRINCIPALS [OPTIONS] KEYTYPE BASE64'"),
    ("a@b ssh-ed25519 !!!!", "not base64"),
    ("a@b ssh-rsa {body}", "the key says 'ssh-rsa' but its data is a 'ssh-ed25519' key"),
    ("a@b ssh-dss AAAAB3NzaC1kc3M=", "key type 'ssh-dss' is not accepted"),
    ("a@b {long}", "longer than"),
])
def test_malformed_allowed_signers_lines_are_refused_by_line(keys: dict[str, Key], line: str,
                                                              expected: str) -> None:
    public = keys["ed25519"].public
    text = "# first\n" + line.format(key=public, body=public.split()[1],
                                     long="x" * 20_000) + "\n"
    with pytest.raises(SignatureError) as caught:
        AllowedSigners.parse(text, "keyring")
    assert caught.value.reason == "policy"
    assert expected in str(caught.value)
    if line != "a@b {long}":
        assert "keyring, line 2" in str(caught.value)


def test_an_oversized_allowed_signers_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "allowed"
    path.write_bytes(b"#" * (4 * 1024 * 1024 + 1))
    with pytest.raises(SignatureError) as caught:
        AllowedSigners.load(path)
    assert "larger than" in str(caught.value) and caught.value.reason == "policy"
    with pytest.raises(SignatureError) as caught:
        AllowedSigners.load(tmp_path / "missing")
    assert "cannot read" in str(caught.value)


def test_revoked_keys_list_keys_or_fingerprints(keys: dict[str, Key]) -> None:
    ed, ec = keys["ed25519"], keys["ecdsa256"]
    revoked = RevokedKeys.parse(f"# gone\n{ed.public}\n{ec.fingerprint}\n", "revoked")
    assert revoked.fingerprints == {ed.fingerprint, ec.fingerprint}
    with pytest.raises(SignatureError) as caught:
        RevokedKeys.parse(b"SSHKRL\n\0" + b"\0" * 40)
    assert "binary KRLs" in str(caught.value)
    with pytest.raises(SignatureError) as caught:
        RevokedKeys.parse("SHA256:short\n", "revoked")
    assert "revoked, line 1" in str(caught.value) and "fingerprint" in str(caught.value)


# -- the render: every refusal before anything is downloaded -----------------

@dataclasses.dataclass
class Published:
    """A cloudlet published on a loopback HTTP server, its tarball counted."""

    server: FaultServer
    root: Path
    manifest: bytes
    tarball: Route
    manifest_route: Route | None = None
    signature_route: Route | None = None

    @property
    def url(self) -> str:
        return self.server.url("/cloudlets/tiny.json")

    def publish(self, manifest: bytes | None = None, signature: bytes | None = None) -> None:
        self.manifest_route = self.server.add("/cloudlets/tiny.json",
                                              Route(body=manifest or self.manifest))
        if signature is not None:
            self.signature_route = self.server.add("/cloudlets/tiny.json.sig",
                                                   Route(body=signature))

    def signed_by(self, key: Key, data: bytes | None = None, namespace: str = NS) -> bytes:
        path = self.root / f"sign-{time.monotonic_ns()}.json"
        path.write_bytes(data or self.manifest)
        return key.keygen_sign(path, namespace)


@pytest.fixture
def published(tmp_path: Path) -> Iterator[Published]:
    with FaultServer() as server:
        document = make_cloudlet(tmp_path / "c")
        tarball = Path(document["filesystem"]["url"])
        route = server.add("/rootfs/tiny.tar.gz", Route(body=tarball.read_bytes()))
        document["filesystem"]["url"] = server.url("/rootfs/tiny.tar.gz")
        yield Published(server=server, root=tmp_path, tarball=route,
                        manifest=json.dumps(document, indent=2).encode())


def renderer(base: Path, policy: TrustPolicy | None, **kwargs: Any) -> Renderer:
    if "ex_fetcher" not in kwargs:  # the published manifest is on loopback
        kwargs["ex_allow_hosts"] = LOOPBACK_HOSTS
    return Renderer(cache_dir=base / "cache", data_dir=base / "data",
                    ex_source_date_epoch=1_700_000_000, trust=policy, **kwargs)


def test_a_signed_manifest_renders_and_records_its_signer(published: Published,
                                                          keys: dict[str, Key],
                                                          tmp_path: Path) -> None:
    key = keys["ecdsa256"]
    published.publish(signature=published.signed_by(key))
    policy = TrustPolicy(AllowedSigners.parse(key.allowed("pub@example.com")))
    result = renderer(tmp_path, policy).render(published.url, str(tmp_path / "out") + "/",
                                               "local", "tar")
    assert result.details["signature"] == {"principal": "pub@example.com",
                                           "fingerprint": key.fingerprint,
                                           "key_type": "ecdsa-sha2-nistp256", "namespace": NS}
    assert result.to_dict()["signature"]["fingerprint"] == key.fingerprint
    assert published.tarball.requests == 1  # the counter below does count
    assert published.signature_route is not None and published.signature_route.requests == 1


def _case_missing(p: Published, keys: dict[str, Key]) -> None:
    p.publish()


def _case_tampered(p: Published, keys: dict[str, Key]) -> None:
    p.publish(manifest=p.manifest.replace(b"catalog test", b"catalog t3st"),
              signature=p.signed_by(keys["ed25519"]))


def _case_other_manifest(p: Published, keys: dict[str, Key]) -> None:
    p.publish(signature=p.signed_by(keys["ed25519"], b'{"name": "other", "version": "1"}'))


def _case_unknown_key(p: Published, keys: dict[str, Key]) -> None:
    p.publish(signature=p.signed_by(keys["other"]))


def _case_wrong_namespace(p: Published, keys: dict[str, Key]) -> None:
    p.publish(signature=p.signed_by(keys["ed25519"], namespace="git"))


def _case_malformed(p: Published, keys: dict[str, Key]) -> None:
    p.publish(signature=b"-----BEGIN SSH SIGNATURE-----\nU1NIU0lH\n-----END SSH SIGNATURE-----\n")


def _case_signed(p: Published, keys: dict[str, Key]) -> None:
    p.publish(signature=p.signed_by(keys["ed25519"]))


#: refusal → (publish, allowed_signers options, revoked, expected reason, message)
REFUSALS: dict[str, tuple[Callable[[Published, dict[str, Key]], None], str, bool, str, str]] = {
    "missing": (_case_missing, "", False, "missing", "a signature is required"),
    "tampered": (_case_tampered, "", False, "mismatch", "does not match the manifest's bytes"),
    "other-manifest": (_case_other_manifest, "", False, "mismatch", "does not match"),
    "unknown-key": (_case_unknown_key, "", False, "unknown-key", "is not in"),
    "expired": (_case_signed, 'valid-before="20200101Z"', False, "expired",
                "expired at 2020-01-01T00:00:00Z"),
    "not-yet-valid": (_case_signed, 'valid-after="29990101Z"', False, "not-yet-valid",
                      "not valid before 2999-01-01"),
    "revoked": (_case_signed, "", True, "revoked", "is revoked"),
    "wrong-namespace": (_case_wrong_namespace, "", False, "namespace",
                        "for namespace 'git', not 'cloudlets-manifest'"),
    "namespace-not-allowed": (_case_signed, 'namespaces="git"', False, "namespace",
                              "may sign namespaces 'git' only"),
    "malformed": (_case_malformed, "", False, "malformed", "malformed signature"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_each_refusal_names_its_reason_before_any_download(published: Published,
                                                           keys: dict[str, Key],
                                                           tmp_path: Path, case: str) -> None:
    setup, options, revoke, reason, message = REFUSALS[case]
    setup(published, keys)
    key = keys["ed25519"]
    policy = TrustPolicy(AllowedSigners.parse(key.allowed("pub@example.com", options)),
                         revoked=RevokedKeys([key.fingerprint] if revoke else []))
    with pytest.raises(SignatureError) as caught:
        renderer(tmp_path, policy).render(published.url, str(tmp_path / "out") + "/",
                                          "local", "tar")
    assert caught.value.reason == reason
    assert message in str(caught.value)
    assert published.url in str(caught.value)  # names what was checked
    assert published.manifest_route is not None and published.manifest_route.requests == 1
    assert published.tarball.requests == 0  # nothing downloaded
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.tar*"))


def test_the_signature_url_goes_through_the_fetchers_url_policy(published: Published,
                                                                keys: dict[str, Key],
                                                                tmp_path: Path) -> None:
    _case_signed(published, keys)
    policy = TrustPolicy(AllowedSigners.parse(keys["ed25519"].allowed("a@b")))
    strict = Fetcher(policy=UrlPolicy(hosts=frozenset({"mirror.example.org"})))
    # the manifest was read already (a URL manifest is read under the policy too:
    # the renderer would refuse it before its signature)
    loaded = Manifest.load(published.url, fetcher=Fetcher(policy=loopback_policy()))
    with pytest.raises(SignatureError) as caught:
        policy.check_manifest(loaded, published.url, fetcher=strict)
    assert caught.value.reason == "missing"
    assert "refused by the URL policy" in str(caught.value)
    assert published.signature_route is not None and published.signature_route.requests == 0


def test_an_oversized_signature_download_is_cut_off(published: Published,
                                                    keys: dict[str, Key],
                                                    tmp_path: Path) -> None:
    published.publish(signature=b"-" * (MAX_SIGNATURE_BYTES * 4))
    policy = TrustPolicy(AllowedSigners.parse(keys["ed25519"].allowed("a@b")))
    with pytest.raises(SignatureError) as caught:
        renderer(tmp_path, policy).prepare(published.url, "out/", "local", "tar")
    assert f"larger than {MAX_SIGNATURE_BYTES} bytes" in str(caught.value)
    assert published.tarball.requests == 0


def test_an_unsigned_manifest_renders_when_no_signature_is_required(
        published: Published, keys: dict[str, Key], tmp_path: Path) -> None:
    published.publish()
    policy = TrustPolicy(AllowedSigners.parse(keys["ed25519"].allowed("a@b")),
                         require_signature=False)
    job = renderer(tmp_path, policy).prepare(published.url, "out/", "local", "tar")
    assert job.signer is None
    published.publish(signature=published.signed_by(keys["other"]))
    with pytest.raises(SignatureError) as caught:  # a signature that is there must hold
        renderer(tmp_path, policy).prepare(published.url, "out/", "local", "tar")
    assert caught.value.reason == "unknown-key"


def test_a_per_call_policy_and_an_explicit_signature(keys: dict[str, Key],
                                                     tmp_path: Path) -> None:
    key = keys["ed25519"]
    path = manifest_file(tmp_path, json.dumps(make_cloudlet(tmp_path / "c")).encode())
    signature = key.keygen_sign(path)
    tenant = TrustPolicy(AllowedSigners.parse(key.allowed("tenant@example.com")))
    plain = Renderer(cache_dir=tmp_path / "cache", ex_allow_file_urls=True)
    with pytest.raises(SignatureError) as caught:
        plain.prepare(str(path), "out/", "local", "tar", signature=signature)
    assert caught.value.reason == "policy"  # no policy: a signature is not silently ignored
    job = plain.prepare(str(path), "out/", "local", "tar", signature=signature, trust=tenant)
    assert job.signer is not None and job.signer.principal == "tenant@example.com"
    assert plain.prepare(str(path), "out/", "local", "tar", trust=tenant,
                         signature=signature.decode()).signer == job.signer
    with pytest.raises(SignatureError) as caught:  # a dict has no published bytes
        plain.prepare(json.loads(path.read_bytes()), "out/", "local", "tar",
                      signature=signature, trust=tenant)
    assert caught.value.reason == "missing" and "published bytes" in str(caught.value)
    with pytest.raises(SignatureError) as caught:  # an explicit location must exist
        plain.prepare(str(path), "out/", "local", "tar", signature=str(tmp_path / "nope.sig"),
                      trust=dataclasses.replace(tenant, require_signature=False))
    assert caught.value.reason == "missing"


def test_signature_locations() -> None:
    assert signature_location("https://h/c/m.json?token=x") == "https://h/c/m.json.sig?token=x"
    assert signature_location("dir/m.json") == "dir/m.json.sig"
    assert signature_location(Path("m.json")) == "m.json.sig"
    assert signature_location('{"name": "x"}') is None
    assert signature_location({"name": "x"}) is None
    assert Manifest.load('{"name": "x"}').raw == b'{"name": "x"}'


def test_cli_render_requires_a_trusted_signature(keys: dict[str, Key], tmp_path: Path) -> None:
    key = keys["ed25519"]
    path = manifest_file(tmp_path, json.dumps(make_cloudlet(tmp_path / "c")).encode())
    allowed = tmp_path / "allowed"
    allowed.write_text(key.allowed("pub@example.com"))
    base = ["render", str(path), "-f", "tar", "-o", str(tmp_path / "out") + "/",
            "--cache-dir", str(tmp_path / "cache"), "--allow-file-urls", "--no-catalog",
            "--allowed-signers", str(allowed), "--require-signature", "--json"]
    out, err = io.StringIO(), io.StringIO()
    assert main(base, out, err) == 3
    assert json.loads(out.getvalue())["error"] == "SignatureError"
    assert not (tmp_path / "out").exists()
    signature = tmp_path / "elsewhere.sig"
    signature.write_bytes(key.keygen_sign(path))
    out, err = io.StringIO(), io.StringIO()
    assert main([*base, "--signature", str(signature)], out, err) == 0, err.getvalue()
    report = json.loads(out.getvalue())
    assert report["signature"]["fingerprint"] == key.fingerprint
    assert report["signature"]["principal"] == "pub@example.com"
    catalog = ["--catalog", str(tmp_path / "catalog.sqlite3")]
    recorded = ["render", str(path), "-f", "tar", "-o", str(tmp_path / "out") + "/",
                "--cache-dir", str(tmp_path / "cache"), "--allow-file-urls", "--overwrite",
                "--allowed-signers", str(allowed), "--require-signature",
                "--signature", str(signature), *catalog]
    out, err = io.StringIO(), io.StringIO()  # recorded in the catalog, shown to a person
    assert main(recorded, out, err) == 0, err.getvalue()
    assert f"signed by pub@example.com (ssh-ed25519 key {key.fingerprint})" in out.getvalue()
    out, err = io.StringIO(), io.StringIO()
    assert main(["image", "show", report["image_id"], "--json", *catalog], out, err) == 0
    assert json.loads(out.getvalue())["details"]["signature"]["fingerprint"] == key.fingerprint
    out, err = io.StringIO(), io.StringIO()
    assert main(["render", str(path), "-f", "tar", "-o", "x/", "--require-signature"],
                out, err) == 3
    assert "--require-signature needs --allowed-signers" in err.getvalue()


def test_a_revoked_key_reencoded_is_still_revoked(keys: dict[str, Key], tmp_path: Path) -> None:
    """The signed data does not cover the key blob: a revoked RSA key sent
    with a non-minimal exponent encoding (another blob, another naive
    fingerprint) must still be the revoked key."""
    import struct

    key = keys["rsa"]
    path = manifest_file(tmp_path)
    parsed = SshSignature.parse(key.keygen_sign(path))
    blob = parsed.public_key
    name_len = struct.unpack(">I", blob[:4])[0]
    offset = 4 + name_len
    e_len = struct.unpack(">I", blob[offset:offset + 4])[0]
    exponent = blob[offset + 4:offset + 4 + e_len]
    padded = (blob[:offset] + struct.pack(">I", e_len + 1) + b"\0" + exponent
              + blob[offset + 4 + e_len:])
    assert padded != blob
    forged = dataclasses.replace(parsed, public_key=padded).armor()
    policy = TrustPolicy(AllowedSigners.parse(key.allowed("a@b")),
                         revoked=RevokedKeys([key.fingerprint]))
    with pytest.raises(SignatureError) as caught:
        policy.verify(path.read_bytes(), forged)
    assert caught.value.reason in ("revoked", "malformed")
    unrevoked = dataclasses.replace(policy, revoked=RevokedKeys())
    try:
        signer = unrevoked.verify(path.read_bytes(), forged)
    except SignatureError as exc:
        assert exc.reason == "malformed"
    else:
        assert signer.fingerprint == key.fingerprint  # recorded as the key it is


def test_a_signature_dripped_byte_by_byte_is_cut_off_in_time() -> None:
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    stop = threading.Event()

    def drip() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(4096)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 60000\r\n\r\n")
            while not stop.is_set():
                try:
                    connection.sendall(b"-")
                except OSError:
                    return
                time.sleep(0.02)

    thread = threading.Thread(target=drip, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/m.json.sig"
    started = time.monotonic()
    try:
        with pytest.raises(FetchError) as caught:
            Fetcher(policy=loopback_policy(), read_timeout=0.5).read(
                url, max_bytes=MAX_SIGNATURE_BYTES, what="signature")
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    assert "took longer than 0.5 s" in str(caught.value)
    assert time.monotonic() - started < 3
