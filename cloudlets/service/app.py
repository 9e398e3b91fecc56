"""The service's ASGI application, on Starlette.

Every answer is JSON (but ``/metrics``); every bad input answers a 4xx with
an ``{"error", "message", "problems"}`` body, and nothing a handler raises
reaches the client as a traceback. The handlers only parse, authenticate
and shape answers: the work is :class:`~cloudlets.service.jobs.RenderJobs`'s.

What waits on the network, a subprocess or a storage target runs on
Starlette's thread pool: a ``manifest_url``, a signature check, a queue's
broker, deleting, listing. A poll (``GET /v1/images/{id}``: reads of the
local SQLite files) and a create that only validates and claims (the
embedded pool, no ``manifest_url``, no trust policy: about a millisecond)
run on the event loop itself. Handing them to a thread cost more than the
work: the hand-off, and then the interpreter lock passed back and forth
between the loop and twenty threads at once, which made each answer's send
wait for the lock's switch interval. On the loop, a create waits at most
:data:`LOOP_LOCK_WAIT` for the catalog's write lock (the service's render
threads hold it for a commit at a time; another process writing the same
catalog, such as the ``cloudlets`` command, may hold it longer): past it,
having claimed nothing, the create runs again on a thread, where it waits
up to the catalog's timeout, and the loop goes on answering. A poll that
marks a dead owner's render failed does the same.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloudlets.catalog import IN_FLIGHT, CatalogEntry, ImageStatus
from cloudlets.drivers.providers import get_driver
from cloudlets.drivers.types import DriverKind, FormatCapability, StorageCapability
from cloudlets.errors import (
    CatalogBusyError,
    CatalogError,
    CloudletsError,
    ConfigError,
    ManifestError,
    Problem,
    SignatureError,
)
from cloudlets.jsondoc import JSONSyntaxError, parse_json
from cloudlets.service.auth import Authenticator
from cloudlets.service.config import ServiceConfig, TenantSettings
from cloudlets.service.errors import (
    BadGateway,
    BadRequest,
    NotFound,
    PayloadTooLarge,
    ServiceError,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedMediaType,
)
from cloudlets.service.jobs import CreateRequest, RenderExecutor, RenderJobs
from cloudlets.service.metrics import CONTENT_TYPE, Metrics
from cloudlets.service.openapi import document
from cloudlets.service.records import Owner

__all__ = ["LOOP_LOCK_WAIT", "SecretFilter", "create_app", "image_view"]

log = logging.getLogger("cloudlets.service")

#: Seconds a create or a poll on the event loop waits for the catalog's
#: write lock; past it, the call runs again on a thread (see the module's text).
LOOP_LOCK_WAIT = 0.005

_CREATE_KEYS = ("manifest", "manifest_url", "config", "format", "target", "format_options",
                "signature")
_IDEMPOTENCY_KEY = re.compile(r"[!-~]{1,255}")
_ROUTES = (("/v1/images/", "/v1/images/{id}"),)


class SecretFilter(logging.Filter):
    """Replaces every configured secret in log records with ``***``.

    :param secrets: the values to hide.
    """

    def __init__(self, secrets: frozenset[str]) -> None:
        super().__init__()
        self.secrets = sorted(secrets, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        """:returns: ``text`` without the secrets."""
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        """Scrub the record's message in place."""
        if self.secrets:
            record.msg = self.scrub(record.getMessage())
            record.args = None
        return True


