"""SANStorage against real block targets on 127.0.0.1: a file, nbdkit (TCP
and Unix socket) and tgtd's iSCSI (with and without CHAP).

Every content check reads the backing file the server writes to, never only
through the driver's own client.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import re
import shutil
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudlets import Renderer
from cloudlets.drivers.providers import get_driver
from cloudlets.drivers.storage.san import HEADER_SIZE, SANStorage, redact_target
from cloudlets.drivers.storage.san.nbd import NBDTarget
from cloudlets.drivers.types import StorageCapability
from cloudlets.errors import StorageError
from cloudlets.testing.storage import StorageDriverConformance
from tests.netpolicy import LOOPBACK_HOSTS
from tests.san_fixture import (
    CHAP_PASSWORD,
    CHAP_USER,
    IQN_PREFIX,
    ISCSIServer,
    NBDServer,
    ScriptedNBDServer,
    fill_target,
    iscsi_server,
    nbd_server,
)

__all__ = ["iscsi_server", "nbd_server"]  # the fixtures, imported for pytest

MiB = 1024 * 1024
#: Large enough for the conformance suite's multi-chunk stream (3 x 4 MiB + 17).
CONFORMANCE_SIZE = 16 * MiB
#: What the targets are filled with before a test, to see what was written.
PATTERN = b"\xa5\x5a-old-bytes-"
KINDS = ["file", "nbd", "nbd+unix", "iscsi", "iscsi+chap"]

#: ``(name, size, pattern) -> (location, backing file)``
NewTarget = Callable[[str, int, bytes], tuple[str, Path]]

_counter = itertools.count()


def _image(size: int, seed: int = 0) -> bytes:
    """Random content (reproducible, never repeating) with a recognizable header."""
    header = f"CLOUDLETS-SAN-TEST-IMAGE seed={seed}\n".encode()
    return header + random.Random(seed).randbytes(size - len(header))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _pattern(size: int) -> bytes:
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


def _file_target(root: Path) -> NewTarget:
    root.mkdir(exist_ok=True)

    def new(name: str, size: int, pattern: bytes = b"") -> tuple[str, Path]:
        path = root / f"{next(_counter)}-{name}"
        fill_target(path, size, pattern)
        return str(path), path
    return new


def _target_factory(kind: str, request: pytest.FixtureRequest, root: Path) -> NewTarget:
    if kind == "file":
        return _file_target(root)
    if kind.startswith("nbd"):
        nbd: NBDServer = request.getfixturevalue("nbd_server")

        def new_export(name: str, size: int, pattern: bytes = b"") -> tuple[str, Path]:
            return nbd.new_export(name, size, pattern, unix=kind == "nbd+unix")
        return new_export
    iscsi: ISCSIServer = request.getfixturevalue("iscsi_server")

    def new_lun(name: str, size: int, pattern: bytes = b"") -> tuple[str, Path]:
        return iscsi.new_lun(name, size, pattern, chap=kind == "iscsi+chap")
    return new_lun


@pytest.fixture(params=KINDS)
def new_target(request: pytest.FixtureRequest, tmp_path: Path) -> NewTarget:
    return _target_factory(request.param, request, tmp_path / "targets")


# -- the conformance suite: a location is a whole fresh target ---------------------


class _SANConformance(StorageDriverConformance):
    kind = "file"

    @pytest.fixture
    def storage(self) -> SANStorage:
        return SANStorage()

    @pytest.fixture
    def new_location(self, request: pytest.FixtureRequest,
                     tmp_path: Path) -> Callable[[str], str]:
        new = _target_factory(self.kind, request, tmp_path / "targets")
        return lambda name: new(name, CONFORMANCE_SIZE, b"")[0]


class TestSANFileConformance(_SANConformance):
    kind = "file"


class TestSANFileDirectConformance(_SANConformance):
    kind = "file"

    @pytest.fixture
    def storage(self) -> SANStorage:
        return SANStorage(ex_direct=True)


class TestSANNBDConformance(_SANConformance):
    kind = "nbd"


class TestSANNBDUnixConformance(_SANConformance):
    kind = "nbd+unix"


class TestSANISCSIConformance(_SANConformance):
    kind = "iscsi"


class TestSANISCSIChapConformance(_SANConformance):
    kind = "iscsi+chap"


def test_registered_under_its_name() -> None:
    assert get_driver("storage", "san") is SANStorage
    assert SANStorage.capabilities & StorageCapability.BLOCK


# -- what lands on the target ----------------------------------------------------------


class _SmallChunks(SANStorage):
    """Blocks smaller than the held-back header: other paths of the writer."""

    CHUNK_SIZE = 64 * 1024


@pytest.mark.parametrize("source_kind", ["file", "stream"])
def test_image_lands_and_the_rest_survives(new_target: NewTarget, tmp_path: Path,
                                           source_kind: str) -> None:
    size = 8 * MiB
    image = _image(3 * MiB + 12345)  # an unaligned tail
    location, backing = new_target("image.img", size, PATTERN)
    storage = SANStorage()
    if source_kind == "file":
        source_path = tmp_path / "image.raw"
        source_path.write_bytes(image)
        artifact = storage.upload(source_path, location, overwrite=True)
    else:  # unknown length, odd chunk sizes
        pieces = (image[i:i + 100_003] for i in range(0, len(image), 100_003))
        artifact = _SmallChunks().upload(pieces, location, overwrite=True)
    on_disk = backing.read_bytes()
    assert artifact.size == len(image)
    assert artifact.sha256 == _sha(image)
    assert artifact.location == redact_target(location)
    assert _sha(on_disk[:len(image)]) == _sha(image)
    assert on_disk[len(image):] == _pattern(size)[len(image):]  # nothing past the image
    assert len(on_disk) == size
    assert storage.exists(location)
    assert storage.ex_size(location) == size
    assert storage.ex_digest(location, len(image)) == _sha(image)


def test_target_smaller_than_the_image_is_refused_untouched(new_target: NewTarget) -> None:
    location, backing = new_target("small.img", 2 * MiB, PATTERN)
    before = backing.read_bytes()
    with pytest.raises(StorageError, match="smaller than the") as caught:
        SANStorage().upload(_image(3 * MiB), location, overwrite=True)
    assert redact_target(location) in str(caught.value)
    assert backing.read_bytes() == before


@pytest.mark.parametrize("tail", [0, 4321])
def test_a_source_that_reuses_its_buffer(new_target: NewTarget, tail: int) -> None:
    """Blocks may be sent after the source's next chunk (NBD): never from
    its buffer, which it may refill in place or resize (the tail)."""
    image = _image(6 * MiB + tail)
    location, backing = new_target("reused.img", 8 * MiB, PATTERN)

    def pieces() -> Iterator[bytearray]:
        buffer = bytearray()
        for offset in range(0, len(image), 2 * MiB):
            buffer[:] = image[offset:offset + 2 * MiB]
            yield buffer

    artifact = SANStorage(ex_verify=False).upload(pieces(), location, overwrite=True)
    assert artifact.sha256 == _sha(image)
    assert backing.read_bytes()[:len(image)] == image


def test_stream_larger_than_the_target_fails_header_unwritten(new_target: NewTarget) -> None:
    location, backing = new_target("short.img", 2 * MiB, b"")
    image = _image(3 * MiB)
    pieces = (image[i:i + 256 * 1024] for i in range(0, len(image), 256 * 1024))
    with pytest.raises(StorageError, match=r"larger than .*refusing to write past its end"):
        SANStorage().upload(pieces, location)
    on_disk = backing.read_bytes()
    assert len(on_disk) == 2 * MiB
    assert on_disk[:HEADER_SIZE] == bytes(HEADER_SIZE)
    assert not SANStorage().exists(location)


@pytest.mark.parametrize("failure", ["source", "sha256"])
def test_failed_overwrite_leaves_header_zero(new_target: NewTarget, failure: str) -> None:
    location, backing = new_target("failing.img", 8 * MiB, b"")
    storage = SANStorage()
    storage.upload(_image(3 * MiB, seed=1), location)  # an old, complete-looking image
    assert backing.read_bytes()[:HEADER_SIZE] != bytes(HEADER_SIZE)
    new = _image(5 * MiB, seed=2)
    headers_seen: list[bytes] = []

    class SourceBroke(Exception):
        pass

    def pieces() -> Iterator[bytes]:
        for offset in range(0, len(new), MiB):
            if offset == 3 * MiB:  # well into the body
                with open(backing, "rb") as handle:
                    headers_seen.append(handle.read(HEADER_SIZE))
                if failure == "source":
                    raise SourceBroke("the source failed half-way")
            yield new[offset:offset + MiB]

    expected: type[Exception] = SourceBroke if failure == "source" else StorageError
    with pytest.raises(expected, match="half-way" if failure == "source" else "sha256"):
        storage.upload(pieces(), location, overwrite=True,
                       sha256=None if failure == "source" else "0" * 64)
    # the old header went before the new body: never an old disk over new bytes
    assert headers_seen == [bytes(HEADER_SIZE)]
    assert backing.read_bytes()[:HEADER_SIZE] == bytes(HEADER_SIZE)
    assert not storage.exists(location)


def test_overwrite_false_refuses_a_nonzero_header(new_target: NewTarget) -> None:
    location, backing = new_target("taken.img", 4 * MiB, b"")
    with open(backing, "r+b") as handle:  # one signature byte, deep in the first MiB
        handle.seek(HEADER_SIZE - 1)
        handle.write(b"\x01")
    before = backing.read_bytes()
    storage = SANStorage()
    assert storage.exists(location)
    with pytest.raises(StorageError, match="refusing to overwrite"):
        storage.upload(_image(MiB), location)
    assert backing.read_bytes() == before


def test_only_the_header_counts_as_stored(new_target: NewTarget) -> None:
    location, backing = new_target("body-only.img", 4 * MiB, b"")
    with open(backing, "r+b") as handle:
        handle.seek(HEADER_SIZE)
        handle.write(b"leftover data after the first MiB")
    storage = SANStorage()
    assert not storage.exists(location)
    storage.upload(b"tiny image", location)
    assert backing.read_bytes()[:10] == b"tiny image"


def test_delete_wipes_the_first_mib(new_target: NewTarget) -> None:
    location, backing = new_target("delete.img", 8 * MiB, b"")
    image = _image(3 * MiB)
    storage = SANStorage()
    storage.upload(image, location)
    storage.delete(location)
    on_disk = backing.read_bytes()
    assert on_disk[:HEADER_SIZE] == bytes(HEADER_SIZE)
    assert on_disk[HEADER_SIZE:len(image)] == image[HEADER_SIZE:]  # wipefs, not shred
    assert not storage.exists(location)
    with pytest.raises(StorageError, match="nothing is stored"):
        storage.delete(location)


def test_target_smaller_than_the_header(new_target: NewTarget) -> None:
    location, backing = new_target("tiny.img", 512 * 1024, PATTERN)
    image = _image(300_000)
    storage = SANStorage()
    storage.upload(image, location, overwrite=True)
    on_disk = backing.read_bytes()
    assert on_disk[:len(image)] == image
    assert on_disk[len(image):] == _pattern(512 * 1024)[len(image):]
    storage.delete(location)
    assert backing.read_bytes() == bytes(512 * 1024)


# -- requests in flight: a scripted server that answers out of order -------------------


class _MiBChunks(SANStorage):
    """Enough requests for several windows in a small image."""

    CHUNK_SIZE = MiB


@pytest.mark.parametrize("write_behind", [0, 2])
def test_nbd_keeps_requests_in_flight_and_takes_replies_in_any_order(
        monkeypatch: pytest.MonkeyPatch, write_behind: int) -> None:
    monkeypatch.setattr(NBDTarget, "WRITE_BEHIND", write_behind)  # from this thread, or another
    monkeypatch.setattr(NBDTarget, "FLUSH_EVERY", 4 * MiB)
    image = _image(16 * MiB + 12345)
    size = 20 * MiB
    with ScriptedNBDServer(_pattern(size)) as server:
        artifact = _MiBChunks(ex_verify=True).upload(image, server.location, overwrite=True)
        assert bytes(server.data[:len(image)]) == image
        assert bytes(server.data[len(image):]) == _pattern(size)[len(image):]
        assert artifact.sha256 == _sha(image)
        assert server.reordered
        # several writes, then several read-back reads, in flight at once; never
        # more than the window
        assert 1 < server.max_outstanding("write") <= NBDTarget.WINDOW
        assert 1 < server.max_outstanding("read") <= NBDTarget.WINDOW
        *_, upload = server.connections
        assert upload[-1].command == "disc"
        # the old header is wiped and flushed before the body; the new one goes
        # last, alone, once the body is answered, flushed and read back
        wipe, header = (i for i, r in enumerate(upload) if r.command == "write" and r.offset == 0)
        body = [i for i, r in enumerate(upload) if r.command == "write" and r.offset > 0]
        assert upload[wipe + 1].command == "flush"
        assert wipe + 1 < min(body)
        # FLUSHes on the way (FLUSH_EVERY), not waited for; the last one follows the body
        flushes = [i for i, r in enumerate(upload) if r.command == "flush" and body[0] < i < header]
        assert len(flushes) >= 3
        assert any(upload[i].outstanding > 0 and i < max(body) for i in flushes)
        assert max(body) < flushes[-1]
        assert upload[header].outstanding == 0
        assert sum(r.length for r in upload[flushes[-1]:header] if r.command == "read") \
            == len(image) - HEADER_SIZE
        assert [r.command for r in upload[header:]] == ["write", "flush", "read", "disc"]


@pytest.mark.parametrize("write_behind", [0, 2])
def test_nbd_failed_write_in_a_window_names_its_offset(monkeypatch: pytest.MonkeyPatch,
                                                       write_behind: int) -> None:
    monkeypatch.setattr(NBDTarget, "WRITE_BEHIND", write_behind)
    image = _image(16 * MiB)
    failing = 6 * MiB
    with ScriptedNBDServer(bytes(20 * MiB), fail={("write", failing)}) as server:
        storage = _MiBChunks()
        storage.upload(_image(3 * MiB, seed=1), server.location)  # an old image
        with pytest.raises(StorageError, match=f"failed an NBD write at offset {failing}: "
                                               f"Input/output error") as caught:
            storage.upload(image, server.location, overwrite=True)
        assert caught.value.location == server.location
        assert bytes(server.data[:HEADER_SIZE]) == bytes(HEADER_SIZE)
        assert not storage.exists(server.location)
        upload = server.connections[-2]
        (failed,) = [r for r in upload if r.command == "write" and r.offset == failing]
        assert failed.outstanding > 0  # it failed in the middle of a window
        assert upload[-1].command == "disc"  # the client waited for the rest and said goodbye


@pytest.mark.parametrize("write_behind", [0, 2])
def test_nbd_server_gone_in_a_window(monkeypatch: pytest.MonkeyPatch, write_behind: int) -> None:
    monkeypatch.setattr(NBDTarget, "WRITE_BEHIND", write_behind)
    with ScriptedNBDServer(_pattern(20 * MiB), hang_up={("write", 7 * MiB)}) as server:
        started = time.monotonic()
        with pytest.raises(StorageError, match=r"closed the NBD connection|connection .* failed"):
            _MiBChunks().upload(_image(16 * MiB), server.location, overwrite=True)
        assert time.monotonic() - started < 5
        assert bytes(server.data[:HEADER_SIZE]) == bytes(HEADER_SIZE)
    assert not [t for t in threading.enumerate() if t.name.startswith("cloudlets-")]


def test_nbd_failed_read_back_names_its_offset() -> None:
    image = _image(8 * MiB)
    failing = 5 * MiB
    with ScriptedNBDServer(_pattern(10 * MiB), fail={("read", failing)}) as server:
        with pytest.raises(StorageError, match=f"failed an NBD read at offset {failing}"):
            _MiBChunks(ex_verify=True).upload(image, server.location, overwrite=True)
        assert bytes(server.data[:HEADER_SIZE]) == bytes(HEADER_SIZE)
        assert bytes(server.data[HEADER_SIZE:len(image)]) == image[HEADER_SIZE:]
        # a failed simple READ may or may not carry its payload: the client
        # hangs up instead of guessing
        assert server.connections[-1][-1].command == "read"


# -- O_DIRECT --------------------------------------------------------------------------


def _open_flags(path: Path) -> list[int]:
    """:returns: the open flags of this process's descriptors on ``path``."""
    flags = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != str(path):
                continue
            info = Path(f"/proc/self/fdinfo/{fd}").read_text()
        except OSError:
            continue
        match = re.search(r"^flags:\s+(\d+)", info, re.MULTILINE)
        assert match is not None
        flags.append(int(match[1], 8))
    return flags


