"""Render jobs: the service's one interface to the create-image operation.

:class:`RenderJobs` is what the HTTP layer calls: it checks a tenant's
limits, claims the render with :meth:`cloudlets.images.Images.submit`, hands
the claimed entry to a :class:`RenderExecutor`, and answers for the images a
tenant owns. The executor runs :meth:`cloudlets.images.Images.run`; the one
here, :class:`InProcessPool`, is a pool of threads in the service process,
and the embedded default, :class:`cloudlets.service.workers.ProcessPool`,
gives each of its threads a render process.
An executor that sends renders to other machines
(:class:`cloudlets.service.queue.CeleryExecutor`) implements the same
:class:`RenderExecutor` protocol: a :class:`RenderTask` carries the request
as JSON with the claim's key and location, a worker re-prepares the render
from it (:func:`cloudlets.images.prepare_request`) and sends the result
back, and this process records it in the catalog it alone writes.

Nothing here waits for a render: a client polls ``GET /v1/images/{id}``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from cloudlets.catalog import (
    IN_FLIGHT,
    OWNER_LOST,
    CatalogEntry,
    ClaimState,
    ImageCatalog,
    ImageStatus,
)
from cloudlets.catalog.leases import stale_reason
from cloudlets.drivers.base import FormatDriver
from cloudlets.errors import CatalogError, CloudletsError, FetchError, Problem
from cloudlets.fetch import Fetcher, UrlPolicy
from cloudlets.fetch.policy import url_port
from cloudlets.images import Execute, Images, prepare_request
from cloudlets.jsondoc import JSONSyntaxError, parse_json
from cloudlets.manifest import MAX_MANIFEST_BYTES
from cloudlets.progress import ProgressCallback
from cloudlets.renderer import STAGES, Renderer
from cloudlets.service.config import (
    FetchSettings,
    FormatSettings,
    ServiceConfig,
    Target,
    TenantSettings,
)
from cloudlets.service.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    IdempotencyMismatch,
    NotFound,
    ServiceUnavailable,
    TooManyRequests,
)
from cloudlets.service.records import Owner, ServiceRecords
from cloudlets.signing import TrustPolicy
from cloudlets.urls import redact

if TYPE_CHECKING:
    from cloudlets.service.metrics import Metrics

__all__ = [
    "CreateRequest",
    "Created",
    "InProcessPool",
    "QueueFull",
    "QueueUnavailable",
    "RenderExecutor",
    "RenderJobs",
    "RenderTask",
    "StopReport",
    "renderer_for",
    "url_policy",
]

log = logging.getLogger(__name__)

#: ``error_type`` of a render the service stopped.
SERVICE_STOPPED = "ServiceStopped"
#: Statuses ``GET /v1/images`` lists unless asked for others.
LISTED = tuple(s for s in ImageStatus if s not in (ImageStatus.DELETED,
                                                   ImageStatus.SUPERSEDED))


@dataclass(frozen=True)
class CreateRequest:
    """A validated ``POST /v1/images`` body.

    :ivar manifest: the manifest document (from the body or ``manifest_url``).
    :ivar format: the format name.
    :ivar target: the storage target name.
    :ivar config: the request's render config.
    :ivar format_options: the format options the provider lets clients set.
    :ivar digest: sha256 of the request as the client sent it, for
        ``Idempotency-Key``.
    :ivar signature: the manifest's signature the request passed
        (armored SSHSIG), if any.
    :ivar manifest_url: where the manifest was read, if from a URL.
    :ivar manifest_bytes: the manifest's bytes as read from
        ``manifest_url``: what a signature covers.
    """

    manifest: Mapping[str, Any]
    format: str
    target: str
    config: Mapping[str, Any] = field(default_factory=dict)
    format_options: Mapping[str, Any] = field(default_factory=dict)
    digest: str = ""
    signature: str | None = None
    manifest_url: str | None = None
    manifest_bytes: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        """:returns: the request as JSON, what a remote executor sends."""
        return {"manifest": dict(self.manifest), "format": self.format, "target": self.target,
                "config": dict(self.config), "format_options": dict(self.format_options)}


@dataclass(frozen=True)
class Created:
    """What :meth:`RenderJobs.create` did.

    :ivar entry: the catalog entry.
    :ivar created: a new render was queued (``202``); else the same
        request's image was found (``200``).
    """

    entry: CatalogEntry
    created: bool


@dataclass(frozen=True)
class RenderTask:
    """One claimed render, as an executor sees it.

    :ivar entry_id: the claimed catalog entry.
    :ivar tenant: who asked.
    :ivar request: the request as JSON (:meth:`CreateRequest.to_json`), with
        the claim: ``output`` (the location template), ``location`` (it
        expanded), ``key`` (the request key) and ``overwrite``.
    :ivar resumed: a render a previous process of the service queued, which
        this one follows (:meth:`RenderExecutor.follow`).
    """

    entry_id: str
    tenant: str
    request: Mapping[str, Any]
    resumed: bool = False


@dataclass(frozen=True)
class StopReport:
    """What an executor left when it stopped.

    :ivar never_started: tasks still queued.
    :ivar still_running: tasks that did not finish within the grace time.
    """

    never_started: tuple[RenderTask, ...] = ()
    still_running: tuple[RenderTask, ...] = ()


class QueueFull(CloudletsError):
    """The executor takes no more tasks now."""


class QueueUnavailable(CloudletsError):
    """The executor's queue (its broker) cannot be reached now."""


