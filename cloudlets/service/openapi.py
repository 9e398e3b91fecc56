"""The service's OpenAPI 3.1 document, served at ``/v1/openapi.json`` and
kept in ``docs/openapi.json``::

    python -m cloudlets.service.openapi > docs/openapi.json

The document does not depend on a configuration: format and target names
are strings here, and ``GET /v1/formats`` and ``GET /v1/targets`` list the
ones a service offers.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from cloudlets.catalog import ImageStatus

__all__ = ["document", "main"]

_JSON = "application/json"
_NULLABLE_STRING = {"type": ["string", "null"]}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": {_JSON: {"schema": _ref("Error")}}}
    if headers:
        response["headers"] = headers
    return response


def _ok(description: str, schema: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description,
                                "content": {_JSON: {"schema": _ref(schema)}}}
    if headers:
        response["headers"] = headers
    return response


_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again",
                                "schema": {"type": "string"}}}
_LOCATION = {"Location": {"description": "the image's URL",
                          "schema": {"type": "string"}}}
_AUTH_ERRORS = {
    "401": _error("no valid bearer token", {"WWW-Authenticate": {
        "description": "the scheme to use", "schema": {"type": "string"}}}),
    "403": _error("the token may not do this"),
}
_IMAGE_ID = {"name": "id", "in": "path", "required": True,
             "description": "the image's id (its ``id``, or its ``image_id``)",
             "schema": {"type": "string", "minLength": 1, "maxLength": 200}}


def _schemas() -> dict[str, Any]:
    problem = {"type": "object", "required": ["pointer", "message"],
               "properties": {"pointer": {"type": "string",
                                          "description": "JSON pointer into the request body"},
                              "message": {"type": "string"}}}
    return {
        "Problem": problem,
        "Error": {
            "type": "object", "required": ["error", "message", "problems"],
            "properties": {
                "error": {"type": "string", "description": "the error's class name"},
                "message": {"type": "string"},
                "problems": {"type": "array", "items": _ref("Problem")},
                "reason": {"type": "string",
                           "description": "for a refused signature (SignatureError): "
                                          "missing, mismatch, unknown-key, expired, "
                                          "not-yet-valid, revoked, namespace, malformed, "
                                          "policy"}},
        },
        "CreateImage": {
            "type": "object", "additionalProperties": False,
            "required": ["format", "target"],
            "properties": {
                "manifest": {"type": "object",
                             "description": "a cloudlet manifest (v1): name, version, "
                                            "filesystem, boot, args, templates"},
                "manifest_url": {"type": "string", "maxLength": 2048,
                                 "description": "an http(s) URL of the manifest, fetched "
                                                "under the service's URL policy"},
                "config": {"type": "object", "description": "the render config"},
                "format": {"type": "string", "minLength": 1, "maxLength": 64,
                           "description": "a format name from GET /v1/formats"},
                "target": {"type": "string", "minLength": 1, "maxLength": 64,
                           "description": "a storage target name from GET /v1/targets"},
                "format_options": {"type": "object",
                                   "description": "the options the format lists in "
                                                  "client_options"},
                "signature": {"type": "string", "maxLength": 65536,
                              "description": "the manifest's SSH signature (armored, "
                                             "-----BEGIN SSH SIGNATURE-----) over the bytes "
                                             "of manifest_url; default manifest_url + "
                                             "'.sig' where a signature is required"},
            },
            "oneOf": [{"required": ["manifest"]}, {"required": ["manifest_url"]}],
        },
        "Artifact": {
            "type": "object", "required": ["role", "location", "size", "sha256"],
            "properties": {"role": {"type": "string"}, "location": {"type": "string"},
                           "size": {"type": "integer"}, "sha256": {"type": "string"},
                           "media_type": _NULLABLE_STRING},
        },
        "Progress": {
            "type": "object", "required": ["stage", "fraction"],
            "properties": {
                "stage": {"type": "string", "description": "the render stage: queued, "
                          "prepare, fetch, rootfs, templates, disk, tree, convert, store, "
                          "publish, done"},
                "fraction": {"type": "number", "minimum": 0, "maximum": 1,
                             "description": "estimated part of the whole render done"},
                "stage_fraction": {"type": ["number", "null"], "minimum": 0, "maximum": 1,
                                   "description": "part of the stage done, when known"}},
        },
        "ImageError": {
            "type": "object", "required": ["type", "message", "problems"],
            "properties": {"type": _NULLABLE_STRING, "message": _NULLABLE_STRING,
                           "problems": {"type": "array", "items": _ref("Problem"),
                                        "description": "for invalid input: each problem "
                                                       "and its JSON pointer"}},
        },
        "Image": {
            "type": "object",
            "required": ["id", "status", "image_id", "provider_id", "label", "name",
                         "version", "format", "target", "progress", "artifacts", "error",
                         "created_at"],
            "properties": {
                "id": {"type": "string", "description": "the service's id of the image"},
                "status": {"type": "string", "enum": [str(s) for s in ImageStatus]},
                "image_id": {"type": ["string", "null"],
                             "description": "the render's image id once ready"},
                "provider_id": {"type": ["string", "null"],
                                "description": "the id the provider registered the image "
                                               "under (an AMI id)"},
                "label": {"type": "string"},
                "name": {"type": "string"},
                "version": _NULLABLE_STRING,
                "format": {"type": "string"},
                "target": _NULLABLE_STRING,
                "tenant": _NULLABLE_STRING,
                "progress": {"oneOf": [_ref("Progress"), {"type": "null"}]},
                "artifacts": {"type": "array", "items": _ref("Artifact")},
                "error": {"oneOf": [_ref("ImageError"), {"type": "null"}]},
                "signer": {"oneOf": [_ref("Signer"), {"type": "null"}]},
                "provenance": {"oneOf": [_ref("ProvenanceRef"), {"type": "null"}]},
                "created_at": _NULLABLE_STRING,
                "updated_at": _NULLABLE_STRING,
                "started_at": _NULLABLE_STRING,
                "finished_at": _NULLABLE_STRING,
            },
        },
        "Signer": {
            "type": "object", "required": ["principal", "fingerprint"],
            "description": "who signed the manifest, as the trust policy allowed it",
            "properties": {"principal": {"type": "string"},
                           "fingerprint": {"type": "string",
                                           "description": "SHA256:... of the key"}},
        },
        "ProvenanceRef": {
            "type": "object", "required": ["location"],
            "description": "the signed provenance stored beside the artifacts",
            "properties": {"location": _NULLABLE_STRING, "key_id": _NULLABLE_STRING},
        },
        "Envelope": {
            "type": "object", "required": ["payloadType", "payload", "signatures"],
            "description": "a DSSE envelope of an in-toto Statement (v1) with a SLSA "
                           "Provenance (v1) predicate",
            "properties": {
                "payloadType": {"type": "string"}, "payload": {"type": "string"},
                "signatures": {"type": "array", "items": {
                    "type": "object", "required": ["sig"],
                    "properties": {"keyid": {"type": "string"}, "sig": {"type": "string"}}}}},
        },
        "ImageList": {
            "type": "object", "required": ["images", "next"],
            "properties": {"images": {"type": "array", "items": _ref("Image")},
                           "next": {"type": ["string", "null"],
                                    "description": "the cursor of the next page"}},
        },
        "Driver": {
            "type": "object", "required": ["name", "capabilities"],
            "properties": {"name": {"type": "string"}, "driver": {"type": "string"},
                           "description": {"type": "string"},
                           "extension": {"type": "string"},
                           "capabilities": {"type": "array", "items": {"type": "string"}},
                           "client_options": {"type": "array",
                                              "items": {"type": "string"}}},
        },
        "Formats": {"type": "object", "required": ["formats"],
                    "properties": {"formats": {"type": "array", "items": _ref("Driver")}}},
        "Targets": {"type": "object", "required": ["targets"],
                    "properties": {"targets": {"type": "array", "items": _ref("Driver")}}},
        "Health": {"type": "object", "required": ["status"],
                   "properties": {"status": {"type": "string"}}},
    }


def document() -> dict[str, Any]:
    """:returns: the OpenAPI 3.1 document of the service."""
    from cloudlets.version import __version__

    images = {
        "post": {
            "operationId": "createImage", "summary": "Render an image from a manifest",
            "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                            "description": "the same key with the same body answers the "
                                           "same image",
                            "schema": {"type": "string", "minLength": 1, "maxLength": 255,
                                       "pattern": "^[!-~]+$"}}],
            "requestBody": {"required": True,
                            "content": {_JSON: {"schema": _ref("CreateImage")}}},
            "responses": {
                "200": _ok("the same request's image", "Image", _LOCATION),
                "202": _ok("a render was queued", "Image", _LOCATION),
                "400": _error("malformed JSON or invalid input (with every problem)"),
                **_AUTH_ERRORS,
                "413": _error("the body is over the service's limit"),
                "415": _error("the body is not JSON"),
                "422": _error("the Idempotency-Key was used with another request"),
                "429": _error("over the tenant's renders in flight, or the queue is full",
                              _RETRY_AFTER),
                "503": _error("the service is stopping, or the queue's broker (Redis) is away",
                              _RETRY_AFTER),
            },
        },
        "get": {
            "operationId": "listImages", "summary": "List images, a page at a time",
            "parameters": [
                {"name": "name", "in": "query", "schema": {"type": "string",
                                                           "maxLength": 200}},
                {"name": "version", "in": "query", "schema": {"type": "string",
                                                              "maxLength": 200}},
                {"name": "status", "in": "query",
                 "schema": {"type": "string", "enum": [str(s) for s in ImageStatus]}},
                {"name": "limit", "in": "query",
                 "schema": {"type": "integer", "minimum": 1, "maximum": 500}},
                {"name": "cursor", "in": "query", "schema": {"type": "string",
                                                             "maxLength": 20}},
            ],
            "responses": {"200": _ok("a page of images", "ImageList"),
                          "400": _error("a bad filter, limit or cursor"), **_AUTH_ERRORS},
        },
    }
    image = {
        "parameters": [_IMAGE_ID],
        "get": {"operationId": "getImage", "summary": "An image, with its progress",
                "responses": {"200": _ok("the image", "Image"), **_AUTH_ERRORS,
                              "404": _error("no such image (or another tenant's)")}},
        "delete": {"operationId": "deleteImage",
                   "summary": "Delete an image's artifacts and deregister it",
                   "responses": {"200": _ok("the deleted image", "Image"), **_AUTH_ERRORS,
                                 "404": _error("no such image (or another tenant's)"),
                                 "409": _error("the image is being rendered"),
                                 "502": _error("the storage or the provider failed")}},
    }
    public: list[dict[str, Any]] = []
    return {
        "openapi": "3.1.0",
        "info": {"title": "Cloudlets Rendering Service", "version": __version__,
                 "description": "Render server images from cloudlet manifests: POST a "
                                "manifest, poll the image until it is ready."},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "paths": {
            "/v1/images": images,
            "/v1/images/{id}": image,
            "/v1/images/{id}/provenance": {
                "parameters": [_IMAGE_ID],
                "get": {"operationId": "getImageProvenance",
                        "summary": "The image's signed provenance (a DSSE envelope)",
                        "responses": {
                            "200": {"description": "the envelope", "content": {
                                "application/vnd.dsse.envelope.v1+json": {
                                    "schema": _ref("Envelope")}}},
                            **_AUTH_ERRORS,
                            "404": _error("no such image, or it has no provenance")}}},
            "/v1/formats": {"get": {"operationId": "listFormats",
                                    "summary": "The formats offered",
                                    "responses": {"200": _ok("the formats", "Formats"),
                                                  **_AUTH_ERRORS}}},
            "/v1/targets": {"get": {"operationId": "listTargets",
                                    "summary": "The storage targets",
                                    "responses": {"200": _ok("the targets", "Targets"),
                                                  **_AUTH_ERRORS}}},
            "/v1/healthz": {"get": {"operationId": "healthz", "security": public,
                                    "summary": "The process answers",
                                    "responses": {"200": _ok("alive", "Health")}}},
            "/v1/readyz": {"get": {"operationId": "readyz", "security": public,
                                   "summary": "The service takes renders",
                                   "responses": {"200": _ok("ready", "Health"),
                                                 "503": _error("starting or stopping, or the "
                                                               "queue's broker is away")}}},
            "/v1/openapi.json": {"get": {"operationId": "openapi", "security": public,
                                         "summary": "This document",
                                         "responses": {"200": {
                                             "description": "the OpenAPI document",
                                             "content": {_JSON: {"schema": {
                                                 "type": "object"}}}}}}},
            "/metrics": {"get": {"operationId": "metrics", "security": public,
                                 "summary": "Prometheus metrics",
                                 "responses": {"200": {
                                     "description": "the Prometheus text format",
                                     "content": {"text/plain": {"schema": {
                                         "type": "string"}}}}}}},
        },
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "a tenant's token"}},
        },
    }


def main() -> None:
    """Write the document to standard output."""
    json.dump(document(), sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
