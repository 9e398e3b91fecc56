"""Progress reporting: a callback protocol and a terminal progress bar.

Long stages (downloading a tarball, re-hashing a cached one) report progress
through a plain callable ``progress(stage, done, total)``:

- ``stage`` names what is happening (:data:`STAGE_FETCH`, :data:`STAGE_VERIFY`);
- ``done`` counts the bytes handled so far in this stage; it may go back to 0
  when a download restarts from the beginning;
- ``total`` is the expected number of bytes, or ``None`` when unknown.

The library never prints: the CLI passes a :class:`TerminalProgress`, which
draws a bar on a terminal and stays silent when its stream is not a TTY.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Protocol, TextIO

__all__ = [
    "STAGE_FETCH",
    "STAGE_VERIFY",
    "ProgressCallback",
    "JsonProgress",
    "TerminalProgress",
    "format_bytes",
    "null_progress",
    "terminal_progress",
]

#: Stage name while bytes arrive from a URL, a ``file://`` URL or a local path.
STAGE_FETCH = "fetch"
#: Stage name while a cached tarball is re-hashed before use.
STAGE_VERIFY = "verify"


class ProgressCallback(Protocol):
    """What a progress callback looks like."""

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        """Report that ``done`` of ``total`` bytes of ``stage`` are handled.

        :param stage: the stage name (:data:`STAGE_FETCH`, :data:`STAGE_VERIFY`).
        :param done: bytes handled so far in this stage.
        :param total: bytes expected, or ``None`` when unknown.
        """


def null_progress(stage: str, done: int, total: int | None) -> None:
    """A progress callback that ignores every report."""


def format_bytes(count: float) -> str:
    """:returns: ``count`` bytes in binary units, e.g. ``"1.5 GiB"``.

    >>> format_bytes(1536)
    '1.5 KiB'
    """
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


class TerminalProgress:
    """A progress callback that draws a one-line bar on a terminal.

    When ``stream`` is not a TTY (a pipe, a log file, CI), nothing is written
    at all, so machine-readable output stays clean.

    :param stream: where to draw; ``sys.stderr`` by default.
    :param min_interval: least number of seconds between two redraws.
    :param width: width of the bar itself, in characters.
    :param enabled: force drawing on (``True``) or off (``False``); by
        default, draw only when ``stream.isatty()``.
    """

    def __init__(self, stream: TextIO | None = None, *, min_interval: float = 0.1,
                 width: int = 30, enabled: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = bool(isatty and isatty())
        self.enabled = enabled
        self.min_interval = min_interval
        self.width = width
        self._stage: str | None = None
        self._last_draw = -math.inf
        self._started = 0.0
        self._line_open = False

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        """Draw (or skip drawing) the bar for this report."""
        if not self.enabled:
            return
        now = time.monotonic()
        if stage != self._stage:
            self._finish_line()
            self._stage = stage
            self._started = now
            self._last_draw = -math.inf
        finished = total is not None and done >= total
        if not finished and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        self.stream.write("\r" + self.render_line(stage, done, total, now - self._started))
        self.stream.flush()
        self._line_open = True
        if finished:
            self._finish_line()
            self._stage = None

    def render_line(self, stage: str, done: int, total: int | None, elapsed: float) -> str:
        """:returns: the text of the bar (without carriage return).

        :param stage: the stage name, shown first.
        :param done: bytes handled.
        :param total: bytes expected, or ``None``.
        :param elapsed: seconds since the stage started, for the rate.
        """
        rate = f"{format_bytes(done / elapsed)}/s" if elapsed > 0 else ""
        if total:
            fraction = min(max(done / total, 0.0), 1.0)
            filled = int(fraction * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            return (f"{stage:<7} [{bar}] {fraction * 100:5.1f}% "
                    f"{format_bytes(done)}/{format_bytes(total)} {rate}").rstrip()
        return f"{stage:<7} {format_bytes(done)} {rate}".rstrip()

    def close(self) -> None:
        """End the current line, if a bar is drawn."""
        self._finish_line()

    def _finish_line(self) -> None:
        if self._line_open:
            self.stream.write("\n")
            self.stream.flush()
            self._line_open = False


class JsonProgress:
    """A progress callback writing one JSON object a line,
    ``{"stage": ..., "done": ..., "total": ..., "elapsed": ...}``, for
    scripts (``cloudlets render --progress json``): at each new stage, at
    most every ``min_interval`` seconds within one, and when a stage's total
    is reached.

    :param stream: where to write; ``sys.stderr`` by default.
    :param min_interval: least number of seconds between two lines of a stage.
    """

    def __init__(self, stream: TextIO | None = None, *, min_interval: float = 0.5) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.min_interval = min_interval
        self._stage: str | None = None
        self._started = time.monotonic()
        self._last = -math.inf

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        """Write (or skip) the line for this report."""
        now = time.monotonic()
        finished = total is not None and done >= total
        if stage == self._stage and not finished and now - self._last < self.min_interval:
            return
        self._stage, self._last = stage, now
        self.stream.write(json.dumps({"stage": stage, "done": done, "total": total,
                                      "elapsed": round(now - self._started, 3)}) + "\n")
        self.stream.flush()


def terminal_progress(stream: TextIO | None = None) -> TerminalProgress:
    """:returns: the CLI's progress bar on ``stream`` (``sys.stderr`` by
    default): drawn on a terminal, silent otherwise.

    :param stream: where to draw.
    """
    return TerminalProgress(stream)
