"""What every AWS-facing piece of cloudlets shares: credentials, endpoints and
errors, plus a small EC2 Query API client on libcloud's EC2 driver.

* **Credentials** come from explicit arguments, then the environment
  (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``),
  then a profile in the shared credentials file (``AWS_PROFILE``, default
  ``default``; file ``AWS_SHARED_CREDENTIALS_FILE`` or
  ``~/.aws/credentials``). They are never logged nor put in a message:
  :class:`Credentials` hides them from ``repr``.
* **Endpoints** come from a per-call override, then the AWS SDKs' standard
  variables ``AWS_ENDPOINT_URL_<SERVICE>`` (``AWS_ENDPOINT_URL_EC2``,
  ``AWS_ENDPOINT_URL_S3``) and ``AWS_ENDPOINT_URL``; ``None`` means the
  service's public regional endpoint.
* **Errors**: every failed call becomes an :class:`AWSError` naming the
  service, the call (``ImportSnapshot``) and AWS's error code.
"""

from __future__ import annotations

import configparser
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from cloudlets.errors import ConfigurationError, FormatError
from cloudlets.urls import redact

__all__ = [
    "AWSError",
    "Credentials",
    "EC2Client",
    "Endpoint",
    "endpoint_url",
    "resolve_credentials",
    "resolve_endpoint",
    "resolve_region",
]

log = logging.getLogger(__name__)


class AWSError(FormatError):
    """An AWS call failed.

    :ivar service: ``ec2``, ``s3``...
    :ivar action: the API call, e.g. ``RegisterImage``.
    :ivar code: AWS's error code (``InvalidAMIName.Duplicate``), or a
        cloudlets code for transport failures (``ConnectionError``,
        ``HTTP 502``).
    :ivar aws_message: AWS's message.
    :ivar transient: whether retrying the same call later may succeed
        (throttling, a 5xx answer, a network failure).
    """

    #: AWS error codes that mean "slow down" or "try again".
    TRANSIENT_CODES: ClassVar[frozenset[str]] = frozenset({
        "InternalError", "InternalFailure", "RequestLimitExceeded", "ServiceUnavailable",
        "Throttling", "ThrottlingException", "Unavailable"})

    def __init__(self, service: str, action: str, code: str, message: str, *,
                 transient: bool | None = None) -> None:
        self.service = service
        self.action = action
        self.code = code
        self.aws_message = message
        self.transient = code in self.TRANSIENT_CODES if transient is None else transient
        super().__init__(f"{service.upper()} {action} failed: {code}: {message}")


@dataclass(frozen=True)
class Credentials:
    """An AWS access key, secret and optional session token.

    :ivar source: where they came from (``arguments``, ``environment``,
        ``profile NAME``), for messages.
    """

    key: str
    secret: str = field(repr=False)
    token: str | None = field(default=None, repr=False)
    source: str = "arguments"


