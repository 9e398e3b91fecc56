"""URL helpers shared by every stage: credential redaction, location parsing."""

from __future__ import annotations

import re
from urllib.parse import SplitResult, urlsplit

__all__ = ["redact", "is_url"]

_SECRET_QUERY_KEYS = re.compile(
    r"(?i)(^|[&?])((?:x-amz-)?(?:signature|credential|security-token)|token|password|"
    r"passwd|secret|access_token|sig|key)=[^&]*")


def is_url(text: str) -> bool:
    """:returns: whether ``text`` looks like ``scheme://...`` (not a Windows
    drive letter or a bare path)."""
    return bool(re.match(r"^[A-Za-z][A-Za-z0-9+.-]+://", text))


def redact(url: str | None) -> str:
    """Hide credentials in a URL: the password of ``user:password@`` and the
    values of secret-looking query parameters. Anything that is not a URL is
    returned unchanged.

    >>> redact("https://bob:hunter2@example.com/x?sig=abc&a=1")
    'https://bob:***@example.com/x?sig=***&a=1'
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
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}" if ":" in userinfo else f"***@{host}"
    query = _SECRET_QUERY_KEYS.sub(lambda m: f"{m.group(1)}{m.group(2)}=***", parts.query)
    if netloc == parts.netloc and query == parts.query:
        return url  # nothing to hide; urlunsplit would drop an empty host
    return (f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")
            + (f"#{parts.fragment}" if parts.fragment else ""))
