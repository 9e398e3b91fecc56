"""The ``cloudlets`` command.

Exit codes (also in ``cloudlets --help``):

=====  ==========================================================
0      success
1      internal error (a bug: please report it)
2      usage error (bad options)
3      invalid input (manifest, render config, tarball, template)
4      render failure (download, disk, format, storage)
5      setup problem (missing tool, optional dependency or driver)
=====  ==========================================================
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from cloudlets import __version__
from cloudlets.config import Presets, load_config_file, set_dotted
from cloudlets.drivers.base import FormatDriver, StorageDriver
from cloudlets.drivers.providers import get_driver, list_drivers
from cloudlets.drivers.types import DriverKind
from cloudlets.errors import (
    CloudletsError,
    ConfigError,
    ConfigurationError,
    IntegrityError,
    ManifestError,
    Problem,
    TemplateError,
    UnsafeArchiveError,
)
from cloudlets.jsondoc import JSONSyntaxError, parse_json_or_string
from cloudlets.manifest import Manifest
from cloudlets.renderer import Renderer

__all__ = ["EXIT_CODES", "main"]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INVALID_INPUT = 3
EXIT_RENDER_FAILED = 4
EXIT_SETUP = 5

#: Exit code → meaning, as documented.
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (a bug: please report it)",
    EXIT_USAGE: "usage error (bad options)",
    EXIT_INVALID_INPUT: "invalid input (manifest, render config, tarball, template)",
    EXIT_RENDER_FAILED: "render failure (download, disk, format, storage)",
    EXIT_SETUP: "setup problem (missing tool, optional dependency or driver)",
}

_INVALID_INPUT = (ManifestError, ConfigError, UnsafeArchiveError, TemplateError, IntegrityError)


def exit_code_for(error: CloudletsError) -> int:
    """:returns: the documented exit code for an error."""
    if isinstance(error, _INVALID_INPUT):
        return EXIT_INVALID_INPUT
    if isinstance(error, ConfigurationError):
        return EXIT_SETUP
    return EXIT_RENDER_FAILED


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own usage errors
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """Turn ``--set key=value`` items into a nested dict. Values are JSON
    when they parse as JSON, plain strings otherwise.

    :raises ConfigError: for an item without ``=`` or a bad dotted key.
    """
    result: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError([Problem("", f"--set {item!r}: expected KEY=VALUE")], "--set")
        try:
            value = parse_json_or_string(raw)
        except JSONSyntaxError as exc:
            raise ConfigError([_quote_hint(exc.problem)], f"--set {key.strip()}") from None
        set_dotted(result, key.strip(), value)
    return result


def _quote_hint(problem: Problem) -> Problem:
    return Problem(problem.pointer, f"{problem.message} (quote a JSON string to pass text)")


def _build_parser() -> argparse.ArgumentParser:
    epilog = "exit codes:\n" + "\n".join(f"  {c}  {m}" for c, m in EXIT_CODES.items())
    parser = _Parser(prog="cloudlets", description="Render portable server images.",
                     epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cloudlets {__version__}")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    validate = sub.add_parser("validate", parents=[common],
                              help="check a manifest against the v1 schema")
    validate.add_argument("manifest", help="path, URL or JSON string")
    validate.add_argument("--renderable", action="store_true",
                          help="also require what a render needs (filesystem, boot)")
    validate.set_defaults(handler=_cmd_validate)

    inspect = sub.add_parser("inspect", parents=[common], help="show what a manifest describes")
    inspect.add_argument("manifest", help="path, URL or JSON string")
    inspect.set_defaults(handler=_cmd_inspect)

    render = sub.add_parser("render", parents=[common],
                            help="render a cloudlet into an image")
    render.add_argument("manifest", help="path, URL or JSON string")
    render.add_argument("--format", "-f", required=True, help="output type (see `drivers`)")
    render.add_argument("--storage", "-s", default="local",
                        help="output provider (default: local)")
    render.add_argument("--output", "-o", required=True,
                        help="output location; ending in / means a directory")
    render.add_argument("--config", "-c", type=Path, help="render config JSON file")
    render.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="set a config key (dotted; JSON value, else a string)")
    render.add_argument("--presets", type=Path,
                        help='provider presets JSON file: {"config": {...}, "locked": [...]}')
    render.add_argument("--mirror", dest="mirrors", action="append", default=[],
                        metavar="PREFIX=URL", help="rewrite URLs starting with PREFIX to URL")
    render.add_argument("--cache-dir", type=Path, help="tarball cache directory")
    render.add_argument("--allow-file-urls", action="store_true",
                        help="allow file:// URLs and local paths for the tarball")
    render.add_argument("--overwrite", action="store_true", help="replace existing artifacts")
    render.add_argument("--format-option", "-F", dest="format_options", action="append",
                        default=[], metavar="KEY=VALUE",
                        help="an argument of the format driver, e.g. ex_mode=instance-store "
                             "(JSON value, else a string)")
    render.add_argument("--storage-option", "-S", dest="storage_options", action="append",
                        default=[], metavar="KEY=VALUE",
                        help="an argument of the storage driver, e.g. ex_acl=private")
    render.set_defaults(handler=_cmd_render)

    drivers = sub.add_parser("drivers", parents=[common],
                             help="list format and storage drivers")
    drivers.set_defaults(handler=_cmd_drivers)

    for extension in _EXTENSIONS:
        extension(sub)
    return parser


def _load_extensions() -> list[Callable[[Any], None]]:
    """Subcommands that live beside their stage (``cache``, ``images``)."""
    found: list[Callable[[Any], None]] = []
    for module, function in (("cloudlets.cli_cache", "add_cache_parser"),
                             ("cloudlets.cli_images", "add_images_parser")):
        try:
            loaded = __import__(module, fromlist=[function])
        except ImportError:
            continue
        found.append(getattr(loaded, function))
    return found


_EXTENSIONS = _load_extensions()


# -- commands ----------------------------------------------------------------

def _cmd_validate(args: argparse.Namespace, out: TextIO) -> int:
    manifest = Manifest.load(args.manifest)
    if args.renderable:
        manifest.require_renderable()
    missing = manifest.render_problems()
    if args.json:
        _print_json(out, {"valid": True, "name": manifest.name, "version": manifest.version,
                          "digest": manifest.digest,
                          "render_needs": [{"pointer": p.pointer, "message": p.message}
                                           for p in missing]})
    else:
        out.write(f"{manifest.source}: valid manifest {manifest.label} "
                  f"(digest {manifest.digest})\n")
        for problem in missing:
            out.write(f"  note: {problem}\n")
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace, out: TextIO) -> int:
    manifest = Manifest.load(args.manifest)
    info = {
        "name": manifest.name, "version": manifest.version, "arch": manifest.arch,
        "description": manifest.description, "author": manifest.author,
        "digest": manifest.digest,
        "filesystem": manifest.data.get("filesystem"), "boot": manifest.data.get("boot"),
        "args": manifest.args, "templates": manifest.templates,
        "template_syntax": manifest.template_syntax,
        "persistent": manifest.persistent, "volatile": manifest.volatile,
        "extensions": manifest.extensions,
        "render_needs": [{"pointer": p.pointer, "message": p.message}
                         for p in manifest.render_problems()],
    }
    if args.json:
        _print_json(out, info)
        return EXIT_OK
    out.write(f"{manifest.label}  ({manifest.arch})\n")
    for key in ("description", "author", "digest"):
        if info[key]:
            out.write(f"  {key + ':':<13}{info[key]}\n")
    fs = manifest.filesystem
    if fs:
        size = f", {fs.size} bytes" if fs.size else ""
        out.write(f"  filesystem:  {fs.url} (sha256 {fs.sha256}{size})\n")
    boot = manifest.boot
    if boot:
        out.write(f"  boot:        {boot.kernel} initrd={boot.initrd} firmware={boot.firmware} "
                  f"table={boot.partition_table} cmdline={boot.cmdline!r}\n")
    for name, schema in manifest.args.items():
        default = f" = {json.dumps(schema['default'])}" if "default" in schema else " (required)"
        out.write(f"  arg {name}: {schema.get('type', 'any')}{default}\n")
    for key in ("templates", "persistent", "volatile"):
        values = info[key]
        if values:
            out.write(f"  {key}: {len(values)}\n")
            for value in values:
                out.write(f"    {value}\n")
    for problem in manifest.render_problems():
        out.write(f"  render needs: {problem}\n")
    return EXIT_OK


def _cmd_render(args: argparse.Namespace, out: TextIO) -> int:
    request: dict[str, Any] = load_config_file(args.config) if args.config else {}
    for key, value in _flatten(parse_set(args.sets)):
        set_dotted(request, key, value)
    presets = Presets.load(args.presets) if args.presets else None
    mirrors: list[Mapping[str, Any]] = []
    for item in args.mirrors:
        prefix, sep, target = item.partition("=")
        if not sep:
            raise ConfigError([Problem("", f"--mirror {item!r}: expected PREFIX=URL")],
                              "--mirror")
        mirrors.append({"prefix": prefix, "mirrors": [target]})
    renderer = Renderer(cache_dir=args.cache_dir, presets=presets, mirrors=mirrors,
                        ex_allow_file_urls=args.allow_file_urls)
    fmt = _driver(DriverKind.FORMAT, args.format, args.format_options, "--format-option")
    storage = _driver(DriverKind.STORAGE, args.storage, args.storage_options,
                      "--storage-option")
    progress = _progress_callback()
    result = renderer.render(args.manifest, args.output, storage=storage,
                             format=fmt, config=request, progress=progress,
                             overwrite=args.overwrite)
    if args.json:
        _print_json(out, result.to_dict())
        return EXIT_OK
    out.write(f"rendered {result.manifest_name} {result.manifest_version or ''} as "
              f"{result.format} to {result.storage}: image {result.image_id}\n")
    for artifact in result.artifacts:
        out.write(f"  {artifact.role:<10} {artifact.location}  {artifact.size} bytes  "
                  f"sha256:{artifact.sha256}\n")
    total = sum(result.timings.values())
    out.write(f"  took {total:.2f} s (" + ", ".join(
        f"{k} {v:.2f}" for k, v in result.timings.items()) + ")\n")
    return EXIT_OK


def _driver(kind: DriverKind, name: str, items: Sequence[str], flag: str) -> Any:
    """The driver ``name``, built with the ``KEY=VALUE`` arguments of ``flag``
    (the registered name alone when there are none).

    :raises ConfigError: an item is not ``KEY=VALUE``.
    :raises ConfigurationError: the driver takes no such argument.
    """
    if not items:
        return name
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError([Problem("", f"{flag} {item!r}: expected KEY=VALUE")], flag)
        try:
            options[key.strip()] = parse_json_or_string(raw)
        except JSONSyntaxError as exc:
            raise ConfigError([_quote_hint(exc.problem)], f"{flag} {key.strip()}") from None
    cls = get_driver(kind, name)
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as exc:
        accepted = [p for p in inspect.signature(cls).parameters if p not in ("self",)]
        raise ConfigurationError(f"{kind} driver {name!r}: {exc}; it takes "
                                 f"{', '.join(accepted) or 'no arguments'}") from None
    return cls(**options)


def _progress_callback() -> Any:
    from cloudlets.progress import terminal_progress

    return terminal_progress(sys.stderr)


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            items.extend(_flatten(value, dotted + "."))
        else:
            items.append((dotted, value))
    return items


def _cmd_drivers(args: argparse.Namespace, out: TextIO) -> int:
    report: dict[str, list[dict[str, Any]]] = {}
    kind: DriverKind
    for kind in DriverKind:
        rows: list[dict[str, Any]] = []
        for name in list_drivers(kind):
            try:
                cls = get_driver(kind, name)
            except CloudletsError as exc:
                rows.append({"name": name, "available": False, "error": str(exc)})
                continue
            assert issubclass(cls, (FormatDriver, StorageDriver))
            flags = [flag.name for flag in type(cls.capabilities)
                     if flag.name and flag.value and flag in cls.capabilities]
            rows.append({"name": name, "available": True, "description": cls.description,
                         "capabilities": flags, "class": f"{cls.__module__}.{cls.__name__}"})
        report[str(kind)] = rows
    if args.json:
        _print_json(out, report)
        return EXIT_OK
    for kind_name, rows in report.items():
        out.write(f"{kind_name} drivers:\n")
        for row in rows:
            if row["available"]:
                caps = ",".join(str(c) for c in row["capabilities"]).lower() or "-"
                out.write(f"  {row['name']:<10} {row['description']}  [{caps}]\n")
            else:
                out.write(f"  {row['name']:<10} unavailable: {row['error']}\n")
    return EXIT_OK


def _print_json(out: TextIO, data: Any) -> None:
    json.dump(data, out, indent=2, sort_keys=False, default=str)
    out.write("\n")


def main(argv: Sequence[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """Run the command line.

    :returns: the exit code (see :data:`EXIT_CODES`).
    """
    out = out or sys.stdout
    err = err or sys.stderr
    parser = _build_parser()
    try:
        # argparse prints help and usage errors itself: send them where the
        # caller asked, not to the process's streams.
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return int(args.handler(args, out))
    except CloudletsError as exc:
        code = exit_code_for(exc)
        if getattr(args, "json", False):
            _print_json(out, {"error": type(exc).__name__, "message": str(exc),
                              "exit_code": code,
                              "problems": [{"pointer": p.pointer, "message": p.message}
                                           for p in getattr(exc, "problems", [])]})
        err.write(f"cloudlets: {type(exc).__name__}: {exc}\n")
        return code
    except KeyboardInterrupt:
        err.write("cloudlets: interrupted\n")
        return 130


def entry_point() -> None:
    """Console script entry point."""
    sys.exit(main())
