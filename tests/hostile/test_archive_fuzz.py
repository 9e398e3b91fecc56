"""The archive reader under fuzzing: tar structures with random fields (GNU,
PAX and ustar headers, extension records, sparse maps), then random damage
(bytes overwritten, the stream cut). Only the contract is asserted: the
tarball is read, or refused with a :class:`~cloudlets.errors.CloudletsError`,
in bounded time. Inputs that once broke it are kept in
``tests/hostile/corpus/archive/`` as hex text (what a failure here prints;
tarballs are not committed) and replayed.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudlets.errors import CloudletsError
from cloudlets.rootfs import ArchivePolicy, read_tarball
from tests.hostile.tarcraft import (
    WALL_CLOCK,
    gnu_sparse,
    members_then_end,
    pax_sparse,
    without_end,
)

CORPUS = Path(__file__).parent / "corpus" / "archive"
#: small limits, so that a bomb the fuzzer builds is refused quickly
POLICY = ArchivePolicy(max_total_size=64 * 1024 * 1024, max_member_size=16 * 1024 * 1024,
                       max_members=20_000, max_header_size=256 * 1024)

_NAMES = st.one_of(
    st.text(alphabet="ab./\\\n\x00é-", min_size=0, max_size=12),
    st.sampled_from(["", ".", "./", "..", "../x", "/etc/passwd", "a/../../b", "a//b/./c",
                     "x" * 300, "/".join(["d"] * 300), "GNUSparseFile.0/f"]),
)
_NUMBERS = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([0, 1, 8**11, 2**33]))
_PAX_KEYS = st.sampled_from([
    "path", "linkpath", "mtime", "atime", "size", "uid", "gid", "uname", "hdrcharset",
    "GNU.sparse.major", "GNU.sparse.minor", "GNU.sparse.name", "GNU.sparse.realsize",
    "GNU.sparse.size", "GNU.sparse.map", "GNU.sparse.offset", "GNU.sparse.numbytes",
    "SCHILY.xattr.user.a", "SCHILY.xattr.security.capability", "LIBARCHIVE.xattr.user.b",
    "SCHILY.devmajor", "comment",
])
_PAX_VALUES = st.one_of(
    st.text(alphabet="0123456789.,-eE+naifx/", max_size=12),
    st.sampled_from(["1e300", "-1", "nan", "inf", "1,2,3", "0,10,5,5", "99999999999999999999",
                     "=", "\n", "BINARY", "x" * 70_000]),
)
_TYPES = st.sampled_from([b"0", b"1", b"2", b"3", b"4", b"5", b"6", b"7", b"S", b"L",
                          b"K", b"x", b"g", b"V", b"M", b"Z"])


@st.composite
def _member(draw: st.DrawFn) -> tarfile.TarInfo:
    info = tarfile.TarInfo(draw(_NAMES))
    info.type = draw(_TYPES)
    info.mode = draw(st.integers(0, 0o7777))
    info.uid, info.gid = draw(st.integers(0, 2**21)), draw(st.integers(0, 2**21))
    info.mtime = draw(st.integers(0, 8**11 - 1))
    info.linkname = draw(_NAMES)
    info.size = draw(st.integers(0, 3000))
    info.pax_headers = draw(st.dictionaries(_PAX_KEYS, _PAX_VALUES, max_size=4))
    return info


@st.composite
def _tarball(draw: st.DrawFn) -> bytes:
    fmt = draw(st.sampled_from([tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT]))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8",
                      errors="surrogateescape") as archive:
        for info in draw(st.lists(_member(), max_size=6)):
            try:
                archive.addfile(info, io.BytesIO(bytes(info.size)) if info.size else None)
            except (ValueError, tarfile.TarError, UnicodeError):
                pass  # a header tarfile will not write: the fuzzer damages others
    data = buf.getvalue()
    if draw(st.booleans()):  # a sparse member, its map as random as the rest
        regions = draw(st.lists(st.tuples(_NUMBERS.map(abs), st.binary(max_size=40)),
                                max_size=4))
        kind = draw(st.sampled_from([gnu_sparse, pax_sparse]))
        regions = sorted((o % 100_000, d) for o, d in regions) if draw(st.booleans()) else [
            (o % 8**11, d) for o, d in regions]
        end = max((o + len(d) for o, d in regions), default=0)
        size = draw(st.one_of(st.integers(end, end + 100_000), _NUMBERS.map(abs)))
        try:
            data = members_then_end(kind("s", size % 8**11, regions)) + without_end(data)
        except (ValueError, OverflowError):
            pass
    damage = draw(st.one_of(st.just([]), st.lists(
        st.tuples(st.integers(0, max(len(data) - 1, 0)), st.integers(0, 255)), max_size=4)))
    damaged = bytearray(data)
    for offset, value in damage:
        if offset < len(damaged):
            damaged[offset] = value
    cut = draw(st.one_of(st.none(), st.none(), st.integers(0, len(damaged))))
    return bytes(damaged if cut is None else damaged[:cut])


def _contract(data: bytes) -> None:
    """Success or a CloudletsError, in bounded time: nothing else."""
    started = time.monotonic()
    try:
        with read_tarball(io.BytesIO(data), POLICY) as tree:
            for path in tree.paths()[:50]:
                tree.resolve(path)
    except CloudletsError:
        pass
    except Exception as exc:  # the contract is broken: show the input to keep
        raise AssertionError(f"{type(exc).__name__}: {exc} for {data.hex()}") from exc
    elapsed = time.monotonic() - started
    assert elapsed < WALL_CLOCK, f"{elapsed:.2f} s for {data.hex()}"


@settings(max_examples=150, deadline=WALL_CLOCK * 1000, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(_tarball())
def test_the_reader_keeps_its_contract_under_fuzzing(data: bytes) -> None:
    _contract(data)


def _corpus() -> list[Path]:
    return sorted(CORPUS.glob("*.hex"))


def test_the_corpus_is_kept() -> None:
    assert len(_corpus()) >= 5


@pytest.mark.parametrize("path", _corpus(), ids=lambda path: path.name)
def test_the_corpus_keeps_the_contract(path: Path) -> None:
    _contract(bytes.fromhex(path.read_text()))


if __name__ == "__main__":  # pragma: no cover - a longer run, by hand
    runs = int(os.environ.get("FUZZ_EXAMPLES", "3000"))
    settings(max_examples=runs, deadline=None, derandomize=False,
             suppress_health_check=list(HealthCheck))(
        given(_tarball())(_contract))()
