"""What a render returns."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cloudlets.drivers.base import StoredArtifact

__all__ = ["RenderResult", "image_id_for", "request_key"]


def request_key(manifest_digest: str, config_digest: str, format_name: str,
                storage_name: str, output: str) -> str:
    """The one digest that identifies a render request: the catalog's key
    and, through :func:`image_id_for`, the image id of a render.

    :param manifest_digest: sha256 of the manifest's canonical form.
    :param config_digest: sha256 of the merged render config.
    :param format_name: the format driver's name.
    :param storage_name: the storage driver's name.
    :param output: the output location as requested (a catalog output
        template such as ``/srv/{key}/`` is hashed as written).
    :returns: 64 hex digits.
    """
    parts = [manifest_digest, config_digest, format_name, storage_name, output]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def image_id_for(key: str) -> str:
    """:returns: the image id of a request key: ``img-`` and 20 hex digits."""
    return "img-" + key[:20]


@dataclass(frozen=True)
class RenderResult:
    """The outcome of :meth:`cloudlets.Renderer.render`.

    :ivar image_id: a stable id: the same manifest, config, format and
        output give the same id; a format that registers the image with a
        consumer (EC2) reports the consumer's id instead.
    :ivar format: the format driver's name.
    :ivar storage: the storage driver's name.
    :ivar artifacts: what was stored, the primary artifact first.
    :ivar manifest_name: the manifest's name.
    :ivar manifest_version: the manifest's version, if any.
    :ivar manifest_digest: sha256 of the manifest's canonical form.
    :ivar config_digest: sha256 of the merged render config's canonical form.
    :ivar timings: seconds spent per stage, in pipeline order.
    :ivar details: facts stages recorded (mirror rule used, cache hit,
        persistent paths, disk layout, publish result...).
    """

    image_id: str
    format: str
    storage: str
    artifacts: tuple[StoredArtifact, ...]
    manifest_name: str
    manifest_version: str | None
    manifest_digest: str
    config_digest: str
    timings: Mapping[str, float] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def primary(self) -> StoredArtifact:
        """The main artifact (the disk, the OVA, the descriptor...)."""
        return self.artifacts[0]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RenderResult:
        """The result :meth:`to_dict` wrote (a worker's, sent back through
        a task queue).

        :raises KeyError: for a dict :meth:`to_dict` did not write.
        """
        manifest = data["manifest"]
        return cls(image_id=data["image_id"], format=data["format"], storage=data["storage"],
                   artifacts=tuple(StoredArtifact(**a) for a in data["artifacts"]),
                   manifest_name=manifest["name"], manifest_version=manifest["version"],
                   manifest_digest=manifest["digest"], config_digest=data["config_digest"],
                   timings=dict(data.get("timings", {})),
                   details=dict(data.get("details", {})))

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON.

        :returns: a JSON-ready dict (what ``cloudlets render --json``
            prints); ``signature`` (the signer's principal and key
            fingerprint) and ``provenance`` (its location, key id and
            sha256) are there when the render had them.
        """
        return {
            "image_id": self.image_id,
            "format": self.format,
            "storage": self.storage,
            "artifacts": [a.to_dict() for a in self.artifacts],
            "manifest": {"name": self.manifest_name, "version": self.manifest_version,
                         "digest": self.manifest_digest},
            "config_digest": self.config_digest,
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
            "details": dict(self.details),
            # who signed the manifest, and where the signed provenance went
            **({"signature": self.details["signature"]} if "signature" in self.details
               else {}),
            **({"provenance": {k: v for k, v in self.details["provenance"].items()
                               if k != "envelope"}}
               if "provenance" in self.details else {}),
        }
