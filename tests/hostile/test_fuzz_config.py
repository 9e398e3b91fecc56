"""Fuzzing the render config: whatever a request holds, ``resolve_config``
returns a config or raises a CloudletsError, in bounded time, and a locked
key never takes the request's value."""

from __future__ import annotations

import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudlets.config import Presets, resolve_config
from cloudlets.errors import CloudletsError
from cloudlets.manifest import Manifest

MANIFEST = Manifest.load({"name": "web", "args": {
    "hostname": {"type": "string", "default": "web"},
    "motd": {"type": "string", "maxLength": 64, "pattern": "^[ -~]*$"},
    "ports": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True,
              "default": [80]}}})
PRESETS = Presets(values={"dns": {"nameservers": ["192.0.2.53"]}},
                  locked=frozenset({"dns.nameservers"}))

KEYS = st.sampled_from([
    "hostname", "ip", "interfaces", "name", "dhcp", "address", "prefix", "gateway", "mac",
    "mtu", "dns", "nameservers", "search", "ssh_authorized_keys", "mirrors", "prefix",
    "args", "motd", "ports", "x-a",
]) | st.text(max_size=6)
STRINGS = st.sampled_from([
    "eth0", "192.0.2.1", "fe80::1%eth0", "web", "corp.example\nnameserver 203.0.113.66",
    "http://mirror.example/", "ssh-ed25519 AAAA me", "\x1b[2J", "52:54:00:12:34:56",
]) | st.text(max_size=12)
SCALARS = (st.none() | st.booleans() | st.integers() | STRINGS
           | st.floats(allow_nan=True, allow_infinity=True))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(KEYS, inner, max_size=3), max_leaves=16)


@settings(max_examples=200, deadline=2000, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(KEYS, VALUES, max_size=5))
def test_requests(request_: dict[str, Any]) -> None:
    started = time.monotonic()
    try:
        config = resolve_config(MANIFEST, PRESETS, request_)
    except CloudletsError:
        pass
    else:
        assert config.dns["nameservers"] == ["192.0.2.53"]
    assert time.monotonic() - started < 2
