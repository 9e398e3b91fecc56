"""Benchmark: the rendering service with its embedded pool, and with two
Celery workers through a local Redis, same load, same run.

Run by hand (not a test)::

    PYTHONPATH=. .venv/bin/python benchmarks/bench_queue.py [--renders 16] \
        [--concurrency 4] [--payload-mib 16] [--sequential 6]

Each mode gets a real ``cloudlets serve`` on a loopback port (the embedded
pool: ``service.workers = 2``; Celery: ``[queue] backend = "celery"`` and two
``cloudlets worker --concurrency 1``, so both modes render two at once), and
Debian's ``redis-server`` on loopback for the Celery mode. Every render is a
distinct cloudlet (its own tarball: an incompressible payload of
``--payload-mib`` MiB, served by a loopback server), rendered to the ``tar``
format on a local target.

Both modes run side by side; two phases:

* **sequential** (``--sequential`` renders a mode, one at a time, the modes
  taking turns so the machine's other load falls on both): the *overhead*
  of a render is its time to ready (catalog ``created_at`` to
  ``finished_at``, as the service recorded them) less the render's own
  stage timings after ``prepare`` (what the renderer measured, on the
  worker: a worker's second ``prepare`` counts as overhead; ``fetch`` is
  left out, it overlaps ``rootfs``); its share of
  the time to ready is reported. The queue's overhead is the Celery share
  less the embedded share (target under 5 %).
* **load** (``--renders`` renders from ``--concurrency`` clients, each
  posting and polling until ready; one mode, then the other): renders per
  second (first claim to last ready) and the p50/p99 time to ready.

Everything listens on 127.0.0.1 and stops at the end; every wait is bounded.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import os
import signal
import statistics
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchstats import percentile  # noqa: E402

from cloudlets.catalog import ImageCatalog  # noqa: E402
from tests.celery_fixture import RedisServer, Worker, start_worker  # noqa: E402
from tests.service_fixture import Service, TarballServer, start_service  # noqa: E402

TOKENS = {"bench": "bench-token-0123456789abcdef"}
#: Seconds one render may take to become ready.
READY_TIMEOUT = 300.0


def config_text(server: TarballServer, queue: str) -> str:
    return f"""
[service]
data_dir = "state"
workers = 2
formats = ["tar"]
[limits]
renders_per_tenant = 64
queue_length = 256
{queue}
[targets.local]
driver = "local"
root = "images"
[formats.tar]
[tenants.bench]
token_env = "CLOUDLETS_TOKEN_BENCH"
[fetch]
allow_hosts = ["{server.host}"]
only_hosts = ["127.0.0.1"]
"""


def cloudlet(server: TarballServer, name: str, payload_mib: int) -> dict[str, Any]:
    """A cloudlet of its own tarball: a few files and an incompressible payload."""
    buffer = io.BytesIO()
    payload = os.urandom(payload_mib << 20)
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for path, data in (("boot/vmlinuz", b"kernel"), ("etc/hostname", b"old\n"),
                           ("etc/cloudlet-id", name.encode()), ("srv/payload", payload)):
            info = tarfile.TarInfo(path)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    (server.root / f"{name}.tar.gz").write_bytes(buffer.getvalue())
    return {"name": name, "version": "1.0", "arch": "x86_64", "description": "benchmark",
            "filesystem": {"url": f"{server.url}/{name}.tar.gz",
                           "sha256": hashlib.sha256(buffer.getvalue()).hexdigest()},
            "boot": {"kernel": "/boot/vmlinuz", "cmdline": "console=ttyS0"}}


def render(service: Service, manifest: dict[str, Any]) -> str:
    answer = service.call("POST", "/v1/images", "bench",
                          json={"manifest": manifest, "format": "tar", "target": "local"})
    if answer.status_code != 202:
        raise SystemExit(f"create answered {answer.status_code}: {answer.text}")
    image = service.wait_image(answer.json()["id"], "bench", READY_TIMEOUT)
    if image["status"] != "ready":
        raise SystemExit(f"render failed: {image['error']}")
    return str(image["id"])


def facts(catalog: ImageCatalog, entry_id: str) -> tuple[float, float, float, float]:
    """:returns: created, finished, time to ready, the render's own seconds."""
    entry = catalog.get(entry_id)
    assert entry.finished_at is not None
    timings = dict(entry.details.get("timings", {}))
    timings.pop("prepare", None)  # before the claim here; the worker's own is overhead
    timings.pop("fetch", None)  # the download overlaps the rootfs stage, which waits for it
    return (entry.created_at, entry.finished_at, entry.finished_at - entry.created_at,
            float(sum(timings.values())))


@dataclasses.dataclass
class Mode:
    """One service under test, with its workers."""

    name: str
    service: Service
    catalog: ImageCatalog
    workers: list[Worker]
    sequential: list[str] = dataclasses.field(default_factory=list)
    loaded: list[str] = dataclasses.field(default_factory=list)


