"""URL helpers shared by every stage: credential redaction, location parsing.

:func:`redact` is the one function that hides secrets wherever a URL is
shown (errors, logs, ``--json``, cache metadata, catalog details);
:func:`redact_text` applies it to every URL inside a message, and
:func:`strip_credentials` removes the secrets altogether, for URLs that
leave the provider's hands (files inside a rendered image).
"""

from __future__ import annotations

import re
from urllib.parse import SplitResult, unquote_plus, urlsplit

__all__ = ["is_secret_key", "is_url", "redact", "redact_text", "strip_credentials"]

#: Shown in place of a secret.
MASK = "***"

#: Query keys (lower-cased, without ``-``, ``_`` and ``.``) whose value is a
#: secret when the key *contains* one of these words: ``X-Amz-Signature``,
#: ``X-Goog-Credential``, ``access_token``, ``api_key``, ``apikey``,
#: ``client_secret``, ``sessionid``, ``AWSAccessKeyId``...
_SECRET_WORDS = ("signature", "credential", "securitytoken", "token", "password", "passwd",
                 "secret", "session", "apikey", "accesskey", "privatekey", "auth", "jwt",
                 "cookie")
#: ... or *is* one of these (short words that are too common inside others).
_SECRET_KEYS = frozenset({"key", "sig", "pwd", "pass", "code", "ticket", "hmac"})
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]+")
_PATH_QUERY_IN_TEXT = re.compile(r"(?<![^\s\"'(])/[^\s\"'?<>]*\?[^\s\"'<>]*")


def is_url(text: str) -> bool:
    """:returns: whether ``text`` looks like ``scheme://...`` (not a Windows
    drive letter or a bare path)."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", text))


def is_secret_key(key: str) -> bool:
    """Whether a query parameter named ``key`` carries a secret
    (percent-encoding undone, any case, ``-``/``_``/``.`` ignored).

    :returns: ``True`` for a secret key."""
    norm = re.sub(r"[-_.\s]", "", unquote_plus(key)).lower()
    return norm in _SECRET_KEYS or any(word in norm for word in _SECRET_WORDS)


def _query(query: str, secret: str | None) -> str:
    """``query`` with the value of every secret key replaced by ``secret``,
    or the pair left out when ``secret`` is ``None``."""
    out = []
    for pair in query.split("&"):
        key, sep, _value = pair.partition("=")
        if not is_secret_key(key):
            out.append(pair)
        elif secret is not None:
            out.append(f"{key}={secret}" if sep else f"{key}")
    return "&".join(out)


def redact(url: str | None) -> str:
    """Hide credentials in a URL, for showing it: the password of
    ``user:password@`` (the whole user info when it has no password: it is
    then a token), the values of secret-looking query parameters
    (:func:`is_secret_key`), and the fragment (never sent to a server, and
    where OAuth puts its tokens). Anything that is not a URL is returned
    unchanged; a URL that cannot be parsed is not shown at all.

    >>> redact("https://bob:hunter2@example.com/x?sig=abc&a=1#t")
    'https://bob:***@example.com/x?sig=***&a=1#***'
    """
    if url is None:
        return ""
    if not is_url(url):
        return url
    try:
        parts: SplitResult = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{host}" if colon and user else f"{MASK}@{host}"
    query = _query(parts.query, MASK)
    fragment = MASK if parts.fragment else ""
    if netloc == parts.netloc and query == parts.query and fragment == parts.fragment:
        return url  # nothing to hide; urlunsplit would drop an empty host
    return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{fragment}" if fragment else ""))


def redact_text(text: str) -> str:
    """Redact every URL inside a message, and the query of every bare
    ``/path?query`` too (the request lines that urllib3 logs).

    :returns: ``text`` with each URL :func:`redact`-ed."""
    text = _URL_IN_TEXT.sub(lambda m: redact(m.group(0)), text)
    return _PATH_QUERY_IN_TEXT.sub(
        lambda m: redact("http://h" + m.group(0))[len("http://h"):], text)


def strip_credentials(url: str) -> str:
    """Remove the user info, the secret query parameters and the fragment
    of ``url``: what may be written where strangers read it (a file inside
    a rendered image). Anything that is not a URL is returned unchanged; a
    URL that cannot be parsed becomes ``""``.

    :returns: the URL without credentials.

    >>> strip_credentials("https://bob:hunter2@mirror.example/pkg/?token=abc&arch=x86")
    'https://mirror.example/pkg/?arch=x86'
    """
    if not is_url(url):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return ""
    host = parts.netloc.rsplit("@", 1)[-1]
    query = _query(parts.query, None)
    return f"{parts.scheme}://{host}{parts.path}" + (f"?{query}" if query else "")
