"""S3Storage against a real moto_server, checked with boto3 as the reference client."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from cloudlets.drivers.providers import get_driver
from cloudlets.drivers.storage.s3 import S3Storage, _crc32_b64, composite_crc32
from cloudlets.errors import ConfigurationError, StorageError
from cloudlets.testing.storage import StorageDriverConformance
from tests.moto_fixture import ACCESS_KEY, REGION, SECRET_KEY, MotoServer, moto_server

__all__ = ["moto_server"]  # the fixture, imported for pytest

_counter = itertools.count()
BUCKET = "cloudlets-images"


def _storage(server: MotoServer, **options: object) -> S3Storage:
    server.make_bucket(BUCKET)
    return S3Storage(ACCESS_KEY, SECRET_KEY, ex_endpoint_url=server.endpoint,
                     **options)  # type: ignore[arg-type]


class TestS3StorageConformance(StorageDriverConformance):
    multi_chunk_count = 2

    @pytest.fixture
    def storage(self, moto_server: MotoServer) -> S3Storage:
        return _storage(moto_server)

    @pytest.fixture
    def new_location(self) -> Callable[[str], str]:
        return lambda name: f"s3://{BUCKET}/conformance/{next(_counter)}/{name}"


def test_registered_under_its_name() -> None:
    assert get_driver("storage", "s3") is S3Storage


def test_multipart_upload_with_digest_metadata(moto_server: MotoServer, tmp_path: Path) -> None:
    data = hashlib.sha256(b"seed").digest() * (2 * S3Storage.PART_SIZE // 32 + 7)  # 3 parts
    source = tmp_path / "disk.raw"
    source.write_bytes(data)
    artifact = _storage(moto_server).upload(source, f"s3://{BUCKET}/images/disk.raw")
    client = moto_server.client()
    head = client.head_object(Bucket=BUCKET, Key="images/disk.raw")
    assert head["ContentLength"] == len(data)
    assert head["Metadata"] == {"sha256": hashlib.sha256(data).hexdigest()}
    assert head["ETag"].strip('"').endswith("-3")  # a multipart upload of three parts
    assert artifact.sha256 == hashlib.sha256(data).hexdigest()
    assert artifact.location == f"s3://{BUCKET}/images/disk.raw"


def test_multipart_parts_carry_crc32_checksums_the_store_records(
        moto_server: MotoServer, tmp_path: Path) -> None:
    import base64
    import zlib

    data = os.urandom(2 * S3Storage.PART_SIZE + 1000)  # 3 parts
    source = tmp_path / "disk.raw"
    source.write_bytes(data)
    _storage(moto_server).upload(source, f"s3://{BUCKET}/images/crc.raw")
    head = moto_server.client().head_object(Bucket=BUCKET, Key="images/crc.raw",
                                            ChecksumMode="ENABLED")
    # computed here from the file, independently of the driver
    size = S3Storage.PART_SIZE
    part_crcs = [zlib.crc32(data[start:start + size]).to_bytes(4, "big")
                 for start in range(0, len(data), size)]
    composite = base64.b64encode(zlib.crc32(b"".join(part_crcs)).to_bytes(4, "big")).decode()
    assert head["ChecksumCRC32"].partition("-")[0] == composite
    assert composite_crc32(base64.b64encode(c).decode() for c in part_crcs) == \
        f"{composite}-3"


def test_a_composite_checksum_that_differs_is_refused(moto_server: MotoServer,
                                                       tmp_path: Path) -> None:
    storage = _storage(moto_server)
    source = tmp_path / "disk.raw"
    source.write_bytes(os.urandom(S3Storage.PART_SIZE + 1))  # 2 parts
    storage.upload(source, f"s3://{BUCKET}/images/crc2.raw")
    path = f"/{BUCKET}/images/crc2.raw"
    storage._check_composite(path, composite_crc32(
        [_crc32_b64(source.read_bytes()[:S3Storage.PART_SIZE]),
         _crc32_b64(source.read_bytes()[S3Storage.PART_SIZE:])]), "s3://x")  # agrees
    with pytest.raises(StorageError, match=r"composite CRC32 .* its parts were sent with"):
        storage._check_composite(path, "AAAAAA==-2", f"s3://{BUCKET}/images/crc2.raw")


def test_stream_of_unknown_digest_gets_its_metadata(moto_server: MotoServer) -> None:
    data = b"streamed" * 100_000

    def chunks() -> Iterator[bytes]:
        for offset in range(0, len(data), 65536):
            yield data[offset:offset + 65536]

    _storage(moto_server).upload(chunks(), f"s3://{BUCKET}/stream.raw",
                                 media_type="application/x-raw-disk-image")
    head = moto_server.client().head_object(Bucket=BUCKET, Key="stream.raw")
    assert head["Metadata"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert head["ContentType"] == "application/x-raw-disk-image"


def test_presigned_url_reads_the_object(moto_server: MotoServer) -> None:
    storage = _storage(moto_server, ex_presign_seconds=600)
    artifact = storage.upload(b"public bytes", f"s3://{BUCKET}/dir/a b+c.img")
    url = artifact.extra["presigned_url"]
    assert url.startswith(moto_server.endpoint)
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["600"]
    assert query["X-Amz-Credential"][0].startswith(f"{ACCESS_KEY}/")
    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    assert response.content == b"public bytes"


def test_presigned_url_matches_botocore(moto_server: MotoServer,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The signature equals the reference implementation's for the same
    instant, key (with characters that need escaping) and session token."""
    botocore_auth = pytest.importorskip("botocore.auth")
    from botocore.config import Config

    boto3 = pytest.importorskip("boto3")
    when = datetime(2026, 11, 25, 12, 30, 0, tzinfo=UTC)
    monkeypatch.setattr(botocore_auth, "get_current_datetime",
                        lambda remove_tzinfo=True: when.replace(tzinfo=None))
    client = boto3.client("s3", endpoint_url=moto_server.endpoint, region_name="eu-west-1",
                          aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                          aws_session_token="session/token+x=",
                          config=Config(signature_version="s3v4",
                                        s3={"addressing_style": "path"}))
    key = "dir/a b+c~é.img"
    reference = client.generate_presigned_url("get_object",
                                              Params={"Bucket": BUCKET, "Key": key},
                                              ExpiresIn=900)
    ours = S3Storage(ACCESS_KEY, SECRET_KEY, token="session/token+x=", region="eu-west-1",
                     ex_endpoint_url=moto_server.endpoint)
    mine = ours.ex_presign(f"s3://{BUCKET}/{key}", 900, now=when)
    assert urlsplit(mine).path == urlsplit(reference).path
    assert parse_qs(urlsplit(mine).query) == parse_qs(urlsplit(reference).query)


