"""Loading and validating JSON documents with every problem reported at once.

Shared by the manifest and the render config: strict JSON parsing (line and
column on syntax errors; duplicate keys, non-finite numbers, huge integers and
nesting deeper than :data:`MAX_JSON_DEPTH` refused, with a JSON pointer), JSON
Schema validation whose errors become :class:`~cloudlets.errors.Problem`
objects with a JSON pointer and a plain message, and the canonical form
digests are computed over.

Validation never reaches out and never backtracks: ``pattern``,
``patternProperties`` and ``format: regex`` go through RE2
(:mod:`cloudlets.patterns`), ``uniqueItems`` is linear, and ``$ref`` resolves
through a registry that cannot retrieve anything (:data:`NO_RETRIEVAL`).

:mod:`jsonschema` and :mod:`referencing` (some 60 ms to import) are imported
on the first validation, not with this module: :data:`FORMAT_CHECKER`,
:data:`NO_RETRIEVAL` and :data:`SafeValidator` are built then. A process
whose documents are all in the memo of valid documents
(:mod:`cloudlets.validmemo`) or pass the quick check of
:mod:`cloudlets.quickschema` (a render request's config) never imports them.
"""

from __future__ import annotations

import codecs
import contextlib
import contextvars
import hashlib
import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cloudlets.errors import CloudletsError, Problem
from cloudlets.patterns import compile_pattern, pattern_problem
from cloudlets.urls import redact_text

if TYPE_CHECKING:
    import referencing
    from jsonschema import FormatChecker, ValidationError

__all__ = [
    "FORMAT_CHECKER",
    "MAX_JSON_DEPTH",
    "MAX_JSON_INTEGER",
    "NO_RETRIEVAL",
    "JSONLimitError",
    "JSONSyntaxError",
    "SafeValidator",
    "StepBudgetExceeded",
    "ValidDigests",
    "canonical_json",
    "digest",
    "document_problems",
    "load_schema",
    "memo_key",
    "parse_json",
    "parse_json_or_string",
    "parse_size",
    "pointer",
    "problem_of",
    "recalled",
    "remember",
    "schema_problems",
    "step_budget",
    "use_memo",
]

#: Deepest nesting of arrays and objects accepted in a JSON input (the
#: top-level object is depth 1).
MAX_JSON_DEPTH = 64
#: Largest magnitude of an integer accepted in a JSON input (int64).
MAX_JSON_INTEGER = 2**63 - 1
_MAX_INTEGER_DIGITS = len(str(MAX_JSON_INTEGER))

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


class JSONLimitError(JSONSyntaxError):
    """Raised by :func:`parse_json` for well-formed JSON that is refused: a
    non-finite number, an integer beyond :data:`MAX_JSON_INTEGER`, nesting
    deeper than :data:`MAX_JSON_DEPTH`. The problem's pointer says where."""


class _Refused:
    """What the parser hooks put in place of a refused number, so that the
    walk after parsing can name its pointer."""

    def __init__(self, message: str) -> None:
        self.message = message


def _parse_int(text: str) -> Any:
    if len(text.lstrip("-")) > _MAX_INTEGER_DIGITS:  # never convert a huge one
        return _Refused(f"integer with more than {_MAX_INTEGER_DIGITS} digits")
    return int(text)


def _parse_float(text: str) -> Any:
    value = float(text)
    return value if math.isfinite(value) else _Refused(f"{text[:40]} is not a finite number")


def document_problems(data: Any, max_depth: int = MAX_JSON_DEPTH,
                      limit: int = 10) -> list[Problem]:
    """Check that ``data`` is a JSON document cloudlets can hold: only JSON
    types (objects with string keys), Unicode strings (no lone surrogates),
    finite numbers, integers within
    :data:`MAX_JSON_INTEGER`, nesting within ``max_depth``. The walk is
    iterative, so a hostile document cannot exhaust the stack.

    :returns: up to ``limit`` problems, each with its JSON pointer.
    """
    problems: list[Problem] = []
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    while stack and len(problems) < limit:
        value, path = stack.pop()
        kind = type(value)
        if (kind in _PLAIN and (kind is not str or value.isascii())) \
                or (kind is int and -MAX_JSON_INTEGER <= value <= MAX_JSON_INTEGER) \
                or (kind is float and math.isfinite(value)):
            continue
        message = _value_problem(value)
        if message is None and isinstance(value, (dict, list, tuple)):
            if len(path) >= max_depth:
                message = f"nested deeper than {max_depth} levels"
            elif isinstance(value, dict):
                bad = next((k for k in value if not isinstance(k, str)
                            or _string_problem(k) is not None), None)
                if bad is not None:
                    message = f"key {bad!r} is not a string" if not isinstance(bad, str) \
                        else f"key {_string_problem(bad)}"
                else:
                    stack.extend((v, (*path, k)) for k, v in reversed(value.items()))
            else:
                stack.extend((v, (*path, i)) for i, v in reversed(list(enumerate(value))))
        if message is not None:
            problems.append(Problem(pointer(path), message))
    return problems


