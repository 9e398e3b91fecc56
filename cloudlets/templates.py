"""Rendering a cloudlet's template files inside a sandbox.

The files a manifest lists under ``templates`` are rendered with Jinja2's
:class:`~jinja2.sandbox.ImmutableSandboxedEnvironment`: no attribute starting
with ``_`` (so no walk to ``__subclasses__`` or ``__globals__``), no mutation
of the context, ``str.format`` sandboxed, :class:`~jinja2.StrictUndefined`
(a misspelt name is an error, not an empty string) and no autoescaping (these
are configuration files, not HTML). On top of Jinja's sandbox:

* the ``cycler``, ``joiner`` and ``lipsum`` globals are removed;
* includes, imports and extends resolve only inside the image's
  :class:`~cloudlets.rootfs.RootTree` (relative names from the including
  file's directory, symlinks followed inside the image), never on the host;
* every operation that can allocate much (``*``, ``**``, ``+``, ``%``, ``~``,
  ``str.ljust``/``center``/``zfill``/``replace``/``join``/``format``, the
  ``center``/``indent``/``wordwrap``/``batch``/``slice``/``join``/``sum``...
  filters, printing a container, a macro's or ``{% set %}`` block's output)
  is checked *before* it runs against :attr:`TemplateLimits.max_output_bytes`;
  a generator handed to a filter is metered item by item as it is consumed;
  integers are kept under :attr:`TemplateLimits.max_int_bits`; ``range`` is
  capped; ``{% for %}`` iterations are counted across the render; the output
  is counted while it streams, per file and per render;
* the render runs in a forked child process (:attr:`TemplateLimits.isolate`)
  whose address space may grow by :attr:`TemplateLimits.max_memory_bytes`
  only (``RLIMIT_AS``), which a watchdog stops with the template's line after
  :attr:`TemplateLimits.timeout` seconds, and which the kernel kills half a
  second later if it is stuck in C code (a timer signal and ``RLIMIT_CPU``),
  or the parent does. So no single operation that slipped past the checks can
  take the host's memory or time.

Manifests with ``"template_syntax": "dotcloud"`` use the first cloudlets
tool's ``<%= args.hostname %>`` form: plain dotted-name substitution, looked up
through the same sandbox, with no expressions at all.

Every failure is a :class:`~cloudlets.errors.TemplateError` naming the file
(its path inside the image) and the line.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import os
import posixpath
import re
import select
import signal
import string
import struct
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn, Self

from jinja2 import BaseLoader, StrictUndefined, TemplateNotFound, TemplateSyntaxError, Undefined
from jinja2.compiler import CodeGenerator, Frame
from jinja2.environment import Environment
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.nodes import Concat, Dict, For, List, Node, Tuple
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from cloudlets.errors import TemplateError

if TYPE_CHECKING:
    from cloudlets.config import RenderConfig
    from cloudlets.manifest import Manifest
    from cloudlets.rootfs import RootTree

__all__ = [
    "TemplateLimits",
    "render_template",
    "render_templates",
    "template_context",
]

#: Prefix of the file names Jinja sees, so a traceback never names (and
#: :mod:`linecache` never reads) a host file such as ``/etc/shadow``.
_FILENAME_PREFIX = "cloudlet-image:"
_REMOVED_GLOBALS = ("cycler", "joiner", "lipsum")
_WIDTH = re.compile(r"%[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?")
_NUMBER = re.compile(r"\d+")
_DOTCLOUD_TAG = re.compile(r"<%=(.*?)(-?)%>(\n?)", re.DOTALL)
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*\Z")
#: Characters of a failure's description kept in a TemplateError.
_MAX_MESSAGE = 500
#: Types whose methods' integer arguments are sizes to check.
_BUILTIN_TYPES = (str, bytes, int, float, list, tuple, dict)
#: What an expression builds that takes memory in proportion to its size.
_BUILT_TYPES = (str, bytes, list, tuple, dict, set, frozenset)


@dataclass(frozen=True)
class TemplateLimits:
    """How much a template may take. One render is every template of one
    cloudlet (:func:`render_templates`), or one :func:`render_template` call.

    :ivar max_source_bytes: size of a template file (and of an included one).
        Compiling is bounded by the deadline too: Jinja compiles about 70 KB
        of dense tags a second.
    :ivar max_output_bytes: size of one rendered file, and of any single
        string, sequence or mapping an expression, filter, call, macro or
        ``{% set %}`` block builds (characters or items).
    :ivar max_render_bytes: size of all the files of one render together.
    :ivar max_range: items a ``range()`` (or ``batch``/``slice`` count) may have.
    :ivar max_int_bits: bits any integer an operator, filter or call produces
        may have (and so the operands ``*``, ``**``, ``//`` and ``%`` see).
    :ivar max_iterations: ``{% for %}`` iterations in one render, all loops
        and nesting levels counted together.
    :ivar max_built_bytes: bytes (as :func:`sys.getsizeof` counts them) of all
        the strings, lists, tuples and dicts the expressions of one render
        build, kept or not: operators, filters, calls, slices, ``~``, list and
        dict displays, macro and block output, values printed. However a
        template keeps what it builds (in a namespace, nested lists, a
        ``{% set %}`` block), it cannot hold more.
    :ivar max_memory_bytes: memory the rendering child process may allocate
        beyond what it inherits (``RLIMIT_AS``; with :attr:`isolate` only,
        ``0`` for no limit).
    :ivar timeout: seconds one render may take (``0`` disables both
        deadlines). A watchdog stops a template running Python code at this
        deadline and reports its line; with :attr:`isolate`, the child is killed
        half a second later if it is stuck in C code.
    :ivar isolate: render in a forked child process, so that the memory limit
        and the hard deadline hold whatever the template does (POSIX only;
        ``False`` renders in the calling process, with the operation checks and
        the watchdog alone).
    """

    max_source_bytes: int = 256 * 1024
    max_output_bytes: int = 4 * 1024 * 1024
    max_render_bytes: int = 16 * 1024 * 1024
    max_range: int = 100_000
    max_int_bits: int = 8192
    max_iterations: int = 250_000
    max_built_bytes: int = 64 * 1024 * 1024
    max_memory_bytes: int = 192 * 1024 * 1024
    timeout: float = 1.0
    isolate: bool = True


class _LimitError(Exception):
    """A template tried to build something larger than the limits allow."""


class _RenderTimeout(Exception):
    """Raised asynchronously in the rendering thread by the watchdog."""


# -- size estimates ------------------------------------------------------------


def _estimate(value: Any, budget: int) -> int:
    """Characters ``str(value)`` would produce, counted no further than
    ``budget`` + 1 (so a huge nested structure costs little to reject): a
    container's, a dict view's and a :class:`~jinja2.utils.Namespace`'s
    content included."""
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, (int, float, bool)) or value is None:
        return 24
    total = 2
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, (str, bytes)):
            total += len(item) + 4
        elif isinstance(item, Mapping):
            total += 2 + 2 * len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, Namespace):  # its repr holds its attributes' reprs
            total += 13
            stack.append(object.__getattribute__(item, "_Namespace__attrs"))
        elif isinstance(item, Collection) and not isinstance(item, range):
            # lists, tuples, sets and the views d.keys(), d.values(), d.items()
            total += 2 + 2 * len(item)
            stack.extend(item)
        else:
            total += 24
        if total > budget:
            return total
    return total


class _Meter:
    """A count over one render, and the limit it may not pass."""

    def __init__(self, cap: int, limit: str, what: str) -> None:
        self.total = 0
        self._cap = cap
        self._limit = limit
        self._what = what

    def add(self, amount: int, where: str) -> None:
        self.total += amount
        if self.total > self._cap:
            raise _LimitError(f"{where}: {self.total} {self._what}, more than the {self._cap} "
                              f"allowed (TemplateLimits.{self._limit})")


class _CheckedCodeGenerator(CodeGenerator):
    """Compiles ``a ~ b`` to the sandbox's size-checked concatenation, and the
    iterable of every ``{% for %}`` through the sandbox's iteration count."""

    _loop_iterables: frozenset[int] = frozenset()

    def visit_Concat(self, node: Concat, frame: Frame) -> None:
        self.write("environment.checked_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def visit_List(self, node: List, frame: Frame) -> None:
        self._built(super().visit_List, node, frame)

    def visit_Dict(self, node: Dict, frame: Frame) -> None:
        self._built(super().visit_Dict, node, frame)

    def visit_Tuple(self, node: Tuple, frame: Frame) -> None:
        if node.ctx != "load":  # an assignment target
            super().visit_Tuple(node, frame)
        else:
            self._built(super().visit_Tuple, node, frame)

    def _built(self, visit: Callable[[Any, Frame], None], node: Node, frame: Frame) -> None:
        """A list, tuple or dict display, counted as it is built."""
        self.write("environment.built(")
        visit(node, frame)
        self.write(")")

    def visit_For(self, node: For, frame: Frame) -> None:
        self._loop_iterables = self._loop_iterables | {id(node.iter)}
        super().visit_For(node, frame)

    def visit(self, node: Node, *args: Any, **kwargs: Any) -> Any:
        if id(node) not in self._loop_iterables:
            return super().visit(node, *args, **kwargs)
        self.write("environment.counted_loop(")
        result = super().visit(node, *args, **kwargs)
        self.write(")")
        return result


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with size checks, a capped ``range`` and
    loading from the image only."""

    intercepted_binops = frozenset({"*", "**", "+", "-", "%", "//"})
    code_generator_class = _CheckedCodeGenerator

    def __init__(self, limits: TemplateLimits, loader: BaseLoader) -> None:
        super().__init__(loader=loader, undefined=StrictUndefined, autoescape=False,
                         keep_trailing_newline=True, auto_reload=False,
                         finalize=self._finalize)
        self.limits = limits
        #: ``{% for %}`` iterations so far in this render (every template of it)
        self.iterations = _Meter(limits.max_iterations, "max_iterations",
                                 "iterations of the loops in this render")
        #: bytes built so far in this render
        self.built_bytes = _Meter(limits.max_built_bytes, "max_built_bytes",
                                  "bytes of strings, lists and dicts built in this render")
        for name in _REMOVED_GLOBALS:
            self.globals.pop(name, None)
        self.globals["range"] = self._range
        self._wrap_filters()

    # -- checks ------------------------------------------------------------

    def _check_size(self, size: int, what: str) -> None:
        cap = self.limits.max_output_bytes
        if size > cap:
            raise _LimitError(f"{what} would produce {size} characters or items, more than "
                              f"the {cap} allowed (TemplateLimits.max_output_bytes)")

    def _check_value(self, value: Any, what: str) -> None:
        self._check_size(_estimate(value, self.limits.max_output_bytes), what)

    def _check_result(self, value: Any, what: str) -> None:
        """Check what an operator, filter or call returned: an integer's bits,
        a string's, sequence's or mapping's size; count what it built."""
        if isinstance(value, bool):
            return
        if isinstance(value, int):
            self._check_bits(value, what)
        elif isinstance(value, _BUILT_TYPES):
            # its length, not its content's: a list of references to one long
            # string costs little until it is printed, and printing is checked
            self._check_size(len(value), what)
            self._count_built(value, what)

    def _count_built(self, value: Any, what: str) -> None:
        self.built_bytes.add(sys.getsizeof(value), what)

    def built(self, value: Any) -> Any:
        """A list, tuple or dict display of the template, counted."""
        self._count_built(value, "a list or dict")
        return value

    def getitem(self, obj: Any, argument: Any) -> Any:
        """Subscripts; a slice (``s[1:]``) builds a new value, which is counted."""
        result = super().getitem(obj, argument)
        if isinstance(argument, slice) and isinstance(result, _BUILT_TYPES):
            self._count_built(result, "a slice")
        return result

    def _check_bits(self, value: int, what: str) -> None:
        cap = self.limits.max_int_bits
        if value.bit_length() > cap:
            raise _LimitError(f"{what} gives an integer of {value.bit_length()} bits, more "
                              f"than the {cap} allowed (TemplateLimits.max_int_bits)")

    def counted_loop(self, iterable: Any) -> Any:
        """The iterable of a ``{% for %}``, its iterations counted against
        :attr:`TemplateLimits.max_iterations`: all at once when it has a
        length, one by one when it is a generator."""
        if isinstance(iterable, Sized):
            self.iterations.add(len(iterable), "a {% for %} loop")
            return iterable
        return self._counting(iter(iterable))

    def _counting(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for item in iterator:
            self.iterations.add(1, "a {% for %} loop")
            yield item

    def _metered(self, iterator: Iterator[Any], what: str) -> Iterator[Any]:
        """A generator's items, their sizes added up as they are consumed and
        checked against :attr:`TemplateLimits.max_output_bytes` (the size of a
        generator is unknown until it has run)."""
        budget = self.limits.max_output_bytes
        total = 0
        for item in iterator:
            total += _estimate(item, budget) + 2
            self._check_size(total, what)
            yield item

    def concat(self, values: Iterable[Any]) -> str:
        """Joins the output of a macro, a ``{% set %}`` or ``{% filter %}``
        block and a ``caller()``, its size checked first."""
        items = values if isinstance(values, list) else list(values)
        budget = self.limits.max_output_bytes
        total = 0
        for item in items:
            total += _estimate(item, budget)
            self._check_size(total, "a macro's or block's output")
        result = "".join(items)
        self._count_built(result, "a macro's or block's output")
        return result

    def _check_count(self, count: Any, what: str) -> None:
        if isinstance(count, int) and count > self.limits.max_range:
            raise _LimitError(f"{what} of {count} is more than the {self.limits.max_range} "
                              "allowed (TemplateLimits.max_range)")

    def _check_printf(self, fmt: str, args: Any) -> None:
        conversions = 0
        for match in _WIDTH.finditer(fmt):
            conversions += 1
            for number in match.groups():
                if number == "*":
                    raise _LimitError("'*' widths are not allowed in % formatting")
                if number is not None:
                    self._check_size(int(number), "a % format width")
        if isinstance(args, Mapping):  # '%(a)s%(a)s' may print one value many times
            values: Iterable[Any] = args.values()
        elif isinstance(args, tuple):
            values = args
        else:
            values = (args,)
        self._check_size(len(fmt) + self._largest(values) * conversions, "% formatting")

    def _largest(self, values: Iterable[Any]) -> int:
        """The estimated size of the largest of ``values``."""
        budget = self.limits.max_output_bytes
        return max((_estimate(value, budget) for value in values), default=0)

    def _check_format(self, fmt: str, args: Iterable[Any]) -> None:
        try:
            fields = list(string.Formatter().parse(fmt))
        except ValueError:
            return  # str.format reports the error itself
        replaced = 0
        for _, name, spec, _ in fields:
            if spec and "{" in spec:
                raise _LimitError("nested replacement fields are not allowed in format specs")
            for number in _NUMBER.findall(spec or ""):
                self._check_size(int(number), "a format width")
            replaced += name is not None
        # '{0}{0}{0}' prints one argument as many times as it is named
        self._check_size(len(fmt) + self._largest(args) * replaced, "str.format")

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        """Check ``*``, ``**``, ``+``, ``-``, ``%``, ``//`` before they run
        (integer operands, result sizes), and what they return."""
        sequence = (str, bytes, list, tuple)
        for operand in (left, right):
            if isinstance(operand, int):
                self._check_bits(operand, f"an operand of '{operator}'")
        if operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > self.limits.max_int_bits:
                    raise _LimitError(f"integer product larger than "
                                      f"{self.limits.max_int_bits} bits")
            elif isinstance(left, sequence) and isinstance(right, int):
                self._check_size(len(left) * right, "'*'")
            elif isinstance(right, sequence) and isinstance(left, int):
                self._check_size(len(right) * left, "'*'")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 \
                    and abs(left) > 1 and left.bit_length() * right > self.limits.max_int_bits:
                raise _LimitError(f"'**' result larger than {self.limits.max_int_bits} bits")
        elif operator == "+":
            if isinstance(left, sequence) and isinstance(right, sequence):
                self._check_size(len(left) + len(right), "'+'")
        elif operator == "%" and isinstance(left, str):
            self._check_printf(left, right)
        result = super().call_binop(context, operator, left, right)
        self._check_result(result, f"'{operator}'")
        return result

    def checked_concat(self, values: Iterable[Any]) -> str:
        """The ``~`` operator, with its size checked first."""
        items = list(values)
        total = 0
        for item in items:
            total += _estimate(item, self.limits.max_output_bytes)
            self._check_size(total, "'~'")
        result = "".join(str(item) for item in items)
        self._count_built(result, "'~'")
        return result

    def _finalize(self, value: Any) -> Any:
        if not isinstance(value, str):  # str() will build its text
            self._check_value(value, "printing a value")
            self.built_bytes.add(_estimate(value, self.limits.max_output_bytes),
                                 "printing a value")
        return value

    def _range(self, *args: int) -> range:
        result = range(*args)
        if len(result) > self.limits.max_range:
            raise _LimitError(f"range() of {len(result)} items is more than the "
                              f"{self.limits.max_range} allowed (TemplateLimits.max_range)")
        return result

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        """Check the string methods that can grow a string, and every size-like
        argument of a built-in type's method (``(1).to_bytes(10**9)``), before
        calling; check what the call returned."""
        owner = getattr(obj, "__self__", None)
        name = getattr(obj, "__name__", "")
        if isinstance(owner, (str, bytes)):
            self._check_string_method(owner, name, args)
        if isinstance(owner, _BUILTIN_TYPES):
            for arg in (*args, *kwargs.values()):
                if isinstance(arg, int) and abs(arg) > self.limits.max_output_bytes:
                    self._check_size(abs(arg), f"{type(owner).__name__}.{name}({arg})")
        result = super().call(context, obj, *args, **kwargs)
        what = f"{name or 'the call'}()"
        self._check_result(result, what)
        if isinstance(owner, (str, bytes)) and isinstance(result, (list, tuple)):
            # str.split() and its kind build each item anew: a million of them
            self.built_bytes.add(sum(map(sys.getsizeof, result)), what)
        return result

    def _check_string_method(self, owner: str | bytes, name: str, args: tuple[Any, ...]) -> None:
        if name in ("center", "ljust", "rjust", "zfill") and args:
            if isinstance(args[0], int):
                self._check_size(args[0], f"str.{name}()")
        elif name == "expandtabs":
            tab = args[0] if args and isinstance(args[0], int) else 8
            self._check_size(len(owner) * max(tab, 1), "str.expandtabs()")
        elif name == "replace" and len(args) >= 2:
            old, new = args[0], args[1]
            if isinstance(old, (str, bytes)) and isinstance(new, (str, bytes)):
                hits = len(owner) + 1 if not old else owner.count(old)  # type: ignore[arg-type]
                self._check_size(len(owner) + hits * len(new), "str.replace()")
        elif name == "join" and args:
            items = args[0]
            if isinstance(items, (list, tuple)):
                total = sum(_estimate(item, self.limits.max_output_bytes) for item in items)
                self._check_size(total + len(owner) * len(items), "str.join()")
            else:
                raise _LimitError("str.join() needs a list or tuple here")
        elif name in ("translate", "maketrans"):
            raise SecurityError(f"str.{name}() is not available in templates")

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """Sandboxed ``str.format``/``format_map`` with sizes checked first."""
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt = value.__self__
        checked = wrapper

        def format_checked(*args: Any, **kwargs: Any) -> str:
            values: list[Any] = list(args) + list(kwargs.values())
            if value.__name__ == "format_map" and args and isinstance(args[0], Mapping):
                values = list(args[0].values())
            self._check_format(fmt, values)
            return checked(*args, **kwargs)

        return format_checked

    # -- filters -----------------------------------------------------------

    def _wrap_filters(self) -> None:
        for name, function in list(self.filters.items()):
            self.filters[name] = self._checked_filter(name, function)

    def _checked_filter(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap a filter: its input and its size-like arguments are checked
        before it runs. The wrapper keeps Jinja's ``pass_*`` marker."""
        sandbox = self

        def check(value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            sandbox._check_value(value, f"the {name} filter's input")
            if name == "center":
                sandbox._check_size(_int_arg(args, kwargs, 0, "width", 80), "the center filter")
            elif name == "indent":
                width = _arg(args, kwargs, 0, "width", 4)
                per_line = width if isinstance(width, int) else len(str(width))
                lines = str(value).count("\n") + 1 if isinstance(value, str) else 1
                sandbox._check_size(_estimate(value, sandbox.limits.max_output_bytes)
                                    + lines * per_line, "the indent filter")
            elif name == "wordwrap":
                wrap = _arg(args, kwargs, 2, "wrapstring", None) or "\n"
                size = _estimate(value, sandbox.limits.max_output_bytes)
                sandbox._check_size(size * (len(str(wrap)) + 1), "the wordwrap filter")
            elif name in ("batch", "slice"):
                sandbox._check_count(_int_arg(args, kwargs, 0, "linecount" if name == "batch"
                                              else "slices", 0), f"the {name} filter count")
            elif name == "format":
                if isinstance(value, str):
                    sandbox._check_printf(value, (args, kwargs))
            elif name == "replace":
                old, new = _arg(args, kwargs, 0, "old", ""), _arg(args, kwargs, 1, "new", "")
                text = str(value)
                hits = len(text) + 1 if not old else text.count(str(old))
                sandbox._check_size(len(text) + hits * len(str(new)), "the replace filter")
            elif name == "join":
                separator = str(_arg(args, kwargs, 0, "d", ""))
                items = list(value) if isinstance(value, (list, tuple)) else []
                total = 0
                for item in items:
                    total += _estimate(item, sandbox.limits.max_output_bytes) + len(separator)
                    sandbox._check_size(total, "the join filter")
            elif name == "tojson":
                indent = _arg(args, kwargs, 0, "indent", None)
                if isinstance(indent, int):
                    depth = _estimate(value, sandbox.limits.max_output_bytes)
                    sandbox._check_size(indent * depth, "the tojson filter")
            elif name == "sum" and isinstance(value, (list, tuple)):
                total = 0
                for item in value:
                    if isinstance(item, (list, tuple, str)):
                        total += len(item)
                        sandbox._check_size(total, "the sum filter")

        what = f"the {name} filter"

        def metered(value: Any) -> Any:
            if isinstance(value, Iterator):
                return sandbox._metered(value, f"{what}'s input")
            return value

        marker = getattr(function, "jinja_pass_arg", None)
        if marker is None:
            def plain(value: Any, *args: Any, **kwargs: Any) -> Any:
                value = metered(value)
                check(value, args, kwargs)
                result = function(value, *args, **kwargs)
                sandbox._check_result(result, what)
                return result
            return plain

        def passing(first: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
            value = metered(value)
            check(value, args, kwargs)
            result = function(first, value, *args, **kwargs)
            sandbox._check_result(result, what)
            return result

        passing.jinja_pass_arg = marker  # type: ignore[attr-defined]
        return passing


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str,
         default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _int_arg(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, name: str,
             default: int) -> int:
    value = _arg(args, kwargs, index, name, default)
    return value if isinstance(value, int) else default


# -- loading from the image --------------------------------------------------


def _decode(data: bytes, path: str) -> str:
    if b"\x00" in data:
        raise TemplateError("binary file (it contains NUL bytes): a template must be text",
                            path)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise TemplateError(f"not UTF-8 text (byte {exc.start}): a template must be text",
                            path, line) from None


def _clean(path: str) -> str:
    return "/" + posixpath.normpath("/" + path).lstrip("/")


class _TreeLoader(BaseLoader):
    """Loads templates from the image's tree and nowhere else."""

    def __init__(self, tree: RootTree, limits: TemplateLimits) -> None:
        self._tree = tree
        self._limits = limits

    def get_source(self, environment: Environment,
                   template: str) -> tuple[str, str, Callable[[], bool]]:
        path = _clean(template)
        entry = self._tree.resolve(path)
        if entry is None or not entry.is_regular:
            raise TemplateNotFound(path)
        if entry.inode.size > self._limits.max_source_bytes:
            raise TemplateError(f"{entry.inode.size} bytes, more than the "
                                f"{self._limits.max_source_bytes} allowed "
                                "(TemplateLimits.max_source_bytes)", path)
        text = _decode(self._tree.read_bytes(entry.path), path)
        return text, _FILENAME_PREFIX + path, lambda: True


class _ImageEnvironment(_Sandbox):
    """Resolves relative include names from the including template's directory."""

    def join_path(self, template: str, parent: str) -> str:
        if template.startswith("/"):
            return _clean(template)
        return _clean(posixpath.join(posixpath.dirname(_clean(parent)), template))


# -- the watchdog ------------------------------------------------------------


class _Watchdog:
    """Raises :class:`_RenderTimeout` in the current thread after ``seconds``.

    CPython delivers it between bytecodes, so a template stuck in a loop stops;
    every single operation that could run long in C is bounded by the size
    checks. On exit a still-pending timeout is withdrawn.
    """

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._thread = threading.get_ident()
        self._lock = threading.Lock()
        self._active = False
        self._timer: threading.Timer | None = None

    def _fire(self) -> None:
        with self._lock:
            if self._active:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(self._thread), ctypes.py_object(_RenderTimeout))

    def __enter__(self) -> Self:
        if self._seconds > 0 and hasattr(ctypes, "pythonapi"):
            self._active = True
            self._timer = threading.Timer(self._seconds, self._fire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._timer is None:
            return
        self._timer.cancel()
        with self._lock:
            self._active = False
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._thread), None)


# -- rendering ---------------------------------------------------------------


def _location(exc: BaseException, default: str) -> tuple[str, int | None]:
    """The innermost template frame of a Jinja traceback: (path, line)."""
    path, line = default, None
    if isinstance(exc, TemplateSyntaxError):
        name = exc.filename or exc.name or ""
        if name.startswith(_FILENAME_PREFIX):
            return name[len(_FILENAME_PREFIX):], exc.lineno
        return default, exc.lineno
    tb = exc.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename.startswith(_FILENAME_PREFIX):
            path, line = filename[len(_FILENAME_PREFIX):], tb.tb_lineno
        tb = tb.tb_next
    return path, line


def _suspended_at(stream: Iterator[str], default: str) -> tuple[str, int | None]:
    """Where a template's output generator stands: (path, line) of the
    innermost template (an include's) that yielded the last chunk."""
    path, line = default, None
    generator: Any = stream
    while generator is not None:
        frame = getattr(generator, "gi_frame", None)
        if frame is not None and frame.f_code.co_filename.startswith(_FILENAME_PREFIX):
            template = frame.f_globals.get("__jinja_template__")
            if template is not None:
                path = frame.f_code.co_filename[len(_FILENAME_PREFIX):]
                line = template.get_corresponding_lineno(frame.f_lineno)
        generator = getattr(generator, "gi_yieldfrom", None)
    return path, line


def _describe(exc: BaseException, limits: TemplateLimits) -> str:
    if isinstance(exc, _RenderTimeout):
        return _timed_out(limits)
    if isinstance(exc, TemplateNotFound):
        return f"include or import of {exc.name!r}, which is not a regular file in the image"
    if isinstance(exc, TemplateSyntaxError):
        return f"syntax error: {exc.message}"
    if isinstance(exc, SecurityError):
        return f"blocked by the sandbox: {exc}"
    if isinstance(exc, UndefinedError):
        return f"undefined: {exc.message}"
    if isinstance(exc, _LimitError):
        return str(exc)
    if isinstance(exc, RecursionError):
        return "recursion too deep"
    if isinstance(exc, MemoryError):
        return _out_of_memory(limits)
    return f"{type(exc).__name__}: {exc}"


def _out_of_memory(limits: TemplateLimits) -> str:
    if limits.isolate and limits.max_memory_bytes:
        return (f"rendering needs more than the {limits.max_memory_bytes} bytes of memory "
                "allowed (TemplateLimits.max_memory_bytes)")
    return "rendering ran out of memory"


def _timed_out(limits: TemplateLimits) -> str:
    return f"rendering took longer than {limits.timeout:g} s (TemplateLimits.timeout)"


def _render_jinja(env: _ImageEnvironment, path: str, context: Mapping[str, Any],
                  limits: TemplateLimits) -> str:
    chunks: list[str] = []
    size = 0
    try:
        template = env.get_template(path)
        stream = template.generate(dict(context))
        for chunk in stream:
            size += len(chunk)
            if size > limits.max_output_bytes:
                where, line = _suspended_at(stream, path)
                raise TemplateError(f"the output exceeds {limits.max_output_bytes} characters "
                                    "(TemplateLimits.max_output_bytes)", where, line)
            chunks.append(chunk)
    except TemplateError as exc:
        raise exc from None
    except Exception as exc:  # noqa: BLE001 - any failure is the template's
        where, line = _location(exc, path)
        message = _describe(exc, limits)
        if len(message) > _MAX_MESSAGE:  # it may quote a template's value: a 4 MB key
            message = message[:_MAX_MESSAGE] + "..."
        raise TemplateError(message, where, line) from None
    return "".join(chunks)


def _render_dotcloud(env: _ImageEnvironment, path: str, text: str,
                     context: Mapping[str, Any], limits: TemplateLimits) -> str:
    out: list[str] = []
    position = 0
    size = 0
    for match in _DOTCLOUD_TAG.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        out.append(text[position:match.start()])
        position = match.end()
        name = match.group(1).strip()
        if not _DOTTED.match(name):
            raise TemplateError(f"<%= {name} %>: only dotted names (args.hostname) may be "
                                "substituted in the dotcloud syntax", path, line)
        parts = name.split(".")
        if parts[0] not in context:
            raise TemplateError(f"undefined: {parts[0]!r} is undefined", path, line)
        value: Any = context[parts[0]]
        for depth, part in enumerate(parts[1:], start=1):
            if part.startswith("_"):
                raise TemplateError(f"blocked by the sandbox: {part!r} in {name!r}", path, line)
            if part.isdigit() and isinstance(value, (list, tuple)):
                value = env.getitem(value, int(part))
            else:
                value = env.getattr(value, part)
            if isinstance(value, Undefined):
                where = ".".join(parts[:depth])
                raise TemplateError(f"undefined: {where!r} has no {part!r}", path, line)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            kind = "null" if value is None else type(value).__name__
            raise TemplateError(f"<%= {name} %> is a {kind}, not a string or number", path,
                                line)
        rendered = str(value)
        out.append(rendered)
        if not match.group(2):
            out.append(match.group(3))
        size += len(rendered)
        if size + position > limits.max_output_bytes:
            raise TemplateError(f"the output exceeds {limits.max_output_bytes} characters "
                                "(TemplateLimits.max_output_bytes)", path, line)
    rest = text[position:]
    if "<%=" in rest:
        line = text.count("\n", 0, position + rest.index("<%=")) + 1
        raise TemplateError("'<%=' without its closing '%>'", path, line)
    out.append(rest)
    return "".join(out)


def template_context(manifest: Manifest, config: RenderConfig, *,
                     mirror: Callable[[str], str] | None = None) -> dict[str, Any]:
    """The variables a template sees.

    :returns: ``args``, ``hostname``, ``ip`` (``{"interfaces": [...]}``),
        ``dns`` (``nameservers``, ``search``), ``ssh_authorized_keys``,
        ``image`` (``name``, ``version``, ``digest``) and ``mirror(url)``.
    """
    rewrite = mirror or (lambda url: url)

    def mirror_url(url: str) -> str:
        """Rewrite a URL to the provider's mirror (identity without one)."""
        if not isinstance(url, str):
            raise TypeError("mirror() takes a URL string")
        return str(rewrite(url))

    return {
        "args": config.args,
        "hostname": config.hostname,
        "ip": {"interfaces": config.interfaces},
        "dns": config.dns,
        "ssh_authorized_keys": config.ssh_authorized_keys,
        "image": {"name": manifest.name, "version": manifest.version,
                  "digest": manifest.digest},
        "mirror": mirror_url,
    }


def render_template(tree: RootTree, path: str, context: Mapping[str, Any], *,
                    syntax: str = "jinja2", limits: TemplateLimits | None = None) -> bytes:
    """Render one file of the tree (a render of its own, within the limits).

    :param tree: the image's file tree; the template and whatever it includes
        are read from it.
    :param path: absolute path of the template inside the image.
    :param context: the variables (see :func:`template_context`).
    :param syntax: ``"jinja2"`` or ``"dotcloud"``.
    :param limits: the limits; :class:`TemplateLimits` defaults.
    :returns: the rendered content, UTF-8.
    :raises TemplateError: naming the file and line: the file is missing, not a
        regular file, binary, too large, malformed, uses an undefined name,
        trips the sandbox or a limit.
    """
    return _render(tree, [path], context, syntax, limits or TemplateLimits())[_clean(path)]


def render_templates(tree: RootTree, manifest: Manifest, config: RenderConfig, *,
                     mirror: Callable[[str], str] | None = None,
                     limits: TemplateLimits | None = None) -> dict[str, bytes]:
    """Render every file the manifest lists under ``templates``, as one render
    (the limits hold for all of them together; with
    :attr:`TemplateLimits.isolate`, in one child process).

    Pass the result to :meth:`RootTree.write_tar
    <cloudlets.rootfs.RootTree.write_tar>` as ``replacements``: each file keeps
    its mode, owner and hardlinks.

    :param tree: the image's file tree.
    :param manifest: lists the templates and chooses the syntax.
    :param config: the render configuration (the template variables).
    :param mirror: rewrites a URL to the provider's mirror; identity by default.
    :param limits: the limits; :class:`TemplateLimits` defaults.
    :returns: absolute path inside the image → rendered bytes.
    :raises TemplateError: for the first template that fails, naming it and
        the line.
    """
    if not manifest.templates:
        return {}
    context = template_context(manifest, config, mirror=mirror)
    return _render(tree, list(manifest.templates), context, manifest.template_syntax,
                   limits or TemplateLimits())


def _render(tree: RootTree, paths: Sequence[str], context: Mapping[str, Any], syntax: str,
            limits: TemplateLimits) -> dict[str, bytes]:
    if limits.isolate and hasattr(os, "fork"):
        return _render_in_child(tree, paths, context, syntax, limits)
    return _render_here(tree, paths, context, syntax, limits)


def _render_here(tree: RootTree, paths: Sequence[str], context: Mapping[str, Any], syntax: str,
                 limits: TemplateLimits,
                 started: Callable[[str], None] | None = None) -> dict[str, bytes]:
    """One render in this process: the templates in order, one environment
    (so one iteration and one built-bytes count), one watchdog for them all."""
    env = _ImageEnvironment(limits, _TreeLoader(tree, limits))
    rendered: dict[str, bytes] = {}
    total = 0
    current = _clean(paths[0]) if paths else "/"
    try:
        with _Watchdog(limits.timeout):
            for path in paths:
                current = _clean(path)
                if started is not None:
                    started(current)
                data = _render_file(env, tree, current, context, syntax, limits)
                total += len(data)
                if total > limits.max_render_bytes:
                    raise TemplateError(f"the templates' output exceeds {limits.max_render_bytes} "
                                        "bytes in all (TemplateLimits.max_render_bytes)", current)
                rendered[current] = data
    except _RenderTimeout:  # between two templates, or in reading one from the tree
        raise TemplateError(_timed_out(limits), current) from None
    except MemoryError:
        raise TemplateError(_out_of_memory(limits), current) from None
    return rendered


def _render_file(env: _ImageEnvironment, tree: RootTree, path: str, context: Mapping[str, Any],
                 syntax: str, limits: TemplateLimits) -> bytes:
    entry = tree.get(path)
    if entry is None:
        raise TemplateError("listed as a template but not in the root filesystem "
                            "(or left out as volatile)", path)
    if not entry.is_regular:
        raise TemplateError(f"listed as a template but it is a {entry.inode.type.value}, "
                            "not a regular file", path)
    if entry.inode.size > limits.max_source_bytes:
        raise TemplateError(f"{entry.inode.size} bytes, more than the "
                            f"{limits.max_source_bytes} allowed "
                            "(TemplateLimits.max_source_bytes)", path)
    if syntax == "dotcloud":
        text = _decode(tree.read_bytes(path), path)
        rendered = _render_dotcloud(env, path, text, context, limits)
    elif syntax == "jinja2":  # the loader reads it (from the cached base: a debugfs run)
        rendered = _render_jinja(env, path, context, limits)
    else:
        raise TemplateError(f"unknown template syntax {syntax!r} (jinja2, dotcloud)", path)
    return rendered.encode("utf-8")


# -- the rendering child process ------------------------------------------------

#: Seconds past TemplateLimits.timeout after which the child is killed: the
#: watchdog had its chance to stop it with a line number.
_GRACE = 0.5
#: Signals the child takes back to their default action: it must never run
#: the parent's handlers (a CLI's clean-up on SIGTERM, say).
_CHILD_SIGNALS = frozenset(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP",
                                                               "SIGALRM")
                           if hasattr(signal, name))
#: How a child stopped at the hard deadline ends: the timer, RLIMIT_CPU, our kill.
_DEADLINE_SIGNALS = frozenset(getattr(signal, name) for name in ("SIGALRM", "SIGXCPU", "SIGKILL")
                              if hasattr(signal, name))
_FRAME = struct.Struct(">cI")
#: What a child's report may hold beyond the rendered bytes (paths, framing).
_REPORT_SLACK = 1024 * 1024
#: Exit status of a child that failed outside any template (its report lost).
_CHILD_FAILED = 70


def _render_in_child(tree: RootTree, paths: Sequence[str], context: Mapping[str, Any],
                     syntax: str, limits: TemplateLimits) -> dict[str, bytes]:
    """One render in a forked child process, confined by :func:`_confine`.

    The child inherits the tree and the context (no copy, no pickling), and
    sends back, through a pipe: the path of each template as it starts, then
    each rendered file, or the :class:`TemplateError`. The parent reads until
    the hard deadline, kills the child if it is still there, and always reaps
    it, whatever happens (an exception, a signal) in the parent meanwhile.
    """
    import resource  # noqa: F401 - here, so that the child does not spend time importing it

    read_fd, write_fd = os.pipe()
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, _CHILD_SIGNALS)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(read_fd)
        os.close(write_fd)
        raise
    if pid == 0:  # pragma: no cover - the child, measured through its report
        _child(read_fd, write_fd, mask, tree, paths, context, syntax, limits)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.close(write_fd)
    child = _Child(pid, limits)
    try:
        child.read(read_fd)
    finally:
        os.close(read_fd)
        child.reap()
    return child.result()


def _child(read_fd: int, write_fd: int, mask: Iterable[int], tree: RootTree,
           paths: Sequence[str], context: Mapping[str, Any], syntax: str,
           limits: TemplateLimits) -> NoReturn:  # pragma: no cover - runs in the child
    status = _CHILD_FAILED
    try:
        os.close(read_fd)
        for number in _CHILD_SIGNALS:
            signal.signal(number, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        _confine(limits)

        def send(kind: bytes, payload: bytes) -> None:
            data = _FRAME.pack(kind, len(payload)) + payload
            view = memoryview(data)
            while view:
                view = view[os.write(write_fd, view):]

        try:
            rendered = _render_here(tree, paths, context, syntax, limits,
                                    started=lambda path: send(b"S", path.encode()))
        except TemplateError as exc:
            send(b"E", json.dumps([str(exc), exc.path, exc.line]).encode())
        else:
            for path, data in rendered.items():
                send(b"F", path.encode() + b"\0" + data)
            send(b"D", b"")
        status = 0
    finally:
        os._exit(status)


def _confine(limits: TemplateLimits) -> None:  # pragma: no cover - runs in the child
    """Put the rendering child under its hard limits: address space, CPU
    time, a timer signal that kills it at the hard deadline, no core dump."""
    import resource  # POSIX only, as os.fork is; imported by render_templates already

    gc.freeze()  # the inherited objects: never walked (nor copied) by the child's GC
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if limits.max_memory_bytes:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = _address_space() + limits.max_memory_bytes
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    if limits.timeout > 0:
        seconds = limits.timeout + _GRACE
        cpu = math.ceil(seconds)
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        if hard == resource.RLIM_INFINITY or hard > cpu:
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        signal.setitimer(signal.ITIMER_REAL, seconds)  # SIGALRM, default action: die


def _address_space() -> int:  # pragma: no cover - runs in the child
    """The process's virtual size in bytes (Linux; 0 where unknown, which makes
    the limit absolute)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def _reap(pid: int, deadline: float | None) -> int | None:
    """Wait for a child, until ``deadline`` (then kill it); without one, kill
    it at once. Returns its wait status (``None`` if someone else, say a
    ``SIGCHLD`` handler waiting for any child, reaped it first)."""
    try:
        if deadline is not None:
            delay = 0.0005
            while time.monotonic() < deadline:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    return status
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        return os.waitpid(pid, 0)[1]
    except ChildProcessError:
        return None


class _Child:
    """The parent's side of one rendering child: its report and its end."""

    def __init__(self, pid: int, limits: TemplateLimits) -> None:
        self.pid = pid
        self.limits = limits
        self.deadline = (time.monotonic() + limits.timeout + 2 * _GRACE
                         if limits.timeout > 0 else None)
        self.current = "/"  # the template being rendered, as last reported
        self.files: dict[str, bytes] = {}
        self.error: TemplateError | None = None
        self.done = False
        self.status: int | None = None
        self.timed_out = False
        self.overflow = False

    def read(self, fd: int) -> None:
        """Read the child's frames until its last one, the end of the pipe or
        the deadline. (Not the end of the pipe alone: a child forked meanwhile
        by another thread holds this pipe open too, until it ends.)"""
        buffer = bytearray()
        left_to_read = self.limits.max_render_bytes + _REPORT_SLACK
        while not self.done and self.error is None:
            if self.deadline is not None:
                left = self.deadline - time.monotonic()
                if left <= 0 or not select.select([fd], [], [], left)[0]:
                    self.timed_out = True
                    return
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return
            buffer += chunk
            left_to_read -= len(chunk)
            if left_to_read < 0:  # a child gone wrong: it cannot send more than this
                self.overflow = True
                return
            while len(buffer) >= _FRAME.size:
                kind, size = _FRAME.unpack_from(buffer)
                if len(buffer) < _FRAME.size + size:
                    break
                payload = bytes(buffer[_FRAME.size:_FRAME.size + size])
                del buffer[:_FRAME.size + size]
                self._frame(kind, payload)

    def _frame(self, kind: bytes, payload: bytes) -> None:
        if kind == b"S":
            self.current = payload.decode()
        elif kind == b"F":
            path, _, data = payload.partition(b"\0")
            self.files[path.decode()] = data
        elif kind == b"E":
            message, path, line = json.loads(payload)
            prefix = str(TemplateError("", path, line))
            if message.startswith(prefix):
                message = message[len(prefix):]
            self.error = TemplateError(message, path, line)
        elif kind == b"D":
            self.done = True

    def reap(self) -> None:
        """Kill the child unless it has reported, and wait for it (no zombie).

        A child that has reported is exiting: tearing down its address space
        takes milliseconds (more for a large parent), which the render does
        not wait for; a thread reaps it, and kills it if it has not exited by
        the deadline."""
        if self.done or self.error is not None:
            self.status = 0 if self.done else 1
            threading.Thread(target=_reap, args=(self.pid, self.deadline), daemon=True,
                             name=f"cloudlets-reap-{self.pid}").start()
            return
        self.status = _reap(self.pid, None)


    def result(self) -> dict[str, bytes]:
        """The rendered files, or the :class:`TemplateError` that says why not."""
        if self.error is not None:
            raise self.error
        if self.done and self.status == 0:
            return self.files
        raise TemplateError(self._why(), self.current)

    def _why(self) -> str:
        status = self.status or 0
        stopped = os.WIFSIGNALED(status) and os.WTERMSIG(status) in _DEADLINE_SIGNALS
        if self.timed_out or stopped:
            return _timed_out(self.limits) + ", stopped in C code (line unknown)"
        if self.overflow:
            return "the rendering process sent more than the render's output limit"
        if os.WIFSIGNALED(status):
            return f"the rendering process died of signal {os.WTERMSIG(status)}"
        return (f"the rendering process ended (exit status {os.WEXITSTATUS(status)}) "
                "without a report")
