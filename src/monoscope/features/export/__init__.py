"""Exports of a feature database (`features.db`) to other tools' formats, apart from the analysis that builds it.

- `neuronpedia`: Neuronpedia's dataset layout (`export_neuronpedia`), batch-N.jsonl.gz files of features,
  activation examples and explanations.
- `parquet`: one Parquet table per kind of record (`export_parquet`).
- `cli`: `monoscope export neuronpedia|parquet`.

Importing SAEs from other tools lives with the SAEs (`monoscope.sae.interop`).

Names are imported lazily: the CLI imports `export.cli` to declare its arguments without numpy or SQLite.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names, for type checkers and editors
    from .neuronpedia import DEFAULT_CREATOR_ID, default_source_id, export_neuronpedia
    from .parquet import export_parquet
    from .report import ExportReport

_EXPORTS = {
    "DEFAULT_CREATOR_ID": "neuronpedia",
    "default_source_id": "neuronpedia",
    "export_neuronpedia": "neuronpedia",
    "export_parquet": "parquet",
    "ExportReport": "report",
}

__all__ = ["DEFAULT_CREATOR_ID", "ExportReport", "default_source_id", "export_neuronpedia", "export_parquet"]


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'monoscope.features.export' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
