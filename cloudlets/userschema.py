"""JSON Schemas that a manifest supplies (its ``args``), checked before use.

A stranger's schema must be **self-contained** and **cheap to apply**:

* every ``$ref`` and ``$dynamicRef`` is a local JSON pointer into the same
  schema (``#`` or ``#/...``) that resolves to a schema; anything else
  (``http://``, ``file://``, a relative URI, an anchor) is refused before
  anything could be fetched, naming its pointer. ``$id`` is refused below
  the root (it would move the base the pointers resolve against), and
  ``$schema`` may only name JSON Schema 2020-12, at the root;
* references that loop back without descending into the value
  (``{"$ref": "#"}``) are refused;
* every ``pattern`` and ``patternProperties`` key compiles with RE2
  (:mod:`cloudlets.patterns`);
* applying it takes at most :data:`MAX_SCHEMA_STEPS` keyword evaluations
  per value (a schema of nested ``anyOf`` references costs exponential time
  otherwise), and the validator resolves references through
  :data:`~cloudlets.jsondoc.NO_RETRIEVAL`, so even a case the checks missed
  cannot reach the network or the file system.

:mod:`jsonschema` is imported on the first check that the memo of valid
documents (:mod:`cloudlets.validmemo`) does not answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import unquote

from cloudlets import jsondoc
from cloudlets.errors import Problem
from cloudlets.jsondoc import (
    StepBudgetExceeded,
    ValidDigests,
    document_problems,
    memo_key,
    pointer,
    problem_of,
    step_budget,
)
from cloudlets.patterns import pattern_problem

__all__ = ["MAX_SCHEMA_STEPS", "check_schema", "validate_subschema"]

#: Keyword evaluations one validation of a value against a manifest-supplied
#: schema may take (about a second of work).
MAX_SCHEMA_STEPS = 50_000
#: Digests of the schemas :func:`check_schema` accepted last: manifests of
#: one family share their arguments' schemas, checked once.
_VALID_SCHEMAS = ValidDigests(4096)

_DIALECTS = frozenset({"https://json-schema.org/draft/2020-12/schema",
                       "https://json-schema.org/draft/2020-12/schema#"})
_REFERENCES = ("$ref", "$dynamicRef")
# Keywords whose subschemas apply to the same value, and those that descend.
_IN_PLACE = ("not", "if", "then", "else")
_IN_PLACE_LISTS = ("allOf", "anyOf", "oneOf")
_IN_PLACE_MAPS = ("dependentSchemas",)
_DESCEND = ("additionalProperties", "items", "contains", "propertyNames",
            "unevaluatedItems", "unevaluatedProperties", "additionalItems", "contentSchema")
_DESCEND_LISTS = ("prefixItems", "items")
_DESCEND_MAPS = ("properties", "patternProperties", "$defs", "definitions")

_Path = tuple[str | int, ...]


def check_schema(schema: Any, base: Iterable[str | int]) -> list[Problem]:
    """Check a manifest-supplied schema: self-contained, linear-time
    patterns, no reference loops, and valid JSON Schema 2020-12.

    :param base: the JSON path of the schema in the manifest, for pointers.
    :returns: every problem found, with pointers into the manifest.
    """
    prefix = list(base)
    problems = [Problem(pointer([*prefix, *path]), message)
                for path, message in _structure_problems(schema)]
    if problems:
        return problems
    known = _VALID_SCHEMAS.key(schema) if not document_problems(schema) else None
    if known is not None and _VALID_SCHEMAS.seen(known):
        return []
    remembered = memo_key("check_schema", schema)
    if jsondoc.recalled(remembered):
        if known is not None:
            _VALID_SCHEMAS.add(known)
        return []
    import jsonschema  # here, not at the top: see the module

    try:
        jsonschema.Draft202012Validator.check_schema(schema,
                                                     format_checker=jsondoc.FORMAT_CHECKER)
    except jsonschema.SchemaError as error:
        return [Problem(pointer([*prefix, *error.absolute_path]),
                        f"is not a valid JSON Schema: {error.message}")]
    except RecursionError:
        return [Problem(pointer(prefix), "is not a valid JSON Schema: nested too deeply")]
    if known is not None:
        _VALID_SCHEMAS.add(known)
    jsondoc.remember(remembered)
    return []


def validate_subschema(instance: Any, schema: Mapping[str, Any],
                       base: Iterable[str | int] = ()) -> list[Problem]:
    """Validate ``instance`` against a manifest-supplied schema (already
    accepted by :func:`check_schema`), prefixing pointers with ``base``.

    :returns: every problem, sorted by pointer; one problem at ``base`` when
        the schema takes more than :data:`MAX_SCHEMA_STEPS` steps or cannot
        be resolved.
    """
    prefix = list(base)
    # The validator class follows "$schema" on the way down: leave it out so
    # every level keeps the linear-time keywords.
    root = {k: v for k, v in schema.items() if k != "$schema"}
    remembered = memo_key("validate_subschema", dict(schema), instance)
    if jsondoc.recalled(remembered):
        return []
    import referencing.exceptions  # here, not at the top: see the module

    validator = jsondoc.SafeValidator(root, format_checker=jsondoc.FORMAT_CHECKER,
                                      registry=jsondoc.NO_RETRIEVAL)
    problems = []
    try:
        with step_budget(MAX_SCHEMA_STEPS):
            for error in validator.iter_errors(instance):
                problem = problem_of(error)
                problems.append(Problem(pointer(prefix) + problem.pointer, problem.message))
    except StepBudgetExceeded:
        return [Problem(pointer(prefix), f"the argument's schema takes more than "
                                         f"{MAX_SCHEMA_STEPS} steps to check this value")]
    except RecursionError:
        return [Problem(pointer(prefix), "the argument's schema recurses too deeply "
                                         "for this value")]
    except referencing.exceptions.Unresolvable as exc:
        return [Problem(pointer(prefix), f"the argument's schema has a reference that "
                                         f"does not resolve: {exc}")]
    if not problems:
        jsondoc.remember(remembered)
    return sorted(set(problems), key=lambda p: (p.pointer, p.message))


def _structure_problems(root: Any) -> list[tuple[_Path, str]]:
    """Walk every schema reachable from ``root`` (through its keywords and its
    local references) and collect what makes it unsafe."""
    problems: list[tuple[_Path, str]] = []
    in_place: dict[_Path, list[tuple[_Path, _Path]]] = {}
    seen: set[_Path] = set()
    stack: list[_Path] = [()]
    while stack:
        path = stack.pop()
        if path in seen:
            continue
        seen.add(path)
        node = _at(root, path)
        if not isinstance(node, dict):
            continue
        edges = in_place.setdefault(path, [])
        for key, value in node.items():
            where = (*path, key)
            if key in _REFERENCES:
                target, message = _local_target(root, value)
                if message is not None:
                    problems.append((where, message))
                elif target is not None:
                    edges.append((target, where))
                    stack.append(target)
            elif key == "$schema" and (path or not isinstance(value, str)
                                       or value not in _DIALECTS):
                problems.append((where, "only JSON Schema 2020-12 is supported, named at the "
                                        "root of the schema or not at all"))
            elif key == "$id" and path:
                problems.append((where, "is not allowed below the root: a manifest's schema "
                                        "is one document"))
            elif key == "pattern":
                _pattern(problems, value, where)
            elif key == "patternProperties" and isinstance(value, dict):
                for pattern in value:
                    _pattern(problems, pattern, (*where, pattern))
            for child, same_value in _children(key, value, where):
                if same_value:
                    edges.append((child, child))
                stack.append(child)
    problems.extend(_loops(in_place))
    return problems


def _pattern(problems: list[tuple[_Path, str]], pattern: Any, where: _Path) -> None:
    problem = pattern_problem(pattern, "")
    if problem is not None:
        problems.append((where, problem.message))


def _children(key: str, value: Any, where: _Path) -> Iterator[tuple[_Path, bool]]:
    """The subschema locations of keyword ``key``, each with whether it
    applies to the same value (``allOf``) or descends into it (``items``)."""
    if (key in _IN_PLACE or key in _DESCEND) and isinstance(value, (dict, bool)):
        yield where, key in _IN_PLACE
    if (key in _IN_PLACE_LISTS or key in _DESCEND_LISTS) and isinstance(value, list):
        for index in range(len(value)):
            yield (*where, index), key in _IN_PLACE_LISTS
    if (key in _IN_PLACE_MAPS or key in _DESCEND_MAPS) and isinstance(value, dict):
        for name in value:
            yield (*where, name), key in _IN_PLACE_MAPS


def _local_target(root: Any, ref: Any) -> tuple[_Path | None, str | None]:
    """:returns: ``(path, None)`` for a local pointer that resolves to a
    schema, ``(None, message)`` otherwise."""
    if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
        return None, (f"{str(ref)[:200]!r} is not a local JSON pointer ('#' or '#/...'): a "
                      "manifest's schemas must be self-contained, nothing is fetched")
    path: list[str | int] = []
    node = root
    for token in unquote(ref[1:]).split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            path.append(token)
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            path.append(int(token))
            node = node[int(token)]
        else:
            return None, f"{ref[:200]!r} points to nothing in this schema"
    if not isinstance(node, (dict, bool)):
        return None, f"{ref[:200]!r} points to a value that is not a schema"
    return tuple(path), None


def _at(root: Any, path: _Path) -> Any:
    node = root
    for token in path:
        node = node[token]
    return node


def _loops(in_place: Mapping[_Path, list[tuple[_Path, _Path]]]) -> list[tuple[_Path, str]]:
    """References that come back to a schema without descending into the
    value: applying them never ends."""
    problems = []
    done: set[_Path] = set()
    for start in in_place:
        if start in done:
            continue
        active: set[_Path] = {start}
        stack = [(start, iter(in_place.get(start, ())))]
        while stack:
            node, edges = stack[-1]
            edge = next(edges, None)
            if edge is None:
                stack.pop()
                active.discard(node)
                done.add(node)
                continue
            target, where = edge
            if target in active:
                problems.append((where, "refers back to a schema that contains it without "
                                        "descending into the value: checking never ends"))
            elif target not in done:
                active.add(target)
                stack.append((target, iter(in_place.get(target, ()))))
    return problems
