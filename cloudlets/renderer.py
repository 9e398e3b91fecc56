"""The render pipeline, and nothing else.

Data flows one way: manifest and config in; fetch → verified tarball; rootfs
→ a filtered file tree; templates → the rendered tree; disk → a raw image;
format driver → output files; storage driver → stored artifacts; publish →
an image id. Each stage lives in its own module; only this one knows the
order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloudlets.cachelocks import DEFAULT_BASE_CACHE_MAX_BYTES
from cloudlets.config import Presets, RenderConfig, resolve_config
from cloudlets.drivers.base import (
    BaseInDisk,
    DiskImage,
    FormatContext,
    FormatDriver,
    HeadStart,
    OutputFile,
    StorageDriver,
    StoredArtifact,
    delete_locations,
)
from cloudlets.drivers.providers import make_driver
from cloudlets.drivers.types import DriverKind, FormatCapability, StorageCapability
from cloudlets.errors import (
    CloudletsError,
    ConfigurationError,
    FormatError,
    ManifestError,
    Problem,
    RenderError,
    SignatureError,
    StorageError,
)
from cloudlets.manifest import Manifest
from cloudlets.mirrors import MirrorRules
from cloudlets.paths import default_cache_dir, default_data_dir
from cloudlets.processes import process_alive, process_token
from cloudlets.progress import ProgressCallback, StageMeter
from cloudlets.result import RenderResult, image_id_for, request_key
from cloudlets.rootfs import ArchivePolicy
from cloudlets.rootfs.policy import MAX_TIME

if TYPE_CHECKING:
    from cloudlets.cache import TarballCache
    from cloudlets.fetch import Fetcher
    from cloudlets.signing import ProvenanceKey, Signer, TrustPolicy
    from cloudlets.signing.trust import SignatureSource
    from cloudlets.templates import TemplateLimits
from cloudlets.urls import redact
from cloudlets.validmemo import MEMO_NAME, ValidatedMemo

__all__ = ["OutputPlan", "ProgressCallback", "RenderJob", "Renderer", "plan_output"]

#: Pipeline stages, in order. Each records its time in ``RenderResult.timings``
#: (``tree`` replaces ``disk`` for formats that ship the tree, not a disk).
#: A tarball that is not cached yet is read while it downloads: ``fetch`` is
#: then the download's own time, which overlaps ``rootfs``.
STAGES = ("prepare", "fetch", "rootfs", "templates", "disk", "tree", "convert", "store",
          "provenance", "publish")

ManifestSource = Manifest | Mapping[str, Any] | str | Path

#: The largest image a manifest may ask for (``boot.root.size``,
#: ``boot.disk_size``) unless the provider says otherwise
#: (``Renderer(ex_max_image_bytes=...)``); it also bounds what a tarball may
#: expand to.
DEFAULT_MAX_IMAGE_BYTES = 8 * 1024**3


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
    mirrors: MirrorRules
    #: what the render holds until it ends (the lease on its base filesystem)
    held: ExitStack
    #: the file stem of the outputs
    basename: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    #: what the format driver began before the disk was built, if anything
    head_start: HeadStart | None = None


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
    :param ex_allow_hosts: ``HOST[:PORT]`` exceptions to the default URL
        policy, which refuses loopback, private, link-local and metadata
        addresses (:class:`~cloudlets.fetch.UrlPolicy`). The mirrors of
        ``mirrors`` and of the presets are allowed without being listed.
    :param ex_source_date_epoch: fixed timestamp for reproducible output;
        default ``$SOURCE_DATE_EPOCH``, else derived from the inputs.
    :param ex_archive_policy: limits and rules for reading tarballs; each
        render lowers its size limits to the image size it may make (the
        manifest's ``boot.root.size``, else ``ex_max_image_bytes``).
    :param ex_max_image_bytes: the largest ``boot.root.size`` or
        ``boot.disk_size`` a manifest may ask for (default
        :data:`DEFAULT_MAX_IMAGE_BYTES`); a larger one is refused before
        anything is fetched.
    :param ex_cache_max_bytes: bound the tarball cache (LRU eviction).
    :param ex_base_cache_max_bytes: bound the cache of base filesystems
        (``<cache_dir>/bases``; bytes on disk, LRU eviction, a base in use
        by a render is never evicted); ``None``: no bound. Default
        :data:`~cloudlets.cachelocks.DEFAULT_BASE_CACHE_MAX_BYTES` (10 GiB).
    :param ex_fetcher: the downloader (timeouts, retries, URL policy); by
        default one whose policy allows http and https, ``file`` only with
        ``ex_allow_file_urls``, and internal addresses only through
        ``ex_allow_hosts`` (give one or the other, not both). It also
        fetches a manifest's ``.sig``, and a manifest given as a URL.
    :param trust: the :class:`~cloudlets.signing.TrustPolicy` every
        manifest is checked against in :meth:`prepare`, before anything is
        downloaded; ``None`` checks no signature. :meth:`prepare` may be
        given another one per call (a tenant's).
    :param provenance_key: when set, every render writes a signed
        provenance (:mod:`cloudlets.signing.provenance`) beside its
        artifacts; :meth:`prepare` may be given another one per call.
    :param ex_template_limits: what a cloudlet's templates may cost (size,
        memory, time); :class:`~cloudlets.templates.TemplateLimits` defaults.
    :raises ConfigurationError: for a bad ``ex_allow_hosts`` entry, or
        ``ex_allow_hosts`` with ``ex_fetcher``.
    """

    def __init__(self, cache_dir: str | Path | None = None, presets: Presets | None = None,
                 mirrors: Sequence[Mapping[str, Any]] | None = None, *,
                 data_dir: str | Path | None = None, work_dir: str | Path | None = None,
                 ex_allow_file_urls: bool = False,
                 ex_allow_hosts: Sequence[str] = (),
                 ex_source_date_epoch: int | None = None,
                 ex_archive_policy: ArchivePolicy | None = None,
                 ex_cache_max_bytes: int | None = None,
                 ex_base_cache_max_bytes: int | None = DEFAULT_BASE_CACHE_MAX_BYTES,
                 ex_fetcher: Fetcher | None = None,
                 ex_template_limits: TemplateLimits | None = None,
                 ex_max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
                 trust: TrustPolicy | None = None,
                 provenance_key: ProvenanceKey | None = None) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
        self.work_dir = Path(work_dir) if work_dir is not None else None
        # validations that found no problem, beside the cache (cloudlets.validmemo)
        self._validated = ValidatedMemo(self.cache_dir / MEMO_NAME)
        self.mirrors = [dict(rule) for rule in (mirrors or [])]
        with self._validated.active():
            self.presets = presets or Presets()
            if self.mirrors:
                # Validate the rules with the config schema: same shape, same messages.
                Presets(values={"mirrors": self.mirrors})
        self.allow_file_urls = ex_allow_file_urls
        self.archive_policy = ex_archive_policy or ArchivePolicy()
        self.cache_max_bytes = ex_cache_max_bytes
        for name, bound in (("ex_cache_max_bytes", ex_cache_max_bytes),
                            ("ex_base_cache_max_bytes", ex_base_cache_max_bytes)):
            if bound is not None and bound < 0:
                raise ConfigurationError(f"Renderer: {name} must not be negative, not {bound}")
        self.base_cache_max_bytes = ex_base_cache_max_bytes
        self.template_limits = ex_template_limits
        if ex_fetcher is not None and ex_allow_hosts:
            raise ConfigurationError("Renderer: give ex_allow_hosts or ex_fetcher, not both "
                                     "(put the hosts in the fetcher's UrlPolicy)")
        self._allow_hosts = frozenset(ex_allow_hosts)
        self._fetcher_lock = threading.Lock()
        # made now when there are hosts to check (a bad HOST:PORT is refused
        # here, not at the first download), else on first use
        self._fetcher = ex_fetcher or (self._new_fetcher() if ex_allow_hosts else None)
        # the presets' mirrors are the provider's too: the fetcher allows them
        self._mirror_rules = MirrorRules(
            MirrorRules.from_config(self.mirrors, source="renderer").rules,
            provider_rules=self.presets.values.get("mirrors", []))
        self.max_image_bytes = ex_max_image_bytes
        epoch = ex_source_date_epoch
        env = os.environ.get("SOURCE_DATE_EPOCH", "")
        if epoch is None and env:
            # refused here rather than read differently by the disk stage
            if not env.isdigit():
                raise ConfigurationError(
                    f"$SOURCE_DATE_EPOCH={env!r} is not a number of seconds")
            epoch = int(env)
        if epoch is not None and not 0 <= epoch <= MAX_TIME:
            # every time in the image is clamped to it: it must be one they can hold
            raise ConfigurationError(
                f"source date epoch {epoch} is outside 0 .. {MAX_TIME} "
                "(ex_source_date_epoch or $SOURCE_DATE_EPOCH)")
        self.source_date_epoch = epoch
        self.trust = trust
        self.provenance_key = provenance_key

    # -- public API ---------------------------------------------------------

    def render(self, manifest: ManifestSource, output_path: str,
               storage: StorageDriver | str, format: FormatDriver | str,  # noqa: A002
               config: Mapping[str, Any] | None = None,
               progress: ProgressCallback | None = None, *,
               overwrite: bool = False, signature: SignatureSource | None = None,
               trust: TrustPolicy | None = None,
               provenance_key: ProvenanceKey | None = None) -> RenderResult:
        """Render a cloudlet and store the result: :meth:`prepare`, then
        :meth:`execute`.

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
        :param signature: as for :meth:`prepare`.
        :param trust: as for :meth:`prepare`.
        :param provenance_key: as for :meth:`prepare`.
        :returns: the render's :class:`~cloudlets.result.RenderResult`.
        :raises CloudletsError: a subclass naming the problem and where; no
            complete-looking artifact is left at the output location.
        """
        job = self.prepare(manifest, output_path, storage, format, config,
                           signature=signature, trust=trust, provenance_key=provenance_key)
        return self.execute(job, progress, overwrite=overwrite)

    def prepare(self, manifest: ManifestSource, output_path: str,
                storage: StorageDriver | str, format: FormatDriver | str,  # noqa: A002
                config: Mapping[str, Any] | None = None, *,
                signature: SignatureSource | None = None,
                trust: TrustPolicy | None = None,
                provenance_key: ProvenanceKey | None = None) -> RenderJob:
        """Resolve a render's inputs once, before anything is fetched: load
        the manifest, check its signature, build the drivers, merge and
        validate the config, plan the output.

        :param manifest: as for :meth:`render`.
        :param output_path: as for :meth:`render`.
        :param storage: a storage driver instance, class or registered name.
        :param format: a format driver instance, class or registered name.
        :param config: the request's render config.
        :param signature: the manifest's signature (armored text or bytes)
            or where to read it (a path or URL); default ``MANIFEST.sig``
            beside a manifest given as a path or URL, fetched with this
            renderer's fetcher and URL policy. Checked only with a trust
            policy.
        :param trust: the policy for this render instead of the renderer's
            (a tenant's).
        :param provenance_key: the provenance key for this render instead of
            the renderer's.
        :returns: the :class:`RenderJob` that :meth:`execute` renders.
        :raises SignatureError: the trust policy refuses the manifest
            (:attr:`~cloudlets.errors.SignatureError.reason` says why), or a
            signature was given without a policy to check it.
        :raises CloudletsError: for invalid input or an unusable driver.
        """
        started = time.monotonic()
        loaded = self._manifest(manifest)
        signer = self._check_signature(loaded, manifest, signature, trust or self.trust)
        fmt = make_driver(DriverKind.FORMAT, format)
        store = make_driver(DriverKind.STORAGE, storage)
        loaded.require_renderable(
            needs_boot=not fmt.capabilities & FormatCapability.NEEDS_TREE)
        self._check_image_size(loaded)
        merged = self._config(loaded, config)
        plan = _plan(loaded, fmt, store, output_path)
        key = request_key(loaded.digest, merged.digest, fmt.name, store.target, output_path)
        return RenderJob(manifest=loaded, config=merged, format=fmt, storage=store,
                         output=output_path, plan=plan, key=key,
                         mirrors=MirrorRules.for_render(self._mirror_rules, merged.mirrors),
                         prepared_in=time.monotonic() - started, signer=signer,
                         provenance_key=provenance_key or self.provenance_key)

    def execute(self, job: RenderJob, progress: ProgressCallback | None = None, *,
                overwrite: bool = False) -> RenderResult:
        """Render a prepared job: fetch, rootfs, templates, disk, convert,
        store, publish.

        :param job: from :meth:`prepare` (or :meth:`RenderJob.at`).
        :param progress: called as ``progress(stage, done, total)``.
        :param overwrite: replace existing artifacts instead of refusing.
        :returns: the render's :class:`~cloudlets.result.RenderResult`; its
            image id is :attr:`RenderJob.image_id` unless the format
            published the image under the consumer's own id.
        :raises CloudletsError: as for :meth:`render`.
        """
        loaded, merged, fmt, store, plan = (job.manifest, job.config, job.format,
                                            job.storage, job.plan)
        started, started_on = time.monotonic(), time.time()
        checked: list[str] = []
        if not overwrite:
            # Before any work: the primary file's name is known up front (the
            # others, once the format has named them, are checked at store),
            # and so is the provenance's, named after it.
            primary = plan.basename + fmt.extension
            provenance = plan.provenance_location(primary) if job.provenance_key else None
            checked = [*plan.locations([primary]), *([provenance] if provenance else [])]
            _refuse_existing(store, checked)
        with self._workdir() as workdir, ExitStack() as held:
            run = _Run(manifest=loaded, config=merged, fmt=fmt, storage=store,
                       output=job.output, workdir=workdir, progress=progress,
                       overwrite=overwrite, mirrors=job.mirrors, held=held,
                       basename=plan.basename)
            if job.signer is not None:
                run.details["signature"] = job.signer.to_dict()
            run.timings["prepare"] = job.prepared_in + time.monotonic() - started
            disk = self._build(run)
            # the convert stage in bytes of the disk's virtual size
            converted = StageMeter(run.progress, "convert", disk.size)
            context = FormatContext(manifest=loaded, config=merged, disk=disk,
                                    workdir=workdir / "format", basename=plan.basename,
                                    head_start=run.head_start)
            if progress is not None:
                context = dataclasses.replace(context, progress=converted.part(disk.size))
            context.workdir.mkdir(exist_ok=True)  # a head start may have made it
            with self._stage(run, "convert"):
                outputs = self._convert(fmt, context)
                converted.finish()
                if not fmt.capabilities & FormatCapability.PUBLISH:
                    _discard_intermediates(disk, outputs)
            if run.head_start is not None:
                run.details["head_start"] = dict(run.head_start.details())
            context = dataclasses.replace(context, progress=FormatContext.progress)
            locations = plan.locations([o.name for o in outputs])
            provenance_at = plan.provenance_location(outputs[0].name) \
                if job.provenance_key is not None else None
            with self._stage(run, "store"):
                stored = self._store(run, outputs, locations,
                                     reserved=[provenance_at] if provenance_at else [],
                                     checked=checked)
            image_id = job.image_id
            artifacts = list(stored)
            if job.provenance_key is not None:
                try:
                    with self._stage(run, "provenance"):
                        written = self._provenance(run, job, stored, provenance_at,
                                                   started_on)
                except BaseException:
                    self._roll_back(store, locations)
                    raise
                if written is not None:
                    artifacts.append(written)
                    locations.append(provenance_at)  # type: ignore[arg-type]
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
            image_id=image_id, format=fmt.name, storage=store.name, artifacts=tuple(artifacts),
            manifest_name=loaded.name, manifest_version=loaded.version,
            manifest_digest=loaded.digest, config_digest=merged.digest,
            timings=dict(run.timings), details=dict(run.details))

    def resolve_config(self, manifest: ManifestSource,
                       config: Mapping[str, Any] | None = None) -> RenderConfig:
        """Merge the manifest defaults, this renderer's presets and mirrors,
        and ``config``, as :meth:`render` does.

        :raises ConfigError: when the result is invalid or a locked key is set.
        """
        return self._config(self._manifest(manifest), config)

    @staticmethod
    def image_id(manifest: Manifest, config: RenderConfig, format_name: str,
                 storage_name: str, location: str) -> str:
        """The stable id of a render.

        :param storage_name: the storage target
            (:attr:`StorageDriver.target <cloudlets.drivers.base.StorageDriver.target>`;
            for a driver without identity options, its name).
        :returns: ``img-`` and 20 hex digits of the request's digest
            (:func:`cloudlets.result.request_key`) over the manifest digest,
            config digest, format, storage target and output location as
            requested.
        """
        return image_id_for(request_key(manifest.digest, config.digest, format_name,
                                        storage_name, location))

    def _check_image_size(self, manifest: Manifest) -> None:
        """Refuse an image larger than the provider allows, before any work."""
        boot = manifest.boot
        if boot is None:
            return
        problems = [Problem(pointer, f"{size} bytes is more than the {self.max_image_bytes} "
                                     "this provider renders (Renderer ex_max_image_bytes)")
                    for pointer, size in (("/boot/root/size", boot.root_size),
                                          ("/boot/disk_size", boot.disk_size))
                    if size is not None and size > self.max_image_bytes]
        if problems:
            raise ManifestError(problems, source=manifest.name)

    def _archive_policy(self, manifest: Manifest) -> ArchivePolicy:
        """The archive policy of one render: its size limits lowered to the
        image it may make (the root filesystem cannot hold more), so a
        tarball cannot expand (sparse files included) beyond it."""
        boot = manifest.boot
        budget = self.max_image_bytes
        if boot is not None and boot.root_size is not None:
            budget = min(budget, boot.root_size)
        policy = self.archive_policy
        return dataclasses.replace(policy, max_total_size=min(policy.max_total_size, budget),
                                   max_member_size=min(policy.max_member_size, budget))

    # -- stages -------------------------------------------------------------

    def _build(self, run: _Run) -> DiskImage:
        """fetch → rootfs → templates → disk (``tree`` for formats that ship
        the tree): what the format converts. Which of them read and build
        what depends on the cache of base filesystems; the
        :class:`~cloudlets.disk.basecache.DiskPlan` decides."""
        from cloudlets.disk.basecache import DiskPlan
        from cloudlets.templates import render_templates

        manifest, config, caps = run.manifest, run.config, run.fmt.capabilities
        fs = manifest.filesystem
        assert fs is not None  # require_renderable() checked (and boot, for disks)
        rules = run.mirrors
        with DiskPlan(manifest, base_cache=self.cache_dir / "bases", workdir=run.workdir,
                      source_date_epoch=self.source_date_epoch,
                      archive_policy=self._archive_policy(manifest),
                      tree=bool(caps & FormatCapability.NEEDS_TREE),
                      compose=bool(caps & FormatCapability.COMPOSED_DISK),
                      base_cache_max_bytes=self.base_cache_max_bytes,
                      # the base is read until the disk's pieces are converted
                      hold=run.held) as plan:
            tree = plan.cached_tree()
            if tree is not None:
                run.details["tarball"] = {"read": False, "reason": "base filesystem cached"}
                self._head_start(run, plan.base_in_disk())
            else:
                started = time.monotonic()
                # A missing tarball downloads on a thread of its own while it is
                # read; nothing read is used before the download is verified.
                entry = self._cache().get(fs.url, fs.sha256, size=fs.size, mirrors=rules,
                                          progress=run.progress, follow=True)
                looked_up = time.monotonic() - started  # a hit: verified by now
                with entry, self._stage(run, "rootfs"):
                    tree = plan.read(entry, run.progress)
                    run.timings["fetch"] = entry.fetch_seconds or looked_up
                    run.details["tarball"] = {**entry.details(),
                                              "read_while_fetched": not entry.hit}
            with tree:
                with self._stage(run, "templates"):
                    rendered = render_templates(tree, manifest, config,
                                                mirror=rules.template_function(),
                                                limits=self.template_limits)
                run.details["rootfs"] = plan.rootfs_details(tree, rendered)
                with self._stage(run, plan.stage):
                    disk = plan.build(tree, rendered, run.progress)
        if plan.stage == "disk":
            run.details["disk"] = dict(disk.details)
        return disk

    @staticmethod
    def _head_start(run: _Run, base: BaseInDisk | None) -> None:
        """Let the format driver begin what every render over the cached
        ``base`` shares, while the templates render and the base is patched
        (:meth:`FormatDriver.head_start`); closed when the render ends."""
        if base is None:
            return
        workdir = run.workdir / "format"
        workdir.mkdir(exist_ok=True)
        with _driver_errors(run.fmt, "failed to start"):
            started = run.fmt.head_start(base, workdir, run.basename)
        if started is not None:
            run.held.callback(started.close)
            run.head_start = started

    def _convert(self, fmt: FormatDriver, context: FormatContext) -> list[OutputFile]:
        with _driver_errors(fmt, "failed"):
            outputs = fmt.convert(context)
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

    def _store(self, run: _Run, outputs: list[OutputFile], locations: list[str], *,
               reserved: Sequence[str] = (),
               checked: Sequence[str] = ()) -> list[StoredArtifact]:
        """Upload the outputs; ``reserved`` are locations a later step
        writes (the provenance), refused as well when already taken;
        ``checked`` were refused-if-taken before the render began (each
        upload still refuses to overwrite on its own)."""
        if not run.overwrite:
            _refuse_existing(run.storage, [location for location in [*locations, *reserved]
                                           if location not in checked])
        stored: list[StoredArtifact] = []
        total = sum(output.path.stat().st_size for output in outputs)
        try:
            for output, location in zip(outputs, locations, strict=True):
                stored.append(run.storage.upload(
                    output.path, location, media_type=output.media_type, role=output.role,
                    overwrite=run.overwrite, disposable=True,  # the work dir goes next
                    progress=_store_progress(run.progress, sum(a.size for a in stored),
                                             total),
                    written_sha256=output.sha256))
        except BaseException:
            self._roll_back(run.storage, locations[:len(stored)])
            raise
        return stored

    @staticmethod
    def _roll_back(storage: StorageDriver, locations: list[str]) -> None:
        """Delete the artifacts of a render that failed half-way, so no
        incomplete set looks complete. ``locations`` are the ones the render
        stored to, credentials included: a stored artifact's own location is
        redacted and may not be enough to log in. What cannot be deleted
        stays (the render's own error is what the caller needs)."""
        if storage.capabilities & StorageCapability.DELETE:
            delete_locations(storage, locations, check_exists=False)

    def _provenance(self, run: _Run, job: RenderJob, stored: list[StoredArtifact],
                    location: str | None, started_on: float) -> StoredArtifact | None:
        """Sign the render's provenance and store it at ``location`` (for a
        block target, which holds one image, it is kept in the details
        only). :returns: the stored provenance artifact, if any."""
        from cloudlets.signing.provenance import (
            PAYLOAD_TYPE,
            ROLE,
            job_statement,
            sign_envelope,
        )

        key = job.provenance_key
        assert key is not None
        statement = job_statement(job, stored, builder_id=key.builder_id, started=started_on,
                                  finished=time.time(),
                                  source_date_epoch=self.source_date_epoch)
        envelope = sign_envelope(statement, key)
        run.details["provenance"] = {"location": None, "key_id": key.key_id,
                                     "sha256": hashlib.sha256(envelope).hexdigest(),
                                     "envelope": json.loads(envelope)}
        if location is None:
            return None
        path = run.workdir / "provenance.intoto.json"
        path.write_bytes(envelope)
        artifact = run.storage.upload(path, location, media_type=PAYLOAD_TYPE, role=ROLE,
                                      overwrite=run.overwrite, disposable=True)
        run.details["provenance"]["location"] = artifact.location
        return artifact

    # -- helpers ------------------------------------------------------------

    def _check_signature(self, manifest: Manifest, source: ManifestSource,
                         signature: SignatureSource | None,
                         policy: TrustPolicy | None) -> Signer | None:
        """The trust policy's verdict on the manifest's exact bytes, before
        anything is downloaded. :returns: who signed, if anyone."""
        if policy is None:
            if signature is not None:
                raise SignatureError("a signature was given but the renderer has no trust "
                                     "policy to check it with", "policy", manifest.source)
            return None
        return policy.check_manifest(manifest, source, signature=signature,
                                     fetcher=self.fetcher)

    @property
    def fetcher(self) -> Fetcher:
        """The downloader: ``ex_fetcher``, or one under a URL policy of
        ``ex_allow_file_urls`` and ``ex_allow_hosts``, made on first use (a
        re-render from a cached base fetches nothing, and its process does
        not import the HTTP stack: 16 ms of a fresh one's start)."""
        with self._fetcher_lock:
            if self._fetcher is None:
                self._fetcher = self._new_fetcher()
            return self._fetcher

    def _new_fetcher(self) -> Fetcher:
        from cloudlets.fetch import Fetcher, UrlPolicy

        return Fetcher(policy=UrlPolicy(allow_file=self.allow_file_urls,
                                        allow_hosts=self._allow_hosts))

    def _cache(self) -> TarballCache:
        from cloudlets.cache import TarballCache

        return TarballCache(self.cache_dir, max_bytes=self.cache_max_bytes,
                            fetcher=self.fetcher)

    def _manifest(self, manifest: ManifestSource) -> Manifest:
        with self._validated.active():
            # asked for only by a manifest given as an http(s) URL
            return Manifest.load(manifest, fetcher=lambda: self.fetcher)

    def _config(self, manifest: Manifest, request: Mapping[str, Any] | None) -> RenderConfig:
        with self._validated.active():
            presets = self.presets
            if self.mirrors:
                values = dict(presets.values)
                values["mirrors"] = self.mirrors + list(values.get("mirrors", []))
                presets = Presets(values=values, locked=presets.locked)
            return resolve_config(manifest, presets, request)

    @contextmanager
    def _workdir(self) -> Iterator[Path]:
        """A fresh work directory, removed on every way out of the render
        (an error, ``KeyboardInterrupt``, a signal the CLI turns into an
        exception). A process killed outright cannot remove its own, so it
        is named after its process (pid and start time) and the next render
        in the same place removes the directories of processes that are
        gone."""
        parent = self.work_dir if self.work_dir is not None else Path(tempfile.gettempdir())
        parent.mkdir(parents=True, exist_ok=True)
        _sweep_abandoned_workdirs(parent)
        pid = os.getpid()
        prefix = f"{_WORKDIR_PREFIX}{pid}-{process_token(pid) or 0}-"
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
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


