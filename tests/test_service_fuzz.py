"""The service's API fuzzed from its own OpenAPI document with schemathesis:
no answer is a 5xx, and every answer conforms to the document (status code,
content type, headers, body schema).

The document is ``docs/openapi.json``, which test_service checks is the one
the service serves. Examples are bounded per operation. The service's URL
policy allows loopback only (``only_hosts``), so no generated manifest or
``manifest_url`` can send a packet past it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("starlette", reason="pip install cloudlets[service]")

from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.service_fixture import (  # noqa: E402
    REPO,
    Service,
    TarballServer,
    served_cloudlet,
    serving,
    tarballs,
)
from tests.test_service import TOKENS, service_config  # noqa: E402

__all__ = ["tarballs"]

#: Examples generated per API operation.
EXAMPLES = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]

schema = schemathesis.openapi.from_path(REPO / "docs" / "openapi.json")
# valid requests and invalid ones (wrong types, missing members, bad parameters)
schema.config.generation.update(modes=list(schemathesis.GenerationMode))


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory,
           tarballs: TarballServer) -> Iterator[Service]:
    tarballs.gate.set()
    with serving(tmp_path_factory.mktemp("fuzz") / "etc",
                 service_config(tarballs, per_tenant=50), TOKENS) as running:
        # a real image, so the fuzzed ids have one to miss and the lists one to show
        created = running.call("POST", "/v1/images", "alice", json={
            "manifest": served_cloudlet(tarballs, "fuzzed", "1.0"), "format": "tar",
            "target": "local"})
        assert created.status_code == 202, created.text
        running.wait_image(created.json()["id"], "alice")
        yield running


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_the_api_conforms_to_its_document(case: Any, fuzzed: Service) -> None:
    headers = {"Authorization": f"Bearer {TOKENS['alice']}"}
    case.call_and_validate(base_url=fuzzed.url, headers=headers, checks=CHECKS, timeout=30)
