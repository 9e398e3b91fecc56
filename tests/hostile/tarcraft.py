"""Hostile tarballs, crafted at test time: shapes of about a megabyte (deep,
wide, long names, many links, big headers), GNU and PAX sparse members
written header by header, and a tiny renderable cloudlet around any of them.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cloudlets import Renderer
from tests.test_rootfs import MTIME, D, H, L, M, build_tar

MIB = 1024 * 1024
#: What every hostile case must end within, seconds of wall clock.
WALL_CLOCK = 2.0

__all__ = ["MIB", "SHAPES", "WALL_CLOCK", "bytes_on_disk", "cloudlet", "gnu_sparse",
           "largest_file", "members_then_end", "pax_sparse", "renderer", "shape", "timed",
           "without_end"]


# -- shapes of about a megabyte --------------------------------------------------------

def _deep_chains(size: int) -> list[M]:
    """Chains of directories 256 deep (the default limit), one after another."""
    members: list[M] = []
    chain = 0
    while len(members) * 1536 < size:
        name = f"c{chain}"
        for level in range(255):
            name += f"/{level:x}"
            members.append(D(name))
        chain += 1
    return members


def _deep_files(size: int) -> list[M]:
    """Files 256 deep under distinct roots: every parent is implied (synthesized)."""
    middle = "/".join(["d"] * 254)
    return [M(f"r{n}/{middle}/f") for n in range(size // 2560)]


def _long_names(size: int) -> list[M]:
    """Names close to the path limit (GNU longname or PAX path records)."""
    return [M(f"n{n:05d}/" + "/".join(["x" * 200] * 19)) for n in range(size // 5632)]


def _wide(size: int) -> list[M]:
    """One directory holding a member per header block."""
    return [D("w"), *(M(f"w/f{n}") for n in range(size // 512))]


def _links(size: int) -> list[M]:
    """Hard links to one inode, and symlinks to each other."""
    count = size // 1024
    return ([M("target", b"data")] + [H(f"h{n}", "target") for n in range(count)]
            + [L(f"s{n}", f"s{n + 1}") for n in range(count)])


def _xattrs(size: int) -> list[M]:
    """Members with extended attributes near their size limit (64 KiB)."""
    value = "v" * 60_000
    return [M(f"x{n}", pax={f"SCHILY.xattr.user.a{k}": value for k in range(3)})
            for n in range(size // 181_000)]


#: name -> (members for about ``size`` bytes of tar, tar format)
SHAPES: dict[str, tuple[Callable[[int], list[M]], int]] = {
    "deep-chains": (_deep_chains, tarfile.GNU_FORMAT),
    "deep-implied": (_deep_files, tarfile.GNU_FORMAT),
    "long-names-gnu": (_long_names, tarfile.GNU_FORMAT),
    "long-names-pax": (_long_names, tarfile.PAX_FORMAT),
    "wide": (_wide, tarfile.USTAR_FORMAT),
    "links": (_links, tarfile.PAX_FORMAT),
    "xattrs": (_xattrs, tarfile.PAX_FORMAT),
}


def shape(name: str, size: int = MIB) -> bytes:
    """About ``size`` bytes of uncompressed tar of the named shape."""
    build, fmt = SHAPES[name]
    return build_tar(build(size), fmt)


# -- sparse members, header by header --------------------------------------------------

def _octal(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def _checksummed(block: bytearray) -> bytes:
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def gnu_sparse(name: str, realsize: int, regions: Sequence[tuple[int, bytes]],
               *, mtime: int = MTIME) -> bytes:
    """An old-GNU sparse member (type ``S``): up to four ``(offset, data)``
    regions in the header, ``realsize`` the size it declares."""
    assert len(regions) <= 4
    data = b"".join(content for _, content in regions)
    block = bytearray(512)
    block[0:100] = name.encode().ljust(100, b"\0")
    block[100:108] = _octal(0o644, 8)
    block[108:116] = _octal(0, 8)
    block[116:124] = _octal(0, 8)
    block[124:136] = _octal(len(data), 12)
    block[136:148] = _octal(mtime, 12)
    block[156:157] = tarfile.GNUTYPE_SPARSE
    block[257:265] = tarfile.GNU_MAGIC
    for index, (offset, content) in enumerate(regions):
        start = 386 + 24 * index
        block[start:start + 12] = _octal(offset, 12)
        block[start + 12:start + 24] = _octal(len(content), 12)
    block[483:495] = _octal(realsize, 12)
    return _checksummed(block) + data + bytes(-len(data) % 512)


def pax_sparse(name: str, realsize: int, regions: Sequence[tuple[int, bytes]]) -> bytes:
    """A PAX 1.0 sparse member (its map at the start of its data)."""
    data = b"".join(content for _, content in regions)
    lines = [str(len(regions))] + [f"{offset}\n{len(content)}" for offset, content in regions]
    sparse_map = ("\n".join(lines) + "\n").encode()
    payload = sparse_map.ljust(-(-len(sparse_map) // 512) * 512, b"\0") + data
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as archive:
        info = tarfile.TarInfo(f"GNUSparseFile.0/{name}")
        info.size, info.mtime = len(payload), MTIME
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0",
                            "GNU.sparse.name": name, "GNU.sparse.realsize": str(realsize)}
        archive.addfile(info, io.BytesIO(payload))
        return buf.getvalue()  # before close() writes the end of the archive


def without_end(archive: bytes) -> bytes:
    """A tarball's members without its end-of-archive blocks."""
    try:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r:") as opened:
            opened.getmembers()
            return archive[:opened.offset]
    except tarfile.ReadError:  # no member at all
        return b""