_PLAIN = frozenset({str, bool, type(None)})


def _string_problem(text: str) -> str | None:
    if text.isascii():
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"holds a lone surrogate (\\u{ord(text[exc.start]):04x}), which is not Unicode text"
    return None


def _value_problem(value: Any) -> str | None:
    if isinstance(value, _Refused):
        return value.message
    if isinstance(value, str):
        return _string_problem(value)
    if value is None or isinstance(value, (bool, dict, list, tuple)):
        return None
    if isinstance(value, int):
        return None if abs(value) <= MAX_JSON_INTEGER else \
            f"integer beyond the bound of {MAX_JSON_INTEGER}"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{value} is not a finite number"
    return f"a {type(value).__name__} is not a JSON value"


def parse_json(text: str | bytes) -> Any:
    """Parse JSON strictly: duplicate keys are refused, and so are documents
    that :func:`document_problems` refuses (NaN, Infinity, ``1e400``, huge
    integers, deep nesting).

    :raises JSONSyntaxError: with the line and column of the first error.
    :raises JSONLimitError: naming the pointer of the first refused value.
    """
    if isinstance(text, bytes):
        # The byte-order mark is stripped here rather than by the utf-8-sig
        # codec, whose module Python imports on first use: on the service's
        # event loop that import was the largest cost of a first create.
        text = text.removeprefix(codecs.BOM_UTF8)
        try:
            text = text.decode("utf-8")
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
        return _Refused(f"{name} is not valid JSON")

    try:
        data = json.loads(text, object_pairs_hook=pairs, parse_constant=constant,
                          parse_int=_parse_int, parse_float=_parse_float)
    except json.JSONDecodeError as exc:
        raise JSONSyntaxError(Problem(
            "", f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}")) from None
    except ValueError as exc:
        raise JSONSyntaxError(Problem("", f"invalid JSON: {exc}")) from None
    except RecursionError:
        raise JSONLimitError(Problem(
            "", f"invalid JSON: nested deeper than {MAX_JSON_DEPTH} levels")) from None
    problems = document_problems(data, limit=1)
    if problems:
        raise JSONLimitError(problems[0])
    return data


def parse_json_or_string(text: str) -> Any:
    """A command-line value: JSON when it parses as JSON, else the string
    itself (``--set hostname=web`` and ``--set dns.search='["a"]'``).

    :raises JSONLimitError: the value is JSON that :func:`parse_json`
        refuses (``1e400``, ``NaN``, a huge integer, deep nesting).
    """
    try:
        return parse_json(text)
    except JSONLimitError:
        raise
    except JSONSyntaxError:
        return text


def canonical_json(data: Any) -> bytes:
    """The canonical form digests are computed over: sorted keys, no
    insignificant whitespace, UTF-8."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, allow_nan=False).encode("utf-8")


def digest(data: Any) -> str:
    """:returns: the hex sha256 of :func:`canonical_json` of ``data``."""
    return hashlib.sha256(canonical_json(data)).hexdigest()


class ValidDigests:
    """The canonical digests of the last documents a validation accepted,
    so the same document is validated once.

    A validation that depends on the document alone gives the same answer
    for the same canonical JSON: the digest is taken only of plain JSON
    values (a tuple serializes as an array, but is not one to a schema),
    once :func:`document_problems` found none. Bounded: the oldest digests
    are forgotten.

    :param size: digests kept at most.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._digests: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(data: Any) -> str | None:
        """:returns: the document's canonical digest, or ``None`` for one
        holding values JSON would not tell apart (tuples)."""
        stack: list[Any] = [data]
        while stack:
            value = stack.pop()
            if isinstance(value, tuple):
                return None
            if isinstance(value, dict):
                stack.extend(value.values())
            elif isinstance(value, list):
                stack.extend(value)
        return digest(data)

    def seen(self, key: str) -> bool:
        """:returns: whether ``key`` was added (and not forgotten yet)."""
        with self._lock:
            if key in self._digests:
                self._digests.move_to_end(key)
                return True
            return False

    def add(self, key: str) -> None:
        """Remember a valid document's digest."""
        with self._lock:
            self._digests[key] = None
            self._digests.move_to_end(key)
            while len(self._digests) > self.size:
                self._digests.popitem(last=False)


class _Memo(Protocol):
    """A memo of validations that found no problem (:class:`cloudlets.validmemo.ValidatedMemo`)."""

    def seen(self, key: str) -> bool: ...

    def add(self, key: str) -> None: ...


_MEMO: contextvars.ContextVar[_Memo | None] = contextvars.ContextVar(
    "cloudlets_validated_memo", default=None)


@contextlib.contextmanager
def use_memo(memo: _Memo) -> Iterator[None]:
    """Have the validations inside this context consult ``memo`` before
    running jsonschema, and add to it the keys of those that found no
    problem (see :mod:`cloudlets.validmemo`)."""
    token = _MEMO.set(memo)
    try:
        yield
    finally:
        _MEMO.reset(token)


def memo_key(call: str, *documents: Any) -> str | None:
    """:returns: the key a memo in force knows a validation by: the sha256 of
    ``call`` and the digest of the canonical JSON of each of ``documents`` (all that the
    validation's answer depends on), or ``None`` when no memo is in force
    or a document is not plain JSON (a tuple, which a schema does not take
    for an array; a non-string key, which JSON would turn into one; a value
    :func:`document_problems` refuses)."""
    if _MEMO.get() is None:
        return None
    key = hashlib.sha256(call.encode() + b"\0")
    for document in documents:
        if document_problems(document, limit=1):
            return None
        known = ValidDigests.key(document)  # the canonical JSON's digest, or None
        if known is None:
            return None
        key.update(known.encode() + b"\0")
    return key.hexdigest()


def recalled(key: str | None) -> bool:
    """:returns: whether the memo in force knows ``key`` (of :func:`memo_key`)."""
    memo = _MEMO.get()
    return key is not None and memo is not None and memo.seen(key)


def remember(key: str | None) -> None:
    """Add ``key`` (of a validation that found no problem) to the memo in force."""
    memo = _MEMO.get()
    if key is not None and memo is not None:
        memo.add(key)


@cache
def load_schema(name: str) -> dict[str, Any]:
    """:returns: a schema shipped in ``cloudlets/schemas/`` (parsed once)."""
    shipped = Path(__file__).with_name("schemas") / name
    if shipped.is_file():
        # read directly: importlib.resources costs a fresh process some 6 ms to import
        text = shipped.read_text("utf-8")
    else:  # installed without files on disk (a zip): through the loader
        from importlib import resources

        text = resources.files("cloudlets.schemas").joinpath(name).read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


class StepBudgetExceeded(CloudletsError):
    """Raised inside validation when a schema takes more keyword steps than
    its budget (see :func:`step_budget`)."""


_STEPS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "cloudlets_schema_steps", default=None)

