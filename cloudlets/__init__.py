"""cloudlets: render portable server images from a manifest and a root
filesystem tarball, into any format, onto any storage.

The public surface::

    from cloudlets import Renderer, Manifest

    result = Renderer().render("manifest.json", "out/", storage="local", format="qcow2")
    print(result.image_id, result.primary.location)
"""

import logging

from cloudlets.config import Presets, RenderConfig, resolve_config
from cloudlets.drivers.base import FormatDriver, StorageDriver, StoredArtifact
from cloudlets.drivers.providers import get_driver, list_drivers, set_driver
from cloudlets.drivers.types import Format, FormatCapability, Storage, StorageCapability
from cloudlets.errors import (
    CacheError,
    CatalogError,
    CloudletsError,
    ConfigError,
    ConfigurationError,
    DiskError,
    DriverNotFoundError,
    FetchError,
    FormatError,
    ImageNotFoundError,
    IntegrityError,
    LockedKeyError,
    ManifestError,
    RenderError,
    SignatureError,
    StageNotAvailableError,
    StorageError,
    TemplateError,
    UnsafeArchiveError,
)
from cloudlets.manifest import Manifest
from cloudlets.renderer import Renderer
from cloudlets.result import RenderResult
from cloudlets.version import __version__

# The library never prints: without a handler of the application's, its
# warnings go nowhere rather than to Python's last-resort stderr handler.
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "CacheError",
    "CatalogError",
    "CloudletsError",
    "ConfigError",
    "ConfigurationError",
    "DiskError",
    "DriverNotFoundError",
    "FetchError",
    "Format",
    "FormatCapability",
    "FormatDriver",
    "FormatError",
    "ImageNotFoundError",
    "IntegrityError",
    "LockedKeyError",
    "Manifest",
    "ManifestError",
    "Presets",
    "RenderConfig",
    "RenderError",
    "RenderResult",
    "Renderer",
    "SignatureError",
    "StageNotAvailableError",
    "Storage",
    "StorageCapability",
    "StorageDriver",
    "StorageError",
    "StoredArtifact",
    "TemplateError",
    "UnsafeArchiveError",
    "__version__",
    "get_driver",
    "list_drivers",
    "resolve_config",
    "set_driver",
]
