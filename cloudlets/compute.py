"""The libcloud side: ``create_image(manifest)`` for any compute driver.

A hosting provider closes the loop of the rendering service here: a
create-image call takes a manifest and returns an image id, and the image
shows up in ``list_images``. Two ways to add it to a libcloud ``NodeDriver``:

* :class:`CloudletsImageMixin`, put before the driver class in a subclass
  (``class MyDriver(CloudletsImageMixin, EC2NodeDriver)``), configured once
  with :meth:`CloudletsImageMixin.ex_configure_cloudlets`;
* :class:`CloudletsNodeDriver`, a wrapper around a driver instance you
  cannot subclass; every other attribute is the wrapped driver's.

``create_image(node, name)`` keeps its libcloud meaning: the first argument's
type decides (a :class:`~libcloud.compute.base.Node` goes to the driver's own
method). A manifest goes through the create-image operation
(:class:`cloudlets.images.Images`), which records the image in the
:class:`~cloudlets.catalog.ImageCatalog`; ``list_images``, ``get_image`` and
``delete_image`` serve them beside the driver's own images.

``create_image(manifest)`` never waits for another process: when the same
request is being rendered elsewhere it returns that image in flight (its
``extra["cloudlets"]["status"]`` says so), and ``ex_wait_image`` waits for it,
as libcloud keeps ``wait_until_running`` apart from ``create_node``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from libcloud.compute.base import Node, NodeDriver, NodeImage

from cloudlets.catalog import IN_FLIGHT, CatalogEntry, ImageCatalog, ImageStatus
from cloudlets.config import Presets
from cloudlets.drivers.base import FormatDriver, StorageDriver
from cloudlets.drivers.providers import make_driver
from cloudlets.drivers.types import DriverKind
from cloudlets.errors import ConfigurationError
from cloudlets.images import Images, Withdraw
from cloudlets.renderer import ManifestSource, ProgressCallback, Renderer

__all__ = [
    "EXTRA_KEY",
    "CloudletsImageMixin",
    "CloudletsImages",
    "CloudletsNodeDriver",
    "image_extra",
]

log = logging.getLogger(__name__)

#: ``NodeImage.extra`` key marking an image as rendered by cloudlets.
EXTRA_KEY = "cloudlets"


class CloudletsImages:
    """The provider's rendering setup and the image operations both the
    mixin and the wrapper delegate to.

    :param renderer: the :class:`~cloudlets.renderer.Renderer`, carrying the
        provider's presets (network, DNS, locked keys) and mirrors.
    :param format: the format driver (instance or registered name).
    :param storage: the storage driver (instance or registered name).
    :param output: where images go, in the storage driver's syntax; may use
        ``{name}``, ``{version}`` and ``{key}`` (see
        :meth:`cloudlets.images.Images.submit`). Default
        ``<data_dir>/images/{key}/`` for local storage; other storages must
        set it.
    :param catalog: the :class:`~cloudlets.catalog.ImageCatalog`, or its
        path; default ``<renderer.data_dir>/catalog.sqlite3``.
    :param wait_timeout: seconds :meth:`wait` waits for a render in flight
        by default.
    :param poll_interval: seconds between looks at that render.
    """

    def __init__(self, renderer: Renderer, *, format: FormatDriver | str,  # noqa: A002
                 storage: StorageDriver | str, output: str | None = None,
                 catalog: ImageCatalog | str | Path | None = None,
                 wait_timeout: float = 3600.0, poll_interval: float = 0.5) -> None:
        self.renderer = renderer
        self.format = make_driver(DriverKind.FORMAT, format)
        self.storage = make_driver(DriverKind.STORAGE, storage)
        if output is None:
            if self.storage.name != "local":
                raise ConfigurationError(
                    f"storage {self.storage.name!r} needs an explicit output location")
            output = str(renderer.data_dir / "images") + "/{key}/"
        self.output = output
        self.images = Images(renderer, catalog)
        self.catalog = self.images.catalog
        self.wait_timeout = wait_timeout
        self.poll_interval = poll_interval

    def create(self, manifest: ManifestSource, *, label: str | None = None,
               config: Mapping[str, Any] | None = None, output: str | None = None,
               force: bool = False, progress: ProgressCallback | None = None,
               withdraw: Withdraw | None = None) -> CatalogEntry:
        """Render ``manifest`` (or find it rendered) and record it, through
        :meth:`cloudlets.images.Images.create`.

        :param force: render again even if the same image is ready.
        :param withdraw: ``withdraw(image_id, name)`` deletes an image with
            the provider's own ``delete_image``. A forced
            render of a published image registers a new one (EC2: a new AMI,
            its name carries the time); the ones it superseded are then
            deregistered with it, and their artifacts that the new image does
            not share are deleted.
        :returns: the ready catalog entry, or the entry in flight when
            another process renders the same request (see :meth:`wait`).
        """
        return self.images.create(
            manifest, output or self.output, self.storage, self.format, config, label=label,
            force=force, progress=progress, withdraw=withdraw if force else None)

    def wait(self, entry: CatalogEntry, timeout: float | None = None) -> CatalogEntry:
        """Wait for a render in flight (:meth:`create`'s entry when another
        process had it).

        :param timeout: seconds; default :attr:`wait_timeout`.
        :returns: the entry, ready or failed.
        :raises CatalogError: on timeout.
        """
        return self.images.wait(entry.entry_id,
                                self.wait_timeout if timeout is None else timeout,
                                poll_interval=self.poll_interval)

    def entries(self) -> list[CatalogEntry]:
        """:returns: the ready images this setup's format and storage made."""
        return self.catalog.entries(statuses=[ImageStatus.READY], format=self.format.name,
                                    target=self.storage.target)

    def find(self, image_id: str) -> CatalogEntry | None:
        """:returns: the ready image with this id, if this setup made it."""
        entry = self.catalog.find_ready(image_id, target=self.storage.target)
        if entry is None or entry.format != self.format.name:
            return None
        return entry

    def delete(self, entry: CatalogEntry) -> CatalogEntry:
        """Delete a rendered image's artifacts with the configured storage
        driver and mark its entry deleted."""
        return self.images.delete(entry.entry_id, storage=self.storage).entry

    @staticmethod
    def node_image(entry: CatalogEntry, driver: Any) -> NodeImage:
        """A ``NodeImage`` for an entry: a ready one under its image id, one
        in flight under its entry id.

        :returns: the image, its ``extra`` holding the catalog facts under
            :data:`EXTRA_KEY`.
        """
        return NodeImage(id=entry.ref, name=entry.label, driver=driver,
                         extra={EXTRA_KEY: image_extra(entry)})

    @staticmethod
    def annotate(image: NodeImage, entry: CatalogEntry) -> NodeImage:
        """Add the catalog facts to a provider's own image of the same id
        (a published AMI) and return it."""
        image.extra = dict(image.extra or {})
        image.extra[EXTRA_KEY] = image_extra(entry)
        return image

    def list_images(self, native: Callable[..., list[NodeImage]], driver: Any,
                    location: Any, filters: Mapping[str, Any]) -> list[NodeImage]:
        """The driver's own images (annotated when rendered here), then the
        rendered images it does not list. With provider filters (e.g. EC2's
        ``ex_image_ids``) only the driver's own result is returned."""
        try:
            images = list(native(location, **filters))
        except NotImplementedError:
            images = []
        rendered = {entry.image_id: entry for entry in self.entries()}
        for image in images:
            if image.id in rendered:
                self.annotate(image, rendered.pop(image.id))
        if not filters:
            images.extend(self.node_image(entry, driver) for entry in rendered.values())
        return images

    def get_image(self, native: Callable[[str], NodeImage], driver: Any,
                  image_id: str) -> NodeImage:
        """A rendered image (with the provider's own facts when the format
        published it), else the driver's own ``get_image``."""
        entry = self.find(image_id)
        if entry is None:
            return native(image_id)
        if entry.published:
            try:
                return self.annotate(native(image_id), entry)
            except NotImplementedError:
                pass
        return self.node_image(entry, driver)

    def delete_image(self, native: Callable[[NodeImage], bool], image: NodeImage) -> bool:
        """Delete a rendered image: first the provider's registration when
        the format published it (deregister the AMI), then its artifacts
        through the storage driver; the catalog entry is marked deleted.
        Another image goes to the driver's own ``delete_image``."""
        entry = self.find(image.id)
        if entry is None:
            candidate = self._deleting(image.id)
            if candidate is None:
                return bool(native(image))
            entry = candidate
        if entry.published and entry.status is ImageStatus.READY and not native(image):
            return False
        self.delete(entry)
        return True

    def _deleting(self, image_id: str) -> CatalogEntry | None:
        for entry in self.catalog.entries(statuses=[ImageStatus.DELETING,
                                                    ImageStatus.DELETE_FAILED],
                                          format=self.format.name, target=self.storage.target):
            if entry.image_id == image_id:
                return entry
        return None