def start_mode(name: str, base: Path, server: TarballServer, args: argparse.Namespace,
               redis_url: str | None, stack: contextlib.ExitStack) -> Mode:
    etc = base / name
    etc.mkdir(parents=True)
    queue = "" if redis_url is None else (
        f'[queue]\nbackend = "celery"\nbroker_url = "{redis_url}"\n'
        f"poll_interval = {args.poll_interval}\n")
    text = config_text(server, queue)
    (etc / "service.toml").write_text(text)
    workers: list[Worker] = []
    if redis_url is not None:
        for number in (1, 2):
            workers.append(start_worker(etc / "service.toml", number, TOKENS, concurrency=1))
            stack.callback(workers[-1].stop, signal.SIGTERM)
    service = start_service(etc, text, tokens=TOKENS)
    stack.callback(service.stop)
    return Mode(name, service, ImageCatalog(data_dir=etc / "state"), workers)


def load(mode: Mode, server: TarballServer, args: argparse.Namespace) -> None:
    manifests = [cloudlet(server, f"{mode.name}-load{n}", args.payload_mib)
                 for n in range(args.renders)]
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        mode.loaded = list(pool.map(lambda m: render(mode.service, m), manifests))


def summary(mode: Mode) -> dict[str, float]:
    seq = [facts(mode.catalog, e) for e in mode.sequential]
    stages: dict[str, list[float]] = {}
    for entry_id in mode.sequential:
        for stage, seconds in mode.catalog.get(entry_id).details.get("timings", {}).items():
            stages.setdefault(stage, []).append(float(seconds))
    print(f"{mode.name}: median stage seconds: " + ", ".join(
        f"{k} {statistics.median(v):.3f}" for k, v in stages.items()))
    loaded = [facts(mode.catalog, e) for e in mode.loaded]
    overhead = [(ready - own) / ready for _, _, ready, own in seq]
    span = max(f for _, f, _, _ in loaded) - min(c for c, _, _, _ in loaded)
    return {
        "render_s": statistics.median(own for _, _, _, own in seq),
        "seq_ready_s": statistics.median(ready for _, _, ready, _ in seq),
        "overhead_share": statistics.median(overhead),
        "renders_per_s": len(loaded) / span,
        "p50_ready_s": percentile([r for _, _, r, _ in loaded], 0.50),
        "p99_ready_s": percentile([r for _, _, r, _ in loaded], 0.99),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; :returns: each mode's summary and the queue's overhead."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--renders", type=int, default=16)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--payload-mib", type=int, default=16)
    parser.add_argument("--sequential", type=int, default=6)
    parser.add_argument("--poll-interval", type=float, default=0.5,
                        help="[queue] poll_interval of the Celery mode")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-queue-") as tmp, \
            contextlib.ExitStack() as stack:
        base = Path(tmp)
        (base / "tarballs").mkdir()
        server = TarballServer(base / "tarballs")
        stack.callback(server.close)
        server.gate.set()
        redis = RedisServer(base / "redis")
        redis.start()
        stack.callback(redis.stop)
        modes = [start_mode("embedded", base, server, args, None, stack),
                 start_mode("celery", base, server, args, redis.url, stack)]
        # the sequential renders alternate, so the machine's other load
        # falls on both modes alike
        for number in range(args.sequential):
            for mode in modes:
                mode.sequential.append(render(mode.service, cloudlet(
                    server, f"{mode.name}-seq{number}", args.payload_mib)))
        for mode in modes:
            load(mode, server, args)
        results = {"embedded pool (2 processes)": summary(modes[0]),
                   "celery (2 workers x 1)": summary(modes[1])}
    print(f"{args.renders} renders from {args.concurrency} clients, {args.payload_mib} MiB "
          f"payload each, tar format; {args.sequential} sequential renders for the overhead")
    print(f"{'mode':28} {'render s':>9} {'ready s':>8} {'overhead':>9} {'renders/s':>10} "
          f"{'p50 s':>7} {'p99 s':>7}")
    for mode, row in results.items():
        print(f"{mode:28} {row['render_s']:9.3f} {row['seq_ready_s']:8.3f} "
              f"{row['overhead_share']:9.1%} {row['renders_per_s']:10.2f} "
              f"{row['p50_ready_s']:7.2f} {row['p99_ready_s']:7.2f}")
    embedded, celery = results.values()
    print(f"queue overhead (celery less embedded): "
          f"{celery['overhead_share'] - embedded['overhead_share']:.1%} of a render's time "
          f"to ready ({celery['seq_ready_s'] - embedded['seq_ready_s']:+.3f} s)")
    return {"modes": results,
            "overhead_share": celery["overhead_share"] - embedded["overhead_share"]}


if __name__ == "__main__":
    main()