def image_view(entry: CatalogEntry, owner: Owner | None,
               progress: Mapping[str, Any] | None, scrub: Callable[[str], str]) -> dict[str, Any]:
    """:returns: an image as the API shows it."""
    data = entry.to_dict()
    publish = entry.details.get("publish") or {}
    if progress is None:
        if entry.status is ImageStatus.PENDING:
            progress = {"stage": "queued", "fraction": 0.0, "stage_fraction": None}
        elif entry.status is ImageStatus.READY:
            progress = {"stage": "done", "fraction": 1.0, "stage_fraction": None}
        elif entry.status is ImageStatus.RENDERING:
            progress = {"stage": "prepare", "fraction": 0.0, "stage_fraction": None}
    error = None
    if entry.error is not None or entry.status is ImageStatus.FAILED:
        message = scrub(entry.error or "")
        error = {"type": entry.error_type, "message": message,
                 "problems": _problems(message) if entry.error_type in _PROBLEM_ERRORS else []}
    return {
        "id": entry.entry_id,
        "status": str(entry.status),
        "image_id": entry.image_id,
        "provider_id": (publish.get("ami") or entry.image_id) if entry.published else None,
        "label": entry.label,
        "name": entry.manifest_name,
        "version": entry.manifest_version,
        "format": entry.format,
        "target": owner.target if owner else None,
        "tenant": owner.tenant if owner else None,
        "progress": dict(progress) if progress is not None else None,
        "artifacts": [{"role": a.role, "location": a.location, "size": a.size,
                       "sha256": a.sha256, "media_type": a.media_type}
                      for a in entry.artifacts],
        "error": error,
        "signer": {k: signer[k] for k in ("principal", "fingerprint") if k in signer}
        if isinstance(signer := entry.details.get("signature"), dict) else None,
        "provenance": {k: provenance[k] for k in ("location", "key_id") if k in provenance}
        if isinstance(provenance := entry.details.get("provenance"), dict) else None,
        "created_at": data["created_at"],
        "updated_at": data["updated_at"],
        "started_at": data["started_at"],
        "finished_at": data["finished_at"],
    }


#: Error classes whose message lists problems, one ``  /pointer: message`` a line.
_PROBLEM_ERRORS = frozenset({"ManifestError", "ConfigError", "LockedKeyError"})
_PROBLEM_LINE = re.compile(r"^  (/\S*): (.*)$", re.MULTILINE)


def _problems(message: str) -> list[dict[str, str]]:
    """The problem list of a recorded invalid-input error, from its message."""
    return [{"pointer": "" if pointer == "/" else pointer, "message": text}
            for pointer, text in _PROBLEM_LINE.findall(message)]


def _flag_names(flags: Any) -> list[str]:
    return sorted(str(member.name).lower() for member in type(flags)
                  if member.value and member in flags and member.name)