class CloudletsImageMixin:
    """Gives a libcloud ``NodeDriver`` subclass ``create_image(manifest)``.

    Put it first in the bases and configure it once::

        class ProviderDriver(CloudletsImageMixin, DummyNodeDriver):
            pass

        driver = ProviderDriver(0)
        driver.ex_configure_cloudlets(renderer=Renderer(presets=presets),
                                      format="qcow2", storage=LocalStorage(root),
                                      output="/srv/images/{key}/")
        image = driver.create_image("manifest.json")
    """

    _cloudlets: CloudletsImages | None = None

    # -- standard API ---------------------------------------------------------

    def create_image(self, node: Node | ManifestSource, name: str | None = None,
                     description: str | None = None, *,
                     ex_config: Mapping[str, Any] | None = None, ex_output: str | None = None,
                     ex_force: bool = False, ex_progress: ProgressCallback | None = None,
                     **kwargs: Any) -> Any:
        """Create an image from a node (libcloud's meaning: delegated to the
        driver) or render one from a cloudlet manifest.

        Typed ``Any``: libcloud annotates ``NodeDriver.create_image`` as
        returning ``List[NodeImage]`` while its drivers return one
        ``NodeImage``; ``Any`` keeps a subclass that mixes this in clean
        under ``mypy --strict``.

        :param node: a :class:`~libcloud.compute.base.Node`, or a manifest (a
            :class:`~cloudlets.manifest.Manifest`, dict, JSON string, URL or path).
        :param name: the image name; for a manifest, its display name
            (default ``name-version``).
        :param description: for a node only.
        :param ex_config: the render config of this request (hostname, keys,
            args...); the provider's locked presets cannot be overridden.
        :param ex_output: overrides the configured output location.
        :param ex_force: render again even if the same image is ready.
        :param ex_progress: called as ``progress(stage, done, total)``.
        :param kwargs: the driver's own ``create_image`` options, for a node.
        :returns: the image; for a manifest its id is the render's image id
            (the provider's id, e.g. an AMI id, when the format publishes).
            When another process is rendering the same request, its image in
            flight (id: the catalog entry id; ``extra["cloudlets"]["status"]``
            ``pending`` or ``rendering``): :meth:`ex_wait_image` waits for it.
        :raises CloudletsError: when the render fails; nothing is listed.
        """
        if isinstance(node, Node):
            created: NodeImage = super().create_image(  # type: ignore[misc]
                node, name, description, **kwargs)
            return created
        if description is not None or kwargs:
            extra = sorted([*kwargs, *(["description"] if description is not None else [])])
            raise TypeError(f"create_image(manifest) does not take {', '.join(extra)}")
        images = self.ex_cloudlets
        withdraw = _withdrawer(super().delete_image, self)  # type: ignore[misc]
        entry = images.create(node, label=name, config=ex_config, output=ex_output,
                              force=ex_force, progress=ex_progress, withdraw=withdraw)
        return images.node_image(entry, self)

    def list_images(self, location: Any = None, **kwargs: Any) -> list[NodeImage]:
        """The driver's images and the rendered ones. Provider filters in
        ``kwargs`` (EC2's ``ex_image_ids``...) go to the driver's own
        method and leave the rendered images out.

        :rtype: ``list`` of :class:`~libcloud.compute.base.NodeImage`
        """
        native = super().list_images  # type: ignore[misc]
        if self._cloudlets is None:
            return list(native(location, **kwargs))
        return self._cloudlets.list_images(native, self, location, kwargs)

    def get_image(self, image_id: str) -> NodeImage:
        """A rendered image by id, else the driver's own ``get_image``."""
        native = super().get_image  # type: ignore[misc]
        if self._cloudlets is None:
            image: NodeImage = native(image_id)
            return image
        return self._cloudlets.get_image(native, self, image_id)

    def delete_image(self, node_image: NodeImage) -> bool:
        """Delete a rendered image (artifacts through the storage driver,
        the provider's registration if published; the catalog entry is
        marked deleted), else delegate to the driver."""
        native = super().delete_image  # type: ignore[misc]
        if self._cloudlets is None:
            return bool(native(node_image))
        return self._cloudlets.delete_image(native, node_image)

    # -- extensions -------------------------------------------------------------

    def ex_configure_cloudlets(self, *, format: FormatDriver | str,  # noqa: A002
                               storage: StorageDriver | str, output: str | None = None,
                               renderer: Renderer | None = None,
                               presets: Presets | None = None,
                               mirrors: list[Mapping[str, Any]] | None = None,
                               catalog: ImageCatalog | str | Path | None = None,
                               wait_timeout: float = 3600.0,
                               poll_interval: float = 0.5) -> CloudletsImages:
        """Configure rendering once for this driver.

        :param format: the format driver (instance or registered name).
        :param storage: the storage driver (instance or registered name).
        :param output: where images go (see :class:`CloudletsImages`).
        :param renderer: a configured renderer; or give ``presets`` and
            ``mirrors`` and one is built.
        :param presets: the provider's presets and locked keys.
        :param mirrors: the provider's mirror rules.
        :param catalog: the catalog or its path.
        :param wait_timeout: seconds to wait for the same render elsewhere.
        :param poll_interval: seconds between looks at it.
        :returns: the setup, also at :attr:`ex_cloudlets`.
        :raises ConfigurationError: when both a renderer and presets or
            mirrors are given.
        """
        self._cloudlets = _setup(format=format, storage=storage, output=output,
                                 renderer=renderer, presets=presets, mirrors=mirrors,
                                 catalog=catalog, wait_timeout=wait_timeout,
                                 poll_interval=poll_interval)
        return self._cloudlets

    def ex_wait_image(self, image: NodeImage, timeout: float | None = None) -> NodeImage:
        """Wait for an image :meth:`create_image` returned in flight.

        :param timeout: seconds; default the configured ``wait_timeout``.
        :returns: the image, ready (under its image id) or failed.
        :raises CatalogError: on timeout.
        """
        return _wait_image(self.ex_cloudlets, image, timeout, self)

    @property
    def ex_cloudlets(self) -> CloudletsImages:
        """The rendering setup.

        :raises ConfigurationError: before :meth:`ex_configure_cloudlets`.
        """
        if self._cloudlets is None:
            raise ConfigurationError(f"{type(self).__name__}: call ex_configure_cloudlets() "
                                     "before rendering images")
        return self._cloudlets


