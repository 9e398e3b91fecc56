"""The create-image operation: the life of an image, in one place.

Every caller that makes images goes through :class:`Images`: the
``cloudlets render`` command, the libcloud extension
(:mod:`cloudlets.compute`), and the rendering service and its workers. The
order is always the same:

1. :meth:`Images.submit` resolves the request once
   (:meth:`Renderer.prepare <cloudlets.renderer.Renderer.prepare>`), claims
   it in the catalog and expands the output location. Of several processes
   submitting the same request, one claims it; the others get the ready image
   or the render in flight.
2. :meth:`Images.run` renders a claimed entry while renewing its lease,
   records the result (or the failure) and withdraws the images a forced
   render superseded.
3. :meth:`Images.wait` waits for a render in flight, when the caller wants
   to: nothing here waits on its own, as libcloud keeps
   ``wait_until_running`` apart from ``create_node``.
4. :meth:`Images.delete` deletes an image's artifacts through its storage
   driver and marks its record deleted.

:meth:`Images.create` is :meth:`~Images.submit` followed by
:meth:`~Images.run`; the split is where a job queue goes.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloudlets.catalog import (
    IN_FLIGHT,
    CatalogEntry,
    Claim,
    ClaimState,
    ImageCatalog,
    ImageStatus,
    RenderRequest,
)
from cloudlets.catalog.leases import keep_lease
from cloudlets.drivers.base import FormatDriver, StorageDriver, delete_locations
from cloudlets.drivers.providers import driver_class_path, make_driver
from cloudlets.drivers.types import DriverKind, StorageCapability
from cloudlets.errors import (
    CatalogError,
    CloudletsError,
    ConfigurationError,
    DriverNotFoundError,
    StorageError,
)
from cloudlets.progress import ProgressCallback
from cloudlets.renderer import ManifestSource, Renderer, RenderJob
from cloudlets.result import RenderResult
from cloudlets.urls import redact

if TYPE_CHECKING:
    from cloudlets.signing import ProvenanceKey, TrustPolicy
    from cloudlets.signing.trust import SignatureSource

__all__ = ["DeletedImage", "Execute", "Images", "Withdraw", "expand_output", "prepare_request",
           "storage_driver_for"]

log = logging.getLogger(__name__)

#: ``execute(job, progress, overwrite=...) -> RenderResult``: renders a
#: claimed job (:meth:`Renderer.execute <cloudlets.renderer.Renderer.execute>`,
#: or a queue's worker elsewhere).
Execute = Callable[..., RenderResult]
#: ``withdraw(image_id, label) -> bool``: deletes an image the provider
#: registered (a superseded AMI) with the provider's own API.
Withdraw = Callable[[str, str], bool]


@dataclass(frozen=True)
class DeletedImage:
    """What :meth:`Images.delete` did.

    :ivar entry: the entry, now deleted.
    :ivar removed: artifact locations deleted.
    :ivar missing: artifact locations the storage driver could not find
        (deleted out of band, or a target that cannot see them).
    :ivar already: the image had been deleted before; nothing was done.
    """

    entry: CatalogEntry
    removed: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    already: bool = False


@dataclass(frozen=True)
class _Submitted:
    """A claimed entry waiting for :meth:`Images.run` in this process."""

    job: RenderJob
    overwrite: bool
    withdraw: Withdraw | None


class Images:
    """The create-image operation over a renderer and a catalog.

    One object may be shared by threads; any number of processes may use
    the same catalog.

    :param renderer: the :class:`~cloudlets.renderer.Renderer`, carrying the
        provider's presets, mirrors and cache.
    :param catalog: the :class:`~cloudlets.catalog.ImageCatalog` or its
        path; default ``<renderer.data_dir>/catalog.sqlite3``.
    """

    def __init__(self, renderer: Renderer,
                 catalog: ImageCatalog | str | Path | None = None) -> None:
        self.renderer = renderer
        if isinstance(catalog, ImageCatalog):
            self.catalog = catalog
        else:
            self.catalog = ImageCatalog(catalog, data_dir=renderer.data_dir)
        self._submitted: dict[str, _Submitted] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<Images {self.catalog.path}>"

    # -- the operation ----------------------------------------------------------

    def create(self, manifest: ManifestSource, output: str,
               storage: StorageDriver | str, format: FormatDriver | str,  # noqa: A002
               config: Mapping[str, Any] | None = None, *, label: str | None = None,
               force: bool = False, overwrite: bool = False,
               progress: ProgressCallback | None = None,
               withdraw: Withdraw | None = None,
               signature: SignatureSource | None = None, trust: TrustPolicy | None = None,
               provenance_key: ProvenanceKey | None = None) -> CatalogEntry:
        """:meth:`submit`, then :meth:`run` when this call claimed the render.

        :returns: the ready entry; the existing ready entry of the same
            request; or, when another process is rendering the same request,
            that entry in flight (:meth:`wait` for it if you want to).
        :raises CloudletsError: what :meth:`submit` or :meth:`run` raised.
        """
        claim = self.submit(manifest, output, storage, format, config, label=label,
                            force=force, overwrite=overwrite, withdraw=withdraw,
                            signature=signature, trust=trust, provenance_key=provenance_key)
        if claim.state is not ClaimState.CLAIMED:
            return claim.entry
        return self.run(claim.entry.entry_id, progress)

    def submit(self, manifest: ManifestSource, output: str,
               storage: StorageDriver | str, format: FormatDriver | str,  # noqa: A002
               config: Mapping[str, Any] | None = None, *, label: str | None = None,
               force: bool = False, overwrite: bool = False,
               withdraw: Withdraw | None = None,
               signature: SignatureSource | None = None, trust: TrustPolicy | None = None,
               provenance_key: ProvenanceKey | None = None) -> Claim:
        """Resolve a request once and claim it in the catalog.

        :param manifest: a :class:`~cloudlets.manifest.Manifest`, dict, JSON
            string, URL or path.
        :param output: where the image goes, in the storage driver's syntax;
            it may contain ``{name}``, ``{version}`` and ``{key}`` (16 hex
            digits of the request key), so every distinct render gets its own
            location (``/srv/images/{key}/``). The key is computed from the
            output as written.
        :param storage: a storage driver instance, class or registered name.
        :param format: a format driver instance, class or registered name.
        :param config: the request's render config.
        :param label: the image's display name; default ``name-version``.
        :param force: render again even if a ready image has this key (its
            artifacts are overwritten and the old entry superseded).
        :param overwrite: replace artifacts the catalog does not know about.
        :param withdraw: deletes the provider's registration of an image this
            forced render supersedes (see :meth:`run`).
        :param signature: the manifest's signature, or where to read it
            (see :meth:`Renderer.prepare <cloudlets.renderer.Renderer.prepare>`).
        :param trust: the trust policy for this request (a tenant's) instead
            of the renderer's.
        :param provenance_key: the provenance key for this request instead of
            the renderer's.
        :returns: the :class:`~cloudlets.catalog.Claim`: ``CLAIMED`` (call
            :meth:`run` with its entry id), ``EXISTING`` (the ready image) or
            ``BUSY`` (the render in flight elsewhere).
        :raises CloudletsError: for invalid input or an unusable driver;
            nothing is recorded then.
        """
        job, request = prepare_request(self.renderer, manifest, output, storage, format,
                                       config, label=label, signature=signature,
                                       trust=trust, provenance_key=provenance_key)
        claim = self.catalog.claim(request, force=force, output=job.output)
        if claim.state is ClaimState.CLAIMED:
            with self._lock:
                self._submitted[claim.entry.entry_id] = _Submitted(
                    job=job, overwrite=overwrite or claim.replaces is not None,
                    withdraw=withdraw)
        return claim

    def run(self, entry_id: str, progress: ProgressCallback | None = None, *,
            ex_execute: Execute | None = None) -> CatalogEntry:
        """Render an entry this object's :meth:`submit` claimed, renewing its
        lease meanwhile, and record the outcome. When the render superseded
        ready images that a format published (an older AMI) and a
        ``withdraw`` was given, they are withdrawn: deregistered with it, and
        their artifacts that the new image does not share deleted.

        :param entry_id: the claimed entry.
        :param progress: called as ``progress(stage, done, total)``.
        :param ex_execute: renders the job instead of this object's renderer
            (``execute(job, progress, overwrite=...)``): a queue that hands
            it to a worker elsewhere and waits for its result.
        :returns: the ready entry.
        :raises CatalogError: for an entry this object did not claim.
        :raises CloudletsError: what the render raised; the entry is failed.
        """
        with self._lock:
            submitted = self._submitted.pop(entry_id, None)
        if submitted is None:
            raise CatalogError(f"render {entry_id} was not submitted here, or already ran",
                               entry_id)
        execute = ex_execute or self.renderer.execute
        entry = self._record(entry_id, lambda: execute(submitted.job, progress,
                                                        overwrite=submitted.overwrite))
        if submitted.withdraw is not None:
            self._withdraw_superseded(entry, submitted.job.storage, submitted.withdraw)
        return entry

    def resume(self, entry_id: str, outcome: Callable[[], RenderResult]) -> CatalogEntry:
        """Follow a render in flight that another process of the same
        service claimed and handed to a worker elsewhere (a restarted
        service): take over its lease (:meth:`ImageCatalog.adopt
        <cloudlets.catalog.ImageCatalog.adopt>`), renew it while
        ``outcome()`` waits for the worker's result, and record it.

        :param entry_id: the entry in flight.
        :param outcome: waits for the render's result; what it raises fails
            the entry.
        :returns: the ready entry.
        :raises CatalogError: for an entry no longer in flight.
        :raises CloudletsError: what ``outcome`` raised; the entry is failed.
        """
        self.catalog.adopt(entry_id)
        return self._record(entry_id, outcome)

    # -- helpers ----------------------------------------------------------------

    def _record(self, entry_id: str, produce: Callable[[], RenderResult]) -> CatalogEntry:
        """Mark an entry rendering, renew its lease while ``produce()`` runs,
        and record its result or its failure."""
        catalog = self.catalog
        with keep_lease(lambda: catalog.heartbeat(entry_id),
                        max(catalog.lease_seconds / 3.0, 0.05), name=f"cloudlets-{entry_id}"):
            try:
                catalog.start(entry_id)
                result = produce()
            except BaseException as exc:
                # a worker's error, sent back as text, names its own class
                catalog.fail(entry_id, exc, error_type=getattr(exc, "remote_type", None))
                raise
        try:
            return catalog.complete(entry_id, result)
        except BaseException as exc:
            catalog.fail(entry_id, exc)
            raise

    def wait(self, entry_id: str, timeout: float, *, poll_interval: float = 0.5) -> CatalogEntry:
        """Wait until an entry is no longer in flight. An entry whose owner
        is gone is marked failed (``OwnerLost``) rather than waited for.

        :param entry_id: the entry (a :class:`~cloudlets.catalog.Claim`'s).
        :param timeout: seconds to wait at most.
        :param poll_interval: seconds between looks.
        :returns: the entry, ready or failed.
        :raises CatalogError: on timeout.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        while True:
            entry = self.catalog.refresh(entry_id)
            if entry.status not in IN_FLIGHT:
                return entry
            left = deadline - time.monotonic()
            if left <= 0:
                raise CatalogError(
                    f"gave up after {timeout:.0f} s waiting for render {entry_id} of "
                    f"{entry.label} (pid {entry.owner_pid} on {entry.owner_host})", entry_id)
            time.sleep(min(poll_interval, left))

    def delete(self, ref: str, *, storage: StorageDriver | None = None) -> DeletedImage:
        """Delete an image's artifacts through its storage driver and mark
        its record deleted. A failed entry (nothing stored) is just marked.

        The entry is ``deleting`` while its artifacts go: it is no longer
        offered as ready. An artifact the driver cannot find is reported as
        missing, not as removed. If a deletion fails, the entry is
        ``delete_failed`` with what is left in its ``error``, and calling this
        again finishes it.

        :param ref: image id or entry id.
        :param storage: the storage driver to delete with; it must be the
            target the image was stored to. Default: rebuilt from the
            entry's record (:func:`storage_driver_for`).
        :returns: what was removed and what was not found.
        :raises CatalogError: for a render in flight, an unknown image, or a
            driver that is not the target the image was stored with.
        :raises StorageError: when an artifact cannot be deleted (the entry
            is then ``delete_failed``).
        """
        entry = self.catalog.get(ref)
        if entry.status in (ImageStatus.DELETED, ImageStatus.SUPERSEDED):
            return DeletedImage(entry, already=True)
        driver = None
        if entry.artifacts:  # none while in flight: mark_deleting refuses those
            driver = storage if storage is not None else storage_driver_for(entry)
            if driver.name != entry.storage:
                raise CatalogError(f"image {entry.ref} is stored with {entry.storage!r}, "
                                   f"not {driver.name!r}", entry.entry_id)
            if storage is not None and entry.target and storage.target != entry.target:
                raise CatalogError(f"image {entry.ref} is stored in the target "
                                   f"{entry.target!r}, not {storage.target!r}", entry.entry_id)
        self.catalog.mark_deleting(entry.entry_id)
        if driver is None:
            return DeletedImage(self.catalog.mark_deleted(entry.entry_id))
        report = delete_locations(driver, [a.location for a in entry.artifacts])
        if report.failed:
            location, error = report.failed[0]
            summary = (f"{len(report.failed)} of {len(entry.artifacts)} artifact(s) of image "
                       f"{entry.ref} could not be deleted ({redact(location)}: {error}); "
                       f"{len(report.removed)} removed, {len(report.missing)} not found")
            self.catalog.mark_delete_failed(entry.entry_id, f"deletion incomplete: {summary}")
            raise StorageError(f"{summary}; the image is delete_failed: delete it again to "
                               "finish", redact(location))
        return DeletedImage(self.catalog.mark_deleted(entry.entry_id), removed=report.removed,
                            missing=report.missing)

    def _withdraw_superseded(self, entry: CatalogEntry, storage: StorageDriver,
                             withdraw: Withdraw) -> None:
        """See :meth:`run`. A failure is logged, not raised: the new image
        is ready, and the old entry stays superseded for the next forced
        render (or an operator) to withdraw."""
        keep = {artifact.location for artifact in entry.artifacts}
        for old in self.catalog.superseded(entry):
            assert old.image_id is not None
            try:
                if not withdraw(old.image_id, old.label):
                    raise CloudletsError(f"the provider did not delete {old.image_id}")
            except Exception as exc:  # noqa: BLE001 - the provider's errors are its own
                log.warning("image %s superseded by %s was not withdrawn: %s",
                            old.image_id, entry.image_id, exc)
                continue
            report = delete_locations(
                storage, [a.location for a in old.artifacts if a.location not in keep])
            if report.failed:
                log.warning("image %s superseded by %s was not withdrawn: %s",
                            old.image_id, entry.image_id, report.failed[0][1])
                continue
            self.catalog.retire(old.entry_id)


def prepare_request(renderer: Renderer, manifest: ManifestSource, output: str,
                    storage: StorageDriver | str, format: FormatDriver | str,  # noqa: A002
                    config: Mapping[str, Any] | None = None, *, label: str | None = None,
                    signature: SignatureSource | None = None, trust: TrustPolicy | None = None,
                    provenance_key: ProvenanceKey | None = None
                    ) -> tuple[RenderJob, RenderRequest]:
    """Resolve a request as :meth:`Images.submit` does, claiming nothing: a
    worker on another host re-prepares the render a service claimed with
    this, and gets the same request key and image id.

    :param renderer: the renderer (its presets and mirrors are the request's).
    :returns: the job (its output template expanded) and the catalog request.
    :raises CloudletsError: for invalid input or an unusable driver.
    """
    job = renderer.prepare(manifest, output, storage, format, config, signature=signature,
                           trust=trust, provenance_key=provenance_key)
    request = RenderRequest(
        manifest_name=job.manifest.name, manifest_version=job.manifest.version,
        manifest_digest=job.manifest.digest, config_digest=job.config.digest,
        format=job.format.name, storage=job.storage.name, output=output,
        label=label or job.manifest.label, storage_class=driver_class_path(job.storage),
        target=job.storage.target)
    expanded = expand_output(output, request)
    return (job.at(expanded) if expanded != output else job), request


def expand_output(template: str, request: RenderRequest) -> str:
    """Fill ``{name}``, ``{version}`` and ``{key}`` in an output location.

    :raises CatalogError: for another placeholder.
    """
    values = {"name": request.manifest_name, "version": request.manifest_version or "",
              "key": request.key[:16]}

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise CatalogError(f"output {redact(template)!r}: unknown placeholder {{{name}}} "
                               "(known: {name}, {version}, {key})")
        return values[name]

    return re.sub(r"\{([^{}]*)\}", substitute, template)


def storage_driver_for(entry: CatalogEntry) -> StorageDriver:
    """Rebuild the storage driver an entry was stored with, to delete or read
    its artifacts: by its registered name, else by its recorded class. A
    driver that needs credentials reads them from its environment variables.

    :raises ConfigurationError: when the driver cannot be found, built
        without arguments, or cannot delete.
    """
    try:
        driver = make_driver(DriverKind.STORAGE, entry.storage)
    except DriverNotFoundError:
        if not entry.storage_class:
            raise
        driver = make_driver(DriverKind.STORAGE, entry.storage_class)
    if not driver.capabilities & StorageCapability.DELETE:
        raise ConfigurationError(f"storage driver {entry.storage!r} cannot delete")
    return driver