class RenderExecutor(Protocol):
    """Where claimed renders run."""

    def start(self, run: Callable[[RenderTask], None]) -> None:
        """Start taking tasks; each is run with ``run(task)``."""

    def submit(self, task: RenderTask) -> None:
        """Queue a task.

        :raises QueueFull: when the queue is at its limit or stopping.
        """

    def queued(self) -> int:
        """:returns: tasks waiting for a worker."""

    def running(self) -> int:
        """:returns: tasks being run."""

    def stop(self, grace: float) -> StopReport:
        """Take no more tasks, give running ones ``grace`` seconds.

        :returns: what was left.
        """

    def execute(self, task: RenderTask) -> Execute | None:
        """How the task's render is executed.

        :returns: ``None``: in this process by the renderer; else a
            callable that waits for it elsewhere (given no job for a
            resumed task).
        """

    def check(self) -> None:
        """:raises QueueUnavailable: when no new task can be queued now."""

    def follow(self, task: RenderTask) -> bool:
        """Follow a render a previous process of the service queued
        (``task.resumed``), when this executor can still see it.

        :returns: whether it does; else the render is reported lost.
        """


class InProcessPool:
    """Render worker threads in the service process.

    The threads are daemons: a render still running when the service exits
    (past its grace time, already marked failed) does not hold the process.

    :param workers: renders at once.
    :param queue_length: tasks waiting at most.
    """

    def __init__(self, workers: int, queue_length: int) -> None:
        self.workers = workers
        self._queue: queue.Queue[RenderTask] = queue.Queue(maxsize=queue_length)
        self._running: dict[str, RenderTask] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._returned: list[RenderTask] = []

    def start(self, run: Callable[[RenderTask], None]) -> None:
        """Start the worker threads."""
        for number in range(self.workers):
            thread = threading.Thread(target=self._work, args=(run,), daemon=True,
                                      name=f"cloudlets-render-{number}")
            thread.start()
            self._threads.append(thread)

    def submit(self, task: RenderTask) -> None:
        """Queue a task.

        :raises QueueFull: when full or stopping.
        """
        if self._stopping.is_set():
            raise QueueFull("the service is stopping")
        try:
            self._queue.put_nowait(task)
        except queue.Full:
            raise QueueFull(f"{self._queue.maxsize} renders are waiting already") from None

    def queued(self) -> int:
        """:returns: tasks waiting."""
        return self._queue.qsize()

    def running(self) -> int:
        """:returns: tasks running."""
        with self._lock:
            return len(self._running)

    def stop(self, grace: float) -> StopReport:
        """Stop taking tasks; wait up to ``grace`` seconds for running ones.
        The idle workers are let go before the queue is emptied, so a task
        one of them took meanwhile is among those never started."""
        self._stopping.set()
        deadline = time.monotonic() + grace
        with self._idle:
            while self._running and time.monotonic() < deadline:
                self._idle.wait(min(0.1, max(deadline - time.monotonic(), 0.0)))
            still = tuple(self._running.values())
        idle_by = time.monotonic() + 1.0  # an idle worker wakes every 0.2 s
        for thread in self._threads:
            thread.join(timeout=max(idle_by - time.monotonic(), 0.0))
        never = list(self._returned)
        while True:
            try:
                never.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return StopReport(never_started=tuple(never), still_running=still)

    def execute(self, task: RenderTask) -> Execute | None:
        """:returns: ``None``: the renderer renders in this process."""
        return None

    def check(self) -> None:
        """Always ready while the process runs."""

    def follow(self, task: RenderTask) -> bool:
        """:returns: ``False``: a render of a previous process died with it."""
        return False

    def _work(self, run: Callable[[RenderTask], None]) -> None:
        while not self._stopping.is_set():
            try:
                task = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            with self._lock:
                if self._stopping.is_set():  # not started: stop() reports it
                    self._returned.append(task)
                    return
                self._running[task.entry_id] = task
            try:
                run(task)
            except BaseException:
                log.exception("render %s raised past its recording", task.entry_id)
            finally:
                with self._idle:
                    self._running.pop(task.entry_id, None)
                    self._idle.notify_all()


