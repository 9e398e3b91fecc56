"""Render configuration: what the hosting provider presets and the requester
supplies (host name, IP interfaces, DNS, SSH keys, mirrors, manifest args).

Merge order: the manifest's argument defaults < provider :class:`Presets` <
the request. Objects merge key by key; a list is one value, replaced whole.
A provider may lock preset keys (dotted paths such as ``ip`` or
``dns.nameservers``); a request that sets a locked key or anything inside it
fails with :class:`~cloudlets.errors.LockedKeyError` naming it, while the
keys beside it stay settable (``dns.search`` with ``dns.nameservers``
locked): docs/config.rst has the table, key by key.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from cloudlets.errors import ConfigError, LockedKeyError, Problem
from cloudlets.jsondoc import (
    MAX_JSON_DEPTH,
    JSONSyntaxError,
    digest,
    document_problems,
    parse_json,
    pointer,
    schema_problems,
)
from cloudlets.userschema import validate_subschema

if TYPE_CHECKING:
    from cloudlets.manifest import Manifest

__all__ = ["Presets", "RenderConfig", "is_presets_document", "load_config_file",
           "resolve_config", "set_dotted"]

#: File name of the render config schema in ``cloudlets/schemas/``.
SCHEMA_NAME = "config-v1.json"

#: Largest render config or presets file accepted, in bytes.
MAX_CONFIG_BYTES = 1024 * 1024
#: The argument schema keyword that lets a string argument hold line breaks.
MULTILINE_KEYWORD = "x-multiline"

_INTERFACE_KEYS = ("name", "dhcp", "address", "prefix", "addresses", "gateway", "mac", "mtu")
# Control characters no config string may hold (tab and newline are allowed
# in free text such as arguments; the typed keys' patterns refuse them).
_CONTROL = frozenset(chr(c) for c in (*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F))


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a render config (or presets) file: JSON, or TOML when its name
    ends in ``.toml`` (read with :mod:`tomllib`; a TOML date or time, which
    JSON has not, is refused).

    :raises ConfigError: when it cannot be read or is not an object.
    """
    try:
        with open(path, "rb") as handle:
            text = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([Problem("", f"cannot read: {exc.strerror or exc}")], str(path)) \
            from None
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError([Problem("", f"larger than {MAX_CONFIG_BYTES} bytes")], str(path))
    if str(path).endswith(".toml"):
        return _load_toml(text, str(path))
    try:
        data = parse_json(text)
    except JSONSyntaxError as exc:
        raise ConfigError([exc.problem], str(path)) from None
    if not isinstance(data, dict):
        raise ConfigError([Problem("", "a render config must be a JSON object")], str(path))
    return data


def _load_toml(text: bytes, source: str) -> dict[str, Any]:
    import tomllib

    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem("", f"not UTF-8 (byte {exc.start})")], source) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem("", f"not TOML: {exc}")], source) from None
    except RecursionError:
        raise ConfigError([Problem("", f"nested deeper than {MAX_JSON_DEPTH} levels")],
                          source) from None
    problems = document_problems(data)
    if problems:
        raise ConfigError(problems, source)
    return data


def is_presets_document(data: Mapping[str, Any]) -> bool:
    """Whether a config file's content is a presets document (top-level
    ``config`` or ``locked``, which a render config never has) rather than a
    render config."""
    return "config" in data or "locked" in data


def validate_config(data: Mapping[str, Any], source: str | None = None) -> None:
    """Check a (partial) config against the config schema.

    :raises ConfigError: listing every problem.
    """
    problems = document_problems(dict(data))
    if not problems:
        problems = schema_problems(dict(data), SCHEMA_NAME)
        problems.extend(_interface_problems(data))
        problems.extend(_control_problems(data))
    if problems:
        raise ConfigError(problems, source)


