"""Benchmark renders against the floor, the straightforward pipeline and virt-make-fs (by hand).

    python benchmarks/bench_disk.py [--tree random|real|both] [--rounds 3] [--workdir DIR]
        [--files 20000] [--megabytes 300] [--real-files 20000] [--real-megabytes 279]
        [--warm-renders 5] [--only PIPELINE ...] [--json FILE]

Two trees, each written once as a gzip'd tarball (kept in ``--workdir``):

* ``random``: ``--files`` files of about ``--megabytes`` MB of random,
  incompressible content (100 files a directory), ``gzip -1``;
* ``real``: about ``--real-files`` files and ``--real-megabytes`` MB copied
  from this machine: shared libraries (``/usr/lib/<multiarch>``), Python
  (``/usr/lib/python3*``) and ``/usr/share``, chosen by a sorted walk with a
  byte quota for each (the same files on every run on the same machine; the
  tree's sha256 is printed so runs can be compared), ``gzip -6``. Real
  content is what makes the inflate cost show.

Both also hold a kernel stand-in and two templates (``/etc/hostname`` and
``/etc/network/interfaces``: hostname and IP). Each tree is turned into a
1 GiB qcow2 image by:

* ``render``: a cold :meth:`cloudlets.Renderer.render` of a manifest naming
  that tarball by ``file://`` URL (empty cache: fetch and verify it while it
  is read under the archive policy and ``mke2fs -d -`` builds the ext4 from
  the normalized members, render the templates, GPT disk with BIOS and UEFI
  GRUB, qemu-img convert, store locally). The timer starts after the
  manifest is written (its sha256 of the tarball is an input) and the old
  cache is removed, and includes importing cloudlets;
* ``render-reconfig``: the same render again in a fresh Python process with
  another hostname and IP (the cached tarball and base filesystem, the
  templated files patched in);
* ``rerender-cli``: the same re-render through the command line,
  ``python -m cloudlets render --set hostname=... --set ip...``, each round
  with a hostname (tagged per benchmark run) and IP no render has had before (so the request is
  validated afresh, as a new server's is; the manifest's validation may be
  remembered from an earlier render), timed from the process's start
  (interpreter start and imports included; cloudlets' bytecode compiled
  once into ``<workdir>/pycache``, as an installed package's is, whatever
  ``PYTHONDONTWRITEBYTECODE`` says);
* ``rerender-warm``: ``--warm-renders`` re-renders, each with a new hostname
  and IP, by one Renderer in one process that has rendered once before (as
  the service's), each after removing the last one's image (untimed, as a
  re-render replacing it would): the best of them;
* ``cold-cli`` (once): a cold render through the command line of the same
  inputs as the first round's ``rerender-cli``, with an empty cache of its
  own; its image must be byte-identical to that re-render's (``identical``
  in the report);
* ``disk-stage``: :func:`cloudlets.disk.build_disk` alone from the
  uncompressed tree tar, then ``qemu-img convert``;
* ``floor``: the unavoidable work done by the fastest tools, with no checks:
  ``rapidgzip -P 2 -d -c`` (parallel inflate on both cores) piped into
  ``mke2fs -t ext4 -d - image 1G`` (e2fsprogs >= 1.47.1 reads a tar on
  stdin), then ``qemu-img convert -O qcow2``;
* ``baseline``: ``tar -xzf`` into a directory, ``mke2fs -d dir``,
  ``qemu-img convert -O qcow2`` (a bare filesystem: no partition table, no
  bootloader, no verification);
* ``virt-make-fs`` (libguestfs, Debian ``libguestfs-tools``):
  ``--format=qcow2 --type=ext4 --size=1G`` from the same tarball, once.
  ``virtmakefs.setup()`` makes it runnable first (as root it installs the
  package; without a kernel in ``/boot`` it unpacks the test suite's Debian
  kernel package for supermin; no KVM here, so ``LIBGUESTFS_BACKEND=direct``
  and ``force_tcg``) and boots the appliance once with
  ``libguestfs-test-tool``, which builds it into ``<workdir>/libguestfs``:
  the measured run finds it built (``appliance built in the run`` in the
  report says otherwise). When it cannot run, the row is skipped with the
  reason.

Each pipeline runs in a fresh process, ``--rounds`` times (``virt-make-fs``
and ``cold-cli`` once), interleaved, each after removing the last run's
output and a ``sync`` (untimed), so that one run's writeback does not land on
the next. The table shows the best and the median wall time, every best
time's ratio to the best of ``floor``, ``baseline`` and ``virt-make-fs``, the
peak RSS of the largest process involved (Python or tool: ``ru_maxrss`` of
the pipeline's process and of its children) and the stages of the best run
(``RenderResult.timings`` for the renders). The page cache is warm (the
tarballs are read once before timing). ``main(argv)`` returns the report
(``--json FILE`` writes it): ``benchmarks/run_all.py`` calls it.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import os
import random
import resource
import secrets
import shutil
import stat
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchtable import fmt_number, fmt_ratio, machine, ratios, text_table

ROOT = Path(__file__).resolve().parents[1]
ROOT_SIZE = 1024 * 1024 * 1024 - 68 * 1024 * 1024  # disk of ~1 GiB with BIOS boot + ESP
SEED = "bench"
EPOCH = 1_700_000_000
TREES = ("random", "real")

#: The templated files, in both trees.
TEMPLATES = {
    "etc/hostname": b"{{ hostname }}\n",
    "etc/network/interfaces": (
        b"auto lo\niface lo inet loopback\n"
        b"{% for i in ip.interfaces %}\nauto {{ i.name }}\niface {{ i.name }} inet static\n"
        b"    address {{ i.address }}/{{ i.prefix }}\n{% endfor %}\n"),
}

#: The real tree's sources: directory globs, share of the bytes, largest file taken.
REAL_SOURCES = (
    ("/usr/lib/*-linux-gnu", 0.55, 8 << 20),
    ("/usr/lib/python3*", 0.25, 8 << 20),
    ("/usr/share", 0.20, 64 << 10),
)


def config_for(number: int, tag: str = "") -> dict[str, Any]:
    """Render config number ``number``: its own hostname (ending in ``tag``) and static IP."""
    return {"hostname": f"web-{number:02d}{tag}",
            "ip": {"interfaces": [{"name": "eth0",
                                   "addresses": [f"192.0.2.{10 + number}/24"]}]}}


def config_args(config: dict[str, Any]) -> list[str]:
    """The same config as ``cloudlets render --set`` arguments."""
    interface = config["ip"]["interfaces"][0]
    return ["--set", f"hostname={config['hostname']}",
            "--set", f"ip.interfaces.0.name={interface['name']}",
            "--set", f"ip.interfaces.0.addresses={json.dumps(interface['addresses'])}"]


class _Tar:
    """A tarball being written with fixed owners and times."""

    def __init__(self, archive: tarfile.TarFile) -> None:
        self.archive = archive
        self.dirs: set[str] = set()

    def add(self, name: str, kind: bytes, mode: int, data: bytes | None = None,
            link: str = "") -> None:
        parent = name.rpartition("/")[0]
        if parent and parent not in self.dirs:
            self.add(parent, tarfile.DIRTYPE, 0o755)
        if kind == tarfile.DIRTYPE:
            if name in self.dirs:
                return
            self.dirs.add(name)
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime, info.linkname = kind, mode, EPOCH, link
        info.uid = info.gid = 0 if not name.startswith("home") else 1000
        if data is not None:
            info.size = len(data)
        self.archive.addfile(info, io.BytesIO(data) if data is not None else None)

    def common(self) -> None:
        self.add("boot/vmlinuz", tarfile.REGTYPE, 0o644, b"kernel")
        for name, text in TEMPLATES.items():
            self.add(name, tarfile.REGTYPE, 0o644, text)


def make_tree(path: Path, files: int, megabytes: int) -> None:
    """Write a reproducible synthetic tree tarball."""
    rng = random.Random(0)
    mean = megabytes * 1_000_000 // files
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        tar = _Tar(archive)
        tar.common()
        tar.add("home", tarfile.DIRTYPE, 0o755)
        tar.add("usr", tarfile.DIRTYPE, 0o755)
        for index in range(files):
            directory = f"usr/d{index // 100:04d}" if index % 2 else f"home/d{index // 100:04d}"
            size = min(int(rng.expovariate(1 / mean)), 40 * mean)
            tar.add(f"{directory}/f{index:06d}", tarfile.REGTYPE, 0o644, rng.randbytes(size))


def _walk(root: str) -> Iterator[tuple[str, os.stat_result]]:
    """Every entry under ``root``, in sorted order, without following links."""
    for directory, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(directory, name)
            try:
                yield path, os.lstat(path)
            except OSError:
                continue


def select_real(files: int, megabytes: int) -> list[tuple[str, os.stat_result]]:
    """The real tree's files: a sorted walk of each source, up to its byte
    quota and the total file count (files larger than the source's largest
    are passed over, so one big library does not fill the quota), plus the
    relative symbolic links met on the way (not counted)."""
    chosen: list[tuple[str, os.stat_result]] = []
    count = 0
    for pattern, share, largest in REAL_SOURCES:
        quota, taken = megabytes * 1_000_000 * share, 0
        for root in sorted(glob.glob(pattern)):
            for path, info in _walk(root):
                if count >= files:
                    break
                if stat.S_ISLNK(info.st_mode):
                    target = os.readlink(path)
                    if not target.startswith("/") and ".." not in target.split("/"):
                        chosen.append((path, info))
                    continue
                if (not stat.S_ISREG(info.st_mode) or info.st_size > largest
                        or taken + info.st_size > quota or not os.access(path, os.R_OK)):
                    continue
                chosen.append((path, info))
                taken += info.st_size
                count += 1
    return chosen


def make_real_tree(path: Path, files: int, megabytes: int) -> None:
    """Write the real tree: :func:`select_real`'s files under their own paths,
    owned by root, permissions kept (no set-id bits, no group or other write)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        tar = _Tar(archive)
        tar.common()
        for source, info in select_real(files, megabytes):
            name = source.lstrip("/")
            if stat.S_ISLNK(info.st_mode):
                tar.add(name, tarfile.SYMTYPE, 0o777, link=os.readlink(source))
                continue
            try:
                with open(source, "rb") as handle:
                    data = handle.read()
            except OSError:
                continue
            tar.add(name, tarfile.REGTYPE, stat.S_IMODE(info.st_mode) & 0o755, data)


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
        "templates": ["/" + name for name in TEMPLATES],
    }


