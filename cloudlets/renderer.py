"""The render pipeline, and nothing else.

Data flows one way: manifest and config in; fetch → verified tarball; rootfs
→ a filtered file tree; templates → the rendered tree; disk → a raw image;
format driver → output files; storage driver → stored artifacts; publish →
an image id. Each stage lives in its own module; only this one knows the
order.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypedDict

from cloudlets.cache import CacheEntry, TarballCache
from cloudlets.config import Presets, RenderConfig, resolve_config
from cloudlets.drivers.base import (
    DiskImage,
    FormatContext,
    FormatDriver,
    OutputFile,
    StorageDriver,
    StoredArtifact,
)
from cloudlets.drivers.providers import get_driver
from cloudlets.drivers.types import DriverKind, FormatCapability, StorageCapability
from cloudlets.errors import (
    CloudletsError,
    ConfigurationError,
    FormatError,
    RenderError,
    StorageError,
)
from cloudlets.fetch import DownloadRestarted, Fetcher, UrlPolicy
from cloudlets.manifest import Manifest
from cloudlets.mirrors import MirrorRules
from cloudlets.paths import default_cache_dir, default_data_dir
from cloudlets.progress import ProgressCallback
from cloudlets.result import RenderResult
from cloudlets.rootfs import ArchivePolicy

if TYPE_CHECKING:
    from cloudlets.disk.assemble import BaseStream
    from cloudlets.rootfs import RootTree
    from cloudlets.templates import TemplateLimits
from cloudlets.urls import redact

__all__ = ["OutputPlan", "ProgressCallback", "Renderer", "plan_output"]

#: Pipeline stages, in order. Each records its time in ``RenderResult.timings``
#: (``tree`` replaces ``disk`` for formats that ship the tree, not a disk).
#: A tarball that is not cached yet is read while it downloads: ``fetch`` is
#: then the download's own time, which overlaps ``rootfs``.
STAGES = ("prepare", "fetch", "rootfs", "templates", "disk", "tree", "convert", "store",
          "publish")

#: Bump when the base tree a render builds from the same inputs changes, so
#: cached base filesystems from older versions are not reused.
_BASE_FORMAT = "cloudlets-base-1"

ManifestSource = Manifest | Mapping[str, Any] | str | Path


@dataclass
class _Run:
    """State of one render, passed from stage to stage."""

    manifest: Manifest
    config: RenderConfig
    fmt: FormatDriver
    storage: StorageDriver
    output: str
    workdir: Path
    progress: ProgressCallback | None
    overwrite: bool
    timings: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


class Renderer:
    """Renders cloudlets into bootable images.

    :param cache_dir: where downloaded tarballs and cached base filesystems
        live; default ``$CLOUDLETS_CACHE_DIR`` or ``$XDG_CACHE_HOME/cloudlets``.
    :param presets: the hosting provider's presets and locked keys, applied
        to every render.
    :param mirrors: mirror rules applied to every render, before the
        presets' rules: ``[{"prefix": ..., "mirrors": [...]}]``.
    :param data_dir: where state lives (the image catalog); default
        ``$CLOUDLETS_HOME`` or ``$XDG_DATA_HOME/cloudlets``.
    :param work_dir: where temporary work directories are created; default
        the system temporary directory.
    :param ex_allow_file_urls: allow ``file://`` URLs and local paths for
        tarballs (off by default: a request must not read host files).
    :param ex_source_date_epoch: fixed timestamp for reproducible output;
        default ``$SOURCE_DATE_EPOCH``, else derived from the inputs.
    :param ex_archive_policy: limits and rules for reading tarballs.
    :param ex_cache_max_bytes: bound the tarball cache (LRU eviction).
    :param ex_fetcher: the downloader (timeouts, retries, URL policy); by
        default one whose policy allows http and https, and ``file`` only
        with ``ex_allow_file_urls``.
    :param ex_template_limits: what a cloudlet's templates may cost (size,
        memory, time); :class:`~cloudlets.templates.TemplateLimits` defaults.
    """

    def __init__(self, cache_dir: str | Path | None = None, presets: Presets | None = None,
                 mirrors: Sequence[Mapping[str, Any]] | None = None, *,
                 data_dir: str | Path | None = None, work_dir: str | Path | None = None,
                 ex_allow_file_urls: bool = False,
                 ex_source_date_epoch: int | None = None,
                 ex_archive_policy: ArchivePolicy | None = None,
                 ex_cache_max_bytes: int | None = None,
                 ex_fetcher: Fetcher | None = None,
                 ex_template_limits: TemplateLimits | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        self.work_dir = Path(work_dir) if work_dir is not None else None
        self.presets = presets or Presets()
        self.mirrors = [dict(rule) for rule in (mirrors or [])]
        if self.mirrors:
            # Validate the rules with the config schema: same shape, same messages.
            Presets(values={"mirrors": self.mirrors})
        self.allow_file_urls = ex_allow_file_urls
        self.archive_policy = ex_archive_policy or ArchivePolicy()
        self.cache_max_bytes = ex_cache_max_bytes
        self.template_limits = ex_template_limits
        self.fetcher = ex_fetcher or Fetcher(policy=UrlPolicy(allow_file=ex_allow_file_urls))
        self._mirror_rules = MirrorRules.from_config(self.mirrors, source="renderer")
        epoch = ex_source_date_epoch
        if epoch is None and os.environ.get("SOURCE_DATE_EPOCH", "").isdigit():
            epoch = int(os.environ["SOURCE_DATE_EPOCH"])
        self.source_date_epoch = epoch

    # -- public API ---------------------------------------------------------

    def render(self, manifest: ManifestSource, output_path: str,
               storage: StorageDriver | str, format: FormatDriver | str,  # noqa: A002
               config: Mapping[str, Any] | None = None,
               progress: ProgressCallback | None = None, *,
               overwrite: bool = False) -> RenderResult:
        """Render a cloudlet and store the result.

        :param manifest: a :class:`~cloudlets.manifest.Manifest`, a dict, a
            JSON string, a URL or a path.
        :param output_path: where to store the output, in the storage
            driver's location syntax. A value ending in ``/`` is a directory:
            files are named ``NAME-VERSION.EXT`` under it. Otherwise it is
            the base name the format's extension is appended to
            (``out/web`` → ``out/web.qcow2``); an extension already there is
            kept.
        :param storage: a storage driver instance or a registered name.
        :param format: a format driver instance or a registered name.
        :param config: the request's render config.
        :param progress: called as ``progress(stage, done, total)``.
        :param overwrite: replace existing artifacts instead of refusing.
        :returns: the render's :class:`~cloudlets.result.RenderResult`.
        :raises CloudletsError: a subclass naming the problem and where; no
            complete-looking artifact is left at the output location.
        """
        started = time.monotonic()
        loaded = Manifest.load(manifest)
        fmt = self._driver(DriverKind.FORMAT, format)
        store = self._driver(DriverKind.STORAGE, storage)
        assert isinstance(fmt, FormatDriver) and isinstance(store, StorageDriver)
        loaded.require_renderable(
            needs_boot=not fmt.capabilities & FormatCapability.NEEDS_TREE)
        merged = self._config(loaded, config)
        plan = plan_output(output_path, loaded.label, extension=fmt.extension,
                           block=bool(store.capabilities & StorageCapability.BLOCK))
        if plan.block and fmt.capabilities & FormatCapability.MULTI_ARTIFACT:
            raise StorageError(
                f"format {fmt.name!r} makes several files and storage {store.name!r} writes "
                f"one block target ({redact(output_path)}): store them in a directory or an "
                f"object store", redact(output_path))
        with self._workdir() as workdir:
            run = _Run(manifest=loaded, config=merged, fmt=fmt, storage=store,
                       output=output_path, workdir=workdir, progress=progress,
                       overwrite=overwrite)
            run.timings["prepare"] = time.monotonic() - started
            disk = self._build(run)
            context = FormatContext(manifest=loaded, config=merged, disk=disk,
                                    workdir=workdir / "format", basename=plan.basename)
            context.workdir.mkdir()
            with self._stage(run, "convert"):
                outputs = self._convert(fmt, context)
                if not fmt.capabilities & FormatCapability.PUBLISH:
                    _discard_intermediates(disk, outputs)
            locations = plan.locations([o.name for o in outputs])
            with self._stage(run, "store"):
                stored = self._store(run, outputs, locations)
            image_id = self.image_id(loaded, merged, fmt.name, store.name, stored[0].location)
            if fmt.capabilities & FormatCapability.PUBLISH:
                try:
                    with self._stage(run, "publish"):
                        published = fmt.publish(context, stored, store)
                except BaseException:
                    # An image that was never registered is not left behind.
                    self._roll_back(store, locations)
                    raise
                if published is not None:
                    run.details["publish"] = dict(published.details)
                    image_id = published.image_id or image_id
        return RenderResult(
            image_id=image_id, format=fmt.name, storage=store.name, artifacts=tuple(stored),
            manifest_name=loaded.name, manifest_version=loaded.version,
            manifest_digest=loaded.digest, config_digest=merged.digest,
            timings=dict(run.timings), details=dict(run.details))

    def resolve_config(self, manifest: ManifestSource,
                       config: Mapping[str, Any] | None = None) -> RenderConfig:
        """Merge the manifest defaults, this renderer's presets and mirrors,
        and ``config``, as :meth:`render` does.

        :raises ConfigError: when the result is invalid or a locked key is set.
        """
        return self._config(Manifest.load(manifest), config)

    @staticmethod
    def image_id(manifest: Manifest, config: RenderConfig, format_name: str,
                 storage_name: str, location: str) -> str:
        """The stable id of a render.

        :returns: ``img-`` and 20 hex digits of the sha256 over the manifest
            digest, config digest, format, storage and primary location.
        """
        key = "\0".join([manifest.digest, config.digest, format_name, storage_name, location])
        return "img-" + hashlib.sha256(key.encode()).hexdigest()[:20]

    # -- stages -------------------------------------------------------------

    def _build(self, run: _Run) -> DiskImage:
        """fetch → rootfs → templates → disk: the bootable raw disk (and, for
        formats that ship the tree, the rendered tree tarball)."""
        from cloudlets.disk import BootSpec as DiskBootSpec
        from cloudlets.disk import build_disk, ext4
        from cloudlets.disk.assemble import BaseStream, base_cached, base_paths
        from cloudlets.rootfs import METADATA_PATH, RootTree, image_metadata, read_tarball
        from cloudlets.templates import render_templates

        manifest, config = run.manifest, run.config
        fs, boot = manifest.filesystem, manifest.boot
        assert fs is not None  # require_renderable() checked (and boot, for disks)
        rules = MirrorRules.for_render(self._mirror_rules, config.mirrors)
        wants_tree = bool(run.fmt.capabilities & FormatCapability.NEEDS_TREE)
        seed = hashlib.sha256(f"{manifest.digest}\0{fs.sha256}".encode()).hexdigest()
        base_key = hashlib.sha256(
            f"{_BASE_FORMAT}\0{manifest.digest}\0{fs.sha256}\0{self.source_date_epoch}"
            .encode()).hexdigest()
        base_dir = self.cache_dir / "bases"
        disk_boot = None
        if not wants_tree:
            assert boot is not None
            disk_boot = DiskBootSpec(
                kernel=boot.kernel, initrd=boot.initrd, cmdline=boot.cmdline,
                firmware=boot.firmware,  # type: ignore[arg-type]
                partition_table=boot.partition_table,  # type: ignore[arg-type]
                fstype=boot.fstype,  # type: ignore[arg-type]
                root_size=boot.root_size, label=boot.label)
            disk_boot.validate()
        # what identifies the cached base filesystem, for every look-up below
        base = _BaseLookup(seed=seed, tree_digest=base_key,
                           source_date_epoch=self.source_date_epoch, base_cache=base_dir)

        def read_tree(source: Path | BinaryIO, sink: BaseStream | None) -> RootTree:
            tree = read_tarball(source, self.archive_policy, volatile=manifest.volatile,
                                persistent=manifest.persistent, workdir=run.workdir,
                                sink=sink.sink if sink is not None else None,
                                keep_content=sink is None)
            tree.add_file(METADATA_PATH, image_metadata(
                name=manifest.name, version=manifest.version, digest=manifest.digest,
                persistent=tree.persistent))
            return tree

        tree: RootTree | None = None
        index_path: Path | None = None
        if disk_boot is not None:
            base_image, index_path = base_paths(disk_boot, **base)
            if base_cached(disk_boot, **base):
                # A re-render: with the base and the tree's index cached, the
                # templates' sources come from the base; the tarball is not read.
                with contextlib.suppress(ValueError):
                    tree = RootTree.from_index(
                        index_path, functools.partial(ext4.read_file, base_image),
                        workdir=run.workdir)
        from_index = tree is not None
        stream: BaseStream | None = None
        streamed = False
        try:
            if tree is not None:
                run.details["tarball"] = {"read": False, "reason": "base filesystem cached"}
            else:
                started = time.monotonic()
                # A missing tarball downloads on a thread of its own while it is
                # read; nothing read is used before entry.wait() has verified it.
                entry = self._cache().get(fs.url, fs.sha256, size=fs.size, mirrors=rules,
                                          progress=run.progress, follow=True)
                looked_up = time.monotonic() - started  # a hit: verified by now
                with entry:
                    if disk_boot is not None:
                        # mke2fs builds the base while the tarball is read (when not cached)
                        stream = BaseStream.open(disk_boot, **base,
                                                 workdir=run.workdir / "stream",
                                                 clamp=self.source_date_epoch)
                    with self._stage(run, "rootfs"):
                        tree = self._read_following(entry, read_tree, stream)
                        run.timings["fetch"] = entry.fetch_seconds or looked_up
                        run.details["tarball"] = {**entry.details(),
                                                  "read_while_fetched": not entry.hit}
                        if tree is None:  # the download started over under its reader
                            if stream is not None:
                                stream.abort()
                                stream.reason = "the download started over while read"
                            tree = read_tree(entry.path, None)
                        elif stream is not None:
                            try:
                                streamed = stream.close(tree)
                            except BaseException:
                                tree.close()
                                raise
                            if streamed:  # templates read from the base mke2fs built
                                tree.content_reader = stream.read_file
                            else:  # the rare tarball that cannot be streamed: read again
                                tree.close()
                                tree = read_tree(entry.path, None)
            with tree:
                with self._stage(run, "templates"):
                    rendered = render_templates(tree, manifest, config,
                                                mirror=rules.template_function(),
                                                limits=self.template_limits)
                run.details["rootfs"] = {"entries": len(tree), "dropped": len(tree.dropped),
                                         "persistent": list(tree.persistent),
                                         "templates": sorted(rendered),
                                         "compression": tree.compression.value}
                if disk_boot is None:
                    with self._stage(run, "tree"):
                        tree_tar = tree.write_tar(run.workdir / "rendered-tree.tar",
                                                  replacements=rendered,
                                                  source_date_epoch=self.source_date_epoch)
                    return DiskImage(path=tree_tar, size=tree_tar.stat().st_size,
                                     firmware=boot.firmware if boot is not None else "bios",
                                     tree_tar=tree_tar, details={"kind": "tree"})
                if stream is not None:
                    run.details["rootfs"]["streamed"] = streamed
                    if not streamed:
                        run.details["rootfs"]["not_streamed"] = stream.reason
                with self._stage(run, "disk"):
                    base_tar = None
                    if not streamed and not base_cached(disk_boot, **base):
                        base_tar = tree.write_tar(run.workdir / "base-tree.tar",
                                                  source_date_epoch=self.source_date_epoch)
                    image = build_disk(
                        base_tar, disk_boot, run.workdir / "disk.raw", seed=seed,
                        workdir=run.workdir / "disk",
                        source_date_epoch=self.source_date_epoch, base_cache=base_dir,
                        patch_files=rendered, tree_digest=base_key,
                        sync=False,  # an intermediate: the storage makes its copy durable
                        compose=bool(run.fmt.capabilities & FormatCapability.COMPOSED_DISK))
                    if base_tar is not None:  # see _discard_intermediates
                        base_tar.unlink()
                    if index_path is not None and not from_index:
                        tree.write_index(index_path)  # for the next re-render
        finally:
            if stream is not None:
                stream.abort()
        run.details["disk"] = {
            "size": image.size, "firmware": image.firmware,
            "partition_table": image.partition_table, "root_uuid": image.root_uuid,
            "disk_guid": image.disk_guid, "partitions": image.partition_uuids,
            "base_cached": image.base_cached and not streamed,
            "composed": bool(image.pieces),
            "source_date_epoch": image.source_date_epoch}
        return DiskImage(path=image.path, size=image.size, firmware=image.firmware,
                         tree_tar=None, details=dict(run.details["disk"]), pieces=image.pieces)

    @staticmethod
    def _read_following(entry: CacheEntry, read_tree: Callable[[BinaryIO, BaseStream | None],
                                                               RootTree],
                        stream: BaseStream | None) -> RootTree | None:
        """Read the tree from ``entry`` while it may still be downloading,
        then wait for the download's verdict: a tree from a tarball that
        failed verification is never used.

        :returns: the tree, or ``None`` when the download started over after
            bytes were read (read the finished file instead).
        """
        with entry.open() as source:
            try:
                tree = read_tree(source, stream)
            except DownloadRestarted:
                entry.wait()
                return None
            except CloudletsError:
                entry.wait()  # a failed download explains a broken archive best
                raise
        try:
            entry.wait()
        except BaseException:
            tree.close()
            raise
        return tree

    def _convert(self, fmt: FormatDriver, context: FormatContext) -> list[OutputFile]:
        try:
            outputs = fmt.convert(context)
        except CloudletsError:
            raise
        except Exception as exc:
            raise FormatError(f"format driver {fmt.name!r} failed: "
                              f"{type(exc).__name__}: {exc}") from exc
        if not outputs:
            raise FormatError(f"format driver {fmt.name!r} produced no output")
        for output in outputs:
            inside = context.workdir.resolve() in output.path.resolve().parents
            if not inside or not output.path.is_file():
                raise FormatError(f"format driver {fmt.name!r} returned {output.path}, "
                                  "not a file inside its work directory")
            if not output.name.startswith(context.basename) or "/" in output.name:
                raise FormatError(f"format driver {fmt.name!r} named an output "
                                  f"{output.name!r}; names start with {context.basename!r}")
        return outputs

    def _store(self, run: _Run, outputs: list[OutputFile],
               locations: list[str]) -> list[StoredArtifact]:
        if not run.overwrite:
            taken = [loc for loc in locations if run.storage.exists(loc)]
            if taken:
                raise StorageError(f"refusing to overwrite existing {redact(taken[0])} "
                                   "(pass overwrite=True to replace it)", redact(taken[0]))
        stored: list[StoredArtifact] = []
        try:
            for output, location in zip(outputs, locations, strict=True):
                stored.append(run.storage.upload(
                    output.path, location, media_type=output.media_type, role=output.role,
                    overwrite=run.overwrite, disposable=True))  # the work dir goes next
                if run.progress:
                    run.progress("store", len(stored), len(outputs))
        except BaseException:
            self._roll_back(run.storage, locations[:len(stored)])
            raise
        return stored

    @staticmethod
    def _roll_back(storage: StorageDriver, locations: list[str]) -> None:
        """Delete the artifacts of a render that failed half-way, so no
        incomplete set looks complete. ``locations`` are the ones the render
        stored to, credentials included: a stored artifact's own location is
        redacted and may not be enough to log in."""
        if not storage.capabilities & StorageCapability.DELETE:
            return
        for location in locations:
            try:
                storage.delete(location)
            except CloudletsError:
                pass

    # -- helpers ------------------------------------------------------------

    def _cache(self) -> TarballCache:
        return TarballCache(self.cache_dir, max_bytes=self.cache_max_bytes,
                            fetcher=self.fetcher)

    def _config(self, manifest: Manifest, request: Mapping[str, Any] | None) -> RenderConfig:
        presets = self.presets
        if self.mirrors:
            values = dict(presets.values)
            values["mirrors"] = self.mirrors + list(values.get("mirrors", []))
            presets = Presets(values=values, locked=presets.locked)
        return resolve_config(manifest, presets, request)

    @staticmethod
    def _driver(kind: DriverKind, driver: object) -> FormatDriver | StorageDriver:
        base = FormatDriver if kind is DriverKind.FORMAT else StorageDriver
        if isinstance(driver, base):
            return driver
        if isinstance(driver, type) and issubclass(driver, base):
            return driver()
        if isinstance(driver, str):
            cls = get_driver(kind, driver)
            try:
                return cls()  # type: ignore[no-any-return]
            except TypeError as exc:
                raise ConfigurationError(
                    f"{kind} driver {driver!r} needs arguments; pass an instance: {exc}") \
                    from None
        raise ConfigurationError(f"not a {kind} driver: {driver!r}")

    @contextmanager
    def _workdir(self) -> Iterator[Path]:
        if self.work_dir is not None:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix="cloudlets-render-", dir=self.work_dir))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    @contextmanager
    def _stage(self, run: _Run, stage: str) -> Iterator[None]:
        if run.progress:
            run.progress(stage, 0, None)
        started = time.monotonic()
        try:
            yield
        except CloudletsError:
            raise
        except Exception as exc:
            raise RenderError(f"stage {stage!r} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            run.timings[stage] = time.monotonic() - started


@dataclass(frozen=True)
class OutputPlan:
    """Where a render's files go, decided before the format runs so the
    files can name each other (an OVF descriptor names its disk).

    :ivar basename: the stem the format driver names its files with.
    :ivar prefix: what each file name is appended to; ``None`` for a block
        target, which takes the one image at :attr:`target` itself.
    :ivar target: the output location as given.
    """

    basename: str
    prefix: str | None
    target: str

    @property
    def block(self) -> bool:
        """Whether the output is one block target."""
        return self.prefix is None

    def locations(self, names: Sequence[str]) -> list[str]:
        """:returns: the storage location of each output file name.
        :raises StorageError: several files for one block target."""
        if self.prefix is None:
            if len(names) != 1:
                shown = redact(self.target)
                raise StorageError(f"a block target holds one image; the format made "
                                   f"{len(names)} files ({', '.join(names)})", shown)
            return [self.target]
        return [self.prefix + name for name in names]


class _BaseLookup(TypedDict):
    """The arguments that identify a cached base filesystem (cloudlets.disk.assemble)."""

    seed: str
    tree_digest: str
    source_date_epoch: int | None
    base_cache: Path


def _discard_intermediates(disk: DiskImage, outputs: Sequence[OutputFile]) -> None:
    """Remove the raw disk (or tree tar) once the format converted it, unless
    an output is that very file. It would go with the work directory anyway;
    gone now, its dirty pages are dropped unwritten, whereas the storage's
    fsync of the output would otherwise write them out too (ext4 commits
    them in the same journal transaction): for a 1 GiB disk holding 316 MB
    of data, the store stage went from 0.9-1.2 s to 0.3-0.6 s on a virtual
    disk under load. Formats that publish keep it (their publish step may
    read it)."""
    for path in {p for p in (disk.path, disk.tree_tar) if p is not None}:
        try:
            if any(output.path.exists() and os.path.samefile(output.path, path)
                   for output in outputs):
                continue
            path.unlink()
        except FileNotFoundError:
            pass


def plan_output(output: str, label: str, *, extension: str = "",
                block: bool = False) -> OutputPlan:
    """Decide the file stem and the locations of a render's outputs.

    :param output: ``dir/`` (files are named ``label.*`` under it), a base
        (``out/web``: files are named ``web.*`` beside it; a base ending in
        the format's ``extension``, ``out/web.qcow2``, loses it first), or,
        for a block target, the target itself.
    :param label: the manifest's ``NAME-VERSION``.
    :param extension: the format's primary suffix (``.qcow2``).
    :param block: the storage driver writes a block target.
    :returns: the plan.
    :raises StorageError: the output is empty.
    """
    if not output:
        raise StorageError("the output location is empty")
    if block:
        return OutputPlan(basename=label, prefix=None, target=output)
    if output.endswith("/"):
        return OutputPlan(basename=label, prefix=output, target=output)
    head, slash, name = output.rpartition("/")
    if extension and name.endswith(extension) and len(name) > len(extension):
        name = name[: -len(extension)]
    return OutputPlan(basename=name, prefix=head + slash, target=output)