class _Api:
    """The handlers, over one configuration and its render jobs."""

    def __init__(self, config: ServiceConfig, jobs: RenderJobs, metrics: Metrics,
                 secrets: SecretFilter) -> None:
        self.config = config
        self.jobs = jobs
        self.metrics = metrics
        self.auth = Authenticator(config.tenants)
        self.secrets = secrets
        self.formats = []
        for name, settings in config.formats.items():
            cls: Any = get_driver(DriverKind.FORMAT, name)
            caps: FormatCapability = cls.capabilities
            self.formats.append({"name": name, "description": getattr(cls, "description", ""),
                                 "extension": getattr(cls, "extension", ""),
                                 "capabilities": _flag_names(caps),
                                 "client_options": sorted(settings.client_options)})
        self.targets = []
        for target in config.targets.values():
            storage_caps: StorageCapability = target.driver.capabilities
            self.targets.append({"name": target.name, "driver": target.driver.name,
                                 "capabilities": _flag_names(storage_caps)})

    # -- helpers ----------------------------------------------------------------

    def tenant(self, request: Request) -> TenantSettings:
        tenant = self.auth.tenant(request.headers.get("authorization"))
        if tenant is None:
            raise Unauthorized("a valid bearer token is needed (Authorization: Bearer TOKEN)",
                               headers={"WWW-Authenticate": 'Bearer realm="cloudlets"'})
        return tenant

    async def body(self, request: Request) -> Any:
        limit = self.config.limits.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            raise PayloadTooLarge(f"the body is over {limit} bytes")
        kind = request.headers.get("content-type", "application/json").split(";")[0].strip()
        if kind and kind != "application/json" and not kind.endswith("+json"):
            raise UnsupportedMediaType(f"the body must be application/json, not {kind!r}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"the body is over {limit} bytes")
            chunks.append(chunk)
        try:
            return parse_json(b"".join(chunks))
        except JSONSyntaxError as exc:
            raise BadRequest(f"the body is not valid JSON: {exc}", error="JSONSyntaxError",
                             problems=[exc.problem]) from None
        except (RecursionError, ValueError) as exc:
            raise BadRequest(f"the body is not usable JSON: {type(exc).__name__}",
                             error="JSONSyntaxError") from None

    def parse_create(self, data: Any) -> tuple[CreateRequest, str | None]:
        """Check a ``POST /v1/images`` body, reporting every problem at once.

        :returns: the request, and the ``manifest_url`` to fetch its
            manifest from (``None`` when the body holds the manifest).
        :raises BadRequest: with a problem per bad member.
        """
        problems: list[Problem] = []
        if not isinstance(data, dict):
            raise BadRequest("the body must be a JSON object", problems=[
                Problem("", "must be a JSON object")])
        for key in sorted(set(data) - set(_CREATE_KEYS)):
            problems.append(Problem(f"/{key}", f"unknown member (known: "
                                               f"{', '.join(_CREATE_KEYS)})"))
        if ("manifest" in data) == ("manifest_url" in data):
            problems.append(Problem("", "give one of manifest and manifest_url"))
        if "manifest" in data and not isinstance(data["manifest"], dict):
            problems.append(Problem("/manifest", "must be a JSON object"))
        url = data.get("manifest_url")
        if "manifest_url" in data and (not isinstance(url, str)
                                       or not re.match(r"(?i)https?://", url)):
            problems.append(Problem("/manifest_url", "must be an http or https URL"))
        fmt, target = data.get("format"), data.get("target")
        if not isinstance(fmt, str) or fmt not in self.config.formats:
            problems.append(Problem("/format", f"unknown format (offered: "
                                               f"{', '.join(self.config.formats)})"))
        if not isinstance(target, str) or target not in self.config.targets:
            problems.append(Problem("/target", f"unknown target (configured: "
                                               f"{', '.join(self.config.targets)})"))
        signature = data.get("signature")
        if "signature" in data and (not isinstance(signature, str)
                                    or "-----BEGIN SSH SIGNATURE-----" not in signature):
            problems.append(Problem("/signature", "must be an armored SSH signature "
                                                  "(-----BEGIN SSH SIGNATURE-----)"))
        for key in ("config", "format_options"):
            if key in data and not isinstance(data[key], dict):
                problems.append(Problem(f"/{key}", "must be a JSON object"))
        options = data.get("format_options") or {}
        if isinstance(options, dict) and isinstance(fmt, str) and fmt in self.config.formats:
            allowed = self.config.formats[fmt].client_options
            for key in sorted(set(options) - allowed):
                problems.append(Problem(
                    f"/format_options/{key}",
                    f"not an option clients may set (allowed: "
                    f"{', '.join(sorted(allowed)) or 'none'})"))
        if problems:
            raise BadRequest(f"invalid request ({len(problems)} problems)", problems=problems)
        assert isinstance(fmt, str) and isinstance(target, str)
        digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
        request = CreateRequest(manifest=data.get("manifest") or {}, format=fmt,
                                target=target, config=data.get("config") or {},
                                format_options=options, digest=digest,
                                signature=signature if isinstance(signature, str) else None)
        return request, url if "manifest_url" in data else None

    def warm_up(self) -> None:
        """Parse a made-up create body once at start (claiming nothing), so
        the first client's create pays for no first use on the body's path
        (every create of a first burst waits behind it on the event loop)."""
        body = {"manifest": {}, "format": next(iter(self.config.formats), ""),
                "target": next(iter(self.config.targets), "")}
        with contextlib.suppress(ServiceError):
            self.parse_create(parse_json(json.dumps(body).encode()))

    def view(self, entry: CatalogEntry, owner: Owner | None) -> dict[str, Any]:
        progress = self.jobs.progress(entry.entry_id) if entry.status in IN_FLIGHT else None
        return image_view(entry, owner, progress, self.secrets.scrub)

    def invalid(self, exc: CloudletsError) -> ServiceError:
        """The answer for a library error raised by a request's input."""
        message = self.secrets.scrub(str(exc))
        if isinstance(exc, ServiceError):
            return exc
        if isinstance(exc, ManifestError | ConfigError):
            prefix = "/manifest" if isinstance(exc, ManifestError) else "/config"
            return BadRequest(message, error=type(exc).__name__, problems=[
                Problem(prefix + p.pointer, self.secrets.scrub(p.message))
                for p in exc.problems])
        if isinstance(exc, CatalogError):
            log.error("catalog: %s", message)
            return ServiceUnavailable(f"the catalog cannot be used now: {message}",
                                      headers={"Retry-After": "5"})
        if isinstance(exc, SignatureError):
            return BadRequest(message, error="SignatureError", reason=exc.reason)
        return BadRequest(message, error=type(exc).__name__)

    # -- handlers ---------------------------------------------------------------

    async def create(self, request: Request) -> Response:
        tenant = self.tenant(request)
        key = request.headers.get("idempotency-key")
        if key is not None and not _IDEMPOTENCY_KEY.fullmatch(key):
            raise BadRequest("Idempotency-Key must be 1 to 255 visible ASCII characters")
        parsed, url = self.parse_create(await self.body(request))
        try:
            if url is not None:
                manifest, raw = await run_in_threadpool(self.jobs.fetch_manifest, tenant, url)
                parsed = dataclasses.replace(parsed, manifest=manifest, manifest_url=url,
                                             manifest_bytes=raw)
            if url is None and self.jobs.creates_locally(tenant):
                try:  # on the loop, unless the catalog's write lock is taken: see the module
                    created = self.jobs.create(tenant, parsed, key, lock_wait=LOOP_LOCK_WAIT)
                except CatalogBusyError:
                    created = await run_in_threadpool(self.jobs.create, tenant, parsed, key)
            else:
                created = await run_in_threadpool(self.jobs.create, tenant, parsed, key)
        except CloudletsError as exc:
            raise self.invalid(exc) from None
        owner = Owner(created.entry.entry_id, tenant.name, parsed.target)
        body = self.view(created.entry, owner)
        return JSONResponse(body, status_code=202 if created.created else 200,
                            headers={"Location": f"/v1/images/{created.entry.entry_id}"})

    async def list(self, request: Request) -> Response:
        tenant = self.tenant(request)
        query = request.query_params
        unknown = sorted(set(query) - {"name", "version", "status", "limit", "cursor"})
        problems = [Problem(f"/{k}", "unknown query parameter") for k in unknown]
        statuses = query.getlist("status")
        for status in statuses:
            if status not in {str(s) for s in ImageStatus}:
                problems.append(Problem("/status", f"unknown status {status!r}"))
        limits = self.config.limits
        limit_text = query.get("limit", str(limits.page_size))
        cursor_text = query.get("cursor", "0")
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= limits.max_page_size:
            problems.append(Problem("/limit", f"must be 1 to {limits.max_page_size}"))
        if not cursor_text.isdigit() or len(cursor_text) > 12:
            problems.append(Problem("/cursor", "not a cursor this service gave"))
        if problems:
            raise BadRequest("invalid query", problems=problems)
        limit, offset = int(limit_text), int(cursor_text)
        found = await run_in_threadpool(self.jobs.list, tenant, name=query.get("name"),
                                        version=query.get("version"),
                                        statuses=statuses or None)
        page = found[offset:offset + limit]
        more = offset + limit < len(found)
        return JSONResponse({"images": [self.view(e, o) for e, o in page],
                             "next": str(offset + limit) if more else None})

    async def get(self, request: Request) -> Response:
        tenant = self.tenant(request)
        ref = request.path_params["id"]
        try:  # local reads on the loop (and a write only for a dead owner's render)
            entry, owner = self.jobs.get(tenant, ref, lock_wait=LOOP_LOCK_WAIT)
        except CatalogBusyError:
            entry, owner = await run_in_threadpool(self.jobs.get, tenant, ref)
        return JSONResponse(self.view(entry, owner))

    async def provenance(self, request: Request) -> Response:
        tenant = self.tenant(request)
        entry, _ = await run_in_threadpool(self.jobs.get, tenant, request.path_params["id"])
        recorded = entry.details.get("provenance")
        envelope = recorded.get("envelope") if isinstance(recorded, dict) else None
        if not isinstance(envelope, dict):
            raise NotFound(f"image {entry.entry_id} has no provenance")
        return JSONResponse(envelope, media_type="application/vnd.dsse.envelope.v1+json")

    async def delete(self, request: Request) -> Response:
        tenant = self.tenant(request)
        try:
            entry, owner = await run_in_threadpool(self.jobs.delete, tenant,
                                                   request.path_params["id"])
        except ServiceError:
            raise
        except CloudletsError as exc:
            raise BadGateway(self.secrets.scrub(f"deleting failed: {exc}"),
                              error=type(exc).__name__) from None
        return JSONResponse(self.view(entry, owner))

    async def list_formats(self, request: Request) -> Response:
        self.tenant(request)
        return JSONResponse({"formats": self.formats})

    async def list_targets(self, request: Request) -> Response:
        self.tenant(request)
        return JSONResponse({"targets": self.targets})

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        if not self.jobs.accepting:
            raise ServiceUnavailable("the service is not taking renders (starting or "
                                     "stopping)", headers={"Retry-After": "5"})
        try:
            await run_in_threadpool(lambda: self.jobs.catalog.schema_version)
        except CatalogError as exc:
            raise ServiceUnavailable(self.secrets.scrub(str(exc))) from None
        await run_in_threadpool(self.jobs.check_queue)  # the broker, in Celery mode
        return JSONResponse({"status": "ready"})

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(document())

    async def prometheus(self, request: Request) -> Response:
        return Response(self.metrics.exposition(), media_type=CONTENT_TYPE)


def _error_response(error: ServiceError) -> JSONResponse:
    return JSONResponse(error.to_dict(), status_code=error.status, headers=error.headers)


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ServiceError)
    return _error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return _error_response(NotFound(f"no such resource: {request.url.path}"))
    error = ServiceError(str(exc.detail), error="HTTPError")
    return JSONResponse(error.to_dict(), status_code=exc.status_code,
                        headers=dict(exc.headers or {}))


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.error("internal error answering %s %s: %s: %s", request.method, request.url.path,
              type(exc).__name__, exc)
    error = ServiceError("internal error (a bug: see the service's log)", error="InternalError")
    return JSONResponse(error.to_dict(), status_code=500)


