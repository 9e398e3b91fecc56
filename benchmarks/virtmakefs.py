"""Set up ``virt-make-fs`` (libguestfs) for ``bench_disk.py``: package, kernel, appliance.

libguestfs runs its tools in a small appliance VM that supermin builds from
the host's own packages and kernel. On this kind of machine three things are
missing, and :func:`setup` supplies them:

* the tools: Debian ``libguestfs-tools``, installed with ``apt-get`` when
  running as root (otherwise :class:`Unavailable` names the package);
* a kernel: when ``/boot`` has no ``vmlinuz-*`` with its ``/lib/modules``
  directory, the kernel package the test suite boots is taken the way it
  takes it (:mod:`cloudlets.testing.boot`: ``apt-get download`` into its
  ``.deb`` cache), unpacked with ``dpkg-deb -x`` under
  ``<workdir>/libguestfs/kernel-<version>`` (with ``depmod -b`` run on it:
  the package ships no ``modules.dep``) and named to supermin by
  ``SUPERMIN_KERNEL``, ``SUPERMIN_MODULES`` and ``SUPERMIN_KERNEL_VERSION``.
  supermin also reads the host's ``/lib/modules`` directory itself; as
  root an empty one is created when there is none;
* working KVM: none here, so ``LIBGUESTFS_BACKEND=direct`` and
  ``LIBGUESTFS_BACKEND_SETTINGS=force_tcg`` (QEMU's software emulation).

The appliance is cached in ``LIBGUESTFS_CACHEDIR=<workdir>/libguestfs/cache``.
:func:`setup` ends with ``libguestfs-test-tool``, which builds the appliance
when it is not cached and boots it: the warm-up, so a measured
``virt-make-fs`` finds the appliance built (supermin's check that the cached
appliance is current is part of every run, as for any user of the tool).
The check's success is remembered in a stamp file keyed by the libguestfs,
supermin and kernel versions. The appliance has no network device (the
default, ``--network`` off): nothing leaves the machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

#: The Debian package that has ``virt-make-fs`` and ``libguestfs-test-tool``.
PACKAGE = "libguestfs-tools"
#: Seconds ``libguestfs-test-tool`` may take (an appliance build and a TCG boot).
CHECK_TIMEOUT = 900
#: The environment every libguestfs run of the benchmark gets (with the kernel's).
BACKEND = {"LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}


class Unavailable(Exception):
    """virt-make-fs cannot run here; the message says why (shown as the skip reason)."""


def home(workdir: Path) -> Path:
    """Everything libguestfs gets from the benchmark lives here."""
    return workdir / "libguestfs"


def host_kernel() -> tuple[Path, Path] | None:
    """A ``/boot/vmlinuz-*`` readable by this user whose modules are installed, or None."""
    for kernel in sorted(Path("/boot").glob("vmlinuz-*"), reverse=True):
        modules = Path("/lib/modules") / kernel.name.removeprefix("vmlinuz-")
        if os.access(kernel, os.R_OK) and modules.is_dir():
            return kernel, modules
    return None


def unpacked_kernel(workdir: Path) -> tuple[Path, Path] | None:
    """The kernel :func:`setup` unpacked under the workdir: (vmlinuz, modules), or None."""
    for kernel_dir in sorted(home(workdir).glob("kernel-*"), reverse=True):
        version = kernel_dir.name.removeprefix("kernel-")
        kernel = kernel_dir / "boot" / f"vmlinuz-{version}"
        modules = kernel_dir / "lib" / "modules" / version
        if kernel.is_file() and (modules / "modules.dep").is_file():
            return kernel, modules
    return None


def environment(workdir: Path) -> dict[str, str]:
    """The variables a ``virt-make-fs`` run needs, once :func:`setup` has run.

    :raises Unavailable: there is no kernel for the appliance.
    """
    env = dict(BACKEND, LIBGUESTFS_CACHEDIR=str(home(workdir) / "cache"))
    if host_kernel() is not None:
        return env  # supermin finds it itself
    found = unpacked_kernel(workdir)
    if found is None:
        raise Unavailable("no kernel for the appliance in /boot; run setup() first")
    kernel, modules = found
    return dict(env, SUPERMIN_KERNEL=str(kernel), SUPERMIN_MODULES=str(modules),
                SUPERMIN_KERNEL_VERSION=modules.name)


def _run(args: list[str], what: str, env: dict[str, str] | None = None) -> str:
    try:
        proc = subprocess.run(args, capture_output=True, text=True, env=env, check=False)
    except FileNotFoundError as exc:
        raise Unavailable(f"{what}: {args[0]} not found") from exc
    if proc.returncode:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines() or ["?"]
        raise Unavailable(f"{what} failed ({proc.returncode}): {lines[-1]}")
    return proc.stdout


def install() -> None:
    """Install :data:`PACKAGE` when ``virt-make-fs`` is missing and this is root.

    :raises Unavailable: not root, or ``apt-get`` failed.
    """
    if shutil.which("virt-make-fs") and shutil.which("libguestfs-test-tool"):
        return
    if os.geteuid() != 0:
        raise Unavailable(f"not installed (as root: apt-get install {PACKAGE})")
    print(f"virt-make-fs: installing {PACKAGE} ...", flush=True)
    _run(["apt-get", "install", "-y", "--no-install-recommends",
          "-o", "DPkg::Lock::Timeout=900", PACKAGE], f"apt-get install {PACKAGE}",
         env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def unpack_kernel(workdir: Path) -> tuple[Path, Path]:
    """Unpack the test suite's kernel package under the workdir (once).

    :returns: (vmlinuz, modules directory).
    :raises Unavailable: apt cannot name or fetch it, or it does not unpack.
    """
    # imported here, not at the top: bench_disk.py's render times its own
    # import of cloudlets, so its process must not have imported it before
    from cloudlets.testing.boot import (
        FixtureUnavailable,
        _download,
        _kernel_package,
        _package_version,
        cache_dir,
    )

    try:
        package = _kernel_package()
        version = _package_version(package)
        deb = _download(package, version, cache_dir() / "debs")
    except FixtureUnavailable as exc:
        raise Unavailable(f"no kernel for the appliance: {exc}") from exc
    release = package.removeprefix("linux-image-")
    kernel_dir = home(workdir) / f"kernel-{release}"
    if not (kernel_dir / "lib" / "modules" / release / "modules.dep").is_file():
        for stale in home(workdir).glob("kernel-*"):
            shutil.rmtree(stale)
        partial = home(workdir) / f"partial-kernel-{os.getpid()}"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        print(f"virt-make-fs: unpacking {deb.name} for the appliance ...", flush=True)
        _run(["dpkg-deb", "-x", str(deb), str(partial)], f"dpkg-deb -x {deb.name}")
        _run(["depmod", "-b", str(partial), release], "depmod")
        partial.rename(kernel_dir)
    found = unpacked_kernel(workdir)
    if found is None:
        raise Unavailable(f"{deb.name} has no boot/vmlinuz-{release}")
    return found


def _versions(env: dict[str, str]) -> str:
    """What the appliance is built from: the stamp's key."""
    packages = _run(["dpkg-query", "-W", "-f", "${Package}=${Version} ",
                     "libguestfs0", "supermin"], "dpkg-query")
    found = host_kernel()
    kernel = env.get("SUPERMIN_KERNEL") or (str(found[0]) if found else "")
    return f"{packages.strip()} kernel={kernel}\n"


