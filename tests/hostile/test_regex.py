"""Regular expressions from a manifest are matched in linear time (RE2):
``(a+)+$`` on a 41-character value answers at once, and a pattern RE2
cannot match is refused with its pointer."""

from __future__ import annotations

import io
import json
import random
import re
import time
from typing import Any

import pytest

from cloudlets.config import resolve_config
from cloudlets.errors import CloudletsError, ConfigError, ManifestError
from cloudlets.manifest import Manifest
from cloudlets.patterns import MAX_PATTERN_LENGTH, compile_pattern
from cloudlets.rootfs import read_tarball
from tests.test_rootfs import D, M, build_tar, read

EVIL = "(a+)+$"
VALUE = "a" * 40 + "!"  # 41 characters: 30 s with re's backtracking


def quickly(started: float) -> bool:
    return time.monotonic() - started < 2


def load(**fields: Any) -> Manifest:
    return Manifest.load(json.dumps({"name": "web", **fields}))


def test_arg_pattern_on_the_default_is_quick() -> None:
    started = time.monotonic()
    with pytest.raises(ManifestError) as caught:
        load(args={"a": {"type": "string", "pattern": EVIL, "default": VALUE}})
    assert quickly(started)
    assert [p.pointer for p in caught.value.problems] == ["/args/a/default"]


@pytest.mark.parametrize("schema", [
    {"type": "string", "pattern": EVIL},
    {"type": "object", "patternProperties": {EVIL: False}},
    {"type": "array", "items": {"propertyNames": {"pattern": EVIL}}},
])
def test_arg_patterns_on_a_request_are_quick(schema: dict[str, Any]) -> None:
    manifest = load(args={"a": schema})
    value: Any = VALUE if schema["type"] == "string" else \
        {VALUE: 1, "aa": 2} if schema["type"] == "object" else [{VALUE: 1}]
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        resolve_config(manifest, request={"args": {"a": value}})
    assert quickly(started)
    assert caught.value.problems[0].pointer.startswith("/args/a")


def test_format_regex_values_are_compiled_by_re2() -> None:
    manifest = load(args={"a": {"type": "string", "format": "regex"}})
    assert resolve_config(manifest, request={"args": {"a": "^[a-z]+$"}}).args["a"] == "^[a-z]+$"
    with pytest.raises(ConfigError) as caught:
        resolve_config(manifest, request={"args": {"a": "(a)\\1"}})
    assert [p.pointer for p in caught.value.problems] == ["/args/a"]


def test_volatile_pattern_on_a_member_path_is_quick() -> None:
    started = time.monotonic()
    with read([D("."), M(VALUE, b"x"), M("a" * 41, b"y")], volatile=["/" + EVIL]) as tree:
        assert quickly(started)
        assert f"/{VALUE}" in tree
        assert "/" + "a" * 41 not in tree


def test_volatile_pattern_against_templates_is_quick() -> None:
    started = time.monotonic()
    manifest = load(volatile=["/" + EVIL], templates=[f"/{VALUE}"])
    assert quickly(started)
    assert manifest.volatile == ["/" + EVIL]


@pytest.mark.parametrize(("fields", "where"), [
    ({"volatile": ["/var/(log)\\1"]}, "/volatile/0"),
    ({"volatile": ["/tmp/.+", "(?<=/)x"]}, "/volatile/1"),
    ({"volatile": ["(?=a)(?=b).+"]}, "/volatile/0"),
    ({"volatile": ["a" * (MAX_PATTERN_LENGTH + 1)]}, "/volatile/0"),
    ({"args": {"a": {"pattern": "(\\w)\\1"}}}, "/args/a/pattern"),
    ({"args": {"a": {"pattern": "x" * (MAX_PATTERN_LENGTH + 1)}}}, "/args/a/pattern"),
    ({"args": {"a": {"items": {"pattern": "(?<!a)b"}}}}, "/args/a/items/pattern"),
    ({"args": {"a": {"patternProperties": {"(?=x)": True}}}}, "/args/a/patternProperties/(?=x)"),
    ({"args": {"a": {"pattern": "((((a{100}){100}){100}){100})"}}}, "/args/a/pattern"),
])
def test_patterns_re2_cannot_match_are_refused_naming_the_pointer(
        fields: dict[str, Any], where: str) -> None:
    with pytest.raises(ManifestError) as caught:
        load(**fields)
    assert [p.pointer for p in caught.value.problems] == [where]
    assert "linear" in caught.value.problems[0].message \
        or str(MAX_PATTERN_LENGTH) in caught.value.problems[0].message


def test_read_tarball_refuses_an_unmatchable_volatile_pattern() -> None:
    with pytest.raises(CloudletsError):
        read_tarball(io.BytesIO(build_tar([D(".")])), volatile=["(a)\\1"])


@pytest.mark.parametrize("pattern", ["/var/log/(?!apt).+", "/x/(?!partial).*",
                                     "/a(?!b\\.c).+$", "/a|/b(?!cd).*$"])
def test_a_trailing_negative_lookahead_matches_as_re_did(pattern: str) -> None:
    """The dotCloud sample's '(?!apt).+' form is rewritten, not refused, and
    matches exactly what re matched (with '$' at the very end)."""
    strict = re.compile(pattern.replace("$", r"\Z"))
    compiled = compile_pattern(pattern)
    rng = random.Random(pattern)
    prefixes = ["", "/var/log/", "/x/", "/a", "/b"]
    for _ in range(3000):
        text = rng.choice(prefixes) + "".join(
            rng.choice("aptrilcd.b\n/") for _ in range(rng.randint(0, 8)))
        assert bool(compiled.match(text)) == bool(strict.match(text)), text
        assert bool(compiled.search(text)) == bool(strict.search(text)), text


def test_dollar_matches_only_at_the_very_end() -> None:
    assert compile_pattern("^/tmp$").match("/tmp")
    assert not compile_pattern("^/tmp$").match("/tmp\n")
    assert not compile_pattern("^/tmp$").search("/tmp\n")
