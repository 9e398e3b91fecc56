"""Render jobs on Celery with Redis: workers on other hosts render, the
service keeps the catalog.

``[queue] backend = "celery"`` makes :func:`~cloudlets.service.jobs.default_executor`
a :class:`CeleryExecutor`. The service still claims every request in its
catalog; the executor then sends the claim as a task named :data:`TASK_NAME`
to the Redis broker, and a thread of the service follows the task's state
until a worker (``cloudlets worker``, :class:`RenderWorker`) reports the
result, which the service records. A worker holds no catalog state: it
re-prepares the render from the task's payload
(:func:`cloudlets.images.prepare_request`), checks it gets the key the
service claimed, renders with its own host's tarball cache, and reports
progress as the task's ``PROGRESS`` state and the result as its return
value.

Crash safety is Celery's and Redis's: a task is acknowledged once it
returns (``acks_late``) and given back when its worker process dies
(``reject_on_worker_lost``); a task whose whole worker was killed stays
unacknowledged in Redis and is handed to another worker after
``[queue] visibility_timeout`` seconds. Each delivery is counted in Redis;
past ``[queue] max_attempts`` the render fails with the reason. A render run
again removes the partial files its killed predecessor left and may replace
an artifact it had stored: the location is the claimed entry's own.

Celery and redis-py are the optional extra ``cloudlets[celery]``; this
module imports them when it is used.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from cloudlets.catalog.records import jsonable
from cloudlets.errors import CloudletsError, ConfigurationError
from cloudlets.images import Execute
from cloudlets.progress import ProgressCallback
from cloudlets.renderer import Renderer
from cloudlets.result import RenderResult
from cloudlets.service.config import CELERY_EXTRA_HINT, ServiceConfig, Target
from cloudlets.service.jobs import (
    QueueFull,
    QueueUnavailable,
    RenderTask,
    StopReport,
    renderer_for,
)
from cloudlets.service.workers import RemoteRenderError, render_payload, with_signer
from cloudlets.urls import redact

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["TASK_NAME", "CeleryExecutor", "RemoteRenderError", "RenderWorker", "celery_app",
           "require_celery_extra"]

log = logging.getLogger(__name__)

#: The render task's name, which the service sends and the workers register.
TASK_NAME = "cloudlets.render"
#: The state the service stores for a task before sending it: a task the
#: backend does not know (``PENDING``) was never queued, or lost with Redis.
QUEUED = "QUEUED"
#: The state a worker reports while it renders, with the stage in its meta.
PROGRESS = "PROGRESS"
#: ``error_type`` of a render whose workers were lost ``max_attempts`` times.
WORKER_LOST = "WorkerLost"
#: ``error_type`` of a render the queue lost (Redis restarted without it).
QUEUE_LOST = "QueueLost"
#: Looks at a task the backend does not know before it is called lost.
_UNKNOWN_LOOKS = 20
#: Seconds between the worker's progress reports, at most one in this time.
_PROGRESS_INTERVAL = 0.25


def require_celery_extra() -> None:
    """Check that the ``cloudlets[celery]`` extra is installed.

    :raises ConfigurationError: naming the missing module and the extra.
    """
    for module in ("celery", "redis"):
        try:
            __import__(module)
        except ImportError:
            raise ConfigurationError(f"the Celery queue needs {module}, which is not "
                                     f"installed: {CELERY_EXTRA_HINT}") from None


def celery_app(config: ServiceConfig, *, patient: bool = True) -> Celery:
    """The Celery application of a service configuration, for the service
    and its workers alike (they read the same file).

    :param patient: retry the result backend for about 20 s when Redis is
        away (a worker storing a render's result); else give up within a
        second (the service answering a create: 503 rather than a hang).

    :raises ConfigurationError: without ``cloudlets[celery]``, or when the
        configuration is not ``[queue] backend = "celery"``.
    """
    require_celery_extra()
    from celery import Celery

    queue = config.queue
    if queue.backend != "celery" or queue.broker_url is None:
        raise ConfigurationError(f"{config.source}: [queue] backend = \"celery\" and "
                                 "broker_url are needed for Celery workers")
    transport = {
        "visibility_timeout": queue.visibility_timeout,
        # a killed worker's task is looked for every quarter of the timeout
        "unacked_restore_interval": max(min(queue.visibility_timeout / 4.0, 10.0), 0.5),
        "unacked_restore_throttle": 1,
        "socket_timeout": 10.0,
        "socket_connect_timeout": 2.0,
    }
    app = Celery("cloudlets", broker=queue.broker_url, backend=queue.result_backend,
                 set_as_current=False)
    app.conf.update(
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_acks_late=True, task_reject_on_worker_lost=True, task_track_started=True,
        worker_prefetch_multiplier=1, task_default_queue=queue.name,
        broker_transport_options=transport,
        result_backend_transport_options={**transport, "retry_policy": {
            "max_retries": 20 if patient else 2, "interval_start": 0,
            "interval_step": 1.0 if patient else 0.2, "interval_max": 1.0 if patient else 0.5}},
        broker_connection_retry_on_startup=True, broker_connection_timeout=2.0,
        result_expires=max(int(queue.visibility_timeout) * 4, 86400),
        worker_hijack_root_logger=False, worker_redirect_stdouts=False,
        worker_cancel_long_running_tasks_on_connection_loss=False)
    return app


def _attempts_key(task_id: str) -> str:
    return f"cloudlets-attempts-{task_id}"


class CeleryExecutor:
    """The :class:`~cloudlets.service.jobs.RenderExecutor` that sends
    claimed renders to Celery workers and follows each on a thread of the
    service until its worker reports the result.

    A stopping service leaves its renders on the queue: they stay in flight
    in the catalog, and the next service process follows them again
    (:meth:`follow`).

    :param config: the service configuration (``[queue] backend = "celery"``).
    """

    def __init__(self, config: ServiceConfig) -> None:
        import redis

        self.config = config
        self.app = celery_app(config, patient=False)
        self.limit = config.limits.queue_length
        self.poll_interval = config.queue.poll_interval
        self.max_attempts = config.queue.max_attempts
        self._redis = redis.Redis.from_url(str(config.queue.broker_url), socket_timeout=2.0,
                                           socket_connect_timeout=2.0)
        self._run: Callable[[RenderTask], None] | None = None
        self._lock = threading.Lock()
        self._states: dict[str, str] = {}
        self._wakeups: dict[str, threading.Event] = {}
        self._stopping = threading.Event()

    def start(self, run: Callable[[RenderTask], None]) -> None:
        """Take tasks; each is followed with ``run(task)`` on its own thread.
        A listener of the result backend's notifications wakes a task's
        thread when its state changes, so a result is recorded within
        milliseconds; between them each thread looks every
        ``poll_interval`` seconds anyway (a notification lost while Redis
        was away)."""
        self._run = run
        threading.Thread(target=self._listen, daemon=True, name="cloudlets-queue-listen").start()

    def check(self) -> None:
        """:raises QueueUnavailable: when Redis does not answer."""
        import redis

        try:
            self._redis.ping()
        except (redis.RedisError, OSError) as exc:
            raise QueueUnavailable(f"the Redis broker {redact(str(self.config.queue.broker_url))} "
                                   f"does not answer ({type(exc).__name__})") from None

    def submit(self, task: RenderTask) -> None:
        """Send the task to the broker, then follow it.

        :raises QueueFull: over ``limits.queue_length`` renders followed, or
            stopping.
        :raises QueueUnavailable: when the broker does not take it.
        """
        if self._stopping.is_set():
            raise QueueFull("the service is stopping")
        with self._lock:
            if len(self._states) >= self.limit:
                raise QueueFull(f"{self.limit} renders are waiting already")
            self._states[task.entry_id] = QUEUED
        try:
            self.app.backend.store_result(task.entry_id, {"attempt": 0}, QUEUED)
            self.app.send_task(TASK_NAME, args=[dict(task.request)], task_id=task.entry_id,
                               queue=self.config.queue.name, retry=False)
        except Exception as exc:  # noqa: BLE001 - kombu's and redis-py's own errors
            with self._lock:
                self._states.pop(task.entry_id, None)
            raise QueueUnavailable(f"the Redis broker did not take the render "
                                   f"({type(exc).__name__}: {exc})") from None
        self._follow(task)

    def follow(self, task: RenderTask) -> bool:
        """Follow a render a previous service process queued, when the
        result backend knows it (else it was never queued, or Redis lost
        it). A backend that cannot be reached now is followed too, until it
        answers.

        :returns: whether the task is followed.
        """
        try:
            state = self.app.AsyncResult(task.entry_id).state
        except Exception:  # noqa: BLE001 - Redis away: look again once it is back
            state = QUEUED
        if state == "PENDING":
            return False
        with self._lock:
            self._states[task.entry_id] = state
        self._follow(task)
        return True

    def execute(self, task: RenderTask) -> Execute:
        """What waits for the task's result; the job is the worker's to
        prepare again (the payload carries its inputs).

        :returns: ``execute(job, progress, overwrite=...)``.
        """

        def wait(job: Any, progress: ProgressCallback | None, *,
                 overwrite: bool = False) -> RenderResult:
            return with_signer(job, self._wait(task.entry_id, progress))

        return wait

    def queued(self) -> int:
        """:returns: renders sent that no worker has started."""
        with self._lock:
            return sum(1 for state in self._states.values() if state == QUEUED)

    def running(self) -> int:
        """:returns: renders a worker has started."""
        with self._lock:
            return sum(1 for state in self._states.values() if state != QUEUED)

    def stop(self, grace: float) -> StopReport:
        """Take no more tasks. The renders sent stay on the queue, their
        entries in flight for the next service process to follow: nothing
        is reported as cut off."""
        self._stopping.set()
        return StopReport()

    # -- internals ----------------------------------------------------------------

    def _follow(self, task: RenderTask) -> None:
        run = self._run
        assert run is not None, "start() first"

        def follow() -> None:
            try:
                run(task)
            finally:
                with self._lock:
                    self._states.pop(task.entry_id, None)

        threading.Thread(target=follow, daemon=True,
                         name=f"cloudlets-follow-{task.entry_id}").start()

    def _listen(self) -> None:
        """Wake the thread of a task whose state the result backend
        published (Celery's Redis backend publishes every state it stores,
        on the state's own key)."""
        prefix = self.app.backend.task_keyprefix
        prefix = prefix.decode() if isinstance(prefix, bytes) else str(prefix)
        while not self._stopping.is_set():
            try:
                # redis-py types pubsub() from 8.x on and not before: go through
                # Any so mypy --strict passes with either.
                client: Any = self._redis
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.psubscribe(prefix + "*")
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    channel = message.get("channel", b"")
                    name = channel.decode() if isinstance(channel, bytes) else str(channel)
                    with self._lock:
                        wakeup = self._wakeups.get(name.removeprefix(prefix))
                    if wakeup is not None:
                        wakeup.set()
            except Exception as exc:  # noqa: BLE001 - Redis away: the threads poll
                log.debug("queue notifications stopped: %s", exc)
                self._stopping.wait(1.0)

    def _wait(self, entry_id: str, progress: ProgressCallback | None) -> RenderResult:
        """Wait for the task's state until it is done; Redis away is waited
        out (the service keeps the entry's lease meanwhile)."""
        wakeup = threading.Event()
        with self._lock:
            self._wakeups[entry_id] = wakeup
        try:
            return self._watch(entry_id, progress, wakeup)
        finally:
            with self._lock:
                self._wakeups.pop(entry_id, None)

    def _watch(self, entry_id: str, progress: ProgressCallback | None,
               wakeup: threading.Event) -> RenderResult:
        backend = self.app.backend
        unknown = 0
        while True:
            if self._stopping.is_set():  # the next process follows it
                threading.Event().wait()
            try:
                meta = backend.get_task_meta(entry_id, cache=False)  # one read
                state, info = meta["status"], meta.get("result")
            except Exception as exc:  # noqa: BLE001 - Redis away: wait for it
                log.debug("render %s: the result backend is away: %s", entry_id, exc)
                time.sleep(max(self.poll_interval, 0.5))
                continue
            with self._lock:
                if entry_id in self._states and state != "PENDING":
                    self._states[entry_id] = state
            if state == "SUCCESS":
                return self._outcome(entry_id, info)
            if state == "FAILURE":
                raise RemoteRenderError(f"the worker failed: {info}", type(info).__name__)
            if state == "PENDING":
                unknown += 1
                if unknown >= _UNKNOWN_LOOKS:
                    raise RemoteRenderError("the queue lost this render (Redis restarted "
                                            "without its data?)", QUEUE_LOST)
            else:
                unknown = 0
            if state == PROGRESS and progress is not None and isinstance(info, Mapping):
                stage, done, total = info.get("stage"), info.get("done"), info.get("total")
                if isinstance(stage, str) and isinstance(done, int):
                    progress(stage, done, total if isinstance(total, int) else None)
            wakeup.wait(self.poll_interval)
            wakeup.clear()

    @staticmethod
    def _outcome(entry_id: str, info: Any) -> RenderResult:
        if not isinstance(info, Mapping) or "ok" not in info:
            raise RemoteRenderError(f"render {entry_id}: the worker answered {info!r}",
                                    "WorkerError")
        if not info["ok"]:
            raise RemoteRenderError(str(info.get("message", "")),
                                    str(info.get("error_type", "WorkerError")))
        return RenderResult.from_dict(info["result"])


class RenderWorker:
    """What ``cloudlets worker`` runs: the render task over a service
    configuration, with its own tarball cache and no catalog.

    :param config: the service configuration (the same file as the service's).
    """

    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self.app = celery_app(config)
        self._renderers: dict[str | None, Renderer] = {}
        self._lock = threading.Lock()
        worker = self

        def render(task: Any, payload: dict[str, Any]) -> dict[str, Any]:
            return worker.render(task, payload)

        self.task = self.app.task(bind=True, name=TASK_NAME, acks_late=True,
                                  reject_on_worker_lost=True)(render)

    def run(self, concurrency: int, log_level: str = "INFO") -> None:
        """Consume renders until stopped (SIGTERM: warm shutdown, the renders
        running finish first)."""
        hostname = f"cloudlets-{os.getpid()}@{socket.gethostname()}"
        self.app.Worker(pool="threads", concurrency=concurrency, loglevel=log_level,
                        hostname=hostname, queues=[self.config.queue.name],
                        without_gossip=True, without_mingle=True, optimization="fair",
                        ).start()

    def renderer(self, tenant: str) -> Renderer:
        """:returns: the renderer under the tenant's URL policy."""
        settings = self.config.tenants.get(tenant)
        own = settings.fetch if settings is not None else None
        key = tenant if own is not None else None
        with self._lock:
            if key not in self._renderers:
                self._renderers[key] = renderer_for(self.config, own or self.config.fetch)
            return self._renderers[key]

    def render(self, task: Any, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Render one task's payload.

        :returns: ``{"ok": true, "result": ...}`` or ``{"ok": false,
            "error_type": ..., "message": ...}``: a render's failure is an
            answer, not a task failure (Celery would retry or pickle it).
        """
        task_id = str(task.request.id)
        client = self.app.backend.client
        attempt = int(client.incr(_attempts_key(task_id)))
        client.expire(_attempts_key(task_id), int(self.config.queue.visibility_timeout * 4))
        limit = self.config.queue.max_attempts
        if attempt > limit:
            return {"ok": False, "error_type": WORKER_LOST,
                    "message": f"the render was started {attempt - 1} times and its worker "
                               f"was lost each time (limit [queue] max_attempts = {limit})"}
        try:
            result = self._render(task, payload, attempt)
        except CloudletsError as exc:
            log.info("render %s failed: %s: %s", task_id, type(exc).__name__, exc)
            return {"ok": False, "error_type": type(exc).__name__, "message": str(exc)}
        except Exception as exc:
            log.exception("render %s failed", task_id)
            return {"ok": False, "error_type": type(exc).__name__,
                    "message": f"{type(exc).__name__}: {exc}"}
        return {"ok": True, "result": jsonable(result.to_dict())}

    def _render(self, task: Any, payload: Mapping[str, Any], attempt: int) -> RenderResult:
        def sweep(target: Target, location: str) -> None:
            remove = getattr(target.driver, "ex_remove_partials", None)
            if attempt > 1 and remove is not None:  # a worker was lost with this render
                for path in remove(location):  # its leftovers go
                    log.info("render %s: removed %s, left by a lost worker", task.request.id,
                             path)

        return render_payload(self.config, self.renderer(str(payload.get("tenant", ""))),
                              payload, self._progress(task, attempt), overwrite=attempt > 1,
                              before=sweep)

    @staticmethod
    def _progress(task: Any, attempt: int) -> ProgressCallback:
        seen: set[str] = set()
        last = [0.0]  # when the last report went
        lock = threading.Lock()  # the download reports from a thread of its own

        def report(stage: str, done: int, total: int | None) -> None:
            # a stage's first report goes at once; others once per interval
            # (fetch and rootfs report in turns while the tarball streams)
            now = time.monotonic()
            with lock:
                if stage in seen and now - last[0] < _PROGRESS_INTERVAL:
                    return
                seen.add(stage)
                last[0] = now
            try:
                task.update_state(state=PROGRESS, meta={"stage": stage, "done": done,
                                                        "total": total, "attempt": attempt,
                                                        "worker": task.request.hostname})
            except Exception as exc:  # noqa: BLE001 - progress is best effort
                log.debug("progress of %s not sent: %s", task.request.id, exc)

        return report

