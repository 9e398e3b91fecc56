"""The service configuration file: TOML, read with :mod:`tomllib`.

A provider describes its service in one file::

    [service]
    listen = "127.0.0.1:8750"        # cloudlets serve --listen HOST:PORT overrides it
    data_dir = "state"               # relative paths are relative to this file
    workers = 2
    [targets.local]
    driver = "local"
    root = "images"
    [tenants.demo]
    token_env = "CLOUDLETS_TOKEN_DEMO"
    [fetch]
    allow_hosts = ["127.0.0.1:8080"]

Secrets (tokens, storage credentials) are taken from the environment
(``*_env`` keys) or from files (``*_file`` keys), never written in the file
itself; they are kept out of every message this module writes. A bad file
is refused with the key path of each problem (:class:`ServiceConfigError`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloudlets.cachelocks import DEFAULT_BASE_CACHE_MAX_BYTES
from cloudlets.config import Presets
from cloudlets.drivers.base import FormatDriver, StorageDriver
from cloudlets.drivers.providers import list_drivers, make_driver
from cloudlets.drivers.types import DriverKind, StorageCapability
from cloudlets.errors import CloudletsError, ConfigurationError
from cloudlets.mirrors import MirrorRules
from cloudlets.signing import ProvenanceKey, TrustPolicy

__all__ = [
    "DEFAULT_LISTEN",
    "FetchSettings",
    "FormatSettings",
    "Limits",
    "QueueSettings",
    "ServiceConfig",
    "ServiceConfigError",
    "Target",
    "TenantSettings",
    "parse_listen",
]

#: Where the service listens unless told otherwise.
DEFAULT_LISTEN = ("127.0.0.1", 8750)
#: Tenant and target names: they appear in storage locations and URLs.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
#: What a tenant may do.
OPERATIONS = frozenset({"create", "read", "delete"})

_SECTIONS = {"service", "limits", "targets", "formats", "tenants", "presets", "mirrors",
             "fetch", "queue", "signing"}
#: ``[service] render_workers``: the embedded pool's workers, each a render
#: process of its own (the default), or threads of the service's process.
RENDER_WORKERS = ("processes", "threads")
#: ``[queue] backend``: renders in the service's own threads, or on Celery workers.
QUEUE_BACKENDS = ("embedded", "celery")
#: What to install for ``[queue] backend = "celery"``.
CELERY_EXTRA_HINT = "pip install cloudlets[celery]"


class ServiceConfigError(ConfigurationError):
    """The service configuration file is invalid.

    :ivar problems: ``(key path, message)`` pairs, e.g.
        ``("targets.s3.secret_env", "environment variable S3_SECRET is not set")``.
    :ivar source: the file.
    """

    def __init__(self, problems: Sequence[tuple[str, str]], source: str) -> None:
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  {path}: {message}" for path, message in self.problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        super().__init__(f"invalid service config {source} ({len(self.problems)} {noun}):\n"
                         f"{lines}")


@dataclass(frozen=True)
class Limits:
    """What one request or tenant may use.

    :ivar max_body_bytes: largest request body accepted (413 above).
    :ivar queue_length: renders waiting for a worker, service-wide (429 above).
    :ivar renders_per_tenant: renders in flight (queued or rendering) per
        tenant (429 above).
    :ivar page_size: images per page of ``GET /v1/images`` by default.
    :ivar max_page_size: the most a client may ask for.
    """

    max_body_bytes: int = 1024 * 1024
    queue_length: int = 100
    renders_per_tenant: int = 4
    page_size: int = 50
    max_page_size: int = 500


@dataclass(frozen=True)
class Target:
    """A named storage target: where images of requests naming it go.

    :ivar name: the name clients use.
    :ivar driver: the storage driver, built once from the options.
    :ivar prefix: the location every image's own directory goes under, in
        the driver's syntax (``""`` under a local root,
        ``s3://bucket/images/``).
    """

    name: str
    driver: StorageDriver
    prefix: str


@dataclass(frozen=True)
class FormatSettings:
    """The provider's options for one format driver.

    :ivar name: the format driver's name.
    :ivar options: passed to the driver (secrets resolved).
    :ivar client_options: the option names a request's ``format_options`` may set.
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)
    client_options: frozenset[str] = frozenset()

    def build(self, requested: Mapping[str, Any] | None = None) -> FormatDriver:
        """:returns: the driver with the provider's options and the request's.
        :raises ConfigurationError: when the driver refuses them."""
        return make_driver(DriverKind.FORMAT, self.name, **{**(requested or {}),
                                                             **self.options})


