"""Real block-target servers on 127.0.0.1 for the SAN storage driver's tests.

- :func:`nbd_server`: two ``nbdkit`` processes (the ``file`` plugin with
  ``dir=``: every file of one directory is an export named after it), one
  on a TCP port of 127.0.0.1, one on a Unix socket (``nbd+unix://``).
- :class:`ScriptedNBDServer`: a small NBD server of our own on 127.0.0.1,
  for what nbdkit will not do on request: hold replies back and send them
  in reverse order, count the requests in flight, fail one request.
- :func:`iscsi_server`: Debian's ``tgtd`` with its iSCSI portal on
  127.0.0.1, its control socket in the test's directory
  (``TGT_IPC_SOCKET``), and one target per LUN the test asks for, bound
  to initiators from 127.0.0.1, optionally behind a CHAP account.

What these servers do here, found by running them:

- ports come from the kernel (``-p 0``, ``portal=127.0.0.1:0``) and are read
  back (from ``/proc`` for nbdkit, ``tgtadm --mode portal --op show`` for
  tgtd), so no port is probed and then raced for. This matters for tgtd:
  when its ``--iscsi portal=`` cannot be bound it falls back to the
  wildcard ``:3260`` on every address;
- tgtd honours ``TGT_IPC_SOCKET`` (it listens on ``$TGT_IPC_SOCKET.0``,
  ``.0`` being the default control port ``-C 0``), and so does tgtadm;
- tgtd runs unprivileged, but refuses every tgtadm request except ``show``
  from a peer whose uid and gid (``SO_PEERCRED``) are not 0 in tgtd's user
  namespace. As root that holds; otherwise tgtd runs under ``unshare
  --user --map-root-user``, where our uid *is* 0, and tgtadm needs nothing;
- tgtd ignores ``SIGTERM`` (its handler is empty): it is stopped with
  ``tgtadm --mode system --op delete`` once its targets are deleted, and
  killed when that does not work in time. ``setpriv --pdeathsig KILL``
  kills it (and nbdkit has ``--exit-with-parent``) should pytest die first.

Every wait has a deadline, and every process is killed in teardown.
"""

from __future__ import annotations

import itertools
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pytest

__all__ = [
    "CHAP_PASSWORD",
    "CHAP_USER",
    "IQN_PREFIX",
    "ISCSIServer",
    "NBDServer",
    "ScriptedNBDServer",
    "fill_target",
    "iscsi_server",
    "nbd_server",
]

#: The CHAP account of :func:`iscsi_server` (distinctive, to grep for leaks).
CHAP_USER = "cloudlets"
CHAP_PASSWORD = "chap-pw-7f3a9c2e1b"
#: Names of the targets :func:`iscsi_server` creates.
IQN_PREFIX = "iqn.2026-01.test.cloudlets"
#: Seconds to wait for a server to start, answer a command or stop.
TIMEOUT = 10.0


def fill_target(path: Path, size: int, pattern: bytes = b"") -> None:
    """Create (or replace) a backing file of ``size`` bytes: sparse zeros,
    or ``pattern`` repeated."""
    with open(path, "wb") as handle:
        if pattern:
            block = pattern * (1024 * 1024 // len(pattern) + 1)
            written = 0
            while written < size:
                written += handle.write(block[:min(len(block), size - written)])
        else:
            handle.truncate(size)


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        package = {"nbdkit": "nbdkit", "tgtd": "tgt", "tgtadm": "tgt", "qemu-img": "qemu-utils",
                   "setpriv": "util-linux", "unshare": "util-linux"}.get(name, name)
        pytest.skip(f"{name} is not installed (apt-get install {package})")
    return path


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=TIMEOUT)


def _listening_port(pid: int) -> int | None:
    """:returns: the TCP port process ``pid`` listens on at 127.0.0.1."""
    inodes: set[str] = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                match = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
            if match:
                inodes.add(match[1])
        table = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in table:
        fields = line.split()
        local, state, inode = fields[1], fields[3], fields[9]
        if state == "0A" and inode in inodes and local.startswith("0100007F:"):
            return int(local.split(":")[1], 16)
    return None


# -- NBD ------------------------------------------------------------------------