@dataclass(frozen=True)
class Endpoint:
    """A service endpoint parsed from a URL.

    :ivar url: the URL as given (credentials redacted).
    """

    host: str
    port: int
    secure: bool
    path: str
    url: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """:raises ConfigurationError: when ``url`` is not an http(s) URL."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigurationError(f"AWS endpoint {redact(url)!r} is not an http(s) URL")
        secure = parts.scheme == "https"
        try:
            port = parts.port or (443 if secure else 80)
        except ValueError as exc:
            raise ConfigurationError(f"AWS endpoint {redact(url)!r}: {exc}") from None
        return cls(host=parts.hostname, port=port, secure=secure, path=parts.path or "/",
                   url=redact(url))


def resolve_region(override: str | None = None) -> str:
    """The AWS region, as the SDKs find it.

    :param override: an explicit region, which wins.
    :returns: ``override``, else ``AWS_REGION``, else ``AWS_DEFAULT_REGION``,
        else ``us-east-1``.
    """
    return (override or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            or "us-east-1")


def resolve_endpoint(service: str, override: str | None = None, *,
                     environ: Mapping[str, str] | None = None) -> Endpoint | None:
    """Find the endpoint for ``service``.

    :param service: ``ec2`` or ``s3`` (as in ``AWS_ENDPOINT_URL_EC2``).
    :param override: a URL that wins over the environment.
    :param environ: the environment (``os.environ`` if ``None``).
    :returns: the endpoint, or ``None`` for the public AWS endpoint.
    :raises ConfigurationError: when the URL is unusable.
    """
    url = endpoint_url(service, override, environ=environ)
    return Endpoint.parse(url) if url else None


def endpoint_url(service: str, override: str | None = None, *,
                 environ: Mapping[str, str] | None = None) -> str | None:
    """The endpoint URL for ``service`` as the AWS SDKs find it, unparsed:
    ``override``, else ``AWS_ENDPOINT_URL_<SERVICE>``, else
    ``AWS_ENDPOINT_URL``; ``None`` for the public AWS endpoint."""
    env = os.environ if environ is None else environ
    return (override or env.get(f"AWS_ENDPOINT_URL_{service.upper().replace('-', '_')}")
            or env.get("AWS_ENDPOINT_URL") or None)


def resolve_credentials(key: str | None = None, secret: str | None = None,
                        token: str | None = None, *, profile: str | None = None,
                        environ: Mapping[str, str] | None = None,
                        credentials_file: str | Path | None = None) -> Credentials:
    """Find AWS credentials: explicit arguments, then the environment, then
    a profile of the shared credentials file.

    :param key: access key id.
    :param secret: secret access key (required with ``key``).
    :param token: session token.
    :param profile: profile name (else ``AWS_PROFILE``, else ``default``).
    :param environ: the environment (``os.environ`` if ``None``).
    :param credentials_file: the shared credentials file (else
        ``AWS_SHARED_CREDENTIALS_FILE``, else ``~/.aws/credentials``).
    :returns: the credentials.
    :raises ConfigurationError: when none are found or they are incomplete
        (the message never contains a secret).
    """
    env = os.environ if environ is None else environ
    if key is not None or secret is not None:
        if not key or not secret:
            raise ConfigurationError("AWS credentials need both a key and a secret")
        return Credentials(key=key, secret=secret, token=token, source="arguments")
    env_key, env_secret = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if profile is None and (env_key or env_secret):
        if not env_key or not env_secret:
            raise ConfigurationError("AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be "
                                     "set together")
        return Credentials(key=env_key, secret=env_secret,
                           token=token or env.get("AWS_SESSION_TOKEN") or None,
                           source="environment")
    name = profile or env.get("AWS_PROFILE") or "default"
    path = Path(credentials_file or env.get("AWS_SHARED_CREDENTIALS_FILE")
                or Path.home() / ".aws" / "credentials").expanduser()
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error as exc:
        raise ConfigurationError(f"cannot parse the AWS credentials file {path}: "
                                 f"{type(exc).__name__}") from None
    if not parser.has_section(name):
        raise ConfigurationError(
            "no AWS credentials: pass key and secret, set AWS_ACCESS_KEY_ID and "
            f"AWS_SECRET_ACCESS_KEY, or add profile [{name}] to {path}")
    section = parser[name]
    found_key = section.get("aws_access_key_id")
    found_secret = section.get("aws_secret_access_key")
    if not found_key or not found_secret:
        raise ConfigurationError(f"profile [{name}] in {path} lacks aws_access_key_id or "
                                 "aws_secret_access_key")
    return Credentials(key=found_key, secret=found_secret,
                       token=token or section.get("aws_session_token") or None,
                       source=f"profile {name}")


def strip_namespaces(element: ET.Element) -> ET.Element:
    """Drop the ``{namespace}`` prefix of every tag, in place: AWS and its
    stand-ins disagree on the EC2 namespace (with or without the trailing
    slash, on error documents or not).

    :returns: ``element``.
    """
    for node in element.iter():
        if isinstance(node.tag, str) and node.tag.startswith("{"):
            node.tag = node.tag.split("}", 1)[1]
    return element


def _error_from_body(body: str) -> tuple[str, str] | None:
    """:returns: ``(code, message)`` of an AWS XML error document, if it is one."""
    try:
        root = strip_namespaces(ET.fromstring(body))
    except ET.ParseError:
        return None
    error = root.find(".//Error")
    if error is None:
        return None
    return (error.findtext("Code") or "UnknownError").strip(), \
        (error.findtext("Message") or "").strip()


def _ec2_classes() -> tuple[type[Any], type[Any], tuple[type[BaseException], ...]]:
    """Build the libcloud driver subclass lazily, so importing this module
    does not need libcloud."""
    try:
        from libcloud.common.exceptions import BaseHTTPError
        from libcloud.common.types import LibcloudError
        from libcloud.compute.drivers.ec2 import EC2Connection, EC2NodeDriver, EC2Response
    except ImportError:  # pragma: no cover - depends on the installation
        raise ConfigurationError("the EC2 format needs apache-libcloud: "
                                 "pip install apache-libcloud") from None

    class _Error(LibcloudError):
        def __init__(self, code: str, message: str, status: int) -> None:
            super().__init__(f"{code}: {message}")
            self.code = code
            self.aws_message = message
            self.status = status

    class _Response(EC2Response):
        """Raises :class:`_Error` with AWS's code, whatever the namespace."""

        def parse_error(self) -> None:
            found = _error_from_body(self.body or "")
            if found is None:
                raise _Error(f"HTTP {self.status}", (self.body or "")[:200].strip(),
                             self.status)
            raise _Error(found[0], found[1], self.status)

    class _Connection(EC2Connection):
        responseCls = _Response

    class _Driver(EC2NodeDriver):
        connectionCls = _Connection

    return _Driver, _Error, (LibcloudError, BaseHTTPError)


