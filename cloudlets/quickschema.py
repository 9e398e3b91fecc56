"""A quick check that accepts a valid document without :mod:`jsonschema`.

Importing :mod:`jsonschema` and :mod:`referencing` costs a fresh process some
40 to 60 ms, more than the rest of a re-render's validation. A render
request's config (a new hostname, a new address) is new to the memo of valid
documents every time, so the CLI would import them on every render for a
document a few lines long.

:func:`accepts` answers only "valid" or "cannot tell": it knows the plain
Draft 2020-12 keywords the shipped config schema uses and, for a schema using
any other keyword, a non-local ``$ref`` or a format other than ``ipv4`` and
``ipv6``, never answers "valid". Where it is unsure (an integral float for an
``integer``, say) it answers "cannot tell" too. Every "cannot tell" goes to
the full validator (:func:`cloudlets.jsondoc.schema_problems`), which also
writes the messages of invalid documents; the two are cross-checked by
property tests. Patterns are matched with RE2 through
:mod:`cloudlets.patterns`, as the full validator matches them.

The work is linear in the document and the schema: each keyword looks at
each value once, and ``$ref`` recursion descends into the document.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from typing import Any

from cloudlets.patterns import Matcher, compile_pattern, pattern_problem

__all__ = ["accepts", "checker"]

#: Keywords that only annotate: they never make a document invalid.
_ANNOTATIONS = frozenset({"$schema", "$id", "$comment", "$defs", "title", "description",
                          "default", "examples", "x-error"})

_Check = Callable[[Any], bool]


def _never(_value: Any) -> bool:
    return False


def _is_integer(value: Any) -> bool:
    # An integral float is an integer to JSON Schema; leave those to jsonschema.
    return type(value) is int


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


_TYPES: dict[str, _Check] = {
    "string": lambda v: isinstance(v, str),
    "object": lambda v: type(v) is dict,
    "array": lambda v: type(v) is list,
    "integer": _is_integer,
    "number": _is_number,
    "boolean": lambda v: type(v) is bool,
    "null": lambda v: v is None,
}


def _ipv4(text: str) -> bool:
    try:
        ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return True


def _ipv6(text: str) -> bool:
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return not address.scope_id


_FORMATS: dict[str, Callable[[str], bool]] = {"ipv4": _ipv4, "ipv6": _ipv6}


class _Unsupported(Exception):
    """The schema uses something this checker does not know."""


class _Compiler:
    """Turns a schema into one check function, resolving local ``$ref``\\ s
    once each (a recursive schema refers to its own, not yet finished,
    check through a cell)."""

    def __init__(self, root: Mapping[str, Any]) -> None:
        self.root = root
        self.refs: dict[str, list[_Check]] = {}

    def ref(self, target: Any) -> _Check:
        if not isinstance(target, str) or not target.startswith("#/$defs/"):
            raise _Unsupported(f"$ref {target!r}")
        cell = self.refs.get(target)
        if cell is None:
            name = target[len("#/$defs/"):]
            defs = self.root.get("$defs")
            if "/" in name or "~" in name or not isinstance(defs, Mapping) or name not in defs:
                raise _Unsupported(f"$ref {target!r}")
            cell = self.refs[target] = [_never]
            cell[0] = self.compile(defs[name])
        return lambda value: cell[0](value)

    def compile(self, schema: Any) -> _Check:
        if schema is True:
            return lambda _value: True
        if schema is False:
            return _never
        if not isinstance(schema, Mapping):
            raise _Unsupported("schema is not an object")
        checks: list[_Check] = []
        for keyword, value in schema.items():
            if keyword in _ANNOTATIONS or keyword in ("properties", "patternProperties",
                                                      "additionalProperties"):
                continue
            build = _KEYWORDS.get(keyword)
            if build is None:
                raise _Unsupported(keyword)
            checks.append(build(self, value))
        if any(k in schema for k in ("properties", "patternProperties", "additionalProperties")):
            checks.append(self._object(schema))
        if len(checks) == 1:
            return checks[0]
        return lambda value: all(check(value) for check in checks)

    # -- keywords -------------------------------------------------------

    def _kw_ref(self, target: Any) -> _Check:
        return self.ref(target)

    def _kw_type(self, names: Any) -> _Check:
        if isinstance(names, str):
            names = [names]
        if not isinstance(names, list) or not names or any(n not in _TYPES for n in names):
            raise _Unsupported(f"type {names!r}")
        tests = [_TYPES[n] for n in names]
        return lambda value: any(test(value) for test in tests)

    def _kw_required(self, names: Any) -> _Check:
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise _Unsupported("required")
        return lambda value: type(value) is not dict or all(n in value for n in names)

    def _kw_items(self, schema: Any) -> _Check:
        item = self.compile(schema)
        return lambda value: type(value) is not list or all(item(v) for v in value)

    def _count(self, bound: Any) -> int:
        if type(bound) is not int or bound < 0:
            raise _Unsupported(f"count {bound!r}")
        return bound

    def _kw_minItems(self, bound: Any) -> _Check:
        least = self._count(bound)
        return lambda value: type(value) is not list or len(value) >= least

    def _kw_maxItems(self, bound: Any) -> _Check:
        most = self._count(bound)
        return lambda value: type(value) is not list or len(value) <= most

    def _kw_minLength(self, bound: Any) -> _Check:
        least = self._count(bound)
        return lambda value: not isinstance(value, str) or len(value) >= least

    def _kw_maxLength(self, bound: Any) -> _Check:
        most = self._count(bound)
        return lambda value: not isinstance(value, str) or len(value) <= most

    def _limit(self, bound: Any) -> int | float:
        if not _is_number(bound):
            raise _Unsupported(f"limit {bound!r}")
        return bound  # type: ignore[no-any-return]

    def _kw_minimum(self, bound: Any) -> _Check:
        least = self._limit(bound)
        return lambda value: not _is_number(value) or value >= least

    def _kw_maximum(self, bound: Any) -> _Check:
        most = self._limit(bound)
        return lambda value: not _is_number(value) or value <= most

    def _matcher(self, pattern: Any) -> Matcher:
        if pattern_problem(pattern, "") is not None:
            raise _Unsupported(f"pattern {pattern!r}")
        return compile_pattern(pattern)

    def _kw_pattern(self, pattern: Any) -> _Check:
        matcher = self._matcher(pattern)
        return lambda value: not isinstance(value, str) or matcher.search(value) is not None

    def _kw_format(self, name: Any) -> _Check:
        test = _FORMATS.get(name) if isinstance(name, str) else None
        if test is None:
            raise _Unsupported(f"format {name!r}")
        return lambda value: not isinstance(value, str) or test(value)

    def _kw_anyOf(self, schemas: Any) -> _Check:
        if not isinstance(schemas, list) or not schemas:
            raise _Unsupported("anyOf")
        options = [self.compile(s) for s in schemas]
        return lambda value: any(option(value) for option in options)

    def _object(self, schema: Mapping[str, Any]) -> _Check:
        properties = schema.get("properties", {})
        patterns = schema.get("patternProperties", {})
        if not isinstance(properties, Mapping) or not isinstance(patterns, Mapping):
            raise _Unsupported("properties")
        named = {key: self.compile(sub) for key, sub in properties.items()}
        matched = [(self._matcher(p), self.compile(sub)) for p, sub in patterns.items()]
        other = (self.compile(schema["additionalProperties"])
                 if "additionalProperties" in schema else None)

        def check(value: Any) -> bool:
            if type(value) is not dict:
                return True
            for key, item in value.items():
                known = named.get(key)
                if known is not None and not known(item):
                    return False
                hit = False
                for matcher, sub in matched:
                    if matcher.search(key) is not None:
                        hit = True
                        if not sub(item):
                            return False
                if known is None and not hit and other is not None and not other(item):
                    return False
            return True
        return check


_KEYWORDS: dict[str, Callable[[_Compiler, Any], _Check]] = {
    "$ref": _Compiler._kw_ref, "type": _Compiler._kw_type, "required": _Compiler._kw_required,
    "items": _Compiler._kw_items, "minItems": _Compiler._kw_minItems,
    "maxItems": _Compiler._kw_maxItems, "minLength": _Compiler._kw_minLength,
    "maxLength": _Compiler._kw_maxLength, "minimum": _Compiler._kw_minimum,
    "maximum": _Compiler._kw_maximum, "pattern": _Compiler._kw_pattern,
    "format": _Compiler._kw_format, "anyOf": _Compiler._kw_anyOf,
}


def checker(schema: Mapping[str, Any]) -> _Check | None:
    """:returns: the quick check of ``schema`` (a function of a document that
    is true only for a valid one), or ``None`` when the schema uses anything
    the quick check does not know."""
    try:
        return _Compiler(schema).compile(schema)
    except _Unsupported:
        return None


def accepts(schema: Mapping[str, Any], document: Any) -> bool:
    """:returns: ``True`` only when ``document`` is valid against ``schema``;
    ``False`` when it is not or the quick check cannot tell."""
    check = checker(schema)
    return check is not None and check(document)
