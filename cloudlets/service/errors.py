"""The errors the service answers with, one HTTP status each.

They are :class:`~cloudlets.errors.CloudletsError` subclasses, so the
service's client (:mod:`cloudlets.client`) raises the same classes for the
same answers. This module imports nothing of the web framework.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from cloudlets.errors import CloudletsError, Problem

__all__ = [
    "BadGateway",
    "BadRequest",
    "Conflict",
    "Forbidden",
    "IdempotencyMismatch",
    "NotFound",
    "PayloadTooLarge",
    "ServiceError",
    "ServiceUnavailable",
    "TooManyRequests",
    "Unauthorized",
    "UnsupportedMediaType",
    "error_for_status",
]


class ServiceError(CloudletsError):
    """An answer of the rendering service that is not a success.

    :ivar status: the HTTP status.
    :ivar error: the error's class name, as the JSON body names it (the
        library's own class for invalid input: ``ManifestError``...).
    :ivar problems: for invalid input, each problem and its JSON pointer.
    :ivar headers: headers to answer with (``Retry-After``,
        ``WWW-Authenticate``).
    """

    status: ClassVar[int] = 500

    def __init__(self, message: str, *, error: str | None = None,
                 problems: Sequence[Problem] = (),
                 headers: Mapping[str, str] | None = None, reason: str | None = None) -> None:
        self.error = error or type(self).__name__
        self.problems = list(problems)
        self.reason = reason
        self.headers = dict(headers or {})
        super().__init__(message)

    def to_dict(self) -> dict[str, Any]:
        """The JSON error body.

        :returns: ``error``, ``message``, ``problems``, and for a refused
            signature its ``reason`` code.
        """
        body: dict[str, Any] = {"error": self.error, "message": str(self),
                                "problems": [{"pointer": p.pointer, "message": p.message}
                                             for p in self.problems]}
        if self.reason is not None:
            body["reason"] = self.reason
        return body


class BadRequest(ServiceError):
    """400: the request is malformed or its input invalid."""

    status = 400


class Unauthorized(ServiceError):
    """401: no valid bearer token."""

    status = 401


class Forbidden(ServiceError):
    """403: the token may not do this."""

    status = 403


class NotFound(ServiceError):
    """404: no such resource, or not this tenant's."""

    status = 404


class Conflict(ServiceError):
    """409: the resource is not in a state that allows this (a render in flight)."""

    status = 409


class PayloadTooLarge(ServiceError):
    """413: the request body is over the service's limit."""

    status = 413


class UnsupportedMediaType(ServiceError):
    """415: the body is not JSON."""

    status = 415


class IdempotencyMismatch(ServiceError):
    """422: an ``Idempotency-Key`` was used before with another request."""

    status = 422


class TooManyRequests(ServiceError):
    """429: over the tenant's renders in flight, or the queue is full."""

    status = 429


class ServiceUnavailable(ServiceError):
    """503: the service is stopping, or its catalog cannot be used."""

    status = 503


class BadGateway(ServiceError):
    """502: the storage or the provider failed while the service used it."""

    status = 502


_BY_STATUS: dict[int, type[ServiceError]] = {
    cls.status: cls for cls in (BadRequest, Unauthorized, Forbidden, NotFound, Conflict,
                                PayloadTooLarge, UnsupportedMediaType, IdempotencyMismatch,
                                TooManyRequests, BadGateway, ServiceUnavailable)}


def error_for_status(status: int, body: Any) -> ServiceError:
    """The error a client raises for an answer.

    :param status: the HTTP status.
    :param body: the decoded JSON body, or anything else.
    """
    data = body if isinstance(body, dict) else {}
    message = data.get("message") if isinstance(data.get("message"), str) else None
    problems = [Problem(str(p.get("pointer", "")), str(p.get("message", "")))
                for p in data.get("problems", []) or [] if isinstance(p, dict)]
    cls = _BY_STATUS.get(status, ServiceError)
    return cls(message or f"the service answered HTTP {status}",
               error=str(data.get("error") or cls.__name__), problems=problems)
