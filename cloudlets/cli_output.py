"""What the ``cloudlets`` command modules print: JSON documents and the
artifact lines, in one place so every subcommand shows them alike."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable
from typing import Any, TextIO

from cloudlets.drivers.base import StoredArtifact

__all__ = ["EscapingWriter", "escape_controls", "print_artifacts", "print_json"]

#: What never reaches a terminal raw: C0 controls but newline and tab, DEL,
#: C1 controls (ESC starts ANSI and OSC sequences, and so do CSI/OSC in C1),
#: and the bidirectional overrides and isolates that reorder what is shown.
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f"
                       "\u202a-\u202e\u2066-\u2069]")


def escape_controls(text: str) -> str:
    """:returns: ``text`` with every control character a terminal would act
    on written as an escape (``\\x1b``, ``\\u202e``): a manifest's
    description cannot move the cursor, retitle the window or hide text."""
    return _CONTROLS.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class EscapingWriter(io.TextIOBase):
    """A text stream that passes what it is given through
    :func:`escape_controls` to another one: human output of the command
    line, whatever a manifest, tarball or server put in it."""

    def __init__(self, target: TextIO) -> None:
        self._target = target

    def write(self, text: str) -> int:
        self._target.write(escape_controls(text))
        return len(text)

    def flush(self) -> None:
        self._target.flush()

    def isatty(self) -> bool:
        return self._target.isatty()


def print_json(out: TextIO, data: Any) -> None:
    """Write ``data`` as indented JSON and a newline (objects that JSON does
    not know, such as paths, as strings)."""
    # One write: json.dump writes every token on its own, a system call each
    # on an unbuffered stream (PYTHONUNBUFFERED).
    out.write(json.dumps(data, indent=2, default=str) + "\n")


def print_artifacts(out: TextIO, artifacts: Iterable[StoredArtifact], indent: str = "  ") -> None:
    """Write one line per artifact: role, location, size and sha256."""
    for artifact in artifacts:
        out.write(f"{indent}{artifact.role:<10} {artifact.location}  {artifact.size} bytes  "
                  f"sha256:{artifact.sha256}\n")
