"""Benchmark a cold render against the straightforward pipeline and virt-make-fs (by hand).

    python benchmarks/bench_disk.py [--files 20000] [--megabytes 300] [--workdir DIR]
                                    [--rounds 3] [--only PIPELINE ...]

A synthetic tree of ``--files`` files and about ``--megabytes`` MB (random,
incompressible content; 100 files a directory) is written once as a gzip'd
tarball, then turned into a 1 GiB qcow2 image by:

* ``render``: a cold :meth:`cloudlets.Renderer.render` of a manifest naming
  that tarball by ``file://`` URL (empty cache: fetch and verify it while it
  is read under the archive policy and ``mke2fs -d -`` builds the ext4 from
  the normalized members, render a template, GPT disk with BIOS and UEFI
  GRUB, qemu-img convert, store locally). The timer starts after the
  manifest is written (its sha256 of the tarball is an input) and the old
  cache is removed, and includes importing cloudlets;
* ``render-reconfig``: the same render again with another config (the cached
  tarball and base filesystem, the templated file patched in);
* ``disk-stage``: :func:`cloudlets.disk.build_disk` alone from the
  uncompressed tree tar, then ``qemu-img convert``;
* ``baseline``: ``tar -xzf`` into a directory, ``mke2fs -d dir``,
  ``qemu-img convert -O qcow2`` (a bare filesystem: no partition table, no
  bootloader, no verification);
* ``virt-make-fs`` (libguestfs, Debian ``libguestfs-tools``), when installed:
  ``--format=qcow2 --type=ext4 --size=1G`` from the same tarball, with
  ``LIBGUESTFS_BACKEND_SETTINGS=force_tcg`` (no usable KVM here). Its
  appliance needs a host kernel; in a container without one, unpack a Debian
  kernel package and point supermin at it (as root)::

      kernel=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2}')
      apt-get download "$kernel"
      dpkg-deb -x linux-image-6.*.deb /var/tmp/kernel
      cp -a /var/tmp/kernel/lib/modules/* /lib/modules/ && depmod -a "$(ls /lib/modules)"
      export SUPERMIN_KERNEL=$(ls /var/tmp/kernel/boot/vmlinuz-*)
      export SUPERMIN_MODULES=/lib/modules/$(ls /lib/modules)

  The first run also builds the appliance (cached in ``/var/tmp/.guestfs-*``);
  run it once before measuring.

Each pipeline runs in a fresh process, ``--rounds`` times (virt-make-fs once:
it takes a minute), interleaved, each after removing the last run's output
and a ``sync`` (untimed), so that one run's writeback does not land on the
next; the table shows the best and the median wall time and the peak RSS
of the largest process involved (Python or tool). The page cache is warm
(the tarballs are read once before timing).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT_SIZE = 1024 * 1024 * 1024 - 68 * 1024 * 1024  # disk of ~1 GiB with BIOS boot + ESP
SEED = "bench"
EPOCH = 1_700_000_000


def make_tree(path: Path, files: int, megabytes: int) -> None:
    """Write a reproducible synthetic tree tarball."""
    rng = random.Random(0)
    mean = megabytes * 1_000_000 // files
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:

        def add(name: str, kind: bytes, mode: int, data: bytes | None = None) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = kind, mode, EPOCH
            info.uid = info.gid = 0 if not name.startswith("home") else 1000
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)

        add("boot", tarfile.DIRTYPE, 0o755)
        add("boot/vmlinuz", tarfile.REGTYPE, 0o644, b"kernel")
        add("etc", tarfile.DIRTYPE, 0o755)
        add("etc/hostname", tarfile.REGTYPE, 0o644, b"bench\n")
        add("home", tarfile.DIRTYPE, 0o755)
        add("usr", tarfile.DIRTYPE, 0o755)
        for index in range(files):
            directory = f"usr/d{index // 100:04d}" if index % 2 else f"home/d{index // 100:04d}"
            if index % 100 in (0, 1):
                add(directory, tarfile.DIRTYPE, 0o755)
            size = min(int(rng.expovariate(1 / mean)), 40 * mean)
            add(f"{directory}/f{index:06d}", tarfile.REGTYPE, 0o644, rng.randbytes(size))


def _peak_rss_mib() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024


def _manifest(tarball: Path) -> dict[str, object]:
    # hashlib, not cloudlets: importing cloudlets belongs inside the render's timer
    with open(tarball, "rb") as handle:
        sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
    return {
        "name": "bench", "version": "1.0", "arch": "x86_64",
        "filesystem": {"url": tarball.as_uri(), "sha256": sha256,
                       "size": tarball.stat().st_size},
        "boot": {"kernel": "/boot/vmlinuz", "cmdline": "console=ttyS0", "firmware": "both",
                 "root": {"size": ROOT_SIZE}},
        "templates": ["/etc/hostname"],
    }


def _qcow2(source: Path, target: Path) -> None:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(source),
                    str(target)], check=True)


def run_pipeline(name: str, tree: Path, work: Path) -> dict[str, float]:
    """Run one pipeline in this process and return its timings."""
    tarball = tree.with_suffix(".tar.gz")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    result: dict[str, float] = {}
    # Inputs, not work: the manifest (with the tarball's sha256, which its
    # publisher computed) exists before the render; an empty cache too.
    manifest = _manifest(tarball)
    cache = tree.parent / "render-cache"
    if name == "render":
        shutil.rmtree(cache, ignore_errors=True)
    started = time.perf_counter()
    if name in ("render", "render-reconfig"):
        from cloudlets import Renderer

        if name == "render-reconfig":
            assert any((cache / "bases").glob("*.ext4")), "run the render pipeline first"
        renderer = Renderer(cache_dir=cache, data_dir=work / "data", work_dir=work,
                            ex_allow_file_urls=True, ex_source_date_epoch=EPOCH)
        hostname = "web-01" if name == "render" else "web-02"
        rendered = renderer.render(manifest, str(work / "out") + "/", storage="local",
                                   format="qcow2", config={"hostname": hostname})
        assert rendered.details["disk"]["base_cached"] == (name == "render-reconfig")
        result.update({f"stage:{k}": v for k, v in rendered.timings.items()})
    elif name == "disk-stage":
        from cloudlets.disk import BootSpec, build_disk

        boot = BootSpec(
            kernel="/boot/vmlinuz", cmdline="console=ttyS0", firmware="both", root_size=ROOT_SIZE
        )
        image = build_disk(tree, boot, work / "disk.raw", seed=SEED, workdir=work / "scratch",
                           source_date_epoch=EPOCH)
        result["raw"] = time.perf_counter() - started
        _qcow2(image.path, work / "q")
    elif name == "baseline":
        tree_dir = work / "tree"
        tree_dir.mkdir()
        subprocess.run(["tar", "-xzf", str(tarball), "-C", str(tree_dir)], check=True)
        result["extract"] = time.perf_counter() - started
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", str(tree_dir),
                        str(work / "fs.img"), "1G"], check=True)
        result["raw"] = time.perf_counter() - started
        _qcow2(work / "fs.img", work / "q")
    elif name == "virt-make-fs":
        env = dict(os.environ, LIBGUESTFS_BACKEND_SETTINGS="force_tcg")
        subprocess.run(["virt-make-fs", "--format=qcow2", "--type=ext4", "--size=1G",
                        str(tarball), str(work / "q")], check=True, env=env)
    else:
        raise SystemExit(f"unknown pipeline {name}")
    result["total"] = time.perf_counter() - started
    result["rss_mib"] = _peak_rss_mib()
    return result


PIPELINES = ["render", "render-reconfig", "disk-stage", "baseline", "virt-make-fs"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--megabytes", type=int, default=300)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/cloudlets-bench"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", action="append", choices=PIPELINES,
                        help="run only these pipelines (repeatable)")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    tree = args.workdir / f"tree-{args.files}-{args.megabytes}.tar"
    if args.run:
        print(json.dumps(run_pipeline(args.run, tree, args.workdir / args.run)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    tarball = tree.with_suffix(".tar.gz")
    if not tree.exists():
        print(f"writing {tree} ...", flush=True)
        make_tree(tree.with_suffix(".partial"), args.files, args.megabytes)
        tree.with_suffix(".partial").rename(tree)
    if not tarball.exists():
        subprocess.run(f"gzip -1 -c {tree} > {tarball}.partial", shell=True, check=True)
        Path(f"{tarball}.partial").rename(tarball)
    for path in (tree, tarball):  # warm the page cache for every pipeline alike
        with open(path, "rb") as handle:
            while handle.read(1 << 24):
                pass
    print(f"tree: {tree} ({tree.stat().st_size / 1e6:.0f} MB, {args.files} files; "
          f"{tarball.stat().st_size / 1e6:.0f} MB gzip'd)")
    pipelines = args.only or PIPELINES
    if "virt-make-fs" in pipelines and not shutil.which("virt-make-fs"):
        print("virt-make-fs: not installed (apt-get install libguestfs-tools), skipped")
        pipelines = [p for p in pipelines if p != "virt-make-fs"]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in pipelines}
    for round_index in range(args.rounds):
        for name in pipelines:
            if name == "virt-make-fs" and round_index:
                continue
            shutil.rmtree(args.workdir / name, ignore_errors=True)
            os.sync()  # the last run's writeback (and deletes) must not land on this one
            proc = subprocess.run(
                [sys.executable, __file__, "--files", str(args.files), "--megabytes",
                 str(args.megabytes), "--workdir", str(args.workdir), "--run", name],
                capture_output=True, text=True, check=False,
            )  # fmt: skip
            if proc.returncode != 0:
                print(f"{name}: failed\n{proc.stderr[-2000:]}")
                continue
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    best: dict[str, float] = {}
    print(f"{'pipeline':<18}{'best s':>8}{'median s':>10}{'peak RSS MiB':>14}  stages (best run)")
    for name, results in runs.items():
        if not results:
            continue
        results.sort(key=lambda r: r["total"])
        fastest = results[0]
        best[name] = fastest["total"]
        median = results[len(results) // 2]["total"]
        rss = max(r["rss_mib"] for r in results)
        stages = ", ".join(f"{k.removeprefix('stage:')} {v:.2f}" for k, v in fastest.items()
                           if k.startswith("stage:") or k in ("extract", "raw"))
        print(f"{name:<18}{fastest['total']:>8.2f}{median:>10.2f}{rss:>14.0f}  {stages}")
    for other in ("baseline", "virt-make-fs"):
        for ours in ("render", "render-reconfig", "disk-stage"):
            if ours in best and other in best:
                print(f"{other} / {ours} (best): {best[other] / best[ours]:.2f}x")


if __name__ == "__main__":
    main()
