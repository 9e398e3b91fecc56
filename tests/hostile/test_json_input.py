"""JSON inputs that used to crash: deep nesting, non-finite numbers, huge
integers, malformed numbers, lone surrogates. Every way in (manifest text,
bytes, files and dicts; render config and presets files; --set values and
driver options) ends with a ManifestError or ConfigError naming where, and
the CLI exits with the family's code, without a traceback."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

import pytest

from cloudlets.cli import EXIT_INVALID_INPUT, main, parse_set
from cloudlets.config import Presets, load_config_file, resolve_config, validate_config
from cloudlets.errors import ConfigError, ManifestError
from cloudlets.jsondoc import MAX_JSON_DEPTH, MAX_JSON_INTEGER
from cloudlets.manifest import Manifest


def nested(depth: int, leaf: str = "1") -> str:
    return '{"a":' * depth + leaf + "}" * depth


# (name, JSON text of the x-a value, pointer of the problem or None when the
# parser cannot say, fragment of the message)
VALUES = [
    ("deep-object", nested(MAX_JSON_DEPTH), "/x-a" + "/a" * (MAX_JSON_DEPTH - 1), "deeper"),
    ("deep-array", "[" * 100 + "]" * 100, "/x-a" + "/0" * (MAX_JSON_DEPTH - 1), "deeper"),
    ("very-deep", "[" * 200_000 + "]" * 200_000, None, "deeper"),
    ("very-deep-object", nested(50_000), None, "deeper"),
    ("1e400", "1e400", "/x-a", "finite"),
    ("-1e400", "[0, -1e400]", "/x-a/1", "finite"),
    ("1e999999999", "1e999999999", "/x-a", "finite"),
    ("Infinity", '{"k": Infinity}', "/x-a/k", "Infinity"),
    ("-Infinity", "-Infinity", "/x-a", "Infinity"),
    ("NaN", "NaN", "/x-a", "NaN"),
    ("int64+1", str(MAX_JSON_INTEGER + 1), "/x-a", "bound"),
    ("-int64-2", str(-MAX_JSON_INTEGER - 2), "/x-a", "bound"),
    ("10**30", "1" + "0" * 30, "/x-a", "digits"),
    ("5000-digits", "9" * 5000, "/x-a", "digits"),
    ("million-digits", "-" + "7" * 1_000_000, "/x-a", "digits"),
    ("leading-zero", "012", None, "invalid JSON"),
    ("trailing-dot", "1.", None, "invalid JSON"),
    ("hex", "0x10", None, "invalid JSON"),
    ("plus", "+1", None, "invalid JSON"),
    ("bare-exponent", "1e", None, "invalid JSON"),
    ("surrogate", '"\\ud800"', "/x-a", "surrogate"),
]
IDS = [v[0] for v in VALUES]


def text_with(value: str) -> str:
    return '{"name": "web", "x-a": ' + value + "}"


def check(problems: list[Any], where: str | None, fragment: str) -> None:
    assert len(problems) >= 1
    if where is not None:
        assert problems[0].pointer == where, problems
    assert fragment in problems[0].message, problems


@pytest.mark.parametrize(("name", "value", "where", "fragment"), VALUES, ids=IDS)
def test_manifest_text_bytes_and_files(tmp_path: Path, name: str, value: str,
                                       where: str | None, fragment: str) -> None:
    text = text_with(value)
    path = tmp_path / "m.json"
    path.write_text(text)
    for source in (text, text.encode(), path, str(path), path.as_uri()):
        started = time.monotonic()
        with pytest.raises(ManifestError) as caught:
            Manifest.load(source)
        assert time.monotonic() - started < 2
        check(caught.value.problems, where, fragment)


def _deep_dict(depth: int) -> dict[str, Any]:
    root: dict[str, Any] = {}
    node = root
    for _ in range(depth):
        node["a"] = {}
        node = node["a"]
    return root


@pytest.mark.parametrize(("value", "where", "fragment"), [
    (_deep_dict(100_000), "/x-a" + "/a" * (MAX_JSON_DEPTH - 1), "deeper"),
    (float("inf"), "/x-a", "finite"),
    ([float("nan")], "/x-a/0", "finite"),
    (10**400, "/x-a", "bound"),
    ({1: "one"}, "/x-a", "not a string"),
    ({"b": {1, 2}}, "/x-a/b", "not a JSON value"),
    (b"bytes", "/x-a", "not a JSON value"),
    ("\udcff", "/x-a", "surrogate"),
])
def test_manifest_dicts(value: Any, where: str, fragment: str) -> None:
    with pytest.raises(ManifestError) as caught:
        Manifest({"name": "web", "x-a": value})
    check(caught.value.problems, where, fragment)


@pytest.mark.parametrize(("name", "value", "where", "fragment"), VALUES, ids=IDS)
def test_config_and_presets_files(tmp_path: Path, name: str, value: str,
                                  where: str | None, fragment: str) -> None:
    path = tmp_path / "config.json"
    path.write_text('{"x-a": ' + value + "}")
    with pytest.raises(ConfigError) as caught:
        load_config_file(path)
    check(caught.value.problems, where, fragment)
    path.write_text('{"config": {"x-a": ' + value + "}}")
    with pytest.raises(ConfigError) as caught:
        Presets.load(path)
    check(caught.value.problems, None, fragment)
    if where is not None:
        assert caught.value.problems[0].pointer.startswith("/config/x-a")


def test_config_files_are_bounded_in_size(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_text('{"x-a": "' + "x" * (2 * 1024 * 1024) + '"}')
    with pytest.raises(ConfigError, match="larger than"):
        load_config_file(path)


@pytest.mark.parametrize("request_", [
    {"x-a": float("inf")}, {"args": {"a": float("nan")}}, {"x-a": _deep_dict(10_000)},
    {"args": {"a": 2**70}},
])
def test_request_dicts(request_: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        validate_config(request_)
    with pytest.raises(ConfigError):
        resolve_config(Manifest({"name": "web", "args": {"a": {}}}), request=request_)


@pytest.mark.parametrize(("item", "fragment"), [
    ("args.a=1e400", "finite"), ("args.a=NaN", "NaN"), ("args.a=-Infinity", "Infinity"),
    ("args.a=" + "9" * 30, "digits"), ("args.a=" + "[" * 100 + "]" * 100, "deeper"),
    ("a" + ".a" * 100 + "=1", "levels"),
])
def test_set_values(item: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_set([item])
    assert fragment in str(caught.value)
    # text that is not JSON at all stays a string
    assert parse_set(["args.a=1e400x"]) == {"args": {"a": "1e400x"}}
    assert parse_set(['args.a="NaN"']) == {"args": {"a": "NaN"}}


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def _no_traceback(err: str, family: str) -> None:
    assert "Traceback" not in err
    assert err.startswith(f"cloudlets: {family}: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), err  # one line


@pytest.mark.parametrize(("name", "value", "where", "fragment"), VALUES, ids=IDS)
def test_cli_validate_and_inspect_exit_3(tmp_path: Path, name: str, value: str,
                                         where: str | None, fragment: str) -> None:
    path = tmp_path / "m.json"
    path.write_text(text_with(value))
    for command in ("validate", "inspect"):
        code, _, err = run(command, str(path))
        assert code == EXIT_INVALID_INPUT
        _no_traceback(err, "ManifestError")
        assert fragment in err


@pytest.mark.parametrize("flags", [
    ["--set", "args.a=1e400"],
    ["--set", "x-a=" + "[" * 70 + "]" * 70],
    ["--config", "CONFIG"],
    ["--presets", "PRESETS"],
    ["--format-option", "ex_x=NaN"],
])
def test_cli_render_inputs_exit_3_and_leave_nothing(
        tmp_path: Path, complete_manifest: dict[str, Any], flags: list[str]) -> None:
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps(complete_manifest))
    (tmp_path / "config.json").write_text('{"x-a": 1e400}')
    (tmp_path / "presets.json").write_text('{"config": {"x-a": ' + nested(100) + "}}")
    out = tmp_path / "out"
    out.mkdir()
    flags = [str(tmp_path / "config.json") if f == "CONFIG" else
             str(tmp_path / "presets.json") if f == "PRESETS" else f for f in flags]
    code, _, err = run("render", str(manifest), "-f", "raw", "-o", f"{out}/",
                       "--cache-dir", str(tmp_path / "cache"), *flags)
    assert code == EXIT_INVALID_INPUT, err
    _no_traceback(err, "ConfigError")
    assert list(out.iterdir()) == []
