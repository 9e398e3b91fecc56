"""Signed cloudlets in, signed provenance out.

* :mod:`cloudlets.signing.sshsig`: the OpenSSH signature format
  (``ssh-keygen -Y sign``) a publisher signs a manifest's bytes with;
* :mod:`cloudlets.signing.allowed_signers`: the provider's keyring (an
  OpenSSH ``allowed_signers`` file) and its revoked keys;
* :mod:`cloudlets.signing.trust`: the :class:`TrustPolicy` a
  :class:`~cloudlets.Renderer` applies before anything is downloaded;
* :mod:`cloudlets.signing.provenance`: the in-toto / SLSA provenance a
  render emits, in a DSSE envelope signed with the provider's key.

Every failure is a :class:`~cloudlets.errors.SignatureError` whose
``reason`` says which check failed.
"""

from cloudlets.signing.allowed_signers import AllowedSigners, RevokedKeys, Signer
from cloudlets.signing.provenance import (
    ProvenanceKey,
    load_verify_key,
    verify_artifact,
    verify_envelope,
)
from cloudlets.signing.sshsig import NAMESPACE, SshSignature, load_private_key, sign
from cloudlets.signing.trust import TrustPolicy, signature_location

__all__ = [
    "NAMESPACE",
    "AllowedSigners",
    "ProvenanceKey",
    "RevokedKeys",
    "Signer",
    "SshSignature",
    "TrustPolicy",
    "load_private_key",
    "load_verify_key",
    "sign",
    "signature_location",
    "verify_artifact",
    "verify_envelope",
]
