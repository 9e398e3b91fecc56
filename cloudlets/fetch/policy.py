"""What may be fetched and how failures are retried: :class:`UrlPolicy`
(schemes, hosts, ports and the address ranges a download may reach),
:class:`RetryPolicy`, and :func:`check_sha256` for the digest asked for."""

from __future__ import annotations

import ipaddress
import random
import re
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import SplitResult, urlsplit

from cloudlets.errors import ConfigurationError, FetchError
from cloudlets.urls import is_url, redact

__all__ = ["DEFAULT_DENY_NETWORKS", "HostPort", "RetryPolicy", "UrlPolicy", "check_sha256",
           "literal_ip", "url_port"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_sha256(value: str) -> str:
    """:returns: ``value`` lower-cased.

    :raises ConfigurationError: when it is not 64 hex digits.
    """
    low = value.lower() if isinstance(value, str) else ""
    if not _SHA256.match(low):
        raise ConfigurationError(f"{value!r} is not a sha256 digest (64 hex digits)")
    return low


@dataclass(frozen=True)
class RetryPolicy:
    """How failed requests are retried.

    Attempt *n* (from 0) that fails waits ``uniform(0, min(max_delay,
    backoff * factor ** n))`` seconds ("full jitter") before the next, or the
    server's ``Retry-After`` when it is longer (capped by ``max_delay``). No
    new attempt starts once ``total_time`` seconds have passed since the
    first, or after ``attempts`` attempts in all.

    Retried: connection errors, timeouts, a body cut short, and the statuses
    in ``retry_statuses`` (429 and every 5xx but 501 and 505, which are
    permanent). Anything else fails at once.

    :ivar attempts: most attempts per URL, first included (1 = no retry).
    :ivar backoff: the base delay, in seconds.
    :ivar factor: growth of the delay per attempt.
    :ivar max_delay: longest single wait, in seconds.
    :ivar total_time: no attempt starts later than this after the first one.
    :ivar retry_statuses: the HTTP statuses worth another attempt.
    """

    attempts: int = 5
    backoff: float = 0.5
    factor: float = 2.0
    max_delay: float = 30.0
    total_time: float = 300.0
    retry_statuses: frozenset[int] = field(default_factory=lambda: frozenset(
        {429} | set(range(500, 600)) - {501, 505}))

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigurationError(
                f"RetryPolicy.attempts must be at least 1, not {self.attempts}")
        for name in ("backoff", "factor", "max_delay", "total_time"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"RetryPolicy.{name} must not be negative")

    def delay(self, attempt: int, retry_after: float | None = None,
              rng: random.Random | None = None) -> float:
        """:returns: the seconds to wait after failed attempt ``attempt`` (from 0).

        :param attempt: how many attempts failed before this one, minus one.
        :param retry_after: the server's ``Retry-After``, in seconds, if any.
        :param rng: the random source for the jitter.
        """
        ceiling = min(self.max_delay, self.backoff * self.factor ** attempt)
        wait = (rng or random).uniform(0, ceiling)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_delay))
        return wait


#: The address ranges a download may not reach unless allowed, by rule
#: name (the name an error gives): what is inside the provider's own
#: machine or network, the cloud metadata service (169.254.169.254) among
#: them, and what no tarball server can be.
DEFAULT_DENY_NETWORKS: Mapping[str, tuple[str, ...]] = {
    "loopback": ("127.0.0.0/8", "::1/128"),
    "private (RFC 1918)": ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"),
    "link-local (cloud metadata)": ("169.254.0.0/16", "fe80::/10"),
    "shared address space (CGNAT, RFC 6598)": ("100.64.0.0/10",),
    "unique local (IPv6 ULA)": ("fc00::/7", "fec0::/10"),
    "multicast": ("224.0.0.0/4", "ff00::/8"),
    "unspecified": ("0.0.0.0/8", "::/128"),
    "reserved": ("240.0.0.0/4",),
}