@pytest.mark.parametrize("direct", [True, False])
def test_direct_io_on_a_file_target(tmp_path: Path, direct: bool) -> None:
    probe = tmp_path / "probe"
    probe.touch()
    try:
        os.close(os.open(probe, os.O_RDWR | os.O_DIRECT))
    except OSError as exc:
        pytest.skip(f"the filesystem of {tmp_path} refuses O_DIRECT: {exc.strerror}")
    location, backing = _file_target(tmp_path / "targets")("direct.img", 16 * MiB, PATTERN)
    image = _image(9 * MiB + 777)
    flags_seen: list[list[int]] = []

    def pieces() -> Iterator[bytes]:
        for offset in range(0, len(image), 3 * MiB):
            if offset == 6 * MiB:
                flags_seen.append(_open_flags(backing))
            yield image[offset:offset + 3 * MiB]

    SANStorage(ex_direct=direct).upload(pieces(), location, overwrite=True)
    direct_fds = [f for f in flags_seen[0] if f & os.O_DIRECT]
    assert len(direct_fds) == (1 if direct else 0)
    on_disk = backing.read_bytes()
    assert _sha(on_disk[:len(image)]) == _sha(image)
    assert on_disk[len(image):] == _pattern(16 * MiB)[len(image):]
    assert _open_flags(backing) == []  # closed


