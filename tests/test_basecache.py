"""The cache of base filesystems: bounded, least recently used evicted first,
a base in use never evicted (threads and processes), leftovers removed; and
concurrent renders of one cloudlet, threads and processes, that share one
download and one base."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudlets import Renderer
from cloudlets.disk.basecache import BaseCache
from cloudlets.errors import CacheError
from tests.httpfaults import FaultServer, Route
from tests.netpolicy import LOOPBACK_HOSTS
from tests.test_renderer import BASE_FILES, make_tarball, read_from_disk

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
BLOCK = 64 * 1024


def key(number: int) -> str:
    return hashlib.sha256(str(number).encode()).hexdigest()


def make_base(root: Path, number: int, *, used_at: float, blocks: int = 1) -> str:
    """A base of ``blocks`` 64 KiB written blocks with its sidecars, last
    used at ``used_at``."""
    name = key(number)
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{name}.ext4").write_bytes(os.urandom(BLOCK * blocks))
    (root / f"{name}.json").write_text('{"size": 1, "timestamp": 1}')
    (root / f"{name}.tree.json").write_text("{}")
    (root / f"{name}.vmdk-grains-z1").write_bytes(b"grains")  # a format's sidecar
    BaseCache(root).lease(name).release()
    os.utime(root / "locks" / f"{name}.use", (used_at, used_at))
    return name


def files_of(root: Path, name: str) -> list[str]:
    return sorted(path.name for path in root.iterdir() if path.name.startswith(name))


def test_least_recently_used_bases_go_first_until_within_the_bound(tmp_path: Path) -> None:
    root = tmp_path / "bases"
    names = [make_base(root, n, used_at=1_000_000 + n) for n in range(4)]
    cache = BaseCache(root, max_bytes=None)
    assert [info.key for info in cache.list()] == names
    cache.lease(names[0]).release()  # used now: the most recent
    assert [info.key for info in cache.list()] == [*names[1:], names[0]]
    per_base = cache.list()[0].size
    assert per_base >= BLOCK  # bytes on disk, sidecars included
    bound = int(per_base * 2.5)
    removed = cache.prune(bound)
    assert [info.key for info in removed] == names[1:3]
    assert [info.key for info in cache.list()] == [names[3], names[0]]
    assert cache.total_bytes() <= bound
    for name in names[1:3]:
        assert files_of(root, name) == []  # sidecars go with their base
        assert not (root / "locks" / f"{name}.use").exists()
    assert files_of(root, names[3]) == [f"{names[3]}.ext4", f"{names[3]}.json",
                                        f"{names[3]}.tree.json",
                                        f"{names[3]}.vmdk-grains-z1"]


def test_the_size_is_what_a_sparse_base_takes_on_disk(tmp_path: Path) -> None:
    root = tmp_path / "bases"
    name = make_base(root, 1, used_at=time.time())
    with open(root / f"{name}.ext4", "r+b") as handle:
        handle.truncate(1 << 30)  # a 1 GiB filesystem that holds 64 KiB
    (info,) = BaseCache(root).list()
    assert info.apparent_size == 1 << 30
    assert BLOCK <= info.size < 1 << 20


def test_a_base_in_use_is_never_evicted(tmp_path: Path) -> None:
    root = tmp_path / "bases"
    old, new = (make_base(root, n, used_at=1_000_000 + n) for n in range(2))
    cache = BaseCache(root, max_bytes=0)
    lease = cache.lease(old)
    assert {info.key: info.in_use for info in cache.list()} == {old: True, new: False}
    assert [info.key for info in cache.prune()] == [new]
    assert files_of(root, old) != []
    lease.release()
    assert [info.key for info in cache.prune()] == [old]
    assert cache.list() == []


_HOLD = """
import sys
from cloudlets.disk.basecache import BaseCache
lock = getattr(BaseCache(sys.argv[1]), sys.argv[2])(sys.argv[3])
print("held", flush=True)
sys.stdin.readline()
if len(sys.argv) > 4:
    open(sys.argv[4], "w").write("built by the child")