@dataclass(frozen=True)
class TenantSettings:
    """One tenant: its token's sha256 and what it may do.

    :ivar name: the tenant's name.
    :ivar token_sha256: hex sha256 of the bearer token.
    :ivar admin: sees and deletes every tenant's images.
    :ivar operations: ``create``, ``read``, ``delete``.
    :ivar targets: the targets it may render to (``None``: all).
    :ivar fetch: its own URL policy settings (``[tenants.NAME.fetch]``),
        when it has one; else the service's apply.
    :ivar trust: its own trust policy (``[tenants.NAME.signing]``), when it
        has one; else the service's applies.
    """

    name: str
    token_sha256: str
    admin: bool = False
    operations: frozenset[str] = OPERATIONS
    targets: frozenset[str] | None = None
    fetch: FetchSettings | None = None
    trust: TrustPolicy | None = None

    def __repr__(self) -> str:  # the digest stays out of logs too
        return f"TenantSettings(name={self.name!r}, admin={self.admin})"


@dataclass(frozen=True)
class FetchSettings:
    """The URL policy of every render and ``manifest_url`` fetch.

    :ivar allow_hosts: ``host`` or ``host:port`` exceptions to the
        library's default policy (:class:`cloudlets.fetch.UrlPolicy`).
    :ivar only_hosts: when set, the only hosts a request may name (the
        provider's mirrors are added, ``allow_hosts`` are not): a closed
        deployment, or a test that must not reach past loopback.
    :ivar schemes: allowed URL schemes (``file`` is never allowed here).
    :ivar max_redirects: redirects followed per request.
    :ivar connect_timeout: seconds to wait for a connection.
    :ivar read_timeout: seconds to wait for bytes.
    :ivar deny_networks: when set, the address ranges refused
        (``ADDRESS/PREFIX``) instead of the library's default ones.
    :ivar allow_networks: ranges allowed although refused by the default
        (a provider's own mirror network, say).
    :ivar ports: when set, the only ports a URL may name.
    """

    allow_hosts: tuple[str, ...] = ()
    only_hosts: tuple[str, ...] | None = None
    deny_networks: tuple[str, ...] | None = None
    allow_networks: tuple[str, ...] = ()
    ports: tuple[int, ...] | None = None
    schemes: tuple[str, ...] = ("http", "https")
    max_redirects: int = 5
    connect_timeout: float = 10.0
    read_timeout: float = 60.0


@dataclass(frozen=True)
class QueueSettings:
    """Where claimed renders run (``[queue]``).

    :ivar backend: ``embedded`` (the service's own threads) or ``celery``
        (workers started with ``cloudlets worker``, through Redis).
    :ivar broker_url: the Redis broker, ``redis://HOST:PORT/DB``.
    :ivar result_backend: where workers report progress and results
        (default the broker).
    :ivar visibility_timeout: seconds after which a render whose worker
        took it and never acknowledged it (killed) is handed to another
        worker: longer than the longest render.
    :ivar max_attempts: deliveries of one render before it is failed.
    :ivar name: the Celery queue's name.
    :ivar poll_interval: seconds between the service's looks at a render's
        task state.
    """

    backend: str = "embedded"
    broker_url: str | None = None
    result_backend: str | None = None
    visibility_timeout: float = 3600.0
    max_attempts: int = 3
    name: str = "cloudlets"
    poll_interval: float = 0.5