@dataclass
class NBDServer:
    """nbdkit serving every file of :attr:`root` as an export of its name."""

    root: Path
    port: int
    socket: Path
    processes: list[subprocess.Popen[bytes]]
    _names: Iterator[int] = field(default_factory=itertools.count)

    def new_export(self, name: str, size: int, pattern: bytes = b"", *,
                   unix: bool = False) -> tuple[str, Path]:
        """Create a fresh export backed by a new file.

        :returns: its ``nbd://`` (or ``nbd+unix://``) location and the file.
        """
        export = f"{next(self._names)}-{name}"
        path = self.root / export
        fill_target(path, size, pattern)
        return self.location(export, unix=unix), path

    def location(self, export: str, *, unix: bool = False) -> str:
        """:returns: the location of ``export``."""
        if unix:
            return f"nbd+unix:///{quote(export)}?socket={self.socket}"
        return f"nbd://127.0.0.1:{self.port}/{quote(export)}"


def _start_nbdkit(root: Path, logs: Path, listen: list[str], label: str
                  ) -> tuple[subprocess.Popen[bytes], int | None]:
    pidfile = logs / f"nbdkit-{label}.pid"
    stderr = open(logs / f"nbdkit-{label}.log", "wb")  # noqa: SIM115 - closed below
    try:
        process = subprocess.Popen(
            [_tool("nbdkit"), "--foreground", "--exit-with-parent", "-P", str(pidfile),
             *listen, "file", f"dir={root}"],
            stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr)
    finally:
        stderr.close()
    deadline = time.monotonic() + TIMEOUT
    try:
        while True:
            if process.poll() is not None:
                log = (logs / f"nbdkit-{label}.log").read_text(errors="replace")
                raise RuntimeError(f"nbdkit ({label}) exited with {process.returncode}: {log}")
            if pidfile.exists() and pidfile.read_text().strip() == str(process.pid):
                port = _listening_port(process.pid) if label == "tcp" else None
                if label != "tcp" or port is not None:
                    return process, port
            if time.monotonic() > deadline:
                raise RuntimeError(f"nbdkit ({label}) did not start within {TIMEOUT} s")
            time.sleep(0.01)
    except BaseException:
        _stop(process)
        raise


@pytest.fixture(scope="module")
def nbd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NBDServer]:
    """nbdkit on 127.0.0.1 (TCP, kernel-chosen port) and on a Unix socket,
    both serving the same directory of backing files."""
    base = tmp_path_factory.mktemp("nbd")
    root = base / "exports"
    root.mkdir()
    sock = base / "nbd.sock"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        tcp, port = _start_nbdkit(root, base, ["-i", "127.0.0.1", "-p", "0"], "tcp")
        processes.append(tcp)
        unix, _ = _start_nbdkit(root, base, ["-U", str(sock)], "unix")
        processes.append(unix)
        assert port is not None
        yield NBDServer(root=root, port=port, socket=sock, processes=processes)
    finally:
        for process in processes:
            _stop(process)


# -- a scripted NBD server ---------------------------------------------------------


_NBD_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_NBD_CMD_NAMES = {0: "read", 1: "write", 2: "disc", 3: "flush"}
_EIO = 5


@dataclass
class NBDRequest:
    """A request the server received."""

    command: str
    offset: int
    length: int
    #: requests received before this one and not yet answered
    outstanding: int


