"""Reading a feature database (read-only), and adding labels to it (`monoscope explain`, humans)."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ...errors import MonoscopeError
from .records import Example, FeatureRecord, Label, Neighbour, TokenEffect
from .schema import EXAMPLE_KINDS, SCHEMA_VERSION, connect_read_only, default_db_path, now_iso, refresh_shown_labels


def _finite(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if np.isfinite(x) else None


class FeatureStore:
    """A feature database, opened read-only; `add_label` writes through a second, read-write connection."""

    def __init__(self, path: str | os.PathLike, *, sae_dir: str | os.PathLike | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            where = f" --sae {sae_dir}" if sae_dir is not None else " --sae SAE_FOLDER"
            raise MonoscopeError(f"no feature database at {self.path}: run `monoscope analyze{where}` first")
        self._lock = threading.RLock()
        try:
            self.conn = connect_read_only(self.path, check_same_thread=False)
            self.conn.execute("PRAGMA busy_timeout = 5000")
            meta_rows = self.conn.execute("SELECT key, value FROM meta").fetchall()
        except sqlite3.DatabaseError as err:
            raise MonoscopeError(
                f"{self.path} is not a monoscope feature database ({err}); re-run `monoscope analyze`"
            ) from err
        self.meta: dict[str, Any] = {k: json.loads(v) for k, v in meta_rows}
        version = self.meta.get("schema_version")
        if version != SCHEMA_VERSION:
            newer = isinstance(version, int) and version > SCHEMA_VERSION
            raise MonoscopeError(
                f"{self.path} has feature-database schema {version}, this monoscope reads {SCHEMA_VERSION}: "
                + ("upgrade monoscope" if newer else "re-run `monoscope analyze` to rebuild it")
            )
        self._rw: sqlite3.Connection | None = None
        self._tokens: dict[int, str] | None = None
        self._contexts: dict[int, np.ndarray] = {}
        self._vectors: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._example_vectors: tuple[np.ndarray, np.ndarray] | None = None
        self.token_dtype = np.dtype(self.meta.get("token_dtype", "<u2"))
        self.acts_dtype = np.dtype(self.meta.get("acts_dtype", "<f2"))

    @classmethod
    def for_sae(cls, sae_dir: str | os.PathLike | None = None, db: str | os.PathLike | None = None) -> "FeatureStore":
        """The database of an SAE folder (`<folder>/features.db`), or the one at `db` when given."""
        if db is not None:
            return cls(Path(db), sae_dir=sae_dir)
        if sae_dir is None:
            raise MonoscopeError("say which features to read: pass --sae SAE_FOLDER (or --db FILE)")
        return cls(default_db_path(sae_dir), sae_dir=sae_dir)

    # ---- lifecycle

    def close(self) -> None:
        with self._lock:
            self.conn.close()
            if self._rw is not None:
                self._rw.close()
                self._rw = None

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            return self.conn.execute(sql, args).fetchall()

    # ---- basics

    @property
    def n_features(self) -> int:
        return int(self.meta["d_sae"])

    @property
    def tokens_analysed(self) -> int:
        return int(self.meta.get("tokens_analysed", 0))

    def check_id(self, feature_id: int) -> int:
        fid = int(feature_id)
        if not 0 <= fid < self.n_features:
            raise MonoscopeError(
                f"feature {fid} does not exist: this SAE has {self.n_features} features (0-{self.n_features - 1})"
            )
        return fid

    def token_strings(self) -> dict[int, str]:
        if self._tokens is None:
            self._tokens = dict(self._query("SELECT id, text FROM tokens"))
        return self._tokens

    def token_text(self, token_id: int) -> str:
        return self.token_strings().get(int(token_id), f"<{int(token_id)}>")

    def context_tokens(self, context: int) -> np.ndarray:
        ids = self._contexts.get(context)
        if ids is None:
            row = self._query("SELECT token_ids FROM contexts WHERE id = ?", (int(context),))
            if not row:
                raise MonoscopeError(
                    f"{self.path} lacks context {context}; the database is damaged: re-run `monoscope analyze`"
                )
            ids = np.frombuffer(row[0][0], dtype=self.token_dtype).astype(np.int64)
            if len(self._contexts) > 4096:
                self._contexts.clear()
            self._contexts[context] = ids
        return ids

    # ---- features

    def _record(self, row: tuple) -> FeatureRecord:
        return FeatureRecord(*row)

    _FEATURE_COLUMNS = (
        "f.id, f.n_active, f.n_contexts, f.density, f.mean_activation, f.max_activation, f.std_activation, f.label, "
        "f.label_source, m.x, m.y"
    )

    def feature(self, feature_id: int) -> FeatureRecord:
        fid = self.check_id(feature_id)
        rows = self._query(
            f"SELECT {self._FEATURE_COLUMNS} FROM features f LEFT JOIN map m ON m.feature_id = f.id WHERE f.id = ?",
            (fid,),
        )
        if not rows:
            raise MonoscopeError(f"{self.path} has no row for feature {fid}; re-run `monoscope analyze`")
        return self._record(rows[0])

    def features(self, feature_ids: Iterable[int] | None = None) -> list[FeatureRecord]:
        """Records of the given features (all, in id order, when None)."""
        if feature_ids is None:
            rows = self._query(
                f"SELECT {self._FEATURE_COLUMNS} FROM features f LEFT JOIN map m ON m.feature_id = f.id ORDER BY f.id"
            )
            return [self._record(r) for r in rows]
        ids = [int(i) for i in feature_ids]
        found: dict[int, FeatureRecord] = {}
        for lo in range(0, len(ids), 500):
            chunk = ids[lo : lo + 500]
            marks = ",".join("?" for _ in chunk)
            for r in self._query(
                f"SELECT {self._FEATURE_COLUMNS} FROM features f LEFT JOIN map m ON m.feature_id = f.id WHERE f.id IN ({marks})",
                chunk,
            ):
                found[r[0]] = self._record(r)
        return [found[i] for i in ids if i in found]

    def column(self, name: str) -> np.ndarray:
        """One statistic for every feature, in id order: density, mean_activation, max_activation, std_activation,
        n_active, n_contexts."""
        if name not in ("density", "mean_activation", "max_activation", "std_activation", "n_active", "n_contexts"):
            raise ValueError(f"unknown feature column {name!r}")
        values = self._query(f"SELECT {name} FROM features ORDER BY id")
        return np.array([np.nan if v[0] is None else v[0] for v in values], dtype=np.float64)

    def histogram(self, feature_id: int) -> tuple[list[float], list[int]]:
        """(bin edges, counts) of the feature's non-zero activations, trimmed to its occupied bins."""
        fid = self.check_id(feature_id)
        rows = self._query("SELECT first_bin, counts FROM histograms WHERE feature_id = ?", (fid,))
        if not rows:
            return [], []
        first, blob = rows[0]
        counts = np.frombuffer(blob, dtype="<i4").tolist()
        edges = self.meta["hist_edges"][first : first + len(counts) + 1]
        return edges, counts

    def logit_effects(self, feature_id: int) -> dict[str, list[TokenEffect]]:
        fid = self.check_id(feature_id)
        out: dict[str, list[TokenEffect]] = {"up": [], "down": []}
        for direction, token_id, value in self._query(
            "SELECT direction, token_id, value FROM logit_effects WHERE feature_id = ? ORDER BY direction, rank", (fid,)
        ):
            out[direction].append(TokenEffect(self.token_text(token_id), int(token_id), float(value)))
        return out

    def neighbours(self, feature_id: int) -> list[Neighbour]:
        fid = self.check_id(feature_id)
        rows = self._query(
            "SELECT n.neighbour_id, n.cosine, f.label FROM neighbours n LEFT JOIN features f ON f.id = n.neighbour_id "
            "WHERE n.feature_id = ? ORDER BY n.rank",
            (fid,),
        )
        return [Neighbour(int(i), float(c), label) for i, c, label in rows]

    def map_coords(self) -> np.ndarray:
        """[d_sae, 2] map coordinates (NaN where the analysis made no map)."""
        xy = np.full((self.n_features, 2), np.nan, dtype=np.float32)
        for fid, x, y in self._query("SELECT feature_id, x, y FROM map"):
            xy[fid] = (x, y)
        return xy

    # ---- examples

    def examples(self, feature_id: int, kind: str | None = "top", limit: int | None = None) -> list[Example]:
        """The stored examples of a feature: kind 'top' (best first), 'quantile' (lowest bin first), 'random'
        (non-activating), or None for all of them."""
        fid = self.check_id(feature_id)
        if kind is not None and kind not in EXAMPLE_KINDS:
            raise MonoscopeError(f"unknown example kind {kind!r}; use one of {', '.join(EXAMPLE_KINDS)}")
        sql = "SELECT kind, rank, bin, context, start, length, peak, activation, activations FROM examples WHERE feature_id = ?"
        args: list[Any] = [fid]
        if kind is not None:
            sql += " AND kind = ?"
            args.append(kind)
        sql += " ORDER BY CASE kind WHEN 'top' THEN 0 WHEN 'quantile' THEN 1 ELSE 2 END, rank"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(int(limit))
        strings = self.token_strings()
        out = []
        for kind_, rank, bin_, context, start, length, peak, activation, blob in self._query(sql, args):
            ids = self.context_tokens(context)[start : start + length]
            acts = (
                np.zeros(length, dtype=np.float32)
                if blob is None
                else np.frombuffer(blob, dtype=self.acts_dtype).astype(np.float32)
            )
            tokens = [strings.get(int(t), f"<{int(t)}>") for t in ids]
            out.append(
                Example(
                    fid,
                    kind_,
                    rank,
                    tokens,
                    acts.tolist(),
                    "".join(tokens),
                    ids.tolist(),
                    context,
                    start,
                    peak - start,
                    float(activation),
                    bin_,
                )
            )
        return out

    # ---- labels

    def labels(self, feature_id: int) -> list[Label]:
        fid = self.check_id(feature_id)
        rows = self._query(
            "SELECT id, feature_id, source, text, detection, fuzzing, embedding_score, created FROM labels "
            "WHERE feature_id = ? ORDER BY id",
            (fid,),
        )
        return [Label(*r) for r in rows]

    def label_scores(self, feature_ids: Iterable[int]) -> dict[int, float]:
        """The embedding score of each feature's shown label (heuristic labels: out of sample, on examples not
        used to make them), for the features that have one."""
        ids = [int(i) for i in feature_ids]
        out: dict[int, float] = {}
        for lo in range(0, len(ids), 500):
            chunk = ids[lo : lo + 500]
            marks = ",".join("?" for _ in chunk)
            for fid, score in self._query(
                f"SELECT f.id, l.embedding_score FROM features f JOIN labels l ON l.feature_id = f.id AND l.text = f.label "
                f"AND l.source = f.label_source WHERE f.id IN ({marks}) AND l.embedding_score IS NOT NULL",
                chunk,
            ):
                out[int(fid)] = float(score)
        return out

    def _writer(self) -> sqlite3.Connection:
        if self._rw is None:
            try:
                self._rw = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
            except sqlite3.Error as err:  # pragma: no cover - e.g. a read-only folder
                raise MonoscopeError(f"cannot write labels to {self.path}: {err}") from err
        return self._rw

    def add_label(
        self,
        feature_id: int,
        source: str,
        text: str,
        *,
        detection: float | None = None,
        fuzzing: float | None = None,
        embedding_score: float | None = None,
        embed: bool = True,
    ) -> int:
        """Add a label (source 'heuristic', 'llm:MODEL', 'human', ...) with its scores; returns its id.

        The label becomes the one shown when it ranks first (non-heuristic first, then by mean score, then
        newest). With `embed` (default) its embedding is cached for search by meaning.
        """
        fid = self.check_id(feature_id)
        text = str(text).strip()
        if not text:
            raise MonoscopeError("a label cannot be empty")
        if not source:
            raise MonoscopeError("a label needs a source, e.g. 'llm:gpt-4o-mini' or 'human'")
        from ..embedding import EMBEDDING_MODEL

        vector = None
        if embed:
            from ..embedding import embed_texts, embeddings_available

            if embeddings_available():
                vector = embed_texts([text])[0].astype("<f4").tobytes()
        with self._lock:
            conn = self._writer()
            try:
                with conn:
                    cur = conn.execute(
                        "INSERT INTO labels (feature_id, source, text, detection, fuzzing, embedding_score, created) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            fid,
                            str(source),
                            text,
                            _finite(detection),
                            _finite(fuzzing),
                            _finite(embedding_score),
                            now_iso(),
                        ),
                    )
                    label_id = cur.lastrowid
                    if label_id is None:  # pragma: no cover - sqlite3 always sets it after an INSERT
                        raise sqlite3.OperationalError("no id for the new label")
                    if vector is not None:
                        conn.execute(
                            "INSERT OR REPLACE INTO label_embeddings (label_id, model, vector) VALUES (?, ?, ?)",
                            (label_id, EMBEDDING_MODEL, vector),
                        )
                    refresh_shown_labels(conn, [fid])
            except sqlite3.Error as err:
                raise MonoscopeError(f"could not add a label to {self.path}: {err}") from err
            self._vectors = None
        return label_id

    def search_label_words(self, match: str, promoted_weight: float, limit: int) -> list[tuple[int, float]]:
        """(feature id, bm25 score; lower is better) of the labels matching the FTS5 query `match`, best first;
        words among a heuristic label's promoted tokens count `promoted_weight` times a word of its main part."""
        return self._query(
            f"SELECT l.feature_id, bm25(labels_fts, 1.0, {float(promoted_weight)}) AS s FROM labels_fts "
            "JOIN labels l ON l.id = labels_fts.rowid WHERE labels_fts MATCH ? ORDER BY s LIMIT ?",
            (match, int(limit)),
        )

    def has_label_embeddings(self) -> bool:
        """Whether any label has a cached embedding (false after `analyze --no-embeddings`)."""
        return bool(self._query("SELECT EXISTS (SELECT 1 FROM label_embeddings)")[0][0])

    def example_counts(self) -> dict[str, int]:
        """How many examples of each kind ('top', 'quantile', 'random') the database holds."""
        return {str(kind): int(n) for kind, n in self._query("SELECT kind, COUNT(*) FROM examples GROUP BY kind")}

    def missing_label_vectors(self) -> int:
        """How many labels have no cached embedding (e.g. after `analyze --no-embeddings`)."""
        return int(
            self._query(
                "SELECT COUNT(*) FROM labels l LEFT JOIN label_embeddings e ON e.label_id = l.id "
                "WHERE e.label_id IS NULL"
            )[0][0]
        )

    def label_vectors(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(label ids, feature ids, unit vectors [n, 384]) of every label. Labels stored without a vector are
        embedded now and the vectors saved to the database (when it is writable), so this happens once.
        Cached until a label is added through this store."""
        with self._lock:
            if self._vectors is not None:
                return self._vectors
            rows = self._query(
                "SELECT l.id, l.feature_id, l.text, e.vector FROM labels l LEFT JOIN label_embeddings e ON e.label_id = l.id ORDER BY l.id"
            )
        from ..embedding import EMBEDDING_DIM, embed_texts

        ids = np.array([r[0] for r in rows], dtype=np.int64)
        fids = np.array([r[1] for r in rows], dtype=np.int64)
        matrix = np.zeros((len(rows), EMBEDDING_DIM), dtype=np.float32)
        missing = []
        for i, r in enumerate(rows):
            if r[3] is not None and len(r[3]) == EMBEDDING_DIM * 4:
                matrix[i] = np.frombuffer(r[3], dtype="<f4")
            else:
                missing.append(i)
        if missing:
            from ..embedding import EMBEDDING_MODEL

            matrix[missing] = embed_texts([rows[i][2] for i in missing])
            try:
                with self._lock:
                    conn = self._writer()
                    with conn:
                        conn.executemany(
                            "INSERT OR REPLACE INTO label_embeddings (label_id, model, vector) VALUES (?, ?, ?)",
                            [(int(ids[i]), EMBEDDING_MODEL, matrix[i].astype("<f4").tobytes()) for i in missing],
                        )
            except (sqlite3.Error, MonoscopeError):
                pass  # a read-only file: keep them in memory only
        with self._lock:
            self._vectors = (ids, fids, matrix)
        return self._vectors

    def example_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(feature ids, unit vectors [n, 384]) of what each feature fires on: the mean embedding of its top
        and quantile examples' texts. Empty when the database has none (older, or analysed --no-embeddings)."""
        with self._lock:
            if self._example_vectors is None:
                try:
                    rows = self._query("SELECT feature_id, vector FROM example_embeddings ORDER BY feature_id")
                except sqlite3.OperationalError:  # a database from before the table existed
                    rows = []
                fids = np.array([r[0] for r in rows], dtype=np.int64)
                matrix = (
                    np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), -1)
                    if rows
                    else np.zeros((0, 384), np.float32)
                )
                self._example_vectors = (fids, matrix)
            return self._example_vectors

    def size_bytes(self) -> int:
        return self.path.stat().st_size

    def summary(self) -> dict[str, Any]:
        keys = ("model", "hook_point", "d_sae", "d_in", "tokens_analysed", "contexts_analysed", "created", "map_method")
        out = {k: self.meta.get(k) for k in keys}
        out["path"] = str(self.path)
        out["dead_features"] = self._query("SELECT COUNT(*) FROM features WHERE n_active = 0")[0][0]
        out["labels"] = self._query("SELECT COUNT(*) FROM labels")[0][0]
        return out
