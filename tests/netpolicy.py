"""The tests' loopback servers are reached only through explicit exceptions
to the default URL policy, which refuses loopback (as it refuses every
internal address): ``--allow-host 127.0.0.1:PORT``, ``ex_allow_hosts`` or
``UrlPolicy(allow_hosts=...)``, through the helpers here."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from cloudlets.fetch import Fetcher, UrlPolicy

#: Every loopback server a test starts listens on one of these.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def loopback_policy(**kwargs: Any) -> UrlPolicy:
    """:returns: the default URL policy, plus the loopback hosts (any port)."""
    return UrlPolicy(allow_hosts=frozenset(LOOPBACK_HOSTS), **kwargs)


def loopback_fetcher(**kwargs: Any) -> Fetcher:
    """:returns: a Fetcher that may reach the tests' loopback servers."""
    kwargs.setdefault("policy", loopback_policy())
    return Fetcher(**kwargs)


def host_port(url: str) -> str:
    """:returns: the ``HOST:PORT`` of ``url``, for ``--allow-host``."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    return f"{host}:{port}"


def allow_args(*urls: str) -> list[str]:
    """:returns: the ``--allow-host`` arguments that let ``cloudlets render``
    reach the servers of ``urls``."""
    return [arg for url in urls for arg in ("--allow-host", host_port(url))]
