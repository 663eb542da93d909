"""Exports of a feature database (`features.db`) to other tools' formats, apart from the analysis that builds it.

- `neuronpedia`: Neuronpedia's dataset layout (`export_neuronpedia`), batch-N.jsonl.gz files of features,
  activation examples and explanations.
- `parquet`: one Parquet table per kind of record (`export_parquet`).
- `cli`: `monoscope export neuronpedia|parquet`.

Importing SAEs from other tools lives with the SAEs (`monoscope.sae.interop`).
"""

from __future__ import annotations

from .neuronpedia import DEFAULT_CREATOR_ID, default_source_id, export_neuronpedia
from .parquet import export_parquet
from .report import ExportReport

__all__ = ["DEFAULT_CREATOR_ID", "ExportReport", "default_source_id", "export_neuronpedia", "export_parquet"]
