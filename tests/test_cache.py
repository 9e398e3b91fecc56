"""The tarball cache: verified inserts, one download for many callers (threads
and processes), corruption detected on use, LRU eviction that spares entries
in use, and the ``cloudlets cache`` subcommands."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloudlets.cache import CacheEntry, TarballCache, default_cache_dir
from cloudlets.cli_cache import EXIT_CORRUPT, add_cache_parser, parse_size
from cloudlets.errors import FetchError, IntegrityError
from cloudlets.fetch import Fetcher, RetryPolicy
from cloudlets.mirrors import MirrorRules
from tests.httpfaults import FaultServer, Route
from tests.netpolicy import loopback_fetcher, loopback_policy

ROOT = Path(__file__).resolve().parents[1]


def blob(seed: int, size: int = 256 * 1024) -> bytes:
    return hashlib.sha256(str(seed).encode()).digest() * (size // 32)


BODY = blob(1)
SHA = hashlib.sha256(BODY).hexdigest()


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with FaultServer() as srv:
        yield srv


def new_cache(root: Path, **kwargs: object) -> TarballCache:
    fetcher = Fetcher(policy=loopback_policy(), connect_timeout=2, read_timeout=2,
                      retry=RetryPolicy(attempts=2, backoff=0.01, max_delay=0.02))
    return TarballCache(root, fetcher=fetcher, **kwargs)  # type: ignore[arg-type]


def flip_bit(path: Path, offset: int, keep_times: bool = True) -> None:
    """Flip one bit in place, and put the timestamps back as they were."""
    st = path.stat()
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))
    os.chmod(path, 0o444)
    if keep_times:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_miss_then_hit(server: FaultServer, tmp_path: Path) -> None:
    route = server.add("/t.tar", Route(BODY))
    cache = new_cache(tmp_path / "cache")
    stages: set[str] = set()
    with cache.get(server.url("/t.tar"), SHA, size=len(BODY),
                   progress=lambda s, d, t: stages.add(s)) as entry:
        assert not entry.hit and entry.path.read_bytes() == BODY
        assert (entry.sha256, entry.size) == (SHA, len(BODY))
        assert entry.source_url == server.url("/t.tar") and entry.mirror_rule is None
        assert entry.path == tmp_path / "cache" / "objects" / SHA[:2] / SHA
        assert entry.path.stat().st_mode & 0o777 == 0o444
        assert entry.details()["cache_hit"] is False
    assert stages == {"fetch"}
    with cache.get(server.url("/t.tar"), SHA.upper(), size=len(BODY),
                   progress=lambda s, d, t: stages.add(s)) as again:
        assert again.hit and again.path.read_bytes() == BODY
        assert again.source_url == server.url("/t.tar")
    assert "verify" in stages  # a hit is re-hashed before use
    assert route.requests == 1 and route.full_bodies == 1
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_nothing_unverified_enters(server: FaultServer, tmp_path: Path) -> None:
    server.add("/t.tar", Route(b"evil" * 1000))
    cache = new_cache(tmp_path)
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        cache.get(server.url("/t.tar"), SHA)
    assert cache.list() == []
    assert list((tmp_path / "tmp").iterdir()) == []
    server.add("/t.tar", Route(BODY, statuses=[404]))
    with pytest.raises(FetchError, match="HTTP 404"):
        cache.get(server.url("/t.tar"), SHA)
    assert cache.list() == []


def test_wrong_manifest_size_on_a_hit(server: FaultServer, tmp_path: Path) -> None:
    server.add("/t.tar", Route(BODY))
    cache = new_cache(tmp_path)
    cache.get(server.url("/t.tar"), SHA).close()
    with pytest.raises(IntegrityError, match="manifest's size is wrong"):
        cache.get(server.url("/t.tar"), SHA, size=len(BODY) + 1)
    assert not cache._in_use(SHA)  # the failed get released its lock


@pytest.mark.parametrize("verify_on_use", [True, False])
def test_bit_flip_is_detected_on_use(server: FaultServer, tmp_path: Path,
                                     verify_on_use: bool) -> None:
    route = server.add("/t.tar", Route(BODY))
    cache = new_cache(tmp_path, verify_on_use=verify_on_use)
    with cache.get(server.url("/t.tar"), SHA) as entry:
        path = entry.path
    flip_bit(path, 12345)
    with cache.get(server.url("/t.tar"), SHA) as entry:
        assert not entry.hit and entry.path.read_bytes() == BODY
    assert route.full_bodies == 2


def test_fast_path_skips_the_hash(server: FaultServer, tmp_path: Path) -> None:
    server.add("/t.tar", Route(BODY))
    cache = new_cache(tmp_path, verify_on_use=False)
    cache.get(server.url("/t.tar"), SHA).close()
    stages: list[str] = []
    with cache.get(server.url("/t.tar"), SHA, progress=lambda s, d, t: stages.append(s)) as e:
        assert e.hit
    assert stages == []


def test_truncation_is_detected_on_use(server: FaultServer, tmp_path: Path) -> None:
    route = server.add("/t.tar", Route(BODY))
    cache = new_cache(tmp_path)
    with cache.get(server.url("/t.tar"), SHA) as entry:
        path = entry.path
    os.chmod(path, 0o644)
    os.truncate(path, len(BODY) // 2)
    with cache.get(server.url("/t.tar"), SHA, size=len(BODY)) as entry:
        assert not entry.hit and entry.path.read_bytes() == BODY
    assert route.full_bodies == 2


def test_verify_reports_and_evicts(server: FaultServer, tmp_path: Path) -> None:
    bodies = [blob(i) for i in range(3)]
    cache = new_cache(tmp_path)
    for i, body in enumerate(bodies):
        server.add(f"/{i}", Route(body))
        cache.get(server.url(f"/{i}"), hashlib.sha256(body).hexdigest()).close()
    bad = hashlib.sha256(bodies[1]).hexdigest()
    flip_bit(cache._object(bad), 7)
    assert [r.ok for r in cache.verify(remove=False)].count(False) == 1
    results = {r.sha256: r for r in cache.verify()}
    assert results[bad].removed and "hashes to" in (results[bad].problem or "")
    assert sum(r.ok for r in results.values()) == 2
    assert len(cache.list()) == 2 and all(r.ok for r in cache.verify())


def test_lru_eviction_spares_entries_in_use(server: FaultServer, tmp_path: Path) -> None:
    bodies = {name: blob(i) for i, name in enumerate("abcd")}
    shas = {name: hashlib.sha256(body).hexdigest() for name, body in bodies.items()}
    for name, body in bodies.items():
        server.add(f"/{name}", Route(body))
    cache = new_cache(tmp_path, max_bytes=2 * len(BODY))

    def get(name: str) -> CacheEntry:
        time.sleep(0.01)  # distinct last-use times
        return cache.get(server.url(f"/{name}"), shas[name])

    held = get("a")  # in use from here on
    get("b").close()
    get("c").close()  # over the bound: b is the least recently used entry not in use
    assert {e.sha256 for e in cache.list()} == {shas["a"], shas["c"]}
    get("c").close()
    get("d").close()  # a is older than c but in use: c goes
    assert {e.sha256 for e in cache.list()} == {shas["a"], shas["d"]}
    assert held.path.read_bytes() == bodies["a"]
    assert [e.in_use for e in cache.list()] == [True, False]
    assert cache.prune(0) and [e.sha256 for e in cache.list()] == [shas["a"]]
    held.close()
    assert [e.sha256 for e in cache.prune(0)] == [shas["a"]]
    assert cache.list() == [] and cache.total_bytes() == 0


def test_mirror_rule_is_recorded_and_kept(server: FaultServer, tmp_path: Path) -> None:
    server.add("/mirror/t.tar", Route(BODY))
    rules = MirrorRules([{"prefix": "http://mirrors.cloudlets.com/",
                          "mirrors": [server.url("/mirror/")]}])
    cache = new_cache(tmp_path)
    with cache.get("http://mirrors.cloudlets.com/t.tar", SHA, mirrors=rules) as entry:
        assert entry.mirror_rule == {"prefix": "http://mirrors.cloudlets.com/",
                                     "mirror": server.url("/mirror/"), "source": "renderer"}
        assert entry.source_url == server.url("/mirror/t.tar")
    with cache.get("http://mirrors.cloudlets.com/t.tar", SHA, mirrors=rules) as entry:
        assert entry.hit and entry.mirror_rule is not None


_CHILD = """
import json, sys, time
from pathlib import Path
from cloudlets.cache import TarballCache
from tests.netpolicy import loopback_fetcher
root, url, sha, go = sys.argv[1:5]
Path(go + "." + str(__import__("os").getpid())).touch()
while not Path(go).exists():
    time.sleep(0.005)
