"""``cloudlets cache list | verify | prune``: inspect and maintain the tarball
cache and the cache of base filesystems beside it (``<cache-dir>/bases``).

Wired into the main parser by :func:`add_cache_parser`; each subcommand's
handler takes ``(args, out)`` and returns the exit code.
"""

from __future__ import annotations

import argparse
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from cloudlets.cli_output import print_json
from cloudlets.paths import default_cache_dir
from cloudlets.progress import format_bytes, terminal_progress

if TYPE_CHECKING:
    from cloudlets.cache import TarballCache
    from cloudlets.disk.basecache import BaseCache

__all__ = ["EXIT_CORRUPT", "add_cache_parser", "parse_size"]

#: Exit code of ``cloudlets cache verify`` when it found a corrupted entry
#: (listed with the others in :data:`cloudlets.cli.EXIT_CODES`).
EXIT_CORRUPT = 6

_UNITS = {"": 1, "k": 1000, "m": 1000**2, "g": 1000**3, "t": 1000**4,
          "ki": 1024, "mi": 1024**2, "gi": 1024**3, "ti": 1024**4}


def parse_size(text: str) -> int:
    """Parse ``"10G"``, ``"512MiB"``, ``"1500000"`` into bytes.

    :raises argparse.ArgumentTypeError: when it is not a size.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]i?)?b?\s*", text, re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 500M, 10GiB, 1048576)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def add_cache_parser(subparsers: Any) -> None:
    """Add ``cache`` and its subcommands to the ``cloudlets`` parser.

    :param subparsers: what ``ArgumentParser.add_subparsers()`` returned.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", type=Path, default=argparse.SUPPRESS,
                        help="the tarball cache (default: $CLOUDLETS_CACHE_DIR, else "
                             "$XDG_CACHE_HOME/cloudlets, else ~/.cache/cloudlets)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")
    cache = subparsers.add_parser("cache", parents=[common], help="inspect and maintain the "
                                  "tarball cache and the base filesystems")
    actions = cache.add_subparsers(dest="cache_command", metavar="ACTION")
    actions.required = True
    listing = actions.add_parser("list", parents=[common], help="list cached tarballs and "
                                 "base filesystems, least recently used first")
    listing.set_defaults(handler=cmd_list)
    verify = actions.add_parser("verify", parents=[common], help="re-hash every cached "
                                "tarball and evict corrupted ones")
    verify.add_argument("--keep", action="store_true",
                        help="report corrupted entries without evicting them")
    verify.set_defaults(handler=cmd_verify)
    prune = actions.add_parser("prune", parents=[common], help="remove leftovers and evict "
                               "least recently used tarballs not in use")
    prune.add_argument("--max-bytes", type=parse_size, default=None, metavar="SIZE",
                       help="keep at most SIZE bytes of tarballs (500M, 10GiB); without "
                            "it, only leftovers of interrupted downloads are removed; 0 "
                            "empties the cache except entries in use")
    prune.add_argument("--bases-max-bytes", type=parse_size, default=None, metavar="SIZE",
                       help="keep at most SIZE bytes on disk of base filesystems; without "
                            "it, only leftovers of interrupted renders are removed; 0 "
                            "removes every base not in use by a render")
    prune.set_defaults(handler=cmd_prune)


def _cache(args: argparse.Namespace) -> TarballCache:
    from cloudlets.cache import TarballCache  # not imported by the other commands

    root = getattr(args, "cache_dir", None) or default_cache_dir()
    return TarballCache(root)


def _bases(cache: TarballCache) -> BaseCache:
    from cloudlets.disk.basecache import BaseCache  # the disk stage's imports: only when used

    return BaseCache(cache.root / "bases")


