"""Schemas a manifest supplies are self-contained: no ``$ref`` reaches the
network or the file system, and a reference cannot loop or explode."""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloudlets.config import resolve_config
from cloudlets.errors import ConfigError, ManifestError
from cloudlets.manifest import Manifest
from cloudlets.userschema import MAX_SCHEMA_STEPS, check_schema, validate_subschema

_OPENED: list[str] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _OPENED is not None and event == "open" and args and isinstance(args[0], (str, Path)):
        _OPENED.append(str(args[0]))


sys.addaudithook(_audit)


@pytest.fixture
def guarded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """No connection of any kind, and a record of every file opened."""
    global _OPENED

    def refuse(self: socket.socket, address: Any) -> None:
        raise AssertionError(f"a connection was attempted to {address!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    secret = tmp_path / "host-secret.json"
    secret.write_text(json.dumps({"type": "string", "const": "host secret"}))
    _OPENED = []
    try:
        yield {"file": secret, "opened": _OPENED}
    finally:
        _OPENED = None


def manifest(arg_schema: Any) -> str:
    return json.dumps({"name": "web", "args": {"a": arg_schema}})


REMOTE = [
    "http://127.0.0.1:9/schema.json",
    "https://schemas.example.invalid/s.json",
    "FILE",
    "schema.json",
    "../etc/passwd",
    "//host.invalid/s",
    "urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66",
    "#anchor",
    "",
]


def _ref(ref: str, guard: dict[str, Any]) -> str:
    return guard["file"].as_uri() if ref == "FILE" else ref


@pytest.mark.parametrize("keyword", ["$ref", "$dynamicRef"])
@pytest.mark.parametrize("ref", REMOTE)
def test_non_local_references_are_refused_before_anything_is_read(
        guarded: dict[str, Any], keyword: str, ref: str) -> None:
    text = manifest({keyword: _ref(ref, guarded), "default": "x"})
    with pytest.raises(ManifestError) as caught:
        Manifest.load(text)
    assert [p.pointer for p in caught.value.problems] == [f"/args/a/{keyword}"]
    assert "local JSON pointer" in caught.value.problems[0].message
    assert str(guarded["file"]) not in guarded["opened"]


@pytest.mark.parametrize(("schema", "where"), [
    ({"properties": {"p": {"$ref": "FILE"}}}, "/args/a/properties/p/$ref"),
    ({"items": {"$ref": "FILE"}}, "/args/a/items/$ref"),
    ({"$defs": {"d": {"$ref": "FILE"}}}, "/args/a/$defs/d/$ref"),
    ({"anyOf": [{"type": "string"}, {"$ref": "FILE"}]}, "/args/a/anyOf/1/$ref"),
    ({"not": {"if": {"$ref": "FILE"}}}, "/args/a/not/if/$ref"),
    ({"patternProperties": {"^a": {"$ref": "FILE"}}}, "/args/a/patternProperties/^a/$ref"),
    # a local pointer into a place that is not a keyword: its target is
    # applied as a schema, so it is checked as one
    ({"x-lib": {"$ref": "FILE"}, "$ref": "#/x-lib"}, "/args/a/x-lib/$ref"),
    ({"default": {"$ref": "FILE"}, "$ref": "#/default"}, "/args/a/default/$ref"),
])
def test_non_local_references_are_found_anywhere_a_schema_is(
        guarded: dict[str, Any], schema: dict[str, Any], where: str) -> None:
    text = manifest(schema).replace('"FILE"', json.dumps(guarded["file"].as_uri()))
    with pytest.raises(ManifestError) as caught:
        Manifest.load(text)
    assert where in [p.pointer for p in caught.value.problems]
    assert str(guarded["file"]) not in guarded["opened"]


@pytest.mark.parametrize(("schema", "where", "fragment"), [
    ({"$schema": "http://127.0.0.1:9/meta"}, "/args/a/$schema", "2020-12"),
    ({"$schema": "http://json-schema.org/draft-04/schema#"}, "/args/a/$schema", "2020-12"),
    ({"items": {"$schema": "https://json-schema.org/draft/2020-12/schema"}},
     "/args/a/items/$schema", "root"),
    ({"items": {"$id": "http://127.0.0.1:9/", "$ref": "#"}}, "/args/a/items/$id", "root"),
    ({"$ref": "#/$defs/missing"}, "/args/a/$ref", "points to nothing"),
    ({"$ref": "#/type", "type": "string"}, "/args/a/$ref", "not a schema"),
    ({"$ref": "#"}, "/args/a/$ref", "never ends"),
    ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"allOf": [{"$ref": "#/$defs/a"}]}},
      "$ref": "#/$defs/a"}, "/args/a/$defs/b/allOf/0/$ref", "never ends"),
])
def test_unsafe_schema_keywords_name_their_pointer(
        guarded: dict[str, Any], schema: dict[str, Any], where: str, fragment: str) -> None:
    with pytest.raises(ManifestError) as caught:
        Manifest.load(manifest(schema))
    found = {p.pointer: p.message for p in caught.value.problems}
    assert where in found, found
    assert fragment in found[where]