#: Where an IPv6 address embeds an IPv4 one that is checked too
#: (``::ffff:127.0.0.1`` connects to 127.0.0.1).
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def literal_ip(host: str) -> IPAddress | None:
    """:returns: the address ``host`` denotes when it is an IP literal in any
    notation a resolver accepts (``127.0.0.1``, ``[::1]``, and the legacy
    IPv4 forms ``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1``),
    else ``None`` (a name)."""
    host = host.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if not host or not re.fullmatch(r"[0-9a-fA-FxX.]+", host) or not host[0].isdigit():
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _embedded_ipv4(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


@dataclass(frozen=True)
class HostPort:
    """One ``HOST[:PORT]`` exception of :attr:`UrlPolicy.allow_hosts`.

    :ivar host: a host name (lower case) or an IP address (normalised).
    :ivar port: the only port allowed, or ``None`` for any.
    """

    host: str
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> HostPort:
        """Read ``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` (a URL's
        netloc too: its user info is dropped).

        :raises ConfigurationError: for an empty host or a bad port.
        """
        value = str(text).strip().rsplit("@", 1)[-1]
        host, port = value, ""
        if value.startswith("["):
            host, _, rest = value[1:].partition("]")
            if rest and not rest.startswith(":"):
                raise ConfigurationError(f"allowed host {text!r}: expected [ADDRESS]:PORT")
            port = rest[1:]
        elif value.count(":") == 1:
            host, port = value.split(":")
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ConfigurationError(f"allowed host {text!r}: {port!r} is not a port number")
        host = host.strip().rstrip(".").lower()
        if not host or any(c in host for c in "/@?#\\ "):
            raise ConfigurationError(f"allowed host {text!r}: expected HOST[:PORT]")
        address = literal_ip(host)
        return cls(str(address) if address is not None else host, int(port) if port else None)

    def matches(self, host: str, port: int, address: IPAddress | None = None) -> bool:
        """Whether a connection to ``host`` (as the URL names it) at
        ``port``, reaching ``address``, is this exception.

        :returns: ``True`` when it is."""
        if self.port is not None and self.port != port:
            return False
        literal = literal_ip(host)
        name = str(literal) if literal is not None else host.rstrip(".").lower()
        return name == self.host or (address is not None and str(address) == self.host)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"


def _networks(values: Iterable[str | IPNetwork], what: str) -> tuple[IPNetwork, ...]:
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value, strict=False))
        except (TypeError, ValueError):
            raise ConfigurationError(f"UrlPolicy.{what}: {value!r} is not a network "
                                     "(ADDRESS/PREFIX)") from None
    return tuple(out)


_RULE_NAMES = {net: name for name, nets in DEFAULT_DENY_NETWORKS.items()
               for net in _networks(nets, "deny_networks")}


def url_port(parts: SplitResult) -> int:
    """The port a split URL connects to (its scheme's default when it names none).

    :returns: the port.
    :raises ValueError: for a port out of range."""
    port = parts.port
    return port if port is not None else (443 if parts.scheme.lower() == "https" else 80)