lock.release()
"""


@pytest.fixture
def child() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def hold(started: list[subprocess.Popen[str]], *argv: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, *argv], env=ENV, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    started.append(proc)
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def test_a_base_another_process_uses_is_never_evicted(
        tmp_path: Path, child: list[subprocess.Popen[str]]) -> None:
    root = tmp_path / "bases"
    name = make_base(root, 1, used_at=1_000_000)
    proc = hold(child, str(root), "lease", name)
    cache = BaseCache(root, max_bytes=0)
    assert cache.prune() == []
    assert cache.list()[0].in_use
    proc.communicate("\n", timeout=30)
    assert [info.key for info in cache.prune()] == [name]


def test_a_process_waits_for_the_one_building_the_same_base(
        tmp_path: Path, child: list[subprocess.Popen[str]]) -> None:
    root = tmp_path / "bases"
    name = key(7)
    built = root / f"{name}.ext4"
    proc = hold(child, str(root), "building", name, str(built))
    got: list[bool] = []

    def build() -> None:
        lock = BaseCache(root).building(name)
        got.append(built.exists())  # the child built it before we got the lock
        lock.release()

    waiter = threading.Thread(target=build)
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive() and got == []  # still waiting for the child
    proc.communicate("\n", timeout=30)
    waiter.join(30)
    assert got == [True]


def test_leftovers_of_dead_renders_are_removed_unless_held(tmp_path: Path) -> None:
    root = tmp_path / "bases"
    kept = make_base(root, 1, used_at=time.time())
    dead, gone, busy = key(2), key(3), key(4)
    (root / f"{dead}.ext4.partial-123-abcd").write_bytes(b"x")
    (root / f"{gone}.tree.json").write_text("{}")  # sidecars without their base
    (root / f"{gone}.vmdk-grains-z1").write_bytes(b"x")
    (root / f"{busy}.ext4.partial-456-ef01").write_bytes(b"x")
    (root / "unrelated.txt").write_text("not ours")
    cache = BaseCache(root, max_bytes=None)
    building = cache.building(busy)
    assert cache.prune() == []
    assert sorted(p.name for p in root.iterdir() if p.is_file()) == sorted([
        f"{busy}.ext4.partial-456-ef01", *files_of(root, kept), "prune.lock", "unrelated.txt"])
    building.release()
    cache.prune()
    assert not (root / f"{busy}.ext4.partial-456-ef01").exists()


def test_a_negative_bound_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="must not be negative"):
        BaseCache(tmp_path, max_bytes=-1)
    from cloudlets import ConfigurationError

    with pytest.raises(ConfigurationError, match="ex_base_cache_max_bytes"):
        Renderer(cache_dir=tmp_path, ex_base_cache_max_bytes=-1)


# -- renders ---------------------------------------------------------------------------

EPOCH = 1_700_000_000


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        yield srv


def publish(server: FaultServer, name: str, *, delay: float = 0.0) -> tuple[dict[str, Any],
                                                                            Route]:
    data = make_tarball({**BASE_FILES, f"etc/{name}": name.encode()})
    digest = hashlib.sha256(data).hexdigest()
    route = server.add(f"/{digest}.tar.gz", Route(data, delay=delay))
    manifest = {
        "name": name, "version": "1.0",
        "filesystem": {"url": server.url(f"/{digest}.tar.gz"), "sha256": digest,
                       "size": len(data)},
        "boot": {"kernel": "/boot/vmlinuz", "cmdline": "console=ttyS0",
                 "root": {"size": 64 * 1024 * 1024}},
        "args": {"hostname": {"type": "string", "default": "tiny-host"}},
        "templates": ["/etc/hostname"],
    }
    return manifest, route


def new_renderer(tmp_path: Path, **kwargs: Any) -> Renderer:
    return Renderer(cache_dir=tmp_path / "cache", data_dir=tmp_path / "data",
                    work_dir=tmp_path / "work", ex_source_date_epoch=EPOCH,
                    ex_allow_hosts=LOOPBACK_HOSTS, **kwargs)


_RENDER = """
import json, sys, time
from pathlib import Path
from cloudlets import Renderer
tmp, manifest, hostname, go = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
renderer = Renderer(cache_dir=tmp + "/cache", data_dir=tmp + "/data", work_dir=tmp + "/work",
                    ex_source_date_epoch=EPOCH, ex_allow_hosts=("127.0.0.1",))
print("ready", flush=True)
while not Path(go).exists():
    time.sleep(0.005)
result = renderer.render(manifest, tmp + "/out/" + hostname, "local", "raw",
                         {"hostname": hostname})
print(json.dumps({"base_cached": result.details["disk"]["base_cached"],
                  "tarball": result.details["tarball"], "disk": result.primary.location}))
