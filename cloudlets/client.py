"""The rendering service's client side.

* :class:`ServiceClient`: create, get, wait, list and delete images over the
  REST API (``cloudlets serve``); every failure is a
  :class:`~cloudlets.errors.CloudletsError`, the service's answers being
  the classes of :mod:`cloudlets.service.errors` (``NotFound``,
  ``BadRequest`` with its JSON-pointer problems...).
* :class:`CloudletsServiceNodeDriver`: a libcloud ``NodeDriver`` over the
  service, so a provider's libcloud users get ``create_image(manifest)``
  and ``list_images()``.

Neither needs the ``cloudlets[service]`` extra: they speak HTTP with
requests.
"""

from __future__ import annotations

import builtins
import json
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests
from libcloud.compute.base import Node, NodeDriver, NodeImage

from cloudlets.errors import CloudletsError
from cloudlets.service.errors import ServiceError, ServiceUnavailable, error_for_status

__all__ = ["CloudletsServiceNodeDriver", "RenderFailed", "ServiceClient", "WaitTimeout"]

#: Statuses of a render still in flight.
IN_FLIGHT = ("pending", "rendering")


class RenderFailed(ServiceError):
    """:meth:`ServiceClient.wait` found the render failed.

    :ivar image: the image as the service showed it.
    """

    def __init__(self, image: Mapping[str, Any]) -> None:
        self.image = dict(image)
        error = image.get("error") or {}
        super().__init__(f"image {image.get('id')} failed: {error.get('type')}: "
                         f"{error.get('message')}", error=str(error.get("type") or ""))


class WaitTimeout(ServiceError):
    """:meth:`ServiceClient.wait` gave up."""


