"""The feature database's schema, how its shown labels are chosen, and how it is opened read-only."""

from __future__ import annotations

import os
import sqlite3
import urllib.parse
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

SCHEMA_VERSION = 1
DB_FILENAME = "features.db"
EXAMPLE_KINDS = ("top", "quantile", "random")
#: The source of a feature's token label when its shown heuristic label is a concept label (`monoscope analyze`).
TOKEN_LABEL_SOURCE = "heuristic-tokens"

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE features (
    id INTEGER PRIMARY KEY,
    n_active INTEGER NOT NULL,
    n_contexts INTEGER NOT NULL,
    density REAL NOT NULL,
    mean_activation REAL,
    max_activation REAL NOT NULL,
    std_activation REAL NOT NULL,
    label TEXT,
    label_source TEXT
);
CREATE TABLE examples (
    feature_id INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('top', 'quantile', 'random')),
    rank INTEGER NOT NULL,
    bin INTEGER,
    context INTEGER NOT NULL,
    start INTEGER NOT NULL,
    length INTEGER NOT NULL,
    peak INTEGER NOT NULL,
    activation REAL NOT NULL,
    activations BLOB,
    PRIMARY KEY (feature_id, kind, rank)
) WITHOUT ROWID;
CREATE TABLE contexts (id INTEGER PRIMARY KEY, token_ids BLOB NOT NULL);
CREATE TABLE tokens (id INTEGER PRIMARY KEY, text TEXT NOT NULL);
CREATE TABLE histograms (feature_id INTEGER PRIMARY KEY, first_bin INTEGER NOT NULL, counts BLOB NOT NULL);
CREATE TABLE logit_effects (
    feature_id INTEGER NOT NULL,
    direction TEXT NOT NULL CHECK (direction IN ('up', 'down')),
    rank INTEGER NOT NULL,
    token_id INTEGER NOT NULL,
    value REAL NOT NULL,
    PRIMARY KEY (feature_id, direction, rank)
) WITHOUT ROWID;
CREATE TABLE neighbours (
    feature_id INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    neighbour_id INTEGER NOT NULL,
    cosine REAL NOT NULL,
    PRIMARY KEY (feature_id, rank)
) WITHOUT ROWID;
CREATE TABLE map (feature_id INTEGER PRIMARY KEY, x REAL NOT NULL, y REAL NOT NULL);
CREATE TABLE labels (
    id INTEGER PRIMARY KEY,
    feature_id INTEGER NOT NULL,
    source TEXT NOT NULL,
    text TEXT NOT NULL,
    detection REAL,
    fuzzing REAL,
    embedding_score REAL,
    created TEXT NOT NULL
);
CREATE INDEX labels_by_feature ON labels (feature_id);
CREATE TABLE label_embeddings (label_id INTEGER PRIMARY KEY, model TEXT NOT NULL, vector BLOB NOT NULL);
CREATE TABLE example_embeddings (feature_id INTEGER PRIMARY KEY, vector BLOB NOT NULL);
CREATE VIRTUAL TABLE labels_fts USING fts5(main, promoted, tokenize='porter unicode61');
CREATE TRIGGER labels_ai AFTER INSERT ON labels BEGIN
    INSERT INTO labels_fts (rowid, main, promoted) VALUES (
        new.id,
        CASE WHEN new.source LIKE 'heuristic%' AND instr(new.text, ' → ') > 0
             THEN substr(new.text, 1, instr(new.text, ' → ') - 1) ELSE new.text END,
        CASE WHEN new.source LIKE 'heuristic%' AND instr(new.text, ' → ') > 0
             THEN substr(new.text, instr(new.text, ' → ') + 3) ELSE '' END);
END;
CREATE TRIGGER labels_ad AFTER DELETE ON labels BEGIN
    DELETE FROM labels_fts WHERE rowid = old.id;
    DELETE FROM label_embeddings WHERE label_id = old.id;
END;
CREATE TRIGGER labels_au AFTER UPDATE OF text ON labels BEGIN
    UPDATE labels_fts SET
        main = CASE WHEN new.source LIKE 'heuristic%' AND instr(new.text, ' → ') > 0
                    THEN substr(new.text, 1, instr(new.text, ' → ') - 1) ELSE new.text END,
        promoted = CASE WHEN new.source LIKE 'heuristic%' AND instr(new.text, ' → ') > 0
                        THEN substr(new.text, instr(new.text, ' → ') + 3) ELSE '' END
    WHERE rowid = new.id;
    DELETE FROM label_embeddings WHERE label_id = old.id;
END;
"""

# The label shown for a feature: any non-heuristic label before heuristic ones (the chosen heuristic label before
# the token label kept beside a concept label), scored before unscored, then by the mean of its scores, then the
# newest.
_BEST_LABEL = """
SELECT text, source FROM labels WHERE feature_id = ?
ORDER BY (source NOT LIKE 'heuristic%') DESC, (source = 'heuristic') DESC,
         (detection IS NOT NULL OR fuzzing IS NOT NULL OR embedding_score IS NOT NULL) DESC,
         (COALESCE(detection, 0) + COALESCE(fuzzing, 0) + COALESCE(embedding_score, 0))
           / MAX(1, (detection IS NOT NULL) + (fuzzing IS NOT NULL) + (embedding_score IS NOT NULL)) DESC,
         id DESC
LIMIT 1
"""


def now_iso() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def default_db_path(sae_dir: str | os.PathLike) -> Path:
    return Path(sae_dir) / DB_FILENAME


def ro_uri(path: Path) -> str:
    """A read-only SQLite URI for `path`: every character URIs reserve ('?', '#', '%', spaces) percent-escaped."""
    return "file:" + urllib.parse.quote(str(path.resolve()), safe="/") + "?mode=ro"


def connect_read_only(path: Path, **kwargs: Any) -> sqlite3.Connection:
    return sqlite3.connect(ro_uri(path), uri=True, **kwargs)


def refresh_shown_labels(conn: sqlite3.Connection, feature_ids: Iterable[int] | None) -> None:
    """Set features.label/label_source to the best label of each feature (all features when None)."""
    if feature_ids is None:
        conn.execute(
            """UPDATE features SET (label, label_source) = (
                   SELECT text, source FROM labels WHERE labels.feature_id = features.id
                   ORDER BY (source NOT LIKE 'heuristic%') DESC, (source = 'heuristic') DESC,
                            (detection IS NOT NULL OR fuzzing IS NOT NULL OR embedding_score IS NOT NULL) DESC,
                            (COALESCE(detection, 0) + COALESCE(fuzzing, 0) + COALESCE(embedding_score, 0))
                              / MAX(1, (detection IS NOT NULL) + (fuzzing IS NOT NULL) + (embedding_score IS NOT NULL)) DESC,
                            id DESC
                   LIMIT 1)"""
        )
        return
    for fid in feature_ids:
        row = conn.execute(_BEST_LABEL, (int(fid),)).fetchone()
        conn.execute(
            "UPDATE features SET label = ?, label_source = ? WHERE id = ?",
            (row[0] if row else None, row[1] if row else None, int(fid)),
        )
