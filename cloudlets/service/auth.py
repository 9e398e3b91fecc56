"""Tenants and their bearer tokens.

Tokens are kept only as sha256 digests and compared with
:func:`hmac.compare_digest`, against every tenant so the time taken does not
say which one came close.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from cloudlets.errors import ConfigurationError
from cloudlets.service.config import TenantSettings

__all__ = ["Authenticator", "ensure_admin_token", "token_digest"]

_BEARER = "bearer "


def token_digest(token: str) -> str:
    """:returns: the hex sha256 of a token, as the configuration stores it."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


class Authenticator:
    """Finds the tenant of an ``Authorization: Bearer`` header.

    :param tenants: the configured tenants, by name.
    """

    def __init__(self, tenants: Mapping[str, TenantSettings]) -> None:
        self._tenants = [(bytes.fromhex(t.token_sha256), t) for t in tenants.values()]

    def tenant(self, authorization: str | None) -> TenantSettings | None:
        """The tenant of a header's token.

        :returns: the tenant, or ``None`` (no header, another scheme, or an
            unknown token)."""
        if not authorization or authorization[:len(_BEARER)].lower() != _BEARER:
            return None
        presented = hashlib.sha256(
            authorization[len(_BEARER):].strip().encode("utf-8", "surrogateescape")).digest()
        found = None
        for digest, tenant in self._tenants:
            if hmac.compare_digest(presented, digest):
                found = tenant
        return found


def ensure_admin_token(path: Path) -> str:
    """The admin token of ``cloudlets serve`` without a configuration: read
    from ``path``, or generated and written there readable only by its owner.

    :returns: the token's sha256 (the token itself is not returned: it is
        for the file's reader, not for this process's output).
    :raises ConfigurationError: when the file cannot be written, or is
        readable by others.
    """
    try:
        if path.exists():
            if path.stat().st_mode & 0o077:
                raise ConfigurationError(f"{path} is readable by others: chmod 600 it")
            token = path.read_text(encoding="utf-8").strip()
            if len(token) >= 16:
                return token_digest(token)
        path.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(32)
        temporary = path.parent / f".{path.name}.tmp"
        temporary.unlink(missing_ok=True)
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(token + "\n")
        os.replace(temporary, path)
    except OSError as exc:
        raise ConfigurationError(f"cannot write the admin token file {path}: "
                                 f"{exc.strerror}") from None
    return token_digest(token)
