"""Amazon S3 and S3-compatible stores, on libcloud's S3 driver.

**Uploads.** An object that fits in one part (:attr:`S3Storage.PART_SIZE`,
8 MiB) is read whole, checked, and sent with one ``PutObject``. A larger one
is a multipart upload with up to :attr:`S3Storage.PARTS_IN_FLIGHT` (4) parts
in flight, each on its own connection (one libcloud driver per worker
thread: a libcloud connection keeps per-request state and is not
thread-safe). The caller's thread reads and hashes the source; memory stays
at about ``(PARTS_IN_FLIGHT + 1) * PART_SIZE``. Parts grow beyond 8 MiB only
when an object of known size would need more than 10,000 of them; a stream
of unknown length is limited to 10,000 parts (78 GiB). Each request is
signed with AWS Signature Version 4 by libcloud, which signs the part's
sha256 (``x-amz-content-sha256``): the server refuses a part whose bytes
changed on the way, so no ``Content-MD5`` is computed as well (MD5 runs at
half the speed of SHA-256 with the SHA extensions). As the AWS SDKs do, a
multipart upload of known digest (a file: the Renderer's case) also declares
CRC32 checksums (``x-amz-checksum-algorithm``):
each part carries its ``x-amz-checksum-crc32`` (S3 checks it), the completion
lists them, and the stored object's composite checksum, read back with
``HEAD`` (``x-amz-checksum-mode: ENABLED``), must be the one of the parts
sent: proof that the server assembled exactly those parts, in order. (A store
that reports no checksum is not held to it. Without a declared algorithm,
moto_server, the test stand-in, computes a full-object CRC64NVME in pure
Python: 20 s for 2 GiB.) A part that fails with a
5xx answer or a broken connection is sent again (:attr:`S3Storage.PART_ATTEMPTS`
in all); any other failure, or a failing source, aborts the multipart upload.

**Atomicity.** A multipart upload is invisible until
``CompleteMultipartUpload``; the expected size and sha256 are checked as the
last chunk is pulled, before that request (and before the single
``PutObject``), so a mismatch or a failing source aborts the upload and
nothing appears. No temporary key is needed.

**Digest metadata.** The image's sha256 is stored as ``x-amz-meta-sha256``,
sent when the upload starts: the driver declares
:attr:`~cloudlets.drivers.base.StorageDriver.NEEDS_DIGEST_FIRST`, so the base
hashes a file source before the upload when the caller gave no digest (the
upload hashes it again and must match). For a stream of unknown digest that
needs a multipart upload, the object is copied onto itself with the metadata
replaced after completion (S3 copies at most 5 GiB in one request; a larger
stream without a known digest is stored without the metadata, and a warning
is logged). After the upload the driver reads the object's size and metadata
back with ``HEAD``.

**Presigned URL.** :meth:`S3Storage.ex_presign` signs a ``GET`` URL with
AWS Signature Version 4 (query string authentication). libcloud's
``get_object_cdn_url`` is not used: it signs the host without a non-default
port (breaking MinIO or moto on another port) and leaves out the session
token of temporary credentials.

Endpoint: ``ex_endpoint_url``, else ``AWS_ENDPOINT_URL_S3``, else
``AWS_ENDPOINT_URL``, else the region's AWS endpoint. Credentials, as for
the EC2 format (:func:`cloudlets.aws.resolve_credentials`): the arguments,
else ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
else a profile of the shared credentials file (``ex_profile``, else
``AWS_PROFILE``, else ``default``). They are never logged nor put in errors
or results.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import itertools
import logging
import queue
import re
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime
from typing import Any, ClassVar
from urllib.parse import quote, urlsplit

from cloudlets import fastzlib
from cloudlets.aws import endpoint_url, resolve_credentials, resolve_region
from cloudlets.drivers.base import UploadSource
from cloudlets.drivers.storage.libcloud import LibcloudStorage
from cloudlets.drivers.types import Storage, StorageCapability
from cloudlets.errors import ConfigurationError, StorageError

__all__ = ["S3Storage"]

log = logging.getLogger(__name__)

#: The largest object S3 copies in a single CopyObject request.
MAX_COPY_SIZE = 5 * 1024 ** 3
#: The most parts a multipart upload may have.
MAX_PARTS = 10_000
#: The longest validity AWS accepts for a SigV4 presigned URL (7 days).
MAX_PRESIGN_SECONDS = 7 * 24 * 3600
#: Canned ACLs S3 accepts in ``x-amz-acl``.
CANNED_ACLS = frozenset({
    "private", "public-read", "public-read-write", "aws-exec-read", "authenticated-read",
    "bucket-owner-read", "bucket-owner-full-control", "log-delivery-write"})

_UNRESERVED = "-_.~"


#: ISA-L's CRC32 when installed (several times zlib's speed, the same CRC).
_crc32 = fastzlib.module.crc32


def _crc32_b64(data: bytes) -> str:
    """The CRC32 of ``data`` as S3 writes it: the 4 big-endian bytes, base64."""
    return base64.b64encode((_crc32(data) & 0xFFFFFFFF).to_bytes(4, "big")).decode()


def composite_crc32(part_checksums: Iterable[str]) -> str:
    """The checksum S3 reports for a multipart object with CRC32 parts:
    the CRC32 of the parts' CRC32s, then ``-`` and the number of parts."""
    raw = [base64.b64decode(value) for value in part_checksums]
    return f"{_crc32_b64(b''.join(raw))}-{len(raw)}"


