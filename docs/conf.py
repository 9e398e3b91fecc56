"""Sphinx configuration for the cloudlets documentation."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import driver_matrix  # noqa: E402
import schema_doc  # noqa: E402

from cloudlets.version import __version__  # noqa: E402

project = "cloudlets"
author = "the cloudlets developers"
copyright = "2026, the cloudlets developers"  # noqa: A001
release = __version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.viewcode", "sphinx.ext.intersphinx"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
nitpicky = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
intersphinx_mapping: dict[str, tuple[str, str | None]] = {}
suppress_warnings = ["ref.python"]

schema_doc.generate(HERE / "generated")
driver_matrix.generate(HERE / "generated")


def setup(app: object) -> None:
    """The ``driver-capabilities`` directive of the per-driver pages."""
    driver_matrix.setup(app)