def test_acl_is_applied(moto_server: MotoServer) -> None:
    storage = _storage(moto_server, ex_acl="public-read")
    storage.upload(b"open", f"s3://{BUCKET}/public.img")
    grants = moto_server.client().get_object_acl(Bucket=BUCKET, Key="public.img")["Grants"]
    uris = {g["Grantee"].get("URI", "") for g in grants}
    assert "http://acs.amazonaws.com/groups/global/AllUsers" in uris
    storage_private = _storage(moto_server)
    storage_private.upload(b"closed", f"s3://{BUCKET}/private.img")
    grants = moto_server.client().get_object_acl(Bucket=BUCKET, Key="private.img")["Grants"]
    assert all("AllUsers" not in g["Grantee"].get("URI", "") for g in grants)


def test_mismatch_aborts_without_a_trace(moto_server: MotoServer) -> None:
    storage = _storage(moto_server)
    data = b"m" * (S3Storage.PART_SIZE + 1)  # the first part is sent before the check
    with pytest.raises(StorageError, match="sha256"):
        storage.upload(data, f"s3://{BUCKET}/abort/x.img", sha256="6" * 64)
    client = moto_server.client()
    assert client.list_objects_v2(Bucket=BUCKET, Prefix="abort/").get("KeyCount", 0) == 0
    uploads = client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    assert [u for u in uploads if u["Key"].startswith("abort/")] == []


def test_failed_overwrite_keeps_the_old_object(moto_server: MotoServer) -> None:
    storage = _storage(moto_server)
    location = f"s3://{BUCKET}/keep.img"
    storage.upload(b"old", location)
    with pytest.raises(StorageError, match="sha256"):
        storage.upload(b"new", location, overwrite=True, sha256="7" * 64)
    body = moto_server.client().get_object(Bucket=BUCKET, Key="keep.img")["Body"].read()
    assert body == b"old"