def cmd_list(args: argparse.Namespace, out: TextIO) -> int:
    """``cloudlets cache list``. :returns: the exit code."""
    cache = _cache(args)
    entries = cache.list()
    bases = _bases(cache).list()
    if getattr(args, "json", False):
        print_json(out, {"cache_dir": str(cache.root), "entries": [e.to_dict() for e in entries],
                    "total_bytes": sum(e.size for e in entries),
                    "bases": [b.to_dict() for b in bases],
                    "bases_total_bytes": sum(b.size for b in bases)})
        return 0
    if not entries and not bases:
        out.write(f"{cache.root}: empty\n")
        return 0
    for e in entries:
        used = datetime.fromtimestamp(e.last_used, UTC).strftime("%Y-%m-%d %H:%M")
        flag = " in use" if e.in_use else ""
        via = f" via {e.mirror_rule['mirror']}" if e.mirror_rule else ""
        out.write(f"{e.sha256[:16]}  {format_bytes(e.size):>10}  used {used}{flag}  "
                  f"{e.source_url or '?'}{via}\n")
    total = sum(e.size for e in entries)
    out.write(f"{len(entries)} tarballs, {format_bytes(total)} in {cache.root}\n")
    for b in bases:
        used = datetime.fromtimestamp(b.last_used, UTC).strftime("%Y-%m-%d %H:%M")
        flag = " in use" if b.in_use else ""
        out.write(f"base {b.key[:16]}  {format_bytes(b.size):>10}  used {used}{flag}  "
                  f"({format_bytes(b.apparent_size)} filesystem)\n")
    if bases:
        out.write(f"{len(bases)} base filesystems, {format_bytes(sum(b.size for b in bases))} "
                  f"on disk in {cache.root / 'bases'}\n")
    return 0


def cmd_verify(args: argparse.Namespace, out: TextIO) -> int:
    """``cloudlets cache verify``. :returns: 0, or :data:`EXIT_CORRUPT`."""
    cache = _cache(args)
    as_json = getattr(args, "json", False)
    progress = None if as_json else terminal_progress()
    results = cache.verify(remove=not args.keep, progress=progress)
    bad = [r for r in results if not r.ok]
    if as_json:
        print_json(out, {"cache_dir": str(cache.root), "results": [r.to_dict() for r in results],
                    "corrupted": len(bad)})
    else:
        for r in results:
            state = "ok" if r.ok else f"CORRUPT: {r.problem}" + (
                " (evicted)" if r.removed else "")
            out.write(f"{r.sha256[:16]}  {state}\n")
        out.write(f"{len(results)} checked, {len(bad)} corrupted\n")
    return EXIT_CORRUPT if bad else 0


def cmd_prune(args: argparse.Namespace, out: TextIO) -> int:
    """``cloudlets cache prune``. :returns: the exit code."""
    cache = _cache(args)
    removed = cache.prune(args.max_bytes)
    remaining = cache.total_bytes()
    bases = _bases(cache)
    removed_bases = bases.prune(getattr(args, "bases_max_bytes", None))
    bases_remaining = bases.total_bytes()
    if getattr(args, "json", False):
        print_json(out, {"cache_dir": str(cache.root), "removed": [e.to_dict() for e in removed],
                    "freed_bytes": sum(e.size for e in removed), "remaining_bytes": remaining,
                    "removed_bases": [b.to_dict() for b in removed_bases],
                    "bases_freed_bytes": sum(b.size for b in removed_bases),
                    "bases_remaining_bytes": bases_remaining})
        return 0
    for e in removed:
        out.write(f"evicted {e.sha256[:16]}  {format_bytes(e.size)}\n")
    out.write(f"freed {format_bytes(sum(e.size for e in removed))}, "
              f"{format_bytes(remaining)} remain in {cache.root}\n")
    for b in removed_bases:
        out.write(f"evicted base {b.key[:16]}  {format_bytes(b.size)}\n")
    if removed_bases or bases_remaining:
        out.write(f"freed {format_bytes(sum(b.size for b in removed_bases))} of base "
                  f"filesystems, {format_bytes(bases_remaining)} remain in {bases.root}\n")
    return 0