""".replace("EPOCH", str(EPOCH))


def test_concurrent_renders_of_one_cloudlet_download_once_and_build_one_base(
        server: FaultServer, tmp_path: Path, child: list[subprocess.Popen[str]]) -> None:
    # the download takes a while: every render starts before the first has its base
    manifest, route = publish(server, "shared", delay=0.5)
    go = tmp_path / "go"
    for number in range(2):  # two processes...
        proc = subprocess.Popen(
            [sys.executable, "-c", _RENDER, str(tmp_path), json.dumps(manifest),
             f"proc-{number}", str(go)], env=ENV, text=True, stdout=subprocess.PIPE)
        child.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    outcomes: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def render(hostname: str) -> None:
        while not go.exists():
            time.sleep(0.001)
        try:
            result = new_renderer(tmp_path).render(
                manifest, str(tmp_path / "out" / hostname), "local", "raw",
                {"hostname": hostname})
            outcomes.append({"base_cached": result.details["disk"]["base_cached"],
                             "tarball": result.details["tarball"],
                             "disk": result.primary.location})
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=render, args=(f"thread-{n}",)) for n in range(3)]
    for thread in threads:  # ...and three threads of this one
        thread.start()
    go.touch()
    for thread in threads:
        thread.join(120)
    for proc in child:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        outcomes.append(json.loads(out))
    assert errors == []
    assert len(outcomes) == 5
    assert route.requests == 1 and route.full_bodies == 1  # one download...
    assert [o["base_cached"] for o in outcomes].count(False) == 1  # ...one base built
    assert [o["tarball"].get("read", True) for o in outcomes].count(True) == 1
    assert len(list((tmp_path / "cache" / "bases").glob("*.ext4"))) == 1
    for outcome in outcomes:  # each its own config
        hostname = Path(outcome["disk"]).name.removesuffix(".raw")
        assert read_from_disk(Path(outcome["disk"]), "/etc/hostname") == \
            f"{hostname}\n".encode()


def test_the_renderer_keeps_its_base_cache_within_its_bound(
        server: FaultServer, tmp_path: Path) -> None:
    renderer = new_renderer(tmp_path, ex_base_cache_max_bytes=0)
    bases = tmp_path / "cache" / "bases"
    first, _ = publish(server, "first")
    second, _ = publish(server, "second")
    renderer.render(first, str(tmp_path / "out" / "a"), "local", "raw")
    assert len(list(bases.glob("*.ext4"))) == 1  # in use while it was pruned: kept
    renderer.render(second, str(tmp_path / "out" / "b"), "local", "raw")
    (left,) = BaseCache(bases).list()  # the first went when the second was built
    again = renderer.render(second, str(tmp_path / "out" / "c"), "local", "raw")
    assert again.details["disk"]["base_cached"] is True
    assert [info.key for info in BaseCache(bases).list()] == [left.key]
    unbounded = new_renderer(tmp_path, ex_base_cache_max_bytes=None)
    unbounded.render(first, str(tmp_path / "out" / "d"), "local", "raw")
    assert len(BaseCache(bases).list()) == 2


def test_cli_lists_and_prunes_bases(tmp_path: Path) -> None:
    from tests.test_cache import run_cli

    root = tmp_path / "c"
    old, new = (make_base(root / "bases", n, used_at=1_000_000 + n) for n in range(2))
    code, text = run_cli("cache", "list", "--cache-dir", str(root))
    assert code == 0 and "2 base filesystems" in text
    assert text.index(f"base {old[:16]}") < text.index(f"base {new[:16]}")  # LRU first
    listing = json.loads(run_cli("--json", "cache", "list", "--cache-dir", str(root))[1])
    assert [b["key"] for b in listing["bases"]] == [old, new]
    assert listing["bases_total_bytes"] == sum(b["size"] for b in listing["bases"])
    code, text = run_cli("cache", "prune", "--cache-dir", str(root))  # leftovers only
    assert code == 0 and "evicted" not in text
    per_base = listing["bases"][0]["size"]
    code, text = run_cli("--json", "cache", "prune", "--cache-dir", str(root),
                         "--bases-max-bytes", str(per_base))
    report = json.loads(text)
    assert [b["key"] for b in report["removed_bases"]] == [old]
    assert report["bases_remaining_bytes"] == listing["bases"][1]["size"]
    code, text = run_cli("cache", "prune", "--cache-dir", str(root), "--bases-max-bytes", "0")
    assert code == 0 and f"evicted base {new[:16]}" in text
    assert BaseCache(root / "bases").list() == []