def url_policy(settings: FetchSettings, mirrors: Iterable[Mapping[str, Any]] = ()) -> UrlPolicy:
    """The library's :class:`~cloudlets.fetch.UrlPolicy` for the service's
    ``[fetch]`` settings. The provider's mirrors are always allowed.

    ``allow_hosts`` (and the mirrors' hosts) are the policy's exceptions to
    its address rules, ``allow_networks`` and ``deny_networks`` its ranges;
    ``only_hosts`` becomes the policy's host allow-list and ``ports`` its
    port list, the mirrors' added to both: an exception to the address rules
    does not open a closed list.
    """
    mirror_urls = [url for rule in mirrors for url in rule.get("mirrors", [])
                   if isinstance(url, str)]
    mirror_hosts = [urlsplit(url).netloc.lower() for url in mirror_urls]
    allowed = tuple(settings.allow_hosts) + tuple(mirror_hosts)
    options: dict[str, Any] = {"schemes": frozenset(settings.schemes),
                               "max_redirects": settings.max_redirects,
                               "allow_hosts": frozenset(allowed),
                               "allow_networks": settings.allow_networks}
    if settings.only_hosts is not None:
        options["hosts"] = frozenset(_host(entry) for entry in
                                     (*settings.only_hosts, *mirror_hosts))
    if settings.ports is not None:
        options["ports"] = frozenset(settings.ports) | {url_port(urlsplit(url))
                                                        for url in mirror_urls}
    if settings.deny_networks is not None:
        options["deny_networks"] = settings.deny_networks
    return UrlPolicy(**options)


def renderer_for(config: ServiceConfig, fetch: FetchSettings) -> Renderer:
    """The service's renderer (its presets, mirrors and cache) fetching
    under ``fetch``'s URL policy: the service's and its workers' alike."""
    fetcher = Fetcher(policy=url_policy(fetch, config.mirrors),
                      connect_timeout=fetch.connect_timeout, read_timeout=fetch.read_timeout)
    return Renderer(cache_dir=config.cache_dir, presets=config.presets,
                    mirrors=list(config.mirrors), data_dir=config.data_dir,
                    work_dir=config.data_dir / "work", ex_fetcher=fetcher,
                    ex_cache_max_bytes=config.cache_max_bytes,
                    ex_base_cache_max_bytes=config.base_cache_max_bytes)