# -- errors name the target, never a password ---------------------------------------------


def _qemu_nbd_children() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            comm = Path(f"/proc/{entry}/comm").read_text().strip()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and comm == "qemu-nbd":
            pids.append(int(entry))
    return pids


def _secret_file(pid: int) -> tuple[list[str], Path]:
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    objects = [a for a in argv if a.startswith("secret,")]
    assert len(objects) == 1, argv
    match = re.search(r",file=(.+)$", objects[0])
    assert match is not None
    return argv, Path(match[1])


def test_chap_password_stays_off_command_lines_and_disk(iscsi_server: ISCSIServer) -> None:
    location, backing = iscsi_server.new_lun("chap.img", 8 * MiB, chap=True)
    image = _image(3 * MiB)
    seen: dict[str, Any] = {}

    def pieces() -> Iterator[bytes]:
        for offset in range(0, len(image), MiB):
            if offset == MiB:
                (pid,) = _qemu_nbd_children()
                argv, secret = _secret_file(pid)
                seen["argv"] = argv
                seen["environ"] = Path(f"/proc/{pid}/environ").read_bytes()
                seen["secret exists"] = secret.exists()
                seen["directory mode"] = stat.S_IMODE(secret.parent.stat().st_mode)
                seen["secret"] = secret
            yield image[offset:offset + MiB]

    artifact = SANStorage().upload(pieces(), location)
    assert CHAP_PASSWORD not in " ".join(seen["argv"])
    assert CHAP_PASSWORD.encode() not in seen["environ"]
    assert f"file.user={CHAP_USER}" in " ".join(seen["argv"])
    assert seen["secret exists"] is False  # removed once qemu-nbd logged in
    assert seen["directory mode"] == 0o700
    assert not seen["secret"].parent.exists()
    assert _qemu_nbd_children() == []
    assert CHAP_PASSWORD not in artifact.location
    assert artifact.location == location.replace(CHAP_PASSWORD, "***")
    assert backing.read_bytes()[:len(image)] == image


