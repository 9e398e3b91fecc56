"""OpenSSH ``allowed_signers`` files (``ssh-keygen(1)``, ALLOWED SIGNERS) and
lists of revoked keys: the keyring of a :class:`~cloudlets.signing.TrustPolicy`.

One line per signer::

    *@example.com namespaces="cloudlets-manifest",valid-before="20271231Z" ssh-ed25519 AAAA...

Principals are a comma-separated pattern list (``*`` and ``?`` wildcards, a
leading ``!`` negates); options are ``namespaces="PATTERN-LIST"``,
``valid-after=`` and ``valid-before=`` (``YYYYMMDD[HHMM[SS]]``, with a
trailing ``Z`` for UTC, local time otherwise, as OpenSSH reads them).
``cert-authority`` lines (keys that sign SSH certificates) are refused with
a clear error: cloudlets verifies plain keys only. A line is matched as
``ssh-keygen -Y verify`` matches it: the first line holding the signer's key
(and, when an identity is asked for, a principal matching it) decides.
"""

from __future__ import annotations

import calendar
import fnmatch
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Self

from cloudlets.errors import SignatureError
from cloudlets.signing.sshsig import (
    KEY_TYPES,
    fingerprint,
    parse_public_line,
    read_bounded,
)

__all__ = ["AllowedSigners", "RevokedKeys", "Signer", "SignerEntry", "parse_timestamp"]

#: Largest ``allowed_signers`` or revocation file read.
MAX_FILE_BYTES = 4 * 1024 * 1024
#: Longest line (an RSA-16384 key is some 2.8 KiB of base64).
MAX_LINE_CHARS = 16 * 1024
#: Most entries in one file.
MAX_ENTRIES = 100_000

_TIMESTAMP = re.compile(r"^(\d{8})(\d{4})?(\d{2})?([Zz])?$")
_OPTION = re.compile(r'([A-Za-z-]+)(?:="((?:[^"\\]|\\.)*)"|=([^,\s"]*))?')
_KRL_MAGIC = b"SSHKRL\n\0"
#: A field starting so is a key type (perhaps one cloudlets refuses), not options.
_KEY_TYPE_PREFIXES = ("ssh-", "ecdsa-", "sk-", "rsa-")


def parse_timestamp(text: str, where: str | None = None) -> float:
    """Read an OpenSSH timestamp: ``YYYYMMDD``, ``YYYYMMDDHHMM`` or
    ``YYYYMMDDHHMMSS``, UTC with a trailing ``Z``, else local time.

    :returns: seconds since the epoch.
    :raises SignatureError: (``policy``) anything else.
    """
    match = _TIMESTAMP.match(text)
    if not match or (match.group(3) and not match.group(2)):
        raise SignatureError(f"timestamp {text!r} is not YYYYMMDD[HHMM[SS]][Z]", "policy",
                             where)
    digits = match.group(1) + (match.group(2) or "0000") + (match.group(3) or "00")
    try:
        parts = time.strptime(digits, "%Y%m%d%H%M%S")
    except ValueError:
        raise SignatureError(f"timestamp {text!r} is not a date", "policy", where) from None
    if match.group(4):
        return float(calendar.timegm(parts))
    return time.mktime(parts)


def match_pattern_list(name: str, patterns: Sequence[str]) -> bool:
    """OpenSSH's ``match_pattern_list``: ``name`` matches when a pattern
    matches and no negated (``!``) pattern does. Case matters."""
    matched = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        if fnmatch.fnmatchcase(name, pattern[1:] if negated else pattern):
            if negated:
                return False
            matched = True
    return matched


def _lines(data: bytes, what: str, source: str) -> Iterable[tuple[int, str]]:
    if len(data) > MAX_FILE_BYTES:
        raise SignatureError(f"{what} larger than {MAX_FILE_BYTES} bytes", "policy", source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SignatureError(f"{what} is not UTF-8 text", "policy", source) from None
    count = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) > MAX_LINE_CHARS:
            raise SignatureError(f"line {number} is longer than {MAX_LINE_CHARS} characters",
                                 "policy", source)
        count += 1
        if count > MAX_ENTRIES:
            raise SignatureError(f"more than {MAX_ENTRIES} entries", "policy", source)
        yield number, line


def _field(line: str) -> tuple[str, str]:
    """Split off the first field (which may be double-quoted, holding
    spaces): :returns: ``(field, rest)``."""
    if line.startswith('"'):
        end = line.find('"', 1)
        if end < 0:
            raise ValueError("unterminated quote")
        return line[1:end], line[end + 1:].lstrip()
    if " " not in line and "\t" not in line:
        return line, ""
    head, rest = re.split(r"[ \t]+", line, maxsplit=1)
    return head, rest


