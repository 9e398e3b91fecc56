"""Peak RSS of a render of a large image with many files (by hand, not a test).

    python benchmarks/bench_memory.py [--files 60000] [--image-gib 4] [--workdir DIR]
                                      [--json]

A reproducible tree of ``--files`` small files (64 to 1087 random bytes
each: the file count is what scales here, and it stays quick)
in directories of 100, plus a kernel and a templated ``/etc/hostname``, is
written once as a gzip'd tarball. Then, each in a fresh process, as the CLI
or a worker would run them:

* ``render``: a cold :meth:`cloudlets.Renderer.render` of a manifest whose
  root filesystem is ``--image-gib`` GiB (empty cache; qcow2 out, stored
  locally);
* ``render-reconfig``: the same again with another hostname (the cached
  tarball and base filesystem).

Each child reports its wall time and peak RSS: its own
(``getrusage(RUSAGE_SELF).ru_maxrss``) and that of the largest tool it waited
for (``RUSAGE_CHILDREN``: mke2fs, debugfs, qemu-img). The latter is an
upper bound: Python starts its children with ``vfork``, and Linux carries
the parent's RSS at ``exec`` into the child's ``ru_maxrss``, so a tool
smaller than the render process shows the render's own peak so far. The
target (issue 20, item 5): both under 200 MiB for any image size.

:func:`main` takes ``argv`` and returns the report, so that a driver script
can run it and collect the numbers; the command line prints a table (or the
JSON with ``--json``).
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EPOCH = 1_700_000_000
#: The target: peak RSS of the render process and of each tool it runs.
MAX_RSS_MIB = 200.0
PIPELINES = ("render", "render-reconfig")
_GIB = 1024**3
#: BIOS boot + ESP + alignment around the root filesystem.
_OVERHEAD = 68 * 1024 * 1024


def make_tree(path: Path, files: int) -> None:
    """Write the tree's uncompressed tarball: the same bytes every time."""
    rng = random.Random(0)
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:

        def add(name: str, kind: bytes, mode: int, data: bytes | None = None) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = kind, mode, EPOCH
            if data is not None:
                info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data is not None else None)

        for directory in ("boot", "etc", "srv"):
            add(directory, tarfile.DIRTYPE, 0o755)
        add("boot/vmlinuz", tarfile.REGTYPE, 0o644, b"kernel")
        add("etc/hostname", tarfile.REGTYPE, 0o644, b"bench\n")
        for index in range(files):
            directory = f"srv/d{index // 100:04d}"
            if index % 100 == 0:
                add(directory, tarfile.DIRTYPE, 0o755)
            body = rng.randbytes(64 + index % 1024)
            add(f"{directory}/f{index:06d}", tarfile.REGTYPE, 0o644, body)


def manifest(tarball: Path, image_gib: int) -> dict[str, Any]:
    """The benchmark's manifest for ``tarball``."""
    with open(tarball, "rb") as handle:
        sha256 = hashlib.file_digest(handle, "sha256").hexdigest()
    return {
        "name": "bench-memory", "version": "1.0", "arch": "x86_64",
        "filesystem": {"url": tarball.as_uri(), "sha256": sha256,
                       "size": tarball.stat().st_size},
        "boot": {"kernel": "/boot/vmlinuz", "cmdline": "console=ttyS0", "firmware": "both",
                 "root": {"size": image_gib * _GIB - _OVERHEAD}},
        "templates": ["/etc/hostname"],
    }


def run_pipeline(name: str, tarball: Path, work: Path, image_gib: int) -> dict[str, Any]:
    """One render in this (fresh) process. :returns: its time and peak RSS."""
    cache = work / "cache"
    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    if name == "render":
        shutil.rmtree(cache, ignore_errors=True)
    started = time.perf_counter()
    from cloudlets import Renderer

    renderer = Renderer(cache_dir=cache, data_dir=out / "data", work_dir=work,
                        ex_allow_file_urls=True, ex_source_date_epoch=EPOCH)
    hostname = "web-01" if name == "render" else "web-02"
    rendered = renderer.render(manifest(tarball, image_gib), str(out / "images") + "/",
                               storage="local", format="qcow2", config={"hostname": hostname})
    seconds = time.perf_counter() - started
    assert rendered.details["disk"]["base_cached"] == (name == "render-reconfig")
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tools = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    shutil.rmtree(out, ignore_errors=True)
    return {"pipeline": name, "seconds": seconds, "rss_mib": own, "tools_rss_mib": tools,
            "entries": rendered.details["rootfs"]["entries"],
            "stages": dict(rendered.timings)}


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark. :param argv: the command line's arguments.
    :returns: the report (what ``--json`` prints)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=60_000)
    parser.add_argument("--image-gib", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/cloudlets-bench-memory"))
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--run", choices=PIPELINES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tarball = args.workdir / f"tree-{args.files}.tar.gz"
    if args.run:
        return run_pipeline(args.run, tarball, args.workdir, args.image_gib)
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not tarball.exists():
        plain = tarball.with_suffix(".partial")
        make_tree(plain, args.files)
        subprocess.run(f"gzip -1 -c {plain} > {tarball}.partial", shell=True, check=True)
        plain.unlink()
        Path(f"{tarball}.partial").rename(tarball)
    load_before = _load()
    runs = []
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for name in PIPELINES:
        proc = subprocess.run(
            [sys.executable, __file__, "--files", str(args.files), "--image-gib",
             str(args.image_gib), "--workdir", str(args.workdir), "--run", name, "--json"],
            capture_output=True, text=True, check=False, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        runs.append(json.loads(proc.stdout))
    report = {"benchmark": "memory", "files": args.files, "image_gib": args.image_gib,
              "tarball_bytes": tarball.stat().st_size, "max_rss_mib": MAX_RSS_MIB,
              "load_before": load_before, "load_after": _load(), "cpus": os.cpu_count(),
              "runs": runs,
              "ok": all(max(r["rss_mib"], r["tools_rss_mib"]) < MAX_RSS_MIB for r in runs)}
    return report


def _print(report: dict[str, Any]) -> None:
    if "runs" not in report:  # one child's run
        print(json.dumps(report))
        return
    print(f"{report['image_gib']} GiB image, {report['files']} files "
          f"({report['tarball_bytes'] / 1e6:.1f} MB gzip'd); load average "
          f"{report['load_before']} before, {report['load_after']} after, "
          f"{report['cpus']} CPUs")
    print(f"{'pipeline':<18}{'s':>7}{'RSS MiB':>9}{'tools MiB':>11}  result")
    for r in report["runs"]:
        peak = max(r["rss_mib"], r["tools_rss_mib"])
        verdict = "ok" if peak < report["max_rss_mib"] else "FAIL"
        print(f"{r['pipeline']:<18}{r['seconds']:>7.2f}{r['rss_mib']:>9.1f}"
              f"{r['tools_rss_mib']:>11.1f}  {verdict} (< {report['max_rss_mib']:.0f} MiB)")


if __name__ == "__main__":
    result = main(sys.argv[1:])
    if "--json" in sys.argv[1:]:
        print(json.dumps(result, indent=None if "--run" in sys.argv[1:] else 2))
    else:
        _print(result)