class CloudletsNodeDriver(NodeDriver):
    """Wraps a ``NodeDriver`` instance you cannot subclass. The image
    methods are extended as in :class:`CloudletsImageMixin`; every other
    attribute is the wrapped driver's.

    :param driver: the libcloud driver.
    :param ex_format: the format driver (instance or registered name).
    :param ex_storage: the storage driver (instance or registered name).
    :param ex_output: where images go (see :class:`CloudletsImages`).
    :param ex_renderer: a configured renderer; or give ``ex_presets`` and
        ``ex_mirrors``.
    :param ex_presets: the provider's presets and locked keys.
    :param ex_mirrors: the provider's mirror rules.
    :param ex_allow_hosts: ``HOST[:PORT]`` exceptions to the default URL
        policy (``Renderer(ex_allow_hosts=...)``), with ``ex_presets``.
    :param ex_catalog: the catalog or its path.
    :param ex_wait_timeout: seconds to wait for the same render elsewhere.
    :param ex_poll_interval: seconds between looks at it.

    It is a ``NodeDriver`` (``isinstance`` holds) whose every attribute but
    its own image methods and ``ex_`` setup is the wrapped driver's: its
    name, connection, features and methods.
    """

    def __init__(self, driver: NodeDriver, *, ex_format: FormatDriver | str,
                 ex_storage: StorageDriver | str, ex_output: str | None = None,
                 ex_renderer: Renderer | None = None, ex_presets: Presets | None = None,
                 ex_mirrors: list[Mapping[str, Any]] | None = None,
                 ex_allow_hosts: Sequence[str] = (),
                 ex_catalog: ImageCatalog | str | Path | None = None,
                 ex_wait_timeout: float = 3600.0, ex_poll_interval: float = 0.5) -> None:
        # NodeDriver.__init__ is not called: this driver has no connection
        # of its own, the wrapped one's serves.
        if isinstance(driver, CloudletsNodeDriver | CloudletsImageMixin):
            raise ConfigurationError("the driver already renders cloudlets")
        self.ex_driver = driver
        self.ex_cloudlets = _setup(format=ex_format, storage=ex_storage, output=ex_output,
                                   renderer=ex_renderer, presets=ex_presets,
                                   mirrors=ex_mirrors, allow_hosts=ex_allow_hosts,
                                   catalog=ex_catalog,
                                   wait_timeout=ex_wait_timeout,
                                   poll_interval=ex_poll_interval)

    def __getattribute__(self, name: str) -> Any:
        # What NodeDriver's class attributes would answer (name, type,
        # features, its methods) is the wrapped driver's.
        if name.startswith("__") or name in _WRAPPER_OWN:
            return object.__getattribute__(self, name)
        return getattr(object.__getattribute__(self, "ex_driver"), name)

    def __repr__(self) -> str:
        return f"<CloudletsNodeDriver {self.ex_driver!r}>"

    def create_image(self, node: Node | ManifestSource, name: str | None = None,
                     description: str | None = None, *,
                     ex_config: Mapping[str, Any] | None = None, ex_output: str | None = None,
                     ex_force: bool = False, ex_progress: ProgressCallback | None = None,
                     **kwargs: Any) -> Any:
        """As :meth:`CloudletsImageMixin.create_image`."""
        if isinstance(node, Node):
            native: Any = self.ex_driver.create_image
            created: NodeImage = native(node, name, description, **kwargs)
            return created
        if description is not None or kwargs:
            extra = sorted([*kwargs, *(["description"] if description is not None else [])])
            raise TypeError(f"create_image(manifest) does not take {', '.join(extra)}")
        entry = self.ex_cloudlets.create(
            node, label=name, config=ex_config, output=ex_output, force=ex_force,
            progress=ex_progress, withdraw=_withdrawer(self.ex_driver.delete_image,
                                                       self.ex_driver))
        return self.ex_cloudlets.node_image(entry, self)

    def ex_wait_image(self, image: NodeImage, timeout: float | None = None) -> NodeImage:
        """As :meth:`CloudletsImageMixin.ex_wait_image`."""
        return _wait_image(self.ex_cloudlets, image, timeout, self)

    def list_images(self, location: Any = None,
                    **kwargs: Any) -> list[NodeImage]:
        """As :meth:`CloudletsImageMixin.list_images`."""
        return self.ex_cloudlets.list_images(self.ex_driver.list_images, self, location, kwargs)

    def get_image(self, image_id: str) -> NodeImage:
        """As :meth:`CloudletsImageMixin.get_image`."""
        return self.ex_cloudlets.get_image(self.ex_driver.get_image, self, image_id)

    def delete_image(self, node_image: NodeImage) -> bool:
        """As :meth:`CloudletsImageMixin.delete_image`."""
        return self.ex_cloudlets.delete_image(self.ex_driver.delete_image, node_image)


