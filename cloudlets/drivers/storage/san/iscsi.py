"""iSCSI LUNs through ``qemu-nbd``: :class:`ISCSIBridge` starts it on a
private Unix socket, :class:`BridgedTarget` is the NBD client on it."""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

from cloudlets.drivers.storage.san.nbd import NBDTarget
from cloudlets.drivers.storage.san.target import Target
from cloudlets.errors import CloudletsError, ConfigurationError, StorageError
from cloudlets.tools import find_tool

__all__ = ["ISCSI_PORT", "BridgedTarget", "ISCSIBridge", "ISCSILocation"]

#: The IANA port of iSCSI.
ISCSI_PORT = 3260


class ISCSIBridge:
    """``qemu-nbd`` exporting an iSCSI LUN on a private Unix socket.

    ``qemu-nbd`` listens before it logs in to the target, and exits when
    the login fails: :meth:`connect` retries while the socket is not
    listening yet and reports ``qemu-nbd``'s own error when the handshake
    ends early. The CHAP password lives in a mode-0600 file in a private
    directory, removed as soon as the login succeeded.
    """

    def __init__(self, target: ISCSILocation, shown: str) -> None:
        self._shown = shown
        qemu_nbd = find_tool("qemu-nbd")
        self._dir = tempfile.TemporaryDirectory(prefix="cloudlets-iscsi-")
        self.socket = os.path.join(self._dir.name, "nbd.sock")
        self._secret: str | None = None
        host = f"[{target.host}]" if ":" in target.host else target.host
        opts = ["driver=raw", "file.driver=iscsi", "file.transport=tcp",
                f"file.portal={_qemu_escape(f'{host}:{target.port}')}",
                f"file.target={_qemu_escape(target.iqn)}", f"file.lun={target.lun}"]
        argv = [qemu_nbd, "--socket", self.socket, "--cache=none",
                "--aio=threads", "--discard=ignore"]
        if target.initiator:
            opts.append(f"file.initiator-name={_qemu_escape(target.initiator)}")
        self._process: subprocess.Popen[bytes] | None = None
        try:
            if target.user is not None:
                self._secret = os.path.join(self._dir.name, "password")
                fd = os.open(self._secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                             0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write((target.password or "").encode())
                argv += ["--object", f"secret,id=iscsipw,file={_qemu_escape(self._secret)}"]
                opts += [f"file.user={_qemu_escape(target.user)}",
                         "file.password-secret=iscsipw"]
            argv += ["--image-opts", ",".join(opts)]
            self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except BaseException:
            self._stop()
            raise

    def connect(self, timeout: float) -> NBDTarget:
        """Connect the NBD client once ``qemu-nbd`` listens and has logged in.

        :param timeout: seconds for both, and then for each request.
        :raises StorageError: naming the target and ``qemu-nbd``'s error.
        :raises ConfigurationError: when QEMU lacks its iSCSI block driver.
        """
        assert self._process is not None
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.socket)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()  # not listening yet
            except OSError as exc:
                sock.close()
                raise self._failure(exc.strerror or str(exc)) from None
            if self._process.poll() is not None:
                raise self._failure("qemu-nbd exited")
            if time.monotonic() > deadline:
                raise self._failure(f"qemu-nbd did not listen within {timeout:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        # the handshake waits for the iSCSI login: bound both by the deadline
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            client = NBDTarget(sock, "", self._shown)
        except StorageError:
            if time.monotonic() >= deadline:
                raise self._failure(f"no answer within {timeout:g} s",
                                    quote_stderr=False) from None
            try:  # it closed the connection: it is exiting, with its reason on stderr
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            raise self._failure("qemu-nbd closed the connection") from None
        sock.settimeout(timeout)
        if self._secret is not None:  # read at start-up: no longer needed on disk
            os.unlink(self._secret)
            self._secret = None
        return client

    def _failure(self, reason: str, *, quote_stderr: bool = True) -> CloudletsError:
        error = self._stop()
        if "Unknown driver 'iscsi'" in error:
            return ConfigurationError("iSCSI targets need QEMU's libiscsi block driver, "
                                      "which is not installed: apt-get install "
                                      "qemu-block-extra")
        # qemu-nbd quotes its option string: long, and no help to the reader
        error = re.sub(r"'driver=raw,file\.driver=iscsi[^']*'", "the LUN", error)
        detail = error if error and quote_stderr else reason
        return StorageError(f"cannot reach iSCSI target {self._shown}: {detail}", self._shown)

    def _stop(self) -> str:
        error = ""
        process = self._process
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
            assert process.stderr is not None
            error = process.stderr.read().decode("utf-8", "replace").strip()
            process.stderr.close()
            self._process = None
        self._dir.cleanup()
        return error[-400:]

    def close(self) -> None:
        self._stop()


def _qemu_escape(value: str) -> str:
    """Escape a value for QEMU's ``key=value,...`` option syntax."""
    return value.replace(",", ",,")


@dataclass(frozen=True)
class ISCSILocation:
    host: str
    port: int
    iqn: str
    lun: int
    user: str | None
    password: str | None
    initiator: str | None


class BridgedTarget(Target):
    """An NBD client on a bridge that must be stopped with it."""

    def __init__(self, client: NBDTarget, bridge: ISCSIBridge) -> None:
        self._client = client
        self._bridge = bridge
        self.size = client.size
        self.shown = client.shown

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self._client.write(data, offset)

    def read(self, length: int, offset: int) -> bytes:
        return self._client.read(length, offset)

    def hash_range(self, digest: hashlib._Hash, start: int, end: int, block: int) -> None:
        self._client.hash_range(digest, start, end, block)

    def flush_and_hash(self, digest: hashlib._Hash, start: int, end: int, block: int) -> None:
        self._client.flush_and_hash(digest, start, end, block)

    def flush(self) -> None:
        self._client.flush()

    def close(self) -> None:
        try:
            self._client.close()
        finally:
            self._bridge.close()
