"""libcloud's ``create_image(manifest)``: the mixin and the wrapper on
libcloud's real Dummy driver, with real renders and a real catalog."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any, ClassVar

import pytest
from libcloud.compute.base import Node, NodeDriver, NodeImage  # type: ignore[import-untyped]
from libcloud.compute.drivers.dummy import DummyNodeDriver  # type: ignore[import-untyped]

from cloudlets.catalog import ImageCatalog, ImageStatus
from cloudlets.compute import EXTRA_KEY, CloudletsImageMixin, CloudletsNodeDriver
from cloudlets.config import Presets
from cloudlets.drivers.base import FormatContext, PublishResult, StorageDriver, StoredArtifact
from cloudlets.drivers.formats.tar import TarFormat
from cloudlets.drivers.storage.local import LocalStorage
from cloudlets.drivers.types import FormatCapability
from cloudlets.errors import ConfigurationError, IntegrityError, LockedKeyError
from cloudlets.manifest import Manifest
from cloudlets.renderer import Renderer
from tests.netpolicy import host_port
from tests.test_catalog import StageCounter, make_cloudlet

DUMMY_IMAGES = {"1", "2", "3"}
ROOT = Path(__file__).resolve().parents[1]


class ProviderDriver(CloudletsImageMixin, DummyNodeDriver):  # type: ignore[misc]
    """A provider's own driver: libcloud's Dummy with rendered images."""


def _renderer(tmp_path: Path, locked: bool = True) -> Renderer:
    presets = Presets(values={"hostname": "provider-host",
                              "dns": {"nameservers": ["192.0.2.53"]}},
                      locked=frozenset({"hostname", "dns"}) if locked else frozenset())
    return Renderer(cache_dir=tmp_path / "cache", data_dir=tmp_path / "data", presets=presets,
                    ex_allow_file_urls=True, ex_source_date_epoch=1_700_000_000)


def _motd(location: str) -> str:
    with tarfile.open(location) as tar:
        member = tar.extractfile("./etc/motd")
        assert member is not None
        return member.read().decode()


@pytest.fixture
def driver(tmp_path: Path) -> ProviderDriver:
    provider = ProviderDriver(0)
    provider.ex_configure_cloudlets(renderer=_renderer(tmp_path), format="tar",
                                    storage=LocalStorage(tmp_path / "images"),
                                    output=str(tmp_path / "images") + "/{name}/{key}/",
                                    catalog=tmp_path / "catalog.sqlite3")
    return provider


def test_create_image_from_a_manifest_applies_the_presets(driver: ProviderDriver,
                                                          tmp_path: Path) -> None:
    manifest = make_cloudlet(tmp_path / "src")
    image = driver.create_image(manifest, ex_config={"args": {"motd": "welcome"}})
    assert isinstance(image, NodeImage) and image.driver is driver
    entry = driver.ex_cloudlets.catalog.get(image.id)
    assert image.id == entry.image_id and entry.ready and image.name == "tiny-1.0"
    extra = image.extra[EXTRA_KEY]
    assert extra["manifest"] == {"name": "tiny", "version": "1.0",
                                 "digest": Manifest.load(manifest).digest}
    assert extra["format"] == "tar" and extra["storage"] == "local"
    location = extra["artifacts"][0]["location"]
    assert location.startswith(str(tmp_path / "images" / "tiny"))
    assert _motd(location) == "welcome on provider-host\n"  # the preset host name


def test_locked_presets_cannot_be_overridden(driver: ProviderDriver, tmp_path: Path) -> None:
    manifest = make_cloudlet(tmp_path / "src")
    with pytest.raises(LockedKeyError, match="hostname"):
        driver.create_image(manifest, ex_config={"hostname": "mine"})
    assert driver.ex_cloudlets.catalog.entries() == []


def test_rendered_images_are_listed_got_and_deleted(driver: ProviderDriver,
                                                   tmp_path: Path) -> None:
    assert {i.id for i in driver.list_images()} == DUMMY_IMAGES
    first = driver.create_image(make_cloudlet(tmp_path / "a", name="web", version="1.0"))
    second = driver.create_image(make_cloudlet(tmp_path / "b", name="web", version="1.1"),
                                 name="web (new)")
    listed = {i.id: i for i in driver.list_images()}
    assert set(listed) == DUMMY_IMAGES | {first.id, second.id}
    assert listed[second.id].name == "web (new)"
    assert listed[first.id].extra[EXTRA_KEY]["manifest"]["version"] == "1.0"
    got = driver.get_image(first.id)
    assert got.id == first.id and got.extra == first.extra
    location = Path(first.extra[EXTRA_KEY]["artifacts"][0]["location"])
    assert location.is_file()
    assert driver.delete_image(got) is True
    assert not location.exists()
    assert driver.ex_cloudlets.catalog.get(first.id).status is ImageStatus.DELETED
    assert {i.id for i in driver.list_images()} == DUMMY_IMAGES | {second.id}
    with pytest.raises(NotImplementedError):  # gone from ours: the Dummy's own lookup
        driver.get_image(first.id)
    with pytest.raises(NotImplementedError):  # the Dummy cannot delete its own images
        driver.delete_image(driver.list_images()[0])


def test_the_same_manifest_is_rendered_once(driver: ProviderDriver, tmp_path: Path) -> None:
    manifest = make_cloudlet(tmp_path / "src")
    counter = StageCounter()
    first = driver.create_image(manifest, ex_progress=counter)
    again = driver.create_image(manifest, ex_progress=counter)
    assert again.id == first.id and counter.converts == 1
    forced = driver.create_image(manifest, ex_progress=counter, ex_force=True)
    assert forced.id == first.id and counter.converts == 2
    assert [i.id for i in driver.list_images()].count(first.id) == 1


def test_create_image_from_a_node_keeps_its_libcloud_meaning(tmp_path: Path) -> None:
    class SnapshottingDummy(DummyNodeDriver):  # type: ignore[misc]
        def create_image(self, node: Node, name: str,
                         description: str | None = None) -> NodeImage:
            return NodeImage(id=f"snap-{node.id}", name=name, driver=self,
                             extra={"description": description})

    class Snapshotting(CloudletsImageMixin, SnapshottingDummy):  # type: ignore[misc]
        pass

    provider = Snapshotting(0)
    provider.ex_configure_cloudlets(renderer=_renderer(tmp_path), format="tar",
                                    storage="local", catalog=tmp_path / "c.sqlite3")
    node = provider.list_nodes()[0]
    snapshot = provider.create_image(node, "backup", "nightly")
    assert (snapshot.id, snapshot.name, snapshot.extra) == (
        f"snap-{node.id}", "backup", {"description": "nightly"})
    assert provider.ex_cloudlets.catalog.entries() == []
    plain = ProviderDriver(0)  # libcloud's Dummy has no create_image: its own error
    with pytest.raises(NotImplementedError, match="create_image not implemented"):
        plain.create_image(node, "backup")
    with pytest.raises(TypeError, match="description"):
        provider.create_image(make_cloudlet(tmp_path / "src"), "x", "not for manifests")


def test_unconfigured_mixin_is_the_plain_driver(tmp_path: Path) -> None:
    plain = ProviderDriver(0)
    assert {i.id for i in plain.list_images()} == DUMMY_IMAGES
    with pytest.raises(ConfigurationError, match="ex_configure_cloudlets"):
        plain.create_image(make_cloudlet(tmp_path / "src"))
    with pytest.raises(ConfigurationError, match="not both"):
        plain.ex_configure_cloudlets(renderer=_renderer(tmp_path), presets=Presets(),
                                     format="tar", storage="local")
    with pytest.raises(ConfigurationError, match="explicit output"):
        plain.ex_configure_cloudlets(renderer=_renderer(tmp_path), format="tar",
                                     storage=_NamedStorage())


def test_failed_render_is_not_listed(driver: ProviderDriver, tmp_path: Path) -> None:
    manifest = make_cloudlet(tmp_path / "src")
    manifest["filesystem"]["sha256"] = "0" * 64
    with pytest.raises(IntegrityError):
        driver.create_image(manifest)
    assert {i.id for i in driver.list_images()} == DUMMY_IMAGES
    (entry,) = driver.ex_cloudlets.catalog.entries()
    assert entry.status is ImageStatus.FAILED and entry.error_type == "IntegrityError"


def test_wrapper_gives_a_driver_instance_rendered_images(
        tmp_path: Path, static_http: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    # The wrapper builds its Renderer from the presets: default directories,
    # and the tarball comes over HTTP as in production.
    monkeypatch.setenv("CLOUDLETS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CLOUDLETS_CACHE_DIR", str(tmp_path / "cache"))
    base_url, www = static_http
    manifest = make_cloudlet(www)
    manifest["filesystem"]["url"] = f"{base_url}/tiny.tar.gz"
    dummy = DummyNodeDriver(0)
    wrapped = CloudletsNodeDriver(dummy, ex_format=TarFormat(), ex_storage="local",
                                  ex_presets=Presets(values={"hostname": "wrapped"}),
                                  ex_allow_hosts=[host_port(base_url)])
    assert wrapped.ex_cloudlets.catalog.path == tmp_path / "home" / "catalog.sqlite3"
    assert wrapped.list_nodes() == dummy.list_nodes()  # everything else is the driver's
    assert wrapped.name == dummy.name and wrapped.features == dummy.features
    assert isinstance(wrapped, NodeDriver) and wrapped.connection is dummy.connection
    image = wrapped.create_image(manifest)
    assert image.driver is wrapped
    location = image.extra[EXTRA_KEY]["artifacts"][0]["location"]
    assert location.startswith(str(tmp_path / "home" / "images"))  # the default output
    assert _motd(location) == "hello on wrapped\n"
    assert {i.id for i in wrapped.list_images()} == DUMMY_IMAGES | {image.id}
    assert {i.id for i in dummy.list_images()} == DUMMY_IMAGES  # the driver is untouched
    assert wrapped.get_image(image.id).extra == image.extra
    assert wrapped.delete_image(image) is True
    assert {i.id for i in wrapped.list_images()} == DUMMY_IMAGES
    with pytest.raises(ConfigurationError, match="already renders"):
        CloudletsNodeDriver(wrapped, ex_format="tar", ex_storage="local")


USER_DRIVER = """
from libcloud.compute.drivers.dummy import DummyNodeDriver
from libcloud.compute.base import NodeDriver

