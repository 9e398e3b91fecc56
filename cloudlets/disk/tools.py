"""Host tools the disk stage runs, found and run in one place.

Every external program the disk stage needs is listed in :data:`TOOLS` with the
Debian package that ships it, so a missing tool is reported as a
:class:`~cloudlets.errors.ConfigurationError` that says what to install, and a
failing tool as a :class:`~cloudlets.errors.DiskError` that names the tool,
its exit code and the tail of its standard error.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from cloudlets.errors import ConfigurationError, DiskError

__all__ = [
    "GRUB_I386_PC_DIR",
    "GRUB_X86_64_EFI_DIR",
    "TOOLS",
    "e2fsprogs_version",
    "find_tool",
    "finish",
    "grub_platform_dir",
    "read_position",
    "run",
    "start",
    "tool_environment",
    "unsynced",
]

#: Tool name -> Debian package that provides it.
TOOLS: Mapping[str, str] = {
    "debugfs": "e2fsprogs",
    "dumpe2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "e2image": "e2fsprogs",
    "mke2fs": "e2fsprogs",
    "sfdisk": "fdisk",
    "grub-mkimage": "grub-common",
    "mkfs.fat": "dosfstools",
    "mcopy": "mtools",
    "mdir": "mtools",
    "mmd": "mtools",
    "mtype": "mtools",
}

#: GRUB platform directories and the Debian packages that ship them.
GRUB_I386_PC_DIR = Path("/usr/lib/grub/i386-pc")
GRUB_X86_64_EFI_DIR = Path("/usr/lib/grub/x86_64-efi")
_GRUB_PACKAGES: Mapping[Path, str] = {
    GRUB_I386_PC_DIR: "grub-pc-bin",
    GRUB_X86_64_EFI_DIR: "grub-efi-amd64-bin",
}

#: How many characters of a failing tool's standard error a DiskError quotes.
STDERR_TAIL = 800

_SBIN_DIRS = ("/usr/sbin", "/sbin")


@functools.cache
def find_tool(name: str) -> str:
    """Return the absolute path of a host tool.

    ``/usr/sbin`` and ``/sbin`` are searched after ``PATH`` because an
    unprivileged user's ``PATH`` on Debian does not include them, though
    ``mke2fs`` and ``debugfs`` live there and work without root.

    :param name: the program name, a key of :data:`TOOLS`.
    :returns: the absolute path of the program.
    :raises ConfigurationError: the program is not installed; the message names
        the Debian package to install.
    """
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(_SBIN_DIRS))
    if path is None:
        package = TOOLS.get(name, "?")
        raise ConfigurationError(
            f"the disk stage needs {name!r}, which is not installed: apt-get install {package}"
        )
    return path


#: Where Debian's ``libeatmydata1`` installs the library, by soname.
EATMYDATA = "libeatmydata.so.1"


@functools.cache
def _eatmydata() -> str | None:
    """The path of libeatmydata, or ``None`` when it is not installed."""
    for directory in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                      "/usr/lib"):
        candidate = Path(directory) / EATMYDATA
        if candidate.is_file():
            return os.fspath(candidate)
    return None


def unsynced(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment in which a tool's ``fsync`` calls do nothing, for
    tools that work on an intermediate file the caller throws away or
    stores elsewhere (which then makes its own copy durable).

    debugfs fsyncs the image it opened when it exits, even read-only: on a
    disk image just filled with a 316 MB copy of the base filesystem that is
    0.14-0.17 s of writing to the medium for a file deleted a moment later.
    Debian's ``eatmydata`` (``LD_PRELOAD`` of libeatmydata, made to run
    tools on throwaway data) turns those calls into no-ops. Without it the
    tools run as they are, only slower.

    :param env: the environment to extend (``os.environ`` if ``None``).
    :returns: a copy, with libeatmydata first in ``LD_PRELOAD`` when installed.
    """
    result = dict(os.environ if env is None else env)
    library = _eatmydata()
    if library is not None:
        preload = result.get("LD_PRELOAD", "")
        result["LD_PRELOAD"] = f"{library} {preload}".strip()
    return result


def grub_platform_dir(directory: Path) -> Path:
    """Check that a GRUB platform directory (modules and images) is installed.

    :param directory: :data:`GRUB_I386_PC_DIR` or :data:`GRUB_X86_64_EFI_DIR`.
    :returns: ``directory``.
    :raises ConfigurationError: the directory is missing; the message names the
        Debian package to install.
    """
    if not (directory / "moddep.lst").is_file():
        package = _GRUB_PACKAGES.get(directory, "grub-common")
        raise ConfigurationError(
            f"the disk stage needs GRUB modules in {directory}, which are not installed: "
            f"apt-get install {package}"
        )
    return directory


def tool_environment(
    timestamp: int, mke2fs_config: Path | None = None, *, e2fsprogs: bool = False
) -> dict[str, str]:
    """Return an environment that pins the tools' clocks and locale.

    ``E2FSPROGS_FAKE_TIME`` fixes the times mke2fs and debugfs write into the
    filesystem, ``SOURCE_DATE_EPOCH`` the ones mtools writes into FAT
    directory entries, and ``MKE2FS_CONFIG`` points at our own profile so the
    host's ``/etc/mke2fs.conf`` cannot change the filesystem we make.

    :param timestamp: seconds since the epoch to use as "now".
    :param mke2fs_config: the mke2fs profile to use, if any.
    :param e2fsprogs: the environment is for mke2fs or debugfs: drop
        ``SOURCE_DATE_EPOCH``, which e2fsprogs >= 1.47.1 would also use to
        clamp the tree's own mtimes (we keep those exactly).
    :returns: a copy of ``os.environ`` with those variables set.
    """
    env = dict(os.environ)
    env.update(
        {
            # e2fsprogs takes a fake time of 0 as none and stamps the real clock:
            # a clock of 0 (the epoch, SOURCE_DATE_EPOCH=0) is pinned one second on
            "E2FSPROGS_FAKE_TIME": str(max(timestamp, 1)),
            "SOURCE_DATE_EPOCH": str(timestamp),
            "MTOOLS_SKIP_CHECK": "1",
            "LC_ALL": "C",
            "TZ": "UTC",
        }
    )
    if mke2fs_config is not None:
        env["MKE2FS_CONFIG"] = os.fspath(mke2fs_config)
    if e2fsprogs:
        del env["SOURCE_DATE_EPOCH"]
        # libarchive (mke2fs -d tar) converts member names to the locale's
        # charset: in plain C, any UTF-8 name fails the whole build.
        env["LC_ALL"] = "C.UTF-8"
    return env


