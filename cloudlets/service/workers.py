"""Render worker processes: the embedded pool's default.

A render spends much of its time in Python (the tar reader, the templates,
the catalog's bookkeeping), and threads of the service's process would
share its one interpreter lock with the event loop: each render's Python
work delays every request the API answers. :class:`ProcessPool` keeps the
:class:`~cloudlets.service.jobs.InProcessPool`'s threads, its queue and its
stop rules, and gives each thread a render process of its own (started
with ``spawn``: nothing of the service's threads, locks or connections
crosses into it). The thread holds the render's lease in the catalog and
records its outcome, as for a thread render; the process re-prepares the
render from the task's payload (:func:`render_payload`, what a Celery
worker runs too), checks it gets the key the service claimed, renders, and
sends its progress and its result back on a pipe. Render processes run
:data:`RENDER_NICENESS` steps nicer than the service, so a busy host
answers requests before it renders.

A render process that dies (killed, out of memory) fails the render it ran
(``WorkerLost``) and is started again for the next one. On stop, the
processes of renders still running past the grace time are terminated, so
nothing writes an artifact of a render the catalog records as failed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Callable, Mapping
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from cloudlets.catalog.records import jsonable
from cloudlets.errors import CloudletsError, ConfigurationError
from cloudlets.images import Execute, prepare_request
from cloudlets.progress import ProgressCallback
from cloudlets.renderer import Renderer
from cloudlets.result import RenderResult
from cloudlets.service.config import ServiceConfig, Target
from cloudlets.service.jobs import (
    SERVICE_STOPPED,
    InProcessPool,
    RenderTask,
    StopReport,
    renderer_for,
)

__all__ = ["RENDER_NICENESS", "WORKER_LOST", "ProcessPool", "RemoteRenderError", "render_payload",
           "with_signer"]

log = logging.getLogger(__name__)

#: ``error_type`` of a render whose worker process died.
WORKER_LOST = "WorkerLost"
#: How much nicer than the service a render process runs (``nice(2)``; no
#: privilege needed): when the cores are busy, the API's answers go first
#: and the renders take the rest.
RENDER_NICENESS = 10
#: Seconds between a render process's looks at whether the service lives.
_PARENT_WATCH = 0.5
#: Seconds a render process gets to exit once told to, before it is killed.
_EXIT_TIMEOUT = 2.0
#: Seconds a render process gets to start (import cloudlets, read the
#: configuration) before the service gives up on it.
_START_TIMEOUT = 60.0


class RemoteRenderError(CloudletsError):
    """A render failed in a worker (a process, or a Celery worker);
    :attr:`remote_type` names the worker's error class (``FetchError``...),
    recorded as the entry's ``error_type``.

    :ivar remote_type: the error class's name on the worker.
    """

    def __init__(self, message: str, remote_type: str) -> None:
        super().__init__(message)
        self.remote_type = remote_type


def render_payload(config: ServiceConfig, renderer: Renderer, payload: Mapping[str, Any],
                   progress: ProgressCallback | None, *, overwrite: bool = False,
                   before: Callable[[Target, str], None] | None = None) -> RenderResult:
    """Render a task's payload (:class:`~cloudlets.service.jobs.RenderTask`
    ``request``) in a worker: prepare it again from the service's
    configuration and check it is the render the service claimed.

    The signature was checked by the service before it queued the render;
    the provenance is signed here, where the artifacts are.

    :param overwrite: replace what is at the location (a render run again).
    :param before: called with the target and the location once the render
        is checked, before it runs.
    :raises ConfigurationError: when the worker's configuration does not
        know the target or format, or prepares another key or location.
    :raises CloudletsError: what the render raised.
    """
    target = config.targets.get(str(payload["target"]))
    settings = config.formats.get(str(payload["format"]))
    if target is None or settings is None:
        raise ConfigurationError(f"this worker's {config.source} has no target "
                                 f"{payload['target']!r} or format {payload['format']!r}: "
                                 "workers must read the service's configuration")
    job, request = prepare_request(
        renderer, dict(payload["manifest"]), str(payload["output"]), target.driver,
        settings.build(payload["format_options"]), dict(payload["config"]),
        provenance_key=config.provenance_key)
    if request.key != payload["key"] or job.output != payload["location"]:
        raise ConfigurationError(f"this worker prepared request key {request.key[:16]} at "
                                 f"{job.output}, the service claimed {payload['key'][:16]} "
                                 f"at {payload['location']}: the worker's {config.source} "
                                 "differs from the service's (presets, mirrors)")
    if before is not None:
        before(target, job.output)
    return renderer.execute(job, progress,
                            overwrite=bool(payload.get("overwrite")) or overwrite)


def with_signer(job: Any, result: RenderResult) -> RenderResult:
    """``result`` with the signer the service verified at the claim (a
    worker does not check the signature again)."""
    signer = getattr(job, "signer", None)
    if signer is not None and "signature" not in result.details:
        result = dataclasses.replace(
            result, details={**result.details, "signature": signer.to_dict()})
    return result


def _config_recipe(config: ServiceConfig) -> tuple[str, Any]:
    """How a render process gets the service's configuration: the object
    itself when it pickles, else its file read again."""
    try:
        return "config", pickle.dumps(config)
    except Exception:  # noqa: BLE001 - a driver holding a client that does not pickle
        if config.source.startswith("<"):
            raise ConfigurationError("the service's configuration cannot be sent to render "
                                     "processes: set [service] render_workers = "
                                     "\"threads\"") from None
        return "file", config.source


def _child_main(conn: Connection, recipe: tuple[str, Any], level: int,
                secrets: frozenset[str]) -> None:
    """A render process: render each payload the pipe brings, until it
    closes. SIGINT (a terminal's Ctrl-C, sent to the whole group) is the
    service's to handle: the render goes on through its grace time."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.nice(RENDER_NICENESS)
    parent = os.getppid()
    threading.Thread(target=_outlive_not, args=(parent,), daemon=True,
                     name="cloudlets-parent-watch").start()
    from cloudlets.cli_serve import log_to_stderr

    log_to_stderr(logging.getLevelName(level).lower(), secrets)
    kind, value = recipe
    config: ServiceConfig = pickle.loads(value) if kind == "config" \
        else ServiceConfig.load(Path(value))
    renderers: dict[str | None, Renderer] = {None: renderer_for(config, config.fetch)}
    conn.send(("ready",))
    while True:
        try:
            payload, overwrite = conn.recv()
        except (EOFError, OSError):
            return
        tenant = config.tenants.get(str(payload.get("tenant", "")))
        own = tenant.fetch if tenant is not None else None
        key = str(payload.get("tenant")) if own is not None else None
        if key not in renderers:
            renderers[key] = renderer_for(config, own or config.fetch)

        def report(stage: str, done: int, total: int | None) -> None:
            conn.send(("progress", stage, done, total))

        try:
            result = render_payload(config, renderers[key], payload, report,
                                    overwrite=overwrite)
            answer: tuple[Any, ...] = ("done", jsonable(result.to_dict()))
        except CloudletsError as exc:
            answer = ("failed", type(exc).__name__, str(exc))
        except Exception as exc:
            log.exception("render of %s failed", payload.get("key", "?")[:16])
            answer = ("failed", type(exc).__name__, f"{type(exc).__name__}: {exc}")
        try:
            conn.send(answer)
        except (BrokenPipeError, OSError):
            return


def _outlive_not(parent: int) -> None:
    """End this render process once the service is gone (killed: it could
    not stop it), so no render goes on writing for a dead service."""
    while os.getppid() == parent:
        time.sleep(_PARENT_WATCH)
    os._exit(3)


class _RenderProcess:
    """One render process and the service's end of its pipe."""

    def __init__(self, context: Any, recipe: tuple[str, Any], secrets: frozenset[str],
                 number: int) -> None:
        ours, theirs = context.Pipe()
        self.process: BaseProcess = context.Process(
            target=_child_main, args=(theirs, recipe, logging.getLogger().getEffectiveLevel(),
                                      secrets),
            name=f"cloudlets-render-{number}", daemon=True)
        self.process.start()
        theirs.close()
        self.conn: Connection = ours
        self.ready = False

    def wait_ready(self, timeout: float) -> bool:
        """Wait until the process has read its configuration.

        :returns: whether it did within ``timeout`` seconds.
        """
        try:
            if self.conn.poll(timeout):
                self.ready = self.conn.recv() == ("ready",)
        except (EOFError, OSError):
            pass
        return self.ready

    def render(self, payload: Mapping[str, Any], overwrite: bool,
               progress: ProgressCallback | None) -> RenderResult:
        try:
            if not self.ready and not self.wait_ready(_START_TIMEOUT):
                raise EOFError
            self.conn.send((dict(payload), overwrite))
            while True:
                message = self.conn.recv()
                if message[0] == "progress":
                    if progress is not None:
                        progress(message[1], message[2], message[3])
                elif message[0] == "done":
                    return RenderResult.from_dict(message[1])
                else:
                    raise RemoteRenderError(message[2], message[1])
        except (EOFError, OSError):
            self.process.join(0.5)
            raise RemoteRenderError(f"the render process {self.process.pid} died "
                                    f"(exit code {self.process.exitcode})",
                                    WORKER_LOST) from None

    def alive(self) -> bool:
        return self.process.is_alive()

    def close(self, *, kill: bool) -> None:
        """Let the process go: at once when ``kill``, else once it has read
        that the pipe closed."""
        if kill:
            self.process.terminate()
        self.conn.close()
        self.process.join(_EXIT_TIMEOUT)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(_EXIT_TIMEOUT)


class ProcessPool(InProcessPool):
    """The :class:`~cloudlets.service.jobs.InProcessPool`'s threads, each
    rendering in a process of its own (see the module's text).

    :param config: the service configuration, which the processes render under.
    :param workers: renders at once (processes).
    :param queue_length: tasks waiting at most.
    """

    def __init__(self, config: ServiceConfig, workers: int, queue_length: int) -> None:
        super().__init__(workers, queue_length)
        self._recipe = _config_recipe(config)
        self._secrets = config.secrets
        self._context = multiprocessing.get_context("spawn")
        self._processes: dict[int, _RenderProcess] = {}  # by thread ident
        self._busy: dict[int, str] = {}  # thread ident -> entry id rendering
        self._spares: list[_RenderProcess] = []  # started, not yet a thread's
        self._guard = threading.Lock()
        self._numbers = iter(range(1 << 30))
        self._cut: set[str] = set()  # entry ids whose process stop() terminates

    def execute(self, task: RenderTask) -> Execute:
        """The render of a task in this worker thread's process.

        :returns: ``execute(job, progress, overwrite=...)``.
        """

        def render(job: Any, progress: ProgressCallback | None, *,
                   overwrite: bool = False) -> RenderResult:
            process = self._process()
            ident = threading.get_ident()
            with self._guard:
                self._busy[ident] = task.entry_id
            try:
                result = process.render(task.request, overwrite, progress)
            except RemoteRenderError as exc:
                if exc.remote_type == WORKER_LOST:
                    with self._guard:
                        self._processes.pop(ident, None)
                        cut = task.entry_id in self._cut
                    if cut:  # stop() terminated it: say so, as the service will
                        raise RemoteRenderError(
                            "the service stopped while this render ran (its process "
                            "was terminated)", SERVICE_STOPPED) from None
                raise
            finally:
                with self._guard:
                    self._busy.pop(ident, None)
            return with_signer(job, result)

        return render

    def stop(self, grace: float) -> StopReport:
        """As :meth:`InProcessPool.stop`; then the processes go, those of
        renders still running terminated."""
        report = super().stop(grace)
        cut = {task.entry_id for task in report.still_running}
        with self._guard:
            self._cut |= cut
            processes = [(process, self._busy.get(ident) in cut)
                         for ident, process in self._processes.items()]
            processes += [(process, False) for process in self._spares]
            self._processes.clear()
            self._spares.clear()
        for process, running in processes:
            process.close(kill=running)
        return report

    def start(self, run: Callable[[RenderTask], None]) -> None:
        """Start the render processes, wait until each has read the
        configuration (so the service is ready when its workers are), then
        the threads."""
        spares = [_RenderProcess(self._context, self._recipe, self._secrets, next(self._numbers))
                  for _ in range(self.workers)]
        for process in spares:
            if not process.wait_ready(_START_TIMEOUT):
                log.error("render process %s did not start (exit code %s); it is started "
                          "again for the first render", process.process.pid,
                          process.process.exitcode)
        with self._guard:
            self._spares = spares
        super().start(run)

    def _work(self, run: Callable[[RenderTask], None]) -> None:
        ident = threading.get_ident()
        with self._guard:
            if self._spares:
                self._processes[ident] = self._spares.pop()
        super()._work(run)

    def _process(self) -> _RenderProcess:
        """This thread's render process, started again if it died."""
        ident = threading.get_ident()
        with self._guard:
            process = self._processes.get(ident)
        if process is None or not process.alive():
            if process is not None:
                process.close(kill=True)
            process = _RenderProcess(self._context, self._recipe, self._secrets,
                                     next(self._numbers))
            with self._guard:
                self._processes[ident] = process
            if self._stopping.is_set():  # stop() may have let the others go already
                with self._guard:
                    self._processes.pop(ident, None)
                process.close(kill=False)
        return process
