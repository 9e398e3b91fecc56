"""Fuzzing the manifest loader: whatever the bytes, ``Manifest.load`` returns
a manifest or raises a CloudletsError, in bounded time, without opening a
connection. Inputs that once broke that contract are kept as a corpus in
``corpus/manifest/`` and replayed here."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloudlets.config import resolve_config
from cloudlets.errors import CloudletsError
from cloudlets.manifest import Manifest

CORPUS = Path(__file__).parent / "corpus" / "manifest"
BOUND = 2.0  # seconds, per input

FUZZ = settings(max_examples=200, deadline=2000, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@contextmanager
def no_network() -> Iterator[None]:
    def refuse(self: socket.socket, address: Any) -> None:
        raise AssertionError(f"a connection was attempted to {address!r}")

    with mock.patch.object(socket.socket, "connect", refuse), \
            mock.patch.object(socket.socket, "connect_ex", refuse):
        yield


def holds_the_contract(source: str | bytes | dict[str, Any]) -> None:
    started = time.monotonic()
    with no_network():
        try:
            manifest = Manifest.load(source)
        except CloudletsError:
            pass
        else:
            try:  # a valid manifest's arguments must be usable too
                resolve_config(manifest)
            except CloudletsError:
                pass
    assert time.monotonic() - started < BOUND


KEYS = st.sampled_from([
    "name", "version", "description", "author", "arch", "filesystem", "boot", "hardware",
    "args", "templates", "persistent", "volatile", "template_syntax", "manifest_version",
    "url", "sha256", "size", "kernel", "initrd", "cmdline", "root", "label", "disk_size",
    "cpus", "memory", "x-a", "x-", "type", "default", "pattern", "patternProperties",
    "properties", "items", "$ref", "$defs", "$schema", "$id", "$dynamicRef", "anyOf",
    "allOf", "not", "uniqueItems", "format", "x-multiline",
]) | st.text(max_size=8)
STRINGS = st.sampled_from([
    "web", "1.0", "/etc/hostname", "/boot/vmlinuz", "#", "#/$defs/a", "#/default",
    "http://127.0.0.1:9/s.json", "file:///etc/passwd", "(a+)+$", "(a)\\1", "/var/(?!x).+",
    "regex", "string", "object", "array", "2G", "1e400", "a" * 41 + "!", "\ud800", "x\n",
]) | st.text(max_size=16)
SCALARS = (st.none() | st.booleans() | st.integers() | STRINGS
           | st.floats(allow_nan=True, allow_infinity=True))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(KEYS, inner, max_size=4), max_leaves=24)


def _dumps(data: Any) -> str:
    return json.dumps(data, allow_nan=True, ensure_ascii=False)


@FUZZ
@given(st.dictionaries(KEYS, VALUES, max_size=6), st.sampled_from(["web", 3, "Web\n"]))
def test_structured_manifests(data: dict[str, Any], name: Any) -> None:
    document = {"name": name, **data}
    holds_the_contract(document)
    try:
        text = _dumps(document)
    except UnicodeEncodeError:
        return
    holds_the_contract(text)
    holds_the_contract(text.encode("utf-8", "surrogatepass"))


@FUZZ
@given(st.dictionaries(st.sampled_from(["a", "hostname", "b"]),
                       st.dictionaries(KEYS, VALUES, max_size=5), max_size=3))
def test_argument_schemas(args: dict[str, Any]) -> None:
    holds_the_contract({"name": "web", "args": args})


@FUZZ
@given(st.text(alphabet='{}[]",:0123456789.eE+-tfnulrsaINfinity\\ \n', max_size=200)
       | st.binary(max_size=200).map(lambda b: b"{" + b))
def test_raw_text(text: str | bytes) -> None:
    if isinstance(text, str) and not text.lstrip().startswith(("{", "[")):
        text = "{" + text  # otherwise it is taken for a path
    holds_the_contract(text)


@FUZZ
@given(st.integers(min_value=1, max_value=3000), st.sampled_from(['{"a":', "[", '{"x-":[']))
def test_nesting(depth: int, opener: str) -> None:
    closer = {'{"a":': "}", "[": "]", '{"x-":[': "]}"}[opener]
    holds_the_contract('{"name":"web","x-a":' + opener * depth + "0" + closer * depth + "}")


def corpus() -> list[Path]:
    return sorted(CORPUS.iterdir())


def test_the_corpus_is_there() -> None:
    assert len(corpus()) >= 10


@pytest.mark.parametrize("path", corpus(), ids=lambda p: p.name)
def test_corpus(path: Path) -> None:
    holds_the_contract(path.read_bytes())
