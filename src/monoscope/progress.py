"""Progress bars for long work, on stderr; hidden when stderr is not a terminal unless MONOSCOPE_PROGRESS=1."""

from __future__ import annotations

import os
from typing import Any

from tqdm.auto import tqdm


def progress_bar(
    total: int | None = None, desc: str = "", unit: str = "it", *, enabled: bool = True, **kwargs: Any
) -> tqdm:
    forced = os.environ.get("MONOSCOPE_PROGRESS")
    disable = True if not enabled else None if forced is None else forced in ("0", "false", "no")
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True, disable=disable, **kwargs)
