"""Regular expressions that strangers supply, matched in linear time.

A manifest holds regular expressions: its ``volatile`` path patterns, and the
``pattern`` and ``patternProperties`` keywords of its argument schemas. With a
backtracking engine such as :mod:`re`, ``(a+)+$`` takes half a minute on a
41-character value. Every such pattern is compiled here with RE2
(the ``google-re2`` package), whose matching time is linear in the length of the
value and whose compiled program is bounded in memory; a pattern RE2 cannot
compile (backreferences, lookaround) is refused with a
:class:`~cloudlets.errors.ManifestError` naming its JSON pointer.

One form of lookahead is accepted, because the first cloudlets tool's sample
manifest uses it and it is a regular language: a trailing negative lookahead
of a literal followed by ``.+`` or ``.*`` (``/var/log/(?!apt).+``), which is
rewritten into an equivalent lookahead-free expression.

RE2 follows ECMA-262 (JSON Schema's regex dialect) where :mod:`re` does not:
``$`` matches only at the very end of the value, never before a trailing
newline, so ``^[a-z]+$`` refuses ``"abc\\n"``.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Protocol

import re2  # type: ignore[import-untyped]

from cloudlets.errors import ManifestError, Problem

__all__ = ["MAX_PATTERN_LENGTH", "Matcher", "compile_pattern", "pattern_problem"]

#: Longest regular expression a manifest may supply, in characters.
MAX_PATTERN_LENGTH = 1024
#: Memory RE2 may use for one compiled pattern, in bytes (RE2's own default).
MAX_PATTERN_MEMORY = 8 << 20

# A trailing '(?!literal).+' or '(?!literal).*', optionally anchored with '$'.
# The literal is plain characters or backslash-escaped punctuation.
_TAIL_LOOKAHEAD = re.compile(
    r"(?P<head>.*?)\(\?!(?P<literal>(?:[A-Za-z0-9_/,;:=@%&'\"<> #-]|\\[^A-Za-z0-9])+)\)"
    r"\.(?P<quantifier>[+*])(?P<end>\$?)", re.DOTALL)


class Matcher(Protocol):
    """A compiled pattern: the subset of :class:`re.Pattern` cloudlets uses."""

    @property
    def pattern(self) -> str: ...  # pragma: no cover - protocol

    def search(self, text: str) -> Any: ...  # pragma: no cover - protocol

    def match(self, text: str) -> Any: ...  # pragma: no cover - protocol


def compile_pattern(pattern: str, where: str = "") -> Matcher:
    """Compile a manifest-supplied regular expression for linear-time matching.

    :param pattern: the expression (RE2 syntax, which is close to ECMA-262
        and Python's :mod:`re` without backreferences or lookaround).
    :param where: the JSON pointer of the pattern, for the error.
    :returns: a matcher with ``search`` and ``match`` (anchored at the start).
    :raises ManifestError: the pattern is too long or cannot be matched in
        linear time, naming ``where``.
    """
    problem = pattern_problem(pattern, where)
    if problem is not None:
        raise ManifestError([problem])
    return _compile(pattern)


def pattern_problem(pattern: Any, where: str) -> Problem | None:
    """:returns: why ``pattern`` is refused (with ``where`` as its pointer),
    or ``None`` when it compiles."""
    if not isinstance(pattern, str):
        return Problem(where, "a regular expression must be a string")
    if len(pattern) > MAX_PATTERN_LENGTH:
        return Problem(where, f"regular expression longer than {MAX_PATTERN_LENGTH} characters")
    try:
        _compile(pattern)
    except ValueError as exc:
        return Problem(where, f"{pattern[:80]!r} cannot be matched in linear time ({exc}); "
                              "use RE2 syntax: no backreferences, no lookaround except a "
                              "trailing (?!literal).+")
    return None


@lru_cache(maxsize=1024)
def _compile(pattern: str) -> Matcher:
    """:raises ValueError: RE2 cannot compile ``pattern`` (nor its rewrite)."""
    options = re2.Options()
    options.log_errors = False
    options.max_mem = MAX_PATTERN_MEMORY
    try:
        compiled: Matcher = re2.compile(pattern, options)
        return compiled
    except re2.error as exc:
        rewritten = _without_tail_lookahead(pattern)
        if rewritten is None:
            raise ValueError(_reason(exc)) from None
    try:
        compiled = re2.compile(rewritten, options)
    except re2.error as exc:
        raise ValueError(_reason(exc)) from None
    return _Rewritten(pattern, compiled)


class _Rewritten:
    """A pattern matched through its lookahead-free rewrite."""

    def __init__(self, pattern: str, compiled: Matcher) -> None:
        self.pattern = pattern
        self._compiled = compiled

    def search(self, text: str) -> Any:
        return self._compiled.search(text)

    def match(self, text: str) -> Any:
        return self._compiled.match(text)


def _reason(exc: Exception) -> str:
    reason = exc.args[0] if exc.args else exc
    return reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)


def _without_tail_lookahead(pattern: str) -> str | None:
    """Rewrite a trailing ``(?!L).+`` / ``(?!L).*`` (optionally with ``$``)
    into alternatives without lookahead: at that position the value either
    ends (where the quantifier allows) or differs from ``L`` at some
    character before ``L`` is complete.

    :returns: the rewritten pattern, or ``None`` when the form does not apply.
    """
    found = _TAIL_LOOKAHEAD.fullmatch(pattern)
    if found is None:
        return None
    head = found.group("head")
    if (len(head) - len(head.rstrip("\\"))) % 2:  # '\(?!' is a literal parenthesis
        return None
    literal = re.findall(r"\\.|.", found.group("literal"), re.DOTALL)
    chars = [token[-1] for token in literal]
    plus, anchored = found.group("quantifier") == "+", bool(found.group("end"))
    alternatives = [] if plus else ["$"]
    for index, char in enumerate(chars):
        prefix = "".join(re2.escape(c) for c in chars[:index])
        newline = "\\n" if anchored or (plus and not index) else ""
        differs = f"[^{_in_class(char)}{newline}]"
        alternatives.append(f"{prefix}(?:{differs}|$)" if index else differs)
    tail = "(?:" + "|".join(alternatives) + ")"
    if anchored:
        tail += r"[^\n]*$"
    return head + tail


def _in_class(char: str) -> str:
    """``char`` escaped for use inside a character class."""
    return "\\" + char if char in "\\]^-[" else char