with TarballCache(root, fetcher=loopback_fetcher()).get(url, sha) as entry:
    same = entry.path.read_bytes() == Path(sys.argv[5]).read_bytes()
    print(json.dumps({"hit": entry.hit, "ok": same}))
"""


def test_threads_and_processes_download_once(server: FaultServer, tmp_path: Path) -> None:
    route = server.add("/t.tar", Route(BODY, delay=0.3))
    root = tmp_path / "cache"
    reference = tmp_path / "reference"
    reference.write_bytes(BODY)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = [subprocess.Popen([sys.executable, "-c", _CHILD, str(root), server.url("/t.tar"),
                                  SHA, str(go), str(reference)], env=env,
                                 stdout=subprocess.PIPE, text=True) for _ in range(2)]
    deadline = time.monotonic() + 20
    while len(list(tmp_path.glob("go.*"))) < 2:  # both children are ready
        assert time.monotonic() < deadline, "child processes did not start"
        time.sleep(0.01)
    hits: list[bool] = []
    errors: list[BaseException] = []

    def worker() -> None:
        while not go.exists():
            time.sleep(0.001)
        try:
            cache = TarballCache(root, fetcher=loopback_fetcher())
            with cache.get(server.url("/t.tar"), SHA) as entry:
                assert entry.path.read_bytes() == BODY
                hits.append(entry.hit)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    go.touch()
    for t in threads:
        t.join(30)
    outputs = [json.loads(child.communicate(timeout=30)[0]) for child in children]
    assert errors == []
    assert all(out["ok"] for out in outputs)
    hits += [out["hit"] for out in outputs]
    assert len(hits) == 10 and hits.count(False) == 1
    assert route.requests == 1 and route.full_bodies == 1


_KILLED = """
import sys
from cloudlets.cache import TarballCache
from cloudlets.fetch import Fetcher
from tests.netpolicy import loopback_policy
TarballCache(sys.argv[1], fetcher=Fetcher(policy=loopback_policy(), read_timeout=60)).get(
    sys.argv[2], sys.argv[3])