def _options_field(line: str) -> tuple[str, str]:
    """The options field: up to the first blank outside double quotes."""
    quoted = False
    for index, char in enumerate(line):
        if char == '"':
            quoted = not quoted
        elif char in " \t" and not quoted:
            return line[:index], line[index:].lstrip()
    if quoted:
        raise ValueError("unterminated quote in the options")
    return line, ""


@dataclass(frozen=True)
class SignerEntry:
    """One line of an ``allowed_signers`` file.

    :ivar principals: the principal patterns, as written.
    :ivar key: the signer's public key blob.
    :ivar namespaces: the namespace patterns the key may sign for; ``None``
        for any.
    :ivar valid_after: the key is not valid before this (epoch seconds).
    :ivar valid_before: the key is not valid after this (epoch seconds).
    :ivar line: the line number, for messages.
    """

    principals: tuple[str, ...]
    key: bytes
    namespaces: tuple[str, ...] | None = None
    valid_after: float | None = None
    valid_before: float | None = None
    line: int = 0

    @property
    def fingerprint(self) -> str:
        """The key's ``SHA256:`` fingerprint."""
        return fingerprint(self.key)


@dataclass(frozen=True)
class Signer:
    """Who signed, as the trust policy established it.

    :ivar principal: the principals of the ``allowed_signers`` line that
        allowed the key (comma-separated, as written), or the identity
        asked for.
    :ivar fingerprint: the key's ``SHA256:`` fingerprint, as ``ssh-keygen
        -l`` prints it.
    :ivar key_type: ``ssh-ed25519``, ``ecdsa-sha2-nistp256``, ``ssh-rsa``...
    :ivar namespace: the namespace the signature was made for.
    """

    principal: str
    fingerprint: str
    key_type: str
    namespace: str

    def to_dict(self) -> dict[str, str]:
        """:returns: a JSON-ready dict (``RenderResult.details["signature"]``)."""
        return {"principal": self.principal, "fingerprint": self.fingerprint,
                "key_type": self.key_type, "namespace": self.namespace}


class _KeyFile:
    """A provider's file of keys, read whole and bounded."""

    #: what the file is, for messages
    what: ClassVar[str] = "file"

    @classmethod
    def load(cls, path: str | Path) -> Self:
        """Read the file.

        :raises SignatureError: (``policy``) it cannot be read, is larger
            than :data:`MAX_FILE_BYTES`, or a line is malformed; the message
            names the line.
        """
        data = read_bounded(Path(path), MAX_FILE_BYTES, cls.what, "policy")
        return cls.parse(data, str(path))

    @classmethod
    def parse(cls, data: bytes | str, source: str) -> Self:
        raise NotImplementedError


