"""Host tools, found and run in one place.

Every external program cloudlets runs is listed in :data:`TOOLS` with the
Debian package that ships it: a missing tool is a
:class:`~cloudlets.errors.ConfigurationError` that says what to install, a
failing one an error of the caller's choosing (``FormatError``,
``StorageError``...) naming the tool, its exit code and its stderr tail.
"""

from __future__ import annotations

import functools
import os
import re
import selectors
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from cloudlets.errors import CloudletsError, ConfigurationError

__all__ = ["STDERR_TAIL", "TOOLS", "find_tool", "run", "run_streaming"]

#: Tool name → Debian package that provides it.
TOOLS: dict[str, str] = {
    "debugfs": "e2fsprogs",
    "grub-mkimage": "grub-common",
    "mcopy": "mtools",
    "mdir": "mtools",
    "mke2fs": "e2fsprogs",
    "mkfs.fat": "dosfstools",
    "mmd": "mtools",
    "nbdkit": "nbdkit",
    "qemu-img": "qemu-utils",
    "qemu-nbd": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "tgtadm": "tgt",
    "tgtd": "tgt",
    "xmllint": "libxml2-utils",
}

#: How many characters of a failing tool's standard error an error quotes.
STDERR_TAIL = 800

_SBIN_DIRS = ("/usr/sbin", "/sbin")


@functools.cache
def find_tool(name: str) -> str:
    """:returns: the absolute path of a host tool. ``/usr/sbin`` and
    ``/sbin`` are searched after ``PATH``: an unprivileged user's ``PATH``
    on Debian lacks them, though mke2fs and debugfs there work without root.

    :raises ConfigurationError: naming the Debian package to install.
    """
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))
    if path is None:
        package = TOOLS.get(name, name)
        raise ConfigurationError(
            f"cloudlets needs {name!r}, which is not installed: apt-get install {package}")
    return path


def run(name: str, args: Sequence[str | os.PathLike[str]], *,
        error: type[CloudletsError], env: Mapping[str, str] | None = None,
        cwd: Path | None = None, input: bytes | None = None,  # noqa: A002
        timeout: float | None = None,
        check_stderr: str | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run a host tool and fail loudly.

    :param name: the program, looked up with :func:`find_tool`.
    :param args: its arguments.
    :param error: the error class to raise when it fails.
    :param env: the environment (the caller's if ``None``).
    :param cwd: the working directory.
    :param input: bytes for its standard input.
    :param timeout: seconds before it is killed.
    :param check_stderr: a regular expression that marks a run failed even
        with exit code 0 (debugfs reports script errors this way).
    :returns: the completed process, output captured.
    :raises ConfigurationError: the program is not installed.
    :raises CloudletsError: of class ``error`` when it fails.
    """
    argv = [find_tool(name), *(os.fspath(a) for a in args)]
    try:
        proc = subprocess.run(argv, env=None if env is None else dict(env), cwd=cwd,
                              input=input,
                              stdin=None if input is not None else subprocess.DEVNULL,
                              capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise error(f"{name} did not finish within {timeout} s") from None
    except OSError as exc:
        raise error(f"{name} could not be started: {exc}") from exc
    stderr = proc.stderr.decode("utf-8", "replace")
    failed = proc.returncode != 0
    if not failed and check_stderr is not None \
            and re.search(check_stderr, stderr, re.MULTILINE):
        failed = True
    if failed:
        tail = stderr.strip()[-STDERR_TAIL:] \
            or proc.stdout.decode("utf-8", "replace")[-STDERR_TAIL:]
        raise error(f"{name} failed with exit code {proc.returncode}: {tail}")
    return proc


#: Bytes read from a streamed tool's pipes at a time.
_READ_SIZE = 4096


def run_streaming(name: str, args: Sequence[str | os.PathLike[str]], *,
                  error: type[CloudletsError], on_stdout: Callable[[bytes], None],
                  env: Mapping[str, str] | None = None, cwd: Path | None = None,
                  timeout: float | None = None) -> None:
    """Run a host tool as :func:`run` does, handing its standard output to
    ``on_stdout`` as it arrives instead of collecting it (``qemu-img convert
    -p`` prints its progress there). Only the last :data:`STDERR_TAIL`
    characters of standard error are kept, for the error.

    :param name: the program, looked up with :func:`find_tool`.
    :param args: its arguments.
    :param error: the error class to raise when it fails.
    :param on_stdout: called with each chunk (at most 4 KiB) of standard
        output, in order, on the calling thread.
    :param env: the environment (the caller's if ``None``).
    :param cwd: the working directory.
    :param timeout: seconds before it is killed.
    :raises ConfigurationError: the program is not installed.
    :raises CloudletsError: of class ``error`` when it fails or times out.
    """
    argv = [find_tool(name), *(os.fspath(a) for a in args)]
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        proc = subprocess.Popen(argv, env=None if env is None else dict(env), cwd=cwd,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except OSError as exc:
        raise error(f"{name} could not be started: {exc}") from exc
    assert proc.stdout is not None and proc.stderr is not None
    stderr = bytearray()
    last_stdout = bytearray()
    try:
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            selector.register(proc.stderr, selectors.EVENT_READ)
            while selector.get_map():
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    raise error(f"{name} did not finish within {timeout} s")
                for key, _ in selector.select(wait):
                    data = os.read(key.fd, _READ_SIZE)
                    if not data:
                        selector.unregister(key.fileobj)
                    elif key.fileobj is proc.stderr:
                        stderr += data
                        del stderr[:-4 * STDERR_TAIL]  # bounded: the tail only
                    else:
                        last_stdout[:] = (last_stdout + data)[-4 * STDERR_TAIL:]
                        on_stdout(data)
        wait = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            code = proc.wait(wait)
        except subprocess.TimeoutExpired:
            raise error(f"{name} did not finish within {timeout} s") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    if code != 0:
        text = stderr.decode("utf-8", "replace").strip()[-STDERR_TAIL:] \
            or last_stdout.decode("utf-8", "replace").strip()[-STDERR_TAIL:]
        raise error(f"{name} failed with exit code {code}: {text}")