class ScriptedNBDServer:
    """An NBD server (fixed newstyle, ``NBD_OPT_GO``, simple replies) on
    127.0.0.1 over one in-memory export, one connection at a time.

    It holds replies back until :attr:`hold` are waiting or the client
    sends nothing for :attr:`idle` seconds, then sends them newest first:
    a client that waits for each reply sees one request at a time answered
    late; a client that keeps several in flight sees them answered out of
    order. Writes land in :attr:`data` as they arrive.

    :param fail: ``(command, offset)`` of requests to answer with ``EIO``
        (a failed write changes nothing; a failed read sends no payload,
        as nbdkit does).
    :param hang_up: ``(command, offset)`` of requests on which to close the
        connection instead of answering (and of any held back).
    """

    def __init__(self, data: bytes, *, hold: int = 4, idle: float = 0.1,
                 fail: set[tuple[str, int]] | frozenset[tuple[str, int]] = frozenset(),
                 hang_up: set[tuple[str, int]] | frozenset[tuple[str, int]] = frozenset(),
                 ) -> None:
        self.data = bytearray(data)
        self.hold = hold
        self.idle = idle
        self.fail = set(fail)
        self.hang_up = set(hang_up)
        #: every connection's requests, in the order received
        self.connections: list[list[NBDRequest]] = []
        #: whether any reply went out before that of an earlier request
        self.reordered = False
        #: connections the client ended with NBD_CMD_DISC
        self.disconnects = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)  # to notice the end
        self.port = self._listener.getsockname()[1]
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def location(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/scripted"

    def max_outstanding(self, command: str) -> int:
        """:returns: the most requests in flight when a ``command`` arrived
        (that one included)."""
        return max((r.outstanding + 1 for c in self.connections for r in c
                    if r.command == command), default=0)

    def __enter__(self) -> ScriptedNBDServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=TIMEOUT)
        self._listener.close()
        assert not self._thread.is_alive(), "the scripted NBD server did not stop"
        assert not self.errors, self.errors

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            try:
                with conn:
                    conn.settimeout(TIMEOUT)
                    self._handshake(conn)
                    self._transmit(conn)
            except (ConnectionError, EOFError):
                pass  # the client hung up
            except Exception as exc:  # noqa: BLE001 - reported by __exit__
                self.errors.append(exc)

    @staticmethod
    def _recv(conn: socket.socket, length: int) -> bytes:
        data = bytearray()
        while len(data) < length:
            chunk = conn.recv(min(length - len(data), 1 << 20))
            if not chunk:
                raise EOFError
            data += chunk
        return bytes(data)

    def _handshake(self, conn: socket.socket) -> None:
        conn.sendall(b"NBDMAGIC" + struct.pack(">QH", 0x49484156454F5054, 0b11))
        self._recv(conn, 4)  # the client's flags
        while True:
            _magic, option, length = struct.unpack(">QII", self._recv(conn, 16))
            self._recv(conn, length)
            if option != 7:  # NBD_OPT_GO only
                conn.sendall(struct.pack(">QIII", 0x3E889045565A9, option, 1 << 31 | 1, 0))
                continue
            flags = 1 | 1 << 2  # NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH
            info = struct.pack(">HQH", 0, len(self.data), flags)
            conn.sendall(struct.pack(">QIII", 0x3E889045565A9, option, 3, len(info)) + info)
            conn.sendall(struct.pack(">QIII", 0x3E889045565A9, option, 1, 0))
            return

    def _transmit(self, conn: socket.socket) -> None:
        log: list[NBDRequest] = []
        self.connections.append(log)
        held: list[tuple[int, bytes]] = []  # (sequence, reply), oldest first
        sequence = itertools.count()
        last_sent = -1
        while True:
            if held and (len(held) >= self.hold
                         or not select.select([conn], [], [], self.idle)[0]):
                for number, reply in reversed(held):
                    self.reordered |= number < last_sent
                    last_sent = max(last_sent, number)
                    conn.sendall(reply)
                held.clear()
                continue
            magic, _flags, kind, cookie, offset, length = _NBD_REQUEST.unpack(
                self._recv(conn, _NBD_REQUEST.size))
            assert magic == 0x25609513, f"bad request magic {magic:#x}"
            command = _NBD_CMD_NAMES[kind]
            log.append(NBDRequest(command, offset, length, len(held)))
            payload = self._recv(conn, length) if command == "write" else b""
            if command == "disc":
                self.disconnects += 1
                return
            if (command, offset) in self.hang_up:
                return
            failed = (command, offset) in self.fail
            assert offset + length <= len(self.data), "request past the end of the export"
            reply = struct.pack(">IIQ", 0x67446698, _EIO if failed else 0, cookie)
            if command == "write" and not failed:
                self.data[offset:offset + length] = payload
            elif command == "read" and not failed:
                reply += self.data[offset:offset + length]
            held.append((next(sequence), reply))


# -- iSCSI ----------------------------------------------------------------------


@dataclass
class ISCSIServer:
    """A running tgtd: its portal and the targets created so far."""

    root: Path
    port: int
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    tids: list[int] = field(default_factory=list)
    _next: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def tgtadm(self, *args: str) -> str:
        """Run tgtadm against this tgtd.

        :returns: its standard output.
        :raises RuntimeError: when it fails.
        """
        result = subprocess.run([_tool("tgtadm"), *args], env=self.env, capture_output=True,
                                text=True, timeout=TIMEOUT, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"tgtadm {' '.join(args)} failed ({result.returncode}): "
                               f"{result.stderr.strip()}")
        return result.stdout

    def new_lun(self, name: str, size: int, pattern: bytes = b"", *, chap: bool = False,
                userinfo: str | None = None) -> tuple[str, Path]:
        """Create a fresh target whose LUN 1 is backed by a new file.

        :param chap: require the CHAP account :data:`CHAP_USER`.
        :param userinfo: what goes before ``@`` in the location (default:
            the CHAP account when ``chap``, nothing otherwise).
        :returns: its ``iscsi://`` location and the backing file.
        """
        tid = next(self._next)
        slug = re.sub(r"[^a-z0-9.-]+", "-", name.lower())
        iqn = f"{IQN_PREFIX}:{tid}-{slug}"
        path = self.root / f"lun-{tid}-{slug}.img"
        fill_target(path, size, pattern)
        self.tgtadm("--lld", "iscsi", "--mode", "target", "--op", "new", "--tid", str(tid),
                    "--targetname", iqn)
        self.tids.append(tid)
        self.tgtadm("--lld", "iscsi", "--mode", "logicalunit", "--op", "new", "--tid",
                    str(tid), "--lun", "1", "--backing-store", str(path))
        self.tgtadm("--lld", "iscsi", "--mode", "target", "--op", "bind", "--tid", str(tid),
                    "--initiator-address", "127.0.0.1")
        if chap:
            self.tgtadm("--lld", "iscsi", "--mode", "account", "--op", "bind", "--tid",
                        str(tid), "--user", CHAP_USER)
        if userinfo is None:
            userinfo = f"{CHAP_USER}%{CHAP_PASSWORD}" if chap else ""
        at = f"{userinfo}@" if userinfo else ""
        return f"iscsi://{at}127.0.0.1:{self.port}/{iqn}/1", path