class ServiceClient:
    """A client of the Cloudlets Rendering Service.

    :param url: the service's base URL (``http://127.0.0.1:8750``).
    :param token: the tenant's bearer token.
    :param timeout: seconds per HTTP request.
    :param session: the HTTP session to use (default: a new one).
    """

    def __init__(self, url: str, token: str, *, timeout: float = 30.0,
                 session: requests.Session | None = None) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._session = session or requests.Session()
        self._headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}

    def __repr__(self) -> str:  # the token stays out of it
        return f"<ServiceClient {self.url}>"

    # -- the API --------------------------------------------------------------------

    def create(self, manifest: Mapping[str, Any] | str | Path, *, format: str,  # noqa: A002
               target: str, config: Mapping[str, Any] | None = None,
               format_options: Mapping[str, Any] | None = None,
               idempotency_key: str | None = None) -> dict[str, Any]:
        """Ask for an image (``POST /v1/images``).

        :param manifest: the manifest: a dict, a JSON file's path, or an
            ``http(s)://`` URL the service fetches.
        :param format: a format name (:meth:`formats`).
        :param target: a storage target name (:meth:`targets`).
        :param config: the render config.
        :param format_options: the format options the provider lets clients set.
        :param idempotency_key: the same key with the same request answers
            the same image.
        :returns: the image (``status`` ``pending`` for a new render).
        :raises ServiceError: the service's answer (``BadRequest`` lists
            every problem with its JSON pointer).
        """
        body: dict[str, Any] = {"format": format, "target": target}
        if isinstance(manifest, Mapping):
            body["manifest"] = dict(manifest)
        elif isinstance(manifest, str) and manifest.startswith(("http://", "https://")):
            body["manifest_url"] = manifest
        else:
            try:
                body["manifest"] = json.loads(Path(manifest).read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise CloudletsError(f"cannot read the manifest {manifest}: {exc}") from None
        if config is not None:
            body["config"] = dict(config)
        if format_options is not None:
            body["format_options"] = dict(format_options)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._call("POST", "/v1/images", json_body=body, headers=headers)

    def get(self, image_id: str) -> dict[str, Any]:
        """:returns: an image (``GET /v1/images/{id}``).
        :raises NotFound: when the tenant has no such image."""
        return self._call("GET", f"/v1/images/{quote(image_id, safe='')}")

    def wait(self, image_id: str, timeout: float = 3600.0, *,
             poll_interval: float = 1.0) -> dict[str, Any]:
        """Poll an image until it is no longer in flight.

        :returns: the image, ready (or deleted meanwhile).
        :raises RenderFailed: when the render failed.
        :raises WaitTimeout: after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            image = self.get(image_id)
            if image["status"] == "failed":
                raise RenderFailed(image)
            if image["status"] not in IN_FLIGHT:
                return image
            left = deadline - time.monotonic()
            if left <= 0:
                raise WaitTimeout(f"image {image_id} is still {image['status']} after "
                                  f"{timeout:g} s")
            time.sleep(min(poll_interval, left))

    def list(self, *, name: str | None = None, version: str | None = None,
             status: str | None = None, page_size: int | None = None
             ) -> Iterator[dict[str, Any]]:
        """Iterate over the tenant's images, page by page (``GET /v1/images``)."""
        params: dict[str, str] = {k: v for k, v in (("name", name), ("version", version),
                                                    ("status", status)) if v is not None}
        if page_size is not None:
            params["limit"] = str(page_size)
        while True:
            page = self._call("GET", "/v1/images", params=params)
            yield from page["images"]
            if not page.get("next"):
                return
            params["cursor"] = page["next"]

    def delete(self, image_id: str) -> dict[str, Any]:
        """Delete an image's artifacts (and deregister it when published).

        :returns: the deleted image.
        """
        return self._call("DELETE", f"/v1/images/{quote(image_id, safe='')}")

    def formats(self) -> builtins.list[dict[str, Any]]:
        """:returns: the formats the service offers."""
        return list(self._call("GET", "/v1/formats")["formats"])

    def targets(self) -> builtins.list[dict[str, Any]]:
        """:returns: the storage targets the service has."""
        return list(self._call("GET", "/v1/targets")["targets"])

    # -- internals ----------------------------------------------------------------

    def _call(self, method: str, path: str, *, json_body: Any = None,
              params: Mapping[str, str] | None = None,
              headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        try:
            response = self._session.request(
                method, self.url + path, json=json_body, params=params,
                headers={**self._headers, **(headers or {})}, timeout=self.timeout)
        except requests.RequestException as exc:
            raise ServiceUnavailable(f"cannot reach the service at {self.url}: "
                                     f"{type(exc).__name__}") from None
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code >= 400:
            raise error_for_status(response.status_code, body)
        if not isinstance(body, dict):
            raise ServiceError(f"{method} {path}: the service answered HTTP "
                               f"{response.status_code} without a JSON object")
        return body


class CloudletsServiceNodeDriver(NodeDriver):
    """A libcloud compute driver whose images are the service's.

    ``create_image(manifest)`` asks the service for an image and returns it
    (pending: :meth:`ex_wait_image` waits for it); ``list_images()`` lists
    the tenant's ready images. Nodes are not this driver's business.

    :param key: the tenant's bearer token.
    :param ex_url: the service's base URL.
    :param ex_format: the format of the images this driver creates.
    :param ex_target: the storage target they go to.
    :param ex_timeout: seconds per HTTP request.
    :param ex_wait_timeout: seconds :meth:`ex_wait_image` waits by default.
    """

    type = "cloudlets"
    name = "Cloudlets Rendering Service"
    website = "https://cloudlets.readthedocs.io/en/latest/service.html"

    def __init__(self, key: str, *, ex_url: str, ex_format: str = "qcow2",
                 ex_target: str = "local", ex_timeout: float = 30.0,
                 ex_wait_timeout: float = 3600.0) -> None:
        super().__init__(key)  # type: ignore[no-untyped-call]
        self.ex_client = ServiceClient(ex_url, key, timeout=ex_timeout)
        self.ex_format = ex_format
        self.ex_target = ex_target
        self.ex_wait_timeout = ex_wait_timeout

    def create_image(  # type: ignore[override]
                     self, node: Node | Mapping[str, Any] | str | Path,
                     name: str | None = None, description: str | None = None, *,
                     ex_config: Mapping[str, Any] | None = None,
                     ex_format: str | None = None, ex_target: str | None = None,
                     ex_format_options: Mapping[str, Any] | None = None,
                     ex_idempotency_key: str | None = None) -> NodeImage:
        """Ask the service to render a manifest.

        :param node: the manifest (a dict, a JSON file's path or a URL); a
            :class:`~libcloud.compute.base.Node` is refused.
        :param name: unused (the image is named by its manifest).
        :param description: unused.
        :param ex_config: the render config.
        :param ex_format: overrides the driver's format.
        :param ex_target: overrides the driver's target.
        :param ex_format_options: format options the provider allows.
        :param ex_idempotency_key: an ``Idempotency-Key``.
        :returns: the image (id: the service's image id; ``extra`` holds the
            service's view, ``status`` included).
        """
        if isinstance(node, Node):
            raise CloudletsError("the rendering service makes images from manifests, "
                                 "not from nodes")
        image = self.ex_client.create(node, format=ex_format or self.ex_format,
                                      target=ex_target or self.ex_target, config=ex_config,
                                      format_options=ex_format_options,
                                      idempotency_key=ex_idempotency_key)
        return self._node_image(image)

    def list_images(self, location: Any = None, *, ex_status: str | None = "ready",
                    ex_name: str | None = None) -> list[NodeImage]:
        """The tenant's images.

        :param ex_status: only this status (default ``ready``; ``None``: every
            listed status).
        :param ex_name: only this manifest name.
        :returns: the images."""
        return [self._node_image(image)
                for image in self.ex_client.list(status=ex_status, name=ex_name)]

    def get_image(self, image_id: str) -> NodeImage:
        """:returns: one of the tenant's images."""
        return self._node_image(self.ex_client.get(image_id))

    def delete_image(self, node_image: NodeImage) -> bool:
        """Delete an image through the service (artifacts, AMI).

        :returns: ``True`` once deleted.
        """
        return bool(self.ex_client.delete(node_image.id)["status"] == "deleted")

    def ex_wait_image(self, image: NodeImage, timeout: float | None = None) -> NodeImage:
        """Wait until an image is ready.

        :raises RenderFailed: when its render failed.
        """
        return self._node_image(self.ex_client.wait(
            image.id, self.ex_wait_timeout if timeout is None else timeout))

    def _node_image(self, image: Mapping[str, Any]) -> NodeImage:
        return NodeImage(id=image["id"], name=image.get("label") or image["id"], driver=self,
                         extra={"cloudlets": dict(image)})
