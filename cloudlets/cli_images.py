"""``cloudlets images`` and ``cloudlets image show|delete``: the image catalog
on the command line.

Every view shows the manifest's name, version and digest beside the image id.
Errors are :class:`~cloudlets.errors.CloudletsError` subclasses; the main
command maps them to its exit codes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from cloudlets.catalog import CatalogEntry, ImageCatalog, ImageStatus, default_catalog_path
from cloudlets.cli_output import print_artifacts, print_json
from cloudlets.errors import ImageNotFoundError

if TYPE_CHECKING:
    from cloudlets.images import Images

__all__ = ["add_images_parser"]

#: Statuses ``cloudlets images`` hides unless given ``--all``.
HIDDEN = (ImageStatus.DELETED, ImageStatus.SUPERSEDED)


def add_images_parser(subparsers: Any) -> None:
    """Add ``images`` and ``image`` to the ``cloudlets`` command.

    :param subparsers: the main parser's subparsers action.
    """
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")
    common.add_argument("--catalog", type=Path, metavar="PATH",
                        help="the catalog database (default: $CLOUDLETS_HOME/catalog.sqlite3)")

    images = subparsers.add_parser("images", parents=[common],
                                   help="list the image catalog by name and version")
    images.add_argument("--name", help="only images of this manifest name")
    images.add_argument("--version", dest="manifest_version", metavar="VERSION",
                        help="only images of this manifest version")
    images.add_argument("--status", action="append", choices=[str(s) for s in ImageStatus],
                        help="only images in this status (repeatable)")
    images.add_argument("--all", action="store_true",
                        help="include deleted and superseded entries")
    images.set_defaults(handler=_cmd_images)

    image = subparsers.add_parser("image", help="show or delete one image")
    actions = image.add_subparsers(dest="image_command", metavar="ACTION",
                                   parser_class=type(image))
    actions.required = True
    show = actions.add_parser("show", parents=[common], help="show an image's record")
    show.add_argument("id", help="image id or catalog entry id")
    show.set_defaults(handler=_cmd_show)
    delete = actions.add_parser(
        "delete", parents=[common],
        help="delete an image's artifacts through its storage driver and mark it deleted")
    delete.add_argument("id", help="image id or catalog entry id")
    delete.set_defaults(handler=_cmd_delete)


def _catalog(args: argparse.Namespace) -> ImageCatalog:
    """The catalog, which must exist: looking up an image creates no state.

    :raises ImageNotFoundError: when there is no catalog at all.
    """
    catalog = ImageCatalog.open_existing(args.catalog)
    if catalog is None:
        raise ImageNotFoundError(f"no image {args.id!r}: there is no catalog at "
                                 f"{args.catalog or default_catalog_path()}")
    return catalog


def _images(args: argparse.Namespace) -> Images:
    from cloudlets.images import Images
    from cloudlets.renderer import Renderer

    return Images(Renderer(), _catalog(args))


def _cmd_images(args: argparse.Namespace, out: TextIO) -> int:
    catalog = ImageCatalog.open_existing(args.catalog)  # none yet: nothing is created
    path = catalog.path if catalog is not None else (args.catalog or default_catalog_path())
    entries: list[CatalogEntry] = []
    if catalog is not None:
        catalog.reap_stale()  # a render whose process died shows as failed, not rendering
        statuses = args.status or (None if args.all else [s for s in ImageStatus
                                                            if s not in HIDDEN])
        entries = catalog.entries(name=args.name, version=args.manifest_version,
                                  statuses=statuses)
    if getattr(args, "json", False):
        print_json(out, {"catalog": str(path), "images": [e.to_dict() for e in entries]})
        return 0
    if not entries:
        out.write(f"no images in {path}\n")
        return 0
    rows = [("NAME", "VERSION", "IMAGE", "STATUS", "FORMAT", "STORAGE", "MANIFEST DIGEST",
             "CREATED")]
    for entry in entries:
        data = entry.to_dict()
        rows.append((entry.manifest_name, entry.manifest_version or "-", entry.ref,
                     str(entry.status), entry.format, entry.storage,
                     entry.manifest_digest[:12], data["created_at"] or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
                  .rstrip() + "\n")
    return 0


def _cmd_show(args: argparse.Namespace, out: TextIO) -> int:
    catalog = _catalog(args)
    catalog.reap_stale()
    entry = catalog.get(args.id)
    if getattr(args, "json", False):
        print_json(out, entry.to_dict())
        return 0
    _describe(entry, out)
    return 0


def _cmd_delete(args: argparse.Namespace, out: TextIO) -> int:
    deleted = _images(args).delete(args.id)
    entry = deleted.entry
    warning = None
    if entry.published:
        warning = (f"{entry.format} published this image as {entry.image_id}; it stays "
                   "registered with the provider: deregister it with the provider's driver")
    if getattr(args, "json", False):
        data = entry.to_dict()
        data.update(warning=warning, removed=list(deleted.removed),
                    not_found=list(deleted.missing), already_deleted=deleted.already)
        print_json(out, data)
        return 0
    if deleted.already:
        out.write(f"{entry.ref} ({_version_label(entry)}) was already {entry.status}; "
                  "nothing removed\n")
        return 0
    out.write(f"deleted {entry.ref} ({_version_label(entry)}): "
              f"{len(deleted.removed)} artifact(s) removed from {entry.target or entry.storage}"
              + (f", {len(deleted.missing)} not found" if deleted.missing else "") + "\n")
    for location in deleted.missing:
        out.write(f"  not found: {location}\n")
    if warning:
        out.write(f"  warning: {warning}\n")
    return 0


def _describe(entry: CatalogEntry, out: TextIO) -> None:
    data = entry.to_dict()
    out.write(f"{entry.ref}  {_version_label(entry)}\n")
    lines = [
        ("status", str(entry.status)),
        ("error", entry.error),
        ("entry", entry.entry_id),
        ("label", entry.label),
        ("manifest", f"{entry.manifest_name} {entry.manifest_version or '(no version)'}"),
        ("digest", entry.manifest_digest),
        ("config", entry.config_digest),
        ("format", entry.format),
        ("storage", entry.storage),
        ("output", entry.output),
        ("created", data["created_at"]),
        ("started", data["started_at"]),
        ("finished", data["finished_at"]),
    ]
    if entry.status in (ImageStatus.PENDING, ImageStatus.RENDERING):
        lines.append(("owner", f"pid {entry.owner_pid} on {entry.owner_host}"))
    for key, value in lines:
        if value:
            out.write(f"  {key + ':':<10}{value}\n")
    if entry.artifacts:
        out.write("  artifacts:\n")
        print_artifacts(out, entry.artifacts, "    ")
    if entry.details.get("publish"):
        out.write(f"  published: {json.dumps(entry.details['publish'], sort_keys=True)}\n")


def _version_label(entry: CatalogEntry) -> str:
    version = entry.manifest_version or "(no version)"
    return f"{entry.manifest_name} {version}, manifest {entry.manifest_digest[:12]}"


