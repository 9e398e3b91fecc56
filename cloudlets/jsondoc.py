"""Loading and validating JSON documents with every problem reported at once.

Shared by the manifest and the render config: strict JSON parsing (line and
column on syntax errors, duplicate keys and NaN refused), JSON Schema
validation whose errors become :class:`~cloudlets.errors.Problem` objects
with a JSON pointer and a plain message, and the canonical form digests are
computed over.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator, ValidationError

from cloudlets.errors import Problem
from cloudlets.urls import redact_text

__all__ = [
    "canonical_json",
    "digest",
    "load_schema",
    "parse_json",
    "parse_size",
    "pointer",
    "schema_problems",
]

_TYPE_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "object": "an object",
    "array": "an array",
    "boolean": "true or false",
    "null": "null",
}


class JSONSyntaxError(ValueError):
    """Raised by :func:`parse_json`; carries a :class:`Problem`."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        super().__init__(str(problem))


def parse_json(text: str | bytes) -> Any:
    """Parse JSON strictly: duplicate keys and NaN/Infinity are refused.

    :raises JSONSyntaxError: with the line and column of the first error.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise JSONSyntaxError(Problem("", f"not UTF-8 text (byte {exc.start})")) from None

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in items:
            if key in result:
                raise ValueError(f"duplicate key {key!r}")
            result[key] = value
        return result

    def constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(text, object_pairs_hook=pairs, parse_constant=constant)
    except json.JSONDecodeError as exc:
        raise JSONSyntaxError(Problem(
            "", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")) from None
    except ValueError as exc:
        raise JSONSyntaxError(Problem("", f"invalid JSON: {exc}")) from None
    except RecursionError:
        raise JSONSyntaxError(Problem("", "invalid JSON: nested too deeply")) from None


def canonical_json(data: Any) -> bytes:
    """The canonical form digests are computed over: sorted keys, no
    insignificant whitespace, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode("utf-8")


def digest(data: Any) -> str:
    """:returns: the hex sha256 of :func:`canonical_json` of ``data``."""
    return hashlib.sha256(canonical_json(data)).hexdigest()


@cache
def load_schema(name: str) -> dict[str, Any]:
    """:returns: a schema shipped in ``cloudlets/schemas/`` (parsed once)."""
    text = resources.files("cloudlets.schemas").joinpath(name).read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@cache
def _validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(load_schema(name),
                                format_checker=Draft202012Validator.FORMAT_CHECKER)


def pointer(path: Iterable[str | int]) -> str:
    """:returns: the RFC 6901 JSON pointer of a path."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def schema_problems(instance: Any, schema_name: str) -> list[Problem]:
    """Validate ``instance`` against a shipped schema.

    :returns: every problem, sorted by pointer, each with a plain message.
    """
    validator = _validator(schema_name)
    problems = [_problem(error) for error in validator.iter_errors(instance)]
    return sorted(set(problems), key=lambda p: (p.pointer, p.message))


def validate_subschema(instance: Any, schema: Mapping[str, Any],
                       base: Iterable[str | int] = ()) -> list[Problem]:
    """Validate ``instance`` against a user-supplied schema (e.g. a manifest
    argument), prefixing pointers with ``base``."""
    validator = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    prefix = list(base)
    problems = []
    for error in validator.iter_errors(instance):
        problem = _problem(error)
        problems.append(Problem(pointer(prefix) + problem.pointer, problem.message))
    return sorted(set(problems), key=lambda p: (p.pointer, p.message))


def check_schema(schema: Any, base: Iterable[str | int]) -> list[Problem]:
    """:returns: problems if ``schema`` is not itself a valid JSON Schema."""
    try:
        Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as error:
        return [Problem(pointer([*base, *error.absolute_path]),
                        f"is not a valid JSON Schema: {error.message}")]
    return []


def _problem(error: ValidationError) -> Problem:
    path = list(error.absolute_path)
    schema: Mapping[str, Any] = error.schema if isinstance(error.schema, Mapping) else {}
    custom = schema.get("x-error")
    keyword = error.validator
    instance = error.instance
    if keyword == "required":
        missing = re.match(r"'(.*)' is a required property", error.message)
        key = missing.group(1) if missing else "?"
        return Problem(pointer([*path, key]), "is required but missing")
    if keyword == "additionalProperties" and custom is None:
        known = sorted(schema.get("properties", {}))
        extras = sorted(set(instance) - set(known)) if isinstance(instance, dict) else []
        extras = [k for k in extras if not k.startswith("x-")] or extras
        hint = f"known keys: {', '.join(known)}" if known else "no keys are allowed here"
        if schema.get("patternProperties", {}).get("^x-") is not None:
            hint += "; free extension keys start with 'x-'"
        key = extras[0] if extras else "?"
        if len(extras) > 1:
            return Problem(pointer(path), f"unknown keys {', '.join(map(repr, extras))} ({hint})")
        return Problem(pointer([*path, key]), f"unknown key ({hint})")
    if keyword == "propertyNames" or "propertyNames" in error.relative_schema_path:
        names = schema.get("propertyNames", schema)
        message = names.get("x-error") or "is not an allowed key"
        return Problem(pointer([*path, str(instance)]), f"{str(instance)!r} {message}")
    if custom is not None:
        return Problem(pointer(path), f"{_show(instance)} {custom}")
    if keyword == "type":
        wanted: Any = error.validator_value
        types = [wanted] if isinstance(wanted, str) else list(wanted)
        expected = " or ".join(_TYPE_NAMES.get(n, n) for n in types)
        return Problem(pointer(path), f"{_show(instance)} is not {expected}")
    if keyword == "uniqueItems":
        return Problem(pointer(path), "has duplicate items")
    return Problem(pointer(path), error.message)


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
    text = redact_text(text)  # a bad mirror URL's password is not echoed
    return text if len(text) <= 80 else text[:77] + "..."


_SIZE = re.compile(r"^([1-9][0-9]*(?:\.[0-9]+)?)\s*([KMGT]?)(i?)(B?)$")
_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_size(value: int | str) -> int:
    """Parse a size: bytes as an integer, or ``512M``, ``2G``, ``2GiB``,
    ``1.5G`` (units are binary: K = 1024).

    :raises ValueError: when ``value`` is not a size.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"{value!r} is not a positive size")
        return value
    match = _SIZE.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a size")
    number, unit, _, _ = match.groups()
    return int(float(number) * (1024 ** _UNITS[unit]))
