"""Cloudlet manifests: load, validate, digest.

A manifest is a JSON document following ``cloudlets/schemas/manifest-v1.json``
(see :doc:`/manifest`). :meth:`Manifest.load` accepts a path, a URL, a JSON
string or a dict, and raises :class:`~cloudlets.errors.ManifestError` listing
every problem at once, each with its JSON pointer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from cloudlets.errors import ManifestError, Problem
from cloudlets.jsondoc import (
    JSONSyntaxError,
    ValidDigests,
    digest,
    document_problems,
    parse_json,
    parse_size,
    schema_problems,
)
from cloudlets.patterns import compile_pattern, pattern_problem
from cloudlets.urls import is_url, redact
from cloudlets.userschema import check_schema, validate_subschema

if TYPE_CHECKING:
    from cloudlets.fetch import Fetcher

__all__ = ["BootSpec", "FilesystemSpec", "Manifest", "SCHEMA_NAME"]

#: File name of the manifest schema in ``cloudlets/schemas/``.
SCHEMA_NAME = "manifest-v1.json"
#: Largest manifest accepted, in bytes.
MAX_MANIFEST_BYTES = 1024 * 1024

_ARCH_ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}


class _ParsedDocument(dict[str, Any]):
    """A document :func:`~cloudlets.jsondoc.parse_json` has already checked."""


#: Digests of the last manifests found valid: a service that gets the same
#: manifest again (a repeated create, many clients posting one cloudlet)
#: checks its schema once.
_VALIDATED = ValidDigests(4096)


@dataclass(frozen=True)
class FilesystemSpec:
    """The manifest's ``filesystem`` section."""

    url: str
    sha256: str
    size: int | None
    compression: str


@dataclass(frozen=True)
class BootSpec:
    """The manifest's ``boot`` section, with defaults applied and sizes in bytes."""

    kernel: str
    initrd: str | None
    cmdline: str
    firmware: str
    partition_table: str
    fstype: str
    root_size: int | None
    label: str
    disk_size: int | None