def _host(entry: str) -> str:
    """``host`` of a ``host``, ``host:port`` or ``[v6]:port`` entry."""
    if entry.startswith("["):
        return entry[1:entry.index("]")]
    return entry.rsplit(":", 1)[0] if entry.count(":") == 1 else entry


def default_executor(config: ServiceConfig) -> RenderExecutor:
    """The executor ``[queue] backend`` names: the embedded pool of
    ``service.workers`` (a :class:`~cloudlets.service.workers.ProcessPool`,
    or an :class:`InProcessPool` of threads with ``[service] render_workers
    = "threads"``), or a :class:`~cloudlets.service.queue.CeleryExecutor`."""
    if config.queue.backend == "celery":
        from cloudlets.service.queue import CeleryExecutor

        return CeleryExecutor(config)
    if config.render_workers == "processes":
        from cloudlets.service.workers import ProcessPool

        return ProcessPool(config, config.workers, config.limits.queue_length)
    return InProcessPool(config.workers, config.limits.queue_length)


class RenderJobs:
    """The render jobs of one service: tenants' limits, claims, the
    executor, and the tenant-scoped view of the catalog.

    :param config: the service configuration.
    :param executor: where renders run; default :func:`default_executor`.
    :param metrics: counts renders and their durations, when given.
    """

    def __init__(self, config: ServiceConfig, *, executor: RenderExecutor | None = None,
                 metrics: Metrics | None = None) -> None:
        self.config = config
        self.catalog = ImageCatalog(data_dir=config.data_dir)
        # The catalog opens a connection per call; were each the last one
        # open, its close would checkpoint the WAL (fsyncs) every time. One
        # held open for the service's life keeps the checkpoints to SQLite's
        # own schedule: POST went from 50 ms to a few ms on a loaded disk.
        self._keeper = sqlite3.connect(self.catalog.path, check_same_thread=False)
        self._keeper.execute("SELECT count(*) FROM sqlite_master").fetchone()  # maps the WAL
        #: The create-image operation under the service's URL policy ...
        self.images = self._images(config.fetch)
        #: ... and under the tenants' own (``[tenants.NAME.fetch]``).
        self._tenant_images = {name: self._images(tenant.fetch)
                               for name, tenant in config.tenants.items()
                               if tenant.fetch is not None}
        self.records = ServiceRecords(config.data_dir / "service.sqlite3")
        self.executor: RenderExecutor = executor or default_executor(config)
        self.metrics = metrics
        self.accepting = False
        self._lock = threading.Lock()
        self._in_flight: dict[str, set[str]] = {}
        self._progress: dict[str, dict[str, Any]] = {}
        self._started: dict[str, float] = {}

    # -- life -------------------------------------------------------------------

    def start(self) -> list[CatalogEntry]:
        """Follow the renders a previous process left in flight that the
        executor still sees (queued on Celery); mark the others failed; then
        start the executor.

        :returns: the entries marked failed.
        """
        self.executor.start(self._run)
        reaped = []
        now = time.time()
        for entry in self.catalog.entries(statuses=list(IN_FLIGHT)):
            owner = self.records.owner(entry.entry_id)
            reason = stale_reason(entry, now)
            if owner is None or reason is None:
                continue
            task = RenderTask(entry.entry_id, owner.tenant, {}, resumed=True)
            try:
                self.catalog.adopt(entry.entry_id)
            except CatalogError:
                continue
            if self.executor.follow(task):
                log.info("following render %s of %s, queued by a previous process",
                         entry.entry_id, entry.label)
                with self._lock:
                    self._in_flight.setdefault(owner.tenant, set()).add(entry.entry_id)
                    self._started[entry.entry_id] = time.monotonic()
            else:
                reaped.append(self.catalog.fail(entry.entry_id, reason,
                                                error_type=OWNER_LOST))
        reaped.extend(self.catalog.reap_stale())
        for entry in reaped:
            log.warning("render %s of %s was cut off: %s", entry.entry_id, entry.label,
                        entry.error)
        self._warm_up()
        self.accepting = True
        return reaped

    def _warm_up(self) -> None:
        """Prepare a made-up request once per format, claiming nothing, so
        the first client's create does not pay for the first validation
        (the schema's validator, the patterns, the drivers, lazy imports):
        10 to 60 ms of the event loop, which every create of a first burst
        waited behind."""
        target = next(iter(self.config.targets.values()), None)
        if target is None:
            return
        manifest = {"name": "warm-up", "version": "0", "arch": "x86_64",
                    "filesystem": {"url": "https://warm-up.invalid/rootfs.tar.gz",
                                   "sha256": "0" * 64},
                    "boot": {"kernel": "/boot/vmlinuz", "cmdline": "console=ttyS0"},
                    "args": {"motd": {"type": "string", "default": "hello"}},
                    "templates": ["/etc/motd"]}
        for settings in self.config.formats.values():
            began = time.perf_counter()
            try:
                prepare_request(self.images.renderer, manifest, f"{target.prefix}{{key}}/",
                                target.driver, self._format(settings, {}), {})
            except CloudletsError as exc:  # a provider's presets may refuse it: no harm
                log.debug("warm-up of format %s: %s", settings.name, exc)
            log.debug("warm-up of format %s: %.1f ms", settings.name,
                      1000 * (time.perf_counter() - began))

    def stop(self) -> StopReport:
        """Take no more renders; give those in flight the configured grace
        time; mark every render that did not finish failed, so a restart
        reports it truthfully."""
        self.accepting = False
        grace = self.config.shutdown_grace
        report = self.executor.stop(grace)
        for task in report.never_started:
            self.catalog.fail(task.entry_id, "the service stopped before this render started",
                              error_type=SERVICE_STOPPED)
            self._finished(task, "failed")
        for task in report.still_running:
            self.catalog.fail(task.entry_id, f"the service stopped while this render ran "
                                             f"(it had {grace:g} s to finish)",
                              error_type=SERVICE_STOPPED)
        self.records.close()
        self._keeper.close()
        return report

    # -- the operations ------------------------------------------------------------

    def create(self, tenant: TenantSettings, request: CreateRequest,
               idempotency_key: str | None = None, *,
               lock_wait: float | None = None) -> Created:
        """Find or claim the render of a request and queue it.

        :param lock_wait: wait at most this many seconds for the catalog's
            write lock to claim (default: the catalog's timeout).

        :raises Forbidden: for a target the tenant may not use.
        :raises IdempotencyMismatch: for a key used with another request.
        :raises TooManyRequests: over the tenant's or the queue's limit.
        :raises ServiceUnavailable: while the queue's broker is away.
        :raises BadRequest: for invalid input (the library's own error named).
        :raises CatalogBusyError: past ``lock_wait``, having claimed nothing.
        """
        self._allowed(tenant, "create")
        if not self.accepting:
            raise ServiceUnavailable("the service is stopping", headers={"Retry-After": "5"})
        if tenant.targets is not None and request.target not in tenant.targets:
            raise Forbidden(f"tenant {tenant.name!r} may not use target {request.target!r}")
        if idempotency_key is not None:
            seen = self.records.idempotent(tenant.name, idempotency_key)
            if seen is not None:
                if seen[0] != request.digest:
                    raise IdempotencyMismatch(
                        "this Idempotency-Key was used with another request")
                return Created(self.catalog.refresh(seen[1]), created=False)
        self.check_queue()  # before anything is claimed
        target = self.config.targets[request.target]
        settings = self.config.formats[request.format]
        limits = self.config.limits
        reservation = f"reserved-{id(request)}-{time.monotonic_ns()}"
        with self._lock:  # reserve a slot; prepare and claim run outside the lock
            mine = self._in_flight.setdefault(tenant.name, set())
            if len(mine) >= limits.renders_per_tenant:
                raise TooManyRequests(
                    f"tenant {tenant.name!r} has {len(mine)} renders in flight "
                    f"(limit {limits.renders_per_tenant})", headers={"Retry-After": "5"})
            if self.executor.queued() >= limits.queue_length:
                raise TooManyRequests(f"{limits.queue_length} renders are waiting already",
                                      headers={"Retry-After": "5"})
            mine.add(reservation)
        try:
            fmt = self._format(settings, request.format_options)
            output = self._output(tenant, target, request)
            trust = tenant.trust or self.config.trust
            with self.catalog.waiting_at_most(lock_wait):  # the claim is its one write
                claim = self.images_for(tenant.name).submit(
                    self._signed_source(request, trust), output, target.driver, fmt,
                    dict(request.config), signature=self._signature(request, trust),
                    trust=trust, provenance_key=self.config.provenance_key)
            entry = claim.entry
            self.records.own(entry.entry_id, tenant.name, target.name)
            if claim.state is ClaimState.CLAIMED:
                with self._lock:
                    mine.add(entry.entry_id)
                    self._started[entry.entry_id] = time.monotonic()
                payload = {**request.to_json(), "tenant": tenant.name, "output": output,
                           "location": entry.output, "key": entry.key,
                           "overwrite": claim.replaces is not None}
                try:
                    self.executor.submit(RenderTask(entry.entry_id, tenant.name, payload))
                except (QueueFull, QueueUnavailable) as exc:
                    self.catalog.fail(entry.entry_id, f"not queued: {exc}",
                                      error_type=SERVICE_STOPPED)
                    with self._lock:
                        mine.discard(entry.entry_id)
                        self._started.pop(entry.entry_id, None)
                    if isinstance(exc, QueueUnavailable):
                        raise ServiceUnavailable(f"renders cannot be queued now: {exc}",
                                                 headers={"Retry-After": "5"}) from None
                    raise TooManyRequests(str(exc), headers={"Retry-After": "5"}) from None
        finally:
            with self._lock:
                mine.discard(reservation)
        if idempotency_key is not None:
            self.records.remember(tenant.name, idempotency_key, request.digest, entry.entry_id)
        return Created(entry, created=claim.state is ClaimState.CLAIMED)

    def creates_locally(self, tenant: TenantSettings) -> bool:
        """Whether :meth:`create` for this tenant (a manifest in the body)
        waits on nothing but this host's CPU and its SQLite files: the
        embedded pool queues in memory, and no trust policy runs
        ``ssh-keygen`` on the manifest's signature."""
        return isinstance(self.executor, InProcessPool) \
            and (tenant.trust or self.config.trust) is None

    def get(self, tenant: TenantSettings, ref: str, *,
            lock_wait: float | None = None) -> tuple[CatalogEntry, Owner | None]:
        """:param lock_wait: wait at most this many seconds for the
            catalog's write lock, when a render whose owner died is marked
            failed (default: the catalog's timeout).
        :returns: a tenant's image (any image for an admin) and its owner.
        :raises NotFound: when there is none it may see.
        :raises CatalogBusyError: past ``lock_wait``, having written nothing."""
        self._allowed(tenant, "read")
        try:
            entry = self.catalog.get(ref)
        except CatalogError:
            raise NotFound(f"no image {ref!r}") from None
        owner = self.records.owner(entry.entry_id)
        if not tenant.admin and (owner is None or owner.tenant != tenant.name):
            raise NotFound(f"no image {ref!r}")
        if entry.status in IN_FLIGHT and stale_reason(entry, time.time()) is not None:
            with self.catalog.waiting_at_most(lock_wait):
                entry = self.catalog.refresh(entry.entry_id)  # a dead owner: failed now
        return entry, owner

    def list(self, tenant: TenantSettings, *, name: str | None = None,
             version: str | None = None, statuses: Iterable[str] | None = None
             ) -> list[tuple[CatalogEntry, Owner | None]]:
        """:returns: a tenant's images (every image for an admin), filtered."""
        self._allowed(tenant, "read")
        owners = self.records.owners(None if tenant.admin else tenant.name)
        wanted = list(statuses) if statuses is not None else list(LISTED)
        entries = self.catalog.entries(name=name, version=version, statuses=wanted)
        return [(entry, owners.get(entry.entry_id)) for entry in entries
                if tenant.admin or entry.entry_id in owners]

    def delete(self, tenant: TenantSettings, ref: str) -> tuple[CatalogEntry, Owner | None]:
        """Deregister a published image (an AMI) and delete its artifacts
        through its target's storage driver.

        :raises NotFound: for an image the tenant may not see.
        :raises Conflict: for a render in flight.
        """
        self._allowed(tenant, "delete")
        entry, owner = self.get(tenant, ref)
        if entry.status in IN_FLIGHT:
            raise Conflict(f"image {ref!r} is {entry.status}; delete it once it is done")
        if entry.status in (ImageStatus.DELETED, ImageStatus.SUPERSEDED):
            return entry, owner
        if entry.published and entry.status is ImageStatus.READY and entry.image_id:
            self._withdraw(entry)
        target = self.config.targets.get(owner.target) if owner else None
        deleted = self.images.delete(entry.entry_id,
                                     storage=target.driver if target else None)
        return deleted.entry, owner

    def check_queue(self) -> None:
        """Check that the executor can queue renders now.

        :raises ServiceUnavailable: when it cannot (its broker is away).
        """
        try:
            self.executor.check()
        except QueueUnavailable as exc:
            raise ServiceUnavailable(f"renders cannot be queued now: {exc}",
                                     headers={"Retry-After": "5"}) from None

    def progress(self, entry_id: str) -> dict[str, Any] | None:
        """The progress of a render in flight here.

        :returns: ``{"stage": ..., "fraction": ..., "stage_fraction": ...}``,
            or ``None``."""
        with self._lock:
            found = self._progress.get(entry_id)
            return dict(found) if found else None

    def images_for(self, tenant: str) -> Images:
        """:returns: the create-image operation under the tenant's URL policy."""
        return self._tenant_images.get(tenant, self.images)

    def fetch_manifest(self, tenant: TenantSettings,
                       url: str) -> tuple[Mapping[str, Any], bytes]:
        """Read a manifest from ``manifest_url`` under the tenant's URL
        policy, checked again on every redirect.

        :returns: the document, and its bytes as read (what a signature covers).
        :raises BadRequest: when it is refused, unreachable or not a manifest.
        """
        fetcher = self.images_for(tenant.name).renderer.fetcher
        shown = redact(url)
        try:
            # policed like a tarball: every hop, and the address connected to
            body = fetcher.read(url, max_bytes=MAX_MANIFEST_BYTES, what="manifest_url")
        except FetchError as exc:
            error = "ManifestError" if "larger than" in str(exc) else "FetchError"
            raise BadRequest(str(exc), error=error) from None
        if body is None:
            raise BadRequest(f"manifest_url {shown}: HTTP 404 (not found)", error="FetchError")
        try:
            data = parse_json(body)
        except JSONSyntaxError as exc:
            raise BadRequest(f"manifest_url {shown}: {exc}", error="ManifestError",
                             problems=[exc.problem]) from None
        if not isinstance(data, dict):
            raise BadRequest(f"manifest_url {shown} is not a JSON object",
                             error="ManifestError", problems=[Problem("", "not an object")])
        return data, body

    # -- internals ----------------------------------------------------------------

    def _images(self, fetch: FetchSettings) -> Images:
        """The create-image operation over the shared catalog, its renderer
        fetching under ``fetch``'s URL policy."""
        return Images(renderer_for(self.config, fetch), self.catalog)

    @staticmethod
    def _format(settings: FormatSettings, options: Mapping[str, Any]) -> FormatDriver:
        """The format driver with a request's options; a driver that refuses
        them in its own way (a ``ValueError`` of a bad number) is a bad
        request too."""
        try:
            return settings.build(options)
        except CloudletsError:
            raise
        except Exception as exc:  # noqa: BLE001 - a third-party driver's own errors
            raise BadRequest(f"format {settings.name!r} refused the format options: "
                             f"{type(exc).__name__}: {exc}", error="ConfigurationError") from None

    @staticmethod
    def _allowed(tenant: TenantSettings, operation: str) -> None:
        if operation not in tenant.operations:
            raise Forbidden(f"tenant {tenant.name!r} may not {operation} images")

    @staticmethod
    def _signed_source(request: CreateRequest, trust: TrustPolicy | None) -> str | dict[str, Any]:
        """The manifest as the renderer gets it: its published bytes (as
        text) when a trust policy checks them, else the document."""
        if trust is not None and request.manifest_bytes is not None:
            return request.manifest_bytes.decode("utf-8", errors="replace")
        return dict(request.manifest)

    @staticmethod
    def _signature(request: CreateRequest, trust: TrustPolicy | None) -> str | None:
        """The request's signature; else, when one is required, where it
        is published: ``manifest_url + ".sig"`` (read under the tenant's URL
        policy)."""
        if request.signature is not None:
            return request.signature
        if trust is not None and trust.require_signature and request.manifest_url:
            return request.manifest_url + ".sig"
        return None

    @staticmethod
    def _output(tenant: TenantSettings, target: Target, request: CreateRequest) -> str:
        """The image's location template: under the target's prefix, in the
        tenant's own directory, keyed by everything that makes the image
        differ (the target and the format options beside the catalog key),
        so no two tenants' or variants' requests share a location."""
        variant = hashlib.sha256(json.dumps(
            {"target": target.name, "format_options": dict(request.format_options)},
            sort_keys=True, default=str).encode()).hexdigest()[:8]
        return f"{target.prefix}{tenant.name}/{{name}}/{variant}-{{key}}/"

    def _run(self, task: RenderTask) -> None:
        entry_id = task.entry_id
        status = "failed"
        try:
            images = self.images_for(task.tenant)
            execute = self.executor.execute(task)
            report = self._reporter(entry_id)
            if task.resumed:
                assert execute is not None  # follow() took it
                images.resume(entry_id, lambda: execute(None, report, overwrite=False))
            else:
                images.run(entry_id, report, ex_execute=execute)
            status = "ready"
        except CloudletsError as exc:
            log.info("render %s failed: %s: %s", entry_id, type(exc).__name__, exc)
        except Exception:
            log.exception("render %s failed", entry_id)
        finally:
            self._finished(task, status)

    def _finished(self, task: RenderTask, status: str) -> None:
        with self._lock:
            self._in_flight.get(task.tenant, set()).discard(task.entry_id)
            self._progress.pop(task.entry_id, None)
            started = self._started.pop(task.entry_id, None)
        if self.metrics is not None:
            self.metrics.render_finished(
                status, time.monotonic() - started if started is not None else None)

    def _reporter(self, entry_id: str) -> ProgressCallback:
        stages = list(STAGES)

        def report(stage: str, done: int, total: int | None) -> None:
            index = stages.index(stage) if stage in stages else None
            part = min(max(done / total, 0.0), 1.0) if total else 0.0
            overall = None if index is None else round((index + part) / len(stages), 3)
            with self._lock:
                previous = self._progress.get(entry_id, {}).get("fraction") or 0.0
                self._progress[entry_id] = {
                    "stage": stage,
                    "stage_fraction": round(part, 3) if total else None,
                    "fraction": max(previous, overall) if overall is not None else previous}

        return report

    def _withdraw(self, entry: CatalogEntry) -> None:
        """Deregister a published image with the provider's API, as
        :meth:`cloudlets.compute.CloudletsImages.delete_image` does through
        the compute driver's own ``delete_image``."""
        settings = self.config.formats.get(entry.format)
        if settings is None or entry.image_id is None:
            raise Conflict(f"image {entry.ref} was published by format {entry.format!r}, "
                           "which this service no longer offers: it cannot deregister it")
        fmt = settings.build()
        from cloudlets.aws import AWSError
        from cloudlets.drivers.formats.ec2 import EC2Format

        if not isinstance(fmt, EC2Format):
            return
        try:
            fmt.ex_client().call("DeregisterImage", {"ImageId": entry.image_id})
        except AWSError as exc:
            if exc.code not in ("InvalidAMIID.NotFound", "InvalidAMIID.Unavailable"):
                raise