from cloudlets.compute import CloudletsImageMixin, CloudletsNodeDriver


class AcmeDriver(CloudletsImageMixin, DummyNodeDriver):
    pass


def wrap(driver: NodeDriver) -> NodeDriver:
    return CloudletsNodeDriver(driver, ex_format="qcow2", ex_storage="local")


def create(driver: AcmeDriver) -> str:
    image = driver.create_image("web.json")
    return str(image.id)
"""


def test_a_provider_driver_mixing_it_in_passes_mypy_strict(tmp_path: Path) -> None:
    module = tmp_path / "acme_driver.py"
    module.write_text(USER_DRIVER)
    done = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                           "--cache-dir", str(tmp_path / "cache"), str(module)],
                          capture_output=True, text=True, timeout=300, check=False,
                          cwd=tmp_path, env={**os.environ, "MYPYPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr


# -- a format that registers the image with the provider, as EC2 does -----------

class RegistryDummy(DummyNodeDriver):  # type: ignore[misc]
    """A provider whose API knows its images (as EC2 knows AMIs)."""

    def __init__(self, creds: Any) -> None:
        super().__init__(creds)
        self.registered: dict[str, NodeImage] = {}

    def list_images(self, location: Any = None, ex_image_ids: list[str] | None = None
                    ) -> list[NodeImage]:
        images = list(self.registered.values())
        if ex_image_ids is not None:
            return [i for i in images if i.id in ex_image_ids]
        return super().list_images(location) + images

    def get_image(self, image_id: str) -> NodeImage:
        return self.list_images(ex_image_ids=[image_id])[0]

    def delete_image(self, node_image: NodeImage) -> bool:
        return self.registered.pop(node_image.id, None) is not None


class RegisteringFormat(TarFormat):
    """The tar format plus a publish step registering the stored tarball."""

    name: ClassVar[str] = "registered-tar"
    capabilities: ClassVar[FormatCapability] = (
        FormatCapability.NEEDS_TREE | FormatCapability.PUBLISH)

    def __init__(self, registry: RegistryDummy) -> None:
        super().__init__()
        self.registry = registry

    def publish(self, context: FormatContext, stored: list[StoredArtifact],
                storage: StorageDriver) -> PublishResult:
        image_id = f"reg-{stored[0].sha256[:12]}"
        self.registry.registered[image_id] = NodeImage(
            id=image_id, name=context.basename, driver=self.registry,
            extra={"state": "available", "location": stored[0].location})
        return PublishResult(image_id=image_id, details={"registered": image_id})


class RegistryProvider(CloudletsImageMixin, RegistryDummy):  # type: ignore[misc]
    pass


def test_published_images_carry_the_provider_id_and_are_deregistered(tmp_path: Path) -> None:
    provider = RegistryProvider(0)
    provider.ex_configure_cloudlets(renderer=_renderer(tmp_path, locked=False),
                                    format=RegisteringFormat(provider), storage="local",
                                    output=str(tmp_path / "out") + "/{key}/",
                                    catalog=tmp_path / "c.sqlite3")
    image = provider.create_image(make_cloudlet(tmp_path / "src"))
    assert image.id.startswith("reg-") and image.id in provider.registered
    listed = [i for i in provider.list_images() if i.id == image.id]
    assert len(listed) == 1  # the provider's own entry, annotated, not a duplicate
    assert listed[0].extra["state"] == "available"
    assert listed[0].extra[EXTRA_KEY]["manifest"]["version"] == "1.0"
    got = provider.get_image(image.id)  # the provider's facts and ours
    assert got.extra["state"] == "available" and got.extra[EXTRA_KEY]["status"] == "ready"
    filtered = provider.list_images(ex_image_ids=[image.id])  # EC2's get_image path
    assert [i.id for i in filtered] == [image.id]
    location = Path(image.extra[EXTRA_KEY]["artifacts"][0]["location"])
    assert provider.delete_image(got) is True
    assert image.id not in provider.registered and not location.exists()
    assert provider.ex_cloudlets.catalog.get(image.id).status is ImageStatus.DELETED


class CountingFormat(RegisteringFormat):
    """Registers every publish under a new id, as EC2 names each AMI with its time."""

    name: ClassVar[str] = "counting-tar"

    def __init__(self, registry: RegistryDummy) -> None:
        super().__init__(registry)
        self.count = 0

    def publish(self, context: FormatContext, stored: list[StoredArtifact],
                storage: StorageDriver) -> PublishResult:
        self.count += 1
        image_id = f"reg-{self.count}"
        self.registry.registered[image_id] = NodeImage(
            id=image_id, name=context.basename, driver=self.registry,
            extra={"state": "available", "location": stored[0].location})
        return PublishResult(image_id=image_id, details={"registered": image_id})


def test_a_forced_render_withdraws_the_published_image_it_replaced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = RegistryProvider(0)
    provider.ex_configure_cloudlets(renderer=_renderer(tmp_path, locked=False),
                                    format=CountingFormat(provider), storage="local",
                                    output=str(tmp_path / "out") + "/{key}/",
                                    catalog=tmp_path / "c.sqlite3")
    manifest = make_cloudlet(tmp_path / "src")
    catalog = provider.ex_cloudlets.catalog
    first = provider.create_image(manifest)
    assert provider.create_image(manifest).id == first.id == "reg-1"  # no force: the same
    forced = provider.create_image(manifest, ex_force=True)
    assert forced.id == "reg-2"
    assert list(provider.registered) == ["reg-2"]  # reg-1 deregistered
    assert [i.id for i in provider.list_images() if i.id.startswith("reg-")] == ["reg-2"]
    assert catalog.get("reg-1").status is ImageStatus.DELETED
    stored = Path(forced.extra[EXTRA_KEY]["artifacts"][0]["location"])
    assert stored.is_file()  # the same location: the new image's artifact, kept

    # a provider that will not let go: the new image stands, the old one stays
    # superseded (and registered) for the next forced render to withdraw
    monkeypatch.setattr(RegistryDummy, "delete_image", lambda self, image: False)
    third = provider.create_image(manifest, ex_force=True)
    assert third.id == "reg-3" and set(provider.registered) == {"reg-2", "reg-3"}
    assert catalog.get("reg-2").status is ImageStatus.SUPERSEDED
    assert catalog.get("reg-3").status is ImageStatus.READY
    monkeypatch.undo()
    fourth = provider.create_image(manifest, ex_force=True)
    assert list(provider.registered) == [fourth.id] == ["reg-4"]
    assert catalog.get("reg-2").status is catalog.get("reg-3").status is ImageStatus.DELETED


class _NamedStorage(LocalStorage):
    name: ClassVar[str] = "elsewhere"


def test_catalog_is_shared_between_drivers_by_format_and_storage(tmp_path: Path) -> None:
    catalog = ImageCatalog(tmp_path / "c.sqlite3")
    tar_driver = ProviderDriver(0)
    tar_driver.ex_configure_cloudlets(renderer=_renderer(tmp_path), format="tar",
                                      storage="local", output=str(tmp_path / "o") + "/{key}/",
                                      catalog=catalog)
    other = CloudletsNodeDriver(DummyNodeDriver(0), ex_renderer=_renderer(tmp_path),
                                ex_format="tar", ex_storage=_NamedStorage(),
                                ex_output=str(tmp_path / "p") + "/{key}/", ex_catalog=catalog)
    image = tar_driver.create_image(make_cloudlet(tmp_path / "src"))
    assert image.id in {i.id for i in tar_driver.list_images()}
    assert image.id not in {i.id for i in other.list_images()}  # another storage's images
    with pytest.raises(NotImplementedError):
        other.get_image(image.id)
    assert catalog.get(image.id).ready


# -- EC2: libcloud's EC2 driver against the AWS stand-in -------------------------

def _aws_standin_fixture() -> Any:
    """The stand-in's fixture, or a skip saying what is missing."""
    try:
        import boto3  # type: ignore[import-untyped]  # noqa: F401
        import moto  # type: ignore[import-untyped]  # noqa: F401

        from tests.awsstandin import aws_standin
    except ImportError as exc:
        reason = f"the AWS stand-in (tests/awsstandin.py, moto[server], boto3) is missing: {exc}"

        @pytest.fixture
        def unavailable() -> None:
            pytest.skip(reason)

        return unavailable
    return aws_standin


