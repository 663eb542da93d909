"""Where monoscope keeps things it can rebuild (converted models): MONOSCOPE_HOME, else XDG_CACHE_HOME."""

from __future__ import annotations

import os
from pathlib import Path


def monoscope_home() -> Path:
    explicit = os.environ.get("MONOSCOPE_HOME")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "monoscope"
