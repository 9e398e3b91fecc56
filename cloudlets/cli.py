"""The ``cloudlets`` command.

Exit codes (also in ``cloudlets --help``):

=====  ==========================================================
0      success
1      internal error (a bug: please report it)
2      usage error (bad options)
3      invalid input (manifest, render config, tarball, template, signature)
4      render failure (download, disk, format, storage)
5      setup problem (missing tool, optional dependency or driver)
6      cache verify found a corrupted entry
7      not found (no image with that id)
130    interrupted (SIGINT); nothing half-written is left
141    the reader of the output went away (SIGPIPE)
143    terminated (SIGTERM); nothing half-written is left
=====  ==========================================================
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, cast

from cloudlets.cli_output import EscapingWriter, print_artifacts, print_json
from cloudlets.cli_sign import add_render_options, print_signing, render_signing
from cloudlets.config import Presets, is_presets_document, load_config_file, set_dotted
from cloudlets.drivers.base import FormatDriver, StorageDriver
from cloudlets.drivers.providers import (
    entry_point_report,
    get_driver,
    list_drivers,
    make_driver,
)
from cloudlets.drivers.types import DriverKind
from cloudlets.errors import (
    CatalogError,
    CloudletsError,
    ConfigError,
    ConfigurationError,
    ImageNotFoundError,
    IntegrityError,
    ManifestError,
    Problem,
    SignatureError,
    TemplateError,
    Terminated,
    UnsafeArchiveError,
)
from cloudlets.jsondoc import JSONSyntaxError, parse_json_or_string
from cloudlets.manifest import Manifest
from cloudlets.renderer import Renderer
from cloudlets.result import RenderResult
from cloudlets.urls import redact
from cloudlets.version import __version__

__all__ = ["EXIT_CODES", "main"]

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INVALID_INPUT = 3
EXIT_RENDER_FAILED = 4
EXIT_SETUP = 5
#: ``cloudlets cache verify`` found a corrupted entry (cli_cache.EXIT_CORRUPT).
EXIT_CORRUPT = 6
EXIT_NOT_FOUND = 7
#: A command stopped by SIGINT or SIGTERM exits as a shell reports it: 128 + the signal.
EXIT_INTERRUPTED = 128 + 2
EXIT_TERMINATED = 128 + 15
#: The reader of the command's output went away.
EXIT_BROKEN_PIPE = 128 + 13

#: Exit code → meaning, as documented.
EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (a bug: please report it)",
    EXIT_USAGE: "usage error (bad options)",
    EXIT_INVALID_INPUT: "invalid input (manifest, render config, tarball, template, signature)",
    EXIT_RENDER_FAILED: "render failure (download, disk, format, storage)",
    EXIT_SETUP: "setup problem (missing tool, optional dependency or driver)",
    EXIT_CORRUPT: "cache verify found a corrupted entry",
    EXIT_NOT_FOUND: "not found (no image with that id)",
    EXIT_INTERRUPTED: "interrupted (SIGINT); nothing half-written is left",
    EXIT_BROKEN_PIPE: "the reader of the output went away (SIGPIPE)",
    EXIT_TERMINATED: "terminated (SIGTERM); nothing half-written is left",
}

_INVALID_INPUT = (ManifestError, ConfigError, UnsafeArchiveError, TemplateError, IntegrityError,
                  SignatureError)


def exit_code_for(error: CloudletsError) -> int:
    """:returns: the documented exit code for an error."""
    if isinstance(error, ImageNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(error, _INVALID_INPUT):
        return EXIT_INVALID_INPUT
    if isinstance(error, ConfigurationError):
        return EXIT_SETUP
    return EXIT_RENDER_FAILED


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's own usage errors
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def parse_set(items: Sequence[str], into: dict[str, Any] | None = None) -> dict[str, Any]:
    """Turn ``--set key=value`` items into a nested dict. Values are JSON
    when they parse as JSON, plain strings otherwise. A number in the key
    indexes a list (``ip.interfaces.0.address=...``); ``key+=value`` adds
    to a list (see :func:`~cloudlets.config.set_dotted`).

    :param into: the dict to set the keys in (a config file's request);
        default a new one.
    :returns: that dict.
    :raises ConfigError: for an item without ``=`` or a bad dotted key.
    """
    result: dict[str, Any] = {} if into is None else into
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        append = key.endswith("+")
        key = key.removesuffix("+").strip()
        if not sep or not key:
            raise ConfigError([Problem("", f"--set {item!r}: expected KEY=VALUE or "
                                           "KEY+=VALUE")], "--set")
        try:
            value = parse_json_or_string(raw)
        except JSONSyntaxError as exc:
            raise ConfigError([_quote_hint(exc.problem)], f"--set {key}") from None
        set_dotted(result, key, value, append=append)
    return result


def _quote_hint(problem: Problem) -> Problem:
    return Problem(problem.pointer, f"{problem.message} (quote a JSON string to pass text)")


def _build_parser() -> argparse.ArgumentParser:
    epilog = "exit codes:\n" + "\n".join(f"  {c}  {m}" for c, m in EXIT_CODES.items())
    parser = _Parser(prog="cloudlets", description="Render portable server images.",
                     epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cloudlets {__version__}")
    common = _Parser(add_help=False)
    for target, default in ((parser, None), (common, argparse.SUPPRESS)):
        extra: dict[str, Any] = {} if default is None else {"default": default}
        target.add_argument("--json", action="store_true", help="machine-readable output",
                            **extra)
        target.add_argument("-v", "--verbose", action="count",
                            **({"default": 0} if default is None else extra),
                            help="log more (-v: info, -vv: debug)")
        target.add_argument("-q", "--quiet", action="store_true", **extra,
                            help="log errors only")
        target.add_argument("--log-level", choices=_LOG_LEVELS, type=str.lower, **extra,
                            help="log level of the cloudlets loggers (default: warning)")
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
    render.add_argument("--config", "-c", type=Path,
                        help="render config file (JSON, or TOML named *.toml); a presets "
                             "file (top-level config/locked) is read as --presets")
    render.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="set a config key (dotted, a number indexes a list: "
                             "ip.interfaces.0.address=...; KEY+=VALUE adds to a list; "
                             "JSON value, else a string)")
    render.add_argument("--presets", type=Path,
                        help='provider presets file: {"config": {...}, "locked": [...]} in '
                             "JSON, or TOML named *.toml (see `cloudlets init`)")
    render.add_argument("--mirror", dest="mirrors", action="append", default=[],
                        metavar="PREFIX=URL", help="rewrite URLs starting with PREFIX to URL")
    render.add_argument("--cache-dir", type=Path, help="tarball cache directory")
    render.add_argument("--allow-file-urls", action="store_true",
                        help="allow file:// URLs and local paths for the tarball")
    render.add_argument("--allow-host", dest="allow_hosts", action="append", default=[],
                        metavar="HOST[:PORT]",
                        help="let downloads reach HOST (at PORT), although its address is "
                             "loopback, private or link-local (repeatable; --mirror hosts "
                             "are allowed already)")
    render.add_argument("--overwrite", action="store_true",
                        help="replace existing artifacts the catalog does not know about")
    render.add_argument("--force", action="store_true",
                        help="render again although the catalog has this image ready")
    render.add_argument("--no-catalog", action="store_true",
                        help="render without recording the image in the catalog")
    render.add_argument("--catalog", type=Path, metavar="PATH",
                        help="the catalog database (default: $CLOUDLETS_HOME/catalog.sqlite3)")
    render.add_argument("--progress", choices=("auto", "bar", "json", "none"), default="auto",
                        help="progress on stderr: a bar on a terminal (auto), always a bar, "
                             "JSON lines, or none")
    render.add_argument("--wait-timeout", type=float, default=3600.0, metavar="SECONDS",
                        help="how long to wait for the same render in flight in another "
                             "process (default: 3600)")
    render.add_argument("--format-option", "-F", dest="format_options", action="append",
                        default=[], metavar="KEY=VALUE",
                        help="an argument of the format driver, e.g. ex_mode=instance-store "
                             "(JSON value, else a string)")
    render.add_argument("--storage-option", "-S", dest="storage_options", action="append",
                        default=[], metavar="KEY=VALUE",
                        help="an argument of the storage driver, e.g. ex_acl=private")
    add_render_options(render)  # --allowed-signers, --require-signature, --provenance-key...
    render.set_defaults(handler=_cmd_render)

    drivers = sub.add_parser("drivers", parents=[common],
                             help="list format and storage drivers")
    drivers.set_defaults(handler=_cmd_drivers)

    for extension in _EXTENSIONS:
        extension(sub)
    return parser


def _load_extensions() -> list[Callable[[Any], None]]:
    """Subcommands that live beside their stage (``cache``, ``images``, ``serve``,
    ``worker``)."""
    found: list[Callable[[Any], None]] = []
    for module, function in (("cloudlets.cli_cache", "add_cache_parser"),
                             ("cloudlets.cli_images", "add_images_parser"),
                             ("cloudlets.cli_init", "add_init_parser"),
                             ("cloudlets.cli_sign", "add_sign_parsers"),
                             ("cloudlets.cli_serve", "add_serve_parser"),
                             ("cloudlets.cli_worker", "add_worker_parser")):
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
        print_json(out, {"valid": True, "name": manifest.name, "version": manifest.version,
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
        "filesystem": _redacted_url(manifest.data.get("filesystem")),
        "boot": manifest.data.get("boot"),
        "args": manifest.args, "templates": manifest.templates,
        "template_syntax": manifest.template_syntax,
        "persistent": manifest.persistent, "volatile": manifest.volatile,
        "extensions": manifest.extensions,
        "render_needs": [{"pointer": p.pointer, "message": p.message}
                         for p in manifest.render_problems()],
    }
    if args.json:
        print_json(out, info)
        return EXIT_OK
    out.write(f"{manifest.label}  ({manifest.arch})\n")
    for key in ("description", "author", "digest"):
        if info[key]:
            out.write(f"  {key + ':':<13}{info[key]}\n")
    fs = manifest.filesystem
    if fs:
        size = f", {fs.size} bytes" if fs.size else ""
        out.write(f"  filesystem:  {redact(fs.url)} (sha256 {fs.sha256}{size})\n")
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


def _redacted_url(filesystem: Any) -> Any:
    """The manifest's ``filesystem`` as shown: its URL :func:`redact`-ed."""
    if isinstance(filesystem, dict) and isinstance(filesystem.get("url"), str):
        return {**filesystem, "url": redact(filesystem["url"])}
    return filesystem


def _render_inputs(config: Path | None,
                   presets_path: Path | None) -> tuple[dict[str, Any], Presets | None]:
    """The request and presets ``--config`` and ``--presets`` give: a
    ``--config`` file that is a presets document (top-level ``config`` or
    ``locked``, as ``cloudlets init`` writes) is read as ``--presets``."""
    presets = Presets.load(presets_path) if presets_path else None
    data = load_config_file(config) if config else {}
    if not is_presets_document(data):
        return data, presets
    if presets is not None:
        raise ConfigError([Problem("", "is a presets document (top-level config or locked) "
                                       "and --presets is given too: give presets once")],
                          str(config))
    return {}, Presets.from_document(data, str(config))


def _cmd_render(args: argparse.Namespace, out: TextIO) -> int:
    request, presets = _render_inputs(args.config, args.presets)
    request = parse_set(args.sets, request)
    mirrors: list[Mapping[str, Any]] = []
    for item in args.mirrors:
        prefix, sep, target = item.partition("=")
        if not sep:
            raise ConfigError([Problem("", f"--mirror {redact(item)!r}: expected PREFIX=URL")],
                              "--mirror")
        mirrors.append({"prefix": prefix, "mirrors": [target]})
    signing = render_signing(args)
    renderer = Renderer(cache_dir=args.cache_dir, presets=presets, mirrors=mirrors,
                        ex_allow_file_urls=args.allow_file_urls,
                        ex_allow_hosts=args.allow_hosts, trust=signing["trust"],
                        provenance_key=signing["provenance_key"])
    fmt = make_driver(DriverKind.FORMAT, args.format,
                      **_options(args.format_options, "--format-option"))
    storage = make_driver(DriverKind.STORAGE, args.storage,
                          **_options(args.storage_options, "--storage-option"))
    progress = _progress_callback(args.progress)
    if args.no_catalog:
        result = renderer.render(args.manifest, args.output, storage=storage,
                                 format=fmt, config=request, progress=progress,
                                 overwrite=args.overwrite, signature=signing["signature"])
        existing = None
    else:
        result, existing = _render_recorded(args, renderer, storage, fmt, request, progress,
                                            signing["signature"])
    if args.json:
        data = result.to_dict()
        if existing is not None:
            data["catalog"] = {"entry_id": existing.entry_id, "existing": existing.existing}
        print_json(out, data)
        return EXIT_OK
    if existing is not None and existing.existing:
        out.write(f"{result.manifest_name} {result.manifest_version or ''} is already rendered "
                  f"as {result.format} to {result.storage}: image {result.image_id} "
                  "(--force renders it again)\n")
        print_artifacts(out, result.artifacts)
        return EXIT_OK
    out.write(f"rendered {result.manifest_name} {result.manifest_version or ''} as "
              f"{result.format} to {result.storage}: image {result.image_id}\n")
    print_artifacts(out, result.artifacts)
    print_signing(out, result.details)
    total = sum(result.timings.values())
    out.write(f"  took {total:.2f} s (" + ", ".join(
        f"{k} {v:.2f}" for k, v in result.timings.items()) + ")\n")
    return EXIT_OK


@dataclass(frozen=True)
class _Recorded:
    entry_id: str
    existing: bool


def _render_recorded(args: argparse.Namespace, renderer: Renderer, storage: Any, fmt: Any,
                     request: dict[str, Any], progress: Any,
                     signature: str | None = None) -> tuple[RenderResult, _Recorded]:
    """Render through the create-image operation, recording the image in the
    catalog. The same request rendered before is shown, not rendered again;
    the same request in flight in another process is waited for, up to
    ``--wait-timeout``, and claimed again if that process died."""
    from cloudlets.catalog import ClaimState
    from cloudlets.catalog.records import INTERRUPTIONS
    from cloudlets.images import Images

    images = Images(renderer, args.catalog)
    for _ in range(2):
        claim = images.submit(args.manifest, args.output, storage, fmt, request,
                              force=args.force, overwrite=args.overwrite,
                              signature=signature)
        if claim.state is ClaimState.CLAIMED:
            entry = images.run(claim.entry.entry_id, progress)
            return entry.to_result(), _Recorded(entry.entry_id, existing=False)
        entry = claim.entry
        if claim.state is ClaimState.BUSY:
            entry = images.wait(entry.entry_id, args.wait_timeout)
        if entry.ready:
            return entry.to_result(), _Recorded(entry.entry_id, existing=True)
        if entry.error_type not in INTERRUPTIONS:
            break
    raise CatalogError(f"the concurrent render {entry.entry_id} of {entry.label} failed: "
                       f"{entry.error}", entry.entry_id)


def _options(items: Sequence[str], flag: str) -> dict[str, Any]:
    """The ``KEY=VALUE`` arguments of a driver option flag (JSON values,
    else strings).

    :raises ConfigError: an item is not ``KEY=VALUE``.
    """
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError([Problem("", f"{flag} {item!r}: expected KEY=VALUE")], flag)
        try:
            options[key.strip()] = parse_json_or_string(raw)
        except JSONSyntaxError as exc:
            raise ConfigError([_quote_hint(exc.problem)], f"{flag} {key.strip()}") from None
    return options


def _progress_callback(kind: str = "auto") -> Any:
    from cloudlets.progress import JsonProgress, TerminalProgress

    if kind == "json":
        return JsonProgress(sys.stderr)
    if kind == "none":
        return None
    return TerminalProgress(sys.stderr, enabled=True if kind == "bar" else None)


def _cmd_drivers(args: argparse.Namespace, out: TextIO) -> int:
    report: dict[str, Any] = {}
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
    points = {str(kind): entry_point_report(kind) for kind in DriverKind}
    if args.json:
        print_json(out, {**report, "entry_points": points})
        return EXIT_OK
    for kind_name, rows in report.items():
        out.write(f"{kind_name} drivers:\n")
        width = max((len(row["name"]) for row in rows), default=0)
        for row in rows:
            if row["available"]:
                caps = ",".join(str(c) for c in row["capabilities"]).lower() or "-"
                out.write(f"  {row['name']:<{width}}  {row['description']}  [{caps}]\n")
            else:
                out.write(f"  {row['name']:<{width}}  unavailable: {row['error']}\n")
    listed = [(kind_name, row) for kind_name, found in points.items() for row in found]
    if listed:
        out.write("entry points:\n")
        for kind_name, row in listed:
            out.write(f"  {kind_name} {row['name']} = {row['value']} ({row['package']}): "
                      f"{row['status']}\n")
    return EXIT_OK


def main(argv: Sequence[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None) -> int:
    """Run the command line.

    Human output and error messages have their control characters escaped
    (:func:`~cloudlets.cli_output.escape_controls`); JSON escapes them itself.
    SIGTERM and SIGINT stop a command with every cleanup run (work directory,
    half-written artifact, catalog entry) and exit 143 and 130.

    :returns: the exit code (see :data:`EXIT_CODES`).
    """
    out = out or sys.stdout
    errors = _escaping(err or sys.stderr)
    parser = _build_parser()
    try:
        # argparse prints help and usage errors itself: send them where the
        # caller asked, not to the process's streams.
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(errors):
            args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    as_json = getattr(args, "json", False)
    try:
        # A long-running command (serve, worker) logs on its own, with times.
        logs = (contextlib.nullcontext() if getattr(args, "own_logging", False)
                else _logging_to(errors, _log_level(args)))
        with _terminate_on_sigterm(), logs:
            return int(args.handler(args, out if as_json else _escaping(out)))
    except CloudletsError as exc:
        code = exit_code_for(exc)
        if as_json:
            print_json(out, {"error": type(exc).__name__, "message": str(exc),
                             "exit_code": code,
                             "problems": [{"pointer": p.pointer, "message": p.message}
                                          for p in getattr(exc, "problems", [])]})
        errors.write(f"cloudlets: {type(exc).__name__}: {exc}\n")
        return code
    except Terminated as exc:
        errors.write(f"cloudlets: {exc}\n")
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        errors.write("cloudlets: interrupted\n")
        return EXIT_INTERRUPTED


def _escaping(stream: TextIO) -> TextIO:
    return cast(TextIO, EscapingWriter(stream))


_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _log_level(args: argparse.Namespace) -> int:
    if getattr(args, "log_level", None):
        return int(getattr(logging, args.log_level.upper()))
    if getattr(args, "quiet", False):
        return logging.ERROR
    verbose = getattr(args, "verbose", 0) or 0
    return {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)


@contextlib.contextmanager
def _logging_to(stream: TextIO, level: int) -> Iterator[None]:
    """Send the library's log records (it never prints) to ``stream`` while a
    command runs, as ``cloudlets: warning: ...``."""
    logger = logging.getLogger("cloudlets")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_LevelFormatter("cloudlets: %(levelname)s: %(message)s"))
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


class _LevelFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        copy = logging.makeLogRecord(record.__dict__)  # other handlers keep theirs
        copy.levelname = record.levelname.lower()
        return super().format(copy)


@contextlib.contextmanager
def _terminate_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into :class:`~cloudlets.errors.Terminated` in the main
    thread while a command runs (once: a second SIGTERM during the cleanup
    is ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated("SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def entry_point() -> None:
    """Console script entry point.

    A reader that goes away (``cloudlets images --json | head -1``) ends the
    command quietly with 141 (128 + SIGPIPE), as other Unix tools end, not
    with a traceback. SIGPIPE itself keeps Python's handling, so a closed
    upload connection is an error the storage driver reports.
    """
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # Nothing more can be written; keep the interpreter's final flush quiet.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        code = EXIT_BROKEN_PIPE
    sys.exit(code)