def _require_qemu_iscsi() -> None:
    """Skip unless QEMU has its libiscsi block driver (a module Debian ships
    apart, in ``qemu-block-extra``). Probed against a closed port of
    127.0.0.1: a missing driver says so before any connection."""
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    result = subprocess.run(
        [_tool("qemu-img"), "info", "--image-opts",
         f"driver=raw,file.driver=iscsi,file.portal=127.0.0.1:{port},file.target=iqn.x:y,"
         "file.lun=1"], capture_output=True, text=True, timeout=TIMEOUT, check=False)
    if "Unknown driver 'iscsi'" in result.stderr:
        pytest.skip("QEMU's iSCSI block driver is not installed "
                    "(apt-get install qemu-block-extra)")


def _start_tgtd(root: Path) -> ISCSIServer:
    env = dict(os.environ, TGT_IPC_SOCKET=str(root / "tgtd.ipc"))
    argv = [_tool("setpriv"), "--pdeathsig", "KILL", "--", _tool("tgtd"), "-f",
            "--iscsi", "portal=127.0.0.1:0"]
    if os.geteuid() != 0:  # see the module docstring: tgtadm must be uid 0 to tgtd
        argv = [_tool("unshare"), "--user", "--map-root-user", *argv]
    log = open(root / "tgtd.log", "wb")  # noqa: SIM115 - closed below
    try:
        process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=log)
    finally:
        log.close()
    server = ISCSIServer(root=root, port=0, env=env, process=process)
    deadline = time.monotonic() + TIMEOUT
    try:
        while True:
            if process.poll() is not None:
                output = (root / "tgtd.log").read_text(errors="replace")
                if "unshare" in argv[0]:
                    pytest.skip(f"tgtd cannot run in a user namespace here: {output[-300:]}")
                raise RuntimeError(f"tgtd exited with {process.returncode}: {output}")
            if (root / "tgtd.ipc.0").exists():
                portals = server.tgtadm("--lld", "iscsi", "--mode", "portal", "--op", "show")
                match = re.search(r"^Portal: 127\.0\.0\.1:(\d+),", portals, re.MULTILINE)
                if match is None or re.search(r"^Portal: (?!127\.0\.0\.1:)", portals,
                                              re.MULTILINE):
                    raise RuntimeError(f"tgtd listens on unexpected portals: {portals}")
                server.port = int(match[1])
                return server
            if time.monotonic() > deadline:
                raise RuntimeError(f"tgtd did not start within {TIMEOUT} s")
            time.sleep(0.01)
    except BaseException:
        _stop_tgtd(server)
        raise


def _stop_tgtd(server: ISCSIServer) -> None:
    if server.process.poll() is None:
        try:
            for tid in server.tids:
                server.tgtadm("--lld", "iscsi", "--mode", "target", "--op", "delete",
                              "--force", "--tid", str(tid))
            server.tgtadm("--mode", "system", "--op", "delete")
            server.process.wait(timeout=TIMEOUT)
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
    if server.process.poll() is None:
        server.process.kill()  # it ignores SIGTERM
    server.process.wait(timeout=TIMEOUT)


@pytest.fixture(scope="module")
def iscsi_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ISCSIServer]:
    """tgtd with its portal on 127.0.0.1 (kernel-chosen port) and the CHAP
    account :data:`CHAP_USER`; targets are added with
    :meth:`ISCSIServer.new_lun`."""
    _require_qemu_iscsi()
    root = tmp_path_factory.mktemp("iscsi")
    server = _start_tgtd(root)
    try:
        server.tgtadm("--lld", "iscsi", "--mode", "account", "--op", "new", "--user",
                      CHAP_USER, "--password", CHAP_PASSWORD)
        yield server
    finally:
        _stop_tgtd(server)
