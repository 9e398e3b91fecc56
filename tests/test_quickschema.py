"""The quick schema check never accepts what jsonschema refuses.

:mod:`cloudlets.quickschema` answers "valid" or "cannot tell"; each "valid"
is checked here against the full validator (jsonschema with RE2 patterns and
the step budget), on generated render configs and on small generated schemas
over the keywords it knows. It must also say "valid" for the configs a render
request carries, or it saves nothing: a fresh process that validates one must
not import jsonschema.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudlets import jsondoc, quickschema

CONFIG = jsondoc.load_schema("config-v1.json")


def _full_errors(schema: Any, document: Any) -> list[str]:
    validator = jsondoc.SafeValidator(schema, format_checker=jsondoc.FORMAT_CHECKER,
                                      registry=jsondoc.NO_RETRIEVAL)
    return [error.message for error in validator.iter_errors(document)]


# Values chosen near the edges the schema draws: labels of 63 characters,
# trailing newlines and dots, scoped IPv6, integral floats, booleans for integers.
_TEXT = st.sampled_from([
    "a", "web-1", "web-1.example.com", "-a", "a-", "a" * 63, "a" * 64, "a." * 127, "a\n",
    "x.", "_srv.example", "10.0.0.2", "10.0.0.256", "::1", "fe80::1%eth0", "2001:db8::10",
    "1.2.3", "192.0.2.10/24", "2001:db8::10/64", "eth0", "eth0:1", "e" * 16, "",
    "52:54:00:12:34:56", "52:54:00:12:34", "ssh-ed25519 AAAAC3Nza user@host",
    "ssh-ed25519 AAAA\nx", "ecdsa-sha2-nistp256 AAAA=", "http://mirror.local/debian/",
    "file:///srv/mirror/", "ftp://x/", "http://a b/", "é.example", "\uff11.example",
]) | st.text(max_size=12)
_SCALAR = (_TEXT | st.integers(-5, 70000) | st.sampled_from([24.0, 1.5, True, False, None])
           | st.just(64))
def _maybe(key: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(st.just({}), values.map(lambda v: {key: v}))


def _mostly(*valid: Any) -> st.SearchStrategy[Any]:
    """Nine times in ten a valid value, else anything (so that many whole
    documents come out valid, and each keyword is also seen failing)."""
    return st.integers(0, 9).flatmap(lambda n: _SCALAR if n == 0 else st.sampled_from(valid))


def _rarely(key: str) -> st.SearchStrategy[dict[str, Any]]:
    """One time in ten ``key`` with any value."""
    return st.integers(0, 9).flatmap(
        lambda n: _SCALAR.map(lambda v: {key: v}) if n == 0 else st.just({}))


_IP = _mostly("10.0.0.2", "::1", "2001:db8::10", "0.0.0.0", "fe80::1")
_INTERFACE = st.builds(
    lambda *parts: {k: v for part in parts for k, v in part.items()},
    st.builds(lambda n: {"name": n}, _mostly("eth0", "eth0:1", "e" * 15, "br-lan.5"))
    | _maybe("name", _SCALAR),
    _maybe("dhcp", _mostly(True, False)), _maybe("address", _IP),
    _maybe("prefix", _mostly(0, 24, 64, 128)),
    _maybe("addresses", st.lists(_mostly("192.0.2.10/24", "2001:db8::10/64"), max_size=3)),
    _maybe("gateway", _IP), _maybe("mac", _mostly("52:54:00:12:34:56", "AA:bb:00:12:34:56")),
    _maybe("mtu", _mostly(68, 1500, 9000, 65535)), _rarely("extra"))
_PREFIX = _mostly("http://mirrors.cloudlets.com/", "https://m.local/x/", "file:///srv/m/")
_CONFIG_DOC = st.builds(
    lambda *parts: {k: v for part in parts for k, v in part.items()},
    _maybe("hostname", _mostly("web-1", "a" * 63, "web-1.example.com", "A1.b-2.c")),
    _maybe("ip", st.builds(lambda i: {"interfaces": i}, st.lists(_INTERFACE, max_size=3))),
    _maybe("dns", st.fixed_dictionaries({}, optional={
        "nameservers": st.lists(_IP, max_size=3),
        "search": st.lists(_mostly("example.com", "_srv.example.", "a.b"), max_size=3)})),
    _maybe("ssh_authorized_keys", st.lists(_mostly(
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5 user@host", "ssh-rsa AAAA==",
        "sk-ssh-ed25519@openssh.com AAAA key"), max_size=2)),
    _maybe("mirrors", st.lists(st.fixed_dictionaries(
        {"prefix": _PREFIX, "mirrors": st.lists(_PREFIX, min_size=1, max_size=2)})
        | st.fixed_dictionaries({}, optional={"prefix": _PREFIX, "weight": _SCALAR}),
        max_size=2)),
    _maybe("args", st.dictionaries(st.text(max_size=4), _SCALAR, max_size=2)),
    _maybe("x-site", _SCALAR), _rarely("X-site"), _rarely("hostnames"), _rarely("ip"),
    _rarely("dns"), _rarely("args"))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_CONFIG_DOC)
def test_quick_accepts_exactly_the_valid_configs(document: dict[str, Any]) -> None:
    valid = _full_errors(CONFIG, document) == []
    if quickschema.accepts(CONFIG, document):
        assert valid, document
    elif not _integral_float_in(document):  # the one thing it leaves to jsonschema
        assert not valid, document


def _integral_float_in(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_integral_float_in(v) for v in value.values())
    if isinstance(value, list):
        return any(_integral_float_in(v) for v in value)
    return isinstance(value, float) and value.is_integer()


_VALID_CONFIGS = [
    {},
    {"hostname": "web-1.example.com"},
    {"hostname": "a" * 63, "x-rack": {"row": 3}},
    {"hostname": "db1", "ip": {"interfaces": [
        {"name": "eth0", "address": "192.0.2.10", "prefix": 24, "gateway": "192.0.2.1",
         "mac": "52:54:00:12:34:56", "mtu": 1500},
        {"name": "eth1", "dhcp": True},
        {"name": "eth2", "addresses": ["2001:db8::10/64"], "gateway": "2001:db8::1"}]},
     "dns": {"nameservers": ["192.0.2.53", "2001:4860:4860::8888"],
             "search": ["example.com", "_srv.example."]},
     "ssh_authorized_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI user@host"],
     "mirrors": [{"prefix": "http://mirrors.cloudlets.com/",
                  "mirrors": ["http://mirror.local/", "file:///srv/mirror/"]}],
     "args": {"anything": [1, {"goes": None}]}},
]


@pytest.mark.parametrize("document", _VALID_CONFIGS)
def test_quick_accepts_the_configs_requests_carry(document: dict[str, Any]) -> None:
    assert _full_errors(CONFIG, document) == []
    assert quickschema.accepts(CONFIG, document)


@pytest.mark.parametrize("document", [
    {"hostname": "-bad"}, {"hostname": "a\n"}, {"hostname": 5}, {"unknown": 1},
    {"ip": {"interfaces": [{"address": "10.0.0.1"}]}},
    {"ip": {"interfaces": [{"name": "eth0", "mtu": 67}]}},
    {"ip": {"interfaces": [{"name": "eth0", "prefix": True}]}},
    {"ip": {"interfaces": [{"name": "eth0", "gateway": "fe80::1%eth0"}]}},
    {"dns": {"nameservers": ["10.0.0.256"]}},
    {"dns": {"nameservers": ["1"] * 17}},
    {"mirrors": [{"prefix": "http://a/", "mirrors": []}]},
])
def test_quick_does_not_accept_invalid_configs(document: dict[str, Any]) -> None:
    assert _full_errors(CONFIG, document) != []
    assert not quickschema.accepts(CONFIG, document)


def test_an_integral_float_is_left_to_jsonschema() -> None:
    document = {"ip": {"interfaces": [{"name": "eth0", "prefix": 24.0}]}}
    assert _full_errors(CONFIG, document) == []  # JSON Schema: 24.0 is an integer
    assert not quickschema.accepts(CONFIG, document)  # cannot tell: goes to jsonschema
    assert jsondoc.schema_problems(document, "config-v1.json") == []


@pytest.mark.parametrize("schema", [
    {"type": "object", "enum": [{}]},
    {"$ref": "https://example.invalid/s.json"},
    {"$ref": "#/properties/a"},
    {"$ref": "#/$defs/missing", "$defs": {}},
    {"type": "string", "format": "hostname"},
    {"type": "string", "pattern": "(a)\\1"},
    {"type": "strin"},
    {"items": [{"type": "string"}]},
    {"minLength": -1},
    {"properties": {"a": {"oneOf": [True]}}},
    {"$dynamicRef": "#x"},
])
def test_schemas_using_unknown_things_get_no_quick_check(schema: dict[str, Any]) -> None:
    assert quickschema.checker(schema) is None
    assert not quickschema.accepts(schema, {})
    assert not quickschema.accepts(schema, "a")


def test_a_recursive_schema_is_checked_through_its_own_reference() -> None:
    schema = {"$ref": "#/$defs/node", "$defs": {"node": {
        "type": "object", "additionalProperties": False,
        "properties": {"name": {"type": "string"}, "children": {
            "type": "array", "items": {"$ref": "#/$defs/node"}}}}}}
    good = {"name": "a", "children": [{"name": "b", "children": [{"children": []}]}]}
    bad = {"name": "a", "children": [{"name": "b", "children": [{"oops": 1}]}]}
    assert quickschema.accepts(schema, good)
    assert not quickschema.accepts(schema, bad)
    assert _full_errors(schema, bad) != []


# Small schemas over the keywords the quick check knows, and documents for them.
_LEAF_SCHEMA = st.one_of(
    st.builds(lambda t: {"type": t}, st.sampled_from(
        ["string", "object", "array", "integer", "number", "boolean", "null"])
        | st.lists(st.sampled_from(["string", "integer", "null"]), min_size=1, max_size=2)),
    st.builds(lambda k, n: {k: n}, st.sampled_from(
        ["minItems", "maxItems", "minLength", "maxLength"]), st.integers(0, 3)),
    st.builds(lambda k, n: {k: n}, st.sampled_from(["minimum", "maximum"]),
              st.integers(-2, 2) | st.sampled_from([0.5, -1.5])),
    st.builds(lambda p: {"pattern": p}, st.sampled_from(["^a", "b$", "^[0-9]+$", "a|b", ""])),
    st.builds(lambda f: {"format": f}, st.sampled_from(["ipv4", "ipv6"])),
    st.builds(lambda r: {"required": r}, st.lists(st.sampled_from(["a", "b"]), max_size=2)),
    st.booleans(),
)


def _compound(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(
        st.builds(lambda i: {"items": i}, children),
        st.builds(lambda o: {"anyOf": o}, st.lists(children, min_size=1, max_size=3)),
        st.builds(lambda p, a: {"properties": p, **({} if a is None else
                                                    {"additionalProperties": a})},
                  st.dictionaries(st.sampled_from(["a", "b", "x-c"]), children, max_size=2),
                  st.none() | children),
        st.builds(lambda p: {"patternProperties": p},
                  st.dictionaries(st.sampled_from(["^x-", "b", "^$"]), children, max_size=2)),
        st.builds(lambda a, b: {**a, **b} if isinstance(a, dict) and isinstance(b, dict)
                  else a, children, children),
    )


_SCHEMA = st.recursive(_LEAF_SCHEMA, _compound, max_leaves=8)
_DOCUMENT = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3) | st.sampled_from([0.5, 2.0, -1.5])
    | st.sampled_from(["", "a", "ab", "b", "123", "10.0.0.1", "::1", "fe80::1%1", "x\n"]),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["a", "b", "x-c", "", "d"]), children, max_size=3),
    max_leaves=10)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_SCHEMA, _DOCUMENT)
def test_quick_never_accepts_what_jsonschema_refuses(schema: Any, document: Any) -> None:
    schema = schema if isinstance(schema, dict) else {"anyOf": [schema]}
    valid = _full_errors(schema, document) == []
    if quickschema.accepts(schema, document):
        assert valid, (schema, document)
    elif not _integral_float_in(document):
        assert not valid, (schema, document)


def _validate_in_fresh_process(document: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    code = (
        "import json, sys\n"
        "from cloudlets import config\n"
        "try:\n"
        f"    config.validate_config(json.loads({json.dumps(document)!r}))\n"
        "except config.ConfigError as exc:\n"
        "    print(exc)\n"
        "print(sorted(m for m in ('jsonschema', 'referencing') if m in sys.modules))\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)


def test_validating_a_request_config_does_not_import_jsonschema() -> None:
    assert _validate_in_fresh_process(_VALID_CONFIGS[-1]).stdout.strip() == "[]"
    refused = _validate_in_fresh_process({**_VALID_CONFIGS[-1], "hostname": "-x"}).stdout
    assert "valid host name" in refused and "['jsonschema', 'referencing']" in refused