_Keyword = Callable[[Any, Any, Any, Any], "Iterator[ValidationError] | None"]


def _counted(keyword: _Keyword, cost: int = 1) -> _Keyword:
    """``keyword``, charging ``cost`` steps to the budget in force."""
    def counted(validator: Any, value: Any, instance: Any, schema: Any
                ) -> Iterator[ValidationError]:
        steps = _STEPS.get()
        if steps is not None:
            steps[0] -= cost
            if steps[0] < 0:
                raise StepBudgetExceeded("schema budget exhausted")
        errors = keyword(validator, value, instance, schema)
        if errors is not None:
            yield from errors
    return counted


def _pattern(validator: Any, pattern: Any, instance: Any, schema: Any
             ) -> Iterator[ValidationError]:
    from jsonschema import ValidationError  # imported already: a validator runs

    if validator.is_type(instance, "string"):
        problem = pattern_problem(pattern, "")
        if problem is not None:
            yield ValidationError(f"pattern {problem.message}")
        elif not compile_pattern(pattern).search(instance):
            yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(validator: Any, patterns: Any, instance: Any, schema: Any
                        ) -> Iterator[ValidationError]:
    from jsonschema import ValidationError

    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        problem = pattern_problem(pattern, "")
        if problem is not None:
            yield ValidationError(f"patternProperties {problem.message}")
            continue
        matcher = compile_pattern(pattern)
        for key, value in instance.items():
            if matcher.search(key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _unique_items(validator: Any, unique: Any, instance: Any, schema: Any
                  ) -> Iterator[ValidationError]:
    """``uniqueItems`` in linear time (jsonschema's falls back to comparing
    every pair of unhashable items)."""
    from jsonschema import ValidationError

    if not unique or not validator.is_type(instance, "array"):
        return
    seen: set[bytes] = set()
    for item in instance:
        key = canonical_json(_normal(item))
        if key in seen:
            yield ValidationError(f"{_show(instance)} has non-unique elements")
            return
        seen.add(key)


def _normal(value: Any) -> Any:
    """``value`` with integral floats as integers: JSON equality (1 == 1.0)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _normal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    return value


def _is_regex(instance: object) -> bool:
    return not isinstance(instance, str) or pattern_problem(instance, "") is None


class _Validation:
    """What validation needs from :mod:`jsonschema` and :mod:`referencing`,
    built on first use (see the module)."""

    def __init__(self) -> None:
        import referencing
        import referencing.exceptions
        from jsonschema import Draft202012Validator, FormatChecker, validators

        def refuse_retrieval(uri: str) -> referencing.Resource[Any]:
            raise referencing.exceptions.NoSuchResource(ref=uri)  # type: ignore[call-arg]

        self.registry: referencing.Registry[Any] = referencing.Registry(
            retrieve=refuse_retrieval)  # type: ignore[call-arg]
        # Draft 2020-12 format checks, with ``regex`` meaning "RE2 can match it".
        self.format_checker: FormatChecker = FormatChecker(formats=())
        self.format_checker.checkers = dict(Draft202012Validator.FORMAT_CHECKER.checkers)
        self.format_checker.checkers["regex"] = (_is_regex, ())
        # Following a reference builds a validator: it costs about ten plain keywords.
        costs = {"$ref": 10, "$dynamicRef": 10}
        keywords = {name: _counted(keyword, costs.get(name, 1)) for name, keyword in {
            **Draft202012Validator.VALIDATORS, "pattern": _pattern,
            "patternProperties": _pattern_properties, "uniqueItems": _unique_items}.items()}
        self.validator: Any = validators.extend(  # type: ignore[no-untyped-call]
            Draft202012Validator, keywords, format_checker=self.format_checker)


_validation: _Validation | None = None
_validation_lock = threading.Lock()


def _parts() -> _Validation:
    global _validation
    with _validation_lock:
        if _validation is None:
            _validation = _Validation()
        return _validation


def __getattr__(name: str) -> Any:
    """The validation objects, built (and :mod:`jsonschema` imported) on first use.

    ``FORMAT_CHECKER``: Draft 2020-12 format checks, with ``regex`` meaning
    "RE2 can match it". ``NO_RETRIEVAL``: the registry every cloudlets
    validator resolves ``$ref`` with; it holds only the JSON Schema
    meta-schemas (in memory) and retrieves nothing, so no schema can make
    validation open a URL or a file. ``SafeValidator``: Draft 2020-12
    validation with linear-time keywords and a step budget; build instances
    with ``registry=NO_RETRIEVAL``.
    """
    if name == "FORMAT_CHECKER":
        return _parts().format_checker
    if name == "NO_RETRIEVAL":
        return _parts().registry
    if name == "SafeValidator":
        return _parts().validator
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    #: Draft 2020-12 format checks, with ``regex`` meaning "RE2 can match it".
    FORMAT_CHECKER: FormatChecker
    #: The registry every cloudlets validator resolves ``$ref`` with: it holds
    #: only the JSON Schema meta-schemas (in memory) and retrieves nothing, so no
    #: schema can make validation open a URL or a file.
    NO_RETRIEVAL: referencing.Registry[Any]
    #: Draft 2020-12 validation with linear-time keywords and a step budget.
    #: Build instances with ``registry=NO_RETRIEVAL``.
    SafeValidator: Any


@contextlib.contextmanager
def step_budget(steps: int) -> Iterator[None]:
    """Limit the keyword steps of the validations run inside this context.

    :param steps: the number of keyword evaluations allowed; past them a
        validation raises :class:`StepBudgetExceeded`.
    """
    token = _STEPS.set([steps])
    try:
        yield
    finally:
        _STEPS.reset(token)


@cache
def _schema_digest(name: str) -> str:
    return digest(load_schema(name))


@cache
def _quick_check(name: str) -> Callable[[Any], bool] | None:
    from cloudlets.quickschema import checker

    return checker(load_schema(name))


@cache
def _validator(name: str) -> Any:
    parts = _parts()
    return parts.validator(load_schema(name), format_checker=parts.format_checker,
                           registry=parts.registry)


def pointer(path: Iterable[str | int]) -> str:
    """:returns: the RFC 6901 JSON pointer of a path."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in path)


def schema_problems(instance: Any, schema_name: str) -> list[Problem]:
    """Validate ``instance`` against a shipped schema.

    :returns: every problem, sorted by pointer, each with a plain message.
    """
    key = memo_key("schema_problems", _schema_digest(schema_name), instance)
    if recalled(key):
        return []
    quick = _quick_check(schema_name)
    if quick is not None and quick(instance):
        remember(key)
        return []
    validator = _validator(schema_name)
    problems = [problem_of(error) for error in validator.iter_errors(instance)]
    if not problems:
        remember(key)
    return sorted(set(problems), key=lambda p: (p.pointer, p.message))


def problem_of(error: ValidationError) -> Problem:
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


_SIZE = re.compile(r"([1-9][0-9]*(?:\.[0-9]+)?) *([KMGT]?)(i?)(B?)")
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
    match = _SIZE.fullmatch(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a size")
    number, unit, _, _ = match.groups()
    return int(float(number) * (1024 ** _UNITS[unit]))