class AllowedSigners(_KeyFile):
    """The parsed entries of an ``allowed_signers`` file.

    :param entries: the signers, in file order.
    :param source: where they came from, for messages.
    """

    what = "allowed signers file"

    def __init__(self, entries: Sequence[SignerEntry] = (), source: str = "allowed_signers") \
            -> None:
        self.entries = tuple(entries)
        self.source = source

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"<AllowedSigners {self.source} ({len(self.entries)} entries)>"

    @classmethod
    def parse(cls, data: bytes | str, source: str = "allowed_signers") -> Self:
        """Parse the content of an ``allowed_signers`` file.

        :raises SignatureError: as for :meth:`load`.
        """
        raw = data.encode() if isinstance(data, str) else data
        entries = [cls._entry(line, number, source)
                   for number, line in _lines(raw, cls.what, source)]
        return cls(entries, source)

    @staticmethod
    def _entry(line: str, number: int, source: str) -> SignerEntry:
        where = f"{source}, line {number}"
        try:
            principals, rest = _field(line)
            options = ""
            first = rest.split(None, 1)[0] if rest.strip() else ""
            if first and first not in KEY_TYPES and not first.startswith(_KEY_TYPE_PREFIXES):
                options, rest = _options_field(rest)
        except ValueError as exc:
            raise SignatureError(str(exc), "policy", where) from None
        if not principals or not rest:
            raise SignatureError("expected 'PRINCIPALS [OPTIONS] KEYTYPE BASE64'", "policy",
                                 where)
        patterns = tuple(p for p in principals.split(",") if p)
        if not patterns:
            raise SignatureError("no principal", "policy", where)
        namespaces: tuple[str, ...] | None = None
        after = before = None
        for name, value in _parse_options(options, where):
            if name == "cert-authority":
                raise SignatureError(
                    "cert-authority (SSH certificates) is not supported: list the signers' "
                    "own keys", "policy", where)
            if name not in ("namespaces", "valid-after", "valid-before"):
                raise SignatureError(f"unknown option {name!r} (cert-authority, namespaces, "
                                     "valid-after, valid-before)", "policy", where)
            if value is None:
                raise SignatureError(f"option {name!r} needs a value", "policy", where)
            if name == "namespaces":
                namespaces = tuple(n for n in value.split(",") if n)
            elif name == "valid-after":
                after = parse_timestamp(value, where)
            else:
                before = parse_timestamp(value, where)
        try:
            key = parse_public_line(rest, where)
        except SignatureError as exc:
            raise SignatureError(str(exc).removeprefix(f"{where}: "), "policy", where) from None
        return SignerEntry(principals=patterns, key=key, namespaces=namespaces,
                           valid_after=after, valid_before=before, line=number)

    def find(self, key: bytes, namespace: str, *, identity: str | None = None,
             now: float | None = None) -> SignerEntry:
        """The entry that allows ``key`` to sign for ``namespace`` at ``now``.

        :param key: the signer's public key blob.
        :param namespace: the signature's namespace.
        :param identity: when given, the entry must also have a principal
            pattern matching it (``ssh-keygen -Y verify -I``).
        :param now: the time to check validity at; default now.
        :returns: the first entry holding the key (and the identity).
        :raises SignatureError: ``unknown-key`` (no entry holds the key, or
            none for that identity), ``namespace`` (the entry does not allow
            the namespace), ``expired`` or ``not-yet-valid``.
        """
        when = time.time() if now is None else now
        shown = fingerprint(key)
        for entry in self.entries:
            if entry.key != key:
                continue
            if identity is not None and not match_pattern_list(identity, entry.principals):
                continue
            where = f"{self.source}, line {entry.line}"
            if entry.namespaces is not None and not match_pattern_list(namespace,
                                                                       entry.namespaces):
                raise SignatureError(
                    f"key {shown} may sign namespaces {','.join(entry.namespaces)!r} only, "
                    f"not {namespace!r} ({where})", "namespace")
            if entry.valid_after is not None and when < entry.valid_after:
                raise SignatureError(f"key {shown} is not valid before "
                                     f"{_shown_time(entry.valid_after)} ({where})",
                                     "not-yet-valid")
            if entry.valid_before is not None and when > entry.valid_before:
                raise SignatureError(f"key {shown} expired at "
                                     f"{_shown_time(entry.valid_before)} ({where})", "expired")
            return entry
        who = f" for identity {identity!r}" if identity is not None else ""
        raise SignatureError(f"key {shown} is not in {self.source}{who}", "unknown-key")


def _parse_options(options: str, where: str) -> list[tuple[str, str | None]]:
    found: list[tuple[str, str | None]] = []
    position = 0
    while position < len(options):
        match = _OPTION.match(options, position)
        if not match:
            raise SignatureError(f"malformed options at {options[position:position + 20]!r}",
                                 "policy", where)
        quoted, plain = match.group(2), match.group(3)
        value = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else plain
        found.append((match.group(1).lower(), value))
        position = match.end()
        if position < len(options):
            if options[position] != ",":
                raise SignatureError(f"malformed options at {options[position:][:20]!r}",
                                     "policy", where)
            position += 1
    return found


def _shown_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


class RevokedKeys(_KeyFile):
    """Keys no signature is accepted from, whatever ``allowed_signers`` says.

    A revocation file lists one key a line: a public key as in a ``.pub``
    file (``TYPE BASE64 [COMMENT]``) or its fingerprint (``SHA256:...`` as
    ``ssh-keygen -l`` prints it); ``#`` starts a comment. OpenSSH's binary
    KRL format is refused with a clear error.

    :param fingerprints: the revoked keys' ``SHA256:`` fingerprints.
    :param source: where they came from, for messages.
    """

    what = "revoked keys file"

    def __init__(self, fingerprints: Iterable[str] = (), source: str = "revoked keys") -> None:
        self.fingerprints = frozenset(fingerprints)
        self.source = source

    def __len__(self) -> int:
        return len(self.fingerprints)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, bytes) and fingerprint(key) in self.fingerprints

    @classmethod
    def parse(cls, data: bytes | str, source: str = "revoked keys") -> Self:
        """Parse a revocation file's content.

        :raises SignatureError: as for :meth:`load`.
        """
        raw = data.encode() if isinstance(data, str) else data
        if raw.startswith(_KRL_MAGIC):
            raise SignatureError("binary KRLs (ssh-keygen -k) are not supported: list the "
                                 "revoked public keys or fingerprints, one a line",
                                 "policy", source)
        found = []
        for number, line in _lines(raw, cls.what, source):
            where = f"{source}, line {number}"
            if re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", line):
                found.append(line)
                continue
            try:
                found.append(fingerprint(parse_public_line(line, where)))
            except SignatureError as exc:
                raise SignatureError(str(exc).removeprefix(f"{where}: ") + " (expected a "
                                     "public key or a SHA256: fingerprint)", "policy",
                                     where) from None
        return cls(found, source)
