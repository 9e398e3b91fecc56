"""Amazon S3 and S3-compatible stores, through libcloud's S3 driver.

Uploads use libcloud's ``upload_object_via_stream``, a multipart upload in
5 MiB parts (libcloud's part size: at most 10,000 parts, so objects up to
about 48 GiB), each part sent with its ``Content-MD5`` for the server to
check. Memory stays constant: one part is buffered at a time.

**Atomicity.** An S3 multipart upload is invisible until
``CompleteMultipartUpload``; the expected size and sha256 are checked as the
last chunk is pulled, before that request, so a mismatch or a failing
source aborts the upload and nothing appears. No temporary key is needed.

**Digest metadata.** The image's sha256 is stored as ``x-amz-meta-sha256``.
When it is known before the upload (always for a file source), it is sent
with the initiation; for a stream of unknown digest the object is copied onto
itself with the metadata replaced after completion (S3 copies at most 5 GiB
in one request; a larger stream without a known digest is stored without the
metadata, and a warning is logged). After the upload the driver reads the
object's size and metadata back with ``HEAD``.

**Presigned URL.** :meth:`S3Storage.ex_presign` signs a ``GET`` URL with
AWS Signature Version 4 (query string authentication). libcloud's
``get_object_cdn_url`` is not used: it signs the host without a non-default
port (breaking MinIO or moto on another port) and leaves out the session
token of temporary credentials.

Endpoint: ``ex_endpoint_url``, else ``AWS_ENDPOINT_URL_S3``, else
``AWS_ENDPOINT_URL``, else the region's AWS endpoint. Credentials: the
arguments, else ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN``. They are never logged nor put in errors or results.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import quote, urlsplit

from cloudlets.drivers.base import UploadSource
from cloudlets.drivers.storage.libcloud import LibcloudStorage
from cloudlets.drivers.types import Storage, StorageCapability
from cloudlets.errors import ConfigurationError, StorageError

__all__ = ["S3Storage"]

log = logging.getLogger(__name__)

#: The largest object S3 copies in a single CopyObject request.
MAX_COPY_SIZE = 5 * 1024 ** 3
#: The longest validity AWS accepts for a SigV4 presigned URL (7 days).
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
#: Canned ACLs S3 accepts in ``x-amz-acl``.
CANNED_ACLS = frozenset({
    "private", "public-read", "public-read-write", "aws-exec-read", "authenticated-read",
    "bucket-owner-read", "bucket-owner-full-control", "log-delivery-write"})

_UNRESERVED = "-_.~"


def _sign(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


class S3Storage(LibcloudStorage):
    """Store artifacts in Amazon S3 or an S3-compatible store (MinIO, Ceph RGW,
    Garage, moto...).

    Location syntax: ``s3://bucket/key``. The bucket must exist.

    :param key: the access key id (else ``AWS_ACCESS_KEY_ID``).
    :param secret: the secret access key (else ``AWS_SECRET_ACCESS_KEY``).
    :param token: a session token for temporary credentials (else
        ``AWS_SESSION_TOKEN`` when the key comes from the environment too).
    :param region: the signing region (else ``AWS_REGION``,
        ``AWS_DEFAULT_REGION``, ``us-east-1``).
    :param ex_endpoint_url: ``http(s)://host[:port]`` of an S3-compatible
        store (else ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, AWS).
    :param ex_acl: a canned ACL for the stored objects (``private``,
        ``public-read``...); the bucket's default when ``None``.
    :param ex_presign_seconds: validity of the presigned ``GET`` URL put in
        each result's ``extra["presigned_url"]``; ``0`` for none.
    :param ex_read_back: download each object after upload and compare its
        sha256 (slow; per-part MD5 already protects the transfer).
    :raises ConfigurationError: for missing credentials, a bad endpoint,
        region, ACL or validity.
    """

    name: ClassVar[str] = Storage.S3
    website: ClassVar[str] = "https://docs.aws.amazon.com/AmazonS3/latest/API/"
    description: ClassVar[str] = "Amazon S3 and compatibles: multipart, digest metadata, presign"
    capabilities: ClassVar[StorageCapability] = (
        StorageCapability.STREAM | StorageCapability.VERIFY | StorageCapability.DELETE
        | StorageCapability.READ | StorageCapability.ATOMIC | StorageCapability.PRESIGN)
    #: libcloud's multipart part size (5 MiB, the S3 minimum).
    CHUNK_SIZE: ClassVar[int] = 5 * 1024 * 1024
    SCHEME: ClassVar[str] = "s3"
    BARE_LOCATIONS: ClassVar[bool] = False

    def __init__(self, key: str | None = None, secret: str | None = None, *,
                 token: str | None = None, region: str | None = None,
                 ex_endpoint_url: str | None = None, ex_acl: str | None = None,
                 ex_presign_seconds: int = 3600, ex_read_back: bool = False) -> None:
        if key is None:
            key = os.environ.get("AWS_ACCESS_KEY_ID")
            secret = secret if secret is not None else os.environ.get("AWS_SECRET_ACCESS_KEY")
            token = token if token is not None else os.environ.get("AWS_SESSION_TOKEN")
        if not key or not secret:
            raise ConfigurationError("S3 storage needs credentials: pass key and secret or "
                                     "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        if ex_acl is not None and ex_acl not in CANNED_ACLS:
            raise ConfigurationError(f"unknown S3 canned ACL {ex_acl!r}; one of "
                                     f"{', '.join(sorted(CANNED_ACLS))}")
        if not 0 <= ex_presign_seconds <= MAX_PRESIGN_SECONDS:
            raise ConfigurationError(f"ex_presign_seconds must be 0 to {MAX_PRESIGN_SECONDS}")
        self.region = (region or os.environ.get("AWS_REGION")
                       or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
        self.endpoint_url = (ex_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
                             or os.environ.get("AWS_ENDPOINT_URL") or None)
        self.ex_acl = ex_acl
        self.ex_presign_seconds = ex_presign_seconds
        self._key = key
        self._secret = secret
        self._token = token or None
        super().__init__(self._make_driver(), ex_atomic=True, ex_read_back=ex_read_back)

    def __repr__(self) -> str:
        return f"S3Storage(region={self.region!r}, endpoint_url={self.endpoint_url!r})"

    # -- extensions ---------------------------------------------------------

    def ex_presign(self, location: str, seconds: int | None = None, *,
                   now: datetime | None = None) -> str:
        """A URL anyone can ``GET`` the object with, for a limited time
        (AWS Signature Version 4, query string authentication).

        :param location: ``s3://bucket/key``.
        :param seconds: validity (default :attr:`ex_presign_seconds`, at most 7 days).
        :param now: the signing time (default: the current time).
        :returns: the presigned URL (it carries a signature: treat it as a secret).
        :raises StorageError: for a bad location.
        """
        bucket, key = self.ex_parse_location(location)
        seconds = self.ex_presign_seconds if seconds is None else seconds
        now = (now or datetime.now(UTC)).astimezone(UTC)
        amz_date = now.strftime("%Y%m%dT%H%M%SZ")
        scope = f"{now:%Y%m%d}/{self.region}/s3/aws4_request"
        scheme, host = self._origin()
        path = f"/{quote(bucket, safe=_UNRESERVED)}/{quote(key, safe='/' + _UNRESERVED)}"
        params = {
            "X-Amz-Algorithm": "AWS4-HMAC-SHA256",
            "X-Amz-Credential": f"{self._key}/{scope}",
            "X-Amz-Date": amz_date,
            "X-Amz-Expires": str(seconds),
            "X-Amz-SignedHeaders": "host",
        }
        if self._token:
            params["X-Amz-Security-Token"] = self._token
        query = "&".join(f"{quote(k, safe=_UNRESERVED)}={quote(v, safe=_UNRESERVED)}"
                         for k, v in sorted(params.items()))
        canonical = "\n".join(["GET", path, query, f"host:{host}", "", "host",
                               "UNSIGNED-PAYLOAD"])
        to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                             hashlib.sha256(canonical.encode()).hexdigest()])
        signing_key = _sign(_sign(_sign(_sign(f"AWS4{self._secret}".encode(),
                                              f"{now:%Y%m%d}"), self.region), "s3"),
                            "aws4_request")
        signature = hmac.new(signing_key, to_sign.encode(), hashlib.sha256).hexdigest()
        return f"{scheme}://{host}{path}?{query}&X-Amz-Signature={signature}"

    # -- hooks --------------------------------------------------------------

    def _object_extra(self, source: UploadSource) -> dict[str, Any]:
        extra = super()._object_extra(source)
        if self.ex_acl is not None:
            extra["acl"] = self.ex_acl
        return extra

    def _after_upload(self, container: Any, name: str, source: UploadSource,
                      location: str) -> None:
        if source.sha256 is None:
            if source.bytes_read > MAX_COPY_SIZE:
                log.warning("%s: %d bytes of unknown digest are too many to copy in place; "
                            "stored without x-amz-meta-sha256", location, source.bytes_read)
                return
            self._replace_metadata(container.name, name, source, location)
        obj = self._get_object(container.name, name, location)
        stored = (obj.meta_data or {}).get("sha256") if obj is not None else None
        if stored != source.digest:
            raise StorageError(f"{location} has x-amz-meta-sha256 {stored}, "
                               f"expected {source.digest}", location)

    def _extra(self, location: str) -> dict[str, str]:
        if not self.ex_presign_seconds:
            return {}
        return {"presigned_url": self.ex_presign(location),
                "presigned_expires_in": str(self.ex_presign_seconds)}

    # -- private helpers ----------------------------------------------------

    def _make_driver(self) -> Any:
        try:
            from libcloud.storage.drivers import s3 as libcloud_s3
        except ImportError:  # pragma: no cover - a core dependency
            raise ConfigurationError("S3 storage needs apache-libcloud: "
                                     "pip install cloudlets[s3]") from None
        host: str | None = None
        port: int | None = None
        secure = True
        if self.endpoint_url is not None:
            parts = urlsplit(self.endpoint_url)
            try:
                port = parts.port
            except ValueError:
                port = -1
            if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 \
                    or parts.path not in ("", "/") or parts.query or parts.username:
                raise ConfigurationError(f"S3 endpoint must be http(s)://host[:port], not "
                                         f"{self.endpoint_url!r}")
            host = parts.hostname
            secure = parts.scheme == "https"
        try:
            driver_cls: Any = libcloud_s3.S3StorageDriver
            return driver_cls(self._key, self._secret, secure=secure, host=host,
                              port=port, region=self.region, token=self._token)
        except ValueError:
            raise ConfigurationError(f"libcloud does not know the S3 region {self.region!r}; "
                                     f"for another store pass ex_endpoint_url and a known "
                                     f"signing region (us-east-1)") from None

    def _origin(self) -> tuple[str, str]:
        """:returns: the scheme and the ``Host`` (with a non-default port)."""
        connection = self.driver.connection
        scheme = "https" if connection.secure else "http"
        host = str(connection.host)
        port = connection.port
        if port and int(port) != (443 if connection.secure else 80):
            host = f"{host}:{port}"
        return scheme, host

    def _replace_metadata(self, bucket: str, name: str, source: UploadSource,
                          location: str) -> None:
        """Copy the object onto itself with ``x-amz-meta-sha256`` set."""
        path = f"/{bucket}/{quote(name, safe='/~')}"
        headers = {
            "x-amz-copy-source": path,
            "x-amz-metadata-directive": "REPLACE",
            "x-amz-meta-sha256": source.digest,
            "Content-Type": source.media_type,
        }
        if self.ex_acl is not None:
            headers["x-amz-acl"] = self.ex_acl
        try:
            response = self.driver.connection.request(path, method="PUT", headers=headers)
        except Exception as exc:  # noqa: BLE001 - libcloud errors have no common base
            raise self._error("record the digest of", location, exc) from None
        if response.status != 200:
            raise StorageError(f"cannot record the digest of {location}: HTTP "
                               f"{response.status}", location)
