"""Writing a new feature database: built under a temporary name, renamed into place when complete."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

from .schema import SCHEMA, connect_read_only, refresh_shown_labels

#: The columns the analysis writes, per table (in the order of the row tuples `StoreBuilder.add_*` take).
_COLUMNS: dict[str, tuple[str, ...]] = {
    "features": ("id", "n_active", "n_contexts", "density", "mean_activation", "max_activation", "std_activation"),
    "examples": (
        "feature_id",
        "kind",
        "rank",
        "bin",
        "context",
        "start",
        "length",
        "peak",
        "activation",
        "activations",
    ),
    "contexts": ("id", "token_ids"),
    "tokens": ("id", "text"),
    "histograms": ("feature_id", "first_bin", "counts"),
    "logit_effects": ("feature_id", "direction", "rank", "token_id", "value"),
    "neighbours": ("feature_id", "rank", "neighbour_id", "cosine"),
    "map": ("feature_id", "x", "y"),
    "labels": ("id", "feature_id", "source", "text", "embedding_score", "created"),
    "label_embeddings": ("label_id", "model", "vector"),
    "example_embeddings": ("feature_id", "vector"),
}
#: (id, n_active, n_contexts, density, mean activation or None, max activation, std activation)
FeatureRow = tuple[int, int, int, float, "float | None", float, float]
#: (feature id, kind, rank, quantile bin or None, context, start, length, peak, activation, activations or None)
ExampleRow = tuple[int, str, int, "int | None", int, int, int, int, float, "bytes | None"]


class StoredLabel(NamedTuple):
    """A label as stored, with its cached embedding: what a re-analysis carries over from the database it replaces."""

    feature_id: int
    source: str
    text: str
    detection: float | None
    fuzzing: float | None
    embedding_score: float | None
    created: str
    model: str | None
    vector: bytes | None


def carried_labels(path: Path, fingerprint: str | None) -> list[StoredLabel]:
    """The labels not made by the analysis (`monoscope explain`, humans) of the database at `path`, when it
    describes the SAE with this fingerprint (see `analyze.sae_fingerprint`); [] otherwise or when unreadable."""
    if fingerprint is None or not path.is_file():
        return []
    try:
        conn = connect_read_only(path)
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            if json.loads(meta.get("sae_fingerprint", "null")) != fingerprint:
                return []
            rows = conn.execute(
                "SELECT l.feature_id, l.source, l.text, l.detection, l.fuzzing, l.embedding_score, l.created, e.model, "
                "e.vector FROM labels l LEFT JOIN label_embeddings e ON e.label_id = l.id "
                "WHERE l.source NOT LIKE 'heuristic%' ORDER BY l.id"
            ).fetchall()
        finally:
            conn.close()
    except (sqlite3.Error, ValueError):
        return []
    return [StoredLabel(*row) for row in rows]


class StoreBuilder:
    """Builds a database under a temporary name beside `path`; `finish()` renames it into place.

    Used as a context manager, an exception (or Ctrl-C) removes the temporary file and leaves whatever was
    at `path` before untouched.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self.path)
        self.tmp = self.path.parent / f".{self.path.name}.{os.getpid()}.{int(time.time() * 1000) % 10**9}.tmp"
        self.conn = sqlite3.connect(self.tmp)
        self.conn.execute("PRAGMA journal_mode = OFF")
        self.conn.execute("PRAGMA synchronous = OFF")
        self.conn.executescript(SCHEMA)
        self._table_columns: dict[str, set[str]] = {}
        self._done = False

    def __enter__(self) -> "StoreBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()

    def set_meta(self, values: dict[str, Any]) -> None:
        self.conn.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", [(k, json.dumps(v)) for k, v in values.items()]
        )

    def insert(self, table: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
        """Insert rows of `columns` into `table` (any table and columns of the schema: tests build databases so)."""
        known = self._table_columns.get(table)
        if known is None:
            known = {r[1] for r in self.conn.execute("SELECT * FROM pragma_table_info(?)", (table,))}
            if not known:
                raise ValueError(f"the feature database has no table {table!r}")
            self._table_columns[table] = known
        unknown = [c for c in columns if c not in known]
        if unknown:
            raise ValueError(f"table {table} has no column(s) {', '.join(map(repr, unknown))}")
        marks = ", ".join("?" for _ in columns)
        self.conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)

    def _insert(self, table: str, rows: Iterable[Sequence[Any]]) -> None:
        self.insert(table, _COLUMNS[table], rows)

    def add_features(self, rows: Iterable[FeatureRow]) -> None:
        self._insert("features", rows)

    def add_examples(self, rows: Iterable[ExampleRow]) -> None:
        self._insert("examples", rows)

    def add_contexts(self, rows: Iterable[tuple[int, bytes]]) -> None:
        """(context id, token ids as meta token_dtype bytes)."""
        self._insert("contexts", rows)

    def add_tokens(self, rows: Iterable[tuple[int, str]]) -> None:
        self._insert("tokens", rows)

    def add_histograms(self, rows: Iterable[tuple[int, int, bytes]]) -> None:
        """(feature id, first occupied bin, int32 counts)."""
        self._insert("histograms", rows)

    def add_logit_effects(self, rows: Iterable[tuple[int, str, int, int, float]]) -> None:
        """(feature id, 'up' | 'down', rank, token id, value)."""
        self._insert("logit_effects", rows)

    def add_neighbours(self, rows: Iterable[tuple[int, int, int, float]]) -> None:
        """(feature id, rank, neighbour id, cosine)."""
        self._insert("neighbours", rows)

    def add_map(self, rows: Iterable[tuple[int, float, float]]) -> None:
        self._insert("map", rows)

    def add_labels(self, rows: Iterable[tuple[int, int, str, str, float | None, str]]) -> None:
        """(label id, feature id, source, text, embedding score, created): labels made by the analysis."""
        self._insert("labels", rows)

    def add_label_embeddings(self, rows: Iterable[tuple[int, str | None, bytes]]) -> None:
        """(label id, embedding model, float32 vector)."""
        self._insert("label_embeddings", rows)

    def add_example_embeddings(self, rows: Iterable[tuple[int, bytes]]) -> None:
        self._insert("example_embeddings", rows)

    def carry_labels(self, labels: Iterable[StoredLabel]) -> int:
        """Add labels read from an earlier database (new ids, after every label already here); returns how many."""
        n = 0
        for label in labels:
            cur = self.conn.execute(
                "INSERT INTO labels (feature_id, source, text, detection, fuzzing, embedding_score, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    label.feature_id,
                    label.source,
                    label.text,
                    label.detection,
                    label.fuzzing,
                    label.embedding_score,
                    label.created,
                ),
            )
            if label.vector is not None:
                self.conn.execute(
                    "INSERT INTO label_embeddings (label_id, model, vector) VALUES (?, ?, ?)",
                    (cur.lastrowid, label.model, label.vector),
                )
            n += 1
        return n

    def refresh_labels(self) -> None:
        refresh_shown_labels(self.conn, None)

    def finish(self) -> Path:
        try:
            self.conn.execute("INSERT INTO labels_fts (labels_fts) VALUES ('optimize')")
            self.conn.commit()
            self.conn.execute("PRAGMA journal_mode = DELETE")
            self.conn.close()
            with open(self.tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.path

    def abort(self) -> None:
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001
            pass
        self.tmp.unlink(missing_ok=True)
        self._done = True


def remove_stale_temporaries(path: Path) -> None:
    """Remove temporary databases of earlier runs that died (their process is gone)."""
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        parts = tmp.name.split(".")
        try:
            pid = int(parts[-3])
        except (ValueError, IndexError):
            continue
        if pid == os.getpid() or _alive(pid):
            continue
        tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
