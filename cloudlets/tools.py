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
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

from cloudlets.errors import CloudletsError, ConfigurationError

__all__ = ["STDERR_TAIL", "TOOLS", "find_tool", "run"]

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