def members_then_end(*parts: bytes) -> bytes:
    """Concatenated members, then the end-of-archive blocks."""
    return b"".join(parts) + bytes(1024)


# -- a tiny cloudlet around a hostile tarball ------------------------------------------

def cloudlet(root: Path, tarball: bytes, *, root_size: str | None = "64M",
             mtime: int = MTIME) -> dict[str, Any]:
    """A renderable manifest whose tarball is ``tarball`` (a kernel added in
    front, so the raw format can boot it, its times ``mtime``) written under
    ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    front = [D("boot", mtime=mtime), M("boot/vmlinuz", b"kernel", mtime=mtime)]
    data = without_end(build_tar(front, tarfile.GNU_FORMAT)) + tarball
    path = root / "hostile.tar"
    path.write_bytes(data)
    boot: dict[str, Any] = {"kernel": "/boot/vmlinuz", "cmdline": "console=ttyS0"}
    if root_size is not None:
        boot["root"] = {"size": root_size}
    return {"name": "hostile", "version": "1.0", "arch": "x86_64",
            "description": "hostile archive test cloudlet",
            "filesystem": {"url": str(path), "sha256": hashlib.sha256(data).hexdigest()},
            "boot": boot}


def renderer(base: Path, **kwargs: Any) -> Renderer:
    """A real renderer under ``base`` (its work directories too)."""
    (base / "work").mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("ex_source_date_epoch", MTIME)
    return Renderer(cache_dir=base / "cache", data_dir=base / "data", work_dir=base / "work",
                    ex_allow_file_urls=True, **kwargs)


# -- bounds ----------------------------------------------------------------------------

@contextmanager
def timed(limit: float = WALL_CLOCK) -> Iterator[None]:
    """Fail unless the block ends (however it ends) within ``limit`` seconds."""
    started = time.monotonic()
    try:
        yield
    finally:
        elapsed = time.monotonic() - started
        assert elapsed < limit, f"took {elapsed:.2f} s, more than {limit} s"


def _files(top: Path) -> Iterator[Path]:
    for directory, _, names in os.walk(top):
        for name in names:
            yield Path(directory) / name


def bytes_on_disk(top: Path) -> int:
    """Bytes the files under ``top`` occupy on disk (holes excluded)."""
    return sum(path.lstat().st_blocks * 512 for path in _files(top))


def largest_file(top: Path) -> int:
    """The largest apparent size of a file under ``top`` (0 if none)."""
    return max((path.lstat().st_size for path in _files(top)), default=0)