def test_target_that_never_answers_times_out(tmp_path: Path) -> None:
    """A portal that accepts and stays silent: the wait is bounded, the
    secret file was mode 0600 while qemu-nbd needed it, and all is cleaned."""
    seen: dict[str, Any] = {}
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    held: list[socket.socket] = []

    def accept() -> None:
        listener.settimeout(10)
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        held.append(conn)
        (pid,) = _qemu_nbd_children()
        _, secret = _secret_file(pid)
        seen["mode"] = stat.S_IMODE(secret.stat().st_mode)
        seen["content"] = secret.read_bytes()
        seen["secret"] = secret

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    location = f"iscsi://{CHAP_USER}%{CHAP_PASSWORD}@127.0.0.1:{port}/{IQN_PREFIX}:x/1"
    started = time.monotonic()
    try:
        with pytest.raises(StorageError, match=r"no answer within 1\.5 s") as caught:
            SANStorage(timeout=1.5).exists(location)
    finally:
        thread.join(timeout=10)
        for conn in held:
            conn.close()
        listener.close()
    assert time.monotonic() - started < 8
    assert CHAP_PASSWORD not in str(caught.value)
    assert caught.value.location == f"iscsi://{CHAP_USER}%***@127.0.0.1:{port}/{IQN_PREFIX}:x/1"
    assert seen["mode"] == 0o600
    assert seen["content"] == CHAP_PASSWORD.encode()
    assert not seen["secret"].parent.exists()
    assert _qemu_nbd_children() == []


