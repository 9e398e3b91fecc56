"""HTTP(S) storage: ``PUT`` to a web server, WebDAV ``MOVE`` into place.

The body is streamed, with a ``Content-Length`` when the size is known and
chunked transfer encoding otherwise. To keep a half-written file from ever
looking complete, the bytes go to a hidden temporary name beside the target
(``.name.<random>.partial``), are checked there (size with ``HEAD``, and
the digest the server reports on it: an ETag that is the body's MD5, as
object stores' are, or an RFC 9530 ``Repr-Digest``/``Digest`` sha-256; the
MD5 of a file source is computed only when the ETag looks like one, so a
server whose ETags are not digests costs no MD5 pass; with
``ex_verify="digest"`` a server that reports no digest has the bytes read
back with ``GET``), and only then renamed with WebDAV ``MOVE`` (``Overwrite: F`` unless
asked to overwrite, so the server itself refuses to clobber): the upload is
atomic. A server that does not implement ``MOVE`` (probed once per origin
with a ``MOVE`` of a name that does not exist) is refused, since the promise
cannot be kept there; with ``ex_move=False`` the bytes go to the final name
directly, the driver deletes them itself when the upload fails, and the
instance does not declare ``ATOMIC``.

Credentials come from the URL (``https://user:password@host/path``), from
the constructor (basic or bearer) or as custom headers; they never appear in
errors, logs or results.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.client
import logging
import queue
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import BinaryIO, ClassVar, Literal, cast
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from cloudlets.drivers.base import StorageDriver, UploadSource
from cloudlets.drivers.types import Storage, StorageCapability
from cloudlets.errors import ConfigurationError, StorageError
from cloudlets.urls import redact

__all__ = ["HTTPStorage"]

log = logging.getLogger(__name__)

#: Statuses worth another attempt: the server or a proxy is briefly unwell.
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
#: An ETag that may be the body's MD5 (object stores' HTTP APIs): 32 hex digits.
MD5_ETAG = re.compile(r"[0-9a-f]{32}")
#: Buffers a file upload cycles through (sent, then hashed, then reused).
_SEND_BUFFERS = 4


def _basic_auth(username: str, password: str) -> str:
    """An ``Authorization`` value for HTTP basic authentication (Latin-1 when
    it can be, as requests sends it; else UTF-8, RFC 7617's charset)."""
    text = f"{username}:{password}"
    try:
        raw = text.encode("latin-1")
    except UnicodeEncodeError:
        raw = text.encode("utf-8")
    return "Basic " + base64.b64encode(raw).decode("ascii")


def _reported_sha256(headers: Mapping[str, str]) -> str | None:
    """The sha-256 an RFC 9530 ``Repr-Digest`` (or RFC 3230 ``Digest``) header
    states, as hex, or ``None``."""
    for name in ("Repr-Digest", "Digest"):
        value = headers.get(name)
        if not value:
            continue
        for item in value.split(","):
            algorithm, _, encoded = item.strip().partition("=")
            if algorithm.strip().lower() in ("sha-256", "sha256"):
                try:
                    raw = base64.b64decode(encoded.strip().strip(":"), validate=True)
                except ValueError:
                    continue
                if len(raw) == 32:
                    return raw.hex()
    return None


class _Body:
    """The request body: an iterable of chunks that knows its length (so
    requests sends ``Content-Length`` instead of chunked encoding) and, when
    asked (a stream, which cannot be read again), keeps an MD5 beside the
    base's sha256, to compare with an ETag."""

    def __init__(self, source: UploadSource, chunk_size: int, location: str, *,
                 md5: bool) -> None:
        self._source = source
        self._chunk_size = chunk_size
        self._location = location
        self._with_md5 = md5
        self.md5: hashlib._Hash | None = None

    def __len__(self) -> int:
        assert self._source.size is not None
        return self._source.size

    def __bool__(self) -> bool:  # requests replaces a falsy body with {}
        return True

    def __iter__(self) -> Iterator[bytes]:
        md5 = hashlib.md5(usedforsecurity=False) if self._with_md5 else None
        self.md5 = md5
        size = self._source.size
        for chunk in self._source.chunks(self._chunk_size):
            if size is not None and self._source.bytes_read > size:
                # Never send more than the announced Content-Length.
                self._source.verify(self._location)
            if md5 is not None:
                md5.update(chunk)
            yield chunk
        if size is not None and self._source.bytes_read != size:
            # Fail now rather than leave the server waiting for the rest.
            self._source.verify(self._location)


class _ChunkedBody(_Body):
    """A body of unknown length: sent with chunked transfer encoding."""

    def __len__(self) -> int:  # requests treats 0 as "unknown": chunked
        return 0


class HTTPStorage(StorageDriver):
    """Store artifacts on a web server with ``PUT`` (WebDAV, nginx ``dav``,
    Apache ``mod_dav``, an object store's HTTP API...).

    Location syntax: ``http(s)://[user:password@]host[:port]/path/name``.

    :param username: user for HTTP basic authentication (overrides the URL's).
    :param password: its password.
    :param token: a bearer token, sent as ``Authorization: Bearer <token>``.
    :param headers: extra headers for every request (an API key...); their
        values are treated as secrets and never logged.
    :param verify_tls: check the server's certificate (or a CA bundle path).
    :param timeout: seconds to wait for the server to connect or answer.
    :param retries: attempts after the first for a failed request; a ``PUT``
        is retried only when its source can be read again (a file).
    :param backoff: seconds before the first retry, doubled each time
        (at most 30 s between attempts).
    :param ex_move: upload to a temporary name and ``MOVE`` it into place
        (the instance is ``ATOMIC``; a server without ``MOVE`` is refused);
        ``False`` writes the final name directly, for servers without
        WebDAV: a failed upload then deletes what it wrote, and an
        interrupted ``overwrite=True`` upload loses the previous object, so
        the instance does not declare ``ATOMIC``.
    :param ex_verify: how to check the stored bytes: ``"reported"`` (the
        default: the size, and the digest when ``HEAD`` reports one: an MD5
        ETag, a sha-256 ``Repr-Digest`` or ``Digest``), ``"digest"`` (the
        same, and when the server reports no digest, read everything back
        with ``GET`` and compare its sha256: twice the traffic) or
        ``"size"`` (the size only).
    """

    name: ClassVar[str] = Storage.HTTP
    website: ClassVar[str] = "https://www.rfc-editor.org/rfc/rfc4918"
    description: ClassVar[str] = "HTTP(S) PUT, verified, WebDAV MOVE into place"
    capabilities: ClassVar[StorageCapability] = (
        StorageCapability.STREAM | StorageCapability.VERIFY | StorageCapability.DELETE
        | StorageCapability.READ | StorageCapability.ATOMIC)
    CHUNK_SIZE: ClassVar[int] = 1024 * 1024
    #: Largest pause between two attempts, in seconds.
    MAX_BACKOFF: ClassVar[float] = 30.0

    def __init__(self, username: str | None = None, password: str | None = None, *,
                 token: str | None = None, headers: Mapping[str, str] | None = None,
                 verify_tls: bool | str = True, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.5, ex_move: bool = True,
                 ex_verify: Literal["reported", "digest", "size"] = "reported") -> None:
        if token is not None and (username is not None or password is not None):
            raise ConfigurationError("HTTP storage takes basic credentials or a bearer "
                                     "token, not both")
        if ex_verify not in ("reported", "digest", "size"):
            raise ConfigurationError("ex_verify must be 'reported', 'digest' or 'size', "
                                     f"not {ex_verify!r}")
        if retries < 0:
            raise ConfigurationError("retries must be zero or more")
        self.username = username
        self._password = password
        self._token = token
        self._headers = dict(headers or {})
        self.verify_tls = verify_tls
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.ex_move = ex_move
        self.ex_verify = ex_verify
        if not ex_move:
            # An instance declares what it does: the final name is written
            # directly, not all at once.
            self.capabilities = type(self).capabilities & ~StorageCapability.ATOMIC  # type: ignore[misc]
        #: origin -> the status of its MOVE probe
        self._move_probe: dict[str, int] = {}
        self._session = requests.Session()
        # Idempotent requests are retried by urllib3; PUT and MOVE by us.
        retry = Retry(total=retries, connect=retries, read=retries, status=retries,
                      backoff_factor=backoff, backoff_max=self.MAX_BACKOFF,
                      status_forcelist=sorted(RETRY_STATUSES),
                      allowed_methods=frozenset({"GET", "HEAD", "DELETE", "OPTIONS"}),
                      raise_on_status=False, respect_retry_after_header=True)
        adapter = HTTPAdapter(max_retries=retry)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)

    def __repr__(self) -> str:
        return f"HTTPStorage(username={self.username!r}, ex_move={self.ex_move})"

    # -- standard API -------------------------------------------------------

    def exists(self, location: str) -> bool:
        url, _ = self._target(location)
        response = self._request("HEAD", location, url)
        if response.status_code == 404:
            return False
        self._check(response, location, "check")
        return True

    # -- for the base class -------------------------------------------------

    def _upload(self, source: UploadSource, location: str, *, overwrite: bool) -> str:
        url, _ = self._target(location)
        shown = redact(location)
        if self.ex_move:
            self._require_move(location, url)
        put_url = self._temporary(url) if self.ex_move else url
        try:
            body = self._put(source, location, put_url)
            source.verify(location)
            self._verify_stored(source, body, location, put_url)
            if self.ex_move:
                self._move(location, put_url, url, overwrite=overwrite)
        except BaseException:
            # The base deletes nothing for an atomic driver: clean up here.
            self._discard(location, put_url)
            raise
        log.debug("stored %d bytes at %s", source.bytes_read, shown)
        return shown

    def _delete(self, location: str) -> None:
        url, _ = self._target(location)
        response = self._request("DELETE", location, url)
        if response.status_code == 404:
            raise StorageError(f"{redact(location)} does not exist", redact(location))
        self._check(response, location, "delete")

    def _open(self, location: str) -> BinaryIO:
        url, _ = self._target(location)
        response = self._request("GET", location, url, stream=True)
        self._check(response, location, "read")
        raw = response.raw
        raw.decode_content = True
        return cast(BinaryIO, raw)

    # -- private helpers ----------------------------------------------------

    def _target(self, location: str) -> tuple[str, tuple[str, str] | None]:
        """Split credentials off a location.

        :returns: the URL without userinfo and the basic credentials to use.
        :raises StorageError: for anything but an http(s) URL with a path.
        """
        shown = redact(location)
        try:
            parts = urlsplit(location)
            port = parts.port
        except ValueError:
            raise StorageError(f"not a valid HTTP location: {shown}", shown) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise StorageError(f"HTTP storage needs an http(s)://host/path location, "
                               f"not {shown}", shown)
        if parts.path in ("", "/") or parts.path.endswith("/"):
            raise StorageError(f"HTTP location {shown} names a directory, not a file", shown)
        host = parts.hostname
        if ":" in host:
            host = f"[{host}]"
        netloc = host if port is None else f"{host}:{port}"
        url = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
        auth: tuple[str, str] | None = None
        if self.username is not None:
            auth = (self.username, self._password or "")
        elif parts.username is not None:
            auth = (unquote(parts.username), unquote(parts.password or ""))
        return url, auth

    def _headers_for(self, location: str, extra: Mapping[str, str] | None = None
                     ) -> tuple[dict[str, str], tuple[str, str] | None]:
        """The headers of a request to ``location`` (configured, bearer
        token, then ``extra``) and its basic credentials, if any."""
        _, auth = self._target(location)
        headers = dict(self._headers)
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        headers.update(extra or {})
        return headers, auth

    def _request(self, method: str, location: str, url: str, *,
                 headers: Mapping[str, str] | None = None, data: Iterable[bytes] | None = None,
                 stream: bool = False) -> requests.Response:
        all_headers, auth = self._headers_for(location, headers)
        try:
            return self._session.request(method, url, headers=all_headers, data=data,
                                         auth=auth, stream=stream, timeout=self.timeout,
                                         verify=self.verify_tls, allow_redirects=False)
        except requests.RequestException as exc:
            shown = redact(location)
            reason = type(exc).__name__
            raise StorageError(f"{method} {shown} failed: {reason}", shown) from None

    def _check(self, response: requests.Response, location: str, what: str) -> None:
        if response.status_code < 300:
            return
        shown = redact(location)
        raise StorageError(f"cannot {what} {shown}: HTTP {response.status_code} "
                           f"{response.reason}", shown)

    def _put(self, source: UploadSource, location: str, url: str) -> _Body:
        """PUT the source, retrying within the bound when it can be re-read."""
        attempt = 0
        shown = redact(location)
        in_kernel = (source.path is not None and source.size is not None
                     and urlsplit(url).scheme == "http")
        while True:
            # A file's MD5 is computed later, and only if the ETag may be one.
            body_cls = _Body if source.size is not None else _ChunkedBody
            body = body_cls(source, self.CHUNK_SIZE, location, md5=source.path is None)
            headers = {"Content-Type": source.media_type}
            retryable = source.path is not None and attempt < self.retries
            try:
                if in_kernel:
                    status, reason = self._put_file(source, location, url, headers)
                else:
                    response = self._request("PUT", location, url, headers=headers, data=body)
                    status, reason = response.status_code, response.reason
            except StorageError:
                if not retryable:
                    raise
            else:
                if status < 300:
                    return body
                if not (retryable and status in RETRY_STATUSES):
                    raise StorageError(f"cannot upload to {shown}: HTTP {status} {reason}",
                                       shown)
            attempt += 1
            delay = min(self.backoff * 2 ** (attempt - 1), self.MAX_BACKOFF)
            log.debug("retrying PUT to %s in %.1f s (attempt %d of %d)", redact(location),
                      delay, attempt + 1, self.retries + 1)
            time.sleep(delay)

    def _put_file(self, source: UploadSource, location: str, url: str,
                  headers: Mapping[str, str]) -> tuple[int, str]:
        """PUT a file over plain HTTP on a connection of our own: a helper
        thread reads and sends while this one hashes what it sent. Through
        requests (each chunk read, hashed, then sent, one after the other)
        2 GiB to nginx on loopback took 1.6-1.9x curl's time. (HTTPS goes
        through requests.)

        :returns: the response's status and reason.
        :raises StorageError: the connection failed, or the file changed size.
        """
        assert source.path is not None and source.size is not None
        shown = redact(location)
        parts = urlsplit(url)
        all_headers, auth = self._headers_for(location, headers)
        all_headers["Content-Length"] = str(source.size)
        if auth is not None:
            all_headers["Authorization"] = _basic_auth(*auth)
        source.restart()
        connection = http.client.HTTPConnection(parts.hostname or "", parts.port or 80,
                                                timeout=self.timeout)
        try:
            connection.putrequest("PUT", urlunsplit(("", "", parts.path or "/", parts.query,
                                                     "")), skip_accept_encoding=True)
            for name, value in all_headers.items():
                connection.putheader(name, value)
            connection.endheaders()
            assert connection.sock is not None
            try:
                self._send_file(connection.sock, source, shown)
            except OSError:
                # the server may have answered (401, 413...) and closed early
                response = connection.getresponse()
                if response.status < 300:
                    raise
            else:
                response = connection.getresponse()
            response.read()
            return response.status, response.reason
        except (OSError, http.client.HTTPException) as exc:
            raise StorageError(f"PUT {shown} failed: {type(exc).__name__}", shown) from None
        finally:
            connection.close()

    def _send_file(self, sock: socket.socket, source: UploadSource, shown: str) -> None:
        """Read and send on a helper thread; hash here what it sent, from the
        same buffers (a few of :attr:`CHUNK_SIZE`), so hashing overlaps the
        sending and the digest is of the bytes sent."""
        assert source.path is not None and source.size is not None
        size = source.size
        buffers = [bytearray(self.CHUNK_SIZE) for _ in range(_SEND_BUFFERS)]
        free: queue.SimpleQueue[int] = queue.SimpleQueue()
        for index in range(len(buffers)):
            free.put(index)
        sent: queue.SimpleQueue[tuple[int, int] | BaseException | None] = queue.SimpleQueue()
        stop = threading.Event()

        path = source.path

        def send() -> None:
            try:
                with open(path, "rb", buffering=0) as handle:
                    left = size
                    while left > 0:
                        index = free.get()
                        if stop.is_set():
                            return
                        view = memoryview(buffers[index])[:min(self.CHUNK_SIZE, left)]
                        got = handle.readinto(view)
                        if not got:
                            raise StorageError(f"{source.path} ended {left} bytes early "
                                               f"while sent to {shown}", shown)
                        sock.sendall(view[:got])
                        sent.put((index, got))
                        left -= got
                sent.put(None)
            except BaseException as exc:  # noqa: BLE001 - handed to the hashing thread
                sent.put(exc)

        sender = threading.Thread(target=send, name="cloudlets-http-send", daemon=True)
        sender.start()
        try:
            while (step := sent.get()) is not None:
                if isinstance(step, BaseException):
                    raise step
                index, length = step
                source.account(memoryview(buffers[index])[:length])
                free.put(index)
        except BaseException:
            stop.set()
            free.put(0)  # wakes a sender waiting for a buffer
            with contextlib.suppress(OSError):  # unblocks a send in progress
                sock.shutdown(socket.SHUT_RDWR)
            raise
        finally:
            sender.join()

    def _verify_stored(self, source: UploadSource, body: _Body, location: str,
                       url: str) -> None:
        """Check what the server holds at ``url`` against what was sent."""
        shown = redact(location)
        response = self._request("HEAD", location, url)
        self._check(response, location, "verify")
        length = response.headers.get("Content-Length")
        if length is not None and int(length) != source.bytes_read:
            raise StorageError(f"{shown} holds {length} bytes after upload, "
                               f"sent {source.bytes_read}", shown)
        if self.ex_verify == "size":
            if length is None:
                raise StorageError(f"{shown} reports no size to verify", shown)
            return
        reported = _reported_sha256(response.headers)
        if reported is not None:
            if reported != source.digest:
                raise StorageError(f"{shown} reports sha256 {reported} after upload, sent "
                                   f"{source.digest}", shown)
            return
        etag = response.headers.get("ETag", "").removeprefix("W/").strip('"').lower()
        md5_like = MD5_ETAG.fullmatch(etag) is not None
        if md5_like and etag == self._md5_sent(source, body):
            return
        if self.ex_verify == "reported" and not md5_like:
            return  # the server reports no digest: the size it is
        # asked to, or an ETag that looks like an MD5 but is not this one:
        # damage, or not an MD5 at all; reading it back tells
        digest = hashlib.sha256()
        size = 0
        response = self._request("GET", location, url, stream=True)
        try:
            self._check(response, location, "read back")
            for chunk in response.iter_content(self.CHUNK_SIZE):
                digest.update(chunk)
                size += len(chunk)
        except requests.RequestException as exc:
            raise StorageError(f"reading back {shown} failed: {type(exc).__name__}",
                               shown) from None
        finally:
            response.close()
        if size != source.bytes_read or digest.hexdigest() != source.digest:
            raise StorageError(f"{shown} reads back {size} bytes with sha256 "
                               f"{digest.hexdigest()}, sent {source.bytes_read} bytes "
                               f"with sha256 {source.digest}", shown)

    def _md5_sent(self, source: UploadSource, body: _Body) -> str | None:
        """The MD5 of what was sent: kept on the way for a stream, read again
        from a file (whose sha256 the base checked as it was sent: a file
        changed since gives another MD5, and the caller reads back instead).

        :returns: the hex digest, or ``None`` when it cannot be known.
        """
        if body.md5 is not None:
            return body.md5.hexdigest()
        if source.path is None:
            return None
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with open(source.path, "rb") as handle:
                while chunk := handle.read(self.CHUNK_SIZE):
                    digest.update(chunk)
        except OSError:
            return None
        return digest.hexdigest()

    def _move(self, location: str, source_url: str, final_url: str, *,
              overwrite: bool) -> None:
        headers = {"Destination": final_url, "Overwrite": "T" if overwrite else "F"}
        attempt = 0
        while True:
            response = self._request("MOVE", location, source_url, headers=headers)
            if response.status_code in (201, 204):
                return
            if response.status_code == 412:
                shown = redact(location)
                raise StorageError(f"refusing to overwrite existing {shown}", shown)
            if response.status_code in RETRY_STATUSES and attempt < self.retries:
                attempt += 1
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.MAX_BACKOFF))
                continue
            self._check(response, location, "move into place")
            # A 2xx other than 201/204 still means the rename happened.
            return

    def _require_move(self, location: str, url: str) -> None:
        """Probe, once per origin, whether the server implements ``MOVE``:
        moving a name that does not exist answers 404 (or 409, 412) when it
        does, 405 or 501 when it does not.

        :raises StorageError: it does not: an atomic upload cannot be made
            there (nothing was written).
        """
        parts = urlsplit(url)
        origin = f"{parts.scheme}://{parts.netloc}"
        if origin not in self._move_probe:
            probe = self._temporary(url)
            headers = {"Destination": self._temporary(url), "Overwrite": "F"}
            response = self._request("MOVE", location, probe, headers=headers)
            if response.status_code in (401, 403):
                self._check(response, location, "probe MOVE on")
            self._move_probe[origin] = response.status_code
        status = self._move_probe[origin]
        if status not in (404, 409, 412):
            shown = redact(location)
            raise StorageError(f"{origin} does not implement WebDAV MOVE (HTTP {status}), "
                               f"which an atomic upload to {shown} needs; pass ex_move=False "
                               "to write the final name directly (not atomic)", shown)

    @staticmethod
    def _temporary(url: str) -> str:
        parts = urlsplit(url)
        directory, _, name = parts.path.rpartition("/")
        tmp = f".{unquote(name)}.{secrets.token_hex(8)}.partial"
        return urlunsplit((parts.scheme, parts.netloc, f"{directory}/{quote(tmp)}",
                           parts.query, ""))

    def _discard(self, location: str, url: str) -> None:
        """Best-effort DELETE of what a failed upload left at ``url``."""
        try:
            self._request("DELETE", location, url)
        except Exception:  # noqa: BLE001 - the upload error is what the caller needs
            log.debug("could not delete the partial upload for %s", redact(location))
