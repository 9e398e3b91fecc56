"""Render the example cloudlet into ./out as raw and qcow2 disks (``scripts/dev demo``).

    python examples/render_example.py [--output out] [--config FILE] [--boot]
    python examples/render_example.py --write-manifest FILE

The cloudlet is ``examples/tiny-debian/``: a manifest, the template sources
under ``rootfs/`` and an example render config. ``--write-manifest FILE``
builds its root filesystem tarball (as below), writes the manifest with its
``filesystem`` section filled in to ``FILE`` and stops: ``cloudlets render
FILE --allow-file-urls ...`` then renders the example on its own.

Its root filesystem tarball is
built here from Debian packages (a kernel, ``busybox-static`` and a small
initramfs, see :mod:`cloudlets.testing.boot`) with the template sources laid
over it, and cached; the repository holds no binaries. Everything is local:
the tarball is read through a ``file://`` URL, the images are written to a
local directory, and nothing runs as root.

With ``--boot`` each image is booted in QEMU (software emulation, SeaBIOS
for raw and OVMF for qcow2: the manifest asks for a hybrid BIOS+UEFI disk)
and the rendered files the guest prints on its serial console are shown.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from cloudlets import CloudletsError, Renderer
from cloudlets.paths import default_cache_dir
from cloudlets.testing.boot import (
    MARKER,
    FixtureUnavailable,
    boot,
    build_boot_cloudlet,
    console_section,
)

HERE = Path(__file__).resolve().parent
CLOUDLET = HERE / "tiny-debian"
FORMATS = ("raw", "qcow2")
#: The firmware each format is booted with by ``--boot``.
BOOT_FIRMWARE = {"raw": "bios", "qcow2": "uefi"}


def overlay_files(root: Path) -> dict[str, bytes]:
    """The files under ``root``, by their path inside the image."""
    return {
        "/" + path.relative_to(root).as_posix(): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def example_manifest(cache: Path) -> dict[str, Any]:
    """The example manifest with its ``filesystem`` section filled in.

    :param cache: where the built tarball is kept.
    :raises FixtureUnavailable: the Debian packages cannot be fetched.
    """
    cloudlet = build_boot_cloudlet(cache, overlay=overlay_files(CLOUDLET / "rootfs"))
    manifest: dict[str, Any] = json.loads((CLOUDLET / "manifest.json").read_text())
    manifest["filesystem"] = {
        "url": cloudlet.tarball.as_uri(),
        "sha256": cloudlet.sha256,
        "size": cloudlet.tarball.stat().st_size,
        "compression": "gzip",
    }
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="out", help="output directory (default ./out)")
    parser.add_argument("--config", type=Path, default=CLOUDLET / "config.json",
                        help="render config (default examples/tiny-debian/config.json)")
    parser.add_argument("--boot", action="store_true",
                        help="boot each image in QEMU and show what the guest prints")
    parser.add_argument("--write-manifest", type=Path, metavar="FILE",
                        help="only write the renderable manifest (its tarball built) to FILE")
    args = parser.parse_args(argv)

    try:
        manifest = example_manifest(default_cache_dir() / "example")
    except FixtureUnavailable as exc:
        print(f"render_example: cannot build the example's root filesystem: {exc}",
              file=sys.stderr)
        return 1
    if args.write_manifest is not None:
        args.write_manifest.write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"wrote {args.write_manifest}; render it with: cloudlets render "
              f"{args.write_manifest} --allow-file-urls --format qcow2 --output out/ "
              f"--config {CLOUDLET / 'config.json'}")
        return 0
    config = json.loads(args.config.read_text())
    output = args.output.rstrip("/") + "/"
    renderer = Renderer(ex_allow_file_urls=True)
    made: dict[str, Path] = {}
    for fmt in FORMATS:
        try:
            result = renderer.render(manifest, output, storage="local", format=fmt,
                                     config=config, overwrite=True)
        except CloudletsError as exc:
            print(f"render_example: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        artifact = result.primary
        made[fmt] = Path(artifact.location.removeprefix("file://"))
        timings = ", ".join(f"{stage} {seconds:.2f}s" for stage, seconds in result.timings.items())
        print(f"{fmt:6} {artifact.location}  {artifact.size} bytes  sha256 {artifact.sha256}")
        print(f"       image {result.image_id}  manifest {result.manifest_name}-"
              f"{result.manifest_version} ({result.manifest_digest[:12]})  {timings}")
    if not args.boot:
        print(f"boot one: qemu-system-x86_64 -machine accel=tcg -m 256 -nographic "
              f"-drive file={made['raw']},format=raw,if=virtio,snapshot=on")
        return 0
    with tempfile.TemporaryDirectory(prefix="cloudlets-example-boot-") as work:
        for fmt, image in made.items():
            firmware = BOOT_FIRMWARE[fmt]
            result_boot = boot(image, firmware=firmware, disk_format=fmt, workdir=Path(work))
            if result_boot.timed_out or MARKER not in result_boot.console:
                print(f"render_example: {fmt} did not boot under {firmware}:\n"
                      f"{result_boot.tail()}", file=sys.stderr)
                return 1
            print(f"--- {fmt} booted under {firmware} in {result_boot.seconds:.1f}s; the guest "
                  f"printed:")
            for section in ("hostname", "network", "resolv"):
                print(f"[{section}]\n{console_section(result_boot.console, section) or ''}",
                      end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