def _strings(value: Any, path: tuple[str | int, ...]) -> Iterable[tuple[tuple[str | int, ...],
                                                                       str]]:
    """Every string in ``value`` (keys too), with its path (iterative)."""
    stack = [(value, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, str):
            yield where, node
        elif isinstance(node, dict):
            for key, child in node.items():
                yield (*where, key), key
                stack.append((child, (*where, key)))
        elif isinstance(node, list):
            stack.extend((child, (*where, i)) for i, child in enumerate(node))


def _control_problems(data: Mapping[str, Any]) -> list[Problem]:
    return [Problem(pointer(where), f"{text[:60]!r} holds a control character")
            for where, text in _strings(dict(data), ()) if not _CONTROL.isdisjoint(text)]


def _arg_problems(args: Mapping[str, Any], schemas: Mapping[str, Mapping[str, Any]], *,
                  names_the_host: bool) -> list[Problem]:
    """Each argument against its own schema (so its local ``$ref`` pointers
    resolve inside it), line breaks refused unless the schema sets
    ``"x-multiline": true``, and, when ``names_the_host`` (no ``hostname``
    key is set), a ``hostname`` argument held to the host name rule."""
    problems = validate_subschema(dict(args), {
        "type": "object", "additionalProperties": False,
        "properties": dict.fromkeys(schemas, True),
        "required": sorted(n for n, s in schemas.items() if "default" not in s),
    }, ["args"])
    for name, value in args.items():
        schema = schemas.get(name)
        if schema is None:
            continue
        problems.extend(validate_subschema(value, schema, ["args", name]))
        if schema.get(MULTILINE_KEYWORD) is not True:
            problems.extend(
                Problem(pointer(["args", *where]), f"{text[:60]!r} holds a line break (the "
                        f"argument's schema allows them with \"{MULTILINE_KEYWORD}\": true)")
                for where, text in _strings(value, (name,)) if "\n" in text or "\r" in text)
    host = args.get("hostname")
    if names_the_host and isinstance(host, str) and host:
        problems.extend(Problem("/args" + p.pointer, p.message)
                        for p in schema_problems({"hostname": host}, SCHEMA_NAME))
    return problems


def _interface_problems(data: Mapping[str, Any]) -> list[Problem]:
    interfaces = data.get("ip", {}).get("interfaces") if isinstance(data.get("ip"), dict) else None
    if not isinstance(interfaces, list):
        return []
    problems = []
    seen: set[str] = set()
    for index, iface in enumerate(interfaces):
        if not isinstance(iface, dict):
            continue
        where = f"/ip/interfaces/{index}"
        name = iface.get("name")
        if name in seen:
            problems.append(Problem(f"{where}/name", f"interface {name!r} is listed twice"))
        seen.add(str(name))
        cidrs = iface.get("addresses")
        if cidrs is not None and ("address" in iface or "prefix" in iface):
            problems.append(Problem(where, "use either 'addresses' (CIDR) or 'address' and "
                                           "'prefix', not both"))
        for position, text in enumerate(cidrs if isinstance(cidrs, list) else []):
            if not isinstance(text, str) or "/" not in text:
                continue  # the schema said so
            try:
                ipaddress.ip_interface(text)
            except ValueError as exc:
                problems.append(Problem(f"{where}/addresses/{position}", str(exc)))
        if iface.get("dhcp"):
            continue
        if "address" not in iface:
            if cidrs is None:
                problems.append(Problem(where, "a static interface needs 'addresses' or "
                                               "'address' (or set \"dhcp\": true)"))
            continue
        try:
            address = ipaddress.ip_address(iface["address"])
        except ValueError:
            continue
        prefix = iface.get("prefix", 24 if address.version == 4 else 64)
        if isinstance(prefix, int) and address.version == 4 and prefix > 32:
            problems.append(Problem(f"{where}/prefix", f"{prefix} is longer than 32 for IPv4"))
    return problems


#: Most list items a dotted key's index may address (``ip.interfaces.15``).
MAX_INDEX = 1024


def set_dotted(data: dict[str, Any], key: str, value: Any, *, append: bool = False) -> None:
    """Set ``a.b.c`` in a nested dict, creating the levels in between.

    A part that is a decimal number indexes a list (``ip.interfaces.0.address``):
    an existing list item, or the item just past the end, which is added;
    a missing level before it becomes a list. With ``append``, the value is
    added to the end of the list the key names (made when missing); a list
    value adds each of its items, as Python's ``+=`` does.

    :raises ConfigError: when a level in between is not an object (or, for
        an index, a list), an index skips items, or ``append`` names a value
        that is not a list.
    """
    parts = key.split(".")
    if not all(parts):
        raise ConfigError([Problem("", f"{key!r} is not a dotted key")])
    if len(parts) > MAX_JSON_DEPTH:
        raise ConfigError([Problem("", f"{key[:60]!r}...: more than {MAX_JSON_DEPTH} levels")])

    def fail(depth: int, message: str) -> ConfigError:
        return ConfigError([Problem(pointer(parts[: depth + 1]), f"cannot set {key!r}: {message}")])

    node: Any = data
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        following = parts[depth + 1] if not last else None
        if last and append:
            fresh: Any = []
        elif last:
            fresh = value
        else:
            fresh = [] if following is not None and following.isdigit() else {}
        where = ".".join(parts[:depth + 1])
        if isinstance(node, list):
            if not part.isdigit() or int(part) > min(len(node), MAX_INDEX):
                raise fail(depth, f"{'.'.join(parts[:depth]) or 'the value'!r} is a list of "
                                  f"{len(node)}: use an index from 0 to {len(node)}")
            index = int(part)
            if index == len(node):
                node.append(fresh)
            elif last and not append:
                node[index] = fresh
            child = node[index]
        else:
            if last and not append:
                node[part] = fresh
            child = node.setdefault(part, fresh)
        if last:
            if append:
                if not isinstance(child, list):
                    raise fail(depth, f"{where!r} is not a list to add to")
                child.extend(value if isinstance(value, list) else [value])
            return
        if not isinstance(child, (dict, list)):
            raise fail(depth, f"{where!r} is not an object")
        node = child


def _leaf_paths(data: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterable[tuple[str, ...]]:
    for key, value in data.items():
        path = (*prefix, key)
        if isinstance(value, Mapping) and value:
            yield from _leaf_paths(value, path)
        else:
            yield path


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


@dataclass(frozen=True)
class Presets:
    """What a hosting provider presets for every render, and which of those
    keys a request may not override.

    :ivar values: a (partial) render config.
    :ivar locked: dotted keys a request cannot set (``ip``, ``dns.nameservers``).
    """

    values: Mapping[str, Any] = field(default_factory=dict)
    locked: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", copy.deepcopy(dict(self.values)))
        object.__setattr__(self, "locked", frozenset(self.locked))
        validate_config(self.values, "presets")

    @classmethod
    def load(cls, path: str | Path) -> Presets:
        """Read presets from a file: ``{"config": {...}, "locked": [...]}``
        in JSON, or the same in TOML when the name ends in ``.toml``
        (``locked = [...]`` then a ``[config]`` table; ``cloudlets init``
        writes an example).

        :raises ConfigError: when the file is invalid.
        """
        return cls.from_document(load_config_file(path), str(path))

    @classmethod
    def from_document(cls, data: Mapping[str, Any], source: str = "presets") -> Presets:
        """Presets from a parsed presets document.

        :raises ConfigError: when it is invalid.
        """
        unknown = sorted(set(data) - {"config", "locked"})
        if unknown:
            raise ConfigError([Problem(f"/{k}", "unknown key (known keys: config, locked)")
                               for k in unknown], source)
        locked = data.get("locked", [])
        if not isinstance(locked, list) or not all(isinstance(k, str) for k in locked):
            raise ConfigError([Problem("/locked", "must be a list of dotted keys")], source)
        values = data.get("config", {})
        if not isinstance(values, dict):
            raise ConfigError([Problem("/config", "must be an object")], source)
        return cls(values=values, locked=frozenset(locked))

    def violations(self, request: Mapping[str, Any]) -> list[str]:
        """The locked keys ``request`` tries to set. A locked key is set by
        a request value at it, inside it, or at a key above it that is not
        an object holding other keys (an empty object, a list, a scalar);
        objects in the request reach it key by key.

        :returns: those keys, sorted.
        """
        hits = set()
        for path in _leaf_paths(request):
            dotted = ".".join(path)
            for locked in self.locked:
                if dotted == locked or dotted.startswith(locked + ".") \
                        or locked.startswith(dotted + "."):
                    hits.add(locked)
        return sorted(hits)


class RenderConfig:
    """A merged, validated render configuration. Build it with
    :func:`resolve_config`."""

    def __init__(self, data: Mapping[str, Any], manifest_name: str) -> None:
        self._data = copy.deepcopy(dict(data))
        self._manifest_name = manifest_name
        self.digest: str = digest(self._data)
        """sha256 of the canonical JSON form of the merged config."""

    @property
    def data(self) -> Mapping[str, Any]:
        """The merged config (read-only view)."""
        return MappingProxyType(self._data)

    def to_dict(self) -> dict[str, Any]:
        """:returns: a deep copy of the merged config."""
        return copy.deepcopy(self._data)

    @property
    def hostname(self) -> str:
        """The host name: ``hostname``, else the ``hostname`` argument, else
        the manifest name."""
        if "hostname" in self._data:
            return str(self._data["hostname"])
        arg = self._data.get("args", {}).get("hostname")
        return str(arg) if isinstance(arg, str) and arg else self._manifest_name

    @property
    def interfaces(self) -> list[dict[str, Any]]:
        """Interfaces with every key present, so templates can test any of
        them: ``name``, ``dhcp`` (default false), ``addresses`` (CIDR
        strings, ``[]`` when none), ``address`` and ``prefix`` (the first
        address and its prefix length: an interface given ``address``
        without ``prefix`` gets 24 for IPv4, 64 for IPv6), ``gateway``,
        ``mac``, ``mtu`` (``None`` when not set)."""
        result = []
        for iface in self._data.get("ip", {}).get("interfaces", []):
            full: dict[str, Any] = dict.fromkeys(_INTERFACE_KEYS)
            full.update(copy.deepcopy(iface))
            full["dhcp"] = bool(full["dhcp"])
            if full["addresses"]:
                first = ipaddress.ip_interface(full["addresses"][0])
                full["address"], full["prefix"] = str(first.ip), first.network.prefixlen
            elif full["address"] is not None:
                if full["prefix"] is None:
                    version = ipaddress.ip_address(full["address"]).version
                    full["prefix"] = 24 if version == 4 else 64
                full["addresses"] = [f"{full['address']}/{full['prefix']}"]
            else:
                full["addresses"] = []
            result.append(full)
        return result

    @property
    def dns(self) -> dict[str, list[str]]:
        dns = self._data.get("dns", {})
        return {"nameservers": list(dns.get("nameservers", [])),
                "search": list(dns.get("search", []))}

    @property
    def ssh_authorized_keys(self) -> list[str]:
        return list(self._data.get("ssh_authorized_keys", []))

    @property
    def mirrors(self) -> list[dict[str, Any]]:
        return copy.deepcopy(self._data.get("mirrors", []))

    @property
    def args(self) -> dict[str, Any]:
        return copy.deepcopy(self._data.get("args", {}))

    def __repr__(self) -> str:
        return f"<RenderConfig hostname={self.hostname!r} digest={self.digest[:12]}>"


def resolve_config(manifest: Manifest, presets: Presets | None = None,
                   request: Mapping[str, Any] | None = None) -> RenderConfig:
    """Merge manifest defaults < presets < request, and validate the result.

    :param manifest: supplies the argument schemas and their defaults.
    :param presets: the provider's presets and locks.
    :param request: what the requester asked for.
    :raises LockedKeyError: when the request sets a locked key.
    :raises ConfigError: when the request or the merged config is invalid.
    """
    presets = presets or Presets()
    request = dict(request or {})
    validate_config(request, "request")
    violations = presets.violations(request)
    if violations:
        raise LockedKeyError(violations)
    arg_schemas = manifest.args
    merged: dict[str, Any] = {"args": {name: copy.deepcopy(schema["default"])
                                       for name, schema in arg_schemas.items()
                                       if "default" in schema}}
    _deep_merge(merged, presets.values)
    _deep_merge(merged, request)
    validate_config(merged, "merged config")
    problems = _arg_problems(merged.get("args", {}), arg_schemas,
                             names_the_host="hostname" not in merged)
    if problems:
        raise ConfigError(problems)
    return RenderConfig(merged, manifest.name)
