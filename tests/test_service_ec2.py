"""The demo, end to end: ``cloudlets serve`` with an S3 target and the EC2
format against the AWS stand-in (tests/awsstandin.py, on loopback). A POST
of a cloudlet's manifest becomes an AMI, found in the image, in
``GET /v1/images`` and in the stand-in's DescribeImages; DELETE deregisters
it and deletes its disk from S3."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.service_fixture import Service, TarballServer, served_cloudlet, start_service, tarballs

pytest.importorskip("starlette", reason="pip install cloudlets[service]")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("moto")

from tests.awsstandin import aws_standin  # noqa: E402

__all__ = ["aws_standin", "tarballs"]

TOKEN = "demo-token-0123456789abcdef"
#: The storage credentials the configuration reads from the environment.
AWS_KEY, AWS_SECRET = "AKIADEMOSERVICE00001", "demo-secret-key-never-echoed-0123"


@pytest.fixture
def service(tmp_path_factory: pytest.TempPathFactory, tarballs: TarballServer,
            aws_standin: Any) -> Iterator[Service]:
    tarballs.gate.set()
    config = f"""
[service]
data_dir = "state"
formats = ["ec2"]
[targets.s3]
driver = "s3"
prefix = "s3://provider-images/cloudlets/"
region = "us-east-1"
key_env = "DEMO_AWS_KEY"
secret_env = "DEMO_AWS_SECRET"
[formats.ec2]
client_options = ["ex_description"]
[formats.ec2.options]
ex_poll_interval = 0.05
ex_poll_deadline = 20.0
key_env = "DEMO_AWS_KEY"
secret_env = "DEMO_AWS_SECRET"
[tenants.demo]
token_env = "CLOUDLETS_TOKEN_DEMO"
[fetch]
allow_hosts = ["{tarballs.host}"]
only_hosts = ["127.0.0.1"]
"""
    boto3.client("s3", endpoint_url=aws_standin.url, region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing") \
        .create_bucket(Bucket="provider-images")
    running = start_service(tmp_path_factory.mktemp("ec2") / "etc", config,
                            tokens={"demo": TOKEN},
                            env={"AWS_ENDPOINT_URL": aws_standin.url,
                                 "DEMO_AWS_KEY": AWS_KEY, "DEMO_AWS_SECRET": AWS_SECRET})
    try:
        yield running
    finally:
        running.stop()
        log = running.output()
        assert AWS_SECRET not in log and TOKEN not in log


def test_the_demo_a_post_becomes_an_ami(service: Service, tarballs: TarballServer,
                                        aws_standin: Any) -> None:
    ec2 = boto3.client("ec2", endpoint_url=aws_standin.url, region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    s3 = boto3.client("s3", endpoint_url=aws_standin.url, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    answers = []
    manifest = served_cloudlet(tarballs, "web", "2.0")
    created = service.call("POST", "/v1/images", "demo", json={
        "manifest": manifest, "format": "ec2", "target": "s3",
        "format_options": {"ex_description": "the demo"}})
    answers.append(created)
    assert created.status_code == 202, created.text
    image = service.wait_image(created.json()["id"], "demo", timeout=120)
    assert image["status"] == "ready", image
    ami = image["provider_id"]
    assert ami.startswith("ami-") and image["image_id"] == ami
    disk = image["artifacts"][0]
    assert disk["location"].startswith("s3://provider-images/cloudlets/demo/web/")

    listed = service.call("GET", "/v1/images", "demo")
    answers.append(listed)
    assert ami in {i["provider_id"] for i in listed.json()["images"]}
    described = ec2.describe_images(ImageIds=[ami])["Images"][0]
    assert described["Description"] == "the demo"
    tags = {t["Key"]: t["Value"] for t in described["Tags"]}
    assert tags["cloudlets:version"] == "2.0"
    key = disk["location"].removeprefix("s3://provider-images/")
    assert s3.head_object(Bucket="provider-images", Key=key)["ContentLength"] == disk["size"]

    again = service.call("POST", "/v1/images", "demo", json={
        "manifest": manifest, "format": "ec2", "target": "s3",
        "format_options": {"ex_description": "the demo"}})
    assert again.status_code == 200 and again.json()["provider_id"] == ami  # no second AMI
    assert len(ec2.describe_images()["Images"]) == 1

    deleted = service.call("DELETE", f"/v1/images/{ami}", "demo")
    answers.append(deleted)
    assert deleted.status_code == 200 and deleted.json()["status"] == "deleted", deleted.text
    assert ec2.describe_images()["Images"] == []  # deregistered
    with pytest.raises(s3.exceptions.ClientError):
        s3.head_object(Bucket="provider-images", Key=key)
    targets = service.call("GET", "/v1/targets", "demo")
    answers.append(targets)
    for answer in answers:
        assert AWS_SECRET not in answer.text and AWS_KEY not in answer.text
    assert json.loads(targets.text)["targets"][0]["name"] == "s3"