def run(
    name: str,
    args: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdin_data: bytes | None = None,
    check_stderr: str | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a host tool and fail loudly.

    :param name: the program, a key of :data:`TOOLS`; looked up with :func:`find_tool`.
    :param args: its arguments (without the program name).
    :param env: the environment; the caller's environment if ``None``.
    :param cwd: the working directory.
    :param stdin_data: bytes fed to its standard input.
    :param check_stderr: a regular expression; if it matches standard error the
        run counts as failed even with exit code 0 (debugfs reports errors in
        scripts this way).
    :returns: the completed process, with standard output and error captured.
    :raises ConfigurationError: the program is not installed.
    :raises DiskError: the program exited non-zero (or ``check_stderr`` matched);
        the message names the program, its exit code and its stderr tail.
    """
    proc = start(name, args, env=env, cwd=cwd, stdin_data=stdin_data is not None)
    stdout, stderr = proc.communicate(stdin_data)
    return _judge(name, proc, stdout, stderr, check_stderr)


def start(
    name: str,
    args: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    stdin_data: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a host tool in the background; collect it with :func:`finish`.

    :param name: the program, a key of :data:`TOOLS`.
    :param args: its arguments.
    :param env: the environment; the caller's if ``None``.
    :param cwd: the working directory.
    :param stdin_data: open a pipe to its standard input.
    :returns: the running process, its output captured.
    :raises ConfigurationError: the program is not installed.
    :raises DiskError: it could not be started.
    """
    argv = [find_tool(name), *(os.fspath(a) for a in args)]
    try:
        return subprocess.Popen(
            argv,
            env=None if env is None else dict(env),
            cwd=cwd,
            stdin=subprocess.PIPE if stdin_data else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
    except OSError as exc:
        raise DiskError(f"{name} could not be started: {exc}") from exc


def finish(name: str, proc: subprocess.Popen[bytes], *,
           while_running: Callable[[], None] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Wait for a tool started with :func:`start` and fail loudly.

    :param name: the program's name, for the error message.
    :param proc: the process.
    :param while_running: called every :data:`POLL_INTERVAL` seconds while
        the tool runs (its output is collected meanwhile).
    :returns: the completed process.
    :raises DiskError: it exited non-zero; the message names it, its exit code
        and its stderr tail.
    """
    while True:
        try:
            stdout, stderr = proc.communicate(
                timeout=None if while_running is None else POLL_INTERVAL)
            break
        except subprocess.TimeoutExpired:  # retrying loses no output
            assert while_running is not None
            while_running()
    return _judge(name, proc, stdout, stderr, None)


#: Seconds between two :func:`finish` ``while_running`` calls.
POLL_INTERVAL = 0.2


def read_position(pid: int, path: Path) -> int | None:
    """Where the running process ``pid`` reads the file ``path``, from
    Linux's ``/proc/PID/fdinfo`` (a process of the same user may read it).

    :returns: the offset of its first descriptor open on ``path``, or
        ``None`` when it has none or ``/proc`` cannot tell.
    """
    target = os.fspath(path.resolve())
    fds = Path(f"/proc/{pid}/fd")
    try:
        for link in fds.iterdir():
            try:
                if os.readlink(link) != target:
                    continue
                info = (fds.parent / "fdinfo" / link.name).read_text()
            except OSError:
                continue
            for line in info.splitlines():
                key, _, value = line.partition(":")
                if key == "pos" and value.strip().isdigit():
                    return int(value)
    except OSError:
        return None
    return None


def _judge(
    name: str,
    proc: subprocess.Popen[bytes],
    stdout: bytes,
    stderr_bytes: bytes,
    check_stderr: str | None,
) -> subprocess.CompletedProcess[bytes]:
    stderr = stderr_bytes.decode("utf-8", "replace")
    failed = proc.returncode != 0
    if not failed and check_stderr is not None and re.search(check_stderr, stderr, re.MULTILINE):
        failed = True
    if failed:
        output = stderr.strip() or stdout.decode("utf-8", "replace").strip()
        tail = output[-STDERR_TAIL:]
        raise DiskError(f"{name} failed with exit code {proc.returncode}: {tail}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr_bytes)


@functools.cache
def e2fsprogs_version() -> tuple[int, ...]:
    """Return the version of the installed mke2fs, e.g. ``(1, 47, 2)``.

    :returns: the version as a tuple of integers.
    :raises ConfigurationError: mke2fs is not installed.
    :raises DiskError: its version could not be read.
    """
    proc = subprocess.run(
        [find_tool("mke2fs"), "-V"], capture_output=True, check=False, stdin=subprocess.DEVNULL
    )
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    match = re.search(r"mke2fs (\d+)\.(\d+)(?:\.(\d+))?", text)
    if match is None:
        raise DiskError(f"mke2fs -V printed no version: {text.strip()[-STDERR_TAIL:]}")
    return tuple(int(part or 0) for part in match.groups())
