"""``cloudlets sign``, ``verify`` and ``verify-image``, and the signing
options of ``cloudlets render``: publisher signatures and provider
provenance on the command line (:doc:`/signing`).

A refused signature or provenance is a
:class:`~cloudlets.errors.SignatureError`, which the main command maps to
the invalid-input exit code (3).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

from cloudlets.cli_output import print_json
from cloudlets.errors import ConfigError, Problem, SignatureError
from cloudlets.manifest import Manifest

if TYPE_CHECKING:
    from cloudlets.signing import TrustPolicy

# cloudlets.signing (and cryptography) is imported by the commands that use
# it: a render that neither checks nor signs starts without it.

__all__ = ["add_render_options", "add_sign_parsers", "print_signing", "render_signing"]

T = TypeVar("T")


def add_sign_parsers(subparsers: Any) -> None:
    """Add ``sign``, ``verify`` and ``verify-image`` to the ``cloudlets``
    command.

    :param subparsers: the main parser's subparsers action.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")

    signer = subparsers.add_parser(
        "sign", parents=[common],
        help="sign a manifest file as `ssh-keygen -Y sign -n cloudlets-manifest` does")
    signer.add_argument("manifest", type=Path, help="the manifest file (its bytes are signed)")
    signer.add_argument("--key", "-k", type=Path, required=True,
                        help="the publisher's private key (OpenSSH or PEM; ed25519, ecdsa, rsa)")
    signer.add_argument("--output", type=Path,
                        help="where to write the signature (default: MANIFEST.sig)")
    signer.set_defaults(handler=_cmd_sign)

    verify = subparsers.add_parser(
        "verify", parents=[common], help="check a manifest's signature against a keyring")
    verify.add_argument("manifest", help="path or URL (its signature: MANIFEST.sig)")
    _trust_options(verify, required=True)
    verify.set_defaults(handler=_cmd_verify)

    image = subparsers.add_parser(
        "verify-image", parents=[common],
        help="check an artifact against its signed provenance")
    image.add_argument("artifact", type=Path, help="the artifact file (a disk, an OVA...)")
    image.add_argument("--provenance", type=Path, required=True,
                       help="the provenance envelope (*.provenance.intoto.json)")
    image.add_argument("--key", type=Path, required=True,
                       help="the provider's public key (PEM or OpenSSH .pub)")
    image.set_defaults(handler=_cmd_verify_image)


