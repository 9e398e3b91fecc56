"""Which manifests a provider renders: the trust policy.

A :class:`TrustPolicy` is an OpenSSH ``allowed_signers`` keyring, a list of
revoked keys, and whether a signature is required. :meth:`TrustPolicy.check_manifest`
is what :meth:`Renderer.prepare <cloudlets.renderer.Renderer.prepare>` runs on
the manifest's exact bytes before anything is downloaded: it finds the
signature (passed in, or beside the manifest at ``PATH.sig`` / ``URL.sig``),
verifies it and returns the :class:`~cloudlets.signing.allowed_signers.Signer`.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit, urlunsplit

from cloudlets.errors import FetchError, SignatureError
from cloudlets.signing.allowed_signers import AllowedSigners, RevokedKeys, Signer
from cloudlets.signing.sshsig import (
    MAX_SIGNATURE_BYTES,
    NAMESPACE,
    SshSignature,
    parse_public_key,
    public_key_blob,
    read_bounded,
)
from cloudlets.urls import is_url, redact

if TYPE_CHECKING:
    from cloudlets.fetch import Fetcher
    from cloudlets.manifest import Manifest

__all__ = ["SignatureSource", "TrustPolicy", "signature_location"]

#: A signature as a caller passes it: the armored text (``str`` starting
#: with ``-----BEGIN SSH SIGNATURE-----``, or ``bytes``), or where to read it
#: (a :class:`~pathlib.Path`, a path string or an ``http(s)://`` URL).
SignatureSource = bytes | str | Path

_ARMOR = "-----BEGIN SSH SIGNATURE-----"


@dataclass(frozen=True)
class TrustPolicy:
    """Whose manifests are rendered.

    :ivar allowed_signers: the keyring (OpenSSH ``allowed_signers``).
    :ivar revoked: keys refused whatever the keyring says.
    :ivar require_signature: refuse an unsigned manifest. When ``False``, a
        manifest without a signature is rendered unsigned, but a signature
        that is there must still hold.
    :ivar namespace: the namespace signatures must be made for.
    :ivar identity: when set, the signer must be allowed under this
        principal (``ssh-keygen -Y verify -I``); by default any principal of
        the keyring.
    """

    allowed_signers: AllowedSigners
    revoked: RevokedKeys = field(default_factory=RevokedKeys)
    require_signature: bool = True
    namespace: str = NAMESPACE
    identity: str | None = None

    @classmethod
    def from_files(cls, allowed_signers: str | Path, revoked: str | Path | None = None, *,
                   require_signature: bool = True, identity: str | None = None) -> TrustPolicy:
        """Read the keyring and the revocation list from files.

        :raises SignatureError: (``policy``) for a file that cannot be read
            or a malformed line, named with its line number.
        """
        return cls(allowed_signers=AllowedSigners.load(allowed_signers),
                   revoked=RevokedKeys.load(revoked) if revoked is not None else RevokedKeys(),
                   require_signature=require_signature, identity=identity)

    def verify(self, message: bytes, signature: bytes | str, *, source: str | None = None,
               now: float | None = None) -> Signer:
        """Check that a trusted, unrevoked key signed ``message`` for this
        policy's namespace, and is valid ``now``.

        :param message: the exact bytes signed (the manifest file).
        :param signature: the armored signature.
        :param source: what ``message`` is (a path or URL), for messages.
        :param now: the time to check validity at; default now.
        :returns: who signed.
        :raises SignatureError: naming the reason: ``malformed``,
            ``namespace``, ``algorithm``, ``mismatch``, ``revoked``,
            ``unknown-key``, ``expired``, ``not-yet-valid``.
        """
        parsed = SshSignature.parse(signature, source)
        parsed.verify(message, self.namespace, source)
        # compared and fingerprinted in its canonical encoding, as the
        # keyring's and the revocation list's keys are
        key = public_key_blob(parse_public_key(parsed.public_key, source))
        parsed = dataclasses.replace(parsed, public_key=key)
        if parsed.public_key in self.revoked:
            raise SignatureError(f"key {parsed.fingerprint} is revoked ({self.revoked.source})",
                                 "revoked", source)
        try:
            entry = self.allowed_signers.find(parsed.public_key, parsed.namespace,
                                              identity=self.identity,
                                              now=time.time() if now is None else now)
        except SignatureError as exc:
            raise SignatureError(str(exc), exc.reason, source) from None
        return Signer(principal=self.identity or ",".join(entry.principals),
                      fingerprint=parsed.fingerprint, key_type=parsed.key_type,
                      namespace=parsed.namespace)

    def check_manifest(self, manifest: Manifest, source: Any = None, *,
                       signature: SignatureSource | None = None,
                       fetcher: Fetcher | None = None,
                       now: float | None = None) -> Signer | None:
        """Verify a loaded manifest's signature, as a render does before
        anything is downloaded.

        :param manifest: the manifest, loaded from ``source``; its
            :attr:`~cloudlets.manifest.Manifest.raw` bytes are what is verified.
        :param source: what the manifest was loaded from (a path or URL gives
            the default signature location, ``source + ".sig"``).
        :param signature: the signature, or where to read it; default beside
            ``source``.
        :param fetcher: reads a signature URL (its URL policy applies); a
            default :class:`~cloudlets.fetch.Fetcher` when not given.
        :param now: the time to check validity at; default now.
        :returns: who signed, or ``None`` for an unsigned manifest the policy
            accepts (``require_signature=False``).
        :raises SignatureError: ``missing`` (no signature where one is
            required, or the manifest's bytes are unknown), or a reason of
            :meth:`verify`.
        """
        shown = manifest.source
        location = signature_location(source) if signature is None else None
        if signature is None and location is None:
            if not self.require_signature:
                return None
            raise SignatureError("a signature is required: pass one (the manifest was not "
                                 "given as a path or URL, so none is looked for beside it)",
                                 "missing", shown)
        if manifest.raw is None:
            raise SignatureError("the manifest's published bytes are unknown (it was given "
                                 "as a dict): load it from its file or URL to verify it",
                                 "missing", shown)
        armored: bytes | str | None
        if signature is None or (isinstance(signature, str)
                                 and not signature.lstrip().startswith(_ARMOR)):
            # an explicit location must hold a signature even when none is required
            armored = _read_signature(str(location if signature is None else signature),
                                      fetcher,
                                      required=self.require_signature or signature is not None)
            if armored is None:
                return None
        elif isinstance(signature, Path):
            armored = read_bounded(signature, MAX_SIGNATURE_BYTES, "signature", "missing")
        else:
            armored = signature
        return self.verify(manifest.raw, armored, source=shown, now=now)


def signature_location(source: Any) -> str | None:
    """Where a manifest's signature is looked for.

    :returns: its path or URL with ``.sig`` appended to the path (a URL's
        query string is kept); ``None`` for a manifest given as a dict, a
        JSON string or a :class:`~cloudlets.manifest.Manifest`.
    """
    if isinstance(source, Path):
        return str(source) + ".sig"
    if not isinstance(source, str) or source.lstrip().startswith(("{", "[")):
        return None
    if is_url(source):
        parts = urlsplit(source)
        return urlunsplit(parts._replace(path=parts.path + ".sig"))
    return source + ".sig"


def _read_signature(location: str, fetcher: Fetcher | None, *,
                    required: bool) -> bytes | None:
    """:returns: the signature at ``location``, or ``None`` when there is
    none and none is required."""
    shown = redact(location)
    if location.startswith(("http://", "https://")):
        from cloudlets.fetch import Fetcher

        try:
            data = (fetcher or Fetcher()).read(location, max_bytes=MAX_SIGNATURE_BYTES,
                                               what="signature")
        except FetchError as exc:
            raise SignatureError(f"cannot fetch the signature: {exc}", "missing",
                                 shown) from None
    else:
        path = Path(unquote(urlsplit(location).path)) if is_url(location) else Path(location)
        if is_url(location) and not location.startswith("file://"):
            raise SignatureError("a signature URL must be http, https or file", "missing",
                                 shown)
        data = None if not path.exists() else read_bounded(path, MAX_SIGNATURE_BYTES,
                                                           "signature", "missing")
    if data is None and required:
        raise SignatureError("a signature is required and there is none (not found)",
                             "missing", shown)
    return data
