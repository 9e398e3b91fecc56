"""The tarball cache: content-addressed, verified, shared between processes.

Layout under the cache root::

    objects/<ab>/<sha256>        the tarball, read-only (mode 0444)
    objects/<ab>/<sha256>.json   where it came from, when, its stat fingerprint
    locks/<sha256>.use           shared lock while an entry is in use
    locks/<sha256>.fill          exclusive lock while an entry is fetched or repaired
    tmp/                         downloads in progress
    prune.lock                   one pruner at a time

Guarantees:

- **Nothing unverified enters the cache.** A download goes to ``tmp/``, is
  verified while it streams (sha256, size), fsynced, then renamed into place.
- **One download per tarball.** :meth:`TarballCache.get` takes the entry's
  ``fill`` lock (``fcntl.flock``, which works between threads, each opening its
  own descriptor, as well as between processes) before fetching; whoever
  waited on it finds the entry in place and does not download again.
- **Corruption is detected on use.** Every :meth:`~TarballCache.get` checks the
  size and re-hashes the whole file before handing it out (hashing runs at
  about 1.7 GiB/s with SHA extensions: some 0.6 s per GiB from the page cache,
  small beside a render). With ``verify_on_use=False`` the full hash is skipped
  when the file's stat fingerprint (size, mtime, ctime, inode) matches the one
  recorded at insert: any write, ``touch`` or ``chmod`` changes ctime, but a
  bit flip on the medium itself would go unnoticed. A corrupted entry is
  evicted and fetched again.
- **An entry in use is never evicted.** A :class:`CacheEntry` holds a shared
  lock on ``<sha>.use`` until closed; LRU eviction only removes entries whose
  ``use`` and ``fill`` locks it can take at once without waiting. An entry is
  only ever *replaced* (atomically) by verified identical content, so readers
  are never disturbed.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal, Self

from cloudlets.cachelocks import LockFile, evict_lru, evict_unused, in_use, last_used
from cloudlets.errors import CacheError, IntegrityError
from cloudlets.fetch import DownloadWatch, Fetcher, check_sha256
from cloudlets.mirrors import MirrorRules
from cloudlets.paths import default_cache_dir
from cloudlets.progress import STAGE_VERIFY, ProgressCallback, null_progress
from cloudlets.urls import redact

__all__ = ["CacheEntry", "CacheEntryInfo", "TarballCache", "VerifyResult", "default_cache_dir"]

log = logging.getLogger(__name__)

_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class CacheEntryInfo:
    """One cached tarball, as listed by :meth:`TarballCache.list`.

    :ivar sha256: its digest, which is also its name.
    :ivar size: its size in bytes.
    :ivar path: where it lives.
    :ivar source_url: the URL it was fetched from, credentials redacted.
    :ivar mirror_rule: the mirror rule used, or ``None`` for the origin.
    :ivar fetched_at: when it was fetched (ISO 8601, UTC), if known.
    :ivar last_used: when it was last handed out (seconds since the epoch).
    :ivar in_use: whether a :class:`CacheEntry` holds it right now.
    """

    sha256: str
    size: int
    path: Path
    source_url: str | None
    mirror_rule: dict[str, Any] | None
    fetched_at: str | None
    last_used: float
    in_use: bool

    def to_dict(self) -> dict[str, Any]:
        """:returns: a JSON-ready dict."""
        return {"sha256": self.sha256, "size": self.size, "path": str(self.path),
                "source_url": self.source_url, "mirror_rule": self.mirror_rule,
                "fetched_at": self.fetched_at,
                "last_used": datetime.fromtimestamp(self.last_used, UTC).isoformat(),
                "in_use": self.in_use}


@dataclass(frozen=True)
class VerifyResult:
    """The outcome of re-hashing one entry (:meth:`TarballCache.verify`).

    :ivar sha256: the entry.
    :ivar ok: whether its content matches its name.
    :ivar problem: what is wrong, when not ``ok``.
    :ivar removed: whether the corrupted entry was evicted.
    """

    sha256: str
    ok: bool
    problem: str | None = None
    removed: bool = False

    def to_dict(self) -> dict[str, Any]:
        """:returns: a JSON-ready dict."""
        return {"sha256": self.sha256, "ok": self.ok, "problem": self.problem,
                "removed": self.removed}


class CacheEntry:
    """A verified tarball from the cache, protected from eviction until
    :meth:`close` (use it as a context manager).

    An entry from ``get(..., follow=True)`` whose tarball was missing is
    still being fetched on a thread of its own: :meth:`open` reads the
    download as it lands, :meth:`wait` returns once it is complete,
    verified and in the cache (and raises if not). Until then, ``path``
    does not exist yet and ``size``, ``source_url`` and ``mirror_rule`` are
    not known.

    :ivar path: the tarball; read-only, do not modify it.
    :ivar sha256: its verified digest.
    :ivar size: its size in bytes.
    :ivar source_url: where it was fetched from, credentials redacted.
    :ivar mirror_rule: the mirror rule used (``{"prefix", "mirror",
        "source"}``), or ``None`` when the origin served it.
    :ivar hit: ``True`` when no download was needed for this call.
    :ivar fetch_seconds: how long the download took (``0.0`` for a hit).
    """

    def __init__(self, lock: LockFile, path: Path, meta: dict[str, Any], hit: bool,
                 pending: _Fill | None = None) -> None:
        self._lock = lock
        self._pending = pending
        self.path = path
        self.sha256: str = meta["sha256"]
        self.hit = hit
        self.fetch_seconds = 0.0
        self._adopt(meta)

    def _adopt(self, meta: dict[str, Any]) -> None:
        self.size: int | None = meta.get("size")
        self.source_url: str | None = meta.get("source_url")
        self.mirror_rule: dict[str, Any] | None = meta.get("mirror_rule")

    @property
    def pending(self) -> bool:
        """Whether the tarball was fetched in the background and :meth:`wait`
        has not returned yet (nothing read from it is verified until then)."""
        return self._pending is not None and not self._pending.finished

    def open(self) -> BinaryIO:
        """:returns: the tarball, read from its start; while it is still
        being fetched, a reader that follows the download (see
        :meth:`cloudlets.fetch.DownloadWatch.reader`). What it returns is
        verified only once :meth:`wait` returns."""
        if self._pending is not None and not self._pending.finished:
            return self._pending.watch.reader()  # type: ignore[return-value]
        return open(self.path, "rb")

    def wait(self) -> None:
        """Block until the tarball is fetched, verified and cached.

        :raises FetchError: when it cannot be downloaded.
        :raises IntegrityError: when what was downloaded is not the expected content.
        :raises CacheError: when it cannot be stored.
        """
        if self._pending is None:
            return
        meta = self._pending.result()
        self._adopt(meta)
        self.fetch_seconds = self._pending.seconds

    def details(self) -> dict[str, Any]:
        """:returns: what a render records about its tarball (after :meth:`wait`)."""
        return {"sha256": self.sha256, "size": self.size, "source_url": self.source_url,
                "mirror_rule": self.mirror_rule, "cache_hit": self.hit}

    def close(self) -> None:
        """Release the entry: it may be evicted from now on. A download still
        running is stopped (and left out of the cache)."""
        if self._pending is not None:
            self._pending.cancel()
        self._lock.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<CacheEntry {self.sha256[:12]} {self.size} bytes hit={self.hit}>"


class _Fill:
    """One tarball fetched into the cache on a thread of its own, holding
    the entry's fill lock until it is done (:meth:`TarballCache.get` with
    ``follow=True``)."""

    def __init__(self, cache: TarballCache, fill: LockFile, url: str, sha: str, size: int | None,
                 mirrors: MirrorRules | None, progress: ProgressCallback) -> None:
        self.watch = DownloadWatch()
        self.finished = False
        self.seconds = 0.0
        self._cache = cache
        self._fill = fill
        self._meta: dict[str, Any] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(url, sha, size, mirrors, progress),
            name="cloudlets-cache-fill", daemon=True)
        self._thread.start()

    def _run(self, url: str, sha: str, size: int | None, mirrors: MirrorRules | None,
             progress: ProgressCallback) -> None:
        started = time.monotonic()
        try:
            self._meta = self._cache._insert(url, sha, size, mirrors, progress, self.watch)
        except BaseException as exc:  # noqa: BLE001 - raised by result() on the caller's thread
            self._error = exc
        finally:
            self.seconds = time.monotonic() - started
            self._fill.release()
            self.watch.finish(self._error)

    def result(self) -> dict[str, Any]:
        """Wait for the fetch. :returns: the entry's metadata, or raises its failure."""
        self._thread.join()
        self.finished = True
        if self._error is not None:
            raise self._error
        assert self._meta is not None
        if self._cache.max_bytes is not None:
            self._cache.prune(self._cache.max_bytes)
        return self._meta

    def cancel(self) -> None:
        """Stop the fetch (when still running), wait for its thread and let
        go of the download's file."""
        if not self.finished:
            self.watch.cancel()
            self._thread.join()
            self.finished = True
        self.watch.close()


