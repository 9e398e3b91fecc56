"""The image catalog, a pure store of image records: what was rendered,
from which manifest version, where it is stored, and whether it is ready.

* :mod:`cloudlets.catalog.records`: the request, entry and claim records;
* :mod:`cloudlets.catalog.schema`: the SQLite schema and its migrations;
* :mod:`cloudlets.catalog.leases`: owners and leases of renders in flight;
* :mod:`cloudlets.catalog.store`: :class:`ImageCatalog`, the store itself.

The catalog renders nothing and builds no driver: :mod:`cloudlets.images`
is the create-image operation over it.
"""

from cloudlets.catalog.records import (
    IN_FLIGHT,
    OWNER_LOST,
    CatalogEntry,
    Claim,
    ClaimState,
    ImageStatus,
    RenderRequest,
)
from cloudlets.catalog.schema import MIGRATIONS, SCHEMA_VERSION
from cloudlets.catalog.store import CATALOG_FILENAME, ImageCatalog, default_catalog_path
from cloudlets.errors import CatalogError

__all__ = [
    "CATALOG_FILENAME",
    "IN_FLIGHT",
    "MIGRATIONS",
    "OWNER_LOST",
    "SCHEMA_VERSION",
    "CatalogEntry",
    "CatalogError",
    "Claim",
    "ClaimState",
    "ImageCatalog",
    "ImageStatus",
    "RenderRequest",
    "default_catalog_path",
]
