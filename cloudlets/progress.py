"""Progress reporting: a callback protocol and a terminal progress bar.

Long stages (downloading a tarball, re-hashing a cached one, reading it,
building the disk, converting it, storing the artifacts) report progress
through a plain callable ``progress(stage, done, total)``:

- ``stage`` names what is happening (:data:`STAGE_FETCH`, :data:`STAGE_VERIFY`,
  or a render stage of :data:`cloudlets.renderer.STAGES`: ``rootfs``,
  ``disk``, ``tree``, ``convert``, ``store``...);
- ``done`` counts the bytes handled so far in this stage; it may go back to 0
  when a download restarts from the beginning, and otherwise never decreases;
- ``total`` is the expected number of bytes, or ``None`` when unknown.

Each render stage is first reported as ``(stage, 0, None)`` when it starts;
the stages that measure their work then report bytes through a
:class:`StageMeter`, which ends with ``done == total``.

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
    "PartProgress",
    "ProgressCallback",
    "StageMeter",
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


class PartProgress(Protocol):
    """The progress of one part of a stage (:meth:`StageMeter.part`), e.g. a
    format driver's conversion (:attr:`FormatContext.progress
    <cloudlets.drivers.base.FormatContext.progress>`)."""

    def __call__(self, done: int, total: int | None = None) -> None:
        """Report that ``done`` of ``total`` bytes of the part are handled.

        :param done: bytes handled so far.
        :param total: bytes expected; default the part's planned size.
        """


def null_progress(stage: str, done: int, total: int | None) -> None:
    """A progress callback that ignores every report."""


class StageMeter:
    """One stage's byte count, reported through a :class:`ProgressCallback`
    cheaply and in order: ``done`` never decreases nor passes ``total``, a
    report is sent only when ``done`` advanced by :attr:`step` bytes, and
    :meth:`finish` reports ``done == total`` once the stage is over, however
    far its parts got.

    The total may be made of *parts* (:meth:`part`): consecutive slots of
    planned sizes, each reporting its own progress against its own total,
    which is scaled into its slot (a part whose exact size is known only
    once it runs, a tool that reports a percentage).

    :param progress: where to report; ``None`` reports nothing.
    :param stage: the stage name.
    :param total: the stage's bytes, as planned.
    :param step: least number of bytes between two reports.
    """

    def __init__(self, progress: ProgressCallback | None, stage: str, total: int, *,
                 step: int = 1024 * 1024) -> None:
        self._progress = progress
        self.stage = stage
        self.total = max(int(total), 0)
        self.step = step
        self._sent = 0
        self._done = 0
        self._next_slot = 0

    @property
    def done(self) -> int:
        """Bytes counted so far (what was last reported, or more)."""
        return self._done

    def update(self, done: int) -> None:
        """Count the stage ``done`` bytes far; going back is ignored."""
        if self._progress is None or self.total == 0:
            return
        done = min(int(done), self.total)
        if done <= self._done:
            return
        self._done = done
        if done - self._sent >= self.step or done == self.total:
            self._send(done)

    def part(self, size: int) -> PartProgress:
        """The next slot of ``size`` planned bytes.

        :returns: a callback ``report(done, total)`` for the part's own
            progress: ``done`` of ``total`` (default ``size``) is mapped
            into the slot.
        """
        start = self._next_slot
        size = max(int(size), 0)
        self._next_slot = start + size

        def report(done: int, total: int | None = None) -> None:
            whole = size if total is None else total
            if whole <= 0:
                return
            fraction = min(max(done / whole, 0.0), 1.0)
            self.update(start + int(fraction * size))

        return report

    def finish(self) -> None:
        """The stage is over: report ``done == total`` (when it had a total)."""
        if self._progress is None or self.total == 0 or self._sent == self.total:
            return
        self._done = self.total
        self._send(self.total)

    def _send(self, done: int) -> None:
        assert self._progress is not None
        self._sent = done
        self._progress(self.stage, done, self.total)


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