def _sign(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


class S3Storage(LibcloudStorage):
    """Store artifacts in Amazon S3 or an S3-compatible store (MinIO, Ceph RGW,
    Garage, moto...).

    Location syntax: ``s3://bucket/key``. The bucket must exist.

    :param key: the access key id (else the environment or a profile).
    :param secret: the secret access key (required with ``key``).
    :param token: a session token for temporary credentials (else
        ``AWS_SESSION_TOKEN`` when the key comes from the environment too, or
        the profile's ``aws_session_token``).
    :param region: the signing region (else ``AWS_REGION``,
        ``AWS_DEFAULT_REGION``, ``us-east-1``).
    :param ex_endpoint_url: ``http(s)://host[:port]`` of an S3-compatible
        store (else ``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, AWS).
    :param ex_profile: a profile of the shared credentials file (else
        ``AWS_PROFILE``, else ``default``), read when neither arguments nor
        the environment hold credentials; naming one skips the environment.
    :param ex_acl: a canned ACL for the stored objects (``private``,
        ``public-read``...); the bucket's default when ``None``.
    :param ex_presign_seconds: validity of the presigned ``GET`` URL put in
        each result's ``extra["presigned_url"]``; ``0`` for none.
    :param ex_read_back: download each object after upload and compare its
        sha256 (slow; the signed payload of each request already protects
        the transfer).
    :raises ConfigurationError: for missing credentials, a bad endpoint,
        region, ACL or validity.
    """

    name: ClassVar[str] = Storage.S3
    website: ClassVar[str] = "https://docs.aws.amazon.com/AmazonS3/latest/API/"
    description: ClassVar[str] = ("Amazon S3 and compatibles: parallel multipart, digest "
                                  "metadata, presign")
    capabilities: ClassVar[StorageCapability] = (
        StorageCapability.STREAM | StorageCapability.VERIFY | StorageCapability.DELETE
        | StorageCapability.READ | StorageCapability.ATOMIC | StorageCapability.PRESIGN)
    #: Bytes per read of the source: one part.
    CHUNK_SIZE: ClassVar[int] = 8 * 1024 * 1024
    #: The sha256 goes into ``x-amz-meta-sha256`` when the upload starts.
    NEEDS_DIGEST_FIRST: ClassVar[bool] = True
    #: Bytes per multipart part (more when an object would need over 10,000).
    PART_SIZE: ClassVar[int] = 8 * 1024 * 1024
    #: Parts uploaded at the same time, each on its own connection.
    PARTS_IN_FLIGHT: ClassVar[int] = 4
    #: Attempts per part, for a 5xx answer or a broken connection.
    PART_ATTEMPTS: ClassVar[int] = 3
    #: Seconds before the second attempt of a part, doubled for each next one.
    PART_RETRY_DELAY: ClassVar[float] = 0.5
    SCHEME: ClassVar[str] = "s3"
    BARE_LOCATIONS: ClassVar[bool] = False

    def __init__(self, key: str | None = None, secret: str | None = None, *,
                 token: str | None = None, region: str | None = None,
                 ex_endpoint_url: str | None = None, ex_profile: str | None = None,
                 ex_acl: str | None = None, ex_presign_seconds: int = 3600,
                 ex_read_back: bool = False) -> None:
        credentials = resolve_credentials(key, secret, token, profile=ex_profile)
        if ex_acl is not None and ex_acl not in CANNED_ACLS:
            raise ConfigurationError(f"unknown S3 canned ACL {ex_acl!r}; one of "
                                     f"{', '.join(sorted(CANNED_ACLS))}")
        if not 0 <= ex_presign_seconds <= MAX_PRESIGN_SECONDS:
            raise ConfigurationError(f"ex_presign_seconds must be 0 to {MAX_PRESIGN_SECONDS}")
        self.region = resolve_region(region)
        self.endpoint_url = endpoint_url("s3", ex_endpoint_url)
        self.ex_acl = ex_acl
        self.ex_presign_seconds = ex_presign_seconds
        #: Where the credentials came from (``arguments``, ``environment``, ``profile NAME``).
        self.credentials_source = credentials.source
        self._key = credentials.key
        self._secret = credentials.secret
        self._token = credentials.token
        self._part_drivers: list[Any] = []
        super().__init__(self._make_driver(), ex_atomic=True, ex_read_back=ex_read_back)

    def __repr__(self) -> str:
        return f"S3Storage(region={self.region!r}, endpoint_url={self.endpoint_url!r})"

    def identity(self) -> dict[str, str]:
        """The endpoint and region (the bucket is in each location); never
        the credentials."""
        found = {"region": self.region}
        if self.endpoint_url:
            found["endpoint"] = self.endpoint_url
        return found

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

    # -- for the base class -------------------------------------------------

    def _upload(self, source: UploadSource, location: str, *, overwrite: bool) -> str:
        bucket, name = self.ex_parse_location(location)
        container = self._get_container(bucket, location)
        parts = _parts(self._verified(source, location), self._part_size(source.size))
        # Two parts read: with a single one, the source is verified by now.
        head = list(itertools.islice(parts, 2))
        multipart = len(head) > 1
        stored = False
        try:
            if not multipart:
                self._put_object(container, name, head.pop() if head else b"", source,
                                 location)
            else:
                self._put_multipart(container, name, _chain(head, parts), source, location)
            stored = True
            if source.sha256 is None and multipart:
                if source.bytes_read > MAX_COPY_SIZE:
                    log.warning("%s: %d bytes of unknown digest are too many to copy in "
                                "place; stored without x-amz-meta-sha256", location,
                                source.bytes_read)
                else:
                    self._replace_metadata(bucket, name, source, location)
            self._check_stored(bucket, name, source, location)
        except BaseException:
            # Ours: a name that was free, or the new object that replaced the old.
            if stored or not overwrite:
                self._discard(bucket, name)
            raise
        return location

    def _check_stored(self, container: str, name: str, source: UploadSource,
                      location: str) -> None:
        """``HEAD`` the object: its size and ``x-amz-meta-sha256`` must be
        what was sent (then read it back, when asked)."""
        obj = self._stored_object(container, name, source, location)
        if source.sha256 is not None or source.bytes_read <= MAX_COPY_SIZE:
            stored = (obj.meta_data or {}).get("sha256")
            if stored != source.digest:
                raise StorageError(f"{location} has x-amz-meta-sha256 {stored}, "
                                   f"expected {source.digest}", location)
        if self.ex_read_back:
            self._read_back(obj, source, location)

    def _extra(self, location: str) -> dict[str, str]:
        if not self.ex_presign_seconds:
            return {}
        return {"presigned_url": self.ex_presign(location),
                "presigned_expires_in": str(self.ex_presign_seconds)}

    # -- private helpers ----------------------------------------------------

    def _make_driver(self) -> Any:
        driver_cls = _driver_class()
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

    def _headers(self, source: UploadSource, digest: str | None) -> dict[str, str]:
        """The object's headers, sent with ``PutObject`` or when a multipart
        upload starts."""
        headers = {"Content-Type": source.media_type}
        if digest is not None:
            headers["x-amz-meta-sha256"] = digest
        if self.ex_acl is not None:
            headers["x-amz-acl"] = self.ex_acl
        return headers

    def _part_size(self, size: int | None) -> int:
        """:returns: :attr:`PART_SIZE`, or the whole MiBs that fit ``size``
        in :data:`MAX_PARTS` parts."""
        if size is None or size <= self.PART_SIZE * MAX_PARTS:
            return self.PART_SIZE
        mib = 1024 * 1024
        return -(-size // (MAX_PARTS * mib)) * mib

    def _put_object(self, container: Any, name: str, body: bytes, source: UploadSource,
                    location: str) -> None:
        """Store a verified object that fits in one part with one request;
        its digest is known by now, whether or not the caller gave it."""
        headers = self._headers(source, source.digest)
        headers["Content-Length"] = str(len(body))
        path = self.driver._get_object_path(container, name)
        try:
            response = self.driver.connection.request(path, method="PUT", data=body,
                                                      headers=headers)
        except Exception as exc:  # noqa: BLE001 - libcloud errors have no common base
            raise self._error("upload to", location, exc) from None
        if response.status != 200:
            raise StorageError(f"cannot upload to {location}: HTTP {response.status}",
                               location)

    def _put_multipart(self, container: Any, name: str, parts: Iterable[bytes],
                       source: UploadSource, location: str) -> None:
        """A multipart upload, aborted on any failure: nothing appears."""
        headers = self._headers(source, source.sha256)
        # A stream of unknown digest is copied onto itself afterwards (for its
        # metadata): a copy is one new part, so it goes without part checksums.
        checksums = source.sha256 is not None
        if checksums:
            headers["x-amz-checksum-algorithm"] = "CRC32"
        path = self.driver._get_object_path(container, name)
        try:
            upload_id = self.driver._initiate_multipart(container, name, headers=headers)
        except Exception as exc:  # noqa: BLE001
            raise self._error("start the upload to", location, exc) from None
        try:
            sent = self._send_parts(path, upload_id, parts, location, checksums=checksums)
            self._complete(path, upload_id, sent, location, checksums=checksums)
        except BaseException:
            self._abort(container, name, upload_id, location)
            raise
        if checksums:
            self._check_composite(path, composite_crc32(crc for _, _, crc in sent), location)

    def _complete(self, path: str, upload_id: str, parts: list[tuple[int, str, str]],
                  location: str, *, checksums: bool) -> None:
        """``CompleteMultipartUpload`` with each part's ETag (and CRC32)."""
        body = "".join(
            f"<Part><PartNumber>{number}</PartNumber><ETag>\"{etag}\"</ETag>"
            + (f"<ChecksumCRC32>{crc}</ChecksumCRC32>" if checksums else "") + "</Part>"
            for number, etag, crc in parts)
        data = (f'<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
                f"{body}</CompleteMultipartUpload>").encode()
        try:
            response = self.driver.connection.request(
                path, method="POST", data=data, params={"uploadId": upload_id},
                headers={"Content-Length": str(len(data)), "Content-Type": "application/xml"})
        except Exception as exc:  # noqa: BLE001 - libcloud errors have no common base
            raise self._error("complete the upload to", location, exc) from None
        # S3 may answer 200 and put the error in the body (the request ran long)
        text = response.body if isinstance(response.body, str) else str(response.body or "")
        if response.status != 200 or "<Error>" in text:
            code = re.search(r"<Code>([^<]*)</Code>", text)
            raise StorageError(f"cannot complete the upload to {location}: HTTP "
                               f"{response.status}"
                               + (f" ({code.group(1)})" if code else ""), location)

    def _check_composite(self, path: str, expected: str, location: str) -> None:
        """The stored object's composite CRC32 must be that of the parts sent."""
        try:
            response = self.driver.connection.request(
                path, method="HEAD", headers={"x-amz-checksum-mode": "ENABLED"})
        except Exception as exc:  # noqa: BLE001
            raise self._error("check", location, exc) from None
        stored = response.headers.get("x-amz-checksum-crc32")
        # S3 appends "-<parts>" to a composite checksum; some stores do not
        value, _, count = (stored or "").partition("-")
        want_value, _, want_count = expected.partition("-")
        if stored is not None and (value != want_value or count not in ("", want_count)):
            raise StorageError(f"{location} has the composite CRC32 {stored} after upload, "
                               f"its parts were sent with {expected}", location)

    def _send_parts(self, path: str, upload_id: str, parts: Iterable[bytes],
                    location: str, *, checksums: bool = True) -> list[tuple[int, str, str]]:
        """Upload parts, :attr:`PARTS_IN_FLIGHT` at a time, while this thread
        reads the next one. A failed part stops the reading as soon as this
        thread waits for a free slot; the parts in flight finish before the
        failure is raised, so that the abort that follows finds them all.

        :returns: ``(part number, ETag, CRC32)`` of every part, in order.
        """
        drivers = self._workers()
        etags: dict[int, tuple[str, str]] = {}
        pending: set[Future[tuple[int, str, str]]] = set()
        with ThreadPoolExecutor(max_workers=self.PARTS_IN_FLIGHT,
                                thread_name_prefix="cloudlets-s3-part") as pool:
            try:
                for number, part in enumerate(parts, start=1):
                    if number > MAX_PARTS:
                        raise StorageError(f"{location} would need more than {MAX_PARTS} "
                                           f"parts: pass the size of the stream", location)
                    while len(pending) >= self.PARTS_IN_FLIGHT:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        etags.update(_by_number(future.result()) for future in done)
                    pending.add(pool.submit(self._put_part, drivers, path, upload_id, number,
                                            part, location, checksums))
                done, pending = wait(pending)
                etags.update(_by_number(future.result()) for future in done)
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
        return [(number, etag, crc) for number, (etag, crc) in sorted(etags.items())]

    def _put_part(self, drivers: queue.SimpleQueue[Any], path: str, upload_id: str,
                  number: int, data: bytes, location: str,
                  checksums: bool = True) -> tuple[int, str, str]:
        """Upload one part on a driver (a connection) of its own.

        :returns: the part number, its ETag and its CRC32.
        """
        from libcloud.common.types import InvalidCredsError

        crc = _crc32_b64(data) if checksums else ""
        headers = {"Content-Length": str(len(data))}
        if checksums:
            headers["x-amz-checksum-crc32"] = crc
            headers["x-amz-sdk-checksum-algorithm"] = "CRC32"
        driver = drivers.get()
        try:
            attempt = 1
            while True:
                try:
                    response = driver.connection.request(
                        path, method="PUT", data=data,
                        headers=headers,
                        params={"partNumber": str(number), "uploadId": upload_id})
                except InvalidCredsError as exc:
                    raise self._error(f"upload part {number} of", location, exc) from None
                except Exception as exc:  # noqa: BLE001 - 5xx and transport errors
                    if attempt >= self.PART_ATTEMPTS:
                        raise self._error(f"upload part {number} of", location, exc) \
                            from None
                    log.debug("part %d of %s failed (%s), attempt %d of %d", number,
                              location, type(exc).__name__, attempt, self.PART_ATTEMPTS)
                    time.sleep(self.PART_RETRY_DELAY * 2 ** (attempt - 1))
                    attempt += 1
                    continue
                # libcloud keeps the last request's body on the connection and
                # its prepared request: let the part go now, not at the next one.
                driver.connection.data = None
                response.request.body = None
                etag = response.headers.get("etag")
                if response.status != 200 or not etag:
                    raise StorageError(f"cannot upload part {number} of {location}: HTTP "
                                       f"{response.status}", location)
                return number, etag.replace('"', ""), crc
        finally:
            drivers.put(driver)

    def _workers(self) -> queue.SimpleQueue[Any]:
        """:returns: :attr:`PARTS_IN_FLIGHT` libcloud drivers (made once, kept
        for their connections), one for each part in flight."""
        while len(self._part_drivers) < self.PARTS_IN_FLIGHT:
            self._part_drivers.append(self._make_driver())
        drivers: queue.SimpleQueue[Any] = queue.SimpleQueue()
        for driver in self._part_drivers[:self.PARTS_IN_FLIGHT]:
            drivers.put(driver)
        return drivers

    def _abort(self, container: Any, name: str, upload_id: str, location: str) -> None:
        """Abort a multipart upload (best effort: the failure is what the
        caller needs; an upload left behind is invisible)."""
        try:
            self.driver._abort_multipart(container, name, upload_id)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not abort the multipart upload %s of %s: %s", upload_id,
                        location, type(exc).__name__)


@functools.cache
def _driver_class() -> type[Any]:
    """libcloud's S3 driver, with a SigV4 signer that hashes a request's
    payload once: libcloud's hashes it for ``x-amz-content-sha256``, then
    again for the canonical request, which for an 8 MiB part costs as much
    CPU as hashing the whole source. Built on first use, so that importing
    this module does not import libcloud."""
    try:
        from libcloud.common.aws import AWSRequestSignerAlgorithmV4
        from libcloud.storage.drivers import s3 as libcloud_s3
    except ImportError:  # pragma: no cover - a core dependency
        raise ConfigurationError("S3 storage needs apache-libcloud, a dependency of "
                                 "cloudlets: pip install apache-libcloud") from None

    signer_base: Any = AWSRequestSignerAlgorithmV4
    connection_base: Any = libcloud_s3.S3SignatureV4Connection
    driver_base: Any = libcloud_s3.S3StorageDriver

    class _Signer(signer_base):  # type: ignore[misc]
        def _get_canonical_request(self, params: Any, headers: Any, method: str, path: str,
                                   data: Any) -> str:
            payload = headers.get("X-AMZ-Content-SHA256")  # set from data just before
            if payload is None:
                return str(super()._get_canonical_request(params, headers, method, path,
                                                          data))
            return "\n".join([method, path, self._get_request_params(params),
                              self._get_canonical_headers(headers),
                              self._get_signed_headers(headers), payload])

    class _Connection(connection_base):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.signer = _Signer(access_key=self.user_id, access_secret=self.key,
                                  version=self.version, connection=self)

    class _Driver(driver_base):  # type: ignore[misc]
        connectionCls = _Connection

    return _Driver


def _by_number(part: tuple[int, str, str]) -> tuple[int, tuple[str, str]]:
    number, etag, crc = part
    return number, (etag, crc)


def _chain(head: list[bytes], rest: Iterator[bytes]) -> Iterator[bytes]:
    """``head``'s items (dropped from it as they go), then ``rest``'s."""
    while head:
        yield head.pop(0)
    yield from rest


def _parts(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Regroup chunks into parts of ``size`` bytes (the last one shorter);
    a chunk of exactly ``size`` passes through without a copy."""
    pending = bytearray()
    for chunk in chunks:
        if not pending and len(chunk) == size:
            yield bytes(chunk)
            continue
        pending += chunk
        while len(pending) >= size:
            with memoryview(pending) as view:
                part = bytes(view[:size])
            del pending[:size]
            yield part
    if pending:
        yield bytes(pending)