@dataclass(frozen=True)
class ServiceConfig:
    """The whole service configuration.

    :ivar source: the file read, or ``<default>``.
    :ivar listen: ``(host, port)``.
    :ivar data_dir: the catalog, the service's records, work files.
    :ivar cache_dir: the tarball cache (default ``<data_dir>/cache``).
    :ivar cache_max_bytes: the tarball cache's bound (``None``: none).
    :ivar base_cache_max_bytes: the bound of the base filesystems under
        ``<cache_dir>/bases``, in bytes on disk.
    :ivar workers: renders run at once.
    :ivar shutdown_grace: seconds renders in flight get to finish on SIGTERM.
    :ivar formats: the formats offered, by name.
    :ivar targets: the storage targets, by name.
    :ivar tenants: the tenants, by name.
    :ivar presets: the provider's presets and locked keys.
    :ivar mirrors: the provider's mirror rules.
    :ivar fetch: the URL policy settings.
    :ivar limits: the request and tenant limits.
    :ivar queue: where renders run (``[queue]``).
    :ivar trust: the trust policy of every tenant without its own
        (``[signing]``), or ``None``: signatures are not checked.
    :ivar provenance_key: signs every render's provenance (``[signing]
        provenance_key``), or ``None``: no provenance.
    :ivar secrets: every secret value read (tokens, credentials), to keep
        out of responses and logs.
    :ivar render_workers: how the embedded pool renders: ``processes`` (one
        render process per worker) or ``threads`` (in the service's own
        process).
    """

    source: str
    listen: tuple[str, int]
    data_dir: Path
    cache_dir: Path
    workers: int
    shutdown_grace: float
    formats: Mapping[str, FormatSettings]
    targets: Mapping[str, Target]
    tenants: Mapping[str, TenantSettings]
    presets: Presets
    mirrors: tuple[Mapping[str, Any], ...]
    fetch: FetchSettings
    limits: Limits
    secrets: frozenset[str] = frozenset()
    queue: QueueSettings = QueueSettings()
    trust: TrustPolicy | None = None
    provenance_key: ProvenanceKey | None = None
    render_workers: str = "processes"
    cache_max_bytes: int | None = None
    base_cache_max_bytes: int | None = DEFAULT_BASE_CACHE_MAX_BYTES

    @classmethod
    def load(cls, path: str | Path, *, listen: str | None = None) -> ServiceConfig:
        """Read and check a configuration file.

        :param path: the TOML file; its relative paths are relative to it.
        :param listen: ``HOST:PORT`` overriding ``service.listen``.
        :raises ServiceConfigError: naming the key path of every problem.
        """
        path = Path(path)
        source = str(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ServiceConfigError([("", f"cannot read the file: {exc.strerror}")],
                                     source) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ServiceConfigError([("", f"not valid TOML: {exc}")], source) from None
        return _Reader(data, path.resolve().parent, source, listen).config()

    @classmethod
    def default(cls, data_dir: Path, admin_token_sha256: str, *,
                listen: str | None = None) -> ServiceConfig:
        """The configuration of ``cloudlets serve`` without a file: one
        local target under the data directory, one admin tenant.

        :param data_dir: the data directory.
        :param admin_token_sha256: the admin token's sha256.
        :param listen: ``HOST:PORT``; default 127.0.0.1:8750.
        """
        data = {
            "service": {"data_dir": str(data_dir)},
            "targets": {"local": {"driver": "local", "root": str(data_dir / "images")}},
            "tenants": {"admin": {"token_sha256": admin_token_sha256, "admin": True}},
        }
        return _Reader(data, data_dir, "<default>", listen).config()

    def format(self, name: str) -> FormatSettings | None:
        """:returns: the settings of an offered format, or ``None``."""
        return self.formats.get(name)


def parse_listen(text: str) -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:8750`` for IPv6).

    :raises ValueError: naming what is wrong.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT (e.g. 127.0.0.1:8750)")
    host = host.removeprefix("[").removesuffix("]")
    if not host:
        raise ValueError(f"{text!r} has no host")
    return host, int(port)


