"""``cloudlets init [PATH]``: write a commented example presets file.

Wired into the main parser by :func:`add_init_parser`. The file is TOML
(read with :mod:`tomllib` by :meth:`cloudlets.Presets.load`); every setting
in it is commented out, so as written it presets nothing: a provider
uncomments and edits what it needs. Lines starting with ``##`` explain;
lines starting with ``#`` and a space are settings to uncomment.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, TextIO

from cloudlets.cli_output import print_json
from cloudlets.errors import ConfigError, Problem

__all__ = ["EXAMPLE_PRESETS", "add_init_parser"]

#: The file ``cloudlets init`` writes.
EXAMPLE_PRESETS = """\
## cloudlets provider presets: what every render gets unless the request
## sets it, and which keys a request may not set at all.
##
## Use it with:  cloudlets render MANIFEST --presets presets.toml ...
##         (or:  cloudlets render MANIFEST --config presets.toml ...)
## The keys are those of the render config (docs/config.rst); the merge
## order is the manifest's argument defaults, then these presets, then the
## request. Uncomment (remove "# ") the settings you need.

## Dotted keys a request may not set: a locked key and everything inside it
## (with "dns.nameservers" locked, a request may still set dns.search).
## Top-level keys come before the [config] tables.
# locked = ["dns.nameservers", "ssh_authorized_keys"]

[config]
## The image's host name (RFC 1123). Usually left to the request.
# hostname = "web1.example.net"

## Public keys for root's authorized_keys, one line each.
# ssh_authorized_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleOnly ops@example.net"]

## Resolver configuration.
# [config.dns]
# nameservers = ["192.0.2.53", "2001:db8::53"]
# search = ["example.net"]

## Network interfaces: DHCP, or static addresses in CIDR notation.
# [[config.ip.interfaces]]
# name = "eth0"
# addresses = ["192.0.2.10/24", "2001:db8::10/64"]
# gateway = "192.0.2.1"
# mtu = 1500
#
# [[config.ip.interfaces]]
# name = "eth1"
# dhcp = true

## Mirrors: URLs starting with prefix are tried at each mirror in order,
## then at the origin.
# [[config.mirrors]]
# prefix = "http://mirrors.cloudlets.com/"
# mirrors = ["http://mirror.example.net/cloudlets/"]
"""


def add_init_parser(subparsers: Any) -> None:
    """Add ``init`` to the ``cloudlets`` command.

    :param subparsers: the main parser's subparsers action.
    """
    init = subparsers.add_parser("init", help="write a commented example presets file")
    init.add_argument("path", nargs="?", type=Path, default=Path("presets.toml"),
                      help="the file to write (default: presets.toml)")
    init.add_argument("--force", action="store_true", help="replace an existing file")
    init.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                      help="machine-readable output")
    init.set_defaults(handler=_cmd_init)


def _cmd_init(args: argparse.Namespace, out: TextIO) -> int:
    path: Path = args.path
    if path.exists() and not args.force:
        raise ConfigError([Problem("", "exists already (--force replaces it)")], str(path))
    partial = path.with_name(f".{path.name}.partial")
    try:
        partial.write_text(EXAMPLE_PRESETS, encoding="utf-8")
        os.replace(partial, path)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ConfigError([Problem("", f"cannot write: {exc.strerror or exc}")],
                          str(path)) from None
    if getattr(args, "json", False):
        print_json(out, {"path": str(path)})
    else:
        out.write(f"wrote {path}: uncomment what to preset, then "
                  f"cloudlets render MANIFEST --presets {path} ...\n")
    return 0