def test_iscsi_errors_are_redacted(iscsi_server: ISCSIServer) -> None:
    wrong = "wrong-pw-5d1e"
    location, _ = iscsi_server.new_lun("auth.img", 2 * MiB, chap=True,
                                       userinfo=f"{CHAP_USER}%{wrong}")
    with pytest.raises(StorageError, match="Authentication failure") as caught:
        SANStorage().exists(location)
    assert wrong not in str(caught.value)
    assert f"iscsi://{CHAP_USER}%***@127.0.0.1" in str(caught.value)

    location, _ = iscsi_server.new_lun("auth.img", 2 * MiB, chap=True)
    errors: list[StorageError] = []
    with pytest.raises(StorageError, match="smaller than") as caught:
        SANStorage().upload(_image(3 * MiB), location)
    errors.append(caught.value)
    with pytest.raises(StorageError, match="sha256") as caught:
        SANStorage().upload(b"payload", location, sha256="0" * 64)
    errors.append(caught.value)
    SANStorage().upload(b"stored", location)
    with pytest.raises(StorageError, match="refusing to overwrite") as caught:
        SANStorage().upload(b"again", location)
    errors.append(caught.value)
    for error in errors:
        assert CHAP_PASSWORD not in str(error)
        assert CHAP_PASSWORD not in (error.location or "")
        assert "127.0.0.1" in str(error)

    # a password with an unescaped '/' and '@': the location cannot be parsed,
    # and the error about it must not show the password's parts
    for password in ("pa/ss-5d1e", "pa@ss-5d1e"):
        bad = f"iscsi://{CHAP_USER}%{password}@127.0.0.1:{iscsi_server.port}/{IQN_PREFIX}:1/1"
        with pytest.raises(StorageError, match="must be iscsi://") as caught:
            SANStorage().exists(bad)
        assert "ss-5d1e" not in str(caught.value)
        assert "ss-5d1e" not in (caught.value.location or "")


