"""What the ``cloudlets`` command modules print: JSON documents and the
artifact lines, in one place so every subcommand shows them alike."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, TextIO

from cloudlets.drivers.base import StoredArtifact

__all__ = ["print_artifacts", "print_json"]


def print_json(out: TextIO, data: Any) -> None:
    """Write ``data`` as indented JSON and a newline (objects that JSON does
    not know, such as paths, as strings)."""
    json.dump(data, out, indent=2, default=str)
    out.write("\n")


def print_artifacts(out: TextIO, artifacts: Iterable[StoredArtifact], indent: str = "  ") -> None:
    """Write one line per artifact: role, location, size and sha256."""
    for artifact in artifacts:
        out.write(f"{indent}{artifact.role:<10} {artifact.location}  {artifact.size} bytes  "
                  f"sha256:{artifact.sha256}\n")