@pytest.mark.parametrize("ref", ["http://127.0.0.1:9/s.json", "FILE",
                                 "https://json-schema.org/draft/2020-12/schema#/$defs/x"])
def test_the_validator_itself_cannot_retrieve(guarded: dict[str, Any], ref: str) -> None:
    """Even a schema that skipped the checks cannot make validation fetch."""
    problems = validate_subschema("x", {"$ref": _ref(ref, guarded)}, ["args", "a"])
    assert [p.pointer for p in problems] == ["/args/a"]
    assert "does not resolve" in problems[0].message
    assert str(guarded["file"]) not in guarded["opened"]


def test_local_pointers_resolve_inside_the_argument_schema(guarded: dict[str, Any]) -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$defs": {"a name": {"type": "string", "maxLength": 8},
                  "a/b": {"type": "integer"}},
        "type": "object",
        "properties": {"name": {"$ref": "#/$defs/a%20name"},
                       "count": {"$ref": "#/$defs/a~1b"},
                       "child": {"$ref": "#"}},
        "default": {"name": "web", "child": {"count": 2}},
    }
    loaded = Manifest.load(manifest(schema))
    config = resolve_config(loaded, request={"args": {"a": {"child": {"name": "db"}}}})
    assert config.args["a"] == {"name": "web", "child": {"count": 2, "name": "db"}}
    with pytest.raises(ConfigError) as caught:
        resolve_config(loaded, request={"args": {"a": {"child": {"count": "two"}}}})
    assert [p.pointer for p in caught.value.problems] == ["/args/a/child/count"]


@pytest.mark.parametrize(("combinator", "last", "outer", "default"), [
    ("anyOf", {"type": "integer"}, {}, True),
    ("allOf", {"properties": {"a": True}}, {"unevaluatedProperties": False}, {"a": 1, "b": 2}),
    ("allOf", {"prefixItems": [True]}, {"unevaluatedItems": False}, [1, 2]),
])
def test_exponential_references_stop_at_the_step_budget(
        guarded: dict[str, Any], combinator: str, last: dict[str, Any],
        outer: dict[str, Any], default: Any) -> None:
    defs: dict[str, Any] = {f"d{i}": {combinator: [{"$ref": f"#/$defs/d{i + 1}"}] * 2}
                            for i in range(40)}
    defs["d40"] = last
    started = time.monotonic()
    with pytest.raises(ManifestError) as caught:
        Manifest.load(manifest({**outer, "$defs": defs, "$ref": "#/$defs/d0",
                                "default": default}))
    assert time.monotonic() - started < 2
    assert [p.pointer for p in caught.value.problems] == ["/args/a/default"]
    assert f"more than {MAX_SCHEMA_STEPS} steps" in caught.value.problems[0].message


def test_unique_items_is_linear(guarded: dict[str, Any]) -> None:
    schema = {"type": "array", "uniqueItems": True,
              "default": [[i] for i in range(20_000)] + [[0.0]]}
    started = time.monotonic()
    with pytest.raises(ManifestError, match="duplicate items"):
        Manifest.load(manifest(schema))
    assert time.monotonic() - started < 2


def test_check_schema_reports_with_the_manifest_pointer() -> None:
    assert check_schema({"type": "strin"}, ["args", "a"])[0].pointer == "/args/a/type"
    assert check_schema({"items": {"$ref": "#/nope"}}, ["args", "a"])[0].pointer \
        == "/args/a/items/$ref"