log = logging.getLogger(__name__)

#: A render's work directory is ``{prefix}{pid}-{start time}-{random}``.
_WORKDIR_PREFIX = "cloudlets-render-"


def _sweep_abandoned_workdirs(parent: Path) -> None:
    """Remove the work directories in ``parent`` whose render's process is
    gone (killed with ``SIGKILL``, or the machine lost power): the pid in
    the name no longer runs the process that started at the recorded time."""
    for path in parent.glob(f"{_WORKDIR_PREFIX}*-*-*"):
        pid, token, _ = path.name[len(_WORKDIR_PREFIX):].split("-", 2)
        if not pid.isdigit() or not token.isdigit() or not path.is_dir():
            continue
        if not process_alive(int(pid), None if token == "0" else token):
            log.info("removing %s, the work directory of a render whose process %s is gone",
                     path, pid)
            shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class RenderJob:
    """A render whose inputs were resolved once (:meth:`Renderer.prepare`).

    :ivar manifest: the loaded manifest.
    :ivar config: the merged, validated render config.
    :ivar format: the format driver.
    :ivar storage: the storage driver.
    :ivar output: where the render stores its files.
    :ivar plan: the file stem and locations derived from :attr:`output`.
    :ivar key: the request's digest (:func:`cloudlets.result.request_key`)
        over the output as requested; :meth:`at` keeps it.
    :ivar mirrors: the render's mirror rules, compiled once: the
        renderer's, then the config's.
    :ivar prepared_in: seconds :meth:`Renderer.prepare` took.
    :ivar signer: who signed the manifest, as the trust policy verified it.
    :ivar provenance_key: signs the render's provenance, when set.
    """

    manifest: Manifest
    config: RenderConfig
    format: FormatDriver
    storage: StorageDriver
    output: str
    plan: OutputPlan
    key: str
    mirrors: MirrorRules
    prepared_in: float = 0.0
    signer: Signer | None = None
    provenance_key: ProvenanceKey | None = field(default=None, repr=False)

    @property
    def image_id(self) -> str:
        """The render's image id, from :attr:`key`."""
        return image_id_for(self.key)

    def at(self, output: str) -> RenderJob:
        """The same job storing to ``output`` (a catalog's output template,
        expanded), with the same :attr:`key` and image id.

        :raises StorageError: when ``output`` cannot take this format.
        """
        plan = _plan(self.manifest, self.format, self.storage, output)
        return dataclasses.replace(self, output=output, plan=plan)