def _qcow2(source: Path, target: Path) -> None:
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(source),
                    str(target)], check=True)


def _sha256_of_image(out: Path) -> str:
    """The sha256 of the one image file under ``out`` (untimed)."""
    images = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix == ".qcow2")
    assert len(images) == 1, f"expected one qcow2 under {out}: {images}"
    with open(images[0], "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def rapidgzip_path() -> str | None:
    """The ``rapidgzip`` CLI: on PATH, or beside this interpreter (a venv's bin)."""
    beside = Path(sys.executable).parent / "rapidgzip"
    return shutil.which("rapidgzip") or (str(beside) if beside.exists() else None)


def _cli_render(manifest_path: Path, config: dict[str, Any], cache: Path, work: Path,
                result: dict[str, Any]) -> None:
    """``python -m cloudlets render`` in a fresh process; stage timings into ``result``."""
    # Compiled once, as an installed package is (a PYTHONDONTWRITEBYTECODE
    # set in the bencher's environment would have every run compile
    # cloudlets again: 0.2 s here), in the workdir, not the source tree.
    env = dict(os.environ, PYTHONPATH=str(ROOT), CLOUDLETS_HOME=str(work / "data"),
               TMPDIR=str(work), PYTHONPYCACHEPREFIX=str(work.parent / "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    argv = [sys.executable, "-m", "cloudlets", "render", str(manifest_path), "--json",
            "-f", "qcow2", "-o", str(work / "out") + "/", "--cache-dir", str(cache),
            "--allow-file-urls", "--no-catalog", "--progress", "none", *config_args(config)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"cloudlets render failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rendered = json.loads(proc.stdout)
    expect_cached = cache != work / "cache"
    assert rendered["details"]["disk"]["base_cached"] == expect_cached, rendered["details"]
    result.update({f"stage:{k}": v for k, v in rendered.get("timings", {}).items()})


#: rerender-cli's config in round N is number CLI_CONFIG + N; cold-cli's, round 0's.
CLI_CONFIG = 20


def run_pipeline(name: str, tree: Path, work: Path, warm_renders: int = 5,
                 round_index: int = 0) -> dict[str, Any]:
    """Run one pipeline in this process and return its timings."""
    tarball = tree.with_suffix(".tar.gz")
    # Every pipeline, API or CLI, sees the same epoch, so that the command
    # line's renders find the base filesystem the API's cold render cached
    # (the base's key holds $SOURCE_DATE_EPOCH).
    os.environ["SOURCE_DATE_EPOCH"] = str(EPOCH)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    result: dict[str, Any] = {}
    # Inputs, not work: the manifest (with the tarball's sha256, which its
    # publisher computed) exists before the render; an empty cache too.
    manifest = _manifest(tarball)
    manifest_path = work / "manifest.json"
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    cache = tree.parent / f"render-cache-{tree.stem}"
    if name == "render":
        shutil.rmtree(cache, ignore_errors=True)
    elif name in ("render-reconfig", "rerender-cli", "rerender-warm"):
        assert any((cache / "bases").glob("*.ext4")), "run the render pipeline first"
    started = time.perf_counter()
    if name in ("render", "render-reconfig"):
        from cloudlets import Renderer

        renderer = Renderer(cache_dir=cache, data_dir=work / "data", work_dir=work,
                            ex_allow_file_urls=True, ex_source_date_epoch=EPOCH)
        rendered = renderer.render(manifest, str(work / "out") + "/", storage="local",
                                   format="qcow2", config=config_for(1 if name == "render" else 2))
        assert rendered.details["disk"]["base_cached"] == (name == "render-reconfig")
        result.update({f"stage:{k}": v for k, v in rendered.timings.items()})
    elif name in ("rerender-cli", "cold-cli"):
        if name == "cold-cli":
            cache = work / "cache"
        number = CLI_CONFIG + (round_index if name == "rerender-cli" else 0)
        _cli_render(manifest_path, config_for(number, os.environ.get("BENCH_DISK_TAG", "")),
                    cache, work, result)
        result["total"] = time.perf_counter() - started
        result["sha256"] = _sha256_of_image(work / "out")
    elif name == "rerender-warm":
        from cloudlets import Renderer

        renderer = Renderer(cache_dir=cache, data_dir=work / "data", work_dir=work,
                            ex_allow_file_urls=True, ex_source_date_epoch=EPOCH)
        renderer.render(manifest, str(work / "warmup") + "/", storage="local", format="qcow2",
                        config=config_for(3))  # the process has rendered before
        times: list[float] = []
        previous = work / "warmup"
        for number in range(warm_renders):
            # Untimed: the last image goes, as a re-render replacing it would
            # (a real service's page cache is full and recycles). Kept, each
            # image's page cache (written back, so not dropped by the writer's
            # DONTNEED) takes ~330 MB of memory never touched since it went
            # back to the host (virtio-balloon free page reporting): the first
            # touch costs ~0.8 s per 300 MB, in the copy's memcpy.
            shutil.rmtree(previous)
            previous = work / f"out{number}"
            begun = time.perf_counter()
            rendered = renderer.render(manifest, str(work / f"out{number}") + "/",
                                       storage="local", format="qcow2",
                                       config=config_for(4 + number))
            times.append(time.perf_counter() - begun)
            if times[-1] == min(times):
                result.update({f"stage:{k}": v for k, v in rendered.timings.items()})
        result["total"] = min(times)
        result["warm_s"] = times
    elif name == "disk-stage":
        from cloudlets.disk import BootSpec, build_disk

        boot = BootSpec(
            kernel="/boot/vmlinuz", cmdline="console=ttyS0", firmware="both", root_size=ROOT_SIZE
        )
        image = build_disk(tree, boot, work / "disk.raw", seed=SEED, workdir=work / "scratch",
                           source_date_epoch=EPOCH)
        result["raw"] = time.perf_counter() - started
        _qcow2(image.path, work / "q")
    elif name == "floor":
        inflate = subprocess.Popen([rapidgzip_path() or "rapidgzip", "-P", "2", "-d", "-c",
                                    str(tarball)], stdout=subprocess.PIPE)
        assert inflate.stdout is not None
        mke2fs = subprocess.Popen(["mke2fs", "-q", "-F", "-t", "ext4", "-d", "-",
                                   str(work / "fs.img"), "1G"], stdin=inflate.stdout)
        inflate.stdout.close()
        if mke2fs.wait() or inflate.wait():
            raise SystemExit(f"floor: rapidgzip {inflate.returncode}, mke2fs {mke2fs.returncode}")
        result["raw"] = time.perf_counter() - started
        _qcow2(work / "fs.img", work / "q")
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
        import virtmakefs

        env = dict(os.environ, **virtmakefs.environment(work.parent))
        built = virtmakefs.appliance_id(env)
        started = time.perf_counter()
        try:
            proc = subprocess.run(["virt-make-fs", "--format=qcow2", "--type=ext4", "--size=1G",
                                   str(tarball), str(work / "q")], env=env, capture_output=True,
                                  text=True, timeout=1800, check=False)
        except subprocess.TimeoutExpired:
            raise SystemExit("virt-make-fs: timed out after 1800 s") from None
        if proc.returncode:
            lines = proc.stderr.strip().splitlines() or ["?"]
            raise SystemExit(f"virt-make-fs failed ({proc.returncode}): "
                             + next((x for x in reversed(lines) if "error" in x), lines[-1]))
        result["total"] = time.perf_counter() - started
        result["appliance_built"] = virtmakefs.appliance_id(env) != built
    else:
        raise SystemExit(f"unknown pipeline {name}")
    result.setdefault("total", time.perf_counter() - started)
    result["rss_mib"] = _peak_rss_mib()
    return result


PIPELINES = ["render", "render-reconfig", "rerender-cli", "rerender-warm", "cold-cli",
             "disk-stage", "floor", "baseline", "virt-make-fs"]
#: Run in the first round only (about 43 s each for virt-make-fs here; cold-cli is the check).
ONCE = {"virt-make-fs", "cold-cli"}
#: Columns of a pipeline's stages shown in the tables, besides the renderer's own.
STAGE_KEYS = ("extract", "raw")


_COUNT = """
import sys, tarfile
with tarfile.open(sys.argv[1]) as archive:
    members = archive.getmembers()
print(sum(1 for m in members if m.isfile()), len(members))
"""


def prepare_tree(kind: str, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """Write the tree's tar and tarball once; warm the page cache; describe it."""
    if kind == "random":
        tree = args.workdir / f"random-{args.files}-{args.megabytes}.tar"
        make, level, count, size = make_tree, 1, args.files, args.megabytes
    else:
        tree = args.workdir / f"real-{args.real_files}-{args.real_megabytes}.tar"
        make, level, count, size = (make_real_tree, 6, args.real_files,
                                    args.real_megabytes)
    tarball = tree.with_suffix(".tar.gz")
    if not tree.exists():
        print(f"writing {tree} ...", flush=True)
        make(tree.with_suffix(".partial"), count, size)
        tree.with_suffix(".partial").rename(tree)
    if not tarball.exists():
        subprocess.run(f"gzip -{level} -n -c {tree} > {tarball}.partial", shell=True,
                       check=True)
        Path(f"{tarball}.partial").rename(tarball)
    digest = hashlib.sha256()
    for path in (tree, tarball):  # warm the page cache for every pipeline alike
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                if path == tarball:
                    digest.update(chunk)
    # counted in a child: 20,000 members read here would raise this process's
    # RSS, which every pipeline's process inherits as its ru_maxrss floor
    counted = subprocess.run([sys.executable, "-c", _COUNT, str(tree)], capture_output=True,
                             text=True, check=True).stdout.split()
    info = {"tree": kind, "path": str(tree), "tar_mb": round(tree.stat().st_size / 1e6, 1),
            "gzip_mb": round(tarball.stat().st_size / 1e6, 1),
            "files": int(counted[0]), "members": int(counted[1]), "gzip_level": level,
            "tarball_sha256": digest.hexdigest()}
    print(f"tree {kind}: {tree} ({info['tar_mb']:.0f} MB, {info['files']} files; "
          f"{info['gzip_mb']:.0f} MB gzip -{level}; sha256 {info['tarball_sha256'][:16]}...)",
          flush=True)
    return tree, info


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per pipeline: best and median total, peak RSS, the best run's stages."""
    summary: dict[str, dict[str, Any]] = {}
    for name, results in runs.items():
        if not results:
            continue
        ordered = sorted(results, key=lambda r: r["total"])
        fastest = ordered[0]
        summary[name] = {
            "best_s": fastest["total"],
            "median_s": statistics.median(r["total"] for r in results),
            "rss_mib": max(r["rss_mib"] for r in results),
            "runs": len(results),
            "stages": {k.removeprefix("stage:"): v for k, v in fastest.items()
                       if k.startswith("stage:") or k in STAGE_KEYS},
            **({"warm_s": fastest["warm_s"]} if "warm_s" in fastest else {}),
            **({"appliance_built": any(r["appliance_built"] for r in results)}
               if "appliance_built" in fastest else {}),
            **({"sha256": sorted({r["sha256"] for r in results})}
               if "sha256" in fastest else {}),
        }
    best = {name: row["best_s"] for name, row in summary.items()}
    for name, against in ratios(best).items():
        summary[name]["ratios"] = against
    return summary


def disk_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The report's pipelines as table rows (shared with run_all.py)."""
    rows = []
    for kind, tree in report["trees"].items():
        for name, row in tree["pipelines"].items():
            rows.append({"area": f"disk/{kind}", "pipeline": name, "best_s": row["best_s"],
                         "median_s": row["median_s"], "ratios": row.get("ratios", {}),
                         "rss_mib": row["rss_mib"], "stages": row["stages"]})
    return rows


def stages_text(stages: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in stages.items())


def print_report(report: dict[str, Any]) -> None:
    header = ["pipeline", "best s", "median s", "x floor", "x baseline", "x virt-make-fs",
              "peak RSS MiB", "stages (best run)"]
    for kind, tree in report["trees"].items():
        info = tree["info"]
        print(f"\ntree {kind}: {info['files']} files, {info['tar_mb']:.0f} MB, "
              f"{info['gzip_mb']:.0f} MB gzip'd; 1 GiB image, qcow2; "
              f"{report['rounds']} round(s); load {tree['load_before']} before, "
              f"{tree['load_after']} after")
        rows = []
        for name, row in tree["pipelines"].items():
            against = row.get("ratios", {})
            rows.append([name, fmt_number(row["best_s"]), fmt_number(row["median_s"]),
                         *(fmt_ratio(against.get(ref))
                           for ref in ("floor", "baseline", "virt-make-fs")),
                         fmt_number(row["rss_mib"], 0), stages_text(row["stages"])])
        print(text_table(header, rows, align="lrrrrrrl"))
        pipelines = tree["pipelines"]
        if "render" in pipelines and "virt-make-fs" in pipelines:
            vmf = pipelines["virt-make-fs"]
            print(f"cold render {vmf['best_s'] / pipelines['render']['best_s']:.1f}x faster "
                  "than virt-make-fs (target 15x); appliance built in the run: "
                  + ("YES" if vmf.get("appliance_built") else "no (cached)"))
        if tree.get("identical") is not None:
            print("re-render byte-identical to a cold render of the same inputs: "
                  + ("yes" if tree["identical"] else "NO"))
        for name, reason in tree["skipped"].items():
            print(f"{name}: skipped ({reason})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; :returns: the report (also written by ``--json FILE``)."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tree", choices=("random", "real", "both"), default="both")
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--megabytes", type=int, default=300)
    parser.add_argument("--real-files", type=int, default=20_000)
    parser.add_argument("--real-megabytes", type=int, default=279)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/cloudlets-bench"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm-renders", type=int, default=5,
                        help="re-renders of the rerender-warm process (the best counts)")
    parser.add_argument("--only", action="append", choices=PIPELINES,
                        help="run only these pipelines (repeatable)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the report here")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    parser.add_argument("--run-tree", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-round", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.warm_renders < 1:
        parser.error("--rounds and --warm-renders must be at least 1")
    if args.run:
        print(json.dumps(run_pipeline(args.run, args.run_tree, args.workdir / args.run,
                                      args.warm_renders, args.run_round)))
        return {}
    args.workdir = args.workdir.resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine(), "rounds": args.rounds, "trees": {}}
    # rerender-cli's hostnames end in this run's own tag: no memo of an
    # earlier benchmark run has seen its requests
    os.environ["BENCH_DISK_TAG"] = f"-{secrets.token_hex(4)}"
    for kind in TREES if args.tree == "both" else (args.tree,):
        tree, info = prepare_tree(kind, args)
        pipelines = list(args.only or PIPELINES)
        skipped: dict[str, str] = {}
        if "virt-make-fs" in pipelines:
            import virtmakefs

            try:
                virtmakefs.setup(args.workdir)
            except virtmakefs.Unavailable as exc:
                skipped["virt-make-fs"] = str(exc)
        if "floor" in pipelines and not rapidgzip_path():
            skipped["floor"] = "rapidgzip not installed (pip install rapidgzip)"
        pipelines = [p for p in pipelines if p not in skipped]
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in pipelines}
        load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
        for round_index in range(args.rounds):
            for name in pipelines:
                if name in ONCE and round_index:
                    continue
                shutil.rmtree(args.workdir / name, ignore_errors=True)
                os.sync()  # the last run's writeback (and deletes) must not land on this one
                proc = subprocess.run(
                    [sys.executable, __file__, "--workdir", str(args.workdir), "--run", name,
                     "--run-tree", str(tree), "--warm-renders", str(args.warm_renders),
                     "--run-round", str(round_index)],
                    capture_output=True, text=True, check=False,
                )  # fmt: skip
                shutil.rmtree(args.workdir / name, ignore_errors=True)
                if proc.returncode != 0:
                    print(f"{kind}/{name}: failed\n{proc.stderr[-2000:]}", flush=True)
                    skipped[name] = "failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
                    continue
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                result["round"] = round_index
                runs[name].append(result)
                print(f"  {kind} round {round_index + 1} {name:<16}{result['total']:8.2f} s "
                      f"{result['rss_mib']:6.0f} MiB", flush=True)
        summary = summarize(runs)
        identical = None
        if "cold-cli" in summary and "rerender-cli" in summary:
            first = [r["sha256"] for r in runs["rerender-cli"] if r["round"] == 0]
            identical = summary["cold-cli"]["sha256"] == first
        report["trees"][kind] = {
            "info": info, "pipelines": summary, "identical": identical, "skipped": skipped,
            "load_before": load_before,
            "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