def test_endpoint_and_credentials_from_the_environment(moto_server: MotoServer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    moto_server.make_bucket(BUCKET)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # S3-specific one wins
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server.endpoint)
    storage = S3Storage()
    assert storage.endpoint_url == moto_server.endpoint
    storage.upload(b"env", f"s3://{BUCKET}/env.img")
    assert storage.exists(f"s3://{BUCKET}/env.img")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server.endpoint)
    assert S3Storage().exists(f"s3://{BUCKET}/env.img")
    explicit = S3Storage(ex_endpoint_url="http://127.0.0.1:1")
    assert explicit.endpoint_url == "http://127.0.0.1:1"


def test_region_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert S3Storage("k", "s").region == "eu-west-1"
    assert S3Storage("k", "s", region=REGION).region == REGION


def test_missing_bucket_and_object_are_named(moto_server: MotoServer) -> None:
    storage = _storage(moto_server)
    with pytest.raises(StorageError, match="no-such-bucket"):
        storage.upload(b"x", "s3://no-such-bucket/x.img")
    with pytest.raises(StorageError, match=r"missing\.img"):
        storage.delete(f"s3://{BUCKET}/missing.img")
    assert not storage.exists("s3://no-such-bucket/x.img")


def test_secrets_stay_out_of_errors_logs_and_results(moto_server: MotoServer,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    storage = _storage(moto_server)
    artifact = storage.upload(b"quiet", f"s3://{BUCKET}/quiet.img")
    with pytest.raises(StorageError) as info:
        storage.upload(b"x", "s3://no-such-bucket/x.img")
    text = "\n".join(r.getMessage() for r in caplog.records)
    for shown in (text, str(info.value), repr(storage), artifact.location):
        assert SECRET_KEY not in shown
    assert SECRET_KEY not in str(artifact.to_dict())


@pytest.mark.parametrize("location", ["s3://bucket", "s3://bucket/", "bucket/key",
                                      "libcloud://bucket/key", "https://bucket/key"])
def test_rejects_bad_locations(location: str) -> None:
    with pytest.raises(StorageError):
        S3Storage("k", "s").exists(location)


def test_configuration_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    with pytest.raises(ConfigurationError, match="credentials"):
        S3Storage()
    with pytest.raises(ConfigurationError, match="ACL"):
        S3Storage("k", "s", ex_acl="everyone")
    with pytest.raises(ConfigurationError, match="endpoint"):
        S3Storage("k", "s", ex_endpoint_url="ftp://host")
    with pytest.raises(ConfigurationError, match="region"):
        S3Storage("k", "s", region="mars-north-1")
    with pytest.raises(ConfigurationError, match="presign"):
        S3Storage("k", "s", ex_presign_seconds=8 * 24 * 3600)
    with pytest.raises(ConfigurationError, match="both a key and a secret"):
        S3Storage("k")


# -- parallel multipart uploads -------------------------------------------------

MiB = 1024 * 1024


class SmallParts(S3Storage):
    """S3's smallest parts, to keep the payloads of these tests small."""

    PART_SIZE: ClassVar[int] = 5 * MiB
    CHUNK_SIZE: ClassVar[int] = 5 * MiB
    PART_RETRY_DELAY: ClassVar[float] = 0.01


class PartRequests:
    """Wraps the part connections of a storage (on their instances) to see
    how many part uploads are in flight at once, on which connections, and to
    make chosen attempts fail."""

    def __init__(self, storage: S3Storage, *, delay: float = 0.0,
                 fail: Callable[[int, int], bool] | None = None) -> None:
        self.delay = delay
        self.fail = fail or (lambda number, attempt: False)
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0
        self.connections: set[int] = set()
        self.attempts: dict[int, int] = {}
        storage._workers()  # the part drivers, made on first use
        for driver in storage._part_drivers:
            driver.connection.request = self._wrap(driver.connection)

    def _wrap(self, connection: Any) -> Callable[..., Any]:
        original = connection.request

        def request(path: str, **kwargs: Any) -> Any:
            number = int(kwargs["params"]["partNumber"])
            with self.lock:
                self.attempts[number] = self.attempts.get(number, 0) + 1
                attempt = self.attempts[number]
                self.in_flight += 1
                self.most_in_flight = max(self.most_in_flight, self.in_flight)
                self.connections.add(id(connection))
            try:
                time.sleep(self.delay)
                if self.fail(number, attempt):
                    raise OSError(f"connection reset (part {number}, attempt {attempt})")
                return original(path, **kwargs)
            finally:
                with self.lock:
                    self.in_flight -= 1

        return request


def _small_parts(server: MotoServer) -> SmallParts:
    server.make_bucket(BUCKET)
    return SmallParts(ACCESS_KEY, SECRET_KEY, ex_endpoint_url=server.endpoint)


def _nothing_under(server: MotoServer, prefix: str) -> bool:
    client = server.client()
    objects = client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("KeyCount", 0)
    uploads = client.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    return objects == 0 and not [u for u in uploads if u["Key"].startswith(prefix)]


def test_parts_are_uploaded_in_parallel(moto_server: MotoServer, tmp_path: Path) -> None:
    storage = _small_parts(moto_server)
    requests_seen = PartRequests(storage, delay=0.2)
    data = os.urandom(7 * 5 * MiB + 1234)  # 8 parts
    source = tmp_path / "disk.raw"
    source.write_bytes(data)
    artifact = storage.upload(source, f"s3://{BUCKET}/parallel/disk.raw")
    assert requests_seen.most_in_flight == storage.PARTS_IN_FLIGHT == 4
    assert len(requests_seen.connections) == storage.PARTS_IN_FLIGHT
    assert sorted(requests_seen.attempts) == list(range(1, 9))
    client = moto_server.client()
    head = client.head_object(Bucket=BUCKET, Key="parallel/disk.raw")
    assert head["ETag"].strip('"').endswith("-8")
    assert head["Metadata"] == {"sha256": hashlib.sha256(data).hexdigest()}
    assert client.get_object(Bucket=BUCKET, Key="parallel/disk.raw")["Body"].read() == data
    assert artifact.sha256 == hashlib.sha256(data).hexdigest()


def test_a_failing_part_aborts_the_upload(moto_server: MotoServer) -> None:
    storage = _small_parts(moto_server)
    requests_seen = PartRequests(storage, fail=lambda number, attempt: number == 3)
    data = os.urandom(6 * 5 * MiB)
    with pytest.raises(StorageError, match="part 3 of"):
        storage.upload(data, f"s3://{BUCKET}/failing/disk.raw")
    assert requests_seen.attempts[3] == storage.PART_ATTEMPTS
    assert _nothing_under(moto_server, "failing/")


def test_a_part_is_retried(moto_server: MotoServer) -> None:
    storage = _small_parts(moto_server)
    requests_seen = PartRequests(storage, fail=lambda number, attempt: attempt == 1
                                 and number in (2, 5))
    data = os.urandom(5 * 5 * MiB + 1)
    storage.upload(data, f"s3://{BUCKET}/retried/disk.raw")
    assert requests_seen.attempts[2] == requests_seen.attempts[5] == 2
    body = moto_server.client().get_object(Bucket=BUCKET, Key="retried/disk.raw")["Body"]
    assert body.read() == data


def test_a_source_failing_after_parts_aborts_the_upload(moto_server: MotoServer) -> None:
    storage = _small_parts(moto_server)
    requests_seen = PartRequests(storage)

    class SourceBroke(Exception):
        pass

    def chunks() -> Iterator[bytes]:
        for _ in range(4 * 5):
            yield os.urandom(MiB)
        raise SourceBroke("the render failed")

    with pytest.raises(SourceBroke):
        storage.upload(chunks(), f"s3://{BUCKET}/broken/disk.raw")
    assert len(requests_seen.attempts) >= 3  # parts had been sent
    assert _nothing_under(moto_server, "broken/")


def test_multipart_stream_of_unknown_digest_gets_its_metadata(moto_server: MotoServer) -> None:
    storage = _small_parts(moto_server)
    data = os.urandom(11 * MiB)

    def chunks() -> Iterator[bytes]:
        for offset in range(0, len(data), 777_777):
            yield data[offset:offset + 777_777]

    artifact = storage.upload(chunks(), f"s3://{BUCKET}/stream/parts.raw")
    head = moto_server.client().head_object(Bucket=BUCKET, Key="stream/parts.raw")
    assert head["Metadata"] == {"sha256": hashlib.sha256(data).hexdigest()}
    assert head["ContentLength"] == len(data) == artifact.size


def test_empty_object(moto_server: MotoServer) -> None:
    artifact = _storage(moto_server).upload(b"", f"s3://{BUCKET}/empty.img")
    head = moto_server.client().head_object(Bucket=BUCKET, Key="empty.img")
    assert head["ContentLength"] == 0 == artifact.size
    assert head["Metadata"] == {"sha256": hashlib.sha256(b"").hexdigest()}


def test_part_size_grows_for_huge_objects() -> None:
    storage = S3Storage("k", "s")
    assert storage._part_size(None) == storage._part_size(10 * MiB) == 8 * MiB
    assert storage._part_size(8 * MiB * 10_000) == 8 * MiB
    huge = 200 * 1024 ** 3
    assert storage._part_size(huge) * 10_000 >= huge
    assert storage._part_size(huge) % MiB == 0


# -- credentials ------------------------------------------------------------------


@pytest.fixture
def credentials_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A shared credentials file with moto's keys under [cloudlets], a
    useless [default], and no credentials in the environment."""
    path = tmp_path / "credentials"
    path.write_text(f"[default]\naws_access_key_id = AKIANOTTHISONE\n"
                    f"aws_secret_access_key = wrong\n\n"
                    f"[cloudlets]\naws_access_key_id = {ACCESS_KEY}\n"
                    f"aws_secret_access_key = {SECRET_KEY}\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                 "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(path))
    return path


def test_credentials_from_a_profile(moto_server: MotoServer, credentials_file: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    moto_server.make_bucket(BUCKET)
    storage = S3Storage(ex_profile="cloudlets", ex_endpoint_url=moto_server.endpoint)
    assert storage.credentials_source == "profile cloudlets"
    storage.upload(b"from a profile", f"s3://{BUCKET}/profile.img")
    assert storage.exists(f"s3://{BUCKET}/profile.img")
    assert SECRET_KEY not in repr(storage)
    default = S3Storage(ex_endpoint_url=moto_server.endpoint)
    assert default.credentials_source == "profile default"
    monkeypatch.setenv("AWS_PROFILE", "cloudlets")
    assert S3Storage().credentials_source == "profile cloudlets"


def test_arguments_and_environment_win_over_profiles(credentials_file: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert S3Storage("k", "s").credentials_source == "arguments"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAFROMENV")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    assert S3Storage().credentials_source == "environment"
    # naming a profile skips the environment
    assert S3Storage(ex_profile="cloudlets").credentials_source == "profile cloudlets"


def test_missing_profile_is_named(credentials_file: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"\[nope\]") as info:
        S3Storage(ex_profile="nope")
    assert SECRET_KEY not in str(info.value)


def test_signer_hashes_the_payload_once_and_signs_as_libcloud(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The signer that skips libcloud's second hash of the payload produces
    the same headers, Authorization included, as libcloud's own."""
    import libcloud.common.aws as libcloud_aws
    from libcloud.storage.drivers.s3 import S3StorageDriver

    when = datetime(2026, 11, 25, 12, 30, 0)

    class FixedClock(datetime):
        @classmethod
        def utcnow(cls) -> datetime:  # type: ignore[override]
            return when

    monkeypatch.setattr(libcloud_aws, "datetime", FixedClock)
    libcloud_driver: Any = S3StorageDriver
    ours = S3Storage(ACCESS_KEY, SECRET_KEY, token="session/token+x=").driver.connection
    theirs = libcloud_driver(ACCESS_KEY, SECRET_KEY, token="session/token+x=",
                             region=REGION).connection
    assert type(ours.signer) is not type(theirs.signer)
    hashed: list[int] = []
    real_hash: Any = libcloud_aws._hash

    def counting_hash(message: Any) -> str:
        hashed.append(len(message))
        return str(real_hash(message))

    monkeypatch.setattr(libcloud_aws, "_hash", counting_hash)
    part = os.urandom(100_000)
    params = {"partNumber": "7", "uploadId": "abc/def=="}
    headers: list[dict[str, str]] = []
    for connection in (ours, theirs):
        _, signed = connection.signer.get_request_headers(
            params=dict(params), headers={"Content-Length": str(len(part))}, method="PUT",
            path=f"/{BUCKET}/dir/a b.raw", data=part)
        headers.append(signed)
    assert headers[0] == headers[1]
    assert headers[0]["X-AMZ-Content-SHA256"] == hashlib.sha256(part).hexdigest()
    assert hashed.count(len(part)) == 1 + 2  # ours once, libcloud's twice
