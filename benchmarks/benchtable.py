"""Ratios and tables shared by the benchmarks (bench_disk.py, run_all.py).

Pure functions over plain dicts: no clock, no subprocess, so that
tests/test_benchtable.py can check them.
"""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: The reference pipelines every disk pipeline is compared with, fastest first.
REFERENCES = ("floor", "baseline", "virt-make-fs")


def ratios(best: Mapping[str, float], references: Sequence[str] = REFERENCES,
           ) -> dict[str, dict[str, float]]:
    """Each pipeline's best time over each reference's best time.

    :param best: pipeline name to its best wall time in seconds.
    :returns: ``{pipeline: {reference: ratio}}`` for every pipeline and every
        reference that was measured (a reference's ratio to itself, 1.0,
        included); a ratio under 1 is faster than the reference. A reference
        that was not run, or took no measurable time, gives no entry.
    """
    result: dict[str, dict[str, float]] = {}
    for name, seconds in best.items():
        result[name] = {ref: seconds / best[ref] for ref in references
                        if ref in best and best[ref] > 0}
    return result


def fmt_ratio(value: float | None) -> str:
    """A ratio as shown in the tables: ``2.41x``, or ``-`` when not measured."""
    return "-" if value is None else f"{value:.2f}x"


def fmt_number(value: float | None, digits: int = 2) -> str:
    """A number as shown in the tables, or ``-`` when not measured."""
    return "-" if value is None else f"{value:.{digits}f}"


def text_table(header: Sequence[str], rows: Iterable[Sequence[str]], align: str = "") -> str:
    """A plain-text table.

    :param align: one letter a column, ``l`` (left) or ``r`` (right); by
        default the first column is left-aligned and the others right-aligned.
    """
    body = [list(header), *[list(r) for r in rows]]
    if any(len(row) != len(header) for row in body):
        raise ValueError("every row must have as many cells as the header")
    align = align or "l" + "r" * (len(header) - 1)
    widths = [max(len(row[i]) for row in body) for i in range(len(header))]
    lines = []
    for number, row in enumerate(body):
        cells = [c.ljust(w) if a == "l" else c.rjust(w)
                 for c, w, a in zip(row, widths, align, strict=True)]
        lines.append("  ".join(cells).rstrip())
        if number == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def rst_table(header: Sequence[str], rows: Iterable[Sequence[str]], *,
              widths: Sequence[int] | None = None) -> str:
    """The same table as an RST ``list-table`` (for docs/performance.rst)."""
    lines = [".. list-table::", "   :header-rows: 1"]
    if widths:
        lines.append("   :widths: " + " ".join(str(w) for w in widths))
    lines.append("")
    for row in [header, *rows]:
        cells = [_rst_cell(c) for c in row]
        lines.append(f"   * - {cells[0]}".rstrip())
        lines.extend(f"     - {c}".rstrip() for c in cells[1:])
    return "\n".join(lines) + "\n"


def _rst_cell(text: str) -> str:
    """A cell's text as RST inline text: a leading bullet character (the
    tables' ``-`` for "not measured") escaped, so that it is no nested list."""
    text = " ".join(text.split())
    return "\\" + text if text[:1] in ("-", "*", "+", "#", "|") else text


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPUs, model, load, kernel, Python, commit."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        if dirty:
            commit += "+dirty"
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"nproc": len(os.sched_getaffinity(0)), "cpu": model, "load": list(os.getloadavg()),
            "kernel": platform.release(), "python": platform.python_version(),
            "commit": commit}