class _Counted:
    """Counts every answer by method, route and status, and times it
    (outermost, so the error handlers' answers count too)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        began = time.perf_counter()

        async def counting(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting)
        finally:
            self.metrics.request(scope.get("method", ""), _route(scope.get("path", "")), status,
                                 time.perf_counter() - began)


def _route(path: str) -> str:
    if path.startswith("/v1/images/") and path.count("/") == 4 \
            and path.endswith("/provenance"):
        return "/v1/images/{id}/provenance"
    for prefix, route in _ROUTES:
        if path.startswith(prefix) and "/" not in path[len(prefix):]:
            return route
    known = ("/v1/images", "/v1/formats", "/v1/targets", "/v1/healthz", "/v1/readyz",
             "/v1/openapi.json", "/metrics")
    return path if path in known else "other"


def create_app(config: ServiceConfig, *, executor: RenderExecutor | None = None) -> ASGIApp:
    """Build the service's ASGI application.

    The render jobs start with the application's lifespan (renders a
    previous process left in flight are marked failed first) and stop with
    it (see :meth:`~cloudlets.service.jobs.RenderJobs.stop`).

    :param config: the service configuration.
    :param executor: where renders run; default the in-process pool.
    :returns: the application.
    """
    metrics = Metrics()
    secrets = SecretFilter(config.secrets)
    jobs = RenderJobs(config, executor=executor, metrics=metrics)
    metrics.watch(jobs.executor.queued, jobs.executor.running)
    api = _Api(config, jobs, metrics, secrets)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await run_in_threadpool(jobs.start)
        api.warm_up()
        jobs.catalog.open_here()  # the loop's own connection: the creates' claims use it
        log.info("cloudlets service ready: %d targets, %d tenants, %d workers",
                 len(config.targets), len(config.tenants), config.workers)
        try:
            yield
        finally:
            report = await run_in_threadpool(jobs.stop)
            log.info("cloudlets service stopped: %d renders never started, %d cut off",
                     len(report.never_started), len(report.still_running))

    def route(path: str, handler: Callable[[Request], Awaitable[Response]],
              method: str) -> Route:
        return Route(path, handler, methods=[method], include_in_schema=False)

    app = Starlette(
        routes=[route("/v1/images", api.create, "POST"),
                route("/v1/images", api.list, "GET"),
                route("/v1/images/{id}", api.get, "GET"),
                route("/v1/images/{id}", api.delete, "DELETE"),
                route("/v1/images/{id}/provenance", api.provenance, "GET"),
                route("/v1/formats", api.list_formats, "GET"),
                route("/v1/targets", api.list_targets, "GET"),
                route("/v1/healthz", api.healthz, "GET"),
                route("/v1/readyz", api.readyz, "GET"),
                route("/v1/openapi.json", api.openapi, "GET"),
                route("/metrics", api.prometheus, "GET")],
        exception_handlers={ServiceError: _service_error, HTTPException: _http_error,
                            Exception: _internal_error},
        lifespan=lifespan)
    app.state.jobs = jobs
    return _Counted(app, metrics)