def test_other_errors_name_the_target(nbd_server: NBDServer, tmp_path: Path) -> None:
    storage = SANStorage(timeout=5)
    missing = tmp_path / "no-such-disk.img"
    with pytest.raises(StorageError, match=f"{missing} does not exist"):
        storage.exists(str(missing))
    unknown = nbd_server.location("no-such-export")
    with pytest.raises(StorageError, match=f"{re.escape(unknown)} refused export"):
        storage.exists(unknown)
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    with pytest.raises(StorageError, match=f"cannot connect to nbd://127.0.0.1:{port}/x"):
        storage.exists(f"nbd://127.0.0.1:{port}/x")
    with pytest.raises(StorageError, match="cannot write to smb://"):
        storage.exists("smb://host/share")


# -- a whole render -------------------------------------------------------------------


def test_render_to_an_nbd_export(nbd_server: NBDServer, static_http: tuple[str, Path],
                                 tmp_path: Path) -> None:
    # the renderer tests' helpers, imported here so that only this test
    # depends on that module
    from tests.test_renderer import BASE_FILES, CONFIG, make_tarball, read_from_disk

    base, www = static_http
    tarball = make_tarball(BASE_FILES)
    digest = _sha(tarball)
    (www / "tiny.tar.gz").write_bytes(tarball)
    manifest = {
        "name": "tiny", "version": "1.0",
        "filesystem": {"url": f"{base}/tiny.tar.gz", "sha256": digest, "size": len(tarball)},
        "boot": {"kernel": "/boot/vmlinuz", "cmdline": "console=ttyS0"},
        "args": {"hostname": {"type": "string", "default": "tiny-host"}},
        "templates": ["/etc/hostname", "/etc/network/interfaces"],
    }
    # named like the format's file: the location holds whether or not the
    # Renderer appends the format's extension to an output location
    location, backing = nbd_server.new_export("web.raw", 96 * MiB, PATTERN)
    renderer = Renderer(cache_dir=tmp_path / "cache", data_dir=tmp_path / "data",
                        work_dir=tmp_path / "work", ex_source_date_epoch=1_700_000_000,
                        ex_allow_hosts=LOOPBACK_HOSTS)
    result = renderer.render(manifest, location, storage=SANStorage(), format="raw",
                             config=CONFIG, overwrite=True)
    artifact = result.primary
    assert artifact.location == location
    size = artifact.size
    assert 0 < size < 96 * MiB
    disk = tmp_path / "disk.raw"
    with open(backing, "rb") as source, open(disk, "wb") as copy:
        shutil.copyfileobj(source, copy)
        copy.truncate(size)
    assert _sha(disk.read_bytes()) == artifact.sha256
    assert read_from_disk(disk, "/etc/hostname") == b"web1\n"
    with open(backing, "rb") as handle:
        handle.seek(size)
        assert handle.read() == _pattern(96 * MiB)[size:]


def test_without_read_back_only_the_first_mib_is_read(tmp_path: Path) -> None:
    with ScriptedNBDServer(_pattern(10 * MiB)) as server:
        image = _image(8 * MiB)
        artifact = _MiBChunks().upload(image, server.location, overwrite=True)
        assert bytes(server.data[:len(image)]) == image and artifact.sha256 == _sha(image)
        *_, upload = server.connections
        reads = [(r.offset, r.length) for r in upload if r.command == "read"]
        # only the check for something stored; the body is never read back:
        # the default trusts the flushed, acknowledged writes
        assert reads == [(0, HEADER_SIZE)]
        assert any(r.command == "flush" for r in upload)