class _Reader:
    """Reads one configuration document, collecting every problem."""

    def __init__(self, data: Mapping[str, Any], base: Path, source: str,
                 listen: str | None) -> None:
        self.data = data
        self.base = base
        self.source = source
        self.listen_override = listen
        self.problems: list[tuple[str, str]] = []
        self.secrets: set[str] = set()

    # -- the document ----------------------------------------------------------

    def config(self) -> ServiceConfig:
        for key in sorted(set(self.data) - _SECTIONS):
            self.problem(key, f"unknown section (known: {', '.join(sorted(_SECTIONS))})")
        service = self.table("service")
        self.unknown(service, "service", {"listen", "data_dir", "cache_dir", "workers",
                                          "render_workers", "shutdown_grace", "formats",
                                          "cache_max_bytes", "base_cache_max_bytes"})
        listen = self.listen(service)
        data_dir = self.path(service, "data_dir", "state")
        cache_dir = self.path(service, "cache_dir", None) if "cache_dir" in service \
            else data_dir / "cache"
        workers = self.number(service, "service", "workers", 2, int, 1, 64)
        grace = self.number(service, "service", "shutdown_grace", 30.0, float, 0.0, 3600.0)
        render_workers = service.get("render_workers", "processes")
        if render_workers not in RENDER_WORKERS:
            self.problem("service.render_workers",
                         f"must be one of {', '.join(map(repr, RENDER_WORKERS))}")
        bounds = {key: int(self.number(service, "service", key, 0, int, 0, 2**62))
                  if key in service else None
                  for key in ("cache_max_bytes", "base_cache_max_bytes")}
        if bounds["base_cache_max_bytes"] is None:
            bounds["base_cache_max_bytes"] = DEFAULT_BASE_CACHE_MAX_BYTES
        limits = self.limits()
        formats = self.formats(service)
        targets = self.targets()
        fetch = self.fetch()
        signing = self.table("signing")
        self.unknown(signing, "signing", {"allowed_signers", "revoked", "require_signature",
                                          "provenance_key", "provenance_key_password_env"})
        trust = self.trust(signing, "signing") if signing.keys() & {
            "allowed_signers", "revoked", "require_signature"} else None
        provenance_key = self.provenance_key(signing)
        tenants = self.tenants(targets, fetch)
        presets = self.presets()
        mirrors = self.mirrors()
        queue = self.queue()
        if self.problems:
            raise ServiceConfigError(self.problems, self.source)
        return ServiceConfig(
            source=self.source, listen=listen, data_dir=data_dir, cache_dir=cache_dir,
            workers=int(workers), shutdown_grace=float(grace), formats=formats,
            targets=targets, tenants=tenants, presets=presets, mirrors=mirrors, fetch=fetch,
            limits=limits, secrets=frozenset(self.secrets), queue=queue, trust=trust,
            provenance_key=provenance_key, render_workers=str(render_workers),
            cache_max_bytes=bounds["cache_max_bytes"],
            base_cache_max_bytes=bounds["base_cache_max_bytes"])

    def trust(self, table: Mapping[str, Any], where: str) -> TrustPolicy | None:
        """A trust policy from ``allowed_signers`` (an OpenSSH file),
        ``revoked`` (a file of revoked keys) and ``require_signature``
        (default true); paths relative to the configuration file."""
        for key in ("allowed_signers", "revoked"):
            if key in table and (not isinstance(table[key], str) or not table[key]):
                self.problem(f"{where}.{key}", "must be a file path")
                return None
        if "allowed_signers" not in table:
            self.problem(f"{where}.allowed_signers", "a trust policy needs an allowed_signers "
                                                     "file")
            return None
        required = table.get("require_signature", True)
        if not isinstance(required, bool):
            self.problem(f"{where}.require_signature", "must be true or false")
            return None
        try:
            return TrustPolicy.from_files(
                self.base / table["allowed_signers"],
                self.base / table["revoked"] if "revoked" in table else None,
                require_signature=required)
        except CloudletsError as exc:
            self.problem(where, str(exc))
            return None

    def provenance_key(self, table: Mapping[str, Any]) -> ProvenanceKey | None:
        if "provenance_key" not in table:
            return None
        path = table["provenance_key"]
        if not isinstance(path, str) or not path:
            self.problem("signing.provenance_key", "must be a file path")
            return None
        password = None
        if "provenance_key_password_env" in table:
            password = self.secret(table["provenance_key_password_env"],
                                   "signing.provenance_key_password_env", "env")
        try:
            return ProvenanceKey.load(self.base / path,
                                      password.encode() if password is not None else None)
        except CloudletsError as exc:
            self.problem("signing.provenance_key", str(exc))
            return None

    def listen(self, service: Mapping[str, Any]) -> tuple[str, int]:
        text = self.listen_override
        where = "--listen"
        if text is None:
            value = service.get("listen")
            if value is None:
                return DEFAULT_LISTEN
            if not isinstance(value, str):
                self.problem("service.listen", "must be a string HOST:PORT")
                return DEFAULT_LISTEN
            text, where = value, "service.listen"
        try:
            return parse_listen(text)
        except ValueError as exc:
            self.problem(where, str(exc))
            return DEFAULT_LISTEN

    def limits(self) -> Limits:
        table = self.table("limits")
        defaults = Limits()
        names = ("max_body_bytes", "queue_length", "renders_per_tenant", "page_size",
                 "max_page_size")
        self.unknown(table, "limits", set(names))
        values = {name: int(self.number(table, "limits", name, getattr(defaults, name), int,
                                        1, 1 << 40)) for name in names}
        if values["page_size"] > values["max_page_size"]:
            self.problem("limits.page_size", "must not exceed limits.max_page_size")
        return Limits(**values)

    def formats(self, service: Mapping[str, Any]) -> dict[str, FormatSettings]:
        known = list_drivers(DriverKind.FORMAT)
        offered = service.get("formats", known)
        if not isinstance(offered, list) or not all(isinstance(n, str) for n in offered):
            self.problem("service.formats", "must be a list of format names")
            offered = known
        for name in offered:
            if name not in known:
                self.problem("service.formats", f"unknown format {name!r} "
                                                f"(known: {', '.join(known)})")
        tables = self.table("formats")
        result = {}
        for name in [n for n in offered if n in known]:
            where = f"formats.{name}"
            table = tables.get(name, {})
            if not isinstance(table, dict):
                self.problem(where, "must be a table")
                continue
            self.unknown(table, where, {"options", "client_options"})
            options = self.options(table.get("options", {}), f"{where}.options")
            client = table.get("client_options", [])
            if not isinstance(client, list) or not all(isinstance(o, str) for o in client):
                self.problem(f"{where}.client_options", "must be a list of option names")
                client = []
            settings = FormatSettings(name=name, options=options,
                                      client_options=frozenset(client))
            try:
                settings.build()
            except CloudletsError as exc:
                self.problem(f"{where}.options", str(exc))
                continue
            result[name] = settings
        for name in sorted(set(tables) - set(result)):
            if name not in offered:
                self.problem(f"formats.{name}", "is not in service.formats")
        return result

    def targets(self) -> dict[str, Target]:
        tables = self.table("targets")
        if not tables:
            self.problem("targets", "at least one storage target is needed")
        result = {}
        storages = list_drivers(DriverKind.STORAGE)
        for name, table in tables.items():
            where = f"targets.{name}"
            if not NAME_PATTERN.fullmatch(name):
                self.problem(where, "a target name is lower-case letters, digits, - and _")
                continue
            if not isinstance(table, dict):
                self.problem(where, "must be a table")
                continue
            driver_name = table.get("driver")
            if driver_name not in storages:
                self.problem(f"{where}.driver", f"must be one of {', '.join(storages)}")
                continue
            raw = {k: v for k, v in table.items() if k not in ("driver", "prefix")}
            options = self.options(raw, where)
            if driver_name == "local":
                root = options.get("root")
                if not isinstance(root, str) or not root:
                    self.problem(f"{where}.root", "a local target needs a root directory")
                    continue
                options["root"] = str(self.base / root)
            prefix = table.get("prefix", "")
            if not isinstance(prefix, str) or (prefix and not prefix.endswith("/")):
                self.problem(f"{where}.prefix", "must be a location ending in /")
                continue
            if driver_name != "local" and not prefix:
                self.problem(f"{where}.prefix", f"a {driver_name} target needs the location "
                                                "its images go under (e.g. s3://bucket/images/)")
                continue
            try:
                driver = make_driver(DriverKind.STORAGE, driver_name, **options)
            except CloudletsError as exc:
                self.problem(where, str(exc))
                continue
            if not driver.capabilities & StorageCapability.DELETE:
                self.problem(f"{where}.driver", f"storage {driver_name!r} cannot delete: "
                                                "DELETE /v1/images/{id} needs it")
                continue
            result[name] = Target(name=name, driver=driver, prefix=prefix)
        return result

    def tenants(self, targets: Mapping[str, Target],
                fetch: FetchSettings) -> dict[str, TenantSettings]:
        tables = self.table("tenants")
        if not tables:
            self.problem("tenants", "at least one tenant is needed")
        result: dict[str, TenantSettings] = {}
        seen: dict[str, str] = {}
        for name, table in tables.items():
            where = f"tenants.{name}"
            if not NAME_PATTERN.fullmatch(name):
                self.problem(where, "a tenant name is lower-case letters, digits, - and _")
                continue
            if not isinstance(table, dict):
                self.problem(where, "must be a table")
                continue
            self.unknown(table, where, {"token_env", "token_file", "token_sha256", "admin",
                                        "operations", "targets", "fetch", "signing"})
            own_fetch = self.tenant_fetch(table["fetch"], f"{where}.fetch", fetch) \
                if "fetch" in table else None
            own_trust = None
            if "signing" in table:
                if isinstance(table["signing"], dict):
                    self.unknown(table["signing"], f"{where}.signing",
                                 {"allowed_signers", "revoked", "require_signature"})
                    own_trust = self.trust(table["signing"], f"{where}.signing")
                else:
                    self.problem(f"{where}.signing", "must be a table")
            digest = self.token(table, where)
            admin = table.get("admin", False)
            if not isinstance(admin, bool):
                self.problem(f"{where}.admin", "must be true or false")
                admin = False
            operations = table.get("operations", sorted(OPERATIONS))
            if not isinstance(operations, list) or not set(operations) <= OPERATIONS:
                self.problem(f"{where}.operations",
                             f"must be a list of {', '.join(sorted(OPERATIONS))}")
                operations = []
            allowed = table.get("targets")
            if allowed is not None:
                if not isinstance(allowed, list) or not all(isinstance(t, str) for t in allowed):
                    self.problem(f"{where}.targets", "must be a list of target names")
                    allowed = []
                for target in allowed:
                    if target not in targets:
                        self.problem(f"{where}.targets", f"no target named {target!r}")
            if digest is None:
                continue
            if digest in seen:
                self.problem(where, f"has the same token as tenants.{seen[digest]}")
                continue
            seen[digest] = name
            result[name] = TenantSettings(
                name=name, token_sha256=digest, admin=admin, operations=frozenset(operations),
                targets=frozenset(allowed) if allowed is not None else None, fetch=own_fetch,
                trust=own_trust)
        return result

    def token(self, table: Mapping[str, Any], where: str) -> str | None:
        given = [k for k in ("token_env", "token_file", "token_sha256") if k in table]
        if len(given) != 1:
            self.problem(where, "needs exactly one of token_env, token_file, token_sha256")
            return None
        key = given[0]
        if key == "token_sha256":
            digest = table[key]
            if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
                self.problem(f"{where}.token_sha256", "must be 64 lower-case hex digits")
                return None
            return digest
        token = self.secret(table[key], f"{where}.{key}", key.removeprefix("token_"))
        if token is None:
            return None
        if len(token) < 16:
            self.problem(f"{where}.{key}", "the token is shorter than 16 characters")
            return None
        return hashlib.sha256(token.encode()).hexdigest()

    def presets(self) -> Presets:
        table = self.table("presets")
        self.unknown(table, "presets", {"config", "locked"})
        values = table.get("config", {})
        locked = table.get("locked", [])
        if not isinstance(locked, list) or not all(isinstance(k, str) for k in locked):
            self.problem("presets.locked", "must be a list of dotted config keys")
            locked = []
        try:
            return Presets(values=values, locked=frozenset(locked))
        except CloudletsError as exc:
            for problem in getattr(exc, "problems", []) or [exc]:
                pointer = getattr(problem, "pointer", "")
                self.problem("presets.config" + pointer.replace("/", "."),
                             getattr(problem, "message", str(problem)))
            return Presets()

    def mirrors(self) -> tuple[Mapping[str, Any], ...]:
        rules = self.data.get("mirrors", [])
        if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
            self.problem("mirrors", "must be an array of tables ([[mirrors]])")
            return ()
        try:
            MirrorRules.from_config(rules, source="service config")
            Presets(values={"mirrors": rules})
        except CloudletsError as exc:
            self.problem("mirrors", str(exc))
            return ()
        return tuple(rules)

    def fetch(self) -> FetchSettings:
        table = self.table("fetch")
        self.unknown(table, "fetch", {"allow_hosts", "only_hosts", "schemes", "max_redirects",
                                      "connect_timeout", "read_timeout", "deny_networks",
                                      "allow_networks", "ports"})
        allow = self.hosts(table, "fetch", "allow_hosts")
        deny = self.networks(table, "fetch", "deny_networks") if "deny_networks" in table \
            else None
        ports = self.ports(table, "fetch") if "ports" in table else None
        only = self.hosts(table, "fetch", "only_hosts") if "only_hosts" in table else None
        schemes = table.get("schemes", ["http", "https"])
        if not isinstance(schemes, list) or not set(schemes) <= {"http", "https"} \
                or not schemes:
            self.problem("fetch.schemes", "must be a non-empty list of http, https")
            schemes = ["http", "https"]
        return FetchSettings(
            allow_hosts=allow, only_hosts=only, schemes=tuple(schemes),
            deny_networks=deny, allow_networks=self.networks(table, "fetch", "allow_networks"),
            ports=ports,
            max_redirects=int(self.number(table, "fetch", "max_redirects", 5, int, 0, 20)),
            connect_timeout=float(self.number(table, "fetch", "connect_timeout", 10.0, float,
                                              0.1, 600.0)),
            read_timeout=float(self.number(table, "fetch", "read_timeout", 60.0, float,
                                           0.1, 3600.0)))

    def queue(self) -> QueueSettings:
        table = self.table("queue")
        self.unknown(table, "queue", {"backend", "broker_url", "result_backend",
                                      "visibility_timeout", "max_attempts", "name",
                                      "poll_interval"})
        defaults = QueueSettings()
        backend = table.get("backend", defaults.backend)
        if backend not in QUEUE_BACKENDS:
            self.problem("queue.backend", f"must be one of {', '.join(QUEUE_BACKENDS)}")
            backend = defaults.backend
        urls: dict[str, str | None] = {}
        for key in ("broker_url", "result_backend"):
            value = table.get(key)
            if value is not None and (not isinstance(value, str)
                                      or not re.match(r"rediss?://[^/\s]+(/\d+)?$", value)):
                self.problem(f"queue.{key}", "must be redis://HOST:PORT/DB (or rediss://)")
                value = None
            urls[key] = value
        name = table.get("name", defaults.name)
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            self.problem("queue.name", "a queue name is lower-case letters, digits, - and _")
            name = defaults.name
        if backend == "celery":
            if urls["broker_url"] is None and "broker_url" not in table:
                self.problem("queue.broker_url", 'backend = "celery" needs the Redis broker '
                                                 "(redis://HOST:PORT/DB)")
            for module in ("celery", "redis"):
                try:
                    __import__(module)
                except ImportError:
                    self.problem("queue.backend", f'backend = "celery" needs {module}, which '
                                                  f"is not installed: {CELERY_EXTRA_HINT}")
                    break
        return QueueSettings(
            backend=backend, broker_url=urls["broker_url"],
            result_backend=urls["result_backend"] or urls["broker_url"],
            visibility_timeout=self.number(table, "queue", "visibility_timeout",
                                           defaults.visibility_timeout, float, 1.0, 7 * 86400.0),
            max_attempts=int(self.number(table, "queue", "max_attempts", defaults.max_attempts,
                                         int, 1, 100)),
            name=name,
            poll_interval=self.number(table, "queue", "poll_interval", defaults.poll_interval,
                                      float, 0.01, 10.0))

    def tenant_fetch(self, table: Any, where: str, service: FetchSettings) -> FetchSettings:
        """A tenant's own ``[tenants.NAME.fetch]``: its ``allow_hosts`` and
        ``allow_networks`` are added to the service's, its ``only_hosts``,
        ``deny_networks`` and ``ports`` replace the service's."""
        if not isinstance(table, dict):
            self.problem(where, "must be a table")
            return service
        self.unknown(table, where, {"allow_hosts", "only_hosts", "allow_networks",
                                    "deny_networks", "ports"})
        allow = service.allow_hosts + self.hosts(table, where, "allow_hosts")
        only = self.hosts(table, where, "only_hosts") if "only_hosts" in table \
            else service.only_hosts
        deny = self.networks(table, where, "deny_networks") if "deny_networks" in table \
            else service.deny_networks
        ports = self.ports(table, where) if "ports" in table else service.ports
        return dataclasses.replace(
            service, allow_hosts=allow, only_hosts=only, deny_networks=deny, ports=ports,
            allow_networks=service.allow_networks + self.networks(table, where,
                                                                  "allow_networks"))

    def networks(self, table: Mapping[str, Any], where: str, key: str) -> tuple[str, ...]:
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
            self.problem(f"{where}.{key}", "must be a list of ADDRESS/PREFIX strings")
            return ()
        good = []
        for entry in value:
            try:
                good.append(str(ipaddress.ip_network(entry, strict=False)))
            except ValueError:
                self.problem(f"{where}.{key}", f"{entry!r} is not a network (ADDRESS/PREFIX)")
        return tuple(good)

    def ports(self, table: Mapping[str, Any], where: str) -> tuple[int, ...]:
        value = table.get("ports")
        if not isinstance(value, list) or not value or not all(
                isinstance(p, int) and not isinstance(p, bool) and 0 < p < 65536
                for p in value):
            self.problem(f"{where}.ports", "must be a non-empty list of port numbers")
            return ()
        return tuple(value)

    def hosts(self, table: Mapping[str, Any], where: str, key: str) -> tuple[str, ...]:
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(h, str) for h in value):
            self.problem(f"{where}.{key}", "must be a list of host or host:port strings")
            return ()
        good = []
        for entry in value:
            host, _, port = entry.rpartition(":") if entry.count(":") == 1 \
                or entry.startswith("[") else ("", "", "")
            host = (host or entry).strip("[]").lower()
            if port and not (port.isdigit() and 0 < int(port) < 65536):
                self.problem(f"{where}.{key}", f"{entry!r}: bad port")
                continue
            try:
                ipaddress.ip_address(host)
            except ValueError:
                if not re.fullmatch(r"\.?[a-z0-9]([a-z0-9.-]*[a-z0-9])?", host):
                    self.problem(f"{where}.{key}", f"{entry!r} is not a host name or address")
                    continue
            good.append(entry.lower())
        return tuple(good)

    # -- values ------------------------------------------------------------------

    def problem(self, path: str, message: str) -> None:
        for secret in self.secrets:
            message = message.replace(secret, "***")
        self.problems.append((path, message))

    def table(self, name: str) -> dict[str, Any]:
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            self.problem(name, "must be a table")
            return {}
        return value

    def unknown(self, table: Mapping[str, Any], where: str, known: set[str]) -> None:
        for key in sorted(set(table) - known):
            self.problem(f"{where}.{key}", f"unknown key (known: {', '.join(sorted(known))})")

    def number(self, table: Mapping[str, Any], where: str, key: str, default: float,
               kind: type, low: float, high: float) -> float:
        value = table.get(key, default)
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if kind is int:
            ok = ok and isinstance(value, int)
        if not ok or not low <= value <= high:
            noun = "an integer" if kind is int else "a number"
            self.problem(f"{where}.{key}", f"must be {noun} from {low:g} to {high:g}")
            return default
        return float(value)

    def path(self, service: Mapping[str, Any], key: str, default: str | None) -> Path:
        """A path of the ``[service]`` table, relative to the file."""
        value = service.get(key, default)
        if not isinstance(value, str) or not value:
            self.problem(f"service.{key}", "must be a path")
            value = default or "."
        return (self.base / value).resolve()

    def secret(self, reference: Any, where: str, kind: str) -> str | None:
        """Read a secret from an environment variable (``kind`` ``env``) or
        a file; the value itself never appears in a problem."""
        if not isinstance(reference, str) or not reference:
            self.problem(where, "must be a string")
            return None
        if kind == "env":
            value = os.environ.get(reference)
            if not value:
                self.problem(where, f"environment variable {reference} is not set")
                return None
        else:
            path = self.base / reference
            try:
                value = path.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                self.problem(where, f"cannot read {path}: {getattr(exc, 'strerror', exc)}")
                return None
            if not value:
                self.problem(where, f"{path} is empty")
                return None
        self.secrets.add(value)
        return value

    def options(self, table: Any, where: str) -> dict[str, Any]:
        """Driver options: ``NAME_env`` and ``NAME_file`` keys become ``NAME``
        with the secret's value."""
        if not isinstance(table, dict):
            self.problem(where, "must be a table")
            return {}
        options: dict[str, Any] = {}
        for key, value in table.items():
            for suffix, kind in (("_env", "env"), ("_file", "file")):
                if key.endswith(suffix):
                    secret = self.secret(value, f"{where}.{key}", kind)
                    if secret is not None:
                        options[key.removesuffix(suffix)] = secret
                    break
            else:
                options[key] = value
        return options