"""


def test_killed_downloader_releases_the_lock(server: FaultServer, tmp_path: Path) -> None:
    route = server.add("/t.tar", Route(BODY, stall_after=100_000))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _KILLED, str(tmp_path),
                              server.url("/t.tar"), SHA], env=env)
    deadline = time.monotonic() + 20
    while route.bytes_sent < 100_000:
        assert time.monotonic() < deadline and child.poll() is None
        time.sleep(0.01)
    time.sleep(0.1)
    assert len(list((tmp_path / "tmp").iterdir())) == 1  # its partial download
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    cache = new_cache(tmp_path)
    cache.prune()
    assert list((tmp_path / "tmp").iterdir()) == []
    with cache.get(server.url("/t.tar"), SHA) as entry:
        assert entry.path.read_bytes() == BODY and not entry.hit
    assert route.requests == 2


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLOUDLETS_CACHE_DIR", str(tmp_path / "a"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("CLOUDLETS_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "cloudlets"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "cloudlets"


# -- the command line --------------------------------------------------------

def run_cli(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="cloudlets")
    parser.add_argument("--json", action="store_true")
    add_cache_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    out = io.StringIO()
    return args.handler(args, out), out.getvalue()


def test_cli_list_verify_prune(server: FaultServer, tmp_path: Path) -> None:
    root = str(tmp_path / "c")
    assert run_cli("cache", "--cache-dir", root, "list") == (0, f"{root}: empty\n")
    bodies = [blob(i) for i in range(3)]
    cache = new_cache(Path(root))
    for i, body in enumerate(bodies):
        server.add(f"/{i}", Route(body))
        cache.get(server.url(f"/{i}"), hashlib.sha256(body).hexdigest()).close()
    code, text = run_cli("cache", "list", "--cache-dir", root)
    assert code == 0 and "3 tarballs, 768.0 KiB" in text and server.url("/0") in text
    code, text = run_cli("--json", "cache", "list", "--cache-dir", root)
    listing = json.loads(text)
    assert [e["size"] for e in listing["entries"]] == [len(BODY)] * 3
    assert listing["total_bytes"] == 3 * len(BODY)

    flip_bit(cache._object(hashlib.sha256(bodies[0]).hexdigest()), 0)
    code, text = run_cli("cache", "verify", "--cache-dir", root, "--json")
    report = json.loads(text)
    assert code == EXIT_CORRUPT and report["corrupted"] == 1
    code, text = run_cli("cache", "verify", "--cache-dir", root)
    assert code == 0 and "2 checked, 0 corrupted" in text

    code, text = run_cli("cache", "prune", "--cache-dir", root, "--max-bytes", "300KiB")
    assert code == 0 and text.count("evicted") == 1 and "256.0 KiB remain" in text
    code, text = run_cli("cache", "prune", "--cache-dir", root, "--json")
    assert json.loads(text)["removed"] == []


def test_parse_size() -> None:
    assert parse_size("10G") == 10**10 and parse_size("1GiB") == 2**30
    assert parse_size("512") == 512 and parse_size("1.5k") == 1500
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")


def test_a_forgotten_entry_is_released_when_collected(server: FaultServer,
                                                      tmp_path: Path) -> None:
    server.add("/t.tar", Route(BODY))
    cache = new_cache(tmp_path)
    entry = cache.get(server.url("/t.tar"), SHA)
    assert cache._in_use(SHA)
    del entry
    assert not cache._in_use(SHA)


# -- follow=True: reading a tarball while it downloads --------------------------------

BIG = blob(7, 3 * 1024 * 1024)  # three of the fetcher's 1 MiB chunks
BIG_SHA = hashlib.sha256(BIG).hexdigest()


class FirstChunkGate:
    """A progress callback that holds the download after its first chunk
    until the test has read from the entry: proof that reading overlaps
    the download, not a race the test hopes to win."""

    def __init__(self) -> None:
        self.held = threading.Event()
        self.release = threading.Event()

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if done and not self.held.is_set():
            self.held.set()
            assert self.release.wait(10)


def test_follow_reads_the_download_as_it_lands(server: FaultServer, tmp_path: Path) -> None:
    server.add("/t.tar", Route(BIG))
    cache = new_cache(tmp_path / "cache")
    gate = FirstChunkGate()
    with cache.get(server.url("/t.tar"), BIG_SHA, size=len(BIG), progress=gate,
                   follow=True) as entry:
        assert not entry.hit
        with entry.open() as reader:
            first = reader.read(4096)
            assert gate.held.wait(10)
            # the download is held after its first chunk: nothing is cached yet
            assert entry.pending and not entry.path.exists()
            assert first == BIG[:4096]
            gate.release.set()
            rest = reader.read()
        entry.wait()
        assert first + rest == BIG
        assert entry.path.read_bytes() == BIG and entry.size == len(BIG)
        assert entry.details()["source_url"] == server.url("/t.tar")
        assert entry.fetch_seconds > 0
    assert not list((tmp_path / "cache" / "tmp").iterdir())
    with cache.get(server.url("/t.tar"), BIG_SHA, follow=True) as again:
        assert again.hit and not again.pending
        with again.open() as reader:
            assert reader.read() == BIG


def test_follow_restarted_download_is_reported_to_its_reader(server: FaultServer,
                                                             tmp_path: Path) -> None:
    from cloudlets.fetch import DownloadRestarted

    # drops after 1.5 MiB; the retry gets a 200 from byte 0 (no Range support)
    route = server.add("/t.tar", Route(BIG, drop_after=3 << 19, ranges=False, etag=None))
    cache = new_cache(tmp_path / "cache")
    gate = FirstChunkGate()
    with cache.get(server.url("/t.tar"), BIG_SHA, size=len(BIG), progress=gate,
                   follow=True) as entry:
        with entry.open() as reader:
            assert reader.read(100) == BIG[:100]
            assert gate.held.wait(10)
            gate.release.set()
            with pytest.raises(DownloadRestarted, match=r"started over after \d+ bytes"):
                while reader.read(1 << 20):
                    pass
        entry.wait()  # the download itself recovered
        assert route.requests == 2 and entry.path.read_bytes() == BIG


def test_follow_wrong_content_is_never_cached(server: FaultServer, tmp_path: Path) -> None:
    server.add("/t.tar", Route(BIG))
    cache = new_cache(tmp_path / "cache")
    wrong = hashlib.sha256(b"something else").hexdigest()
    with cache.get(server.url("/t.tar"), wrong, follow=True) as entry:
        with entry.open() as reader, pytest.raises(IntegrityError, match="sha256 mismatch"):
            while reader.read(1 << 20):
                pass
        with pytest.raises(IntegrityError, match="sha256 mismatch"):
            entry.wait()
        assert not entry.path.exists()
    assert not list((tmp_path / "cache" / "tmp").iterdir())
    assert cache.list() == []


def test_follow_closing_the_entry_stops_the_download(server: FaultServer,
                                                     tmp_path: Path) -> None:
    # the first answer stalls after one chunk; a retry would complete it
    route = server.add("/t.tar", Route(BIG, stall_after=1 << 20))
    fetcher = Fetcher(policy=loopback_policy(), connect_timeout=2, read_timeout=0.5,
                      retry=RetryPolicy(attempts=5, backoff=0.01, max_delay=0.02))
    cache = TarballCache(tmp_path / "cache", fetcher=fetcher)
    entry = cache.get(server.url("/t.tar"), BIG_SHA, follow=True)
    with entry.open() as reader:
        assert reader.read(1000) == BIG[:1000]
    started = time.monotonic()
    entry.close()  # while the download stalls
    assert time.monotonic() - started < 3
    assert route.requests == 1  # no retry after the cancel
    assert not entry.path.exists() and cache.list() == []
    assert not list((tmp_path / "cache" / "tmp").iterdir())
    assert not cache._in_use(BIG_SHA)
