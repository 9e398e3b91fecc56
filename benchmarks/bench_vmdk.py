"""Benchmark the native streamOptimized VMDK writer against qemu-img (by hand).

    python benchmarks/bench_vmdk.py [--megabytes 300] [--workdir DIR] [--rounds 3] [--json]
                                    [--only PIPELINE ...]

A tree of real files (regular files from ``/usr/lib`` and ``/usr/share``, up
to ``--megabytes`` MB, in sorted order) is written once as a tar and built
into a ~1 GiB bootable disk by :func:`cloudlets.disk.build_disk` with a base
cache, as the disk stage of a render builds it: a raw file (``disk.raw``,
written whole) and the same disk as pieces (the cached base filesystem with
the blocks a templated ``/etc/hostname`` changed). Then, in the same run:

* ``qemu-img``: ``qemu-img convert -O vmdk -o subformat=streamOptimized`` of
  the raw disk (what the OVF driver ran before);
* ``native-raw``: :func:`~cloudlets.drivers.formats.vmdk.write_stream_optimized`
  of the raw disk;
* ``native-cold``: of the pieces, with no grain cache yet (it compresses
  the base's grains into the cache beside the base, and writes from it);
* ``native-rerender``: of the pieces of a second disk with another
  hostname, the grain cache present (a re-render: only the patched grains
  are compressed);
* ``ova-rerender``: the OVA driver's whole conversion of that disk (VMDK,
  descriptor, ``.mf`` with the VMDK's sha256, the ustar archive).

Each runs ``--rounds`` times, interleaved, after a ``sync``; the best and the
median wall times, the output size and the ratio to qemu-img are printed
(``--json``: as JSON). Every output is checked with ``qemu-img compare``
against its raw disk once, untimed. The page cache is warm.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

ROOT_SIZE = 1024 * 1024 * 1024 - 68 * 1024 * 1024  # a ~1 GiB disk with BIOS boot + ESP
EPOCH = 1_700_000_000
SEED = "bench-vmdk"
PIPELINES = ["qemu-img", "native-raw", "native-cold", "native-rerender", "ova-rerender"]


def make_real_tree(path: Path, megabytes: int) -> None:
    """A tar of real regular files from ``/usr/lib`` and ``/usr/share``,
    sorted, up to ``megabytes`` MB, with a kernel and ``/etc/hostname``;
    parents before children, as the disk stage takes a tree."""
    budget = megabytes * 1_000_000
    total = 0
    added: set[str] = set()
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:

        def parents(name: str) -> None:
            parts = name.split("/")[:-1]
            for depth in range(1, len(parts) + 1):
                directory = "/".join(parts[:depth])
                if directory not in added:
                    added.add(directory)
                    info = tarfile.TarInfo(directory)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, EPOCH
                    archive.addfile(info)

        for name, data in (("boot/vmlinuz", b"kernel"), ("etc/hostname", b"bench\n")):
            parents(name)
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, EPOCH
            archive.addfile(info, io.BytesIO(data))
        for root in ("/usr/lib", "/usr/share"):
            for directory, dirs, files in os.walk(root):
                dirs.sort()
                for name in sorted(files):
                    source = Path(directory, name)
                    try:
                        if source.is_symlink() or not source.is_file():
                            continue
                        size = source.stat().st_size
                        if total + size > budget:
                            continue
                        with open(source, "rb") as handle:
                            arcname = str(source)[1:]
                            parents(arcname)
                            info = tarfile.TarInfo(arcname)
                            info.size, info.mode, info.mtime = size, 0o644, EPOCH
                            archive.addfile(info, handle)
                    except OSError:  # unreadable: skip it
                        continue
                    total += size
                if total >= budget * 0.99:
                    return


def build(tree: Path, work: Path, hostname: str, *, compose: bool) -> Any:
    """A disk of the tree (base cached under ``work/bases``), with
    ``/etc/hostname`` patched in."""
    from cloudlets.disk import BootSpec, build_disk

    boot = BootSpec(kernel="/boot/vmlinuz", cmdline="console=ttyS0", firmware="both",
                    root_size=ROOT_SIZE)
    name = f"{hostname}-{'pieces' if compose else 'raw'}"
    return build_disk(tree, boot, work / f"{name}.raw", seed=SEED,
                      workdir=work / f"scratch-{name}", source_date_epoch=EPOCH,
                      base_cache=work / "bases", patch_files={"/etc/hostname":
                                                              f"{hostname}\n".encode()},
                      sync=False, compose=compose).for_formats()


def _time(call: Any) -> float:
    os.sync()
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print the table (or JSON with ``--json``).

    :returns: the results: per pipeline ``best``, ``median`` (seconds),
        ``size`` (bytes) and ``ratio`` (qemu-img's best over its best), and
        the machine's load average.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=300)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/cloudlets-bench-vmdk"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--only", action="append", choices=PIPELINES,
                        help="run only these pipelines (repeatable; qemu-img is always run, "
                             "the ratios need it)")
    args = parser.parse_args(argv)
    from cloudlets.drivers.formats import vmdk
    from cloudlets.testing.formats import join_pieces

    args.workdir.mkdir(parents=True, exist_ok=True)
    tree = args.workdir / f"real-tree-{args.megabytes}.tar"
    if not tree.exists():
        make_real_tree(tree.with_suffix(".partial"), args.megabytes)
        tree.with_suffix(".partial").rename(tree)
    work = args.workdir / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    raw = build(tree, work, "web-01", compose=False)
    cold = build(tree, work, "web-01", compose=True)
    again = build(tree, work, "web-02", compose=True)
    assert cold.pieces and again.pieces, "the disk stage did not compose the disk"
    grain_caches = lambda: list((work / "bases").glob("*.vmdk-grains-*"))  # noqa: E731

    def out(name: str) -> Path:
        path = work / f"{name}.vmdk"
        path.unlink(missing_ok=True)
        return path

    def run(name: str) -> None:
        if name == "qemu-img":
            subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "vmdk", "-o",
                            "subformat=streamOptimized,adapter_type=lsilogic", str(raw.path),
                            str(out(name))], check=True)
        elif name == "native-raw":
            vmdk.write_stream_optimized(raw.path, out(name), grain_cache=False)
        elif name == "native-cold":
            vmdk.write_stream_optimized(cold, out(name))
        elif name == "native-rerender":
            vmdk.write_stream_optimized(again, out(name))
        else:
            ova_convert()

    def ova_convert() -> None:
        from cloudlets.config import resolve_config
        from cloudlets.drivers.base import FormatContext
        from cloudlets.drivers.formats.ovf import OVAFormat
        from cloudlets.testing.formats import conformance_manifest

        manifest = conformance_manifest()
        workdir = work / "ova"
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir()
        context = FormatContext(manifest=manifest, disk=again, workdir=workdir,
                                config=resolve_config(manifest, None, {"hostname": "web-02"}),
                                basename="ova-rerender")
        [package] = OVAFormat().convert(context)
        package.path.rename(work / "ova-rerender.ova")

    def prepare(name: str) -> None:
        if name == "native-cold":
            for path in grain_caches():
                path.unlink()
        if name == "native-rerender" and not grain_caches():
            vmdk.write_stream_optimized(cold, out("warm-up"))

    pipelines = [n for n in PIPELINES if not args.only or n in args.only or n == "qemu-img"]
    times: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(args.rounds):
        for name in pipelines:
            prepare(name)
            times[name].append(_time(lambda name=name: run(name)))
    sources = {"qemu-img": raw, "native-raw": raw, "native-cold": cold,
               "native-rerender": again}
    if "ova-rerender" in times:
        with tarfile.open(work / "ova-rerender.ova") as archive:
            archive.extract("ova-rerender.vmdk", work, filter="data")
    for name, disk in [*sources.items(), ("ova-rerender", again)]:
        if name not in times:
            continue
        expected = disk.path if not disk.pieces else join_pieces(disk, work / f"{name}.joined")
        subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "vmdk", str(expected),
                        str(work / f"{name}.vmdk")], check=True)
        subprocess.run(["qemu-img", "check", "-q", str(work / f"{name}.vmdk")], check=True)
    floor = min(times["qemu-img"])
    results: dict[str, Any] = {
        "tree_bytes": tree.stat().st_size, "disk_bytes": raw.size,
        "load_average": os.getloadavg(), "cpus": os.cpu_count(), "pipelines": {}}
    for name, values in times.items():
        values.sort()
        results["pipelines"][name] = {
            "best": values[0], "median": values[len(values) // 2],
            "size": (work / f"{name}.{'ova' if name.startswith('ova') else 'vmdk'}").stat()
            .st_size, "ratio": floor / values[0]}
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"tree {results['tree_bytes'] / 1e6:.0f} MB of real files, disk "
              f"{raw.size / 2**30:.2f} GiB, load average {results['load_average']}")
        print(f"{'pipeline':<18}{'best s':>8}{'median s':>10}{'size MB':>10}{'qemu-img/this':>15}")
        for name, row in results["pipelines"].items():
            print(f"{name:<18}{row['best']:>8.2f}{row['median']:>10.2f}"
                  f"{row['size'] / 1e6:>10.1f}{row['ratio']:>14.2f}x")
    shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
