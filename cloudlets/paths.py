"""Default directories, following the XDG base directory specification."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_cache_dir", "default_data_dir"]


def _xdg(variable: str, fallback: str) -> Path:
    value = os.environ.get(variable)
    if value and os.path.isabs(value):
        return Path(value)
    return Path.home() / fallback


def default_cache_dir() -> Path:
    """``$CLOUDLETS_CACHE_DIR``, else ``$XDG_CACHE_HOME/cloudlets``, else
    ``~/.cache/cloudlets``: downloaded tarballs and cached base filesystems."""
    override = os.environ.get("CLOUDLETS_CACHE_DIR")
    if override:
        return Path(override)
    return _xdg("XDG_CACHE_HOME", ".cache") / "cloudlets"


def default_data_dir() -> Path:
    """``$CLOUDLETS_HOME``, else ``$XDG_DATA_HOME/cloudlets``, else
    ``~/.local/share/cloudlets``: the image catalog and other state."""
    override = os.environ.get("CLOUDLETS_HOME")
    if override:
        return Path(override)
    return _xdg("XDG_DATA_HOME", ".local/share") / "cloudlets"