def _store_progress(progress: ProgressCallback | None, before: int,
                    total: int) -> Callable[[int], None] | None:
    """The store stage reports bytes of all its artifacts together."""
    if progress is None:
        return None
    report = progress
    return lambda done: report("store", before + done, total)


def _refuse_existing(storage: StorageDriver, locations: Sequence[str]) -> None:
    """:raises StorageError: when something is stored at one of ``locations``."""
    for location in locations:
        if storage.exists(location):
            shown = redact(location)
            raise StorageError(f"refusing to overwrite existing {shown} (pass overwrite=True, "
                               "or --overwrite on the command line, to replace it)", shown)


def _plan(manifest: Manifest, fmt: FormatDriver, store: StorageDriver,
          output: str) -> OutputPlan:
    plan = plan_output(output, manifest.label, extension=fmt.extension,
                       block=bool(store.capabilities & StorageCapability.BLOCK))
    if plan.block and fmt.capabilities & FormatCapability.MULTI_ARTIFACT:
        raise StorageError(
            f"format {fmt.name!r} makes several files and storage {store.name!r} writes "
            f"one block target ({redact(output)}): store them in a directory or an "
            f"object store", redact(output))
    return plan


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

    def provenance_location(self, primary: str) -> str | None:
        """Where a render's provenance goes.

        :returns: beside the primary file, named after it
            (``web-1.0.qcow2.provenance.intoto.json``); ``None`` for a block
            target, which holds the image only.
        """
        from cloudlets.signing.provenance import FILE_SUFFIX

        return None if self.prefix is None else self.prefix + primary + FILE_SUFFIX

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


@contextmanager
def _driver_errors(fmt: FormatDriver, failed: str) -> Iterator[None]:
    """A format driver's own exception (a provider's plugin may raise
    anything) as a :class:`FormatError` naming the driver and what it
    ``failed`` to do."""
    try:
        yield
    except CloudletsError:
        raise
    except Exception as exc:
        raise FormatError(f"format driver {fmt.name!r} {failed}: "
                          f"{type(exc).__name__}: {exc}") from exc


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