@dataclass(frozen=True)
class UrlPolicy:
    """Which URLs may be fetched, and which addresses a download may reach.

    The scheme, host and port rules apply to every URL and every redirect
    hop before any connection. The address rules apply to the address
    actually connected to: the :class:`~cloudlets.fetch.Fetcher` resolves
    each host itself, checks every address it would connect to and connects
    to that very address (no DNS-rebinding gap), on every hop; an IP literal
    in the URL, in any notation (``2130706433``, ``0x7f000001``), is checked
    before that.

    By default a download may reach neither the provider's machine nor its
    networks: :data:`DEFAULT_DENY_NETWORKS` (loopback, RFC 1918 private,
    link-local with the cloud metadata address, CGNAT, IPv6 ULA and
    link-local, multicast, unspecified). Exceptions are named hosts
    (``allow_hosts``) or networks (``allow_networks``); the mirrors the
    provider configured are allowed too (see :meth:`Fetcher.fetch
    <cloudlets.fetch.Fetcher.fetch>`).

    A service builds one per tenant from its configuration with
    :meth:`from_dict`.

    :ivar schemes: allowed URL schemes. ``file`` (which also covers plain
        local paths) is refused unless listed, or unless ``allow_file`` is set.
    :ivar allow_file: shorthand to add ``file`` to ``schemes``.
    :ivar hosts: when set, the only host names allowed; an entry starting
        with a dot (``.example.com``) allows every subdomain of it.
    :ivar max_redirects: most redirects followed for one request.
    :ivar allow_hosts: ``HOST`` or ``HOST:PORT`` exceptions to the address
        rules (strings or :class:`HostPort`): a URL naming the host (or
        connecting to the address, for an IP entry) at that port may reach
        any address. ``HOST`` alone allows every port.
    :ivar deny_networks: the address ranges refused (``ADDRESS/PREFIX``
        strings or networks); :data:`DEFAULT_DENY_NETWORKS` by default. An
        empty list refuses none.
    :ivar allow_networks: ranges allowed although inside ``deny_networks``
        (a provider's own mirror network, say ``10.20.0.0/16``).
    :ivar ports: when set, the only ports a URL may name (its scheme's
        default port when it names none).

    Lists may be given as any iterable; they are kept as a ``frozenset`` of
    :class:`HostPort` (``allow_hosts``), tuples of networks, and a
    ``frozenset`` of ports.
    """

    schemes: frozenset[str] = frozenset({"http", "https"})
    allow_file: bool = False
    hosts: frozenset[str] | None = None
    max_redirects: int = 5
    allow_hosts: Iterable[HostPort | str] = frozenset()
    deny_networks: Iterable[IPNetwork | str] = tuple(_RULE_NAMES)
    allow_networks: Iterable[IPNetwork | str] = ()
    ports: Iterable[int] | None = None

    def __post_init__(self) -> None:
        schemes = frozenset(s.lower() for s in self.schemes)
        if self.allow_file:
            schemes |= {"file"}
        unknown = schemes - {"http", "https", "file"}
        if unknown:
            raise ConfigurationError(f"UrlPolicy: unsupported schemes {sorted(unknown)} "
                                     "(supported: file, http, https)")
        object.__setattr__(self, "schemes", schemes)
        if self.hosts is not None:
            object.__setattr__(self, "hosts", frozenset(h.lower() for h in self.hosts))
        if self.max_redirects < 0:
            raise ConfigurationError("UrlPolicy.max_redirects must not be negative")
        if isinstance(self.allow_hosts, str) or isinstance(self.deny_networks, str) \
                or isinstance(self.allow_networks, str):
            raise ConfigurationError("UrlPolicy: allow_hosts, deny_networks and "
                                     "allow_networks are lists, not one string")
        object.__setattr__(self, "allow_hosts", frozenset(
            h if isinstance(h, HostPort) else HostPort.parse(h) for h in self.allow_hosts))
        object.__setattr__(self, "deny_networks", _networks(self.deny_networks,
                                                            "deny_networks"))
        object.__setattr__(self, "allow_networks", _networks(self.allow_networks,
                                                             "allow_networks"))
        if self.ports is not None:
            ports = frozenset(self.ports)
            if not all(isinstance(p, int) and 0 < p < 65536 for p in ports):
                raise ConfigurationError(f"UrlPolicy.ports: {sorted(ports)} are not all port "
                                         "numbers")
            object.__setattr__(self, "ports", ports)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "fetch") -> UrlPolicy:
        """Build a policy from its configuration form, e.g. a service's TOML
        ``[fetch]`` table: ``schemes``, ``allow_file``, ``hosts``,
        ``max_redirects``, ``allow_hosts``, ``deny_networks``,
        ``allow_networks``, ``ports`` (lists of strings and numbers, as the
        attributes above).

        :param data: the table.
        :param where: its key path, for error messages.
        :raises ConfigurationError: naming the key of an unknown or bad value.
        """
        if not isinstance(data, Mapping):
            raise ConfigurationError(f"{where}: expected a table of URL policy settings")
        known = {"schemes", "allow_file", "hosts", "max_redirects", "allow_hosts",
                 "deny_networks", "allow_networks", "ports"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigurationError(f"{where}.{unknown[0]}: unknown URL policy setting "
                                     f"(known: {', '.join(sorted(known))})")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key == "allow_file":
                if not isinstance(value, bool):
                    raise ConfigurationError(f"{where}.{key}: expected true or false")
            elif key == "max_redirects":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ConfigurationError(f"{where}.{key}: expected a number")
            elif not isinstance(value, (list, tuple)) or isinstance(value, str):
                raise ConfigurationError(f"{where}.{key}: expected a list")
            elif key in ("schemes", "hosts", "allow_hosts", "ports"):
                value = frozenset(value)
            else:
                value = tuple(value)
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{where}: {exc}") from None

    def allowing(self, hosts: Iterable[str | HostPort]) -> UrlPolicy:
        """:returns: this policy with more ``allow_hosts`` exceptions."""
        import dataclasses

        extra = {h if isinstance(h, HostPort) else HostPort.parse(h) for h in hosts}
        return dataclasses.replace(self, allow_hosts=frozenset(self.allow_hosts) | extra)

    def problem(self, url: str, allowed: Iterable[HostPort] = ()) -> str | None:
        """Check ``url`` before any connection: scheme, host, port, and an IP
        literal in a refused range.

        :returns: why ``url`` is refused, or ``None`` when it is allowed.
        :param allowed: exceptions of this request only (the provider's
            mirror it was rewritten to).
        """
        scheme = urlsplit(url).scheme.lower() if is_url(url) else "file"
        if scheme not in self.schemes:
            return (f"scheme {scheme!r} is not allowed (allowed: "
                    f"{', '.join(sorted(self.schemes))})")
        if scheme == "file":
            return None
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if not host:
            return "the URL names no host"
        try:
            port = url_port(parts)
        except ValueError:
            return "the URL's port is not a number from 1 to 65535"
        if self.hosts is not None and not (
                host in self.hosts
                or any(h.startswith(".") and host.endswith(h) for h in self.hosts)):
            return f"host {host!r} is not in the allowed hosts"
        if self.ports is not None and port not in self.ports:
            return f"port {port} is not in the allowed ports"
        address = literal_ip(host)
        if address is not None:
            return self.address_problem(host, port, address, allowed)
        return None

    def address_problem(self, host: str, port: int, address: IPAddress | str,
                        allowed: Iterable[HostPort] = ()) -> str | None:
        """Check a connection to ``address`` (resolved from ``host``, at
        ``port``). The answer names the rule but not the address of a name:
        what a host resolves to inside a provider's network is not for a
        requester to learn.

        :returns: why the connection is refused, or ``None`` when it is allowed.
        :param allowed: exceptions of this request only.
        """
        if isinstance(address, str):
            address = ipaddress.ip_address(address.split("%", 1)[0])
        exceptions = cast("frozenset[HostPort]", self.allow_hosts)
        if any(h.matches(host, port, address) for h in (*exceptions, *allowed)):
            return None
        checked = {address, _embedded_ipv4(address)}
        if any(a in net for a in checked
               for net in cast("tuple[IPNetwork, ...]", self.allow_networks)):
            return None
        for net in cast("tuple[IPNetwork, ...]", self.deny_networks):
            if any(a.version == net.version and a in net for a in checked):
                rule = _RULE_NAMES.get(net, "deny_networks")
                literal = literal_ip(host)
                if literal is None:
                    what, hint = f"host {host!r} resolves to an address that", host
                else:
                    hint = str(literal)
                    what = f"address {hint}" + ("" if hint == host else f" ({host!r})")
                return (f"{what} is in {net} (rule {rule!r}); allow it with --allow-host "
                        f"{HostPort(hint, port)} (UrlPolicy.allow_hosts)")
        return None

    def check(self, url: str, what: str = "URL") -> None:
        """:raises FetchError: when ``url`` is refused, naming why."""
        problem = self.problem(url)
        if problem:
            raise FetchError(f"{what} {redact(url)} refused by the URL policy: {problem}",
                             url=redact(url))