class EC2Client:
    """EC2 Query API calls through libcloud's EC2 driver.

    Uses the driver's signed connection for every call (libcloud lacks
    ImportSnapshot's poll-free form, BootMode, EnaSupport...), always with
    Signature Version 4. The endpoint is set on this instance's
    connection, never on shared classes.

    :param credentials: the credentials.
    :param region: the AWS region (signs requests; picks the public endpoint).
    :param endpoint: an endpoint override, or ``None``.
    :param timeout: seconds per HTTP request.
    """

    service: ClassVar[str] = "ec2"

    def __init__(self, credentials: Credentials, *, region: str = "us-east-1",
                 endpoint: Endpoint | None = None, timeout: float = 60.0) -> None:
        driver_cls, self._error_cls, self._libcloud_errors = _ec2_classes()
        self.region = region
        self.endpoint = endpoint
        options: dict[str, Any] = {"timeout": timeout}
        if endpoint is not None:
            options.update(host=endpoint.host, port=endpoint.port, secure=endpoint.secure)
        try:
            self.driver = driver_cls(credentials.key, credentials.secret, token=credentials.token,
                                     region=region, signature_version="4", **options)
        except ValueError as exc:
            raise ConfigurationError(f"EC2: {exc}") from None
        self._path = endpoint.path if endpoint is not None else "/"

    def call(self, action: str, params: Mapping[str, str] | None = None) -> ET.Element:
        """Make one EC2 Query API call.

        :param action: the call, e.g. ``RegisterImage``.
        :param params: its parameters, flattened (``BlockDeviceMapping.1.DeviceName``).
        :returns: the response document, namespaces stripped.
        :raises AWSError: naming the call and AWS's error code.
        """
        query = {"Action": action, **(params or {})}
        log.debug("EC2 %s", action)
        try:
            response = self.driver.connection.request(self._path, params=query)
        except self._error_cls as exc:
            raise AWSError(self.service, action, exc.code, exc.aws_message,
                           transient=exc.status >= 500 or None) from None
        except OSError as exc:
            raise AWSError(self.service, action, type(exc).__name__,
                           f"cannot reach {self._where()}: {exc}", transient=True) from None
        except self._libcloud_errors as exc:  # malformed responses and the like
            raise AWSError(self.service, action, type(exc).__name__,
                           str(exc)[:300]) from None
        body = response.body
        try:
            return strip_namespaces(ET.fromstring(body))
        except ET.ParseError as exc:
            raise AWSError(self.service, action, "MalformedResponse",
                           f"{self._where()} answered with invalid XML: {exc}") from None

    def _where(self) -> str:
        return self.endpoint.url if self.endpoint is not None else f"EC2 in {self.region}"