#: Attributes a :class:`CloudletsNodeDriver` answers itself.
_WRAPPER_OWN = frozenset({"ex_driver", "ex_cloudlets",
                          *(n for n in vars(CloudletsNodeDriver) if not n.startswith("__"))})


# -- helpers --------------------------------------------------------------------

def _withdrawer(delete_image: Callable[[NodeImage], bool],
                driver: Any) -> Callable[[str, str], bool]:
    """``withdraw(image_id, name)`` for :meth:`CloudletsImages.create`,
    through a provider driver's own ``delete_image``."""

    def withdraw(image_id: str, label: str) -> bool:
        return bool(delete_image(NodeImage(id=image_id, name=label, driver=driver)))

    return withdraw


def image_extra(entry: CatalogEntry) -> dict[str, Any]:
    """The catalog facts shown in ``NodeImage.extra["cloudlets"]``.

    :returns: the entry id, status, the manifest's name, version and digest,
        the config digest, format, storage, output, artifacts and timestamps.
    """
    data = entry.to_dict()
    return {key: data[key] for key in (
        "entry_id", "status", "manifest", "config_digest", "format", "storage", "output",
        "artifacts", "created_at", "finished_at")}


def _setup(*, format: FormatDriver | str, storage: StorageDriver | str,  # noqa: A002
           output: str | None, renderer: Renderer | None, presets: Presets | None,
           mirrors: list[Mapping[str, Any]] | None, catalog: ImageCatalog | str | Path | None,
           wait_timeout: float, poll_interval: float,
           allow_hosts: Sequence[str] = ()) -> CloudletsImages:
    if renderer is None:
        renderer = Renderer(presets=presets, mirrors=mirrors, ex_allow_hosts=allow_hosts)
    elif presets is not None or mirrors is not None or allow_hosts:
        raise ConfigurationError("give the presets, mirrors and allowed hosts to the Renderer, "
                                 "or pass no renderer; not both")
    return CloudletsImages(renderer, format=format, storage=storage, output=output,
                           catalog=catalog, wait_timeout=wait_timeout,
                           poll_interval=poll_interval)


def _wait_image(images: CloudletsImages, image: NodeImage, timeout: float | None,
                driver: Any) -> NodeImage:
    entry = images.catalog.get(image.id)
    if entry.status in IN_FLIGHT:
        entry = images.wait(entry, timeout)
    return images.node_image(entry, driver)
