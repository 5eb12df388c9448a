"""The on-disk cache of built and downloaded models: one folder per name, built once, never half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """Folder for everything this project caches (built tiny models, downloaded weights)."""
    root = os.environ.get("COG_SDXL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cog-sdxl-pti"
    )
    return Path(root)


def cached_build(name: str, build: Callable[[Path], None]) -> Path:
    """``cache_root()/name``, calling ``build(folder)`` on first use. Built in a staging folder and renamed, so a
    crash mid-build never leaves a folder that looks complete; two processes racing both end with one copy."""
    folder = cache_root() / name
    if (folder / ".complete").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=name + ".", dir=folder.parent))
    try:
        build(staging)
        (staging / ".complete").touch()
        try:
            os.rename(staging, folder)
        except OSError:  # another process finished first
            if not (folder / ".complete").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