def _trust_options(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument("--allowed-signers", type=Path, required=required, metavar="FILE",
                        help="the keyring: an OpenSSH allowed_signers file")
    parser.add_argument("--revoked", type=Path, metavar="FILE",
                        help="revoked keys: public keys or SHA256: fingerprints, one a line")
    parser.add_argument("--signature", metavar="FILE",
                        help="the manifest's signature (default: MANIFEST.sig beside it)")
    parser.add_argument("--identity", metavar="PRINCIPAL",
                        help="require the signer to be allowed under this principal")


def add_render_options(render: argparse.ArgumentParser) -> None:
    """Add ``--allowed-signers``, ``--revoked``, ``--require-signature``,
    ``--signature``, ``--identity`` and ``--provenance-key`` to
    ``cloudlets render``."""
    _trust_options(render, required=False)
    render.add_argument("--require-signature", action="store_true",
                        help="refuse a manifest that no --allowed-signers key signed")
    render.add_argument("--provenance-key", type=Path, metavar="KEY",
                        help="sign the render's provenance with this private key (PEM or "
                             "OpenSSH; Ed25519 or ECDSA P-256), written beside the artifacts")


def render_signing(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`~cloudlets.Renderer` arguments of the signing options.

    :returns: ``{"trust": ..., "provenance_key": ...}`` (each ``None`` when
        not asked for) and the ``signature`` to pass to the render.
    :raises ConfigError: ``--require-signature`` without a keyring.
    :raises SignatureError: an unreadable keyring or key.
    """
    if args.require_signature and args.allowed_signers is None:
        raise ConfigError([Problem("", "--require-signature needs --allowed-signers FILE")],
                          "--require-signature")
    trust = _policy(args, require=args.require_signature) \
        if args.allowed_signers is not None else None
    key = None
    if args.provenance_key is not None:
        from cloudlets.signing import ProvenanceKey

        key = _with_passphrase(ProvenanceKey.load, args.provenance_key)
    return {"trust": trust, "provenance_key": key, "signature": args.signature}


def print_signing(out: TextIO, details: Mapping[str, Any]) -> None:
    """Write who signed the manifest and where the provenance went, when a
    render's ``details`` say so."""
    signer = details.get("signature")
    if signer:
        out.write(f"  signed by {signer['principal']} ({signer['key_type']} key "
                  f"{signer['fingerprint']})\n")
    provenance = details.get("provenance")
    if provenance:
        out.write(f"  provenance signed by {provenance['key_id']}: "
                  f"{provenance['location'] or 'in the catalog only'}\n")


def _policy(args: argparse.Namespace, *, require: bool) -> TrustPolicy:
    from cloudlets.signing import TrustPolicy

    return TrustPolicy.from_files(args.allowed_signers, args.revoked,
                                  require_signature=require, identity=args.identity)


def _with_passphrase(loader: Callable[[Path, bytes | None], T], path: Path) -> T:
    """``loader(path, None)``; for an encrypted key, again with a passphrase
    read from the terminal (never from an argument, which other users see
    in the process list)."""
    try:
        return loader(path, None)
    except SignatureError as exc:
        if "encrypted" not in str(exc) or not sys.stdin.isatty():
            raise
    return loader(path, getpass.getpass(f"passphrase for {path}: ").encode())


def _cmd_sign(args: argparse.Namespace, out: TextIO) -> int:
    from cloudlets.signing import NAMESPACE, load_private_key, sign
    from cloudlets.signing.sshsig import fingerprint, public_key_blob

    manifest = Manifest.load(args.manifest)  # only valid manifests are signed
    assert manifest.raw is not None  # read from a file
    key = _with_passphrase(load_private_key, args.key)
    armored = sign(manifest.raw, key)
    target = args.output or Path(str(args.manifest) + ".sig")
    _write_atomically(target, armored.encode())
    shown = fingerprint(public_key_blob(key))
    if getattr(args, "json", False):
        print_json(out, {"signature": str(target), "fingerprint": shown,
                         "namespace": NAMESPACE, "manifest": _manifest_info(manifest)})
    else:
        out.write(f"signed {manifest.label} with {shown}: {target}\n")
    return 0


def _write_atomically(target: Path, data: bytes) -> None:
    fd, temporary = tempfile.mkstemp(prefix=".sig-", dir=target.parent or Path("."))
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _cmd_verify(args: argparse.Namespace, out: TextIO) -> int:
    manifest = Manifest.load(args.manifest)
    signer = _policy(args, require=True).check_manifest(manifest, args.manifest,
                                                        signature=args.signature)
    assert signer is not None  # a signature is required
    if getattr(args, "json", False):
        print_json(out, {"valid": True, "signature": signer.to_dict(),
                         "manifest": _manifest_info(manifest)})
    else:
        out.write(f"good {signer.namespace!r} signature of {manifest.label} by "
                  f"{signer.principal} ({signer.key_type} key {signer.fingerprint})\n")
    return 0


def _cmd_verify_image(args: argparse.Namespace, out: TextIO) -> int:
    from cloudlets.signing import load_verify_key, verify_artifact
    from cloudlets.signing.provenance import MAX_ENVELOPE_BYTES
    from cloudlets.signing.sshsig import read_bounded

    key = load_verify_key(args.key)
    envelope = read_bounded(args.provenance, MAX_ENVELOPE_BYTES, "provenance", "malformed")
    subject = verify_artifact(args.artifact, envelope, key, str(args.provenance))
    if getattr(args, "json", False):
        print_json(out, {"valid": True, "artifact": str(args.artifact), "subject": subject})
    else:
        out.write(f"{args.artifact}: sha256 {subject['digest']['sha256']} is subject "
                  f"{subject.get('name')!r} of the provenance signed by the key\n")
    return 0


def _manifest_info(manifest: Manifest) -> dict[str, Any]:
    return {"name": manifest.name, "version": manifest.version, "digest": manifest.digest,
            "source": manifest.source}
