"""Documents found valid before, remembered across processes.

A ``cloudlets render`` re-rendering a known cloudlet validates the same
manifest and the same request again in a fresh process, and a JSON Schema
validation needs :mod:`jsonschema` and :mod:`referencing` (some 60 ms to
import, more than a tenth of a re-render). :class:`ValidatedMemo` keeps, in
a file beside the cache (``<cache>/validated-documents``), the digests of
the last validations that found no problem, so that the next process takes
their answer instead of importing the validator.

What is remembered is one jsonschema call and its answer "no problem", never
a whole check: :func:`cloudlets.jsondoc.schema_problems` (a document against
a shipped schema), :func:`cloudlets.userschema.check_schema` (a manifest's
argument schema against the meta-schema) and
:func:`cloudlets.userschema.validate_subschema` (a value against such a
schema). Each key is the sha256 of the call's name and the digests of the canonical JSON of
everything its answer depends on (the schema's own, for a shipped one), taken
only of plain JSON documents (see :func:`cloudlets.jsondoc.memo_key`); the
checks cloudlets makes around those calls (strict parsing, references,
patterns, locks) run every time. A refused document is not remembered: it is
validated, and refused with its pointers, every time.

The file names the validator's *fingerprint*: the cloudlets and Python
versions, the source of the modules whose code decides the answers, and
where jsonschema, its meta-schemas, referencing, RE2 and the libraries some
``format`` checks use are installed (with each one's size, time and inode,
which an upgrade changes). A file with
another fingerprint is not read. The file is written whole and replaced
atomically, holds at most :data:`MEMO_ENTRIES` digests (the least recently
used are dropped) and ends with the sha256 of what it holds: a file that
does not parse, is cut short or has a byte changed is no memo at all, just
"validate again". So is a file that is not a regular file, that another user
owns, or that its group or others may write. Processes writing at once may
drop each other's newest entries, never corrupt them. The memo never makes
its directory: a render refused before it made its cache leaves nothing.

Trust: anyone who can write the cache directory can make a render take a
document as valid without validating it. They can already replace the base
filesystems a render builds on, so the memo is trusted exactly as much as
the rest of the cache (docs/security.rst).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import stat
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from cloudlets.jsondoc import use_memo
from cloudlets.version import __version__

__all__ = ["MEMO_ENTRIES", "MEMO_NAME", "ValidatedMemo", "validator_fingerprint"]

#: The memo's file name in the cache directory.
MEMO_NAME = "validated-documents"
#: Digests the memo keeps at most.
MEMO_ENTRIES = 1024
#: Largest memo file read, in bytes (the entries, a header and a trailer).
_MAX_BYTES = (MEMO_ENTRIES + 2) * 128
_MAGIC = "cloudlets-validated-documents 1"
_HEX = frozenset("0123456789abcdef")

#: The modules whose code decides the remembered answers.
_VALIDATING = ("cloudlets.jsondoc", "cloudlets.userschema", "cloudlets.patterns")
#: The libraries that do: jsonschema's meta-schemas live in
#: jsonschema_specifications, and some ``format`` checks are made only when
#: their library is installed (``hostname`` with fqdn, ``idn-hostname`` with
#: idna...), so those count too, installed or not.
_LIBRARIES = ("jsonschema", "jsonschema_specifications", "referencing", "re2",
              "fqdn", "idna", "isoduration", "jsonpointer", "rfc3339_validator",
              "rfc3986_validator", "rfc3987", "uri_template", "webcolors")

_fingerprint: str | None = None
_fingerprint_lock = threading.Lock()


def validator_fingerprint() -> str:
    """:returns: the sha256 naming the validator whose answers a memo holds
    (computed once a process, without importing jsonschema)."""
    global _fingerprint
    with _fingerprint_lock:
        if _fingerprint is None:
            parts = hashlib.sha256(f"{__version__}\0{sys.version}\0".encode())
            for name in _VALIDATING:
                parts.update(f"\0{name}\0".encode() + _source_of(name))
            for name in _LIBRARIES:
                parts.update(f"\0{name}\0{_installed(name)}".encode())
            _fingerprint = parts.hexdigest()
        return _fingerprint


def _origin(module: str) -> str | None:
    loaded = sys.modules.get(module)
    origin = getattr(loaded, "__file__", None) if loaded is not None else None
    if origin is None:
        try:
            spec = importlib.util.find_spec(module)  # finds it, imports nothing
        except (ImportError, ValueError):
            return None
        origin = spec.origin if spec is not None else None
    return origin


def _source_of(module: str) -> bytes:
    origin = _origin(module)
    if origin is None:
        return b"?"
    try:
        return Path(origin).read_bytes()
    except OSError:
        return b"?"


def _installed(module: str) -> str:
    """Where a library is installed, and its size, time and inode: an upgrade changes them."""
    origin = _origin(module)
    if origin is None:
        return "?"
    try:
        info = os.stat(origin)
    except OSError:
        return f"{origin}?"
    return f"{origin}\0{info.st_size}\0{info.st_mtime_ns}\0{info.st_ino}"


class ValidatedMemo:
    """The digests of validations that found no problem, in a file (see the module).

    :param path: the memo file (``<cache>/validated-documents``). Its
        directory is never made here.
    :param fingerprint: the validator's fingerprint; default
        :func:`validator_fingerprint`.
    :param size: digests kept at most.
    """

    def __init__(self, path: str | os.PathLike[str], *, fingerprint: str | None = None,
                 size: int = MEMO_ENTRIES) -> None:
        self.path = Path(path)
        self.size = max(1, min(size, MEMO_ENTRIES))
        self._fingerprint = fingerprint
        self._digests: OrderedDict[str, None] | None = None
        self._dirty = False
        self._lock = threading.Lock()

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = validator_fingerprint()
        return self._fingerprint

    @contextlib.contextmanager
    def active(self) -> Iterator[ValidatedMemo]:
        """Validations inside this context consult the memo and add to it;
        what they added is written on the way out."""
        with use_memo(self):
            try:
                yield self
            finally:
                self.flush()

    def seen(self, key: str) -> bool:
        """:returns: whether ``key`` was found valid by this validator (in
        this process or one before)."""
        with self._lock:
            digests = self._loaded()
            if key not in digests:
                return False
            # Least recently used goes first: a key in the older half moves
            # to the end, written with the next flush (so a hit rewrites the
            # file at most once per half of its entries).
            for position, known in enumerate(digests):
                if known == key:
                    if position < len(digests) // 2:
                        digests.move_to_end(key)
                        self._dirty = True
                    break
            return True

    def add(self, key: str) -> None:
        """Remember the digest of a validation that found no problem (in
        memory until :meth:`flush`)."""
        if len(key) != 64 or not _HEX.issuperset(key):
            raise ValueError(f"not a sha256 digest: {key!r}")
        with self._lock:
            digests = self._loaded()
            digests[key] = None
            digests.move_to_end(key)
            while len(digests) > self.size:
                digests.popitem(last=False)
            self._dirty = True

    def flush(self) -> None:
        """Write what was added, when the memo's directory exists (a failure
        to write is no error: the memo only spares work)."""
        with self._lock:
            if not self._dirty or self._digests is None:
                return
            self._dirty = False
            # Another process may have added some meanwhile: keep theirs too,
            # ours the more recent.
            theirs = self._read()
            merged = OrderedDict((k, None) for k in theirs if k not in self._digests)
            merged.update(self._digests)
            while len(merged) > self.size:
                merged.popitem(last=False)
            self._digests = merged
            with contextlib.suppress(OSError):
                self._write(list(merged))

    def _loaded(self) -> OrderedDict[str, None]:
        if self._digests is None:
            self._digests = self._read()
        return self._digests

    def _read(self) -> OrderedDict[str, None]:
        """The memo file's digests; none for a missing, foreign, writable by
        others or damaged file."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return OrderedDict()
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() \
                    or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) \
                    or info.st_size > _MAX_BYTES:
                return OrderedDict()
            with os.fdopen(fd, "rb", closefd=False) as handle:
                data = handle.read(_MAX_BYTES + 1)
        except OSError:
            return OrderedDict()
        finally:
            os.close(fd)
        if len(data) > _MAX_BYTES:
            return OrderedDict()
        body, _, trailer = data.rpartition(b"sha256 ")
        if trailer != hashlib.sha256(body).hexdigest().encode() + b"\n":
            return OrderedDict()
        try:
            lines = body.decode("ascii").split("\n")
        except UnicodeDecodeError:
            return OrderedDict()
        if len(lines) < 2 or lines[0] != f"{_MAGIC} {self.fingerprint}" or lines[-1] != "":
            return OrderedDict()
        keys = lines[1:-1]
        if any(len(key) != 64 or not _HEX.issuperset(key) for key in keys):
            return OrderedDict()
        return OrderedDict.fromkeys(keys[-self.size:])

    def _write(self, keys: list[str]) -> None:
        if not self.path.parent.is_dir():
            return  # never made here
        body = "".join(f"{line}\n" for line in [f"{_MAGIC} {self.fingerprint}", *keys])
        data = body.encode("ascii")
        data += b"sha256 " + hashlib.sha256(data).hexdigest().encode() + b"\n"
        partial = self.path.with_name(f".{self.path.name}.{os.getpid()}-{id(self):x}")
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(partial, self.path)
        finally:
            partial.unlink(missing_ok=True)