class Manifest:
    """A validated cloudlet manifest.

    Build one with :meth:`load`. The parsed document is available read-only
    as :attr:`data`; the typed accessors apply the schema's defaults.
    """

    def __init__(self, data: Mapping[str, Any], source: str = "<dict>") -> None:
        """Validate ``data``.

        :raises ManifestError: listing every problem.
        """
        problems = [] if isinstance(data, _ParsedDocument) else document_problems(dict(data))
        known = None if problems else _VALIDATED.key(data)
        if known is None or not _VALIDATED.seen(known):
            problems = problems or self._problems(data)
            if problems:
                raise ManifestError(problems, source)
            if known is not None:
                _VALIDATED.add(known)
        self._data = copy.deepcopy(dict(data))
        self.source = source
        self.raw: bytes | None = None
        """The document's bytes as read (a file, a URL, a JSON string), which
        a publisher's signature covers; ``None`` for a dict."""
        self.digest: str = known or digest(self._data)
        """sha256 of the canonical JSON form: stable across key order and whitespace."""

    # -- loading ------------------------------------------------------------

    @classmethod
    def load(cls, source: Manifest | Mapping[str, Any] | str | bytes | Path, *,
             timeout: float = 30.0,
             fetcher: Fetcher | Callable[[], Fetcher] | None = None) -> Manifest:
        """Load and validate a manifest.

        :param source: a :class:`Manifest` (returned as is), a dict, a JSON
            document as text or UTF-8 bytes, an ``http(s)://`` or ``file://``
            URL, or a file path.
        :param timeout: seconds to wait when ``source`` is a URL.
        :param fetcher: reads an ``http(s)://`` manifest under its URL policy,
            or a function returning it, called only for such a manifest (a
            Renderer passes its own, made on first use); by default one with
            the default policy, which refuses loopback and internal addresses.
        :raises ManifestError: when it cannot be read or is invalid.
        """
        if isinstance(source, Manifest):
            return source
        if isinstance(source, Mapping):
            return cls(source)
        if isinstance(source, Path):
            return cls._from_text(cls._read_path(source), str(source))
        if isinstance(source, (bytes, bytearray)):
            return cls._from_text(bytes(source), "<bytes>")
        text = str(source)
        if text.lstrip().startswith(("{", "[")):
            return cls._from_text(text, "<string>")
        if is_url(text):
            if text.startswith("file://"):
                from urllib.parse import unquote, urlsplit
                return cls._from_text(cls._read_path(Path(unquote(urlsplit(text).path))), text)
            return cls._from_text(cls._read_url(text, timeout, fetcher), redact(text))
        return cls._from_text(cls._read_path(Path(text)), text)

    @classmethod
    def _from_text(cls, text: str | bytes, source: str) -> Manifest:
        size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "replace"))
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError([Problem("", f"larger than {MAX_MANIFEST_BYTES} bytes")], source)
        try:
            data = parse_json(text)
        except JSONSyntaxError as exc:
            raise ManifestError([exc.problem], source) from None
        if not isinstance(data, dict):
            raise ManifestError([Problem("", "a manifest must be a JSON object")], source)
        manifest = cls(_ParsedDocument(data), source)
        manifest.raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return manifest

    @staticmethod
    def _read_path(path: Path) -> bytes:
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_MANIFEST_BYTES + 1)
        except OSError as exc:
            raise ManifestError([Problem("", f"cannot read: {exc.strerror or exc}")],
                                str(path)) from None
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError([Problem("", f"larger than {MAX_MANIFEST_BYTES} bytes")],
                                str(path))
        return data

    @staticmethod
    def _read_url(url: str, timeout: float,
                  fetcher: Fetcher | Callable[[], Fetcher] | None) -> bytes:
        from cloudlets.errors import FetchError
        from cloudlets.fetch import Fetcher, RetryPolicy

        shown = redact(url)
        if not url.startswith(("http://", "https://")):
            raise ManifestError([Problem("", "unsupported URL scheme (http, https, file)")],
                                shown)
        if callable(fetcher):
            fetcher = fetcher()
        reader = fetcher or Fetcher(connect_timeout=timeout, read_timeout=timeout,
                                    retry=RetryPolicy(attempts=1))
        try:
            body = reader.read(url, max_bytes=MAX_MANIFEST_BYTES, what="manifest")
        except FetchError as exc:  # policed, redirects checked, credentials redacted
            reason = (f"HTTP {exc.status} fetching the manifest" if exc.status
                      and exc.status != 200 else f"cannot fetch: {exc}")
            raise ManifestError([Problem("", reason)], shown) from None
        if body is None:
            raise ManifestError([Problem("", "HTTP 404 fetching the manifest (not found)")],
                                shown)
        return body

    # -- validation ---------------------------------------------------------

    @staticmethod
    def _problems(data: Mapping[str, Any]) -> list[Problem]:
        problems = schema_problems(dict(data), SCHEMA_NAME)
        args = data.get("args")
        if isinstance(args, dict):
            for name, schema in args.items():
                if not isinstance(schema, dict):
                    continue
                base = ["args", name]
                found = check_schema(schema, base)
                if not found and "default" in schema:
                    found = validate_subschema(schema["default"], schema, [*base, "default"])
                problems.extend(found)
        boot = data.get("boot")
        if isinstance(boot, dict) and boot.get("partition_table") == "mbr" \
                and boot.get("firmware") in ("uefi", "both"):
            problems.append(Problem("/boot/partition_table",
                                    f"'mbr' cannot boot firmware {boot.get('firmware')!r}; "
                                    "use 'gpt'"))
        problems.extend(Manifest._template_problems(data))
        return sorted(set(problems), key=lambda p: (p.pointer, p.message))

    @staticmethod
    def _template_problems(data: Mapping[str, Any]) -> list[Problem]:
        templates, volatile = data.get("templates"), data.get("volatile")
        if not isinstance(templates, list) or not isinstance(volatile, list):
            return []
        problems = []
        for v_index, pattern in enumerate(volatile):
            if pattern_problem(pattern, "") is not None:
                continue  # the schema's format check reports it
            compiled = compile_pattern(pattern)
            for t_index, path in enumerate(templates):
                if isinstance(path, str) and compiled.match(path):
                    problems.append(Problem(
                        f"/templates/{t_index}",
                        f"{path!r} is dropped by volatile pattern /volatile/{v_index} "
                        f"({pattern!r}), so it could never be rendered"))
        return problems

    def render_problems(self, *, needs_boot: bool = True) -> list[Problem]:
        """What this manifest still lacks for a render (it may be a valid
        manifest without them, as the dotCloud manifests were).

        :param needs_boot: whether the render builds a disk (formats that
            ship the root filesystem tree, such as ``tar``, need no ``boot``).
        :returns: problems with pointers to the missing sections.
        """
        problems = []
        if "filesystem" not in self._data:
            problems.append(Problem(
                "/filesystem", "a render needs the root filesystem tarball: add "
                "{\"url\": ..., \"sha256\": ...} (optionally \"size\", \"compression\")"))
        if needs_boot and "boot" not in self._data:
            problems.append(Problem(
                "/boot", "a render needs to know how the image boots: add at least "
                "{\"kernel\": \"/boot/vmlinuz\"} (optionally \"initrd\", \"cmdline\", "
                "\"firmware\", \"partition_table\", \"root\")"))
        return problems

    def require_renderable(self, *, needs_boot: bool = True) -> None:
        """:param needs_boot: as for :meth:`render_problems`.
        :raises ManifestError: naming every section a render still needs."""
        problems = self.render_problems(needs_boot=needs_boot)
        if problems:
            raise ManifestError(problems, self.source)

    # -- accessors ----------------------------------------------------------

    @property
    def data(self) -> Mapping[str, Any]:
        """The manifest as parsed (read-only view)."""
        return MappingProxyType(self._data)

    def to_dict(self) -> dict[str, Any]:
        """:returns: a deep copy of the manifest document."""
        return copy.deepcopy(self._data)

    @property
    def name(self) -> str:
        return str(self._data["name"])

    @property
    def version(self) -> str | None:
        version = self._data.get("version")
        return None if version is None else str(version)

    @property
    def description(self) -> str:
        return str(self._data.get("description", ""))

    @property
    def author(self) -> str:
        return str(self._data.get("author", ""))

    @property
    def arch(self) -> str:
        """The architecture, with ``amd64``/``arm64`` normalized to
        ``x86_64``/``aarch64``; ``x86_64`` when absent."""
        arch = str(self._data.get("arch", "x86_64"))
        return _ARCH_ALIASES.get(arch, arch)

    @property
    def filesystem(self) -> FilesystemSpec | None:
        section = self._data.get("filesystem")
        if section is None:
            return None
        return FilesystemSpec(url=section["url"], sha256=section["sha256"],
                              size=section.get("size"),
                              compression=section.get("compression", "auto"))

    @property
    def boot(self) -> BootSpec | None:
        section = self._data.get("boot")
        if section is None:
            return None
        root = section.get("root", {})
        return BootSpec(
            kernel=section["kernel"],
            initrd=section.get("initrd"),
            cmdline=section.get("cmdline", ""),
            firmware=section.get("firmware", "bios"),
            partition_table=section.get("partition_table", "gpt"),
            fstype=root.get("fstype", "ext4"),
            root_size=parse_size(root["size"]) if "size" in root else None,
            label=root.get("label", "cloudlets-root"),
            disk_size=parse_size(section["disk_size"]) if "disk_size" in section else None,
        )

    @property
    def hardware(self) -> dict[str, Any]:
        """Hardware hints with defaults: ``cpus`` (1), ``memory`` in bytes (512 MiB)."""
        section = dict(self._data.get("hardware", {}))
        section.setdefault("cpus", 1)
        section["memory"] = parse_size(section.get("memory", "512M"))
        return section

    @property
    def args(self) -> dict[str, dict[str, Any]]:
        """Argument name → its JSON Schema."""
        return copy.deepcopy(self._data.get("args", {}))

    @property
    def templates(self) -> list[str]:
        return list(self._data.get("templates", []))

    @property
    def template_syntax(self) -> str:
        return str(self._data.get("template_syntax", "jinja2"))

    @property
    def persistent(self) -> list[str]:
        return list(self._data.get("persistent", []))

    @property
    def volatile(self) -> list[str]:
        return list(self._data.get("volatile", []))

    @property
    def extensions(self) -> dict[str, Any]:
        """The free ``x-*`` keys at the top level."""
        return {k: copy.deepcopy(v) for k, v in self._data.items() if k.startswith("x-")}

    @property
    def label(self) -> str:
        """``name-version`` (or just the name), for file names and messages."""
        return f"{self.name}-{self.version}" if self.version else self.name

    def __repr__(self) -> str:
        return f"<Manifest {self.label} digest={self.digest[:12]}>"
