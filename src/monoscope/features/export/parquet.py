"""Export a feature database (`features.db`) as Parquet tables.

`features.parquet` (statistics, shown label, map position), `examples.parquet` (one row per stored example,
tokens and activations as lists), `labels.parquet`, `logit_effects.parquet`, `neighbours.parquet`, and
`meta.json` (the database's meta table).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from ..._io import atomic_write_json
from ...errors import MonoscopeError
from ..store import FeatureStore
from .report import ExportReport

#: One table row, by column name.
Row = dict[str, object]


def _batched(n: int, size: int) -> Iterator[list[int]]:
    for lo in range(0, n, size):
        yield list(range(lo, min(lo + size, n)))


def _rows(store: FeatureStore, ids: list[int]) -> dict[str, list[Row]]:
    """The rows of every table for the features `ids`."""
    rows: dict[str, list[Row]] = {
        name: [] for name in ("features", "examples", "labels", "logit_effects", "neighbours")
    }
    for r in store.features(ids):
        rows["features"].append({**r.to_dict()})
        for e in store.examples(r.id, None):
            rows["examples"].append(
                {
                    "feature_id": r.id,
                    "kind": e.kind,
                    "rank": e.rank,
                    "bin": e.bin,
                    "context": e.context,
                    "start": e.start,
                    "peak": e.peak,
                    "max_activation": e.max_activation,
                    "text": e.text,
                    "tokens": e.tokens,
                    "token_ids": e.token_ids,
                    "activations": e.activations,
                }
            )
        rows["labels"].extend(label.to_dict() for label in store.labels(r.id))
        for direction, effects in store.logit_effects(r.id).items():
            rows["logit_effects"].extend(
                {
                    "feature_id": r.id,
                    "direction": direction,
                    "rank": i,
                    "token_id": t.token_id,
                    "token": t.token,
                    "value": t.value,
                }
                for i, t in enumerate(effects)
            )
        rows["neighbours"].extend(
            {"feature_id": r.id, "rank": i, "neighbour_id": n.id, "cosine": n.cosine}
            for i, n in enumerate(store.neighbours(r.id))
        )
    return rows


def export_parquet(store: FeatureStore, out_dir: str | os.PathLike, *, batch_size: int = 1024) -> ExportReport:
    """Write the database as Parquet tables in `out_dir` (features, examples, labels, logit_effects, neighbours)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:  # pragma: no cover - pyarrow is a dependency
        raise MonoscopeError("Parquet export needs pyarrow: pip install pyarrow") from err
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    schemas = {
        "features": pa.schema(
            [
                ("id", pa.int64()),
                ("n_active", pa.int64()),
                ("n_contexts", pa.int64()),
                ("density", pa.float64()),
                ("mean_activation", pa.float64()),
                ("max_activation", pa.float64()),
                ("std_activation", pa.float64()),
                ("label", pa.string()),
                ("label_source", pa.string()),
                ("x", pa.float64()),
                ("y", pa.float64()),
            ]
        ),
        "examples": pa.schema(
            [
                ("feature_id", pa.int64()),
                ("kind", pa.string()),
                ("rank", pa.int32()),
                ("bin", pa.int32()),
                ("context", pa.int64()),
                ("start", pa.int32()),
                ("peak", pa.int32()),
                ("max_activation", pa.float32()),
                ("text", pa.string()),
                ("tokens", pa.list_(pa.string())),
                ("token_ids", pa.list_(pa.int32())),
                ("activations", pa.list_(pa.float32())),
            ]
        ),
        "labels": pa.schema(
            [
                ("id", pa.int64()),
                ("feature_id", pa.int64()),
                ("source", pa.string()),
                ("text", pa.string()),
                ("detection", pa.float64()),
                ("fuzzing", pa.float64()),
                ("embedding_score", pa.float64()),
                ("created", pa.string()),
            ]
        ),
        "logit_effects": pa.schema(
            [
                ("feature_id", pa.int64()),
                ("direction", pa.string()),
                ("rank", pa.int32()),
                ("token_id", pa.int64()),
                ("token", pa.string()),
                ("value", pa.float32()),
            ]
        ),
        "neighbours": pa.schema(
            [("feature_id", pa.int64()), ("rank", pa.int32()), ("neighbour_id", pa.int64()), ("cosine", pa.float32())]
        ),
    }
    tmp = {name: folder / f".{name}.parquet.{os.getpid()}.tmp" for name in schemas}
    writers = {name: pq.ParquetWriter(str(tmp[name]), schema, compression="zstd") for name, schema in schemas.items()}
    counts = dict.fromkeys(schemas, 0)
    try:
        for ids in _batched(store.n_features, batch_size):
            for name, batch in _rows(store, ids).items():
                if batch:
                    writers[name].write_table(pa.Table.from_pylist(batch, schema=schemas[name]))
                    counts[name] += len(batch)
        for w in writers.values():
            w.close()
        for name, path in tmp.items():
            os.replace(path, folder / f"{name}.parquet")
    except BaseException:
        for w in writers.values():
            try:
                w.close()
            except Exception:  # noqa: BLE001
                pass
        for path in tmp.values():
            path.unlink(missing_ok=True)
        raise
    atomic_write_json(folder / "meta.json", store.meta)
    return ExportReport(folder, counts["features"], counts["examples"], counts["labels"], len(schemas) + 1)