def appliance_id(env: dict[str, str]) -> int | None:
    """The cached appliance's identity (its root file's inode), or None when there is none.

    supermin builds an appliance into a new directory renamed over the old
    one, so a change across a measured run means the run built it (the files'
    times are no sign: libguestfs touches them on every launch).
    """
    roots = sorted(Path(env["LIBGUESTFS_CACHEDIR"]).glob(".guestfs-*/appliance.d/root"))
    return max((root.stat().st_ino for root in roots), default=None)


def check(workdir: Path, env: dict[str, str]) -> float | None:
    """Boot the appliance with ``libguestfs-test-tool`` (building it first when not cached).

    :returns: the seconds it took, or None when the stamp says it passed before.
    :raises Unavailable: the appliance did not boot (the last line of the tool's output).
    """
    stamp = home(workdir) / "test-tool.ok"
    key = _versions(env)
    cached = Path(env["LIBGUESTFS_CACHEDIR"])
    if stamp.is_file() and stamp.read_text() == key and appliance_id(env) is not None:
        return None
    cached.mkdir(parents=True, exist_ok=True)  # libguestfs refuses a cache dir that is not there
    print("virt-make-fs: libguestfs-test-tool (builds and boots the appliance) ...", flush=True)
    started = time.perf_counter()
    log = home(workdir) / "test-tool.log"
    with open(log, "w") as out:
        try:
            proc = subprocess.run(["libguestfs-test-tool"], env=dict(os.environ, **env),
                                  stdin=subprocess.DEVNULL, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=CHECK_TIMEOUT, check=False)
        except subprocess.TimeoutExpired as exc:
            raise Unavailable(f"appliance did not boot in {CHECK_TIMEOUT} s (see {log})") from exc
    if proc.returncode:
        errors = [line for line in log.read_text(errors="replace").splitlines()
                  if "error" in line.lower()] or ["?"]
        raise Unavailable(f"appliance does not boot: {errors[-1].strip()} (see {log})")
    stamp.write_text(key)
    return time.perf_counter() - started


def setup(workdir: Path) -> dict[str, str]:
    """Make ``virt-make-fs`` runnable here and its appliance built; see the module's text.

    :param workdir: the benchmark's workdir (kernel, appliance cache, log, stamp).
    :returns: the environment variables for :func:`environment`'s runs.
    :raises Unavailable: it cannot run here; the message is the reason.
    """
    install()
    home(workdir).mkdir(parents=True, exist_ok=True)
    if host_kernel() is None:
        if unpacked_kernel(workdir) is None:  # apt is asked only the first time
            unpack_kernel(workdir)
        if not Path("/lib/modules").is_dir():
            # supermin reads the host's /lib/modules even when told another tree
            if os.geteuid() != 0:
                raise Unavailable("supermin needs a /lib/modules directory (as root: mkdir)")
            Path("/lib/modules").mkdir(parents=True)
    env = environment(workdir)
    seconds = check(workdir, env)
    if seconds is not None:
        print(f"virt-make-fs: appliance boots ({seconds:.0f} s, build included)", flush=True)
    return env


if __name__ == "__main__":
    for name, value in setup(Path(sys.argv[1] if len(sys.argv) > 1 else
                                  "/var/tmp/cloudlets-bench").resolve()).items():
        print(f"{name}={value}")