aws_standin = _aws_standin_fixture()


def test_ec2_driver_renders_lists_and_deletes_amis(tmp_path: Path, aws_standin: Any,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from libcloud.compute.drivers.ec2 import EC2NodeDriver  # type: ignore[import-untyped]

    from cloudlets.drivers.formats.ec2 import EC2Format
    from cloudlets.drivers.storage.s3 import S3Storage
    from cloudlets.images import storage_driver_for

    class ProviderEC2(CloudletsImageMixin, EC2NodeDriver):  # type: ignore[misc]
        pass

    # Every AWS client (S3Storage, EC2Format, a storage driver rebuilt from
    # the catalog) finds the stand-in through the environment.
    monkeypatch.setenv("AWS_ENDPOINT_URL", aws_standin.url)
    s3 = boto3.client("s3", endpoint_url=aws_standin.url, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    ec2 = boto3.client("ec2", endpoint_url=aws_standin.url, region_name="us-east-1",
                       aws_access_key_id="testing", aws_secret_access_key="testing")
    s3.create_bucket(Bucket="provider-images")
    port = int(aws_standin.url.rsplit(":", 1)[1])
    # SigV4, as AWS requires: its credential scope is also how moto's server
    # tells an EC2 call from an S3 one on a shared endpoint.
    driver = ProviderEC2("testing", "testing", region="us-east-1", host="127.0.0.1",
                         port=port, secure=False, signature_version="4")
    driver.ex_configure_cloudlets(
        renderer=_renderer(tmp_path),
        format=EC2Format(ex_poll_interval=0.05, ex_poll_deadline=20.0),
        storage=S3Storage(), output="s3://provider-images/{name}/{key}/",
        catalog=tmp_path / "catalog.sqlite3")
    manifest = make_cloudlet(tmp_path / "src", name="web", version="2.0")
    image = driver.create_image(manifest)
    assert image.id.startswith("ami-")  # the provider's image id
    described = ec2.describe_images(ImageIds=[image.id])["Images"][0]
    tags = {t["Key"]: t["Value"] for t in described["Tags"]}
    assert tags["cloudlets:version"] == "2.0"
    assert tags["cloudlets:digest"] == image.extra[EXTRA_KEY]["manifest"]["digest"]
    entry = driver.ex_cloudlets.catalog.get(image.id)
    assert entry.published and entry.artifacts[0].location.startswith("s3://provider-images/web/")
    assert storage_driver_for(entry).name == "s3"  # rebuildable from the record + environment

    listed = [i for i in driver.list_images() if i.id == image.id]
    assert len(listed) == 1  # EC2's own AMI, annotated, not listed twice
    assert listed[0].extra["root_device_type"] == "ebs"
    assert listed[0].extra[EXTRA_KEY]["manifest"]["version"] == "2.0"
    got = driver.get_image(image.id)
    assert got.extra["architecture"] == "x86_64" and got.extra[EXTRA_KEY]["status"] == "ready"
    assert driver.create_image(manifest).id == image.id  # idempotent: no second AMI
    assert len(ec2.describe_images()["Images"]) == 1

    # a forced render registers a new AMI and deregisters the one it replaced
    forced = driver.create_image(manifest, ex_force=True)
    assert forced.id.startswith("ami-") and forced.id != image.id
    assert [i["ImageId"] for i in ec2.describe_images()["Images"]] == [forced.id]
    assert driver.ex_cloudlets.catalog.get(image.id).status is ImageStatus.DELETED
    got = driver.get_image(forced.id)

    key = entry.artifacts[0].location.removeprefix("s3://provider-images/")
    assert s3.head_object(Bucket="provider-images", Key=key)  # the new AMI's too: kept
    assert driver.delete_image(got) is True
    assert ec2.describe_images()["Images"] == []  # deregistered
    with pytest.raises(s3.exceptions.ClientError):
        s3.head_object(Bucket="provider-images", Key=key)
    assert driver.ex_cloudlets.catalog.get(forced.id).status is ImageStatus.DELETED
