"""S3Storage against a real moto_server, checked with boto3 as the reference client."""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from cloudlets.drivers.providers import get_driver
from cloudlets.drivers.storage.s3 import S3Storage
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
    data = hashlib.sha256(b"seed").digest() * (12 * 1024 * 1024 // 32 + 7)  # 3 parts
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
    data = b"m" * (6 * 1024 * 1024)  # the first part is sent before the check
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


def test_configuration_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
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