_State = Literal["valid", "missing", "corrupt"]


class TarballCache:
    """Verified tarballs, stored by sha256 under ``root``.

    :param root: the cache directory (created when needed); see
        :func:`default_cache_dir`.
    :param max_bytes: after each insert, evict least recently used entries
        not in use until the cache holds at most this many bytes
        (``None``: no bound).
    :param fetcher: downloads missing tarballs (a default :class:`Fetcher`).
    :param verify_on_use: re-hash every entry before handing it out
        (default). When false, trust an unchanged stat fingerprint.
    """

    def __init__(self, root: str | os.PathLike[str], *, max_bytes: int | None = None,
                 fetcher: Fetcher | None = None, verify_on_use: bool = True) -> None:
        self.root = Path(root)
        if max_bytes is not None and max_bytes < 0:
            raise CacheError(f"max_bytes must not be negative, not {max_bytes}")
        self.max_bytes = max_bytes
        self.fetcher = fetcher or Fetcher()
        self.verify_on_use = verify_on_use

    # -- public API ---------------------------------------------------------

    def get(self, url: str, sha256: str, *, size: int | None = None,
            mirrors: MirrorRules | None = None,
            progress: ProgressCallback | None = None, follow: bool = False) -> CacheEntry:
        """Return the tarball with digest ``sha256``, fetching it from ``url``
        (or its mirrors) when it is not cached or its cached copy is corrupt.

        Concurrent calls for the same digest, from threads or processes,
        download it once: the others wait and then use the same file.

        With ``follow``, a missing tarball is fetched on a thread of its own
        and the entry comes back at once: read it with
        :meth:`CacheEntry.open` while it downloads, and act on what was read
        only after :meth:`CacheEntry.wait` (which raises what ``get`` would
        have raised). ``progress`` is then called from that thread.

        :param url: where to fetch it from.
        :param sha256: its expected digest.
        :param size: its expected size, when known.
        :param mirrors: mirror rules for ``url``.
        :param progress: called with ``("fetch" | "verify", done, total)``.
        :param follow: fetch in the background (see above).
        :returns: the entry, held in use until closed.
        :raises FetchError: when it cannot be downloaded.
        :raises IntegrityError: when what was downloaded is not the expected content.
        :raises CacheError: when the cache directory is unusable.
        """
        sha = check_sha256(sha256)
        progress = progress or null_progress
        self._make_dirs()
        use = LockFile.use(self._use_lock(sha))
        try:
            state, meta = self._check(sha, size, progress)
            hit = state == "valid"
            pending: _Fill | None = None
            if not hit:
                fill: LockFile | None = LockFile.take(self._fill_lock(sha), exclusive=True)
                assert fill is not None
                try:
                    # Someone else may have fetched it while we waited.
                    state, meta = self._check(sha, size, progress)
                    hit = state == "valid"
                    if state == "corrupt":
                        self._drop_files(sha)
                    if not hit and follow:
                        pending = _Fill(self, fill, url, sha, size, mirrors, progress)
                        fill = None  # released by the fill's thread
                        meta = {"sha256": sha, "size": size}
                    elif not hit:
                        meta = self._insert(url, sha, size, mirrors, progress)
                finally:
                    if fill is not None:
                        fill.release()
            assert meta is not None
            entry = CacheEntry(use, self._object(sha), meta, hit, pending)
        except BaseException:
            use.release()
            raise
        if not hit and pending is None and self.max_bytes is not None:
            self.prune(self.max_bytes)
        return entry

    def list(self) -> builtins.list[CacheEntryInfo]:
        """:returns: every cached tarball, least recently used first."""
        infos = []
        for obj in self._objects():
            sha = obj.name
            try:
                st = obj.stat()
            except FileNotFoundError:
                continue
            meta = self._read_meta(sha) or {}
            infos.append(CacheEntryInfo(
                sha256=sha, size=st.st_size, path=obj, source_url=meta.get("source_url"),
                mirror_rule=meta.get("mirror_rule"), fetched_at=meta.get("fetched_at"),
                last_used=last_used(self._use_lock(sha), st.st_mtime),
                in_use=self._in_use(sha)))
        infos.sort(key=lambda info: (info.last_used, info.sha256))
        return infos

    def verify(self, *, remove: bool = True,
               progress: ProgressCallback | None = None) -> builtins.list[VerifyResult]:
        """Re-hash every entry.

        :param remove: evict corrupted entries (they are fetched again on use).
        :param progress: called with ``("verify", done, total)`` per entry.
        :returns: one result per entry.
        """
        results = []
        for obj in self._objects():
            sha = obj.name
            fill = LockFile.take(self._fill_lock(sha), exclusive=True)
            assert fill is not None
            try:
                problem = self._problem(sha, None, progress or null_progress, full=True)
                if problem and problem != "missing":
                    if remove:
                        self._drop_files(sha)
                    log.warning("cache entry %s is corrupt: %s%s", sha, problem,
                                "; evicted" if remove else "")
                    results.append(VerifyResult(sha, False, problem, remove))
                elif problem is None:
                    results.append(VerifyResult(sha, True))
            finally:
                fill.release()
        return results

    def prune(self, max_bytes: int | None = None) -> builtins.list[CacheEntryInfo]:
        """Remove leftovers of interrupted downloads, then evict least
        recently used entries not in use until at most ``max_bytes`` remain.

        :param max_bytes: the bound; the cache's ``max_bytes`` by default. With
            neither, only leftovers are removed.
        :returns: the entries evicted.
        """
        limit = self.max_bytes if max_bytes is None else max_bytes
        self._make_dirs()
        removed: builtins.list[CacheEntryInfo] = []
        guard = LockFile.take(self.root / "prune.lock", exclusive=True)
        assert guard is not None
        try:
            self._remove_leftovers()
            if limit is None:
                return removed
            removed, total = evict_lru(self.list(), limit, size=lambda info: info.size,
                                       evict=lambda info: self._evict(info.sha256))
            for info in removed:
                log.info("evicted %s (%d bytes) from the tarball cache", info.sha256, info.size)
            if total > limit:
                log.info("tarball cache holds %d bytes, above its %d-byte bound: the rest "
                         "is in use", total, limit)
        finally:
            guard.release()
        return removed

    def total_bytes(self) -> int:
        """:returns: the bytes held by cached tarballs."""
        return sum(info.size for info in self.list())

    # -- paths --------------------------------------------------------------

    def _object(self, sha: str) -> Path:
        return self.root / "objects" / sha[:2] / sha

    def _meta(self, sha: str) -> Path:
        return self.root / "objects" / sha[:2] / f"{sha}.json"

    def _use_lock(self, sha: str) -> Path:
        return self.root / "locks" / f"{sha}.use"

    def _fill_lock(self, sha: str) -> Path:
        return self.root / "locks" / f"{sha}.fill"

    def _make_dirs(self) -> None:
        for sub in ("objects", "locks", "tmp"):
            try:
                (self.root / sub).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise CacheError(f"cannot create cache directory {self.root / sub}: "
                                 f"{exc.strerror}") from None

    def _objects(self) -> builtins.list[Path]:
        base = self.root / "objects"
        if not base.is_dir():
            return []
        found = []
        for obj in sorted(base.glob("??/*")):
            name = obj.name
            if len(name) == 64 and obj.parent.name == name[:2] and _is_hex(name):
                found.append(obj)
        return found

    # -- checking -----------------------------------------------------------

    def _check(self, sha: str, size: int | None, progress: ProgressCallback) \
            -> tuple[_State, dict[str, Any] | None]:
        problem = self._problem(sha, size, progress, full=self.verify_on_use)
        if problem == "missing":
            return "missing", None
        if problem:
            log.warning("cache entry %s is corrupt (%s): evicting it and fetching it again",
                        sha, problem)
            return "corrupt", None
        meta = self._read_meta(sha)
        assert meta is not None
        return "valid", meta

    def _problem(self, sha: str, size: int | None, progress: ProgressCallback,
                 full: bool) -> str | None:
        """:returns: ``None`` when the entry is sound, ``"missing"``, or what is wrong."""
        obj = self._object(sha)
        try:
            st = obj.stat()
        except FileNotFoundError:
            return "missing"
        meta = self._read_meta(sha)
        recorded = meta.get("size") if meta else None
        if recorded is not None and st.st_size != recorded:
            return f"size is {st.st_size} bytes, {recorded} were stored"
        if not full and meta and meta.get("fingerprint") == _fingerprint(st):
            _check_size(sha, st.st_size, size)
            return None
        try:
            actual = _hash_file(obj, progress)
        except OSError as exc:
            return f"cannot read it: {exc.strerror}"
        if actual != sha:
            return f"content hashes to {actual}"
        if meta is None or meta.get("fingerprint") != _fingerprint(st):
            self._write_meta(sha, {**(meta or {"sha256": sha}), "size": st.st_size,
                                   "fingerprint": _fingerprint(st)})
        _check_size(sha, st.st_size, size)
        return None

    # -- changing -----------------------------------------------------------

    def _insert(self, url: str, sha: str, size: int | None, mirrors: MirrorRules | None,
                progress: ProgressCallback,
                watch: DownloadWatch | None = None) -> dict[str, Any]:
        """Fetch into ``tmp/``, verify, rename into place. Hold the fill lock."""
        tmp = self.root / "tmp" / f"{sha}.{os.getpid()}.{secrets.token_hex(4)}.part"
        obj = self._object(sha)
        try:
            # (a Fetcher subclass from before watch= still works without follow)
            followed: dict[str, Any] = {"watch": watch} if watch is not None else {}
            result = self.fetcher.fetch(url, tmp, sha256=sha, size=size, mirrors=mirrors,
                                        progress=progress, **followed)
            _fsync_file(tmp)
            os.chmod(tmp, 0o444)
            obj.parent.mkdir(exist_ok=True)
            os.replace(tmp, obj)
            _fsync_dir(obj.parent)
        except OSError as exc:
            raise CacheError(f"cannot store {redact(url)} in the cache at {obj}: "
                             f"{exc.strerror}") from None
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        meta = {"sha256": sha, "size": result.size, "source_url": result.url,
                "mirror_rule": result.mirror_rule,
                "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "fingerprint": _fingerprint(obj.stat())}
        self._write_meta(sha, meta)
        log.info("cached %s (%d bytes) from %s", sha, result.size, result.url)
        return meta

    def _evict(self, sha: str) -> bool:
        """Remove an entry if nobody uses or fills it. :returns: whether removed."""
        return evict_unused(self._use_lock(sha), self._fill_lock(sha),
                            lambda: self._drop_files(sha))

    def _drop_files(self, sha: str) -> None:
        for path in (self._object(sha), self._meta(sha)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _in_use(self, sha: str) -> bool:
        return in_use(self._use_lock(sha))

    def _remove_leftovers(self) -> None:
        """Partial downloads and sidecars of processes that died."""
        for tmp in sorted((self.root / "tmp").glob("*")):
            sha = tmp.name.split(".", 1)[0]
            if not _is_hex(sha) or len(sha) != 64:
                continue
            fill = LockFile.take(self._fill_lock(sha), exclusive=True, wait=False)
            if fill is None:
                continue  # a download is running
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                log.info("removed leftover download %s", tmp)
            fill.release()
        for meta in sorted((self.root / "objects").glob("??/*.json")):
            sha = meta.name[:-5]
            if len(sha) == 64 and not self._object(sha).exists():
                with contextlib.suppress(FileNotFoundError):
                    meta.unlink()

    def _read_meta(self, sha: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self._meta(sha).read_text())
        except (OSError, ValueError):
            return None
        return _redacted(data) if isinstance(data, dict) and data.get("sha256") == sha \
            else None

    def _write_meta(self, sha: str, meta: dict[str, Any]) -> None:
        meta = _redacted(meta)
        path = self._meta(sha)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
        try:
            tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
            os.replace(tmp, path)
        except OSError as exc:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise CacheError(f"cannot write cache metadata {path}: {exc.strerror}") from None


def _check_size(sha: str, actual: int, expected: int | None) -> None:
    """The content is verified by its digest: a different expected size means
    the manifest is wrong, not the cache."""
    if expected is not None and actual != expected:
        raise IntegrityError(
            f"the tarball with sha256 {sha} is {actual} bytes, not the {expected} bytes "
            "the manifest gives: the manifest's size is wrong",
            expected=str(expected), actual=str(actual))


def _is_hex(text: str) -> bool:
    return all(c in "0123456789abcdef" for c in text)


def _fingerprint(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _hash_file(path: Path, progress: ProgressCallback) -> str:
    hasher = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    done = 0
    with open(path, "rb") as src:
        total = os.fstat(src.fileno()).st_size
        while n := src.readinto(buf):
            hasher.update(view[:n])
            done += n
            progress(STAGE_VERIFY, done, total)
    return hasher.hexdigest()


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def _redacted(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with its URLs :func:`redact`-ed, as written and as read (an
    entry written by an older version may hold a mirror's password)."""
    out = dict(meta)
    if isinstance(out.get("source_url"), str):
        out["source_url"] = redact(out["source_url"])
    rule = out.get("mirror_rule")
    if isinstance(rule, dict):
        out["mirror_rule"] = {k: redact(v) if k in ("prefix", "mirror") and isinstance(v, str)
                              else v for k, v in rule.items()}
    return out
